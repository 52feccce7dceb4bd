//! Rotation evidence shared between replicas.
//!
//! Each replica knows only the agents whose bundle watch it serves and the
//! leaves it issued itself, but a rotation step must be judged on the
//! whole fleet. So every replica publishes what it knows (the agents it
//! counts, with their confirmed generation and leaves, and its ledger of
//! leaves issued to other clients) in its own ConfigMap,
//! `workload-ca-evidence-<replica>` labelled [`LABEL`], rewritten when it
//! changes (at most every [`MIN_WRITE_GAP`]) and at least every
//! [`HEARTBEAT`]; and every replica watches all of them. A step taken on
//! any replica is judged on its own evidence merged with the others'
//! ([`crate::ca::rotation::Evidence::merge`]).
//!
//! A report not rewritten for [`STALE_AFTER`] belongs to a replica that
//! stopped: its agents are taken as disconnected (they count until their
//! leaves expire) and its ledger still counts. The leader deletes such a
//! report once nothing in it is still valid.
//!
//! Not checked: the reports are trusted as written (anyone who may write
//! ConfigMaps in the CA's namespace can hold a gate shut, or open one by
//! deleting a report; RBAC must keep that to the CA).

use crate::sync::{LockExt, RwLockExt};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams, Preconditions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::cache::{CacheOptions, Change, Freshen, reflect};
use crate::ca::rotation::{AgentView, Copies, Evidence, Ledger, PeerEvidence};

/// The label every evidence ConfigMap carries.
pub const LABEL: &str = "workload-ca.io/rotation-evidence";
/// The data key of a report.
pub const KEY: &str = "evidence.json";
/// How often a replica rewrites its report even when nothing changed.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// A report older than this is from a replica that stopped.
pub const STALE_AFTER: Duration = Duration::from_secs(45);
/// The shortest time between two writes of a report.
pub const MIN_WRITE_GAP: Duration = Duration::from_millis(500);
/// A report's largest size: a ConfigMap holds 1 MiB. Beyond it the report
/// says only that it overflowed, which holds every gate.
const MAX_REPORT_BYTES: usize = 900 * 1024;

#[derive(Serialize, Deserialize, Default)]
struct Report {
    replica: String,
    /// When it was written (Unix seconds).
    written: u64,
    settle_until: Option<u64>,
    uncounted: usize,
    agents: Vec<AgentRow>,
    ledger: Ledger,
    /// The copies of the bundle this replica counts (reports of replicas
    /// from before they existed have none).
    #[serde(default)]
    copies: Vec<Copies>,
    /// The ConfigMap's resourceVersion when read back (not written): the
    /// precondition of the leader's deletion of a spent report.
    #[serde(skip)]
    resource_version: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct AgentRow {
    name: String,
    connected: bool,
    acked: u64,
    leaves: BTreeMap<String, u64>,
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A time read from a report: saturating, whatever a ConfigMap holds.
fn time(s: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(s))
        .unwrap_or(UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX)) * 64)
}

impl Report {
    fn of(replica: &str, e: &Evidence, now: SystemTime) -> Self {
        Self {
            replica: replica.to_owned(),
            written: secs(now),
            settle_until: e.settle_until.map(secs),
            uncounted: e.uncounted,
            agents: e
                .agents
                .iter()
                .map(|a| AgentRow {
                    name: a.name.clone(),
                    connected: a.connected,
                    acked: a.acked_generation,
                    leaves: a
                        .leaves
                        .iter()
                        .map(|(k, v)| (k.clone(), secs(*v)))
                        .collect(),
                })
                .collect(),
            ledger: e.ledger.clone(),
            copies: e.copies.clone(),
            resource_version: None,
        }
    }

    /// What it says; a report of a replica that stopped writing also
    /// counts the leaves that replica may have issued since: it may have
    /// lost only the API server and kept signing from its caches for up to
    /// `max_stale` after its last write, with the authorities it knew,
    /// leaves as long-lived as the longest it recorded (or, with an empty
    /// ledger, as its agents' leaves had left).
    fn evidence_as(&self, current: bool, max_stale: Duration) -> Evidence {
        let mut e = self.evidence();
        if !current {
            let written = time(self.written);
            let mut ids: Vec<String> = e.ledger.authorities();
            let mut agent_life = Duration::ZERO;
            for a in &e.agents {
                for (id, until) in &a.leaves {
                    if !ids.contains(id) {
                        ids.push(id.clone());
                    }
                    agent_life = agent_life.max(until.duration_since(written).unwrap_or_default());
                }
            }
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let lost_until = written + max_stale + MIN_WRITE_GAP + Duration::from_secs(1);
            e.ledger.assume_lost(&ids, lost_until, agent_life);
        }
        e
    }

