//! The shutdown report: what each handler did, how long it took, and the
//! exit code the process should end with.

use std::fmt;
use std::process::{ExitCode, Termination};
use std::time::Duration;

use crate::coordinator::ShutdownReason;
use crate::exit_code;
use crate::handler::Phase;

/// How one handler ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerOutcome {
    /// Completed successfully.
    Ok,
    /// Returned an error; the message is the error formatted with `{:#}`.
    Failed(String),
    /// Exceeded its own timeout and was cancelled.
    TimedOut,
    /// Panicked; the message is the panic payload when it was a string.
    Panicked(String),
    /// Was still running when the overall deadline passed, and was cancelled.
    StillRunning,
    /// Never started: the overall deadline passed before its phase began.
    NotStarted,
}

impl HandlerOutcome {
    /// Whether the handler completed successfully.
    pub fn is_ok(&self) -> bool {
        matches!(self, HandlerOutcome::Ok)
    }

    /// Stable lowercase label (`ok`, `failed`, `timed-out`, `panicked`,
    /// `still-running`, `not-started`), for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            HandlerOutcome::Ok => "ok",
            HandlerOutcome::Failed(_) => "failed",
            HandlerOutcome::TimedOut => "timed-out",
            HandlerOutcome::Panicked(_) => "panicked",
            HandlerOutcome::StillRunning => "still-running",
            HandlerOutcome::NotStarted => "not-started",
        }
    }
}

impl fmt::Display for HandlerOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerOutcome::Failed(msg) => write!(f, "failed: {msg}"),
            HandlerOutcome::Panicked(msg) => write!(f, "panicked: {msg}"),
            other => f.write_str(other.label()),
        }
    }
}

/// What one handler did during shutdown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerReport {
    /// The name given at registration (`in-flight-tasks` for the built-in
    /// wait on tracked tasks).
    pub name: String,
    /// The phase it ran in.
    pub phase: Phase,
    /// How it ended.
    pub outcome: HandlerOutcome,
    /// From its start to its end (or to the overall deadline); zero when it
    /// never started.
    pub duration: Duration,
}

/// The result of a whole shutdown; `main` returns its [`exit_code`](Self::exit_code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Why shutdown began (the first trigger; later ones are ignored).
    pub reason: ShutdownReason,
    /// One entry per handler, in phase order, then registration order.
    pub handlers: Vec<HandlerReport>,
    /// Whether the overall deadline passed before every phase finished.
    pub deadline_exceeded: bool,
    /// From the trigger to the end of the last phase (or the deadline).
    pub elapsed: Duration,
}

impl ShutdownReport {
    /// The numeric exit code: [`exit_code::DEADLINE_EXCEEDED`] if the overall
    /// deadline passed, else [`exit_code::FAILURE`] if any handler did not
    /// succeed or the reason is [`ShutdownReason::Fatal`], else
    /// [`exit_code::OK`].
    pub fn code(&self) -> u8 {
        if self.deadline_exceeded {
            exit_code::DEADLINE_EXCEEDED
        } else if !self.handlers.iter().all(|h| h.outcome.is_ok())
            || matches!(self.reason, ShutdownReason::Fatal(_))
        {
            exit_code::FAILURE
        } else {
            exit_code::OK
        }
    }

