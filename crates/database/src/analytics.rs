//! The analytics read pool: created on first use, shared by concurrent first callers, never
//! cached as failed, and dropped again when the replica stops answering.
//!
//! The first initialisation runs inline: concurrent first callers queue behind one attempt
//! (bounded by the acquire timeout), there is no lock on the fast path once the pool is
//! set, and a cancelled attempt leaves the way free for the next caller. Once an attempt has
//! failed, no caller waits for the replica again: callers get the primary at once, and when
//! the [`Backoff`] delay (5 s doubling to 30 s, with jitter) has passed, the next caller
//! starts one attempt in a background task (never more than one in flight). When it
//! succeeds later callers get the replica; so a black-holed replica (accepts TCP, never
//! answers) costs one acquire timeout to the first callers and nothing to anyone afterwards.
//!
//! A replica in use is dropped (reads fall back to the primary, and the backoff and its
//! background retries start again) after [`REPLICA_ERRORS`] consecutive connection failures
//! of `Database::run_analytics` on it, or at once when the health ping, every
//! `analytics_ping_interval`, fails; so `read_source` (and the api's `/readyz` and
//! `db_analytics_replica_in_use`) stops saying "replica" even without traffic.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use sqlx::PgPool;
use tokio::time::Instant;

use crate::config::SecretUrl;
use crate::metrics::Counters;
use crate::{DatabaseConfig, DbError};

/// Which pool serves analytics reads right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadSource {
    /// The `ANALYTICS_DB_URL` replica.
    Replica,
    /// The primary: no replica configured, or the replica is unavailable.
    Primary,
}

impl ReadSource {
    /// `"replica"` or `"primary"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Replica => "replica",
            Self::Primary => "primary",
        }
    }
}

/// Consecutive connection failures (acquire or query timeouts, I/O and protocol errors; not
/// SQL errors) of analytics reads on the replica after which it is dropped.
pub const REPLICA_ERRORS: u32 = 3;

pub(crate) struct Analytics {
    url: Option<SecretUrl>,
    application_name: String,
    config: DatabaseConfig,
    counters: Arc<Counters>,
    /// The replica serving reads now, with its generation; `None`: the primary serves them.
    replica: RwLock<Option<(u64, PgPool)>>,
    generation: AtomicU64,
    /// Held by the inline first attempt: concurrent first callers queue behind it.
    first: tokio::sync::Mutex<()>,
    retry: Mutex<Retry>,
    /// Consecutive connection failures on the current replica: `(generation, count)`. Keyed
    /// by generation so a read still in flight on a dropped replica neither adds to nor
    /// resets the count of the one installed after it.
    errors: Mutex<(u64, u32)>,
    degraded: AtomicBool,
    closed: AtomicBool,
}

/// When the next attempt may start, and whether one is running in the background.
struct Retry {
    backoff: Backoff,
    /// An attempt has failed (or the replica was dropped): from now on attempts run in the
    /// background only.
    failed: bool,
    in_flight: bool,
}

