//! PostgreSQL for SmartBeak: pools whose every connection carries server-side timeouts, a
//! lazily created analytics read pool that falls back to the primary (and back again when
//! the replica dies), pool metrics, a deadline-bounded close, and the schema migrations.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use smartbeak_database::{Database, DatabaseConfig};
//!
//! let config = DatabaseConfig::from_env()?; // DATABASE_URL, DB_* knobs
//! let db = Database::connect(config, "smartbeak-api").await?;
//! smartbeak_database::migrate(db.primary()).await?;
//!
//! // Every query runs through `run`: on a connection checked out (and counted) by the
//! // `Database`, bounded on both sides: the server cancels it after statement_timeout, and
//! // `run` gives up a little later if the connection went silent, discarding that
//! // connection so its pool slot is free at once.
//! let one: i32 = db
//!     .run(async |conn| sqlx::query_scalar("SELECT 1").fetch_one(conn).await)
//!     .await?;
//! assert_eq!(one, 1);
//!
//! // Analytics reads go to ANALYTICS_DB_URL while it answers, else to the primary.
//! let (_n, _source): (i64, _) = db
//!     .run_analytics(async |conn| sqlx::query_scalar("SELECT count(*) FROM domains").fetch_one(conn).await)
//!     .await?;
//!
//! // Transactions: the same bound on every statement and on COMMIT.
//! let mut tx = db.begin().await?;
//! tx.run(async |conn| sqlx::query("SELECT 1").execute(conn).await).await?;
//! tx.commit().await?;
//!
//! db.close(Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```
//!
//! # Why work runs on a connection the `Database` holds
//!
//! sqlx 0.8.6 pings a connection on its way back to the pool, with no timeout, and returns
//! the pool slot (the permit) only after that ping. A query future dropped on a client-side
//! timeout (the black-holed connection that timeout exists for) would therefore hold its slot
//! for the OS TCP timeout, about 15 minutes; twenty of them exhaust a pool of twenty and keep
//! `close()` waiting. [`Database::run`] checks the connection out itself, runs the work on
//! it under the bound, and on timeout (or when its caller drops it mid-work, a cancelled
//! request) detaches it from the pool
//! (`PoolConnection::detach`) and drops it: the socket closes, the slot is free at once and
//! the pool opens a fresh connection when it needs one. [`Tx`] does the same for every
//! statement of a transaction and for its `BEGIN`, `COMMIT` and `ROLLBACK`. A connection
//! that goes back after its work succeeded gets a liveness ping bounded by the acquire
//! timeout first (the pool's `after_release` hook, which sqlx runs before its own ping), so
//! a path that died meanwhile costs its slot that long at most.
//!
//! # Why sqlx 0.8.6 and a cancel-safe `begin`
//!
//! No released sqlx (0.8.6 and 0.9.0 alike) has the fix for a cancelled `BEGIN` leaving a
//! pooled session inside a transaction (sqlx issues 4385 and 4393; the fix, PR 4394, is
//! merged but unreleased). [`Database::begin`] closes that hole here: the `BEGIN` runs in a
//! spawned task that the caller cannot cancel, so a caller dropped mid-`BEGIN` leaves a
//! finished [`Tx`] behind whose drop queues the `ROLLBACK`. The task bounds the `BEGIN` by
//! [`DatabaseConfig::query_timeout`] and, when it fires, discards the connection instead of
//! returning it: a `BEGIN` cut short never reaches the pool. The caller's wait has the same
//! bound ([`DbError::QueryTimeout`]). The server's `idle_in_transaction_session_timeout`
//! stays on as the backstop for everything else.

#![warn(missing_docs)]

mod analytics;
mod config;
mod error;
mod metrics;
mod pinger;
mod pool;
mod snapshot;
#[cfg(feature = "testing")]
pub mod testing;
mod transaction;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};

pub use analytics::{REPLICA_ERRORS, ReadSource};
pub use config::{ConfigError, DatabaseConfig, SecretUrl};
pub use error::{DbError, is_connection_sqlstate};
pub use metrics::{ACQUIRE_BUCKETS, PoolMetrics, PoolStats};
pub use pinger::Pinger;
pub use pool::{CLIENT_CHECK_INTERVAL, LIFETIME_JITTER, PING_BYPASS};
/// The deadline of the work a query belongs to: [`Database::run`], [`Database::begin`] and
/// [`Tx::run`] bound themselves by the smaller of their configured bound and what is left of
/// it (one task-local with `smartbeak_utils::fetch::deadline`, see
/// [`smartbeak_resilience::deadline`]).
pub use smartbeak_resilience::deadline;
pub use snapshot::{CopyOut, Rows, Snapshot, SnapshotOptions};
pub use transaction::Tx;

