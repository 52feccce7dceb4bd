//! Rotation property, shared by `fuzz_targets/rotation.rs` and
//! `tests/properties.rs`: whatever sequence of steps (prepare, activate,
//! retire, through their gates or forced, retried, abandoned, with the
//! clock moving either way) and whatever set is loaded (any members in any
//! states), the CA's authority set always has exactly one active signer,
//! which signs a leaf whenever it is within its validity (and always just
//! after it was activated), and a step that fails leaves the set as it was.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use workload_ca::ca::keystore::{KeyStore, StoreFuture, Stored};
use workload_ca::ca::rotation::{AgentView, Evidence, check_activate, check_retire};
use workload_ca::ca::{
    Authority, AuthoritySet, AuthorityState as State, CaFiles, CheckedCsr, KeyAlgorithm, Member,
    PrivateKey, check_own_key,
};
use workload_ca::identity::{SpiffeId, TrustDomain};
use workload_ca::server::rotate::LiveCa;
use x509_parser::prelude::{FromDer, X509Certificate};

pub const TRUST_DOMAIN: &str = "fuzz.test";
const DAY: u64 = 86_400;

/// Authorities to draw from (made once: key generation is the slow part).
pub struct Pool {
    /// `(files, trust domain)`: valid for ten years from `start` (0 to 3),
    /// for two hours (4), from 30 days after `start` (5), another trust
    /// domain (6).
    pub files: Vec<(CaFiles, TrustDomain)>,
    pub start: SystemTime,
    /// A key whose CSR every step's signer is asked to sign.
    pub probe: CheckedCsr,
    pub caller: SpiffeId,
}

impl Pool {
    /// # Panics
    /// When an authority cannot be generated.
    pub fn generate(start: SystemTime) -> Self {
        let td = TrustDomain::new(TRUST_DOMAIN).unwrap();
        let other = TrustDomain::new("other.test").unwrap();
        let root = |td: &TrustDomain, from: SystemTime, life: u64| {
            let files = Authority::generate_root(
                td,
                KeyAlgorithm::EcdsaP256,
                Duration::from_secs(life),
                from,
            )
            .unwrap();
            (files, td.clone())
        };
        let mut files: Vec<_> = (0..4).map(|_| root(&td, start, 3650 * DAY)).collect();
        files.push(root(&td, start, 7200));
        files.push(root(&td, start + Duration::from_secs(30 * DAY), 365 * DAY));
        files.push(root(&other, start, 3650 * DAY));
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        Self {
            files,
            start,
            probe: check_own_key(&key).unwrap(),
            caller: SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/probe"))
                .unwrap(),
        }
    }

    /// Authority `i` (modulo the pool), as `ca rotate-root prepare` would
    /// read its files: for its own trust domain (the set refuses one of
    /// another).
    fn authority(&self, i: u8, now: SystemTime) -> Option<Authority> {
        let (files, td) = &self.files[usize::from(i) % self.files.len()];
        Authority::from_files_any_time(files, td, now).ok()
    }

    /// Authority `i` as the store loads it: for the CA's trust domain
    /// (one of another is refused there).
    fn stored(&self, i: u8, now: SystemTime) -> Option<Authority> {
        let (files, _) = &self.files[usize::from(i) % self.files.len()];
        let td = TrustDomain::new(TRUST_DOMAIN).ok()?;
        Authority::from_files_any_time(files, &td, now).ok()
    }
}

/// One thing that can happen to the set.
#[derive(Clone, Debug)]
pub enum Op {
    /// `prepare` with pool authority `i` (valid, short-lived, not yet
    /// valid, another trust domain, or one already in the set).
    Prepare(u8),
    /// `activate`, forced (no gate).
    Activate,
    /// `retire`, forced.
    Retire,
    /// `activate` if `check_activate` allows it, with agents that ACKed
    /// the given generations.
    GatedActivate(Vec<u64>),
    /// `retire` if `check_retire` allows it, with agents holding a leaf of
    /// the retiring authority until `now` plus the given seconds.
    GatedRetire(Vec<u64>),
    /// The step is computed and committed through the server's path onto
    /// a store whose write fails: the commit must fail and the set the CA
    /// publishes must not have changed.
    Abandon(Box<Op>),
    /// A set loaded as is (from a store someone else wrote): members by
    /// pool index and state (0 prepared, 1 active, 2 retiring), at a
    /// generation.
    Load(Vec<(u8, u8)>, u64),
    /// The clock moves forward.
    Forward(u32),
    /// The clock moves back.
    Back(u32),
}

/// A store whose every write fails, as a full or read-only disk or an API
/// server that refuses the update.
struct FailingStore;

