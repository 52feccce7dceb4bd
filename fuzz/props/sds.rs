//! SDS streams property, shared by `fuzz_targets/sds_streams.rs` and
//! `tests/properties.rs`: whatever the requests on any number of state of
//! the world and delta streams (any names, right, stale or garbage nonces,
//! ACKs and NACKs) and whatever happens to the certificate (rotated,
//! expired, another identity's) and the bundle, a stream is only ever sent
//! resources it subscribes to; a private key only for `default` or the
//! workload's own SPIFFE ID, only the current one (matching its chain's
//! leaf) and never an expired one; the bundle, never a key, for `ROOTCA` or
//! the trust domain's ID; another identity's ID ends the stream with
//! permission denied. Delta never re-sends a version the client holds;
//! SotW always holds the current state once it exists. An ACK is reported
//! only for the bundle generation the ACKed response carried.
//!
//! The oracle below derives all of this from the requests and the world
//! alone; it looks at the implementation only through what it sends (the
//! decoded `Any`s) and the effects it reports.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use prost::Message;
use workload_ca::agent::bundle::RootBundle;
use workload_ca::agent::sds_state::{
    Action, CertView, DeltaStream, Effects, Nonces, Refusal, RootsView, SECRET_TYPE_URL, Snapshot,
    SotwStream,
};
use workload_ca::proto::envoy::config::core::v3::{DataSource, data_source};
use workload_ca::proto::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use workload_ca::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};

use super::sds_events::{
    Event, Issued, MAX_NAMES, MAX_STREAMS, Name, NonceSel, Observed, Pool, VersionSel,
    check_key_matches_leaf, inline, is_bundle, req_nack,
};

/// What the oracle expects a name to be served as, now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Key,
    Bundle,
    /// A SPIFFE ID, before a (valid) certificate tells whose it is.
    Unknown,
    Denied,
    Invalid,
}

/// What a SotW stream received last, by name: the secret as decoded.
type Contents = BTreeMap<String, secret::Type>;

struct SotwModel {
    machine: SotwStream<u32>,
    subscribed: BTreeSet<String>,
    last: Option<(String, Contents)>,
    /// Per nonce sent: the bundle generation the response carried.
    generations: BTreeMap<String, Option<u64>>,
    /// Whether the stream last said it subscribes to the bundle (what the
    /// rotation gate counts).
    bundle_reported: bool,
}

struct DeltaModel {
    machine: DeltaStream,
    subscribed: BTreeSet<String>,
    holds: BTreeMap<String, String>,
    first: bool,
    last_nonce: Option<String>,
    generations: BTreeMap<String, Option<u64>>,
    /// As [`SotwModel::bundle_reported`].
    bundle_reported: bool,
}

enum Stream {
    Sotw(Box<SotwModel>),
    Delta(Box<DeltaModel>),
}

/// The world: the certificate, the bundle, the streams and their models.
pub struct World<'p> {
    pool: &'p Pool,
    cert: Option<usize>,
    expired: bool,
    roots: Option<RootBundle>,
    nonces: Nonces,
    streams: Vec<Stream>,
    /// Every nonce sent, in order.
    sent_nonces: Vec<String>,
    seen: HashSet<String>,
    clock: u32,
}

impl<'p> World<'p> {
    /// No certificate, no bundle, no stream.
    pub fn new(pool: &'p Pool) -> Self {
        Self {
            pool,
            cert: None,
            expired: false,
            roots: None,
            nonces: Nonces::new(),
            streams: Vec::new(),
            sent_nonces: Vec::new(),
            seen: HashSet::new(),
            clock: 0,
        }
    }

