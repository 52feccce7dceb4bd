//! A root rotation under traffic, with real parts: a `ca server` process, a
//! `ca agent` process (node mode, two workloads, started with only the old
//! root file) and two real Envoys doing mTLS to each other on short-lived
//! certificates, one new upstream handshake per request. `ca rotate-root`
//! runs from prepare to retire, each step gated on what the agent reports.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use common::envoy::*;
use common::procs::{AgentProc, CaProc};
use common::*;
use workload_ca::proto::envoy::service::discovery::v3::DiscoveryRequest;
use workload_ca::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;

const WEB: &str = "spiffe://cluster.local/ns/prod/sa/web";
const API: &str = "spiffe://cluster.local/ns/prod/sa/api";

/// `ca rotate-root ARGS` on `state`, without blocking the runtime.
async fn rotate(state: &Path, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ca"))
        .arg("rotate-root")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The client Envoy's upstream opens a new connection (a new mutual TLS
/// handshake) for every request.
fn one_request_per_connection(bootstrap: String) -> String {
    bootstrap.replacen(
        "    connect_timeout: 2s\n",
        "    connect_timeout: 2s\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        common_http_protocol_options: {max_requests_per_connection: 1}\n        explicit_http_config: {http_protocol_options: {}}\n",
        1,
    )
}

/// The secrets an Envoy holds (its config dump): the `default` chain and
/// the `ROOTCA` roots, PEM.
async fn held(envoy: &Envoy) -> (String, String) {
    let dump: serde_json::Value = serde_json::from_str(
        &envoy
            .admin_get("/config_dump?resource=dynamic_active_secrets")
            .await,
    )
    .unwrap();
    let b64 = |v: &serde_json::Value| {
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap_or_default())
                .unwrap(),
        )
        .unwrap()
    };
    let (mut chain, mut roots) = (String::new(), String::new());
    for c in dump["configs"].as_array().unwrap() {
        let secret = &c["secret"];
        match c["name"].as_str() {
            Some("default") => {
                chain = b64(&secret["tls_certificate"]["certificate_chain"]["inline_bytes"]);
            }
            Some("ROOTCA") => {
                roots = b64(&secret["validation_context"]["trusted_ca"]["inline_bytes"])
            }
            _ => {}
        }
    }
    (chain, roots)
}

fn active_root(state: &Path) -> String {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("ca/authorities.json")).unwrap())
            .unwrap();
    let id = m["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["state"] == "active")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::read_to_string(state.join("ca").join(id).join("root-cert.pem")).unwrap()
}

