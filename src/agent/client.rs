//! Talking to the CA: the [`CaClient`] trait (so rotation is testable with a
//! scripted CA) and its gRPC implementation, which authenticates with a token
//! file re-read before every request.

use crate::sync::LockExt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint};

use x509_parser::prelude::FromDer;

use super::Error;
use super::trust::{CaTrust, Verifier};
use crate::identity::SpiffeId;
use crate::proto::istio::IstioCertificateRequest;
use crate::proto::istio::istio_certificate_service_client::IstioCertificateServiceClient;

/// A `cert_chain` and the generation of the bundle in its last element.
pub type Signed = (Vec<String>, Option<u64>);

/// What [`CaClient::sign`] returns: boxed, for `dyn` use.
pub type SignFuture<'a> = Pin<Box<dyn Future<Output = Result<Signed, Error>> + Send + 'a>>;

/// Something that turns a CSR into an Istio-style `cert_chain` (leaf first,
/// root bundle last), with the generation of that bundle when the CA sends
/// it (`x-workload-ca-bundle-generation`; a CA that is not ours does not).
pub trait CaClient: Send + Sync + 'static {
    /// `ttl` of zero asks for the server's default lifetime.
    fn sign(&self, csr_pem: String, ttl: Duration) -> SignFuture<'_>;
}

/// A service-account token on disk (a projected token is rewritten by the
/// kubelet, so it is read again for every request).
#[derive(Clone, Debug)]
pub struct TokenFile {
    path: PathBuf,
}

/// Tokens this close to expiry are treated as expired: the CA would reject
/// them in flight.
const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(5);

impl TokenFile {
    /// The token at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Where the token is read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `authorization: Bearer <token>` for the current token.
    ///
    /// # Errors
    /// As [`TokenFile::read`], and [`Error::Token`] for a token that cannot
    /// be a header value.
    pub fn bearer(&self, now: SystemTime) -> Result<tonic::metadata::AsciiMetadataValue, Error> {
        let token = self.read(now)?;
        format!("Bearer {token}").parse().map_err(|_| {
            Error::Token(format!(
                "{} holds characters not allowed in a header",
                self.path.display()
            ))
        })
    }

    /// The current token, refused when it has expired (by its own `exp`).
    ///
    /// # Errors
    /// [`Error::Token`] when the file cannot be read, is empty, or is not a
    /// JWT; [`Error::TokenExpired`] when its `exp` has passed.
    pub fn read(&self, now: SystemTime) -> Result<String, Error> {
        let raw = std::fs::read_to_string(&self.path)
            .map_err(|e| Error::Token(format!("reading {}: {e}", self.path.display())))?;
        let token = raw.trim().to_owned();
        if token.is_empty() {
            return Err(Error::Token(format!("{} is empty", self.path.display())));
        }
        if let Some(exp) = jwt_exp(&token) {
            let exp_time = UNIX_EPOCH + Duration::from_secs(exp);
            if exp_time <= now + TOKEN_EXPIRY_MARGIN {
                return Err(Error::TokenExpired {
                    path: self.path.clone(),
                    exp,
                });
            }
        }
        Ok(token)
    }
}

/// The `exp` claim, read without verifying anything (the CA verifies).
fn jwt_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_u64()
}

/// Where and how to reach the CA.
#[derive(Clone, Debug)]
pub struct CaEndpoint {
    /// `host:port`.
    pub address: String,
    /// PEM roots the CA's serving certificate must chain to.
    pub root_cert: PathBuf,
    /// The name checked in the CA's certificate.
    pub server_name: String,
}

/// A lazily connected TLS channel to the CA, and the trust it verifies the
/// CA's serving certificate with (see [`super::trust`]): the root file plus
/// every bundle the CA sends back. tonic re-makes the connection after
/// failures; each full handshake reads the trust as it is then, and a
/// reconnection resumes a TLS 1.3 session only under the very trust it was
/// verified with ([`tls_connector`]).
///
/// # Errors
/// [`Error::Config`] for an unreadable root file, a bad address or name.
pub fn connect(endpoint: &CaEndpoint) -> Result<(Channel, Arc<CaTrust>), Error> {
    let trust = Arc::new(CaTrust::from_file(&endpoint.root_cert)?);
    let connector = tls_connector(trust.clone())?;
    let name = rustls::pki_types::ServerName::try_from(endpoint.server_name.clone())
        .map_err(|e| Error::Config(format!("CA server name {:?}: {e}", endpoint.server_name)))?;
    let address = endpoint.address.clone();
    // TLS is ours (above), so the URI's scheme is plain http.
    let channel = Endpoint::from_shared(format!("http://{}", endpoint.address))
        .map_err(|e| Error::Config(format!("CA address {:?}: {e}", endpoint.address)))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let (connector, name, address) = (connector.clone(), name.clone(), address.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&address).await?;
                let _ = tcp.set_nodelay(true);
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }));
    Ok((channel, trust))
}

