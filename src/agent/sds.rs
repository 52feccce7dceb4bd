//! Envoy's Secret Discovery Service (v3) for one workload, on a Unix socket.
//!
//! Resources: `default` (a `TlsCertificate`: chain and key), `ROOTCA` (a
//! `CertificateValidationContext` with every trusted root), the workload's
//! own SPIFFE ID, answered like `default`, and its trust domain's ID
//! (`spiffe://<td>`, SPIRE's bundle name), answered like `ROOTCA`. Any other name ends
//! that stream only, with `InvalidArgument` (unknown) or `PermissionDenied`
//! (another identity's SPIFFE ID).
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

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::acks::{BundleAcks, is_bundle_name};
use super::metrics::AgentMetrics;
use super::sds_inbound::Inbound;
use super::workload::{CertWatch, RootBundle, WorkloadCert};
use crate::limits::{AgentLimits, label};
use crate::logsafe::{WarnLimiter, peer};
use crate::proto::envoy::config::core::v3::{DataSource, data_source};
use crate::proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use crate::proto::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;

pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
pub const DEFAULT: &str = "default";
pub const ROOTCA: &str = "ROOTCA";
/// Delta responses holding the bundle remembered per stream until ACKed.
const MAX_PENDING_ACKS: usize = 16;
/// How long `FetchSecrets` waits for a first certificate.
const FETCH_WAIT: Duration = Duration::from_secs(10);
/// How long SDS connections may take to close after shutdown begins (every
/// stream ends at once; this covers a proxy slow to read its last frames).
const SDS_DRAIN: Duration = Duration::from_secs(2);

/// What a resource name refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Cert,
    Roots,
}

/// The SDS service for one workload.
#[derive(Clone)]
pub struct Sds {
    watch: CertWatch,
    metrics: Arc<AgentMetrics>,
    /// Where streams subscribed to the bundle record what they ACKed.
    acks: BundleAcks,
    nonces: Arc<AtomicU64>,
    limits: Arc<AgentLimits>,
    /// Warnings this socket's peers cause, rate-limited per kind.
    warn: Arc<WarnLimiter<&'static str>>,
    /// Streams end when this fires (set by [`serve`]).
    shutdown: Option<watch::Receiver<bool>>,
    /// The one process allowed on the socket, if bound (checked by [`serve`]).
    peer: Option<PeerRule>,
}

type Snapshot = (Option<Arc<WorkloadCert>>, Option<Arc<RootBundle>>);

