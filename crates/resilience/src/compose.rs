//! `Resilience`: the one bulkhead -> breaker -> retry -> per-attempt timeout
//! loop of the workspace, and the process-wide set it runs on (a breaker
//! registry, a bulkhead and a retry budget per adapter, the jitter RNG).
//! Clones share that set; `smartbeak-utils`'s fetch is built on it.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::adapter::AdapterName;
use crate::breaker::{BreakerPolicy, CircuitBreaker, Rejection};
use crate::bulkhead::{Bulkhead, BulkheadConfig, BulkheadFull, BulkheadPermit};
use crate::clock::{SharedClock, SystemClock};
use crate::registry::{BreakerRegistry, RegistryConfig};
use crate::retry::{RetryBudget, RetryBudgetConfig, RetryPolicy, StopReason};
use crate::timeout::maybe_timeout;
use crate::verdict::Verdict;

/// What to apply to one kind of call (cheap to clone; define once, reuse).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Breaker thresholds; with the adapter, the registry key.
    pub breaker: BreakerPolicy,
    /// Retry schedule inside the breaker; its `max_elapsed` is the total
    /// deadline of the call (bulkhead wait, attempts and waits).
    pub retry: RetryPolicy,
    /// Limit for each attempt (also cut to what is left of
    /// `retry.max_elapsed`); `None` for no per-attempt limit.
    pub attempt_timeout: Option<Duration>,
}

/// Process-wide settings of a [`Resilience`].
#[derive(Debug, Clone, Default)]
pub struct ResilienceConfig {
    /// Breaker registry bounds.
    pub registry: RegistryConfig,
    /// Bulkhead of every adapter not in `bulkhead_overrides`.
    pub bulkhead: BulkheadConfig,
    /// Per-adapter bulkheads.
    pub bulkhead_overrides: Vec<(AdapterName, BulkheadConfig)>,
    /// Limits of each adapter's retry budget (one budget per adapter).
    pub retry_budget: RetryBudgetConfig,
    /// Seed for the jitter RNG (tests); `None` seeds from the OS.
    pub jitter_seed: Option<u64>,
}

/// Per-call knobs of [`Resilience::call_holding`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallScope {
    /// What an attempt that ran out of time means. `Verdict::TRANSIENT` by
    /// default (retried); `Verdict::Failure` for an operation that must not
    /// be repeated once it may have reached the dependency (a POST without an
    /// idempotency key): it still counts against the breaker, and the call
    /// stops with [`ResilienceError::Timeout`] whose `reason` is `None`.
    pub timed_out: Verdict,
}

impl Default for CallScope {
    fn default() -> Self {
        Self {
            timed_out: Verdict::TRANSIENT,
        }
    }
}

/// Which limit a [`ResilienceError::Timeout`] hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeoutScope {
    /// The last attempt ran past its per-attempt timeout.
    Attempt,
    /// The last attempt was cut short by the total deadline
    /// (`RetryPolicy::max_elapsed`).
    Deadline,
}

impl std::fmt::Display for TimeoutScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Attempt => "attempt timeout",
            Self::Deadline => "total deadline",
        })
    }
}

