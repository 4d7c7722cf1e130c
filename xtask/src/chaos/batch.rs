//! The background processes' parts of the scenarios: the export worker SIGTERMed under load
//! and the control-plane SIGTERMed mid-run (scenario 8), the control-plane SIGKILLed
//! mid-run (scenario 9), and the keyword provider outage with the breaker registry's
//! memory (scenario 6). Each adds its counts, notes and failures to the scenario's result;
//! the control-plane's run records (`batch_runs`, `batch_run_items`) and its `/metrics` are
//! read from outside.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use smartbeak_test_support::Fault;

use super::provider::{Adapter, Mode};
use super::scenarios::time_until;
use super::{CP_BREAKER_OPEN, CP_SHUTDOWN_TIMEOUT, CP_STALE_AFTER, ScenarioResult, System};
use crate::services::psql_read;

/// Keyword sources of the SIGTERM and SIGKILL parts: this many domains, a `gsc` and an
/// `ahrefs` source each; a run is caught with [`CAUGHT`] of its items held.
const RUN_DOMAINS: usize = 16;

/// Provider requests held by the gate ([`Mode::Held`]) when a run counts as caught
/// mid-way: `CP_CONCURRENCY`, every item slot busy, most items not started.
const CAUGHT: u64 = 4;

/// How long after the signal the gate opens: the control-plane has had the signal (it
/// starts no new item), and the held requests are answered well inside the control-plane's
/// 1 s attempt timeout.
const GATE_OPENS_AFTER: Duration = Duration::from_millis(200);

/// Exports queued for the worker SIGTERM part.
const EXPORTS: usize = 6;

/// Latency on the database proxy from the queueing on, kept through the SIGTERM and the
/// releases (the worker's drain holds a release's whole client bound).
const WORKER_LATENCY_MS: u64 = 150;

/// How often the parts poll the database (one `psql` each time): rarely enough that the
/// polling is no load on the cores the measured bounds depend on.
const POLL: Duration = Duration::from_millis(150);

