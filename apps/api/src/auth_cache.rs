//! The in-process cache of API key lookups: key hash -> (org, key id), or "no such key".
//!
//! Bounded by `AUTH_CACHE_CAPACITY` (a `quick_cache`), valid keys trusted for
//! `AUTH_CACHE_TTL_MS`, unknown or revoked ones answered 401 for
//! `AUTH_CACHE_NEGATIVE_TTL_MS`, so neither a hot key nor a flood of bad keys reaches
//! PostgreSQL on every request (bad keys still count against the IP quota, and once it is
//! spent a key not in the cache is refused 429 before any lookup: `ratelimit::middleware`).
//! Revocation takes effect in every replica at once: a trigger on
//! `api_keys` (migration `api_key_notify`) sends `pg_notify(KEYS_CHANNEL, hex(key_hash))`
//! when the change commits, and [`KeyCache::listen`] (one [`crate::listen`] session per
//! process) evicts that key. When the session is lost the cache is flushed and flushed again
//! once a new session listens; meanwhile the TTL bounds staleness.
//!
//! A lookup that raced a revocation cannot re-insert the revoked key: every eviction bumps
//! a generation before it removes, and a lookup stores its answer only if the generation
//! did not move while it ran, and takes it out again if the generation moved while it was
//! storing it. Database errors are not cached.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quick_cache::sync::Cache;
use smartbeak_database::Database;
use subtle::ConstantTimeEq;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::auth::{Auth, PresentedKey};
use crate::config::AuthCacheConfig;
use crate::error::ApiError;
use crate::key_usage::{KeyUsage, UsageMark};
use crate::listen::{self, Event};

/// The `LISTEN/NOTIFY` channel of key changes (payload: hex of the key hash); the
/// `api_keys_notify` trigger sends on it.
pub const KEYS_CHANNEL: &str = "smartbeak_api_keys";

/// A quiet listener session is pinged this often.
const LISTENER_LIVENESS: Duration = Duration::from_secs(30);

/// Counter of cache answers, label `result`: `hit` or `miss`.
pub const REQUESTS_METRIC: &str = "auth_cache_requests_total";
/// Counter of removed entries, label `reason`: `revoked`, `flushed` or `expired`.
pub const EVICTIONS_METRIC: &str = "auth_cache_evictions_total";

#[derive(Debug, Clone)]
struct Entry {
    auth: Option<Auth>,
    expires: Instant,
    /// Whether the key was marked used in the current `last_used_at` interval.
    mark: Arc<UsageMark>,
}

/// The cache shared by every request of the process.
#[derive(Debug)]
pub struct KeyCache {
    entries: Cache<[u8; 32], Entry>,
    positive_ttl: Duration,
    negative_ttl: Duration,
    generation: AtomicU64,
    db_lookups: AtomicU64,
    usage: Arc<KeyUsage>,
}

impl KeyCache {
    /// An empty cache.
    pub fn new(config: &AuthCacheConfig) -> Self {
        Self {
            entries: Cache::new(config.capacity.max(1)),
            positive_ttl: config.positive_ttl,
            negative_ttl: config.negative_ttl,
            generation: AtomicU64::new(0),
            db_lookups: AtomicU64::new(0),
            usage: Arc::new(KeyUsage::default()),
        }
    }

    /// The keys used since the last `last_used_at` flush ([`crate::key_usage`]).
    pub fn usage(&self) -> &Arc<KeyUsage> {
        &self.usage
    }

    /// The key's org and id, `None` for an unknown or revoked key: from the cache, or from
    /// PostgreSQL (then cached).
    pub async fn resolve(
        &self,
        db: &Database,
        presented: &PresentedKey,
    ) -> Result<Option<Auth>, ApiError> {
        self.resolve_with(presented, |hash| async move { lookup(db, &hash).await })
            .await
    }