impl Analytics {
    pub(crate) fn new(
        config: &DatabaseConfig,
        application_name: &str,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            url: config.analytics_url.clone(),
            application_name: format!("{application_name}-analytics"),
            config: config.clone(),
            counters,
            replica: RwLock::new(None),
            generation: AtomicU64::new(0),
            first: tokio::sync::Mutex::new(()),
            retry: Mutex::new(Retry {
                backoff: Backoff::new(config.analytics_retry_initial, config.analytics_retry_max),
                failed: false,
                in_flight: false,
            }),
            errors: Mutex::new((0, 0)),
            degraded: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    /// The replica pool in use, if any.
    pub(crate) fn pool(&self) -> Option<PgPool> {
        self.current().map(|(_, pool)| pool)
    }

    pub(crate) fn source(&self) -> ReadSource {
        if self.current().is_some() {
            ReadSource::Replica
        } else {
            ReadSource::Primary
        }
    }

    /// Stops all further attempts and returns the pool to close, if any. An attempt still
    /// in flight closes its own pool when it finishes.
    pub(crate) fn close(&self) -> Option<PgPool> {
        self.closed.store(true, Ordering::SeqCst);
        self.write_replica().take().map(|(_, pool)| pool)
    }

    /// The replica pool and its generation, creating it if needed; `None` means "use the
    /// primary".
    pub(crate) async fn get(self: &Arc<Self>) -> Option<(u64, PgPool)> {
        let url = self.url.as_ref()?;
        if let Some(current) = self.current() {
            return Some(current);
        }
        if self.closed.load(Ordering::SeqCst) {
            return None;
        }
        if !self.lock_retry().failed {
            // The first initialisation: concurrent first callers queue here and find its
            // result; a caller cancelled mid-attempt leaves it to the next one.
            let _first = self.first.lock().await;
            if let Some(current) = self.current() {
                return Some(current);
            }
            // Callers queued behind a failed first attempt fall back at once.
            if !self.lock_retry().failed {
                self.counters
                    .analytics_init_attempts
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(pool) = self.attempt(url).await {
                    return self.install(pool).await;
                }
            }
        }
        self.retry_in_background();
        None
    }

    /// Records the outcome of a read on replica generation `generation`: success resets the
    /// failure count, a connection failure adds to it and drops the replica at
    /// [`REPLICA_ERRORS`].
    pub(crate) fn record<T>(self: &Arc<Self>, generation: u64, result: &Result<T, DbError>) {
        match result {
            Ok(_) => {
                let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
                if errors.0 == generation {
                    errors.1 = 0;
                }
            }
            Err(error) => self.record_error(generation, error),
        }
    }

    /// [`Self::record`] of a failure (also one in the middle of a snapshot's stream).
    pub(crate) fn record_error(self: &Arc<Self>, generation: u64, error: &DbError) {
        let n = {
            let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
            if errors.0 != generation {
                // A read on a replica dropped since: it says nothing about the current one.
                return;
            }
            if !error.is_connection_failure() {
                return;
            }
            errors.1 += 1;
            errors.1
        };
        if n >= REPLICA_ERRORS {
            self.drop_replica(generation, &format!("{n} consecutive failures"), error);
        }
    }

    fn current(&self) -> Option<(u64, PgPool)> {
        self.replica
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn write_replica(&self) -> std::sync::RwLockWriteGuard<'_, Option<(u64, PgPool)>> {
        self.replica.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `pool` the replica in use and starts its health ping; a pool that comes up
    /// after [`Analytics::close`] closes at once instead.
    async fn install(self: &Arc<Self>, pool: PgPool) -> Option<(u64, PgPool)> {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        // Before the replica is visible, so its first reads are counted against it.
        *self.errors.lock().unwrap_or_else(|e| e.into_inner()) = (generation, 0);
        *self.write_replica() = Some((generation, pool.clone()));
        // After the write: `close` sets `closed` before it takes the slot, so one of the
        // two sees the other.
        if self.closed.load(Ordering::SeqCst) {
            let taken = self.write_replica().take();
            if let Some((_, pool)) = taken {
                crate::pool::close(&pool).await;
            }
            return None;
        }
        self.lock_retry().backoff.reset();
        if self.degraded.swap(false, Ordering::Relaxed) {
            tracing::info!("analytics replica reachable again; reads go to the replica");
        }
        self.watch(generation, pool.clone());
        Some((generation, pool))
    }

    /// Pings replica generation `generation` every `analytics_ping_interval` while it is in
    /// use; one failed ping drops it.
    fn watch(self: &Arc<Self>, generation: u64, pool: PgPool) {
        let this: Weak<Self> = Arc::downgrade(self);
        let interval = self.config.analytics_ping_interval;
        let bound = self.config.acquire_timeout;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(this) = this.upgrade() else { return };
                if this.current().is_none_or(|(g, _)| g != generation) {
                    return;
                }
                let ping = crate::run_on(&this.counters, bound, &pool, bound, async |conn| {
                    sqlx::query("SELECT 1").execute(conn).await.map(|_| ())
                })
                .await;
                if let Err(error) = ping {
                    this.drop_replica(generation, "health ping failed", &error);
                    return;
                }
            }
        });
    }

    /// Stops using replica generation `generation` (if still in use): reads go to the
    /// primary and the backoff decides when a background attempt reconnects.
    fn drop_replica(self: &Arc<Self>, generation: u64, reason: &str, error: &DbError) {
        let dropped = {
            let mut slot = self.write_replica();
            match &*slot {
                Some((g, _)) if *g == generation => slot.take(),
                _ => None,
            }
        };
        let Some((_, pool)) = dropped else { return };
        self.counters
            .analytics_replica_drops
            .fetch_add(1, Ordering::Relaxed);
        let delay = {
            let mut retry = self.lock_retry();
            retry.failed = true;
            retry.backoff.failed(Instant::now(), &mut rand::rng())
        };
        self.degraded.store(true, Ordering::Relaxed);
        tracing::warn!(%error, reason, retry_in = ?delay, "analytics replica dropped; reads fall back to the primary");
        let bound = self.config.acquire_timeout;
        tokio::spawn(async move {
            // Connections still checked out close as their readers give up; do not wait
            // for them longer than an acquire.
            let _ = tokio::time::timeout(bound, crate::pool::close(&pool)).await;
        });
    }

    /// Starts one background attempt if the backoff allows it and none is in flight.
    fn retry_in_background(self: &Arc<Self>) {
        {
            let mut retry = self.lock_retry();
            if retry.in_flight || !retry.backoff.ready(Instant::now()) {
                return;
            }
            retry.in_flight = true;
        }
        // Counted before the caller gets its answer: the attempt has started.
        self.counters
            .analytics_init_attempts
            .fetch_add(1, Ordering::Relaxed);
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let Some(url) = this.url.as_ref() else {
                return;
            };
            let pool = this.attempt(url).await;
            if let Some(pool) = pool {
                this.install(pool).await;
            }
            // After `attempt` recorded a failure, so the backoff already holds the next one.
            this.lock_retry().in_flight = false;
        });
    }

    /// One attempt to open the replica pool and check its session settings, bounded by the
    /// acquire timeout. A failure is counted, logged and recorded in the backoff.
    async fn attempt(&self, url: &SecretUrl) -> Option<PgPool> {
        let config = &self.config;
        let connect = async {
            crate::pool::check_settings(config, url, &self.application_name, "analytics").await?;
            let counters = Arc::clone(&self.counters);
            crate::pool::connect(config, url, &self.application_name, "analytics", counters).await
        };
        let error = match tokio::time::timeout(config.acquire_timeout, connect).await {
            Ok(Ok(pool)) => return Some(pool),
            Ok(Err(e)) => e,
            Err(_) => DbError::AcquireTimeout(config.acquire_timeout),
        };
        self.counters
            .analytics_init_failures
            .fetch_add(1, Ordering::Relaxed);
        let delay = {
            let mut retry = self.lock_retry();
            retry.failed = true;
            retry.backoff.failed(Instant::now(), &mut rand::rng())
        };
        if !self.degraded.swap(true, Ordering::Relaxed) {
            tracing::warn!(%error, retry_in = ?delay, "analytics replica unavailable; reads fall back to the primary");
        } else {
            tracing::debug!(%error, retry_in = ?delay, "analytics replica still unavailable");
        }
        None
    }

    fn lock_retry(&self) -> std::sync::MutexGuard<'_, Retry> {
        // The guarded state is plain values; a panic elsewhere cannot break it.
        self.retry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Exponential backoff with jitter between attempts: the `n`th delay is drawn from
