//! Watch caches of the cluster's pods and service accounts: what a token's
//! bindings are checked against, with no API call per CSR.
//!
//! Each cache lists its kind (in pages), then watches from the list's
//! resourceVersion with bookmarks; a watch that ends is resumed from the
//! last version seen, and one the API server no longer remembers (410
//! Gone) is replaced by a new list. Only what the checks need is kept: for
//! a pod its UID, service account, node and whether it has finished; for a
//! service account its UID. Names are interned, so 10,000 pods cost a few
//! megabytes.
//!
//! Freshness: a cache is *synced* once its first list is in. While its
//! watch is broken (the API server unreachable), lookups still answer from
//! what it holds for up to [`CacheOptions::max_stale`] (signing continues
//! through an API-server outage), but readiness turns false after
//! [`CacheOptions::ready_grace`], so load balancers prefer replicas that
//! see the cluster. Past `max_stale` every lookup answers "not synced" and
//! tokens are refused as *unavailable* (callers retry) rather than judged
//! against a picture that old.
//!
//! An API server that goes silent (its host gone, a partition: no FIN, no
//! RST) fails no request by itself (the client's read timeout, longer than
//! a watch lasts, is only the last resort). So a watch that brings neither an event nor a bookmark for its own timeout
//! plus [`WATCH_IDLE_MARGIN`] (the server ends every watch at its timeout)
//! counts as broken since the last thing it brought, and a list page or a
//! watch that does not start within [`CacheOptions::request_timeout`]
//! fails. A silent API server is therefore noticed within about
//! `watch_timeout` + 5 s, and `max_stale` is counted from the last word
//! heard from it.
//!
//! Not checked here: nodes (a token's node claim is taken as signed), and
//! anything the API server does not tell a watcher (a pod deleted and its
//! deletion not yet delivered is still "there" for the watch's latency,
//! normally well under a second).

use crate::sync::LockExt;
use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::slim::{SlimPod as Pod, SlimServiceAccount as ServiceAccount};
use kube::Client;
use kube::api::Api;
use kube::core::ObjectMeta;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Error;
pub(crate) use super::reflect::{Change, Freshen, reflect};
use crate::ca::policy::{ClusterView, PodFacts};

/// How fresh the caches must be.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// How long lookups keep answering from a cache whose watch is broken.
    pub max_stale: Duration,
    /// How long a broken watch is tolerated before readiness turns false.
    pub ready_grace: Duration,
    /// Objects per page of a list.
    pub page_size: u32,
    /// How long each watch request lasts before it is renewed (seconds);
    /// also how long a silent API server can go unnoticed (plus
    /// [`WATCH_IDLE_MARGIN`]). Keep it below the client's read timeout
    /// ([`super::client::ClientOptions::read_timeout`]), or a quiet watch
    /// fails as a dead one.
    pub watch_timeout: u32,
    /// A label selector for lists and watches (none: every object).
    pub labels: Option<String>,
    /// A field selector for lists and watches (none: every object).
    pub fields: Option<String>,
    /// How long a list page, or the start of a watch, may take before it
    /// counts as failed.
    pub request_timeout: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            max_stale: Duration::from_secs(300),
            ready_grace: Duration::from_secs(10),
            page_size: 500,
            watch_timeout: 60,
            request_timeout: Duration::from_secs(30),
            labels: None,
            fields: None,
        }
    }
}

/// Longest back-off between attempts to list or watch.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How long past its own timeout a watch may bring nothing (no event, no
/// bookmark, not its end) before it is taken as broken (kube-runtime's
/// watcher allows the same).
pub const WATCH_IDLE_MARGIN: Duration = Duration::from_secs(5);

/// How one cache's watch is doing.
#[derive(Default)]
struct Freshness {
    /// The first list is in.
    synced: AtomicBool,
    /// Since when the watch has been failing, if it is.
    broken_since: Mutex<Option<Instant>>,
}

impl Freshness {
    fn ok(&self) {
        let mut b = self.broken_since.locked();
        *b = None;
    }

