//! A small circuit breaker around Redis: after `threshold` consecutive failures it opens
//! and requests skip Redis (paying about nothing) until `cooldown` has passed; then exactly
//! one request probes Redis, and its outcome closes or re-opens the breaker.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// What a caller may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Permit {
    /// Closed: call Redis.
    Call,
    /// Half-open: this caller is the single probe; report its outcome.
    Probe,
    /// Open (or another probe is running): do not call Redis.
    Reject,
}

#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

/// Consecutive-failure breaker with a single half-open probe.
#[derive(Debug)]
pub(crate) struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    pub(crate) fn permit(&self) -> Permit {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => Permit::Call,
            State::Open { until } if Instant::now() >= until => {
                *state = State::HalfOpen;
                Permit::Probe
            }
            State::Open { .. } | State::HalfOpen => Permit::Reject,
        }
    }

    pub(crate) fn on_success(&self) {
        *self.lock() = State::Closed { failures: 0 };
    }

    /// Records a failure; returns true if this failure opened the breaker.
    pub(crate) fn on_failure(&self) -> bool {
        let mut state = self.lock();
        let open = State::Open {
            until: Instant::now() + self.cooldown,
        };
        match *state {
            State::Closed { failures } if failures + 1 >= self.threshold => {
                *state = open;
                true
            }
            State::Closed { failures } => {
                *state = State::Closed {
                    failures: failures + 1,
                };
                false
            }
            State::HalfOpen | State::Open { .. } => {
                *state = open;
                false
            }
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        !matches!(*self.lock(), State::Closed { .. })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is always valid, so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_then_probes_once() {
        let breaker = Breaker::new(3, Duration::from_millis(500));
        assert_eq!(breaker.permit(), Permit::Call);
        assert!(!breaker.on_failure());
        assert!(!breaker.on_failure());
        assert!(breaker.on_failure());
        assert_eq!(breaker.permit(), Permit::Reject);

        tokio::time::advance(Duration::from_millis(499)).await;
        assert_eq!(breaker.permit(), Permit::Reject);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(breaker.permit(), Permit::Probe);
        // Only one probe at a time.
        assert_eq!(breaker.permit(), Permit::Reject);

        // A failed probe re-opens for another cooldown.
        breaker.on_failure();
        assert_eq!(breaker.permit(), Permit::Reject);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(breaker.permit(), Permit::Probe);
        breaker.on_success();
        assert_eq!(breaker.permit(), Permit::Call);
        assert!(!breaker.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn success_resets_the_failure_count() {
        let breaker = Breaker::new(2, Duration::from_millis(100));
        breaker.on_failure();
        breaker.on_success();
        assert!(!breaker.on_failure());
        assert_eq!(breaker.permit(), Permit::Call);
    }
}
