//! The `ca` command line. Lives in the library so it can be tested; `main.rs`
//! only calls [`main`].

pub mod limits;

/// Prints a banner line to stdout, ignoring a closed stdout: a server whose
/// banner reader went away (`ca server | head -3`) must keep serving, not
/// panic on `println!`'s broken pipe.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::agent::client::CaEndpoint;
use crate::agent::workload::RotationPolicy;
use crate::agent::{self, AgentConfig, WorkloadConfig};
use crate::ca::{KeyAlgorithm, TtlPolicy};
use crate::identity::TrustDomain;
use crate::server::devissuer::DevIssuer;
use crate::server::jwt::{IssuerConfig, KeySource};
use crate::server::tls::ServingSpec;
use crate::server::{self, CaSource, ServerConfig};

#[derive(Parser, Debug)]
#[command(
    name = "ca",
    version,
    about = "workload-ca: SPIFFE certificates for Kubernetes service accounts"
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CA_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `workload_ca=debug`.
    #[arg(long, global = true, default_value = "info", env = "CA_LOG")]
    pub log_level: String,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the CA server (Istio's CreateCertificate API over gRPC/TLS).
    Server(Box<ServerArgs>),
    /// Run the node agent: certificates for local proxies over Envoy SDS.
    Agent(Box<AgentArgs>),
    /// Run a CA and an agent together on the embedded default (development).
    Dev(Box<DevArgs>),
    /// Mint a development service-account token (trusted only by `server --dev`).
    Token(TokenArgs),
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// CA address, host:port.
    #[arg(long, env = "CA_ADDR", default_value = "127.0.0.1:15012")]
    pub ca_addr: String,
    /// PEM roots the CA's TLS certificate must chain to.
    #[arg(long, env = "CA_ROOT_CERT", default_value = "ca-state/root-cert.pem")]
    pub ca_root_cert: PathBuf,
    /// Name checked in the CA's TLS certificate.
    #[arg(long, env = "CA_SERVER_NAME", default_value = "localhost")]
    pub ca_server_name: String,
    /// Sidecar mode: the workload's service-account token (re-read before every request).
    #[arg(
        long,
        env = "CA_TOKEN_FILE",
        default_value = "/var/run/secrets/tokens/istio-token"
    )]
    pub token_file: PathBuf,
    /// Sidecar mode: the SDS socket the proxy connects to.
    #[arg(long, env = "CA_SDS_SOCKET", default_value = "sds.sock")]
    pub sds_socket: PathBuf,
    /// Node mode: a workload as NAME=TOKEN_FILE (repeatable); its socket is
    /// `<socket-dir>/<NAME>/socket`, a directory per workload that can be
    /// mounted into that workload's pod alone.
    #[arg(long = "workload", value_parser = parse_workload)]
    pub workloads: Vec<(String, PathBuf)>,
    /// Node mode: directory of the per-workload sockets.
    #[arg(long, env = "CA_SOCKET_DIR", default_value = "sds")]
    pub socket_dir: PathBuf,
    #[command(flatten)]
    pub rotation: RotationArgs,
    /// Metrics and health listen address; `off` disables it.
    #[arg(long, env = "CA_AGENT_OPS_LISTEN", default_value = "127.0.0.1:15020")]
    pub ops_listen: String,
    /// Also write key.pem (0600), cert-chain.pem and root-cert.pem to DIR/<workload>/.
    #[arg(long, env = "CA_OUTPUT_DIR")]
    pub output_dir: Option<PathBuf>,
    #[command(flatten)]
    pub limits: limits::AgentLimitArgs,
}

#[derive(Args, Debug, Clone)]
pub struct RotationArgs {
    /// Key type of workload keys (a fresh key for every certificate).
    #[arg(long, env = "CA_KEY_ALGORITHM", default_value = "ecdsa-p256", value_parser = parse_key_algorithm)]
    pub key_algorithm: KeyAlgorithm,
    /// Requested certificate lifetime; 0 asks for the CA's default.
    #[arg(long, env = "CA_CERT_TTL", default_value = "0", value_parser = parse_duration)]
    pub cert_ttl: Duration,
    /// Renew after this fraction of the lifetime (0.1 to 0.95).
    #[arg(long, default_value_t = 0.5, value_parser = parse_rotation_fraction)]
    pub rotation_fraction: f64,
    /// Relative jitter on the renewal point (0.1 = +-10%; at most 0.5).
    #[arg(long, default_value_t = 0.1, value_parser = parse_jitter)]
    pub rotation_jitter: f64,
}

