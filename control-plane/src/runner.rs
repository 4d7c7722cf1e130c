//! One run of an operation, recorded.
//!
//! 1. A dedicated connection from [`Database::acquire`] takes the operation's session
//!    advisory lock (`pg_try_advisory_lock(LOCK_CLASS, key)`) and keeps it for the whole
//!    run: a lock taken through the pool would go back with its connection. Held
//!    elsewhere: [`RunOutcome::LockHeld`], nothing else happens.
//! 2. Runs of the operation still `running` whose heartbeat is older than
//!    [`RunContext::stale_after`] are marked `abandoned` (their runner died: it lost its
//!    lock with its session). The new run's `batch_runs` row is inserted `running`; the
//!    unique partial index on `(operation) WHERE status = 'running'` refuses a second one
//!    ([`RunOutcome::StillRunning`] when a live run's row is in the way).
//! 3. The items are loaded a page at a time ([`RunContext::page_size`], `LIMIT` and a
//!    keyset after the previous page's last item, so memory is bounded whatever the
//!    backlog) and each page is run in batches through
//!    [`smartbeak_utils::concurrency::map_batches_bounded`]: settle-all (every item tried)
//!    or strict (stop after the first batch with failures; later pages are not loaded).
//!    Failures go to `batch_run_items` as each batch ends (the first
//!    [`MAX_RECORDED_FAILURES`] in full, the rest counted in `items_failed`).
//! 4. Meanwhile the lock connection heartbeats the row (`heartbeat_at` and the counts so
//!    far). When that statement fails or times out, the lock is presumed lost: the stop
//!    token fires and the run ends `failed` (not `interrupted`: the run's exclusivity is
//!    no longer vouched for, which an operator should see). The cancellation token
//!    (shutdown) is that token's parent; the run ends `interrupted`, also when every item
//!    loaded had started but the stop came after a full page (later pages not loaded). Either way the token reaches every
//!    operation's `process_batch`, so no new *item* starts (not only no new batch): the
//!    items in flight finish, every item never started is counted `skipped`, and
//!    `succeeded + failed + skipped = total` (the items loaded).
//! 5. The row gets its status and counts; the lock is released (or its connection closed).

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use indicatif::ProgressBar;
use serde::Serialize;
use smartbeak_database::{Database, DbError};
use sqlx::PgConnection;
use sqlx::pool::PoolConnection;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics;
use crate::operations::{ItemError, ItemOutcome, Operation, OperationName, Parallelism, Stop};

/// First key of every control-plane advisory lock ("SBCP"); the second is
/// [`OperationName::lock_key`].
pub const LOCK_CLASS: i32 = 0x5342_4350;

/// Failed items recorded in full in `batch_run_items` per run; later ones are counted.
pub const MAX_RECORDED_FAILURES: u64 = 1_000;

/// How a run treats failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every item is tried; failures are reported (the default).
    SettleAll,
    /// Stop after the first batch with failures; later batches are not started.
    Strict,
}

impl Mode {
    /// `settle_all` or `strict` (as stored in `batch_runs.mode`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SettleAll => "settle_all",
            Self::Strict => "strict",
        }
    }
}

/// What one run is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RunOptions {
    /// Items per batch, 1 to [`smartbeak_utils::concurrency::MAX_BATCH_SIZE`].
    pub batch_size: usize,
    /// Batches (content-scheduler) or items of a batch (the others) in flight.
    pub concurrency: NonZeroUsize,
    /// Settle-all or strict.
    pub mode: Mode,
    /// Load and report the items; change nothing (no lock, no run row).
    pub dry_run: bool,
}

/// What every run of a process shares.
#[derive(Debug, Clone)]
pub struct RunContext {
    /// The database.
    pub db: Database,
    /// This runner's name, stored in `batch_runs.runner`.
    pub runner: String,
    /// How often the lock connection heartbeats the run row.
    pub heartbeat: Duration,
    /// A `running` row whose heartbeat is older than this belongs to a dead runner.
    pub stale_after: Duration,
    /// Fired at shutdown: no new item starts; in-flight ones finish.
    pub cancel: CancellationToken,
    /// Due items loaded per page (rounded up to whole batches; [`DEFAULT_PAGE_SIZE`]):
    /// what bounds a run's memory whatever the backlog.
    pub page_size: usize,
    /// The shutdown drain deadline, counted from `cancel`: the run (its items, its final
    /// bookkeeping and the lock's release) ends within it. [`finish_margin`] before its
    /// end the items still in flight are cancelled; the margin is for recording them and
    /// the run. `None`: no deadline (the items in flight finish on their own bounds).
    pub drain: Option<Duration>,
}

