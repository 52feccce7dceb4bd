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

/// `t` as a certificate time: an error, not a panic, for a time X.509 cannot
/// express (years 0 to 9999 only), as a wildly wrong clock could give.
pub(crate) fn to_offset(t: SystemTime) -> Result<OffsetDateTime, Error> {
    let out_of_range = || {
        Error::Signing(format!(
            "the time {t:?} cannot be written in a certificate (years 0 to 9999)"
        ))
    };
    let at = match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => time::Duration::try_from(d)
            .ok()
            .and_then(|d| OffsetDateTime::UNIX_EPOCH.checked_add(d)),
        Err(e) => time::Duration::try_from(e.duration())
            .ok()
            .and_then(|d| OffsetDateTime::UNIX_EPOCH.checked_sub(d)),
    }
    .ok_or_else(out_of_range)?;
    if !(0..=9999).contains(&at.year()) {
        return Err(out_of_range());
    }
    Ok(at)
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
    p.not_before = to_offset(not_before)?;
    p.not_after = to_offset(not_after)?;
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
    p.not_before = to_offset(not_before)?;
    p.not_after = to_offset(not_after)?;
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
    let tag = super::bundle::hex(serial.as_ref().get(..4).unwrap_or_default());
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
    p.not_before = to_offset(now.checked_sub(backdate).unwrap_or(now))?;
    p.not_after = to_offset(now.checked_add(lifetime).ok_or_else(|| {
        Error::Signing("the certificate's end is past what a clock can hold".into())
    })?)?;
    Ok(p)
}

#[cfg(test)]
mod time_tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::to_offset;
    use crate::ca::{Authority, KeyAlgorithm};
    use crate::identity::TrustDomain;

    const YEAR: u64 = 365 * 24 * 3600;

    #[test]
    fn a_time_x509_cannot_write_is_an_error_not_a_panic() {
        assert_eq!(to_offset(UNIX_EPOCH).unwrap().year(), 1970);
        let late = UNIX_EPOCH + Duration::from_secs(9000 * YEAR);
        assert!(to_offset(late).is_err());
        let early = UNIX_EPOCH - Duration::from_secs(3300 * YEAR);
        assert!(to_offset(early).is_err());

        // The whole path: an authority loaded (self-tested) under such a
        // clock refuses instead of panicking in the certificate writer.
        let td = TrustDomain::new("cluster.local").unwrap();
        let files = Authority::generate_root(
            &td,
            KeyAlgorithm::EcdsaP256,
            Duration::from_secs(YEAR),
            SystemTime::now(),
        )
        .unwrap();
        for now in [late, early] {
            assert!(Authority::from_files_any_time(&files, &td, now).is_err());
        }
    }
}
