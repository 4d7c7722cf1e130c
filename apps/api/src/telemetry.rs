//! Installs the tracing subscriber of the binary: `RUST_LOG`-style filter (default `info`),
//! text or JSON lines (`LOG_FORMAT`), through a non-blocking writer: stdout for the server,
//! stderr for the admin commands (whose stdout is their JSON result).

use std::io::IsTerminal;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

use smartbeak_api::config::LogFormat;

/// Installs the subscriber; keep the guard alive until exit so buffered lines are flushed.
pub(crate) fn init(format: LogFormat, to_stderr: bool) -> WorkerGuard {
    let (writer, guard) = if to_stderr {
        tracing_appender::non_blocking(std::io::stderr())
    } else {
        tracing_appender::non_blocking(std::io::stdout())
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = if to_stderr {
        std::io::stderr().is_terminal()
    } else {
        std::io::stdout().is_terminal()
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Text => builder.init(),
    }
    guard
}
