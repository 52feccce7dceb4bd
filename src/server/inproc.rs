//! The `CreateCertificate` handler without a network: the service the
//! server routes to, built from an authority set and token issuers, for
//! benchmarks that drive the signing path in-process
//! (benches/instructions.rs). It authenticates, authorizes, signs and
//! records exactly as a served call does: only TLS, HTTP/2 and the gRPC
//! framing are left out.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;

use super::Error;
use super::auth::{AuthChain, Authenticator, ClientCertAuthenticator};
use super::fleet::Fleet;
use super::jwt::{IssuerConfig, JwtAuthenticator};
use super::metrics::Metrics;
use super::service::CaService;
use crate::ca::{AuthoritySet, TtlPolicy};
use crate::proto::istio::istio_certificate_service_server::IstioCertificateService;

/// The certificate service over `authorities`, trusting tokens of `issuers`
/// for `audiences` (then client certificates, as [`super::start`] chains
/// them), with fresh metrics and an empty issuance ledger.
///
/// # Errors
/// As [`JwtAuthenticator::new`] and [`Metrics::new`].
pub async fn certificate_service(
    authorities: AuthoritySet,
    issuers: Vec<IssuerConfig>,
    audiences: Vec<String>,
    ttl: TtlPolicy,
    now: SystemTime,
) -> Result<impl IstioCertificateService, Error> {
    super::jwt_crypto::install();
    let trust_domain = authorities.trust_domain().clone();
    // The receiver keeps the last value after the sender is gone.
    let (_, authority) = watch::channel(Arc::new(authorities));
    let jwt = JwtAuthenticator::new(trust_domain, audiences, issuers).await?;
    let chain: Vec<Arc<dyn Authenticator>> = vec![
        Arc::new(jwt),
        Arc::new(ClientCertAuthenticator::new(authority.clone())),
    ];
    Ok(CaService {
        authority,
        auth: AuthChain::new(chain),
        ttl,
        metrics: Arc::new(Metrics::new()?),
        warn: crate::logsafe::WarnLimiter::new(),
        fleet: Arc::new(Fleet::new(Default::default(), 50, now)),
        node_agents: Default::default(),
        cluster: None,
    })
}
