//! `cargo xtask bench [--quick] [--only SECTION,...] [--write] [--render]`: every headline
//! claim measured beside its anchor in one run.
//!
//! Builds the release binaries and examples, starts a throwaway PostgreSQL and Redis (the
//! test-support guards, never the machine's shared servers), runs each section, and writes
//! the figures three ways: `target/bench/results.json` (the [`model::Report`]),
//! `BENCHMARKS.md` at the workspace root (regenerated whole; nothing on it is typed by
//! hand) and PNG charts under `docs/bench/`. `--quick` runs every section at smaller sizes
//! and writes only `target/bench` (the page is for full runs of every section; `--write`
//! writes it anyway). `--render` runs nothing: it redraws the page and the charts from
//! `target/bench/results.json`. Every section names the exact commands it ran, so any
//! figure can be reproduced alone.

mod ab;
mod api;
mod churn;
mod export;
mod memory;
mod micro;
pub(crate) mod model;
mod report;
mod scheduler;

use std::cell::RefCell;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use smartbeak_test_support::{PostgresServer, RedisServer};
use xshell::{Shell, cmd};

use model::{Report, Section};

/// The sections, in the order they run (and appear on the page).
pub(crate) const SECTIONS: &[&str] = &[
    "breaker",
    "registry-memory",
    "singleflight",
    "bounded",
    "churn",
    "api",
    "api-ab",
    "export",
    "scheduler",
];

pub(crate) struct Bench {
    quick: bool,
    only: Vec<String>,
    /// Write BENCHMARKS.md and the charts even for `--quick` or `--only`.
    write: bool,
    /// Only redraw the page and the charts from `target/bench/results.json`.
    render: bool,
}

/// What every section gets.
pub(crate) struct Ctx<'a> {
    pub(crate) sh: &'a Shell,
    /// `--quick`: smaller sizes, shorter runs.
    pub(crate) quick: bool,
    /// The cargo target directory (`$CARGO_TARGET_DIR` or `target`).
    pub(crate) target: PathBuf,
    /// `<target>/release`: the binaries and examples, built before any section runs.
    pub(crate) release: PathBuf,
    /// `<target>/bench`: results.json, logs, scratch files.
    pub(crate) out: PathBuf,
    /// The throwaway PostgreSQL (trust auth; `postgres` database; admin URL `pg.url()`).
    pub(crate) pg: &'a PostgresServer,
    /// Every command [`run`] started, in order: a section that fails still shows what it
    /// ran.
    pub(crate) ran: RefCell<Vec<String>>,
    /// The throwaway Redis.
    pub(crate) redis: &'a RedisServer,
}

