//! The CA server: gRPC over TLS, authentication, metrics and health.

pub mod admin;
pub mod auth;
pub mod bundlewatch;
pub mod cluster;
pub mod devissuer;
pub mod fleet;
pub mod inproc;
mod issuer;
pub mod jwt;
pub mod jwt_crypto;
mod jwt_token;
pub mod metrics;
mod ops;
pub mod rotate;
mod service;
mod status;
mod tasks;
pub mod tls;

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;

use crate::ca::keystore::{RootSpec, load_or_create};
use crate::ca::store::atomic_write;
use crate::ca::{self, Authority, AuthoritySet, CacertsDir, DirStore, KeyAlgorithm, TtlPolicy};
use crate::drain::Tasks;
use crate::identity::TrustDomain;
use crate::limits::ServerLimits;
use crate::net;
use auth::{AuthChain, Authenticator, ClientCertAuthenticator};
use jwt::{IssuerConfig, JwtAuthenticator, KeySource};
use metrics::{Metrics, unix_secs};
use ops::Health;
use tasks::{
    expiry_gauges, spawn_evidence, spawn_follower, spawn_publisher, spawn_serving_renewal,
};
use tls::{ServingCert, ServingSpec};

/// Everything that can stop the server from starting or running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The CA layer's error (material, store, signing).
    #[error(transparent)]
    Ca(#[from] ca::Error),
    /// A configuration that cannot work, or a request the state refuses.
    #[error("{0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The serving certificate or the TLS configuration.
    #[error("TLS: {0}")]
    Tls(String),
    /// Binding or serving the gRPC listener.
    #[error("gRPC server: {0}")]
    Transport(String),
}

impl Error {
    /// Every [`Error::metric_label`] (a CA error is labelled by its own).
    pub fn metric_labels() -> impl Iterator<Item = &'static str> {
        ["config", "io", "tls", "transport"]
            .into_iter()
            .chain(ca::Error::METRIC_LABELS.iter().copied())
    }

    /// A short, stable label for metrics and logs (every variant named).
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Ca(e) => e.metric_label(),
            Self::Config(_) => "config",
            Self::Io { .. } => "io",
            Self::Tls(_) => "tls",
            Self::Transport(_) => "transport",
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Where the CA key material comes from.
#[derive(Clone, Debug)]
pub enum CaSource {
    /// A self-signed root kept in `<state-dir>/ca`, generated on first start.
    Embedded {
        /// The root's key algorithm.
        algorithm: KeyAlgorithm,
        /// How long a generated root is valid.
        root_lifetime: Duration,
    },
    /// An Istio `cacerts` directory (intermediate under an existing root).
    PluggedIn(PathBuf),
}

