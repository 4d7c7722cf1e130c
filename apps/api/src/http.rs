//! The router and its middleware: request ids in spans, HTTP metrics, a panic turned into
//! the JSON 500, body limit, per-request timeout (504, its deadline flowing into every
//! query), concurrency limit with load shedding, rate limiting of unmatched routes, and one
//! JSON error shape for the answers that tower layers produce on their own. The probes
//! (`/healthz`, `/readyz`) sit outside all of it.

use std::any::Any;
use std::time::Instant;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{BoxError, Router};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::error::ApiError;
use crate::ratelimit;
use crate::routes::{analytics, content, domains, exports, health, ingest, settings};
use crate::state::AppState;

/// Declares routes once: expands to a function that adds them to a router and to the
/// `(METHOD, path)` list (`V1_ROUTES`, `OPERATIONAL_ROUTES`) that the contract test compares with the OpenAPI
/// document, so a route cannot be added without the test seeing it. A route added any other
/// way (`.route`, `.nest` or another `.merge` in [`app`]) would escape that test; a tidy test
/// (`routes_are_added_only_through_the_macro`) fails on one. axum answers `HEAD` on every
/// `GET` route; the document lists the `GET` only.
macro_rules! routes {
    ($(#[$meta:meta])* fn $add:ident, const $list:ident = {
        $( $path:literal => { $( $method:ident : $handler:path ),+ $(,)? } ),+ $(,)?
    }) => {
        $(#[$meta])*
        fn $add(router: Router<AppState>) -> Router<AppState> {
            router$(.route(
                $path,
                axum::routing::MethodRouter::new()$(.$method($handler))+,
            ))+
        }

        /// Every `(METHOD, path)` the router serves (paths as in the OpenAPI document).
        pub const $list: &[(&str, &str)] = &[$($(
            (method_name(stringify!($method)), $path),
        )+)+];
    };
}

const fn method_name(method: &str) -> &'static str {
    match method.as_bytes() {
        b"get" => "GET",
        b"post" => "POST",
        b"put" => "PUT",
        b"delete" => "DELETE",
        b"patch" => "PATCH",
        _ => "OTHER",
    }
}

routes! {
    /// The routes under the rate limiter and authentication, with their full paths.
    fn add_v1_routes, const V1_ROUTES = {
        "/v1/domains" => { get: domains::list, post: domains::create },
        "/v1/domains/{id}" => { get: domains::get },
        "/v1/domains/{id}/content" => { get: content::list, post: content::create },
        "/v1/domains/{id}/settings" => { get: settings::get, put: settings::put },
        "/v1/domains/{id}/metrics" => { post: ingest::ingest },
        "/v1/domains/{id}/analytics" => { get: analytics::get },
        "/v1/domains/{id}/exports" => { get: exports::list, post: exports::create },
        "/v1/exports/{id}" => { get: exports::get, delete: exports::cancel },
        "/v1/exports/{id}/download" => { get: exports::download },
    }
}

routes! {
    /// The probes, served outside every layer (no load shedding, concurrency limit or
    /// timeout can answer a liveness probe with 503 under saturation).
    fn add_probe_routes, const PROBE_ROUTES = {
        "/healthz" => { get: health::healthz },
        "/readyz" => { get: health::readyz },
    }
}

routes! {
    /// The operational routes (no key, no rate limit).
    fn add_operational_routes, const OPERATIONAL_ROUTES = {
        "/metrics" => { get: health::metrics },
        "/openapi.json" => { get: crate::openapi::serve },
    }
}

/// Every `(METHOD, path)` the router serves: [`V1_ROUTES`], [`PROBE_ROUTES`] then
/// [`OPERATIONAL_ROUTES`].
pub fn routes() -> Vec<(&'static str, &'static str)> {
    V1_ROUTES
        .iter()
        .chain(PROBE_ROUTES)
        .chain(OPERATIONAL_ROUTES)
        .copied()
        .collect()
}

/// The whole application: routes plus every layer. Serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()` so the limiter sees client IPs.
pub fn app(state: AppState) -> Router {
    let v1 = add_v1_routes(Router::new()).route_layer(middleware::from_fn_with_state(
        state.clone(),
        ratelimit::middleware,
    ));

    let http = state.config.http.clone();
    let probes = add_probe_routes(Router::new()).with_state(state.clone());
    let routes = add_operational_routes(Router::new())
        .merge(v1)
        .fallback(|| async { ApiError::NotFound("route") })
        // Unmatched paths and methods are rate limited too (matched ones pass through).
        .layer(middleware::from_fn_with_state(
            state.clone(),
            ratelimit::unmatched,
        ))
        .layer(middleware::from_fn(route_metrics))
        .with_state(state);

    // Layers around the whole router (not per route, which would give each route its own
    // concurrency limit): outermost first.
    let stack = ServiceBuilder::new()
        .layer(middleware::map_request(drop_bad_request_id))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            let request_id = request
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!("request", method = %request.method(), uri = %request.uri().path(), request_id)
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(middleware::from_fn(in_flight))
        .layer(catch_panic())
        .layer(middleware::map_response(normalize_error))
        .layer(HandleErrorLayer::new(|err: BoxError| async move {
            if err.is::<tower::load_shed::error::Overloaded>() {
                metrics::counter!("http_requests_shed_total").increment(1);
                ApiError::Overloaded
            } else {
                ApiError::internal(err)
            }
        }))
        .load_shed()
        .concurrency_limit(http.max_concurrency)
        // The request timeout and the deadline of its queries and calls (a from_fn layer
        // takes the plain body, so it sits above the body limit).
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            request_deadline(http.request_timeout, request, next)
        }))
        .layer(RequestBodyLimitLayer::new(http.body_limit_bytes))
        // axum's extractors have a 2 MiB limit of their own; HTTP_BODY_LIMIT_BYTES (the
        // layer above) is the one limit, larger or smaller.
        .layer(DefaultBodyLimit::disable())
        .service(routes);
    probes.fallback_service(stack)
}

