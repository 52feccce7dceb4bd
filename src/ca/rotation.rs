//! The rules of a root rotation: when each step is safe, what is still
//! missing when it is not, and when an automatic rotation is due.
//!
//! Synchronous and clock-free like the rest of `ca`: the server gathers the
//! evidence (what agents confirmed, what it issued to other clients) and
//! asks here.
//!
//! - *activate* is safe once everything that will see a leaf of the new
//!   authority trusts its root: every connected agent's proxies have ACKed
//!   a bundle of the prepared generation or later, and no leaf issued to a
//!   client that is not one of our agents (an Istio agent learns the
//!   bundle only from its next answer) before the prepare is still valid.
//! - *retire* is safe once nothing still presents a leaf of the retiring
//!   authority: no agent reports one, and no leaf it issued to another
//!   client is still valid.
//! - Copies of the bundle the CA keeps itself (Kubernetes Secrets and
//!   ConfigMaps, a ClusterTrustBundle: [`Copies`]) hold both gates until
//!   every one of them holds what the set of the gate's generation calls
//!   for, and then for as long as their readers take to see a change (the
//!   kubelet's sync of mounted volumes).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::AuthoritySet;
use super::authorities::State;

/// Leaves issued to clients that do not report back (not our agents): per
/// bundle generation at issuance and per issuing authority, the latest
/// NotAfter. Small: one entry per generation and per authority.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ledger {
    /// Generation at issuance -> latest NotAfter (Unix seconds).
    by_generation: BTreeMap<u64, u64>,
    /// Authority id -> latest NotAfter (Unix seconds).
    by_authority: BTreeMap<String, u64>,
    /// The longest lifetime issued (seconds), for bounding what a crash
    /// may have lost.
    longest: u64,
}

impl Ledger {
    /// Records a leaf issued under `generation` by `authority`.
    pub fn record(
        &mut self,
        generation: u64,
        authority: &str,
        issued: SystemTime,
        not_after: SystemTime,
    ) {
        let until = unix(not_after);
        let g = self.by_generation.entry(generation).or_default();
        *g = (*g).max(until);
        match self.by_authority.get_mut(authority) {
            Some(a) => *a = (*a).max(until),
            None => {
                self.by_authority.insert(authority.to_owned(), until);
            }
        }
        self.longest = self.longest.max(until.saturating_sub(unix(issued)));
    }

    /// Records a leaf of `authority` that holds only retirement (its holder
    /// learns bundles from a counted copy, not from its certificate).
    pub fn record_for_retire(
        &mut self,
        authority: &str,
        issued: SystemTime,
        not_after: SystemTime,
    ) {
        let until = unix(not_after);
        match self.by_authority.get_mut(authority) {
            Some(a) => *a = (*a).max(until),
            None => {
                self.by_authority.insert(authority.to_owned(), until);
            }
        }
        self.longest = self.longest.max(until.saturating_sub(unix(issued)));
    }

    /// Until when a leaf issued before generation `generation` may be valid.
    pub fn issued_before(&self, generation: u64, now: SystemTime) -> Option<SystemTime> {
        let now = unix(now);
        self.by_generation
            .range(..generation)
            .map(|(_, until)| *until)
            .filter(|until| *until > now)
            .max()
            .map(from_unix)
    }

    /// Until when a leaf of `authority` may be valid.
    pub fn issued_by(&self, authority: &str, now: SystemTime) -> Option<SystemTime> {
        self.by_authority
            .get(authority)
            .filter(|until| **until > unix(now))
            .map(|u| from_unix(*u))
    }

    /// What may have been issued, unrecorded, before a crash noticed at
    /// `now`: by any of `authorities`, before any generation (generation
    /// 0), valid until `now` plus the longest lifetime issued so far (or
    /// `fallback` when nothing was ever recorded).
    pub fn assume_lost(&mut self, authorities: &[&str], now: SystemTime, fallback: Duration) {
        let longest = if self.longest == 0 {
            fallback
        } else {
            Duration::from_secs(self.longest)
        };
        for a in authorities {
            self.record(0, a, now, now + longest);
        }
    }

