//! Overhead of `map_bounded` (settles every item, restores input order,
//! checks a cancellation token) per item, against a plain
//! `buffer_unordered` over the same futures.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::convert::Infallible;
use std::num::NonZeroUsize;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::stream::{self, StreamExt};
use smartbeak_utils::concurrency::map_bounded;
use tokio_util::sync::CancellationToken;

const ITEMS: u64 = 10_000;
const LIMIT: usize = 64;
const NZ_LIMIT: NonZeroUsize = NonZeroUsize::new(LIMIT).unwrap();

/// One item of work: a wake-up through the scheduler, then a value.
async fn work(i: u64) -> Result<u64, Infallible> {
    tokio::task::yield_now().await;
    Ok(i * 2)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("bounded_10000_items_limit_64");
    group.throughput(Throughput::Elements(ITEMS));
    group.bench_function("buffer_unordered", |b| {
        b.to_async(&rt).iter(|| async {
            let out: Vec<Result<u64, Infallible>> = stream::iter(0..ITEMS)
                .map(work)
                .buffer_unordered(LIMIT)
                .collect()
                .await;
            assert_eq!(out.len(), ITEMS as usize);
        });
    });
    group.bench_function("map_bounded", |b| {
        b.to_async(&rt).iter(|| async {
            let out = map_bounded(0..ITEMS, NZ_LIMIT, work, None).await;
            assert_eq!(out.len(), ITEMS as usize);
        });
    });
    group.bench_function("map_bounded_with_cancel_token", |b| {
        b.to_async(&rt).iter(|| async {
            let out = map_bounded(0..ITEMS, NZ_LIMIT, work, Some(CancellationToken::new())).await;
            assert_eq!(out.len(), ITEMS as usize);
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
