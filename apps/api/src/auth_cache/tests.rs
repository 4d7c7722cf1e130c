//! Tests of the key cache against a real PostgreSQL: revocation across processes' caches,
//! a lost listener, and the negative cache under a bad-key flood.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use smartbeak_database::testing::TestDatabase;

use super::*;
use crate::auth::{create_key, create_org, revoke_key};

fn config(positive_ms: u64, negative_ms: u64) -> AuthCacheConfig {
    AuthCacheConfig {
        capacity: 1000,
        positive_ttl: Duration::from_millis(positive_ms),
        negative_ttl: Duration::from_millis(negative_ms),
        last_used_interval: Duration::from_secs(60),
    }
}

fn presented(key: &str) -> PresentedKey {
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
    );
    PresentedKey::from_headers(&headers).unwrap()
}

/// Polls `condition` every 10 ms for at most 10 s.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn listener_pid(db: &Database, not: i32) -> i32 {
    for _ in 0..1000 {
        let pid: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name LIKE '%-listener' AND pid <> $1 AND query LIKE 'LISTEN%'",
        )
        .bind(not)
        .fetch_optional(db.primary())
        .await
        .unwrap();
        if let Some(pid) = pid {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no listener session other than {not}");
}

#[tokio::test]
async fn a_revoke_evicts_the_key_in_another_process_cache_and_a_lost_listener_flushes() {
    let tdb = TestDatabase::create().await.unwrap();
    let db = Database::connect(tdb.config(), "auth-cache-tests")
        .await
        .unwrap();
    let org = create_org(&db, "cache").await.unwrap();
    let a = create_key(&db, org, "a").await.unwrap();
    let b = create_key(&db, org, "b").await.unwrap();
    // An hour's TTL: only the notification can evict within the test.
    let cache = Arc::new(KeyCache::new(&config(3_600_000, 3_600_000)));
    let stop = CancellationToken::new();
    let listener = tokio::spawn({
        let (cache, db, stop) = (cache.clone(), db.clone(), stop.clone());
        async move { cache.listen(&db, &stop).await }
    });
    let first = listener_pid(&db, 0).await;

    let (pa, pb) = (presented(&a.key), presented(&b.key));
    assert_eq!(cache.resolve(&db, &pa).await.unwrap().unwrap().key_id, a.id);
    assert_eq!(cache.resolve(&db, &pb).await.unwrap().unwrap().key_id, b.id);
    let lookups = cache.db_lookups();
    assert_eq!(cache.resolve(&db, &pa).await.unwrap().unwrap().org_id, org);
    assert_eq!(cache.db_lookups(), lookups, "the second use is a hit");

    // `keys revoke`, through another connection (another process's): a's entry goes,
    // b's stays.
    assert!(revoke_key(&db, a.id).await.unwrap());
    eventually("the revoked key's eviction", || cache.len() == 1).await;
    assert_eq!(cache.resolve(&db, &pa).await.unwrap(), None);
    assert_eq!(cache.db_lookups(), lookups + 1);
    assert!(cache.resolve(&db, &pb).await.unwrap().is_some());
    assert_eq!(cache.db_lookups(), lookups + 1, "b is still cached");

    // The listener's session is terminated: the cache is flushed and a new session listens.
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(first)
        .execute(db.primary())
        .await
        .unwrap();
    eventually("the flush after the lost session", || cache.is_empty()).await;
    let second = listener_pid(&db, first).await;
    assert_ne!(second, first);
    // ... and the new session evicts too.
    assert!(cache.resolve(&db, &pb).await.unwrap().is_some());
    eventually("b cached again", || cache.len() == 1).await;
    assert!(revoke_key(&db, b.id).await.unwrap());
    eventually("b's eviction through the new session", || cache.is_empty()).await;
    assert_eq!(cache.resolve(&db, &pb).await.unwrap(), None);

    stop.cancel();
    listener.await.unwrap();
    db.close(Duration::from_secs(5)).await.unwrap();
    tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn a_flood_of_bad_keys_reaches_postgres_once_per_key_per_negative_ttl() {
    let tdb = TestDatabase::create().await.unwrap();
    let db = Database::connect(tdb.config(), "auth-cache-tests")
        .await
        .unwrap();
    let cache = KeyCache::new(&config(3_600_000, 3_600_000));
    let bad = presented("sbk_not-a-key");
    for _ in 0..500 {
        assert_eq!(cache.resolve(&db, &bad).await.unwrap(), None);
    }
    assert_eq!(cache.db_lookups(), 1);

    // A short negative TTL: once it passed, the key is looked up again (a key created in
    // the meantime is found).
    let short = KeyCache::new(&config(3_600_000, 1));
    assert_eq!(short.resolve(&db, &bad).await.unwrap(), None);
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(short.resolve(&db, &bad).await.unwrap(), None);
    assert_eq!(short.db_lookups(), 2);

    db.close(Duration::from_secs(5)).await.unwrap();
    tdb.drop_database().await.unwrap();
}

/// A lookup that counts its calls and finds `known` only.
fn counting_lookup<'a>(
    calls: &'a std::sync::atomic::AtomicU64,
    known: &'a PresentedKey,
    auth: Auth,
) -> impl FnOnce([u8; 32]) -> std::future::Ready<Result<Option<Auth>, ApiError>> + 'a {
    move |hash| {
        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::future::ready(Ok((&hash == known.hash()).then_some(auth)))
    }
}

