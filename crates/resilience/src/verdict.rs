//! `Verdict`: the caller's classification of one call's result, shared by the
//! breaker (failure or not) and the retry loop (retry or not). A 404 is not an
//! outage; a timeout is.

use std::time::Duration;

/// What a result means for the breaker and for retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Success, or an error that says nothing bad about the dependency (a
    /// 404, a validation error). Breaker: success. Retry: stop.
    Success,
    /// Neither success nor failure for the breaker (e.g. the request was
    /// malformed by us); a half-open probe slot is handed back. Retry: stop.
    Ignored,
    /// A dependency failure that retrying will not fix (e.g. 501). Breaker:
    /// failure. Retry: stop.
    Failure,
    /// A dependency failure that may pass (timeout, connect error, 503, 429).
    /// Breaker: failure. Retry: yes, after `retry_after` if the server gave
    /// one (clamped by the retry policy).
    Transient {
        /// The server's Retry-After, if any.
        retry_after: Option<Duration>,
    },
}

impl Verdict {
    /// A transient failure without a Retry-After hint.
    pub const TRANSIENT: Verdict = Verdict::Transient { retry_after: None };

    /// Whether the breaker counts this as a failure.
    pub const fn is_failure(self) -> bool {
        matches!(self, Self::Failure | Self::Transient { .. })
    }

    /// Whether the retry loop may try again.
    pub const fn is_transient(self) -> bool {
        matches!(self, Self::Transient { .. })
    }
}

/// Classifier: `Ok` is a success, every `Err` a transient failure.
pub fn err_is_transient<T, E>(result: &Result<T, E>) -> Verdict {
    match result {
        Ok(_) => Verdict::Success,
        Err(_) => Verdict::TRANSIENT,
    }
}

/// Classifier: `Ok` is a success, every `Err` a failure that is not retried.
pub fn err_is_failure<T, E>(result: &Result<T, E>) -> Verdict {
    match result {
        Ok(_) => Verdict::Success,
        Err(_) => Verdict::Failure,
    }
}
