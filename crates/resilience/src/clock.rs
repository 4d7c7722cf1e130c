//! Time sources. Breakers, the registry, the retry budget and the retry loop
//! read time only through [`Clock`], as nanoseconds since the clock's own
//! origin, so tests can drive them with a [`ManualClock`] shared across
//! threads (unlike failsafe's thread-local test clock).
//!
//! The default [`SystemClock`] reads the CPU's invariant TSC through
//! `quanta` (about 10 ns a read on the bench box, against 25-35 ns for
//! `std::time::Instant::now`), which is what keeps a rejection and a registry
//! hit under 40 ns; `quanta` falls back to the OS monotonic clock where the
//! TSC is not usable.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// A monotonic time source.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Nanoseconds since this clock's fixed origin; never decreases.
    fn now_nanos(&self) -> u64;
}

/// A clock shared by a breaker, a registry or a budget.
pub type SharedClock = Arc<dyn Clock>;

/// The real monotonic clock (TSC via `quanta`), origin at its first read in
/// the process.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[inline]
    fn now_nanos(&self) -> u64 {
        static ORIGIN: OnceLock<quanta::Instant> = OnceLock::new();
        let origin = *ORIGIN.get_or_init(quanta::Instant::now);
        duration_nanos(quanta::Instant::now().saturating_duration_since(origin))
    }
}

/// `std::time::Instant`, origin at creation. Slower than [`SystemClock`];
/// for callers that want the standard library's clock.
#[derive(Debug, Clone, Copy)]
pub struct StdClock {
    origin: std::time::Instant,
}

impl StdClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        Self {
            origin: std::time::Instant::now(),
        }
    }
}

impl Default for StdClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for StdClock {
    fn now_nanos(&self) -> u64 {
        duration_nanos(self.origin.elapsed())
    }
}

/// Tokio's clock ([`tokio::time::Instant`]), origin at creation: follows a
/// paused, auto-advancing runtime in `#[tokio::test(start_paused = true)]`,
/// so breaker deadlines agree with `tokio::time::sleep`. Create it inside
/// the runtime whose time it should follow.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock whose origin is tokio's now.
    pub fn new() -> Self {
        Self {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now_nanos(&self) -> u64 {
        duration_nanos(self.origin.elapsed())
    }
}

/// A clock that only moves when told to, starting at zero; clones share the
/// same time and it can be advanced from any thread.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves time forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.nanos.fetch_add(duration_nanos(by), Ordering::AcqRel);
    }

    /// How far the clock has been advanced since creation.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Acquire))
    }

    /// This clock as a [`SharedClock`].
    pub fn shared(&self) -> SharedClock {
        Arc::new(self.clone())
    }
}

impl Clock for ManualClock {
    fn now_nanos(&self) -> u64 {
        self.nanos.load(Ordering::Acquire)
    }
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
        let other = clock.clone();
        std::thread::scope(|s| {
            s.spawn(|| other.advance(Duration::from_secs(3)));
        });
        assert_eq!(clock.now_nanos(), 3_000_000_000);
        assert_eq!(clock.elapsed(), Duration::from_secs(3));
    }

    #[test]
    fn real_clocks_do_not_go_backwards() {
        let clocks: [SharedClock; 2] = [Arc::new(SystemClock), Arc::new(StdClock::new())];
        for clock in clocks {
            let mut last = clock.now_nanos();
            for _ in 0..1000 {
                let now = clock.now_nanos();
                assert!(now >= last, "{clock:?}");
                last = now;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let clock = TokioClock::new();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(clock.now_nanos(), 5_000_000_000);
    }
}
