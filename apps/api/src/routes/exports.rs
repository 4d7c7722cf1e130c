//! Domain exports: `POST /v1/domains/{id}/exports` queues a job, `GET /v1/domains/{id}/exports`
//! lists a domain's jobs, `GET /v1/exports/{id}` reports one, `.../download` streams the
//! finished file, `DELETE` cancels a queued or running export.
//!
//! Every statement is in [`crate::jobs::queue`], shared with the export worker: its module
//! docs are the contract (states, the fence, attempts). Files are read through
//! [`crate::jobs::paths::resolve_inside`], the one check that a path stays inside
//! `EXPORT_DIR`, then opened without following symlinks and compared (device, inode) with
//! what was checked.

use std::path::Path;
use std::str::FromStr;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio_util::io::ReaderStream;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::analytics::parse_instant;
use super::{ApiJson, ApiPath, ApiQuery, Cursor, Page, PageQuery, paginate, require_domain};
use crate::auth::Auth;
use crate::error::{ApiError, ErrorBody};
use crate::idempotency::{self, Claim, IdempotencyKey};
use crate::jobs::paths::{self, PathError};
use crate::jobs::queue::{self, CancelOutcome, ExportFormat, ExportRow, NewExport};
use crate::state::AppState;

/// Body of `POST /v1/domains/{id}/exports`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
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

/// Query of `GET /v1/domains/{id}/exports`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExportListQuery {
    /// Items per page, 1 to 100 (default 50).
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only exports with this status: `queued`, `running`, `succeeded`, `failed`,
    /// `cancelled`, `expiring` or `expired`.
    pub status: Option<String>,
}

/// Every format an export can be written in.
pub const FORMATS: [&str; 3] = ["json", "csv", "markdown"];

/// Every status an export can have.
pub const STATUSES: [&str; 7] = [
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "expiring",
    "expired",
];

/// Queues an export (202, `Location: /v1/exports/{id}`). With an `Idempotency-Key`, a
/// repeat within 24 hours gets the first 202 again instead of a second job.
#[utoipa::path(post, path = "/v1/domains/{id}/exports", tag = "exports", request_body = CreateExport,
    params(("id" = Uuid, Path, description = "domain id"), IdempotencyKey),
    security(("api_key" = [])),
    responses((status = 202, body = ExportRow), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 422, description = "`INVALID_BODY`, or `IDEMPOTENCY_KEY_REUSED`: the `Idempotency-Key` was used with another body", body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(domain_id): ApiPath<Uuid>,
    idempotency_key: IdempotencyKey,
    ApiJson(body): ApiJson<CreateExport>,
) -> Result<Response, ApiError> {
    let format = ExportFormat::from_str(&body.format)
        .map_err(|_| ApiError::validation("format", "must be one of json, csv, markdown"))?;
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
    let new = NewExport {
        format,
        include_content: body.include_content.unwrap_or(true),
        include_keywords: body.include_keywords.unwrap_or(true),
        include_analytics: body.include_analytics.unwrap_or(true),
        date_from: from,
        date_to: to,
    };
    let Some(key) = idempotency_key.key else {
        let export = queue::enqueue(&state.db, auth.org_id, domain_id, &new)
            .await?
            .ok_or(ApiError::NotFound("domain"))?;
        metrics::counter!("exports_queued_total").increment(1);
        let location = format!("/v1/exports/{}", export.id);
        return Ok(idempotency::respond(
            StatusCode::ACCEPTED,
            &export,
            Some(&location),
        ));
    };
    let mut tx = state.db.begin().await?;
    let scope = format!("create_export:{domain_id}");
    let claimed = match idempotency::claim(
        &mut tx,
        auth.org_id,
        scope,
        key,
        idempotency::body_hash(&body)?,
    )
    .await?
    {
        Claim::Replay(response) => return Ok(response),
        Claim::New(claimed) => claimed,
    };
    let export = queue::enqueue_in(&mut tx, auth.org_id, domain_id, &new)
        .await?
        .ok_or(ApiError::NotFound("domain"))?;
    let location = format!("/v1/exports/{}", export.id);
    claimed
        .store(&mut tx, StatusCode::ACCEPTED, &export, Some(&location))
        .await?;
    tx.commit().await?;
    metrics::counter!("exports_queued_total").increment(1);
    Ok(idempotency::respond(
        StatusCode::ACCEPTED,
        &export,
        Some(&location),
    ))
}