/// Why [`Resilience::call`] did not return the call's value.
#[derive(Debug, thiserror::Error)]
pub enum ResilienceError<E> {
    /// The adapter's bulkhead stayed full for its whole wait.
    #[error(transparent)]
    BulkheadFull(#[from] BulkheadFull),
    /// The adapter's breaker is open (or half-open with all probes taken);
    /// nothing was attempted.
    #[error("circuit breaker for {adapter} is open, next probe in {retry_after:?}")]
    Rejected {
        /// Adapter whose breaker rejected the call.
        adapter: AdapterName,
        /// Time until a probe may be admitted.
        retry_after: Duration,
    },
    /// The last attempt exceeded its time limit and was not retried.
    #[error("call to {adapter} timed out ({scope}, limit {limit:?}) on attempt {attempts}")]
    Timeout {
        /// Adapter called.
        adapter: AdapterName,
        /// The last attempt's limit.
        limit: Duration,
        /// Which limit it was.
        scope: TimeoutScope,
        /// Attempts made.
        attempts: u32,
        /// Why it was not retried; `None` when [`CallScope::timed_out`] is
        /// not transient.
        reason: Option<StopReason>,
    },
    /// The last attempt failed transiently and was not retried.
    #[error("call to {adapter} gave up after {attempts} attempt(s): {reason}")]
    Exhausted {
        /// Adapter called.
        adapter: AdapterName,
        /// Attempts made.
        attempts: u32,
        /// Why no further attempt was made.
        reason: StopReason,
        /// The last attempt's error.
        #[source]
        error: E,
    },
    /// The last attempt's own error, classified as not worth retrying.
    #[error(transparent)]
    Inner(E),
}

impl<E> From<Rejection> for ResilienceError<E> {
    fn from(r: Rejection) -> Self {
        Self::Rejected {
            adapter: r.adapter,
            retry_after: r.retry_after,
        }
    }
}

impl<E> ResilienceError<E> {
    /// The call's own error, if that is what ended it.
    pub fn into_inner(self) -> Option<E> {
        match self {
            Self::Inner(e) | Self::Exhausted { error: e, .. } => Some(e),
            _ => None,
        }
    }
}

/// The process-wide resilience set: one [`BreakerRegistry`], one
/// [`Bulkhead`] and one [`RetryBudget`] per [`AdapterName`], and the jitter
/// RNG, with the one retry loop ([`call`](Self::call)) that uses them.
///
/// Build it once at start-up and clone it into every component and every
/// `smartbeak_utils::fetch::HttpClient` (a clone is an `Arc` clone: the same
/// breakers, bulkheads and budgets). There is no hidden global set: an
/// `HttpClient` cannot be built without one.
#[derive(Debug, Clone)]
pub struct Resilience {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Arc<BreakerRegistry>,
    /// Indexed by `AdapterName::index`.
    bulkheads: Vec<Arc<Bulkhead>>,
    /// Indexed by `AdapterName::index`.
    budgets: Vec<Arc<RetryBudget>>,
    clock: SharedClock,
    rng: Mutex<StdRng>,
}

impl Resilience {
    /// Everything on the system clock.
    pub fn new(config: ResilienceConfig) -> Self {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// Breakers, the budgets and the call's time budget read `clock`; the
    /// bulkhead wait, attempt timeouts and retry sleeps use tokio's timer, so
    /// pair a paused runtime with [`TokioClock`](crate::TokioClock).
    pub fn with_clock(config: ResilienceConfig, clock: SharedClock) -> Self {
        let bulkheads = AdapterName::ALL
            .iter()
            .map(|&adapter| {
                let limits = config
                    .bulkhead_overrides
                    .iter()
                    .rev()
                    .find(|(a, _)| *a == adapter)
                    .map_or(config.bulkhead, |(_, c)| *c);
                Arc::new(Bulkhead::new(adapter, limits))
            })
            .collect();
        let budgets = AdapterName::ALL
            .iter()
            .map(|_| {
                Arc::new(RetryBudget::with_clock(
                    config.retry_budget,
                    Arc::clone(&clock),
                ))
            })
            .collect();
        let rng = match config.jitter_seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            inner: Arc::new(Inner {
                registry: Arc::new(BreakerRegistry::with_clock(
                    config.registry,
                    Arc::clone(&clock),
                )),
                bulkheads,
                budgets,
                clock,
                rng: Mutex::new(rng),
            }),
        }
    }