/// The agent's TLS client to the CA: the CA's certificate verified against
/// `trust` as it is at each full handshake, ALPN h2, and TLS 1.3 session
/// resumption bound to that trust ([`TrustBoundSessions`]): a session is
/// resumed only while the trust is the one its full handshake verified the
/// CA with, so the CA's identity in force is always one checked against the
/// current roots. (TLS 1.2 sessions are never resumed.)
///
/// # Errors
/// [`Error::Config`] if rustls refuses the protocol set.
pub fn tls_connector(trust: Arc<CaTrust>) -> Result<tokio_rustls::TlsConnector, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("CA TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier::new(trust.clone(), provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.resumption = rustls::client::Resumption::store(Arc::new(TrustBoundSessions::new(trust)))
        .tls12_resumption(rustls::client::Tls12Resumption::Disabled);
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Sessions (TLS 1.3 tickets) kept for the CA: a handful, for one server
/// name.
const SESSIONS: usize = 4;

/// TLS sessions that live only as long as the trust they were verified
/// under. Every use compares the trust's roots with those seen last: when
/// they differ, every session is dropped (a full handshake follows, against
/// the new roots). A ticket is kept only if the roots did not change since
/// the handshake that earned it began, so a session verified under one
/// trust is never resumed under another.
#[derive(Debug)]
pub struct TrustBoundSessions {
    trust: Arc<CaTrust>,
    /// The roots the sessions were verified under, and the sessions.
    state: std::sync::Mutex<(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        Arc<rustls::client::ClientSessionMemoryCache>,
    )>,
}

impl TrustBoundSessions {
    /// Sessions bound to `trust`'s roots as they are now.
    pub fn new(trust: Arc<CaTrust>) -> Self {
        let roots = trust.roots();
        Self {
            trust,
            state: std::sync::Mutex::new((roots, Self::fresh())),
        }
    }

    fn fresh() -> Arc<rustls::client::ClientSessionMemoryCache> {
        Arc::new(rustls::client::ClientSessionMemoryCache::new(SESSIONS))
    }

    /// The sessions, emptied first if the trust changed; `None` (and
    /// emptied) for a change when `keep_only_if_unchanged`.
    fn sessions(
        &self,
        keep_only_if_unchanged: bool,
    ) -> Option<Arc<rustls::client::ClientSessionMemoryCache>> {
        let roots = self.trust.roots();
        let mut state = self.state.locked();
        if state.0 != roots {
            *state = (roots, Self::fresh());
            if keep_only_if_unchanged {
                return None;
            }
        }
        Some(state.1.clone())
    }
}

impl rustls::client::ClientSessionStore for TrustBoundSessions {
    fn set_kx_hint(&self, name: ServerName<'static>, group: rustls::NamedGroup) {
        if let Some(s) = self.sessions(false) {
            s.set_kx_hint(name, group);
        }
    }

    fn kx_hint(&self, name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.sessions(false)?.kx_hint(name)
    }

    fn set_tls12_session(
        &self,
        _: ServerName<'static>,
        _: rustls::client::Tls12ClientSessionValue,
    ) {
    }

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        if let Some(s) = self.sessions(true) {
            s.insert_tls13_ticket(name, value);
        }
    }

    fn take_tls13_ticket(
        &self,
        name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.sessions(false)?.take_tls13_ticket(name)
    }
}

/// The CA over gRPC, as one workload: its own token, or a node agent's
/// token and the identity it asks for on the workload's behalf.
#[derive(Clone)]
pub struct GrpcCaClient {
    channel: Channel,
    token: TokenFile,
    /// Asked for as `ImpersonatedIdentity` (node mode with one node token);
    /// the answer must name it.
    identity: Option<SpiffeId>,
}

impl GrpcCaClient {
    /// The CA on `channel`, authenticated with `token`, asking for the token's own identity.
    pub fn new(channel: Channel, token: TokenFile) -> Self {
        Self {
            channel,
            token,
            identity: None,
        }
    }

    /// Asks for `identity` with the token of a trusted node account (the
    /// CA grants it only for a pod of that identity on this node).
    #[must_use]
    pub fn for_identity(mut self, identity: Option<SpiffeId>) -> Self {
        self.identity = identity;
        self
    }
}

/// The `ImpersonatedIdentity` request metadata.
fn impersonation(identity: &SpiffeId) -> prost_types::Struct {
    prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(
                    identity.as_str().to_owned(),
                )),
            },
        )]
        .into(),
    }
}

