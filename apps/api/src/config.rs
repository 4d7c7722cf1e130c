//! Typed configuration of the api, read from environment variables with defaults.
//!
//! Secrets (the Redis URL may carry a password) are wrapped in [`Secret`], whose `Debug`
//! prints `[redacted]`. The database settings live in `smartbeak_database::DatabaseConfig`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A value that must never reach a log line: `Debug` and `Display` print `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a secret value.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A configuration variable that was present but unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A variable that is no longer read is set; the message says what replaced it.
    #[error("{var} is no longer supported: {instead}")]
    Removed {
        /// The environment variable.
        var: &'static str,
        /// What to set instead.
        instead: &'static str,
    },
    /// The variable could not be parsed; the value is not echoed (it may be a secret).
    #[error("invalid value for {var}: expected {expected}")]
    Invalid {
        /// The environment variable.
        var: &'static str,
        /// What a valid value looks like.
        expected: &'static str,
    },
    /// Two variables that exclude each other are both set.
    #[error("{var} and {other} are both set: set only one of them")]
    Exclusive {
        /// The variable refused.
        var: &'static str,
        /// The variable it conflicts with.
        other: &'static str,
    },
}

pub use smartbeak_shutdown::telemetry::LogFormat;

/// Default `EXPORT_DIR`, shared by the api (downloads) and the export worker (writes).
pub const DEFAULT_EXPORT_DIR: &str = "./exports";

/// Everything the api reads from its environment (except the database settings).
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// `API_BIND`, default `127.0.0.1:8080`; port 0 picks a free port.
    pub bind: SocketAddr,
    /// `LOG_FORMAT`, default text.
    pub log_format: LogFormat,
    /// HTTP hardening limits.
    pub http: HttpConfig,
    /// `SHUTDOWN_POOL_CLOSE_MS`, default 5000: how long the database pools get to close at
    /// shutdown. The drain deadline is smartbeak-shutdown's `SHUTDOWN_DRAIN_TIMEOUT_MS`.
    pub pool_close_deadline: Duration,
    /// Redis connection settings; `None` when `REDIS_URL` is unset.
    pub redis: Option<RedisConfig>,
    /// Rate limits.
    pub rate_limit: RateLimitConfig,
    /// `ANALYTICS_CACHE_TTL_MS`, default 5000: how long an analytics aggregate is reused.
    pub analytics_cache_ttl: Duration,
    /// `ANALYTICS_CACHE_MAX_BYTES`, default 67108864 (64 MiB): the most serialised report
    /// bytes the analytics cache holds (least recently used reports go first).
    pub analytics_cache_max_bytes: u64,
    /// `ANALYTICS_REPORT_TOP_N`, default 100: the most keywords (by clicks) and content
    /// items (by page views) a report lists; its `totals` cover every row.
    pub analytics_top_n: i64,
    /// `EXPORT_DIR`, default `./exports`: where the export worker writes finished files.
    pub export_dir: PathBuf,
    /// The in-process API key cache.
    pub auth_cache: AuthCacheConfig,
}

/// The in-process cache of API key lookups (`auth_cache`).
#[derive(Debug, Clone)]
pub struct AuthCacheConfig {
    /// `AUTH_CACHE_CAPACITY`, default 10000: keys (valid or not) held at most.
    pub capacity: usize,
    /// `AUTH_CACHE_TTL_MS`, default 5000: how long a valid key is trusted without asking
    /// PostgreSQL; bounds a revocation's delay when the listener is lost.
    pub positive_ttl: Duration,
    /// `AUTH_CACHE_NEGATIVE_TTL_MS`, default 2000: how long an unknown or revoked key is
    /// answered 401 without asking PostgreSQL (a key created meanwhile waits this long).
    pub negative_ttl: Duration,
    /// `API_KEY_LAST_USED_INTERVAL_MS`, default 60000: `api_keys.last_used_at` is written in
    /// one batch this often (each key at most once per interval) and at shutdown.
    pub last_used_interval: Duration,
}

