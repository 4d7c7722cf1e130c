//! Retries that do not storm: `RetryPolicy` (capped exponential backoff with
//! full jitter, max attempts, a total time budget, Retry-After honoured up to
//! a cap) and `RetryBudget` (retries limited to a share of recent requests
//! plus a small floor, like tower's `TpsBudget`; [`Resilience`](crate::Resilience)
//! keeps one per adapter).
//!
//! [`RetryPolicy::next_delay`] is the one retry rule of the workspace: the
//! loop in [`Resilience`](crate::Resilience) (which `smartbeak-utils`'s fetch
//! is built on) asks it before every retry, and a [`StopReason`] says why it
//! said no.

use std::fmt;
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
    /// Total time budget of the call, measured from its start (the bulkhead
    /// wait, every attempt and every backoff wait count): attempts are cut to
    /// what is left of it, and no wait is scheduled past it.
    /// `Duration::MAX` means no limit.
    pub max_elapsed: Duration,
    /// Shortest time worth giving a last attempt: a jittered wait that would
    /// leave less than this before `max_elapsed` is trimmed to leave exactly
    /// this, and no retry is scheduled unless more than this is left.
    pub min_last_attempt: Duration,
    /// The longest server Retry-After honoured. A longer one stops the call
    /// at once ([`StopReason::RetryAfterTooLong`], carrying the server's
    /// value so the caller can pass it on) rather than retrying before the
    /// server's time and earning another rejection.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    /// 3 attempts, 100 ms base, 5 s cap, 30 s budget (100 ms kept for the
    /// last attempt), Retry-After up to 30 s.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(30),
            min_last_attempt: Duration::from_millis(100),
            max_retry_after: Duration::from_secs(30),
        }
    }
}

/// Why a transient failure was not retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// The retry policy's `max_attempts` were used.
    MaxAttempts,
    /// No further attempt fits in `max_elapsed` (or the server's Retry-After
    /// points past it).
    Deadline,
    /// The server asked to wait longer than `max_retry_after`.
    RetryAfterTooLong {
        /// The server's Retry-After.
        retry_after: Duration,
    },
    /// The adapter's retry budget is empty.
    RetryBudget,
    /// The breaker changed state since it admitted the call (opened by other
    /// callers, and maybe half-open again with probe slots of its own).
    CircuitOpen,
    /// The operation is not idempotent (e.g. a POST without an
    /// `Idempotency-Key`) and the attempt may have reached the dependency.
    NotIdempotent,
    /// The operation cannot be repeated (e.g. a request with a streaming
    /// body), so it was attempted once.
    BodyNotClonable,
}

