//! Applies the SmartBeak migrations to `DATABASE_URL` and exits (used by `cargo xtask` and
//! by operators; the binaries also migrate on start unless `DB_RUN_MIGRATIONS=false`).

use std::process::ExitCode;

use smartbeak_database::{SecretUrl, migrate};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
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