/// Like [`time_until`], polling every [`POLL`] (for conditions that start a `psql`).
pub(super) fn poll_until(bound: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= bound {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// The `exit_code` of the last shutdown report line in `log` (`smartbeak_shutdown::report`
/// logs `shutdown complete ... exit_code=N` at info, failures at error).
pub(super) fn report_code(log: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("smartbeak_shutdown::report") && l.contains("exit_code="))?;
    let rest = &line[line.find("exit_code=")? + "exit_code=".len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Fails `r` unless `name` exited within its bound, with code 0, and that is the code its
/// shutdown report logged (`report`).
pub(super) fn judge_exit(
    r: &mut ScenarioResult,
    name: &str,
    exited: Option<Duration>,
    status: Option<std::process::ExitStatus>,
    report: Option<i32>,
) {
    let code = status.and_then(|s| s.code());
    match exited {
        None => r.fail(format!(
            "{name} did not exit within its bound after SIGTERM"
        )),
        Some(_) if code != report => r.fail(format!(
            "{name} exited with {code:?} but its shutdown report says {report:?}"
        )),
        Some(_) if code != Some(0) => r.fail(format!(
            "{name} exited with {code:?} (its shutdown report's code), not 0"
        )),
        Some(_) => {}
    }
}

fn read(system: &System, sql: &str) -> Result<String> {
    psql_read(&system.db_url, sql).map(|s| s.trim().to_owned())
}

/// The index of the process named `<prefix><n>` among `procs` whose id (`EXPORT_WORKER_ID`,
/// `CP_RUNNER`) is `<id_prefix><n>`.
fn by_id(procs: &[super::Proc], prefix: &str, id_prefix: &str, id: &str) -> Option<usize> {
    procs.iter().position(|p| {
        p.name
            .strip_prefix(prefix)
            .is_some_and(|n| id == format!("{id_prefix}{n}"))
    })
}

/// Scenario 8, the export worker part: `EXPORTS` exports queued with no fault on the
/// database proxy while a `psql` session of this harness holds `domain_settings` (every
/// export's first statement counts its settings rows, and no enqueue reads them), so they
/// are claimed and wait there; then 150 ms of latency on the proxy and the worker running
/// the most of them SIGTERMed with the latency kept. Its drain (`SHUTDOWN_DRAIN_TIMEOUT_MS`
/// 5750: the least it accepts, a release window plus the client bound, and 500 ms) cancels
/// them and releases them (attempt `released`, the job `queued` again); it exits with its
/// shutdown report's code, 0; then the lock goes and the latency with it. Passes when it
/// exits 0 (its report's code) within 10 s, released at least one export, and every export
/// succeeded exactly once: one `succeeded` attempt, one file, the one its `storage_path`
/// names, `rows_written` = `record_count`, `attempts` = its attempts not released (a
/// released attempt is given back), those it released by the other worker. Queued before
/// the latency: the api's enqueue at 150 ms a round trip could end in a spurious 504; held
/// by the lock: without it the exports could finish before the drain's cancel.
pub(super) fn worker_sigterm(system: &mut System, r: &mut ScenarioResult) -> Result<()> {
    let part = Instant::now();
    super::ingest_keywords(system.apis[0].port, &system.key, &system.domain)?;
    let mut hold = TableLock::take(system, "domain_settings")?;
    // Queued at once (each request takes a few round trips), with no fault on the proxy.
    let (port, key, domain) = (system.apis[0].port, &system.key, &system.domain);
    let queued: Vec<Result<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..EXPORTS)
            .map(|_| s.spawn(move || super::create_export(port, key, domain)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("queueing thread panicked")))
            })
            .collect()
    });
    let ids = queued.into_iter().collect::<Result<Vec<_>>>()?;
    system.pg_proxy.set_fault(Fault::Latency(WORKER_LATENCY_MS));
    r.requests += ids.len();
    let list = ids
        .iter()
        .map(|id| format!("'{id}'"))
        .collect::<Vec<_>>()
        .join(",");
    // The worker running the most of them: once it runs two (or, after 5 s, one).
    let mut owner = String::new();
    let mut running_then = 0;
    let mut busiest = |at_least: u32| {
        let row = read(
            system,
            &format!(
                "SELECT coalesce((SELECT lease_owner || ' ' || count(*) FROM domain_exports \
                 WHERE id IN ({list}) AND status = 'running' GROUP BY lease_owner \
                 ORDER BY count(*) DESC LIMIT 1), '')"
            ),
        )
        .unwrap_or_default();
        let (who, n) = row.split_once(' ').unwrap_or(("", "0"));
        owner = who.to_owned();
        running_then = n.parse::<u32>().unwrap_or(0);
        running_then >= at_least
    };
    let running = poll_until(Duration::from_secs(5), || busiest(2))
        .or_else(|| poll_until(Duration::from_secs(15), || busiest(1)));
    let victim = by_id(&system.workers, "export-worker-", "chaos-worker-", &owner);
    let (Some(_), Some(victim)) = (running, victim) else {
        system.pg_proxy.set_fault(Fault::Pass);
        bail!("no export of the {EXPORTS} was seen running under a known worker ({owner:?})");
    };
    // From the signal on, an error is recorded and the worker restarted whatever happens.
    let signalled = Instant::now();
    let sent = smartbeak_test_support::signal(system.workers[victim].child.id(), "TERM");
    let exited = match sent {
        Ok(()) => time_until(Duration::from_secs(10), || {
            matches!(system.workers[victim].child.try_wait(), Ok(Some(_)))
        }),
        Err(e) => {
            r.fail(format!("SIGTERM to {owner}: {e:#}"));
            None
        }
    };
    let exit_took = exited;
    system.pg_proxy.set_fault(Fault::Pass);
    if let Err(e) = hold.release() {
        r.fail(format!("the psql session holding domain_settings: {e:#}"));
    }
    let status = system.workers[victim].child.try_wait().ok().flatten();
    let done = poll_until(Duration::from_secs(30), || {
        read(
            system,
            &format!(
                "SELECT count(*) FROM domain_exports WHERE id IN ({list}) \
                 AND status IN ('succeeded', 'failed', 'cancelled')"
            ),
        )
        .is_ok_and(|n| n == EXPORTS.to_string())
    });
    let all_done = done.map(|_| signalled.elapsed());
    if exited.is_none() {
        // Not restarted over a live process: the kill on drop ends it.
        let _ = system.workers[victim].child.kill();
        let _ = system.workers[victim].child.wait();
    }
    let report = report_code(&system.workers[victim].log);
    system.restart_worker(victim)?;

    let mut released = 0;
    let mut succeeded_by_other = 0;
    for id in &ids {
        if let Err(e) = check_export(
            system,
            r,
            id,
            &owner,
            &mut released,
            &mut succeeded_by_other,
        ) {
            r.lost += 1;
            r.fail(format!("export {id}: reading its outcome failed: {e:#}"));
        }
    }
    r.note(format!(
        "worker: SIGTERM to {owner} running {running_then} of {EXPORTS} exports (held by a lock, \
         150 ms latency kept), exit {} {} after the signal (report {report:?}), released {released}, \
         finished by the other worker {succeeded_by_other}, all done {:.2}s after the \
         signal, part {:.1}s",
        status.map_or_else(|| "none".to_owned(), |s| s.to_string()),
        exit_took.map_or_else(|| "-".to_owned(), |d| format!("{:.2}s", d.as_secs_f64())),
        all_done.map_or(f64::NAN, |d| d.as_secs_f64()),
        part.elapsed().as_secs_f64()
    ));
    judge_exit(r, &owner, exited, status, report);
    if released == 0 {
        r.fail(format!(
            "{owner} released no export: the SIGTERM caught no running job, or it did not re-queue it"
        ));
    }
    Ok(())
}

/// A table held (`ACCESS EXCLUSIVE`) by a `psql` session of this harness until
/// [`TableLock::release`] or drop (the session's end rolls it back).
pub(super) struct TableLock {
    session: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
}

impl TableLock {
    /// Takes the lock on `table` and waits (bounded) until it is granted.
    fn take(system: &System, table: &str) -> Result<Self> {
        let (lock, granted) = Self::request(system, table)?;
        if granted.is_none() {
            bail!("the lock on {table} was not granted within 5 s");
        }
        Ok(lock)
    }

    /// Sends the lock on `table` and waits at most 5 s until it is granted: the session, and
    /// how long the grant took (`None`: not within 5 s; the session still holds the request).
    pub(super) fn request(system: &System, table: &str) -> Result<(Self, Option<Duration>)> {
        use std::io::Write as _;
        let mut session = crate::services::psql_session(&system.db_url)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the psql session that holds the lock")?;
        let stdin = session.stdin.take();
        let mut lock = Self { session, stdin };
        let input = lock
            .stdin
            .as_mut()
            .context("the psql session has no stdin")?;
        input.write_all(
            format!("BEGIN;\nLOCK TABLE {table} IN ACCESS EXCLUSIVE MODE;\n").as_bytes(),
        )?;
        input.flush()?;
        let granted = time_until(Duration::from_secs(5), || {
            read(
                system,
                &format!(
                    "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                     WHERE c.relname = '{table}' AND l.mode = 'AccessExclusiveLock' AND l.granted"
                ),
            )
            .is_ok_and(|n| n == "1")
        });
        Ok((lock, granted))
    }

