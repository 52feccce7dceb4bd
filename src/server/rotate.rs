//! The CA's live authorities and the steps of a root rotation.
//!
//! [`LiveCa`] is the one place the set changes: every change is written to
//! the store first (a compare-and-swap on the generation), then published
//! through the `watch` every part of the server reads. A change made to the
//! store by someone else (`ca rotate-root` on the state directory with no
//! server to talk to, or another replica) is followed within a few seconds.
//!
//! [`Rotator`] takes the steps an operator (or the automatic rotation)
//! asks for, each refused while its gate (`crate::ca::rotation`) is closed
//! unless forced.

use crate::sync::LockExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::Error;
use super::fleet::{AgentStatus, Fleet};
use crate::ca::keystore::RootSpec;
use crate::ca::rotation::{self, rfc3339};
use crate::ca::{Authority, AuthoritySet, AuthorityState, CaFiles, KeyStore};

/// The authorities, stored and published.
pub struct LiveCa {
    tx: watch::Sender<Arc<AuthoritySet>>,
    store: Arc<dyn KeyStore>,
    /// One writer at a time in this process (the store's lock covers the
    /// others).
    write: tokio::sync::Mutex<()>,
    /// Why the stored authorities and the ones in use have parted (the
    /// store went back, or holds another CA): readiness is false meanwhile.
    diverged: std::sync::Mutex<Option<String>>,
}

impl LiveCa {
    /// Publishes `set`, whose authorities `store` holds.
    pub fn new(set: AuthoritySet, store: Arc<dyn KeyStore>) -> Self {
        Self {
            tx: watch::channel(Arc::new(set)).0,
            store,
            write: tokio::sync::Mutex::new(()),
            diverged: std::sync::Mutex::new(None),
        }
    }

    /// The authorities in use now.
    pub fn current(&self) -> Arc<AuthoritySet> {
        self.tx.borrow().clone()
    }

    /// Follows the authorities in use: a new value on every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<AuthoritySet>> {
        self.tx.subscribe()
    }

    /// Ready unless the store and the authorities in use have parted.
    ///
    /// # Errors
    /// Why they parted.
    pub fn check_in_step(&self) -> Result<(), String> {
        self.diverged.locked().clone().map_or(Ok(()), Err)
    }

    fn set_diverged(&self, why: Option<String>) {
        let mut d = self.diverged.locked();
        if let Some(w) = &why
            && d.as_deref() != Some(w.as_str())
        {
            tracing::error!(store = %self.store.describe(), "{w}");
        }
        *d = why;
    }

    /// How often [`LiveCa::follow`] should run: the store's own answer.
    pub fn follow_interval(&self) -> Duration {
        self.store.poll_interval()
    }

    /// Stores `next`, then publishes it.
    ///
    /// # Errors
    /// [`Error::Config`] if `next` does not follow the current set (its
    /// generation is not the current one plus one), serves another trust
    /// domain, or the store changed since (the newer stored set is then
    /// published instead); [`Error::Ca`] if the store cannot be written.
    /// Nothing changes on error.
    pub async fn commit(&self, next: AuthoritySet) -> Result<(), Error> {
        let _one = self.write.lock().await;
        let current = self.current();
        if next.generation() != current.generation() + 1 {
            return Err(Error::Config(format!(
                "authority set refused: generation {} does not follow the current {}",
                next.generation(),
                current.generation()
            )));
        }
        if next.trust_domain() != current.trust_domain() {
            return Err(Error::Config(
                "authority set refused: another trust domain".into(),
            ));
        }
        if !self
            .store
            .swap(Some(current.generation()), &next.to_stored())
            .await?
        {
            drop(_one);
            self.follow(SystemTime::now()).await?;
            return Err(Error::Config(
                "the stored authorities changed meanwhile (another writer); reloaded them, try again"
                    .into(),
            ));
        }
        self.tx.send_replace(Arc::new(next));
        Ok(())
    }

    /// Publishes the stored set if it is newer than the current one.
    ///
    /// # Errors
    /// The store's, or validation's: the current set stays.
    pub async fn follow(&self, now: SystemTime) -> Result<bool, Error> {
        let _one = self.write.lock().await;
        let current = self.current();
        // Polled every few seconds: the generation first, the whole set
        // (every key file read and validated) only when it moved.
        let stored_generation = self.store.generation().await?;
        let Some(stored_generation) = stored_generation else {
            // The store was emptied behind our back (the CA Secret deleted):
            // put back what every part of the server is using, rather than
            // let the next replica to start make an unrelated root.
            if !self.store.restore_when_wiped() {
                self.set_diverged(Some(format!(
                    "the stored authorities are gone from {}; this server keeps signing with the ones in memory",
                    self.store.describe()
                )));
                return Ok(false);
            }
            if self.store.swap(None, &current.to_stored()).await? {
                tracing::error!(
                    store = %self.store.describe(),
                    generation = current.generation(),
                    "the stored authorities were deleted; restored them from memory"
                );
            }
            return Ok(false);
        };
        if stored_generation < current.generation() {
            // Restored from an older backup, replaced, or re-created by
            // another replica after a wipe: not ours to follow backwards.
            self.set_diverged(Some(format!(
                "the stored authorities went back to generation {stored_generation} while this server uses {}; \
                 not following (restart it to take the stored ones, or restore the newer ones)",
                current.generation()
            )));
            return Ok(false);
        }
        if stored_generation == current.generation() {
            return Ok(false);
        }
        let Some(stored) = self.store.load().await? else {
            return Ok(false);
        };
        if stored.generation <= current.generation() {
            return Ok(false);
        }
        // A successor shares an authority with what it follows (every step
        // keeps the active one, or the one it activates); a set with none
        // in common is another CA (a root made after the store was wiped),
        // never followed silently.
        let ids: Vec<&str> = current.members().iter().map(|m| m.authority.id()).collect();
        if !stored.members.iter().any(|m| ids.contains(&m.id.as_str())) {
            let why = format!(
                "the stored authorities (generation {}) share no authority with the ones in use: \
                 another CA replaced this one in {}; not following it (restart this server to take it)",
                stored.generation,
                self.store.describe()
            );
            self.set_diverged(Some(why.clone()));
            return Err(Error::Config(why));
        }
        let set = AuthoritySet::from_stored(&stored, current.trust_domain(), now)?;
        tracing::info!(
            generation = set.generation(),
            "the stored authorities changed outside this server; following"
        );
        self.tx.send_replace(Arc::new(set));
        self.set_diverged(None);
        Ok(true)
    }
}

