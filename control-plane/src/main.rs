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

/// How long the database pools get to close at shutdown, in milliseconds (as in the api).
const POOL_CLOSE_ENV: &str = "SHUTDOWN_POOL_CLOSE_MS";
const DEFAULT_POOL_CLOSE: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let logs =
        match LogFormat::from_env().and_then(|format| telemetry::init(format, Output::Stdout)) {
            Ok(guard) => guard,
            Err(e) => {
                eprintln!("{APPLICATION_NAME}: {e}");
                return ExitCode::FAILURE;
            }
        };
    // The runtime's teardown is bounded, so a handler stuck in blocking code still ends
    // with the report's exit code.
    let code = smartbeak_shutdown::run_main(async {
        match run(&logs).await {
            Ok(code) => code,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "control-plane failed to start");
                ExitCode::FAILURE
            }
        }
    });
    logs.flush();
    code
}

async fn run(logs: &telemetry::LogGuard) -> anyhow::Result<ExitCode> {
    let shutdown = Shutdown::from_env().context("invalid shutdown configuration")?;
    shutdown
        .listen_for_signals()
        .context("cannot listen for signals")?;
    logs.flush_on_force_exit(&shutdown);

    let pool_close = pool_close_deadline(|name| std::env::var(name).ok())?;
    let config = DatabaseConfig::from_env().context("invalid database configuration")?;
    let run_migrations = config.run_migrations;
    // Start-up steps end at the first signal; the report's code is the exit code.
    let Some(db) = shutdown
        .until_triggered(Database::connect(config, APPLICATION_NAME))
        .await
        .transpose()?
    else {
        return Ok(interrupted_start_up(&shutdown, "connecting to the database").await);
    };
    let pools = db.clone();
    let registered = shutdown.register_with_timeout(
        "db-pools",
        Phase::Release,
        pool_close,
        move || async move { pools.close(pool_close).await },
    );
    let _db_guard = match registered {
        Ok(guard) => guard,
        // The signal came just after the connect: close the pool here, then report.
        Err(RegisterError::ShutdownStarted { .. }) => {
            db.close(pool_close).await?;
            return Ok(interrupted_start_up(&shutdown, "connecting to the database").await);
        }
    };
    if run_migrations {
        match shutdown
            .until_triggered(smartbeak_database::migrate(db.primary()))
            .await
        {
            Some(migrated) => migrated?,
            None => return Ok(interrupted_start_up(&shutdown, "applying migrations").await),
        }
    }

    tracing::info!("control-plane ready (no batch operations are defined yet)");
    shutdown.triggered().await;
    Ok(shutdown.run().await.exit_code())
}

/// A signal ended start-up during `step`: runs the shutdown (the handlers registered so far
/// release what is open) and returns the report's exit code.
async fn interrupted_start_up(shutdown: &Shutdown, step: &str) -> ExitCode {
    tracing::info!(step, "shutdown requested during start-up; not running");
    shutdown.run().await.exit_code()
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
