//! The running CA as [`LeafIssuer`]: what a cluster integration's
//! controllers sign with. The same authority set, lifetimes, metrics,
//! audit line and rotation accounting as `CreateCertificate`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::fleet::Fleet;
use super::metrics::Metrics;
use super::rotate::LiveCa;
use crate::ca::{
    self, AuthoritySet, CheckedCsr, LeafFor, LeafIssuer, PrivateKey, Tracked, TtlPolicy,
};
use crate::identity::SpiffeId;

/// [`LeafIssuer`] over the server's live CA.
pub(super) struct CaIssuer {
    pub(crate) live: Arc<LiveCa>,
    pub(crate) fleet: Arc<Fleet>,
    pub(crate) ttl: TtlPolicy,
    pub(crate) metrics: Arc<Metrics>,
}

impl LeafIssuer for CaIssuer {
    fn authorities(&self) -> watch::Receiver<Arc<AuthoritySet>> {
        self.live.subscribe()
    }

    fn ttl(&self) -> TtlPolicy {
        self.ttl
    }

    fn issue(
        &self,
        key: &CheckedCsr,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
        via: &'static str,
        tracked: Tracked,
    ) -> Result<LeafFor, ca::Error> {
        let set = self.live.current();
        let ttl = self.lifetime(ttl);
        match set.sign_leaf(key, id, ttl, now) {
            Ok(issued) => {
                let (generation, authority) = (set.generation(), set.active().id().to_owned());
                match tracked {
                    Tracked::Ledger => {
                        self.fleet
                            .record_issued(generation, &authority, now, issued.not_after);
                    }
                    Tracked::RetireOnly => {
                        self.fleet
                            .record_for_retire(&authority, now, issued.not_after);
                    }
                    Tracked::Copies => {}
                }
                self.metrics.success_cert_issuance.inc();
                tracing::info!(
                    identity = %id, via, serial = %issued.serial_hex,
                    not_after = %super::service::humantime(issued.not_after),
                    "certificate issued"
                );
                Ok(LeafFor {
                    issued,
                    generation,
                    authority,
                })
            }
            Err(e) => {
                super::status::count(&self.metrics, &e);
                tracing::warn!(identity = %id, via, error = %e, "certificate refused");
                Err(e)
            }
        }
    }

    fn issue_serving(
        &self,
        key: &PrivateKey,
        dns_names: &[String],
        ttl: Duration,
        now: SystemTime,
        via: &'static str,
    ) -> Result<LeafFor, ca::Error> {
        let set = self.live.current();
        let ttl = self.lifetime(ttl);
        match set.active().sign_serving(key, dns_names, &[], ttl, now) {
            Ok(mut issued) => {
                // The whole bundle last, as every chain the server hands out.
                if let Some(last) = issued.chain.last_mut() {
                    set.bundle_pem().clone_into(last);
                }
                self.metrics.success_cert_issuance.inc();
                tracing::info!(
                    dns = ?dns_names, via, serial = %issued.serial_hex,
                    not_after = %super::service::humantime(issued.not_after),
                    "serving certificate issued"
                );
                Ok(LeafFor {
                    issued,
                    generation: set.generation(),
                    authority: set.active().id().to_owned(),
                })
            }
            Err(e) => {
                super::status::count(&self.metrics, &e);
                tracing::warn!(dns = ?dns_names, via, error = %e, "serving certificate refused");
                Err(e)
            }
        }
    }
}

impl CaIssuer {
    /// Zero asks for the default, as `validity_duration <= 0` does; never
    /// beyond the maximum.
    fn lifetime(&self, ttl: Duration) -> Duration {
        if ttl.is_zero() {
            self.ttl.default_ttl
        } else {
            ttl.min(self.ttl.max_ttl)
        }
    }
}

/// Starts the cluster integration's controllers on `issuer`, their tasks
/// in `tasks`, and counts the bundle copies they keep in every evidence.
pub(crate) fn start_controllers(
    controllers: Vec<ca::issue::Controller>,
    issuer: CaIssuer,
    tasks: &mut crate::drain::Tasks,
) {
    if controllers.is_empty() {
        return;
    }
    let fleet = issuer.fleet.clone();
    let issuer: Arc<dyn LeafIssuer> = Arc::new(issuer);
    for start in controllers {
        for counter in start(issuer.clone(), tasks) {
            fleet.count_copies(counter);
        }
    }
}
