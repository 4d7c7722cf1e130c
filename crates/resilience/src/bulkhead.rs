//! `Bulkhead`: at most `max_concurrent` calls in flight per adapter, with a
//! bounded wait for a free slot and a clear rejection when there is none.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::adapter::AdapterName;

/// Counter of calls turned away by a full bulkhead, labelled `adapter`.
pub const BULKHEAD_REJECTED_COUNTER: &str = "bulkhead_rejected_total";

/// Limits of one bulkhead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BulkheadConfig {
    /// Calls allowed in flight at once (at least 1).
    pub max_concurrent: usize,
    /// How long a call may wait for a slot before it is rejected; zero means
    /// reject at once when full.
    pub max_wait: Duration,
}

impl Default for BulkheadConfig {
    /// 32 concurrent calls, 100 ms wait.
    fn default() -> Self {
        Self {
            max_concurrent: 32,
            max_wait: Duration::from_millis(100),
        }
    }
}

/// The bulkhead had no free slot within its wait limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "bulkhead for {adapter} is full ({max_concurrent} calls in flight), gave up after {waited:?}"
)]
pub struct BulkheadFull {
    /// Adapter whose bulkhead was full.
    pub adapter: AdapterName,
    /// Its concurrency limit.
    pub max_concurrent: usize,
    /// How long the call waited: the configured `max_wait`, the shorter
    /// limit given to [`Bulkhead::acquire_within`], or zero for
    /// [`Bulkhead::try_acquire`], which does not wait.
    pub waited: Duration,
}

/// A concurrency limiter for one adapter.
#[derive(Debug)]
pub struct Bulkhead {
    adapter: AdapterName,
    config: BulkheadConfig,
    semaphore: Arc<Semaphore>,
    rejected: metrics::Counter,
}

/// A slot in a [`Bulkhead`], released on drop.
#[derive(Debug)]
#[must_use = "the slot is released as soon as the permit is dropped"]
pub struct BulkheadPermit {
    _permit: OwnedSemaphorePermit,
}

impl Bulkhead {
    /// A bulkhead for `adapter`; `max_concurrent` is raised to 1 if zero.
    pub fn new(adapter: AdapterName, config: BulkheadConfig) -> Self {
        let config = BulkheadConfig {
            max_concurrent: config.max_concurrent.clamp(1, Semaphore::MAX_PERMITS),
            ..config
        };
        Self {
            adapter,
            config,
            semaphore: Arc::new(Semaphore::new(config.max_concurrent)),
            rejected: metrics::counter!(BULKHEAD_REJECTED_COUNTER, "adapter" => adapter.as_str()),
        }
    }

    /// Waits up to `max_wait` for a slot (tokio timer).
    pub async fn acquire(&self) -> Result<BulkheadPermit, BulkheadFull> {
        self.acquire_for(self.config.max_wait).await
    }

    /// Waits for a slot up to `max_wait` or `limit`, whichever is shorter:
    /// for a caller with a deadline of its own (what is left of it), so the
    /// wait never outlasts the call.
    pub async fn acquire_within(&self, limit: Duration) -> Result<BulkheadPermit, BulkheadFull> {
        self.acquire_for(self.config.max_wait.min(limit)).await
    }

    /// Takes a slot only if one is free now (no wait, so a rejection reports
    /// `waited` zero).
    pub fn try_acquire(&self) -> Result<BulkheadPermit, BulkheadFull> {
        self.try_acquire_quiet()
            .map_err(|()| self.reject(Duration::ZERO))
    }

    /// Free slots right now.
    pub fn available(&self) -> usize {
        self.semaphore.available_permits()
    }

    /// The adapter this bulkhead guards.
    pub fn adapter(&self) -> AdapterName {
        self.adapter
    }

    /// The effective configuration.
    pub fn config(&self) -> BulkheadConfig {
        self.config
    }

