//! `cargo xtask bench [--quick] [--only SECTION,...]`: every headline claim measured beside
//! its anchor in one run.
//!
//! Builds the release binaries and examples, starts a throwaway PostgreSQL and Redis (the
//! test-support guards, never the machine's shared servers), runs each section, and writes
//! the figures three ways: `target/bench/results.json` (the [`model::Report`]),
//! `BENCHMARKS.md` at the workspace root (regenerated whole; nothing on it is typed by
//! hand) and PNG charts under `docs/bench/`. `--quick` runs every section at smaller sizes
//! and writes only `target/bench` (the page is for full runs). Every section names the
//! exact commands it ran, so any figure can be reproduced alone.

mod api;
mod churn;
mod export;
mod memory;
mod micro;
pub(crate) mod model;
mod report;
mod scheduler;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use smartbeak_test_support::{PostgresServer, RedisServer};
use xshell::Shell;

use model::{Report, Section};

/// The sections, in the order they run (and appear on the page).
pub(crate) const SECTIONS: &[&str] = &[
    "breaker",
    "registry-memory",
    "singleflight",
    "bounded",
    "churn",
    "api",
    "export",
    "scheduler",
];

pub(crate) struct Bench {
    quick: bool,
    only: Vec<String>,
}

/// What every section gets.
#[allow(dead_code)] // TODO(i15): every field is read once the sections are in
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
    /// The throwaway Redis.
    pub(crate) redis: &'a RedisServer,
}

impl Bench {
    /// `--quick` and `--only a,b` (ids from [`SECTIONS`]).
    pub(crate) fn parse(args: &[String]) -> Result<Self> {
        let mut quick = false;
        let mut only = Vec::new();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => quick = true,
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
                    "unexpected argument {other:?}; usage: bench [--quick] [--only {}]",
                    SECTIONS.join(",")
                ),
            }
        }
        Ok(Self { quick, only })
    }

    pub(crate) fn run(&self, sh: &Shell) -> Result<ExitCode> {
        let started = Instant::now();
        let target = crate::fuzz::target_dir(sh);
        let out = target.join("bench");
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        let pg = PostgresServer::start().context("starting the throwaway PostgreSQL")?;
        let redis = RedisServer::start().context("starting the throwaway Redis")?;
        let ctx = Ctx {
            sh,
            quick: self.quick,
            release: target.join("release"),
            target,
            out,
            pg: &pg,
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
            let result = match id {
                "breaker" => micro::breaker(&ctx),
                "registry-memory" => memory::registry(&ctx),
                "singleflight" => micro::singleflight(&ctx),
                "bounded" => micro::bounded(&ctx),
                "churn" => churn::churn(&ctx),
                "api" => api::api(&ctx),
                "export" => export::export(&ctx),
                "scheduler" => scheduler::scheduler(&ctx),
                _ => unreachable!("SECTIONS lists only the ids above"),
            };
            let section = result.unwrap_or_else(|e| {
                let mut s = Section::new(id, id);
                s.error = Some(format!("{e:#}"));
                s
            });
            sections.push(section);
        }
        let report = Report {
            started: String::new(),
            commit: String::new(),
            quick: self.quick,
            machine: report::machine(sh)?,
            sections,
            duration_secs: started.elapsed().as_secs_f64(),
        };
        report::write(&ctx, &report)?;
        let failed = report.sections.iter().any(|s| s.error.is_some());
        Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }
}
