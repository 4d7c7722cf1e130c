//! The command line: `run` (the default) and `batch <operation>`; every setting is a flag
//! and an environment variable, shown with its default in `--help`. The provider
//! credentials are read from the environment only (never argv), and never shown.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};
use smartbeak_resilience::{BreakerConfig, BreakerPolicy, Policy, RetryPolicy};
use url::Url;

use crate::operations::OperationName;
use crate::operations::keyword_sync::{ProviderConfig, Providers, Secret};
use crate::runner::{Mode, RunOptions};

/// Default items per batch (from the benchmark in docs/bench/HISTORY.md, "Control-plane").
pub const DEFAULT_BATCH_SIZE: usize = 1_000;
/// Default concurrency.
pub const DEFAULT_CONCURRENCY: usize = 4;

/// What `--help` says after the flags: the variables that are not flags (credentials,
/// database, shutdown, logs) with their defaults, and the exit codes.
pub fn after_help() -> String {
    format!(
        "\
Provider credentials come from the environment only, never from flags:
  CP_GSC_API_KEY     bearer credential for CP_GSC_BASE_URL (keyword-sync, adapter gsc) [unset]
  CP_AHREFS_API_KEY  bearer credential for CP_AHREFS_BASE_URL (adapter ahrefs) [unset]
A base URL must not carry credentials (user:password@ is refused).

{}

Exit codes: 0 every item succeeded (or a dry run; `run`: a clean SIGTERM); 1 an item
failed or the run failed (the summary names the batch_runs id), or start-up failed; 2 bad
usage or configuration; 3 another runner holds the operation's lock (nothing was run).
`run` exits with its shutdown report's code.",
        smartbeak_api::startup::DATABASE_AND_SHUTDOWN_HELP
    )
}

/// The longest provider deadline derived from the drain deadline (a provider that has not
/// answered in 15 s is not waited for longer, whatever the drain allows).
pub const MAX_DEFAULT_PROVIDER_DEADLINE: Duration = Duration::from_secs(15);

/// `stale_after` must be at least this many heartbeats: a runner that misses two
/// heartbeats (a slow statement, a GC pause) is not yet taken for dead.
pub const MIN_HEARTBEATS_PER_STALE: u32 = 3;

/// `smartbeak-control-plane`.
#[derive(Debug, Parser)]
#[command(
    name = "smartbeak-control-plane",
    version,
    about = "The SmartBeak control-plane: recurring batch operations, one runner each",
    after_help = after_help()
)]
pub struct Cli {
    /// What to do (default `run`).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The long-running service: every operation on its own interval.
    #[command(after_help = after_help())]
    Run(RunArgs),
    /// One run of one operation now; exit code non-zero when any item failed.
    #[command(after_help = after_help())]
    Batch(BatchArgs),
}

