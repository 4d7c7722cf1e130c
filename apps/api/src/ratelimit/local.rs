//! The in-process limiter (the `governor` crate): the only limiter when `REDIS_URL` is
//! unset, and the fail-open fallback when Redis fails. Each replica allows
//! `limit / replicas`, so the fleet as a whole stays near the configured limit.
//!
//! Unlike the Redis script this is not all-or-nothing across keys: the policies are checked
//! in order and the first that refuses ends the check, so a unit spent on an earlier policy
//! stays spent, and the later policies are not consulted (their state is unknown and left
//! out of the `RateLimit` field). That imprecision only exists while running on the
//! fallback.

use std::cell::Cell;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::{NoOpMiddleware, StateInformationMiddleware};
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::{DefaultKeyedStateStore, ShrinkableKeyedStateStore};
use governor::{Quota, RateLimiter};

use super::redis::KeyState;

type Keyed = RateLimiter<String, Observed<String>, DefaultClock, StateInformationMiddleware>;

/// What one policy said about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PolicyCheck {
    /// No key for this policy (e.g. no API key presented): it does not apply.
    NotApplicable,
    /// An earlier policy refused, so this one was not consulted.
    NotConsulted,
    /// Checked (and, if allowed, a unit spent).
    Checked(KeyState),
}

/// One keyed GCRA limiter per policy.
pub(crate) struct LocalLimiter {
    limiters: Vec<Policy>,
    clock: DefaultClock,
}

struct Policy {
    limiter: Keyed,
    /// Per-replica limit: the burst.
    limit: u32,
    /// Emission interval: one unit comes back every `interval`.
    interval: Duration,
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
                Policy {
                    limiter: RateLimiter::<_, _, _, NoOpMiddleware<_>>::new(
                        quota,
                        Observed(DefaultKeyedStateStore::default()),
                        DefaultClock::default(),
                    )
                    .with_middleware(),
                    limit: local,
                    interval: quota.replenish_interval(),
                }
            })
            .collect();
        Self {
            limiters,
            clock: DefaultClock::default(),
        }
    }

    /// The per-replica limit of policy `index`.
    pub(crate) fn limit(&self, index: usize) -> u32 {
        self.limiters.get(index).map_or(0, |p| p.limit)
    }

    /// Checks `keys[i]` against policy `i` (a `None` key skips that policy), in order,
    /// stopping at the first policy that refuses.
    pub(crate) fn check(&self, keys: &[Option<&str>]) -> (bool, Vec<PolicyCheck>) {
        let mut allowed = true;
        let mut checks = Vec::with_capacity(keys.len());
        for (policy, key) in self.limiters.iter().zip(keys) {
            let Some(key) = key else {
                checks.push(PolicyCheck::NotApplicable);
                continue;
            };
            if !allowed {
                checks.push(PolicyCheck::NotConsulted);
                continue;
            }
            MEASURED.set(None);
            match policy.limiter.check_key(&(*key).to_owned()) {
                Ok(snapshot) => {
                    let remaining = snapshot.remaining_burst_capacity();
                    let next = MEASURED
                        .take()
                        .map_or(policy.interval, |m| policy.next_unit(m, remaining));
                    checks.push(PolicyCheck::Checked(KeyState {
                        remaining: u64::from(remaining),
                        next_ms: millis_ceil(next),
                        retry_ms: 0,
                    }));
                }
                Err(not_until) => {
                    allowed = false;
                    let retry = millis_ceil(not_until.wait_time_from(self.clock.now())).max(1);
                    checks.push(PolicyCheck::Checked(KeyState {
                        remaining: 0,
                        next_ms: retry,
                        retry_ms: retry,
                    }));
                }
            }
        }
        (allowed, checks)
    }

    /// Forgets keys that are fully replenished (bounded memory).
    pub(crate) fn retain_recent(&self) {
        for policy in &self.limiters {
            policy.limiter.retain_recent();
        }
    }
}

impl Policy {
    /// Time until the next unit comes back after an allowed check that left `remaining`
    /// units; zero when the quota is full (nothing to come back).
    fn next_unit(&self, measured: Measured, remaining: u32) -> Duration {
        if remaining >= self.limit {
            return Duration::ZERO;
        }
        let t = self.interval.as_nanos();
        let capacity = t * u128::from(self.limit);
        // Units available now are floor(x / t) with x = now + capacity - tat.
        let x = (u128::from(measured.now_plus_t) + capacity)
            .saturating_sub(t)
            .saturating_sub(u128::from(measured.tat));
        let next = (u128::from(remaining) + 1) * t;
        Duration::from_nanos(u64::try_from(next.saturating_sub(x)).unwrap_or(u64::MAX))
    }
}

