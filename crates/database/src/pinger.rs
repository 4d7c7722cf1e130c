//! A readiness check on a connection of its own, outside the pools.
//!
//! A readiness probe that pings through the primary pool waits behind the requests when the
//! pool is saturated, times out and reports "database unreachable" for a process that is
//! merely busy: the orchestrator then takes a healthy replica out of service exactly when it
//! is needed. [`Pinger`] keeps one connection to the primary of its own (opened with the
//! pool's connect options, so the same server-side timeouts and application name), opens it
//! again when it failed, and bounds every check, connecting included, by the acquire
//! timeout. It costs one connection per process beside `DB_POOL_MAX`.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{ConnectOptions, PgConnection, postgres::PgConnectOptions};
use tokio::sync::Mutex;

use crate::DbError;

/// A cloneable handle on one dedicated connection for readiness checks; see the module docs.
/// Clones share the connection, and concurrent checks take turns on it.
#[derive(Clone)]
pub struct Pinger {
    options: Arc<PgConnectOptions>,
    bound: Duration,
    conn: Arc<Mutex<Option<PgConnection>>>,
}

impl std::fmt::Debug for Pinger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pinger")
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

impl Pinger {
    pub(crate) fn new(options: Arc<PgConnectOptions>, bound: Duration) -> Self {
        Self {
            options,
            bound,
            conn: Arc::new(Mutex::new(None)),
        }
    }

    /// `SELECT 1` on the dedicated connection (opened first when there is none), the whole
    /// check bounded by the acquire timeout. A failed or timed-out check drops the
    /// connection, so the next one starts on a fresh session.
    pub async fn ping(&self) -> Result<(), DbError> {
        let bound = self.bound;
        let checked = tokio::time::timeout(bound, async {
            let mut slot = self.conn.lock().await;
            let conn = match &mut *slot {
                Some(conn) => conn,
                None => slot.insert(self.options.connect().await?),
            };
            let result = sqlx::query("SELECT 1").execute(&mut *conn).await;
            if result.is_err() {
                *slot = None;
            }
            result.map(|_| ())
        })
        .await;
        match checked {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(DbError::from_sqlx(e, bound)),
            Err(_) => {
                // The future holding the lock was dropped; the connection it was using may
                // be mid-statement on a silent socket: drop it so the next check reconnects.
                if let Ok(mut slot) = self.conn.try_lock() {
                    *slot = None;
                }
                Err(DbError::QueryTimeout(bound))
            }
        }
    }
}