/// Request hardening (tower-http layers).
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// `HTTP_BODY_LIMIT_BYTES`, default 1 MiB; larger bodies get 413.
    pub body_limit_bytes: usize,
    /// `HTTP_REQUEST_TIMEOUT_MS`, default 10000; slower requests get 504 `REQUEST_TIMEOUT`, and
    /// what is left of it bounds each of the request's queries. Must be at least
    /// the database client bound (`DB_STATEMENT_TIMEOUT_MS` plus a margin): see
    /// [`ApiConfig::check_timeouts`].
    pub request_timeout: Duration,
    /// `HTTP_MAX_CONCURRENCY`, default 1024; requests beyond it are shed with 503.
    pub max_concurrency: usize,
    /// `HTTP_HEADER_READ_TIMEOUT_MS`, default 10000: a connection that has not sent a whole
    /// request head this long after it opened (or after its previous response) is closed.
    pub header_read_timeout: Duration,
    /// `HTTP_MAX_CONNECTIONS`, default 4096: connections served at once; further ones wait
    /// in the listen backlog.
    pub max_connections: usize,
}

/// How the api talks to Redis; every wait is bounded.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `REDIS_URL` (one node) or `REDIS_CLUSTER_URLS` (a cluster).
    pub target: RedisTarget,
    /// `REDIS_CONNECT_TIMEOUT_MS`, default 1000.
    pub connect_timeout: Duration,
    /// `REDIS_COMMAND_TIMEOUT_MS`, default 100: the most a request waits for Redis.
    pub command_timeout: Duration,
    /// `REDIS_RECONNECT_MIN_MS`, default 100: first reconnect delay, doubled after each failure.
    pub reconnect_min: Duration,
    /// `REDIS_RECONNECT_MAX_MS`, default 5000: cap of the reconnect delay.
    pub reconnect_max: Duration,
    /// `REDIS_BREAKER_FAILURES`, default 3: consecutive failures that open the breaker.
    pub breaker_failures: u32,
    /// `REDIS_BREAKER_COOLDOWN_MS`, default 500: how long the breaker stays open before a probe.
    pub breaker_cooldown: Duration,
}

/// Where the limiter's Redis is; the URLs may contain a password, hence secret.
#[derive(Debug, Clone)]
pub enum RedisTarget {
    /// `REDIS_URL`: one node (or a proxy in front of several).
    Single(Secret<String>),
    /// `REDIS_CLUSTER_URLS`: comma-separated seed nodes of a Redis Cluster; the client
    /// discovers the others from them.
    Cluster(Vec<Secret<String>>),
}

