//! Rate limiting through the real binary: the N+1th request is 429 with the IETF headers;
//! two processes on one Redis enforce one combined limit; a stopped Redis (a throwaway
//! server this test owns) fails open onto the in-process limiter by default and answers the
//! exact 503 when fail-closed; after a restart Redis limiting resumes within 2 s, no api
//! restart.

use std::time::{Duration, Instant};

use serde_json::Value;
use smartbeak_test_support::RedisServer;

use super::{Api, Tenant, database, shared_redis_url};

fn prefix() -> String {
    format!("sbtest:{}", uuid::Uuid::new_v4().simple())
}

async fn get(api: &Api, tenant: &Tenant) -> reqwest::Response {
    api.http
        .get(api.url("/v1/domains"))
        .header("authorization", tenant.bearer())
        .send()
        .await
        .unwrap()
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Limits per hour: one unit comes back every `3600 / limit` s, so wall time during a test
/// (seconds at most) cannot refill a quota and make exact counts drift.
const WINDOW_SECS: &str = "3600";

#[tokio::test]
async fn the_request_over_the_limit_is_429_with_headers() {
    let (db, url) = database().await.unwrap();
    // The shared Redis, with a key prefix of this test's own.
    let api = Api::start(
        &url,
        &[
            ("REDIS_URL", shared_redis_url()),
            ("RATE_LIMIT_KEY_PREFIX", prefix()),
            ("RATE_LIMIT_PER_KEY", "5".into()),
            ("RATE_LIMIT_PER_IP", "1000".into()),
            ("RATE_LIMIT_WINDOW_SECS", WINDOW_SECS.into()),
            // The fail-open fallback would say q=2 (5 / 2): the headers below come from
            // Redis, and the metrics at the end say so too.
            ("RATE_LIMIT_REPLICAS", "2".into()),
        ],
    )
    .await
    .unwrap();
    let t = Tenant::create(&url, "limited").await.unwrap();
    for remaining in (0..5).rev() {
        let response = get(&api, &t).await;
        assert_eq!(response.status(), 200, "{}", api.output());
        assert_eq!(
            header(&response, "ratelimit-policy"),
            "\"key\";q=5;w=3600",
            "a keyed request shows its key's quota only (issue 13 gap 3)"
        );
        let state = header(&response, "ratelimit");
        let prefix = format!("\"key\";r={remaining};t=");
        assert!(state.starts_with(&prefix), "{state}");
        // t: the first unit spent comes back 720 s (3600 / 5) after it was spent.
        let t: u64 = state[prefix.len()..]
            .split(',')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((715..=720).contains(&t), "{state}");
        assert!(header(&response, "retry-after").is_empty());
    }
    let response = get(&api, &t).await;
    assert_eq!(response.status(), 429);
    // 5 per hour: the next unit comes 720 s after the first request.
    let retry_after: u64 = header(&response, "retry-after").parse().unwrap();
    assert!((715..=720).contains(&retry_after), "{retry_after}");
    // The refusing quota's t is the same time.
    let state = header(&response, "ratelimit");
    assert_eq!(
        state,
        format!("\"key\";r=0;t={retry_after}"),
        "{state} with Retry-After {retry_after}"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"error": "rate limit exceeded", "code": "RATE_LIMITED"})
    );
    // Health endpoints are not limited.
    let response = api.http.get(api.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    // Every decision came from Redis: 5 allowed and 1 limited, none on the fallback.
    let decisions = |label: &'static str| {
        let api = &api;
        async move {
            api.metric_with("rate_limit_decisions_total", label)
                .await
                .unwrap()
        }
    };
    assert_eq!(decisions("backend=\"redis\"").await, 6.0);
    assert_eq!(decisions("backend=\"local\"").await, 0.0);
    assert_eq!(decisions("decision=\"failed_open\"").await, 0.0);
    assert_eq!(decisions("decision=\"limited\"").await, 1.0);
    drop(api);
    db.drop_database().await.unwrap();
}