/// The part of the drain deadline kept for the end of a run after its items in flight
/// are cancelled: recording their failures, the run's final row and the lock's release,
/// each statement bounded by what is left of it. A quarter of the drain, between 1 s and
/// 3 s (all of a drain shorter than 1 s). (The export worker's `release_margin` has the
/// same shape, for the same reason.)
pub fn finish_margin(drain: Duration) -> Duration {
    (drain / 4)
        .clamp(Duration::from_secs(1), Duration::from_secs(3))
        .min(drain)
}

/// The bound of the run's own statements (the lock, the run row, failures, totals,
/// heartbeats, the final row, the unlock): the database's statement bound, and, once a
/// shutdown with a drain deadline has begun, no later than the end of that drain less a
/// tenth of its [`finish_margin`] (the rest is for the runtime to see the task end). The
/// drain is counted from the moment the stop fired, which `run_once` records whenever in
/// the run that is (also while it takes the lock or inserts its row).
#[derive(Debug, Clone)]
struct Budget {
    bound: Duration,
    drain: Option<Duration>,
    stopped: Arc<OnceLock<Instant>>,
}

impl Budget {
    fn new(bound: Duration, drain: Option<Duration>) -> Self {
        Self {
            bound,
            drain,
            stopped: Arc::new(OnceLock::new()),
        }
    }

    /// Records the stop (the first call wins): the drain is counted from here.
    fn stop(&self) -> Instant {
        *self.stopped.get_or_init(Instant::now)
    }

    /// The end of the run's own statements: `None` before a stop, or without a drain.
    fn end(&self) -> Option<Instant> {
        let drain = self.drain?;
        let stopped = self.stopped.get()?;
        Some(*stopped + drain.saturating_sub(finish_margin(drain) / 10))
    }

    fn bound(&self) -> Duration {
        match self.end() {
            Some(end) => self
                .bound
                .min(end.saturating_duration_since(Instant::now())),
            None => self.bound,
        }
    }

    /// `statement`, bounded by [`Budget::bound`] when it starts.
    async fn run<T>(
        &self,
        statement: impl Future<Output = Result<T, DbError>>,
    ) -> Result<T, DbError> {
        let bound = self.bound();
        match tokio::time::timeout(bound, statement).await {
            Ok(result) => result,
            Err(_) => Err(DbError::QueryTimeout(bound)),
        }
    }
}

/// Due items loaded per page by default.
pub const DEFAULT_PAGE_SIZE: usize = 10_000;

/// The status a run ends with (`batch_runs.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// Every item succeeded (or had nothing to do).
    Succeeded,
    /// Some items failed, some succeeded.
    Partial,
    /// Every item tried failed, or the run could not go on (lock lost, load failed).
    Failed,
    /// Shutdown stopped it before every item was started.
    Interrupted,
    /// A dry run (nothing recorded).
    DryRun,
}

impl RunStatus {
    /// The stored name (`dry_run` is never stored).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Partial => "partial",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
            Self::DryRun => "dry_run",
        }
    }
}

/// One failed item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedItem {
    /// Index of the item in the run's load order.
    pub index: usize,
    /// Its id.
    pub item_id: String,
    /// Why.
    pub error: ItemError,
}

/// What a finished run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The operation.
    pub operation: OperationName,
    /// The `batch_runs` row (`None` for a dry run).
    pub run_id: Option<Uuid>,
    /// How it ended.
    pub status: RunStatus,
    /// Items loaded.
    pub total: u64,
    /// Items processed.
    pub succeeded: u64,
    /// Items that failed.
    pub failed: u64,
    /// Items not started (shutdown, strict stop, lock lost) or with nothing to do.
    pub skipped: u64,
    /// The failed items, in index order, at most [`MAX_RECORDED_FAILURES`].
    pub failures: Vec<FailedItem>,
    /// Why the run stopped early or failed as a whole, if it did.
    pub error: Option<String>,
    /// Wall time.
    pub duration: Duration,
    /// For a dry run: the ids of the first items that would be processed.
    pub sample: Vec<String>,
}

