//! The wake-up: a dedicated `PgListener` session on `queue::CHANNEL` and
//! `queue::CANCEL_CHANNEL`. A new job wakes the idle claim stream at once; a cancelled
//! running job's id wakes that job's watcher, whose fence check then stops it at once (the
//! once-a-second check is the guarantee; this makes it immediate).
//!
//! - **Its own connection, not a pool slot.** The listener runs on a pool of its own with
//!   one connection, built from the primary pool's connect options (so the session carries
//!   the database crate's startup options: `statement_timeout`, TCP keepalive, ...), with
//!   `application_name` `<primary's>-listener` (visible in `pg_stat_activity`). The
//!   primary pool's slots all stay free for claims, heartbeats and completions.
//! - **Liveness.** A connection that dies without a reset (a black-holed network) would
//!   leave `recv` waiting for ever: when nothing arrived for `EXPORT_POLL_MAX_MS`, the
//!   listener pings its session (`SELECT 1`, bounded by the database client bound); a
//!   failed ping drops the session and reopens it.
//! - **Reconnect with backoff.** Opening failures back off by
//!   `smartbeak_resilience::RetryPolicy` (full jitter, from 100 ms up to 5 s), never in a
//!   tight loop. Meanwhile (and whenever it cannot) the claim stream's poll timer is the
//!   fallback; the claimers are woken once after each reopen, as notifications sent in
//!   between are gone.

use std::time::Duration;

use smartbeak_database::Database;
use smartbeak_resilience::RetryPolicy;
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::config::POLL_MIN;
use crate::jobs::queue::{CANCEL_CHANNEL, CHANNEL};

/// The longest wait between two attempts to (re)open the listener.
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// The suffix of the listener session's `application_name`.
pub(super) const APPLICATION_SUFFIX: &str = "-listener";

/// Listens until `stop`, waking `wake` on every new job and calling `cancelled` with the id
/// of every cancelled running job (any worker's: the callee looks it up). A session quiet
/// for `liveness` is pinged.
pub(super) async fn run(
    db: &Database,
    liveness: Duration,
    wake: &Notify,
    cancelled: impl Fn(Uuid),
    stop: &CancellationToken,
) {
    let policy = RetryPolicy {
        max_attempts: u32::MAX,
        base_delay: POLL_MIN,
        max_delay: RECONNECT_MAX,
        max_elapsed: Duration::MAX,
        min_last_attempt: Duration::ZERO,
        max_retry_after: Duration::ZERO,
    };
    let ping_bound = db.config().query_timeout();
    let mut failures: u32 = 0;
    loop {
        let opened = stop.run_until_cancelled(open(db)).await;
        let mut listener = match opened {
            None => return,
            Some(Ok(listener)) => listener,
            Some(Err(error)) => {
                failures = failures.saturating_add(1);
                let delay = policy
                    .next_delay(failures, None, Duration::ZERO)
                    .unwrap_or(RECONNECT_MAX);
                tracing::warn!(%error, retry_ms = delay.as_millis() as u64, "cannot listen for new export jobs; polling meanwhile");
                if stop
                    .run_until_cancelled(tokio::time::sleep(delay))
                    .await
                    .is_none()
                {
                    return;
                }
                continue;
            }
        };
        tracing::info!(channel = CHANNEL, "listening for new export jobs");
        failures = 0;
        // Jobs queued before the LISTEN took effect were not notified.
        wake.notify_one();
        loop {
            let received = stop
                .run_until_cancelled(tokio::time::timeout(liveness, listener.try_recv()))
                .await;
            match received {
                None => return,
                Some(Err(_quiet)) => {
                    let ping = tokio::time::timeout(
                        ping_bound,
                        sqlx::query("SELECT 1").execute(&mut listener),
                    )
                    .await;
                    if !matches!(ping, Ok(Ok(_))) {
                        tracing::warn!(
                            "the listener's connection does not answer; reopening it, polling meanwhile"
                        );
                        wake.notify_one();
                        break;
                    }
                }
                Some(Ok(Ok(Some(note)))) if note.channel() == CANCEL_CHANNEL => {
                    if let Ok(id) = note.payload().parse() {
                        cancelled(id);
                    }
                }
                Some(Ok(Ok(Some(_)))) => wake.notify_one(),
                Some(Ok(Ok(None))) => {
                    // Lost and (eagerly) reconnected: notifications in between are gone.
                    tracing::warn!("the listener's connection was lost; reconnected");
                    wake.notify_one();
                }
                Some(Ok(Err(error))) => {
                    tracing::warn!(%error, "the listener failed; polling until it is back");
                    wake.notify_one();
                    break;
                }
            }
        }
    }
}

/// A listener on a one-connection pool of its own (see the module docs).
async fn open(db: &Database) -> Result<PgListener, sqlx::Error> {
    let pool = listener_pool(db.primary());
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen_all([CHANNEL, CANCEL_CHANNEL]).await?;
    Ok(listener)
}

/// The listener's own pool: one connection, the primary's options, its own
/// `application_name`.
fn listener_pool(primary: &PgPool) -> PgPool {
    let options = primary.connect_options();
    let name = format!(
        "{}{APPLICATION_SUFFIX}",
        options.get_application_name().unwrap_or("smartbeak")
    );
    let options = (*options).clone().application_name(&name);
    PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(primary.options().get_acquire_timeout())
        .connect_lazy_with(options)
}
