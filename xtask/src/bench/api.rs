//! The api: `GET /v1/domains/{id}` at 1,000 and 5,000 connections, limiter on and off, an
//! open-loop run, and the `/healthz` and `pgbench` ceilings (the recipe of
//! `apps/api/bench/ab.sh`, without the baseline build). [`Fixture`] (a migrated, seeded
//! database and the release api started on it) is shared with the churn section.

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use smartbeak_database::SecretUrl;

use super::model::{Figure, LatencySeries, Row, Section, Table};
use super::{Ctx, median};
use crate::chaos::load;
use crate::services::{psql, psql_read};

/// The percentiles drawn for each latency series.
const POINTS: [f64; 5] = [50.0, 75.0, 90.0, 99.0, 99.9];

/// The issue's p99 target at 1,000 connections (issue 13), milliseconds.
const P99_TARGET_MS: f64 = 50.0;

/// wrk threads (the machine's two cores).
const THREADS: u32 = 2;

/// pgbench clients for the PostgreSQL ceiling (as `ab.sh`).
const PG_CLIENTS: u32 = 64;

/// The api's connection and concurrency caps in the bench: above 5,000 connections, so the
/// 5,000-connection runs measure the serving path and not the shedder (the defaults are
/// 4,096 and 1,024; at 1,000 connections neither binds).
const API_CAP: &str = "8192";

