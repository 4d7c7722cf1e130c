//! Outbound HTTP for the adapters: one [`HttpClient`] per process (connection
//! pool, keep-alive, rustls, gzip) whose every request goes through the one
//! resilience loop of the workspace, [`Resilience::call_holding`]
//! (smartbeak-resilience): a bulkhead and a circuit breaker per
//! [`AdapterName`], retries of transient outcomes only on the adapter's retry
//! budget, a fresh timeout per attempt, a total deadline
//! ([`RetryPolicy::max_elapsed`]) over everything including the body read,
//! never past the caller's deadline when it runs inside a [`deadline::scope`]
//! (the api opens one per request, so outbound calls get the request's
//! deadline without each handler passing it), and prompt cancellation through
//! a `CancellationToken`.
//!
//! # One way to build the shared stack
//!
//! Build one [`Resilience`] at start-up and hand clones of it to every
//! client and component (a clone shares the breaker registry, the bulkheads
//! and the per-adapter retry budgets). [`HttpClient::builder`] requires it:
//! there is no hidden process-global set a client could silently fall back
//! on, so two clients never end up with two per-adapter limits in one
//! process.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use smartbeak_resilience::{AdapterName, Policy, Resilience, ResilienceConfig, RetryPolicy};
//! use smartbeak_utils::fetch::{FetchError, HttpClient};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let resilience = Resilience::new(ResilienceConfig::default()); // once per process
//! let client = HttpClient::builder(resilience.clone())
//!     .adapter(
//!         AdapterName::Openai,
//!         Policy {
//!             attempt_timeout: Some(Duration::from_secs(20)),
//!             retry: RetryPolicy {
//!                 max_attempts: 4,
//!                 max_elapsed: Duration::from_secs(60), // the total deadline
//!                 ..RetryPolicy::default()
//!             },
//!             ..Policy::default()
//!         },
//!     )
//!     .build()?;
//!
//! let cancel = CancellationToken::new();
//! // `send` goes through the stack; the body is read within the deadline.
//! match client
//!     .get(AdapterName::Openai, "https://api.openai.com/v1/models")
//!     .bearer_auth("sk-...")
//!     .cancel(cancel)
//!     .send()
//!     .await
//! {
//!     Ok(response) => println!("{} {} bytes", response.status(), response.bytes().await?.len()),
//!     Err(FetchError::CircuitOpen { retry_after, .. }) => println!("try in {retry_after:?}"),
//!     Err(error) => return Err(error.into()),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # One call, step by step
//!
//! [`RequestBuilder::send`] (or [`fetch_bytes`](RequestBuilder::fetch_bytes)
//! / [`fetch_json`](RequestBuilder::fetch_json), which read the body inside
//! the attempt) runs [`Resilience::call_holding`]:
//!
//! 1. Bulkhead slot for the adapter, waiting at most the bulkhead's
//!    `max_wait` and never past the deadline → [`FetchError::BulkheadFull`].
//! 2. Circuit breaker admission → [`FetchError::CircuitOpen`] (nothing sent).
//! 3. One deposit into the adapter's retry budget.
//! 4. Attempt: the request (a fresh clone each time) under
//!    `min(attempt_timeout, time left before the deadline)`. A success (1xx
//!    to 3xx) is returned; a 4xx other than 408/425/429 or a non-transient
//!    5xx (501, 505, ...) is [`FetchError::NonRetryableStatus`] at once.
//! 5. A transient outcome (connect error, timeout, connection reset, 408,
//!    425, 429, 500, 502, 503, 504) is retried if every gate agrees, in this
//!    order: the request may be repeated (below); the retry policy has
//!    attempts left, the server's `Retry-After` is within `max_retry_after`
//!    (a longer one stops the call with
//!    [`StopReason::RetryAfterTooLong`], and [`FetchError::retry_after`]
//!    hands the server's value on) and the wait fits before the deadline (a
//!    jittered wait is trimmed to leave `min_last_attempt`); the breaker
//!    permit is still current (before and after the wait); the adapter's
//!    retry budget has a token. Otherwise [`FetchError::RetriesExhausted`]
//!    or [`FetchError::Timeout`], both with their [`StopReason`].
//! 6. The breaker records one verdict per call (the last attempt's, timed
//!    from that attempt's start).
//!
//! **Which requests are repeated.** A connect error is retried for every
//! method, POST included: the request provably never left (Polly's HTTP
//! strategy and Envoy's `connect-failure` do the same). Any other transient
//! outcome is retried only for idempotent methods (RFC 9110) or with an
//! `Idempotency-Key` header ([`StopReason::NotIdempotent`]), and only if the
//! body can be cloned ([`StopReason::BodyNotClonable`]).
//!
//! **What counts against the breaker.** Only outcomes of the remote call:
//! statuses, connect and transport errors, timeouts. Our own failures --
//! a middleware's error, a request reqwest could not build, a redirect loop
//! -- are `Verdict::Ignored`; a body that is not the JSON we expected is
//! decoded after the call and never counts as a failure.
//!
//! **The body.** [`Response`] is ours: its body reads end at the call's
//! deadline with [`FetchError::Timeout`] (scope `Deadline`), abort with
//! [`FetchError::Cancelled`] when the token fires, and keep the adapter's
//! bulkhead slot until the body is consumed or the response dropped. The
//! breaker's verdict is taken when the head arrives; to have body failures
//! count and be retried too, use [`RequestBuilder::fetch_bytes`] or
//! [`RequestBuilder::fetch_json`], which read the body inside the attempt.
//!
//! # What comes from where
//!
//! - **reqwest** sends; **reqwest-middleware**'s `ClientWithMiddleware` is the
//!   client, so callers may add middleware (tracing, auth) with
//!   [`HttpClientBuilder::middleware`].
//! - **reqwest-retry** provides the classification of transport errors
//!   ([`reqwest_retry::default_on_request_failure`]: connect errors,
//!   timeouts, connections reset or closed mid-response are transient). Its
//!   `RetryTransientMiddleware` is *not* used: it has no Retry-After
//!   support, retries POST like GET, has no overall deadline and returns the
//!   last 503 as `Ok`. Its status classification (every 5xx transient) is
//!   replaced by the fixed list in [`is_transient_status`].
//! - **smartbeak-resilience** owns the loop and its semantics
//!   ([`Resilience`], [`Policy`], [`RetryPolicy`], [`StopReason`]).
//! - **this module** owns the HTTP classification, the idempotency and
//!   body-clonability gates, cancellation, the body bounds, the error enum
//!   and the metrics.
//!
//! # Metrics (label `adapter`, plus `outcome` on the request counter)
//!
//! - `http_client_requests_total{adapter, outcome}`: one per call; outcome is
//!   one of [`FetchError::outcome`]'s values or `success`.
//! - `http_client_attempts_total{adapter}`, `http_client_retries_total{adapter}`.
//! - `http_client_attempt_duration_seconds{adapter}` (each attempt, also one
//!   cut by its timeout) and `http_client_request_duration_seconds{adapter}`
//!   (whole call) histograms.
//!
//! # TLS
//!
//! reqwest's `rustls` feature (aws-lc-rs provider) builds here with `cc`
//! alone (aws-lc-sys needs neither cmake nor clang on x86-64 Linux), so no
//! provider switch was needed.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use reqwest::{IntoUrl, Request};
use reqwest_middleware::{ClientWithMiddleware, Middleware};
use reqwest_retry::Retryable;
use serde::Serialize;
use serde::de::DeserializeOwned;
use smartbeak_resilience::{
    AdapterName, BulkheadFull, BulkheadPermit, CallScope, CircuitBreaker, Resilience,
    ResilienceError, Verdict, retry_after_from_headers,
};
pub use smartbeak_resilience::{Policy, RetryPolicy, StopReason, TimeoutScope};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The deadline of the work an outbound call belongs to: a call's total deadline is the
/// smaller of its own (`policy.retry.max_elapsed`, or [`RequestBuilder::deadline`]) and what
/// is left of the scope's (one task-local with `smartbeak_database::deadline`, see
/// [`smartbeak_resilience::deadline`]).
pub use smartbeak_resilience::deadline;

