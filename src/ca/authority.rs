//! The signing authority: validated CA material and the signing operations.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, Issuer, KeyPair, PublicKeyData, SubjectPublicKeyInfo};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::bundle::{self, Cert, TrustBundle, hex, parse_pem_certs};
use super::csr::CheckedCsr;
use super::keys::{KeyAlgorithm, PrivateKey};
use super::store::CaFiles;
use super::{Error, profile};
use crate::identity::{SpiffeId, TrustDomain};

/// How far NotBefore is set back, for clocks that run behind (Istio: 2 min).
pub const CLOCK_SKEW_BACKDATE: Duration = Duration::from_secs(120);

/// Leaf lifetimes: what `validity_duration <= 0` means, and the ceiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TtlPolicy {
    /// The lifetime of a leaf whose request asks for none.
    pub default_ttl: Duration,
    /// The longest lifetime a leaf may have.
    pub max_ttl: Duration,
}

impl Default for TtlPolicy {
    /// Istio's values: 24 hours by default, 90 days at most.
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

impl TtlPolicy {
    /// The lifetime for a request's `validity_duration` in seconds.
    ///
    /// # Errors
    /// [`Error::TtlTooLong`] above the maximum (as Istio: no silent clamp).
    pub fn resolve(&self, requested_secs: i64) -> Result<Duration, Error> {
        let Ok(secs) = u64::try_from(requested_secs) else {
            return Ok(self.default_ttl);
        };
        if secs == 0 {
            return Ok(self.default_ttl);
        }
        let ttl = Duration::from_secs(secs);
        if ttl > self.max_ttl {
            return Err(Error::TtlTooLong {
                requested: ttl,
                max: self.max_ttl,
            });
        }
        Ok(ttl)
    }

