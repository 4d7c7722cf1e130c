//! Workspace automation, run as `cargo xtask <task>`:
//!
//! - `test`: what CI runs: services, a fresh database, fmt, clippy, docs, the whole test suite,
//!   then schema fuzzing (`fuzz`);
//! - `fuzz`: schemathesis against the real api (installed into a virtualenv under the target
//!   directory when missing; needs `python3` and `python3-venv`);
//! - `promtool`: only the rules step of `test` (`promtool check rules` and `test rules` on
//!   `deploy/prometheus`, installing Debian's `prometheus` package when promtool is missing);
//! - `chaos [--scenario N] [--quick]`: faults injected into the running system, checked from
//!   outside (`chaos`);
//! - `bench [--quick] [--only SECTION,...]`: every headline claim beside its anchor, written
//!   to `BENCHMARKS.md`, `docs/bench/*.png` and `target/bench/results.json` (`bench`);
//! - `demo`: services, migrations, seed data, and the main job end to end;
//! - `services up|down|status`: throwaway PostgreSQL and Redis for local work.
//!
//! Services come from `DATABASE_URL` when a real login with it succeeds (`psql -w`: an
//! authentication failure, as on a stock Debian cluster with scram auth, counts as "not
//! usable") and from `REDIS_URL` when it answers `PING`; else throwaway servers are started
//! from the machine's binaries (see `smartbeak-test-support`) and stopped at the end, also on
//! failure and on Ctrl-C. xtask says which it chose and why. URLs are shown redacted
//! (`SecretUrl` of `smartbeak-database`), and psql gets passwords through `PGPASSWORD`,
//! never on its command line.

mod bench;
mod chaos;
mod demo;
mod fuzz;
mod limits;
mod services;
mod test;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use xshell::Shell;

/// Set by the Ctrl-C handler: long waits (the schema fuzzing) stop on it.
pub(crate) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  test                      fmt, clippy, docs, the whole test suite and the schema fuzzing
  fuzz                      schemathesis against the real api (needs python3, python3-venv)
  promtool                  only test's step promtool check/test rules on deploy/prometheus
  chaos [--scenario N] [--quick]
                            faults injected into the running system (throwaway servers)
  bench [--quick] [--only SECTION,...]
                            benchmarks beside their anchors -> BENCHMARKS.md
  demo                      seed a database and run the main job end to end
  services up|down|status   throwaway PostgreSQL and Redis for local work
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<ExitCode> {
    let sh = Shell::new()?;
    sh.change_dir(project_root());
    // Ctrl-C reaches every process of the terminal's group: the cargo child stops on its
    // own, and we keep running long enough to drop the servers and the database.
    ctrlc::set_handler(|| {
        INTERRUPTED.store(true, Ordering::SeqCst);
        eprintln!("xtask: interrupted, cleaning up");
    })?;
    match args.first().map(String::as_str) {
        Some("test") => test::Test::parse(&args[1..])?.run(&sh),
        Some("fuzz") => fuzz::Fuzz.run(&sh).map(|ok| {
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }),
        Some("promtool") => test::promtool(&sh).map(|()| ExitCode::SUCCESS),
        Some("chaos") if args[1..].iter().any(|a| a == "--help" || a == "-h") => {
            print!("{}", chaos::USAGE);
            Ok(ExitCode::SUCCESS)
        }
        Some("chaos") => chaos::Chaos::parse(&args[1..])?.run(&sh),
        Some("bench") => bench::Bench::parse(&args[1..])?.run(&sh),
        Some("demo") => demo::Demo.run(&sh).map(|()| ExitCode::SUCCESS),
        Some("services") => services::ServicesTask::parse(&args[1..])?
            .run(&sh)
            .map(|()| ExitCode::SUCCESS),
        Some("help" | "-h" | "--help") | None => {
            eprint!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        Some(other) => anyhow::bail!("unknown task {other:?}\n{USAGE}"),
    }
}

/// The workspace root (the parent of `xtask/`).
fn project_root() -> PathBuf {
    let dir = std::env::var("CARGO_MANIFEST_DIR")
        .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned());
    PathBuf::from(dir)
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}
