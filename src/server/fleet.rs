//! What the CA knows about who holds what: the agents on the bundle watch
//! (which bundle their proxies ACKed, which leaves they serve), and a
//! ledger of leaves issued to other clients. Rotation steps are gated on it
//! (`crate::ca::rotation`); the bundle watch itself is `super::watch`.
//!
//! An agent is named by who it authenticated as and the name it gave in
//! its first report, fixed for the stream: a workload can only speak for
//! agents under its own identity. What a stream reports is its own (several
//! streams under one name: the lowest ACK and every leaf count), and an
//! ACK is never counted above the generation that stream was sent. An agent
//! whose stream closed is remembered, and counted, while a leaf it reported
//! may still be valid; the whole view is saved with the ledger, so a
//! restarted CA counts the agents it knew until they reconnect.

use crate::ca::bundle::{from_unix, unix};
use crate::sync::LockExt;
use crate::sync::RwLockExt;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::ca::AuthoritySet;
use crate::ca::bundle::verify_path;
use crate::ca::rotation::{AgentView, Copies, CopyCounter, Evidence, Ledger};
use crate::proto::workloadca::AgentReport;

/// Longest agent name kept (longer ones are cut).
const MAX_AGENT_NAME: usize = 253;
/// Most leaves one report may carry.
const MAX_REPORTED_LEAVES: usize = 1024;
/// Most agents remembered in all, and per caller identity: streams beyond
/// get no say in the gates (and are logged).
const MAX_AGENTS: usize = 100_000;
const MAX_AGENTS_PER_IDENTITY: usize = 10_000;

/// An agent: the identity it authenticated as, and its name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct AgentKey {
    /// The SPIFFE ID the agent authenticated as.
    pub identity: String,
    /// The name the agent reports (its node).
    pub name: String,
}

impl AgentKey {
    fn shown(&self) -> String {
        format!("{} ({})", self.name, self.identity)
    }
}

/// What one agent (or one stream of it) last reported.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Held {
    /// The lowest generation every proxy subscribed to the bundle has ACKed.
    pub acked_generation: u64,
    /// The bundle generation the agent holds.
    pub bundle_generation: u64,
    /// Proxy streams subscribed to the trust bundle.
    pub proxies: u32,
    /// Authority id -> latest NotAfter (Unix seconds) of the leaves it
    /// serves, each checked against the authority's signer.
    pub leaves: BTreeMap<String, u64>,
    /// Leaves verified as ours.
    pub leaf_count: usize,
}

impl Held {
    fn merge(&mut self, other: &Held) {
        self.acked_generation = self.acked_generation.min(other.acked_generation);
        self.bundle_generation = self.bundle_generation.min(other.bundle_generation);
        self.proxies = self.proxies.saturating_add(other.proxies);
        self.leaf_count = self.leaf_count.saturating_add(other.leaf_count);
        for (id, until) in &other.leaves {
            let e = self.leaves.entry(id.clone()).or_insert(*until);
            *e = (*e).max(*until);
        }
    }

    fn live(&self, now: u64) -> bool {
        self.leaves.values().any(|u| *u > now)
    }
}

/// One open bundle watch.
#[derive(Debug)]
struct Stream {
    key: Option<AgentKey>,
    /// The connection it is on: it clears only the claims of leaves issued
    /// over that connection.
    peer: Option<std::net::SocketAddr>,
    /// The highest generation sent on it: ACKs above it are not believed.
    sent: u64,
    held: Held,
    /// Digest of the last reported leaves: unchanged leaves are not
    /// verified again.
    leaves_digest: Vec<u8>,
    /// Refused by the caps on agents: not counted, so no gate opens while
    /// it is open.
    refused: bool,
}

#[derive(Debug, Default)]
struct Inner {
    streams: BTreeMap<u64, Stream>,
    next_stream: u64,
    /// Agents with no stream open, as last known.
    gone: BTreeMap<AgentKey, Held>,
    ledger: Ledger,
    dirty: bool,
    /// Leaves issued to callers that say they are our agents, by serial.
    /// Dropped when a watch on the connection the leaf went out on reports
    /// it; folded into the ledger when none does within [`CLAIM_WINDOW`].
    claimed: BTreeMap<String, Claim>,
    /// The verified leaves of every open stream, summed (kept as they
    /// change: every update sent reads it).
    leaf_total: usize,
}

/// A leaf claimed by an agent, until its watch reports it.
#[derive(Debug)]
struct Claim {
    /// The connection it was issued over.
    peer: Option<std::net::SocketAddr>,
    generation: u64,
    authority: String,
    issued: SystemTime,
    not_after: SystemTime,
}

