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

const AFTER_HELP: &str = "\
Provider credentials come from the environment only, never from flags:
  CP_GSC_API_KEY     bearer credential for CP_GSC_BASE_URL (keyword-sync, adapter gsc)
  CP_AHREFS_API_KEY  bearer credential for CP_AHREFS_BASE_URL (adapter ahrefs)
Database: DATABASE_URL and the DB_* variables (see README); DB_RUN_MIGRATIONS=false skips
migrations. Shutdown: SHUTDOWN_TIMEOUT_MS, SHUTDOWN_DRAIN_TIMEOUT_MS, SHUTDOWN_POOL_CLOSE_MS.
Logs: LOG_FORMAT (text|json), RUST_LOG.

Exit codes of `batch`: 0 every item succeeded (or a dry run); 1 an item failed or the run
failed (the summary names the batch_runs id); 2 bad usage or configuration; 3 another
runner holds the operation's lock (nothing was run). `run` exits with its shutdown
report's code (0 after a clean SIGTERM).";

/// `smartbeak-control-plane`.
#[derive(Debug, Parser)]
#[command(
    name = "smartbeak-control-plane",
    version,
    about = "The SmartBeak control-plane: recurring batch operations, one runner each",
    after_help = AFTER_HELP
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
    #[command(after_help = AFTER_HELP)]
    Run(RunArgs),
    /// One run of one operation now; exit code non-zero when any item failed.
    #[command(after_help = AFTER_HELP)]
    Batch(BatchArgs),
}

/// Settings shared by `run` and `batch`.
#[derive(Debug, Clone, Args)]
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
    /// Base URL of the gsc keyword provider (keyword-sync).
    #[arg(long, env = "CP_GSC_BASE_URL")]
    pub gsc_base_url: Option<Url>,
    /// Base URL of the ahrefs keyword provider (keyword-sync).
    #[arg(long, env = "CP_AHREFS_BASE_URL")]
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

impl CommonArgs {
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
    /// A base URL without its credential, or a credential without its URL.
    pub fn providers(&self, lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Providers> {
        let one = |url: &Option<Url>, var: &str, url_var: &str| -> anyhow::Result<_> {
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
