//! Domain exports: `POST /v1/domains/{id}/exports` queues a row in `domain_exports` (the
//! export worker claims it), `GET /v1/exports/{id}` reports it, `.../download` streams the
//! finished file, `DELETE` cancels a queued or running export.
//!
//! Contract with the worker: it writes the file under `EXPORT_DIR` and stores the path
//! relative to that directory in `storage_path` (an absolute path must lie inside it), with
//! `size_bytes`, when it sets `status = 'succeeded'`. A cancelled row has
//! `status = 'cancelled'`; the worker must check that status when it completes.

use std::path::{Component, Path, PathBuf};

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::io::ReaderStream;
use utoipa::ToSchema;
use uuid::Uuid;

use super::analytics::parse_instant;
use super::{ApiJson, ApiPath};
use crate::auth::Auth;
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// Body of `POST /v1/domains/{id}/exports`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateExport {
    /// `json`, `csv` or `markdown`.
    pub format: String,
    /// Include content items (default true).
    pub include_content: Option<bool>,
    /// Include keyword metrics (default true).
    pub include_keywords: Option<bool>,
    /// Include analytics (default true).
    pub include_analytics: Option<bool>,
    /// Start of the metrics range (RFC 3339 or `YYYY-MM-DD`).
    pub from: Option<String>,
    /// End of the metrics range (RFC 3339, or `YYYY-MM-DD` for that whole day).
    pub to: Option<String>,
}

/// An export job as the api reports it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Export {
    /// Job id.
    pub id: Uuid,
    /// The exported domain.
    pub domain_id: Uuid,
    /// `json`, `csv` or `markdown`.
    pub format: String,
    /// Content items included.
    pub include_content: bool,
    /// Keyword metrics included.
    pub include_keywords: bool,
    /// Analytics included.
    pub include_analytics: bool,
    /// Start of the range, if any.
    pub date_from: Option<DateTime<Utc>>,
    /// End of the range, if any.
    pub date_to: Option<DateTime<Utc>>,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    /// 0 to 100.
    pub progress: i32,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Size of the finished file.
    pub size_bytes: Option<i64>,
    /// Queued at.
    pub created_at: DateTime<Utc>,
    /// Claimed by a worker at.
    pub started_at: Option<DateTime<Utc>>,
    /// Finished (or cancelled) at.
    pub finished_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, domain_id, format, include_content, include_keywords, \
    include_analytics, date_from, date_to, status, progress, error, size_bytes, created_at, \
    started_at, finished_at";

