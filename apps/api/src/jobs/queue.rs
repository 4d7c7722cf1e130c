//! Every statement on the export queue (`domain_exports`, `domain_export_attempts`).
//!
//! The api (enqueue, list, get, cancel, download) and the worker (claim, heartbeat, the
//! fence check, complete and its re-read, fail, release, reclaim, the sweep's referenced
//! files) share this module; nothing else touches the tables.
//!
//! # States
//! | from | statement | to | token | `attempts` | attempt row |
//! | --- | --- | --- | --- | --- | --- |
//! | (none) | [`enqueue`] (notifies) | `queued` | 0 | 0 | |
//! | `queued`, due | [`claim`] | `running` (lease set) | +1 | +1 | inserted, `running` |
//! | `running` | [`heartbeat`] | `running` (lease renewed, progress) | = | = | |
//! | `running` | [`complete`] | `succeeded` (file, checksum, `expires_at`) | +1 | = | `succeeded` |
//! | `running` | [`fail`], retryable, attempts left (notifies) | `queued`, due at `now() + retry_after` | +1 | = | `retried` |
//! | `running` | [`fail`], otherwise | `failed` (dead letter) | +1 | = | `failed` |
//! | `running` | [`release`] (shutdown; notifies) | `queued`, due now | +1 | -1 | `released` |
//! | `running`, lease expired | [`reclaim_expired`], attempts left (notifies) | `queued`, due now | +1 | = | `reclaimed` |
//! | `running`, lease expired | [`reclaim_expired`], none left | `failed` | +1 | = | `reclaimed` |
//! | `queued`, `running` | [`cancel`] | `cancelled` | +1 | = | `cancelled` (if running) |
//!
//! `succeeded`, `failed` and `cancelled` are final (`finished_at` set, the schema checks it);
//! the control-plane's retention later moves `succeeded` to `expiring` and `expired`. Every
//! transition out of `running` bumps the token and clears the lease. A retried job keeps
//! its last error until it succeeds.
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
//! row in the same statement, so no attempt is lost.
//!
//! **Attempts are counted at the claim, and only there.** The issue's text has the reaper
//! bump `attempts`; here [`reclaim_expired`] does not, because the claim that started the
//! reclaimed attempt already counted it: a reclaimed attempt counts exactly once, and the
//! next claim makes it `attempts + 1`. (Bumping in the reaper too would count a dead
//! worker's attempt twice and dead-letter a job one attempt early.) The reaper dead-letters
//! a job whose counted attempts reached `max_attempts`.
//!
//! **A release is not an attempt.** [`release`] (a worker giving a job back at shutdown)
//! sets `attempts - 1`: the job did not fail, so the next claim reuses the same attempt
//! number. Its attempt row stays (outcome `released`), so two attempt rows can carry the
//! same `attempt` number; `fencing_token` (unique per job) tells them apart.
//!
//! # Ending an attempt: the file and the row
//! The export writer renames the finished file into place before [`complete`] records it,
//! so at `complete` the FINAL file (not a temp file) already exists. The worker then:
//! - on `Ok`: keeps the file;
//! - on [`FenceError::Fenced`]: the job was cancelled or reclaimed before the completion
//!   committed, and the row does not reference this attempt's file: delete the final
//!   file. File names are per attempt (`<id>.<token>.<ext>`,
//!   [`crate::jobs::paths::file_name`]), so the file is this attempt's alone: no other
//!   attempt writes, records or deletes it;
//! - on [`FenceError::Db`]: the outcome is unknown (a client-side timeout can fire after
//!   the server committed the completion, or while the statement still runs there).
//!   Re-read the row with [`completion_state`] (a few tries) before deleting anything.
//!   `succeeded` (or later) with this attempt's `storage_path`: the completion committed
//!   and only its reply was lost, keep the file. Still `running` with this claim's
//!   token: undecided, call `complete` again with the same fence (it either commits, or
//!   is `Fenced` because the first one did: re-read again). Any other state (its token
//!   moved: cancelled, failed, another claim's): as `Fenced`. A failed re-read decides
//!   nothing: keep the file rather than delete one a row may reference; the worker's
//!   orphan sweep deletes it once it is old (two leases) and no row references it
//!   ([`file_owners`]).
//!
//! The worker's completion helper implements these rules.
//!
//! # Wake-up
//! [`enqueue`] and every statement that puts a job back in the queue (a retrying
//! [`fail`], whatever its backoff, [`release`], [`reclaim_expired`]) `pg_notify`
//! [`CHANNEL`]; idle workers `LISTEN` on it and fall back to polling. A
//! [`cancel`] of a running job notifies [`CANCEL_CHANNEL`] with the job's id, so its worker
//! can stop within a second without polling its row (the fence stays the guarantee).
//! Notifications are delivered when the statement's transaction commits.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use smartbeak_database::{Database, DbError, Tx};
use utoipa::ToSchema;
use uuid::Uuid;