    /// Runs `f` for `adapter` under `policy`:
    ///
    /// 1. take a slot in the adapter's bulkhead, waiting at most its
    ///    `max_wait` and never past `policy.retry.max_elapsed` -- else
    ///    [`ResilienceError::BulkheadFull`];
    /// 2. ask the (adapter, policy) breaker for admission -- else
    ///    [`ResilienceError::Rejected`], and `f` never runs;
    /// 3. deposit into the adapter's retry budget, then attempt `f()` under
    ///    `min(policy.attempt_timeout, what is left of max_elapsed)`; a
    ///    timeout is a transient failure (with [`call_holding`](Self::call_holding),
    ///    whatever [`CallScope::timed_out`] says), other results go through
    ///    `classify`;
    /// 4. retry `Transient` verdicts after [`RetryPolicy::next_delay`] while
    ///    attempts, the time budget and the adapter's retry budget allow and
    ///    the breaker permit is still current (checked before and after the
    ///    wait: a breaker that opened, or opened and half-opened again, since
    ///    admission stops the loop rather than letting a retry out beyond the
    ///    probe limit);
    /// 5. record the last attempt's verdict in the breaker once, timed from
    ///    the start of that attempt (the slow-call rule judges one attempt,
    ///    not the retries and waits before it).
    ///
    /// `f` is called once per attempt; the breaker sees one outcome per
    /// logical call, so retries absorbed by the loop do not count against
    /// the dependency. An `Ok` is returned as is, whatever its verdict.
    pub async fn call<T, E, F, Fut, C>(
        &self,
        adapter: AdapterName,
        policy: &Policy,
        f: F,
        classify: C,
    ) -> Result<T, ResilienceError<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Fn(&Result<T, E>) -> Verdict,
    {
        self.call_holding(adapter, policy, CallScope::default(), f, classify)
            .await
            .map(|(value, _slot)| value)
    }

    /// [`call`](Self::call) with per-call knobs, returning the bulkhead slot
    /// with the value so the caller keeps the adapter's slot while it
    /// consumes the value (fetch reads a response body under it).
    ///
    /// # Errors
    ///
    /// As [`call`](Self::call).
    pub async fn call_holding<T, E, F, Fut, C>(
        &self,
        adapter: AdapterName,
        policy: &Policy,
        scope: CallScope,
        mut f: F,
        classify: C,
    ) -> Result<(T, BulkheadPermit), ResilienceError<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Fn(&Result<T, E>) -> Verdict,
    {
        let started = self.inner.clock.now_nanos();
        let total = policy.retry.max_elapsed;
        let slot = self.bulkhead(adapter).acquire_within(total).await?;
        let breaker = self.inner.registry.get(adapter, &policy.breaker);
        let mut permit = breaker.try_acquire()?;
        let budget = self.retry_budget(adapter);
        budget.deposit();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let remaining =
                (total != Duration::MAX).then(|| total.saturating_sub(self.elapsed_since(started)));
            let (limit, limit_scope) = match (policy.attempt_timeout, remaining) {
                (Some(attempt), Some(left)) if left < attempt => {
                    (Some(left), TimeoutScope::Deadline)
                }
                (Some(attempt), _) => (Some(attempt), TimeoutScope::Attempt),
                (None, Some(left)) => (Some(left), TimeoutScope::Deadline),
                (None, None) => (None, TimeoutScope::Attempt),
            };
            let (outcome, verdict) = match maybe_timeout(limit, f()).await {
                Ok(result) => {
                    let verdict = classify(&result);
                    (Some(result), verdict)
                }
                Err(_) => (None, scope.timed_out),
            };
            let stop = match verdict {
                Verdict::Transient { retry_after } => {
                    match self.next_retry(
                        &mut permit,
                        budget,
                        policy,
                        attempts,
                        retry_after,
                        started,
                    ) {
                        Ok(delay) => {
                            tracing::debug!(%adapter, attempts, ?delay, "retrying transient failure");
                            tokio::time::sleep(delay).await;
                            // Opened (and maybe half-opened) by other callers
                            // while we waited: give up with the last result.
                            if permit.prepare_retry() {
                                continue;
                            }
                            Some(StopReason::CircuitOpen)
                        }
                        Err(reason) => Some(reason),
                    }
                }
                _ => None,
            };
            permit.record(verdict);
            return match (outcome, stop) {
                (Some(Ok(value)), _) => Ok((value, slot)),
                (Some(Err(error)), None) => Err(ResilienceError::Inner(error)),
                (Some(Err(error)), Some(reason)) => Err(ResilienceError::Exhausted {
                    adapter,
                    attempts,
                    reason,
                    error,
                }),
                (None, reason) => Err(ResilienceError::Timeout {
                    adapter,
                    limit: limit.unwrap_or_default(),
                    scope: limit_scope,
                    attempts,
                    reason,
                }),
            };
        }
    }

