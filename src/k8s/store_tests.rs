//! Tests of `k8s::store`: the Secret layout as pure functions, and the
//! compare-and-swap against a small in-memory stand-in for the Secret
//! endpoints of an API server (no watch: that is the integration tests').

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use http_body_util::BodyExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use super::*;
use crate::ca::keystore::{RootSpec, load_or_create};
use crate::ca::{Authority, AuthoritySet, KeyAlgorithm};
use crate::identity::TrustDomain;

fn td() -> TrustDomain {
    TrustDomain::new("td").unwrap()
}

fn authority() -> Authority {
    crate::ca::testing::authority("td", 3600)
}

/// Active `a`, prepared `b`, at generation 2.
fn two() -> AuthoritySet {
    AuthoritySet::single_since(authority(), SystemTime::now())
        .unwrap()
        .prepare(authority(), SystemTime::now())
        .unwrap()
}

fn istio_keys(files: &CaFiles) -> Data {
    entries(files)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), bytes(v)))
        .collect()
}

fn err(data: &Data) -> String {
    decode(data, 0).unwrap_err()
}

#[test]
fn a_two_member_set_round_trips_with_the_active_on_top_and_the_bundle_as_root() {
    let set = two();
    let stored = set.to_stored();
    let data = encode(&stored).unwrap();
    let back = decode(&data, 0).unwrap().unwrap();
    assert_eq!(back.generation, 2);
    assert_eq!(back.members.len(), 2);
    for (a, b) in stored.members.iter().zip(&back.members) {
        assert_eq!((&a.id, a.state, a.since), (&b.id, b.state, b.since));
        assert_eq!(a.files.ca_cert, b.files.ca_cert);
        assert_eq!(*a.files.ca_key, *b.files.ca_key);
        assert_eq!(a.files.cert_chain, b.files.cert_chain);
        assert_eq!(a.files.root_cert, b.files.root_cert);
    }
    let reloaded = AuthoritySet::from_stored(&back, &td(), SystemTime::now()).unwrap();
    assert_eq!(reloaded.active().id(), set.active().id());

    let top = |k: &str| std::str::from_utf8(&data[k].0).unwrap().to_owned();
    assert_eq!(top(CA_CERT), set.active().files().ca_cert);
    assert_eq!(top(CA_KEY), *set.active().files().ca_key);
    assert_eq!(
        top(ROOT_CERT),
        set.bundle_pem(),
        "root-cert.pem is the bundle"
    );
    assert_eq!(parse_pem_certs(&top(ROOT_CERT)).unwrap().len(), 2);
    let manifest: serde_json::Value = serde_json::from_str(&top(MANIFEST)).unwrap();
    assert_eq!(manifest["generation"], 2);
    assert_eq!(manifest["members"][1]["state"], "prepared");
}

#[test]
fn every_key_is_a_valid_secret_key_and_the_set_is_small() {
    let data = encode(&two().to_stored()).unwrap();
    assert_eq!(data.len(), 4 + 1 + 2 * 4);
    for key in data.keys() {
        assert!(
            !key.is_empty()
                && key.len() <= 253
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)),
            "{key}"
        );
        assert!(is_managed_key(key));
    }
    assert!(check_size(Some(&data)).is_ok());
}

/// The top-level keys alone still form a CA (what an Istio reader sees).
#[test]
fn the_top_level_keys_alone_are_a_valid_ca_during_a_rotation() {
    let set = two();
    let mut data = encode(&set.to_stored()).unwrap();
    data.retain(|k, _| FILES.contains(&k.as_str()));
    let adopted = decode(&data, 7).unwrap().unwrap();
    assert_eq!(adopted.generation, 1);
    assert_eq!(adopted.members[0].id, set.active().id());
    let one = AuthoritySet::from_stored(&adopted, &td(), SystemTime::now()).unwrap();
    assert_eq!(one.bundle_pem(), set.bundle_pem());
}

#[test]
fn the_four_istio_keys_are_adopted_at_generation_1() {
    let a = authority();
    let adopted = decode(&istio_keys(a.files()), 1234).unwrap().unwrap();
    assert_eq!(adopted.generation, 1);
    assert_eq!(adopted.members.len(), 1);
    let m = &adopted.members[0];
    assert_eq!(
        (m.id.as_str(), m.state, m.since),
        (a.id(), State::Active, 1234)
    );
    AuthoritySet::from_stored(&adopted, &td(), SystemTime::now()).unwrap();
}

