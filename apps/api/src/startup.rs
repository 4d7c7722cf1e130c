//! The start-up wiring every service binary shares (`smartbeak-api`,
//! `smartbeak-domain-export worker`, `smartbeak-control-plane`): the metrics recorder and
//! its upkeep task, the database connected under the shutdown (a signal ends the connect
//! and the migrations), its pools registered for release, the admin port's database
//! readiness check, and the `--help` text of the
//! variables the database and shutdown crates read.
//!
//! It lives here, in the api's library, because it needs both `smartbeak-database` and
//! `smartbeak-shutdown`, which know nothing of each other (ARCHITECTURE.md, invariants);
//! every binary already depends on this library.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use smartbeak_database::{Database, DatabaseConfig};
use smartbeak_shutdown::admin::Check;
use smartbeak_shutdown::{HandlerGuard, Phase, RegisterError, Shutdown};

/// The name of the handler that closes the database pools (phase `Release`).
pub const POOL_HANDLER: &str = "db-pools";

/// How often the metrics recorder's upkeep runs (histogram buckets, idle keys).
pub const METRICS_UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The `--help` lines of the variables `smartbeak-database`, `smartbeak-shutdown` and the
/// log set-up read (not flags), with their defaults.
pub const DATABASE_AND_SHUTDOWN_HELP: &str = "\
Database and shutdown variables (defaults in brackets):
  DATABASE_URL                       the primary database (required)
  ANALYTICS_DB_URL                   a read replica for analytics reads [the primary]
  ANALYTICS_DB_PING_INTERVAL_MS      [5000]
  DB_STATEMENT_TIMEOUT_MS            server-side statement timeout [8000]
  DB_LONG_READ_TIMEOUT_MS            statement timeout inside a long read (an export) [1800000]
  DB_STREAM_GAP_TIMEOUT_MS           a long read's longest wait for the next row [30000]
  DB_IDLE_IN_TRANSACTION_TIMEOUT_MS  [60000]
  DB_POOL_MIN / DB_POOL_MAX          pool size [2 / 20]
  DB_IDLE_TIMEOUT_MS                 [30000]
  DB_ACQUIRE_TIMEOUT_MS              [5000]
  DB_MAX_LIFETIME_MS                 [1800000]
  DB_PING_BYPASS_MS                  [1000]
  DB_TCP_KEEPALIVE                   [true]
  DB_RUN_MIGRATIONS                  apply pending migrations on start [true]
  SHUTDOWN_TIMEOUT_MS                overall shutdown deadline [25000]
  SHUTDOWN_DRAIN_TIMEOUT_MS          in-flight work gets this long to finish [2/3 of SHUTDOWN_TIMEOUT_MS]
  SHUTDOWN_READINESS_DELAY_MS        [0]
  SHUTDOWN_POOL_CLOSE_MS             the pools get this long to close [5000]
  LOG_FORMAT                         text or json [text]
  RUST_LOG                           log filter [info]";

/// The shared default of `SHUTDOWN_DRAIN_TIMEOUT_MS` in [`DATABASE_AND_SHUTDOWN_HELP`].
pub const SHARED_DRAIN_DEFAULT: &str = "[2/3 of SHUTDOWN_TIMEOUT_MS]";

/// [`DATABASE_AND_SHUTDOWN_HELP`] with `default` in place of the shared default of
/// `SHUTDOWN_DRAIN_TIMEOUT_MS` ([`SHARED_DRAIN_DEFAULT`]), for a binary with a drain
/// default of its own (the export worker), so its `--help` shows one default.
pub fn shutdown_help_with_drain_default(default: &str) -> String {
    DATABASE_AND_SHUTDOWN_HELP.replacen(SHARED_DRAIN_DEFAULT, default, 1)
}

/// What a start-up step gives: its value, or the exit code of the shutdown a signal
/// started meanwhile (the handlers registered so far released what was open).
pub type Started<T> = Result<T, ExitCode>;