#[tokio::test]
async fn a_full_rotation_under_mtls_traffic_between_two_envoys_fails_no_handshake() {
    let ca = CaProc::start(&["--auto-rotate", "off"]);
    let old_root = ca.root_pem();
    let agent = AgentProc::start(
        ca.grpc,
        &old_root,
        &[
            ("web", ca.token("prod", "web")),
            ("api", ca.token("prod", "api")),
        ],
        &["--cert-ttl", "10s", "--agent-name", "node-1"],
    );
    agent.wait_ready().await;
    let web = Envoy::start(&server_bootstrap(
        &agent.socket("web"),
        "served by web",
        Some(API),
    ));
    web.wait_live().await;
    let api = Envoy::start(&one_request_per_connection(client_bootstrap(
        &agent.socket("api"),
        web.listener("mtls").await,
        WEB,
    )));
    api.wait_live().await;
    let plain = api.listener("plain").await;

    // Traffic: api -> web over mTLS, continuously.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let mut errors = Vec::new();
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(120) {
                let (status, body) = http_get(plain, "/").await;
                if status == 200 && body == "served by web" {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    errors.push(format!("{:?}: {status} {body}", start.elapsed()));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            errors
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        ok.load(Ordering::Relaxed) > 0,
        "traffic flows before the rotation"
    );

    let started = Instant::now();
    let (done, out) = rotate(&ca.state, &["--timeout", "90s"]).await;
    let took = started.elapsed();
    assert!(done, "rotate-root: {out}\nCA log:\n{}", ca.log_text());
    assert!(out.contains("rotation complete"), "{out}");
    let new_root = active_root(&ca.state);
    assert_ne!(ders(&new_root), ders(&old_root));

    // The old root leaves every proxy's ROOTCA; both present new leaves.
    let deadline = Instant::now() + Duration::from_secs(15);
    for envoy in [&web, &api] {
        loop {
            let (chain, roots) = held(envoy).await;
            if ders(&roots) == ders(&new_root) {
                let mut c: Vec<String> = vec![chain];
                c.push(new_root.clone());
                openssl_verify(&c);
                break;
            }
            assert!(Instant::now() < deadline, "ROOTCA still {roots}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Traffic on the new root alone, then stop.
    let before = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(ok.load(Ordering::Relaxed) > before, "traffic flows after");
    stop.store(true, Ordering::Relaxed);
    let errors = traffic.await.unwrap();
    assert!(
        errors.is_empty(),
        "{} of {} requests failed during a {took:?} rotation: {:?}",
        errors.len(),
        ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed),
        &errors[..errors.len().min(5)]
    );
    assert!(
        ok.load(Ordering::Relaxed) >= 100,
        "only {} requests",
        ok.load(Ordering::Relaxed)
    );
    for envoy in [&web, &api] {
        assert_eq!(envoy.stat("sds.ROOTCA.update_rejected").await, 0);
        assert_eq!(envoy.stat("sds.default.update_rejected").await, 0);
    }
    eprintln!(
        "rotation under traffic: {} requests (each a new mutual TLS handshake), 0 failed, `ca rotate-root` took {took:?}",
        ok.load(Ordering::Relaxed)
    );
    let status = rotate(&ca.state, &["status"]).await.1;
    assert!(status.contains("1 of 1 agents confirmed"), "{status}");
}

/// A proxy that takes the bundle but never ACKs it keeps activation
/// refused, naming its agent; its ACK opens the gate. An agent still
/// serving a leaf of the retiring authority keeps retirement refused until
/// it re-issues (or `--force`).
#[tokio::test]
async fn activation_waits_for_every_proxy_and_retirement_for_every_leaf() {
    let ca = CaProc::start(&["--auto-rotate", "off"]);
    let agent = AgentProc::start(
        ca.grpc,
        &ca.root_pem(),
        &[("web", ca.token("prod", "web"))],
        &["--cert-ttl", "1h", "--agent-name", "node-behind"],
    );
    agent.wait_ready().await;
    // A proxy that subscribes to ROOTCA.
    let mut sds = SecretDiscoveryServiceClient::new(unix_channel(&agent.socket("web")).await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let request = |version: &str, nonce: &str| DiscoveryRequest {
        version_info: version.into(),
        resource_names: vec!["ROOTCA".into()],
        type_url: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret".into(),
        response_nonce: nonce.into(),
        ..Default::default()
    };
    tx.send(request("", "")).await.unwrap();
    let mut answers = sds
        .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = answers.message().await.unwrap().unwrap();
    tx.send(request(&first.version_info, &first.nonce))
        .await
        .unwrap();

    let (done, out) = rotate(&ca.state, &["prepare"]).await;
    assert!(done, "{out}");
    // The new bundle reaches the proxy at once; it does not ACK.
    let pushed = tokio::time::timeout(Duration::from_secs(5), answers.message())
        .await
        .expect("the new bundle is pushed within a second or so")
        .unwrap()
        .unwrap();
    assert_eq!(
        pushed.version_info, "ROOTCA=2",
        "ROOTCA's version is the bundle generation"
    );
    let (done, why) = rotate(&ca.state, &["activate"]).await;
    assert!(!done, "activation before the proxy confirmed: {why}");
    assert!(
        why.contains("0 of 1 agents") && why.contains("node-behind"),
        "{why}"
    );
    // The ACK reaches the CA through the agent's report.
    tx.send(request(&pushed.version_info, &pushed.nonce))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (done, why) = rotate(&ca.state, &["activate"]).await;
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the ACK never opened the gate: {why}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The agent still serves its hour-long leaf of the old authority.
    let (done, why) = rotate(&ca.state, &["retire"]).await;
    assert!(!done, "{why}");
    assert!(why.contains("1 agents still serve a certificate"), "{why}");
    // It re-issues within the announced window (5 s for one leaf), then
    // retirement goes through without --force.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (done, why) = rotate(&ca.state, &["retire"]).await;
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never re-issued: {why}\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // root-cert.pem follows (written by the server's publisher).
    let deadline = Instant::now() + Duration::from_secs(10);
    while ders(&ca.root_pem()).len() != 1 {
        assert!(Instant::now() < deadline, "root-cert.pem kept the old root");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
