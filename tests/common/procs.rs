//! Real `ca server` and `ca agent` processes for the abuse tests: started on
//! 127.0.0.1 port 0 (or Unix sockets) with the flags a test gives, their
//! logs captured to a file, their open file descriptors counted through
//! /proc, their metrics read over HTTP, and clients that connect from a
//! chosen loopback source address (127.0.0.2 is "another host" to the
//! per-source limits).
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::{CertificateDer, ServerName};
use tempfile::TempDir;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tonic::transport::Channel;
use workload_ca::ca::KeyAlgorithm;
use workload_ca::proto::istio::istio_certificate_service_client::IstioCertificateServiceClient;

use super::h2raw::RawH2;
use super::{ders, http_get, key_and_csr, request, webpki_verify};

/// A source address that is not 127.0.0.1 (Linux routes all of 127/8 to lo).
pub const OTHER_HOST: &str = "127.0.0.2";
pub const THIRD_HOST: &str = "127.0.0.3";

fn read_banner(child: &mut Child, until: &str) -> Vec<String> {
    use std::io::{BufRead, BufReader};
    let stdout = child.stdout.take().unwrap();
    let mut reader = BufReader::new(stdout).lines();
    let mut lines = Vec::new();
    for line in reader.by_ref() {
        let line = line.unwrap();
        let done = line.contains(until);
        lines.push(line);
        if done {
            break;
        }
    }
    // Keep reading what else it prints.
    std::thread::spawn(move || reader.for_each(drop));
    lines
}