    /// As [`TtlPolicy::resolve`], then no longer than `cap`: a renewal with a
    /// client certificate is capped at that certificate's own lifetime, so
    /// renewing can never stretch a credential (a stolen 60-second
    /// certificate renews into 60-second certificates, never into 90-day
    /// ones). The cap shortens silently: the caller is entitled to a
    /// certificate, just not a longer-lived one.
    ///
    /// # Errors
    /// As [`TtlPolicy::resolve`].
    pub fn resolve_capped(
        &self,
        requested_secs: i64,
        cap: Option<Duration>,
    ) -> Result<Duration, Error> {
        let ttl = self.resolve(requested_secs)?;
        Ok(cap.map_or(ttl, |cap| ttl.min(cap.max(Duration::from_secs(1)))))
    }
}

/// A certificate we issued, with the chain to hand back.
#[derive(Clone, Debug)]
pub struct Issued {
    /// Leaf first, then the signer and intermediates (one PEM cert each),
    /// then the root bundle (possibly several roots) last.
    pub chain: Vec<String>,
    /// The leaf certificate, DER.
    pub leaf_der: Vec<u8>,
    /// The leaf's serial number, in lower-case hex.
    pub serial_hex: String,
    /// The leaf's NotAfter.
    pub not_after: SystemTime,
}

/// Validated CA material, ready to sign.
pub struct Authority {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    signer: Cert,
    /// The earliest NotAfter on the path signer -> intermediates -> root.
    path_not_after: SystemTime,
    /// What follows the leaf in every response.
    chain_tail: Vec<String>,
    roots: TrustBundle,
    /// A short fingerprint of the signing certificate: how the store, the
    /// operator and the logs name this authority.
    id: String,
    /// The material it was built from, for the store.
    files: CaFiles,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("id", &self.id)
            .field("trust_domain", &self.trust_domain)
            .field("path_not_after", &self.path_not_after)
            .field("roots", &self.roots.roots().len())
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Generates a self-signed root for `td` and returns it as CA files
    /// (`ca-cert.pem` = `root-cert.pem`, empty `cert-chain.pem`).
    ///
    /// # Errors
    /// [`Error::Key`] or [`Error::Signing`].
    pub fn generate_root(
        td: &TrustDomain,
        alg: KeyAlgorithm,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<CaFiles, Error> {
        let key = PrivateKey::generate(alg)?;
        let params = profile::root(td, now, lifetime, CLOCK_SKEW_BACKDATE)?;
        let cert = params
            .self_signed(key.key_pair())
            .map_err(|e| Error::Signing(format!("self-signing the root failed: {e}")))?;
        let pem = cert.pem();
        Ok(CaFiles {
            ca_cert: pem.clone(),
            ca_key: key.to_pem(),
            cert_chain: String::new(),
            root_cert: pem,
        })
    }

    /// Validates CA files (embedded or plugged-in) and builds the authority.
    ///
    /// Refused, each with [`Error::Material`] naming the problem: a key that
    /// does not match `ca-cert.pem`; a signing cert that is not a CA (no
    /// basicConstraints CA=true, or a keyUsage without keyCertSign); one that
    /// is expired or not yet valid; one whose SPIFFE ID has a path or another
    /// trust domain; a root that is not a self-signed CA; a chain from the
    /// signer through `cert-chain.pem` that does not verify to a root; a
    /// signer whose name rcgen cannot reproduce byte for byte (checked by
    /// signing a throw-away leaf).
    ///
    /// # Errors
    /// [`Error::Material`], [`Error::Cert`], [`Error::Key`].
    pub fn from_files(files: &CaFiles, td: &TrustDomain, now: SystemTime) -> Result<Self, Error> {
        Self::build(files, td, now, true)
    }

    /// As [`Authority::from_files`], without the validity-period checks:
    /// for an authority already in the set that no longer signs (retiring,
    /// or prepared), which may expire there and must not stop the CA from
    /// starting (it can still be retired). Nothing signs with it unless it
    /// is valid ([`crate::ca::AuthoritySet::activate`] checks).
    ///
    /// # Errors
    /// As [`Authority::from_files`], but for expiry.
    pub fn from_files_any_time(
        files: &CaFiles,
        td: &TrustDomain,
        now: SystemTime,
    ) -> Result<Self, Error> {
        Self::build(files, td, now, false)
    }

    fn build(
        files: &CaFiles,
        td: &TrustDomain,
        now: SystemTime,
        timely: bool,
    ) -> Result<Self, Error> {
        let check_validity = |cert: &X509Certificate<'_>, now| {
            if timely {
                check_validity(cert, now)
            } else {
                Ok(())
            }
        };
        let signer = single_cert(&files.ca_cert, "ca-cert.pem")?;
        let key = PrivateKey::from_pem(&files.ca_key)
            .map_err(|e| Error::Material(format!("ca-key.pem: {e}")))?;
        let roots = parse_pem_certs(&files.root_cert)
            .map_err(|e| Error::Material(format!("root-cert.pem: {e}")))?;
        let roots = TrustBundle::new(roots)
            .map_err(|_| Error::Material("root-cert.pem holds no certificate".into()))?;
        let chain = parse_pem_certs(&files.cert_chain)
            .map_err(|e| Error::Material(format!("cert-chain.pem: {e}")))?;

        let parsed = signer.parsed()?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(Error::Material(
                "ca-key.pem does not match the public key of ca-cert.pem".into(),
            ));
        }
        check_is_ca(&parsed).map_err(|m| Error::Material(format!("ca-cert.pem {m}")))?;
        check_validity(&parsed, now).map_err(|m| Error::Material(format!("ca-cert.pem {m}")))?;
        check_ca_spiffe_id(&parsed, td)?;
        for (i, root) in roots.roots().iter().enumerate() {
            let r = root.parsed()?;
            check_is_ca(&r)
                .map_err(|m| Error::Material(format!("root {i} in root-cert.pem {m}")))?;
            verify_issued_by(&r, &r).map_err(|m| {
                Error::Material(format!("root {i} in root-cert.pem is not self-signed: {m}"))
            })?;
        }

        // Intermediates: cert-chain.pem without the signer and the roots.
        let intermediates: Vec<&Cert> = chain
            .iter()
            .filter(|c| c.der() != signer.der() && !roots.contains(c.der()))
            .collect();
        // Walk signer -> intermediates -> a root; every certificate on the
        // path must be a valid CA now, and no leaf may outlive any of them.
        let mut path_not_after = bundle::not_after(&parsed);
        let mut current = parsed;
        for (i, next) in intermediates.iter().enumerate() {
            let n = next.parsed()?;
            let name = format!("intermediate {i} in cert-chain.pem");
            check_is_ca(&n).map_err(|m| Error::Material(format!("{name} {m}")))?;
            check_validity(&n, now).map_err(|m| Error::Material(format!("{name} {m}")))?;
            verify_issued_by(&current, &n).map_err(|m| {
                Error::Material(format!(
                    "cert-chain.pem does not chain at intermediate {i}: {m}"
                ))
            })?;
            path_not_after = path_not_after.min(bundle::not_after(&n));
            current = n;
        }
        let anchor = roots
            .roots()
            .iter()
            .filter_map(|r| r.parsed().ok())
            .find(|r| verify_issued_by(&current, r).is_ok())
            .ok_or_else(|| Error::Material(
                "the chain from ca-cert.pem through cert-chain.pem does not verify to any certificate in root-cert.pem".into(),
            ))?;
        check_validity(&anchor, now)
            .map_err(|m| Error::Material(format!("the root that ca-cert.pem chains to {m}")))?;
        path_not_after = path_not_after.min(bundle::not_after(&anchor));