/// One authority, for `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthorityStatus {
    /// The authority's id ([`crate::ca::authority_id`]).
    pub id: String,
    /// `active`, `prepared` or `retiring`.
    pub state: String,
    /// When it entered that state (RFC 3339).
    pub since: String,
    /// The end of its chain (RFC 3339).
    pub not_after: String,
    /// SHA-256 of the signing certificate.
    pub fingerprint: String,
    /// The signing certificate's subject.
    pub subject: String,
}

/// What `ca rotate-root status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotationStatus {
    /// The set's generation.
    pub generation: u64,
    /// Every member of the set.
    pub authorities: Vec<AuthorityStatus>,
    /// Agents whose proxies ACKed the current generation, of all the
    /// agents known (connected, or disconnected with leaves still valid).
    pub confirmed: usize,
    /// How many agents are known (connected, or with leaves still valid).
    pub known: usize,
    /// The known agents that have not confirmed the current generation.
    pub behind: Vec<String>,
    /// Each known agent and what it last reported.
    pub agents: Vec<AgentStatus>,
    /// Until when leaves issued to clients that are not our agents may
    /// still carry an older bundle (they learn it at their next request).
    pub other_clients_until: Option<String>,
    /// The copies of the bundle the CA keeps itself (Kubernetes Secrets,
    /// ConfigMaps, a ClusterTrustBundle), as their writer counted them.
    #[serde(default)]
    pub copies: Vec<rotation::Copies>,
    /// What the next step is, and whether its gate is open.
    pub next_step: Option<String>,
    /// What keeps the next step's gate closed (empty: it is open).
    pub blocked_by: Vec<String>,
}

/// A step an operator may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Add a new authority, prepared: its root joins the bundle.
    Prepare,
    /// Make the prepared authority the signer; the active one starts retiring.
    Activate,
    /// Remove the retiring authority (its root leaves the bundle).
    Retire,
}

