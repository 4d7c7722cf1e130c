#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Two kinds of test. Timing tests run on a paused tokio clock against a
//! scripted in-process "server" installed as a reqwest-middleware middleware
//! (no socket, so the clock only moves when every task waits on a timer):
//! their bounds are exact. Tests of what reqwest itself does (sockets,
//! connect errors, redirects, a body that stalls after the head) talk to a
//! real axum or TCP server on 127.0.0.1:0 in real time; their only time
//! bounds are generous (seconds), checked with 30 runs on a busy machine.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::SystemTime;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response as AxumResponse};
use futures::future::BoxFuture;
use rand::SeedableRng;
use rand::rngs::StdRng;
use smartbeak_resilience::{
    BreakerConfig, BreakerPolicy, BreakerState, BulkheadConfig, ResilienceConfig, RetryBudget,
    RetryBudgetConfig, TokioClock,
};

use super::*;

/// Its first draw is 53 % of the ceiling: large enough to tell jitter apart.
const SEED: u64 = 4;

const ADAPTER: AdapterName = AdapterName::Mailchimp;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn policy(max_attempts: u32, base: Duration, max: Duration) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        base_delay: base,
        max_delay: max,
        max_elapsed: Duration::from_secs(1),
        min_last_attempt: ms(20),
        max_retry_after: Duration::from_secs(30),
    }
}

fn quick_retries(max_attempts: u32) -> RetryPolicy {
    policy(max_attempts, ms(5), ms(5))
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

/// A policy with this retry schedule, attempt timeout and total deadline.
fn settings(retry: RetryPolicy, attempt_timeout: Duration, deadline: Duration) -> Policy {
    Policy {
        attempt_timeout: Some(attempt_timeout),
        retry: RetryPolicy {
            max_elapsed: deadline,
            ..retry
        },
        ..Policy::default()
    }
}

/// A resilience set of the test's own (seeded jitter, tokio clock).
fn resilience_with(config: ResilienceConfig) -> Resilience {
    Resilience::with_clock(
        ResilienceConfig {
            jitter_seed: Some(SEED),
            ..config
        },
        Arc::new(TokioClock::new()),
    )
}

fn builder(policy: Policy) -> HttpClientBuilder {
    HttpClient::builder(resilience_with(ResilienceConfig::default())).defaults(policy)
}

fn client(policy: Policy) -> HttpClient {
    builder(policy).build().unwrap()
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

// ---------------------------------------------------------------- scripted server

/// What the server does on its n-th request (counted from 1).
#[derive(Debug, Clone)]
enum Reply {
    Status(u16),
    StatusWith(u16, &'static str, String),
    /// Answers 200 after this long.
    SlowOk(Duration),
    Hang,
    Redirect,
}

type Script = Arc<dyn Fn(usize) -> Reply + Send + Sync>;
type Hits = Arc<Mutex<Vec<(Instant, Method, HeaderMap)>>>;

fn record_hit(hits: &Hits, method: Method, headers: HeaderMap) -> usize {
    let mut hits = hits.lock().unwrap();
    hits.push((Instant::now(), method, headers));
    hits.len()
}

#[derive(Clone)]
struct Server {
    base: String,
    hits: Hits,
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
            tokio::time::sleep(ms(1)).await;
        }
        panic!("server saw {} requests, wanted {n}", self.hits());
    }
}

/// Coerces a closure into reqwest-middleware's closure middleware shape.
fn as_middleware<F>(f: F) -> F
where
    F: for<'a> Fn(
        Request,
        &'a mut http::Extensions,
        reqwest_middleware::Next<'a>,
    ) -> BoxFuture<'a, reqwest_middleware::Result<reqwest::Response>>,
{
    f
}

/// A scripted server inside the client: a middleware that answers every
/// request itself on tokio's clock, so tests can run on a paused clock.
/// Its URL is never dialled.
fn scripted(
    policy: Policy,
    config: ResilienceConfig,
    script: impl Fn(usize) -> Reply + Send + Sync + 'static,
) -> (HttpClient, Server) {
    let hits: Hits = Arc::default();
    let script: Script = Arc::new(script);
    let seen = Arc::clone(&hits);
    let middleware = as_middleware(move |request, _, _| {
        let n = record_hit(&seen, request.method().clone(), request.headers().clone());
        let reply = script(n);
        Box::pin(async move {
            let status = |code: u16| http::Response::builder().status(code);
            let response = match reply {
                Reply::Status(code) => status(code).body(Vec::new()),
                Reply::StatusWith(code, name, value) => {
                    status(code).header(name, value).body(Vec::new())
                }
                Reply::SlowOk(after) => {
                    tokio::time::sleep(after).await;
                    status(200).body(b"slow".to_vec())
                }
                Reply::Hang => {
                    std::future::pending::<()>().await;
                    status(200).body(Vec::new())
                }
                Reply::Redirect => status(302).header("location", "/loop").body(Vec::new()),
            };
            Ok(reqwest::Response::from(response.unwrap()))
        })
    });
    let client = HttpClient::builder(resilience_with(config))
        .defaults(policy)
        .middleware(Arc::new(middleware))
        .build()
        .unwrap();
    let server = Server {
        base: "http://scripted.invalid".to_owned(),
        hits,
    };
    (client, server)
}