pub mod retention;

/// The `LISTEN/NOTIFY` channel that wakes idle workers.
pub const CHANNEL: &str = "smartbeak_export_jobs";

/// The `LISTEN/NOTIFY` channel [`cancel`] notifies (payload: the job id) when it cancels a
/// `running` job, so the worker running it can stop at once rather than at its next
/// fenced write.
pub const CANCEL_CHANNEL: &str = "smartbeak_export_cancels";

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
    /// The fencing token of this attempt's claim: with the id it names the file
    /// (`paths::file_name`), so every attempt writes a file of its own (`run` uses 0).
    pub token: i64,
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
    /// [`complete`] was given a file name that is not this claim's
    /// (`paths::file_name(id, token, ext)`): refused before any statement.
    #[error("export {id} cannot record {path:?}: not the file name of its claim's token")]
    ForeignFile {
        /// The job.
        id: Uuid,
        /// The refused `storage_path`.
        path: String,
    },
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
///
/// One statement: the `INSERT ... SELECT` from `domains` (so another org's domain inserts
/// nothing) and the `pg_notify`, delivered when the statement commits.
pub async fn enqueue(
    db: &Database,
    org_id: Uuid,
    domain_id: Uuid,
    new: &NewExport,
) -> Result<Option<ExportRow>, DbError> {
    db.run(async |conn| insert_job(conn, org_id, domain_id, new).await)
        .await
}

/// [`enqueue`] in the transaction `tx` (an `Idempotency-Key` record commits with the job);
/// the notification is delivered when `tx` commits.
pub async fn enqueue_in(
    tx: &mut Tx,
    org_id: Uuid,
    domain_id: Uuid,
    new: &NewExport,
) -> Result<Option<ExportRow>, DbError> {
    tx.run(async |conn| insert_job(conn, org_id, domain_id, new).await)
        .await
}

async fn insert_job(
    conn: &mut sqlx::PgConnection,
    org_id: Uuid,
    domain_id: Uuid,
    new: &NewExport,
) -> Result<Option<ExportRow>, sqlx::Error> {
    let sql = format!(
        "WITH ins AS ( \
             INSERT INTO domain_exports (id, org_id, domain_id, format, include_content, \
                 include_keywords, include_analytics, date_from, date_to) \
             SELECT $1, d.org_id, d.id, $4, $5, $6, $7, $8, $9 FROM domains d \
             WHERE d.id = $2 AND d.org_id = $3 \
             RETURNING {ROW_COLUMNS}) \
         SELECT {ROW_COLUMNS}, pg_notify($10, id::text)::text AS notified FROM ins"
    );
    sqlx::query_as::<_, ExportRow>(&sql)
        .bind(Uuid::new_v4())
        .bind(domain_id)
        .bind(org_id)
        .bind(new.format.as_str())
        .bind(new.include_content)
        .bind(new.include_keywords)
        .bind(new.include_analytics)
        .bind(new.date_from)
        .bind(new.date_to)
        .bind(CHANNEL)
        .fetch_optional(conn)
        .await
}

/// One job of `org_id`.
pub async fn get(db: &Database, org_id: Uuid, id: Uuid) -> Result<Option<ExportRow>, DbError> {
    let sql = format!("SELECT {ROW_COLUMNS} FROM domain_exports WHERE id = $1 AND org_id = $2");
    db.run(async |conn| {
        sqlx::query_as::<_, ExportRow>(&sql)
            .bind(id)
            .bind(org_id)
            .fetch_optional(conn)
            .await
    })
    .await
}

