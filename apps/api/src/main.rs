//! The `smartbeak-api` binary: `serve` (the default) runs the HTTP API; `migrate`,
//! `orgs create` and `keys create|revoke` are the admin commands (JSON on stdout).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use metrics_exporter_prometheus::PrometheusBuilder;
use smartbeak_api::config::{ApiConfig, LogFormat};
use smartbeak_api::ratelimit::RateLimiter;
use smartbeak_api::{AppState, auth, startup};
use smartbeak_database::{Database, DatabaseConfig};
use smartbeak_shutdown::telemetry::{self, LogGuard, Output};
use smartbeak_shutdown::{Phase, RegisterError, Shutdown};
use uuid::Uuid;

/// The variables `smartbeak-api` reads besides the database and shutdown ones (it has no
/// flags for them), for `--help`.
const API_VARIABLES: &str = "\
API variables (defaults in brackets):
  API_BIND                     listen address [127.0.0.1:8080]
  HTTP_BODY_LIMIT_BYTES        [1048576]
  HTTP_REQUEST_TIMEOUT_MS      [10000]
  HTTP_MAX_CONCURRENCY         requests served at once; more are shed with 503 [1024]
  HTTP_HEADER_READ_TIMEOUT_MS  a connection gets this long to send a request head [10000]
  HTTP_MAX_CONNECTIONS         connections served at once [4096]
  REDIS_URL                    the rate limiter's Redis [unset: in-process limiter]
  REDIS_CLUSTER_URLS           comma-separated seed nodes of a Redis Cluster instead of
                               REDIS_URL (not both) [unset]
  REDIS_CONNECT_TIMEOUT_MS     [1000]
  REDIS_COMMAND_TIMEOUT_MS     [100]
  REDIS_RECONNECT_MIN_MS       [100]
  REDIS_RECONNECT_MAX_MS       [5000]
  REDIS_BREAKER_FAILURES       [3]
  REDIS_BREAKER_COOLDOWN_MS    [500]
  RATE_LIMIT_ENABLED           [true]
  RATE_LIMIT_PER_KEY           requests per window per API key [600]
  RATE_LIMIT_PER_IP            requests per window per client IP [1200]
  RATE_LIMIT_WINDOW_SECS       [60]
  RATE_LIMIT_FAIL_CLOSED       [false]
  RATE_LIMIT_REPLICAS          [1]
  RATE_LIMIT_KEY_PREFIX        [smartbeak:rl]
  TRUSTED_PROXIES              CIDRs whose X-Forwarded-For is read [empty: none]
  ANALYTICS_CACHE_TTL_MS       [5000]
  AUTH_CACHE_CAPACITY          API keys cached in-process at most [10000]
  AUTH_CACHE_TTL_MS            a valid key is trusted this long without a lookup [5000]
  AUTH_CACHE_NEGATIVE_TTL_MS   an unknown/revoked key is refused this long without one [2000]
  API_KEY_LAST_USED_INTERVAL_MS  api_keys.last_used_at written in a batch this often, each
                               key at most once, and at shutdown [60000]
  ANALYTICS_CACHE_MAX_BYTES    serialised report bytes cached [67108864]
  ANALYTICS_REPORT_TOP_N       keywords / content items listed per report [100]
  EXPORT_DIR                   where export files live [./exports]";

/// Every variable the binary reads, for `--help`.
fn variables_help() -> String {
    format!("{API_VARIABLES}\n\n{}", startup::DATABASE_AND_SHUTDOWN_HELP)
}

#[derive(Debug, Parser)]
#[command(
    name = "smartbeak-api",
    version,
    about = "The SmartBeak HTTP API",
    after_help = variables_help()
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Apply the database migrations.
    Migrate,
    /// Manage orgs.
    Orgs {
        #[command(subcommand)]
        command: OrgsCommand,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Debug, Subcommand)]
