//! Process-level tests: run `examples/shutdown_demo.rs`, send it real
//! signals (through `nix`), and check from outside what it printed and how it
//! exited. Every wait is bounded and polls; none sleeps a fixed time.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Upper bound for any single wait. Generous because the machine is shared;
/// a passing run takes well under a second per wait.
const BOUND: Duration = Duration::from_secs(30);

/// Builds the example once per test process (nextest runs each test in its
/// own process; concurrent builds serialize on cargo's lock) and returns its
/// path, next to the profile directory this test binary runs from, so that
/// `CARGO_TARGET_DIR`/`--target-dir` and the profile are honoured.
fn demo_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let exe = std::env::current_exe().expect("path of the test binary");
        // <target-dir>/<profile>/deps/process-<hash>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in <target-dir>/<profile>/deps");
        let target_dir = profile_dir.parent().expect("profile dir has a parent");
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .args(["build", "--quiet", "--example", "shutdown_demo", "-p"])
            .arg(env!("CARGO_PKG_NAME"))
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => {}
            Some("release") => {
                cargo.arg("--release");
            }
            Some(profile) => {
                cargo.args(["--profile", profile]);
            }
            None => panic!("unexpected profile dir {}", profile_dir.display()),
        }
        let status = cargo.status().expect("run cargo build");
        assert!(
            status.success(),
            "cargo build --example shutdown_demo failed: {status}"
        );
        let binary = profile_dir
            .join("examples")
            .join(format!("shutdown_demo{}", std::env::consts::EXE_SUFFIX));
        assert!(binary.is_file(), "{} was not built", binary.display());
        binary
    })
}

