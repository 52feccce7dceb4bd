//! `ca bench`: measures a CA (a running one, or one it starts on the
//! embedded default) the way a fleet loads it, and reports what it cost.
//!
//! - **warm**: long-lived HTTP/2 connections, as renewing agents: `C`
//!   requests in flight over `K` connections.
//! - **cold**: a new TCP + TLS connection per certificate, as starting pods.
//! - **burst**: `N` distinct identities fire at once, each on a new
//!   connection: the time until every one holds a certificate.
//! - **agent**: one node agent serving many SDS streams through rotations.
//! - **soak**: minutes of everything at once (a started CA under load,
//!   several node agents renewing every few seconds with SDS streams
//!   checking each certificate, a root rotation in the middle), watching
//!   for errors and for memory or file-descriptor growth.
//!
//! Everything a request needs (identities, tokens, keys, CSRs, the encoded
//! gRPC message and its headers) is made before the clock starts, so the
//! client spends as little as it can; its own CPU is measured and reported.
//! Beside the load figures, the report gives the *floor*: the in-process
//! cost on this machine of the work no CA can skip per request (CSR
//! signature verify, token signature verify, sign and encode the leaf), and
//! the ratio of the server's CPU per certificate to it.

pub mod agent;
mod agent_proc;
mod agent_report;
mod agent_streams;
mod client;
mod floor;
mod load;
mod procfs;
mod report;
pub mod soak;
mod soak_check;
mod soak_report;
mod soak_tasks;
mod target;
mod work;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

pub use report::Report;
pub use target::{StartedServer, Target, TokenSource};

use super::{parse_duration, parse_key_algorithm};
use crate::ca::KeyAlgorithm;

/// What `ca bench` measures.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Long-lived connections (renewing agents).
    Warm,
    /// A new connection per certificate (starting pods).
    Cold,
    /// N identities at once, each on a new connection.
    Burst,
    /// One node agent serving many SDS streams through rotations.
    Agent,
    /// Minutes of load, agents renewing and a root rotation: errors and
    /// resource growth.
    Soak,
}

/// `ca bench`'s arguments.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub mode: Mode,
    /// The CA under test.
    #[command(flatten)]
    pub target: TargetArgs,
    /// Where the callers' tokens come from.
    #[command(flatten)]
    pub tokens: TokenArgs,
    /// How much load, for how long.
    #[command(flatten)]
    pub load: LoadArgs,
    /// The agent mode's shape.
    #[command(flatten, next_help_heading = "Agent mode")]
    pub agent: agent::AgentArgs,
    /// The soak's agents, certificates and limits.
    #[command(flatten, next_help_heading = "Soak mode")]
    pub soak: soak::SoakArgs,
    /// Print one JSON object instead of the human report.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub json_file: Option<PathBuf>,
}

/// The CA under test.
#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    /// A running CA's gRPC address (HOST:PORT). Without it, `ca bench`
    /// starts `ca server` on 127.0.0.1 in a temporary state directory.
    #[arg(long)]
    pub addr: Option<String>,
    /// The name the CA's TLS certificate is checked for.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// Root certificate(s) the CA's TLS certificate and the issued
    /// certificates chain to (required with --addr).
    #[arg(long)]
    pub root_cert: Option<PathBuf>,
    /// A local CA's process id: its CPU time and memory are read from /proc.
    /// Set by itself for a started CA.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Key type of a started CA's root.
    #[arg(long, default_value = "ecdsa-p256", value_parser = parse_key_algorithm)]
    pub ca_key: KeyAlgorithm,
    /// A started CA's audit line per issued certificate (`on`: log level
    /// info; `off`: warn).
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub audit: OnOff,
    /// One more flag for a started CA (repeatable), e.g.
    /// `--server-arg=--default-ttl=1h`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// A started CA keeps its admin socket (`<state-dir>/admin.sock`) for
    /// `ca rotate-root` (soak); otherwise it runs without one.
    #[arg(skip)]
    pub admin_socket: bool,
}

/// A switch.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnOff {
    /// Turned on.
    On,
    /// Turned off.
    Off,
}

/// Where tokens come from. Default: for a started CA, an RS256 issuer key
/// made for the run (Kubernetes-shaped service-account tokens); for
/// `--addr`, one of these must be given.
#[derive(Args, Debug, Clone)]
pub struct TokenArgs {
    /// PEM private key (PKCS#8 RSA, P-256 or P-384, or PKCS#1 RSA) of an
    /// issuer the CA trusts: tokens are signed with it.
    #[arg(long, requires = "issuer")]
    pub issuer_key: Option<PathBuf>,
    /// The `iss` of tokens signed with --issuer-key.
    #[arg(long)]
    pub issuer: Option<String>,
    /// The `kid` of tokens signed with --issuer-key.
    #[arg(long)]
    pub key_id: Option<String>,
    /// State directory of a CA started with `--dev`: its development issuer.
    #[arg(long, conflicts_with = "issuer_key")]
    pub dev_state: Option<PathBuf>,
    /// A file of tokens, one per line, used in turn (each is one identity).
    #[arg(long, conflicts_with_all = ["issuer_key", "dev_state"])]
    pub tokens: Option<PathBuf>,
    /// The tokens' audience.
    #[arg(long, default_value = "istio-ca")]
    pub audience: String,
}

