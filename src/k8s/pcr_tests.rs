//! The signer's pure decisions: which answer, which reason, which lifetime.

use std::time::{Duration, SystemTime};

use super::*;
use crate::ca::CLOCK_SKEW_BACKDATE;

const HOUR: Duration = Duration::from_secs(3600);

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn ctx(chain_left: Duration, now: SystemTime) -> Context {
    Context {
        trust_domain: td(),
        ttl: TtlPolicy::default(),
        chain_not_after: now + chain_left,
    }
}

fn stub_for(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn request(stub: Vec<u8>) -> Request {
    Request {
        namespace: "shop".into(),
        name: "web-0-abcde".into(),
        service_account: "web".into(),
        signer_name: DEFAULT_SIGNER_NAME.into(),
        max_expiration_seconds: Some(86_400),
        stub_csr: stub,
        ..Request::default()
    }
}

/// A P-521 public key (SubjectPublicKeyInfo, DER), made by hand: ring
/// cannot make one, and the decision reads only the algorithm.
fn p521_spki() -> Vec<u8> {
    let mut point = vec![0x04];
    point.extend(std::iter::repeat_n(0x11, 132));
    let alg = [
        0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81,
        0x04, 0x00, 0x23,
    ];
    let mut bits = vec![0x03, 0x81, (point.len() + 1) as u8, 0x00];
    bits.extend(point);
    let body: Vec<u8> = alg.iter().copied().chain(bits).collect();
    let mut out = vec![0x30, 0x81, body.len() as u8];
    out.extend(body);
    out
}

#[test]
fn issues_the_service_accounts_identity() {
    let now = SystemTime::now();
    match decide(
        &request(stub_for(&rcgen::PKCS_ECDSA_P256_SHA256)),
        &ctx(365 * 24 * HOUR, now),
        now,
    ) {
        Decision::Issue { id, ttl, .. } => {
            assert_eq!(id.as_str(), "spiffe://cluster.local/ns/shop/sa/web");
            // 24 h from the backdated NotBefore.
            assert_eq!(ttl + CLOCK_SKEW_BACKDATE, 24 * HOUR);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn legacy_requests_use_the_pkix_key() {
    let now = SystemTime::now();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut r = request(Vec::new());
    r.pkix_public_key = rcgen::PublicKeyData::subject_public_key_info(&key);
    assert!(matches!(
        decide(&r, &ctx(365 * 24 * HOUR, now), now),
        Decision::Issue { .. }
    ));
    r.pkix_public_key.clear();
    match decide(&r, &ctx(365 * 24 * HOUR, now), now) {
        Decision::Fail { reason, .. } => assert_eq!(reason, "NoPublicKey"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unsupported_keys_are_denied_with_a_suggestion() {
    let now = SystemTime::now();
    let mut r = request(Vec::new());
    r.pkix_public_key = p521_spki();
    match decide(&r, &ctx(365 * 24 * HOUR, now), now) {
        Decision::Deny { reason, message } => {
            assert_eq!(reason, "UnsupportedKeyType");
            assert!(message.contains("use keyType ECDSAP256"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn any_user_annotation_is_denied_first() {
    let now = SystemTime::now();
    let mut r = request(Vec::new());
    r.pkix_public_key = p521_spki();
    r.user_annotation_keys = vec!["example.com/flavour".into()];
    match decide(&r, &ctx(365 * 24 * HOUR, now), now) {
        Decision::Deny { reason, .. } => assert_eq!(reason, "InvalidUnverifiedUserAnnotations"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_invalid_identity_is_denied() {
    let now = SystemTime::now();
    let mut r = request(stub_for(&rcgen::PKCS_ECDSA_P256_SHA256));
    r.service_account = "".into();
    match decide(&r, &ctx(365 * 24 * HOUR, now), now) {
        Decision::Deny { reason, .. } => assert_eq!(reason, "InvalidIdentity"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn lifetime_math() {
    let now = SystemTime::now();
    let ttl = TtlPolicy {
        default_ttl: 24 * HOUR,
        max_ttl: 48 * HOUR,
    };
    let long = now + 1000 * HOUR;
    // As asked, counted from the backdated NotBefore.
    assert_eq!(
        lifetime(Some(7200), &ttl, long, now).unwrap(),
        2 * HOUR - CLOCK_SKEW_BACKDATE
    );
    // Capped at the server's max TTL.
    assert_eq!(
        lifetime(Some(7_862_400), &ttl, long, now).unwrap(),
        48 * HOUR - CLOCK_SKEW_BACKDATE
    );
    // Defaulted request (86400).
    assert_eq!(
        lifetime(None, &ttl, long, now).unwrap(),
        24 * HOUR - CLOCK_SKEW_BACKDATE
    );
    // Cut at the chain's end, still over an hour.
    assert_eq!(
        lifetime(Some(86_400), &ttl, now + 2 * HOUR, now).unwrap(),
        2 * HOUR
    );
    // The chain ends within the hour: Failed.
    let (reason, _) = lifetime(Some(86_400), &ttl, now + HOUR / 2, now).unwrap_err();
    assert_eq!(reason, "CAChainEndsTooSoon");
    // Exactly an hour from NotBefore is enough.
    let exact = now - CLOCK_SKEW_BACKDATE + HOUR;
    assert!(lifetime(Some(86_400), &ttl, exact, now).is_ok());
    assert!(lifetime(Some(86_400), &ttl, exact - Duration::from_secs(1), now).is_err());
}

#[test]
fn refresh_at_the_fraction_within_the_margins() {
    let nb = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    assert_eq!(begin_refresh_at(nb, nb + 24 * HOUR, 0.5), nb + 12 * HOUR);
    assert_eq!(
        begin_refresh_at(nb, nb + HOUR, 0.01),
        nb + Duration::from_secs(600),
        "at least ten minutes after NotBefore"
    );
    assert_eq!(
        begin_refresh_at(nb, nb + HOUR, 0.99),
        nb + HOUR - Duration::from_secs(600),
        "at least ten minutes before NotAfter"
    );
}