    /// The valid certificate, if any.
    fn valid_cert(&self) -> Option<&'p Issued> {
        let pool: &'p Pool = self.pool;
        self.cert
            .filter(|_| !self.expired)
            .and_then(|i| pool.certs.get(i))
    }

    fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            cert: self.valid_cert().map(|c| CertView {
                identity: &c.identity,
                version: &c.version,
                chain_pem: &c.chain_pem,
                key_pem: &c.key_pem,
            }),
            roots: self.roots.as_ref().map(|r| RootsView {
                version: &r.version,
                pem: &r.pem,
                generation: r.generation,
            }),
        }
    }

    fn expect(&self, name: &str) -> Expect {
        match name {
            "default" => Expect::Key,
            "ROOTCA" => Expect::Bundle,
            n if n.starts_with("spiffe://") => {
                let Some(c) = self.valid_cert() else {
                    return Expect::Unknown;
                };
                let own = c.identity.as_str();
                let td = own
                    .strip_prefix("spiffe://")
                    .and_then(|rest| rest.split('/').next())
                    .map(|td| format!("spiffe://{td}"));
                if n == own {
                    Expect::Key
                } else if Some(n) == td.as_deref() {
                    Expect::Bundle
                } else {
                    Expect::Denied
                }
            }
            _ => Expect::Invalid,
        }
    }

    /// The current content and version of `name`, if it exists and is
    /// served.
    fn current(&self, name: &str) -> Option<(secret::Type, String)> {
        match self.expect(name) {
            Expect::Key => {
                let c = self.valid_cert()?;
                let t = secret::Type::TlsCertificate(
                    workload_ca::proto::envoy::extensions::transport_sockets::tls::v3::TlsCertificate {
                        certificate_chain: Some(DataSource {
                            specifier: Some(data_source::Specifier::InlineBytes(
                                c.chain_pem.clone().into_bytes(),
                            )),
                        }),
                        private_key: Some(DataSource {
                            specifier: Some(data_source::Specifier::InlineBytes(
                                c.key_pem.clone().into_bytes(),
                            )),
                        }),
                    },
                );
                Some((t, c.version.clone()))
            }
            Expect::Bundle => {
                let r = self.roots.as_ref()?;
                let t = secret::Type::ValidationContext(
                    workload_ca::proto::envoy::extensions::transport_sockets::tls::v3::CertificateValidationContext {
                        trusted_ca: Some(DataSource {
                            specifier: Some(data_source::Specifier::InlineBytes(
                                r.pem.clone().into_bytes(),
                            )),
                        }),
                    },
                );
                Some((t, r.version.clone()))
            }
            _ => None,
        }
    }

    /// Checks one resource sent for `name` (already known subscribed):
    /// what it is, that it is current, and a key's match with its leaf.
    /// Returns the decoded secret and whether it held a key.
    pub fn check_resource(
        &self,
        name: &str,
        any_type: &str,
        value: &[u8],
    ) -> Result<(secret::Type, bool), String> {
        if any_type != SECRET_TYPE_URL {
            return Err(format!("{name}: resource of type {any_type}"));
        }
        let s = Secret::decode(value).map_err(|e| format!("{name}: undecodable: {e}"))?;
        if s.name != name {
            return Err(format!("{name}: secret named {:?}", s.name));
        }
        let t = s.r#type.ok_or(format!("{name}: secret without a type"))?;
        let expect = self.expect(name);
        match (&t, expect) {
            (secret::Type::TlsCertificate(tls), Expect::Key) => {
                let c = self
                    .valid_cert()
                    .ok_or(format!("{name}: a key sent with no valid certificate"))?;
                let chain = inline(&tls.certificate_chain).ok_or("no chain")?;
                let key = inline(&tls.private_key).ok_or("no key")?;
                if chain != c.chain_pem.as_bytes() || key != c.key_pem.as_bytes() {
                    return Err(format!("{name}: not the current certificate and key"));
                }
                check_key_matches_leaf(chain, key, name)?;
                Ok((t, true))
            }
            (secret::Type::ValidationContext(v), Expect::Bundle) => {
                let r = self.roots.as_ref().ok_or("a bundle sent with none")?;
                if inline(&v.trusted_ca) != Some(r.pem.as_bytes()) {
                    return Err(format!("{name}: not the current bundle"));
                }
                Ok((t, false))
            }
            (_, e) => Err(format!("{name} ({e:?}) sent as {t:?}")),
        }
    }

    fn new_nonce(&mut self, nonce: &str) -> Result<(), String> {
        if nonce.is_empty() || !self.seen.insert(nonce.to_owned()) {
            return Err(format!("nonce {nonce:?} empty or reused"));
        }
        self.sent_nonces.push(nonce.to_owned());
        Ok(())
    }

    fn pick_nonce(&self, sel: &NonceSel, last: Option<&String>) -> String {
        match sel {
            NonceSel::Empty => String::new(),
            NonceSel::Last => last.cloned().unwrap_or_default(),
            NonceSel::Earlier(i) => {
                let n = self.sent_nonces.len();
                if n == 0 {
                    return String::new();
                }
                self.sent_nonces
                    .get(usize::from(*i) % n)
                    .cloned()
                    .unwrap_or_default()
            }
            NonceSel::Garbage(s) => s.clone(),
        }
    }

    fn stream_of(&mut self, delta: bool, i: u8) -> usize {
        let of_kind: Vec<usize> = (0..self.streams.len())
            .filter(|&k| matches!(self.streams.get(k), Some(Stream::Delta(_))) == delta)
            .collect();
        if of_kind.is_empty() {
            self.open(delta);
            return self.streams.len() - 1;
        }
        of_kind[usize::from(i) % of_kind.len()]
    }

    fn open(&mut self, delta: bool) {
        if self.streams.len() >= MAX_STREAMS {
            self.streams.remove(0);
        }
        self.streams.push(if delta {
            Stream::Delta(Box::new(DeltaModel {
                machine: DeltaStream::new(MAX_NAMES),
                subscribed: BTreeSet::new(),
                holds: BTreeMap::new(),
                first: true,
                last_nonce: None,
                generations: BTreeMap::new(),
                bundle_reported: false,
            }))
        } else {
            Stream::Sotw(Box::new(SotwModel {
                machine: SotwStream::new(MAX_NAMES),
                subscribed: BTreeSet::new(),
                last: None,
                generations: BTreeMap::new(),
                bundle_reported: false,
            }))
        });
    }

    /// Applies `event`, checking every response, refusal and effect.
    ///
    /// # Errors
    /// The property violated.
    pub fn apply(&mut self, event: &Event) -> Result<Observed, String> {
        self.clock += 1;
        let mut seen = Observed::default();
        match event {
            Event::Open(delta) => self.open(*delta),
            Event::Sotw {
                stream,
                names,
                nonce,
                nack,
                wrong_type,
            } => {
                let k = self.stream_of(false, *stream);
                self.sotw_request(k, names, nonce, *nack, *wrong_type, &mut seen)?;
            }
            Event::Delta {
                stream,
                subscribe,
                unsubscribe,
                initial,
                nonce,
                nack,
            } => {
                let k = self.stream_of(true, *stream);
                let req = self.delta_request(k, subscribe, unsubscribe, initial, nonce, *nack);
                self.delta_step(k, Some(&req), &mut seen)?;
            }
            Event::Rotate(i) => {
                self.cert = Some(usize::from(*i) % self.pool.certs.len());
                self.expired = false;
                self.changed(&mut seen)?;
            }
            Event::Expire => {
                self.expired = true;
                self.changed(&mut seen)?;
            }
            Event::Bundle(i, generation) => {
                let i = usize::from(*i) % self.pool.bundles.len();
                let pem = self.pool.bundles.get(i).cloned().unwrap_or_default();
                self.roots = Some(RootBundle::new(pem, generation.then_some(i as u64 + 1)));
                self.changed(&mut seen)?;
            }
        }
        Ok(seen)
    }

    /// Every stream is told of a change, in order.
    fn changed(&mut self, seen: &mut Observed) -> Result<(), String> {
        let mut k = 0;
        while k < self.streams.len() {
            let before = self.streams.len();
            match self.streams.get(k) {
                Some(Stream::Sotw(_)) => self.sotw_step(k, None, seen)?,
                _ => self.delta_step(k, None, seen)?,
            }
            if self.streams.len() == before {
                k += 1;
            }
        }
        Ok(())
    }

    /// A refusal must be justified by the stream's names now.
    fn check_refusal(&self, r: &Refusal, subscribed: &BTreeSet<String>) -> Result<(), String> {
        match r {
            Refusal::UnknownName { name }
                if subscribed.contains(name) && self.expect(name) == Expect::Invalid =>
            {
                Ok(())
            }
            Refusal::OtherIdentity { name, .. }
                if subscribed.contains(name) && self.expect(name) == Expect::Denied =>
            {
                Ok(())
            }
            other => Err(format!("unjustified refusal {other:?} of {subscribed:?}")),
        }
    }

    /// Whether the names must end the stream now.
    fn refused(&self, names: &BTreeSet<String>) -> bool {
        names
            .iter()
            .any(|n| matches!(self.expect(n), Expect::Denied | Expect::Invalid))
    }

    fn sotw_request(
        &mut self,
        k: usize,
        names: &[Name],
        nonce: &NonceSel,
        nack: bool,
        wrong_type: bool,
        seen: &mut Observed,
    ) -> Result<(), String> {
        let Some(Stream::Sotw(m)) = self.streams.get(k) else {
            return Err("no such stream".into());
        };
        let req = DiscoveryRequest {
            version_info: String::new(),
            node: None,
            resource_names: names.iter().map(Name::text).collect(),
            type_url: if wrong_type {
                "type.googleapis.com/envoy.config.cluster.v3.Cluster".into()
            } else {
                SECRET_TYPE_URL.into()
            },
            response_nonce: self.pick_nonce(nonce, m.last.as_ref().map(|(n, _)| n)),
            error_detail: req_nack(nack),
        };
        self.sotw_step(k, Some(&req), seen)
    }

    /// One SotW step (a request, or a change when `req` is `None`) and its
    /// checks.
    fn sotw_step(
        &mut self,
        k: usize,
        req: Option<&DiscoveryRequest>,
        seen: &mut Observed,
    ) -> Result<(), String> {
        let clock = self.clock;
        let Some(Stream::Sotw(mut m)) = self.take(k) else {
            return Err("no such stream".into());
        };
        let requested: BTreeSet<String> = req
            .map(|r| r.resource_names.iter().cloned().collect())
            .unwrap_or_default();
        // What the oracle expects: the subscription after this request, and
        // whether the stream must end.
        let mut must_end = None;
        let mut acked_nonce = None;
        if let Some(r) = req {
            let last = m.last.as_ref().map(|(n, _)| n.as_str());
            if r.type_url != SECRET_TYPE_URL {
                must_end = Some("wrong type");
            } else if requested.len() > MAX_NAMES {
                must_end = Some("too many names");
            } else if r.response_nonce.is_empty() {
                m.subscribed = requested.clone();
            } else if Some(r.response_nonce.as_str()) == last && r.error_detail.is_none() {
                // An ACK; a NACK or a stale nonce changes nothing.
                acked_nonce = Some(r.response_nonce.clone());
                m.subscribed = requested.clone();
            }
        }
        if must_end.is_none() && self.refused(&m.subscribed) {
            must_end = Some("a refused name");
        }
        let snap = self.snapshot();
        let step = match req {
            Some(r) => m.machine.request(r, &snap, &self.nonces),
            None => m.machine.changed(clock, &snap, &self.nonces),
        };
        let step_effects = step.effects.clone();
        match step.action {
            Action::End(r) => {
                match (&r, must_end) {
                    (Refusal::WrongType { .. }, Some("wrong type"))
                    | (Refusal::TooManyNames { .. }, Some("too many names")) => {}
                    _ => self.check_refusal(&r, &m.subscribed)?,
                }
                seen.ended.push(r);
                return Ok(()); // the stream is gone
            }
            _ if must_end.is_some() => {
                return Err(format!(
                    "SotW stream not ended ({must_end:?}) with {:?}",
                    m.subscribed
                ));
            }
            Action::Nothing => {}
            Action::Send(resp) => {
                let contents = self.check_sotw(&resp, &m.subscribed, seen)?;
                let generation = self
                    .roots
                    .as_ref()
                    .and_then(|r| r.generation)
                    .filter(|_| contents.keys().any(|n| is_bundle(n)));
                m.generations.insert(resp.nonce.clone(), generation);
                m.last = Some((resp.nonce, contents));
            }
        }
        self.check_effects(
            &step_effects,
            acked_nonce.as_deref(),
            &m.generations,
            &m.subscribed,
            req.map(|r| r.error_detail.is_some()),
            &mut m.bundle_reported,
            seen,
        )?;
        // Once every resource subscribed exists, the stream holds them.
        if !m.subscribed.is_empty() {
            let now: Option<Contents> = m
                .subscribed
                .iter()
                .map(|n| self.current(n).map(|(t, _)| (n.clone(), t)))
                .collect();
            if let Some(now) = now
                && m.last.as_ref().map(|(_, c)| c) != Some(&now)
            {
                return Err(format!(
                    "SotW stream of {:?} left without the current state",
                    m.subscribed
                ));
            }
        }
        self.streams.insert(k, Stream::Sotw(m));
        Ok(())
    }

    fn check_sotw(
        &mut self,
        resp: &DiscoveryResponse,
        subscribed: &BTreeSet<String>,
        seen: &mut Observed,
    ) -> Result<Contents, String> {
        if resp.type_url != SECRET_TYPE_URL {
            return Err(format!("response of type {}", resp.type_url));
        }
        self.new_nonce(&resp.nonce)?;
        let mut contents = Contents::new();
        let mut shown = Vec::new();
        for any in &resp.resources {
            let name = Secret::decode(any.value.as_slice())
                .map(|s| s.name)
                .map_err(|e| e.to_string())?;
            if !subscribed.contains(&name) {
                return Err(format!("{name} sent to a SotW stream of {subscribed:?}"));
            }
            let (t, key) = self.check_resource(&name, &any.type_url, &any.value)?;
            shown.push((name.clone(), key));
            if contents.insert(name.clone(), t).is_some() {
                return Err(format!("{name} sent twice in one response"));
            }
        }
        if contents.keys().ne(subscribed.iter()) {
            return Err(format!(
                "SotW response of {:?} for {subscribed:?}",
                contents.keys()
            ));
        }
        seen.sent.push(shown);
        Ok(contents)
    }

    /// Effects: an ACK only of a generation the ACKed response carried; the
    /// bundle subscription as the names say, reported after every request
    /// that left the stream open (a stream that never said so would let
    /// the rotation gate open without its proxy); a NACK reported exactly
    /// when the request was one. `request`: whether the step was a request,
    /// and a NACK.
    #[allow(clippy::too_many_arguments)]
    fn check_effects<At>(
        &self,
        e: &Effects<At>,
        acked_nonce: Option<&str>,
        generations: &BTreeMap<String, Option<u64>>,
        subscribed: &BTreeSet<String>,
        request: Option<bool>,
        bundle_reported: &mut bool,
        seen: &mut Observed,
    ) -> Result<(), String> {
        if let Some(g) = e.acked_generation {
            let carried = acked_nonce.and_then(|n| generations.get(n).copied().flatten());
            if carried != Some(g) {
                return Err(format!(
                    "generation {g} ACKed; the ACKed response carried {carried:?}"
                ));
            }
            seen.acked.push(g);
        }
        let wants_bundle = subscribed.iter().any(|n| is_bundle(n));
        if let Some(s) = e.subscribed_to_bundle {
            if request.is_none() || s != wants_bundle {
                return Err(format!("subscribed to the bundle: {s} for {subscribed:?}"));
            }
            *bundle_reported = s;
        }
        if let Some(nack) = request {
            if *bundle_reported != wants_bundle {
                return Err(format!(
                    "the stream subscribes to {subscribed:?} but last reported bundle subscription {bundle_reported}"
                ));
            }
            if e.nacked.is_some() != nack {
                return Err(format!(
                    "NACK reported {:?} for a request that was {}a NACK",
                    e.nacked.is_some(),
                    if nack { "" } else { "not " }
                ));
            }
        } else if e.nacked.is_some() {
            return Err("a NACK reported without a request".into());
        }
        Ok(())
    }

    fn delta_request(
        &mut self,
        k: usize,
        subscribe: &[Name],
        unsubscribe: &[Name],
        initial: &[(Name, VersionSel)],
        nonce: &NonceSel,
        nack: bool,
    ) -> DeltaDiscoveryRequest {
        let (first, last) = match self.streams.get(k) {
            Some(Stream::Delta(m)) => (m.first, m.last_nonce.clone()),
            _ => (false, None),
        };
        let initial = if first {
            initial
                .iter()
                .map(|(n, v)| {
                    let name = n.text();
                    let version = match v {
                        VersionSel::Current => {
                            self.current(&name).map(|(_, v)| v).unwrap_or_default()
                        }
                        VersionSel::Cert(i) => self
                            .pool
                            .certs
                            .get(usize::from(*i) % self.pool.certs.len())
                            .map(|c| c.version.clone())
                            .unwrap_or_default(),
                        VersionSel::Garbage(s) => s.clone(),
                    };
                    (name, version)
                })
                .collect()
        } else {
            Default::default()
        };
        DeltaDiscoveryRequest {
            node: None,
            type_url: SECRET_TYPE_URL.into(),
            resource_names_subscribe: subscribe.iter().map(Name::text).collect(),
            resource_names_unsubscribe: unsubscribe.iter().map(Name::text).collect(),
            initial_resource_versions: initial,
            response_nonce: self.pick_nonce(nonce, last.as_ref()),
            error_detail: req_nack(nack),
        }
    }

    /// One delta step (a request, or a change when `req` is `None`) and its
    /// checks.
    fn delta_step(
        &mut self,
        k: usize,
        req: Option<&DeltaDiscoveryRequest>,
        seen: &mut Observed,
    ) -> Result<(), String> {
        let Some(Stream::Delta(mut m)) = self.take(k) else {
            return Err("no such stream".into());
        };
        let mut must_end = None;
        let mut acked_nonce = None;
        if let Some(r) = req {
            if m.first {
                if r.initial_resource_versions.len() > MAX_NAMES {
                    must_end = Some("too many names");
                }
                m.holds.extend(r.initial_resource_versions.clone());
                m.first = false;
            }
            if r.error_detail.is_none() {
                acked_nonce = Some(r.response_nonce.clone());
            }
            for n in &r.resource_names_unsubscribe {
                m.subscribed.remove(n);
                m.holds.remove(n);
            }
            for n in &r.resource_names_subscribe {
                if !r.initial_resource_versions.contains_key(n) {
                    m.holds.remove(n);
                }
                m.subscribed.insert(n.clone());
            }
            if m.subscribed.len() > MAX_NAMES {
                must_end = Some("too many names");
            }
        }
        if must_end.is_none() && self.refused(&m.subscribed) {
            must_end = Some("a refused name");
        }
        let snap = self.snapshot();
        let step = match req {
            Some(r) => m.machine.request(r, &snap, &self.nonces),
            None => m.machine.changed(&snap, &self.nonces),
        };
        match step.action {
            Action::End(r) => {
                match (&r, must_end) {
                    (Refusal::TooManyNames { .. }, Some("too many names")) => {}
                    _ => self.check_refusal(&r, &m.subscribed)?,
                }
                seen.ended.push(r);
                return Ok(());
            }
            _ if must_end.is_some() => {
                return Err(format!(
                    "delta stream not ended ({must_end:?}) with {:?}",
                    m.subscribed
                ));
            }
            Action::Nothing => {}
            Action::Send(resp) => {
                let bundle = self.check_delta(&resp, &mut m, seen)?;
                let generation = self
                    .roots
                    .as_ref()
                    .and_then(|r| r.generation)
                    .filter(|_| bundle);
                m.generations.insert(resp.nonce.clone(), generation);
                m.last_nonce = Some(resp.nonce);
            }
        }
        self.check_effects(
            &step.effects,
            acked_nonce.as_deref(),
            &m.generations,
            &m.subscribed,
            req.map(|r| r.error_detail.is_some()),
            &mut m.bundle_reported,
            seen,
        )?;
        // Every subscribed resource that exists is held at its current
        // version.
        for n in &m.subscribed {
            if let Some((_, v)) = self.current(n)
                && m.holds.get(n) != Some(&v)
            {
                return Err(format!("delta stream left without {n} at {v}"));
            }
        }
        self.streams.insert(k, Stream::Delta(m));
        Ok(())
    }

    /// Returns whether the response carried the bundle.
    fn check_delta(
        &mut self,
        resp: &DeltaDiscoveryResponse,
        m: &mut DeltaModel,
        seen: &mut Observed,
    ) -> Result<bool, String> {
        if resp.type_url != SECRET_TYPE_URL {
            return Err(format!("response of type {}", resp.type_url));
        }
        self.new_nonce(&resp.nonce)?;
        if resp.resources.is_empty() || !resp.removed_resources.is_empty() {
            return Err("an empty delta response, or one removing".into());
        }
        let mut shown = Vec::new();
        let mut bundle = false;
        for r in &resp.resources {
            if !m.subscribed.contains(&r.name) {
                return Err(format!(
                    "{} sent to a delta stream of {:?}",
                    r.name, m.subscribed
                ));
            }
            let any = r.resource.as_ref().ok_or("a resource without its secret")?;
            let (_, key) = self.check_resource(&r.name, &any.type_url, &any.value)?;
            let (_, v) = self.current(&r.name).ok_or("sent but does not exist")?;
            if r.version != v {
                return Err(format!(
                    "{} sent as version {}, current {v}",
                    r.name, r.version
                ));
            }
            if m.holds.get(&r.name) == Some(&r.version) {
                return Err(format!(
                    "{} re-sent at {}, which the client holds",
                    r.name, r.version
                ));
            }
            m.holds.insert(r.name.clone(), r.version.clone());
            bundle |= !key;
            shown.push((r.name.clone(), key));
        }
        seen.sent.push(shown);
        Ok(bundle)
    }

    fn take(&mut self, k: usize) -> Option<Stream> {
        (k < self.streams.len()).then(|| self.streams.remove(k))
    }
}
