//! Issuance: whatever the CSR (raw bytes, or a request rcgen builds from the
//! input for a P-256, P-384, Ed25519 or RSA 2048/3072/4096 key, asking for
//! any subject, SANs, CA=true, key usages and extensions, then possibly
//! mutated), a certificate issued through `check_csr` and
//! `AuthoritySet::sign_leaf` names exactly the caller, carries exactly the
//! CSR's key and is never a CA (`props/issuance.rs`). A well-formed request
//! that names no other identity is always issued.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use workload_ca::ca::csr::{KeyKind, MAX_CSR_BYTES};
use workload_ca::ca::{Authority, AuthoritySet, KeyAlgorithm};
use workload_ca::identity::{SpiffeId, TrustDomain};

#[path = "../props/issuance.rs"]
mod issuance;
#[path = "../props/keys.rs"]
mod keys;
use issuance::Outcome;

struct Fixture {
    set: AuthoritySet,
    now: SystemTime,
    callers: Vec<SpiffeId>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let td = TrustDomain::new("fuzz.test").unwrap();
        let now = SystemTime::now();
        let files = Authority::generate_root(
            &td,
            KeyAlgorithm::EcdsaP256,
            Duration::from_secs(86_400 * 365),
            now,
        )
        .unwrap();
        let set = AuthoritySet::single_since(Authority::from_files(&files, &td, now).unwrap(), now)
            .unwrap();
        let callers = [
            "spiffe://fuzz.test/ns/default/sa/web",
            "spiffe://fuzz.test/ns/kube-system/sa/admin",
            "spiffe://other.test/ns/default/sa/web",
        ]
        .iter()
        .map(|s| SpiffeId::parse(s).unwrap())
        .collect();
        Fixture { set, now, callers }
    })
}

/// RSA keys are slow to make (and to parse): one of each size per process,
/// on first use.
fn rsa(bits: usize) -> &'static KeyPair {
    static KEYS: [OnceLock<KeyPair>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let slot = match bits {
        2048 => &KEYS[0],
        3072 => &KEYS[1],
        _ => &KEYS[2],
    };
    slot.get_or_init(|| {
        KeyPair::from_pkcs8_pem_and_sign_algo(&keys::rsa_pem(bits), &rcgen::PKCS_RSA_SHA256)
            .unwrap()
    })
}

fn ascii(u: &mut Unstructured<'_>, max: usize) -> Result<String> {
    let n = u.int_in_range(0..=max)?;
    let mut s = String::with_capacity(n);
    for _ in 0..n {
        s.push(char::from(u.int_in_range(0x21u8..=0x7e)?));
    }
    Ok(s)
}

fn alnum(u: &mut Unstructured<'_>, max: usize) -> Result<String> {
    let chars = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let n = u.int_in_range(1..=max)?;
    (0..n)
        .map(|_| u.choose(chars).map(|c| char::from(*c)))
        .collect()
}

