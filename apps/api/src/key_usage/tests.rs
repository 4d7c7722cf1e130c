//! `last_used_at` batching against a real PostgreSQL: one write per key per flush however
//! many requests, nothing written for an idle key, the periodic task, and the shutdown
//! flush after the last in-flight request.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::http::{HeaderMap, HeaderValue};
use smartbeak_database::testing::TestDatabase;
use smartbeak_shutdown::{HandlerOutcome, ShutdownConfig, ShutdownReason};

use super::*;
use crate::auth::{PresentedKey, create_key, create_org};
use crate::auth_cache::KeyCache;
use crate::config::AuthCacheConfig;

fn cache() -> KeyCache {
    KeyCache::new(&AuthCacheConfig {
        capacity: 100,
        positive_ttl: Duration::from_secs(3600),
        negative_ttl: Duration::from_secs(3600),
        last_used_interval: Duration::from_secs(3600),
    })
}

fn presented(key: &str) -> PresentedKey {
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
    );
    PresentedKey::from_headers(&headers).unwrap()
}

async fn last_used(db: &Database, id: Uuid) -> Option<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar("SELECT last_used_at FROM api_keys WHERE id = $1")
        .bind(id)
        .fetch_one(db.primary())
        .await
        .unwrap()
}

async fn setup() -> (TestDatabase, Database) {
    let tdb = TestDatabase::create().await.unwrap();
    let db = Database::connect(tdb.config(), "key-usage-tests")
        .await
        .unwrap();
    (tdb, db)
}

#[tokio::test]
async fn a_busy_key_is_written_once_per_flush_and_an_idle_one_not_at_all() {
    let (_tdb, db) = setup().await;
    let org = create_org(&db, "usage").await.unwrap();
    let a = create_key(&db, org, "a").await.unwrap();
    let idle = create_key(&db, org, "idle").await.unwrap();
    let cache = cache();
    let pa = presented(&a.key);
    for _ in 0..500 {
        cache.resolve(&db, &pa).await.unwrap().unwrap();
    }
    // Nothing is written on the request path.
    assert_eq!(last_used(&db, a.id).await, None);
    assert_eq!(cache.usage().pending(), 1);

    assert_eq!(
        cache.usage().flush(&db).await.unwrap(),
        1,
        "500 uses, one row"
    );
    let first = last_used(&db, a.id).await.expect("written by the flush");
    assert_eq!(
        last_used(&db, idle.id).await,
        None,
        "an unused key is not touched"
    );

    // No use since: the next flush writes nothing and the time stays.
    assert_eq!(cache.usage().flush(&db).await.unwrap(), 0);
    assert_eq!(last_used(&db, a.id).await, Some(first));

    // Used again (a cache hit marks it for the new interval): written once more.
    for _ in 0..100 {
        cache.resolve(&db, &pa).await.unwrap().unwrap();
    }
    assert_eq!(cache.usage().flush(&db).await.unwrap(), 1);
    assert!(last_used(&db, a.id).await.unwrap() >= first);
    assert_eq!(cache.usage().written(), 2);

    // A bad key marks nothing.
    cache.resolve(&db, &presented("sbk_bad")).await.unwrap();
    assert_eq!(cache.usage().pending(), 0);
}

#[tokio::test]
async fn the_background_task_flushes_each_interval() {
    let (_tdb, db) = setup().await;
    let org = create_org(&db, "usage").await.unwrap();
    let a = create_key(&db, org, "a").await.unwrap();
    let cache = cache();
    cache
        .resolve(&db, &presented(&a.key))
        .await
        .unwrap()
        .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (usage, db, stop) = (Arc::clone(cache.usage()), db.clone(), stop.clone());
        async move { usage.run(&db, Duration::from_millis(20), &stop).await }
    });
    for _ in 0..1000 {
        if last_used(&db, a.id).await.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(last_used(&db, a.id).await.is_some(), "flushed by the task");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn the_shutdown_handler_writes_what_the_draining_requests_used() {
    let (_tdb, db) = setup().await;
    let org = create_org(&db, "usage").await.unwrap();
    let a = create_key(&db, org, "a").await.unwrap();
    let late = create_key(&db, org, "late").await.unwrap();
    let cache = cache();
    let shutdown = Shutdown::new(ShutdownConfig::default());
    let served = CancellationToken::new();
    // An hour's interval: only the shutdown handler can write within the test.
    let _guard = install(
        &shutdown,
        Arc::clone(cache.usage()),
        db.clone(),
        Duration::from_secs(3600),
        served.clone(),
    )
    .unwrap();
    cache
        .resolve(&db, &presented(&a.key))
        .await
        .unwrap()
        .unwrap();

    shutdown.trigger(ShutdownReason::Requested("test".to_owned()));
    let run = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { shutdown.run().await }
    });
    // A request still draining uses a key; the handler waits for the server to finish.
    cache
        .resolve(&db, &presented(&late.key))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(last_used(&db, late.id).await, None);
    served.cancel();
    let report = run.await.unwrap();
    assert_eq!(
        report.handler(FLUSH_HANDLER).map(|h| h.outcome.clone()),
        Some(HandlerOutcome::Ok)
    );
    assert!(last_used(&db, a.id).await.is_some());
    assert!(last_used(&db, late.id).await.is_some());
}