impl StopReason {
    /// A stable snake_case name.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::MaxAttempts => "max_attempts",
            Self::Deadline => "deadline",
            Self::RetryAfterTooLong { .. } => "retry_after_too_long",
            Self::RetryBudget => "retry_budget",
            Self::CircuitOpen => "circuit_open",
            Self::NotIdempotent => "not_idempotent",
            Self::BodyNotClonable => "body_not_clonable",
        }
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MaxAttempts => f.write_str("attempts used up"),
            Self::Deadline => f.write_str("no further attempt fits before the deadline"),
            Self::RetryAfterTooLong { retry_after } => {
                write!(
                    f,
                    "server asked to retry after {retry_after:?}, beyond the cap"
                )
            }
            Self::RetryBudget => f.write_str("retry budget exhausted"),
            Self::CircuitOpen => f.write_str("circuit breaker opened"),
            Self::NotIdempotent => {
                f.write_str("method is not idempotent and no idempotency-key header was sent")
            }
            Self::BodyNotClonable => {
                f.write_str("request body cannot be cloned, so it was sent once")
            }
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
            min_last_attempt: Duration::ZERO,
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
    /// (1 after the first), or why there is none. `elapsed` is the time since
    /// the call began. With `retry_after` the delay is the server's value
    /// (above `max_retry_after`: stop); otherwise full jitter. A jittered
    /// delay that would leave less than `min_last_attempt` of `max_elapsed`
    /// is trimmed to leave exactly that; a Retry-After that does not fit
    /// stops the call (the server asked for it). Uses the thread-local RNG.
    ///
    /// # Errors
    ///
    /// The [`StopReason`]: `MaxAttempts`, `RetryAfterTooLong` or `Deadline`.
    pub fn next_delay(
        &self,
        attempts_made: u32,
        retry_after: Option<Duration>,
        elapsed: Duration,
    ) -> Result<Duration, StopReason> {
        self.next_delay_with(attempts_made, retry_after, elapsed, &mut rand::rng())
    }

    /// [`next_delay`](Self::next_delay) with a caller-supplied RNG (seed it
    /// for reproducible tests).
    ///
    /// # Errors
    ///
    /// As [`next_delay`](Self::next_delay).
    pub fn next_delay_with<R: Rng + ?Sized>(
        &self,
        attempts_made: u32,
        retry_after: Option<Duration>,
        elapsed: Duration,
        rng: &mut R,
    ) -> Result<Duration, StopReason> {
        if attempts_made >= self.max_attempts {
            return Err(StopReason::MaxAttempts);
        }
        let delay = match retry_after {
            Some(hint) if hint > self.max_retry_after => {
                return Err(StopReason::RetryAfterTooLong { retry_after: hint });
            }
            Some(hint) => hint,
            None => {
                let ceiling = duration_nanos(self.backoff_ceiling(attempts_made));
                Duration::from_nanos(rng.random_range(0..=ceiling))
            }
        };
        if self.max_elapsed == Duration::MAX {
            return Ok(delay);
        }
        let remaining = self.max_elapsed.saturating_sub(elapsed);
        // No room at all (also exactly `min_last_attempt` left) stops: a
        // zero wait would turn the rest of the budget into a tight loop.
        let room = remaining
            .checked_sub(self.min_last_attempt)
            .filter(|room| !room.is_zero())
            .ok_or(StopReason::Deadline)?;
        if delay <= room {
            Ok(delay)
        } else if retry_after.is_some() {
            Err(StopReason::Deadline)
        } else {
            Ok(room)
        }
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

/// A limit on retries: at most `retry_percent` of the requests deposited
/// over the last `ttl`, plus a floor of `min_retries_per_sec`, so a
/// downstream outage cannot multiply load. [`Resilience`](crate::Resilience)
/// keeps one per adapter (like tower's `TpsBudget` per service), shared by
/// every caller of that adapter in the process: a small failing adapter is
/// held to a share of its *own* traffic, not of everyone's.
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
            min_last_attempt: Duration::ZERO,
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
        assert!(p.next_delay_with(5, None, Duration::ZERO, &mut rng).is_ok());
        assert_eq!(
            p.next_delay_with(6, None, Duration::ZERO, &mut rng),
            Err(StopReason::MaxAttempts)
        );
        assert_eq!(
            RetryPolicy::never().next_delay(1, None, Duration::ZERO),
            Err(StopReason::MaxAttempts)
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
            Ok(Duration::from_secs(2))
        );
        assert_eq!(
            p.next_delay(1, hint, Duration::from_secs(8) + MS),
            Err(StopReason::Deadline)
        );
        assert_eq!(
            p.next_delay(1, None, Duration::from_secs(10)),
            Err(StopReason::Deadline)
        );
    }

    #[test]
    fn a_jittered_wait_is_trimmed_to_leave_the_last_attempt_its_time() {
        let p = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_secs(10),
            max_delay: Duration::from_secs(10),
            max_elapsed: Duration::from_secs(1),
            min_last_attempt: 100 * MS,
            max_retry_after: Duration::from_secs(30),
        };
        // Seed 4 draws 53 % of the 10 s ceiling: far past the budget.
        let mut rng = StdRng::seed_from_u64(4);
        assert_eq!(p.next_delay_with(1, None, 700 * MS, &mut rng), Ok(200 * MS));
        // A short draw that fits is kept as drawn.
        let short = RetryPolicy {
            base_delay: 10 * MS,
            max_delay: 10 * MS,
            ..p
        };
        let drawn = short
            .next_delay_with(1, None, Duration::ZERO, &mut StdRng::seed_from_u64(4))
            .unwrap();
        assert!(drawn > Duration::ZERO && drawn <= 10 * MS, "{drawn:?}");
        assert_eq!(
            short.next_delay_with(1, None, 700 * MS, &mut StdRng::seed_from_u64(4)),
            Ok(drawn)
        );
        // Just more than min_last_attempt left: a (trimmed) wait of what is
        // over; exactly min_last_attempt or less left: stop.
        assert_eq!(p.next_delay_with(1, None, 899 * MS, &mut rng), Ok(MS));
        for elapsed in [900 * MS, 901 * MS] {
            assert_eq!(
                p.next_delay_with(1, None, elapsed, &mut rng),
                Err(StopReason::Deadline)
            );
        }
        // A Retry-After is never trimmed: it fits or the call stops.
        assert_eq!(
            p.next_delay_with(1, Some(500 * MS), 700 * MS, &mut rng),
            Err(StopReason::Deadline)
        );
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap_and_a_longer_one_stops() {
        let p = policy();
        assert_eq!(
            p.next_delay(1, Some(3 * MS * 1000), Duration::ZERO),
            Ok(Duration::from_secs(3))
        );
        assert_eq!(
            p.next_delay(1, Some(Duration::from_secs(10)), Duration::ZERO),
            Ok(Duration::from_secs(10))
        );
        // Above the cap: no early retry, and the server's value is kept.
        assert_eq!(
            p.next_delay(1, Some(Duration::from_secs(3600)), Duration::ZERO),
            Err(StopReason::RetryAfterTooLong {
                retry_after: Duration::from_secs(3600)
            })
        );
        // Still bounded by attempts.
        assert_eq!(
            p.next_delay(6, Some(MS), Duration::ZERO),
            Err(StopReason::MaxAttempts)
        );
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