/// istiod writes `cert-chain.pem` and `key.pem` empty, and reads only
/// `ca-cert.pem` and `ca-key.pem`.
#[test]
fn istiods_own_secret_is_adopted_even_without_a_root() {
    let a = authority();
    let mut data = istio_keys(a.files());
    data.insert("key.pem".into(), bytes(""));
    data.insert(CERT_CHAIN.into(), bytes(""));
    let adopted = decode(&data, 0).unwrap().unwrap();
    assert_eq!(adopted.members[0].id, a.id());
    data.insert(ROOT_CERT.into(), bytes(""));
    let adopted = decode(&data, 0).unwrap().unwrap();
    assert_eq!(adopted.members[0].files.root_cert, a.files().ca_cert);
    AuthoritySet::from_stored(&adopted, &td(), SystemTime::now()).unwrap();
}

#[test]
fn a_secret_without_our_keys_is_empty() {
    assert!(decode(&Data::new(), 0).unwrap().is_none());
    let mut data = Data::new();
    data.insert("key.pem".into(), bytes(""));
    data.insert("unrelated".into(), bytes("x"));
    assert!(decode(&data, 0).unwrap().is_none());
}

#[test]
fn half_written_or_inconsistent_secrets_are_refused() {
    let set = two();
    let good = encode(&set.to_stored()).unwrap();
    let (a, b) = (set.active().id(), set.members()[1].authority.id());

    let mut d = good.clone();
    d.remove(&member_key(b, CA_KEY));
    assert!(err(&d).contains("is missing"), "{}", err(&d));

    let mut d = good.clone();
    d.remove(MANIFEST);
    assert!(err(&d).contains("no authorities.json"), "{}", err(&d));

    let mut d = good.clone();
    d.insert(member_key("0123456789abcdef", CA_CERT), bytes("x"));
    assert!(err(&d).contains("does not name"), "{}", err(&d));

    let mut d = good.clone();
    d.insert(CA_CERT.into(), data_of(&good, &member_key(b, CA_CERT)));
    assert!(err(&d).contains("changed outside"), "{}", err(&d));

    let mut d = good.clone();
    d.insert(ROOT_CERT.into(), data_of(&good, &member_key(a, ROOT_CERT)));
    assert!(err(&d).contains("changed outside"), "{}", err(&d));

    let mut d = good.clone();
    d.remove(CA_KEY);
    assert!(err(&d).contains("ca-key.pem is missing"), "{}", err(&d));

    let mut d = good.clone();
    d.insert(MANIFEST.into(), bytes("{not json"));
    assert!(err(&d).contains("not valid"), "{}", err(&d));

    let mut d = good.clone();
    let text = std::str::from_utf8(&good[MANIFEST].0).unwrap();
    d.insert(
        MANIFEST.into(),
        bytes(&text.replace("prepared", "sleeping")),
    );
    assert!(err(&d).contains("unknown state"), "{}", err(&d));

    let mut d = good.clone();
    d.insert(MANIFEST.into(), bytes(&text.replace(b, a)));
    assert!(err(&d).contains("twice"), "{}", err(&d));

    let mut d = good.clone();
    d.insert(MANIFEST.into(), bytes(r#"{"generation":3,"members":[]}"#));
    assert!(err(&d).contains("names no authority"), "{}", err(&d));

    // The Istio keys, half there.
    let files = authority().files().clone();
    let mut d = Data::new();
    d.insert(CA_CERT.into(), bytes(&files.ca_cert));
    assert!(err(&d).contains("partial CA"), "{}", err(&d));
    let mut d = istio_keys(&files);
    d.remove(CA_CERT);
    assert!(err(&d).contains("partial CA"), "{}", err(&d));
    let mut d = istio_keys(&files);
    d.insert(CERT_CHAIN.into(), bytes(&files.ca_cert));
    d.remove(ROOT_CERT);
    assert!(err(&d).contains("no root-cert.pem"), "{}", err(&d));
    let mut d = istio_keys(&files);
    d.insert(CA_KEY.into(), ByteString(vec![0xff, 0xfe]));
    assert!(err(&d).contains("not UTF-8"), "{}", err(&d));
}

fn data_of(data: &Data, key: &str) -> ByteString {
    data[key].clone()
}

#[test]
fn a_set_without_exactly_one_active_or_with_a_bad_id_is_not_encoded() {
    let mut stored = two().to_stored();
    stored.members[1].state = State::Active;
    assert!(encode(&stored).unwrap_err().contains("exactly one active"));
    let mut stored = two().to_stored();
    stored.members[1].id = "../x".into();
    assert!(encode(&stored).unwrap_err().contains("bad authority id"));
    let mut stored = two().to_stored();
    stored.members[1].id = stored.members[0].id.clone();
    assert!(encode(&stored).unwrap_err().contains("twice"));
}

#[test]
fn a_secret_over_one_mebibyte_is_refused() {
    let mut stored = two().to_stored();
    stored.members[1].files.cert_chain = "x".repeat(MAX_SECRET_BYTES / 2);
    let secret = created("ns", "s", encode(&stored).unwrap(), &stored);
    assert!(check_size(secret.data.as_ref()).is_ok(), "still under");
    stored.members[1].files.cert_chain = "x".repeat(MAX_SECRET_BYTES);
    let secret = created("ns", "s", encode(&stored).unwrap(), &stored);
    let e = check_size(secret.data.as_ref()).unwrap_err();
    assert!(e.contains("over the 1048576"), "{e}");
}

#[test]
fn a_replace_keeps_what_is_not_ours_and_drops_gone_members() {
    let set = two();
    let mut current = created(
        "ns",
        "s",
        encode(&set.to_stored()).unwrap(),
        &set.to_stored(),
    );
    current.type_ = Some("Opaque".into());
    current.metadata.resource_version = Some("41".into());
    current.metadata.labels = Some(BTreeMap::from([
        (MANAGED_BY_LABEL.to_owned(), "Helm".to_owned()),
        ("team".to_owned(), "mesh".to_owned()),
    ]));
    current.metadata.annotations = Some(BTreeMap::from([("note".to_owned(), "x".to_owned())]));
    current.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: "owner".into(),
        uid: "u".into(),
        ..OwnerReference::default()
    }]);
    current
        .data
        .as_mut()
        .unwrap()
        .insert("key.pem".into(), bytes(""));

    let now = SystemTime::now();
    let next = set.activate(now).unwrap().retire().unwrap();
    let stored = next.to_stored();
    let out = replaced(current, encode(&stored).unwrap(), &stored);
    assert_eq!(out.type_.as_deref(), Some("Opaque"));
    assert_eq!(out.metadata.resource_version.as_deref(), Some("41"));
    let labels = out.metadata.labels.as_ref().unwrap();
    assert_eq!(
        labels[MANAGED_BY_LABEL], "Helm",
        "another manager's label kept"
    );
    assert_eq!(labels["team"], "mesh");
    let ann = out.metadata.annotations.as_ref().unwrap();
    assert_eq!(ann["note"], "x");
    assert_eq!(ann[GENERATION_ANNOTATION], "4");
    assert_eq!(ann[ACTIVE_ANNOTATION], next.active().id());
    assert_eq!(out.metadata.owner_references.as_ref().unwrap().len(), 1);
    let data = out.data.as_ref().unwrap();
    assert!(data.contains_key("key.pem"));
    assert!(
        !data.keys().any(|k| k.starts_with(set.active().id())),
        "the retired authority's keys are gone"
    );
    let back = decode(data, 0).unwrap().unwrap();
    assert_eq!(back.generation, 4);
    assert_eq!(back.members.len(), 1);
}

