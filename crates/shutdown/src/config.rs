//! Shutdown configuration: the overall deadline and the drain deadline, read
//! from `SHUTDOWN_TIMEOUT_MS` and `SHUTDOWN_DRAIN_TIMEOUT_MS`.

use std::time::Duration;

/// Environment variable holding the overall shutdown deadline in milliseconds.
pub const TIMEOUT_ENV: &str = "SHUTDOWN_TIMEOUT_MS";

/// Environment variable holding the deadline, in milliseconds, for the
/// built-in wait on tracked in-flight tasks (phase [`Phase::Drain`](crate::Phase::Drain)).
pub const DRAIN_TIMEOUT_ENV: &str = "SHUTDOWN_DRAIN_TIMEOUT_MS";

/// Default overall deadline: 30 s (see [`ShutdownConfig`] for the relation
/// with Kubernetes' grace period).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long shutdown may take, overall and for draining tracked tasks.
///
/// # Relation with Kubernetes
///
/// When a pod is deleted, Kubernetes runs the `preStop` hook, then sends
/// SIGTERM, then sends SIGKILL once `terminationGracePeriodSeconds` (default
/// 30 s) have passed **since the start of the termination, `preStop`
/// included**. The deadline here is counted from the moment shutdown is
/// triggered (the SIGTERM), so a deployment must keep
///
/// ```text
/// terminationGracePeriodSeconds >= preStop sleep + SHUTDOWN_TIMEOUT_MS / 1000 + margin
/// ```
///
/// where the margin (a few seconds) covers flushing logs and the exit itself.
/// The default deadline is 30 s, so with the default 30 s grace period it
/// leaves **no** margin: a deployment that keeps the default grace period
/// and adds a `preStop` sleep for endpoint propagation (say 5 s) should set
/// `SHUTDOWN_TIMEOUT_MS=20000`; one that keeps the default deadline should
/// raise `terminationGracePeriodSeconds` to 40 (5 s `preStop` + 30 s + 5 s).
/// Past the deadline the report names the handlers still running and the
/// exit code is [`exit_code::DEADLINE_EXCEEDED`](crate::exit_code::DEADLINE_EXCEEDED),
/// so a slow shutdown is visible instead of ending in an anonymous SIGKILL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownConfig {
    /// Overall deadline, counted from the trigger (signal or
    /// [`Shutdown::trigger`](crate::Shutdown::trigger)). Past it, handlers
    /// still running are aborted and reported, later phases do not run, and
    /// the exit code is [`exit_code::DEADLINE_EXCEEDED`](crate::exit_code::DEADLINE_EXCEEDED).
    pub timeout: Duration,
    /// Own timeout of the built-in `in-flight-tasks` entry of the drain
    /// phase, which waits for every task spawned through the coordinator.
    /// `None` bounds it by the overall deadline only. Read from the
    /// environment, an unset [`DRAIN_TIMEOUT_ENV`] means two thirds of the
    /// overall deadline (20 s of 30 s), so that the release phase (closing
    /// the pools) still runs when some task never finishes.
    pub drain_timeout: Option<Duration>,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            drain_timeout: None,
        }
    }
}

impl ShutdownConfig {
    /// Reads [`TIMEOUT_ENV`] and [`DRAIN_TIMEOUT_ENV`] from the process
    /// environment; an unset timeout keeps the default, an unset drain
    /// timeout is two thirds of the overall one.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] when a variable is set but is not a positive
    /// integer number of milliseconds (or is not valid Unicode).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| {
            std::env::var_os(name).map(|value| {
                value
                    .into_string()
                    .unwrap_or_else(|raw| raw.to_string_lossy().into_owned())
            })
        })
    }

    /// Like [`from_env`](Self::from_env), with values looked up through
    /// `lookup` (for binaries with their own configuration source, and tests).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] when a value is not a positive integer number
    /// of milliseconds.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut config = Self::default();
        if let Some(value) = lookup(TIMEOUT_ENV) {
            config.timeout = parse_millis(TIMEOUT_ENV, &value)?;
        }
        config.drain_timeout = Some(match lookup(DRAIN_TIMEOUT_ENV) {
            Some(value) => parse_millis(DRAIN_TIMEOUT_ENV, &value)?,
            None => config.timeout * 2 / 3,
        });
        Ok(config)
    }

    /// Returns the configuration with the overall deadline set to `timeout`.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Returns the configuration with the drain deadline set to `drain_timeout`.
    #[must_use]
    pub fn with_drain_timeout(mut self, drain_timeout: Duration) -> Self {
        self.drain_timeout = Some(drain_timeout);
        self
    }
}

/// A configuration value that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The variable is set to something other than a positive integer.
    #[error("invalid {var} value {value:?}: expected a positive integer number of milliseconds")]
    Invalid {
        /// Name of the variable.
        var: &'static str,
        /// The value found.
        value: String,
    },
}

fn parse_millis(var: &'static str, value: &str) -> Result<Duration, ConfigError> {
    match value.trim().parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(ConfigError::Invalid {
            var,
            value: value.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn lookup<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn defaults_when_unset() {
        let config = ShutdownConfig::from_lookup(lookup(&[])).unwrap();
        assert_eq!(config.timeout, Duration::from_secs(30));
        assert_eq!(config.drain_timeout, Some(Duration::from_secs(20)));
        let config = ShutdownConfig::from_lookup(lookup(&[(TIMEOUT_ENV, "9000")])).unwrap();
        assert_eq!(config.drain_timeout, Some(Duration::from_secs(6)));
    }

    #[test]
    fn reads_both_values() {
        let config = ShutdownConfig::from_lookup(lookup(&[
            (TIMEOUT_ENV, "20000"),
            (DRAIN_TIMEOUT_ENV, " 15000 "),
        ]))
        .unwrap();
        assert_eq!(config.timeout, Duration::from_secs(20));
        assert_eq!(config.drain_timeout, Some(Duration::from_secs(15)));
    }

    #[test]
    fn rejects_zero_negative_and_garbage() {
        for bad in ["0", "-5", "30s", ""] {
            let err = ShutdownConfig::from_lookup(lookup(&[(TIMEOUT_ENV, bad)])).unwrap_err();
            assert_eq!(
                err,
                ConfigError::Invalid {
                    var: TIMEOUT_ENV,
                    value: bad.to_owned()
                }
            );
        }
        let err = ShutdownConfig::from_lookup(lookup(&[(DRAIN_TIMEOUT_ENV, "x")])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid SHUTDOWN_DRAIN_TIMEOUT_MS value \"x\"")
        );
    }
}
