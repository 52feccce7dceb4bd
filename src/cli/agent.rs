//! `ca agent`: the node agent's flags and its run.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::{Signals, limits, parse_duration, parse_key_algorithm, parse_ops};
use crate::agent::client::CaEndpoint;
use crate::agent::sds::PeerRule;
use crate::agent::workload::RotationPolicy;
use crate::agent::{self, AgentConfig, WorkloadConfig};
use crate::ca::KeyAlgorithm;

/// `ca agent`: the node agent's options.
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
    /// Node mode: a workload as NAME=TOKEN_FILE (repeatable), or with
    /// `--node-token` as NAME=SPIFFE_ID; its socket is
    /// `<socket-dir>/<NAME>/socket`, a directory per workload that can be
    /// mounted into that workload's pod alone.
    #[arg(long = "workload", value_parser = parse_workload)]
    pub workloads: Vec<(String, PathBuf)>,
    /// Node mode with one token: this agent's own service-account token (a
    /// trusted node account on the CA), used for every `--workload
    /// NAME=spiffe://...`; the CA issues each identity only while a pod of
    /// it runs on this node.
    #[arg(long, env = "CA_NODE_TOKEN")]
    pub node_token: Option<PathBuf>,
    /// Node mode: directory of the per-workload sockets.
    #[arg(long, env = "CA_SOCKET_DIR", default_value = "sds")]
    pub socket_dir: PathBuf,
    /// This agent's name in its reports to the CA's bundle watch (default:
    /// the host name).
    #[arg(long, env = "CA_AGENT_NAME")]
    pub agent_name: Option<String>,
    /// When and how certificates are renewed.
    #[command(flatten)]
    pub rotation: RotationArgs,
    /// Metrics and health listen address; `off` disables it. `/readyz` is
    /// false while a workload has no certificate, or one with less than a
    /// fifth of its lifetime left (the readiness margin, see the README).
    #[arg(long, env = "CA_AGENT_OPS_LISTEN", default_value = "127.0.0.1:15020")]
    pub ops_listen: String,
    /// Bind a workload's SDS socket to the one process that may use it, as
    /// NAME=UID or NAME=UID:GID (repeatable; NAME is `default` in sidecar
    /// mode): a connection from any other uid or gid is refused, by the
    /// kernel's `SO_PEERCRED`, even when the socket's file permissions
    /// would let it in.
    #[arg(long = "socket-peer", value_parser = parse_socket_peer)]
    pub socket_peers: Vec<(String, PeerRule)>,
    /// Also write key.pem (0600), cert-chain.pem and root-cert.pem to DIR/<workload>/.
    #[arg(long, env = "CA_OUTPUT_DIR")]
    pub output_dir: Option<PathBuf>,
    /// Connection, stream and name limits.
    #[command(flatten)]
    pub limits: limits::AgentLimitArgs,
}

/// Certificate key type, lifetime and renewal timing (`ca agent`, `ca dev`).
#[derive(Args, Debug, Clone)]
pub struct RotationArgs {
    /// Key type of workload keys (a fresh key for every certificate).
    #[arg(long, env = "CA_KEY_ALGORITHM", default_value = "ecdsa-p256", value_parser = parse_key_algorithm)]
    pub key_algorithm: KeyAlgorithm,
    /// Requested certificate lifetime; 0 asks for the CA's default.
    #[arg(long, env = "CA_CERT_TTL", default_value = "0", value_parser = parse_duration)]
    pub cert_ttl: Duration,
    /// Renew after this fraction of the lifetime (0.1 to 0.95).
    #[arg(long, default_value_t = crate::ca::ROTATION_FRACTION, value_parser = parse_rotation_fraction)]
    pub rotation_fraction: f64,
    /// Relative jitter on the renewal point (0.1 = +-10%; at most 0.5).
    #[arg(long, default_value_t = 0.1, value_parser = parse_jitter)]
    pub rotation_jitter: f64,
    /// Longest wait between two certificate requests while the CA fails
    /// (the back-off doubles from 200 ms up to it, with jitter).
    #[arg(long, env = "CA_RETRY_MAX_DELAY", default_value = "30s", value_parser = parse_duration)]
    pub retry_max_delay: Duration,
}

impl RotationArgs {
    pub(super) fn policy(&self) -> RotationPolicy {
        let default = RotationPolicy::default();
        RotationPolicy {
            key: self.key_algorithm,
            ttl: self.cert_ttl,
            fraction: self.rotation_fraction,
            jitter: self.rotation_jitter,
            backoff_max: self.retry_max_delay.max(default.backoff_initial),
            ..default
        }
    }
}

pub(super) fn parse_workload(s: &str) -> Result<(String, PathBuf), String> {
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
            "{s:?} is not NAME=TOKEN_FILE or NAME=SPIFFE_ID (NAME: letters, digits, '-', '_', '.')"
        ));
    }
    Ok((name.to_owned(), PathBuf::from(token)))
}

pub(super) fn parse_socket_peer(s: &str) -> Result<(String, PeerRule), String> {
    let (name, rule) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=UID or NAME=UID:GID"))?;
    if name.is_empty() {
        return Err(format!("{s:?}: the workload NAME is empty"));
    }
    Ok((name.to_owned(), rule.parse()?))
}

pub(super) fn parse_bounded(s: &str, min: f64, max: f64) -> Result<f64, String> {
    let f: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(min..=max).contains(&f) {
        return Err(format!("{s} must be between {min} and {max}"));
    }
    Ok(f)
}

pub(super) fn parse_rotation_fraction(s: &str) -> Result<f64, String> {
    parse_bounded(s, 0.1, 0.95)
}

