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
//! - **Reconnect with backoff.** Every reopen waits a delay from
//!   `smartbeak_resilience::RetryPolicy` (full jitter, from 100 ms up to 5 s): a failed
//!   open, and a session that dies again within [`STABLE`] of opening, count as one more
//!   failure, so a backend killed over and over (or a proxy that accepts and drops) is
//!   retried with growing waits, never in a hot loop; a session that lived longer resets
//!   the count. sqlx's own eager reconnect inside `try_recv` is turned off, since it would
//!   reconnect at once behind the backoff's back. Notifications sent while no session
//!   listens are gone: the caller hears [`Event::Lost`] when a session ends and
//!   [`Event::Subscribed`] once a new one listens, and covers the gap (the worker polls
//!   and wakes its claimers; the api flushes its key cache, whose TTL bounds staleness
//!   meanwhile).
//! - **Nothing of a dead session survives it.** Each session (its one-connection pool,
//!   its `PgListener`) lives on a small current-thread runtime of its own, on a thread of
//!   its own, and that runtime is shut down when the session ends, before the next one
//!   opens: the `UNLISTEN *` task sqlx spawns when a `PgListener` is dropped would wait
//!   for ever on a black-holed socket, and goes with the runtime, socket and all.

use std::thread;
use std::time::Duration;

use smartbeak_database::Database;
use smartbeak_resilience::RetryPolicy;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The first wait before reopening the listener.
const RECONNECT_MIN: Duration = Duration::from_millis(100);

/// The longest wait between two attempts to (re)open the listener.
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// A session that lived at least this long resets the backoff: its loss is news, not one
/// more failure of a session that keeps dying.
pub const STABLE: Duration = Duration::from_secs(5);

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
    let spec = SessionSpec {
        options: listener_options(db.primary()),
        acquire_timeout: db.primary().options().get_acquire_timeout(),
        ping_bound: db.config().query_timeout(),
        liveness,
        channels: channels.iter().map(|c| (*c).to_owned()).collect(),
        what,
    };
    let mut failures: u32 = 0;
    loop {
        let opened_at = Instant::now();
        let mut session = Session::start(spec.clone());
        let mut subscribed = false;
        let ended = loop {
            let Some(message) = stop.run_until_cancelled(session.events.recv()).await else {
                // Dropping the session stops its runtime.
                return;
            };
            match message {
                Some(Message::Subscribed) => {
                    tracing::info!(?channels, what, "listening for notifications");
                    subscribed = true;
                    on_event(Event::Subscribed);
                }
                Some(Message::Notification { channel, payload }) => {
                    on_event(Event::Notification {
                        channel: &channel,
                        payload: &payload,
                    });
                }
                Some(Message::Ended(reason)) => break reason,
                None => break End::Failed("the listener's session thread ended".to_owned()),
            }
        };
        // The session's runtime is gone by now (it shuts down before reporting its end).
        drop(session);
        if subscribed {
            on_event(Event::Lost);
        }
        if subscribed && opened_at.elapsed() >= STABLE {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        let delay = policy
            .next_delay(failures, None, Duration::ZERO)
            .unwrap_or(RECONNECT_MAX);
        let retry_ms = delay.as_millis() as u64;
        match (&ended, subscribed) {
            (End::Failed(error), false) => {
                tracing::warn!(%error, what, retry_ms, "cannot listen for notifications");
            }
            (End::Failed(error), true) => {
                tracing::warn!(%error, what, retry_ms, "the listener failed; reopening it");
            }
            (End::Lost, _) => {
                tracing::warn!(
                    what,
                    retry_ms,
                    "the listener's connection was lost; reconnecting"
                );
            }
            (End::Unanswered, _) => {
                tracing::warn!(
                    what,
                    retry_ms,
                    "the listener's connection does not answer; reopening it"
                );
            }
        }
        if stop
            .run_until_cancelled(tokio::time::sleep(delay))
            .await
            .is_none()
        {
            return;
        }
    }
}

/// What a session needs to open and watch its connection.
#[derive(Debug, Clone)]
struct SessionSpec {
    options: PgConnectOptions,
    acquire_timeout: Duration,
    ping_bound: Duration,
    liveness: Duration,
    channels: Vec<String>,
    what: &'static str,
}

