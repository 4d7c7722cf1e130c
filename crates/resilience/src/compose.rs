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
    ///    not opened meanwhile;
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
        let started = self.clock.now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let elapsed = self.clock.now().saturating_duration_since(started);
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
                let elapsed = self.clock.now().saturating_duration_since(started);
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
                    continue;
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
