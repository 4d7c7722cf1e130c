//! `CircuitBreaker`: a closed / open / half-open state machine written here
//! rather than taken from failsafe (see the crate docs for why).
//!
//! The hot path is lock-free: the state, the half-open probe count and the
//! probe successes live in one packed `AtomicU64` word (with a generation that
//! changes on every transition), outcomes go into a bit ring (module `window`), and
//! only transitions take a short mutex that is never held across an await.

mod config;
mod window;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

pub use self::config::{
    BreakerConfig, BreakerPolicy, CancelledCalls, ConfigError, MAX_PROBES, MAX_WINDOW, PolicyId,
    SlowCallConfig,
};
use self::window::Window;
use crate::adapter::AdapterName;
use crate::clock::{SharedClock, SystemClock, duration_nanos};
use crate::verdict::Verdict;

/// Gauge of each breaker's state (0 closed, 1 open, 2 half-open), labelled
/// `adapter` (the adapter's name, or an internal breaker's
/// [name](CircuitBreaker::internal)) and `policy` ([`BreakerPolicy::label`]:
/// `default` or the policy's 16-hex-digit fingerprint), so two policies of
/// one adapter have two series and cannot overwrite each other.
///
/// Registered when a breaker is created and written on transitions only,
/// under the transition lock, so the last write is always the breaker's
/// current state: a new series reads 0 (closed) until written (so in the
/// Prometheus exporter), and creating a breaker of the same key (after an
/// idle closed one expired) never resets the series.
pub const STATE_GAUGE: &str = "circuit_breaker_state";
/// Counter of calls rejected by an open or saturated half-open breaker,
/// labelled `adapter` and `policy` (as [`STATE_GAUGE`]).
pub const REJECTED_COUNTER: &str = "circuit_breaker_rejected_total";
/// Counter of state transitions, labelled `adapter` and `policy` (as
/// [`STATE_GAUGE`]) and `to`.
pub const TRANSITIONS_COUNTER: &str = "circuit_breaker_transitions_total";
/// Counter of calls admitted while closed whose permit was dropped without
/// an outcome (the call's future was dropped: an outer timeout, a client
/// disconnect, a panic), labelled `adapter` and `policy` (as
/// [`STATE_GAUGE`]). Under the default [`CancelledCalls::Ignore`] these
/// calls are in no window, so this counter is where they show.
pub const DROPPED_CLOSED_CALLS_COUNTER: &str = "circuit_breaker_dropped_closed_calls_total";

/// Longest `retry_after` of a rejection while half-open with every probe
/// slot taken: the probes resolve when their calls return, usually well
/// before the half-open wait runs out, so the hint is this or the rest of
/// the wait, whichever is shorter (at least 1 ns).
pub const HALF_OPEN_RETRY_AFTER: Duration = Duration::from_secs(1);
const HALF_OPEN_RETRY_AFTER_NANOS: u64 = 1_000_000_000;

/// The three breaker states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls flow; outcomes are recorded in the window.
    Closed,
    /// Calls are rejected until the open deadline passes.
    Open,
    /// A bounded number of probe calls decide between closing and re-opening.
    HalfOpen,
}

impl BreakerState {
    /// `"closed"`, `"open"` or `"half_open"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// Value of the [`STATE_GAUGE`]: 0 closed, 1 open, 2 half-open.
    pub const fn gauge_value(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::Open => 1.0,
            Self::HalfOpen => 2.0,
        }
    }
}

/// A call was not admitted: the breaker is open, or half-open with all probe
/// slots taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker for {name} is open, next probe in {retry_after:?}")]
pub struct Rejection {
    /// Adapter whose breaker rejected the call ([`AdapterName::Unknown`] for
    /// an [internal](CircuitBreaker::internal) breaker).
    pub adapter: AdapterName,
    /// The breaker's [name](CircuitBreaker::name): the adapter's name, or the
    /// internal dependency's.
    pub name: &'static str,
    /// Time until a probe may be admitted: the rest of the open period, or
    /// while half-open with every probe slot taken by a running probe
    /// [`HALF_OPEN_RETRY_AFTER`] or the rest of the half-open wait, whichever
    /// is shorter (a hint: the slots free up as the probes return).
    pub retry_after: Duration,
}