/// Settings shared by `run` and `batch`. `Debug` shows the provider base URLs without
/// any userinfo.
#[derive(Clone, Args)]
pub struct CommonArgs {
    /// Items per batch (1 to 1000).
    #[arg(long, env = "CP_BATCH_SIZE", default_value_t = DEFAULT_BATCH_SIZE,
        value_parser = clap::value_parser!(u16).range(1..=1000).map(usize::from))]
    pub batch_size: usize,
    /// Batches in flight (content-scheduler) or items of a batch in flight (keyword-sync,
    /// export-retention), 1 to 256.
    #[arg(long, env = "CP_CONCURRENCY", default_value_t = DEFAULT_CONCURRENCY,
        value_parser = clap::value_parser!(u16).range(1..=256).map(usize::from))]
    pub concurrency: usize,
    /// This runner's name in batch_runs.runner (default: HOSTNAME:PID).
    #[arg(long, env = "CP_RUNNER")]
    pub runner: Option<String>,
    /// How often a run heartbeats its batch_runs row, in milliseconds.
    #[arg(long, env = "CP_HEARTBEAT_MS", default_value_t = 5_000,
        value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_ms: u64,
    /// A running row whose heartbeat is older than this (ms) is marked abandoned by the
    /// next runner of its operation.
    #[arg(long, env = "CP_STALE_AFTER_MS", default_value_t = 30_000,
        value_parser = clap::value_parser!(u64).range(1..))]
    pub stale_after_ms: u64,
    /// Where export files live (export-retention).
    #[arg(long, env = "EXPORT_DIR", default_value = "./exports")]
    pub export_dir: PathBuf,
    /// Base URL of the gsc keyword provider (keyword-sync; no userinfo: the credential is
    /// CP_GSC_API_KEY). Unset: gsc sources fail as not configured.
    #[arg(long, env = "CP_GSC_BASE_URL", hide_env_values = true, value_parser = BaseUrlParser)]
    pub gsc_base_url: Option<Url>,
    /// Base URL of the ahrefs keyword provider (keyword-sync; no userinfo: the credential
    /// is CP_AHREFS_API_KEY). Unset: ahrefs sources fail as not configured.
    #[arg(long, env = "CP_AHREFS_BASE_URL", hide_env_values = true, value_parser = BaseUrlParser)]
    pub ahrefs_base_url: Option<Url>,
    /// Per-attempt timeout of a provider request, in milliseconds.
    #[arg(long, env = "CP_PROVIDER_ATTEMPT_TIMEOUT_MS", default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(1..))]
    pub provider_attempt_timeout_ms: u64,
    /// Total deadline of a provider request (attempts, waits, body), in milliseconds.
    /// Default: the shutdown drain deadline less its finishing margin, at most 15000
    /// (13666 with the default SHUTDOWN_TIMEOUT_MS, 10333 with SHUTDOWN_TIMEOUT_MS=20000).
    /// A value set must fit that too (checked when keyword-sync runs).
    #[arg(long, env = "CP_PROVIDER_DEADLINE_MS",
        value_parser = clap::value_parser!(u64).range(1..))]
    pub provider_deadline_ms: Option<u64>,
    /// Attempts per provider request, the first included.
    #[arg(long, env = "CP_PROVIDER_MAX_ATTEMPTS", default_value_t = 3,
        value_parser = clap::value_parser!(u32).range(1..=10))]
    pub provider_max_attempts: u32,
    /// How long a provider's breaker stays open after it trips, in milliseconds.
    #[arg(long, env = "CP_PROVIDER_BREAKER_OPEN_MS", default_value_t = 30_000,
        value_parser = clap::value_parser!(u64).range(1..))]
    pub provider_breaker_open_ms: u64,
}

/// `run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Shared settings.
    #[command(flatten)]
    pub common: CommonArgs,
    /// The admin listener (/healthz, /readyz, /metrics); port 0 picks a free one.
    #[arg(long, env = "CP_ADMIN_ADDR", default_value = "127.0.0.1:9466")]
    pub admin_addr: SocketAddr,
    /// Seconds between content-scheduler runs; 0 disables it.
    #[arg(long, env = "CP_CONTENT_SCHEDULER_INTERVAL_SECS", default_value_t = 60)]
    pub content_scheduler_interval_secs: u64,
    /// Seconds between keyword-sync runs; 0 disables it.
    #[arg(long, env = "CP_KEYWORD_SYNC_INTERVAL_SECS", default_value_t = 3_600)]
    pub keyword_sync_interval_secs: u64,
    /// Seconds between export-retention runs; 0 disables it.
    #[arg(
        long,
        env = "CP_EXPORT_RETENTION_INTERVAL_SECS",
        default_value_t = 3_600
    )]
    pub export_retention_interval_secs: u64,
}

impl RunArgs {
    /// The interval of `operation`, `None` when disabled.
    pub fn interval(&self, operation: OperationName) -> Option<Duration> {
        let secs = match operation {
            OperationName::ContentScheduler => self.content_scheduler_interval_secs,
            OperationName::KeywordSync => self.keyword_sync_interval_secs,
            OperationName::ExportRetention => self.export_retention_interval_secs,
        };
        (secs > 0).then(|| Duration::from_secs(secs))
    }
}

