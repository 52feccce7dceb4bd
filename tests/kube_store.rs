//! The CA's authorities in a Kubernetes Secret (`k8s::store::SecretStore`)
//! against the fake API server, in process: stores racing to create the
//! CA, compare-and-swap, a watched copy following another store's writes
//! with no GET, the watch recovering from closed and compacted watches,
//! istiod's Secret adopted, a plugged-in `cacerts` seeding an empty store,
//! and a corrupt Secret refused and left alone.
//!
//! Each store gets a client with a token of its own, so the fake's request
//! log tells whose request each one was.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use serde_json::{Value, json};
use tokio::sync::{Barrier, watch};
use tokio::task::JoinHandle;

use common::fakekube::FakeKube;
use workload_ca::ca::keystore::{RootSpec, load_or_create};
use workload_ca::ca::{Authority, AuthoritySet, KeyAlgorithm, KeyStore, Stored};
use workload_ca::identity::TrustDomain;
use workload_ca::k8s::store::{
    ACTIVE_ANNOTATION, GENERATION_ANNOTATION, SecretStore, WATCHED_POLL_INTERVAL, read_cacerts,
};

const NS: &str = "istio-system";
/// How long any single wait may take before the test fails.
const LIMIT: Duration = Duration::from_secs(10);
/// How soon a follower must see another store's write.
const FOLLOW: Duration = Duration::from_secs(1);

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn spec() -> RootSpec {
    RootSpec {
        trust_domain: td(),
        algorithm: KeyAlgorithm::EcdsaP256,
        lifetime: Duration::from_secs(86_400),
    }
}

async fn cluster() -> FakeKube {
    let fake = FakeKube::start().await;
    fake.create_namespace(NS);
    fake
}

/// A store on Secret `secret` whose requests the fake logs as `user`.
async fn store_as(fake: &FakeKube, user: &str, secret: &str) -> SecretStore {
    let token = format!("token-of-{user}");
    fake.add_user_token(&token, user, &["workload-ca"]);
    SecretStore::new(fake.client_with_token(&token).await, NS, secret)
}

/// Requests on secrets by `user` of `verb` since the counters were reset.
fn secret_requests(fake: &FakeKube, user: &str, verb: &str) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.user == user && r.verb == verb && r.resource == "secrets")
        .count()
}

/// Writes to secrets (any verb that changes one) since the reset.
fn secret_writes(fake: &FakeKube) -> Vec<String> {
    fake.requests()
        .into_iter()
        .filter(|r| {
            r.resource == "secrets" && ["create", "update", "patch", "delete"].contains(&&*r.verb)
        })
        .map(|r| format!("{} {} {} -> {}", r.user, r.verb, r.name, r.code))
        .collect()
}

fn secret_json(fake: &FakeKube, name: &str) -> Value {
    fake.get_json("secrets", NS, name)
        .unwrap_or_else(|| panic!("secret {name} exists"))
}

