//! The [`Shutdown`] coordinator: trigger and reason, cancellation token and
//! task tracker, handler registration, and the phased execution that
//! produces the [`ShutdownReport`].

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, join_all};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::Instrument;

use crate::config::{ConfigError, ShutdownConfig};
use crate::handler::{HandlerGuard, HandlerOutput, Phase, RegisterError};
use crate::report::{HandlerOutcome, HandlerReport, ShutdownReport};
use crate::signal::Signal;

/// Name of the built-in drain entry that waits for the tasks spawned through
/// [`Shutdown::spawn`] (or the [`Shutdown::tracker`]).
pub const IN_FLIGHT_TASKS: &str = "in-flight-tasks";

/// Name of the built-in [`Phase::StopAccepting`] entry that waits
/// [`ShutdownConfig::readiness_delay`] before the listener closes (present only
/// when the delay is not zero).
pub const READINESS_DELAY: &str = "readiness-delay";

/// Why shutdown began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShutdownReason {
    /// A signal arrived (SIGTERM or SIGINT; Ctrl-C on non-Unix).
    Signal(Signal),
    /// Requested by the program (tests, a job that finished its work, or
    /// [`Shutdown::run`] called before any trigger).
    Requested(String),
    /// A fatal error; the exit code is non-zero even if every handler succeeds.
    Fatal(String),
}

impl fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShutdownReason::Signal(signal) => write!(f, "signal {signal}"),
            ShutdownReason::Requested(why) => write!(f, "requested: {why}"),
            ShutdownReason::Fatal(why) => write!(f, "fatal: {why}"),
        }
    }
}

/// The process-wide shutdown coordinator. Cheap to clone: clones share state.
///
/// Life cycle: handlers are [registered](Self::register) and work is
/// [spawned](Self::spawn) while the process serves; shutdown is
/// [triggered](Self::trigger) once, by a signal (see
/// [`listen_for_signals`](Self::listen_for_signals)) or by the program, which
/// cancels the [token](Self::token) and freezes the set of handlers; the
/// phases then run (they start at the trigger when it happens inside a tokio
/// runtime, else at the first [`run`](Self::run)); [`run`](Self::run) waits
/// for them and returns the report.
#[derive(Clone)]
pub struct Shutdown {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.state();
        f.debug_struct("Shutdown")
            .field("config", &self.inner.config)
            .field("handlers", &state.handlers.len())
            .field("reason", &state.triggered.as_ref().map(|t| &t.reason))
            .finish_non_exhaustive()
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new(ShutdownConfig::default())
    }
}

impl Shutdown {
    /// A coordinator with the given deadlines. Needs no runtime.
    pub fn new(config: ShutdownConfig) -> Self {
        let (report, _) = watch::channel(None);
        Self {
            inner: Arc::new(Inner {
                config,
                token: CancellationToken::new(),
                listener: CancellationToken::new(),
                tracker: TaskTracker::new(),
                state: Mutex::new(State {
                    next_id: 0,
                    handlers: BTreeMap::new(),
                    triggered: None,
                    execution_started: false,
                }),
                progress: Mutex::new(Vec::new()),
                report,
                signals_installed: AtomicBool::new(false),
                force_exit_hook: Mutex::new(None),
            }),
        }
    }

