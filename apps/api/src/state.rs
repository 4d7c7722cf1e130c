//! Shared state of the request handlers: database pools, configuration, rate limiter,
//! readiness flag, metrics handle and the analytics read cache.

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use smartbeak_database::{Database, Pinger};

use crate::analytics::AnalyticsReads;
use crate::auth_cache::KeyCache;
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
    /// The in-process API key cache (its listener is started by the binary).
    pub keys: Arc<KeyCache>,
    /// Readiness pings on a connection of their own, outside the pools (a saturated pool is
    /// not an unreachable database).
    pub pinger: Pinger,
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
        let keys = Arc::new(KeyCache::new(&config.auth_cache));
        let readiness = Readiness::default();
        let pinger = db.pinger();
        readiness.spawn_database_checker(pinger.clone(), DATABASE_CHECK_EVERY);
        Self(Arc::new(AppContext {
            db,
            config,
            limiter,
            readiness,
            metrics,
            analytics,
            keys,
            pinger,
        }))
    }
}

impl Deref for AppState {
    type Target = AppContext;

    fn deref(&self) -> &AppContext {
        &self.0
    }
}

/// How often the background checker pings the database for `/readyz`.
pub const DATABASE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// What `/readyz` reads: the shutdown flag (flipped once) and the database's state as the
/// background checker last saw it, so a probe never waits on a saturated pool
/// (and the checker pings on a connection of its own, [`Pinger`]).
#[derive(Debug, Clone)]
pub struct Readiness(Arc<ReadinessState>);

#[derive(Debug)]
struct ReadinessState {
    accepting: AtomicBool,
    database: AtomicU8,
}

/// The database as the background checker last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseState {
    /// Not checked yet.
    Unknown,
    /// The last ping answered.
    Ok,
    /// The last ping failed.
    Unreachable,
}

impl Default for Readiness {
    fn default() -> Self {
        Self(Arc::new(ReadinessState {
            accepting: AtomicBool::new(true),
            database: AtomicU8::new(0),
        }))
    }
}

impl Readiness {
    /// True until [`Readiness::shut_down`] is called.
    pub fn is_ready(&self) -> bool {
        self.0.accepting.load(Ordering::Acquire)
    }

    /// Makes `/readyz` answer 503 "shutting down" from now on; the checker stops.
    pub fn shut_down(&self) {
        self.0.accepting.store(false, Ordering::Release);
    }

    /// The database's state at the last check.
    pub fn database(&self) -> DatabaseState {
        match self.0.database.load(Ordering::Acquire) {
            1 => DatabaseState::Ok,
            2 => DatabaseState::Unreachable,
            _ => DatabaseState::Unknown,
        }
    }

    /// Records a check's result.
    pub fn record_database(&self, reachable: bool) {
        self.0
            .database
            .store(if reachable { 1 } else { 2 }, Ordering::Release);
    }

    /// Pings through `pinger` (its own connection, outside the pools) now and then every
    /// `every`, each ping bounded by the acquire timeout, recording the result, until
    /// shutdown or until every other handle is dropped.
    fn spawn_database_checker(&self, pinger: Pinger, every: Duration) {
        let weak = Arc::downgrade(&self.0);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(state) = weak.upgrade().map(Readiness) else {
                    return;
                };
                if !state.is_ready() {
                    return;
                }
                let reachable = pinger.ping().await.is_ok();
                state.record_database(reachable);
            }
        });
    }
}
