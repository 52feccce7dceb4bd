//! Scenarios that drive every code path of `ca server --kube` that calls
//! the API server, each on a fresh fake cluster (`KubeCluster`, the CA as
//! `system:serviceaccount:istio-system:workload-ca`). The fake logs every
//! request; the test checks the CA's against the RBAC of deploy/.
//!
//! A new controller adds its scenario to [`SCENARIOS`] (and its rules to
//! deploy/ca/rbac.yaml): a rule no scenario uses fails the test.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::fakekube::RequestRecord;
use crate::common::kubeca::{CA_NS, KubeCluster, issue, wait_ready, within};
use crate::common::procs::{AgentProc, CaProc, fetch_default};
use crate::common::sds::SotwStream;

/// The CA's user in the scenarios (KubeCluster's credential).
pub const CA_USER: &str = "system:serviceaccount:istio-system:workload-ca";
/// The node agent's service account in the scenarios.
pub const AGENT_SA: &str = "workload-ca-agent";
pub const AGENT_USER: &str = "system:serviceaccount:istio-system:workload-ca-agent";

const READY: Duration = Duration::from_secs(30);

type Run = for<'a> fn(&'a Env) -> Pin<Box<dyn Future<Output = ()> + 'a>>;

pub struct Scenario {
    pub name: &'static str,
    /// The CA environment variable that turns on what it exercises; its
    /// calls count only for overlays that set it. `None`: always on.
    pub feature: Option<&'static str>,
    pub run: Run,
}

/// Every scenario; each one's API calls are checked.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "two replicas: JWKS, leader election and release, evidence, node agent, rotation",
        feature: None,
        run: |e| Box::pin(replicas(e)),
    },
    Scenario {
        name: "--token-review",
        feature: Some("CA_TOKEN_REVIEW"),
        run: |e| Box::pin(token_review(e)),
    },
    Scenario {
        name: "plugged-in cacerts Secret",
        feature: None,
        run: |e| Box::pin(plugged_in(e)),
    },
    Scenario {
        name: "--serving-secret (istiod's certificate)",
        feature: Some("CA_SERVING_SECRETS"),
        run: |e| Box::pin(serving_secret(e)),
    },
    Scenario {
        name: "secret mode (istio.<sa> Secrets, Events)",
        feature: Some("CA_SECRET_MODE_NAMESPACES"),
        run: |e| Box::pin(secret_mode(e)),
    },
    Scenario {
        name: "root ConfigMaps (istio-ca-root-cert, Events)",
        feature: Some("CA_ROOT_CONFIGMAP_NAMESPACES"),
        run: |e| Box::pin(root_configmaps(e)),
    },
    Scenario {
        name: "PodCertificateRequest signer",
        feature: Some("CA_POD_CERTIFICATES"),
        run: |e| Box::pin(pod_certificates(e)),
    },
    Scenario {
        name: "ClusterTrustBundle publisher",
        feature: Some("CA_CLUSTER_TRUST_BUNDLE"),
        run: |e| Box::pin(trust_bundle(e)),
    },
];

/// The signer name of the PodCertificateRequest and ClusterTrustBundle
/// scenarios (the CA's default).
pub const SIGNER: &str = "workload-ca.io/spiffe";

/// The serving Secret of [`serving_secret`]: the istio overlay's.
pub const SERVING_SECRET: &str = "istiod-tls";

/// A scenario's cluster and what it scraped.
pub struct Env {
    pub k: KubeCluster,
    /// Metric sample names seen on the CAs' and agents' /metrics.
    pub ca_metrics: Mutex<BTreeSet<String>>,
    pub agent_metrics: Mutex<BTreeSet<String>>,
}

