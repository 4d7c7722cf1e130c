//! PostgreSQL for SmartBeak: pools whose every connection carries server-side timeouts, a
//! lazily created analytics read pool that falls back to the primary, pool metrics, a
//! deadline-bounded close, and the schema migrations.
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
//! // Every query is bounded on both sides: the server cancels it after statement_timeout,
//! // and `bounded` gives up a little later if the connection went silent.
//! let one: i32 = db.bounded(sqlx::query_scalar("SELECT 1").fetch_one(db.primary())).await?;
//! assert_eq!(one, 1);
//!
//! // Analytics reads go to ANALYTICS_DB_URL when it answers, else to the primary.
//! let reads = db.analytics().await;
//! let _n: i64 = db.bounded(sqlx::query_scalar("SELECT count(*) FROM domains").fetch_one(&reads)).await?;
//!
//! db.close(Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```
//!
//! # Why sqlx 0.8.6 and a cancel-safe `begin`
//!
//! No released sqlx (0.8.6 and 0.9.0 alike) has the fix for a cancelled `BEGIN` leaving a
//! pooled session inside a transaction (sqlx issues 4385 and 4393; the fix, PR 4394, is
//! merged but unreleased). [`Database::begin`] closes that hole here: the `BEGIN` runs in a
//! spawned task that always completes, so a caller dropped mid-`BEGIN` leaves a finished
//! `Transaction` behind whose drop queues the `ROLLBACK`. The caller's wait is bounded by
//! [`DatabaseConfig::query_timeout`] (a `BEGIN` on a black-holed connection ends in
//! [`DbError::QueryTimeout`]); the task itself is never cut short, since cancelling it
//! mid-`BEGIN` is the very bug. The server's `idle_in_transaction_session_timeout` stays on
//! as the backstop for everything else.

#![warn(missing_docs)]

mod analytics;
mod config;
mod error;
mod metrics;
mod pool;
#[cfg(feature = "testing")]
pub mod testing;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres, Transaction};

pub use analytics::ReadSource;
pub use config::{ConfigError, DatabaseConfig, SecretUrl};
pub use error::DbError;
pub use metrics::{PoolMetrics, PoolStats};
pub use pool::{LIFETIME_JITTER, PING_BYPASS};

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

struct Inner {
    config: DatabaseConfig,
    primary: PgPool,
    analytics: Arc<analytics::Analytics>,
    counters: Arc<metrics::Counters>,
}

impl Inner {
    /// Checks out a primary connection, counting waiters, latency and timeouts.
    async fn acquire(&self) -> Result<PoolConnection<Postgres>, DbError> {
        let counters = &self.counters;
        let started = Instant::now();
        let result = {
            let _waiting = Waiting::new(&counters.waiters);
            self.primary.acquire().await
        };
        match result {
            Ok(conn) => {
                counters.acquires.fetch_add(1, Ordering::Relaxed);
                let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                counters.acquire_micros.fetch_add(micros, Ordering::Relaxed);
                Ok(conn)
            }
            Err(e) => {
                let error = self.classify(e);
                if matches!(error, DbError::AcquireTimeout(_)) {
                    counters.acquire_timeouts.fetch_add(1, Ordering::Relaxed);
                }
                Err(error)
            }
        }
    }

    fn classify(&self, error: sqlx::Error) -> DbError {
        DbError::from_sqlx(error, self.config.acquire_timeout)
    }