/// Rate limit policy, applied to every `/v1` request.
#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    /// `RATE_LIMIT_ENABLED`, default true.
    pub enabled: bool,
    /// `RATE_LIMIT_PER_KEY`, default 600: requests per window per API key, at most
    /// `RATE_LIMIT_WINDOW_SECS * 1000` (one request per millisecond; see the GCRA script).
    pub per_key: u32,
    /// `RATE_LIMIT_PER_IP`, default 1200: requests per window per client IP, at most
    /// `RATE_LIMIT_WINDOW_SECS * 1000`.
    pub per_ip: u32,
    /// `RATE_LIMIT_WINDOW_SECS`, default 60.
    pub window: Duration,
    /// `RATE_LIMIT_FAIL_CLOSED`, default false: answer 503 instead of falling back when Redis fails.
    pub fail_closed: bool,
    /// `RATE_LIMIT_REPLICAS`, default 1: the in-process fallback allows `limit / replicas`.
    pub replicas: u32,
    /// `RATE_LIMIT_KEY_PREFIX`, default `smartbeak:rl`: Redis key prefix, also the hash tag.
    pub key_prefix: String,
    /// `TRUSTED_PROXIES`, default empty: comma-separated CIDRs (`10.0.0.0/8, ::1/128`) of
    /// the proxies in front of the api. `X-Forwarded-For` is read only when the peer is one
    /// of them, walking right to left past trusted hops; the first untrusted address is
    /// the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl ApiConfig {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `lookup` (tests pass a map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&lookup);
        let target = match (env.string("REDIS_URL"), env.string("REDIS_CLUSTER_URLS")) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Exclusive {
                    var: "REDIS_CLUSTER_URLS",
                    other: "REDIS_URL",
                });
            }
            (Some(url), None) => Some(RedisTarget::Single(Secret::new(url))),
            (None, Some(list)) => {
                let urls: Vec<Secret<String>> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|url| !url.is_empty())
                    .map(|url| Secret::new(url.to_owned()))
                    .collect();
                if urls.is_empty() {
                    return Err(ConfigError::Invalid {
                        var: "REDIS_CLUSTER_URLS",
                        expected: "comma-separated redis:// URLs of cluster nodes",
                    });
                }
                Some(RedisTarget::Cluster(urls))
            }
            (None, None) => None,
        };
        let redis = match target {
            Some(target) => Some(RedisConfig {
                target,
                connect_timeout: env.millis("REDIS_CONNECT_TIMEOUT_MS", 1000)?,
                command_timeout: env.millis("REDIS_COMMAND_TIMEOUT_MS", 100)?,
                reconnect_min: env.millis("REDIS_RECONNECT_MIN_MS", 100)?,
                reconnect_max: env.millis("REDIS_RECONNECT_MAX_MS", 5000)?,
                breaker_failures: env.positive("REDIS_BREAKER_FAILURES", 3)?,
                breaker_cooldown: env.millis("REDIS_BREAKER_COOLDOWN_MS", 500)?,
            }),
            None => None,
        };
        // The same parser as the telemetry set-up's, so both accept the same values.
        let log_format = LogFormat::parse(env.string("LOG_FORMAT").as_deref()).map_err(|_| {
            ConfigError::Invalid {
                var: "LOG_FORMAT",
                expected: "json or text",
            }
        })?;
        let window_secs: u64 = env.positive("RATE_LIMIT_WINDOW_SECS", 60)?;
        Ok(Self {
            bind: env
                .parse("API_BIND", "a socket address like 127.0.0.1:8080")?
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080))),
            log_format,
            http: HttpConfig {
                body_limit_bytes: env.positive("HTTP_BODY_LIMIT_BYTES", 1024 * 1024)?,
                request_timeout: env.millis("HTTP_REQUEST_TIMEOUT_MS", 10_000)?,
                max_concurrency: env.positive("HTTP_MAX_CONCURRENCY", 1024)?,
                header_read_timeout: env.millis("HTTP_HEADER_READ_TIMEOUT_MS", 10_000)?,
                max_connections: env.positive("HTTP_MAX_CONNECTIONS", 4096)?,
            },
            pool_close_deadline: env.millis("SHUTDOWN_POOL_CLOSE_MS", 5_000)?,
            redis,
            rate_limit: RateLimitConfig {
                enabled: env.boolean("RATE_LIMIT_ENABLED", true)?,
                per_key: env.rate("RATE_LIMIT_PER_KEY", 600, window_secs)?,
                per_ip: env.rate("RATE_LIMIT_PER_IP", 1200, window_secs)?,
                window: Duration::from_secs(window_secs),
                fail_closed: env.boolean("RATE_LIMIT_FAIL_CLOSED", false)?,
                replicas: env.positive("RATE_LIMIT_REPLICAS", 1)?,
                key_prefix: env
                    .string("RATE_LIMIT_KEY_PREFIX")
                    .unwrap_or_else(|| "smartbeak:rl".to_owned()),
                trusted_proxies: trusted_proxies(&env)?,
            },
            analytics_cache_ttl: env.millis("ANALYTICS_CACHE_TTL_MS", 5_000)?,
            analytics_cache_max_bytes: env.positive("ANALYTICS_CACHE_MAX_BYTES", 64 << 20)?,
            analytics_top_n: env.positive("ANALYTICS_REPORT_TOP_N", 100)?,
            export_dir: env
                .string("EXPORT_DIR")
                .map_or_else(|| PathBuf::from(DEFAULT_EXPORT_DIR), PathBuf::from),
            auth_cache: AuthCacheConfig {
                capacity: env.positive("AUTH_CACHE_CAPACITY", 10_000)?,
                positive_ttl: env.millis("AUTH_CACHE_TTL_MS", 5_000)?,
                negative_ttl: env.millis("AUTH_CACHE_NEGATIVE_TTL_MS", 2_000)?,
                last_used_interval: env.millis("API_KEY_LAST_USED_INTERVAL_MS", 60_000)?,
            },
        })
    }
}

