//! `cargo xtask chaos`: faults injected into the running system, checked from outside.
//!
//! Starts a throwaway PostgreSQL and Redis (the test-support guards, never the machine's
//! shared servers), a fault proxy ([`TcpForwarder`]) in front of each, migrates and seeds a
//! database, and starts two api replicas, two export workers and two control-planes as real
//! processes pointed at the proxies, the control-planes' keyword providers at a local HTTP
//! server ([`provider`]). Each scenario drives open-loop load from [`load`] (a fixed rate; every
//! request has a deadline, so a slow answer cannot hide by slowing the load), injects its
//! fault from this thread, and prints one line: requests, errors by kind, lost, duplicated,
//! recovery time. Everything is stopped on drop (failure and Ctrl-C included: the handler
//! in `main` sets [`crate::INTERRUPTED`], which ends the run between steps).

mod batch;
mod conns;
pub(crate) mod load;
mod provider;
mod scenarios;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use smartbeak_database::SecretUrl;
use smartbeak_test_support::{PostgresOptions, PostgresServer, RedisServer, TcpForwarder};
use xshell::{Shell, cmd};

use crate::services::{psql, psql_read};
use provider::{Adapter, Provider};

/// The scenarios implemented, in the order they run.
const SCENARIOS: &[u32] = &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10];

/// The scenarios `cargo xtask test` runs (short and deterministic).
const QUICK: &[u32] = &[1, 3, 4, 8, 9];

/// The api's deadline in the chaos setup (`HTTP_REQUEST_TIMEOUT_MS`).
const REQUEST_TIMEOUT: Duration = Duration::from_millis(3000);

/// The control-planes' `CP_HEARTBEAT_MS` in the chaos setup.
const CP_HEARTBEAT: Duration = Duration::from_millis(500);

/// The control-planes' `CP_STALE_AFTER_MS`: at least three heartbeats and more than one
/// heartbeat plus the statement bound (1500 ms + 250 ms).
const CP_STALE_AFTER: Duration = Duration::from_millis(3000);

/// The control-planes' `SHUTDOWN_TIMEOUT_MS` (drain two thirds of it: 4 s, of which the
/// last second is the margin for recording the run).
const CP_SHUTDOWN_TIMEOUT: Duration = Duration::from_millis(6000);

/// The control-planes' `CP_PROVIDER_BREAKER_OPEN_MS`.
const CP_BREAKER_OPEN: Duration = Duration::from_millis(1000);

/// `DB_POOL_MAX` of every process in the chaos setup (the database crate's default, set
/// explicitly so the harness knows the bound of scenario 3).
const POOL_MAX: u64 = 20;

/// The export workers' `EXPORT_LEASE_SECS` in the chaos setup.
const EXPORT_LEASE: Duration = Duration::from_secs(5);

/// The api's Redis command timeout in the chaos setup (`REDIS_COMMAND_TIMEOUT_MS`).
const REDIS_COMMAND_TIMEOUT: Duration = Duration::from_millis(100);

/// `cargo xtask chaos --help`.
pub(crate) const USAGE: &str = "\
usage: cargo xtask chaos [--scenario N]... [--quick]

Starts a throwaway PostgreSQL and Redis, fault proxies in front of them, two api replicas,
two export workers and two control-planes as real processes (and a local fake keyword
provider), runs each scenario (load from outside, a fault,
the outcome checked from outside) and prints one line per scenario and a summary table;
exits 1 when a scenario fails (lost, duplicated, hung or off-spec answers).

  --scenario N   run only scenario N (repeatable); implemented: 1 to 10
  --quick        shorter phases (`cargo xtask test` runs scenarios 1 3 4 8 9 this way)
  --help         this text