        let signer_is_root = roots.contains(signer.der());
        let mut chain_tail: Vec<String> = Vec::new();
        if !signer_is_root {
            chain_tail.push(signer.pem().to_owned());
        }
        chain_tail.extend(intermediates.iter().map(|c| c.pem().to_owned()));
        chain_tail.push(roots.pem());

        let issuer = Issuer::from_ca_cert_der(&signer.der().to_vec().into(), key.into_key_pair())
            .map_err(|e| {
            Error::Material(format!("ca-cert.pem cannot be used as an issuer: {e}"))
        })?;
        let id = authority_id(signer.der());
        let authority = Self {
            trust_domain: td.clone(),
            issuer,
            signer,
            path_not_after,
            chain_tail,
            roots,
            id,
            files: files.clone(),
        };
        authority.self_test(now)?;
        Ok(authority)
    }

    /// Signs a throw-away leaf and checks it chains to the signer, so a CA
    /// that would issue broken certificates is refused at start.
    fn self_test(&self, now: SystemTime) -> Result<(), Error> {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
        let id = SpiffeId::parse(&format!("spiffe://{}/self-test", self.trust_domain))
            .map_err(|e| Error::Signing(e.to_string()))?;
        let params = profile::leaf(&id, now, now + Duration::from_secs(60), false)?;
        let der = self.sign_params(&params, key.key_pair())?;
        let leaf = Cert::from_der(der)?;
        verify_issued_by(&leaf.parsed()?, &self.signer.parsed()?).map_err(|m| {
            Error::Material(format!(
                "a test leaf signed with this CA does not chain to ca-cert.pem: {m}"
            ))
        })
    }

    fn sign_params(
        &self,
        params: &CertificateParams,
        public_key: &impl PublicKeyData,
    ) -> Result<Vec<u8>, Error> {
        params
            .signed_by(public_key, &self.issuer)
            .map(|c| c.der().to_vec())
            .map_err(|e| Error::Signing(e.to_string()))
    }

    /// Signs a workload leaf for `caller` with the CSR's public key.
    ///
    /// The lifetime is `ttl`, cut short at [`Authority::chain_not_after`]; NotBefore is
    /// `now` less [`CLOCK_SKEW_BACKDATE`].
    ///
    /// # Errors
    /// [`Error::IdentityMismatch`] if the CSR names a URI SAN other than
    /// `caller`; [`Error::WrongTrustDomain`] if `caller` is outside this CA's
    /// trust domain; [`Error::SignerExpired`]; [`Error::Signing`].
    pub fn sign_leaf(
        &self,
        csr: &CheckedCsr,
        caller: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Issued, Error> {
        if caller.trust_domain() != self.trust_domain {
            return Err(Error::WrongTrustDomain {
                id: caller.to_string(),
                expected: self.trust_domain.to_string(),
            });
        }
        if let Some(other) = csr
            .requested_uris()
            .iter()
            .find(|u| u.as_str() != caller.as_str())
        {
            return Err(Error::IdentityMismatch {
                requested: other.clone(),
                allowed: caller.to_string(),
            });
        }
        let not_after = self.not_after_for(ttl, now)?;
        let params = profile::leaf(
            caller,
            now.checked_sub(CLOCK_SKEW_BACKDATE).unwrap_or(now),
            not_after,
            csr.key_kind().is_rsa(),
        )?;
        let spki = SubjectPublicKeyInfo::from_der(csr.spki_der())
            .map_err(|e| Error::CsrKeyType(format!("public key not usable: {e}")))?;
        self.finish(&params, &spki, not_after)
    }

    /// Signs the server's own TLS certificate for `key`.
    ///
    /// # Errors
    /// [`Error::SignerExpired`], [`Error::Signing`].
    pub fn sign_serving(
        &self,
        key: &PrivateKey,
        dns_names: &[String],
        ips: &[IpAddr],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Issued, Error> {
        let not_after = self.not_after_for(ttl, now)?;
        let params = profile::serving(
            dns_names,
            ips,
            now.checked_sub(CLOCK_SKEW_BACKDATE).unwrap_or(now),
            not_after,
        )?;
        self.finish(&params, key.key_pair(), not_after)
    }

    fn not_after_for(&self, ttl: Duration, now: SystemTime) -> Result<SystemTime, Error> {
        if now >= self.path_not_after {
            return Err(Error::SignerExpired);
        }
        Ok(now
            .checked_add(ttl)
            .map_or(self.path_not_after, |t| t.min(self.path_not_after)))
    }

    fn finish(
        &self,
        params: &CertificateParams,
        key: &impl PublicKeyData,
        not_after: SystemTime,
    ) -> Result<Issued, Error> {
        let leaf_der = self.sign_params(params, key)?;
        let serial_hex = params
            .serial_number
            .as_ref()
            .map(|s| hex(s.as_ref()))
            .unwrap_or_default();
        let mut chain = Vec::with_capacity(self.chain_tail.len() + 1);
        chain.push(bundle::to_pem("CERTIFICATE", &leaf_der));
        chain.extend(self.chain_tail.iter().cloned());
        Ok(Issued {
            chain,
            leaf_der,
            serial_hex,
            not_after,
        })
    }

    /// The trust domain it issues identities in.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The roots it chains to.
    pub fn roots(&self) -> &TrustBundle {
        &self.roots
    }

    /// The first 16 hex digits of the SHA-256 of the signing certificate.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The material this authority was built from (for the store).
    pub fn files(&self) -> &CaFiles {
        &self.files
    }

    /// The SHA-256 fingerprint of the signing certificate, in hex.
    pub fn fingerprint(&self) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, self.signer.der()).as_ref())
    }

    /// NotBefore of the signing certificate.
    pub fn not_before(&self) -> Option<SystemTime> {
        let parsed = self.signer.parsed().ok()?;
        Some(bundle::time_from_unix(
            parsed.validity().not_before.timestamp(),
        ))
    }

    /// The signing certificate (the root itself for a self-signed CA).
    pub fn signer(&self) -> &Cert {
        &self.signer
    }

    /// The earliest NotAfter among the signer, its intermediates and the
    /// root it chains to: no leaf outlives it.
    pub fn chain_not_after(&self) -> SystemTime {
        self.path_not_after
    }
}

