//! `api_keys.last_used_at`, kept off the hot path: a request only marks its key as used
//! (one atomic load when the key was already marked in the current interval); a background
//! task writes every marked key in one `UPDATE` each `API_KEY_LAST_USED_INTERVAL_MS`, so a
//! key is written at most once per interval however busy it is, and the `flush-key-usage`
//! shutdown handler ([`install`]) writes what is left once the server has drained.
//!
//! The written value is the flush's `now()`: it is at most one interval later than the
//! key's last use. A failed write keeps the keys for the next flush.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use smartbeak_database::{Database, DbError};
use smartbeak_shutdown::{HandlerGuard, Phase, RegisterError, Shutdown};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Name of the `Drain`-phase handler [`install`] registers.
pub const FLUSH_HANDLER: &str = "flush-key-usage";

/// The keys used since the last flush.
#[derive(Debug)]
pub struct KeyUsage {
    /// Bumped by every flush; a key marked in this epoch is not marked again.
    epoch: AtomicU64,
    pending: Mutex<HashSet<Uuid>>,
    /// Rows written so far (for tests and the bench).
    written: AtomicU64,
}

/// A cached key's mark: the epoch it was last marked in (0: never).
#[derive(Debug, Default)]
pub struct UsageMark(AtomicU64);

impl Default for KeyUsage {
    fn default() -> Self {
        Self {
            epoch: AtomicU64::new(1),
            pending: Mutex::new(HashSet::new()),
            written: AtomicU64::new(0),
        }
    }
}

impl KeyUsage {
    /// Records a use of `key_id`, whose cache entry carries `mark`. Takes the lock only the
    /// first time a key is seen in an interval.
    pub fn touch(&self, key_id: Uuid, mark: &UsageMark) {
        let epoch = self.epoch.load(Ordering::Acquire);
        if mark.0.load(Ordering::Relaxed) == epoch || mark.0.swap(epoch, Ordering::AcqRel) == epoch
        {
            return;
        }
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key_id);
    }

    /// Keys marked and not yet written.
    pub fn pending(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// `last_used_at` rows written since the start.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Writes `last_used_at = now()` for every key marked since the last flush, in one
    /// statement; returns the rows updated. On error the keys stay pending.
    ///
    /// # Errors
    ///
    /// The `UPDATE` failed.
    pub async fn flush(&self, db: &Database) -> Result<u64, DbError> {
        let ids: Vec<Uuid> = {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            self.epoch.fetch_add(1, Ordering::AcqRel);
            pending.drain().collect()
        };
        if ids.is_empty() {
            return Ok(0);
        }
        let result = db
            .run(async |conn| {
                sqlx::query("UPDATE api_keys SET last_used_at = now() WHERE id = ANY($1)")
                    .bind(&ids)
                    .execute(conn)
                    .await
            })
            .await;
        match result {
            Ok(done) => {
                self.written
                    .fetch_add(done.rows_affected(), Ordering::Relaxed);
                Ok(done.rows_affected())
            }
            Err(error) => {
                self.pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(ids);
                Err(error)
            }
        }
    }

    /// Flushes every `interval` until `stop` (the final flush is the shutdown handler's).
    pub async fn run(&self, db: &Database, interval: Duration, stop: &CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        while stop.run_until_cancelled(tick.tick()).await.is_some() {
            if let Err(error) = self.flush(db).await {
                tracing::warn!(%error, "writing api_keys.last_used_at failed; retrying next interval");
            }
        }
    }
}

/// Starts the periodic flush (a task tracked by `shutdown`, stopped by its token) and
/// registers [`FLUSH_HANDLER`] in [`Phase::Drain`]: it waits until `served` is cancelled
/// (the server has answered its last request) or the drain deadline passes, then writes
/// what is pending, before the `Release` phase closes the pools.
///
/// # Errors
///
/// Shutdown has already started.
pub fn install(
    shutdown: &Shutdown,
    usage: Arc<KeyUsage>,
    db: Database,
    interval: Duration,
    served: CancellationToken,
) -> Result<HandlerGuard, RegisterError> {
    let drain = shutdown
        .config()
        .drain_timeout
        .unwrap_or(shutdown.config().timeout);
    let (task_usage, task_db, stop) = (Arc::clone(&usage), db.clone(), shutdown.token());
    let guard = shutdown.register(FLUSH_HANDLER, Phase::Drain, move || async move {
        // Past the drain deadline the in-flight requests are abandoned: write what is known.
        let _ = tokio::time::timeout(drain, served.cancelled()).await;
        usage
            .flush(&db)
            .await
            .map(|_| ())
            .map_err(|error| format!("writing api_keys.last_used_at: {error}"))
    })?;
    shutdown.spawn(async move { task_usage.run(&task_db, interval, &stop).await });
    Ok(guard)
}

#[cfg(test)]
mod tests;
