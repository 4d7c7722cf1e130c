//! Building a `PgPool` whose every connection carries the session timeouts.
//!
//! The timeouts and `application_name` travel in the startup packet
//! (`PgConnectOptions::options`), so they cost no round trip and no pooler or `RESET ALL`
//! can lose them. Two hooks improve on sqlx's defaults:
//! - `before_acquire` skips the liveness ping for a connection used within the last
//!   `ping_bypass` (default [`PING_BYPASS`], HikariCP's 500 ms bypass, a little wider),
//!   instead of sqlx's ping on every acquire. The price: a connection whose backend was
//!   killed (or whose network path died) within `ping_bypass` of its last use costs its next
//!   user one error (sqlx then closes it on release). `DB_PING_BYPASS_MS=0` pings on every
//!   acquire instead;
//! - `after_release` pings a returned connection under the acquire timeout before sqlx's
//!   own unbounded release ping, so a path that died while the connection was checked out
//!   costs its slot at most that long (see `release_ping`); each answered release is
//!   counted, the progress that tells a saturated pool from an unreachable database;
//! - both hooks retire a connection once it is older than `max_lifetime` less a per
//!   connection jitter of up to 2.5% (as HikariCP does), so a pool opened at once does not
//!   reconnect at once.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};

use crate::DatabaseConfig;
use crate::config::SecretUrl;
use crate::metrics::Counters;

/// The default of [`DatabaseConfig::ping_bypass`]: a connection idle for less than this is
/// handed out without a ping.
pub const PING_BYPASS: Duration = Duration::from_secs(1);

/// `client_connection_check_interval` of every session (PostgreSQL 14+; the startup
/// packet carries it): while a statement runs, the server checks this often that the client
/// is still connected, and ends the statement (and the backend) when it is not. A query cut
/// short on the client side (its bound, the request's deadline, a cancelled request) has
/// its connection discarded, which closes the socket; without the check the server would
/// run the statement on, up to `statement_timeout`, for no one. sqlx 0.8.6 has no way to
/// send a cancel request, so this is how a query does not outlive its request server-side.
pub const CLIENT_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The largest fraction of `max_lifetime` taken off a connection's life (HikariCP: 2.5%).
pub const LIFETIME_JITTER: f64 = 0.025;

/// Connection options for `url`: the session timeouts, keepalive settings and
/// `application_name` in the startup packet.
pub(crate) fn connect_options(
    config: &DatabaseConfig,
    url: &SecretUrl,
    application_name: &str,
) -> Result<PgConnectOptions, sqlx::Error> {
    let mut options: PgConnectOptions = url.expose().parse()?;
    let mut settings = vec![
        (
            "statement_timeout",
            config.statement_timeout.as_millis().to_string(),
        ),
        (
            "idle_in_transaction_session_timeout",
            config.idle_in_transaction_timeout.as_millis().to_string(),
        ),
        // A statement whose client went away stops within this interval, not at
        // statement_timeout: see [`CLIENT_CHECK_INTERVAL`].
        (
            "client_connection_check_interval",
            CLIENT_CHECK_INTERVAL.as_millis().to_string(),
        ),
    ];
    if config.tcp_keepalive {
        // Server-side keepalive: the server probes our socket after 60 s of silence and
        // drops the backend after 6 unanswered probes 10 s apart.
        settings.extend([
            ("tcp_keepalives_idle", "60".to_owned()),
            ("tcp_keepalives_interval", "10".to_owned()),
            ("tcp_keepalives_count", "6".to_owned()),
        ]);
    }
    options = options.options(settings).application_name(application_name);
    Ok(options)
}

