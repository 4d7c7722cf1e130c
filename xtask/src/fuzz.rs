//! `cargo xtask fuzz`, also the last step of `cargo xtask test`: schemathesis against the
//! real api binary.
//!
//! Schemathesis and everything it imports are pinned in `apps/api/fuzz/requirements.txt`
//! (schemathesis [`SCHEMATHESIS_VERSION`]) and installed with `pip install --no-deps -r`
//! into `target/schemathesis-<hash of that file>` the first time, so a new release of a
//! dependency (hypothesis decides which cases a seed produces) cannot change the run. The api runs on a database of its own
//! (created, migrated, dropped afterwards), with one org and a seeded key, Redis as the
//! limiter and quotas high enough that 429s do not crowd out the cases. Every check runs on
//! every operation (but one check on one operation, see `apps/api/fuzz/schemathesis.toml`),
//! stateful phase included; the step
//! fails on any failure schemathesis reports: a server error, a schema-valid request
//! rejected, an undocumented status, a response that does not match its schema. It is
//! killed after [`DEFAULT_TIMEOUT_SECS`] (`SMARTBEAK_FUZZ_TIMEOUT_SECS`); an interrupted run
//! (Ctrl-C, a signal) is an error, not a failed check. Each run has its own database and
//! work directory (`target/fuzz/<run>`, with the api's and the export worker's logs).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

use crate::services::Services;
use crate::test::FreshDatabase;

/// The schemathesis release the contract is checked with.
pub(crate) const SCHEMATHESIS_VERSION: &str = "4.32.5";

/// The whole dependency set, `pip freeze` of a working venv.
const REQUIREMENTS: &str = "apps/api/fuzz/requirements.txt";

/// How long schemathesis may run before it is killed, unless `SMARTBEAK_FUZZ_TIMEOUT_SECS`
/// says otherwise (a warm run takes about two minutes).
pub(crate) const DEFAULT_TIMEOUT_SECS: u64 = 600;

/// The run was interrupted (Ctrl-C or a signal): the caller stops instead of going on.
#[derive(Debug)]
pub(crate) struct Interrupted(pub(crate) String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted: {}", self.0)
    }
}

impl std::error::Error for Interrupted {}

pub(crate) struct Fuzz;

impl Fuzz {
    /// `cargo xtask fuzz`: services, the binaries, then [`run_fuzz`].
    pub(crate) fn run(&self, sh: &Shell) -> Result<bool> {
        let services = Services::find_or_start()?;
        cmd!(sh, "cargo build --workspace --bins --quiet")
            .run()
            .context("building the binaries failed")?;
        run_fuzz(sh, &services)
    }
}

/// The target directory cargo builds into.
pub(crate) fn target_dir(sh: &Shell) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => sh.current_dir().join(dir),
        None => sh.current_dir().join("target"),
    }
}

