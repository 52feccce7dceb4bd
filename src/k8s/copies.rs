//! The engine behind the controllers that keep copies of the CA's material
//! in the cluster (secret-mode Secrets [`super::secrets`], root ConfigMaps
//! [`super::rootcm`]): level-triggered from watch caches, single-writer
//! under the Lease, paced by a shared token bucket, bounded in concurrency,
//! and counted for the rotation gates ([`crate::ca::rotation::Copies`]).
//!
//! Each pass compares what should exist (a [`Copier`]'s `wanted`) with
//! what the watch saw (a small verdict per object, never its data), and
//! queues every object that is missing or not current; queued objects are
//! judged again just before their write, so a change that arrived in
//! between is never overwritten with an older decision. A restart or a
//! change of leader starts from the caches again: what is current is never
//! rewritten.
//!
//! Writes: create (409: the cache will bring the object; looked at again
//! after a second) or update with the observed resourceVersion as
//! precondition (409: requeued after the watch caught up). Nothing is
//! deleted here but an object of our own that cannot be repaired in place
//! (see the copiers).

use crate::sync::LockExt;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::Error;
use super::events::Recorder;
use super::pace::TokenBucket;
use crate::ca::AuthoritySet;
use crate::ca::rotation::{Copies, CopyCounter};

pub use super::observed::{Key, Observed, Seen, Shared, WATCH_DOWN_GRACE, shown};