pub(super) fn parse_jitter(s: &str) -> Result<f64, String> {
    parse_bounded(s, 0.0, 0.5)
}

impl AgentArgs {
    /// A workload's token file, and the identity asked for with the node
    /// token when its value is a SPIFFE ID.
    fn workload_credential(
        &self,
        name: &str,
        value: &std::path::Path,
    ) -> anyhow::Result<(PathBuf, Option<crate::identity::SpiffeId>)> {
        let text = value.to_string_lossy();
        if !text.starts_with("spiffe://") {
            return Ok((value.to_owned(), None));
        }
        let Some(node_token) = &self.node_token else {
            anyhow::bail!(
                "--workload {name}={text}: an identity needs --node-token (the agent's own token, a trusted node account on the CA)"
            );
        };
        let id = crate::identity::SpiffeId::parse(&text)
            .map_err(|e| anyhow::anyhow!("--workload {name}={text}: {e}"))?;
        if id.service_account().is_none() {
            anyhow::bail!(
                "--workload {name}={text}: not of the form spiffe://<td>/ns/<ns>/sa/<sa>"
            );
        }
        Ok((node_token.clone(), Some(id)))
    }

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
                identity: None,
                peer: None,
            }]
        } else {
            let mut configs = Vec::new();
            for (name, value) in &self.workloads {
                let (token_file, identity) = self.workload_credential(name, value)?;
                let dir = self.socket_dir.join(name);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                configs.push(WorkloadConfig {
                    name: name.clone(),
                    token_file,
                    socket: dir.join("socket"),
                    identity,
                    peer: None,
                });
            }
            configs
        };
        let mut workloads = workloads;
        for (name, rule) in &self.socket_peers {
            let Some(w) = workloads.iter_mut().find(|w| &w.name == name) else {
                anyhow::bail!(
                    "--socket-peer {name}={rule}: no workload is named {name:?} (sidecar mode's is \"default\")"
                );
            };
            if w.peer.replace(*rule).is_some() {
                anyhow::bail!("--socket-peer {name}: given twice");
            }
        }
        Ok(AgentConfig {
            agent_name: self.agent_name.clone().unwrap_or_else(host_name),
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

/// The host name (`/proc/sys/kernel/hostname`), else `agent`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "agent".to_owned())
}

pub(super) async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    fn agent(extra: &[&str]) -> anyhow::Result<crate::agent::AgentConfig> {
        let dir = tempfile::tempdir().unwrap();
        let sockets = dir.path().join("sds");
        let mut argv = vec![
            "ca",
            "agent",
            "--ops-listen",
            "off",
            "--socket-dir",
            sockets.to_str().unwrap(),
        ];
        argv.extend_from_slice(extra);
        let Command::Agent(args) = Cli::try_parse_from(&argv).unwrap().command else {
            panic!("not agent")
        };
        args.to_config()
    }

    #[test]
    fn an_identity_needs_the_node_token() {
        let web = "web=spiffe://cluster.local/ns/prod/sa/web";
        let e = agent(&["--workload", web]).unwrap_err().to_string();
        assert!(e.contains(web) && e.contains("needs --node-token"), "{e}");

        let config = agent(&[
            "--node-token",
            "/run/node-token",
            "--workload",
            web,
            "--workload",
            "db=/t/db",
        ])
        .unwrap();
        let [w, d] = &config.workloads[..] else {
            panic!("{:?}", config.workloads)
        };
        assert_eq!(w.token_file, std::path::Path::new("/run/node-token"));
        assert_eq!(
            w.identity.as_ref().map(|i| i.as_str()),
            Some("spiffe://cluster.local/ns/prod/sa/web")
        );
        assert_eq!(d.token_file, std::path::Path::new("/t/db"));
        assert!(d.identity.is_none(), "a token file keeps its own identity");

        for bad in [
            "web=spiffe://cluster.local/ns/prod",
            "web=spiffe://cluster.local/other/path",
            "web=spiffe://Bad Domain/ns/prod/sa/web",
        ] {
            let e = agent(&["--node-token", "/run/node-token", "--workload", bad])
                .unwrap_err()
                .to_string();
            assert!(e.contains(bad.split_once('=').unwrap().1), "{bad}: {e}");
        }
    }

    #[test]
    fn a_socket_is_bound_to_its_peer_by_workload_name() {
        use crate::agent::sds::PeerRule;
        let config = agent(&["--socket-peer", "default=1337:1338"]).unwrap();
        assert_eq!(
            config.workloads[0].peer,
            Some(PeerRule {
                uid: 1337,
                gid: Some(1338)
            })
        );
        let config = agent(&[
            "--workload",
            "web=/t/web",
            "--workload",
            "db=/t/db",
            "--socket-peer",
            "db=7",
        ])
        .unwrap();
        let peers: Vec<_> = config
            .workloads
            .iter()
            .map(|w| (w.name.as_str(), w.peer))
            .collect();
        assert_eq!(
            peers,
            [("web", None), ("db", Some(PeerRule { uid: 7, gid: None }))]
        );
        assert!(agent(&[]).unwrap().workloads[0].peer.is_none());

        let e = agent(&["--socket-peer", "web=7"]).unwrap_err().to_string();
        assert!(e.contains("no workload is named \"web\""), "{e}");
        let e = agent(&["--socket-peer", "default=7", "--socket-peer", "default=8"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("given twice"), "{e}");
        for bad in [
            "default",
            "default=",
            "default=x",
            "default=7:",
            "default=65534",
            "default=7:65534",
            "default=4294967295",
            "default=-1",
            "=7",
        ] {
            let argv = ["ca", "agent", "--socket-peer", bad];
            assert!(Cli::try_parse_from(argv).is_err(), "{bad} was accepted");
        }
    }
}