    fn broken(&self) {
        let mut b = self.broken_since.locked();
        b.get_or_insert_with(Instant::now);
    }

    /// Broken since `since` (the last word from the API server), unless
    /// already broken earlier.
    fn broken_since(&self, since: Instant) {
        let mut b = self.broken_since.locked();
        *b = Some(b.map_or(since, |earlier| earlier.min(since)));
    }

    /// Synced, and not broken for longer than `limit`.
    fn fresh_within(&self, limit: Duration) -> bool {
        if !self.synced.load(Ordering::Acquire) {
            return false;
        }
        self.broken_since
            .locked()
            .is_none_or(|since| since.elapsed() < limit)
    }
}

/// Shared copies of the names that repeat across pods.
#[derive(Default)]
struct Interner(HashSet<Arc<str>>);

impl Interner {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.0.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.0.insert(a.clone());
        a
    }
}

type Key = (Arc<str>, Arc<str>);

#[derive(Clone)]
struct PodEntry {
    uid: Box<str>,
    service_account: Arc<str>,
    node: Option<Arc<str>>,
    /// Not finished (phase neither Succeeded nor Failed) and not being
    /// deleted.
    running: bool,
    /// When its deletion was asked for, if it was.
    deleted_at: Option<std::time::SystemTime>,
}

/// A pod reduced to what is kept, before interning.
struct PodRow {
    namespace: String,
    name: String,
    uid: String,
    service_account: String,
    node: Option<String>,
    running: bool,
    deleted_at: Option<std::time::SystemTime>,
}

/// How long a pod being deleted still vouches for its tokens: the API
/// server's own rule (its token validator refuses tokens of objects whose
/// deletion is older than this).
pub const DELETION_LEEWAY: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Pods {
    names: Interner,
    by_name: HashMap<Key, PodEntry>,
    /// node -> (namespace, service account) -> running pods.
    on_node: HashMap<Arc<str>, HashMap<Key, u32>>,
    /// (namespace, service account) -> running pods, on any node.
    running: HashMap<Key, u32>,
}

impl Pods {
    fn index(&mut self, key: &Key, e: &PodEntry, add: bool) {
        if !e.running {
            return;
        }
        let sa_key = (key.0.clone(), e.service_account.clone());
        if add {
            *self.running.entry(sa_key.clone()).or_default() += 1;
        } else if let Some(n) = self.running.get_mut(&sa_key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.running.remove(&sa_key);
            }
        }
        let Some(node) = &e.node else {
            return;
        };
        if add {
            *self
                .on_node
                .entry(node.clone())
                .or_default()
                .entry(sa_key)
                .or_default() += 1;
        } else if let Some(m) = self.on_node.get_mut(node) {
            if let Some(n) = m.get_mut(&sa_key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&sa_key);
                }
            }
            if m.is_empty() {
                self.on_node.remove(node);
            }
        }
    }

    fn upsert(&mut self, row: PodRow) {
        let key = (self.names.get(&row.namespace), Arc::from(row.name.as_str()));
        let entry = PodEntry {
            uid: row.uid.into(),
            service_account: self.names.get(&row.service_account),
            node: row.node.as_deref().map(|n| self.names.get(n)),
            running: row.running,
            deleted_at: row.deleted_at,
        };
        if let Some(old) = self.by_name.remove(&key) {
            self.index(&key, &old, false);
        }
        self.index(&key, &entry, true);
        self.by_name.insert(key, entry);
    }

    fn remove(&mut self, namespace: &str, name: &str) {
        let key: Key = (Arc::from(namespace), Arc::from(name));
        if let Some(old) = self.by_name.remove(&key) {
            self.index(&key, &old, false);
        }
    }

    fn reset(&mut self, rows: Vec<PodRow>) {
        *self = Self::default();
        for r in rows {
            self.upsert(r);
        }
    }
}

/// Metrics of the caches.
#[derive(Clone)]
struct CacheMetrics {
    objects: IntGaugeVec,
    synced: IntGaugeVec,
    restarts: IntCounterVec,
    lookups: IntCounterVec,
    last_list_ms: IntGaugeVec,
}

