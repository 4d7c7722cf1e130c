//! The export worker: claims `domain_exports` jobs, runs them with bounded concurrency,
//! keeps their leases, and gives back what it cannot finish.
//!
//! - **Claiming.** [`Worker::run`] drives a stream of claims through
//!   `smartbeak_utils::concurrency::for_each_bounded`: the stream is polled only while fewer
//!   than `EXPORT_CONCURRENCY` exports run, and each poll claims one job
//!   (`queue::claim`, `FOR UPDATE SKIP LOCKED`), so the worker never holds a lease it has
//!   no slot for and a slow export never holds back the free slots. When the queue is
//!   empty it waits for a `NOTIFY` on `queue::CHANNEL` (a dedicated `PgListener`
//!   session, `crate::listen`) or a poll timer backing off from 100 ms to `EXPORT_POLL_MAX_MS`:
//!   the poll catches retries falling due and covers a lost listener connection while it
//!   reconnects.
//! - **Per job** (`job`): a `CancellationToken` child of the worker's; `run_export`
//!   writes the file `<id>.<token>.<ext>` (one name per attempt); a watcher renews the
//!   lease (`queue::heartbeat`) every `EXPORT_HEARTBEAT_SECS` and checks the fence every
//!   `min(1 s, EXPORT_HEARTBEAT_SECS)` (and at once on a cancel `NOTIFY`), writing the
//!   progress when it changed (so at most one progress write a second). A `Fenced` answer
//!   (the job was cancelled or its lease reclaimed) cancels the token at once: the export
//!   stops within a second and removes its temp file, and nothing more is written. The
//!   **local lease deadline** (`job::LocalLease`): with no successful renewal for `lease -
//!   query timeout`, the job stops by itself, deletes its own files and records nothing
//!   more (a late rename of its own file is possible, never recorded), before any reaper
//!   can reclaim it. Outcomes: success -> `queue::complete`,
//!   with the recovery of a lost reply (`job::complete_recovering`); a fenced completion
//!   deletes the attempt's own file; a retryable error -> `queue::fail` with the delay of
//!   `smartbeak_resilience::RetryPolicy` (exponential, full jitter,
//!   `EXPORT_RETRY_BASE_MS` doubling to `EXPORT_RETRY_MAX_MS`, the job's `max_attempts`),
//!   else dead letter.
//! - **Reaper.** Every worker runs `queue::reclaim_expired` every
//!   `EXPORT_REAPER_INTERVAL_SECS`, refreshes the queue gauges, and sweeps `EXPORT_DIR`
//!   ([`sweep_dir`], also once at start, on a timer of its own): temp files older than two
//!   leases (a killed worker's), and final files older than two leases that no row
//!   references (a fenced or killed attempt's), never a file of a job whose row is
//!   `running` (an attempt may still write it or record it: a rename keeps the temp
//!   file's mtime, so a file just renamed can look old).
//! - **Shutdown** ([`install`]): `stop-claiming` (`StopAccepting`) ends the claim stream;
//!   `drain-exports` (`Drain`) lets running exports finish until a margin before the
//!   drain deadline, then cancels the rest and releases their leases (`queue::release`:
//!   queued, due now, token bumped) while the pools are still open, so another worker
//!   takes them at once. The margin is at least the [`release_window`] (the cancel grace
//!   plus the database client bound, so a release against a slow database still lands),
//!   and the drain deadline must hold it plus the client bound (a claim sent just before
//!   the stop may return that much later, and its release must have the whole window too);
//!   a shorter one is refused at start-up ([`check_drain`]).
//!   Each release runs under a deadline (`deadline::scope`) that ends before the drain
//!   does; a release that fails, or runs out of time, fails the handler, so the shutdown
//!   report (and the exit code) says so.
//!
//! Metrics are in [`metrics`]; configuration in [`config`]; the CLI's helpers in [`cli`].

