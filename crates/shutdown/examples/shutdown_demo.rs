//! A small binary wired like the real ones, driven by `tests/process.rs`.
//!
//! Usage: `shutdown_demo [normal|failing|slow|blocking]` (`SHUTDOWN_TIMEOUT_MS`
//! is honoured). It starts one piece of in-flight work, prints `ready`, and waits
//! for SIGTERM/SIGINT. Progress goes to stdout, one line per step
//! (`work started`, `ready`, `handler stop-accepting ran`, `work finished`,
//! ...), then the report; logs go to stderr through a non-blocking
//! tracing-appender writer whose guard is dropped before `main` returns.
//!
//! - `normal`: every handler succeeds, exit code 0;
//! - `failing`: a release handler returns an error, exit code 1;
//! - `slow`: a drain handler takes 60 s, so a second signal (exit 143 or 130)
//!   or a short `SHUTDOWN_TIMEOUT_MS` (exit 124) ends it;
//! - `blocking`: a drain handler blocks its worker thread for 60 s in
//!   synchronous code; a short `SHUTDOWN_TIMEOUT_MS` ends it with 124, and the
//!   bounded runtime teardown of `run_main` lets the process exit.

use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use smartbeak_shutdown::{HandlerGuard, Phase, RegisterError, Shutdown};
use tokio::sync::oneshot;
use tokio::time::sleep;
use tracing_appender::non_blocking::WorkerGuard;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Normal,
    Failing,
    Slow,
    Blocking,
}

type LogGuard = Arc<Mutex<Option<WorkerGuard>>>;

fn main() -> ExitCode {
    let mode = match std::env::args().nth(1).as_deref() {
        None | Some("normal") => Mode::Normal,
        Some("failing") => Mode::Failing,
        Some("slow") => Mode::Slow,
        Some("blocking") => Mode::Blocking,
        Some(other) => {
            eprintln!("unknown mode {other:?}: expected normal, failing, slow or blocking");
            return ExitCode::from(2);
        }
    };

    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .init();
    // Shared with the force-exit hook, so that even a forced exit flushes.
    let guard: LogGuard = Arc::new(Mutex::new(Some(guard)));

    let code = smartbeak_shutdown::run_main(run(mode, Arc::clone(&guard)));
    // Flush buffered logs, the report included, before returning the code.
    drop(guard.lock().unwrap_or_else(PoisonError::into_inner).take());
    code
}

async fn run(mode: Mode, log_guard: LogGuard) -> ExitCode {
    let shutdown = match Shutdown::from_env() {
        Ok(shutdown) => shutdown,
        Err(err) => {
            tracing::error!(error = %err, "invalid shutdown configuration");
            return ExitCode::FAILURE;
        }
    };
    if let Err(err) = shutdown.listen_for_signals() {
        tracing::error!(error = %err, "cannot listen for signals");
        return ExitCode::FAILURE;
    }
    shutdown.on_force_exit(move || {
        println!("forced exit");
        drop(
            log_guard
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
    });

    let _handlers = match register_handlers(&shutdown, mode) {
        Ok(handlers) => handlers,
        Err(err) => {
            tracing::error!(error = %err, "cannot register shutdown handlers");
            return ExitCode::FAILURE;
        }
    };

    // One job in flight: it runs until shutdown begins, then needs 200 ms
    // more to finish; the drain phase waits for it.
    let token = shutdown.token();
    let (started_tx, started_rx) = oneshot::channel();
    shutdown.spawn(async move {
        println!("work started");
        let _ = started_tx.send(());
        token.cancelled().await;
        sleep(Duration::from_millis(200)).await;
        println!("work finished");
    });
    if started_rx.await.is_err() {
        tracing::error!("the work task ended before starting");
        return ExitCode::FAILURE;
    }
    println!("ready");

    let reason = shutdown.triggered().await;
    println!("shutdown started: {reason}");
    let report = shutdown.run().await;
    println!("{report}");
    report.exit_code()
}

fn register_handlers(shutdown: &Shutdown, mode: Mode) -> Result<Vec<HandlerGuard>, RegisterError> {
    let mut handlers = vec![
        shutdown.register("stop-accepting", Phase::StopAccepting, || async {
            println!("handler stop-accepting ran");
        })?,
        shutdown.register("drain", Phase::Drain, || async {
            println!("handler drain ran");
        })?,
        shutdown.register("release", Phase::Release, || async {
            println!("handler release ran");
        })?,
    ];
    match mode {
        Mode::Normal => {}
        Mode::Failing => {
            handlers.push(
                shutdown.register("failing-release", Phase::Release, || async {
                    println!("handler failing-release ran");
                    Err::<(), _>("simulated failure")
                })?,
            )
        }
        Mode::Slow => handlers.push(shutdown.register("slow-drain", Phase::Drain, || async {
            println!("handler slow-drain started");
            sleep(Duration::from_secs(60)).await;
            println!("handler slow-drain finished");
        })?),
        Mode::Blocking => {
            handlers.push(shutdown.register("blocking-drain", Phase::Drain, || async {
                println!("handler blocking-drain started");
                // Synchronous code that never yields: the deadline cannot abort it.
                std::thread::sleep(Duration::from_secs(60));
                println!("handler blocking-drain finished");
            })?)
        }
    }
    Ok(handlers)
}
