//! The one `LISTEN/NOTIFY` subscriber of the crate: a dedicated `PgListener` session on a
//! set of channels, reporting what it sees as [`Event`]s. The export worker wakes its claim
//! stream and its job watchers with it (`jobs::worker`); the api evicts its key cache with
//! it (`auth_cache`).
//!
//! - **Its own connection, not a pool slot.** The listener runs on a pool of its own with
//!   one connection, built from the primary pool's connect options (so the session carries
//!   the database crate's startup options: `statement_timeout`, TCP keepalive, ...), with
//!   `application_name` `<primary's>-listener` (visible in `pg_stat_activity`). The
//!   primary pool's slots all stay free for the work.
//! - **Liveness.** A connection that dies without a reset (a black-holed network) would
//!   leave `recv` waiting for ever: when nothing arrived for `liveness`, the listener pings
//!   its session (`SELECT 1`, bounded by the database client bound); a failed ping drops
//!   the session and reopens it.
//! - **Reconnect with backoff.** Opening failures back off by
//!   `smartbeak_resilience::RetryPolicy` (full jitter, from 100 ms up to 5 s), never in a
//!   tight loop. Notifications sent while no session listens are gone: the caller hears
//!   [`Event::Lost`] when a session ends and [`Event::Subscribed`] once a new one listens,
//!   and covers the gap (the worker polls and wakes its claimers; the api flushes its key
//!   cache, whose TTL bounds staleness meanwhile).

use std::time::Duration;

use smartbeak_database::Database;
use smartbeak_resilience::RetryPolicy;
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio_util::sync::CancellationToken;

/// The first wait before reopening the listener.
const RECONNECT_MIN: Duration = Duration::from_millis(100);

/// The longest wait between two attempts to (re)open the listener.
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// The suffix of the listener session's `application_name`.
pub const APPLICATION_SUFFIX: &str = "-listener";

/// What the listener saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// A session now listens on every channel (at start and after every reopen):
    /// notifications sent before it were not seen.
    Subscribed,
    /// A notification on one of the channels.
    Notification {
        /// The channel it was sent on.
        channel: &'a str,
        /// Its payload.
        payload: &'a str,
    },
    /// The session was lost (terminated, failed, or did not answer a liveness ping):
    /// notifications from now until the next [`Event::Subscribed`] are gone.
    Lost,
}

/// Listens on `channels` until `stop`, calling `on_event` with everything it sees; `what`
/// names the subscriber in the log lines. A session quiet for `liveness` is pinged.
pub async fn run(
    db: &Database,
    channels: &[&str],
    what: &'static str,
    liveness: Duration,
    mut on_event: impl FnMut(Event<'_>),
    stop: &CancellationToken,
) {
    let policy = RetryPolicy {
        max_attempts: u32::MAX,
        base_delay: RECONNECT_MIN,
        max_delay: RECONNECT_MAX,
        max_elapsed: Duration::MAX,
        min_last_attempt: Duration::ZERO,
        max_retry_after: Duration::ZERO,
    };
    let ping_bound = db.config().query_timeout();
    let mut failures: u32 = 0;
    loop {
        let opened = stop.run_until_cancelled(open(db, channels)).await;
        let mut listener = match opened {
            None => return,
            Some(Ok(listener)) => listener,
            Some(Err(error)) => {
                failures = failures.saturating_add(1);
                let delay = policy
                    .next_delay(failures, None, Duration::ZERO)
                    .unwrap_or(RECONNECT_MAX);
                tracing::warn!(%error, what, retry_ms = delay.as_millis() as u64, "cannot listen for notifications");
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
        tracing::info!(?channels, what, "listening for notifications");
        failures = 0;
        on_event(Event::Subscribed);
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
                            what,
                            "the listener's connection does not answer; reopening it"
                        );
                        on_event(Event::Lost);
                        break;
                    }
                }
                Some(Ok(Ok(Some(note)))) => on_event(Event::Notification {
                    channel: note.channel(),
                    payload: note.payload(),
                }),
                Some(Ok(Ok(None))) => {
                    // Lost; the next `try_recv` reconnects and listens again, but the
                    // notifications in between are gone.
                    tracing::warn!(what, "the listener's connection was lost; reconnecting");
                    on_event(Event::Lost);
                    break;
                }
                Some(Ok(Err(error))) => {
                    tracing::warn!(%error, what, "the listener failed; reopening it");
                    on_event(Event::Lost);
                    break;
                }
            }
        }
    }
}

/// A listener on a one-connection pool of its own (see the module docs).
async fn open(db: &Database, channels: &[&str]) -> Result<PgListener, sqlx::Error> {
    let pool = listener_pool(db.primary());
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen_all(channels.iter().copied()).await?;
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