impl Step {
    /// The step's name, as the CLI and the admin API spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prepare => "prepare",
            Self::Activate => "activate",
            Self::Retire => "retire",
        }
    }

    /// The step a set is ready for.
    pub fn next_for(set: &AuthoritySet) -> Step {
        let has = |s| set.members().iter().any(|m| m.state == s);
        if has(AuthorityState::Retiring) {
            Step::Retire
        } else if has(AuthorityState::Prepared) {
            Step::Activate
        } else {
            Step::Prepare
        }
    }
}

/// Why a step was not taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StepError {
    /// Its gate is closed: the proof it needs is missing.
    #[error("not yet safe to {step}:\n  - {}\nwait, or pass --force to {step} anyway", missing.join("\n  - "))]
    Gated {
        /// The step (`activate`, `retire`).
        step: &'static str,
        /// What is missing, one line each.
        missing: Vec<String>,
    },
    /// The step was tried and failed; nothing changed.
    #[error(transparent)]
    Failed(#[from] Error),
}

impl StepError {
    /// A short, stable label for metrics and logs (every variant named; a
    /// failure is labelled by its error).
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Gated { .. } => "gated",
            Self::Failed(e) => e.metric_label(),
        }
    }
}

/// The wall clock, replaceable in tests.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Takes rotation steps on a [`LiveCa`].
pub struct Rotator {
    /// The authorities the steps change.
    pub live: Arc<LiveCa>,
    /// The agents' evidence the gates read.
    pub fleet: Arc<Fleet>,
    /// What a prepared authority is generated from.
    pub spec: RootSpec,
    /// The other replicas' evidence, merged into every gate.
    peers: Option<Arc<dyn rotation::PeerEvidence>>,
    /// Whether this replica leads (the automatic rotation runs only then).
    leader: Option<watch::Receiver<bool>>,
    clock: Clock,
    /// One step at a time.
    step: tokio::sync::Mutex<()>,
}

impl Rotator {
    /// A rotator without peers, leadership or a test clock.
    pub fn new(live: Arc<LiveCa>, fleet: Arc<Fleet>, spec: RootSpec) -> Self {
        Self {
            live,
            fleet,
            spec,
            peers: None,
            leader: None,
            clock: Arc::new(SystemTime::now),
            step: tokio::sync::Mutex::new(()),
        }
    }

    /// The same, judging every gate on the other replicas' evidence too,
    /// and rotating by itself only while `leader` says so.
    pub fn with_replicas(
        mut self,
        peers: Option<Arc<dyn rotation::PeerEvidence>>,
        leader: Option<watch::Receiver<bool>>,
    ) -> Self {
        self.peers = peers;
        self.leader = leader;
        self
    }

    /// Whether single-writer work runs here.
    pub fn is_leader(&self) -> bool {
        self.leader.as_ref().is_none_or(|l| *l.borrow())
    }

    /// What every gate is judged on: this replica's fleet, and the others'.
    pub fn evidence(&self, now: SystemTime) -> rotation::Evidence {
        let own = self.fleet.evidence(now);
        match &self.peers {
            Some(p) => {
                let mut e = own.merge(p.peers(), now);
                e.blocked.extend(p.blocking());
                e
            }
            None => own,
        }
    }

