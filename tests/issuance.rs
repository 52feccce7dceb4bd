//! End to end: a real server on port 0, a real TLS gRPC client, and every
//! issued certificate checked by rustls-webpki and by openssl.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use common::*;
use workload_ca::ca::KeyAlgorithm;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

const WEB: &str = "spiffe://cluster.local/ns/prod/sa/web";

#[tokio::test]
async fn issues_a_conformant_svid_for_the_token_identity() {
    let server = TestServer::start().await;
    let mut client = server.client(None).await;
    let token = server.token("prod", "web");
    let (_key, csr) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
    let before = now_secs();
    let chain = request(&mut client, &csr, Some(&token), 3600)
        .await
        .expect("issued");

    assert_eq!(chain.len(), 2, "leaf, then the root bundle");
    assert_eq!(
        chain[1],
        server.root_pem(),
        "the last element is the root bundle clients trust"
    );
    webpki_verify(&chain);
    openssl_verify(&chain);

    let f = leaf_facts(&chain[0]);
    assert_eq!(f.uris, [WEB], "exactly one URI SAN: the token's identity");
    assert_eq!(f.dns, 0);
    assert!(!f.is_ca);
    assert!(f.ku_critical && f.digital_signature && !f.key_cert_sign);
    assert!(!f.key_encipherment, "keyEncipherment is for RSA keys only");
    assert!(f.server_auth && f.client_auth);
    assert!(
        f.subject_empty && f.san_critical,
        "empty subject needs a critical SAN"
    );
    assert!(
        f.has_aki,
        "strict verifiers need an authority key identifier"
    );
    assert!(f.serial_bits >= 128, "serial of {} bits", f.serial_bits);
    assert!(
        f.not_before <= before - 60,
        "NotBefore is backdated for clock skew"
    );
    assert!(
        (f.not_after - (before + 3600)).abs() <= 5,
        "NotAfter = now + requested TTL"
    );
    assert_eq!(
        server
            .metric("citadel_server_success_cert_issuance_count")
            .await,
        1.0
    );
    assert_eq!(server.metric("citadel_server_csr_count").await, 1.0);
}

#[tokio::test]
async fn every_allowed_csr_key_type_is_signed() {
    let server = TestServer::start().await;
    let mut client = server.client(None).await;
    let token = server.token("prod", "web");
    for (alg, rsa) in [
        (KeyAlgorithm::EcdsaP256, false),
        (KeyAlgorithm::EcdsaP384, false),
        (KeyAlgorithm::Ed25519, false),
        (KeyAlgorithm::Rsa2048, true),
    ] {
        let (_key, csr) = key_and_csr(alg, Some(WEB));
        let chain = request(&mut client, &csr, Some(&token), 0)
            .await
            .unwrap_or_else(|e| panic!("{alg}: {e}"));
        webpki_verify(&chain);
        openssl_verify(&chain);
        let f = leaf_facts(&chain[0]);
        assert_eq!(f.uris, [WEB], "{alg}");
        assert_eq!(
            f.key_encipherment, rsa,
            "{alg}: keyEncipherment only for RSA"
        );
        assert!(
            (f.not_after - f.not_before) >= 24 * 3600,
            "{alg}: validity_duration 0 means the 24h default"
        );
    }
    for name in ["rsa3072.csr.pem", "rsa4096.csr.pem"] {
        let chain = request(&mut client, &fixture(name), Some(&token), 0)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        webpki_verify(&chain);
        assert!(leaf_facts(&chain[0]).key_encipherment);
    }
}

