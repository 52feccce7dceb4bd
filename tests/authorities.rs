//! One live CA state: the server's authorities are published once and every
//! part of it reads them from there. Each step of a rotation (prepare,
//! activate, retire) published to a running server changes, at once and
//! without a restart: the bundle in every answer, `root-cert.pem`, the
//! expiry gauges, who may renew, who signs new leaves, and the server's own
//! TLS certificate.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::procs::served_cert;
use common::*;
use workload_ca::ca::bundle::{parse_pem_certs, verify_path};
use workload_ca::ca::{Authority, AuthoritySet, KeyAlgorithm};
use workload_ca::identity::TrustDomain;

fn new_authority() -> Authority {
    let td = TrustDomain::new(TD).unwrap();
    let now = SystemTime::now();
    let files = Authority::generate_root(
        &td,
        KeyAlgorithm::EcdsaP256,
        Duration::from_secs(20 * 365 * 86_400),
        now,
    )
    .unwrap();
    Authority::from_files(&files, &td, now).unwrap()
}

/// Publishes what `f` makes of the server's current authorities.
async fn step(
    server: &TestServer,
    f: impl FnOnce(&AuthoritySet) -> Result<AuthoritySet, workload_ca::ca::Error>,
) {
    let next = f(&server.running.authorities()).unwrap();
    server.running.publish(next).await.unwrap();
}

/// Whether `chain` (leaf first) path-validates to `root` alone.
fn chains_to(chain: &[String], root: &[u8]) -> bool {
    let leaf = ders(&chain[0]).remove(0);
    let intermediates: Vec<Vec<u8>> = chain[1..chain.len() - 1]
        .iter()
        .flat_map(|p| ders(p))
        .collect();
    verify_path(
        &leaf,
        &intermediates,
        &[root],
        SystemTime::now(),
        webpki::KeyUsage::client_auth(),
    )
    .is_ok()
}

/// `/trust-bundle`, checked against the SPIFFE rules: one `x509-svid` key
/// per root, its single `x5c` the root, no `kid`, and its EC point the one
/// openssl reads from the certificate. Returns (sequence, root DERs).
async fn trust_bundle(server: &TestServer) -> (u64, Vec<Vec<u8>>) {
    use base64::Engine;
    let (status, body) = http_get(server.running.ops_addr.unwrap(), "/trust-bundle").await;
    assert_eq!(status, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["spiffe_refresh_hint"], 300);
    let mut roots = Vec::new();
    for key in doc["keys"].as_array().unwrap() {
        assert_eq!(key["use"], "x509-svid");
        assert!(key.get("kid").is_none());
        assert_eq!(
            (key["kty"].as_str(), key["crv"].as_str()),
            (Some("EC"), Some("P-256"))
        );
        let x5c = key["x5c"].as_array().unwrap();
        assert_eq!(x5c.len(), 1);
        let der = base64::engine::general_purpose::STANDARD
            .decode(x5c[0].as_str().unwrap())
            .unwrap();
        // openssl's reading of the certificate's public key.
        let pem = pem::encode(&pem::Pem::new("CERTIFICATE", der.clone()));
        let out = openssl_stdin(&["x509", "-noout", "-pubkey"], pem.as_bytes());
        let spki = ders(&out).remove(0);
        let point = &spki[spki.len() - 65..];
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        assert_eq!(point[0], 4);
        assert_eq!(
            b64.decode(key["x"].as_str().unwrap()).unwrap(),
            &point[1..33]
        );
        assert_eq!(
            b64.decode(key["y"].as_str().unwrap()).unwrap(),
            &point[33..]
        );
        roots.push(der);
    }
    (doc["spiffe_sequence"].as_u64().unwrap(), roots)
}