scenarios (pass criteria in README.md, \"Chaos\"):
  1   Redis killed and restarted, then black-holed, under load: fail-open serves every
      request within the command timeout plus a margin; limiting resumes within 2 s
  2   two replicas share one per-key limit: allowed in total within 1% of the limit
  3   pg_terminate_backend under load: clean 5xx or success; no error 1 s after; pools back
  4   PostgreSQL black-holed: errors end at the deadline with the standard body; full rate after
  5   a query past statement_timeout: cancelled server-side (57014), 504, pool healthy
  6   keyword provider fails, stalls, recovers: its breaker opens and closes, the other
      provider's sources unaffected; 1,000,000 unknown adapter names: registry memory flat
  7   1,000 identical cold analytics requests: one SQL query
  8   SIGTERM an api replica under load: every in-flight request answered, exit 0; an export
      worker: re-queues its running exports, the other finishes them, exit 0; a
      control-plane mid-run: the run recorded interrupted, exit 0
  9   SIGKILL an export worker mid-job: reclaimed after the lease, completed exactly once;
      a control-plane mid-run: the other takes over, the dead run marked abandoned
  10  5,000 connections for 30 s on one replica: no crash, only 200 or 503 OVERLOADED,
      memory bounded
";

pub(crate) struct Chaos {
    scenarios: Vec<u32>,
    quick: bool,
}

impl Chaos {
    /// `--scenario N` (repeatable; default: all implemented) and `--quick`.
    pub(crate) fn parse(args: &[String]) -> Result<Self> {
        let mut scenarios = Vec::new();
        let mut quick = false;
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => quick = true,
                "--scenario" => {
                    let n = args.next().context("--scenario needs a number")?;
                    let n: u32 = n
                        .parse()
                        .with_context(|| format!("--scenario {n:?} is not a number"))?;
                    if !SCENARIOS.contains(&n) {
                        bail!("--scenario {n}: implemented scenarios are {SCENARIOS:?}");
                    }
                    scenarios.push(n);
                }
                other => {
                    bail!(
                        "unexpected argument {other:?}; usage: chaos [--scenario N]... [--quick] (see --help)"
                    )
                }
            }
        }
        if scenarios.is_empty() {
            scenarios = SCENARIOS.to_vec();
        }
        Ok(Self { scenarios, quick })
    }

    /// The reduced set `cargo xtask test` runs ([`QUICK`]), short.
    pub(crate) fn quick() -> Self {
        Self {
            scenarios: QUICK.to_vec(),
            quick: true,
        }
    }

    /// Builds the binaries, then [`Chaos::run_built`].
    pub(crate) fn run(&self, sh: &Shell) -> Result<ExitCode> {
        cmd!(sh, "cargo build --workspace --bins --quiet")
            .run()
            .context("building the binaries failed")?;
        if self.scenarios.contains(&6) {
            // Scenario 6 throws 1,000,000 adapter names at the breaker registry in it.
            cmd!(
                sh,
                "cargo build -p smartbeak-resilience --example registry_memory --quiet"
            )
            .run()
            .context("building the registry_memory example failed")?;
        }
        self.run_built(sh)
    }

    /// Runs the scenarios against the debug binaries; prints the summary table; the exit
    /// code fails when any scenario failed.
    pub(crate) fn run_built(&self, sh: &Shell) -> Result<ExitCode> {
        let bin = crate::fuzz::target_dir(sh).join("debug");
        let mut system = System::start(&bin, &crate::fuzz::target_dir(sh))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the load generator's runtime")?;
        let mut results = Vec::new();
        for &n in &self.scenarios {
            if crate::INTERRUPTED.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            let result = match scenarios::run(n, &mut system, &runtime, self.quick) {
                Ok(result) => result,
                Err(e) => {
                    let mut r = ScenarioResult::new(n, "(did not run)");
                    r.fail(format!("{e:#}"));
                    r
                }
            };
            println!("{}", result.line());
            results.push(result);
            system.check_alive()?;
        }
        println!(
            "\nchaos summary ({} mode)",
            if self.quick { "quick" } else { "full" }
        );
        println!(
            "{:<4} {:<28} {:>8} {:>7} {:>5} {:>5} {:>10}  result",
            "#", "scenario", "requests", "errors", "lost", "dup", "recovery"
        );
        for r in &results {
            println!(
                "{:<4} {:<28} {:>8} {:>7} {:>5} {:>5} {:>10}  {}",
                r.id,
                r.name,
                r.requests,
                r.errors.values().sum::<usize>(),
                r.lost,
                r.duplicated,
                r.recovery
                    .map_or_else(|| "-".to_owned(), |d| format!("{:.2}s", d.as_secs_f64())),
                if r.passed() { "ok" } else { "FAILED" }
            );
        }
        let failed = results.iter().any(|r| !r.passed());
        eprintln!("xtask: chaos: logs in {}", system.work.display());
        Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }
}

