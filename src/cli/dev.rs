//! `ca dev`: a CA and an agent in one process, on the embedded default.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Args;

use super::agent::RotationArgs;
use super::server::ServerArgs;
use super::{Signals, parse_ops};
use crate::agent::client::CaEndpoint;
use crate::agent::{self, AgentConfig, WorkloadConfig};
use crate::server::{self, devissuer::DevIssuer};

/// `ca dev`: a CA and an agent in one process.
#[derive(Args, Debug)]
pub struct DevArgs {
    /// The CA server's options.
    #[command(flatten)]
    pub server: ServerArgs,
    /// The SDS socket of the local agent [default: <state-dir>/sds.sock].
    #[arg(long)]
    pub sds_socket: Option<PathBuf>,
    /// The identity the local agent gets.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// The service account of the identity the local agent gets.
    #[arg(long, default_value = "default")]
    pub service_account: String,
    /// When and how the local agent renews its certificate.
    #[command(flatten)]
    pub rotation: RotationArgs,
    /// The agent's metrics and health address.
    #[arg(long, default_value = "127.0.0.1:15020")]
    pub agent_ops_listen: String,
}

pub(super) async fn run_dev(args: DevArgs) -> anyhow::Result<()> {
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
        agent_name: super::agent::host_name(),
        ca: CaEndpoint {
            address: running.grpc_addr.to_string(),
            root_cert: running.root_cert_path.clone(),
            server_name: "localhost".into(),
        },
        workloads: vec![WorkloadConfig {
            peer: None,
            name: "default".into(),
            token_file: token_file.clone(),
            socket: sds_socket.clone(),
            identity: None,
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