    /// Rolls the transaction back and ends the session; `Err` (with psql's stderr) when it
    /// failed.
    pub(super) fn release(&mut self) -> Result<()> {
        use std::io::{Read as _, Write as _};
        if let Some(mut stdin) = self.stdin.take() {
            stdin.write_all(b"ROLLBACK;\n")?;
        }
        let status = self.session.wait()?;
        if !status.success() {
            let mut stderr = String::new();
            if let Some(mut pipe) = self.session.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            bail!("psql exited with {status}: {}", stderr.trim());
        }
        Ok(())
    }
}

impl Drop for TableLock {
    fn drop(&mut self) {
        if self.stdin.take().is_some() {
            let _ = self.session.kill();
            let _ = self.session.wait();
        }
    }
}

/// Checks one export of the worker part (see [`worker_sigterm`]); `owner` is the
/// SIGTERMed worker.
fn check_export(
    system: &System,
    r: &mut ScenarioResult,
    id: &str,
    owner: &str,
    released: &mut usize,
    succeeded_by_other: &mut usize,
) -> Result<()> {
    let row = read(
        system,
        &format!(
            "SELECT status || ' ' || rows_written || ' ' || coalesce(record_count::text, '-') \
             || ' ' || coalesce(storage_path, '-') || ' ' || attempts \
             FROM domain_exports WHERE id = '{id}'"
        ),
    )?;
    let fields: Vec<&str> = row.split(' ').collect();
    let attempts = read(
        system,
        &format!(
            "SELECT coalesce(string_agg(worker || ':' || outcome, ',' ORDER BY attempt, id), '') \
             FROM domain_export_attempts WHERE export_id = '{id}'"
        ),
    )?;
    let attempts: Vec<&str> = attempts.split(',').filter(|a| !a.is_empty()).collect();
    let files = export_files(system, id)?;
    let succeeded = attempts
        .iter()
        .filter(|a| a.ends_with(":succeeded"))
        .count();
    let was_released = attempts.contains(&format!("{owner}:released").as_str());
    *released += usize::from(was_released);
    r.duplicated += succeeded.saturating_sub(1) + files.len().saturating_sub(1);
    if fields.first() != Some(&"succeeded") || succeeded == 0 {
        r.lost += 1;
        r.fail(format!(
            "export {id} did not succeed within 30 s of the SIGTERM ({row}; attempts {attempts:?})"
        ));
        return Ok(());
    }
    if succeeded != 1 {
        r.fail(format!(
            "export {id}: {succeeded} attempts succeeded, not exactly one ({attempts:?})"
        ));
    }
    if files.len() != 1 || fields.get(3) != files.first().map(String::as_str).as_ref() {
        r.fail(format!(
            "export {id}: files in EXPORT_DIR {files:?}, storage_path {:?}",
            fields.get(3)
        ));
    }
    if fields.get(1) != fields.get(2) || fields.get(1) == Some(&"0") {
        r.fail(format!(
            "export {id}: rows written {:?}, record count {:?}",
            fields.get(1),
            fields.get(2)
        ));
    }
    let kept = attempts
        .iter()
        .filter(|a| !a.ends_with(":released"))
        .count();
    if fields.get(4) != Some(&kept.to_string().as_str()) {
        r.fail(format!(
            "export {id}: attempts {:?}, but {kept} attempts were not released ({attempts:?})",
            fields.get(4)
        ));
    }
    if was_released {
        if attempts.contains(&format!("{owner}:succeeded").as_str()) {
            r.fail(format!(
                "export {id} was released by {owner} and still succeeded there ({attempts:?})"
            ));
        } else {
            *succeeded_by_other += 1;
        }
    }
    Ok(())
}

/// The keyword-sync run in progress with items loaded: its id and runner.
/// After a control-plane part, whatever happened: the gate open, no keyword sources, and
/// control-plane `victim` running again (a fresh process).
fn restore_cp(system: &mut System, victim: usize) -> Result<()> {
    system.provider.set_all(Mode::Ok);
    if matches!(system.cps[victim].child.try_wait(), Ok(None)) {
        let _ = system.cps[victim].child.kill();
        let _ = system.cps[victim].child.wait();
    }
    let cleared = system.keyword_sources(0);
    system.restart_cp(victim)?;
    cleared
}

/// The names of the files of export `id` in the system's `EXPORT_DIR`.
pub(super) fn export_files(system: &System, id: &str) -> Result<Vec<String>> {
    let prefix = id.replace('-', "");
    Ok(std::fs::read_dir(system.work.join("exports"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&prefix))
        .collect())
}

fn running_run(system: &System) -> Option<(String, String)> {
    let row = read(
        system,
        "SELECT coalesce((SELECT id || ' ' || runner FROM batch_runs \
         WHERE operation = 'keyword-sync' AND status = 'running' AND items_total > 0), '')",
    )
    .ok()?;
    let (id, runner) = row.split_once(' ')?;
    Some((id.to_owned(), runner.to_owned()))
}

/// Catches a keyword-sync run over the [`RUN_DOMAINS`] sources mid-way, whatever the CPU
/// load: the providers hold every answer ([`Mode::Held`]) until [`CAUGHT`] requests are
/// held (at most 15 s), then the run in progress is read. The run, its runner and that
/// control-plane's index; the gate stays closed (the caller opens it after its signal).
fn catch_a_run(system: &mut System) -> Result<(String, String, usize)> {
    system.keyword_sources(RUN_DOMAINS)?;
    system.provider.set_all(Mode::Held);
    let held = time_until(Duration::from_secs(15), || system.provider.held() >= CAUGHT);
    let run = held.and_then(|_| running_run(system));
    let victim = run
        .as_ref()
        .and_then(|(_, runner)| by_id(&system.cps, "control-plane-", "chaos-cp-", runner));
    let (Some((id, runner)), Some(victim)) = (run, victim) else {
        // The next scenarios find the providers answering and no sources.
        let held = system.provider.held();
        system.provider.set_all(Mode::Ok);
        system.keyword_sources(0)?;
        bail!(
            "no keyword-sync run over the sources was caught with {CAUGHT} requests held \
             within 15 s by a control-plane of this system ({held} held)"
        );
    };
    Ok((id, runner, victim))
}