pub mod cli;
pub mod config;
mod job;
pub mod metrics;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use futures::stream::{self, Stream};
use smartbeak_database::{Database, DatabaseConfig};
use smartbeak_shutdown::{HandlerGuard, Phase, RegisterError, Shutdown, ShutdownConfig};
use smartbeak_utils::concurrency::for_each_bounded;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use config::WorkerConfig;
pub use job::CANCEL_GRACE;

use super::export::{ExportDir, is_temp_name};
use super::paths;
use super::queue::{self, ClaimedJob};
use crate::listen;

/// Name of the `StopAccepting` handler [`install`] registers.
pub const STOP_CLAIMING: &str = "stop-claiming";
/// Name of the `Drain` handler [`install`] registers.
pub const DRAIN_EXPORTS: &str = "drain-exports";

/// Leases the reaper takes back per statement.
const RECLAIM_BATCH: i64 = 100;

/// One worker process's export loop. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Worker {
    ctx: Arc<Ctx>,
}

/// What the worker's tasks share.
struct Ctx {
    db: Database,
    config: WorkerConfig,
    dir: ExportDir,
    /// Ends the claim stream (and the listener and the reaper).
    stop: CancellationToken,
    /// Parent of every job's token: cancelled when the drain deadline nears.
    abandon: CancellationToken,
    /// Woken by a `NOTIFY` (or a reclaim) while the claim stream idles.
    wake: Notify,
    /// Exports running now.
    running: watch::Sender<usize>,
    /// The watcher of each running job, woken by a cancel notification.
    watchers: Mutex<HashMap<Uuid, Arc<Notify>>>,
    /// True once [`Worker::run`] has returned.
    finished: watch::Sender<bool>,
    /// The margin of the local lease deadline: the database client bound.
    lease_margin: Duration,
    /// Leases whose release at shutdown failed (the drain handler reports them).
    release_failures: AtomicUsize,
    /// Set by the drain handler before it cancels the running exports: each release runs
    /// under this deadline (`deadline::scope`).
    release_deadline: OnceLock<tokio::time::Instant>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("worker_id", &self.ctx.config.worker_id)
            .field("running", &*self.ctx.running.borrow())
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A worker on `db`, writing into `dir`.
    pub fn new(db: Database, config: WorkerConfig, dir: ExportDir) -> Self {
        let lease_margin = db.config().query_timeout();
        Self {
            ctx: Arc::new(Ctx {
                lease_margin,
                release_failures: AtomicUsize::new(0),
                release_deadline: OnceLock::new(),
                db,
                config,
                dir,
                stop: CancellationToken::new(),
                abandon: CancellationToken::new(),
                wake: Notify::new(),
                running: watch::channel(0).0,
                watchers: Mutex::new(HashMap::new()),
                finished: watch::channel(false).0,
            }),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &WorkerConfig {
        &self.ctx.config
    }

    /// Stops claiming: the claim stream ends (a claim in flight completes and its job runs);
    /// running exports go on.
    pub fn stop_claiming(&self) {
        self.ctx.stop.cancel();
    }

    /// Cancels every running export; each one's lease is released (`queue::release`) for
    /// another worker.
    pub fn abandon_running(&self) {
        self.ctx.abandon.cancel();
    }

    /// The number of exports running now (also the `export_jobs_running` gauge).
    pub fn running(&self) -> watch::Receiver<usize> {
        self.ctx.running.subscribe()
    }

    /// Whether [`Worker::run`] has returned.
    pub fn finished(&self) -> watch::Receiver<bool> {
        self.ctx.finished.subscribe()
    }

    /// Claims and runs jobs until [`Worker::stop_claiming`]; then waits for the running
    /// exports (finished, or cancelled and released after [`Worker::abandon_running`]).
    /// Returns the number of jobs it claimed.
    pub async fn run(&self) -> usize {
        let ctx = &self.ctx;
        metrics::register();
        tracing::info!(
            worker_id = %ctx.config.worker_id,
            concurrency = ctx.config.concurrency.get(),
            lease_secs = ctx.config.lease.as_secs(),
            export_dir = %ctx.dir.root().display(),
            "export worker started"
        );
        sweep(ctx).await;
        let claims = for_each_bounded(
            claim_stream(ctx.clone()),
            ctx.config.concurrency,
            |job| self.start(job),
            None,
        );
        let (claimed, (), (), ()) = tokio::join!(
            claims,
            crate::listen::run(
                &ctx.db,
                &[queue::CHANNEL, queue::CANCEL_CHANNEL],
                "export jobs",
                ctx.config.poll_max,
                |event| match event {
                    // A cancelled running job's id wakes that job's watcher (its fence check
                    // then stops it at once); anything else, or a gap in the notifications,
                    // wakes the idle claim stream.
                    listen::Event::Notification { channel, payload }
                        if channel == queue::CANCEL_CHANNEL =>
                    {
                        if let Ok(id) = payload.parse() {
                            ctx.wake_watcher(id);
                        }
                    }
                    listen::Event::Notification { .. }
                    | listen::Event::Subscribed
                    | listen::Event::Lost => ctx.wake.notify_one(),
                },
                &ctx.stop
            ),
            reaper(ctx),
            sweeper(ctx)
        );
        tracing::info!(claimed, "export worker stopped");
        ctx.finished.send_replace(true);
        claimed
    }

    /// Starts one claimed job on a task of its own (exports use every core) and returns
    /// the future the bounded loop waits for; the running count covers a panicking job.
    fn start(&self, (job, claimed_at): (ClaimedJob, Instant)) -> impl Future<Output = ()> + use<> {
        let ctx = self.ctx.clone();
        ctx.running.send_modify(|n| *n += 1);
        ::metrics::gauge!(metrics::RUNNING).set(*ctx.running.borrow() as f64);
        let id = job.fence.id;
        let handle = tokio::spawn(job::run(ctx.clone(), job, claimed_at));
        async move {
            if let Err(error) = handle.await {
                tracing::error!(export_id = %id, %error, "export task failed; its lease will expire and be reclaimed");
            }
            ctx.running.send_modify(|n| *n = n.saturating_sub(1));
            ::metrics::gauge!(metrics::RUNNING).set(*ctx.running.borrow() as f64);
        }
    }
}

impl Ctx {
    /// Registers a running job's watcher; the returned guard removes it.
    fn watch(self: &Arc<Self>, id: Uuid) -> (Arc<Notify>, WatcherGuard) {
        let notify = Arc::new(Notify::new());
        self.watchers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, notify.clone());
        (
            notify,
            WatcherGuard {
                ctx: self.clone(),
                id,
            },
        )
    }

    /// Wakes the watcher of `id` if that job runs here.
    fn wake_watcher(&self, id: Uuid) {
        if let Some(notify) = self
            .watchers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
        {
            notify.notify_one();
        }
    }
}

/// Removes a job's watcher from [`Ctx::watchers`] when dropped.
struct WatcherGuard {
    ctx: Arc<Ctx>,
    id: Uuid,
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.ctx
            .watchers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// The claims, one per poll: ends when the worker stops claiming (checked between
/// claims, never in the middle of one, so no claimed job is dropped).
/// Each claim comes with the instant its statement was sent (the start of its local lease).
fn claim_stream(ctx: Arc<Ctx>) -> impl Stream<Item = (ClaimedJob, Instant)> {
    stream::unfold((ctx, config::POLL_MIN), |(ctx, mut backoff)| async move {
        loop {
            if ctx.stop.is_cancelled() {
                return None;
            }
            let config = &ctx.config;
            let sent = Instant::now();
            match queue::claim(&ctx.db, &config.worker_id, 1, config.lease).await {
                Ok(jobs) => {
                    if let Some(job) = jobs.into_iter().next() {
                        ::metrics::counter!(metrics::CLAIMED).increment(1);
                        tracing::info!(
                            export_id = %job.fence.id,
                            attempt = job.attempt,
                            format = job.spec.format.as_str(),
                            "claimed export"
                        );
                        return Some(((job, sent), (ctx, config::POLL_MIN)));
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "claiming export jobs failed; retrying after a backoff");
                }
            }
            tokio::select! {
                () = ctx.stop.cancelled() => return None,
                () = ctx.wake.notified() => backoff = config::POLL_MIN,
                () = tokio::time::sleep(backoff) => {
                    backoff = (backoff * 2).min(config.poll_max);
                }
            }
        }
    })
}

/// Reclaims expired leases and refreshes the queue gauges every reaper interval, until
/// the worker stops claiming (the sweep runs beside it: [`sweeper`]).
async fn reaper(ctx: &Ctx) {
    let mut tick = tokio::time::interval(ctx.config.reaper_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while ctx.stop.run_until_cancelled(tick.tick()).await.is_some() {
        match ctx
            .stop
            .run_until_cancelled(queue::reclaim_expired(&ctx.db, RECLAIM_BATCH))
            .await
        {
            None => break,
            Some(Ok(reclaimed)) => {
                ::metrics::counter!(metrics::RECLAIMED).increment(reclaimed.len() as u64);
                for job in &reclaimed {
                    tracing::info!(
                        export_id = %job.id,
                        dead_lettered = job.dead_lettered,
                        "reclaimed an export whose lease expired"
                    );
                }
                if !reclaimed.is_empty() {
                    ctx.wake.notify_one();
                }
            }
            Some(Err(error)) => tracing::warn!(%error, "reclaiming expired leases failed"),
        }
        match ctx.stop.run_until_cancelled(queue::stats(&ctx.db)).await {
            None => break,
            Some(Ok(stats)) => {
                ::metrics::gauge!(metrics::QUEUE_DEPTH).set(stats.queued as f64);
                ::metrics::gauge!(metrics::QUEUE_OLDEST_AGE).set(stats.oldest_queued_age_secs);
            }
            Some(Err(error)) => tracing::warn!(%error, "reading the queue stats failed"),
        }
    }
}

/// Sweeps `EXPORT_DIR` every reaper interval (on its own timer, so a slow directory never
/// delays a reclaim), until the worker stops claiming.
async fn sweeper(ctx: &Ctx) {
    let mut tick = tokio::time::interval(ctx.config.reaper_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: `run` swept once at start.
    tick.tick().await;
    while ctx.stop.run_until_cancelled(tick.tick()).await.is_some() {
        if ctx.stop.run_until_cancelled(sweep(ctx)).await.is_none() {
            break;
        }
    }
}

/// What [`sweep_dir`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Temp files (`.<id>.<random>.tmp`) older than two leases of jobs not running.
    pub temp_files: usize,
    /// Final files older than two leases that no `domain_exports` row references, of
    /// jobs not running.
    pub orphans: usize,
}

/// Sweeps the worker's `EXPORT_DIR` (see [`sweep_dir`]) and deletes a batch of expired
/// `Idempotency-Key` records ([`crate::idempotency::purge_expired`]); failures are logged,
/// never fatal.
async fn sweep(ctx: &Ctx) -> Swept {
    match crate::idempotency::purge_expired(&ctx.db, 1_000).await {
        Ok(0) => {}
        Ok(purged) => tracing::info!(purged, "deleted expired idempotency records"),
        Err(error) => tracing::warn!(%error, "deleting expired idempotency records failed"),
    }
    let swept = sweep_dir(&ctx.db, &ctx.dir, ctx.config.lease * 2).await;
    if swept != Swept::default() {
        tracing::info!(
            temp_files = swept.temp_files,
            orphans = swept.orphans,
            "swept leftover export files"
        );
    }
    swept
}

/// Deletes, in `dir`, the temp files (`.<id>.<random>.tmp`) and final export files
/// (`paths::parse_file_name`) last modified more than `min_age` ago that no attempt may
/// still need: any file of a job whose row is `running` is kept, whatever its age (its
/// attempt may be writing the temp file, or have renamed the final file with its
/// `complete` still in flight: a rename keeps the temp file's mtime, so age alone says
/// nothing); a final file a row records as its `storage_path` is kept; a temp file of a
/// job not running, or a final file no row records, is deleted. The rows are read by
/// primary key (`queue::file_owners`); when that fails nothing is deleted. Other names
/// (not an export's) are never touched. The file system work runs on the blocking pool.
pub async fn sweep_dir(db: &Database, dir: &ExportDir, min_age: Duration) -> Swept {
    let root = dir.root().to_path_buf();
    let listed = tokio::task::spawn_blocking(move || old_files(&root, min_age)).await;
    let found = match listed {
        Ok(Ok(found)) => found,
        Ok(Err(error)) => {
            tracing::warn!(%error, "listing EXPORT_DIR for the sweep failed");
            return Swept::default();
        }
        Err(error) => {
            tracing::warn!(%error, "the sweep's listing task failed");
            return Swept::default();
        }
    };
    if found.is_empty() {
        return Swept::default();
    }
    let mut ids: Vec<Uuid> = found.iter().map(|f| f.id).collect();
    ids.sort_unstable();
    ids.dedup();
    let owners = match queue::file_owners(db, &ids).await {
        Ok(owners) => owners,
        Err(error) => {
            tracing::warn!(%error, "reading the jobs of the old export files failed; none swept");
            return Swept::default();
        }
    };
    let doomed: Vec<OldFile> = found
        .into_iter()
        .filter(|file| match owners.get(&file.id) {
            Some(owner) if owner.status == "running" => false,
            Some(owner) if !file.temp => owner.storage_path.as_deref() != Some(&file.name),
            _ => true,
        })
        .collect();
    let root = dir.root().to_path_buf();
    match tokio::task::spawn_blocking(move || remove_swept(&root, doomed)).await {
        Ok(swept) => swept,
        Err(error) => {
            tracing::warn!(%error, "the sweep's removal task failed");
            Swept::default()
        }
    }
}

/// A temp or final export file found by [`old_files`].
#[derive(Debug)]
struct OldFile {
    name: String,
    /// The job whose file it is (from the name).
    id: Uuid,
    temp: bool,
}

/// The job id in a temp file's name (`.<id>.<random>.tmp`).
fn temp_file_id(name: &str) -> Option<Uuid> {
    let id = name.strip_prefix('.')?.split('.').next()?;
    (id.len() == 32).then(|| Uuid::try_parse(id).ok()).flatten()
}

/// The temp files and final export files directly in `root` (plain files, not symlinks)
/// last modified at least `min_age` ago, with the job id their names carry.
fn old_files(root: &std::path::Path, min_age: Duration) -> std::io::Result<Vec<OldFile>> {
    let now = SystemTime::now();
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let temp = is_temp_name(&name);
        let id = if temp {
            temp_file_id(&name)
        } else {
            paths::parse_file_name(&name).map(|(id, _)| id)
        };
        let Some(id) = id else {
            continue;
        };
        let Ok(metadata) = entry.metadata() else {
            continue;
        };
        let old = metadata
            .modified()
            .ok()
            .and_then(|at| now.duration_since(at).ok())
            .is_some_and(|age| age >= min_age);
        if metadata.file_type().is_file() && old {
            found.push(OldFile { name, id, temp });
        }
    }
    Ok(found)
}

/// Removes the swept files (blocking) and counts what was removed.
fn remove_swept(root: &std::path::Path, files: Vec<OldFile>) -> Swept {
    let mut swept = Swept::default();
    for file in files {
        let path = root.join(&file.name);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed a leftover export file");
                if file.temp {
                    swept.temp_files += 1;
                } else {
                    swept.orphans += 1;
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "removing a leftover export file failed");
            }
        }
    }
    swept
}

