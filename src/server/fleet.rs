//! What the CA knows about who holds what: the agents connected to the
//! bundle watch (which bundle their proxies ACKed, which leaves they
//! serve), and a ledger of leaves issued to other clients. A rotation step
//! is gated on it (`crate::ca::rotation`).
//!
//! The bundle watch (`workloadca.v1.TrustBundleService/WatchBundle`): one
//! stream per agent, authenticated like `CreateCertificate`. The server
//! sends the bundle at once and on every change of the authorities, with
//! the retiring authorities' signers and how soon their leaves are to be
//! replaced; the agent reports back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::{AuthChain, AuthContext};
use super::status;
use crate::ca::bundle::verify_path;
use crate::ca::rotation::{AgentView, Evidence, Ledger};
use crate::ca::{AuthoritySet, AuthorityState};
use crate::logsafe::peer as peer_text;
use crate::proto::workloadca::trust_bundle_service_server::TrustBundleService;
use crate::proto::workloadca::{AgentReport, BundleUpdate};

/// Longest agent name kept (longer ones are cut).
const MAX_AGENT_NAME: usize = 253;
/// Most leaves one report may carry.
const MAX_REPORTED_LEAVES: usize = 1024;

/// One agent, as last reported.
#[derive(Debug, Clone, Default)]
struct Agent {
    streams: u32,
    acked_generation: u64,
    bundle_generation: u64,
    proxies: u32,
    /// Authority id -> latest NotAfter among the leaves it serves.
    leaves: BTreeMap<String, SystemTime>,
    leaf_count: usize,
}

#[derive(Debug, Default)]
struct Inner {
    agents: BTreeMap<String, Agent>,
    /// Connections (client address and port) with a bundle watch open:
    /// leaves issued over them are reported by their agent.
    watching: BTreeMap<std::net::SocketAddr, u32>,
    ledger: Ledger,
    ledger_dirty: bool,
    /// Leaves issued to callers that say they are our agents but had no
    /// bundle watch open on that connection yet (an agent's first request
    /// races its watch): serial -> (generation, authority, issued,
    /// NotAfter). Dropped when an agent reports the leaf; folded into the
    /// ledger when none does within [`CLAIM_WINDOW`].
    claimed: BTreeMap<String, (u64, String, SystemTime, SystemTime)>,
}

/// How long a leaf claimed by an agent may go unreported before it counts
/// as held by a client that does not report.
pub const CLAIM_WINDOW: Duration = Duration::from_secs(30);
/// Most claimed leaves kept apart; beyond, they go to the ledger at once.
const MAX_CLAIMED: usize = 100_000;

impl Inner {
    /// Claims older than the window go to the ledger.
    fn fold_claims(&mut self, now: SystemTime) {
        let stale: Vec<String> = self
            .claimed
            .iter()
            .filter(|(_, (_, _, issued, _))| {
                now.duration_since(*issued).unwrap_or_default() >= CLAIM_WINDOW
            })
            .map(|(serial, _)| serial.clone())
            .collect();
        for serial in stale {
            if let Some((g, a, issued, until)) = self.claimed.remove(&serial) {
                self.ledger.record(g, &a, issued, until);
                self.ledger_dirty = true;
            }
        }
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
}

/// One agent's confirmation, for `status`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AgentStatus {
    pub name: String,
    pub connected: bool,
    pub bundle_generation: u64,
    pub acked_generation: u64,
    pub proxies: u32,
    pub leaves: usize,
}

