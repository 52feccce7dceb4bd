//! SDS and the agent-wide bundle, with a scripted client on a real Unix
//! socket: `ROOTCA`'s version is the bundle generation, and what each proxy
//! ACKs (a matching nonce without `error_detail`, as Envoy sends) is
//! aggregated across streams.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use workload_ca::agent::acks::{AckSummary, BundleAcks};
use workload_ca::agent::bundle::{AgentBundle, RootBundle};
use workload_ca::agent::metrics::AgentMetrics;
use workload_ca::agent::sds::{self, SECRET_TYPE_URL, Sds};
use workload_ca::agent::workload::CertWatch;
use workload_ca::ca::Authority;
use workload_ca::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryResponse,
};
use workload_ca::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use workload_ca::proto::google::rpc::Status as RpcStatus;

const WAIT: Duration = Duration::from_secs(5);

struct Fixture {
    authority: Authority,
    bundle: AgentBundle,
    acks: BundleAcks,
    metrics: Arc<AgentMetrics>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
    _stop: watch::Sender<bool>,
    _cert: watch::Sender<Option<Arc<workload_ca::agent::workload::WorkloadCert>>>,
}

impl Fixture {
    /// A certificate, and the bundle at generation 3.
    fn new() -> Self {
        let authority = common::authority();
        let (cert, roots) = common::sds::issue(&authority, "spiffe://cluster.local/ns/prod/sa/web");
        let bundle = AgentBundle::new();
        assert!(bundle.offer(roots.with_generation(Some(3))));
        let (cert_tx, cert_rx) = watch::channel(Some(Arc::new(cert)));
        let watch = CertWatch {
            cert: cert_rx,
            roots: bundle.subscribe(),
        };
        let metrics = Arc::new(AgentMetrics::new().unwrap());
        let acks = BundleAcks::new();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sds.sock");
        let (stop, stop_rx) = watch::channel(false);
        let sds = Sds::new(watch, metrics.clone()).with_acks(acks.clone());
        sds::serve(&socket, sds, stop_rx).unwrap();
        Self {
            authority,
            bundle,
            acks,
            metrics,
            socket,
            _dir: dir,
            _stop: stop,
            _cert: cert_tx,
        }
    }

    /// Publishes the bundle (plus a new root) at `generation`.
    fn push(&self, generation: u64) {
        let pem = format!(
            "{}{}",
            self.authority.roots().pem(),
            common::authority().roots().pem()
        );
        assert!(self.bundle.offer(RootBundle::new(pem, Some(generation))));
    }

    async fn client(&self) -> SecretDiscoveryServiceClient<tonic::transport::Channel> {
        SecretDiscoveryServiceClient::new(common::unix_channel(&self.socket).await)
    }

    /// Waits (bounded) until the aggregate is `want`.
    async fn acks_become(&self, want: AckSummary) {
        let mut rx = self.acks.watch();
        let reached = tokio::time::timeout(WAIT, rx.wait_for(|s| *s == want)).await;
        assert!(
            reached.is_ok(),
            "aggregate {:?}, expected {want:?}",
            self.acks.summary()
        );
    }