/// Ends the request with 504 `REQUEST_TIMEOUT` once `timeout` has passed, and runs it inside
/// a [`smartbeak_resilience::deadline::scope`] (the one task-local that
/// `smartbeak_database::deadline` and `smartbeak_utils::fetch::deadline` re-export), so every
/// query it makes is bounded by what is left of it (and an ingest transaction's
/// `statement_timeout` lowered to fit), and so is every outbound call through
/// `smartbeak_utils::fetch`: neither outlives its request, and no handler passes the
/// deadline along.
///
/// The scope ends [`deadline_margin`] before the timeout, and the timeout
/// ([`tokio::time::timeout_at`]) polls the request before it looks at its own timer: a
/// statement still running at the deadline is ended by its own bound (counted in
/// `db_query_timeouts_total`, its cause logged, its connection discarded) and the handler
/// answers the 504 itself, however late the task is polled. The margin keeps the bound's
/// timer (set from what is left, a moment after the scope began) from falling in a later
/// millisecond tick than the timeout's.
async fn request_deadline(timeout: std::time::Duration, request: Request, next: Next) -> Response {
    let started = tokio::time::Instant::now();
    within_deadline(
        started + timeout,
        deadline_margin(timeout),
        next.run(request),
    )
    .await
}

/// `request` under [`request_deadline`]'s two instants: the scope until `timeout_at - margin`,
/// the 504 at `timeout_at`.
async fn within_deadline(
    timeout_at: tokio::time::Instant,
    margin: std::time::Duration,
    request: impl std::future::Future<Output = Response>,
) -> Response {
    let scoped = smartbeak_resilience::deadline::scope(timeout_at - margin, request);
    tokio::time::timeout_at(timeout_at, scoped)
        .await
        .unwrap_or_else(|_elapsed| ApiError::Timeout.into_response())
}

/// How long before the request timeout the request's deadline ends: a twentieth of it, at
/// most 50 ms. It is below the database client bound's own margin over `statement_timeout`
/// (at least 250 ms, see `check_timeouts`), so a request timeout at that bound still leaves
/// its queries the whole `statement_timeout`.
fn deadline_margin(timeout: std::time::Duration) -> std::time::Duration {
    (timeout / 20).min(std::time::Duration::from_millis(50))
}

/// Describes the HTTP layer's metrics and registers its label-less counters at 0
/// (`http_requests_shed_total`, `http_panics_total`), so a rate over them is defined before
/// the first shed request or panic. `http_requests_total` and
/// `http_request_duration_seconds` appear with their first request of a route. Call once,
/// after the recorder is installed.
pub fn register_metrics() {
    metrics::describe_counter!(
        "http_requests_total",
        "requests by method, route and status"
    );
    metrics::describe_histogram!(
        "http_request_duration_seconds",
        metrics::Unit::Seconds,
        "request duration by method and route"
    );
    metrics::describe_counter!(
        "http_requests_shed_total",
        "requests refused with 503 at HTTP_MAX_CONCURRENCY"
    );
    metrics::describe_counter!("http_panics_total", "request handlers that panicked");
    metrics::describe_gauge!("http_requests_in_flight", "requests being served");
    metrics::counter!("http_requests_shed_total").increment(0);
    metrics::counter!("http_panics_total").increment(0);
    metrics::gauge!("http_requests_in_flight").set(0.0);
}

/// Turns a panic anywhere below it into the JSON 500 `INTERNAL_ERROR` (the panic message
/// goes to the log, `http_panics_total` counts it) instead of a dropped connection.
pub fn catch_panic() -> CatchPanicLayer<fn(Box<dyn Any + Send + 'static>) -> Response> {
    CatchPanicLayer::custom(panic_response as fn(Box<dyn Any + Send + 'static>) -> Response)
}

fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message");
    metrics::counter!("http_panics_total").increment(1);
    ApiError::internal(format!("request handler panicked: {message}")).into_response()
}

/// Gauge of requests being served, for dashboards and the shutdown test.
async fn in_flight(request: Request, next: Next) -> Response {
    let gauge = metrics::gauge!("http_requests_in_flight");
    gauge.increment(1.0);
    let _guard = GaugeGuard(gauge);
    next.run(request).await
}

struct GaugeGuard(metrics::Gauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// `http_requests_total` and `http_request_duration_seconds` by route template.
async fn route_metrics(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The `method` label of the HTTP metrics: the standard methods by name, anything else
/// (a client may send any token as a method) `other`, so the label set stays bounded.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// Longest client-supplied `x-request-id` kept.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// True for a request id fit for logs and response headers: 1 to [`MAX_REQUEST_ID_LEN`]
/// characters of `[A-Za-z0-9._:-]` (a UUID, a ULID, a trace id...).
pub fn is_acceptable_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_REQUEST_ID_LEN
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Removes a client's `x-request-id` unless it is one acceptable value (see
/// [`is_acceptable_request_id`]); the layer after this one then generates a UUID.
async fn drop_bad_request_id(mut request: Request) -> Request {
    let headers = request.headers_mut();
    let mut values = headers.get_all("x-request-id").iter();
    let keep = match (values.next(), values.next()) {
        (None, _) => true,
        (Some(value), None) => is_acceptable_request_id(value),
        (Some(_), Some(_)) => false,
    };
    if !keep {
        headers.remove("x-request-id");
    }
    request
}

/// Gives the bare answers of tower layers (413 from the body limit, 405 from routing; a bare
/// 504, should any layer answer one, as `REQUEST_TIMEOUT`) the JSON error shape.
async fn normalize_error<B>(response: axum::http::Response<B>) -> Response
where
    B: axum::body::HttpBody<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let response = response.map(axum::body::Body::new);
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return response;
    }
    let error = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        StatusCode::GATEWAY_TIMEOUT => ApiError::Timeout,
        StatusCode::METHOD_NOT_ALLOWED => {
            let mut r = (
                status,
                axum::Json(crate::error::ErrorBody {
                    error: "method not allowed".into(),
                    code: "METHOD_NOT_ALLOWED".into(),
                }),
            )
                .into_response();
            // `Allow`, the limiter's `RateLimit` headers, the request id: all but the
            // body's own.
            for (name, value) in response.headers() {
                if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                    r.headers_mut().append(name.clone(), value.clone());
                }
            }
            return r;
        }
        _ => return response,
    };
    let mut r = error.into_response();
    if let Some(id) = response.headers().get("x-request-id") {
        r.headers_mut().insert("x-request-id", id.clone());
    }
    r
}

