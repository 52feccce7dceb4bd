//! Envoy's Secret Discovery Service (v3) for one workload, on a Unix socket.
//!
//! Resources: `default` (a `TlsCertificate`: chain and key), `ROOTCA` (a
//! `CertificateValidationContext` with every trusted root), the workload's
//! own SPIFFE ID, answered like `default`, and its trust domain's ID
//! (`spiffe://<td>`, SPIRE's bundle name), answered like `ROOTCA`. Any other name ends
//! that stream only, with `InvalidArgument` (unknown) or `PermissionDenied`
//! (another identity's SPIFFE ID), even while another name it asks for
//! does not exist yet.
//!
//! State of the world (`StreamSecrets`) follows what a real Envoy does
//! (REFERENCE section 3): a request with an empty nonce (a new stream, or a
//! reconnect carrying the last accepted `version_info`) is always answered
//! once the resources exist; a request whose nonce is not the last one sent
//! is stale and ignored; `error_detail` marks a NACK, which is logged and
//! counted, and the secret is not resent until it changes; an ACK only
//! matters if it changes the subscribed names. A rotated certificate or a
//! changed bundle is pushed to every stream subscribed to it as soon as the
//! `watch` fires (bursts coalesce in the channel). Nothing is sent for a
//! resource that does not exist yet, or for a certificate that has expired:
//! an empty answer would be ACKed and leave Envoy waiting 15 s.
//!
//! `ROOTCA`'s version is the bundle's generation when the CA sent one. Each
//! stream subscribed to the bundle records the generation its proxy ACKs
//! (a matching nonce, no `error_detail`) in the agent-wide [`BundleAcks`].
//!
//! What each stream decides is in [`super::sds_state`] (pure, synchronous,
//! fuzzed: `fuzz/fuzz_targets/sds_streams.rs`); the loops here feed it the
//! requests and the `watch` changes and do what it says.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::acks::{BundleAcks, Subscription};
use super::metrics::AgentMetrics;
use super::sds_inbound::Inbound;
use super::sds_state::{
    Action, DeltaStream, Effects, Nonces, Refusal, Snapshot, SotwStream, Step, sotw_response,
};
pub use super::sds_state::{DEFAULT, ROOTCA, SECRET_TYPE_URL};
use super::workload::{CertWatch, RootBundle, WorkloadCert};
use crate::limits::{AgentLimits, label};
use crate::logsafe::{WarnLimiter, peer};
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use crate::proto::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;

/// How long `FetchSecrets` waits for a first certificate.
const FETCH_WAIT: Duration = Duration::from_secs(10);
/// How long SDS connections may take to close after shutdown begins (every
/// stream ends at once; this covers a proxy slow to read its last frames).
const SDS_DRAIN: Duration = Duration::from_secs(2);

/// The SDS service for one workload.
#[derive(Clone)]
pub struct Sds {
    watch: CertWatch,
    metrics: Arc<AgentMetrics>,
    /// Where streams subscribed to the bundle record what they ACKed.
    acks: BundleAcks,
    nonces: Arc<Nonces>,
    limits: Arc<AgentLimits>,
    /// Warnings this socket's peers cause, rate-limited per kind.
    warn: Arc<WarnLimiter<&'static str>>,
    /// Streams end when this fires (set by [`serve`]).
    shutdown: Option<watch::Receiver<bool>>,
    /// The one process allowed on the socket, if bound (checked by [`serve`]).
    peer: Option<PeerRule>,
}

type Owned = (Option<Arc<WorkloadCert>>, Option<Arc<RootBundle>>);

impl Sds {
    /// The service with the default [`AgentLimits`].
    pub fn new(watch: CertWatch, metrics: Arc<AgentMetrics>) -> Self {
        Self {
            watch,
            metrics,
            acks: BundleAcks::new(),
            nonces: Arc::new(Nonces::new()),
            limits: Arc::new(AgentLimits::default()),
            warn: Arc::new(WarnLimiter::new()),
            shutdown: None,
            peer: None,
        }
    }

    /// Binds the socket [`serve`] places to one peer: connections from any
    /// other uid (or gid) are refused.
    #[must_use]
    pub fn with_peer(mut self, peer: Option<PeerRule>) -> Self {
        self.peer = peer;
        self
    }

    /// Serves under `limits` instead of the defaults.
    #[must_use]
    pub fn with_limits(mut self, limits: AgentLimits) -> Self {
        self.limits = Arc::new(limits);
        self
    }

