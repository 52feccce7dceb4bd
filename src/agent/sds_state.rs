//! What one SDS stream decides, without the stream: the per-stream state
//! machines behind [`super::sds`]'s loops, pure and synchronous so that
//! tests and the fuzzer (`fuzz/fuzz_targets/sds_streams.rs`) drive them
//! directly.
//!
//! A stream is fed its requests and every change of the certificate or the
//! bundle, each with the [`Snapshot`] current at that instant (an expired
//! certificate already left out), and answers with a [`Step`]: what to do
//! with the stream ([`Action`]: nothing, send a response, or end it with a
//! [`Refusal`]) and the side effects its loop performs ([`Effects`]: a NACK
//! seen, a bundle generation ACKed, whether it subscribes to the bundle,
//! when the change an ACK acknowledges happened).
//!
//! [`SotwStream`] is the state-of-the-world protocol (`StreamSecrets`),
//! [`DeltaStream`] the incremental one (`DeltaSecrets`); their rules are in
//! [`super::sds`]'s module documentation.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;

use super::acks::is_bundle_name;
use super::bundle::RootBundle;
use super::workload::WorkloadCert;
use crate::identity::SpiffeId;
use crate::logsafe::peer;
use crate::proto::envoy::config::core::v3::{DataSource, data_source};
use crate::proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};

/// The type URL of every resource served.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The workload's certificate and key.
pub const DEFAULT: &str = "default";
/// The trust bundle.
pub const ROOTCA: &str = "ROOTCA";
/// Delta responses holding the bundle remembered per stream until ACKed.
const MAX_PENDING_ACKS: usize = 16;

/// The workload's certificate as served: only what SDS sends.
#[derive(Clone, Copy)]
pub struct CertView<'a> {
    /// Whose certificate it is.
    pub identity: &'a SpiffeId,
    /// Its opaque xDS version.
    pub version: &'a str,
    /// Leaf, then intermediates, PEM.
    pub chain_pem: &'a str,
    /// The leaf's private key, PEM.
    pub key_pem: &'a str,
}

impl fmt::Debug for CertView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertView")
            .field("identity", &self.identity)
            .field("version", &self.version)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The trust bundle as served.
#[derive(Clone, Copy, Debug)]
pub struct RootsView<'a> {
    /// Its opaque xDS version.
    pub version: &'a str,
    /// Every trusted root, PEM.
    pub pem: &'a str,
    /// The CA's generation of it, when known.
    pub generation: Option<u64>,
}

/// What exists at one instant: the certificate (absent before the first
/// one and once expired) and the bundle.
#[derive(Clone, Copy, Debug, Default)]
pub struct Snapshot<'a> {
    /// The certificate, if one exists and has not expired.
    pub cert: Option<CertView<'a>>,
    /// The trust bundle, if one exists.
    pub roots: Option<RootsView<'a>>,
}

impl<'a> Snapshot<'a> {
    /// The snapshot of `cert` (the caller leaves out an expired one) and
    /// `roots`.
    pub fn of(cert: Option<&'a WorkloadCert>, roots: Option<&'a RootBundle>) -> Self {
        Self {
            cert: cert.map(|c| CertView {
                identity: &c.identity,
                version: &c.version,
                chain_pem: &c.chain_pem,
                key_pem: &c.key_pem,
            }),
            roots: roots.map(|r| RootsView {
                version: &r.version,
                pem: &r.pem,
                generation: r.generation,
            }),
        }
    }
}

/// Response nonces, unique across the streams sharing the source.
#[derive(Debug, Default)]
pub struct Nonces(AtomicU64);

impl Nonces {
    /// A source starting at 0.
    pub fn new() -> Self {
        Self::default()
    }

    fn next(&self) -> String {
        self.0.fetch_add(1, Ordering::Relaxed).to_string()
    }
}

/// Why a stream ends.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The request names a type other than [`SECRET_TYPE_URL`]
    /// (`InvalidArgument`).
    WrongType {
        /// The status message.
        message: String,
    },
    /// More names than allowed (`ResourceExhausted`).
    TooManyNames {
        /// How many were named.
        requested: usize,
        /// The limit.
        max: usize,
    },
    /// A name this agent does not serve (`InvalidArgument`).
    UnknownName {
        /// The name.
        name: String,
    },
    /// Another identity's SPIFFE ID, or another trust domain's
    /// (`PermissionDenied`).
    OtherIdentity {
        /// The name asked for.
        name: String,
        /// The identity this socket serves.
        serves: String,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WrongType { message } => f.write_str(message),
            Self::TooManyNames { requested, max } => write!(
                f,
                "{requested} resource names requested; at most {max} per stream"
            ),
            Self::UnknownName { name } => write!(
                f,
                "unknown secret {name:?}: this agent serves \"default\", \"ROOTCA\" and the workload's SPIFFE ID"
            ),
            Self::OtherIdentity { name, serves } => {
                write!(f, "this socket serves {serves} only, not {name}")
            }
        }
    }
}