/// One job by id alone (the CLI's `status`, which has database access, not an api key).
pub async fn get_any(db: &Database, id: Uuid) -> Result<Option<ExportRow>, DbError> {
    let sql = format!("SELECT {ROW_COLUMNS} FROM domain_exports WHERE id = $1");
    db.run(async |conn| {
        sqlx::query_as::<_, ExportRow>(&sql)
            .bind(id)
            .fetch_optional(conn)
            .await
    })
    .await
}

/// A domain's jobs, newest first: `limit` after the cursor `(created_at, id)`, optionally
/// only those with `status`.
///
/// The api asks for `limit + 1` rows to know whether there is a next page. An unknown
/// domain, or another org's, has no jobs (the api checks the domain first for its 404).
pub async fn list(
    db: &Database,
    org_id: Uuid,
    domain_id: Uuid,
    status: Option<&str>,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<ExportRow>, DbError> {
    let sql = list_sql(status.is_some(), after.is_some());
    db.run(async |conn| {
        let mut query = sqlx::query_as::<_, ExportRow>(&sql)
            .bind(domain_id)
            .bind(org_id)
            .bind(limit.max(0));
        if let Some(status) = status {
            query = query.bind(status);
        }
        if let Some((created_at, id)) = after {
            query = query.bind(created_at).bind(id);
        }
        query.fetch_all(conn).await
    })
    .await
}

/// The text of [`list`]'s statement, one per shape (with or without the status filter,
/// with or without the cursor), so that even a generic plan scans
/// `domain_exports_domain_cursor_idx` from the cursor: a `$n IS NULL OR ...` condition
/// would leave the cursor out of the index condition. `$1` domain, `$2` org, `$3` limit,
/// then the status, then the cursor's `created_at` and id.
fn list_sql(with_status: bool, with_cursor: bool) -> String {
    let mut sql =
        format!("SELECT {ROW_COLUMNS} FROM domain_exports WHERE domain_id = $1 AND org_id = $2");
    let mut next = 4;
    if with_status {
        sql.push_str(&format!(" AND status = ${next}"));
        next += 1;
    }
    if with_cursor {
        sql.push_str(&format!(
            " AND (created_at, id) < (${}, ${})",
            next,
            next + 1
        ));
    }
    sql.push_str(" ORDER BY created_at DESC, id DESC LIMIT $3");
    sql
}

/// What the download endpoint needs.
pub async fn download_info(
    db: &Database,
    org_id: Uuid,
    id: Uuid,
) -> Result<Option<DownloadInfo>, DbError> {
    db.run(async |conn| {
        sqlx::query_as::<_, DownloadInfo>(
            "SELECT status, format, storage_path, checksum_sha256, size_bytes \
             FROM domain_exports WHERE id = $1 AND org_id = $2",
        )
        .bind(id)
        .bind(org_id)
        .fetch_optional(conn)
        .await
    })
    .await
}

/// Cancels a queued or running job: `cancelled`, token bumped, its running attempt ended.
///
/// The bump fences the worker holding a running job: its next heartbeat (or its
/// completion) gets [`FenceError::Fenced`], so it cannot overwrite the cancellation. A
/// running job's cancel is also notified on [`CANCEL_CHANNEL`].
///
/// A transaction of two statements: `SELECT ... FOR UPDATE` of the job first, which waits
/// for a concurrent claim (or completion, failure, reclaim) to commit, then the cancel
/// itself. Under READ COMMITTED the second statement takes a fresh snapshot, so it sees
/// the attempt row a claim that committed meanwhile inserted, and ends it; a single
/// statement would re-check the job row after the wait but not see that attempt row,
/// leaving it `running` and notifying nobody.
pub async fn cancel(db: &Database, org_id: Uuid, id: Uuid) -> Result<CancelOutcome, DbError> {
    let sql = format!(
        "WITH c AS ( \
             UPDATE domain_exports SET status = 'cancelled', \
                 fencing_token = fencing_token + 1, finished_at = now(), updated_at = now(), \
                 lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $1 AND org_id = $2 AND status IN ('queued', 'running') \
             RETURNING {ROW_COLUMNS}), \
         att AS ( \
             UPDATE domain_export_attempts a SET outcome = 'cancelled', finished_at = now() \
             FROM c WHERE a.export_id = c.id AND a.outcome = 'running') \
         SELECT {ROW_COLUMNS}, \
             CASE WHEN $4 THEN pg_notify($3, id::text)::text END AS notified \
         FROM c"
    );
    let mut tx = db.begin().await?;
    let status: Option<String> = tx
        .run(async |conn| {
            sqlx::query_scalar(
                "SELECT status FROM domain_exports WHERE id = $1 AND org_id = $2 FOR UPDATE",
            )
            .bind(id)
            .bind(org_id)
            .fetch_optional(conn)
            .await
        })
        .await?;
    let was_running = match status.as_deref() {
        Some("queued") => false,
        Some("running") => true,
        // A finished job (which never becomes queued or running again), or none of this
        // org's: nothing to write.
        Some(_) | None => {
            tx.rollback().await?;
            return Ok(match status {
                Some(status) => CancelOutcome::NotCancellable(status),
                None => CancelOutcome::NotFound,
            });
        }
    };
    let cancelled = tx
        .run(async |conn| {
            sqlx::query_as::<_, ExportRow>(&sql)
                .bind(id)
                .bind(org_id)
                .bind(CANCEL_CHANNEL)
                .bind(was_running)
                .fetch_one(conn)
                .await
        })
        .await?;
    tx.commit().await?;
    Ok(CancelOutcome::Cancelled(Box::new(cancelled)))
}

/// The row [`claim`] returns for each job.
#[derive(sqlx::FromRow)]
struct ClaimRow {
    id: Uuid,
    org_id: Uuid,
    domain_id: Uuid,
    format: String,
    include_content: bool,
    include_keywords: bool,
    include_analytics: bool,
    date_from: Option<DateTime<Utc>>,
    date_to: Option<DateTime<Utc>>,
    fencing_token: i64,
    attempts: i32,
    max_attempts: i32,
}

/// Claims up to `limit` due queued jobs (`FOR UPDATE SKIP LOCKED` on the claim index) for
/// `worker` with a lease of `lease`: `running`, `attempts + 1`, token bumped, an attempt row.
///
/// One statement: the due rows (oldest `run_after` first, on `domain_exports_claim_idx`),
/// the `UPDATE` and the `INSERT` of the attempt rows, so a claim without its attempt row
/// cannot exist. Rows locked by a concurrent claim are skipped, never claimed twice.
pub async fn claim(
    db: &Database,
    worker: &str,
    limit: i64,
    lease: Duration,
) -> Result<Vec<ClaimedJob>, DbError> {
    if limit <= 0 {
        return Ok(Vec::new());
    }
    let rows = db
        .run(async |conn| {
            sqlx::query_as::<_, ClaimRow>(CLAIM_SQL)
                .bind(limit)
                .bind(worker)
                .bind(lease.as_secs_f64())
                .fetch_all(conn)
                .await
        })
        .await?;
    rows.into_iter()
        .map(|row| {
            let format = row.format.parse::<ExportFormat>().map_err(|e| {
                // The schema's CHECK allows only the three names: this is a schema change
                // this code does not know.
                DbError::Query(sqlx::Error::Decode(Box::new(e)))
            })?;
            Ok(ClaimedJob {
                spec: ExportSpec {
                    id: row.id,
                    token: row.fencing_token,
                    org_id: row.org_id,
                    domain_id: row.domain_id,
                    format,
                    include_content: row.include_content,
                    include_keywords: row.include_keywords,
                    include_analytics: row.include_analytics,
                    date_from: row.date_from,
                    date_to: row.date_to,
                },
                fence: Fence {
                    id: row.id,
                    token: row.fencing_token,
                },
                attempt: row.attempts,
                max_attempts: row.max_attempts,
            })
        })
        .collect()
}

/// The claim statement (its plan is checked by a test: an index scan of
/// `domain_exports_claim_idx`).
const CLAIM_SQL: &str = "WITH due AS ( \
         SELECT id FROM domain_exports \
         WHERE status = 'queued' AND run_after <= now() \
         ORDER BY run_after LIMIT $1 \
         FOR UPDATE SKIP LOCKED), \
     claimed AS ( \
         UPDATE domain_exports e SET status = 'running', attempts = e.attempts + 1, \
             fencing_token = e.fencing_token + 1, lease_owner = $2, \
             lease_expires_at = now() + $3 * interval '1 second', heartbeat_at = now(), \
             started_at = now(), updated_at = now(), progress = 0, rows_written = 0, \
             progress_at = NULL \
         FROM due WHERE e.id = due.id \
         RETURNING e.id, e.org_id, e.domain_id, e.format, e.include_content, \
             e.include_keywords, e.include_analytics, e.date_from, e.date_to, \
             e.fencing_token, e.attempts, e.max_attempts, e.run_after), \
     att AS ( \
         INSERT INTO domain_export_attempts (export_id, attempt, fencing_token, worker) \
         SELECT id, attempts, fencing_token, $2 FROM claimed) \
     SELECT id, org_id, domain_id, format, include_content, include_keywords, \
         include_analytics, date_from, date_to, fencing_token, attempts, max_attempts \
     FROM claimed ORDER BY run_after, id";

/// Renews the lease (and records `progress` when given). `Fenced` when the job was
/// cancelled or reclaimed.
pub async fn heartbeat(
    db: &Database,
    fence: Fence,
    lease: Duration,
    progress: Option<Progress>,
) -> Result<(), FenceError> {
    let percent = progress.map(|p| p.percent.clamp(0, 100));
    let rows_written = progress.map(|p| p.rows_written.max(0));
    let renewed = db
        .run(async |conn| {
            sqlx::query(HEARTBEAT_SQL)
                .bind(fence.id)
                .bind(fence.token)
                .bind(lease.as_secs_f64())
                .bind(percent)
                .bind(rows_written)
                .execute(conn)
                .await
        })
        .await?
        .rows_affected();
    fenced_unless(renewed, fence)
}

/// Whether this claim still holds the job (`running` with this token), without renewing
/// the lease: the worker's once-a-second cancel check between two heartbeats. `Fenced`
/// when the job was cancelled or reclaimed.
pub async fn check_fence(db: &Database, fence: Fence) -> Result<(), FenceError> {
    let held: Option<i32> = db
        .run(async |conn| {
            sqlx::query_scalar(
                "SELECT 1 FROM domain_exports \
                 WHERE id = $1 AND fencing_token = $2 AND status = 'running'",
            )
            .bind(fence.id)
            .bind(fence.token)
            .fetch_optional(conn)
            .await
        })
        .await?;
    fenced_unless(u64::from(held.is_some()), fence)
}

/// What a worker re-reads after a [`complete`] whose outcome it does not know.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CompletionState {
    /// The job's status.
    pub status: String,
    /// Its token now (a committed completion bumped the claim's by one).
    pub fencing_token: i64,
    /// The recorded file, if any.
    pub storage_path: Option<String>,
}

