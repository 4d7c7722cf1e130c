//! Outbound HTTP for the adapters: one [`HttpClient`] per process (connection
//! pool, keep-alive, rustls, gzip) that sends each request with a fresh
//! timeout per attempt, a total deadline over all attempts and waits,
//! retries of transient outcomes only, a circuit breaker and a bulkhead per
//! [`AdapterName`], and prompt cancellation through a `CancellationToken`.
//!
//! # One call, step by step
//!
//! 1. Bulkhead slot for the adapter, waiting at most the bulkhead's
//!    `max_wait` and never past the call's deadline →
//!    [`FetchError::BulkheadFull`].
//! 2. Circuit breaker admission → [`FetchError::CircuitOpen`] (nothing sent).
//! 3. One deposit into the retry budget (the client's own, or one shared by
//!    the whole process through [`HttpClientBuilder::retry_budget`]).
//! 4. Attempt: the request (a fresh clone each time) under its own timeout of
//!    `min(attempt_timeout, time left before the deadline)`. A success (1xx to
//!    3xx) is returned; a 4xx other than 408/425/429 or a non-transient 5xx
//!    (501, 505, ...) is [`FetchError::NonRetryableStatus`] at once.
//! 5. A transient outcome (connect error, timeout, 408, 425, 429, 500, 502,
//!    503, 504) is retried if every gate agrees, checked in this order: the
//!    method is idempotent or an `Idempotency-Key` header is present; the body
//!    could be cloned; the retry policy has attempts left; the wait fits before
//!    the deadline (a jittered wait that does not fit is *trimmed* so the last
//!    attempt still gets `min_last_attempt`; a server's `Retry-After` that
//!    does not fit stops the call); the breaker is not open (checked before
//!    the wait and again after it, since other callers may open it
//!    meanwhile); the retry budget has a token. Otherwise the call stops with
//!    [`FetchError::RetriesExhausted`] (its [`StopReason`] says which gate), or
//!    [`FetchError::Timeout`] if the last attempt timed out.
//! 6. The breaker records one verdict per call (the last attempt's), as
//!    `smartbeak_resilience::Resilience::call` does, so retries do not multiply
//!    failures in its window.
//!
//! The caller's `CancellationToken` is raced against the whole call: when it
//! fires, the in-flight attempt (its connection) or the pending backoff is
//! dropped at once and [`FetchError::Cancelled`] is returned.
//!
//! # What comes from where
//!
//! - **reqwest** sends; **reqwest-middleware**'s `ClientWithMiddleware` is the
//!   client, so callers may add middleware (tracing, auth) with
//!   [`HttpClientBuilder::middleware`].
//! - **reqwest-retry** provides the classification of transport errors
//!   ([`reqwest_retry::default_on_request_failure`] and its
//!   [`reqwest_retry::Retryable`]: connect errors, timeouts, connections reset
//!   or closed mid-response are transient; builder, redirect, body and decode
//!   errors are fatal). Its `RetryTransientMiddleware` is *not* used: it has no
//!   Retry-After support, retries POST like GET, has no overall deadline and
//!   returns the last 503 as `Ok`. Its status classification (every 5xx
//!   transient) is replaced by the fixed list in [`is_transient_status`].
//! - **smartbeak-resilience** provides the policy in charge of the loop:
//!   [`RetryPolicy`] (capped exponential backoff with full jitter, attempt
//!   limit, Retry-After clamped to `max_retry_after`), [`RetryBudget`],
//!   `retry_after_from_headers` (seconds or HTTP date), [`CircuitBreaker`]s
//!   from a [`BreakerRegistry`], and a [`Bulkhead`] per adapter.
//! - **this module** owns the deadline (it replaces `RetryPolicy::max_elapsed`,
//!   which is ignored here, because it trims the last wait instead of
//!   skipping it), idempotency and body-clonability gates, cancellation, the
//!   error enum and the metrics.
//!
//! # Metrics (label `adapter`, plus `outcome` on the request counter)
//!
//! - `http_client_requests_total{adapter, outcome}`: one per call; outcome is
//!   one of [`FetchError::outcome`]'s values or `success`.
//! - `http_client_attempts_total{adapter}`, `http_client_retries_total{adapter}`.
//! - `http_client_attempt_duration_seconds{adapter}` (each attempt) and
//!   `http_client_request_duration_seconds{adapter}` (whole call) histograms.
//!
//! # TLS
//!
//! reqwest's `rustls` feature (aws-lc-rs provider) builds here with `cc`
//! alone (aws-lc-sys needs neither cmake nor clang on x86-64 Linux), so no
//! provider switch was needed.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use smartbeak_resilience::{AdapterName, RetryPolicy};
//! use smartbeak_utils::fetch::{AdapterSettings, CallOptions, FetchError, HttpClient};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = HttpClient::builder()
//!     .adapter(
//!         AdapterName::Openai,
//!         AdapterSettings {
//!             attempt_timeout: Duration::from_secs(20),
//!             deadline: Duration::from_secs(60),
//!             retry: RetryPolicy { max_attempts: 4, ..RetryPolicy::default() },
//!             ..AdapterSettings::default()
//!         },
//!     )
//!     .build()?;
//!
//! let cancel = CancellationToken::new();
//! let request = client.get("https://api.openai.com/v1/models").bearer_auth("sk-...");
//! match client
//!     .send(AdapterName::Openai, request, &CallOptions::default().cancel(cancel))
//!     .await
//! {
//!     Ok(response) => println!("{}", response.status()),
//!     Err(FetchError::CircuitOpen { retry_after, .. }) => println!("try in {retry_after:?}"),
//!     Err(error) => return Err(error.into()),
//! }
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::{Method, StatusCode};
use rand::SeedableRng;
use rand::rngs::StdRng;
use reqwest::{IntoUrl, Request, RequestBuilder, Response};
use reqwest_middleware::{ClientWithMiddleware, Middleware};
use reqwest_retry::Retryable;
use smartbeak_resilience::{
    AdapterName, BreakerPolicy, BreakerRegistry, BreakerState, Bulkhead, BulkheadConfig,
    BulkheadFull, CircuitBreaker, RegistryConfig, RetryBudget, RetryBudgetConfig, RetryPolicy,
    Verdict, retry_after_from_headers,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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

/// How requests to one adapter are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSettings {
    /// Limit of each attempt, fresh for every attempt (up to receiving the
    /// response head; read a large body under your own timeout).
    pub attempt_timeout: Duration,
    /// Limit of the whole call: the bulkhead wait (cut to this if the
    /// bulkhead's `max_wait` is longer), attempts and backoff waits.
    /// `Duration::MAX` means no limit.
    pub deadline: Duration,
    /// Shortest time worth giving a last attempt: a jittered backoff is
    /// trimmed to leave this much before the deadline, and no attempt starts
    /// with less.
    pub min_last_attempt: Duration,
    /// Attempts, backoff and Retry-After clamp. `max_elapsed` is ignored:
    /// [`deadline`](Self::deadline) applies instead.
    pub retry: RetryPolicy,
    /// Circuit breaker of the adapter.
    pub breaker: BreakerPolicy,
    /// Concurrency limit of the adapter.
    pub bulkhead: BulkheadConfig,
}

