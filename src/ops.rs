//! The operations HTTP endpoint shared by the server and the agent:
//! `/metrics` (Prometheus text), `/healthz` (the process answers),
//! `/readyz` (200 when ready, 503 with the reason otherwise), and on the CA
//! `/trust-bundle` (the SPIFFE trust bundle, a JWK Set).

use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::limits::{OpsLimits, Refusals};

/// Renders the current trust bundle as a SPIFFE JWK Set.
pub type TrustBundleDoc = Box<dyn Fn() -> String + Send + Sync>;

/// Serves the endpoint on `listener` until `shutdown` changes, under
/// `limits` (connections, header read time, connection time).
pub fn spawn(
    listener: TcpListener,
    metrics: impl Fn() -> String + Send + Sync + 'static,
    ready: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    bundle: Option<TrustBundleDoc>,
    limits: OpsLimits,
    refusals: Refusals,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let metrics = Arc::new(metrics);
    let ready = Arc::new(ready);
    let mut app = axum::Router::new()
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
    if let Some(bundle) = bundle {
        let bundle = Arc::new(bundle);
        app = app.route(
            "/trust-bundle",
            get(move || {
                std::future::ready((
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    bundle(),
                ))
            }),
        );
    }
    crate::net::spawn_ops(listener, app, limits, refusals, shutdown)
}