/// The wrk script: the key from `$BENCH_KEY` (never in argv), and a `done` hook printing the
/// counts and the percentiles (microseconds) in lines [`parse_wrk`] reads.
const WRK_LUA: &str = r#"-- written by `cargo xtask bench` (api section)
local key = os.getenv("BENCH_KEY")
if key ~= nil and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("bench: requests=%.0f duration_us=%.0f connect=%.0f read=%.0f write=%.0f status=%.0f timeout=%.0f\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
  io.write(string.format("bench: p50=%.0f p75=%.0f p90=%.0f p99=%.0f p999=%.0f max=%.0f\n",
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max))
end
"#;

pub(crate) fn api(ctx: &Ctx<'_>) -> Result<Section> {
    let mut section = Section::new("api", "Api: GET /v1/domains/{id}");
    let rounds = if ctx.quick { 1 } else { 3 };
    let secs = if ctx.quick { 3 } else { 15 };
    let warm = if ctx.quick { 1 } else { 2 };
    // Raised to the hard limit here; the api and wrk inherit it. 5,000 connections need
    // room for both ends of each socket in wrk and the api (separate processes: 5,000 each)
    // and some more; without it the section still measures 1,000 and says why not 5,000.
    let nofile = crate::limits::require_open_files(1500, "the api section (1,000 connections)")?;
    let mut conns = vec![1000u32];
    if nofile >= 5500 {
        conns.push(5000);
    } else {
        section.notes.push(format!(
            "NOT MEASURED: 5,000 connections need an open-files limit of at least 5,500; this \
             machine's hard limit allows {nofile} (raise it with `ulimit -Hn` as root)."
        ));
    }
    let driver = Driver::find(&mut section.notes);
    let fx = Fixture::create(ctx, "bench_api")?;
    let script = ctx.out.join("api-wrk.lua");
    std::fs::write(&script, WRK_LUA).with_context(|| format!("writing {}", script.display()))?;
    let sql = ctx.out.join("api-pgbench.sql");
    std::fs::write(&sql, fx.lookup_sql()).with_context(|| format!("writing {}", sql.display()))?;

    let domain_path = format!("/v1/domains/{}", fx.domain);
    // The commands as run (wrk, pgbench, the api), recorded as they start; the section
    // lists them once each at the end.
    let ran_before = ctx.ran.borrow().len();
    if let Driver::Generator = driver {
        section.commands.push(format!(
            "(closed loop of xtask's load generator: c in {conns:?}, {secs}s) GET {domain_path}"
        ));
    }
    section.notes.push(format!(
        "The api and wrk run with RLIMIT_NOFILE {nofile} (xtask's soft limit, raised to the hard \
         limit; children inherit it)."
    ));

    let mut runs: Vec<Run> = Vec::new();
    let mut pg_runs: Vec<PgRun> = Vec::new();
    for round in 1..=rounds {
        if crate::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
            bail!("interrupted");
        }
        // Interleaved: on first in odd rounds, off first in even ones.
        let order = if round % 2 == 1 {
            [true, false]
        } else {
            [false, true]
        };
        for limiter in order {
            let name = format!("api-r{round}-{}", on_off(limiter));
            let api = fx.start_api(ctx, &name, limiter)?;
            let url = format!("http://127.0.0.1:{}{domain_path}", api.port);
            fx.check_get(&url)?;
            let _ = driver.run(ctx, &script, 1000, warm, &url, Some(&fx.key), "warm-up");
            for &c in &conns {
                let label = format!("r{round}-{}-c{c}", on_off(limiter));
                let m = driver.run(ctx, &script, c, secs, &url, Some(&fx.key), &label)?;
                println!("   {}", m.line(&variant(limiter, c)));
                runs.push(Run {
                    round,
                    variant: variant(limiter, c),
                    m,
                });
            }
            if limiter {
                let hz = format!("http://127.0.0.1:{}/healthz", api.port);
                let label = format!("r{round}-healthz-c1000");
                let m = driver.run(ctx, &script, 1000, secs, &hz, None, &label)?;
                println!("   {}", m.line(HEALTHZ));
                runs.push(Run {
                    round,
                    variant: HEALTHZ.to_owned(),
                    m,
                });
            }
            api.stop()?;
        }
        let pg = fx.pgbench(ctx, &sql, secs, round)?;
        println!(
            "   pgbench ceiling: {:.0} tps ({} clients, {} failed)",
            pg.tps, PG_CLIENTS, pg.failed
        );
        pg_runs.push(pg);
    }

    // The medians over the rounds.
    let med = |v: &str| Median::of(runs.iter().filter(|r| r.variant == v).map(|r| &r.m));
    let on1 = med(&variant(true, 1000));
    let off1 = med(&variant(false, 1000));
    let on5 = med(&variant(true, 5000));
    let off5 = med(&variant(false, 5000));
    let hz = med(HEALTHZ);
    let pg_tps = median(&pg_runs.iter().map(|p| p.tps).collect::<Vec<_>>());
    let rps = |m: &Median| Figure::new(m.rps, "req/s");
    let n = |r: u32| {
        if r == 1 {
            "1 round".to_owned()
        } else {
            format!("median of {r} rounds")
        }
    };
    // Issue 13's targets (on / off >= 0.9, p99 <= 50 ms) are judged once, in the api-ab
    // section's A/B: these rows show the same figures without a verdict.
    section.rows.push(
        Row::new(
            "limiter on, 1,000 connections",
            "limiter off, 1,000 connections",
            rps(&on1),
            rps(&off1),
            true,
        )
        .with_errors(on1.errors + off1.errors),
    );
    if conns.contains(&5000) {
        section.rows.push(
            Row::new(
                "limiter on, 5,000 connections",
                "limiter off, 5,000 connections",
                rps(&on5),
                rps(&off5),
                true,
            )
            .with_errors(on5.errors + off5.errors),
        );
    }
    section.rows.push(Row::new(
        "limiter on, 1,000 connections",
        "/healthz ceiling (HTTP stack alone), 1,000 connections",
        rps(&on1),
        rps(&hz),
        true,
    ));
    section.rows.push(Row::new(
        "limiter on, 1,000 connections",
        format!("pgbench ceiling (PostgreSQL alone, same query, {PG_CLIENTS} clients, tps)"),
        rps(&on1),
        Figure::new(pg_tps, "req/s"),
        true,
    ));
    section.rows.push(
        Row::new(
            "p99, limiter on, 1,000 connections",
            "issue 13's bound (50 ms; not a measurement; judged in api-ab)",
            Figure::new(on1.p[3], "ms"),
            Figure::new(P99_TARGET_MS, "ms"),
            false,
        )
        .with_errors(on1.errors),
    );

    let mut per_round = Table {
        caption: format!(
            "Every run ({secs} s each; latencies in ms; errors: wrk's non-2xx answers and socket errors)"
        ),
        header: [
            "round",
            "variant",
            "req/s",
            "p50",
            "p75",
            "p90",
            "p99",
            "p99.9",
            "max",
            "non-2xx",
            "socket errors",
        ]
        .map(str::to_owned)
        .to_vec(),
        rows: Vec::new(),
    };
    for r in &runs {
        let m = &r.m;
        per_round.rows.push(vec![
            r.round.to_string(),
            r.variant.clone(),
            format!("{:.0}", m.rps),
            format!("{:.2}", m.p[0]),
            format!("{:.2}", m.p[1]),
            format!("{:.2}", m.p[2]),
            format!("{:.2}", m.p[3]),
            format!("{:.2}", m.p[4]),
            format!("{:.2}", m.max_ms),
            m.non2xx.to_string(),
            m.socket_errors().to_string(),
        ]);
    }
    for p in &pg_runs {
        per_round.rows.push(vec![
            p.round.to_string(),
            format!("pgbench, {PG_CLIENTS} clients"),
            format!("{:.0}", p.tps),
            format!("{:.2} (mean)", p.latency_ms),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            format!("{} failed", p.failed),
            "-".into(),
        ]);
    }
    let mut medians = Table {
        caption: format!("Medians ({}; latencies in ms; errors summed)", n(rounds)),
        header: [
            "variant", "req/s", "p50", "p75", "p90", "p99", "p99.9", "errors",
        ]
        .map(str::to_owned)
        .to_vec(),
        rows: Vec::new(),
    };
    for (label, m) in [
        (variant(true, 1000), &on1),
        (variant(false, 1000), &off1),
        (variant(true, 5000), &on5),
        (variant(false, 5000), &off5),
        (HEALTHZ.to_owned(), &hz),
    ] {
        if !runs.iter().any(|r| r.variant == label) {
            continue;
        }
        let mut row = vec![label, format!("{:.0}", m.rps)];
        row.extend(m.p.iter().map(|v| format!("{v:.2}")));
        row.push(m.errors.to_string());
        medians.rows.push(row);
    }
    section.tables.push(medians);
    section.tables.push(per_round);
    for (label, m) in [
        ("limiter on, 1,000 connections (wrk)", &on1),
        ("limiter off, 1,000 connections (wrk)", &off1),
        ("/healthz ceiling, 1,000 connections (wrk)", &hz),
    ] {
        section.latency.push(LatencySeries {
            label: label.to_owned(),
            points: POINTS.iter().copied().zip(m.p.iter().copied()).collect(),
        });
    }

    // The open loop: a fixed rate below saturation. It starts at half the limiter-on
    // throughput; when that still queues (the p50 counted from the scheduled send time more
    // than twice the service p50 plus 5 ms, or the generator fell behind its schedule) the
    // rate is halved, at most three times, and the page says which rates queued.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the load generator's runtime")?;
    let duration = Duration::from_secs(secs);
    let mut rate = (on1.rps * 0.5).max(100.0).round() as u32;
    let mut queued_at = Vec::new();
    let open = loop {
        let api = fx.start_api(ctx, &format!("api-open-loop-{rate}"), true)?;
        let url = format!("http://127.0.0.1:{}{domain_path}", api.port);
        section.commands.push(format!(
            "(xtask's open-loop load generator: {rate} req/s for {secs} s, 2 s deadline, limiter \
             on) GET {domain_path}"
        ));
        let report = runtime.block_on(
            load::Load {
                urls: vec![url],
                key: fx.key.clone(),
                rate,
                duration,
                deadline: Duration::from_secs(2),
                epoch: Instant::now(),
            }
            .run(),
        );
        api.stop()?;
        let open = OpenLoop::of(&report, rate, duration);
        println!("   {}", open.line());
        if !open.queues() || queued_at.len() >= 3 || rate <= 100 {
            break open;
        }
        queued_at.push(rate);
        rate = (rate / 2).max(100);
    };
    if !queued_at.is_empty() {
        section.notes.push(format!(
            "The open loop queued at {} req/s (its latency from the schedule far above its \
             service time), so the rate was halved; the figures are at {rate} req/s{}.",
            queued_at
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", then "),
            if open.queues() {
                ", which still queued: this machine was saturated even there"
            } else {
                ""
            }
        ));
    }
    section.latency.push(LatencySeries {
        label: format!("open loop, {rate} req/s, limiter on (from the scheduled send time)"),
        points: POINTS
            .iter()
            .copied()
            .zip(open.from_schedule.iter().copied())
            .collect(),
    });
    section.tables.push(open.table());

    // Notes generated from the figures.
    let errors: u64 = runs.iter().map(|r| r.m.errors()).sum();
    let pg_failed: u64 = pg_runs.iter().map(|p| p.failed).sum();
    section.notes.push(format!(
        "{} of {secs} s per variant, interleaved (limiter on first in odd rounds, off first in \
         even ones), each api process started fresh and warmed for {warm} s with 1,000 \
         connections; the limiter-on runs use limits no run can exhaust (3,600,000 per hour), \
         so every request does the limiter's Redis work and no 429 is deliberate: every non-2xx \
         counts as an error.",
        n(rounds)
    ));
    section.notes.push(if errors == 0 && pg_failed == 0 && open.errors == 0 {
        "Errors: none (wrk's non-2xx and socket errors, pgbench's failed transactions, the open \
         loop's non-2xx, deadlines and transport errors)."
            .to_owned()
    } else {
        format!(
            "ERRORS: {errors} in the wrk runs (non-2xx plus socket errors; see the per-run table), \
             {pg_failed} failed pgbench transactions, {} in the open loop ({}).",
            open.errors, open.error_kinds
        )
    });
    section.notes.push(format!(
        "p99 at 1,000 connections with the limiter on: {:.2} ms (target <= {P99_TARGET_MS} ms: {}).",
        on1.p[3],
        if on1.p[3] <= P99_TARGET_MS {
            "met"
        } else {
            "NOT met"
        }
    ));
    section.notes.push(format!(
        "The open loop sends at a fixed {rate} req/s (below saturation, see above) whatever \
         the answers take; its latencies count from each request's scheduled send time, so a \
         stall shows in them instead of slowing the load (no coordinated omission). The \
         generator runs in the xtask process on the same two cores as the api; it sent {:.0} \
         req/s, and lagged its schedule by {:.2} ms at most.",
        open.achieved, open.max_lag_ms
    ));
    section.notes.push(format!(
        "The api runs with HTTP_MAX_CONNECTIONS and HTTP_MAX_CONCURRENCY raised to {API_CAP} \
         (defaults 4,096 and 1,024), so the 5,000-connection runs measure the serving path and \
         not the shedder; at 1,000 connections neither cap binds."
    ));
    drop(fx);
    section
        .commands
        .extend(ctx.ran.borrow()[ran_before..].iter().cloned());
    Ok(section)
}

