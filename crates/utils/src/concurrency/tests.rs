#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use tokio::time::Instant;

use super::*;

/// Tracks how many futures run at once and the most ever seen.
#[derive(Default)]
struct HighWater {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl HighWater {
    fn enter(&self) {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
    }
    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap()
}

/// Durations of 10 to 100 ms, spread deterministically.
fn durations(n: u64) -> Vec<u64> {
    (0..n).map(|i| 10 + (i * 37) % 91).collect()
}

#[tokio::test(start_paused = true)]
async fn never_more_than_limit_in_flight_and_limit_reached() {
    let hw = Arc::new(HighWater::default());
    let results = map_bounded(
        durations(100),
        nz(10),
        |ms| {
            let hw = Arc::clone(&hw);
            async move {
                hw.enter();
                tokio::time::sleep(Duration::from_millis(ms)).await;
                hw.leave();
                Ok::<_, ()>(ms)
            }
        },
        None,
    )
    .await;
    assert_eq!(results.len(), 100);
    assert_eq!(hw.max.load(Ordering::SeqCst), 10);
    assert_eq!(hw.now.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn sliding_window_finishes_in_about_sum_over_limit() {
    let ds = durations(100);
    let sum: u64 = ds.iter().sum();
    let chunked: u64 = ds.chunks(10).map(|c| *c.iter().max().unwrap()).sum();
    let longest = *ds.iter().max().unwrap();
    // The data must tell a sliding window apart from fixed chunks.
    assert!(sum / 10 + longest < chunked, "sum {sum} chunked {chunked}");

    let start = Instant::now();
    let results = map_bounded(
        ds.clone(),
        nz(10),
        |ms| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, ()>(ms)
        },
        None,
    )
    .await;
    let elapsed = start.elapsed().as_millis() as u64;
    assert!(
        elapsed >= sum / 10,
        "elapsed {elapsed} below sum/10 {}",
        sum / 10
    );
    // Greedy list scheduling bound: at most sum/limit plus the longest item.
    assert!(
        elapsed <= sum / 10 + longest,
        "elapsed {elapsed}, sum {sum}, chunked {chunked}"
    );
    let values: Vec<u64> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(values, ds);
}

#[tokio::test(start_paused = true)]
async fn slow_first_item_does_not_block_the_rest() {
    // One 1 s item first, then 20 items of 10 ms at limit 2: the window keeps
    // turning over in the second slot while the first is busy.
    let mut ds = vec![1000_u64];
    ds.extend(std::iter::repeat_n(10, 20));
    let start = Instant::now();
    let finished_short = Arc::new(AtomicUsize::new(0));
    let results = map_bounded(
        ds,
        nz(2),
        |ms| {
            let finished_short = Arc::clone(&finished_short);
            async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if ms == 10 {
                    finished_short.fetch_add(1, Ordering::SeqCst);
                }
                Ok::<_, ()>(Instant::now())
            }
        },
        None,
    )
    .await;
    assert_eq!(start.elapsed(), Duration::from_millis(1000));
    let last_short = results[1..]
        .iter()
        .map(|r| *r.as_ref().unwrap())
        .max()
        .unwrap();
    assert_eq!(last_short - start, Duration::from_millis(200));
    assert_eq!(finished_short.load(Ordering::SeqCst), 20);
}

#[tokio::test(start_paused = true)]
async fn order_preserved_and_failures_do_not_cancel_others() {
    let results = map_bounded(
        (0..20_u64).collect::<Vec<_>>(),
        nz(4),
        |i| async move {
            // Later items finish first.
            tokio::time::sleep(Duration::from_millis(100 - i)).await;
            if i % 5 == 0 {
                Err(format!("item {i}"))
            } else {
                Ok(i)
            }
        },
        None,
    )
    .await;
    for (i, result) in results.iter().enumerate() {
        if i % 5 == 0 {
            assert_eq!(result, &Err(ItemError::Failed(format!("item {i}"))));
        } else {
            assert_eq!(result, &Ok(i as u64));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn cancellation_stops_starting_new_items() {
    let cancel = CancellationToken::new();
    let started = Arc::new(AtomicUsize::new(0));
    let results = map_bounded(
        (0..10_u64).collect::<Vec<_>>(),
        nz(2),
        |i| {
            let cancel = cancel.clone();
            let started = Arc::clone(&started);
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10 * (i + 1))).await;
                if i == 2 {
                    cancel.cancel();
                }
                Ok::<_, ()>(i)
            }
        },
        Some(cancel.clone()),
    )
    .await;
    // Items 0 and 1 start; 0 ends at 10 ms and 2 starts; 1 ends at 20 ms and 3
    // starts; 2 ends at 40 ms and cancels; 3 (running) is still settled.
    assert_eq!(started.load(Ordering::SeqCst), 4);
    assert_eq!(results[..4], [Ok(0), Ok(1), Ok(2), Ok(3)]);
    assert!(
        results[4..]
            .iter()
            .all(|r| *r == Err(ItemError::NotStarted))
    );
    assert_eq!(results.len(), 10);
}

#[tokio::test]
async fn cancelled_before_start_runs_nothing() {
    let cancel = CancellationToken::new();
    cancel.cancel();
    let results = map_bounded(
        vec![1, 2, 3],
        nz(2),
        |i| async move { Ok::<_, ()>(i) },
        Some(cancel),
    )
    .await;
    assert_eq!(results, vec![Err(ItemError::NotStarted); 3]);
}

#[tokio::test]
async fn a_limit_of_one_runs_items_one_at_a_time() {
    let hw = Arc::new(HighWater::default());
    let results = map_bounded(
        vec![1_u8, 2, 3],
        NonZeroUsize::MIN,
        |i| {
            let hw = Arc::clone(&hw);
            async move {
                hw.enter();
                tokio::task::yield_now().await;
                hw.leave();
                Ok::<_, ()>(i)
            }
        },
        None,
    )
    .await;
    assert_eq!(results, vec![Ok(1), Ok(2), Ok(3)]);
    assert_eq!(hw.max.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn empty_input_gives_empty_output() {
    let results = map_bounded(
        Vec::<u8>::new(),
        nz(3),
        |i| async move { Ok::<_, ()>(i) },
        None,
    )
    .await;
    assert!(results.is_empty());
}

#[tokio::test]
async fn batch_size_is_validated() {
    for size in [0, MAX_BATCH_SIZE + 1] {
        let err = process_in_batches(vec![1], size, |i| async move { Ok::<_, ()>(i) }, None)
            .await
            .unwrap_err();
        assert_eq!(err, ConcurrencyError::InvalidBatchSize { got: size });
        assert_eq!(
            err.to_string(),
            format!("batch size must be between 1 and 1000, got {size}")
        );
        assert!(
            map_in_batches(vec![1], size, |i| async move { Ok::<_, ()>(i) }, None)
                .await
                .is_err()
        );
        assert!(matches!(
            process_in_batches_strict(vec![1], size, |i| async move { Ok::<_, ()>(i) }, None).await,
            Err(StrictBatchError::Invalid(
                ConcurrencyError::InvalidBatchSize { .. }
            ))
        ));
    }
    for size in [1, MAX_BATCH_SIZE] {
        assert!(
            process_in_batches(vec![1], size, |i| async move { Ok::<_, ()>(i) }, None)
                .await
                .is_ok()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn process_in_batches_settles_all_and_reports_progress() {
    let mut seen = Vec::new();
    let mut on_progress = |p: BatchProgress| seen.push(p);
    let report = process_in_batches(
        (0..25_usize).collect(),
        10,
        |i| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if i % 7 == 3 {
                Err(format!("bad {i}"))
            } else {
                Ok(())
            }
        },
        Some(&mut on_progress),
    )
    .await
    .unwrap();
    let failed: Vec<usize> = report.failures.iter().map(|f| f.index).collect();
    assert_eq!(failed, vec![3, 10, 17, 24]);
    assert_eq!(report.failures[1].error, "bad 10");
    assert_eq!(report.succeeded, 21);
    assert_eq!(
        seen,
        vec![
            BatchProgress {
                batch: 1,
                batches: 3,
                succeeded: 9,
                failed: 1
            },
            BatchProgress {
                batch: 2,
                batches: 3,
                succeeded: 17,
                failed: 3
            },
            BatchProgress {
                batch: 3,
                batches: 3,
                succeeded: 21,
                failed: 4
            },
        ]
    );
    assert_eq!(seen[0].to_string(), "batch 1 of 3: 9 succeeded, 1 failed");
}

#[tokio::test(start_paused = true)]
async fn batch_items_run_concurrently_batches_in_sequence() {
    let hw = Arc::new(HighWater::default());
    let start = Instant::now();
    process_in_batches(
        (0..30_u64).collect(),
        10,
        |_| {
            let hw = Arc::clone(&hw);
            async move {
                hw.enter();
                tokio::time::sleep(Duration::from_millis(50)).await;
                hw.leave();
                Ok::<_, ()>(())
            }
        },
        None,
    )
    .await
    .unwrap();
    assert_eq!(hw.max.load(Ordering::SeqCst), 10);
    assert_eq!(start.elapsed(), Duration::from_millis(150));
}

#[tokio::test]
async fn strict_mode_lists_every_failed_index_and_stops() {
    let started = Arc::new(AtomicUsize::new(0));
    let err = process_in_batches_strict(
        (0..30_usize).collect(),
        10,
        |i| {
            let started = Arc::clone(&started);
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                if i == 12 || i == 15 || i == 19 {
                    Err(i)
                } else {
                    Ok(())
                }
            }
        },
        None,
    )
    .await
    .unwrap_err();
    // Batch 2 ran to its end, batch 3 never started.
    assert_eq!(started.load(Ordering::SeqCst), 20);
    match &err {
        StrictBatchError::BatchFailed {
            batch,
            batches,
            succeeded,
            failures,
            not_started,
        } => {
            assert_eq!((*batch, *batches, *succeeded, *not_started), (2, 3, 17, 10));
            let indices: Vec<usize> = failures.iter().map(|f| f.index).collect();
            assert_eq!(indices, vec![12, 15, 19]);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "batch 2 of 3 failed at item indices [12, 15, 19]; 10 later items were not started"
    );
}

#[tokio::test]
async fn strict_mode_all_ok_returns_count() {
    let n = process_in_batches_strict((0..7).collect(), 3, |i| async move { Ok::<_, ()>(i) }, None)
        .await
        .unwrap();
    assert_eq!(n, 7);
}

#[tokio::test]
async fn map_in_batches_keeps_values_and_errors_in_order() {
    let mut batches_seen = 0;
    let mut on_progress = |_p: BatchProgress| batches_seen += 1;
    let out = map_in_batches(
        (0..5_i32).collect(),
        2,
        |i| async move { if i == 3 { Err("three") } else { Ok(i * i) } },
        Some(&mut on_progress),
    )
    .await
    .unwrap();
    assert_eq!(out, vec![Ok(0), Ok(1), Ok(4), Err("three"), Ok(16)]);
    assert_eq!(batches_seen, 3);
}

proptest! {
    #[test]
    fn map_bounded_settles_every_item_in_order(
        delays in proptest::collection::vec(1_u64..20, 0..60),
        limit in 1_usize..12,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let hw = Arc::new(HighWater::default());
        let results = rt.block_on(map_bounded(
            delays.clone().into_iter().enumerate(),
            nz(limit),
            |(i, ms)| {
                let hw = Arc::clone(&hw);
                async move {
                    hw.enter();
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    hw.leave();
                    if ms % 3 == 0 { Err(i) } else { Ok(i) }
                }
            },
            None,
        ));
        prop_assert_eq!(results.len(), delays.len());
        for (i, (result, ms)) in results.iter().zip(&delays).enumerate() {
            if ms % 3 == 0 {
                prop_assert_eq!(result, &Err(ItemError::Failed(i)));
            } else {
                prop_assert_eq!(result, &Ok(i));
            }
        }
        prop_assert!(hw.max.load(Ordering::SeqCst) <= limit);
        prop_assert_eq!(hw.max.load(Ordering::SeqCst), limit.min(delays.len()));
    }
}

#[tokio::test(start_paused = true)]
async fn map_batches_bounded_runs_whole_batches_within_the_limit() {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (in_flight2, peak2) = (in_flight.clone(), peak.clone());
    let out = map_batches_bounded(
        (0..25_usize).collect(),
        10,
        NonZeroUsize::new(2).unwrap(),
        false,
        move |first, batch: Vec<usize>| {
            let (in_flight, peak) = (in_flight2.clone(), peak2.clone());
            async move {
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                assert_eq!(batch[0], first);
                batch
                    .into_iter()
                    .map(|i| if i == 13 { Err(i) } else { Ok(i) })
                    .collect()
            }
        },
        None,
    )
    .await
    .unwrap();
    assert_eq!(out.len(), 25);
    assert_eq!(out[13], Some(Err(13)));
    assert_eq!(out.iter().filter(|o| matches!(o, Some(Ok(_)))).count(), 24);
    assert_eq!(peak.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn map_batches_bounded_strict_stops_after_the_failed_batch() {
    let out = map_batches_bounded(
        (0..50_usize).collect(),
        10,
        NonZeroUsize::new(4).unwrap(),
        true,
        |_, batch: Vec<usize>| async move {
            batch
                .into_iter()
                .map(|i| if i == 12 || i == 17 { Err(i) } else { Ok(i) })
                .collect()
        },
        None,
    )
    .await
    .unwrap();
    assert_eq!(out[12], Some(Err(12)));
    assert_eq!(out[17], Some(Err(17)));
    assert!(out[..20].iter().all(Option::is_some));
    assert!(
        out[20..].iter().all(Option::is_none),
        "later batches untouched"
    );
    let cancelled = CancellationToken::new();
    cancelled.cancel();
    let out = map_batches_bounded(
        vec![1, 2, 3],
        2,
        NonZeroUsize::MIN,
        false,
        |_, batch: Vec<i32>| async move { batch.into_iter().map(Ok::<_, ()>).collect() },
        Some(cancelled),
    )
    .await
    .unwrap();
    assert_eq!(out, vec![None, None, None]);
}

/// A source that counts how many items were pulled from it, for [`for_each_bounded`].
fn counted_source(
    n: u64,
    pulled: Arc<AtomicUsize>,
) -> impl futures::Stream<Item = u64> + Send + 'static {
    futures::stream::iter(durations(n)).map(move |ms| {
        pulled.fetch_add(1, Ordering::SeqCst);
        ms
    })
}

#[tokio::test(start_paused = true)]
async fn for_each_bounded_pulls_only_when_a_slot_is_free() {
    let hw = Arc::new(HighWater::default());
    let pulled = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let started = for_each_bounded(
        counted_source(40, pulled.clone()),
        nz(3),
        |ms| {
            let (hw, pulled, done) = (hw.clone(), pulled.clone(), done.clone());
            async move {
                hw.enter();
                // Never more pulled than started: nothing waits for a slot after being
                // taken from the source (the worker claims no job it cannot run).
                assert!(pulled.load(Ordering::SeqCst) <= done.load(Ordering::SeqCst) + 3);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                hw.leave();
                done.fetch_add(1, Ordering::SeqCst);
            }
        },
        None,
    )
    .await;
    assert_eq!(started, 40);
    assert_eq!(pulled.load(Ordering::SeqCst), 40);
    assert_eq!(done.load(Ordering::SeqCst), 40);
    assert_eq!(hw.max.load(Ordering::SeqCst), 3);
    assert_eq!(hw.now.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn for_each_bounded_a_slow_item_does_not_hold_back_free_slots() {
    // The first item takes 10 s, the others 10 ms each: with two slots, the 20 fast items
    // run one after another in the second slot while the slow one runs.
    let finished_fast = Arc::new(AtomicUsize::new(0));
    let at_slow_end = Arc::new(AtomicUsize::new(usize::MAX));
    let items = std::iter::once(10_000_u64).chain(std::iter::repeat_n(10, 20));
    let start = Instant::now();
    let started = for_each_bounded(
        futures::stream::iter(items),
        nz(2),
        |ms| {
            let (fast, slow_end) = (finished_fast.clone(), at_slow_end.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if ms == 10 {
                    fast.fetch_add(1, Ordering::SeqCst);
                } else {
                    slow_end.store(fast.load(Ordering::SeqCst), Ordering::SeqCst);
                }
            }
        },
        None,
    )
    .await;
    assert_eq!(started, 21);
    assert_eq!(at_slow_end.load(Ordering::SeqCst), 20);
    assert!(start.elapsed() < Duration::from_secs(11));
}

#[tokio::test(start_paused = true)]
async fn for_each_bounded_cancel_stops_pulling_and_awaits_the_running() {
    // A source that waits: one item every 100 ms, forever.
    let source = futures::stream::unfold(0_u32, |n| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((n, n + 1))
    });
    let token = CancellationToken::new();
    let finished = Arc::new(AtomicUsize::new(0));
    let canceller = {
        let token = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(350)).await;
            token.cancel();
        })
    };
    let started = for_each_bounded(
        source,
        nz(10),
        |_| {
            let finished = finished.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                finished.fetch_add(1, Ordering::SeqCst);
            }
        },
        Some(token),
    )
    .await;
    canceller.await.unwrap();
    assert_eq!(
        started, 3,
        "items at 100, 200 and 300 ms; none after the cancel"
    );
    assert_eq!(
        finished.load(Ordering::SeqCst),
        3,
        "the running ones were awaited"
    );
}
