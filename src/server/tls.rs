//! The server's TLS: a serving certificate issued by the CA itself and swapped
//! in place when renewed, client certificates requested but optional, and
//! the handshake of each accepted connection (limits: [`crate::net`]).

use crate::sync::RwLockExt;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use super::Error;
use super::metrics::Handshakes;
use crate::ca::{Authority, KeyAlgorithm, PrivateKey};

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What the serving certificate covers and how long it lives.
#[derive(Clone, Debug)]
pub struct ServingSpec {
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP subject alternative names.
    pub ips: Vec<IpAddr>,
    /// How long each serving certificate lives.
    pub ttl: Duration,
}

/// The current serving certificate, replaceable while connections are open.
#[derive(Debug)]
pub struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
    /// (issued at, NotAfter) of the current certificate.
    validity: RwLock<(SystemTime, SystemTime)>,
    /// The signing certificate (DER) of the authority that issued it.
    issued_by: RwLock<Vec<u8>>,
}

impl ServingCert {
    /// Issues the first serving certificate.
    ///
    /// # Errors
    /// [`Error::Ca`] if the CA cannot sign, [`Error::Tls`] if rustls refuses the key.
    pub fn issue(
        authority: &Authority,
        spec: &ServingSpec,
        now: SystemTime,
    ) -> Result<Self, Error> {
        let (key, not_after) = issue(authority, spec, now)?;
        Ok(Self {
            current: RwLock::new(key),
            validity: RwLock::new((now, not_after)),
            issued_by: RwLock::new(authority.signer().der().to_vec()),
        })
    }

    /// Replaces the serving certificate with a fresh key and certificate.
    ///
    /// # Errors
    /// As [`ServingCert::issue`]; the old certificate stays in use.
    pub fn renew(
        &self,
        authority: &Authority,
        spec: &ServingSpec,
        now: SystemTime,
    ) -> Result<SystemTime, Error> {
        let (key, not_after) = issue(authority, spec, now)?;
        // All three taken before any is written: a reader sees the old
        // certificate with its own validity and issuer, or the new.
        let (mut cur, mut validity, mut by) = (
            self.current.write_locked(),
            self.validity.write_locked(),
            self.issued_by.write_locked(),
        );
        *cur = key;
        *validity = (now, not_after);
        *by = authority.signer().der().to_vec();
        Ok(not_after)
    }

    /// The signing certificate (DER) of the authority that issued the
    /// certificate being served.
    pub fn issued_by(&self) -> Vec<u8> {
        self.issued_by.read_locked().clone()
    }

    /// The NotAfter of the certificate being served.
    pub fn not_after(&self) -> SystemTime {
        self.validity.read_locked().1
    }

    /// Halfway through the current certificate's actual lifetime (which the
    /// CA may have cut short at its own expiry).
    pub fn renew_at(&self) -> SystemTime {
        let (issued, not_after) = *self.validity.read_locked();
        issued + not_after.duration_since(issued).unwrap_or_default() / 2
    }
}

fn issue(
    authority: &Authority,
    spec: &ServingSpec,
    now: SystemTime,
) -> Result<(Arc<CertifiedKey>, SystemTime), Error> {
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
    let issued = authority.sign_serving(&key, &spec.dns_names, &spec.ips, spec.ttl, now)?;
    // Leaf and intermediates; the root bundle (last element) is the client's.
    let mut chain = Vec::new();
    for text in issued
        .chain
        .split_last()
        .map(|(_, r)| r)
        .unwrap_or_default()
    {
        for block in pem::parse_many(text).map_err(|e| Error::Tls(e.to_string()))? {
            chain.push(CertificateDer::from(block.into_contents()));
        }
    }
    let pem_key = key.to_pem();
    let der = pem::parse(pem_key.as_bytes())
        .map_err(|e| Error::Tls(e.to_string()))?
        .into_contents();
    let signing_key = provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der)))
        .map_err(|e| Error::Tls(format!("serving key: {e}")))?;
    Ok((
        Arc::new(CertifiedKey::new(chain, signing_key)),
        issued.not_after,
    ))
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read_locked().clone())
    }
}