/// Runs schemathesis against a fresh api; true when it found nothing. The binaries must
/// be built (debug profile).
pub(crate) fn run_fuzz(sh: &Shell, services: &Services) -> Result<bool> {
    let target = target_dir(sh);
    let timeout = fuzz_timeout()?;
    let schemathesis = install_schemathesis(sh, &target)?;
    let bin = target.join("debug");
    // pid and milliseconds: two runs on one PostgreSQL (two containers can share a pid)
    // must not drop each other's database.
    let run = run_stamp();
    let database = FreshDatabase::named(services, &format!("smartbeak_fuzz_{run}"))?;
    let db_url = database.url.expose().to_owned();

    eprintln!("xtask: fuzz: migrating {}", database.name);
    let migrate = Command::new(bin.join("smartbeak-migrate"))
        .env("DATABASE_URL", &db_url)
        .stdin(Stdio::null())
        .output()
        .context("running smartbeak-migrate")?;
    if !migrate.status.success() {
        bail!(
            "smartbeak-migrate failed on {}: {}",
            database.name,
            last_line(&migrate)
        );
    }
    let org = admin(&bin, &db_url, &["orgs", "create", "--name", "fuzz"])?;
    let org_id = json_field(&org, "id").context("`orgs create` printed no id")?;
    let key = admin(&bin, &db_url, &["keys", "create", "--org", &org_id])?;
    let key = json_field(&key, "key").context("`keys create` printed no key")?;

    let work = target.join("fuzz").join(&run);
    let export_dir = work.join("exports");
    std::fs::create_dir_all(&export_dir)
        .with_context(|| format!("creating {}", export_dir.display()))?;
    let port = smartbeak_test_support::free_port()?;
    let log_path = work.join("api.log");
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut api = ChildGuard(
        Command::new(bin.join("smartbeak-api"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", &db_url)
            .env("REDIS_URL", &services.redis_url)
            .env("API_BIND", format!("127.0.0.1:{port}"))
            .env("EXPORT_DIR", &export_dir)
            // One request per millisecond per key and per IP: the most the limiter takes,
            // far above what the fuzzer sends, so 429s stay rare (they are documented).
            .env("RATE_LIMIT_WINDOW_SECS", "1")
            .env("RATE_LIMIT_PER_KEY", "1000")
            .env("RATE_LIMIT_PER_IP", "1000")
            .env("RATE_LIMIT_KEY_PREFIX", format!("smartbeak:fuzz:{run}"))
            // Bodies up to 8 MiB: the document bounds fields in characters, and 200,000
            // characters of `\u0000`-style escapes are over the default 1 MiB.
            .env("HTTP_BODY_LIMIT_BYTES", "8388608")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning smartbeak-api")?,
    );
    wait_for_port(&mut api.0, port, Duration::from_secs(30), &log_path)?;
    // An export worker on the same database and directory, so that the exports the
    // stateful phase creates finish and their downloads answer 200 and 304 too. It talks to
    // PostgreSQL through a fault proxy that delays every chunk by [`WORKER_DB_LATENCY_MS`]:
    // otherwise an export is done some 20 ms after its POST, before any `DELETE` of it, and
    // the cancel (then the `GET` of the cancelled job) is never reached, only 404 and 409.
    let (_worker_proxy, worker_db_url) = slowed(&db_url)?;
    let worker_log_path = work.join("worker.log");
    let worker_log = File::create(&worker_log_path)
        .with_context(|| format!("creating {}", worker_log_path.display()))?;
    let worker_port = smartbeak_test_support::free_port()?;
    let mut worker = ChildGuard(
        Command::new(bin.join("smartbeak-domain-export"))
            .arg("worker")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", &worker_db_url)
            .env("DB_RUN_MIGRATIONS", "false")
            .env("EXPORT_DIR", &export_dir)
            .env("EXPORT_ADMIN_ADDR", format!("127.0.0.1:{worker_port}"))
            .env("EXPORT_POLL_MAX_MS", "200")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(worker_log.try_clone()?)
            .stderr(worker_log)
            .spawn()
            .context("spawning smartbeak-domain-export worker")?,
    );
    wait_for_ready(
        &mut worker.0,
        worker_port,
        Duration::from_secs(30),
        &worker_log_path,
    )?;

    let fuzz_dir = sh.current_dir().join("apps/api/fuzz");
    let config = fuzz_dir.join("schemathesis.toml");
    let hooks = fuzz_dir.join("hooks.py");
    let url = format!("http://127.0.0.1:{port}/openapi.json");
    eprintln!(
        "xtask: fuzz: schemathesis {SCHEMATHESIS_VERSION} against {url} (at most {} s)",
        timeout.as_secs()
    );
    let started = Instant::now();
    // The key goes through the environment (the config reads `${SMARTBEAK_FUZZ_KEY}`),
    // never on a command line.
    let mut fuzzer = ChildGuard(
        Command::new(&schemathesis)
            .current_dir(&work)
            .env("SMARTBEAK_FUZZ_KEY", &key)
            .env("SCHEMATHESIS_HOOKS", &hooks)
            .arg("--config-file")
            .arg(&config)
            .args(["run", &url])
            .spawn()
            .context("running schemathesis")?,
    );
    let status = wait_with_deadline(&mut fuzzer.0, started + timeout)?;
    let logs = format!(
        "the api's log is {}, the worker's {}",
        log_path.display(),
        worker_log_path.display()
    );
    let Some(status) = status else {
        bail!(
            "schema fuzzing exceeded {} s (SMARTBEAK_FUZZ_TIMEOUT_SECS) and was killed; {logs}",
            timeout.as_secs()
        );
    };
    eprintln!(
        "xtask: fuzz: schemathesis finished in {:.0} s ({status}); {logs}",
        started.elapsed().as_secs_f64()
    );
    if let Some(why) = interruption(status) {
        return Err(Interrupted(format!("schemathesis {why}")).into());
    }
    Ok(status.success())
}

/// How long the fuzz run's export worker waits for each chunk to and from PostgreSQL: an
/// export takes a few hundred milliseconds, long enough for the stateful phase to cancel one
/// it has just created, short enough that later downloads find most of them done.
const WORKER_DB_LATENCY_MS: u64 = 25;

/// A fault proxy in front of the PostgreSQL of `db_url` delaying every chunk by
/// [`WORKER_DB_LATENCY_MS`], and `db_url` through it; `db_url` itself (and no proxy) when
/// the server is not on a loopback address, which the proxy cannot reach.
fn slowed(db_url: &str) -> Result<(Option<smartbeak_test_support::TcpForwarder>, String)> {
    let mut url = url::Url::parse(db_url).context("parsing the fuzz database's URL")?;
    let target = url.socket_addrs(|| Some(5432)).ok().and_then(|addrs| {
        // `localhost` may resolve to `[::1]` first while the server listens on
        // 127.0.0.1 only: the first loopback address that accepts a connection.
        addrs.into_iter().find(|a| {
            a.ip().is_loopback()
                && std::net::TcpStream::connect_timeout(a, Duration::from_secs(1)).is_ok()
        })
    });
    let Some(target) = target else {
        eprintln!("xtask: fuzz: PostgreSQL is not on loopback, the export worker is not slowed");
        return Ok((None, db_url.to_owned()));
    };
    let proxy = smartbeak_test_support::TcpForwarder::start(target)?;
    proxy.set_fault(smartbeak_test_support::Fault::Latency(WORKER_DB_LATENCY_MS));
    url.set_host(Some("127.0.0.1"))
        .context("pointing the worker's URL at the proxy")?;
    url.set_port(Some(proxy.port()))
        .map_err(|()| anyhow::anyhow!("pointing the worker's URL at the proxy"))?;
    Ok((Some(proxy), url.into()))
}

/// `<pid>_<ms since the epoch>`: names this run's database, work dir and limiter keys.
fn run_stamp() -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{}_{millis}", std::process::id())
}

/// `SMARTBEAK_FUZZ_TIMEOUT_SECS`, else [`DEFAULT_TIMEOUT_SECS`].
fn fuzz_timeout() -> Result<Duration> {
    match std::env::var("SMARTBEAK_FUZZ_TIMEOUT_SECS") {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
            _ => {
                bail!("SMARTBEAK_FUZZ_TIMEOUT_SECS must be a positive number of seconds, not {v:?}")
            }
        },
        Err(_) => Ok(Duration::from_secs(DEFAULT_TIMEOUT_SECS)),
    }
}

