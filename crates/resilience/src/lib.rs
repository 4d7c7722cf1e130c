//! Circuit breakers that stay bounded, retries that do not storm, timeouts
//! and bulkheads, for calls to outside providers ("adapters"); a breaker can
//! also guard an internal dependency of ours (see [Internal
//! dependencies](#internal-dependencies)).
//!
//! # The model
//!
//! * **[`AdapterName`]** is the closed set of 23 allowlisted adapters. Any
//!   other string parses to [`AdapterName::Unknown`] (counted in
//!   `resilience_unknown_adapter_total`, warned about at most once per 10 s),
//!   so attacker-chosen names can never grow a map or a metric label set.
//! * **[`Verdict`]** is the caller's reading of one result: `Success` (also a
//!   404: the dependency is fine), `Ignored`, `Failure` (counts against the
//!   breaker, not retried) or `Transient` (counts, and is retried, after the
//!   server's Retry-After if it sent one). Classifiers are plain closures
//!   `Fn(&Result<T, E>) -> Verdict`; [`err_is_transient`] and
//!   [`err_is_failure`] cover the simple cases.
//! * **[`CircuitBreaker`]** is closed, open or half-open
//!   ([`BreakerState`], readable with [`CircuitBreaker::state`]).
//!   - *Closed*: every outcome goes into a count-based sliding window
//!     (`window_size` calls). It trips when, with at least `minimum_calls` in
//!     the window, failures reach `failure_rate_percent`; or after
//!     `consecutive_failures` in a row; or (optional) when slow calls reach
//!     their rate.
//!   - *Open*: calls are rejected at once with [`BreakerError::Rejected`]
//!     carrying the adapter and the time until the next probe. The open
//!     duration starts at `open_duration` and is multiplied by
//!     `open_backoff_factor` on every further trip without a recovery in
//!     between, up to `max_open_duration`.
//!   - *Half-open*: at most `half_open_probes` calls are admitted (no
//!     thundering herd; everyone else is rejected). `half_open_successes`
//!     successful probes close it with a fresh window; any failed (or slow)
//!     probe re-opens it. If a probe admitted in this half-open period is
//!     still running `half_open_max_wait` after the breaker went from no
//!     outstanding probe to one, the next caller re-opens it, so a hung probe
//!     cannot wedge the breaker; with no probe outstanding the wait does not
//!     run, so an adapter called once a minute still closes after its
//!     probes succeed. A caller rejected because every probe slot is taken
//!     gets a `retry_after` of [`HALF_OPEN_RETRY_AFTER`] (1 s) or the rest
//!     of the wait, whichever is shorter.
//!   - The breaker guards one call per invocation,
//!     [`CircuitBreaker::call(|| fut, classify)`](CircuitBreaker::call); it
//!     never stores the function, so the original's stale-closure bug (a
//!     cached breaker that kept running the first function it was built
//!     with) cannot exist. [`CircuitBreaker::try_acquire`] returns a
//!     [`CallPermit`] for callers that drive the call themselves.
//!   - **Dropped calls.** A permit dropped without an outcome (the call's
//!     future was dropped: an outer timeout, a client disconnect, a panic)
//!     is recorded as *cancelled*. A cancelled half-open probe hands its slot
//!     back and counts as neither success nor failure. A cancelled closed
//!     call follows [`CancelledCalls`]: by default it is only counted
//!     ([`BreakerSnapshot::cancelled_calls`]), because client disconnects are
//!     in an attacker's hands and must not open a breaker for everyone; put
//!     the deadline *inside* the breaker (as [`Resilience`] does) so it is
//!     classified as a transient failure. `CountAsFailure` is available.
//!     Either way a dropped closed call is counted in
//!     `circuit_breaker_dropped_closed_calls_total`.
//!   - Outcomes of calls admitted before a transition (a different
//!     generation) are discarded, so a slow call from before an outage cannot
//!     count as a probe.
//! * **[`BreakerRegistry`]** holds one breaker per ([`AdapterName`],
//!   [`BreakerPolicy`]) in a bounded `quick_cache` (capacity 100, idle TTL 1 h by
//!   default, checked on read from a stored last-use time). The key hashes
//!   the [`PolicyId`], a fingerprint of the whole [`BreakerConfig`], and a
//!   hit compares the configurations too (`Arc::ptr_eq`, else `==`), so two
//!   thresholds can never share a breaker, not even on a 64-bit collision
//!   (the original keyed on `name:threshold`). Breakers that are
//!   not closed are *pinned*: never evicted and never expired, so an outage
//!   cannot be forgotten by cache pressure. The key set is small by
//!   construction (23 adapters times the policies the program defines), so
//!   pinning only matters under misuse; capacity is exact (one shard).
//! * **[`RetryPolicy`]**: full-jitter exponential backoff (AWS's
//!   recommendation: a delay drawn uniformly from `[0, min(max_delay,
//!   base_delay * 2^(n-1))]`), `max_attempts`, a total deadline
//!   `max_elapsed` (a jittered wait is trimmed to leave `min_last_attempt`),
//!   and Retry-After honoured up to `max_retry_after` (a longer one stops the
//!   call with [`StopReason::RetryAfterTooLong`] carrying the server's value).
//!   [`RetryPolicy::next_delay`] is the one retry rule; a [`StopReason`]
//!   says why it refused.
//! * **[`RetryBudget`]**: one per adapter, shared process-wide through
//!   [`Resilience`] (like tower's `TpsBudget`, which is per service): each
//!   logical request deposits, each retry withdraws, and retries are limited
//!   to `retry_percent` (20 %) of the adapter's requests of the last `ttl`
//!   (10 s) plus a floor of `min_retries_per_sec`, so an outage cannot
//!   multiply load and a small failing adapter cannot retry on a busy
//!   adapter's traffic.
//! * **[`timeout()`]** and **[`Bulkhead`]** (per-adapter concurrency limit with a
//!   bounded wait and a [`BulkheadFull`] error).
//! * **Time** is read only through [`Clock`] (nanoseconds since the clock's
//!   origin): [`SystemClock`] (TSC via `quanta`) in production,
//!   [`ManualClock`] (shared across threads) or [`TokioClock`] (paused tokio
//!   time) in tests.
//!
//! # Internal dependencies
//!
//! A dependency of our own, such as the api's Redis rate limiter, gets its
//! breaker from [`CircuitBreaker::internal`]`(name, policy)`: the same state
//! machine and hot path, with the `&'static str` name where an adapter's
//! name would go (the `adapter` label of the metrics, the tracing events,
//! [`Rejection::name`] and the error messages); [`CircuitBreaker::adapter`]
//! reads [`AdapterName::Unknown`]. Why a name and not an `AdapterName`
//! variant: [`AdapterName`] is the allowlist of outside adapters that
//! untrusted strings are parsed against and that per-adapter tables are
//! built from (`ALL`, `COUNT`, `index`: bulkheads, the utils fetch
//! settings); an internal variant would make `"redis"` parse as an adapter
//! and give it a bulkhead and settings it never uses. The name must be `a-z`,
//! `0-9`, `-`, `_` and must not be an adapter name (checked when the breaker
//! is built), so the label set stays bounded by the program text and never
//! merges with an adapter's series. Internal breakers are owned by whoever
//! builds them; the [`BreakerRegistry`] and [`Resilience`] stay keyed by
//! [`AdapterName`].
//!
//! ```
//! use std::time::Duration;
//! use smartbeak_resilience::{BreakerConfig, BreakerPolicy, CircuitBreaker, Verdict};
//!
//! let policy = BreakerPolicy::new(BreakerConfig {
//!     consecutive_failures: 3,
//!     open_duration: Duration::from_millis(500),
//!     open_backoff_factor: 1,
//!     max_open_duration: Duration::from_millis(500),
//!     half_open_probes: 1,
//!     half_open_successes: 1,
//!     ..BreakerConfig::default()
//! })
//! .unwrap();
//! let breaker = CircuitBreaker::internal("redis", policy);
//! for _ in 0..3 {
//!     breaker.try_acquire().unwrap().record(Verdict::TRANSIENT);
//! }
//! let rejection = breaker.try_acquire().unwrap_err();
//! assert_eq!(rejection.name, "redis");
//! assert!(rejection.to_string().starts_with("circuit breaker for redis is open"));
//! ```
//!
//! # One shared stack
//!
//! [`Resilience`] is the process-wide set -- one [`BreakerRegistry`], one
//! [`Bulkhead`] and one [`RetryBudget`] per adapter, the jitter RNG -- behind
//! an `Arc`, and [`Resilience::call_holding`] (with [`Resilience::call`] on
//! top) is the one retry loop of the workspace; `smartbeak-utils`'s fetch is
//! built on it. Build one at start-up and hand clones to every component and
//! every HTTP client (`HttpClient::builder` takes it: there is no implicit
//! process-global set to fall back on).
//!
//! # Composition order
//!
//! [`Resilience::call`] runs, from the outside in:
//!
//! ```text
//! bulkhead -> breaker -> retry (with the budget) -> per-attempt timeout -> f()
//! ```
//!
//! 1. The **bulkhead** is outermost, so everything below, retry waits
//!    included, counts against the adapter's concurrency limit. Its wait is
//!    bounded by `max_wait` and by the call's deadline (`max_elapsed`).
//! 2. The **breaker** admits the logical call once and records one outcome for
//!    it (the last attempt's verdict, timed from that attempt's start, so a
//!    slow-call rule never counts backoff waits). Retries that end in success
//!    are not counted against the dependency, and a rejected call costs no
//!    attempt, no retry budget and no timer. Before each retry (before and
//!    after its wait) the loop checks that its permit is still of the
//!    breaker's current generation ([`CallPermit::prepare_retry`]): a
//!    breaker that opened, or opened and half-opened again, since admission
//!    stops the loop, so no retry goes out beside the half-open probes.
//! 3. The **retry** loop deposits once into the adapter's budget and
//!    withdraws per retry; it retries only `Transient` verdicts.
//! 4. The **per-attempt timeout** is innermost, so a hung attempt becomes a
//!    `Transient` failure the loop and the breaker see (cut to what is left
//!    of the deadline; [`CallScope::timed_out`] can make it a non-retried
//!    failure for an operation that must not be repeated).
//!
//! ```
//! use std::time::Duration;
//! use smartbeak_resilience::{
//!     AdapterName, Policy, Resilience, ResilienceConfig, ResilienceError, RetryPolicy, Verdict,
//! };
//!
//! #[derive(Debug)]
//! enum Upstream { Status(u16), Io }
//!
//! // A 404 is not an outage; a 503 or an I/O error is, and may pass.
//! fn classify(result: &Result<String, Upstream>) -> Verdict {
//!     match result {
//!         Ok(_) | Err(Upstream::Status(404)) => Verdict::Success,
//!         Err(Upstream::Status(400..=499)) => Verdict::Ignored,
//!         Err(Upstream::Status(501)) => Verdict::Failure,
//!         Err(Upstream::Status(_) | Upstream::Io) => Verdict::TRANSIENT,
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // One per process: the registry, the bulkheads and the retry budgets;
//! // clones share them.
//! let resilience = Resilience::new(ResilienceConfig::default());
//! // Define policies once and reuse them.
//! let policy = Policy {
//!     retry: RetryPolicy { max_attempts: 3, ..RetryPolicy::default() },
//!     attempt_timeout: Some(Duration::from_secs(2)),
//!     ..Policy::default()
//! };
//! let adapter = AdapterName::parse("youtube");
//! let result = resilience
//!     .call(adapter, &policy, || async { Ok::<_, Upstream>("body".to_owned()) }, classify)
//!     .await;
//! match result {
//!     Ok(body) => assert_eq!(body, "body"),
//!     Err(ResilienceError::Rejected { retry_after, .. }) => println!("open, retry in {retry_after:?}"),
//!     Err(ResilienceError::BulkheadFull(full)) => println!("{full}"),
//!     Err(ResilienceError::Timeout { .. }) => println!("timed out"),
//!     Err(ResilienceError::Exhausted { reason, error, .. }) => println!("{error:?}: {reason}"),
//!     Err(ResilienceError::Inner(e)) => println!("upstream error {e:?}"),
//! }
//! # }
//! ```
//!
//! The parts work alone too:
//!
//! ```
//! use smartbeak_resilience::{
//!     AdapterName, BreakerPolicy, BreakerRegistry, RegistryConfig, err_is_transient,
//! };
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let registry = BreakerRegistry::new(RegistryConfig::default());
//! let policy = BreakerPolicy::default();
//! let breaker = registry.get(AdapterName::Openai, &policy);
//! let answer = breaker.call(|| async { Ok::<_, std::io::Error>(42) }, err_is_transient).await;
//! assert_eq!(answer.ok(), Some(42));
//! # }
//! ```
//!
//! # Why not failsafe
//!
//! failsafe-rs 1.3 (feature-frozen) is the benchmark anchor but not the state
//! machine, because it cannot close the gaps this crate must close:
//!
//! * it admits every call while half-open (no probe limit, so a recovering
//!   dependency gets the whole herd at once);
//! * it records nothing when the wrapped future is dropped, so a timeout or a
//!   disconnect outside the breaker makes the call vanish, and a probe that is
//!   dropped or hangs leaves nothing to bound it (here: the probe slot is
//!   released by the permit's `Drop`, and `half_open_max_wait` re-opens);
//! * it has no state getter (here: [`CircuitBreaker::state`] and
//!   [`CircuitBreaker::snapshot`] feed the `circuit_breaker_state` gauge);
//! * its test clock is thread-local, useless under a multi-threaded runtime
//!   (here: any [`Clock`], e.g. a [`ManualClock`] shared by all threads);
//! * it has no count-based window with a minimum number of calls, no
//!   slow-call rule and no caller classifier over `Ok` values.
//!
//! The state machine here is lock-free on the hot path: state, probe count,
//! probe successes and a generation share one `AtomicU64`; outcomes go into a
//! ring of bits updated with single atomic operations; only transitions take a
//! short mutex, never held across an await. A closed success into a full
//! window with no failure or slow bit set changes nothing and is not
//! written, so healthy traffic costs a few loads per call and no shared
//! write. A closed call and a rejection
//! allocate nothing (checked with dhat in `tests/alloc.rs`); figures against
//! failsafe are in the crate README.
//!
//! # Metrics and events
//!
//! * `circuit_breaker_state{adapter,policy}` gauge: 0 closed, 1 open, 2
//!   half-open, registered at creation (a new series reads 0) and written on
//!   transitions only, under the transition lock, so its last write is the
//!   breaker's state and creating a breaker never resets it; an internal
//!   breaker's `adapter` label is its name. `policy` is
//!   [`BreakerPolicy::label`]: `default` for the default configuration,
//!   else the 16 hex digits of the [`PolicyId`], so two policies of one
//!   adapter have a series each; the values are bounded by the policies the
//!   program defines;
//! * `circuit_breaker_rejected_total{adapter,policy}`,
//!   `circuit_breaker_transitions_total{adapter,policy,to}`,
//!   `circuit_breaker_dropped_closed_calls_total{adapter,policy}` (closed
//!   calls whose permit was dropped without an outcome);
//! * `bulkhead_rejected_total{adapter}`, `resilience_unknown_adapter_total`.
//!
//! Metric handles are registered when a breaker or bulkhead is created, so
//! install the recorder before building a [`Resilience`] or registry.
//! Transitions are `tracing` events (`warn` on open, `info` otherwise); this
//! crate never installs a subscriber.