/// Header that lets a non-idempotent request (POST, PATCH) be retried.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Counter of calls, labels `adapter` and `outcome`.
pub const REQUESTS_COUNTER: &str = "http_client_requests_total";
/// Counter of attempts sent, label `adapter`.
pub const ATTEMPTS_COUNTER: &str = "http_client_attempts_total";
/// Counter of retries (attempts after the first), label `adapter`.
pub const RETRIES_COUNTER: &str = "http_client_retries_total";
/// Histogram of each attempt's duration in seconds, label `adapter`.
pub const ATTEMPT_DURATION_HISTOGRAM: &str = "http_client_attempt_duration_seconds";
/// Histogram of each call's duration in seconds (all attempts and waits), label `adapter`.
pub const REQUEST_DURATION_HISTOGRAM: &str = "http_client_request_duration_seconds";

/// The policy of every adapter without one of its own: 10 s per attempt and
/// smartbeak-resilience's defaults (3 attempts, full jitter from 100 ms up
/// to 5 s, a 30 s deadline keeping 100 ms for a last attempt, Retry-After up
/// to 30 s, the default breaker).
#[must_use]
pub fn default_policy() -> Policy {
    Policy {
        attempt_timeout: Some(Duration::from_secs(10)),
        ..Policy::default()
    }
}

/// Per-call options (also settable on [`RequestBuilder`]).
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// Cancels the call (in-flight attempt, backoff, body read) when fired.
    pub cancel: Option<CancellationToken>,
    /// Overrides the adapter's deadline (`policy.retry.max_elapsed`).
    pub deadline: Option<Duration>,
    /// Overrides the adapter's `policy.attempt_timeout`.
    pub attempt_timeout: Option<Duration>,
}

impl CallOptions {
    /// Sets the cancellation token.
    #[must_use]
    pub fn cancel(mut self, token: CancellationToken) -> Self {
        self.cancel = Some(token);
        self
    }

    /// Overrides the total deadline.
    #[must_use]
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Overrides the per-attempt timeout.
    #[must_use]
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }
}

