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

/// Default items per batch (from the benchmark in BENCHMARKS.md, "Control-plane").
pub const DEFAULT_BATCH_SIZE: usize = 1_000;
/// Default concurrency.
pub const DEFAULT_CONCURRENCY: usize = 4;

/// What `--help` says after the flags: the variables that are not flags (credentials,
/// database, shutdown, logs) with their defaults, and the exit codes.
pub fn after_help() -> String {
    format!(
        "\
Provider credentials come from the environment only, never from flags:
  CP_GSC_API_KEY     bearer credential for CP_GSC_BASE_URL (keyword-sync, adapter gsc)
  CP_AHREFS_API_KEY  bearer credential for CP_AHREFS_BASE_URL (adapter ahrefs)
A base URL must not carry credentials (user:password@ is refused).

{}

Exit codes: 0 every item succeeded (or a dry run; `run`: a clean SIGTERM); 1 an item
failed or the run failed (the summary names the batch_runs id), or start-up failed; 2 bad
usage or configuration; 3 another runner holds the operation's lock (nothing was run).
`run` exits with its shutdown report's code.",
        smartbeak_api::startup::DATABASE_AND_SHUTDOWN_HELP
    )
}

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
    #[arg(long, env = "CP_GSC_BASE_URL", hide_env_values = true)]
    pub gsc_base_url: Option<Url>,
    /// Base URL of the ahrefs keyword provider (keyword-sync; no userinfo: the credential
    /// is CP_AHREFS_API_KEY). Unset: ahrefs sources fail as not configured.
    #[arg(long, env = "CP_AHREFS_BASE_URL", hide_env_values = true)]
    pub ahrefs_base_url: Option<Url>,
    /// Per-attempt timeout of a provider request, in milliseconds.
    #[arg(long, env = "CP_PROVIDER_ATTEMPT_TIMEOUT_MS", default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(1..))]
    pub provider_attempt_timeout_ms: u64,
    /// Total deadline of a provider request (attempts, waits, body), in milliseconds.
    #[arg(long, env = "CP_PROVIDER_DEADLINE_MS", default_value_t = 30_000,
        value_parser = clap::value_parser!(u64).range(1..))]
    pub provider_deadline_ms: u64,
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
    /// is at least [`MIN_HEARTBEATS_PER_STALE`] heartbeats, and the concurrency leaves a
    /// pool connection for the run's lock connection (held for the whole run).
    ///
    /// # Errors
    ///
    /// Naming the variables that do not fit.
    pub fn check(&self, db: &smartbeak_database::DatabaseConfig) -> anyhow::Result<()> {
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
        let pool = usize::try_from(db.pool_max).unwrap_or(usize::MAX);
        if self.concurrency >= pool {
            anyhow::bail!(
                "CP_CONCURRENCY ({}) must be less than DB_POOL_MAX ({pool}): each item or \
                 batch in flight uses a pool connection, and a run holds one more for its lock",
                self.concurrency
            );
        }
        Ok(())
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

    /// The fetch policy of both keyword providers.
    ///
    /// # Errors
    ///
    /// A breaker setting out of range.
    pub fn provider_policy(&self) -> anyhow::Result<Policy> {
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
                max_elapsed: Duration::from_millis(self.provider_deadline_ms),
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
    fn stale_after_must_be_several_heartbeats_and_concurrency_below_the_pool() {
        let db = smartbeak_database::DatabaseConfig::new("postgres://127.0.0.1/x").unwrap();
        assert!(
            batch_args(&[]).common.check(&db).is_ok(),
            "the defaults fit"
        );
        let err = batch_args(&["--heartbeat-ms", "5000", "--stale-after-ms", "10000"])
            .common
            .check(&db)
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
                .check(&db)
                .is_ok()
        );
        let err = batch_args(&["--concurrency", "20"])
            .common
            .check(&db)
            .err()
            .map(|e| e.to_string())
            .unwrap();
        assert!(
            err.starts_with("CP_CONCURRENCY (20) must be less than DB_POOL_MAX (20)"),
            "{err}"
        );
        assert!(
            batch_args(&["--concurrency", "19"])
                .common
                .check(&db)
                .is_ok()
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
