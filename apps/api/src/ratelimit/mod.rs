//! Rate limiting of `/v1`: a per-API-key and a per-client-IP quota, checked together.
//!
//! With `REDIS_URL` set the quotas are shared by every replica through one GCRA Lua script
//! (`ratelimit/redis.rs`, `gcra.lua`); when Redis fails the limiter fails open onto the in-process limiter
//! (`ratelimit/local.rs`, limits divided by the replica count) or, with `RATE_LIMIT_FAIL_CLOSED=true`,
//! answers 503. Without `REDIS_URL` the in-process limiter is the limiter.
//! Responses carry the IETF `RateLimit-Policy` / `RateLimit` fields (draft-10 syntax).

mod local;
mod redis;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;

use self::local::{LocalLimiter, PolicyCheck};
use self::redis::{KeyLimit, KeyState, RedisBackend};
use crate::auth::{PresentedKey, ResolvedKey};
use crate::config::{RateLimitConfig, RedisConfig};
use crate::error::ApiError;
use crate::state::AppState;

/// Who a request is counted against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// Hex id of the presented API key (a truncated SHA-256), if any.
    pub key_id: Option<String>,
    /// The client IP's quota bucket ([`quota_ip`]: IPv6 by /64, IPv4-mapped as IPv4);
    /// `None` for a request with a key (limited per key only, until its key fails).
    pub ip: Option<IpAddr>,
}

/// Whether a request may proceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Within every quota.
    Allowed,
    /// Over a quota: 429.
    Limited,
    /// Redis failed and the limiter is fail-closed: 503.
    Unavailable,
}

/// One quota applied to a request: its policy (for `RateLimit-Policy`) and, when it was
/// consulted, its state after the check (for `RateLimit`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaState {
    /// Policy name: `key` or `ip`.
    pub name: &'static str,
    /// Requests per window.
    pub limit: u32,
    /// Window in seconds.
    pub window_secs: u64,
    /// The state after the check; `None` when the quota was not consulted (the in-process
    /// fallback stops at the first quota that refuses), and then `RateLimit` leaves it out.
    pub usage: Option<QuotaUsage>,
}

/// Where a consulted quota stands: the `r` and `t` of the `RateLimit` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaUsage {
    /// Requests left now (`r`).
    pub remaining: u64,
    /// Seconds until the quota regains its next unit (`t`, draft-10 §4.1.2: "until
    /// additional quota ... is made available"), rounded up: with no request left it equals
    /// `Retry-After`; with some left, when one more comes back; 0 when the quota is full.
    pub next_secs: u64,
}

/// The limiter's answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allowed, limited or unavailable.
    pub outcome: Outcome,
    /// One entry per applicable quota.
    pub quotas: Vec<QuotaState>,
    /// Delta-seconds for `Retry-After` (set on `Limited` and `Unavailable`).
    pub retry_after_secs: Option<u64>,
}

/// Who made a decision of [`RateLimiter::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecidedBy {
    /// The script in Redis.
    Redis,
    /// The in-process limiter, with no Redis configured.
    Local,
    /// Redis failed: the fail-open fallback (the in-process limiter) or the fail-closed 503.
    Fallback,
}

/// State of the Redis connection, for `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisHealth {
    /// No `REDIS_URL`: the in-process limiter is in use.
    Disabled,
    /// Connected, breaker closed.
    Up,
    /// Disconnected or breaker open: failing open (or closed) right now.
    Down,
}