/// Why a request returned no successful response (or its body could not be
/// read). Every variant keeps the adapter and, once anything was sent, the
/// number of attempts. reqwest errors in it have their URL stripped (a query
/// may carry an api key), so an error can be logged whole.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The request could not be built (bad URL, header, body serialisation).
    #[error("invalid request for {adapter}: {source}")]
    InvalidRequest {
        /// Target adapter.
        adapter: AdapterName,
        /// reqwest's builder error.
        #[source]
        source: reqwest::Error,
    },
    /// The adapter's bulkhead had no free slot within its `max_wait` or
    /// before the call's deadline, whichever came first; nothing was sent.
    #[error("request to {adapter} refused: {source}")]
    BulkheadFull {
        /// Target adapter.
        adapter: AdapterName,
        /// The bulkhead's rejection.
        #[source]
        source: BulkheadFull,
    },
    /// The adapter's circuit breaker is open; nothing was sent.
    #[error("circuit breaker for {adapter} is open, retry in {retry_after:?}")]
    CircuitOpen {
        /// Target adapter.
        adapter: AdapterName,
        /// When the breaker will admit a probe.
        retry_after: Duration,
    },
    /// The last attempt, or the body read, ran out of time.
    #[error(
        "request to {adapter} timed out ({scope}, limit {limit:?}) after {attempts} attempt(s): {reason}"
    )]
    Timeout {
        /// Target adapter.
        adapter: AdapterName,
        /// Attempts sent.
        attempts: u32,
        /// Which limit cut the last attempt (`Deadline` for a body read).
        scope: TimeoutScope,
        /// The limit: the last attempt's, or the call's deadline.
        limit: Duration,
        /// Why no further attempt was made.
        reason: StopReason,
    },
    /// The caller's cancellation token fired.
    #[error("request to {adapter} cancelled after {attempts} attempt(s)")]
    Cancelled {
        /// Target adapter.
        adapter: AdapterName,
        /// Attempts started (the last one possibly aborted).
        attempts: u32,
    },
    /// The last attempt failed transiently and was not retried.
    #[error(
        "request to {adapter} gave up after {attempts} attempt(s), last status {status}: {reason}",
        status = display_status(*last_status)
    )]
    RetriesExhausted {
        /// Target adapter.
        adapter: AdapterName,
        /// Attempts sent.
        attempts: u32,
        /// Status of the last response; `None` if the last attempt got no
        /// response (connect error, connection reset).
        last_status: Option<StatusCode>,
        /// Why no further attempt was made.
        reason: StopReason,
        /// The last response's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
        /// The transport error of the last attempt, if it had one.
        #[source]
        source: Option<reqwest_middleware::Error>,
    },
    /// The server answered with a status that is not retried (most 4xx, 501,
    /// 505, ...). The response is kept so its body can be read (within the
    /// call's deadline and cancellation token, holding the adapter's
    /// bulkhead slot until it is read or the error dropped).
    #[error("request to {adapter} failed with status {status} after {attempts} attempt(s)")]
    NonRetryableStatus {
        /// Target adapter.
        adapter: AdapterName,
        /// Attempts sent.
        attempts: u32,
        /// The response status.
        status: StatusCode,
        /// The response itself.
        response: Box<Response>,
    },
    /// A transport error that retrying would not fix (TLS, redirect loop,
    /// a middleware's error).
    #[error("request to {adapter} failed after {attempts} attempt(s): {source}")]
    Transport {
        /// Target adapter.
        adapter: AdapterName,
        /// Attempts sent.
        attempts: u32,
        /// The error.
        #[source]
        source: reqwest_middleware::Error,
    },
    /// Reading a returned response's body failed.
    #[error("reading the body from {adapter} failed: {source}")]
    Body {
        /// Target adapter.
        adapter: AdapterName,
        /// reqwest's body error.
        #[source]
        source: reqwest::Error,
    },
    /// The body was not the JSON the caller asked for.
    #[error("the body from {adapter} is not the expected json: {source}")]
    Decode {
        /// Target adapter.
        adapter: AdapterName,
        /// serde_json's error.
        #[source]
        source: serde_json::Error,
    },
}

fn display_status(status: Option<StatusCode>) -> String {
    status.map_or_else(|| "none".to_owned(), |s| s.as_u16().to_string())
}

impl FetchError {
    /// The adapter the request was for.
    #[must_use]
    pub fn adapter(&self) -> AdapterName {
        match self {
            Self::InvalidRequest { adapter, .. }
            | Self::BulkheadFull { adapter, .. }
            | Self::CircuitOpen { adapter, .. }
            | Self::Timeout { adapter, .. }
            | Self::Cancelled { adapter, .. }
            | Self::RetriesExhausted { adapter, .. }
            | Self::NonRetryableStatus { adapter, .. }
            | Self::Transport { adapter, .. }
            | Self::Body { adapter, .. }
            | Self::Decode { adapter, .. } => *adapter,
        }
    }

    /// Attempts sent (0 when the call was refused before sending, and for
    /// body and decode errors, which come after the call).
    #[must_use]
    pub fn attempts(&self) -> u32 {
        match self {
            Self::InvalidRequest { .. }
            | Self::BulkheadFull { .. }
            | Self::CircuitOpen { .. }
            | Self::Body { .. }
            | Self::Decode { .. } => 0,
            Self::Timeout { attempts, .. }
            | Self::Cancelled { attempts, .. }
            | Self::RetriesExhausted { attempts, .. }
            | Self::NonRetryableStatus { attempts, .. }
            | Self::Transport { attempts, .. } => *attempts,
        }
    }

    /// The last response status, if a response was received.
    #[must_use]
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::RetriesExhausted { last_status, .. } => *last_status,
            Self::NonRetryableStatus { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// When to try again, to pass on to our own callers: the open breaker's
    /// time to its next probe, or the server's `Retry-After`.
    #[must_use]
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::CircuitOpen { retry_after, .. } => Some(*retry_after),
            Self::RetriesExhausted { retry_after, .. } => *retry_after,
            Self::NonRetryableStatus { response, .. } => {
                retry_after_from_headers(response.headers())
            }
            _ => None,
        }
    }

    /// The `outcome` label value of the request counter.
    #[must_use]
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. } => "invalid_request",
            Self::BulkheadFull { .. } => "bulkhead_full",
            Self::CircuitOpen { .. } => "circuit_open",
            Self::Timeout { .. } => "timeout",
            Self::Cancelled { .. } => "cancelled",
            Self::RetriesExhausted { .. } => "retries_exhausted",
            Self::NonRetryableStatus { .. } => "non_retryable_status",
            Self::Transport { .. } => "transport",
            Self::Body { .. } => "body",
            Self::Decode { .. } => "decode",
        }
    }
}

/// The HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("could not build the http client: {0}")]
pub struct BuildError(#[source] reqwest::Error);

/// Statuses retried: 408, 425, 429, 500, 502, 503, 504.
#[must_use]
pub fn is_transient_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 425 | 429 | 500 | 502 | 503 | 504)
}