#![warn(missing_docs)]

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub mod adapter;
pub mod breaker;
pub mod bulkhead;
pub mod clock;
pub mod compose;
pub mod deadline;
pub mod registry;
pub mod retry;
#[cfg(test)]
mod test_recorder;
pub mod timeout;
pub mod verdict;

pub use crate::adapter::AdapterName;
pub use crate::breaker::{
    BreakerConfig, BreakerError, BreakerPolicy, BreakerSnapshot, BreakerState, CallPermit,
    CancelledCalls, CircuitBreaker, ConfigError, HALF_OPEN_RETRY_AFTER, PolicyId, Rejection,
    SlowCallConfig,
};
pub use crate::bulkhead::{Bulkhead, BulkheadConfig, BulkheadFull, BulkheadPermit};
pub use crate::clock::{Clock, ManualClock, SharedClock, StdClock, SystemClock, TokioClock};
pub use crate::compose::{
    CallScope, Policy, Resilience, ResilienceConfig, ResilienceError, TimeoutScope,
};
pub use crate::registry::{BreakerRegistry, RegistryConfig};
pub use crate::retry::{
    RetryBudget, RetryBudgetConfig, RetryPolicy, StopReason, parse_retry_after,
    retry_after_from_headers,
};
pub use crate::timeout::{Elapsed, maybe_timeout, timeout};
pub use crate::verdict::{Verdict, err_is_failure, err_is_transient};