/// One scenario's outcome, printed as one line.
#[derive(Debug)]
pub(crate) struct ScenarioResult {
    id: u32,
    name: &'static str,
    requests: usize,
    /// Requests that did not succeed, by kind (`503 REQUEST_TIMEOUT`, `deadline`, ...).
    errors: BTreeMap<String, usize>,
    /// Requests sent that got no outcome at all.
    lost: usize,
    duplicated: usize,
    recovery: Option<Duration>,
    /// What else the scenario measured (counts, memory), printed after the recovery.
    notes: Vec<String>,
    /// Why the scenario failed; empty: it passed.
    failures: Vec<String>,
}

impl ScenarioResult {
    fn new(id: u32, name: &'static str) -> Self {
        Self {
            id,
            name,
            requests: 0,
            errors: BTreeMap::new(),
            lost: 0,
            duplicated: 0,
            recovery: None,
            notes: Vec::new(),
            failures: Vec::new(),
        }
    }

    fn fail(&mut self, why: impl Into<String>) {
        self.failures.push(why.into());
    }

    fn note(&mut self, what: impl Into<String>) {
        self.notes.push(what.into());
    }

    /// Why the scenario failed: its recorded failures, and any request or job lost or
    /// duplicated (the issue: both must be 0, whatever the part said).
    fn reasons(&self) -> Vec<String> {
        let mut reasons = self.failures.clone();
        if self.lost > 0 {
            reasons.push(format!("{} lost (must be 0)", self.lost));
        }
        if self.duplicated > 0 {
            reasons.push(format!("{} duplicated (must be 0)", self.duplicated));
        }
        reasons
    }

    /// No failure recorded, nothing lost, nothing duplicated.
    pub(crate) fn passed(&self) -> bool {
        self.reasons().is_empty()
    }

    fn line(&self) -> String {
        let errors = if self.errors.is_empty() {
            "none".to_owned()
        } else {
            self.errors
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let recovery = self
            .recovery
            .map_or_else(|| "-".to_owned(), |d| format!("{:.2}s", d.as_secs_f64()));
        let notes = if self.notes.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.notes.join(", "))
        };
        let reasons = self.reasons();
        let verdict = if reasons.is_empty() {
            "ok".to_owned()
        } else {
            format!("FAILED: {}", reasons.join("; "))
        };
        format!(
            "chaos: scenario {} ({}): requests {}, errors {{{errors}}}, lost {}, duplicated {}, recovery {recovery}{notes}: {verdict}",
            self.id, self.name, self.requests, self.lost, self.duplicated
        )
    }
}

/// A child process killed on drop.
pub(crate) struct Proc {
    name: String,
    child: Child,
    /// The api's listening port, or the worker's admin port.
    port: u16,
    log: PathBuf,
    /// The most database sessions it may hold: its pool's `DB_POOL_MAX` plus the sessions
    /// outside the pool (a `LISTEN` session in the api and the worker).
    db_sessions: u64,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything a scenario acts on. Dropped in declaration order: processes, the fake
/// provider, proxies, then servers.
pub(crate) struct System {
    apis: Vec<Proc>,
    workers: Vec<Proc>,
    /// The control-planes (`run`, keyword-sync only, every second); `port` is the admin's.
    cps: Vec<Proc>,
    /// The api replicas a scenario started with settings of its own, by
    /// [`System::extra_api`]; stopped at the end of the scenario (dropped).
    extra_apis: Vec<Proc>,
    /// The keyword providers the control-planes sync from.
    provider: Provider,
    pg_proxy: TcpForwarder,
    redis_proxy: TcpForwarder,
    redis: RedisServer,
    /// The chaos database, directly (not through the proxy): for psql.
    db_url: SecretUrl,
    key: String,
    domain: String,
    work: PathBuf,
    bin: PathBuf,
    /// The database and Redis URLs through the proxies, for a replica started again.
    via_proxy: (String, String),
    /// Workers and control-planes started again so far (their ids stay unique).
    restarts: usize,
    /// The seed domain's org: the keyword sources' domains are created in it.
    org: String,
    pg: PostgresServer,
}

impl System {
    fn start(bin: &Path, target: &Path) -> Result<Self> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let work = target
            .join("chaos")
            .join(format!("{}_{stamp}", std::process::id()));
        std::fs::create_dir_all(work.join("exports"))
            .with_context(|| format!("creating {}", work.display()))?;
        eprintln!("xtask: chaos: starting a throwaway PostgreSQL and Redis");
        // pg_stat_statements: scenario 7 counts the analytics statement server-side.
        let pg = PostgresServer::start_with_options(PostgresOptions {
            settings: vec![(
                "shared_preload_libraries".to_owned(),
                "pg_stat_statements".to_owned(),
            )],
            ..PostgresOptions::default()
        })
        .context("starting the throwaway PostgreSQL")?;
        let redis = RedisServer::start().context("starting the throwaway Redis")?;
        let admin = SecretUrl::parse("DATABASE_URL", &pg.url())?;
        psql(&admin, "CREATE DATABASE chaos")?;
        let db_url = SecretUrl::parse(
            "DATABASE_URL",
            &format!("postgres://postgres@127.0.0.1:{}/chaos", pg.port()),
        )?;
        psql(&db_url, "CREATE EXTENSION pg_stat_statements")?;
        let pg_proxy = TcpForwarder::start(loopback(pg.port()))?;
        let redis_proxy = TcpForwarder::start(loopback(redis.port()))?;
        let via_proxy = format!("postgres://postgres@127.0.0.1:{}/chaos", pg_proxy.port());
        let redis_via_proxy = format!("redis://127.0.0.1:{}", redis_proxy.port());