impl Default for AdapterSettings {
    /// 10 s per attempt, 30 s deadline, 100 ms minimum last attempt, and the
    /// resilience crate's default retry policy, breaker and bulkhead.
    fn default() -> Self {
        Self {
            attempt_timeout: Duration::from_secs(10),
            deadline: Duration::from_secs(30),
            min_last_attempt: Duration::from_millis(100),
            retry: RetryPolicy::default(),
            breaker: BreakerPolicy::default(),
            bulkhead: BulkheadConfig::default(),
        }
    }
}

/// Per-call options.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// Cancels the call (in-flight attempt or backoff) when fired.
    pub cancel: Option<CancellationToken>,
    /// Overrides the adapter's [`AdapterSettings::deadline`].
    pub deadline: Option<Duration>,
    /// Overrides the adapter's [`AdapterSettings::attempt_timeout`].
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

/// Why a transient failure was not retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// The retry policy's `max_attempts` were used.
    MaxAttempts,
    /// No further attempt fits before the total deadline (or the server's
    /// Retry-After points past it).
    Deadline,
    /// The process-wide retry budget is empty.
    RetryBudget,
    /// The adapter's circuit breaker opened meanwhile.
    CircuitOpen,
    /// The method is not idempotent and no `Idempotency-Key` header was sent.
    NotIdempotent,
    /// The body is a stream that cannot be cloned, so it was sent once.
    BodyNotClonable,
}