    /// Moves what was recorded above `generation` to generation 0 (before
    /// every generation): the store went back, and those numbers now name
    /// other bundles.
    pub fn clamp(&mut self, generation: u64) {
        let above: Vec<u64> = self
            .by_generation
            .range(generation + 1..)
            .map(|(g, _)| *g)
            .collect();
        for g in above {
            if let Some(until) = self.by_generation.remove(&g) {
                let e = self.by_generation.entry(0).or_default();
                *e = (*e).max(until);
            }
        }
    }

    /// Whether nothing it recorded is valid at `now`.
    pub fn is_spent(&self, now: SystemTime) -> bool {
        let now = unix(now);
        self.by_generation.values().all(|u| *u <= now)
            && self.by_authority.values().all(|u| *u <= now)
    }

    /// The authorities it recorded leaves of.
    pub fn authorities(&self) -> Vec<String> {
        self.by_authority.keys().cloned().collect()
    }

    /// Takes in everything `other` recorded (another replica's ledger).
    pub fn merge(&mut self, other: &Ledger) {
        for (g, until) in &other.by_generation {
            let e = self.by_generation.entry(*g).or_default();
            *e = (*e).max(*until);
        }
        for (a, until) in &other.by_authority {
            let e = self.by_authority.entry(a.clone()).or_default();
            *e = (*e).max(*until);
        }
        self.longest = self.longest.max(other.longest);
    }

    /// Drops what has expired.
    pub fn prune(&mut self, now: SystemTime) {
        let now = unix(now);
        self.by_generation.retain(|_, until| *until > now);
        self.by_authority.retain(|_, until| *until > now);
    }
}

/// One agent as the rotation sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentView {
    /// The name it reports (its node).
    pub name: String,
    /// Whether its bundle watch is open now.
    pub connected: bool,
    /// The lowest bundle generation its proxies ACKed.
    pub acked_generation: u64,
    /// NotAfter of the latest-expiring leaf it holds per authority id.
    pub leaves: BTreeMap<String, SystemTime>,
}

impl AgentView {
    /// Its name, marked when it is not connected.
    fn shown(&self) -> String {
        if self.connected {
            self.name.clone()
        } else {
            format!("{} (disconnected)", self.name)
        }
    }
}

/// Copies of the trust bundle the CA keeps itself (Kubernetes Secrets
/// `istio.<sa>`, ConfigMaps `istio-ca-root-cert`, a ClusterTrustBundle), as
/// their writer last counted them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Copies {
    /// What they are, for messages (`Secrets istio.<sa>`).
    pub kind: String,
    /// Whether this report is from their writer (the leader). A replica
    /// that would write them but does not now reports only that they
    /// exist: with no writer's report, no gate opens.
    pub writer: bool,
    /// The authority-set generation they were counted against.
    pub generation: u64,
    /// How many there should be.
    pub total: usize,
    /// How many hold exactly what the set of `generation` calls for (its
    /// bundle; for a certificate, one from its active authority).
    pub current: usize,
    /// Since when every one is current at `generation`; `None` while some
    /// are not.
    pub settled_since: Option<SystemTime>,
    /// How long after a change their readers may still see the old one
    /// (a mounted Secret or ConfigMap: the kubelet's sync period).
    pub propagation: Duration,
    /// Some of those that are not current, for messages (at most
    /// [`Copies::MAX_BEHIND`]).
    pub behind: Vec<String>,
}

/// Counts one kind of copies now (for a replica's evidence).
pub type CopyCounter = std::sync::Arc<dyn Fn(SystemTime) -> Copies + Send + Sync>;

impl Copies {
    /// How many names [`Copies::behind`] lists.
    pub const MAX_BEHIND: usize = 10;

    /// A report from a replica that does not write them now.
    pub fn not_writing(kind: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            writer: false,
            generation: 0,
            total: 0,
            current: 0,
            settled_since: None,
            propagation: Duration::ZERO,
            behind: Vec::new(),
        }
    }

    /// Whether every copy holds generation `generation` (or later) and
    /// its readers have had time to see it; otherwise what is missing.
    pub fn check(&self, generation: u64, now: SystemTime) -> Result<(), String> {
        if !self.writer {
            return Err(format!(
                "no replica is writing the {} now (no leader?); their state is unknown",
                self.kind
            ));
        }
        if self.generation < generation || self.current < self.total {
            let mut why = format!(
                "{} of {} {} hold bundle generation {generation}",
                if self.generation < generation {
                    0
                } else {
                    self.current
                },
                self.total,
                self.kind
            );
            if !self.behind.is_empty() {
                why.push_str(&format!("; behind: {}", shorten(&self.behind)));
            }
            return Err(why);
        }
        match self.settled_since {
            Some(t) if t + self.propagation <= now => Ok(()),
            Some(t) => Err(format!(
                "the {} hold bundle generation {generation} since {}; their readers may see it only by {}",
                self.kind,
                rfc3339(t),
                rfc3339(t + self.propagation)
            )),
            None => Err(format!("the {} are not all current yet", self.kind)),
        }
    }
}