const HEALTHZ: &str = "/healthz ceiling, 1,000 connections";

fn on_off(limiter: bool) -> &'static str {
    if limiter { "on" } else { "off" }
}

fn variant(limiter: bool, conns: u32) -> String {
    let c = if conns == 1000 { "1,000" } else { "5,000" };
    format!("limiter {}, {c} connections", on_off(limiter))
}

/// One measured run.
struct Run {
    round: u32,
    variant: String,
    m: Wrk,
}

/// What one wrk run (or the generator's closed loop) measured.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Wrk {
    pub(crate) requests: u64,
    pub(crate) rps: f64,
    /// p50, p75, p90, p99, p99.9 in ms.
    pub(crate) p: [f64; 5],
    pub(crate) max_ms: f64,
    pub(crate) non2xx: u64,
    pub(crate) connect: u64,
    pub(crate) read: u64,
    pub(crate) write: u64,
    pub(crate) timeout: u64,
}

impl Wrk {
    fn socket_errors(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout
    }

    fn errors(&self) -> u64 {
        self.non2xx + self.socket_errors()
    }

    fn line(&self, label: &str) -> String {
        format!(
            "{label:<38} {:>9.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  errors {}",
            self.rps,
            self.p[0],
            self.p[3],
            self.p[4],
            self.errors()
        )
    }
}

