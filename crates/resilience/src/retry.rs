//! Retries that do not storm: `RetryPolicy` (capped exponential backoff with
//! full jitter, max attempts, a total time budget, Retry-After honoured and
//! clamped) and `RetryBudget` (process-wide: retries limited to a share of
//! recent requests plus a small floor, like tower's `TpsBudget`).
//!
//! Both are usable from an external loop: call [`RetryBudget::deposit`] once
//! per logical request, and before each retry ask
//! [`RetryPolicy::next_delay`] and then [`RetryBudget::try_withdraw`].

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rand::Rng;

use crate::clock::{SharedClock, SystemClock, duration_nanos};

/// How often and how patiently to retry one logical call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (1 = never retry).
    pub max_attempts: u32,
    /// Ceiling of the first retry's delay; doubles per retry.
    pub base_delay: Duration,
    /// Largest backoff ceiling.
    pub max_delay: Duration,
    /// Total time budget measured from the first attempt: no retry is
    /// scheduled whose delay would end beyond it.
    pub max_elapsed: Duration,
    /// A server's Retry-After is honoured but clamped to this.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    /// 3 attempts, 100 ms base, 5 s cap, 30 s budget, Retry-After up to 30 s.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub const fn never() -> Self {
        Self {
            max_attempts: 1,
            base_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
            max_elapsed: Duration::MAX,
            max_retry_after: Duration::ZERO,
        }
    }

    /// The backoff ceiling before retry number `retry` (1 for the first
    /// retry): `min(max_delay, base_delay * 2^(retry-1))`. Full jitter draws
    /// the actual delay uniformly from `[0, ceiling]`.
    pub fn backoff_ceiling(&self, retry: u32) -> Duration {
        let factor = 2u32
            .checked_pow(retry.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }

    /// The delay before the next attempt after `attempts_made` attempts
    /// (1 after the first), or `None` to stop: attempts used up, or the delay
    /// would end past `max_elapsed` (`elapsed` is the time since the first
    /// attempt began). With `retry_after` the delay is that value clamped to
    /// `max_retry_after`; otherwise full jitter. Uses the thread-local RNG.
    pub fn next_delay(
        &self,
        attempts_made: u32,
        retry_after: Option<Duration>,
        elapsed: Duration,
    ) -> Option<Duration> {
        self.next_delay_with(attempts_made, retry_after, elapsed, &mut rand::rng())
    }

    /// [`next_delay`](Self::next_delay) with a caller-supplied RNG (seed it
    /// for reproducible tests).
    pub fn next_delay_with<R: Rng + ?Sized>(
        &self,
        attempts_made: u32,
        retry_after: Option<Duration>,
        elapsed: Duration,
        rng: &mut R,
    ) -> Option<Duration> {
        if attempts_made >= self.max_attempts {
            return None;
        }
        let delay = match retry_after {
            Some(hint) => hint.min(self.max_retry_after),
            None => {
                let ceiling = duration_nanos(self.backoff_ceiling(attempts_made));
                Duration::from_nanos(rng.random_range(0..=ceiling))
            }
        };
        (elapsed.saturating_add(delay) <= self.max_elapsed).then_some(delay)
    }
}

/// Bounds of a [`RetryBudget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBudgetConfig {
    /// How long a deposit counts (the "recent" in recent requests).
    pub ttl: Duration,
    /// Retries always allowed per second of `ttl`, however few requests.
    pub min_retries_per_sec: u32,
    /// Retries allowed as a percentage of requests within `ttl`.
    pub retry_percent: u32,
}

impl Default for RetryBudgetConfig {
    /// 10 s window, floor of 10 retries/s, 20 % of requests.
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            min_retries_per_sec: 10,
            retry_percent: 20,
        }
    }
}

/// A process-wide limit on retries: at most `retry_percent` of the requests
/// deposited over the last `ttl`, plus a floor of `min_retries_per_sec`, so a
/// downstream outage cannot multiply load. Share one (in an `Arc`) across all
/// callers.
#[derive(Debug)]
pub struct RetryBudget {
    config: RetryBudgetConfig,
    clock: SharedClock,
    slot_nanos: u64,
    /// Units: a retry costs 100, a deposit earns `retry_percent`.
    reserve: i64,
    slots: Mutex<Slots>,
}

