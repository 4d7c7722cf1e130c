//! Breaker configuration (`BreakerConfig`), its validated and fingerprinted
//! form (`BreakerPolicy`) and the registry key part (`PolicyId`).

use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

/// Largest sliding window, in calls.
pub const MAX_WINDOW: u32 = 4096;
/// Largest number of half-open probes.
pub const MAX_PROBES: u32 = 1000;

/// How a breaker decides to trip and to recover. Plain data; validate it with
/// [`BreakerPolicy::new`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BreakerConfig {
    /// Size of the count-based sliding window of recent call outcomes.
    pub window_size: u32,
    /// Calls the window must hold before the failure or slow rate is judged.
    pub minimum_calls: u32,
    /// Trip when failures are at least this percentage of the window (1..=100).
    pub failure_rate_percent: u8,
    /// Trip after this many failures in a row, regardless of the rate; 0 turns
    /// the rule off.
    pub consecutive_failures: u32,
    /// Optional slow-call rule.
    pub slow_calls: Option<SlowCallConfig>,
    /// How long the breaker stays open after its first trip.
    pub open_duration: Duration,
    /// Each further trip without a recovery in between multiplies the open
    /// duration by this factor (at least 1)...
    pub open_backoff_factor: u32,
    /// ...up to this cap.
    pub max_open_duration: Duration,
    /// Probe calls admitted per half-open period (1..=1000). Further callers
    /// are rejected until the probes resolve.
    pub half_open_probes: u32,
    /// Successful probes needed to close (1..=`half_open_probes`); any failed
    /// probe re-opens.
    pub half_open_successes: u32,
    /// Longest a half-open breaker waits for an outstanding probe: when a
    /// probe admitted in this half-open period is still running this long
    /// after the breaker went from no outstanding probe to one, the next
    /// caller re-opens it (counted as a failed trial), so a hung probe cannot
    /// wedge it. With no probe outstanding the wait does not run: a
    /// low-traffic adapter whose probes all returned stays half-open until
    /// its next call, however late, and that call is admitted as a probe.
    pub half_open_max_wait: Duration,
    /// What a call dropped before it finished means while closed.
    pub cancelled_calls: CancelledCalls,
}

impl Default for BreakerConfig {
    /// Window 50, minimum 10 calls, 50 % failure rate, 5 consecutive
    /// failures, no slow-call rule, open 30 s doubling up to 5 min, 3 probes
    /// of which 2 must succeed, 60 s half-open wait, cancellations ignored.
    fn default() -> Self {
        Self {
            window_size: 50,
            minimum_calls: 10,
            failure_rate_percent: 50,
            consecutive_failures: 5,
            slow_calls: None,
            open_duration: Duration::from_secs(30),
            open_backoff_factor: 2,
            max_open_duration: Duration::from_secs(300),
            half_open_probes: 3,
            half_open_successes: 2,
            half_open_max_wait: Duration::from_secs(60),
            cancelled_calls: CancelledCalls::Ignore,
        }
    }
}

/// Slow-call rule: trip when at least `rate_percent` of the window took
/// `threshold` or longer (successful or not). A slow probe counts as a failed
/// probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlowCallConfig {
    /// A call taking at least this long is slow.
    pub threshold: Duration,
    /// Trip when slow calls are at least this percentage of the window (1..=100).
    pub rate_percent: u8,
}

/// What a call whose future was dropped before completion (a caller's
/// timeout, a client disconnect) means for a closed breaker. A dropped
/// half-open probe always just hands its slot back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CancelledCalls {
    /// Not recorded in the window (only counted in
    /// [`BreakerSnapshot::cancelled_calls`](crate::BreakerSnapshot)). The
    /// default: client disconnects are attacker-controlled and must not open
    /// a breaker for everyone; put the timeout inside the breaker (as
    /// [`Resilience`](crate::Resilience) does) so deadlines are classified.
    #[default]
    Ignore,
    /// Recorded as a failure.
    CountAsFailure,
}

/// A [`BreakerConfig`] that passed validation, with its fingerprint.
///
/// The fingerprint ([`PolicyId`]) is derived from the configuration itself,
/// so equal configurations share registry entries. Different ones never do:
/// equality compares the configurations as well, so even a 64-bit hash
/// collision cannot make two thresholds share a breaker. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BreakerPolicy {
    id: PolicyId,
    config: Arc<BreakerConfig>,
}

/// Fingerprint of a [`BreakerPolicy`]'s configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyId(pub u64);

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A [`BreakerConfig`] field is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid breaker config: {field} {reason}")]
pub struct ConfigError {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl BreakerPolicy {
    /// Validates `config` and fingerprints it.
    pub fn new(config: BreakerConfig) -> Result<Self, ConfigError> {
        validate(&config)?;
        // DefaultHasher::new() uses fixed keys: stable within a process.
        let mut hasher = DefaultHasher::new();
        config.hash(&mut hasher);
        Ok(Self {
            id: PolicyId(hasher.finish()),
            config: Arc::new(config),
        })
    }