    /// A coordinator configured from `SHUTDOWN_TIMEOUT_MS` and
    /// `SHUTDOWN_DRAIN_TIMEOUT_MS` (see [`ShutdownConfig::from_env`]).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when a variable is set to an invalid value.
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self::new(ShutdownConfig::from_env()?))
    }

    /// The configuration in use.
    pub fn config(&self) -> &ShutdownConfig {
        &self.inner.config
    }

    /// A token cancelled when shutdown is triggered. Long-running tasks
    /// select on [`CancellationToken::cancelled`] to stop taking new work
    /// (it means "stop accepting", not "abort the job in hand").
    ///
    /// Each call returns a child of the coordinator's own token, so
    /// cancelling it does not trigger shutdown: use [`trigger`](Self::trigger).
    pub fn token(&self) -> CancellationToken {
        self.inner.token.child_token()
    }

    /// A token cancelled when the listener should close: once every
    /// [`Phase::StopAccepting`] handler (the readiness flip) has finished and
    /// the readiness delay ([`ShutdownConfig::readiness_delay`],
    /// `SHUTDOWN_READINESS_DELAY_MS`) has passed, or at the overall deadline.
    /// A server passes it to its graceful shutdown, so a load balancer sees the
    /// failing readiness probe before connections are refused.
    pub fn listener_token(&self) -> CancellationToken {
        self.inner.listener.child_token()
    }

    /// Runs `step` (a start-up step: connecting, migrating, waiting for a
    /// dependency) until it finishes or shutdown is triggered, whichever
    /// comes first. `None` means the trigger came first: `step` was dropped,
    /// and the caller releases what it opened and returns
    /// [`run`](Self::run)'s exit code, so the first signal ends a slow
    /// start-up instead of waiting for it.
    pub async fn until_triggered<F: Future>(&self, step: F) -> Option<F::Output> {
        self.inner.token.run_until_cancelled(step).await
    }

    /// The tracker of in-flight tasks. It is closed at the trigger; the
    /// built-in [`IN_FLIGHT_TASKS`] entry of [`Phase::Drain`] waits until
    /// every task spawned on it has finished.
    pub fn tracker(&self) -> TaskTracker {
        self.inner.tracker.clone()
    }

    /// Spawns `task` on the current tokio runtime, tracked: the drain phase
    /// waits for it (up to the drain deadline). Panics outside a runtime,
    /// like [`tokio::spawn`].
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.tracker.spawn(task)
    }

    /// Registers a handler for `phase`, bounded only by the overall deadline.
    ///
    /// The handler is called at most once, in its own task: an `Err`, a
    /// panic or a hang is reported and does not stop the other handlers.
    ///
    /// # Errors
    ///
    /// [`RegisterError::ShutdownStarted`] once shutdown has been triggered.
    pub fn register<F, Fut>(
        &self,
        name: impl Into<String>,
        phase: Phase,
        handler: F,
    ) -> Result<HandlerGuard, RegisterError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HandlerOutput,
    {
        self.register_handler(name.into(), phase, None, handler)
    }

    /// Like [`register`](Self::register), with the handler cancelled and
    /// reported as [`HandlerOutcome::TimedOut`] after `timeout`.
    ///
    /// # Errors
    ///
    /// [`RegisterError::ShutdownStarted`] once shutdown has been triggered.
    pub fn register_with_timeout<F, Fut>(
        &self,
        name: impl Into<String>,
        phase: Phase,
        timeout: Duration,
        handler: F,
    ) -> Result<HandlerGuard, RegisterError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HandlerOutput,
    {
        self.register_handler(name.into(), phase, Some(timeout), handler)
    }

    fn register_handler<F, Fut>(
        &self,
        name: String,
        phase: Phase,
        timeout: Option<Duration>,
        handler: F,
    ) -> Result<HandlerGuard, RegisterError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HandlerOutput,
    {
        let run: HandlerFn = Box::new(move || handler().map(HandlerOutput::into_result).boxed());
        let mut state = self.inner.state();
        if state.triggered.is_some() {
            return Err(RegisterError::ShutdownStarted { name });
        }
        let id = state.next_id;
        state.next_id += 1;
        tracing::debug!(handler = %name, phase = %phase, "shutdown handler registered");
        state.handlers.insert(
            id,
            Registered {
                name,
                phase,
                timeout,
                run,
            },
        );
        Ok(HandlerGuard {
            inner: Arc::downgrade(&self.inner),
            id,
            armed: true,
        })
    }

    /// Starts shutdown with `reason`, unless it already started. Returns
    /// whether this call started it (later calls, and their reasons, are
    /// ignored: handlers never run twice).
    ///
    /// Cancels the token, closes the tracker and freezes the handlers; when
    /// called inside a tokio runtime it also starts the phases in a task of
    /// their own, so the overall deadline holds from this moment.
    pub fn trigger(&self, reason: ShutdownReason) -> bool {
        let started = self.inner.trigger(reason);
        if started && let Ok(handle) = Handle::try_current() {
            self.inner.start_execution(&handle);
        }
        started
    }

    /// Whether shutdown has been triggered.
    pub fn is_triggered(&self) -> bool {
        self.inner.token.is_cancelled()
    }

    /// The reason shutdown was triggered with, if it was.
    pub fn reason(&self) -> Option<ShutdownReason> {
        self.inner
            .state()
            .triggered
            .as_ref()
            .map(|t| t.reason.clone())
    }

    /// Waits until shutdown is triggered (by a signal or by
    /// [`trigger`](Self::trigger)) and returns the reason.
    pub async fn triggered(&self) -> ShutdownReason {
        self.inner.token.cancelled().await;
        // The reason is stored before the token is cancelled.
        self.reason()
            .unwrap_or_else(|| ShutdownReason::Requested("unknown".to_owned()))
    }

    /// Runs the shutdown to its end and returns the report: triggers it
    /// (reason [`ShutdownReason::Requested`]) if nothing did yet, starts the
    /// phases if they have not started, and waits for the last phase or the
    /// overall deadline. The report is logged once, when it is made.
    ///
    /// Idempotent: every call, concurrent or later, returns the same report.
    /// Dropping the future does not stop the phases. Must be called inside a
    /// tokio runtime.
    pub async fn run(&self) -> ShutdownReport {
        self.trigger(ShutdownReason::Requested(
            "run() called before any trigger".to_owned(),
        ));
        self.inner.start_execution(&Handle::current());
        let mut rx = self.inner.report.subscribe();
        loop {
            if let Some(report) = rx.borrow_and_update().as_ref() {
                return report.clone();
            }
            if rx.changed().await.is_err() {
                // The sender lives in `Inner`, which `self` keeps alive, so
                // this cannot happen; wait rather than invent a report.
                std::future::pending::<()>().await;
            }
        }
    }
}