/// What the stream's loop must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action<R> {
    /// Nothing to send.
    Nothing,
    /// Send this response.
    Send(R),
    /// End the stream with this error.
    End(Refusal),
}

/// Side effects of a step, for the loop to perform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Effects<At> {
    /// The request was a NACK: the names subscribed when it came (SotW;
    /// empty for delta).
    pub nacked: Option<Vec<String>>,
    /// The proxy ACKed a response carrying this bundle generation.
    pub acked_generation: Option<u64>,
    /// Whether the stream now subscribes to the bundle (when it may have
    /// changed).
    pub subscribed_to_bundle: Option<bool>,
    /// An ACK of the response pushed for a change that happened then.
    pub ack_latency_since: Option<At>,
}

impl<At> Default for Effects<At> {
    fn default() -> Self {
        Self {
            nacked: None,
            acked_generation: None,
            subscribed_to_bundle: None,
            ack_latency_since: None,
        }
    }
}

/// One step of a stream: what to do and its side effects.
#[derive(Clone, Debug, PartialEq)]
pub struct Step<R, At = ()> {
    /// What to do with the stream.
    pub action: Action<R>,
    /// What to record.
    pub effects: Effects<At>,
}

impl<R, At> Step<R, At> {
    fn end(refusal: Refusal, effects: Effects<At>) -> Self {
        Self {
            action: Action::End(refusal),
            effects,
        }
    }
}

/// What a requested name refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Cert,
    Roots,
}

/// Maps a requested name to a resource kind. `Ok(None)`: cannot tell yet
/// (a SPIFFE ID before the first certificate).
fn classify(name: &str, snap: &Snapshot<'_>) -> Result<Option<Kind>, Refusal> {
    match name {
        DEFAULT => Ok(Some(Kind::Cert)),
        ROOTCA => Ok(Some(Kind::Roots)),
        id if id.starts_with("spiffe://") => match &snap.cert {
            Some(c) if c.identity.as_str() == id => Ok(Some(Kind::Cert)),
            // SPIRE names the bundle by the trust domain's ID.
            Some(c) if c.identity.trust_domain().id().as_str() == id => Ok(Some(Kind::Roots)),
            Some(c) => Err(Refusal::OtherIdentity {
                name: id.to_owned(),
                serves: c.identity.to_string(),
            }),
            None => Ok(None),
        },
        other => Err(Refusal::UnknownName {
            name: other.to_owned(),
        }),
    }
}

/// The resource for `name`: `Ok(None)` if it does not exist yet.
fn resource(
    name: &str,
    snap: &Snapshot<'_>,
) -> Result<Option<(String, prost_types::Any)>, Refusal> {
    let Some(kind) = classify(name, snap)? else {
        return Ok(None);
    };
    let (version, secret) = match kind {
        Kind::Cert => {
            let Some(c) = &snap.cert else { return Ok(None) };
            (
                c.version.to_owned(),
                secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: Some(inline(c.chain_pem.as_bytes())),
                    private_key: Some(inline(c.key_pem.as_bytes())),
                }),
            )
        }
        Kind::Roots => {
            let Some(r) = &snap.roots else {
                return Ok(None);
            };
            (
                r.version.to_owned(),
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

fn inline(bytes: &[u8]) -> DataSource {
    DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes.to_vec())),
    }
}

/// A state-of-the-world response for all `names`, or `Ok(None)` while any
/// of them does not exist yet. Every name is checked first: one that is
/// refused is refused even while another does not exist yet.
pub fn sotw_response(
    names: &BTreeSet<String>,
    snap: &Snapshot<'_>,
    nonces: &Nonces,
) -> Result<Option<DiscoveryResponse>, Refusal> {
    for name in names {
        classify(name, snap)?;
    }
    let mut resources = Vec::new();
    let mut versions = Vec::new();
    for name in names {
        let Some((version, any)) = resource(name, snap)? else {
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
        nonce: nonces.next(),
    }))
}

/// Refuses more than `max` names.
fn check_names(n: usize, max: usize) -> Result<(), Refusal> {
    if n > max {
        return Err(Refusal::TooManyNames { requested: n, max });
    }
    Ok(())
}