impl StopReason {
    /// A stable snake_case name.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::MaxAttempts => "max_attempts",
            Self::Deadline => "deadline",
            Self::RetryBudget => "retry_budget",
            Self::CircuitOpen => "circuit_open",
            Self::NotIdempotent => "not_idempotent",
            Self::BodyNotClonable => "body_not_clonable",
        }
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::MaxAttempts => "attempts used up",
            Self::Deadline => "no further attempt fits before the deadline",
            Self::RetryBudget => "retry budget exhausted",
            Self::CircuitOpen => "circuit breaker opened",
            Self::NotIdempotent => {
                "method is not idempotent and no idempotency-key header was sent"
            }
            Self::BodyNotClonable => "request body cannot be cloned, so it was sent once",
        })
    }
}

/// Which limit a [`FetchError::Timeout`] hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeoutScope {
    /// The last attempt ran past its per-attempt timeout.
    Attempt,
    /// The last attempt was cut short by the total deadline.
    Deadline,
}

impl fmt::Display for TimeoutScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Attempt => "attempt timeout",
            Self::Deadline => "total deadline",
        })
    }
}

/// Why [`HttpClient::send`] returned no successful response. Every variant
/// keeps the adapter and, once anything was sent, the number of attempts.
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
    /// The last attempt timed out and no further attempt was possible.
    #[error(
        "request to {adapter} timed out ({scope}, limit {limit:?}) after {attempts} attempt(s)"
    )]
    Timeout {
        /// Target adapter.
        adapter: AdapterName,
        /// Attempts sent.
        attempts: u32,
        /// Which limit cut the last attempt.
        scope: TimeoutScope,
        /// The last attempt's time limit.
        limit: Duration,
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
        /// The transport error of the last attempt, if it had one.
        #[source]
        source: Option<reqwest_middleware::Error>,
    },
    /// The server answered with a status that is not retried (most 4xx, 501,
    /// 505, ...). The response is kept so its body can be read.
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
    /// decoding, a middleware's error).
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
            | Self::Transport { adapter, .. } => *adapter,
        }
    }

    /// Attempts sent (0 when the call was refused before sending).
    #[must_use]
    pub fn attempts(&self) -> u32 {
        match self {
            Self::InvalidRequest { .. } | Self::BulkheadFull { .. } | Self::CircuitOpen { .. } => 0,
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

/// A component the client builds from a config, or one given to share.
#[derive(Debug)]
enum Shared<T, C> {
    Own(C),
    Given(Arc<T>),
}

impl<T, C> Shared<T, C> {
    fn resolve(self, build: impl FnOnce(C) -> T) -> Arc<T> {
        match self {
            Self::Own(config) => Arc::new(build(config)),
            Self::Given(shared) => shared,
        }
    }
}

/// Builds an [`HttpClient`].
pub struct HttpClientBuilder {
    defaults: AdapterSettings,
    overrides: Vec<(AdapterName, AdapterSettings)>,
    registry: Shared<BreakerRegistry, RegistryConfig>,
    retry_budget: Shared<RetryBudget, RetryBudgetConfig>,
    jitter_seed: Option<u64>,
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
            .field("jitter_seed", &self.jitter_seed)
            .field("middleware", &self.middleware.len())
            .finish_non_exhaustive()
    }
}

impl Default for HttpClientBuilder {
    fn default() -> Self {
        Self {
            defaults: AdapterSettings::default(),
            overrides: Vec::new(),
            registry: Shared::Own(RegistryConfig::default()),
            retry_budget: Shared::Own(RetryBudgetConfig::default()),
            jitter_seed: None,
            user_agent: concat!("smartbeak/", env!("CARGO_PKG_VERSION")).to_owned(),
            connect_timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(90),
            tcp_keepalive: Duration::from_secs(60),
            middleware: Vec::new(),
        }
    }
}

impl HttpClientBuilder {
    /// Settings for every adapter without its own.
    #[must_use]
    pub fn defaults(mut self, settings: AdapterSettings) -> Self {
        self.defaults = settings;
        self
    }

    /// Settings for one adapter (the last call for an adapter wins).
    #[must_use]
    pub fn adapter(mut self, adapter: AdapterName, settings: AdapterSettings) -> Self {
        self.overrides.push((adapter, settings));
        self
    }

    /// Capacity and idle expiry of the client's own breaker registry
    /// (replaces a registry given to [`breaker_registry`](Self::breaker_registry)).
    #[must_use]
    pub fn breaker_registry_config(mut self, config: RegistryConfig) -> Self {
        self.registry = Shared::Own(config);
        self
    }

    /// Uses `registry` instead of a registry of the client's own, so other
    /// clients and components holding the same `Arc` share one breaker per
    /// (adapter, policy): an outage seen by one opens the breaker for all.
    #[must_use]
    pub fn breaker_registry(mut self, registry: Arc<BreakerRegistry>) -> Self {
        self.registry = Shared::Given(registry);
        self
    }

    /// Limits of the client's own retry budget (replaces a budget given to
    /// [`retry_budget`](Self::retry_budget)).
    #[must_use]
    pub fn retry_budget_config(mut self, config: RetryBudgetConfig) -> Self {
        self.retry_budget = Shared::Own(config);
        self
    }

    /// Uses `budget` instead of a budget of the client's own. This is how to
    /// keep *one* retry budget for the process: build one `Arc<RetryBudget>`
    /// at start-up and hand it to every [`HttpClient`], so retries stay a
    /// fraction of all requests together rather than of each client's. A
    /// [`Resilience`](smartbeak_resilience::Resilience) hands out its own
    /// with `retry_budget()`, so it can be shared with a client too.
    #[must_use]
    pub fn retry_budget(mut self, budget: Arc<RetryBudget>) -> Self {
        self.retry_budget = Shared::Given(budget);
        self
    }

    /// Seeds the backoff jitter (reproducible tests); random by default.
    #[must_use]
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.jitter_seed = Some(seed);
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
    /// under the attempt's timeout), in the order added.
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

        let settings: Vec<AdapterSettings> = AdapterName::ALL
            .iter()
            .map(|adapter| {
                self.overrides
                    .iter()
                    .rev()
                    .find(|(name, _)| name == adapter)
                    .map_or_else(|| self.defaults.clone(), |(_, s)| s.clone())
            })
            .collect();
        let bulkheads = AdapterName::ALL
            .iter()
            .zip(&settings)
            .map(|(adapter, s)| Bulkhead::new(*adapter, s.bulkhead))
            .collect();
        let rng = match self.jitter_seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_rng(&mut rand::rng()),
        };
        Ok(HttpClient {
            inner: Arc::new(ClientInner {
                raw,
                client,
                settings,
                bulkheads,
                breakers: self.registry.resolve(BreakerRegistry::new),
                budget: self.retry_budget.resolve(RetryBudget::new),
                rng: Mutex::new(rng),
            }),
        })
    }
}