/// `[d/2, d]` with `d = min(initial * 2^n, max)`.
#[derive(Debug)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    next_attempt: Option<Instant>,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            current: initial,
            next_attempt: None,
        }
    }

    /// Back to the first delay, and no wait (after a success).
    pub(crate) fn reset(&mut self) {
        self.current = self.initial;
        self.next_attempt = None;
    }

    /// May an attempt start at `now`?
    pub(crate) fn ready(&self, now: Instant) -> bool {
        self.next_attempt.is_none_or(|at| now >= at)
    }

    /// Records a failure at `now`; returns the delay before the next attempt.
    pub(crate) fn failed(&mut self, now: Instant, rng: &mut impl rand::Rng) -> Duration {
        let ceiling = self.current;
        let delay = ceiling.mul_f64(rng.random_range(0.5..=1.0));
        self.next_attempt = Some(now + delay);
        self.current = (self.current * 2).min(self.max);
        delay
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use rand::SeedableRng;

    use super::*;

    /// A replica with no server behind it (never connected to in this test).
    fn lazy_pool() -> PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap()
    }

    /// Reads that were in flight on a dropped replica and fail afterwards must not count
    /// against the replica installed after it: before, they shared one counter, and two
    /// stale failures plus one real one dropped a healthy new replica.
    #[tokio::test]
    async fn failures_of_a_dropped_replica_do_not_count_against_the_next_one() {
        let mut config = DatabaseConfig::new("postgres://nobody@127.0.0.1:1/none").unwrap();
        config.analytics_url =
            Some(SecretUrl::parse("ANALYTICS_DB_URL", "postgres://nobody@127.0.0.1:1/r").unwrap());
        // No health ping during the test: the pools here have no server.
        config.analytics_ping_interval = Duration::from_secs(3600);
        let analytics = Arc::new(Analytics::new(&config, "t", Arc::default()));
        let timeout: Result<(), DbError> = Err(DbError::QueryTimeout(Duration::from_secs(1)));

        let (old, _) = analytics.install(lazy_pool()).await.unwrap();
        for _ in 0..REPLICA_ERRORS {
            analytics.record(old, &timeout);
        }
        assert_eq!(
            analytics.source(),
            ReadSource::Primary,
            "dropped at the limit"
        );
        let (new, _) = analytics.install(lazy_pool()).await.unwrap();
        assert_ne!(new, old);
        for _ in 0..REPLICA_ERRORS {
            analytics.record(old, &timeout);
        }
        for _ in 0..REPLICA_ERRORS - 1 {
            analytics.record(new, &timeout);
        }
        assert_eq!(
            analytics.source(),
            ReadSource::Replica,
            "stale failures ignored"
        );
        analytics.record(new, &timeout);
        assert_eq!(analytics.source(), ReadSource::Primary);
    }

    #[test]
    fn delays_double_from_initial_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(30));
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let now = Instant::now();
        let ceilings = [5, 10, 20, 30, 30, 30];
        for ceiling in ceilings {
            let ceiling = Duration::from_secs(ceiling);
            let delay = backoff.failed(now, &mut rng);
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "{delay:?} vs {ceiling:?}"
            );
            assert!(!backoff.ready(now + delay - Duration::from_millis(1)));
            assert!(backoff.ready(now + delay));
        }
    }
}