/// Result error of [`CircuitBreaker::call`].
#[derive(Debug, thiserror::Error)]
pub enum BreakerError<E> {
    /// The breaker did not admit the call; the function was not run.
    #[error("circuit breaker for {name} is open, next probe in {retry_after:?}")]
    Rejected {
        /// Adapter whose breaker rejected the call (see [`Rejection::adapter`]).
        adapter: AdapterName,
        /// The breaker's name (see [`Rejection::name`]).
        name: &'static str,
        /// Time until a probe may be admitted (see [`Rejection::retry_after`]).
        retry_after: Duration,
    },
    /// The call ran and returned this error.
    #[error(transparent)]
    Inner(E),
}

impl<E> BreakerError<E> {
    /// The call's own error, if it ran.
    pub fn into_inner(self) -> Option<E> {
        match self {
            Self::Inner(e) => Some(e),
            Self::Rejected { .. } => None,
        }
    }

    /// Whether the breaker rejected the call.
    pub fn is_rejected(&self) -> bool {
        matches!(self, Self::Rejected { .. })
    }
}

impl<E> From<Rejection> for BreakerError<E> {
    fn from(r: Rejection) -> Self {
        Self::Rejected {
            adapter: r.adapter,
            name: r.name,
            retry_after: r.retry_after,
        }
    }
}

/// A point-in-time view of a breaker, for metrics, health pages and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSnapshot {
    /// Current state (an open breaker past its deadline reports `Open` until
    /// the next call moves it to half-open).
    pub state: BreakerState,
    /// Calls in the sliding window.
    pub window_calls: u32,
    /// Failures in the sliding window.
    pub window_failures: u32,
    /// Slow calls in the sliding window (0 without a slow-call rule).
    pub window_slow: u32,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// Trips since the breaker last closed from half-open (drives the open
    /// duration growth).
    pub trips: u32,
    /// The open duration of the current or last trip.
    pub open_duration: Duration,
    /// Time until a probe may be admitted, when open.
    pub retry_after: Option<Duration>,
    /// Probe slots taken in the current half-open period.
    pub probes_admitted: u32,
    /// Successful probes in the current half-open period.
    pub probe_successes: u32,
    /// Calls dropped before they finished, over the breaker's life.
    pub cancelled_calls: u64,
}

/// A circuit breaker for one adapter (or one internal dependency, see
/// [`CircuitBreaker::internal`]) and one [`BreakerPolicy`].
///
/// It guards a call per invocation and never stores the function, so one
/// breaker shared by many callers always runs each caller's own code.
#[derive(Debug)]
pub struct CircuitBreaker {
    /// Packed state word; see `pack`.
    word: CachePadded<AtomicU64>,
    window: Window,
    consecutive: CachePadded<AtomicU32>,
    adapter: AdapterName,
    /// Metric label, tracing field and rejection name: `adapter.as_str()`,
    /// or an internal breaker's own name.
    name: &'static str,
    policy: BreakerPolicy,
    clock: SharedClock,
    /// Clock nanos when the open period ends (valid while open).
    open_until: AtomicU64,
    /// Clock nanos when half-open began (valid while half-open).
    half_open_since: AtomicU64,
    /// Clock nanos of the last registry lookup (idle TTL).
    last_used: AtomicU64,
    cancelled: AtomicU64,
    control: Mutex<Control>,
    state_gauge: metrics::Gauge,
    rejected: metrics::Counter,
    dropped_closed: metrics::Counter,
    /// The policy has a slow-call rule (read on every admission, so kept
    /// here rather than behind the policy's `Arc`).
    track_slow: bool,
    /// [`TRANSITIONS_COUNTER`] by target: closed, open, half-open.
    transitions: [metrics::Counter; 3],
}