/// The state of job `id` a worker needs to decide what its unanswered [`complete`] did
/// (see "Ending an attempt" in the module docs). `None` when the row is gone.
pub async fn completion_state(db: &Database, id: Uuid) -> Result<Option<CompletionState>, DbError> {
    db.run(async |conn| {
        sqlx::query_as::<_, CompletionState>(
            "SELECT status, fencing_token, storage_path FROM domain_exports WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(conn)
        .await
    })
    .await
}

/// What the orphan sweep needs of a job whose id a file in `EXPORT_DIR` carries.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct FileOwner {
    /// The job's id.
    pub id: Uuid,
    /// Its status (`running`: one of its attempts may still record a file).
    pub status: String,
    /// The file it records, if any.
    pub storage_path: Option<String>,
}

/// Ids looked up per statement by [`file_owners`].
const FILE_OWNERS_CHUNK: usize = 1000;

/// The rows of the jobs `ids` (parsed from file names in `EXPORT_DIR`), by primary key, in
/// chunks of 1,000 ids: the worker's orphan sweep keeps every file a row
/// records, and every file of a job that is still `running`.
pub async fn file_owners(
    db: &Database,
    ids: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, FileOwner>, DbError> {
    let mut owners = std::collections::HashMap::new();
    for chunk in ids.chunks(FILE_OWNERS_CHUNK) {
        let rows: Vec<FileOwner> = db
            .run(async |conn| {
                sqlx::query_as(
                    "SELECT id, status, storage_path FROM domain_exports WHERE id = ANY($1)",
                )
                .bind(chunk)
                .fetch_all(conn)
                .await
            })
            .await?;
        owners.extend(rows.into_iter().map(|row| (row.id, row)));
    }
    Ok(owners)
}

/// The heartbeat statement: `$1` id, `$2` token, `$3` lease in seconds, `$4` percent,
/// `$5` rows written.
const HEARTBEAT_SQL: &str = "UPDATE domain_exports SET \
         lease_expires_at = now() + $3 * interval '1 second', \
         heartbeat_at = now(), updated_at = now(), \
         progress = COALESCE($4, progress), \
         rows_written = COALESCE($5, rows_written), \
         progress_at = CASE WHEN $4::integer IS NULL THEN progress_at ELSE now() END \
     WHERE id = $1 AND fencing_token = $2 AND status = 'running'";

/// Records the finished file: `succeeded`, lease cleared, attempt `succeeded`.
///
/// `storage_path` must be [`crate::jobs::paths::file_name`] of the job's id and this
/// claim's token with a known extension (`csv`, `zip`, `json`, `md`): any other name
/// (another attempt's token, the legacy `<id>.<ext>`, which rows written before per-attempt
/// names still carry) is refused with [`FenceError::ForeignFile`] before any statement,
/// and the schema's `domain_exports_storage_path_check` refuses a malformed name
/// ([`FenceError::Db`], a constraint violation). The file is already
/// in place when this runs: see the module docs for what a worker does with it on
/// [`FenceError::Fenced`] (delete it) and on [`FenceError::Db`] (re-read the row first).
pub async fn complete(db: &Database, fence: Fence, done: &Completed) -> Result<(), FenceError> {
    if crate::jobs::paths::parse_file_name(&done.storage_path)
        != Some((fence.id, Some(fence.token)))
    {
        return Err(FenceError::ForeignFile {
            id: fence.id,
            path: done.storage_path.clone(),
        });
    }
    let completed: Option<Uuid> = db
        .run(async |conn| {
            sqlx::query_scalar(COMPLETE_SQL)
                .bind(fence.id)
                .bind(fence.token)
                .bind(&done.storage_path)
                .bind(done.size_bytes)
                .bind(done.record_count)
                .bind(&done.checksum_sha256)
                .bind(done.expires_at)
                .fetch_optional(conn)
                .await
        })
        .await?;
    fenced_unless(u64::from(completed.is_some()), fence)
}

/// The completion statement: `$1` id, `$2` token, `$3` storage path, `$4` size, `$5`
/// record count, `$6` checksum, `$7` expiry.
const COMPLETE_SQL: &str = "WITH done AS ( \
         UPDATE domain_exports SET status = 'succeeded', storage_path = $3, \
             size_bytes = $4, record_count = $5, checksum_sha256 = $6, \
             expires_at = $7, progress = 100, rows_written = $5, \
             progress_at = now(), error = NULL, finished_at = now(), \
             updated_at = now(), fencing_token = fencing_token + 1, \
             lease_owner = NULL, lease_expires_at = NULL \
         WHERE id = $1 AND fencing_token = $2 AND status = 'running' \
         RETURNING id), \
     att AS ( \
         UPDATE domain_export_attempts a SET outcome = 'succeeded', \
             finished_at = now() \
         FROM done WHERE a.export_id = done.id AND a.fencing_token = $2 \
         AND a.outcome = 'running') \
     SELECT id FROM done";

/// Ends a failed attempt: back to `queued` at `now() + retry_after` when `retry_after` is
/// given and attempts remain, else `failed` (dead letter) with `error`.
///
/// The error is kept on the job (the last one) and on the attempt row (`retried` or
/// `failed`); the token is bumped either way. A re-queued job is notified on [`CHANNEL`]
/// (whatever its backoff: one due at once must not wait for an idle worker's poll).
pub async fn fail(
    db: &Database,
    fence: Fence,
    error: &str,
    retry_after: Option<Duration>,
) -> Result<FailOutcome, FenceError> {
    let error = clean_error(error);
    let ended: Option<(String, DateTime<Utc>, Option<String>)> = db
        .run(async |conn| {
            sqlx::query_as(
                "WITH f AS ( \
                     UPDATE domain_exports e SET \
                         status = CASE WHEN $4::float8 IS NOT NULL \
                             AND e.attempts < e.max_attempts THEN 'queued' ELSE 'failed' END, \
                         run_after = CASE WHEN $4::float8 IS NOT NULL \
                             AND e.attempts < e.max_attempts \
                             THEN now() + $4 * interval '1 second' ELSE e.run_after END, \
                         finished_at = CASE WHEN $4::float8 IS NOT NULL \
                             AND e.attempts < e.max_attempts THEN NULL ELSE now() END, \
                         error = $3, fencing_token = e.fencing_token + 1, \
                         lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
                     WHERE e.id = $1 AND e.fencing_token = $2 AND e.status = 'running' \
                     RETURNING e.id, e.status, e.run_after), \
                 att AS ( \
                     UPDATE domain_export_attempts a SET \
                         outcome = CASE WHEN f.status = 'queued' THEN 'retried' ELSE 'failed' END, \
                         finished_at = now(), error = $3 \
                     FROM f WHERE a.export_id = f.id AND a.fencing_token = $2 \
                     AND a.outcome = 'running') \
                 SELECT status, run_after, \
                     CASE WHEN status = 'queued' THEN pg_notify($5, id::text)::text END \
                         AS notified \
                 FROM f",
            )
            .bind(fence.id)
            .bind(fence.token)
            .bind(&error)
            .bind(retry_after.map(|d| d.as_secs_f64()))
            .bind(CHANNEL)
            .fetch_optional(conn)
            .await
        })
        .await?;
    match ended {
        None => Err(FenceError::Fenced(fence.id)),
        Some((status, run_after, _)) if status == "queued" => {
            Ok(FailOutcome::Retried { run_after })
        }
        Some(_) => Ok(FailOutcome::DeadLettered),
    }
}