/// What governor computed in the last allowed check on this thread, in nanoseconds since
/// the limiter's start: `now + t` and the new theoretical arrival time.
#[derive(Debug, Clone, Copy)]
struct Measured {
    now_plus_t: u64,
    tat: u64,
}

thread_local! {
    static MEASURED: Cell<Option<Measured>> = const { Cell::new(None) };
}

/// governor's default keyed store, noting what each allowed check computed (governor keeps
/// the theoretical arrival time and its `now` private, and the time until the next unit
/// comes back needs both). For a key it has not seen, governor's closure starts from
/// `tat = now` and allows, storing `now + t`: so calling it on `None` (pure: nothing is
/// stored) yields `now + t`.
pub(crate) struct Observed<K: Hash + Eq + Clone>(DefaultKeyedStateStore<K>);

impl<K: Hash + Eq + Clone> StateStore for Observed<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let now_plus_t = f(None).ok().map(|(_, next)| next.as_u64());
        self.0.measure_and_replace(key, |previous| {
            let result = f(previous);
            if let (Ok((_, tat)), Some(now_plus_t)) = (&result, now_plus_t) {
                MEASURED.set(Some(Measured {
                    now_plus_t,
                    tat: tat.as_u64(),
                }));
            }
            result
        })
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for Observed<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        self.0.retain_recent(drop_below);
    }

    fn shrink_to_fit(&self) {
        self.0.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn millis_ceil(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn checked(check: PolicyCheck) -> KeyState {
        match check {
            PolicyCheck::Checked(state) => state,
            other => panic!("not checked: {other:?}"),
        }
    }

    #[test]
    fn divides_the_limit_by_replicas_and_limits_per_key() {
        let limiter = LocalLimiter::new(&[10, 100], Duration::from_secs(60), 2);
        assert_eq!(limiter.limit(0), 5);
        for i in 0..5 {
            let (allowed, checks) = limiter.check(&[Some("k1"), Some("ip")]);
            assert!(allowed, "request {i}");
            assert_eq!(checked(checks[0]).remaining, 4 - i);
        }
        let (allowed, checks) = limiter.check(&[Some("k1"), Some("ip")]);
        assert!(!allowed);
        assert!(checked(checks[0]).retry_ms > 0);
        // Another key has its own quota.
        assert!(limiter.check(&[Some("k2"), Some("ip")]).0);
        // No key: only the IP policy applies.
        let (allowed, checks) = limiter.check(&[None, Some("ip")]);
        assert!(allowed);
        assert_eq!(checks[0], PolicyCheck::NotApplicable);
    }

    #[test]
    fn t_is_the_time_to_the_next_unit_and_equals_the_retry_when_exhausted() {
        // 3 per 60 s: one unit every 20 s. The first request of a burst leaves 2 and the
        // spent unit comes back in 20 s (not 60 s: that would be full restoration).
        let limiter = LocalLimiter::new(&[3, 1000], Duration::from_secs(60), 1);
        let (_, checks) = limiter.check(&[Some("k"), Some("ip")]);
        let first = checked(checks[0]);
        assert_eq!(first.remaining, 2);
        assert!(
            (19_990..=20_000).contains(&first.next_ms),
            "{}",
            first.next_ms
        );
        for _ in 0..2 {
            assert!(limiter.check(&[Some("k"), Some("ip")]).0);
        }
        // Exhausted: t is the retry time (the first unit is back 20 s after it was spent).
        let (allowed, checks) = limiter.check(&[Some("k"), Some("ip")]);
        assert!(!allowed);
        let key = checked(checks[0]);
        assert_eq!(key.remaining, 0);
        assert_eq!(key.next_ms, key.retry_ms);
        assert!(
            (15_000..=20_000).contains(&key.retry_ms),
            "{}",
            key.retry_ms
        );
        // The IP policy was not consulted (the key policy refused first): no state for it.
        assert_eq!(checks[1], PolicyCheck::NotConsulted);
    }
}