/// How long a leaf claimed by an agent may go unreported before it counts
/// as held by a client that does not report.
pub const CLAIM_WINDOW: Duration = Duration::from_secs(30);
/// Most claimed leaves kept apart; beyond, they go to the ledger at once.
const MAX_CLAIMED: usize = 100_000;

impl Inner {
    /// Claims older than the window go to the ledger.
    fn fold_claims(&mut self, now: SystemTime, all: bool) {
        let stale: Vec<String> = self
            .claimed
            .iter()
            .filter(|(_, c)| {
                all || now.duration_since(c.issued).unwrap_or_default() >= CLAIM_WINDOW
            })
            .map(|(serial, _)| serial.clone())
            .collect();
        for serial in stale {
            if let Some(c) = self.claimed.remove(&serial) {
                self.ledger
                    .record(c.generation, &c.authority, c.issued, c.not_after);
                self.dirty = true;
            }
        }
    }

    /// Every agent: open streams merged per key, then the gone ones.
    fn agents(&self) -> BTreeMap<AgentKey, (bool, Held)> {
        let mut out: BTreeMap<AgentKey, (bool, Held)> = BTreeMap::new();
        for s in self.streams.values() {
            let Some(key) = &s.key else { continue };
            match out.get_mut(key) {
                Some((_, h)) => h.merge(&s.held),
                None => {
                    out.insert(key.clone(), (true, s.held.clone()));
                }
            }
        }
        for (key, held) in &self.gone {
            out.entry(key.clone())
                .or_insert_with(|| (false, held.clone()));
        }
        out
    }

    fn prune(&mut self, now: SystemTime) {
        let now = unix(now);
        let before = self.gone.len();
        self.gone.retain(|_, h| h.live(now));
        self.dirty |= self.gone.len() != before;
    }
}

/// What is saved between runs: the ledger, the agents, and whether the run
/// ended cleanly (a crash may have lost the last seconds of issuance).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Saved {
    /// Leaves issued, per authority and generation.
    pub ledger: Ledger,
    /// Each agent and its last report.
    #[serde(default)]
    pub agents: Vec<(AgentKey, Held)>,
    /// Whether the run that saved this ended cleanly.
    pub clean: bool,
}

impl Saved {
    /// What was recorded above `generation` (the store went back) counts
    /// as nothing confirmed, issued before every generation.
    pub fn clamped(mut self, generation: u64) -> Self {
        for (_, held) in &mut self.agents {
            if held.acked_generation > generation {
                held.acked_generation = 0;
                held.bundle_generation = 0;
            }
        }
        self.ledger.clamp(generation);
        self
    }
}

/// The CA's view of its clients.
#[derive(Debug)]
pub struct Fleet {
    inner: Mutex<Inner>,
    /// Bumped on every report, connect and disconnect: waiters (a rotation
    /// waiting for propagation) look again.
    changed: watch::Sender<u64>,
    /// Leaves to re-issue per second across the fleet, when an authority
    /// retires (sets the window agents spread their renewals over).
    reissue_rate: u32,
    /// Until then, gates stay closed: agents the CA did not know before a
    /// restart have time to reconnect.
    settle_until: SystemTime,
    /// Who counts the copies of the bundle the CA keeps itself.
    counters: std::sync::RwLock<Counters>,
}

/// The copy counters of [`Fleet::count_copies`].
#[derive(Default)]
struct Counters(Vec<CopyCounter>);

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} copy counters", self.0.len())
    }
}

/// One agent, for `status`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AgentStatus {
    /// The name the agent reports (its node).
    pub name: String,
    /// The SPIFFE ID the agent authenticated as.
    pub identity: String,
    /// Whether a bundle watch of it is open now.
    pub connected: bool,
    /// The bundle generation it holds.
    pub bundle_generation: u64,
    /// The lowest generation its subscribed proxies have ACKed.
    pub acked_generation: u64,
    /// Proxy streams subscribed to the trust bundle.
    pub proxies: u32,
    /// Leaves it reported serving.
    pub leaves: usize,
}

impl Fleet {
    /// A fleet from what was saved, its gates closed until `settle_until`.
    pub fn new(saved: Saved, reissue_rate: u32, settle_until: SystemTime) -> Self {
        Self {
            inner: Mutex::new(Inner {
                ledger: saved.ledger,
                gone: saved.agents.into_iter().collect(),
                ..Inner::default()
            }),
            changed: watch::channel(0).0,
            reissue_rate: reissue_rate.max(1),
            settle_until,
            counters: std::sync::RwLock::default(),
        }
    }

