//! `ca server --kube` flags of secret mode and root ConfigMaps, and the
//! controllers they start (see `k8s::secrets`, `k8s::rootcm`).

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio::sync::{Notify, watch};

use super::parse_duration;
use crate::ca::KeyAlgorithm;
use crate::k8s;
use crate::k8s::copies::{CopyMetrics, Engine, EngineOptions};
use crate::server::cluster::Controller;

/// Options of secret mode (leaves written into Secrets).
#[derive(Args, Debug, Clone)]
pub struct SecretModeArgs {
    /// Secret mode: keep a Secret `istio.<sa>` (key, chain, root bundle)
    /// for every service account of the namespaces this label selector
    /// picks (`*`: every namespace). Off when unset.
    #[arg(long, env = "CA_SECRET_MODE_NAMESPACES", value_parser = parse_selector)]
    pub secret_mode_namespaces: Option<k8s::scope::Selector>,
    /// Publish the trust bundle as ConfigMap `istio-ca-root-cert` in the
    /// namespaces this label selector picks (`*`: every namespace, as
    /// istiod does). Off when unset.
    #[arg(long, env = "CA_ROOT_CONFIGMAP_NAMESPACES", value_parser = parse_selector)]
    pub root_configmap_namespaces: Option<k8s::scope::Selector>,
    /// Namespaces never written to by secret mode or the root ConfigMaps.
    #[arg(
        long,
        env = "CA_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system,kube-public,kube-node-lease"
    )]
    pub exclude_namespaces: Vec<String>,
    /// Lifetime of secret-mode certificates (default: the server's
    /// `--default-ttl`; at most its `--max-ttl`).
    #[arg(long, env = "CA_SECRET_MODE_TTL", value_parser = parse_duration)]
    pub secret_mode_ttl: Option<Duration>,
    /// Fraction of a secret-mode certificate's lifetime after which it is
    /// replaced (the agent's `--rotation-fraction`; always at least 10
    /// minutes before expiry).
    #[arg(long, env = "CA_SECRET_MODE_ROTATION_FRACTION", default_value_t = 0.5)]
    pub secret_mode_rotation_fraction: f64,
    /// Key type of secret-mode keys.
    #[arg(long, env = "CA_SECRET_MODE_KEY", default_value = "ecdsa-p256", value_parser = parse_key)]
    pub secret_mode_key: KeyAlgorithm,
    /// Writes a second (Secrets, ConfigMaps and their Events together)
    /// the CA makes to the API server; a full second's worth may be made
    /// at once.
    #[arg(long, env = "CA_KUBE_WRITE_RATE", default_value_t = 100.0)]
    pub kube_write_rate: f64,
    /// Writes in flight at once, per kind of copies.
    #[arg(long, env = "CA_KUBE_WRITE_CONCURRENCY", default_value_t = 8)]
    pub kube_write_concurrency: usize,
}

fn parse_selector(s: &str) -> Result<k8s::scope::Selector, String> {
    s.parse()
}

fn parse_key(s: &str) -> Result<KeyAlgorithm, String> {
    s.parse().map_err(|e: crate::ca::Error| e.to_string())
}

/// What the controllers share with the rest of the cluster integration.
pub(super) struct Context<'a> {
    pub client: &'a kube::Client,
    pub leader: watch::Receiver<bool>,
    pub registry: &'a prometheus::Registry,
    pub propagation: Duration,
    pub replica: &'a str,
}