impl RotationArgs {
    fn policy(&self) -> RotationPolicy {
        RotationPolicy {
            key: self.key_algorithm,
            ttl: self.cert_ttl,
            fraction: self.rotation_fraction,
            jitter: self.rotation_jitter,
            ..RotationPolicy::default()
        }
    }
}

#[derive(Args, Debug)]
pub struct DevArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The SDS socket of the local agent [default: <state-dir>/sds.sock].
    #[arg(long)]
    pub sds_socket: Option<PathBuf>,
    /// The identity the local agent gets.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    #[arg(long, default_value = "default")]
    pub service_account: String,
    #[command(flatten)]
    pub rotation: RotationArgs,
    /// The agent's metrics and health address.
    #[arg(long, default_value = "127.0.0.1:15020")]
    pub agent_ops_listen: String,
}

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
    #[command(flatten)]
    pub limits: limits::ServerLimitArgs,
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// State directory of a server started with `--dev`.
    #[arg(long, env = "CA_STATE_DIR", default_value = "ca-state")]
    pub state_dir: PathBuf,
    #[arg(long, default_value = "default")]
    pub namespace: String,
    #[arg(long, default_value = "default")]
    pub service_account: String,
    #[arg(long, default_value = "istio-ca")]
    pub audience: String,
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
}

fn parse_trust_domain(s: &str) -> Result<TrustDomain, String> {
    TrustDomain::new(s).map_err(|e| e.to_string())
}

fn parse_key_algorithm(s: &str) -> Result<KeyAlgorithm, String> {
    s.parse().map_err(|e: crate::ca::Error| e.to_string())
}

fn parse_workload(s: &str) -> Result<(String, PathBuf), String> {
    let (name, token) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=TOKEN_FILE"))?;
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.');
    if !ok || token.is_empty() {
        return Err(format!(
            "{s:?} is not NAME=TOKEN_FILE (NAME: letters, digits, '-', '_', '.')"
        ));
    }
    Ok((name.to_owned(), PathBuf::from(token)))
}

fn parse_bounded(s: &str, min: f64, max: f64) -> Result<f64, String> {
    let f: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(min..=max).contains(&f) {
        return Err(format!("{s} must be between {min} and {max}"));
    }
    Ok(f)
}

fn parse_rotation_fraction(s: &str) -> Result<f64, String> {
    parse_bounded(s, 0.1, 0.95)
}

fn parse_jitter(s: &str) -> Result<f64, String> {
    parse_bounded(s, 0.0, 0.5)
}

fn parse_ops(s: &str) -> anyhow::Result<Option<SocketAddr>> {
    match s {
        "off" | "" => Ok(None),
        addr => Ok(Some(
            addr.parse()
                .with_context(|| format!("ops address {addr:?}"))?,
        )),
    }
}

fn parse_issuer(s: &str) -> Result<IssuerConfig, String> {
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

/// `30s`, `15m`, `24h`, `90d`, `10y` (365 days); a bare number is seconds.
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 15m, 24h, 90d, 10y"))?;
    let mult = match unit {
        "" | "s" => 1,
        "ms" => return Ok(Duration::from_millis(n)),
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "y" => 365 * 86_400,
        _ => {
            return Err(format!(
                "{s:?} has unknown unit {unit:?} (ms, s, m, h, d, y)"
            ));
        }
    };
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
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
        let ops_listen = match self.ops_listen.as_str() {
            "off" | "" => None,
            addr => Some(
                addr.parse()
                    .with_context(|| format!("--ops-listen {addr:?}"))?,
            ),
        };
        let ca = match &self.cacerts {
            Some(dir) => CaSource::PluggedIn(dir.clone()),
            None => CaSource::Embedded {
                algorithm: self.root_key,
                root_lifetime: self.root_lifetime,
            },
        };
        Ok(ServerConfig {
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

fn init_logging(args: &LogArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("--log-level {:?}", args.log_level))?;
    use std::io::IsTerminal;
    // Colour codes only where a person reads them, never in a log file or
    // a collector.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match args.log_format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("initialising logs: {e}"))
}

/// Entry point of the `ca` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a parsed command line.
///
/// # Errors
/// Whatever the command reports.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    init_logging(&cli.log)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    match cli.command {
        Command::Server(args) => runtime.block_on(run_server(*args)),
        Command::Agent(args) => runtime.block_on(run_agent(*args)),
        Command::Dev(args) => runtime.block_on(run_dev(*args)),
        Command::Token(args) => {
            crate::server::jwt_crypto::install();
            let issuer = DevIssuer::load(&args.state_dir)?;
            let token = issuer.mint(
                &args.namespace,
                &args.service_account,
                &args.audience,
                args.ttl,
                SystemTime::now(),
            )?;
            use std::io::Write;
            writeln!(std::io::stdout(), "{token}").context("writing the token")?;
            Ok(())
        }
    }
}

