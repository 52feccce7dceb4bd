//! Caller authentication. Every method sits behind [`Authenticator`]; the
//! chain tries them in order and the first success wins.
//!
//! An authenticator answers one of three ways: `Ok(Some(caller))` (proved),
//! `Ok(None)` (its kind of credential is absent, e.g. no bearer token), or
//! `Err(reason)` (a credential was presented and is bad). Reasons go to the
//! log only; the client is told `Unauthenticated` and nothing else.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tonic::metadata::MetadataMap;
use x509_parser::prelude::FromDer;

use crate::ca::AuthoritySet;
use crate::ca::bundle::{single_spiffe_id, verify_path};
use crate::ca::policy::{ClusterView, Refusal, TokenFacts, check_renewal};
use crate::identity::{SpiffeId, TrustDomain};

/// Why a presented credential was not accepted. Logged, never sent.
///
/// Each variant says which kind of check failed ([`TokenFault`],
/// [`CertFault`]) beside a detail for the log, so the refusal metric can
/// tell an expired token from a forged one without parsing text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// A bearer token was presented and failed the check `fault`.
    #[error("bearer token rejected: {detail}")]
    Token {
        /// Which check failed.
        fault: TokenFault,
        /// What was wrong, for the log (may quote the caller: escape it).
        detail: String,
    },
    /// A client certificate was presented and failed the check `fault`.
    #[error("client certificate rejected: {detail}")]
    Cert {
        /// Which check failed.
        fault: CertFault,
        /// What was wrong, for the log.
        detail: String,
    },
    /// The credential could not be judged now (the cluster caches are not
    /// synced, a TokenReview could not be made): the caller should retry.
    #[error("cannot authenticate now: {detail}")]
    Unavailable {
        /// Why it cannot be judged now.
        detail: String,
    },
    /// A valid token whose bindings no longer hold in the cluster (its pod
    /// or service account deleted or recreated).
    #[error("bearer token rejected: {0}")]
    Binding(Refusal),
}

/// Which check a bearer token failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenFault {
    /// The `authorization` header: repeated, not ASCII, or not `Bearer`.
    Header,
    /// Not a JWT we can read: too long, not three parts, bad base64url or
    /// JSON, a required claim missing.
    Malformed,
    /// A symmetric algorithm, or a `crit` header parameter we do not know.
    Algorithm,
    /// No `iss`, or an issuer that is not trusted.
    Issuer,
    /// No key of the issuer matches the token's `kid` and `alg`.
    UnknownKey,
    /// The signature does not verify.
    Signature,
    /// Past `exp` (beyond the leeway).
    Expired,
    /// Before `nbf`, or `iat` in the future (beyond the leeway).
    NotYetValid,
    /// No audience of ours.
    Audience,
    /// No `iat`, or a lifetime above the ceiling.
    Lifetime,
    /// `sub` is not a service account, or the claims disagree about it.
    Subject,
    /// No service-account UID: not a bound token of the cluster.
    Unbound,
    /// Refused by the cluster's TokenReview.
    Review,
}

impl TokenFault {
    /// Every fault, in a stable order.
    pub const ALL: [TokenFault; 13] = [
        Self::Header,
        Self::Malformed,
        Self::Algorithm,
        Self::Issuer,
        Self::UnknownKey,
        Self::Signature,
        Self::Expired,
        Self::NotYetValid,
        Self::Audience,
        Self::Lifetime,
        Self::Subject,
        Self::Unbound,
        Self::Review,
    ];

    /// Its label in `workload_ca_auth_refusals_total`.
    #[must_use]
    pub fn metric_label(self) -> &'static str {
        match self {
            Self::Header => "token_header",
            Self::Malformed => "token_malformed",
            Self::Algorithm => "token_algorithm",
            Self::Issuer => "token_issuer",
            Self::UnknownKey => "token_unknown_key",
            Self::Signature => "token_signature",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::Audience => "token_audience",
            Self::Lifetime => "token_lifetime",
            Self::Subject => "token_subject",
            Self::Unbound => "token_unbound",
            Self::Review => "token_review",
        }
    }
}

/// Which check a client certificate failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CertFault {
    /// The TLS layer handed over no certificate.
    Empty,
    /// No path to one of this CA's signers at the request time, for client
    /// authentication.
    Path,
    /// It verified but cannot be parsed.
    Unparsable,
    /// Not exactly one SPIFFE ID, or not a workload of our trust domain.
    Identity,
}

impl CertFault {
    /// Every fault, in a stable order.
    pub const ALL: [CertFault; 4] = [Self::Empty, Self::Path, Self::Unparsable, Self::Identity];

    /// Its label in `workload_ca_auth_refusals_total`.
    #[must_use]
    pub fn metric_label(self) -> &'static str {
        match self {
            Self::Empty => "certificate_empty",
            Self::Path => "certificate_path",
            Self::Unparsable => "certificate_unparsable",
            Self::Identity => "certificate_identity",
        }
    }
}

