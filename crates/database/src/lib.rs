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
//! `Transaction` behind whose drop queues the `ROLLBACK`. The server's
//! `idle_in_transaction_session_timeout` stays on as the backstop for everything else.

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
use std::sync::atomic::Ordering;
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
    analytics: analytics::Analytics,
    counters: metrics::Counters,
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
        let analytics = analytics::Analytics::new(&config, application_name);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                primary,
                analytics,
                counters: metrics::Counters::default(),
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
    /// reachable, else the primary. Concurrent first callers share one initialisation; a
    /// failure is retried after a backoff, and meanwhile callers get the primary at once.
    pub async fn analytics(&self) -> PgPool {
        let inner = &self.inner;
        match inner.analytics.get(&inner.config, &inner.counters).await {
            Some(pool) => pool,
            None => inner.primary.clone(),
        }
    }

    /// Which pool serves analytics reads right now.
    pub fn read_source(&self) -> ReadSource {
        self.inner.analytics.source()
    }

    /// Checks out a primary connection, counting waiters, latency and timeouts.
    pub async fn acquire(&self) -> Result<PoolConnection<Postgres>, DbError> {
        let counters = &self.inner.counters;
        counters.waiters.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = self.inner.primary.acquire().await;
        counters.waiters.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(conn) => {
                counters.acquires.fetch_add(1, Ordering::Relaxed);
                let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                counters.acquire_micros.fetch_add(micros, Ordering::Relaxed);
                Ok(conn)
            }
            Err(e) => {
                let error = DbError::from_sqlx(e, self.inner.config.acquire_timeout);
                if matches!(error, DbError::AcquireTimeout(_)) {
                    counters.acquire_timeouts.fetch_add(1, Ordering::Relaxed);
                }
                Err(error)
            }
        }
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
        counters.query_errors.fetch_add(1, Ordering::Relaxed);
        if error.is_timeout() {
            counters.query_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        if matches!(error, DbError::AcquireTimeout(_)) {
            counters.acquire_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        Err(error)
    }

    /// Starts a transaction on the primary, safe to cancel: see the crate docs.
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, DbError> {
        let pool = self.inner.primary.clone();
        let acquire_timeout = self.inner.config.acquire_timeout;
        // If this future is dropped, the task still finishes `BEGIN`; its output, a live
        // `Transaction`, is then dropped by tokio, which queues the `ROLLBACK`.
        let task = tokio::spawn(async move { pool.begin().await });
        match task.await {
            Ok(result) => result.map_err(|e| DbError::from_sqlx(e, acquire_timeout)),
            Err(_) => Err(DbError::BeginAborted),
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
    /// returned. Waits for that at most `deadline`.
    pub async fn close(&self, deadline: Duration) -> Result<(), DbError> {
        let inner = &self.inner;
        let both = async {
            match inner.analytics.pool() {
                Some(analytics) => {
                    tokio::join!(inner.primary.close(), analytics.close());
                }
                None => inner.primary.close().await,
            }
        };
        tokio::time::timeout(deadline, both)
            .await
            .map_err(|_| DbError::CloseTimeout(deadline))?;
        tracing::info!("database pools closed");
        Ok(())
    }
}
