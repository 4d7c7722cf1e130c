//! `/v1/domains/{id}/content`: create content items and list them (cursor, status filter).
//! Text is stored and returned verbatim: no HTML, SQL or CSV-formula rewriting here; the
//! export writer is the one that neutralises formulas in CSV output.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{
    ApiJson, ApiPath, ApiQuery, Cursor, Page, check_len, check_no_nul, check_year, paginate,
    require_domain,
};
use crate::auth::Auth;
use crate::error::{ApiError, ErrorBody, is_unique_violation};
use crate::state::AppState;

/// Allowed values of `status`.
pub const STATUSES: [&str; 4] = ["draft", "scheduled", "published", "archived"];

/// A content item of a domain.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct ContentItem {
    /// Id.
    pub id: Uuid,
    /// The domain it belongs to.
    pub domain_id: Uuid,
    /// Title, verbatim.
    pub title: String,
    /// URL slug, unique within the domain.
    pub slug: String,
    /// Body text, verbatim.
    pub body: String,
    /// `draft`, `scheduled`, `published` or `archived`.
    pub status: String,
    /// Publication time, if any (set by the control-plane's content-scheduler when it
    /// publishes a `scheduled` item).
    pub published_at: Option<DateTime<Utc>>,
    /// For a `scheduled` item: when the content-scheduler publishes it.
    pub publish_at: Option<DateTime<Utc>>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// Body of `POST /v1/domains/{id}/content`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateContent {
    /// 1 to 500 characters, not only whitespace.
    #[schema(min_length = 1, max_length = 500)]
    pub title: String,
    /// 1 to 500 of lowercase letters, digits and hyphens.
    #[schema(min_length = 1, max_length = 500)]
    pub slug: String,
    /// Body text (default empty), at most 200,000 characters.
    #[serde(default)]
    #[schema(max_length = 200_000)]
    pub body: String,
    /// Default `draft`. `scheduled` needs `publish_at`.
    pub status: Option<String>,
    /// Publication time, in the years 0001 to 9999 (UTC).
    pub published_at: Option<DateTime<Utc>>,
    /// When to publish (RFC 3339, years 0001 to 9999): required with `status: "scheduled"`
    /// and refused with any other status. The control-plane's content-scheduler publishes
    /// the item once this time has passed.
    pub publish_at: Option<DateTime<Utc>>,
}

/// Query of `GET /v1/domains/{id}/content`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ContentQuery {
    /// Items per page, 1 to 100 (default 50).
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only items with this status.
    pub status: Option<String>,
}

/// The `pattern` of a slug in the OpenAPI document.
pub const SLUG_PATTERN: &str = "^[a-z0-9-]{1,500}$";

const COLUMNS: &str =
    "id, domain_id, title, slug, body, status, published_at, publish_at, created_at, updated_at";
const MAX_BODY_CHARS: usize = 200_000;