/// The `status total succeeded failed skipped error` of run `id`.
fn run_row(system: &System, id: &str) -> Result<Vec<String>> {
    let row = read(
        system,
        &format!(
            "SELECT status || '|' || items_total || '|' || items_succeeded || '|' || items_failed \
             || '|' || items_skipped || '|' || coalesce(error, '') FROM batch_runs WHERE id = '{id}'"
        ),
    )?;
    Ok(row.split('|').map(str::to_owned).collect())
}

/// The `sources synced-after` counts of `domain_keyword_sources`: all of them, and those
/// synced after `at` (a server timestamp).
fn synced_since(system: &System, at: &str) -> Result<(u64, u64)> {
    let row = read(
        system,
        &format!(
            "SELECT (SELECT count(*) FROM domain_keyword_sources) || ' ' || \
             (SELECT count(*) FROM domain_keyword_sources WHERE last_synced_at > '{at}')"
        ),
    )?;
    let mut n = row.split(' ').map(|n| n.parse::<u64>().unwrap_or(0));
    Ok((n.next().unwrap_or(0), n.next().unwrap_or(0)))
}

/// Scenario 8, the control-plane part: a keyword-sync run over [`RUN_DOMAINS`] sources
/// caught mid-run (the provider gate holding [`CAUGHT`] requests), its control-plane
/// SIGTERMed, the gate opened [`GATE_OPENS_AFTER`] later. Passes when it exits 0 (its
/// shutdown report's code: `run` exits 0 on a clean SIGTERM) within its
/// `SHUTDOWN_TIMEOUT_MS` plus 2 s, the run is recorded `interrupted` with items skipped
/// (never started) and succeeded + failed + skipped = total, and nothing is lost: within
/// 20 s every source is synced after the signal (by the other control-plane's next run;
/// lost: those that are not). The control-plane is started again, whatever failed.
pub(super) fn cp_sigterm(system: &mut System, r: &mut ScenarioResult) -> Result<()> {
    let part = Instant::now();
    let (id, runner, victim) = catch_a_run(system)?;
    let outcome = (|| -> Result<()> {
        let signalled_at = read(system, "SELECT clock_timestamp()");
        let sent = smartbeak_test_support::signal(system.cps[victim].child.id(), "TERM");
        std::thread::sleep(GATE_OPENS_AFTER);
        system.provider.set_all(Mode::Ok);
        sent?;
        let signalled_at = signalled_at?;
        let exited = time_until(CP_SHUTDOWN_TIMEOUT + Duration::from_secs(2), || {
            matches!(system.cps[victim].child.try_wait(), Ok(Some(_)))
        });
        let status = system.cps[victim].child.try_wait().ok().flatten();
        let row = run_row(system, &id)?;
        let mut counts = (0, 0);
        let synced = poll_until(Duration::from_secs(20), || {
            synced_since(system, &signalled_at).is_ok_and(|c| {
                counts = c;
                c.0 > 0 && c.0 == c.1
            })
        });
        let (sources, synced_n) = counts;
        if exited.is_none() {
            let _ = system.cps[victim].child.kill();
            let _ = system.cps[victim].child.wait();
        }
        let report = report_code(&system.cps[victim].log);
        let n = |i: usize| row.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        r.requests += n(1) as usize;
        r.lost += (sources - synced_n.min(sources)) as usize;
        r.note(format!(
            "control-plane: SIGTERM to {runner} with {CAUGHT} requests held, exit {} (report \
             {report:?}) after {:.2}s, run {}: {} of {} items succeeded, {} failed, {} skipped; \
             sources synced after the signal {synced_n} of {sources} ({}), part {:.1}s",
            status.map_or_else(|| "none".to_owned(), |s| s.to_string()),
            exited.map_or(f64::NAN, |d| d.as_secs_f64()),
            row.first().map_or("?", String::as_str),
            n(2),
            n(1),
            n(3),
            n(4),
            synced.map_or_else(
                || "not all within 20 s".to_owned(),
                |d| format!("all {:.2}s after the exit check", d.as_secs_f64())
            ),
            part.elapsed().as_secs_f64()
        ));
        judge_exit(r, &runner, exited, status, report);
        if row.first().map(String::as_str) != Some("interrupted") {
            r.fail(format!(
                "the SIGTERMed run is recorded {:?}, not interrupted ({})",
                row.first(),
                row.join(" ")
            ));
        }
        if n(2) + n(3) + n(4) != n(1) || n(4) == 0 {
            r.fail(format!(
                "the interrupted run's counts do not add up or skip nothing: total {}, \
                 succeeded {}, failed {}, skipped {}",
                n(1),
                n(2),
                n(3),
                n(4)
            ));
        }
        if synced.is_none() {
            r.fail(format!(
                "{} of {sources} sources were not synced within 20 s of the SIGTERM",
                sources - synced_n.min(sources)
            ));
        }
        Ok(())
    })();
    if let Err(e) = outcome {
        r.fail(format!("control-plane SIGTERM part: {e:#}"));
    }
    restore_cp(system, victim)
}

