//! `ca bench`: load generators against a CA and its agent.
//!
//! STUB of the agent-mode helper: only the `Target` and `TokenSource` of the
//! bench contract, and `ca bench agent` on a started `ca server --dev`. The
//! lead's `mod.rs` replaces it (its own target flags and dispatch).

pub mod agent;
mod agent_devtarget;
mod agent_proc;
mod agent_report;
mod agent_streams;

/// The CA a bench runs against.
pub struct Target {
    pub addr: String,
    pub server_name: String,
    pub root_cert: std::path::PathBuf,
    pub server_pid: Option<u32>,
    pub tokens: std::sync::Arc<dyn TokenSource>,
}

/// Service-account tokens the target CA accepts.
pub trait TokenSource: Send + Sync {
    fn token(&self, namespace: &str, service_account: &str) -> anyhow::Result<String>;
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// One JSON object on stdout instead of the human report.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub mode: Mode,
}

#[derive(clap::Subcommand, Debug)]
pub enum Mode {
    /// S SDS streams on one `ca agent`: push spread per rotation, agent RSS and CPU.
    Agent(agent::AgentArgs),
}

/// Runs `ca bench <mode>`.
///
/// # Errors
/// The target could not be started, or the bench failed.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.mode {
        Mode::Agent(a) => {
            let dev = agent_devtarget::DevTarget::start()?;
            let report = agent::run(&a, &dev.target, args.json).await?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                report.print_human();
            }
            Ok(())
        }
    }
}
