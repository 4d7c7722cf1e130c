//! Shutdown handlers: the phases they run in, what they may return, the
//! guard that deregisters them, and the error for late registration.

use std::error::Error;
use std::fmt;
use std::sync::Weak;

use crate::coordinator::Inner;

/// The phase a handler runs in. Phases run in this order, one after the
/// other; the handlers of one phase run concurrently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Stop taking new work: flip readiness to failing, stop accepting
    /// connections, stop claiming jobs, stop scheduling.
    StopAccepting,
    /// Let in-flight work finish, up to a drain deadline. The coordinator
    /// always adds its own `in-flight-tasks` entry here, which waits for the
    /// tasks spawned through [`Shutdown::spawn`](crate::Shutdown::spawn).
    Drain,
    /// Release resources: close database and Redis pools, flush telemetry.
    Release,
}

impl Phase {
    /// Every phase, in the order they run.
    pub const ALL: [Phase; 3] = [Phase::StopAccepting, Phase::Drain, Phase::Release];

    /// Stable lowercase name, used in logs and in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::StopAccepting => "stop-accepting",
            Phase::Drain => "drain",
            Phase::Release => "release",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a handler's future may resolve to: `()` (always a success) or
/// `Result<(), E>` for any error that converts into
/// `Box<dyn Error + Send + Sync>` (every `std::error::Error + Send + Sync`,
/// `anyhow::Error`, `String`, `&str`). An `Err` is reported as
/// [`HandlerOutcome::Failed`](crate::HandlerOutcome::Failed) with its whole
/// [`source()`](std::error::Error::source) chain, joined by `": "`, so the
/// cause behind a `thiserror` variant's `#[source]` is not lost.
pub trait HandlerOutput {
    /// Converts the output into success or a failure message.
    fn into_result(self) -> Result<(), String>;
}

impl HandlerOutput for () {
    fn into_result(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E> HandlerOutput for Result<(), E>
where
    E: Into<Box<dyn Error + Send + Sync + 'static>>,
{
    fn into_result(self) -> Result<(), String> {
        self.map_err(|e| error_chain(&*e.into()))
    }
}

/// `error`'s message followed by the message of every
/// [`source()`](std::error::Error::source) below it, joined by `": "`.
pub fn error_chain(error: &(dyn Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // An error that already prints its cause (`"{context}: {source}"`) is not repeated.
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// Registering a handler failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// Shutdown was already triggered; the handler would never run.
    #[error("cannot register shutdown handler {name:?}: shutdown already started")]
    ShutdownStarted {
        /// Name of the rejected handler.
        name: String,
    },
}

/// Keeps a handler registered; dropping it deregisters the handler.
///
/// Once shutdown has been triggered the set of handlers is frozen: dropping
/// the guard then changes nothing (the handler runs, or already ran).
/// Use [`detach`](Self::detach) to keep a handler for the whole life of the
/// coordinator without holding the guard.
#[must_use = "dropping the guard deregisters the handler at once"]
#[derive(Debug)]
pub struct HandlerGuard {
    pub(crate) inner: Weak<Inner>,
    pub(crate) id: u64,
    pub(crate) armed: bool,
}

impl HandlerGuard {
    /// Keeps the handler registered for good and drops the guard.
    pub fn detach(mut self) {
        self.armed = false;
    }
}

impl Drop for HandlerGuard {
    fn drop(&mut self) {
        if self.armed
            && let Some(inner) = self.inner.upgrade()
        {
            inner.deregister(self.id);
        }
    }
}
