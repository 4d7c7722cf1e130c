//! The `smartbeak-domain-export` binary: `worker` (the long-running export worker, with
//! `/healthz`, `/readyz` and `/metrics` on its admin port), `run` (one export now, without
//! the queue), `enqueue` (queue one for the workers) and `status` (a job's row). The logic
//! lives in `smartbeak_api::jobs`; this file parses, wires and reports.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use smartbeak_api::config::{DEFAULT_EXPORT_DIR, LogFormat};
use smartbeak_api::jobs::export::{self, ExportDir, ExportLimits};
use smartbeak_api::jobs::queue::{self, ExportFormat, ExportSpec, NewExport, Progress};
use smartbeak_api::jobs::worker::config::{self as defaults, WorkerConfig};
use smartbeak_api::jobs::worker::{self, Worker, cli};
use smartbeak_api::routes::analytics::parse_instant;
use smartbeak_api::startup;
use smartbeak_database::{Database, DatabaseConfig};
use smartbeak_shutdown::admin::AdminServer;
use smartbeak_shutdown::telemetry::{self, Output};
use smartbeak_shutdown::{RegisterError, Shutdown, ShutdownConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The variables read by the database and shutdown crates (not flags), for `--help`: the
/// shared [`startup::DATABASE_AND_SHUTDOWN_HELP`] with the worker's own drain default, and
/// the worker's own constraints.
fn other_variables() -> String {
    format!(
        "{}\n\nEXPORT_LEASE_SECS must be at least DB_STATEMENT_TIMEOUT_MS plus 10% (at least 250 ms).\n\
         The worker's SHUTDOWN_DRAIN_TIMEOUT_MS defaults to four fifths of SHUTDOWN_TIMEOUT_MS, \
         at most SHUTDOWN_TIMEOUT_MS less SHUTDOWN_READINESS_DELAY_MS, SHUTDOWN_POOL_CLOSE_MS \
         and 1 s (19,000 ms at the defaults). It must be at least 750 ms plus twice the \
         database client bound (DB_STATEMENT_TIMEOUT_MS plus 10%, at least 250 ms): 18,350 ms \
         at the default 8,000 ms; and SHUTDOWN_READINESS_DELAY_MS + SHUTDOWN_DRAIN_TIMEOUT_MS + \
         SHUTDOWN_POOL_CLOSE_MS must not exceed SHUTDOWN_TIMEOUT_MS.",
        startup::shutdown_help_with_drain_default(WORKER_DRAIN_DEFAULT)
    )
}

/// The worker's default drain deadline as `--help` shows it ([`worker::shutdown_config`]).
const WORKER_DRAIN_DEFAULT: &str =
    "[4/5 of SHUTDOWN_TIMEOUT_MS, less if the pools' close does not fit: see below]";

#[derive(Debug, Parser)]
#[command(
    name = "smartbeak-domain-export",
    version,
    about = "The SmartBeak domain export job: the queue worker and one-off exports",
    after_help = other_variables()
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the worker's flags (all strings) make that variant large.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Claim and run queued exports until SIGTERM (admin port: /healthz, /readyz, /metrics).
    #[command(after_help = other_variables())]
    Worker(WorkerArgs),
    /// Export one domain now, without the queue; prints the path, size, records and SHA-256.
    #[command(after_help = other_variables())]
    Run(RunArgs),
    /// Queue an export for the workers; prints the job id.
    #[command(after_help = other_variables())]
    Enqueue(EnqueueArgs),
    /// Show a job's row.
    #[command(after_help = other_variables())]
    Status {
        /// The job id (as `enqueue` or the api printed it).
        #[arg(value_name = "JOB_ID")]
        id: Uuid,
        /// Print the row as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The worker's settings: every flag is also its environment variable.
#[derive(Debug, Args)]
struct WorkerArgs {
    /// Where finished files are written (the api serves downloads from the same directory).
    #[arg(long, env = "EXPORT_DIR", value_name = "DIR", default_value = DEFAULT_EXPORT_DIR)]
    export_dir: String,
    /// Exports running at once in this worker (at least 1).
    #[arg(long, env = "EXPORT_CONCURRENCY", value_name = "N",
          default_value_t = defaults::DEFAULT_CONCURRENCY.to_string())]
    concurrency: String,
    /// The largest file an export may write, in bytes.
    #[arg(long, env = "EXPORT_MAX_BYTES", value_name = "BYTES",
          default_value_t = export::DEFAULT_MAX_BYTES.to_string())]
    max_bytes: String,
    /// A CSV export's ZIP entries: 0 stored, 1 (fastest) to 9 (smallest) deflate.
    #[arg(long, env = "EXPORT_ZIP_LEVEL", value_name = "LEVEL",
          default_value_t = export::DEFAULT_ZIP_LEVEL.to_string())]
    zip_level: String,
    /// Hours a finished file is kept (its expires_at).
    #[arg(long, env = "EXPORT_TTL_HOURS", value_name = "HOURS",
          default_value_t = defaults::DEFAULT_TTL_HOURS.to_string())]
    ttl_hours: String,
    /// Seconds a claim holds without a heartbeat; then any worker's reaper re-queues it.
    #[arg(long, env = "EXPORT_LEASE_SECS", value_name = "SECS",
          default_value_t = defaults::DEFAULT_LEASE_SECS.to_string())]
    lease_secs: String,
    /// Interval between lease renewals (a failed renewal is retried on the next check; the
    /// lease must cover two of these plus the database client bound); a running job checks
    /// its fence, and writes its progress when it changed, every min(1 s, this).
    #[arg(long, env = "EXPORT_HEARTBEAT_SECS", value_name = "SECS",
          default_value_t = defaults::DEFAULT_HEARTBEAT_SECS.to_string())]
    heartbeat_secs: String,
    /// Idle polling backs off from 100 ms to this (NOTIFY wakes the worker at once).
    #[arg(long, env = "EXPORT_POLL_MAX_MS", value_name = "MS",
          default_value_t = defaults::DEFAULT_POLL_MAX_MS.to_string())]
    poll_max_ms: String,
    /// How often this worker reclaims expired leases and refreshes the queue gauges.
    #[arg(long, env = "EXPORT_REAPER_INTERVAL_SECS", value_name = "SECS",
          default_value_t = defaults::DEFAULT_REAPER_INTERVAL_SECS.to_string())]
    reaper_interval_secs: String,
    /// Backoff ceiling of the first retry of a failed attempt (doubling, full jitter).
    #[arg(long, env = "EXPORT_RETRY_BASE_MS", value_name = "MS",
          default_value_t = defaults::DEFAULT_RETRY_BASE_MS.to_string())]
    retry_base_ms: String,
    /// Largest backoff ceiling of a retry.
    #[arg(long, env = "EXPORT_RETRY_MAX_MS", value_name = "MS",
          default_value_t = defaults::DEFAULT_RETRY_MAX_MS.to_string())]
    retry_max_ms: String,
    /// The lease owner recorded on claims and attempts (default `<hostname>-<pid>`).
    #[arg(
        long,
        env = "EXPORT_WORKER_ID",
        value_name = "ID",
        help = "The lease owner recorded on claims and attempts [default: <hostname>-<pid>]"
    )]
    worker_id: Option<String>,
    /// The admin listener (/healthz, /readyz, /metrics); port 0 picks a free port.
    #[arg(long, env = "EXPORT_ADMIN_ADDR", value_name = "ADDR",
          default_value = defaults::DEFAULT_ADMIN_ADDR)]
    admin_addr: String,
}