impl Bench {
    /// `--quick` and `--only a,b` (ids from [`SECTIONS`]).
    pub(crate) fn parse(args: &[String]) -> Result<Self> {
        let mut quick = false;
        let mut write = false;
        let mut render = false;
        let mut only = Vec::new();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => quick = true,
                "--write" => write = true,
                "--render" => render = true,
                "--only" => {
                    let list = args.next().context("--only needs a list of sections")?;
                    for id in list.split(',').filter(|s| !s.is_empty()) {
                        if !SECTIONS.contains(&id) {
                            bail!("--only {id:?}: the sections are {}", SECTIONS.join(", "));
                        }
                        only.push(id.to_owned());
                    }
                }
                other => bail!(
                    "unexpected argument {other:?}; usage: bench [--quick] [--only {}] [--write] \
                     [--render]",
                    SECTIONS.join(",")
                ),
            }
        }
        Ok(Self {
            quick,
            only,
            write,
            render,
        })
    }

    pub(crate) fn run(&self, sh: &Shell) -> Result<ExitCode> {
        if self.render {
            return render(sh);
        }
        let started = Instant::now();
        let started_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let mut machine = report::machine()?;
        let commit = commit(sh)?;
        println!(
            "bench: {} run at {commit} on {} cores, load average {:?}",
            if self.quick { "quick" } else { "full" },
            machine.cores,
            machine.load_start
        );
        let target = crate::fuzz::target_dir(sh);
        let out = target.join("bench");
        std::fs::create_dir_all(out.join("logs"))
            .with_context(|| format!("creating {}", out.display()))?;
        build(sh)?;
        // The load the sections start under (the build is over).
        machine.load_start = report::load_average()?;
        let pg = PostgresServer::start().context("starting the throwaway PostgreSQL")?;
        let redis = RedisServer::start().context("starting the throwaway Redis")?;
        let ctx = Ctx {
            sh,
            quick: self.quick,
            release: target.join("release"),
            target,
            out,
            pg: &pg,
            ran: RefCell::new(Vec::new()),
            redis: &redis,
        };
        let mut sections = Vec::new();
        for &id in SECTIONS {
            if !self.only.is_empty() && !self.only.iter().any(|o| o == id) {
                continue;
            }
            if crate::INTERRUPTED.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            println!("\n== bench: {id} ==");
            let section_started = Instant::now();
            let ran_before = ctx.ran.borrow().len();
            let result = match id {
                "breaker" => micro::breaker(&ctx),
                "registry-memory" => memory::registry(&ctx),
                "singleflight" => micro::singleflight(&ctx),
                "bounded" => micro::bounded(&ctx),
                "churn" => churn::churn(&ctx),
                "api" => api::api(&ctx),
                "api-ab" => ab::ab(&ctx),
                "export" => export::export(&ctx),
                "scheduler" => scheduler::scheduler(&ctx),
                _ => unreachable!("SECTIONS lists only the ids above"),
            };
            let section = result.unwrap_or_else(|e| {
                println!("bench: {id} failed: {e:#}");
                let mut s = Section::new(id, id);
                s.commands = ctx.ran.borrow()[ran_before..].to_vec();
                s.error = Some(format!("{e:#}"));
                s
            });
            println!(
                "bench: {id} done in {:.0} s",
                section_started.elapsed().as_secs_f64()
            );
            sections.push(section);
        }
        machine.load_end = report::load_average()?;
        let report = Report {
            started: started_at,
            commit,
            quick: self.quick,
            machine,
            sections,
            duration_secs: started.elapsed().as_secs_f64(),
        };
        let page = self.write || (!self.quick && self.only.is_empty());
        let written = report::write(&ctx.out, &sh.current_dir(), &report, page)?;
        print_written(&written, report.duration_secs);
        let failed = report.sections.iter().any(|s| s.error.is_some());
        Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }
}

/// `--render`: the page and the charts again from `target/bench/results.json`.
fn render(sh: &Shell) -> Result<ExitCode> {
    let out = crate::fuzz::target_dir(sh).join("bench");
    let report: Report = read_json(&out.join("results.json"))?;
    let written = report::write(&out, &sh.current_dir(), &report, true)?;
    print_written(&written, report.duration_secs);
    Ok(ExitCode::SUCCESS)
}

fn print_written(written: &report::Written, duration_secs: f64) {
    println!(
        "\nbench: {} (run took {duration_secs:.0} s)",
        written.json.display()
    );
    match &written.page {
        Some((page, charts)) => {
            println!("bench: {}", page.display());
            for chart in charts {
                println!("bench: {}", chart.display());
            }
        }
        None => println!(
            "bench: BENCHMARKS.md not rewritten (a --quick or --only run; --write forces it)"
        ),
    }
}