impl CacheMetrics {
    fn register(registry: &Registry) -> Result<Self, Error> {
        let err = |e: prometheus::Error| Error::Config(format!("metrics: {e}"));
        let gauge_vec = |name: &str, help: &str| -> Result<IntGaugeVec, Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), &["kind"]).map_err(err)?;
            registry.register(Box::new(g.clone())).map_err(err)?;
            Ok(g)
        };
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels).map_err(err)?;
                registry.register(Box::new(c.clone())).map_err(err)?;
                Ok(c)
            };
        Ok(Self {
            objects: gauge_vec(
                "workload_ca_kube_cache_objects",
                "Objects held in the watch caches, by kind.",
            )?,
            synced: gauge_vec(
                "workload_ca_kube_cache_fresh",
                "1 while a watch cache is synced and its watch is healthy, by kind.",
            )?,
            restarts: counter_vec(
                "workload_ca_kube_watch_restarts_total",
                "Watch caches restarting their list or watch, by kind and reason.",
                &["kind", "reason"],
            )?,
            lookups: counter_vec(
                "workload_ca_kube_cache_lookups_total",
                "Lookups answered from the watch caches, by kind and result (hit, miss).",
                &["kind", "result"],
            )?,
            last_list_ms: gauge_vec(
                "workload_ca_kube_cache_last_list_milliseconds",
                "How long the last full list of a watch cache took.",
            )?,
        })
    }
}

/// The pods and service accounts of the cluster, from watches.
/// A cache table to read, or `None` (the caller refuses: fails closed)
/// while a panic mid-update has left it poisoned and maybe torn: its
/// indexes could disagree. The next change emptied it ([`write_or_empty`]).
fn read_or_none<T>(lock: &RwLock<T>) -> Option<std::sync::RwLockReadGuard<'_, T>> {
    match lock.read() {
        Ok(guard) => Some(guard),
        Err(_) => {
            tracing::error!(
                "a cache table was poisoned by a panic (a bug): refusing from it until the next list"
            );
            None
        }
    }
}

/// A cache table to change; if a panic poisoned it, emptied first (its
/// indexes may disagree), counted and logged, so it is filled again from
/// the next list and never read torn.
fn write_or_empty<T>(lock: &RwLock<T>, empty: fn() -> T) -> std::sync::RwLockWriteGuard<'_, T> {
    match lock.write() {
        Ok(guard) => guard,
        Err(poisoned) => {
            crate::sync::count_poisoned();
            tracing::error!(
                "a cache table was poisoned by a panic (a bug): emptied, to be filled by the next list"
            );
            lock.clear_poison();
            let mut guard = poisoned.into_inner();
            *guard = empty();
            guard
        }
    }
}

/// The pods and service accounts the watches hold, indexed for the
/// [`ClusterView`] lookups.
pub struct ClusterCache {
    pods: RwLock<Pods>,
    service_accounts: RwLock<HashMap<Key, Box<str>>>,
    pods_fresh: Freshness,
    sas_fresh: Freshness,
    opts: CacheOptions,
    metrics: CacheMetrics,
    /// `workload_ca_kube_cache_lookups_total` for pods hit, pods miss,
    /// service accounts hit, service accounts miss.
    lookups: [prometheus::IntCounter; 4],
}

impl ClusterCache {
    /// An empty cache; [`ClusterCache::spawn`] fills it.
    ///
    /// # Errors
    /// [`Error::Config`] if its metrics cannot be registered.
    pub fn new(opts: CacheOptions, registry: &Registry) -> Result<Arc<Self>, Error> {
        let metrics = CacheMetrics::register(registry)?;
        Ok(Arc::new(Self {
            pods: RwLock::default(),
            service_accounts: RwLock::default(),
            pods_fresh: Freshness::default(),
            sas_fresh: Freshness::default(),
            opts,
            lookups: [
                ("pods", "hit"),
                ("pods", "miss"),
                ("serviceaccounts", "hit"),
                ("serviceaccounts", "miss"),
            ]
            .map(|(kind, result)| metrics.lookups.with_label_values(&[kind, result])),
            metrics,
        }))
    }