impl WorkerArgs {
    /// The value of `var`: the flag (clap already read its variable), else the environment.
    fn lookup(&self, var: &str) -> Option<String> {
        let flag = match var {
            "EXPORT_DIR" => &self.export_dir,
            "EXPORT_CONCURRENCY" => &self.concurrency,
            "EXPORT_MAX_BYTES" => &self.max_bytes,
            "EXPORT_ZIP_LEVEL" => &self.zip_level,
            "EXPORT_TTL_HOURS" => &self.ttl_hours,
            "EXPORT_LEASE_SECS" => &self.lease_secs,
            "EXPORT_HEARTBEAT_SECS" => &self.heartbeat_secs,
            "EXPORT_POLL_MAX_MS" => &self.poll_max_ms,
            "EXPORT_REAPER_INTERVAL_SECS" => &self.reaper_interval_secs,
            "EXPORT_RETRY_BASE_MS" => &self.retry_base_ms,
            "EXPORT_RETRY_MAX_MS" => &self.retry_max_ms,
            "EXPORT_ADMIN_ADDR" => &self.admin_addr,
            "EXPORT_WORKER_ID" => return self.worker_id.clone(),
            other => return std::env::var(other).ok(),
        };
        Some(flag.clone())
    }
}

/// What to export (shared by `run` and `enqueue`).
#[derive(Debug, Args)]
struct ExportArgs {
    /// The domain to export.
    #[arg(long, value_name = "UUID")]
    domain: Uuid,
    /// csv, json or markdown.
    #[arg(long, value_name = "FORMAT")]
    format: ExportFormat,
    /// The domain's org (checked; looked up from the domain when omitted).
    #[arg(long, value_name = "UUID")]
    org: Option<Uuid>,
    /// Leave out the content items.
    #[arg(long)]
    no_content: bool,
    /// Leave out the keyword metrics.
    #[arg(long)]
    no_keywords: bool,
    /// Leave out the content performance aggregates.
    #[arg(long)]
    no_analytics: bool,
    /// Start of the metrics range (RFC 3339 or YYYY-MM-DD).
    #[arg(long, value_name = "WHEN", value_parser = parse_from)]
    from: Option<DateTime<Utc>>,
    /// End of the metrics range (RFC 3339, or YYYY-MM-DD for that whole day).
    #[arg(long, value_name = "WHEN", value_parser = parse_to)]
    to: Option<DateTime<Utc>>,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    export: ExportArgs,
    /// The directory to write into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// The largest file the export may write, in bytes.
    #[arg(long, env = "EXPORT_MAX_BYTES", value_name = "BYTES",
          default_value_t = export::DEFAULT_MAX_BYTES)]
    max_bytes: u64,
    /// A CSV export's ZIP entries: 0 stored, 1 (fastest) to 9 (smallest) deflate.
    #[arg(long, env = "EXPORT_ZIP_LEVEL", value_name = "LEVEL",
          default_value_t = export::DEFAULT_ZIP_LEVEL,
          value_parser = clap::value_parser!(u8).range(0..=i64::from(export::MAX_ZIP_LEVEL)))]
    zip_level: u8,
}