/// Scenario 9, the control-plane part: a keyword-sync run over [`RUN_DOMAINS`] sources
/// caught mid-run (the provider gate holding [`CAUGHT`] requests, opened right after the
/// kill), its control-plane SIGKILLed (its session ends, and with
/// it the advisory lock; its run row stays `running` with a heartbeat that ages). Passes
/// when, within `CP_STALE_AFTER_MS` (3 s) plus 20 s, the other control-plane marks the
/// dead run `abandoned` (its `control_plane_runs_abandoned_total` counts it) and a run of
/// its own started after the kill succeeds over every source; every source is synced after
/// the kill (lost: those that are not) and holds its two keyword rows (a count that
/// cannot double: the natural-key unique index and the upsert make it structural, so it
/// is checked, not counted as duplicated). The killed control-plane is started again,
/// whatever failed.
pub(super) fn cp_sigkill(system: &mut System, r: &mut ScenarioResult) -> Result<()> {
    let part = Instant::now();
    let (id, runner, victim) = catch_a_run(system)?;
    let outcome = (|| -> Result<()> {
        let other = 1 - victim;
        let other_runner = format!(
            "chaos-cp-{}",
            system.cps[other]
                .name
                .strip_prefix("control-plane-")
                .unwrap_or("?")
        );
        let abandoned_before = super::metric(
            system.cps[other].port,
            "control_plane_runs_abandoned_total",
            "keyword-sync",
        )?;
        let killed_at = read(system, "SELECT clock_timestamp()")?;
        let killed = Instant::now();
        let sent = smartbeak_test_support::signal(system.cps[victim].child.id(), "KILL");
        // The provider answers at once from now on: the takeover's run is quick.
        system.provider.set_all(Mode::Ok);
        sent?;
        let _ = system.cps[victim].child.wait();
        let mut taken_over = None;
        let mut takeover_run = String::new();
        let settled = poll_until(CP_STALE_AFTER + Duration::from_secs(20), || {
            let abandoned = read(
                system,
                &format!("SELECT status FROM batch_runs WHERE id = '{id}'"),
            )
            .is_ok_and(|s| s == "abandoned");
            takeover_run = read(
                system,
                &format!(
                    "SELECT coalesce((SELECT id || ' ' || status FROM batch_runs \
                     WHERE operation = 'keyword-sync' AND runner = '{other_runner}' \
                     AND started_at > '{killed_at}' AND items_total > 0 \
                     ORDER BY started_at LIMIT 1), '')"
                ),
            )
            .unwrap_or_default();
            if abandoned && takeover_run.ends_with(" running") && taken_over.is_none() {
                taken_over = Some(killed.elapsed());
            }
            abandoned && takeover_run.ends_with(" succeeded")
        });
        taken_over = taken_over.or(settled);
        let row = run_row(system, &id)?;
        let abandoned = super::metric(
            system.cps[other].port,
            "control_plane_runs_abandoned_total",
            "keyword-sync",
        )? - abandoned_before;
        let counts = read(
            system,
            &format!(
                "SELECT (SELECT count(*) FROM domain_keyword_sources) || ' ' || \
                 (SELECT count(*) FROM domain_keyword_sources WHERE last_synced_at > '{killed_at}') || ' ' || \
                 (SELECT count(*) FROM keyword_metrics m JOIN domain_keyword_sources s \
                  ON s.domain_id = m.domain_id AND s.adapter = m.source)"
            ),
        )?;
        let counts: Vec<u64> = counts.split(' ').map(|n| n.parse().unwrap_or(0)).collect();
        let (sources, synced, rows) = (
            counts.first().copied().unwrap_or(0),
            counts.get(1).copied().unwrap_or(0),
            counts.get(2).copied().unwrap_or(0),
        );
        r.requests += sources as usize;
        r.lost += (sources - synced.min(sources)) as usize;
        r.recovery = r.recovery.max(taken_over);
        r.note(format!(
            "control-plane: SIGKILL to {runner} mid-run; its run {}; taken over by {other_runner} \
             after {:.2}s (run {takeover_run}); abandoned runs counted by {other_runner}: {abandoned}; \
             sources synced after the kill {synced} of {sources}, keyword rows {rows}, part {:.1}s",
            row.first().map_or("?", String::as_str),
            taken_over.map_or(f64::NAN, |d| d.as_secs_f64()),
            part.elapsed().as_secs_f64()
        ));
        if row.first().map(String::as_str) != Some("abandoned") {
            r.fail(format!(
                "the killed control-plane's run is {:?}, not abandoned",
                row.first()
            ));
        }
        if settled.is_none() {
            r.fail(format!(
                "{other_runner} did not take the operation over and succeed within {:?} of the kill \
                 ({takeover_run:?})",
                CP_STALE_AFTER + Duration::from_secs(20)
            ));
        }
        if abandoned < 1.0 {
            r.fail(format!(
                "{other_runner}'s control_plane_runs_abandoned_total did not count the dead run"
            ));
        }
        if synced != sources {
            r.fail(format!(
                "{} of {sources} sources were not synced after the kill",
                sources - synced.min(sources)
            ));
        }
        if rows != 2 * sources {
            r.fail(format!(
                "{rows} keyword rows for {sources} sources of 2 rows each"
            ));
        }
        Ok(())
    })();
    if let Err(e) = outcome {
        r.fail(format!("control-plane SIGKILL part: {e:#}"));
    }
    restore_cp(system, victim)
}

/// Samples of a provider's breaker state on one control-plane (0 closed, 1 open, 2
/// half-open), with when they were taken.
#[derive(Debug, Default)]
struct BreakerWatch {
    samples: Vec<(Duration, [f64; 2])>,
}

impl BreakerWatch {
    fn max(&self, adapter: Adapter, from: Duration, to: Duration) -> f64 {
        let i = usize::from(adapter == Adapter::Ahrefs);
        self.samples
            .iter()
            .filter(|(at, _)| *at >= from && *at < to)
            .map(|(_, s)| s[i])
            .fold(0.0, f64::max)
    }

    fn first_open(&self, adapter: Adapter, from: Duration) -> Option<Duration> {
        let i = usize::from(adapter == Adapter::Ahrefs);
        self.samples
            .iter()
            .find(|(at, s)| *at >= from && s[i] == 1.0)
            .map(|(at, _)| *at - from)
    }
}

