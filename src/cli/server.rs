//! `ca server`: the CA's flags and its run.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use super::{Signals, limits, parse_duration, parse_key_algorithm, parse_ops};
use crate::ca::{KeyAlgorithm, TtlPolicy};
use crate::identity::TrustDomain;
use crate::server::jwt::{IssuerConfig, KeySource};
use crate::server::tls::ServingSpec;
use crate::server::{self, CaSource, ServerConfig};

/// `ca server`: the CA server's options.
#[derive(Args, Debug)]
pub struct ServerArgs {
    /// State directory: the embedded CA, root-cert.pem, the dev issuer key.
    #[arg(long, env = "CA_STATE_DIR", default_value = "ca-state")]
    pub state_dir: PathBuf,
    /// SPIFFE trust domain of issued identities.
    #[arg(long, env = "CA_TRUST_DOMAIN", default_value = "cluster.local", value_parser = parse_trust_domain)]
    pub trust_domain: TrustDomain,
    /// gRPC (TLS) listen address.
    #[arg(long, env = "CA_LISTEN", default_value = "127.0.0.1:15012")]
    pub listen: SocketAddr,
    /// Metrics and health listen address; `off` disables it.
    #[arg(long, env = "CA_OPS_LISTEN", default_value = "127.0.0.1:15014")]
    pub ops_listen: String,
    /// DNS names in the server's TLS certificate (repeat or comma-separate).
    #[arg(long = "dns-name", env = "CA_DNS_NAMES", value_delimiter = ',',
          default_values_t = ["localhost".to_string(), "istiod.istio-system.svc".to_string()])]
    pub dns_names: Vec<String>,
    /// IP addresses in the server's TLS certificate.
    #[arg(long = "ip-san", env = "CA_IP_SANS", value_delimiter = ',', default_values_t = [IpAddr::from([127, 0, 0, 1])])]
    pub ip_sans: Vec<IpAddr>,
    /// Lifetime of the server's TLS certificate (renewed at half-life).
    #[arg(long, env = "CA_SERVING_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub serving_cert_ttl: Duration,
    /// Workload certificate lifetime when the request asks for none.
    #[arg(long, env = "CA_DEFAULT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub default_ttl: Duration,
    /// Longest workload certificate lifetime; longer requests are refused.
    #[arg(long, env = "CA_MAX_TTL", default_value = "90d", value_parser = parse_duration)]
    pub max_ttl: Duration,
    /// Key type of a newly generated root.
    #[arg(long, env = "CA_ROOT_KEY", default_value = "ecdsa-p256", value_parser = parse_key_algorithm)]
    pub root_key: KeyAlgorithm,
    /// Lifetime of a newly generated root.
    #[arg(long, env = "CA_ROOT_LIFETIME", default_value = "10y", value_parser = parse_duration)]
    pub root_lifetime: Duration,
    /// Use a plugged-in CA from an Istio `cacerts` directory instead of the
    /// embedded root.
    #[arg(long, env = "CA_CACERTS_DIR")]
    pub cacerts: Option<PathBuf>,
    /// Trusted token issuer as `ISSUER=KEYS`, KEYS being a JWKS or PEM file,
    /// or an http:// JWKS URL on loopback. Repeatable.
    #[arg(long = "jwt-issuer", env = "CA_JWT_ISSUERS", value_delimiter = ';', value_parser = parse_issuer)]
    pub jwt_issuers: Vec<IssuerConfig>,
    /// Accepted token audiences.
    #[arg(long = "jwt-audience", env = "CA_JWT_AUDIENCES", value_delimiter = ',', default_values_t = ["istio-ca".to_string()])]
    pub jwt_audiences: Vec<String>,
    /// Tokens that live longer than this, from `iat` to `exp`, are refused.
    #[arg(long, env = "CA_MAX_TOKEN_LIFETIME", default_value_t = limits::Dur(crate::server::jwt::DEFAULT_MAX_TOKEN_LIFETIME))]
    pub max_token_lifetime: limits::Dur,
    /// How often JWKS files and URLs are re-read.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub jwks_refresh: Duration,
    /// Trust the development issuer used by `ca token`. Never in production.
    #[arg(long, env = "CA_DEV")]
    pub dev: bool,
    /// How long in-flight calls may run after SIGTERM.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Unix socket of the admin API (`ca rotate-root`), mode 0600; `off`
    /// disables it. Default: `<state-dir>/admin.sock`.
    #[arg(long, env = "CA_ADMIN_SOCKET")]
    pub admin_socket: Option<String>,
    /// Rotate the root by itself when the active one has less than this
    /// fraction of its life left (0 < f < 1; Istio uses 0.2); `off`
    /// disables it. Only for the embedded root: a plugged-in CA is replaced
    /// with `ca rotate-root --from`.
    #[arg(long, env = "CA_AUTO_ROTATE", default_value = "0.2")]
    pub auto_rotate: String,
    /// How often the automatic rotation looks at the active authority.
    #[arg(long, env = "CA_AUTO_ROTATE_INTERVAL", default_value = "60s", value_parser = parse_duration, hide = true)]
    pub auto_rotate_interval: Duration,
    /// When an authority retires, how many leaves per second agents are
    /// asked to re-issue across the fleet (they spread their renewals).
    #[arg(long, env = "CA_REISSUE_RATE", default_value_t = 50)]
    pub reissue_rate: u32,
    /// Connection, stream and request limits.
    #[command(flatten)]
    pub limits: limits::ServerLimitArgs,
    /// Kubernetes options.
    #[command(flatten)]
    pub kube: super::kube::KubeArgs,
}

