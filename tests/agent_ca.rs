//! The agent against the real CA server: tokens on disk, key types, files.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::*;
use workload_ca::agent::{self, AgentConfig};
use workload_ca::ca::KeyAlgorithm;

fn config(ca: &TestServer, dir: &std::path::Path, key: KeyAlgorithm) -> AgentConfig {
    let mut config = agent_config(ca, dir);
    config.policy.key = key;
    config.output_dir = Some(dir.join("out"));
    config
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

/// The log lines of this thread's tasks (a current-thread runtime's).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Polls `cond` every 20 ms for up to `secs` seconds.
async fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_expired_token_is_never_sent_and_a_fresh_one_is_picked_up() {
    let logs = Captured::default();
    let _logs = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .finish(),
    );
    let ca = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, expired_token(&ca)).unwrap();
    let mut cfg = config(&ca, dir.path(), KeyAlgorithm::EcdsaP256);
    // Renewed about 4 s after issuance, expiring after 8 s.
    cfg.policy.ttl = Duration::from_secs(8);
    let agent = agent::start(cfg).await.unwrap();

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

    // The token expires before the rotation: at rotation time the agent
    // sends nothing, says so, and keeps serving its certificate.
    let serial = || {
        agent.watches[0]
            .1
            .cert
            .borrow()
            .as_ref()
            .map(|c| c.serial_hex.clone())
    };
    let unusable = || {
        agent
            .metrics
            .token_unusable
            .with_label_values(&["web"])
            .get()
    };
    let first = serial().unwrap();
    let signed = ca.metric("citadel_server_csr_count").await;
    let refused = unusable();
    std::fs::write(&token, expired_token(&ca)).unwrap();
    wait_for(10, "no renewal attempt", || unusable() > refused).await;
    assert_eq!(
        serial().as_ref(),
        Some(&first),
        "the current certificate is kept"
    );
    assert!(agent.ready(), "still valid, still ready");
    let text = logs.text();
    assert!(
        text.lines().any(|l| l.contains("ERROR")
            && l.contains("NOT requesting a certificate")
            && l.contains("expired")
            && l.contains(&first)),
        "the log says why and what is still served:\n{text}"
    );

    // Then the file disappears: still nothing sent, still said.
    std::fs::remove_file(&token).unwrap();
    let refused = unusable();
    wait_for(10, "no attempt without the file", || {
        unusable() > refused + 1
    })
    .await;
    assert!(
        logs.text().contains("No such file"),
        "the log names the missing file"
    );
    assert_eq!(
        ca.metric("citadel_server_csr_count").await,
        signed,
        "neither an expired token nor nothing reached the CA"
    );
    let body = agent.metrics.render();
    assert!(
        body.lines()
            .any(|l| l.starts_with("workload_ca_agent_token_unusable_total{workload=\"web\"}")),
        "{body}"
    );

    // The kubelet writes a fresh token: renewed by itself.
    std::fs::write(&token, ca.token("prod", "web")).unwrap();
    wait_for(20, "no renewal after the token came back", || {
        serial().is_some_and(|s| s != first)
    })
    .await;
    assert!(ca.metric("citadel_server_csr_count").await > signed);
    assert_eq!(
        ca.metric("citadel_server_authentication_failure_count")
            .await,
        0.0,
        "no token the CA refused was ever sent"
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
