//! A streaming read snapshot: one analytics connection inside `BEGIN ISOLATION LEVEL
//! REPEATABLE READ READ ONLY`, for reads that take minutes (exports).
//!
//! [`Database::run`](crate::Database::run) bounds a whole call by the statement timeout,
//! which a long read cannot meet. A [`Snapshot`] bounds its statements differently: the
//! server's `statement_timeout` is set for the transaction only (`SET LOCAL`, the long-read
//! bound), and the client gives up when no data arrived for the **gap timeout** (a stalled
//! query or a black-holed connection), whatever the total duration. Every statement sees the
//! same snapshot, so sections read one after another are consistent with each other.
//!
//! Inside a snapshot the text of a timestamp (`COPY`, `::text`) is UTC in ISO form
//! (`2026-03-01 12:00:00.5+00`): the transaction sets `TimeZone = 'UTC'` and
//! `DateStyle = 'ISO'` (`SET LOCAL`), whatever a session-level `SET` left on the pooled
//! connection, so a reader of `COPY` output can rely on that shape (the export's CSV writer
//! does). Binary results are unaffected.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::{FromRow, Postgres};

use crate::{DbError, Inner, ReadSource};

/// Bounds of one [`Snapshot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// The server's `statement_timeout` inside the snapshot (`SET LOCAL`): the longest one
    /// statement may run. Default [`DatabaseConfig::long_read_timeout`](crate::DatabaseConfig::long_read_timeout).
    pub statement_timeout: Duration,
    /// The longest wait for the next row or COPY frame once a statement's first one came,
    /// before the read fails with [`DbError::StreamGap`]. The wait for the first (a sort or
    /// an aggregate answers only when done) is bounded by [`Self::first_frame_bound`]. Default
    /// [`DatabaseConfig::stream_gap_timeout`](crate::DatabaseConfig::stream_gap_timeout).
    pub gap_timeout: Duration,
}

impl SnapshotOptions {
    /// The longest wait for a statement's first row or frame: the statement timeout (the
    /// server cancels the statement then and the error arrives) plus the gap timeout, the
    /// client's own bound when nothing answers at all (a black-holed connection).
    pub fn first_frame_bound(&self) -> Duration {
        self.statement_timeout.saturating_add(self.gap_timeout)
    }
}

/// One connection in a read-only repeatable-read transaction, from the analytics pool
/// (the replica when it answers, else the primary). Made by
/// [`Database::read_snapshot`](crate::Database::read_snapshot).
///
/// Reads stream: [`Snapshot::copy_out`] (`COPY (SELECT ...) TO STDOUT`, frame by frame) and
/// [`Snapshot::fetch`] (rows one by one). Each wait for data is bounded by the gap timeout.
/// End it with [`Snapshot::finish`] (`COMMIT`, the connection goes back to the pool);
/// dropped otherwise, after an error, a gap timeout, or with a stream not read to its end,
/// the connection is discarded (closed, its slot free at once; the server rolls back).
pub struct Snapshot {
    inner: Arc<Inner>,
    conn: Option<PoolConnection<Postgres>>,
    source: ReadSource,
    /// The replica's generation when reading from one: failures count against its health.
    replica: Option<u64>,
    options: SnapshotOptions,
    /// A statement's answer was not read to its end, or an error left the session in doubt:
    /// the connection may not go back to the pool.
    dirty: bool,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("source", &self.source)
            .field("options", &self.options)
            .field("dirty", &self.dirty)
            .finish_non_exhaustive()
    }
}

