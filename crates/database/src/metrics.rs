//! Pool and query figures, read as a plain struct (the api renders them on `/metrics`).
//!
//! Connection counts come from sqlx's pool; the counters below are kept by [`crate::Database`]
//! and count what goes through its methods: every connection checked out (`acquire`, `run`,
//! `run_analytics`, `begin`, `ping`, on either pool) counts as an acquire, with its latency
//! in a histogram; every statement run through `run`, `run_analytics` and [`crate::Tx`]
//! counts its errors and timeouts. Only queries run straight on
//! [`crate::Database::primary`] (migrations, tools) are not counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
    /// Callers waiting for a connection right now (in any method that checks one out).
    pub waiters: u64,
    /// Successful acquires.
    pub acquires_total: u64,
    /// Sum of acquire latencies, in seconds (divide by `acquires_total` for the mean).
    pub acquire_seconds_sum: f64,
    /// The acquire latency histogram: for each upper bound of [`ACQUIRE_BUCKETS`] (seconds),
    /// how many successful acquires took at most that long (cumulative, as Prometheus
    /// buckets are; the `+Inf` bucket is `acquires_total`).
    pub acquire_seconds_buckets: Vec<(f64, u64)>,
    /// Acquires that hit the acquire timeout.
    pub acquire_timeouts_total: u64,
    /// Queries (and `BEGIN`s) that failed, timeouts included.
    pub query_errors_total: u64,
    /// Queries that hit the server's statement timeout or the client-side bound.
    pub query_timeouts_total: u64,
    /// Attempts to create the analytics pool.
    pub analytics_init_attempts_total: u64,
    /// Failed attempts to create the analytics pool.
    pub analytics_init_failures_total: u64,
    /// Times the replica in use was dropped (reads fell back to the primary).
    pub analytics_replica_drops_total: u64,
}

/// Upper bounds, in seconds, of the acquire latency histogram's buckets.
pub const ACQUIRE_BUCKETS: [f64; 10] = [
    0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
];

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) waiters: AtomicU64,
    pub(crate) acquires: AtomicU64,
    pub(crate) acquire_micros: AtomicU64,
    /// Per bucket of [`ACQUIRE_BUCKETS`], acquires that fell in it (not cumulative).
    acquire_buckets: [AtomicU64; ACQUIRE_BUCKETS.len()],
    pub(crate) acquire_timeouts: AtomicU64,
    /// Connections that came back to a pool with their release ping answered: the
    /// progress that tells a saturated pool from an unreachable database
    /// ([`crate::DbError::PoolSaturated`]).
    pub(crate) releases: AtomicU64,
    pub(crate) query_errors: AtomicU64,
    pub(crate) query_timeouts: AtomicU64,
    pub(crate) analytics_init_attempts: AtomicU64,
    pub(crate) analytics_init_failures: AtomicU64,
    pub(crate) analytics_replica_drops: AtomicU64,
}

impl Counters {
    /// Counts one successful acquire that took `latency`.
    pub(crate) fn record_acquire(&self, latency: Duration) {
        self.acquires.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.acquire_micros.fetch_add(micros, Ordering::Relaxed);
        let seconds = latency.as_secs_f64();
        if let Some(i) = ACQUIRE_BUCKETS.iter().position(|&le| seconds <= le) {
            self.acquire_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a failed query (and a timed-out one: server statement timeout or the
    /// client-side bound); returns the error.
    pub(crate) fn count_query_error(&self, error: crate::DbError) -> crate::DbError {
        self.query_errors.fetch_add(1, Ordering::Relaxed);
        if matches!(
            error,
            crate::DbError::QueryTimeout(_) | crate::DbError::StatementTimeout(_)
        ) {
            self.query_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        error
    }

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
            acquire_seconds_buckets: ACQUIRE_BUCKETS
                .iter()
                .zip(&self.acquire_buckets)
                .scan(0, |sum, (&le, n)| {
                    *sum += get(n);
                    Some((le, *sum))
                })
                .collect(),
            acquire_timeouts_total: get(&self.acquire_timeouts),
            query_errors_total: get(&self.query_errors),
            query_timeouts_total: get(&self.query_timeouts),
            analytics_init_attempts_total: get(&self.analytics_init_attempts),
            analytics_init_failures_total: get(&self.analytics_init_failures),
            analytics_replica_drops_total: get(&self.analytics_replica_drops),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_is_cumulative_and_ends_below_the_total() {
        let counters = Counters::default();
        for micros in [50, 50, 700, 20_000, 7_000_000] {
            counters.record_acquire(Duration::from_micros(micros));
        }
        let stats = PoolStats {
            size: 0,
            idle: 0,
            in_use: 0,
            max: 1,
        };
        let m = counters.snapshot(stats, None, ReadSource::Primary);
        let counts: Vec<u64> = m.acquire_seconds_buckets.iter().map(|b| b.1).collect();
        assert_eq!(counts, [2, 2, 3, 3, 3, 4, 4, 4, 4, 4]);
        // The 7 s acquire is only in +Inf, i.e. the total.
        assert_eq!(m.acquires_total, 5);
    }
}
