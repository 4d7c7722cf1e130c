//! Fresh, migrated databases for tests (feature `testing`).
//!
//! Each [`TestDatabase`] is a new database with a unique name on the server that
//! `DATABASE_URL` points at (default `postgres://postgres@127.0.0.1:5432/postgres`), so tests
//! running at once never see each other's rows. Names carry the run (`SMARTBEAK_TEST_RUN`,
//! see [`run_prefix`]) so a test runner can drop whatever a run left behind.

use std::time::Duration;

use crate::{DatabaseConfig, DbError, SecretUrl};

/// The variable naming the test run in database names.
pub const RUN_VAR: &str = "SMARTBEAK_TEST_RUN";

/// How long the [`Drop`] fallback of [`TestDatabase`] waits for its `DROP DATABASE`.
const DROP_BOUND: Duration = Duration::from_secs(10);

/// The prefix of every test database name of this run: `sb_test_<run>_`, where `<run>` is
/// [`RUN_VAR`] lowercased, with every character outside `[a-z0-9_]` replaced by `_`, cut to
/// 20 characters (`local` when unset or empty).
///
/// A test database's name is this prefix followed by 32 lowercase hex digits (at most 61
/// characters, under PostgreSQL's 63), so a runner drops exactly one run's databases by
/// matching `^<prefix>[0-9a-f]{32}$` (a bare `LIKE '<prefix>%'` would also match a run whose
/// name merely starts with this one's followed by `_`).
pub fn run_prefix() -> String {
    format!(
        "sb_test_{}_",
        run_id(std::env::var(RUN_VAR).ok().as_deref())
    )
}

fn run_id(raw: Option<&str>) -> String {
    let id: String = raw
        .unwrap_or_default()
        .trim()
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .take(20)
        .collect();
    if id.is_empty() { "local".into() } else { id }
}

/// A uniquely named, migrated database. Drop it with [`TestDatabase::drop_database`]; if a
/// test ends without that (it panicked), dropping the value drops the database, best effort.
#[derive(Debug)]
pub struct TestDatabase {
    admin: SecretUrl,
    url: SecretUrl,
    name: String,
    /// Whether `Drop` still has to drop the database.
    armed: bool,
}

impl TestDatabase {
    /// The admin URL: `DATABASE_URL`, else the local default.
    pub fn admin_url() -> Result<SecretUrl, DbError> {
        let raw = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        Ok(SecretUrl::parse("DATABASE_URL", &raw)?)
    }

    /// Creates and migrates a new database named [`run_prefix`] plus a UUID.
    pub async fn create() -> Result<Self, DbError> {
        let admin = Self::admin_url()?;
        let name = format!("{}{}", run_prefix(), uuid::Uuid::new_v4().simple());
        let conn = admin_pool(&admin).await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&conn)
            .await
            .map_err(DbError::Query)?;
        conn.close().await;
        let url = admin.with_database(&name);
        // From here on, an error drops the new database on the way out.
        let created = Self {
            admin,
            url,
            name,
            armed: true,
        };
        let pool = sqlx::PgPool::connect(created.url.expose())
            .await
            .map_err(DbError::Query)?;
        crate::migrate(&pool).await?;
        pool.close().await;
        Ok(created)
    }

    /// The database's URL.
    pub fn url(&self) -> &SecretUrl {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A default configuration for this database.
    pub fn config(&self) -> DatabaseConfig {
        let mut config = DatabaseConfig::new(self.url.expose())
            .unwrap_or_else(|_| unreachable!("the URL was validated on creation"));
        config.url = self.url.clone();
        config
    }

    /// Drops the database, ending any sessions still connected to it.
    pub async fn drop_database(mut self) -> Result<(), DbError> {
        drop_named(&self.admin, &self.name).await?;
        self.armed = false;
        Ok(())
    }
}

impl Drop for TestDatabase {
    /// The fallback for a test that did not reach `drop_database`: drops the database from a
    /// thread of its own with a runtime of its own (this may run on a tokio worker, even
    /// mid-panic), waiting for it at most ten seconds. Errors are ignored.
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("sb-test-db-drop".into())
            .spawn(move || {
                if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    let _ = runtime.block_on(async {
                        tokio::time::timeout(DROP_BOUND, drop_named(&admin, &name)).await
                    });
                }
                let _ = done.send(());
            });
        if spawned.is_ok() {
            let _ = finished.recv_timeout(DROP_BOUND + Duration::from_secs(1));
        }
    }
}

async fn drop_named(admin: &SecretUrl, name: &str) -> Result<(), DbError> {
    let conn = admin_pool(admin).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&conn)
        .await
        .map_err(DbError::Query)?;
    conn.close().await;
    Ok(())
}

async fn admin_pool(admin: &SecretUrl) -> Result<sqlx::PgPool, DbError> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(admin.expose())
        .await
        .map_err(|source| DbError::Connect {
            target: "admin",
            url: admin.redacted(),
            source,
        })
}

/// The plan PostgreSQL picks for `sql` as a *generic* plan (`plan_cache_mode =
/// force_generic_plan`, the plan a prepared statement switches to after five executions),
/// with parameters of `types` bound to the SQL literals `args`: `EXPLAIN EXECUTE` of a
/// `PREPARE`d statement, one line of the plan per line. The session's settings are reset
/// afterwards.
///
/// Tests use it to check that a query's index condition survives a generic plan (a
/// `$n IS NULL OR ...` filter does not: the planner cannot know `$n` at plan time).
pub async fn explain_generic(
    conn: &mut sqlx::PgConnection,
    sql: &str,
    types: &[&str],
    args: &[String],
) -> Result<String, sqlx::Error> {
    sqlx::raw_sql("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await?;
    sqlx::raw_sql(&format!(
        "PREPARE explain_generic_shape ({}) AS {sql}",
        types.join(", ")
    ))
    .execute(&mut *conn)
    .await?;
    let plan: Result<Vec<String>, sqlx::Error> = sqlx::query_scalar(&format!(
        "EXPLAIN EXECUTE explain_generic_shape ({})",
        args.join(", ")
    ))
    .fetch_all(&mut *conn)
    .await;
    sqlx::raw_sql("DEALLOCATE explain_generic_shape; RESET plan_cache_mode")
        .execute(&mut *conn)
        .await?;
    Ok(plan?.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_id_is_sanitised_and_bounded() {
        assert_eq!(run_id(None), "local");
        assert_eq!(run_id(Some("")), "local");
        assert_eq!(run_id(Some("  ")), "local");
        assert_eq!(run_id(Some("ci_42")), "ci_42");
        assert_eq!(run_id(Some("CI-Run 7/é")), "ci_run_7__");
        assert_eq!(run_id(Some("x; DROP DATABASE y")), "x__drop_database_y");
        let long = run_id(Some(&"a".repeat(100)));
        assert_eq!(long.len(), 20);
        // The longest name fits PostgreSQL's 63-byte identifiers.
        let name = format!("sb_test_{long}_{}", uuid::Uuid::new_v4().simple());
        assert_eq!(name.len(), 61);
    }
}
