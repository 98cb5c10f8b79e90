//! The proxy's accept loop: a bound on open connections and a deadline for request headers, so
//! that clients that connect and then send nothing, or send their headers a byte at a time
//! (slow-loris), cannot hold the proxy.
//!
//! - At most `max_connections` connections are open; a connection beyond the bound is answered
//!   `503` with `Connection: close` at once (never read) and counted
//!   (`connections_refused_total`). Stripe retries a delivery that was refused.
//! - Request headers (of every request of a keep-alive connection, the wait for the first byte
//!   included) must arrive within `header_timeout`, or the connection is closed.
//! - Headers are at most [`MAX_HEADER_BYTES`] in at most [`MAX_HEADERS`] fields (`431`
//!   otherwise), so an idle connection holds a few kilobytes at most.
//!
//! The body deadline and the in-flight bound live in the request handler, which sees the
//! cheap header checks first.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// The connection metrics the accept loop keeps (the verify-proxy's and the egress broker's).
#[derive(Clone, Debug)]
pub(crate) struct ConnMetrics {
    /// Connections open now.
    pub open: prometheus_client::metrics::gauge::Gauge,
    /// Connections refused because `max_connections` were open.
    pub refused: prometheus_client::metrics::counter::Counter,
}

/// Largest request head (start line and headers), in bytes.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Most header fields in one request.
pub const MAX_HEADERS: usize = 64;

/// The answer to a connection beyond the bound: written without reading anything.
const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; \
charset=utf-8\r\ncontent-length: 14\r\nretry-after: 1\r\nconnection: close\r\n\r\ntoo_many_conns";

/// Settings of the accept loop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServeLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    /// How long open connections may finish their request after shutdown starts.
    pub drain: Duration,
}

/// Binds `addr` and returns the listener with the address it got (port 0 picks one); a failure
/// is `(addr, error)`, for the caller's `Bind` error.
pub(crate) async fn bind(
    addr: std::net::SocketAddr,
) -> Result<(TcpListener, std::net::SocketAddr), (std::net::SocketAddr, std::io::Error)> {
    let listener = TcpListener::bind(addr).await.map_err(|e| (addr, e))?;
    let local = listener.local_addr().map_err(|e| (addr, e))?;
    Ok((listener, local))
}

/// [`bind`] for an optional address.
pub(crate) async fn bind_optional(
    addr: Option<std::net::SocketAddr>,
) -> Result<Option<(TcpListener, std::net::SocketAddr)>, (std::net::SocketAddr, std::io::Error)> {
    match addr {
        Some(a) => bind(a).await.map(Some),
        None => Ok(None),
    }
}

/// Serves a sidecar's admin endpoints (`/metrics`, `/healthz`, ...: nothing secret) on
/// `listener` until `shutdown`; a failure is logged as `what`'s.
pub(crate) fn spawn_admin(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
    what: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "{what} admin server failed");
        }
    })
}

/// Serves `router` on `listener` until `shutdown`, then lets open requests finish (bounded by
/// `limits.drain`).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServeLimits,
    metrics: ConnMetrics,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(MAX_HEADER_BYTES.max(8192))
        .max_headers(MAX_HEADERS);
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // out of file descriptors and the like: do not spin
                tracing::warn!(error = %e, "could not accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics.refused.inc();
            // one non-blocking write, then close: a flood of connections costs no task
            let _ = stream.try_write(OVER_CAPACITY);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        metrics.open.inc();
        let router = router.clone();
        let builder = builder.clone();
        let token = shutdown.clone();
        let metrics = metrics.clone();
        conns.spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let router = router.clone();
                    async move {
                        match router.oneshot(req.map(axum::body::Body::new)).await {
                            Ok(r) => Ok::<_, Infallible>(r),
                            Err(e) => match e {},
                        }
                    }
                });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = token.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            metrics.open.dec();
            drop(permit);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(limits.drain, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.shutdown().await;
}