async fn run_server(args: ServerArgs) -> anyhow::Result<()> {
    let config = args.to_config()?;
    // Installed before anything else, so SIGTERM at any moment is an
    // orderly stop rather than the default kill.
    let mut signals = Signals::install()?;
    let running = tokio::select! {
        r = server::start(config.clone()) => r.context("starting the CA server")?,
        _ = signals.recv() => {
            tracing::info!("stop signal during start-up; exiting");
            return Ok(());
        }
    };
    let ca_line = match &config.ca {
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

impl AgentArgs {
    /// The agent configuration these flags describe.
    ///
    /// # Errors
    /// A bad ops address.
    pub fn to_config(&self) -> anyhow::Result<AgentConfig> {
        let workloads = if self.workloads.is_empty() {
            vec![WorkloadConfig {
                name: "default".into(),
                token_file: self.token_file.clone(),
                socket: self.sds_socket.clone(),
            }]
        } else {
            let mut configs = Vec::new();
            for (name, token) in &self.workloads {
                let dir = self.socket_dir.join(name);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                configs.push(WorkloadConfig {
                    name: name.clone(),
                    token_file: token.clone(),
                    socket: dir.join("socket"),
                });
            }
            configs
        };
        Ok(AgentConfig {
            ca: CaEndpoint {
                address: self.ca_addr.clone(),
                root_cert: self.ca_root_cert.clone(),
                server_name: self.ca_server_name.clone(),
            },
            workloads,
            policy: self.rotation.policy(),
            ops_listen: parse_ops(&self.ops_listen)?,
            output_dir: self.output_dir.clone(),
            limits: self.limits.to_limits()?,
        })
    }
}

async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let config = args.to_config()?;
    let mut signals = Signals::install()?;
    let agent = agent::start(config.clone())
        .await
        .context("starting the agent")?;
    say!("workload-ca agent is up");
    say!(
        "  CA           : {} (verified with {})",
        config.ca.address,
        config.ca.root_cert.display()
    );
    for w in &config.workloads {
        say!(
            "  workload     : {}  token {}  SDS socket {}",
            w.name,
            w.token_file.display(),
            w.socket.display()
        );
    }
    if let Some(ops) = agent.ops_addr {
        say!("  metrics      : http://{ops}/metrics   health: /healthz /readyz");
    }
    signals.recv().await;
    tracing::info!("shutting down the agent");
    agent.shutdown().await;
    Ok(())
}

async fn run_dev(args: DevArgs) -> anyhow::Result<()> {
    let mut server_args = args.server;
    server_args.dev = true;
    let config = server_args.to_config()?;
    let mut signals = Signals::install()?;
    let running = server::start(config.clone())
        .await
        .context("starting the CA server")?;

    // The local workload's token, minted by the development issuer and
    // refreshed well before it expires, as a kubelet would.
    let agent_dir = config.state_dir.join("agent");
    std::fs::create_dir_all(&agent_dir)
        .with_context(|| format!("creating {}", agent_dir.display()))?;
    let token_file = agent_dir.join("token");
    let sds_socket = args
        .sds_socket
        .clone()
        .unwrap_or_else(|| config.state_dir.join("sds.sock"));
    let issuer = DevIssuer::load(&config.state_dir)?;
    let mint = {
        let (ns, sa, token_file) = (
            args.namespace.clone(),
            args.service_account.clone(),
            token_file.clone(),
        );
        move |issuer: &DevIssuer| -> anyhow::Result<()> {
            let token = issuer.mint(
                &ns,
                &sa,
                "istio-ca",
                Duration::from_secs(3600),
                SystemTime::now(),
            )?;
            crate::ca::store::atomic_write(&token_file, token.as_bytes(), 0o600)?;
            Ok(())
        }
    };
    mint(&issuer)?;
    let refresher = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1800)).await;
            if let Err(e) = mint(&issuer) {
                tracing::error!(error = %e, "refreshing the development token failed");
            }
        }
    });

    let agent = agent::start(AgentConfig {
        ca: CaEndpoint {
            address: running.grpc_addr.to_string(),
            root_cert: running.root_cert_path.clone(),
            server_name: "localhost".into(),
        },
        workloads: vec![WorkloadConfig {
            name: "default".into(),
            token_file: token_file.clone(),
            socket: sds_socket.clone(),
        }],
        policy: args.rotation.policy(),
        ops_listen: parse_ops(&args.agent_ops_listen)?,
        output_dir: None,
        limits: crate::limits::AgentLimits::default(),
    })
    .await
    .context("starting the agent")?;

    say!("workload-ca (CA + agent) is up");
    say!(
        "  identity     : spiffe://{}/ns/{}/sa/{}",
        config.trust_domain,
        args.namespace,
        args.service_account
    );
    say!(
        "  CA gRPC (TLS): {}   root cert: {}",
        running.grpc_addr,
        running.root_cert_path.display()
    );
    say!(
        "  SDS socket   : {}   (resources \"default\" and \"ROOTCA\")",
        sds_socket.display()
    );
    if let Some(ops) = running.ops_addr {
        say!("  CA metrics   : http://{ops}/metrics");
    }
    if let Some(ops) = agent.ops_addr {
        say!("  agent metrics: http://{ops}/metrics   ready: /readyz");
    }
    say!(
        "  try Envoy    : envoy -c deploy/envoy/sidecar.yaml --disable-hot-restart   (then: curl -k https://127.0.0.1:10443/)"
    );
    signals.recv().await;
    tracing::info!("shutting down: agent, then CA");
    refresher.abort();
    agent.shutdown().await;
    running.shutdown().await.context("shutting down")?;
    Ok(())
}