    /// The same, reading time from `clock`.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Takes `step`: `from` is a `cacerts` set to prepare instead of a new
    /// root; `force` skips the gate.
    ///
    /// # Errors
    /// [`StepError::Gated`] naming what is missing; [`StepError::Failed`]
    /// for a step that does not apply (nothing prepared, say), bad
    /// material, or a store that cannot be written. Nothing changes then.
    pub async fn take(
        &self,
        step: Step,
        from: Option<CaFiles>,
        force: bool,
    ) -> Result<Arc<AuthoritySet>, StepError> {
        let _one = self.step.lock().await;
        let now = (self.clock)();
        let current = self.live.current();
        let next = match step {
            Step::Prepare => {
                let td = self.spec.trust_domain.clone();
                let (algorithm, lifetime) = (self.spec.algorithm, self.spec.lifetime);
                // Key generation (RSA may take seconds) off the workers.
                let authority = tokio::task::spawn_blocking(move || {
                    let files = match from {
                        Some(f) => f,
                        None => Authority::generate_root(&td, algorithm, lifetime, now)?,
                    };
                    Authority::from_files(&files, &td, now)
                })
                .await
                .map_err(|e| Error::Config(format!("key generation task: {e}")))?
                .map_err(Error::from)?;
                current.prepare(authority, now).map_err(Error::from)?
            }
            Step::Activate => {
                let next = current.activate(now).map_err(Error::from)?;
                if !force {
                    rotation::check_activate(&current, &self.evidence(now), now).map_err(
                        |missing| StepError::Gated {
                            step: "activate",
                            missing,
                        },
                    )?;
                }
                next
            }
            Step::Retire => {
                let next = current.retire().map_err(Error::from)?;
                if !force {
                    rotation::check_retire(&current, &self.evidence(now), now).map_err(
                        |missing| StepError::Gated {
                            step: "retire",
                            missing,
                        },
                    )?;
                }
                next
            }
        };
        self.live.commit(next).await?;
        let set = self.live.current();
        tracing::info!(
            step = step.as_str(),
            forced = force,
            generation = set.generation(),
            active = set.active().id(),
            "root rotation step taken"
        );
        Ok(set)
    }

    /// The set, the fleet's confirmations and the next step's gate.
    pub fn status(&self) -> RotationStatus {
        let now = (self.clock)();
        status_of(
            &self.live.current(),
            &self.evidence(now),
            self.fleet.agents(),
            now,
        )
    }
}

/// `status` from a set and what is known of the fleet (offline: nothing).
pub fn status_of(
    set: &AuthoritySet,
    evidence: &rotation::Evidence,
    agents: Vec<AgentStatus>,
    now: SystemTime,
) -> RotationStatus {
    let (confirmed, known, behind) = evidence.confirmed(set.generation());
    let step = Step::next_for(set);
    let blocked_by = match step {
        Step::Prepare => Vec::new(),
        Step::Activate => rotation::check_activate(set, evidence, now)
            .err()
            .unwrap_or_default(),
        Step::Retire => rotation::check_retire(set, evidence, now)
            .err()
            .unwrap_or_default(),
    };
    RotationStatus {
        generation: set.generation(),
        authorities: set
            .members()
            .iter()
            .map(|m| AuthorityStatus {
                id: m.authority.id().to_owned(),
                state: m.state.as_str().to_owned(),
                since: rfc3339(m.since),
                not_after: rfc3339(m.authority.chain_not_after()),
                fingerprint: m.authority.fingerprint(),
                subject: m
                    .authority
                    .signer()
                    .parsed()
                    .map(|c| c.subject().to_string())
                    .unwrap_or_default(),
            })
            .collect(),
        confirmed,
        known,
        behind,
        agents,
        other_clients_until: evidence
            .ledger
            .issued_before(set.generation(), now)
            .map(rfc3339),
        copies: evidence.copies.clone(),
        next_step: Some(step.as_str().to_owned()),
        blocked_by,
    }
}

/// Automatic rotation: every `interval`, when the active authority has less
/// than `fraction` of its life left, starts a rotation; and drives any
/// rotation in progress on, one step each time its gate opens (so a
/// rotation an operator started is finished too). Each step is logged.
pub fn spawn_auto_rotation(
    rotator: Arc<Rotator>,
    fraction: f64,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut fleet = rotator.fleet.subscribe();
        let mut leader = rotator.leader.clone();
        let mut last_wait: Vec<String> = Vec::new();
        loop {
            if !rotator.is_leader() {
                // Another replica drives rotations; wait to lead.
                let changed = async {
                    match leader.as_mut() {
                        Some(l) => l.changed().await.is_ok(),
                        None => false,
                    }
                };
                tokio::select! {
                    ok = changed => if !ok { return },
                    _ = shutdown.changed() => return,
                }
                continue;
            }
            let set = rotator.live.current();
            let now = (rotator.clock)();
            let step = Step::next_for(&set);
            let due = step != Step::Prepare || rotation::rotation_due(&set, fraction, now);
            if due {
                if step == Step::Prepare {
                    tracing::warn!(
                        active = set.active().id(),
                        not_after = %rfc3339(set.active().chain_not_after()),
                        "automatic root rotation: the active authority has less than {:.0}% of its life left",
                        fraction * 100.0
                    );
                }
                match rotator.take(step, None, false).await {
                    Ok(set) => {
                        last_wait.clear();
                        tracing::info!(
                            step = step.as_str(),
                            generation = set.generation(),
                            "automatic root rotation: step taken"
                        );
                    }
                    // Logged when what it waits for changes, not each time.
                    Err(StepError::Gated { missing, .. }) if missing != last_wait => {
                        tracing::info!(
                            step = step.as_str(),
                            waiting_for = %missing.join("; "),
                            "automatic root rotation: waiting"
                        );
                        last_wait = missing;
                    }
                    Err(StepError::Gated { .. }) => {}
                    Err(e) => {
                        tracing::error!(step = step.as_str(), error = %e, "automatic root rotation: step failed")
                    }
                }
            }
            // Mid-rotation with other replicas, their agents' confirmations
            // arrive through their reports: look again soon.
            let wait = if due && rotator.peers.is_some() {
                interval.min(PEER_RECHECK)
            } else {
                interval
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                // Agents confirming: look again soon, mid-rotation only, a
                // burst of reports taken as one.
                r = fleet.changed(), if due => {
                    if r.is_err() { return }
                    tokio::time::sleep(AUTO_DEBOUNCE).await;
                    fleet.borrow_and_update();
                }
                _ = shutdown.changed() => return,
            }
        }
    })
}

