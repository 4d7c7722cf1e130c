#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::clock::ManualClock;

const SEC: Duration = Duration::from_secs(1);

fn config() -> BreakerConfig {
    BreakerConfig {
        window_size: 10,
        minimum_calls: 5,
        failure_rate_percent: 50,
        consecutive_failures: 0,
        slow_calls: None,
        open_duration: SEC,
        open_backoff_factor: 2,
        max_open_duration: 5 * SEC,
        half_open_probes: 3,
        half_open_successes: 2,
        half_open_max_wait: 10 * SEC,
        cancelled_calls: CancelledCalls::Ignore,
    }
}

fn breaker(config: BreakerConfig) -> (CircuitBreaker, ManualClock) {
    let clock = ManualClock::new();
    let policy = BreakerPolicy::new(config).unwrap();
    (
        CircuitBreaker::with_clock(AdapterName::Openai, policy, clock.shared()),
        clock,
    )
}

fn outcome(b: &CircuitBreaker, verdict: Verdict) -> Result<(), Rejection> {
    b.try_acquire().map(|permit| permit.record(verdict))
}

fn fail(b: &CircuitBreaker) -> Result<(), Rejection> {
    outcome(b, Verdict::TRANSIENT)
}

fn succeed(b: &CircuitBreaker) -> Result<(), Rejection> {
    outcome(b, Verdict::Success)
}

/// Trips `b` (closed) with consecutive failures or the rate, whichever comes.
fn trip(b: &CircuitBreaker) {
    while b.state() == BreakerState::Closed {
        fail(b).unwrap();
    }
    assert_eq!(b.state(), BreakerState::Open);
}

#[test]
fn trips_on_failure_rate_after_minimum_calls() {
    let (b, _clock) = breaker(config());
    for _ in 0..5 {
        succeed(&b).unwrap();
    }
    for _ in 0..4 {
        fail(&b).unwrap();
    }
    // 4 of 9 failed: below 50 %.
    assert_eq!(b.state(), BreakerState::Closed);
    fail(&b).unwrap();
    // 5 of 10.
    assert_eq!(b.state(), BreakerState::Open);
    let err = succeed(&b).unwrap_err();
    assert_eq!(err.adapter, AdapterName::Openai);
    assert_eq!(err.retry_after, SEC);
}

#[test]
fn rate_is_not_judged_below_minimum_calls() {
    let (b, _clock) = breaker(config());
    for _ in 0..4 {
        fail(&b).unwrap();
    }
    assert_eq!(b.state(), BreakerState::Closed);
    fail(&b).unwrap();
    assert_eq!(b.state(), BreakerState::Open);
}

/// The closed success shortcut (a full, clean window records nothing) must
/// not change what the window judges.
#[test]
fn skipped_successes_still_leave_a_window_of_the_last_calls() {
    let (b, _clock) = breaker(BreakerConfig {
        consecutive_failures: 3,
        ..config()
    });
    for _ in 0..25 {
        succeed(&b).unwrap();
    }
    assert!(b.success_is_noop());
    let snap = b.snapshot();
    assert_eq!((snap.window_calls, snap.window_failures), (10, 0));
    // A failure ends the shortcut; a success resets the streak.
    fail(&b).unwrap();
    fail(&b).unwrap();
    assert!(!b.success_is_noop());
    succeed(&b).unwrap();
    assert_eq!(b.snapshot().consecutive_failures, 0);
    assert_eq!(b.snapshot().window_failures, 2);
    // 2 failures, then 8 more successes push them out of the window of 10.
    for _ in 0..7 {
        succeed(&b).unwrap();
    }
    assert_eq!(b.snapshot().window_failures, 2);
    succeed(&b).unwrap();
    succeed(&b).unwrap();
    assert_eq!(b.snapshot().window_failures, 0);
    // And the rate still trips on the last 10 calls.
    for _ in 0..2 {
        fail(&b).unwrap();
        succeed(&b).unwrap();
    }
    fail(&b).unwrap();
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(b.snapshot().window_failures, 3);
    succeed(&b).unwrap();
    fail(&b).unwrap();
    fail(&b).unwrap();
    // 5 of the last 10: 50 %.
    assert_eq!(b.state(), BreakerState::Open);
}