// ---------------------------------------------------------------- real server

#[derive(Clone)]
struct ServerState {
    script: Script,
    hits: Hits,
}

async fn handle(
    State(state): State<ServerState>,
    method: Method,
    headers: axum::http::HeaderMap,
) -> AxumResponse {
    let n = record_hit(&state.hits, method, headers);
    match (state.script)(n) {
        Reply::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Reply::StatusWith(code, name, value) => {
            (StatusCode::from_u16(code).unwrap(), [(name, value)], "").into_response()
        }
        Reply::SlowOk(after) => {
            tokio::time::sleep(after).await;
            StatusCode::OK.into_response()
        }
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            StatusCode::OK.into_response()
        }
        Reply::Redirect => (StatusCode::FOUND, [("location", "/loop")], "").into_response(),
    }
}

async fn serve(script: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Server {
    let hits: Hits = Arc::default();
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

// ---------------------------------------------------------------- over real sockets

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
    let response = client.get(ADAPTER, server.url()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn not_found_is_not_retried_and_keeps_the_response() {
    let server = serve(|_| Reply::StatusWith(404, "x-reason", "no such thing".to_owned())).await;
    let client = client(settings(quick_retries(3), ms(1000), ms(2000)));
    let err = client.get(ADAPTER, server.url()).send().await.unwrap_err();
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
            assert_eq!(response.bytes().await.unwrap(), b"");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn not_implemented_is_not_retried() {
    let server = serve(|_| Reply::Status(501)).await;
    let client = client(settings(quick_retries(3), ms(1000), ms(2000)));
    let err = client.get(ADAPTER, server.url()).send().await.unwrap_err();
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
        .post(ADAPTER, server.url())
        .body("{}")
        .send()
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
    // It still counts against the breaker: the server did fail.
    assert_eq!(client.breaker(ADAPTER).snapshot().window_failures, 1);
}

#[tokio::test]
async fn post_with_an_idempotency_key_is_retried_with_the_same_body_and_key() {
    let server = serve(|_| Reply::Status(503)).await;
    let client = client(settings(quick_retries(3), ms(1000), ms(2000)));
    let err = client
        .post(ADAPTER, server.url())
        .header(IDEMPOTENCY_KEY, "order-42")
        .body("{}")
        .send()
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
    let err = client
        .request(ADAPTER, Method::PUT, server.url())
        .body(body)
        .send()
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

/// A port that was just free: nothing listens there.
fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/")
}

#[tokio::test]
async fn connect_errors_are_retried_for_every_method() {
    let client = client(settings(quick_retries(3), ms(1000), ms(2000)));
    // GET, and POST without an idempotency key: the request never left.
    for request in [
        client.get(ADAPTER, closed_port_url()),
        client.post(ADAPTER, closed_port_url()).body("{}"),
    ] {
        match request.send().await.unwrap_err() {
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
}

#[tokio::test]
async fn redirect_loop_is_a_transport_error_that_does_not_count_against_the_breaker() {
    let server = serve(|_| Reply::Redirect).await;
    let client = client(settings(quick_retries(3), ms(1000), ms(2000)));
    let err = client.get(ADAPTER, server.url()).send().await.unwrap_err();
    match err {
        FetchError::Transport {
            attempts: 1,
            source,
            ..
        } => assert!(source.is_redirect()),
        other => panic!("unexpected {other:?}"),
    }
    let snapshot = client.breaker(ADAPTER).snapshot();
    assert_eq!((snapshot.window_calls, snapshot.window_failures), (0, 0));
}

/// Every error of a call whose URL carries a key, with its source chain.
fn full_text(err: &FetchError) -> String {
    let mut text = format!("{err} {err:?}");
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(&format!(" {s} {s:?}"));
        source = s.source();
    }
    text
}

#[tokio::test]
async fn errors_do_not_carry_a_secret_from_the_url() {
    let server = serve(|_| Reply::Redirect).await;
    let client = client(settings(quick_retries(2), ms(1000), ms(2000)));
    let secret = "key=sk-do-not-log";
    let redirect = client
        .get(ADAPTER, format!("{}?{secret}", server.url()))
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(redirect, FetchError::Transport { .. }),
        "{redirect:?}"
    );
    let connect = client
        .post(ADAPTER, format!("{}?{secret}", closed_port_url()))
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(connect, FetchError::RetriesExhausted { .. }),
        "{connect:?}"
    );
    let not_found = serve(|_| Reply::Status(404)).await;
    let refused = client
        .get(ADAPTER, format!("{}?{secret}", not_found.url()))
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(refused, FetchError::NonRetryableStatus { .. }),
        "{refused:?}"
    );
    for err in [redirect, connect, refused] {
        let text = full_text(&err);
        assert!(!text.contains("sk-do-not-log"), "{text}");
    }
}

#[tokio::test]
async fn invalid_request_is_reported_before_sending() {
    let client = client(default_policy());
    let err = client.get(ADAPTER, "not a url").send().await.unwrap_err();
    assert!(matches!(
        err,
        FetchError::InvalidRequest {
            adapter: ADAPTER,
            ..
        }
    ));
    assert_eq!(err.attempts(), 0);
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
    // In the adapter's policy...
    let per_adapter = client(settings(quick_retries(3), Duration::MAX, Duration::MAX));
    let response = per_adapter.get(ADAPTER, server.url()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.unwrap(), b"");
    // ...and per call.
    let per_call = client(settings(quick_retries(3), ms(1000), ms(2000)));
    let response = per_call
        .get(ADAPTER, server.url())
        .deadline(Duration::MAX)
        .attempt_timeout(Duration::MAX)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(server.hits(), 4);
}

#[tokio::test]
async fn retry_budget_stops_retries_when_empty() {
    let server = serve(|_| Reply::Status(503)).await;
    let client = HttpClient::builder(resilience_with(ResilienceConfig {
        retry_budget: RetryBudgetConfig {
            ttl: Duration::from_secs(10),
            min_retries_per_sec: 0,
            retry_percent: 100,
        },
        ..ResilienceConfig::default()
    }))
    .defaults(settings(quick_retries(5), ms(1000), ms(2000)))
    .build()
    .unwrap();
    // One deposit of 100 % buys exactly one retry.
    let err = client.get(ADAPTER, server.url()).send().await.unwrap_err();
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
async fn clients_given_one_resilience_share_breakers_bulkheads_and_budgets() {
    let server = serve(|_| Reply::Status(503)).await;
    // A retry costs 100 units and each call deposits 50: one call alone
    // never affords one; two calls to the adapter, from two clients, do.
    let shared = resilience_with(ResilienceConfig {
        retry_budget: RetryBudgetConfig {
            ttl: Duration::from_secs(10),
            min_retries_per_sec: 0,
            retry_percent: 50,
        },
        ..ResilienceConfig::default()
    });
    let build = || {
        HttpClient::builder(shared.clone())
            .defaults(settings(quick_retries(5), ms(1000), ms(2000)))
            .build()
            .unwrap()
    };
    let (a, b) = (build(), build());
    assert!(a.resilience().same_as(&shared) && b.resilience().same_as(&shared));

    let attempts = |err: FetchError| match err {
        FetchError::RetriesExhausted {
            attempts,
            reason: StopReason::RetryBudget,
            ..
        } => attempts,
        other => panic!("unexpected {other:?}"),
    };
    let first = a.get(ADAPTER, server.url()).send().await.unwrap_err();
    assert_eq!(attempts(first), 1, "50 units buy no retry");
    let second = b.get(ADAPTER, server.url()).send().await.unwrap_err();
    assert_eq!(attempts(second), 2, "a's deposit and b's buy one retry");

    // One breaker per (adapter, policy) across both clients.
    assert!(Arc::ptr_eq(&a.breaker(ADAPTER), &b.breaker(ADAPTER)));
    let breaker = a.breaker(ADAPTER);
    while breaker.state() != BreakerState::Open {
        breaker.try_acquire().unwrap().record(Verdict::Failure);
    }
    let hits = server.hits();
    for client in [&a, &b] {
        let err = client.get(ADAPTER, server.url()).send().await.unwrap_err();
        assert!(matches!(err, FetchError::CircuitOpen { .. }), "{err:?}");
    }
    assert_eq!(server.hits(), hits);
}

/// A server that sends a response head announcing a body, then stalls.
async fn stalling_body_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
                    .await;
                tokio::time::sleep(Duration::from_secs(60)).await;
                drop(socket);
            });
        }
    });
    format!("http://{addr}/")
}