/// Idempotent methods (RFC 9110, 9.2.2): retried without an idempotency key.
#[must_use]
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Builds an [`HttpClient`].
pub struct HttpClientBuilder {
    defaults: Policy,
    overrides: Vec<(AdapterName, Policy)>,
    resilience: Resilience,
    user_agent: String,
    connect_timeout: Duration,
    pool_idle_timeout: Duration,
    tcp_keepalive: Duration,
    middleware: Vec<Arc<dyn Middleware>>,
}

impl fmt::Debug for HttpClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClientBuilder")
            .field("defaults", &self.defaults)
            .field("overrides", &self.overrides)
            .field("middleware", &self.middleware.len())
            .finish_non_exhaustive()
    }
}

impl HttpClientBuilder {
    /// A builder with default settings on the process-wide set `resilience`.
    #[must_use]
    pub fn new(resilience: Resilience) -> Self {
        Self {
            defaults: default_policy(),
            overrides: Vec::new(),
            resilience,
            user_agent: concat!("smartbeak/", env!("CARGO_PKG_VERSION")).to_owned(),
            connect_timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(90),
            tcp_keepalive: Duration::from_secs(60),
            middleware: Vec::new(),
        }
    }
}

impl HttpClientBuilder {
    /// The policy of every adapter without its own ([`default_policy`] by
    /// default).
    #[must_use]
    pub fn defaults(mut self, policy: Policy) -> Self {
        self.defaults = policy;
        self
    }

    /// The policy of one adapter (the last call for an adapter wins).
    #[must_use]
    pub fn adapter(mut self, adapter: AdapterName, policy: Policy) -> Self {
        self.overrides.push((adapter, policy));
        self
    }

    /// The `User-Agent` header.
    #[must_use]
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = user_agent.into();
        self
    }

    /// TCP connect timeout (also bounded by each attempt's timeout). Default 5 s.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long an idle pooled connection is kept. Default 90 s.
    #[must_use]
    pub fn pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.pool_idle_timeout = timeout;
        self
    }

    /// Adds a reqwest-middleware middleware; it runs inside each attempt (so
    /// under the attempt's timeout), in the order added. Its errors never
    /// count against an adapter's breaker.
    #[must_use]
    pub fn middleware(mut self, middleware: Arc<dyn Middleware>) -> Self {
        self.middleware.push(middleware);
        self
    }

    /// Builds the client.
    ///
    /// # Errors
    ///
    /// [`BuildError`] if reqwest cannot build its client (TLS setup).
    pub fn build(self) -> Result<HttpClient, BuildError> {
        let raw = reqwest::Client::builder()
            .user_agent(self.user_agent)
            .gzip(true)
            .connect_timeout(self.connect_timeout)
            .pool_idle_timeout(self.pool_idle_timeout)
            .tcp_keepalive(self.tcp_keepalive)
            .build()
            .map_err(BuildError)?;
        let client = self
            .middleware
            .into_iter()
            .fold(
                reqwest_middleware::ClientBuilder::new(raw.clone()),
                |b, m| b.with_arc(m),
            )
            .build();
        let policies = AdapterName::ALL
            .iter()
            .map(|adapter| {
                self.overrides
                    .iter()
                    .rev()
                    .find(|(name, _)| name == adapter)
                    .map_or_else(|| self.defaults.clone(), |(_, p)| p.clone())
            })
            .collect();
        Ok(HttpClient {
            inner: Arc::new(ClientInner {
                raw,
                client,
                policies,
                resilience: self.resilience,
            }),
        })
    }
}

/// The process-wide HTTP client for outside providers; see the [module docs](self).
///
/// Build it once and clone it (cheap, shares the pool and the [`Resilience`]).
#[derive(Clone)]
pub struct HttpClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    /// Only builds requests; they are sent through `client`, in the stack.
    raw: reqwest::Client,
    client: ClientWithMiddleware,
    /// Indexed by `AdapterName::index`.
    policies: Vec<Policy>,
    resilience: Resilience,
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("breakers", &self.inner.resilience.registry().len())
            .finish_non_exhaustive()
    }
}

impl HttpClient {
    /// A builder with default settings, running on `resilience`: the
    /// process-wide [`Resilience`] (breakers, bulkheads, retry budgets,
    /// jitter). Hand every client and component a clone of the same one.
    #[must_use]
    pub fn builder(resilience: Resilience) -> HttpClientBuilder {
        HttpClientBuilder::new(resilience)
    }

    /// A request to `adapter`; its [`send`](RequestBuilder::send) goes
    /// through the whole stack.
    pub fn request(
        &self,
        adapter: AdapterName,
        method: Method,
        url: impl IntoUrl,
    ) -> RequestBuilder {
        RequestBuilder {
            client: self.clone(),
            adapter,
            inner: self.inner.raw.request(method, url),
            options: CallOptions::default(),
        }
    }

    /// A GET request to `adapter`.
    pub fn get(&self, adapter: AdapterName, url: impl IntoUrl) -> RequestBuilder {
        self.request(adapter, Method::GET, url)
    }

    /// A POST request to `adapter` (a connect error is retried; any other
    /// transient outcome only with an `Idempotency-Key` header).
    pub fn post(&self, adapter: AdapterName, url: impl IntoUrl) -> RequestBuilder {
        self.request(adapter, Method::POST, url)
    }

    /// The policy in force for `adapter`.
    #[must_use]
    pub fn policy(&self, adapter: AdapterName) -> &Policy {
        &self.inner.policies[adapter.index()]
    }