impl Snapshot {
    /// Starts the transaction on `conn`. The whole start (`BEGIN`, `SET LOCAL`) is bounded by
    /// `bound`; on any failure the connection is discarded (the snapshot is dropped dirty).
    pub(crate) async fn begin(
        inner: Arc<Inner>,
        conn: PoolConnection<Postgres>,
        source: ReadSource,
        options: SnapshotOptions,
        bound: Duration,
    ) -> Result<Self, DbError> {
        let mut snapshot = Self {
            inner,
            conn: Some(conn),
            source,
            replica: None,
            options,
            dirty: true,
        };
        let timeout_ms = options.statement_timeout.as_millis().max(1);
        // One simple-query round trip; the value is a number formatted here. The `SELECT`
        // takes the transaction's snapshot now (PostgreSQL takes it at the first query, not
        // at `BEGIN`), so nothing committed after this call returns is visible.
        // `client_connection_check_interval` (PostgreSQL 14+): a running statement checks
        // every second that the client is still there, so a snapshot discarded after a gap
        // timeout ends its backend (and its snapshot, which holds back vacuum) within about
        // a second, not at the statement timeout.
        // `TimeZone` and `DateStyle`: sqlx sends both at connect (UTC, ISO), but a
        // session-level `SET` on a pooled connection would outlive its caller; `SET LOCAL`
        // pins them for the snapshot (see the module doc).
        let sql = format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
             SET LOCAL statement_timeout = {timeout_ms}; \
             SET LOCAL client_connection_check_interval = 1000; \
             SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO'; SELECT 1"
        );
        let conn = snapshot.conn_mut()?;
        let started = tokio::time::timeout(bound, simple(conn, &sql)).await;
        match started {
            Ok(Ok(_)) => {
                snapshot.dirty = false;
                Ok(snapshot)
            }
            Ok(Err(e)) => Err(snapshot.fail(e)),
            Err(_) => Err(snapshot
                .inner
                .count_query_error(DbError::QueryTimeout(bound))),
        }
    }

    /// Marks the snapshot as reading from replica `generation`.
    pub(crate) fn on_replica(mut self, generation: u64) -> Self {
        self.replica = Some(generation);
        self
    }

    /// Which pool the snapshot reads from.
    pub fn source(&self) -> ReadSource {
        self.source
    }

    /// The snapshot's bounds.
    pub fn options(&self) -> SnapshotOptions {
        self.options
    }

    /// Streams the output of `statement`, a `COPY (SELECT ...) TO STDOUT ...` (no
    /// parameters: `COPY` takes none, so only values formatted by the caller, never text
    /// from a user, may be inlined). Frames come as PostgreSQL sends them (one per row).
    pub async fn copy_out(&mut self, statement: &str) -> Result<CopyOut<'_>, DbError> {
        let gap = self.options.gap_timeout;
        let first = self.options.first_frame_bound();
        let replica = self.replica;
        self.dirty = true;
        // The stream borrows the connection; errors are classified through `inner`.
        let inner = Arc::clone(&self.inner);
        let Some(conn) = self.conn.as_deref_mut() else {
            return Err(DbError::Discarded);
        };
        // Boxed as `Send` here, where the lifetimes are concrete: left to the caller's
        // future, rustc fails to prove it `Send` for every lifetime (rust-lang/rust#102211).
        let start: BoxFuture<'_, Result<BoxStream<'_, _>, sqlx::Error>> =
            Box::pin(conn.copy_out_raw(statement));
        // PostgreSQL answers `CopyOutResponse` before running the query, but the wait is
        // bounded as the first frame's.
        let started = tokio::time::timeout(first, start).await;
        match started {
            Ok(Ok(stream)) => Ok(Rows {
                stream,
                inner,
                gap,
                first: Some(first),
                replica,
                dirty: &mut self.dirty,
            }),
            Ok(Err(e)) => Err(inner.snapshot_error(replica, inner.classify(e))),
            Err(_) => Err(inner.snapshot_error(replica, DbError::StreamGap(first))),
        }
    }

    /// Streams the rows of `query` one by one.
    pub fn fetch<'s, 'q, T>(
        &'s mut self,
        query: sqlx::query::QueryAs<'q, Postgres, T, PgArguments>,
    ) -> Result<Rows<'s, T>, DbError>
    where
        'q: 's,
        T: for<'r> FromRow<'r, PgRow> + Send + Unpin + 's,
    {
        let gap = self.options.gap_timeout;
        let first = self.options.first_frame_bound();
        let replica = self.replica;
        self.dirty = true;
        let inner = Arc::clone(&self.inner);
        let Some(conn) = self.conn.as_deref_mut() else {
            return Err(DbError::Discarded);
        };
        Ok(Rows {
            stream: query.fetch(conn),
            inner,
            gap,
            first: Some(first),
            replica,
            dirty: &mut self.dirty,
        })
    }

    /// Ends the transaction (`COMMIT`, bounded by the gap timeout) and returns the
    /// connection to the pool. A snapshot left dirty (a stream not read to its end) is
    /// discarded instead (logged at `info`), and that is not an error: nothing it read is
    /// in doubt, only the session.
    pub async fn finish(mut self) -> Result<(), DbError> {
        if self.dirty {
            tracing::info!(
                source = ?self.source,
                "read snapshot finished with a statement not read to its end; connection discarded"
            );
            return Ok(());
        }
        let gap = self.options.gap_timeout;
        let conn = self.conn_mut()?;
        match tokio::time::timeout(gap, simple(conn, "COMMIT")).await {
            Ok(Ok(_)) => {
                // Back to the pool (its release hook pings it first).
                drop(self.conn.take());
                Ok(())
            }
            Ok(Err(e)) => Err(self.fail(e)),
            Err(_) => {
                self.dirty = true;
                Err(self
                    .inner
                    .snapshot_error(self.replica, DbError::StreamGap(gap)))
            }
        }
    }

    fn conn_mut(&mut self) -> Result<&mut PoolConnection<Postgres>, DbError> {
        self.conn.as_mut().ok_or(DbError::Discarded)
    }

    fn fail(&mut self, error: sqlx::Error) -> DbError {
        self.dirty = true;
        self.inner
            .snapshot_error(self.replica, self.inner.classify(error))
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Unfinished: the session is inside a transaction, maybe mid-answer. Closing the
            // socket ends both; nothing waits on a path that may have stopped answering.
            crate::discard(conn);
        }
    }
}

