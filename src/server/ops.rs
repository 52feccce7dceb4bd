//! The operations HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::metrics::Metrics;
use super::tls::ServingCert;

/// What readiness depends on.
pub struct Health {
    /// False before start-up completes and once shutdown begins.
    pub serving: AtomicBool,
    pub serving_cert: Arc<ServingCert>,
    pub chain_not_after: SystemTime,
}

impl Health {
    /// Ready: serving, with an unexpired serving certificate and signer.
    pub fn ready(&self) -> Result<(), &'static str> {
        let now = SystemTime::now();
        if !self.serving.load(Ordering::Acquire) {
            return Err("not serving (starting or draining)");
        }
        if now >= self.chain_not_after {
            return Err("the CA signing chain has expired");
        }
        if now >= self.serving_cert.not_after() {
            return Err("the serving certificate has expired");
        }
        Ok(())
    }
}

#[derive(Clone)]
struct OpsState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Serves the endpoint until `shutdown` fires.
pub fn spawn(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<OpsState>| async move { s.metrics.render() }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(s): State<OpsState>| async move {
                match s.health.ready() {
                    Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                }
            }),
        )
        .with_state(OpsState { metrics, health });
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