/// The sample names of a Prometheus text page.
pub async fn metric_names(ops: SocketAddr) -> BTreeSet<String> {
    let (code, body) = crate::common::http_get(ops, "/metrics").await;
    assert_eq!(code, 200, "/metrics: {body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Waits (at most 20 s) until `ops`'s /metrics has a sample of `name`.
async fn wait_metric(ops: SocketAddr, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !metric_names(ops).await.contains(name) {
        assert!(Instant::now() < deadline, "no {name} on {ops} within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Env {
    async fn scrape_ca(&self, ca: &CaProc) {
        let names = metric_names(ca.ops).await;
        self.ca_metrics.lock().unwrap().extend(names);
    }

    async fn scrape_agent(&self, agent: &AgentProc) {
        let names = metric_names(agent.ops).await;
        self.agent_metrics.lock().unwrap().extend(names);
    }
}

/// What all scenarios did: the fake's log of each, and the metric names.
pub struct Outcome {
    /// Every request, with the feature of the scenario that made it.
    pub requests: Vec<(Option<&'static str>, RequestRecord)>,
    pub ca_metrics: BTreeSet<String>,
    pub agent_metrics: BTreeSet<String>,
}

pub async fn run_all() -> Outcome {
    let mut out = Outcome {
        requests: Vec::new(),
        ca_metrics: BTreeSet::new(),
        agent_metrics: BTreeSet::new(),
    };
    for s in SCENARIOS {
        let started = Instant::now();
        let env = Env {
            k: KubeCluster::start().await,
            ca_metrics: Mutex::default(),
            agent_metrics: Mutex::default(),
        };
        (s.run)(&env).await;
        let log = env.k.fake.requests();
        println!(
            "scenario {:?}: {} API requests in {:?}",
            s.name,
            log.len(),
            started.elapsed()
        );
        out.requests.extend(log.into_iter().map(|r| (s.feature, r)));
        out.ca_metrics.extend(env.ca_metrics.into_inner().unwrap());
        out.agent_metrics
            .extend(env.agent_metrics.into_inner().unwrap());
    }
    out
}

/// SIGTERM, and the exit awaited (bounded): an orderly stop, which releases
/// the Lease.
fn stop(mut ca: CaProc) {
    let status = Command::new("kill")
        .args(["-TERM", &ca.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while ca.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the CA did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn leads(ca: &CaProc) -> bool {
    ca.log_text()
        .contains("leading: single-writer work runs here")
}

async fn replicas(e: &Env) {
    let k = &e.k;
    k.workload("prod", "web", "web-1", "node-a");
    // The node agent: its account and its own pod on node-a.
    k.workload(CA_NS, AGENT_SA, "agent-node-a", "node-a");
    // A report of a replica that stopped long ago, nothing valid in it:
    // the leader deletes it.
    let spent = "workload-ca-evidence-gone-0a0a0a";
    k.fake.put_json(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": spent, "namespace": CA_NS,
                     "labels": {"workload-ca.io/rotation-evidence": "true"}},
        "data": {"evidence.json": json!({
            "replica": "gone-0a0a0a", "written": 1_000_000_000u64, "settle_until": null,
            "uncounted": 0, "agents": [],
            "ledger": {"by_generation": {}, "by_authority": {}, "longest": 0}
        }).to_string()}
    }));
    let trusted = format!("{CA_NS}/{AGENT_SA}");
    let args = [
        "--trusted-node-accounts",
        trusted.as_str(),
        "--lease-duration",
        "3s",
    ];
    let a = k.start_ca("a", &args);
    let b = k.start_ca("b", &args);
    wait_ready(&a, READY).await;
    wait_ready(&b, READY).await;

    // Tokens checked locally (JWKS) against the watch caches.
    let token = k.pod_token("prod", "web", "web-1");
    issue(&a, &token, None)
        .await
        .expect("a workload's certificate");
    issue(&b, &token, None)
        .await
        .expect("a workload's certificate");
    assert!(issue(&a, "not-a-token", None).await.is_err());
    // A workload is no node agent.
    assert!(
        issue(&a, &token, Some("spiffe://cluster.local/ns/prod/sa/db"))
            .await
            .is_err()
    );

    // The node agent asks for web's identity with its own token.
    let agent_token = k.fake.mint_token(
        crate::common::fakekube::TokenSpec::new(CA_NS, AGENT_SA)
            .pod("agent-node-a")
            .audiences(&["istio-ca"]),
    );
    let agent = AgentProc::start_with(a.grpc, &a.root_pem(), |dir, cmd| {
        let path = dir.join("node-token");
        std::fs::write(&path, &agent_token).unwrap();
        cmd.arg("--node-token")
            .arg(&path)
            .args(["--workload", "web=spiffe://cluster.local/ns/prod/sa/web"]);
    });
    agent.wait_ready().await;
    fetch_default(&agent.socket("web")).await;

    // A rotation step through one replica's admin socket: the CA Secret is
    // updated, the other replica follows through its watch.
    let out = Command::new(env!("CARGO_BIN_EXE_ca"))
        .args(["rotate-root", "prepare", "--state-dir"])
        .arg(&a.state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "prepare: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    within(Duration::from_secs(10), || async {
        (b.root_pem().matches("BEGIN CERTIFICATE").count() == 2).then_some(())
    })
    .await;

    // Evidence published by both, the spent report deleted by the leader.
    within(Duration::from_secs(30), || async {
        let cms = k.fake.list_json("configmaps", CA_NS);
        let reports = cms
            .iter()
            .filter(|c| {
                c["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("workload-ca-evidence-"))
            })
            .count();
        let gone = k.fake.get_json("configmaps", CA_NS, spent).is_none();
        (gone && reports == 2).then_some(())
    })
    .await;

    // A proxy that rejects what it was sent (an SDS NACK).
    {
        use workload_ca::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
        let channel = crate::common::unix_channel(&agent.socket("web")).await;
        let mut stream = SotwStream::open(&mut SecretDiscoveryServiceClient::new(channel)).await;
        stream.send(&["default"], "", "", None).await;
        let r = stream.recv().await.expect("a response");
        stream
            .send(&["default"], "", &r.nonce, Some("rejected by the test"))
            .await;
        wait_metric(agent.ops, "workload_ca_agent_sds_nacks_total").await;
    }
    // An identity the CA refuses (no pod of it on the node): the agent's
    // failures and retries.
    let refused = AgentProc::start_with(a.grpc, &a.root_pem(), |dir, cmd| {
        let path = dir.join("node-token");
        std::fs::write(&path, &agent_token).unwrap();
        cmd.arg("--node-token")
            .arg(&path)
            .args(["--workload", "db=spiffe://cluster.local/ns/prod/sa/db"]);
    });
    wait_metric(refused.ops, "workload_ca_agent_csr_retries_total").await;
    wait_metric(refused.ops, "workload_ca_agent_csr_failures_total").await;
    e.scrape_agent(&refused).await;
    // Watches that fall behind a compaction are restarted (and counted).
    k.fake.compact();
    k.fake.close_watches();
    wait_metric(a.ops, "workload_ca_kube_watch_restarts_total").await;

    e.scrape_agent(&agent).await;
    e.scrape_ca(&a).await;
    e.scrape_ca(&b).await;
    drop(agent);
    // The leader stops in order: it releases the Lease.
    let (_, _) = within(Duration::from_secs(10), || async {
        (leads(&a) || leads(&b)).then_some(())
    })
    .await;
    let (leader, other) = if leads(&a) { (a, b) } else { (b, a) };
    stop(leader);
    stop(other);
}

async fn token_review(e: &Env) {
    let k = &e.k;
    k.workload("prod", "web", "web-1", "node-a");
    let ca = k.start_ca("tr", &["--token-review"]);
    wait_ready(&ca, READY).await;
    let token = k.pod_token("prod", "web", "web-1");
    issue(&ca, &token, None).await.expect("reviewed and issued");
    assert!(issue(&ca, "not-a-token", None).await.is_err());
    e.scrape_ca(&ca).await;
    stop(ca);
}

async fn plugged_in(e: &Env) {
    let k = &e.k;
    let dir = tempfile::tempdir().unwrap();
    crate::common::cacerts::make_cacerts(dir.path(), false);
    let file = |n: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(dir.path().join(n)).unwrap())
    };
    k.fake
        .create_json(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "cacerts", "namespace": CA_NS},
            "data": {
                "ca-cert.pem": file("ca-cert.pem"), "ca-key.pem": file("ca-key.pem"),
                "root-cert.pem": file("root-cert.pem"), "cert-chain.pem": file("cert-chain.pem"),
            }
        }))
        .expect("the cacerts Secret");
    let ca = k.start_ca("plugged", &[]);
    wait_ready(&ca, READY).await;
    let root = std::fs::read_to_string(dir.path().join("root-cert.pem")).unwrap();
    assert!(
        ca.root_pem().contains(root.trim()),
        "the CA seeded from cacerts"
    );
    e.scrape_ca(&ca).await;
    stop(ca);
}

