//! The Redis side of the limiter: one multiplexed connection kept alive by a supervisor
//! task, the GCRA script run with EVALSHA, and a breaker so a sick Redis costs little.
//!
//! Why not deadpool-redis 0.23: it cannot pass redis-rs's connect/response timeouts through
//! and it sends a PING on every checkout, doubling the round trips per request. Why not
//! redis-rs's `ConnectionManager` either: while it reconnects, every command awaits the
//! shared reconnect future (including its back-off sleeps), so recovery after a Redis
//! restart waits for the current sleep. Here the request path never waits for a connection:
//! it takes the current `MultiplexedConnection` (a cheap clone) or fails at once, and a
//! separate task reconnects with back-off (100 ms doubling to 5 s by default). While
//! requests keep coming, the breaker's probe (one per cooldown) cuts the back-off sleep
//! short, so a restarted Redis is used again within about two cooldowns, however long it
//! was down; without traffic the back-off alone paces the attempts.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, RedisError, ServerErrorKind};
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::breaker::{Breaker, Permit};
use crate::config::RedisConfig;

const SCRIPT: &str = include_str!("gcra.lua");

/// Why a limiter call to Redis failed; the bounded label of `redis_connection_error_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// No connection (connecting, or reconnecting after a failure).
    Disconnected,
    /// The breaker is open: Redis was not called.
    BreakerOpen,
    /// The command timeout elapsed.
    Timeout,
    /// The connection broke (reset, refused, EOF).
    Io,
    /// Redis answered with an error.
    Server,
    /// Redis answered something the limiter did not expect.
    Protocol,
}

impl FailureKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Disconnected => "disconnected",
            Self::BreakerOpen => "breaker_open",
            Self::Timeout => "timeout",
            Self::Io => "io",
            Self::Server => "server",
            Self::Protocol => "protocol",
        }
    }
}

/// One key of a limiter call: the Redis key and its limit per period.
#[derive(Debug, Clone)]
pub(crate) struct KeyLimit {
    pub(crate) key: String,
    pub(crate) limit: u32,
}

/// Per-key result of the script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyState {
    pub(crate) remaining: u64,
    pub(crate) reset_ms: u64,
    pub(crate) retry_ms: u64,
}

/// The script's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScriptOutcome {
    pub(crate) allowed: bool,
    pub(crate) keys: Vec<KeyState>,
}

struct Shared {
    /// The live connection with its generation, so a late failure report about an old
    /// connection cannot tear down its replacement.
    connection: RwLock<Option<(u64, MultiplexedConnection)>>,
    /// A caller took a broken connection out of the slot.
    broken: Notify,
    /// A breaker probe found no connection: try to connect now instead of finishing the
    /// back-off sleep (at most once per breaker cooldown, and only while there is traffic).
    retry_now: Notify,
}

