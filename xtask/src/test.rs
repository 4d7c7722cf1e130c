//! `cargo xtask test`: exactly what CI runs.
//!
//! Services (found or started), a fresh database for the run with migrations applied, then
//! `cargo fmt --check`, clippy with `-D warnings`, rustdoc with `-D warnings`, the doctests,
//! the binaries, schema fuzzing of the api with schemathesis (`crate::fuzz`), the quick chaos
//! scenarios (`crate::chaos`, on servers of their own), and the whole
//! test suite (cargo-nextest when installed, else `cargo test`); a failed fuzzing run fails
//! the task, after the tests ran; an interrupted one (Ctrl-C) stops it there. The database is dropped and throwaway servers stopped
//! afterwards, on failure too. The output ends with the test runner's own summary line.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use xshell::{Shell, cmd};

use smartbeak_database::SecretUrl;

use crate::services::{Services, psql, psql_read};

pub(crate) struct Test {
    /// Extra arguments for the test runner (after `--`).
    runner_args: Vec<String>,
}

impl Test {
    pub(crate) fn parse(args: &[String]) -> Result<Self> {
        let runner_args = match args.iter().position(|a| a == "--") {
            Some(i) => args[i + 1..].to_vec(),
            None if args.is_empty() => Vec::new(),
            None => anyhow::bail!(
                "unexpected arguments {args:?}; pass test runner arguments after `--`"
            ),
        };
        Ok(Self { runner_args })
    }

    /// Runs everything; the exit code is the test runner's.
    pub(crate) fn run(&self, sh: &Shell) -> Result<ExitCode> {
        let services = Services::find_or_start()?;
        let database = FreshDatabase::create(&services)?;
        // Tests name their own databases `sb_test_<run>_<uuid>` (TestDatabase), so whatever a
        // failed or killed test left behind is dropped at the end of the run.
        let run_id = run_id();
        let _env = [
            sh.push_env("DATABASE_URL", database.url.expose()),
            sh.push_env("REDIS_URL", &services.redis_url),
            sh.push_env("SMARTBEAK_TEST_RUN", &run_id),
        ];
        eprintln!(
            "xtask: database {} on {}",
            database.name, services.postgres_url
        );
        // `--bin` without `-p` resolves features for the whole workspace, like every other
        // step, so this build is the one `cargo build --workspace --bins` reuses.
        cmd!(sh, "cargo run --quiet --bin smartbeak-migrate")
            .run()
            .context("migrations failed")?;

        eprintln!("xtask: cargo fmt --check");
        cmd!(sh, "cargo fmt --all -- --check")
            .run()
            .context("cargo fmt --check found unformatted code (run `cargo fmt --all`)")?;
        eprintln!("xtask: cargo clippy");
        cmd!(
            sh,
            "cargo clippy --workspace --all-targets --quiet -- -D warnings"
        )
        .run()
        .context("clippy failed")?;
        eprintln!("xtask: cargo doc");
        {
            let _doc = sh.push_env("RUSTDOCFLAGS", "-D warnings");
            cmd!(sh, "cargo doc --workspace --no-deps --quiet")
                .run()
                .context("rustdoc failed")?;
        }
        let nextest = nextest_installed(sh);
        if nextest {
            // nextest does not run doctests; `cargo test` below would.
            eprintln!("xtask: doctests");
            cmd!(sh, "cargo test --workspace --doc --quiet")
                .run()
                .context("doctests failed")?;
        }

        // The black-box tests start the real binaries; build them here, with the command the
        // tests' own harness uses, so that its build is a no-op.
        eprintln!("xtask: cargo build --workspace --bins");
        cmd!(sh, "cargo build --workspace --bins --quiet")
            .run()
            .context("building the binaries failed")?;

        eprintln!("xtask: promtool check rules / test rules (deploy/prometheus)");
        promtool(sh)?;

        // Before the tests, so that the runner's summary stays the last line of the output.
        eprintln!("xtask: schema fuzzing (schemathesis)");
        let fuzz_ok = match crate::fuzz::run_fuzz(sh, &services) {
            Ok(ok) => ok,
            // Ctrl-C: stop here (the guards drop the database and the servers).
            Err(e) if e.is::<crate::fuzz::Interrupted>() => {
                return Err(e.context("schema fuzzing"));
            }
            Err(e) => {
                eprintln!("xtask: error: schema fuzzing: {e:#}");
                false
            }
        };
        if !fuzz_ok {
            eprintln!(
                "xtask: schema fuzzing FAILED (schemathesis' report is above); running the tests anyway"
            );
        }

        // Its own throwaway servers and processes: the quick chaos set (scenarios 1, 3, 4, 8, 9).
        eprintln!("xtask: chaos (quick)");
        let chaos_ok = match crate::chaos::Chaos::quick().run_built(sh) {
            Ok(code) => code == ExitCode::SUCCESS,
            Err(e) if crate::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) => {
                return Err(e.context("chaos"));
            }
            Err(e) => {
                eprintln!("xtask: error: chaos: {e:#}");
                false
            }
        };
        if !chaos_ok {
            eprintln!("xtask: chaos FAILED (its lines are above); running the tests anyway");
        }

