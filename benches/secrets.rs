//! Secret mode at scale, against the fake API server, with a real
//! `ca server --kube` process (release build). Run:
//! `cargo bench --bench secrets` (`BENCH_RATE`: `--kube-write-rate`,
//! default 5000 a second, high enough that the pace is not the limit;
//! `BENCH_CONCURRENCY`: `--kube-write-concurrency`, default 16).
//!
//! 10,000 service accounts (100 namespaces of 100) and no Secret: the time
//! from the CA's start to all 10,000 Secrets current (its own gauge,
//! `workload_ca_bundle_copies{kind="secrets",state="current"}`), the
//! write rate, the CA's peak resident memory (VmHWM) and CPU, and this
//! process's CPU over the same time (the fake API server lives here: when
//! it uses more CPU than the CA, the fake is the bottleneck). A sample of
//! the Secrets is then checked with rustls-webpki.
// A benchmark: a panic is a failed run, not a fault of the CA.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
#[allow(
    clippy::type_complexity,
    clippy::collapsible_if,
    clippy::collapsible_match
)]
mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::kubeca::{KubeCluster, wait_ready};
use common::procs::{clock_ticks, cpu_ticks, status_kib};
use serde_json::json;

const NAMESPACES: usize = 100;
const PER_NAMESPACE: usize = 100;

async fn gauge(ca: &common::procs::CaProc, state: &str) -> f64 {
    let body = common::http_get(ca.ops, "/metrics").await.1;
    let want = format!("workload_ca_bundle_copies{{kind=\"secrets\",state=\"{state}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&want)?.parse().ok())
        .unwrap_or(-1.0)
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

#[tokio::main]
async fn main() {
    let rate = env_or("BENCH_RATE", "5000");
    let concurrency = env_or("BENCH_CONCURRENCY", "16");
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let total = NAMESPACES * PER_NAMESPACE;
    println!(
        "{cores} cores; {total} service accounts; --kube-write-rate {rate} --kube-write-concurrency {concurrency}"
    );
    let k = KubeCluster::start().await;
    let t = Instant::now();
    for n in 0..NAMESPACES {
        let ns = format!("bench-{n}");
        k.fake
            .create_json(json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": {"bench": "secrets"}}}))
            .unwrap();
        // The namespace controller made `default`.
        for i in 1..PER_NAMESPACE {
            k.fake.create_service_account(&ns, &format!("sa-{i}"));
        }
    }
    println!("seeded in {:.1} s", t.elapsed().as_secs_f64());

    let me = std::process::id().to_string();
    let ticks = clock_ticks();
    let self_before = cpu_ticks(&me);
    let start = Instant::now();
    let ca = k.start_ca(
        "bench",
        &[
            "--secret-mode-namespaces",
            "bench=secrets",
            "--kube-write-rate",
            &rate,
            "--kube-write-concurrency",
            &concurrency,
            "--kube-max-in-flight",
            "64",
        ],
    );
    wait_ready(&ca, Duration::from_secs(120)).await;
    let ready = start.elapsed();
    let pid = ca.pid().to_string();
    let mut first_write = None;
    let limit = Duration::from_secs(900);
    loop {
        let current = gauge(&ca, "current").await;
        if first_write.is_none() && current > 0.0 {
            first_write = Some(start.elapsed());
        }
        if current >= total as f64 {
            break;
        }
        assert!(
            start.elapsed() < limit,
            "{current} of {total} after {limit:?}\n{}",
            ca.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all = start.elapsed();
    let ca_cpu = cpu_ticks(&pid) as f64 / ticks;
    let self_cpu = (cpu_ticks(&me) - self_before) as f64 / ticks;
    let hwm = status_kib(ca.pid(), "VmHWM:");
    let rss = status_kib(ca.pid(), "VmRSS:");
    let creates = k.fake.count("create", "secrets");
    let writing = all - first_write.unwrap_or(ready);
    println!(
        "ready (/readyz 200)            : {:.2} s after spawn",
        ready.as_secs_f64()
    );
    println!(
        "all {total} Secrets current     : {:.2} s after spawn ({:.2} s from the first)",
        all.as_secs_f64(),
        writing.as_secs_f64()
    );
    println!(
        "rate                           : {:.0} Secrets/s over the whole run, {:.0}/s from the first write",
        total as f64 / all.as_secs_f64(),
        total as f64 / writing.as_secs_f64().max(0.001)
    );
    println!("Secret creates at the fake     : {creates}");
    println!(
        "CA CPU                         : {ca_cpu:.2} s ({:.0} us per Secret)",
        ca_cpu * 1e6 / total as f64
    );
    println!("fake API server + bench CPU    : {self_cpu:.2} s (this process)");
    println!(
        "CA peak RSS (VmHWM)            : {:.1} MiB (VmRSS now {:.1} MiB)",
        hwm as f64 / 1024.0,
        rss as f64 / 1024.0
    );

    // A sample, independently verified.
    let mut checked = 0;
    for n in (0..NAMESPACES).step_by(10) {
        for s in k.fake.list_json("secrets", &format!("bench-{n}")) {
            if s["type"] != "istio.io/key-and-cert" {
                continue;
            }
            let d = |f: &str| {
                String::from_utf8(
                    base64::engine::general_purpose::STANDARD
                        .decode(s["data"][f].as_str().unwrap())
                        .unwrap(),
                )
                .unwrap()
            };
            common::webpki_verify(&[d("cert-chain.pem"), d("root-cert.pem")]);
            checked += 1;
        }
    }
    println!("verified with rustls-webpki    : {checked} Secrets");
}
