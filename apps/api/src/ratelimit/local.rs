//! The in-process limiter (the `governor` crate): the only limiter when `REDIS_URL` is
//! unset, and the fail-open fallback when Redis fails. Each replica allows
//! `limit / replicas`, so the fleet as a whole stays near the configured limit.
//!
//! Unlike the Redis script this is not all-or-nothing across keys: when the per-key quota
//! allows a request and the per-IP quota refuses it, the per-key unit is spent. That
//! imprecision only exists while running on the fallback.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use super::redis::KeyState;

type Keyed =
    RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

/// One keyed GCRA limiter per policy.
pub(crate) struct LocalLimiter {
    limiters: Vec<(Keyed, u32)>,
    period: Duration,
    clock: DefaultClock,
}

impl LocalLimiter {
    /// `limits[i]` is the fleet-wide limit of policy `i`; each gets `limit / replicas`.
    pub(crate) fn new(limits: &[u32], period: Duration, replicas: u32) -> Self {
        let limiters = limits
            .iter()
            .map(|&limit| {
                let local = (limit / replicas.max(1)).max(1);
                let burst = NonZeroU32::new(local).unwrap_or(NonZeroU32::MIN);
                let quota = Quota::with_period(period / local)
                    .unwrap_or_else(|| Quota::per_second(burst))
                    .allow_burst(burst);
                (RateLimiter::keyed(quota).with_middleware(), local)
            })
            .collect();
        Self {
            limiters,
            period,
            clock: DefaultClock::default(),
        }
    }

    /// The per-replica limit of policy `index`.
    pub(crate) fn limit(&self, index: usize) -> u32 {
        self.limiters.get(index).map_or(0, |(_, limit)| *limit)
    }

    /// Checks `keys[i]` against policy `i` (a `None` key skips that policy).
    pub(crate) fn check(&self, keys: &[Option<&str>]) -> (bool, Vec<Option<KeyState>>) {
        let mut allowed = true;
        let mut states = Vec::with_capacity(keys.len());
        for ((limiter, limit), key) in self.limiters.iter().zip(keys) {
            let Some(key) = key else {
                states.push(None);
                continue;
            };
            let interval = self.period / *limit;
            if !allowed {
                states.push(Some(KeyState {
                    remaining: 0,
                    reset_ms: millis(self.period),
                    retry_ms: 0,
                }));
                continue;
            }
            match limiter.check_key(&(*key).to_owned()) {
                Ok(snapshot) => {
                    let remaining = snapshot.remaining_burst_capacity();
                    let used = limit.saturating_sub(remaining);
                    states.push(Some(KeyState {
                        remaining: u64::from(remaining),
                        reset_ms: millis(interval * used),
                        retry_ms: 0,
                    }));
                }
                Err(not_until) => {
                    allowed = false;
                    let wait = not_until.wait_time_from(self.clock.now());
                    states.push(Some(KeyState {
                        remaining: 0,
                        reset_ms: millis(interval * *limit),
                        retry_ms: millis(wait).max(1),
                    }));
                }
            }
        }
        (allowed, states)
    }

    /// Forgets keys that are fully replenished (bounded memory).
    pub(crate) fn retain_recent(&self) {
        for (limiter, _) in &self.limiters {
            limiter.retain_recent();
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn divides_the_limit_by_replicas_and_limits_per_key() {
        let limiter = LocalLimiter::new(&[10, 100], Duration::from_secs(60), 2);
        assert_eq!(limiter.limit(0), 5);
        for i in 0..5 {
            let (allowed, states) = limiter.check(&[Some("k1"), Some("ip")]);
            assert!(allowed, "request {i}");
            assert_eq!(states[0].unwrap().remaining, 4 - i);
        }
        let (allowed, states) = limiter.check(&[Some("k1"), Some("ip")]);
        assert!(!allowed);
        assert!(states[0].unwrap().retry_ms > 0);
        // Another key has its own quota.
        assert!(limiter.check(&[Some("k2"), Some("ip")]).0);
        // No key: only the IP policy applies.
        let (allowed, states) = limiter.check(&[None, Some("ip")]);
        assert!(allowed);
        assert!(states[0].is_none());
    }
}