/// How an authority is named: the first 16 hex digits of the SHA-256 of
/// its signing certificate.
pub fn authority_id(signer_der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, signer_der);
    hex(digest.as_ref().get(..8).unwrap_or_default())
}

fn single_cert(text: &str, name: &str) -> Result<Cert, Error> {
    let mut certs = parse_pem_certs(text).map_err(|e| Error::Material(format!("{name}: {e}")))?;
    match certs.len() {
        1 => Ok(certs.remove(0)),
        n => Err(Error::Material(format!(
            "{name} must hold exactly one certificate, found {n}"
        ))),
    }
}

fn check_is_ca(cert: &X509Certificate<'_>) -> Result<(), String> {
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        _ => return Err("is not a CA certificate (basicConstraints CA=true missing)".into()),
    }
    match cert.key_usage() {
        Ok(Some(ku)) if ku.value.key_cert_sign() => Ok(()),
        Ok(Some(_)) => Err("has a keyUsage without keyCertSign".into()),
        Ok(None) => Err("has no keyUsage extension (a CA certificate needs keyCertSign)".into()),
        Err(e) => Err(format!("has a malformed keyUsage: {e}")),
    }
}

fn check_validity(cert: &X509Certificate<'_>, now: SystemTime) -> Result<(), String> {
    let v = cert.validity();
    if now < bundle::time_from_unix(v.not_before.timestamp()) {
        return Err(format!("is not valid before {}", v.not_before));
    }
    if now >= bundle::time_from_unix(v.not_after.timestamp()) {
        return Err(format!("expired at {}", v.not_after));
    }
    Ok(())
}

fn check_ca_spiffe_id(cert: &X509Certificate<'_>, td: &TrustDomain) -> Result<(), Error> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Ok(());
    };
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            let id = SpiffeId::parse(uri)
                .map_err(|e| Error::Material(format!("ca-cert.pem URI SAN {uri:?}: {e}")))?;
            if !id.path().is_empty() || &id.trust_domain() != td {
                return Err(Error::Material(format!(
                    "ca-cert.pem carries SPIFFE ID {id}; a signing certificate may only carry spiffe://{td}"
                )));
            }
        }
    }
    Ok(())
}

/// Checks that `child` names `parent` as issuer and carries its signature.
fn verify_issued_by(
    child: &X509Certificate<'_>,
    parent: &X509Certificate<'_>,
) -> Result<(), String> {
    if child.issuer().as_raw() != parent.subject().as_raw() {
        return Err(format!(
            "issuer \"{}\" is not \"{}\"",
            child.issuer(),
            parent.subject()
        ));
    }
    child
        .verify_signature(Some(parent.public_key()))
        .map_err(|e| format!("signature does not verify: {e}"))
}