/// The server's configuration.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where the CA keeps its state (`ca/`, the serving certificate, the development key).
    pub state_dir: PathBuf,
    /// The trust domain of every identity issued.
    pub trust_domain: TrustDomain,
    /// Where the CA key material comes from.
    pub ca: CaSource,
    /// The gRPC port's address.
    pub listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`; none when `None`.
    pub ops_listen: Option<SocketAddr>,
    /// The serving certificate's names and lifetime.
    pub serving: ServingSpec,
    /// How long issued leaves live.
    pub ttl: TtlPolicy,
    /// The JWT issuers whose tokens are accepted.
    pub jwt_issuers: Vec<IssuerConfig>,
    /// Accepted token audiences.
    pub jwt_audiences: Vec<String>,
    /// Tokens living longer than this (`iat` to `exp`) are refused.
    pub max_token_lifetime: Duration,
    /// Trust tokens minted by `ca token` (development only).
    pub dev_issuer: bool,
    /// How often JWKS files and URLs are re-read.
    pub jwks_refresh: Duration,
    /// How long in-flight calls may take to finish on shutdown.
    pub drain_timeout: Duration,
    /// Connection, stream and request limits of the gRPC and ops ports.
    pub limits: ServerLimits,
    /// The admin API's Unix socket (root rotation); none when `None`.
    pub admin_socket: Option<PathBuf>,
    /// Start a root rotation by itself when the active authority has less
    /// than this fraction of its life left; none when `None`.
    pub auto_rotate: Option<f64>,
    /// How often the automatic rotation looks.
    pub auto_rotate_interval: Duration,
    /// Leaves per second agents are asked to re-issue at when an
    /// authority retires.
    pub reissue_rate: u32,
}

/// A started server.
pub struct Running {
    /// The gRPC port's bound address.
    pub grpc_addr: SocketAddr,
    /// The operations endpoint's bound address, when it listens.
    pub ops_addr: Option<SocketAddr>,
    /// The trust bundle clients verify the server (and their certs) against.
    pub root_cert_path: PathBuf,
    /// Where `ca token` finds the development key, when `--dev` is on.
    pub dev_issuer_key: Option<PathBuf>,
    /// The names of the authenticators, in the order they are tried.
    pub authenticators: Vec<&'static str>,
    /// The `iss` of every JWT issuer trusted.
    pub jwt_issuers: Vec<String>,
    /// Whether this start generated the CA (the store was empty).
    pub ca_created: bool,
    /// The CA's authorities, published once and read by every part of the
    /// server: signing, client-certificate renewal, the serving certificate,
    /// readiness, the expiry gauges and `root-cert.pem`.
    live: Arc<rotate::LiveCa>,
    rotator: Arc<rotate::Rotator>,
    /// Where the admin API listens, when it does.
    pub admin_socket: Option<PathBuf>,
    saved_path: PathBuf,
    /// Held while the server runs: `ca rotate-root` sees it.
    _server_lock: Option<std::fs::File>,
    tasks: Tasks,
    health: Arc<Health>,
    drain_timeout: Duration,
}

impl Running {
    /// The CA's authorities as they are now.
    pub fn authorities(&self) -> Arc<AuthoritySet> {
        self.live.current()
    }

    /// Makes `next` the CA's authorities everywhere at once: stored, then
    /// published (the step a root rotation takes).
    ///
    /// # Errors
    /// As [`rotate::LiveCa::commit`]: `next` must follow the current set;
    /// nothing changes otherwise.
    pub async fn publish(&self, next: AuthoritySet) -> Result<(), Error> {
        self.live.commit(next).await
    }

    /// The rotation steps, as the admin API takes them.
    pub fn rotator(&self) -> Arc<rotate::Rotator> {
        self.rotator.clone()
    }

    /// Stops accepting, lets in-flight calls finish (up to the drain
    /// timeout, after which the remaining connections are closed), and
    /// joins every task the server started; one deadline for all of them,
    /// after which they are stopped by force.
    ///
    /// Returns which tasks had to be stopped by force (none when every
    /// task stopped within the deadline; the accept loop closes connections
    /// still open at the drain timeout itself).
    ///
    /// # Errors
    /// [`Error::Transport`] if one of the server's tasks had panicked.
    pub async fn shutdown(self) -> Result<crate::drain::Stopped, Error> {
        self.health.serving.store(false, Ordering::Release);
        // The accept loop closes what is left of its connections at the
        // drain timeout; a moment later, anything still running is forced.
        let deadline = tokio::time::Instant::now() + self.drain_timeout + SHUTDOWN_MARGIN;
        let stopped = self.tasks.shutdown(deadline).await;
        // The final save: every claim counted, and marked clean.
        if let Some(mut saved) = self.rotator.fleet.to_save(SystemTime::now(), true) {
            saved.clean = true;
            fleet::save(&self.saved_path, &saved).await;
        }
        if stopped.panicked.is_empty() {
            Ok(stopped)
        } else {
            Err(Error::Transport(format!(
                "tasks panicked: {}",
                stopped.panicked.join(", ")
            )))
        }
    }
}

/// After the drain timeout, how long the server's own tasks may take to
/// finish before they are aborted.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(1);

/// Loads (or creates) the CA, binds the listeners and starts serving.
///
/// # Errors
/// Any [`Error`]: bad or partial CA material, unreadable key sources,
/// addresses in use.
pub async fn start(config: ServerConfig) -> Result<Running, Error> {
    start_with(config, None).await
}

/// [`start`], with a cluster integration: its store instead of the state
/// directory's, its token issuer and authenticators, its readiness checks
/// and metrics, its tasks joined at shutdown.
///
/// # Errors
/// As [`start`].
pub async fn start_with(
    config: ServerConfig,
    mut cluster: Option<cluster::Cluster>,
) -> Result<Running, Error> {
    jwt_crypto::install();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.state_dir)
        .map_err(|e| Error::io(&config.state_dir, e))?;
    let now = SystemTime::now();
    let (store, seed): (Arc<dyn ca::KeyStore>, _) = match &cluster {
        Some(c) => (
            c.store.clone(),
            c.seed.clone().map(|f| (f, c.seed_from.clone())),
        ),
        None => {
            let store = DirStore::new(config.state_dir.join("ca"));
            store.tidy()?;
            (Arc::new(store), plugged_in_seed(&config)?)
        }
    };
    let (authorities, ca_created, spec) =
        load_authorities(&config, store.as_ref(), seed, now).await?;
    let root_cert_path = config.state_dir.join("root-cert.pem");
    atomic_write(&root_cert_path, authorities.bundle_pem().as_bytes(), 0o644)
        .map_err(|e| Error::io(&root_cert_path, e))?;

    let metrics = Arc::new(match &cluster {
        Some(c) => Metrics::with_registry(c.registry.clone())?,
        None => Metrics::new()?,
    });
    let serving_cert = Arc::new(ServingCert::issue(
        authorities.active(),
        &config.serving,
        now,
    )?);
    metrics
        .serving_cert_expiry
        .set(unix_secs(serving_cert.not_after()));
    expiry_gauges(&metrics, &authorities);
    let server_lock = DirStore::new(config.state_dir.join("ca")).server_lock()?;
    if server_lock.is_none() {
        return Err(Error::Config(format!(
            "another server is running on the state directory {}",
            config.state_dir.display()
        )));
    }
    // What a `kill -9` left: temporary files of atomic writes and of the
    // admin socket's binding.
    crate::ca::store::remove_temp_leftovers(&config.state_dir);
    let generation = authorities.generation();
    let member_ids: Vec<String> = authorities
        .members()
        .iter()
        .map(|m| m.authority.id().to_owned())
        .collect();
    let live = Arc::new(rotate::LiveCa::new(authorities, store));
    let authority_rx = live.subscribe();
    // Every task the server starts, stopped together (src/drain.rs).
    let mut tasks = Tasks::new();
    let shutdown_rx = tasks.signal();

    // What was issued to clients that do not report back, kept across
    // restarts; a crash may have lost the last seconds of it.
    let ledger_path = fleet::saved_path(&config.state_dir);
    // A replica on Kubernetes with a fresh state directory issued nothing
    // before: what earlier replicas issued is in their published evidence.
    let mut saved = fleet::load(
        &ledger_path,
        ca_created || cluster.is_some(),
        &member_ids,
        generation,
        config.ttl.max_ttl,
        now,
    );
    // Marked unclean at once: a crash from now on is noticed.
    saved.clean = false;
    fleet::save(&ledger_path, &saved).await;
    // Agents that connected just before an unclean stop may be missing from
    // what was saved: no gate opens until they had time to come back.
    let settle_until = now + 2 * fleet::SAVE_INTERVAL;
    let fleet = Arc::new(fleet::Fleet::new(saved, config.reissue_rate, settle_until));
    let rotator = Arc::new(
        rotate::Rotator::new(live.clone(), fleet.clone(), spec).with_replicas(
            cluster.as_ref().and_then(|c| c.peers.clone()),
            cluster.as_ref().and_then(|c| c.leader.clone()),
        ),
    );
    // The cluster's controllers sign through the live CA and count their
    // copies of the bundle in this replica's evidence.
    let controllers = cluster
        .as_mut()
        .map(|c| std::mem::take(&mut c.controllers))
        .unwrap_or_default();
    issuer::start_controllers(
        controllers,
        issuer::CaIssuer {
            live: live.clone(),
            fleet: fleet.clone(),
            ttl: config.ttl,
            metrics: metrics.clone(),
        },
        &mut tasks,
    );
    if let Some(out) = cluster.as_ref().and_then(|c| c.local_evidence.clone()) {
        tasks.adopt(
            "evidence",
            spawn_evidence(fleet.clone(), out, shutdown_rx.clone()),
        );
    }
    tasks.adopt(
        "save-fleet",
        fleet::spawn_saver(fleet.clone(), ledger_path.clone(), shutdown_rx.clone()),
    );
    tasks.adopt(
        "follow-store",
        spawn_follower(live.clone(), shutdown_rx.clone()),
    );
    if let Some(fraction) = config.auto_rotate {
        tasks.adopt(
            "auto-rotation",
            rotate::spawn_auto_rotation(
                rotator.clone(),
                fraction,
                config.auto_rotate_interval,
                shutdown_rx.clone(),
            ),
        );
    }
    let admin_socket = match &config.admin_socket {
        Some(path) => {
            let (path, task) = admin::spawn(path, rotator.clone(), shutdown_rx.clone()).await?;
            tasks.adopt("admin", task);
            Some(path)
        }
        None => None,
    };

    // Authentication: tokens first, then a current certificate.
    let mut issuers = config.jwt_issuers.clone();
    let mut dev_issuer_key = None;
    if config.dev_issuer {
        let dev = devissuer::DevIssuer::load_or_create(&config.state_dir)?;
        tracing::warn!(
            key = %dev.key_path().display(),
            "DEVELOPMENT token issuer enabled: anyone who can read this key can obtain certificates for any service account; never use --dev in production"
        );
        issuers.push(IssuerConfig {
            issuer: devissuer::DEV_ISSUER.into(),
            keys: KeySource::Static(vec![dev.jwks()?]),
        });
        dev_issuer_key = Some(dev.key_path().to_owned());
    }
    let cluster_issuer = cluster.as_ref().and_then(|c| c.issuer.clone());
    if let Some(i) = &cluster_issuer {
        issuers.push(i.clone());
    }
    let mut chain: Vec<Arc<dyn Authenticator>> = Vec::new();
    let mut jwt_issuers = Vec::new();
    if issuers.is_empty() {
        tracing::warn!(
            "no token issuer configured: only renewals with a current certificate will be accepted"
        );
    } else {
        let mut jwt = JwtAuthenticator::new(
            config.trust_domain.clone(),
            config.jwt_audiences.clone(),
            issuers,
        )
        .await?
        .with_max_lifetime(config.max_token_lifetime);
        if let (Some(i), Some(c)) = (&cluster_issuer, &cluster) {
            jwt = jwt.with_cluster_view(&i.issuer, c.view.clone())?;
        }
        let jwt = Arc::new(jwt);
        tasks.adopt(
            "jwks-refresh",
            jwt.spawn_refresh(config.jwks_refresh, shutdown_rx.clone()),
        );
        jwt_issuers = jwt.issuer_names();
        chain.push(jwt);
    }
    if let Some(c) = &cluster {
        chain.extend(c.authenticators.iter().cloned());
    }
    chain.push(Arc::new(
        ClientCertAuthenticator::new(authority_rx.clone())
            .with_cluster(cluster.as_ref().map(|c| c.view.clone())),
    ));
    let auth = AuthChain::new(chain);

    let listener = net::listen_tcp(config.listen)
        .map_err(|e| Error::Config(format!("binding {}: {e}", config.listen)))?;
    let grpc_addr = listener
        .local_addr()
        .map_err(|e| Error::Config(e.to_string()))?;
    let tls_config = Arc::new(tls::server_config(serving_cert.clone())?);

    let health = Arc::new(Health {
        serving: false.into(),
        serving_cert: serving_cert.clone(),
        authorities: authority_rx.clone(),
        checks: cluster
            .as_ref()
            .map(|c| c.ready.clone())
            .unwrap_or_default(),
    });
    let ops_addr = match config.ops_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| Error::Config(format!("binding {addr}: {e}")))?;
            let bound = l.local_addr().map_err(|e| Error::Config(e.to_string()))?;
            tasks.adopt(
                "ops",
                ops::spawn(
                    l,
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

    tasks.adopt(
        "publish-authorities",
        spawn_publisher(
            authority_rx.clone(),
            metrics.clone(),
            root_cert_path.clone(),
            shutdown_rx.clone(),
        ),
    );
    tasks.adopt(
        "serving-cert-renewal",
        spawn_serving_renewal(
            serving_cert,
            authority_rx.clone(),
            config.serving.clone(),
            metrics.clone(),
            shutdown_rx.clone(),
        ),
    );

    let refusals = metrics.refusals.clone();
    let watch_service = bundlewatch::BundleWatch {
        authorities: authority_rx.clone(),
        auth: auth.clone(),
        fleet: fleet.clone(),
        shutdown: shutdown_rx.clone(),
    };
    let handshakes = metrics.handshakes.clone();
    let service = service::CaService {
        authority: authority_rx,
        auth: auth.clone(),
        ttl: config.ttl,
        metrics,
        warn: crate::logsafe::WarnLimiter::new(),
        fleet,
        node_agents: cluster
            .as_ref()
            .map(|c| c.node_agents.clone())
            .unwrap_or_default(),
        cluster: cluster.as_ref().map(|c| c.view.clone()),
    };
    if let Some(c) = cluster {
        tasks.merge(c.tasks);
    }
    let routes = tonic::service::Routes::new(
        crate::proto::istio::istio_certificate_service_server::IstioCertificateServiceServer::new(
            service,
        )
        .max_decoding_message_size(config.limits.http2.max_message_bytes),
    )
    .add_service(
        crate::proto::workloadca::trust_bundle_service_server::TrustBundleServiceServer::new(
            watch_service,
        )
        .max_decoding_message_size(crate::proto::MAX_REPORT_BYTES),
    );
    let grpc = net::Acceptor {
        name: "CA gRPC".into(),
        listener,
        limits: net::within_fd_limit(config.limits.accept.clone()),
        refusals: refusals.clone(),
        shutdown: shutdown_rx.clone(),
        drain: config.drain_timeout,
        refusal_label: None,
    }
    .spawn(
        tls::handshake(tls_config, handshakes),
        move |(tls, info), calls, stop| {
            let routes = routes.clone();
            let limits = config.limits.http2.clone();
            let refusals = refusals.clone();
            async move { net::serve_h2(tls, info, routes, &limits, &refusals, calls, stop).await }
        },
    );
    tasks.adopt("grpc", grpc);
    health.serving.store(true, Ordering::Release);
    Ok(Running {
        grpc_addr,
        ops_addr,
        root_cert_path,
        dev_issuer_key,
        authenticators: auth.names(),
        jwt_issuers,
        ca_created,
        live,
        rotator,
        admin_socket,
        saved_path: ledger_path,
        _server_lock: server_lock,
        tasks,
        health,
        drain_timeout: config.drain_timeout,
    })
}

/// How often the automatic rotation looks at the active authority.
pub const AUTO_ROTATION_INTERVAL: Duration = Duration::from_secs(60);

/// The plugged-in CA of `--cacerts`, validated, with where it came from.
fn plugged_in_seed(config: &ServerConfig) -> Result<Option<(ca::CaFiles, String)>, Error> {
    let CaSource::PluggedIn(dir) = &config.ca else {
        return Ok(None);
    };
    let files = CacertsDir::new(dir).load()?.ok_or_else(|| {
        Error::Config(format!(
            "plugged-in CA directory {} holds none of ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem",
            dir.display()
        ))
    })?;
    Ok(Some((files, dir.display().to_string())))
}

/// The CA's authorities from `store`: created on first start from a new
/// root, or from the plugged-in CA `seed`. Later starts with a seed check
/// that it is one of the stored authorities (a new one is brought in with
/// `ca rotate-root prepare --from`, never by swapping files under a
/// running mesh).
async fn load_authorities(
    config: &ServerConfig,
    store: &dyn ca::KeyStore,
    seed: Option<(ca::CaFiles, String)>,
    now: SystemTime,
) -> Result<(AuthoritySet, bool, RootSpec), Error> {
    let (algorithm, lifetime) = match &config.ca {
        CaSource::Embedded {
            algorithm,
            root_lifetime,
        } => (*algorithm, *root_lifetime),
        CaSource::PluggedIn(_) => (
            KeyAlgorithm::EcdsaP256,
            Duration::from_secs(10 * 365 * 86_400),
        ),
    };
    let spec = RootSpec {
        trust_domain: config.trust_domain.clone(),
        algorithm,
        lifetime,
    };
    // Validated here, so bad material is refused with its own message
    // before anything is stored.
    let seed = match seed {
        Some((files, from)) => {
            let authority = Authority::from_files(&files, &config.trust_domain, now)?;
            Some((files, authority.id().to_owned(), from))
        }
        None => None,
    };
    let (set, created) =
        load_or_create(store, &spec, seed.as_ref().map(|(f, _, _)| f), now).await?;
    if let Some((_, id, from)) = &seed
        && !set.members().iter().any(|m| m.authority.id() == id)
    {
        let at = store.describe();
        return Err(Error::Config(format!(
            "the plugged-in CA in {from} (authority {id}) is not one of this CA's authorities (stored in {at}). \
             To move to it without breaking traffic, run `ca rotate-root --from {from}`; \
             to start over with it, remove {at}"
        )));
    }
    Ok((set, created, spec))
}