async fn serving_secret(e: &Env) {
    let k = &e.k;
    // Ours, but of a type that cannot be changed: deleted, written again.
    k.fake
        .create_json(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": SERVING_SECRET, "namespace": CA_NS,
                         "labels": {"workload-ca.io/managed-by": "workload-ca"}},
            "type": "Opaque", "data": {}
        }))
        .unwrap();
    let spec = format!("{CA_NS}/{SERVING_SECRET}=istiod.istio-system.svc");
    let ca = k.start_ca("serving", &["--serving-secret", &spec]);
    wait_ready(&ca, READY).await;
    within(Duration::from_secs(20), || async {
        k.fake
            .get_json("secrets", CA_NS, SERVING_SECRET)
            .filter(|s| s["type"] == "kubernetes.io/tls")
    })
    .await;
    // Edited: read again and rewritten.
    let mut edited = k.fake.get_json("secrets", CA_NS, SERVING_SECRET).unwrap();
    edited["data"]["ca.crt"] = json!("");
    k.fake.put_json(edited);
    within(Duration::from_secs(20), || async {
        k.fake
            .get_json("secrets", CA_NS, SERVING_SECRET)
            .filter(|s| s["data"]["ca.crt"] != "")
    })
    .await;
    e.scrape_ca(&ca).await;
    stop(ca);
}