/// How often the automatic rotation looks at a rotation in progress when
/// other replicas' evidence counts.
const PEER_RECHECK: Duration = Duration::from_secs(2);

/// How long the automatic rotation lets agents' reports pile up before it
/// looks at them.
const AUTO_DEBOUNCE: Duration = Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::KeyAlgorithm;
    use crate::ca::keystore::load_or_create;

    use crate::identity::TrustDomain;

    /// The active root lives 1000 s (plus the 120 s backdate); at 20%,
    /// rotation is due 224 s before its end, 776 s after creation. The
    /// clock follows tokio's paused time.
    #[tokio::test(start_paused = true)]
    async fn automatic_rotation_starts_at_the_threshold_and_runs_every_step() {
        let tmp = tempfile::tempdir().unwrap();
        let store = crate::ca::DirStore::new(tmp.path().join("ca"));
        let real = SystemTime::now();
        let t0 = tokio::time::Instant::now();
        let clock: Clock = Arc::new(move || real + t0.elapsed());
        let spec = RootSpec {
            trust_domain: TrustDomain::new("td").unwrap(),
            algorithm: KeyAlgorithm::EcdsaP256,
            lifetime: Duration::from_secs(1000),
        };
        let (set, _) = load_or_create(&store, &spec, None, real).await.unwrap();
        let first = set.active().id().to_owned();
        let live = Arc::new(LiveCa::new(set, Arc::new(store.clone())));
        let fleet = Arc::new(Fleet::new(Default::default(), 50, real));
        let rotator = Arc::new(Rotator::new(live.clone(), fleet, spec).with_clock(clock));
        let (stop, shutdown) = watch::channel(false);
        let task = spawn_auto_rotation(rotator, 0.2, Duration::from_secs(60), shutdown);

        let mut sets = live.subscribe();
        let mut changes = Vec::new();
        while changes.len() < 3 {
            tokio::time::timeout(Duration::from_secs(2000), sets.changed())
                .await
                .expect("the rotation goes on")
                .unwrap();
            let set = sets.borrow_and_update().clone();
            changes.push((
                t0.elapsed().as_secs(),
                set.generation(),
                Step::next_for(&set),
            ));
        }
        let (at, generation, next) = changes[0];
        assert!(
            (776..=840).contains(&at),
            "prepared at {at} s, due at 776 s, checked every 60 s"
        );
        assert_eq!((generation, next), (2, Step::Activate));
        assert_eq!((changes[1].1, changes[1].2), (3, Step::Retire));
        assert_eq!((changes[2].1, changes[2].2), (4, Step::Prepare));
        let done = live.current();
        assert_ne!(done.active().id(), first);
        assert_eq!(done.members().len(), 1);
        // Stored, not only published.
        assert_eq!(store.load().await.unwrap().unwrap().generation, 4);
        // The new root is not due for another 776 s.
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(live.current().generation(), 4);
        stop.send_replace(true);
        task.await.unwrap();
    }
}
