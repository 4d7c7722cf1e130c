#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Planner tests run on a paused clock with a seeded RNG. The HTTP tests talk
//! to a real axum server on 127.0.0.1:0 over real sockets, so they use real
//! time with bounds of milliseconds (a paused clock would fire the attempt
//! timeouts while the socket I/O is still pending).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::SystemTime;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response as AxumResponse};
use smartbeak_resilience::{BreakerConfig, BreakerState};

use super::*;

/// Its first draw is 53 % of the ceiling: large enough to tell jitter apart.
const SEED: u64 = 4;

// ---------------------------------------------------------------- planner

fn plan(retry: RetryPolicy, remaining: Duration, min_last_attempt: Duration) -> CallPlan {
    CallPlan {
        adapter: AdapterName::Openai,
        attempt_timeout: Duration::from_secs(10),
        deadline_at: Instant::now() + remaining,
        min_last_attempt,
        retry: RetryPolicy {
            max_elapsed: Duration::MAX,
            ..retry
        },
    }
}

fn policy(max_attempts: u32, base: Duration, max: Duration) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        base_delay: base,
        max_delay: max,
        max_elapsed: Duration::from_secs(1),
        max_retry_after: Duration::from_secs(30),
    }
}

/// The first jitter draw the client makes with `SEED` for this policy.
fn first_jitter(retry: RetryPolicy) -> Duration {
    let unbounded = RetryPolicy {
        max_elapsed: Duration::MAX,
        ..retry
    };
    unbounded
        .next_delay_with(1, None, Duration::ZERO, &mut StdRng::seed_from_u64(SEED))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn jittered_waits_fall_within_full_jitter_bounds() {
    let retry = policy(8, Duration::from_millis(100), Duration::from_secs(2));
    let p = plan(retry, Duration::from_secs(3600), Duration::from_millis(100));
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut below_half = 0;
    for _ in 0..200 {
        for made in 1..8 {
            let ceiling = retry.backoff_ceiling(made);
            let wait = p.next_wait(made, None, Instant::now(), &mut rng).unwrap();
            assert!(wait <= ceiling, "attempt {made}: {wait:?} > {ceiling:?}");
            if wait < ceiling / 2 {
                below_half += 1;
            }
        }
    }
    // Full jitter spreads over [0, ceiling]: about half the draws fall in the
    // lower half (1400 draws; 500..900 is many sigmas wide).
    assert!(
        (500..900).contains(&below_half),
        "{below_half} of 1400 below half"
    );
    // Ceilings double from the base and stop at the cap.
    let ceilings: Vec<u64> = (1..7)
        .map(|n| retry.backoff_ceiling(n).as_millis() as u64)
        .collect();
    assert_eq!(ceilings, vec![100, 200, 400, 800, 1600, 2000]);
    // After max_attempts attempts there is no further wait.
    assert_eq!(
        p.next_wait(8, None, Instant::now(), &mut rng),
        Err(StopReason::MaxAttempts)
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_and_clamped() {
    let retry = RetryPolicy {
        max_retry_after: Duration::from_secs(30),
        ..policy(5, Duration::from_millis(100), Duration::from_secs(1))
    };
    let p = plan(retry, Duration::from_secs(3600), Duration::from_millis(100));
    let mut rng = StdRng::seed_from_u64(SEED);
    let now = Instant::now();
    // Honoured exactly (no jitter), even above the backoff cap...
    assert_eq!(
        p.next_wait(1, Some(Duration::from_secs(3)), now, &mut rng),
        Ok(Duration::from_secs(3))
    );
    // ...and clamped to max_retry_after.
    assert_eq!(
        p.next_wait(1, Some(Duration::from_secs(600)), now, &mut rng),
        Ok(Duration::from_secs(30))
    );
    // HTTP-date form, through the resilience crate's parser.
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
    let parsed = smartbeak_resilience::parse_retry_after(&date, SystemTime::now()).unwrap();
    assert!(
        parsed > Duration::from_secs(118) && parsed <= Duration::from_secs(120),
        "{parsed:?}"
    );
    assert_eq!(
        p.next_wait(1, Some(parsed), now, &mut rng),
        Ok(Duration::from_secs(30))
    );
}

#[tokio::test(start_paused = true)]
async fn deadline_trims_the_last_jittered_wait() {
    let retry = policy(5, Duration::from_secs(10), Duration::from_secs(10));
    let untrimmed = first_jitter(retry);
    assert!(
        untrimmed > Duration::from_millis(500),
        "seed gives {untrimmed:?}"
    );

    // 300 ms left, 100 ms kept for the last attempt: the wait is cut to 200 ms.
    let p = plan(
        retry,
        Duration::from_millis(300),
        Duration::from_millis(100),
    );
    let mut rng = StdRng::seed_from_u64(SEED);
    assert_eq!(
        p.next_wait(1, None, Instant::now(), &mut rng),
        Ok(Duration::from_millis(200))
    );

    // A short wait that fits is not touched.
    let short = policy(5, Duration::from_millis(10), Duration::from_millis(10));
    let p = plan(
        short,
        Duration::from_millis(300),
        Duration::from_millis(100),
    );
    let mut rng = StdRng::seed_from_u64(SEED);
    assert_eq!(
        p.next_wait(1, None, Instant::now(), &mut rng),
        Ok(first_jitter(short))
    );

    // Less than min_last_attempt left: stop.
    let p = plan(retry, Duration::from_millis(99), Duration::from_millis(100));
    assert_eq!(
        p.next_wait(1, None, Instant::now(), &mut rng),
        Err(StopReason::Deadline)
    );
    // A Retry-After that does not fit is not trimmed: stop.
    let p = plan(
        retry,
        Duration::from_millis(300),
        Duration::from_millis(100),
    );
    assert_eq!(
        p.next_wait(1, Some(Duration::from_secs(1)), Instant::now(), &mut rng),
        Err(StopReason::Deadline)
    );
    // The deadline is measured on the (paused) clock.
    tokio::time::advance(Duration::from_millis(250)).await;
    assert_eq!(
        p.next_wait(1, None, Instant::now(), &mut rng),
        Err(StopReason::Deadline)
    );
}

#[test]
fn transient_statuses_and_idempotent_methods() {
    let transient: Vec<u16> = (100..600)
        .filter(|c| is_transient_status(StatusCode::from_u16(*c).unwrap()))
        .collect();
    assert_eq!(transient, vec![408, 425, 429, 500, 502, 503, 504]);
    for m in [
        Method::GET,
        Method::HEAD,
        Method::PUT,
        Method::DELETE,
        Method::OPTIONS,
    ] {
        assert!(is_idempotent(&m), "{m}");
    }
    for m in [Method::POST, Method::PATCH, Method::CONNECT] {
        assert!(!is_idempotent(&m), "{m}");
    }
}

// ---------------------------------------------------------------- server

/// What the test server does on its n-th request (counted from 1).
#[derive(Debug, Clone)]
enum Reply {
    Status(u16),
    StatusWith(u16, &'static str, String),
    Hang,
    Redirect,
}

type Script = Arc<dyn Fn(usize) -> Reply + Send + Sync>;

#[derive(Clone)]
struct Server {
    base: String,
    hits: Arc<Mutex<Vec<(Instant, Method, HeaderMap)>>>,
}

#[derive(Clone)]
struct ServerState {
    script: Script,
    hits: Arc<Mutex<Vec<(Instant, Method, HeaderMap)>>>,
}

async fn handle(
    State(state): State<ServerState>,
    method: Method,
    headers: HeaderMap,
) -> AxumResponse {
    let n = {
        let mut hits = state.hits.lock().unwrap();
        hits.push((Instant::now(), method, headers));
        hits.len()
    };
    match (state.script)(n) {
        Reply::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Reply::StatusWith(code, name, value) => {
            (StatusCode::from_u16(code).unwrap(), [(name, value)], "").into_response()
        }
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            StatusCode::OK.into_response()
        }
        Reply::Redirect => (StatusCode::FOUND, [("location", "/loop")], "").into_response(),
    }
}

async fn serve(script: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Server {
    let hits = Arc::new(Mutex::new(Vec::new()));
    let state = ServerState {
        script: Arc::new(script),
        hits: Arc::clone(&hits),
    };
    let app = Router::new().fallback(handle).with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server {
        base: format!("http://{addr}"),
        hits,
    }
}

impl Server {
    fn url(&self) -> String {
        format!("{}/resource", self.base)
    }

    fn hits(&self) -> usize {
        self.hits.lock().unwrap().len()
    }

    fn arrivals(&self) -> Vec<Instant> {
        self.hits.lock().unwrap().iter().map(|h| h.0).collect()
    }

    async fn wait_for_hits(&self, n: usize) {
        for _ in 0..2000 {
            if self.hits() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("server saw {} requests, wanted {n}", self.hits());
    }
}

fn settings(retry: RetryPolicy, attempt_timeout: Duration, deadline: Duration) -> AdapterSettings {
    AdapterSettings {
        attempt_timeout,
        deadline,
        min_last_attempt: Duration::from_millis(20),
        retry,
        ..AdapterSettings::default()
    }
}

fn client(settings: AdapterSettings) -> HttpClient {
    HttpClient::builder()
        .defaults(settings)
        .jitter_seed(SEED)
        .build()
        .unwrap()
}

const ADAPTER: AdapterName = AdapterName::Mailchimp;

fn quick_retries(max_attempts: u32) -> RetryPolicy {
    policy(
        max_attempts,
        Duration::from_millis(5),
        Duration::from_millis(5),
    )
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---------------------------------------------------------------- HTTP

#[tokio::test]
async fn retries_503_then_succeeds() {
    let server = serve(|n| {
        if n == 1 {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let client = client(settings(quick_retries(3), ms(1000), ms(2000)));
    let response = client
        .send(ADAPTER, client.get(server.url()), &CallOptions::default())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn hanging_first_attempt_then_success_takes_one_timeout_plus_one_backoff() {
    let retry = policy(3, ms(50), ms(50));
    let backoff = first_jitter(retry);
    let server = serve(|n| {
        if n == 1 {
            Reply::Hang
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let client = client(settings(retry, ms(100), ms(2000)));
    let started = Instant::now();
    let response = client
        .send(ADAPTER, client.get(server.url()), &CallOptions::default())
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(server.hits(), 2);
    // Timers never fire early; the upper bound only allows for scheduling.
    assert!(
        elapsed >= ms(100) + backoff,
        "{elapsed:?} < 100 ms + {backoff:?}"
    );
    assert!(elapsed < ms(100) + backoff + ms(300), "{elapsed:?}");
    // The second request left after the first attempt's timeout (started
    // after `started`) and the backoff. Measured from the client's start: the
    // first request may reach the server late, so its arrival is no bound.
    let arrivals = server.arrivals();
    assert!(
        arrivals[1] - started >= ms(100) + backoff,
        "second request {:?} after the start",
        arrivals[1] - started
    );
}

#[tokio::test]
async fn retry_after_seconds_on_429_is_honoured_over_jitter() {
    // Jitter alone would wait seconds with this seed; Retry-After: 0 does not wait.
    let retry = policy(3, Duration::from_secs(10), Duration::from_secs(10));
    assert!(first_jitter(retry) > Duration::from_secs(1));
    let server = serve(|n| {
        if n == 1 {
            Reply::StatusWith(429, "retry-after", "0".to_owned())
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let client = client(settings(retry, ms(1000), Duration::from_secs(30)));
    let started = Instant::now();
    let response = client
        .send(ADAPTER, client.get(server.url()), &CallOptions::default())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(server.hits(), 2);
    assert!(started.elapsed() < ms(500), "{:?}", started.elapsed());
}

#[tokio::test]
async fn retry_after_in_both_forms_is_clamped_to_the_maximum() {
    let retry = RetryPolicy {
        max_retry_after: ms(80),
        ..policy(3, Duration::from_secs(10), Duration::from_secs(10))
    };
    assert!(first_jitter(retry) > Duration::from_secs(1));
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(10));
    for value in ["5".to_owned(), date] {
        let v = value.clone();
        let server = serve(move |n| {
            if n == 1 {
                Reply::StatusWith(503, "retry-after", v.clone())
            } else {
                Reply::Status(200)
            }
        })
        .await;
        let client = client(settings(retry, ms(1000), Duration::from_secs(30)));
        let started = Instant::now();
        let response = client
            .send(ADAPTER, client.get(server.url()), &CallOptions::default())
            .await
            .unwrap();
        let elapsed = started.elapsed();
        assert_eq!(response.status(), StatusCode::OK, "Retry-After: {value}");
        let arrivals = server.arrivals();
        // Waited the clamp (80 ms), neither the header's seconds nor the jitter.
        assert!(arrivals[1] - arrivals[0] >= ms(80), "Retry-After: {value}");
        assert!(elapsed < ms(600), "Retry-After: {value}: {elapsed:?}");
    }
}

#[tokio::test]
async fn not_found_is_not_retried_and_keeps_the_response() {
    let server = serve(|_| Reply::StatusWith(404, "x-reason", "no such thing".to_owned())).await;
    let client = client(settings(quick_retries(3), ms(1000), ms(2000)));
    let err = client
        .send(ADAPTER, client.get(server.url()), &CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(server.hits(), 1);
    assert_eq!(
        (err.adapter(), err.attempts(), err.status()),
        (ADAPTER, 1, Some(StatusCode::NOT_FOUND))
    );
    assert_eq!(
        err.to_string(),
        "request to mailchimp failed with status 404 Not Found after 1 attempt(s)"
    );
    match err {
        FetchError::NonRetryableStatus { response, .. } => {
            assert_eq!(response.headers()["x-reason"], "no such thing");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn not_implemented_is_not_retried() {
    let server = serve(|_| Reply::Status(501)).await;
    let client = client(settings(quick_retries(3), ms(1000), ms(2000)));
    let err = client
        .send(ADAPTER, client.get(server.url()), &CallOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::NonRetryableStatus { status, attempts: 1, .. } if status == 501)
    );
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn post_is_not_retried_without_an_idempotency_key() {
    let server = serve(|_| Reply::Status(503)).await;
    let client = client(settings(quick_retries(3), ms(1000), ms(2000)));
    let err = client
        .send(
            ADAPTER,
            client.post(server.url()).body("{}"),
            &CallOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(server.hits(), 1);
    match &err {
        FetchError::RetriesExhausted {
            attempts,
            last_status,
            reason,
            ..
        } => {
            assert_eq!(
                (*attempts, *last_status, *reason),
                (
                    1,
                    Some(StatusCode::SERVICE_UNAVAILABLE),
                    StopReason::NotIdempotent
                )
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "request to mailchimp gave up after 1 attempt(s), last status 503: \
         method is not idempotent and no idempotency-key header was sent"
    );
}

#[tokio::test]
async fn post_with_an_idempotency_key_is_retried_with_the_same_body_and_key() {
    let server = serve(|_| Reply::Status(503)).await;
    let client = client(settings(quick_retries(3), ms(1000), ms(2000)));
    let request = client
        .post(server.url())
        .header(IDEMPOTENCY_KEY, "order-42")
        .body("{}");
    let err = client
        .send(ADAPTER, request, &CallOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        FetchError::RetriesExhausted {
            attempts: 3,
            reason: StopReason::MaxAttempts,
            ..
        }
    ));
    let hits = server.hits.lock().unwrap();
    assert_eq!(hits.len(), 3);
    assert!(
        hits.iter()
            .all(|h| h.1 == Method::POST && h.2[IDEMPOTENCY_KEY] == "order-42")
    );
}

#[tokio::test]
async fn streaming_body_is_sent_once_and_says_so() {
    let server = serve(|_| Reply::Status(503)).await;
    let client = client(settings(quick_retries(3), ms(1000), ms(2000)));
    let body = reqwest::Body::wrap_stream(futures::stream::iter(vec![Ok::<_, std::io::Error>(
        "chunk",
    )]));
    let request = client.request(Method::PUT, server.url()).body(body);
    let err = client
        .send(ADAPTER, request, &CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(server.hits(), 1);
    assert!(matches!(
        err,
        FetchError::RetriesExhausted {
            attempts: 1,
            reason: StopReason::BodyNotClonable,
            ..
        }
    ));
    assert!(
        err.to_string()
            .ends_with("request body cannot be cloned, so it was sent once")
    );
}

#[tokio::test]
async fn connect_errors_are_retried_with_reqwest_retry_classification() {
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = client(settings(quick_retries(3), ms(1000), ms(2000)));
    let err = client
        .send(
            ADAPTER,
            client.get(format!("http://{addr}/")),
            &CallOptions::default(),
        )
        .await
        .unwrap_err();
    match err {
        FetchError::RetriesExhausted {
            attempts,
            last_status,
            reason,
            source,
            ..
        } => {
            assert_eq!(
                (attempts, last_status, reason),
                (3, None, StopReason::MaxAttempts)
            );
            assert!(source.unwrap().is_connect());
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn redirect_loop_is_a_fatal_transport_error() {
    let server = serve(|_| Reply::Redirect).await;
    let client = client(settings(quick_retries(3), ms(1000), ms(2000)));
    let err = client
        .send(ADAPTER, client.get(server.url()), &CallOptions::default())
        .await
        .unwrap_err();
    match err {
        FetchError::Transport {
            attempts: 1,
            source,
            ..
        } => assert!(source.is_redirect()),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn invalid_request_is_reported_before_sending() {
    let client = client(AdapterSettings::default());
    let err = client
        .send(ADAPTER, client.get("not a url"), &CallOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        FetchError::InvalidRequest {
            adapter: ADAPTER,
            ..
        }
    ));
    assert_eq!(err.attempts(), 0);
}

/// Cancels `token` once the server has seen `hits` requests and 20 ms more
/// have passed; returns when it cancelled.
fn cancel_after(
    server: &Server,
    hits: usize,
    token: CancellationToken,
) -> tokio::task::JoinHandle<Instant> {
    let server = server.clone();
    tokio::spawn(async move {
        server.wait_for_hits(hits).await;
        tokio::time::sleep(ms(20)).await;
        let at = Instant::now();
        token.cancel();
        at
    })
}

#[tokio::test]
async fn cancellation_mid_attempt_returns_within_50ms() {
    let server = serve(|_| Reply::Hang).await;
    let client = client(settings(
        quick_retries(3),
        Duration::from_secs(10),
        Duration::from_secs(30),
    ));
    let token = CancellationToken::new();
    let canceller = cancel_after(&server, 1, token.clone());
    let err = client
        .send(
            ADAPTER,
            client.get(server.url()),
            &CallOptions::default().cancel(token),
        )
        .await
        .unwrap_err();
    let returned = Instant::now();
    let cancelled_at = canceller.await.unwrap();
    assert!(
        matches!(
            err,
            FetchError::Cancelled {
                adapter: ADAPTER,
                attempts: 1
            }
        ),
        "{err:?}"
    );
    assert!(
        returned - cancelled_at < ms(50),
        "took {:?}",
        returned - cancelled_at
    );
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn cancellation_mid_backoff_returns_within_50ms() {
    let retry = policy(3, Duration::from_secs(10), Duration::from_secs(10));
    assert!(
        first_jitter(retry) > Duration::from_secs(1),
        "the backoff must still be pending"
    );
    let server = serve(|_| Reply::Status(503)).await;
    let client = client(settings(
        retry,
        Duration::from_secs(10),
        Duration::from_secs(30),
    ));
    let token = CancellationToken::new();
    let canceller = cancel_after(&server, 1, token.clone());
    let err = client
        .send(
            ADAPTER,
            client.get(server.url()),
            &CallOptions::default().cancel(token),
        )
        .await
        .unwrap_err();
    let returned = Instant::now();
    let cancelled_at = canceller.await.unwrap();
    assert!(
        matches!(err, FetchError::Cancelled { attempts: 1, .. }),
        "{err:?}"
    );
    assert!(
        returned - cancelled_at < ms(50),
        "took {:?}",
        returned - cancelled_at
    );
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn total_deadline_is_respected_against_a_hanging_server() {
    let server = serve(|_| Reply::Hang).await;
    let client = client(settings(quick_retries(10), ms(100), ms(250)));
    let started = Instant::now();
    let err = client
        .send(ADAPTER, client.get(server.url()), &CallOptions::default())
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    // On time: two full attempts (100 ms each, waits of at most 5 ms), then a
    // third cut by the deadline. A late scheduler can leave room for only two:
    // the second is then cut by the deadline, or it ends with less than
    // `min_last_attempt` (20 ms) left and no third attempt starts.
    match err {
        FetchError::Timeout {
            attempts,
            scope,
            limit,
            ..
        } => match (attempts, scope) {
            (2 | 3, TimeoutScope::Deadline) => {
                assert!(limit < ms(100), "{limit:?}");
                // Timers never fire early: the cut attempt ended at the deadline.
                assert!(elapsed >= ms(250), "{elapsed:?}");
            }
            (2, TimeoutScope::Attempt) => {
                assert_eq!(limit, ms(100));
                assert!(elapsed > ms(230), "{elapsed:?}");
            }
            other => panic!("unexpected attempts and scope {other:?}"),
        },
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        elapsed < ms(250) + ms(200),
        "overshot the deadline: {elapsed:?}"
    );
}

#[tokio::test]
async fn total_deadline_trims_the_last_backoff_instead_of_overshooting() {
    let retry = policy(5, Duration::from_secs(10), Duration::from_secs(10));
    assert!(first_jitter(retry) > Duration::from_secs(1));
    let server = serve(|_| Reply::Status(503)).await;
    let settings = AdapterSettings {
        min_last_attempt: ms(100),
        ..settings(retry, ms(1000), ms(400))
    };
    let client = client(settings);
    let started = Instant::now();
    let err = client
        .send(ADAPTER, client.get(server.url()), &CallOptions::default())
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(
            err,
            FetchError::RetriesExhausted {
                attempts: 2,
                reason: StopReason::Deadline,
                ..
            }
        ),
        "{err:?}"
    );
    // The seconds-long wait was cut to end 100 ms before the deadline, so
    // the second request left 300 ms after the call started at the earliest
    // (timers never fire early), and well before the untrimmed wait.
    let second = server.arrivals()[1] - started;
    assert!(second >= ms(300), "{second:?}");
    assert!(second < ms(400) + ms(200), "wait not trimmed: {second:?}");
    assert!(elapsed < ms(400) + ms(200), "overshot: {elapsed:?}");
}

#[tokio::test]
async fn per_call_options_override_the_adapter_settings() {
    let server = serve(|_| Reply::Hang).await;
    let client = client(settings(
        quick_retries(1),
        Duration::from_secs(10),
        Duration::from_secs(30),
    ));
    let started = Instant::now();
    let err = client
        .send(
            ADAPTER,
            client.get(server.url()),
            &CallOptions::default().attempt_timeout(ms(50)),
        )
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        FetchError::Timeout {
            attempts: 1,
            scope: TimeoutScope::Attempt,
            ..
        }
    ));
    assert!(started.elapsed() < ms(500));
}

#[tokio::test]
async fn duration_max_means_no_limit_and_does_not_overflow() {
    let server = serve(|n| {
        if n % 2 == 1 {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    // In the adapter's settings...
    let per_adapter = client(settings(quick_retries(3), Duration::MAX, Duration::MAX));
    let response = per_adapter
        .send(
            ADAPTER,
            per_adapter.get(server.url()),
            &CallOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // ...and per call.
    let per_call = client(settings(quick_retries(3), ms(1000), ms(2000)));
    let response = per_call
        .send(
            ADAPTER,
            per_call.get(server.url()),
            &CallOptions::default()
                .deadline(Duration::MAX)
                .attempt_timeout(Duration::MAX),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(server.hits(), 4);
}

#[tokio::test]
async fn breaker_opens_after_repeated_failures_and_fails_fast() {
    let server = serve(|_| Reply::Status(503)).await;
    let breaker = BreakerPolicy::new(BreakerConfig {
        consecutive_failures: 3,
        minimum_calls: 100,
        window_size: 100,
        open_duration: Duration::from_secs(60),
        ..BreakerConfig::default()
    })
    .unwrap();
    let client = client(AdapterSettings {
        breaker,
        ..settings(RetryPolicy::never(), ms(1000), ms(2000))
    });
    for _ in 0..3 {
        let err = client
            .send(ADAPTER, client.get(server.url()), &CallOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            FetchError::RetriesExhausted {
                reason: StopReason::MaxAttempts,
                ..
            }
        ));
    }
    assert_eq!(client.breaker(ADAPTER).state(), BreakerState::Open);
    let started = Instant::now();
    let err = client
        .send(ADAPTER, client.get(server.url()), &CallOptions::default())
        .await
        .unwrap_err();
    assert!(started.elapsed() < ms(50));
    match err {
        FetchError::CircuitOpen {
            adapter,
            retry_after,
        } => {
            assert_eq!(adapter, ADAPTER);
            assert!(
                retry_after <= Duration::from_secs(60) && retry_after > Duration::from_secs(50)
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(server.hits(), 3, "nothing sent while open");
    // Other adapters have breakers of their own.
    assert_eq!(
        client.breaker(AdapterName::Vimeo).state(),
        BreakerState::Closed
    );
}

#[tokio::test]
async fn bulkhead_refuses_a_call_over_the_limit() {
    let server = serve(|n| {
        if n == 1 {
            Reply::Hang
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let client = client(AdapterSettings {
        bulkhead: BulkheadConfig {
            max_concurrent: 1,
            max_wait: Duration::ZERO,
        },
        ..settings(quick_retries(1), ms(300), ms(1000))
    });
    let first = tokio::spawn({
        let client = client.clone();
        let url = server.url();
        async move {
            client
                .send(ADAPTER, client.get(url), &CallOptions::default())
                .await
        }
    });
    server.wait_for_hits(1).await;
    let err = client
        .send(ADAPTER, client.get(server.url()), &CallOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::BulkheadFull {
                adapter: ADAPTER,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(matches!(
        first.await.unwrap(),
        Err(FetchError::Timeout { .. })
    ));
    // The slot is free again.
    assert!(
        client
            .send(ADAPTER, client.get(server.url()), &CallOptions::default())
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn bulkhead_wait_ends_at_the_call_deadline() {
    let server = serve(|_| Reply::Hang).await;
    // The bulkhead would wait 10 s for a slot; the first call holds it for 1 s.
    let client = client(AdapterSettings {
        bulkhead: BulkheadConfig {
            max_concurrent: 1,
            max_wait: Duration::from_secs(10),
        },
        ..settings(quick_retries(1), ms(1000), ms(2000))
    });
    let first = tokio::spawn({
        let client = client.clone();
        let url = server.url();
        async move {
            client
                .send(ADAPTER, client.get(url), &CallOptions::default())
                .await
        }
    });
    server.wait_for_hits(1).await;
    let started = Instant::now();
    let err = client
        .send(
            ADAPTER,
            client.get(server.url()),
            &CallOptions::default().deadline(ms(100)),
        )
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    match err {
        FetchError::BulkheadFull { adapter, source } => {
            assert_eq!(adapter, ADAPTER);
            assert!(source.waited <= ms(100), "{:?}", source.waited);
        }
        other => panic!("waited past the deadline: {other:?}"),
    }
    assert!(elapsed >= ms(90), "{elapsed:?}");
    assert!(elapsed < ms(100) + ms(200), "{elapsed:?}");
    assert_eq!(server.hits(), 1);
    first.abort();
}

#[tokio::test]
async fn retry_budget_stops_retries_when_empty() {
    let server = serve(|_| Reply::Status(503)).await;
    let client = HttpClient::builder()
        .defaults(settings(quick_retries(5), ms(1000), ms(2000)))
        .retry_budget_config(RetryBudgetConfig {
            ttl: Duration::from_secs(10),
            min_retries_per_sec: 0,
            retry_percent: 100,
        })
        .jitter_seed(SEED)
        .build()
        .unwrap();
    // One deposit of 100 % buys exactly one retry.
    let err = client
        .send(ADAPTER, client.get(server.url()), &CallOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::RetriesExhausted {
                attempts: 2,
                reason: StopReason::RetryBudget,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn breaker_opened_during_the_backoff_stops_the_retry() {
    // Retry-After: 1 s, clamped to a 300 ms wait.
    let server = serve(|_| Reply::StatusWith(503, "retry-after", "1".to_owned())).await;
    let breaker = BreakerPolicy::new(BreakerConfig {
        consecutive_failures: 2,
        minimum_calls: 100,
        window_size: 100,
        open_duration: Duration::from_secs(60),
        ..BreakerConfig::default()
    })
    .unwrap();
    let retry = RetryPolicy {
        max_retry_after: ms(300),
        ..quick_retries(3)
    };
    let client = HttpClient::builder()
        .defaults(AdapterSettings {
            breaker,
            ..settings(retry, ms(1000), ms(2000))
        })
        // One deposit buys exactly one retry, so the withdrawal shows when
        // the call has decided to retry and is waiting.
        .retry_budget_config(RetryBudgetConfig {
            ttl: Duration::from_secs(10),
            min_retries_per_sec: 0,
            retry_percent: 100,
        })
        .jitter_seed(SEED)
        .build()
        .unwrap();
    let call = tokio::spawn({
        let client = client.clone();
        let url = server.url();
        async move {
            client
                .send(ADAPTER, client.get(url), &CallOptions::default())
                .await
        }
    });
    server.wait_for_hits(1).await;
    for _ in 0..2000 {
        if client.retry_budget().available() == 0 {
            break;
        }
        tokio::time::sleep(ms(1)).await;
    }
    assert_eq!(
        client.retry_budget().available(),
        0,
        "the call never retried"
    );
    // Other callers open the breaker while this call waits.
    let shared = client.breaker(ADAPTER);
    for _ in 0..2 {
        shared.try_acquire().unwrap().record(Verdict::Failure);
    }
    assert_eq!(shared.state(), BreakerState::Open);

    let err = call.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::RetriesExhausted {
                attempts: 1,
                last_status: Some(StatusCode::SERVICE_UNAVAILABLE),
                reason: StopReason::CircuitOpen,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(server.hits(), 1, "nothing sent after the breaker opened");
}

#[tokio::test]
async fn clients_given_one_registry_and_budget_share_them() {
    let server = serve(|_| Reply::Status(503)).await;
    // A retry costs 100 units and each call deposits 50: one client alone
    // never affords one; two sharing the budget afford one between them.
    let budget = Arc::new(RetryBudget::new(RetryBudgetConfig {
        ttl: Duration::from_secs(10),
        min_retries_per_sec: 0,
        retry_percent: 50,
    }));
    let registry = Arc::new(BreakerRegistry::default());
    let build = || {
        HttpClient::builder()
            .defaults(settings(quick_retries(5), ms(1000), ms(2000)))
            .retry_budget(Arc::clone(&budget))
            .breaker_registry(Arc::clone(&registry))
            .jitter_seed(SEED)
            .build()
            .unwrap()
    };
    let (a, b) = (build(), build());
    assert!(Arc::ptr_eq(a.retry_budget(), &budget));
    assert!(Arc::ptr_eq(b.breaker_registry(), &registry));

    let attempts = |err: FetchError| match err {
        FetchError::RetriesExhausted {
            attempts,
            reason: StopReason::RetryBudget,
            ..
        } => attempts,
        other => panic!("unexpected {other:?}"),
    };
    let first = a
        .send(ADAPTER, a.get(server.url()), &CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(attempts(first), 1, "50 units buy no retry");
    let second = b
        .send(ADAPTER, b.get(server.url()), &CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(attempts(second), 2, "a's deposit and b's buy one retry");

    // One breaker per (adapter, policy) across both clients.
    assert!(Arc::ptr_eq(&a.breaker(ADAPTER), &b.breaker(ADAPTER)));
    let shared = registry.get(ADAPTER, &a.settings(ADAPTER).breaker);
    while shared.state() != BreakerState::Open {
        shared.try_acquire().unwrap().record(Verdict::Failure);
    }
    let hits = server.hits();
    for client in [&a, &b] {
        let err = client
            .send(ADAPTER, client.get(server.url()), &CallOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::CircuitOpen { .. }), "{err:?}");
    }
    assert_eq!(server.hits(), hits);
}

// ---------------------------------------------------------------- metrics

#[derive(Default)]
struct TestRecorder {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
    histograms: Mutex<HashMap<String, Arc<Samples>>>,
}

#[derive(Default)]
struct Samples(AtomicUsize);

impl metrics::HistogramFn for Samples {
    fn record(&self, _value: f64) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn render(key: &metrics::Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl metrics::Recorder for TestRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let mut counters = self.counters.lock().unwrap();
        metrics::Counter::from_arc(Arc::clone(counters.entry(render(key)).or_default()))
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        let mut histograms = self.histograms.lock().unwrap();
        metrics::Histogram::from_arc(Arc::clone(histograms.entry(render(key)).or_default()))
    }
}

impl TestRecorder {
    fn counter(&self, key: &str) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .get(key)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }

    fn samples(&self, key: &str) -> usize {
        self.histograms
            .lock()
            .unwrap()
            .get(key)
            .map_or(0, |h| h.0.load(Ordering::SeqCst))
    }
}

#[tokio::test(flavor = "current_thread")]
async fn metrics_count_attempts_retries_outcomes_and_latency_per_adapter() {
    let recorder = TestRecorder::default();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let server = serve(|n| {
        if n == 1 {
            Reply::Status(503)
        } else {
            Reply::Status(404)
        }
    })
    .await;
    let client = client(settings(quick_retries(3), ms(1000), ms(2000)));
    // 503, 404: two attempts, one retry, outcome non_retryable_status.
    let _ = client
        .send(ADAPTER, client.get(server.url()), &CallOptions::default())
        .await
        .unwrap_err();
    let _ = client
        .send(
            AdapterName::Vimeo,
            client.get("not a url"),
            &CallOptions::default(),
        )
        .await
        .unwrap_err();

    assert_eq!(
        recorder.counter("http_client_attempts_total{adapter=mailchimp}"),
        2
    );
    assert_eq!(
        recorder.counter("http_client_retries_total{adapter=mailchimp}"),
        1
    );
    assert_eq!(
        recorder
            .counter("http_client_requests_total{adapter=mailchimp,outcome=non_retryable_status}"),
        1
    );
    assert_eq!(
        recorder.counter("http_client_requests_total{adapter=vimeo,outcome=invalid_request}"),
        1
    );
    assert_eq!(
        recorder.samples("http_client_attempt_duration_seconds{adapter=mailchimp}"),
        2
    );
    assert_eq!(
        recorder.samples("http_client_request_duration_seconds{adapter=mailchimp}"),
        1
    );
}
