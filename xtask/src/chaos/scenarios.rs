//! The scenarios of issue 14 implemented so far (1, 3, 4, 8 for the api): each runs its load on the
//! runtime, injects its fault from this thread on a fixed schedule, and judges the outcomes.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use smartbeak_test_support::Fault;
use tokio::runtime::Runtime;

use super::load::{Kind, Load, Report};
use super::{REDIS_COMMAND_TIMEOUT, REQUEST_TIMEOUT, ScenarioResult, System, backends, redis_keys};
use crate::services::psql_read;

/// Fail-open answers may take the Redis command timeout plus this (a debug build on a
/// shared machine: the database read and the scheduling are in it).
const FAIL_OPEN_MARGIN: Duration = Duration::from_millis(400);

/// Limiting must resume (decisions from Redis again) within this after Redis is back.
const LIMITER_RECOVERY: Duration = Duration::from_secs(2);

/// Runs scenario `n`.
pub(super) fn run(
    n: u32,
    system: &mut System,
    rt: &Runtime,
    quick: bool,
) -> Result<ScenarioResult> {
    // Full length stretches every phase.
    let scale = if quick { 1 } else { 3 };
    match n {
        1 => redis_outage(system, rt, scale),
        3 => backends_terminated(system, rt, scale),
        4 => postgres_black_hole(system, rt, quick),
        8 => api_sigterm(system, rt),
        other => bail!("scenario {other} is not implemented"),
    }
}

fn load(system: &System, rate: u32, duration: Duration) -> Load {
    Load {
        urls: system.urls(),
        key: system.key.clone(),
        rate,
        duration,
        // Past the api's own deadline plus a margin: a request still open then hangs.
        deadline: REQUEST_TIMEOUT + Duration::from_secs(2),
        epoch: Instant::now(),
    }
}

/// Sleeps until `offset` after `start` (the fault schedule).
fn at(start: Instant, offset: Duration) {
    if let Some(left) = (start + offset).checked_duration_since(Instant::now()) {
        std::thread::sleep(left);
    }
}