/// The handlers and task [`install`] set up; dropping it deregisters the handlers.
#[derive(Debug)]
#[must_use = "dropping the guards deregisters the worker's shutdown handlers"]
pub struct Installed {
    /// `stop-claiming` and `drain-exports`.
    pub guards: Vec<HandlerGuard>,
}

/// Wires `worker` into `shutdown` and starts it as a tracked task: `stop-claiming`
/// (`StopAccepting`) stops claiming at once; `drain-exports` (`Drain`) waits for the
/// running exports until the release margin ([`release_margin`]) before the drain
/// deadline, then cancels them and waits for their leases to be released (before
/// `db-pools` closes in `Release`). [`check_drain`] says at start-up whether the drain
/// deadline can hold the release window.
pub fn install(shutdown: &Shutdown, worker: &Worker) -> Result<Installed, RegisterError> {
    let stopping = worker.clone();
    let stop = shutdown.register(STOP_CLAIMING, Phase::StopAccepting, move || async move {
        stopping.stop_claiming();
        tracing::info!("stopped claiming export jobs");
    })?;
    let drain = drain_deadline(shutdown.config());
    let draining = worker.clone();
    let drain_guard = shutdown.register(DRAIN_EXPORTS, Phase::Drain, move || async move {
        drain_exports(&draining, drain).await
    })?;
    let running = worker.clone();
    shutdown.spawn(async move {
        running.run().await;
    });
    Ok(Installed {
        guards: vec![stop, drain_guard],
    })
}

