//! Bad input gets the right status and nothing is issued.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tonic::Code;
use workload_ca::ca::KeyAlgorithm;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn claims(iss: &str, aud: &str, iat: i64, exp: i64) -> serde_json::Value {
    json!({
        "iss": iss, "aud": [aud], "sub": "system:serviceaccount:prod:web",
        "iat": iat, "nbf": iat, "exp": exp,
        "kubernetes.io": {"namespace": "prod", "serviceaccount": {"name": "web", "uid": "u"}, "pod": {"name": "web-1", "uid": "p"}}
    })
}

fn sign(key_pem: &str, claims: &serde_json::Value) -> String {
    workload_ca::server::jwt_crypto::install();
    jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        claims,
        &EncodingKey::from_ec_pem(key_pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// A token with any header, signed by hand with the development key (ES256):
/// jsonwebtoken cannot write a `crit` header.
fn sign_with_header(
    key_pem: &str,
    header: &serde_json::Value,
    claims: &serde_json::Value,
) -> String {
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let der = pem::parse(key_pem).unwrap().into_contents();
    let rng = ring::rand::SystemRandom::new();
    let key = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &der,
        &rng,
    )
    .unwrap();
    let sig = key.sign(&rng, input.as_bytes()).unwrap();
    format!("{input}.{}", B64.encode(sig.as_ref()))
}

fn broken_signature_csr() -> String {
    let (_key, csr) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
    let mut der = ders(&csr).remove(0);
    let n = der.len();
    der[n - 5] ^= 0x40;
    pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der))
}