/// Polls `cond` every 20 ms for at most `bound`; how long it took, if it came.
fn time_until(bound: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < bound {
        if cond() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Counts the report into `r`: requests, errors by kind, lost (sent, no outcome), hung.
fn tally(r: &mut ScenarioResult, report: &Report) {
    r.requests = report.sent;
    r.lost = report.sent.saturating_sub(report.outcomes.len());
    for o in &report.outcomes {
        if o.kind != Kind::Ok {
            *r.errors.entry(o.kind.label()).or_default() += 1;
        }
    }
    if r.lost > 0 {
        r.fail(format!("{} requests lost", r.lost));
    }
    let hung = report
        .outcomes
        .iter()
        .filter(|o| o.kind == Kind::Deadline)
        .count();
    if hung > 0 {
        r.fail(format!("{hung} requests hung past the api's deadline"));
    }
}

/// Scenario 1: Redis killed and restarted, then black-holed, under load; fail-open.
fn redis_outage(system: &mut System, rt: &Runtime, scale: u32) -> Result<ScenarioResult> {
    let mut r = ScenarioResult::new(1, "redis killed, black-holed");
    let s = |secs: u32| Duration::from_secs(u64::from(secs * scale));
    let port = system.redis.port();
    let failed_open_before = super::failed_open_decisions(system)?;
    let load = load(system, 100, s(10));
    let start = load.epoch;
    let handle = rt.spawn(load.run());

    at(start, s(2));
    system.redis.stop();
    at(start, s(4));
    system.redis.restart()?;
    // Restarted empty: a key appears when a decision came from Redis again.
    let after_restart = time_until(Duration::from_secs(5), || {
        redis_keys(port).is_ok_and(|n| n > 0)
    });
    at(start, s(6));
    system.redis_proxy.set_fault(Fault::Stall);
    at(start, s(8));
    let _ = super::redis_command(port, "FLUSHALL")?;
    system.redis_proxy.set_fault(Fault::Pass);
    let after_black_hole = time_until(Duration::from_secs(5), || {
        redis_keys(port).is_ok_and(|n| n > 0)
    });
    let report = rt.block_on(handle)?;

    tally(&mut r, &report);
    // The fault must have reached the limiter, or the scenario proved nothing.
    let failed_open = super::failed_open_decisions(system)? - failed_open_before;
    if failed_open < 1.0 {
        r.fail("no decision failed open: the fault did not reach the limiter");
    }
    for (what, recovery) in [("restart", after_restart), ("black hole", after_black_hole)] {
        match recovery {
            Some(d) if d <= LIMITER_RECOVERY => {}
            Some(d) => r.fail(format!(
                "limiting resumed {d:?} after the {what}, over {LIMITER_RECOVERY:?}"
            )),
            None => r.fail(format!("limiting did not resume within 5 s of the {what}")),
        }
    }
    r.recovery = after_restart.max(after_black_hole);
    let errors: usize = r.errors.values().sum();
    if errors > 0 {
        r.fail(format!(
            "{errors} requests not served (fail-open serves every one)"
        ));
    }
    let bound = REDIS_COMMAND_TIMEOUT + FAIL_OPEN_MARGIN;
    let slow: Vec<Duration> = report
        .outcomes
        .iter()
        .filter(|o| o.kind == Kind::Ok && o.latency > bound)
        .map(|o| o.latency)
        .collect();
    if !slow.is_empty() {
        let worst = slow.iter().max().copied().unwrap_or_default();
        r.fail(format!(
            "{} answers slower than the command timeout plus {FAIL_OPEN_MARGIN:?} (worst {worst:?})",
            slow.len()
        ));
    }
    Ok(r)
}

/// Scenario 3: every backend of the database terminated, three times, under load.
fn backends_terminated(system: &mut System, rt: &Runtime, scale: u32) -> Result<ScenarioResult> {
    let mut r = ScenarioResult::new(3, "pg_terminate_backend");
    let s = |secs: u32| Duration::from_secs(u64::from(secs * scale));
    let before = backends(&system.db_url)?;
    let load = load(system, 100, s(8));
    let start = load.epoch;
    let handle = rt.spawn(load.run());
    let mut last_fault = Duration::ZERO;
    for i in 0..3 {
        at(start, s(2) + Duration::from_secs(i));
        last_fault = start.elapsed();
        psql_read(
            &system.db_url,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = 'chaos' AND pid <> pg_backend_pid()",
        )?;
    }
    let report = rt.block_on(handle)?;
    tally(&mut r, &report);
    judge_errors_and_recovery(&mut r, &report, last_fault);
    // The pools open connections again as they are needed; none is left broken.
    let after = time_until(Duration::from_secs(5), || {
        backends(&system.db_url).is_ok_and(|n| n > 0)
    });
    let now = backends(&system.db_url)?;
    if after.is_none() || now > 4 * 20 {
        r.fail(format!(
            "backends before {before}, after {now}: the pools did not come back to normal"
        ));
    }
    Ok(r)
}

/// Scenario 4: PostgreSQL black-holed under load (10 s; 5 s quick).
fn postgres_black_hole(system: &mut System, rt: &Runtime, quick: bool) -> Result<ScenarioResult> {
    let mut r = ScenarioResult::new(4, "postgres black-holed");
    let hole = Duration::from_secs(if quick { 5 } else { 10 });
    let load = load(
        system,
        50,
        Duration::from_secs(2) + hole + Duration::from_secs(4),
    );
    let start = load.epoch;
    let handle = rt.spawn(load.run());
    at(start, Duration::from_secs(2));
    system.pg_proxy.set_fault(Fault::Stall);
    at(start, Duration::from_secs(2) + hole);
    system.pg_proxy.set_fault(Fault::Pass);
    let restored = start.elapsed();
    let report = rt.block_on(handle)?;
    tally(&mut r, &report);
    judge_errors_and_recovery(&mut r, &report, restored);
    if r.errors.is_empty() {
        r.fail("no request failed while PostgreSQL was black-holed: the fault had no effect");
    }
    let late = REQUEST_TIMEOUT + Duration::from_secs(1);
    let past_deadline = report
        .outcomes
        .iter()
        .filter(|o| o.kind != Kind::Ok && o.latency > late)
        .count();
    if past_deadline > 0 {
        r.fail(format!(
            "{past_deadline} errors came later than the api's deadline plus 1 s"
        ));
    }
    Ok(r)
}

/// Every error must be a 5xx with the standard body, and every request sent from 1 s after
/// the fault ended must succeed; the recovery is from the fault's end to the last error.
fn judge_errors_and_recovery(r: &mut ScenarioResult, report: &Report, fault_end: Duration) {
    let odd: Vec<String> = report
        .outcomes
        .iter()
        .filter(|o| !matches!(&o.kind, Kind::Ok | Kind::Status(500..=599, _)))
        .map(|o| o.kind.label())
        .collect();
    if !odd.is_empty() {
        r.fail(format!(
            "{} errors other than a standard 5xx body (first: {})",
            odd.len(),
            odd[0]
        ));
    }
    let last_error = report
        .outcomes
        .iter()
        .filter(|o| o.kind != Kind::Ok)
        .map(|o| o.sent)
        .max();
    r.recovery = Some(last_error.map_or(Duration::ZERO, |e| e.saturating_sub(fault_end)));
    let after = report
        .outcomes
        .iter()
        .filter(|o| o.sent >= fault_end + Duration::from_secs(1) && o.kind != Kind::Ok)
        .count();
    if after > 0 {
        r.fail(format!(
            "{after} errors more than 1 s after the fault ended"
        ));
    }
}

/// Scenario 8, the api part: SIGTERM to one replica under load, with 30 ms of database
/// latency so that requests are in flight when it comes. Every request sent before the
/// signal is answered 200; after it the replica only refuses connections (or answers); it
/// exits 0 (its shutdown report) within its `SHUTDOWN_TIMEOUT_MS`; then it is started again.
fn api_sigterm(system: &mut System, rt: &Runtime) -> Result<ScenarioResult> {
    let mut r = ScenarioResult::new(8, "SIGTERM api under load");
    system.pg_proxy.set_fault(Fault::Latency(30));
    let load = load(system, 40, Duration::from_secs(5));
    let start = load.epoch;
    let handle = rt.spawn(load.run());
    at(start, Duration::from_secs(2));
    let pid = system.apis[1].child.id();
    let signalled = start.elapsed();
    smartbeak_test_support::signal(pid, "TERM")?;
    let exited = time_until(Duration::from_secs(10), || {
        matches!(system.apis[1].child.try_wait(), Ok(Some(_)))
    });
    let report = rt.block_on(handle)?;
    system.pg_proxy.set_fault(Fault::Pass);
    tally(&mut r, &report);
    let failed_in_flight: Vec<String> = report
        .outcomes
        .iter()
        .filter(|o| o.sent < signalled && o.kind != Kind::Ok)
        .map(|o| {
            format!(
                "{} sent {:?} before the signal, after {:?}",
                o.kind.label(),
                signalled - o.sent,
                o.latency
            )
        })
        .collect();
    if !failed_in_flight.is_empty() {
        r.fail(format!(
            "{} requests sent before the SIGTERM failed ({})",
            failed_in_flight.len(),
            failed_in_flight.join(", ")
        ));
    }
    let odd = report
        .outcomes
        .iter()
        .filter(|o| o.sent >= signalled && !matches!(o.kind, Kind::Ok | Kind::Transport))
        .count();
    if odd > 0 {
        r.fail(format!(
            "{odd} answers after the SIGTERM other than 200 or a refused connection"
        ));
    }
    match exited {
        None => r.fail("the api did not exit within 10 s of SIGTERM"),
        Some(d) => {
            r.recovery = Some(d);
            let status = system.apis[1].child.try_wait()?;
            if status.and_then(|s| s.code()) != Some(0) {
                r.fail(format!("the api exited with {status:?}, not 0"));
            }
        }
    }
    system.restart_api(1)?;
    Ok(r)
}