impl RedisHealth {
    /// `disabled`, `up` or `down`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

/// The rate limiter shared by all requests.
pub struct RateLimiter {
    config: RateLimitConfig,
    redis: Option<RedisBackend>,
    local: LocalLimiter,
    warnings: WarnThrottle,
    /// Client IPs whose quota this process saw spent, until when (see [`SpentIps`]).
    spent: SpentIps,
    /// Uncached key lookups in flight per client address (see [`LookupStripes`]).
    lookups: LookupStripes,
}

/// Bounds the uncached key lookups one client address has in flight to
/// [`UNCACHED_LOOKUPS_PER_IP`]: a keyed request whose key is not in the key cache takes a
/// permit of its address's stripe before it reaches PostgreSQL, and holds it until its key
/// is known good, or, for a failed key, until the failure has been charged to the IP quota
/// (and the IP marked spent when that was its last unit). A request that waited re-checks
/// [`SpentIps`] first, so a concurrent flood of distinct bad keys from one address costs
/// PostgreSQL at most the IP quota plus the permits in lookups, not one per request in
/// flight. Addresses share a fixed set of stripes (hashed), so memory stays bounded: an
/// address whose stripe a flooder shares waits for it only on its own cache misses, and
/// never longer than the request's deadline.
struct LookupStripes {
    stripes: Box<[Arc<tokio::sync::Semaphore>]>,
    hasher: std::collections::hash_map::RandomState,
}

/// How many stripes [`LookupStripes`] spreads the client addresses over.
const LOOKUP_STRIPES: usize = 256;

impl LookupStripes {
    fn new() -> Self {
        Self {
            stripes: (0..LOOKUP_STRIPES)
                .map(|_| Arc::new(tokio::sync::Semaphore::new(UNCACHED_LOOKUPS_PER_IP)))
                .collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// A permit of `ip`'s stripe, once one is free.
    async fn acquire(&self, ip: IpAddr) -> Option<tokio::sync::OwnedSemaphorePermit> {
        use std::hash::BuildHasher as _;
        let index = usize::try_from(self.hasher.hash_one(ip) % LOOKUP_STRIPES as u64).ok()?;
        let stripe = self.stripes.get(index)?;
        // The semaphores are never closed.
        Arc::clone(stripe).acquire_owned().await.ok()
    }
}

/// The client IPs whose quota this process last saw spent by failed keys (a bad key's 429,
/// or the bad key that took the last unit), and until when: a keyed request from one of them whose key is
/// not in the key cache is answered 429 before any lookup, so a flood of distinct bad keys
/// from one client costs PostgreSQL at most the IP quota in lookups. Bounded (the most
/// recently spent IPs); a forgotten one costs one more lookup before it is remembered again.
struct SpentIps {
    until: quick_cache::sync::Cache<IpAddr, (Instant, u32)>,
}

/// Uncached key lookups one client address may have in flight at once (see
/// the limiter's lookup stripes).
pub const UNCACHED_LOOKUPS_PER_IP: usize = 4;

/// How many spent client IPs a process remembers.
const SPENT_IPS_CAPACITY: usize = 10_000;

impl SpentIps {
    fn new() -> Self {
        Self {
            until: quick_cache::sync::Cache::new(SPENT_IPS_CAPACITY),
        }
    }

    /// Remembers `ip` as spent when `decision` (of a check of `ip` alone) refused it or
    /// took its last unit.
    fn record(&self, ip: IpAddr, decision: &Decision) {
        let Some(quota) = decision.quotas.iter().find(|q| q.name == "ip") else {
            return;
        };
        let wait_secs = match (decision.outcome, quota.usage) {
            (Outcome::Limited, _) => decision.retry_after_secs.unwrap_or(1),
            (Outcome::Allowed, Some(usage)) if usage.remaining == 0 => usage.next_secs,
            _ => return,
        };
        if wait_secs > 0 {
            self.until.insert(
                ip,
                (Instant::now() + Duration::from_secs(wait_secs), quota.limit),
            );
        }
    }

    /// The 429 decision for `ip` if its quota is still spent.
    fn limited(&self, ip: IpAddr, window_secs: u64) -> Option<Decision> {
        let (until, limit) = self.until.get(&ip)?;
        let now = Instant::now();
        if until <= now {
            self.until.remove(&ip);
            return None;
        }
        let wait_secs = u64::try_from(until.duration_since(now).as_millis().div_ceil(1000))
            .unwrap_or(u64::MAX)
            .max(1);
        Some(Decision {
            outcome: Outcome::Limited,
            quotas: vec![QuotaState {
                name: "ip",
                limit,
                window_secs,
                usage: Some(QuotaUsage {
                    remaining: 0,
                    next_secs: wait_secs,
                }),
            }],
            retry_after_secs: Some(wait_secs),
        })
    }
}

/// The `backend` label of the 429s answered from the process's memory of client IPs whose
/// quota it saw spent by failed keys, with no limiter asked: a label value of its own, so that
/// `backend="redis"` counts only what Redis decided (and `backend="local"` only what the
/// in-process limiter decided).
pub const SPENT_IP_BACKEND: &str = "spent_ip";

const POLICY_KEY: usize = 0;
const POLICY_IP: usize = 1;
const WARNING_INTERVAL: Duration = Duration::from_secs(10);

impl RateLimiter {
    /// Builds the limiter; with `redis` set it starts connecting in the background and
    /// returns at once. Must be called inside a Tokio runtime.
    pub fn new(
        config: RateLimitConfig,
        redis: Option<&RedisConfig>,
    ) -> Result<Arc<Self>, ::redis::RedisError> {
        let redis = redis.map(RedisBackend::start).transpose()?;
        let local = LocalLimiter::new(
            &[config.per_key, config.per_ip],
            config.window,
            if redis.is_some() { config.replicas } else { 1 },
        );
        let limiter = Arc::new(Self {
            config,
            redis,
            local,
            warnings: WarnThrottle::new(WARNING_INTERVAL),
            spent: SpentIps::new(),
            lookups: LookupStripes::new(),
        });
        let weak = Arc::downgrade(&limiter);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(limiter) => limiter.local.retain_recent(),
                    None => return,
                }
            }
        });
        Ok(limiter)
    }

    /// The 429 for `ip` when this process remembers its quota spent ([`SpentIps`]), counted
    /// as a decision of its own backend, [`SPENT_IP_BACKEND`]: neither Redis nor the
    /// in-process limiter was asked.
    fn spent_shortcut(&self, ip: IpAddr) -> Option<Decision> {
        let decision = self.spent.limited(ip, self.config.window.as_secs())?;
        record(Outcome::Limited, SPENT_IP_BACKEND, false);
        Some(decision)
    }

    /// True unless `RATE_LIMIT_ENABLED=false`.
    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// `redis` when Redis holds the quotas, `in-process` otherwise.
    pub fn backend_name(&self) -> &'static str {
        if self.redis.is_some() {
            "redis"
        } else {
            "in-process"
        }
    }

    /// Describes the limiter's metrics and registers at 0 every series this configuration
    /// can record: each `(decision, backend)` of `rate_limit_decisions_total` the
    /// [`Self::check`] paths reach (in-process only; or Redis, with the fail-open or the
    /// fail-closed fallback), and with Redis `redis_connection_error_total` for every
    /// `kind`. A first failed-open decision is then an increase from 0, which the alerts'
    /// `increase()` sees, instead of a new series. Call once, after the recorder is
    /// installed.
    pub fn register_metrics(&self) {
        metrics::describe_counter!(
            "rate_limit_decisions_total",
            "rate-limit decisions by decision and backend"
        );
        if !self.config.enabled {
            return;
        }
        count_decision(Outcome::Limited, SPENT_IP_BACKEND, false, 0);
        let Some(redis) = &self.redis else {
            count_decision(Outcome::Allowed, "local", false, 0);
            count_decision(Outcome::Limited, "local", false, 0);
            return;
        };
        count_decision(Outcome::Allowed, "redis", false, 0);
        count_decision(Outcome::Limited, "redis", false, 0);
        if self.config.fail_closed {
            count_decision(Outcome::Unavailable, "redis", true, 0);
        } else {
            count_decision(Outcome::Allowed, "local", true, 0);
            count_decision(Outcome::Limited, "local", true, 0);
        }
        redis.register_metrics();
    }

    /// Redis connection state for `/readyz`.
    pub fn redis_health(&self) -> RedisHealth {
        match &self.redis {
            None => RedisHealth::Disabled,
            Some(redis) if redis.is_healthy() => RedisHealth::Up,
            Some(_) => RedisHealth::Down,
        }
    }

    /// Waits until Redis is connected, at most `bound`; true if it is (or is not configured).
    /// The server calls it once before it starts listening, so its first requests are
    /// limited in Redis rather than failing open while the connection is being made.
    pub async fn wait_for_redis(&self, bound: Duration) -> bool {
        let Some(redis) = &self.redis else {
            return true;
        };
        let deadline = Instant::now() + bound;
        while !redis.is_healthy() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Checks (and, if allowed, consumes) one request of `client`.
    pub async fn check(&self, client: &ClientIdentity) -> Decision {
        self.check_decided(client).await.0
    }

    /// [`Self::check`], and who decided: the tests tell a decision of Redis from one of the
    /// in-process limiter that happens to agree with it.
    pub(crate) async fn check_decided(&self, client: &ClientIdentity) -> (Decision, DecidedBy) {
        let Some(redis) = &self.redis else {
            let decision = self.check_local(client);
            record(decision.outcome, "local", false);
            return (decision, DecidedBy::Local);
        };
        let prefix = &self.config.key_prefix;
        let mut keys = Vec::with_capacity(2);
        let mut policies = Vec::with_capacity(2);
        if let Some(key_id) = &client.key_id {
            keys.push(KeyLimit {
                key: format!("{{{prefix}}}:k:{key_id}"),
                limit: self.config.per_key,
            });
            policies.push(POLICY_KEY);
        }
        if let Some(ip) = client.ip {
            keys.push(KeyLimit {
                key: format!("{{{prefix}}}:ip:{ip}"),
                limit: self.config.per_ip,
            });
            policies.push(POLICY_IP);
        }

        match redis.check(&keys, self.config.window).await {
            Ok(outcome) => {
                let quotas = policies
                    .iter()
                    .zip(&keys)
                    .zip(&outcome.keys)
                    .map(|((&policy, key), state)| self.quota(policy, key.limit, Some(state)))
                    .collect();
                let decision = self.decision(outcome.allowed, quotas, &outcome.keys);
                record(decision.outcome, "redis", false);
                (decision, DecidedBy::Redis)
            }
            Err(kind) => {
                self.warn_failure(kind.as_str());
                if self.config.fail_closed {
                    record(Outcome::Unavailable, "redis", true);
                    let decision = Decision {
                        outcome: Outcome::Unavailable,
                        quotas: Vec::new(),
                        retry_after_secs: Some(1),
                    };
                    return (decision, DecidedBy::Fallback);
                }
                let decision = self.check_local(client);
                record(decision.outcome, "local", true);
                (decision, DecidedBy::Fallback)
            }
        }
    }

    fn check_local(&self, client: &ClientIdentity) -> Decision {
        let ip = client.ip.map(|ip| ip.to_string());
        let (allowed, checks) = self.local.check(&[client.key_id.as_deref(), ip.as_deref()]);
        let mut quotas = Vec::new();
        let mut consulted = Vec::new();
        for (policy, check) in checks.iter().enumerate() {
            let state = match check {
                PolicyCheck::NotApplicable => continue,
                PolicyCheck::NotConsulted => None,
                PolicyCheck::Checked(state) => {
                    consulted.push(*state);
                    Some(state)
                }
            };
            quotas.push(self.quota(policy, self.local.limit(policy), state));
        }
        self.decision(allowed, quotas, &consulted)
    }

    fn quota(&self, policy: usize, limit: u32, state: Option<&KeyState>) -> QuotaState {
        QuotaState {
            name: if policy == POLICY_KEY { "key" } else { "ip" },
            limit,
            window_secs: self.config.window.as_secs(),
            usage: state.map(|state| QuotaUsage {
                remaining: state.remaining,
                next_secs: state.next_ms.div_ceil(1000),
            }),
        }
    }

    fn decision(&self, allowed: bool, quotas: Vec<QuotaState>, states: &[KeyState]) -> Decision {
        if allowed {
            return Decision {
                outcome: Outcome::Allowed,
                quotas,
                retry_after_secs: None,
            };
        }
        let retry_ms = states.iter().map(|s| s.retry_ms).max().unwrap_or(1000);
        Decision {
            outcome: Outcome::Limited,
            quotas,
            retry_after_secs: Some(retry_ms.div_ceil(1000).max(1)),
        }
    }

    fn warn_failure(&self, kind: &'static str) {
        if self.warnings.should_warn(Instant::now()) {
            if self.config.fail_closed {
                tracing::warn!(kind, "redis rate limiter unavailable, failing closed (503)");
            } else {
                tracing::warn!(
                    kind,
                    "redis rate limiter unavailable, failing open onto the in-process limiter"
                );
            }
        }
    }
}