impl KeyStore for FailingStore {
    fn describe(&self) -> String {
        "a store whose writes fail".into()
    }
    fn load(&self) -> StoreFuture<'_, Option<Stored>> {
        Box::pin(async { Ok(None) })
    }
    fn generation(&self) -> StoreFuture<'_, Option<u64>> {
        Box::pin(async { Ok(None) })
    }
    fn swap<'a>(&'a self, _: Option<u64>, _: &'a Stored) -> StoreFuture<'a, bool> {
        Box::pin(async {
            Err(workload_ca::ca::Error::Store {
                location: "fuzz".into(),
                reason: "No space left on device".into(),
            })
        })
    }
}

/// Commits `next` through the server's own path ([`LiveCa::commit`]) onto
/// a copy of `set` whose store refuses the write: the commit must fail,
/// and the set the live CA publishes must be `set` as it was.
fn abandoned_commit(set: &AuthoritySet, next: AuthoritySet) -> Result<(), String> {
    let copy = AuthoritySet::new(set.members().to_vec(), set.generation())
        .map_err(|e| format!("the set in use does not load again: {e}"))?;
    let live = LiveCa::new(copy, Arc::new(FailingStore));
    let before = shape(&live.current());
    let mut commit = std::pin::pin!(live.commit(next));
    // Nothing in the commit waits on anything but the store, which answers
    // at once: one poll finishes it.
    let mut cx = Context::from_waker(Waker::noop());
    let Poll::Ready(result) = commit.as_mut().poll(&mut cx) else {
        return Err("a commit onto a failing store did not finish at once".into());
    };
    match result {
        Ok(()) => return Err("a commit succeeded although its store write failed".into()),
        // Refused before the store (the step does not follow the set in
        // use, a loaded set): nothing to check about the store.
        Err(workload_ca::server::Error::Config(_)) => {}
        Err(workload_ca::server::Error::Ca(workload_ca::ca::Error::Store { .. })) => {}
        Err(e) => return Err(format!("a commit failed for another reason: {e}")),
    }
    if shape(&live.current()) != before {
        return Err("a commit whose store write failed changed the published set".into());
    }
    Ok(())
}

/// The state machine: the set in use and the clock.
pub struct Machine<'a> {
    pub pool: &'a Pool,
    pub set: Arc<AuthoritySet>,
    pub now: SystemTime,
}

/// A set's shape, to see that it did not change.
fn shape(set: &AuthoritySet) -> (u64, Vec<(String, State)>) {
    let members = set
        .members()
        .iter()
        .map(|m| (m.authority.id().to_owned(), m.state))
        .collect();
    (set.generation(), members)
}

impl<'a> Machine<'a> {
    /// A CA started with pool authority 0 active.
    ///
    /// # Panics
    /// When it cannot be built.
    pub fn new(pool: &'a Pool) -> Self {
        let now = pool.start;
        let a = pool.authority(0, now).unwrap();
        Self {
            pool,
            set: Arc::new(AuthoritySet::single_since(a, now).unwrap()),
            now,
        }
    }

    /// What `op` makes of the set, `None` when it does not apply.
    fn step(&self, op: &Op) -> Result<Option<AuthoritySet>, String> {
        let set = &self.set;
        let now = self.now;
        Ok(match op {
            Op::Prepare(i) => match self.pool.authority(*i, now) {
                Some(a) => set.prepare(a, now).ok(),
                None => None,
            },
            Op::Activate => set.activate(now).ok(),
            Op::Retire => set.retire().ok(),
            Op::GatedActivate(acks) => {
                let evidence = Evidence {
                    agents: agents(acks.iter().map(|g| (*g, Vec::new()))),
                    ..Evidence::default()
                };
                let open = check_activate(set, &evidence, now).is_ok();
                if open && acks.iter().any(|g| *g < set.generation()) {
                    return Err("check_activate opened with an agent behind".into());
                }
                if open { set.activate(now).ok() } else { None }
            }
            Op::GatedRetire(holds) => {
                let retiring: Vec<String> = set
                    .members()
                    .iter()
                    .filter(|m| m.state == State::Retiring)
                    .map(|m| m.authority.id().to_owned())
                    .collect();
                let leaves = holds.iter().map(|s| {
                    let until = now + Duration::from_secs(*s);
                    (
                        set.generation(),
                        retiring.iter().map(|id| (id.clone(), until)).collect(),
                    )
                });
                let evidence = Evidence {
                    agents: agents(leaves),
                    ..Evidence::default()
                };
                let open = check_retire(set, &evidence, now).is_ok();
                if open && holds.iter().any(|s| *s > 0) && !retiring.is_empty() {
                    return Err("check_retire opened while an agent serves a retiring leaf".into());
                }
                if open { set.retire().ok() } else { None }
            }
            Op::Abandon(inner) => {
                let before = shape(set);
                if let Some(next) = self.step(inner)? {
                    abandoned_commit(set, next)?;
                }
                if shape(set) != before {
                    return Err("computing a step changed the set in use".into());
                }
                None
            }
            Op::Load(members, generation) => {
                let mut ms = Vec::new();
                for (i, s) in members {
                    let Some(a) = self.pool.stored(*i, now) else {
                        return Ok(None);
                    };
                    let state = match s % 3 {
                        0 => State::Prepared,
                        1 => State::Active,
                        _ => State::Retiring,
                    };
                    ms.push(Member {
                        authority: Arc::new(a),
                        state,
                        since: now,
                    });
                }
                let count = |s: State| ms.iter().filter(|m| m.state == s).count();
                let one_td = ms
                    .iter()
                    .all(|m| m.authority.trust_domain().as_str() == TRUST_DOMAIN);
                let valid = count(State::Active) == 1 && count(State::Prepared) <= 1 && one_td;
                let loaded = AuthoritySet::new(ms, *generation);
                if loaded.is_ok() != valid {
                    return Err(format!(
                        "AuthoritySet::new said {} to a set the rules call {valid}",
                        loaded.is_ok()
                    ));
                }
                loaded.ok()
            }
            Op::Forward(_) | Op::Back(_) => None,
        })
    }

