//! Every statement on the export queue (`domain_exports`, `domain_export_attempts`).
//!
//! The api (enqueue, list, get, cancel, download) and the worker (claim, heartbeat,
//! complete, fail, release, reclaim) share this module; nothing else touches the tables.
//!
//! # The fence
//! A claim bumps `fencing_token` and hands the worker a [`Fence`] (id and token). Every
//! write a worker makes (heartbeat and progress, complete, fail, release) is
//! `WHERE id = $1 AND fencing_token = $2`; cancel and every reclaim bump the token. A
//! worker whose write matches no row gets [`FenceError::Fenced`] and must stop at once and
//! remove its temp file: its lease was taken, or the job was cancelled.
//!
//! # Attempts
//! A claim increments `attempts` and inserts a `domain_export_attempts` row (`running`);
//! the statement that ends the attempt (complete, fail, release, cancel, reclaim) ends that
//! row in the same statement, so no attempt is lost. A release at shutdown gives the
//! attempt back (`attempts - 1`, outcome `released`): it did not fail.
//!
//! # Wake-up
//! [`enqueue`] and every statement that makes a job claimable now (release, reclaim)
//! `pg_notify` [`CHANNEL`]; idle workers `LISTEN` on it and fall back to polling.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use smartbeak_database::{Database, DbError};
use utoipa::ToSchema;
use uuid::Uuid;

/// The `LISTEN/NOTIFY` channel that wakes idle workers.
pub const CHANNEL: &str = "smartbeak_export_jobs";

/// An export's file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// One JSON document.
    Json,
    /// CSV: a bare `.csv` for one section, a ZIP of one CSV per section otherwise.
    Csv,
    /// A Markdown summary table and the items.
    Markdown,
}

impl ExportFormat {
    /// The name stored in `domain_exports.format`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Csv => "csv",
            Self::Markdown => "markdown",
        }
    }
}

impl std::str::FromStr for ExportFormat {
    type Err = UnknownFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(Self::Json),
            "csv" => Ok(Self::Csv),
            "markdown" => Ok(Self::Markdown),
            other => Err(UnknownFormat(other.to_owned())),
        }
    }
}

/// A format name that is not `json`, `csv` or `markdown`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown export format {0:?}: must be one of json, csv, markdown")]
pub struct UnknownFormat(pub String);

/// What to export: the part of a job the export writer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// The job (or, for `run`, a fresh id naming the file).
    pub id: Uuid,
    /// The owning org.
    pub org_id: Uuid,
    /// The exported domain.
    pub domain_id: Uuid,
    /// File format.
    pub format: ExportFormat,
    /// Include content items.
    pub include_content: bool,
    /// Include keyword metrics.
    pub include_keywords: bool,
    /// Include the content performance aggregates.
    pub include_analytics: bool,
    /// Start of the metrics range.
    pub date_from: Option<DateTime<Utc>>,
    /// End of the metrics range.
    pub date_to: Option<DateTime<Utc>>,
}

/// A new job, as `POST /v1/domains/{id}/exports` or `enqueue` asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewExport {
    /// File format.
    pub format: ExportFormat,
    /// Include content items.
    pub include_content: bool,
    /// Include keyword metrics.
    pub include_keywords: bool,
    /// Include the content performance aggregates.
    pub include_analytics: bool,
    /// Start of the metrics range.
    pub date_from: Option<DateTime<Utc>>,
    /// End of the metrics range.
    pub date_to: Option<DateTime<Utc>>,
}

