//! The wake-up: a dedicated `PgListener` session on `queue::CHANNEL` and
//! `queue::CANCEL_CHANNEL`. A new job wakes the idle claim stream at once; a cancelled
//! running job's id wakes that job's watcher, whose fenced heartbeat then stops it at once
//! (the once-a-second heartbeat is the guarantee; this makes it immediate). The listener's connection comes from the primary
//! pool (`PgListener::connect_with`), so the session carries the pool's startup options
//! (`statement_timeout`, `application_name`, ...); it is held for as long as the worker
//! claims, never shared. When it is lost, sqlx reconnects it; until then (and whenever
//! it cannot), the claim stream's poll timer is the fallback, and the claimers are woken
//! once after each reconnect, as notifications sent meanwhile are gone.

use std::time::Duration;

use smartbeak_database::Database;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::config::POLL_MIN;
use uuid::Uuid;

use crate::jobs::queue::{CANCEL_CHANNEL, CHANNEL};

/// The longest wait between two attempts to (re)open the listener.
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Listens until `stop`, waking `wake` on every new job and calling `cancelled` with the id
/// of every cancelled running job (any worker's: the callee looks it up).
pub(super) async fn run(
    db: &Database,
    wake: &Notify,
    cancelled: impl Fn(Uuid),
    stop: &CancellationToken,
) {
    let mut backoff = POLL_MIN;
    loop {
        let opened = stop
            .run_until_cancelled(async {
                let mut listener = PgListener::connect_with(db.primary()).await?;
                listener.listen_all([CHANNEL, CANCEL_CHANNEL]).await?;
                Ok::<_, sqlx::Error>(listener)
            })
            .await;
        let mut listener = match opened {
            None => return,
            Some(Ok(listener)) => listener,
            Some(Err(error)) => {
                tracing::warn!(%error, retry_ms = backoff.as_millis() as u64, "cannot listen for new export jobs; polling meanwhile");
                if stop
                    .run_until_cancelled(tokio::time::sleep(backoff))
                    .await
                    .is_none()
                {
                    return;
                }
                backoff = (backoff * 2).min(RECONNECT_MAX);
                continue;
            }
        };
        tracing::info!(channel = CHANNEL, "listening for new export jobs");
        backoff = POLL_MIN;
        // Jobs queued before the LISTEN took effect were not notified.
        wake.notify_one();
        loop {
            match stop.run_until_cancelled(listener.try_recv()).await {
                None => return,
                Some(Ok(Some(note))) if note.channel() == CANCEL_CHANNEL => {
                    if let Ok(id) = note.payload().parse() {
                        cancelled(id);
                    }
                }
                Some(Ok(Some(_))) => wake.notify_one(),
                Some(Ok(None)) => {
                    // Lost and (eagerly) reconnected: notifications in between are gone.
                    tracing::warn!("the listener's connection was lost; reconnected");
                    wake.notify_one();
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "the listener failed; polling until it is back");
                    wake.notify_one();
                    break;
                }
            }
        }
    }
}
