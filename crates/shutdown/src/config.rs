//! Shutdown configuration: the overall deadline, the drain deadline and the readiness delay,
//! read from `SHUTDOWN_TIMEOUT_MS`, `SHUTDOWN_DRAIN_TIMEOUT_MS` and
//! `SHUTDOWN_READINESS_DELAY_MS`.

use std::time::Duration;

/// Environment variable holding the overall shutdown deadline in milliseconds.
pub const TIMEOUT_ENV: &str = "SHUTDOWN_TIMEOUT_MS";

/// Environment variable holding the deadline, in milliseconds, for the
/// built-in wait on tracked in-flight tasks (phase [`Phase::Drain`](crate::Phase::Drain)).
pub const DRAIN_TIMEOUT_ENV: &str = "SHUTDOWN_DRAIN_TIMEOUT_MS";

/// Environment variable holding the delay, in milliseconds, between the
/// readiness flip (the [`Phase::StopAccepting`](crate::Phase::StopAccepting)
/// handlers) and closing the listener ([`Shutdown::listener_token`](crate::Shutdown::listener_token)).
pub const READINESS_DELAY_ENV: &str = "SHUTDOWN_READINESS_DELAY_MS";

/// Default overall deadline: 25 s, which leaves 5 s of Kubernetes' default
/// 30 s grace period for flushing logs and the exit (see [`ShutdownConfig`]).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(25);

/// The drain deadline when none is set: two thirds of the overall `timeout`,
/// so that the release phase (closing the pools) still runs when some task
/// never finishes (rounded down to whole milliseconds: 16 666 ms of 25 s).
pub fn default_drain_timeout(timeout: Duration) -> Duration {
    let millis = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(millis / 3 * 2 + millis % 3 * 2 / 3)
}

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
/// The default deadline is 25 s, so with the default 30 s grace period and no
/// `preStop` hook it leaves a 5 s margin. A deployment that adds a `preStop`
/// sleep for endpoint propagation (say 5 s) should raise
/// `terminationGracePeriodSeconds` to 35 (5 s `preStop` + 25 s + 5 s), or set
/// `SHUTDOWN_TIMEOUT_MS=20000`. The latter does not suit every binary: the export
/// worker (`smartbeak-domain-export worker`) needs a drain deadline of at least its
/// release window plus the database client bound (18.35 s at the default 8 s statement
/// timeout) and refuses to start below it; with a shorter `SHUTDOWN_TIMEOUT_MS` give it a
/// lower `DB_STATEMENT_TIMEOUT_MS` or an explicit `SHUTDOWN_DRAIN_TIMEOUT_MS` that fits
/// (see `apps/api/README.md`, "The export job").
/// The readiness delay ([`readiness_delay`](Self::readiness_delay)) is part
/// of the overall deadline, not added to it.
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
    /// `None` bounds it by the overall deadline only. The default, in
    /// [`Default`] and in [`from_env`](Self::from_env) alike, is
    /// [`default_drain_timeout`]: two thirds of the overall deadline (16.7 s
    /// of 25 s), so that the release phase (closing the pools) still runs
    /// when some task never finishes. [`with_timeout`](Self::with_timeout)
    /// keeps that ratio unless a drain deadline was set explicitly.
    pub drain_timeout: Option<Duration>,
    /// Delay between the readiness flip and closing the listener, for load
    /// balancers that need time to take the instance out of rotation after
    /// its readiness probe fails (default zero). The built-in
    /// [`READINESS_DELAY`](crate::READINESS_DELAY) entry of
    /// [`Phase::StopAccepting`](crate::Phase::StopAccepting) waits this long;
    /// [`Shutdown::listener_token`](crate::Shutdown::listener_token) is
    /// cancelled when that phase ends.
    pub readiness_delay: Duration,
    /// Whether `drain_timeout` was set explicitly (it then no longer follows
    /// the overall deadline).
    drain_explicit: bool,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            drain_timeout: Some(default_drain_timeout(DEFAULT_TIMEOUT)),
            readiness_delay: Duration::ZERO,
            drain_explicit: false,
        }
    }
}

