//! Unit tests of the coordinator on tokio's paused clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{Instant, sleep};

use super::*;

/// Timestamped events recorded by the handlers under test.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<(String, Instant)>>>);

impl Events {
    fn push(&self, event: &str) {
        self.0
            .lock()
            .unwrap()
            .push((event.to_owned(), Instant::now()));
    }

    fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(e, _)| e.clone())
            .collect()
    }

    fn at(&self, event: &str) -> Instant {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|(e, _)| e == event)
            .map(|(_, at)| *at)
            .unwrap_or_else(|| panic!("event {event:?} not recorded"))
    }
}

/// Registers a handler that records `<name> start`, sleeps `work`, then
/// records `<name> end`.
fn timed(
    shutdown: &Shutdown,
    events: &Events,
    name: &'static str,
    phase: Phase,
    work: Duration,
) -> HandlerGuard {
    let events = events.clone();
    shutdown
        .register(name, phase, move || async move {
            events.push(&format!("{name} start"));
            sleep(work).await;
            events.push(&format!("{name} end"));
        })
        .unwrap()
}

fn outcome(report: &ShutdownReport, name: &str) -> HandlerOutcome {
    report
        .handler(name)
        .unwrap_or_else(|| panic!("{name} missing from report:\n{report}"))
        .outcome
        .clone()
}

fn requested() -> ShutdownReason {
    ShutdownReason::Requested("test".to_owned())
}

#[tokio::test(start_paused = true)]
async fn phases_run_in_order_and_handlers_of_a_phase_concurrently() {
    let shutdown = Shutdown::default();
    let events = Events::default();
    // Registered out of phase order on purpose.
    let _g = [
        timed(
            &shutdown,
            &events,
            "release",
            Phase::Release,
            Duration::from_millis(10),
        ),
        timed(
            &shutdown,
            &events,
            "stop-a",
            Phase::StopAccepting,
            Duration::from_millis(100),
        ),
        timed(
            &shutdown,
            &events,
            "stop-b",
            Phase::StopAccepting,
            Duration::from_millis(50),
        ),
        timed(
            &shutdown,
            &events,
            "drain",
            Phase::Drain,
            Duration::from_millis(30),
        ),
    ];
    let t0 = Instant::now();

    let report = shutdown.run().await;

    assert_eq!(
        events.names(),
        [
            "stop-a start",
            "stop-b start",
            "stop-b end",
            "stop-a end",
            "drain start",
            "drain end",
            "release start",
            "release end"
        ]
    );
    // Concurrent inside a phase: both stop handlers started together.
    assert_eq!(events.at("stop-a start"), t0);
    assert_eq!(events.at("stop-b start"), t0);
    // Phase 2 starts only when the slowest handler of phase 1 has ended.
    assert_eq!(events.at("drain start"), events.at("stop-a end"));
    assert_eq!(events.at("drain start") - t0, Duration::from_millis(100));
    assert_eq!(events.at("release start"), events.at("drain end"));

    let order: Vec<_> = report
        .handlers
        .iter()
        .map(|h| (h.name.as_str(), h.phase))
        .collect();
    assert_eq!(
        order,
        [
            ("stop-a", Phase::StopAccepting),
            ("stop-b", Phase::StopAccepting),
            (IN_FLIGHT_TASKS, Phase::Drain),
            ("drain", Phase::Drain),
            ("release", Phase::Release),
        ]
    );
    assert_eq!(
        report.handler("stop-a").unwrap().duration,
        Duration::from_millis(100)
    );
    assert_eq!(report.elapsed, Duration::from_millis(140));
    assert!(report.is_success(), "{report}");
    assert_eq!(report.code(), 0);
}

