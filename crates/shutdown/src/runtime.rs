//! Running a binary's async `main` on a tokio runtime whose teardown is bounded, so that a
//! task stuck in blocking code cannot hold the process past its shutdown report.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

/// How long [`run_main`] waits, once `main`'s future has returned, for the runtime's tasks
/// and blocking threads to stop before it returns anyway.
pub const RUNTIME_TEARDOWN: Duration = Duration::from_millis(500);

/// Runs `main` on a new multi-thread tokio runtime and returns its exit code, then tears the
/// runtime down with [`RUNTIME_TEARDOWN`] as the bound
/// ([`Runtime::shutdown_timeout`](tokio::runtime::Runtime::shutdown_timeout)).
///
/// Dropping a runtime waits for every worker thread, and a worker stuck in blocking code (a
/// handler that called `std::thread::sleep`, a synchronous DNS lookup, a `spawn_blocking`
/// task that never ends) never comes back: the process would then hang after its report
/// until the orchestrator's SIGKILL, and the report's exit code (124 past the deadline) would
/// be lost. With the bound, `main` returns the code and the stuck threads die with the
/// process.
///
/// The runtime has at least two worker threads, so one worker blocked by a handler still
/// leaves one to fire the shutdown deadline. A runtime that cannot be built is logged and
/// gives [`ExitCode::FAILURE`]. Every SmartBeak binary's `main` calls this (or
/// [`run_main_with`]) and flushes its logs after it returns.
pub fn run_main<F>(main: F) -> ExitCode
where
    F: Future<Output = ExitCode>,
{
    run_main_with(RUNTIME_TEARDOWN, main)
}

/// Like [`run_main`], with the teardown bounded by `teardown`.
pub fn run_main_with<F>(teardown: Duration, main: F) -> ExitCode
where
    F: Future<Output = ExitCode>,
{
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the tokio runtime");
            eprintln!("cannot start the tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(main);
    runtime.shutdown_timeout(teardown);
    code
}
