//! One claimed job, from `run_export` to the statement that ends its attempt: the
//! watcher (fenced heartbeats, the once-a-second cancel check, progress, the local lease
//! deadline), the outcome, and the metrics.
//!
//! **The local lease deadline.** [`LocalLease`] is this worker's own view of the lease:
//! renewed when a heartbeat (or the claim) succeeds, measured from the instant the
//! statement was *sent* (never later than the server's `now()` that set the expiry). Once
//! `lease - margin` has passed without a renewal (`margin` = the database client bound,
//! `DatabaseConfig::query_timeout`, so even a statement sent just before still ends before
//! the lease does) the job stops by itself: its token is cancelled, its temp file (or
//! finished file) removed, and nothing more is written: no rename is recorded, no
//! `complete`, `fail` or `release`. Another worker's reaper can reclaim the job only after
//! the server-side expiry, which is later, so a worker cut off from the primary stops
//! before anyone else starts. Each attempt writes a file of its own
//! (`paths::file_name(id, token, ext)`), so what it deletes is only ever its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::Utc;
use smartbeak_resilience::RetryPolicy;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Ctx, metrics};
use crate::jobs::export::{ExportError, ExportLimits, ExportOutput, run_export};
use crate::jobs::queue::{
    self, ClaimedJob, Completed, CompletionState, FailOutcome, Fence, FenceError, Progress,
};

/// How long a cancelled export gets to return (and remove its temp file) before it is
/// dropped.
pub const CANCEL_GRACE: Duration = Duration::from_millis(500);

/// Re-reads of the row after a `complete` whose reply was lost, and calls of `complete`
/// in all.
const COMPLETE_TRIES: u32 = 3;

/// How one attempt ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Succeeded,
    Failed,
    Retried,
    Cancelled,
    Fenced,
    Released,
    /// The local lease deadline passed without a renewal: stopped, nothing written.
    Expired,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Retried => "retried",
            Self::Cancelled => "cancelled",
            Self::Fenced => "fenced",
            Self::Released => "released",
            Self::Expired => "expired",
        }
    }
}

/// This worker's view of a job's lease (see the module docs).
#[derive(Debug)]
pub(super) struct LocalLease {
    renewed: Mutex<Instant>,
    /// `lease - margin`: how long after a renewal the job must stop.
    valid_for: Duration,
}

impl LocalLease {
    /// A lease renewed at `sent` (the instant the claim was sent).
    pub(super) fn new(sent: Instant, lease: Duration, margin: Duration) -> Self {
        Self {
            renewed: Mutex::new(sent),
            valid_for: lease.saturating_sub(margin),
        }
    }

    /// Records a renewal whose statement was sent at `sent`.
    pub(super) fn renewed(&self, sent: Instant) {
        let mut renewed = self.renewed.lock().unwrap_or_else(PoisonError::into_inner);
        *renewed = (*renewed).max(sent);
    }

    /// When the job must have stopped unless renewed meanwhile.
    pub(super) fn deadline(&self) -> Instant {
        *self.renewed.lock().unwrap_or_else(PoisonError::into_inner) + self.valid_for
    }

    /// Whether the deadline has passed.
    pub(super) fn expired(&self) -> bool {
        Instant::now() >= self.deadline()
    }
}

/// Why the watcher stopped the export.
#[derive(Debug, Default)]
struct Stopped {
    /// A write found the token moved (cancelled or reclaimed).
    fenced: AtomicBool,
    /// The local lease deadline passed.
    expired: AtomicBool,
}

