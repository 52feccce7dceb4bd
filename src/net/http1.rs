//! The operations endpoint's HTTP/1 connections, under [`OpsLimits`].

use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Acceptor;
use crate::limits::{AcceptLimits, OpsLimits, Refusals, label};

/// Serves one HTTP/1 connection of the operations endpoint: headers within
/// `header_read_timeout`, the whole connection within `connection_timeout`.
pub async fn serve_http1<IO>(
    io: IO,
    router: axum::Router,
    limits: &OpsLimits,
    refusals: &Refusals,
    mut shutdown: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(64 * 1024);
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(router));
    tokio::pin!(conn);
    let deadline = tokio::time::sleep(limits.connection_timeout);
    tokio::pin!(deadline);
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    if e.is_timeout() {
                        refusals.refused(label::OPS_TIMEOUT);
                    }
                    tracing::debug!(error = %e, "ops connection ended with an error");
                }
                return;
            }
            _ = shutdown.changed(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = &mut deadline => {
                refusals.refused(label::OPS_TIMEOUT);
                return;
            }
        }
    }
}

/// Serves the operations endpoint on `listener` with its own limits.
pub fn spawn_ops(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: OpsLimits,
    refusals: Refusals,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let accept = AcceptLimits {
        max_connections: limits.max_connections,
        max_connections_per_source: Some(limits.max_connections_per_source),
        max_pending_handshakes: limits.max_connections,
        max_pending_handshakes_per_source: limits.max_connections_per_source,
        handshake_timeout: limits.header_read_timeout,
        // The pool is as large as the connection limit: no hold needed.
        admission_hold: Duration::ZERO,
    };
    let serve_refusals = refusals.clone();
    Acceptor {
        name: "ops".into(),
        listener,
        limits: accept,
        refusals,
        shutdown,
        drain: Duration::from_secs(1),
        refusal_label: Some(label::OPS_CONNECTIONS),
    }
    .spawn(
        |io, _| std::future::ready(Some(io)),
        move |io, _, stop| {
            let router = router.clone();
            let limits = limits.clone();
            let refusals = serve_refusals.clone();
            async move { serve_http1(io, router, &limits, &refusals, stop).await }
        },
    )
}
