//! The control-plane batch service.
//!
//! Today it is the service skeleton that later issues fill: it reads its configuration,
//! connects to PostgreSQL (applying migrations unless `DB_RUN_MIGRATIONS=false`), wires the
//! shutdown coordinator, and waits for SIGTERM/SIGINT. It runs no batch operation yet; the
//! recurring bulk operations (one runner per operation through an advisory lock, every run
//! recorded in `batch_runs`) are a later issue.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use smartbeak_database::{Database, DatabaseConfig};
use smartbeak_shutdown::telemetry::{self, LogFormat, Output};
use smartbeak_shutdown::{Phase, RegisterError, Shutdown};

const APPLICATION_NAME: &str = "smartbeak-control-plane";

fn main() -> ExitCode {
    let logs =
        match LogFormat::from_env().and_then(|format| telemetry::init(format, Output::Stdout)) {
            Ok(guard) => guard,
            Err(e) => {
                eprintln!("{APPLICATION_NAME}: {e}");
                return ExitCode::FAILURE;
            }
        };
    let code = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(async {
            match run(&logs).await {
                Ok(code) => code,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "control-plane failed to start");
                    ExitCode::FAILURE
                }
            }
        }),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the tokio runtime");
            ExitCode::FAILURE
        }
    };
    logs.flush();
    code
}

async fn run(logs: &telemetry::LogGuard) -> anyhow::Result<ExitCode> {
    let shutdown = Shutdown::from_env().context("invalid shutdown configuration")?;
    shutdown
        .listen_for_signals()
        .context("cannot listen for signals")?;
    logs.flush_on_force_exit(&shutdown);

    let config = DatabaseConfig::from_env().context("invalid database configuration")?;
    let run_migrations = config.run_migrations;
    let db = Database::connect(config, APPLICATION_NAME).await?;
    if run_migrations {
        smartbeak_database::migrate(db.primary()).await?;
    }
    let pools = db.clone();
    let registered = shutdown.register("db-pools", Phase::Release, move || async move {
        pools.close(Duration::from_secs(5)).await
    });
    let _db_guard = match registered {
        Ok(guard) => guard,
        // A signal during start-up: nothing runs yet, so close the pool and report.
        Err(RegisterError::ShutdownStarted { .. }) => {
            db.close(Duration::from_secs(5)).await?;
            return Ok(shutdown.run().await.exit_code());
        }
    };

    tracing::info!("control-plane ready (no batch operations are defined yet)");
    shutdown.triggered().await;
    Ok(shutdown.run().await.exit_code())
}