/// Waits for `child` until `deadline`; `None` (after killing it) when the deadline passed.
/// Ctrl-C on xtask itself also ends the wait: the child is killed, and that is an
/// interruption.
fn wait_with_deadline(child: &mut Child, deadline: Instant) -> Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait().context("waiting for schemathesis")? {
            return Ok(Some(status));
        }
        if crate::INTERRUPTED.load(Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Interrupted("Ctrl-C".to_owned()).into());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Why `status` means the run was interrupted rather than finished: killed by a signal
/// (no exit code) or exit code 130 (what Python exits with on SIGINT).
fn interruption(status: ExitStatus) -> Option<String> {
    match status.code() {
        None => Some(format!("was stopped by a signal ({status})")),
        Some(130) => Some("was interrupted (exit code 130)".to_owned()),
        Some(_) => None,
    }
}

/// The last non-empty line of a command's stderr, or a note that it printed nothing.
fn last_line(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map_or_else(|| format!("{} and no output", output.status), str::to_owned)
}

/// Runs an admin command of the api binary; its stdout.
fn admin(bin: &Path, db_url: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(bin.join("smartbeak-api"))
        .args(args)
        .env("DATABASE_URL", db_url)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running smartbeak-api {}", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "smartbeak-api {} failed: {}",
            args.join(" "),
            last_line(&output)
        );
    }
    String::from_utf8(output.stdout).context("smartbeak-api printed something other than UTF-8")
}