/// What the server knows when a step is asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Evidence {
    /// Every agent known.
    pub agents: Vec<AgentView>,
    /// The leaves issued, per generation and authority.
    pub ledger: Ledger,
    /// While set, the server has just started: agents it knew have until
    /// then to reconnect, and no gate opens.
    pub settle_until: Option<SystemTime>,
    /// Agents connected but not counted (the CA's caps on agents): no gate
    /// opens while there are any.
    pub uncounted: usize,
    /// Why the evidence is incomplete (another replica's cannot be read):
    /// no gate opens while there is any.
    pub blocked: Vec<String>,
    /// Copies of the bundle the CA keeps itself: every writer's report, and
    /// a non-writer's for each kind no writer reported.
    pub copies: Vec<Copies>,
}

/// What the other replicas of the CA know (each keeps its own agents'
/// reports and its own ledger), as this replica last read it.
pub trait PeerEvidence: Send + Sync {
    /// Every other replica's evidence, each as it published it and
    /// whether that report is current (`false`: the replica stopped
    /// reporting; its agents are then taken as disconnected).
    fn peers(&self) -> Vec<(Evidence, bool)>;
    /// Why the peers' evidence cannot be relied on now (not read yet, its
    /// watch broken, this replica's own report not published): every
    /// gate stays shut while there is any reason.
    fn blocking(&self) -> Vec<String>;
}

impl Evidence {
    /// This replica's evidence with the other replicas' folded in, as
    /// conservatively as each gate needs: an agent known to several
    /// replicas (it moved) is connected if it is anywhere, has confirmed
    /// the lowest generation any current report of it says, and holds
    /// every leaf any report says; ledgers are joined; the latest settle
    /// window and every uncounted agent of a current report hold the
    /// gates. A report that is not current only contributes its ledger
    /// and those of its agents that still hold a valid leaf.
    pub fn merge(mut self, peers: Vec<(Evidence, bool)>, now: SystemTime) -> Evidence {
        let mut by_name: BTreeMap<String, AgentView> = BTreeMap::new();
        let mut fold = |a: AgentView, current: bool| {
            let a = AgentView {
                connected: a.connected && current,
                ..a
            };
            if !current && !a.leaves.values().any(|u| *u > now) {
                return;
            }
            match by_name.get_mut(&a.name) {
                None => {
                    by_name.insert(a.name.clone(), a);
                }
                Some(b) => {
                    b.acked_generation = match (a.connected, b.connected) {
                        (true, false) => a.acked_generation,
                        (false, true) => b.acked_generation,
                        _ => b.acked_generation.min(a.acked_generation),
                    };
                    b.connected |= a.connected;
                    for (id, until) in a.leaves {
                        let e = b.leaves.entry(id).or_insert(until);
                        *e = (*e).max(until);
                    }
                }
            }
        };
        for a in std::mem::take(&mut self.agents) {
            fold(a, true);
        }
        for (peer, current) in peers {
            for a in peer.agents {
                fold(a, current);
            }
            self.ledger.merge(&peer.ledger);
            if !current {
                // A replica that stopped reporting may have been the only
                // one counting a kind: it stays expected, unknown unless a
                // current writer counts it.
                self.copies
                    .extend(peer.copies.iter().map(|c| Copies::not_writing(&c.kind)));
            }
            if current {
                self.copies.extend(peer.copies);
                self.uncounted += peer.uncounted;
                self.settle_until =
                    match (self.settle_until, peer.settle_until.filter(|t| *t > now)) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        (a, b) => a.or(b),
                    };
            }
        }
        self.agents = by_name.into_values().collect();
        // Every writer's count is judged (two during a change of leader:
        // both must agree); a kind no writer reports stays as unknown.
        let written: Vec<String> = self
            .copies
            .iter()
            .filter(|c| c.writer)
            .map(|c| c.kind.clone())
            .collect();
        let mut unknown: Vec<String> = Vec::new();
        self.copies.retain(|c| {
            if c.writer {
                return true;
            }
            if written.contains(&c.kind) || unknown.contains(&c.kind) {
                return false;
            }
            unknown.push(c.kind.clone());
            true
        });
        self
    }

    /// What the copies of the bundle the CA keeps lack for `generation`.
    fn copies_missing(&self, generation: u64, now: SystemTime) -> Vec<String> {
        self.copies
            .iter()
            .filter_map(|c| c.check(generation, now).err())
            .collect()
    }

    /// Agents whose proxies have ACKed `generation`, of all the agents
    /// known (a disconnected one counts until its leaves expire: it may
    /// still be serving them), and the names of those that have not.
    pub fn confirmed(&self, generation: u64) -> (usize, usize, Vec<String>) {
        let behind: Vec<String> = self
            .agents
            .iter()
            .filter(|a| a.acked_generation < generation)
            .map(AgentView::shown)
            .collect();
        (self.agents.len() - behind.len(), self.agents.len(), behind)
    }

    /// What holds every gate, whatever the step.
    fn settling(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .settle_until
            .map(|t| {
                format!(
                    "the server started recently: agents have until {} to reconnect and report",
                    rfc3339(t)
                )
            })
            .into_iter()
            .collect();
        out.extend(self.blocked.iter().cloned());
        if self.uncounted > 0 {
            out.push(format!(
                "{} connected agents are not counted (too many agents known to the CA); their proxies cannot confirm",
                self.uncounted
            ));
        }
        out
    }
}

