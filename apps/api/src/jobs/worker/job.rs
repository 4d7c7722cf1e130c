//! One claimed job, from `run_export` to the statement that ends its attempt: the
//! watcher (fenced heartbeats, progress), the outcome, and the metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use smartbeak_resilience::RetryPolicy;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Ctx, metrics};
use crate::jobs::export::{ExportError, ExportLimits, ExportOutput, run_export};
use crate::jobs::queue::{self, ClaimedJob, Completed, FailOutcome, Fence, FenceError, Progress};

/// How long a cancelled export gets to return (and remove its temp file) before it is
/// dropped.
const CANCEL_GRACE: Duration = Duration::from_millis(500);

/// How one attempt ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Succeeded,
    Failed,
    Retried,
    Cancelled,
    Fenced,
    Released,
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
        }
    }
}

/// Runs `job` to the end of its attempt and counts the outcome.
pub(super) async fn run(ctx: Arc<Ctx>, job: ClaimedJob) -> Outcome {
    let started = Instant::now();
    let format = job.spec.format.as_str();
    let id = job.fence.id;
    let token = ctx.abandon.child_token();
    let fenced = Arc::new(AtomicBool::new(false));
    let (progress_tx, progress_rx) = watch::channel(Progress::default());
    let watcher_stop = CancellationToken::new();
    let (poke, _registered) = ctx.watch(id);
    let watcher = tokio::spawn(watch_job(
        ctx.clone(),
        job.fence,
        progress_rx,
        token.clone(),
        fenced.clone(),
        poke,
        watcher_stop.clone(),
    ));

    let result = export(&ctx, &job, &progress_tx, &token).await;
    watcher_stop.cancel();
    if watcher.await.is_err() {
        tracing::warn!(export_id = %id, "the export's watcher failed");
    }

    let outcome = if fenced.load(Ordering::SeqCst) {
        if let Ok(output) = &result {
            remove_file(&ctx, id, output).await;
        }
        fenced_outcome(&ctx, id).await
    } else {
        match result {
            Ok(output) => finish(&ctx, &job, &output, started).await,
            Err(_) if token.is_cancelled() => release(&ctx, job.fence).await,
            Err(error) => failed(&ctx, &job, &error).await,
        }
    };
    ::metrics::counter!(metrics::JOBS, "format" => format, "outcome" => outcome.as_str())
        .increment(1);
    outcome
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

/// Every check interval, and at once when `poke` says the job was cancelled: a fenced
/// heartbeat renewing the lease, with the progress when it changed. `Fenced` cancels the
/// export at once.
async fn watch_job(
    ctx: Arc<Ctx>,
    fence: Fence,
    progress: watch::Receiver<Progress>,
    token: CancellationToken,
    fenced: Arc<AtomicBool>,
    poke: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(ctx.config.check_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The claim just set the lease: the first tick (immediate) is skipped.
    tick.tick().await;
    let mut written = Progress::default();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
            () = poke.notified() => {}
        }
        let now = *progress.borrow();
        let changed = (now != written).then_some(now);
        match queue::heartbeat(&ctx.db, fence, ctx.config.lease, changed).await {
            Ok(()) => written = now,
            Err(FenceError::Fenced(_)) => {
                tracing::info!(export_id = %fence.id, "export fenced (cancelled or reclaimed): stopping it");
                fenced.store(true, Ordering::SeqCst);
                token.cancel();
                return;
            }
            Err(FenceError::Db(error)) => {
                tracing::warn!(export_id = %fence.id, %error, "heartbeat failed; retrying on the next tick");
            }
        }
    }
}

/// Records the finished file; a fenced completion deletes it (it is not ours any more).
async fn finish(ctx: &Ctx, job: &ClaimedJob, output: &ExportOutput, started: Instant) -> Outcome {
    let id = job.fence.id;
    let ttl = chrono::Duration::from_std(ctx.config.ttl).unwrap_or(chrono::Duration::days(7));
    let done = Completed {
        storage_path: output.storage_path.clone(),
        size_bytes: i64::try_from(output.size_bytes).unwrap_or(i64::MAX),
        record_count: i64::try_from(output.record_count).unwrap_or(i64::MAX),
        checksum_sha256: output.checksum_sha256.clone(),
        expires_at: Utc::now() + ttl,
    };
    match queue::complete(&ctx.db, job.fence, &done).await {
        Ok(()) => {
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
        Err(FenceError::Fenced(_)) => {
            remove_file(ctx, id, output).await;
            fenced_outcome(ctx, id).await
        }
        Err(FenceError::Db(error)) => {
            // The row may or may not have been updated: the file stays (it may be
            // recorded); if it was not, the lease expires and the job is done again.
            tracing::error!(export_id = %id, %error, "recording the finished export failed; its lease will expire");
            Outcome::Failed
        }
    }
}

/// Deletes a finished file this worker may no longer record, unless the row says the job
/// succeeded: every attempt writes the same `<id>.<ext>`, so the file may then be the one
/// a newer attempt recorded (when the row cannot be read, the file is kept too).
async fn remove_file(ctx: &Ctx, id: uuid::Uuid, output: &ExportOutput) {
    match queue::get_any(&ctx.db, id).await {
        Ok(Some(row)) if row.status == "succeeded" || row.status == "expiring" => {
            tracing::info!(export_id = %id, "fenced, but the job succeeded in another attempt: its file stays");
            return;
        }
        Ok(_) => {}
        Err(error) => {
            tracing::warn!(export_id = %id, %error, "fenced; reading the job failed, so its file stays");
            return;
        }
    }
    match ctx.dir.resolve(&output.storage_path) {
        Ok(path) => match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "removing a fenced export's file failed");
            }
        },
        Err(error) => {
            tracing::warn!(path = %output.storage_path, %error, "cannot resolve a fenced export's file");
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

/// Gives an abandoned job back (shutdown): queued, due now, token bumped.
async fn release(ctx: &Ctx, fence: Fence) -> Outcome {
    match queue::release(&ctx.db, fence).await {
        Ok(()) => {
            tracing::info!(export_id = %fence.id, "export released for another worker");
            Outcome::Released
        }
        Err(FenceError::Fenced(_)) => fenced_outcome(ctx, fence.id).await,
        Err(FenceError::Db(error)) => {
            tracing::warn!(export_id = %fence.id, %error, "releasing the export failed; its lease will expire");
            Outcome::Released
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
    let id = job.fence.id;
    let message = error.to_string();
    let delay = error
        .retryable()
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
        Err(FenceError::Db(db_error)) => {
            tracing::error!(export_id = %id, error = %message, %db_error, "recording the failed attempt failed; its lease will expire");
            Outcome::Failed
        }
    }
}