    /// Counts copies of the bundle in every evidence from now on.
    pub fn count_copies(&self, counter: CopyCounter) {
        self.counters.write_locked().0.push(counter);
    }

    fn copies(&self, now: SystemTime) -> Vec<Copies> {
        self.counters
            .read_locked()
            .0
            .iter()
            .map(|c| c(now))
            .collect()
    }

    /// The state, even after a panic while it was held: what it holds is
    /// still the best evidence there is (an empty view would open every
    /// gate).
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.locked()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> Option<T> {
        let mut inner = self.lock();
        let out = f(&mut inner);
        drop(inner);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        Some(out)
    }

    /// Woken on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A leaf that holds only retirement (see `ca::Tracked::RetireOnly`).
    pub fn record_for_retire(&self, authority: &str, issued: SystemTime, not_after: SystemTime) {
        let mut inner = self.inner.locked();
        inner.ledger.record_for_retire(authority, issued, not_after);
        inner.dirty = true;
    }

    /// A leaf issued to a client that is not one of our agents.
    pub fn record_issued(
        &self,
        generation: u64,
        authority: &str,
        issued: SystemTime,
        not_after: SystemTime,
    ) {
        let mut inner = self.inner.locked();
        inner
            .ledger
            .record(generation, authority, issued, not_after);
        inner.dirty = true;
    }

    /// A leaf issued to a caller that says it is one of our agents, whose
    /// watch is not open (yet): kept apart until its agent reports it.
    pub fn claim(
        &self,
        serial_hex: &str,
        peer: Option<std::net::SocketAddr>,
        generation: u64,
        authority: &str,
        issued: SystemTime,
        not_after: SystemTime,
    ) {
        {
            let mut inner = self.lock();
            if inner.claimed.len() >= MAX_CLAIMED {
                inner
                    .ledger
                    .record(generation, authority, issued, not_after);
                inner.dirty = true;
                return;
            }
            inner.claimed.insert(
                serial_hex.to_owned(),
                Claim {
                    peer,
                    generation,
                    authority: authority.to_owned(),
                    issued,
                    not_after,
                },
            );
        }
    }

    /// What to save, if anything changed since the last call (`all`: the
    /// final save, every claim counted as unreported).
    pub fn to_save(&self, now: SystemTime, all: bool) -> Option<Saved> {
        let mut inner = self.lock();
        inner.fold_claims(now, all);
        inner.prune(now);
        inner.ledger.prune(now);
        if !inner.dirty && !all {
            return None;
        }
        inner.dirty = false;
        Some(Saved {
            ledger: inner.ledger.clone(),
            agents: inner
                .agents()
                .into_iter()
                .map(|(k, (_, h))| (k, h))
                .collect(),
            clean: false,
        })
    }

    /// The ledger as it is.
    pub fn ledger(&self) -> Ledger {
        self.lock().ledger.clone()
    }

    /// Everything a rotation step is decided on.
    pub fn evidence(&self, now: SystemTime) -> Evidence {
        let mut inner = self.lock();
        inner.prune(now);
        inner.fold_claims(now, false);
        // Claims not yet reported count as unreported leaves meanwhile.
        let mut ledger = inner.ledger.clone();
        for c in inner.claimed.values() {
            ledger.record(c.generation, &c.authority, c.issued, c.not_after);
        }
        Evidence {
            agents: inner
                .agents()
                .into_iter()
                .map(|(key, (connected, held))| AgentView {
                    name: key.shown(),
                    connected,
                    acked_generation: held.acked_generation,
                    leaves: held
                        .leaves
                        .iter()
                        .map(|(id, u)| (id.clone(), from_unix(*u)))
                        .collect(),
                })
                .collect(),
            ledger,
            settle_until: Some(self.settle_until).filter(|t| now < *t),
            uncounted: inner.streams.values().filter(|s| s.refused).count(),
            blocked: Vec::new(),
            copies: self.copies(now),
        }
    }

    /// Every agent known, for `status`.
    pub fn agents(&self) -> Vec<AgentStatus> {
        let inner = self.lock();
        inner
            .agents()
            .into_iter()
            .map(|(key, (connected, h))| AgentStatus {
                name: key.name,
                identity: key.identity,
                connected,
                bundle_generation: h.bundle_generation,
                acked_generation: h.acked_generation,
                proxies: h.proxies,
                leaves: h.leaf_count,
            })
            .collect()
    }

