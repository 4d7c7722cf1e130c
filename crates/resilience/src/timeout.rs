//! A per-attempt timeout helper over `tokio::time::timeout` that reports the
//! limit it enforced.

use std::future::Future;
use std::time::Duration;

/// The wrapped future did not finish within its limit; it was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("operation timed out after {limit:?}")]
pub struct Elapsed {
    /// The limit that was exceeded.
    pub limit: Duration,
}

/// Runs `fut` for at most `limit`; on expiry the future is dropped (so any
/// breaker permit or bulkhead permit it holds is released) and [`Elapsed`]
/// is returned. Uses tokio's timer, so it follows a paused test runtime.
pub async fn timeout<F: Future>(limit: Duration, fut: F) -> Result<F::Output, Elapsed> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| Elapsed { limit })
}

/// Like [`timeout`] but `None` means no limit.
pub async fn maybe_timeout<F: Future>(
    limit: Option<Duration>,
    fut: F,
) -> Result<F::Output, Elapsed> {
    match limit {
        Some(limit) => timeout(limit, fut).await,
        None => Ok(fut.await),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn times_out_and_passes_through() {
        let slow = timeout(
            Duration::from_millis(10),
            tokio::time::sleep(Duration::from_secs(1)),
        );
        assert_eq!(
            slow.await,
            Err(Elapsed {
                limit: Duration::from_millis(10)
            })
        );
        assert_eq!(timeout(Duration::from_secs(1), async { 7 }).await, Ok(7));
        assert_eq!(maybe_timeout(None, async { 8 }).await, Ok(8));
    }
}