/// At most one warning per interval, decided without a lock: every request that finds
/// Redis down asks, so under load this is on the hot path of every request.
#[derive(Debug)]
pub(crate) struct WarnThrottle {
    origin: Instant,
    interval_ms: u64,
    /// Milliseconds after `origin` of the last warning, plus one; 0 before the first.
    last: AtomicU64,
}

impl WarnThrottle {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            origin: Instant::now(),
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            last: AtomicU64::new(0),
        }
    }

    /// True for the one caller that gets to warn at `now` (none again for an interval).
    pub(crate) fn should_warn(&self, now: Instant) -> bool {
        let now_ms = u64::try_from(now.saturating_duration_since(self.origin).as_millis())
            .unwrap_or(u64::MAX - 1)
            + 1;
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now_ms.saturating_sub(last) < self.interval_ms {
            return false;
        }
        self.last
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

/// Counts one decision in `rate_limit_decisions_total{decision, backend}`.
fn record(outcome: Outcome, backend: &'static str, redis_failed: bool) {
    count_decision(outcome, backend, redis_failed, 1);
}

fn count_decision(outcome: Outcome, backend: &'static str, redis_failed: bool, n: u64) {
    let decision = match (outcome, redis_failed) {
        (Outcome::Allowed, false) => "allowed",
        (Outcome::Allowed, true) => "failed_open",
        (Outcome::Limited, _) => "limited",
        (Outcome::Unavailable, _) => "failed_closed",
    };
    metrics::counter!("rate_limit_decisions_total", "decision" => decision, "backend" => backend)
        .increment(n);
}

impl Decision {
    /// Adds `RateLimit-Policy` (every applicable quota), `RateLimit` (every consulted
    /// quota) and (when set) `Retry-After` to `headers`.
    pub fn apply_headers(&self, headers: &mut HeaderMap) {
        if !self.quotas.is_empty() {
            let policy = self
                .quotas
                .iter()
                .map(|q| format!("\"{}\";q={};w={}", q.name, q.limit, q.window_secs))
                .collect::<Vec<_>>()
                .join(", ");
            if let Ok(value) = HeaderValue::from_str(&policy) {
                headers.insert("ratelimit-policy", value);
            }
        }
        let state = self
            .quotas
            .iter()
            .filter_map(|q| {
                let usage = q.usage?;
                Some(format!(
                    "\"{}\";r={};t={}",
                    q.name, usage.remaining, usage.next_secs
                ))
            })
            .collect::<Vec<_>>()
            .join(", ");
        if !state.is_empty()
            && let Ok(value) = HeaderValue::from_str(&state)
        {
            headers.insert("ratelimit", value);
        }
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
    }
}

/// Axum middleware: limits the request, answers 429/503 or runs it and adds the headers.
///
/// A request with a key counts against that key's quota only (behind a load balancer every
/// tenant shares one address); one without a key, or whose key fails authentication (a
/// 401), counts against its client IP's quota: a flood of bad keys is limited by IP.
///
/// The limiter's call needs only the key's hash, so it runs concurrently with the key
/// lookup (`auth_cache`; on a cache hit the lookup is immediate). The limiter's answer
/// comes first as before: a limited or fail-closed request gets 429/503 whatever its key;
/// an allowed one carries the lookup's outcome to the `Auth` extractor ([`ResolvedKey`]),
/// which answers 401 for a bad key. A lookup that failed is not carried: the extractor
/// looks again and answers with that error.
///
/// The IP quota is decisive over the lookup of a key the cache does not know: once this
/// process has seen a client IP's quota spent by failed keys (a bad key's 429, or the bad
/// key that took the last unit), a keyed request from it whose key is not cached gets 429 at
/// once, with no lookup and no limiter call, until the quota regains a unit. So a flood of
/// distinct bad keys sent one after another from one client reaches PostgreSQL at most the
/// IP quota's worth of times per replica (requests already in flight when the quota runs out
/// are still looked up). Unkeyed traffic spending the IP quota marks nothing. The price,
/// during a bad-key flood only: another tenant behind the same address whose key is not
/// cached right then (a key stays cached for `AUTH_CACHE_TTL_MS`) gets the 429 too.
pub async fn middleware(State(state): State<AppState>, request: Request, next: Next) -> Response {
    limit(&state.limiter, Some(&state), request, next).await
}

/// [`middleware`] without the key lookup (the `Auth` extractor looks the key up itself): for
/// tests of the limiter's decisions on a router with no database.
#[cfg(test)]
pub(crate) async fn limiter_only(
    State(limiter): State<Arc<RateLimiter>>,
    request: Request,
    next: Next,
) -> Response {
    limit(&limiter, None, request, next).await
}

/// The limiter's decision for one request, with the key looked up concurrently when `state`
/// is given (see [`middleware`]).
async fn limit(
    limiter: &RateLimiter,
    state: Option<&AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let presented = PresentedKey::from_headers(request.headers());
    let ip = quota_ip(client_ip(&request, &limiter.config.trusted_proxies));
    let client = ClientIdentity {
        key_id: presented.as_ref().map(PresentedKey::limiter_id),
        ip: if presented.is_some() { None } else { Some(ip) },
    };
    let keyed = presented.is_some();
    let uncached = matches!((&presented, state), (Some(presented), Some(state)) if !state.keys.is_cached(presented));
    let spent = || {
        let decision = limiter.spent_shortcut(ip)?;
        let mut response = ApiError::RateLimited.into_response();
        decision.apply_headers(response.headers_mut());
        Some(response)
    };
    if limiter.enabled()
        && uncached
        && let Some(response) = spent()
    {
        return response;
    }
    let lookup = async {
        match (&presented, state) {
            (Some(presented), Some(state)) => state.keys.resolve(&state.db, presented).await.ok(),
            (Some(_), None) => None,
            (None, _) => Some(None),
        }
    };
    if !limiter.enabled() {
        if let Some(resolved) = lookup.await {
            request.extensions_mut().insert(ResolvedKey(resolved));
        }
        if let Some(presented) = presented {
            request.extensions_mut().insert(presented);
        }
        return next.run(request).await;
    }
    // An uncached key waits for its address's lookup permit (see `LookupStripes`) alongside
    // the limiter's own Redis call, never before it. Once it has the permit it looks again
    // whether the failed keys ahead of it spent the IP quota meanwhile, and the lookup then
    // finds a key that another request resolved while it waited in the cache (a hot key
    // whose entry expired costs one lookup, and no queue behind the Redis calls). A good key
    // gives the permit back at once; a failed one keeps it until its failure is charged.
    let guarded_lookup = async {
        let mut permit = None;
        if uncached {
            permit = limiter.lookups.acquire(ip).await;
            if let Some(response) = spent() {
                return Err(response);
            }
        }
        let resolved = lookup.await;
        if matches!(resolved, Some(Some(_))) {
            permit = None;
        }
        Ok((resolved, permit))
    };
    // Only failed keys mark an IP spent (below): unkeyed traffic that spends the IP quota
    // is refused by the quota itself, and must not lock out valid keys behind the address.
    let (mut decision, looked) = tokio::join!(limiter.check(&client), guarded_lookup);
    let (resolved, mut permit) = match looked {
        Ok(looked) => looked,
        Err(response) => return response,
    };
    if let Some(presented) = presented {
        request.extensions_mut().insert(presented);
    }
    let mut response = match decision.outcome {
        Outcome::Allowed => {
            if let Some(resolved) = resolved {
                request.extensions_mut().insert(ResolvedKey(resolved));
            }
            next.run(request).await
        }
        Outcome::Limited => ApiError::RateLimited.into_response(),
        Outcome::Unavailable => ApiError::RateLimitUnavailable.into_response(),
    };
    if keyed && response.status() == axum::http::StatusCode::UNAUTHORIZED {
        // The key failed: the attempt counts against the client IP, and once that quota is
        // spent the answer is 429 (the bad key's own quota says nothing about the client).
        decision = limiter
            .check(&ClientIdentity {
                key_id: None,
                ip: Some(ip),
            })
            .await;
        limiter.spent.record(ip, &decision);
        drop(permit.take());
        match decision.outcome {
            Outcome::Allowed => {}
            Outcome::Limited => response = ApiError::RateLimited.into_response(),
            Outcome::Unavailable => response = ApiError::RateLimitUnavailable.into_response(),
        }
    }
    decision.apply_headers(response.headers_mut());
    response
}

/// [`middleware`] for requests that matched no route: a path no route has (404), or an
/// operational path (`/metrics`, `/openapi.json`) with a method it does not serve (405;
/// axum sets the `MatchedPath` of the path then, so the method is looked up in
/// [`crate::http::OPERATIONAL_ROUTES`], `HEAD` counting as the `GET` axum answers it with).
/// They are rate limited like `/v1`, so a client cannot probe made-up paths and methods
/// for free. The `/v1` paths pass: their own layer (a `route_layer`, which axum also runs
/// for their 405s) limits them once. The probes are outside this router: a 405 on
/// `/healthz` or `/readyz` is not limited (like the probes themselves).
pub async fn unmatched(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let served = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .is_some_and(|path| serves(path.as_str(), request.method()));
    if served {
        return next.run(request).await;
    }
    middleware(State(state), request, next).await
}

/// True when `path` (a route template) is a `/v1` path, or has a route for `method`.
fn serves(path: &str, method: &axum::http::Method) -> bool {
    let method = if method == axum::http::Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    crate::http::V1_ROUTES.iter().any(|&(_, p)| p == path)
        || crate::http::OPERATIONAL_ROUTES
            .iter()
            .any(|&(m, p)| m == method && p == path)
}

/// The bucket a client IP is counted in: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is
/// the IPv4 address, an IPv6 address is its /64 (one subscriber's prefix: a client rotating
/// through its addresses stays one client).
pub fn quota_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        },
    }
}

/// The client IP: the peer address, unless the peer is one of `trusted` proxies; then
/// `X-Forwarded-For` (every header line, one list) is walked right to left past trusted
/// hops, and the first address not trusted is the client. An unparsable entry stops the
/// walk at the last trusted hop (the entries left of it cannot be believed), and so does a
/// list made only of trusted hops.
fn client_ip(request: &Request, trusted: &[ipnet::IpNet]) -> IpAddr {
    let canonical = |ip: IpAddr| ip.to_canonical();
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |info| {
            canonical(info.0.ip())
        });
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    let lines: Vec<&str> = request
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    for entry in lines.iter().rev().flat_map(|line| line.rsplit(',')) {
        let Ok(ip) = entry.trim().parse::<IpAddr>().map(canonical) else {
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests;