/// Reads wrk's output with the `done` lines of [`WRK_LUA`].
pub(crate) fn parse_wrk(out: &str) -> Result<Wrk> {
    let fields = |prefix: &str| -> Option<Vec<(String, f64)>> {
        let line = out
            .lines()
            .find(|l| l.starts_with("bench: ") && l.contains(prefix))?;
        line["bench: ".len()..]
            .split_whitespace()
            .map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect()
    };
    let counts = fields("requests=").context("wrk printed no `bench: requests=` line")?;
    let lat = fields("p50=").context("wrk printed no `bench: p50=` line")?;
    let get = |list: &[(String, f64)], k: &str| -> Result<f64> {
        list.iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| *v)
            .with_context(|| format!("wrk's summary has no {k}"))
    };
    let requests = get(&counts, "requests")?;
    let duration_us = get(&counts, "duration_us")?;
    if duration_us <= 0.0 {
        bail!("wrk reported a duration of {duration_us} µs");
    }
    let ms = |k: &str| get(&lat, k).map(|us| us / 1000.0);
    let non2xx = get(&counts, "status")?;
    Ok(Wrk {
        requests: requests as u64,
        // Throughput counts the 2xx answers only: a fast 503 is not served work.
        rps: (requests - non2xx).max(0.0) / (duration_us / 1e6),
        p: [ms("p50")?, ms("p75")?, ms("p90")?, ms("p99")?, ms("p999")?],
        max_ms: ms("max")?,
        non2xx: non2xx as u64,
        connect: get(&counts, "connect")? as u64,
        read: get(&counts, "read")? as u64,
        write: get(&counts, "write")? as u64,
        timeout: get(&counts, "timeout")? as u64,
    })
}

