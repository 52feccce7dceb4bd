//! Every algorithm branch of the ring-backed JWT provider (RS256/384/512,
//! PS256/384/512, ES256/384, EdDSA), each with tokens made by an independent
//! implementation: keys and signatures come from the `openssl` CLI, not from
//! jsonwebtoken or ring. Each token goes through a real server: a good one is
//! issued a certificate; the same token with one signature byte changed,
//! signed by another key of the same kind, or relabelled with a sibling
//! algorithm of the same key family, is refused.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use serde_json::json;
use workload_ca::ca::KeyAlgorithm;
use workload_ca::server::jwt::{IssuerConfig, KeySource};

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The key kinds, each as `openssl genpkey` arguments.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl Kind {
    fn genpkey(self) -> &'static [&'static str] {
        match self {
            Kind::Rsa => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            Kind::P256 => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            Kind::P384 => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
            Kind::Ed25519 => &["-algorithm", "ed25519"],
        }
    }
}

/// A private key made by openssl, and its public key's PEM file.
struct Key {
    private: PathBuf,
    public: PathBuf,
}

fn key(dir: &Path, name: &str, kind: Kind) -> Key {
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let mut args = vec!["genpkey"];
    args.extend_from_slice(kind.genpkey());
    args.extend_from_slice(&["-out", private.to_str().unwrap()]);
    openssl(&args);
    openssl(&[
        "pkey",
        "-in",
        private.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    Key { private, public }
}

/// DER `ECDSA-Sig-Value` to JWS's fixed `r || s`, each `n` bytes.
fn der_to_fixed(der: &[u8], n: usize) -> Vec<u8> {
    fn read_len(b: &[u8], at: &mut usize) -> usize {
        let first = b[*at];
        *at += 1;
        if first < 0x80 {
            return first as usize;
        }
        let mut len = 0;
        for _ in 0..(first & 0x7f) {
            len = (len << 8) | b[*at] as usize;
            *at += 1;
        }
        len
    }
    let mut at = 0;
    assert_eq!(der[at], 0x30);
    at += 1;
    read_len(der, &mut at);
    let mut out = Vec::new();
    for _ in 0..2 {
        assert_eq!(der[at], 0x02);
        at += 1;
        let len = read_len(der, &mut at);
        let int = &der[at..at + len];
        at += len;
        let int = &int[int.iter().take_while(|b| **b == 0).count()..];
        assert!(int.len() <= n);
        out.extend(std::iter::repeat_n(0u8, n - int.len()));
        out.extend_from_slice(int);
    }
    out
}

/// `input` signed with `key` under JWS algorithm `alg`, by openssl.
fn sign(dir: &Path, alg: &str, key: &Key, input: &[u8]) -> Vec<u8> {
    let data = dir.join("input");
    std::fs::write(&data, input).unwrap();
    let k = key.private.to_str().unwrap();
    let d = data.to_str().unwrap();
    let digest = match &alg[2..] {
        "256" => "-sha256",
        "384" => "-sha384",
        "512" => "-sha512",
        _ => "",
    };
    match &alg[..2] {
        "RS" => openssl(&["dgst", digest, "-sign", k, d]),
        "PS" => openssl(&[
            "dgst",
            digest,
            "-sigopt",
            "rsa_padding_mode:pss",
            "-sigopt",
            "rsa_pss_saltlen:digest",
            "-sign",
            k,
            d,
        ]),
        "ES" => der_to_fixed(
            &openssl(&["dgst", digest, "-sign", k, d]),
            if alg == "ES256" { 32 } else { 48 },
        ),
        _ => {
            assert_eq!(alg, "EdDSA");
            openssl(&["pkeyutl", "-sign", "-rawin", "-inkey", k, "-in", d])
        }
    }
}

fn claims(iss: &str) -> serde_json::Value {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({
        "iss": iss, "aud": ["istio-ca"], "sub": "system:serviceaccount:payments:api",
        "iat": now, "nbf": now, "exp": now + 600,
    })
}

/// A compact JWS of `claims` with header `alg`, signed by openssl.
fn token(dir: &Path, alg: &str, key: &Key, claims: &serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(json!({"alg": alg, "typ": "JWT"}).to_string());
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let input = format!("{header}.{payload}");
    let signature = sign(dir, alg, key, input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// `token` with its header's `alg` replaced, signature kept.
fn relabelled(token: &str, alg: &str) -> String {
    let (_, rest) = token.split_once('.').unwrap();
    let header = URL_SAFE_NO_PAD.encode(json!({"alg": alg, "typ": "JWT"}).to_string());
    format!("{header}.{rest}")
}

/// `token` with one byte of its signature changed.
fn tampered(token: &str) -> String {
    let (input, sig) = token.rsplit_once('.').unwrap();
    let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    let mid = sig.len() / 2;
    sig[mid] ^= 0x01;
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

#[tokio::test]
async fn every_algorithm_of_the_provider_with_tokens_made_by_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // (algorithm, key kind, a sibling algorithm of the same key family that
    // must not verify the same signature)
    let cases = [
        ("RS256", Kind::Rsa, "PS256"),
        ("RS384", Kind::Rsa, "RS256"),
        ("RS512", Kind::Rsa, "PS512"),
        ("PS256", Kind::Rsa, "RS256"),
        ("PS384", Kind::Rsa, "PS256"),
        ("PS512", Kind::Rsa, "RS512"),
        ("ES256", Kind::P256, "ES384"),
        ("ES384", Kind::P384, "ES256"),
        ("EdDSA", Kind::Ed25519, "ES256"),
    ];
    let mut issuers = Vec::new();
    let mut keys = Vec::new();
    for (alg, kind, _) in cases {
        let good = key(d, alg, kind);
        let other = key(d, &format!("{alg}-other"), kind);
        issuers.push(IssuerConfig {
            issuer: format!("https://{}.example", alg.to_lowercase()),
            keys: KeySource::File(good.public.clone()),
        });
        keys.push((good, other));
    }
    let mut cfg = config(&d.join("state"));
    cfg.dev_issuer = false;
    cfg.jwt_issuers = issuers;
    let server = TestServer::start_with(cfg, None).await;
    let mut client = server.client(None).await;

    for ((alg, _, sibling), (good, other)) in cases.iter().zip(&keys) {
        let c = claims(&format!("https://{}.example", alg.to_lowercase()));
        let valid = token(d, alg, good, &c);
        let (_k, csr) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
        let chain = request(&mut client, &csr, Some(&valid), 0)
            .await
            .unwrap_or_else(|s| panic!("{alg}: a valid token was refused: {s:?}"));
        webpki_verify(&chain);
        assert_eq!(
            leaf_facts(&chain[0]).uris,
            ["spiffe://cluster.local/ns/payments/sa/api"],
            "{alg}"
        );
        for (what, bad) in [
            ("a changed signature byte", tampered(&valid)),
            ("another key of the kind", token(d, alg, other, &c)),
            ("the sibling algorithm's label", relabelled(&valid, sibling)),
        ] {
            let (_k, csr) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
            let got = request(&mut client, &csr, Some(&bad), 0).await;
            assert_eq!(
                got.map(|_| ()).unwrap_err().code(),
                tonic::Code::Unauthenticated,
                "{alg} with {what} was not refused"
            );
        }
    }
}