#[derive(Debug, Args)]
struct EnqueueArgs {
    #[command(flatten)]
    export: ExportArgs,
}

fn parse_from(raw: &str) -> Result<DateTime<Utc>, String> {
    parse_instant("--from", raw, false).map_err(|e| e.to_string())
}

fn parse_to(raw: &str) -> Result<DateTime<Utc>, String> {
    parse_instant("--to", raw, true).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (config, log_format) = match &cli.command {
        Command::Worker(args) => match WorkerConfig::from_lookup(|var| args.lookup(var)) {
            Ok(config) => {
                let format = config.log_format;
                (Some(config), format)
            }
            Err(err) => {
                eprintln!("smartbeak-domain-export: {err}");
                return ExitCode::from(2);
            }
        },
        _ => (None, LogFormat::Text),
    };
    // The worker logs to stdout like the api; the one-off commands keep stdout for their
    // result and log to stderr.
    let output = if config.is_some() {
        Output::Stdout
    } else {
        Output::Stderr
    };
    let logs = match telemetry::init(log_format, output) {
        Ok(logs) => logs,
        Err(err) => {
            eprintln!("smartbeak-domain-export: {err}");
            return ExitCode::FAILURE;
        }
    };
    let is_worker = config.is_some();
    let code = smartbeak_shutdown::run_main(async {
        let result = match (cli.command, config) {
            (Command::Worker(_), Some(config)) => serve(config, &logs).await,
            (Command::Run(args), _) => run_once(args).await.map(|()| ExitCode::SUCCESS),
            (Command::Enqueue(args), _) => enqueue(args).await.map(|()| ExitCode::SUCCESS),
            (Command::Status { id, json }, _) => status(id, json).await.map(|()| ExitCode::SUCCESS),
            (Command::Worker(_), None) => Ok(ExitCode::FAILURE),
        };
        result.unwrap_or_else(|err| {
            if is_worker {
                tracing::error!(error = format!("{err:#}"), "smartbeak-domain-export failed");
            } else {
                eprintln!("smartbeak-domain-export: {err:#}");
            }
            ExitCode::FAILURE
        })
    });
    logs.flush();
    code
}

