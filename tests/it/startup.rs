//! Start-up interrupted by the first signal: the api and the control-plane, started against
//! a "database" that accepts TCP connections and never answers (a listener this test owns),
//! get SIGTERM while they wait in `Database::connect`, and exit at once with the shutdown
//! report's code instead of waiting out the connect timeout.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

use crate::support::binary;

/// Far above the exit bound below: only the signal can end the connect in time.
const CONNECT_TIMEOUT_MS: &str = "120000";
/// How long the process may take to exit after SIGTERM.
const EXIT_BOUND: Duration = Duration::from_secs(10);

/// A TCP listener on 127.0.0.1 that accepts every connection and never sends a byte.
struct BlackHole {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl BlackHole {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            // Kept open (and silent) for the life of the test process.
            let mut held: Vec<TcpStream> = Vec::new();
            for stream in listener.incoming().flatten() {
                held.push(stream);
                count.fetch_add(1, Ordering::SeqCst);
            }
        });
        Self { addr, accepted }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@{}/postgres", self.addr)
    }

    /// Waits, polling, until the process under test has connected.
    async fn wait_for_a_connection(&self, output: &Output) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.accepted.load(Ordering::SeqCst) == 0 {
            assert!(
                Instant::now() < deadline,
                "the binary never connected to {}:\n{}",
                self.addr,
                output.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Everything the child printed, on stdout and stderr.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<String>>>);

impl Output {
    fn capture(child: &mut Child) -> Self {
        let output = Self::default();
        let streams = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>),
        ];
        for stream in streams.into_iter().flatten() {
            let sink = output.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    sink.0.lock().unwrap().push(line);
                }
            });
        }
        output
    }

    fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }

    /// Waits, polling, until a line contains `needle` (the streams may lag the exit).
    async fn wait_for(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.text().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

fn command(package: &str, bin: &str, database_url: &str) -> Command {
    let mut cmd = Command::new(binary(package, bin).unwrap());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url)
        .env("DB_ACQUIRE_TIMEOUT_MS", CONNECT_TIMEOUT_MS)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Starts `cmd`, waits until it is stuck connecting, sends SIGTERM and returns the exit
/// code (within [`EXIT_BOUND`]) and the output.
async fn sigterm_while_connecting(mut cmd: Command, hole: &BlackHole) -> (Option<i32>, Output) {
    let mut child = cmd.spawn().unwrap();
    let output = Output::capture(&mut child);
    hole.wait_for_a_connection(&output).await;
    smartbeak_test_support::signal(child.id().unwrap(), "TERM").unwrap();
    let started = Instant::now();
    let status = match tokio::time::timeout(EXIT_BOUND, child.wait()).await {
        Ok(status) => status.unwrap(),
        Err(_) => panic!(
            "still running {:?} after SIGTERM during start-up:\n{}",
            started.elapsed(),
            output.text()
        ),
    };
    (status.code(), output)
}

#[tokio::test]
async fn sigterm_while_the_api_connects_exits_at_once_with_the_report_code() {
    let hole = BlackHole::start();
    let mut cmd = command("smartbeak-api", "smartbeak-api", &hole.url());
    cmd.env("API_BIND", "127.0.0.1:0")
        .env("RATE_LIMIT_ENABLED", "false");
    let (code, output) = sigterm_while_connecting(cmd, &hole).await;
    // The report (logged by the coordinator's task) and the start-up line (logged by `main`)
    // may come in either order; the process has exited, only the readers may lag.
    for needle in ["shutdown complete", "shutdown requested during start-up"] {
        assert!(
            output.wait_for(needle).await,
            "no {needle:?}:\n{}",
            output.text()
        );
    }
    let text = output.text();
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("connecting to the database"), "{text}");
    assert!(!text.contains("listening on"), "{text}");
}

#[tokio::test]
async fn sigterm_while_the_control_plane_connects_exits_at_once_with_the_report_code() {
    let hole = BlackHole::start();
    let cmd = command(
        "smartbeak-control-plane",
        "smartbeak-control-plane",
        &hole.url(),
    );
    let (code, output) = sigterm_while_connecting(cmd, &hole).await;
    // The report (logged by the coordinator's task) and the start-up line (logged by `main`)
    // may come in either order; the process has exited, only the readers may lag.
    for needle in ["shutdown complete", "shutdown requested during start-up"] {
        assert!(
            output.wait_for(needle).await,
            "no {needle:?}:\n{}",
            output.text()
        );
    }
    let text = output.text();
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains("control-plane ready"), "{text}");
}