        eprintln!("xtask: chaos: migrating and seeding");
        let migrate = Command::new(bin.join("smartbeak-migrate"))
            .env("DATABASE_URL", db_url.expose())
            .stdin(Stdio::null())
            .output()
            .context("running smartbeak-migrate")?;
        if !migrate.status.success() {
            bail!(
                "smartbeak-migrate failed: {}",
                String::from_utf8_lossy(&migrate.stderr)
            );
        }
        let org = admin_cmd(bin, &db_url, &["orgs", "create", "--name", "chaos"])?;
        let org_id = json_field(&org, "id").context("`orgs create` printed no id")?;
        let key = admin_cmd(bin, &db_url, &["keys", "create", "--org", &org_id])?;
        let key = json_field(&key, "key").context("`keys create` printed no key")?;

        let mut apis = Vec::new();
        for i in 0..2 {
            apis.push(start_api(bin, &work, i, &via_proxy, &redis_via_proxy, &[])?);
        }
        let mut workers = Vec::new();
        for i in 0..2 {
            workers.push(start_worker(bin, &work, i, &via_proxy)?);
        }
        let provider = Provider::start()?;
        let mut cps = Vec::new();
        for i in 0..2 {
            cps.push(start_cp(bin, &work, i, &via_proxy, &provider)?);
        }
        for p in apis
            .iter_mut()
            .chain(workers.iter_mut())
            .chain(cps.iter_mut())
        {
            wait_for_port(p, Duration::from_secs(60))?;
        }
        let domain = seed_domain(apis[0].port, &key)?;
        eprintln!(
            "xtask: chaos: 2 api replicas (ports {}, {}), 2 export workers, 2 control-planes; logs in {}",
            apis[0].port,
            apis[1].port,
            work.display()
        );
        Ok(Self {
            apis,
            workers,
            cps,
            provider,
            pg_proxy,
            redis_proxy,
            redis,
            db_url,
            key,
            domain,
            work,
            bin: bin.to_path_buf(),
            via_proxy: (via_proxy, redis_via_proxy),
            extra_apis: Vec::new(),
            restarts: 0,
            org: org_id,
            pg,
        })
    }

    /// Fails when a process exited on its own (a crash is a finding).
    fn check_alive(&mut self) -> Result<()> {
        for p in self
            .apis
            .iter_mut()
            .chain(self.workers.iter_mut())
            .chain(self.cps.iter_mut())
        {
            if let Some(status) = p.child.try_wait()? {
                bail!("{} exited ({status}); see {}", p.name, p.log.display());
            }
        }
        Ok(())
    }

    /// Starts api replica `i` again (after a scenario stopped it), on a new port.
    fn restart_api(&mut self, i: usize) -> Result<()> {
        let (db, redis) = &self.via_proxy;
        let mut api = start_api(&self.bin, &self.work, i + 10, db, redis, &[])?;
        wait_for_port(&mut api, Duration::from_secs(60))?;
        self.apis[i] = api;
        Ok(())
    }

