//! The bundle watch (`workloadca.v1.TrustBundleService/WatchBundle`): one
//! stream per agent, authenticated like `CreateCertificate`. The server
//! sends the bundle at once and on every change of the authorities, with
//! the retiring authorities' signers and how soon their leaves are to be
//! replaced; the agent reports back (recorded in [`super::fleet`]).

use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::AuthChain;
use super::fleet::Fleet;
use super::status;
use crate::ca::{AuthoritySet, AuthorityState};
use crate::logsafe::peer as peer_text;
use crate::proto::workloadca::trust_bundle_service_server::TrustBundleService;
use crate::proto::workloadca::{AgentReport, BundleUpdate};

/// The shortest time between two reports read from one stream.
const MIN_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// The update for `set`.
pub fn update_for(set: &AuthoritySet, reissue_within_seconds: u32) -> BundleUpdate {
    BundleUpdate {
        generation: set.generation(),
        bundle_pem: set.bundle_pem().to_owned(),
        retiring_signers: set
            .members()
            .iter()
            .filter(|m| m.state == AuthorityState::Retiring)
            .map(|m| m.authority.signer().der().to_vec())
            .collect(),
        reissue_within_seconds,
    }
}

/// The bundle watch service.
pub struct BundleWatch {
    pub(crate) authorities: watch::Receiver<Arc<AuthoritySet>>,
    pub(crate) auth: AuthChain,
    pub(crate) fleet: Arc<Fleet>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<BundleUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl TrustBundleService for BundleWatch {
    type WatchBundleStream = UpdateStream;

    async fn watch_bundle(
        &self,
        request: Request<Streaming<AgentReport>>,
    ) -> Result<Response<Self::WatchBundleStream>, Status> {
        let peer = request.remote_addr();
        let caller = match self
            .auth
            .authenticate_request(&request, SystemTime::now())
            .await
        {
            Ok(c) => c.identity.to_string(),
            Err(_) => {
                tracing::debug!(?peer, "bundle watch: authentication failed");
                return Err(status::unauthenticated());
            }
        };
        let mut reports = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<BundleUpdate, Status>>(4);
        let mut authorities = self.authorities.clone();
        let fleet = self.fleet.clone();
        let mut shutdown = self.shutdown.clone();
        let id = fleet.open(peer);
        tokio::spawn(async move {
            let mut last_sent = 0;
            let mut first = true;
            let mut next_report = tokio::time::Instant::now();
            let mut pending: Option<AgentReport> = None;
            loop {
                let set = authorities.borrow_and_update().clone();
                if set.generation() != last_sent {
                    last_sent = set.generation();
                    // Counted as sent before it is: an ACK racing the send
                    // is not refused, and an ACK above it never counts.
                    fleet.sent(id, last_sent);
                    if tx
                        .send(Ok(update_for(&set, fleet.reissue_window())))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                tokio::select! {
                    changed = authorities.changed() => if changed.is_err() { break },
                    // Reports are read as they come; the latest is taken
                    // at most once per interval (its leaf checks are the
                    // cost), the ones in between are dropped.
                    report = reports.message() => match report {
                        Ok(Some(r)) => pending = Some(r),
                        Ok(None) | Err(_) => break,
                    },
                    () = tokio::time::sleep_until(next_report), if pending.is_some() => {
                        let Some(r) = pending.take() else { continue };
                        next_report = tokio::time::Instant::now() + MIN_REPORT_INTERVAL;
                        let set = authorities.borrow().clone();
                        // Checking the leaves' signatures is CPU work: off
                        // the runtime's workers.
                        let counted = {
                            let (fleet, caller, report) = (fleet.clone(), caller.clone(), r.clone());
                            tokio::task::spawn_blocking(move || {
                                fleet.report(id, &caller, &report, &set, SystemTime::now())
                            })
                            .await
                            .unwrap_or(false)
                        };
                        if first {
                            first = false;
                            if counted {
                                tracing::info!(agent = %peer_text(&r.agent), %caller, ?peer, "agent watching the trust bundle");
                            } else {
                                tracing::warn!(agent = %peer_text(&r.agent), %caller, ?peer, "agent not counted: too many agents known");
                            }
                        }
                    }
                    _ = shutdown.changed() => break,
                    () = tx.closed() => break,
                }
            }
            // The last word of a stream that ended is still taken.
            if let Some(r) = pending.take() {
                let set = authorities.borrow().clone();
                let f = fleet.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    f.report(id, &caller, &r, &set, SystemTime::now())
                })
                .await;
            }
            fleet.close(id);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
