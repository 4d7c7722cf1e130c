//! Bounded concurrency and batch processing: a sliding-window [`map_bounded`]
//! whose results come back in input order, its streaming sibling
//! [`for_each_bounded`] for long-running consumers (the export worker: the
//! source is polled only when a slot is free), and the batch helpers
//! ([`process_in_batches`], [`process_in_batches_strict`], [`map_in_batches`],
//! and [`map_batches_bounded`] for work done a whole batch at a time) used by the
//! export job and the control-plane.
//!
//! Every item is settled: one failing item never cancels the others, and each
//! item gets its own `Result` at its own index.
//!
//! # Example
//!
//! ```
//! use std::num::NonZeroUsize;
//!
//! use smartbeak_utils::concurrency::{map_bounded, ItemError};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let results = map_bounded(
//!     vec![1_u32, 2, 3, 4],
//!     NonZeroUsize::new(2).unwrap(),
//!     |n| async move { if n == 3 { Err("three") } else { Ok(n * 10) } },
//!     None,
//! )
//! .await;
//! assert_eq!(results[0], Ok(10));
//! assert_eq!(results[2], Err(ItemError::Failed("three")));
//! assert_eq!(results[3], Ok(40));
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::num::NonZeroUsize;
use std::pin::{Pin, pin};
use std::task::Poll;

use futures::stream::{self, FuturesUnordered, Stream, StreamExt};
use tokio_util::sync::CancellationToken;

/// Largest batch size accepted by the batch helpers. The original service capped it at
/// 100; the control-plane's content-scheduler updates a whole batch in one statement, and
/// its benchmark (docs/bench/HISTORY.md, "Control-plane") measures batches of 1,000, so the cap is
/// 1,000. A helper that runs every item of a batch at once ([`process_in_batches`]) still
/// starts up to this many futures together: pick the size for the work.
pub const MAX_BATCH_SIZE: usize = 1_000;

/// An argument of a batch helper was out of range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConcurrencyError {
    /// A batch helper was called with a batch size outside `1..=MAX_BATCH_SIZE`.
    #[error("batch size must be between 1 and {max}, got {got}", max = MAX_BATCH_SIZE)]
    InvalidBatchSize {
        /// The batch size that was passed.
        got: usize,
    },
}

/// Why one item of [`map_bounded`] has no value. (The batch helpers return
/// the items' own errors: [`map_in_batches`] a `Result<R, E>` per item,
/// [`process_in_batches_strict`] a count of the items it did not start.)
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemError<E> {
    /// The item ran and its future returned this error.
    #[error("item failed: {0}")]
    Failed(E),
    /// The item was never started because `map_bounded`'s cancellation token
    /// fired first.
    #[error("item was not started")]
    NotStarted,
}

/// Runs `f` over `items` with at most `limit` futures in flight at once.
///
/// This is a sliding window, not fixed chunks: a new item starts as soon as any
/// running item finishes, so one slow item never holds back the others. The
/// returned vector has one entry per item, in input order, whatever the order
/// of completion.
///
/// When `cancel` fires, no further item is started; items already running are
/// awaited and settled as usual, and the items never started are reported as
/// [`ItemError::NotStarted`]. To abort running items as well, hand the same
/// token to `f`.
///
/// `limit` is a [`NonZeroUsize`], so there is no invalid limit and no outer
/// error: every item's outcome is in the vector.
pub async fn map_bounded<I, T, R, E, F, Fut>(
    items: I,
    limit: NonZeroUsize,
    mut f: F,
    cancel: Option<CancellationToken>,
) -> Vec<Result<R, ItemError<E>>>
where
    I: IntoIterator<Item = T>,
    F: FnMut(T) -> Fut,
    Fut: Future<Output = Result<R, E>>,
{
    let items = items.into_iter();
    let mut slots: Vec<Option<Result<R, ItemError<E>>>> = Vec::with_capacity(items.size_hint().0);
    let mut source = pin!(stream::iter(items.enumerate()));
    {
        let slots = &mut slots;
        drive_bounded(
            source.as_mut(),
            limit,
            |(index, item)| {
                let fut = f(item);
                async move { (index, fut.await) }
            },
            |_| {},
            |(index, outcome)| {
                // Every started item finishes before the driver returns, so the
                // slots end up covering exactly the items started.
                if slots.len() <= index {
                    slots.resize_with(index + 1, || None);
                }
                slots[index] = Some(outcome.map_err(ItemError::Failed));
            },
            cancel.as_ref(),
        )
        .await;
    }
    // Anything left in the source was never started (cancellation): `stream::iter` is
    // always ready, so this drains it without waiting.
    while source.next().await.is_some() {
        slots.push(Some(Err(ItemError::NotStarted)));
    }
    slots
        .into_iter()
        .map(|slot| slot.unwrap_or(Err(ItemError::NotStarted)))
        .collect()
}