    /// Starts export worker `i` again (after a scenario killed it), on a new admin port and
    /// with a new worker id.
    fn restart_worker(&mut self, i: usize) -> Result<()> {
        let n = 10 * (self.restarts + 1) + i;
        self.restarts += 1;
        let mut worker = start_worker(&self.bin, &self.work, n, &self.via_proxy.0)?;
        wait_for_port(&mut worker, Duration::from_secs(60))?;
        self.workers[i] = worker;
        Ok(())
    }

    /// Starts control-plane `i` again (after a scenario stopped it), on a new admin port
    /// and with a new runner name.
    fn restart_cp(&mut self, i: usize) -> Result<()> {
        let n = 10 * (self.restarts + 1) + i;
        self.restarts += 1;
        let mut cp = start_cp(&self.bin, &self.work, n, &self.via_proxy.0, &self.provider)?;
        wait_for_port(&mut cp, Duration::from_secs(60))?;
        self.cps[i] = cp;
        Ok(())
    }

    /// Replaces the keyword sources with `domains` fresh domains of the seed org, each
    /// with a `gsc` and an `ahrefs` source (`domains` 0: none, so the control-planes' runs
    /// have nothing to do).
    fn keyword_sources(&self, domains: usize) -> Result<()> {
        psql(
            &self.db_url,
            &format!(
                "DELETE FROM domain_keyword_sources; \
                 DELETE FROM domains WHERE name LIKE 'kw-%.chaos.example'; \
                 INSERT INTO domains (id, org_id, name) SELECT gen_random_uuid(), '{org}', \
                 'kw-' || i || '.chaos.example' FROM generate_series(1, {domains}) i; \
                 INSERT INTO domain_keyword_sources (domain_id, adapter, site) \
                 SELECT d.id, a, d.name FROM domains d, unnest(ARRAY['gsc', 'ahrefs']) a \
                 WHERE d.name LIKE 'kw-%.chaos.example'",
                org = self.org
            ),
        )
    }

    /// Starts one more api replica with `env` over the chaos settings, for one scenario;
    /// its port. Stopped by [`System::stop_extra_apis`] (or on drop).
    fn extra_api(&mut self, env: &[(&str, &str)]) -> Result<u16> {
        let (db, redis) = &self.via_proxy;
        let i = 100 + self.extra_apis.len();
        let mut api = start_api(&self.bin, &self.work, i, db, redis, env)?;
        wait_for_port(&mut api, Duration::from_secs(60))?;
        let port = api.port;
        self.extra_apis.push(api);
        Ok(port)
    }

    /// Stops the replicas [`System::extra_api`] started; fails when one had exited by itself.
    fn stop_extra_apis(&mut self) -> Result<()> {
        let mut crashed = Vec::new();
        for mut p in self.extra_apis.drain(..) {
            if let Some(status) = p.child.try_wait()? {
                crashed.push(format!(
                    "{} exited ({status}); see {}",
                    p.name,
                    p.log.display()
                ));
            }
        }
        if !crashed.is_empty() {
            bail!("{}", crashed.join("; "));
        }
        Ok(())
    }

    /// The most database sessions the running processes may hold together (every api
    /// replica, extra ones included, worker and control-plane connects to the database).
    fn db_sessions(&self) -> u64 {
        self.apis
            .iter()
            .chain(&self.extra_apis)
            .chain(&self.workers)
            .chain(&self.cps)
            .map(|p| p.db_sessions)
            .sum()
    }