/// `batch`.
#[derive(Debug, Clone, Args)]
pub struct BatchArgs {
    /// The operation to run.
    pub operation: OperationName,
    /// Stop after the first batch with failures (its failed indexes are reported; later
    /// batches are not started).
    #[arg(long)]
    pub strict: bool,
    /// Report what would be done; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Shared settings.
    #[command(flatten)]
    pub common: CommonArgs,
}

impl std::fmt::Debug for CommonArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommonArgs")
            .field("batch_size", &self.batch_size)
            .field("concurrency", &self.concurrency)
            .field("runner", &self.runner)
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("stale_after_ms", &self.stale_after_ms)
            .field("export_dir", &self.export_dir)
            .field("gsc_base_url", &self.gsc_base_url.as_ref().map(redacted))
            .field(
                "ahrefs_base_url",
                &self.ahrefs_base_url.as_ref().map(redacted),
            )
            .field(
                "provider_attempt_timeout_ms",
                &self.provider_attempt_timeout_ms,
            )
            .field("provider_deadline_ms", &self.provider_deadline_ms)
            .field("provider_max_attempts", &self.provider_max_attempts)
            .field("provider_breaker_open_ms", &self.provider_breaker_open_ms)
            .finish()
    }
}

/// Parses a provider base URL without repeating the value in its error (clap's own
/// "invalid value '...'" would print a malformed URL's credentials to stderr).
#[derive(Debug, Clone, Copy)]
struct BaseUrlParser;

impl clap::builder::TypedValueParser for BaseUrlParser {
    type Value = Url;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Url, clap::Error> {
        let name = arg.map_or_else(
            || "a provider base URL".to_owned(),
            |arg| {
                let env = arg
                    .get_env()
                    .map(|e| format!(" ({})", e.to_string_lossy()))
                    .unwrap_or_default();
                format!("--{}{env}", arg.get_long().unwrap_or("base-url"))
            },
        );
        let invalid = |why: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("{name} is not a valid URL: {why} (the value is not shown)\n"),
            )
            .with_cmd(cmd)
        };
        let text = value
            .to_str()
            .ok_or_else(|| invalid("not UTF-8".to_owned()))?;
        // `url::ParseError` names the kind of fault, never the input.
        Url::parse(text).map_err(|e| invalid(e.to_string()))
    }
}

/// `url` with any username and password replaced by `redacted`.
pub fn redacted(url: &Url) -> String {
    if url.username().is_empty() && url.password().is_none() {
        return url.to_string();
    }
    let mut shown = url.clone();
    let _ = shown.set_username("redacted");
    let _ = shown.set_password(None);
    shown.to_string()
}

