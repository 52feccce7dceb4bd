//! The agent against `ca server --kube` and the fake API server, all real
//! processes: a sidecar agent on its pod's bound token (rotated by the
//! "kubelet", then its pod deleted), and a node agent with one node token
//! asking for the identities of the pods on its node.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::fakekube::TokenSpec;
use common::kubeca::{CA_NS, KubeCluster, wait_ready, within};
use common::procs::{AgentProc, CaProc, metric_at};
use common::sds::{Served, SotwStream, served};
use common::{http_get, leaf_facts, openssl_verify, webpki_verify};
use workload_ca::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;

const READY: Duration = Duration::from_secs(30);
/// How long one FetchSecrets may take when a certificate is held.
const FETCH: Duration = Duration::from_secs(2);
const WEB: &str = "spiffe://cluster.local/ns/prod/sa/web";
const DB: &str = "spiffe://cluster.local/ns/prod/sa/db";

/// Both independent verifiers accept what is served, and its leaf names
/// exactly `id`.
fn verified(s: &Served, id: &str) {
    webpki_verify(&s.chain);
    openssl_verify(&s.chain);
    assert_eq!(leaf_facts(&s.chain[0]).uris, [id]);
}

/// A sidecar agent (`--token-file`, `--sds-socket`, which is
/// `agent.socket("default")`) holding `token`, asking for `ttl` leaves.
fn sidecar(ca: &CaProc, token: &str, ttl: &str) -> AgentProc {
    AgentProc::start_with(ca.grpc, &ca.root_pem(), |dir, cmd| {
        let token_file = dir.join("istio-token");
        std::fs::write(&token_file, token).unwrap();
        let socket_dir = dir.join("sds/default");
        std::fs::create_dir_all(&socket_dir).unwrap();
        cmd.arg("--token-file")
            .arg(&token_file)
            .arg("--sds-socket")
            .arg(socket_dir.join("socket"))
            .args(["--cert-ttl", ttl]);
    })
}

/// Replaces a token file the way the kubelet does (a new file renamed into
/// place), so the agent never reads half a token.
fn rewrite_token(path: &Path, token: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, token).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn alive(agent: &mut AgentProc) -> bool {
    agent.child.try_wait().unwrap().is_none()
}

