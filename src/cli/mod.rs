//! The `ca` command line. Lives in the library so it can be tested; `main.rs`
//! only calls [`main`].

/// Prints a banner line to stdout, ignoring a closed stdout: a server whose
/// banner reader went away (`ca server | head -3`) must keep serving, not
/// panic on `println!`'s broken pipe.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write;
        // What a peer sent may be in it: no terminal escapes get through.
        let _ = writeln!(
            std::io::stdout(),
            "{}",
            $crate::logsafe::terminal(&format!($($arg)*))
        );
    }};
}

pub mod agent;
pub mod bench;
pub mod dev;
pub mod kube;
pub mod kube_pcr;
pub mod kube_secrets;
pub mod limits;
mod logs;
pub mod rotate;
pub mod server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

pub use agent::{AgentArgs, RotationArgs};
pub use dev::DevArgs;
pub use server::ServerArgs;

use crate::ca::KeyAlgorithm;
use crate::server::devissuer::DevIssuer;

/// The `ca` command line.
#[derive(Parser, Debug)]
#[command(
    name = "ca",
    version,
    about = "workload-ca: SPIFFE certificates for Kubernetes service accounts"
)]
pub struct Cli {
    /// Logging options, global to every subcommand.
    #[command(flatten)]
    pub log: LogArgs,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Logging options.
#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CA_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `workload_ca=debug`.
    #[arg(long, global = true, default_value = "info", env = "CA_LOG")]
    pub log_level: String,
}

/// How log lines are written.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
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
    /// Measure a CA (a running one, or one started on the embedded
    /// default): certificates per second, latency, CPU per certificate
    /// against the floor of unavoidable work, memory.
    Bench(Box<bench::BenchArgs>),
    /// Replace the root CA with no failed handshake: prepare, wait until
    /// every proxy holds the new bundle, activate, wait until no old leaf
    /// is in use, retire. Or one step of it.
    RotateRoot(Box<rotate::RotateArgs>),
}

/// `ca token`: a development service-account token.
#[derive(Args, Debug)]
pub struct TokenArgs {
    /// State directory of a server started with `--dev`.
    #[arg(long, env = "CA_STATE_DIR", default_value = "ca-state")]
    pub state_dir: PathBuf,
    /// The token's namespace.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// The token's service account.
    #[arg(long, default_value = "default")]
    pub service_account: String,
    /// The token's audience (`aud`).
    #[arg(long, default_value = "istio-ca")]
    pub audience: String,
    /// The token's lifetime.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
}

pub(crate) fn parse_key_algorithm(s: &str) -> Result<KeyAlgorithm, String> {
    s.parse().map_err(|e: crate::ca::Error| e.to_string())
}

pub(crate) fn parse_ops(s: &str) -> anyhow::Result<Option<SocketAddr>> {
    match s {
        "off" | "" => Ok(None),
        addr => Ok(Some(
            addr.parse()
                .with_context(|| format!("ops address {addr:?}"))?,
        )),
    }
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

/// Logs to stderr through [`logs::BufferedStderr`]; the guard writes what
/// is left when dropped, so it is held until `run` returns.
fn init_logging(args: &LogArgs) -> anyhow::Result<logs::LogGuard> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("--log-level {:?}", args.log_level))?;
    use std::io::IsTerminal;
    let (writer, guard) = logs::BufferedStderr::start().context("starting the log writer")?;
    // Colour codes only where a person reads them, never in a log file or
    // a collector.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let result = match args.log_format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("initialising logs: {e}"))?;
    Ok(guard)
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
    let _logs = init_logging(&cli.log)?;
    // The load generator runs on a runtime of its own size.
    let command = match cli.command {
        Command::Bench(args) => return bench::run(*args),
        other => other,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    match command {
        Command::Bench(_) => Ok(()),
        Command::Server(args) => runtime.block_on(server::run_server(*args)),
        Command::Agent(args) => runtime.block_on(agent::run_agent(*args)),
        Command::Dev(args) => runtime.block_on(dev::run_dev(*args)),
        Command::RotateRoot(args) => runtime.block_on(rotate::run(*args)),
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

/// SIGTERM and SIGINT.
pub(crate) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    pub(crate) async fn recv(&mut self) {
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
        assert_eq!(config.ttl, crate::ca::TtlPolicy::default());

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