/// Time the worker's default drain deadline keeps, past the readiness delay, the drain and
/// closing the pools, before `SHUTDOWN_TIMEOUT_MS` ([`shutdown_config`]): the phases' own
/// scheduling and the report, so a pool close that takes all of `SHUTDOWN_POOL_CLOSE_MS`
/// fails `db-pools` instead of running past the overall deadline (exit 124).
pub const SHUTDOWN_SLACK: Duration = Duration::from_secs(1);

/// The worker's shutdown configuration: `config`, with a drain deadline of four fifths of
/// `SHUTDOWN_TIMEOUT_MS`, at most `SHUTDOWN_TIMEOUT_MS` less `SHUTDOWN_READINESS_DELAY_MS`,
/// `pool_close` (`SHUTDOWN_POOL_CLOSE_MS`) and [`SHUTDOWN_SLACK`] (19 s of the default
/// 25 s with the default 5 s pool close), unless `SHUTDOWN_DRAIN_TIMEOUT_MS` was set
/// ([`ShutdownConfig::drain_is_explicit`]). The shared default, two thirds (16.7 s), is
/// below [`min_drain`] at the default `DB_STATEMENT_TIMEOUT_MS` (18.35 s at 8 s); four
/// fifths alone (20 s) would leave the pools exactly their 5 s, nothing for the rest.
pub fn shutdown_config(config: ShutdownConfig, pool_close: Duration) -> ShutdownConfig {
    if config.drain_is_explicit() {
        return config;
    }
    let rest = config.readiness_delay + pool_close + SHUTDOWN_SLACK;
    let drain = (config.timeout / 5 * 4).min(config.timeout.saturating_sub(rest));
    config.with_drain_timeout(drain)
}