/// Data only touched during transitions, under the mutex.
#[derive(Debug)]
struct Control {
    trips: u32,
    open_duration: Duration,
}

/// Admission to run one call, released or recorded exactly once.
///
/// Dropping it without [`CallPermit::record`] (the call's future was dropped)
/// hands a half-open probe slot back, and for a closed breaker applies
/// [`CancelledCalls`] and counts the call in [`DROPPED_CLOSED_CALLS_COUNTER`].
#[derive(Debug)]
#[must_use = "record the outcome with CallPermit::record"]
pub struct CallPermit<'a> {
    breaker: &'a CircuitBreaker,
    generation: u64,
    probe: bool,
    /// Clock nanos at admission, when slow calls are tracked.
    started: Option<u64>,
    done: bool,
}

/// Pads to its own cache lines so the state word is not invalidated by
/// window writes.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct CachePadded<T>(pub(crate) T);

// State word layout: bits 0-1 state, 2-11 probes admitted, 12-21 probe
// successes, 22-63 generation (bumped on every transition).
const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const STATE_MASK: u64 = 0b11;
const PROBE_ONE: u64 = 1 << 2;
const SUCCESS_ONE: u64 = 1 << 12;
const FIELD_MASK: u64 = 0x3ff;
const GEN_SHIFT: u32 = 22;

#[inline]
const fn state_bits(word: u64) -> u64 {
    word & STATE_MASK
}
#[inline]
const fn probes(word: u64) -> u32 {
    ((word >> 2) & FIELD_MASK) as u32
}
#[inline]
const fn successes(word: u64) -> u32 {
    ((word >> 12) & FIELD_MASK) as u32
}
#[inline]
const fn generation(word: u64) -> u64 {
    word >> GEN_SHIFT
}
#[inline]
const fn pack(state: u64, generation: u64) -> u64 {
    (generation << GEN_SHIFT) | state
}
const fn decode(word: u64) -> BreakerState {
    match state_bits(word) {
        CLOSED => BreakerState::Closed,
        OPEN => BreakerState::Open,
        _ => BreakerState::HalfOpen,
    }
}

/// Why a breaker opens.
#[derive(Debug, Clone, Copy)]
enum OpenReason {
    FailureRate,
    ConsecutiveFailures,
    SlowCalls,
    CancelledCalls,
    ProbeFailed,
    HalfOpenTimeout,
}