#[test]
fn window_slides_so_old_failures_age_out() {
    let (b, _clock) = breaker(config());
    for _ in 0..4 {
        fail(&b).unwrap();
    }
    for _ in 0..10 {
        succeed(&b).unwrap();
    }
    assert_eq!(b.snapshot().window_failures, 0);
    for _ in 0..4 {
        fail(&b).unwrap();
    }
    assert_eq!(b.state(), BreakerState::Closed);
}

#[test]
fn trips_on_consecutive_failures() {
    let (b, _clock) = breaker(BreakerConfig {
        window_size: 100,
        minimum_calls: 100,
        consecutive_failures: 3,
        ..config()
    });
    fail(&b).unwrap();
    fail(&b).unwrap();
    succeed(&b).unwrap();
    fail(&b).unwrap();
    fail(&b).unwrap();
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(b.snapshot().consecutive_failures, 2);
    fail(&b).unwrap();
    assert_eq!(b.state(), BreakerState::Open);
}

#[test]
fn ignored_and_benign_outcomes_do_not_trip() {
    let (b, _clock) = breaker(config());
    for _ in 0..20 {
        outcome(&b, Verdict::Ignored).unwrap();
    }
    assert_eq!(b.snapshot().window_calls, 0);
    for _ in 0..20 {
        succeed(&b).unwrap();
    }
    assert_eq!(b.state(), BreakerState::Closed);
}

#[test]
fn trips_on_slow_call_rate() {
    let (b, clock) = breaker(BreakerConfig {
        slow_calls: Some(SlowCallConfig {
            threshold: Duration::from_millis(500),
            rate_percent: 60,
        }),
        ..config()
    });
    for _ in 0..4 {
        succeed(&b).unwrap();
    }
    for i in 0..6 {
        let permit = b.try_acquire().unwrap();
        clock.advance(Duration::from_millis(600));
        permit.record(Verdict::Success);
        let expected = if i < 5 {
            BreakerState::Closed
        } else {
            BreakerState::Open
        };
        assert_eq!(b.state(), expected, "slow call {i}");
    }
}

#[test]
fn open_rejects_until_deadline_then_probes_and_recovers() {
    let (b, clock) = breaker(config());
    trip(&b);
    clock.advance(SEC - Duration::from_millis(1));
    assert_eq!(
        succeed(&b).unwrap_err().retry_after,
        Duration::from_millis(1)
    );
    clock.advance(Duration::from_millis(1));
    let first = b.try_acquire().unwrap();
    assert!(first.is_probe());
    assert_eq!(b.state(), BreakerState::HalfOpen);
    first.record(Verdict::Success);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    succeed(&b).unwrap();
    assert_eq!(b.state(), BreakerState::Closed);
    let snap = b.snapshot();
    assert_eq!((snap.window_calls, snap.trips), (0, 0));
    // Fully usable again, with a fresh window.
    for _ in 0..4 {
        fail(&b).unwrap();
    }
    assert_eq!(b.state(), BreakerState::Closed);
}

#[test]
fn half_open_admits_only_the_probe_limit() {
    let (b, clock) = breaker(config());
    trip(&b);
    clock.advance(SEC);
    let probes: Vec<_> = (0..3).map(|_| b.try_acquire().unwrap()).collect();
    let rejected = b.try_acquire().unwrap_err();
    // A hint, not the whole half-open wait (10 s): the probes are running.
    assert_eq!(rejected.retry_after, HALF_OPEN_RETRY_AFTER);
    assert_eq!(b.snapshot().probes_admitted, 3);
    // Near the end of the wait the hint is what is left of it.
    clock.advance(10 * SEC - Duration::from_millis(300));
    assert_eq!(
        b.try_acquire().unwrap_err().retry_after,
        Duration::from_millis(300)
    );
    drop(probes);
}

/// Issue 9 item 1: with the default policy (open 30 s, half-open wait 60 s,
/// 2 successes to close), an adapter called once every 61 s must recover.
/// Each probe succeeds and none is outstanding when the next call comes, so
/// the half-open wait must not re-open the breaker.
#[tokio::test(start_paused = true)]
async fn an_adapter_called_every_61_s_recovers_and_closes() {
    let clock: SharedClock = Arc::new(crate::clock::TokioClock::new());
    let b = CircuitBreaker::with_clock(AdapterName::Gsc, BreakerPolicy::default(), clock);
    let config = BreakerConfig::default();
    trip(&b);
    assert_eq!(b.snapshot().trips, 1);
    for call in 1..=config.half_open_successes {
        tokio::time::sleep(Duration::from_secs(61)).await;
        let permit = b
            .try_acquire()
            .unwrap_or_else(|r| panic!("call {call} rejected: {r}"));
        assert!(permit.is_probe(), "call {call}");
        permit.record(Verdict::Success);
    }
    assert_eq!(b.state(), BreakerState::Closed);
    let snap = b.snapshot();
    assert_eq!((snap.trips, snap.open_duration), (0, config.open_duration));
    // And it stays usable at that pace.
    tokio::time::sleep(Duration::from_secs(61)).await;
    succeed(&b).unwrap();
    assert_eq!(b.state(), BreakerState::Closed);
}

