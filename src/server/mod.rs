//! The CA server: gRPC over TLS, authentication, metrics and health.

pub mod auth;
pub mod devissuer;
pub mod jwt;
pub mod jwt_crypto;
pub mod metrics;
mod ops;
mod service;
mod status;
pub mod tls;

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::ca::store::{RootSpec, atomic_write, load_or_create};
use crate::ca::{self, Authority, DirStore, KeyAlgorithm, KeyStore, TtlPolicy};
use crate::drain::Tasks;
use crate::identity::TrustDomain;
use crate::limits::ServerLimits;
use crate::net;
use auth::{AuthChain, Authenticator, ClientCertAuthenticator};
use jwt::{IssuerConfig, JwtAuthenticator, KeySource};
use metrics::{Metrics, unix_secs};
use ops::Health;
use tls::{ServingCert, ServingSpec};

/// Everything that can stop the server from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Ca(#[from] ca::Error),
    #[error("{0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("gRPC server: {0}")]
    Transport(String),
}

impl Error {
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
        algorithm: KeyAlgorithm,
        root_lifetime: Duration,
    },
    /// An Istio `cacerts` directory (intermediate under an existing root).
    PluggedIn(PathBuf),
}

/// The server's configuration.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub state_dir: PathBuf,
    pub trust_domain: TrustDomain,
    pub ca: CaSource,
    pub listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`; none when `None`.
    pub ops_listen: Option<SocketAddr>,
    pub serving: ServingSpec,
    pub ttl: TtlPolicy,
    pub jwt_issuers: Vec<IssuerConfig>,
    pub jwt_audiences: Vec<String>,
    /// Tokens living longer than this (`iat` to `exp`) are refused.
    pub max_token_lifetime: Duration,
    /// Trust tokens minted by `ca token` (development only).
    pub dev_issuer: bool,
    pub jwks_refresh: Duration,
    /// How long in-flight calls may take to finish on shutdown.
    pub drain_timeout: Duration,
    /// Connection, stream and request limits of the gRPC and ops ports.
    pub limits: ServerLimits,
}

/// A started server.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub ops_addr: Option<SocketAddr>,
    /// The trust bundle clients verify the server (and their certs) against.
    pub root_cert_path: PathBuf,
    /// Where `ca token` finds the development key, when `--dev` is on.
    pub dev_issuer_key: Option<PathBuf>,
    pub authenticators: Vec<&'static str>,
    pub jwt_issuers: Vec<String>,
    pub ca_created: bool,
    /// Publishes a new authority to every part of the server (root rotation).
    authority: watch::Sender<Arc<Authority>>,
    tasks: Tasks,
    health: Arc<Health>,
    drain_timeout: Duration,
}

impl Running {
    /// The authority currently signing.
    pub fn authority(&self) -> Arc<Authority> {
        self.authority.borrow().clone()
    }

    /// Stops accepting, lets in-flight calls finish (up to the drain
    /// timeout, after which the remaining connections are closed), and
    /// joins every task the server started; one deadline for all of them,
    /// after which they are stopped by force.
    ///
    /// # Errors
    /// [`Error::Transport`] if one of the server's tasks had panicked.
    pub async fn shutdown(self) -> Result<(), Error> {
        self.health.serving.store(false, Ordering::Release);
        // The accept loop closes what is left of its connections at the
        // drain timeout; a moment later, anything still running is forced.
        let deadline = tokio::time::Instant::now() + self.drain_timeout + SHUTDOWN_MARGIN;
        let stopped = self.tasks.shutdown(deadline).await;
        if stopped.panicked.is_empty() {
            Ok(())
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
    jwt_crypto::install();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.state_dir)
        .map_err(|e| Error::io(&config.state_dir, e))?;
    let now = SystemTime::now();
    let (authority, ca_created) = load_authority(&config, now).await?;
    let root_cert_path = config.state_dir.join("root-cert.pem");
    atomic_write(&root_cert_path, authority.roots().pem().as_bytes(), 0o644)
        .map_err(|e| Error::io(&root_cert_path, e))?;

    let metrics = Arc::new(Metrics::new()?);
    if let Some(t) = authority.roots().earliest_expiry() {
        metrics.root_cert_expiry.set(unix_secs(t));
    }
    metrics
        .cert_chain_expiry
        .set(unix_secs(authority.chain_not_after()));
    let chain_not_after = authority.chain_not_after();
    let serving_cert = Arc::new(ServingCert::issue(&authority, &config.serving, now)?);
    metrics
        .serving_cert_expiry
        .set(unix_secs(serving_cert.not_after()));
    let (authority_tx, authority_rx) = watch::channel(Arc::new(authority));
    // Every task the server starts, stopped together (src/drain.rs).
    let mut tasks = Tasks::new();
    let shutdown_rx = tasks.signal();

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
    let mut chain: Vec<Arc<dyn Authenticator>> = Vec::new();
    let mut jwt_issuers = Vec::new();
    if issuers.is_empty() {
        tracing::warn!(
            "no token issuer configured: only renewals with a current certificate will be accepted"
        );
    } else {
        let jwt = Arc::new(
            JwtAuthenticator::new(
                config.trust_domain.clone(),
                config.jwt_audiences.clone(),
                issuers,
            )
            .await?
            .with_max_lifetime(config.max_token_lifetime),
        );
        tasks.adopt(
            "jwks-refresh",
            jwt.spawn_refresh(config.jwks_refresh, shutdown_rx.clone()),
        );
        jwt_issuers = jwt.issuer_names();
        chain.push(jwt);
    }
    chain.push(Arc::new(ClientCertAuthenticator::new(authority_rx.clone())));
    let auth = AuthChain::new(chain);

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::Config(format!("binding {}: {e}", config.listen)))?;
    let grpc_addr = listener
        .local_addr()
        .map_err(|e| Error::Config(e.to_string()))?;
    let tls_config = Arc::new(tls::server_config(serving_cert.clone())?);

    let health = Arc::new(Health {
        serving: false.into(),
        serving_cert: serving_cert.clone(),
        chain_not_after,
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
    let service = service::CaService {
        authority: authority_rx,
        auth: auth.clone(),
        ttl: config.ttl,
        metrics,
        warn: crate::logsafe::WarnLimiter::new(),
    };
    let routes = tonic::service::Routes::new(
        crate::proto::istio::istio_certificate_service_server::IstioCertificateServiceServer::new(
            service,
        )
        .max_decoding_message_size(config.limits.http2.max_message_bytes),
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
        tls::handshake(tls_config),
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
        authority: authority_tx,
        tasks,
        health,
        drain_timeout: config.drain_timeout,
    })
}

async fn load_authority(
    config: &ServerConfig,
    now: SystemTime,
) -> Result<(Authority, bool), Error> {
    match &config.ca {
        CaSource::Embedded {
            algorithm,
            root_lifetime,
        } => {
            let store = DirStore::new(config.state_dir.join("ca"));
            let spec = RootSpec {
                trust_domain: config.trust_domain.clone(),
                algorithm: *algorithm,
                lifetime: *root_lifetime,
            };
            Ok(load_or_create(&store, &spec, now).await?)
        }
        CaSource::PluggedIn(dir) => {
            let store = DirStore::new(dir);
            let files = store.load().await?.ok_or_else(|| {
                Error::Config(format!(
                    "plugged-in CA directory {} holds none of ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem",
                    dir.display()
                ))
            })?;
            Ok((
                Authority::from_files(&files, &config.trust_domain, now)?,
                false,
            ))
        }
    }
}

/// Renews the serving certificate halfway through its life, retrying every
/// few seconds on failure while the current one is still valid.
fn spawn_serving_renewal(
    cert: Arc<ServingCert>,
    authority: watch::Receiver<Arc<Authority>>,
    spec: ServingSpec,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut retry: Option<Duration> = None;
        loop {
            let wait = retry.unwrap_or_else(|| {
                cert.renew_at()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
            });
            tokio::select! {
                _ = tokio::time::sleep(wait.max(Duration::from_millis(100))) => {}
                _ = shutdown.changed() => return,
            }
            let current = authority.borrow().clone();
            match cert.renew(&current, &spec, SystemTime::now()) {
                Ok(not_after) => {
                    retry = None;
                    metrics.serving_cert_expiry.set(unix_secs(not_after));
                    tracing::info!(
                        not_after = unix_secs(not_after),
                        "serving certificate renewed"
                    );
                }
                Err(e) => {
                    retry = Some(Duration::from_secs(5));
                    tracing::error!(error = %e, "serving certificate renewal failed; retrying in 5s");
                }
            }
        }
    })
}
