//! The PodCertificateRequest signer and the ClusterTrustBundle publisher of
//! real `ca server --kube` processes against the fake API server: every
//! kubelet key type, v1 and v1beta1 (legacy pkixPublicKey requests), the
//! status rules, other signers left alone, a leader killed mid-burst, and
//! the bundle kept current through a root rotation.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fakekube::certificates::CertVersions;
use common::fakekube::kubelet::{self, KeyType, KubeletKey, PodRef, RequestOptions};
use common::fakekube::{FakeKube, FakeOptions};
use common::kubeca::{CA_NS, KubeCluster, wait_ready, within};
use common::{leaf_facts, openssl_verify, webpki_verify};
use serde_json::{Value, json};

const SIGNER: &str = "workload-ca.io/spiffe";
const CTB: &str = "workload-ca.io:spiffe:primary";
const READY: Duration = Duration::from_secs(30);
const CA_USER: &str = "system:serviceaccount:istio-system:workload-ca";

async fn cluster(versions: CertVersions) -> KubeCluster {
    let fake = FakeKube::start_with(FakeOptions {
        certificates: versions,
        ..FakeOptions::default()
    })
    .await;
    fake.create_namespace(CA_NS);
    fake.create_service_account(CA_NS, "workload-ca");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let token = "workload-ca-test-credential";
    fake.add_user_token(token, CA_USER, &["system:serviceaccounts"]);
    fake.write_kubeconfig(&kubeconfig, token);
    fake.create_namespace("shop");
    KubeCluster {
        fake,
        dir,
        kubeconfig,
    }
}

/// A request created as the kubelet would (through HTTP); its name.
async fn create(
    client: &kube::Client,
    version: &str,
    signer: &str,
    pod: &PodRef,
    key: &KubeletKey,
    opts: &RequestOptions,
) -> String {
    use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("certificates.k8s.io", version, "PodCertificateRequest"),
        "podcertificaterequests",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &pod.namespace, &ar);
    let body = kubelet::request(version, signer, pod, key, opts);
    let o = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(body).unwrap(),
        )
        .await
        .unwrap_or_else(|e| panic!("creating a PodCertificateRequest: {e}"));
    o.metadata.name.unwrap()
}

fn pcr(k: &KubeCluster, name: &str) -> Value {
    k.fake
        .get_json("podcertificaterequests", "shop", name)
        .expect("the request exists")
}