/// The schema migrations under `crates/database/migrations`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Applies every pending migration. Concurrent callers are safe: sqlx takes an advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// The primary pool and the analytics pool of one binary. Cheap to clone.
#[derive(Clone)]
pub struct Database {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    config: DatabaseConfig,
    primary: PgPool,
    analytics: Arc<analytics::Analytics>,
    counters: Arc<metrics::Counters>,
}

impl Inner {
    async fn run_on<T>(
        &self,
        pool: &PgPool,
        bound: Duration,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, DbError> {
        run_on(
            &self.counters,
            self.config.acquire_timeout,
            pool,
            bound,
            work,
        )
        .await
    }

    /// Checks out a connection of `pool`, counting waiters, latency and timeouts.
    async fn acquire_from(&self, pool: &PgPool) -> Result<PoolConnection<Postgres>, DbError> {
        acquire_from(&self.counters, self.config.acquire_timeout, pool).await
    }

    fn classify(&self, error: sqlx::Error) -> DbError {
        DbError::from_sqlx(error, self.config.acquire_timeout)
    }

    /// Counts a failed query (and a timed-out one); returns the error.
    fn count_query_error(&self, error: DbError) -> DbError {
        self.counters.count_query_error(error)
    }

    /// [`Self::count_query_error`] of a snapshot's failure, also recorded against the
    /// replica's health when the snapshot reads from replica `generation`.
    fn snapshot_error(&self, generation: Option<u64>, error: DbError) -> DbError {
        let error = self.count_query_error(error);
        if let Some(generation) = generation {
            self.analytics.record_error(generation, &error);
        }
        error
    }
}

/// Checks out a connection of `pool`, counting waiters, latency and timeouts. An acquire
/// timeout is [`DbError::PoolSaturated`] when the database kept answering (see
/// [`saturated`]), else [`DbError::AcquireTimeout`].
async fn acquire_from(
    counters: &metrics::Counters,
    acquire_timeout: Duration,
    pool: &PgPool,
) -> Result<PoolConnection<Postgres>, DbError> {
    let started = Instant::now();
    let releases_before = counters.releases.load(Ordering::Relaxed);
    let result = {
        let _waiting = Waiting::new(&counters.waiters);
        pool.acquire().await
    };
    match result {
        Ok(conn) => {
            counters.record_acquire(started.elapsed());
            Ok(conn)
        }
        Err(e) => {
            let error = match DbError::from_sqlx(e, acquire_timeout) {
                DbError::AcquireTimeout(waited) => {
                    counters.acquire_timeouts.fetch_add(1, Ordering::Relaxed);
                    if saturated(counters, pool, releases_before) {
                        DbError::PoolSaturated(waited)
                    } else {
                        DbError::AcquireTimeout(waited)
                    }
                }
                other => other,
            };
            Err(error)
        }
    }
}

/// True when an acquire that timed out waited on a saturated pool rather than on a silent
/// database: sqlx answers `PoolTimedOut` both when every connection stays checked out and
/// when new ones cannot be opened (refused, black-holed; sqlx issues 2276 and 3808). The
/// pool is saturated when it is at its maximum (every slot taken by a connection checked
/// out or being opened) and connections came back to a pool with their release ping
/// answered while this caller waited (the database served the callers queued ahead of
/// it). A pool full of connections stuck on a silent server gets none back, and one whose
/// connects fail is below its maximum or gets none back either. The release count is shared by the primary and the analytics pool: a
/// replica answering while a full primary is silent reads as saturation of the primary.
fn saturated(counters: &metrics::Counters, pool: &PgPool, releases_before: u64) -> bool {
    pool.size() >= pool.options().get_max_connections()
        && counters.releases.load(Ordering::Relaxed) > releases_before
}

/// Checks out a connection of `pool` and runs `work` on it, the whole call bounded by
/// `bound`; errors are classified and counted. On timeout the connection is discarded (see
/// the crate docs).
pub(crate) async fn run_on<T>(
    counters: &metrics::Counters,
    acquire_timeout: Duration,
    pool: &PgPool,
    bound: Duration,
    work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
) -> Result<T, DbError> {
    // `bound` may have been worked out a while ago (a replica's first connect in between):
    // the request's deadline, when there is one, still caps it.
    let deadline = deadline::instant_after(bound);
    let acquire = acquire_from(counters, acquire_timeout, pool);
    let conn = match tokio::time::timeout_at(deadline, acquire).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(counters.count_query_error(e)),
        Err(_) => return Err(counters.count_query_error(DbError::QueryTimeout(bound))),
    };
    // Discards the connection unless the work ended: on the bound, and also when the caller
    // drops this future mid-query (a cancelled request), which would otherwise send the
    // connection back through sqlx's unbounded release ping.
    let mut held = InFlight(Some(conn));
    let Some(conn) = held.0.as_deref_mut() else {
        // Never: `held` was made with its connection just above.
        return Err(DbError::Discarded);
    };
    let outcome = tokio::time::timeout_at(deadline, work(conn)).await;
    match outcome {
        Ok(Ok(value)) => {
            held.release();
            Ok(value)
        }
        Ok(Err(e)) => {
            held.release();
            Err(counters.count_query_error(DbError::from_sqlx(e, acquire_timeout)))
        }
        Err(_) => {
            drop(held);
            Err(counters.count_query_error(DbError::QueryTimeout(bound)))
        }
    }
}

