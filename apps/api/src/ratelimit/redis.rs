//! The Redis side of the limiter: one multiplexed connection kept alive by a supervisor
//! task, the GCRA script run with EVALSHA, and a breaker so a sick Redis costs little
//! (`smartbeak_resilience::CircuitBreaker::internal("redis", ..)`, see `breaker_policy`).
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
//!
//! A Redis Cluster (`REDIS_CLUSTER_URLS`) changes only what the slot holds: a
//! [`Connection::Cluster`] (redis-rs's async `ClusterConnection`, which routes each EVALSHA
//! by its first key's slot and follows MOVED/ASK itself) instead of a
//! [`Connection::Single`]. The breaker, the command timeout, the failure classification,
//! the supervisor and the limiter's fail-open/closed decision are the same code for both.
//! The limiter's keys share one hash tag, so every script call touches one slot.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Cmd, ErrorKind, RedisError, ServerErrorKind};
use smartbeak_resilience::breaker::MAX_WINDOW;
use smartbeak_resilience::{
    BreakerConfig, BreakerPolicy, BreakerState, CancelledCalls, CircuitBreaker, ConfigError,
    Verdict,
};
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{RedisConfig, RedisTarget};

const SCRIPT: &str = include_str!("gcra.lua");

/// The breaker's name: the `adapter` label of `circuit_breaker_*` and its log events.
pub(crate) const BREAKER_NAME: &str = "redis";

/// The Redis breaker's policy, equivalent to the limiter's former hand-written breaker:
/// open after `breaker_failures` failures in a row, stay open `breaker_cooldown` every time
/// (no growth, so a restarted Redis is used again within about two cooldowns however long
/// it was down), then a single probe whose outcome closes or re-opens it.
///
/// The failure-rate rule cannot be switched off, so it is made unable to trip on its own:
/// it needs 100 % failures over a full window of at least 64 calls, i.e. a run of failures
/// at least as long as the consecutive rule's, which trips first (`REDIS_BREAKER_FAILURES`
/// above 4096, the largest window, acts as 4096). Normal traffic with occasional errors
/// therefore never opens it.
///
/// A probe is bounded by the command timeout and a dropped probe (client gone) hands its
/// slot back, so the half-open wait, twice the command timeout but at least the cooldown,
/// only re-opens a breaker whose probe task stalled. Dropped closed calls are not counted.
pub(crate) fn breaker_policy(config: &RedisConfig) -> Result<BreakerPolicy, ConfigError> {
    let failures = config.breaker_failures.max(1);
    let cooldown = config.breaker_cooldown.max(Duration::from_millis(1));
    let window = failures.clamp(64, MAX_WINDOW);
    BreakerPolicy::new(BreakerConfig {
        window_size: window,
        minimum_calls: window,
        failure_rate_percent: 100,
        consecutive_failures: failures,
        slow_calls: None,
        open_duration: cooldown,
        open_backoff_factor: 1,
        max_open_duration: cooldown,
        half_open_probes: 1,
        half_open_successes: 1,
        half_open_max_wait: config.command_timeout.saturating_mul(2).max(cooldown),
        cancelled_calls: CancelledCalls::Ignore,
    })
}

/// Why a limiter call to Redis failed; the bounded label of `redis_connection_error_total`
/// (every kind but `BreakerOpen`, which `circuit_breaker_rejected_total{adapter="redis"}`
/// counts) and of the limiter's warning.
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
    /// The kinds `redis_connection_error_total` counts (`BreakerOpen` is the breaker's).
    const COUNTED: [FailureKind; 5] = [
        Self::Disconnected,
        Self::Timeout,
        Self::Io,
        Self::Server,
        Self::Protocol,
    ];

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
    pub(crate) next_ms: u64,
    pub(crate) retry_ms: u64,
}

/// The script's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScriptOutcome {
    pub(crate) allowed: bool,
    pub(crate) keys: Vec<KeyState>,
}

/// How the supervisor connects: to one node, or to a cluster through its seed nodes.
enum Connector {
    Single {
        client: redis::Client,
        config: AsyncConnectionConfig,
    },
    Cluster(ClusterClient),
}

