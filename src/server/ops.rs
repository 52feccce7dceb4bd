//! The server's readiness, and its operations endpoint (see [`crate::ops`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use tokio::net::TcpListener;
use tokio::sync::watch;

use super::metrics::Metrics;
use super::tls::ServingCert;
use crate::ca::AuthoritySet;
use crate::limits::OpsLimits;

/// What readiness depends on.
pub(super) struct Health {
    /// False before start-up completes and once shutdown begins.
    pub serving: AtomicBool,
    pub serving_cert: Arc<ServingCert>,
    /// The signing chain that matters is the active authority's, now.
    pub authorities: watch::Receiver<Arc<AuthoritySet>>,
    /// A cluster integration's conditions (caches synced, store watched).
    pub checks: Vec<super::cluster::ReadyCheck>,
}

impl Health {
    /// Ready: serving, with an unexpired serving certificate and signer.
    pub(super) fn ready(&self) -> Result<(), String> {
        let now = SystemTime::now();
        if !self.serving.load(Ordering::Acquire) {
            return Err("not serving (starting or draining)".into());
        }
        for check in &self.checks {
            check()?;
        }
        let set = self.authorities.borrow().clone();
        if !set
            .members()
            .iter()
            .any(|m| m.authority.signer().der() == self.serving_cert.issued_by())
        {
            return Err("the serving certificate's issuer is no longer in the trust bundle".into());
        }
        if now >= set.active().chain_not_after() {
            return Err("the CA signing chain has expired".into());
        }
        if now >= self.serving_cert.not_after() {
            return Err("the serving certificate has expired".into());
        }
        Ok(())
    }
}

/// Serves `/metrics`, `/healthz`, `/readyz` and `/trust-bundle` until
/// `shutdown` fires.
pub(super) fn spawn(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    limits: OpsLimits,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let refusals = metrics.refusals.clone();
    let authorities = health.authorities.clone();
    let bundle: crate::ops::TrustBundleDoc =
        Box::new(move || authorities.borrow().spiffe_jwks().to_owned());
    crate::ops::spawn(
        listener,
        move || metrics.render(),
        move || health.ready(),
        Some(bundle),
        limits,
        refusals,
        shutdown,
    )
}