/// Runs `f` on each item of `source` as it comes, with at most `limit` futures
/// in flight at once; returns the number of items started once the source has
/// ended (or `cancel` fired) and every started future has finished.
///
/// The streaming sibling of [`map_bounded`], for a consumer that runs for a
/// long time on a source that waits for work (a job queue): the source is
/// polled only while fewer than `limit` futures are running, so it never
/// produces an item (claims a job) that no slot is free to run, and one slow
/// item never holds back the free slots. Outputs of `f` are dropped; `f`
/// reports its own outcome (a future that wants to run on another thread
/// spawns itself and awaits its `JoinHandle`).
///
/// When `cancel` fires, the source is not polled again (an item it was
/// producing is abandoned with it, so a source with side effects, such as a
/// claim, should rather end by itself at a safe point and pass `None` here);
/// the futures already running are awaited as usual.
///
/// ```
/// use std::num::NonZeroUsize;
///
/// use smartbeak_utils::concurrency::for_each_bounded;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let source = futures::stream::iter(1_u32..=5);
/// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
/// let started = for_each_bounded(source, NonZeroUsize::new(2).unwrap(), |n| {
///     let tx = tx.clone();
///     async move { tx.send(n * 10).unwrap() }
/// }, None)
/// .await;
/// assert_eq!(started, 5);
/// drop(tx);
/// let mut sum = 0;
/// while let Some(v) = rx.recv().await { sum += v; }
/// assert_eq!(sum, 150);
/// # }
/// ```
pub async fn for_each_bounded<S, F, Fut>(
    source: S,
    limit: NonZeroUsize,
    f: F,
    cancel: Option<CancellationToken>,
) -> usize
where
    S: Stream,
    F: FnMut(S::Item) -> Fut,
    Fut: Future,
{
    let mut started = 0;
    let source = pin!(source);
    drive_bounded(source, limit, f, |_| started += 1, |_| {}, cancel.as_ref()).await;
    started
}

/// What the driver's poll found.
enum Event<T, O> {
    /// The source gave an item and a slot is free.
    Item(T),
    /// A running future finished.
    Done(O),
    /// The source ended (or cancellation), and nothing is running.
    End,
}

/// The one sliding window behind [`map_bounded`] and [`for_each_bounded`]:
/// polls `source` only while fewer than `limit` futures run, calls `started`
/// with each item's index (counted from 0) as it starts it, and `done` with
/// each output as it finishes. Stops polling the source once `cancel` fires.
async fn drive_bounded<S, F, Fut, St, D>(
    mut source: Pin<&mut S>,
    limit: NonZeroUsize,
    mut f: F,
    mut started: St,
    mut done: D,
    cancel: Option<&CancellationToken>,
) where
    S: Stream,
    F: FnMut(S::Item) -> Fut,
    Fut: Future,
    St: FnMut(usize),
    D: FnMut(Fut::Output),
{
    let limit = limit.get();
    let mut running = FuturesUnordered::new();
    let mut source_done = false;
    let mut count = 0;
    let mut cancelled = pin!(async {
        match cancel {
            Some(token) => token.cancelled().await,
            None => std::future::pending().await,
        }
    });
    let mut is_cancelled = false;
    loop {
        let event = std::future::poll_fn(|cx| {
            if !running.is_empty()
                && let Poll::Ready(Some(output)) = running.poll_next_unpin(cx)
            {
                return Poll::Ready(Event::Done(output));
            }
            if !is_cancelled && cancelled.as_mut().poll(cx).is_ready() {
                is_cancelled = true;
            }
            if !source_done && !is_cancelled && running.len() < limit {
                match source.as_mut().poll_next(cx) {
                    Poll::Ready(Some(item)) => return Poll::Ready(Event::Item(item)),
                    Poll::Ready(None) => source_done = true,
                    Poll::Pending => {}
                }
            }
            if running.is_empty() && (source_done || is_cancelled) {
                return Poll::Ready(Event::End);
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::Item(item) => {
                started(count);
                count += 1;
                running.push(f(item));
            }
            Event::Done(output) => done(output),
            Event::End => break,
        }
    }
}

/// Progress of a batch helper, reported once after each batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchProgress {
    /// The batch just finished, counted from 1.
    pub batch: usize,
    /// Number of batches in total.
    pub batches: usize,
    /// Items that succeeded so far (all batches up to this one).
    pub succeeded: usize,
    /// Items that failed so far (all batches up to this one).
    pub failed: usize,
}

impl fmt::Display for BatchProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "batch {} of {}: {} succeeded, {} failed",
            self.batch, self.batches, self.succeeded, self.failed
        )
    }
}