enum OrgsCommand {
    /// Create an org; prints `{"id": ...}`.
    Create {
        /// Display name.
        #[arg(long)]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key for an org; prints the key once, with its id.
    Create {
        /// The org's id.
        #[arg(long)]
        org: Uuid,
        /// A label for humans.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Revoke a key by id.
    Revoke {
        /// The key's id (as printed by `keys create`).
        id: Uuid,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match ApiConfig::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("smartbeak-api: {err}");
            return ExitCode::from(2);
        }
    };
    let serving = matches!(cli.command, None | Some(Command::Serve));
    let logs = if serving {
        telemetry::init(config.log_format, Output::Stdout)
    } else {
        telemetry::init(LogFormat::Text, Output::Stderr)
    };
    let logs = match logs {
        Ok(logs) => logs,
        Err(err) => {
            eprintln!("smartbeak-api: {err}");
            return ExitCode::FAILURE;
        }
    };
    // The runtime's teardown is bounded: a task stuck in blocking code (e.g. a connection
    // past the drain deadline) cannot hold the process after its report.
    let code = smartbeak_shutdown::run_main(async {
        let result = match cli.command {
            None | Some(Command::Serve) => serve(config, &logs).await,
            Some(command) => admin(command).await.map(|()| ExitCode::SUCCESS),
        };
        result.unwrap_or_else(|err| {
            tracing::error!(error = format!("{err:#}"), "smartbeak-api failed");
            ExitCode::FAILURE
        })
    });
    logs.flush();
    code
}

async fn admin(command: Command) -> anyhow::Result<()> {
    let db_config = DatabaseConfig::from_env().context("database configuration")?;
    let db = Database::connect(db_config, "smartbeak-api-admin")
        .await
        .context("connecting to the database")?;
    let out = match command {
        Command::Serve => unreachable!("handled by main"),
        Command::Migrate => {
            smartbeak_database::migrate(db.primary())
                .await
                .context("migrating")?;
            serde_json::json!({"migrated": true})
        }
        Command::Orgs {
            command: OrgsCommand::Create { name },
        } => {
            let id = auth::create_org(&db, &name)
                .await
                .context("creating the org")?;
            serde_json::json!({"id": id, "name": name})
        }
        Command::Keys {
            command: KeysCommand::Create { org, name },
        } => serde_json::to_value(
            auth::create_key(&db, org, &name)
                .await
                .context("creating the key (does the org exist?)")?,
        )?,
        Command::Keys {
            command: KeysCommand::Revoke { id },
        } => {
            if !auth::revoke_key(&db, id)
                .await
                .context("revoking the key")?
            {
                anyhow::bail!("no active key with id {id}");
            }
            serde_json::json!({"id": id, "revoked": true})
        }
    };
    println!("{out}");
    db.close(Duration::from_secs(5)).await.ok();
    Ok(())
}

async fn serve(config: ApiConfig, logs: &LogGuard) -> anyhow::Result<ExitCode> {
    let shutdown = Shutdown::from_env().context("shutdown configuration")?;
    shutdown
        .listen_for_signals()
        .context("installing signal handlers")?;
    logs.flush_on_force_exit(&shutdown);

    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    startup::spawn_metrics_upkeep(&shutdown, metrics.clone());

    // Every slow start-up step (connect, migrations, waiting for Redis) ends at the first
    // signal; what is open by then is released by the registered handlers and the process
    // exits with the report's code.
    let db_config = DatabaseConfig::from_env().context("database configuration")?;
    config
        .check_timeouts(&db_config)
        .context("timeouts must nest")?;
    let (db, _database) = match startup::connect_database(
        &shutdown,
        db_config,
        "smartbeak-api",
        config.pool_close_deadline,
    )
    .await?
    {
        Ok(started) => started,
        Err(code) => return Ok(code),
    };

    let limiter = RateLimiter::new(config.rate_limit.clone(), config.redis.as_ref())
        .context("rate limiter configuration (REDIS_URL / REDIS_CLUSTER_URLS)")?;
    limiter.register_metrics();
    smartbeak_api::http::register_metrics();
    if !config.rate_limit.enabled {
        tracing::warn!("RATE_LIMIT_ENABLED=false: requests are not rate limited");
    } else if config.redis.is_none() {
        tracing::warn!(
            per_key = config.rate_limit.per_key,
            per_ip = config.rate_limit.per_ip,
            "neither REDIS_URL nor REDIS_CLUSTER_URLS is set: rate limiting with the in-process limiter (limits hold per process, not across replicas)"
        );
    } else {
        let connect_timeout = config
            .redis
            .as_ref()
            .map_or(Duration::ZERO, |r| r.connect_timeout);
        let Some(reachable) = shutdown
            .until_triggered(limiter.wait_for_redis(connect_timeout))
            .await
        else {
            return Ok(startup::interrupted_start_up(&shutdown, "waiting for redis").await);
        };
        if reachable {
            tracing::info!(
                fail_closed = config.rate_limit.fail_closed,
                replicas = config.rate_limit.replicas,
                "rate limiting in redis"
            );
        } else {
            tracing::warn!(
                fail_closed = config.rate_limit.fail_closed,
                "redis is not reachable at start-up; serving anyway, the limiter fails open or closed until it is"
            );
        }
    }

    let bind = config.bind;
    let serve_config = smartbeak_api::serve::ServeConfig {
        header_read_timeout: config.http.header_read_timeout,
        max_connections: config.http.max_connections,
    };
    let last_used_interval = config.auth_cache.last_used_interval;
    let state = AppState::new(db.clone(), config, limiter, Some(metrics));
    let readiness = state.readiness.clone();
    // Revocations reach the key cache through LISTEN/NOTIFY (see `auth_cache`).
    let keys = std::sync::Arc::clone(&state.keys);
    let usage = std::sync::Arc::clone(&state.keys);
    let (listen_db, listen_stop) = (db.clone(), shutdown.token());
    shutdown.spawn(async move { keys.listen(&listen_db, &listen_stop).await });
    let app = smartbeak_api::app(state);

    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("binding {bind}"))?;
    let addr = listener.local_addr().context("reading the bound address")?;

