//! The node agent: keys, CSRs, rotation, and Envoy SDS on Unix sockets.

pub mod acks;
pub mod bundle;
pub mod client;
pub mod health;
pub mod metrics;
pub mod sds;
mod sds_inbound;
mod sds_routes;
pub mod sds_state;
pub mod trust;
pub mod watcher;
pub mod workload;

use std::path::PathBuf;

/// Everything that can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Making the key or the CSR failed.
    #[error(transparent)]
    Crypto(#[from] crate::ca::Error),
    /// The agent's configuration cannot work (a flag, a file, the CA's
    /// address or root).
    #[error("{0}")]
    Config(String),
    /// The service-account token cannot be read or is not a JWT.
    #[error("service-account token: {0}")]
    Token(String),
    /// The token read has expired: it is not sent.
    #[error("service-account token {path} expired (exp {exp}); not sending it")]
    TokenExpired {
        /// The token file.
        path: PathBuf,
        /// Its `exp` claim (Unix seconds).
        exp: u64,
    },
    /// The CA refused the request or could not be reached.
    #[error("CA answered {code:?}: {message}")]
    Ca {
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message (escaped when logged).
        message: String,
    },
    /// The CA answered with a chain the agent does not accept (another
    /// identity or key, not verifying to the trust bundle, not yet valid).
    #[error("CA response refused: {0}")]
    BadResponse(String),
    /// An SDS socket could not be made or served.
    #[error("SDS socket {path}: {reason}")]
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::drain::Tasks;
use crate::limits::AgentLimits;

/// How long the agent's tasks may take to stop before they are forced.
const SHUTDOWN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
use acks::BundleAcks;
use bundle::AgentBundle;
use client::{CaEndpoint, GrpcCaClient, TokenFile};
use health::Health;
use metrics::AgentMetrics;
use workload::{CertManager, CertWatch, RotationPolicy};

impl Error {
    /// Every [`Error::metric_label`] (a key or certificate error is
    /// labelled by its own).
    pub fn metric_labels() -> impl Iterator<Item = &'static str> {
        [
            "config",
            "token",
            "token_expired",
            "ca",
            "bad_response",
            "socket",
        ]
        .into_iter()
        .chain(crate::ca::Error::METRIC_LABELS.iter().copied())
    }

    /// A short, stable label for metrics and logs (every variant named).
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Crypto(e) => e.metric_label(),
            Self::Config(_) => "config",
            Self::Token(_) => "token",
            Self::TokenExpired { .. } => "token_expired",
            Self::Ca { .. } => "ca",
            Self::BadResponse(_) => "bad_response",
            Self::Socket { .. } => "socket",
        }
    }
}

/// One workload: its credentials and the socket its proxy connects to.
#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    /// `default` in sidecar mode; the workload's name in node mode.
    pub name: String,
    /// The service-account token presented to the CA, re-read before each request.
    pub token_file: PathBuf,
    /// The SDS Unix socket the workload's proxy connects to.
    pub socket: PathBuf,
    /// Node mode with one node token: the identity asked for on the
    /// workload's behalf (`ImpersonatedIdentity`); `None`: the token's own.
    pub identity: Option<crate::identity::SpiffeId>,
    /// The only process (by uid, and gid when set) that may connect to the
    /// socket, checked with `SO_PEERCRED`; `None`: whoever the file
    /// permissions (0600, the agent's uid) let in.
    pub peer: Option<sds::PeerRule>,
}

/// The node agent's configuration.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The agent's name in its bundle-watch reports (its node).
    pub agent_name: String,
    /// The CA to request certificates from.
    pub ca: CaEndpoint,
    /// The workloads served, each on its own socket.
    pub workloads: Vec<WorkloadConfig>,
    /// Key type, lifetime and renewal timing of the certificates.
    pub policy: RotationPolicy,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub ops_listen: Option<SocketAddr>,
    /// Also write `key.pem` (0600), `cert-chain.pem`, `root-cert.pem` to
    /// `<dir>/<workload>/` on every rotation. Keys stay in memory otherwise.
    pub output_dir: Option<PathBuf>,
    /// Connection, stream and name limits of each SDS socket, and of the
    /// ops endpoint.
    pub limits: AgentLimits,
}