/// How hard and how long.
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Distinct identities (service accounts `bench/sa-<i>`). In burst
    /// mode: how many fire at once.
    #[arg(long, default_value_t = 1000)]
    pub identities: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections the requests share (warm).
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// How long to measure (warm, cold: default 30s), after --warmup; how
    /// long a soak runs (default 10m).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this many measured requests instead.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Load before measuring starts (not counted).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Key type of the CSRs.
    #[arg(long, default_value = "ecdsa-p256", value_parser = parse_key_algorithm)]
    pub csr_key: KeyAlgorithm,
    /// Client source addresses on loopback (127.1.x.y), for cold and burst:
    /// the CA limits connections per source, as pods come from many.
    /// Default: 16 (cold) or one per 48 identities (burst) on loopback.
    #[arg(long)]
    pub sources: Option<usize>,
    /// Resume TLS sessions on reconnect (cold): a reconnecting agent rather
    /// than a new pod.
    #[arg(long)]
    pub resume: bool,
    /// Responses decoded and verified (path to the root, the SPIFFE ID
    /// asked for) besides their gRPC status.
    #[arg(long, default_value_t = 32)]
    pub verify: usize,
    /// Skip measuring the floor.
    #[arg(long)]
    pub no_floor: bool,
    /// Client runtime threads.
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
}

impl LoadArgs {
    /// `--duration`, or 30 s.
    pub fn duration(&self) -> Duration {
        self.duration.unwrap_or(Duration::from_secs(30))
    }
}

/// Runs `ca bench` to its report.
///
/// # Errors
/// A bad flag, a CA that cannot be started or reached, or a run with no
/// successful request.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    crate::server::jwt_crypto::install();
    check(&args)?;
    let runtime = if args.load.client_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.load.client_threads)
            .enable_all()
            .build()
    }
    .context("starting the client runtime")?;
    // SIGINT or SIGTERM ends the run through its guards: the started CA
    // and agent are killed and their directories removed.
    let interrupted = || async {
        match super::Signals::install() {
            Ok(mut s) => s.recv().await,
            Err(_) => std::future::pending().await,
        }
    };
    if args.mode == Mode::Agent {
        let report = runtime.block_on(async {
            tokio::select! {
                r = async {
                    let (target, _server) = target::open(&args.target, &args.tokens).await?;
                    agent::run(&args.agent, &target, args.json).await
                } => r,
                () = interrupted() => bail!("interrupted"),
            }
        })?;
        return emit(&report, &args, || report.print_human());
    }
    if args.mode == Mode::Soak {
        let report = runtime.block_on(async {
            tokio::select! {
                r = soak::run(&args) => r,
                () = interrupted() => bail!("interrupted"),
            }
        })?;
        emit(&report, &args, || report.print_human())?;
        return report.verdict();
    }
    let report = runtime.block_on(async {
        tokio::select! {
            r = run_mode(&args) => r,
            () = interrupted() => bail!("interrupted"),
        }
    })?;
    emit(&report, &args, || report.print_human())?;
    if report.ok == 0 {
        bail!("no request succeeded");
    }
    Ok(())
}

/// Prints a report (JSON or human) and writes `--json-file`.
fn emit(
    report: &impl serde::Serialize,
    args: &BenchArgs,
    human: impl FnOnce(),
) -> anyhow::Result<()> {
    let json = serde_json::to_string(report)?;
    if let Some(path) = &args.json_file {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{json}");
    } else {
        human();
    }
    Ok(())
}

fn check(args: &BenchArgs) -> anyhow::Result<()> {
    let l = &args.load;
    if l.identities == 0 || l.concurrency == 0 || l.connections == 0 || l.client_threads == 0 {
        bail!("--identities, --concurrency, --connections and --client-threads must be at least 1");
    }
    if args.target.addr.is_some() && args.target.root_cert.is_none() {
        bail!("--addr needs --root-cert: the CA's TLS certificate is verified");
    }
    if args.target.addr.is_some()
        && args.tokens.issuer_key.is_none()
        && args.tokens.dev_state.is_none()
        && args.tokens.tokens.is_none()
    {
        bail!("--addr needs a token source: --issuer-key with --issuer, --dev-state, or --tokens");
    }
    if l.duration.is_some_and(|d| d > Duration::from_secs(3000)) {
        bail!("--duration is at most 50 minutes (tokens are minted for an hour)");
    }
    Ok(())
}

async fn run_mode(args: &BenchArgs) -> anyhow::Result<Report> {
    let (target, _server) = target::open(&args.target, &args.tokens).await?;
    let work = work::Work::prepare(&target, &args.load)?;
    // The floor before the load, while the CA is idle.
    let floor = if args.load.no_floor {
        None
    } else {
        let mut floor =
            floor::measure(args.load.csr_key, args.target.ca_key, work.token_algorithm)?;
        if matches!(args.mode, Mode::Cold | Mode::Burst) && !args.load.resume {
            floor.connection = Some(floor::measure_connection()?);
        }
        Some(floor)
    };
    let mut report = match args.mode {
        Mode::Warm => load::warm(&target, &work, &args.load).await?,
        Mode::Cold => load::cold(&target, &work, &args.load).await?,
        Mode::Burst => load::burst(&target, &work, &args.load).await?,
        Mode::Agent | Mode::Soak => bail!("{:?} mode has its own report", args.mode),
    };
    report.mode = args.mode;
    report.set_floor(floor);
    Ok(report)
}