    /// The fingerprint used as part of the registry key.
    pub fn id(&self) -> PolicyId {
        self.id
    }

    /// The validated configuration.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }
}

impl Default for BreakerPolicy {
    /// [`BreakerConfig::default`], which is valid.
    fn default() -> Self {
        let config = BreakerConfig::default();
        let mut hasher = DefaultHasher::new();
        config.hash(&mut hasher);
        Self {
            id: PolicyId(hasher.finish()),
            config: Arc::new(config),
        }
    }
}

impl BreakerPolicy {
    /// The `policy` label of the breaker metrics: `"default"` for
    /// [`BreakerConfig::default`], else the 16 hex digits of the
    /// [`PolicyId`]. The label set is bounded by the policies the program
    /// defines (configurations are code or start-up config, never request
    /// input); a label is stable for a given build and changes when the
    /// configuration does, which makes a different policy a different series.
    pub fn label(&self) -> String {
        if *self.config == BreakerConfig::default() {
            "default".to_owned()
        } else {
            self.id.to_string()
        }
    }

    /// A policy with a forced fingerprint, to test what a 64-bit collision
    /// does.
    #[cfg(test)]
    pub(crate) fn with_forced_id(config: BreakerConfig, id: PolicyId) -> Self {
        Self {
            id,
            config: Arc::new(config),
        }
    }
}

/// Equal when the fingerprints match *and* the configurations do (the same
/// allocation, else field by field): a 64-bit collision between two
/// different configurations never makes them equal.
impl PartialEq for BreakerPolicy {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && (Arc::ptr_eq(&self.config, &other.config) || *self.config == *other.config)
    }
}

impl Eq for BreakerPolicy {}

/// Hashes the fingerprint only (equal policies have equal fingerprints), so
/// a registry lookup hashes eight bytes and compares the configuration only
/// on a hit.
impl Hash for BreakerPolicy {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

fn validate(c: &BreakerConfig) -> Result<(), ConfigError> {
    let bad = |field, reason| Err(ConfigError { field, reason });
    if c.window_size == 0 || c.window_size > MAX_WINDOW {
        return bad("window_size", "must be 1..=4096");
    }
    if c.minimum_calls == 0 || c.minimum_calls > c.window_size {
        return bad("minimum_calls", "must be 1..=window_size");
    }
    if c.failure_rate_percent == 0 || c.failure_rate_percent > 100 {
        return bad("failure_rate_percent", "must be 1..=100");
    }
    if let Some(slow) = c.slow_calls {
        if slow.rate_percent == 0 || slow.rate_percent > 100 {
            return bad("slow_calls.rate_percent", "must be 1..=100");
        }
        if slow.threshold.is_zero() {
            return bad("slow_calls.threshold", "must be positive");
        }
    }
    if c.open_duration.is_zero() {
        return bad("open_duration", "must be positive");
    }
    if c.max_open_duration < c.open_duration {
        return bad("max_open_duration", "must be at least open_duration");
    }
    if c.open_backoff_factor == 0 {
        return bad("open_backoff_factor", "must be at least 1");
    }
    if c.half_open_probes == 0 || c.half_open_probes > MAX_PROBES {
        return bad("half_open_probes", "must be 1..=1000");
    }
    if c.half_open_successes == 0 || c.half_open_successes > c.half_open_probes {
        return bad("half_open_successes", "must be 1..=half_open_probes");
    }
    if c.half_open_max_wait.is_zero() {
        return bad("half_open_max_wait", "must be positive");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn default_is_valid_and_fingerprint_follows_content() {
        let a = BreakerPolicy::new(BreakerConfig::default()).unwrap();
        assert_eq!(a, BreakerPolicy::default());
        let b = BreakerPolicy::new(BreakerConfig {
            failure_rate_percent: 60,
            ..BreakerConfig::default()
        })
        .unwrap();
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn rejects_out_of_range_fields() {
        let cases = [
            BreakerConfig {
                window_size: 0,
                ..Default::default()
            },
            BreakerConfig {
                minimum_calls: 51,
                ..Default::default()
            },
            BreakerConfig {
                failure_rate_percent: 101,
                ..Default::default()
            },
            BreakerConfig {
                half_open_successes: 4,
                ..Default::default()
            },
            BreakerConfig {
                half_open_probes: 0,
                ..Default::default()
            },
            BreakerConfig {
                max_open_duration: Duration::from_secs(1),
                ..Default::default()
            },
            BreakerConfig {
                open_backoff_factor: 0,
                ..Default::default()
            },
            BreakerConfig {
                half_open_max_wait: Duration::ZERO,
                ..Default::default()
            },
            BreakerConfig {
                slow_calls: Some(SlowCallConfig {
                    threshold: Duration::ZERO,
                    rate_percent: 50,
                }),
                ..Default::default()
            },
        ];
        for config in cases {
            assert!(BreakerPolicy::new(config.clone()).is_err(), "{config:?}");
        }
    }
}
