//! TLS 1.3 session resumption between the agent's CA client and the CA:
//! a reconnection resumes (seen on the client's connection and in the CA's
//! handshake counter), and a change of the agent's trust forces a full
//! handshake, verified against the new trust.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestServer;
use rustls::HandshakeKind;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use workload_ca::agent::client::tls_connector;
use workload_ca::agent::trust::CaTrust;
use workload_ca::ca::{Authority, KeyAlgorithm};
use workload_ca::identity::TrustDomain;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One connection through `connector`: its handshake kind, once the
/// server's first bytes (its SETTINGS, after the session ticket) are read.
async fn connect(server: &TestServer, connector: &tokio_rustls::TlsConnector) -> HandshakeKind {
    let tcp = tokio::net::TcpStream::connect(server.running.grpc_addr)
        .await
        .unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("the CA is trusted");
    tls.write_all(PREFACE).await.unwrap();
    tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
        .await
        .expect("the server speaks")
        .unwrap();
    assert!(n > 0);
    let kind = tls.get_ref().1.handshake_kind().unwrap();
    let _ = tls.shutdown().await;
    kind
}

#[tokio::test]
async fn reconnections_resume_until_the_trust_changes() {
    let server = TestServer::start().await;
    let root_file = server.running.root_cert_path.clone();
    let trust = Arc::new(CaTrust::from_file(&root_file).unwrap());
    let connector = tls_connector(trust.clone()).unwrap();
    let resumed = || server.metric("workload_ca_tls_handshakes_total{kind=\"resumed\"}");

    assert_eq!(connect(&server, &connector).await, HandshakeKind::Full);
    assert_eq!(connect(&server, &connector).await, HandshakeKind::Resumed);
    assert_eq!(connect(&server, &connector).await, HandshakeKind::Resumed);
    assert_eq!(resumed().await, 2.0, "the CA counts them");

    // The agent learns another bundle: sessions verified under the old
    // trust are not resumed; the next handshake verifies the CA afresh.
    let td = TrustDomain::new(common::TD).unwrap();
    let other = Authority::generate_root(
        &td,
        KeyAlgorithm::EcdsaP256,
        Duration::from_secs(86_400),
        std::time::SystemTime::now(),
    )
    .unwrap();
    trust.learn(&other.ca_cert);
    assert_eq!(connect(&server, &connector).await, HandshakeKind::Full);
    assert_eq!(connect(&server, &connector).await, HandshakeKind::Resumed);
    // The same bundle again is no change.
    trust.learn(&other.ca_cert);
    assert_eq!(connect(&server, &connector).await, HandshakeKind::Resumed);
    assert_eq!(resumed().await, 4.0);
    assert_eq!(
        server
            .metric("workload_ca_tls_handshakes_total{kind=\"full\"}")
            .await,
        2.0
    );
}

/// The suite a client with rustls' default order (AES-256-GCM with SHA-384
/// first) gets from the CA, over `versions`.
async fn negotiated(
    server: &TestServer,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::CipherSuite {
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(&server.running.root_cert_path).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = rustls::crypto::ring::default_provider();
    assert_eq!(
        provider.cipher_suites[0].suite(),
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
        "the client prefers SHA-384"
    );
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(server.running.grpc_addr)
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.negotiated_cipher_suite().unwrap().suite()
}

#[tokio::test]
async fn the_ca_chooses_the_sha256_suites() {
    let server = TestServer::start().await;
    assert_eq!(
        negotiated(&server, &[&rustls::version::TLS13]).await,
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
    );
    assert_eq!(
        negotiated(&server, &[&rustls::version::TLS12]).await,
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    );
}
