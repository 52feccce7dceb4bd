//! The agent-wide trust bundle: ordering by generation as certificate
//! managers feed it, early re-issue when the issuing authority is retired
//! (under tokio's paused clock), and the `WatchBundle` client against a small
//! in-test `TrustBundleService` on 127.0.0.1.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use workload_ca::agent::acks::BundleAcks;
use workload_ca::agent::bundle::{AgentBundle, RootBundle};
use workload_ca::agent::client::{CaClient, SignFuture, TokenFile};
use workload_ca::agent::metrics::AgentMetrics;
use workload_ca::agent::watcher::BundleWatcher;
use workload_ca::agent::workload::{CertManager, CertWatch, RotationPolicy, WorkloadCert};
use workload_ca::ca::{Authority, check_csr};
use workload_ca::identity::SpiffeId;
use workload_ca::proto::workloadca::trust_bundle_service_server::{
    TrustBundleService, TrustBundleServiceServer,
};
use workload_ca::proto::workloadca::{AgentReport, BundleUpdate};

/// Signs with one of two authorities (0 or 1, switchable), answering with
/// a settable bundle generation (0: none, like a CA that is not ours).
struct ScriptedCa {
    authorities: [Authority; 2],
    signer: AtomicUsize,
    generation: AtomicU64,
    calls: AtomicUsize,
}

impl ScriptedCa {
    fn new(generation: u64) -> Arc<Self> {
        Arc::new(Self {
            authorities: [common::authority(), common::authority()],
            signer: AtomicUsize::new(0),
            generation: AtomicU64::new(generation),
            calls: AtomicUsize::new(0),
        })
    }

    fn signer_der(&self, i: usize) -> Vec<u8> {
        self.authorities[i].signer().der().to_vec()
    }
}

impl CaClient for ScriptedCa {
    fn sign(&self, csr_pem: String, _ttl: Duration) -> SignFuture<'_> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let csr = check_csr(csr_pem.as_bytes())?;
            let authority = &self.authorities[self.signer.load(Ordering::SeqCst)];
            let id = SpiffeId::parse("spiffe://cluster.local/ns/prod/sa/web").unwrap();
            let chain = authority
                .sign_leaf(&csr, &id, Duration::from_secs(3600), SystemTime::now())?
                .chain;
            let generation = self.generation.load(Ordering::SeqCst);
            Ok((chain, (generation > 0).then_some(generation)))
        })
    }
}

