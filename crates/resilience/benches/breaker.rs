//! Overhead of the breaker and registry hot paths, with failsafe-rs 1.3 in
//! the same run as the anchor. Futures are ready, polled once with a no-op
//! waker, so the figures are the wrapper's cost and nothing else.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::future::{Future, ready};
use std::hint::black_box;
use std::pin::pin;
use std::sync::{Arc, Barrier, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use failsafe::futures::CircuitBreaker as _;
use smartbeak_resilience::{
    AdapterName, BreakerConfig, BreakerPolicy, BreakerRegistry, CircuitBreaker, RegistryConfig,
    SharedClock, SystemClock, err_is_transient,
};

/// Polls a future that must be ready on its first poll.
fn poll_ready<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("bench future was not ready"),
    }
}

fn ours() -> CircuitBreaker {
    CircuitBreaker::new(AdapterName::Openai, BreakerPolicy::default())
}

fn ours_call(b: &CircuitBreaker) -> bool {
    poll_ready(b.call(|| ready(Ok::<u64, ()>(black_box(1))), err_is_transient)).is_ok()
}

type Failsafe = failsafe::StateMachine<
    failsafe::failure_policy::OrElse<
        failsafe::failure_policy::SuccessRateOverTimeWindow<failsafe::backoff::EqualJittered>,
        failsafe::failure_policy::ConsecutiveFailures<failsafe::backoff::EqualJittered>,
    >,
    (),
>;

fn failsafe_breaker() -> Failsafe {
    failsafe::Config::new().build()
}

fn failsafe_call(b: &Failsafe) -> bool {
    poll_ready(b.call(ready(Ok::<u64, ()>(black_box(1))))).is_ok()
}

fn closed_single(c: &mut Criterion) {
    let mut group = c.benchmark_group("closed_call");
    let b = ours();
    group.bench_function("smartbeak", |bench| bench.iter(|| ours_call(&b)));
    let f = failsafe_breaker();
    group.bench_function("failsafe", |bench| bench.iter(|| failsafe_call(&f)));
    group.finish();
}

/// Wall time per call with two threads calling the same breaker at once.
fn contended<B: Sync>(breaker: &B, call: fn(&B) -> bool, iters: u64) -> Duration {
    let start = Barrier::new(3);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                start.wait();
                for _ in 0..iters {
                    black_box(call(breaker));
                }
            });
        }
        start.wait();
        let began = Instant::now();
        // Scope end joins both threads.
        began
    })
    .elapsed()
}

fn closed_contended(c: &mut Criterion) {
    let mut group = c.benchmark_group("closed_call_2_threads");
    let b = ours();
    group.bench_function("smartbeak", |bench| {
        bench.iter_custom(|iters| contended(&b, ours_call, iters))
    });
    let f = failsafe_breaker();
    group.bench_function("failsafe", |bench| {
        bench.iter_custom(|iters| contended(&f, failsafe_call, iters))
    });
    group.finish();
}

fn open_rejection(c: &mut Criterion) {
    let mut group = c.benchmark_group("open_rejection");
    let b = CircuitBreaker::new(
        AdapterName::Openai,
        BreakerPolicy::new(BreakerConfig {
            open_duration: Duration::from_secs(3600),
            max_open_duration: Duration::from_secs(3600),
            ..BreakerConfig::default()
        })
        .unwrap(),
    );
    while b.try_acquire().is_ok() {
        poll_ready(b.call(|| ready(Err::<(), ()>(())), err_is_transient)).ok();
    }
    assert!(!ours_call(&b));
    group.bench_function("smartbeak", |bench| bench.iter(|| ours_call(&b)));

    let backoff = failsafe::backoff::constant(Duration::from_secs(3600));
    let f = failsafe::Config::new()
        .failure_policy(failsafe::failure_policy::consecutive_failures(1, backoff))
        .build();
    poll_ready(f.call(ready(Err::<(), ()>(())))).ok();
    assert!(poll_ready(f.call(ready(Ok::<u64, ()>(1)))).is_err());
    group.bench_function("failsafe", |bench| {
        bench.iter(|| poll_ready(f.call(ready(Ok::<u64, ()>(black_box(1))))).is_ok())
    });
    group.finish();
}

fn registry_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("registry_get_hit");
    let registry = BreakerRegistry::new(RegistryConfig::default());
    let policy = BreakerPolicy::default();
    for adapter in AdapterName::ALL {
        registry.get(adapter, &policy);
    }
    group.bench_function("smartbeak", |bench| {
        bench.iter(|| registry.get(black_box(AdapterName::Youtube), &policy))
    });
    // Reference point: the obvious RwLock<HashMap> keyed the same way.
    let map: RwLock<HashMap<(AdapterName, u64), Arc<CircuitBreaker>>> = RwLock::new(
        AdapterName::ALL
            .into_iter()
            .map(|a| ((a, policy.id().0), Arc::new(ours())))
            .collect(),
    );
    group.bench_function("rwlock_hashmap", |bench| {
        bench.iter(|| {
            let key = (black_box(AdapterName::Youtube), policy.id().0);
            map.read().unwrap().get(&key).cloned()
        })
    });
    group.finish();
}

/// What one clock read costs here: the open path and the registry read one.
fn clock_read(c: &mut Criterion) {
    let mut group = c.benchmark_group("clock_read");
    let clock: SharedClock = Arc::new(SystemClock);
    group.bench_function("system_clock_quanta", |bench| {
        bench.iter(|| black_box(clock.now_nanos()))
    });
    group.bench_function("std_instant_now", |bench| {
        bench.iter(|| black_box(Instant::now()))
    });
    group.finish();
}

criterion_group!(
    benches,
    clock_read,
    closed_single,
    closed_contended,
    open_rejection,
    registry_lookup
);
criterion_main!(benches);