fn addr_after(lines: &[String], key: &str) -> SocketAddr {
    let line = lines
        .iter()
        .find(|l| l.contains(key))
        .unwrap_or_else(|| panic!("no {key:?} in the banner: {lines:?}"));
    let rest = line.split_once(':').unwrap().1.trim();
    let rest = rest.trim_start_matches("http://");
    let addr: String = rest
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '/')
        .collect();
    addr.parse()
        .unwrap_or_else(|e| panic!("{addr:?} in {line:?}: {e}"))
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS:`, `VmHWM:`).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap()
}

/// Peak resident memory of a process, in KiB.
pub fn hwm_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// Clock ticks per second of /proc's CPU times.
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of a process (every thread; `self` for this one), in
/// ticks.
pub fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // The command name may hold spaces: fields count from after its ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of proc(5); `rest` starts at field 3.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Waits (up to 15 s) until the process has at most `level` descriptors open.
pub async fn fds_return_to(pid: u32, level: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = fd_count(pid);
        if now <= level {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "open descriptors stayed at {now}, above {level} before the flood"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One value from a Prometheus text page (the sum over matching lines).
pub async fn metric_at(ops: SocketAddr, name: &str) -> f64 {
    let body = http_get(ops, "/metrics").await.1;
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `workload_ca[_agent]_limit_refusals_total{limit="<limit>"}`.
pub fn refusal(prefix: &str, limit: &str) -> String {
    format!("{prefix}_limit_refusals_total{{limit=\"{limit}\"}}")
}

/// A running `ca server --dev`.
pub struct CaProc {
    pub child: Child,
    pub grpc: SocketAddr,
    pub ops: SocketAddr,
    pub state: PathBuf,
    pub log: PathBuf,
    _dir: Option<TempDir>,
}

impl CaProc {
    /// Starts `ca server --dev` with `args` added.
    pub fn start(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = Self::start_at(&dir.path().join("state"), args, &[]);
        ca._dir = Some(dir);
        ca
    }

    /// Starts `ca server --dev` on the state directory `state` (its log
    /// beside it, appended to), with `args` and environment `env` added.
    pub fn start_at(state: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut all = vec!["--dev"];
        all.extend_from_slice(args);
        Self::start_plain(state, &all, env)
    }

    /// Starts `ca server` (no development issuer) on `state` with `args`.
    pub fn start_plain(state: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let state = state.to_owned();
        let log = state.with_extension("log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_ca"))
            .args([
                "server",
                "--listen",
                "127.0.0.1:0",
                "--ops-listen",
                "127.0.0.1:0",
                "--state-dir",
            ])
            .arg(&state)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let banner = read_banner(&mut child, "auth ");
        assert!(
            banner.iter().any(|l| l.contains("gRPC (TLS)")),
            "the CA did not start: {banner:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Self {
            grpc: addr_after(&banner, "gRPC (TLS)"),
            ops: addr_after(&banner, "metrics"),
            child,
            state,
            log,
            _dir: None,
        }
    }

    /// `kill -9`, and wait for it.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn root_pem(&self) -> String {
        std::fs::read_to_string(self.state.join("root-cert.pem")).unwrap()
    }

    /// `ca rotate-root <step>` through this server's admin socket:
    /// whether it succeeded, and what it printed (stdout, then stderr).
    pub fn rotate_root(&self, step: &str) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_ca"))
            .args(["rotate-root", step, "--state-dir"])
            .arg(&self.state)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    pub async fn metric(&self, name: &str) -> f64 {
        metric_at(self.ops, name).await
    }

    pub async fn refusals(&self, limit: &str) -> f64 {
        self.metric(&refusal("workload_ca", limit)).await
    }

    pub fn token(&self, ns: &str, sa: &str) -> String {
        super::dev_token(&self.state, ns, sa)
    }

    /// A fresh gRPC client on its own connection (from 127.0.0.1).
    pub async fn client(&self) -> IstioCertificateServiceClient<Channel> {
        let channel = super::tls_channel(self.grpc, &self.root_pem(), None)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "a legitimate client connects: {e}\nCA log:\n{}",
                    self.log_text()
                )
            });
        IstioCertificateServiceClient::new(channel)
    }

    /// A legitimate client on a new connection gets a certificate that an
    /// independent verifier accepts.
    pub async fn legit_issue(&self) {
        webpki_verify(&self.issue_chain().await);
    }

    /// A certificate for prod/web on a new connection: its `cert_chain`.
    pub async fn issue_chain(&self) -> Vec<String> {
        let (_k, csr) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
        request(
            &mut self.client().await,
            &csr,
            Some(&self.token("prod", "web")),
            0,
        )
        .await
        .expect("a legitimate client gets its certificate")
    }

    /// A TCP connection to the gRPC port from `source`.
    pub async fn tcp_from(&self, source: &str) -> std::io::Result<TcpStream> {
        tcp_from(source, self.grpc).await
    }

    /// A TLS connection (ALPN h2, verified against our root) from `source`.
    pub async fn tls_from(&self, source: &str) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = self.tcp_from(source).await?;
        tls_connector(&self.root_pem())
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
    }

    /// A raw HTTP/2 connection (preface sent) from `source`.
    pub async fn raw_from(&self, source: &str) -> RawH2<TlsStream<TcpStream>> {
        RawH2::handshake(self.tls_from(source).await.unwrap())
            .await
            .unwrap()
    }
}

impl Drop for CaProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn tcp_from(source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.parse::<IpAddr>().unwrap(), 0))?;
    socket.connect(to).await
}

pub fn tls_connector(root_pem: &str) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for der in ders(root_pem) {
        roots.add(CertificateDer::from(der)).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Whether the peer closed `stream` within `within` (EOF or reset), reading
/// and discarding whatever it sends first.
pub async fn closed_within(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    within: Duration,
) -> bool {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Asserts that no line of `log` (in `format`, "text" or "json") was
/// started by peer text (which the tests make begin with `FORGED`), that
/// none carries raw terminal escapes, carriage returns or bidi overrides,
/// and that a JSON log is one object per line.
pub fn assert_log_safe(log: &str, format: &str) {
    for line in log.lines() {
        assert!(
            !line.starts_with("FORGED"),
            "{format}: a forged line: {line}"
        );
        assert!(
            !line.contains('\x1b') && !line.contains('\r') && !line.contains('\u{202e}'),
            "{format}: {line:?}"
        );
        if format == "json" {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
        }
    }
}

/// How many of `streams` the peer closes within `each`, waiting on each in
/// turn.
pub async fn count_closed(streams: &mut [TcpStream], each: Duration) -> usize {
    let mut closed = 0;
    for s in streams {
        if closed_within(s, each).await {
            closed += 1;
        }
    }
    closed
}

/// A running `ca agent` in node mode, its workloads' tokens written by the
/// test.
pub struct AgentProc {
    pub child: Child,
    pub ops: SocketAddr,
    pub socket_dir: PathBuf,
    pub log: PathBuf,
    _dir: TempDir,
}

impl AgentProc {
    /// Starts `ca agent` for `workloads` (name, token) against the CA at
    /// `ca_addr` trusting `root_pem`, with `args` added.
    pub fn start(
        ca_addr: SocketAddr,
        root_pem: &str,
        workloads: &[(&str, String)],
        args: &[&str],
    ) -> Self {
        Self::start_with(ca_addr, root_pem, |dir, cmd| {
            for (name, token) in workloads {
                let path = dir.join(format!("{name}.token"));
                std::fs::write(&path, token).unwrap();
                cmd.arg("--workload")
                    .arg(format!("{name}={}", path.display()));
            }
            cmd.args(args);
        })
    }

    /// Starts `ca agent` against the CA at `ca_addr` trusting `root_pem`;
    /// `setup` adds the flags of its mode, and may write files (tokens)
    /// into the agent's private directory, which it is given.
    pub fn start_with(
        ca_addr: SocketAddr,
        root_pem: &str,
        setup: impl FnOnce(&Path, &mut Command),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root.pem");
        std::fs::write(&root, root_pem).unwrap();
        let socket_dir = dir.path().join("sds");
        let log = dir.path().join("agent.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ca"));
        cmd.args([
            "agent",
            "--ca-addr",
            &ca_addr.to_string(),
            "--ca-server-name",
            "localhost",
        ])
        .arg("--ca-root-cert")
        .arg(&root)
        .arg("--socket-dir")
        .arg(&socket_dir)
        .args(["--ops-listen", "127.0.0.1:0"]);
        setup(dir.path(), &mut cmd);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let banner = read_banner(&mut child, "metrics");
        assert!(
            banner.iter().any(|l| l.contains("metrics")),
            "the agent did not start: {banner:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Self {
            ops: addr_after(&banner, "metrics"),
            child,
            socket_dir,
            log,
            _dir: dir,
        }
    }

    /// The agent's private directory (its root file, tokens, log).
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn socket(&self, workload: &str) -> PathBuf {
        self.socket_dir.join(workload).join("socket")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    pub async fn refusals(&self, limit: &str) -> f64 {
        metric_at(self.ops, &refusal("workload_ca_agent", limit)).await
    }

    /// Waits (up to 20 s) until every workload holds a certificate.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_get(self.ops, "/readyz").await.0 != 200 {
            assert!(Instant::now() < deadline, "agent never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// FetchSecrets on `socket` for `default` and `ROOTCA`: the workload's proxy
/// is served.
pub async fn fetch_default(socket: &Path) {
    use workload_ca::proto::envoy::service::discovery::v3::DiscoveryRequest;
    use workload_ca::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    let mut sds = SecretDiscoveryServiceClient::new(super::unix_channel(socket).await);
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        sds.fetch_secrets(DiscoveryRequest {
            resource_names: vec!["default".into(), "ROOTCA".into()],
            ..Default::default()
        }),
    )
    .await
    .expect("FetchSecrets answered in time")
    .expect("the workload is served")
    .into_inner();
    assert_eq!(resp.resources.len(), 2);
}

/// The serving certificate a server at `addr` presents to a fresh TLS
/// handshake verified against `root_pem` (DER).
pub async fn served_cert(addr: SocketAddr, root_pem: &str) -> Vec<u8> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tls_connector(root_pem)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("handshake verifies against the roots");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}