/// Gives a job back at shutdown: `queued`, due now, token bumped, the attempt returned.
///
/// A release does not count as an attempt (`attempts - 1`, see the module docs): the next
/// claim reuses this attempt's number. Its attempt row ends `released`.
pub async fn release(db: &Database, fence: Fence) -> Result<(), FenceError> {
    let released: Option<Uuid> = db
        .run(async |conn| {
            sqlx::query_scalar(
                "WITH r AS ( \
                     UPDATE domain_exports SET status = 'queued', run_after = now(), \
                         attempts = GREATEST(attempts - 1, 0), \
                         fencing_token = fencing_token + 1, progress = 0, rows_written = 0, \
                         lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
                     WHERE id = $1 AND fencing_token = $2 AND status = 'running' \
                     RETURNING id), \
                 att AS ( \
                     UPDATE domain_export_attempts a SET outcome = 'released', \
                         finished_at = now() \
                     FROM r WHERE a.export_id = r.id AND a.fencing_token = $2 \
                     AND a.outcome = 'running') \
                 SELECT id, pg_notify($3, id::text)::text AS notified FROM r",
            )
            .bind(fence.id)
            .bind(fence.token)
            .bind(CHANNEL)
            .fetch_optional(conn)
            .await
        })
        .await?;
    fenced_unless(u64::from(released.is_some()), fence)
}