    /// The circuit breaker of `adapter` under its policy (created on first use).
    #[must_use]
    pub fn breaker(&self, adapter: AdapterName) -> Arc<CircuitBreaker> {
        self.inner
            .resilience
            .breaker(adapter, &self.policy(adapter).breaker)
    }

    /// The resilience set the client runs on.
    #[must_use]
    pub fn resilience(&self) -> &Resilience {
        &self.inner.resilience
    }

    /// Runs one call through [`Resilience::call_holding`]; `read` turns each
    /// successful response into the value (inside the attempt).
    async fn run<X, R, RF>(
        &self,
        adapter: AdapterName,
        request: reqwest::RequestBuilder,
        options: &CallOptions,
        read: R,
    ) -> Result<Called<X>, FetchError>
    where
        R: Fn(reqwest::Response) -> RF,
        RF: Future<Output = Result<X, reqwest::Error>>,
    {
        let started = Instant::now();
        let request = match request.build() {
            Ok(request) => request,
            Err(source) => {
                let error = FetchError::InvalidRequest {
                    adapter,
                    source: source.without_url(),
                };
                record_call(adapter, error.outcome(), Duration::ZERO);
                return Err(error);
            }
        };
        let mut policy = self.policy(adapter).clone();
        if let Some(deadline) = options.deadline {
            policy.retry.max_elapsed = deadline;
        }
        if let Some(timeout) = options.attempt_timeout {
            policy.attempt_timeout = Some(timeout);
        }
        // Inside a caller's deadline (a request the api serves): never past it.
        if let Some(left) = deadline::remaining() {
            policy.retry.max_elapsed = policy.retry.max_elapsed.min(left);
        }
        let gate = Gate {
            idempotent: is_idempotent(request.method())
                || request.headers().contains_key(IDEMPOTENCY_KEY),
            clonable: request.try_clone().is_some(),
        };
        let attempts = AtomicU32::new(0);
        let call = self.call(adapter, &policy, gate, request, &attempts, &read);
        let result = match &options.cancel {
            Some(cancel) => tokio::select! {
                biased;
                () = cancel.cancelled() => Err(FetchError::Cancelled {
                    adapter,
                    attempts: attempts.load(Ordering::Relaxed),
                }),
                result = call => result,
            },
            None => call.await,
        };
        let outcome = match &result {
            Ok((Answer::Value(_), _)) => "success",
            Ok((Answer::Refused(_), _)) => "non_retryable_status",
            Err(error) => error.outcome(),
        };
        record_call(adapter, outcome, started.elapsed());
        match &result {
            Ok((Answer::Value(_), _)) => {}
            Ok((Answer::Refused(response), _)) => {
                tracing::debug!(adapter = adapter.as_str(), outcome, status = %response.status(), "outbound request failed");
            }
            Err(error) => {
                tracing::debug!(adapter = adapter.as_str(), outcome, error = %error, "outbound request failed");
            }
        }
        let bounds = Bounds {
            adapter,
            attempts: attempts.load(Ordering::Relaxed),
            deadline: deadline_after(started, policy.retry.max_elapsed),
            limit: policy.retry.max_elapsed,
            read_timeout: policy.attempt_timeout,
            cancel: options.cancel.clone(),
        };
        match result? {
            (Answer::Value(value), slot) => Ok(Called {
                value,
                slot,
                bounds,
            }),
            // An error response keeps the slot, like a successful one,
            // until its body is read or it is dropped.
            (Answer::Refused(response), slot) => Err(FetchError::NonRetryableStatus {
                adapter,
                attempts: bounds.attempts,
                status: response.status(),
                response: Box::new(Response {
                    inner: response,
                    bounds,
                    _slot: slot,
                }),
            }),
        }
    }

    async fn call<X, R, RF>(
        &self,
        adapter: AdapterName,
        policy: &Policy,
        gate: Gate,
        request: Request,
        attempts: &AtomicU32,
        read: &R,
    ) -> Result<(Answer<X>, BulkheadPermit), FetchError>
    where
        R: Fn(reqwest::Response) -> RF,
        RF: Future<Output = Result<X, reqwest::Error>>,
    {
        let client = &self.inner.client;
        let mut template = Some(request);
        let attempt = move || {
            let request = if gate.clonable {
                template.as_ref().and_then(Request::try_clone)
            } else {
                template.take()
            };
            let made = attempts.fetch_add(1, Ordering::Relaxed) + 1;
            let labels = [("adapter", adapter.as_str())];
            if made > 1 {
                metrics::counter!(RETRIES_COUNTER, &labels).increment(1);
            }
            metrics::counter!(ATTEMPTS_COUNTER, &labels).increment(1);
            async move {
                let _timer = AttemptTimer::start(adapter);
                // Unreachable: a request that cannot be cloned is attempted
                // once (the gate makes every outcome final).
                let request = request.ok_or(AttemptError::NotRepeatable)?;
                let response = client
                    .execute(request)
                    .await
                    .map_err(|e| AttemptError::Send(without_url(e)))?;
                let status = response.status();
                if is_transient_status(status) {
                    let retry_after = retry_after_from_headers(response.headers());
                    return Err(AttemptError::Status {
                        response,
                        retry_after,
                    });
                }
                if status.is_client_error() || status.is_server_error() {
                    // Final: returned as a value so that the call hands its
                    // bulkhead slot on with it (the classifier still judges it).
                    return Ok(Answer::Refused(response));
                }
                read(response)
                    .await
                    .map(Answer::Value)
                    .map_err(|e| AttemptError::Body(e.without_url()))
            }
        };
        let scope = CallScope {
            timed_out: gate.sent(Verdict::TRANSIENT),
        };
        self.inner
            .resilience
            .call_holding(adapter, policy, scope, attempt, |result| {
                gate.classify(result)
            })
            .await
            .map_err(|error| {
                gate.into_fetch_error(adapter, attempts.load(Ordering::Relaxed), error)
            })
    }
}