impl CommonArgs {
    /// Checks how the settings fit together and with the database's: the stale threshold
    /// is at least [`MIN_HEARTBEATS_PER_STALE`] heartbeats and more than one heartbeat plus
    /// its statement bound ([`smartbeak_database::DatabaseConfig::query_timeout`]), and the
    /// pool has room for `runs_at_once` runs (1 for `batch`, the enabled operations for
    /// `run`), each holding its lock connection plus up to `concurrency` connections:
    /// `runs_at_once * (concurrency + 1) <= DB_POOL_MAX`. `run`'s admin `/readyz` needs no
    /// connection of its own in the pool: it checks the database through the pool's
    /// [`smartbeak_database::Pinger`], one dedicated connection outside it, so it answers
    /// while every run is at full concurrency.
    ///
    /// # Errors
    ///
    /// Naming the variables that do not fit.
    pub fn check(
        &self,
        db: &smartbeak_database::DatabaseConfig,
        runs_at_once: usize,
    ) -> anyhow::Result<()> {
        let min_stale = self
            .heartbeat_ms
            .saturating_mul(u64::from(MIN_HEARTBEATS_PER_STALE));
        if self.stale_after_ms < min_stale {
            anyhow::bail!(
                "CP_STALE_AFTER_MS ({} ms) must be at least {MIN_HEARTBEATS_PER_STALE} times \
                 CP_HEARTBEAT_MS ({} ms), i.e. >= {min_stale} ms: a live runner would be taken \
                 for dead after one slow heartbeat",
                self.stale_after_ms,
                self.heartbeat_ms
            );
        }
        // A heartbeat may take up to the statement bound on top of its interval.
        let beat = Duration::from_millis(self.heartbeat_ms).saturating_add(db.query_timeout());
        if Duration::from_millis(self.stale_after_ms) <= beat {
            anyhow::bail!(
                "CP_STALE_AFTER_MS ({} ms) must be more than CP_HEARTBEAT_MS ({} ms) plus the \
                 statement bound ({} ms: DB_STATEMENT_TIMEOUT_MS + max(10%, 250 ms)): a live \
                 runner's slow heartbeat would look stale",
                self.stale_after_ms,
                self.heartbeat_ms,
                db.query_timeout().as_millis()
            );
        }
        let pool = usize::try_from(db.pool_max).unwrap_or(usize::MAX);
        let runs = runs_at_once.max(1);
        let needed = runs.saturating_mul(self.concurrency.saturating_add(1));
        if needed > pool {
            anyhow::bail!(
                "CP_CONCURRENCY ({}) does not fit DB_POOL_MAX ({pool}): {runs} run(s) at once, \
                 each with up to {} items or batches in flight (a pool connection each) and \
                 one lock connection, need {needed} connections",
                self.concurrency,
                self.concurrency
            );
        }
        Ok(())
    }

    /// The provider deadline (`CP_PROVIDER_DEADLINE_MS`) against the shutdown drain
    /// deadline `drain`: a keyword-sync item in flight at shutdown may run for the provider
    /// deadline, and must end before the runner cancels what is still in flight
    /// ([`crate::runner::finish_margin`] before the end of the drain), so it ends on its
    /// own and the run row still gets its final status. Unset: `drain` less that margin, at
    /// most [`MAX_DEFAULT_PROVIDER_DEADLINE`]. Only `keyword_sync` runs check it (no other
    /// operation sends a provider request).
    ///
    /// # Errors
    ///
    /// For keyword-sync: a value set above `drain` less the margin, or a drain too short
    /// to leave any time for a request; the message names both variables.
    pub fn provider_deadline(
        &self,
        drain: Duration,
        keyword_sync: bool,
    ) -> anyhow::Result<Duration> {
        let margin = crate::runner::finish_margin(drain);
        let room = drain.saturating_sub(margin);
        match self.provider_deadline_ms.map(Duration::from_millis) {
            Some(set) if keyword_sync && set > room => anyhow::bail!(
                "CP_PROVIDER_DEADLINE_MS ({} ms) does not fit the shutdown drain deadline \
                 ({} ms, SHUTDOWN_DRAIN_TIMEOUT_MS, by default two thirds of \
                 SHUTDOWN_TIMEOUT_MS) less its {} ms for recording the run: at most {} ms, so \
                 a keyword-sync request in flight at shutdown ends before the drain does \
                 (or leave CP_PROVIDER_DEADLINE_MS unset to derive it)",
                set.as_millis(),
                drain.as_millis(),
                margin.as_millis(),
                room.as_millis()
            ),
            Some(set) => Ok(set),
            None if keyword_sync && room.is_zero() => anyhow::bail!(
                "the shutdown drain deadline ({} ms, SHUTDOWN_DRAIN_TIMEOUT_MS, by default two \
                 thirds of SHUTDOWN_TIMEOUT_MS) leaves no time for a keyword-sync request \
                 (CP_PROVIDER_DEADLINE_MS) after its {} ms for recording the run",
                drain.as_millis(),
                margin.as_millis()
            ),
            None => Ok(room
                .min(MAX_DEFAULT_PROVIDER_DEADLINE)
                .max(Duration::from_millis(1))),
        }
    }