/// Lists a domain's exports, newest first, optionally by status.
#[utoipa::path(get, path = "/v1/domains/{id}/exports", tag = "exports",
    params(("id" = Uuid, Path, description = "domain id"), ExportListQuery),
    security(("api_key" = [])),
    responses((status = 200, description = "a page of exports, newest first", body = Page<ExportRow>),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(domain_id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<ExportListQuery>,
) -> Result<Json<Page<ExportRow>>, ApiError> {
    let (limit, cursor) = PageQuery {
        limit: query.limit,
        cursor: query.cursor.clone(),
    }
    .resolve()?;
    if let Some(status) = &query.status
        && !STATUSES.contains(&status.as_str())
    {
        return Err(ApiError::validation(
            "status",
            format!("must be one of {}", STATUSES.join(", ")),
        ));
    }
    require_domain(&state, auth.org_id, domain_id).await?;
    let rows = queue::list(
        &state.db,
        auth.org_id,
        domain_id,
        query.status.as_deref(),
        cursor.map(|c| (c.created_at, c.id)),
        limit + 1,
    )
    .await?;
    Ok(Json(paginate(rows, limit, |e| Cursor {
        created_at: e.created_at,
        id: e.id,
    })))
}

/// Reports an export's status, progress, attempts, error, size and checksum.
#[utoipa::path(get, path = "/v1/exports/{id}", tag = "exports",
    params(("id" = Uuid, Path, description = "export id")),
    security(("api_key" = [])),
    responses((status = 200, body = ExportRow), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<ExportRow>, ApiError> {
    queue::get(&state.db, auth.org_id, id)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound("export"))
}

/// Streams a finished export (409 `EXPORT_NOT_READY` before it has succeeded), with
/// `Content-Disposition`, `Content-Length`, an `ETag` (the quoted hex SHA-256) and
/// `Repr-Digest` (RFC 9530); `If-None-Match` with that ETag gets 304.
#[utoipa::path(get, path = "/v1/exports/{id}/download", tag = "exports",
    params(("id" = Uuid, Path, description = "export id")),
    security(("api_key" = [])),
    responses((status = 200, description = "the file: JSON, CSV (a ZIP of one CSV per section \
        when several are included), or Markdown; CSV and Markdown are sent with \
        `charset=utf-8`",
        content(("application/json"), ("text/csv"), ("application/zip"), ("text/markdown")),
        headers(("ETag" = String, description = "the quoted hex SHA-256 of the file"),
            ("Repr-Digest" = String, description = "`sha-256=:<base64>:` (RFC 9530)"))),
        (status = 304, description = "not modified (`If-None-Match` matched the ETag)"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn download(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(id): ApiPath<Uuid>,
    request_headers: HeaderMap,
) -> Result<Response, ApiError> {
    let info = queue::download_info(&state.db, auth.org_id, id)
        .await?
        .ok_or(ApiError::NotFound("export"))?;
    if info.status != "succeeded" {
        return Err(ApiError::Conflict {
            code: "EXPORT_NOT_READY",
            message: format!("export is {}, not succeeded", info.status),
        });
    }
    // The schema's CHECK guarantees all three on a succeeded row.
    let (Some(storage_path), Some(checksum), Some(size)) =
        (info.storage_path, info.checksum_sha256, info.size_bytes)
    else {
        return Err(ApiError::internal(format!(
            "succeeded export {id} lacks its path, checksum or size"
        )));
    };
    let digest = hex::decode(&checksum)
        .map_err(|e| ApiError::internal(format!("export {id} has a malformed checksum: {e}")))?;
    let etag = format!("\"{checksum}\"");

    let file = open_export_file(&state.config.export_dir, id, &storage_path).await?;
    let metadata = file.metadata().await.map_err(ApiError::internal)?;
    let length = metadata.len();
    if u64::try_from(size).ok() != Some(length) {
        // The digest headers would be wrong: refuse rather than send them.
        return Err(ApiError::internal(format!(
            "export file {storage_path} has {length} bytes, its row records {size}"
        )));
    }
    if if_none_match(&request_headers, &etag) {
        // Only once the file is known to be there, this export's own and whole.
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        insert(response.headers_mut(), header::ETAG, &etag);
        return Ok(response);
    }
    let (content_type, extension) = file_type(&storage_path, &info.format);

    let mut response = Body::from_stream(ReaderStream::new(file)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    insert(
        headers,
        header::CONTENT_DISPOSITION,
        &format!("attachment; filename=\"export-{id}.{extension}\""),
    );
    insert(headers, header::ETAG, &etag);
    insert(
        headers,
        header::HeaderName::from_static("repr-digest"),
        &format!(
            "sha-256=:{}:",
            base64::engine::general_purpose::STANDARD.encode(digest)
        ),
    );
    Ok(response)
}

/// Cancels a queued or running export (409 `EXPORT_NOT_CANCELLABLE` once finished). A
/// running export's worker is fenced: it stops and removes its partial file.
#[utoipa::path(delete, path = "/v1/exports/{id}", tag = "exports",
    params(("id" = Uuid, Path, description = "export id")),
    security(("api_key" = [])),
    responses((status = 200, body = ExportRow), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn cancel(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<ExportRow>, ApiError> {
    match queue::cancel(&state.db, auth.org_id, id).await? {
        CancelOutcome::Cancelled(export) => {
            metrics::counter!("exports_cancelled_total").increment(1);
            Ok(Json(*export))
        }
        CancelOutcome::NotCancellable(status) => Err(ApiError::Conflict {
            code: "EXPORT_NOT_CANCELLABLE",
            message: format!("export is already {status}"),
        }),
        CancelOutcome::NotFound => Err(ApiError::NotFound("export")),
    }
}

/// Opens export `id`'s stored file for reading, or 404 `export file` when it is missing or
/// refused.
///
/// Refused: a `storage_path` that is not one name of the export's own id
/// (`<id>.<token>.<ext>` or the legacy `<id>.<ext>`, [`paths::parse_file_name`]; a row
/// must not point at another export's file; the schema's CHECK says so too), a path
/// leading out of `EXPORT_DIR` ([`paths::resolve_inside`]), a symlink even inside it (the
/// canonical name must be the stored one), and a file swapped between the check and the
/// open: the file is opened with `O_NOFOLLOW` and its (device, inode) must be those of
/// the canonical path examined before.
async fn open_export_file(
    export_dir: &Path,
    id: Uuid,
    storage_path: &str,
) -> Result<tokio::fs::File, ApiError> {
    use std::os::unix::fs::MetadataExt as _;

    let refuse = |why: &'static str| {
        // Only a tampered directory or row gets here: the worker stores names built from
        // ids. The client learns nothing beyond "no file".
        tracing::warn!(export = %id, storage_path, why, "export file refused");
        ApiError::NotFound("export file")
    };
    let stored = Path::new(storage_path);
    if stored.components().count() != 1
        || paths::parse_file_name(storage_path).is_none_or(|(owner, _)| owner != id)
    {
        return Err(refuse("the stored name is not the export's own id"));
    }
    let path = match paths::resolve_inside(export_dir, storage_path) {
        Ok(path) => path,
        Err(PathError::NotFound(_)) => return Err(ApiError::NotFound("export file")),
        Err(PathError::Outside(_)) => return Err(refuse("it leads outside EXPORT_DIR")),
        Err(PathError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::NotFound("export file"));
        }
        Err(err) => return Err(ApiError::internal(err)),
    };
    if path.file_name() != stored.file_name() {
        return Err(refuse("it is a symlink to another file"));
    }
    let checked = match tokio::fs::symlink_metadata(&path).await {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::NotFound("export file"));
        }
        Err(err) => return Err(ApiError::internal(err)),
    };
    let file = match tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .await
    {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::NotFound("export file"));
        }
        Err(err) if err.raw_os_error() == Some(libc::ELOOP) => {
            return Err(refuse("it became a symlink before it was opened"));
        }
        Err(err) => return Err(ApiError::internal(err)),
    };
    let opened = file.metadata().await.map_err(ApiError::internal)?;
    if !opened.is_file() || (opened.dev(), opened.ino()) != (checked.dev(), checked.ino()) {
        return Err(refuse("it changed between the check and the open"));
    }
    Ok(file)
}

/// Content type and file name extension of a stored file: its own extension says which
/// (a CSV export of several sections is a `.zip`); the format decides otherwise.
fn file_type(storage_path: &str, format: &str) -> (&'static str, &'static str) {
    let stored = Path::new(storage_path)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    match (stored, format) {
        ("zip", _) => ("application/zip", "zip"),
        ("csv", _) | (_, "csv") => ("text/csv; charset=utf-8", "csv"),
        ("md", _) | (_, "markdown") => ("text/markdown; charset=utf-8", "md"),
        _ => ("application/json", "json"),
    }
}

/// Whether `If-None-Match` lists `etag` (or is `*`); weak comparison, as RFC 9110 asks.
fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|tag| tag.trim())
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

fn insert(headers: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
pub(crate) mod tests;