impl OpenReason {
    const fn as_str(self) -> &'static str {
        match self {
            Self::FailureRate => "failure rate",
            Self::ConsecutiveFailures => "consecutive failures",
            Self::SlowCalls => "slow-call rate",
            Self::CancelledCalls => "cancelled calls",
            Self::ProbeFailed => "probe failed",
            Self::HalfOpenTimeout => "probes did not resolve within the half-open wait",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Target {
    Open(OpenReason),
    HalfOpen,
    Closed,
}

impl CircuitBreaker {
    /// A closed breaker on the system clock.
    pub fn new(adapter: AdapterName, policy: BreakerPolicy) -> Self {
        Self::with_clock(adapter, policy, std::sync::Arc::new(SystemClock))
    }

    /// A closed breaker reading time from `clock`.
    pub fn with_clock(adapter: AdapterName, policy: BreakerPolicy, clock: SharedClock) -> Self {
        Self::build(adapter, adapter.as_str(), policy, clock)
    }

    /// A closed breaker on the system clock for an *internal* dependency of
    /// ours (a cache, a queue), not an outside adapter: `name` takes the
    /// adapter's place in the metric label, the tracing events and
    /// [`Rejection`], and [`CircuitBreaker::adapter`] reads
    /// [`AdapterName::Unknown`].
    ///
    /// [`AdapterName`] stays the closed set of outside adapters, so its
    /// per-adapter tables (bulkheads, the registry, crates built on `ALL`)
    /// and its lenient parse never learn internal names, and no outside
    /// string can reach an internal breaker. Internal breakers are not kept
    /// in a [`BreakerRegistry`](crate::BreakerRegistry): the owner holds the
    /// one it built. `name` is `&'static str`, so the label set stays
    /// bounded by the program text.
    ///
    /// # Panics
    ///
    /// If `name` is empty, is not made of `a-z`, `0-9`, `-` and `_`, or is an
    /// adapter name (including `unknown`), which would merge its series and
    /// log lines with that adapter's. It is a constant of the program, so
    /// this fails at start-up, never on input.
    pub fn internal(name: &'static str, policy: BreakerPolicy) -> Self {
        Self::internal_with_clock(name, policy, std::sync::Arc::new(SystemClock))
    }

    /// [`CircuitBreaker::internal`] reading time from `clock`.
    ///
    /// # Panics
    ///
    /// As [`CircuitBreaker::internal`].
    pub fn internal_with_clock(
        name: &'static str,
        policy: BreakerPolicy,
        clock: SharedClock,
    ) -> Self {
        assert!(
            is_internal_name(name),
            "invalid internal breaker name {name:?}: use a-z, 0-9, '-' and '_', and no adapter name"
        );
        Self::build(AdapterName::Unknown, name, policy, clock)
    }

    fn build(
        adapter: AdapterName,
        name: &'static str,
        policy: BreakerPolicy,
        clock: SharedClock,
    ) -> Self {
        let config = policy.config();
        let now = clock.now_nanos();
        // Registered, not written: a new breaker must not reset the series.
        let label = policy.label();
        let state_gauge =
            metrics::gauge!(STATE_GAUGE, "adapter" => name, "policy" => label.clone());
        let transitions = [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ]
        .map(|to| {
            metrics::counter!(
                TRANSITIONS_COUNTER,
                "adapter" => name,
                "policy" => label.clone(),
                "to" => to.as_str()
            )
        });
        Self {
            word: CachePadded(AtomicU64::new(pack(CLOSED, 0))),
            window: Window::new(config.window_size, config.slow_calls.is_some()),
            consecutive: CachePadded(AtomicU32::new(0)),
            adapter,
            name,
            open_until: AtomicU64::new(0),
            half_open_since: AtomicU64::new(0),
            last_used: AtomicU64::new(now),
            cancelled: AtomicU64::new(0),
            control: Mutex::new(Control {
                trips: 0,
                open_duration: config.open_duration,
            }),
            state_gauge,
            rejected: metrics::counter!(REJECTED_COUNTER, "adapter" => name, "policy" => label.clone()),
            dropped_closed: metrics::counter!(
                DROPPED_CLOSED_CALLS_COUNTER,
                "adapter" => name,
                "policy" => label
            ),
            transitions,
            track_slow: config.slow_calls.is_some(),
            policy,
            clock,
        }
    }

    /// Runs `f()` if the breaker admits it, classifies the result with
    /// `classify` and records the verdict. `f` is called at most once and
    /// only after admission; nothing is stored. If the returned future is
    /// dropped before it completes, the permit's drop rules apply (see
    /// [`CallPermit`]).
    pub async fn call<T, E, F, Fut, C>(&self, f: F, classify: C) -> Result<T, BreakerError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: FnOnce(&Result<T, E>) -> Verdict,
    {
        let permit = self.try_acquire()?;
        let result = f().await;
        permit.record(classify(&result));
        result.map_err(BreakerError::Inner)
    }

    /// Asks for admission without running anything, for callers that drive
    /// the call themselves. Never blocks.
    // Inline across crates: the permit then stays in registers instead of
    // being returned and copied through memory (the closed call's main cost
    // when it was out of line).
    #[inline]
    pub fn try_acquire(&self) -> Result<CallPermit<'_>, Rejection> {
        let word = self.word.0.load(Ordering::Acquire);
        if state_bits(word) == CLOSED {
            return Ok(CallPermit {
                breaker: self,
                generation: generation(word),
                probe: false,
                started: self.start_mark(),
                done: false,
            });
        }
        self.try_acquire_slow(word)
    }

    /// [`CircuitBreaker::try_acquire`] past the closed fast path: open,
    /// half-open, or a transition under way.
    fn try_acquire_slow(&self, mut word: u64) -> Result<CallPermit<'_>, Rejection> {
        loop {
            match state_bits(word) {
                CLOSED => {
                    return Ok(CallPermit {
                        breaker: self,
                        generation: generation(word),
                        probe: false,
                        started: self.start_mark(),
                        done: false,
                    });
                }
                OPEN => {
                    let now = self.now_nanos();
                    let until = self.open_until.load(Ordering::Acquire);
                    if now < until {
                        return Err(self.reject(until - now));
                    }
                    word = self.transition(word, Target::HalfOpen, now);
                }
                _ => {
                    let now = self.now_nanos();
                    // Probes admitted in this period that have not resolved
                    // (a success adds to `successes`, a release takes one
                    // from `probes`, a failure re-opens).
                    let outstanding = probes(word).saturating_sub(successes(word));
                    let deadline = self
                        .half_open_since
                        .load(Ordering::Acquire)
                        .saturating_add(duration_nanos(self.config().half_open_max_wait));
                    if outstanding > 0 && now >= deadline {
                        // A probe of this period is still running past the
                        // wait: it hung.
                        word =
                            self.transition(word, Target::Open(OpenReason::HalfOpenTimeout), now);
                        continue;
                    }
                    if probes(word) >= self.config().half_open_probes {
                        // Every slot is taken by a running probe (all of
                        // them resolved would have closed the breaker).
                        let wait = deadline.saturating_sub(now);
                        return Err(self.reject(wait.clamp(1, HALF_OPEN_RETRY_AFTER_NANOS)));
                    }
                    if outstanding == 0 {
                        // The wait for a hung probe starts with the first
                        // outstanding one. Stored before the CAS that admits
                        // it (Release, read with Acquire after the word), so
                        // whoever sees the probe sees the new start; a
                        // caller whose CAS then fails only moved the start to
                        // its own `now`, and `fetch_max` never moves it back.
                        self.half_open_since.fetch_max(now, Ordering::AcqRel);
                    }
                    match self.word.0.compare_exchange_weak(
                        word,
                        word + PROBE_ONE,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => {
                            return Ok(CallPermit {
                                breaker: self,
                                generation: generation(word),
                                probe: true,
                                started: self.start_mark(),
                                done: false,
                            });
                        }
                        Err(actual) => word = actual,
                    }
                }
            }
        }
    }