fn failures(workload: &str) -> String {
    format!("workload_ca_agent_csr_failures_total{{workload=\"{workload}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_agent_on_its_pods_bound_token_follows_rotation_and_outlives_its_pod() {
    let k = KubeCluster::start().await;
    k.workload("prod", "web", "web-1", "node-a");
    let ca = k.start_ca("ca", &[]);
    wait_ready(&ca, READY).await;

    // The first token is short-lived: the agent stops sending it 5 s before
    // its exp (and the CA, 10 s after). Leaves of 6 s are renewed every ~3 s.
    const FIRST: Duration = Duration::from_secs(10);
    let first = k.fake.mint_token(
        TokenSpec::new("prod", "web")
            .pod("web-1")
            .audiences(&["istio-ca"])
            .lifetime(FIRST),
    );
    let first_gone = Instant::now() + FIRST;
    let mut agent = sidecar(&ca, &first, "6s");
    let socket = agent.socket("default");
    agent.wait_ready().await;
    let s = served(&socket, FETCH)
        .await
        .expect("the sidecar's proxy is served");
    verified(&s, WEB);

    // The kubelet rotates the token; the old one expires. Renewals go on:
    // a leaf first seen after the old token's exp was asked for with the
    // new one.
    rewrite_token(
        &agent.dir().join("istio-token"),
        &k.pod_token("prod", "web", "web-1"),
    );
    let mut before: HashSet<String> = HashSet::from([s.serial]);
    let deadline = Instant::now() + FIRST + Duration::from_secs(10);
    let renewed = loop {
        assert!(
            Instant::now() < deadline,
            "no renewal after the first token expired\n{}",
            agent.log_text()
        );
        if let Ok(s) = served(&socket, FETCH).await {
            if Instant::now() < first_gone {
                before.insert(s.serial);
            } else if !before.contains(&s.serial) {
                break s;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    verified(&renewed, WEB);
    assert!(before.len() >= 2, "renewed while the first token was valid");
    assert_eq!(
        metric_at(agent.ops, &failures("default")).await,
        0.0,
        "no request failed across the token rotation\n{}",
        agent.log_text()
    );
    assert_eq!(ca.metric("workload_ca_auth_refusals_total").await, 0.0);

    // The pod is deleted: renewals are refused; the agent keeps serving its
    // still-valid leaf, then withdraws it at expiry, and stays up.
    assert!(k.fake.delete("pods", "prod", "web-1"));
    let deleted = Instant::now();
    within(Duration::from_secs(10), || async {
        (metric_at(agent.ops, &failures("default")).await >= 1.0).then_some(())
    })
    .await;
    let held = served(&socket, FETCH)
        .await
        .expect("the still-valid leaf is served");
    verified(&held, WEB);
    assert!(
        ca.metric("workload_ca_auth_refusals_total{reason=\"pod_gone\"}")
            .await
            >= 1.0
    );
    loop {
        assert!(alive(&mut agent), "the agent exited:\n{}", agent.log_text());
        if http_get(agent.ops, "/readyz").await.0 != 200 {
            break;
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(15),
            "a 6 s leaf outlived its pod by 15 s"
        );
        // Until then, the one leaf held when the refusals began.
        if let Ok(s) = served(&socket, FETCH).await {
            assert_eq!(s.serial, held.serial, "a leaf issued after the pod went");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Readiness ends before expiry (the agent's readiness margin); once the
    // leaf's NotAfter has passed, nothing is served.
    let not_after = leaf_facts(&held.chain[0]).not_after;
    while common::now_secs() <= not_after {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        served(&socket, Duration::from_millis(500)).await.is_err(),
        "an expired leaf is not served"
    );
    assert!(alive(&mut agent), "the agent exited:\n{}", agent.log_text());
    assert_eq!(http_get(agent.ops, "/healthz").await.0, 200);
    assert!(metric_at(agent.ops, &failures("default")).await >= 2.0);
    let log = agent.log_text();
    assert!(
        log.contains("certificate request failed; keeping the current certificate"),
        "{log}"
    );
    assert!(log.contains("Unauthenticated"), "{log}");
    assert!(!log.contains(&first), "a token reached the agent's log");
}

/// A node agent with `--node-token` (its own pod's token) and one
/// `--workload NAME=ID` per identity.
fn node_agent(ca: &CaProc, node_token: &str, workloads: &[(&str, &str)]) -> AgentProc {
    AgentProc::start_with(ca.grpc, &ca.root_pem(), |dir, cmd| {
        let f = dir.join("node-token");
        std::fs::write(&f, node_token).unwrap();
        cmd.arg("--node-token").arg(&f);
        for (name, id) in workloads {
            cmd.arg("--workload").arg(format!("{name}={id}"));
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_agent_with_one_node_token_gets_the_identities_of_pods_on_its_node() {
    let k = KubeCluster::start().await;
    k.workload(CA_NS, "workload-agent", "agent-a", "node-a");
    k.workload("prod", "web", "web-1", "node-a");
    k.workload("prod", "db", "db-1", "node-b");
    let ca = k.start_ca(
        "ca",
        &["--trusted-node-accounts", "istio-system/workload-agent"],
    );
    wait_ready(&ca, READY).await;
    let agent = node_agent(
        &ca,
        &k.pod_token(CA_NS, "workload-agent", "agent-a"),
        &[("web", WEB), ("db", DB)],
    );

    // web runs on this node: served, and verified.
    let (web, took) = within(Duration::from_secs(20), || async {
        served(&agent.socket("web"), FETCH).await.ok()
    })
    .await;
    verified(&web, WEB);
    println!("web served {took:?} after the agent started");

    // db runs on node-b only: refused, counted and logged; nothing served.
    within(Duration::from_secs(10), || async {
        (metric_at(agent.ops, &failures("db")).await >= 1.0).then_some(())
    })
    .await;
    assert!(
        ca.metric("workload_ca_identity_refusals_total{reason=\"not_on_node\"}")
            .await
            >= 1.0
    );
    let refused = agent
        .log_text()
        .lines()
        .find(|l| l.contains("workload=db") && l.contains("PermissionDenied"))
        .map(str::to_owned);
    assert!(refused.is_some(), "{}", agent.log_text());
    println!("the agent logged: {}", refused.unwrap());
    assert_eq!(metric_at(agent.ops, &failures("web")).await, 0.0);
    let metrics = http_get(agent.ops, "/metrics").await.1;
    assert!(
        !metrics.contains("workload_ca_agent_cert_expiry_timestamp{workload=\"db\"}"),
        "{metrics}"
    );
    assert_eq!(http_get(agent.ops, "/readyz").await.0, 503);
    let mut sds =
        SecretDiscoveryServiceClient::new(common::unix_channel(&agent.socket("db")).await);
    let mut stream = SotwStream::open(&mut sds).await;
    stream.send(&["default"], "", "", None).await;
    assert!(
        tokio::time::timeout(Duration::from_secs(1), stream.rx.message())
            .await
            .is_err(),
        "db's socket answered while db is refused"
    );

    // A db pod starts on this node: db's certificate arrives on a later
    // retry, pushed to the stream already waiting.
    let attempts = metric_at(agent.ops, &failures("db")).await;
    k.fake.create_pod("prod", "db-2", "db", Some("node-a"));
    let created = Instant::now();
    let pushed = tokio::time::timeout(Duration::from_secs(35), stream.rx.message())
        .await
        .unwrap_or_else(|_| panic!("db never served\n{}", agent.log_text()))
        .expect("the stream stays up")
        .expect("a response");
    let took = created.elapsed();
    assert_eq!(pushed.resources.len(), 1);
    let db = served(&agent.socket("db"), FETCH).await.expect("db served");
    verified(&db, DB);
    assert_eq!(pushed.version_info, format!("default={}", db.serial));
    println!("db served {took:?} after its pod started on the node ({attempts} refusals before)");
    agent.wait_ready().await;
    // web's socket still serves web (each socket its own identity).
    verified(&served(&agent.socket("web"), FETCH).await.unwrap(), WEB);
    assert!(ca.metric("workload_ca_impersonations_total").await >= 2.0);
}

#[test]
fn an_identity_workload_without_a_node_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ca"))
        .args(["agent", "--ops-listen", "off", "--socket-dir"])
        .arg(dir.path().join("sds"))
        .args(["--workload", "web=spiffe://cluster.local/ns/prod/sa/web"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("web=spiffe://cluster.local/ns/prod/sa/web")
            && stderr.contains("needs --node-token"),
        "{stderr}"
    );
}