    /// [`code`](Self::code) as a [`std::process::ExitCode`], to return from `main`.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.code())
    }

    /// Whether the exit code is 0.
    pub fn is_success(&self) -> bool {
        self.code() == exit_code::OK
    }

    /// The entry of the handler called `name` (the first, if several share it).
    pub fn handler(&self, name: &str) -> Option<&HandlerReport> {
        self.handlers.iter().find(|h| h.name == name)
    }

    /// Handlers that were still running when the overall deadline passed.
    pub fn still_running(&self) -> impl Iterator<Item = &HandlerReport> {
        self.handlers
            .iter()
            .filter(|h| h.outcome == HandlerOutcome::StillRunning)
    }

    /// Handlers that did not complete successfully, whatever the reason.
    pub fn unsuccessful(&self) -> impl Iterator<Item = &HandlerReport> {
        self.handlers.iter().filter(|h| !h.outcome.is_ok())
    }

    /// Emits the report as `tracing` events: one per handler (`info` when it
    /// succeeded, `warn` otherwise) and a summary (`info` on success, `error`
    /// otherwise, naming the handlers still running at the deadline).
    ///
    /// The coordinator already calls this once when shutdown completes.
    pub fn log(&self) {
        for h in &self.handlers {
            let duration_ms = millis(h.duration);
            if h.outcome.is_ok() {
                tracing::info!(
                    handler = %h.name, phase = %h.phase, outcome = h.outcome.label(), duration_ms,
                    "shutdown handler finished"
                );
            } else {
                tracing::warn!(
                    handler = %h.name, phase = %h.phase, outcome = h.outcome.label(), duration_ms,
                    detail = %h.outcome,
                    "shutdown handler did not succeed"
                );
            }
        }
        let code = self.code();
        let elapsed_ms = millis(self.elapsed);
        if self.deadline_exceeded {
            let still_running = names(self.still_running());
            tracing::error!(
                reason = %self.reason, exit_code = code, elapsed_ms, still_running = %still_running,
                "shutdown deadline exceeded"
            );
        } else if code == exit_code::OK {
            tracing::info!(reason = %self.reason, exit_code = code, elapsed_ms, "shutdown complete");
        } else {
            let unsuccessful = names(self.unsuccessful());
            tracing::error!(
                reason = %self.reason, exit_code = code, elapsed_ms, unsuccessful = %unsuccessful,
                "shutdown completed with failures"
            );
        }
    }
}

impl fmt::Display for ShutdownReport {
    /// A few human-readable lines: a summary, then one line per handler.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "shutdown ({}) took {} ms, exit code {}",
            self.reason,
            millis(self.elapsed),
            self.code()
        )?;
        if self.deadline_exceeded {
            write!(
                f,
                "; deadline exceeded, still running: [{}]",
                names(self.still_running())
            )?;
        }
        for h in &self.handlers {
            write!(
                f,
                "\n  [{}] {}: {} ({} ms)",
                h.phase,
                h.name,
                h.outcome,
                millis(h.duration)
            )?;
        }
        Ok(())
    }
}

impl Termination for ShutdownReport {
    fn report(self) -> ExitCode {
        self.exit_code()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn names<'a>(handlers: impl Iterator<Item = &'a HandlerReport>) -> String {
    handlers
        .map(|h| h.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn entry(name: &str, outcome: HandlerOutcome) -> HandlerReport {
        HandlerReport {
            name: name.to_owned(),
            phase: Phase::Release,
            outcome,
            duration: Duration::from_millis(5),
        }
    }

    fn report(handlers: Vec<HandlerReport>, deadline_exceeded: bool) -> ShutdownReport {
        ShutdownReport {
            reason: ShutdownReason::Requested("test".into()),
            handlers,
            deadline_exceeded,
            elapsed: Duration::from_millis(10),
        }
    }

    #[test]
    fn exit_code_is_zero_only_when_all_ok() {
        assert_eq!(report(vec![], false).code(), 0);
        assert_eq!(
            report(vec![entry("a", HandlerOutcome::Ok)], false).code(),
            0
        );
        for bad in [
            HandlerOutcome::Failed("x".into()),
            HandlerOutcome::TimedOut,
            HandlerOutcome::Panicked("x".into()),
        ] {
            let r = report(vec![entry("a", HandlerOutcome::Ok), entry("b", bad)], false);
            assert_eq!(r.code(), exit_code::FAILURE);
            assert!(!r.is_success());
        }
    }

    #[test]
    fn deadline_wins_over_failures_and_fatal_reason_fails() {
        let r = report(
            vec![
                entry("a", HandlerOutcome::Failed("x".into())),
                entry("b", HandlerOutcome::StillRunning),
            ],
            true,
        );
        assert_eq!(r.code(), exit_code::DEADLINE_EXCEEDED);
        assert_eq!(r.exit_code(), ExitCode::from(124));
        let names: Vec<_> = r.still_running().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["b"]);

        let mut fatal = report(vec![entry("a", HandlerOutcome::Ok)], false);
        fatal.reason = ShutdownReason::Fatal("db gone".into());
        assert_eq!(fatal.code(), exit_code::FAILURE);
    }

    #[test]
    fn display_lists_every_handler() {
        let r = report(
            vec![
                entry("a", HandlerOutcome::Ok),
                entry("b", HandlerOutcome::Panicked("boom".into())),
            ],
            false,
        );
        let text = r.to_string();
        assert!(text.starts_with("shutdown (requested: test) took 10 ms, exit code 1"));
        assert!(text.contains("[release] a: ok (5 ms)"));
        assert!(text.contains("[release] b: panicked: boom (5 ms)"));
    }
}
