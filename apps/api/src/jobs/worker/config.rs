//! The worker's configuration: `EXPORT_*` variables with defaults, parsed by the api's
//! parsers (`crate::config`), so both binaries word an invalid value the same way. The
//! database (`DB_*`) and shutdown (`SHUTDOWN_*`) settings are read by their own crates.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{ConfigError, DEFAULT_EXPORT_DIR, Env, LogFormat};
use crate::jobs::export::{DEFAULT_MAX_BYTES, DEFAULT_ZIP_LEVEL, MAX_ZIP_LEVEL};

const ZIP_LEVEL_EXPECTED: &str = "an integer from 0 (stored) to 9";

/// Default `EXPORT_CONCURRENCY`.
pub const DEFAULT_CONCURRENCY: usize = 5;
/// Default `EXPORT_TTL_HOURS` (a week).
pub const DEFAULT_TTL_HOURS: u64 = 168;
/// Default `EXPORT_LEASE_SECS`.
pub const DEFAULT_LEASE_SECS: u64 = 30;
/// Default `EXPORT_HEARTBEAT_SECS`.
pub const DEFAULT_HEARTBEAT_SECS: u64 = 10;
/// Default `EXPORT_POLL_MAX_MS`.
pub const DEFAULT_POLL_MAX_MS: u64 = 5_000;
/// Default `EXPORT_REAPER_INTERVAL_SECS`.
pub const DEFAULT_REAPER_INTERVAL_SECS: u64 = 10;
/// Default `EXPORT_RETRY_BASE_MS`.
pub const DEFAULT_RETRY_BASE_MS: u64 = 1_000;
/// Default `EXPORT_RETRY_MAX_MS` (5 minutes).
pub const DEFAULT_RETRY_MAX_MS: u64 = 300_000;
/// Default `EXPORT_ADMIN_ADDR`.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9465";
/// Default `SHUTDOWN_POOL_CLOSE_MS`.
pub const DEFAULT_POOL_CLOSE_MS: u64 = 5_000;
/// The first idle poll's delay; it doubles up to `EXPORT_POLL_MAX_MS`.
pub const POLL_MIN: Duration = Duration::from_millis(100);

/// Everything the worker reads from its environment (besides `DB_*` and `SHUTDOWN_*`).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `EXPORT_DIR`, default `./exports` (the api's variable: it serves the downloads).
    pub export_dir: PathBuf,
    /// `EXPORT_CONCURRENCY`, default 5: exports running at once in this worker.
    pub concurrency: NonZeroUsize,
    /// `EXPORT_MAX_BYTES`, default 10 MiB: the largest file an export may write.
    pub max_bytes: u64,
    /// `EXPORT_ZIP_LEVEL`, default 1: a CSV export's ZIP entries are stored at 0, deflated
    /// at 1 (fastest) to 9 (smallest).
    pub zip_level: u8,
    /// `EXPORT_TTL_HOURS`, default 168: a finished file's `expires_at` is this far ahead.
    pub ttl: Duration,
    /// `EXPORT_LEASE_SECS`, default 30: how long a claim holds without a heartbeat.
    pub lease: Duration,
    /// `EXPORT_HEARTBEAT_SECS`, default 10, below the lease: how often a running job renews
    /// its lease (`queue::heartbeat`). Its cancel check (a read of the fence, or the
    /// progress write when the progress changed) runs every `min(1 s, this)` besides, so a
    /// cancel is seen within a second.
    pub heartbeat: Duration,
    /// `EXPORT_POLL_MAX_MS`, default 5000: idle polls back off from 100 ms up to this. A
    /// `NOTIFY` wakes the worker at once; polling catches retries falling due and
    /// covers a lost listener connection.
    pub poll_max: Duration,
    /// `EXPORT_REAPER_INTERVAL_SECS`, default 10: how often this worker reclaims expired
    /// leases (and refreshes the queue gauges).
    pub reaper_interval: Duration,
    /// `EXPORT_RETRY_BASE_MS`, default 1000: backoff ceiling of the first retry of a failed
    /// attempt (doubling, full jitter, `smartbeak_resilience::RetryPolicy`).
    pub retry_base: Duration,
    /// `EXPORT_RETRY_MAX_MS`, default 300000: largest backoff ceiling.
    pub retry_max: Duration,
    /// `EXPORT_WORKER_ID`, default `<hostname>-<pid>`: the lease owner and attempt worker.
    pub worker_id: String,
    /// `EXPORT_ADMIN_ADDR`, default `127.0.0.1:9465` (port 0 picks a free port):
    /// `/healthz`, `/readyz`, `/metrics`.
    pub admin_addr: SocketAddr,
    /// `SHUTDOWN_POOL_CLOSE_MS`, default 5000: how long the pools get to close at shutdown.
    pub pool_close_deadline: Duration,
    /// `LOG_FORMAT`, default text.
    pub log_format: LogFormat,
}