impl Fleet {
    pub fn new(ledger: Ledger, reissue_rate: u32) -> Self {
        Self {
            inner: Mutex::new(Inner {
                ledger,
                ..Inner::default()
            }),
            changed: watch::channel(0).0,
            reissue_rate: reissue_rate.max(1),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> Option<T> {
        let mut inner = self.inner.lock().ok()?;
        let out = f(&mut inner);
        drop(inner);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        Some(out)
    }

    /// Woken on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A leaf issued to a client that is not one of our agents.
    pub fn record_issued(
        &self,
        generation: u64,
        authority: &str,
        issued: SystemTime,
        not_after: SystemTime,
    ) {
        if let Ok(mut inner) = self.inner.lock() {
            inner
                .ledger
                .record(generation, authority, issued, not_after);
            inner.ledger_dirty = true;
        }
    }

    /// A leaf issued to a caller that says it is one of our agents, whose
    /// watch is not open (yet): kept apart until its agent reports it.
    pub fn claim(
        &self,
        serial_hex: &str,
        generation: u64,
        authority: &str,
        issued: SystemTime,
        not_after: SystemTime,
    ) {
        if let Ok(mut inner) = self.inner.lock() {
            if inner.claimed.len() >= MAX_CLAIMED {
                inner
                    .ledger
                    .record(generation, authority, issued, not_after);
                inner.ledger_dirty = true;
                return;
            }
            inner.claimed.insert(
                serial_hex.to_owned(),
                (generation, authority.to_owned(), issued, not_after),
            );
        }
    }

    /// The ledger, if it changed since the last call.
    pub fn ledger_to_save(&self, now: SystemTime) -> Option<Ledger> {
        let mut inner = self.inner.lock().ok()?;
        inner.fold_claims(now);
        if !inner.ledger_dirty {
            return None;
        }
        inner.ledger.prune(now);
        inner.ledger_dirty = false;
        Some(inner.ledger.clone())
    }

    /// The ledger as it is.
    pub fn ledger(&self) -> Ledger {
        self.inner
            .lock()
            .map(|i| i.ledger.clone())
            .unwrap_or_default()
    }

    /// Everything a rotation step is decided on.
    pub fn evidence(&self, now: SystemTime) -> Evidence {
        let Ok(mut inner) = self.inner.lock() else {
            return Evidence::default();
        };
        // A disconnected agent is remembered while a leaf it served may
        // still be valid (it may still be presenting it).
        inner
            .agents
            .retain(|_, a| a.streams > 0 || a.leaves.values().any(|t| *t > now));
        inner.fold_claims(now);
        // Claims not yet reported count as unreported leaves meanwhile.
        let mut ledger = inner.ledger.clone();
        for (g, a, issued, until) in inner.claimed.values() {
            ledger.record(*g, a, *issued, *until);
        }
        Evidence {
            agents: inner
                .agents
                .iter()
                .map(|(name, a)| AgentView {
                    name: name.clone(),
                    connected: a.streams > 0,
                    acked_generation: a.acked_generation,
                    leaves: a.leaves.clone(),
                })
                .collect(),
            ledger,
        }
    }

    /// Every agent known, for `status`.
    pub fn agents(&self) -> Vec<AgentStatus> {
        let Ok(inner) = self.inner.lock() else {
            return Vec::new();
        };
        inner
            .agents
            .iter()
            .map(|(name, a)| AgentStatus {
                name: name.clone(),
                connected: a.streams > 0,
                bundle_generation: a.bundle_generation,
                acked_generation: a.acked_generation,
                proxies: a.proxies,
                leaves: a.leaf_count,
            })
            .collect()
    }

    /// Whether a bundle watch is open on the connection from `peer`: an
    /// agent that reports what it holds (its CSRs travel on the same
    /// connection as its watch).
    pub fn is_watching(&self, peer: std::net::SocketAddr) -> bool {
        self.inner
            .lock()
            .is_ok_and(|i| i.watching.get(&peer).is_some_and(|n| *n > 0))
    }

    fn watch_opened(&self, peer: Option<std::net::SocketAddr>) {
        if let (Some(p), Ok(mut i)) = (peer, self.inner.lock()) {
            *i.watching.entry(p).or_default() += 1;
        }
    }

    fn watch_closed(&self, peer: Option<std::net::SocketAddr>) {
        if let (Some(p), Ok(mut i)) = (peer, self.inner.lock())
            && let Some(n) = i.watching.get_mut(&p)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                i.watching.remove(&p);
            }
        }
    }

    fn connect(&self, name: &str) {
        self.with(|i| i.agents.entry(name.to_owned()).or_default().streams += 1);
    }

    fn disconnect(&self, name: &str) {
        self.with(|i| {
            if let Some(a) = i.agents.get_mut(name) {
                a.streams = a.streams.saturating_sub(1);
            }
        });
    }

    fn report(&self, name: &str, report: &AgentReport, set: &AuthoritySet, now: SystemTime) {
        let mut leaves: BTreeMap<String, SystemTime> = BTreeMap::new();
        let mut serials = Vec::new();
        for der in report.leaves.iter().take(MAX_REPORTED_LEAVES) {
            if let Some((id, not_after, serial)) = issuer_of(der, set, now) {
                let e = leaves.entry(id).or_insert(not_after);
                *e = (*e).max(not_after);
                serials.push(serial);
            }
        }
        self.with(|i| {
            for serial in &serials {
                i.claimed.remove(serial);
            }
            let a = i.agents.entry(name.to_owned()).or_default();
            a.acked_generation = report.acked_generation;
            a.bundle_generation = report.bundle_generation;
            a.proxies = report.proxies;
            a.leaf_count = report.leaves.len().min(MAX_REPORTED_LEAVES);
            a.leaves = leaves;
        });
    }