#[test]
fn cacerts_in_istio_and_tls_form() {
    let files = authority().files().clone();
    let got = cacerts_files(&istio_keys(&files)).unwrap().unwrap();
    assert_eq!(got.ca_cert, files.ca_cert);

    let mut tls = Data::new();
    tls.insert(TLS_CERT.into(), bytes(&files.ca_cert));
    tls.insert(TLS_KEY.into(), bytes(&files.ca_key));
    tls.insert(TLS_CA.into(), bytes(&files.root_cert));
    let got = cacerts_files(&tls).unwrap().unwrap();
    Authority::from_files(&got, &td(), SystemTime::now()).unwrap();
    tls.remove(TLS_CA);
    assert!(cacerts_files(&tls).unwrap_err().contains("no ca.crt"));

    assert!(cacerts_files(&Data::new()).unwrap().is_none());
    let mut partial = istio_keys(&files);
    partial.remove(CA_KEY);
    assert!(cacerts_files(&partial).unwrap_err().contains("partial"));
}

// ---------------------------------------------------------------------------
// The compare-and-swap against a stand-in for the API server's Secret
// endpoints: GET, POST (409 AlreadyExists), PUT (409 Conflict on a stale
// resourceVersion), with the key and size validation the API server does.

#[derive(Default)]
struct Server {
    secret: Option<Secret>,
    rv: u64,
    requests: Vec<String>,
    /// Replaces the Secret right after the next GET is answered (another
    /// writer between our read and our write).
    after_get: Option<Secret>,
    /// The next PUT is stored but answered 409 (a retried request whose
    /// first attempt landed).
    lose_answer: bool,
}

