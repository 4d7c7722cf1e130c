//! The control-plane's metrics (names `snake_case`, units as suffix, labels from bounded
//! sets: the operation names, run statuses and item outcomes). The breaker state per
//! provider is the resilience crate's `circuit_breaker_state{adapter, policy}`.
//! [`register`] describes them and sets every series of those bounded sets to 0 at start,
//! so a rate or an alert over a series is defined before its first event (a first failed
//! run counts as an increase from 0, not as a new series `increase()` cannot see).

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
pub const RUNS_ABANDONED_TOTAL: &str = "control_plane_runs_abandoned_total";

/// Every value of the `outcome` label of [`RUNS_TOTAL`] a scheduled run can record: the
/// stored [`RunStatus`]es (a dry run is never recorded) and `skipped`.
pub const RUN_OUTCOMES: [&str; 5] = [
    RunStatus::Succeeded.as_str(),
    RunStatus::Partial.as_str(),
    RunStatus::Failed.as_str(),
    RunStatus::Interrupted.as_str(),
    SKIPPED,
];

/// Every value of the `outcome` label of [`ITEMS_TOTAL`], in the order of
/// [`record_run`]'s counts.
pub const ITEM_OUTCOMES: [&str; 3] = ["succeeded", "failed", "skipped"];

/// The `outcome` of a run that did not start.
const SKIPPED: &str = "skipped";

/// Describes every metric and registers its series at 0: runs by [`RUN_OUTCOMES`] and
/// items by [`ITEM_OUTCOMES`] for each `scheduled` operation (a disabled one stays without
/// series, so the "not succeeding" alerts do not fire for it), the lock gauge and the
/// abandoned-runs counter for every operation. Call once, after the recorder is
/// installed and before the first run.
pub fn register(scheduled: &[OperationName]) {
    ::metrics::describe_counter!(RUNS_TOTAL, "runs by operation and outcome");
    ::metrics::describe_counter!(ITEMS_TOTAL, "items processed, by operation and outcome");
    ::metrics::describe_histogram!(
        RUN_DURATION_SECONDS,
        ::metrics::Unit::Seconds,
        "duration of each run, by operation"
    );
    ::metrics::describe_gauge!(
        LOCK_HELD,
        "1 while this process holds the operation's advisory lock"
    );
    ::metrics::describe_counter!(
        RUNS_ABANDONED_TOTAL,
        "runs this process marked abandoned, by operation"
    );
    for operation in scheduled {
        let op = operation.as_str();
        for outcome in RUN_OUTCOMES {
            ::metrics::counter!(RUNS_TOTAL, "operation" => op, "outcome" => outcome).increment(0);
        }
        for outcome in ITEM_OUTCOMES {
            ::metrics::counter!(ITEMS_TOTAL, "operation" => op, "outcome" => outcome).increment(0);
        }
    }
    for operation in OperationName::ALL {
        set_lock_held(operation, false);
        record_abandoned_runs(operation, 0);
    }
}

/// Records a finished run; `counts` are the items by [`ITEM_OUTCOMES`].
pub fn record_run(
    operation: OperationName,
    status: RunStatus,
    counts: [u64; 3],
    duration: Duration,
) {
    let op = operation.as_str();
    ::metrics::counter!(RUNS_TOTAL, "operation" => op, "outcome" => status.as_str()).increment(1);
    for (outcome, n) in ITEM_OUTCOMES.into_iter().zip(counts) {
        ::metrics::counter!(ITEMS_TOTAL, "operation" => op, "outcome" => outcome).increment(n);
    }
    ::metrics::histogram!(RUN_DURATION_SECONDS, "operation" => op).record(duration.as_secs_f64());
}

/// Records a run that did not start (lock held elsewhere, or a live run row).
pub fn record_skipped_run(operation: OperationName) {
    ::metrics::counter!(RUNS_TOTAL, "operation" => operation.as_str(), "outcome" => SKIPPED)
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