impl RunReport {
    /// The one-line summary printed by `batch` (and logged by `run`).
    pub fn summary(&self) -> String {
        let mut line = format!(
            "{}: {} in {:.2?}: {} items, {} succeeded, {} failed, {} skipped",
            self.operation,
            self.status.as_str(),
            self.duration,
            self.total,
            self.succeeded,
            self.failed,
            self.skipped
        );
        if let Some(id) = self.run_id {
            line.push_str(&format!("; run {id}"));
            if self.failed > 0 {
                line.push_str(&format!(
                    " (failed items: SELECT * FROM batch_run_items WHERE run_id = '{id}')"
                ));
            }
        }
        if let Some(error) = &self.error {
            line.push_str(&format!("; {error}"));
        }
        if self.status == RunStatus::DryRun && !self.sample.is_empty() {
            line.push_str(&format!("; would process {}", self.sample.join(", ")));
            if self.total > self.sample.len() as u64 {
                line.push_str(", ...");
            }
        }
        line
    }
}

/// The result of asking for a run.
#[derive(Debug, Clone)]
pub enum RunOutcome {
    /// The run happened (possibly with failures).
    Ran(RunReport),
    /// Another runner holds the operation's advisory lock.
    LockHeld(OperationName),
    /// A run of the operation by another runner is still `running` with a fresh heartbeat
    /// (its runner lost the lock but has not given up its row yet).
    StillRunning {
        /// The operation.
        operation: OperationName,
        /// That run.
        run_id: Uuid,
    },
}

/// A run could not start for a reason other than another runner.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The batch size is out of range.
    #[error(transparent)]
    Options(#[from] smartbeak_utils::concurrency::ConcurrencyError),
    /// A database statement of the runner itself failed.
    #[error("{what}: {source}")]
    Database {
        /// What the runner was doing.
        what: &'static str,
        /// The error.
        #[source]
        source: DbError,
    },
    /// Loading the due items failed before the run row existed (dry run).
    #[error("loading the items of {operation}: {message}")]
    Load {
        /// The operation.
        operation: OperationName,
        /// Why.
        message: String,
    },
}

fn db_error(what: &'static str) -> impl FnOnce(DbError) -> RunError {
    move |source| RunError::Database { what, source }
}

/// Counts shared by the batches and the heartbeat.
#[derive(Debug, Default)]
struct Counts {
    succeeded: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
    /// Of `skipped`: the items never started (stop token, strict stop).
    not_started: AtomicU64,
    recorded: AtomicU64,
}

/// What the pages of a run add up to, besides the [`Counts`].
#[derive(Debug, Default)]
struct Pages {
    /// Items loaded.
    total: u64,
    /// The failed items, in index order, at most [`MAX_RECORDED_FAILURES`].
    failures: Vec<FailedItem>,
    /// Why loading a page failed, if it did (the run ends there, `failed`).
    load_error: Option<String>,
    /// A stop (shutdown, lost lock) ended the loop after a full page: later pages may hold
    /// due items that were never loaded, so never counted in `not_started`.
    stopped_early: bool,
    /// Strict mode stopped after a full page: later pages may hold due items.
    strict_stopped_full_page: bool,
}

/// Items per page: `requested` rounded up to whole batches (at least one batch).
fn page_size(requested: usize, batch_size: usize) -> usize {
    let batch_size = batch_size.max(1);
    requested.max(1).div_ceil(batch_size) * batch_size
}

impl Counts {
    fn get(&self) -> (u64, u64, u64) {
        (
            self.succeeded.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.skipped.load(Ordering::Relaxed),
        )
    }
}