/// Runs `job` (claimed by a statement sent at `claimed_at`) to the end of its attempt and
/// counts the outcome.
pub(super) async fn run(ctx: Arc<Ctx>, job: ClaimedJob, claimed_at: Instant) -> Outcome {
    let started = Instant::now();
    let format = job.spec.format.as_str();
    let id = job.fence.id;
    let token = ctx.abandon.child_token();
    let lease = Arc::new(LocalLease::new(
        claimed_at,
        ctx.config.lease,
        ctx.lease_margin,
    ));
    let stopped = Arc::new(Stopped::default());
    let (progress_tx, progress_rx) = watch::channel(Progress::default());
    let watcher_stop = CancellationToken::new();
    let (poke, _registered) = ctx.watch(id);
    let watcher = tokio::spawn(watch_job(
        ctx.clone(),
        job.fence,
        progress_rx,
        token.clone(),
        stopped.clone(),
        lease.clone(),
        poke,
        watcher_stop.clone(),
    ));

    let result = export(&ctx, &job, &progress_tx, &token).await;
    watcher_stop.cancel();
    if watcher.await.is_err() {
        tracing::warn!(export_id = %id, "the export's watcher failed");
    }

    let outcome = if stopped.expired.load(Ordering::SeqCst) || lease.expired() {
        if let Ok(output) = &result {
            remove_file(&ctx, output);
        }
        expired(id, &lease)
    } else if stopped.fenced.load(Ordering::SeqCst) {
        if let Ok(output) = &result {
            remove_file(&ctx, output);
        }
        fenced_outcome(&ctx, id).await
    } else {
        match result {
            Ok(output) => finish(&ctx, &job, &output, started, &lease).await,
            Err(_) if token.is_cancelled() => release(&ctx, job.fence).await,
            Err(error) => failed(&ctx, &job, &error).await,
        }
    };
    ::metrics::counter!(metrics::JOBS, "format" => format, "outcome" => outcome.as_str())
        .increment(1);
    outcome
}

/// The end of an attempt whose local lease ran out: nothing more is written anywhere.
fn expired(id: uuid::Uuid, lease: &LocalLease) -> Outcome {
    tracing::warn!(
        export_id = %id,
        lease_valid_ms = lease.valid_for.as_millis() as u64,
        "export stopped: no lease renewal within the local lease deadline; \
         its files removed, nothing recorded (another worker may reclaim it)"
    );
    Outcome::Expired
}

/// `run_export`, given [`CANCEL_GRACE`] to return once the token is cancelled.
async fn export(
    ctx: &Ctx,
    job: &ClaimedJob,
    progress: &watch::Sender<Progress>,
    token: &CancellationToken,
) -> Result<ExportOutput, ExportError> {
    let limits = ExportLimits {
        max_bytes: ctx.config.max_bytes,
        zip_level: ctx.config.zip_level,
    };
    let export = run_export(&ctx.db, &job.spec, &ctx.dir, limits, progress, token);
    tokio::pin!(export);
    tokio::select! {
        result = &mut export => result,
        () = token.cancelled() => match tokio::time::timeout(CANCEL_GRACE, &mut export).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(
                    export_id = %job.fence.id,
                    "the export did not stop within {} ms of its cancel; dropped",
                    CANCEL_GRACE.as_millis()
                );
                Err(ExportError::Cancelled)
            }
        },
    }
}

/// The job's watcher until `stop`:
/// - every `EXPORT_HEARTBEAT_SECS`, a fenced heartbeat renewing the lease (with the
///   progress when it changed);
/// - every `min(1 s, EXPORT_HEARTBEAT_SECS)`, and at once when `poke` says the job was
///   cancelled, the cancel check: the progress write when the progress changed (a
///   heartbeat, so at most one progress write a second), else a read of the fence
///   (`queue::check_fence`);
/// - at the local lease deadline (raced against every statement, which may hang on a dead
///   connection), it stops the export.
///
/// `Fenced` or the deadline cancels the export at once.
#[allow(clippy::too_many_arguments)]
async fn watch_job(
    ctx: Arc<Ctx>,
    fence: Fence,
    progress: watch::Receiver<Progress>,
    token: CancellationToken,
    stopped: Arc<Stopped>,
    lease: Arc<LocalLease>,
    poke: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    let mut check = tokio::time::interval(ctx.config.check_interval());
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renew = tokio::time::interval(ctx.config.heartbeat);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The claim just set the lease: the first ticks (immediate) are skipped.
    check.tick().await;
    renew.tick().await;
    let mut written = Progress::default();
    // A renewal that failed is owed: sent again on the next check tick (at most a second
    // later), not a whole heartbeat interval later.
    let mut owed = false;
    loop {
        let deadline = tokio::time::Instant::from_std(lease.deadline());
        let renewing = tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(deadline) => None,
            _ = renew.tick() => Some(true),
            _ = check.tick() => Some(false),
            () = poke.notified() => Some(false),
        };
        let Some(renewing) = renewing.map(|due| due || owed) else {
            stopped.expired.store(true, Ordering::SeqCst);
            token.cancel();
            return;
        };
        let now = *progress.borrow();
        let changed = (now != written).then_some(now);
        let sent = Instant::now();
        let call = async {
            if renewing || changed.is_some() {
                queue::heartbeat(&ctx.db, fence, ctx.config.lease, changed)
                    .await
                    .map(|()| true)
            } else {
                queue::check_fence(&ctx.db, fence).await.map(|()| false)
            }
        };
        let answer = tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(deadline) => None,
            answer = call => Some(answer),
        };
        match answer {
            None => {
                stopped.expired.store(true, Ordering::SeqCst);
                token.cancel();
                return;
            }
            Some(Ok(renewed)) => {
                if renewed {
                    lease.renewed(sent);
                    written = now;
                    owed = false;
                    renew.reset();
                }
            }
            Some(Err(FenceError::Fenced(_))) => {
                tracing::info!(export_id = %fence.id, "export fenced (cancelled or reclaimed): stopping it");
                stopped.fenced.store(true, Ordering::SeqCst);
                token.cancel();
                return;
            }
            Some(Err(error)) => {
                owed |= renewing || changed.is_some();
                tracing::warn!(export_id = %fence.id, %error, "heartbeat failed; retrying on the next check tick");
            }
        }
    }
}