/// Creates a content item.
#[utoipa::path(post, path = "/v1/domains/{id}/content", tag = "content", request_body = CreateContent,
    params(("id" = Uuid, Path, description = "domain id")),
    security(("api_key" = [])),
    responses((status = 201, body = ContentItem), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "slug taken", body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(domain_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<CreateContent>,
) -> Result<(StatusCode, Json<ContentItem>), ApiError> {
    check_len("title", &body.title, 1, 500)?;
    check_len("slug", &body.slug, 1, 500)?;
    if !body
        .slug
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(ApiError::validation(
            "slug",
            "may contain only lowercase letters, digits and hyphens",
        ));
    }
    if body.body.chars().count() > MAX_BODY_CHARS {
        return Err(ApiError::validation(
            "body",
            format!("must be at most {MAX_BODY_CHARS} characters"),
        ));
    }
    check_no_nul("body", &body.body)?;
    let status = body.status.as_deref().unwrap_or("draft");
    validate_status(status)?;
    if let Some(at) = body.published_at {
        check_year("published_at", at)?;
    }
    match (status, body.publish_at) {
        ("scheduled", Some(at)) => {
            check_year("publish_at", at)?;
        }
        ("scheduled", None) => {
            return Err(ApiError::validation(
                "publish_at",
                "is required when status is scheduled (an RFC 3339 timestamp)",
            ));
        }
        (_, Some(_)) => {
            return Err(ApiError::validation(
                "publish_at",
                "is allowed only when status is scheduled",
            ));
        }
        (_, None) => {}
    }
    let result = state
        .db
        .run(async |conn| sqlx::query_as::<_, ContentItem>(&format!(
                "INSERT INTO content_items (id, domain_id, title, slug, body, status, published_at, publish_at) \
                 SELECT $1, d.id, $3, $4, $5, $6, $7, $9 FROM domains d WHERE d.id = $2 AND d.org_id = $8 \
                 RETURNING {COLUMNS}"
            ))
            .bind(Uuid::new_v4())
            .bind(domain_id)
            .bind(&body.title)
            .bind(&body.slug)
            .bind(&body.body)
            .bind(status)
            .bind(body.published_at)
            .bind(auth.org_id)
            .bind(body.publish_at)
            .fetch_optional(conn).await)
        .await;
    match result {
        Ok(Some(item)) => Ok((StatusCode::CREATED, Json(item))),
        Ok(None) => Err(ApiError::NotFound("domain")),
        Err(smartbeak_database::DbError::Query(ref e)) if is_unique_violation(e) => {
            Err(ApiError::Conflict {
                code: "SLUG_EXISTS",
                message: "a content item with this slug already exists in this domain".into(),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Lists a domain's content, oldest first, optionally by status.
#[utoipa::path(get, path = "/v1/domains/{id}/content", tag = "content",
    params(("id" = Uuid, Path, description = "domain id"), ContentQuery),
    security(("api_key" = [])),
    responses((status = 200, body = Page<ContentItem>), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(domain_id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<ContentQuery>,
) -> Result<Json<Page<ContentItem>>, ApiError> {
    let (limit, cursor) = super::PageQuery {
        limit: query.limit,
        cursor: query.cursor.clone(),
    }
    .resolve()?;
    if let Some(status) = &query.status {
        validate_status(status)?;
    }
    require_domain(&state, auth.org_id, domain_id).await?;
    let rows = state
        .db
        .run(async |conn| {
            let sql = list_sql(query.status.is_some(), cursor.is_some());
            let mut q = sqlx::query_as::<_, ContentItem>(&sql)
                .bind(domain_id)
                .bind(limit + 1);
            if let Some(status) = query.status.as_deref() {
                q = q.bind(status);
            }
            if let Some(c) = cursor {
                q = q.bind(c.created_at).bind(c.id);
            }
            q.fetch_all(conn).await
        })
        .await?;
    Ok(Json(paginate(rows, limit, |c| Cursor {
        created_at: c.created_at,
        id: c.id,
    })))
}

/// The text of [`list`]'s statement, one per shape (with or without the status filter,
/// with or without the cursor), so that even a generic plan scans
/// `content_items_domain_cursor_idx` (or `content_items_domain_status_cursor_idx`) from the
/// cursor: a `$n IS NULL OR ...` condition would leave the status and the cursor out of the
/// index condition. `$1` domain, `$2` limit, then the status, then the cursor's
/// `created_at` and id.
pub(crate) fn list_sql(with_status: bool, with_cursor: bool) -> String {
    let mut sql = format!("SELECT {COLUMNS} FROM content_items WHERE domain_id = $1");
    let mut next = 3;
    if with_status {
        sql.push_str(&format!(" AND status = ${next}"));
        next += 1;
    }
    if with_cursor {
        sql.push_str(&format!(
            " AND (created_at, id) > (${}, ${})",
            next,
            next + 1
        ));
    }
    sql.push_str(" ORDER BY created_at, id LIMIT $2");
    sql
}

fn validate_status(status: &str) -> Result<(), ApiError> {
    if STATUSES.contains(&status) {
        Ok(())
    } else {
        Err(ApiError::validation(
            "status",
            "must be one of draft, scheduled, published, archived",
        ))
    }
}
