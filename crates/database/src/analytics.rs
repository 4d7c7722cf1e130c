//! The analytics read pool: created on first use, shared by concurrent first callers, and
//! never cached as failed.
//!
//! `tokio::sync::OnceCell::get_or_try_init` gives the shape: one initialisation at a time,
//! no lock on the fast path once set, and a failed or cancelled attempt leaves the cell empty
//! for the next caller. On top of it sits a [`Backoff`]: after a failure, callers get the
//! primary pool at once and no new attempt is made before the backoff delay (5 s doubling to
//! 30 s, with jitter) has passed, so an unreachable replica costs each request nothing.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
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
    cell: OnceCell<PgPool>,
    backoff: Mutex<Backoff>,
    degraded: AtomicBool,
}

impl Analytics {
    pub(crate) fn new(config: &DatabaseConfig, application_name: &str) -> Self {
        Self {
            url: config.analytics_url.clone(),
            application_name: format!("{application_name}-analytics"),
            cell: OnceCell::new(),
            backoff: Mutex::new(Backoff::new(
                config.analytics_retry_initial,
                config.analytics_retry_max,
            )),
            degraded: AtomicBool::new(false),
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

    /// The replica pool, creating it if needed; `None` means "use the primary".
    pub(crate) async fn get(&self, config: &DatabaseConfig, counters: &Counters) -> Option<PgPool> {
        let url = self.url.as_ref()?;
        if let Some(pool) = self.cell.get() {
            return Some(pool.clone());
        }
        let attempt = self.cell.get_or_try_init(|| async {
            // Waiters queued behind a failed attempt land here too: they respect the backoff
            // instead of each trying again.
            if !self.lock_backoff().ready(Instant::now()) {
                return Err(None);
            }
            counters
                .analytics_init_attempts
                .fetch_add(1, Ordering::Relaxed);
            let connect = crate::pool::connect(config, url, &self.application_name, "analytics");
            match tokio::time::timeout(config.acquire_timeout, connect).await {
                Ok(Ok(pool)) => Ok(pool),
                Ok(Err(e)) => Err(Some(e)),
                Err(_) => Err(Some(DbError::AcquireTimeout(config.acquire_timeout))),
            }
        });
        match attempt.await {
            Ok(pool) => {
                if self.degraded.swap(false, Ordering::Relaxed) {
                    tracing::info!("analytics replica reachable again; reads go to the replica");
                }
                Some(pool.clone())
            }
            Err(None) => None,
            Err(Some(error)) => {
                counters
                    .analytics_init_failures
                    .fetch_add(1, Ordering::Relaxed);
                let delay = self.lock_backoff().failed(Instant::now(), &mut rand::rng());
                if !self.degraded.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, retry_in = ?delay, "analytics replica unavailable; reads fall back to the primary");
                } else {
                    tracing::debug!(%error, retry_in = ?delay, "analytics replica still unavailable");
                }
                None
            }
        }
    }

    fn lock_backoff(&self) -> std::sync::MutexGuard<'_, Backoff> {
        // The guarded state is two plain values; a panic elsewhere cannot break it.
        self.backoff.lock().unwrap_or_else(|e| e.into_inner())
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
