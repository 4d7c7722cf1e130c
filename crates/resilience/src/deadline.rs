//! The deadline of the work in progress (an HTTP request the api serves, say), carried in a
//! task-local so that every bound under it nests without each caller passing it along:
//! [`scope`] sets it for a future; the database's `run`, `begin` and `Tx::run`
//! (`smartbeak_database`, re-exported there as `deadline`) bound themselves by the smaller of
//! their configured bound and [`remaining`], and so does every outbound call of
//! `smartbeak_utils::fetch` (re-exported there as `fetch::deadline`). One task-local for
//! both: a request's one [`scope`] bounds its queries and its outbound calls alike.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

tokio::task_local! {
    static DEADLINE: Instant;
}

/// Runs `fut` with `deadline` as the deadline of every query and outbound call it makes (in
/// this task; a task it spawns does not inherit it). A nested scope keeps the earlier of the two deadlines.
pub async fn scope<F: Future>(deadline: Instant, fut: F) -> F::Output {
    let deadline = current().map_or(deadline, |outer| outer.min(deadline));
    DEADLINE.scope(deadline, fut).await
}

/// The deadline set by the innermost [`scope`] around the caller, if any.
pub fn current() -> Option<Instant> {
    DEADLINE.try_with(|deadline| *deadline).ok()
}

/// What is left of the current deadline (zero once it has passed); `None` outside a
/// [`scope`].
pub fn remaining() -> Option<Duration> {
    current().map(|deadline| deadline.saturating_duration_since(Instant::now()))
}

/// `bound`, shortened to what is left of the current deadline.
pub fn bounded(bound: Duration) -> Duration {
    remaining().map_or(bound, |left| left.min(bound))
}

/// The instant `bound` from now, or the current deadline if that comes first. For a bound
/// worked out a while before the work starts ([`bounded`] then an `await`): the deadline
/// still caps it, however late the work starts.
pub fn instant_after(bound: Duration) -> Instant {
    let at = Instant::now() + bound;
    current().map_or(at, |deadline| deadline.min(at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bound_worked_out_earlier_still_ends_at_the_deadline() {
        let start = Instant::now();
        assert_eq!(
            instant_after(Duration::from_secs(8)),
            start + Duration::from_secs(8)
        );
        scope(start + Duration::from_secs(3), async {
            let bound = bounded(Duration::from_secs(8));
            assert_eq!(bound, Duration::from_secs(3));
            // The work starts 2 s later (a first connect, say): still the deadline.
            tokio::time::advance(Duration::from_secs(2)).await;
            assert_eq!(instant_after(bound), start + Duration::from_secs(3));
            // A bound shorter than what is left is kept.
            assert_eq!(
                instant_after(Duration::from_millis(500)),
                Instant::now() + Duration::from_millis(500)
            );
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_bound_is_the_smaller_of_the_configured_one_and_what_is_left() {
        let bound = Duration::from_secs(8);
        assert_eq!(bounded(bound), bound);
        assert_eq!(remaining(), None);
        let deadline = Instant::now() + Duration::from_secs(3);
        scope(deadline, async {
            assert_eq!(bounded(bound), Duration::from_secs(3));
            tokio::time::advance(Duration::from_secs(2)).await;
            assert_eq!(bounded(bound), Duration::from_secs(1));
            // A nested scope cannot extend the outer deadline, only shorten it.
            scope(Instant::now() + Duration::from_secs(60), async {
                assert_eq!(remaining(), Some(Duration::from_secs(1)));
            })
            .await;
            scope(Instant::now() + Duration::from_millis(10), async {
                assert_eq!(remaining(), Some(Duration::from_millis(10)));
            })
            .await;
            tokio::time::advance(Duration::from_secs(5)).await;
            assert_eq!(bounded(bound), Duration::ZERO);
        })
        .await;
        assert_eq!(bounded(bound), bound);
    }
}