fn openssl_stdin(args: &[&str], input: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// Whether the server's TLS certificate now verifies to `root` alone.
async fn serves_under(server: &TestServer, root: &[u8]) -> bool {
    let served = served_cert(server.running.grpc_addr, &server.root_pem()).await;
    verify_path(
        &served,
        &[],
        &[root],
        SystemTime::now(),
        webpki::KeyUsage::server_auth(),
    )
    .is_ok()
}

async fn until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn every_part_of_the_server_follows_the_published_authorities() {
    let server = TestServer::start().await;
    let old_root = ders(&server.root_pem()).remove(0);
    let first = server.running.authorities();
    assert_eq!(first.generation(), 1);
    assert_eq!(trust_bundle(&server).await, (1, vec![old_root.clone()]));
    let (old_key, old_chain) = server.issue("prod", "web", 3600).await;

    // Prepare: the new root is trusted everywhere, the old one still signs.
    let next = new_authority();
    let new_root = next.roots().roots()[0].der().to_vec();
    server
        .running
        .publish(first.prepare(next, SystemTime::now()).unwrap())
        .await
        .unwrap();
    assert_eq!(server.running.authorities().generation(), 2);
    // Only a newer generation is taken; nothing changes otherwise.
    let stale = first.prepare(new_authority(), SystemTime::now()).unwrap();
    assert!(server.running.publish(stale).await.is_err());
    assert_eq!(server.running.authorities().generation(), 2);

    let (_k, chain) = server.issue("prod", "web", 600).await;
    webpki_verify(&chain);
    let bundle = parse_pem_certs(chain.last().unwrap()).unwrap();
    assert_eq!(bundle.len(), 2, "every answer carries both roots");
    assert!(chains_to(&chain, &old_root) && !chains_to(&chain, &new_root));
    until("root-cert.pem holds both roots", async || {
        ders(&server.root_pem()).len() == 2
    })
    .await;
    let earliest = server
        .metric("citadel_server_root_cert_expiry_timestamp")
        .await;
    assert!(earliest > 0.0);

    // Activate: new leaves and the serving certificate come from the new
    // authority; a leaf of the retiring one still renews, under the new.
    let activated = server
        .running
        .authorities()
        .activate(SystemTime::now())
        .unwrap();
    server.running.publish(activated).await.unwrap();
    let (_k, chain) = server.issue("prod", "web", 600).await;
    webpki_verify(&chain);
    assert!(chains_to(&chain, &new_root) && !chains_to(&chain, &old_root));
    until(
        "the serving certificate moved to the new root",
        async || serves_under(&server, &new_root).await,
    )
    .await;
    let identity = old_chain[..old_chain.len() - 1].concat();
    let mut renewing = server.client(Some((&identity, &old_key))).await;
    let (_k, csr) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
    let renewed = request(&mut renewing, &csr, None, 0)
        .await
        .expect("a leaf of the retiring authority renews");
    webpki_verify(&renewed);
    assert!(
        chains_to(&renewed, &new_root),
        "re-issued by the active one"
    );
    assert_eq!(
        leaf_facts(&renewed[0]).uris,
        ["spiffe://cluster.local/ns/prod/sa/web"]
    );

    // Retire: the old root leaves the bundle; its leaves renew no more.
    let retired = server.running.authorities().retire().unwrap();
    server.running.publish(retired).await.unwrap();
    let (_k, chain) = server.issue("prod", "web", 600).await;
    assert_eq!(parse_pem_certs(chain.last().unwrap()).unwrap().len(), 1);
    until("root-cert.pem holds the new root alone", async || {
        ders(&server.root_pem()) == [new_root.clone()]
    })
    .await;
    let mut renewing = server.client(Some((&identity, &old_key))).await;
    let (_k, csr) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
    let err = request(&mut renewing, &csr, None, 0).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert_eq!(trust_bundle(&server).await, (4, vec![new_root.clone()]));
    let (status, _) = http_get(server.running.ops_addr.unwrap(), "/readyz").await;
    assert_eq!(status, 200, "ready throughout");
}

/// An agent started with only the old root file keeps talking to its CA
/// when the CA's serving certificate moves to the new root: it trusts the
/// roots the CA sent it (prepared before they are used) as well as its file.
#[tokio::test]
async fn an_agent_with_only_the_old_root_file_follows_the_rotation() {
    use workload_ca::agent::{self};

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("state"));
    // Connections are re-made every second, so every renewal below is a new
    // TLS handshake with whatever certificate the CA then serves.
    cfg.limits.http2.max_connection_age = Some(Duration::from_secs(1));
    cfg.limits.http2.goaway_grace = Duration::from_secs(1);
    let server = TestServer::start_with(cfg, None).await;
    let old_root_file = dir.path().join("old-root.pem");
    std::fs::copy(&server.running.root_cert_path, &old_root_file).unwrap();
    let old_root = ders(&server.root_pem()).remove(0);
    std::fs::write(dir.path().join("token"), server.token("prod", "web")).unwrap();
    let mut config = agent_config(&server, dir.path());
    config.ca.root_cert = old_root_file.clone();
    config.policy.ttl = Duration::from_secs(4);
    let agent = agent::start(config).await.unwrap();
    let watch = agent.watches[0].1.clone();
    let chain_of = |w: &workload_ca::agent::workload::CertWatch| {
        let cert = w.cert.borrow().clone()?;
        let roots = w.roots.borrow().clone()?;
        Some(vec![cert.chain_pem.clone(), roots.pem.clone()])
    };
    until("the agent's first certificate", async || {
        chain_of(&watch).is_some()
    })
    .await;

    let next = new_authority();
    let new_root = next.roots().roots()[0].der().to_vec();
    step(&server, |set| set.prepare(next, SystemTime::now())).await;
    until("the agent holds both roots", async || {
        watch
            .roots
            .borrow()
            .as_ref()
            .is_some_and(|r| ders(&r.pem).len() == 2)
    })
    .await;

    step(&server, |set| set.activate(SystemTime::now())).await;
    until("the serving certificate moved", async || {
        serves_under(&server, &new_root).await
    })
    .await;
    // The old root file alone no longer verifies the CA...
    let tcp = tokio::net::TcpStream::connect(server.running.grpc_addr)
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    assert!(
        common::procs::tls_connector(&std::fs::read_to_string(&old_root_file).unwrap())
            .connect(name, tcp)
            .await
            .is_err(),
        "the old root alone does not verify the moved serving certificate"
    );
    // ... yet the agent, started with only that file, renews under the new
    // root, over new handshakes.
    until(
        "the agent's certificate chains to the new root",
        async || {
            chain_of(&watch).is_some_and(|c| chains_to(&c, &new_root) && !chains_to(&c, &old_root))
        },
    )
    .await;
    let renewed_at = watch.cert.borrow().as_ref().map(|c| c.serial_hex.clone());
    until("and keeps renewing", async || {
        watch.cert.borrow().as_ref().map(|c| c.serial_hex.clone()) != renewed_at
    })
    .await;
    agent.shutdown().await;
    drop(dir);
}

/// A set published the moment `start` returns, before the server's own tasks
/// first ran, is still followed: `root-cert.pem` and the serving certificate.
#[tokio::test(flavor = "current_thread")]
async fn a_set_published_right_after_start_is_not_missed() {
    let server = TestServer::start().await;
    let next = new_authority();
    let new_root = next.roots().roots()[0].der().to_vec();
    let set = server
        .running
        .authorities()
        .prepare(next, SystemTime::now())
        .unwrap();
    let set2 = set.activate(SystemTime::now()).unwrap();
    server.running.publish(set).await.unwrap();
    server.running.publish(set2).await.unwrap();
    until("root-cert.pem holds both roots", async || {
        ders(&server.root_pem()).len() == 2
    })
    .await;
    until(
        "the serving certificate moved to the new root",
        async || serves_under(&server, &new_root).await,
    )
    .await;
    let (status, _) = http_get(server.running.ops_addr.unwrap(), "/readyz").await;
    assert_eq!(status, 200);
}
