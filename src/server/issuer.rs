//! The running CA as [`LeafIssuer`]: what a cluster integration's
//! controllers sign with. The same authority set, lifetimes, metrics,
//! audit line and rotation accounting as `CreateCertificate`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::fleet::Fleet;
use super::metrics::Metrics;
use super::rotate::LiveCa;
use crate::ca::{self, AuthoritySet, CheckedCsr, LeafFor, LeafIssuer, Tracked, TtlPolicy};
use crate::identity::SpiffeId;

/// [`LeafIssuer`] over the server's live CA.
pub struct CaIssuer {
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
        // Zero asks for the default, as `validity_duration <= 0` does.
        let ttl = if ttl.is_zero() {
            self.ttl.default_ttl
        } else {
            ttl.min(self.ttl.max_ttl)
        };
        match set.sign_leaf(key, id, ttl, now) {
            Ok(issued) => {
                let (generation, authority) = (set.generation(), set.active().id().to_owned());
                if tracked == Tracked::Ledger {
                    self.fleet
                        .record_issued(generation, &authority, now, issued.not_after);
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
}