fn breaker_states(port: u16) -> Result<[f64; 2]> {
    Ok([
        super::metric(port, "circuit_breaker_state", "adapter=\"gsc\"")?,
        super::metric(port, "circuit_breaker_state", "adapter=\"ahrefs\"")?,
    ])
}

/// Scenario 6: an outage of the `gsc` keyword provider while keyword-sync runs every
/// second over 5 domains with a `gsc` and an `ahrefs` source each: `gsc` answers 503 for
/// `fail`, then stalls mid-body for `stall`, then answers again. Control-plane 1 is stopped
/// for the scenario (SIGTERM; started again after), so control-plane 0 runs every run and
/// its breakers are the ones read (`circuit_breaker_state` of its `/metrics`, every
/// 100 ms). Passes when the `gsc` breaker opens during the outage (seen open, and its
/// `circuit_breaker_transitions_total` to `open` and back to `closed` moved), `gsc` items
/// then fail fast (`circuit breaker for gsc is open` in `batch_run_items`), the provider
/// served stalled bodies and at least one `gsc` item failed on the attempt timeout (none on
/// the provider deadline), the `ahrefs` breaker made no transition, no `ahrefs` item fails
/// and every `ahrefs` source is synced during the outage, and after the provider is back
/// the `gsc` breaker is closed again and a run succeeds over every source within the
/// outage's length plus 10 s, at least 20 s (the recovery: the open time doubles on each
/// trip without a recovery). Control-plane 1 is started again whatever failed. Then the
/// breaker registry's
/// memory: [`registry_memory`].
pub(super) fn provider_outage(
    system: &mut System,
    r: &mut ScenarioResult,
    fail: Duration,
    stall: Duration,
) -> Result<()> {
    const DOMAINS: usize = 5;
    let stopped = smartbeak_test_support::signal(system.cps[1].child.id(), "TERM").map(|()| {
        time_until(CP_SHUTDOWN_TIMEOUT + Duration::from_secs(2), || {
            matches!(system.cps[1].child.try_wait(), Ok(Some(_)))
        })
    });
    let result = match stopped {
        Ok(Some(_)) => {
            system.provider.set_all(Mode::Ok);
            system
                .keyword_sources(DOMAINS)
                .and_then(|()| outage(system, r, DOMAINS, fail, stall))
        }
        Ok(None) => Err(anyhow::anyhow!(
            "control-plane 1 did not stop within its shutdown timeout"
        )),
        Err(e) => Err(anyhow::Error::from(e)),
    };
    // Whatever happened: the provider answering, no sources, control-plane 1 running.
    if let Err(e) = result {
        r.fail(format!("provider outage part: {e:#}"));
    }
    if matches!(system.cps[1].child.try_wait(), Ok(None)) {
        let _ = system.cps[1].child.kill();
        let _ = system.cps[1].child.wait();
    }
    system.provider.set_all(Mode::Ok);
    let cleared = system.keyword_sources(0);
    system.restart_cp(1)?;
    cleared
}