/// The frames of one `COPY ... TO STDOUT` ([`Snapshot::copy_out`]): a stream of
/// [`Rows`] whose items are the raw frames, under the same gap timeout.
pub type CopyOut<'s> = Rows<'s, bytes::Bytes>;

/// The rows of one query ([`Snapshot::fetch`]), or the frames of a `COPY` ([`CopyOut`]).
pub struct Rows<'s, T> {
    stream: BoxStream<'s, Result<T, sqlx::Error>>,
    inner: Arc<Inner>,
    gap: Duration,
    /// The bound of the next wait while no row came yet.
    first: Option<Duration>,
    replica: Option<u64>,
    dirty: &'s mut bool,
}

impl<T> std::fmt::Debug for Rows<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rows")
            .field("gap", &self.gap)
            .finish_non_exhaustive()
    }
}

impl<T> Rows<'_, T> {
    /// The next row (or frame), `None` after the last. Fails with [`DbError::StreamGap`]
    /// when nothing arrived for the gap timeout (for the first one:
    /// [`SnapshotOptions::first_frame_bound`]).
    pub async fn next(&mut self) -> Result<Option<T>, DbError> {
        let bound = self.first.take().unwrap_or(self.gap);
        next_bounded(
            &mut self.stream,
            &self.inner,
            self.replica,
            bound,
            self.dirty,
        )
        .await
    }
}

/// Runs `sql` (one or more statements) through the simple-query protocol. Boxed as `Send`
/// here, where the lifetimes are concrete (see [`Snapshot::copy_out`]).
fn simple<'c>(
    conn: &'c mut PoolConnection<Postgres>,
    sql: &'c str,
) -> BoxFuture<'c, Result<sqlx::postgres::PgQueryResult, sqlx::Error>> {
    sqlx::Executor::execute(&mut **conn, sqlx::raw_sql(sql))
}

async fn next_bounded<T>(
    stream: &mut BoxStream<'_, Result<T, sqlx::Error>>,
    inner: &Inner,
    replica: Option<u64>,
    gap: Duration,
    dirty: &mut bool,
) -> Result<Option<T>, DbError> {
    match tokio::time::timeout(gap, stream.next()).await {
        Ok(Some(Ok(item))) => Ok(Some(item)),
        // Read to its end: the session is ready for the next statement.
        Ok(None) => {
            *dirty = false;
            Ok(None)
        }
        Ok(Some(Err(e))) => Err(inner.snapshot_error(replica, inner.classify(e))),
        Err(_) => Err(inner.snapshot_error(replica, DbError::StreamGap(gap))),
    }
}