#[tokio::test]
async fn a_body_that_stalls_after_the_head_ends_at_the_deadline() {
    let url = stalling_body_server().await;
    // The response head comes at once; the body never completes. The
    // deadline (also the head's) is generous for a busy machine.
    let client = client(settings(
        quick_retries(2),
        Duration::from_secs(10),
        ms(1000),
    ));
    let started = Instant::now();
    let response = client.get(ADAPTER, url.clone()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let err = response.bytes().await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(
            err,
            FetchError::Timeout {
                scope: TimeoutScope::Deadline,
                reason: StopReason::Deadline,
                limit,
                ..
            } if limit == ms(1000)
        ),
        "{err:?}"
    );
    // Timers never fire early; the upper bound is generous (a busy machine).
    assert!(elapsed >= ms(1000), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");

    // Read inside the attempt, the attempt timeout covers the body too: each
    // of the two attempts is cut by it, and the call gives up as a timeout.
    let started = Instant::now();
    let err = client
        .get(ADAPTER, url)
        .options(
            CallOptions::default()
                .attempt_timeout(ms(200))
                .deadline(Duration::from_secs(10)),
        )
        .fetch_bytes()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Timeout {
                scope: TimeoutScope::Attempt,
                attempts: 2,
                reason: StopReason::MaxAttempts,
                limit,
                ..
            } if limit == ms(200)
        ),
        "{err:?}"
    );
    assert!(started.elapsed() >= ms(400), "{:?}", started.elapsed());
}

