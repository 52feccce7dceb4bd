//! Several `ca server --kube` replicas on one (fake) cluster: they agree on
//! one CA kept in a Secret, and a change made through one is followed by
//! the others through a watch.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::kubeca::{CA_NS, KubeCluster, issue, wait_ready, within};
use common::webpki_verify;

const READY: Duration = Duration::from_secs(30);

fn roots(pem: &str) -> usize {
    pem.matches("BEGIN CERTIFICATE").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_started_together_agree_on_one_ca_and_follow_each_others_rotation() {
    let k = KubeCluster::start().await;
    k.workload("prod", "web", "web-1", "node-a");
    // Three replicas started at once race to create the CA Secret.
    let replicas: Vec<_> = std::thread::scope(|s| {
        let started: Vec<_> = ["a", "b", "c"]
            .into_iter()
            .map(|name| s.spawn(|| k.start_ca(name, &[])))
            .collect();
        started.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &replicas {
        wait_ready(r, READY).await;
    }
    let first = replicas[0].root_pem();
    assert_eq!(roots(&first), 1);
    for r in &replicas[1..] {
        assert_eq!(r.root_pem(), first, "every replica serves the same root");
    }
    let secret = k
        .fake
        .get_json("secrets", CA_NS, "istio-ca-secret")
        .expect("the CA lives in istio-ca-secret");
    assert_eq!(secret["type"], "istio.io/ca-root");
    // How many raced to create it (the losers read the winner's).
    println!(
        "{} of 3 replicas tried to create the CA Secret",
        k.fake.count("create", "secrets")
    );

    // Certificates from each chain to the same root; serials never repeat.
    let token = k.pod_token("prod", "web", "web-1");
    let mut serials = std::collections::HashSet::new();
    for r in &replicas {
        for _ in 0..20 {
            let chain = issue(r, &token, None).await.unwrap();
            assert_eq!(chain.last().unwrap().trim(), first.trim());
            webpki_verify(&chain);
            let der = common::ders(&chain[0]).remove(0);
            assert!(serials.insert(serial_of(&der)), "a serial repeated");
        }
    }

    // A rotation prepared through one replica's admin socket is followed
    // by the others within a second.
    let out = Command::new(env!("CARGO_BIN_EXE_ca"))
        .args(["rotate-root", "prepare", "--state-dir"])
        .arg(&replicas[0].state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "prepare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let prepared = Instant::now();
    for r in &replicas[1..] {
        let (_, took) = within(Duration::from_secs(5), || async {
            (roots(&r.root_pem()) == 2).then_some(())
        })
        .await;
        let since = prepared.elapsed();
        println!(
            "replica {} followed the prepare after {since:?} (polled {took:?})",
            r.state.display()
        );
        assert!(
            since < Duration::from_secs(1),
            "followed after {since:?}, not within a second"
        );
    }
    assert_eq!(replicas[1].root_pem(), replicas[0].root_pem());
    let secret = k
        .fake
        .get_json("secrets", CA_NS, "istio-ca-secret")
        .unwrap();
    assert!(
        secret["data"]["authorities.json"].is_string(),
        "the rotation state is in the Secret"
    );
}

fn serial_of(der: &[u8]) -> Vec<u8> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.raw_serial().to_vec()
}

/// The manifest generation and members in the CA Secret.
fn stored(k: &KubeCluster) -> (u64, usize) {
    use base64::Engine;
    let secret = k
        .fake
        .get_json("secrets", CA_NS, "istio-ca-secret")
        .unwrap();
    let text = secret["data"]["authorities.json"].as_str().unwrap();
    let json = base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&json).unwrap();
    (
        m["generation"].as_u64().unwrap(),
        m["members"].as_array().unwrap().len(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_mid_rotation_hands_the_rest_to_another_replica() {
    let k = KubeCluster::start().await;
    // Rotation driven by the leader only (never due by itself here: the
    // root lives ten years), looked at every second; a short Lease.
    let args = [
        "--auto-rotate",
        "0.01",
        "--auto-rotate-interval",
        "1s",
        "--lease-duration",
        "3s",
    ];
    let a = k.start_ca("a", &args);
    wait_ready(&a, READY).await;
    let b = k.start_ca("b", &args);
    wait_ready(&b, READY).await;
    let leads = |ca: &common::procs::CaProc| {
        ca.log_text()
            .contains("leading: single-writer work runs here")
    };
    let (first_leader, _) = within(Duration::from_secs(10), || async {
        match (leads(&a), leads(&b)) {
            (true, false) => Some(0),
            (false, true) => Some(1),
            _ => None,
        }
    })
    .await;
    let (leader, other) = if first_leader == 0 { (a, b) } else { (b, a) };
    let old_root = leader.root_pem();
    let (g0, _) = stored(&k);

    // Prepared through the leader, which is killed at once: before its
    // settle window lets it activate.
    let out = Command::new(env!("CARGO_BIN_EXE_ca"))
        .args(["rotate-root", "prepare", "--state-dir"])
        .arg(&leader.state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stored(&k), (g0 + 1, 2));
    let prepared = k
        .fake
        .get_json("secrets", CA_NS, "istio-ca-secret")
        .unwrap()["metadata"]["annotations"]
        .clone();
    leader.kill9();
    let killed = Instant::now();

    // The other replica takes the Lease and finishes: activate, retire.
    let mut took = None;
    while killed.elapsed() < Duration::from_secs(60) {
        let (g, members) = stored(&k);
        if members == 1 && g > g0 + 1 {
            took = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = took.unwrap_or_else(|| {
        panic!(
            "the rotation did not finish; stored {:?}; the other replica's log:\n{}",
            stored(&k),
            other.log_text()
        )
    });
    println!("the rotation finished {took:?} after the leader was killed");
    let log = other.log_text();
    assert!(
        log.contains("leading: single-writer work runs here"),
        "{log}"
    );
    assert!(log.contains("automatic root rotation: step taken"), "{log}");
    // Exactly prepare, activate, retire: no step twice, none lost.
    assert_eq!(stored(&k), (g0 + 3, 1), "{prepared}");
    let (_, _) = within(Duration::from_secs(5), || async {
        let root = other.root_pem();
        (roots(&root) == 1 && root != old_root).then_some(())
    })
    .await;
    let token = {
        k.workload("prod", "web", "web-1", "node-a");
        k.pod_token("prod", "web", "web-1")
    };
    let chain = issue(&other, &token, None).await.unwrap();
    assert_eq!(chain.last().unwrap().trim(), other.root_pem().trim());
    webpki_verify(&chain);
    assert!(killed.elapsed() < Duration::from_secs(60));
}

/// The leader deletes the report of a replica that stopped long ago and
/// holds nothing valid, once, with the report's resourceVersion as the
/// precondition (the fake refuses a stale one with 409, as the API server
/// does): a deletion delivered late cannot remove a report written since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_deletes_a_spent_report_of_a_stopped_replica_once() {
    let k = KubeCluster::start().await;
    let name = "workload-ca-evidence-gone";
    let report = serde_json::json!({
        "replica": "gone", "written": 1, "settle_until": null, "uncounted": 0,
        "agents": [],
        "ledger": {"by_generation": {}, "by_authority": {}, "longest": 0},
    });
    k.fake
        .create_json(serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {
                "name": name, "namespace": CA_NS,
                "labels": {"workload-ca.io/rotation-evidence": "true"},
            },
            "data": {"evidence.json": report.to_string()},
        }))
        .unwrap();
    let ca = k.start_ca("a", &[]);
    wait_ready(&ca, READY).await;
    let deletes = || -> Vec<u16> {
        k.fake
            .requests()
            .into_iter()
            .filter(|r| r.verb == "delete" && r.resource == "configmaps" && r.name == name)
            .map(|r| r.code)
            .collect()
    };
    // The fake logs a request once it has answered it: wait for the entry,
    // not only for the object to be gone.
    let start = Instant::now();
    while k.fake.get_json("configmaps", CA_NS, name).is_some() || deletes().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not deleted: {:?}",
            deletes()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = start.elapsed();
    // A few more passes of the leader's loop (one every 0.5 s at most):
    // nothing deleted again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(deletes(), [200], "one deletion, accepted");
    println!("the spent report was deleted {took:?} after the leader was ready");
}
