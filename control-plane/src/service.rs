//! The long-running `run`: each enabled operation in its own tracked task, one run at
//! start-up and then one per interval. Every run asks for the operation's advisory lock,
//! so across the deployment only one instance runs a given operation at a time; a run
//! that finds the lock held is skipped until the next interval.
//!
//! At shutdown the tasks stop starting items (the runs' cancellation token is the
//! shutdown's, and it reaches every operation's `process_batch`), in-flight items finish
//! within the drain deadline, and each run is recorded `interrupted` with its counts
//! (never-started items `skipped`) before the pools close.

use std::sync::Arc;
use std::time::Duration;

use smartbeak_shutdown::Shutdown;

use crate::operations::Operation;
use crate::runner::{RunContext, RunOptions, RunOutcome, run_once};

/// Spawns the loop of `op`, a run every `every`, tracked by `shutdown`.
pub fn spawn_operation<O: Operation>(
    shutdown: &Shutdown,
    op: Arc<O>,
    ctx: RunContext,
    options: RunOptions,
    every: Duration,
) {
    let token = shutdown.token();
    shutdown.spawn(async move {
        let operation = op.name();
        tracing::info!(%operation, every_secs = every.as_secs(), "operation scheduled");
        while !token.is_cancelled() {
            match run_once(&*op, &ctx, options, None).await {
                Ok(RunOutcome::Ran(_)) => {}
                Ok(RunOutcome::LockHeld(_)) => {
                    tracing::debug!(%operation, "lock held elsewhere; next interval");
                }
                Ok(RunOutcome::StillRunning { run_id, .. }) => {
                    tracing::info!(%operation, %run_id, "a live run is still recorded running; next interval");
                }
                Err(e) => {
                    tracing::error!(%operation, error = format!("{e:#}"), "run failed to start");
                }
            }
            if token
                .run_until_cancelled(tokio::time::sleep(every))
                .await
                .is_none()
            {
                break;
            }
        }
        tracing::info!(%operation, "operation stopped");
    });
}
