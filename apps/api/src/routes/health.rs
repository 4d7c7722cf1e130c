//! Operational endpoints: `/healthz` (alive), `/readyz` (the database reachable at the
//! background checker's last ping and not shutting down; says which read source serves
//! analytics and how Redis is), `/metrics` (Prometheus). The probes are served outside the
//! load shedder, the concurrency limit and the request timeout (`http::app`).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::state::{AppState, DatabaseState};

/// `/healthz` body.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// `/readyz` body.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: String,
    /// `ok` or `unreachable`.
    pub database: String,
    /// `replica` or `primary`: which database serves analytics reads.
    pub analytics_reads: String,
    /// `up`, `down` (the limiter fails open or closed) or `disabled` (no `REDIS_URL`).
    pub redis: String,
    /// `true` once shutdown has begun.
    pub shutting_down: bool,
    /// On 503: `not ready: database` or `not ready: shutting down`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// On 503: `NOT_READY`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Ready to serve: 503 while the database is unreachable or once shutdown has begun.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let shutting_down = !state.readiness.is_ready();
    // The background checker's last result; only before its first check does the probe
    // ping (once per process start, bounded by the acquire timeout).
    let database_ok = match state.readiness.database() {
        DatabaseState::Ok => true,
        DatabaseState::Unreachable => false,
        DatabaseState::Unknown if shutting_down => false,
        DatabaseState::Unknown => {
            let ok = state.pinger.ping().await.is_ok();
            state.readiness.record_database(ok);
            ok
        }
    };
    let failed = if shutting_down {
        Some("shutting down")
    } else if !database_ok {
        Some("database")
    } else {
        None
    };
    let body = Readiness {
        status: if failed.is_some() {
            "not_ready"
        } else {
            "ready"
        }
        .into(),
        database: if database_ok { "ok" } else { "unreachable" }.into(),
        analytics_reads: state.db.read_source().as_str().into(),
        redis: state.limiter.redis_health().as_str().into(),
        shutting_down,
        error: failed.map(|f| format!("not ready: {f}")),
        code: failed.map(|_| "NOT_READY".into()),
    };
    let status = if failed.is_some() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

/// Appends the database layer's acquire latency histogram, kept as cumulative counts by
/// `smartbeak-database`, in the Prometheus text format.
fn render_acquire_histogram(text: &mut String, db: &smartbeak_database::PoolMetrics) {
    use std::fmt::Write;
    let name = "db_acquire_seconds";
    let _ = writeln!(
        text,
        "# HELP {name} Time to check out a database connection (every acquire, both pools)."
    );
    let _ = writeln!(text, "# TYPE {name} histogram");
    for (le, count) in &db.acquire_seconds_buckets {
        let _ = writeln!(text, "{name}_bucket{{le=\"{le}\"}} {count}");
    }
    let _ = writeln!(text, "{name}_bucket{{le=\"+Inf\"}} {}", db.acquires_total);
    let _ = writeln!(text, "{name}_sum {}", db.acquire_seconds_sum);
    let _ = writeln!(text, "{name}_count {}", db.acquires_total);
}

/// Prometheus text exposition of every metric of the process.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let db = state.db.metrics();
    let pools = [("primary", Some(db.primary)), ("analytics", db.analytics)];
    for (pool, stats) in pools {
        let Some(stats) = stats else { continue };
        metrics::gauge!("db_pool_connections", "pool" => pool, "state" => "in_use")
            .set(f64::from(stats.in_use));
        metrics::gauge!("db_pool_connections", "pool" => pool, "state" => "idle")
            .set(f64::from(stats.idle));
        metrics::gauge!("db_pool_max_connections", "pool" => pool).set(f64::from(stats.max));
    }
    let replica = db.read_source == smartbeak_database::ReadSource::Replica;
    metrics::gauge!("db_analytics_replica_in_use").set(if replica { 1.0 } else { 0.0 });
    metrics::gauge!("db_pool_waiters").set(db.waiters as f64);
    // The database layer's own counters (every query runs through `Database::run`).
    metrics::counter!("db_query_errors_total").absolute(db.query_errors_total);
    metrics::counter!("db_query_timeouts_total").absolute(db.query_timeouts_total);
    metrics::counter!("db_acquire_timeouts_total").absolute(db.acquire_timeouts_total);
    metrics::counter!("db_analytics_init_attempts_total")
        .absolute(db.analytics_init_attempts_total);
    metrics::counter!("db_analytics_init_failures_total")
        .absolute(db.analytics_init_failures_total);
    metrics::counter!("db_analytics_replica_drops_total")
        .absolute(db.analytics_replica_drops_total);
    let mut text = state
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    if state.metrics.is_some() {
        render_acquire_histogram(&mut text, &db);
    }
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
