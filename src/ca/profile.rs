//! Certificate profiles: what a leaf, a serving certificate and a root look
//! like. Every field is set here from the authenticated identity and the
//! clock; nothing comes from a CSR but the public key, which the caller
//! passes separately to the signer.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;

use super::Error;
use crate::identity::{SpiffeId, TrustDomain};

/// Bytes in a serial number: the RFC 5280 maximum, giving 159 random bits.
const SERIAL_LEN: usize = 20;

/// A fresh random serial: positive, always exactly [`SERIAL_LEN`] bytes, so
/// replicas that share a CA key cannot collide in practice.
///
/// # Errors
/// [`Error::Signing`] if the system random source fails.
pub fn random_serial() -> Result<SerialNumber, Error> {
    let mut bytes = [0u8; SERIAL_LEN];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Signing("system random source failed".into()))?;
    bytes[0] &= 0x7f;
    if bytes[0] == 0 {
        bytes[0] = 1;
    }
    Ok(SerialNumber::from_slice(&bytes))
}

pub(crate) fn to_offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn uri_san(id: &SpiffeId) -> Result<SanType, Error> {
    Ia5String::try_from(id.as_str())
        .map(SanType::URI)
        .map_err(|e| Error::Signing(format!("SPIFFE ID is not IA5: {e}")))
}

/// An X.509-SVID leaf: empty subject, the identity as the single (critical)
/// URI SAN, CA=false, critical keyUsage digitalSignature (+ keyEncipherment
/// for RSA keys), extKeyUsage serverAuth + clientAuth, random serial, and an
/// authority key identifier.
///
/// # Errors
/// [`Error::Signing`] if the identity has no path (a trust-domain ID is not a
/// workload identity) or the random source fails.
pub fn leaf(
    id: &SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
    rsa_key: bool,
) -> Result<CertificateParams, Error> {
    if id.path().is_empty() {
        return Err(Error::Signing(format!(
            "{id} has no path and cannot name a workload"
        )));
    }
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![uri_san(id)?];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if rsa_key {
        p.key_usages.push(KeyUsagePurpose::KeyEncipherment);
    }
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.serial_number = Some(random_serial()?);
    p.use_authority_key_identifier_extension = true;
    p.not_before = to_offset(not_before);
    p.not_after = to_offset(not_after);
    Ok(p)
}

/// The CA server's own TLS certificate: DNS and IP SANs, serverAuth only.
///
/// # Errors
/// [`Error::Signing`] if a DNS name is not IA5 or the random source fails.
pub fn serving(
    dns_names: &[String],
    ips: &[IpAddr],
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, Error> {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    for name in dns_names {
        let name = Ia5String::try_from(name.as_str())
            .map_err(|e| Error::Signing(format!("DNS name {name:?}: {e}")))?;
        p.subject_alt_names.push(SanType::DnsName(name));
    }
    p.subject_alt_names
        .extend(ips.iter().copied().map(SanType::IpAddress));
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.serial_number = Some(random_serial()?);
    p.use_authority_key_identifier_extension = true;
    p.not_before = to_offset(not_before);
    p.not_after = to_offset(not_after);
    Ok(p)
}

/// A self-signed root for `td`: O=<td>, CN=workload-ca root, the trust
/// domain's SPIFFE ID (no path) as URI SAN, CA=true, keyCertSign + cRLSign.
///
/// # Errors
/// [`Error::Signing`] if the random source fails.
pub fn root(
    td: &TrustDomain,
    now: SystemTime,
    lifetime: Duration,
    backdate: Duration,
) -> Result<CertificateParams, Error> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, td.as_str());
    let serial = random_serial()?;
    // Each root's name is its own (the serial's first bytes): two roots
    // trusted side by side during a rotation must not share a subject, or
    // verifiers that look issuers up by name may try the wrong one.
    let tag = super::bundle::hex(&serial.as_ref()[..4]);
    dn.push(DnType::CommonName, format!("workload-ca root {tag}"));
    p.distinguished_name = dn;
    p.subject_alt_names = vec![uri_san(&td.id())?];
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.serial_number = Some(serial);
    p.not_before = to_offset(now.checked_sub(backdate).unwrap_or(now));
    p.not_after = to_offset(now + lifetime);
    Ok(p)
}