/// What a session reports to [`run`].
#[derive(Debug)]
enum Message {
    Subscribed,
    Notification { channel: String, payload: String },
    Ended(End),
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// Opening or listening failed, or the session failed with an error.
    Failed(String),
    /// The connection was closed (a terminated backend, a reset).
    Lost,
    /// The liveness ping got no answer in time (a black-holed connection).
    Unanswered,
}

/// One listening session on a thread and current-thread runtime of its own; dropping it
/// stops it (the thread shuts the runtime down, dropping every task of the session).
#[derive(Debug)]
struct Session {
    events: mpsc::UnboundedReceiver<Message>,
    stop: CancellationToken,
}

impl Session {
    fn start(spec: SessionSpec) -> Self {
        let (tx, events) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let session_stop = stop.clone();
        let failed = tx.clone();
        let spawned = thread::Builder::new()
            .name("pg-listener".to_owned())
            .spawn(move || session_thread(spec, &tx, &session_stop));
        if let Err(error) = spawned {
            let _ = failed.send(Message::Ended(End::Failed(format!(
                "cannot start the listener's thread: {error}"
            ))));
        }
        Self { events, stop }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The body of a session's thread: runs the session to its end or its stop, shuts the
/// runtime down (the connection, the pool and any task sqlx left behind go with it), and
/// only then reports the end, so the next session never overlaps this one.
fn session_thread(
    spec: SessionSpec,
    tx: &mpsc::UnboundedSender<Message>,
    stop: &CancellationToken,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = tx.send(Message::Ended(End::Failed(format!(
                "cannot start the listener's runtime: {error}"
            ))));
            return;
        }
    };
    let ended = runtime.block_on(async { stop.run_until_cancelled(session(&spec, tx)).await });
    runtime.shutdown_background();
    if let Some(ended) = ended {
        let _ = tx.send(Message::Ended(ended));
    }
}

/// Opens a listener, reports its notifications, and returns when its session ends.
async fn session(spec: &SessionSpec, tx: &mpsc::UnboundedSender<Message>) -> End {
    let pool = listener_pool(spec);
    let mut listener = match PgListener::connect_with(&pool).await {
        Ok(listener) => listener,
        Err(error) => return End::Failed(error.to_string()),
    };
    // A lost connection ends `try_recv` with `None` and the session with it: the reopen
    // is ours, after the backoff, on a fresh runtime.
    listener.eager_reconnect(false);
    if let Err(error) = listener
        .listen_all(spec.channels.iter().map(String::as_str))
        .await
    {
        return End::Failed(error.to_string());
    }
    if tx.send(Message::Subscribed).is_err() {
        return End::Lost;
    }
    loop {
        match tokio::time::timeout(spec.liveness, listener.try_recv()).await {
            Err(_quiet) => {
                let ping = tokio::time::timeout(
                    spec.ping_bound,
                    sqlx::query("SELECT 1").execute(&mut listener),
                )
                .await;
                match ping {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => return End::Failed(error.to_string()),
                    Err(_elapsed) => return End::Unanswered,
                }
            }
            Ok(Ok(Some(note))) => {
                let sent = tx.send(Message::Notification {
                    channel: note.channel().to_owned(),
                    payload: note.payload().to_owned(),
                });
                if sent.is_err() {
                    return End::Lost;
                }
            }
            Ok(Ok(None)) => return End::Lost,
            Ok(Err(error)) => {
                tracing::debug!(%error, what = spec.what, "the listener's session failed");
                return End::Failed(error.to_string());
            }
        }
    }
}

/// The listener session's connect options: the primary's, with its own
/// `application_name`.
fn listener_options(primary: &PgPool) -> PgConnectOptions {
    let options = primary.connect_options();
    let name = format!(
        "{}{APPLICATION_SUFFIX}",
        options.get_application_name().unwrap_or("smartbeak")
    );
    (*options).clone().application_name(&name)
}

/// The session's own pool: one connection, no reconnect of its own (idle and lifetime
/// limits off: the session, not the pool, decides when the connection goes).
fn listener_pool(spec: &SessionSpec) -> PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .idle_timeout(None)
        .max_lifetime(None)
        .acquire_timeout(spec.acquire_timeout)
        .connect_lazy_with(spec.options.clone())
}

#[cfg(test)]
mod tests;