/// Checks the worker's shutdown configuration at start-up: [`check_drain`] (the drain
/// holds a late claim and its release), then [`check_shutdown_budget`] (the drain and
/// closing the pools fit in the overall deadline). The message names the variables.
pub fn check_shutdown(
    shutdown: &ShutdownConfig,
    db: &DatabaseConfig,
    pool_close: Duration,
) -> Result<(), String> {
    check_drain(shutdown, db)?;
    check_shutdown_budget(shutdown, pool_close)
}

/// Refuses (at start-up) a configuration whose readiness delay, drain deadline and pool
/// close (`pool_close`, `SHUTDOWN_POOL_CLOSE_MS`) add up to more than `SHUTDOWN_TIMEOUT_MS`:
/// the Release phase starts only when the Drain phase has ended, so a drain that uses its
/// whole deadline would leave `db-pools` less than its own, and a slow close would end in
/// the overall deadline (exit 124, the pools not closed) instead of a `db-pools` failure.
pub fn check_shutdown_budget(
    shutdown: &ShutdownConfig,
    pool_close: Duration,
) -> Result<(), String> {
    let drain = drain_deadline(shutdown);
    let needed = shutdown.readiness_delay + drain + pool_close;
    if needed > shutdown.timeout {
        return Err(format!(
            "the shutdown drain deadline ({} ms, SHUTDOWN_DRAIN_TIMEOUT_MS) plus the pool close \
             ({} ms, SHUTDOWN_POOL_CLOSE_MS) plus the readiness delay ({} ms, \
             SHUTDOWN_READINESS_DELAY_MS) is {} ms, more than the overall deadline \
             SHUTDOWN_TIMEOUT_MS ({} ms): closing the pools could run past it; lower \
             SHUTDOWN_DRAIN_TIMEOUT_MS or SHUTDOWN_POOL_CLOSE_MS, or raise SHUTDOWN_TIMEOUT_MS",
            drain.as_millis(),
            pool_close.as_millis(),
            shutdown.readiness_delay.as_millis(),
            needed.as_millis(),
            shutdown.timeout.as_millis()
        ));
    }
    Ok(())
}