#[tokio::test(start_paused = true)]
async fn failing_panicking_and_hanging_handlers_do_not_stop_the_others() {
    let shutdown = Shutdown::default();
    let events = Events::default();
    let _g = [
        shutdown
            .register("failing", Phase::Drain, || async {
                Err::<(), _>("disk full")
            })
            .unwrap(),
        shutdown
            .register("panicking", Phase::Drain, || async {
                if true {
                    panic!("boom");
                }
            })
            .unwrap(),
        shutdown
            .register(
                "panicking-sync",
                Phase::Drain,
                || -> std::future::Ready<()> { panic!("before the future") },
            )
            .unwrap(),
        shutdown
            .register_with_timeout("hanging", Phase::Drain, Duration::from_secs(2), || {
                std::future::pending::<()>()
            })
            .unwrap(),
        timed(
            &shutdown,
            &events,
            "slow-ok",
            Phase::Drain,
            Duration::from_secs(1),
        ),
        timed(
            &shutdown,
            &events,
            "release",
            Phase::Release,
            Duration::ZERO,
        ),
    ];
    let t0 = Instant::now();

    let report = shutdown.run().await;

    assert_eq!(
        outcome(&report, "failing"),
        HandlerOutcome::Failed("disk full".into())
    );
    assert_eq!(
        outcome(&report, "panicking"),
        HandlerOutcome::Panicked("boom".into())
    );
    assert_eq!(
        outcome(&report, "panicking-sync"),
        HandlerOutcome::Panicked("before the future".into())
    );
    assert_eq!(outcome(&report, "hanging"), HandlerOutcome::TimedOut);
    assert_eq!(
        report.handler("hanging").unwrap().duration,
        Duration::from_secs(2)
    );
    assert_eq!(outcome(&report, "slow-ok"), HandlerOutcome::Ok);
    assert_eq!(outcome(&report, "release"), HandlerOutcome::Ok);
    assert_eq!(
        events.names(),
        [
            "slow-ok start",
            "slow-ok end",
            "release start",
            "release end"
        ]
    );
    // The release phase waited for the hanging handler's own timeout, no more.
    assert_eq!(events.at("release start") - t0, Duration::from_secs(2));
    assert!(!report.deadline_exceeded);
    assert_eq!(report.code(), crate::exit_code::FAILURE);
    let unsuccessful: Vec<_> = report.unsuccessful().map(|h| h.name.as_str()).collect();
    assert_eq!(
        unsuccessful,
        ["failing", "panicking", "panicking-sync", "hanging"]
    );
}