/// Queues an export (202, `Location: /v1/exports/{id}`).
#[utoipa::path(post, path = "/v1/domains/{id}/exports", tag = "exports", request_body = CreateExport,
    params(("id" = Uuid, Path, description = "domain id")),
    security(("api_key" = [])),
    responses((status = 202, body = Export), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(domain_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<CreateExport>,
) -> Result<Response, ApiError> {
    if !["json", "csv", "markdown"].contains(&body.format.as_str()) {
        return Err(ApiError::validation(
            "format",
            "must be one of json, csv, markdown",
        ));
    }
    let from = body
        .from
        .as_deref()
        .map(|raw| parse_instant("from", raw, false))
        .transpose()?;
    let to = body
        .to
        .as_deref()
        .map(|raw| parse_instant("to", raw, true))
        .transpose()?;
    if let (Some(from), Some(to)) = (from, to)
        && from > to
    {
        return Err(ApiError::validation("from", "must not be after to"));
    }
    let export = state
        .db
        .run(async |conn| {
            sqlx::query_as::<_, Export>(&format!(
                "INSERT INTO domain_exports (id, org_id, domain_id, format, include_content, \
                 include_keywords, include_analytics, date_from, date_to) \
                 SELECT $1, d.org_id, d.id, $4, $5, $6, $7, $8, $9 FROM domains d \
                 WHERE d.id = $2 AND d.org_id = $3 RETURNING {COLUMNS}"
            ))
            .bind(Uuid::new_v4())
            .bind(domain_id)
            .bind(auth.org_id)
            .bind(&body.format)
            .bind(body.include_content.unwrap_or(true))
            .bind(body.include_keywords.unwrap_or(true))
            .bind(body.include_analytics.unwrap_or(true))
            .bind(from)
            .bind(to)
            .fetch_optional(conn)
            .await
        })
        .await?
        .ok_or(ApiError::NotFound("domain"))?;
    metrics::counter!("exports_queued_total").increment(1);
    let mut response = (StatusCode::ACCEPTED, Json(&export)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/exports/{}", export.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// Reports an export's status, progress, error and size.
#[utoipa::path(get, path = "/v1/exports/{id}", tag = "exports",
    params(("id" = Uuid, Path, description = "export id")),
    security(("api_key" = [])),
    responses((status = 200, body = Export), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Export>, ApiError> {
    find(&state, auth.org_id, id).await.map(Json)
}

/// Streams a finished export (409 `EXPORT_NOT_READY` before it has succeeded).
#[utoipa::path(get, path = "/v1/exports/{id}/download", tag = "exports",
    params(("id" = Uuid, Path, description = "export id")),
    security(("api_key" = [])),
    responses((status = 200, description = "the file", content_type = "application/octet-stream"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn download(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Response, ApiError> {
    let row: Option<(String, String, Option<String>)> = state
        .db
        .run(async |conn| sqlx::query_as(
                "SELECT status, format, storage_path FROM domain_exports WHERE id = $1 AND org_id = $2",
            )
            .bind(id)
            .bind(auth.org_id)
            .fetch_optional(conn).await)
        .await?;
    let (status, format, storage_path) = row.ok_or(ApiError::NotFound("export"))?;
    let not_ready = || ApiError::Conflict {
        code: "EXPORT_NOT_READY",
        message: format!("export is {status}, not succeeded"),
    };
    if status != "succeeded" {
        return Err(not_ready());
    }
    let path = storage_path
        .as_deref()
        .and_then(|p| resolve_storage_path(&state.config.export_dir, p))
        .ok_or(ApiError::NotFound("export file"))?;
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::NotFound("export file"));
        }
        Err(err) => return Err(ApiError::internal(err)),
    };
    let length = file.metadata().await.map_err(ApiError::internal)?.len();
    let (content_type, extension) = match format.as_str() {
        "csv" => ("text/csv; charset=utf-8", "csv"),
        "markdown" => ("text/markdown; charset=utf-8", "md"),
        _ => ("application/json", "json"),
    };
    let mut response = Body::from_stream(ReaderStream::new(file)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    if let Ok(disposition) =
        HeaderValue::from_str(&format!("attachment; filename=\"export-{id}.{extension}\""))
    {
        headers.insert(header::CONTENT_DISPOSITION, disposition);
    }
    Ok(response)
}

/// Cancels a queued or running export (409 `EXPORT_NOT_CANCELLABLE` once finished).
#[utoipa::path(delete, path = "/v1/exports/{id}", tag = "exports",
    params(("id" = Uuid, Path, description = "export id")),
    security(("api_key" = [])),
    responses((status = 200, body = Export), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn cancel(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Export>, ApiError> {
    let cancelled = state
        .db
        .run(async |conn| {
            sqlx::query_as::<_, Export>(&format!(
                "UPDATE domain_exports SET status = 'cancelled', finished_at = now(), \
                 updated_at = now(), lease_owner = NULL, lease_expires_at = NULL \
                 WHERE id = $1 AND org_id = $2 AND status IN ('queued', 'running') \
                 RETURNING {COLUMNS}"
            ))
            .bind(id)
            .bind(auth.org_id)
            .fetch_optional(conn)
            .await
        })
        .await?;
    if let Some(export) = cancelled {
        metrics::counter!("exports_cancelled_total").increment(1);
        return Ok(Json(export));
    }
    let existing = find(&state, auth.org_id, id).await?;
    Err(ApiError::Conflict {
        code: "EXPORT_NOT_CANCELLABLE",
        message: format!("export is already {}", existing.status),
    })
}

async fn find(state: &AppState, org_id: Uuid, id: Uuid) -> Result<Export, ApiError> {
    state
        .db
        .run(async |conn| {
            sqlx::query_as::<_, Export>(&format!(
                "SELECT {COLUMNS} FROM domain_exports WHERE id = $1 AND org_id = $2"
            ))
            .bind(id)
            .bind(org_id)
            .fetch_optional(conn)
            .await
        })
        .await?
        .ok_or(ApiError::NotFound("export"))
}

/// The file of `storage_path` inside `export_dir`; `None` if it would escape it.
pub fn resolve_storage_path(export_dir: &Path, storage_path: &str) -> Option<PathBuf> {
    let path = Path::new(storage_path);
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return None;
    }
    if path.is_absolute() {
        return path.starts_with(export_dir).then(|| path.to_path_buf());
    }
    Some(export_dir.join(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_paths_stay_inside_the_export_dir() {
        let dir = Path::new("/var/exports");
        assert_eq!(
            resolve_storage_path(dir, "a/b.csv"),
            Some(PathBuf::from("/var/exports/a/b.csv"))
        );
        assert_eq!(
            resolve_storage_path(dir, "/var/exports/x.json"),
            Some(PathBuf::from("/var/exports/x.json"))
        );
        assert_eq!(resolve_storage_path(dir, "../etc/passwd"), None);
        assert_eq!(resolve_storage_path(dir, "/etc/passwd"), None);
        assert_eq!(resolve_storage_path(dir, "a/../../x"), None);
    }
}