/// Why a step may not be taken yet.
pub type Missing = Vec<String>;

/// Whether the prepared authority may start signing.
///
/// # Errors
/// What is missing, one line each.
pub fn check_activate(
    set: &AuthoritySet,
    evidence: &Evidence,
    now: SystemTime,
) -> Result<(), Missing> {
    if !set.members().iter().any(|m| m.state == State::Prepared) {
        return Err(vec![
            "no authority is prepared; run `ca rotate-root prepare` first".into(),
        ]);
    }
    let since = prepared_generation(set);
    let mut missing: Vec<String> = evidence.settling();
    missing.extend(evidence.copies_missing(since, now));
    let (ok, of, behind) = evidence.confirmed(since);
    if !behind.is_empty() {
        missing.push(format!(
            "{ok} of {of} agents have confirmed bundle generation {since}; behind: {}",
            shorten(&behind)
        ));
    }
    if let Some(until) = evidence.ledger.issued_before(since, now) {
        missing.push(format!(
            "certificates issued before the new root was prepared to clients that are not workload-ca agents \
             (they learn the bundle at their next request) are valid until {}",
            rfc3339(until)
        ));
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing)
    }
}

/// Whether the retiring authorities may leave the bundle.
///
/// # Errors
/// What is missing, one line each.
pub fn check_retire(
    set: &AuthoritySet,
    evidence: &Evidence,
    now: SystemTime,
) -> Result<(), Missing> {
    let retiring: Vec<&str> = set
        .members()
        .iter()
        .filter(|m| m.state == State::Retiring)
        .map(|m| m.authority.id())
        .collect();
    if retiring.is_empty() {
        return Err(vec![
            "no authority is retiring; run `ca rotate-root activate` first".into(),
        ]);
    }
    let mut missing: Vec<String> = evidence.settling();
    // The copies' certificates are re-signed by the active authority at
    // the activation's generation.
    missing.extend(evidence.copies_missing(set.generation(), now));
    for id in &retiring {
        let holders: Vec<String> = evidence
            .agents
            .iter()
            .filter(|a| a.leaves.get(*id).is_some_and(|until| *until > now))
            .map(AgentView::shown)
            .collect();
        if !holders.is_empty() {
            missing.push(format!(
                "{} agents still serve a certificate of authority {id}: {}",
                holders.len(),
                shorten(&holders)
            ));
        }
        if let Some(until) = evidence.ledger.issued_by(id, now) {
            missing.push(format!(
                "certificates of authority {id} issued to clients that are not workload-ca agents are valid until {}",
                rfc3339(until)
            ));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing)
    }
}