/// The reaper: `running` jobs whose lease expired go back to `queued` (token bumped,
/// attempt `reclaimed`), or to `failed` when no attempts remain. Up to `limit` per call.
///
/// The reclaimed attempt was counted when it was claimed, so `attempts` is not bumped
/// again (a deliberate departure from the issue's text, see the module docs): the next
/// claim makes it `attempts + 1`. A re-queued job is due at once and notified on
/// [`CHANNEL`]. Rows locked by another reaper (or a late heartbeat) are skipped. The job's
/// error is the generic `lease expired: the worker stopped heartbeating` (tenants see
/// it); the attempt row's error names the worker whose lease expired.
pub async fn reclaim_expired(db: &Database, limit: i64) -> Result<Vec<Reclaimed>, DbError> {
    if limit <= 0 {
        return Ok(Vec::new());
    }
    let rows: Vec<(Uuid, bool)> = db
        .run(async |conn| {
            sqlx::query_as(RECLAIM_SQL)
                .bind(limit)
                .bind(CHANNEL)
                .bind(LEASE_EXPIRED)
                .fetch_all(conn)
                .await
        })
        .await?;
    Ok(rows
        .into_iter()
        .map(|(id, dead_lettered)| Reclaimed { id, dead_lettered })
        .collect())
}