    /// The current state. An open breaker whose deadline has passed still
    /// reads `Open` until the next call moves it to half-open.
    pub fn state(&self) -> BreakerState {
        decode(self.word.0.load(Ordering::Acquire))
    }

    /// A consistent-enough view of the counters (each read atomically, not
    /// all at one instant).
    pub fn snapshot(&self) -> BreakerSnapshot {
        let word = self.word.0.load(Ordering::Acquire);
        let state = decode(word);
        let counts = self.window.counts();
        let (trips, open_duration) = {
            let control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
            (control.trips, control.open_duration)
        };
        let retry_after = (state == BreakerState::Open).then(|| {
            let until = self.open_until.load(Ordering::Acquire);
            Duration::from_nanos(until.saturating_sub(self.now_nanos()))
        });
        BreakerSnapshot {
            state,
            window_calls: counts.calls,
            window_failures: counts.failures,
            window_slow: counts.slow,
            consecutive_failures: self.consecutive.0.load(Ordering::Relaxed),
            trips,
            open_duration,
            retry_after,
            probes_admitted: probes(word),
            probe_successes: successes(word),
            cancelled_calls: self.cancelled.load(Ordering::Relaxed),
        }
    }

    /// The adapter this breaker guards ([`AdapterName::Unknown`] for an
    /// [internal](CircuitBreaker::internal) breaker).
    pub fn adapter(&self) -> AdapterName {
        self.adapter
    }