/// A refusal by the cluster: transient ones (caches not synced) are worth
/// a retry; the others are binding refusals, which end the chain.
impl From<Refusal> for AuthError {
    fn from(r: Refusal) -> Self {
        if r.is_transient() {
            Self::unavailable(r.to_string())
        } else {
            Self::Binding(r)
        }
    }
}

impl AuthError {
    /// A token that failed `fault`, with `detail` for the log.
    pub fn token(fault: TokenFault, detail: impl Into<String>) -> Self {
        Self::Token {
            fault,
            detail: detail.into(),
        }
    }

    /// A client certificate that failed `fault`, with `detail` for the log.
    pub fn cert(fault: CertFault, detail: impl Into<String>) -> Self {
        Self::Cert {
            fault,
            detail: detail.into(),
        }
    }

    /// A credential that cannot be judged now.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::Unavailable {
            detail: detail.into(),
        }
    }

    /// Whether only a retry is needed (nothing was refused outright).
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }

    /// Every [`AuthError::metric_label`] (a binding refusal is labelled by
    /// its [`Refusal`]), so metrics can show each at 0 from the start.
    pub fn metric_labels() -> impl Iterator<Item = &'static str> {
        TokenFault::ALL
            .into_iter()
            .map(TokenFault::metric_label)
            .chain(CertFault::ALL.into_iter().map(CertFault::metric_label))
            .chain(std::iter::once("unavailable"))
            .chain(Refusal::METRIC_LABELS.iter().copied())
    }

    /// A short, stable label for metrics: which check failed.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Token { fault, .. } => fault.metric_label(),
            Self::Cert { fault, .. } => fault.metric_label(),
            Self::Unavailable { .. } => "unavailable",
            Self::Binding(r) => r.metric_label(),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The identity the certificate will carry.
    pub identity: SpiffeId,
    /// Which authenticator proved it.
    pub method: &'static str,
    /// Extra context for logs (issuer and pod, or the presented serial).
    pub detail: String,
    /// The longest certificate this caller may get, when its proof limits it
    /// (a renewal: the presented certificate's own lifetime).
    pub max_ttl: Option<Duration>,
    /// What the caller's service-account token says about it (its pod and
    /// node): what node-agent impersonation is judged on. `None` for a
    /// certificate renewal.
    pub facts: Option<TokenFacts>,
}

/// What an authenticator may look at.
pub struct AuthContext<'a> {
    /// The request's gRPC metadata (the `authorization` header).
    pub metadata: &'a MetadataMap,
    /// The client's certificate chain, leaf first, when it presented one.
    pub peer_certs: Option<&'a [CertificateDer<'static>]>,
    /// The time the credentials are checked at.
    pub now: SystemTime,
}

/// What [`Authenticator::authenticate`] returns: boxed, for `dyn` use.
pub type AuthFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<Caller>, AuthError>> + Send + 'a>>;

/// One way of proving who a caller is.
pub trait Authenticator: Send + Sync {
    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;
    /// See the module docs for the three outcomes.
    fn authenticate<'a>(&'a self, ctx: &'a AuthContext<'a>) -> AuthFuture<'a>;
}

/// Authenticators tried in order.
#[derive(Clone, Default)]
pub struct AuthChain(Vec<Arc<dyn Authenticator>>);

impl AuthChain {
    /// A chain trying `authenticators` in this order.
    pub fn new(authenticators: Vec<Arc<dyn Authenticator>>) -> Self {
        Self(authenticators)
    }

    /// The authenticators' names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(|a| a.name()).collect()
    }

    /// The first success, or every reason for failure (empty when the caller
    /// presented no credential at all). A binding refusal (the cluster no
    /// longer backs the identity) stops the chain.
    pub async fn authenticate(&self, ctx: &AuthContext<'_>) -> Result<Caller, Vec<AuthError>> {
        let mut reasons = Vec::new();
        for a in &self.0 {
            match a.authenticate(ctx).await {
                Ok(Some(caller)) => return Ok(caller),
                Ok(None) => {}
                // A credential whose identity the cluster no longer backs
                // ends the chain: another credential of the same caller
                // must not stand in for it.
                Err(e @ AuthError::Binding(_)) => {
                    reasons.push(e);
                    return Err(reasons);
                }
                Err(e) => reasons.push(e),
            }
        }
        Err(reasons)
    }

    /// [`AuthChain::authenticate`] on what a gRPC request carries: its
    /// metadata and its TLS client certificates, at `now`.
    pub async fn authenticate_request<T>(
        &self,
        request: &tonic::Request<T>,
        now: SystemTime,
    ) -> Result<Caller, Vec<AuthError>> {
        let peer_certs = request.peer_certs();
        let ctx = AuthContext {
            metadata: request.metadata(),
            peer_certs: peer_certs.as_deref().map(Vec::as_slice),
            now,
        };
        self.authenticate(&ctx).await
    }
}