    let _readiness =
        match shutdown.register("readiness", Phase::StopAccepting, move || async move {
            readiness.shut_down();
        }) {
            Ok(guard) => guard,
            // The database handler made it in before the trigger and runs with the report.
            Err(RegisterError::ShutdownStarted { .. }) => {
                return Ok(startup::interrupted_start_up(&shutdown, "binding the listener").await);
            }
        };

    // The server is a tracked task: once the readiness flip is done and
    // SHUTDOWN_READINESS_DELAY_MS has passed (the listener token), it stops accepting (the
    // listener is dropped), and the drain phase waits for in-flight requests to finish, up
    // to SHUTDOWN_DRAIN_TIMEOUT_MS.
    // `api_keys.last_used_at`: written in batches, and once more after the last request.
    let served = tokio_util::sync::CancellationToken::new();
    let _key_usage = match smartbeak_api::key_usage::install(
        &shutdown,
        std::sync::Arc::clone(usage.usage()),
        db.clone(),
        last_used_interval,
        served.clone(),
    ) {
        Ok(guard) => guard,
        Err(RegisterError::ShutdownStarted { .. }) => {
            return Ok(startup::interrupted_start_up(&shutdown, "binding the listener").await);
        }
    };

    let stop = shutdown.listener_token();
    let server = smartbeak_api::serve::serve(listener, app, serve_config, stop.cancelled_owned());
    shutdown.spawn(async move {
        server.await;
        served.cancel();
    });
    tracing::info!("listening on http://{addr}");

    shutdown.triggered().await;
    Ok(shutdown.run().await.exit_code())
}