    /// A stream opened from `peer`; its id.
    pub(super) fn open(&self, peer: Option<std::net::SocketAddr>) -> u64 {
        self.with(|i| {
            let id = i.next_stream;
            i.next_stream += 1;
            i.streams.insert(
                id,
                Stream {
                    key: None,
                    peer,
                    sent: 0,
                    held: Held::default(),
                    leaves_digest: Vec::new(),
                    refused: false,
                },
            );
            id
        })
        .unwrap_or(u64::MAX)
    }

    /// Generation `g` was sent on stream `id`.
    pub(super) fn sent(&self, id: u64, g: u64) {
        if let Some(s) = self.lock().streams.get_mut(&id) {
            s.sent = s.sent.max(g);
        }
    }

    /// Stream `id` closed: what it reported is remembered under its agent
    /// while a leaf of it may be valid.
    pub(super) fn close(&self, id: u64) {
        self.with(|i| {
            let Some(s) = i.streams.remove(&id) else {
                return;
            };
            i.leaf_total -= s.held.leaf_count;
            let Some(key) = s.key else { return };
            let others = i.streams.values().any(|o| o.key.as_ref() == Some(&key));
            if !others {
                i.gone.insert(key, s.held);
                i.dirty = true;
            }
        });
    }

    /// A report on stream `id` from `identity`. Its name is fixed by the
    /// first report; a name beyond the caps is refused (`false`).
    pub(super) fn report(
        &self,
        id: u64,
        identity: &str,
        report: &AgentReport,
        set: &AuthoritySet,
        now: SystemTime,
    ) -> bool {
        // The leaves, verified outside the lock, and only when changed.
        let digest = leaves_digest(&report.leaves);
        let unchanged = self
            .lock()
            .streams
            .get(&id)
            .is_some_and(|s| s.key.is_some() && s.leaves_digest == digest);
        let mut checked: Option<(BTreeMap<String, u64>, usize, Vec<String>)> = None;
        if !unchanged {
            let mut leaves: BTreeMap<String, u64> = BTreeMap::new();
            let mut serials = Vec::new();
            let mut count = 0;
            for der in report.leaves.iter().take(MAX_REPORTED_LEAVES) {
                if let Some((authority, not_after, serial)) = issuer_of(der, set, now) {
                    let e = leaves.entry(authority).or_insert(not_after);
                    *e = (*e).max(not_after);
                    serials.push(serial);
                    count += 1;
                }
            }
            checked = Some((leaves, count, serials));
        }
        self.with(|i| {
            // The caps are counted once per stream, at its first report:
            // later reports cost no scan of the fleet.
            let naming = i.streams.get(&id).is_some_and(|s| s.key.is_none());
            let (known, per_identity) = if naming {
                let per_identity = i
                    .streams
                    .values()
                    .filter_map(|s| s.key.as_ref())
                    .chain(i.gone.keys())
                    .filter(|k| k.identity == identity)
                    .count();
                (i.gone.len() + i.streams.len(), per_identity)
            } else {
                (0, 0)
            };
            let Some(stream) = i.streams.get_mut(&id) else {
                return false;
            };
            if stream.key.is_none() {
                let key = AgentKey {
                    identity: identity.to_owned(),
                    name: agent_name(&report.agent, identity),
                };
                let fresh = !i.gone.contains_key(&key);
                if fresh && (known >= MAX_AGENTS || per_identity >= MAX_AGENTS_PER_IDENTITY) {
                    stream.refused = true;
                    return false;
                }
                stream.key = Some(key);
            }
            let sent = stream.sent;
            stream.held.acked_generation = report.acked_generation.min(sent);
            stream.held.bundle_generation = report.bundle_generation.min(sent);
            stream.held.proxies = report.proxies;
            let mut serials = Vec::new();
            if let Some((leaves, count, s)) = checked {
                i.leaf_total = i.leaf_total - stream.held.leaf_count + count;
                stream.held.leaves = leaves;
                stream.held.leaf_count = count;
                stream.leaves_digest = digest;
                serials = s;
            }
            if let Some(key) = stream.key.clone() {
                i.gone.remove(&key);
            }
            i.dirty = true;
            let peer = stream.peer;
            for serial in &serials {
                if i.claimed.get(serial).is_some_and(|c| c.peer == peer) {
                    i.claimed.remove(serial);
                }
            }
            true
        })
        .unwrap_or(false)
    }

