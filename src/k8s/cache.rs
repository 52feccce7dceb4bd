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

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::slim::{SlimPod as Pod, SlimServiceAccount as ServiceAccount};
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::core::ObjectMeta;
use kube::{Client, Resource};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::StreamExt;

use super::Error;
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
        }
    }
}

/// Longest back-off between attempts to list or watch.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

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
        if let Ok(mut b) = self.broken_since.lock() {
            *b = None;
        }
    }

    fn broken(&self) {
        if let Ok(mut b) = self.broken_since.lock() {
            b.get_or_insert_with(Instant::now);
        }
    }

    /// Broken since `since` (the last word from the API server), unless
    /// already broken earlier.
    fn broken_since(&self, since: Instant) {
        if let Ok(mut b) = self.broken_since.lock() {
            *b = Some(b.map_or(since, |earlier| earlier.min(since)));
        }
    }

    /// Synced, and not broken for longer than `limit`.
    fn fresh_within(&self, limit: Duration) -> bool {
        if !self.synced.load(Ordering::Acquire) {
            return false;
        }
        match self.broken_since.lock() {
            Ok(b) => b.is_none_or(|since| since.elapsed() < limit),
            Err(_) => false,
        }
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
    /// Not finished (phase neither Succeeded nor Failed).
    running: bool,
}

/// A pod reduced to what is kept, before interning.
struct PodRow {
    namespace: String,
    name: String,
    uid: String,
    service_account: String,
    node: Option<String>,
    running: bool,
}

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
pub struct ClusterCache {
    pods: RwLock<Pods>,
    service_accounts: RwLock<HashMap<Key, Box<str>>>,
    pods_fresh: Freshness,
    sas_fresh: Freshness,
    opts: CacheOptions,
    metrics: CacheMetrics,
    lookups: [AtomicU64; 2],
}

