//! TEMPORARY (agent-mode helper's stub): a started `ca server --dev` child
//! as the bench target, with tokens from its development issuer, until the
//! lead's target (its `--addr`, `--dev-state`, ... flags) replaces it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};

use super::agent_proc::TempDir;
use super::{Target, TokenSource};
use crate::server::devissuer::DevIssuer;

struct DevTokens(DevIssuer);

impl TokenSource for DevTokens {
    fn token(&self, namespace: &str, service_account: &str) -> anyhow::Result<String> {
        Ok(self.0.mint(
            namespace,
            service_account,
            "istio-ca",
            Duration::from_secs(3600),
            SystemTime::now(),
        )?)
    }
}

/// The started server (killed and its state removed when dropped).
pub(super) struct DevTarget {
    pub target: Target,
    child: Child,
    _dir: TempDir,
}

impl DevTarget {
    pub(super) fn start() -> anyhow::Result<Self> {
        crate::server::jwt_crypto::install();
        let dir = TempDir::new("ca-bench-server")?;
        let state = dir.path().join("state");
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let exe = std::env::current_exe().context("locating the ca binary")?;
        let mut cmd = Command::new(exe);
        cmd.args([
            "server",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "off",
        ])
        .arg("--state-dir")
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CA_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd.spawn().context("starting ca server --dev")?;
        let mut addr = None;
        if let Some(out) = child.stdout.take() {
            let mut lines = BufReader::new(out).lines();
            for line in lines.by_ref() {
                let line = line?;
                if let Some(rest) = line.split_once("gRPC (TLS)") {
                    addr = rest
                        .1
                        .trim_start_matches([' ', ':'])
                        .split_whitespace()
                        .next()
                        .map(str::to_owned);
                }
                if line.contains("auth ") {
                    break;
                }
            }
            std::thread::spawn(move || lines.for_each(drop));
        }
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
            bail!("ca server --dev did not start:\n{log}");
        };
        let issuer = DevIssuer::load(&state)?;
        Ok(Self {
            target: Target {
                addr,
                server_name: "localhost".into(),
                root_cert: state.join("root-cert.pem"),
                server_pid: Some(child.id()),
                tokens: Arc::new(DevTokens(issuer)),
            },
            child,
            _dir: dir,
        })
    }
}

impl Drop for DevTarget {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