/// The process-wide HTTP client for outside providers; see the [module docs](self).
///
/// Build it once and clone it (cheap, shares the pool, breakers and budget).
#[derive(Clone)]
pub struct HttpClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    raw: reqwest::Client,
    client: ClientWithMiddleware,
    /// Indexed by `AdapterName::index`.
    settings: Vec<AdapterSettings>,
    /// Indexed by `AdapterName::index`.
    bulkheads: Vec<Bulkhead>,
    breakers: Arc<BreakerRegistry>,
    budget: Arc<RetryBudget>,
    rng: Mutex<StdRng>,
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("breakers", &self.inner.breakers.len())
            .field("retry_budget", &self.inner.budget.available())
            .finish_non_exhaustive()
    }
}

/// A classified attempt.
enum Attempt {
    /// Return this response.
    Success(Response),
    /// A status not worth retrying; `breaker` is what the breaker records.
    NonRetryable {
        response: Response,
        breaker: Verdict,
    },
    /// A transport error not worth retrying.
    Fatal(reqwest_middleware::Error),
    /// Worth retrying.
    Transient {
        status: Option<StatusCode>,
        retry_after: Option<Duration>,
        error: Option<reqwest_middleware::Error>,
        timed_out: Option<(TimeoutScope, Duration)>,
    },
}