/// Whether the subscribed names differ between the last response and this
/// one (the version string starts each entry with the name).
fn names_changed(last_version: Option<&str>, version_info: &str) -> bool {
    let names = |v: &str| {
        v.split(';')
            .map(|e| e.split('=').next().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    };
    last_version.map(names) != Some(names(version_info))
}

/// One state-of-the-world stream. `At` marks when a change happened (the
/// loop's clock), handed back when the proxy ACKs the response it caused.
#[derive(Debug)]
pub struct SotwStream<At = ()> {
    max_names: usize,
    names: BTreeSet<String>,
    last_nonce: Option<String>,
    last_version: Option<String>,
    /// The generation of the bundle in the last response (when it held one
    /// with a generation).
    last_generation: Option<u64>,
    /// A response is due (new stream, new names, a change) but not sent
    /// yet, as a resource does not exist yet.
    due: bool,
    /// When the change behind the next response happened.
    changed_at: Option<At>,
    /// The response awaiting an ACK, and when its change happened.
    awaiting: Option<(String, At)>,
}

impl<At: Copy> SotwStream<At> {
    /// A new stream, refusing more than `max_names` names.
    pub fn new(max_names: usize) -> Self {
        Self {
            max_names,
            names: BTreeSet::new(),
            last_nonce: None,
            last_version: None,
            last_generation: None,
            due: false,
            changed_at: None,
            awaiting: None,
        }
    }

    /// The names the stream subscribes to.
    pub fn names(&self) -> &BTreeSet<String> {
        &self.names
    }

    /// A request from the proxy.
    pub fn request(
        &mut self,
        req: &DiscoveryRequest,
        snap: &Snapshot<'_>,
        nonces: &Nonces,
    ) -> Step<DiscoveryResponse, At> {
        let mut effects = Effects::default();
        if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
            let message = format!(
                "type {} is not served here; only {SECRET_TYPE_URL}",
                peer(&req.type_url)
            );
            return Step::end(Refusal::WrongType { message }, effects);
        }
        let requested: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        if let Err(r) = check_names(requested.len(), self.max_names) {
            return Step::end(r, effects);
        }
        // A rejection is always reported, even for a response that a newer
        // push has already superseded.
        if req.error_detail.is_some() {
            effects.nacked = Some(self.names.iter().cloned().collect());
        }
        if !req.response_nonce.is_empty() {
            if self.last_nonce.as_deref() != Some(req.response_nonce.as_str()) {
                tracing::debug!(nonce = %peer(&req.response_nonce), "stale nonce; ignored");
                return self.idle(effects);
            }
            tracing::debug!(nonce = %peer(&req.response_nonce), nack = req.error_detail.is_some(), "SDS response acknowledged");
            if let Some((_, at)) = self
                .awaiting
                .take()
                .filter(|(n, _)| *n == req.response_nonce && req.error_detail.is_none())
            {
                effects.ack_latency_since = Some(at);
            }
            if req.error_detail.is_none() {
                effects.acked_generation = self.last_generation;
            }
            // A NACK is not answered with the same secret again; a plain ACK
            // only matters if the names changed.
            if req.error_detail.is_some() || requested == self.names {
                return self.idle(effects);
            }
        }
        self.names = requested;
        effects.subscribed_to_bundle = Some(self.names.iter().any(|n| is_bundle_name(n)));
        self.due = true;
        self.respond(snap, nonces, effects)
    }

    /// The certificate or the bundle changed, at `at`.
    pub fn changed(
        &mut self,
        at: At,
        snap: &Snapshot<'_>,
        nonces: &Nonces,
    ) -> Step<DiscoveryResponse, At> {
        if !self.names.is_empty() {
            self.due = true;
            self.changed_at.get_or_insert(at);
        }
        self.respond(snap, nonces, Effects::default())
    }

    fn idle(&self, effects: Effects<At>) -> Step<DiscoveryResponse, At> {
        Step {
            action: Action::Nothing,
            effects,
        }
    }

    fn respond(
        &mut self,
        snap: &Snapshot<'_>,
        nonces: &Nonces,
        effects: Effects<At>,
    ) -> Step<DiscoveryResponse, At> {
        if !self.due || self.names.is_empty() {
            return self.idle(effects);
        }
        let resp = match sotw_response(&self.names, snap, nonces) {
            Err(r) => return Step::end(r, effects),
            // Stays due until the resources exist.
            Ok(None) => return self.idle(effects),
            Ok(Some(resp)) => resp,
        };
        self.due = false;
        // A change that leaves our resources as they were (the other watch
        // fired) is not pushed, unless the request itself asked for an
        // answer.
        if self.last_version.as_deref() == Some(resp.version_info.as_str())
            && self.last_nonce.is_some()
            && !names_changed(self.last_version.as_deref(), &resp.version_info)
        {
            self.changed_at = None;
            return self.idle(effects);
        }
        self.last_nonce = Some(resp.nonce.clone());
        self.last_version = Some(resp.version_info.clone());
        self.last_generation = snap
            .roots
            .as_ref()
            .and_then(|r| r.generation)
            .filter(|_| self.names.iter().any(|n| is_bundle_name(n)));
        if let Some(at) = self.changed_at.take() {
            self.awaiting = Some((resp.nonce.clone(), at));
        }
        Step {
            action: Action::Send(resp),
            effects,
        }
    }
}