        let args = &self.runner_args;
        let result = if nextest {
            cmd!(sh, "cargo nextest run --workspace --no-fail-fast {args...}").run()
        } else {
            cmd!(sh, "cargo test --workspace --no-fail-fast {args...}").run()
        };
        let result = if fuzz_ok && chaos_ok {
            result.map_err(|_| ())
        } else {
            Err(())
        };
        if !services.owns_postgres() {
            drop_test_databases(&services.postgres_url, &run_id);
        }
        drop(database);
        drop(services);
        // The runner already printed its summary and failures; add nothing after it.
        Ok(if result.is_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}

/// A short id for this run, of `[0-9_]` only (it goes into database names).
fn run_id() -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() % 1_000_000_000)
        .unwrap_or(0);
    format!("{}_{millis}", std::process::id())
}

/// Drops the databases the tests of run `run_id` left behind (`sb_test_<run>_*`).
fn drop_test_databases(admin_url: &SecretUrl, run_id: &str) {
    let prefix = format!("sb_test_{run_id}_");
    // Exactly `<prefix><32 hex>`: a prefix match alone would also catch run `1_2` when
    // dropping run `1`.
    let list =
        format!("SELECT datname FROM pg_database WHERE datname ~ '^{prefix}[0-9a-f]{{32}}$'");
    let names = match psql_read(admin_url, &list) {
        Ok(names) => names,
        Err(e) => {
            eprintln!("xtask: warning: could not list the run's test databases: {e:#}");
            return;
        }
    };
    for name in names
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(&prefix))
    {
        let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
        if let Err(e) = psql(admin_url, &sql) {
            eprintln!("xtask: warning: could not drop {name}: {e:#}");
        }
    }
}

fn nextest_installed(sh: &Shell) -> bool {
    cmd!(sh, "cargo nextest --version")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_ok()
}

/// A database created for one run and dropped when this guard drops.
pub(crate) struct FreshDatabase {
    /// `None` when the server is a throwaway one: it is deleted whole, nothing to drop.
    admin_url: Option<SecretUrl>,
    pub(crate) name: String,
    pub(crate) url: SecretUrl,
}

impl FreshDatabase {
    /// A database with a name unique to this run.
    pub(crate) fn create(services: &Services) -> Result<Self> {
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        Self::named(
            services,
            &format!("smartbeak_ci_{}_{stamp}", std::process::id()),
        )
    }

    /// The database `name`, dropped first if it exists.
    pub(crate) fn named(services: &Services, name: &str) -> Result<Self> {
        let admin_url = services.postgres_url.clone();
        psql(
            &admin_url,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        )?;
        psql(&admin_url, &format!("CREATE DATABASE {name}"))?;
        Ok(Self {
            admin_url: (!services.owns_postgres()).then_some(admin_url),
            url: services.database_url(name),
            name: name.to_owned(),
        })
    }
}

impl Drop for FreshDatabase {
    fn drop(&mut self) {
        let Some(admin_url) = &self.admin_url else {
            return;
        };
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = psql(admin_url, &sql) {
            eprintln!(
                "xtask: warning: could not drop database {}: {e:#}",
                self.name
            );
        }
    }
}

/// `promtool check rules` and `promtool test rules` on `deploy/prometheus`; promtool comes
/// from Debian's `prometheus` package, installed with apt-get when missing. The paths are
/// relative to `sh`'s directory, the workspace root (`cargo xtask promtool` runs only this).
pub(crate) fn promtool(sh: &Shell) -> Result<()> {
    if cmd!(sh, "promtool --version")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_err()
    {
        eprintln!("xtask: promtool missing, trying `apt-get install -y prometheus`");
        let installed = cmd!(sh, "apt-get install -y --no-install-recommends prometheus")
            .quiet()
            .ignore_stdout()
            .run()
            .is_ok();
        if !installed {
            anyhow::bail!(
                "promtool is not installed and apt-get could not install it: install Debian's \
                 `prometheus` package (or put promtool on PATH) to check deploy/prometheus"
            );
        }
    }
    let _dir = sh.push_dir("deploy/prometheus");
    cmd!(sh, "promtool check rules rules.yaml")
        .run()
        .context("promtool check rules failed")?;
    cmd!(sh, "promtool test rules rules.test.yaml")
        .run()
        .context("promtool test rules failed")?;
    Ok(())
}
