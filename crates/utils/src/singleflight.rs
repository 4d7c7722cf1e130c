//! Cache stampede protection: concurrent callers asking for the same key share
//! one computation ([`SingleFlight::get_or_compute`]), with an optional async
//! cache in front, a computation timeout that really stops the computation, and
//! optional early recomputation (XFetch) of values about to expire.
//!
//! # How a flight works
//!
//! - The first caller for a key starts a *flight*: the factory runs in its own
//!   spawned task, so the flight does not depend on that caller staying alive
//!   (a client that goes away does not strand the others). Later callers for the
//!   key join the flight and wait on a `tokio::sync::watch` channel.
//! - The outcome, value or error, goes to every caller waiting on that flight.
//!   Errors are never cached: the next caller after a failed flight starts a new
//!   one (a failed flight leaves the map *before* it publishes its error, so
//!   nobody can join it once the error is out).
//! - The flight removes its own map entry when it ends, whichever way it ends
//!   (value, error, timeout, panic, or every caller gone), so the in-flight map
//!   never keeps a finished entry; [`SingleFlight::stats`] shows its size.
//! - Every flight has a finite [`FlightOptions::timeout`] (by default
//!   [`FlightOptions::DEFAULT_TIMEOUT`], 30 s): a flight whose cache re-check
//!   and computation are still running at the deadline is dropped (cancelled
//!   at its next `.await`) and its waiters get [`SingleFlightError::TimedOut`],
//!   so one hung factory cannot wedge its key. Each caller also waits at most
//!   its *own* timeout: a follower with a shorter timeout than the flight's
//!   leader gets `TimedOut` at its own deadline (the flight goes on for the
//!   others). The same limit bounds each caller's own cache lookup (one that
//!   runs past it counts as a miss) and the cache write after a success (one
//!   that runs past it is abandoned and logged), so a hung cache can neither
//!   hang a caller nor keep a finished flight in the map.
//! - **Invalidation.** After a write to the data behind a key, call
//!   [`SingleFlight::forget`] (Go's `Group.Forget`) or
//!   [`SingleFlight::forget_if`] *before* clearing the cache entry. A
//!   forgotten flight leaves the map at once, so callers arriving after the
//!   write start a new flight instead of joining the stale one; it still
//!   answers the callers already waiting on it (they asked before the write),
//!   but it no longer stores its value: it skips [`FlightCache::set`] when
//!   forgotten before the write, and [`CacheMeta::is_current`] turns false
//!   for a write already under way, so a cache that checks it under the lock
//!   its invalidation takes (as the api's does) can never store a stale
//!   value after the invalidation.
//! - With a [`FlightCache`], each caller looks in the cache first; the flight
//!   looks again before computing (a value stored meanwhile by an earlier
//!   flight is not recomputed), and stores a computed value once. A failing
//!   cache read counts as a miss and a failing write is logged; neither is
//!   returned to the caller.
//! - With [`FlightOptions::early_recompute`] and a cache that reports the
//!   remaining TTL, a caller may decide, with the XFetch rule of Vattani,
//!   Chierichetti and Lowenstein ("Optimal Probabilistic Cache Stampede
//!   Prevention", VLDB 2015), to refresh the value before it expires: it still
//!   returns the cached value at once, and a background flight recomputes it.
//!   The probability rises as expiry nears and with the time the value took to
//!   compute, so hot keys are refreshed one at a time instead of expiring
//!   together. See [`xfetch_should_recompute`].
//!
//! # Why not `moka`'s `get_with`
//!
//! `moka::future::Cache::get_with` / `try_get_with` (0.12) coalesce concurrent
//! initialisations of one key and cache the value in process; `try_get_with`
//! shares an error with the callers waiting at that moment and does not cache
//! it. What the api needs beyond that:
//! - the init future runs inside the first caller's future; when that caller
//!   is dropped, a waiting caller starts the computation *again* from scratch
//!   (the work done so far is lost; see the test
//!   `moka_restarts_init_when_leader_is_dropped`);
//! - no computation timeout (a `tokio::time::timeout` around `get_with` only
//!   drops the caller, and then the next waiter restarts the computation);
//! - the store is moka itself: coalescing and caching are one structure.
//!   Here the cache is a separate [`FlightCache`] (an async getter and
//!   setter whose failures are logged, never returned), so what stores the
//!   values is the caller's choice: the api plugs in a small in-process TTL
//!   map (`apps/api/src/analytics.rs`, cleared per domain after an ingest),
//!   and a shared store could take its place without changing the callers;
//! - no early recomputation and no coalescing statistics.
//!
//! So this module is its own small implementation rather than a wrapper. For a
//! pure in-process memo with no timeout, `moka`'s `get_with` is fine; the
//! crate README compares both under a burst of 10,000 callers.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//!
//! use smartbeak_utils::singleflight::{FlightOptions, SingleFlight};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let flights: SingleFlight<String, u64, Infallible> = SingleFlight::new();
//! let options = FlightOptions::default().timeout(Duration::from_secs(5));
//!
//! let a = flights.get_or_compute("answer".to_owned(), || async { Ok(42) }, &options);
//! let b = flights.get_or_compute("answer".to_owned(), || async { Ok(7) }, &options);
//! let (a, b) = tokio::join!(a, b);
//! // Both callers got the first flight's value; one computation ran.
//! assert_eq!((a.ok(), b.ok()), (Some(42), Some(42)));
//! assert_eq!(flights.stats().computations, 1);
//! assert_eq!(flights.stats().in_flight, 0);
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;