/// The drain deadline the `drain-exports` handler works to: `SHUTDOWN_DRAIN_TIMEOUT_MS`
/// (for the worker binary by default four fifths of `SHUTDOWN_TIMEOUT_MS`, less when the
/// pools' close would not fit, [`shutdown_config`]; two thirds when no drain deadline is
/// set at all), at most
/// `SHUTDOWN_TIMEOUT_MS`.
pub fn drain_deadline(config: &ShutdownConfig) -> Duration {
    config
        .drain_timeout
        .unwrap_or(config.timeout * 2 / 3)
        .min(config.timeout)
}

/// Time kept after the releases' own deadline for the job tasks to end and the handler
/// to return before the drain deadline (the built-in `in-flight-tasks` entry's).
pub const RELEASE_SLACK: Duration = Duration::from_millis(250);

/// What cancelling and releasing a running export may take, at most: the export's
/// cancel grace ([`CANCEL_GRACE`]), then one `queue::release` bounded by the database
/// client bound `query_timeout` (`Database::run` bounds the acquire, a fresh connection
/// included, and the statement together), plus [`RELEASE_SLACK`].
pub fn release_window(query_timeout: Duration) -> Duration {
    CANCEL_GRACE + query_timeout + RELEASE_SLACK
}

/// The part of the drain deadline kept for cancelling the exports still running and
/// releasing their leases: a quarter of it, between 1 s and 3 s, at most the drain less
/// `query_timeout`, so the cancel comes no earlier than a claim sent just before the stop
/// can have returned (its job then starts before the cancel, and its release has the whole
/// window, as any other's), and never less than the [`release_window`] of
/// `query_timeout`. A drain too short for both ([`check_drain`] refuses it) keeps the
/// window, or all of the drain when shorter still (the exports are then released at once).
pub fn release_margin(drain: Duration, query_timeout: Duration) -> Duration {
    let window = release_window(query_timeout);
    (drain / 4)
        .clamp(Duration::from_secs(1), Duration::from_secs(3))
        .min(drain.saturating_sub(query_timeout))
        .max(window)
        .min(drain)
}

