//! Issuance property, shared by `fuzz_targets/issuance.rs` and
//! `tests/properties.rs`: a certificate the CA issues names exactly the
//! caller's identity (one URI SAN, nothing from the CSR's subject or SANs),
//! carries exactly the CSR's public key, and is never a CA. Read back with
//! x509-parser, independently of rcgen and ring that made it; the leaf's
//! signature is checked against the active authority's public key.

use std::time::{Duration, SystemTime};

use workload_ca::ca::{AuthoritySet, check_csr};
use workload_ca::identity::SpiffeId;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER, OID_X509_EXT_BASIC_CONSTRAINTS,
    OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME,
    OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
};
use x509_parser::prelude::{FromDer, X509Certificate};

/// What issuing a CSR came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `check_csr` refused the bytes.
    CsrRefused,
    /// The authority refused to sign (a foreign URI SAN, say).
    SignRefused,
    /// A leaf was issued and has the property.
    Issued,
}

/// Runs the real path (`check_csr`, then `AuthoritySet::sign_leaf`) on
/// `csr` for `caller` at `now`, and checks what comes out. `expected_spki`
/// is the public key the CSR was made for when the caller knows it (the
/// key it generated), else `None` (the CSR's own SPKI, read independently).
///
/// # Errors
/// A description of the violated property.
pub fn issue_and_check(
    set: &AuthoritySet,
    csr: &[u8],
    caller: &SpiffeId,
    expected_spki: Option<&[u8]>,
    now: SystemTime,
) -> Result<Outcome, String> {
    let Ok(checked) = check_csr(csr) else {
        return Ok(Outcome::CsrRefused);
    };
    let Ok(issued) = set.sign_leaf(&checked, caller, Duration::from_secs(3600), now) else {
        return Ok(Outcome::SignRefused);
    };
    let spki = match expected_spki {
        Some(k) => k.to_vec(),
        None => csr_spki(csr).ok_or("a CSR check_csr accepted does not parse independently")?,
    };
    if checked.spki_der() != spki.as_slice() {
        return Err("CheckedCsr's key differs from the CSR's".into());
    }
    let signer = set.active().signer().der().to_vec();
    check_leaf(&issued.leaf_der, caller, &spki, &signer)?;
    Ok(Outcome::Issued)
}

/// The CSR's SubjectPublicKeyInfo, read with x509-parser (PEM or DER).
pub fn csr_spki(csr: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::certification_request::X509CertificationRequest;
    let der = match lax_pem(csr) {
        Some(der) => der,
        None => csr.to_vec(),
    };
    let (_, req) = X509CertificationRequest::from_der(&der).ok()?;
    Some(req.certification_request_info.subject_pki.raw.to_vec())
}

/// The DER of a PEM block read as RFC 7468's lax parsers read it
/// (whitespace inside the base64 skipped): the body's whitespace is removed
/// here, and x509-parser's strict reader then decodes what is left. What
/// matters independently is the DER; PEM's spacing is not the property.
fn lax_pem(csr: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(csr).ok()?;
    let start = text.find("-----BEGIN ")?;
    let body_start = start + text.get(start..)?.find('\n')? + 1;
    let end = body_start + text.get(body_start..)?.find("-----END ")?;
    let body: String = text
        .get(body_start..end)?
        .chars()
        .filter(|c| !matches!(c, ' ' | '\t' | '\x0b' | '\x0c' | '\r'))
        .collect();
    let cleaned = format!("{}{body}{}", text.get(..body_start)?, text.get(end..)?);
    let (_, pem) = x509_parser::pem::parse_x509_pem(cleaned.as_bytes()).ok()?;
    Some(pem.contents)
}

/// The property on one leaf (DER): exactly `caller` as its single name,
/// exactly `spki` as its key, not a CA, only the extensions of the leaf
/// profile, and signed by `signer_der`'s key.
///
/// # Errors
/// What is wrong.
pub fn check_leaf(
    leaf_der: &[u8],
    caller: &SpiffeId,
    spki: &[u8],
    signer_der: &[u8],
) -> Result<(), String> {
    let (rest, leaf) =
        X509Certificate::from_der(leaf_der).map_err(|e| format!("leaf does not parse: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the leaf".into());
    }
    if leaf.subject().iter().count() != 0 {
        return Err(format!("leaf subject is not empty: {}", leaf.subject()));
    }
    if leaf.public_key().raw != spki {
        return Err("leaf key is not the CSR's key".into());
    }
    let allowed = [
        OID_X509_EXT_SUBJECT_ALT_NAME,
        OID_X509_EXT_BASIC_CONSTRAINTS,
        OID_X509_EXT_KEY_USAGE,
        OID_X509_EXT_EXTENDED_KEY_USAGE,
        OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER,
        OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
    ];
    let mut names = Vec::new();
    let (mut saw_bc, mut saw_ku) = (false, false);
    for ext in leaf.extensions() {
        if !allowed.contains(&ext.oid) {
            return Err(format!(
                "leaf carries extension {} outside the profile",
                ext.oid
            ));
        }
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                if !ext.critical {
                    return Err("SAN not critical with an empty subject".into());
                }
                names.extend(san.general_names.iter().map(|n| format!("{n:?}")));
                match san.general_names.as_slice() {
                    [GeneralName::URI(uri)] if *uri == caller.as_str() => {}
                    other => return Err(format!("leaf names {other:?}, not exactly {caller}")),
                }
            }
            ParsedExtension::BasicConstraints(bc) => {
                saw_bc = true;
                if bc.ca || bc.path_len_constraint.is_some() {
                    return Err("leaf is a CA (basicConstraints)".into());
                }
            }
            ParsedExtension::KeyUsage(ku) => {
                saw_ku = true;
                if ku.key_cert_sign() || ku.crl_sign() {
                    return Err("leaf may sign certificates or CRLs (keyUsage)".into());
                }
                if !ku.digital_signature() || !ext.critical {
                    return Err("leaf keyUsage lacks digitalSignature or is not critical".into());
                }
            }
            ParsedExtension::ExtendedKeyUsage(_)
            | ParsedExtension::AuthorityKeyIdentifier(_)
            | ParsedExtension::SubjectKeyIdentifier(_) => {}
            other => return Err(format!("unexpected extension {other:?}")),
        }
    }
    if names.len() != 1 {
        return Err(format!(
            "leaf has {} SAN extensions' names: {names:?}",
            names.len()
        ));
    }
    if !saw_bc || !saw_ku {
        return Err("leaf lacks basicConstraints or keyUsage".into());
    }
    let (_, signer) = X509Certificate::from_der(signer_der).map_err(|e| format!("signer: {e}"))?;
    if leaf.issuer() != signer.subject() {
        return Err("leaf issuer is not the active authority's subject".into());
    }
    leaf.verify_signature(Some(signer.public_key()))
        .map_err(|e| format!("leaf signature does not verify with the active authority's key: {e}"))
}