/// The bearer token of a request: `None` without an `authorization`
/// value; refused when there are two (ambiguous) or it is not `Bearer`.
///
/// # Errors
/// [`AuthError::Token`] ([`TokenFault::Header`]) naming what is wrong.
pub fn bearer_token(metadata: &MetadataMap) -> Result<Option<&str>, AuthError> {
    let mut values = metadata.get_all("authorization").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AuthError::token(
            TokenFault::Header,
            "more than one authorization value: ambiguous, refused",
        ));
    }
    let value = value
        .to_str()
        .map_err(|_| AuthError::token(TokenFault::Header, "authorization is not ASCII"))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(Some(token.trim())),
        _ => Err(AuthError::token(
            TokenFault::Header,
            "authorization is not a Bearer token",
        )),
    }
}

/// Renewal with a current certificate: a client certificate issued by this
/// CA's signing certificate (rustls-webpki path validation anchored on the
/// signer, clientAuth, at the request time) carrying exactly one URI SAN, a
/// service-account SPIFFE ID in our trust domain.
///
/// The TLS layer accepts any client certificate whose private key the peer
/// holds; this is where it is judged, against the signers as they are at the
/// moment of the request.
pub struct ClientCertAuthenticator {
    authorities: watch::Receiver<Arc<AuthoritySet>>,
    /// On Kubernetes: a renewal needs its service account and a running
    /// pod of it ([`crate::ca::policy::check_renewal`]).
    cluster: Option<Arc<dyn ClusterView>>,
}

impl ClientCertAuthenticator {
    /// Renewals anchored on the signing certificates of the authorities `authorities` publishes.
    pub fn new(authorities: watch::Receiver<Arc<AuthoritySet>>) -> Self {
        Self {
            authorities,
            cluster: None,
        }
    }

    /// Renewals checked against the cluster as `view` sees it.
    #[must_use]
    pub fn with_cluster(mut self, view: Option<Arc<dyn ClusterView>>) -> Self {
        self.cluster = view;
        self
    }

    fn check(
        &self,
        certs: &[CertificateDer<'static>],
        now: SystemTime,
    ) -> Result<Caller, AuthError> {
        let authorities = self.authorities.borrow().clone();
        let (leaf, rest) = certs
            .split_first()
            .ok_or_else(|| AuthError::cert(CertFault::Empty, "empty chain"))?;
        // Anchored on this CA's own signing certificates (every authority
        // still in the set: a leaf of a retiring one renews, and is
        // re-issued by the active one), not on the whole root bundle: a
        // sibling intermediate under a shared root must not be able to mint
        // renewals here.
        let intermediates: Vec<Vec<u8>> = rest.iter().map(|c| c.to_vec()).collect();
        let signers: Vec<&[u8]> = authorities
            .renewal_signers()
            .into_iter()
            .map(|c| c.der())
            .collect();
        verify_path(
            leaf,
            &intermediates,
            &signers,
            now,
            webpki::KeyUsage::client_auth(),
        )
        .map_err(|e| {
            AuthError::cert(CertFault::Path, format!("does not verify to this CA: {e}"))
        })?;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf)
            .map_err(|e| AuthError::cert(CertFault::Unparsable, format!("unparsable: {e}")))?;
        let id = single_spiffe_id(&cert).map_err(|e| AuthError::cert(CertFault::Identity, e))?;
        check_workload_id(&id, authorities.trust_domain())
            .map_err(|e| AuthError::cert(CertFault::Identity, e))?;
        if let (Some(view), Some((ns, sa))) = (&self.cluster, id.service_account()) {
            check_renewal(ns, sa, view.as_ref()).map_err(AuthError::from)?;
        }
        // The presented lifetime, less the backdate every leaf of ours
        // carries: a renewal is never longer-lived than what it renews.
        let validity = cert.validity();
        let lifetime = (validity.not_after.timestamp() - validity.not_before.timestamp()).max(0);
        let lifetime = Duration::from_secs(u64::try_from(lifetime).unwrap_or(0));
        Ok(Caller {
            identity: id,
            method: self.name(),
            detail: format!("serial {}", cert.raw_serial_as_string()),
            max_ttl: Some(lifetime.saturating_sub(crate::ca::CLOCK_SKEW_BACKDATE)),
            facts: None,
        })
    }
}

/// A workload identity must be in our trust domain and name a service account.
pub fn check_workload_id(id: &SpiffeId, td: &TrustDomain) -> Result<(), String> {
    if &id.trust_domain() != td {
        return Err(format!("{id} is outside trust domain {td}"));
    }
    if id.service_account().is_none() {
        return Err(format!(
            "{id} is not of the form spiffe://{td}/ns/<ns>/sa/<sa>"
        ));
    }
    Ok(())
}

impl Authenticator for ClientCertAuthenticator {
    fn name(&self) -> &'static str {
        "client-certificate"
    }

    fn authenticate<'a>(&'a self, ctx: &'a AuthContext<'a>) -> AuthFuture<'a> {
        Box::pin(async move {
            match ctx.peer_certs {
                None | Some([]) => Ok(None),
                Some(certs) => self.check(certs, ctx.now).map(Some),
            }
        })
    }
}