/// A connection with work in flight: dropped before [`InFlight::release`], it is discarded.
struct InFlight(Option<PoolConnection<Postgres>>);

impl InFlight {
    /// The work ended: the connection goes back to the pool.
    fn release(mut self) {
        drop(self.0.take());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            discard(conn);
        }
    }
}

/// Takes a connection out of its pool and closes its socket without a word to the server:
/// the pool slot is free at once, and nothing waits on a path that stopped answering.
pub(crate) fn discard(conn: PoolConnection<Postgres>) {
    drop(conn.detach());
}

/// Counts one caller waiting for a connection for as long as it lives, so a caller dropped
/// mid-wait (a cancelled future) stops counting too.
struct Waiting<'a>(&'a AtomicU64);

impl<'a> Waiting<'a> {
    fn new(waiters: &'a AtomicU64) -> Self {
        waiters.fetch_add(1, Ordering::Relaxed);
        Self(waiters)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("url", &self.inner.config.url)
            .field("read_source", &self.read_source())
            .finish_non_exhaustive()
    }
}

impl Database {
    /// Opens the primary pool (its first connection is made now, so a wrong URL fails at
    /// start-up) with `application_name` on every connection, after checking on a first
    /// connection that the server applies the session settings ([`DbError::SettingsIgnored`]
    /// when a pooler dropped them); the analytics pool, named `<application_name>-analytics`, is
    /// opened on first use.
    pub async fn connect(config: DatabaseConfig, application_name: &str) -> Result<Self, DbError> {
        config.validate()?;
        pool::check_settings(&config, &config.url, application_name, "primary").await?;
        let counters = Arc::new(metrics::Counters::default());
        let primary = pool::connect(
            &config,
            &config.url,
            application_name,
            "primary",
            Arc::clone(&counters),
        )
        .await?;
        tracing::info!(
            url = %config.url,
            application_name,
            pool_max = config.pool_max,
            statement_timeout_ms = config.statement_timeout.as_millis() as u64,
            analytics = config.analytics_url.is_some(),
            "database pool ready"
        );
        let analytics = analytics::Analytics::new(&config, application_name, counters.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                primary,
                analytics: Arc::new(analytics),
                counters,
            }),
        })
    }

    /// The configuration this database was opened with.
    pub fn config(&self) -> &DatabaseConfig {
        &self.inner.config
    }

    /// The primary (read-write) pool, for migrations and tools. Queries go through
    /// [`Database::run`]: one run straight on this pool is neither bounded nor counted, and a
    /// client-side timeout around it costs the pool a slot for the OS TCP timeout.
    pub fn primary(&self) -> &PgPool {
        &self.inner.primary
    }

    /// Runs `work` on a primary connection checked out (and counted) for it, the whole call
    /// (acquire included) bounded by [`DatabaseConfig::query_timeout`]. Errors are classified
    /// ([`DbError::StatementTimeout`], [`DbError::AcquireTimeout`], ...) and counted. When the
    /// bound fires, or the caller drops this future mid-work, the connection is discarded, not
    /// returned: its pool slot is free at once.
    ///
    /// `work` gets the connection for one statement or several (autocommit each); for a
    /// transaction use [`Database::begin`]. Inside a [`deadline::scope`] the bound is the
    /// smaller of that and what is left of the deadline.
    pub async fn run<T>(
        &self,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, DbError> {
        let inner = &self.inner;
        inner
            .run_on(
                &inner.primary,
                deadline::bounded(inner.config.query_timeout()),
                work,
            )
            .await
    }

    /// Like [`Database::run`], on the pool serving analytics reads right now (the replica
    /// while it answers, else the primary), and says which one it was. A connection failure
    /// on the replica counts towards dropping it (see [`Database::read_source`]).
    pub async fn run_analytics<T>(
        &self,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<(T, ReadSource), DbError> {
        let inner = &self.inner;
        let bound = deadline::bounded(inner.config.query_timeout());
        match inner.analytics.get().await {
            Some((generation, replica)) => {
                let result = inner.run_on(&replica, bound, work).await;
                inner.analytics.record(generation, &result);
                result.map(|value| (value, ReadSource::Replica))
            }
            None => inner
                .run_on(&inner.primary, bound, work)
                .await
                .map(|value| (value, ReadSource::Primary)),
        }
    }

    /// Opens a [`Snapshot`] for a long read with the configured bounds
    /// ([`DatabaseConfig::long_read_timeout`], [`DatabaseConfig::stream_gap_timeout`]): one
    /// connection of the analytics pool (the replica while it answers, else the primary) in
    /// `BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY`, the statement timeout raised for
    /// that transaction only. Starting it is bounded like [`Database::run`]; a connection
    /// failure on the replica counts towards dropping it.
    pub async fn read_snapshot(&self) -> Result<Snapshot, DbError> {
        let config = &self.inner.config;
        self.read_snapshot_with(SnapshotOptions {
            statement_timeout: config.long_read_timeout,
            gap_timeout: config.stream_gap_timeout,
        })
        .await
    }

    /// [`Database::read_snapshot`] with explicit bounds.
    pub async fn read_snapshot_with(&self, options: SnapshotOptions) -> Result<Snapshot, DbError> {
        let inner = &self.inner;
        match inner.analytics.get().await {
            Some((generation, replica)) => {
                let result = self
                    .start_snapshot(&replica, ReadSource::Replica, options)
                    .await;
                inner.analytics.record(generation, &result);
                // Its stream failures count against the replica's health too.
                result.map(|snapshot| snapshot.on_replica(generation))
            }
            None => {
                self.start_snapshot(&inner.primary, ReadSource::Primary, options)
                    .await
            }
        }
    }

    async fn start_snapshot(
        &self,
        pool: &PgPool,
        source: ReadSource,
        options: SnapshotOptions,
    ) -> Result<Snapshot, DbError> {
        let inner = &self.inner;
        let bound = deadline::bounded(inner.config.query_timeout());
        let deadline = tokio::time::Instant::now() + bound;
        let conn = match tokio::time::timeout_at(deadline, inner.acquire_from(pool)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(inner.count_query_error(e)),
            Err(_) => return Err(inner.count_query_error(DbError::QueryTimeout(bound))),
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        Snapshot::begin(Arc::clone(inner), conn, source, options, left).await
    }

    /// The pool for analytics reads: the replica when `ANALYTICS_DB_URL` is set and
    /// reachable, else the primary. Concurrent first callers share one initialisation
    /// (bounded by the acquire timeout); after a failure callers get the primary at once,
    /// and retries run in the background after a backoff. Prefer
    /// [`Database::run_analytics`], which bounds and counts the query and notices a replica
    /// that stopped answering.
    pub async fn analytics(&self) -> PgPool {
        let inner = &self.inner;
        match inner.analytics.get().await {
            Some((_, pool)) => pool,
            None => inner.primary.clone(),
        }
    }

    /// Which pool serves analytics reads right now. The replica is dropped (reads fall back
    /// to the primary, and retries resume on the backoff) after
    /// [`REPLICA_ERRORS`] consecutive connection failures or one failed health
    /// ping (every [`DatabaseConfig::analytics_ping_interval`]).
    pub fn read_source(&self) -> ReadSource {
        self.inner.analytics.source()
    }

    /// Checks out a primary connection, counting waiters, latency and timeouts. Cancel-safe:
    /// a caller dropped while waiting stops counting as a waiter.
    ///
    /// For work that needs one session for longer than a query (a session advisory lock);
    /// statements run on it are not bounded: prefer [`Database::run`].
    pub async fn acquire(&self) -> Result<PoolConnection<Postgres>, DbError> {
        let inner = &self.inner;
        inner.acquire_from(&inner.primary).await
    }

    /// Starts a transaction on the primary, safe to cancel (see the crate docs) and bounded
    /// like [`Database::run`]: a caller gets [`DbError::QueryTimeout`] after
    /// [`DatabaseConfig::query_timeout`] (acquire included) even if the connection went
    /// silent, and that connection is discarded. The connection is counted like
    /// [`Database::acquire`]. Inside a [`deadline::scope`] the bound (of the `BEGIN` and of
    /// every [`Tx::run`]) is at most what is left of the deadline, and the transaction's
    /// `statement_timeout` is lowered with `SET LOCAL` to nine tenths of it when that is
    /// below `DB_STATEMENT_TIMEOUT_MS`.
    pub async fn begin(&self) -> Result<Tx, DbError> {
        let inner = Arc::clone(&self.inner);
        let bound = deadline::bounded(self.inner.config.query_timeout());
        let deadline = tokio::time::Instant::now() + bound;
        // Inside a request's deadline the server-side timeout of this transaction's
        // statements is lowered to fit it (`SET LOCAL`, gone at its end).
        let statement_timeout = deadline::remaining().and_then(|left| {
            transaction::nested_statement_timeout(self.inner.config.statement_timeout, left)
        });
        // The task always runs to its end, even if this future is dropped or gives up
        // below: its output, a live `Tx`, is then dropped by tokio, which queues the
        // `ROLLBACK`. The task bounds the `BEGIN` itself and discards the connection when
        // that bound fires, so a `BEGIN` cut short never goes back to the pool.
        let mut task = tokio::spawn(async move {
            let conn =
                match tokio::time::timeout_at(deadline, inner.acquire_from(&inner.primary)).await {
                    Ok(result) => result?,
                    Err(_) => return Err(inner.count_query_error(DbError::QueryTimeout(bound))),
                };
            Tx::begin(inner, conn, deadline, bound, statement_timeout).await
        });
        match tokio::time::timeout_at(deadline, &mut task).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(DbError::BeginAborted),
            // The task ends by itself at the same deadline, discarding the connection; it is
            // counted there.
            Err(_) => Err(DbError::QueryTimeout(bound)),
        }
    }

    /// `SELECT 1` on the primary, the whole check bounded by the acquire timeout, for
    /// readiness checks. Runs like [`Database::run`] (a silent connection is discarded).
    pub async fn ping(&self) -> Result<(), DbError> {
        let inner = &self.inner;
        let bound = inner.config.acquire_timeout;
        inner
            .run_on(&inner.primary, bound, async |conn| {
                sqlx::query("SELECT 1").execute(conn).await.map(|_| ())
            })
            .await
    }

    /// A readiness check on a connection of its own, outside the pools, so that a saturated
    /// pool does not read as an unreachable database ([`Pinger`]). Call it once and keep the
    /// handle: each `Pinger` holds (at most) one connection.
    pub fn pinger(&self) -> Pinger {
        let inner = &self.inner;
        Pinger::new(
            inner.primary.connect_options(),
            inner.config.acquire_timeout,
        )
    }

    /// A snapshot of pool sizes and counters.
    pub fn metrics(&self) -> PoolMetrics {
        let inner = &self.inner;
        inner.counters.snapshot(
            PoolStats::of(&inner.primary),
            inner.analytics.pool().as_ref().map(PoolStats::of),
            self.read_source(),
        )
    }

    /// Closes both pools: new acquires fail at once, checked-out connections close when
    /// returned. Waits for that at most `deadline`; an analytics pool that comes up after
    /// this closes at once.
    pub async fn close(&self, deadline: Duration) -> Result<(), DbError> {
        let inner = &self.inner;
        let both = async {
            match inner.analytics.close() {
                Some(analytics) => {
                    tokio::join!(pool::close(&inner.primary), pool::close(&analytics));
                }
                None => pool::close(&inner.primary).await,
            }
        };
        tokio::time::timeout(deadline, both)
            .await
            .map_err(|_| DbError::CloseTimeout(deadline))?;
        tracing::info!("database pools closed");
        Ok(())
    }
}