type HandlerFn = Box<dyn FnOnce() -> BoxFuture<'static, Result<(), String>> + Send>;

pub(crate) struct Inner {
    config: ShutdownConfig,
    token: CancellationToken,
    /// Cancelled at the end of [`Phase::StopAccepting`] (see [`Shutdown::listener_token`]).
    listener: CancellationToken,
    tracker: TaskTracker,
    state: Mutex<State>,
    /// One slot per handler of the running shutdown, in report order.
    progress: Mutex<Vec<Slot>>,
    report: watch::Sender<Option<ShutdownReport>>,
    pub(crate) signals_installed: AtomicBool,
    pub(crate) force_exit_hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

struct State {
    next_id: u64,
    handlers: BTreeMap<u64, Registered>,
    triggered: Option<Triggered>,
    execution_started: bool,
}

struct Triggered {
    reason: ShutdownReason,
    at: Instant,
}

struct Registered {
    name: String,
    phase: Phase,
    timeout: Option<Duration>,
    run: HandlerFn,
}

struct Slot {
    name: String,
    phase: Phase,
    started: Option<Instant>,
    finished: Option<(HandlerOutcome, Duration)>,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // Critical sections never panic half-way; a poisoned lock holds
        // consistent data.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn progress(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn deregister(&self, id: u64) {
        let mut state = self.state();
        if state.triggered.is_none()
            && let Some(handler) = state.handlers.remove(&id)
        {
            tracing::debug!(handler = %handler.name, "shutdown handler deregistered");
        }
    }

    fn trigger(&self, reason: ShutdownReason) -> bool {
        {
            let mut state = self.state();
            if let Some(first) = &state.triggered {
                tracing::debug!(reason = %reason, first = %first.reason, "shutdown already triggered");
                return false;
            }
            tracing::info!(reason = %reason, handlers = state.handlers.len(), "shutdown triggered");
            state.triggered = Some(Triggered {
                reason,
                at: Instant::now(),
            });
        }
        self.token.cancel();
        self.tracker.close();
        true
    }

    /// Spawns the phases on `handle` once, if shutdown was triggered.
    fn start_execution(self: &Arc<Self>, handle: &Handle) {
        let (reason, at, handlers) = {
            let mut state = self.state();
            let Some(triggered) = &state.triggered else {
                return;
            };
            if state.execution_started {
                return;
            }
            let (reason, at) = (triggered.reason.clone(), triggered.at);
            state.execution_started = true;
            let handlers: Vec<Registered> =
                std::mem::take(&mut state.handlers).into_values().collect();
            (reason, at, handlers)
        };
        handle.spawn(Arc::clone(self).execute(reason, at, handlers));
    }

