//! The process exit codes a shutdown ends with.
//!
//! [`ShutdownReport::code`](crate::ShutdownReport::code) returns one of
//! [`OK`], [`FAILURE`] or [`DEADLINE_EXCEEDED`]; the forced exits on a second
//! signal use [`FORCED_SIGINT`] and [`FORCED_SIGTERM`] (the shell's 128 + signal
//! number convention). Exit codes of the report are returned from `main`, so
//! buffered logs are flushed first; only the forced exits call
//! `std::process::exit`.

/// Every handler succeeded and shutdown was not triggered by a fatal error.
pub const OK: u8 = 0;

/// At least one handler failed, timed out or panicked, or shutdown was
/// triggered with [`ShutdownReason::Fatal`](crate::ShutdownReason::Fatal).
pub const FAILURE: u8 = 1;

/// The overall deadline (`SHUTDOWN_TIMEOUT_MS`) passed before every phase
/// finished. 124 is what `timeout(1)` exits with when its command times out.
pub const DEADLINE_EXCEEDED: u8 = 124;

/// A second SIGINT (or Ctrl-C) arrived during shutdown: 128 + 2.
pub const FORCED_SIGINT: u8 = 130;

/// A second SIGTERM arrived during shutdown: 128 + 15.
pub const FORCED_SIGTERM: u8 = 143;
