//! `--serving-secret`: a `kubernetes.io/tls` Secret with a serving
//! certificate the CA keeps (istiod's, when this CA replaces Istio's),
//! against the fake API server with a real `ca server --kube`: written,
//! checked by two verifiers for its DNS names, recreated and repaired,
//! never touched when not ours, and carried through a root rotation before
//! each gate opens.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::process::Command;
use std::time::Duration;

use base64::Engine;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::{Value, json};

use common::kubeca::{CA_NS, KubeCluster, wait_ready, within};

const READY: Duration = Duration::from_secs(30);
const LIMIT: Duration = Duration::from_secs(20);
const DNS: &str = "istiod.istio-system.svc";

fn data(secret: &Value, key: &str) -> String {
    let b64 = secret["data"][key].as_str().unwrap_or_default();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

fn pems(text: &str) -> Vec<Vec<u8>> {
    common::ders(text)
}

/// rustls-webpki: a server certificate for `DNS`, through tls.crt's
/// intermediates, to a root of ca.crt.
fn webpki_server(secret: &Value) {
    let chain = pems(&data(secret, "tls.crt"));
    let roots = pems(&data(secret, "ca.crt"));
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(r.as_slice()))
                .unwrap()
                .to_owned()
        })
        .collect();
    let leaf = CertificateDer::from(chain[0].clone());
    let inter: Vec<CertificateDer<'static>> = chain[1..]
        .iter()
        .cloned()
        .map(CertificateDer::from)
        .collect();
    let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &inter,
        UnixTime::now(),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .expect("webpki validates the serving chain");
    ee.verify_is_valid_for_subject_name(&ServerName::try_from(DNS).unwrap())
        .expect("valid for istiod's name");
}

/// `openssl verify -purpose sslserver -verify_hostname`.
fn openssl_server(secret: &Value) {
    let dir = tempfile::tempdir().unwrap();
    let crt = data(secret, "tls.crt");
    let blocks: Vec<&str> = crt.split_inclusive("-----END CERTIFICATE-----\n").collect();
    std::fs::write(dir.path().join("leaf.pem"), blocks[0]).unwrap();
    std::fs::write(dir.path().join("ca.pem"), data(secret, "ca.crt")).unwrap();
    std::fs::write(dir.path().join("untrusted.pem"), blocks[1..].concat()).unwrap();
    let mut cmd = Command::new("openssl");
    cmd.current_dir(dir.path()).args([
        "verify",
        "-x509_strict",
        "-purpose",
        "sslserver",
        "-verify_hostname",
        DNS,
        "-CAfile",
        "ca.pem",
    ]);
    if blocks.len() > 1 {
        cmd.args(["-untrusted", "untrusted.pem"]);
    }
    let out = cmd.arg("leaf.pem").output().expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn wait_secret(k: &KubeCluster, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    eprintln!("waiting until: {what}");
    within(LIMIT, || async {
        k.fake
            .get_json("secrets", CA_NS, "istiod-tls")
            .filter(|s| f(s))
    })
    .await
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_secret_is_kept_current_repaired_and_rotated_before_each_gate() {
    let k = KubeCluster::start().await;
    // A Secret of the same kind that someone else keeps.
    k.fake
        .create_json(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "other-tls", "namespace": CA_NS},
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": "", "tls.key": ""}
        }))
        .unwrap();
    let spec = format!("{CA_NS}/istiod-tls={DNS}");
    let ca = k.start_ca(
        "ca",
        &[
            "--serving-secret",
            &spec,
            "--serving-secret",
            "istio-system/other-tls=other.istio-system.svc",
            "--bundle-propagation",
            "2s",
        ],
    );
    wait_ready(&ca, READY).await;

    let secret = wait_secret(&k, "the serving Secret is written", |_| true).await;
    assert_eq!(secret["type"], "kubernetes.io/tls");
    assert_eq!(data(&secret, "ca.crt").trim(), ca.root_pem().trim());
    webpki_server(&secret);
    openssl_server(&secret);

    // Deleted: recreated. Edited: repaired.
    assert!(k.fake.delete("secrets", CA_NS, "istiod-tls"));
    let again = wait_secret(&k, "recreated", |_| true).await;
    let mut edited = again.clone();
    edited["data"]["ca.crt"] = json!(base64::engine::general_purpose::STANDARD.encode("junk"));
    k.fake.put_json(edited);
    let repaired = wait_secret(&k, "repaired", |s| data(s, "ca.crt") != "junk").await;
    webpki_server(&repaired);

    // A rotation: the Secret holds the prepared bundle before activation,
    // and a leaf of the new authority before retirement; until then the
    // gates name it. (The server's own settle window comes first.)
    tokio::time::sleep(Duration::from_secs(11)).await;
    let (ok, out) = ca.rotate_root("prepare");
    assert!(ok, "prepare: {out}");
    let (ok, out) = ca.rotate_root("activate");
    assert!(
        !ok,
        "activated before the serving Secret held the bundle: {out}"
    );
    assert!(out.contains("Secret istio-system/istiod-tls"), "{out}");
    assert!(
        out.contains("Secret istio-system/other-tls"),
        "a Secret not ours holds the gate: {out}"
    );
    let (_, status) = ca.rotate_root("status");
    assert!(
        status.contains("Secret istio-system/istiod-tls"),
        "{status}"
    );
    let prepared = wait_secret(&k, "the prepared bundle reaches the Secret", |s| {
        common::ders(&data(s, "ca.crt")).len() == 2
    })
    .await;
    webpki_server(&prepared);
    // The foreign Secret was never written, and still holds the gate.
    let other = k.fake.get_json("secrets", CA_NS, "other-tls").unwrap();
    assert_eq!(other["data"]["tls.crt"], "");
    assert!(k.fake.delete("secrets", CA_NS, "other-tls"));
    within(LIMIT, || async {
        ca.rotate_root("activate").0.then_some(())
    })
    .await;
    let new_leaf = wait_secret(&k, "re-signed by the new authority", |s| {
        s["data"]["tls.crt"] != prepared["data"]["tls.crt"]
    })
    .await;
    webpki_server(&new_leaf);
    openssl_server(&new_leaf);
    assert_eq!(
        k.fake
            .get_json("secrets", CA_NS, "other-tls")
            .map(|s| s["type"].clone()),
        Some(json!("kubernetes.io/tls")),
        "recreated once deleted (ours now)"
    );
}
