//! CA key material: plugged-in CAs made by openssl, refusals with clear
//! messages, and a state directory that survives restarts and is never
//! silently replaced.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::fs;
use std::path::Path;

use common::cacerts::*;
use common::*;
use workload_ca::ca::KeyAlgorithm;
use workload_ca::server::{self, CaSource};

fn plugged_config(state: &Path, cacerts: &Path) -> server::ServerConfig {
    let mut cfg = config(state);
    cfg.ca = CaSource::PluggedIn(cacerts.to_owned());
    cfg
}

#[tokio::test]
async fn plugged_in_intermediates_from_openssl_issue_verifiable_chains() {
    for rsa in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let cacerts = tmp.path().join("cacerts");
        fs::create_dir(&cacerts).unwrap();
        make_cacerts(&cacerts, rsa);
        let server =
            TestServer::start_with(plugged_config(&tmp.path().join("state"), &cacerts), None).await;
        assert_eq!(
            server.root_pem(),
            fs::read_to_string(cacerts.join("root-cert.pem")).unwrap()
        );
        let (_k, chain) = server.issue("prod", "web", 0).await;
        assert_eq!(chain.len(), 3, "leaf, intermediate, root (rsa={rsa})");
        assert_eq!(
            chain[1],
            fs::read_to_string(cacerts.join("ca-cert.pem"))
                .unwrap()
                .replace("\r\n", "\n")
        );
        webpki_verify(&chain);
        openssl_verify(&chain);
        assert_eq!(
            leaf_facts(&chain[0]).uris,
            ["spiffe://cluster.local/ns/prod/sa/web"]
        );
    }
}

async fn start_err(cfg: server::ServerConfig) -> String {
    match server::start(cfg).await {
        Ok(_) => panic!("the server started on material it should refuse"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn bad_plugged_in_material_is_refused_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    fs::create_dir(&good).unwrap();
    make_cacerts(&good, false);
    let other = tmp.path().join("other");
    fs::create_dir(&other).unwrap();
    make_cacerts(&other, false);
    let state = tmp.path().join("state");

    let variant = |name: &str, edit: &dyn Fn(&Path)| {
        let dir = tmp.path().join(name);
        fs::create_dir(&dir).unwrap();
        for f in [
            "ca-cert.pem",
            "ca-key.pem",
            "cert-chain.pem",
            "root-cert.pem",
        ] {
            fs::copy(good.join(f), dir.join(f)).unwrap();
        }
        edit(&dir);
        dir
    };
    let partial = variant("partial", &|d| {
        fs::remove_file(d.join("ca-key.pem")).unwrap()
    });
    let mismatch = variant("mismatch", &|d| {
        fs::copy(other.join("ca-key.pem"), d.join("ca-key.pem")).unwrap();
    });
    let not_ca = variant("not-ca", &|d| {
        // A leaf cert (CA=false) and its key in the signing slot.
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca-cert.pem",
                "-days",
                "30",
                "-subj",
                "/CN=leaf",
                "-addext",
                "basicConstraints=critical,CA:FALSE",
            ],
        );
    });
    let no_key_usage = variant("no-key-usage", &|d| {
        make_intermediate(d, &good, false, false)
    });
    let wrong_root = variant("wrong-root", &|d| {
        fs::copy(other.join("root-cert.pem"), d.join("root-cert.pem")).unwrap();
        fs::copy(d.join("ca-cert.pem"), d.join("cert-chain.pem")).unwrap();
    });
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();

    for (dir, want) in [
        (&partial, "missing ca-key.pem"),
        (&mismatch, "does not match"),
        (&not_ca, "not a CA"),
        (&no_key_usage, "no keyUsage"),
        (
            &wrong_root,
            "does not verify to any certificate in root-cert.pem",
        ),
        (&empty, "holds none of"),
    ] {
        let before: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| fs::read(e.unwrap().path()).unwrap())
            .collect();
        let msg = start_err(plugged_config(&state, dir)).await;
        assert!(
            msg.contains(want),
            "{}: {msg:?} should mention {want:?}",
            dir.display()
        );
        let after: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| fs::read(e.unwrap().path()).unwrap())
            .collect();
        assert_eq!(
            before,
            after,
            "{}: refused material is left untouched",
            dir.display()
        );
    }
}