fn rv(fake: &FakeKube, name: &str) -> String {
    secret_json(fake, name)["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn ids(stored: &Stored) -> Vec<(String, &'static str)> {
    stored
        .members
        .iter()
        .map(|m| (m.id.clone(), m.state.as_str()))
        .collect()
}

fn authority() -> Authority {
    common::authority()
}

/// A running watch of `store`, stopped (and checked to stop) by `stop`.
struct Watching {
    tx: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Watching {
    async fn start(store: &SecretStore) -> Self {
        let (tx, rx) = watch::channel(false);
        let task = store.spawn_watch(rx);
        wait_live(store).await;
        Self { tx, task }
    }

    async fn stop(self) {
        self.tx.send_replace(true);
        tokio::time::timeout(LIMIT, self.task)
            .await
            .expect("the watch stops on shutdown")
            .unwrap();
    }
}

/// Waits until the fake serves `n` watches. `close_watches` ends only the
/// watches whose serving task has started (it subscribes to the closing
/// signal when it first runs, after the request is already logged), so a
/// test closes watches only once they are open.
async fn wait_open_watches(fake: &FakeKube, n: usize) {
    let start = Instant::now();
    while fake.open_watches() < n {
        assert!(
            start.elapsed() < LIMIT,
            "{} watches open",
            fake.open_watches()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_live(store: &SecretStore) -> Duration {
    let start = Instant::now();
    while !store.watch_live() {
        assert!(start.elapsed() < LIMIT, "the watch is not live");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

/// Polls `store.generation()` every 5 ms until it is `want`; how long that
/// took (at most `limit`).
async fn wait_generation(store: &SecretStore, want: u64, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let have = store.generation().await.unwrap();
        if have == Some(want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "generation {have:?} after {limit:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_racing_to_create_agree_on_one_ca() {
    const STORES: usize = 4;
    const ROUNDS: usize = 4;
    let fake = cluster().await;
    let mut attempts = Vec::new();
    for round in 0..ROUNDS {
        let name = format!("race-{round}");
        let mut stores = Vec::new();
        for i in 0..STORES {
            stores.push(store_as(&fake, &format!("replica-{i}"), &name).await);
        }
        fake.reset_counters();
        let barrier = Arc::new(Barrier::new(STORES));
        let now = SystemTime::now();
        let racers: Vec<_> = stores
            .iter()
            .cloned()
            .map(|store| {
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    load_or_create(&store, &spec(), None, now).await
                })
            })
            .collect();
        let mut results: Vec<(AuthoritySet, bool)> = Vec::new();
        for r in racers {
            let got = tokio::time::timeout(LIMIT, r).await.unwrap().unwrap();
            results.push(got.unwrap_or_else(|e| panic!("round {round}: {e}")));
        }
        assert_eq!(
            results.iter().filter(|(_, created)| *created).count(),
            1,
            "round {round}: exactly one store created the CA"
        );
        let first = results[0].0.to_stored();
        for (set, _) in &results {
            assert_eq!(set.generation(), 1);
            assert_eq!(ids(&set.to_stored()), ids(&first), "round {round}");
            assert_eq!(set.bundle_pem(), results[0].0.bundle_pem());
        }
        for store in &stores {
            let stored = store.load().await.unwrap().expect("stored");
            assert_eq!(ids(&stored), ids(&first), "round {round}: read back");
        }
        let creates: Vec<u16> = fake
            .requests()
            .iter()
            .filter(|r| r.verb == "create" && r.resource == "secrets")
            .map(|r| r.code)
            .collect();
        assert_eq!(
            creates.iter().filter(|c| **c == 201).count(),
            1,
            "round {round}: one create succeeded: {creates:?}"
        );
        assert!(
            creates.iter().all(|c| *c == 201 || *c == 409),
            "round {round}: {creates:?}"
        );
        let secret = secret_json(&fake, &name);
        assert_eq!(secret["type"], "istio.io/ca-root");
        assert_eq!(
            secret["metadata"]["annotations"][ACTIVE_ANNOTATION],
            first.members[0].id.as_str()
        );
        attempts.push(creates.len());
    }
    println!("creates tried per round ({STORES} stores): {attempts:?}");
    assert!(
        attempts.iter().any(|n| *n >= 2),
        "the stores never raced to create: {attempts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_swap_writes_nothing_and_racing_swaps_have_one_winner() {
    let fake = cluster().await;
    let a = store_as(&fake, "writer-a", "ca").await;
    let now = SystemTime::now();
    let (set, created) = load_or_create(&a, &spec(), None, now).await.unwrap();
    assert!(created);
    let next = set.prepare(authority(), now).unwrap();
    let before = rv(&fake, "ca");
    assert!(a.swap(Some(1), &next.to_stored()).await.unwrap());
    let after = rv(&fake, "ca");
    assert_ne!(before, after, "the swap wrote");

    fake.reset_counters();
    let other = set.prepare(authority(), now).unwrap().to_stored();
    for expected in [Some(1), None, Some(3)] {
        assert!(
            !a.swap(expected, &other).await.unwrap(),
            "a swap from {expected:?} while the store is at 2"
        );
    }
    assert_eq!(rv(&fake, "ca"), after, "resourceVersion unchanged");
    assert_eq!(secret_writes(&fake), Vec::<String>::new());
    let stored = a.load().await.unwrap().unwrap();
    assert_eq!(stored.generation, 2);
    assert_eq!(ids(&stored), ids(&next.to_stored()));

    // Two stores that read the same generation race to swap from it: one
    // wins, the other is told it lost, and the winner's set stands.
    let b = store_as(&fake, "writer-b", "ca").await;
    let mut current = next;
    let mut conflicts = 0;
    for round in 0..3 {
        // Back to one authority (through `a`), so both may prepare one.
        for step in [AuthoritySet::activate, |s: &AuthoritySet, _| s.retire()] {
            let next = step(&current, now).unwrap();
            assert!(
                a.swap(Some(current.generation()), &next.to_stored())
                    .await
                    .unwrap()
            );
            current = next;
        }
        let g = current.generation();
        let (ours, theirs) = (
            current.prepare(authority(), now).unwrap(),
            current.prepare(authority(), now).unwrap(),
        );
        fake.reset_counters();
        let barrier = Arc::new(Barrier::new(2));
        let race = |store: SecretStore, next: Stored| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                store.swap(Some(g), &next).await
            })
        };
        let ta = race(a.clone(), ours.to_stored());
        let tb = race(b.clone(), theirs.to_stored());
        let ra = tokio::time::timeout(LIMIT, ta).await.unwrap().unwrap();
        let rb = tokio::time::timeout(LIMIT, tb).await.unwrap().unwrap();
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(ra ^ rb, "round {round}: exactly one swap won ({ra}, {rb})");
        let winner = if ra { ours } else { theirs };
        let stored = b.load().await.unwrap().unwrap();
        assert_eq!(stored.generation, g + 1);
        assert_eq!(ids(&stored), ids(&winner.to_stored()), "round {round}");
        let updates: Vec<u16> = fake
            .requests()
            .iter()
            .filter(|r| r.verb == "update" && r.resource == "secrets")
            .map(|r| r.code)
            .collect();
        assert_eq!(updates.iter().filter(|c| **c == 200).count(), 1);
        conflicts += updates.iter().filter(|c| **c == 409).count();
        current = winner;
    }
    println!(
        "racing swaps: {conflicts} of 3 losers were refused by a 409 (the rest saw the new generation first)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_sees_each_change_within_a_second_without_reading_the_secret() {
    let fake = cluster().await;
    let writer = store_as(&fake, "writer", "ca").await;
    let follower = store_as(&fake, "follower", "ca").await;
    let now = SystemTime::now();
    let (set, _) = load_or_create(&writer, &spec(), None, now).await.unwrap();
    let watching = Watching::start(&follower).await;
    assert_eq!(follower.poll_interval(), WATCHED_POLL_INTERVAL);

    fake.reset_counters();
    assert_eq!(follower.generation().await.unwrap(), Some(1));
    let mut current = set;
    let mut took = Vec::new();
    for step in 0..6 {
        let next = match step % 3 {
            0 => current.prepare(authority(), now),
            1 => current.activate(now),
            _ => current.retire(),
        }
        .unwrap();
        assert!(
            writer
                .swap(Some(current.generation()), &next.to_stored())
                .await
                .unwrap()
        );
        took.push(wait_generation(&follower, next.generation(), FOLLOW).await);
        current = next;
    }
    took.sort();
    println!(
        "follower saw {} changes: median {:?}, max {:?}",
        took.len(),
        took[took.len() / 2],
        took[took.len() - 1]
    );
    for verb in ["get", "list"] {
        assert_eq!(
            secret_requests(&fake, "follower", verb),
            0,
            "the follower's {verb}s of the Secret"
        );
    }
    assert!(
        secret_requests(&fake, "writer", "get") >= 6,
        "the log tells the stores apart"
    );
    let loaded = follower.load().await.unwrap().unwrap();
    assert_eq!(ids(&loaded), ids(&current.to_stored()));

    // Without its watch the follower reads the Secret for each question.
    watching.stop().await;
    assert!(!follower.watch_live());
    fake.reset_counters();
    assert_eq!(
        follower.generation().await.unwrap(),
        Some(current.generation())
    );
    assert_eq!(secret_requests(&fake, "follower", "get"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_recovers_from_closed_and_compacted_watches() {
    let fake = cluster().await;
    let writer = store_as(&fake, "writer", "ca").await;
    let follower = store_as(&fake, "follower", "ca").await;
    let now = SystemTime::now();
    let (mut current, _) = load_or_create(&writer, &spec(), None, now).await.unwrap();
    let watching = Watching::start(&follower).await;

    // 1. The server ends every watch (as its timeouts do): the watcher
    // resumes from where it was, without listing again.
    wait_open_watches(&fake, 1).await;
    fake.reset_counters();
    fake.close_watches();
    let start = Instant::now();
    while secret_requests(&fake, "follower", "watch") == 0 {
        assert!(start.elapsed() < LIMIT, "no new watch after close_watches");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_live(&follower).await;
    let next = current.prepare(authority(), now).unwrap();
    assert!(
        writer
            .swap(Some(current.generation()), &next.to_stored())
            .await
            .unwrap()
    );
    let took = wait_generation(&follower, next.generation(), FOLLOW).await;
    current = next;
    println!(
        "after close_watches: resumed in {:?}, change seen in {took:?}",
        start.elapsed() - took
    );
    assert_eq!(secret_requests(&fake, "follower", "get"), 0);

    // 2. The history compacted past the watch's resourceVersion: the
    // resumed watch gets 410 Expired and the store lists again. A change
    // made in the gap is seen, and so is a later one.
    for i in 0..3 {
        fake.create_json(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("filler-{i}"), "namespace": NS},
        }))
        .unwrap();
    }
    wait_open_watches(&fake, 1).await;
    fake.reset_counters();
    fake.compact();
    fake.close_watches();
    let start = Instant::now();
    let gap = current.activate(now).unwrap();
    assert!(
        writer
            .swap(Some(current.generation()), &gap.to_stored())
            .await
            .unwrap()
    );
    current = gap;
    while secret_requests(&fake, "follower", "list") == 0 {
        assert!(start.elapsed() < LIMIT, "no list again after compaction");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_live(&follower).await;
    let relisted = start.elapsed();
    fake.reset_counters();
    wait_generation(&follower, current.generation(), FOLLOW).await;
    assert_eq!(
        secret_requests(&fake, "follower", "get"),
        0,
        "the change made in the gap is in the watched copy"
    );
    let next = current.retire().unwrap();
    assert!(
        writer
            .swap(Some(current.generation()), &next.to_stored())
            .await
            .unwrap()
    );
    let took = wait_generation(&follower, next.generation(), FOLLOW).await;
    println!(
        "after compaction: listed again and live in {relisted:?}, next change seen in {took:?}"
    );
    assert_eq!(secret_requests(&fake, "follower", "get"), 0);
    watching.stop().await;
}

/// The Secret istiod writes for its self-signed CA (its keys, its type).
fn istiod_secret(name: &str, files: &workload_ca::ca::CaFiles, extra: &[(&str, &str)]) -> Secret {
    let mut data: std::collections::BTreeMap<String, ByteString> = [
        ("ca-cert.pem", files.ca_cert.as_str()),
        ("ca-key.pem", files.ca_key.as_str()),
        ("cert-chain.pem", ""),
        ("root-cert.pem", files.ca_cert.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
    .collect();
    for (k, v) in extra {
        data.insert((*k).to_owned(), ByteString(v.as_bytes().to_vec()));
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            labels: Some([("owner".to_owned(), "istiod".to_owned())].into()),
            annotations: Some([("note".to_owned(), "kept".to_owned())].into()),
            ..ObjectMeta::default()
        },
        type_: Some("istio.io/ca-root".into()),
        data: Some(data),
        ..Secret::default()
    }
}

fn opaque_secret(name: &str, data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            ..ObjectMeta::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Secret::default()
    }
}

fn data_text(secret: &Value, key: &str) -> String {
    use base64::Engine as _;
    let b64 = secret["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} in {:?}", secret["data"]));
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiods_secret_is_adopted_at_generation_1_and_the_first_swap_keeps_the_rest() {
    let fake = cluster().await;
    let admin: Api<Secret> = Api::namespaced(fake.client().await, NS);
    // Exactly istiod's four keys; then the same with a key an operator
    // added beside them.
    for (name, extra) in [
        ("istio-ca-secret", &[][..]),
        ("with-extra", &[("operator-note", "do not remove")][..]),
    ] {
        let legacy = authority();
        let made = admin
            .create(
                &PostParams::default(),
                &istiod_secret(name, legacy.files(), extra),
            )
            .await
            .unwrap();
        let store = store_as(&fake, "ca", name).await;
        let watching = Watching::start(&store).await;
        assert_eq!(
            store.generation().await.unwrap(),
            Some(1),
            "{name}: watched"
        );
        let stored = store.load().await.unwrap().expect("adopted");
        assert_eq!(stored.generation, 1);
        assert_eq!(ids(&stored), [(legacy.id().to_owned(), "active")]);
        let created_at = made.metadata.creation_timestamp.unwrap().0.as_second();
        assert_eq!(stored.members[0].since, u64::try_from(created_at).unwrap());

        let (set, created) = load_or_create(&store, &spec(), None, SystemTime::now())
            .await
            .unwrap();
        assert!(!created, "{name}: adopted, not replaced");
        assert_eq!(set.active().id(), legacy.id());
        let next = set.prepare(authority(), SystemTime::now()).unwrap();
        assert!(store.swap(Some(1), &next.to_stored()).await.unwrap());
        wait_generation(&store, 2, FOLLOW).await;

        let secret = secret_json(&fake, name);
        assert_eq!(secret["type"], "istio.io/ca-root", "{name}");
        assert_eq!(secret["metadata"]["labels"]["owner"], "istiod", "{name}");
        assert_eq!(secret["metadata"]["annotations"]["note"], "kept");
        assert_eq!(
            secret["metadata"]["annotations"][GENERATION_ANNOTATION],
            "2"
        );
        for (k, v) in extra {
            assert_eq!(data_text(&secret, k), *v, "{name}: {k} kept");
        }
        // The active authority is still istiod's, at the top and as a member.
        assert_eq!(data_text(&secret, "ca-cert.pem"), legacy.files().ca_cert);
        assert_eq!(data_text(&secret, "ca-key.pem"), *legacy.files().ca_key);
        assert_eq!(
            data_text(&secret, &format!("{}.ca-key.pem", legacy.id())),
            *legacy.files().ca_key
        );
        assert_eq!(data_text(&secret, "root-cert.pem"), next.bundle_pem());
        let keys = secret["data"].as_object().unwrap().len();
        assert_eq!(keys, 4 + 1 + 2 * 4 + extra.len(), "{name}: {keys} keys");
        let reread = store.load().await.unwrap().unwrap();
        assert_eq!(ids(&reread), ids(&next.to_stored()));
        watching.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugged_in_cacerts_seeds_an_empty_store_and_is_only_read() {
    let fake = cluster().await;
    let tmp = tempfile::tempdir().unwrap();
    common::cacerts::make_cacerts(tmp.path(), false);
    let file = |f: &str| std::fs::read_to_string(tmp.path().join(f)).unwrap();
    let admin: Api<Secret> = Api::namespaced(fake.client().await, NS);
    let cacerts = opaque_secret(
        "cacerts",
        &[
            ("ca-cert.pem", &file("ca-cert.pem")),
            ("ca-key.pem", &file("ca-key.pem")),
            ("cert-chain.pem", &file("cert-chain.pem")),
            ("root-cert.pem", &file("root-cert.pem")),
        ],
    );
    admin
        .create(&PostParams::default(), &cacerts)
        .await
        .unwrap();
    let cacerts_rv = rv(&fake, "cacerts");

    let client = fake.client().await;
    assert!(read_cacerts(&client, NS, "absent").await.unwrap().is_none());
    let seed = read_cacerts(&client, NS, "cacerts")
        .await
        .unwrap()
        .expect("cacerts read");
    assert_eq!(seed.ca_cert, file("ca-cert.pem"));
    assert_eq!(seed.root_cert, file("root-cert.pem"));

    let store = store_as(&fake, "ca", "istio-ca-secret").await;
    let now = SystemTime::now();
    let (set, created) = load_or_create(&store, &spec(), Some(&seed), now)
        .await
        .unwrap();
    assert!(created);
    assert_eq!(set.active().files().ca_cert, seed.ca_cert);
    assert_eq!(set.bundle_pem().trim(), file("root-cert.pem").trim());
    let secret = secret_json(&fake, "istio-ca-secret");
    for f in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        assert_eq!(data_text(&secret, f).trim(), file(f).trim(), "{f}");
    }

    // A seed seeds only an empty store: another replica with another
    // plugged-in CA reads the one stored.
    let other = authority();
    let second = store_as(&fake, "ca-2", "istio-ca-secret").await;
    let (again, created) = load_or_create(&second, &spec(), Some(other.files()), now)
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(again.active().id(), set.active().id());
    assert_eq!(rv(&fake, "cacerts"), cacerts_rv, "cacerts is never written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_secret_is_an_error_and_is_never_overwritten() {
    let fake = cluster().await;
    let store = store_as(&fake, "ca", "ca").await;
    let now = SystemTime::now();
    let (set, _) = load_or_create(&store, &spec(), None, now).await.unwrap();
    let next = set.prepare(authority(), now).unwrap();
    assert!(store.swap(Some(1), &next.to_stored()).await.unwrap());
    // The prepared member's keys vanish (a hand edit); the manifest still
    // names it.
    let gone = next.members()[1].authority.id().to_owned();
    let mut secret = secret_json(&fake, "ca");
    let data = secret["data"].as_object_mut().unwrap();
    let before = data.len();
    data.retain(|k, _| !k.starts_with(&format!("{gone}.")));
    assert_eq!(data.len(), before - 4);
    fake.put_json(secret);
    let corrupt_rv = rv(&fake, "ca");

    let watching = {
        let (tx, rx) = watch::channel(false);
        let task = store.spawn_watch(rx);
        Watching { tx, task }
    };
    fake.reset_counters();
    let fresh = store_as(&fake, "ca-2", "ca").await;
    for (who, s) in [("the store", &store), ("a fresh store", &fresh)] {
        let e = s.load().await.unwrap_err().to_string();
        assert!(e.contains(&gone) && e.contains("missing"), "{who}: {e}");
        let e = load_or_create(s, &spec(), None, now)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&gone), "{who}: {e}");
        let e = load_or_create(s, &spec(), Some(authority().files()), now)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&gone), "{who}, seeded: {e}");
        let fresh_set = AuthoritySet::single_since(authority(), now).unwrap();
        for expected in [None, Some(2)] {
            assert!(
                s.swap(expected, &fresh_set.to_stored()).await.is_err(),
                "{who}: swap from {expected:?}"
            );
        }
    }
    // The watched copy reports it too (once the watch has listed).
    wait_live(&store).await;
    let e = store.generation().await.unwrap_err().to_string();
    assert!(e.contains(&gone), "{e}");
    assert_ne!(store.poll_interval(), WATCHED_POLL_INTERVAL);
    assert_eq!(secret_writes(&fake), Vec::<String>::new());
    assert_eq!(rv(&fake, "ca"), corrupt_rv, "never overwritten");
    watching.stop().await;
}
