//! Shared test harness: a real server on 127.0.0.1 port 0, a real TLS gRPC
//! client, token crafting with the development key, and independent
//! certificate checks (rustls-webpki path validation and the openssl CLI).
#![allow(dead_code)]

pub mod cacerts;
pub mod envoy;
pub mod fakekube;
pub mod h2raw;
pub mod kubeca;
pub mod procs;
pub mod sds;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, UnixTime};
use tempfile::TempDir;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use workload_ca::ca::{KeyAlgorithm, PrivateKey, TtlPolicy};
use workload_ca::identity::TrustDomain;
use workload_ca::proto::istio::IstioCertificateRequest;
use workload_ca::proto::istio::istio_certificate_service_client::IstioCertificateServiceClient;
use workload_ca::server::tls::ServingSpec;
use workload_ca::server::{self, CaSource, Running, ServerConfig};

pub const TD: &str = "cluster.local";

pub fn config(state_dir: &Path) -> ServerConfig {
    ServerConfig {
        state_dir: state_dir.to_owned(),
        trust_domain: TrustDomain::new(TD).unwrap(),
        ca: CaSource::Embedded {
            algorithm: KeyAlgorithm::EcdsaP256,
            root_lifetime: Duration::from_secs(10 * 365 * 86_400),
        },
        listen: "127.0.0.1:0".parse().unwrap(),
        ops_listen: Some("127.0.0.1:0".parse().unwrap()),
        serving: ServingSpec {
            dns_names: vec!["localhost".into()],
            ips: vec![],
            ttl: Duration::from_secs(3600),
        },
        ttl: TtlPolicy::default(),
        jwt_issuers: vec![],
        jwt_audiences: vec!["istio-ca".into()],
        dev_issuer: true,
        jwks_refresh: Duration::from_secs(300),
        drain_timeout: Duration::from_secs(5),
        max_token_lifetime: workload_ca::server::jwt::DEFAULT_MAX_TOKEN_LIFETIME,
        limits: workload_ca::limits::ServerLimits::default(),
        admin_socket: Some(state_dir.join("admin.sock")),
        auto_rotate: None,
        auto_rotate_interval: workload_ca::server::AUTO_ROTATION_INTERVAL,
        reissue_rate: 50,
    }
}

pub struct TestServer {
    pub running: Running,
    pub state: PathBuf,
    _dir: Option<TempDir>,
}

impl TestServer {
    /// The default embedded CA in a fresh temporary state directory.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&dir.path().join("state"));
        Self::start_with(cfg, Some(dir)).await
    }

    pub async fn start_with(cfg: ServerConfig, dir: Option<TempDir>) -> Self {
        let state = cfg.state_dir.clone();
        let running = server::start(cfg).await.expect("server starts");
        Self {
            running,
            state,
            _dir: dir,
        }
    }

    pub fn root_pem(&self) -> String {
        std::fs::read_to_string(&self.running.root_cert_path).unwrap()
    }

    /// A TLS client that verifies the server against our root file, with an
    /// optional client certificate (chain PEM, key PEM).
    pub async fn client(
        &self,
        identity: Option<(&str, &str)>,
    ) -> IstioCertificateServiceClient<Channel> {
        let channel = tls_channel(self.running.grpc_addr, &self.root_pem(), identity)
            .await
            .expect("TLS connection to the CA");
        IstioCertificateServiceClient::new(channel)
    }

    pub fn token(&self, ns: &str, sa: &str) -> String {
        dev_token(&self.state, ns, sa)
    }

    /// A fresh P-256 key and a certificate for `ns`/`sa`, obtained with a
    /// development token: (key PEM, cert_chain).
    pub async fn issue(&self, ns: &str, sa: &str, ttl_secs: i64) -> (String, Vec<String>) {
        let (key, csr) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
        let chain = request(
            &mut self.client(None).await,
            &csr,
            Some(&self.token(ns, sa)),
            ttl_secs,
        )
        .await
        .unwrap_or_else(|e| panic!("issuing for {ns}/{sa}: {e}"));
        (key, chain)
    }

    pub fn dev_key_pem(&self) -> String {
        std::fs::read_to_string(self.state.join("dev-issuer-key.pem")).unwrap()
    }

    /// One counter or gauge from `/metrics` (the sum over label values).
    pub async fn metric(&self, name: &str) -> f64 {
        let body = http_get(self.running.ops_addr.unwrap(), "/metrics").await.1;
        body.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// A 10-minute token for `ns`/`sa` from the development issuer of the CA
/// whose state directory is `state`.
pub fn dev_token(state: &Path, ns: &str, sa: &str) -> String {
    workload_ca::server::jwt_crypto::install();
    workload_ca::server::devissuer::DevIssuer::load(state)
        .unwrap()
        .mint(
            ns,
            sa,
            "istio-ca",
            Duration::from_secs(600),
            SystemTime::now(),
        )
        .unwrap()
}

/// A TLS gRPC channel to the CA at `addr`, verified against `root_pem` for
/// `localhost`, with an optional client certificate (chain PEM, key PEM).
pub async fn tls_channel(
    addr: std::net::SocketAddr,
    root_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem))
        .domain_name("localhost");
    if let Some((chain, key)) = identity {
        tls = tls.identity(Identity::from_pem(chain, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .connect()
        .await
}

/// A minimal HTTP/1.1 GET; returns (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return (status, dechunk(body));
    }
    (status, body.to_string())
}

