//! `content-scheduler`: publishes content items whose status is `scheduled` and whose
//! `publish_at` has passed (setting `published_at`).
//!
//! A batch is one `UPDATE ... WHERE id = ANY($1)`: the cost of a single statement per
//! batch. When that statement fails on a row (a constraint, a trigger), the batch is done
//! again item by item, each item in its own subtransaction ([`Isolation::Savepoints`], the
//! migration's `content_publish_each`), in chunks of at most [`SAVEPOINT_CHUNK`] items,
//! one statement (and so one transaction) per chunk: PostgreSQL caches 64 subtransactions
//! per backend, and a transaction with more overflows that cache and slows every
//! snapshot on the server. So only the failing rows fail and the cost of isolation is
//! paid only by the batches that had a failure. [`Isolation::Bisect`] (split in halves down to the failing rows) is the other
//! strategy, kept because the benchmark compares them (docs/bench/HISTORY.md). Connection errors
//! and timeouts are not isolated: they fail the rows of the statement that met them
//! (retrying row by row would only multiply the load on a sick server).

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::ops::Range;

use smartbeak_database::{Database, DbError};
use uuid::Uuid;

use chrono::{DateTime, Utc};

use super::{ItemError, ItemOutcome, Operation, OperationName, Parallelism, Stop, error_chain};

/// Most items (so subtransactions) per `content_publish_each` call: PostgreSQL's
/// per-backend subtransaction cache (`PGPROC_MAX_CACHED_SUBXIDS`) holds 64.
pub const SAVEPOINT_CHUNK: usize = 64;

/// The first page of due items (`$1`: the page size).
const FIRST_PAGE_SQL: &str = "SELECT id, publish_at FROM content_items \
     WHERE status = 'scheduled' AND publish_at <= now() \
     ORDER BY publish_at, id LIMIT $1";

/// The page after the keyset `($1, $2)` = `(publish_at, id)` (`$3`: the page size).
const NEXT_PAGE_SQL: &str = "SELECT id, publish_at FROM content_items \
     WHERE status = 'scheduled' AND publish_at <= now() \
     AND (publish_at, id) > ($1, $2) \
     ORDER BY publish_at, id LIMIT $3";

/// One due item, with its keyset `(publish_at, id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DueContent {
    /// The content item.
    pub id: Uuid,
    /// When it was due.
    pub publish_at: DateTime<Utc>,
}

/// How a batch whose one statement failed on a row is narrowed down to the failing rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// The batch again, item by item, each in its own subtransaction, [`SAVEPOINT_CHUNK`]
    /// items per statement (the `content_publish_each` function of the migration). The
    /// default: it costs `ceil(n / 64)` extra statements per failed batch of `n`, whatever
    /// the number of failing rows (docs/bench/HISTORY.md, "Control-plane").
    Savepoints,
    /// Split in halves, recursively, down to the failing rows: about `2 f log2(n / f)`
    /// extra statements for `f` failing rows of `n`. Kept for comparison (the benchmark).
    Bisect,
}

/// The content-scheduler over a database.
#[derive(Debug, Clone)]
pub struct ContentScheduler {
    db: Database,
    strategy: Isolation,
}

impl ContentScheduler {
    /// On `db`, isolating failures with [`Isolation::Savepoints`].
    pub fn new(db: Database) -> Self {
        Self::with_isolation(db, Isolation::Savepoints)
    }

    /// On `db`, with the given isolation strategy.
    pub fn with_isolation(db: Database, strategy: Isolation) -> Self {
        Self { db, strategy }
    }

    /// The batch in one statement; when it fails on a row, item by item with a savepoint
    /// each, [`SAVEPOINT_CHUNK`] items per statement. No chunk starts after `stop`: its
    /// items (rolled back with the batch's statement) are [`ItemOutcome::NotStarted`].
    async fn publish_with_savepoints(
        &self,
        batch: &[Uuid],
        stop: &Stop,
    ) -> Vec<Result<ItemOutcome, ItemError>> {
        let error = match stop.unless_cancelled(self.publish(batch)).await {
            None => return vec![Err(ItemError::cancelled()); batch.len()],
            Some(Ok(published)) => return outcomes(batch, &published),
            Some(Err(error)) => error,
        };
        if !is_row_error(&error) {
            return fail_all(batch.len(), &describe(&error), 1);
        }
        let mut results = Vec::with_capacity(batch.len());
        for chunk in batch.chunks(SAVEPOINT_CHUNK) {
            if stop.starting.is_cancelled() {
                results.resize(batch.len(), Ok(ItemOutcome::NotStarted));
                break;
            }
            match stop.unless_cancelled(self.publish_each(chunk)).await {
                Some(each) => results.extend(each),
                None => results.extend(std::iter::repeat_n(
                    Err(ItemError::cancelled()),
                    chunk.len(),
                )),
            }
        }
        results
    }