/// The reaper's statement: `$1` limit, `$2` [`CHANNEL`], `$3` [`LEASE_EXPIRED`] (the
/// job's error; the attempt row's error names the worker).
const RECLAIM_SQL: &str = "WITH expired AS ( \
     SELECT id, lease_owner FROM domain_exports \
     WHERE status = 'running' AND lease_expires_at < now() \
     ORDER BY lease_expires_at LIMIT $1 \
     FOR UPDATE SKIP LOCKED), \
     r AS ( \
     UPDATE domain_exports e SET \
     status = CASE WHEN e.attempts >= e.max_attempts \
     THEN 'failed' ELSE 'queued' END, \
     run_after = CASE WHEN e.attempts >= e.max_attempts \
     THEN e.run_after ELSE now() END, \
     finished_at = CASE WHEN e.attempts >= e.max_attempts \
     THEN now() ELSE NULL END, \
     error = $3, \
     fencing_token = e.fencing_token + 1, \
     lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
     FROM expired x WHERE e.id = x.id \
     RETURNING e.id, e.status, e.fencing_token, x.lease_owner), \
     att AS ( \
     UPDATE domain_export_attempts a SET outcome = 'reclaimed', \
     finished_at = now(), \
     error = 'lease expired: worker ' || COALESCE(r.lease_owner, '?') \
     || ' stopped heartbeating' \
     FROM r WHERE a.export_id = r.id \
     AND a.fencing_token = r.fencing_token - 1 AND a.outcome = 'running') \
     SELECT id, status = 'failed' AS dead_lettered, \
     CASE WHEN status = 'queued' THEN pg_notify($2, id::text)::text END \
     AS notified \
     FROM r ORDER BY id";