    /// Starts the two watches; they run until `shutdown` fires.
    pub fn spawn(
        self: &Arc<Self>,
        client: Client,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<(&'static str, JoinHandle<()>)> {
        let pods = {
            let this = self.clone();
            let api: Api<Pod> = Api::all(client.clone());
            tokio::spawn(reflect(
                api,
                "pods",
                self.opts.clone(),
                shutdown.clone(),
                pod_row,
                move |change| this.apply_pods(change),
            ))
        };
        let sas = {
            let this = self.clone();
            let api: Api<ServiceAccount> = Api::all(client);
            tokio::spawn(reflect(
                api,
                "serviceaccounts",
                self.opts.clone(),
                shutdown,
                sa_row,
                move |change| this.apply_sas(change),
            ))
        };
        vec![("kube-pod-cache", pods), ("kube-serviceaccount-cache", sas)]
    }

    fn apply_pods(&self, change: Change<PodRow>) {
        // A panic mid-update may have left the pod indexes disagreeing
        // (a node's count for a pod that is gone): emptied, so a poisoned
        // cache refuses (fails closed) until the next list fills it.
        let mut pods = write_or_empty(&self.pods, Pods::default);
        match change {
            Change::Reset(rows) => pods.reset(rows),
            Change::Upsert(row) => pods.upsert(row),
            Change::Delete { namespace, name } => pods.remove(&namespace, &name),
            Change::Fresh(ok) => {
                self.freshness("pods", &self.pods_fresh, ok);
                return;
            }
        }
        let n = i64::try_from(pods.by_name.len()).unwrap_or(i64::MAX);
        self.metrics.objects.with_label_values(&["pods"]).set(n);
    }

    fn apply_sas(&self, change: Change<SaRow>) {
        let mut sas = write_or_empty(&self.service_accounts, HashMap::new);
        let key = |ns: &str, name: &str| -> Key { (Arc::from(ns), Arc::from(name)) };
        match change {
            Change::Reset(rows) => {
                sas.clear();
                for r in rows {
                    sas.insert(key(&r.namespace, &r.name), r.uid.into());
                }
            }
            Change::Upsert(r) => {
                sas.insert(key(&r.namespace, &r.name), r.uid.into());
            }
            Change::Delete { namespace, name } => {
                sas.remove(&key(&namespace, &name));
            }
            Change::Fresh(ok) => {
                self.freshness("serviceaccounts", &self.sas_fresh, ok);
                return;
            }
        }
        let n = i64::try_from(sas.len()).unwrap_or(i64::MAX);
        self.metrics
            .objects
            .with_label_values(&["serviceaccounts"])
            .set(n);
    }

    fn freshness(&self, kind: &str, f: &Freshness, event: Freshen) {
        match event {
            Freshen::Synced(took) => {
                f.synced.store(true, Ordering::Release);
                f.ok();
                let ms = i64::try_from(took.as_millis()).unwrap_or(i64::MAX);
                self.metrics.last_list_ms.with_label_values(&[kind]).set(ms);
            }
            Freshen::Healthy => f.ok(),
            Freshen::Broken(reason) => {
                f.broken();
                self.metrics
                    .restarts
                    .with_label_values(&[kind, reason])
                    .inc();
            }
            Freshen::Silent(since) => {
                f.broken_since(since);
                self.metrics
                    .restarts
                    .with_label_values(&[kind, "idle"])
                    .inc();
            }
        }
        let fresh = f.fresh_within(self.opts.ready_grace);
        self.metrics
            .synced
            .with_label_values(&[kind])
            .set(i64::from(fresh));
    }

    /// Ready: both caches synced and their watches not broken for longer
    /// than the grace period.
    ///
    /// # Errors
    /// Which cache is behind.
    pub fn ready(&self) -> Result<(), String> {
        for (kind, f) in [
            ("pods", &self.pods_fresh),
            ("service accounts", &self.sas_fresh),
        ] {
            if !f.fresh_within(self.opts.ready_grace) {
                return Err(format!(
                    "the {kind} watch cache is not synced with the API server"
                ));
            }
        }
        Ok(())
    }

    /// Objects held: (pods, service accounts).
    pub fn len(&self) -> (usize, usize) {
        let pods = read_or_none(&self.pods).map_or(0, |p| p.by_name.len());
        let sas = read_or_none(&self.service_accounts).map_or(0, |s| s.len());
        (pods, sas)
    }

    /// Whether both caches have no object.
    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }

    /// Lookups answered so far, of both kinds: (hits, misses).
    pub fn lookups(&self) -> (u64, u64) {
        let [ph, pm, sh, sm] = &self.lookups;
        (ph.get() + sh.get(), pm.get() + sm.get())
    }

    /// Counts a lookup (the counters are resolved once, not per call).
    fn count(&self, pods: bool, hit: bool) {
        let [ph, pm, sh, sm] = &self.lookups;
        match (pods, hit) {
            (true, true) => ph,
            (true, false) => pm,
            (false, true) => sh,
            (false, false) => sm,
        }
        .inc();
    }
}

impl ClusterView for ClusterCache {
    fn synced(&self) -> bool {
        self.pods_fresh.fresh_within(self.opts.max_stale)
            && self.sas_fresh.fresh_within(self.opts.max_stale)
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<PodFacts> {
        let key: Key = (Arc::from(namespace), Arc::from(name));
        let now = std::time::SystemTime::now();
        let found = read_or_none(&self.pods)
            .as_deref()
            .and_then(|p| p.by_name.get(&key))
            .filter(|e| e.deleted_at.is_none_or(|t| t + DELETION_LEEWAY > now))
            .map(|e| PodFacts {
                uid: e.uid.to_string(),
                service_account: e.service_account.to_string(),
                node: e.node.as_ref().map(|n| n.to_string()),
            });
        self.count(true, found.is_some());
        found
    }

    fn service_account_uid(&self, namespace: &str, name: &str) -> Option<String> {
        let key: Key = (Arc::from(namespace), Arc::from(name));
        let found = read_or_none(&self.service_accounts)
            .as_deref()
            .and_then(|s| s.get(&key))
            .map(|u| u.to_string());
        self.count(false, found.is_some());
        found
    }

    fn runs_anywhere(&self, namespace: &str, service_account: &str) -> bool {
        let key: Key = (Arc::from(namespace), Arc::from(service_account));
        read_or_none(&self.pods).is_some_and(|p| p.running.contains_key(&key))
    }

    fn runs_on_node(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        let key: Key = (Arc::from(namespace), Arc::from(service_account));
        read_or_none(&self.pods)
            .is_some_and(|p| p.on_node.get(node).is_some_and(|m| m.contains_key(&key)))
    }
}

struct SaRow {
    namespace: String,
    name: String,
    uid: String,
}

fn names(meta: &ObjectMeta) -> Option<(String, String, String)> {
    Some((
        meta.namespace.clone()?,
        meta.name.clone()?,
        meta.uid.clone()?,
    ))
}

fn pod_row(pod: Pod) -> Option<PodRow> {
    let (namespace, name, uid) = names(&pod.metadata)?;
    let spec = pod.spec;
    let phase = pod.status.phase;
    let deleted_at = pod
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| std::time::SystemTime::from(t.0));
    Some(PodRow {
        namespace,
        name,
        uid,
        // The API server defaults an unset service account to `default`.
        service_account: spec
            .service_account_name
            .unwrap_or_else(|| "default".into()),
        node: spec.node_name.filter(|n| !n.is_empty()),
        running: deleted_at.is_none() && !matches!(phase.as_deref(), Some("Succeeded" | "Failed")),
        deleted_at,
    })
}

fn sa_row(sa: ServiceAccount) -> Option<SaRow> {
    let (namespace, name, uid) = names(&sa.metadata)?;
    Some(SaRow {
        namespace,
        name,
        uid,
    })
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