type Shared = Arc<Mutex<Server>>;

fn status(code: u16, reason: &str) -> http::Response<kube::client::Body> {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": reason, "reason": reason, "code": code,
    });
    http::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(kube::client::Body::from(body.to_string().into_bytes()))
        .unwrap()
}

fn ok(code: u16, secret: &Secret) -> http::Response<kube::client::Body> {
    http::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(kube::client::Body::from(
            serde_json::to_vec(secret).unwrap(),
        ))
        .unwrap()
}

async fn handle(
    server: Shared,
    req: http::Request<kube::client::Body>,
) -> http::Response<kube::client::Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut s = server.lock().unwrap();
    s.requests.push(format!("{method} {path}"));
    let named = path == "/api/v1/namespaces/ns/secrets/ca";
    // `None`: what the API server refuses with 422.
    let incoming = || -> Option<Secret> {
        let secret: Secret = serde_json::from_slice(&body).unwrap();
        let data = secret.data.clone().unwrap_or_default();
        let size: usize = data.values().map(|v| v.0.len()).sum();
        let bad_key = data.keys().any(|k| {
            !k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        });
        if size > MAX_SECRET_BYTES || bad_key {
            return None;
        }
        Some(secret)
    };
    match (method.as_str(), named) {
        ("GET", true) => {
            let answer = match &s.secret {
                Some(secret) => ok(200, secret),
                None => status(404, "NotFound"),
            };
            if let Some(mut other) = s.after_get.take() {
                s.rv += 1;
                other.metadata.resource_version = Some(s.rv.to_string());
                s.secret = Some(other);
            }
            answer
        }
        ("POST", false) if path == "/api/v1/namespaces/ns/secrets" => {
            if s.secret.is_some() {
                return status(409, "AlreadyExists");
            }
            let Some(mut secret) = incoming() else {
                return status(422, "Invalid");
            };
            s.rv += 1;
            secret.metadata.resource_version = Some(s.rv.to_string());
            s.secret = Some(secret.clone());
            ok(201, &secret)
        }
        ("PUT", true) => {
            let Some(mut secret) = incoming() else {
                return status(422, "Invalid");
            };
            let Some(have) = &s.secret else {
                return status(404, "NotFound");
            };
            if secret.metadata.resource_version != have.metadata.resource_version {
                return status(409, "Conflict");
            }
            s.rv += 1;
            secret.metadata.resource_version = Some(s.rv.to_string());
            s.secret = Some(secret.clone());
            if std::mem::take(&mut s.lose_answer) {
                return status(409, "Conflict");
            }
            ok(200, &secret)
        }
        _ => status(404, "NotFound"),
    }
}

fn serve() -> (Shared, kube::Client) {
    let server = Shared::default();
    let s = server.clone();
    let svc = tower::service_fn(move |req| {
        let s = s.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(s, req).await) }
    });
    (server, kube::Client::new(svc, "ns"))
}

fn requests(server: &Shared) -> Vec<String> {
    std::mem::take(&mut server.lock().unwrap().requests)
}

fn spec() -> RootSpec {
    RootSpec {
        trust_domain: td(),
        algorithm: KeyAlgorithm::EcdsaP256,
        lifetime: std::time::Duration::from_secs(3600),
    }
}

