//! `BreakerRegistry`: one breaker per (adapter, policy), shared by every
//! caller in the process, held in a bounded `quick_cache` with an idle TTL
//! checked on read. Breakers that are not closed are pinned, so eviction can
//! never reset an open breaker.

use std::sync::Arc;
use std::time::Duration;

use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Lifecycle, OptionsBuilder, UnitWeighter};

use crate::adapter::AdapterName;
use crate::breaker::{BreakerPolicy, BreakerState, CircuitBreaker, PolicyId};
use crate::clock::{SharedClock, SystemClock};

/// Registry bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Most breakers kept (closed ones are evicted beyond it; see the type docs).
    pub capacity: usize,
    /// A closed breaker unused for this long is replaced by a fresh one on
    /// its next lookup.
    pub idle_ttl: Duration,
}

impl Default for RegistryConfig {
    /// Capacity 100, idle TTL 1 h (the original's values).
    fn default() -> Self {
        Self {
            capacity: 100,
            idle_ttl: Duration::from_secs(3600),
        }
    }
}

/// Registry key: the adapter (closed set) and the policy fingerprint.
pub type BreakerKey = (AdapterName, PolicyId);

/// Bounded map from (adapter, policy) to a shared [`CircuitBreaker`].
///
/// Bounds: keys are an [`AdapterName`] (23 values, attacker-chosen names all
/// collapse to `unknown`) times the policies the program defines, so the key
/// set is small by construction. The cache holds at most `capacity` entries
/// of closed breakers; breakers that are open or half-open are pinned
/// (quick_cache's `Lifecycle::is_pinned`) and never evicted or expired, so an
/// outage is never forgotten. Pinned entries can only exceed the capacity if
/// more than `capacity` (adapter, policy) pairs are open at once.
///
/// The cache has a single shard so the capacity is exact rather than split
/// across shards.
pub struct BreakerRegistry {
    cache: Cache<BreakerKey, Arc<CircuitBreaker>, UnitWeighter, DefaultHashBuilder, PinNotClosed>,
    config: RegistryConfig,
    clock: SharedClock,
}

impl std::fmt::Debug for BreakerRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BreakerRegistry")
            .field("config", &self.config)
            .field("len", &self.cache.len())
            .finish_non_exhaustive()
    }
}

/// Pins every breaker that is not closed.
#[derive(Debug, Clone, Copy, Default)]
struct PinNotClosed;

impl Lifecycle<BreakerKey, Arc<CircuitBreaker>> for PinNotClosed {
    type RequestState = ();

    fn is_pinned(&self, _key: &BreakerKey, breaker: &Arc<CircuitBreaker>) -> bool {
        breaker.state() != BreakerState::Closed
    }

    fn begin_request(&self) -> Self::RequestState {}
}

impl BreakerRegistry {
    /// A registry on the system clock.
    pub fn new(config: RegistryConfig) -> Self {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// A registry whose TTL and breakers read time from `clock`.
    pub fn with_clock(config: RegistryConfig, clock: SharedClock) -> Self {
        let capacity = config.capacity.max(1);
        let options = OptionsBuilder::new()
            .estimated_items_capacity(capacity)
            .weight_capacity(capacity as u64)
            .shards(1)
            .build();
        let cache = match options {
            Ok(options) => Cache::with_options(
                options,
                UnitWeighter,
                DefaultHashBuilder::default(),
                PinNotClosed,
            ),
            // Unreachable with the values above; fall back to the plain
            // constructor rather than panic.
            Err(_) => Cache::with(
                capacity,
                capacity as u64,
                UnitWeighter,
                DefaultHashBuilder::default(),
                PinNotClosed,
            ),
        };
        Self {
            cache,
            config: RegistryConfig { capacity, ..config },
            clock,
        }
    }

    /// The breaker for `adapter` under `policy`, created closed on first use
    /// (or after its idle TTL ran out while closed).
    pub fn get(&self, adapter: AdapterName, policy: &BreakerPolicy) -> Arc<CircuitBreaker> {
        let key = (adapter, policy.id());
        let now = self.clock.now();
        if let Some(breaker) = self.cache.get(&key) {
            if breaker.state() != BreakerState::Closed
                || breaker.idle_for(now) <= self.config.idle_ttl
            {
                breaker.touch(now);
                return breaker;
            }
            // Idle and closed: drop it (only if it is still the same one) and
            // build a fresh one below.
            self.cache
                .remove_if(&key, |current| Arc::ptr_eq(current, &breaker));
        }
        let created = self.cache.get_or_insert_with(&key, || {
            Ok::<_, std::convert::Infallible>(Arc::new(CircuitBreaker::with_clock(
                adapter,
                policy.clone(),
                Arc::clone(&self.clock),
            )))
        });
        let breaker = match created {
            Ok(breaker) => breaker,
            Err(never) => match never {},
        };
        breaker.touch(now);
        breaker
    }

    /// The breaker for the key if present, without creating, touching or
    /// expiring anything.
    pub fn peek(
        &self,
        adapter: AdapterName,
        policy: &BreakerPolicy,
    ) -> Option<Arc<CircuitBreaker>> {
        self.cache.peek(&(adapter, policy.id()))
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether no breaker is held.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// The effective configuration.
    pub fn config(&self) -> RegistryConfig {
        self.config
    }

    /// The clock breakers are created with.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }
}

impl Default for BreakerRegistry {
    fn default() -> Self {
        Self::new(RegistryConfig::default())
    }
}
