//! The layer stack of [`crate::app`] under load and past its deadline, through the real
//! router on a fresh database; requests are held on a PostgreSQL lock the test takes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;
use sqlx::PgPool;

use crate::routes::exports::tests::TestApi;

/// Waits, polling for at most 10 s, until `want` backends of the test database wait on a
/// lock.
async fn wait_for_lock_waiters(pool: &PgPool, want: i64) {
    wait_for_lock_waiters_within(pool, want, Duration::from_secs(10)).await;
}

/// [`wait_for_lock_waiters`], polling every 20 ms for at most `bound` of wall time.
async fn wait_for_lock_waiters_within(pool: &PgPool, want: i64, bound: Duration) {
    let started = std::time::Instant::now();
    let mut seen = -1;
    while started.elapsed() < bound {
        seen = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if seen == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{seen} backends wait on a lock after {bound:?}, not {want}");
}

#[tokio::test]
async fn the_probes_answer_200_while_the_concurrency_limit_is_saturated() {
    let api = TestApi::with_env(&[("HTTP_MAX_CONCURRENCY", "1")]).await;
    let pool = api.f.db.primary().clone();
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE domains IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let path = format!("/v1/domains/{}", api.f.domain);
    let held = api.call("GET", &path, None);
    let checks = async {
        // The one permit is taken by the request waiting on the lock.
        wait_for_lock_waiters(&pool, 1).await;
        let shed = api.call("GET", "/openapi.json", None).await;
        assert_eq!(shed.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(shed.json()["code"], "OVERLOADED");
        for probe in ["/healthz", "/readyz"] {
            let answer = api.call("GET", probe, None).await;
            assert_eq!(
                answer.status,
                StatusCode::OK,
                "{probe}: {:?}",
                answer.json()
            );
        }
        holder.commit().await.unwrap();
    };
    let (held, ()) = tokio::join!(held, checks);
    assert_eq!(held.status, StatusCode::OK, "{:?}", held.json());
}

/// The one backend of the test database waiting on a lock (after [`wait_for_lock_waiters`]).
async fn lock_waiter(pool: &PgPool) -> i32 {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// How the lock wait of backend `pid` ended, polling every 20 ms for at most `bound`:
/// `true` when the backend is still there and idle (the server cancelled the statement and
/// the session went on), `false` when it is gone (its client closed the connection).
async fn lock_wait_ended_with_backend_alive(pool: &PgPool, pid: i32, bound: Duration) -> bool {
    let started = std::time::Instant::now();
    while started.elapsed() < bound {
        let row: Option<(Option<String>, Option<String>)> =
            sqlx::query_as("SELECT state, wait_event_type FROM pg_stat_activity WHERE pid = $1")
                .bind(pid)
                .fetch_optional(pool)
                .await
                .unwrap();
        match row {
            None => return false,
            // A backend ending because its client left is `active` until it is gone; one
            // whose statement the server cancelled goes idle (in its aborted transaction,
            // then after the rollback).
            Some((Some(state), wait))
                if state.starts_with("idle") && wait.as_deref() != Some("Lock") =>
            {
                return true;
            }
            Some(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("backend {pid} still waits, or is still active, after {bound:?}");
}

#[tokio::test]
async fn a_request_past_its_timeout_is_504_and_the_server_cancels_its_statement() {
    let api = TestApi::with_env(&[("HTTP_REQUEST_TIMEOUT_MS", "2000")]).await;
    let pool = api.f.db.primary().clone();
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE keyword_metrics IN EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let path = format!("/v1/domains/{}/metrics", api.f.domain);
    let body = json!({"keywords": [{"keyword": "rust", "search_volume": 1, "position": 1.0,
                                    "recorded_at": "2026-01-02T00:00:00Z"}]});
    let ingest = api.call("POST", &path, Some(body));
    let checks = async {
        wait_for_lock_waiters(&pool, 1).await;
        let pid = lock_waiter(&pool).await;
        assert_eq!(
            api.f.db.config().statement_timeout,
            Duration::from_secs(8),
            "the bound below assumes the fixture's 8 s statement_timeout"
        );
        // The lock is still held: the statement stops waiting before the session's 8 s
        // statement_timeout either because the server cancelled it (57014, the
        // transaction's `SET LOCAL statement_timeout` from the request's 2 s deadline) or
        // because its client gave up at the deadline and the server noticed the closed socket
        // (`client_connection_check_interval`). Only the first leaves the backend alive and
        // idle: the session outlives its cancelled statement.
        assert!(
            lock_wait_ended_with_backend_alive(&pool, pid, Duration::from_secs(5)).await,
            "backend {pid} ended with its connection: the server did not cancel the statement \
             (no SET LOCAL statement_timeout from the request's deadline?)"
        );
    };
    let (answer, ()) = tokio::join!(ingest, checks);
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.json()["code"], "REQUEST_TIMEOUT");
    holder.rollback().await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM keyword_metrics")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn a_read_past_its_timeout_is_504_and_its_statement_ends_server_side_too() {
    // Outside a transaction no `SET LOCAL statement_timeout` shortens the statement: the
    // client-side bound (what is left of the request) gives up and discards the connection,
    // and the server, checking that its client is still there (`client_connection_check_interval`,
    // 1 s), ends the statement instead of running it on to the session's 8 s timeout.
    let api = TestApi::with_env(&[("HTTP_REQUEST_TIMEOUT_MS", "2000")]).await;
    let pool = api.f.db.primary().clone();
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE domains IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let timeouts_before = api.f.db.metrics().query_timeouts_total;
    let path = format!("/v1/domains/{}", api.f.domain);
    let read = api.call("GET", &path, None);
    let checks = async {
        wait_for_lock_waiters(&pool, 1).await;
        let pid = lock_waiter(&pool).await;
        assert_eq!(
            api.f.db.config().statement_timeout,
            Duration::from_secs(8),
            "the bound below assumes the fixture's 8 s statement_timeout"
        );
        // The lock is still held: only the server noticing the closed socket ends the
        // wait before 8 s (2 s of request, 1 s of check interval, and some margin), and the
        // backend goes with its connection.
        assert!(
            !lock_wait_ended_with_backend_alive(&pool, pid, Duration::from_secs(5)).await,
            "backend {pid} is still there: its connection was not discarded"
        );
    };
    let (answer, ()) = tokio::join!(read, checks);
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.json()["code"], "REQUEST_TIMEOUT");
    // The query's own bound, what was left of the request, fired (counted as a query
    // timeout): not only the request timeout dropping the request, which would discard the
    // connection the same way but count nothing.
    assert_eq!(
        api.f.db.metrics().query_timeouts_total - timeouts_before,
        1,
        "the query was not bounded by the request's remaining deadline"
    );
    holder.rollback().await.unwrap();
}