/// What an unanswered `complete` did, from the row re-read after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    /// The completion committed (only its reply was lost): success.
    Recorded,
    /// Still this claim's and running: call `complete` again.
    Retry,
    /// The job moved on (cancelled, failed, another claim's, gone): fenced.
    Fenced,
}

/// The rule of the queue docs ("Ending an attempt"): `succeeded` (or later, retention's
/// `expiring`/`expired`) with this attempt's own file -> recorded (the file name is per
/// attempt, so the path says whose completion it was); `running` with this claim's token
/// -> retry; anything else -> fenced.
pub(super) fn decide(
    state: Option<&CompletionState>,
    fence: Fence,
    storage_path: &str,
) -> Decision {
    match state {
        Some(s)
            if matches!(s.status.as_str(), "succeeded" | "expiring" | "expired")
                && s.storage_path.as_deref() == Some(storage_path) =>
        {
            Decision::Recorded
        }
        Some(s) if s.status == "running" && s.fencing_token == fence.token => Decision::Retry,
        _ => Decision::Fenced,
    }
}

/// How [`complete_recovering`] ended.
#[derive(Debug)]
pub(super) enum Completion {
    /// Recorded: the file is the job's.
    Recorded,
    /// Not recorded and never will be: delete the file.
    Fenced,
    /// Undecided (the row could not be read, or the local lease ran out before a retry):
    /// keep the file; the orphan sweep removes it if no row references it.
    Unknown(String),
    /// The server refused the completion for good (a constraint violation, a file name
    /// not this attempt's): nothing committed; delete the file and fail the attempt.
    Refused(FenceError),
}

/// Whether a failed `complete` may have committed all the same: only when the statement
/// (or its reply) was lost on the way: a timeout or a connection failure. Any other error
/// is the server's answer that it did not.
fn outcome_unknown(error: &FenceError) -> bool {
    match error {
        FenceError::Db(error) => error.is_timeout() || error.is_connection_failure(),
        FenceError::Fenced(_) | FenceError::ForeignFile { .. } => false,
    }
}

