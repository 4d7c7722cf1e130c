//! Applies the SmartBeak migrations to `DATABASE_URL` and exits (used by `cargo xtask` and
//! by operators; the binaries also migrate on start unless `DB_RUN_MIGRATIONS=false`).

use std::process::ExitCode;
use std::time::Duration;

use smartbeak_database::{SecretUrl, migrate};

/// The bound on the runtime's teardown once the work has returned, as
/// `smartbeak_shutdown::run_main` sets it for the service binaries (this crate depends on no
/// other crate of ours, so the few lines are repeated here rather than imported).
const RUNTIME_TEARDOWN: Duration = Duration::from_millis(500);

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("smartbeak-migrate: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run());
    runtime.shutdown_timeout(RUNTIME_TEARDOWN);
    code
}

async fn run() -> ExitCode {
    let url = match std::env::var("DATABASE_URL") {
        Ok(url) => url,
        Err(_) => {
            eprintln!("smartbeak-migrate: DATABASE_URL is not set");
            return ExitCode::from(2);
        }
    };
    let url = match SecretUrl::parse("DATABASE_URL", &url) {
        Ok(url) => url,
        Err(e) => {
            eprintln!("smartbeak-migrate: {e}");
            return ExitCode::from(2);
        }
    };
    let pool = match sqlx::PgPool::connect(url.expose()).await {
        Ok(pool) => pool,
        Err(e) => {
            eprintln!("smartbeak-migrate: cannot connect to {url}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match migrate(&pool).await {
        Ok(()) => {
            let applied = smartbeak_database::MIGRATOR.iter().count();
            eprintln!("smartbeak-migrate: {url} is at the latest schema ({applied} migrations)");
            pool.close().await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "smartbeak-migrate: {e}: {:?}",
                std::error::Error::source(&e)
            );
            ExitCode::FAILURE
        }
    }
}
