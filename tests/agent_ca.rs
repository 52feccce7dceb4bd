//! The agent against the real CA server: tokens on disk, key types, files.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::*;
use workload_ca::agent::client::CaEndpoint;
use workload_ca::agent::workload::RotationPolicy;
use workload_ca::agent::{self, AgentConfig, WorkloadConfig};
use workload_ca::ca::KeyAlgorithm;

fn config(ca: &TestServer, dir: &std::path::Path, key: KeyAlgorithm) -> AgentConfig {
    AgentConfig {
        agent_name: "test".into(),
        ca: CaEndpoint {
            address: ca.running.grpc_addr.to_string(),
            root_cert: ca.running.root_cert_path.clone(),
            server_name: "localhost".into(),
        },
        workloads: vec![WorkloadConfig {
            peer: None,
            name: "web".into(),
            token_file: dir.join("token"),
            socket: dir.join("web.sock"),
            identity: None,
        }],
        policy: RotationPolicy {
            key,
            ..RotationPolicy::default()
        },
        ops_listen: None,
        output_dir: Some(dir.join("out")),
        limits: workload_ca::limits::AgentLimits::default(),
    }
}

/// A token signed by the CA's development issuer that expired a minute ago.
fn expired_token(ca: &TestServer) -> String {
    workload_ca::server::jwt_crypto::install();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": "workload-ca-dev", "aud": ["istio-ca"], "sub": "system:serviceaccount:prod:web",
        "iat": now - 3600, "nbf": now - 3600, "exp": now - 60,
    });
    let key = jsonwebtoken::EncodingKey::from_ec_pem(ca.dev_key_pem().as_bytes()).unwrap();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &key,
    )
    .unwrap();
    let payload = token.split('.').nth(1).unwrap();
    let decoded: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(decoded["exp"], now - 60);
    token
}

#[tokio::test]
async fn an_expired_token_is_never_sent_and_a_fresh_one_is_picked_up() {
    let ca = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), expired_token(&ca)).unwrap();
    let agent = agent::start(config(&ca, dir.path(), KeyAlgorithm::EcdsaP256))
        .await
        .unwrap();

    // The agent keeps trying (and failing) locally; the CA never sees a request.
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.metrics.csr_failures.with_label_values(&["web"]).get() < 2 {
        assert!(Instant::now() < deadline, "the agent did not try");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        ca.metric("citadel_server_csr_count").await,
        0.0,
        "an expired token must never reach the CA"
    );
    assert!(!agent.ready());

    // The kubelet rotates the token: the agent recovers by itself.
    std::fs::write(dir.path().join("token"), ca.token("prod", "web")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.ready() {
        assert!(
            Instant::now() < deadline,
            "no certificate after the token was refreshed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        ca.metric("citadel_server_authentication_failure_count")
            .await,
        0.0
    );
    agent.shutdown().await;
}

#[tokio::test]
async fn rsa_workload_keys_and_files_on_disk() {
    let ca = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), ca.token("prod", "web")).unwrap();
    let agent = agent::start(config(&ca, dir.path(), KeyAlgorithm::Rsa2048))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = dir.path().join("out/web");
    while !(agent.ready() && out.join("root-cert.pem").exists()) {
        assert!(Instant::now() < deadline, "no certificate");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let key = std::fs::read_to_string(out.join("key.pem")).unwrap();
    assert_eq!(
        std::fs::metadata(out.join("key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        workload_ca::ca::PrivateKey::from_pem(&key).unwrap().kind(),
        "rsa"
    );
    let mut chain = vec![std::fs::read_to_string(out.join("cert-chain.pem")).unwrap()];
    chain.push(std::fs::read_to_string(out.join("root-cert.pem")).unwrap());
    webpki_verify(&chain);
    let f = leaf_facts(&chain[0]);
    assert_eq!(f.uris, ["spiffe://cluster.local/ns/prod/sa/web"]);
    assert!(f.key_encipherment, "an RSA leaf");
    agent.shutdown().await;
}
