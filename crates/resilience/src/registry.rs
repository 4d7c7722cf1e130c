//! `BreakerRegistry`: one breaker per (adapter, policy), shared by every
//! caller in the process, held in a bounded `quick_cache` with an idle TTL
//! checked on read. Breakers that are not closed are pinned, so eviction can
//! never reset an open breaker.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Equivalent, Lifecycle, OptionsBuilder, UnitWeighter};

use crate::adapter::AdapterName;
use crate::breaker::{BreakerPolicy, BreakerState, CircuitBreaker};
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

/// Registry key: the adapter (closed set) and the policy. It hashes the
/// policy's 64-bit fingerprint ([`PolicyId`](crate::PolicyId)) but compares
/// the configurations on a hit ([`BreakerPolicy`]'s `==`: `Arc::ptr_eq`,
/// else field by field), so a fingerprint collision between two different
/// configurations gives each its own breaker instead of sharing one.
pub type BreakerKey = (AdapterName, BreakerPolicy);

/// A borrowed [`BreakerKey`] for lookups, so a hit clones nothing. Hashes as
/// the tuple does (each field in order).
struct KeyRef<'a>(AdapterName, &'a BreakerPolicy);

impl Hash for KeyRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
        self.1.hash(state);
    }
}

impl Equivalent<BreakerKey> for KeyRef<'_> {
    fn equivalent(&self, key: &BreakerKey) -> bool {
        self.0 == key.0 && *self.1 == key.1
    }
}

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
        let key = KeyRef(adapter, policy);
        let now = self.clock.now_nanos();
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
        let created = self
            .cache
            .get_or_insert_with(&(adapter, policy.clone()), || {
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
        self.cache.peek(&KeyRef(adapter, policy))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::fmt::Write as _;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::breaker::BreakerConfig;
    use crate::clock::ManualClock;
    use crate::verdict::{Verdict, err_is_transient};

    fn tripping_policy() -> BreakerPolicy {
        BreakerPolicy::new(BreakerConfig {
            consecutive_failures: 2,
            ..BreakerConfig::default()
        })
        .unwrap()
    }

    fn trip(breaker: &CircuitBreaker) {
        while breaker.state() == BreakerState::Closed {
            breaker.try_acquire().unwrap().record(Verdict::Failure);
        }
    }

    #[test]
    fn a_million_random_names_collapse_to_unknown_and_stay_bounded() {
        let registry = BreakerRegistry::new(RegistryConfig::default());
        let policy = BreakerPolicy::default();
        let mut rng = StdRng::seed_from_u64(7);
        let mut name = String::with_capacity(32);
        let mut last = None;
        for _ in 0..1_000_000 {
            name.clear();
            write!(name, "adapter-{:016x}", rng.random::<u64>()).unwrap();
            let adapter = AdapterName::parse(&name);
            assert_eq!(adapter, AdapterName::Unknown);
            let breaker = registry.get(adapter, &policy);
            if let Some(previous) = &last {
                assert!(Arc::ptr_eq(previous, &breaker));
            }
            last = Some(breaker);
        }
        assert_eq!(registry.len(), 1);
        assert!(registry.len() <= registry.config().capacity);
    }

    #[test]
    fn every_key_combination_stays_within_capacity() {
        let registry = BreakerRegistry::new(RegistryConfig {
            capacity: 10,
            ..RegistryConfig::default()
        });
        for threshold in 1..=5u8 {
            let policy = BreakerPolicy::new(BreakerConfig {
                failure_rate_percent: threshold * 10,
                ..BreakerConfig::default()
            })
            .unwrap();
            for adapter in AdapterName::ALL {
                registry.get(adapter, &policy);
                assert!(registry.len() <= 10, "len {}", registry.len());
            }
        }
    }

    #[tokio::test]
    async fn two_closures_through_one_adapter_each_run_their_own_code() {
        let registry = BreakerRegistry::default();
        let policy = BreakerPolicy::default();
        let first = registry
            .get(AdapterName::Facebook, &policy)
            .call(|| async { Ok::<_, ()>("first") }, err_is_transient)
            .await
            .unwrap();
        let second = registry
            .get(AdapterName::Facebook, &policy)
            .call(|| async { Ok::<_, ()>("second") }, err_is_transient)
            .await
            .unwrap();
        assert_eq!((first, second), ("first", "second"));
        assert!(Arc::ptr_eq(
            &registry.get(AdapterName::Facebook, &policy),
            &registry.get(AdapterName::Facebook, &policy)
        ));
        assert_eq!(registry.len(), 1);
    }

    #[test]
    fn a_fingerprint_collision_does_not_share_a_breaker() {
        let registry = BreakerRegistry::default();
        let id = crate::breaker::PolicyId(42);
        let lenient = BreakerPolicy::with_forced_id(BreakerConfig::default(), id);
        let strict = BreakerPolicy::with_forced_id(
            BreakerConfig {
                consecutive_failures: 1,
                ..BreakerConfig::default()
            },
            id,
        );
        assert_eq!(lenient.id(), strict.id());
        assert_ne!(lenient, strict);
        let a = registry.get(AdapterName::Openai, &lenient);
        let b = registry.get(AdapterName::Openai, &strict);
        assert!(!Arc::ptr_eq(&a, &b), "two configs shared one breaker");
        assert_eq!(a.policy().config().consecutive_failures, 5);
        assert_eq!(b.policy().config().consecutive_failures, 1);
        // Each is found again under its own config.
        assert!(Arc::ptr_eq(
            &a,
            &registry.get(AdapterName::Openai, &lenient)
        ));
        assert!(Arc::ptr_eq(
            &b,
            &registry.peek(AdapterName::Openai, &strict).unwrap()
        ));
        assert_eq!(registry.len(), 2);
    }

    #[test]
    fn equal_configs_share_a_breaker_and_different_ones_do_not() {
        let registry = BreakerRegistry::default();
        let a = BreakerPolicy::default();
        let b = BreakerPolicy::new(BreakerConfig::default()).unwrap();
        let c = tripping_policy();
        let shared = registry.get(AdapterName::Ga, &a);
        assert!(Arc::ptr_eq(&shared, &registry.get(AdapterName::Ga, &b)));
        let other = registry.get(AdapterName::Ga, &c);
        assert!(!Arc::ptr_eq(&shared, &other));
        assert_eq!(other.policy().config().consecutive_failures, 2);
    }

    #[test]
    fn one_adapters_outage_does_not_open_another() {
        let registry = BreakerRegistry::default();
        let policy = tripping_policy();
        trip(&registry.get(AdapterName::Ga, &policy));
        assert_eq!(
            registry.get(AdapterName::Ga, &policy).state(),
            BreakerState::Open
        );
        for adapter in AdapterName::ALL
            .into_iter()
            .filter(|a| *a != AdapterName::Ga)
        {
            let breaker = registry.get(adapter, &policy);
            assert_eq!(breaker.state(), BreakerState::Closed, "{adapter}");
            assert!(breaker.try_acquire().is_ok());
        }
    }

    #[test]
    fn open_breakers_are_pinned_against_eviction() {
        let registry = BreakerRegistry::new(RegistryConfig {
            capacity: 3,
            ..RegistryConfig::default()
        });
        let policy = tripping_policy();
        let open = registry.get(AdapterName::Youtube, &policy);
        trip(&open);
        // Flood with every other adapter, each looked up several times per
        // pass so it is hot, while the open one is never touched again: only
        // the pin keeps it (unpinned, it is the coldest entry and goes first).
        for _ in 0..3 {
            for adapter in AdapterName::ALL
                .into_iter()
                .filter(|a| *a != AdapterName::Youtube)
            {
                for _ in 0..4 {
                    registry.get(adapter, &policy);
                }
            }
        }
        let kept = registry.peek(AdapterName::Youtube, &policy).unwrap();
        assert!(Arc::ptr_eq(&kept, &open));
        assert_eq!(kept.state(), BreakerState::Open);
        // Closed ones were evicted down to the capacity (plus the pinned one).
        assert!(registry.len() <= 3, "len {}", registry.len());
    }

    #[test]
    fn idle_closed_breakers_expire_on_read_but_open_ones_do_not() {
        let clock = ManualClock::new();
        let registry = BreakerRegistry::with_clock(
            RegistryConfig {
                capacity: 100,
                idle_ttl: Duration::from_secs(3600),
            },
            clock.shared(),
        );
        let policy = tripping_policy();
        let closed = registry.get(AdapterName::Vercel, &policy);
        let open = registry.get(AdapterName::Aweber, &policy);
        trip(&open);
        clock.advance(Duration::from_secs(1800));
        // Used within the TTL: kept, and the use resets the idle time.
        assert!(Arc::ptr_eq(
            &closed,
            &registry.get(AdapterName::Vercel, &policy)
        ));
        clock.advance(Duration::from_secs(3000));
        assert!(Arc::ptr_eq(
            &closed,
            &registry.get(AdapterName::Vercel, &policy)
        ));
        clock.advance(Duration::from_secs(3601));
        let fresh = registry.get(AdapterName::Vercel, &policy);
        assert!(!Arc::ptr_eq(&closed, &fresh));
        // Not closed: never expired, whatever the idle time.
        assert!(Arc::ptr_eq(
            &open,
            &registry.get(AdapterName::Aweber, &policy)
        ));
        assert_eq!(registry.len(), 2);
    }
}
