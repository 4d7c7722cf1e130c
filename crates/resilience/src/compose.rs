//! `Resilience`: bulkhead -> breaker -> retry -> per-attempt timeout in one
//! call, with one breaker registry, one bulkhead per adapter and one retry
//! budget for the process.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::adapter::AdapterName;
use crate::breaker::{BreakerPolicy, BreakerState, Rejection};
use crate::bulkhead::{Bulkhead, BulkheadConfig, BulkheadFull};
use crate::clock::{SharedClock, SystemClock};
use crate::registry::{BreakerRegistry, RegistryConfig};
use crate::retry::{RetryBudget, RetryBudgetConfig, RetryPolicy};
use crate::timeout::maybe_timeout;
use crate::verdict::Verdict;

/// What to apply to one kind of call (cheap to clone; define once, reuse).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Breaker thresholds; with the adapter, the registry key.
    pub breaker: BreakerPolicy,
    /// Retry schedule inside the breaker.
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
    /// The shared retry budget.
    pub retry_budget: RetryBudgetConfig,
    /// Seed for the jitter RNG (tests); `None` seeds from the OS.
    pub jitter_seed: Option<u64>,
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
    /// The last attempt exceeded its time limit.
    #[error("call to {adapter} timed out after {limit:?} on attempt {attempts}")]
    Timeout {
        /// Adapter called.
        adapter: AdapterName,
        /// The last attempt's limit.
        limit: Duration,
        /// Attempts made.
        attempts: u32,
    },
    /// The last attempt's own error.
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
            Self::Inner(e) => Some(e),
            _ => None,
        }
    }
}

/// Bulkheads, breakers and the retry budget of one process.
#[derive(Debug)]
pub struct Resilience {
    registry: BreakerRegistry,
    bulkheads: Vec<Bulkhead>,
    budget: Arc<RetryBudget>,
    clock: SharedClock,
    rng: Mutex<StdRng>,
}

impl Resilience {
    /// Everything on the system clock.
    pub fn new(config: ResilienceConfig) -> Self {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// Breakers, the budget and the retry time budget read `clock`; the
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
                Bulkhead::new(adapter, limits)
            })
            .collect();
        let rng = match config.jitter_seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            registry: BreakerRegistry::with_clock(config.registry, Arc::clone(&clock)),
            bulkheads,
            budget: Arc::new(RetryBudget::with_clock(
                config.retry_budget,
                Arc::clone(&clock),
            )),
            clock,
            rng: Mutex::new(rng),
        }
    }

    /// Runs `f` for `adapter` under `policy`:
    ///
    /// 1. take a slot in the adapter's bulkhead (bounded wait) -- else
    ///    [`ResilienceError::BulkheadFull`];
    /// 2. ask the (adapter, policy) breaker for admission -- else
    ///    [`ResilienceError::Rejected`], and `f` never runs;
    /// 3. deposit into the retry budget, then attempt `f()` under
    ///    `policy.attempt_timeout`; a timeout is a transient failure, other
    ///    results go through `classify`;
    /// 4. retry transient failures after [`RetryPolicy::next_delay`] while
    ///    attempts, time budget and the retry budget allow and the breaker has
    ///    not been opened by other callers (checked before and after the
    ///    sleep);
    /// 5. record the last attempt's verdict in the breaker once.
    ///
    /// `f` is called once per attempt; the breaker sees one outcome per
    /// logical call, so retries absorbed by the retry loop do not count
    /// against the dependency.
    pub async fn call<T, E, F, Fut, C>(
        &self,
        adapter: AdapterName,
        policy: &Policy,
        mut f: F,
        classify: C,
    ) -> Result<T, ResilienceError<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Fn(&Result<T, E>) -> Verdict,
    {
        let _slot = self.bulkhead(adapter).acquire().await?;
        let breaker = self.registry.get(adapter, &policy.breaker);
        let permit = breaker.try_acquire()?;
        self.budget.deposit();
        let started = self.clock.now_nanos();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let elapsed = self.elapsed_since(started);
            let limit = policy
                .attempt_timeout
                .map(|t| t.min(policy.retry.max_elapsed.saturating_sub(elapsed)));
            let (outcome, verdict) = match maybe_timeout(limit, f()).await {
                Ok(result) => {
                    let verdict = classify(&result);
                    (Some(result), verdict)
                }
                Err(_) => (None, Verdict::TRANSIENT),
            };
            if let Verdict::Transient { retry_after } = verdict {
                let elapsed = self.elapsed_since(started);
                let delay = {
                    let mut rng = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
                    policy
                        .retry
                        .next_delay_with(attempts, retry_after, elapsed, &mut *rng)
                };
                if let Some(delay) = delay
                    && breaker.state() != BreakerState::Open
                    && self.budget.try_withdraw()
                {
                    tracing::debug!(%adapter, attempts, ?delay, "retrying transient failure");
                    tokio::time::sleep(delay).await;
                    // Opened by other callers while we waited: give up with
                    // the last result rather than hit a known-bad dependency.
                    if breaker.state() != BreakerState::Open {
                        continue;
                    }
                }
            }
            permit.record(verdict);
            return match outcome {
                Some(Ok(value)) => Ok(value),
                Some(Err(e)) => Err(ResilienceError::Inner(e)),
                None => Err(ResilienceError::Timeout {
                    adapter,
                    limit: limit.unwrap_or_default(),
                    attempts,
                }),
            };
        }
    }

    fn elapsed_since(&self, started: u64) -> Duration {
        Duration::from_nanos(self.clock.now_nanos().saturating_sub(started))
    }

    /// The breaker registry.
    pub fn registry(&self) -> &BreakerRegistry {
        &self.registry
    }

    /// The bulkhead of `adapter`.
    pub fn bulkhead(&self, adapter: AdapterName) -> &Bulkhead {
        // `bulkheads` has one entry per `AdapterName::ALL`, in index order.
        &self.bulkheads[adapter.index()]
    }

    /// The shared retry budget.
    pub fn retry_budget(&self) -> &Arc<RetryBudget> {
        &self.budget
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
    use crate::breaker::BreakerConfig;
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
            ResilienceError::Inner(Upstream::Unavailable(None))
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        // Three sleeps, each within [0, ceiling]: at most 100 + 200 + 400 ms.
        assert!(start.elapsed() <= 700 * MS, "{:?}", start.elapsed());
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
    async fn retry_after_is_honoured_and_clamped() {
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
                        1 => Err(Upstream::Unavailable(Some(Duration::from_secs(3600)))),
                        _ => Ok("done"),
                    }
                },
                classify,
            )
            .await
            .unwrap();
        assert_eq!(value, "done");
        // 1.5 s as asked, then the 1 h hint clamped to 2 s.
        assert_eq!(start.elapsed(), Duration::from_millis(3500));
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
            ResilienceError::Timeout { adapter: AdapterName::Stability, attempts: 4, limit }
                if limit == Duration::from_secs(1)
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
        let r = Arc::new(resilience(RetryBudgetConfig::default()));
        let p = policy();
        let calls = Arc::new(AtomicU32::new(0));
        let retrying = {
            let (r, p, calls) = (Arc::clone(&r), p.clone(), Arc::clone(&calls));
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
            ResilienceError::Inner(Upstream::Unavailable(_))
        ));
        // The retry due at 500 ms was not made.
        assert_eq!(calls.load(Ordering::SeqCst), 1);
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