#[tokio::test]
async fn with_no_deadline_the_attempt_timeout_bounds_a_stalled_body() {
    let url = stalling_body_server().await;
    let client = client(settings(
        quick_retries(1),
        Duration::from_secs(10),
        ms(1000),
    ));
    let started = Instant::now();
    let response = client
        .get(ADAPTER, url)
        .options(
            CallOptions::default()
                .attempt_timeout(ms(300))
                .deadline(Duration::MAX),
        )
        .send()
        .await
        .unwrap();
    let err = response.bytes().await.unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Timeout {
                scope: TimeoutScope::Attempt,
                limit,
                ..
            } if limit == ms(300)
        ),
        "{err:?}"
    );
    let elapsed = started.elapsed();
    assert!(elapsed >= ms(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
}

#[tokio::test]
async fn a_body_read_stops_when_the_call_is_cancelled() {
    let url = stalling_body_server().await;
    let client = client(settings(
        quick_retries(1),
        Duration::from_secs(10),
        Duration::from_secs(30),
    ));
    let token = CancellationToken::new();
    let mut response = client
        .get(ADAPTER, url)
        .cancel(token.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.chunk().await.unwrap().unwrap(), b"partial");
    let read = tokio::spawn(async move { response.chunk().await });
    token.cancel();
    let err = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the read did not stop on cancel")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, FetchError::Cancelled { .. }), "{err:?}");
}

// ---------------------------------------------------------------- paused clock

#[tokio::test(start_paused = true)]
async fn hanging_first_attempt_then_success_takes_one_timeout_plus_one_backoff() {
    let retry = policy(3, ms(50), ms(50));
    let backoff = first_jitter(retry);
    assert!(backoff > Duration::ZERO);
    let (client, server) = scripted(
        settings(retry, ms(100), ms(2000)),
        ResilienceConfig::default(),
        |n| {
            if n == 1 {
                Reply::Hang
            } else {
                Reply::Status(200)
            }
        },
    );
    let started = Instant::now();
    let response = client.get(ADAPTER, server.url()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(server.hits(), 2);
    // The second request left after the first attempt's timeout and the
    // backoff (tokio's timer rounds each up to its millisecond).
    let second = server.arrivals()[1] - started;
    assert!(
        second >= ms(100) + backoff && second <= ms(102) + backoff,
        "{second:?} vs 100 ms + {backoff:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_seconds_on_429_is_honoured_over_jitter() {
    // Jitter alone would wait seconds with this seed; Retry-After: 1 waits 1 s.
    let retry = policy(3, Duration::from_secs(10), Duration::from_secs(10));
    assert!(first_jitter(retry) > Duration::from_secs(2));
    let (client, server) = scripted(
        settings(retry, ms(1000), Duration::from_secs(30)),
        ResilienceConfig::default(),
        |n| {
            if n == 1 {
                Reply::StatusWith(429, "retry-after", "1".to_owned())
            } else {
                Reply::Status(200)
            }
        },
    );
    let response = client.get(ADAPTER, server.url()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let arrivals = server.arrivals();
    assert_eq!(arrivals[1] - arrivals[0], Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn retry_after_above_the_cap_gives_up_at_once_and_hands_the_value_on() {
    let retry = RetryPolicy {
        max_retry_after: ms(80),
        ..policy(3, ms(10), ms(10))
    };
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(10));
    for (value, least, most) in [
        (
            "5".to_owned(),
            Duration::from_secs(5),
            Duration::from_secs(5),
        ),
        (date, Duration::from_secs(8), Duration::from_secs(10)),
    ] {
        let v = value.clone();
        let (client, server) = scripted(
            settings(retry, ms(1000), Duration::from_secs(30)),
            ResilienceConfig::default(),
            move |_| Reply::StatusWith(503, "retry-after", v.clone()),
        );
        let started = Instant::now();
        let err = client.get(ADAPTER, server.url()).send().await.unwrap_err();
        match &err {
            FetchError::RetriesExhausted {
                attempts: 1,
                reason: StopReason::RetryAfterTooLong { retry_after },
                ..
            } => assert!(
                *retry_after >= least && *retry_after <= most,
                "Retry-After: {value}: {retry_after:?}"
            ),
            other => panic!("Retry-After: {value}: unexpected {other:?}"),
        }
        let passed_on = err.retry_after().unwrap();
        assert!(passed_on >= least && passed_on <= most, "{passed_on:?}");
        // No early retry: one request, no wait.
        assert_eq!(server.hits(), 1, "Retry-After: {value}");
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
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

#[tokio::test(start_paused = true)]
async fn cancellation_mid_attempt_returns_at_once() {
    let (client, server) = scripted(
        settings(
            quick_retries(3),
            Duration::from_secs(10),
            Duration::from_secs(30),
        ),
        ResilienceConfig::default(),
        |_| Reply::Hang,
    );
    let token = CancellationToken::new();
    let canceller = cancel_after(&server, 1, token.clone());
    let err = client
        .get(ADAPTER, server.url())
        .cancel(token)
        .send()
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
    assert_eq!(returned, cancelled_at);
    assert_eq!(server.hits(), 1);
    // A cancelled call is not an adapter failure.
    assert_eq!(client.breaker(ADAPTER).snapshot().window_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn cancellation_mid_backoff_returns_at_once() {
    let retry = policy(3, Duration::from_secs(10), Duration::from_secs(10));
    assert!(
        first_jitter(retry) > Duration::from_secs(1),
        "the backoff must still be pending"
    );
    let (client, server) = scripted(
        settings(retry, Duration::from_secs(10), Duration::from_secs(30)),
        ResilienceConfig::default(),
        |_| Reply::Status(503),
    );
    let token = CancellationToken::new();
    let canceller = cancel_after(&server, 1, token.clone());
    let err = client
        .get(ADAPTER, server.url())
        .cancel(token)
        .send()
        .await
        .unwrap_err();
    let returned = Instant::now();
    let cancelled_at = canceller.await.unwrap();
    assert!(
        matches!(err, FetchError::Cancelled { attempts: 1, .. }),
        "{err:?}"
    );
    assert_eq!(returned, cancelled_at);
    assert_eq!(server.hits(), 1);
}

#[tokio::test(start_paused = true)]
async fn total_deadline_is_respected_against_a_hanging_server() {
    // Attempts of 100 ms, waits of at most 5 ms, a 250 ms deadline: two full
    // attempts, then a third cut by the deadline.
    let (client, server) = scripted(
        settings(quick_retries(10), ms(100), ms(250)),
        ResilienceConfig::default(),
        |_| Reply::Hang,
    );
    let started = Instant::now();
    let err = client.get(ADAPTER, server.url()).send().await.unwrap_err();
    let elapsed = started.elapsed();
    match err {
        FetchError::Timeout {
            attempts: 3,
            scope: TimeoutScope::Deadline,
            limit,
            reason: StopReason::Deadline,
            ..
        } => assert!(limit < ms(100) && limit >= ms(40), "{limit:?}"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(elapsed >= ms(250) && elapsed <= ms(252), "{elapsed:?}");
    assert_eq!(server.hits(), 3);
}

#[tokio::test(start_paused = true)]
async fn total_deadline_trims_the_last_backoff_instead_of_overshooting() {
    let retry = RetryPolicy {
        min_last_attempt: ms(100),
        ..policy(5, Duration::from_secs(10), Duration::from_secs(10))
    };
    assert!(first_jitter(retry) > Duration::from_secs(1));
    let (client, server) = scripted(
        settings(retry, ms(1000), ms(400)),
        ResilienceConfig::default(),
        |_| Reply::Status(503),
    );
    let started = Instant::now();
    let err = client.get(ADAPTER, server.url()).send().await.unwrap_err();
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
    // The seconds-long wait was cut to end 100 ms before the deadline.
    let second = server.arrivals()[1] - started;
    assert!(second >= ms(300) && second <= ms(301), "{second:?}");
    assert_eq!(started.elapsed(), second);
}

#[tokio::test(start_paused = true)]
async fn a_call_inside_a_deadline_scope_ends_by_that_deadline() {
    // The adapter allows 10 s per attempt and 30 s in all; the caller (a request the api
    // serves) has 200 ms left. The call ends at the caller's deadline without being told.
    let (client, server) = scripted(
        settings(
            quick_retries(1),
            Duration::from_secs(10),
            Duration::from_secs(30),
        ),
        ResilienceConfig::default(),
        |_| Reply::Hang,
    );
    let started = Instant::now();
    let err = deadline::scope(started + ms(200), async {
        assert_eq!(deadline::remaining(), Some(ms(200)));
        // An explicit longer deadline on the call cannot extend the caller's either.
        client
            .get(ADAPTER, server.url())
            .deadline(Duration::from_secs(20))
            .send()
            .await
            .unwrap_err()
    })
    .await;
    assert!(
        matches!(
            err,
            FetchError::Timeout {
                scope: TimeoutScope::Deadline,
                ..
            }
        ),
        "{err:?}"
    );
    let elapsed = started.elapsed();
    assert!(elapsed >= ms(200) && elapsed <= ms(201), "{elapsed:?}");
    assert_eq!(
        deadline::remaining(),
        None,
        "the scope ended with its future"
    );
    // A nested scope only shortens.
    deadline::scope(Instant::now() + ms(50), async {
        deadline::scope(Instant::now() + ms(500), async {
            assert_eq!(deadline::remaining(), Some(ms(50)));
        })
        .await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn per_call_options_override_the_policy() {
    let (client, server) = scripted(
        settings(
            quick_retries(1),
            Duration::from_secs(10),
            Duration::from_secs(30),
        ),
        ResilienceConfig::default(),
        |_| Reply::Hang,
    );
    let started = Instant::now();
    let err = client
        .get(ADAPTER, server.url())
        .attempt_timeout(ms(50))
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Timeout {
                attempts: 1,
                scope: TimeoutScope::Attempt,
                reason: StopReason::MaxAttempts,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() >= ms(50) && started.elapsed() <= ms(51));
    let started = Instant::now();
    let err = client
        .get(ADAPTER, server.url())
        .deadline(ms(70))
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Timeout {
                scope: TimeoutScope::Deadline,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() >= ms(70) && started.elapsed() <= ms(71));
}

#[tokio::test(start_paused = true)]
async fn breaker_opens_after_repeated_failures_and_fails_fast() {
    let breaker = BreakerPolicy::new(BreakerConfig {
        consecutive_failures: 3,
        minimum_calls: 100,
        window_size: 100,
        open_duration: Duration::from_secs(60),
        ..BreakerConfig::default()
    })
    .unwrap();
    let (client, server) = scripted(
        Policy {
            breaker,
            ..settings(RetryPolicy::never(), ms(1000), ms(2000))
        },
        ResilienceConfig::default(),
        |_| Reply::Status(503),
    );
    for _ in 0..3 {
        let err = client.get(ADAPTER, server.url()).send().await.unwrap_err();
        assert!(matches!(
            err,
            FetchError::RetriesExhausted {
                reason: StopReason::MaxAttempts,
                ..
            }
        ));
    }
    assert_eq!(client.breaker(ADAPTER).state(), BreakerState::Open);
    tokio::time::advance(Duration::from_secs(5)).await;
    let started = Instant::now();
    let err = client.get(ADAPTER, server.url()).send().await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::ZERO);
    match err {
        FetchError::CircuitOpen {
            adapter,
            retry_after,
        } => {
            assert_eq!(adapter, ADAPTER);
            assert_eq!(retry_after, Duration::from_secs(55));
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

#[tokio::test(start_paused = true)]
async fn middleware_errors_do_not_count_against_the_breaker() {
    let failing = as_middleware(|_, _, _| {
        Box::pin(async {
            Err(reqwest_middleware::Error::middleware(
                std::io::Error::other("our own bug"),
            ))
        })
    });
    let client = builder(settings(quick_retries(3), ms(1000), ms(2000)))
        .middleware(Arc::new(failing))
        .build()
        .unwrap();
    for _ in 0..10 {
        let err = client
            .get(ADAPTER, "http://scripted.invalid/")
            .send()
            .await
            .unwrap_err();
        assert!(
            matches!(err, FetchError::Transport { attempts: 1, .. }),
            "{err:?}"
        );
    }
    let snapshot = client.breaker(ADAPTER).snapshot();
    assert_eq!(
        (
            snapshot.state,
            snapshot.window_calls,
            snapshot.window_failures
        ),
        (BreakerState::Closed, 0, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_body_that_is_not_the_expected_json_does_not_count_against_the_breaker() {
    let (client, server) = scripted(
        settings(quick_retries(3), ms(1000), ms(2000)),
        ResilienceConfig::default(),
        |_| Reply::SlowOk(ms(1)),
    );
    let err = client
        .get(ADAPTER, server.url())
        .fetch_json::<Vec<u32>>()
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Decode { .. }), "{err:?}");
    assert_eq!(server.hits(), 1);
    assert_eq!(client.breaker(ADAPTER).snapshot().window_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn bulkhead_refuses_a_call_over_the_limit() {
    let (client, server) = scripted(
        settings(quick_retries(1), ms(300), ms(1000)),
        ResilienceConfig {
            bulkhead: BulkheadConfig {
                max_concurrent: 1,
                max_wait: Duration::ZERO,
            },
            ..ResilienceConfig::default()
        },
        |n| {
            if n == 1 {
                Reply::Hang
            } else {
                Reply::Status(200)
            }
        },
    );
    let first = tokio::spawn({
        let request = client.get(ADAPTER, server.url());
        async move { request.send().await.map(|_| ()) }
    });
    server.wait_for_hits(1).await;
    let err = client.get(ADAPTER, server.url()).send().await.unwrap_err();
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
    // The slot is free again, and a returned response holds it until its
    // body is read.
    let response = client.get(ADAPTER, server.url()).send().await.unwrap();
    assert_eq!(client.resilience().bulkhead(ADAPTER).available(), 0);
    let _ = response.bytes().await.unwrap();
    assert_eq!(client.resilience().bulkhead(ADAPTER).available(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_error_response_holds_the_bulkhead_slot_until_its_body_is_read() {
    let (client, server) = scripted(
        settings(quick_retries(1), ms(300), ms(1000)),
        ResilienceConfig {
            bulkhead: BulkheadConfig {
                max_concurrent: 1,
                max_wait: Duration::ZERO,
            },
            ..ResilienceConfig::default()
        },
        |_| Reply::StatusWith(404, "x-reason", "gone".to_owned()),
    );
    let bulkhead = Arc::clone(client.resilience().bulkhead(ADAPTER));
    let err = client.get(ADAPTER, server.url()).send().await.unwrap_err();
    let FetchError::NonRetryableStatus { response, .. } = err else {
        panic!("unexpected {err:?}");
    };
    // Its body is still to be read: the slot is held, a second call refused.
    assert_eq!(bulkhead.available(), 0);
    let refused = client.get(ADAPTER, server.url()).send().await.unwrap_err();
    assert!(
        matches!(refused, FetchError::BulkheadFull { .. }),
        "{refused:?}"
    );
    assert_eq!(server.hits(), 1);
    assert_eq!(response.bytes().await.unwrap(), b"");
    assert_eq!(bulkhead.available(), 1);
    // An error dropped unread frees it too.
    let err = client.get(ADAPTER, server.url()).send().await.unwrap_err();
    assert_eq!(
        (err.status(), bulkhead.available()),
        (Some(StatusCode::NOT_FOUND), 0)
    );
    drop(err);
    assert_eq!(bulkhead.available(), 1);
}

#[tokio::test(start_paused = true)]
async fn bulkhead_wait_ends_at_the_call_deadline() {
    // The bulkhead would wait 10 s for a slot; the first call holds it.
    let (client, server) = scripted(
        settings(quick_retries(1), ms(1000), ms(2000)),
        ResilienceConfig {
            bulkhead: BulkheadConfig {
                max_concurrent: 1,
                max_wait: Duration::from_secs(10),
            },
            ..ResilienceConfig::default()
        },
        |_| Reply::Hang,
    );
    let first = tokio::spawn({
        let request = client.get(ADAPTER, server.url());
        async move { request.send().await.map(|_| ()) }
    });
    server.wait_for_hits(1).await;
    let started = Instant::now();
    let err = client
        .get(ADAPTER, server.url())
        .deadline(ms(100))
        .send()
        .await
        .unwrap_err();
    match err {
        FetchError::BulkheadFull { adapter, source } => {
            assert_eq!(adapter, ADAPTER);
            assert_eq!(source.waited, ms(100));
        }
        other => panic!("waited past the deadline: {other:?}"),
    }
    assert_eq!(started.elapsed(), ms(100));
    assert_eq!(server.hits(), 1);
    first.abort();
}

#[tokio::test(start_paused = true)]
async fn breaker_opened_during_the_backoff_stops_the_retry() {
    let breaker = BreakerPolicy::new(BreakerConfig {
        consecutive_failures: 2,
        minimum_calls: 100,
        window_size: 100,
        open_duration: Duration::from_secs(60),
        ..BreakerConfig::default()
    })
    .unwrap();
    let (client, server) = scripted(
        Policy {
            breaker,
            ..settings(quick_retries(3), ms(1000), ms(2000))
        },
        ResilienceConfig::default(),
        |_| Reply::StatusWith(503, "retry-after", "1".to_owned()),
    );
    let call = tokio::spawn({
        let request = client.get(ADAPTER, server.url());
        async move { request.send().await.map(|_| ()) }
    });
    server.wait_for_hits(1).await;
    tokio::time::sleep(ms(100)).await;
    // Other callers open the breaker while this call waits out its 1 s.
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

#[tokio::test(start_paused = true)]
async fn a_probe_that_waited_out_a_retry_after_is_not_slow() {
    // Slow calls above 500 ms open the breaker; one 503 with Retry-After: 2
    // then a quick 200 is one fast call, not a 2 s one.
    let breaker = BreakerPolicy::new(BreakerConfig {
        slow_calls: Some(smartbeak_resilience::SlowCallConfig {
            threshold: ms(500),
            rate_percent: 100,
        }),
        minimum_calls: 1,
        half_open_probes: 1,
        half_open_successes: 1,
        ..BreakerConfig::default()
    })
    .unwrap();
    let (client, server) = scripted(
        Policy {
            breaker,
            ..settings(quick_retries(3), ms(1000), Duration::from_secs(10))
        },
        ResilienceConfig::default(),
        |n| {
            if n % 2 == 1 {
                Reply::StatusWith(503, "retry-after", "2".to_owned())
            } else {
                Reply::SlowOk(ms(10))
            }
        },
    );
    let body = client
        .get(ADAPTER, server.url())
        .fetch_bytes()
        .await
        .unwrap();
    assert_eq!(body, b"slow");
    let snapshot = client.breaker(ADAPTER).snapshot();
    assert_eq!(
        (snapshot.state, snapshot.window_calls, snapshot.window_slow),
        (BreakerState::Closed, 1, 0)
    );
    // The same as a half-open probe: it closes the breaker rather than
    // re-opening it as a slow call.
    let breaker = client.breaker(ADAPTER);
    while breaker.state() != BreakerState::Open {
        breaker.try_acquire().unwrap().record(Verdict::Failure);
    }
    tokio::time::advance(BreakerConfig::default().open_duration).await;
    let body = client
        .get(ADAPTER, server.url())
        .fetch_bytes()
        .await
        .unwrap();
    assert_eq!(body, b"slow");
    assert_eq!(server.hits(), 4);
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_small_adapter_does_not_retry_on_a_busy_adapters_budget() {
    let (client, server) = scripted(
        settings(quick_retries(4), ms(1000), ms(2000)),
        ResilienceConfig {
            retry_budget: RetryBudgetConfig {
                ttl: Duration::from_secs(10),
                min_retries_per_sec: 0,
                retry_percent: 20,
            },
            ..ResilienceConfig::default()
        },
        |_| Reply::Status(503),
    );
    // Traffic of another adapter fills its own budget only.
    let busy: &Arc<RetryBudget> = client.resilience().retry_budget(AdapterName::Openai);
    for _ in 0..1000 {
        busy.deposit();
    }
    let err = client.get(ADAPTER, server.url()).send().await.unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::RetriesExhausted {
                attempts: 1,
                reason: StopReason::RetryBudget,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(server.hits(), 1);
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
    let _ = client.get(ADAPTER, server.url()).send().await.unwrap_err();
    let _ = client
        .get(AdapterName::Vimeo, "not a url")
        .send()
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
