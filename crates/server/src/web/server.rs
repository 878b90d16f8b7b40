//! The HTTP server loop (instead of `axum::serve`, which has no header-read
//! timeout and no connection limit): a client that sends half a header is
//! dropped after [`HEADER_READ_TIMEOUT`], including between requests on a
//! kept-alive connection; at most [`MAX_CONNECTIONS`] are served at once
//! (further ones wait in the listen backlog); a request that takes longer
//! than [`REQUEST_TIMEOUT`] is answered 503 (see `web::app`). Websocket
//! upgrades leave the connection's timeouts behind: the live stream has its
//! own send timeout.
//!
//! With HTTPS ([`Tls`]) each connection first completes its TLS handshake,
//! in its own task (so a client that stalls it delays nobody) within
//! [`TLS_HANDSHAKE_TIMEOUT`], holding one of the [`MAX_CONNECTIONS`] slots;
//! then it is served exactly like a plain one, with the same timeouts.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Time a client has to send a request's headers (also the idle time
/// allowed between requests on a kept-alive connection).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a request may take to be answered.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Time a client has to complete the TLS handshake of an HTTPS connection.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time open connections get to finish after a shutdown request.
const DRAIN: Duration = Duration::from_secs(5);

/// HTTPS: the acceptor made from the validated certificate and key, and
/// the counters of failed handshakes.
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Serves `app` on `listener` (over TLS with `tls`) until `shutdown`, then
/// lets open requests finish for a few seconds.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Tls>,
    shutdown: CancellationToken,
) {
    let tls = tls.map(Arc::new);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let tracker = TaskTracker::new();
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: it passes.
                    tracing::warn!(error = %e, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let stop = shutdown.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            match tls {
                None => serve_connection(stream, app, stop).await,
                Some(tls) => {
                    let handshake =
                        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.acceptor.accept(stream));
                    let outcome = tokio::select! {
                        r = handshake => r,
                        _ = stop.cancelled() => return,
                    };
                    match outcome {
                        Ok(Ok(stream)) => serve_connection(stream, app, stop).await,
                        Ok(Err(e)) => handshake_failed(&tls, "failed", peer, &e.to_string()),
                        Err(_) => handshake_failed(&tls, "timeout", peer, "not completed in time"),
                    }
                }
            }
            drop(slot);
        });
    }
    tracker.close();
    if tokio::time::timeout(DRAIN, tracker.wait()).await.is_err() {
        tracing::warn!(
            connections = tracker.len(),
            "HTTP connections still open after the drain; closing them"
        );
    }
}

/// Serves one connection (plain or TLS) until it ends or `stop`; then
/// lets its request in progress finish.
async fn serve_connection<S>(stream: S, app: Router, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Logs and counts an HTTPS connection closed before its handshake
/// completed. At debug level: port scanners and plain-HTTP clients make
/// these, and the counter says how many.
fn handshake_failed(tls: &Tls, reason: &str, peer: std::net::SocketAddr, detail: &str) {
    tls.metrics.http_tls.handshake_failed(reason);
    tracing::debug!(%peer, reason, detail = %widgetry_common::excerpt(detail), "TLS handshake failed");
}