/// Runs `op` once: see the module docs. `progress`, when given, is advanced by one per
/// item settled and gets its length when the items are loaded.
///
/// # Errors
///
/// [`RunError`] when the runner's own statements fail before the run row exists (after
/// that, failures end the run `failed` and are in its row).
pub async fn run_once<O: Operation>(
    op: &O,
    ctx: &RunContext,
    options: RunOptions,
    progress: Option<&ProgressBar>,
) -> Result<RunOutcome, RunError> {
    smartbeak_utils::concurrency::check_batch_size(options.batch_size)?;
    let started = Instant::now();
    let operation = op.name();
    if options.dry_run {
        // Paged like a run, keeping only the count and a sample.
        let page_size = page_size(ctx.page_size, options.batch_size);
        let mut total = 0_u64;
        let mut sample = Vec::new();
        let mut after = None;
        loop {
            let page =
                op.load_page(after.clone(), page_size)
                    .await
                    .map_err(|e| RunError::Load {
                        operation,
                        message: format!("{e:#}"),
                    })?;
            let Some(last) = page.last() else {
                break;
            };
            after = Some(op.cursor(last));
            total += page.len() as u64;
            let room = 10_usize.saturating_sub(sample.len());
            sample.extend(page.iter().take(room).map(|i| op.item_id(i)));
            if page.len() < page_size || ctx.cancel.is_cancelled() {
                break;
            }
        }
        return Ok(RunOutcome::Ran(RunReport {
            operation,
            run_id: None,
            status: RunStatus::DryRun,
            total,
            succeeded: 0,
            failed: 0,
            skipped: 0,
            failures: Vec::new(),
            error: None,
            duration: started.elapsed(),
            sample,
        }));
    }

    let budget = Budget::new(ctx.db.config().query_timeout(), ctx.drain);
    if ctx.cancel.is_cancelled() {
        budget.stop();
    }
    // The stop's moment, whenever it comes: the drain is counted from it.
    let done = CancellationToken::new();
    let watch = async {
        tokio::select! {
            () = ctx.cancel.cancelled() => {
                budget.stop();
            }
            () = done.cancelled() => {}
        }
    };
    let body = async {
        let outcome = run_recorded(op, ctx, options, progress, started, &budget).await;
        done.cancel();
        outcome
    };
    let (outcome, ()) = tokio::join!(body, watch);
    outcome
}

/// The run (not a dry run): the lock, the run under it, the unlock.
async fn run_recorded<O: Operation>(
    op: &O,
    ctx: &RunContext,
    options: RunOptions,
    progress: Option<&ProgressBar>,
    started: Instant,
    budget: &Budget,
) -> Result<RunOutcome, RunError> {
    let operation = op.name();
    let bound = budget.bound();
    let mut lock = match tokio::time::timeout(bound, ctx.db.acquire()).await {
        Ok(lock) => lock.map_err(db_error("checking out the lock connection"))?,
        Err(_) => {
            return Err(RunError::Database {
                what: "checking out the lock connection",
                source: DbError::QueryTimeout(bound),
            });
        }
    };
    let locked = bounded(
        budget.bound(),
        sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1, $2)")
            .bind(LOCK_CLASS)
            .bind(operation.lock_key())
            .fetch_one(&mut *lock),
    )
    .await;
    match locked {
        Ok(true) => {}
        Ok(false) => {
            metrics::record_skipped_run(operation);
            tracing::info!(%operation, "the operation's lock is held by another runner; not running");
            return Ok(RunOutcome::LockHeld(operation));
        }
        Err(e) => {
            discard(lock);
            return Err(RunError::Database {
                what: "taking the advisory lock",
                source: e,
            });
        }
    }
    metrics::set_lock_held(operation, true);
    let (outcome, lock_ok) =
        locked_run(op, ctx, options, progress, &mut lock, started, budget).await;
    if !lock_ok {
        // The session is gone or in an unknown state: closing it releases the lock.
        discard(lock);
        metrics::set_lock_held(operation, false);
        return outcome;
    }
    // Release the lock; a connection that cannot say so is closed (which releases it).
    let released = bounded(
        budget.bound(),
        sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock($1, $2)")
            .bind(LOCK_CLASS)
            .bind(operation.lock_key())
            .fetch_one(&mut *lock),
    )
    .await;
    if !matches!(released, Ok(true)) {
        tracing::warn!(%operation, "could not release the advisory lock; closing its connection");
        discard(lock);
    }
    metrics::set_lock_held(operation, false);
    outcome
}

/// The run under the lock; the flag is false when the lock connection failed.
async fn locked_run<O: Operation>(
    op: &O,
    ctx: &RunContext,
    options: RunOptions,
    progress: Option<&ProgressBar>,
    lock: &mut PoolConnection<sqlx::Postgres>,
    started: Instant,
    budget: &Budget,
) -> (Result<RunOutcome, RunError>, bool) {
    match run_locked(op, ctx, options, progress, lock, started, budget).await {
        Ok((outcome, lost)) => (Ok(outcome), !lost),
        Err(e) => (Err(e), true),
    }
}

