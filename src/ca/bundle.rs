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

/// The SPIFFE ID of a leaf: exactly one URI SAN, a valid SPIFFE ID.
///
/// # Errors
/// A message saying how many URI SANs there were, or why the one is invalid.
pub fn single_spiffe_id(cert: &X509Certificate<'_>) -> Result<crate::identity::SpiffeId, String> {
    use x509_parser::extensions::GeneralName;
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| {
                if let GeneralName::URI(u) = n {
                    Some(*u)
                } else {
                    None
                }
            })
            .collect(),
        _ => Vec::new(),
    };
    let [uri] = uris.as_slice() else {
        return Err(format!("{} URI SANs, expected exactly one", uris.len()));
    };
    crate::identity::SpiffeId::parse(uri).map_err(|e| format!("URI SAN {uri:?}: {e}"))
}

/// rustls-webpki path validation of `leaf` through `intermediates` to one of
/// `anchors` (DER CA certificates; an intermediate may serve as anchor), at
/// `now`, for `usage` (serverAuth or clientAuth).
///
/// # Errors
/// webpki's reason, as text.
pub fn verify_path(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    anchors: &[&[u8]],
    now: SystemTime,
    usage: webpki::KeyUsage,
) -> Result<(), String> {
    use rustls_pki_types::{CertificateDer, UnixTime};
    let anchor_ders: Vec<CertificateDer<'_>> =
        anchors.iter().map(|a| CertificateDer::from(*a)).collect();
    let anchors = anchor_ders
        .iter()
        .map(webpki::anchor_from_trusted_cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("unusable trust anchor: {e}"))?;
    let inter: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let leaf = CertificateDer::from(leaf);
    let ee = webpki::EndEntityCert::try_from(&leaf).map_err(|e| format!("unparsable: {e}"))?;
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| "clock before 1970".to_string())?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &inter,
        UnixTime::since_unix_epoch(secs),
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
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