impl ShutdownConfig {
    /// Reads [`TIMEOUT_ENV`], [`DRAIN_TIMEOUT_ENV`] and [`READINESS_DELAY_ENV`]
    /// from the process environment; an unset variable keeps the value of
    /// [`ShutdownConfig::default`] (the drain deadline two thirds of the
    /// overall one, no readiness delay).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] when a deadline is set but is not a positive
    /// integer number of milliseconds, when the readiness delay is not a
    /// non-negative one, or when a value is not valid Unicode.
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
    /// [`ConfigError::Invalid`] as for [`from_env`](Self::from_env).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut config = Self::default();
        if let Some(value) = lookup(TIMEOUT_ENV) {
            config = config.with_timeout(parse_millis(TIMEOUT_ENV, &value, 1)?);
        }
        if let Some(value) = lookup(DRAIN_TIMEOUT_ENV) {
            config = config.with_drain_timeout(parse_millis(DRAIN_TIMEOUT_ENV, &value, 1)?);
        }
        if let Some(value) = lookup(READINESS_DELAY_ENV) {
            config.readiness_delay = parse_millis(READINESS_DELAY_ENV, &value, 0)?;
        }
        Ok(config)
    }

    /// Returns the configuration with the overall deadline set to `timeout`;
    /// the drain deadline follows (two thirds) unless it was set explicitly.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        if !self.drain_explicit {
            self.drain_timeout = Some(default_drain_timeout(timeout));
        }
        self
    }

    /// Returns the configuration with the drain deadline set to `drain_timeout`.
    #[must_use]
    pub fn with_drain_timeout(mut self, drain_timeout: Duration) -> Self {
        self.drain_timeout = Some(drain_timeout);
        self.drain_explicit = true;
        self
    }

    /// Returns the configuration with the drain phase bounded by the overall
    /// deadline only.
    #[must_use]
    pub fn without_drain_timeout(mut self) -> Self {
        self.drain_timeout = None;
        self.drain_explicit = true;
        self
    }

    /// Whether the drain deadline was set explicitly ([`DRAIN_TIMEOUT_ENV`],
    /// [`with_drain_timeout`](Self::with_drain_timeout) or
    /// [`without_drain_timeout`](Self::without_drain_timeout)) rather than following the
    /// overall deadline: a binary with a default of its own applies it only when not.
    pub fn drain_is_explicit(&self) -> bool {
        self.drain_explicit
    }

    /// Returns the configuration with the readiness delay set to `delay`.
    #[must_use]
    pub fn with_readiness_delay(mut self, delay: Duration) -> Self {
        self.readiness_delay = delay;
        self
    }
}

/// A configuration value that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The variable is set to something other than an integer number of
    /// milliseconds in its range (positive for deadlines, zero or more for
    /// the readiness delay).
    #[error("invalid {var} value {value:?}: expected {expected} integer number of milliseconds")]
    Invalid {
        /// Name of the variable.
        var: &'static str,
        /// The value found.
        value: String,
        /// What was expected: `"a positive"` or `"a non-negative"`.
        expected: &'static str,
    },
}

fn parse_millis(var: &'static str, value: &str, min: u64) -> Result<Duration, ConfigError> {
    match value.trim().parse::<u64>() {
        Ok(ms) if ms >= min => Ok(Duration::from_millis(ms)),
        _ => Err(ConfigError::Invalid {
            var,
            value: value.to_owned(),
            expected: if min == 0 {
                "a non-negative"
            } else {
                "a positive"
            },
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
        assert_eq!(config.timeout, Duration::from_secs(25));
        assert_eq!(config.drain_timeout, Some(Duration::from_millis(16_666)));
        assert_eq!(config.readiness_delay, Duration::ZERO);
        let config = ShutdownConfig::from_lookup(lookup(&[(TIMEOUT_ENV, "9000")])).unwrap();
        assert_eq!(config.drain_timeout, Some(Duration::from_secs(6)));
    }

    #[test]
    fn default_and_from_env_agree_on_every_field() {
        assert_eq!(
            ShutdownConfig::default(),
            ShutdownConfig::from_lookup(lookup(&[])).unwrap()
        );
        // The builder keeps the same rule as the environment.
        assert_eq!(
            ShutdownConfig::default().with_timeout(Duration::from_secs(9)),
            ShutdownConfig::from_lookup(lookup(&[(TIMEOUT_ENV, "9000")])).unwrap()
        );
        let explicit = ShutdownConfig::default()
            .with_drain_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(9));
        assert_eq!(explicit.drain_timeout, Some(Duration::from_secs(1)));
        assert_eq!(
            ShutdownConfig::default()
                .without_drain_timeout()
                .drain_timeout,
            None
        );
    }

    #[test]
    fn readiness_delay_accepts_zero_and_rejects_garbage() {
        let config = ShutdownConfig::from_lookup(lookup(&[(READINESS_DELAY_ENV, "5000")])).unwrap();
        assert_eq!(config.readiness_delay, Duration::from_secs(5));
        let config = ShutdownConfig::from_lookup(lookup(&[(READINESS_DELAY_ENV, "0")])).unwrap();
        assert_eq!(config.readiness_delay, Duration::ZERO);
        let err = ShutdownConfig::from_lookup(lookup(&[(READINESS_DELAY_ENV, "-1")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid SHUTDOWN_READINESS_DELAY_MS value \"-1\": expected a non-negative integer number of milliseconds"
        );
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
        assert!(config.drain_is_explicit());
        let following = ShutdownConfig::from_lookup(lookup(&[(TIMEOUT_ENV, "20000")])).unwrap();
        assert!(!following.drain_is_explicit());
    }

    #[test]
    fn rejects_zero_negative_and_garbage() {
        for bad in ["0", "-5", "30s", ""] {
            let err = ShutdownConfig::from_lookup(lookup(&[(TIMEOUT_ENV, bad)])).unwrap_err();
            assert_eq!(
                err,
                ConfigError::Invalid {
                    var: TIMEOUT_ENV,
                    value: bad.to_owned(),
                    expected: "a positive",
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
