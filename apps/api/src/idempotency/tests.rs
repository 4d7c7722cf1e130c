//! `Idempotency-Key` and the metrics upsert through the real router on a fresh database.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::http::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::routes::exports::tests::TestApi;

async fn count(api: &TestApi, sql: &str) -> i64 {
    api.f
        .db
        .run(async |conn| sqlx::query_scalar(sql).fetch_one(conn).await)
        .await
        .unwrap()
}

async fn add_content(api: &TestApi) -> Uuid {
    let answer = api
        .call(
            "POST",
            &format!("/v1/domains/{}/content", api.f.domain),
            Some(json!({"title": "Hello", "slug": "hello"})),
        )
        .await;
    assert_eq!(answer.status, StatusCode::CREATED);
    answer.json()["id"].as_str().unwrap().parse().unwrap()
}

fn rows(content_id: Uuid, clicks: i64) -> Value {
    json!({
        "keywords": [
            {"keyword": "rust", "search_volume": 100, "position": 2.0, "clicks": clicks,
             "recorded_at": "2026-01-02T00:00:00Z"},
            {"keyword": "axum", "search_volume": 50, "position": 1.0,
             "recorded_at": "2026-01-02T00:00:00Z"}
        ],
        "content": [
            {"content_id": content_id, "page_views": clicks, "recorded_at": "2026-01-02T00:00:00Z"}
        ]
    })
}

#[tokio::test]
async fn a_repeated_ingest_updates_the_rows_of_its_natural_keys_instead_of_duplicating() {
    let api = TestApi::new().await;
    let content = add_content(&api).await;
    let path = format!("/v1/domains/{}/metrics", api.f.domain);

    let first = api.call("POST", &path, Some(rows(content, 10))).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        first.json(),
        json!({"keywords_inserted": 2, "content_inserted": 1,
               "keywords_updated": 0, "content_updated": 0})
    );
    // The retry a timeout invites, with corrected figures: same keys, new values.
    let again = api.call("POST", &path, Some(rows(content, 20))).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(
        again.json(),
        json!({"keywords_inserted": 0, "content_inserted": 0,
               "keywords_updated": 2, "content_updated": 1})
    );
    assert_eq!(count(&api, "SELECT count(*) FROM keyword_metrics").await, 2);
    assert_eq!(
        count(&api, "SELECT count(*) FROM content_performance").await,
        1
    );
    assert_eq!(
        count(
            &api,
            "SELECT clicks FROM keyword_metrics WHERE keyword = 'rust'"
        )
        .await,
        20
    );
    assert_eq!(
        count(&api, "SELECT page_views FROM content_performance").await,
        20
    );

    // One key twice in one body: refused, naming the second row (else PostgreSQL would
    // refuse to update one row twice in one statement, a 500).
    let mut body = rows(content, 1);
    body["keywords"][1]["keyword"] = json!("rust");
    let twice = api.call("POST", &path, Some(body)).await;
    assert_eq!(twice.status, StatusCode::BAD_REQUEST);
    assert!(
        twice.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("keywords[1]: repeats"),
        "{}",
        twice.json()
    );
    let mut body = rows(content, 1);
    body["content"] = json!([
        {"content_id": content, "recorded_at": "2026-01-05T00:00:00Z"},
        {"content_id": content, "recorded_at": "2026-01-05T00:00:00.0000001Z"}
    ]);
    let twice = api.call("POST", &path, Some(body)).await;
    assert_eq!(twice.status, StatusCode::BAD_REQUEST, "{}", twice.json());
    assert!(
        twice.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("content[1]: repeats"),
        "equal to the microsecond is one key: {}",
        twice.json()
    );
    api.f.finish().await;
}