impl ClusterCache {
    /// An empty cache; [`ClusterCache::spawn`] fills it.
    ///
    /// # Errors
    /// [`Error::Config`] if its metrics cannot be registered.
    pub fn new(opts: CacheOptions, registry: &Registry) -> Result<Arc<Self>, Error> {
        Ok(Arc::new(Self {
            pods: RwLock::default(),
            service_accounts: RwLock::default(),
            pods_fresh: Freshness::default(),
            sas_fresh: Freshness::default(),
            opts,
            metrics: CacheMetrics::register(registry)?,
            lookups: [AtomicU64::new(0), AtomicU64::new(0)],
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
        let Ok(mut pods) = self.pods.write() else {
            return;
        };
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
        let Ok(mut sas) = self.service_accounts.write() else {
            return;
        };
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
        let pods = self.pods.read().map(|p| p.by_name.len()).unwrap_or(0);
        let sas = self.service_accounts.read().map(|s| s.len()).unwrap_or(0);
        (pods, sas)
    }

    /// Whether both caches have no object.
    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }

    /// Lookups answered so far: (hits, misses).
    pub fn lookups(&self) -> (u64, u64) {
        (
            self.lookups[0].load(Ordering::Relaxed),
            self.lookups[1].load(Ordering::Relaxed),
        )
    }

    fn count(&self, kind: &str, hit: bool) {
        self.lookups[usize::from(!hit)].fetch_add(1, Ordering::Relaxed);
        self.metrics
            .lookups
            .with_label_values(&[kind, if hit { "hit" } else { "miss" }])
            .inc();
    }
}

impl ClusterView for ClusterCache {
    fn synced(&self) -> bool {
        self.pods_fresh.fresh_within(self.opts.max_stale)
            && self.sas_fresh.fresh_within(self.opts.max_stale)
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<PodFacts> {
        let found = self.pods.read().ok().and_then(|p| {
            let key: Key = (Arc::from(namespace), Arc::from(name));
            p.by_name.get(&key).map(|e| PodFacts {
                uid: e.uid.to_string(),
                service_account: e.service_account.to_string(),
                node: e.node.as_ref().map(|n| n.to_string()),
            })
        });
        self.count("pods", found.is_some());
        found
    }

    fn service_account_uid(&self, namespace: &str, name: &str) -> Option<String> {
        let found = self.service_accounts.read().ok().and_then(|s| {
            let key: Key = (Arc::from(namespace), Arc::from(name));
            s.get(&key).map(|u| u.to_string())
        });
        self.count("serviceaccounts", found.is_some());
        found
    }

    fn runs_anywhere(&self, namespace: &str, service_account: &str) -> bool {
        self.pods.read().is_ok_and(|p| {
            let key: Key = (Arc::from(namespace), Arc::from(service_account));
            p.running.contains_key(&key)
        })
    }

    fn runs_on_node(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.pods.read().is_ok_and(|p| {
            let key: Key = (Arc::from(namespace), Arc::from(service_account));
            p.on_node.get(node).is_some_and(|m| m.contains_key(&key))
        })
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
    Some(PodRow {
        namespace,
        name,
        uid,
        // The API server defaults an unset service account to `default`.
        service_account: spec
            .service_account_name
            .unwrap_or_else(|| "default".into()),
        node: spec.node_name.filter(|n| !n.is_empty()),
        running: !matches!(phase.as_deref(), Some("Succeeded" | "Failed")),
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

/// What a reflector tells its cache.
pub(crate) enum Change<R> {
    Reset(Vec<R>),
    Upsert(R),
    Delete { namespace: String, name: String },
    Fresh(Freshen),
}

pub(crate) enum Freshen {
    Synced(Duration),
    Healthy,
    Broken(&'static str),
    /// The watch brought nothing for too long; the instant is the last
    /// time it brought anything.
    Silent(Instant),
}

/// Lists `api` and follows it with watches until `shutdown`, feeding
/// `sink` rows made by `row` (objects it cannot use are skipped).
pub(crate) async fn reflect<K, R>(
    api: Api<K>,
    kind: &'static str,
    opts: CacheOptions,
    mut shutdown: watch::Receiver<bool>,
    row: fn(K) -> Option<R>,
    sink: impl Fn(Change<R>) + Send + 'static,
) where
    K: Resource + Clone + Debug + serde::de::DeserializeOwned + Send + 'static,
    R: Send,
{
    let mut backoff = Duration::from_millis(200);
    let wait = |backoff: &mut Duration| {
        let d = *backoff;
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        d
    };
    'relist: loop {
        if *shutdown.borrow() {
            return;
        }
        let started = Instant::now();
        let listed = tokio::select! {
            r = list_all(&api, opts.page_size, opts.labels.as_deref(), opts.request_timeout, row) => r,
            _ = shutdown.changed() => return,
        };
        let (rows, mut version) = match listed {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(kind, error = %e, "listing for the watch cache failed; retrying");
                sink(Change::Fresh(Freshen::Broken("list")));
                let d = wait(&mut backoff);
                tokio::select! {
                    _ = tokio::time::sleep(d) => continue 'relist,
                    _ = shutdown.changed() => return,
                }
            }
        };
        sink(Change::Reset(rows));
        sink(Change::Fresh(Freshen::Synced(started.elapsed())));
        tracing::info!(
            kind,
            took_ms = started.elapsed().as_millis() as u64,
            "watch cache synced"
        );
        backoff = Duration::from_millis(200);
        let idle = Duration::from_secs(u64::from(opts.watch_timeout)) + WATCH_IDLE_MARGIN;
        // After a watch that went silent, a new one must bring something
        // (an event, a bookmark, its end) before the cache counts as
        // healthy again: its start alone proves nothing.
        let mut was_silent = false;
        loop {
            // Bookmarks are on by default.
            let mut params = WatchParams::default().timeout(opts.watch_timeout);
            if let Some(l) = &opts.labels {
                params = params.labels(l);
            }
            let stream = tokio::select! {
                r = tokio::time::timeout(opts.request_timeout, api.watch(&params, &version)) => r,
                _ = shutdown.changed() => return,
            };
            let stream = match stream {
                Ok(Ok(s)) => s,
                Err(_) => {
                    tracing::warn!(kind, timeout = ?opts.request_timeout, "the watch did not start in time; retrying");
                    sink(Change::Fresh(Freshen::Broken("watch")));
                    let d = wait(&mut backoff);
                    tokio::select! {
                        _ = tokio::time::sleep(d) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
                Ok(Err(kube::Error::Api(s))) if s.code == 410 => {
                    sink(Change::Fresh(Freshen::Broken("expired")));
                    continue 'relist;
                }
                Ok(Err(e)) => {
                    tracing::warn!(kind, error = %e, "watch failed; retrying");
                    sink(Change::Fresh(Freshen::Broken("watch")));
                    let d = wait(&mut backoff);
                    tokio::select! {
                        _ = tokio::time::sleep(d) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
            };
            if !was_silent {
                sink(Change::Fresh(Freshen::Healthy));
            }
            backoff = Duration::from_millis(200);
            let mut stream = std::pin::pin!(stream);
            let mut heard = Instant::now();
            loop {
                let event = tokio::select! {
                    e = tokio::time::timeout(idle, stream.next()) => e,
                    _ = shutdown.changed() => return,
                };
                let Ok(event) = event else {
                    // Not even the end the server owes us at its timeout:
                    // the connection is dead without having failed.
                    tracing::warn!(kind, idle = ?idle, "the watch brought nothing, not even its end; renewing it");
                    sink(Change::Fresh(Freshen::Silent(heard)));
                    was_silent = true;
                    break;
                };
                heard = Instant::now();
                if was_silent && matches!(event, None | Some(Ok(_))) {
                    was_silent = false;
                    sink(Change::Fresh(Freshen::Healthy));
                }
                let Some(event) = event else {
                    // The watch's own timeout: renew it from where it was.
                    break;
                };
                match event {
                    Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => {
                        if let Some(v) = o.meta().resource_version.clone() {
                            version = v;
                        }
                        if let Some(r) = row(o) {
                            sink(Change::Upsert(r));
                        }
                    }
                    Ok(WatchEvent::Deleted(o)) => {
                        let meta = o.meta();
                        if let Some(v) = meta.resource_version.clone() {
                            version = v;
                        }
                        if let (Some(namespace), Some(name)) =
                            (meta.namespace.clone(), meta.name.clone())
                        {
                            sink(Change::Delete { namespace, name });
                        }
                    }
                    Ok(WatchEvent::Bookmark(b)) => {
                        version = b.metadata.resource_version;
                        sink(Change::Fresh(Freshen::Healthy));
                    }
                    Ok(WatchEvent::Error(s)) if s.code == 410 => {
                        tracing::info!(kind, "watch expired (410); listing again");
                        sink(Change::Fresh(Freshen::Broken("expired")));
                        continue 'relist;
                    }
                    Ok(WatchEvent::Error(s)) => {
                        tracing::warn!(kind, code = s.code, message = %s.message, "watch error; renewing the watch");
                        sink(Change::Fresh(Freshen::Broken("watch")));
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(kind, error = %e, "watch stream failed; renewing the watch");
                        sink(Change::Fresh(Freshen::Broken("watch")));
                        let d = wait(&mut backoff);
                        tokio::select! {
                            _ = tokio::time::sleep(d) => break,
                            _ = shutdown.changed() => return,
                        }
                    }
                }
            }
        }
    }
}

/// Every object of `api`, page by page, reduced by `row` as it arrives,
/// and the list's resourceVersion.
async fn list_all<K, R>(
    api: &Api<K>,
    page: u32,
    labels: Option<&str>,
    timeout: Duration,
    row: fn(K) -> Option<R>,
) -> Result<(Vec<R>, String), Error>
where
    K: Resource + Clone + Debug + serde::de::DeserializeOwned,
{
    let mut rows = Vec::new();
    let mut params = ListParams::default().limit(page);
    if let Some(l) = labels {
        params = params.labels(l);
    }
    loop {
        let list = tokio::time::timeout(timeout, api.list(&params))
            .await
            .map_err(|_| Error::Invalid {
                what: "listing for a watch cache".into(),
                reason: format!("no answer within {timeout:?}"),
            })?
            .map_err(|e| Error::api("listing for a watch cache", e))?;
        rows.extend(list.items.into_iter().filter_map(row));
        match list.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => {
                let version = list.metadata.resource_version.unwrap_or_default();
                return Ok((rows, version));
            }
        }
    }
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