impl Connector {
    /// Parses the URL(s); connects to nothing yet. Both kinds get the connect timeout per
    /// connection attempt and the command timeout per response.
    fn new(config: &RedisConfig) -> Result<Self, RedisError> {
        match &config.target {
            RedisTarget::Single(url) => Ok(Self::Single {
                client: redis::Client::open(url.expose().as_str())?,
                config: AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(config.connect_timeout))
                    .set_response_timeout(Some(config.command_timeout)),
            }),
            RedisTarget::Cluster(urls) => {
                let client =
                    ClusterClientBuilder::new(urls.iter().map(|url| url.expose().as_str()))
                        .connection_timeout(config.connect_timeout)
                        // Per node response, and (by default) the whole call with its
                        // MOVED/ASK retries: a call never outlives the command timeout.
                        .response_timeout(config.command_timeout)
                        .build()?;
                Ok(Self::Cluster(client))
            }
        }
    }

    async fn connect(&self) -> Result<Connection, RedisError> {
        match self {
            Self::Single { client, config } => client
                .get_multiplexed_async_connection_with_config(config)
                .await
                .map(Connection::Single),
            Self::Cluster(client) => client
                .get_async_connection()
                .await
                .map(|c| Connection::Cluster(Box::new(c))),
        }
    }
}

/// The limiter's connection: both kinds are multiplexed handles, cheap to clone.
#[derive(Clone)]
enum Connection {
    Single(MultiplexedConnection),
    Cluster(Box<ClusterConnection>),
}

impl Connection {
    async fn query(&mut self, cmd: &Cmd) -> Result<Vec<i64>, RedisError> {
        match self {
            Self::Single(connection) => cmd.query_async(connection).await,
            Self::Cluster(connection) => cmd.query_async(connection.as_mut()).await,
        }
    }
}

struct Shared {
    /// The live connection with its generation, so a late failure report about an old
    /// connection cannot tear down its replacement.
    connection: RwLock<Option<(u64, Connection)>>,
    /// A caller took a broken connection out of the slot.
    broken: Notify,
    /// A breaker probe found no connection: try to connect now instead of finishing the
    /// back-off sleep (at most once per breaker cooldown, and only while there is traffic).
    retry_now: Notify,
}

impl Shared {
    fn current(&self) -> Option<(u64, Connection)> {
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
    breaker: CircuitBreaker,
    command_timeout: Duration,
    script: redis::Script,
    _supervisor: DropGuard,
}

impl RedisBackend {
    /// Parses the URL(s) and starts the connection supervisor; never waits for Redis.
    pub(crate) fn start(config: &RedisConfig) -> Result<Self, RedisError> {
        let connector = Connector::new(config)?;
        let policy = breaker_policy(config).map_err(|err| {
            RedisError::from((
                ErrorKind::InvalidClientConfig,
                "invalid redis breaker settings",
                err.to_string(),
            ))
        })?;
        let shared = Arc::new(Shared {
            connection: RwLock::new(None),
            broken: Notify::new(),
            retry_now: Notify::new(),
        });
        let cancel = CancellationToken::new();
        tokio::spawn(supervise(
            connector,
            shared.clone(),
            config.clone(),
            cancel.clone(),
        ));
        metrics::gauge!("redis_connected").set(0.0);
        Ok(Self {
            shared,
            breaker: CircuitBreaker::internal(BREAKER_NAME, policy),
            command_timeout: config.command_timeout,
            script: redis::Script::new(SCRIPT),
            _supervisor: cancel.drop_guard(),
        })
    }

    /// Describes `redis_connection_error_total` and `redis_connected` and registers the
    /// counter at 0 for every counted kind.
    pub(crate) fn register_metrics(&self) {
        metrics::describe_counter!(
            "redis_connection_error_total",
            "failed limiter calls and connects to Redis, by kind"
        );
        metrics::describe_gauge!(
            "redis_connected",
            "1 while the limiter has a Redis connection"
        );
        for kind in FailureKind::COUNTED {
            metrics::counter!("redis_connection_error_total", "kind" => kind.as_str()).increment(0);
        }
    }

    /// True while a connection is established and the breaker is closed.
    pub(crate) fn is_healthy(&self) -> bool {
        self.shared.is_connected() && self.breaker.state() == BreakerState::Closed
    }