/// The medians of several runs of one variant (errors summed).
struct Median {
    rps: f64,
    p: [f64; 5],
    errors: u64,
}

impl Median {
    fn of<'a>(runs: impl Iterator<Item = &'a Wrk>) -> Self {
        let runs: Vec<&Wrk> = runs.collect();
        let mut p = [0.0; 5];
        for (i, v) in p.iter_mut().enumerate() {
            *v = median(&runs.iter().map(|r| r.p[i]).collect::<Vec<_>>());
        }
        Self {
            rps: median(&runs.iter().map(|r| r.rps).collect::<Vec<_>>()),
            p,
            errors: runs.iter().map(|r| r.errors()).sum(),
        }
    }
}

/// How the closed-loop runs are driven: wrk, or (without it) xtask's own generator.
enum Driver {
    Wrk,
    Generator,
}

impl Driver {
    /// wrk when on PATH or installed now ([`super::ensure_tool`]); else the generator
    /// (said in `notes`).
    fn find(notes: &mut Vec<String>) -> Self {
        if super::ensure_tool("wrk", "wrk", notes) {
            return Self::Wrk;
        }
        notes.push(
            "wrk is not installed (and could not be installed with apt-get): the closed-loop runs \
             use xtask's own load generator (reqwest, one request in flight per connection), \
             which costs more CPU per request than wrk on the same cores; figures are lower \
             than wrk's would be."
                .into(),
        );
        Self::Generator
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        ctx: &Ctx<'_>,
        script: &Path,
        conns: u32,
        secs: u64,
        url: &str,
        key: Option<&str>,
        label: &str,
    ) -> Result<Wrk> {
        match self {
            Self::Wrk => {
                let log = ctx.out.join(format!("api-{label}.wrk"));
                let mut cmd = Command::new("wrk");
                cmd.args([
                    format!("-t{THREADS}"),
                    format!("-c{conns}"),
                    format!("-d{secs}s"),
                    "--timeout".into(),
                    "2s".into(),
                    "--latency".into(),
                    "-s".into(),
                ])
                .arg(script)
                .arg(url)
                .env("BENCH_KEY", key.unwrap_or(""))
                .stdin(Stdio::null());
                super::record(ctx, &cmd);
                let out = cmd.output().context("running wrk")?;
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                std::fs::write(
                    &log,
                    format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
                )
                .with_context(|| format!("writing {}", log.display()))?;
                if !out.status.success() {
                    bail!(
                        "wrk failed ({label}, {}); see {}",
                        out.status,
                        log.display()
                    );
                }
                parse_wrk(&text).with_context(|| format!("reading {}", log.display()))
            }
            Self::Generator => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .context("starting the load generator's runtime")?;
                let within = Duration::from_secs(secs);
                let started = Instant::now();
                let report = runtime.block_on(load::closed(
                    url,
                    key.unwrap_or(""),
                    conns as usize,
                    usize::MAX,
                    within,
                    Duration::from_secs(2),
                ));
                let elapsed = started.elapsed().as_secs_f64();
                let sorted = report.service_times();
                let ms = |p: f64| load::percentile(&sorted, p).as_secs_f64() * 1000.0;
                let count = |pred: fn(&load::Kind) -> bool| {
                    report.outcomes.iter().filter(|o| pred(&o.kind)).count() as u64
                };
                Ok(Wrk {
                    requests: report.outcomes.len() as u64,
                    rps: report.outcomes.len() as f64 / elapsed,
                    p: POINTS.map(ms),
                    max_ms: ms(100.0),
                    non2xx: count(|k| matches!(k, load::Kind::Status(..) | load::Kind::BadBody(_))),
                    connect: count(|k| matches!(k, load::Kind::Transport)),
                    read: 0,
                    write: 0,
                    timeout: count(|k| matches!(k, load::Kind::Deadline)),
                })
            }
        }
    }
}

