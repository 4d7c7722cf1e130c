//! The operations: each loads its due items a page at a time (`LIMIT` and a keyset, so a
//! run's memory is bounded whatever the backlog) and processes a batch of them, one
//! outcome per item. The [`crate::runner`] owns everything around that (lock, run row,
//! pages, batches, modes, recording, stopping).
//!
//! - [`content_scheduler`]: publishes due `scheduled` content, a whole batch per
//!   statement, isolating a failed batch's rows with savepoints (or bisecting).
//! - [`keyword_sync`]: fetches keyword metrics per configured source (`gsc`, `ahrefs`)
//!   through `smartbeak_utils::fetch` and upserts them on their natural key.
//! - [`export_retention`]: deletes expired export files, `expiring` before the delete and
//!   `expired` after it.

use std::fmt;
use std::future::Future;
use std::num::NonZeroUsize;

use tokio_util::sync::CancellationToken;

pub mod content_scheduler;
pub mod export_retention;
pub mod keyword_sync;

/// The operations, by their CLI and `batch_runs.operation` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum OperationName {
    /// Publish `scheduled` content whose `publish_at` has passed.
    ContentScheduler,
    /// Fetch keyword metrics from the configured providers.
    KeywordSync,
    /// Delete expired export files and mark their rows expired.
    ExportRetention,
}

impl OperationName {
    /// Every operation.
    pub const ALL: [OperationName; 3] = [
        Self::ContentScheduler,
        Self::KeywordSync,
        Self::ExportRetention,
    ];

    /// `content-scheduler`, `keyword-sync` or `export-retention`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ContentScheduler => "content-scheduler",
            Self::KeywordSync => "keyword-sync",
            Self::ExportRetention => "export-retention",
        }
    }

    /// The second key of the operation's advisory lock
    /// (`pg_try_advisory_lock(LOCK_CLASS, key)`).
    pub const fn lock_key(self) -> i32 {
        match self {
            Self::ContentScheduler => 1,
            Self::KeywordSync => 2,
            Self::ExportRetention => 3,
        }
    }
}

impl fmt::Display for OperationName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to an item that did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemOutcome {
    /// The item was processed.
    Done,
    /// Nothing to do any more (e.g. the row changed since it was loaded).
    Skipped,
    /// Not started: the run's stop token (shutdown, lost lock) fired first. Counted as
    /// skipped.
    NotStarted,
}

/// Why an item failed, and how many times it was tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemError {
    /// A message naming what was wrong (never a credential).
    pub error: String,
    /// Statements or requests the item was part of.
    pub attempts: u32,
}

impl ItemError {
    /// An error after one attempt.
    pub fn once(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            attempts: 1,
        }
    }
}

impl ItemError {
    /// An item still in flight when the runner cancelled it, shortly before the shutdown
    /// drain deadline ([`Stop::in_flight`]).
    pub fn cancelled() -> Self {
        Self::once(
            "cancelled in flight shortly before the shutdown drain deadline; its outcome is \
             unknown (a statement may have committed) and the next run takes it up again",
        )
    }
}

/// What stops the items of a run (the runner's tokens, given to
/// [`Operation::process_batch`]).
#[derive(Debug, Clone, Default)]
pub struct Stop {
    /// Once fired (shutdown, a lost lock) no further item, nor statement of an item,
    /// starts: those items are [`ItemOutcome::NotStarted`].
    pub starting: CancellationToken,
    /// Once fired (shortly before the shutdown drain deadline, see
    /// [`crate::runner::finish_margin`]) the items still in flight are cancelled: their
    /// provider requests and statements are dropped and they fail with
    /// [`ItemError::cancelled`]. Fires only after [`Stop::starting`].
    pub in_flight: CancellationToken,
}

impl Stop {
    /// `work`, or `None` when [`Stop::in_flight`] fires first.
    pub async fn unless_cancelled<F: Future>(&self, work: F) -> Option<F::Output> {
        self.in_flight.run_until_cancelled(work).await
    }
}

/// How items are run inside a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parallelism {
    /// `concurrency` batches in flight, each one unit of work (a statement).
    Batches,
    /// One batch at a time; `concurrency` items of it in flight.
    ItemsInBatch,
}

/// One operation: its due items and how a batch of them is processed.
pub trait Operation: Send + Sync + 'static {
    /// One unit of work (a content id, a keyword source, an expired export).
    type Item: Send + 'static;

    /// Where a page of items ends: the keyset the next page starts after.
    type Cursor: Clone + Send + Sync + 'static;

    /// The operation's name.
    fn name(&self) -> OperationName;

    /// How `--concurrency` applies.
    fn parallelism(&self) -> Parallelism;

    /// What the run was asked beyond the common params, for `batch_runs.params`.
    fn params(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Up to `limit` items due now, in processing order, after `after` (the cursor of the
    /// last item of the previous page; `None` for the first page). A page shorter than
    /// `limit` is the last.
    fn load_page(
        &self,
        after: Option<Self::Cursor>,
        limit: usize,
    ) -> impl Future<Output = anyhow::Result<Vec<Self::Item>>> + Send;

    /// The keyset of `item`, for [`Operation::load_page`].
    fn cursor(&self, item: &Self::Item) -> Self::Cursor;

    /// The id recorded in `batch_run_items.item_id`.
    fn item_id(&self, item: &Self::Item) -> String;

    /// Processes one batch: one outcome per item, in order. Once [`Stop::starting`] has
    /// fired no further item (or statement) starts: those items are
    /// [`ItemOutcome::NotStarted`]; the ones in flight finish, unless
    /// [`Stop::in_flight`] fires too: then they are [`ItemError::cancelled`].
    fn process_batch(
        &self,
        batch: Vec<Self::Item>,
        concurrency: NonZeroUsize,
        stop: &Stop,
    ) -> impl Future<Output = Vec<Result<ItemOutcome, ItemError>>> + Send;
}

/// Runs `f` over `batch`, `concurrency` at a time, starting no item after
/// [`Stop::starting`] fired (those are [`ItemOutcome::NotStarted`]) and cancelling those in
/// flight when [`Stop::in_flight`] fires ([`ItemError::cancelled`]): the shared body of
/// the per-item operations.
pub(crate) async fn each_item<T, F, Fut>(
    batch: Vec<T>,
    concurrency: NonZeroUsize,
    stop: &Stop,
    mut f: F,
) -> Vec<Result<ItemOutcome, ItemError>>
where
    F: FnMut(T) -> Fut,
    Fut: Future<Output = Result<ItemOutcome, ItemError>>,
{
    let item = |t: T| {
        let work = f(t);
        async move {
            stop.unless_cancelled(work)
                .await
                .unwrap_or_else(|| Err(ItemError::cancelled()))
        }
    };
    smartbeak_utils::concurrency::map_bounded(batch, concurrency, item, Some(stop.starting.clone()))
        .await
        .into_iter()
        .map(|r| match r {
            Ok(outcome) => Ok(outcome),
            Err(smartbeak_utils::concurrency::ItemError::Failed(e)) => Err(e),
            Err(smartbeak_utils::concurrency::ItemError::NotStarted) => Ok(ItemOutcome::NotStarted),
        })
        .collect()
}

/// The message of an error and its sources, `: `-separated.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