/// The generation agents must confirm before activation: the set's own
/// (the one prepare made, or a later one; waiting for the latest bundle is
/// never less safe).
fn prepared_generation(set: &AuthoritySet) -> u64 {
    set.generation()
}

/// Automatic rotation: due when the active authority has less than
/// `fraction` of its life left (Istio uses 0.2) and nothing is prepared or
/// retiring yet.
pub fn rotation_due(set: &AuthoritySet, fraction: f64, now: SystemTime) -> bool {
    if set.members().len() != 1 {
        return false;
    }
    let active = set.active();
    let Some(not_before) = active.not_before() else {
        return false;
    };
    let end = active.chain_not_after();
    let (Ok(life), Ok(left)) = (end.duration_since(not_before), end.duration_since(now)) else {
        return true;
    };
    left.as_secs_f64() < life.as_secs_f64() * fraction
}

fn shorten(names: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut s = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// RFC 3339, for messages.
pub fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn from_unix(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_secs(s))
        .unwrap_or(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX)) * 64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leaf_recorded_for_retire_holds_retire_only() {
        let now = SystemTime::now();
        let mut ledger = Ledger::default();
        ledger.record_for_retire("old", now, now + Duration::from_secs(3600));
        assert!(ledger.issued_before(u64::MAX, now).is_none());
        assert!(ledger.issued_by("old", now).is_some());
        assert!(!ledger.is_spent(now));
    }

    #[test]
    fn what_a_crash_may_have_lost_counts_against_every_gate() {
        let now = SystemTime::now();
        let mut ledger = Ledger::default();
        ledger.record(3, "a", now, now + Duration::from_secs(60));
        ledger.assume_lost(&["a", "b"], now, Duration::from_secs(7200));
        // The longest lifetime issued (60 s) is assumed, before every
        // generation, from every authority.
        let until = now + Duration::from_secs(60);
        let secs = |t: Option<SystemTime>| t.map(unix);
        assert_eq!(secs(ledger.issued_before(1, now)), Some(unix(until)));
        assert_eq!(secs(ledger.issued_by("b", now)), Some(unix(until)));
        let mut empty = Ledger::default();
        empty.assume_lost(&["a"], now, Duration::from_secs(7200));
        assert_eq!(
            secs(empty.issued_by("a", now)),
            Some(unix(now + Duration::from_secs(7200))),
            "nothing recorded: the fallback"
        );
        assert!(
            empty
                .issued_by("a", now + Duration::from_secs(7201))
                .is_none()
        );
    }
}

#[cfg(test)]
mod merge_tests {
    use super::*;

    fn agent(
        name: &str,
        connected: bool,
        acked: u64,
        leaf: Option<(&str, SystemTime)>,
    ) -> AgentView {
        AgentView {
            name: name.into(),
            connected,
            acked_generation: acked,
            leaves: leaf.map(|(a, t)| (a.to_owned(), t)).into_iter().collect(),
        }
    }

    #[test]
    fn replicas_evidence_merges_conservatively() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let later = now + Duration::from_secs(600);
        let mut own = Evidence {
            agents: vec![
                agent("n1", true, 5, Some(("old", later))),
                agent("moved", false, 3, Some(("old", later))),
            ],
            ..Evidence::default()
        };
        own.ledger.record(4, "old", now, later);
        let mut peer = Evidence {
            agents: vec![
                agent("moved", true, 6, Some(("new", later))),
                agent("n2", true, 4, None),
            ],
            settle_until: Some(now + Duration::from_secs(5)),
            uncounted: 2,
            ..Evidence::default()
        };
        peer.ledger
            .record(6, "new", now, later + Duration::from_secs(1));
        // A replica that stopped: its connected agent is not connected any
        // more; one with nothing valid is dropped; its counts do not hold.
        let stale = Evidence {
            agents: vec![
                agent("gone", true, 1, Some(("old", now - Duration::from_secs(1)))),
                agent("holding", true, 1, Some(("old", later))),
            ],
            settle_until: Some(later),
            uncounted: 7,
            ..Evidence::default()
        };
        let m = own.merge(vec![(peer, true), (stale, false)], now);
        let names: Vec<&str> = m.agents.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["holding", "moved", "n1", "n2"]);
        let moved = &m.agents[1];
        assert!(moved.connected);
        assert_eq!(moved.acked_generation, 6, "where it is connected now");
        assert_eq!(moved.leaves.len(), 2, "every leaf any report says");
        assert!(!m.agents[0].connected);
        assert_eq!(m.uncounted, 2);
        assert_eq!(m.settle_until, Some(now + Duration::from_secs(5)));
        assert_eq!(m.confirmed(5).0, 2, "n1 and moved; n2 and holding behind");
        assert!(m.ledger.issued_by("new", now).is_some());
        assert!(m.ledger.issued_before(5, now).is_some());
    }
}