/// Pool options from the config, with the ping bypass and the jittered lifetime; answered
/// releases are counted in `counters.releases`.
pub(crate) fn pool_options(config: &DatabaseConfig, counters: Arc<Counters>) -> PgPoolOptions {
    let lifetime = config.max_lifetime;
    let ping_bypass = config.ping_bypass;
    let release_bound = config.acquire_timeout;
    PgPoolOptions::new()
        .min_connections(config.pool_min)
        .max_connections(config.pool_max)
        .idle_timeout(Some(config.idle_timeout))
        .acquire_timeout(config.acquire_timeout)
        // sqlx's own check stays as a hard backstop at the full lifetime; the hooks retire
        // connections earlier, each at its own jittered age.
        .max_lifetime(Some(lifetime))
        .test_before_acquire(false)
        .before_acquire(move |conn, meta| {
            Box::pin(async move {
                if beyond_jittered_lifetime(meta.age, lifetime) {
                    return Ok(false);
                }
                if meta.idle_for >= ping_bypass {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .after_release(move |conn, meta| {
            let counters = Arc::clone(&counters);
            Box::pin(async move {
                if beyond_jittered_lifetime(meta.age, lifetime) {
                    return Ok(false);
                }
                release_ping(conn, release_bound).await?;
                counters.releases.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            })
        })
}

/// The liveness ping of a connection on its way back to the pool, bounded by `bound` (the
/// acquire timeout). sqlx 0.8.6 runs `after_release` before its own release ping, which
/// has no timeout: pinging here first means a connection whose path died while it was out
/// fails this ping (sqlx then closes it hard and its slot is free) instead of holding its
/// slot for the OS TCP timeout. It also flushes a `ROLLBACK` queued by a dropped
/// transaction under the same bound. The cost is one more round trip per release, off the
/// caller's path; what is left is a path that dies between the two pings.
async fn release_ping(conn: &mut sqlx::PgConnection, bound: Duration) -> Result<(), sqlx::Error> {
    match tokio::time::timeout(bound, conn.ping()).await {
        Ok(result) => result,
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("release ping timed out after {bound:?}"),
        ))),
    }
}

/// Opens a pool and makes its first connection, bounded by the acquire timeout.
pub(crate) async fn connect(
    config: &DatabaseConfig,
    url: &SecretUrl,
    application_name: &str,
    target: &'static str,
    counters: Arc<Counters>,
) -> Result<PgPool, crate::DbError> {
    let connect_error = |source| crate::DbError::Connect {
        target,
        url: url.redacted(),
        source,
    };
    let options = connect_options(config, url, application_name).map_err(connect_error)?;
    pool_options(config, counters)
        .connect_with(options)
        .await
        .map_err(connect_error)
}

/// Checks, on a connection of its own made with the pool's options, that the server runs
/// with the session settings this crate sends in the startup packet: a pooler that drops
/// the `options` parameter (PgBouncer's `ignore_startup_parameters`) would otherwise leave
/// every statement without its timeout. Bounded by the acquire timeout.
///
/// A connection of its own rather than one of the pool's: a pooled connection would go
/// back through sqlx's release ping in the background, and the pool is not yet in use.
pub(crate) async fn check_settings(
    config: &DatabaseConfig,
    url: &SecretUrl,
    application_name: &str,
    target: &'static str,
) -> Result<(), crate::DbError> {
    let bound = config.acquire_timeout;
    let connect_error = |source| crate::DbError::Connect {
        target,
        url: url.redacted(),
        source,
    };
    let options = connect_options(config, url, application_name).map_err(connect_error)?;
    let check = async {
        let mut conn = sqlx::PgConnection::connect_with(&options)
            .await
            .map_err(connect_error)?;
        let rows = sqlx::query_as::<_, (String, String)>(
            "SELECT name, setting FROM pg_settings \
             WHERE name IN ('statement_timeout', 'idle_in_transaction_session_timeout')",
        )
        .fetch_all(&mut conn)
        .await
        .map_err(crate::DbError::Query)?;
        let _ = conn.close().await;
        Ok::<_, crate::DbError>(rows)
    };
    let rows = tokio::time::timeout(bound, check)
        .await
        .map_err(|_| crate::DbError::AcquireTimeout(bound))??;
    let expected = [
        ("statement_timeout", config.statement_timeout),
        (
            "idle_in_transaction_session_timeout",
            config.idle_in_transaction_timeout,
        ),
    ];
    for (setting, wanted) in expected {
        // pg_settings gives both in milliseconds, the unit sent.
        let wanted = wanted.as_millis().to_string();
        let actual = rows
            .iter()
            .find(|(name, _)| name == setting)
            .map(|(_, value)| value.clone())
            .unwrap_or_default();
        if actual != wanted {
            return Err(crate::DbError::SettingsIgnored {
                target,
                setting,
                actual,
                expected: wanted,
            });
        }
    }
    Ok(())
}

/// Closes `pool` and every connection in it, waiting for checked-out ones to come back.
///
/// `PgPool::close` runs twice: in sqlx 0.8.6 it stops as soon as every permit is back, but
/// a connection whose release (sqlx pings it on the way back) began before the close re-enters
/// the idle queue just before returning its permit, after the close last emptied that queue,
/// and would stay open as long as the pool value lives. The second call finds and closes it
/// (and costs nothing otherwise: the pool is empty).
pub(crate) async fn close(pool: &PgPool) {
    pool.close().await;
    pool.close().await;
}

/// True once a connection of age `age` should be retired. Each connection gets its own
/// cut-off in `[lifetime * (1 - LIFETIME_JITTER), lifetime]`, derived from its creation
/// instant so that it is stable across checks without storing anything per connection.
pub(crate) fn beyond_jittered_lifetime(age: Duration, lifetime: Duration) -> bool {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    let created = Instant::now()
        .saturating_duration_since(epoch)
        .saturating_sub(age);
    // Millisecond resolution keeps the cut-off stable between two reads of the clock.
    let seed = u64::try_from(created.as_millis()).unwrap_or(u64::MAX);
    age >= jittered_lifetime(lifetime, seed)
}

/// `lifetime` less a pseudo-random share (up to [`LIFETIME_JITTER`]) picked by `seed`.
pub(crate) fn jittered_lifetime(lifetime: Duration, seed: u64) -> Duration {
    let unit = (splitmix64(seed) >> 11) as f64 / (1u64 << 53) as f64; // in [0, 1)
    lifetime.mul_f64(1.0 - LIFETIME_JITTER * unit)
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_two_and_a_half_percent_and_spreads() {
        let lifetime = Duration::from_secs(1800);
        let floor = lifetime.mul_f64(1.0 - LIFETIME_JITTER);
        let cutoffs: Vec<Duration> = (0..1000).map(|s| jittered_lifetime(lifetime, s)).collect();
        assert!(cutoffs.iter().all(|c| *c >= floor && *c <= lifetime));
        let min = cutoffs.iter().min().copied().unwrap_or_default();
        let max = cutoffs.iter().max().copied().unwrap_or_default();
        // 1000 connections spread over most of the 45 s window, not one instant.
        assert!(max - min > Duration::from_secs(40), "{min:?}..{max:?}");
    }

    #[test]
    fn young_connections_are_never_retired_and_old_ones_always_are() {
        let lifetime = Duration::from_secs(60);
        assert!(!beyond_jittered_lifetime(Duration::from_secs(1), lifetime));
        assert!(!beyond_jittered_lifetime(lifetime.mul_f64(0.97), lifetime));
        assert!(beyond_jittered_lifetime(lifetime, lifetime));
    }
}