/// One delta stream.
#[derive(Debug)]
pub struct DeltaStream {
    max_names: usize,
    subscribed: BTreeSet<String>,
    /// What the client holds, by name: the version we sent it (or it told
    /// us it had, on reconnect).
    held: BTreeMap<String, String>,
    first: bool,
    /// Responses carrying the bundle that await an ACK: nonce, generation.
    pending: VecDeque<(String, u64)>,
}

impl DeltaStream {
    /// A new stream, refusing more than `max_names` names.
    pub fn new(max_names: usize) -> Self {
        Self {
            max_names,
            subscribed: BTreeSet::new(),
            held: BTreeMap::new(),
            first: true,
            pending: VecDeque::new(),
        }
    }

    /// The names the stream subscribes to.
    pub fn subscribed(&self) -> &BTreeSet<String> {
        &self.subscribed
    }

    /// A request from the proxy.
    pub fn request(
        &mut self,
        req: &DeltaDiscoveryRequest,
        snap: &Snapshot<'_>,
        nonces: &Nonces,
    ) -> Step<DeltaDiscoveryResponse> {
        let mut effects = Effects::default();
        if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
            let message = format!("type {:?} is not served here", peer(&req.type_url));
            return Step::end(Refusal::WrongType { message }, effects);
        }
        if self.first {
            // What the client says it holds is bounded like what it
            // subscribes to.
            if let Err(r) = check_names(req.initial_resource_versions.len(), self.max_names) {
                return Step::end(r, effects);
            }
            self.held.extend(req.initial_resource_versions.clone());
            self.first = false;
        }
        if req.error_detail.is_some() {
            effects.nacked = Some(Vec::new());
        } else if let Some(i) = self
            .pending
            .iter()
            .position(|(n, _)| *n == req.response_nonce)
        {
            effects.acked_generation = self.pending.get(i).map(|(_, g)| *g);
            self.pending.drain(..=i);
        }
        for name in &req.resource_names_unsubscribe {
            self.subscribed.remove(name);
            self.held.remove(name);
        }
        for name in &req.resource_names_subscribe {
            // A (re-)subscription must be answered unless the client told
            // us, in this stream's first message, that it already holds the
            // current version.
            if !req.initial_resource_versions.contains_key(name) {
                self.held.remove(name);
            }
            self.subscribed.insert(name.clone());
        }
        if let Err(r) = check_names(self.subscribed.len(), self.max_names) {
            return Step::end(r, effects);
        }
        effects.subscribed_to_bundle = Some(self.subscribed.iter().any(|n| is_bundle_name(n)));
        self.respond(snap, nonces, effects)
    }

    /// The certificate or the bundle changed.
    pub fn changed(
        &mut self,
        snap: &Snapshot<'_>,
        nonces: &Nonces,
    ) -> Step<DeltaDiscoveryResponse> {
        self.respond(snap, nonces, Effects::default())
    }

    fn respond(
        &mut self,
        snap: &Snapshot<'_>,
        nonces: &Nonces,
        effects: Effects<()>,
    ) -> Step<DeltaDiscoveryResponse> {
        let mut resources = Vec::new();
        for name in &self.subscribed {
            match resource(name, snap) {
                Err(r) => return Step::end(r, effects),
                Ok(None) => {}
                Ok(Some((version, any))) => {
                    if self.held.get(name) != Some(&version) {
                        self.held.insert(name.clone(), version.clone());
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
            return Step {
                action: Action::Nothing,
                effects,
            };
        }
        let resp = DeltaDiscoveryResponse {
            system_version_info: String::new(),
            resources,
            type_url: SECRET_TYPE_URL.to_owned(),
            nonce: nonces.next(),
            removed_resources: vec![],
        };
        let generation = snap.roots.as_ref().and_then(|r| r.generation);
        if let Some(g) =
            generation.filter(|_| resp.resources.iter().any(|r| is_bundle_name(&r.name)))
        {
            if self.pending.len() >= MAX_PENDING_ACKS {
                self.pending.pop_front();
            }
            self.pending.push_back((resp.nonce.clone(), g));
        }
        Step {
            action: Action::Send(resp),
            effects,
        }
    }
}

#[cfg(test)]
#[path = "sds_state_tests.rs"]
mod tests;
