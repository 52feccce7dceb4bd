//! The cryptographic checks of certificates.k8s.io validation, as the real
//! API server does them with Go's crypto/x509 (pkg/apis/certificates/
//! validation): public-key types, the stub PKCS#10 request's signature, the
//! legacy proof of possession, certificate parsing.
//!
//! ring verifies what it can; what it cannot (P-521, RSA-PSS with Go's
//! automatic salt length) goes to the `openssl` CLI, as Go would accept it.

use std::io::Write as _;
use std::process::Command;

use x509_parser::prelude::*;
use x509_parser::public_key::PublicKey;

/// A public key as validation classifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyClass {
    Ed25519,
    EcP256,
    EcP384,
    EcP521,
    /// Another curve (its name, for the message).
    EcOther,
    Rsa(usize),
    Unknown,
}

const OID_ED25519: &str = "1.3.101.112";
const OID_EC: &str = "1.2.840.10045.2.1";
const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_P521: &str = "1.3.132.0.35";

fn bits(modulus: &[u8]) -> usize {
    let m: Vec<u8> = modulus.iter().copied().skip_while(|b| *b == 0).collect();
    match m.first() {
        None => 0,
        Some(first) => (m.len() - 1) * 8 + (8 - first.leading_zeros() as usize),
    }
}

/// Parses a PKIX (SubjectPublicKeyInfo) key; `None` when it does not parse
/// (x509.ParsePKIXPublicKey's error).
pub fn classify(spki_der: &[u8]) -> Option<KeyClass> {
    let (rest, spki) = SubjectPublicKeyInfo::from_der(spki_der).ok()?;
    if !rest.is_empty() {
        return None;
    }
    let alg = spki.algorithm.algorithm.to_id_string();
    Some(match alg.as_str() {
        OID_ED25519 => KeyClass::Ed25519,
        OID_EC => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            match curve.as_str() {
                OID_P256 => KeyClass::EcP256,
                OID_P384 => KeyClass::EcP384,
                OID_P521 => KeyClass::EcP521,
                _ => KeyClass::EcOther,
            }
        }
        OID_RSA => match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => KeyClass::Rsa(bits(rsa.modulus)),
            _ => return None,
        },
        _ => KeyClass::Unknown,
    })
}

/// The subject public key's raw bits (an EC point, an Ed25519 key, a PKCS#1
/// RSA key).
fn raw_key(spki_der: &[u8]) -> Option<Vec<u8>> {
    let (_, spki) = SubjectPublicKeyInfo::from_der(spki_der).ok()?;
    Some(spki.subject_public_key.data.to_vec())
}

fn pem_of(label: &str, der: &[u8]) -> String {
    ::pem::encode(&::pem::Pem::new(label, der.to_vec()))
}

/// Runs `openssl` on files written to a temporary directory; true when
/// it exits 0 and (when given) says `expect`. (`openssl req -verify` exits
/// 0 even when the signature is bad: its message tells.)
fn openssl(files: &[(&str, &[u8])], args: &[&str]) -> bool {
    openssl_saying(files, args, None)
}

fn openssl_saying(files: &[(&str, &[u8])], args: &[&str], expect: Option<&str>) -> bool {
    let Ok(dir) = tempfile::tempdir() else {
        return false;
    };
    for (name, bytes) in files {
        let Ok(mut f) = std::fs::File::create(dir.path().join(name)) else {
            return false;
        };
        if f.write_all(bytes).is_err() {
            return false;
        }
    }
    Command::new("openssl")
        .args(args)
        .current_dir(dir.path())
        .output()
        .map(|o| {
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            o.status.success() && expect.is_none_or(|e| said.contains(e))
        })
        .unwrap_or(false)
}

/// The proof of possession: the pod UID's ASCII bytes signed with the key
/// (SHA-256; RSA-PSS with any salt length, ECDSA ASN.1, Ed25519).
pub fn verify_pop(spki_der: &[u8], class: KeyClass, pod_uid: &str, sig: &[u8]) -> bool {
    use ring::signature as s;
    let msg = pod_uid.as_bytes();
    let ring_alg: Option<&'static dyn s::VerificationAlgorithm> = match class {
        KeyClass::Ed25519 => Some(&s::ED25519),
        KeyClass::EcP256 => Some(&s::ECDSA_P256_SHA256_ASN1),
        KeyClass::EcP384 => Some(&s::ECDSA_P384_SHA256_ASN1),
        _ => None,
    };
    if let Some(alg) = ring_alg {
        let Some(raw) = raw_key(spki_der) else {
            return false;
        };
        return s::UnparsedPublicKey::new(alg, raw).verify(msg, sig).is_ok();
    }
    let pub_pem = pem_of("PUBLIC KEY", spki_der);
    let mut args = vec!["dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig"];
    if matches!(class, KeyClass::Rsa(_)) {
        args.extend([
            "-sigopt",
            "rsa_padding_mode:pss",
            "-sigopt",
            "rsa_pss_saltlen:auto",
        ]);
    }
    args.push("msg");
    openssl(
        &[("pub.pem", pub_pem.as_bytes()), ("sig", sig), ("msg", msg)],
        &args,
    )
}

/// A parsed stub PKCS#10 request: its subject public key (DER), or why it
/// is refused (x509.ParseCertificateRequest, then CheckSignature).
pub fn stub_csr_key(der: &[u8]) -> Result<Vec<u8>, String> {
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| format!("does not parse as a PKCS#10 certificate request: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing data after the PKCS#10 certificate request".into());
    }
    let spki = csr.certification_request_info.subject_pki.raw.to_vec();
    if csr.verify_signature().is_err() {
        let pem = pem_of("CERTIFICATE REQUEST", der);
        if !openssl_saying(
            &[("csr.pem", pem.as_bytes())],
            &["req", "-in", "csr.pem", "-verify", "-noout"],
            Some("verify OK"),
        ) {
            return Err("could not verify the PKCS#10 signature".into());
        }
    }
    Ok(spki)
}

/// What a parsed certificate tells validation.
pub struct CertFacts {
    pub spki_der: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
    pub is_ca: bool,
    pub basic_constraints: bool,
    pub dns_names: Vec<String>,
}

/// x509.ParseCertificate, reduced to what validation reads.
pub fn parse_cert(der: &[u8]) -> Option<CertFacts> {
    let (rest, cert) = X509Certificate::from_der(der).ok()?;
    if !rest.is_empty() {
        return None;
    }
    let bc = cert.basic_constraints().ok().flatten();
    let dns_names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(CertFacts {
        spki_der: cert.public_key().raw.to_vec(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        is_ca: bc.as_ref().is_some_and(|b| b.value.ca),
        basic_constraints: bc.is_some(),
        dns_names,
    })
}
