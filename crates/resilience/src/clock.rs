//! Time sources. Breakers, the registry and the retry budget read time only
//! through [`Clock`], so tests can drive them with a [`ManualClock`] that is
//! shared across threads (unlike failsafe's thread-local test clock).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A monotonic time source.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current instant; must never go backwards.
    fn now(&self) -> Instant;
}

/// A clock shared by a breaker, a registry or a budget.
pub type SharedClock = Arc<dyn Clock>;

/// The real monotonic clock, [`Instant::now`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[inline]
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Tokio's clock ([`tokio::time::Instant::now`]): follows a paused and
/// auto-advanced runtime in `#[tokio::test(start_paused = true)]`, so breaker
/// deadlines and `tokio::time::sleep` agree. Must be read inside a runtime
/// when time is paused.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    #[inline]
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// A clock that only moves when told to; clones share the same time and it
/// can be advanced from any thread.
#[derive(Debug, Clone)]
pub struct ManualClock {
    inner: Arc<ManualInner>,
}

#[derive(Debug)]
struct ManualInner {
    base: Instant,
    offset_nanos: AtomicU64,
}

impl ManualClock {
    /// A clock frozen at the moment of creation.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(ManualInner {
                base: Instant::now(),
                offset_nanos: AtomicU64::new(0),
            }),
        }
    }

    /// Moves time forward by `by`.
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.inner.offset_nanos.fetch_add(nanos, Ordering::AcqRel);
    }

    /// How far the clock has been advanced since creation.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.inner.offset_nanos.load(Ordering::Acquire))
    }

    /// This clock as a [`SharedClock`].
    pub fn shared(&self) -> SharedClock {
        Arc::new(self.clone())
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.inner.base + self.elapsed()
    }
}

/// Nanoseconds elapsed between `epoch` and `now` (0 if `now` is earlier).
#[inline]
pub(crate) fn nanos_since(epoch: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

/// `d` in nanoseconds, saturating.
#[inline]
pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_is_shared_between_clones_and_threads() {
        let clock = ManualClock::new();
        let start = clock.now();
        let other = clock.clone();
        std::thread::scope(|s| {
            s.spawn(|| other.advance(Duration::from_secs(3)));
        });
        assert_eq!(clock.now() - start, Duration::from_secs(3));
        assert_eq!(clock.elapsed(), Duration::from_secs(3));
    }
}