impl ApiConfig {
    /// Checks that the database timeouts nest under the request timeout: request timeout
    /// (`HTTP_REQUEST_TIMEOUT_MS`) >= database client bound > `DB_STATEMENT_TIMEOUT_MS`. A
    /// request answered 503 would otherwise leave its statement running and its connection
    /// checked out. The error names both variables. The request's queries get its deadline
    /// less a margin (at most 50 ms, `http::deadline_margin`), still above
    /// `DB_STATEMENT_TIMEOUT_MS`: the client bound's own margin is at least 250 ms.
    pub fn check_timeouts(
        &self,
        db: &smartbeak_database::DatabaseConfig,
    ) -> Result<(), smartbeak_database::ConfigError> {
        db.check_deadline("HTTP_REQUEST_TIMEOUT_MS", self.http.request_timeout)
    }
}

/// `TRUSTED_PROXIES`, refusing the boolean it replaced (`TRUST_X_FORWARDED_FOR`) so a
/// deployment that relied on it does not silently start keying every client by the proxy.
fn trusted_proxies<F: Fn(&str) -> Option<String>>(
    env: &Env<'_, F>,
) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    if (env.0)("TRUST_X_FORWARDED_FOR").is_some() {
        return Err(ConfigError::Removed {
            var: "TRUST_X_FORWARDED_FOR",
            instead: "set TRUSTED_PROXIES to the CIDRs of the proxies in front of the api \
                      (e.g. TRUSTED_PROXIES=10.0.0.0/8), and unset TRUST_X_FORWARDED_FOR",
        });
    }
    let Some(raw) = env.string("TRUSTED_PROXIES") else {
        return Ok(Vec::new());
    };
    raw.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            entry
                .parse::<ipnet::IpNet>()
                .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| ConfigError::Invalid {
                    var: "TRUSTED_PROXIES",
                    expected: "a comma-separated list of CIDRs or addresses, e.g. 10.0.0.0/8, ::1",
                })
        })
        .collect()
}

/// The variable parsers shared by the api's and the export worker's configuration
/// (`jobs::worker::config`): one wording of every "invalid value" error.
pub(crate) struct Env<'a, F: Fn(&str) -> Option<String>>(pub(crate) &'a F);

