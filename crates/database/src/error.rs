//! The error type of the database layer.

use std::time::Duration;

/// What went wrong talking to PostgreSQL. Messages never contain a password.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] crate::ConfigError),
    /// The first connection to a pool could not be made.
    #[error("cannot connect to {target} database at {url}")]
    Connect {
        /// `primary` or `analytics`.
        target: &'static str,
        /// The redacted URL.
        url: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// No connection became free within the acquire timeout, and none came back to the
    /// pool meanwhile or none could be opened: the database or the path to it is not
    /// answering (sqlx says `PoolTimedOut` for both this and [`DbError::PoolSaturated`]).
    #[error("timed out after {0:?} waiting for a database connection")]
    AcquireTimeout(Duration),
    /// No connection became free within the acquire timeout although the database kept
    /// answering: every connection of the pool was checked out the whole time and
    /// connections came back to the pool (their release ping answered) to the callers
    /// queued ahead. The pool is saturated, the server is not down: load to shed, not an
    /// outage.
    #[error("every database connection stayed busy for {0:?} (pool saturated)")]
    PoolSaturated(Duration),
    /// A query did not finish within the client-side bound (statement timeout plus a margin):
    /// the connection is probably black-holed.
    #[error("query did not complete within {0:?}")]
    QueryTimeout(Duration),
    /// A streaming read ([`Snapshot`](crate::Snapshot)) received no row or frame for the gap
    /// timeout: the query stalled or the connection is black-holed.
    #[error("no data received from the database for {0:?}")]
    StreamGap(Duration),
    /// The server cancelled the statement (SQLSTATE 57014, `statement_timeout`).
    #[error("statement cancelled by the server after statement_timeout")]
    StatementTimeout(#[source] sqlx::Error),
    /// Any other driver error.
    #[error("database query failed")]
    Query(#[source] sqlx::Error),
    /// Applying migrations failed.
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The pools did not close within the shutdown deadline.
    #[error("database pools did not close within {0:?}")]
    CloseTimeout(Duration),
    /// The background task running a cancel-safe `BEGIN` failed.
    #[error("transaction start was aborted")]
    BeginAborted,
    /// A statement of this transaction timed out and its connection was discarded: the
    /// transaction is over (the server rolls it back).
    #[error("the transaction's connection was discarded after a timeout")]
    Discarded,
    /// The server does not run with the session settings sent in the startup packet (a
    /// pooler such as PgBouncer dropped the `options` parameter).
    #[error(
        "{target} database ignores the session settings: {setting} is {actual:?}, expected {expected:?} \
         (a pooler dropping the startup `options`? PgBouncer needs them passed through, or session pooling)"
    )]
    SettingsIgnored {
        /// `primary` or `analytics`.
        target: &'static str,
        /// The setting checked, e.g. `statement_timeout`.
        setting: &'static str,
        /// What the server reported.
        actual: String,
        /// What the configuration asked for.
        expected: String,
    },
}

impl DbError {
    /// True for every kind of timeout (acquire, a saturated pool's acquire, client-side
    /// query bound, server statement timeout).
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            Self::AcquireTimeout(_)
                | Self::PoolSaturated(_)
                | Self::QueryTimeout(_)
                | Self::StreamGap(_)
                | Self::StatementTimeout(_)
        )
    }

    /// True when the server or the path to it failed (not the statement): acquire and
    /// client-side timeouts, I/O, TLS and protocol errors, a closed pool, and a session the
    /// server ended ([`is_connection_sqlstate`]: `pg_terminate_backend`, a server shutting
    /// down); not [`DbError::PoolSaturated`], where the server answers. A replica is dropped
    /// after a few of these in a row.
    pub fn is_connection_failure(&self) -> bool {
        match self {
            Self::AcquireTimeout(_)
            | Self::QueryTimeout(_)
            | Self::StreamGap(_)
            | Self::Connect { .. } => true,
            Self::Query(e) => {
                matches!(
                    e,
                    sqlx::Error::Io(_)
                        | sqlx::Error::Tls(_)
                        | sqlx::Error::Protocol(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::WorkerCrashed
                ) || is_connection_error(e)
            }
            _ => false,
        }
    }

    /// Classifies a driver error: a pool timeout and SQLSTATE 57014 get their own variants.
    pub fn from_sqlx(error: sqlx::Error, acquire_timeout: Duration) -> Self {
        match &error {
            sqlx::Error::PoolTimedOut => Self::AcquireTimeout(acquire_timeout),
            sqlx::Error::Database(db) if db.code().as_deref() == Some("57014") => {
                Self::StatementTimeout(error)
            }
            _ => Self::Query(error),
        }
    }
}

/// True for the SQLSTATEs of a session the server ended or could not serve, not of the
/// statement: class 08 (connection exception) and `57P01` admin_shutdown (a backend ended
/// by `pg_terminate_backend` or a fast shutdown), `57P02` crash_shutdown, `57P03`
/// cannot_connect_now (starting up or in recovery), `57P04` database_dropped and `57P05`
/// idle_session_timeout. `57014` (query_canceled, a statement timeout) is not one of them.
pub fn is_connection_sqlstate(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("57P")
}

/// True when `error` is a database error with a [`is_connection_sqlstate`] code.
pub(crate) fn is_connection_error(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().is_some_and(|code| is_connection_sqlstate(&code)))
}

#[cfg(test)]
mod tests {
    use super::is_connection_sqlstate;

    #[test]
    fn connection_sqlstates_are_class_08_and_the_57p_operator_interventions() {
        for code in [
            "08000", // connection_exception
            "08003", // connection_does_not_exist
            "08006", // connection_failure
            "08001", // sqlclient_unable_to_establish_sqlconnection
            "08004", // sqlserver_rejected_establishment_of_sqlconnection
            "08P01", // protocol_violation
            "57P01", // admin_shutdown (pg_terminate_backend, a fast shutdown)
            "57P02", // crash_shutdown
            "57P03", // cannot_connect_now
            "57P04", // database_dropped
            "57P05", // idle_session_timeout
        ] {
            assert!(is_connection_sqlstate(code), "{code} is a connection state");
        }
        for code in [
            "57014", // query_canceled: a statement timeout, the session is fine
            "57000", // operator_intervention, the class itself
            "40001", // serialization_failure
            "40P01", // deadlock_detected
            "23505", // unique_violation
            "53300", // too_many_connections: the server answers, refuses a new session
            "55P03", // lock_not_available
            "25P02", // in_failed_sql_transaction
            "XX000", // internal_error
            "00000", // successful_completion
            "", "8000", // not a class-08 code, only a prefix of one
        ] {
            assert!(
                !is_connection_sqlstate(code),
                "{code:?} is not a connection state"
            );
        }
    }
}
