//! Graceful, ordered, observable shutdown for every SmartBeak binary.
//!
//! One [`Shutdown`] coordinator per process (cheap to clone) does the
//! following:
//!
//! - listens for SIGTERM and SIGINT ([`Shutdown::listen_for_signals`]) and can
//!   be triggered by the program ([`Shutdown::trigger`]), recording the
//!   [`ShutdownReason`];
//! - hands out a [`CancellationToken`](tokio_util::sync::CancellationToken)
//!   ([`Shutdown::token`]) that long-running loops select on, and tracks
//!   spawned work ([`Shutdown::spawn`], [`Shutdown::tracker`]) so the drain
//!   phase waits for it;
//! - runs registered handlers ([`Shutdown::register`]) phase by phase,
//!   [`Phase::StopAccepting`], then [`Phase::Drain`], then [`Phase::Release`],
//!   the handlers of one phase concurrently, each in its own task, to
//!   completion, error, panic or its own timeout, without one stopping the others;
//! - bounds the whole shutdown by an overall deadline (`SHUTDOWN_TIMEOUT_MS`,
//!   default 25 s; [`ShutdownConfig`] explains the relation with
//!   Kubernetes' grace period), and can hold the listener open for
//!   `SHUTDOWN_READINESS_DELAY_MS` after the readiness flip
//!   ([`Shutdown::listener_token`]);
//! - interrupts slow start-up steps at the first signal
//!   ([`Shutdown::until_triggered`]);
//! - produces a [`ShutdownReport`] (per handler: name, phase, outcome,
//!   duration) that is logged with `tracing` and gives the exit code
//!   ([`exit_code`]): 0 only if every handler succeeded, 1 otherwise, 124 past
//!   the deadline;
//! - exits at once with 143 (SIGTERM) or 130 (SIGINT) on a second signal,
//!   the only place that calls [`std::process::exit`];
//! - runs `main`'s future on a runtime whose teardown is bounded
//!   ([`run_main`]), so a task stuck in blocking code does not turn the
//!   report's exit code into a SIGKILL.
//!
//! A signal arriving twice never runs handlers twice, registering after the
//! trigger is an error ([`RegisterError`]), and dropping the [`HandlerGuard`]
//! returned by registration deregisters the handler.
//!
//! # Example
//!
//! ```
//! use std::process::ExitCode;
//! use std::time::Duration;
//!
//! use smartbeak_shutdown::{Phase, Shutdown, ShutdownConfig, ShutdownReason};
//!
//! # async fn demo() -> ExitCode {
//! let shutdown = Shutdown::new(ShutdownConfig::default().with_timeout(Duration::from_secs(5)));
//! // In a binary: shutdown.listen_for_signals()?;
//!
//! let _readiness = shutdown
//!     .register("readiness", Phase::StopAccepting, || async { /* flip /ready to 503 */ })
//!     .unwrap();
//! let _db = shutdown
//!     .register_with_timeout("db-pool", Phase::Release, Duration::from_secs(2), || async {
//!         Ok::<(), std::io::Error>(()) // pool.close().await
//!     })
//!     .unwrap();
//!
//! // In-flight work: stops taking new jobs when the token is cancelled,
//! // and the drain phase waits for it to finish the one in hand.
//! let token = shutdown.token();
//! shutdown.spawn(async move {
//!     token.cancelled().await;
//!     tokio::time::sleep(Duration::from_millis(10)).await; // finish the current job
//! });
//!
//! // A signal would do this; here the program asks.
//! shutdown.trigger(ShutdownReason::Requested("example".into()));
//! let report = shutdown.run().await;
//! assert!(report.is_success(), "{report}");
//! assert_eq!(report.handlers.len(), 3); // readiness, in-flight-tasks, db-pool
//! report.exit_code()
//! # }
//! # tokio::runtime::Runtime::new().unwrap().block_on(demo());
//! ```
//!
//! # Wiring a binary
//!
//! `main` runs its async part with [`run_main`] (a bounded runtime
//! teardown), returns [`std::process::ExitCode`] and drops the
//! tracing-appender guard *before* returning, so buffered logs (including
//! the report) are flushed; it never calls `std::process::exit` itself.
//! Start-up steps that can be slow run under [`Shutdown::until_triggered`],
//! so the first signal ends them:
//!
//! ```no_run
//! use std::process::ExitCode;
//!
//! use smartbeak_shutdown::Shutdown;
//!
//! fn main() -> ExitCode {
//!     let (writer, guard) = tracing_appender::non_blocking(std::io::stdout());
//!     tracing_subscriber::fmt().with_writer(writer).init();
//!     let code = smartbeak_shutdown::run_main(serve());
//!     drop(guard); // flushes the log buffer
//!     code
//! }
//!
//! async fn serve() -> ExitCode {
//!     let shutdown = match Shutdown::from_env() {
//!         Ok(shutdown) => shutdown,
//!         Err(err) => {
//!             tracing::error!(error = %err, "invalid shutdown configuration");
//!             return ExitCode::FAILURE;
//!         }
//!     };
//!     if let Err(err) = shutdown.listen_for_signals() {
//!         tracing::error!(error = %err, "cannot listen for signals");
//!         return ExitCode::FAILURE;
//!     }
//!     // A signal during a slow start-up step ends it: report and exit.
//!     let connect = tokio::time::sleep(std::time::Duration::from_secs(1)); // Database::connect(..)
//!     if shutdown.until_triggered(connect).await.is_none() {
//!         return shutdown.run().await.exit_code();
//!     }
//!     // register handlers, spawn the server and workers with shutdown.spawn(...)
//!     let reason = shutdown.triggered().await;
//!     tracing::info!(%reason, "shutting down");
//!     shutdown.run().await.exit_code()
//! }
//! ```
//!
//! `examples/shutdown_demo.rs` is a complete binary wired this way.

#![warn(missing_docs)]

mod config;
mod coordinator;
pub mod exit_code;
mod handler;
mod report;
mod runtime;
mod signal;
#[cfg(feature = "telemetry")]
pub mod telemetry;

#[cfg(feature = "admin")]
pub mod admin;

pub use config::{
    ConfigError, DEFAULT_TIMEOUT, DRAIN_TIMEOUT_ENV, READINESS_DELAY_ENV, ShutdownConfig,
    TIMEOUT_ENV, default_drain_timeout,
};
pub use coordinator::{IN_FLIGHT_TASKS, READINESS_DELAY, Shutdown, ShutdownReason};
pub use handler::{HandlerGuard, HandlerOutput, Phase, RegisterError, error_chain};
pub use report::{HandlerOutcome, HandlerReport, ShutdownReport};
pub use runtime::{RUNTIME_TEARDOWN, run_main, run_main_with};
pub use signal::{Signal, SignalError};