/// The shortest drain deadline [`check_drain`] accepts at `query_timeout`: the
/// [`release_window`] plus the client bound itself. A claim sent just before the stop may
/// return up to `query_timeout` later; were the cancel earlier, its job would start already
/// cancelled and its release would have only what is left of the window of the others.
pub fn min_drain(query_timeout: Duration) -> Duration {
    release_window(query_timeout) + query_timeout
}

/// Refuses (at start-up) a drain deadline shorter than [`min_drain`]: a release cut short
/// by the end of the drain leaves its job `running` until its lease expires, and the
/// reaper's reclaim keeps the attempt it used (a job on its last attempt would be
/// dead-lettered by an ordinary deploy). The message names the variables.
pub fn check_drain(shutdown: &ShutdownConfig, db: &DatabaseConfig) -> Result<(), String> {
    let drain = drain_deadline(shutdown);
    let query_timeout = db.query_timeout();
    let window = release_window(query_timeout);
    let needed = min_drain(query_timeout);
    if drain < needed {
        return Err(format!(
            "the shutdown drain deadline ({} ms, SHUTDOWN_DRAIN_TIMEOUT_MS, by default for the \
             export worker four fifths of SHUTDOWN_TIMEOUT_MS, at most SHUTDOWN_TIMEOUT_MS less \
             SHUTDOWN_POOL_CLOSE_MS and 1 s) must be at least {} ms: a \
             claim in flight at the stop may return up to the database client bound of {} ms \
             (DB_STATEMENT_TIMEOUT_MS {} ms plus a margin) later, and its export's release \
             then needs the whole release window of {} ms ({} ms for the export to stop, the \
             client bound, {} ms to report); raise SHUTDOWN_DRAIN_TIMEOUT_MS / \
             SHUTDOWN_TIMEOUT_MS or lower DB_STATEMENT_TIMEOUT_MS",
            drain.as_millis(),
            needed.as_millis(),
            query_timeout.as_millis(),
            db.statement_timeout.as_millis(),
            window.as_millis(),
            CANCEL_GRACE.as_millis(),
            RELEASE_SLACK.as_millis()
        ));
    }
    Ok(())
}