#[tokio::test]
async fn restart_keeps_the_root() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let first = TestServer::start_with(config(&state), None).await;
    let root = first.root_pem();
    assert!(first.running.ca_created);
    first.running.shutdown().await.unwrap();
    let second = TestServer::start_with(config(&state), None).await;
    assert!(!second.running.ca_created);
    assert_eq!(second.root_pem(), root, "the same root after a restart");
    let (_k, chain) = second.issue("prod", "web", 0).await;
    assert_eq!(chain.last().unwrap(), &root);
    webpki_verify(&chain);
}

#[tokio::test]
async fn a_corrupt_or_partial_state_directory_is_refused_never_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    TestServer::start_with(config(&state), None)
        .await
        .running
        .shutdown()
        .await
        .unwrap();
    // The active authority's directory, named by its id.
    let ca = fs::read_dir(state.join("ca"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap();
    let key_before = fs::read(ca.join("ca-key.pem")).unwrap();

    fs::write(
        ca.join("ca-cert.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let msg = start_err(config(&state)).await;
    assert!(msg.contains("ca-cert.pem"), "{msg}");
    assert_eq!(
        fs::read(ca.join("ca-key.pem")).unwrap(),
        key_before,
        "the key is never replaced"
    );

    fs::remove_file(ca.join("ca-cert.pem")).unwrap();
    let msg = start_err(config(&state)).await;
    assert!(
        msg.contains("partial") && msg.contains("missing ca-cert.pem"),
        "{msg}"
    );
    assert!(!ca.join("ca-cert.pem").exists(), "nothing regenerated");
    assert_eq!(fs::read(ca.join("ca-key.pem")).unwrap(), key_before);

    fs::write(ca.join("ca-cert.pem"), "not pem").unwrap();
    fs::write(ca.join("ca-key.pem"), "garbage").unwrap();
    let msg = start_err(config(&state)).await;
    assert!(msg.contains("CA material refused"), "{msg}");
}

#[tokio::test]
async fn a_sibling_intermediate_under_the_same_root_cannot_renew_here() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    fs::create_dir(&a).unwrap();
    fs::create_dir(&b).unwrap();
    make_root(&a, 3650);
    make_intermediate(&a, &a, false, true);
    make_intermediate(&b, &a, false, true);
    let ours = TestServer::start_with(plugged_config(&tmp.path().join("sa"), &a), None).await;
    let sibling = TestServer::start_with(plugged_config(&tmp.path().join("sb"), &b), None).await;
    assert_eq!(ours.root_pem(), sibling.root_pem(), "one shared root");

    let (key, theirs) = sibling.issue("kube-system", "admin", 0).await;
    webpki_verify(&theirs);
    let identity = theirs[..theirs.len() - 1].concat();
    let (_k, csr2) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
    let err = request(
        &mut ours.client(Some((&identity, &key))).await,
        &csr2,
        None,
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::Unauthenticated,
        "a certificate from a sibling CA is not a renewal credential here"
    );

    // Our own leaf renews.
    let (key, mine) = ours.issue("prod", "web", 0).await;
    let identity = mine[..mine.len() - 1].concat();
    let renewed = request(
        &mut ours.client(Some((&identity, &key))).await,
        &csr2,
        None,
        0,
    )
    .await
    .unwrap();
    webpki_verify(&renewed);
}

#[tokio::test]
async fn a_leaf_never_outlives_the_root_its_intermediate_chains_to() {
    let tmp = tempfile::tempdir().unwrap();
    let cacerts = tmp.path().join("cacerts");
    fs::create_dir(&cacerts).unwrap();
    make_root(&cacerts, 1);
    make_intermediate(&cacerts, &cacerts, false, true);
    let server =
        TestServer::start_with(plugged_config(&tmp.path().join("state"), &cacerts), None).await;
    let (_k, chain) = server.issue("prod", "web", 3 * 86_400).await;
    let (leaf, inter, root) = (
        leaf_facts(&chain[0]),
        leaf_facts(&chain[1]),
        leaf_facts(&chain[2]),
    );
    assert!(
        inter.not_after > root.not_after,
        "the setup: the intermediate outlives the root"
    );
    assert!(
        leaf.not_after <= root.not_after,
        "leaf {} outlives root {}",
        leaf.not_after,
        root.not_after
    );
    webpki_verify(&chain);
}
