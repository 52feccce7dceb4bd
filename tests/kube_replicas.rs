//! Several `ca server --kube` replicas on one (fake) cluster: they agree on
//! one CA kept in a Secret, and a change made through one is followed by
//! the others through a watch.

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