/// A running agent.
pub struct Agent {
    /// The SDS sockets, one per workload.
    pub sockets: Vec<PathBuf>,
    /// The operations endpoint's bound address, when it listens.
    pub ops_addr: Option<SocketAddr>,
    /// Each workload's name and its certificate watch.
    pub watches: Vec<(String, CertWatch)>,
    /// The agent's metrics.
    pub metrics: Arc<AgentMetrics>,
    /// The one trust bundle every workload serves.
    pub bundle: AgentBundle,
    /// What the proxies have ACKed of it.
    pub acks: BundleAcks,
    /// Readiness, and the loud signals as a certificate nears expiry.
    pub health: Health,
    tasks: Tasks,
}

impl Agent {
    /// True while every workload serves a certificate with more than the
    /// readiness margin of its lifetime left ([`health`]).
    pub fn ready(&self) -> bool {
        self.health.ready().is_ok()
    }

    /// Stops rotation and the SDS servers and removes the sockets: one
    /// deadline for every task, however many workloads there are, after
    /// which the rest are stopped by force.
    pub async fn shutdown(self) {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DEADLINE;
        self.tasks.shutdown(deadline).await;
    }
}

/// Starts one certificate manager and one SDS socket per workload.
///
/// # Errors
/// [`Error::Config`] for a bad CA endpoint or duplicate workload names,
/// [`Error::Socket`] when a socket cannot be bound.
pub async fn start(config: AgentConfig) -> Result<Agent, Error> {
    if config.workloads.is_empty() {
        return Err(Error::Config("no workload configured".into()));
    }
    let mut names = std::collections::BTreeSet::new();
    for w in &config.workloads {
        if !names.insert(&w.name) {
            return Err(Error::Config(format!(
                "workload {:?} is configured twice",
                w.name
            )));
        }
    }
    let (channel, trust) = client::connect(&config.ca)?;
    let metrics = Arc::new(AgentMetrics::new()?);
    let mut tasks = Tasks::new();
    let shutdown_rx = tasks.signal();
    let mut sockets = Vec::new();
    let mut watches = Vec::new();
    let bundle = AgentBundle::new();
    let acks = BundleAcks::new();
    for w in &config.workloads {
        let client = Arc::new(
            GrpcCaClient::new(channel.clone(), TokenFile::new(&w.token_file))
                .for_identity(w.identity.clone()),
        );
        let (manager, cert_watch) = CertManager::sharing(
            w.name.clone(),
            client,
            config.policy.clone(),
            metrics.clone(),
            bundle.clone(),
        );
        let socket = match sds::serve(
            &w.socket,
            sds::Sds::new(cert_watch.clone(), metrics.clone())
                .with_limits(config.limits.clone())
                .with_acks(acks.clone())
                .with_peer(w.peer),
            shutdown_rx.clone(),
        ) {
            Ok(s) => s,
            Err(e) => {
                tasks.signal_stop();
                return Err(e);
            }
        };
        tasks.spawn("cert-manager", manager.run(shutdown_rx.clone()));
        tasks.adopt("sds", socket.task);
        sockets.push(socket.path);
        if let Some(dir) = &config.output_dir {
            tasks.spawn(
                "output-files",
                write_files(dir.join(&w.name), cert_watch.clone(), shutdown_rx.clone()),
            );
        }
        watches.push((w.name.clone(), cert_watch));
    }
    let health = Health::new(
        config.ca.address.clone(),
        &config.policy,
        metrics.clone(),
        &watches,
    );
    for i in 0..watches.len() {
        tasks.spawn("cert-health", health.clone().follow(i, shutdown_rx.clone()));
    }
    // The CA's roots, for the next handshake with it: taken only from
    // answers that passed every check, and from the CA's pushes.
    tasks.spawn(
        "ca-trust",
        follow_bundle(
            bundle.clone(),
            acks.clone(),
            trust,
            metrics.clone(),
            shutdown_rx.clone(),
        ),
    );
    if let Some(first) = config.workloads.first() {
        let watcher = watcher::BundleWatcher::new(
            channel.clone(),
            TokenFile::new(&first.token_file),
            config.agent_name.clone(),
            bundle.clone(),
            acks.clone(),
            watches.iter().map(|(_, w)| w.cert.clone()).collect(),
            config.policy.clone(),
        );
        tasks.spawn("bundle-watch", watcher.run(shutdown_rx.clone()));
    }
    let ops_addr = match config.ops_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Error::Config(format!("binding {addr}: {e}")))?;
            let bound = listener
                .local_addr()
                .map_err(|e| Error::Config(e.to_string()))?;
            tasks.adopt(
                "ops",
                spawn_ops(
                    listener,
                    metrics.clone(),
                    health.clone(),
                    config.limits.ops.clone(),
                    shutdown_rx.clone(),
                ),
            );
            Some(bound)
        }
        None => None,
    };
    Ok(Agent {
        sockets,
        ops_addr,
        watches,
        metrics,
        bundle,
        acks,
        health,
        tasks,
    })
}