fn start(ca: Arc<ScriptedCa>, bundle: &AgentBundle) -> (CertWatch, watch::Sender<bool>) {
    let metrics = Arc::new(AgentMetrics::new().unwrap());
    let policy = RotationPolicy {
        jitter: 0.0,
        ..RotationPolicy::default()
    };
    let (manager, w) = CertManager::sharing("web", ca, policy, metrics, bundle.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(manager.run(stop_rx));
    (w, stop_tx)
}

/// The next certificate, and the bundle generation published when it was.
async fn next_cert(w: &mut CertWatch) -> (Arc<WorkloadCert>, Option<u64>) {
    loop {
        w.cert.changed().await.unwrap();
        let cert = w.cert.borrow_and_update().clone();
        if let Some(cert) = cert {
            let generation = w.roots.borrow().as_ref().and_then(|r| r.generation);
            return (cert, generation);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn answers_feed_one_bundle_ordered_by_generation_roots_first() {
    let ca = ScriptedCa::new(5);
    let bundle = AgentBundle::new();
    let (mut a, _stop_a) = start(ca.clone(), &bundle);
    let (cert, generation) = next_cert(&mut a).await;
    assert_eq!(generation, Some(5), "the answer's bundle came first");
    assert_eq!(bundle.current().unwrap().version, "5");

    // A second workload shares the very same bundle.
    let (mut b, _stop_b) = start(ca.clone(), &bundle);
    next_cert(&mut b).await;
    assert!(Arc::ptr_eq(
        a.roots.borrow().as_ref().unwrap(),
        b.roots.borrow().as_ref().unwrap()
    ));

    // A newer answer is published before the certificate that came with it.
    ca.generation.store(6, Ordering::SeqCst);
    let (renewed, generation) = next_cert(&mut a).await;
    assert_ne!(renewed.serial_hex, cert.serial_hex);
    assert_eq!(generation, Some(6));

    // A push moved the bundle to 9: a late answer carrying 7, or an answer
    // without a generation, leaves it; the certificate is still served.
    let pushed = bundle.current().unwrap().pem.clone();
    assert!(bundle.offer(RootBundle::new(pushed, Some(9))));
    for answer in [7, 0] {
        ca.generation.store(answer, Ordering::SeqCst);
        let (_, generation) = next_cert(&mut a).await;
        assert_eq!(generation, Some(9), "answer {answer} must not undo 9");
    }
}

#[tokio::test(start_paused = true)]
async fn a_foreign_ca_bundle_is_taken_only_while_no_generation_is_known() {
    let ca = ScriptedCa::new(0);
    let bundle = AgentBundle::new();
    let (mut w, _stop) = start(ca.clone(), &bundle);
    let (_, generation) = next_cert(&mut w).await;
    assert_eq!(generation, None);
    let first = bundle.current().unwrap();
    assert_eq!(first.version.len(), 16, "a digest as version");
    // Another root in the answer: content changed, taken.
    ca.signer.store(1, Ordering::SeqCst);
    next_cert(&mut w).await;
    assert_ne!(bundle.current().unwrap().pem, first.pem);
}

#[tokio::test(start_paused = true)]
async fn a_leaf_of_a_retiring_authority_is_replaced_within_the_window() {
    let ca = ScriptedCa::new(1);
    let bundle = AgentBundle::new();
    let mut fleet = Vec::new();
    for _ in 0..8 {
        let (mut w, stop) = start(ca.clone(), &bundle);
        next_cert(&mut w).await;
        fleet.push((w, stop));
    }
    // Retiring another signer changes nothing (renewal is ~30 min away).
    let t0 = Instant::now();
    bundle.announce_retiring(vec![ca.signer_der(1)], Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(ca.calls.load(Ordering::SeqCst), 8, "no early renewal");

    // Retiring ours: every leaf is replaced within the window, spread out,
    // by the new authority, and only once.
    ca.signer.store(1, Ordering::SeqCst);
    ca.generation.store(2, Ordering::SeqCst);
    let t1 = Instant::now();
    bundle.announce_retiring(vec![ca.signer_der(0)], Duration::from_secs(60));
    let mut at = Vec::new();
    for (w, _) in &mut fleet {
        let (cert, _) = next_cert(w).await;
        // When it was issued (the leaves live one hour, to the second).
        let issued = cert.expires_at - Duration::from_secs(3600);
        let elapsed = issued.saturating_duration_since(t1);
        assert!(
            elapsed <= Duration::from_secs(61),
            "renewed after {elapsed:?}"
        );
        at.push(elapsed);
        let retiring = bundle.retiring().borrow().clone().unwrap();
        assert!(!retiring.issued(&cert.leaf_der, SystemTime::now()));
    }
    let spread = *at.iter().max().unwrap() - *at.iter().min().unwrap();
    assert!(spread >= Duration::from_secs(5), "spread over {spread:?}");
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(
        ca.calls.load(Ordering::SeqCst),
        16,
        "one early renewal each"
    );
    assert!(Instant::now() - t0 < Duration::from_secs(1000));
}

/// A `TrustBundleService` that records reports and pushes what the test
/// sends it, to one stream at a time.
#[derive(Clone)]
struct FakeCa {
    reports: mpsc::UnboundedSender<AgentReport>,
    updates: Arc<Mutex<Option<mpsc::Receiver<BundleUpdate>>>>,
    auth: Arc<Mutex<Vec<String>>>,
    /// Answers for the first calls, before serving.
    refuse: Arc<Mutex<std::collections::VecDeque<tonic::Code>>>,
}

impl FakeCa {
    fn new(
        refuse: &[tonic::Code],
    ) -> (
        Self,
        mpsc::UnboundedReceiver<AgentReport>,
        mpsc::Sender<BundleUpdate>,
    ) {
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let (updates, updates_rx) = mpsc::channel(4);
        let fake = Self {
            reports: reports_tx,
            updates: Arc::new(Mutex::new(Some(updates_rx))),
            auth: Arc::new(Mutex::new(Vec::new())),
            refuse: Arc::new(Mutex::new(refuse.iter().copied().collect())),
        };
        (fake, reports, updates)
    }

    fn calls(&self) -> usize {
        self.auth.lock().unwrap().len()
    }

    /// Serves on 127.0.0.1 port 0 until `stop` changes.
    async fn serve(
        &self,
        mut stop: watch::Receiver<bool>,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(TrustBundleServiceServer::new(self.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move {
                    let _ = stop.changed().await;
                },
            );
        (
            addr,
            tokio::spawn(async move {
                server.await.unwrap();
            }),
        )
    }
}

/// A watcher for `addr` with a token file in `dir`.
fn watcher(
    addr: std::net::SocketAddr,
    dir: &std::path::Path,
    bundle: &AgentBundle,
    acks: &BundleAcks,
    leaves: Vec<watch::Receiver<Option<Arc<WorkloadCert>>>>,
) -> BundleWatcher {
    let token = dir.join("token");
    std::fs::write(&token, "test-token\n").unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    BundleWatcher::new(
        channel,
        TokenFile::new(&token),
        "node-1".into(),
        bundle.clone(),
        acks.clone(),
        leaves,
        RotationPolicy::default(),
    )
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<BundleUpdate, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl TrustBundleService for FakeCa {
    type WatchBundleStream = UpdateStream;

    async fn watch_bundle(
        &self,
        request: tonic::Request<tonic::Streaming<AgentReport>>,
    ) -> Result<tonic::Response<UpdateStream>, tonic::Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        self.auth.lock().unwrap().push(auth);
        if let Some(code) = self.refuse.lock().unwrap().pop_front() {
            return Err(tonic::Status::new(code, "scripted refusal"));
        }
        let mut inbound = request.into_inner();
        let reports = self.reports.clone();
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                let _ = reports.send(r);
            }
        });
        let updates = self
            .updates
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| tonic::Status::unavailable("one stream only"))?;
        let stream = ReceiverStream::new(updates);
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::StreamExt::map(stream, Ok),
        )))
    }
}

