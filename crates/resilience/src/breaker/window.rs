//! Count-based sliding window of call outcomes: a ring of bits per outcome
//! kind, written with single atomic operations (no lock, no allocation after
//! construction). Counts are popcounts, taken only when a failure or slow
//! call might trip the breaker.
//!
//! The ring holds a power of two of slots (at least the window size), so a
//! call finds its slot with a mask instead of a 64-bit division on the hot
//! path; `counts` (cold) reads only the slots of the last `size` calls.
//!
//! A success recorded into a full window whose ring holds no set bit changes
//! nothing (the ring stays all zero, the count stays full), so
//! [`Window::success_is_noop`] lets the breaker skip it: with healthy traffic
//! a closed call then writes no shared cache line at all.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use super::CachePadded;

#[derive(Debug)]
pub(super) struct Window {
    /// Calls judged: the last `size` recorded.
    size: u64,
    /// Ring slots minus one (the slot count is `size` rounded up to a power
    /// of two).
    mask: u64,
    /// Calls recorded since the last reset; slot = calls & mask.
    calls: CachePadded<AtomicU64>,
    /// Bits set in the whole ring (failure and slow), counted on every
    /// actual 0 -> 1 and 1 -> 0 flip, the reset's included. Off (even
    /// negative) only while a flip's count is in flight; exact otherwise.
    set_bits: CachePadded<AtomicI64>,
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
        let slots = u64::from(size.max(1)).next_power_of_two();
        let words = (slots as usize).div_ceil(64);
        let bits = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect::<Box<[_]>>();
        Self {
            size: u64::from(size),
            mask: slots - 1,
            calls: CachePadded(AtomicU64::new(0)),
            set_bits: CachePadded(AtomicI64::new(0)),
            failures: bits(words),
            slow: bits(if track_slow { words } else { 0 }),
        }
    }

    /// Records one outcome, overwriting the oldest slot.
    #[inline]
    pub(super) fn record(&self, failure: bool, slow: bool) {
        let seq = self.calls.0.fetch_add(1, Ordering::Relaxed);
        let slot = seq & self.mask;
        let word = (slot / 64) as usize;
        let mask = 1u64 << (slot % 64);
        if let Some(w) = self.failures.get(word) {
            self.set_bit(w, mask, failure);
        }
        if let Some(w) = self.slow.get(word) {
            self.set_bit(w, mask, slow);
        }
    }

    /// Whether recording a success would change nothing: the window is full
    /// and no bit is set anywhere in the ring. Two relaxed loads.
    #[inline]
    pub(super) fn success_is_noop(&self) -> bool {
        self.set_bits.0.load(Ordering::Relaxed) == 0
            && self.calls.0.load(Ordering::Relaxed) >= self.size
    }

    /// Sets or clears `mask` in `word`, skipping the write when it already
    /// has that value (a plain load is far cheaper than a contended RMW, and
    /// the skipped write linearizes before any concurrent writer of the same
    /// slot); counts the flips it makes in `set_bits`.
    #[inline]
    fn set_bit(&self, word: &AtomicU64, mask: u64, on: bool) {
        let current = word.load(Ordering::Relaxed);
        if on {
            if current & mask == 0 && word.fetch_or(mask, Ordering::Relaxed) & mask == 0 {
                self.set_bits.0.fetch_add(1, Ordering::Relaxed);
            }
        } else if current & mask != 0 && word.fetch_and(!mask, Ordering::Relaxed) & mask != 0 {
            self.set_bits.0.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub(super) fn counts(&self) -> Counts {
        let seq = self.calls.0.load(Ordering::Relaxed);
        let calls = seq.min(self.size);
        // The last `calls` calls sit in the slots of sequence numbers
        // `seq - calls .. seq`; older slots of the ring are not counted.
        let start = seq.wrapping_sub(calls) & self.mask;
        Counts {
            calls: calls as u32,
            failures: self.ones(&self.failures, start, calls),
            slow: self.ones(&self.slow, start, calls),
        }
    }

    /// Set bits in the `len` ring slots from `start` on (wrapping).
    fn ones(&self, words: &[AtomicU64], start: u64, len: u64) -> u32 {
        if words.is_empty() {
            return 0;
        }
        let slots = self.mask + 1;
        let (mut pos, mut left, mut ones) = (start, len, 0);
        while left > 0 {
            let offset = pos % 64;
            let take = left.min(64 - offset).min(slots - pos);
            let bits = if take == 64 {
                u64::MAX
            } else {
                ((1u64 << take) - 1) << offset
            };
            if let Some(word) = words.get((pos / 64) as usize) {
                ones += (word.load(Ordering::Relaxed) & bits).count_ones();
            }
            left -= take;
            pos = (pos + take) & self.mask;
        }
        ones
    }

    pub(super) fn reset(&self) {
        // The count first (no shortcut until the window is full again), then
        // the bits, each word swapped out and the bits it held taken off
        // `set_bits`. Every 0 -> 1 and 1 -> 0 change of a bit (a record's
        // RMW or this swap) is then counted exactly once, so `set_bits` is
        // exact once the racing records finished. Storing 0 into `set_bits`
        // instead loses a record's flip that races the reset: a clear whose
        // decrement lands after the store leaves -1, and the next failure
        // brings it to 0 with that failure's bit set (the shortcut then
        // skips successes, and the failure never leaves the window).
        self.calls.0.store(0, Ordering::Relaxed);
        for w in self.failures.iter().chain(self.slow.iter()) {
            let cleared = w.swap(0, Ordering::Relaxed).count_ones();
            if cleared > 0 {
                self.set_bits
                    .0
                    .fetch_sub(i64::from(cleared), Ordering::Relaxed);
            }
        }
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

    /// Against a plain model (a `VecDeque` of the last `size` outcomes), for
    /// sizes below, at and across ring and word boundaries.
    #[test]
    fn counts_match_the_last_size_calls() {
        for size in [1, 3, 5, 50, 63, 64, 65, 100, 128, 129] {
            let w = Window::new(size, true);
            let mut model = std::collections::VecDeque::new();
            for i in 0u64..(3 * u64::from(size) + 70) {
                let (failure, slow) = (i % 3 == 0 || i % 7 == 0, i % 5 == 0);
                w.record(failure, slow);
                model.push_back((failure, slow));
                if model.len() > size as usize {
                    model.pop_front();
                }
                let expected = Counts {
                    calls: model.len() as u32,
                    failures: model.iter().filter(|(f, _)| *f).count() as u32,
                    slow: model.iter().filter(|(_, s)| *s).count() as u32,
                };
                assert_eq!(w.counts(), expected, "size {size} after {} calls", i + 1);
                let ring_clear = expected.failures == 0
                    && expected.slow == 0
                    && w.failures
                        .iter()
                        .chain(w.slow.iter())
                        .all(|b| b.load(Ordering::Relaxed) == 0);
                assert_eq!(
                    w.success_is_noop(),
                    ring_clear && model.len() == size as usize,
                    "size {size} after {} calls",
                    i + 1
                );
            }
        }
    }

    /// Bits set in the ring, counted from the words.
    fn ring_bits(w: &Window) -> i64 {
        w.failures
            .iter()
            .chain(w.slow.iter())
            .map(|b| i64::from(b.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// A record racing a reset (a stale closed call recorded while the
    /// breaker transitions), interleaved by hand: the record's RMW on the
    /// word happens before the reset, its `set_bits` step after. Once it has
    /// finished `set_bits` is the number of bits set, so a later failure
    /// disables the no-op shortcut.
    #[test]
    fn set_bits_stays_exact_when_a_record_races_a_reset() {
        // Bit 0 holds a failure; a record clearing it (a success in slot 0)
        // races a reset.
        let w = Window::new(1, false);
        w.record(true, false);
        assert_eq!(w.failures[0].fetch_and(!1, Ordering::Relaxed) & 1, 1);
        w.reset();
        w.set_bits.0.fetch_sub(1, Ordering::Relaxed);
        assert_eq!(w.set_bits.0.load(Ordering::Relaxed), ring_bits(&w));
        w.record(true, false);
        assert_eq!(w.set_bits.0.load(Ordering::Relaxed), ring_bits(&w));
        assert!(!w.success_is_noop(), "a failure in the window");

        // A record setting a bit races a reset.
        let w = Window::new(1, false);
        assert_eq!(w.failures[0].fetch_or(1, Ordering::Relaxed) & 1, 0);
        w.reset();
        w.set_bits.0.fetch_add(1, Ordering::Relaxed);
        assert_eq!(w.set_bits.0.load(Ordering::Relaxed), ring_bits(&w));
        w.record(false, false);
        assert!(w.success_is_noop(), "a clean full window");
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
