//! The worker's metric names (the `metrics` crate; the binary installs the Prometheus
//! recorder). Labels come from bounded sets only: `format` (json, csv, markdown) and
//! `outcome` ([`OUTCOMES`]).

/// Counter: jobs this worker claimed.
pub const CLAIMED: &str = "export_jobs_claimed_total";
/// Counter `{format, outcome}`: attempts this worker ended, by outcome.
pub const JOBS: &str = "export_jobs_total";
/// Counter: expired leases this worker's reaper took back (any worker's).
pub const RECLAIMED: &str = "export_jobs_reclaimed_total";
/// Histogram `{format}`: duration of a successful export, claim to completion.
pub const DURATION: &str = "export_duration_seconds";
/// Histogram `{format}`: size of a finished file.
pub const SIZE: &str = "export_size_bytes";
/// Histogram `{format}`: records written per second by a successful export.
pub const ROWS_PER_SECOND: &str = "export_rows_per_second";
/// Gauge: jobs `queued` (every worker's view of the shared queue).
pub const QUEUE_DEPTH: &str = "export_queue_depth";
/// Gauge: age of the oldest due queued job, in seconds.
pub const QUEUE_OLDEST_AGE: &str = "export_queue_oldest_age_seconds";
/// Gauge: exports running in this worker right now (at most `EXPORT_CONCURRENCY`).
pub const RUNNING: &str = "export_jobs_running";

/// Every value of the `outcome` label of [`JOBS`].
pub const OUTCOMES: [&str; 7] = [
    "succeeded",
    "failed",
    "retried",
    "cancelled",
    "fenced",
    "released",
    "expired",
];

/// Every value of the `format` label.
pub const FORMATS: [&str; 3] = ["json", "csv", "markdown"];

/// Duration buckets (seconds) for [`DURATION`].
pub const DURATION_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];

/// Size buckets (bytes) for [`SIZE`]: 1 KiB to 1 GiB.
pub const SIZE_BUCKETS: [f64; 11] = [
    1024.0,
    8192.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    10_485_760.0,
    52_428_800.0,
    104_857_600.0,
    524_288_000.0,
    1_073_741_824.0,
];

/// Rate buckets (records per second) for [`ROWS_PER_SECOND`].
pub const RATE_BUCKETS: [f64; 9] = [
    100.0,
    1_000.0,
    10_000.0,
    50_000.0,
    100_000.0,
    250_000.0,
    500_000.0,
    1_000_000.0,
    5_000_000.0,
];

/// Registers every series at zero (so a scrape shows them before the first job) and
/// describes them.
pub fn register() {
    metrics::describe_counter!(CLAIMED, "jobs this worker claimed");
    metrics::describe_counter!(JOBS, "attempts this worker ended, by format and outcome");
    metrics::describe_counter!(
        RECLAIMED,
        "expired leases taken back by this worker's reaper"
    );
    metrics::describe_histogram!(
        DURATION,
        metrics::Unit::Seconds,
        "duration of successful exports"
    );
    metrics::describe_histogram!(SIZE, metrics::Unit::Bytes, "size of finished export files");
    metrics::describe_histogram!(ROWS_PER_SECOND, "records per second of successful exports");
    metrics::describe_gauge!(QUEUE_DEPTH, "export jobs queued");
    metrics::describe_gauge!(
        QUEUE_OLDEST_AGE,
        metrics::Unit::Seconds,
        "age of the oldest due queued export job"
    );
    metrics::describe_gauge!(RUNNING, "exports running in this worker");
    metrics::counter!(CLAIMED).absolute(0);
    metrics::counter!(RECLAIMED).absolute(0);
    metrics::gauge!(RUNNING).set(0.0);
    for format in FORMATS {
        for outcome in OUTCOMES {
            metrics::counter!(JOBS, "format" => format, "outcome" => outcome).absolute(0);
        }
    }
}