/// The value of a finished call, its bulkhead slot and the bounds of what
/// is left of it (the body read).
struct Called<X> {
    value: X,
    slot: BulkheadPermit,
    bounds: Bounds,
}

/// What bounds a response's body reads.
#[derive(Debug, Clone)]
struct Bounds {
    adapter: AdapterName,
    attempts: u32,
    /// `None`: no deadline.
    deadline: Option<Instant>,
    limit: Duration,
    /// With no deadline, the attempt timeout bounds each body read, so a
    /// body that stalls can never hang the caller.
    read_timeout: Option<Duration>,
    cancel: Option<CancellationToken>,
}

impl Bounds {
    /// Runs a body read within the deadline (or, with none, the attempt
    /// timeout) and the cancellation token.
    async fn read<X>(
        &self,
        read: impl Future<Output = Result<X, reqwest::Error>>,
    ) -> Result<X, FetchError> {
        let timed_out = || FetchError::Timeout {
            adapter: self.adapter,
            attempts: self.attempts,
            scope: TimeoutScope::Deadline,
            limit: self.limit,
            reason: StopReason::Deadline,
        };
        let timed = async {
            match (self.deadline, self.read_timeout) {
                (Some(at), _) => tokio::time::timeout_at(at, read)
                    .await
                    .map_err(|_| timed_out()),
                (None, Some(limit)) => {
                    tokio::time::timeout(limit, read)
                        .await
                        .map_err(|_| FetchError::Timeout {
                            adapter: self.adapter,
                            attempts: self.attempts,
                            scope: TimeoutScope::Attempt,
                            limit,
                            reason: StopReason::Deadline,
                        })
                }
                (None, None) => Ok(read.await),
            }
        };
        let result = match &self.cancel {
            Some(cancel) => tokio::select! {
                biased;
                () = cancel.cancelled() => Err(FetchError::Cancelled {
                    adapter: self.adapter,
                    attempts: self.attempts,
                }),
                result = timed => result,
            },
            None => timed.await,
        };
        result?.map_err(|source| FetchError::Body {
            adapter: self.adapter,
            source: source.without_url(),
        })
    }
}

/// A response whose body reads are bounded by what is left of the call's
/// deadline and abort when its cancellation token fires; it holds the
/// adapter's bulkhead slot until it is consumed or dropped. Its `Debug`
/// shows the adapter and status, not the URL (a query may carry an api key).
pub struct Response {
    inner: reqwest::Response,
    bounds: Bounds,
    _slot: BulkheadPermit,
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response")
            .field("adapter", &self.bounds.adapter)
            .field("status", &self.inner.status())
            .finish_non_exhaustive()
    }
}

impl Response {
    /// The status.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        self.inner.status()
    }

    /// The headers.
    #[must_use]
    pub fn headers(&self) -> &HeaderMap {
        self.inner.headers()
    }

    /// The final URL (after redirects).
    #[must_use]
    pub fn url(&self) -> &reqwest::Url {
        self.inner.url()
    }

    /// The body's length, if the server said.
    #[must_use]
    pub fn content_length(&self) -> Option<u64> {
        self.inner.content_length()
    }

    /// The whole body.
    ///
    /// # Errors
    ///
    /// [`FetchError::Timeout`] at the call's deadline,
    /// [`FetchError::Cancelled`], [`FetchError::Body`].
    pub async fn bytes(self) -> Result<Vec<u8>, FetchError> {
        let Self {
            inner,
            bounds,
            _slot,
        } = self;
        bounds.read(inner.bytes()).await.map(Vec::from)
    }

    /// The whole body as text (charset from the headers, UTF-8 by default).
    ///
    /// # Errors
    ///
    /// As [`bytes`](Self::bytes).
    pub async fn text(self) -> Result<String, FetchError> {
        let Self {
            inner,
            bounds,
            _slot,
        } = self;
        bounds.read(inner.text()).await
    }

    /// The whole body parsed as JSON.
    ///
    /// # Errors
    ///
    /// As [`bytes`](Self::bytes), plus [`FetchError::Decode`].
    pub async fn json<T: DeserializeOwned>(self) -> Result<T, FetchError> {
        let adapter = self.bounds.adapter;
        let body = self.bytes().await?;
        serde_json::from_slice(&body).map_err(|source| FetchError::Decode { adapter, source })
    }

    /// The next chunk of the body, `None` at its end.
    ///
    /// # Errors
    ///
    /// As [`bytes`](Self::bytes).
    pub async fn chunk(&mut self) -> Result<Option<Vec<u8>>, FetchError> {
        let bounds = self.bounds.clone();
        bounds
            .read(self.inner.chunk())
            .await
            .map(|chunk| chunk.map(Vec::from))
    }
}

/// A request to one adapter; [`send`](Self::send) (or
/// [`fetch_bytes`](Self::fetch_bytes) / [`fetch_json`](Self::fetch_json))
/// runs it through the whole stack. There is no way to send it around the
/// stack.
#[derive(Debug)]
#[must_use = "a request does nothing until it is sent"]
pub struct RequestBuilder {
    client: HttpClient,
    adapter: AdapterName,
    inner: reqwest::RequestBuilder,
    options: CallOptions,
}

impl RequestBuilder {
    /// Adds a header.
    pub fn header<K, V>(self, key: K, value: V) -> Self
    where
        HeaderName: TryFrom<K>,
        <HeaderName as TryFrom<K>>::Error: Into<http::Error>,
        HeaderValue: TryFrom<V>,
        <HeaderValue as TryFrom<V>>::Error: Into<http::Error>,
    {
        self.map(|b| b.header(key, value))
    }