/// A boxed error, the default error type of a [`SingleFlight`] and the error
/// type of a [`FlightCache`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why [`SingleFlight::get_or_compute`] returned no value.
#[derive(Debug, thiserror::Error)]
pub enum SingleFlightError<E> {
    /// The computation returned this error (shared by every caller of the flight).
    #[error("computation failed: {0}")]
    Failed(Arc<E>),
    /// The computation ran past the flight's timeout and was cancelled, or
    /// this caller's own timeout ran out while it waited for a flight with a
    /// longer one (that flight goes on for its other callers).
    #[error("computation timed out after {after:?}")]
    TimedOut {
        /// The timeout that ran out: the flight's, or this caller's own.
        after: Duration,
    },
    /// The computation ended without a result (it panicked, or the runtime shut down).
    #[error("computation ended without a result")]
    Abandoned,
}

impl<E> Clone for SingleFlightError<E> {
    fn clone(&self) -> Self {
        match self {
            Self::Failed(error) => Self::Failed(Arc::clone(error)),
            Self::TimedOut { after } => Self::TimedOut { after: *after },
            Self::Abandoned => Self::Abandoned,
        }
    }
}

/// A value read from a [`FlightCache`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedValue<V> {
    /// The cached value.
    pub value: V,
    /// Time left before the entry expires, if the cache knows it (from the
    /// expiry it stored, or a store's own TTL query). Needed for early
    /// recomputation.
    pub remaining_ttl: Option<Duration>,
    /// How long the value took to compute (stored by the setter from
    /// [`CacheMeta::delta`]). Needed for early recomputation.
    pub delta: Option<Duration>,
}

/// What the flight tells a [`FlightCache`] when it stores a value.
#[derive(Debug, Clone)]
pub struct CacheMeta {
    /// Time to live requested by the caller that started the flight.
    pub ttl: Option<Duration>,
    /// How long the computation took (XFetch's `delta`); store it next to the
    /// value to enable early recomputation.
    pub delta: Duration,
    /// Cleared when the flight is [forgotten](SingleFlight::forget).
    current: Arc<AtomicBool>,
}