/// Waits until `f` holds (20 s at most).
async fn until(what: &str, f: impl Fn() -> bool) {
    println!("  waiting until {what}");
    within(Duration::from_secs(20), || async { f().then_some(()) }).await;
}

async fn secret_mode(e: &Env) {
    let k = &e.k;
    k.workload("shop", "web", "web-1", "node-a");
    // Someone else's istio.<sa>: left alone, an Event says so.
    k.fake.create_service_account("shop", "legacy");
    k.fake
        .create_json(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "istio.legacy", "namespace": "shop"},
            "type": "istio.io/key-and-cert", "data": {}
        }))
        .unwrap();
    // Ours, but of another type (which cannot be changed): deleted and
    // written again.
    k.fake.create_service_account("shop", "db");
    k.fake
        .create_json(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "istio.db", "namespace": "shop",
                         "labels": {"workload-ca.io/managed-by": "workload-ca"}},
            "type": "Opaque", "data": {}
        }))
        .unwrap();
    let ca = k.start_ca("secrets", &["--secret-mode-namespaces", "*"]);
    wait_ready(&ca, READY).await;
    until("istio.web is written", || {
        k.fake.get_json("secrets", "shop", "istio.web").is_some()
    })
    .await;
    until("istio.db is rewritten with its type", || {
        k.fake
            .get_json("secrets", "shop", "istio.db")
            .is_some_and(|s| s["type"] == "istio.io/key-and-cert")
    })
    .await;
    until("an Event names the foreign Secret", || {
        !k.fake.list_json("events", "shop").is_empty()
    })
    .await;
    // Deleted: written again; edited: repaired.
    k.fake.delete("secrets", "shop", "istio.web");
    until("istio.web is recreated", || {
        k.fake.get_json("secrets", "shop", "istio.web").is_some()
    })
    .await;
    let mut edited = k.fake.get_json("secrets", "shop", "istio.web").unwrap();
    edited["data"]["root-cert.pem"] = json!("");
    k.fake.put_json(edited);
    until("istio.web is repaired", || {
        k.fake
            .get_json("secrets", "shop", "istio.web")
            .is_some_and(|s| s["data"]["root-cert.pem"] != "")
    })
    .await;
    e.scrape_ca(&ca).await;
    stop(ca);
}

