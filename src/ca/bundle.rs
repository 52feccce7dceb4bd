//! Certificates in PEM, and the trust bundle (the set of roots clients trust).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use super::Error;

/// One certificate, kept as DER with its PEM form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cert {
    der: Vec<u8>,
    pem: String,
}

impl Cert {
    /// Wraps DER bytes after checking they parse as one certificate.
    ///
    /// # Errors
    /// [`Error::Cert`] if they do not.
    pub fn from_der(der: Vec<u8>) -> Result<Self, Error> {
        parse(&der)?;
        let pem = to_pem("CERTIFICATE", &der);
        Ok(Self { der, pem })
    }

    pub fn der(&self) -> &[u8] {
        &self.der
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The parsed view. Cannot fail: construction checked it.
    pub fn parsed(&self) -> Result<X509Certificate<'_>, Error> {
        parse(&self.der)
    }
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, Error> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(Error::Cert("trailing bytes after certificate".into())),
        Err(e) => Err(Error::Cert(format!("malformed certificate: {e}"))),
    }
}

/// PEM with LF line endings (the `pem` crate defaults to CRLF).
pub fn to_pem(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Every `CERTIFICATE` block of a PEM text, in order. Other block types are
/// an error, so a key pasted into a cert file is caught.
///
/// # Errors
/// [`Error::Cert`] for bad PEM, a non-certificate block, or a malformed
/// certificate.
pub fn parse_pem_certs(text: &str) -> Result<Vec<Cert>, Error> {
    let blocks = pem::parse_many(text).map_err(|e| Error::Cert(format!("bad PEM: {e}")))?;
    blocks
        .into_iter()
        .map(|b| {
            if b.tag() != "CERTIFICATE" {
                return Err(Error::Cert(format!("unexpected PEM block {:?}", b.tag())));
            }
            Cert::from_der(b.into_contents())
        })
        .collect()
}

/// Seconds since the epoch to `SystemTime`, saturating at the epoch.
pub fn time_from_unix(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// A certificate's NotAfter.
pub fn not_after(cert: &X509Certificate<'_>) -> SystemTime {
    time_from_unix(cert.validity().not_after.timestamp())
}

/// The roots relying parties trust, in the order they were configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustBundle {
    roots: Vec<Cert>,
}

impl TrustBundle {
    /// A bundle of at least one root.
    ///
    /// # Errors
    /// [`Error::Material`] if `roots` is empty.
    pub fn new(roots: Vec<Cert>) -> Result<Self, Error> {
        if roots.is_empty() {
            return Err(Error::Material(
                "the root bundle holds no certificate".into(),
            ));
        }
        Ok(Self { roots })
    }

    pub fn roots(&self) -> &[Cert] {
        &self.roots
    }

    /// All roots as one PEM text (the last element of an Istio `cert_chain`).
    pub fn pem(&self) -> String {
        self.roots.iter().map(Cert::pem).collect()
    }

    pub fn contains(&self, der: &[u8]) -> bool {
        self.roots.iter().any(|r| r.der() == der)
    }

    /// The earliest NotAfter among the roots.
    pub fn earliest_expiry(&self) -> Option<SystemTime> {
        self.roots
            .iter()
            .filter_map(|r| r.parsed().ok())
            .map(|c| not_after(&c))
            .min()
    }
}