    /// Records ACKs of the trust bundle in `acks` (the agent-wide registry)
    /// instead of a registry of its own.
    #[must_use]
    pub fn with_acks(mut self, acks: BundleAcks) -> Self {
        self.acks = acks;
        self
    }

    /// Refuses a request for more names than the limit.
    fn check_names(&self, n: usize) -> Result<(), Status> {
        let max = self.limits.max_resource_names_per_stream;
        if n > max {
            let refusal = Refusal::TooManyNames { requested: n, max };
            return Err(self.refuse(&refusal, ""));
        }
        Ok(())
    }

    /// Resolves when the agent shuts down (never without a receiver).
    async fn stopping(shutdown: &mut Option<watch::Receiver<bool>>) {
        match shutdown {
            Some(rx) => {
                let _ = rx.wait_for(|stop| *stop).await;
            }
            None => std::future::pending().await,
        }
    }

    /// The certificate (unless expired) and the bundle now.
    fn snapshot(&self) -> Owned {
        let now = tokio::time::Instant::now();
        let cert = self
            .watch
            .cert
            .borrow()
            .clone()
            .filter(|c| c.expires_at > now);
        let roots = self.watch.roots.borrow().clone();
        (cert, roots)
    }

    fn count_push(&self, names: impl IntoIterator<Item = impl AsRef<str>>) {
        for n in names {
            self.metrics
                .sds_pushes
                .with_label_values(&[metric_label(n.as_ref())])
                .inc();
        }
    }

    /// The status ending a stream for `refusal`, counted and logged (`what`:
    /// the names concerned, for the log).
    fn refuse(&self, refusal: &Refusal, what: &str) -> Status {
        match refusal {
            Refusal::WrongType { .. } => {}
            Refusal::TooManyNames { requested, max } => {
                self.metrics.refusals.refused(label::RESOURCE_NAMES);
                crate::peer_warn!(
                    self.warn,
                    "names",
                    self.metrics.refusals,
                    names = requested,
                    max,
                    "SDS stream refused: too many resource names"
                );
            }
            _ => {
                crate::peer_warn!(self.warn, "refused", self.metrics.refusals,
                    resources = %what, error = %peer(&refusal.to_string()), "refusing SDS request");
            }
        }
        status(refusal)
    }

    /// Records a step's side effects; `nack`: the request's nonce, accepted
    /// version and error, when it has one.
    fn record<At>(
        &self,
        effects: &Effects<At>,
        bundle_acks: &Subscription,
        nack: Option<(&str, &str, &crate::proto::google::rpc::Status)>,
        delta: bool,
    ) {
        if let (Some(names), Some((nonce, accepted, err))) = (&effects.nacked, nack) {
            if delta {
                // Delta: the rejected response is not tracked.
                self.metrics.sds_nacks.with_label_values(&["delta"]).inc();
                crate::peer_warn!(self.warn, "nack", self.metrics.refusals,
                    nonce = %peer(nonce), code = err.code, detail = %peer(&err.message),
                    "proxy rejected a delta update (NACK)");
            } else {
                for n in names {
                    self.metrics
                        .sds_nacks
                        .with_label_values(&[metric_label(n)])
                        .inc();
                }
                let names: BTreeSet<String> = names.iter().cloned().collect();
                crate::peer_warn!(self.warn, "nack", self.metrics.refusals,
                    resources = %shown(&names), nonce = %peer(nonce), accepted = %peer(accepted),
                    code = err.code, detail = %peer(&err.message),
                    "proxy rejected the secret (NACK); it keeps its previous one"
                );
            }
        }
        if let Some(g) = effects.acked_generation {
            bundle_acks.acked(g);
        }
        if let Some(s) = effects.subscribed_to_bundle {
            bundle_acks.set_subscribed(s);
        }
    }

