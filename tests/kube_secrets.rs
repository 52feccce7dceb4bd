//! Secret mode and root ConfigMaps: real `ca server --kube` processes
//! against the fake API server. Every Secret's chain is checked by
//! rustls-webpki and openssl; rotations, repairs, foreign objects and a
//! change of leader are watched through the fake's objects and request log.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::fakekube::FakeKube;
use common::kubeca::{KubeCluster, wait_ready, within};
use common::procs::CaProc;
use common::{ders, leaf_facts, openssl_verify, webpki_verify};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(30);
const MESH: [&str; 4] = ["mesh-0", "mesh-1", "mesh-2", "mesh-3"];

/// Four namespaces labelled `team=mesh`, 50 service accounts each (49
/// and `default`), one unlabelled namespace with an account, and
/// kube-system labelled too (excluded by default).
fn populate(fake: &FakeKube) {
    for ns in MESH.iter().chain(["plain"].iter()) {
        let labels = if *ns == "plain" {
            json!({})
        } else {
            json!({"team": "mesh"})
        };
        fake.create_json(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": labels}}))
            .unwrap();
    }
    let mut ks = fake.get_json("namespaces", "", "kube-system").unwrap();
    ks["metadata"]["labels"]["team"] = json!("mesh");
    fake.put_json(ks);
    for ns in MESH {
        for i in 0..49 {
            fake.create_service_account(ns, &format!("app-{i}"));
        }
    }
    fake.create_service_account("plain", "lonely");
}

fn b64(v: &Value) -> String {
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or(""))
            .unwrap_or_default(),
    )
    .unwrap_or_default()
}

/// The `istio.io/key-and-cert` Secrets of the managed namespaces.
fn secrets(fake: &FakeKube) -> Vec<Value> {
    MESH.iter()
        .flat_map(|ns| fake.list_json("secrets", ns))
        .filter(|s| s["type"] == "istio.io/key-and-cert")
        .collect()
}

/// A Secret's chain as `webpki_verify` takes it: leaf, intermediates,
/// then the bundle.
fn chain_of(s: &Value) -> Vec<String> {
    let mut chain: Vec<String> = ders(&b64(&s["data"]["cert-chain.pem"]))
        .into_iter()
        .map(|d| workload_ca::ca::bundle::to_pem("CERTIFICATE", &d))
        .collect();
    chain.push(b64(&s["data"]["root-cert.pem"]));
    chain
}

