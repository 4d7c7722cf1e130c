//! A burst of 10,000 concurrent callers over 100 keys: `SingleFlight` (alone,
//! and with an in-process cache) side by side with moka's `get_with`.
//! Each computation sleeps 1 ms (a backend round trip). Prints the number of
//! computations each variant ran, then measures the time to serve the burst.
//! With `SINGLEFLIGHT_COUNTS_JSON=FILE` in the environment, the counts also go
//! to FILE as JSON (`{"callers": .., "keys": .., "singleflight": [..], ..}`),
//! for `cargo xtask bench`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use futures::FutureExt;
use futures::future::BoxFuture;
use smartbeak_utils::singleflight::{
    BoxError, CacheMeta, CachedValue, FlightCache, FlightOptions, SingleFlight,
};
use tokio::task::JoinSet;

const CALLERS: u32 = 10_000;
const KEYS: u32 = 100;
const WORK: Duration = Duration::from_millis(1);

/// A `FlightCache` over a moka cache (in process, no TTL bookkeeping).
struct MokaCache(moka::future::Cache<u32, u64>);

impl FlightCache<u32, u64> for MokaCache {
    fn get<'a>(
        &'a self,
        key: &'a u32,
    ) -> BoxFuture<'a, Result<Option<CachedValue<u64>>, BoxError>> {
        async move {
            Ok(self.0.get(key).await.map(|value| CachedValue {
                value,
                remaining_ttl: None,
                delta: None,
            }))
        }
        .boxed()
    }

    fn set<'a>(
        &'a self,
        key: &'a u32,
        value: &'a u64,
        _meta: CacheMeta,
    ) -> BoxFuture<'a, Result<(), BoxError>> {
        async move {
            self.0.insert(*key, *value).await;
            Ok(())
        }
        .boxed()
    }
}

async fn compute(key: u32, runs: Arc<AtomicU64>) -> u64 {
    runs.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(WORK).await;
    u64::from(key) * 2
}

/// Serves one burst with single-flight; returns the computations run.
async fn burst_singleflight(sf: SingleFlight<u32, u64, Infallible>) -> u64 {
    let runs = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for i in 0..CALLERS {
        let sf = sf.clone();
        let runs = Arc::clone(&runs);
        tasks.spawn(async move {
            let key = i % KEYS;
            sf.get_or_compute(
                key,
                move || async move { Ok(compute(key, runs).await) },
                &FlightOptions::default(),
            )
            .await
            .unwrap()
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    runs.load(Ordering::Relaxed)
}

/// Serves one burst with moka's `get_with`; returns the computations run.
async fn burst_moka(cache: moka::future::Cache<u32, u64>) -> u64 {
    let runs = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for i in 0..CALLERS {
        let cache = cache.clone();
        let runs = Arc::clone(&runs);
        tasks.spawn(async move {
            let key = i % KEYS;
            cache.get_with(key, compute(key, runs)).await
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    runs.load(Ordering::Relaxed)
}

fn cached_singleflight() -> SingleFlight<u32, u64, Infallible> {
    SingleFlight::with_cache(Arc::new(MokaCache(moka::future::Cache::new(1_000))))
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // Computation counts over a few bursts (each burst on fresh state).
    let mut counts = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..5 {
        counts[0].push(rt.block_on(burst_singleflight(SingleFlight::new())));
        counts[1].push(rt.block_on(burst_singleflight(cached_singleflight())));
        counts[2].push(rt.block_on(burst_moka(moka::future::Cache::new(1_000))));
    }
    eprintln!("computations per burst of {CALLERS} callers over {KEYS} keys (5 bursts):");
    eprintln!("  singleflight (no cache):     {:?}", counts[0]);
    eprintln!("  singleflight + moka cache:   {:?}", counts[1]);
    eprintln!("  moka get_with:               {:?}", counts[2]);
    if let Some(path) = std::env::var_os("SINGLEFLIGHT_COUNTS_JSON") {
        let json = serde_json::json!({
            "callers": CALLERS,
            "keys": KEYS,
            "singleflight": counts[0],
            "singleflight_with_cache": counts[1],
            "moka_get_with": counts[2],
        });
        std::fs::write(&path, format!("{json:#}\n")).unwrap();
    }

    let mut group = c.benchmark_group("burst_10000_callers_100_keys");
    group.sample_size(20);
    group.bench_function("singleflight", |b| {
        b.to_async(&rt)
            .iter(|| burst_singleflight(SingleFlight::new()));
    });
    group.bench_function("singleflight_with_cache", |b| {
        b.to_async(&rt)
            .iter(|| burst_singleflight(cached_singleflight()));
    });
    group.bench_function("moka_get_with", |b| {
        b.to_async(&rt)
            .iter(|| burst_moka(moka::future::Cache::new(1_000)));
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
