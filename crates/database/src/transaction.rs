//! [`Tx`]: a transaction on a primary connection whose every statement, `COMMIT` and
//! `ROLLBACK` is bounded like [`crate::Database::run`], and whose connection is discarded
//! (never returned to the pool) once a bound fires.

use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgTransactionManager;
use sqlx::{PgConnection, Postgres, TransactionManager};
use tokio::time::Instant;

use crate::{DbError, Inner, discard};

/// A transaction started by [`crate::Database::begin`].
///
/// Statements run through [`Tx::run`]; [`Tx::commit`] or [`Tx::rollback`] ends it. Dropped
/// while open, it queues a `ROLLBACK` that runs as the connection goes back to the pool (as
/// `sqlx::Transaction` does); dropped mid-statement (a cancelled [`Tx::run`]), it discards
/// its connection instead. After a timed-out statement its connection is gone: later
/// calls fail with [`DbError::Discarded`] and the server ends the session (its transaction
/// rolls back).
pub struct Tx {
    inner: Arc<Inner>,
    /// `None` once discarded after a timeout.
    conn: Option<PoolConnection<Postgres>>,
    open: bool,
    /// A statement is in flight: dropped now (a cancelled caller), the connection is
    /// discarded rather than sent back through sqlx's unbounded release ping.
    busy: bool,
}

impl std::fmt::Debug for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("open", &self.open)
            .field("discarded", &self.conn.is_none())
            .finish_non_exhaustive()
    }
}

impl Tx {
    /// Runs `BEGIN` on `conn` until `deadline`, then `SET LOCAL statement_timeout` when
    /// `statement_timeout` is set; on timeout the connection is discarded.
    pub(crate) async fn begin(
        inner: Arc<Inner>,
        mut conn: PoolConnection<Postgres>,
        deadline: Instant,
        bound: Duration,
        statement_timeout: Option<Duration>,
    ) -> Result<Self, DbError> {
        let begin = async {
            PgTransactionManager::begin(&mut conn, None).await?;
            if let Some(limit) = statement_timeout {
                // A whole number of milliseconds, never from input: no injection possible.
                let set = format!("SET LOCAL statement_timeout = {}", limit.as_millis());
                sqlx::query(&set).execute(&mut *conn).await?;
            }
            Ok::<(), sqlx::Error>(())
        };
        match tokio::time::timeout_at(deadline, begin).await {
            Ok(Ok(())) => Ok(Self {
                inner,
                conn: Some(conn),
                open: true,
                busy: false,
            }),
            Ok(Err(e)) => Err(inner.count_query_error(inner.classify(e))),
            Err(_) => {
                discard(conn);
                Err(inner.count_query_error(DbError::QueryTimeout(bound)))
            }
        }
    }

    /// Runs `work` inside the transaction, bounded by
    /// [`crate::DatabaseConfig::query_timeout`]; errors are classified and counted as in
    /// [`crate::Database::run`]. When the bound fires the connection is discarded.
    pub async fn run<T>(
        &mut self,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, DbError> {
        let bound = crate::deadline::bounded(self.inner.config.query_timeout());
        if self.busy {
            // The previous `run` was dropped mid-statement: the session's state is unknown.
            self.discard();
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(DbError::Discarded);
        };
        self.busy = true;
        let outcome = tokio::time::timeout(bound, work(conn)).await;
        self.busy = false;
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.inner.count_query_error(self.inner.classify(e))),
            Err(_) => {
                self.discard();
                Err(self.inner.count_query_error(DbError::QueryTimeout(bound)))
            }
        }
    }

    /// Commits, bounded like [`Tx::run`].
    pub async fn commit(mut self) -> Result<(), DbError> {
        self.run(async |conn| PgTransactionManager::commit(conn).await)
            .await?;
        self.open = false;
        Ok(())
    }

    /// Rolls back, bounded like [`Tx::run`].
    pub async fn rollback(mut self) -> Result<(), DbError> {
        self.run(async |conn| PgTransactionManager::rollback(conn).await)
            .await?;
        self.open = false;
        Ok(())
    }

    fn discard(&mut self) {
        if let Some(conn) = self.conn.take() {
            discard(conn);
        }
        self.open = false;
    }
}

/// The server-side statement timeout of a transaction that has `left` before its deadline
/// (see [`crate::deadline`]): nine tenths of it, so the server cancels a statement before
/// the client bound fires; `None` when that is not below the configured
/// `DB_STATEMENT_TIMEOUT_MS` (nothing to lower, no extra round trip).
pub(crate) fn nested_statement_timeout(configured: Duration, left: Duration) -> Option<Duration> {
    let limit = (left * 9 / 10).max(Duration::from_millis(1));
    (limit < configured).then_some(limit)
}

impl Drop for Tx {
    fn drop(&mut self) {
        if self.busy {
            self.discard();
        } else if self.open
            && let Some(conn) = self.conn.as_mut()
        {
            // Queued on the connection; sqlx's release path flushes it before the
            // connection is handed out again.
            PgTransactionManager::start_rollback(conn);
        }
    }
}
