//! The deadline of the work an outbound call belongs to (an HTTP request the api serves,
//! say), carried in a task-local so that every [`HttpClient`](super::HttpClient) call made
//! inside [`scope`] ends by it without each caller passing it along: the call's total
//! deadline is the smaller of its own (`policy.retry.max_elapsed`, or
//! [`RequestBuilder::deadline`](super::RequestBuilder::deadline)) and what is left of the
//! scope's.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

tokio::task_local! {
    static DEADLINE: Instant;
}

/// Runs `fut` with `deadline` as the deadline of every outbound call it makes (in this
/// task; a task it spawns does not inherit it). A nested scope keeps the earlier deadline.
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