#[tokio::test]
async fn an_idempotency_key_replays_the_first_response_and_refuses_another_body() {
    let api = TestApi::new().await;
    let content = add_content(&api).await;
    let metrics = format!("/v1/domains/{}/metrics", api.f.domain);
    let exports = format!("/v1/domains/{}/exports", api.f.domain);
    let key = [("idempotency-key", "retry-1")];

    let first = api
        .call_with("POST", &exports, Some(json!({"format": "csv"})), &key)
        .await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    assert!(first.headers.get("idempotent-replayed").is_none());
    // Same body (other spacing and order do not matter): the first answer, no second job.
    let again = api
        .call_with(
            "POST",
            &exports,
            Some(serde_json::from_str("{ \"format\" : \"csv\" }").unwrap()),
            &key,
        )
        .await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert_eq!(again.body, first.body);
    assert_eq!(again.headers["location"], first.headers["location"]);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.headers["content-type"], "application/json");
    assert_eq!(count(&api, "SELECT count(*) FROM domain_exports").await, 1);
    // Same key, other body: 422.
    let other = api
        .call_with("POST", &exports, Some(json!({"format": "json"})), &key)
        .await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.json()["code"], "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(count(&api, "SELECT count(*) FROM domain_exports").await, 1);
    // The same key on another operation is another record.
    let ingest = api
        .call_with("POST", &metrics, Some(rows(content, 5)), &key)
        .await;
    assert_eq!(ingest.status, StatusCode::CREATED);
    let replay = api
        .call_with("POST", &metrics, Some(rows(content, 5)), &key)
        .await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(
        replay.body, ingest.body,
        "the first response, not `updated`"
    );
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    let changed = api
        .call_with("POST", &metrics, Some(rows(content, 6)), &key)
        .await;
    assert_eq!(changed.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        count(
            &api,
            "SELECT clicks FROM keyword_metrics WHERE keyword = 'rust'"
        )
        .await,
        5
    );

    // A failed request stores nothing: the key then runs for real.
    let missing = format!("/v1/domains/{}/exports", Uuid::new_v4());
    let lost = [("idempotency-key", "lost")];
    let not_found = api
        .call_with("POST", &missing, Some(json!({"format": "csv"})), &lost)
        .await;
    assert_eq!(not_found.status, StatusCode::NOT_FOUND);
    assert_eq!(
        count(
            &api,
            "SELECT count(*) FROM idempotency_keys WHERE key = 'lost'"
        )
        .await,
        0
    );

    // After 24 hours the key is new again.
    api.f
        .db
        .run(async |conn| {
            sqlx::query("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'")
                .execute(conn)
                .await
        })
        .await
        .unwrap();
    let later = api
        .call_with("POST", &exports, Some(json!({"format": "json"})), &key)
        .await;
    assert_eq!(later.status, StatusCode::ACCEPTED);
    assert_ne!(later.json()["id"], first.json()["id"]);
    assert_eq!(count(&api, "SELECT count(*) FROM domain_exports").await, 2);
    // The sweep's purge removes expired records only.
    sqlx::query("UPDATE idempotency_keys SET expires_at = now() - interval '1 second' WHERE scope LIKE 'ingest%'")
        .execute(api.f.db.primary())
        .await
        .unwrap();
    assert_eq!(super::purge_expired(&api.f.db, 100).await.unwrap(), 1);
    assert_eq!(
        count(&api, "SELECT count(*) FROM idempotency_keys").await,
        1
    );

    // Bad keys: 400 naming the header.
    for bad in ["", "has space", &"k".repeat(256)] {
        let answer = api
            .call_with(
                "POST",
                &exports,
                Some(json!({"format": "csv"})),
                &[("idempotency-key", bad)],
            )
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad:?}");
        assert!(
            answer.json()["error"]
                .as_str()
                .unwrap()
                .starts_with("Idempotency-Key:")
        );
    }
    api.f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_with_one_key_run_once() {
    let api = TestApi::new().await;
    let exports = format!("/v1/domains/{}/exports", api.f.domain);
    let key = [("idempotency-key", "race")];
    let answers = futures::future::join_all(
        (0..8).map(|_| api.call_with("POST", &exports, Some(json!({"format": "csv"})), &key)),
    )
    .await;
    for answer in &answers {
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.json());
        assert_eq!(answer.body, answers[0].body, "every answer is the one job");
    }
    let replayed = answers
        .iter()
        .filter(|a| a.headers.contains_key("idempotent-replayed"))
        .count();
    assert_eq!(replayed, 7, "one request ran, seven replayed it");
    assert_eq!(count(&api, "SELECT count(*) FROM domain_exports").await, 1);
    api.f.finish().await;
}

/// Issue 13 gap 6: a report lists the top N (by clicks, by page views) with totals over
/// every row.
#[tokio::test]
async fn an_analytics_report_lists_the_top_n_with_totals_over_every_row() {
    let api = TestApi::new().await;
    let content = add_content(&api).await;
    let path = format!("/v1/domains/{}/metrics", api.f.domain);
    let mut body = rows(content, 10);
    body["keywords"] = json!([
        {"keyword": "few", "search_volume": 1, "position": 1.0, "clicks": 1, "impressions": 5,
         "recorded_at": "2026-01-02T00:00:00Z"},
        {"keyword": "most", "search_volume": 1, "position": 1.0, "clicks": 30, "impressions": 5,
         "recorded_at": "2026-01-02T00:00:00Z"},
        {"keyword": "some", "search_volume": 1, "position": 1.0, "clicks": 7, "impressions": 5,
         "recorded_at": "2026-01-02T00:00:00Z"}
    ]);
    assert_eq!(
        api.call("POST", &path, Some(body)).await.status,
        StatusCode::CREATED
    );
    let reads = crate::analytics::AnalyticsReads::new(std::time::Duration::ZERO, 1 << 20, 2);
    let key = crate::analytics::AnalyticsKey {
        org_id: api.f.org,
        domain_id: api.f.domain,
        from: "2026-01-01T00:00:00Z".parse().unwrap(),
        to: "2026-02-01T00:00:00Z".parse().unwrap(),
    };
    let shared = reads.get(&api.f.db, key).await.unwrap();
    let listed: Vec<&str> = shared
        .report
        .keywords
        .iter()
        .map(|k| k.keyword.as_str())
        .collect();
    assert_eq!(listed, ["most", "some"]);
    assert_eq!(shared.report.content.len(), 1);
    let totals = &shared.report.totals;
    assert_eq!(
        (totals.keywords, totals.clicks, totals.impressions),
        (3, 38, 15)
    );
    assert_eq!((totals.content_items, totals.page_views), (1, 10));
    let json: Value = serde_json::from_slice(&shared.json).unwrap();
    assert_eq!(json["totals"]["clicks"], 38);
    api.f.finish().await;
}