impl WorkerConfig {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `lookup` (the CLI passes its flags, tests a map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&lookup);
        let log_format = LogFormat::parse(env.string("LOG_FORMAT").as_deref()).map_err(|_| {
            ConfigError::Invalid {
                var: "LOG_FORMAT",
                expected: "json or text",
            }
        })?;
        let concurrency: usize = env.positive("EXPORT_CONCURRENCY", DEFAULT_CONCURRENCY)?;
        let concurrency = NonZeroUsize::new(concurrency).ok_or(ConfigError::Invalid {
            var: "EXPORT_CONCURRENCY",
            expected: "a positive integer",
        })?;
        let lease = Duration::from_secs(env.positive("EXPORT_LEASE_SECS", DEFAULT_LEASE_SECS)?);
        let heartbeat =
            Duration::from_secs(env.positive("EXPORT_HEARTBEAT_SECS", DEFAULT_HEARTBEAT_SECS)?);
        if heartbeat >= lease {
            return Err(ConfigError::Invalid {
                var: "EXPORT_HEARTBEAT_SECS",
                expected: "a number of seconds below EXPORT_LEASE_SECS",
            });
        }
        let ttl_hours: u64 = env.positive("EXPORT_TTL_HOURS", DEFAULT_TTL_HOURS)?;
        // 100 years at most, so `now + ttl` is a valid timestamp.
        if ttl_hours > 876_000 {
            return Err(ConfigError::Invalid {
                var: "EXPORT_TTL_HOURS",
                expected: "a positive number of hours up to 876000",
            });
        }
        let retry_base = env.millis("EXPORT_RETRY_BASE_MS", DEFAULT_RETRY_BASE_MS)?;
        let retry_max = env.millis("EXPORT_RETRY_MAX_MS", DEFAULT_RETRY_MAX_MS)?;
        if retry_max < retry_base {
            return Err(ConfigError::Invalid {
                var: "EXPORT_RETRY_MAX_MS",
                expected: "at least EXPORT_RETRY_BASE_MS",
            });
        }
        let worker_id = match env.string("EXPORT_WORKER_ID") {
            Some(id) if id.trim().len() > 200 => {
                return Err(ConfigError::Invalid {
                    var: "EXPORT_WORKER_ID",
                    expected: "at most 200 characters",
                });
            }
            Some(id) => id.trim().to_owned(),
            None => default_worker_id(),
        };
        let zip_level = env
            .parse::<u8>("EXPORT_ZIP_LEVEL", ZIP_LEVEL_EXPECTED)?
            .unwrap_or(DEFAULT_ZIP_LEVEL);
        if zip_level > MAX_ZIP_LEVEL {
            return Err(ConfigError::Invalid {
                var: "EXPORT_ZIP_LEVEL",
                expected: ZIP_LEVEL_EXPECTED,
            });
        }
        let default_admin = SocketAddr::from(([127, 0, 0, 1], 9465));
        Ok(Self {
            export_dir: env
                .string("EXPORT_DIR")
                .map_or_else(|| PathBuf::from(DEFAULT_EXPORT_DIR), PathBuf::from),
            concurrency,
            max_bytes: env.positive("EXPORT_MAX_BYTES", DEFAULT_MAX_BYTES)?,
            zip_level,
            ttl: Duration::from_secs(ttl_hours * 3600),
            lease,
            heartbeat,
            poll_max: env
                .millis("EXPORT_POLL_MAX_MS", DEFAULT_POLL_MAX_MS)?
                .max(POLL_MIN),
            reaper_interval: Duration::from_secs(
                env.positive("EXPORT_REAPER_INTERVAL_SECS", DEFAULT_REAPER_INTERVAL_SECS)?,
            ),
            retry_base,
            retry_max,
            worker_id,
            admin_addr: env
                .parse("EXPORT_ADMIN_ADDR", "a socket address like 127.0.0.1:9465")?
                .unwrap_or(default_admin),
            pool_close_deadline: env.millis("SHUTDOWN_POOL_CLOSE_MS", DEFAULT_POOL_CLOSE_MS)?,
            log_format,
        })
    }

    /// Checks that the database client bound nests under the lease: a heartbeat may take
    /// up to `DatabaseConfig::query_timeout`, and must be able to return before the lease
    /// it renews has run out; and that the local lease deadline (`lease - query timeout`
    /// after the last renewal, when a job stops by itself) leaves room for the next
    /// heartbeats: `EXPORT_LEASE_SECS >= 2 x EXPORT_HEARTBEAT_SECS + query timeout` (the
    /// next renewal goes out a heartbeat after the previous one's answer, which may take
    /// up to the query timeout, and one failed renewal must leave time for a second). The
    /// error names the variables.
    pub fn check_timeouts(
        &self,
        db: &smartbeak_database::DatabaseConfig,
    ) -> Result<(), smartbeak_database::ConfigError> {
        db.check_deadline("EXPORT_LEASE_SECS", self.lease)?;
        let bound = db.query_timeout();
        if self.lease < self.heartbeat * 2 + bound {
            return Err(smartbeak_database::ConfigError::Invalid {
                var: "EXPORT_LEASE_SECS",
                reason: format!(
                    "EXPORT_LEASE_SECS ({} s) is below twice EXPORT_HEARTBEAT_SECS ({} s) plus \
                     the database client bound of {} ms (DB_STATEMENT_TIMEOUT_MS {} ms plus a \
                     margin): a job could stop at its local lease deadline before its next \
                     heartbeat is answered; raise EXPORT_LEASE_SECS or lower EXPORT_HEARTBEAT_SECS or \
                     DB_STATEMENT_TIMEOUT_MS",
                    self.lease.as_secs(),
                    self.heartbeat.as_secs(),
                    bound.as_millis(),
                    db.statement_timeout.as_millis()
                ),
            });
        }
        Ok(())
    }

    /// How often a running job checks its fence (the cancel check), at most a second.
    pub fn check_interval(&self) -> Duration {
        self.heartbeat.min(Duration::from_secs(1))
    }
}