    /// `chunk` (at most [`SAVEPOINT_CHUNK`] ids) item by item, a subtransaction each, in
    /// one statement.
    async fn publish_each(&self, chunk: &[Uuid]) -> Vec<Result<ItemOutcome, ItemError>> {
        let each: Result<Vec<(Uuid, bool, Option<String>)>, DbError> = self
            .db
            .run(async |conn| {
                sqlx::query_as(
                    "SELECT item_id, published, error_message FROM content_publish_each($1)",
                )
                .bind(chunk)
                .fetch_all(conn)
                .await
            })
            .await;
        match each {
            Ok(rows) if rows.len() == chunk.len() => rows
                .into_iter()
                .map(|(_, published, error)| match error {
                    Some(error) => Err(ItemError { error, attempts: 2 }),
                    None if published => Ok(ItemOutcome::Done),
                    None => Ok(ItemOutcome::Skipped),
                })
                .collect(),
            Ok(rows) => fail_all(
                chunk.len(),
                &format!(
                    "content_publish_each returned {} rows for {}",
                    rows.len(),
                    chunk.len()
                ),
                2,
            ),
            Err(error) => fail_all(chunk.len(), &describe(&error), 2),
        }
    }

    /// The batch in one statement; when it fails on a row, halves recursively. No step
    /// starts after `stop`: the ranges still pending are [`ItemOutcome::NotStarted`].
    async fn publish_bisecting(
        &self,
        batch: &[Uuid],
        stop: &Stop,
    ) -> Vec<Result<ItemOutcome, ItemError>> {
        let mut results: Vec<Option<Result<ItemOutcome, ItemError>>> = vec![None; batch.len()];
        // Depth-first over the halves of failed ranges, first half first.
        let mut pending: Vec<(Range<usize>, u32)> = vec![(0..batch.len(), 1)];
        while let Some((range, attempts)) = pending.pop() {
            if range.is_empty() {
                continue;
            }
            if stop.starting.is_cancelled() {
                for slot in &mut results[range] {
                    *slot = Some(Ok(ItemOutcome::NotStarted));
                }
                continue;
            }
            let Some(published) = stop
                .unless_cancelled(self.publish(&batch[range.clone()]))
                .await
            else {
                for slot in &mut results[range] {
                    *slot = Some(Err(ItemError::cancelled()));
                }
                continue;
            };
            match published {
                Ok(published) => {
                    for (slot, outcome) in results[range.clone()]
                        .iter_mut()
                        .zip(outcomes(&batch[range], &published))
                    {
                        *slot = Some(outcome);
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

fn outcomes(ids: &[Uuid], published: &HashSet<Uuid>) -> Vec<Result<ItemOutcome, ItemError>> {
    ids.iter()
        .map(|id| {
            Ok(if published.contains(id) {
                ItemOutcome::Done
            } else {
                ItemOutcome::Skipped
            })
        })
        .collect()
}

fn fail_all(n: usize, message: &str, attempts: u32) -> Vec<Result<ItemOutcome, ItemError>> {
    (0..n)
        .map(|_| {
            Err(ItemError {
                error: message.to_owned(),
                attempts,
            })
        })
        .collect()
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
    type Item = DueContent;
    type Cursor = (DateTime<Utc>, Uuid);

    fn name(&self) -> OperationName {
        OperationName::ContentScheduler
    }

    fn parallelism(&self) -> Parallelism {
        Parallelism::Batches
    }

    async fn load_page(
        &self,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: usize,
    ) -> anyhow::Result<Vec<DueContent>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // Two statements rather than `$1 IS NULL OR (publish_at, id) > ($1, $2)`: under a
        // generic plan that OR keeps the row comparison from bounding an index scan of
        // `content_items_due_keyset_idx` (migration 20261202000006).
        let rows: Vec<(Uuid, DateTime<Utc>)> = self
            .db
            .run(async |conn| match after {
                None => {
                    sqlx::query_as(FIRST_PAGE_SQL)
                        .bind(limit)
                        .fetch_all(conn)
                        .await
                }
                Some((at, id)) => {
                    sqlx::query_as(NEXT_PAGE_SQL)
                        .bind(at)
                        .bind(id)
                        .bind(limit)
                        .fetch_all(conn)
                        .await
                }
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, publish_at)| DueContent { id, publish_at })
            .collect())
    }

    fn cursor(&self, item: &DueContent) -> (DateTime<Utc>, Uuid) {
        (item.publish_at, item.id)
    }

    fn item_id(&self, item: &DueContent) -> String {
        item.id.to_string()
    }

    async fn process_batch(
        &self,
        batch: Vec<DueContent>,
        _concurrency: NonZeroUsize,
        stop: &Stop,
    ) -> Vec<Result<ItemOutcome, ItemError>> {
        // The batch is one statement: it starts whole or not at all. After a stop, no
        // isolation statement starts either, and the statement in flight is dropped when
        // `stop.in_flight` fires (its items are then failed as cancelled: the statement may
        // have committed), so a batch in flight ends within the drain deadline.
        if stop.starting.is_cancelled() {
            return vec![Ok(ItemOutcome::NotStarted); batch.len()];
        }
        let ids: Vec<Uuid> = batch.iter().map(|item| item.id).collect();
        match self.strategy {
            Isolation::Savepoints => self.publish_with_savepoints(&ids, stop).await,
            Isolation::Bisect => self.publish_bisecting(&ids, stop).await,
        }
    }
}

#[cfg(test)]
mod tests {
    //! The due query's plans: both pages scan `content_items_due_keyset_idx` (the partial
    //! index `(publish_at, id) WHERE status = 'scheduled'`, migration 20261202000006) with
    //! the due bound, and the next page's keyset, in the index condition and take their order
    //! from it (no sort), as a custom plan and as the generic plan a prepared statement
    //! switches to after five executions (`plan_cache_mode = force_generic_plan`).

    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::{FIRST_PAGE_SQL, NEXT_PAGE_SQL};
    use smartbeak_database::testing::{TestDatabase, explain_generic};
    use sqlx::Connection as _;
    use uuid::Uuid;

    /// A statement to explain: what, its SQL, its parameter types, their literals, whether
    /// it has the keyset bound.
    type Shape<'a> = (&'a str, &'a str, &'a [&'a str], &'a [String], bool);

    /// The plan's `Index Cond` lines, joined.
    fn index_conds(plan: &str) -> String {
        plan.lines()
            .filter(|l| l.contains("Index Cond"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `sql` with `$1..$n` replaced by `args`, for a custom plan.
    fn with_literals(sql: &str, args: &[String]) -> String {
        let mut sql = sql.to_owned();
        for (i, arg) in args.iter().enumerate().rev() {
            sql = sql.replace(&format!("${}", i + 1), arg);
        }
        sql
    }

    fn assert_keyset_plan(plan: &str, keyset: bool, what: &str) {
        assert!(
            plan.contains("content_items_due_keyset_idx"),
            "{what}: must scan the due keyset index:\n{plan}"
        );
        let cond = index_conds(plan);
        assert!(
            cond.contains("publish_at <= now()"),
            "{what}: the due bound in the index condition:\n{plan}"
        );
        assert_eq!(
            cond.contains("ROW(publish_at, id) >"),
            keyset,
            "{what}: the keyset (and only on a next page) in the index condition:\n{plan}"
        );
        assert!(
            !plan.contains("Sort"),
            "{what}: the order comes from the index:\n{plan}"
        );
    }

    #[tokio::test]
    async fn the_due_pages_are_bounded_by_the_keyset_index_also_in_a_generic_plan() {
        let tdb = TestDatabase::create().await.unwrap();
        let mut conn = sqlx::PgConnection::connect(tdb.url().expose())
            .await
            .unwrap();
        let (org, domain) = (Uuid::new_v4(), Uuid::new_v4());
        // 20,000 items of which 2,000 are scheduled (half of them due), so a sequential scan
        // is not the cheap choice, then fresh statistics.
        sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, 'plans')")
            .bind(org)
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query("INSERT INTO domains (id, org_id, name) VALUES ($1, $2, 'plans.example')")
            .bind(domain)
            .bind(org)
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO content_items (id, domain_id, title, slug, status, publish_at) \
             SELECT gen_random_uuid(), $1, 't' || i, 's' || i, \
                 CASE WHEN i % 10 = 0 THEN 'scheduled' ELSE 'published' END, \
                 now() + CASE WHEN i % 20 = 0 THEN interval '1 day' ELSE -interval '1 day' END \
                     + i * interval '1 second' \
             FROM generate_series(1, 20000) i",
        )
        .bind(domain)
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::raw_sql("ANALYZE content_items")
            .execute(&mut conn)
            .await
            .unwrap();

        let first_args = ["1000".to_owned()];
        let next_args = [
            "now() - interval '1 day'".to_owned(),
            format!("'{}'", Uuid::nil()),
            "1000".to_owned(),
        ];
        let shapes: [Shape<'_>; 2] = [
            (
                "first page",
                FIRST_PAGE_SQL,
                &["bigint"],
                &first_args,
                false,
            ),
            (
                "next page",
                NEXT_PAGE_SQL,
                &["timestamptz", "uuid", "bigint"],
                &next_args,
                true,
            ),
        ];
        for (what, sql, types, args, keyset) in shapes {
            let generic = explain_generic(&mut conn, sql, types, args).await.unwrap();
            assert_keyset_plan(&generic, keyset, &format!("{what} (generic plan)"));
            let custom: Vec<String> =
                sqlx::query_scalar(&format!("EXPLAIN {}", with_literals(sql, args)))
                    .fetch_all(&mut conn)
                    .await
                    .unwrap();
            assert_keyset_plan(&custom.join("\n"), keyset, &format!("{what} (custom plan)"));
        }
        conn.close().await.unwrap();
        tdb.drop_database().await.unwrap();
    }
}