async fn run_locked<O: Operation>(
    op: &O,
    ctx: &RunContext,
    options: RunOptions,
    progress: Option<&ProgressBar>,
    lock: &mut PoolConnection<sqlx::Postgres>,
    started: Instant,
    budget: &Budget,
) -> Result<(RunOutcome, bool), RunError> {
    let operation = op.name();
    let abandoned = budget
        .run(ctx.db.run(async |conn| {
            sqlx::query_scalar::<_, Uuid>(
                "UPDATE batch_runs SET status = 'abandoned', finished_at = now(), \
                 error = 'abandoned: its runner stopped heartbeating (last at ' || heartbeat_at || ')' \
                 WHERE operation = $1 AND status = 'running' \
                 AND heartbeat_at < now() - make_interval(secs => $2) RETURNING id",
            )
            .bind(operation.as_str())
            .bind(ctx.stale_after.as_secs_f64())
            .fetch_all(conn)
            .await
        }))
        .await
        .map_err(db_error("marking abandoned runs"))?;
    for id in &abandoned {
        tracing::warn!(%operation, run_id = %id, "marked a run abandoned: its runner stopped heartbeating");
    }
    if !abandoned.is_empty() {
        metrics::record_abandoned_runs(operation, abandoned.len() as u64);
    }

    let run_id = Uuid::new_v4();
    let params = serde_json::json!({
        "batch_size": options.batch_size,
        "concurrency": options.concurrency.get(),
        "operation": op.params(),
    });
    let inserted = budget
        .run(ctx.db.run(async |conn| {
            sqlx::query(
                "INSERT INTO batch_runs (id, operation, runner, status, mode, params, heartbeat_at) \
                 VALUES ($1, $2, $3, 'running', $4, $5, now())",
            )
            .bind(run_id)
            .bind(operation.as_str())
            .bind(&ctx.runner)
            .bind(options.mode.as_str())
            .bind(&params)
            .execute(conn)
            .await
        }))
        .await;
    match inserted {
        Ok(_) => {}
        Err(DbError::Query(sqlx::Error::Database(e))) if e.is_unique_violation() => {
            let other: Option<Uuid> = budget
                .run(ctx.db.run(async |conn| {
                    sqlx::query_scalar(
                        "SELECT id FROM batch_runs WHERE operation = $1 AND status = 'running'",
                    )
                    .bind(operation.as_str())
                    .fetch_optional(conn)
                    .await
                }))
                .await
                .map_err(db_error("reading the running run"))?;
            metrics::record_skipped_run(operation);
            tracing::info!(%operation, "a run of another runner is still running with a fresh heartbeat; not running");
            return Ok((
                RunOutcome::StillRunning {
                    operation,
                    run_id: other.unwrap_or_default(),
                },
                false,
            ));
        }
        Err(e) => {
            return Err(RunError::Database {
                what: "inserting the run row",
                source: e,
            });
        }
    }
    tracing::info!(%operation, %run_id, mode = options.mode.as_str(), "run started");

    let counts = Arc::new(Counts::default());
    let stop_items = ctx.cancel.child_token();
    let stop = Stop {
        starting: stop_items.clone(),
        in_flight: CancellationToken::new(),
    };
    let heartbeat_done = CancellationToken::new();
    let (batch_concurrency, item_concurrency) = match op.parallelism() {
        Parallelism::Batches => (options.concurrency, NonZeroUsize::MIN),
        Parallelism::ItemsInBatch => (NonZeroUsize::MIN, options.concurrency),
    };
    let strict = options.mode == Mode::Strict;
    let page_size = page_size(ctx.page_size, options.batch_size);

    // Pages of due items, each run in batches; the next page starts after the last
    // item of this one (keyset), so rows that failed are not loaded again by this run.
    let work = async {
        let mut pages = Pages::default();
        let mut after = None;
        // A stop before the first page still loads it: its items are counted skipped, so
        // the run row says what was due. A load still running when the items in flight are
        // cancelled (shortly before the drain deadline) is dropped.
        loop {
            let page = match stop
                .unless_cancelled(op.load_page(after.clone(), page_size))
                .await
            {
                Some(Ok(page)) => page,
                Some(Err(e)) => {
                    pages.load_error = Some(format!("loading the items failed: {e:#}"));
                    break;
                }
                None => {
                    // Its items were never loaded, so never counted.
                    pages.stopped_early = true;
                    break;
                }
            };
            let len = page.len();
            let Some(last) = page.last() else {
                break;
            };
            after = Some(op.cursor(last));
            let first_index = pages.total as usize;
            pages.total += len as u64;
            if let Some(bar) = progress {
                bar.set_length(pages.total);
            }
            // The total so far goes in at once, so a watcher (or the next runner) sees it.
            let total = pages.total;
            if let Err(e) = budget
                .run(ctx.db.run(async |conn| {
                    sqlx::query(
                        "UPDATE batch_runs SET items_total = $2 WHERE id = $1 AND status = 'running'",
                    )
                    .bind(run_id)
                    .bind(clamp_i32(total))
                    .execute(conn)
                    .await
                }))
                .await
            {
                tracing::warn!(%operation, %run_id, error = %e, "could not record the run's total");
            }
            let ids: Vec<String> = page.iter().map(|item| op.item_id(item)).collect();
            let outcomes = smartbeak_utils::concurrency::map_batches_bounded(
                page,
                options.batch_size,
                batch_concurrency,
                strict,
                |first, batch| {
                    let counts = counts.clone();
                    let ids = &ids;
                    let stop = &stop;
                    async move {
                        let len = batch.len();
                        let results = op.process_batch(batch, item_concurrency, stop).await;
                        let mut failures = Vec::new();
                        for (offset, result) in results.iter().enumerate().take(len) {
                            match result {
                                Ok(ItemOutcome::Done) => {
                                    counts.succeeded.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(ItemOutcome::Skipped) => {
                                    counts.skipped.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(ItemOutcome::NotStarted) => {
                                    counts.skipped.fetch_add(1, Ordering::Relaxed);
                                    counts.not_started.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(error) => {
                                    counts.failed.fetch_add(1, Ordering::Relaxed);
                                    failures.push(FailedItem {
                                        index: first_index + first + offset,
                                        item_id: ids[first + offset].clone(),
                                        error: error.clone(),
                                    });
                                }
                            }
                        }
                        // An operation that returned too few outcomes: the rest did not run.
                        // `map_batches_bounded` pads those slots with `None`, counted
                        // skipped (not started) by the loop below, so not here.
                        record_failures(ctx, budget, run_id, operation, &counts, &failures).await;
                        if let Some(bar) = progress {
                            bar.inc(len as u64);
                        }
                        results
                    }
                },
                Some(stop_items.clone()),
            )
            .await
            // `Options` was checked above, so this is only ever Ok.
            .unwrap_or_default();
            let mut page_failed = false;
            for (offset, outcome) in outcomes.into_iter().enumerate() {
                match outcome {
                    // A batch never started (shutdown, lost lock, strict stop).
                    None => {
                        counts.skipped.fetch_add(1, Ordering::Relaxed);
                        counts.not_started.fetch_add(1, Ordering::Relaxed);
                        if let Some(bar) = progress {
                            bar.inc(1);
                        }
                    }
                    Some(Err(error)) => {
                        page_failed = true;
                        if (pages.failures.len() as u64) < MAX_RECORDED_FAILURES {
                            pages.failures.push(FailedItem {
                                index: first_index + offset,
                                item_id: ids[offset].clone(),
                                error,
                            });
                        }
                    }
                    Some(Ok(_)) => {}
                }
            }
            if strict && page_failed {
                // A full page: a later one may hold due items, never loaded.
                pages.strict_stopped_full_page = len == page_size;
                break;
            }
            if len < page_size {
                break;
            }
            if stop_items.is_cancelled() {
                // A full page: the next one was never loaded.
                pages.stopped_early = true;
                break;
            }
        }
        heartbeat_done.cancel();
        pages
    };
    let heartbeat = heartbeat(
        lock,
        run_id,
        ctx.heartbeat,
        budget,
        &counts,
        &heartbeat_done,
        &stop_items,
    );
    // At shutdown: the items in flight get the drain deadline less the finishing margin,
    // then are cancelled; every statement of the run's own is bounded by what is left.
    let drain_watch = async {
        tokio::select! {
            () = ctx.cancel.cancelled() => {}
            () = heartbeat_done.cancelled() => return,
        }
        let Some(drain) = budget.drain else {
            return;
        };
        let margin = finish_margin(drain);
        // Counted from the stop, which may have come before the run row existed.
        let stopped = budget.stop();
        tokio::select! {
            () = tokio::time::sleep_until(stopped + drain.saturating_sub(margin)) => {
                tracing::warn!(%operation, %run_id, margin_ms = margin.as_millis() as u64,
                    "shutdown drain deadline near: cancelling the items still in flight");
                stop.in_flight.cancel();
            }
            () = heartbeat_done.cancelled() => {}
        }
    };
    let (pages, lost, ()) = tokio::join!(work, heartbeat, drain_watch);
    let Pages {
        total,
        failures,
        load_error,
        stopped_early,
        strict_stopped_full_page,
    } = pages;
    let cancelled_in_flight = if stop.in_flight.is_cancelled() {
        "; items still in flight shortly before the drain deadline were cancelled (failed)"
    } else {
        ""
    };
    let later_pages = if stopped_early {
        "; later pages were not loaded"
    } else {
        ""
    };
    let not_started = counts.not_started.load(Ordering::Relaxed);
    let (succeeded, failed, skipped) = counts.get();
    let mut error = None;
    let status = if let Some(why) = &lost {
        error = Some(format!(
            "the lock connection was lost ({why}); no further items were started \
             ({not_started} not started{later_pages})"
        ));
        RunStatus::Failed
    } else if let Some(why) = load_error {
        error = Some(why);
        RunStatus::Failed
    } else if ctx.cancel.is_cancelled()
        && (not_started > 0 || stopped_early || stop.in_flight.is_cancelled())
    {
        error = Some(format!(
            "interrupted by shutdown: {not_started} items were not started{later_pages}\
             {cancelled_in_flight}"
        ));
        RunStatus::Interrupted
    } else if failed == 0 {
        RunStatus::Succeeded
    } else if succeeded == 0 {
        RunStatus::Failed
    } else {
        RunStatus::Partial
    };
    if strict && failed > 0 && error.is_none() {
        let indices: Vec<String> = failures.iter().map(|f| f.index.to_string()).collect();
        let later_pages = if strict_stopped_full_page {
            "; later pages not loaded"
        } else {
            ""
        };
        error = Some(format!(
            "strict: stopped after the first batch with failures, failed indexes [{}]; \
             {not_started} later items of its page not started{later_pages}",
            indices.join(", ")
        ));
    }
    let report = RunReport {
        operation,
        run_id: Some(run_id),
        status,
        total,
        succeeded,
        failed,
        skipped,
        failures,
        error,
        duration: started.elapsed(),
        sample: Vec::new(),
    };
    finish(ctx, budget, &report).await;
    Ok((RunOutcome::Ran(report), lost.is_some()))
}

/// Heartbeats the run on the lock connection until `done`; when a heartbeat fails, fires
/// `stop_items` and returns why (the lock is presumed lost).
async fn heartbeat(
    lock: &mut PgConnection,
    run_id: Uuid,
    every: Duration,
    budget: &Budget,
    counts: &Counts,
    done: &CancellationToken,
    stop_items: &CancellationToken,
) -> Option<String> {
    loop {
        tokio::select! {
            () = done.cancelled() => return None,
            () = tokio::time::sleep(every) => {}
        }
        if budget.end().is_some() {
            // The run is ending within the drain: its final row is written by `finish`.
            // A beat here would get only what is left of the budget, and its timeout
            // would read as a lost lock (the run recorded failed, not interrupted).
            continue;
        }
        let (succeeded, failed, skipped) = counts.get();
        let beat = bounded(
            budget.bound(),
            sqlx::query(
                "UPDATE batch_runs SET heartbeat_at = now(), items_succeeded = $2, \
                 items_failed = $3, items_skipped = $4 WHERE id = $1 AND status = 'running'",
            )
            .bind(run_id)
            .bind(clamp_i32(succeeded))
            .bind(clamp_i32(failed))
            .bind(clamp_i32(skipped))
            .execute(&mut *lock),
        )
        .await;
        let why = match beat {
            Ok(done) if done.rows_affected() == 1 => continue,
            Ok(_) => "the run row is no longer running (another runner marked it)".to_owned(),
            Err(e) => e.to_string(),
        };
        tracing::error!(run_id = %run_id, error = %why, "heartbeat failed; stopping the run");
        stop_items.cancel();
        return Some(why);
    }
}

/// Inserts a batch's failures into `batch_run_items`, up to [`MAX_RECORDED_FAILURES`]
/// per run.
async fn record_failures(
    ctx: &RunContext,
    budget: &Budget,
    run_id: Uuid,
    operation: OperationName,
    counts: &Counts,
    failures: &[FailedItem],
) {
    if failures.is_empty() {
        return;
    }
    let before = counts
        .recorded
        .fetch_add(failures.len() as u64, Ordering::Relaxed);
    let room = MAX_RECORDED_FAILURES.saturating_sub(before) as usize;
    let kept = &failures[..failures.len().min(room)];
    if kept.is_empty() {
        return;
    }
    let indexes: Vec<i64> = kept.iter().map(|f| f.index as i64).collect();
    let item_ids: Vec<&str> = kept.iter().map(|f| f.item_id.as_str()).collect();
    let errors: Vec<&str> = kept.iter().map(|f| f.error.error.as_str()).collect();
    let attempts: Vec<i32> = kept
        .iter()
        .map(|f| i32::try_from(f.error.attempts.max(1)).unwrap_or(i32::MAX))
        .collect();
    let inserted = budget
        .run(ctx.db.run(async |conn| {
            sqlx::query(
                "INSERT INTO batch_run_items (run_id, item_index, item_id, error, attempts) \
                 SELECT $1, * FROM UNNEST($2::int8[], $3::text[], $4::text[], $5::int4[]) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(run_id)
            .bind(&indexes)
            .bind(&item_ids)
            .bind(&errors)
            .bind(&attempts)
            .execute(conn)
            .await
        }))
        .await;
    if let Err(e) = inserted {
        // They are still counted in items_failed; the log names them.
        tracing::error!(%operation, %run_id, error = %e, failed = ?indexes, "could not record failed items");
    }
}

/// Writes the run's final status and counts (only while it is still `running`: another
/// runner may have marked it abandoned) and records its metrics.
async fn finish(ctx: &RunContext, budget: &Budget, report: &RunReport) {
    let Some(run_id) = report.run_id else {
        return;
    };
    let written = budget
        .run(ctx.db.run(async |conn| {
            sqlx::query(
                "UPDATE batch_runs SET status = $2, items_total = $3, items_succeeded = $4, \
                 items_failed = $5, items_skipped = $6, error = $7, finished_at = now(), \
                 heartbeat_at = now() WHERE id = $1 AND status = 'running'",
            )
            .bind(run_id)
            .bind(report.status.as_str())
            .bind(clamp_i32(report.total))
            .bind(clamp_i32(report.succeeded))
            .bind(clamp_i32(report.failed))
            .bind(clamp_i32(report.skipped))
            .bind(report.error.as_deref())
            .execute(conn)
            .await
        }))
        .await;
    match written {
        Ok(done) if done.rows_affected() == 1 => {}
        Ok(_) => tracing::warn!(operation = %report.operation, %run_id,
            "the run row was no longer running (marked abandoned by another runner); its counts are in this log"),
        Err(e) => tracing::error!(operation = %report.operation, %run_id, error = %e,
            "could not record the end of the run; the next runner marks it abandoned"),
    }
    metrics::record_run(
        report.operation,
        report.status,
        [report.succeeded, report.failed, report.skipped],
        report.duration,
    );
    let level_error = report.failed > 0 || report.status == RunStatus::Failed;
    if level_error {
        tracing::warn!(operation = %report.operation, %run_id, "{}", report.summary());
    } else {
        tracing::info!(operation = %report.operation, %run_id, "{}", report.summary());
    }
}

/// Runs a statement on the lock connection under `bound` (statements on an acquired
/// connection are not bounded by the `Database`).
async fn bounded<T>(
    bound: Duration,
    statement: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, DbError> {
    match tokio::time::timeout(bound, statement).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(DbError::Query(e)),
        Err(_) => Err(DbError::QueryTimeout(bound)),
    }
}

/// Closes a connection instead of returning it to the pool.
fn discard(conn: PoolConnection<sqlx::Postgres>) {
    drop(conn.detach());
}

fn clamp_i32(n: u64) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}