    /// [`Self::resolve`] with `lookup` in place of the query on `api_keys` (for tests of
    /// the cache itself).
    async fn resolve_with<F>(
        &self,
        presented: &PresentedKey,
        lookup: impl FnOnce([u8; 32]) -> F,
    ) -> Result<Option<Auth>, ApiError>
    where
        F: std::future::Future<Output = Result<Option<Auth>, ApiError>>,
    {
        let hash = presented.hash();
        if let Some(entry) = self.entries.get(hash) {
            if entry.expires > Instant::now() {
                metrics::counter!(REQUESTS_METRIC, "result" => "hit").increment(1);
                if let Some(auth) = entry.auth {
                    self.usage.touch(auth.key_id, &entry.mark);
                }
                return Ok(entry.auth);
            }
            metrics::counter!(EVICTIONS_METRIC, "reason" => "expired").increment(1);
        }
        metrics::counter!(REQUESTS_METRIC, "result" => "miss").increment(1);
        let generation = self.generation.load(Ordering::Acquire);
        self.db_lookups.fetch_add(1, Ordering::Relaxed);
        let auth = lookup(*hash).await?;
        let ttl = if auth.is_some() {
            self.positive_ttl
        } else {
            self.negative_ttl
        };
        let mark = Arc::new(UsageMark::default());
        if let Some(auth) = auth {
            self.usage.touch(auth.key_id, &mark);
        }
        if self.generation.load(Ordering::Acquire) == generation {
            self.entries.insert(
                *hash,
                Entry {
                    auth,
                    expires: Instant::now() + ttl,
                    mark,
                },
            );
            // An eviction that bumped the generation after the check above may have removed
            // the key before this insert: look again, and take the answer back out if so.
            // (An eviction bumps the generation before it removes, so either it sees this
            // entry and removes it, or this second check sees its bump.)
            if self.generation.load(Ordering::SeqCst) != generation {
                self.entries.remove(hash);
            }
        }
        Ok(auth)
    }

    /// True when the cache answers for `presented` now (a fresh entry, valid or not), so
    /// [`Self::resolve`] would not reach PostgreSQL.
    pub fn is_cached(&self, presented: &PresentedKey) -> bool {
        self.entries
            .get(presented.hash())
            .is_some_and(|entry| entry.expires > Instant::now())
    }

    /// Removes the key whose hash is `hash_hex` (a notification's payload).
    pub fn evict_hex(&self, hash_hex: &str) {
        let mut hash = [0_u8; 32];
        self.generation.fetch_add(1, Ordering::AcqRel);
        if hex::decode_to_slice(hash_hex, &mut hash).is_ok() {
            if self.entries.remove(&hash).is_some() {
                metrics::counter!(EVICTIONS_METRIC, "reason" => "revoked").increment(1);
            }
        } else {
            // Not ours to parse: play safe.
            self.flush();
        }
    }

    /// Empties the cache (the listener was lost, or came back).
    pub fn flush(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let n = self.entries.len();
        self.entries.clear();
        metrics::counter!(EVICTIONS_METRIC, "reason" => "flushed").increment(n as u64);
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many lookups went to PostgreSQL since the start (for tests and the bench).
    pub fn db_lookups(&self) -> u64 {
        self.db_lookups.load(Ordering::Relaxed)
    }

    /// Listens on [`KEYS_CHANNEL`] until `stop`, evicting every key notified and flushing
    /// the cache whenever the session is lost or (re)subscribed. Run it once per process.
    pub async fn listen(&self, db: &Database, stop: &CancellationToken) {
        listen::run(
            db,
            &[KEYS_CHANNEL],
            "api key changes",
            LISTENER_LIVENESS,
            |event| match event {
                Event::Notification { payload, .. } => self.evict_hex(payload),
                Event::Subscribed | Event::Lost => self.flush(),
            },
            stop,
        )
        .await;
    }
}

async fn lookup(db: &Database, hash: &[u8; 32]) -> Result<Option<Auth>, ApiError> {
    let row: Option<(Uuid, Uuid, Vec<u8>)> = db
        .run(async |conn| {
            sqlx::query_as(
                "SELECT id, org_id, key_hash FROM api_keys \
                 WHERE key_hash = $1 AND revoked_at IS NULL",
            )
            .bind(&hash[..])
            .fetch_optional(conn)
            .await
        })
        .await?;
    Ok(match row {
        // The index lookup found the row by hash; compare again in constant time so that
        // no code path branches on a partial match of secret material.
        Some((key_id, org_id, stored)) if bool::from(stored.ct_eq(&hash[..])) => {
            Some(Auth { org_id, key_id })
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests;