const SLOTS: usize = 10;

#[derive(Debug)]
struct Slots {
    /// Absolute slot number of `ring[head]`.
    head_slot: u64,
    head: usize,
    /// Per slot: units earned minus units spent.
    ring: [i64; SLOTS],
}

impl RetryBudget {
    /// A budget on the system clock.
    pub fn new(config: RetryBudgetConfig) -> Self {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// A budget reading time from `clock`.
    pub fn with_clock(config: RetryBudgetConfig, clock: SharedClock) -> Self {
        let ttl = config.ttl.max(Duration::from_millis(SLOTS as u64));
        let reserve = i64::from(config.min_retries_per_sec)
            .saturating_mul(i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX))
            .saturating_mul(100);
        let slot_nanos = (duration_nanos(ttl) / SLOTS as u64).max(1);
        Self {
            config: RetryBudgetConfig { ttl, ..config },
            slot_nanos,
            reserve,
            slots: Mutex::new(Slots {
                head_slot: clock.now_nanos() / slot_nanos,
                head: 0,
                ring: [0; SLOTS],
            }),
            clock,
        }
    }

    /// Records one logical request (call it once per request, not per attempt).
    pub fn deposit(&self) {
        let earned = i64::from(self.config.retry_percent);
        self.with_current(|slots| {
            slots.ring[slots.head] = slots.ring[slots.head].saturating_add(earned);
        });
    }

    /// Takes one retry from the budget; `false` means do not retry.
    pub fn try_withdraw(&self) -> bool {
        let reserve = self.reserve;
        self.with_current(|slots| {
            let balance: i64 = slots.ring.iter().sum::<i64>().saturating_add(reserve);
            if balance >= 100 {
                slots.ring[slots.head] -= 100;
                true
            } else {
                false
            }
        })
    }

    /// Retries that could be withdrawn right now.
    pub fn available(&self) -> u64 {
        let reserve = self.reserve;
        self.with_current(|slots| {
            let balance = slots.ring.iter().sum::<i64>().saturating_add(reserve);
            u64::try_from(balance / 100).unwrap_or(0)
        })
    }

    /// The effective configuration.
    pub fn config(&self) -> RetryBudgetConfig {
        self.config
    }

    fn with_current<R>(&self, f: impl FnOnce(&mut Slots) -> R) -> R {
        let slot = self.clock.now_nanos() / self.slot_nanos;
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let behind = slot.saturating_sub(slots.head_slot);
        if behind > 0 {
            for _ in 0..behind.min(SLOTS as u64) {
                slots.head = (slots.head + 1) % SLOTS;
                let head = slots.head;
                slots.ring[head] = 0;
            }
            slots.head_slot = slot;
        }
        f(&mut slots)
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new(RetryBudgetConfig::default())
    }
}