    /// `GET /v1/domains/{id}` on each replica: the target the load spreads over.
    fn urls(&self) -> Vec<String> {
        self.apis
            .iter()
            .map(|a| format!("http://127.0.0.1:{}/v1/domains/{}", a.port, self.domain))
            .collect()
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn start_api(
    bin: &Path,
    work: &Path,
    i: usize,
    db: &str,
    redis: &str,
    env: &[(&str, &str)],
) -> Result<Proc> {
    let port = smartbeak_test_support::free_port()?;
    let log = work.join(format!("api-{i}.log"));
    let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new(bin.join("smartbeak-api"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", db)
        .env("DB_RUN_MIGRATIONS", "false")
        .env("REDIS_URL", redis)
        .env("API_BIND", format!("127.0.0.1:{port}"))
        .env("EXPORT_DIR", work.join("exports"))
        .env(
            "HTTP_REQUEST_TIMEOUT_MS",
            REQUEST_TIMEOUT.as_millis().to_string(),
        )
        .env("DB_STATEMENT_TIMEOUT_MS", "1500")
        .env("DB_ACQUIRE_TIMEOUT_MS", "1000")
        .env(
            "REDIS_COMMAND_TIMEOUT_MS",
            REDIS_COMMAND_TIMEOUT.as_millis().to_string(),
        )
        .env("REDIS_RECONNECT_MAX_MS", "500")
        // Limits far above the load: every decision allows, so any refusal is a fault's.
        .env("RATE_LIMIT_WINDOW_SECS", "60")
        .env("RATE_LIMIT_PER_KEY", "60000")
        .env("RATE_LIMIT_PER_IP", "60000")
        .env("RATE_LIMIT_REPLICAS", "2")
        .env("RATE_LIMIT_KEY_PREFIX", "chaos")
        .env("SHUTDOWN_TIMEOUT_MS", "5000")
        .env("DB_POOL_MAX", POOL_MAX.to_string())
        // The shutdown report's line (its exit code) at info.
        .env("RUST_LOG", "warn,smartbeak_shutdown=info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .context("spawning smartbeak-api")?;
    let pool_max = env
        .iter()
        .rev()
        .find(|(k, _)| *k == "DB_POOL_MAX")
        .map_or(Ok(POOL_MAX), |(_, v)| v.parse().context("DB_POOL_MAX"))?;
    Ok(Proc {
        name: format!("api-{i}"),
        child,
        port,
        log,
        // The pool and the key cache's `LISTEN` session.
        db_sessions: pool_max + 1,
    })
}

fn start_worker(bin: &Path, work: &Path, i: usize, db: &str) -> Result<Proc> {
    let port = smartbeak_test_support::free_port()?;
    let log = work.join(format!("export-worker-{i}.log"));
    let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new(bin.join("smartbeak-domain-export"))
        .arg("worker")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", db)
        .env("DB_RUN_MIGRATIONS", "false")
        .env("EXPORT_DIR", work.join("exports"))
        .env("EXPORT_ADMIN_ADDR", format!("127.0.0.1:{port}"))
        .env("EXPORT_POLL_MAX_MS", "200")
        // Short leases, so scenario 9's reclaim of a killed worker's job comes in seconds.
        .env("EXPORT_LEASE_SECS", EXPORT_LEASE.as_secs().to_string())
        .env("EXPORT_HEARTBEAT_SECS", "1")
        // The lease (5 s) must cover two heartbeats plus the database client bound (this
        // plus 250 ms: 2,250 ms).
        .env("DB_STATEMENT_TIMEOUT_MS", "2000")
        .env("EXPORT_REAPER_INTERVAL_SECS", "1")
        .env("EXPORT_WORKER_ID", format!("chaos-worker-{i}"))
        // Scenario 8: a SIGTERMed worker releases its running exports for the other worker.
        // The least drain it accepts is the release window (500 ms cancel grace, the
        // 2,250 ms client bound of a release, 250 ms) plus the client bound of a claim sent
        // just before the stop: 5,250 ms; 500 ms more is slack for a release through the
        // proxy's latency on a loaded machine. Closing the pools gets 2 s of the 2,250 ms
        // left of the 8 s (the worker refuses a drain plus pool close past the deadline).
        .env("SHUTDOWN_TIMEOUT_MS", "8000")
        .env("SHUTDOWN_DRAIN_TIMEOUT_MS", "5750")
        .env("SHUTDOWN_POOL_CLOSE_MS", "2000")
        .env("DB_POOL_MAX", POOL_MAX.to_string())
        // The shutdown report's line (its exit code) at info.
        .env("RUST_LOG", "warn,smartbeak_shutdown=info")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .context("spawning smartbeak-domain-export worker")?;
    Ok(Proc {
        name: format!("export-worker-{i}"),
        child,
        port,
        log,
        // The pool and the queue's `LISTEN` session.
        db_sessions: POOL_MAX + 1,
    })
}

/// A control-plane `run` on the database through the proxy: keyword-sync only, a run every
/// second (the other operations disabled), both providers at the fake [`Provider`], short
/// heartbeats and stale threshold (so a dead runner's run is taken over in seconds), a
/// short shutdown and a short breaker open time. Runner `chaos-cp-<i>`.
fn start_cp(bin: &Path, work: &Path, i: usize, db: &str, provider: &Provider) -> Result<Proc> {
    let port = smartbeak_test_support::free_port()?;
    let log = work.join(format!("control-plane-{i}.log"));
    let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new(bin.join("smartbeak-control-plane"))
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", db)
        .env("DB_RUN_MIGRATIONS", "false")
        .env("DB_STATEMENT_TIMEOUT_MS", "1500")
        .env("EXPORT_DIR", work.join("exports"))
        .env("CP_ADMIN_ADDR", format!("127.0.0.1:{port}"))
        .env("CP_RUNNER", format!("chaos-cp-{i}"))
        .env("CP_CONTENT_SCHEDULER_INTERVAL_SECS", "0")
        .env("CP_EXPORT_RETENTION_INTERVAL_SECS", "0")
        .env("CP_KEYWORD_SYNC_INTERVAL_SECS", "1")
        .env("CP_HEARTBEAT_MS", CP_HEARTBEAT.as_millis().to_string())
        .env("CP_STALE_AFTER_MS", CP_STALE_AFTER.as_millis().to_string())
        .env("CP_CONCURRENCY", "4")
        .env("CP_GSC_BASE_URL", provider.base_url(Adapter::Gsc))
        .env("CP_GSC_API_KEY", Adapter::Gsc.api_key())
        .env("CP_AHREFS_BASE_URL", provider.base_url(Adapter::Ahrefs))
        .env("CP_AHREFS_API_KEY", Adapter::Ahrefs.api_key())
        .env("CP_PROVIDER_ATTEMPT_TIMEOUT_MS", "1000")
        .env("CP_PROVIDER_MAX_ATTEMPTS", "2")
        .env(
            "CP_PROVIDER_BREAKER_OPEN_MS",
            CP_BREAKER_OPEN.as_millis().to_string(),
        )
        .env(
            "SHUTDOWN_TIMEOUT_MS",
            CP_SHUTDOWN_TIMEOUT.as_millis().to_string(),
        )
        .env("DB_POOL_MAX", POOL_MAX.to_string())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .context("spawning smartbeak-control-plane run")?;
    Ok(Proc {
        name: format!("control-plane-{i}"),
        child,
        port,
        log,
        // The pool only: a run's lock connection is one of its connections.
        db_sessions: POOL_MAX,
    })
}

/// Polls until `p` listens on its port; fails early when it exits.
fn wait_for_port(p: &mut Proc, bound: Duration) -> Result<()> {
    let deadline = Instant::now() + bound;
    while !smartbeak_test_support::port_answers("127.0.0.1", p.port) {
        if let Some(status) = p.child.try_wait()? {
            bail!(
                "{} exited ({status}) during start-up; see {}",
                p.name,
                p.log.display()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not listen within {bound:?}; see {}",
                p.name,
                p.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Runs an admin command of the api binary; its stdout.
pub(crate) fn admin_cmd(bin: &Path, db: &SecretUrl, args: &[&str]) -> Result<String> {
    let output = Command::new(bin.join("smartbeak-api"))
        .args(args)
        .env("DATABASE_URL", db.expose())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running smartbeak-api {}", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "smartbeak-api {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8(output.stdout).context("smartbeak-api printed something other than UTF-8")
}

/// The string value of `"name":"..."` in one-line JSON (ids, keys and codes have no escapes).
pub(crate) fn json_field(json: &str, name: &str) -> Option<String> {
    let start = json.find(&format!("\"{name}\":\""))? + name.len() + 4;
    let len = json[start..].find('"')?;
    Some(json[start..start + len].to_owned())
}

/// Creates the domain the load reads, with a plain HTTP/1.1 request; its id.
pub(crate) fn seed_domain(port: u16, key: &str) -> Result<String> {
    let body = r#"{"name":"chaos.example.com"}"#;
    let request = format!(
        "POST /v1/domains HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let response = raw_request(port, &request).context("creating the seed domain")?;
    if !response.starts_with("HTTP/1.1 201") {
        bail!(
            "creating the seed domain: {}",
            response.lines().next().unwrap_or("no answer")
        );
    }
    json_field(&response, "id").context("the created domain has no id")
}

/// Stores 20 keyword rows of 2020 for the seed domain (`POST /v1/domains/{id}/metrics`),
/// so that an export of 2020 has rows to write.
fn ingest_keywords(port: u16, key: &str, domain: &str) -> Result<()> {
    let rows: Vec<String> = (0..20)
        .map(|i| {
            format!(
                r#"{{"keyword":"chaos {i}","search_volume":{i},"position":1.0,"recorded_at":"2020-06-01T00:00:00Z"}}"#
            )
        })
        .collect();
    let body = format!(r#"{{"keywords":[{}]}}"#, rows.join(","));
    let request = format!(
        "POST /v1/domains/{domain}/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let response = raw_request(port, &request).context("ingesting keyword rows")?;
    if !response.starts_with("HTTP/1.1 20") {
        bail!(
            "ingesting keyword rows: {}",
            response.lines().next().unwrap_or("no answer")
        );
    }
    Ok(())
}

/// Queues an export of the seed domain (`POST /v1/domains/{id}/exports`); its id.
fn create_export(port: u16, key: &str, domain: &str) -> Result<String> {
    let body = r#"{"format":"json","from":"2020-01-01","to":"2020-12-31"}"#;
    let request = format!(
        "POST /v1/domains/{domain}/exports HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let response = raw_request(port, &request).context("queueing an export")?;
    if !response.starts_with("HTTP/1.1 202") {
        bail!(
            "queueing an export: {}",
            response.lines().next().unwrap_or("no answer")
        );
    }
    json_field(&response, "id").context("the queued export has no id")
}

fn raw_request(port: u16, request: &str) -> Result<String> {
    let mut stream = TcpStream::connect(loopback(port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// One Redis command in RESP inline form, straight to the server (not through the proxy);
/// the first line of its answer.
fn redis_command(port: u16, command: &str) -> Result<String> {
    let mut stream = TcpStream::connect(loopback(port))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(format!("{command}\r\n").as_bytes())?;
    let mut buf = [0u8; 256];
    let n = stream.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

/// How many keys the Redis server holds (the limiter's counters).
fn redis_keys(port: u16) -> Result<u64> {
    let answer = redis_command(port, "DBSIZE")?;
    answer
        .strip_prefix(':')
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("DBSIZE answered {answer:?}"))
}

/// The sum of the api replicas' `rate_limit_decisions_total{decision="failed_open"}`.
fn failed_open_decisions(system: &System) -> Result<f64> {
    let mut total = 0.0;
    for api in &system.apis {
        total += metric(
            api.port,
            "rate_limit_decisions_total",
            "decision=\"failed_open\"",
        )
        .with_context(|| format!("reading the metrics of {}", api.name))?;
    }
    Ok(total)
}

/// The sum of the samples of metric `name` whose line contains `label` ("" for all) in
/// the `/metrics` of the api on `port`.
fn metric(port: u16, name: &str, label: &str) -> Result<f64> {
    let metrics = raw_request(
        port,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )?;
    Ok(metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
                && l.contains(label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>())
}

/// Backends connected to the chaos database, this psql's own excepted.
fn backends(db: &SecretUrl) -> Result<u64> {
    let n = psql_read(
        db,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = 'chaos' AND pid <> pg_backend_pid()",
    )?;
    n.trim().parse().context("counting backends")
}

#[cfg(test)]
mod tests {
    use super::ScenarioResult;

    #[test]
    fn a_scenario_that_loses_or_duplicates_fails_whatever_its_parts_said() {
        let mut r = ScenarioResult::new(8, "sigterm");
        assert!(r.passed());
        assert!(r.line().ends_with(": ok"), "{}", r.line());
        r.duplicated = 1;
        assert!(!r.passed());
        assert!(
            r.line().contains("FAILED: 1 duplicated (must be 0)"),
            "{}",
            r.line()
        );
        r.duplicated = 0;
        r.lost = 2;
        assert!(!r.passed());
        assert!(
            r.line().contains("FAILED: 2 lost (must be 0)"),
            "{}",
            r.line()
        );
    }
}