impl HttpClient {
    /// A builder with default settings.
    #[must_use]
    pub fn builder() -> HttpClientBuilder {
        HttpClientBuilder::default()
    }

    /// A request builder for `method` and `url` (send it with [`send`](Self::send)).
    pub fn request(&self, method: Method, url: impl IntoUrl) -> RequestBuilder {
        self.inner.raw.request(method, url)
    }

    /// A GET request builder.
    pub fn get(&self, url: impl IntoUrl) -> RequestBuilder {
        self.request(Method::GET, url)
    }

    /// A POST request builder (retried only with an `Idempotency-Key` header).
    pub fn post(&self, url: impl IntoUrl) -> RequestBuilder {
        self.request(Method::POST, url)
    }

    /// The settings in force for `adapter`.
    #[must_use]
    pub fn settings(&self, adapter: AdapterName) -> &AdapterSettings {
        &self.inner.settings[adapter.index()]
    }

    /// The circuit breaker of `adapter` (created on first use).
    #[must_use]
    pub fn breaker(&self, adapter: AdapterName) -> Arc<CircuitBreaker> {
        self.inner
            .breakers
            .get(adapter, &self.settings(adapter).breaker)
    }

    /// The retry budget in use (shared if one was given to
    /// [`HttpClientBuilder::retry_budget`]).
    #[must_use]
    pub fn retry_budget(&self) -> &Arc<RetryBudget> {
        &self.inner.budget
    }

    /// The breaker registry in use (shared if one was given to
    /// [`HttpClientBuilder::breaker_registry`]).
    #[must_use]
    pub fn breaker_registry(&self) -> &Arc<BreakerRegistry> {
        &self.inner.breakers
    }

    /// Builds and sends the request to `adapter`; see [`execute`](Self::execute).
    ///
    /// # Errors
    ///
    /// As [`execute`](Self::execute), plus [`FetchError::InvalidRequest`] when
    /// the builder fails.
    pub async fn send(
        &self,
        adapter: AdapterName,
        request: RequestBuilder,
        options: &CallOptions,
    ) -> Result<Response, FetchError> {
        match request.build() {
            Ok(request) => self.execute(adapter, request, options).await,
            Err(source) => {
                let error = FetchError::InvalidRequest { adapter, source };
                record_call(adapter, error.outcome(), Duration::ZERO);
                Err(error)
            }
        }
    }

    /// Sends `request` to `adapter` with the adapter's timeouts, retries,
    /// breaker and bulkhead; see the [module docs](self) for the steps.
    ///
    /// # Errors
    ///
    /// Any [`FetchError`] but `InvalidRequest`.
    pub async fn execute(
        &self,
        adapter: AdapterName,
        request: Request,
        options: &CallOptions,
    ) -> Result<Response, FetchError> {
        let started = Instant::now();
        let settings = self.settings(adapter);
        let plan = CallPlan {
            adapter,
            attempt_timeout: options.attempt_timeout.unwrap_or(settings.attempt_timeout),
            deadline_at: deadline_after(started, options.deadline.unwrap_or(settings.deadline)),
            min_last_attempt: settings.min_last_attempt,
            retry: RetryPolicy {
                max_elapsed: Duration::MAX,
                ..settings.retry
            },
        };
        let attempts = AtomicU32::new(0);
        let call = self.run(&plan, settings, request, &attempts);
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
        let outcome = result
            .as_ref()
            .map_or_else(FetchError::outcome, |_| "success");
        record_call(adapter, outcome, started.elapsed());
        if let Err(error) = &result {
            tracing::debug!(adapter = adapter.as_str(), outcome, error = %error, "outbound request failed");
        }
        result
    }