/// The string value of `"name":"..."` in the one-line JSON the admin commands print (no
/// escapes occur in ids and keys).
fn json_field(json: &str, name: &str) -> Option<String> {
    let start = json.find(&format!("\"{name}\":\""))? + name.len() + 4;
    let len = json[start..].find('"')?;
    Some(json[start..start + len].to_owned())
}

/// Polls until the api listens on `port`; fails early when it exits.
fn wait_for_port(api: &mut Child, port: u16, bound: Duration, log: &Path) -> Result<()> {
    wait_until(api, "smartbeak-api", bound, log, || {
        smartbeak_test_support::port_answers("127.0.0.1", port)
    })
    .with_context(|| format!("smartbeak-api listening on port {port}"))
}

/// Waits (at most `bound`) until the export worker's `/readyz` on `port` answers 200: a
/// worker that cannot reach PostgreSQL (through its proxy) fails the step instead of leaving
/// the exports unfinished and the cancels and downloads untested.
fn wait_for_ready(worker: &mut Child, port: u16, bound: Duration, log: &Path) -> Result<()> {
    wait_until(worker, "the export worker", bound, log, || {
        http_status_ok(port, "/readyz")
    })
    .with_context(|| format!("the export worker ready on port {port}"))
}

/// Polls `ready` every 50 ms until it holds, failing when `child` exits first or `bound`
/// passes.
fn wait_until(
    child: &mut Child,
    name: &str,
    bound: Duration,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + bound;
    while !ready() {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {name}"))?
        {
            bail!("{name} exited ({status}); see {}", log.display());
        }
        if Instant::now() >= deadline {
            bail!(
                "{name} was not there within {bound:?}; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Whether `GET path` on `127.0.0.1:port` answers 200 (one short-lived connection).
fn http_status_ok(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

/// Kills a child (the api, the worker, schemathesis) when dropped, on failure too.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// FNV-1a, 64 bits: names the venv after the requirements it was built from.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The `schemathesis` executable of the virtualenv under `target`, installed if missing.
fn install_schemathesis(sh: &Shell, target: &Path) -> Result<PathBuf> {
    let requirements = sh.current_dir().join(REQUIREMENTS);
    let pinned = std::fs::read(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    let venv = target.join(format!("schemathesis-{:016x}", fnv1a(&pinned)));
    let exe = venv.join("bin").join("schemathesis");
    // Written after pip succeeded: an interrupted install is redone, not used.
    let marker = venv.join(".installed");
    if exe.is_file() && marker.is_file() {
        return Ok(exe);
    }
    let python = "python3";
    if cmd!(sh, "{python} --version")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_err()
    {
        bail!(
            "the schema fuzzing step needs Python 3 with venv and pip: install `python3` and \
             `python3-venv` (Debian/Ubuntu: apt-get install python3 python3-venv)"
        );
    }
    eprintln!(
        "xtask: fuzz: installing {} (schemathesis {SCHEMATHESIS_VERSION}) into {}",
        requirements.display(),
        venv.display()
    );
    let _ = std::fs::remove_dir_all(&venv);
    if cmd!(sh, "{python} -m venv {venv}").quiet().run().is_err() {
        bail!(
            "`python3 -m venv` failed: install `python3-venv` (Debian/Ubuntu: apt-get install \
             python3-venv)"
        );
    }
    // `python -m pip`, not `bin/pip`: a venv copied from elsewhere has stale shebangs.
    let venv_python = venv.join("bin").join("python");
    // Every package pinned, none resolved: --no-deps.
    if cmd!(
        sh,
        "{venv_python} -m pip install --quiet --disable-pip-version-check --timeout 20 --retries 2 --no-deps -r {requirements}"
    )
    .run()
    .is_err()
    {
        if crate::INTERRUPTED.load(Ordering::SeqCst) {
            return Err(Interrupted("pip install".to_owned()).into());
        }
        bail!(
            "pip install -r {} failed (PyPI unreachable? set PIP_INDEX_URL or PIP_FIND_LINKS, or \
             install that file into {} yourself and create {})",
            requirements.display(),
            venv.display(),
            marker.display()
        );
    }
    if !exe.is_file() {
        bail!(
            "pip installed schemathesis but {} is missing",
            exe.display()
        );
    }
    std::fs::write(&marker, &pinned).with_context(|| format!("writing {}", marker.display()))?;
    Ok(exe)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn fields_of_the_admin_output() {
        let line = r#"{"id":"2b8a","org_id":"o1","prefix":"sbk_12","key":"sbk_ff"}"#;
        assert_eq!(json_field(line, "id").as_deref(), Some("2b8a"));
        assert_eq!(json_field(line, "key").as_deref(), Some("sbk_ff"));
        assert_eq!(json_field(line, "missing"), None);
    }

    #[test]
    fn the_requirements_pin_the_schemathesis_version_and_everything_else() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(REQUIREMENTS);
        let text = std::fs::read_to_string(&path).unwrap();
        let pins: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        assert!(pins.contains(&format!("schemathesis=={SCHEMATHESIS_VERSION}").as_str()));
        for pin in &pins {
            assert!(pin.contains("=="), "{pin} is not pinned to one version");
        }
        assert!(pins.iter().any(|p| p.starts_with("hypothesis==")));
    }

    #[test]
    fn a_signal_or_exit_code_130_is_an_interruption() {
        use std::os::unix::process::ExitStatusExt;
        // Raw wait statuses: a signal number in the low bits, an exit code shifted by 8.
        assert!(interruption(ExitStatus::from_raw(2)).is_some());
        assert!(interruption(ExitStatus::from_raw(130 << 8)).is_some());
        assert!(interruption(ExitStatus::from_raw(1 << 8)).is_none());
        assert!(interruption(ExitStatus::from_raw(0)).is_none());
    }

    #[test]
    fn the_deadline_kills_a_child_that_runs_too_long() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let status = wait_with_deadline(&mut child, Instant::now()).unwrap();
        assert!(status.is_none());
        assert!(
            child.try_wait().unwrap().is_some(),
            "the child was not reaped"
        );
    }

    #[test]
    fn every_operations_entry_names_one_operation_by_include_name_alone() {
        // Schemathesis ORs the `include-*` keys of an entry (each is a filter of its own):
        // `include-path` with `include-method` would reach every operation of that method.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../apps/api/fuzz/schemathesis.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut entries: Vec<Vec<&str>> = Vec::new();
        let mut in_entry = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                in_entry = line == "[[operations]]";
                if in_entry {
                    entries.push(Vec::new());
                }
            } else if in_entry && (line.starts_with("include-") || line.starts_with("exclude-")) {
                entries.last_mut().unwrap().push(line);
            }
        }
        let names: Vec<&str> = entries
            .iter()
            .map(|filters| {
                assert_eq!(filters.len(), 1, "one filter per entry: {filters:?}");
                let name = filters[0].strip_prefix("include-name = ");
                name.unwrap_or_else(|| panic!("not an include-name: {}", filters[0]))
            })
            .collect();
        assert_eq!(
            names,
            [
                r#""GET /v1/exports/{id}""#,
                r#""GET /openapi.json""#,
                r#""POST /v1/domains/{id}/exports""#,
                r#""POST /v1/domains/{id}/metrics""#,
            ]
        );
    }

    #[test]
    fn the_venv_name_follows_the_requirements() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv1a(b"a==1\n"), fnv1a(b"a==2\n"));
    }
}