/// A running demo; killed on drop so a failing test leaves nothing behind.
struct Demo {
    child: Child,
    lines: Receiver<String>,
    stdout: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Demo {
    fn start(mode: &str, timeout_ms: Option<&str>) -> Demo {
        let mut command = Command::new(demo_binary());
        command
            .arg(mode)
            .env_remove("SHUTDOWN_TIMEOUT_MS")
            .env_remove("SHUTDOWN_DRAIN_TIMEOUT_MS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(ms) = timeout_ms {
            command.env("SHUTDOWN_TIMEOUT_MS", ms);
        }
        let mut child = command.spawn().expect("start shutdown_demo");

        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut sink = sink.lock().unwrap();
                sink.push_str(&line);
                sink.push('\n');
            }
        });
        Demo {
            child,
            lines,
            stdout: Vec::new(),
            stderr,
        }
    }

    /// Reads stdout until `wanted` appears, within [`BOUND`].
    fn wait_for_line(&mut self, wanted: &str) {
        let deadline = Instant::now() + BOUND;
        while !self.stdout.iter().any(|line| line == wanted) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.stdout.push(line),
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no {wanted:?} line within {BOUND:?}; {}", self.context())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("stdout closed before {wanted:?}; {}", self.context())
                }
            }
        }
    }

    fn send(&self, signal: &str) {
        // From Rust (nix), not the `kill` binary, which minimal images lack.
        let sig = match signal {
            "TERM" => Signal::SIGTERM,
            "INT" => Signal::SIGINT,
            other => panic!("unexpected signal {other}"),
        };
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        kill(pid, sig).unwrap_or_else(|e| panic!("kill -{signal} failed: {e}"));
    }

    /// Reads stdout to its end and waits for the exit, within [`BOUND`];
    /// returns the exit code.
    fn wait_exit(&mut self) -> i32 {
        let deadline = Instant::now() + BOUND;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.stdout.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("stdout still open after {BOUND:?}; {}", self.context())
                }
            }
        }
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the demo") {
                return status.code().unwrap_or_else(|| {
                    panic!("killed by a signal ({status}); {}", self.context())
                });
            }
            assert!(
                Instant::now() < deadline,
                "no exit within {BOUND:?}; {}",
                self.context()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn position(&self, line: &str) -> usize {
        let hits: Vec<_> = (0..self.stdout.len())
            .filter(|&i| self.stdout[i] == line)
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "{line:?} not printed exactly once; {}",
            self.context()
        );
        hits[0]
    }

    fn printed(&self, needle: &str) -> bool {
        self.stdout.iter().any(|line| line.contains(needle))
    }

    fn context(&self) -> String {
        format!(
            "stdout so far:\n{}\nstderr:\n{}",
            self.stdout.join("\n"),
            self.stderr.lock().unwrap()
        )
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn sigterm_with_work_in_flight_drains_runs_phases_in_order_and_exits_0() {
    let mut demo = Demo::start("normal", None);
    demo.wait_for_line("ready");
    assert!(demo.printed("work started"));
    assert!(
        !demo.printed("work finished"),
        "work must be in flight at the signal"
    );
    assert!(
        !demo.printed("handler"),
        "no handler may run before the signal"
    );

    demo.send("TERM");
    let code = demo.wait_exit();

    assert_eq!(code, 0, "{}", demo.context());
    assert!(demo.printed("shutdown started: signal SIGTERM"));
    let stop = demo.position("handler stop-accepting ran");
    let drain = demo.position("handler drain ran");
    let work = demo.position("work finished");
    let release = demo.position("handler release ran");
    assert!(stop < drain, "{}", demo.context());
    assert!(stop < work, "{}", demo.context());
    assert!(drain < release, "{}", demo.context());
    assert!(
        work < release,
        "in-flight work must end before release; {}",
        demo.context()
    );
    assert!(demo.printed("exit code 0"), "{}", demo.context());
    assert!(
        demo.printed("[drain] in-flight-tasks: ok"),
        "{}",
        demo.context()
    );
    // The report reached the log (stderr) before exit: the guard was dropped.
    assert!(
        demo.stderr.lock().unwrap().contains("shutdown complete"),
        "{}",
        demo.context()
    );
}

#[test]
fn failing_handler_exits_non_zero_and_others_still_run() {
    let mut demo = Demo::start("failing", None);
    demo.wait_for_line("ready");
    demo.send("TERM");
    let code = demo.wait_exit();

    assert_eq!(code, 1, "{}", demo.context());
    demo.position("handler failing-release ran");
    demo.position("handler release ran");
    demo.position("work finished");
    assert!(
        demo.printed("[release] failing-release: failed: simulated failure"),
        "{}",
        demo.context()
    );
}

#[test]
fn second_sigterm_during_slow_shutdown_forces_exit_143() {
    // A deadline far away, so only the second signal can end it quickly.
    let mut demo = Demo::start("slow", Some("600000"));
    demo.wait_for_line("ready");
    demo.send("TERM");
    demo.wait_for_line("handler slow-drain started");
    demo.send("TERM");
    let code = demo.wait_exit();

    assert_eq!(code, 143, "{}", demo.context());
    assert!(demo.printed("forced exit"), "{}", demo.context());
    assert!(!demo.printed("handler slow-drain finished"));
    assert!(!demo.printed("handler release ran"));
    assert!(!demo.printed("exit code"), "no report on a forced exit");
    // Logged, and flushed by the force-exit hook, before exiting.
    assert!(
        demo.stderr
            .lock()
            .unwrap()
            .contains("second signal during shutdown"),
        "{}",
        demo.context()
    );
}

#[test]
fn second_sigint_forces_exit_130() {
    let mut demo = Demo::start("slow", Some("600000"));
    demo.wait_for_line("ready");
    demo.send("INT");
    demo.wait_for_line("shutdown started: signal SIGINT");
    demo.wait_for_line("handler slow-drain started");
    demo.send("INT");
    let code = demo.wait_exit();

    assert_eq!(code, 130, "{}", demo.context());
    assert!(!demo.printed("handler slow-drain finished"));
}

#[test]
fn overall_deadline_exits_124_and_names_the_handler_still_running() {
    let mut demo = Demo::start("slow", Some("300"));
    demo.wait_for_line("ready");
    demo.send("TERM");
    let code = demo.wait_exit();

    assert_eq!(code, 124, "{}", demo.context());
    assert!(
        demo.printed("deadline exceeded, still running: [slow-drain]"),
        "{}",
        demo.context()
    );
    assert!(
        demo.printed("[release] release: not-started"),
        "{}",
        demo.context()
    );
    assert!(!demo.printed("handler slow-drain finished"));
}

#[test]
fn handler_stuck_in_blocking_code_still_exits_124() {
    // The handler blocks its worker thread for 60 s; the deadline fires on another worker,
    // and the bounded runtime teardown lets `main` return the report's code.
    let mut demo = Demo::start("blocking", Some("300"));
    demo.wait_for_line("ready");
    demo.send("TERM");
    demo.wait_for_line("handler blocking-drain started");
    let code = demo.wait_exit();

    assert_eq!(code, 124, "{}", demo.context());
    assert!(
        demo.printed("deadline exceeded, still running: [blocking-drain]"),
        "{}",
        demo.context()
    );
    assert!(!demo.printed("handler blocking-drain finished"));
}