/// An export job as the api reports it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct ExportRow {
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
    /// `queued`, `running`, `succeeded`, `failed`, `cancelled`, `expiring` or `expired`.
    pub status: String,
    /// 0 to 100.
    pub progress: i32,
    /// Rows written so far (the record count once succeeded).
    pub rows_written: i64,
    /// Attempts made so far.
    pub attempts: i32,
    /// Attempts allowed before the job is dead-lettered (`failed`).
    pub max_attempts: i32,
    /// The last attempt's error, if any.
    pub error: Option<String>,
    /// Size of the finished file.
    pub size_bytes: Option<i64>,
    /// Records in the finished file.
    pub record_count: Option<i64>,
    /// Hex SHA-256 of the finished file.
    pub checksum_sha256: Option<String>,
    /// When the finished file will be deleted.
    pub expires_at: Option<DateTime<Utc>>,
    /// Not claimed before (retry backoff).
    pub run_after: DateTime<Utc>,
    /// Queued at.
    pub created_at: DateTime<Utc>,
    /// Claimed by a worker at (the latest claim).
    pub started_at: Option<DateTime<Utc>>,
    /// Finished (or cancelled) at.
    pub finished_at: Option<DateTime<Utc>>,
}

/// The columns of [`ExportRow`], for `SELECT` and `RETURNING`.
pub const ROW_COLUMNS: &str = "id, domain_id, format, include_content, include_keywords, \
    include_analytics, date_from, date_to, status, progress, rows_written, attempts, \
    max_attempts, error, size_bytes, record_count, checksum_sha256, expires_at, run_after, \
    created_at, started_at, finished_at";

/// A claimed job's write permission: its id and the token of this claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    /// The job.
    pub id: Uuid,
    /// `fencing_token` as this claim set it.
    pub token: i64,
}

/// A job a worker claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedJob {
    /// What to export.
    pub spec: ExportSpec,
    /// The write permission of this claim.
    pub fence: Fence,
    /// This attempt's number (1 for the first).
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
}

/// A worker's write found the token moved: the job was cancelled or reclaimed.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The row's token is no longer this claim's: stop, remove the temp file.
    #[error("export {0} is no longer held by this worker (cancelled or reclaimed)")]
    Fenced(Uuid),
    /// The statement failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Progress as the worker reports it (at a bounded rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Rows written so far.
    pub rows_written: i64,
    /// 0 to 100.
    pub percent: i32,
}

/// A finished file, as [`complete`] records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// Path relative to `EXPORT_DIR`.
    pub storage_path: String,
    /// File size.
    pub size_bytes: i64,
    /// Records written.
    pub record_count: i64,
    /// Hex SHA-256 of the file.
    pub checksum_sha256: String,
    /// When retention may delete it.
    pub expires_at: DateTime<Utc>,
}

/// What [`fail`] did with a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// Back to `queued`, due at this time.
    Retried {
        /// `run_after` of the next attempt.
        run_after: DateTime<Utc>,
    },
    /// `failed` for good (max attempts reached, or not retryable).
    DeadLettered,
}

/// A job the reaper took back from a worker whose lease expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reclaimed {
    /// The job.
    pub id: Uuid,
    /// True when it had no attempts left and is now `failed`.
    pub dead_lettered: bool,
}

/// What `DELETE /v1/exports/{id}` did.
#[derive(Debug, Clone)]
pub enum CancelOutcome {
    /// It was queued or running and is now `cancelled` (token bumped).
    Cancelled(Box<ExportRow>),
    /// It had already finished with this status.
    NotCancellable(String),
    /// No such export in this org.
    NotFound,
}

/// Queue depth and age, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct QueueStats {
    /// Jobs `queued`.
    pub queued: i64,
    /// Jobs `running`.
    pub running: i64,
    /// Age of the oldest due queued job, in seconds (0 when none).
    pub oldest_queued_age_secs: f64,
}

/// What the download endpoint needs of a job.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DownloadInfo {
    /// Status (only `succeeded` is downloadable).
    pub status: String,
    /// Format name.
    pub format: String,
    /// Path relative to `EXPORT_DIR`.
    pub storage_path: Option<String>,
    /// Hex SHA-256.
    pub checksum_sha256: Option<String>,
    /// Size in bytes.
    pub size_bytes: Option<i64>,
}