fn spawn_ops(
    listener: tokio::net::TcpListener,
    metrics: Arc<AgentMetrics>,
    health: Health,
    limits: crate::limits::OpsLimits,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let refusals = metrics.refusals.clone();
    let gauges = health.clone();
    crate::ops::spawn(
        listener,
        move || {
            gauges.refresh_gauges();
            metrics.render()
        },
        move || health.ready(),
        None,
        limits,
        refusals,
        shutdown,
    )
}

/// Teaches `trust` every bundle the agent publishes, and keeps the bundle
/// gauges current.
async fn follow_bundle(
    bundle: AgentBundle,
    acks: BundleAcks,
    trust: Arc<trust::CaTrust>,
    metrics: Arc<AgentMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut roots = bundle.subscribe();
    let mut acked = acks.watch();
    let mut learnt: Option<Arc<bundle::RootBundle>> = None;
    loop {
        let held = roots.borrow_and_update().clone();
        if let Some(b) = &held
            && !learnt.as_ref().is_some_and(|l| Arc::ptr_eq(l, b))
        {
            trust.learn(&b.pem);
            learnt = Some(b.clone());
        }
        let generation = held.as_ref().and_then(|b| b.generation).unwrap_or(0);
        let summary = *acked.borrow_and_update();
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        metrics.bundle_generation.set(gauge(generation));
        metrics
            .bundle_acked_generation
            .set(gauge(summary.acked_or(generation)));
        metrics.bundle_proxies.set(i64::from(summary.proxies));
        tokio::select! {
            r = roots.changed() => if r.is_err() { return },
            r = acked.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

/// Publishes the workload's files on every new certificate or bundle, all
/// three together ([`workload::publish_files`]).
async fn write_files(dir: PathBuf, mut w: CertWatch, mut shutdown: watch::Receiver<bool>) {
    loop {
        let cert = w.cert.borrow_and_update().clone();
        let roots = w.roots.borrow_and_update().clone();
        if let (Some(cert), Some(roots)) = (cert, roots) {
            // Directory and file fsyncs block: off the runtime's workers.
            let to = dir.clone();
            let result = tokio::task::spawn_blocking(move || {
                workload::publish_files(
                    &to,
                    cert.key_pem.as_bytes(),
                    cert.chain_pem.as_bytes(),
                    roots.pem.as_bytes(),
                )
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            if let Err(e) = result {
                tracing::error!(dir = %dir.display(), error = %e, "writing certificate files failed");
            }
        }
        tokio::select! {
            r = w.cert.changed() => if r.is_err() { return },
            r = w.roots.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}
