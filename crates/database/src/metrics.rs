//! Pool and query figures, read as a plain struct (the api renders them on `/metrics`).
//!
//! Connection counts come from sqlx's pool; the counters below are kept by [`crate::Database`]
//! and count what goes through its methods: `acquire`; `bounded`; `begin`, whose connection
//! counts like an `acquire` and whose `BEGIN` like a `bounded` query. Queries run straight
//! on [`crate::Database::primary`] are not counted.

use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::PgPool;

use crate::ReadSource;

/// Connection counts of one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Open connections (idle plus in use).
    pub size: u32,
    /// Open connections waiting in the pool.
    pub idle: u32,
    /// Connections checked out.
    pub in_use: u32,
    /// The configured maximum.
    pub max: u32,
}

impl PoolStats {
    pub(crate) fn of(pool: &PgPool) -> Self {
        let size = pool.size();
        let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX).min(size);
        Self {
            size,
            idle,
            in_use: size - idle,
            max: pool.options().get_max_connections(),
        }
    }
}

/// A snapshot of the database layer's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolMetrics {
    /// The primary pool.
    pub primary: PoolStats,
    /// The analytics replica pool, once created.
    pub analytics: Option<PoolStats>,
    /// Which pool serves analytics reads.
    pub read_source: ReadSource,
    /// Callers waiting for a connection right now (in `acquire` or `begin`).
    pub waiters: u64,
    /// Successful acquires.
    pub acquires_total: u64,
    /// Sum of acquire latencies, in seconds (divide by `acquires_total` for the mean).
    pub acquire_seconds_sum: f64,
    /// Acquires that hit the acquire timeout (in `acquire`, `begin`, or inside `bounded`).
    pub acquire_timeouts_total: u64,
    /// Queries (and `BEGIN`s) that failed, timeouts included.
    pub query_errors_total: u64,
    /// Queries that hit the server's statement timeout or the client-side bound.
    pub query_timeouts_total: u64,
    /// Attempts to create the analytics pool.
    pub analytics_init_attempts_total: u64,
    /// Failed attempts to create the analytics pool.
    pub analytics_init_failures_total: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) waiters: AtomicU64,
    pub(crate) acquires: AtomicU64,
    pub(crate) acquire_micros: AtomicU64,
    pub(crate) acquire_timeouts: AtomicU64,
    pub(crate) query_errors: AtomicU64,
    pub(crate) query_timeouts: AtomicU64,
    pub(crate) analytics_init_attempts: AtomicU64,
    pub(crate) analytics_init_failures: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(
        &self,
        primary: PoolStats,
        analytics: Option<PoolStats>,
        read_source: ReadSource,
    ) -> PoolMetrics {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PoolMetrics {
            primary,
            analytics,
            read_source,
            waiters: get(&self.waiters),
            acquires_total: get(&self.acquires),
            acquire_seconds_sum: get(&self.acquire_micros) as f64 / 1e6,
            acquire_timeouts_total: get(&self.acquire_timeouts),
            query_errors_total: get(&self.query_errors),
            query_timeouts_total: get(&self.query_timeouts),
            analytics_init_attempts_total: get(&self.analytics_init_attempts),
            analytics_init_failures_total: get(&self.analytics_init_failures),
        }
    }
}
