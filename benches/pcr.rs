//! 10,000 pods' PodCertificateRequests from nothing, against the fake API
//! server, signed by a real `ca server --kube --pod-certificates` (release
//! build). Run: `cargo bench --bench pcr`.
//!
//! The requests (a fresh P-256 key and stub PKCS#10 request each, as the
//! kubelet makes them) are built before the clock starts; then they are
//! created through HTTP, [`CREATORS`] at a time (many kubelets), and the
//! clock stops when every one has a condition. Printed: the time and rate,
//! the time the creates alone took, the CA's peak resident memory (VmHWM)
//! and its CPU time, this process's CPU time (the fake API server and the
//! creating clients), and the CA's creation-to-status latency histogram.
//!
//! The fake, the clients and the CA share the machine's cores.
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

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fakekube::certificates::CertVersions;
use common::fakekube::kubelet::{self, KeyType, KubeletKey, PodRef, RequestOptions};
use common::fakekube::{FakeKube, FakeOptions};
use common::kubeca::{CA_NS, KubeCluster, wait_ready};
use common::procs::{clock_ticks, cpu_ticks, hwm_kib, loadavg};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::Value;

const PODS: usize = 10_000;
const CREATORS: usize = 64;
const SIGNER: &str = "workload-ca.io/spiffe";

fn answered(fake: &FakeKube) -> usize {
    fake.list_json("podcertificaterequests", "shop")
        .iter()
        .filter(|o| o.pointer("/status/conditions/0").is_some())
        .count()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    println!(
        "{} cores, load average {} at the start",
        std::thread::available_parallelism().map_or(0, usize::from),
        loadavg()
    );
    let fake = FakeKube::start_with(FakeOptions {
        certificates: CertVersions::BOTH,
        ..FakeOptions::default()
    })
    .await;
    fake.create_namespace(CA_NS);
    fake.create_service_account(CA_NS, "workload-ca");
    fake.create_namespace("shop");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let token = "workload-ca-bench-credential";
    fake.add_user_token(
        token,
        "system:serviceaccount:istio-system:workload-ca",
        &["system:serviceaccounts"],
    );
    fake.write_kubeconfig(&kubeconfig, token);
    let k = KubeCluster {
        fake,
        dir,
        kubeconfig,
    };
    let ca = k.start_ca("a", &["--pod-certificates", "--lease-duration", "5s"]);
    wait_ready(&ca, Duration::from_secs(60)).await;
    // Leading (single replica): wait for the Lease.
    let t = Instant::now();
    while !ca
        .log_text()
        .contains("leading: single-writer work runs here")
    {
        assert!(t.elapsed() < Duration::from_secs(30), "never led");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let built = Instant::now();
    let bodies: Vec<Value> = (0..PODS)
        .map(|i| {
            let key = KubeletKey::generate(KeyType::EcdsaP256);
            let pod = PodRef::new("shop", &format!("pod-{i}"), &format!("sa-{}", i % 100));
            kubelet::request("v1", SIGNER, &pod, &key, &RequestOptions::default())
        })
        .collect();
    println!(
        "{PODS} requests built in {:.1} s (not timed)",
        built.elapsed().as_secs_f64()
    );

    let client = k.fake.client().await;
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("certificates.k8s.io", "v1", "PodCertificateRequest"),
        "podcertificaterequests",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(client, "shop", &ar);
    let hz = clock_ticks();
    let ca_pid = ca.pid().to_string();
    let (ca_cpu0, me_cpu0) = (cpu_ticks(&ca_pid), cpu_ticks("self"));
    let start = Instant::now();
    let queue = Arc::new(tokio::sync::Mutex::new(bodies));
    let mut creators = Vec::new();
    for _ in 0..CREATORS {
        let queue = queue.clone();
        let api = api.clone();
        creators.push(tokio::spawn(async move {
            loop {
                let Some(b) = queue.lock().await.pop() else {
                    return;
                };
                let o: DynamicObject = serde_json::from_value(b).unwrap();
                api.create(&PostParams::default(), &o).await.unwrap();
            }
        }));
    }
    for c in creators {
        c.await.unwrap();
    }
    let created = start.elapsed();
    let mut peak_rss = 0;
    loop {
        let n = answered(&k.fake);
        peak_rss = peak_rss.max(hwm_kib(ca.pid()));
        if n == PODS {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "only {n} of {PODS} answered after 10 min"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all = start.elapsed();
    let (ca_cpu, me_cpu) = (
        (cpu_ticks(&ca_pid) - ca_cpu0) as f64 / hz,
        (cpu_ticks("self") - me_cpu0) as f64 / hz,
    );
    peak_rss = peak_rss.max(hwm_kib(ca.pid()));
    let issued = k
        .fake
        .list_json("podcertificaterequests", "shop")
        .iter()
        .filter(|o| {
            o.pointer("/status/conditions/0/type")
                .and_then(Value::as_str)
                == Some("Issued")
        })
        .count();
    println!(
        "\n{PODS} PodCertificateRequests answered in {:.2} s ({:.0}/s); {issued} issued",
        all.as_secs_f64(),
        PODS as f64 / all.as_secs_f64()
    );
    println!(
        "creating them ({CREATORS} at a time) took {:.2} s; the last answer came {:.2} s after the last create",
        created.as_secs_f64(),
        (all - created).as_secs_f64()
    );
    println!(
        "CPU: CA {ca_cpu:.2} s ({:.0} us per request), this process (fake API server + creating clients) {me_cpu:.2} s",
        ca_cpu * 1e6 / PODS as f64
    );
    println!(
        "CA peak resident memory (VmHWM): {:.1} MiB",
        peak_rss as f64 / 1024.0
    );
    for m in [
        "workload_ca_pod_certificate_request_seconds_sum",
        "workload_ca_pod_certificate_request_seconds_count",
        "workload_ca_pod_certificate_status_writes_total",
    ] {
        println!("{m} = {}", ca.metric(m).await);
    }
    let writes = k
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.subresource == "status" && r.code == 200)
        .count();
    println!("successful status writes in the fake's log: {writes}");
    println!("load average {} at the end", loadavg());
}