impl<F: Fn(&str) -> Option<String>> Env<'_, F> {
    pub(crate) fn string(&self, var: &str) -> Option<String> {
        (self.0)(var).filter(|v| !v.trim().is_empty())
    }

    pub(crate) fn parse<T: FromStr>(
        &self,
        var: &'static str,
        expected: &'static str,
    ) -> Result<Option<T>, ConfigError> {
        match self.string(var) {
            None => Ok(None),
            Some(raw) => raw
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| ConfigError::Invalid { var, expected }),
        }
    }

    pub(crate) fn positive<T: FromStr + PartialOrd + Default>(
        &self,
        var: &'static str,
        default: T,
    ) -> Result<T, ConfigError> {
        let value = self.parse(var, "a positive integer")?.unwrap_or(default);
        if value <= T::default() {
            return Err(ConfigError::Invalid {
                var,
                expected: "a positive integer",
            });
        }
        Ok(value)
    }

    /// A limit per window of `window_secs`: positive and at most one request per millisecond,
    /// which keeps the GCRA script's per-request rounding (under 1 us) below 0.1 % of an
    /// interval.
    fn rate(&self, var: &'static str, default: u32, window_secs: u64) -> Result<u32, ConfigError> {
        let limit: u32 = self.positive(var, default)?;
        if u64::from(limit) > window_secs.saturating_mul(1000) {
            return Err(ConfigError::Invalid {
                var,
                expected: "at most RATE_LIMIT_WINDOW_SECS * 1000 (one request per millisecond)",
            });
        }
        Ok(limit)
    }

    pub(crate) fn millis(&self, var: &'static str, default: u64) -> Result<Duration, ConfigError> {
        Ok(Duration::from_millis(self.positive(var, default)?))
    }

    pub(crate) fn boolean(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self
            .string(var)
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref()
        {
            None => Ok(default),
            Some("1" | "true" | "yes" | "on") => Ok(true),
            Some("0" | "false" | "no" | "off") => Ok(false),
            Some(_) => Err(ConfigError::Invalid {
                var,
                expected: "true or false",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::HashMap;

    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<ApiConfig, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        ApiConfig::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_without_redis() {
        let c = config(&[]).unwrap();
        assert!(c.redis.is_none());
        assert_eq!(c.bind.port(), 8080);
        assert_eq!(c.rate_limit.per_key, 600);
        assert!(!c.rate_limit.fail_closed);
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn redis_cluster_urls_are_a_list_exclusive_with_redis_url() {
        let c = config(&[(
            "REDIS_CLUSTER_URLS",
            " redis://:hunter2@127.0.0.1:7000, redis://127.0.0.1:7001 ,,redis://127.0.0.1:7002",
        )])
        .unwrap();
        let redis = c.redis.as_ref().unwrap();
        let RedisTarget::Cluster(urls) = &redis.target else {
            panic!("expected a cluster target: {redis:?}");
        };
        let urls: Vec<&str> = urls.iter().map(|u| u.expose().as_str()).collect();
        assert_eq!(
            urls,
            [
                "redis://:hunter2@127.0.0.1:7000",
                "redis://127.0.0.1:7001",
                "redis://127.0.0.1:7002"
            ]
        );
        assert_eq!(redis.command_timeout, Duration::from_millis(100));
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2"), "{debug}");

        let both = config(&[
            ("REDIS_URL", "redis://127.0.0.1:6379"),
            ("REDIS_CLUSTER_URLS", "redis://127.0.0.1:7000"),
        ])
        .unwrap_err();
        assert_eq!(
            both.to_string(),
            "REDIS_CLUSTER_URLS and REDIS_URL are both set: set only one of them"
        );
        let empty = config(&[("REDIS_CLUSTER_URLS", " , ,")]).unwrap_err();
        assert!(empty.to_string().contains("REDIS_CLUSTER_URLS"), "{empty}");
    }

    #[test]
    fn redis_settings_and_redaction() {
        let c = config(&[
            ("REDIS_URL", "redis://:hunter2@127.0.0.1:6379"),
            ("REDIS_COMMAND_TIMEOUT_MS", "50"),
            ("RATE_LIMIT_FAIL_CLOSED", "true"),
        ])
        .unwrap();
        let redis = c.redis.as_ref().unwrap();
        assert_eq!(redis.command_timeout, Duration::from_millis(50));
        assert_eq!(redis.connect_timeout, Duration::from_secs(1));
        assert!(c.rate_limit.fail_closed);
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("[redacted]"));
    }

    #[test]
    fn bad_values_name_the_variable_without_echoing_it() {
        let err = config(&[("RATE_LIMIT_PER_KEY", "lots")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value for RATE_LIMIT_PER_KEY: expected a positive integer"
        );
        let err = config(&[("RATE_LIMIT_PER_KEY", "0")]).unwrap_err();
        assert!(err.to_string().contains("RATE_LIMIT_PER_KEY"));
        let err = config(&[("LOG_FORMAT", "xml")]).unwrap_err();
        assert!(err.to_string().contains("LOG_FORMAT"));
        let err = config(&[("RATE_LIMIT_FAIL_CLOSED", "maybe")]).unwrap_err();
        assert!(err.to_string().contains("RATE_LIMIT_FAIL_CLOSED"));
    }

    #[test]
    fn trusted_proxies_replace_the_old_boolean_with_a_clear_error() {
        assert!(config(&[]).unwrap().rate_limit.trusted_proxies.is_empty());
        let c = config(&[(
            "TRUSTED_PROXIES",
            " 10.0.0.0/8, 192.0.2.7 ,::1, 2001:db8::/32",
        )])
        .unwrap();
        let nets: Vec<String> = c
            .rate_limit
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            nets,
            ["10.0.0.0/8", "192.0.2.7/32", "::1/128", "2001:db8::/32"]
        );
        let err = config(&[("TRUSTED_PROXIES", "10.0.0.0/8, proxy.internal")]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid value for TRUSTED_PROXIES"),
            "{err}"
        );
        assert!(!err.to_string().contains("proxy.internal"), "{err}");
        for old in ["true", "false"] {
            let err = config(&[("TRUST_X_FORWARDED_FOR", old)])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("TRUST_X_FORWARDED_FOR is no longer supported")
                    && err.contains("TRUSTED_PROXIES"),
                "{err}"
            );
        }
    }

    #[test]
    fn connection_limits_have_defaults_and_are_read() {
        let c = config(&[]).unwrap();
        assert_eq!(c.http.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.http.max_connections, 4096);
        let c = config(&[
            ("HTTP_HEADER_READ_TIMEOUT_MS", "250"),
            ("HTTP_MAX_CONNECTIONS", "8"),
        ])
        .unwrap();
        assert_eq!(c.http.header_read_timeout, Duration::from_millis(250));
        assert_eq!(c.http.max_connections, 8);
        assert!(config(&[("HTTP_MAX_CONNECTIONS", "0")]).is_err());
    }

    #[test]
    fn log_format_is_parsed_as_the_telemetry_set_up_parses_it() {
        for (raw, format) in [
            ("json", LogFormat::Json),
            ("JSON", LogFormat::Json),
            (" Json ", LogFormat::Json),
            ("TEXT", LogFormat::Text),
            ("text", LogFormat::Text),
        ] {
            assert_eq!(
                config(&[("LOG_FORMAT", raw)]).unwrap().log_format,
                format,
                "{raw}"
            );
            assert_eq!(LogFormat::parse(Some(raw)).unwrap(), format, "{raw}");
        }
    }

    #[test]
    fn a_request_timeout_below_the_database_bound_is_refused() {
        let db = |statement_ms: &str| {
            smartbeak_database::DatabaseConfig::from_lookup(|var| match var {
                "DATABASE_URL" => Some("postgres://app@db.internal/smartbeak".to_owned()),
                "DB_STATEMENT_TIMEOUT_MS" => Some(statement_ms.to_owned()),
                _ => None,
            })
            .unwrap()
        };
        // The defaults nest: 10 s >= 8.8 s > 8 s.
        let defaults = config(&[]).unwrap();
        assert!(defaults.check_timeouts(&db("8000")).is_ok());
        // The old default statement timeout (30 s) under the 10 s request timeout.
        let err = defaults
            .check_timeouts(&db("30000"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("HTTP_REQUEST_TIMEOUT_MS") && err.contains("DB_STATEMENT_TIMEOUT_MS"),
            "{err}"
        );
        let longer = config(&[("HTTP_REQUEST_TIMEOUT_MS", "33000")]).unwrap();
        assert!(longer.check_timeouts(&db("30000")).is_ok());
    }

    #[test]
    fn limits_above_one_request_per_millisecond_are_refused() {
        // 1000 per second is the most the script counts exactly.
        let c = config(&[
            ("RATE_LIMIT_WINDOW_SECS", "1"),
            ("RATE_LIMIT_PER_KEY", "1000"),
            ("RATE_LIMIT_PER_IP", "1000"),
        ])
        .unwrap();
        assert_eq!((c.rate_limit.per_key, c.rate_limit.per_ip), (1000, 1000));
        let c = config(&[
            ("RATE_LIMIT_WINDOW_SECS", "3600"),
            ("RATE_LIMIT_PER_KEY", "3600000"),
            ("RATE_LIMIT_PER_IP", "3600000"),
        ])
        .unwrap();
        assert_eq!(c.rate_limit.per_key, 3_600_000);
        for var in ["RATE_LIMIT_PER_KEY", "RATE_LIMIT_PER_IP"] {
            let err = config(&[("RATE_LIMIT_WINDOW_SECS", "1"), (var, "1001")]).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "invalid value for {var}: expected at most RATE_LIMIT_WINDOW_SECS * 1000 (one request per millisecond)"
                )
            );
            // The benchmark's former setting.
            let err = config(&[(var, "1000000000")]).unwrap_err();
            assert!(err.to_string().contains(var), "{err}");
        }
        // The defaults (600 and 1200 per 60 s) are fine.
        assert!(config(&[]).is_ok());
    }
}