#[tokio::test]
async fn stores_racing_to_create_agree_on_one_ca() {
    let (server, client) = serve();
    let (a, b) = (
        SecretStore::new(client.clone(), "ns", "ca"),
        SecretStore::new(client, "ns", "ca"),
    );
    let (now, spec) = (SystemTime::now(), spec());
    let (ra, rb) = tokio::join!(
        load_or_create(&a, &spec, None, now),
        load_or_create(&b, &spec, None, now)
    );
    let ((sa, ca), (sb, cb)) = (ra.unwrap(), rb.unwrap());
    assert!(ca ^ cb, "exactly one created");
    let posts = requests(&server)
        .iter()
        .filter(|r| r.starts_with("POST"))
        .count();
    assert_eq!(posts, 2, "both tried to create");
    assert_eq!(sa.active().id(), sb.active().id());
    let secret = server.lock().unwrap().secret.clone().unwrap();
    assert_eq!(secret.type_.as_deref(), Some(SECRET_TYPE));
    assert_eq!(
        secret.metadata.labels.unwrap()[MANAGED_BY_LABEL],
        MANAGED_BY
    );
    assert_eq!(a.describe(), "secret ns/ca");
}

#[tokio::test]
async fn a_stale_swap_writes_nothing_and_a_concurrent_replace_loses() {
    let (server, client) = serve();
    let store = SecretStore::new(client, "ns", "ca");
    let now = SystemTime::now();
    let (set, created) = load_or_create(&store, &spec(), None, now).await.unwrap();
    assert!(created);
    let next = set.prepare(authority(), now).unwrap();
    requests(&server);
    assert!(store.swap(Some(1), &next.to_stored()).await.unwrap());
    assert_eq!(
        requests(&server),
        [
            "GET /api/v1/namespaces/ns/secrets/ca",
            "PUT /api/v1/namespaces/ns/secrets/ca"
        ]
    );
    // A writer that read generation 1 loses, and sends no write.
    let other = set.prepare(authority(), now).unwrap();
    assert!(!store.swap(Some(1), &other.to_stored()).await.unwrap());
    assert!(!store.swap(None, &other.to_stored()).await.unwrap());
    assert!(requests(&server).iter().all(|r| r.starts_with("GET")));
    assert_eq!(store.generation().await.unwrap(), Some(2));

    // Between our GET and our PUT someone else replaced it: 409, false.
    let activated = next.activate(now).unwrap();
    let theirs = {
        let current = server.lock().unwrap().secret.clone().unwrap();
        let mut stored = other.to_stored();
        stored.generation = 3;
        replaced(current, encode(&stored).unwrap(), &stored)
    };
    server.lock().unwrap().after_get = Some(theirs.clone());
    assert!(!store.swap(Some(2), &activated.to_stored()).await.unwrap());
    let held = server.lock().unwrap().secret.clone().unwrap();
    assert_eq!(held.data, theirs.data, "theirs stands");

    // A PUT that landed but was answered 409 (a retry): ours, so true.
    server.lock().unwrap().lose_answer = true;
    let after = next.activate(now).unwrap();
    let mut after = after.to_stored();
    after.generation = 4;
    assert!(store.swap(Some(3), &after).await.unwrap());
    assert_eq!(store.load().await.unwrap().unwrap().generation, 4);
}

#[tokio::test]
async fn a_pre_created_empty_secret_is_filled_and_an_istiod_secret_adopted() {
    let (server, client) = serve();
    let mut empty = Secret::default();
    empty.metadata.name = Some("ca".into());
    empty.metadata.resource_version = Some("1".into());
    empty.type_ = Some("Opaque".into());
    server.lock().unwrap().secret = Some(empty);
    let store = SecretStore::new(client.clone(), "ns", "ca");
    assert!(store.load().await.unwrap().is_none());
    let (set, created) = load_or_create(&store, &spec(), None, SystemTime::now())
        .await
        .unwrap();
    assert!(created);
    let secret = server.lock().unwrap().secret.clone().unwrap();
    assert_eq!(secret.type_.as_deref(), Some("Opaque"), "type kept");

    // istiod's Secret: adopted at generation 1; the first swap moves it on.
    let a = authority();
    let mut istiod = Secret::default();
    istiod.metadata.name = Some("ca".into());
    istiod.metadata.resource_version = Some("9".into());
    istiod.data = Some(istio_keys(a.files()));
    server.lock().unwrap().secret = Some(istiod);
    let (adopted, created) = load_or_create(&store, &spec(), None, SystemTime::now())
        .await
        .unwrap();
    assert!(!created);
    assert_ne!(adopted.active().id(), set.active().id());
    assert_eq!(adopted.active().id(), a.id());
    let next = adopted.prepare(authority(), SystemTime::now()).unwrap();
    assert!(store.swap(Some(1), &next.to_stored()).await.unwrap());
    assert_eq!(store.load().await.unwrap().unwrap().generation, 2);
}