#[tokio::test(start_paused = true)]
async fn error_chain_is_kept_in_failure_message() {
    #[derive(Debug, thiserror::Error)]
    #[error("cannot close pool")]
    struct Outer(#[source] Middle);
    #[derive(Debug, thiserror::Error)]
    #[error("connection 3")]
    struct Middle(#[source] std::io::Error);

    let shutdown = Shutdown::default();
    let _g = shutdown
        .register("db", Phase::Release, || async {
            Err::<(), _>(Outer(Middle(std::io::Error::other("socket closed"))))
        })
        .unwrap();
    let _a = shutdown
        .register("anyhow", Phase::Release, || async {
            let cause = std::io::Error::other("broken pipe");
            Err::<(), _>(anyhow::Error::new(cause).context("flushing telemetry"))
        })
        .unwrap();
    let _s = shutdown
        .register("inline", Phase::Release, || async {
            // A message that already ends with its cause is not repeated.
            Err::<(), _>(Inline(std::io::Error::other("reset")))
        })
        .unwrap();
    #[derive(Debug, thiserror::Error)]
    #[error("closing: {0}")]
    struct Inline(#[source] std::io::Error);
    let report = shutdown.run().await;
    assert_eq!(
        outcome(&report, "db"),
        HandlerOutcome::Failed("cannot close pool: connection 3: socket closed".into())
    );
    assert_eq!(
        outcome(&report, "anyhow"),
        HandlerOutcome::Failed("flushing telemetry: broken pipe".into())
    );
    assert_eq!(
        outcome(&report, "inline"),
        HandlerOutcome::Failed("closing: reset".into())
    );
}

#[tokio::test(start_paused = true)]
async fn triggering_twice_runs_handlers_once() {
    let shutdown = Shutdown::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let _g = shutdown
        .register("count", Phase::StopAccepting, move || async move {
            counted.fetch_add(1, Ordering::SeqCst);
            sleep(Duration::from_millis(10)).await;
        })
        .unwrap();

    assert!(shutdown.trigger(ShutdownReason::Signal(Signal::Terminate)));
    assert!(!shutdown.trigger(ShutdownReason::Signal(Signal::Interrupt)));
    assert!(!shutdown.clone().trigger(requested()));
    let (first, second) = tokio::join!(shutdown.run(), shutdown.run());
    let third = shutdown.run().await;

    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(first, second);
    assert_eq!(first, third);
    assert_eq!(first.reason, ShutdownReason::Signal(Signal::Terminate));
    assert_eq!(
        first.handlers.iter().filter(|h| h.name == "count").count(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn overall_deadline_aborts_running_handlers_and_skips_later_phases() {
    let config = ShutdownConfig::default().with_timeout(Duration::from_secs(3));
    let shutdown = Shutdown::new(config);
    let events = Events::default();

    struct DropFlag(Arc<AtomicBool>);
    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let aborted = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&aborted);

    let _g = [
        timed(
            &shutdown,
            &events,
            "stop",
            Phase::StopAccepting,
            Duration::from_secs(1),
        ),
        shutdown
            .register("stuck", Phase::Drain, move || async move {
                let _flag = DropFlag(flag);
                std::future::pending::<()>().await;
            })
            .unwrap(),
        timed(
            &shutdown,
            &events,
            "drain-ok",
            Phase::Drain,
            Duration::from_millis(500),
        ),
        timed(
            &shutdown,
            &events,
            "release",
            Phase::Release,
            Duration::ZERO,
        ),
    ];
    let t0 = Instant::now();
    assert!(shutdown.trigger(requested()));
    // Time spent before `run` counts against the deadline.
    sleep(Duration::from_millis(1500)).await;

    let report = shutdown.run().await;

    assert_eq!(Instant::now() - t0, Duration::from_secs(3));
    assert!(report.deadline_exceeded);
    assert_eq!(report.elapsed, Duration::from_secs(3));
    assert_eq!(report.code(), crate::exit_code::DEADLINE_EXCEEDED);
    assert_eq!(outcome(&report, "stop"), HandlerOutcome::Ok);
    assert_eq!(outcome(&report, "drain-ok"), HandlerOutcome::Ok);
    assert_eq!(outcome(&report, IN_FLIGHT_TASKS), HandlerOutcome::Ok);
    assert_eq!(outcome(&report, "stuck"), HandlerOutcome::StillRunning);
    assert_eq!(
        report.handler("stuck").unwrap().duration,
        Duration::from_secs(2)
    );
    assert_eq!(outcome(&report, "release"), HandlerOutcome::NotStarted);
    let still: Vec<_> = report.still_running().map(|h| h.name.as_str()).collect();
    assert_eq!(still, ["stuck"]);
    assert!(report.to_string().contains("still running: [stuck]"));
    assert!(!events.names().contains(&"release start".to_owned()));
    // The stuck handler's task was aborted, not left running.
    tokio::task::yield_now().await;
    assert!(aborted.load(Ordering::SeqCst));
}

#[tokio::test(start_paused = true)]
async fn registering_after_the_trigger_is_an_error() {
    let shutdown = Shutdown::default();
    let called = Arc::new(AtomicBool::new(false));
    shutdown.trigger(requested());

    let flag = Arc::clone(&called);
    let err = shutdown
        .register("late", Phase::Release, move || async move {
            flag.store(true, Ordering::SeqCst);
        })
        .unwrap_err();

    assert_eq!(
        err,
        RegisterError::ShutdownStarted {
            name: "late".into()
        }
    );
    assert_eq!(
        err.to_string(),
        "cannot register shutdown handler \"late\": shutdown already started"
    );
    let report = shutdown.run().await;
    assert!(report.handler("late").is_none());
    assert!(!called.load(Ordering::SeqCst));
}

#[tokio::test(start_paused = true)]
async fn dropping_the_guard_deregisters_until_the_trigger() {
    let shutdown = Shutdown::default();
    let events = Events::default();
    let dropped = timed(
        &shutdown,
        &events,
        "dropped",
        Phase::Release,
        Duration::ZERO,
    );
    let kept = timed(&shutdown, &events, "kept", Phase::Release, Duration::ZERO);
    timed(
        &shutdown,
        &events,
        "detached",
        Phase::Release,
        Duration::ZERO,
    )
    .detach();
    let late_drop = timed(
        &shutdown,
        &events,
        "dropped-after-trigger",
        Phase::Release,
        Duration::ZERO,
    );
    drop(dropped);

    shutdown.trigger(requested());
    drop(late_drop); // the set of handlers is frozen at the trigger
    let report = shutdown.run().await;
    drop(kept);

    let names: Vec<_> = report.handlers.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(
        names,
        [IN_FLIGHT_TASKS, "kept", "detached", "dropped-after-trigger"]
    );
    assert!(!events.names().contains(&"dropped start".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn drain_waits_for_tracked_in_flight_work() {
    let shutdown = Shutdown::default();
    let events = Events::default();
    let token = shutdown.token();
    let work_events = events.clone();
    let work = shutdown.spawn(async move {
        work_events.push("work start");
        token.cancelled().await; // in flight until shutdown begins
        sleep(Duration::from_millis(700)).await; // finishes the job in hand
        work_events.push("work end");
        42
    });
    let _g = timed(
        &shutdown,
        &events,
        "release",
        Phase::Release,
        Duration::ZERO,
    );
    tokio::task::yield_now().await;

    let report = shutdown.run().await;

    assert_eq!(
        events.names(),
        ["work start", "work end", "release start", "release end"]
    );
    assert_eq!(outcome(&report, IN_FLIGHT_TASKS), HandlerOutcome::Ok);
    assert_eq!(
        report.handler(IN_FLIGHT_TASKS).unwrap().duration,
        Duration::from_millis(700)
    );
    assert_eq!(work.await.unwrap(), 42);
}

#[tokio::test(start_paused = true)]
async fn drain_timeout_bounds_tracked_work_and_release_still_runs() {
    let config = ShutdownConfig::default().with_drain_timeout(Duration::from_secs(5));
    let shutdown = Shutdown::new(config);
    let events = Events::default();
    shutdown.spawn(std::future::pending::<()>());
    let _g = timed(
        &shutdown,
        &events,
        "release",
        Phase::Release,
        Duration::ZERO,
    );

    let report = shutdown.run().await;

    assert_eq!(outcome(&report, IN_FLIGHT_TASKS), HandlerOutcome::TimedOut);
    assert_eq!(outcome(&report, "release"), HandlerOutcome::Ok);
    assert_eq!(report.elapsed, Duration::from_secs(5));
    assert_eq!(report.code(), crate::exit_code::FAILURE);
}

#[tokio::test(start_paused = true)]
async fn token_and_trigger() {
    let shutdown = Shutdown::default();
    let token = shutdown.token();
    assert!(!shutdown.is_triggered());

    // Cancelling a handed-out token does not start shutdown.
    shutdown.token().cancel();
    assert!(!shutdown.is_triggered());
    assert!(!token.is_cancelled());

    let waiter = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { shutdown.triggered().await }
    });
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished());

    shutdown.trigger(ShutdownReason::Fatal("config store lost".into()));
    assert!(token.is_cancelled());
    assert!(shutdown.is_triggered());
    assert_eq!(
        waiter.await.unwrap(),
        ShutdownReason::Fatal("config store lost".into())
    );

    let report = shutdown.run().await;
    assert_eq!(report.reason.to_string(), "fatal: config store lost");
    // Every handler succeeded, but a fatal reason still fails the process.
    assert_eq!(report.code(), crate::exit_code::FAILURE);
}

#[tokio::test(start_paused = true)]
async fn run_without_trigger_triggers_it() {
    let shutdown = Shutdown::default();
    let report = shutdown.run().await;
    assert!(matches!(report.reason, ShutdownReason::Requested(_)));
    assert!(shutdown.is_triggered());
    assert!(report.is_success());
}

#[tokio::test(start_paused = true)]
async fn phases_go_on_when_the_run_future_is_dropped() {
    let shutdown = Shutdown::default();
    let events = Events::default();
    let _g = [
        timed(
            &shutdown,
            &events,
            "drain",
            Phase::Drain,
            Duration::from_secs(1),
        ),
        timed(
            &shutdown,
            &events,
            "release",
            Phase::Release,
            Duration::ZERO,
        ),
    ];
    let cut_short = tokio::time::timeout(Duration::from_millis(100), shutdown.run()).await;
    assert!(cut_short.is_err());

    let report = shutdown.run().await;
    assert!(report.is_success(), "{report}");
    assert_eq!(
        events.names(),
        ["drain start", "drain end", "release start", "release end"]
    );
}

#[test]
fn trigger_outside_a_runtime_defers_the_phases_to_run() {
    let shutdown = Shutdown::default();
    let events = Events::default();
    let ran = events.clone();
    let _g = shutdown
        .register("h", Phase::Release, move || async move { ran.push("h") })
        .unwrap();
    assert!(shutdown.trigger(requested()));
    assert!(events.names().is_empty());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let report = runtime.block_on(shutdown.run());
    assert_eq!(report.reason, requested());
    assert_eq!(events.names(), ["h"]);
}

#[tokio::test(start_paused = true)]
async fn listener_closes_after_the_readiness_flip_and_the_readiness_delay() {
    let config = ShutdownConfig::default().with_readiness_delay(Duration::from_secs(5));
    let shutdown = Shutdown::new(config);
    let events = Events::default();
    let _r = timed(
        &shutdown,
        &events,
        "readiness",
        Phase::StopAccepting,
        Duration::ZERO,
    );
    let _d = timed(&shutdown, &events, "drain", Phase::Drain, Duration::ZERO);
    let listener = shutdown.listener_token();
    let closed = events.clone();
    shutdown.spawn(async move {
        listener.cancelled().await;
        closed.push("listener closed");
    });

    let t0 = Instant::now();
    let report = shutdown.run().await;

    assert_eq!(events.at("readiness end"), t0);
    assert_eq!(events.at("listener closed") - t0, Duration::from_secs(5));
    assert_eq!(events.at("drain start") - t0, Duration::from_secs(5));
    assert_eq!(outcome(&report, READINESS_DELAY), HandlerOutcome::Ok);
    assert_eq!(
        report.handler(READINESS_DELAY).unwrap().phase,
        Phase::StopAccepting
    );
    assert!(report.is_success(), "{report}");
}

#[tokio::test(start_paused = true)]
async fn without_readiness_delay_the_listener_closes_at_the_trigger() {
    let shutdown = Shutdown::default();
    let listener = shutdown.listener_token();
    let t0 = Instant::now();
    let report = shutdown.run().await;
    assert!(listener.is_cancelled());
    assert!(report.handler(READINESS_DELAY).is_none(), "{report}");
    assert_eq!(report.elapsed, Duration::ZERO);
    assert_eq!(Instant::now(), t0);
}

#[tokio::test(start_paused = true)]
async fn listener_closes_at_the_deadline_when_stop_accepting_hangs() {
    let shutdown = Shutdown::new(ShutdownConfig::default().with_timeout(Duration::from_secs(3)));
    let _h = shutdown
        .register("stuck", Phase::StopAccepting, std::future::pending::<()>)
        .unwrap();
    let listener = shutdown.listener_token();
    let report = shutdown.run().await;
    assert!(report.deadline_exceeded);
    assert!(listener.is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn until_triggered_stops_a_start_up_step_at_the_trigger() {
    let shutdown = Shutdown::default();
    // A step that finishes first returns its output.
    assert_eq!(shutdown.until_triggered(async { 7 }).await, Some(7));

    let trigger = shutdown.clone();
    tokio::spawn(async move {
        sleep(Duration::from_secs(2)).await;
        trigger.trigger(requested());
    });
    let t0 = Instant::now();
    // A connect that would take an hour ends with the trigger.
    let step = shutdown
        .until_triggered(sleep(Duration::from_secs(3600)))
        .await;
    assert_eq!(step, None);
    assert_eq!(Instant::now() - t0, Duration::from_secs(2));
    // Once triggered, a new step does not even start.
    let started = AtomicBool::new(false);
    let step = shutdown
        .until_triggered(async {
            started.store(true, Ordering::SeqCst);
        })
        .await;
    assert_eq!(step, None);
    assert!(!started.load(Ordering::SeqCst));
}
