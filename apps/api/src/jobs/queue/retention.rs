//! The retention statements on `domain_exports`, for the control-plane's
//! `export-retention` operation: a child of [`super`] (the queue module), which owns every
//! statement on the table, so these live with the others.
//!
//! The order that makes a crash harmless: [`mark_expiring`] (the row says its file is
//! going), delete the file, [`mark_expired`]. A run that dies between the steps leaves an
//! `expiring` row that [`due`] returns again; a file already gone is then not an error.
//! Only a `succeeded` row is ever marked `expiring`, so the worker's fenced writes and the
//! api's cancel (which touch `queued` and `running` rows) never race with retention.

use chrono::{DateTime, Utc};
use smartbeak_database::{Database, DbError};
use uuid::Uuid;

/// An export whose file may be deleted: `succeeded` and past `expires_at`, or already
/// `expiring` (a run stopped between marking and finishing).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ExpiredExport {
    /// The export.
    pub id: Uuid,
    /// `succeeded` or `expiring`.
    pub status: String,
    /// Its file, relative to `EXPORT_DIR` (to be checked with
    /// [`crate::jobs::paths::resolve_inside`]).
    pub storage_path: String,
    /// When it expired.
    pub expires_at: DateTime<Utc>,
}

/// Up to `limit` exports due for deletion at `now`, oldest expiry first (on the
/// `domain_exports_expiry_idx` partial index), after the keyset `after` (the
/// `(expires_at, id)` of the last row of the previous page), so a caller pages through any
/// backlog in bounded memory and rows it failed on are not returned again in the same run.
pub async fn due(
    db: &Database,
    now: DateTime<Utc>,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<ExpiredExport>, DbError> {
    db.run(async |conn| {
        let sql = due_sql(after.is_some());
        let mut query = sqlx::query_as::<_, ExpiredExport>(&sql)
            .bind(now)
            .bind(limit);
        if let Some((at, id)) = after {
            query = query.bind(at).bind(id);
        }
        query.fetch_all(conn).await
    })
    .await
}

/// The text of [`due`]'s statement, with or without the keyset, so that even a generic plan
/// starts the `domain_exports_expiry_idx` scan at the keyset (a `$n IS NULL OR ...`
/// condition would not). `$1` now, `$2` limit, then the keyset's `expires_at` and id.
pub(crate) fn due_sql(with_after: bool) -> String {
    let after = if with_after {
        " AND (expires_at, id) > ($3, $4)"
    } else {
        ""
    };
    format!(
        "SELECT id, status, storage_path, expires_at FROM domain_exports \
         WHERE status IN ('succeeded', 'expiring') AND expires_at <= $1 \
         AND storage_path IS NOT NULL{after} ORDER BY expires_at, id LIMIT $2"
    )
}

/// Marks a due `succeeded` export `expiring` (before its file is deleted). True when the
/// row is now `expiring` (also when it already was); false when it is neither (it is
/// gone, or not due).
pub async fn mark_expiring(db: &Database, id: Uuid, now: DateTime<Utc>) -> Result<bool, DbError> {
    let status: Option<String> = db
        .run(async |conn| {
            sqlx::query_scalar(
                "UPDATE domain_exports SET status = 'expiring', updated_at = now() \
                 WHERE id = $1 AND status IN ('succeeded', 'expiring') AND expires_at <= $2 \
                 RETURNING status",
            )
            .bind(id)
            .bind(now)
            .fetch_optional(conn)
            .await
        })
        .await?;
    Ok(status.is_some())
}

/// Marks an `expiring` export `expired` (after its file was deleted or found missing).
/// True when this call made the change.
pub async fn mark_expired(db: &Database, id: Uuid) -> Result<bool, DbError> {
    let done = db
        .run(async |conn| {
            sqlx::query(
                "UPDATE domain_exports SET status = 'expired', updated_at = now() \
                 WHERE id = $1 AND status = 'expiring'",
            )
            .bind(id)
            .execute(conn)
            .await
        })
        .await?;
    Ok(done.rows_affected() == 1)
}
