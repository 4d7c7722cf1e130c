//! Logging set-up for the binaries (feature `telemetry`): a `tracing` subscriber writing
//! through a non-blocking buffer, and the guard that flushes that buffer before the process
//! exits, on a forced exit too.
//!
//! Only binaries call [`init`]; library crates just emit `tracing` events.
//!
//! - `RUST_LOG` filters as usual (default `info`);
//! - `LOG_FORMAT=json` writes one JSON object per line (for log shippers), anything else or
//!   unset writes human-readable lines.

use std::sync::{Arc, Mutex, PoisonError};

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

use crate::Shutdown;

/// Keeps the log buffer alive; dropping it flushes the buffer. Hold it in `main` and drop it
/// after the shutdown report was logged, before returning the exit code.
#[derive(Debug, Clone)]
#[must_use = "dropping the guard at once would stop logging"]
pub struct LogGuard(Arc<Mutex<Option<WorkerGuard>>>);

impl LogGuard {
    /// Flushes the buffer if the process is forced out by a second signal.
    pub fn flush_on_force_exit(&self, shutdown: &Shutdown) {
        let guard = self.clone();
        shutdown.on_force_exit(move || guard.flush());
    }

    /// Flushes and closes the buffer now; later events are dropped.
    pub fn flush(&self) {
        drop(self.0.lock().unwrap_or_else(PoisonError::into_inner).take());
    }
}

/// Installs the global subscriber, writing to stdout. Returns an error if one is installed
/// already or if `RUST_LOG` does not parse.
pub fn init() -> Result<LogGuard, TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) if !value.trim().is_empty() => {
            EnvFilter::try_new(&value).map_err(|e| TelemetryError::Filter(e.to_string()))?
        }
        _ => EnvFilter::new("info"),
    };
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let (writer, guard) = tracing_appender::non_blocking(std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let installed = if json {
        builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    } else {
        builder.with_ansi(false).try_init()
    };
    installed.map_err(|e| TelemetryError::Install(e.to_string()))?;
    Ok(LogGuard(Arc::new(Mutex::new(Some(guard)))))
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `RUST_LOG` is not a valid filter.
    #[error("RUST_LOG is invalid: {0}")]
    Filter(String),
    /// A global subscriber is installed already.
    #[error("cannot install the log subscriber: {0}")]
    Install(String),
}
