//! The verdict on a secret-mode Secret: sound, foreign, and every way of
//! tampering with one.

use std::time::{Duration, SystemTime};

use super::*;
use crate::ca::testing::authority;
use crate::identity::TrustDomain;

const TD: &str = "cluster.local";

fn account() -> Account {
    Account {
        name: Arc::from("web"),
        uid: Arc::from("sa-uid-1"),
    }
}

fn key() -> Key {
    (Arc::from("prod"), Arc::from("istio.web"))
}

/// A Secret for prod/web signed by `set`, as the controller writes it.
fn written(set: &AuthoritySet, sa: &str, now: SystemTime) -> Secret {
    let td = TrustDomain::new(TD).unwrap();
    let id = SpiffeId::for_service_account(&td, "prod", sa).unwrap();
    let k = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let checked = crate::ca::check_public_key(&k.spki_der()).unwrap();
    let issued = set
        .sign_leaf(&checked, &id, Duration::from_secs(3600), now)
        .unwrap();
    let chain = issued.chain[..issued.chain.len() - 1].concat();
    let mut s = build(
        &key(),
        &account(),
        &k.to_pem(),
        chain,
        set.bundle_pem(),
        None,
    );
    s.metadata.uid = Some("secret-uid".into());
    s.metadata.resource_version = Some("10".into());
    s
}

fn verdict(secret: &Secret, set: &AuthoritySet, now: SystemTime) -> Judgement {
    let (k, seen) = examine(secret, now).expect("an istio.<sa> Secret");
    assert_eq!(k, key());
    judge_facts(
        &seen.facts,
        "prod",
        &account(),
        &TrustDomain::new(TD).unwrap(),
        &digest(set.bundle_pem().as_bytes()),
        set.active().id(),
        0.5,
        now,
    )
}

fn set_data(s: &mut Secret, k: &str, v: &str) {
    s.data
        .as_mut()
        .unwrap()
        .insert(k.into(), ByteString(v.as_bytes().to_vec()));
}

#[test]
fn a_sound_secret_is_current_until_half_its_life() {
    let now = SystemTime::now();
    let set = AuthoritySet::single_since(authority(TD, 86_400), now).unwrap();
    let s = written(&set, "web", now);
    let Judgement::Current {
        refresh_at: Some(at),
    } = verdict(&s, &set, now)
    else {
        panic!("{:?}", verdict(&s, &set, now));
    };
    // 1 h leaf, backdated by the clock-skew allowance: refreshed about
    // half an hour in.
    let half = now + Duration::from_secs(1800);
    assert!(
        at <= half && at + Duration::from_secs(120) >= half,
        "{at:?}"
    );
    assert_eq!(verdict(&s, &set, at), Judgement::Write("refresh"));
}