/// What one pgbench run measured.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PgRun {
    pub(crate) round: u32,
    pub(crate) tps: f64,
    pub(crate) latency_ms: f64,
    pub(crate) failed: u64,
}

/// Reads pgbench's summary: `tps = ...`, `latency average = ... ms`, and (PostgreSQL 15+)
/// `number of failed transactions: N`.
pub(crate) fn parse_pgbench(out: &str, round: u32) -> Result<PgRun> {
    let after = |prefix: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    Ok(PgRun {
        round,
        tps: after("tps = ").context("pgbench printed no `tps = ` line")?,
        latency_ms: after("latency average = ").unwrap_or(f64::NAN),
        failed: after("number of failed transactions: ").unwrap_or(0.0) as u64,
    })
}

/// The open-loop run's figures.
struct OpenLoop {
    rate: u32,
    sent: usize,
    achieved: f64,
    /// p50..p99.9 from the scheduled send time, ms.
    from_schedule: [f64; 5],
    /// p50..p99.9 of the service time, ms.
    service: [f64; 5],
    max_lag_ms: f64,
    errors: usize,
    error_kinds: String,
}

impl OpenLoop {
    /// True when the run queued: its p50 from the scheduled send time is more than twice its
    /// service p50 plus 5 ms, or it sent under 95 % of its rate.
    fn queues(&self) -> bool {
        self.from_schedule[0] > 2.0 * self.service[0] + 5.0
            || self.achieved < 0.95 * f64::from(self.rate)
    }

    fn of(report: &load::Report, rate: u32, duration: Duration) -> Self {
        let scheduled = report.since_schedule();
        let service = report.service_times();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let mut kinds = std::collections::BTreeMap::<String, usize>::new();
        for o in &report.outcomes {
            if o.kind != load::Kind::Ok {
                *kinds.entry(o.kind.label()).or_default() += 1;
            }
        }
        let lost = report.sent.saturating_sub(report.outcomes.len());
        if lost > 0 {
            kinds.insert("no outcome".into(), lost);
        }
        let mut error_kinds = String::new();
        for (k, n) in &kinds {
            let _ = write!(
                error_kinds,
                "{}{k}: {n}",
                if error_kinds.is_empty() { "" } else { ", " }
            );
        }
        Self {
            rate,
            sent: report.sent,
            achieved: report.sent as f64 / duration.as_secs_f64(),
            from_schedule: POINTS.map(|p| ms(load::percentile(&scheduled, p))),
            service: POINTS.map(|p| ms(load::percentile(&service, p))),
            max_lag_ms: report
                .outcomes
                .iter()
                .map(|o| ms(o.sent.saturating_sub(o.scheduled)))
                .fold(0.0, f64::max),
            errors: kinds.values().sum(),
            error_kinds: if error_kinds.is_empty() {
                "none".into()
            } else {
                error_kinds
            },
        }
    }

    fn line(&self) -> String {
        format!(
            "open loop at {} req/s: sent {} ({:.0}/s), p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms \
             (from the schedule; service p50 {:.2} ms, p99 {:.2} ms), errors {} ({})",
            self.rate,
            self.sent,
            self.achieved,
            self.from_schedule[0],
            self.from_schedule[3],
            self.from_schedule[4],
            self.service[0],
            self.service[3],
            self.errors,
            self.error_kinds
        )
    }

