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

    /// The certificate, DER.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The certificate, PEM.
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
/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        for nibble in [b >> 4, b & 0xf] {
            out.extend(char::from_digit(u32::from(nibble), 16));
        }
    }
    out
}

/// Seconds since the Unix epoch (0 before it).
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The instant `secs` seconds after the Unix epoch.
pub fn from_unix(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs)
}

/// The instant `secs` seconds after the Unix epoch; the epoch for negative `secs`.
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

    /// The roots, in bundle order.
    pub fn roots(&self) -> &[Cert] {
        &self.roots
    }

    /// All roots as one PEM text (the last element of an Istio `cert_chain`).
    pub fn pem(&self) -> String {
        self.roots.iter().map(Cert::pem).collect()
    }

    /// Whether `der` is one of the roots.
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

    /// The bundle as a SPIFFE trust bundle: a JWK Set (RFC 7517) with one
    /// `x509-svid` key per root (its public key parameters, and the root
    /// itself as the single `x5c` entry, no `kid`), `spiffe_sequence` and
    /// `spiffe_refresh_hint` (seconds).
    ///
    /// # Errors
    /// [`Error::Cert`] for a root whose key type a JWK cannot carry
    /// (EC P-256/P-384/P-521, RSA and Ed25519 can).
    pub fn to_spiffe_jwks(&self, sequence: u64, refresh_hint_secs: u64) -> Result<String, Error> {
        let mut keys = Vec::new();
        for root in &self.roots {
            let mut jwk = jwk_public_key(&root.parsed()?)?;
            jwk.insert("use".into(), "x509-svid".into());
            jwk.insert("x5c".into(), serde_json::json!([base64_std(root.der())]));
            keys.push(serde_json::Value::Object(jwk));
        }
        let doc = serde_json::json!({
            "keys": keys,
            "spiffe_sequence": sequence,
            "spiffe_refresh_hint": refresh_hint_secs,
        });
        Ok(doc.to_string())
    }
}

fn base64_std(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The public key parameters of a certificate as a JWK (RFC 7518 §6).
fn jwk_public_key(
    cert: &X509Certificate<'_>,
) -> Result<serde_json::Map<String, serde_json::Value>, Error> {
    use x509_parser::oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
        OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
    };
    let spki = cert.public_key();
    let alg = &spki.algorithm.algorithm;
    let key = spki.subject_public_key.data.as_ref();
    let mut jwk = serde_json::Map::new();
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        let (crv, len) = match curve {
            Some(c) if c == OID_EC_P256 => ("P-256", 32),
            Some(c) if c == OID_NIST_EC_P384 => ("P-384", 48),
            Some(c) if c == OID_NIST_EC_P521 => ("P-521", 66),
            _ => return Err(Error::Cert("EC root on a curve a JWK cannot name".into())),
        };
        let (x, y) = match key.split_first() {
            Some((4, point)) if point.len() == 2 * len => point.split_at(len),
            _ => {
                return Err(Error::Cert(
                    "EC root key is not an uncompressed point".into(),
                ));
            }
        };
        jwk.insert("kty".into(), "EC".into());
        jwk.insert("crv".into(), crv.into());
        jwk.insert("x".into(), base64_url(x).into());
        jwk.insert("y".into(), base64_url(y).into());
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = spki.parsed() else {
            return Err(Error::Cert("malformed RSA root key".into()));
        };
        let unsigned =
            |b: &[u8]| -> Vec<u8> { b.iter().skip_while(|x| **x == 0).copied().collect() };
        jwk.insert("kty".into(), "RSA".into());
        jwk.insert("n".into(), base64_url(&unsigned(rsa.modulus)).into());
        jwk.insert("e".into(), base64_url(&unsigned(rsa.exponent)).into());
    } else if *alg == OID_SIG_ED25519 {
        jwk.insert("kty".into(), "OKP".into());
        jwk.insert("crv".into(), "Ed25519".into());
        jwk.insert("x".into(), base64_url(key).into());
    } else {
        return Err(Error::Cert(format!(
            "root key algorithm {alg} cannot be written as a JWK"
        )));
    }
    Ok(jwk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{Authority, KeyAlgorithm};
    use crate::identity::TrustDomain;

    fn root(alg: KeyAlgorithm) -> Cert {
        let td = TrustDomain::new("td").unwrap();
        let files =
            Authority::generate_root(&td, alg, Duration::from_secs(3600), SystemTime::now())
                .unwrap();
        parse_pem_certs(&files.root_cert).unwrap().remove(0)
    }

    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff, 0x7e]), "000fa0ff7e");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn spiffe_bundles_carry_each_roots_public_key() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let rsa = root(KeyAlgorithm::Rsa2048);
        let p384 = root(KeyAlgorithm::EcdsaP384);
        let bundle = TrustBundle::new(vec![rsa.clone(), p384.clone()]).unwrap();
        let doc: serde_json::Value =
            serde_json::from_str(&bundle.to_spiffe_jwks(7, 60).unwrap()).unwrap();
        assert_eq!(doc["spiffe_sequence"], 7);
        assert_eq!(doc["spiffe_refresh_hint"], 60);
        let keys = doc["keys"].as_array().unwrap();
        assert_eq!(keys[0]["kty"], "RSA");
        assert_eq!(
            b64.decode(keys[0]["n"].as_str().unwrap()).unwrap().len(),
            256
        );
        assert_eq!(keys[0]["e"], "AQAB");
        assert_eq!(
            (keys[1]["kty"].as_str(), keys[1]["crv"].as_str()),
            (Some("EC"), Some("P-384"))
        );
        assert_eq!(
            b64.decode(keys[1]["x"].as_str().unwrap()).unwrap().len(),
            48
        );
        for (key, cert) in keys.iter().zip([&rsa, &p384]) {
            assert_eq!(key["use"], "x509-svid");
            let x5c = base64::engine::general_purpose::STANDARD
                .decode(key["x5c"][0].as_str().unwrap())
                .unwrap();
            assert_eq!(x5c, cert.der());
        }
    }
}