    /// The name in its metric label, tracing events and [`Rejection`]s: the
    /// adapter's [`as_str`](AdapterName::as_str), or the name given to
    /// [`CircuitBreaker::internal`].
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The policy it was built with.
    pub fn policy(&self) -> &BreakerPolicy {
        &self.policy
    }

    fn config(&self) -> &BreakerConfig {
        self.policy.config()
    }

    #[inline]
    fn now_nanos(&self) -> u64 {
        self.clock.now_nanos()
    }

    /// Admission time for the slow-call rule; no clock read without it.
    #[inline]
    fn start_mark(&self) -> Option<u64> {
        self.track_slow.then(|| self.now_nanos())
    }

    /// Whether recording a success of a closed call would change nothing:
    /// no failure streak to reset and a full window with no bit set (see
    /// the `window` module). Then a closed success writes no shared line.
    #[inline]
    fn success_is_noop(&self) -> bool {
        self.consecutive.0.load(Ordering::Relaxed) == 0 && self.window.success_is_noop()
    }

    #[cold]
    fn reject(&self, retry_after_nanos: u64) -> Rejection {
        self.rejected.increment(1);
        Rejection {
            adapter: self.adapter,
            name: self.name,
            retry_after: Duration::from_nanos(retry_after_nanos),
        }
    }

    /// Records a finished call admitted under `generation`.
    #[inline]
    fn record(
        &self,
        generation_at_admission: u64,
        probe: bool,
        started: Option<u64>,
        verdict: Verdict,
    ) {
        let slow = match (self.config().slow_calls, started) {
            (Some(rule), Some(started)) => {
                self.now_nanos().saturating_sub(started) >= duration_nanos(rule.threshold)
            }
            _ => false,
        };
        if probe {
            self.record_probe(generation_at_admission, verdict, slow);
        } else {
            match verdict {
                Verdict::Ignored => {}
                Verdict::Success => self.record_closed(generation_at_admission, false, slow, None),
                Verdict::Failure | Verdict::Transient { .. } => {
                    self.record_closed(generation_at_admission, true, slow, None)
                }
            }
        }
    }

    #[inline]
    fn record_closed(
        &self,
        generation_at_admission: u64,
        failure: bool,
        slow: bool,
        reason: Option<OpenReason>,
    ) {
        let word = self.word.0.load(Ordering::Acquire);
        if state_bits(word) != CLOSED || generation(word) != generation_at_admission {
            return; // admitted before a transition; its outcome is stale
        }
        self.window.record(failure, slow);
        let consecutive = if failure {
            self.consecutive.0.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            if self.consecutive.0.load(Ordering::Relaxed) != 0 {
                self.consecutive.0.store(0, Ordering::Relaxed);
            }
            0
        };
        if failure || slow {
            self.judge(word, consecutive, reason);
        }
    }

    #[cold]
    fn judge(&self, word: u64, consecutive: u32, reason: Option<OpenReason>) {
        let config = self.config();
        let counts = self.window.counts();
        let judged = counts.calls >= config.minimum_calls;
        let reason =
            if config.consecutive_failures > 0 && consecutive >= config.consecutive_failures {
                Some(reason.unwrap_or(OpenReason::ConsecutiveFailures))
            } else if judged
                && u64::from(counts.failures) * 100
                    >= u64::from(config.failure_rate_percent) * u64::from(counts.calls)
                && counts.failures > 0
            {
                Some(reason.unwrap_or(OpenReason::FailureRate))
            } else {
                match config.slow_calls {
                    Some(rule)
                        if judged
                            && counts.slow > 0
                            && u64::from(counts.slow) * 100
                                >= u64::from(rule.rate_percent) * u64::from(counts.calls) =>
                    {
                        Some(OpenReason::SlowCalls)
                    }
                    _ => None,
                }
            };
        if let Some(reason) = reason {
            self.transition(word, Target::Open(reason), self.now_nanos());
        }
    }