    fn table(&self) -> Table {
        let row = |what: &str, p: &[f64; 5]| {
            let mut r = vec![what.to_owned()];
            r.extend(p.iter().map(|v| format!("{v:.2}")));
            r
        };
        Table {
            caption: format!(
                "Open loop, {} req/s fixed, limiter on: {} requests sent ({:.0}/s), errors {} ({}); \
                 latencies in ms",
                self.rate, self.sent, self.achieved, self.errors, self.error_kinds
            ),
            header: ["latency", "p50", "p75", "p90", "p99", "p99.9"]
                .map(str::to_owned)
                .to_vec(),
            rows: vec![
                row("from the scheduled send time", &self.from_schedule),
                row("service time (send to answer)", &self.service),
            ],
        }
    }
}

/// A fresh database on the throwaway PostgreSQL, migrated by the release binary and seeded
/// (one org, one key, one domain); dropped with the fixture.
pub(super) struct Fixture {
    admin: SecretUrl,
    pub(super) name: String,
    pub(super) db: SecretUrl,
    pub(super) key: String,
    /// The key's SHA-256 as stored (`api_keys.key_hash`), hex.
    pub(super) key_hash: String,
    pub(super) domain: String,
    bin: PathBuf,
    work: PathBuf,
}

impl Fixture {
    pub(super) fn create(ctx: &Ctx<'_>, name: &str) -> Result<Self> {
        let bin = ctx.release.clone();
        for b in ["smartbeak-api", "smartbeak-migrate"] {
            if !bin.join(b).is_file() {
                bail!(
                    "{} is missing: run `cargo build --release --workspace --bins --examples`",
                    bin.join(b).display()
                );
            }
        }
        let admin = SecretUrl::parse("DATABASE_URL", &ctx.pg.url())?;
        psql(
            &admin,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        )?;
        psql(&admin, &format!("CREATE DATABASE {name}"))?;
        let db = SecretUrl::parse(
            "DATABASE_URL",
            &format!("postgres://postgres@127.0.0.1:{}/{name}", ctx.pg.port()),
        )?;
        let work = ctx.out.join(name);
        std::fs::create_dir_all(work.join("exports"))
            .with_context(|| format!("creating {}", work.display()))?;
        let migrate = Command::new(bin.join("smartbeak-migrate"))
            .env("DATABASE_URL", db.expose())
            .stdin(Stdio::null())
            .output()
            .context("running smartbeak-migrate")?;
        if !migrate.status.success() {
            bail!(
                "smartbeak-migrate failed: {}",
                String::from_utf8_lossy(&migrate.stderr)
            );
        }
        let org = crate::chaos::admin_cmd(&bin, &db, &["orgs", "create", "--name", name])?;
        let org = crate::chaos::json_field(&org, "id").context("`orgs create` printed no id")?;
        let key = crate::chaos::admin_cmd(&bin, &db, &["keys", "create", "--org", &org])?;
        let key = crate::chaos::json_field(&key, "key").context("`keys create` printed no key")?;
        let key_hash = psql_read(&db, "SELECT encode(key_hash, 'hex') FROM api_keys")?
            .trim()
            .to_owned();
        if key_hash.len() != 64 {
            bail!("reading the seeded key's hash: got {key_hash:?}");
        }
        let mut fx = Self {
            admin,
            name: name.to_owned(),
            db,
            key,
            key_hash,
            domain: String::new(),
            bin,
            work,
        };
        let api = fx.start_api(ctx, &format!("{name}-seed"), false)?;
        fx.domain = crate::chaos::seed_domain(api.port, &fx.key)?;
        api.stop()?;
        Ok(fx)
    }

    /// The key-and-domain lookup of `ab.sh` as a pgbench script (the hash and the id
    /// written in, so neither is in argv).
    pub(super) fn lookup_sql(&self) -> String {
        format!(
            "SELECT d.id, d.name, d.status, d.created_at, d.updated_at\n  FROM api_keys k JOIN \
             domains d ON d.org_id = k.org_id\n WHERE k.key_hash = decode('{}', 'hex') AND \
             k.revoked_at IS NULL AND d.id = '{}'::uuid;\n",
            self.key_hash, self.domain
        )
    }

