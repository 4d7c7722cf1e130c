//! Serving the router over HTTP/1.1 with hyper directly (axum's `serve` installs no timer,
//! so it has no header-read timeout: tokio-rs/axum#2741): every connection gets
//! [`ServeConfig::header_read_timeout`] to send a request's head, at most
//! [`ServeConfig::max_connections`] are open at once (further ones wait in the listen
//! backlog), and at shutdown the listener closes, idle connections and connections still
//! sending a head are closed at once, and in-flight requests finish.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The connection-level limits.
#[derive(Debug, Clone, Copy)]
pub struct ServeConfig {
    /// A client that has not sent a whole request head this long after the connection
    /// opened (or after its previous response) is disconnected.
    pub header_read_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `stop` completes, then drains: no new connection is
/// accepted, connections without a request in flight close, and this returns once every
/// in-flight request has been answered. Handlers see the peer as
/// `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: ServeConfig,
    stop: impl Future<Output = ()>,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    let draining = CancellationToken::new();
    let mut connections = JoinSet::new();
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let open = metrics::gauge!("http_connections_open");
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            () = &mut stop => break,
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                // Never closed.
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Per-connection errors (reset before accept) and resource errors
                    // (EMFILE): log, back off briefly on the latter, keep serving.
                    tracing::warn!(error = %err, "accepting a connection failed");
                    if !is_connection_error(&err) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let router = app.clone();
        // Requests of this connection between their head and the end of their response
        // body: while there is none, the drain closes the connection at once.
        let busy = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&busy);
        let service = tower::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            let guard = Busy::enter(&counted);
            let router = router.clone();
            async move {
                let response = router.oneshot(request).await?;
                Ok::<_, std::convert::Infallible>(response.map(move |body| {
                    axum::body::Body::new(body.map_frame(move |frame| {
                        let _ = &guard;
                        frame
                    }))
                }))
            }
        });
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let draining = draining.clone();
        let open = open.clone();
        open.increment(1.0);
        connections.spawn(async move {
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => Some(ended),
                () = draining.cancelled() => None,
            };
            let ended = match ended {
                Some(ended) => ended,
                // Idle, or still sending a head: closed now (hyper's own graceful shutdown
                // would wait for a half-sent head until the header-read timeout).
                None if busy.load(Ordering::Acquire) == 0 => Ok(()),
                None => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = ended {
                tracing::debug!(error = %err, %peer, "connection ended with an error");
            }
            open.decrement(1.0);
            drop(permit);
        });
        // Reap finished connection tasks so the set stays as large as the open connections.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    draining.cancel();
    while connections.join_next().await.is_some() {}
}

/// Counts a request of a connection as in flight until dropped (with its response body).
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(count))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn is_connection_error(err: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        err.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests;