#[test]
fn the_half_open_wait_runs_from_the_first_outstanding_probe() {
    let (b, clock) = breaker(config());
    trip(&b);
    clock.advance(SEC);
    succeed(&b).unwrap(); // one of two successes, nothing outstanding
    // Long after the wait (10 s) with nothing outstanding: a probe is let in,
    // and the wait for it starts now.
    clock.advance(30 * SEC);
    let late = b.try_acquire().unwrap();
    assert!(late.is_probe());
    clock.advance(10 * SEC - Duration::from_nanos(1));
    let other = b.try_acquire().unwrap();
    assert!(other.is_probe());
    assert_eq!(b.state(), BreakerState::HalfOpen);
    // `late` has been outstanding for the whole wait: it hung.
    clock.advance(Duration::from_nanos(1));
    assert!(b.try_acquire().is_err());
    assert_eq!(b.state(), BreakerState::Open);
    drop((late, other));
}

#[test]
fn failed_probe_reopens_and_open_duration_grows_to_cap() {
    let (b, clock) = breaker(config());
    trip(&b);
    let mut expected = vec![SEC, 2 * SEC, 4 * SEC, 5 * SEC, 5 * SEC];
    expected.reverse();
    let mut open_for = expected.pop().unwrap();
    assert_eq!(b.snapshot().open_duration, open_for);
    while let Some(next) = expected.pop() {
        clock.advance(open_for - Duration::from_nanos(1));
        assert!(succeed(&b).is_err(), "still open just before {open_for:?}");
        clock.advance(Duration::from_nanos(1));
        fail(&b).unwrap(); // the probe fails
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.snapshot().open_duration, next);
        open_for = next;
    }
    // Recovery resets the growth.
    clock.advance(open_for);
    succeed(&b).unwrap();
    succeed(&b).unwrap();
    assert_eq!(b.state(), BreakerState::Closed);
    trip(&b);
    assert_eq!(b.snapshot().open_duration, SEC);
}

#[test]
fn dropped_probe_hands_its_slot_back() {
    let (b, clock) = breaker(config());
    trip(&b);
    clock.advance(SEC);
    let held: Vec<_> = (0..3).map(|_| b.try_acquire().unwrap()).collect();
    assert!(b.try_acquire().is_err());
    drop(held);
    let snap = b.snapshot();
    assert_eq!((snap.probes_admitted, snap.cancelled_calls), (0, 3));
    assert_eq!(b.state(), BreakerState::HalfOpen);
    // An ignored probe hands its slot back too.
    outcome(&b, Verdict::Ignored).unwrap();
    assert_eq!(b.snapshot().probes_admitted, 0);
    succeed(&b).unwrap();
    succeed(&b).unwrap();
    assert_eq!(b.state(), BreakerState::Closed);
}

#[tokio::test]
async fn dropping_a_call_future_releases_the_probe() {
    let (b, clock) = breaker(BreakerConfig {
        half_open_probes: 1,
        half_open_successes: 1,
        ..config()
    });
    trip(&b);
    clock.advance(SEC);
    let hung = b.call(
        std::future::pending::<Result<(), ()>>,
        crate::err_is_transient,
    );
    // Poll once so the probe is admitted, then drop the future.
    let mut hung = Box::pin(hung);
    assert!(futures::poll!(hung.as_mut()).is_pending());
    assert!(b.try_acquire().is_err());
    drop(hung);
    let value = b
        .call(|| async { Ok::<_, ()>(7) }, crate::err_is_transient)
        .await
        .unwrap();
    assert_eq!(value, 7);
    assert_eq!(b.state(), BreakerState::Closed);
}

