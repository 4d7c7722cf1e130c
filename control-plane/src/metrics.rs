//! The control-plane's metrics (names `snake_case`, units as suffix, labels from bounded
//! sets: the operation names, run statuses and item outcomes). The breaker state per
//! provider is the resilience crate's `circuit_breaker_state{adapter, policy}`.

use std::time::Duration;

use crate::operations::OperationName;
use crate::runner::RunStatus;

/// Runs by operation and outcome (`operation`, `outcome` = a [`RunStatus`] or `skipped`
/// when the lock or a live run was in the way).
pub const RUNS_TOTAL: &str = "control_plane_runs_total";
/// Items processed, by operation and outcome (`succeeded`, `failed`, `skipped`).
pub const ITEMS_TOTAL: &str = "control_plane_items_total";
/// Duration of each run, seconds, by operation.
pub const RUN_DURATION_SECONDS: &str = "control_plane_run_duration_seconds";
/// 1 while this process holds the operation's advisory lock, else 0.
pub const LOCK_HELD: &str = "control_plane_lock_held";
/// Runs this process marked `abandoned` (their runner stopped heartbeating), by operation.
/// Registered at 0 for every operation at start so a rate over it is defined before the
/// first abandoned run.
pub const RUNS_ABANDONED_TOTAL: &str = "control_plane_runs_abandoned_total";

/// Records a finished run.
pub fn record_run(
    operation: OperationName,
    status: RunStatus,
    counts: [(&'static str, u64); 3],
    duration: Duration,
) {
    let op = operation.as_str();
    ::metrics::counter!(RUNS_TOTAL, "operation" => op, "outcome" => status.as_str()).increment(1);
    for (outcome, n) in counts {
        ::metrics::counter!(ITEMS_TOTAL, "operation" => op, "outcome" => outcome).increment(n);
    }
    ::metrics::histogram!(RUN_DURATION_SECONDS, "operation" => op).record(duration.as_secs_f64());
}

/// Records a run that did not start (lock held elsewhere, or a live run row).
pub fn record_skipped_run(operation: OperationName) {
    ::metrics::counter!(RUNS_TOTAL, "operation" => operation.as_str(), "outcome" => "skipped")
        .increment(1);
}

/// Records `n` runs of `operation` this process marked abandoned (`n` = 0 registers the
/// series).
pub fn record_abandoned_runs(operation: OperationName, n: u64) {
    ::metrics::counter!(RUNS_ABANDONED_TOTAL, "operation" => operation.as_str()).increment(n);
}

/// Sets the lock gauge of `operation`.
pub fn set_lock_held(operation: OperationName, held: bool) {
    ::metrics::gauge!(LOCK_HELD, "operation" => operation.as_str()).set(if held {
        1.0
    } else {
        0.0
    });
}