async fn report(rx: &mut mpsc::UnboundedReceiver<AgentReport>) -> AgentReport {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a report in time")
        .expect("the fake CA is up")
}

async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn the_watch_client_applies_pushes_and_reports_changes() {
    let (fake, mut reports, updates) = FakeCa::new(&[]);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (addr, server) = fake.serve(stop_rx.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let bundle = AgentBundle::new();
    let acks = BundleAcks::new();
    let (leaf_tx, leaf_rx) = watch::channel(None);
    let watcher = watcher(addr, dir.path(), &bundle, &acks, vec![leaf_rx]);
    let task = tokio::spawn(watcher.run(stop_rx));

    // A report at once, authenticated like CreateCertificate.
    let first = report(&mut reports).await;
    assert_eq!(
        first,
        AgentReport {
            agent: "node-1".into(),
            bundle_generation: 0,
            acked_generation: 0,
            proxies: 0,
            leaves: vec![],
        }
    );
    assert_eq!(*fake.auth.lock().unwrap(), ["Bearer test-token"]);

    // First push: the bundle is applied, and the report follows it (no
    // proxy: acked = held).
    let (a, b) = (common::authority(), common::authority());
    updates
        .send(BundleUpdate {
            generation: 2,
            bundle_pem: a.roots().pem(),
            retiring_signers: vec![],
            reissue_within_seconds: 0,
        })
        .await
        .unwrap();
    let r = report(&mut reports).await;
    assert_eq!((r.bundle_generation, r.acked_generation), (2, 2));
    assert_eq!(bundle.current().unwrap().pem, a.roots().pem());
    assert!(bundle.retiring().borrow().is_none());

    // Junk and an older generation are ignored.
    for (generation, pem) in [(7, "junk".to_owned()), (1, b.roots().pem())] {
        updates
            .send(BundleUpdate {
                generation,
                bundle_pem: pem,
                retiring_signers: vec![a.signer().der().to_vec()],
                reissue_within_seconds: 10,
            })
            .await
            .unwrap();
    }
    // Second push: both roots, the old signer retiring.
    let both = format!("{}{}", a.roots().pem(), b.roots().pem());
    updates
        .send(BundleUpdate {
            generation: 3,
            bundle_pem: both.clone(),
            retiring_signers: vec![a.signer().der().to_vec()],
            reissue_within_seconds: 30,
        })
        .await
        .unwrap();
    let r = report(&mut reports).await;
    assert_eq!(
        (r.bundle_generation, r.acked_generation),
        (3, 3),
        "the junk (7) and the older (1) pushes changed nothing"
    );
    assert_eq!(bundle.current().unwrap().pem, both);
    let retiring = bundle.retiring().borrow().clone().unwrap();
    assert_eq!(
        (retiring.signers.clone(), retiring.window),
        (vec![a.signer().der().to_vec()], Duration::from_secs(30))
    );

    // A proxy subscribes (ACKed nothing yet), then a leaf appears.
    let proxy = acks.stream();
    proxy.set_subscribed(true);
    let r = report(&mut reports).await;
    assert_eq!((r.proxies, r.acked_generation), (1, 0));
    proxy.acked(3);
    let r = report(&mut reports).await;
    assert_eq!((r.proxies, r.acked_generation), (1, 3));
    let cert = issue(&b);
    let der = cert.leaf_der.clone();
    leaf_tx.send_replace(Some(Arc::new(cert)));
    let r = report(&mut reports).await;
    assert_eq!(r.leaves, vec![der]);

    stop_tx.send_replace(true);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the watch task stops at shutdown")
        .unwrap();
    until("the fake CA stops", || server.is_finished()).await;
}

fn issue(authority: &Authority) -> WorkloadCert {
    common::sds::issue(authority, "spiffe://cluster.local/ns/prod/sa/web").0
}

#[tokio::test]
async fn the_watch_client_reconnects_with_back_off() {
    use tonic::Code;
    let (fake, mut reports, _updates) = FakeCa::new(&[Code::Unavailable, Code::Internal]);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (addr, _server) = fake.serve(stop_rx.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let (bundle, acks) = (AgentBundle::new(), BundleAcks::new());
    let started = Instant::now();
    let task = tokio::spawn(watcher(addr, dir.path(), &bundle, &acks, vec![]).run(stop_rx));
    let r = report(&mut reports).await;
    assert_eq!(r.agent, "node-1");
    assert_eq!(fake.calls(), 3, "two refusals, then the stream");
    // Back-off 100-200 ms, then 200-400 ms.
    assert!(Instant::now() - started >= Duration::from_millis(300));
    stop_tx.send_replace(true);
    tokio::time::timeout(WAIT_STOP, task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_ca_without_the_service_is_asked_again_rarely() {
    let (fake, _reports, _updates) = FakeCa::new(&[tonic::Code::Unimplemented; 64]);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (addr, _server) = fake.serve(stop_rx.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let (bundle, acks) = (AgentBundle::new(), BundleAcks::new());
    let watcher = watcher(addr, dir.path(), &bundle, &acks, vec![])
        .with_unimplemented_retry(Duration::from_millis(800));
    let task = tokio::spawn(watcher.run(stop_rx));
    // At 0 and 0.8 s (the failure back-off would have asked 3 or 4 times).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let calls = fake.calls();
    assert_eq!(calls, 2, "{calls} calls in 1.2 s");
    stop_tx.send_replace(true);
    tokio::time::timeout(WAIT_STOP, task)
        .await
        .unwrap()
        .unwrap();
}

const WAIT_STOP: Duration = Duration::from_secs(5);