    /// Adds headers.
    pub fn headers(self, headers: HeaderMap) -> Self {
        self.map(|b| b.headers(headers))
    }

    /// Sets a bearer token (marked sensitive, so never logged by reqwest).
    pub fn bearer_auth<T: fmt::Display>(self, token: T) -> Self {
        self.map(|b| b.bearer_auth(token))
    }

    /// Sets basic auth.
    pub fn basic_auth<U: fmt::Display, P: fmt::Display>(
        self,
        user: U,
        password: Option<P>,
    ) -> Self {
        self.map(|b| b.basic_auth(user, password))
    }

    /// Sets the body.
    pub fn body<T: Into<reqwest::Body>>(self, body: T) -> Self {
        self.map(|b| b.body(body))
    }

    /// Sets a JSON body.
    pub fn json<T: Serialize + ?Sized>(self, json: &T) -> Self {
        self.map(|b| b.json(json))
    }

    /// Anything else reqwest's builder offers; the request is still sent
    /// through the stack.
    pub fn map(
        mut self,
        f: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Self {
        self.inner = f(self.inner);
        self
    }

    /// Cancels the call (attempt, backoff or body read) when `token` fires.
    pub fn cancel(mut self, token: CancellationToken) -> Self {
        self.options.cancel = Some(token);
        self
    }

    /// Overrides the adapter's total deadline for this call.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.options.deadline = Some(deadline);
        self
    }

    /// Overrides the adapter's per-attempt timeout for this call.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.options.attempt_timeout = Some(timeout);
        self
    }

    /// Replaces the call options.
    pub fn options(mut self, options: CallOptions) -> Self {
        self.options = options;
        self
    }

    /// Sends the request through the stack; see the [module docs](self).
    /// The body is read afterwards, from the [`Response`], within the
    /// call's deadline.
    ///
    /// # Errors
    ///
    /// Any [`FetchError`] but `Body` and `Decode`.
    pub async fn send(self) -> Result<Response, FetchError> {
        let Self {
            client,
            adapter,
            inner,
            options,
        } = self;
        let called = client
            .run(adapter, inner, &options, |response| async { Ok(response) })
            .await?;
        Ok(Response {
            inner: called.value,
            bounds: called.bounds,
            _slot: called.slot,
        })
    }

    /// Sends the request and reads the whole body *inside* the attempt: the
    /// attempt timeout, deadline, retries, breaker and bulkhead cover the
    /// body too (a body cut mid-way is a transient failure).
    ///
    /// # Errors
    ///
    /// Any [`FetchError`] but `Body` and `Decode`.
    pub async fn fetch_bytes(self) -> Result<Vec<u8>, FetchError> {
        let Self {
            client,
            adapter,
            inner,
            options,
        } = self;
        let called = client
            .run(adapter, inner, &options, |response| async {
                response.bytes().await.map(Vec::from)
            })
            .await?;
        Ok(called.value)
    }

    /// [`fetch_bytes`](Self::fetch_bytes), parsed as JSON. A body that is
    /// not the expected JSON is [`FetchError::Decode`] and does not count
    /// against the breaker (it may be our schema that is wrong).
    ///
    /// # Errors
    ///
    /// As [`fetch_bytes`](Self::fetch_bytes), plus [`FetchError::Decode`].
    pub async fn fetch_json<T: DeserializeOwned>(self) -> Result<T, FetchError> {
        let adapter = self.adapter;
        let body = self.fetch_bytes().await?;
        serde_json::from_slice(&body).map_err(|source| FetchError::Decode { adapter, source })
    }
}

/// A final answer of one attempt: the value, or a status that is not retried
/// (most 4xx, 501, 505, ...), which becomes [`FetchError::NonRetryableStatus`].
enum Answer<X> {
    Value(X),
    Refused(reqwest::Response),
}

/// One attempt's failure, before the loop decides what it means.
#[derive(Debug)]
enum AttemptError {
    /// The server answered with a transient status (408, 425, 429, 500,
    /// 502, 503, 504).
    Status {
        response: reqwest::Response,
        retry_after: Option<Duration>,
    },
    /// No response head (connect error, reset, middleware, redirect loop).
    Send(reqwest_middleware::Error),
    /// The body read inside the attempt failed.
    Body(reqwest::Error),
    /// Unreachable: a retry of a request that could not be cloned.
    NotRepeatable,
}

/// What a transport error says about the remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendFailure {
    /// Never reached the server: safe to repeat for any method.
    Connect,
    /// May have reached the server, may pass.
    Transient,
    /// Ours, not the remote's: a middleware, a request reqwest could not
    /// build, a redirect loop.
    Local,
    /// The remote's, and retrying will not fix it (TLS).
    Fatal,
}

fn send_failure(error: &reqwest_middleware::Error) -> SendFailure {
    match error {
        reqwest_middleware::Error::Middleware(_) => SendFailure::Local,
        reqwest_middleware::Error::Reqwest(e) if e.is_builder() || e.is_redirect() => {
            SendFailure::Local
        }
        reqwest_middleware::Error::Reqwest(e) if e.is_connect() => SendFailure::Connect,
        _ => match reqwest_retry::default_on_request_failure(error) {
            Some(Retryable::Transient) => SendFailure::Transient,
            Some(Retryable::Fatal) | None => SendFailure::Fatal,
        },
    }
}

/// Whether a request may be repeated, fixed for the call.
#[derive(Debug, Clone, Copy)]
struct Gate {
    /// Idempotent method or an `Idempotency-Key` header.
    idempotent: bool,
    /// The body could be cloned.
    clonable: bool,
}