    async fn nacks_become(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.metrics.sds_nacks.with_label_values(&["ROOTCA"]).get() < n {
            assert!(tokio::time::Instant::now() < deadline, "NACK not counted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn summary(proxies: u32, lowest: Option<u64>) -> AckSummary {
    AckSummary {
        proxies,
        lowest_acked: lowest,
    }
}

use common::sds::SotwStream;

/// A stream on the fixture's socket, answers unwrapped.
struct Stream(SotwStream);

impl Stream {
    async fn open(f: &Fixture) -> Self {
        Self(SotwStream::open(&mut f.client().await).await)
    }

    async fn send(&self, names: &[&str], version: &str, nonce: &str, error: Option<&str>) {
        self.0.send(names, version, nonce, error).await;
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        self.0.recv().await.expect("the stream is open")
    }

    async fn ack(&self, names: &[&str], r: &DiscoveryResponse) {
        self.0.ack(names, r).await;
    }
}

#[tokio::test]
async fn rootca_is_versioned_by_generation_and_acks_are_aggregated() {
    let f = Fixture::new();
    assert_eq!(f.acks.summary().acked_or(3), 3, "no proxy: what we hold");

    let mut a = Stream::open(&f).await;
    a.send(&["ROOTCA"], "", "", None).await;
    let r1 = a.recv().await;
    assert_eq!(r1.version_info, "ROOTCA=3");
    f.acks_become(summary(1, Some(0))).await;
    a.ack(&["ROOTCA"], &r1).await;
    f.acks_become(summary(1, Some(3))).await;

    // NACK of generation 4: still 3.
    f.push(4);
    let r2 = a.recv().await;
    assert_eq!(r2.version_info, "ROOTCA=4");
    a.send(&["ROOTCA"], &r1.version_info, &r2.nonce, Some("bad CA"))
        .await;
    f.nacks_become(1).await;
    assert_eq!(f.acks.summary(), summary(1, Some(3)), "a NACK is no ACK");

    // A stale nonce claiming generation 5 is no ACK either (the NACK that
    // follows on the same stream shows it was read).
    f.push(5);
    let r3 = a.recv().await;
    a.send(&["ROOTCA"], &r3.version_info, &r2.nonce, None).await;
    a.send(&["ROOTCA"], &r1.version_info, &r3.nonce, Some("still bad"))
        .await;
    f.nacks_become(2).await;
    assert_eq!(f.acks.summary(), summary(1, Some(3)), "stale nonce");
    f.push(6);
    let r4 = a.recv().await;
    a.ack(&["ROOTCA"], &r4).await;
    f.acks_become(summary(1, Some(6))).await;

    // A second stream, by the trust domain's name, ACKs nothing yet: the
    // lowest is 0 until it goes away. A stream for the certificate alone is
    // not counted.
    let mut c = Stream::open(&f).await;
    c.send(&["default"], "", "", None).await;
    c.recv().await;
    let mut b = Stream::open(&f).await;
    b.send(&["spiffe://cluster.local"], "", "", None).await;
    let rb = b.recv().await;
    assert_eq!(rb.version_info, "spiffe://cluster.local=6");
    f.acks_become(summary(2, Some(0))).await;
    drop(b);
    f.acks_become(summary(1, Some(6))).await;
    drop(a);
    f.acks_become(summary(0, None)).await;
    drop(c);
}

#[tokio::test]
async fn delta_acks_are_recorded_by_nonce() {
    let f = Fixture::new();
    let (tx, rx) = mpsc::channel(8);
    let mut inbound = f
        .client()
        .await
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let request = |subscribe: &[&str], nonce: &str, error: bool| DeltaDiscoveryRequest {
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        error_detail: error.then(|| RpcStatus {
            code: 13,
            message: "bad".into(),
            details: vec![],
        }),
        ..Default::default()
    };
    let mut recv = async || -> DeltaDiscoveryResponse {
        tokio::time::timeout(WAIT, inbound.message())
            .await
            .expect("a response in time")
            .unwrap()
            .expect("open")
    };
    tx.send(request(&["ROOTCA"], "", false)).await.unwrap();
    let r1 = recv().await;
    assert_eq!(r1.resources[0].version, "3");
    f.acks_become(summary(1, Some(0))).await;
    tx.send(request(&[], &r1.nonce, false)).await.unwrap();
    f.acks_become(summary(1, Some(3))).await;
    f.push(4);
    let r2 = recv().await;
    assert_eq!(r2.resources[0].version, "4");
    tx.send(request(&[], &r2.nonce, true)).await.unwrap();
    f.push(5);
    let r3 = recv().await;
    assert_eq!(f.acks.summary(), summary(1, Some(3)), "NACKed 4");
    tx.send(request(&[], &r3.nonce, false)).await.unwrap();
    f.acks_become(summary(1, Some(5))).await;
}