/// `<hostname>-<pid>`: unique per process on a machine, readable in the attempts table.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::HashMap;

    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<WorkerConfig, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        WorkerConfig::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults() {
        let c = config(&[]).unwrap();
        assert_eq!(c.export_dir, PathBuf::from("./exports"));
        assert_eq!(c.concurrency.get(), 5);
        assert_eq!(c.max_bytes, DEFAULT_MAX_BYTES);
        assert_eq!(c.zip_level, 1);
        assert_eq!(config(&[("EXPORT_ZIP_LEVEL", "0")]).unwrap().zip_level, 0);
        assert_eq!(config(&[("EXPORT_ZIP_LEVEL", "9")]).unwrap().zip_level, 9);
        assert_eq!(c.ttl, Duration::from_secs(168 * 3600));
        assert_eq!(c.lease, Duration::from_secs(30));
        assert_eq!(c.heartbeat, Duration::from_secs(10));
        assert_eq!(c.check_interval(), Duration::from_secs(1));
        assert_eq!(c.poll_max, Duration::from_secs(5));
        assert_eq!(c.reaper_interval, Duration::from_secs(10));
        assert_eq!(c.admin_addr, DEFAULT_ADMIN_ADDR.parse().unwrap());
        assert!(c.worker_id.ends_with(&format!("-{}", std::process::id())));
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, value) in [
            ("EXPORT_CONCURRENCY", "0"),
            ("EXPORT_CONCURRENCY", "many"),
            ("EXPORT_MAX_BYTES", "-1"),
            ("EXPORT_LEASE_SECS", "0"),
            ("EXPORT_ADMIN_ADDR", "localhost"),
            ("EXPORT_TTL_HOURS", "99999999"),
            ("EXPORT_POLL_MAX_MS", "soon"),
            ("EXPORT_ZIP_LEVEL", "10"),
            ("EXPORT_ZIP_LEVEL", "-1"),
            ("EXPORT_ZIP_LEVEL", "fast"),
        ] {
            let err = config(&[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(var), "{var}={value}: {err}");
        }
    }

    #[test]
    fn the_heartbeat_must_be_below_the_lease() {
        let err = config(&[("EXPORT_LEASE_SECS", "5"), ("EXPORT_HEARTBEAT_SECS", "5")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("EXPORT_HEARTBEAT_SECS") && err.contains("EXPORT_LEASE_SECS"),
            "{err}"
        );
        let c = config(&[("EXPORT_LEASE_SECS", "2"), ("EXPORT_HEARTBEAT_SECS", "1")]).unwrap();
        assert_eq!(c.check_interval(), Duration::from_secs(1));
    }

    #[test]
    fn the_lease_must_cover_the_database_bound() {
        let db = |statement_ms: &str| {
            smartbeak_database::DatabaseConfig::from_lookup(|var| match var {
                "DATABASE_URL" => Some("postgres://app@db.internal/smartbeak".to_owned()),
                "DB_STATEMENT_TIMEOUT_MS" => Some(statement_ms.to_owned()),
                _ => None,
            })
            .unwrap()
        };
        let defaults = config(&[]).unwrap();
        assert!(defaults.check_timeouts(&db("8000")).is_ok());
        let short = config(&[("EXPORT_LEASE_SECS", "3"), ("EXPORT_HEARTBEAT_SECS", "1")]).unwrap();
        let err = short.check_timeouts(&db("8000")).unwrap_err().to_string();
        assert!(
            err.contains("EXPORT_LEASE_SECS") && err.contains("DB_STATEMENT_TIMEOUT_MS"),
            "{err}"
        );
        assert!(short.check_timeouts(&db("700")).is_ok());
        // The client bound (1750 ms) fits the lease with one heartbeat of 1 s, not with the
        // two it must leave room for.
        let err = short.check_timeouts(&db("1500")).unwrap_err().to_string();
        assert!(
            err.contains("EXPORT_HEARTBEAT_SECS") && err.contains("local lease deadline"),
            "{err}"
        );
        let slow = config(&[("EXPORT_LEASE_SECS", "3"), ("EXPORT_HEARTBEAT_SECS", "2")]).unwrap();
        let err = slow.check_timeouts(&db("700")).unwrap_err().to_string();
        assert!(
            err.contains("EXPORT_HEARTBEAT_SECS") && err.contains("local lease deadline"),
            "{err}"
        );
    }
}