    async fn sotw_loop(
        self,
        mut inbound: Inbound<DiscoveryRequest>,
        tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) {
        let mut cert_rx = self.watch.cert.clone();
        let mut roots_rx = self.watch.roots.clone();
        // Only changes after the stream opened wake it; the first request
        // is answered from the current state anyway.
        cert_rx.borrow_and_update();
        roots_rx.borrow_and_update();
        let mut stream: SotwStream<tokio::time::Instant> =
            SotwStream::new(self.limits.max_resource_names_per_stream);
        let bundle_acks = self.acks.stream();
        let mut shutdown = self.shutdown.clone();
        loop {
            let step = tokio::select! {
                () = Self::stopping(&mut shutdown) => return,
                msg = inbound.next() => {
                    let req = match msg {
                        Some(Ok(req)) => req,
                        None => return,
                        Some(Err(e)) => return self.ended(e, &tx).await,
                    };
                    let (cert, roots) = self.snapshot();
                    let step = stream.request(&req, &Snapshot::of(cert.as_deref(), roots.as_deref()), &self.nonces);
                    let nack = req.error_detail.as_ref().map(|e| (req.response_nonce.as_str(), req.version_info.as_str(), e));
                    self.record(&step.effects, &bundle_acks, nack, false);
                    if let Some(at) = step.effects.ack_latency_since {
                        self.metrics.sds_ack_latency.observe(at.elapsed().as_secs_f64());
                    }
                    step
                }
                changed = cert_rx.changed() => {
                    if changed.is_err() { return }
                    self.sotw_changed(&mut stream)
                }
                changed = roots_rx.changed() => {
                    if changed.is_err() { return }
                    self.sotw_changed(&mut stream)
                }
                _ = tx.closed() => return,
            };
            match step.action {
                Action::Nothing => {}
                Action::End(refusal) => {
                    let _ = tx
                        .send(Err(self.refuse(&refusal, &shown(stream.names()))))
                        .await;
                    return;
                }
                Action::Send(resp) => {
                    self.count_push(stream.names());
                    tracing::debug!(resources = %shown(stream.names()), nonce = %resp.nonce, version = %resp.version_info, "SDS push");
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    fn sotw_changed(
        &self,
        stream: &mut SotwStream<tokio::time::Instant>,
    ) -> Step<DiscoveryResponse, tokio::time::Instant> {
        let (cert, roots) = self.snapshot();
        let snap = Snapshot::of(cert.as_deref(), roots.as_deref());
        stream.changed(tokio::time::Instant::now(), &snap, &self.nonces)
    }

    async fn delta_loop(
        self,
        mut inbound: Inbound<DeltaDiscoveryRequest>,
        tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) {
        let mut cert_rx = self.watch.cert.clone();
        let mut roots_rx = self.watch.roots.clone();
        let mut stream = DeltaStream::new(self.limits.max_resource_names_per_stream);
        let bundle_acks = self.acks.stream();
        let mut shutdown = self.shutdown.clone();
        loop {
            let (cert, roots) = tokio::select! {
                () = Self::stopping(&mut shutdown) => return,
                msg = inbound.next() => {
                    let req = match msg {
                        Some(Ok(req)) => req,
                        None => return,
                        Some(Err(e)) => return self.ended(e, &tx).await,
                    };
                    let (cert, roots) = self.snapshot();
                    let step = stream.request(&req, &Snapshot::of(cert.as_deref(), roots.as_deref()), &self.nonces);
                    let nack = req.error_detail.as_ref().map(|e| (req.response_nonce.as_str(), "", e));
                    self.record(&step.effects, &bundle_acks, nack, true);
                    if self.delta_act(step.action, &tx).await.is_err() {
                        return;
                    }
                    continue;
                }
                changed = cert_rx.changed() => if changed.is_err() { return } else { self.snapshot() },
                changed = roots_rx.changed() => if changed.is_err() { return } else { self.snapshot() },
                _ = tx.closed() => return,
            };
            let step = stream.changed(
                &Snapshot::of(cert.as_deref(), roots.as_deref()),
                &self.nonces,
            );
            if self.delta_act(step.action, &tx).await.is_err() {
                return;
            }
        }
    }

    /// Does what a delta step asks; `Err` when the stream is over.
    async fn delta_act(
        &self,
        action: Action<DeltaDiscoveryResponse>,
        tx: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) -> Result<(), ()> {
        match action {
            Action::Nothing => Ok(()),
            Action::End(refusal) => {
                let what = match &refusal {
                    Refusal::UnknownName { name } | Refusal::OtherIdentity { name, .. } => {
                        peer(name).to_string()
                    }
                    _ => String::new(),
                };
                let _ = tx.send(Err(self.refuse(&refusal, &what))).await;
                Err(())
            }
            Action::Send(resp) => {
                self.count_push(resp.resources.iter().map(|r| r.name.clone()));
                tx.send(Ok(resp)).await.map_err(drop)
            }
        }
    }
}

/// The status ending a stream for `refusal`.
fn status(refusal: &Refusal) -> Status {
    let message = refusal.to_string();
    match refusal {
        Refusal::TooManyNames { .. } => Status::resource_exhausted(message),
        Refusal::OtherIdentity { .. } => Status::permission_denied(message),
        _ => Status::invalid_argument(message),
    }
}

/// Requested names for a log line: each escaped and cut, at most four.
fn shown(names: &BTreeSet<String>) -> String {
    let mut out: Vec<String> = names.iter().take(4).map(|n| peer(n).to_string()).collect();
    if names.len() > 4 {
        out.push(format!("... {} in all", names.len()));
    }
    out.join(", ")
}

/// Metric label for a resource name: SPIFFE IDs are folded into one value so
/// the label set stays small.
fn metric_label(name: &str) -> &str {
    match name {
        DEFAULT | ROOTCA => name,
        _ => "spiffe-id",
    }
}

pub(super) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl Sds {
    /// Runs one stream's loop in its own task, counted while it lives, and
    /// hands back the stream of its responses.
    fn spawn_stream<T: Send + 'static, F>(
        &self,
        body: impl FnOnce(mpsc::Sender<Result<T, Status>>) -> F,
    ) -> BoxStream<T>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(4);
        let gauge = StreamGauge::new(&self.metrics);
        let task = body(tx);
        tokio::spawn(async move {
            let _gauge = gauge;
            task.await;
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    /// A state-of-the-world stream: its loop in a task of its own, and the
    /// responses it sends.
    pub(super) fn stream_sotw(
        &self,
        inbound: Inbound<DiscoveryRequest>,
    ) -> BoxStream<DiscoveryResponse> {
        let this = self.clone();
        self.spawn_stream(move |tx| this.sotw_loop(inbound, tx))
    }

    /// A delta stream: its loop in a task of its own, and its responses.
    pub(super) fn stream_delta(
        &self,
        inbound: Inbound<DeltaDiscoveryRequest>,
    ) -> BoxStream<DeltaDiscoveryResponse> {
        let this = self.clone();
        self.spawn_stream(move |tx| this.delta_loop(inbound, tx))
    }

    /// A stream's requests ended with `e`, which is sent as the stream's
    /// status (a reset stream no longer reads it); an over-long message is
    /// counted.
    async fn ended<T>(&self, e: Status, tx: &mpsc::Sender<Result<T, Status>>) {
        tracing::debug!(error = %e, "SDS stream ended");
        if e.code() == tonic::Code::OutOfRange {
            self.metrics.refusals.refused(label::MESSAGE_SIZE);
        }
        let _ = tx.send(Err(e)).await;
    }
}

/// Counts a connected stream for as long as it lives.
struct StreamGauge(Arc<AgentMetrics>);

impl StreamGauge {
    fn new(m: &Arc<AgentMetrics>) -> Self {
        m.sds_streams.inc();
        Self(m.clone())
    }
}

impl Drop for StreamGauge {
    fn drop(&mut self) {
        self.0.sds_streams.dec();
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = BoxStream<DiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        // Not the route served (see `SdsRoutes`, which reads the requests
        // with a buffer of its own): the same stream on tonic's `Streaming`.
        Ok(Response::new(
            self.stream_sotw(Box::pin(request.into_inner())),
        ))
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Ok(Response::new(
            self.stream_delta(Box::pin(request.into_inner())),
        ))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let names: BTreeSet<String> = request.into_inner().resource_names.into_iter().collect();
        if names.is_empty() {
            return Err(Status::invalid_argument("name at least one secret"));
        }
        self.check_names(names.len())?;
        let mut cert_rx = self.watch.cert.clone();
        let mut roots_rx = self.watch.roots.clone();
        let deadline = tokio::time::Instant::now() + FETCH_WAIT;
        let mut shutdown = self.shutdown.clone();
        loop {
            let (cert, roots) = self.snapshot();
            let snap = Snapshot::of(cert.as_deref(), roots.as_deref());
            if let Some(resp) =
                sotw_response(&names, &snap, &self.nonces).map_err(|r| status(&r))?
            {
                self.count_push(&names);
                return Ok(Response::new(resp));
            }
            tokio::select! {
                () = Self::stopping(&mut shutdown) => return Err(Status::unavailable("the agent is shutting down")),
                r = cert_rx.changed() => if r.is_err() { return Err(Status::unavailable("the agent is shutting down")) },
                r = roots_rx.changed() => if r.is_err() { return Err(Status::unavailable("the agent is shutting down")) },
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(Status::unavailable("no certificate yet; the agent is still waiting for the CA"));
                }
            }
        }
    }
}

#[path = "sds_socket.rs"]
mod socket;
pub use socket::{PeerRule, SdsSocket, serve};
