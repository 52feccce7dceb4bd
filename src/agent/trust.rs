//! What the agent trusts the CA's own TLS certificate with: the roots of the
//! `--ca-root-cert` file, and the roots the CA has since sent in its answers
//! (the bundle in the last element of every `cert_chain`). A root rotation
//! publishes the new root in that bundle before the CA's serving certificate
//! moves to it, so an agent started with only the old root file is never cut
//! off from its CA.
//!
//! What is learnt is only ever added to what the file holds, and arrives
//! over a connection already authenticated with those roots.

use crate::sync::RwLockExt;
use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::DigitallySignedStruct;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use super::Error;

/// The roots the CA's serving certificate may chain to.
#[derive(Debug)]
pub struct CaTrust {
    file_roots: Vec<CertificateDer<'static>>,
    learnt: RwLock<Vec<CertificateDer<'static>>>,
}

impl CaTrust {
    /// The roots of a PEM file.
    ///
    /// # Errors
    /// [`Error::Config`] for an unreadable file or one with no certificate.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("reading CA root {}: {e}", path.display())))?;
        let file_roots = pem_certs(&text);
        if file_roots.is_empty() {
            return Err(Error::Config(format!(
                "CA root {} holds no usable certificate (PEM CERTIFICATE blocks only)",
                path.display()
            )));
        }
        Ok(Self {
            file_roots,
            learnt: RwLock::new(Vec::new()),
        })
    }

    /// Takes the bundle the CA just sent as the learnt roots (replacing the
    /// previous ones: a root the CA has retired is no longer trusted, unless
    /// the file holds it).
    pub fn learn(&self, bundle_pem: &str) {
        let roots = pem_certs(bundle_pem);
        if roots.is_empty() {
            return;
        }
        *self.learnt.write_locked() = roots;
    }

    /// File roots and learnt roots.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        let mut all = self.file_roots.clone();
        let learnt = self.learnt.read_locked();
        all.extend(
            learnt
                .iter()
                .filter(|r| !all.contains(r))
                .cloned()
                .collect::<Vec<_>>(),
        );
        all
    }
}

/// The certificates of a PEM text (anything unparsable yields none).
fn pem_certs(text: &str) -> Vec<CertificateDer<'static>> {
    crate::ca::bundle::parse_pem_certs(text)
        .map(|certs| {
            certs
                .iter()
                .map(|c| CertificateDer::from(c.der().to_vec()))
                .collect()
        })
        .unwrap_or_default()
}

/// Verifies the CA's serving certificate against [`CaTrust`] as it is at
/// each handshake (rustls-webpki, server auth, the configured name).
#[derive(Debug)]
pub struct Verifier {
    trust: Arc<CaTrust>,
    provider: Arc<CryptoProvider>,
}

impl Verifier {
    /// Verifies against `trust`, with `provider`'s signature algorithms.
    pub fn new(trust: Arc<CaTrust>, provider: Arc<CryptoProvider>) -> Self {
        Self { trust, provider }
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut store = rustls::RootCertStore::empty();
        let (_, _ignored) = store.add_parsable_certificates(self.trust.roots());
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(store), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(format!("no usable CA root: {e}")))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