    async fn run(
        &self,
        plan: &CallPlan,
        settings: &AdapterSettings,
        request: Request,
        attempts: &AtomicU32,
    ) -> Result<Response, FetchError> {
        let adapter = plan.adapter;
        let _slot = self.inner.bulkheads[adapter.index()]
            .acquire_within(plan.deadline_at.saturating_duration_since(Instant::now()))
            .await
            .map_err(|source| FetchError::BulkheadFull { adapter, source })?;
        let breaker = self.inner.breakers.get(adapter, &settings.breaker);
        let permit = breaker
            .try_acquire()
            .map_err(|rejection| FetchError::CircuitOpen {
                adapter,
                retry_after: rejection.retry_after,
            })?;
        self.inner.budget.deposit();

        // Gates that hold for the whole call.
        let retry_gate = if !is_idempotent(request.method())
            && !request.headers().contains_key(IDEMPOTENCY_KEY)
        {
            Err(StopReason::NotIdempotent)
        } else if request.try_clone().is_none() {
            Err(StopReason::BodyNotClonable)
        } else {
            Ok(())
        };
        let mut template = Some(request);
        let labels = [("adapter", adapter.as_str())];

        loop {
            let Some(request) = next_request(&mut template, retry_gate.is_ok()) else {
                // Unreachable: a single-shot request never loops.
                return Err(FetchError::RetriesExhausted {
                    adapter,
                    attempts: attempts.load(Ordering::Relaxed),
                    last_status: None,
                    reason: StopReason::BodyNotClonable,
                    source: None,
                });
            };
            let made = attempts.fetch_add(1, Ordering::Relaxed) + 1;
            if made > 1 {
                metrics::counter!(RETRIES_COUNTER, &labels).increment(1);
            }
            metrics::counter!(ATTEMPTS_COUNTER, &labels).increment(1);

            let attempt = self.attempt(plan, request).await;
            let (status, retry_after, error, timed_out) = match attempt {
                Attempt::Success(response) => {
                    permit.record(Verdict::Success);
                    return Ok(response);
                }
                Attempt::NonRetryable { response, breaker } => {
                    permit.record(breaker);
                    return Err(FetchError::NonRetryableStatus {
                        adapter,
                        attempts: made,
                        status: response.status(),
                        response: Box::new(response),
                    });
                }
                Attempt::Fatal(source) => {
                    permit.record(Verdict::Failure);
                    return Err(FetchError::Transport {
                        adapter,
                        attempts: made,
                        source,
                    });
                }
                Attempt::Transient {
                    status,
                    retry_after,
                    error,
                    timed_out,
                } => (status, retry_after, error, timed_out),
            };

            let decision = retry_gate
                .and_then(|()| {
                    let mut rng = self
                        .inner
                        .rng
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    plan.next_wait(made, retry_after, Instant::now(), &mut *rng)
                })
                .and_then(|wait| {
                    if breaker.state() == BreakerState::Open {
                        Err(StopReason::CircuitOpen)
                    } else if !self.inner.budget.try_withdraw() {
                        Err(StopReason::RetryBudget)
                    } else {
                        Ok(wait)
                    }
                });
            let reason = match decision {
                Ok(wait) => {
                    tracing::debug!(
                        adapter = adapter.as_str(),
                        attempt = made,
                        status = status.map(|s| s.as_u16()),
                        wait_ms = wait.as_millis() as u64,
                        "retrying outbound request"
                    );
                    tokio::time::sleep(wait).await;
                    // Opened by other callers while we waited (a Retry-After
                    // wait can be long): stop rather than send to an adapter
                    // known to be down.
                    if breaker.state() != BreakerState::Open {
                        continue;
                    }
                    StopReason::CircuitOpen
                }
                Err(reason) => reason,
            };
            permit.record(Verdict::Transient { retry_after });
            return Err(match timed_out {
                Some((scope, limit)) => FetchError::Timeout {
                    adapter,
                    attempts: made,
                    scope,
                    limit,
                },
                None => FetchError::RetriesExhausted {
                    adapter,
                    attempts: made,
                    last_status: status,
                    reason,
                    source: error,
                },
            });
        }
    }