#[test]
fn hung_probe_cannot_wedge_the_breaker() {
    let (b, clock) = breaker(config());
    trip(&b);
    clock.advance(SEC);
    let hung: Vec<_> = (0..3).map(|_| b.try_acquire().unwrap()).collect();
    clock.advance(10 * SEC - Duration::from_nanos(1));
    assert!(b.try_acquire().is_err());
    assert_eq!(b.state(), BreakerState::HalfOpen);
    clock.advance(Duration::from_nanos(1));
    // The next caller re-opens it (a failed trial: the duration grows).
    let err = b.try_acquire().unwrap_err();
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(err.retry_after, 2 * SEC);
    // Late outcomes of the hung probes belong to an old generation.
    for permit in hung {
        permit.record(Verdict::Success);
    }
    assert_eq!(b.state(), BreakerState::Open);
    clock.advance(2 * SEC);
    succeed(&b).unwrap();
    succeed(&b).unwrap();
    assert_eq!(b.state(), BreakerState::Closed);
}

#[test]
fn a_late_dropped_probe_from_an_earlier_half_open_period_frees_no_slot() {
    let (b, clock) = breaker(BreakerConfig {
        half_open_probes: 1,
        half_open_successes: 1,
        ..config()
    });
    trip(&b);
    clock.advance(SEC);
    let old = b.try_acquire().unwrap();
    assert!(old.is_probe());
    // The probe hangs past the half-open wait: the next caller re-opens.
    clock.advance(10 * SEC);
    assert!(b.try_acquire().is_err());
    assert_eq!(b.state(), BreakerState::Open);
    // Next half-open period (the open duration grew to 2 s): one new probe.
    clock.advance(2 * SEC);
    let new = b.try_acquire().unwrap();
    assert!(new.is_probe());
    assert_eq!(b.state(), BreakerState::HalfOpen);
    // The old probe's future is dropped late; its slot belonged to the old
    // period, so the new period's only slot stays taken.
    drop(old);
    assert_eq!(b.snapshot().probes_admitted, 1);
    assert!(b.try_acquire().is_err(), "a second probe was admitted");
    new.record(Verdict::Success);
    assert_eq!(b.state(), BreakerState::Closed);
}

#[test]
fn stale_outcomes_from_before_a_transition_are_ignored() {
    let (b, clock) = breaker(config());
    let slow_success = b.try_acquire().unwrap();
    trip(&b);
    clock.advance(SEC);
    // A success admitted while closed must not count as a probe.
    slow_success.record(Verdict::Success);
    assert_eq!(b.snapshot().probe_successes, 0);
    assert_eq!(b.state(), BreakerState::Open);
}

#[test]
fn cancelled_closed_calls_follow_the_config() {
    let recorder = crate::test_recorder::TestRecorder::default();
    let (b, clock) = metrics::with_local_recorder(&recorder, || breaker(config()));
    for _ in 0..20 {
        drop(b.try_acquire().unwrap());
    }
    let snap = b.snapshot();
    assert_eq!(
        (snap.state, snap.window_calls, snap.cancelled_calls),
        (BreakerState::Closed, 0, 20)
    );
    let dropped = format!(
        "circuit_breaker_dropped_closed_calls_total{{adapter=openai,policy={}}}",
        b.policy().label()
    );
    assert_eq!(recorder.counter(&dropped), 20);
    // Dropped probes hand their slot back and are not closed calls.
    trip(&b);
    clock.advance(SEC);
    drop(b.try_acquire().unwrap());
    assert_eq!(b.snapshot().cancelled_calls, 21);
    assert_eq!(recorder.counter(&dropped), 20);

    let (b, _clock) = breaker(BreakerConfig {
        cancelled_calls: CancelledCalls::CountAsFailure,
        ..config()
    });
    for _ in 0..5 {
        drop(b.try_acquire().unwrap());
    }
    assert_eq!(b.state(), BreakerState::Open);
}

#[tokio::test]
async fn call_runs_each_callers_own_function() {
    let (b, _clock) = breaker(config());
    let a = b
        .call(|| async { Ok::<_, ()>("a") }, crate::err_is_transient)
        .await;
    let c = b
        .call(|| async { Ok::<_, ()>("c") }, crate::err_is_transient)
        .await;
    assert_eq!((a.unwrap(), c.unwrap()), ("a", "c"));
    let err = b
        .call(|| async { Err::<(), _>("boom") }, crate::err_is_transient)
        .await
        .unwrap_err();
    assert_eq!(err.into_inner(), Some("boom"));
}