    /// The run options these settings give, in `mode`.
    pub fn run_options(&self, mode: Mode, dry_run: bool) -> RunOptions {
        RunOptions {
            batch_size: self.batch_size,
            concurrency: NonZeroUsize::new(self.concurrency).unwrap_or(NonZeroUsize::MIN),
            mode,
            dry_run,
        }
    }

    /// The runner name: `CP_RUNNER`, else `<hostname>:<pid>`.
    pub fn runner(&self) -> String {
        self.runner.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "control-plane".to_owned());
            format!("{host}:{}", std::process::id())
        })
    }

    /// The providers: a base URL from the flags, its credential from `lookup`
    /// (`CP_<ADAPTER>_API_KEY`).
    ///
    /// # Errors
    ///
    /// A base URL without its credential, or a credential without its URL, or a base URL
    /// carrying userinfo (`user:password@`; the message does not repeat it).
    pub fn providers(&self, lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Providers> {
        let one = |url: &Option<Url>, var: &str, url_var: &str| -> anyhow::Result<_> {
            if let Some(url) = url
                && (!url.username().is_empty() || url.password().is_some())
            {
                anyhow::bail!(
                    "{url_var} must not carry credentials (user:password@ in the URL); \
                     put the credential in {var}"
                );
            }
            let key = lookup(var).filter(|k| !k.trim().is_empty());
            match (url, key) {
                (Some(base_url), Some(key)) => Ok(Some(ProviderConfig {
                    base_url: base_url.clone(),
                    api_key: Secret::new(key),
                })),
                (None, None) => Ok(None),
                (Some(_), None) => anyhow::bail!("{url_var} is set but {var} is not"),
                (None, Some(_)) => anyhow::bail!("{var} is set but {url_var} is not"),
            }
        };
        Ok(Providers {
            gsc: one(&self.gsc_base_url, "CP_GSC_API_KEY", "CP_GSC_BASE_URL")?,
            ahrefs: one(
                &self.ahrefs_base_url,
                "CP_AHREFS_API_KEY",
                "CP_AHREFS_BASE_URL",
            )?,
        })
    }

    /// The fetch policy of both keyword providers; `deadline` is
    /// [`CommonArgs::provider_deadline`].
    ///
    /// # Errors
    ///
    /// A breaker setting out of range.
    pub fn provider_policy(&self, deadline: Duration) -> anyhow::Result<Policy> {
        let open = Duration::from_millis(self.provider_breaker_open_ms);
        let breaker = BreakerPolicy::new(BreakerConfig {
            open_duration: open,
            max_open_duration: open.max(Duration::from_secs(300)),
            ..BreakerConfig::default()
        })
        .context("CP_PROVIDER_BREAKER_OPEN_MS")?;
        Ok(Policy {
            breaker,
            retry: RetryPolicy {
                max_attempts: self.provider_max_attempts,
                max_elapsed: deadline,
                ..RetryPolicy::default()
            },
            attempt_timeout: Some(Duration::from_millis(self.provider_attempt_timeout_ms)),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn providers_need_both_url_and_key_and_hide_the_key() {
        let cli = Cli::try_parse_from([
            "smartbeak-control-plane",
            "batch",
            "keyword-sync",
            "--gsc-base-url",
            "http://127.0.0.1:1/",
        ]);
        let Ok(Cli {
            command: Some(Command::Batch(args)),
        }) = cli
        else {
            panic!("parse failed: {cli:?}");
        };
        assert_eq!(args.operation, OperationName::KeywordSync);
        let err = args.common.providers(|_| None).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("CP_GSC_BASE_URL is set but CP_GSC_API_KEY is not")
        );
        let providers = args
            .common
            .providers(|v| (v == "CP_GSC_API_KEY").then(|| "sekrit".to_owned()))
            .unwrap();
        assert!(providers.ahrefs.is_none());
        assert!(!format!("{providers:?}").contains("sekrit"));
    }

    fn batch_args(extra: &[&str]) -> BatchArgs {
        let mut argv = vec!["smartbeak-control-plane", "batch", "keyword-sync"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv) {
            Ok(Cli {
                command: Some(Command::Batch(args)),
            }) => args,
            other => panic!("parse failed: {other:?}"),
        }
    }

    #[test]
    fn a_base_url_with_credentials_is_refused_and_never_shown() {
        let args = batch_args(&["--gsc-base-url", "https://bob:hunter2@gsc.example/"]);
        let err = args
            .common
            .providers(|_| Some("key".to_owned()))
            .err()
            .map(|e| e.to_string())
            .unwrap();
        assert_eq!(
            err,
            "CP_GSC_BASE_URL must not carry credentials (user:password@ in the URL); \
             put the credential in CP_GSC_API_KEY"
        );
        let debug = format!("{args:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("bob"),
            "{debug}"
        );
        assert!(debug.contains("gsc.example"), "{debug}");
        // A user name alone is refused too.
        let args = batch_args(&["--ahrefs-base-url", "https://token@ahrefs.example/"]);
        assert!(args.common.providers(|_| Some("key".to_owned())).is_err());
        assert!(!format!("{args:?}").contains("token@"));
    }

    #[test]
    fn a_malformed_base_url_is_refused_without_echoing_it() {
        for flag in ["--gsc-base-url", "--ahrefs-base-url"] {
            let err = Cli::try_parse_from([
                "smartbeak-control-plane",
                "batch",
                "keyword-sync",
                flag,
                "https://bob:hunter2@gsc.example:99999/",
            ])
            .err()
            .map(|e| e.to_string())
            .unwrap();
            assert!(!err.contains("hunter2") && !err.contains("bob"), "{err}");
            assert!(
                err.contains(flag) && err.contains("not a valid URL"),
                "{err}"
            );
        }
    }

    #[test]
    fn stale_after_must_be_several_heartbeats_and_the_runs_fit_the_pool() {
        let db = smartbeak_database::DatabaseConfig::new("postgres://127.0.0.1/x").unwrap();
        assert_eq!(db.pool_max, 20, "the test assumes the default pool");
        assert!(
            batch_args(&[]).common.check(&db, 3).is_ok(),
            "the defaults fit three runs at once"
        );
        let err = batch_args(&["--heartbeat-ms", "5000", "--stale-after-ms", "10000"])
            .common
            .check(&db, 1)
            .err()
            .map(|e| e.to_string())
            .unwrap();
        assert!(
            err.starts_with(
                "CP_STALE_AFTER_MS (10000 ms) must be at least 3 times CP_HEARTBEAT_MS (5000 ms)"
            ),
            "{err}"
        );
        assert!(
            batch_args(&["--heartbeat-ms", "5000", "--stale-after-ms", "15000"])
                .common
                .check(&db, 1)
                .is_ok()
        );
        // Heartbeat 1 s, stale 3 s: three heartbeats, but not above 1 s + the 8.8 s bound.
        let err = batch_args(&["--heartbeat-ms", "1000", "--stale-after-ms", "3000"])
            .common
            .check(&db, 1)
            .err()
            .map(|e| e.to_string())
            .unwrap();
        assert!(
            err.starts_with("CP_STALE_AFTER_MS (3000 ms) must be more than CP_HEARTBEAT_MS (1000 ms) plus the statement bound"),
            "{err}"
        );
        // `batch`: one run, concurrency + 1 <= 20.
        let err = batch_args(&["--concurrency", "20"])
            .common
            .check(&db, 1)
            .err()
            .map(|e| e.to_string())
            .unwrap();
        assert!(
            err.starts_with("CP_CONCURRENCY (20) does not fit DB_POOL_MAX (20)")
                && err.contains("need 21 connections"),
            "{err}"
        );
        assert!(
            batch_args(&["--concurrency", "19"])
                .common
                .check(&db, 1)
                .is_ok()
        );
        // `run` with three operations: 3 x (16 + 1) = 51 > 20, though 16 < 20.
        let err = batch_args(&["--concurrency", "16"])
            .common
            .check(&db, 3)
            .err()
            .map(|e| e.to_string())
            .unwrap();
        assert!(
            err.contains("3 run(s) at once") && err.contains("need 51"),
            "{err}"
        );
        // `run` with two operations: 2 x (9 + 1) = 20 fits exactly (its /readyz uses the
        // Pinger's own connection, not one of the pool's); 2 x (10 + 1) = 22 does not.
        assert!(
            batch_args(&["--concurrency", "9"])
                .common
                .check(&db, 2)
                .is_ok()
        );
        let err = batch_args(&["--concurrency", "10"])
            .common
            .check(&db, 2)
            .err()
            .map(|e| e.to_string())
            .unwrap();
        assert!(
            err.contains("2 run(s) at once") && err.ends_with("need 22 connections"),
            "{err}"
        );
        // 3 x (5 + 1) = 18 fits; 3 x (6 + 1) = 21 does not.
        assert!(
            batch_args(&["--concurrency", "5"])
                .common
                .check(&db, 3)
                .is_ok()
        );
        assert!(
            batch_args(&["--concurrency", "6"])
                .common
                .check(&db, 3)
                .is_err()
        );
    }

    #[test]
    fn the_provider_deadline_fits_the_drain_and_is_derived_from_it() {
        use smartbeak_shutdown::ShutdownConfig;
        let drain = |vars: &[(&str, &str)]| {
            let config = ShutdownConfig::from_lookup(|name| {
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| (*v).to_owned())
            })
            .unwrap();
            config.drain_timeout.unwrap()
        };
        let default = drain(&[]);
        let k8s = drain(&[("SHUTDOWN_TIMEOUT_MS", "20000")]);
        assert_eq!(k8s, Duration::from_millis(13_333));
        // Unset: the drain less its 3 s margin, at most 15 s.
        let common = batch_args(&[]).common;
        assert_eq!(
            common.provider_deadline(default, true).unwrap(),
            Duration::from_millis(13_666)
        );
        // The shutdown crate's documented Kubernetes setting starts.
        assert_eq!(
            common.provider_deadline(k8s, true).unwrap(),
            Duration::from_millis(10_333)
        );
        assert_eq!(
            common
                .provider_deadline(Duration::from_secs(60), true)
                .unwrap(),
            Duration::from_secs(15)
        );
        // A value set that does not fit is refused, naming both variables.
        let common = batch_args(&["--provider-deadline-ms", "15000"]).common;
        let err = common
            .provider_deadline(k8s, true)
            .err()
            .map(|e| e.to_string())
            .unwrap();
        assert!(
            err.starts_with("CP_PROVIDER_DEADLINE_MS (15000 ms) does not fit the shutdown drain deadline (13333 ms, SHUTDOWN_DRAIN_TIMEOUT_MS")
                && err.contains("SHUTDOWN_TIMEOUT_MS")
                && err.contains("at most 10333 ms"),
            "{err}"
        );
        // ... but only where keyword-sync runs: no other operation sends a request.
        assert_eq!(
            common.provider_deadline(k8s, false).unwrap(),
            Duration::from_secs(15)
        );
        assert_eq!(
            batch_args(&["--provider-deadline-ms", "10333"])
                .common
                .provider_deadline(k8s, true)
                .unwrap(),
            Duration::from_millis(10_333)
        );
        // A drain below a second leaves no time for a request.
        assert!(
            batch_args(&[])
                .common
                .provider_deadline(Duration::from_millis(800), true)
                .is_err()
        );
        // `--help` says how the default is derived.
        use clap::CommandFactory as _;
        let help = Cli::command()
            .find_subcommand_mut("run")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(
            help.contains("CP_PROVIDER_DEADLINE_MS")
                && help.contains("10333 with SHUTDOWN_TIMEOUT_MS=20000"),
            "{help}"
        );
    }

    /// Every variable the binary or the crates it wires read, from their sources, is in
    /// `--help` (flags show theirs through clap; the rest through [`after_help`]).
    #[test]
    fn help_lists_every_variable_read() {
        use clap::CommandFactory as _;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut read = std::collections::BTreeSet::new();
        for file in [
            "crates/database/src/config.rs",
            "crates/shutdown/src/config.rs",
            "crates/shutdown/src/telemetry.rs",
            "control-plane/src/config.rs",
            "control-plane/src/main.rs",
        ] {
            let text = std::fs::read_to_string(root.join(file)).unwrap();
            // The code, not its tests.
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for quoted in code.split('"').skip(1).step_by(2) {
                let is_var = quoted.len() > 3
                    && quoted.contains('_')
                    && quoted
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                    && !quoted.starts_with('_')
                    && !quoted.starts_with("CARGO_");
                if is_var {
                    read.insert(quoted.to_owned());
                }
            }
        }
        // Named only in a doc comment of the database crate (the api's variable).
        read.remove("HTTP_REQUEST_TIMEOUT_MS");
        assert!(read.len() > 20, "too few variables found: {read:?}");
        for sub in ["run", "batch"] {
            let mut cmd = Cli::command();
            let help = cmd
                .find_subcommand_mut(sub)
                .unwrap()
                .render_long_help()
                .to_string();
            // `run` alone has an admin port and intervals.
            let run_only = |var: &str| var == "CP_ADMIN_ADDR" || var.ends_with("_INTERVAL_SECS");
            for var in read.iter().filter(|v| sub == "run" || !run_only(v)) {
                assert!(help.contains(var.as_str()), "`{sub} --help` lacks {var}");
            }
            assert!(help.contains("[default: 1000]"), "{help}");
        }
    }

    /// `--help` gives every variable's default: a flag's `[default: ...]` (or its doc
    /// saying what happens unset), and the variables listed after the flags a `[...]` each
    /// (`DATABASE_URL` is required).
    #[test]
    fn help_gives_every_variable_its_default() {
        use clap::CommandFactory as _;
        for sub in ["run", "batch"] {
            let mut cmd = Cli::command();
            let sub_cmd = cmd.find_subcommand_mut(sub).unwrap();
            let help = sub_cmd.render_long_help().to_string();
            for arg in sub_cmd.get_arguments() {
                let Some(env) = arg.get_env() else {
                    continue;
                };
                let env = env.to_string_lossy();
                let doc = arg
                    .get_long_help()
                    .or(arg.get_help())
                    .map(ToString::to_string)
                    .unwrap_or_default()
                    .to_lowercase();
                let says = !arg.get_default_values().is_empty()
                    || doc.contains("default")
                    || doc.contains("unset");
                assert!(
                    says,
                    "`{sub} --help`: {env} has no default nor says what unset means"
                );
                assert!(help.contains(env.as_ref()), "`{sub} --help` lacks {env}");
                if let Some(default) = arg.get_default_values().first() {
                    let shown = format!("[default: {}]", default.to_string_lossy());
                    assert!(
                        help.contains(&shown),
                        "`{sub} --help` lacks {shown} for {env}"
                    );
                }
            }
            let after = help
                .split("Provider credentials come from the environment only")
                .nth(1)
                .unwrap_or_else(|| panic!("`{sub} --help` lacks the variables after the flags"));
            let mut listed = 0;
            for line in after.lines() {
                let Some(first) = line.split_whitespace().next() else {
                    continue;
                };
                let is_var = line.starts_with("  ")
                    && first.len() > 3
                    && first.contains('_')
                    && first
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
                if !is_var {
                    continue;
                }
                listed += 1;
                assert!(
                    line.contains('[') || line.contains("(required)"),
                    "`{sub} --help` gives no default for {first}: {line:?}"
                );
            }
            assert!(
                listed >= 20,
                "`{sub} --help`: only {listed} variables after the flags"
            );
        }
    }

    #[test]
    fn batch_size_is_bounded() {
        for bad in ["0", "1001"] {
            let parsed = Cli::try_parse_from([
                "smartbeak-control-plane",
                "batch",
                "content-scheduler",
                "--batch-size",
                bad,
            ]);
            assert!(parsed.is_err(), "{bad} accepted");
        }
    }
}