#[test]
fn tampered_secrets_are_rewritten() {
    let now = SystemTime::now();
    let set = AuthoritySet::single_since(authority(TD, 86_400), now).unwrap();
    let good = written(&set, "web", now);
    let other_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let other_root = authority(TD, 86_400);
    type Tamper<'a> = Box<dyn Fn(&mut Secret) + 'a>;
    let cases: Vec<(&str, Tamper<'_>)> = vec![
        (
            "key.pem does not match the certificate",
            Box::new(|s| set_data(s, KEY_PEM, &other_key.to_pem())),
        ),
        (
            "malformed key.pem",
            Box::new(|s| {
                set_data(
                    s,
                    KEY_PEM,
                    "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                )
            }),
        ),
        (
            "malformed cert-chain.pem",
            Box::new(|s| {
                set_data(
                    s,
                    CHAIN_PEM,
                    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                )
            }),
        ),
        (
            "empty cert-chain.pem",
            Box::new(|s| set_data(s, CHAIN_PEM, "not PEM at all")),
        ),
        (
            "chain does not verify to root-cert.pem",
            Box::new(|s| set_data(s, ROOT_PEM, other_root.roots().pem().as_str())),
        ),
        (
            "missing data",
            Box::new(|s| {
                s.data.as_mut().unwrap().remove(ROOT_PEM);
            }),
        ),
        (
            "annotation",
            Box::new(|s| {
                s.metadata
                    .annotations
                    .as_mut()
                    .unwrap()
                    .insert(SA_ANNOTATION.into(), "db".into());
            }),
        ),
        ("annotation", Box::new(|s| s.metadata.annotations = None)),
        ("type", Box::new(|s| s.type_ = Some("Opaque".into()))),
        (
            "owner",
            Box::new(|s| {
                s.metadata.owner_references.as_mut().unwrap()[0].uid = "an-old-account".into();
            }),
        ),
        ("owner", Box::new(|s| s.metadata.owner_references = None)),
    ];
    for (why, tamper) in cases {
        let mut s = good.clone();
        tamper(&mut s);
        assert_eq!(verdict(&s, &set, now), Judgement::Write(why), "{why}");
    }
    // A sound Secret of another account under this name: wrong identity.
    let mut swapped = written(&set, "db", now);
    swapped.metadata.annotations = good.metadata.annotations.clone();
    assert_eq!(verdict(&swapped, &set, now), Judgement::Write("identity"));
    // Signed by a CA this one does not run, bundle and all: the bundle
    // is not ours.
    let foreign_ca = AuthoritySet::single_since(authority(TD, 86_400), now).unwrap();
    let mut alien = written(&foreign_ca, "web", now);
    alien.metadata.labels = good.metadata.labels.clone();
    assert_eq!(verdict(&alien, &set, now), Judgement::Write("bundle"));
    // Not labelled as ours: foreign, whatever it holds.
    let mut theirs = good.clone();
    theirs.metadata.labels = None;
    assert!(matches!(verdict(&theirs, &set, now), Judgement::Foreign(_)));
    // The untouched one is current.
    assert!(matches!(
        verdict(&good, &set, now),
        Judgement::Current { .. }
    ));
}

#[test]
fn a_rotation_makes_every_secret_stale_twice() {
    let now = SystemTime::now();
    let set = AuthoritySet::single_since(authority(TD, 86_400), now).unwrap();
    let s = written(&set, "web", now);
    // Prepared: a new bundle.
    let prepared = set.prepare(authority(TD, 86_400), now).unwrap();
    assert_eq!(verdict(&s, &prepared, now), Judgement::Write("bundle"));
    let s = written(&prepared, "web", now);
    assert!(matches!(
        verdict(&s, &prepared, now),
        Judgement::Current { .. }
    ));
    // Activated: another signer (and the bundle in another order).
    let active = prepared.activate(now).unwrap();
    assert!(matches!(verdict(&s, &active, now), Judgement::Write(_)));
    let (_, seen) = examine(&s, now).unwrap();
    assert_eq!(
        judge_facts(
            &seen.facts,
            "prod",
            &account(),
            &TrustDomain::new(TD).unwrap(),
            &digest(prepared.bundle_pem().as_bytes()),
            active.active().id(),
            0.5,
            now,
        ),
        Judgement::Write("authority")
    );
    let s = written(&active, "web", now);
    assert!(matches!(
        verdict(&s, &active, now),
        Judgement::Current { .. }
    ));
}

#[test]
fn only_istio_names_are_kept() {
    let now = SystemTime::now();
    let set = AuthoritySet::single_since(authority(TD, 86_400), now).unwrap();
    let mut s = written(&set, "web", now);
    s.metadata.name = Some("web-tls".into());
    assert!(examine(&s, now).is_none());
    s.metadata.name = Some("istio.".into());
    assert!(examine(&s, now).is_none());
}

#[test]
fn refresh_points() {
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let day = Duration::from_secs(86_400);
    assert_eq!(refresh_at(t0, t0 + day, 0.5), t0 + day / 2);
    // Late fractions still leave 10 minutes.
    let hour = Duration::from_secs(3600);
    assert_eq!(
        refresh_at(t0, t0 + hour, 0.95),
        t0 + hour - Duration::from_secs(600)
    );
    // Short leaves: at most half their life before expiry.
    let short = Duration::from_secs(120);
    assert_eq!(
        refresh_at(t0, t0 + short, 0.9),
        t0 + Duration::from_secs(60)
    );
    assert_eq!(refresh_at(t0, t0, 0.5), t0);
}
