//! Fresh, migrated databases for tests (feature `testing`).
//!
//! Each [`TestDatabase`] is a new database with a unique name on the server that
//! `DATABASE_URL` points at (default `postgres://postgres@127.0.0.1:5432/postgres`), so tests
//! running at once never see each other's rows.

use crate::{DatabaseConfig, DbError, SecretUrl};

/// A uniquely named, migrated database; drop it with [`TestDatabase::drop_database`].
#[derive(Debug)]
pub struct TestDatabase {
    admin: SecretUrl,
    url: SecretUrl,
    name: String,
}

impl TestDatabase {
    /// The admin URL: `DATABASE_URL`, else the local default.
    pub fn admin_url() -> Result<SecretUrl, DbError> {
        let raw = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        Ok(SecretUrl::parse("DATABASE_URL", &raw)?)
    }

    /// Creates and migrates a new database.
    pub async fn create() -> Result<Self, DbError> {
        let admin = Self::admin_url()?;
        let name = format!("sb_test_{}", uuid::Uuid::new_v4().simple());
        let conn = admin_pool(&admin).await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&conn)
            .await
            .map_err(DbError::Query)?;
        conn.close().await;
        let url = admin.with_database(&name);
        let pool = sqlx::PgPool::connect(url.expose())
            .await
            .map_err(DbError::Query)?;
        crate::migrate(&pool).await?;
        pool.close().await;
        Ok(Self { admin, url, name })
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
    pub async fn drop_database(self) -> Result<(), DbError> {
        let conn = admin_pool(&self.admin).await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&conn)
        .await
        .map_err(DbError::Query)?;
        conn.close().await;
        Ok(())
    }
}

async fn admin_pool(admin: &SecretUrl) -> Result<sqlx::PgPool, DbError> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(admin.expose())
        .await
        .map_err(|source| DbError::Connect {
            target: "admin",
            url: admin.redacted(),
            source,
        })
}
