//! The server's own TLS certificate renews without a restart, other token
//! issuers (RS256 from a PEM file, ES256 from a loopback JWKS URL), health,
//! graceful shutdown, and the real `ca` binary.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls_pki_types::ServerName;
use serde_json::json;
use workload_ca::ca::{KeyAlgorithm, PrivateKey};
use workload_ca::server::jwt::{IssuerConfig, KeySource};

/// The serving certificate the server presents to a fresh TLS handshake.
async fn served_cert(server: &TestServer) -> Vec<u8> {
    common::procs::served_cert(server.running.grpc_addr, &server.root_pem()).await
}

#[tokio::test]
async fn the_serving_certificate_renews_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("state"));
    cfg.serving.ttl = Duration::from_secs(4);
    let server = TestServer::start_with(cfg, Some(dir)).await;
    let first = served_cert(&server).await;
    let f = leaf_facts(&pem::encode(&pem::Pem::new("CERTIFICATE", first.clone())));
    assert!(f.server_auth && !f.client_auth && !f.is_ca && f.dns == 1 && f.uris.is_empty());

    let deadline = Instant::now() + Duration::from_secs(20);
    let mut renewed = None;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = served_cert(&server).await;
        if now != first {
            renewed = Some(now);
            break;
        }
    }
    assert!(
        renewed.is_some(),
        "the serving certificate was not renewed at half-life"
    );
    // And the service works over the renewed certificate.
    let (_k, _chain) = server.issue("prod", "web", 0).await;
}

fn k8s_claims(iss: &str) -> serde_json::Value {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({
        "iss": iss, "aud": ["istio-ca"], "sub": "system:serviceaccount:payments:api",
        "iat": now, "nbf": now, "exp": now + 600,
        "kubernetes.io": {"namespace": "payments", "serviceaccount": {"name": "api", "uid": "1"}, "pod": {"name": "api-0", "uid": "2"}}
    })
}

async fn serve_jwks(body: String) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/openid/v1/jwks",
        axum::routing::get(move || async move { body }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test]