    async fn execute(
        self: Arc<Self>,
        reason: ShutdownReason,
        at: Instant,
        handlers: Vec<Registered>,
    ) {
        let tracker = self.tracker.clone();
        let mut jobs = Vec::with_capacity(handlers.len() + 1);
        jobs.push(Registered {
            name: IN_FLIGHT_TASKS.to_owned(),
            phase: Phase::Drain,
            timeout: self.config.drain_timeout,
            run: Box::new(move || {
                async move {
                    tracker.wait().await;
                    Ok(())
                }
                .boxed()
            }),
        });
        let delay = self.config.readiness_delay;
        if !delay.is_zero() {
            jobs.push(Registered {
                name: READINESS_DELAY.to_owned(),
                phase: Phase::StopAccepting,
                timeout: None,
                run: Box::new(move || {
                    async move {
                        tokio::time::sleep(delay).await;
                        Ok(())
                    }
                    .boxed()
                }),
            });
        }
        jobs.extend(handlers);
        // Stable: registration order is kept inside a phase.
        jobs.sort_by_key(|job| job.phase);
        *self.progress() = jobs
            .iter()
            .map(|job| Slot {
                name: job.name.clone(),
                phase: job.phase,
                started: None,
                finished: None,
            })
            .collect();

        let mut batches: [Vec<(usize, Registered)>; Phase::ALL.len()] = Default::default();
        for (index, job) in jobs.into_iter().enumerate() {
            batches[job.phase as usize].push((index, job));
        }
        let this = &self;
        // Cancelled when the stop-accepting phase ends, or when the deadline drops `phases`.
        let listener = self.listener.clone().drop_guard();
        let phases = async move {
            let mut listener = Some(listener);
            for (phase, batch) in Phase::ALL.into_iter().zip(batches) {
                if phase > Phase::StopAccepting {
                    drop(listener.take());
                }
                tracing::debug!(phase = %phase, handlers = batch.len(), "shutdown phase started");
                join_all(
                    batch
                        .into_iter()
                        .map(|(index, job)| this.run_handler(index, job)),
                )
                .await;
                tracing::debug!(phase = %phase, "shutdown phase finished");
            }
        };
        // Dropping `phases` at the deadline drops the handles of the handlers
        // still running, which aborts their tasks.
        let deadline_exceeded = tokio::time::timeout_at(at + self.config.timeout, phases)
            .await
            .is_err();

        let now = Instant::now();
        let handlers = self
            .progress()
            .iter()
            .map(|slot| {
                let (outcome, duration) = match (&slot.finished, slot.started) {
                    (Some((outcome, duration)), _) => (outcome.clone(), *duration),
                    (None, Some(started)) => (HandlerOutcome::StillRunning, now - started),
                    (None, None) => (HandlerOutcome::NotStarted, Duration::ZERO),
                };
                HandlerReport {
                    name: slot.name.clone(),
                    phase: slot.phase,
                    outcome,
                    duration,
                }
            })
            .collect();
        let report = ShutdownReport {
            reason,
            handlers,
            deadline_exceeded,
            elapsed: now - at,
        };
        report.log();
        self.report.send_replace(Some(report));
    }

    async fn run_handler(&self, index: usize, job: Registered) {
        let Registered {
            name,
            phase,
            timeout,
            run,
        } = job;
        let started = Instant::now();
        if let Some(slot) = self.progress().get_mut(index) {
            slot.started = Some(started);
        }
        tracing::debug!(handler = %name, phase = %phase, "shutdown handler started");
        let span = tracing::info_span!("shutdown_handler", handler = %name, phase = %phase);
        // Calling `run` inside the task catches panics of its synchronous part too.
        let task = tokio::spawn(
            async move {
                let future = run();
                match timeout {
                    Some(timeout) => tokio::time::timeout(timeout, future).await.ok(),
                    None => Some(future.await),
                }
            }
            .instrument(span),
        );
        let outcome = match AbortOnDropHandle::new(task).await {
            Ok(Some(Ok(()))) => HandlerOutcome::Ok,
            Ok(Some(Err(message))) => HandlerOutcome::Failed(message),
            Ok(None) => HandlerOutcome::TimedOut,
            Err(err) if err.is_panic() => HandlerOutcome::Panicked(panic_message(err.into_panic())),
            Err(_) => HandlerOutcome::Failed("handler task was cancelled".to_owned()),
        };
        let duration = started.elapsed();
        tracing::debug!(
            handler = %name, phase = %phase, outcome = outcome.label(),
            duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            "shutdown handler ended"
        );
        if let Some(slot) = self.progress().get_mut(index) {
            slot.finished = Some((outcome, duration));
        }
    }

    /// Names of the handlers started and not finished, for the forced exit.
    pub(crate) fn running_handlers(&self) -> Vec<String> {
        self.progress()
            .iter()
            .filter(|slot| slot.started.is_some() && slot.finished.is_none())
            .map(|slot| slot.name.clone())
            .collect()
    }
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "panic payload is not a string".to_owned()
    }
}

#[cfg(test)]
mod tests;
