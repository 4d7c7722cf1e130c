//! The router and its middleware: request ids in spans, HTTP metrics, a panic turned into
//! the JSON 500, body limit, per-request timeout, concurrency limit with load shedding, and
//! one JSON error shape for the answers that tower layers produce on their own.

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{BoxError, Router};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::error::ApiError;
use crate::ratelimit;
use crate::routes::{analytics, content, domains, exports, health, ingest, settings};
use crate::state::AppState;

/// The whole application: routes plus every layer. Serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()` so the limiter sees client IPs.
pub fn app(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/domains", get(domains::list).post(domains::create))
        .route("/domains/{id}", get(domains::get))
        .route(
            "/domains/{id}/content",
            get(content::list).post(content::create),
        )
        .route(
            "/domains/{id}/settings",
            get(settings::get).put(settings::put),
        )
        .route("/domains/{id}/metrics", axum::routing::post(ingest::ingest))
        .route("/domains/{id}/analytics", get(analytics::get))
        .route(
            "/domains/{id}/exports",
            get(exports::list).post(exports::create),
        )
        .route("/exports/{id}", get(exports::get).delete(exports::cancel))
        .route("/exports/{id}/download", get(exports::download))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state.limiter),
            ratelimit::middleware,
        ));

    let http = state.config.http.clone();
    let routes = Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(crate::openapi::serve))
        .nest("/v1", v1)
        .fallback(|| async { ApiError::NotFound("route") })
        .layer(middleware::from_fn(route_metrics))
        .with_state(state);

    // Layers around the whole router (not per route, which would give each route its own
    // concurrency limit): outermost first.
    let stack = ServiceBuilder::new()
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
        .layer(RequestBodyLimitLayer::new(http.body_limit_bytes))
        // axum's extractors have a 2 MiB limit of their own; HTTP_BODY_LIMIT_BYTES (the
        // layer above) is the one limit, larger or smaller.
        .layer(DefaultBodyLimit::disable())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            http.request_timeout,
        ))
        .service(routes);
    Router::new().fallback_service(stack)
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
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Gives the bare answers of tower layers (413 from the body limit, 503 from the timeout,
/// 405 from routing) the JSON error shape.
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
        StatusCode::SERVICE_UNAVAILABLE => ApiError::Timeout,
        StatusCode::METHOD_NOT_ALLOWED => {
            let mut r = (
                status,
                axum::Json(crate::error::ErrorBody {
                    error: "method not allowed".into(),
                    code: "METHOD_NOT_ALLOWED".into(),
                }),
            )
                .into_response();
            if let Some(allow) = response.headers().get(header::ALLOW) {
                r.headers_mut().insert(header::ALLOW, allow.clone());
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
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use axum::body::Body;
    use axum::http::Request;
    use smartbeak_database::Database;
    use smartbeak_database::testing::TestDatabase;
    use tower::ServiceExt;

    use super::*;
    use crate::config::ApiConfig;
    use crate::ratelimit::RateLimiter;

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
        assert_eq!(body["error"], "not ready: shutdown");
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