impl Shared {
    fn current(&self) -> Option<(u64, MultiplexedConnection)> {
        self.connection
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn is_connected(&self) -> bool {
        self.connection
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

/// Redis limiter backend: connection supervisor, breaker and script.
pub(crate) struct RedisBackend {
    shared: Arc<Shared>,
    breaker: Breaker,
    command_timeout: Duration,
    script: redis::Script,
    _supervisor: DropGuard,
}

impl RedisBackend {
    /// Parses the URL and starts the connection supervisor; never waits for Redis.
    pub(crate) fn start(config: &RedisConfig) -> Result<Self, RedisError> {
        let client = redis::Client::open(config.url.expose().as_str())?;
        let shared = Arc::new(Shared {
            connection: RwLock::new(None),
            broken: Notify::new(),
            retry_now: Notify::new(),
        });
        let cancel = CancellationToken::new();
        tokio::spawn(supervise(
            client,
            shared.clone(),
            config.clone(),
            cancel.clone(),
        ));
        metrics::gauge!("redis_connected").set(0.0);
        Ok(Self {
            shared,
            breaker: Breaker::new(config.breaker_failures, config.breaker_cooldown),
            command_timeout: config.command_timeout,
            script: redis::Script::new(SCRIPT),
            _supervisor: cancel.drop_guard(),
        })
    }

    /// True while a connection is established and the breaker is closed.
    pub(crate) fn is_healthy(&self) -> bool {
        self.shared.is_connected() && !self.breaker.is_open()
    }

    /// Runs the GCRA script over `keys` (all sharing one hash tag) with `period`.
    /// Bounded by the command timeout; fails at once while disconnected or open.
    pub(crate) async fn check(
        &self,
        keys: &[KeyLimit],
        period: Duration,
    ) -> Result<ScriptOutcome, FailureKind> {
        let permit = self.breaker.permit();
        if permit == Permit::Reject {
            return Err(FailureKind::BreakerOpen);
        }
        let mut generation = None;
        let result = match self.shared.current() {
            None => {
                if permit == Permit::Probe {
                    self.shared.retry_now.notify_one();
                }
                Err(FailureKind::Disconnected)
            }
            Some((current, mut connection)) => {
                generation = Some(current);
                match tokio::time::timeout(
                    self.command_timeout,
                    self.run_script(&mut connection, keys, period),
                )
                .await
                {
                    Ok(result) => result,
                    Err(_elapsed) => Err(FailureKind::Timeout),
                }
            }
        };
        match result {
            Ok(outcome) => {
                self.breaker.on_success();
                Ok(outcome)
            }
            Err(kind) => {
                let opened = self.breaker.on_failure();
                // A broken connection is replaced at once; a connection that only times
                // out (black-holed Redis) is replaced when the breaker opens.
                if let Some(generation) = generation
                    && (kind == FailureKind::Io || (opened && kind == FailureKind::Timeout))
                {
                    self.mark_broken(generation);
                }
                metrics::counter!("redis_connection_error_total", "kind" => kind.as_str())
                    .increment(1);
                Err(kind)
            }
        }
    }

    fn mark_broken(&self, generation: u64) {
        let mut slot = self
            .shared
            .connection
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if slot
            .as_ref()
            .is_some_and(|(current, _)| *current == generation)
        {
            *slot = None;
            drop(slot);
            metrics::gauge!("redis_connected").set(0.0);
            self.shared.broken.notify_one();
        }
    }

    /// EVALSHA; on NOSCRIPT (Redis restarted or failed over) EVAL, which also caches the
    /// script again. Any other error is returned as is: no reload, no retry.
    async fn run_script(
        &self,
        connection: &mut MultiplexedConnection,
        keys: &[KeyLimit],
        period: Duration,
    ) -> Result<ScriptOutcome, FailureKind> {
        let period_ms = u64::try_from(period.as_millis()).unwrap_or(u64::MAX);
        let build = |command: &str, first: &str| {
            let mut cmd = redis::cmd(command);
            cmd.arg(first).arg(keys.len());
            for key in keys {
                cmd.arg(&key.key);
            }
            for key in keys {
                cmd.arg(key.limit).arg(period_ms);
            }
            cmd
        };
        let evalsha = build("EVALSHA", self.script.get_hash());
        let reply: Result<Vec<i64>, RedisError> = evalsha.query_async(connection).await;
        let reply = match reply {
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                metrics::counter!("rate_limit_script_loads_total").increment(1);
                build("EVAL", SCRIPT).query_async(connection).await
            }
            other => other,
        };
        let values = reply.map_err(|err| classify(&err))?;
        parse_reply(&values, keys.len()).ok_or(FailureKind::Protocol)
    }
}

fn classify(err: &RedisError) -> FailureKind {
    if err.is_timeout() {
        FailureKind::Timeout
    } else if err.is_io_error() || err.is_connection_dropped() || err.is_unrecoverable_error() {
        FailureKind::Io
    } else {
        FailureKind::Server
    }
}

fn parse_reply(values: &[i64], keys: usize) -> Option<ScriptOutcome> {
    if values.len() != 1 + 3 * keys {
        return None;
    }
    let nonneg = |v: i64| u64::try_from(v).ok();
    let keys = values[1..]
        .chunks_exact(3)
        .map(|c| {
            Some(KeyState {
                remaining: nonneg(c[0])?,
                reset_ms: nonneg(c[1])?,
                retry_ms: nonneg(c[2])?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(ScriptOutcome {
        allowed: values[0] == 1,
        keys,
    })
}

/// Keeps one connection up: connects, waits until a caller reports it broken, reconnects
/// with exponential back-off. Ends when the backend is dropped.
async fn supervise(
    client: redis::Client,
    shared: Arc<Shared>,
    config: RedisConfig,
    cancel: CancellationToken,
) {
    let connection_config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.command_timeout));
    let mut delay = config.reconnect_min;
    let mut generation = 0_u64;
    loop {
        let attempt = tokio::select! {
            () = cancel.cancelled() => return,
            r = client.get_multiplexed_async_connection_with_config(&connection_config) => r,
        };
        match attempt {
            Ok(connection) => {
                generation += 1;
                *shared.connection.write().unwrap_or_else(|p| p.into_inner()) =
                    Some((generation, connection));
                metrics::gauge!("redis_connected").set(1.0);
                tracing::info!("connected to redis");
                delay = config.reconnect_min;
                // Wait until a caller takes the connection out of the slot (a stale
                // notification while the slot is full is ignored).
                while shared.is_connected() {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = shared.broken.notified() => {}
                    }
                }
                tracing::warn!("redis connection lost, reconnecting");
            }
            Err(err) => {
                let kind = classify(&err);
                metrics::counter!("redis_connection_error_total", "kind" => kind.as_str())
                    .increment(1);
                tracing::debug!(error = %err, retry_in_ms = delay.as_millis() as u64, "redis connect failed");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                    () = shared.retry_now.notified() => {}
                }
                delay = (delay * 2).min(config.reconnect_max);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_parsing_rejects_malformed_replies() {
        assert_eq!(
            parse_reply(&[1, 5, 100, 0, 9, 50, 0], 2),
            Some(ScriptOutcome {
                allowed: true,
                keys: vec![
                    KeyState {
                        remaining: 5,
                        reset_ms: 100,
                        retry_ms: 0
                    },
                    KeyState {
                        remaining: 9,
                        reset_ms: 50,
                        retry_ms: 0
                    },
                ],
            })
        );
        assert_eq!(parse_reply(&[1, 5, 100], 1), None);
        assert_eq!(parse_reply(&[0, -1, 100, 0], 1), None);
    }
}