#[tokio::test]
async fn accepts_the_csrs_real_istio_agents_and_ztunnel_send() {
    let server = TestServer::start().await;
    let mut client = server.client(None).await;
    let token = server.token("default", "sleep");
    for name in [
        "istio-agent-rsa2048.csr.pem",
        "istio-agent-p256.csr.pem",
        "istio-agent-rsa2048-nosan.csr.pem",
        "ztunnel-p256-empty-subject.csr.pem",
    ] {
        let csr = fixture(name);
        let chain = request(&mut client, &csr, Some(&token), 0)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        webpki_verify(&chain);
        openssl_verify(&chain);
        let f = leaf_facts(&chain[0]);
        assert_eq!(
            f.uris,
            ["spiffe://cluster.local/ns/default/sa/sleep"],
            "{name}"
        );
        // Only the public key comes from the CSR.
        let csr_der = ders(&csr).remove(0);
        let (_, req) = X509CertificationRequest::from_der(&csr_der).unwrap();
        assert_eq!(
            f.spki, req.certification_request_info.subject_pki.raw,
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_csr_asking_for_ca_true_still_gets_a_leaf() {
    let server = TestServer::start().await;
    let mut client = server.client(None).await;
    let token = server.token("prod", "web");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let chain = request(&mut client, &csr, Some(&token), 0)
        .await
        .expect("issued, with the request ignored");
    let f = leaf_facts(&chain[0]);
    assert!(!f.is_ca, "CA=true from the CSR must never be copied");
    assert!(!f.key_cert_sign);
    assert_eq!(f.dns, 0, "DNS names from the CSR are not copied");
    assert_eq!(f.uris, [WEB]);
    webpki_verify(&chain);
}

#[tokio::test]
async fn renewal_with_the_current_certificate_keeps_the_identity() {
    let server = TestServer::start().await;
    let token = server.token("prod", "web");
    let (key, csr) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
    let chain = request(&mut server.client(None).await, &csr, Some(&token), 0)
        .await
        .unwrap();

    let identity_chain = chain[..chain.len() - 1].concat();
    let mut mtls = server.client(Some((&identity_chain, &key))).await;
    let (_key2, csr2) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
    let renewed = request(&mut mtls, &csr2, None, 0)
        .await
        .expect("renewed with the client certificate alone");
    webpki_verify(&renewed);
    assert_eq!(leaf_facts(&renewed[0]).uris, [WEB]);

    // A certificate cannot be used to get another identity.
    let (_k, other) = key_and_csr(
        KeyAlgorithm::EcdsaP256,
        Some("spiffe://cluster.local/ns/prod/sa/admin"),
    );
    let err = request(&mut mtls, &other, None, 0).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn renewal_never_stretches_the_presented_lifetime() {
    let server = TestServer::start().await;
    let token = server.token("prod", "web");
    let (key, csr) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
    let short = request(&mut server.client(None).await, &csr, Some(&token), 60)
        .await
        .unwrap();
    let presented = leaf_facts(&short[0]);
    let presented_life = presented.not_after - presented.not_before;
    assert_eq!(presented_life, 60 + 120, "60 s plus the 2-minute backdate");

    let identity_chain = short[..short.len() - 1].concat();
    let mut mtls = server.client(Some((&identity_chain, &key))).await;
    // Asking for the maximum, for the default (24 h), or for less.
    for (asked, expected) in [(90 * 86_400 - 1, 60), (0, 60), (30, 30)] {
        let (_k, csr2) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
        let renewed = request(&mut mtls, &csr2, None, asked).await.unwrap();
        webpki_verify(&renewed);
        let f = leaf_facts(&renewed[0]);
        assert_eq!(f.uris, [WEB]);
        assert_eq!(
            f.not_after - f.not_before,
            expected + 120,
            "asked {asked} s with a 60 s certificate"
        );
        assert!(f.not_after - f.not_before <= presented_life);
    }
    // A token caller still gets what it asks for.
    let (_k, csr3) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
    let long = request(&mut server.client(None).await, &csr3, Some(&token), 86_400)
        .await
        .unwrap();
    let f = leaf_facts(&long[0]);
    assert_eq!(f.not_after - f.not_before, 86_400 + 120);
}

#[tokio::test]
async fn rsa_root_signs_verifiable_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("state"));
    cfg.ca = workload_ca::server::CaSource::Embedded {
        algorithm: KeyAlgorithm::Rsa2048,
        root_lifetime: std::time::Duration::from_secs(86_400 * 365),
    };
    let server = TestServer::start_with(cfg, Some(dir)).await;
    let root = leaf_facts(&server.root_pem());
    assert!(root.is_ca && root.key_cert_sign);
    assert_eq!(
        root.uris,
        ["spiffe://cluster.local"],
        "a root carries the trust domain's ID with no path"
    );
    let token = server.token("prod", "web");
    let mut client = server.client(None).await;
    for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Rsa2048] {
        let (_key, csr) = key_and_csr(alg, None);
        let chain = request(&mut client, &csr, Some(&token), 0).await.unwrap();
        webpki_verify(&chain);
        openssl_verify(&chain);
    }
}

#[tokio::test]
async fn a_leaf_never_outlives_its_signer() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("state"));
    cfg.ca = workload_ca::server::CaSource::Embedded {
        algorithm: KeyAlgorithm::EcdsaP256,
        root_lifetime: std::time::Duration::from_secs(7200),
    };
    cfg.serving.ttl = std::time::Duration::from_secs(600);
    let server = TestServer::start_with(cfg, Some(dir)).await;
    let token = server.token("prod", "web");
    let (_key, csr) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
    let chain = request(&mut server.client(None).await, &csr, Some(&token), 86_400)
        .await
        .unwrap();
    let leaf = leaf_facts(&chain[0]);
    let root = leaf_facts(&server.root_pem());
    assert!(
        leaf.not_after <= root.not_after,
        "leaf {} > root {}",
        leaf.not_after,
        root.not_after
    );
    webpki_verify(&chain);
}