    fn evidence(&self) -> Evidence {
        Evidence {
            agents: self
                .agents
                .iter()
                .map(|a| AgentView {
                    name: a.name.clone(),
                    connected: a.connected,
                    acked_generation: a.acked,
                    leaves: a
                        .leaves
                        .iter()
                        .map(|(k, v)| (k.clone(), time(*v)))
                        .collect(),
                })
                .collect(),
            ledger: self.ledger.clone(),
            settle_until: self.settle_until.map(time),
            uncounted: self.uncounted,
            blocked: Vec::new(),
            copies: self.copies.clone(),
        }
    }

    /// Nothing in it is valid any more.
    /// Nothing in it is valid any more, counting what a stopped replica
    /// is assumed to have signed after it (see [`Report::evidence_as`]).
    fn spent(&self, now: SystemTime, max_stale: Duration) -> bool {
        self.evidence_as(false, max_stale).ledger.is_spent(now)
            && self
                .agents
                .iter()
                .all(|a| a.leaves.values().all(|u| time(*u) <= now))
    }
}

/// The ConfigMap name of a replica's report.
pub fn report_name(replica: &str) -> String {
    let clean: String = replica
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut name = format!("workload-ca-evidence-{}", clean.trim_matches('-'));
    name.truncate(253);
    name.trim_end_matches('-').to_owned()
}

/// The other replicas' reports, as last seen through the watch.
pub struct Peers {
    own: String,
    reports: RwLock<HashMap<String, Report>>,
    /// How long a replica cut off from the API server may keep signing
    /// (its caches' `max_stale`).
    max_stale: Duration,
    /// The first list is in.
    synced: std::sync::atomic::AtomicBool,
    /// Since when the watch has been failing, if it is.
    broken_since: std::sync::Mutex<Option<SystemTime>>,
}

impl Peers {
    /// Reports of every replica but `replica`, whose replicas may sign for
    /// `max_stale` after losing the API server.
    pub fn new(replica: &str, max_stale: Duration) -> Arc<Self> {
        Arc::new(Self {
            own: report_name(replica),
            reports: RwLock::default(),
            max_stale,
            synced: std::sync::atomic::AtomicBool::new(false),
            broken_since: std::sync::Mutex::new(None),
        })
    }

    /// Watches the reports in `namespace` until `shutdown`.
    pub fn spawn(
        self: &Arc<Self>,
        client: Client,
        namespace: &str,
        shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let api: Api<ConfigMap> = Api::namespaced(client, namespace);
        let opts = CacheOptions {
            labels: Some(LABEL.to_owned()),
            ..CacheOptions::default()
        };
        let this = self.clone();
        tokio::spawn(reflect(api, "evidence", opts, shutdown, row, move |c| {
            this.apply(c)
        }))
    }

    fn apply(&self, change: Change<(String, Report)>) {
        let mut reports = self.reports.write_locked();
        match change {
            Change::Reset(rows) => *reports = rows.into_iter().collect(),
            Change::Upsert((name, r)) => {
                reports.insert(name, r);
            }
            Change::Delete { name, .. } => {
                reports.remove(&name);
            }
            Change::Fresh(Freshen::Broken(reason)) => {
                tracing::warn!(
                    reason,
                    "the rotation evidence watch is broken; peers' reports may be old"
                );
                self.set_broken(Some(SystemTime::now()));
            }
            Change::Fresh(Freshen::Silent(_)) => {
                tracing::warn!(
                    "the rotation evidence watch went silent; peers' reports may be old"
                );
                self.set_broken(Some(SystemTime::now()));
            }
            Change::Fresh(Freshen::Synced(_)) => {
                self.synced
                    .store(true, std::sync::atomic::Ordering::Release);
                self.set_broken(None);
            }
            Change::Fresh(Freshen::Healthy) => self.set_broken(None),
        }
    }

    /// Marks the watch broken since `since` (kept if already broken), or
    /// healthy.
    fn set_broken(&self, since: Option<SystemTime>) {
        let mut b = self.broken_since.locked();
        match since {
            Some(t) => {
                b.get_or_insert(t);
            }
            None => *b = None,
        }
    }