/// The release binaries and examples every section runs, and the criterion benches.
fn build(sh: &Shell) -> Result<()> {
    let started = Instant::now();
    println!("bench: building release binaries and examples");
    cmd!(sh, "cargo build --release --workspace --bins --examples")
        .run()
        .context("building the release binaries and examples")?;
    println!("bench: building the criterion benches");
    // `--profile release --workspace`: the release artifacts just built serve the benches
    // too. Cargo's own `bench` profile, or `-p` (which resolves features for fewer
    // packages), would compile every dependency once more.
    cmd!(
        sh,
        "cargo bench --profile release --workspace --benches --no-run"
    )
    .run()
    .context("building the criterion benches")?;
    println!("bench: built in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `git rev-parse --short HEAD`, with `-dirty` when the tree has changes.
fn commit(sh: &Shell) -> Result<String> {
    let head = cmd!(sh, "git rev-parse --short HEAD")
        .quiet()
        .read()
        .context("git rev-parse --short HEAD (the bench runs in a git checkout)")?;
    let status = cmd!(sh, "git status --porcelain --untracked-files=no")
        .quiet()
        .read()
        .context("git status")?;
    Ok(if status.trim().is_empty() {
        head
    } else {
        format!("{head}-dirty")
    })
}

/// True when `program` is on `PATH`.
pub(crate) fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Makes sure `program` is on `PATH`: when it is not and this runs as root on a system with
/// apt-get, installs `package` (`apt-get install -y`, after `apt-get update` if the first
/// try fails: a fresh image has no package lists). Returns whether it is there now, and
/// pushes a sentence to `notes` when it installed it.
pub(crate) fn ensure_tool(program: &str, package: &str, notes: &mut Vec<String>) -> bool {
    if on_path(program) {
        return true;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0");
    if !root || !on_path("apt-get") {
        return false;
    }
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", package])
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    eprintln!("xtask: bench: {program} not found; running `apt-get install -y {package}`");
    let ok = install()
        || (Command::new("apt-get")
            .arg("update")
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            && install());
    if ok && on_path(program) {
        notes.push(format!(
            "{program} was not installed; the run installed it (`apt-get install -y {package}`)."
        ));
        return true;
    }
    false
}

/// Fails with what to install when `program` is not on `PATH` (or, with a `/`, not there).
pub(crate) fn require(program: &str, what_for: &str, install: &str) -> Result<()> {
    let found = if program.contains('/') {
        Path::new(program).is_file()
    } else {
        on_path(program)
    };
    if !found {
        bail!("{what_for} needs {program}, which is not installed ({install})");
    }
    Ok(())
}

/// Variables whose values are secrets: shown as `<redacted>`.
const SECRET_ENV: &[&str] = &["BENCH_KEY", "PGPASSWORD"];

/// Records a command a section ran itself (not through [`run`]) in `ctx.ran`, as
/// [`display`] shows it with every `127.0.0.1:PORT` as `127.0.0.1:<port>` (each run gets a
/// fresh port), once: the rounds of a section repeat the same commands.
pub(crate) fn record(ctx: &Ctx<'_>, command: &Command) {
    let text = port_placeholders(&display(ctx, command));
    let mut ran = ctx.ran.borrow_mut();
    if !ran.contains(&text) {
        println!("bench: $ {text}");
        ran.push(text);
    }
}

/// `shown` with the port of every `127.0.0.1:PORT` as `<port>`.
fn port_placeholders(shown: &str) -> String {
    let mut text = String::with_capacity(shown.len());
    let mut rest = shown;
    while let Some(at) = rest.find("127.0.0.1:") {
        let (head, tail) = rest.split_at(at + "127.0.0.1:".len());
        text.push_str(head);
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 {
            text.push_str("<port>");
        }
        rest = &tail[digits..];
    }
    text.push_str(rest);
    text
}

/// A command as a reader would type it: environment (URLs redacted: a password never
/// reaches the page), program relative to the workspace, arguments.
pub(crate) fn display(ctx: &Ctx<'_>, command: &Command) -> String {
    display_in(&ctx.sh.current_dir(), &ctx.target, command)
}

/// [`display`] for a workspace at `root` and a target directory `target`.
fn display_in(root: &Path, target: &Path, command: &Command) -> String {
    let shorten = |text: &str| -> String {
        let target = target.to_string_lossy();
        let text = text.replace(target.as_ref(), "$CARGO_TARGET_DIR");
        text.replace(&format!("{}/", root.display()), "")
    };
    let quote = |text: String| -> String {
        if text.is_empty()
            || text
                .chars()
                .any(|c| !(c.is_ascii_alphanumeric() || "-_./:=,$@%+".contains(c)))
        {
            format!("'{}'", text.replace('\'', r"'\''"))
        } else {
            text
        }
    };
    let mut parts = Vec::new();
    for (key, value) in command.get_envs() {
        let Some(value) = value else { continue };
        let (key, value) = (key.to_string_lossy(), value.to_string_lossy());
        if key == "PATH" {
            // Passed through after `env_clear`, not a setting of the run.
            continue;
        }
        let value = if SECRET_ENV.contains(&key.as_ref()) {
            "<redacted>".to_owned()
        } else if key.ends_with("REDIS_URL") {
            crate::services::redact_redis(&value)
        } else if key.ends_with("_URL") {
            smartbeak_database::SecretUrl::parse("url", &value)
                .map(|url| url.redacted())
                .unwrap_or_else(|_| "<url>".to_owned())
        } else {
            shorten(&value)
        };
        parts.push(format!("{key}={}", quote(value)));
    }
    parts.push(quote(shorten(&command.get_program().to_string_lossy())));
    for arg in command.get_args() {
        parts.push(quote(shorten(&arg.to_string_lossy())));
    }
    parts.join(" ")
}

/// How long one command of a section may run before [`run`] kills it (the longest, the api
/// A/B, includes the baseline's cold release build: twenty-odd minutes on two cores).
const RUN_BOUND: std::time::Duration = std::time::Duration::from_secs(60 * 60);

/// Runs `command` from the workspace root, its output (stdout and stderr) into
/// `<out>/logs/<log>.log` and onto the terminal line by line (indented), and records it in
/// `section.commands` and `ctx.ran`. Fails with the log's tail when it exits non-zero, and
/// stops its whole process group (and fails) when it runs longer than [`RUN_BOUND`] or the
/// bench is interrupted.
/// Returns the captured stdout.
pub(crate) fn run(
    ctx: &Ctx<'_>,
    section: &mut Section,
    log: &str,
    mut command: Command,
) -> Result<String> {
    let shown = port_placeholders(&display(ctx, &command));
    println!("bench: $ {shown}");
    section.commands.push(shown.clone());
    ctx.ran.borrow_mut().push(shown.clone());
    let log_path = ctx.out.join("logs").join(format!("{log}.log"));
    let log_file = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let log_file = std::sync::Mutex::new(log_file);
    let mut child = command
        .current_dir(ctx.sh.current_dir())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        bail!("{shown}: no pipes to read");
    };
    // Each line to the log and the terminal; stdout also kept for the caller.
    let pump = |pipe: &mut dyn std::io::Read, keep: bool| -> String {
        let mut kept = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(pipe)) {
            let Ok(line) = line else { break };
            println!("    {line}");
            if let Ok(mut file) = log_file.lock() {
                let _ = writeln!(file, "{line}");
            }
            if keep {
                kept.push_str(&line);
                kept.push('\n');
            }
        }
        kept
    };
    let (mut stdout, mut stderr) = (stdout, stderr);
    // The watchdog: the command leads a process group of its own, and the whole group (a
    // script's children, cargo's bench binaries) gets SIGTERM when the command is still
    // running after RUN_BOUND or the bench is interrupted (Ctrl-C reaches only xtask now),
    // then SIGKILL 10 s later if it has not ended. It stands down before the child is
    // reaped, so it can never signal a reused pid.
    let pgid = child.id();
    let (done, stand_down) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        let started = Instant::now();
        let mut termed: Option<Instant> = None;
        loop {
            match stand_down.recv_timeout(std::time::Duration::from_millis(200)) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                _ => return termed.is_some(),
            }
            let interrupted = crate::INTERRUPTED.load(Ordering::SeqCst);
            match termed {
                None if interrupted || started.elapsed() >= RUN_BOUND => {
                    let _ = smartbeak_test_support::signal_group(pgid, "TERM");
                    termed = Some(Instant::now());
                }
                Some(at) if at.elapsed() >= std::time::Duration::from_secs(10) => {
                    let _ = smartbeak_test_support::signal_group(pgid, "KILL");
                }
                _ => {}
            }
        }
    });
    let kept = std::thread::scope(|s| {
        let errors = s.spawn(|| pump(&mut stderr, false));
        let kept = pump(&mut stdout, true);
        let _ = errors.join();
        kept
    });
    let _ = done.send(());
    let stopped = watchdog.join().unwrap_or(false);
    let status = child
        .wait()
        .with_context(|| format!("waiting for {shown}"))?;
    if stopped {
        bail!(
            "{shown} was stopped ({}); log {}",
            if crate::INTERRUPTED.load(Ordering::SeqCst) {
                "interrupted".to_owned()
            } else {
                format!("still running after {} min", RUN_BOUND.as_secs() / 60)
            },
            log_path.display()
        );
    }
    if !status.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        bail!(
            "{shown} failed ({status}); log {}:\n{tail}",
            log_path.display()
        );
    }
    Ok(kept)
}

