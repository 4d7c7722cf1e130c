//! The analytics read pool: created on first use, shared by concurrent first callers, and
//! never cached as failed.
//!
//! The first initialisation runs inline through `tokio::sync::OnceCell::get_or_try_init`:
//! concurrent first callers share one attempt (bounded by the acquire timeout), there is no
//! lock on the fast path once the pool is set, and a cancelled attempt leaves the cell empty
//! for the next caller. Once an attempt has failed, no caller waits for the replica again:
//! callers get the primary at once, and when the [`Backoff`] delay (5 s doubling to 30 s,
//! with jitter) has passed, the next caller starts one attempt in a background task (never
//! more than one in flight). When it succeeds the cell is set and later callers get the
//! replica; so a black-holed replica (accepts TCP, never answers) costs one acquire timeout
//! to the first callers and nothing to anyone afterwards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::OnceCell;
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

pub(crate) struct Analytics {
    url: Option<SecretUrl>,
    application_name: String,
    config: DatabaseConfig,
    counters: Arc<Counters>,
    cell: OnceCell<PgPool>,
    retry: Mutex<Retry>,
    degraded: AtomicBool,
    closed: AtomicBool,
}

/// When the next attempt may start, and whether one is running in the background.
struct Retry {
    backoff: Backoff,
    /// An attempt has failed: from now on attempts run in the background only.
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
            cell: OnceCell::new(),
            retry: Mutex::new(Retry {
                backoff: Backoff::new(config.analytics_retry_initial, config.analytics_retry_max),
                failed: false,
                in_flight: false,
            }),
            degraded: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    pub(crate) fn pool(&self) -> Option<&PgPool> {
        self.cell.get()
    }

    pub(crate) fn source(&self) -> ReadSource {
        if self.cell.get().is_some() {
            ReadSource::Replica
        } else {
            ReadSource::Primary
        }
    }

    /// Stops all further attempts and returns the pool to close, if any. An attempt still
    /// in flight closes its own pool when it finishes.
    pub(crate) fn close(&self) -> Option<&PgPool> {
        self.closed.store(true, Ordering::SeqCst);
        self.cell.get()
    }

    /// The replica pool, creating it if needed; `None` means "use the primary".
    pub(crate) async fn get(self: &Arc<Self>) -> Option<PgPool> {
        let url = self.url.as_ref()?;
        if let Some(pool) = self.cell.get() {
            return Some(pool.clone());
        }
        if self.closed.load(Ordering::SeqCst) {
            return None;
        }
        if !self.lock_retry().failed {
            // The first initialisation: concurrent first callers share this attempt.
            let first = self.cell.get_or_try_init(|| async {
                // Callers queued behind a failed first attempt fall back at once.
                if self.lock_retry().failed {
                    return Err(());
                }
                self.counters
                    .analytics_init_attempts
                    .fetch_add(1, Ordering::Relaxed);
                self.attempt(url).await.ok_or(())
            });
            if let Ok(pool) = first.await {
                let pool = pool.clone();
                self.close_if_closed(&pool).await;
                return Some(pool);
            }
        }
        self.retry_in_background();
        None
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
            let result = this
                .cell
                .get_or_try_init(|| async { this.attempt(url).await.ok_or(()) })
                .await;
            // After `attempt` recorded a failure, so the backoff already holds the next one.
            this.lock_retry().in_flight = false;
            if let Ok(pool) = result {
                this.close_if_closed(pool).await;
            }
        });
    }

    /// One attempt to open the replica pool, bounded by the acquire timeout. A failure is
    /// counted, logged and recorded in the backoff.
    async fn attempt(&self, url: &SecretUrl) -> Option<PgPool> {
        let config = &self.config;
        let connect = crate::pool::connect(config, url, &self.application_name, "analytics");
        let error = match tokio::time::timeout(config.acquire_timeout, connect).await {
            Ok(Ok(pool)) => {
                if self.degraded.swap(false, Ordering::Relaxed) {
                    tracing::info!("analytics replica reachable again; reads go to the replica");
                }
                return Some(pool);
            }
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

    /// A pool that came up after [`Analytics::close`] closes at once.
    async fn close_if_closed(&self, pool: &PgPool) {
        if self.closed.load(Ordering::SeqCst) {
            crate::pool::close(pool).await;
        }
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
    max: Duration,
    current: Duration,
    next_attempt: Option<Instant>,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            max: max.max(initial),
            current: initial,
            next_attempt: None,
        }
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
    use rand::SeedableRng;

    use super::*;

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