/// Checks one Secret fully: layout, ownership, identity, key, chain
/// (webpki always, openssl when `openssl` is set).
fn check_secret(fake: &FakeKube, s: &Value, bundle: &str, openssl: bool) {
    let ns = s["metadata"]["namespace"].as_str().unwrap();
    let name = s["metadata"]["name"].as_str().unwrap();
    let sa = name.strip_prefix("istio.").unwrap();
    assert_eq!(
        s["metadata"]["annotations"]["istio.io/service-account.name"],
        sa
    );
    assert_eq!(
        s["metadata"]["labels"]["workload-ca.io/managed-by"],
        "workload-ca"
    );
    let account = fake.get_json("serviceaccounts", ns, sa).unwrap();
    let owner = &s["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "ServiceAccount");
    assert_eq!(owner["name"], sa);
    assert_eq!(owner["uid"], account["metadata"]["uid"]);
    assert_eq!(b64(&s["data"]["root-cert.pem"]), bundle, "{ns}/{name}");
    let chain = chain_of(s);
    assert_eq!(
        chain.len(),
        2,
        "leaf alone in cert-chain.pem (a root CA signs)"
    );
    webpki_verify(&chain);
    if openssl {
        openssl_verify(&chain);
    }
    let facts = leaf_facts(&chain[0]);
    assert_eq!(
        facts.uris,
        [format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")]
    );
    let key = workload_ca::ca::PrivateKey::from_pem(&b64(&s["data"]["key.pem"])).unwrap();
    assert_eq!(key.kind(), "ecdsa-p256");
    assert_eq!(key.spki_der(), facts.spki, "key.pem matches the leaf");
}

/// The CA's bundle as it serves it.
fn bundle_of(ca: &CaProc) -> String {
    ca.root_pem()
}

/// Polls until every one of `n` Secrets holds `bundle` (and, with
/// `signer`, a leaf that verifies with that root alone).
async fn all_secrets_hold(fake: &FakeKube, n: usize, bundle: &str, limit: Duration) -> Duration {
    let (_, took) = within(limit, || async {
        let s = secrets(fake);
        (s.len() == n && s.iter().all(|s| b64(&s["data"]["root-cert.pem"]) == bundle)).then_some(())
    })
    .await;
    took
}

fn configmaps_hold(fake: &FakeKube, bundle: &str) -> bool {
    MESH.iter().all(|ns| {
        fake.get_json("configmaps", ns, "istio-ca-root-cert")
            .is_some_and(|c| c["data"]["root-cert.pem"] == bundle)
    })
}

async fn gauge(ca: &CaProc, kind: &str, state: &str) -> f64 {
    let body = common::http_get(ca.ops, "/metrics").await.1;
    let want = format!("workload_ca_bundle_copies{{kind=\"{kind}\",state=\"{state}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&want)?.parse().ok())
        .unwrap_or(-1.0)
}

const ARGS: [&str; 6] = [
    "--secret-mode-namespaces",
    "team=mesh",
    "--root-configmap-namespaces",
    "team=mesh",
    "--bundle-propagation",
    "1s",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_for_every_account_repaired_recreated_and_foreign_ones_left_alone() {
    let k = KubeCluster::start().await;
    populate(&k.fake);
    // A foreign istio.<sa> Secret and istiod's ConfigMap, there first.
    k.fake
        .create_json(
            json!({"apiVersion": "v1", "kind": "Secret", "type": "istio.io/key-and-cert",
            "metadata": {"name": "istio.app-7", "namespace": "mesh-1",
                         "annotations": {"istio.io/service-account.name": "app-7"}},
            "data": {"key.pem": "", "cert-chain.pem": "", "root-cert.pem": ""}}),
        )
        .unwrap();
    k.fake
        .create_json(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "istio-ca-root-cert", "namespace": "mesh-3",
                         "labels": {"istio.io/config": "true"}},
            "data": {"root-cert.pem": "istiod's root"}}))
        .unwrap();
    let ca = k.start_ca("a", &ARGS);
    wait_ready(&ca, READY).await;
    let bundle = bundle_of(&ca);

    // 199 of ours (one name is taken), all current.
    let (_, took) = within(Duration::from_secs(30), || async {
        let ours = secrets(&k.fake)
            .into_iter()
            .filter(|s| s["metadata"]["labels"]["workload-ca.io/managed-by"] == "workload-ca")
            .count();
        (ours == 199).then_some(())
    })
    .await;
    println!("199 Secrets written in {took:?}");
    let all = secrets(&k.fake);
    assert_eq!(all.len(), 200);
    for s in &all {
        if s["metadata"]["name"] == "istio.app-7" && s["metadata"]["namespace"] == "mesh-1" {
            continue;
        }
        check_secret(&k.fake, s, &bundle, true);
    }
    assert!(
        k.fake
            .list_json("secrets", "plain")
            .iter()
            .all(|s| s["type"] != "istio.io/key-and-cert")
    );
    assert!(
        k.fake
            .list_json("secrets", "kube-system")
            .iter()
            .all(|s| s["type"] != "istio.io/key-and-cert")
    );
    // The foreign Secret is untouched, and an Event names it.
    let foreign = k.fake.get_json("secrets", "mesh-1", "istio.app-7").unwrap();
    assert_eq!(foreign["data"]["key.pem"], "");
    assert!(foreign["metadata"]["labels"].is_null());
    let (event, _) = within(Duration::from_secs(10), || async {
        k.fake
            .list_json("events", "mesh-1")
            .into_iter()
            .find(|e| e["involvedObject"]["name"] == "istio.app-7")
    })
    .await;
    assert_eq!(event["reason"], "SecretNotOwned");
    assert_eq!(event["involvedObject"]["kind"], "Secret");
    // Counted, and not current: it does not hold the live bundle, so it
    // would hold a root rotation (its readers would not learn the root).
    assert_eq!(gauge(&ca, "secrets", "foreign").await, 1.0);
    assert_eq!(gauge(&ca, "secrets", "total").await, 200.0);
    assert_eq!(gauge(&ca, "secrets", "current").await, 199.0);

    // ConfigMaps: ours in three namespaces, istiod's left alone.
    within(Duration::from_secs(10), || async {
        MESH[..3]
            .iter()
            .all(|ns| {
                k.fake
                    .get_json("configmaps", ns, "istio-ca-root-cert")
                    .is_some_and(|c| c["data"]["root-cert.pem"] == bundle.as_str())
            })
            .then_some(())
    })
    .await;
    let istiod = k
        .fake
        .get_json("configmaps", "mesh-3", "istio-ca-root-cert")
        .unwrap();
    assert_eq!(istiod["data"]["root-cert.pem"], "istiod's root");
    assert!(
        k.fake
            .get_json("configmaps", "plain", "istio-ca-root-cert")
            .is_none()
    );
    assert!(
        k.fake
            .get_json("configmaps", "kube-system", "istio-ca-root-cert")
            .is_none()
    );
    within(Duration::from_secs(10), || async {
        k.fake.list_json("events", "mesh-3").into_iter().find(|e| {
            e["involvedObject"]["name"] == "istio-ca-root-cert"
                && e["reason"] == "ConfigMapNotOwned"
        })
    })
    .await;

    // Nothing valid is rewritten while nothing changes.
    let writes = || k.fake.count("create", "secrets") + k.fake.count("update", "secrets");
    let before = writes();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(writes(), before, "valid Secrets are left as they are");

    // Deleted: recreated.
    let old = k.fake.get_json("secrets", "mesh-0", "istio.app-3").unwrap();
    assert!(k.fake.delete("secrets", "mesh-0", "istio.app-3"));
    let (again, took) = within(Duration::from_secs(10), || async {
        k.fake.get_json("secrets", "mesh-0", "istio.app-3")
    })
    .await;
    println!("a deleted Secret came back after {took:?}");
    assert_ne!(again["metadata"]["uid"], old["metadata"]["uid"]);
    check_secret(&k.fake, &again, &bundle, true);

    // Tampered with: repaired (a key that is not the leaf's, a wrong
    // root bundle, a wrong annotation).
    let other_key =
        workload_ca::ca::PrivateKey::generate(workload_ca::ca::KeyAlgorithm::EcdsaP256).unwrap();
    let b = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
    for (name, field, value) in [
        (
            "istio.app-4",
            "/data/key.pem",
            json!(b(&other_key.to_pem())),
        ),
        (
            "istio.app-5",
            "/data/root-cert.pem",
            json!(b(&common::authority().roots().pem())),
        ),
        (
            "istio.app-6",
            "/metadata/annotations/istio.io~1service-account.name",
            json!("app-9"),
        ),
    ] {
        let mut s = k.fake.get_json("secrets", "mesh-2", name).unwrap();
        *s.pointer_mut(field).unwrap() = value;
        k.fake.put_json(s);
        let (fixed, took) = within(Duration::from_secs(10), || async {
            let s = k.fake.get_json("secrets", "mesh-2", name)?;
            (s["metadata"]["annotations"]["istio.io/service-account.name"]
                == name.trim_start_matches("istio.")
                && b64(&s["data"]["root-cert.pem"]) == bundle
                && workload_ca::ca::PrivateKey::from_pem(&b64(&s["data"]["key.pem"]))
                    .is_ok_and(|k| k.spki_der() == leaf_facts(&chain_of(&s)[0]).spki))
            .then_some(s)
        })
        .await;
        println!("{name} ({field}) repaired after {took:?}");
        check_secret(&k.fake, &fixed, &bundle, true);
    }
    // A ConfigMap tampered with or deleted: repaired.
    let mut cm = k
        .fake
        .get_json("configmaps", "mesh-0", "istio-ca-root-cert")
        .unwrap();
    cm["data"]["root-cert.pem"] = json!("garbage");
    k.fake.put_json(cm);
    assert!(k.fake.delete("configmaps", "mesh-1", "istio-ca-root-cert"));
    within(Duration::from_secs(10), || async {
        MESH[..3]
            .iter()
            .all(|ns| {
                k.fake
                    .get_json("configmaps", ns, "istio-ca-root-cert")
                    .is_some_and(|c| c["data"]["root-cert.pem"] == bundle.as_str())
            })
            .then_some(())
    })
    .await;

    // A deleted account takes its Secret with it (garbage collection),
    // and it is not written again.
    assert!(k.fake.delete("serviceaccounts", "mesh-3", "app-0"));
    assert!(
        k.fake
            .get_json("secrets", "mesh-3", "istio.app-0")
            .is_none()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        k.fake
            .get_json("secrets", "mesh-3", "istio.app-0")
            .is_none()
    );
    within(Duration::from_secs(10), || async {
        (gauge(&ca, "secrets", "total").await == 199.0).then_some(())
    })
    .await;

    // A namespace leaves the selector: its Secrets (ours, still mounted)
    // are no longer rewritten but still counted, so a rotation waits for
    // them (until they hold its bundle or someone deletes them).
    let mut ns = k.fake.get_json("namespaces", "", "mesh-2").unwrap();
    ns["metadata"]["labels"] = json!({});
    k.fake.put_json(ns);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(gauge(&ca, "secrets", "total").await, 199.0);
    assert_eq!(gauge(&ca, "secrets", "current").await, 198.0);
    common::procs::assert_log_safe(&ca.log_text(), "text");
    assert!(!ca.log_text().contains("PRIVATE KEY"), "no key in the log");
}

/// Retries a gated step until it is taken (at most `limit`); the refusals
/// seen on the way.
async fn step_when_open(ca: &CaProc, step: &str, limit: Duration) -> Vec<String> {
    let start = Instant::now();
    let mut refusals = Vec::new();
    loop {
        let (ok, text) = ca.rotate_root(step);
        if ok {
            return refusals;
        }
        refusals.push(text);
        assert!(
            start.elapsed() < limit,
            "{step} never opened: {}\n{}",
            refusals.last().unwrap(),
            ca.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_rewrites_every_copy_before_each_gate_opens() {
    let k = KubeCluster::start().await;
    populate(&k.fake);
    // Slow writes: 200 Secrets take about 5 s, long enough to see the
    // gate held.
    let mut args = ARGS.to_vec();
    args.extend(["--kube-write-rate", "40"]);
    let ca = k.start_ca("a", &args);
    wait_ready(&ca, READY).await;
    let old = bundle_of(&ca);
    all_secrets_hold(&k.fake, 200, &old, Duration::from_secs(30)).await;

    let (ok, text) = ca.rotate_root("prepare");
    assert!(ok, "{text}");
    // The served bundle file follows the store within moments.
    let (prepared, _) = within(Duration::from_secs(5), || async {
        let b = bundle_of(&ca);
        (b.matches("BEGIN CERTIFICATE").count() == 2).then_some(b)
    })
    .await;
    // At once: the gate is held by the copies still behind.
    let (ok, text) = ca.rotate_root("activate");
    assert!(!ok, "activate must wait for the copies: {text}");
    assert!(
        text.contains("Secrets istio.<sa> hold bundle generation"),
        "{text}"
    );
    let (_, status) = ca.rotate_root("status");
    println!("{status}");
    assert!(status.contains("Secrets istio.<sa>: "), "{status}");
    assert!(status.contains(" of 200 hold generation"), "{status}");
    assert!(
        status.contains("ConfigMaps istio-ca-root-cert: "),
        "{status}"
    );

    let refusals = step_when_open(&ca, "activate", Duration::from_secs(60)).await;
    println!("activate refused {} times first", refusals.len());
    // At activation every copy held the prepared bundle (both roots);
    // nothing rewrote them since but to the activated set's, which holds
    // the same two roots.
    let new_root = ders(&prepared)
        .into_iter()
        .find(|d| !ders(&old).contains(d))
        .unwrap();
    for s in secrets(&k.fake) {
        let roots = ders(&b64(&s["data"]["root-cert.pem"]));
        assert_eq!(roots.len(), 2, "{}", s["metadata"]["name"]);
        assert!(roots.contains(&new_root));
        webpki_verify(&chain_of(&s));
    }
    for ns in MESH {
        let cm = k
            .fake
            .get_json("configmaps", ns, "istio-ca-root-cert")
            .unwrap();
        assert!(ders(cm["data"]["root-cert.pem"].as_str().unwrap()).contains(&new_root));
    }

    // Retire waits until every leaf is the new authority's.
    let refusals = step_when_open(&ca, "retire", Duration::from_secs(60)).await;
    assert!(
        refusals.iter().any(|r| r.contains("Secrets istio.<sa>")),
        "retire was held by the Secrets at least once: {refusals:?}"
    );
    let new_only = workload_ca::ca::bundle::to_pem("CERTIFICATE", &new_root);
    let (final_bundle, _) = within(Duration::from_secs(5), || async {
        let b = bundle_of(&ca);
        (b.trim() == new_only.trim()).then_some(b)
    })
    .await;
    all_secrets_hold(&k.fake, 200, &final_bundle, Duration::from_secs(30)).await;
    for (i, s) in secrets(&k.fake).iter().enumerate() {
        check_secret(&k.fake, s, &final_bundle, i % 20 == 0);
    }
    within(Duration::from_secs(10), || async {
        configmaps_hold(&k.fake, &final_bundle).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_resumes_without_rewriting_valid_secrets() {
    let k = KubeCluster::start().await;
    populate(&k.fake);
    let mut args = ARGS.to_vec();
    args.extend(["--lease-duration", "3s"]);
    let a = k.start_ca("a", &args);
    wait_ready(&a, READY).await;
    let b = k.start_ca("b", &args);
    wait_ready(&b, READY).await;
    let bundle = bundle_of(&a);
    all_secrets_hold(&k.fake, 200, &bundle, Duration::from_secs(30)).await;
    within(Duration::from_secs(10), || async {
        configmaps_hold(&k.fake, &bundle).then_some(())
    })
    .await;
    let leads = |ca: &CaProc| ca.log_text().contains("leading: keeping the copies");
    let (first, _) = within(Duration::from_secs(10), || async {
        match (leads(&a), leads(&b)) {
            (true, false) => Some(0),
            (false, true) => Some(1),
            _ => None,
        }
    })
    .await;
    let (leader, other) = if first == 0 { (a, b) } else { (b, a) };
    // The follower writes nothing and says so.
    assert_eq!(gauge(&other, "secrets", "total").await, -1.0);
    let (_, status) = other.rotate_root("status");
    assert!(status.contains("Secrets istio.<sa>"), "{status}");
    // Writes of copies (the replicas' evidence ConfigMaps in istio-system
    // are written all along, and not counted).
    let writes = |k: &KubeCluster| {
        k.fake
            .requests()
            .into_iter()
            .filter(|r| {
                matches!(r.verb.as_str(), "create" | "update" | "patch" | "delete")
                    && MESH.contains(&r.namespace.as_str())
                    && matches!(r.resource.as_str(), "secrets" | "configmaps")
            })
            .count()
    };
    let before = writes(&k);
    assert!(
        before >= 204,
        "200 Secrets and 4 ConfigMaps were written: {before}"
    );
    leader.kill9();
    let killed = Instant::now();
    within(Duration::from_secs(20), || async {
        (leads(&other) && gauge(&other, "secrets", "current").await == 200.0).then_some(())
    })
    .await;
    println!(
        "the other replica counted 200 current Secrets {:?} after the kill",
        killed.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(writes(&k), before, "no valid Secret or ConfigMap rewritten");
    // And it does write: a deleted Secret comes back.
    assert!(k.fake.delete("secrets", "mesh-2", "istio.app-1"));
    let (s, _) = within(Duration::from_secs(10), || async {
        k.fake.get_json("secrets", "mesh-2", "istio.app-1")
    })
    .await;
    check_secret(&k.fake, &s, &bundle, true);
}