    #[cold]
    fn record_probe(&self, generation_at_admission: u64, verdict: Verdict, slow: bool) {
        let verdict = if slow && verdict == Verdict::Success {
            Verdict::Failure
        } else {
            verdict
        };
        match verdict {
            Verdict::Ignored => self.release_probe(generation_at_admission),
            Verdict::Failure | Verdict::Transient { .. } => {
                let word = self.word.0.load(Ordering::Acquire);
                if state_bits(word) == HALF_OPEN && generation(word) == generation_at_admission {
                    self.transition(
                        word,
                        Target::Open(OpenReason::ProbeFailed),
                        self.now_nanos(),
                    );
                }
            }
            Verdict::Success => {
                let mut word = self.word.0.load(Ordering::Acquire);
                loop {
                    if state_bits(word) != HALF_OPEN || generation(word) != generation_at_admission
                    {
                        return;
                    }
                    let next = word + SUCCESS_ONE;
                    match self.word.0.compare_exchange_weak(
                        word,
                        next,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => {
                            if successes(next) >= self.config().half_open_successes {
                                self.transition(next, Target::Closed, self.now_nanos());
                            }
                            return;
                        }
                        Err(actual) => word = actual,
                    }
                }
            }
        }
    }

    /// Hands a probe slot back (dropped or ignored probe).
    fn release_probe(&self, generation_at_admission: u64) {
        let mut word = self.word.0.load(Ordering::Acquire);
        loop {
            if state_bits(word) != HALF_OPEN
                || generation(word) != generation_at_admission
                || probes(word) == 0
            {
                return;
            }
            match self.word.0.compare_exchange_weak(
                word,
                word - PROBE_ONE,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(actual) => word = actual,
            }
        }
    }

