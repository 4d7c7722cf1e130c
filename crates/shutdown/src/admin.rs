//! The admin port of a worker binary (feature `admin`): `/healthz`, `/readyz` and
//! `/metrics`, tied to the [`Shutdown`] coordinator.
//!
//! The api serves these on its own listener; the export worker and the control-plane have
//! no public listener and serve them here, on `*_ADMIN_ADDR`. Readiness is the caller's
//! check (typically a database ping) and turns 503 as soon as shutdown is triggered; the
//! listener stops with [`Shutdown::listener_token`], after the `StopAccepting` phase, so
//! probes still get answers while the process drains.
//!
//! ```no_run
//! # async fn demo(shutdown: smartbeak_shutdown::Shutdown,
//! #     handle: metrics_exporter_prometheus::PrometheusHandle) -> std::io::Result<()> {
//! use smartbeak_shutdown::admin::{AdminServer, Check};
//!
//! let admin = AdminServer::bind("127.0.0.1:0".parse().unwrap()).await?;
//! println!("admin on {}", admin.local_addr());
//! let ready: Check = std::sync::Arc::new(|| Box::pin(async { Ok(()) }));
//! admin.serve(&shutdown, Some(handle), ready);
//! # Ok(()) }
//! ```

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::Shutdown;

/// A readiness check: `Ok` when ready, `Err(what is wrong)` otherwise (e.g. `database`).
pub type Check =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// A bound admin listener, not yet serving.
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    local_addr: SocketAddr,
}

#[derive(Clone)]
struct AdminState {
    shutdown: Shutdown,
    metrics: Option<PrometheusHandle>,
    ready: Check,
}

impl AdminServer {
    /// Binds `addr` (port 0 picks a free port; see [`AdminServer::local_addr`]).
    pub async fn bind(addr: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        Ok(Self {
            listener,
            local_addr,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin router (also usable on another listener, e.g. in tests).
    pub fn router(shutdown: &Shutdown, metrics: Option<PrometheusHandle>, ready: Check) -> Router {
        Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(render_metrics))
            .with_state(AdminState {
                shutdown: shutdown.clone(),
                metrics,
                ready,
            })
    }

    /// Serves until the shutdown's listener token fires, as a task tracked by `shutdown`
    /// (so the `Drain` phase waits for in-flight probe answers).
    pub fn serve(self, shutdown: &Shutdown, metrics: Option<PrometheusHandle>, ready: Check) {
        let app = Self::router(shutdown, metrics, ready);
        let stop = shutdown.listener_token();
        let listener = self.listener;
        shutdown.spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "admin listener failed");
            }
        });
    }
}

async fn healthz() -> Response {
    json(StatusCode::OK, r#"{"status":"ok"}"#.to_owned())
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let failed = if state.shutdown.is_triggered() {
        Some("shutdown".to_owned())
    } else {
        (state.ready)().await.err()
    };
    match failed {
        None => json(
            StatusCode::OK,
            r#"{"status":"ready","shutting_down":false}"#.to_owned(),
        ),
        Some(what) => {
            let body = format!(
                r#"{{"status":"not_ready","shutting_down":{},"error":{},"code":"NOT_READY"}}"#,
                state.shutdown.is_triggered(),
                json_string(&format!("not ready: {what}")),
            );
            json(StatusCode::SERVICE_UNAVAILABLE, body)
        }
    }
}

async fn render_metrics(State(state): State<AdminState>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            )],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no metrics recorder installed\n").into_response(),
    }
}

fn json(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// A JSON string literal (quotes and escapes) of `s`.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ShutdownConfig, ShutdownReason};

    async fn get_status(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("connect {path}: {e}")))?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await?;
        let mut raw = Vec::new();
        // The server may reset the connection after its answer (Connection: close); what
        // was read before that is the answer.
        if let Err(e) = stream.read_to_end(&mut raw).await
            && raw.is_empty()
        {
            return Err(io::Error::new(e.kind(), format!("GET {path}: {e}")));
        }
        let raw = String::from_utf8_lossy(&raw).into_owned();
        let status = raw
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok((status, raw))
    }

    #[tokio::test]
    async fn readiness_follows_the_check_and_the_shutdown() -> anyhow::Result<()> {
        // A readiness delay keeps the listener open after the trigger, as in production.
        let mut config = ShutdownConfig::default();
        config.readiness_delay = std::time::Duration::from_secs(60);
        let shutdown = Shutdown::new(config);
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = healthy.clone();
        let ready: Check = Arc::new(move || {
            let ok = flag.load(std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move { if ok { Ok(()) } else { Err("database".into()) } })
        });
        let admin = AdminServer::bind("127.0.0.1:0".parse()?).await?;
        let addr = admin.local_addr();
        admin.serve(&shutdown, None, ready);

        assert_eq!(get_status(addr, "/healthz").await?.0, 200);
        assert_eq!(get_status(addr, "/readyz").await?.0, 200);
        assert_eq!(get_status(addr, "/metrics").await?.0, 404);
        healthy.store(false, std::sync::atomic::Ordering::SeqCst);
        let (status, body) = get_status(addr, "/readyz").await?;
        assert_eq!(status, 503);
        assert!(body.contains(r#""error":"not ready: database""#), "{body}");
        healthy.store(true, std::sync::atomic::Ordering::SeqCst);
        shutdown.trigger(ShutdownReason::Requested("test".into()));
        let (status, body) = get_status(addr, "/readyz").await?;
        assert_eq!(
            status, 503,
            "the listener still answers during the readiness delay"
        );
        assert!(body.contains(r#""shutting_down":true"#), "{body}");
        Ok(())
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\n"), r#""a\"b\\c\u000a""#);
    }
}