impl CacheMeta {
    /// Whether the flight storing this value is still current: `false` once
    /// it was [forgotten](SingleFlight::forget) (the data changed after it
    /// started). A setter should check it under the same lock as the
    /// invalidation that follows the `forget` clears the entry with, and
    /// store nothing when it is `false`: then a stale value can never land
    /// after that invalidation.
    #[must_use]
    pub fn is_current(&self) -> bool {
        self.current.load(Ordering::Acquire)
    }
}

/// An async cache in front of a [`SingleFlight`] (in the api, an in-process
/// TTL map).
pub trait FlightCache<K, V>: Send + Sync {
    /// Looks `key` up. An error is logged and treated as a miss.
    fn get<'a>(&'a self, key: &'a K) -> BoxFuture<'a, Result<Option<CachedValue<V>>, BoxError>>;

    /// Stores a freshly computed value. Called once per successful flight; an
    /// error is logged, never returned to the callers.
    fn set<'a>(
        &'a self,
        key: &'a K,
        value: &'a V,
        meta: CacheMeta,
    ) -> BoxFuture<'a, Result<(), BoxError>>;
}

/// Options of one [`SingleFlight::get_or_compute`] call. A flight runs with the
/// options of the caller that started it; each caller waits at most its own
/// `timeout`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlightOptions {
    /// Cancel the flight (its cache re-check and the computation) after this
    /// long; the same limit applies to each caller's cache lookup, to each
    /// caller's wait for the flight and to the cache write. Always finite:
    /// [`FlightOptions::DEFAULT_TIMEOUT`] unless set. See the
    /// [module docs](self).
    pub timeout: Duration,
    /// Time to live handed to [`FlightCache::set`].
    pub ttl: Option<Duration>,
    /// XFetch `beta` for early recomputation (`None`: off). 1.0 is the value
    /// the paper recommends; larger values refresh earlier.
    pub early_recompute: Option<f64>,
}

impl Default for FlightOptions {
    /// Timeout [`FlightOptions::DEFAULT_TIMEOUT`], no TTL, no early
    /// recomputation.
    fn default() -> Self {
        Self {
            timeout: Self::DEFAULT_TIMEOUT,
            ttl: None,
            early_recompute: None,
        }
    }
}

impl FlightOptions {
    /// The timeout of [`FlightOptions::default`]: 30 s, so a hung factory
    /// frees its key after at most that long even when nobody set one.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

    /// Sets the flight's timeout (and this caller's wait limit).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the time to live handed to the cache setter.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Turns on XFetch early recomputation with this `beta`.
    #[must_use]
    pub fn early_recompute(mut self, beta: f64) -> Self {
        self.early_recompute = Some(beta);
        self
    }
}

/// Counters of a [`SingleFlight`], since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlightStats {
    /// Keys with a flight in progress right now (the size of the in-flight map).
    pub in_flight: usize,
    /// Factory runs started.
    pub computations: u64,
    /// Callers that joined a flight another caller had started.
    pub coalesced: u64,
    /// Callers served from the cache without a flight.
    pub cache_hits: u64,
    /// Background flights started by the XFetch rule.
    pub early_recomputations: u64,
    /// Computations that returned an error.
    pub failures: u64,
    /// Flights cancelled by the timeout (during the cache re-check or the
    /// computation).
    pub timeouts: u64,
    /// Callers that stopped waiting for a flight at their own timeout.
    pub wait_timeouts: u64,
    /// Flights removed by [`SingleFlight::forget`] or
    /// [`SingleFlight::forget_if`].
    pub forgotten: u64,
}

/// The XFetch rule: recompute now if `now - delta * beta * ln(u) >= expiry`,
/// that is `delta * beta * -ln(u) >= remaining`, with `u` uniform in `(0, 1]`.
///
/// `delta` is how long the value took to compute, `remaining` the time left
/// before it expires. An expired entry (`remaining` zero) is always recomputed,
/// `beta` zero never recomputes early.
#[must_use]
pub fn xfetch_should_recompute(delta: Duration, beta: f64, remaining: Duration, u: f64) -> bool {
    let u = u.clamp(f64::MIN_POSITIVE, 1.0);
    delta.as_secs_f64() * beta * -u.ln() >= remaining.as_secs_f64()
}

