//! Logging set-up for the binaries (feature `telemetry`): a `tracing` subscriber writing
//! through a non-blocking buffer, and the guard that flushes that buffer before the process
//! exits, on a forced exit too.
//!
//! Only binaries call [`init`]; library crates just emit `tracing` events. `RUST_LOG` filters
//! as usual (default `info`); [`LogFormat`] picks human-readable lines or one JSON object per
//! line (`LOG_FORMAT=json`, for log shippers).

use std::io::IsTerminal;
use std::sync::{Arc, Mutex, PoisonError};

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

use crate::Shutdown;

/// Log line format, `LOG_FORMAT=json|text`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines, the default.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl LogFormat {
    /// Reads `LOG_FORMAT` (unset or empty means text).
    pub fn from_env() -> Result<Self, TelemetryError> {
        Self::parse(std::env::var("LOG_FORMAT").ok().as_deref())
    }

    /// Parses a `LOG_FORMAT` value.
    pub fn parse(value: Option<&str>) -> Result<Self, TelemetryError> {
        match value.map(str::trim) {
            None | Some("") => Ok(Self::Text),
            Some(v) if v.eq_ignore_ascii_case("text") => Ok(Self::Text),
            Some(v) if v.eq_ignore_ascii_case("json") => Ok(Self::Json),
            Some(other) => Err(TelemetryError::Format(other.to_owned())),
        }
    }
}

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Standard output (services).
    Stdout,
    /// Standard error (commands whose stdout is their result).
    Stderr,
}

/// Keeps the log buffer alive; dropping the last clone, or [`LogGuard::flush`], flushes it.
/// Hold it in `main` and flush it after the shutdown report was logged, before returning the
/// exit code.
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

/// Installs the global subscriber. Fails if one is installed already or if `RUST_LOG` does
/// not parse.
pub fn init(format: LogFormat, output: Output) -> Result<LogGuard, TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) if !value.trim().is_empty() => {
            EnvFilter::try_new(&value).map_err(|e| TelemetryError::Filter(e.to_string()))?
        }
        _ => EnvFilter::new("info"),
    };
    let (writer, guard, ansi) = match output {
        Output::Stdout => {
            let (w, g) = tracing_appender::non_blocking(std::io::stdout());
            (w, g, std::io::stdout().is_terminal())
        }
        Output::Stderr => {
            let (w, g) = tracing_appender::non_blocking(std::io::stderr());
            (w, g, std::io::stderr().is_terminal())
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let installed = match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
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
    /// `LOG_FORMAT` is neither `json` nor `text`.
    #[error("LOG_FORMAT is invalid: {0:?} is neither json nor text")]
    Format(String),
    /// A global subscriber is installed already.
    #[error("cannot install the log subscriber: {0}")]
    Install(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_format_values() {
        assert_eq!(LogFormat::parse(None).ok(), Some(LogFormat::Text));
        assert_eq!(LogFormat::parse(Some(" JSON ")).ok(), Some(LogFormat::Json));
        assert_eq!(LogFormat::parse(Some("text")).ok(), Some(LogFormat::Text));
        let err = LogFormat::parse(Some("yaml")).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("LOG_FORMAT is invalid: \"yaml\" is neither json nor text")
        );
    }
}
