//! Signal handling: the first SIGTERM/SIGINT (Ctrl-C on non-Unix) triggers
//! shutdown, a second one forces an immediate exit with 143 or 130.
//!
//! tokio keeps its handler installed after the first signal, so without this
//! listener a second Ctrl-C would do nothing at all. The forced exit is the
//! one place in this crate that calls [`std::process::exit`]: it skips the
//! report and the rest of `main`, so flushing logs there is best effort,
//! through the hook set with [`Shutdown::on_force_exit`].

use std::fmt;
use std::io::{self, Write};
use std::panic::AssertUnwindSafe;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use crate::coordinator::{Shutdown, ShutdownReason};
use crate::exit_code;

/// A signal that shuts the process down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Signal {
    /// SIGTERM, what Kubernetes and systemd send.
    Terminate,
    /// SIGINT, or Ctrl-C on non-Unix platforms.
    Interrupt,
}

impl Signal {
    /// The conventional name: `SIGTERM` or `SIGINT`.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Terminate => "SIGTERM",
            Signal::Interrupt => "SIGINT",
        }
    }

    /// The code of the forced exit on a second signal of this kind:
    /// [`exit_code::FORCED_SIGTERM`] (143) or [`exit_code::FORCED_SIGINT`] (130).
    pub fn force_exit_code(self) -> u8 {
        match self {
            Signal::Terminate => exit_code::FORCED_SIGTERM,
            Signal::Interrupt => exit_code::FORCED_SIGINT,
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Installing a signal handler failed.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// The operating system refused the handler.
    #[error("failed to install the {signal} handler")]
    Install {
        /// The signal concerned.
        signal: Signal,
        /// The error from tokio.
        #[source]
        source: io::Error,
    },
}

impl Shutdown {
    /// Installs the SIGTERM and SIGINT handlers (Ctrl-C on non-Unix) and
    /// spawns the task that listens to them for the rest of the process:
    /// the first signal [triggers](Shutdown::trigger) shutdown with
    /// [`ShutdownReason::Signal`]; a signal arriving while shutdown already
    /// runs because of an earlier signal logs an error, calls the
    /// [force-exit hook](Shutdown::on_force_exit) and exits at once with
    /// [`Signal::force_exit_code`]. If shutdown was triggered by the program,
    /// the first signal only logs, and the second one forces the exit.
    ///
    /// On Unix the handlers are installed before this returns, so a signal
    /// sent after it is never missed. Calling it again does nothing. Must be
    /// called inside a tokio runtime with signals and I/O enabled.
    ///
    /// # Errors
    ///
    /// [`SignalError::Install`] when a handler cannot be installed.
    pub fn listen_for_signals(&self) -> Result<(), SignalError> {
        if self.inner.signals_installed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let result = platform::listen(self.clone());
        if result.is_err() {
            self.inner.signals_installed.store(false, Ordering::SeqCst);
        }
        result
    }

    /// Sets the hook called just before the forced exit on a second signal,
    /// for best-effort flushing (for example dropping the tracing-appender
    /// guard kept in an `Arc<Mutex<Option<WorkerGuard>>>`). Replaces any
    /// earlier hook. A panic in the hook is caught; the exit happens anyway.
    pub fn on_force_exit(&self, hook: impl FnOnce() + Send + 'static) {
        *self
            .inner
            .force_exit_hook
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Box::new(hook));
    }
}

/// What the listener does with the `nth` signal it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SignalAction {
    /// This signal started shutdown.
    Started,
    /// Shutdown was already running (started by the program).
    AlreadyRunning,
    /// Exit now with this code.
    ForceExit(u8),
}

pub(crate) fn on_signal(shutdown: &Shutdown, signal: Signal, nth: u32) -> SignalAction {
    if nth >= 2 {
        SignalAction::ForceExit(signal.force_exit_code())
    } else if shutdown.trigger(ShutdownReason::Signal(signal)) {
        SignalAction::Started
    } else {
        SignalAction::AlreadyRunning
    }
}