/// The long-running worker, wired as every service binary (ARCHITECTURE.md).
async fn serve(config: WorkerConfig, logs: &telemetry::LogGuard) -> anyhow::Result<ExitCode> {
    let shutdown_config = ShutdownConfig::from_env().context("shutdown configuration")?;
    let shutdown = Shutdown::new(worker::shutdown_config(
        shutdown_config,
        config.pool_close_deadline,
    ));
    shutdown
        .listen_for_signals()
        .context("installing signal handlers")?;
    logs.flush_on_force_exit(&shutdown);

    let metrics = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(worker::metrics::DURATION.to_owned()),
            &worker::metrics::DURATION_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(worker::metrics::SIZE.to_owned()),
                &worker::metrics::SIZE_BUCKETS,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(worker::metrics::ROWS_PER_SECOND.to_owned()),
                &worker::metrics::RATE_BUCKETS,
            )
        })
        .context("metrics buckets")?;
    let metrics = metrics
        .install_recorder()
        .context("installing the metrics recorder")?;
    startup::spawn_metrics_upkeep(&shutdown, metrics.clone());

    let db_config = DatabaseConfig::from_env().context("database configuration")?;
    config
        .check_timeouts(&db_config)
        .context("timeouts must nest")?;
    if let Err(reason) =
        worker::check_shutdown(shutdown.config(), &db_config, config.pool_close_deadline)
    {
        tracing::error!(%reason, "configuration refused");
        eprintln!("smartbeak-domain-export: {reason}");
        return Ok(ExitCode::from(2));
    }
    let (db, _pools) = match startup::connect_database(
        &shutdown,
        db_config,
        "smartbeak-domain-export",
        config.pool_close_deadline,
    )
    .await?
    {
        Ok(started) => started,
        Err(code) => return Ok(code),
    };

    let dir = ExportDir::open(&config.export_dir)
        .with_context(|| format!("EXPORT_DIR {}", config.export_dir.display()))?;
    let admin = AdminServer::bind(config.admin_addr)
        .await
        .with_context(|| format!("binding EXPORT_ADMIN_ADDR {}", config.admin_addr))?;
    let admin_addr = admin.local_addr();
    let worker = Worker::new(db.clone(), config, dir);
    let _installed = match worker::install(&shutdown, &worker) {
        Ok(installed) => installed,
        Err(RegisterError::ShutdownStarted { .. }) => {
            return Ok(startup::interrupted_start_up(&shutdown, "starting the worker").await);
        }
    };
    admin.serve(&shutdown, Some(metrics), startup::database_ready(&db));
    tracing::info!("admin listening on http://{admin_addr}");

    shutdown.triggered().await;
    Ok(shutdown.run().await.exit_code())
}

/// Connects for a one-off command (no migrations: the worker or `smartbeak-migrate` owns
/// them).
async fn connect(name: &str) -> anyhow::Result<Database> {
    let config = DatabaseConfig::from_env().context("database configuration")?;
    Database::connect(config, name)
        .await
        .context("connecting to the database")
}

/// The domain's org, checked against `--org` when given.
async fn org_of(db: &Database, args: &ExportArgs) -> anyhow::Result<Uuid> {
    let Some(org) = cli::domain_org(db, args.domain)
        .await
        .context("looking up the domain")?
    else {
        bail!("domain {} not found", args.domain);
    };
    if let Some(expected) = args.org
        && expected != org
    {
        bail!("domain {} does not belong to org {expected}", args.domain);
    }
    Ok(org)
}