/// Decodes an HTTP/1.1 chunked body (Envoy's admin API uses it).
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Calls CreateCertificate with an optional bearer token.
pub async fn request(
    client: &mut IstioCertificateServiceClient<Channel>,
    csr: &str,
    token: Option<&str>,
    ttl_secs: i64,
) -> Result<Vec<String>, tonic::Status> {
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr.to_owned(),
        validity_duration: ttl_secs,
        metadata: None,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    client
        .create_certificate(req)
        .await
        .map(|r| r.into_inner().cert_chain)
}

/// A fresh key and a CSR for it (no SAN unless `uri` is given).
pub fn key_and_csr(alg: KeyAlgorithm, uri: Option<&str>) -> (String, String) {
    let key = PrivateKey::generate(alg).unwrap();
    let pem = key.to_pem().to_string();
    let kp = rcgen::KeyPair::from_pem(&pem).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(u) = uri {
        params.subject_alt_names = vec![rcgen::SanType::URI(u.try_into().unwrap())];
    }
    (pem, params.serialize_request(&kp).unwrap().pem().unwrap())
}

pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/csr")
            .join(name),
    )
    .unwrap()
}

pub fn ders(pem_text: &str) -> Vec<Vec<u8>> {
    pem::parse_many(pem_text)
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents())
        .collect()
}

/// rustls-webpki path validation of `chain[0]` through `chain[1..n-1]` to the
/// roots in the last element, for both serverAuth and clientAuth, now.
pub fn webpki_verify(chain: &[String]) {
    assert!(chain.len() >= 2, "chain of {} elements", chain.len());
    assert!(
        chain.iter().all(|e| !e.contains('\r')),
        "PEM with LF line endings"
    );
    for (i, elem) in chain[..chain.len() - 1].iter().enumerate() {
        assert_eq!(
            ders(elem).len(),
            1,
            "cert_chain[{i}] must hold exactly one certificate"
        );
    }
    let leaf = CertificateDer::from(ders(&chain[0]).remove(0));
    let intermediates: Vec<CertificateDer<'static>> = chain[1..chain.len() - 1]
        .iter()
        .flat_map(|e| ders(e))
        .map(CertificateDer::from)
        .collect();
    let root_ders: Vec<CertificateDer<'static>> = ders(chain.last().unwrap())
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let anchors: Vec<_> = root_ders
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap())
        .collect();
    let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
    let now = UnixTime::since_unix_epoch(SystemTime::now().duration_since(UNIX_EPOCH).unwrap());
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            now,
            usage,
            None,
            None,
        )
        .expect("rustls-webpki validates the issued chain");
    }
}

