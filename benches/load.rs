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

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Semaphore;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use workload_ca::ca::{KeyAlgorithm, PrivateKey, TtlPolicy};
use workload_ca::identity::TrustDomain;
use workload_ca::proto::istio::IstioCertificateRequest;
use workload_ca::proto::istio::istio_certificate_service_client::IstioCertificateServiceClient;
use workload_ca::server::devissuer::DevIssuer;
use workload_ca::server::tls::ServingSpec;
use workload_ca::server::{self, CaSource, ServerConfig};

const COLD_REQUESTS: usize = 2_000;
const WARM_REQUESTS: usize = 5_000;
const CONCURRENCY: usize = 64;
const WARM_CONNECTIONS: usize = 8;

fn csr() -> String {
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let kp = rcgen::KeyPair::from_pem(&key.to_pem()).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.serialize_request(&kp).unwrap().pem().unwrap()
}

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

fn report(name: &str, total: Duration, mut lat: Vec<Duration>) {
    lat.sort();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
    println!(
        "{name:>5}: {} requests in {:.2}s = {:.0} certs/s; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        lat.len(),
        total.as_secs_f64(),
        lat.len() as f64 / total.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let running = server::start(ServerConfig {
        state_dir: state.clone(),
        trust_domain: TrustDomain::new("cluster.local").unwrap(),
        ca: CaSource::Embedded {
            algorithm: KeyAlgorithm::EcdsaP256,
            root_lifetime: Duration::from_secs(86_400 * 365),
        },
        listen: "127.0.0.1:0".parse().unwrap(),
        ops_listen: None,
        serving: ServingSpec {
            dns_names: vec!["localhost".into()],
            ips: vec![],
            ttl: Duration::from_secs(3600),
        },
        ttl: TtlPolicy::default(),
        jwt_issuers: vec![],
        jwt_audiences: vec!["istio-ca".into()],
        dev_issuer: true,
        jwks_refresh: Duration::from_secs(300),
        drain_timeout: Duration::from_secs(5),
    })
    .await
    .unwrap();
    let root = std::fs::read_to_string(&running.root_cert_path).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&root))
        .domain_name("localhost");
    let url = format!("https://{}", running.grpc_addr);
    let dev = DevIssuer::load(&state).unwrap();
    let n = COLD_REQUESTS.max(WARM_REQUESTS);
    let work: Arc<Vec<(String, String)>> = Arc::new(
        (0..n)
            .map(|i| {
                let token = dev
                    .mint(
                        "load",
                        &format!("sa-{}", i % 500),
                        "istio-ca",
                        Duration::from_secs(3600),
                        SystemTime::now(),
                    )
                    .unwrap();
                (csr(), token)
            })
            .collect(),
    );

    // Cold: a new connection per request.
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..COLD_REQUESTS {
        let permit = slots.clone().acquire_owned().await.unwrap();
        let (work, url, tls) = (work.clone(), url.clone(), tls.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let t = Instant::now();
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
            t.elapsed()
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.push(t.await.unwrap());
    }
    report("cold", start.elapsed(), lat);

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
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..WARM_REQUESTS {
        let permit = slots.clone().acquire_owned().await.unwrap();
        let mut client = clients[i % WARM_CONNECTIONS].clone();
        let work = work.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let t = Instant::now();
            let (csr, token) = &work[i];
            client
                .create_certificate(request(csr, token))
                .await
                .unwrap();
            t.elapsed()
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.push(t.await.unwrap());
    }
    report("warm", start.elapsed(), lat);
    running.shutdown().await.unwrap();
}
