//! `content-scheduler`: publishes content items whose status is `scheduled` and whose
//! `publish_at` has passed (setting `published_at`).
//!
//! A batch is one `UPDATE ... WHERE id = ANY($1)`: the cost of a single statement per
//! batch. When that statement fails on a row (a constraint, a trigger), the batch is split
//! in two and each half tried again, down to the failing rows: with `f` failing rows in a
//! batch of `n` the extra statements are about `2 f log2(n / f)`, paid only where the
//! failures are. Connection errors and timeouts are not bisected: they fail the rows of the
//! statement that met them (splitting would only multiply the load on a sick server).

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::ops::Range;

use smartbeak_database::{Database, DbError};
use uuid::Uuid;

use super::{ItemError, ItemOutcome, Operation, OperationName, Parallelism, error_chain};

/// The content-scheduler over a database.
#[derive(Debug, Clone)]
pub struct ContentScheduler {
    db: Database,
}

impl ContentScheduler {
    /// On `db`.
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// One statement: publishes those of `ids` still due; returns the ids it published.
    async fn publish(&self, ids: &[Uuid]) -> Result<HashSet<Uuid>, DbError> {
        let published: Vec<Uuid> = self
            .db
            .run(async |conn| {
                sqlx::query_scalar(
                    "UPDATE content_items SET status = 'published', published_at = now(), \
                     updated_at = now() \
                     WHERE id = ANY($1) AND status = 'scheduled' AND publish_at <= now() \
                     RETURNING id",
                )
                .bind(ids)
                .fetch_all(conn)
                .await
            })
            .await?;
        Ok(published.into_iter().collect())
    }
}

/// True for an error the server raised about the rows (constraint, trigger, data):
/// splitting the batch finds the rows. Anything else (timeouts, connection) is not.
fn is_row_error(error: &DbError) -> bool {
    matches!(error, DbError::Query(sqlx::Error::Database(_)))
}

fn describe(error: &DbError) -> String {
    match error {
        DbError::Query(sqlx::Error::Database(db)) => match db.constraint() {
            Some(constraint) => format!("{} (constraint {constraint})", db.message()),
            None => db.message().to_owned(),
        },
        other => error_chain(other),
    }
}

impl Operation for ContentScheduler {
    type Item = Uuid;

    fn name(&self) -> OperationName {
        OperationName::ContentScheduler
    }

    fn parallelism(&self) -> Parallelism {
        Parallelism::Batches
    }

    async fn load(&self) -> anyhow::Result<Vec<Uuid>> {
        Ok(self
            .db
            .run(async |conn| {
                sqlx::query_scalar(
                    "SELECT id FROM content_items WHERE status = 'scheduled' AND publish_at <= now() \
                     ORDER BY publish_at, id",
                )
                .fetch_all(conn)
                .await
            })
            .await?)
    }

    fn item_id(&self, item: &Uuid) -> String {
        item.to_string()
    }

    async fn process_batch(
        &self,
        batch: Vec<Uuid>,
        _concurrency: NonZeroUsize,
    ) -> Vec<Result<ItemOutcome, ItemError>> {
        let mut results: Vec<Option<Result<ItemOutcome, ItemError>>> = vec![None; batch.len()];
        // Depth-first over the halves of failed ranges, first half first.
        let mut pending: Vec<(Range<usize>, u32)> = vec![(0..batch.len(), 1)];
        while let Some((range, attempts)) = pending.pop() {
            if range.is_empty() {
                continue;
            }
            match self.publish(&batch[range.clone()]).await {
                Ok(published) => {
                    for i in range {
                        results[i] = Some(Ok(if published.contains(&batch[i]) {
                            ItemOutcome::Done
                        } else {
                            ItemOutcome::Skipped
                        }));
                    }
                }
                Err(error) if range.len() > 1 && is_row_error(&error) => {
                    let mid = range.start + range.len() / 2;
                    pending.push((mid..range.end, attempts + 1));
                    pending.push((range.start..mid, attempts + 1));
                }
                Err(error) => {
                    let message = describe(&error);
                    for slot in &mut results[range] {
                        *slot = Some(Err(ItemError {
                            error: message.clone(),
                            attempts,
                        }));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ItemError::once("not processed"))))
            .collect()
    }
}