#[tokio::test]
async fn an_oversized_swap_is_refused_before_it_is_sent() {
    let (server, client) = serve();
    let store = SecretStore::new(client, "ns", "ca");
    let now = SystemTime::now();
    let (set, _) = load_or_create(&store, &spec(), None, now).await.unwrap();
    let mut next = set.prepare(authority(), now).unwrap().to_stored();
    next.members[1].files.cert_chain = "x".repeat(MAX_SECRET_BYTES);
    requests(&server);
    let e = store.swap(Some(1), &next).await.unwrap_err().to_string();
    assert!(e.contains("nothing was written"), "{e}");
    assert!(requests(&server).iter().all(|r| r.starts_with("GET")));
    assert_eq!(store.load().await.unwrap().unwrap().generation, 1);
}

#[tokio::test]
async fn a_corrupt_secret_is_an_error_and_is_never_overwritten() {
    let (server, client) = serve();
    let store = SecretStore::new(client, "ns", "ca");
    let mut half = Secret::default();
    half.metadata.name = Some("ca".into());
    half.metadata.resource_version = Some("1".into());
    let files = authority().files().clone();
    half.data = Some(BTreeMap::from([(
        CA_CERT.to_owned(),
        bytes(&files.ca_cert),
    )]));
    server.lock().unwrap().secret = Some(half);
    let e = load_or_create(&store, &spec(), None, SystemTime::now())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("partial CA") && e.contains("secret ns/ca"),
        "{e}"
    );
    assert!(store.generation().await.is_err());
    let stored = AuthoritySet::single_since(authority(), SystemTime::now())
        .unwrap()
        .to_stored();
    assert!(store.swap(None, &stored).await.is_err());
    assert!(
        !requests(&server)
            .iter()
            .any(|r| r.starts_with("PUT") || r.starts_with("POST"))
    );
}

#[tokio::test]
async fn read_cacerts_reads_a_plugged_in_ca_and_refuses_an_empty_one() {
    let (server, client) = serve();
    // Served under the name the stand-in knows.
    assert!(read_cacerts(&client, "ns", "ca").await.unwrap().is_none());
    let files = authority().files().clone();
    let mut s = Secret::default();
    s.metadata.name = Some("ca".into());
    s.data = Some(istio_keys(&files));
    server.lock().unwrap().secret = Some(s.clone());
    let got = read_cacerts(&client, "ns", "ca").await.unwrap().unwrap();
    assert_eq!(got.ca_cert, files.ca_cert);
    s.data = Some(BTreeMap::from([("other".to_owned(), bytes("x"))]));
    server.lock().unwrap().secret = Some(s);
    let e = read_cacerts(&client, "ns", "ca").await.unwrap_err();
    assert!(
        matches!(&e, Error::Invalid { reason, .. } if reason.contains("holds no CA")),
        "{e}"
    );
}

#[tokio::test]
async fn debug_shows_no_key_and_the_store_is_not_live_without_a_watch() {
    let (_server, client) = serve();
    let store = SecretStore::new(client, "ns", "ca");
    let (set, _) = load_or_create(&store, &spec(), None, SystemTime::now())
        .await
        .unwrap();
    let dbg = format!("{store:?}");
    assert!(dbg.contains("watch_live: false") && !dbg.contains("PRIVATE"));
    assert!(!store.watch_live());
    assert_eq!(store.poll_interval(), DEFAULT_POLL_INTERVAL);
    assert_eq!(store.generation().await.unwrap(), Some(set.generation()));
}

#[tokio::test]
async fn a_watch_that_cannot_reach_the_server_is_not_live_and_stops_on_shutdown() {
    let (_server, client) = serve();
    let store = SecretStore::new(client, "ns", "ca");
    let (tx, rx) = tokio::sync::watch::channel(false);
    let task = store.spawn_watch(rx.clone());
    // The stand-in serves no list or watch: the watch fails and retries.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!store.watch_live());
    // A second watch on the same store ends at once.
    tokio::time::timeout(std::time::Duration::from_secs(1), store.spawn_watch(rx))
        .await
        .unwrap()
        .unwrap();
    tx.send_replace(true);
    tokio::time::timeout(std::time::Duration::from_secs(1), task)
        .await
        .unwrap()
        .unwrap();
    assert!(!store.shared.watching.load(Ordering::SeqCst));
}