    /// Names of reports that are stale and hold nothing valid, with the
    /// resourceVersion each was judged on.
    fn spent(&self, now: SystemTime) -> Vec<(String, Option<String>)> {
        let r = self.reports.read_locked();
        r.iter()
            .filter(|(name, rep)| {
                **name != self.own
                    && now.duration_since(time(rep.written)).unwrap_or_default() > STALE_AFTER
                    && rep.spent(now, self.max_stale)
            })
            .map(|(n, rep)| (n.clone(), rep.resource_version.clone()))
            .collect()
    }
}

fn row(cm: ConfigMap) -> Option<(String, Report)> {
    let name = cm.metadata.name?;
    let resource_version = cm.metadata.resource_version;
    let text = cm.data?.remove(KEY)?;
    match serde_json::from_str::<Report>(&text) {
        Ok(r) => Some((
            name,
            Report {
                resource_version,
                ..r
            },
        )),
        Err(e) => {
            tracing::warn!(configmap = %name, error = %e, "unreadable rotation evidence report; ignored");
            None
        }
    }
}

impl PeerEvidence for Peers {
    fn blocking(&self) -> Vec<String> {
        let now = SystemTime::now();
        let mut out = Vec::new();
        if !self.synced.load(std::sync::atomic::Ordering::Acquire) {
            out.push("the other replicas' rotation evidence has not been read yet".to_owned());
        }
        if let Some(since) = *self.broken_since.locked() {
            out.push(format!(
                "the watch of the other replicas' rotation evidence has been broken for {} s",
                now.duration_since(since).unwrap_or_default().as_secs()
            ));
        }
        let own_age = self
            .reports
            .read_locked()
            .get(&self.own)
            .map(|rep| now.duration_since(time(rep.written)).unwrap_or_default());
        match own_age {
            None => out.push(
                "this replica's own rotation evidence is not published yet (the other replicas cannot see its agents)"
                    .to_owned(),
            ),
            Some(age) if age > 2 * HEARTBEAT + MIN_WRITE_GAP => out.push(format!(
                "this replica's own rotation evidence was last published {} s ago",
                age.as_secs()
            )),
            Some(_) => {}
        }
        out
    }

    fn peers(&self) -> Vec<(Evidence, bool)> {
        let now = SystemTime::now();
        let r = self.reports.read_locked();
        r.iter()
            .filter(|(name, _)| **name != self.own)
            .map(|(_, rep)| {
                let age = now.duration_since(time(rep.written)).unwrap_or_default();
                let current = age <= STALE_AFTER;
                (rep.evidence_as(current, self.max_stale), current)
            })
            .collect()
    }
}

