//! Count-based sliding window of call outcomes: a ring of bits per outcome
//! kind, written with single atomic operations (no lock, no allocation after
//! construction). Counts are popcounts, taken only when a failure or slow
//! call might trip the breaker.

use std::sync::atomic::{AtomicU64, Ordering};

use super::CachePadded;

#[derive(Debug)]
pub(super) struct Window {
    size: u64,
    /// Calls recorded since the last reset; slot = calls % size.
    calls: CachePadded<AtomicU64>,
    failures: Box<[AtomicU64]>,
    /// Empty when the slow-call rule is off.
    slow: Box<[AtomicU64]>,
}

/// Counts over the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Counts {
    pub(super) calls: u32,
    pub(super) failures: u32,
    pub(super) slow: u32,
}

impl Window {
    pub(super) fn new(size: u32, track_slow: bool) -> Self {
        let words = (size as usize).div_ceil(64);
        let bits = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect::<Box<[_]>>();
        Self {
            size: u64::from(size),
            calls: CachePadded(AtomicU64::new(0)),
            failures: bits(words),
            slow: bits(if track_slow { words } else { 0 }),
        }
    }

    /// Records one outcome, overwriting the oldest slot.
    #[inline]
    pub(super) fn record(&self, failure: bool, slow: bool) {
        let seq = self.calls.0.fetch_add(1, Ordering::Relaxed);
        let slot = seq % self.size;
        let word = (slot / 64) as usize;
        let mask = 1u64 << (slot % 64);
        if let Some(w) = self.failures.get(word) {
            set_bit(w, mask, failure);
        }
        if let Some(w) = self.slow.get(word) {
            set_bit(w, mask, slow);
        }
    }

    pub(super) fn counts(&self) -> Counts {
        let calls = self.calls.0.load(Ordering::Relaxed).min(self.size);
        let ones = |words: &[AtomicU64]| -> u32 {
            words
                .iter()
                .map(|w| w.load(Ordering::Relaxed).count_ones())
                .sum()
        };
        Counts {
            calls: calls as u32,
            failures: ones(&self.failures),
            slow: ones(&self.slow),
        }
    }

    pub(super) fn reset(&self) {
        self.calls.0.store(0, Ordering::Relaxed);
        for w in self.failures.iter().chain(self.slow.iter()) {
            w.store(0, Ordering::Relaxed);
        }
    }
}

/// Sets or clears `mask` in `word`, skipping the write when it already has
/// that value (a plain load is far cheaper than a contended RMW, and the
/// skipped write linearizes before any concurrent writer of the same slot).
#[inline]
fn set_bit(word: &AtomicU64, mask: u64, on: bool) {
    let current = word.load(Ordering::Relaxed);
    if on {
        if current & mask == 0 {
            word.fetch_or(mask, Ordering::Relaxed);
        }
    } else if current & mask != 0 {
        word.fetch_and(!mask, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slides_over_the_last_size_calls() {
        let w = Window::new(70, true);
        for i in 0..70 {
            w.record(i % 2 == 0, i < 7);
        }
        assert_eq!(
            w.counts(),
            Counts {
                calls: 70,
                failures: 35,
                slow: 7
            }
        );
        for _ in 0..70 {
            w.record(false, false);
        }
        assert_eq!(
            w.counts(),
            Counts {
                calls: 70,
                failures: 0,
                slow: 0
            }
        );
        w.record(true, true);
        assert_eq!(
            w.counts(),
            Counts {
                calls: 70,
                failures: 1,
                slow: 1
            }
        );
        w.reset();
        assert_eq!(
            w.counts(),
            Counts {
                calls: 0,
                failures: 0,
                slow: 0
            }
        );
    }

    #[test]
    fn slow_bits_absent_when_untracked() {
        let w = Window::new(3, false);
        w.record(true, true);
        assert_eq!(
            w.counts(),
            Counts {
                calls: 1,
                failures: 1,
                slow: 0
            }
        );
    }
}