/// A progress callback for the batch helpers: pass `None` for no progress.
pub type ProgressFn<'a> = Option<&'a mut (dyn FnMut(BatchProgress) + Send)>;

/// One failed item: its index in the input and its error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemFailure<E> {
    /// Index of the item in the input.
    pub index: usize,
    /// The error the item returned.
    pub error: E,
}

/// Outcome of [`process_in_batches`]: every item was run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchReport<E> {
    /// Number of items that succeeded.
    pub succeeded: usize,
    /// Every failed item, in input order.
    pub failures: Vec<ItemFailure<E>>,
}

/// Error of [`process_in_batches_strict`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrictBatchError<E> {
    /// The batch size was out of range; nothing was run.
    #[error(transparent)]
    Invalid(#[from] ConcurrencyError),
    /// A batch had failures: it was run to its end, later batches were not started.
    #[error(
        "batch {batch} of {batches} failed at item indices {indices:?}; {not_started} later items were not started",
        indices = failed_indices(failures)
    )]
    BatchFailed {
        /// The failed batch, counted from 1.
        batch: usize,
        /// Number of batches in total.
        batches: usize,
        /// Items that succeeded before the run stopped (this batch included).
        succeeded: usize,
        /// Every failed item of the failed batch, in input order.
        failures: Vec<ItemFailure<E>>,
        /// Number of items of later batches that were never started.
        not_started: usize,
    },
}

fn failed_indices<E>(failures: &[ItemFailure<E>]) -> Vec<usize> {
    failures.iter().map(|failure| failure.index).collect()
}

/// Checks a batch size the way every batch helper does (`1..=MAX_BATCH_SIZE`), for a
/// caller that validates its options before doing anything else.
///
/// # Errors
///
/// [`ConcurrencyError::InvalidBatchSize`] outside the range.
pub fn check_batch_size(batch_size: usize) -> Result<(), ConcurrencyError> {
    if (1..=MAX_BATCH_SIZE).contains(&batch_size) {
        Ok(())
    } else {
        Err(ConcurrencyError::InvalidBatchSize { got: batch_size })
    }
}

/// Runs one batch: every item of the batch at once, settled, in input order.
async fn run_batch<T, R, E, F, Fut>(batch: Vec<T>, f: &mut F) -> Vec<Result<R, E>>
where
    F: FnMut(T) -> Fut,
    Fut: Future<Output = Result<R, E>>,
{
    futures::future::join_all(batch.into_iter().map(f)).await
}

/// Splits `items` into batches of `batch_size`, runs the items of one batch
/// concurrently and the batches one after another, and settles every item.
///
/// `progress` is called after each batch.
///
/// # Errors
///
/// [`ConcurrencyError::InvalidBatchSize`] when `batch_size` is not in `1..=MAX_BATCH_SIZE`
/// (nothing is run). Item failures are not errors: they are in the report.
pub async fn process_in_batches<T, R, E, F, Fut>(
    items: Vec<T>,
    batch_size: usize,
    f: F,
    progress: ProgressFn<'_>,
) -> Result<BatchReport<E>, ConcurrencyError>
where
    F: FnMut(T) -> Fut,
    Fut: Future<Output = Result<R, E>>,
{
    let outcomes = map_in_batches(items, batch_size, f, progress).await?;
    let mut report = BatchReport {
        succeeded: 0,
        failures: Vec::new(),
    };
    for (index, outcome) in outcomes.into_iter().enumerate() {
        match outcome {
            Ok(_) => report.succeeded += 1,
            Err(error) => report.failures.push(ItemFailure { index, error }),
        }
    }
    Ok(report)
}

/// Like [`process_in_batches`], but stops after the first batch that had a
/// failure: that batch is run to its end, then one error listing every failed
/// index of it is returned, and the items of later batches are not started.
///
/// Returns the number of items processed (all succeeded) otherwise.
///
/// # Errors
///
/// [`StrictBatchError::Invalid`] for a batch size outside `1..=MAX_BATCH_SIZE`,
/// [`StrictBatchError::BatchFailed`] for the first batch with failures.
pub async fn process_in_batches_strict<T, R, E, F, Fut>(
    items: Vec<T>,
    batch_size: usize,
    mut f: F,
    mut progress: ProgressFn<'_>,
) -> Result<usize, StrictBatchError<E>>
where
    F: FnMut(T) -> Fut,
    Fut: Future<Output = Result<R, E>>,
{
    check_batch_size(batch_size)?;
    let total = items.len();
    let batches = total.div_ceil(batch_size);
    let mut succeeded = 0;
    let mut items = items.into_iter();
    for batch in 1..=batches {
        let first_index = (batch - 1) * batch_size;
        let chunk: Vec<T> = items.by_ref().take(batch_size).collect();
        let chunk_len = chunk.len();
        let mut failures = Vec::new();
        for (offset, outcome) in run_batch(chunk, &mut f).await.into_iter().enumerate() {
            match outcome {
                Ok(_) => succeeded += 1,
                Err(error) => failures.push(ItemFailure {
                    index: first_index + offset,
                    error,
                }),
            }
        }
        if let Some(progress) = progress.as_mut() {
            progress(BatchProgress {
                batch,
                batches,
                succeeded,
                failed: failures.len(),
            });
        }
        if !failures.is_empty() {
            return Err(StrictBatchError::BatchFailed {
                batch,
                batches,
                succeeded,
                failures,
                not_started: total - first_index - chunk_len,
            });
        }
    }
    Ok(succeeded)
}