pub(super) fn parse_trust_domain(s: &str) -> Result<TrustDomain, String> {
    TrustDomain::new(s).map_err(|e| e.to_string())
}

pub(super) fn parse_issuer(s: &str) -> Result<IssuerConfig, String> {
    let (issuer, keys) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not ISSUER=KEYS"))?;
    if issuer.is_empty() || keys.is_empty() {
        return Err(format!("{s:?} is not ISSUER=KEYS"));
    }
    Ok(IssuerConfig {
        issuer: issuer.to_owned(),
        keys: KeySource::parse(keys).map_err(|e| e.to_string())?,
    })
}

impl ServerArgs {
    /// The server configuration these flags describe.
    ///
    /// # Errors
    /// Inconsistent flags (default TTL above the maximum, a bad ops address).
    pub fn to_config(&self) -> anyhow::Result<ServerConfig> {
        if self.default_ttl > self.max_ttl {
            bail!(
                "--default-ttl ({:?}) is above --max-ttl ({:?})",
                self.default_ttl,
                self.max_ttl
            );
        }
        if self.default_ttl.is_zero() || self.serving_cert_ttl.is_zero() {
            bail!("certificate lifetimes must be positive");
        }
        let ops_listen = parse_ops(&self.ops_listen)?;
        if self.kube.kube && (self.dev || !self.jwt_issuers.is_empty()) {
            bail!(
                "--dev and --jwt-issuer cannot be combined with --kube: their tokens would not be checked against the cluster (pods, service accounts, nodes)"
            );
        }
        // The API server refuses pod certificates shorter than an hour.
        if self.kube.pcr.pod_certificates && self.max_ttl < Duration::from_secs(3600) {
            bail!(
                "--pod-certificates needs --max-ttl of at least 1h (the API server refuses shorter pod certificates); it is {:?}",
                self.max_ttl
            );
        }
        if self.kube.kube && self.cacerts.is_some() {
            bail!(
                "--cacerts is a directory; with --kube a plugged-in CA comes from Secret {} (--cacerts-secret)",
                self.kube.cacerts_secret
            );
        }
        let ca = match &self.cacerts {
            Some(dir) => CaSource::PluggedIn(dir.clone()),
            None => CaSource::Embedded {
                algorithm: self.root_key,
                root_lifetime: self.root_lifetime,
            },
        };
        let admin_socket = match self.admin_socket.as_deref() {
            Some("off") => None,
            Some(p) => Some(PathBuf::from(p)),
            None => Some(self.state_dir.join(crate::server::admin::DEFAULT_SOCKET)),
        };
        let auto_rotate = match self.auto_rotate.as_str() {
            "off" => None,
            f => {
                let f: f64 = f.parse().map_err(|_| {
                    anyhow::anyhow!("--auto-rotate {f:?}: expected a fraction or off")
                })?;
                if !(f > 0.0 && f < 1.0) {
                    bail!("--auto-rotate {f}: the fraction must be between 0 and 1");
                }
                match self.cacerts {
                    Some(_) => None,
                    None => Some(f),
                }
            }
        };
        if self.reissue_rate == 0 {
            bail!("--reissue-rate must be positive");
        }
        Ok(ServerConfig {
            admin_socket,
            auto_rotate,
            auto_rotate_interval: self.auto_rotate_interval,
            reissue_rate: self.reissue_rate,
            state_dir: self.state_dir.clone(),
            trust_domain: self.trust_domain.clone(),
            ca,
            listen: self.listen,
            ops_listen,
            serving: ServingSpec {
                dns_names: self.dns_names.clone(),
                ips: self.ip_sans.clone(),
                ttl: self.serving_cert_ttl,
            },
            ttl: TtlPolicy {
                default_ttl: self.default_ttl,
                max_ttl: self.max_ttl,
            },
            jwt_issuers: self.jwt_issuers.clone(),
            jwt_audiences: self.jwt_audiences.clone(),
            max_token_lifetime: self.max_token_lifetime.0,
            dev_issuer: self.dev,
            jwks_refresh: self.jwks_refresh,
            drain_timeout: self.drain_timeout,
            limits: self.limits.to_limits()?,
        })
    }
}