/// `openssl verify -x509_strict` for both TLS purposes; a second, unrelated
/// implementation.
pub fn openssl_verify(chain: &[String]) {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let leaf = write("leaf.pem", &chain[0]);
    let roots = write("roots.pem", chain.last().unwrap());
    let untrusted = write("untrusted.pem", &chain[1..chain.len() - 1].concat());
    for purpose in ["sslserver", "sslclient"] {
        let mut cmd = Command::new("openssl");
        cmd.args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
            .arg(&roots);
        if chain.len() > 2 {
            cmd.arg("-untrusted").arg(&untrusted);
        }
        let out = cmd
            .arg(&leaf)
            .output()
            .expect("openssl is installed (.ci/run installs it)");
        assert!(
            out.status.success(),
            "openssl verify ({purpose}) failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Facts about an issued leaf, read with x509-parser.
#[derive(Debug)]
pub struct LeafFacts {
    pub uris: Vec<String>,
    pub dns: usize,
    pub is_ca: bool,
    pub ku_critical: bool,
    pub digital_signature: bool,
    pub key_encipherment: bool,
    pub key_cert_sign: bool,
    pub server_auth: bool,
    pub client_auth: bool,
    pub san_critical: bool,
    pub subject_empty: bool,
    pub has_aki: bool,
    pub serial_bits: u64,
    pub not_before: i64,
    pub not_after: i64,
    pub spki: Vec<u8>,
}

pub fn leaf_facts(pem_text: &str) -> LeafFacts {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::*;
    let der = ders(pem_text).remove(0);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let mut f = LeafFacts {
        uris: vec![],
        dns: 0,
        is_ca: false,
        ku_critical: false,
        digital_signature: false,
        key_encipherment: false,
        key_cert_sign: false,
        server_auth: false,
        client_auth: false,
        san_critical: false,
        subject_empty: cert.subject().iter().count() == 0,
        has_aki: false,
        serial_bits: cert.serial.bits(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        spki: cert.public_key().raw.to_vec(),
    };
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                f.san_critical = ext.critical;
                for n in &san.general_names {
                    match n {
                        GeneralName::URI(u) => f.uris.push((*u).to_string()),
                        GeneralName::DNSName(_) => f.dns += 1,
                        _ => {}
                    }
                }
            }
            ParsedExtension::BasicConstraints(bc) => f.is_ca = bc.ca,
            ParsedExtension::KeyUsage(ku) => {
                f.ku_critical = ext.critical;
                f.digital_signature = ku.digital_signature();
                f.key_encipherment = ku.key_encipherment();
                f.key_cert_sign = ku.key_cert_sign();
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                f.server_auth = eku.server_auth;
                f.client_auth = eku.client_auth;
            }
            ParsedExtension::AuthorityKeyIdentifier(_) => f.has_aki = true,
            _ => {}
        }
    }
    f
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A gRPC channel over a Unix socket (the agent's SDS socket).
pub async fn unix_channel(path: &Path) -> Channel {
    let path = path.to_owned();
    tonic::transport::Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

/// A fresh in-memory CA for `cluster.local` (P-256 root, one day).
pub fn authority() -> workload_ca::ca::Authority {
    let td = TrustDomain::new(TD).unwrap();
    let now = SystemTime::now();
    let files = workload_ca::ca::Authority::generate_root(
        &td,
        KeyAlgorithm::EcdsaP256,
        Duration::from_secs(86_400),
        now,
    )
    .unwrap();
    workload_ca::ca::Authority::from_files(&files, &td, now).unwrap()
}

/// Starts the real `ca` binary with `args` and `--state-dir state`, stdout piped.
pub fn spawn_ca(args: &[&str], state: &Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_ca"))
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Sends SIGTERM and asserts a clean exit (status 0) within 15 s.
pub fn stop_ca(mut child: std::process::Child) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status:?}");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ca did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An in-process agent's configuration against `ca`: one workload `web`
/// with its token at `dir/token` and its socket at `dir/web.sock`, default
/// policy and limits, no ops endpoint and no output directory. Tests
/// change the fields they are about.
pub fn agent_config(ca: &TestServer, dir: &Path) -> workload_ca::agent::AgentConfig {
    workload_ca::agent::AgentConfig {
        agent_name: "test".into(),
        ca: workload_ca::agent::client::CaEndpoint {
            address: ca.running.grpc_addr.to_string(),
            root_cert: ca.running.root_cert_path.clone(),
            server_name: "localhost".into(),
        },
        workloads: vec![workload_ca::agent::WorkloadConfig {
            peer: None,
            name: "web".into(),
            token_file: dir.join("token"),
            socket: dir.join("web.sock"),
            identity: None,
        }],
        policy: workload_ca::agent::workload::RotationPolicy::default(),
        ops_listen: None,
        output_dir: None,
        limits: workload_ca::limits::AgentLimits::default(),
    }
}