fn condition(o: &Value) -> Option<(String, String)> {
    let c = o.pointer("/status/conditions/0")?;
    Some((
        c["type"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
    ))
}

async fn answered(k: &KubeCluster, names: &[String], limit: Duration, ca: &common::procs::CaProc) {
    let start = Instant::now();
    loop {
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| condition(&pcr(k, n)).is_none())
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "{} of {} requests unanswered after {limit:?} (e.g. {}); CA log:\n{}",
            missing.len(),
            names.len(),
            missing[0],
            ca.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn secs(t: &Value) -> i64 {
    let s = t.as_str().unwrap();
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap()
        .unix_timestamp()
}

fn pem_blocks(text: &str) -> Vec<String> {
    pem::parse_many(text)
        .unwrap()
        .into_iter()
        .map(|p| {
            pem::encode_config(
                &p,
                pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
            )
        })
        .collect()
}

/// Checks an Issued request as the kubelet and a TLS peer would.
fn check_issued(o: &Value, key: &KubeletKey, roots: &str, sa: &str) {
    let st = &o["status"];
    let chain_text = st["certificateChain"].as_str().unwrap();
    let mut chain = pem_blocks(chain_text);
    assert!(!chain.is_empty());
    for b in &chain {
        assert!(
            !roots.contains(b.trim()),
            "certificateChain carries no root (pods get roots from the ClusterTrustBundle)"
        );
    }
    chain.push(roots.to_string());
    webpki_verify(&chain);
    openssl_verify(&chain);
    let f = leaf_facts(&chain[0]);
    assert_eq!(f.spki, key.spki_der, "the leaf carries the request's key");
    assert_eq!(
        f.uris,
        vec![format!("spiffe://cluster.local/ns/shop/sa/{sa}")]
    );
    assert!(!f.is_ca);
    let (nb, na, br) = (
        secs(&st["notBefore"]),
        secs(&st["notAfter"]),
        secs(&st["beginRefreshAt"]),
    );
    assert_eq!(
        (nb, na),
        (f.not_before, f.not_after),
        "times equal the leaf's"
    );
    assert_eq!(
        br,
        nb + (na - nb) / 2,
        "beginRefreshAt at half the lifetime"
    );
    assert!(na - nb <= 86_400, "within maxExpirationSeconds");
    assert!(na - nb >= 3600);
}

/// Successful status writes per request name, from the request log.
fn status_writes(k: &KubeCluster) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in k.fake.requests() {
        if r.resource == "podcertificaterequests"
            && r.subresource == "status"
            && matches!(r.verb.as_str(), "update" | "patch")
            && r.code < 300
        {
            *m.entry(r.name).or_insert(0) += 1;
        }
    }
    m
}

fn ctb(k: &KubeCluster) -> Option<Value> {
    k.fake.get_json("clustertrustbundles", "", CTB)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signs_every_supported_key_type_and_denies_the_rest() {
    let k = cluster(CertVersions::BOTH).await;
    let ca = k.start_ca(
        "a",
        &[
            "--pod-certificates",
            "--cluster-trust-bundle",
            "--lease-duration",
            "3s",
        ],
    );
    wait_ready(&ca, READY).await;
    let client = k.fake.client().await;
    let mut expect: Vec<(String, KubeletKey, Option<&str>)> = Vec::new();
    for kt in KeyType::ALL {
        let key = KubeletKey::generate(kt);
        let pod = PodRef::new("shop", &format!("p-{}", kt.name().to_lowercase()), "web");
        let name = create(
            &client,
            "v1",
            SIGNER,
            &pod,
            &key,
            &RequestOptions::default(),
        )
        .await;
        let denial = (kt == KeyType::EcdsaP521).then_some("UnsupportedKeyType");
        expect.push((name, key, denial));
    }
    // A kubelet before 1.36: pkixPublicKey + proofOfPossession (v1beta1).
    let legacy_key = KubeletKey::generate(KeyType::EcdsaP384);
    let pod = PodRef::new("shop", "legacy", "web");
    let legacy_opts = RequestOptions {
        legacy: true,
        ..Default::default()
    };
    let legacy = create(&client, "v1beta1", SIGNER, &pod, &legacy_key, &legacy_opts).await;
    expect.push((legacy, legacy_key, None));
    // A user annotation we do not know.
    let key = KubeletKey::generate(KeyType::EcdsaP256);
    let opts = RequestOptions {
        user_annotations: [("example.com/flavour".to_string(), "x".to_string())].into(),
        ..Default::default()
    };
    let annotated = create(
        &client,
        "v1",
        SIGNER,
        &PodRef::new("shop", "ann", "web"),
        &key,
        &opts,
    )
    .await;
    expect.push((annotated, key, Some("InvalidUnverifiedUserAnnotations")));
    // Another signer's request.
    let key = KubeletKey::generate(KeyType::EcdsaP256);
    let other = create(
        &client,
        "v1",
        "example.com/other",
        &PodRef::new("shop", "other", "web"),
        &key,
        &RequestOptions::default(),
    )
    .await;

    let names: Vec<String> = expect.iter().map(|(n, _, _)| n.clone()).collect();
    answered(&k, &names, Duration::from_secs(30), &ca).await;
    let (bundle, _) = within(Duration::from_secs(10), || async {
        ctb(&k).map(|c| c["spec"]["trustBundle"].as_str().unwrap().to_string())
    })
    .await;
    assert_eq!(
        bundle.trim(),
        ca.root_pem().trim(),
        "the ClusterTrustBundle holds the CA's roots"
    );
    let c = ctb(&k).unwrap();
    assert_eq!(c["spec"]["signerName"], json!(SIGNER));
    assert_eq!(
        c["metadata"]["labels"]["workload-ca.io/bundle"],
        json!("primary")
    );
    for (name, key, denial) in &expect {
        let o = pcr(&k, name);
        let (ty, reason) = condition(&o).unwrap();
        match denial {
            None => {
                assert_eq!(ty, "Issued", "{name}: {o}");
                check_issued(&o, key, &bundle, "web");
            }
            Some(r) => {
                assert_eq!((ty.as_str(), reason.as_str()), ("Denied", *r), "{name}");
                assert!(o["status"].get("certificateChain").is_none());
            }
        }
        assert_eq!(o["status"]["conditions"].as_array().unwrap().len(), 1);
    }
    let p521 = pcr(&k, &expect[4].0);
    assert!(
        p521["status"]["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("ECDSAP256"),
        "the denial suggests a supported key type"
    );

    // Exactly one status write each, all by the CA; the other signer's
    // request is never touched.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = status_writes(&k);
    for n in &names {
        assert_eq!(writes.get(n), Some(&1), "{n}: {writes:?}");
    }
    assert!(
        !writes.contains_key(&other),
        "another signer's request was written"
    );
    assert!(
        pcr(&k, &other)
            .get("status")
            .is_none_or(|s| s.get("conditions").is_none())
    );
    let touched = k
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.name == other && r.verb != "create")
        .count();
    assert_eq!(touched, 0);

    // The status is immutable once set: a second write is refused.
    use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("certificates.k8s.io", "v1", "PodCertificateRequest"),
        "podcertificaterequests",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "shop", &ar);
    let mut again = api.get(&names[0]).await.unwrap();
    again.data["status"]["conditions"] = json!([{"type": "Failed", "status": "True", "reason": "Late",
        "message": "x", "lastTransitionTime": "2026-01-01T00:00:00Z"}]);
    let e = api
        .replace_status(&names[0], &PostParams::default(), &again)
        .await
        .unwrap_err();
    let kube::Error::Api(s) = e else {
        panic!("{e}")
    };
    assert_eq!(s.code, 422);
    assert!(
        s.message
            .contains("immutable after PodCertificateRequest is issued, denied, or failed"),
        "{}",
        s.message
    );
    assert!(
        ca.metric("workload_ca_pod_certificate_requests_total")
            .await
            >= 8.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_whichever_versions_the_cluster_serves() {
    for versions in [CertVersions::V1_ONLY, CertVersions::V1BETA1_ONLY] {
        let k = cluster(versions).await;
        let ca = k.start_ca("a", &["--pod-certificates", "--cluster-trust-bundle"]);
        wait_ready(&ca, READY).await;
        let client = k.fake.client().await;
        let version = if versions.v1 { "v1" } else { "v1beta1" };
        let mut reqs = Vec::new();
        let key = KubeletKey::generate(KeyType::Ed25519);
        let name = create(
            &client,
            version,
            SIGNER,
            &PodRef::new("shop", "stub", "web"),
            &key,
            &RequestOptions::default(),
        )
        .await;
        reqs.push((name, key));
        if !versions.v1 {
            let key = KubeletKey::generate(KeyType::Rsa3072);
            let opts = RequestOptions {
                legacy: true,
                ..Default::default()
            };
            let name = create(
                &client,
                version,
                SIGNER,
                &PodRef::new("shop", "legacy", "api"),
                &key,
                &opts,
            )
            .await;
            reqs.push((name, key));
        }
        let names: Vec<String> = reqs.iter().map(|(n, _)| n.clone()).collect();
        answered(&k, &names, Duration::from_secs(30), &ca).await;
        let (bundle, _) = within(Duration::from_secs(10), || async {
            ctb(&k).map(|c| c["spec"]["trustBundle"].as_str().unwrap().to_string())
        })
        .await;
        for (i, (name, key)) in reqs.iter().enumerate() {
            let o = pcr(&k, name);
            assert_eq!(
                condition(&o).unwrap().0,
                "Issued",
                "{versions:?} {name}: {o}"
            );
            check_issued(&o, key, &bundle, if i == 0 { "web" } else { "api" });
        }
        let log = ca.log_text();
        assert!(
            log.contains(&format!("\"version\":\"{version}\""))
                || log.contains(&format!("version={version}"))
                || log.contains(version),
            "{log}"
        );
    }
}

fn leads(ca: &common::procs::CaProc) -> bool {
    ca.log_text()
        .contains("leading: single-writer work runs here")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_mid_burst_loses_and_duplicates_nothing() {
    let k = cluster(CertVersions::BOTH).await;
    let args = [
        "--pod-certificates",
        "--lease-duration",
        "3s",
        "--pcr-max-in-flight",
        "4",
    ];
    let a = k.start_ca("a", &args);
    wait_ready(&a, READY).await;
    let b = k.start_ca("b", &args);
    wait_ready(&b, READY).await;
    let (first, _) = within(Duration::from_secs(10), || async {
        match (leads(&a), leads(&b)) {
            (true, false) => Some(0),
            (false, true) => Some(1),
            _ => None,
        }
    })
    .await;
    let (leader, other) = if first == 0 { (a, b) } else { (b, a) };
    // The burst: 300 pods' requests, made up front, created at once.
    const N: usize = 300;
    let bodies: Vec<Value> = (0..N)
        .map(|i| {
            let key = KubeletKey::generate(KeyType::EcdsaP256);
            kubelet::request(
                "v1",
                SIGNER,
                &PodRef::new("shop", &format!("burst-{i}"), "web"),
                &key,
                &RequestOptions::default(),
            )
        })
        .collect();
    let mut names = Vec::new();
    for b in bodies {
        names.push(
            k.fake.create_json(b).unwrap()["metadata"]["name"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // Kill the leader while it is signing.
    let (_, _) = within(Duration::from_secs(20), || async {
        let done = names
            .iter()
            .filter(|n| condition(&pcr(&k, n)).is_some())
            .count();
        (done >= 20).then_some(())
    })
    .await;
    let done_at_kill = names
        .iter()
        .filter(|n| condition(&pcr(&k, n)).is_some())
        .count();
    leader.kill9();
    println!("leader killed with {done_at_kill} of {N} answered");
    assert!(
        done_at_kill < N,
        "the burst was over before the kill; make it bigger"
    );
    answered(&k, &names, Duration::from_secs(60), &other).await;
    assert!(leads(&other), "the other replica took over");
    let writes = status_writes(&k);
    for n in &names {
        let o = pcr(&k, n);
        assert_eq!(
            o["status"]["conditions"].as_array().unwrap().len(),
            1,
            "{n}"
        );
        assert_eq!(condition(&o).unwrap().0, "Issued", "{n}");
        assert_eq!(
            writes.get(n),
            Some(&1),
            "{n}: exactly one successful status write"
        );
    }
    let conflicts = k
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.subresource == "status" && r.code == 409)
        .count();
    println!("status writes that lost a race (409): {conflicts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trust_bundle_holds_a_prepared_root_before_activation() {
    let k = cluster(CertVersions::V1_ONLY).await;
    let started = Instant::now();
    let ca = k.start_ca(
        "a",
        &[
            "--pod-certificates",
            "--cluster-trust-bundle",
            "--bundle-propagation",
            "2s",
            "--lease-duration",
            "3s",
        ],
    );
    wait_ready(&ca, READY).await;
    // A pod certificate of the first authority: its pod takes roots from
    // the ClusterTrustBundle, so it holds retirement only, not activation.
    let client = k.fake.client().await;
    let key = KubeletKey::generate(KeyType::EcdsaP256);
    let pod = PodRef::new("shop", "before-rotation", "web");
    let early = create(
        &client,
        "v1",
        SIGNER,
        &pod,
        &key,
        &RequestOptions::default(),
    )
    .await;
    answered(
        &k,
        std::slice::from_ref(&early),
        Duration::from_secs(20),
        &ca,
    )
    .await;
    assert_eq!(condition(&pcr(&k, &early)).unwrap().0, "Issued");
    let (first, _) = within(Duration::from_secs(15), || async {
        ctb(&k).map(|c| c["spec"]["trustBundle"].as_str().unwrap().to_string())
    })
    .await;
    assert_eq!(first.trim(), ca.root_pem().trim());
    // An edit is repaired.
    let mut edited = ctb(&k).unwrap();
    edited["spec"]["trustBundle"] = json!(common::authority().roots().pem());
    k.fake.put_json(edited);
    within(Duration::from_secs(10), || async {
        (ctb(&k).unwrap()["spec"]["trustBundle"]
            .as_str()
            .unwrap()
            .trim()
            == first.trim())
        .then_some(())
    })
    .await;
    let rotate = |step: &str| {
        Command::new(env!("CARGO_BIN_EXE_ca"))
            .args(["rotate-root", step, "--state-dir"])
            .arg(&ca.state)
            .output()
            .unwrap()
    };
    // Wait out the server's start-up settle window (twice the fleet's
    // 5 s save interval from its start), so that nothing but the bundle
    // copies can hold the activate gate.
    let settled = started + Duration::from_secs(11);
    tokio::time::sleep(settled.saturating_duration_since(Instant::now())).await;
    // The bundle's writes fail for a while: the activate gate stays shut.
    k.fake.fail_next("update", "clustertrustbundles", 500, 4);
    let out = rotate("prepare");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (prepared, _) = within(Duration::from_secs(5), || async {
        let r = ca.root_pem();
        (r.matches("BEGIN CERTIFICATE").count() == 2).then_some(r)
    })
    .await;
    let out = rotate("activate");
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "activation before the ClusterTrustBundle is current"
    );
    assert!(said.contains("ClusterTrustBundle"), "{said}");
    // Activation goes through only once it holds the prepared bundle and
    // its readers had the propagation time (2 s) to see it.
    let start = Instant::now();
    let mut held_since: Option<Instant> = None;
    let activated = loop {
        let holds = ctb(&k).unwrap()["spec"]["trustBundle"]
            .as_str()
            .unwrap()
            .to_string();
        if holds.trim() == prepared.trim() {
            held_since.get_or_insert_with(Instant::now);
        }
        let out = rotate("activate");
        if out.status.success() {
            break Instant::now();
        }
        let why = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            why.contains("ClusterTrustBundle"),
            "only the bundle holds the gate: {why}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "activate still gated: {why}\n{}",
            ca.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let held =
        held_since.expect("the ClusterTrustBundle held the prepared bundle before activation");
    let waited = activated.duration_since(held);
    println!(
        "activated {waited:?} after the ClusterTrustBundle was seen holding the prepared bundle"
    );
    assert!(
        waited >= Duration::from_millis(1500),
        "the propagation time was not waited for: {waited:?}"
    );
    let failed = k
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.resource == "clustertrustbundles" && r.verb == "update" && r.code == 500)
        .count();
    assert_eq!(failed, 4, "the injected failures were met");
    // The pod certificate of the retiring authority holds retirement.
    let out = rotate("retire");
    let why = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "retired under a valid pod certificate"
    );
    assert!(
        why.contains("issued to clients that are not workload-ca agents are valid until"),
        "{why}"
    );
}

#[test]
fn pod_certificates_with_a_maximum_under_an_hour_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ca"))
        .args([
            "server",
            "--kube",
            "--pod-certificates",
            "--max-ttl",
            "30m",
            "--default-ttl",
            "10m",
            "--state-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        said.contains("--pod-certificates needs --max-ttl of at least 1h"),
        "{said}"
    );
}