#[tokio::test]
async fn two_processes_on_one_redis_share_one_limit() {
    let (db, url) = database().await.unwrap();
    let redis = RedisServer::start().unwrap();
    let env = [
        ("REDIS_URL", redis.url()),
        ("RATE_LIMIT_PER_KEY", "10".into()),
        ("RATE_LIMIT_WINDOW_SECS", WINDOW_SECS.into()),
        ("RATE_LIMIT_REPLICAS", "2".into()),
    ];
    let a = Api::start(&url, &env).await.unwrap();
    let b = Api::start(&url, &env).await.unwrap();
    let t = Tenant::create(&url, "shared").await.unwrap();
    let mut allowed = 0;
    let mut limited = 0;
    for i in 0..30 {
        let api = if i % 2 == 0 { &a } else { &b };
        match get(api, &t).await.status().as_u16() {
            200 => allowed += 1,
            429 => limited += 1,
            other => panic!("unexpected {other}"),
        }
    }
    // One combined quota of 10 (each process alone would have allowed 10).
    assert_eq!((allowed, limited), (10, 20));
    assert_eq!(
        a.metric_with("rate_limit_decisions_total", "failed_open")
            .await
            .unwrap(),
        0.0
    );
    drop((a, b));
    db.drop_database().await.unwrap();
}

#[tokio::test]
async fn redis_down_fails_open_then_limiting_resumes_after_restart() {
    let (db, url) = database().await.unwrap();
    let mut redis = RedisServer::start().unwrap();
    let api = Api::start(
        &url,
        &[
            ("REDIS_URL", redis.url()),
            ("RATE_LIMIT_PER_KEY", "3".into()),
            ("RATE_LIMIT_WINDOW_SECS", WINDOW_SECS.into()),
            // The fallback allows 3 / 3 = 1 per process: its headers say q=1, Redis's q=3.
            ("RATE_LIMIT_REPLICAS", "3".into()),
        ],
    )
    .await
    .unwrap();
    let t = Tenant::create(&url, "failover").await.unwrap();
    for _ in 0..3 {
        let response = get(&api, &t).await;
        assert_eq!(response.status(), 200);
        assert!(header(&response, "ratelimit-policy").starts_with("\"key\";q=3;"));
    }
    assert_eq!(get(&api, &t).await.status(), 429);

    redis.stop();
    // Fail open: served, by the in-process limiter (q=1), which then limits.
    let started = Instant::now();
    let response = get(&api, &t).await;
    assert_eq!(response.status(), 200, "fail-open");
    assert!(header(&response, "ratelimit-policy").starts_with("\"key\";q=1;"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "bounded by the command timeout"
    );
    assert_eq!(
        get(&api, &t).await.status(),
        429,
        "the fallback still limits"
    );
    assert!(
        api.metric_with("rate_limit_decisions_total", "decision=\"failed_open\"")
            .await
            .unwrap()
            >= 1.0
    );
    let ready: Value = api
        .http
        .get(api.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["redis"], "down");
    assert_eq!(
        ready["status"], "ready",
        "Redis is not a readiness dependency"
    );

    redis.restart().unwrap();
    let restarted = Instant::now();
    // Redis (empty after the restart) answers again: q=3 in the policy header.
    let resumed = loop {
        let response = get(&api, &t).await;
        if header(&response, "ratelimit-policy").starts_with("\"key\";q=3;") {
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "limiting did not resume"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        resumed < Duration::from_secs(2),
        "resumed after {resumed:?}"
    );
    // And it limits: 3 per window again.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(get(&api, &t).await.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429]);
    drop(api);
    db.drop_database().await.unwrap();
}

#[tokio::test]
async fn redis_down_with_fail_closed_is_503_with_the_exact_body() {
    let (db, url) = database().await.unwrap();
    let mut redis = RedisServer::start().unwrap();
    let api = Api::start(
        &url,
        &[
            ("REDIS_URL", redis.url()),
            ("RATE_LIMIT_FAIL_CLOSED", "true".into()),
        ],
    )
    .await
    .unwrap();
    let t = Tenant::create(&url, "closed").await.unwrap();
    assert_eq!(get(&api, &t).await.status(), 200);
    redis.stop();
    for _ in 0..5 {
        let response = get(&api, &t).await;
        assert_eq!(response.status(), 503);
        assert_eq!(header(&response, "retry-after"), "1");
        assert_eq!(
            response.text().await.unwrap(),
            r#"{"error":"Rate limiting service unavailable","code":"RATE_LIMIT_SERVICE_ERROR"}"#
        );
    }
    assert!(
        api.metric_with("rate_limit_decisions_total", "decision=\"failed_closed\"")
            .await
            .unwrap()
            >= 5.0
    );
    drop(api);
    db.drop_database().await.unwrap();
}