/// Parses a Retry-After header value: delay-seconds or an HTTP date (taken
/// relative to `now`; a date in the past means zero).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The `Retry-After` of a response's headers, if present and valid.
pub fn retry_after_from_headers(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, SystemTime::now())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::clock::ManualClock;

    const MS: Duration = Duration::from_millis(1);

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 6,
            base_delay: 100 * MS,
            max_delay: 1000 * MS,
            max_elapsed: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(10),
        }
    }

    #[test]
    fn ceilings_double_and_cap() {
        let p = policy();
        let got: Vec<_> = (1..=6).map(|r| p.backoff_ceiling(r)).collect();
        assert_eq!(
            got,
            [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
        assert_eq!(p.backoff_ceiling(u32::MAX), 1000 * MS);
    }

    #[test]
    fn full_jitter_delays_stay_within_bounds_and_spread() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(42);
        for attempt in 1..6 {
            let ceiling = p.backoff_ceiling(attempt);
            let delays: Vec<_> = (0..1000)
                .map(|_| {
                    p.next_delay_with(attempt, None, Duration::ZERO, &mut rng)
                        .unwrap()
                })
                .collect();
            assert!(delays.iter().all(|d| *d <= ceiling), "attempt {attempt}");
            // Full jitter covers the whole range, not just the top or bottom.
            assert!(delays.iter().any(|d| *d < ceiling / 4), "attempt {attempt}");
            assert!(
                delays.iter().any(|d| *d > ceiling * 3 / 4),
                "attempt {attempt}"
            );
        }
        // Same seed, same schedule.
        let schedule = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (1..6)
                .map(|a| p.next_delay_with(a, None, Duration::ZERO, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(schedule(9), schedule(9));
    }

    #[test]
    fn stops_after_max_attempts() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(1);
        assert!(
            p.next_delay_with(5, None, Duration::ZERO, &mut rng)
                .is_some()
        );
        assert_eq!(p.next_delay_with(6, None, Duration::ZERO, &mut rng), None);
        assert_eq!(
            RetryPolicy::never().next_delay(1, None, Duration::ZERO),
            None
        );
    }

    #[test]
    fn stops_when_the_delay_would_overrun_the_time_budget() {
        let p = RetryPolicy {
            max_elapsed: Duration::from_secs(10),
            ..policy()
        };
        let hint = Some(Duration::from_secs(2));
        assert_eq!(
            p.next_delay(1, hint, Duration::from_secs(8)),
            Some(Duration::from_secs(2))
        );
        assert_eq!(p.next_delay(1, hint, Duration::from_secs(8) + MS), None);
    }

    #[test]
    fn retry_after_is_honoured_and_clamped() {
        let p = policy();
        assert_eq!(
            p.next_delay(1, Some(3 * MS * 1000), Duration::ZERO),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            p.next_delay(1, Some(Duration::from_secs(3600)), Duration::ZERO),
            Some(Duration::from_secs(10))
        );
        // Still bounded by attempts.
        assert_eq!(p.next_delay(6, Some(MS), Duration::ZERO), None);
    }

    #[test]
    fn parses_retry_after_seconds_and_dates() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:29:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        let mut headers = http::HeaderMap::new();
        assert_eq!(retry_after_from_headers(&headers), None);
        headers.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("5"),
        );
        assert_eq!(
            retry_after_from_headers(&headers),
            Some(Duration::from_secs(5))
        );
    }

    fn budget(clock: &ManualClock, min_per_sec: u32, percent: u32) -> RetryBudget {
        RetryBudget::with_clock(
            RetryBudgetConfig {
                ttl: Duration::from_secs(10),
                min_retries_per_sec: min_per_sec,
                retry_percent: percent,
            },
            clock.shared(),
        )
    }

    #[test]
    fn budget_floor_is_exhausted_then_refills_after_ttl() {
        let clock = ManualClock::new();
        let b = budget(&clock, 1, 20);
        assert_eq!(b.available(), 10);
        for i in 0..10 {
            assert!(b.try_withdraw(), "retry {i}");
        }
        assert!(!b.try_withdraw());
        clock.advance(Duration::from_secs(5));
        assert!(!b.try_withdraw());
        clock.advance(Duration::from_secs(6));
        assert_eq!(b.available(), 10);
    }

    #[test]
    fn budget_allows_a_share_of_recent_requests() {
        let clock = ManualClock::new();
        let b = budget(&clock, 0, 20);
        assert!(!b.try_withdraw());
        for _ in 0..100 {
            b.deposit();
        }
        // 20 % of 100 requests.
        let granted = (0..100).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 20);
        // Deposits age out with the window.
        for _ in 0..50 {
            b.deposit();
        }
        clock.advance(Duration::from_secs(11));
        assert_eq!(b.available(), 0);
    }

    #[test]
    fn budget_with_no_floor_and_no_share_never_retries() {
        let clock = ManualClock::new();
        let b = budget(&clock, 0, 0);
        for _ in 0..1000 {
            b.deposit();
        }
        assert!(!b.try_withdraw());
    }
}
