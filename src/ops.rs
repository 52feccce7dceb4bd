//! The operations HTTP endpoint shared by the server and the agent:
//! `/metrics` (Prometheus text), `/healthz` (the process answers) and
//! `/readyz` (200 when ready, 503 with the reason otherwise).

use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serves the endpoint on `listener` until `shutdown` changes.
pub fn spawn(
    listener: TcpListener,
    metrics: impl Fn() -> String + Send + Sync + 'static,
    ready: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let metrics = Arc::new(metrics);
    let ready = Arc::new(ready);
    let app = axum::Router::new()
        .route("/metrics", get(move || std::future::ready(metrics())))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                std::future::ready(match ready() {
                    Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                })
            }),
        );
    tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.changed().await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::warn!(error = %e, "ops endpoint stopped");
        }
    })
}