/// `run`: one export through `run_export`, with a progress bar on a terminal.
async fn run_once(args: RunArgs) -> anyhow::Result<()> {
    let dir = ExportDir::open(&args.out)
        .with_context(|| format!("output directory {}", args.out.display()))?;
    let db = connect("smartbeak-domain-export-run").await?;
    let org_id = org_of(&db, &args.export).await?;
    let e = &args.export;
    let spec = ExportSpec {
        id: Uuid::new_v4(),
        // A fresh id per run: no other attempt shares its name.
        token: 0,
        org_id,
        domain_id: e.domain,
        format: e.format,
        include_content: !e.no_content,
        include_keywords: !e.no_keywords,
        include_analytics: !e.no_analytics,
        date_from: e.from,
        date_to: e.to,
    };
    let (progress_tx, progress_rx) = watch::channel(Progress::default());
    let cancel = CancellationToken::new();
    // Ctrl-C cancels the export, which removes its temp file.
    let on_signal = cancel.clone();
    let signal = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_signal.cancel();
        }
    });
    let reporter = tokio::spawn(report_progress(
        progress_rx,
        std::io::stderr().is_terminal(),
    ));
    let limits = ExportLimits {
        max_bytes: args.max_bytes,
        zip_level: args.zip_level,
    };
    let result = export::run_export(&db, &spec, &dir, limits, &progress_tx, &cancel).await;
    drop(progress_tx);
    let _ = reporter.await;
    signal.abort();
    db.close(Duration::from_secs(5)).await.ok();
    let output = result.context("export failed")?;
    let path = dir.root().join(&output.storage_path);
    println!("path:    {}", path.display());
    println!("size:    {} bytes", output.size_bytes);
    println!("records: {}", output.record_count);
    println!("sha256:  {}", output.checksum_sha256);
    Ok(())
}

/// Shows progress until the sender is dropped: a bar on a terminal, else a line at most
/// once a second.
async fn report_progress(mut rx: watch::Receiver<Progress>, terminal: bool) {
    if terminal {
        let bar = indicatif::ProgressBar::new(100);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{bar:40} {pos:>3}% {msg} ({elapsed})")
        {
            bar.set_style(style);
        }
        while rx.changed().await.is_ok() {
            let p = *rx.borrow_and_update();
            bar.set_position(u64::try_from(p.percent.clamp(0, 100)).unwrap_or(0));
            bar.set_message(format!("{} rows", p.rows_written));
        }
        bar.finish();
    } else {
        let mut last: Option<tokio::time::Instant> = None;
        while rx.changed().await.is_ok() {
            let p = *rx.borrow_and_update();
            if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                eprintln!("progress: {}% ({} rows)", p.percent, p.rows_written);
                last = Some(tokio::time::Instant::now());
            }
        }
        let p = *rx.borrow();
        eprintln!("progress: {}% ({} rows)", p.percent, p.rows_written);
    }
}

/// `enqueue`: one job through `queue::enqueue`; prints its id.
async fn enqueue(args: EnqueueArgs) -> anyhow::Result<()> {
    let db = connect("smartbeak-domain-export-enqueue").await?;
    let e = &args.export;
    let org_id = org_of(&db, e).await?;
    let new = NewExport {
        format: e.format,
        include_content: !e.no_content,
        include_keywords: !e.no_keywords,
        include_analytics: !e.no_analytics,
        date_from: e.from,
        date_to: e.to,
    };
    let row = queue::enqueue(&db, org_id, e.domain, &new)
        .await
        .context("queueing the export")?;
    db.close(Duration::from_secs(5)).await.ok();
    let Some(row) = row else {
        bail!("domain {} not found", e.domain);
    };
    println!("{}", row.id);
    Ok(())
}

/// `status`: the job's row, as text or JSON.
async fn status(id: Uuid, json: bool) -> anyhow::Result<()> {
    let db = connect("smartbeak-domain-export-status").await?;
    let row = queue::get_any(&db, id)
        .await
        .context("reading the export")?;
    db.close(Duration::from_secs(5)).await.ok();
    let Some(row) = row else {
        bail!("export {id} not found");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&row)?);
    } else {
        print!("{}", cli::status_text(&row));
    }
    Ok(())
}