impl Sds {
    /// The service with the default [`AgentLimits`].
    pub fn new(watch: CertWatch, metrics: Arc<AgentMetrics>) -> Self {
        Self {
            watch,
            metrics,
            acks: BundleAcks::new(),
            nonces: Arc::new(AtomicU64::new(0)),
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

    /// Refuses a stream that subscribes to more names than the limit.
    fn check_names(&self, n: usize) -> Result<(), Status> {
        let max = self.limits.max_resource_names_per_stream;
        if n > max {
            self.metrics.refusals.refused(label::RESOURCE_NAMES);
            crate::peer_warn!(
                self.warn,
                "names",
                self.metrics.refusals,
                names = n,
                max,
                "SDS stream refused: too many resource names"
            );
            return Err(Status::resource_exhausted(format!(
                "{n} resource names requested; at most {max} per stream"
            )));
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

    fn nonce(&self) -> String {
        self.nonces.fetch_add(1, Ordering::Relaxed).to_string()
    }

    fn snapshot(&self) -> Snapshot {
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

    /// Maps a requested name to a resource kind. `Ok(None)`: cannot tell yet
    /// (a SPIFFE ID before the first certificate).
    fn classify(name: &str, snap: &Snapshot) -> Result<Option<Kind>, Status> {
        match name {
            DEFAULT => Ok(Some(Kind::Cert)),
            ROOTCA => Ok(Some(Kind::Roots)),
            id if id.starts_with("spiffe://") => match &snap.0 {
                Some(c) if c.identity.as_str() == id => Ok(Some(Kind::Cert)),
                // SPIRE names the bundle by the trust domain's ID.
                Some(c) if c.identity.trust_domain().id().as_str() == id => Ok(Some(Kind::Roots)),
                Some(c) => Err(Status::permission_denied(format!(
                    "this socket serves {} only, not {id}",
                    c.identity
                ))),
                None => Ok(None),
            },
            other => Err(Status::invalid_argument(format!(
                "unknown secret {other:?}: this agent serves \"default\", \"ROOTCA\" and the workload's SPIFFE ID"
            ))),
        }
    }

    /// The resource for `name`: `Ok(None)` if it does not exist yet.
    fn resource(name: &str, snap: &Snapshot) -> Result<Option<(String, prost_types::Any)>, Status> {
        let Some(kind) = Self::classify(name, snap)? else {
            return Ok(None);
        };
        let (version, secret) = match kind {
            Kind::Cert => {
                let Some(c) = &snap.0 else { return Ok(None) };
                (
                    c.version.clone(),
                    secret::Type::TlsCertificate(TlsCertificate {
                        certificate_chain: Some(inline(c.chain_pem.as_bytes())),
                        private_key: Some(inline(c.key_pem.as_bytes())),
                    }),
                )
            }
            Kind::Roots => {
                let Some(r) = &snap.1 else { return Ok(None) };
                (
                    r.version.clone(),
                    secret::Type::ValidationContext(CertificateValidationContext {
                        trusted_ca: Some(inline(r.pem.as_bytes())),
                    }),
                )
            }
        };
        let secret = Secret {
            name: name.to_owned(),
            r#type: Some(secret),
        };
        Ok(Some((
            version,
            prost_types::Any {
                type_url: SECRET_TYPE_URL.to_owned(),
                value: secret.encode_to_vec(),
            },
        )))
    }

    /// A state-of-the-world response for all `names`, or `Ok(None)` while any
    /// of them does not exist yet.
    fn sotw_response(
        &self,
        names: &BTreeSet<String>,
        snap: &Snapshot,
    ) -> Result<Option<DiscoveryResponse>, Status> {
        let mut resources = Vec::new();
        let mut versions = Vec::new();
        for name in names {
            let Some((version, any)) = Self::resource(name, snap)? else {
                return Ok(None);
            };
            versions.push(format!("{name}={version}"));
            resources.push(any);
        }
        Ok(Some(DiscoveryResponse {
            version_info: versions.join(";"),
            resources,
            canary: false,
            type_url: SECRET_TYPE_URL.to_owned(),
            nonce: self.nonce(),
        }))
    }

    fn count_push(&self, names: impl IntoIterator<Item = impl AsRef<str>>) {
        for n in names {
            self.metrics
                .sds_pushes
                .with_label_values(&[metric_label(n.as_ref())])
                .inc();
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
        let mut names: BTreeSet<String> = BTreeSet::new();
        let mut last_nonce: Option<String> = None;
        let mut last_version: Option<String> = None;
        // This stream's ACKs of the bundle, and the generation of the
        // bundle in the last response (when it held one with a generation).
        let bundle_acks = self.acks.stream();
        let mut last_generation: Option<u64> = None;
        // Set when a response is due (new stream, new names) but a resource
        // does not exist yet.
        let mut due = false;
        // When the change behind the response awaiting an ACK happened.
        let mut changed_at: Option<tokio::time::Instant> = None;
        let mut awaiting: Option<(String, tokio::time::Instant)> = None;
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                () = Self::stopping(&mut shutdown) => return,
                msg = inbound.next() => {
                    let req = match msg {
                        Some(Ok(req)) => req,
                        None => return,
                        Some(Err(e)) => return self.ended(e, &tx).await,
                    };
                    if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
                        let _ = tx.send(Err(Status::invalid_argument(format!("type {} is not served here; only {SECRET_TYPE_URL}", peer(&req.type_url))))).await;
                        return;
                    }
                    let requested: BTreeSet<String> = req.resource_names.iter().cloned().collect();
                    if let Err(status) = self.check_names(requested.len()) {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    // A rejection is always reported, even for a response
                    // that a newer push has already superseded.
                    if let Some(err) = &req.error_detail {
                        for n in &names {
                            self.metrics.sds_nacks.with_label_values(&[metric_label(n)]).inc();
                        }
                        crate::peer_warn!(self.warn, "nack", self.metrics.refusals,
                            resources = %shown(&names), nonce = %peer(&req.response_nonce), accepted = %peer(&req.version_info),
                            code = err.code, detail = %peer(&err.message),
                            "proxy rejected the secret (NACK); it keeps its previous one"
                        );
                    }
                    if !req.response_nonce.is_empty() {
                        if last_nonce.as_deref() != Some(req.response_nonce.as_str()) {
                            tracing::debug!(nonce = %peer(&req.response_nonce), "stale nonce; ignored");
                            continue;
                        }
                        tracing::debug!(nonce = %peer(&req.response_nonce), nack = req.error_detail.is_some(), "SDS response acknowledged");
                        if let Some((_, at)) = awaiting.take().filter(|(n, _)| *n == req.response_nonce && req.error_detail.is_none()) {
                            self.metrics.sds_ack_latency.observe(at.elapsed().as_secs_f64());
                        }
                        if req.error_detail.is_none() && let Some(g) = last_generation {
                            bundle_acks.acked(g);
                        }
                        // A NACK is not answered with the same secret again;
                        // a plain ACK only matters if the names changed.
                        if req.error_detail.is_some() || requested == names {
                            continue;
                        }
                    }
                    names = requested;
                    bundle_acks.set_subscribed(names.iter().any(|n| is_bundle_name(n)));
                    due = true;
                }
                changed = cert_rx.changed() => {
                    if changed.is_err() { return }
                    if !names.is_empty() { due = true; changed_at.get_or_insert_with(tokio::time::Instant::now); }
                }
                changed = roots_rx.changed() => {
                    if changed.is_err() { return }
                    if !names.is_empty() { due = true; changed_at.get_or_insert_with(tokio::time::Instant::now); }
                }
                _ = tx.closed() => return,
            }
            if !due || names.is_empty() {
                continue;
            }
            let snap = self.snapshot();
            match self.sotw_response(&names, &snap) {
                Err(status) => {
                    crate::peer_warn!(self.warn, "refused", self.metrics.refusals,
                        resources = %shown(&names),
                        error = %peer(status.message()), "refusing SDS request");
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                Ok(None) => {} // stays due until the resources exist
                Ok(Some(resp)) => {
                    due = false;
                    // A change that leaves our resources as they were (the
                    // other watch fired) is not pushed, unless the request
                    // itself asked for an answer.
                    if last_version.as_deref() == Some(resp.version_info.as_str())
                        && last_nonce.is_some()
                        && !names_changed(&last_version, &resp.version_info)
                    {
                        changed_at = None;
                        continue;
                    }
                    last_nonce = Some(resp.nonce.clone());
                    last_version = Some(resp.version_info.clone());
                    last_generation = snap
                        .1
                        .as_ref()
                        .and_then(|r| r.generation)
                        .filter(|_| names.iter().any(|n| is_bundle_name(n)));
                    if let Some(at) = changed_at.take() {
                        awaiting = Some((resp.nonce.clone(), at));
                    }
                    self.count_push(&names);
                    tracing::debug!(resources = %shown(&names), nonce = %resp.nonce, version = %resp.version_info, "SDS push");
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    async fn delta_loop(
        self,
        mut inbound: Inbound<DeltaDiscoveryRequest>,
        tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) {
        let mut cert_rx = self.watch.cert.clone();
        let mut roots_rx = self.watch.roots.clone();
        let mut subscribed: BTreeSet<String> = BTreeSet::new();
        // What the client holds, by name: the version we sent it (or it told
        // us it had, on reconnect).
        let mut held: BTreeMap<String, String> = BTreeMap::new();
        let mut first = true;
        // Responses carrying the bundle that await an ACK: nonce, generation.
        let bundle_acks = self.acks.stream();
        let mut pending: std::collections::VecDeque<(String, u64)> = Default::default();
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                () = Self::stopping(&mut shutdown) => return,
                msg = inbound.next() => {
                    let req = match msg {
                        Some(Ok(req)) => req,
                        None => return,
                        Some(Err(e)) => return self.ended(e, &tx).await,
                    };
                    if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
                        let _ = tx.send(Err(Status::invalid_argument(format!("type {:?} is not served here", peer(&req.type_url))))).await;
                        return;
                    }
                    if first {
                        // What the client says it holds is bounded like what
                        // it subscribes to.
                        if let Err(status) = self.check_names(req.initial_resource_versions.len()) {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                        held.extend(req.initial_resource_versions.clone());
                        first = false;
                    }
                    if let Some(err) = &req.error_detail {
                        self.metrics.sds_nacks.with_label_values(&["delta"]).inc();
                        crate::peer_warn!(self.warn, "nack", self.metrics.refusals,
                            nonce = %peer(&req.response_nonce), code = err.code, detail = %peer(&err.message),
                            "proxy rejected a delta update (NACK)");
                    }
                    if req.error_detail.is_none()
                        && let Some(i) = pending.iter().position(|(n, _)| *n == req.response_nonce)
                    {
                        bundle_acks.acked(pending[i].1);
                        pending.drain(..=i);
                    }
                    for name in &req.resource_names_unsubscribe {
                        subscribed.remove(name);
                        held.remove(name);
                    }
                    for name in &req.resource_names_subscribe {
                        // A (re-)subscription must be answered unless the
                        // client told us, in this stream's first message,
                        // that it already holds the current version.
                        if !req.initial_resource_versions.contains_key(name) {
                            held.remove(name);
                        }
                        subscribed.insert(name.clone());
                    }
                    if let Err(status) = self.check_names(subscribed.len()) {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    bundle_acks.set_subscribed(subscribed.iter().any(|n| is_bundle_name(n)));
                }
                changed = cert_rx.changed() => if changed.is_err() { return },
                changed = roots_rx.changed() => if changed.is_err() { return },
                _ = tx.closed() => return,
            }
            let snap = self.snapshot();
            let mut resources = Vec::new();
            for name in &subscribed {
                match Self::resource(name, &snap) {
                    Err(status) => {
                        crate::peer_warn!(self.warn, "refused", self.metrics.refusals,
                            resource = %peer(name), error = %peer(status.message()), "refusing delta SDS subscription");
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    Ok(None) => {}
                    Ok(Some((version, any))) => {
                        if held.get(name) != Some(&version) {
                            held.insert(name.clone(), version.clone());
                            resources.push(Resource {
                                version,
                                resource: Some(any),
                                name: name.clone(),
                                aliases: vec![],
                                ttl: None,
                            });
                        }
                    }
                }
            }
            if resources.is_empty() {
                continue;
            }
            self.count_push(resources.iter().map(|r| r.name.clone()));
            let resp = DeltaDiscoveryResponse {
                system_version_info: String::new(),
                resources,
                type_url: SECRET_TYPE_URL.to_owned(),
                nonce: self.nonce(),
                removed_resources: vec![],
            };
            let generation = snap.1.as_ref().and_then(|r| r.generation);
            if let Some(g) =
                generation.filter(|_| resp.resources.iter().any(|r| is_bundle_name(&r.name)))
            {
                if pending.len() >= MAX_PENDING_ACKS {
                    pending.pop_front();
                }
                pending.push_back((resp.nonce.clone(), g));
            }
            if tx.send(Ok(resp)).await.is_err() {
                return;
            }
        }
    }
}

/// Whether the subscribed names differ between the last response and this
/// one (the version string starts each entry with the name).
fn names_changed(last_version: &Option<String>, version_info: &str) -> bool {
    let names = |v: &str| {
        v.split(';')
            .map(|e| e.split('=').next().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    };
    last_version.as_deref().map(names) != Some(names(version_info))
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

fn inline(bytes: &[u8]) -> DataSource {
    DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes.to_vec())),
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
            if let Some(resp) = self.sotw_response(&names, &self.snapshot())? {
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