/// `queue::complete` with the recovery of a lost reply: on an error that leaves the
/// outcome unknown (a timeout, a lost connection: `outcome_unknown`) the row is re-read (up to [`COMPLETE_TRIES`] times, backing off by `RetryPolicy`) and
/// [`decide`]d; `Retry` calls `complete` again, while the local lease holds.
pub(super) async fn complete_recovering(
    db: &smartbeak_database::Database,
    fence: Fence,
    done: &Completed,
    lease: &LocalLease,
) -> Completion {
    let policy = RetryPolicy {
        max_attempts: COMPLETE_TRIES,
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
        max_elapsed: Duration::MAX,
        min_last_attempt: Duration::ZERO,
        max_retry_after: Duration::ZERO,
    };
    let mut uncertain = false;
    for call in 1..=COMPLETE_TRIES {
        let error = match queue::complete(db, fence, done).await {
            Ok(()) => return Completion::Recorded,
            // The first call fenced: nothing of ours committed.
            Err(FenceError::Fenced(_)) if !uncertain => return Completion::Fenced,
            // A retry fenced: maybe because an earlier call did commit.
            Err(FenceError::Fenced(_)) => "fenced after an unanswered completion".to_owned(),
            Err(error) if !outcome_unknown(&error) => {
                if uncertain {
                    // An earlier call may have committed: the row decides.
                    error.to_string()
                } else {
                    return Completion::Refused(error);
                }
            }
            Err(error) => error.to_string(),
        };
        uncertain = true;
        tracing::warn!(export_id = %fence.id, call, %error, "recording the finished export got no answer; re-reading the job");
        let mut state = None;
        for read in 1..=COMPLETE_TRIES {
            match queue::completion_state(db, fence.id).await {
                Ok(row) => {
                    state = Some(row);
                    break;
                }
                Err(error) => {
                    tracing::warn!(export_id = %fence.id, read, %error, "re-reading the job failed");
                    if let Ok(delay) = policy.next_delay(read, None, Duration::ZERO) {
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
        let Some(state) = state else {
            return Completion::Unknown("the job could not be re-read".to_owned());
        };
        match decide(state.as_ref(), fence, &done.storage_path) {
            Decision::Recorded => return Completion::Recorded,
            Decision::Fenced => return Completion::Fenced,
            Decision::Retry if lease.expired() => {
                return Completion::Unknown("the local lease ran out before a retry".to_owned());
            }
            Decision::Retry => {}
        }
    }
    Completion::Unknown(format!("no answer after {COMPLETE_TRIES} completions"))
}

/// Records the finished file; a fenced completion deletes it (it is not ours any more).
async fn finish(
    ctx: &Ctx,
    job: &ClaimedJob,
    output: &ExportOutput,
    started: Instant,
    lease: &LocalLease,
) -> Outcome {
    let id = job.fence.id;
    if lease.expired() {
        remove_file(ctx, output);
        return expired(id, lease);
    }
    let ttl = chrono::Duration::from_std(ctx.config.ttl).unwrap_or(chrono::Duration::days(7));
    let done = Completed {
        storage_path: output.storage_path.clone(),
        size_bytes: i64::try_from(output.size_bytes).unwrap_or(i64::MAX),
        record_count: i64::try_from(output.record_count).unwrap_or(i64::MAX),
        checksum_sha256: output.checksum_sha256.clone(),
        expires_at: Utc::now() + ttl,
    };
    match complete_recovering(&ctx.db, job.fence, &done, lease).await {
        Completion::Recorded => {
            let format = job.spec.format.as_str();
            let elapsed = started.elapsed().as_secs_f64();
            ::metrics::histogram!(metrics::DURATION, "format" => format).record(elapsed);
            ::metrics::histogram!(metrics::SIZE, "format" => format)
                .record(output.size_bytes as f64);
            if elapsed > 0.0 {
                ::metrics::histogram!(metrics::ROWS_PER_SECOND, "format" => format)
                    .record(output.record_count as f64 / elapsed);
            }
            tracing::info!(
                export_id = %id,
                path = %output.storage_path,
                size_bytes = output.size_bytes,
                records = output.record_count,
                sha256 = %output.checksum_sha256,
                elapsed_ms = (elapsed * 1000.0) as u64,
                "export succeeded"
            );
            Outcome::Succeeded
        }
        Completion::Fenced => {
            remove_file(ctx, output);
            fenced_outcome(ctx, id).await
        }
        Completion::Refused(error) => {
            remove_file(ctx, output);
            let message = format!("recording the finished export failed: {error}");
            let retryable = match error {
                FenceError::Db(db) => ExportError::Db(db).retryable(),
                FenceError::Fenced(_) | FenceError::ForeignFile { .. } => false,
            };
            end_failed(ctx, job, message, retryable).await
        }
        Completion::Unknown(why) => {
            // The row may reference the file: it stays (the orphan sweep deletes it later
            // if no row does); if it was not recorded, the lease expires and the job is
            // done again, under a file name of its own.
            tracing::error!(export_id = %id, path = %output.storage_path, why, "recording the finished export failed; its file stays");
            Outcome::Failed
        }
    }
}

/// Deletes this attempt's own finished file (one it may no longer record). The name is
/// per attempt (`<id>.<token>.<ext>`): no other attempt's file can be at this path.
fn remove_file(ctx: &Ctx, output: &ExportOutput) {
    match ctx.dir.resolve(&output.storage_path) {
        Ok(path) => match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "removing an unrecorded export file failed");
            }
        },
        Err(error) => {
            tracing::warn!(path = %output.storage_path, %error, "cannot resolve an unrecorded export file");
        }
    }
}

/// A fenced job: `cancelled` when the row says so (the api's cancel), else `fenced`.
async fn fenced_outcome(ctx: &Ctx, id: uuid::Uuid) -> Outcome {
    match queue::get_any(&ctx.db, id).await {
        Ok(Some(row)) if row.status == "cancelled" => {
            tracing::info!(export_id = %id, "export cancelled: stopped, its partial file removed");
            Outcome::Cancelled
        }
        Ok(_) => {
            tracing::info!(export_id = %id, "export fenced: its lease was taken, nothing recorded");
            Outcome::Fenced
        }
        Err(error) => {
            tracing::warn!(export_id = %id, %error, "export fenced; reading its status failed");
            Outcome::Fenced
        }
    }
}

/// Gives an abandoned job back (shutdown): queued, due now, token bumped; under the drain
/// handler's release deadline when it set one, so a release that runs out of time fails
/// (and is counted) rather than outliving the drain.
async fn release(ctx: &Ctx, fence: Fence) -> Outcome {
    match ctx.release_deadline.get() {
        Some(by) => smartbeak_database::deadline::scope(*by, release_now(ctx, fence)).await,
        None => release_now(ctx, fence).await,
    }
}

async fn release_now(ctx: &Ctx, fence: Fence) -> Outcome {
    match queue::release(&ctx.db, fence).await {
        Ok(()) => {
            tracing::info!(export_id = %fence.id, "export released for another worker");
            Outcome::Released
        }
        Err(FenceError::Fenced(_)) => fenced_outcome(ctx, fence.id).await,
        Err(error) => {
            // The shutdown report must say so: the job now waits for its lease to expire.
            ctx.release_failures.fetch_add(1, Ordering::SeqCst);
            tracing::warn!(export_id = %fence.id, %error, "releasing the export failed; its lease will expire");
            Outcome::Failed
        }
    }
}

/// The retry rule of a failed attempt: `RetryPolicy::next_delay` with the job's attempts
/// (no time budget: the backoff alone spaces the attempts).
pub(super) fn retry_delay(
    base: Duration,
    max: Duration,
    attempt: i32,
    max_attempts: i32,
) -> Option<Duration> {
    let policy = RetryPolicy {
        max_attempts: u32::try_from(max_attempts).unwrap_or(1).max(1),
        base_delay: base,
        max_delay: max,
        max_elapsed: Duration::MAX,
        min_last_attempt: Duration::ZERO,
        max_retry_after: Duration::ZERO,
    };
    let made = u32::try_from(attempt).unwrap_or(u32::MAX);
    policy.next_delay(made, None, Duration::ZERO).ok()
}

/// Ends a failed attempt: retried after a backoff when the error is retryable and
/// attempts remain, else dead-lettered with the error.
async fn failed(ctx: &Ctx, job: &ClaimedJob, error: &ExportError) -> Outcome {
    end_failed(ctx, job, error.to_string(), error.retryable()).await
}

/// [`failed`] with the error's message and whether it is retryable.
async fn end_failed(ctx: &Ctx, job: &ClaimedJob, message: String, retryable: bool) -> Outcome {
    let id = job.fence.id;
    let delay = retryable
        .then(|| {
            retry_delay(
                ctx.config.retry_base,
                ctx.config.retry_max,
                job.attempt,
                job.max_attempts,
            )
        })
        .flatten();
    match queue::fail(&ctx.db, job.fence, &message, delay).await {
        Ok(FailOutcome::Retried { run_after }) => {
            tracing::warn!(export_id = %id, attempt = job.attempt, error = %message, %run_after, "export attempt failed; retrying");
            Outcome::Retried
        }
        Ok(FailOutcome::DeadLettered) => {
            tracing::error!(export_id = %id, attempt = job.attempt, error = %message, "export failed for good");
            Outcome::Failed
        }
        Err(FenceError::Fenced(_)) => fenced_outcome(ctx, id).await,
        Err(db_error) => {
            tracing::error!(export_id = %id, error = %message, %db_error, "recording the failed attempt failed; its lease will expire");
            Outcome::Failed
        }
    }
}