    /// How soon agents should replace leaves of a retiring authority: the
    /// leaves they reported (verified), at the configured rate, at least
    /// 5 seconds.
    pub(super) fn reissue_window(&self) -> u32 {
        let leaves = self.lock().leaf_total;
        let secs = u32::try_from(leaves).unwrap_or(u32::MAX) / self.reissue_rate;
        secs.clamp(5, 3600)
    }
}

fn leaves_digest(leaves: &[Vec<u8>]) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for l in leaves.iter().take(MAX_REPORTED_LEAVES) {
        ctx.update(&(l.len() as u64).to_be_bytes());
        ctx.update(l);
    }
    ctx.finish().as_ref().to_vec()
}

/// Which authority of `set` issued a leaf, when the leaf expires (Unix
/// seconds), and its serial (hex, as [`crate::ca::Issued`] names it).
fn issuer_of(der: &[u8], set: &AuthoritySet, now: SystemTime) -> Option<(String, u64, String)> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let not_after = unix(crate::ca::bundle::not_after(&cert));
    let raw = cert.raw_serial();
    let raw = raw
        .strip_prefix(&[0u8])
        .filter(|r| !r.is_empty())
        .unwrap_or(raw);
    let serial = crate::ca::bundle::hex(raw);
    set.members().iter().find_map(|m| {
        verify_path(
            der,
            &[],
            &[m.authority.signer().der()],
            now,
            webpki::KeyUsage::client_auth(),
        )
        .ok()
        .map(|()| (m.authority.id().to_owned(), not_after, serial.clone()))
    })
}

/// The agent's name as reported, cut and made printable; its caller's
/// identity when it sent none.
fn agent_name(reported: &str, caller: &str) -> String {
    let name: String = reported
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_AGENT_NAME)
        .collect();
    if name.is_empty() {
        caller.to_owned()
    } else {
        name
    }
}

/// How often the ledger and the agents are saved while they change.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(5);

/// What was saved of the fleet and the ledger. When the last run did not
/// end cleanly (or left nothing although the CA existed), the leaves it may
/// have issued unrecorded are assumed valid for the longest lifetime issued,
/// from every authority, before every generation.
pub(crate) fn load(
    path: &std::path::Path,
    ca_created: bool,
    authorities: &[String],
    generation: u64,
    max_ttl: Duration,
    now: SystemTime,
) -> Saved {
    let ids: Vec<&str> = authorities.iter().map(String::as_str).collect();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e,
                "cannot read the issuance ledger: assuming the last certificates of every authority are still valid for rotation gates");
            None
        }
    };
    let saved = text
        .and_then(|t| match serde_json::from_str::<Saved>(&t) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, assumed = assumption(ca_created),
                    "the issuance ledger is corrupt and is ignored");
                None
            }
        })
        // Saved under generations the store no longer has (restored from
        // an older backup): those numbers mean other bundles now.
        .map(|s| s.clamped(generation));
    match saved {
        Some(s) if s.clean => s,
        Some(mut s) => {
            tracing::warn!(
                "the last run did not stop cleanly: assuming its last certificates are still valid for rotation gates"
            );
            s.ledger.assume_lost(&ids, now, max_ttl);
            s
        }
        None if ca_created => Saved::default(),
        None => {
            let mut s = Saved::default();
            s.ledger.assume_lost(&ids, now, max_ttl);
            s
        }
    }
}

/// What is assumed in place of a ledger that cannot be used.
fn assumption(ca_created: bool) -> &'static str {
    if ca_created {
        "nothing: the CA was just created, so it issued nothing before"
    } else {
        "the last certificates of every authority are still valid, for the rotation gates"
    }
}

/// Saves `saved` atomically (0600), marked unclean unless it says so.
pub(crate) async fn save(path: &std::path::Path, saved: &Saved) {
    let Ok(text) = serde_json::to_string(saved) else {
        return;
    };
    let at = path.to_owned();
    let written = tokio::task::spawn_blocking(move || {
        crate::ca::store::atomic_write(&at, text.as_bytes(), 0o600)
    })
    .await;
    let why = match written {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    tracing::error!(path = %path.display(), error = %why, "saving the issuance ledger and agents failed");
}

pub(crate) fn spawn_saver(
    fleet: std::sync::Arc<Fleet>,
    path: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SAVE_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
            if let Some(saved) = fleet.to_save(SystemTime::now(), false) {
                save(&path, &saved).await;
            }
        }
    })
}

/// Where [`Saved`] is kept in `state_dir`.
pub fn saved_path(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("issued.json")
}

#[cfg(test)]
#[path = "fleet_tests.rs"]
mod tests;