async fn tokens_from_configured_issuers_rs256_file_and_es256_loopback_url() {
    workload_ca::server::jwt_crypto::install();
    let dir = tempfile::tempdir().unwrap();

    // RS256, public key as a PEM file.
    let rsa = PrivateKey::generate(KeyAlgorithm::Rsa2048).unwrap();
    let rsa_pub = dir.path().join("sa.pub");
    std::fs::write(
        &rsa_pub,
        workload_ca::ca::bundle::to_pem("PUBLIC KEY", &rsa.spki_der()),
    )
    .unwrap();
    // ES256, served as a JWKS over HTTP on loopback, with a kid.
    let ec = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let ec_key = EncodingKey::from_ec_pem(ec.to_pem().as_bytes()).unwrap();
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&ec_key, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("k1".into());
    let jwks_addr =
        serve_jwks(serde_json::to_string(&jsonwebtoken::jwk::JwkSet { keys: vec![jwk] }).unwrap())
            .await;

    let mut cfg = config(&dir.path().join("state"));
    cfg.dev_issuer = false;
    cfg.jwt_issuers = vec![
        IssuerConfig {
            issuer: "https://rsa.example".into(),
            keys: KeySource::File(rsa_pub),
        },
        IssuerConfig {
            issuer: "https://kubernetes.default.svc".into(),
            keys: KeySource::parse(&format!("http://{jwks_addr}/openid/v1/jwks")).unwrap(),
        },
    ];
    let server = TestServer::start_with(cfg, Some(dir)).await;
    assert!(server.running.dev_issuer_key.is_none());
    let mut client = server.client(None).await;

    // Kubernetes tokens always name a kid; a PEM key has none and must match.
    let mut rs_header = Header::new(Algorithm::RS256);
    rs_header.kid = Some("kubernetes-sa-key-1".into());
    let rs_token = jsonwebtoken::encode(
        &rs_header,
        &k8s_claims("https://rsa.example"),
        &EncodingKey::from_rsa_pem(rsa.to_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    let mut es_header = Header::new(Algorithm::ES256);
    es_header.kid = Some("k1".into());
    let es_token = jsonwebtoken::encode(
        &es_header,
        &k8s_claims("https://kubernetes.default.svc"),
        &ec_key,
    )
    .unwrap();
    for token in [&rs_token, &es_token] {
        let (_k, csr) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
        let chain = request(&mut client, &csr, Some(token), 0)
            .await
            .expect("token from a configured issuer");
        webpki_verify(&chain);
        assert_eq!(
            leaf_facts(&chain[0]).uris,
            ["spiffe://cluster.local/ns/payments/sa/api"]
        );
    }
    // A token whose kubernetes.io claim disagrees with sub is refused.
    let mut claims = k8s_claims("https://rsa.example");
    claims["kubernetes.io"]["namespace"] = json!("kube-system");
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(rsa.to_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    let (_k, csr) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
    assert_eq!(
        request(&mut client, &csr, Some(&forged), 0)
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated
    );
    // Development tokens are not trusted unless --dev.
    let dev = workload_ca::server::devissuer::DevIssuer::load_or_create(&server.state).unwrap();
    let dev_token = dev
        .mint(
            "payments",
            "api",
            "istio-ca",
            Duration::from_secs(60),
            SystemTime::now(),
        )
        .unwrap();
    assert_eq!(
        request(&mut client, &csr, Some(&dev_token), 0)
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated
    );
}

#[tokio::test]
async fn health_and_graceful_shutdown() {
    let server = TestServer::start().await;
    let ops = server.running.ops_addr.unwrap();
    assert_eq!(http_get(ops, "/healthz").await.0, 200);
    assert_eq!(http_get(ops, "/readyz").await, (200, "ready\n".to_string()));
    let grpc = server.running.grpc_addr;
    let started = Instant::now();
    server.running.shutdown().await.expect("clean shutdown");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "an idle server drains at once"
    );
    assert!(
        tokio::net::TcpStream::connect(grpc).await.is_err(),
        "the gRPC port is closed after shutdown"
    );
}

#[test]
fn the_binary_runs_the_embedded_default_and_mints_tokens() {
    use std::io::{BufRead, BufReader};
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let bin = env!("CARGO_BIN_EXE_ca");
    let mut child = spawn_ca(
        &[
            "server",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "127.0.0.1:0",
        ],
        &state,
    );
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = Vec::new();
    for line in lines.by_ref().take(9) {
        banner.push(line.unwrap());
    }
    let text = banner.join("\n");
    for want in ["gRPC (TLS)", "root cert", "ca token", "metrics"] {
        assert!(
            text.contains(want),
            "start-up banner lacks {want:?}:\n{text}"
        );
    }
    assert!(state.join("root-cert.pem").exists());
    let token = Command::new(bin)
        .args([
            "token",
            "--namespace",
            "prod",
            "--service-account",
            "web",
            "--state-dir",
        ])
        .arg(&state)
        .output()
        .unwrap();
    assert!(token.status.success());
    assert_eq!(
        String::from_utf8(token.stdout)
            .unwrap()
            .trim()
            .split('.')
            .count(),
        3,
        "a JWT"
    );
    // SIGTERM: drains and exits 0.
    stop_ca(child);
    // A bad flag is a clear error and a non-zero exit.
    let bad = Command::new(bin)
        .args(["server", "--trust-domain", "UPPER"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("trust domain"));
}

#[tokio::test]
async fn the_run_command_brings_up_a_ca_and_an_agent() {
    use std::io::{BufRead, BufReader};
    use workload_ca::proto::envoy::service::discovery::v3::DiscoveryRequest;
    use workload_ca::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut child = spawn_ca(
        &[
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "off",
            "--agent-ops-listen",
            "127.0.0.1:0",
        ],
        &state,
    );
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let banner: Vec<String> = lines
        .map(|l| l.unwrap())
        .take_while(|l| !l.contains("try Envoy"))
        .collect();
    let text = banner.join("\n");
    assert!(
        text.contains("spiffe://cluster.local/ns/default/sa/default"),
        "{text}"
    );
    let socket = state.join("sds.sock");
    assert!(socket.exists(), "{text}");

    // What Envoy would fetch: the default certificate and the roots.
    let mut sds = SecretDiscoveryServiceClient::new(unix_channel(&socket).await);
    let resp = sds
        .fetch_secrets(DiscoveryRequest {
            resource_names: vec!["default".into(), "ROOTCA".into()],
            ..Default::default()
        })
        .await
        .expect("the agent serves its certificate")
        .into_inner();
    assert_eq!(resp.resources.len(), 2);

    // Stopped while our SDS connection is still open (stop_ca blocks this
    // runtime): the socket must still be removed.
    stop_ca(child);
    assert!(!socket.exists(), "the socket is removed on shutdown");
}

/// Shutdown has one deadline: a call still in flight (its body never
/// comes, its own deadline far away) is cut off when the drain timeout is
/// over, and every task the server started has stopped when `shutdown`
/// returns.
#[tokio::test]
async fn shutdown_forces_what_is_still_in_flight_at_its_deadline() {
    use common::h2raw::{self, RawH2};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("state"));
    cfg.drain_timeout = Duration::from_secs(1);
    let server = TestServer::start_with(cfg, Some(dir)).await;
    let tcp = tokio::net::TcpStream::connect(server.running.grpc_addr)
        .await
        .unwrap();
    let tls = common::procs::tls_connector(&server.root_pem())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut raw = RawH2::handshake(tls).await.unwrap();
    raw.send_headers(
        1,
        &h2raw::grpc_headers(
            "localhost",
            "/istio.v1.auth.IstioCertificateService/CreateCertificate",
        ),
        false,
    )
    .await
    .unwrap();
    raw.collect(Duration::from_millis(200)).await;

    let started = Instant::now();
    let stopped = server.running.shutdown().await.expect("clean shutdown");
    let took = started.elapsed();
    assert!(
        stopped.forced.is_empty(),
        "the accept loop closed the connection at the drain timeout itself; no task needed force: {stopped:?}"
    );
    assert!(
        took >= Duration::from_millis(900),
        "the call in flight was given the drain time: {took:?}"
    );
    assert!(took < Duration::from_secs(4), "and no more: {took:?}");
    let events = raw.collect(Duration::from_secs(2)).await;
    assert!(events.closed, "its connection is closed: {events:?}");
    assert_eq!(
        events.goaway.map(|(_, c)| c),
        Some(h2raw::NO_ERROR),
        "after a GOAWAY"
    );
}