    /// Applies `op` and checks the invariants.
    ///
    /// # Errors
    /// The invariant broken.
    pub fn apply(&mut self, op: &Op) -> Result<(), String> {
        // The clock stays between 1970 and 9000: a `now` outside the years
        // 0 to 9999 makes rcgen panic (yasna cannot write the time) in the
        // throw-away leaf `Authority::from_files_any_time` signs, which the
        // fuzzer found; no real clock is there.
        let (min, max) = (
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::from_secs(7030 * 365 * DAY),
        );
        let minutes = |s: &u32| Duration::from_secs(u64::from(*s) * 60);
        match op {
            Op::Forward(s) => self.now = (self.now + minutes(s)).min(max),
            Op::Back(s) => self.now = self.now.checked_sub(minutes(s)).unwrap_or(min).max(min),
            _ => {}
        }
        let before = self.set.generation();
        let next = self.step(op)?;
        let stepped = next.is_some();
        if let Some(next) = next {
            let loaded = matches!(op, Op::Load(..));
            if !loaded && next.generation() <= before {
                return Err(format!(
                    "{op:?} did not raise the generation ({before} -> {})",
                    next.generation()
                ));
            }
            self.set = Arc::new(next);
        }
        let activated = stepped && matches!(op, Op::Activate | Op::GatedActivate(_));
        check(&self.set, self.pool, self.now, activated).map_err(|e| format!("after {op:?}: {e}"))
    }
}

fn agents(reports: impl Iterator<Item = (u64, Vec<(String, SystemTime)>)>) -> Vec<AgentView> {
    reports
        .enumerate()
        .map(|(i, (acked, leaves))| AgentView {
            name: format!("agent-{i}"),
            connected: true,
            acked_generation: acked,
            leaves: leaves.into_iter().collect(),
        })
        .collect()
}

/// The invariants of one set at `now`: exactly one active member, which
/// is what `active()` answers; at most one prepared; one trust domain; a
/// bundle of every member's roots; an active signer that signs (a leaf
/// that verifies with its key) whenever it is valid, and is valid when it
/// was `just_activated`.
///
/// # Errors
/// The invariant broken.
pub fn check(
    set: &AuthoritySet,
    pool: &Pool,
    now: SystemTime,
    just_activated: bool,
) -> Result<(), String> {
    let active: Vec<&Member> = set
        .members()
        .iter()
        .filter(|m| m.state == State::Active)
        .collect();
    let [active] = active.as_slice() else {
        return Err(format!("{} active authorities", active.len()));
    };
    if set.active().id() != active.authority.id() {
        return Err("active() is not the active member".into());
    }
    if set
        .members()
        .iter()
        .filter(|m| m.state == State::Prepared)
        .count()
        > 1
    {
        return Err("more than one prepared authority".into());
    }
    if set
        .members()
        .iter()
        .any(|m| m.authority.trust_domain().as_str() != TRUST_DOMAIN)
    {
        return Err("a member of another trust domain".into());
    }
    for m in set.members() {
        for r in m.authority.roots().roots() {
            if !set.bundle().contains(r.der()) {
                return Err(format!(
                    "the bundle lacks the root of {:?} member {}",
                    m.state,
                    m.authority.id()
                ));
            }
        }
    }
    let a = &active.authority;
    let valid = a.not_before().is_some_and(|nb| nb <= now) && now < a.chain_not_after();
    if just_activated && !valid {
        return Err("activated an authority that is not valid now".into());
    }
    if valid {
        let issued = set
            .sign_leaf(&pool.probe, &pool.caller, Duration::from_secs(600), now)
            .map_err(|e| format!("the active authority, valid now, does not sign: {e}"))?;
        let (_, leaf) = X509Certificate::from_der(&issued.leaf_der).map_err(|e| e.to_string())?;
        let (_, signer) = X509Certificate::from_der(a.signer().der()).map_err(|e| e.to_string())?;
        leaf.verify_signature(Some(signer.public_key()))
            .map_err(|e| format!("the leaf is not signed by the active authority: {e}"))?;
    }
    Ok(())
}
