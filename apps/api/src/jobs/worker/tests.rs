#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use super::job::retry_delay;
use super::*;

#[test]
fn retries_back_off_with_full_jitter_until_the_attempts_are_used() {
    let base = Duration::from_millis(100);
    let max = Duration::from_secs(1);
    for _ in 0..100 {
        // After attempt 1 of 3: up to 100 ms; after 2: up to 200 ms; after 3: none.
        assert!(retry_delay(base, max, 1, 3).unwrap() <= base);
        assert!(retry_delay(base, max, 2, 3).unwrap() <= base * 2);
        assert_eq!(retry_delay(base, max, 3, 3), None);
        // The ceiling stops at the maximum.
        assert!(retry_delay(base, max, 9, 20).unwrap() <= max);
    }
    assert_eq!(
        retry_delay(base, max, 1, 1),
        None,
        "one attempt: never retried"
    );
}

#[test]
fn the_release_margin_is_a_bounded_share_of_the_drain() {
    assert_eq!(
        release_margin(Duration::from_millis(16_666)),
        Duration::from_millis(4_166).min(Duration::from_secs(3))
    );
    assert_eq!(
        release_margin(Duration::from_secs(2)),
        Duration::from_millis(500)
    );
    assert_eq!(
        release_margin(Duration::from_millis(200)),
        Duration::from_millis(100)
    );
}