/// `circuit_breaker_transitions_total` of `adapter` on the control-plane at `port`, to
/// `to` (`open`, `half_open`, `closed`) or, with `None`, to any state. A series not there
/// yet reads 0 (no transition).
fn transitions(port: u16, adapter: Adapter, to: Option<&str>) -> Result<f64> {
    let metrics = super::raw_request(
        port,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )?;
    let adapter = format!("adapter=\"{}\"", adapter.as_str());
    let to = to.map(|to| format!("to=\"{to}\""));
    Ok(metrics
        .lines()
        .filter(|l| {
            l.strip_prefix("circuit_breaker_transitions_total")
                .is_some_and(|rest| rest.starts_with('{'))
                && l.contains(&adapter)
                && to.as_ref().is_none_or(|to| l.contains(to.as_str()))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

fn outage(
    system: &mut System,
    r: &mut ScenarioResult,
    domains: usize,
    fail: Duration,
    stall: Duration,
) -> Result<()> {
    let items = 2 * domains;
    let port = system.cps[0].port;
    let succeeded_run_since = |system: &System, since: &str| -> bool {
        read(
            system,
            &format!(
                "SELECT count(*) FROM batch_runs WHERE operation = 'keyword-sync' \
                 AND status = 'succeeded' AND items_succeeded = {items} AND started_at > '{since}'"
            ),
        )
        .is_ok_and(|n| n != "0")
    };
    // A healthy start: a full successful run over the sources.
    let start_ts = read(system, "SELECT clock_timestamp()")?;
    if time_until(Duration::from_secs(15), || {
        succeeded_run_since(system, &start_ts)
    })
    .is_none()
    {
        bail!(
            "no keyword-sync run over the {items} sources succeeded within 15 s before the fault"
        );
    }
    let before = breaker_states(port)?;
    if before != [0.0, 0.0] {
        bail!("the breakers are not closed before the fault: {before:?}");
    }
    let ahrefs_before = transitions(port, Adapter::Ahrefs, None)?;
    let gsc_open_before = transitions(port, Adapter::Gsc, Some("open"))?;
    let gsc_closed_before = transitions(port, Adapter::Gsc, Some("closed"))?;
    let served_before = [
        system.provider.served(Adapter::Gsc),
        system.provider.served(Adapter::Ahrefs),
    ];
    let fault_ts = read(system, "SELECT clock_timestamp()")?;
    let start = Instant::now();
    let mut watch = BreakerWatch::default();
    let sample = |watch: &mut BreakerWatch| {
        if let Ok(states) = breaker_states(port) {
            watch.samples.push((start.elapsed(), states));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    system.provider.set(Adapter::Gsc, Mode::Failing);
    while start.elapsed() < fail {
        sample(&mut watch);
    }
    system.provider.set(Adapter::Gsc, Mode::StallBody);
    while start.elapsed() < fail + stall {
        sample(&mut watch);
    }
    let ok_ts = read(system, "SELECT clock_timestamp()")?;
    // Read now: the runs after the restore set `last_synced_at` again.
    let ahrefs_synced = read(
        system,
        &format!(
            "SELECT count(*) FROM domain_keyword_sources WHERE adapter = 'ahrefs' \
             AND last_synced_at > '{fault_ts}'"
        ),
    )?;
    let restored = start.elapsed();
    system.provider.set(Adapter::Gsc, Mode::Ok);
    // Recovered: the breaker closed and a run started after the restore succeeded in full.
    // Each trip without a recovery doubles the open time (from 1 s), so the last one of an
    // outage may keep it open for about as long as the outage lasted.
    let bound = (fail + stall + Duration::from_secs(10)).max(Duration::from_secs(20));
    let mut closed_at = None;
    while start.elapsed() < restored + bound {
        sample(&mut watch);
        if let Some((at, s)) = watch.samples.last()
            && closed_at.is_none()
            && s[0] == 0.0
            && *at > restored
            && watch.max(Adapter::Gsc, restored, *at) > 0.0
        {
            closed_at = Some(*at - restored);
        }
        if closed_at.is_some() && succeeded_run_since(system, &ok_ts) {
            break;
        }
    }
    let recovered = succeeded_run_since(system, &ok_ts).then(|| start.elapsed() - restored);
    let after = breaker_states(port)?;
    let ahrefs_moved = transitions(port, Adapter::Ahrefs, None)? - ahrefs_before;
    let gsc_opened = transitions(port, Adapter::Gsc, Some("open"))? - gsc_open_before;
    let gsc_closed = transitions(port, Adapter::Gsc, Some("closed"))? - gsc_closed_before;
    let longest_run = read(
        system,
        &format!(
            "SELECT coalesce(round(max(extract(epoch FROM finished_at - started_at))::numeric, 2)::text, '-') \
             FROM batch_runs WHERE operation = 'keyword-sync' AND started_at > '{fault_ts}'"
        ),
    )?;
    let served = [
        system.provider.served(Adapter::Gsc).since(served_before[0]),
        system
            .provider
            .served(Adapter::Ahrefs)
            .since(served_before[1]),
    ];
    let failures = read(
        system,
        &format!(
            "SELECT coalesce(string_agg(k || '=' || n, ','), '') FROM (SELECT \
             split_part(i.item_id, '/', 2) || CASE \
             WHEN i.error LIKE '%circuit breaker for gsc is open%' THEN ' fast' \
             WHEN i.error LIKE '%timed out (attempt timeout%' THEN ' attempt-timeout' \
             WHEN i.error LIKE '%timed out (total deadline%' THEN ' deadline' \
             ELSE '' END AS k, count(*) AS n FROM batch_run_items i \
             JOIN batch_runs b ON b.id = i.run_id WHERE b.operation = 'keyword-sync' \
             AND b.started_at > '{fault_ts}' GROUP BY 1) t"
        ),
    )?;
    let failures: BTreeMap<String, u64> = failures
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap_or(0)))
        .collect();
    let runs = read(
        system,
        &format!(
            "SELECT count(*) FROM batch_runs WHERE operation = 'keyword-sync' AND started_at > '{fault_ts}'"
        ),
    )?;
    r.requests += served.iter().map(|s| s.total() as usize).sum::<usize>();
    for (kind, n) in &failures {
        *r.errors.entry(format!("item {kind}")).or_default() += *n as usize;
    }
    r.recovery = recovered;
    let opened = watch.first_open(Adapter::Gsc, Duration::ZERO);
    r.note(format!(
        "{runs} runs (longest {longest_run}s); gsc served {} ok, {} 503, {} stalled; ahrefs \
         served {} ok; gsc breaker open {:.2}s after the fault, closed {:.2}s after the restore \
         (breaker open time {} ms; transitions to open {gsc_opened}, to closed {gsc_closed}); \
         ahrefs breaker transitions {ahrefs_moved}; ahrefs sources synced during the outage \
         {ahrefs_synced} of {domains}",
        served[0].ok,
        served[0].failed,
        served[0].stalled,
        served[1].ok,
        opened.map_or(f64::NAN, |d| d.as_secs_f64()),
        closed_at.map_or(f64::NAN, |d| d.as_secs_f64()),
        CP_BREAKER_OPEN.as_millis(),
    ));
    if opened.is_none() || watch.max(Adapter::Gsc, Duration::ZERO, restored) < 1.0 {
        r.fail("the gsc breaker was never seen open during the outage");
    }
    if failures.get("gsc fast").copied().unwrap_or(0) == 0 {
        r.fail("no gsc item failed fast on the open breaker (batch_run_items)");
    }
    if ahrefs_moved != 0.0 || after[1] != 0.0 {
        r.fail(format!(
            "the ahrefs breaker left closed during the gsc outage ({ahrefs_moved} transitions)"
        ));
    }
    if gsc_opened < 1.0 || gsc_closed < 1.0 {
        r.fail(format!(
            "the gsc breaker's transitions: {gsc_opened} to open, {gsc_closed} to closed (each must be at least 1)"
        ));
    }
    if served[0].refused + served[1].refused > 0 {
        r.fail(format!(
            "the providers refused {} requests for a wrong or missing key",
            served[0].refused + served[1].refused
        ));
    }
    if served[0].stalled == 0 {
        r.fail("the gsc provider stalled no body: the stall phase did not reach the control-plane");
    }
    // A stalled body ends on the per-attempt timeout (1 s, 2 attempts), well inside the
    // provider deadline (3 s here): an item cut by the deadline waited the stall out.
    if failures.get("gsc attempt-timeout").copied().unwrap_or(0) == 0 {
        r.fail("no gsc item failed on the attempt timeout (a stalled body) during the outage");
    }
    if let Some(n) = failures.get("gsc deadline") {
        r.fail(format!(
            "{n} gsc items ran to the provider deadline instead of the attempt timeout"
        ));
    }
    let ahrefs_failed: u64 = failures
        .iter()
        .filter(|(k, _)| k.starts_with("ahrefs"))
        .map(|(_, n)| n)
        .sum();
    if ahrefs_failed > 0 {
        r.fail(format!(
            "{ahrefs_failed} ahrefs items failed during the gsc outage"
        ));
    }
    if ahrefs_synced != domains.to_string() {
        r.fail(format!(
            "only {ahrefs_synced} of {domains} ahrefs sources were synced during the gsc outage"
        ));
    }
    if served[0].failed == 0 {
        r.fail("the gsc provider answered no 503: the fault did not reach the control-plane");
    }
    if after[0] != 0.0 || closed_at.is_none() {
        r.fail(format!(
            "the gsc breaker is not closed {bound:?} after the provider came back (state {})",
            after[0]
        ));
    }
    if recovered.is_none() {
        r.fail(format!(
            "no run over every source succeeded within {bound:?} after the provider came back"
        ));
    }
    Ok(())
}

/// Scenario 6, the registry's memory: the resilience crate's `registry_memory` example (the
/// real `AdapterName::parse` and `BreakerRegistry::get`, in a process of its own) fed
/// 1,000,000 distinct unknown adapter names. No binary of the system takes an adapter name
/// from outside (keyword sources are `gsc` or `ahrefs` by a CHECK, and the control-plane
/// refuses any other adapter before the registry), so this is the closest to outside: its
/// resident set is sampled here from `/proc/<pid>/status` every 5 ms (after its `exec`),
/// besides its own before/after figures. Passes when it exits 0 (its own growth under
/// 5 MB), its growth is under 5 MiB by its own figures and from outside (last sample less
/// the first, which comes right after the exec and so may include start-up), and
/// the peak sampled from outside is under 16 MiB (the unbounded map of one breaker per
/// name the original kept takes hundreds).
pub(super) fn registry_memory(system: &System, r: &mut ScenarioResult) -> Result<()> {
    const PEAK_KIB: u64 = 16 << 10;
    const GROWTH_BYTES: u64 = 5 << 20;
    let example = system.bin.join("examples").join("registry_memory");
    if !example.exists() {
        bail!(
            "{} is missing: `cargo build -p smartbeak-resilience --example registry_memory` \
             (`cargo xtask chaos` builds it when scenario 6 runs)",
            example.display()
        );
    }
    let json = system.work.join("registry_memory.json");
    let mut child = Command::new(&example)
        .args(["--mode", "bounded", "--names", "1000000", "--json"])
        .arg(&json)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("running {}", example.display()))?;
    let pid = child.id();
    let mut peak = 0;
    let mut samples = 0;
    // The first and last resident sets sampled after the exec: the growth seen from outside.
    let mut first = None;
    let mut last = 0;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => {
                // Not left running: `Child` does not kill on drop.
                let _ = child.kill();
                let _ = child.wait();
                return Err(e).context("waiting for registry_memory");
            }
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("registry_memory did not finish within 120 s");
        }
        if is_exec_of(pid, "registry_memory")
            && let Ok(kib) = super::scenarios::rss_kib(pid)
        {
            peak = peak.max(kib);
            first.get_or_insert(kib);
            last = kib;
            samples += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let figures = std::fs::read_to_string(&json).unwrap_or_default();
    let field = |name: &str| -> Option<u64> {
        let start = figures.find(&format!("\"{name}\": "))? + name.len() + 4;
        let end = figures[start..].find([',', '}'])? + start;
        figures[start..end].trim().parse().ok()
    };
    let growth = field("growth_bytes");
    let entries = field("entries");
    let outside_growth_kib = first.map(|f| last.saturating_sub(f));
    r.note(format!(
        "registry: 1,000,000 unknown names in {:.2}s, {} registry entries, RSS growth {} (its own \
         statm), {} sampled from outside (last sample less the first; the first comes right after the exec, \
         so it may include start-up), peak {:.2} MiB sampled from \
         outside ({samples} samples)",
        started.elapsed().as_secs_f64(),
        entries.map_or_else(|| "?".to_owned(), |e| e.to_string()),
        growth.map_or_else(
            || "?".to_owned(),
            |g| format!("{:.3} MiB", g as f64 / 1048576.0)
        ),
        outside_growth_kib.map_or_else(
            || "?".to_owned(),
            |g| format!("{:.3} MiB", g as f64 / 1024.0)
        ),
        peak as f64 / 1024.0
    ));
    match outside_growth_kib {
        Some(g) if g < GROWTH_BYTES >> 10 => {}
        other => r.fail(format!(
            "registry_memory's resident set grew {other:?} KiB from its first sample to its last \
             (from outside), not under 5 MiB"
        )),
    }
    if !status.success() {
        r.fail(format!(
            "registry_memory exited {status} (growth at or over 5 MB)"
        ));
    }
    match growth {
        Some(g) if g < GROWTH_BYTES => {}
        other => r.fail(format!(
            "registry memory growth {other:?} bytes, not under 5 MiB"
        )),
    }
    if samples == 0 || peak > PEAK_KIB {
        r.fail(format!(
            "registry_memory's resident set peaked at {peak} KiB ({samples} samples), over {PEAK_KIB} KiB"
        ));
    }
    Ok(())
}

/// Whether process `pid` runs `name` already (its `comm`, which `exec` sets), not the
/// forked copy of this process.
fn is_exec_of(pid: u32, name: &str) -> bool {
    std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("comm"))
        .is_ok_and(|comm| comm.trim() == name)
}