/// Publishes this replica's evidence (from `local`) as its report until
/// `shutdown`; while `leader` is true, also deletes spent reports of
/// replicas that stopped.
pub fn spawn_publisher(
    client: Client,
    namespace: &str,
    replica: &str,
    mut local: watch::Receiver<Option<Arc<Evidence>>>,
    peers: Arc<Peers>,
    leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let name = report_name(replica);
    let replica = replica.to_owned();
    tokio::spawn(async move {
        let mut last_written: Option<(Arc<Evidence>, tokio::time::Instant)> = None;
        loop {
            tokio::select! {
                r = local.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(HEARTBEAT) => {}
                _ = shutdown.changed() => return,
            }
            let Some(evidence) = local.borrow_and_update().clone() else {
                continue;
            };
            let now = SystemTime::now();
            let due = match &last_written {
                None => true,
                Some((e, at)) => *e != evidence || at.elapsed() >= HEARTBEAT,
            };
            if due {
                match write(&api, &name, &Report::of(&replica, &evidence, now)).await {
                    Ok(()) => last_written = Some((evidence, tokio::time::Instant::now())),
                    Err(e) => {
                        tracing::warn!(configmap = %name, error = %e, "publishing rotation evidence failed")
                    }
                }
            }
            if *leader.borrow() {
                for (spent, resource_version) in peers.spent(now) {
                    // Without the version it was judged on, a deletion
                    // could not be conditional: left for the next pass.
                    if resource_version.is_none() {
                        continue;
                    }
                    // Conditional on the version judged spent: a deletion
                    // sent before this replica stepped down and delivered
                    // late cannot remove a report written since.
                    let params = DeleteParams {
                        preconditions: Some(Preconditions {
                            resource_version,
                            uid: None,
                        }),
                        ..DeleteParams::default()
                    };
                    match api.delete(&spent, &params).await {
                        Ok(_) => {
                            tracing::info!(configmap = %spent, "deleted the spent evidence of a replica that stopped")
                        }
                        // Gone already, or written again since it was judged.
                        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                        Err(e) => {
                            tracing::warn!(configmap = %spent, error = %e, "deleting spent evidence failed")
                        }
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(MIN_WRITE_GAP) => {}
                _ = shutdown.changed() => return,
            }
        }
    })
}

async fn write(api: &Api<ConfigMap>, name: &str, report: &Report) -> Result<(), kube::Error> {
    let mut text = serde_json::to_string(report).unwrap_or_default();
    if text.len() > MAX_REPORT_BYTES {
        // Too many agents for one report: say so, which holds every gate.
        let overflow = Report {
            replica: report.replica.clone(),
            written: report.written,
            settle_until: report.settle_until,
            uncounted: report.uncounted + report.agents.len(),
            agents: Vec::new(),
            ledger: report.ledger.clone(),
            copies: report.copies.clone(),
            resource_version: None,
        };
        text = serde_json::to_string(&overflow).unwrap_or_default();
    }
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(
                [
                    (LABEL.to_owned(), "true".to_owned()),
                    (
                        "app.kubernetes.io/managed-by".to_owned(),
                        "workload-ca".to_owned(),
                    ),
                ]
                .into(),
            ),
            ..Default::default()
        },
        data: Some([(KEY.to_owned(), text)].into()),
        ..Default::default()
    };
    match api.replace(name, &PostParams::default(), &cm).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            api.create(&PostParams::default(), &cm).await.map(|_| ())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_and_names_are_valid() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut ledger = Ledger::default();
        ledger.record(3, "abc", now, now + Duration::from_secs(60));
        let e = Evidence {
            agents: vec![AgentView {
                name: "node-a".into(),
                connected: true,
                acked_generation: 4,
                leaves: [("abc".to_owned(), now + Duration::from_secs(30))].into(),
            }],
            ledger,
            settle_until: Some(now),
            uncounted: 1,
            blocked: Vec::new(),
            copies: vec![Copies {
                kind: "ConfigMaps istio-ca-root-cert".into(),
                writer: true,
                generation: 4,
                total: 9,
                current: 8,
                settled_since: None,
                propagation: Duration::from_secs(90),
                behind: vec!["default".into()],
            }],
        };
        let r = Report::of("ca-7d9f-x", &e, now);
        let back: Report = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.evidence(), e);
        assert!(!back.spent(now, Duration::ZERO));
        assert!(back.spent(now + Duration::from_secs(62), Duration::ZERO));
        assert!(
            !back.spent(now + Duration::from_secs(62), Duration::from_secs(300)),
            "what a stopped replica may have signed since counts"
        );
        assert!(time(u64::MAX) > now, "no overflow on a corrupt value");
        assert_eq!(report_name("CA_7d9f.X"), "workload-ca-evidence-ca-7d9f-x");
    }

    #[test]
    fn gates_are_held_until_peers_are_read_and_this_replicas_own_report_is_out() {
        let peers = Peers::new("ca-a", Duration::from_secs(300));
        let now = SystemTime::now();
        let blocking = peers.blocking();
        assert_eq!(blocking.len(), 2, "{blocking:?}");
        let own = Report::of("ca-a", &Evidence::default(), now);
        peers.apply(Change::Reset(vec![(report_name("ca-a"), own)]));
        assert_eq!(peers.blocking().len(), 1, "not synced yet");
        peers.apply(Change::Fresh(Freshen::Synced(Duration::ZERO)));
        assert_eq!(peers.blocking(), Vec::<String>::new());
        peers.apply(Change::Fresh(Freshen::Broken("watch")));
        assert_eq!(peers.blocking().len(), 1, "a broken watch holds the gates");
        peers.apply(Change::Fresh(Freshen::Healthy));
        assert!(peers.blocking().is_empty());
        // An old own report: the others cannot see this replica's agents.
        let old = Report::of("ca-a", &Evidence::default(), now - Duration::from_secs(60));
        peers.apply(Change::Upsert((report_name("ca-a"), old)));
        assert_eq!(peers.blocking().len(), 1);
        // A peer that stopped writing: taken as disconnected, and assumed to
        // have signed for max_stale after its last report.
        let mut ledger = Ledger::default();
        let then = now - Duration::from_secs(600);
        ledger.record(3, "old", then, then + Duration::from_secs(3600));
        let stale = Report::of(
            "ca-b",
            &Evidence {
                ledger,
                ..Evidence::default()
            },
            then,
        );
        peers.apply(Change::Upsert((report_name("ca-b"), stale)));
        let got = peers.peers();
        assert_eq!(got.len(), 1);
        let (e, current) = &got[0];
        assert!(!current);
        let until = e.ledger.issued_by("old", now).unwrap();
        assert!(until >= then + Duration::from_secs(300 + 3600), "{until:?}");
    }
}