impl Gate {
    /// `verdict` for an outcome after which the request may have reached
    /// the server; a failure that is not retried when repeating is unsafe.
    fn sent(self, verdict: Verdict) -> Verdict {
        if self.idempotent && self.clonable {
            verdict
        } else {
            Verdict::Failure
        }
    }

    /// `verdict` for an outcome where the request never left.
    fn unsent(self, verdict: Verdict) -> Verdict {
        if self.clonable {
            verdict
        } else {
            Verdict::Failure
        }
    }

    /// Why a sent request was not repeated.
    fn sent_reason(self) -> StopReason {
        if self.idempotent {
            StopReason::BodyNotClonable
        } else {
            StopReason::NotIdempotent
        }
    }

    fn classify<X>(self, result: &Result<Answer<X>, AttemptError>) -> Verdict {
        match result {
            Ok(Answer::Value(_)) => Verdict::Success,
            // The provider is up and answering; the request was wrong.
            Ok(Answer::Refused(response)) if response.status().is_client_error() => {
                Verdict::Success
            }
            Ok(Answer::Refused(_)) => Verdict::Failure,
            Err(AttemptError::Status { retry_after, .. }) => self.sent(Verdict::Transient {
                retry_after: *retry_after,
            }),
            Err(AttemptError::Send(error)) => match send_failure(error) {
                SendFailure::Connect => self.unsent(Verdict::TRANSIENT),
                SendFailure::Transient => self.sent(Verdict::TRANSIENT),
                SendFailure::Local => Verdict::Ignored,
                SendFailure::Fatal => Verdict::Failure,
            },
            Err(AttemptError::Body(_)) => self.sent(Verdict::TRANSIENT),
            Err(AttemptError::NotRepeatable) => Verdict::Ignored,
        }
    }

    fn into_fetch_error(
        self,
        adapter: AdapterName,
        attempts: u32,
        error: ResilienceError<AttemptError>,
    ) -> FetchError {
        match error {
            ResilienceError::BulkheadFull(source) => FetchError::BulkheadFull { adapter, source },
            ResilienceError::Rejected { retry_after, .. } => FetchError::CircuitOpen {
                adapter,
                retry_after,
            },
            ResilienceError::Timeout {
                limit,
                scope,
                attempts,
                reason,
                ..
            } => FetchError::Timeout {
                adapter,
                attempts,
                scope,
                limit,
                reason: reason.unwrap_or_else(|| self.sent_reason()),
            },
            ResilienceError::Exhausted {
                attempts,
                reason,
                error,
                ..
            } => exhausted(adapter, attempts, reason, error),
            ResilienceError::Inner(error) => match error {
                // A transient status the request could not be repeated after.
                error @ AttemptError::Status { .. } => {
                    exhausted(adapter, attempts, self.sent_reason(), error)
                }
                AttemptError::Send(source) => match send_failure(&source) {
                    SendFailure::Connect => exhausted(
                        adapter,
                        attempts,
                        StopReason::BodyNotClonable,
                        AttemptError::Send(source),
                    ),
                    SendFailure::Transient => exhausted(
                        adapter,
                        attempts,
                        self.sent_reason(),
                        AttemptError::Send(source),
                    ),
                    SendFailure::Local | SendFailure::Fatal => FetchError::Transport {
                        adapter,
                        attempts,
                        source,
                    },
                },
                error @ (AttemptError::Body(_) | AttemptError::NotRepeatable) => {
                    exhausted(adapter, attempts, self.sent_reason(), error)
                }
            },
        }
    }
}

fn exhausted(
    adapter: AdapterName,
    attempts: u32,
    reason: StopReason,
    error: AttemptError,
) -> FetchError {
    let (last_status, retry_after, source) = match error {
        AttemptError::Status {
            response,
            retry_after,
        } => (Some(response.status()), retry_after, None),
        AttemptError::Send(source) => (None, None, Some(source)),
        AttemptError::Body(source) => {
            (None, None, Some(reqwest_middleware::Error::Reqwest(source)))
        }
        AttemptError::NotRepeatable => (None, None, None),
    };
    FetchError::RetriesExhausted {
        adapter,
        attempts,
        last_status,
        reason,
        retry_after,
        source,
    }
}

/// `error` without the request URL, whose query may carry an api key: our
/// errors are logged and handed to callers, and name the adapter instead.
fn without_url(error: reqwest_middleware::Error) -> reqwest_middleware::Error {
    match error {
        reqwest_middleware::Error::Reqwest(e) => {
            reqwest_middleware::Error::Reqwest(e.without_url())
        }
        other => other,
    }
}

/// Records an attempt's duration when it ends, also when its timeout drops it.
struct AttemptTimer {
    adapter: AdapterName,
    started: Instant,
}

impl AttemptTimer {
    fn start(adapter: AdapterName) -> Self {
        Self {
            adapter,
            started: Instant::now(),
        }
    }
}

impl Drop for AttemptTimer {
    fn drop(&mut self) {
        metrics::histogram!(ATTEMPT_DURATION_HISTOGRAM, "adapter" => self.adapter.as_str())
            .record(self.started.elapsed().as_secs_f64());
    }
}

/// `start + limit`, or `None` (no deadline) for `Duration::MAX` or when it
/// does not fit in an `Instant`.
fn deadline_after(start: Instant, limit: Duration) -> Option<Instant> {
    if limit == Duration::MAX {
        None
    } else {
        start.checked_add(limit)
    }
}

fn record_call(adapter: AdapterName, outcome: &'static str, elapsed: Duration) {
    metrics::counter!(REQUESTS_COUNTER, "adapter" => adapter.as_str(), "outcome" => outcome)
        .increment(1);
    metrics::histogram!(REQUEST_DURATION_HISTOGRAM, "adapter" => adapter.as_str())
        .record(elapsed.as_secs_f64());
}

#[cfg(test)]
mod tests;