/// A JSON file a section's command wrote.
pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Criterion's point estimates of one benchmark, nanoseconds per iteration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Estimate {
    pub(crate) mean_ns: f64,
    pub(crate) median_ns: f64,
}

/// Reads `<criterion home>/<group>/<bench>/new/estimates.json`.
pub(crate) fn criterion_estimate(home: &Path, group: &str, bench: &str) -> Result<Estimate> {
    #[derive(Deserialize)]
    struct Point {
        point_estimate: f64,
    }
    #[derive(Deserialize)]
    struct Estimates {
        mean: Point,
        median: Point,
    }
    let path = home.join(group).join(bench).join("new/estimates.json");
    let estimates: Estimates = read_json(&path)?;
    Ok(Estimate {
        mean_ns: estimates.mean.point_estimate,
        median_ns: estimates.median.point_estimate,
    })
}

/// The median of `values` (the mean of the middle two of an even count); NaN when empty.
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::{Command, Path, display_in, median, port_placeholders};

    #[test]
    fn a_command_is_shown_without_its_secrets() {
        let mut command = Command::new("/w/target/release/smartbeak-api");
        command
            .env("PATH", "/usr/bin")
            .env("BENCH_KEY", "sbk_secret")
            .env("PGPASSWORD", "hunter2")
            .env("DATABASE_URL", "postgres://u:hunter2@127.0.0.1:5/db")
            .env("REDIS_URL", "redis://:hunter2@127.0.0.1:6/")
            .env("EXPORT_DIR", "/w/target/bench/x y")
            .arg("--out")
            .arg("/w/docs/bench");
        let shown = display_in(Path::new("/w"), Path::new("/w/target"), &command);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("sbk_secret"), "{shown}");
        assert!(!shown.contains("PATH="), "{shown}");
        assert!(shown.contains("BENCH_KEY='<redacted>'"), "{shown}");
        assert!(
            shown.contains("EXPORT_DIR='$CARGO_TARGET_DIR/bench/x y'"),
            "{shown}"
        );
        assert!(
            shown.ends_with("$CARGO_TARGET_DIR/release/smartbeak-api --out docs/bench"),
            "{shown}"
        );
    }

    #[test]
    fn every_loopback_port_becomes_a_placeholder() {
        assert_eq!(
            port_placeholders(
                "API_BIND=127.0.0.1:40123 wrk http://127.0.0.1:5/v1 postgres://127.0.0.1:/x"
            ),
            "API_BIND=127.0.0.1:<port> wrk http://127.0.0.1:<port>/v1 postgres://127.0.0.1:/x"
        );
        assert_eq!(port_placeholders("no address"), "no address");
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
