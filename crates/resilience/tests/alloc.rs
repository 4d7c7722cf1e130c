//! Allocation check of the hot paths, with dhat's heap profiler as the global
//! allocator (its own test binary, since the allocator is per binary). The
//! futures are ready and polled once with a no-op waker.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::future::{Future, ready};
use std::pin::pin;
use std::sync::Barrier;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use smartbeak_resilience::{
    AdapterName, BreakerConfig, BreakerPolicy, BreakerRegistry, CircuitBreaker, RegistryConfig,
    Verdict, err_is_transient,
};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn poll_ready<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("future was not ready"),
    }
}

/// Rounds of [`blocks_allocated`]; its result is the quietest round.
const ROUNDS: usize = 5;

/// Heap blocks allocated by `n` runs of `f`: the fewest of [`ROUNDS`] rounds
/// of `n` runs each.
///
/// dhat counts the allocations of every thread of the process, and this is
/// not the only thread: right after spawning the test's thread, libtest's
/// main thread does its bookkeeping (the running test into a map, its
/// timeout into a queue, the result channel), which on a loaded machine can
/// land inside a measured round (a few blocks, once). A path that allocates
/// per call, or every so many calls, allocates in every round, so the
/// quietest round still shows it; a one-off lazy init is warmed up first.
fn blocks_allocated(n: usize, mut f: impl FnMut()) -> u64 {
    (0..ROUNDS)
        .map(|_| {
            let before = dhat::HeapStats::get().total_blocks;
            for _ in 0..n {
                f();
            }
            dhat::HeapStats::get().total_blocks - before
        })
        .min()
        .unwrap_or(0)
}

/// One test only: the profiler is process-global.
#[test]
fn hot_paths_do_not_allocate() {
    let _profiler = dhat::Profiler::builder().testing().build();

    let closed = CircuitBreaker::new(AdapterName::Openai, BreakerPolicy::default());
    let closed_call = || {
        let r = poll_ready(closed.call(|| ready(Ok::<u64, ()>(1)), err_is_transient));
        assert!(r.is_ok());
    };

    let open = CircuitBreaker::new(
        AdapterName::Gsc,
        BreakerPolicy::new(BreakerConfig {
            open_duration: Duration::from_secs(3600),
            max_open_duration: Duration::from_secs(3600),
            ..BreakerConfig::default()
        })
        .unwrap(),
    );
    while open.try_acquire().is_ok() {
        let _ = poll_ready(open.call(|| ready(Err::<(), ()>(())), err_is_transient));
    }
    let rejected_call = || {
        let r = poll_ready(open.call(|| ready(Ok::<u64, ()>(1)), err_is_transient));
        assert!(r.unwrap_err().is_rejected());
    };

    // A failure that does not trip: the judging path (popcount) is covered too.
    let failing = CircuitBreaker::new(
        AdapterName::Ga,
        BreakerPolicy::new(BreakerConfig {
            consecutive_failures: 0,
            failure_rate_percent: 100,
            ..BreakerConfig::default()
        })
        .unwrap(),
    );
    let mixed_call = || {
        let _ = poll_ready(failing.call(|| ready(Err::<(), ()>(())), err_is_transient));
        let _ = poll_ready(failing.call(|| ready(Ok::<(), ()>(())), err_is_transient));
    };

    // An internal breaker driven by hand (`try_acquire` + `record`), as the
    // api's Redis limiter does: closed, then open.
    let internal_policy = BreakerPolicy::new(BreakerConfig {
        consecutive_failures: 3,
        open_duration: Duration::from_secs(3600),
        max_open_duration: Duration::from_secs(3600),
        ..BreakerConfig::default()
    })
    .unwrap();
    let internal = CircuitBreaker::internal("redis", internal_policy.clone());
    let internal_call = || {
        let permit = internal.try_acquire().unwrap();
        permit.record(Verdict::Success);
    };
    let internal_open = CircuitBreaker::internal("redis", internal_policy);
    while let Ok(permit) = internal_open.try_acquire() {
        permit.record(Verdict::TRANSIENT);
    }
    let internal_rejected = || {
        let rejection = internal_open.try_acquire().unwrap_err();
        assert_eq!(rejection.name, "redis");
    };

    let registry = BreakerRegistry::new(RegistryConfig::default());
    let policy = BreakerPolicy::default();
    let _warm = registry.get(AdapterName::Youtube, &policy);
    let lookup = || {
        let breaker = registry.get(AdapterName::Youtube, &policy);
        assert_eq!(breaker.adapter(), AdapterName::Youtube);
    };
    let parse = || {
        assert_eq!(
            AdapterName::parse("Google-Analytics"),
            AdapterName::GoogleAnalytics
        );
    };

    // Warm up once (lazy statics such as the clock origin), then count.
    closed_call();
    rejected_call();
    mixed_call();
    internal_call();
    internal_rejected();
    lookup();
    parse();
    // The check itself can fail.
    assert_eq!(
        blocks_allocated(3, || drop(std::hint::black_box(Box::new(1u8)))),
        3
    );
    // Another thread's allocations in one round (as libtest's main thread
    // may make) do not count against the path measured.
    let (go, done) = (Barrier::new(2), Barrier::new(2));
    std::thread::scope(|s| {
        s.spawn(|| {
            go.wait();
            for _ in 0..4 {
                drop(std::hint::black_box(Box::new(1u8)));
            }
            done.wait();
        });
        let mut first = true;
        let noisy = blocks_allocated(10, || {
            if std::mem::take(&mut first) {
                go.wait();
                done.wait();
            }
        });
        assert_eq!(noisy, 0, "another thread's allocations");
    });
    assert_eq!(blocks_allocated(10_000, closed_call), 0, "closed call");
    assert_eq!(
        blocks_allocated(10_000, rejected_call),
        0,
        "rejection while open"
    );
    assert_eq!(
        blocks_allocated(10_000, mixed_call),
        0,
        "closed failure and success"
    );
    assert_eq!(
        blocks_allocated(10_000, internal_call),
        0,
        "internal breaker, closed"
    );
    assert_eq!(
        blocks_allocated(10_000, internal_rejected),
        0,
        "internal breaker, rejection"
    );
    assert_eq!(blocks_allocated(10_000, lookup), 0, "registry hit");
    assert_eq!(blocks_allocated(10_000, parse), 0, "adapter name parse");
}