/// The error the reaper stores on a job it reclaims. Tenants read it (`GET
/// /v1/exports/{id}`), so it names no worker; the attempt row's error names it.
pub(crate) const LEASE_EXPIRED: &str = "lease expired: the worker stopped heartbeating";

/// Queue depth and the oldest due job's age.
///
/// The age is how long the oldest due `queued` job has been claimable (`now() -
/// run_after`), so a job waiting out its retry backoff does not count as waiting.
pub async fn stats(db: &Database) -> Result<QueueStats, DbError> {
    let (queued, running, oldest_queued_age_secs): (i64, i64, f64) = db
        .run(async |conn| {
            sqlx::query_as(
                "SELECT count(*) FILTER (WHERE status = 'queued'), \
                     count(*) FILTER (WHERE status = 'running'), \
                     COALESCE(EXTRACT(EPOCH FROM now() - min(run_after) \
                         FILTER (WHERE status = 'queued' AND run_after <= now())), 0)::float8 \
                 FROM domain_exports WHERE status IN ('queued', 'running')",
            )
            .fetch_one(conn)
            .await
        })
        .await?;
    Ok(QueueStats {
        queued,
        running,
        oldest_queued_age_secs,
    })
}

/// `Ok` when the fenced write matched its row, else [`FenceError::Fenced`].
fn fenced_unless(rows: u64, fence: Fence) -> Result<(), FenceError> {
    if rows == 0 {
        Err(FenceError::Fenced(fence.id))
    } else {
        Ok(())
    }
}

/// Longest error text stored, in characters.
const MAX_ERROR_CHARS: usize = 2000;

/// An error as stored: NUL characters (which PostgreSQL text cannot hold) replaced, cut to
/// [`MAX_ERROR_CHARS`].
fn clean_error(error: &str) -> String {
    let mut cleaned: String = error
        .chars()
        .map(|c| if c == '\0' { '\u{fffd}' } else { c })
        .take(MAX_ERROR_CHARS)
        .collect();
    if error.chars().count() > MAX_ERROR_CHARS {
        cleaned.push('…');
    }
    cleaned
}

#[cfg(test)]
pub(crate) mod tests;