/// Coalesces concurrent computations of the same key; see the [module docs](self).
///
/// Cloning is cheap and shares the flights.
pub struct SingleFlight<K, V, E = BoxError> {
    inner: Arc<Inner<K, V, E>>,
}

impl<K, V, E> Clone for SingleFlight<K, V, E> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K, V, E> fmt::Debug for SingleFlight<K, V, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingleFlight")
            .field("in_flight", &self.inner.lock().len())
            .field("has_cache", &self.inner.cache.is_some())
            .finish_non_exhaustive()
    }
}

type Outcome<V, E> = Result<V, SingleFlightError<E>>;
type Slot<V, E> = Option<Outcome<V, E>>;

struct Flight<V, E> {
    id: u64,
    rx: watch::Receiver<Slot<V, E>>,
    /// Cleared by `forget`: the flight must not store its value.
    current: Arc<AtomicBool>,
    /// The flight publishes an outcome by then (its timeout from its start).
    deadline: Instant,
}

#[derive(Default)]
struct Counters {
    computations: AtomicU64,
    coalesced: AtomicU64,
    cache_hits: AtomicU64,
    early_recomputations: AtomicU64,
    failures: AtomicU64,
    timeouts: AtomicU64,
    wait_timeouts: AtomicU64,
    forgotten: AtomicU64,
}

struct Inner<K, V, E> {
    flights: Mutex<HashMap<K, Flight<V, E>>>,
    next_id: AtomicU64,
    cache: Option<Arc<dyn FlightCache<K, V>>>,
    counters: Counters,
}