pub(super) async fn run_server(args: ServerArgs) -> anyhow::Result<()> {
    let mut config = args.to_config()?;
    // Installed before anything else, so SIGTERM at any moment is an
    // orderly stop rather than the default kill.
    let mut signals = Signals::install()?;
    let cluster = tokio::select! {
        r = super::kube::cluster(&args.kube, args.jwks_refresh, &config.jwt_audiences, &config.trust_domain) => r?,
        _ = signals.recv() => {
            tracing::info!("stop signal during start-up; exiting");
            return Ok(());
        }
    };
    let kube_ca = cluster.as_ref().map(|c| {
        // A plugged-in CA is replaced by an operator, never by itself.
        if c.seed.is_some() {
            config.auto_rotate = None;
        }
        format!("{} (Kubernetes)", c.store.describe())
    });
    let running = tokio::select! {
        r = server::start_with(config.clone(), cluster) => r.context("starting the CA server")?,
        _ = signals.recv() => {
            tracing::info!("stop signal during start-up; exiting");
            return Ok(());
        }
    };
    let ca_line = match &config.ca {
        _ if kube_ca.is_some() => kube_ca.unwrap_or_default(),
        CaSource::PluggedIn(dir) => format!("plugged-in CA from {}", dir.display()),
        CaSource::Embedded { .. } if running.ca_created => {
            format!(
                "created a new self-signed root in {}",
                config.state_dir.join("ca").display()
            )
        }
        CaSource::Embedded { .. } => format!(
            "reusing the root in {}",
            config.state_dir.join("ca").display()
        ),
    };
    say!("workload-ca server is up");
    say!("  trust domain : {}", config.trust_domain);
    say!("  CA           : {ca_line}");
    say!(
        "  gRPC (TLS)   : {}  istio.v1.auth.IstioCertificateService/CreateCertificate",
        running.grpc_addr
    );
    say!("  TLS names    : {}", config.serving.dns_names.join(", "));
    say!(
        "  root cert    : {}  (clients verify the server and their certificates with it)",
        running.root_cert_path.display()
    );
    if let Some(ops) = running.ops_addr {
        say!("  metrics      : http://{ops}/metrics   health: /healthz /readyz");
    }
    say!("  auth         : {}", running.authenticators.join(", "));
    if running.dev_issuer_key.is_some() {
        say!(
            "  get a token  : ca token --state-dir {} --namespace default --service-account default   (DEVELOPMENT issuer)",
            config.state_dir.display()
        );
    } else if running.jwt_issuers.is_empty() {
        say!(
            "  get a token  : no token issuer configured; add --jwt-issuer ISSUER=JWKS, or --dev for local use"
        );
    }
    signals.recv().await;
    tracing::info!("shutting down: draining in-flight calls");
    running.shutdown().await.context("shutting down")?;
    Ok(())
}