/// A CSR from the input: (bytes, key's SPKI when unmutated, names only
/// the caller, well-formed).
fn structured(
    u: &mut Unstructured<'_>,
    caller: &SpiffeId,
) -> Result<Option<(Vec<u8>, Option<Vec<u8>>, bool)>> {
    let fresh;
    let key: &KeyPair = match u.int_in_range(0..=5u8)? {
        0 => {
            fresh = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            &fresh
        }
        1 => {
            fresh = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
            &fresh
        }
        2 => {
            fresh = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
            &fresh
        }
        3 => rsa(2048),
        4 => rsa(3072),
        _ => rsa(4096),
    };
    let mut p = CertificateParams::default();
    for _ in 0..u.int_in_range(0..=4)? {
        let ty = match u.int_in_range(0..=4u8)? {
            0 => DnType::CommonName,
            1 => DnType::OrganizationName,
            2 => DnType::OrganizationalUnitName,
            3 => DnType::LocalityName,
            _ => DnType::CustomDnType(vec![0, 9, 2342, 19_200_300, 100, 1, 1]),
        };
        p.distinguished_name.push(ty, alnum(u, 32)?);
    }
    let mut only_caller = true;
    for _ in 0..u.int_in_range(0..=4)? {
        let san = match u.int_in_range(0..=6u8)? {
            0 => SanType::URI(Ia5String::try_from(caller.as_str()).unwrap()),
            1 => {
                only_caller = false;
                SanType::URI(
                    Ia5String::try_from("spiffe://fuzz.test/ns/kube-system/sa/admin").unwrap(),
                )
            }
            2 => {
                let s = ascii(u, 64)?;
                only_caller &= s == caller.as_str();
                SanType::URI(Ia5String::try_from(s).unwrap())
            }
            3 => {
                SanType::DnsName(Ia5String::try_from(format!("{}.example", alnum(u, 20)?)).unwrap())
            }
            4 => SanType::IpAddress(IpAddr::V4(Ipv4Addr::from(u.arbitrary::<u32>()?))),
            5 => SanType::Rfc822Name(
                Ia5String::try_from(format!("{}@example.com", alnum(u, 20)?)).unwrap(),
            ),
            _ => SanType::DnsName(Ia5String::try_from("*.fuzz.test").unwrap()),
        };
        p.subject_alt_names.push(san);
    }
    p.is_ca = match u.int_in_range(0..=3u8)? {
        0 => IsCa::NoCa,
        1 => IsCa::ExplicitNoCa,
        2 => IsCa::Ca(BasicConstraints::Unconstrained),
        _ => IsCa::Ca(BasicConstraints::Constrained(u.arbitrary()?)),
    };
    for ku in [
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::KeyEncipherment,
    ] {
        if u.arbitrary()? {
            p.key_usages.push(ku);
        }
    }
    for eku in [
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::CodeSigning,
        ExtendedKeyUsagePurpose::Any,
    ] {
        if u.arbitrary()? {
            p.extended_key_usages.push(eku);
        }
    }
    if u.arbitrary()? {
        let content: Vec<u8> = u.arbitrary()?;
        let mut ext = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99_999, 1], content);
        ext.set_criticality(u.arbitrary()?);
        p.custom_extensions.push(ext);
    }
    let Ok(csr) = p.serialize_request(key) else {
        return Ok(None);
    };
    let mut bytes = if u.arbitrary()? {
        csr.pem().unwrap().into_bytes()
    } else {
        csr.der().to_vec()
    };
    let mut spki = Some(key.subject_public_key_info());
    if u.ratio(1, 4)? {
        let at = u.int_in_range(0..=bytes.len() - 1)?;
        bytes[at] = u.arbitrary()?;
        spki = None;
    }
    let clean = spki.is_some();
    Ok(Some((bytes, spki, only_caller && clean)))
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    if data.is_empty() {
        return;
    }
    // Raw CSR bytes (the seeds: PEM or DER) as they come.
    if data[0] == b'-' || data[0] == 0x30 {
        let caller = &f.callers[0];
        issuance::issue_and_check(&f.set, data, caller, None, f.now)
            .unwrap_or_else(|e| panic!("{e}"));
        if let Ok(csr) = workload_ca::ca::check_csr(data) {
            assert!(data.len() <= MAX_CSR_BYTES);
            assert!(matches!(
                csr.key_kind(),
                KeyKind::EcdsaP256
                    | KeyKind::EcdsaP384
                    | KeyKind::Ed25519
                    | KeyKind::Rsa(2048..=4096)
            ));
        }
        return;
    }
    let mut u = Unstructured::new(&data[1..]);
    let caller = &f.callers[usize::from(data[0]) % f.callers.len()];
    let Ok(Some((csr, spki, should_issue))) = structured(&mut u, caller) else {
        return;
    };
    let outcome = issuance::issue_and_check(&f.set, &csr, caller, spki.as_deref(), f.now)
        .unwrap_or_else(|e| panic!("{e}"));
    let ours = caller.trust_domain() == *f.set.trust_domain();
    if should_issue && ours {
        assert_eq!(
            outcome,
            Outcome::Issued,
            "a well-formed CSR naming only {caller} was refused"
        );
    }
    if !ours {
        assert_ne!(
            outcome,
            Outcome::Issued,
            "issued for {caller}, outside the CA's trust domain"
        );
    }
});