    #[cold]
    fn cancelled(&self, generation_at_admission: u64, probe: bool) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
        if probe {
            self.release_probe(generation_at_admission);
            return;
        }
        self.dropped_closed.increment(1);
        if self.config().cancelled_calls == CancelledCalls::CountAsFailure {
            self.record_closed(
                generation_at_admission,
                true,
                false,
                Some(OpenReason::CancelledCalls),
            );
        }
    }

    /// Moves from the state in `expected` (same generation) to `target`.
    /// Returns the word after the attempt: the new one, or whatever another
    /// thread's transition left.
    #[cold]
    fn transition(&self, expected: u64, target: Target, now: u64) -> u64 {
        let mut control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        let mut current = self.word.0.load(Ordering::Acquire);
        if generation(current) != generation(expected)
            || state_bits(current) != state_bits(expected)
        {
            return current;
        }
        let next_generation = generation(current) + 1;
        let config = self.config();
        let (state, new_state) = match target {
            Target::Open(reason) => {
                control.trips = control.trips.saturating_add(1);
                control.open_duration = open_duration_for(config, control.trips);
                self.open_until.store(
                    now.saturating_add(duration_nanos(control.open_duration)),
                    Ordering::Release,
                );
                let counts = self.window.counts();
                tracing::warn!(
                    adapter = self.name,
                    policy = %self.policy.id(),
                    reason = reason.as_str(),
                    open_for = ?control.open_duration,
                    trips = control.trips,
                    window_calls = counts.calls,
                    window_failures = counts.failures,
                    "circuit breaker opened"
                );
                (OPEN, BreakerState::Open)
            }
            Target::HalfOpen => {
                self.half_open_since.store(now, Ordering::Release);
                tracing::info!(adapter = self.name, policy = %self.policy.id(), "circuit breaker half-open, admitting probes");
                (HALF_OPEN, BreakerState::HalfOpen)
            }
            Target::Closed => {
                control.trips = 0;
                self.window.reset();
                self.consecutive.0.store(0, Ordering::Relaxed);
                tracing::info!(adapter = self.name, policy = %self.policy.id(), "circuit breaker closed");
                (CLOSED, BreakerState::Closed)
            }
        };
        if matches!(target, Target::Open(_)) {
            self.consecutive.0.store(0, Ordering::Relaxed);
        }
        let new_word = pack(state, next_generation);
        // Probe counters may still move within the current generation, but
        // the generation itself only changes under `control`.
        loop {
            match self.word.0.compare_exchange_weak(
                current,
                new_word,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        // Under the lock: transitions are serialised by it, so the gauge's
        // last write is the state the breaker is in.
        self.state_gauge.set(new_state.gauge_value());
        drop(control);
        let to = match new_state {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        };
        self.transitions[to].increment(1);
        new_word
    }

    /// Marks the breaker used at `now` (clock nanos; registry idle TTL).
    pub(crate) fn touch(&self, now: u64) {
        // Coarse: skip the store when it would move the mark by < 1 s, so
        // concurrent lookups do not all write the same cache line.
        if now.saturating_sub(self.last_used.load(Ordering::Relaxed)) >= 1_000_000_000 {
            self.last_used.store(now, Ordering::Relaxed);
        }
    }

    /// Time since the last [`touch`](Self::touch) (or creation).
    pub(crate) fn idle_for(&self, now: u64) -> Duration {
        Duration::from_nanos(now.saturating_sub(self.last_used.load(Ordering::Relaxed)))
    }
}

impl CallPermit<'_> {
    /// Records the call's outcome. Consumes the permit.
    #[inline]
    pub fn record(mut self, verdict: Verdict) {
        self.done = true;
        // Inline fast path: a closed success without a slow-call rule that
        // would change nothing (see `success_is_noop`) is not recorded; a
        // stale one would be discarded anyway.
        if !self.probe
            && self.started.is_none()
            && matches!(verdict, Verdict::Success)
            && self.breaker.success_is_noop()
        {
            return;
        }
        self.breaker
            .record(self.generation, self.probe, self.started, verdict);
    }

    /// Whether this call is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// For a retry loop, before each retry of the call this permit admitted:
    /// `false` if the breaker has changed generation since admission (it
    /// opened, and maybe half-opened again with probe slots of its own), so
    /// the permit is stale and the loop must stop rather than send an attempt
    /// outside the probe limit. Otherwise restarts the slow-call timer, so the
    /// slow-call rule judges the attempt that follows, not the earlier
    /// attempts and backoff waits.
    pub fn prepare_retry(&mut self) -> bool {
        if generation(self.breaker.word.0.load(Ordering::Acquire)) != self.generation {
            return false;
        }
        self.started = self.breaker.start_mark();
        true
    }
}

impl Drop for CallPermit<'_> {
    #[inline]
    fn drop(&mut self) {
        if !self.done {
            self.breaker.cancelled(self.generation, self.probe);
        }
    }
}

/// A valid [`CircuitBreaker::internal`] name: non-empty, `a-z0-9-_`, and not
/// an adapter's name (`unknown` included).
fn is_internal_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && AdapterName::from_known(name).is_none()
}

/// `open_duration * factor^(trips-1)`, capped.
fn open_duration_for(config: &BreakerConfig, trips: u32) -> Duration {
    let mut duration = config.open_duration;
    if config.open_backoff_factor <= 1 {
        return duration;
    }
    for _ in 1..trips {
        duration = duration.saturating_mul(config.open_backoff_factor);
        if duration >= config.max_open_duration {
            return config.max_open_duration;
        }
    }
    duration.min(config.max_open_duration)
}