/// Like [`process_in_batches`], but keeps each item's value: returns one
/// `Result` per item, in input order.
///
/// # Errors
///
/// [`ConcurrencyError::InvalidBatchSize`] when `batch_size` is not in `1..=MAX_BATCH_SIZE`.
pub async fn map_in_batches<T, R, E, F, Fut>(
    items: Vec<T>,
    batch_size: usize,
    mut f: F,
    mut progress: ProgressFn<'_>,
) -> Result<Vec<Result<R, E>>, ConcurrencyError>
where
    F: FnMut(T) -> Fut,
    Fut: Future<Output = Result<R, E>>,
{
    check_batch_size(batch_size)?;
    let batches = items.len().div_ceil(batch_size);
    let mut out = Vec::with_capacity(items.len());
    let (mut succeeded, mut failed) = (0, 0);
    let mut items = items.into_iter();
    for batch in 1..=batches {
        let chunk: Vec<T> = items.by_ref().take(batch_size).collect();
        for outcome in run_batch(chunk, &mut f).await {
            if outcome.is_ok() {
                succeeded += 1;
            } else {
                failed += 1;
            }
            out.push(outcome);
        }
        if let Some(progress) = progress.as_mut() {
            progress(BatchProgress {
                batch,
                batches,
                succeeded,
                failed,
            });
        }
    }
    Ok(out)
}

/// Splits `items` into batches of `batch_size` and runs `f` once per batch, with at most
/// `concurrency` batches in flight (a sliding window, [`map_bounded`]): for work done a
/// batch at a time, such as one statement per batch.
///
/// `f` gets the input index of the batch's first item and the batch, and returns one
/// result per item, in order. The returned vector has one entry per item, in input order:
/// `Some(result)`, or `None` for the items of a batch that was never started (because
/// `cancel` fired, or after a failed batch in strict mode). A batch whose `f` returned too
/// few results has `None` for the missing ones.
///
/// With `strict`, batches run one at a time and none starts after a batch that returned a
/// failure (`concurrency` is ignored): the failed batch is the last one run, and every
/// later item is `None`.
///
/// # Errors
///
/// [`ConcurrencyError::InvalidBatchSize`] when `batch_size` is not in
/// `1..=MAX_BATCH_SIZE` (nothing is run).
pub async fn map_batches_bounded<T, R, E, F, Fut>(
    items: Vec<T>,
    batch_size: usize,
    concurrency: NonZeroUsize,
    strict: bool,
    mut f: F,
    cancel: Option<CancellationToken>,
) -> Result<Vec<Option<Result<R, E>>>, ConcurrencyError>
where
    F: FnMut(usize, Vec<T>) -> Fut,
    Fut: Future<Output = Vec<Result<R, E>>>,
{
    check_batch_size(batch_size)?;
    let total = items.len();
    let mut batches = Vec::with_capacity(total.div_ceil(batch_size));
    let mut items = items.into_iter();
    let mut first = 0;
    while first < total {
        let batch: Vec<T> = items.by_ref().take(batch_size).collect();
        let len = batch.len();
        batches.push((first, batch));
        first += len;
    }
    let lens: Vec<usize> = batches.iter().map(|(_, batch)| batch.len()).collect();
    let stop = cancel.map_or_else(CancellationToken::new, |token| token.child_token());
    let limit = if strict {
        NonZeroUsize::MIN
    } else {
        concurrency
    };
    let outcomes = map_bounded(
        batches,
        limit,
        |(first, batch)| {
            let fut = f(first, batch);
            let stop = stop.clone();
            async move {
                let results = fut.await;
                if strict && results.iter().any(Result::is_err) {
                    stop.cancel();
                }
                Ok::<_, std::convert::Infallible>(results)
            }
        },
        Some(stop.clone()),
    )
    .await;
    let mut out = Vec::with_capacity(total);
    for (len, outcome) in lens.into_iter().zip(outcomes) {
        let mut results = match outcome {
            Ok(results) => results.into_iter().map(Some).collect::<Vec<_>>(),
            Err(_) => Vec::new(),
        };
        results.resize_with(len, || None);
        out.extend(results);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
