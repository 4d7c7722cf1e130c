//! Readiness follows the database: `/readyz` is 200 while it answers and 503 naming the
//! database once it is gone (a throwaway PostgreSQL server this test owns and stops), while
//! `/healthz` stays 200 (the process is alive).

use std::time::{Duration, Instant};

use serde_json::Value;
use smartbeak_test_support::PostgresServer;

use super::Api;

#[tokio::test]
async fn readyz_is_503_naming_the_database_once_it_is_unreachable() {
    // Started on the test's own thread, not a blocking-pool thread: the server dies with the
    // thread that started it (`--pdeathsig`), and an idle blocking thread exits after 10 s.
    let postgres = PostgresServer::start().unwrap();
    // The api applies the migrations itself at start-up.
    let api = Api::start(&postgres.url(), &[]).await.unwrap();
    let readyz = async || {
        let response = api.http.get(api.url("/readyz")).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json::<Value>().await.unwrap())
    };
    let (status, body) = readyz().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["database"], "ok");

    let postgres = tokio::task::spawn_blocking(move || {
        let mut postgres = postgres;
        postgres.stop();
        postgres
    })
    .await
    .unwrap();
    let started = Instant::now();
    let body = loop {
        let (status, body) = readyz().await;
        if status == 503 {
            break body;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still ready with the database stopped: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["database"], "unreachable");
    assert_eq!(body["error"], "not ready: database");
    assert_eq!(body["code"], "NOT_READY");
    assert_eq!(body["shutting_down"], false);
    let response = api.http.get(api.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200, "alive, only not ready");

    drop(api);
    // Dropping the guard removes its directory (blocking file I/O).
    tokio::task::spawn_blocking(move || drop(postgres))
        .await
        .unwrap();
}

/// Issue 10, item 2: timeouts nest. An api whose request timeout is below the database
/// client bound (`DB_STATEMENT_TIMEOUT_MS` plus its margin) would answer 503 and leave the
/// statement running; it refuses to start instead, naming both variables, before it
/// connects to anything.
#[tokio::test]
async fn a_request_timeout_below_the_database_bound_is_refused_at_start_up() {
    let output = tokio::process::Command::new(super::api_bin().unwrap())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        // Never reached: the check comes first.
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .env("API_BIND", "127.0.0.1:0")
        .env("HTTP_REQUEST_TIMEOUT_MS", "10000")
        .env("DB_STATEMENT_TIMEOUT_MS", "30000")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("HTTP_REQUEST_TIMEOUT_MS (10000 ms)")
            && stdout.contains("DB_STATEMENT_TIMEOUT_MS 30000 ms"),
        "{stdout}"
    );
    assert!(!stdout.contains("listening on"), "{stdout}");
}