async fn root_configmaps(e: &Env) {
    let k = &e.k;
    k.fake.create_namespace("shop");
    // istiod's: left alone, an Event says so.
    k.fake.create_namespace("mesh");
    k.fake
        .create_json(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "istio-ca-root-cert", "namespace": "mesh",
                         "labels": {"istio.io/config": "true"}},
            "data": {"root-cert.pem": "istiod's"}
        }))
        .unwrap();
    let ca = k.start_ca("roots", &["--root-configmap-namespaces", "*"]);
    wait_ready(&ca, READY).await;
    until("shop's istio-ca-root-cert is written", || {
        k.fake
            .get_json("configmaps", "shop", "istio-ca-root-cert")
            .is_some()
    })
    .await;
    until("an Event names istiod's ConfigMap", || {
        !k.fake.list_json("events", "mesh").is_empty()
    })
    .await;
    let mut edited = k
        .fake
        .get_json("configmaps", "shop", "istio-ca-root-cert")
        .unwrap();
    edited["data"]["root-cert.pem"] = json!("edited");
    k.fake.put_json(edited);
    until("shop's istio-ca-root-cert is repaired", || {
        k.fake
            .get_json("configmaps", "shop", "istio-ca-root-cert")
            .is_some_and(|c| c["data"]["root-cert.pem"] != "edited")
    })
    .await;
    e.scrape_ca(&ca).await;
    stop(ca);
}

async fn pod_certificates(e: &Env) {
    use crate::common::fakekube::kubelet::{self, KeyType, KubeletKey, PodRef, RequestOptions};
    let k = &e.k;
    k.fake.create_namespace("shop");
    let ca = k.start_ca("pcr", &["--pod-certificates"]);
    wait_ready(&ca, READY).await;
    let key = KubeletKey::generate(KeyType::EcdsaP256);
    let pod = PodRef::new("shop", "web-1", "web");
    let created = k
        .fake
        .create_json(kubelet::request(
            "v1",
            SIGNER,
            &pod,
            &key,
            &RequestOptions::default(),
        ))
        .expect("a PodCertificateRequest");
    let name = created["metadata"]["name"].as_str().unwrap().to_owned();
    until("the request is answered", || {
        k.fake
            .get_json("podcertificaterequests", "shop", &name)
            .is_some_and(|o| o["status"]["conditions"].is_array())
    })
    .await;
    e.scrape_ca(&ca).await;
    stop(ca);
}

async fn trust_bundle(e: &Env) {
    let k = &e.k;
    let ca = k.start_ca("ctb", &["--cluster-trust-bundle"]);
    wait_ready(&ca, READY).await;
    let name = "workload-ca.io:spiffe:primary";
    until("the ClusterTrustBundle is published", || {
        k.fake.get_json("clustertrustbundles", "", name).is_some()
    })
    .await;
    let mut edited = k.fake.get_json("clustertrustbundles", "", name).unwrap();
    edited["spec"]["trustBundle"] = json!(crate::common::authority().roots().pem());
    k.fake.put_json(edited);
    let root = ca.root_pem();
    until("the ClusterTrustBundle is repaired", || {
        k.fake
            .get_json("clustertrustbundles", "", name)
            .is_some_and(|c| c["spec"]["trustBundle"].as_str() == Some(root.as_str()))
    })
    .await;
    e.scrape_ca(&ca).await;
    stop(ca);
}