    /// The wait before the next attempt, or why there is none, checked in
    /// this order: the retry policy (attempts, Retry-After cap, time budget),
    /// the breaker permit (still current), the adapter's retry budget.
    fn next_retry(
        &self,
        permit: &mut crate::breaker::CallPermit<'_>,
        budget: &RetryBudget,
        policy: &Policy,
        attempts: u32,
        retry_after: Option<Duration>,
        started: u64,
    ) -> Result<Duration, StopReason> {
        let elapsed = self.elapsed_since(started);
        let delay = {
            let mut rng = self
                .inner
                .rng
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            policy
                .retry
                .next_delay_with(attempts, retry_after, elapsed, &mut *rng)?
        };
        if !permit.prepare_retry() {
            return Err(StopReason::CircuitOpen);
        }
        if !budget.try_withdraw() {
            return Err(StopReason::RetryBudget);
        }
        Ok(delay)
    }

    fn elapsed_since(&self, started: u64) -> Duration {
        Duration::from_nanos(self.inner.clock.now_nanos().saturating_sub(started))
    }

    /// The breaker registry (shared by every clone).
    pub fn registry(&self) -> &Arc<BreakerRegistry> {
        &self.inner.registry
    }

    /// The breaker of `adapter` under `policy` (created on first use).
    pub fn breaker(&self, adapter: AdapterName, policy: &BreakerPolicy) -> Arc<CircuitBreaker> {
        self.inner.registry.get(adapter, policy)
    }

    /// The bulkhead of `adapter`.
    pub fn bulkhead(&self, adapter: AdapterName) -> &Arc<Bulkhead> {
        // One entry per `AdapterName::ALL`, in index order.
        &self.inner.bulkheads[adapter.index()]
    }

    /// The retry budget of `adapter`.
    pub fn retry_budget(&self, adapter: AdapterName) -> &Arc<RetryBudget> {
        // One entry per `AdapterName::ALL`, in index order.
        &self.inner.budgets[adapter.index()]
    }

