use std::time::{Duration, SystemTime};

use super::*;
use crate::ca::testing::authority;

fn spec() -> ServingSecret {
    "istio-system/istiod-tls=istiod.istio-system.svc,istiod.istio-system.svc.cluster.local"
        .parse()
        .unwrap()
}

/// A Secret as the controller writes it, signed by `set`'s active
/// authority, for `ttl`.
fn written(set: &AuthoritySet, spec: &ServingSecret, ttl: Duration, now: SystemTime) -> Secret {
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let issued = set
        .active()
        .sign_serving(&key, &spec.dns_names, &[], ttl, now)
        .unwrap();
    let crt = issued.chain[..issued.chain.len() - 1].concat();
    Secret {
        metadata: ObjectMeta {
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_owned(),
                MANAGED_BY.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some(TLS_TYPE.into()),
        data: Some(
            [
                ("tls.crt", crt.into_bytes()),
                ("tls.key", key.to_pem().as_bytes().to_vec()),
                ("ca.crt", set.bundle_pem().as_bytes().to_vec()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), ByteString(v)))
            .collect(),
        ),
        ..Secret::default()
    }
}

fn set_data(s: &mut Secret, key: &str, value: &[u8]) {
    s.data
        .as_mut()
        .unwrap()
        .insert(key.into(), ByteString(value.to_vec()));
}

#[test]
fn specs_parse_and_bad_ones_are_refused() {
    let s = spec();
    assert_eq!(
        (s.namespace.as_str(), s.name.as_str()),
        ("istio-system", "istiod-tls")
    );
    assert_eq!(s.dns_names.len(), 2);
    for bad in [
        "istiod-tls=istiod.svc",
        "ns/name",
        "ns/name=",
        "/name=a",
        "ns/Name=a",
        "ns/name=a b",
        "ns/name=a,UPPER",
    ] {
        assert!(bad.parse::<ServingSecret>().is_err(), "{bad}");
    }
}

#[test]
fn only_our_current_secret_is_left_as_it_is() {
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let set = AuthoritySet::single_since(authority("cluster.local", 86_400 * 365), now).unwrap();
    let spec = spec();
    let good = written(&set, &spec, day, now);
    assert_eq!(judge(&spec, Some(&good), &set, now), Verdict::Current);
    assert_eq!(judge(&spec, None, &set, now), Verdict::Missing);

    let mut foreign = good.clone();
    foreign.metadata.labels = None;
    assert_eq!(judge(&spec, Some(&foreign), &set, now), Verdict::Foreign);

    // Past half its life: renewed.
    assert_eq!(
        judge(
            &spec,
            Some(&good),
            &set,
            now + day / 2 + Duration::from_secs(1)
        ),
        Verdict::Stale("past half its life")
    );
    // Edited: another key, other names, another bundle, junk, wrong type.
    let mut other_key = good.clone();
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    set_data(&mut other_key, "tls.key", key.to_pem().as_bytes());
    assert_eq!(
        judge(&spec, Some(&other_key), &set, now),
        Verdict::Stale("key and certificate are not a pair")
    );
    let narrower = ServingSecret {
        dns_names: vec!["istiod.istio-system.svc".into()],
        ..spec.clone()
    };
    assert_eq!(
        judge(&narrower, Some(&good), &set, now),
        Verdict::Stale("other DNS names")
    );
    let mut bundle = good.clone();
    set_data(&mut bundle, "ca.crt", b"-----BEGIN CERTIFICATE-----\n");
    assert_eq!(
        judge(&spec, Some(&bundle), &set, now),
        Verdict::Stale("another bundle")
    );
    let mut junk = good.clone();
    set_data(&mut junk, "tls.crt", b"junk");
    assert!(matches!(
        judge(&spec, Some(&junk), &set, now),
        Verdict::Stale(_)
    ));
    let mut typed = good.clone();
    typed.type_ = Some("Opaque".into());
    assert_eq!(
        judge(&spec, Some(&typed), &set, now),
        Verdict::Stale("wrong type")
    );

    // A certificate of another authority (say, before activation).
    let other = AuthoritySet::single_since(authority("cluster.local", 86_400 * 365), now).unwrap();
    let mut stranger = written(&other, &spec, day, now);
    set_data(&mut stranger, "ca.crt", set.bundle_pem().as_bytes());
    assert_eq!(
        judge(&spec, Some(&stranger), &set, now),
        Verdict::Stale("not from the active authority, or expired")
    );
}

#[test]
fn a_new_bundle_makes_it_stale_and_activation_makes_its_leaf_stale() {
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let set = AuthoritySet::single_since(authority("cluster.local", 86_400 * 365), now).unwrap();
    let spec = spec();
    let good = written(&set, &spec, day, now);
    let prepared = set
        .prepare(authority("cluster.local", 86_400 * 365), now)
        .unwrap();
    assert_eq!(
        judge(&spec, Some(&good), &prepared, now),
        Verdict::Stale("another bundle")
    );
    let mut rebundled = good.clone();
    set_data(&mut rebundled, "ca.crt", prepared.bundle_pem().as_bytes());
    assert_eq!(
        judge(&spec, Some(&rebundled), &prepared, now),
        Verdict::Current
    );
    let active = prepared.activate(now).unwrap();
    let mut same_bundle = good;
    set_data(&mut same_bundle, "ca.crt", active.bundle_pem().as_bytes());
    assert_eq!(
        judge(&spec, Some(&same_bundle), &active, now),
        Verdict::Stale("not from the active authority, or expired")
    );
}