/// Runs the upkeep of `metrics` (the handle of the recorder the binary installed: only
/// binaries install one) every [`METRICS_UPKEEP_EVERY`] in a task tracked by `shutdown`
/// (it stops at shutdown).
pub fn spawn_metrics_upkeep(shutdown: &Shutdown, metrics: PrometheusHandle) {
    let token = shutdown.token();
    shutdown.spawn(async move {
        let mut tick = tokio::time::interval(METRICS_UPKEEP_EVERY);
        while token.run_until_cancelled(tick.tick()).await.is_some() {
            metrics.run_upkeep();
        }
    });
}

/// Connects to the database as `application_name`, registers the [`POOL_HANDLER`]
/// (closing the pools within `pool_close`, phase `Release`) and applies the migrations
/// unless `DB_RUN_MIGRATIONS=false`. The connect and the migrations end at the first
/// signal (a migration's transaction dropped mid-way is rolled back by the server): then
/// the shutdown runs and its exit code is returned as `Ok(Err(code))`. Keep the guard for
/// as long as the pools are in use.
///
/// # Errors
///
/// The connect or a migration failed.
pub async fn connect_database(
    shutdown: &Shutdown,
    config: DatabaseConfig,
    application_name: &str,
    pool_close: Duration,
) -> anyhow::Result<Started<(Database, HandlerGuard)>> {
    let run_migrations = config.run_migrations;
    let Some(db) = shutdown
        .until_triggered(Database::connect(config, application_name))
        .await
        .transpose()
        .context("connecting to the database")?
    else {
        return Ok(Err(interrupted_start_up(
            shutdown,
            "connecting to the database",
        )
        .await));
    };
    let pools = db.clone();
    let guard = match shutdown.register_with_timeout(
        POOL_HANDLER,
        Phase::Release,
        pool_close,
        move || async move { pools.close(pool_close).await },
    ) {
        Ok(guard) => guard,
        // The signal came just after the connect: close the pools here, then report.
        Err(RegisterError::ShutdownStarted { .. }) => {
            db.close(pool_close).await?;
            return Ok(Err(interrupted_start_up(
                shutdown,
                "connecting to the database",
            )
            .await));
        }
    };
    if run_migrations {
        match shutdown
            .until_triggered(smartbeak_database::migrate(db.primary()))
            .await
        {
            Some(migrated) => {
                migrated.context("applying migrations (set DB_RUN_MIGRATIONS=false to skip)")?;
            }
            None => {
                return Ok(Err(
                    interrupted_start_up(shutdown, "applying migrations").await
                ));
            }
        }
    }
    Ok(Ok((db, guard)))
}

/// The admin port's readiness check: `db` answers a ping on a connection of the check's
/// own, outside the pools ([`smartbeak_database::Pinger`]: busy workers holding every pool
/// connection are not an unreachable database); `/readyz` names `database` when it does
/// not answer.
pub fn database_ready(db: &Database) -> Check {
    let pinger = db.pinger();
    std::sync::Arc::new(move || {
        let pinger = pinger.clone();
        Box::pin(async move { pinger.ping().await.map_err(|_| "database".to_owned()) })
    })
}

/// A signal ended start-up during `step`: logs it and runs the shutdown (the handlers
/// registered so far release what is open); returns the report's exit code.
pub async fn interrupted_start_up(shutdown: &Shutdown, step: &str) -> ExitCode {
    tracing::info!(step, "shutdown requested during start-up; not running");
    shutdown.run().await.exit_code()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_default_of_its_own_replaces_the_shared_one() {
        let line = |help: &str| {
            help.lines()
                .find(|l| l.trim_start().starts_with("SHUTDOWN_DRAIN_TIMEOUT_MS"))
                .map(str::to_owned)
        };
        let shared = line(DATABASE_AND_SHUTDOWN_HELP).unwrap_or_default();
        assert!(shared.ends_with(SHARED_DRAIN_DEFAULT), "{shared}");
        let own = shutdown_help_with_drain_default("[4/5]");
        let replaced = line(&own).unwrap_or_default();
        assert!(replaced.ends_with("[4/5]"), "{replaced}");
        assert!(!own.contains(SHARED_DRAIN_DEFAULT), "{own}");
    }
}