    /// How soon agents should replace leaves of a retiring authority: the
    /// leaves they reported, at the configured rate, at least 5 seconds.
    fn reissue_window(&self) -> u32 {
        let leaves: usize = self
            .inner
            .lock()
            .map(|i| i.agents.values().map(|a| a.leaf_count).sum())
            .unwrap_or(0);
        let secs = u32::try_from(leaves).unwrap_or(u32::MAX) / self.reissue_rate;
        secs.clamp(5, 3600)
    }
}

/// Which authority of `set` issued a leaf, when the leaf expires, and its
/// serial (hex, as [`crate::ca::Issued`] names it).
fn issuer_of(
    der: &[u8],
    set: &AuthoritySet,
    now: SystemTime,
) -> Option<(String, SystemTime, String)> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let not_after = crate::ca::bundle::not_after(&cert);
    let raw = cert.raw_serial();
    let raw = raw
        .strip_prefix(&[0u8])
        .filter(|r| !r.is_empty())
        .unwrap_or(raw);
    let serial: String = raw.iter().map(|b| format!("{b:02x}")).collect();
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

/// The update for `set`.
pub fn update_for(set: &AuthoritySet, reissue_within_seconds: u32) -> BundleUpdate {
    BundleUpdate {
        generation: set.generation(),
        bundle_pem: set.bundle_pem().to_owned(),
        retiring_signers: set
            .members()
            .iter()
            .filter(|m| m.state == AuthorityState::Retiring)
            .map(|m| m.authority.signer().der().to_vec())
            .collect(),
        reissue_within_seconds,
    }
}

/// The bundle watch service.
pub struct BundleWatch {
    pub(crate) authorities: watch::Receiver<Arc<AuthoritySet>>,
    pub(crate) auth: AuthChain,
    pub(crate) fleet: Arc<Fleet>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<BundleUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl TrustBundleService for BundleWatch {
    type WatchBundleStream = UpdateStream;

    async fn watch_bundle(
        &self,
        request: Request<Streaming<AgentReport>>,
    ) -> Result<Response<Self::WatchBundleStream>, Status> {
        let now = SystemTime::now();
        let peer = request.remote_addr();
        let peer_certs = request.peer_certs();
        let ctx = AuthContext {
            metadata: request.metadata(),
            peer_certs: peer_certs.as_deref().map(Vec::as_slice),
            now,
        };
        let caller = match self.auth.authenticate(&ctx).await {
            Ok(c) => c,
            Err(_) => {
                tracing::debug!(?peer, "bundle watch: authentication failed");
                return Err(status::unauthenticated());
            }
        };
        let mut reports = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<BundleUpdate, Status>>(4);
        let mut authorities = self.authorities.clone();
        let fleet = self.fleet.clone();
        let mut shutdown = self.shutdown.clone();
        fleet.watch_opened(peer);
        tokio::spawn(async move {
            let mut name: Option<String> = None;
            let mut last_sent = 0;
            loop {
                let set = authorities.borrow_and_update().clone();
                if set.generation() != last_sent {
                    last_sent = set.generation();
                    if tx
                        .send(Ok(update_for(&set, fleet.reissue_window())))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                tokio::select! {
                    changed = authorities.changed() => if changed.is_err() { break },
                    report = reports.message() => match report {
                        Ok(Some(r)) => {
                            let agent = agent_name(&r.agent, &caller.identity.to_string());
                            if name.as_deref() != Some(agent.as_str()) {
                                if let Some(old) = name.take() {
                                    fleet.disconnect(&old);
                                }
                                tracing::info!(agent = %peer_text(&agent), caller = %caller.identity, ?peer, "agent watching the trust bundle");
                                fleet.connect(&agent);
                                name = Some(agent.clone());
                            }
                            let set = authorities.borrow().clone();
                            fleet.report(&agent, &r, &set, SystemTime::now());
                        }
                        Ok(None) | Err(_) => break,
                    },
                    _ = shutdown.changed() => break,
                    () = tx.closed() => break,
                }
            }
            if let Some(old) = name {
                fleet.disconnect(&old);
            }
            fleet.watch_closed(peer);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
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

/// Where the ledger is kept between runs, and whether the last run ended
/// cleanly (a crash may have lost the last few seconds of issuance).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SavedLedger {
    pub ledger: Ledger,
    pub clean: bool,
}

/// How often the ledger is saved while it changes.
pub const LEDGER_SAVE_INTERVAL: Duration = Duration::from_secs(5);

/// The ledger file in the state directory.
pub fn ledger_path(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("issued.json")
}