    async fn acquire_for(&self, max_wait: Duration) -> Result<BulkheadPermit, BulkheadFull> {
        if let Ok(permit) = self.try_acquire_quiet() {
            return Ok(permit);
        }
        if max_wait.is_zero() {
            return Err(self.reject(max_wait));
        }
        let wait = Arc::clone(&self.semaphore).acquire_owned();
        match tokio::time::timeout(max_wait, wait).await {
            Ok(Ok(permit)) => Ok(BulkheadPermit { _permit: permit }),
            // The semaphore is never closed; treat it like a timeout anyway.
            Ok(Err(_)) | Err(_) => Err(self.reject(max_wait)),
        }
    }

    fn try_acquire_quiet(&self) -> Result<BulkheadPermit, ()> {
        Arc::clone(&self.semaphore)
            .try_acquire_owned()
            .map(|permit| BulkheadPermit { _permit: permit })
            .map_err(|_| ())
    }

    fn reject(&self, waited: Duration) -> BulkheadFull {
        self.rejected.increment(1);
        tracing::debug!(adapter = %self.adapter, "bulkhead full, call rejected");
        BulkheadFull {
            adapter: self.adapter,
            max_concurrent: self.config.max_concurrent,
            waited,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rejects_after_bounded_wait_and_frees_on_drop() {
        let bulkhead = Bulkhead::new(
            AdapterName::Vimeo,
            BulkheadConfig {
                max_concurrent: 2,
                max_wait: Duration::from_millis(50),
            },
        );
        let a = bulkhead.acquire().await.unwrap();
        let _b = bulkhead.try_acquire().unwrap();
        assert_eq!(bulkhead.available(), 0);
        let start = tokio::time::Instant::now();
        let err = bulkhead.acquire().await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_millis(50));
        assert_eq!(err.adapter, AdapterName::Vimeo);
        assert_eq!(err.max_concurrent, 2);
        assert_eq!(err.waited, Duration::from_millis(50));
        // try_acquire does not wait, and does not say it did.
        let err = bulkhead.try_acquire().unwrap_err();
        assert_eq!(err.waited, Duration::ZERO);
        assert!(err.to_string().ends_with("gave up after 0ns"), "{err}");
        drop(a);
        assert!(bulkhead.try_acquire().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_within_waits_the_shorter_of_max_wait_and_the_limit() {
        let bulkhead = Bulkhead::new(
            AdapterName::Soundcloud,
            BulkheadConfig {
                max_concurrent: 1,
                max_wait: Duration::from_millis(100),
            },
        );
        let _held = bulkhead.acquire().await.unwrap();
        for (limit, waited) in [
            (Duration::from_millis(30), Duration::from_millis(30)),
            (Duration::from_secs(5), Duration::from_millis(100)),
            (Duration::ZERO, Duration::ZERO),
        ] {
            let start = tokio::time::Instant::now();
            let err = bulkhead.acquire_within(limit).await.unwrap_err();
            assert_eq!(start.elapsed(), waited, "limit {limit:?}");
            assert_eq!(err.waited, waited, "limit {limit:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waiter_gets_slot_released_within_wait() {
        let bulkhead = Arc::new(Bulkhead::new(
            AdapterName::Gbp,
            BulkheadConfig {
                max_concurrent: 1,
                max_wait: Duration::from_millis(100),
            },
        ));
        let held = bulkhead.acquire().await.unwrap();
        let waiter = {
            let bulkhead = Arc::clone(&bulkhead);
            tokio::spawn(async move { bulkhead.acquire().await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(held);
        assert!(waiter.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn zero_wait_rejects_immediately_and_zero_limit_becomes_one() {
        let bulkhead = Bulkhead::new(
            AdapterName::Ga,
            BulkheadConfig {
                max_concurrent: 0,
                max_wait: Duration::ZERO,
            },
        );
        assert_eq!(bulkhead.config().max_concurrent, 1);
        let _held = bulkhead.acquire().await.unwrap();
        assert!(bulkhead.acquire().await.is_err());
    }
}