#[cfg(test)]
mod stack_tests;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    /// Tidy: outside the tests, this file adds routes only in `routes!` (one `.route(`),
    /// merges only the v1 routes and nests nothing, so `routes()` is every route served.
    #[test]
    fn routes_are_added_only_through_the_macro() {
        let source = include_str!("http.rs");
        let code = &source[..source.find("#[cfg(test)]").unwrap()];
        let count = |needle: &str| code.matches(needle).count();
        assert_eq!(count(".route("), 1, "a .route( outside routes!");
        assert_eq!(count(".merge("), 1, "only .merge(v1)");
        assert!(code.contains("probes.fallback_service(stack)"));
        assert!(code.contains(".merge(v1)"));
        // The one fallback service is the layered stack around those routes.
        assert_eq!(count(".fallback_service("), 1, "only the layered stack");
        for needle in [".nest(", ".nest_service(", ".route_service("] {
            assert_eq!(count(needle), 0, "{needle}");
        }
    }

    #[test]
    fn the_deadline_margin_is_a_twentieth_at_most_50_ms_and_below_the_client_bounds_margin() {
        use std::time::Duration;
        let ms = Duration::from_millis;
        assert_eq!(super::deadline_margin(ms(2_000)), ms(50));
        assert_eq!(super::deadline_margin(ms(10_000)), ms(50));
        assert_eq!(super::deadline_margin(ms(100)), ms(5));
        assert_eq!(super::deadline_margin(Duration::ZERO), Duration::ZERO);
        // A request timeout at the smallest one `check_timeouts` allows (the client bound)
        // still leaves its queries more than `statement_timeout`: the margin is below the
        // client bound's own (at least 250 ms).
        let mut db = smartbeak_database::DatabaseConfig::new("postgres://u@h/d").unwrap();
        for statement in [ms(1), ms(500), ms(2_500), ms(8_000), ms(60_000)] {
            db.statement_timeout = statement;
            let request = db.query_timeout();
            assert!(
                request - super::deadline_margin(request) > statement,
                "{statement:?}"
            );
        }
    }

    /// The request's own work, as a handler bounded by the request deadline sees it: a
    /// statement that never ends, bounded by what is left (`deadline::bounded`), answering
    /// 418 when its bound fires, so the test can tell it from the 504 of the timeout.
    async fn bounded_forever() -> axum::response::Response {
        let bound = smartbeak_resilience::deadline::bounded(std::time::Duration::from_secs(60));
        match tokio::time::timeout(bound, std::future::pending::<()>()).await {
            Ok(()) => StatusCode::OK.into_response(),
            Err(_) => StatusCode::IM_A_TEAPOT.into_response(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_bound_that_fires_with_the_request_timeout_answers_not_the_timeout() {
        // No margin at all: the bound and the timeout fire in the same instant, and the
        // request (polled first) answers with its bound's outcome; the timeout is only for
        // a request that does not end by itself.
        let at = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        let answer = super::within_deadline(at, std::time::Duration::ZERO, bounded_forever()).await;
        assert_eq!(answer.status(), StatusCode::IM_A_TEAPOT);
        assert_eq!(tokio::time::Instant::now(), at);
        let margin = std::time::Duration::from_millis(50);
        let at = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        let answer = super::within_deadline(at, margin, bounded_forever()).await;
        assert_eq!(answer.status(), StatusCode::IM_A_TEAPOT);
        assert_eq!(tokio::time::Instant::now(), at - margin);
        // Work that no bound ends is ended by the timeout: 504 `REQUEST_TIMEOUT`.
        let at = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        let forever = async {
            std::future::pending::<()>().await;
            StatusCode::OK.into_response()
        };
        let answer = super::within_deadline(at, margin, forever).await;
        assert_eq!(answer.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(tokio::time::Instant::now(), at);
        let body = axum::body::to_bytes(answer.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "REQUEST_TIMEOUT");
    }

    use axum::body::Body;
    use axum::http::Request;
    use smartbeak_database::Database;
    use smartbeak_database::testing::TestDatabase;
    use tower::ServiceExt;

    use axum::routing::get;

    use super::*;
    use crate::config::ApiConfig;
    use crate::ratelimit::RateLimiter;

    /// `GET /v1/domains` from `peer` (the connection's address), with `key` as its bearer
    /// key when given.
    fn domains_request(peer: &str, key: Option<&str>) -> Request<Body> {
        let mut request = Request::get("/v1/domains");
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let mut request = request.body(Body::empty()).unwrap();
        let peer: std::net::SocketAddr = peer.parse().unwrap();
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        request
    }

    async fn call(app: &Router, path: &str) -> (StatusCode, serde_json::Value) {
        let response = app
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 22)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn readiness_flips_at_shutdown_and_openapi_is_3_1() {
        let tdb = TestDatabase::create().await.unwrap();
        let db = Database::connect(tdb.config(), "smartbeak-api-test")
            .await
            .unwrap();
        let config = ApiConfig::from_lookup(|_| None).unwrap();
        let limiter = RateLimiter::new(config.rate_limit.clone(), None).unwrap();
        let state = AppState::new(db.clone(), config, limiter, None);
        let app = app(state.clone());

        let (status, body) = call(&app, "/readyz").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["database"], "ok");
        assert_eq!(body["analytics_reads"], "primary");
        assert_eq!(body["redis"], "disabled");

        state.readiness.shut_down();
        let (status, body) = call(&app, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["code"], "NOT_READY");
        assert_eq!(body["error"], "not ready: shutting down");
        assert_eq!(body["shutting_down"], true);
        assert_eq!(call(&app, "/healthz").await.0, StatusCode::OK);

        let (status, doc) = call(&app, "/openapi.json").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(doc["openapi"], "3.1.0");
        for path in [
            "/v1/domains",
            "/v1/domains/{id}/analytics",
            "/v1/domains/{id}/exports",
            "/v1/exports/{id}/download",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path} missing");
        }
        let (status, body) = call(&app, "/v1/domains").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["code"], "UNAUTHORIZED");

        db.close(std::time::Duration::from_secs(5)).await.unwrap();
        tdb.drop_database().await.unwrap();
    }

    #[test]
    fn methods_outside_the_standard_set_are_labelled_other() {
        for (method, label) in [
            (Method::GET, "GET"),
            (Method::DELETE, "DELETE"),
            (Method::PATCH, "PATCH"),
            (Method::from_bytes(b"BREW").unwrap(), "other"),
            (Method::from_bytes(b"GETX1234").unwrap(), "other"),
        ] {
            assert_eq!(method_label(&method), label, "{method}");
        }
    }

    #[test]
    fn made_up_methods_and_paths_do_not_make_new_metric_series() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let app = Router::new()
            .route("/known", get(|| async { "ok" }))
            .layer(middleware::from_fn(route_metrics));
        let send = |method: &'static [u8], path: &'static str| {
            let app = app.clone();
            async move {
                app.oneshot(
                    Request::builder()
                        .method(Method::from_bytes(method).unwrap())
                        .uri(path)
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap()
            }
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                for i in 0..20 {
                    let method: &'static [u8] = Box::leak(format!("M{i}").into_bytes().into());
                    let path: &'static str = Box::leak(format!("/made-up/{i}").into());
                    send(method, path).await;
                }
                send(b"GET", "/known").await;
            })
        });
        let text = handle.render();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("http_requests_total{"))
            .collect();
        assert_eq!(series.len(), 2, "{series:#?}");
        assert!(
            series
                .iter()
                .any(|l| l.contains("method=\"other\"") && l.contains("route=\"unmatched\"")),
            "{series:#?}"
        );
        assert!(
            series
                .iter()
                .any(|l| l.contains("method=\"GET\"") && l.contains("route=\"/known\"")),
            "{series:#?}"
        );
    }

    #[tokio::test]
    async fn unmatched_routes_are_rate_limited_and_the_probes_are_not() {
        let tdb = TestDatabase::create().await.unwrap();
        let db = Database::connect(tdb.config(), "smartbeak-api-test")
            .await
            .unwrap();
        let config = ApiConfig::from_lookup(|var| match var {
            "RATE_LIMIT_PER_IP" => Some("2".to_owned()),
            _ => None,
        })
        .unwrap();
        let limiter = RateLimiter::new(config.rate_limit.clone(), None).unwrap();
        let app = app(AppState::new(db.clone(), config, limiter, None));
        let peer: std::net::SocketAddr = "192.0.2.44:1".parse().unwrap();
        let send = |method: &str, path: &str| {
            let mut request = Request::builder()
                .method(method)
                .uri(path)
                .body(Body::empty())
                .unwrap();
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            app.clone().oneshot(request)
        };
        assert_eq!(send("GET", "/nope").await.unwrap().status(), 404);
        let made_up = send("BREW", "/made/up").await.unwrap();
        assert_eq!(made_up.status(), 404);
        assert!(made_up.headers().contains_key("ratelimit"));
        let limited = send("GET", "/nope/again").await.unwrap();
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(limited.headers().contains_key("retry-after"));
        // The probes and the operational routes are not limited.
        for _ in 0..3 {
            assert_eq!(send("GET", "/healthz").await.unwrap().status(), 200);
            assert_eq!(send("GET", "/openapi.json").await.unwrap().status(), 200);
        }
        db.close(std::time::Duration::from_secs(5)).await.unwrap();
        tdb.drop_database().await.unwrap();
    }

    #[tokio::test]
    async fn the_limiter_and_the_concurrent_key_lookup_keep_401_429_and_200() {
        let tdb = TestDatabase::create().await.unwrap();
        let db = Database::connect(tdb.config(), "smartbeak-api-test")
            .await
            .unwrap();
        let config = ApiConfig::from_lookup(|var| match var {
            "RATE_LIMIT_PER_KEY" => Some("3".to_owned()),
            "RATE_LIMIT_PER_IP" => Some("3".to_owned()),
            _ => None,
        })
        .unwrap();
        let limiter = RateLimiter::new(config.rate_limit.clone(), None).unwrap();
        let state = AppState::new(db.clone(), config, limiter, None);
        let keys = std::sync::Arc::clone(&state.keys);
        let app = app(state);
        let org = crate::auth::create_org(&db, "router").await.unwrap();
        let good = crate::auth::create_key(&db, org, "good").await.unwrap();
        let send = |peer: &str, key: &str| app.clone().oneshot(domains_request(peer, Some(key)));
        let (a, b) = ("192.0.2.10:1", "192.0.2.11:1");

        let ok = send(a, &good.key).await.unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        assert!(
            ok.headers()["ratelimit"]
                .to_str()
                .unwrap()
                .contains("\"key\"")
        );

        // A bad-key flood from `a`: 401 while its IP quota lasts, then 429.
        for _ in 0..3 {
            let refused = send(a, "sbk_bad").await.unwrap();
            assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
            assert!(
                refused.headers()["ratelimit"]
                    .to_str()
                    .unwrap()
                    .contains("\"ip\"")
            );
        }
        let limited = send(a, "sbk_bad").await.unwrap();
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(limited.headers().contains_key("retry-after"));
        // The flood reached PostgreSQL once (the negative cache), and another client's bad
        // key is still a 401 (another key: the flooded one has spent its own key quota too).
        assert_eq!(
            send(b, "sbk_other_bad").await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
        let lookups = keys.db_lookups();
        assert_eq!(
            lookups, 3,
            "one lookup per key: the good one and the two bad ones"
        );

        // The good key is limited per key, not by the IP its neighbour exhausted.
        assert_eq!(send(a, &good.key).await.unwrap().status(), StatusCode::OK);
        assert_eq!(send(b, &good.key).await.unwrap().status(), StatusCode::OK);
        let over = send(a, &good.key).await.unwrap();
        assert_eq!(over.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            keys.db_lookups(),
            lookups,
            "the good key came from the cache"
        );
        db.close(std::time::Duration::from_secs(5)).await.unwrap();
        tdb.drop_database().await.unwrap();
    }

    /// The shared Redis (`REDIS_URL`, else `redis://127.0.0.1:6379`) behind a
    /// [`smartbeak_test_support::TcpForwarder`]: the forwarder and the api variables that point
    /// the limiter at it (a prefix of its own, and `extra`).
    fn redis_through_forwarder(
        extra: &[(&str, &str)],
    ) -> (smartbeak_test_support::TcpForwarder, Vec<(String, String)>) {
        use std::net::ToSocketAddrs as _;
        let shared = std::env::var("REDIS_URL")
            .ok()
            .filter(|url| !url.trim().is_empty())
            .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
        let info = redis::Client::open(shared.as_str())
            .unwrap()
            .get_connection_info()
            .clone();
        let redis::ConnectionAddr::Tcp(host, port) = info.addr() else {
            panic!("not a plain TCP redis URL: {shared}");
        };
        let target = (host.as_str(), *port)
            .to_socket_addrs()
            .unwrap()
            .next()
            .unwrap();
        let forwarder = smartbeak_test_support::TcpForwarder::start(target).unwrap();
        let (scheme, rest) = shared.split_once("://").unwrap();
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let userinfo = authority
            .rsplit_once('@')
            .map_or(String::new(), |(user, _)| format!("{user}@"));
        let url = format!("{scheme}://{userinfo}127.0.0.1:{}{path}", forwarder.port());
        let mut vars = vec![
            ("REDIS_URL".to_owned(), url),
            (
                "RATE_LIMIT_KEY_PREFIX".to_owned(),
                format!("sbtest:{}", uuid::Uuid::new_v4().simple()),
            ),
        ];
        vars.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        (forwarder, vars)
    }

    /// The app on a fresh database with the limiter on Redis (connected), configured by
    /// `vars`.
    async fn app_with_redis(vars: &[(String, String)]) -> (TestDatabase, Database, AppState) {
        let tdb = TestDatabase::create().await.unwrap();
        let db = Database::connect(tdb.config(), "smartbeak-api-test")
            .await
            .unwrap();
        let config = ApiConfig::from_lookup(|var| {
            vars.iter()
                .find(|(name, _)| name == var)
                .map(|(_, value)| value.clone())
        })
        .unwrap();
        let limiter = RateLimiter::new(config.rate_limit.clone(), config.redis.as_ref()).unwrap();
        assert!(
            limiter
                .wait_for_redis(std::time::Duration::from_secs(10))
                .await
        );
        let state = AppState::new(db.clone(), config, limiter, None);
        (tdb, db, state)
    }

    #[tokio::test]
    async fn the_key_lookup_starts_while_the_limiters_redis_call_is_held() {
        // Both run at once, or neither gets through: the forwarder holds the limiter's Redis
        // command (Hold) and a lock the test holds on `api_keys` blocks the key lookup, and
        // the test lets them go only once it has seen both, the lookup waiting in PostgreSQL
        // and the command held on its way to Redis. Code that looked the key up only after
        // the limiter's answer never starts the lookup (the reply is held); code that asked
        // the limiter only after the lookup never sends the command (the lookup is blocked):
        // either way a bounded wait (5 s) fails. The command timeout (20 s) is far beyond it,
        // so no fail-open decision can start the lookup late and pass.
        let (forwarder, vars) = redis_through_forwarder(&[("REDIS_COMMAND_TIMEOUT_MS", "20000")]);
        let (tdb, db, state) = app_with_redis(&vars).await;
        let app = app(state);
        let org = crate::auth::create_org(&db, "gate").await.unwrap();
        let key = crate::auth::create_key(&db, org, "uncached").await.unwrap();
        let pool = db.primary().clone();
        let mut holder = pool.begin().await.unwrap();
        sqlx::query("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *holder)
            .await
            .unwrap();
        forwarder.set_fault(smartbeak_test_support::Fault::Hold);
        let served = app
            .clone()
            .oneshot(domains_request("192.0.2.90:1", Some(&key.key)));
        let gate = async {
            let started = std::time::Instant::now();
            loop {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock' \
                     AND query ILIKE '%api_keys%'",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                if waiting == 1 {
                    break;
                }
                assert!(
                    started.elapsed() < std::time::Duration::from_secs(5),
                    "no key lookup in PostgreSQL while the limiter's Redis call was held: \
                     they do not run concurrently"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            // The lookup waits on the lock, still: the limiter's command must be on its way
            // already, not sent once the lookup is done.
            while forwarder.held_to_server() == 0 {
                assert!(
                    started.elapsed() < std::time::Duration::from_secs(5),
                    "no Redis command from the limiter while the key lookup was blocked: \
                     they do not run concurrently"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            // Both under way: the limiter's reply may come, then the lookup's.
            forwarder.restore();
            holder.commit().await.unwrap();
        };
        let (response, ()) = tokio::join!(served, gate);
        let response = response.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        // Redis decided (a fail-open answer would leave no counter there).
        let (_, prefix) = vars
            .iter()
            .find(|(name, _)| name == "RATE_LIMIT_KEY_PREFIX")
            .unwrap();
        let shared = std::env::var("REDIS_URL")
            .ok()
            .filter(|url| !url.trim().is_empty())
            .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
        let mut admin = redis::Client::open(shared.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let counters: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{{{prefix}}}:k:*"))
            .query_async(&mut admin)
            .await
            .unwrap();
        assert_eq!(counters.len(), 1, "{counters:?}");
        db.close(std::time::Duration::from_secs(5)).await.unwrap();
        tdb.drop_database().await.unwrap();
    }

    #[tokio::test]
    async fn the_spent_ip_shortcut_is_counted_as_its_own_backend_not_redis() {
        // With Redis as the limiter, three bad keys from one address spend its IP quota (3)
        // in Redis; a fourth uncached key from it is answered 429 from the process's memory
        // of the spent address, asking no limiter: `backend="spent_ip"`, not "redis".
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let (_forwarder, vars) = redis_through_forwarder(&[("RATE_LIMIT_PER_IP", "3")]);
        let (tdb, db, state) = app_with_redis(&vars).await;
        let app = app(state);
        let send = |key: String| {
            app.clone()
                .oneshot(domains_request("192.0.2.91:1", Some(&key)))
        };
        for i in 0..3 {
            let status = send(format!("sbk_spend_{i}")).await.unwrap().status();
            assert_eq!(status, StatusCode::UNAUTHORIZED);
        }
        let series = |text: &str, backend: &str| -> f64 {
            text.lines()
                .find(|l| {
                    l.starts_with("rate_limit_decisions_total{")
                        && l.contains("decision=\"limited\"")
                        && l.contains(&format!("backend=\"{backend}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .map_or(0.0, |v| v.parse().unwrap())
        };
        let before = handle.render();
        assert_eq!(series(&before, "redis"), 0.0, "{before}");
        let limited = send("sbk_spend_3".to_owned()).await.unwrap();
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        let after = handle.render();
        assert_eq!(
            series(&after, crate::ratelimit::SPENT_IP_BACKEND),
            1.0,
            "{after}"
        );
        assert_eq!(series(&after, "redis"), 0.0, "{after}");
        assert_eq!(series(&after, "local"), 0.0, "{after}");
        db.close(std::time::Duration::from_secs(5)).await.unwrap();
        tdb.drop_database().await.unwrap();
    }

    /// The app on a fresh database with an IP quota of 3 and no Redis, for the tests of how
    /// the IP quota meets the key cache.
    struct IpQuota {
        tdb: TestDatabase,
        db: Database,
        keys: std::sync::Arc<crate::auth_cache::KeyCache>,
        app: Router,
    }

    impl IpQuota {
        async fn new() -> Self {
            let tdb = TestDatabase::create().await.unwrap();
            let db = Database::connect(tdb.config(), "smartbeak-api-test")
                .await
                .unwrap();
            let config = ApiConfig::from_lookup(|var| match var {
                "RATE_LIMIT_PER_IP" => Some("3".to_owned()),
                _ => None,
            })
            .unwrap();
            let limiter = RateLimiter::new(config.rate_limit.clone(), None).unwrap();
            let state = AppState::new(db.clone(), config, limiter, None);
            let keys = std::sync::Arc::clone(&state.keys);
            Self {
                tdb,
                db,
                keys,
                app: app(state),
            }
        }

        /// `GET /v1/domains` from `peer`, with `key` as its bearer key when given.
        async fn send(&self, peer: &str, key: Option<&str>) -> Response {
            self.app
                .clone()
                .oneshot(domains_request(peer, key))
                .await
                .unwrap()
        }

        async fn finish(self) {
            self.db
                .close(std::time::Duration::from_secs(5))
                .await
                .unwrap();
            self.tdb.drop_database().await.unwrap();
        }
    }

    #[tokio::test]
    async fn unkeyed_requests_spending_the_ip_quota_do_not_lock_out_an_uncached_key() {
        let fx = IpQuota::new().await;
        let org = crate::auth::create_org(&fx.db, "nat").await.unwrap();
        let good = crate::auth::create_key(&fx.db, org, "good").await.unwrap();
        let peer = "192.0.2.70:1";
        // Unkeyed requests spend the address's quota (3) and then get 429...
        let mut statuses = Vec::new();
        for _ in 0..4 {
            statuses.push(fx.send(peer, None).await.status());
        }
        assert_eq!(
            statuses.last(),
            Some(&StatusCode::TOO_MANY_REQUESTS),
            "{statuses:?}"
        );
        // ...but a valid key behind the same address, not cached yet, is still served.
        assert_eq!(
            fx.send(peer, Some(&good.key)).await.status(),
            StatusCode::OK
        );
        fx.finish().await;
    }

    #[tokio::test]
    async fn distinct_bad_keys_after_the_ip_quota_is_spent_reach_no_database() {
        let fx = IpQuota::new().await;
        let org = crate::auth::create_org(&fx.db, "flood").await.unwrap();
        let good = crate::auth::create_key(&fx.db, org, "good").await.unwrap();
        let flooder = "192.0.2.60:1";
        // A cached good key from the flooder's address, before the flood.
        assert_eq!(
            fx.send(flooder, Some(&good.key)).await.status(),
            StatusCode::OK
        );
        let before = fx.keys.db_lookups();
        // The IP quota (3) pays for three distinct bad keys, each looked up once...
        for i in 0..3 {
            let status = fx
                .send(flooder, Some(&format!("sbk_bad_{i}")))
                .await
                .status();
            assert_eq!(status, StatusCode::UNAUTHORIZED, "bad key {i}");
        }
        assert_eq!(fx.keys.db_lookups(), before + 3);
        // ...and then 50 more distinct bad keys are 429 without a lookup.
        for i in 3..53 {
            let response = fx.send(flooder, Some(&format!("sbk_bad_{i}"))).await;
            assert_eq!(
                response.status(),
                StatusCode::TOO_MANY_REQUESTS,
                "bad key {i}"
            );
            assert!(response.headers().contains_key("retry-after"));
            assert!(
                response.headers()["ratelimit"]
                    .to_str()
                    .unwrap()
                    .starts_with("\"ip\";r=0;")
            );
        }
        assert_eq!(
            fx.keys.db_lookups(),
            before + 3,
            "a spent IP quota let bad keys reach PostgreSQL"
        );
        // A cached key from that address is still served; another address is untouched.
        assert_eq!(
            fx.send(flooder, Some(&good.key)).await.status(),
            StatusCode::OK
        );
        assert_eq!(
            fx.send("192.0.2.61:1", Some("sbk_other")).await.status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(fx.keys.db_lookups(), before + 4);
        fx.finish().await;
    }

    #[tokio::test]
    async fn a_burst_on_one_uncached_good_key_is_served_with_a_few_lookups() {
        // A hot key whose cache entry expired: every request of the burst arrives uncached
        // from one address. They share the address's lookup permits, and the ones that
        // waited find the key cached by the first: all are served, PostgreSQL sees at most
        // one lookup per permit.
        let fx = IpQuota::new().await;
        let org = crate::auth::create_org(&fx.db, "hot").await.unwrap();
        let good = crate::auth::create_key(&fx.db, org, "hot").await.unwrap();
        let before = fx.keys.db_lookups();
        let burst = (0..200).map(|_| fx.send("192.0.2.80:1", Some(&good.key)));
        let statuses: Vec<StatusCode> = futures::future::join_all(burst)
            .await
            .into_iter()
            .map(|r| r.status())
            .collect();
        assert!(
            statuses.iter().all(|s| *s == StatusCode::OK),
            "{statuses:?}"
        );
        let lookups = fx.keys.db_lookups() - before;
        assert!(
            lookups <= crate::ratelimit::UNCACHED_LOOKUPS_PER_IP as u64,
            "200 requests on one uncached key made {lookups} lookups"
        );
        fx.finish().await;
    }

    #[tokio::test]
    async fn a_concurrent_flood_of_distinct_bad_keys_costs_postgresql_about_the_ip_quota() {
        // The sequential flood above is stopped once the quota is spent; here 200 distinct
        // bad keys arrive at once, so none of them sees the quota spent before its lookup
        // unless uncached lookups from one address wait for each other.
        let fx = IpQuota::new().await;
        let before = fx.keys.db_lookups();
        let keys: Vec<String> = (0..200).map(|i| format!("sbk_flood_{i}")).collect();
        let flood = keys.iter().map(|key| fx.send("192.0.2.70:1", Some(key)));
        let statuses: Vec<StatusCode> = futures::future::join_all(flood)
            .await
            .into_iter()
            .map(|r| r.status())
            .collect();
        let unauthorized = statuses
            .iter()
            .filter(|s| **s == StatusCode::UNAUTHORIZED)
            .count();
        let limited = statuses
            .iter()
            .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
            .count();
        assert_eq!(unauthorized + limited, 200, "{statuses:?}");
        assert_eq!(unauthorized, 3, "the IP quota pays for three bad keys");
        let lookups = fx.keys.db_lookups() - before;
        assert!(
            lookups <= 3 + crate::ratelimit::UNCACHED_LOOKUPS_PER_IP as u64,
            "a concurrent flood of bad keys reached PostgreSQL {lookups} times"
        );
        // Another address is not held up by the flood's.
        assert_eq!(
            fx.send("192.0.2.71:1", Some("sbk_other")).await.status(),
            StatusCode::UNAUTHORIZED
        );
        fx.finish().await;
    }

    #[tokio::test]
    async fn a_request_whose_backend_was_terminated_gets_503_database_unavailable() {
        // Chaos scenario 3: `pg_terminate_backend` on the connection a request uses. One
        // pooled connection, never pinged on acquire (a long bypass). The request holds it,
        // its query waiting on a lock, when its backend is terminated: it sees what the
        // server said (57P01 admin_shutdown) or the closed socket, and no background task of
        // the api (the readiness checker, the key-usage flush) can have met the dead session
        // before it (they did, now and then, when the kill came between two requests).
        let tdb = TestDatabase::create().await.unwrap();
        let mut db_config = tdb.config();
        db_config.pool_min = 1;
        db_config.pool_max = 1;
        db_config.ping_bypass = std::time::Duration::from_secs(3600);
        let app_name = format!(
            "sbt-term-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let db = Database::connect(db_config, &app_name).await.unwrap();
        let config = ApiConfig::from_lookup(|_| None).unwrap();
        let limiter = RateLimiter::new(config.rate_limit.clone(), None).unwrap();
        let app = app(AppState::new(db.clone(), config, limiter, None));
        let org = crate::auth::create_org(&db, "terminated").await.unwrap();
        let key = crate::auth::create_key(&db, org, "k").await.unwrap();
        let send = || {
            app.clone()
                .oneshot(domains_request("192.0.2.50:1", Some(&key.key)))
        };
        // The key is cached now, so the next request's only query is the list.
        assert_eq!(send().await.unwrap().status(), StatusCode::OK);

        let admin = sqlx::PgPool::connect(tdb.url().expose()).await.unwrap();
        let mut locker = admin.begin().await.unwrap();
        sqlx::query("LOCK TABLE domains IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *locker)
            .await
            .unwrap();
        let request = tokio::spawn(send());
        let mut waiting = None;
        for _ in 0..250 {
            waiting = sqlx::query_scalar(
                "SELECT pid FROM pg_stat_activity WHERE application_name LIKE $1 || '%' \
                 AND wait_event_type = 'Lock'",
            )
            .bind(&app_name)
            .fetch_optional(&admin)
            .await
            .unwrap();
            if waiting.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let pool_pid: i32 = waiting.expect("the request's query never waited on the lock");
        let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pool_pid)
            .fetch_one(&admin)
            .await
            .unwrap();
        assert!(killed);
        locker.rollback().await.unwrap();

        let response = request.await.unwrap().unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(
            body,
            serde_json::json!({
                "error": "database unavailable, retry later",
                "code": "DATABASE_UNAVAILABLE",
            })
        );
        // The dead connection is gone: the next request is served on a new one.
        assert_eq!(send().await.unwrap().status(), StatusCode::OK);

        admin.close().await;
        db.close(std::time::Duration::from_secs(5)).await.unwrap();
        tdb.drop_database().await.unwrap();
    }

    #[tokio::test]
    async fn a_405_on_a_known_path_is_rate_limited_too() {
        let tdb = TestDatabase::create().await.unwrap();
        let db = Database::connect(tdb.config(), "smartbeak-api-test")
            .await
            .unwrap();
        let config = ApiConfig::from_lookup(|var| match var {
            "RATE_LIMIT_PER_IP" => Some("2".to_owned()),
            _ => None,
        })
        .unwrap();
        let limiter = RateLimiter::new(config.rate_limit.clone(), None).unwrap();
        let app = app(AppState::new(db.clone(), config, limiter, None));
        let peer: std::net::SocketAddr = "192.0.2.45:1".parse().unwrap();
        let send = |method: &str, path: &str| {
            let mut request = Request::builder()
                .method(method)
                .uri(path)
                .body(Body::empty())
                .unwrap();
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            app.clone().oneshot(request)
        };
        // A /v1 path and an operational one, with methods they do not serve: each charged
        // once, with the limiter's headers on the 405.
        let first = send("PATCH", "/v1/domains").await.unwrap();
        assert_eq!(first.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert!(first.headers().contains_key("ratelimit"));
        assert!(first.headers().contains_key("allow"));
        let second = send("DELETE", "/openapi.json").await.unwrap();
        assert_eq!(second.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert!(second.headers().contains_key("ratelimit"));
        for (method, path) in [
            ("POST", "/metrics"),
            ("PUT", "/v1/domains/00000000-0000-0000-0000-000000000000"),
        ] {
            let limited = send(method, path).await.unwrap();
            assert_eq!(
                limited.status(),
                StatusCode::TOO_MANY_REQUESTS,
                "{method} {path}"
            );
            assert!(limited.headers().contains_key("retry-after"));
        }
        // The methods a route serves (HEAD being its GET) are not charged here.
        for _ in 0..3 {
            assert_eq!(send("GET", "/openapi.json").await.unwrap().status(), 200);
            assert_eq!(send("HEAD", "/openapi.json").await.unwrap().status(), 200);
        }
        db.close(std::time::Duration::from_secs(5)).await.unwrap();
        tdb.drop_database().await.unwrap();
    }

    #[test]
    fn the_request_timeout_is_504_request_timeout_not_503_overloaded() {
        assert_eq!(ApiError::Timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(ApiError::Timeout.code(), "REQUEST_TIMEOUT");
        assert_eq!(
            ApiError::Overloaded.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(ApiError::Overloaded.code(), "OVERLOADED");
    }

    #[tokio::test]
    async fn a_bad_request_id_is_replaced_and_a_good_one_kept() {
        let app = Router::new()
            .route(
                "/id",
                get(|request: axum::extract::Request| async move {
                    request
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("none")
                        .to_owned()
                }),
            )
            .layer(
                ServiceBuilder::new()
                    .layer(middleware::map_request(drop_bad_request_id))
                    .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid)),
            );
        let seen = |ids: &[&str]| {
            let mut request = Request::get("/id");
            for id in ids {
                request = request.header("x-request-id", *id);
            }
            let request = request.body(Body::empty()).unwrap();
            let app = app.clone();
            async move {
                let response = app.oneshot(request).await.unwrap();
                let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
                    .await
                    .unwrap();
                String::from_utf8(bytes.to_vec()).unwrap()
            }
        };
        let good = "0b6c1f0e-3a5e-4c1b-9d0f-7e2a5b8c9d10";
        assert_eq!(seen(&[good]).await, good);
        assert_eq!(seen(&["trace:abc_1.2"]).await, "trace:abc_1.2");
        let long = "a".repeat(MAX_REQUEST_ID_LEN + 1);
        for bad in [
            &[long.as_str()][..],
            &["has space"],
            &["quote\"inject"],
            &["tab\tinside"],
            &["{\"json\":1}"],
            &["ok-1", "ok-2"],
        ] {
            let id = seen(bad).await;
            assert!(uuid::Uuid::parse_str(&id).is_ok(), "{bad:?} -> {id}");
        }
        assert!(uuid::Uuid::parse_str(&seen(&[]).await).is_ok());
    }

    #[tokio::test]
    async fn a_panic_is_the_json_500_not_a_dropped_connection() {
        let app = Router::new()
            .route(
                "/boom",
                get(|| async {
                    if true {
                        panic!("boom at {}", 42);
                    }
                    "unreachable"
                }),
            )
            .route(
                "/static",
                get(|| async {
                    if true {
                        std::panic::panic_any(7_u8);
                    }
                    "unreachable"
                }),
            )
            .layer(catch_panic());
        for path in ["/boom", "/static"] {
            let (status, body) = call(&app, path).await;
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{path}");
            assert_eq!(
                body,
                serde_json::json!({"error": "internal error", "code": "INTERNAL_ERROR"}),
                "{path}: the panic message stays in the log"
            );
        }
    }

    #[tokio::test]
    async fn the_body_limit_is_http_body_limit_bytes_also_above_axums_2_mib() {
        let tdb = TestDatabase::create().await.unwrap();
        let db = Database::connect(tdb.config(), "smartbeak-api-test")
            .await
            .unwrap();
        let org = crate::auth::create_org(&db, "big bodies").await.unwrap();
        let key = crate::auth::create_key(&db, org, "test").await.unwrap().key;
        let config = ApiConfig::from_lookup(|name| {
            (name == "HTTP_BODY_LIMIT_BYTES").then(|| "5000000".to_owned())
        })
        .unwrap();
        let limiter = RateLimiter::new(config.rate_limit.clone(), None).unwrap();
        let app = app(AppState::new(db.clone(), config, limiter, None));
        let post = |bytes: usize| {
            let body = format!("{{\"name\": \"{}\"}}", "a".repeat(bytes));
            Request::post("/v1/domains")
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap()
        };
        // 3 MB: over axum's default 2 MiB, under the configured 5 MB: read and parsed, so
        // the answer is about the name (too long), not the size.
        let response = app.clone().oneshot(post(3_000_000)).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["code"], "VALIDATION_ERROR", "{body}");
        assert!(
            body["error"].as_str().unwrap().starts_with("name:"),
            "{body}"
        );
        // 6 MB: over the configured limit.
        let response = app.clone().oneshot(post(6_000_000)).await.unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

        db.close(std::time::Duration::from_secs(5)).await.unwrap();
        tdb.drop_database().await.unwrap();
    }
}
