//! The `smartbeak-control-plane` binary: `run` (the default) is the long-running service,
//! `batch <operation>` one run now. The library holds the operations and the runner; this
//! file is the wiring: configuration, logs, database, metrics, admin port, shutdown.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use metrics_exporter_prometheus::PrometheusBuilder;
use smartbeak_api::startup;
use smartbeak_control_plane::config::{BatchArgs, Cli, Command, CommonArgs, RunArgs};
use smartbeak_control_plane::operations::content_scheduler::ContentScheduler;
use smartbeak_control_plane::operations::export_retention::ExportRetention;
use smartbeak_control_plane::operations::keyword_sync::KeywordSync;
use smartbeak_control_plane::operations::keyword_sync::Providers;
use smartbeak_control_plane::operations::{Operation, OperationName};
use smartbeak_control_plane::runner::{
    Mode, RunContext, RunOptions, RunOutcome, RunStatus, run_once,
};
use smartbeak_control_plane::service::spawn_operation;
use smartbeak_database::{Database, DatabaseConfig};
use smartbeak_resilience::Policy;
use smartbeak_resilience::{AdapterName, Resilience, ResilienceConfig};
use smartbeak_shutdown::admin::AdminServer;
use smartbeak_shutdown::telemetry::{self, LogFormat, LogGuard, Output};
use smartbeak_shutdown::{HandlerGuard, Shutdown, ShutdownReason};
use smartbeak_utils::fetch::HttpClient;

const APPLICATION_NAME: &str = "smartbeak-control-plane";

/// How long the database pools get to close at shutdown, in milliseconds (as in the api).
const POOL_CLOSE_ENV: &str = "SHUTDOWN_POOL_CLOSE_MS";
const DEFAULT_POOL_CLOSE: Duration = Duration::from_secs(5);

/// Exit code of a configuration error (as of a usage error).
const EXIT_CONFIG: u8 = 2;

/// Exit code of `batch` when another runner holds the operation's lock.
const EXIT_LOCK_HELD: u8 = 3;