#[tokio::test(start_paused = true)]
async fn entries_expire_at_their_ttl_valid_and_unknown_keys_each_by_their_own() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let cache = KeyCache::new(&config(5_000, 1_000));
    let calls = AtomicU64::new(0);
    let good = presented("sbk_good");
    let bad = presented("sbk_bad");
    let auth = Auth {
        org_id: Uuid::new_v4(),
        key_id: Uuid::new_v4(),
    };
    let resolve = |key: &PresentedKey| {
        let lookup = counting_lookup(&calls, &good, auth);
        let key = key.clone();
        let cache = &cache;
        async move { cache.resolve_with(&key, lookup).await.unwrap() }
    };
    assert_eq!(resolve(&good).await, Some(auth));
    assert_eq!(resolve(&bad).await, None);
    assert_eq!(calls.load(Ordering::Relaxed), 2);

    // Just inside the negative TTL both are hits.
    tokio::time::advance(Duration::from_millis(999)).await;
    assert!(cache.is_cached(&bad));
    assert_eq!(resolve(&good).await, Some(auth));
    assert_eq!(resolve(&bad).await, None);
    assert_eq!(calls.load(Ordering::Relaxed), 2);

    // At the negative TTL the unknown key is looked up again; the valid one is still a hit.
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(!cache.is_cached(&bad));
    assert!(cache.is_cached(&good));
    assert_eq!(resolve(&bad).await, None);
    assert_eq!(resolve(&good).await, Some(auth));
    assert_eq!(calls.load(Ordering::Relaxed), 3);

    // At the positive TTL (5 s after it was stored) the valid key is looked up again.
    tokio::time::advance(Duration::from_millis(3_999)).await;
    assert_eq!(resolve(&good).await, Some(auth));
    assert_eq!(calls.load(Ordering::Relaxed), 3);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(!cache.is_cached(&good));
    assert_eq!(resolve(&good).await, Some(auth));
    assert_eq!(calls.load(Ordering::Relaxed), 4);
}

#[tokio::test(start_paused = true)]
async fn the_cache_holds_at_most_its_capacity_however_many_keys_come() {
    use std::sync::atomic::AtomicU64;
    const CAPACITY: usize = 64;
    let cache = KeyCache::new(&AuthCacheConfig {
        capacity: CAPACITY,
        ..config(3_600_000, 3_600_000)
    });
    let calls = AtomicU64::new(0);
    let nobody = presented("sbk_nobody");
    let auth = Auth {
        org_id: Uuid::nil(),
        key_id: Uuid::nil(),
    };
    for i in 0..10_000 {
        let key = presented(&format!("sbk_flood_{i}"));
        let lookup = counting_lookup(&calls, &nobody, auth);
        assert_eq!(cache.resolve_with(&key, lookup).await.unwrap(), None);
        assert!(
            cache.len() <= CAPACITY,
            "{} entries after {} keys",
            cache.len(),
            i + 1
        );
    }
    assert!(!cache.is_empty());
    assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 10_000);
}
