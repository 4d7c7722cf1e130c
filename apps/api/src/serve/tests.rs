//! The connection limits against raw TCP clients: a slowloris is cut at the header-read
//! timeout, a half-sent head does not hold the drain, an in-flight request does, and the
//! connection cap holds further clients in the backlog.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot};

use super::*;

/// Generous upper bound on anything that should happen promptly (a failing test waits this).
const PROMPTLY: Duration = Duration::from_secs(10);

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

/// `/slow` notifies `entered`, then answers once `release` is notified.
#[derive(Default)]
struct Gate {
    entered: Notify,
    release: Notify,
}

async fn start(config: ServeConfig, gate: Arc<Gate>) -> Server {
    let app = Router::new().route("/", get(|| async { "ok" })).route(
        "/slow",
        get(move || {
            let gate = Arc::clone(&gate);
            async move {
                gate.entered.notify_one();
                gate.release.notified().await;
                "slow"
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(serve(listener, app, config, async {
        let _ = stopped.await;
    }));
    Server {
        addr,
        stop: Some(stop),
        done,
    }
}

/// Reads until the server closes the connection; what it sent.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(PROMPTLY, stream.read_to_end(&mut out))
        .await
        .expect("the server must close the connection")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_slowloris_is_disconnected_at_the_header_read_timeout() {
    let timeout = Duration::from_millis(300);
    let server = start(
        ServeConfig {
            header_read_timeout: timeout,
            max_connections: 16,
        },
        Arc::new(Gate::default()),
    )
    .await;
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
        .await
        .unwrap();
    let answer = read_to_close(&mut slow).await;
    assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
    // hyper answers 408 or just closes; either way no 200.
    assert!(!answer.contains("200 OK"), "{answer}");

    // A client that sends its head in time is served.
    let mut fine = TcpStream::connect(server.addr).await.unwrap();
    fine.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut fine).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");
    drop(server);
}

#[tokio::test]
async fn a_half_sent_head_does_not_hold_the_drain_but_an_in_flight_request_does() {
    let gate = Arc::new(Gate::default());
    let mut server = start(
        ServeConfig {
            // Far longer than the test: the drain must not wait for it.
            header_read_timeout: Duration::from_secs(600),
            max_connections: 16,
        },
        Arc::clone(&gate),
    )
    .await;
    let mut stuck = TcpStream::connect(server.addr).await.unwrap();
    stuck
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut in_flight = TcpStream::connect(server.addr).await.unwrap();
    in_flight
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // An idle keep-alive connection after one answered request.
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(PROMPTLY, idle.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK"));
    tokio::time::timeout(PROMPTLY, gate.entered.notified())
        .await
        .expect("/slow is being handled");

    server.stop.take().unwrap().send(()).unwrap();
    // The half-sent head and the idle connection are closed at once...
    assert_eq!(read_to_close(&mut stuck).await, "");
    assert_eq!(read_to_close(&mut idle).await, "");
    // ...while the request in flight holds the drain until it is answered.
    assert!(!server.done.is_finished());
    gate.release.notify_one();
    let answer = read_to_close(&mut in_flight).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.ends_with("slow"), "{answer}");
    tokio::time::timeout(PROMPTLY, &mut server.done)
        .await
        .expect("the drain ends once the last request is answered")
        .unwrap();
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let server = start(
        ServeConfig {
            header_read_timeout: Duration::from_secs(600),
            max_connections: 1,
        },
        Arc::new(Gate::default()),
    )
    .await;
    let mut first = TcpStream::connect(server.addr).await.unwrap();
    first
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(PROMPTLY, first.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK"));
    // The second connection completes in the kernel's backlog but is not served while the
    // first holds the only slot.
    let mut second = TcpStream::connect(server.addr).await.unwrap();
    second
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await;
    assert!(waited.is_err(), "served beyond the cap");
    drop(first);
    let answer = read_to_close(&mut second).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
}