/// Asks for a client certificate, accepts a handshake without one, and checks
/// only that the client holds the private key of what it presented. Whether
/// that certificate proves anything is decided per request by
/// [`super::auth::ClientCertAuthenticator`] against the current trust bundle,
/// so a certificate from another CA yields a clean `Unauthenticated` (and a
/// bearer token on the same call can still succeed) instead of a failed
/// handshake.
#[derive(Debug)]
struct OptionalClientCert {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for OptionalClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// TLS 1.3 session tickets sent after each handshake: a client reconnecting
/// needs one (it gets a fresh one with every resumed handshake too).
pub const TICKETS_PER_HANDSHAKE: usize = 1;

/// The rustls server configuration: TLS 1.2 and 1.3, ring only, ALPN h2,
/// and resumption with stateless tickets.
///
/// Resumption: a reconnecting client (an agent, a restarting proxy) skips
/// the certificate and its signature. Tickets are stateless (ring's
/// `Ticketer`: the session sealed with a key the server rotates every six
/// hours, and the previous key still opens tickets, so a ticket opens for
/// at most twelve hours, its advertised lifetime), so resumption costs the
/// server no memory per client, however many there are. (A session cache
/// would hold every session, within a bound that many clients would evict
/// anyway.) A resumed session carries the client certificate of its full
/// handshake; it is still judged per request, against the signers as they
/// are then ([`super::auth::ClientCertAuthenticator`]).
///
/// # Errors
/// [`Error::Tls`] if rustls rejects the protocol set or the ticketer
/// cannot be made.
pub fn server_config(cert: Arc<ServingCert>) -> Result<rustls::ServerConfig, Error> {
    let provider = Arc::new(prefer_sha256(provider().as_ref().clone()));
    let algs = provider.signature_verification_algorithms;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(OptionalClientCert { algs }))
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    // Our order (AES-128-GCM with SHA-256 first), not the client's.
    config.ignore_client_order = true;
    config.ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| Error::Tls(format!("session tickets: {e}")))?;
    config.send_tls13_tickets = TICKETS_PER_HANDSHAKE;
    // Nothing kept per session: TLS 1.2 clients resume by ticket too.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(config)
}

/// `provider` with the SHA-256 suites first (AES-128-GCM, then
/// ChaCha20-Poly1305, then AES-256-GCM with SHA-384), in TLS 1.3 and 1.2
/// alike; nothing is removed.
///
/// Why: a full handshake's key schedule and transcript hash run through the
/// suite's hash, and SHA-256 has instructions on x86-64 (SHA-NI) and ARMv8
/// while SHA-384 does not; measured here, SHA-512's block function was 5% of
/// a new connection's server CPU under rustls' default order (AES-256-GCM
/// with SHA-384 first). AES-128-GCM is also what Go's crypto/tls and
/// BoringSSL (Envoy) choose first, and its 128-bit strength matches the P-256
/// keys the connection is authenticated with.
fn prefer_sha256(mut provider: CryptoProvider) -> CryptoProvider {
    provider.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => 1,
        _ => 2,
    });
    provider
}

/// The TLS handshake of one accepted connection (the accept loop puts it
/// under the handshake deadline): the stream and tonic's connect info (peer
/// address and certificates), or `None` when the handshake failed.
pub fn handshake(
    config: Arc<rustls::ServerConfig>,
    counted: Handshakes,
) -> impl Fn(TcpStream, Option<IpAddr>) -> HandshakeFuture + Send + Sync + 'static {
    let acceptor = TlsAcceptor::from(config);
    move |tcp, peer| {
        let acceptor = acceptor.clone();
        let counted = counted.clone();
        Box::pin(async move {
            match acceptor.accept(tcp).await {
                Ok(tls) => {
                    match tls.get_ref().1.handshake_kind() {
                        Some(rustls::HandshakeKind::Resumed) => counted.resumed.inc(),
                        _ => counted.full.inc(),
                    }
                    let info = tls.connect_info();
                    Some((tls, info))
                }
                Err(e) => {
                    tracing::debug!(?peer, error = %e, "TLS handshake failed");
                    None
                }
            }
        })
    }
}

type HandshakeFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Option<(TlsStream<TcpStream>, ConnInfo)>> + Send>,
>;

/// What tonic's `Request::remote_addr` and `Request::peer_certs` read.
pub type ConnInfo =
    tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::TrustDomain;

    fn authority(lifetime: Duration, now: SystemTime) -> Authority {
        let td = TrustDomain::new("td").unwrap();
        let files = Authority::generate_root(&td, KeyAlgorithm::EcdsaP256, lifetime, now).unwrap();
        Authority::from_files(&files, &td, now).unwrap()
    }

    fn spec(ttl: Duration) -> ServingSpec {
        ServingSpec {
            dns_names: vec!["localhost".into()],
            ips: vec![],
            ttl,
        }
    }

    #[test]
    fn renews_halfway_through_the_lifetime() {
        let now = SystemTime::now();
        let cert = ServingCert::issue(
            &authority(Duration::from_secs(86_400), now),
            &spec(Duration::from_secs(3600)),
            now,
        )
        .unwrap();
        assert_eq!(cert.renew_at(), now + Duration::from_secs(1800));
        assert!(cert.not_after() <= now + Duration::from_secs(3600));
    }

    #[test]
    fn renews_halfway_through_a_lifetime_cut_short_by_the_ca() {
        // The CA expires in 10 minutes: the serving cert lives 10 minutes, not
        // 24 hours, and renewal comes after 5, not after 12 hours.
        let now = SystemTime::now();
        let ca = authority(Duration::from_secs(600), now);
        let cert = ServingCert::issue(&ca, &spec(Duration::from_secs(86_400)), now).unwrap();
        let not_after = cert.not_after();
        assert!(not_after <= now + Duration::from_secs(600));
        let half = not_after.duration_since(now).unwrap() / 2;
        assert_eq!(cert.renew_at(), now + half);
        // A renewal replaces the certificate and moves the schedule.
        let later = now + Duration::from_secs(300);
        cert.renew(&ca, &spec(Duration::from_secs(60)), later)
            .unwrap();
        assert_eq!(cert.renew_at(), later + Duration::from_secs(30));
    }
}