impl<K, V, E> Inner<K, V, E> {
    fn lock(&self) -> MutexGuard<'_, HashMap<K, Flight<V, E>>> {
        // The map holds no invariant a panic could break half-way.
        self.flights.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<K, V, E> Default for SingleFlight<K, V, E>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    E: Send + Sync + 'static,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<K, V, E> SingleFlight<K, V, E>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    E: Send + Sync + 'static,
{
    /// A single-flight group without a cache.
    #[must_use]
    pub fn new() -> Self {
        Self::build(None)
    }

    /// A single-flight group with an async cache in front.
    #[must_use]
    pub fn with_cache(cache: Arc<dyn FlightCache<K, V>>) -> Self {
        Self::build(Some(cache))
    }

    fn build(cache: Option<Arc<dyn FlightCache<K, V>>>) -> Self {
        Self {
            inner: Arc::new(Inner {
                flights: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                cache,
                counters: Counters::default(),
            }),
        }
    }

    /// Returns the value for `key`: from the cache if there is one and it has
    /// the key, else from the flight in progress for `key`, else from a new
    /// flight running `factory` in a spawned task. Must be called inside a
    /// Tokio runtime.
    ///
    /// Dropping the returned future does not cancel the flight; other callers
    /// (and the cache setter) still get its value.
    ///
    /// # Errors
    ///
    /// The flight's outcome: [`SingleFlightError::Failed`] with the factory's
    /// error, [`SingleFlightError::TimedOut`] (the flight's timeout, or this
    /// caller's own `options.timeout` while waiting), or
    /// [`SingleFlightError::Abandoned`] if the computation panicked.
    pub async fn get_or_compute<F, Fut>(
        &self,
        key: K,
        factory: F,
        options: &FlightOptions,
    ) -> Result<V, SingleFlightError<E>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
    {
        if let Some(cache) = &self.inner.cache {
            let lookup = within(options.timeout, cache.get(&key))
                .await
                .unwrap_or_else(|| Err("cache read timed out".into()));
            match lookup {
                Ok(Some(hit)) => {
                    self.inner
                        .counters
                        .cache_hits
                        .fetch_add(1, Ordering::Relaxed);
                    if self.should_recompute_early(&hit, options) {
                        self.start_early_recomputation(key, factory, options);
                    }
                    return Ok(hit.value);
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(error = %error, "single-flight cache read failed, computing");
                }
            }
        }
        let own_deadline = deadline_after(options.timeout);
        let (mut rx, flight_deadline) = self.join_or_start(key, factory, options, own_deadline);
        let wait = async {
            match rx.wait_for(Option::is_some).await {
                Ok(slot) => slot.clone().unwrap_or(Err(SingleFlightError::Abandoned)),
                Err(_closed) => Err(SingleFlightError::Abandoned),
            }
        };
        // Each caller waits at most its own timeout, whatever the flight's.
        // The flight publishes an outcome by its own deadline, so a caller
        // whose deadline is no earlier (the leader, or a follower with a
        // longer timeout) needs no timer of its own.
        let waited = if own_deadline >= flight_deadline {
            Ok(wait.await)
        } else {
            tokio::time::timeout_at(own_deadline, wait).await
        };
        waited.unwrap_or_else(|_elapsed| {
            self.inner
                .counters
                .wait_timeouts
                .fetch_add(1, Ordering::Relaxed);
            Err(SingleFlightError::TimedOut {
                after: options.timeout,
            })
        })
    }

    /// Forgets the flight in progress for `key`, if there is one (Go's
    /// `Group.Forget`): later callers start a new flight instead of joining
    /// it, and it does not store its value in the cache (see
    /// [`CacheMeta::is_current`]). Callers already waiting on it still get
    /// its outcome. Call it after a write to the data behind `key`, before
    /// clearing the cache entry. Returns whether a flight was forgotten.
    pub fn forget(&self, key: &K) -> bool {
        let forgotten = {
            let mut flights = self.inner.lock();
            flights.remove(key)
        };
        match forgotten {
            Some(flight) => {
                self.mark_forgotten(&flight);
                true
            }
            None => false,
        }
    }

    /// [`SingleFlight::forget`] for every key in flight that `matches`
    /// accepts (for an invalidation that covers many keys, such as every
    /// range of one domain). Returns the number of flights forgotten.
    pub fn forget_if(&self, mut matches: impl FnMut(&K) -> bool) -> usize {
        let mut forgotten = Vec::new();
        {
            let mut flights = self.inner.lock();
            flights.retain(|key, flight| {
                if matches(key) {
                    forgotten.push(Arc::clone(&flight.current));
                    false
                } else {
                    true
                }
            });
        }
        for current in &forgotten {
            current.store(false, Ordering::Release);
        }
        self.inner
            .counters
            .forgotten
            .fetch_add(forgotten.len() as u64, Ordering::Relaxed);
        forgotten.len()
    }

    fn mark_forgotten(&self, flight: &Flight<V, E>) {
        flight.current.store(false, Ordering::Release);
        self.inner
            .counters
            .forgotten
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The counters and the current size of the in-flight map.
    #[must_use]
    pub fn stats(&self) -> FlightStats {
        let c = &self.inner.counters;
        FlightStats {
            in_flight: self.inner.lock().len(),
            computations: c.computations.load(Ordering::Relaxed),
            coalesced: c.coalesced.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            early_recomputations: c.early_recomputations.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            timeouts: c.timeouts.load(Ordering::Relaxed),
            wait_timeouts: c.wait_timeouts.load(Ordering::Relaxed),
            forgotten: c.forgotten.load(Ordering::Relaxed),
        }
    }

    fn should_recompute_early(&self, hit: &CachedValue<V>, options: &FlightOptions) -> bool {
        let (Some(beta), Some(remaining), Some(delta)) =
            (options.early_recompute, hit.remaining_ttl, hit.delta)
        else {
            return false;
        };
        // rand's f64 is in [0, 1); XFetch wants (0, 1].
        let u = 1.0 - rand::random::<f64>();
        xfetch_should_recompute(delta, beta, remaining, u)
    }

    fn start_early_recomputation<F, Fut>(&self, key: K, factory: F, options: &FlightOptions)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
    {
        let Some(tx) = self.register(&key, deadline_after(options.timeout)) else {
            return; // a flight for this key is already running
        };
        self.inner
            .counters
            .early_recomputations
            .fetch_add(1, Ordering::Relaxed);
        self.spawn_flight(key, tx, factory, options, false);
    }

    fn join_or_start<F, Fut>(
        &self,
        key: K,
        factory: F,
        options: &FlightOptions,
        deadline: Instant,
    ) -> (watch::Receiver<Slot<V, E>>, Instant)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
    {
        let mut flights = self.inner.lock();
        if let Some(flight) = flights.get(&key) {
            self.inner
                .counters
                .coalesced
                .fetch_add(1, Ordering::Relaxed);
            return (flight.rx.clone(), flight.deadline);
        }
        let (tx, rx) = self.insert_flight(&mut flights, key.clone(), deadline);
        drop(flights);
        let check_cache = self.inner.cache.is_some();
        self.spawn_flight(key, tx, factory, options, check_cache);
        (rx, deadline)
    }

    /// Inserts a new flight for `key` unless one is running; returns its sender.
    fn register(&self, key: &K, deadline: Instant) -> Option<FlightSender<V, E>> {
        let mut flights = self.inner.lock();
        if flights.contains_key(key) {
            return None;
        }
        Some(self.insert_flight(&mut flights, key.clone(), deadline).0)
    }

    /// Inserts a flight whose timed part (re-check and computation) ends by
    /// `deadline`.
    fn insert_flight(
        &self,
        flights: &mut HashMap<K, Flight<V, E>>,
        key: K,
        deadline: Instant,
    ) -> (FlightSender<V, E>, watch::Receiver<Slot<V, E>>) {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        let current = Arc::new(AtomicBool::new(true));
        flights.insert(
            key,
            Flight {
                id,
                rx: rx.clone(),
                current: Arc::clone(&current),
                deadline,
            },
        );
        (
            FlightSender {
                id,
                tx,
                current,
                deadline,
            },
            rx,
        )
    }

    /// Spawns the flight's task. Called with the map unlocked: if the task is
    /// dropped at once (no runtime, or shutting down), its guard removes the
    /// entry and the waiters see [`SingleFlightError::Abandoned`].
    fn spawn_flight<F, Fut>(
        &self,
        key: K,
        sender: FlightSender<V, E>,
        factory: F,
        options: &FlightOptions,
        check_cache: bool,
    ) where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
    {
        let guard = RemoveOnDrop {
            inner: Arc::clone(&self.inner),
            key,
            id: sender.id,
        };
        let options = *options;
        tokio::spawn(run_flight(
            guard,
            sender.tx,
            sender.current,
            sender.deadline,
            factory,
            options,
            check_cache,
        ));
    }
}

struct FlightSender<V, E> {
    id: u64,
    tx: watch::Sender<Slot<V, E>>,
    current: Arc<AtomicBool>,
    deadline: Instant,
}

/// Removes the flight's map entry when the flight's task ends, however it ends.
struct RemoveOnDrop<K: Eq + Hash, V, E> {
    inner: Arc<Inner<K, V, E>>,
    key: K,
    id: u64,
}

impl<K: Eq + Hash, V, E> RemoveOnDrop<K, V, E> {
    /// Removes the entry now if it is still this flight's (idempotent).
    fn remove(&self) {
        let mut flights = self.inner.lock();
        if flights.get(&self.key).is_some_and(|f| f.id == self.id) {
            flights.remove(&self.key);
        }
    }
}

impl<K: Eq + Hash, V, E> Drop for RemoveOnDrop<K, V, E> {
    fn drop(&mut self) {
        self.remove();
    }
}

async fn run_flight<K, V, E, F, Fut>(
    guard: RemoveOnDrop<K, V, E>,
    tx: watch::Sender<Slot<V, E>>,
    current: Arc<AtomicBool>,
    deadline: Instant,
    factory: F,
    options: FlightOptions,
    check_cache: bool,
) where
    K: Eq + Hash,
    V: Clone,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<V, E>>,
{
    let inner = &guard.inner;
    let key = &guard.key;
    let work = async {
        if check_cache && let Some(cache) = &inner.cache {
            // A value stored by a flight that ended after our caller's lookup.
            if let Ok(Some(hit)) = cache.get(key).await {
                return Work::Cached(hit.value);
            }
        }
        inner.counters.computations.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = factory().await;
        Work::Computed(result, started.elapsed())
    };
    // On a timeout the re-check or the factory's future has been dropped
    // here: the computation is cancelled.
    let outcome = match tokio::time::timeout_at(deadline, work).await.ok() {
        Some(Work::Cached(value)) => {
            tx.send_replace(Some(Ok(value)));
            return;
        }
        Some(Work::Computed(result, delta)) => result
            .map(|value| (value, delta))
            .map_err(|e| SingleFlightError::Failed(Arc::new(e))),
        None => Err(SingleFlightError::TimedOut {
            after: options.timeout,
        }),
    };

    match outcome {
        Ok((value, delta)) => {
            // Waiters first, then the (possibly slow) cache write. The entry
            // stays in the map until the write is done or has run out of
            // time, so a caller that missed the cache still joins this flight
            // rather than starting one.
            tx.send_replace(Some(Ok(value.clone())));
            if let Some(cache) = &inner.cache {
                if !current.load(Ordering::Acquire) {
                    // Forgotten: the data changed after this flight started.
                    tracing::debug!("single-flight flight forgotten, not caching its value");
                    return;
                }
                let meta = CacheMeta {
                    ttl: options.ttl,
                    delta,
                    current,
                };
                match within(options.timeout, cache.set(key, &value, meta)).await {
                    Some(Ok(())) => {}
                    Some(Err(error)) => {
                        tracing::warn!(error = %error, "single-flight cache write failed");
                    }
                    None => tracing::warn!(
                        timeout = ?options.timeout,
                        "single-flight cache write timed out, abandoned"
                    ),
                }
            }
        }
        Err(error) => {
            let counter = match error {
                SingleFlightError::TimedOut { .. } => &inner.counters.timeouts,
                _ => &inner.counters.failures,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %ErrorKind(&error), "single-flight computation failed");
            // Leave the map first: a caller that sees the error and asks
            // again must start a new flight, not join this finished one.
            guard.remove();
            tx.send_replace(Some(Err(error)));
        }
    }
}

/// What a flight's timed part produced.
enum Work<V, E> {
    /// The re-check found a value.
    Cached(V),
    /// The factory ran: its result and how long it took.
    Computed(Result<V, E>, Duration),
}

/// `timeout` from now, or far in the future if that does not fit an
/// `Instant`.
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30))
}

/// `future`'s output, or `None` if it ran past `limit` (then it is dropped).
async fn within<F: Future>(limit: Duration, future: F) -> Option<F::Output> {
    tokio::time::timeout(limit, future).await.ok()
}

/// Displays the kind of a flight error without needing `E: Display`.
struct ErrorKind<'a, E>(&'a SingleFlightError<E>);

impl<E> fmt::Display for ErrorKind<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            SingleFlightError::Failed(_) => f.write_str("factory returned an error"),
            SingleFlightError::TimedOut { after } => write!(f, "timed out after {after:?}"),
            SingleFlightError::Abandoned => f.write_str("abandoned"),
        }
    }
}

#[cfg(test)]
mod tests;