    /// Starts the release api on this database, the limiter on (the throwaway Redis, limits
    /// no run exhausts) or off; returns once it listens.
    pub(super) fn start_api(&self, ctx: &Ctx<'_>, name: &str, limiter: bool) -> Result<Api> {
        let port = smartbeak_test_support::free_port()?;
        let log = self.work.join(format!("{name}.log"));
        let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(self.bin.join("smartbeak-api"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", self.db.expose())
            .env("DB_RUN_MIGRATIONS", "false")
            .env("API_BIND", format!("127.0.0.1:{port}"))
            .env("EXPORT_DIR", self.work.join("exports"))
            .env("HTTP_MAX_CONNECTIONS", API_CAP)
            .env("HTTP_MAX_CONCURRENCY", API_CAP)
            .env("RUST_LOG", "warn");
        if limiter {
            cmd.env("REDIS_URL", ctx.redis.url())
                .env(
                    "RATE_LIMIT_KEY_PREFIX",
                    format!("bench:{}:{name}", std::process::id()),
                )
                .env("RATE_LIMIT_WINDOW_SECS", "3600")
                .env("RATE_LIMIT_PER_KEY", "3600000")
                .env("RATE_LIMIT_PER_IP", "3600000");
        } else {
            cmd.env("RATE_LIMIT_ENABLED", "false");
        }
        super::record(ctx, &cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("spawning smartbeak-api")?;
        let mut api = Api {
            name: name.to_owned(),
            child: Some(child),
            port,
            log,
        };
        api.wait_listening(Duration::from_secs(60))?;
        Ok(api)
    }

    /// One `GET` before a run: the url answers 200 with the key.
    fn check_get(&self, url: &str) -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime")?;
        let report = runtime.block_on(load::burst(
            &[url.to_owned()],
            &self.key,
            1,
            Duration::from_secs(5),
        ));
        match report.outcomes.first().map(|o| &o.kind) {
            Some(load::Kind::Ok) => Ok(()),
            Some(other) => bail!("GET {url} before the run: {}", other.label()),
            None => bail!("GET {url} before the run: no answer"),
        }
    }

    fn pgbench(&self, ctx: &Ctx<'_>, sql: &Path, secs: u64, round: u32) -> Result<PgRun> {
        let log = ctx.out.join(format!("api-r{round}-pgbench.txt"));
        let mut cmd = Command::new("pgbench");
        cmd.args(["-n", "-M", "prepared"])
            .args(["-c", &PG_CLIENTS.to_string(), "-j", &THREADS.to_string()])
            .args(["-T", &secs.to_string(), "-f"])
            .arg(sql)
            .args(["-h", "127.0.0.1", "-p", &ctx.pg.port().to_string()])
            .args(["-U", "postgres", &self.name])
            .stdin(Stdio::null());
        super::record(ctx, &cmd);
        let out = cmd
            .output()
            .context("running pgbench (apt-get install -y postgresql-client)")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(&log, &text).with_context(|| format!("writing {}", log.display()))?;
        if !out.status.success() {
            bail!("pgbench failed ({}); see {}", out.status, log.display());
        }
        parse_pgbench(&text, round).with_context(|| format!("reading {}", log.display()))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = psql(
            &self.admin,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// A running api, stopped on drop.
pub(super) struct Api {
    name: String,
    child: Option<Child>,
    pub(super) port: u16,
    log: PathBuf,
}

impl Api {
    fn wait_listening(&mut self, bound: Duration) -> Result<()> {
        let deadline = Instant::now() + bound;
        while !smartbeak_test_support::port_answers("127.0.0.1", self.port) {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "{} exited ({status}) during start-up; see {}",
                    self.name,
                    self.log.display()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not listen within {bound:?}; see {}",
                    self.name,
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// SIGTERM (a graceful drain: the pool's sessions close) and a bounded wait; SIGKILL
    /// past it. Fails when the process had exited by itself before.
    pub(super) fn stop(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(status) = child.try_wait()? {
            bail!(
                "{} exited ({status}) during the run; see {}",
                self.name,
                self.log.display()
            );
        }
        let _ = smartbeak_test_support::signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        while child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests;