/// Waits for the worker to finish its running exports within `drain` less the release
/// margin; then cancels the rest and waits for their releases, each run under a deadline
/// (the cancel grace plus the database client bound from the cancel), so a release that
/// runs too long fails (counted in the release failures) instead of outliving the drain.
async fn drain_exports(worker: &Worker, drain: Duration) -> Result<(), String> {
    let started = tokio::time::Instant::now();
    let query_timeout = worker.ctx.lease_margin;
    let margin = release_margin(drain, query_timeout);
    let mut finished = worker.finished();
    let wait = drain.saturating_sub(margin);
    if tokio::time::timeout(wait, finished.wait_for(|done| *done))
        .await
        .is_ok()
    {
        return release_report(worker);
    }
    let running = *worker.running().borrow();
    tracing::info!(
        running,
        margin_ms = margin.as_millis() as u64,
        "drain deadline near: cancelling the exports still running and releasing their leases"
    );
    // The releases end by this instant (or fail); the handler waits a little past it for
    // the job tasks to end, and still ends before the drain deadline.
    let end = started + drain;
    let releases_by = (tokio::time::Instant::now() + CANCEL_GRACE + query_timeout)
        .min(end.checked_sub(RELEASE_SLACK).unwrap_or(end));
    let _ = worker.ctx.release_deadline.set(releases_by);
    worker.abandon_running();
    let wait_until = (releases_by + RELEASE_SLACK / 2).min(end);
    match tokio::time::timeout_at(wait_until, finished.wait_for(|done| *done)).await {
        Ok(_) => release_report(worker),
        Err(_) => Err(format!(
            "{} exports still running {} ms after they were cancelled",
            *worker.running().borrow(),
            wait_until
                .saturating_duration_since(started + wait)
                .as_millis()
        )),
    }
}

/// `Err` naming the leases whose release failed (they wait for their expiry and the
/// reaper instead of being taken at once): the shutdown report marks the handler failed.
fn release_report(worker: &Worker) -> Result<(), String> {
    match worker.ctx.release_failures.load(Ordering::SeqCst) {
        0 => Ok(()),
        n => Err(format!(
            "{n} export leases could not be released; they will be reclaimed after their lease expires"
        )),
    }
}

#[cfg(test)]
mod tests;