/// The leaf of `chain` names exactly `wanted`.
fn check_names(chain: &[String], wanted: &SpiffeId) -> Result<(), Error> {
    let leaf = chain
        .first()
        .and_then(|pem| crate::ca::bundle::parse_pem_certs(pem).ok())
        .and_then(|certs| certs.into_iter().next())
        .ok_or_else(|| Error::BadResponse("no leaf certificate".into()))?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf.der())
        .map_err(|e| Error::BadResponse(format!("unparsable leaf: {e}")))?;
    let got = crate::ca::bundle::single_spiffe_id(&cert).map_err(Error::BadResponse)?;
    if &got != wanted {
        return Err(Error::BadResponse(format!(
            "asked for {wanted}, the certificate names {got}"
        )));
    }
    Ok(())
}

impl CaClient for GrpcCaClient {
    fn sign(&self, csr_pem: String, ttl: Duration) -> SignFuture<'_> {
        Box::pin(async move {
            let value = self.token.bearer(SystemTime::now())?;
            let mut req = tonic::Request::new(IstioCertificateRequest {
                csr: csr_pem,
                validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
                metadata: self.identity.as_ref().map(impersonation),
            });
            req.metadata_mut().insert("authorization", value);
            // This agent reports the leaves it holds over the bundle watch:
            // the CA's rotation gates count them from there.
            req.metadata_mut().insert(
                crate::proto::AGENT_HEADER,
                tonic::metadata::MetadataValue::from_static("1"),
            );
            let resp = IstioCertificateServiceClient::new(self.channel.clone())
                .create_certificate(req)
                .await
                .map_err(|s| Error::Ca {
                    code: s.code(),
                    message: s.message().to_owned(),
                })?;
            let generation = bundle_generation(resp.metadata());
            let chain = resp.into_inner().cert_chain;
            if let Some(wanted) = &self.identity {
                check_names(&chain, wanted)?;
            }
            Ok((chain, generation))
        })
    }
}

/// The bundle generation of a CreateCertificate answer; none when absent or
/// unreadable (the answer is then ordered like a foreign CA's).
pub fn bundle_generation(metadata: &tonic::metadata::MetadataMap) -> Option<u64> {
    let value = metadata.get(crate::proto::BUNDLE_GENERATION_HEADER)?;
    let parsed = value.to_str().ok().and_then(|v| v.trim().parse().ok());
    if parsed.is_none() {
        tracing::warn!(
            header = crate::proto::BUNDLE_GENERATION_HEADER,
            "unreadable bundle generation in the CA's answer; ignored"
        );
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_with_exp(exp: u64) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            b64.encode(br#"{"alg":"ES256"}"#),
            b64.encode(format!(r#"{{"exp":{exp}}}"#))
        )
    }

    #[test]
    fn the_generation_header_is_read_when_well_formed() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(bundle_generation(&m), None);
        m.insert(
            crate::proto::BUNDLE_GENERATION_HEADER,
            "42".parse().unwrap(),
        );
        assert_eq!(bundle_generation(&m), Some(42));
        m.insert(
            crate::proto::BUNDLE_GENERATION_HEADER,
            "x1".parse().unwrap(),
        );
        assert_eq!(bundle_generation(&m), None);
    }

    #[test]
    fn an_answer_naming_another_identity_is_refused() {
        use crate::ca::check_csr;
        let now = SystemTime::now();
        let ca = crate::ca::testing::authority("cluster.local", 3600);
        let csr = crate::ca::testing::csr_pem();
        let web = SpiffeId::parse("spiffe://cluster.local/ns/prod/sa/web").unwrap();
        let db = SpiffeId::parse("spiffe://cluster.local/ns/prod/sa/db").unwrap();
        let chain = ca
            .sign_leaf(
                &check_csr(csr.as_bytes()).unwrap(),
                &web,
                Duration::from_secs(600),
                now,
            )
            .unwrap()
            .chain;
        check_names(&chain, &web).expect("the identity asked for");
        let e = check_names(&chain, &db).unwrap_err().to_string();
        assert!(
            e.contains("asked for spiffe://cluster.local/ns/prod/sa/db")
                && e.contains("names spiffe://cluster.local/ns/prod/sa/web"),
            "{e}"
        );
        assert!(matches!(check_names(&[], &web), Err(Error::BadResponse(_))));
    }

    #[test]
    fn expired_tokens_are_never_sent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
        let file = TokenFile::new(&path);
        assert!(
            matches!(file.read(now), Err(Error::Token(_))),
            "missing file"
        );
        std::fs::write(&path, token_with_exp(secs - 10)).unwrap();
        assert!(matches!(file.read(now), Err(Error::TokenExpired { .. })));
        std::fs::write(&path, token_with_exp(secs + 2)).unwrap();
        assert!(
            matches!(file.read(now), Err(Error::TokenExpired { .. })),
            "within the margin"
        );
        std::fs::write(&path, format!("{}\n", token_with_exp(secs + 3600))).unwrap();
        assert_eq!(
            file.read(now).unwrap(),
            token_with_exp(secs + 3600),
            "re-read, trimmed"
        );
        std::fs::write(&path, "").unwrap();
        assert!(matches!(file.read(now), Err(Error::Token(_))));
    }
}