/// How an object compares with what it should hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// Holds what the live set calls for; to be rewritten at `refresh_at`.
    Current {
        /// When it is to be rewritten; `None`: not until the set changes.
        refresh_at: Option<SystemTime>,
    },
    /// Missing or not current: why.
    Write(&'static str),
    /// Not ours: left alone, reported.
    Foreign(&'static str),
}

/// How a write went.
pub enum Written<F> {
    /// Created (`true`) or updated, and what the answer holds.
    Done(bool, Key, Seen<F>),
    /// Another writer changed it first (409): looked at again once the
    /// watch caught up.
    Conflict,
    /// Found not to be ours (an object the watch does not show).
    Foreign(&'static str),
    /// Failed; retried with a back-off.
    Failed(Error),
}

/// The boxed future of a write.
pub type WriteFuture<F> = Pin<Box<dyn Future<Output = Written<F>> + Send>>;

/// What the engine reads of any object's verdict, ours or not.
pub trait CopyFacts {
    /// Labelled as ours.
    fn ours(&self) -> bool;
    /// SHA-256 of the bundle it holds, if any: a copy that is not ours (or
    /// ours outside the selection) holds the rotation gates unless it
    /// holds the live bundle, since its readers would not trust a new root.
    fn bundle(&self) -> Option<[u8; 32]>;
}

/// One kind of copies.
pub trait Copier: Send + Sync + 'static {
    /// What a wanted object is made from (its service account).
    type Want: Clone + Send + Sync + 'static;
    /// The verdict kept per observed object.
    type Facts: CopyFacts + Clone + Send + Sync + 'static;
    /// Metric label (`secrets`).
    const LABEL: &'static str;
    /// What they are, for the rotation status (`Secrets istio.<sa>`).
    const KIND: &'static str;
    /// The object's kind, for Events (`Secret`).
    const OBJECT_KIND: &'static str;
    /// The Event reason for a foreign object.
    const FOREIGN_REASON: &'static str;

    /// Every object that should exist now; `None` while the inputs are
    /// not synced.
    fn wanted(&self) -> Option<Vec<(Key, Self::Want)>>;

    /// The watch's verdicts.
    fn observed(&self) -> &Shared<Self::Facts>;

    /// How `seen` compares with what `set` calls for at `now`.
    fn judge(
        &self,
        key: &Key,
        want: &Self::Want,
        seen: Option<&Seen<Self::Facts>>,
        set: &AuthoritySet,
        now: SystemTime,
    ) -> Judgement;

    /// Writes `key` for `set`: created when `existing` (uid,
    /// resourceVersion) is `None`, else updated with that precondition.
    fn write(
        self: Arc<Self>,
        key: Key,
        want: Self::Want,
        existing: Option<(String, String)>,
        set: Arc<AuthoritySet>,
    ) -> WriteFuture<Self::Facts>;
}

/// Metrics of every copier, by kind.
#[derive(Clone)]
pub struct CopyMetrics {
    objects: IntGaugeVec,
    writes: IntCounterVec,
}

impl CopyMetrics {
    /// Registers them.
    ///
    /// # Errors
    /// [`Error::Config`] if they cannot be registered.
    pub fn register(registry: &Registry) -> Result<Self, Error> {
        let err = |e: prometheus::Error| Error::Config(format!("metrics: {e}"));
        let objects = IntGaugeVec::new(
            Opts::new(
                "workload_ca_bundle_copies",
                "Copies of the CA's material kept in the cluster (leader only), by kind and state: total (ours to keep), current, pending, foreign (same name, not ours: left alone).",
            ),
            &["kind", "state"],
        )
        .map_err(err)?;
        registry.register(Box::new(objects.clone())).map_err(err)?;
        let writes = IntCounterVec::new(
            Opts::new(
                "workload_ca_bundle_copy_writes_total",
                "Writes of copies of the CA's material, by kind and outcome (created, updated, conflict, foreign, error).",
            ),
            &["kind", "outcome"],
        )
        .map_err(err)?;
        registry.register(Box::new(writes.clone())).map_err(err)?;
        Ok(Self { objects, writes })
    }

    fn set(&self, kind: &str, state: &str, n: usize) {
        self.objects
            .with_label_values(&[kind, state])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    fn wrote(&self, kind: &str, outcome: &str) {
        self.writes.with_label_values(&[kind, outcome]).inc();
    }
}

/// How the engine runs.
#[derive(Clone)]
pub struct EngineOptions {
    /// Paces the writes (shared by every engine).
    pub bucket: Arc<TokenBucket>,
    /// Writes in flight at once.
    pub concurrency: usize,
    /// `--bundle-propagation`, reported in [`Copies`].
    pub propagation: Duration,
    /// How often progress is logged while work is pending.
    pub progress_every: Duration,
}

/// What the last pass counted, for the rotation gates.
#[derive(Default)]
struct Summary {
    writing: bool,
    generation: u64,
    total: usize,
    current: usize,
    settled_since: Option<SystemTime>,
    behind: Vec<String>,
}

/// A copier, run under the Lease.
pub struct Engine<C: Copier> {
    copier: Arc<C>,
    dirty: Arc<Notify>,
    authorities: watch::Receiver<Arc<AuthoritySet>>,
    opts: EngineOptions,
    metrics: CopyMetrics,
    events: Recorder,
    summary: Arc<Mutex<Summary>>,
    /// The live bundle's digest, for copies this engine does not judge.
    digest: super::secrets::BundleDigest,
}

/// The longest a failing object waits before it is tried again.
const MAX_RETRY: Duration = Duration::from_secs(60);
/// How long a pass may be put off while writes are queued.
const RESCAN_WHILE_BUSY: Duration = Duration::from_secs(1);

/// Keys waiting for a retry, with their next attempt and failure count.
type Backoff = HashMap<Key, (Instant, u32)>;
/// Objects to write, in order.
type Queue<W> = VecDeque<(Key, W)>;

impl<C: Copier> Engine<C> {
    /// An engine writing `copier`'s objects, woken by `dirty` and by changes of `authorities`.
    pub fn new(
        copier: Arc<C>,
        dirty: Arc<Notify>,
        authorities: watch::Receiver<Arc<AuthoritySet>>,
        opts: EngineOptions,
        metrics: CopyMetrics,
        events: Recorder,
    ) -> Self {
        Self {
            copier,
            dirty,
            authorities,
            opts,
            metrics,
            events,
            summary: Arc::default(),
            digest: super::secrets::BundleDigest::default(),
        }
    }

    /// Whether `seen` holds the live bundle.
    fn holds_live_bundle(&self, seen: Option<&Seen<C::Facts>>, set: &AuthoritySet) -> bool {
        seen.and_then(|s| s.facts.bundle()) == Some(self.digest.of(set))
    }

    /// The counter of these copies for the rotation evidence: the last
    /// pass's count while this replica writes them, else "not writing".
    pub fn counter(&self) -> CopyCounter {
        let summary = self.summary.clone();
        let observed = self.copier.observed().clone();
        let propagation = self.opts.propagation;
        Arc::new(move |_now| {
            let s = summary.locked();
            if !s.writing {
                return Copies::not_writing(C::KIND);
            }
            // While the watch is down, edits and deletions by others are
            // unseen: the last count vouches for nothing.
            let down = observed
                .locked()
                .broken_for()
                .filter(|d| *d >= WATCH_DOWN_GRACE);
            if let Some(d) = down {
                return Copies {
                    kind: C::KIND.to_owned(),
                    writer: true,
                    generation: s.generation,
                    total: s.total,
                    current: 0,
                    settled_since: None,
                    propagation,
                    behind: vec![format!("their watch has been down for {} s", d.as_secs())],
                };
            }
            Copies {
                kind: C::KIND.to_owned(),
                writer: true,
                generation: s.generation,
                total: s.total,
                current: s.current,
                settled_since: s.settled_since,
                propagation,
                behind: s.behind.clone(),
            }
        })
    }

    /// Forgets the last term's count: a replica that does not lead
    /// reports "not writing" (writing is claimed again by a term's first
    /// pass, not by leadership alone).
    fn stop_writing(&self) {
        *self.summary.locked() = Summary::default();
    }

    /// Runs until `shutdown`: passes while `leader` says this replica leads.
    pub async fn run(self, mut leader: watch::Receiver<bool>, mut shutdown: watch::Receiver<bool>) {
        loop {
            while !*leader.borrow_and_update() {
                tokio::select! {
                    r = leader.changed() => if r.is_err() { return },
                    _ = shutdown.changed() => return,
                }
            }
            tracing::info!(kind = C::LABEL, "leading: keeping the copies");
            self.term(&mut leader, &mut shutdown).await;
            self.stop_writing();
            if *shutdown.borrow() {
                return;
            }
            tracing::info!(kind = C::LABEL, "no longer leading: stopped writing copies");
        }
    }

    /// One leadership term: returns when it ends or at shutdown. Writes in
    /// flight are abandoned at once.
    async fn term(&self, leader: &mut watch::Receiver<bool>, shutdown: &mut watch::Receiver<bool>) {
        let mut writes: JoinSet<(Key, Written<C::Facts>)> = JoinSet::new();
        let mut inflight: HashSet<Key> = HashSet::new();
        let mut backoff: Backoff = HashMap::new();
        let mut queue: VecDeque<(Key, C::Want)> = VecDeque::new();
        let mut authorities = self.authorities.clone();
        let mut need_scan = true;
        let mut last_scan: Option<Instant> = None;
        let mut wake: Option<Instant> = None;
        let mut progress = Progress::new(C::LABEL, self.opts.progress_every);
        loop {
            let busy = !queue.is_empty();
            let due =
                need_scan && (!busy || last_scan.is_none_or(|t| t.elapsed() >= RESCAN_WHILE_BUSY));
            if due {
                need_scan = false;
                last_scan = Some(Instant::now());
                match self.scan(&inflight, &backoff) {
                    Some((q, next)) => {
                        queue = q;
                        wake = next;
                        let (total, current, generation) = {
                            let s = self.summary.locked();
                            (s.total, s.current, s.generation)
                        };
                        progress.report(total, current, generation, queue.len() + inflight.len());
                    }
                    None => wake = Some(Instant::now() + Duration::from_millis(200)),
                }
            }
            let can_write = !queue.is_empty() && writes.len() < self.opts.concurrency.max(1);
            let rescan_at = if need_scan {
                last_scan.map(|t| t + RESCAN_WHILE_BUSY)
            } else {
                None
            };
            let sleep_until = match (wake, rescan_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                biased;
                _ = shutdown.changed() => { writes.abort_all(); return; }
                r = leader.changed() => {
                    if r.is_err() || !*leader.borrow_and_update() {
                        writes.abort_all();
                        return;
                    }
                }
                Some(done) = writes.join_next(), if !writes.is_empty() => {
                    if let Ok((key, result)) = done {
                        inflight.remove(&key);
                        self.settle(key, result, &mut backoff, &mut progress);
                        need_scan = true;
                    }
                }
                r = authorities.changed() => {
                    if r.is_err() { return; }
                    // A new set: every queued decision is stale.
                    queue.clear();
                    need_scan = true;
                    last_scan = None;
                }
                _ = self.dirty.notified() => need_scan = true,
                _ = self.opts.bucket.take(), if can_write => {
                    if let Some((key, want)) = queue.pop_front() {
                        self.start(key, want, &mut writes, &mut inflight);
                    }
                }
                _ = sleep_opt(sleep_until) => {
                    need_scan = true;
                    wake = None;
                }
            }
        }
    }

    /// Judges `key` again (the cache may have moved since the pass) and
    /// starts its write if it still needs one.
    fn start(
        &self,
        key: Key,
        want: C::Want,
        writes: &mut JoinSet<(Key, Written<C::Facts>)>,
        inflight: &mut HashSet<Key>,
    ) {
        let set = self.authorities.borrow().clone();
        let now = SystemTime::now();
        let existing = {
            let observed = self.copier.observed().locked();
            let seen = observed.get(&key);
            match self.copier.judge(&key, &want, seen, &set, now) {
                Judgement::Write(_) => {}
                _ => return,
            }
            seen.map(|s| (s.uid.clone(), s.resource_version.clone()))
        };
        inflight.insert(key.clone());
        let fut = self.copier.clone().write(key.clone(), want, existing, set);
        writes.spawn(async move { (key, fut.await) });
    }

    fn settle(
        &self,
        key: Key,
        result: Written<C::Facts>,
        backoff: &mut Backoff,
        progress: &mut Progress,
    ) {
        match result {
            Written::Done(created, k, seen) => {
                backoff.remove(&key);
                self.metrics
                    .wrote(C::LABEL, if created { "created" } else { "updated" });
                progress.written += 1;
                self.copier.observed().locked().note_written(k, seen);
            }
            Written::Conflict => {
                self.metrics.wrote(C::LABEL, "conflict");
                backoff.insert(key, (Instant::now() + Duration::from_secs(1), 0));
            }
            Written::Foreign(reason) => {
                self.metrics.wrote(C::LABEL, "foreign");
                self.events
                    .foreign(C::OBJECT_KIND, &key, None, C::FOREIGN_REASON, reason);
                backoff.insert(key, (Instant::now() + MAX_RETRY * 5, 0));
            }
            Written::Failed(e) => {
                self.metrics.wrote(C::LABEL, "error");
                let n = backoff.get(&key).map_or(0, |(_, n)| *n) + 1;
                let wait = (Duration::from_secs(1) * 2u32.saturating_pow(n.min(6))).min(MAX_RETRY);
                tracing::warn!(kind = C::LABEL, object = %shown(&key), error = %e, retry_in = ?wait, "writing a copy failed");
                backoff.insert(key, (Instant::now() + wait, n));
            }
        }
    }

    /// One pass: counts, reports foreign objects, and returns the queue
    /// and when the next refresh is due; `None` while inputs are not synced.
    fn scan(
        &self,
        inflight: &HashSet<Key>,
        backoff: &Backoff,
    ) -> Option<(Queue<C::Want>, Option<Instant>)> {
        let wanted = self.copier.wanted()?;
        let set = self.authorities.borrow().clone();
        let now = SystemTime::now();
        let now_i = Instant::now();
        let mut queue = VecDeque::new();
        let mut current = 0usize;
        let mut foreign = 0usize;
        let mut behind = Vec::new();
        let mut next: Option<SystemTime> = None;
        let mut retry: Option<Instant> = None;
        {
            let observed = self.copier.observed().locked();
            if !observed.synced() {
                return None;
            }
            for (key, want) in wanted.iter() {
                let seen = observed.get(key);
                match self.copier.judge(key, want, seen, &set, now) {
                    Judgement::Current { refresh_at } => {
                        current += 1;
                        if let Some(t) = refresh_at {
                            next = Some(next.map_or(t, |n| n.min(t)));
                        }
                    }
                    Judgement::Foreign(reason) => {
                        foreign += 1;
                        // Counted: its readers need the new root too.
                        if self.holds_live_bundle(seen, &set) {
                            current += 1;
                        } else if behind.len() < Copies::MAX_BEHIND {
                            behind.push(format!("{} (not ours)", shown(key)));
                        }
                        self.events.foreign(
                            C::OBJECT_KIND,
                            key,
                            seen.map(|s| s.uid.as_str()),
                            C::FOREIGN_REASON,
                            reason,
                        );
                    }
                    Judgement::Write(_) => {
                        if behind.len() < Copies::MAX_BEHIND {
                            behind.push(shown(key));
                        }
                        if inflight.contains(key) {
                            continue;
                        }
                        if let Some((at, _)) = backoff.get(key).filter(|(at, _)| *at > now_i) {
                            retry = Some(retry.map_or(*at, |r| r.min(*at)));
                            continue;
                        }
                        queue.push_back((key.clone(), want.clone()));
                    }
                }
            }
        }
        // Ours, but no longer wanted (its namespace left the selector or is
        // now excluded): not rewritten, still read by whoever mounts it, so
        // counted until it holds the live bundle or someone deletes it.
        let mut orphans = 0usize;
        {
            let observed = self.copier.observed().locked();
            let wanted_keys: HashSet<&Key> = wanted.iter().map(|(k, _)| k).collect();
            for (key, seen) in observed.iter() {
                if wanted_keys.contains(key) || !seen.facts.ours() || !observed.confirmed(key) {
                    continue;
                }
                orphans += 1;
                if self.holds_live_bundle(Some(seen), &set) {
                    current += 1;
                } else if behind.len() < Copies::MAX_BEHIND {
                    behind.push(format!(
                        "{} (ours, outside the selected namespaces)",
                        shown(key)
                    ));
                }
            }
        }
        let total = wanted.len() + orphans;
        {
            let mut s = self.summary.locked();
            let settled = if current == total {
                match s.settled_since {
                    Some(t) if s.writing && s.generation == set.generation() => Some(t),
                    _ => Some(now),
                }
            } else {
                None
            };
            *s = Summary {
                writing: true,
                generation: set.generation(),
                total,
                current,
                settled_since: settled,
                behind,
            };
        }
        self.metrics.set(C::LABEL, "total", total);
        self.metrics.set(C::LABEL, "current", current);
        self.metrics.set(C::LABEL, "pending", total - current);
        self.metrics.set(C::LABEL, "foreign", foreign);
        let refresh = next.map(|t| {
            let d = t.duration_since(now).unwrap_or(Duration::ZERO);
            now_i + d
        });
        let wake = match (refresh, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Some((queue, wake))
    }
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Periodic progress lines while work is pending.
struct Progress {
    kind: &'static str,
    every: Duration,
    last: Instant,
    written: u64,
    written_at_last: u64,
    was_pending: bool,
}

impl Progress {
    fn new(kind: &'static str, every: Duration) -> Self {
        Self {
            kind,
            every,
            last: Instant::now(),
            written: 0,
            written_at_last: 0,
            was_pending: false,
        }
    }

    fn report(&mut self, total: usize, current: usize, generation: u64, pending: usize) {
        let kind = self.kind;
        if pending == 0 && current == total {
            if self.was_pending {
                tracing::info!(
                    kind,
                    total,
                    generation,
                    written = self.written,
                    "copies: all {total} current"
                );
                self.was_pending = false;
            }
            return;
        }
        let since = self.last.elapsed();
        if self.was_pending && since < self.every {
            return;
        }
        let rate = (self.written - self.written_at_last) as f64 / since.as_secs_f64().max(0.001);
        tracing::info!(
            kind,
            current,
            total,
            pending = total - current,
            generation,
            rate = format!("{rate:.1}/s"),
            "copies: {current} of {total} current"
        );
        self.was_pending = true;
        self.last = Instant::now();
        self.written_at_last = self.written;
    }
}

#[cfg(test)]
#[path = "copies_tests.rs"]
mod tests;