    /// Sends one attempt under its own timeout and classifies the outcome.
    async fn attempt(&self, plan: &CallPlan, request: Request) -> Attempt {
        let started = Instant::now();
        let remaining = plan.deadline_at.saturating_duration_since(started);
        let (limit, scope) = if remaining < plan.attempt_timeout {
            (remaining, TimeoutScope::Deadline)
        } else {
            (plan.attempt_timeout, TimeoutScope::Attempt)
        };
        let result = tokio::time::timeout(limit, self.inner.client.execute(request)).await;
        metrics::histogram!(ATTEMPT_DURATION_HISTOGRAM, "adapter" => plan.adapter.as_str())
            .record(started.elapsed().as_secs_f64());
        match result {
            Err(_elapsed) => Attempt::Transient {
                status: None,
                retry_after: None,
                error: None,
                timed_out: Some((scope, limit)),
            },
            Ok(Ok(response)) => classify_response(response),
            Ok(Err(error)) => match reqwest_retry::default_on_request_failure(&error) {
                Some(Retryable::Transient) => Attempt::Transient {
                    status: None,
                    retry_after: None,
                    error: Some(error),
                    timed_out: None,
                },
                Some(Retryable::Fatal) | None => Attempt::Fatal(error),
            },
        }
    }
}

fn classify_response(response: Response) -> Attempt {
    let status = response.status();
    if is_transient_status(status) {
        Attempt::Transient {
            status: Some(status),
            retry_after: retry_after_from_headers(response.headers()),
            error: None,
            timed_out: None,
        }
    } else if status.is_client_error() {
        // The provider is up and answering; the request was wrong.
        Attempt::NonRetryable {
            response,
            breaker: Verdict::Success,
        }
    } else if status.is_server_error() {
        Attempt::NonRetryable {
            response,
            breaker: Verdict::Failure,
        }
    } else {
        Attempt::Success(response)
    }
}

/// The request for the next attempt: a clone while retries are possible, the
/// original itself otherwise (then only once).
fn next_request(template: &mut Option<Request>, retryable: bool) -> Option<Request> {
    if retryable {
        template.as_ref().and_then(Request::try_clone)
    } else {
        template.take()
    }
}

/// Stands in for the deadline when `start + limit` does not fit in an
/// `Instant` (`Duration::MAX` is a natural "no limit"): about 30 years.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `start + limit`, or [`FAR_FUTURE`] from `start` when that overflows.
fn deadline_after(start: Instant, limit: Duration) -> Instant {
    start
        .checked_add(limit)
        .or_else(|| start.checked_add(FAR_FUTURE))
        // Unreachable on a monotonic clock counted from boot; never panic.
        .unwrap_or(start)
}

fn record_call(adapter: AdapterName, outcome: &'static str, elapsed: Duration) {
    metrics::counter!(REQUESTS_COUNTER, "adapter" => adapter.as_str(), "outcome" => outcome)
        .increment(1);
    metrics::histogram!(REQUEST_DURATION_HISTOGRAM, "adapter" => adapter.as_str())
        .record(elapsed.as_secs_f64());
}

/// The limits of one call, resolved from settings and options.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallPlan {
    pub(crate) adapter: AdapterName,
    pub(crate) attempt_timeout: Duration,
    pub(crate) deadline_at: Instant,
    pub(crate) min_last_attempt: Duration,
    /// With `max_elapsed` lifted: the deadline is ours.
    pub(crate) retry: RetryPolicy,
}

impl CallPlan {
    /// The wait before the next attempt after `attempts_made` attempts, or why
    /// there is none. A jittered wait that would leave less than
    /// `min_last_attempt` before the deadline is trimmed to leave exactly
    /// that; a Retry-After wait is never trimmed (the server asked for it).
    pub(crate) fn next_wait<R: rand::Rng + ?Sized>(
        &self,
        attempts_made: u32,
        retry_after: Option<Duration>,
        now: Instant,
        rng: &mut R,
    ) -> Result<Duration, StopReason> {
        let wait = self
            .retry
            .next_delay_with(attempts_made, retry_after, Duration::ZERO, rng)
            .ok_or(StopReason::MaxAttempts)?;
        let remaining = self.deadline_at.saturating_duration_since(now);
        let min_attempt = self.min_last_attempt.min(self.attempt_timeout);
        let room = remaining
            .checked_sub(min_attempt)
            .filter(|_| !remaining.is_zero())
            .ok_or(StopReason::Deadline)?;
        if wait <= room {
            Ok(wait)
        } else if retry_after.is_some() {
            Err(StopReason::Deadline)
        } else {
            Ok(room)
        }
    }
}

#[cfg(test)]
mod tests;