/// SIGTERM and SIGINT.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn agent_flags() {
        // A socket dir below a regular file cannot be created, even by root.
        let file = tempfile::NamedTempFile::new().unwrap();
        let dir = file.path().join("sockets");
        let cli = Cli::try_parse_from([
            "ca",
            "agent",
            "--workload",
            "web=/t/web",
            "--workload",
            "db=/t/db",
            "--ops-listen",
            "off",
            "--socket-dir",
            dir.to_str().unwrap(),
        ])
        .unwrap();
        let Command::Agent(args) = cli.command else {
            panic!("not agent")
        };
        assert_eq!(args.workloads.len(), 2);
        assert!(
            args.to_config().is_err(),
            "an uncreatable socket dir is an error"
        );
        for argv in [
            vec!["ca", "agent", "--workload", "=x"],
            vec!["ca", "agent", "--workload", "../up=x"],
            vec!["ca", "agent", "--rotation-fraction", "1.5"],
            vec!["ca", "agent", "--rotation-fraction", "0"],
            vec!["ca", "agent", "--rotation-jitter", "0.9"],
        ] {
            assert!(Cli::try_parse_from(&argv).is_err(), "{argv:?}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("99999999999999999y").is_err());
    }

    #[test]
    fn server_flags_and_their_checks() {
        let cli = Cli::try_parse_from([
            "ca",
            "server",
            "--dev",
            "--jwt-issuer",
            "https://k8s=/tmp/jwks.json",
            "--ops-listen",
            "off",
        ])
        .unwrap();
        let Command::Server(args) = cli.command else {
            panic!("not server")
        };
        let config = args.to_config().unwrap();
        assert!(config.dev_issuer);
        assert!(config.ops_listen.is_none());
        assert_eq!(config.jwt_issuers[0].issuer, "https://k8s");
        assert_eq!(config.jwt_audiences, ["istio-ca"]);
        assert_eq!(config.ttl, TtlPolicy::default());

        let bad = Cli::try_parse_from(["ca", "server", "--default-ttl", "100d"]).unwrap();
        let Command::Server(args) = bad.command else {
            panic!("not server")
        };
        assert!(
            args.to_config()
                .unwrap_err()
                .to_string()
                .contains("--max-ttl")
        );
        for argv in [
            vec!["ca", "server", "--trust-domain", "Bad.Domain"],
            vec!["ca", "server", "--root-key", "dsa"],
            vec!["ca", "server", "--jwt-issuer", "no-equals-sign"],
            vec!["ca", "server", "--jwt-issuer", "iss=http://10.0.0.1/jwks"],
        ] {
            assert!(Cli::try_parse_from(&argv).is_err(), "{argv:?}");
        }
    }
}