#[tokio::test]
async fn each_bad_input_gets_its_status_and_nothing_is_issued() {
    let server = TestServer::start().await;
    let mut client = server.client(None).await;
    let dev_key = server.dev_key_pem();
    let good_token = server.token("prod", "web");
    let (_k, good_csr) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let other_key = workload_ca::ca::PrivateKey::generate(KeyAlgorithm::EcdsaP256)
        .unwrap()
        .to_pem()
        .to_string();
    let alg_none = format!(
        "{}.{}.",
        B64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        B64.encode(claims("workload-ca-dev", "istio-ca", now, now + 600).to_string())
    );
    // Our JWT provider refuses to sign HMAC at all, so build this one by hand.
    let hs_input = format!(
        "{}.{}",
        B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
        B64.encode(claims("workload-ca-dev", "istio-ca", now, now + 600).to_string())
    );
    let mac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"guessable"),
        hs_input.as_bytes(),
    );
    let hs256 = format!("{hs_input}.{}", B64.encode(mac.as_ref()));
    let (_k, other_identity_csr) = key_and_csr(
        KeyAlgorithm::EcdsaP256,
        Some("spiffe://cluster.local/ns/prod/sa/admin"),
    );
    let huge_csr = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        "A".repeat(1 << 20)
    );

    struct Case {
        name: &'static str,
        csr: String,
        token: Option<String>,
        ttl: i64,
        code: Code,
        message_has: &'static str,
    }
    let t = |s: &str| Some(s.to_string());
    let cases = vec![
        Case {
            name: "garbage PEM",
            csr: "-----BEGIN CERTIFICATE REQUEST-----\n!!!\n".into(),
            token: t(&good_token),
            ttl: 0,
            code: Code::InvalidArgument,
            message_has: "CSR",
        },
        Case {
            name: "not PEM at all",
            csr: "hello".into(),
            token: t(&good_token),
            ttl: 0,
            code: Code::InvalidArgument,
            message_has: "CSR",
        },
        Case {
            name: "broken CSR signature",
            csr: broken_signature_csr(),
            token: t(&good_token),
            ttl: 0,
            code: Code::InvalidArgument,
            message_has: "signature",
        },
        Case {
            name: "RSA-1024 key",
            csr: fixture("rsa1024.csr.pem"),
            token: t(&good_token),
            ttl: 0,
            code: Code::InvalidArgument,
            message_has: "1024",
        },
        Case {
            name: "SHA-1 signed CSR",
            csr: fixture("rsa2048-sha1.csr.pem"),
            token: t(&good_token),
            ttl: 0,
            code: Code::InvalidArgument,
            message_has: "SHA-1",
        },
        Case {
            // Refused by the message-size limit before it is buffered.
            name: "1 MiB CSR",
            csr: huge_csr,
            token: t(&good_token),
            ttl: 0,
            code: Code::OutOfRange,
            message_has: "limit",
        },
        Case {
            name: "65 KiB CSR (under the message limit, over the CSR limit)",
            csr: format!(
                "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
                "A".repeat(65 * 1024)
            ),
            token: t(&good_token),
            ttl: 0,
            code: Code::InvalidArgument,
            message_has: "limit",
        },
        Case {
            name: "RSA-4100 key (4,100 bits, 513 bytes of modulus)",
            csr: fixture("rsa4100.csr.pem"),
            token: t(&good_token),
            ttl: 0,
            code: Code::InvalidArgument,
            message_has: "4100",
        },
        Case {
            name: "RSA-2047 key",
            csr: fixture("rsa2047.csr.pem"),
            token: t(&good_token),
            ttl: 0,
            code: Code::InvalidArgument,
            message_has: "2047",
        },
        Case {
            name: "DER CSR base64 without PEM armour",
            csr: B64.encode(ders(&good_csr).remove(0)),
            token: t(&good_token),
            ttl: 0,
            code: Code::InvalidArgument,
            message_has: "PEM",
        },
        Case {
            name: "CSR for another identity",
            csr: other_identity_csr,
            token: t(&good_token),
            ttl: 0,
            code: Code::PermissionDenied,
            message_has: "spiffe://cluster.local/ns/prod/sa/web",
        },
        Case {
            name: "TTL above the maximum",
            csr: good_csr.clone(),
            token: t(&good_token),
            ttl: 91 * 86_400,
            code: Code::InvalidArgument,
            message_has: "maximum",
        },
        Case {
            name: "expired token",
            csr: good_csr.clone(),
            token: Some(sign(
                &dev_key,
                &claims("workload-ca-dev", "istio-ca", now - 7200, now - 3600),
            )),
            ttl: 0,
            code: Code::Unauthenticated,
            message_has: "",
        },
        Case {
            name: "not-yet-valid token",
            csr: good_csr.clone(),
            token: Some(sign(
                &dev_key,
                &claims("workload-ca-dev", "istio-ca", now + 3600, now + 7200),
            )),
            ttl: 0,
            code: Code::Unauthenticated,
            message_has: "",
        },
        Case {
            name: "wrong audience",
            csr: good_csr.clone(),
            token: Some(sign(
                &dev_key,
                &claims("workload-ca-dev", "kubernetes", now, now + 600),
            )),
            ttl: 0,
            code: Code::Unauthenticated,
            message_has: "",
        },
        Case {
            name: "wrong issuer",
            csr: good_csr.clone(),
            token: Some(sign(
                &dev_key,
                &claims("https://evil.example", "istio-ca", now, now + 600),
            )),
            ttl: 0,
            code: Code::Unauthenticated,
            message_has: "",
        },
        Case {
            name: "badly signed token",
            csr: good_csr.clone(),
            token: Some(sign(
                &other_key,
                &claims("workload-ca-dev", "istio-ca", now, now + 600),
            )),
            ttl: 0,
            code: Code::Unauthenticated,
            message_has: "",
        },
        Case {
            name: "alg none",
            csr: good_csr.clone(),
            token: Some(alg_none),
            ttl: 0,
            code: Code::Unauthenticated,
            message_has: "",
        },
        Case {
            name: "HS256 token",
            csr: good_csr.clone(),
            token: Some(hs256),
            ttl: 0,
            code: Code::Unauthenticated,
            message_has: "",
        },
        Case {
            name: "truncated token",
            csr: good_csr.clone(),
            token: Some(good_token[..good_token.len() - 10].to_string()),
            ttl: 0,
            code: Code::Unauthenticated,
            message_has: "",
        },
        Case {
            name: "token with a critical header parameter",
            csr: good_csr.clone(),
            token: Some(sign_with_header(
                &dev_key,
                &json!({"alg": "ES256", "typ": "JWT", "crit": ["exp"]}),
                &claims("workload-ca-dev", "istio-ca", now, now + 600),
            )),
            ttl: 0,
            code: Code::Unauthenticated,
            message_has: "",
        },
        Case {
            name: "token issued in the future (iat), valid nbf",
            csr: good_csr.clone(),
            token: Some(sign(&dev_key, &{
                let mut c = claims("workload-ca-dev", "istio-ca", now + 3600, now + 7200);
                c["nbf"] = json!(now - 10);
                c
            })),
            ttl: 0,
            code: Code::Unauthenticated,
            message_has: "",
        },
        Case {
            name: "token without iat (its lifetime cannot be bounded)",
            csr: good_csr.clone(),
            token: Some(sign(&dev_key, &{
                let mut c = claims("workload-ca-dev", "istio-ca", now, now + 600);
                c.as_object_mut().unwrap().remove("iat");
                c
            })),
            ttl: 0,
            code: Code::Unauthenticated,
            message_has: "",
        },
        Case {
            name: "token living longer than the one-year ceiling",
            csr: good_csr.clone(),
            token: Some(sign(
                &dev_key,
                &claims("workload-ca-dev", "istio-ca", now, now + 366 * 86_400),
            )),
            ttl: 0,
            code: Code::Unauthenticated,
            message_has: "",
        },
        Case {
            name: "no token",
            csr: good_csr.clone(),
            token: None,
            ttl: 0,
            code: Code::Unauthenticated,
            message_has: "",
        },
    ];

    for case in &cases {
        let err = request(&mut client, &case.csr, case.token.as_deref(), case.ttl)
            .await
            .map(|_| ())
            .expect_err(case.name);
        assert_eq!(err.code(), case.code, "{}: {}", case.name, err.message());
        assert!(
            err.message().contains(case.message_has),
            "{}: {:?} lacks {:?}",
            case.name,
            err.message(),
            case.message_has
        );
        if case.code == Code::Unauthenticated {
            assert_eq!(
                err.message(),
                "authentication failed",
                "{}: no hint for an attacker",
                case.name
            );
        }
    }
    assert_eq!(
        server
            .metric("citadel_server_success_cert_issuance_count")
            .await,
        0.0,
        "nothing issued"
    );
    assert_eq!(
        server
            .metric("citadel_server_authentication_failure_count")
            .await,
        13.0
    );
    assert_eq!(
        server.metric("citadel_server_csr_parsing_err_count").await,
        9.0,
        "the 1 MiB CSR never reaches the CSR parser"
    );
    assert_eq!(
        server
            .metric("workload_ca_limit_refusals_total{limit=\"message_size\"}")
            .await,
        1.0
    );
    assert_eq!(
        server.metric("citadel_server_csr_sign_err_count").await,
        2.0
    );

    // A Kubernetes extended token lives exactly one year: accepted.
    let year = sign(
        &dev_key,
        &claims("workload-ca-dev", "istio-ca", now, now + 365 * 86_400),
    );
    let chain = request(&mut client, &good_csr, Some(&year), 0)
        .await
        .expect("a one-year token is at the ceiling, not above it");
    webpki_verify(&chain);

    // Two authorization values are ambiguous, even if one is good.
    let mut req = tonic::Request::new(workload_ca::proto::istio::IstioCertificateRequest {
        csr: good_csr.clone(),
        validity_duration: 0,
        metadata: None,
    });
    for t in [&good_token, &year] {
        req.metadata_mut()
            .append("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let err = client.create_certificate(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());

    // The same client and token still work: bad input changed nothing.
    let chain = request(&mut client, &good_csr, Some(&good_token), 0)
        .await
        .expect("good request after the bad ones");
    webpki_verify(&chain);
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_unauthenticated() {
    let ours = TestServer::start().await;
    let theirs = TestServer::start().await;
    // A perfectly good SVID, same trust domain and identity, from another CA.
    let (key, csr) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
    let foreign = request(
        &mut theirs.client(None).await,
        &csr,
        Some(&theirs.token("prod", "web")),
        0,
    )
    .await
    .unwrap();
    let identity = foreign[..foreign.len() - 1].concat();
    let mut client = ours.client(Some((&identity, &key))).await;
    let (_k, csr2) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
    let err = request(&mut client, &csr2, None, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(err.message(), "authentication failed");
    // A valid token on the same connection still succeeds: first success wins.
    let chain = request(&mut client, &csr2, Some(&ours.token("prod", "web")), 0)
        .await
        .unwrap();
    webpki_verify(&chain);
    assert_eq!(
        ours.metric("citadel_server_success_cert_issuance_count")
            .await,
        1.0
    );
}

#[tokio::test]
async fn impersonation_is_refused() {
    let server = TestServer::start().await;
    let mut client = server.client(None).await;
    let (_k, csr) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
    let mut req = tonic::Request::new(workload_ca::proto::istio::IstioCertificateRequest {
        csr,
        validity_duration: 0,
        metadata: Some(prost_types::Struct {
            fields: [(
                "ImpersonatedIdentity".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(
                        "spiffe://cluster.local/ns/prod/sa/admin".into(),
                    )),
                },
            )]
            .into(),
        }),
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", server.token("prod", "web"))
            .parse()
            .unwrap(),
    );
    let err = client.create_certificate(req).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message()
            .contains("spiffe://cluster.local/ns/prod/sa/web")
    );
}
