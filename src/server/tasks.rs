//! The server's background tasks: each follows the authorities (or the
//! fleet) and keeps one derived thing current — the rotation evidence, the
//! followed store, the expiry gauges and `root-cert.pem`, the serving
//! certificate.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::metrics::{Metrics, unix_secs};
use super::tls::{ServingCert, ServingSpec};
use super::{fleet, rotate};
use crate::ca::store::atomic_write;
use crate::ca::{self, AuthoritySet};

/// This replica's rotation evidence, computed every second and sent to
/// `out` when it changed (for the other replicas).
pub(super) fn spawn_evidence(
    fleet: Arc<fleet::Fleet>,
    out: watch::Sender<Option<Arc<ca::rotation::Evidence>>>,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let e = fleet.evidence(SystemTime::now());
            out.send_if_modified(|cur| {
                if cur.as_deref() == Some(&e) {
                    return false;
                }
                *cur = Some(Arc::new(e));
                true
            });
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
        }
    })
}

pub(super) fn spawn_follower(
    live: Arc<rotate::LiveCa>,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(live.follow_interval()) => {}
                _ = shutdown.changed() => return,
            }
            if let Err(e) = live.follow(SystemTime::now()).await {
                tracing::error!(error = %e, "reading the stored authorities failed; keeping the current ones");
            }
        }
    })
}

/// The expiry gauges, from the set as it is.
pub(super) fn expiry_gauges(metrics: &Metrics, set: &AuthoritySet) {
    if let Some(t) = set.bundle().earliest_expiry() {
        metrics.root_cert_expiry.set(unix_secs(t));
    }
    metrics
        .cert_chain_expiry
        .set(unix_secs(set.active().chain_not_after()));
}

/// On every change of the authorities: the expiry gauges, and the bundle
/// written to `root-cert.pem` (atomically, off the runtime's workers). A
/// failed write (a full or read-only disk) is retried with a backoff of 1 s
/// doubling to [`PUBLISH_RETRY_MAX`] until it lands, so the file does not
/// stay on an old bundle once the fault is gone.
pub(super) fn spawn_publisher(
    mut authorities: watch::Receiver<Arc<AuthoritySet>>,
    metrics: Arc<Metrics>,
    root_cert_path: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Set while the last write failed: when to try again.
        let mut retry: Option<Duration> = None;
        loop {
            let again = async {
                match retry {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = authorities.changed() => if changed.is_err() { return },
                () = again => {}
                _ = shutdown.changed() => return,
            }
            let set = authorities.borrow_and_update().clone();
            expiry_gauges(&metrics, &set);
            let path = root_cert_path.clone();
            let pem = set.bundle_pem().to_owned();
            let written =
                tokio::task::spawn_blocking(move || atomic_write(&path, pem.as_bytes(), 0o644))
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|r| r);
            match written {
                Ok(()) => {
                    tracing::info!(
                        generation = set.generation(),
                        roots = set.bundle().roots().len(),
                        path = %root_cert_path.display(),
                        retried = retry.is_some(),
                        "trust bundle published"
                    );
                    retry = None;
                }
                Err(e) => {
                    let next =
                        retry.map_or(Duration::from_secs(1), |d| (d * 2).min(PUBLISH_RETRY_MAX));
                    tracing::error!(
                        path = %root_cert_path.display(),
                        error = %e,
                        retry_in = ?next,
                        "writing the trust bundle failed; the file keeps the previous bundle until a retry lands"
                    );
                    retry = Some(next);
                }
            }
        }
    })
}

/// The longest wait between two attempts to write `root-cert.pem`.
const PUBLISH_RETRY_MAX: Duration = Duration::from_secs(30);

/// Renews the serving certificate halfway through its life, retrying every
/// few seconds on failure while the current one is still valid.
pub(super) fn spawn_serving_renewal(
    cert: Arc<ServingCert>,
    mut authority: watch::Receiver<Arc<AuthoritySet>>,
    spec: ServingSpec,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut retry: Option<Duration> = None;
        // When another authority becomes active than the one that issued
        // the certificate being served, the certificate moves to it at once.
        // (No initial `borrow_and_update`: a set published before this task
        // first runs must still be seen as a change.)
        loop {
            let wait = retry.unwrap_or_else(|| {
                cert.renew_at()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
            });
            tokio::select! {
                _ = tokio::time::sleep(wait.max(Duration::from_millis(100))) => {}
                changed = authority.changed() => {
                    if changed.is_err() { return }
                    let active = authority.borrow_and_update().active().signer().der().to_vec();
                    if active == cert.issued_by() {
                        continue;
                    }
                }
                _ = shutdown.changed() => return,
            }
            let current = authority.borrow().active().clone();
            match cert.renew(&current, &spec, SystemTime::now()) {
                Ok(not_after) => {
                    retry = None;
                    metrics.serving_cert_expiry.set(unix_secs(not_after));
                    tracing::info!(
                        not_after = unix_secs(not_after),
                        "serving certificate renewed"
                    );
                }
                Err(e) => {
                    retry = Some(Duration::from_secs(5));
                    tracing::error!(error = %e, "serving certificate renewal failed; retrying in 5s");
                }
            }
        }
    })
}
