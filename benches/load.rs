//! Load on a real server, in one process on this machine: what a mass pod
//! start looks like to the CA. Run: `cargo bench --bench load`.
//!
//! - `cold`: every request is a new pod: a new TCP + TLS connection, one
//!   CreateCertificate with its own service-account token, then close.
//! - `warm`: requests spread over a few long-lived connections (agents
//!   renewing).
//!
//! Client and server share the machine's cores, so the figures are a floor.
//! CSRs and tokens are made before the clock starts.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::{TestServer, key_and_csr};
use tokio::sync::Semaphore;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use workload_ca::ca::KeyAlgorithm;
use workload_ca::proto::istio::IstioCertificateRequest;
use workload_ca::proto::istio::istio_certificate_service_client::IstioCertificateServiceClient;
use workload_ca::server::devissuer::DevIssuer;

const COLD_REQUESTS: usize = 2_000;
const WARM_REQUESTS: usize = 5_000;
const CONCURRENCY: usize = 64;
const WARM_CONNECTIONS: usize = 8;

fn request(csr: &str, token: &str) -> tonic::Request<IstioCertificateRequest> {
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr.to_owned(),
        validity_duration: 0,
        metadata: None,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// Runs `n` calls of `call(i)` with at most [`CONCURRENCY`] in flight and
/// prints throughput and latency percentiles.
async fn timed<F, Fut>(name: &str, n: usize, call: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let permit = slots.clone().acquire_owned().await.unwrap();
        let fut = call(i);
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let t = Instant::now();
            fut.await;
            t.elapsed()
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.push(t.await.unwrap());
    }
    let total = start.elapsed();
    lat.sort();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
    println!(
        "{name:>5}: {n} requests in {:.2}s = {:.0} certs/s; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(&dir.path().join("state"));
    cfg.ops_listen = None;
    let server = TestServer::start_with(cfg, None).await;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server.root_pem()))
        .domain_name("localhost");
    let url = format!("https://{}", server.running.grpc_addr);
    let dev = DevIssuer::load(&server.state).unwrap();
    let work: Arc<Vec<(String, String)>> = Arc::new(
        (0..COLD_REQUESTS.max(WARM_REQUESTS))
            .map(|i| {
                let sa = format!("sa-{}", i % 500);
                let token = dev
                    .mint(
                        "load",
                        &sa,
                        "istio-ca",
                        Duration::from_secs(3600),
                        SystemTime::now(),
                    )
                    .unwrap();
                (key_and_csr(KeyAlgorithm::EcdsaP256, None).1, token)
            })
            .collect(),
    );

    // Cold: a new connection per request.
    timed("cold", COLD_REQUESTS, |i| {
        let (work, url, tls) = (work.clone(), url.clone(), tls.clone());
        async move {
            let channel = Channel::from_shared(url)
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let (csr, token) = &work[i];
            IstioCertificateServiceClient::new(channel)
                .create_certificate(request(csr, token))
                .await
                .unwrap();
        }
    })
    .await;

    // Warm: a few shared connections.
    let mut clients = Vec::new();
    for _ in 0..WARM_CONNECTIONS {
        let channel = Channel::from_shared(url.clone())
            .unwrap()
            .tls_config(tls.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        clients.push(IstioCertificateServiceClient::new(channel));
    }
    timed("warm", WARM_REQUESTS, |i| {
        let mut client = clients[i % WARM_CONNECTIONS].clone();
        let work = work.clone();
        async move {
            let (csr, token) = &work[i];
            client
                .create_certificate(request(csr, token))
                .await
                .unwrap();
        }
    })
    .await;
    server.running.shutdown().await.unwrap();
}
