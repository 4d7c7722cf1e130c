#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::Notify;

use super::*;

#[derive(Debug, PartialEq, Eq)]
struct TestError(&'static str);

impl fmt::Display for TestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for TestError {}

type Sf = SingleFlight<u32, u64, TestError>;

/// Sets its flag when dropped: shows a computation's future was dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Waits (bounded) until the in-flight map is empty.
async fn wait_until_idle<K, V, E>(sf: &SingleFlight<K, V, E>)
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    E: Send + Sync + 'static,
{
    for _ in 0..1000 {
        if sf.stats().in_flight == 0 {
            return;
        }
        // Paused clock in most tests: this lets timers fire without real waiting.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("flights still in progress: {:?}", sf.stats());
}

/// Waits (bounded) until `n` callers have joined a flight.
async fn wait_for_coalesced(sf: &Sf, n: u64) {
    for _ in 0..1000 {
        if sf.stats().coalesced >= n {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("callers did not join: {:?}", sf.stats());
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_callers_over_100_keys_run_100_computations() {
    let sf = Sf::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..10_000_u32 {
        let sf = sf.clone();
        let runs = Arc::clone(&runs);
        tasks.spawn(async move {
            let key = i % 100;
            let value = sf
                .get_or_compute(
                    key,
                    move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(u64::from(key) * 2)
                    },
                    &FlightOptions::default(),
                )
                .await
                .unwrap();
            assert_eq!(value, u64::from(key) * 2);
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
    assert_eq!(runs.load(Ordering::SeqCst), 100);
    let stats = sf.stats();
    assert_eq!(stats.computations, 100);
    assert_eq!(stats.coalesced, 9_900);
    wait_until_idle(&sf).await;
}

#[tokio::test(start_paused = true)]
async fn dropped_leader_does_not_strand_followers() {
    let sf = Sf::new();
    let gate = Arc::new(Notify::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let factory = {
        let gate = Arc::clone(&gate);
        let runs = Arc::clone(&runs);
        move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            gate.notified().await;
            Ok(7)
        }
    };
    let options = FlightOptions::default();
    let mut leader = Box::pin(sf.get_or_compute(1, factory, &options));
    assert!(futures::poll!(&mut leader).is_pending());
    let follower = tokio::spawn({
        let sf = sf.clone();
        async move {
            sf.get_or_compute(1, || async { Ok(999) }, &FlightOptions::default())
                .await
        }
    });
    // Let the follower join the flight, then the leader's client goes away.
    wait_for_coalesced(&sf, 1).await;
    drop(leader);
    tokio::task::yield_now().await;
    gate.notify_one();
    assert_eq!(follower.await.unwrap().unwrap(), 7);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    wait_until_idle(&sf).await;
}

#[tokio::test(start_paused = true)]
async fn flight_finishes_and_leaves_the_map_when_every_caller_is_gone() {
    let (cache, sf) = cached_flight();
    let done = Arc::new(AtomicBool::new(false));
    let options = FlightOptions::default();
    let caller = sf.get_or_compute(
        5,
        {
            let done = Arc::clone(&done);
            move || async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                done.store(true, Ordering::SeqCst);
                Ok(55)
            }
        },
        &options,
    );
    // Start the flight, then drop the only caller.
    assert!(
        tokio::time::timeout(Duration::from_millis(1), caller)
            .await
            .is_err()
    );
    assert_eq!(sf.stats().in_flight, 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(done.load(Ordering::SeqCst));
    wait_until_idle(&sf).await;
    // The value still reached the cache.
    assert_eq!(cache.stored(5), Some(55));
}

#[tokio::test(start_paused = true)]
async fn error_reaches_every_waiter_and_is_not_cached() {
    let sf = Sf::new();
    let gate = Arc::new(Notify::new());
    let options = FlightOptions::default();
    let mut waiters = Vec::new();
    for _ in 0..5 {
        let sf = sf.clone();
        let gate = Arc::clone(&gate);
        waiters.push(tokio::spawn(async move {
            sf.get_or_compute(
                3,
                move || async move {
                    gate.notified().await;
                    Err(TestError("backend down"))
                },
                &options,
            )
            .await
        }));
    }
    wait_for_coalesced(&sf, 4).await;
    gate.notify_one();
    let mut errors = Vec::new();
    for waiter in waiters {
        match waiter.await.unwrap() {
            Err(SingleFlightError::Failed(error)) => errors.push(error),
            other => panic!("expected the shared error, got {other:?}"),
        }
    }
    assert_eq!(*errors[0], TestError("backend down"));
    assert!(errors.iter().all(|e| Arc::ptr_eq(e, &errors[0])));
    assert_eq!(errors[0].to_string(), "backend down");
    let stats = sf.stats();
    assert_eq!((stats.computations, stats.failures), (1, 1));
    wait_until_idle(&sf).await;

    // The next call starts a new flight.
    let value = sf
        .get_or_compute(3, || async { Ok(33) }, &options)
        .await
        .unwrap();
    assert_eq!(value, 33);
    assert_eq!(sf.stats().computations, 2);
}

/// A waker that records the in-flight map's size when it is first woken.
struct MapSizeAtWake {
    sf: Sf,
    seen: Mutex<Option<usize>>,
}

impl std::task::Wake for MapSizeAtWake {
    fn wake(self: Arc<Self>) {
        let mut seen = self.seen.lock().unwrap();
        if seen.is_none() {
            *seen = Some(self.sf.stats().in_flight);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_flight_leaves_the_map_before_its_error_is_published() {
    let sf = Sf::new();
    let gate = Arc::new(Notify::new());
    let options = FlightOptions::default();
    let mut waiter = Box::pin(sf.get_or_compute(
        5,
        {
            let gate = Arc::clone(&gate);
            move || async move {
                gate.notified().await;
                Err(TestError("backend down"))
            }
        },
        &options,
    ));
    // Poll with a waker that looks at the map at the moment the outcome is
    // published (the watch channel wakes it inside the send).
    let probe = Arc::new(MapSizeAtWake {
        sf: sf.clone(),
        seen: Mutex::new(None),
    });
    let waker = std::task::Waker::from(Arc::clone(&probe));
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(waiter.as_mut().poll(&mut cx).is_pending());
    assert_eq!(sf.stats().in_flight, 1);
    gate.notify_one();
    for _ in 0..1000 {
        if probe.seen.lock().unwrap().is_some() {
            break;
        }
        tokio::task::yield_now().await;
    }
    // A caller woken by the error, asking again at once, finds no flight to
    // join and starts a new one.
    assert_eq!(*probe.seen.lock().unwrap(), Some(0));
    assert!(matches!(waiter.await, Err(SingleFlightError::Failed(_))));
}

#[tokio::test(start_paused = true)]
async fn timeout_cancels_the_computation() {
    let sf = Sf::new();
    let dropped = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let options = FlightOptions::default().timeout(Duration::from_millis(100));
    let started = Instant::now();
    let err = sf
        .get_or_compute(
            9,
            {
                let dropped = Arc::clone(&dropped);
                let finished = Arc::clone(&finished);
                move || async move {
                    let _flag = DropFlag(dropped);
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    finished.store(true, Ordering::SeqCst);
                    Ok(1)
                }
            },
            &options,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, SingleFlightError::TimedOut { after } if after == Duration::from_millis(100))
    );
    assert_eq!(err.to_string(), "computation timed out after 100ms");
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    // The computation's future was dropped, and it never runs to its end.
    wait_until_idle(&sf).await;
    assert!(dropped.load(Ordering::SeqCst));
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(!finished.load(Ordering::SeqCst));
    assert_eq!(sf.stats().timeouts, 1);
}

#[tokio::test(start_paused = true)]
async fn panicking_computation_is_abandoned_and_cleaned_up() {
    let sf = Sf::new();
    let err = sf
        .get_or_compute(
            4,
            || async { panic!("factory bug") },
            &FlightOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, SingleFlightError::Abandoned));
    wait_until_idle(&sf).await;
    let value = sf
        .get_or_compute(4, || async { Ok(4) }, &FlightOptions::default())
        .await;
    assert_eq!(value.unwrap(), 4);
}

/// Value, expiry, delta.
type Entry = (u64, Option<Instant>, Duration);

/// An in-memory cache on the paused Tokio clock, with switchable failures.
#[derive(Default)]
struct MemoryCache {
    entries: Mutex<HashMap<u32, Entry>>,
    sets: AtomicUsize,
    fail_reads: AtomicBool,
    fail_next_reads: AtomicUsize,
    fail_writes: AtomicBool,
    /// Reads so far.
    reads: AtomicUsize,
    /// The read (counted from 1) that never completes; 0 for none.
    hang_read: AtomicUsize,
    /// Writes never complete.
    hang_writes: AtomicBool,
}

impl MemoryCache {
    fn stored(&self, key: u32) -> Option<u64> {
        self.entries.lock().unwrap().get(&key).map(|e| e.0)
    }

    fn put(&self, key: u32, value: u64, ttl: Duration, delta: Duration) {
        self.entries
            .lock()
            .unwrap()
            .insert(key, (value, Some(Instant::now() + ttl), delta));
    }
}

impl FlightCache<u32, u64> for MemoryCache {
    fn get<'a>(
        &'a self,
        key: &'a u32,
    ) -> BoxFuture<'a, Result<Option<CachedValue<u64>>, BoxError>> {
        async move {
            let read = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
            if read == self.hang_read.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            let fail_next = self
                .fail_next_reads
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if fail_next || self.fail_reads.load(Ordering::SeqCst) {
                return Err("cache unreachable".into());
            }
            let now = Instant::now();
            Ok(self
                .entries
                .lock()
                .unwrap()
                .get(key)
                .and_then(|(value, expiry, delta)| {
                    let remaining = expiry.map(|e| e.saturating_duration_since(now));
                    (remaining != Some(Duration::ZERO)).then_some(CachedValue {
                        value: *value,
                        remaining_ttl: remaining,
                        delta: Some(*delta),
                    })
                }))
        }
        .boxed()
    }

    fn set<'a>(
        &'a self,
        key: &'a u32,
        value: &'a u64,
        meta: CacheMeta,
    ) -> BoxFuture<'a, Result<(), BoxError>> {
        async move {
            self.sets.fetch_add(1, Ordering::SeqCst);
            if self.hang_writes.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if self.fail_writes.load(Ordering::SeqCst) {
                return Err("cache write refused".into());
            }
            let expiry = meta.ttl.map(|ttl| Instant::now() + ttl);
            self.entries
                .lock()
                .unwrap()
                .insert(*key, (*value, expiry, meta.delta));
            Ok(())
        }
        .boxed()
    }
}

fn cached_flight() -> (Arc<MemoryCache>, Sf) {
    let cache = Arc::new(MemoryCache::default());
    let sf = Sf::with_cache(Arc::clone(&cache) as Arc<dyn FlightCache<u32, u64>>);
    (cache, sf)
}

#[tokio::test(start_paused = true)]
async fn cache_hit_skips_the_factory_and_miss_stores_once() {
    let (cache, sf) = cached_flight();
    let options = FlightOptions::default().ttl(Duration::from_secs(60));
    let runs = Arc::new(AtomicUsize::new(0));
    let compute = |value: u64| {
        let runs = Arc::clone(&runs);
        move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(value)
        }
    };
    let (a, b) = tokio::join!(
        sf.get_or_compute(1, compute(10), &options),
        sf.get_or_compute(1, compute(11), &options)
    );
    assert_eq!((a.unwrap(), b.unwrap()), (10, 10));
    assert_eq!(cache.sets.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stored(1), Some(10));
    // Stored with the computation's duration as delta.
    assert_eq!(
        cache.entries.lock().unwrap()[&1].2,
        Duration::from_millis(20)
    );

    let c = sf.get_or_compute(1, compute(12), &options).await.unwrap();
    assert_eq!(c, 10);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(sf.stats().cache_hits, 1);
}

#[tokio::test(start_paused = true)]
async fn cache_failures_are_logged_not_returned() {
    let (cache, sf) = cached_flight();
    cache.fail_reads.store(true, Ordering::SeqCst);
    cache.fail_writes.store(true, Ordering::SeqCst);
    let value = sf
        .get_or_compute(2, || async { Ok(20) }, &FlightOptions::default())
        .await
        .unwrap();
    assert_eq!(value, 20);
    assert_eq!(cache.sets.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stored(2), None);
}

#[tokio::test(start_paused = true)]
async fn flight_rechecks_the_cache_before_computing() {
    let (cache, sf) = cached_flight();
    // Our caller's own lookup misses (the read fails), but the flight's
    // lookup finds a value stored meanwhile: no computation runs.
    cache.put(6, 60, Duration::from_secs(60), Duration::from_millis(5));
    cache.fail_next_reads.store(1, Ordering::SeqCst);
    let value = sf
        .get_or_compute(6, || async { Ok(61) }, &FlightOptions::default())
        .await;
    assert_eq!(value.unwrap(), 60);
    assert_eq!(sf.stats().computations, 0);
}

#[tokio::test(start_paused = true)]
async fn timeout_covers_the_flights_cache_recheck() {
    let (cache, sf) = cached_flight();
    // The caller's lookup misses; the flight's re-check never answers.
    cache.hang_read.store(2, Ordering::SeqCst);
    let options = FlightOptions::default().timeout(Duration::from_millis(100));
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        sf.get_or_compute(7, || async { Ok(70) }, &options),
    )
    .await
    .expect("the hung re-check was not bounded")
    .unwrap_err();
    assert!(matches!(err, SingleFlightError::TimedOut { .. }), "{err:?}");
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    wait_until_idle(&sf).await;
    let stats = sf.stats();
    assert_eq!((stats.computations, stats.timeouts), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn a_hung_cache_lookup_counts_as_a_miss_after_the_timeout() {
    let (cache, sf) = cached_flight();
    cache.hang_read.store(1, Ordering::SeqCst);
    let options = FlightOptions::default().timeout(Duration::from_millis(100));
    let started = Instant::now();
    let value = tokio::time::timeout(
        Duration::from_secs(60),
        sf.get_or_compute(8, || async { Ok(80) }, &options),
    )
    .await
    .expect("the hung lookup was not bounded");
    assert_eq!(value.unwrap(), 80);
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    assert_eq!(sf.stats().computations, 1);
}

#[tokio::test(start_paused = true)]
async fn a_hung_cache_write_does_not_keep_the_flight_in_the_map() {
    let (cache, sf) = cached_flight();
    cache.hang_writes.store(true, Ordering::SeqCst);
    let options = FlightOptions::default().timeout(Duration::from_millis(100));
    // Waiters get the value before the write.
    let value = sf.get_or_compute(9, || async { Ok(90) }, &options).await;
    assert_eq!(value.unwrap(), 90);
    assert_eq!(sf.stats().in_flight, 1, "the write is still running");
    // The write runs out of time and the entry goes.
    wait_until_idle(&sf).await;
    assert_eq!(cache.sets.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stored(9), None);
}

#[tokio::test(start_paused = true)]
async fn xfetch_refreshes_an_expiring_value_in_the_background() {
    let (cache, sf) = cached_flight();
    let options = FlightOptions::default()
        .ttl(Duration::from_secs(60))
        .early_recompute(1.0);
    // Far from expiry (1 h left, 10 ms to compute): never refreshed early,
    // since -ln(u) is at most about 708.
    cache.put(8, 80, Duration::from_secs(3600), Duration::from_millis(10));
    for _ in 0..100 {
        assert_eq!(
            sf.get_or_compute(8, || async { Ok(81) }, &options)
                .await
                .unwrap(),
            80
        );
    }
    assert_eq!(sf.stats().early_recomputations, 0);

    // 1 ns left and 10 s to compute: refreshed (-ln(u) >= 1e-10 / 10 unless
    // u rounds to 1, which has probability 2^-53 per call).
    cache.put(8, 80, Duration::from_nanos(1), Duration::from_secs(10));
    let served = sf
        .get_or_compute(8, || async { Ok(82) }, &options)
        .await
        .unwrap();
    assert_eq!(served, 80, "the cached value is served at once");
    assert_eq!(sf.stats().early_recomputations, 1);
    wait_until_idle(&sf).await;
    assert_eq!(cache.stored(8), Some(82));
    assert_eq!(sf.stats().computations, 1);
}

#[tokio::test(start_paused = true)]
async fn xfetch_starts_one_refresh_while_one_is_running() {
    let (cache, sf) = cached_flight();
    let options = FlightOptions::default().early_recompute(1.0);
    cache.put(
        9,
        90,
        Duration::from_secs(1000),
        Duration::from_secs(1_000_000),
    );
    let runs = Arc::new(AtomicUsize::new(0));
    for _ in 0..50 {
        let runs = Arc::clone(&runs);
        let value = sf
            .get_or_compute(
                9,
                move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    Ok(91)
                },
                &options,
            )
            .await
            .unwrap();
        assert_eq!(value, 90);
    }
    // Every call asked for a refresh, but one flight ran.
    wait_until_idle(&sf).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(sf.stats().early_recomputations, 1);
}

#[test]
fn xfetch_rule_matches_the_paper() {
    let ms = Duration::from_millis;
    // Expired: always recompute; beta 0: only when expired.
    assert!(xfetch_should_recompute(ms(10), 1.0, Duration::ZERO, 0.99));
    assert!(!xfetch_should_recompute(ms(10), 0.0, ms(1), 0.0001));
    // delta 1 s, beta 1, 1 s left: recompute iff -ln(u) >= 1, i.e. u <= 1/e.
    let e_inv = (-1.0_f64).exp();
    assert!(xfetch_should_recompute(
        ms(1000),
        1.0,
        ms(1000),
        e_inv - 1e-9
    ));
    assert!(!xfetch_should_recompute(
        ms(1000),
        1.0,
        ms(1000),
        e_inv + 1e-9
    ));
    // Doubling beta doubles the horizon.
    assert!(xfetch_should_recompute(
        ms(1000),
        2.0,
        ms(2000),
        e_inv - 1e-9
    ));
    // u = 0 is clamped, not -inf.
    assert!(!xfetch_should_recompute(
        ms(1),
        1.0,
        Duration::from_secs(3600),
        0.0
    ));
}

proptest::proptest! {
    #[test]
    fn xfetch_is_monotonic_in_remaining_time(
        delta_ms in 0_u64..10_000,
        beta in 0.0_f64..4.0,
        a in 0_u64..100_000,
        b in 0_u64..100_000,
        u in 0.0_f64..=1.0,
    ) {
        let (near, far) = (a.min(b), a.max(b));
        let d = Duration::from_millis(delta_ms);
        if xfetch_should_recompute(d, beta, Duration::from_millis(far), u) {
            proptest::prop_assert!(xfetch_should_recompute(d, beta, Duration::from_millis(near), u));
        }
    }
}

/// Backs the claim in the module docs: moka's `get_with` runs the init in the
/// caller's future, and when that caller is dropped a waiter starts it again.
#[tokio::test(start_paused = true)]
async fn moka_restarts_init_when_leader_is_dropped() {
    let cache: moka::future::Cache<u32, u64> = moka::future::Cache::new(100);
    let runs = Arc::new(AtomicUsize::new(0));
    let init = |runs: Arc<AtomicUsize>| async move {
        runs.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        1
    };
    let mut leader = Box::pin(cache.get_with(1, init(Arc::clone(&runs))));
    assert!(futures::poll!(&mut leader).is_pending());
    let follower = tokio::spawn({
        let cache = cache.clone();
        let runs = Arc::clone(&runs);
        async move { cache.get_with(1, init(runs)).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    drop(leader);
    assert_eq!(follower.await.unwrap(), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 2, "moka ran the init twice");
}

/// Issue 9 item 12: a flight that started before a write can neither store
/// its stale value after the writer's `forget` + cache clear, nor be joined
/// by a caller arriving after the write.
#[tokio::test(start_paused = true)]
async fn a_forgotten_flight_is_not_joined_and_does_not_cache_its_value() {
    let (cache, sf) = cached_flight();
    let options = FlightOptions::default().ttl(Duration::from_secs(60));
    let gate = Arc::new(Notify::new());
    let stale = tokio::spawn({
        let (sf, gate) = (sf.clone(), Arc::clone(&gate));
        async move {
            sf.get_or_compute(
                5,
                move || async move {
                    gate.notified().await;
                    Ok(50) // read before the write
                },
                &options,
            )
            .await
        }
    });
    for _ in 0..100 {
        if sf.stats().in_flight == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(sf.stats().in_flight, 1);
    // The write: forget the flight, then clear the cache entry.
    assert!(sf.forget(&5));
    assert!(!sf.forget(&5));
    cache.entries.lock().unwrap().remove(&5);
    // A caller after the write starts its own flight rather than joining.
    let fresh = sf
        .get_or_compute(5, || async { Ok(51) }, &options)
        .await
        .unwrap();
    assert_eq!(fresh, 51);
    assert_eq!(cache.stored(5), Some(51));
    // The earlier flight ends: its own caller gets its value, the cache
    // keeps the fresh one.
    gate.notify_one();
    assert_eq!(stale.await.unwrap().unwrap(), 50);
    wait_until_idle(&sf).await;
    assert_eq!(cache.stored(5), Some(51), "the stale flight overwrote it");
    let stats = sf.stats();
    assert_eq!((stats.computations, stats.forgotten), (2, 1));
}

#[tokio::test(start_paused = true)]
async fn forget_if_covers_many_keys_and_a_write_already_under_way_sees_it() {
    let sf: Sf = Sf::new();
    let gate = Arc::new(Notify::new());
    let mut waiting = Vec::new();
    for key in [10, 11, 20] {
        let (sf, gate) = (sf.clone(), Arc::clone(&gate));
        waiting.push(tokio::spawn(async move {
            sf.get_or_compute(
                key,
                move || async move {
                    gate.notified().await;
                    Ok(u64::from(key))
                },
                &FlightOptions::default(),
            )
            .await
        }));
    }
    for _ in 0..100 {
        if sf.stats().in_flight == 3 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(sf.forget_if(|key| *key / 10 == 1), 2);
    assert_eq!(sf.stats().in_flight, 1);
    gate.notify_waiters();
    for task in waiting {
        task.await.unwrap().unwrap();
    }
    // A setter's meta turns stale when its flight is forgotten mid-write.
    let current = Arc::new(AtomicBool::new(true));
    let meta = CacheMeta {
        ttl: None,
        delta: Duration::ZERO,
        current: Arc::clone(&current),
    };
    assert!(meta.is_current());
    current.store(false, Ordering::Release);
    assert!(!meta.is_current());
}

/// Issue 9 item 13: a follower waits at most its own timeout, even when the
/// flight it joined has a longer one.
#[tokio::test(start_paused = true)]
async fn a_follower_stops_waiting_at_its_own_timeout() {
    let sf = Sf::new();
    let leader = tokio::spawn({
        let sf = sf.clone();
        async move {
            sf.get_or_compute(
                3,
                || async {
                    tokio::time::sleep(Duration::from_secs(20)).await;
                    Ok(30)
                },
                &FlightOptions::default().timeout(Duration::from_secs(60)),
            )
            .await
        }
    });
    for _ in 0..100 {
        if sf.stats().in_flight == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    let started = Instant::now();
    let err = sf
        .get_or_compute(
            3,
            || async { Ok(999) },
            &FlightOptions::default().timeout(Duration::from_secs(1)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, SingleFlightError::TimedOut { after } if after == Duration::from_secs(1)),
        "{err:?}"
    );
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(sf.stats().wait_timeouts, 1);
    // The flight goes on for its leader.
    assert_eq!(leader.await.unwrap().unwrap(), 30);
}

/// Issue 9 item 13: the default options have a finite timeout, so a hung
/// factory frees its key for later callers.
#[tokio::test(start_paused = true)]
async fn default_options_free_a_key_whose_factory_hangs() {
    let sf = Sf::new();
    let options = FlightOptions::default();
    assert_eq!(options.timeout, FlightOptions::DEFAULT_TIMEOUT);
    let started = Instant::now();
    let err = tokio::time::timeout(
        FlightOptions::DEFAULT_TIMEOUT * 2,
        sf.get_or_compute(4, std::future::pending, &options),
    )
    .await
    .expect("a hung factory wedged the caller")
    .unwrap_err();
    assert!(matches!(err, SingleFlightError::TimedOut { .. }), "{err:?}");
    assert_eq!(started.elapsed(), FlightOptions::DEFAULT_TIMEOUT);
    wait_until_idle(&sf).await;
    let value = sf.get_or_compute(4, || async { Ok(40) }, &options).await;
    assert_eq!(value.unwrap(), 40);
}
