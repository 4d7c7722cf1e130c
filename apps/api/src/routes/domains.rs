//! `/v1/domains`: create, list (cursor pagination) and read an org's domains.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{ApiJson, ApiPath, ApiQuery, Cursor, Page, PageQuery, paginate};
use crate::auth::Auth;
use crate::error::{ApiError, ErrorBody, is_unique_violation};
use crate::state::AppState;

/// A domain of the caller's org.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Domain {
    /// Id.
    pub id: Uuid,
    /// Host name, e.g. `example.com`.
    pub name: String,
    /// `active`, `paused` or `archived`.
    pub status: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// Body of `POST /v1/domains`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDomain {
    /// Host name: lowercase letters, digits, hyphens and dots, at most 253 characters.
    #[schema(min_length = 1, max_length = 253)]
    pub name: String,
}

/// Every status a domain can have.
pub const STATUSES: [&str; 3] = ["active", "paused", "archived"];

/// The `pattern` of a host name in the OpenAPI document: what [`validate_host`] accepts
/// (with `maxLength` 253).
pub const HOST_PATTERN: &str =
    r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$";

const COLUMNS: &str = "id, name, status, created_at, updated_at";

/// Creates a domain.
#[utoipa::path(post, path = "/v1/domains", tag = "domains", request_body = CreateDomain,
    security(("api_key" = [])),
    responses(
        (status = 201, body = Domain),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, description = "name taken in this org", body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 429, body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AppState>,
    auth: Auth,
    ApiJson(body): ApiJson<CreateDomain>,
) -> Result<(StatusCode, Json<Domain>), ApiError> {
    validate_host(&body.name)?;
    let result = state
        .db
        .run(async |conn| {
            sqlx::query_as::<_, Domain>(&format!(
                "INSERT INTO domains (id, org_id, name) VALUES ($1, $2, $3) RETURNING {COLUMNS}"
            ))
            .bind(Uuid::new_v4())
            .bind(auth.org_id)
            .bind(&body.name)
            .fetch_one(conn)
            .await
        })
        .await;
    match result {
        Ok(domain) => Ok((StatusCode::CREATED, Json(domain))),
        Err(smartbeak_database::DbError::Query(ref e)) if is_unique_violation(e) => {
            Err(ApiError::Conflict {
                code: "DOMAIN_EXISTS",
                message: "a domain with this name already exists".into(),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Lists the org's domains, oldest first.
#[utoipa::path(get, path = "/v1/domains", tag = "domains", params(PageQuery),
    security(("api_key" = [])),
    responses((status = 200, body = Page<Domain>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<Json<Page<Domain>>, ApiError> {
    let (limit, cursor) = query.resolve()?;
    let rows = state
        .db
        .run(async |conn| {
            let sql = list_sql(cursor.is_some());
            let mut query = sqlx::query_as::<_, Domain>(&sql)
                .bind(auth.org_id)
                .bind(limit + 1);
            if let Some(c) = cursor {
                query = query.bind(c.created_at).bind(c.id);
            }
            query.fetch_all(conn).await
        })
        .await?;
    Ok(Json(paginate(rows, limit, |d| Cursor {
        created_at: d.created_at,
        id: d.id,
    })))
}

/// The text of [`list`]'s statement, one per shape (with or without the cursor), so that
/// even a generic plan scans `domains_org_cursor_idx` from the cursor (a
/// `$n IS NULL OR ...` condition would leave the cursor out of the index condition). `$1`
/// org, `$2` limit, then the cursor's `created_at` and id.
pub(crate) fn list_sql(with_cursor: bool) -> String {
    let cursor = if with_cursor {
        " AND (created_at, id) > ($3, $4)"
    } else {
        ""
    };
    format!(
        "SELECT {COLUMNS} FROM domains WHERE org_id = $1{cursor} ORDER BY created_at, id LIMIT $2"
    )
}

/// Reads one domain (404 if it belongs to another org).
#[utoipa::path(get, path = "/v1/domains/{id}", tag = "domains",
    params(("id" = Uuid, Path, description = "domain id")),
    security(("api_key" = [])),
    responses((status = 200, body = Domain), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Domain>, ApiError> {
    let domain = state
        .db
        .run(async |conn| {
            sqlx::query_as::<_, Domain>(&format!(
                "SELECT {COLUMNS} FROM domains WHERE id = $1 AND org_id = $2"
            ))
            .bind(id)
            .bind(auth.org_id)
            .fetch_optional(conn)
            .await
        })
        .await?;
    domain.map(Json).ok_or(ApiError::NotFound("domain"))
}

/// A host name as DNS allows it: labels of 1 to 63 of `[a-z0-9-]`, not starting or ending
/// with `-`, separated by dots, 253 characters at most.
pub fn validate_host(name: &str) -> Result<(), ApiError> {
    let bad = |why: &str| Err(ApiError::validation("name", why));
    if name.is_empty() || name.len() > 253 {
        return bad("must be between 1 and 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return bad("each dot-separated label must be 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return bad("may contain only lowercase letters, digits, hyphens and dots");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("labels must not start or end with a hyphen");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_validation() {
        for ok in ["example.com", "a.b-c.io", "localhost", "x1.y2"] {
            assert!(validate_host(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Example.com",
            "a..b",
            "-a.com",
            "a-.com",
            "a b.com",
            "a.com.",
            "é.com",
        ] {
            assert!(validate_host(bad).is_err(), "{bad}");
        }
        assert!(validate_host(&"a".repeat(64)).is_err());
    }
}