#[cfg(test)]
mod copies_tests {
    use super::*;

    fn copies(writer: bool, generation: u64, current: usize, since: Option<SystemTime>) -> Copies {
        Copies {
            kind: "Secrets istio.<sa>".into(),
            writer,
            generation,
            total: 3,
            current,
            settled_since: since,
            propagation: Duration::from_secs(60),
            behind: if current < 3 {
                vec!["ns/istio.a".into()]
            } else {
                Vec::new()
            },
        }
    }

    #[test]
    fn copies_hold_a_gate_until_current_and_propagated() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let early = now - Duration::from_secs(30);
        let long_ago = now - Duration::from_secs(61);
        let behind = copies(true, 5, 2, None).check(5, now).unwrap_err();
        assert!(
            behind.contains("2 of 3") && behind.contains("ns/istio.a"),
            "{behind}"
        );
        let old = copies(true, 4, 3, Some(long_ago))
            .check(5, now)
            .unwrap_err();
        assert!(
            old.contains("0 of 3"),
            "counted at an older generation: {old}"
        );
        let fresh = copies(true, 5, 3, Some(early)).check(5, now).unwrap_err();
        assert!(fresh.contains("readers may see it only by"), "{fresh}");
        copies(true, 5, 3, Some(long_ago)).check(5, now).unwrap();
        copies(true, 6, 3, Some(long_ago)).check(5, now).unwrap();
        let nobody = Copies::not_writing("Secrets istio.<sa>")
            .check(5, now)
            .unwrap_err();
        assert!(nobody.contains("no replica is writing"), "{nobody}");
    }

    #[test]
    fn merged_copies_keep_every_writer_and_unknown_kinds_block() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let long_ago = now - Duration::from_secs(600);
        let own = Evidence {
            copies: vec![
                Copies::not_writing("Secrets istio.<sa>"),
                Copies::not_writing("ConfigMaps"),
            ],
            ..Evidence::default()
        };
        let leader = Evidence {
            copies: vec![copies(true, 5, 3, Some(long_ago))],
            ..Evidence::default()
        };
        let old_leader = Evidence {
            copies: vec![copies(true, 5, 1, None)],
            ..Evidence::default()
        };
        // A stopped replica's counts are not judged, but its kinds stay
        // expected.
        let stopped = Evidence {
            copies: vec![copies(true, 1, 0, None)],
            ..Evidence::default()
        };
        let alone = Evidence::default().merge(vec![(stopped.clone(), false)], now);
        assert_eq!(
            alone.copies,
            vec![Copies::not_writing("Secrets istio.<sa>")]
        );
        assert_eq!(alone.copies_missing(5, now).len(), 1);
        let m = own
            .clone()
            .merge(vec![(leader.clone(), true), (stopped, false)], now);
        let kinds: Vec<(&str, bool)> = m
            .copies
            .iter()
            .map(|c| (c.kind.as_str(), c.writer))
            .collect();
        assert_eq!(kinds, [("ConfigMaps", false), ("Secrets istio.<sa>", true)]);
        assert_eq!(
            m.copies_missing(5, now).len(),
            1,
            "ConfigMaps: nobody writes them"
        );
        let m = own.merge(vec![(leader, true), (old_leader, true)], now);
        let missing = m.copies_missing(5, now);
        assert_eq!(missing.len(), 2, "{missing:?}");
        assert!(missing.iter().any(|m| m.contains("1 of 3")), "{missing:?}");
    }
}