/// The controllers `args` ask for (none by default).
///
/// # Errors
/// Flags out of range, metrics that cannot be registered.
pub(super) fn controllers(
    args: &SecretModeArgs,
    cx: Context<'_>,
) -> anyhow::Result<Vec<Controller>> {
    if args.secret_mode_namespaces.is_none() && args.root_configmap_namespaces.is_none() {
        return Ok(Vec::new());
    }
    let f = args.secret_mode_rotation_fraction;
    if !(0.05..=0.95).contains(&f) {
        anyhow::bail!("--secret-mode-rotation-fraction must be within 0.05..=0.95");
    }
    if !args.kube_write_rate.is_finite() || args.kube_write_rate <= 0.0 {
        anyhow::bail!("--kube-write-rate must be positive");
    }
    let burst = u32::try_from(args.kube_write_rate.ceil() as u64).unwrap_or(u32::MAX);
    let bucket = Arc::new(k8s::pace::TokenBucket::new(args.kube_write_rate, burst));
    let metrics = CopyMetrics::register(cx.registry)?;
    let engine_opts = EngineOptions {
        bucket: bucket.clone(),
        concurrency: args.kube_write_concurrency.max(1),
        propagation: cx.propagation,
        progress_every: Duration::from_secs(5),
    };
    let mut out: Vec<Controller> = Vec::new();
    let client = cx.client.clone();
    let exclude = args.exclude_namespaces.clone();
    let replica = cx.replica.to_owned();
    let secret_mode = args.secret_mode_namespaces.clone();
    let root_cms = args.root_configmap_namespaces.clone();
    let ttl = args.secret_mode_ttl;
    let key = args.secret_mode_key;
    let leader = cx.leader;
    out.push(Box::new(move |issuer, tasks| {
        let mut counters = Vec::new();
        let (events, task) =
            k8s::events::Recorder::spawn(client.clone(), bucket, replica, tasks.signal());
        tasks.adopt("copies-events", task);
        if let Some(sel) = secret_mode {
            let (scope, task) =
                k8s::scope::spawn(client.clone(), &sel, exclude.clone(), tasks.signal());
            tasks.adopt("secret-mode-namespaces", task);
            let policy = issuer.ttl();
            let ttl = ttl.unwrap_or(policy.default_ttl).min(policy.max_ttl);
            let copier = Arc::new(k8s::secrets::SecretCopier::new(
                client.clone(),
                issuer.clone(),
                scope.clone(),
                k8s::secrets::SecretOptions {
                    ttl,
                    fraction: f,
                    key,
                },
            ));
            let dirty = Arc::new(Notify::new());
            for (name, task) in copier.spawn_watches(dirty.clone(), tasks.signal()) {
                tasks.adopt(name, task);
            }
            tasks.adopt(
                "secret-mode-scope",
                ring_on_change(scope, dirty.clone(), tasks.signal()),
            );
            let engine = Engine::new(
                copier,
                dirty,
                issuer.authorities(),
                engine_opts.clone(),
                metrics.clone(),
                events.clone(),
            );
            counters.push(engine.counter());
            tasks.adopt(
                "secret-mode",
                tokio::spawn(engine.run(leader.clone(), tasks.signal())),
            );
            tracing::info!(namespaces = ?sel, ttl = ?ttl, "secret mode on");
        }
        if let Some(sel) = root_cms {
            let (scope, task) = k8s::scope::spawn(client.clone(), &sel, exclude, tasks.signal());
            tasks.adopt("root-configmap-namespaces", task);
            let copier = Arc::new(k8s::rootcm::RootCmCopier::new(client, scope.clone()));
            let dirty = Arc::new(Notify::new());
            let (name, task) = copier.spawn_watch(dirty.clone(), tasks.signal());
            tasks.adopt(name, task);
            tasks.adopt(
                "root-configmap-scope",
                ring_on_change(scope, dirty.clone(), tasks.signal()),
            );
            let engine = Engine::new(
                copier,
                dirty,
                issuer.authorities(),
                engine_opts,
                metrics,
                events,
            );
            counters.push(engine.counter());
            tasks.adopt(
                "root-configmaps",
                tokio::spawn(engine.run(leader, tasks.signal())),
            );
            tracing::info!(namespaces = ?sel, "root ConfigMaps on");
        }
        counters
    }));
    Ok(out)
}

/// Rings `dirty` whenever the managed namespaces change.
fn ring_on_change(
    mut scope: watch::Receiver<Arc<k8s::scope::Managed>>,
    dirty: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = scope.changed() => {
                    if r.is_err() { return; }
                    dirty.notify_one();
                }
                _ = shutdown.changed() => return,
            }
        }
    })
}
