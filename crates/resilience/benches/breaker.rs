//! Overhead of the breaker and registry hot paths, with failsafe-rs 1.3 in
//! the same run as the anchor. Futures are ready, polled once with a no-op
//! waker, so the figures are the wrapper's cost and nothing else.
//!
//! Two failsafe anchors: its default policy (`failsafe`: success rate over a
//! time window or consecutive failures, which reads the clock and takes a
//! lock per call) and `failsafe_consecutive` (its `ConsecutiveFailures`
//! policy alone, the like-for-like anchor for a closed call).
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

type FailsafeConsecutive = failsafe::StateMachine<
    failsafe::failure_policy::ConsecutiveFailures<failsafe::backoff::EqualJittered>,
    (),
>;

/// failsafe's `ConsecutiveFailures` policy alone, with its default settings
/// (5 in a row, equal-jittered backoff 10 s to 300 s).
fn failsafe_consecutive_breaker() -> FailsafeConsecutive {
    failsafe::Config::new()
        .failure_policy(failsafe::failure_policy::ConsecutiveFailures::default())
        .build()
}

fn failsafe_consecutive_call(b: &FailsafeConsecutive) -> bool {
    poll_ready(b.call(ready(Ok::<u64, ()>(black_box(1))))).is_ok()
}

fn closed_single(c: &mut Criterion) {
    let mut group = c.benchmark_group("closed_call");
    let b = ours();
    group.bench_function("smartbeak", |bench| bench.iter(|| ours_call(&b)));
    let f = failsafe_breaker();
    group.bench_function("failsafe", |bench| bench.iter(|| failsafe_call(&f)));
    let fc = failsafe_consecutive_breaker();
    group.bench_function("failsafe_consecutive", |bench| {
        bench.iter(|| failsafe_consecutive_call(&fc))
    });
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
    let fc = failsafe_consecutive_breaker();
    group.bench_function("failsafe_consecutive", |bench| {
        bench.iter_custom(|iters| contended(&fc, failsafe_consecutive_call, iters))
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
    // failsafe's rejection with a consecutive-failures policy (one failure
    // trips it): no success-rate window to update.
    group.bench_function("failsafe_consecutive", |bench| {
        bench.iter(|| poll_ready(f.call(ready(Ok::<u64, ()>(black_box(1))))).is_ok())
    });
    // And with its default policy, tripped by its 5 consecutive failures.
    let d = failsafe_breaker();
    for _ in 0..5 {
        poll_ready(d.call(ready(Err::<(), ()>(())))).ok();
    }
    assert!(matches!(
        poll_ready(d.call(ready(Ok::<u64, ()>(1)))),
        Err(failsafe::Error::Rejected)
    ));
    group.bench_function("failsafe", |bench| bench.iter(|| failsafe_call(&d)));
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