/// Queues a job for a domain of `org_id` and notifies [`CHANNEL`]; `None` when the domain
/// is not the org's.
pub async fn enqueue(
    db: &Database,
    org_id: Uuid,
    domain_id: Uuid,
    new: &NewExport,
) -> Result<Option<ExportRow>, DbError> {
    let _ = (db, org_id, domain_id, new);
    unimplemented!("skeleton")
}

/// One job of `org_id`.
pub async fn get(db: &Database, org_id: Uuid, id: Uuid) -> Result<Option<ExportRow>, DbError> {
    let _ = (db, org_id, id);
    unimplemented!("skeleton")
}

/// One job by id alone (the CLI's `status`, which has database access, not an api key).
pub async fn get_any(db: &Database, id: Uuid) -> Result<Option<ExportRow>, DbError> {
    let _ = (db, id);
    unimplemented!("skeleton")
}

/// A domain's jobs, newest first: `limit` after the cursor `(created_at, id)`, optionally
/// only those with `status`.
pub async fn list(
    db: &Database,
    org_id: Uuid,
    domain_id: Uuid,
    status: Option<&str>,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<ExportRow>, DbError> {
    let _ = (db, org_id, domain_id, status, after, limit);
    unimplemented!("skeleton")
}

/// What the download endpoint needs.
pub async fn download_info(
    db: &Database,
    org_id: Uuid,
    id: Uuid,
) -> Result<Option<DownloadInfo>, DbError> {
    let _ = (db, org_id, id);
    unimplemented!("skeleton")
}

/// Cancels a queued or running job: `cancelled`, token bumped, its running attempt ended.
pub async fn cancel(db: &Database, org_id: Uuid, id: Uuid) -> Result<CancelOutcome, DbError> {
    let _ = (db, org_id, id);
    unimplemented!("skeleton")
}

/// Claims up to `limit` due queued jobs (`FOR UPDATE SKIP LOCKED` on the claim index) for
/// `worker` with a lease of `lease`: `running`, `attempts + 1`, token bumped, an attempt row.
pub async fn claim(
    db: &Database,
    worker: &str,
    limit: i64,
    lease: Duration,
) -> Result<Vec<ClaimedJob>, DbError> {
    let _ = (db, worker, limit, lease);
    unimplemented!("skeleton")
}

/// Renews the lease (and records `progress` when given). `Fenced` when the job was
/// cancelled or reclaimed.
pub async fn heartbeat(
    db: &Database,
    fence: Fence,
    lease: Duration,
    progress: Option<Progress>,
) -> Result<(), FenceError> {
    let _ = (db, fence, lease, progress);
    unimplemented!("skeleton")
}

/// Records the finished file: `succeeded`, lease cleared, attempt `succeeded`.
pub async fn complete(db: &Database, fence: Fence, done: &Completed) -> Result<(), FenceError> {
    let _ = (db, fence, done);
    unimplemented!("skeleton")
}

/// Ends a failed attempt: back to `queued` at `now() + retry_after` when `retry_after` is
/// given and attempts remain, else `failed` (dead letter) with `error`.
pub async fn fail(
    db: &Database,
    fence: Fence,
    error: &str,
    retry_after: Option<Duration>,
) -> Result<FailOutcome, FenceError> {
    let _ = (db, fence, error, retry_after);
    unimplemented!("skeleton")
}

/// Gives a job back at shutdown: `queued`, due now, token bumped, the attempt returned.
pub async fn release(db: &Database, fence: Fence) -> Result<(), FenceError> {
    let _ = (db, fence);
    unimplemented!("skeleton")
}

/// The reaper: `running` jobs whose lease expired go back to `queued` (token bumped,
/// attempt `reclaimed`), or to `failed` when no attempts remain. Up to `limit` per call.
pub async fn reclaim_expired(db: &Database, limit: i64) -> Result<Vec<Reclaimed>, DbError> {
    let _ = (db, limit);
    unimplemented!("skeleton")
}

/// Queue depth and the oldest due job's age.
pub async fn stats(db: &Database) -> Result<QueueStats, DbError> {
    let _ = db;
    unimplemented!("skeleton")
}