    /// Counts a failed query (and a timed-out one: server statement timeout or the
    /// client-side bound); returns the error.
    fn count_query_error(&self, error: DbError) -> DbError {
        let counters = &self.counters;
        counters.query_errors.fetch_add(1, Ordering::Relaxed);
        if matches!(
            error,
            DbError::QueryTimeout(_) | DbError::StatementTimeout(_)
        ) {
            counters.query_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        error
    }
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
    /// start-up) with `application_name` on every connection; the analytics pool, named
    /// `<application_name>-analytics`, is opened on first use.
    pub async fn connect(config: DatabaseConfig, application_name: &str) -> Result<Self, DbError> {
        config.validate()?;
        let primary = pool::connect(&config, &config.url, application_name, "primary").await?;
        tracing::info!(
            url = %config.url,
            application_name,
            pool_max = config.pool_max,
            statement_timeout_ms = config.statement_timeout.as_millis() as u64,
            analytics = config.analytics_url.is_some(),
            "database pool ready"
        );
        let counters = Arc::new(metrics::Counters::default());
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

    /// The primary (read-write) pool.
    pub fn primary(&self) -> &PgPool {
        &self.inner.primary
    }

    /// The pool for analytics reads: the replica when `ANALYTICS_DB_URL` is set and
    /// reachable, else the primary. Concurrent first callers share one initialisation
    /// (bounded by the acquire timeout); after a failure callers get the primary at once,
    /// and retries run in the background after a backoff.
    pub async fn analytics(&self) -> PgPool {
        let inner = &self.inner;
        match inner.analytics.get().await {
            Some(pool) => pool,
            None => inner.primary.clone(),
        }
    }

    /// Which pool serves analytics reads right now.
    pub fn read_source(&self) -> ReadSource {
        self.inner.analytics.source()
    }

    /// Checks out a primary connection, counting waiters, latency and timeouts. Cancel-safe:
    /// a caller dropped while waiting stops counting as a waiter.
    pub async fn acquire(&self) -> Result<PoolConnection<Postgres>, DbError> {
        self.inner.acquire().await
    }

    /// Runs a query future under the client-side bound
    /// ([`DatabaseConfig::query_timeout`]) and classifies its error.
    pub async fn bounded<T>(
        &self,
        query: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, DbError> {
        let config = &self.inner.config;
        let counters = &self.inner.counters;
        let bound = config.query_timeout();
        let error = match tokio::time::timeout(bound, query).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => DbError::from_sqlx(e, config.acquire_timeout),
            Err(_) => DbError::QueryTimeout(bound),
        };
        if matches!(error, DbError::AcquireTimeout(_)) {
            counters.acquire_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        Err(self.inner.count_query_error(error))
    }

    /// Starts a transaction on the primary, safe to cancel (see the crate docs) and bounded
    /// like [`Database::bounded`]: a caller gets [`DbError::QueryTimeout`] after
    /// [`DatabaseConfig::query_timeout`] (acquire included) even if the connection went
    /// silent. The connection is counted like [`Database::acquire`].
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, DbError> {
        let inner = Arc::clone(&self.inner);
        // The task always runs to the end, even if this future is dropped or gives up
        // below: its output, a live `Transaction`, is then dropped by tokio, which queues
        // the `ROLLBACK`. Never bound `BEGIN` inside the task: cancelling it mid-flight is
        // the bug this avoids.
        let mut task = tokio::spawn(async move {
            let conn = inner.acquire().await?;
            // What `Pool::begin` does, on a connection checked out with our counters.
            sqlx::Transaction::begin(conn, None)
                .await
                .map_err(|e| inner.count_query_error(inner.classify(e)))
        });
        let bound = self.inner.config.query_timeout();
        match tokio::time::timeout(bound, &mut task).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(DbError::BeginAborted),
            // Dropping the handle detaches the task; it still finishes (see above).
            Err(_) => Err(self.inner.count_query_error(DbError::QueryTimeout(bound))),
        }
    }

    /// `SELECT 1` on the primary within the acquire timeout, for readiness checks.
    pub async fn ping(&self) -> Result<(), DbError> {
        let bound = self.inner.config.acquire_timeout;
        let query = sqlx::query("SELECT 1").execute(&self.inner.primary);
        match tokio::time::timeout(bound, query).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(DbError::from_sqlx(e, bound)),
            Err(_) => Err(DbError::QueryTimeout(bound)),
        }
    }

    /// A snapshot of pool sizes and counters.
    pub fn metrics(&self) -> PoolMetrics {
        let inner = &self.inner;
        inner.counters.snapshot(
            PoolStats::of(&inner.primary),
            inner.analytics.pool().map(PoolStats::of),
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
                    tokio::join!(pool::close(&inner.primary), pool::close(analytics));
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