fn handle(shutdown: &Shutdown, signal: Signal, nth: u32) {
    match on_signal(shutdown, signal, nth) {
        SignalAction::Started => tracing::info!(
            signal = %signal,
            "signal received, shutting down; send it again to exit immediately"
        ),
        SignalAction::AlreadyRunning => tracing::warn!(
            signal = %signal,
            reason = ?shutdown.reason(),
            "signal received while shutdown already runs; send it again to exit immediately"
        ),
        SignalAction::ForceExit(code) => force_exit(shutdown, signal, code),
    }
}

fn force_exit(shutdown: &Shutdown, signal: Signal, code: u8) -> ! {
    tracing::error!(
        signal = %signal,
        exit_code = code,
        still_running = %shutdown.inner.running_handlers().join(", "),
        "second signal during shutdown, exiting immediately without a shutdown report"
    );
    let hook = shutdown
        .inner
        .force_exit_hook
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some(hook) = hook {
        // Whatever the hook does, the exit must happen.
        let _ = std::panic::catch_unwind(AssertUnwindSafe(hook));
    }
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    std::process::exit(i32::from(code))
}

#[cfg(unix)]
mod platform {
    //! SIGTERM and SIGINT through `tokio::signal::unix`.

    use tokio::signal::unix::{SignalKind, signal};

    use super::{Signal, SignalError, handle};
    use crate::coordinator::Shutdown;

    pub(super) fn listen(shutdown: Shutdown) -> Result<(), SignalError> {
        let mut term = signal(SignalKind::terminate()).map_err(|source| SignalError::Install {
            signal: Signal::Terminate,
            source,
        })?;
        let mut int = signal(SignalKind::interrupt()).map_err(|source| SignalError::Install {
            signal: Signal::Interrupt,
            source,
        })?;
        tokio::spawn(async move {
            let mut received = 0u32;
            loop {
                let signal = tokio::select! {
                    Some(()) = term.recv() => Signal::Terminate,
                    Some(()) = int.recv() => Signal::Interrupt,
                    else => return,
                };
                received = received.saturating_add(1);
                handle(&shutdown, signal, received);
            }
        });
        Ok(())
    }
}

#[cfg(not(unix))]
mod platform {
    //! Ctrl-C through `tokio::signal::ctrl_c`, reported as SIGINT.

    use super::{Signal, SignalError, handle};
    use crate::coordinator::Shutdown;

    pub(super) fn listen(shutdown: Shutdown) -> Result<(), SignalError> {
        tokio::spawn(async move {
            let mut received = 0u32;
            loop {
                if let Err(err) = tokio::signal::ctrl_c().await {
                    tracing::error!(error = %err, "failed to listen for Ctrl-C");
                    return;
                }
                received = received.saturating_add(1);
                handle(&shutdown, Signal::Interrupt, received);
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn codes_follow_the_shell_convention() {
        assert_eq!(Signal::Terminate.force_exit_code(), 143);
        assert_eq!(Signal::Interrupt.force_exit_code(), 130);
        assert_eq!(Signal::Terminate.to_string(), "SIGTERM");
    }

    #[tokio::test(start_paused = true)]
    async fn first_signal_triggers_second_forces() {
        let shutdown = Shutdown::default();
        assert_eq!(
            on_signal(&shutdown, Signal::Terminate, 1),
            SignalAction::Started
        );
        assert_eq!(
            shutdown.reason(),
            Some(ShutdownReason::Signal(Signal::Terminate))
        );
        assert_eq!(
            on_signal(&shutdown, Signal::Interrupt, 2),
            SignalAction::ForceExit(130)
        );
        assert_eq!(
            on_signal(&shutdown, Signal::Terminate, 3),
            SignalAction::ForceExit(143)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn first_signal_after_programmatic_trigger_only_logs() {
        let shutdown = Shutdown::default();
        assert!(shutdown.trigger(ShutdownReason::Fatal("db lost".into())));
        assert_eq!(
            on_signal(&shutdown, Signal::Terminate, 1),
            SignalAction::AlreadyRunning
        );
        assert_eq!(
            shutdown.reason(),
            Some(ShutdownReason::Fatal("db lost".into()))
        );
    }

    #[tokio::test]
    async fn listening_twice_is_harmless() {
        let shutdown = Shutdown::default();
        shutdown.listen_for_signals().unwrap();
        shutdown.listen_for_signals().unwrap();
        assert!(shutdown.inner.signals_installed.load(Ordering::SeqCst));
    }
}