fn main() -> ExitCode {
    let command = match Cli::try_parse() {
        Ok(Cli {
            command: Some(command),
        }) => command,
        Ok(Cli { command: None }) => match Cli::try_parse_from([APPLICATION_NAME, "run"]) {
            Ok(Cli {
                command: Some(command),
            }) => command,
            Ok(_) => return ExitCode::from(2),
            Err(e) => return clap_exit(&e),
        },
        Err(e) => return clap_exit(&e),
    };
    let output = match command {
        Command::Run(_) => Output::Stdout,
        // stdout carries the summary line.
        Command::Batch(_) => Output::Stderr,
    };
    let logs = match LogFormat::from_env().and_then(|format| telemetry::init(format, output)) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("{APPLICATION_NAME}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The runtime's teardown is bounded, so a handler stuck in blocking code still ends
    // with the report's exit code.
    let code = smartbeak_shutdown::run_main(async {
        let result = match command {
            Command::Run(args) => serve(args, &logs).await,
            Command::Batch(args) => batch(args, &logs).await,
        };
        result.unwrap_or_else(|e| {
            if e.is::<ConfigError>() {
                tracing::error!(
                    error = format!("{e:#}"),
                    "control-plane refused its configuration"
                );
                ExitCode::from(EXIT_CONFIG)
            } else {
                tracing::error!(error = format!("{e:#}"), "control-plane failed to start");
                ExitCode::FAILURE
            }
        })
    });
    logs.flush();
    code
}

/// Prints clap's message (help, version or a usage error) and returns its exit code,
/// without `std::process::exit`.
fn clap_exit(error: &clap::Error) -> ExitCode {
    let _ = error.print();
    if error.use_stderr() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

/// The settings read before anything starts; every error here is a configuration error
/// (exit code 2).
struct Settings {
    db: DatabaseConfig,
    pool_close: Duration,
    providers: Providers,
    policy: Policy,
}

/// Reads and checks the configuration of `common`: the database's, the providers', the
/// pool-close deadline, and how they fit together.
fn settings(
    common: &CommonArgs,
    runs_at_once: usize,
    keyword_sync: bool,
    shutdown: &Shutdown,
) -> Result<Settings, ConfigError> {
    let invalid = |what: &str, e: anyhow::Error| ConfigError(format!("{what}: {e:#}"));
    let pool_close = pool_close_deadline(|name| std::env::var(name).ok())
        .map_err(|e| invalid("invalid shutdown configuration", e))?;
    let db = DatabaseConfig::from_env()
        .map_err(|e| invalid("invalid database configuration", e.into()))?;
    common
        .check(&db, runs_at_once)
        .map_err(|e| invalid("invalid configuration", e))?;
    let provider_deadline = common
        .provider_deadline(drain_deadline(shutdown), keyword_sync)
        .map_err(|e| invalid("invalid configuration", e))?;
    let providers = common
        .providers(|name| std::env::var(name).ok())
        .map_err(|e| invalid("invalid keyword provider configuration", e))?;
    let policy = common
        .provider_policy(provider_deadline)
        .map_err(|e| invalid("invalid keyword provider configuration", e))?;
    Ok(Settings {
        db,
        pool_close,
        providers,
        policy,
    })
}

/// The drain deadline in effect: `SHUTDOWN_DRAIN_TIMEOUT_MS` (by default two thirds of
/// `SHUTDOWN_TIMEOUT_MS`), never past the overall deadline.
fn drain_deadline(shutdown: &Shutdown) -> Duration {
    let config = shutdown.config();
    config
        .drain_timeout
        .unwrap_or(config.timeout)
        .min(config.timeout)
}

/// A configuration error: `main` exits 2 (README, "Exit codes").
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ConfigError(String);

/// The database, connected (and migrated unless `DB_RUN_MIGRATIONS=false`), with its pools
/// registered for release; `Err(code)` when a signal ended start-up.
async fn start(
    shutdown: &Shutdown,
    settings: &Settings,
) -> anyhow::Result<Result<(Database, HandlerGuard), ExitCode>> {
    startup::connect_database(
        shutdown,
        settings.db.clone(),
        APPLICATION_NAME,
        settings.pool_close,
    )
    .await
}

/// The three operations over `db`, with one `Resilience` for the process.
struct Operations {
    content: Arc<ContentScheduler>,
    keywords: Arc<KeywordSync>,
    exports: Arc<ExportRetention>,
}

fn operations(
    db: &Database,
    common: &CommonArgs,
    settings: Settings,
) -> anyhow::Result<Operations> {
    let Settings {
        providers, policy, ..
    } = settings;
    let client = HttpClient::builder(Resilience::new(ResilienceConfig::default()))
        .user_agent(concat!(
            "smartbeak-control-plane/",
            env!("CARGO_PKG_VERSION")
        ))
        .adapter(AdapterName::Gsc, policy.clone())
        .adapter(AdapterName::Ahrefs, policy)
        .build()
        .context("building the http client")?;
    // The breakers exist (and show in /metrics) from the start.
    let _ = client.breaker(AdapterName::Gsc);
    let _ = client.breaker(AdapterName::Ahrefs);
    Ok(Operations {
        content: Arc::new(ContentScheduler::new(db.clone())),
        keywords: Arc::new(KeywordSync::new(db.clone(), client, providers)),
        exports: Arc::new(ExportRetention::new(db.clone(), common.export_dir.clone())),
    })
}

fn context(db: &Database, common: &CommonArgs, shutdown: &Shutdown) -> RunContext {
    RunContext {
        db: db.clone(),
        runner: common.runner(),
        heartbeat: Duration::from_millis(common.heartbeat_ms),
        stale_after: Duration::from_millis(common.stale_after_ms),
        cancel: shutdown.token(),
        page_size: smartbeak_control_plane::runner::DEFAULT_PAGE_SIZE,
        drain: Some(drain_deadline(shutdown)),
    }
}

async fn serve(args: RunArgs, logs: &LogGuard) -> anyhow::Result<ExitCode> {
    let shutdown = Shutdown::from_env()
        .map_err(|e| ConfigError(format!("invalid shutdown configuration: {e}")))?;
    let enabled = OperationName::ALL
        .into_iter()
        .filter(|op| args.interval(*op).is_some())
        .count();
    let keyword_sync = args.interval(OperationName::KeywordSync).is_some();
    let settings = settings(&args.common, enabled, keyword_sync, &shutdown)?;
    shutdown
        .listen_for_signals()
        .context("cannot listen for signals")?;
    logs.flush_on_force_exit(&shutdown);

    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    startup::spawn_metrics_upkeep(&shutdown, metrics.clone());
    let (db, _db_guard) = match start(&shutdown, &settings).await? {
        Ok(started) => started,
        Err(code) => return Ok(code),
    };
    let admin = AdminServer::bind(args.admin_addr).await.with_context(|| {
        format!(
            "binding the admin listener on {} (CP_ADMIN_ADDR)",
            args.admin_addr
        )
    })?;
    let admin_addr = admin.local_addr();
    let ops = operations(&db, &args.common, settings)?;
    let enabled_ops: Vec<OperationName> = OperationName::ALL
        .into_iter()
        .filter(|op| args.interval(*op).is_some())
        .collect();
    smartbeak_control_plane::metrics::register(&enabled_ops);
    admin.serve(&shutdown, Some(metrics), startup::database_ready(&db));
    tracing::info!("admin listening on http://{admin_addr}");

    let ctx = context(&db, &args.common, &shutdown);
    let options = args.common.run_options(Mode::SettleAll, false);
    let mut scheduled = Vec::new();
    for operation in OperationName::ALL {
        let Some(every) = args.interval(operation) else {
            tracing::info!(%operation, "operation disabled (interval 0)");
            continue;
        };
        scheduled.push(operation.as_str());
        match operation {
            OperationName::ContentScheduler => {
                spawn_operation(&shutdown, ops.content.clone(), ctx.clone(), options, every);
            }
            OperationName::KeywordSync => {
                spawn_operation(&shutdown, ops.keywords.clone(), ctx.clone(), options, every);
            }
            OperationName::ExportRetention => {
                spawn_operation(&shutdown, ops.exports.clone(), ctx.clone(), options, every);
            }
        }
    }
    tracing::info!(runner = %ctx.runner, operations = ?scheduled, "control-plane ready");
    shutdown.triggered().await;
    Ok(shutdown.run().await.exit_code())
}

async fn batch(args: BatchArgs, logs: &LogGuard) -> anyhow::Result<ExitCode> {
    let shutdown = Shutdown::from_env()
        .map_err(|e| ConfigError(format!("invalid shutdown configuration: {e}")))?;
    let keyword_sync = args.operation == OperationName::KeywordSync;
    let settings = settings(&args.common, 1, keyword_sync, &shutdown)?;
    shutdown
        .listen_for_signals()
        .context("cannot listen for signals")?;
    logs.flush_on_force_exit(&shutdown);
    let (db, _db_guard) = match start(&shutdown, &settings).await? {
        Ok(started) => started,
        Err(code) => return Ok(code),
    };
    let ops = operations(&db, &args.common, settings)?;
    let ctx = context(&db, &args.common, &shutdown);
    let mode = if args.strict {
        Mode::Strict
    } else {
        Mode::SettleAll
    };
    let options = args.common.run_options(mode, args.dry_run);
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(0);
        if let Ok(style) = ProgressStyle::with_template(
            "{prefix} [{bar:40}] {pos}/{len} items ({per_sec}, eta {eta})",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(args.operation.as_str());
        bar
    });
    let outcome = match args.operation {
        OperationName::ContentScheduler => {
            one_run(&*ops.content, &ctx, options, bar.as_ref()).await
        }
        OperationName::KeywordSync => one_run(&*ops.keywords, &ctx, options, bar.as_ref()).await,
        OperationName::ExportRetention => one_run(&*ops.exports, &ctx, options, bar.as_ref()).await,
    };
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let code = match outcome {
        Ok(RunOutcome::Ran(report)) => {
            #[allow(clippy::print_stdout)]
            {
                println!("{}", report.summary());
            }
            if report.failed > 0 || report.status == RunStatus::Failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Ok(RunOutcome::LockHeld(operation)) => {
            #[allow(clippy::print_stdout)]
            {
                println!("{operation}: not run: another runner holds its lock");
            }
            ExitCode::from(EXIT_LOCK_HELD)
        }
        Ok(RunOutcome::StillRunning { operation, run_id }) => {
            #[allow(clippy::print_stdout)]
            {
                println!("{operation}: not run: run {run_id} of another runner is still running");
            }
            ExitCode::from(EXIT_LOCK_HELD)
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "the run could not start");
            ExitCode::FAILURE
        }
    };
    // Release the pools through the same handlers a signal would run.
    shutdown.trigger(ShutdownReason::Requested("batch finished".into()));
    let report = shutdown.run().await;
    if code == ExitCode::SUCCESS {
        Ok(report.exit_code())
    } else {
        Ok(code)
    }
}

async fn one_run<O: Operation>(
    op: &O,
    ctx: &RunContext,
    options: RunOptions,
    bar: Option<&ProgressBar>,
) -> Result<RunOutcome, smartbeak_control_plane::runner::RunError> {
    run_once(op, ctx, options, bar).await
}

/// `SHUTDOWN_POOL_CLOSE_MS` (a positive number of milliseconds), default 5 s.
fn pool_close_deadline(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Duration> {
    match lookup(POOL_CLOSE_ENV) {
        None => Ok(DEFAULT_POOL_CLOSE),
        Some(raw) => match raw.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
            _ => anyhow::bail!(
                "{POOL_CLOSE_ENV} is invalid: {raw:?} is not a positive number of milliseconds"
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_close_deadline_is_read_from_the_environment() {
        let read = |value: Option<&str>| {
            pool_close_deadline(|name| {
                assert_eq!(name, POOL_CLOSE_ENV);
                value.map(str::to_owned)
            })
        };
        assert_eq!(read(None).ok(), Some(Duration::from_secs(5)));
        assert_eq!(read(Some("750")).ok(), Some(Duration::from_millis(750)));
        let err = read(Some("0")).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "SHUTDOWN_POOL_CLOSE_MS is invalid: \"0\" is not a positive number of milliseconds"
            )
        );
    }
}