#[tokio::test]
async fn rejected_call_never_runs_the_function() {
    let (b, _clock) = breaker(config());
    trip(&b);
    let ran = AtomicUsize::new(0);
    let err = b
        .call(
            || async {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok::<_, &str>(())
            },
            crate::err_is_transient,
        )
        .await
        .unwrap_err();
    assert!(err.is_rejected());
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    assert_eq!(
        err.to_string(),
        "circuit breaker for openai is open, next probe in 1s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_admits_exactly_the_probe_limit_among_100_concurrent_callers() {
    let clock = ManualClock::new();
    let policy = BreakerPolicy::new(BreakerConfig {
        half_open_probes: 4,
        half_open_successes: 4,
        ..config()
    })
    .unwrap();
    let b = Arc::new(CircuitBreaker::with_clock(
        AdapterName::Tiktok,
        policy,
        clock.shared(),
    ));
    trip(&b);
    clock.advance(SEC);

    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let admitted = Arc::new(AtomicUsize::new(0));
    let rejected = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(tokio::sync::Barrier::new(100));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (b, gate, admitted, rejected, start) = (
            Arc::clone(&b),
            Arc::clone(&gate),
            Arc::clone(&admitted),
            Arc::clone(&rejected),
            Arc::clone(&start),
        );
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let result = b
                .call(
                    || async {
                        admitted.fetch_add(1, Ordering::SeqCst);
                        let _open = gate.acquire().await.unwrap();
                        Ok::<_, ()>(())
                    },
                    crate::err_is_transient,
                )
                .await;
            if matches!(result, Err(BreakerError::Rejected { .. })) {
                rejected.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    // Bounded wait until every caller has been admitted or rejected.
    for _ in 0..2000 {
        if admitted.load(Ordering::SeqCst) + rejected.load(Ordering::SeqCst) == 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(admitted.load(Ordering::SeqCst), 4);
    assert_eq!(rejected.load(Ordering::SeqCst), 96);
    assert_eq!(b.snapshot().probes_admitted, 4);
    gate.add_permits(100);
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(b.state(), BreakerState::Closed);
}

#[test]
fn transitions_and_rejections_are_exported_as_metrics() {
    let recorder = crate::test_recorder::TestRecorder::default();
    metrics::with_local_recorder(&recorder, || {
        let (b, clock) = breaker(config());
        let label = b.policy().label();
        let gauge = &format!("circuit_breaker_state{{adapter=openai,policy={label}}}");
        // Registered at creation (a fresh series reads 0), written on
        // transitions.
        assert_eq!(recorder.gauge(gauge), Some(0.0));
        trip(&b);
        assert_eq!(recorder.gauge(gauge), Some(1.0));
        assert!(succeed(&b).is_err());
        assert!(succeed(&b).is_err());
        assert_eq!(
            recorder.counter(&format!(
                "circuit_breaker_rejected_total{{adapter=openai,policy={label}}}"
            )),
            2
        );
        clock.advance(SEC);
        succeed(&b).unwrap();
        assert_eq!(recorder.gauge(gauge), Some(2.0));
        succeed(&b).unwrap();
        assert_eq!(recorder.gauge(gauge), Some(0.0));
        assert_eq!(
            recorder.counter(&format!(
                "circuit_breaker_transitions_total{{adapter=openai,policy={label},to=open}}"
            )),
            1
        );
    });
}

#[test]
fn creating_a_breaker_does_not_reset_the_gauge_of_an_open_one() {
    let recorder = crate::test_recorder::TestRecorder::default();
    metrics::with_local_recorder(&recorder, || {
        let (open, _clock) = breaker(config());
        let gauge = &format!(
            "circuit_breaker_state{{adapter=openai,policy={}}}",
            open.policy().label()
        );
        trip(&open);
        assert_eq!(recorder.gauge(gauge), Some(1.0));
        // The same key built again (as after an idle breaker expired).
        let (again, _clock) = breaker(config());
        assert_eq!(again.state(), BreakerState::Closed);
        assert_eq!(recorder.gauge(gauge), Some(1.0), "reset by a creation");
    });
}

/// Issue 9 item 4: two policies of one adapter have a series each, so one
/// recovering cannot make the gauge read closed while the other rejects.
#[test]
fn two_policies_of_one_adapter_do_not_share_the_state_gauge() {
    let recorder = crate::test_recorder::TestRecorder::default();
    metrics::with_local_recorder(&recorder, || {
        let (strict, _clock) = breaker(config());
        let (lenient, lenient_clock) = breaker(BreakerConfig {
            consecutive_failures: 7,
            ..config()
        });
        let series = |b: &CircuitBreaker| {
            format!(
                "circuit_breaker_state{{adapter=openai,policy={}}}",
                b.policy().label()
            )
        };
        assert_ne!(series(&strict), series(&lenient));
        trip(&strict);
        trip(&lenient);
        lenient_clock.advance(SEC);
        succeed(&lenient).unwrap();
        succeed(&lenient).unwrap();
        assert_eq!(lenient.state(), BreakerState::Closed);
        assert_eq!(recorder.gauge(&series(&lenient)), Some(0.0));
        // The strict one still rejects, and its series says so.
        assert!(succeed(&strict).is_err());
        assert_eq!(recorder.gauge(&series(&strict)), Some(1.0));
        // The default policy is labelled by name.
        let default = CircuitBreaker::new(AdapterName::Openai, BreakerPolicy::default());
        assert_eq!(default.policy().label(), "default");
        assert_eq!(
            recorder.gauge("circuit_breaker_state{adapter=openai,policy=default}"),
            Some(0.0)
        );
    });
}

#[test]
fn internal_breaker_is_named_in_metrics_rejections_and_errors() {
    let recorder = crate::test_recorder::TestRecorder::default();
    metrics::with_local_recorder(&recorder, || {
        let clock = ManualClock::new();
        let policy = BreakerPolicy::new(config()).unwrap();
        let b = CircuitBreaker::internal_with_clock("redis", policy, clock.shared());
        assert_eq!(b.name(), "redis");
        assert_eq!(b.adapter(), AdapterName::Unknown);
        let label = b.policy().label();
        let gauge = &format!("circuit_breaker_state{{adapter=redis,policy={label}}}");
        assert_eq!(recorder.gauge(gauge), Some(0.0));
        trip(&b);
        assert_eq!(recorder.gauge(gauge), Some(1.0));
        let rejection = succeed(&b).unwrap_err();
        assert_eq!(rejection.name, "redis");
        assert_eq!(rejection.adapter, AdapterName::Unknown);
        assert_eq!(
            rejection.to_string(),
            "circuit breaker for redis is open, next probe in 1s"
        );
        let err = BreakerError::<std::io::Error>::from(rejection);
        assert_eq!(
            err.to_string(),
            "circuit breaker for redis is open, next probe in 1s"
        );
        assert_eq!(
            recorder.counter(&format!(
                "circuit_breaker_rejected_total{{adapter=redis,policy={label}}}"
            )),
            1
        );
        assert_eq!(
            recorder.counter(&format!(
                "circuit_breaker_transitions_total{{adapter=redis,policy={label},to=open}}"
            )),
            1
        );
        // Nothing was recorded under the `unknown` adapter's series.
        assert_eq!(
            recorder.gauge(&format!(
                "circuit_breaker_state{{adapter=unknown,policy={label}}}"
            )),
            None
        );
    });
}

#[test]
fn adapter_breakers_keep_the_adapter_as_their_name() {
    let (b, _clock) = breaker(config());
    assert_eq!(b.name(), "openai");
    trip(&b);
    let rejection = succeed(&b).unwrap_err();
    assert_eq!(rejection.name, "openai");
    assert_eq!(
        rejection.to_string(),
        "circuit breaker for openai is open, next probe in 1s"
    );
}

#[test]
fn internal_names_must_be_lowercase_labels_and_not_adapters() {
    for name in ["", "Redis", "red is", "redis\n", "openai", "unknown", "GSC"] {
        let built = std::panic::catch_unwind(|| {
            CircuitBreaker::internal(name, BreakerPolicy::default());
        });
        assert!(built.is_err(), "{name:?} was accepted");
    }
    for name in ["redis", "job-queue", "pg_pool2"] {
        assert_eq!(
            CircuitBreaker::internal(name, BreakerPolicy::default()).name(),
            name
        );
    }
}

#[test]
fn open_duration_formula_caps_and_tolerates_factor_one() {
    let c = config();
    let got: Vec<_> = (1..=5).map(|t| open_duration_for(&c, t)).collect();
    assert_eq!(got, vec![SEC, 2 * SEC, 4 * SEC, 5 * SEC, 5 * SEC]);
    assert_eq!(open_duration_for(&c, u32::MAX), 5 * SEC);
    let flat = BreakerConfig {
        open_backoff_factor: 1,
        ..config()
    };
    assert_eq!(open_duration_for(&flat, u32::MAX), SEC);
}

#[derive(Debug, Clone)]
enum Op {
    Acquire,
    Record(usize, Verdict),
    Drop(usize),
    Advance(u64),
    /// Advance to 1 ns before the open deadline, if open.
    NearDeadline,
}

fn op() -> impl Strategy<Value = Op> {
    let verdict = prop_oneof![
        Just(Verdict::Success),
        Just(Verdict::Failure),
        Just(Verdict::TRANSIENT),
        Just(Verdict::Ignored),
    ];
    prop_oneof![
        4 => Just(Op::Acquire),
        4 => (any::<usize>(), verdict).prop_map(|(i, v)| Op::Record(i, v)),
        1 => any::<usize>().prop_map(Op::Drop),
        2 => (0u64..3_000_000_000).prop_map(Op::Advance),
        1 => Just(Op::NearDeadline),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// For any sequence of admissions, outcomes, drops and clock moves: no
    /// call is admitted while open before the deadline, and no half-open
    /// period admits more than the probe limit.
    #[test]
    fn never_admits_while_open_nor_beyond_probe_limit(
        ops in proptest::collection::vec(op(), 1..200),
        probes in 1u32..5,
    ) {
        let (b, clock) = breaker(BreakerConfig {
            window_size: 8,
            minimum_calls: 4,
            consecutive_failures: 3,
            half_open_probes: probes,
            half_open_successes: probes,
            half_open_max_wait: 2 * SEC,
            ..config()
        });
        // Each held permit is tagged with the half-open period it was
        // admitted in (`None` for a closed call). A released probe frees a
        // slot only in its own period: the model must not let a late drop
        // from an earlier period make room in the current one.
        let mut held: Vec<(CallPermit<'_>, Option<u64>)> = Vec::new();
        // The model's count of half-open periods so far, and whether the
        // breaker is in one (a period starts with the first probe after open
        // and ends with any transition out of half-open).
        let mut period = 0u64;
        let mut in_half_open = false;
        // Probe slots the current period holds: admitted minus released.
        let mut admitted_in_period = 0u32;
        for op in ops {
            let before = b.snapshot();
            match op {
                Op::Acquire => {
                    let result = b.try_acquire();
                    if before.state == BreakerState::Open
                        && before.retry_after.is_some_and(|d| !d.is_zero())
                    {
                        prop_assert!(result.is_err(), "admitted while open: {before:?}");
                    }
                    if let Ok(permit) = result {
                        let tag = if permit.is_probe() {
                            if !in_half_open {
                                period += 1;
                                in_half_open = true;
                                admitted_in_period = 0;
                            }
                            admitted_in_period += 1;
                            Some(period)
                        } else {
                            None
                        };
                        held.push((permit, tag));
                    }
                }
                Op::Record(i, verdict) if !held.is_empty() => {
                    let (permit, tag) = held.swap_remove(i % held.len());
                    permit.record(verdict);
                    if verdict == Verdict::Ignored && in_half_open && tag == Some(period) {
                        admitted_in_period -= 1;
                    }
                }
                Op::Drop(i) if !held.is_empty() => {
                    let (permit, tag) = held.swap_remove(i % held.len());
                    drop(permit);
                    if in_half_open && tag == Some(period) {
                        admitted_in_period -= 1;
                    }
                }
                Op::Advance(nanos) => clock.advance(Duration::from_nanos(nanos)),
                Op::NearDeadline => {
                    if let Some(left) = before.retry_after.filter(|d| *d > Duration::from_nanos(1)) {
                        clock.advance(left - Duration::from_nanos(1));
                    }
                }
                Op::Record(..) | Op::Drop(..) => {}
            }
            let after = b.snapshot();
            prop_assert!(after.probes_admitted <= probes, "{after:?}");
            if after.state == BreakerState::HalfOpen {
                prop_assert!(in_half_open, "half-open without a probe: {after:?}");
                prop_assert!(admitted_in_period <= probes);
                // The breaker's own count agrees with the model's.
                prop_assert_eq!(after.probes_admitted, admitted_in_period, "{:?}", after);
            } else {
                in_half_open = false;
                admitted_in_period = 0;
            }
        }
    }
}