    /// Runs the GCRA script over `keys` (all sharing one hash tag) with `period`.
    /// Bounded by the command timeout; fails at once while disconnected or open.
    pub(crate) async fn check(
        &self,
        keys: &[KeyLimit],
        period: Duration,
    ) -> Result<ScriptOutcome, FailureKind> {
        // Open, or half-open with the probe out: skip Redis. A permit dropped unrecorded
        // (the request went away) is not counted, and a dropped probe hands its slot back.
        let Ok(permit) = self.breaker.try_acquire() else {
            return Err(FailureKind::BreakerOpen);
        };
        let probe = permit.is_probe();
        let mut generation = None;
        let result = match self.shared.current() {
            None => {
                if probe {
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
                permit.record(Verdict::Success);
                Ok(outcome)
            }
            Err(kind) => {
                permit.record(Verdict::Failure);
                // This failure tripped the breaker, re-opened it (a failed probe), or a
                // concurrent one did: the generation check makes the replacement idempotent.
                let open = self.breaker.state() == BreakerState::Open;
                if let Some(generation) = generation
                    && replaces_connection(kind, open)
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
        connection: &mut Connection,
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
        let reply = connection.query(&evalsha).await;
        let reply = match reply {
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                metrics::counter!("rate_limit_script_loads_total").increment(1);
                connection.query(&build("EVAL", SCRIPT)).await
            }
            other => other,
        };
        let values = reply.map_err(|err| classify(&err))?;
        parse_reply(&values, keys.len()).ok_or(FailureKind::Protocol)
    }
}

/// Whether a failed call gives up its connection: at once when the connection broke, and
/// whenever the breaker is open after the failure, whatever the kind. A connection that
/// only times out (black-holed Redis) or keeps answering errors (`READONLY` from a node a
/// failover demoted to replica: the new primary is reached only by a new connection, and
/// redis-rs does not count `READONLY` as a broken connection) does not heal by itself, and
/// the probe after the cooldown should try a fresh one. Errors that leave the breaker
/// closed keep it: one `WRONGTYPE` or one slow answer says nothing about the connection.
fn replaces_connection(kind: FailureKind, breaker_open: bool) -> bool {
    kind == FailureKind::Io || breaker_open
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
                next_ms: nonneg(c[1])?,
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
    connector: Connector,
    shared: Arc<Shared>,
    config: RedisConfig,
    cancel: CancellationToken,
) {
    let mut delay = config.reconnect_min;
    let mut generation = 0_u64;
    loop {
        let attempt = tokio::select! {
            () = cancel.cancelled() => return,
            r = connector.connect() => r,
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
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use smartbeak_resilience::{BreakerState, ManualClock, Rejection};

    use super::*;
    use crate::config::Secret;

    fn config(failures: u32, cooldown_ms: u64) -> RedisConfig {
        RedisConfig {
            target: RedisTarget::Single(Secret::new("redis://127.0.0.1:1".to_owned())),
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_millis(100),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            breaker_failures: failures,
            breaker_cooldown: Duration::from_millis(cooldown_ms),
        }
    }

    fn breaker(config: &RedisConfig) -> (CircuitBreaker, ManualClock) {
        let clock = ManualClock::new();
        let breaker = CircuitBreaker::internal_with_clock(
            BREAKER_NAME,
            breaker_policy(config).unwrap(),
            clock.shared(),
        );
        (breaker, clock)
    }

    /// One call through the breaker with `verdict`; `Ok(true)` if it was the probe.
    fn call(breaker: &CircuitBreaker, verdict: Verdict) -> Result<bool, Rejection> {
        let permit = breaker.try_acquire()?;
        let probe = permit.is_probe();
        permit.record(verdict);
        Ok(probe)
    }

    #[test]
    fn breaker_opens_after_the_threshold_then_admits_one_probe_per_cooldown() {
        let (b, clock) = breaker(&config(3, 500));
        assert_eq!(call(&b, Verdict::Failure), Ok(false));
        assert_eq!(call(&b, Verdict::Failure), Ok(false));
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(call(&b, Verdict::Failure), Ok(false));
        assert_eq!(b.state(), BreakerState::Open);
        let rejection = b.try_acquire().unwrap_err();
        assert_eq!(rejection.name, "redis");
        assert_eq!(rejection.retry_after, Duration::from_millis(500));

        clock.advance(Duration::from_millis(499));
        assert!(b.try_acquire().is_err());
        clock.advance(Duration::from_millis(1));
        let probe = b.try_acquire().unwrap();
        assert!(probe.is_probe());
        // Only one probe at a time.
        assert!(b.try_acquire().is_err());

        // A failed probe re-opens for the same cooldown (no growth), however often.
        probe.record(Verdict::Failure);
        for _ in 0..5 {
            assert_eq!(b.state(), BreakerState::Open);
            assert_eq!(
                b.try_acquire().unwrap_err().retry_after,
                Duration::from_millis(500)
            );
            clock.advance(Duration::from_millis(500));
            assert_eq!(call(&b, Verdict::Failure), Ok(true));
        }
        clock.advance(Duration::from_millis(500));
        assert_eq!(call(&b, Verdict::Success), Ok(true));
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(call(&b, Verdict::Success), Ok(false));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let (b, _clock) = breaker(&config(2, 100));
        call(&b, Verdict::Failure).unwrap();
        call(&b, Verdict::Success).unwrap();
        call(&b, Verdict::Failure).unwrap();
        assert_eq!(b.state(), BreakerState::Closed);
        call(&b, Verdict::Failure).unwrap();
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn the_failure_rate_alone_never_opens_the_breaker() {
        // Two failures in three calls, 10,000 times: a 67 % failure rate, never three in a row.
        let (b, _clock) = breaker(&config(3, 500));
        for _ in 0..10_000 {
            call(&b, Verdict::Failure).unwrap();
            call(&b, Verdict::Failure).unwrap();
            call(&b, Verdict::Success).unwrap();
        }
        assert_eq!(b.state(), BreakerState::Closed);
        // A large threshold is not pre-empted by the rate rule either.
        let (b, _clock) = breaker(&config(100, 500));
        for _ in 0..99 {
            call(&b, Verdict::Failure).unwrap();
        }
        assert_eq!(b.state(), BreakerState::Closed);
        call(&b, Verdict::Failure).unwrap();
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn breaker_policy_is_valid_for_any_positive_settings() {
        for (failures, cooldown_ms) in [(1, 1), (3, 500), (64, 10), (4096, 60_000), (u32::MAX, 1)] {
            let policy = breaker_policy(&config(failures, cooldown_ms)).unwrap();
            let c = policy.config();
            assert_eq!(c.consecutive_failures, failures);
            assert_eq!(c.open_duration, Duration::from_millis(cooldown_ms));
            assert_eq!(c.max_open_duration, c.open_duration);
            assert_eq!((c.half_open_probes, c.half_open_successes), (1, 1));
            assert!(c.minimum_calls >= failures.min(MAX_WINDOW));
        }
    }

    #[test]
    fn the_connection_is_replaced_when_it_broke_or_whenever_the_breaker_is_open() {
        use FailureKind::*;
        for kind in [Timeout, Io, Server, Protocol, Disconnected] {
            assert!(
                replaces_connection(kind, true),
                "{kind:?} with the breaker open"
            );
        }
        assert!(replaces_connection(Io, false));
        for kind in [Timeout, Server, Protocol] {
            assert!(
                !replaces_connection(kind, false),
                "{kind:?} with the breaker closed"
            );
        }
        // READONLY (a replica after a failover) is a server error to redis-rs, not a broken
        // connection: only the open breaker replaces that connection.
        let readonly = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ReadOnly),
            "READONLY",
            "You can't write against a read only replica.".to_owned(),
        ));
        assert_eq!(classify(&readonly), Server);
    }

    #[test]
    fn reply_parsing_rejects_malformed_replies() {
        assert_eq!(
            parse_reply(&[1, 5, 100, 0, 9, 50, 0], 2),
            Some(ScriptOutcome {
                allowed: true,
                keys: vec![
                    KeyState {
                        remaining: 5,
                        next_ms: 100,
                        retry_ms: 0
                    },
                    KeyState {
                        remaining: 9,
                        next_ms: 50,
                        retry_ms: 0
                    },
                ],
            })
        );
        assert_eq!(parse_reply(&[1, 5, 100], 1), None);
        assert_eq!(parse_reply(&[0, -1, 100, 0], 1), None);
    }
}
