//! `istio.v1.auth.IstioCertificateService/CreateCertificate`.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::auth::AuthChain;
use super::metrics::Metrics;
use super::status;
use crate::ca::policy::{ClusterView, NodeAgents, authorize};
use crate::ca::{AuthoritySet, TtlPolicy, check_pem_csr};
use crate::logsafe::{WarnLimiter, peer as peer_text};
use crate::proto::istio::istio_certificate_service_server::IstioCertificateService;
use crate::proto::istio::{IstioCertificateRequest, IstioCertificateResponse};
use crate::proto::{AGENT_HEADER, BUNDLE_GENERATION_HEADER};
use std::net::IpAddr;

/// The CSR-signing service.
pub(super) struct CaService {
    pub(crate) authority: watch::Receiver<Arc<AuthoritySet>>,
    pub(crate) auth: AuthChain,
    pub(crate) ttl: TtlPolicy,
    pub(crate) metrics: Arc<Metrics>,
    /// Warnings a caller causes, rate-limited per source address.
    pub(crate) warn: WarnLimiter<Option<IpAddr>>,
    /// Leaves issued to clients that are not our agents are recorded for
    /// the rotation gates.
    pub(crate) fleet: Arc<super::fleet::Fleet>,
    /// Who may ask for other identities (node agents), and the cluster
    /// their requests are judged against.
    pub(crate) node_agents: NodeAgents,
    pub(crate) cluster: Option<Arc<dyn ClusterView>>,
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        self.metrics.csr_count.inc();
        let now = SystemTime::now();
        let peer = request.remote_addr();
        let caller = match self.auth.authenticate_request(&request, now).await {
            Ok(caller) => caller,
            Err(reasons) => {
                self.metrics.authentication_failure.inc();
                for r in &reasons {
                    self.metrics
                        .auth_refusals
                        .with_label_values(&[r.metric_label()])
                        .inc();
                }
                // Nothing refused outright, but something could not be
                // judged now (caches syncing): worth a retry.
                let transient = !reasons.is_empty()
                    && reasons.iter().all(super::auth::AuthError::is_unavailable);
                // Reasons quote what the caller sent: escaped and truncated.
                let reasons: Vec<String> = reasons
                    .iter()
                    .map(|r| peer_text(&r.to_string()).to_string())
                    .collect();
                let reasons = if reasons.is_empty() {
                    "no credential presented".to_string()
                } else {
                    reasons.join("; ")
                };
                crate::peer_warn!(self.warn, peer.map(|a| a.ip()), self.metrics.refusals, ?peer, %reasons, "authentication failed");
                if transient {
                    return Err(Status::unavailable("cannot authenticate now; retry"));
                }
                return Err(status::unauthenticated());
            }
        };
        // One of our agents says it is; its bundle watch, open on this very
        // connection, reports the leaf (or will: see `Fleet::claim`).
        let claims_agent = request.metadata().contains_key(AGENT_HEADER);
        let body = request.into_inner();
        let requested = impersonation(&body);
        // One snapshot for the whole call: signing never holds the watch's
        // lock.
        let authorities = self.authority.borrow().clone();
        let identity = match authorize(
            &caller.identity,
            caller.facts.as_ref(),
            requested,
            &self.node_agents,
            self.cluster.as_deref(),
            authorities.trust_domain(),
        ) {
            Ok(identity) => identity,
            Err(refusal) => {
                self.metrics.id_extraction_err.inc();
                self.metrics
                    .identity_refusals
                    .with_label_values(&[refusal.metric_label()])
                    .inc();
                // The refusal quotes what the caller asked for.
                let reason = peer_text(&refusal.to_string()).to_string();
                crate::peer_warn!(self.warn, peer.map(|a| a.ip()), self.metrics.refusals, ?peer, caller = %caller.identity, %reason, "identity refused");
                if refusal.is_transient() {
                    return Err(Status::unavailable(reason));
                }
                return Err(Status::permission_denied(reason));
            }
        };
        let impersonated = identity != caller.identity;
        let result = self
            .ttl
            .resolve_capped(body.validity_duration, caller.max_ttl)
            .and_then(|ttl| check_pem_csr(&body.csr).map(|csr| (ttl, csr)))
            .and_then(|(ttl, csr)| {
                authorities
                    .sign_leaf(&csr, &identity, ttl, now)
                    .map(|issued| {
                        let (g, a) = (authorities.generation(), authorities.active().id());
                        if claims_agent {
                            self.fleet
                                .claim(&issued.serial_hex, peer, g, a, now, issued.not_after);
                        } else {
                            self.fleet.record_issued(g, a, now, issued.not_after);
                        }
                        (issued, authorities.generation())
                    })
            });
        match result {
            Ok((issued, generation)) => {
                self.metrics.success_cert_issuance.inc();
                if impersonated {
                    self.metrics.impersonations.inc();
                }
                tracing::info!(
                    identity = %identity, caller = %caller.identity, via = caller.method, detail = %caller.detail, ?peer,
                    serial = %issued.serial_hex, not_after = %humantime(issued.not_after),
                    "certificate issued"
                );
                let mut response = Response::new(IstioCertificateResponse {
                    cert_chain: issued.chain,
                });
                // Our agents order bundles by generation; Istio's ignore it.
                response
                    .metadata_mut()
                    .insert(BUNDLE_GENERATION_HEADER, generation.into());
                Ok(response)
            }
            Err(e) => {
                status::count(&self.metrics, &e);
                // The error may quote the CSR: escaped and truncated.
                crate::peer_warn!(self.warn, peer.map(|a| a.ip()), self.metrics.refusals, identity = %identity, ?peer, error = %peer_text(&e.to_string()), "certificate refused");
                Err(status::from_ca(&e))
            }
        }
    }
}

/// The `ImpersonatedIdentity` metadata value, when set and non-empty.
fn impersonation(req: &IstioCertificateRequest) -> Option<&str> {
    let field = req.metadata.as_ref()?.fields.get("ImpersonatedIdentity")?;
    match &field.kind {
        Some(prost_types::value::Kind::StringValue(s)) if !s.is_empty() => Some(s.as_str()),
        _ => None,
    }
}

/// `t` in RFC 3339 to the second (a certificate's times have no finer
/// precision), written straight into the log line: no format description
/// interpreted, no string allocated.
pub(crate) fn humantime(t: SystemTime) -> Rfc3339 {
    Rfc3339(t)
}

/// See [`humantime`].
pub(crate) struct Rfc3339(SystemTime);

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = time::OffsetDateTime::from(self.0);
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_logged_in_rfc3339_to_the_second() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_795_000_000_250);
        assert_eq!(humantime(t).to_string(), "2026-11-18T11:06:40Z");
        assert_eq!(
            humantime(SystemTime::UNIX_EPOCH).to_string(),
            "1970-01-01T00:00:00Z"
        );
    }
}