    /// Whether `self` and `other` are the same set (clones of one another).
    pub fn same_as(&self, other: &Resilience) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Default for Resilience {
    fn default() -> Self {
        Self::new(ResilienceConfig::default())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::breaker::{BreakerConfig, BreakerState};
    use crate::clock::TokioClock;
    use crate::verdict::{err_is_failure, err_is_transient};

    const MS: Duration = Duration::from_millis(1);

    fn resilience(budget: RetryBudgetConfig) -> Resilience {
        Resilience::with_clock(
            ResilienceConfig {
                retry_budget: budget,
                jitter_seed: Some(3),
                bulkhead: BulkheadConfig {
                    max_concurrent: 2,
                    max_wait: 10 * MS,
                },
                ..ResilienceConfig::default()
            },
            Arc::new(TokioClock::new()),
        )
    }

    fn policy() -> Policy {
        Policy {
            breaker: BreakerPolicy::new(BreakerConfig {
                consecutive_failures: 2,
                ..BreakerConfig::default()
            })
            .unwrap(),
            retry: RetryPolicy {
                max_attempts: 4,
                base_delay: 100 * MS,
                max_delay: 400 * MS,
                max_elapsed: Duration::from_secs(10),
                min_last_attempt: 100 * MS,
                max_retry_after: Duration::from_secs(2),
            },
            attempt_timeout: Some(Duration::from_secs(1)),
        }
    }

    #[derive(Debug, PartialEq)]
    enum Upstream {
        Unavailable(Option<Duration>),
        NotFound,
    }

    fn classify(r: &Result<&'static str, Upstream>) -> Verdict {
        match r {
            Ok(_) | Err(Upstream::NotFound) => Verdict::Success,
            Err(Upstream::Unavailable(retry_after)) => Verdict::Transient {
                retry_after: *retry_after,
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_failures_up_to_max_attempts_within_jitter_bounds() {
        let r = resilience(RetryBudgetConfig::default());
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let err = r
            .call(
                AdapterName::Gsc,
                &policy(),
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err::<&str, _>(Upstream::Unavailable(None))
                },
                classify,
            )
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            ResilienceError::Exhausted {
                error: Upstream::Unavailable(None),
                reason: StopReason::MaxAttempts,
                attempts: 4,
                ..
            }
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        // Three sleeps, each drawn from [0, ceiling] by the seeded RNG: the
        // call took exactly their sum, which is neither zero nor above
        // 100 + 200 + 400 ms.
        let mut rng = StdRng::seed_from_u64(3);
        let expected: Duration = (1..4)
            .map(|n| {
                policy()
                    .retry
                    .next_delay_with(n, None, Duration::ZERO, &mut rng)
                    .unwrap()
            })
            .sum();
        assert!(expected > 100 * MS && expected <= 700 * MS, "{expected:?}");
        // tokio's timer rounds each sleep up to its millisecond.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= expected && elapsed <= expected + 3 * MS,
            "{elapsed:?} vs {expected:?}"
        );
        // One logical failure recorded, not four.
        let breaker = r.registry().get(AdapterName::Gsc, &policy().breaker);
        assert_eq!(breaker.snapshot().window_failures, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn succeeds_after_a_transient_failure() {
        let r = resilience(RetryBudgetConfig::default());
        let calls = AtomicU32::new(0);
        let value = r
            .call(
                AdapterName::Gsc,
                &policy(),
                || async {
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        Err(Upstream::Unavailable(None))
                    } else {
                        Ok("fresh")
                    }
                },
                classify,
            )
            .await
            .unwrap();
        assert_eq!((value, calls.load(Ordering::SeqCst)), ("fresh", 2));
    }

    #[tokio::test(start_paused = true)]
    async fn non_transient_errors_are_not_retried() {
        let r = resilience(RetryBudgetConfig::default());
        let calls = AtomicU32::new(0);
        let err = r
            .call(
                AdapterName::Ahrefs,
                &policy(),
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err::<&str, _>(Upstream::NotFound)
                },
                classify,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ResilienceError::Inner(Upstream::NotFound)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let failure = r
            .call(
                AdapterName::Ahrefs,
                &policy(),
                || async { Err::<(), _>("501") },
                err_is_failure,
            )
            .await;
        assert!(matches!(failure, Err(ResilienceError::Inner("501"))));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_up_to_the_cap() {
        let r = resilience(RetryBudgetConfig::default());
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let value = r
            .call(
                AdapterName::Openai,
                &policy(),
                || async {
                    match calls.fetch_add(1, Ordering::SeqCst) {
                        0 => Err(Upstream::Unavailable(Some(Duration::from_millis(1500)))),
                        1 => Err(Upstream::Unavailable(Some(Duration::from_secs(2)))),
                        _ => Ok("done"),
                    }
                },
                classify,
            )
            .await
            .unwrap();
        assert_eq!(value, "done");
        // 1.5 s, then 2 s (the cap itself), as asked.
        assert_eq!(start.elapsed(), Duration::from_millis(3500));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_above_the_cap_gives_up_at_once_with_the_servers_value() {
        let r = resilience(RetryBudgetConfig::default());
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let err = r
            .call(
                AdapterName::Openai,
                &policy(),
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err::<&str, _>(Upstream::Unavailable(Some(Duration::from_secs(3600))))
                },
                classify,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ResilienceError::Exhausted {
                    attempts: 1,
                    reason: StopReason::RetryAfterTooLong { retry_after },
                    ..
                } if retry_after == Duration::from_secs(3600)
            ),
            "{err:?}"
        );
        // No early retry: one call, no wait.
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn attempt_timeouts_are_transient_and_reported() {
        let r = resilience(RetryBudgetConfig::default());
        let calls = AtomicU32::new(0);
        let err = r
            .call(
                AdapterName::Stability,
                &policy(),
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    std::future::pending::<Result<(), ()>>().await
                },
                err_is_transient,
            )
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            ResilienceError::Timeout {
                adapter: AdapterName::Stability,
                attempts: 4,
                limit,
                scope: TimeoutScope::Attempt,
                reason: Some(StopReason::MaxAttempts),
            } if limit == Duration::from_secs(1)
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn exhausted_retry_budget_stops_retries() {
        let r = resilience(RetryBudgetConfig {
            ttl: Duration::from_secs(10),
            min_retries_per_sec: 0,
            retry_percent: 0,
        });
        let calls = AtomicU32::new(0);
        let result = r
            .call(
                AdapterName::Mailchimp,
                &policy(),
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err::<&str, _>(Upstream::Unavailable(None))
                },
                classify,
            )
            .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn open_breaker_rejects_without_running_and_other_adapters_flow() {
        let r = resilience(RetryBudgetConfig::default());
        let p = Policy {
            retry: RetryPolicy::never(),
            ..policy()
        };
        for _ in 0..2 {
            let _ = r
                .call(
                    AdapterName::Linkedin,
                    &p,
                    || async { Err::<(), _>(()) },
                    err_is_transient,
                )
                .await;
        }
        let calls = AtomicU32::new(0);
        let err = r
            .call(
                AdapterName::Linkedin,
                &p,
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, ()>(())
                },
                err_is_transient,
            )
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            ResilienceError::Rejected { adapter: AdapterName::Linkedin, retry_after }
                if retry_after == Duration::from_secs(30)
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        let ok = r
            .call(
                AdapterName::Twitter,
                &p,
                || async { Ok::<_, ()>(1) },
                err_is_transient,
            )
            .await;
        assert_eq!(ok.unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_once_the_breaker_opens() {
        let r = resilience(RetryBudgetConfig::default());
        let p = policy();
        let calls = Arc::new(AtomicU32::new(0));
        let retrying = {
            let (r, p, calls) = (r.clone(), p.clone(), Arc::clone(&calls));
            tokio::spawn(async move {
                r.call(
                    AdapterName::Pinterest,
                    &p,
                    || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        Err::<&str, _>(Upstream::Unavailable(Some(Duration::from_millis(500))))
                    },
                    classify,
                )
                .await
            })
        };
        // While it waits out its first Retry-After, other callers trip the breaker.
        tokio::time::sleep(100 * MS).await;
        let breaker = r.registry().get(AdapterName::Pinterest, &p.breaker);
        for _ in 0..2 {
            breaker.try_acquire().unwrap().record(Verdict::Failure);
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        let err = retrying.await.unwrap().unwrap_err();
        assert!(matches!(
            err,
            ResilienceError::Exhausted {
                error: Upstream::Unavailable(_),
                reason: StopReason::CircuitOpen,
                ..
            }
        ));
        // The retry due at 500 ms was not made.
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_never_goes_out_on_a_permit_from_before_a_half_open_period() {
        // Open for 100 ms, then one probe at a time.
        let r = resilience(RetryBudgetConfig::default());
        let p = Policy {
            breaker: BreakerPolicy::new(BreakerConfig {
                consecutive_failures: 2,
                open_duration: 100 * MS,
                open_backoff_factor: 1,
                max_open_duration: 100 * MS,
                half_open_probes: 1,
                half_open_successes: 1,
                ..BreakerConfig::default()
            })
            .unwrap(),
            ..policy()
        };
        let calls = Arc::new(AtomicU32::new(0));
        let retrying = {
            let (r, p, calls) = (r.clone(), p.clone(), Arc::clone(&calls));
            tokio::spawn(async move {
                r.call(
                    AdapterName::Pinterest,
                    &p,
                    || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        Err::<&str, _>(Upstream::Unavailable(Some(Duration::from_millis(500))))
                    },
                    classify,
                )
                .await
            })
        };
        // During its 500 ms wait the breaker opens, and at 200 ms another
        // caller becomes the one half-open probe (and keeps running).
        tokio::time::sleep(50 * MS).await;
        let breaker = r.breaker(AdapterName::Pinterest, &p.breaker);
        for _ in 0..2 {
            breaker.try_acquire().unwrap().record(Verdict::Failure);
        }
        tokio::time::sleep(150 * MS).await;
        let probe = breaker.try_acquire().unwrap();
        assert!(probe.is_probe());
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        let err = retrying.await.unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                ResilienceError::Exhausted {
                    reason: StopReason::CircuitOpen,
                    attempts: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        // The retry due at 500 ms did not go out beside the probe.
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(breaker.snapshot().probes_admitted, 1);
        probe.record(Verdict::Success);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn the_slow_call_rule_times_the_last_attempt_not_the_waits_before_it() {
        let r = resilience(RetryBudgetConfig::default());
        let p = Policy {
            breaker: BreakerPolicy::new(BreakerConfig {
                slow_calls: Some(crate::breaker::SlowCallConfig {
                    threshold: 500 * MS,
                    rate_percent: 100,
                }),
                minimum_calls: 1,
                ..BreakerConfig::default()
            })
            .unwrap(),
            ..policy()
        };
        let calls = AtomicU32::new(0);
        // A 503 with Retry-After: 2 s, then a quick success.
        let value = r
            .call(
                AdapterName::Gsc,
                &p,
                || async {
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        Err(Upstream::Unavailable(Some(Duration::from_secs(2))))
                    } else {
                        tokio::time::sleep(10 * MS).await;
                        Ok("fresh")
                    }
                },
                classify,
            )
            .await
            .unwrap();
        assert_eq!(value, "fresh");
        let snapshot = r.breaker(AdapterName::Gsc, &p.breaker).snapshot();
        assert_eq!(
            (snapshot.window_calls, snapshot.window_slow, snapshot.state),
            (1, 0, BreakerState::Closed)
        );
        // A genuinely slow attempt still counts as slow.
        let slow = r
            .call(
                AdapterName::Gsc,
                &p,
                || async {
                    tokio::time::sleep(800 * MS).await;
                    Ok::<_, Upstream>("slow")
                },
                classify,
            )
            .await;
        assert!(slow.is_ok());
        let snapshot = r.breaker(AdapterName::Gsc, &p.breaker).snapshot();
        assert_eq!(snapshot.window_slow, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn each_adapter_retries_on_its_own_budget() {
        // No floor: retries are 20 % of the adapter's own requests.
        let r = resilience(RetryBudgetConfig {
            ttl: Duration::from_secs(10),
            min_retries_per_sec: 0,
            retry_percent: 20,
        });
        // A busy adapter's traffic...
        for _ in 0..1000 {
            let ok = r
                .call(
                    AdapterName::Openai,
                    &policy(),
                    || async { Ok::<_, Upstream>("ok") },
                    classify,
                )
                .await;
            assert!(ok.is_ok());
        }
        assert_eq!(r.retry_budget(AdapterName::Openai).available(), 200);
        // ...buys no retries for a small failing one.
        let calls = AtomicU32::new(0);
        let err = r
            .call(
                AdapterName::Podcast,
                &policy(),
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err::<&str, _>(Upstream::Unavailable(None))
                },
                classify,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ResilienceError::Exhausted {
                    reason: StopReason::RetryBudget,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Clones share the budgets: the set is process-wide.
        let clone = r.clone();
        assert!(clone.same_as(&r));
        assert!(Arc::ptr_eq(
            clone.retry_budget(AdapterName::Openai),
            r.retry_budget(AdapterName::Openai)
        ));
        assert!(Arc::ptr_eq(clone.registry(), r.registry()));
        assert!(Arc::ptr_eq(
            clone.bulkhead(AdapterName::Vimeo),
            r.bulkhead(AdapterName::Vimeo)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn max_elapsed_bounds_an_attempt_without_its_own_timeout() {
        let r = resilience(RetryBudgetConfig::default());
        let p = Policy {
            retry: RetryPolicy {
                max_elapsed: 500 * MS,
                ..policy().retry
            },
            attempt_timeout: None,
            ..policy()
        };
        let start = tokio::time::Instant::now();
        let call = r.call(
            AdapterName::Ahrefs,
            &p,
            std::future::pending::<Result<(), ()>>,
            err_is_transient,
        );
        let err = tokio::time::timeout(Duration::from_secs(60), call)
            .await
            .expect("the call outlived its max_elapsed")
            .unwrap_err();
        assert!(
            matches!(
                err,
                ResilienceError::Timeout {
                    attempts: 1,
                    scope: TimeoutScope::Deadline,
                    reason: Some(StopReason::Deadline),
                    limit,
                    ..
                } if limit == 500 * MS
            ),
            "{err:?}"
        );
        assert_eq!(start.elapsed(), 500 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_that_is_not_transient_is_not_retried() {
        let r = resilience(RetryBudgetConfig::default());
        let calls = AtomicU32::new(0);
        let err = r
            .call_holding(
                AdapterName::Stability,
                &policy(),
                CallScope {
                    timed_out: Verdict::Failure,
                },
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    std::future::pending::<Result<(), ()>>().await
                },
                err_is_transient,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ResilienceError::Timeout {
                    attempts: 1,
                    reason: None,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let snapshot = r
            .breaker(AdapterName::Stability, &policy().breaker)
            .snapshot();
        assert_eq!(snapshot.window_failures, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn full_bulkhead_rejects_with_a_clear_error() {
        let r = resilience(RetryBudgetConfig::default());
        let _a = r.bulkhead(AdapterName::Vimeo).acquire().await.unwrap();
        let _b = r.bulkhead(AdapterName::Vimeo).acquire().await.unwrap();
        let err = r
            .call(
                AdapterName::Vimeo,
                &policy(),
                || async { Ok::<_, &str>(()) },
                err_is_transient,
            )
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "bulkhead for vimeo is full (2 calls in flight), gave up after 10ms"
        );
        // Another adapter has its own bulkhead.
        let ok = r
            .call(
                AdapterName::Soundcloud,
                &policy(),
                || async { Ok::<_, ()>(()) },
                err_is_transient,
            )
            .await;
        assert!(ok.is_ok());
    }

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn call_futures_are_send_so_they_can_be_spawned() {
        let r = Resilience::default();
        let p = Policy::default();
        let fut = r.call(
            AdapterName::Ga,
            &p,
            || async { Ok::<_, ()>(()) },
            err_is_transient,
        );
        assert_send(&fut);
        let breaker = r.registry().get(AdapterName::Ga, &p.breaker);
        let fut = breaker.call(|| async { Ok::<_, ()>(()) }, err_is_transient);
        assert_send(&fut);
    }

    #[test]
    fn overrides_pick_per_adapter_bulkheads() {
        let r = Resilience::new(ResilienceConfig {
            bulkhead_overrides: vec![(
                AdapterName::Podcast,
                BulkheadConfig {
                    max_concurrent: 1,
                    max_wait: Duration::ZERO,
                },
            )],
            ..ResilienceConfig::default()
        });
        assert_eq!(r.bulkhead(AdapterName::Podcast).config().max_concurrent, 1);
        assert_eq!(r.bulkhead(AdapterName::Gbp).config().max_concurrent, 32);
        assert_eq!(r.bulkhead(AdapterName::Gbp).adapter(), AdapterName::Gbp);
    }
}
