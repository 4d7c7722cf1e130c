//! Shared state of the request handlers: database pools, configuration, rate limiter,
//! readiness flag, metrics handle and the analytics read cache.

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use metrics_exporter_prometheus::PrometheusHandle;
use smartbeak_database::Database;

use crate::analytics::AnalyticsReads;
use crate::config::ApiConfig;
use crate::ratelimit::RateLimiter;

/// Cheap-to-clone handle on [`AppContext`], the axum state of every route.
#[derive(Clone)]
pub struct AppState(Arc<AppContext>);

/// Everything a handler may need.
pub struct AppContext {
    /// Primary and analytics pools.
    pub db: Database,
    /// The api's configuration.
    pub config: ApiConfig,
    /// The `/v1` rate limiter.
    pub limiter: Arc<RateLimiter>,
    /// Readiness: false once shutdown has begun.
    pub readiness: Readiness,
    /// Renders `/metrics`; `None` when no recorder is installed (some tests).
    pub metrics: Option<PrometheusHandle>,
    /// Single-flight + TTL cache in front of the analytics aggregates.
    pub analytics: AnalyticsReads,
}

impl AppState {
    /// Builds the state.
    pub fn new(
        db: Database,
        config: ApiConfig,
        limiter: Arc<RateLimiter>,
        metrics: Option<PrometheusHandle>,
    ) -> Self {
        let analytics = AnalyticsReads::new(
            config.analytics_cache_ttl,
            config.analytics_cache_max_bytes,
            config.analytics_top_n,
        );
        Self(Arc::new(AppContext {
            db,
            config,
            limiter,
            readiness: Readiness::default(),
            metrics,
            analytics,
        }))
    }
}

impl Deref for AppState {
    type Target = AppContext;

    fn deref(&self) -> &AppContext {
        &self.0
    }
}

/// Whether the process accepts new work; flipped once, at shutdown.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<AtomicBool>);

impl Default for Readiness {
    fn default() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }
}

impl Readiness {
    /// True until [`Readiness::shut_down`] is called.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Makes `/readyz` answer 503 from now on.
    pub fn shut_down(&self) {
        self.0.store(false, Ordering::Release);
    }
}
