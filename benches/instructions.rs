//! Per-operation instruction counts under callgrind, checked against the
//! counts kept in `benches/instructions.expected`.
//!
//! Run: `cargo bench --bench instructions` (needs `valgrind`; under a minute
//! after the build). `cargo bench --bench instructions -- --bless`
//! rewrites the expected counts; `-- --keep DIR` keeps the callgrind
//! outputs for `callgrind_annotate`; naming paths (`-- sign`) runs only those.
//!
//! Callgrind counts the instructions a program executes, which does not
//! depend on what else the machine is doing: unlike a time, a count can be
//! compared with a stored figure on a noisy machine. The bench re-executes
//! itself under `valgrind --tool=callgrind`, collecting only inside
//! `instr_measured_region` (`--collect-atstart=no --toggle-collect`), so key
//! generation and other set-up are never counted; every input (CA, keys,
//! CSR, token, certificates) is made once by the parent and read by the
//! children. Each path runs twice, `N1` and `N2` times, and the figure is
//! `(count(N2) - count(N1)) / ((N2 - N1) * units)`, which also removes the
//! first call's one-time costs (lazy statics, first allocations). What
//! remains random: ECDSA signatures and serial numbers (their DER length
//! varies by a byte or two), hash-map seeds, `tokio::select!`'s branch order.
//! Run to run, the figures moved by under 0.3% on the machine they were
//! blessed on, hence the 2% tolerance. They depend on the compiler, the
//! locked dependencies and valgrind's virtual CPU (under valgrind 3.19 ring
//! takes its P-256 code without ADX/BMI2): re-bless after upgrading any of
//! them, and say so in the commit.
//!
//! The figures, in instructions per operation:
//! - `sign`: one `CreateCertificate` handled in-process, without network:
//!   the request protobuf decoded, the `authorization` metadata built,
//!   `IstioCertificateService::create_certificate` on the server's own
//!   service (`server::inproc`): RS256 token verified by the server's JWT
//!   authenticator (a Kubernetes-shaped token from an RSA-2048 issuer key,
//!   JWKS with a kid), `check_pem_csr` (P-256 CSR), `AuthoritySet::sign_leaf`
//!   (P-256 CA), the issuance ledger, the "certificate issued" log line (a
//!   text subscriber at `info`, writing to a sink, as `ca server` logs by
//!   default), then the response protobuf encoded.
//! - `request`: the same call over the network, client included: a real
//!   server (`server::start`, plugged-in P-256 CA, the RSA issuer) on
//!   127.0.0.1 and a tonic TLS client on one connection, both on one
//!   current-thread runtime: TLS 1.3 records both ways, HTTP/2 and gRPC
//!   framing both ways, the client's protobuf work. The server's periodic
//!   tasks (ledger save every 5 s) fall into the window too: their share
//!   depends on how long the run takes, so this figure is the noisiest.
//! - `sds_push`: a renewed certificate pushed by the agent's SDS server
//!   (`agent::sds::serve` on a Unix socket) to each of `STREAMS` state-of-
//!   the-world streams subscribed to `default`, per stream: the watch firing,
//!   each stream's response built (Secret with chain and key encoded), gRPC
//!   and HTTP/2 framing, then the client's receipt (HTTP/2, protobuf decode
//!   of the DiscoveryResponse, the Secret left as bytes) and its ACK, which
//!   the agent parses and matches. Client and agent share one thread, so
//!   the client's half is in the figure.
// A benchmark: a panic is a failed run, not a fault of the CA.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost::Message as _;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use workload_ca::ca::{Authority, AuthoritySet, CaFiles, KeyAlgorithm, PrivateKey, TtlPolicy};
use workload_ca::identity::TrustDomain;
use workload_ca::proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use workload_ca::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use workload_ca::proto::istio::istio_certificate_service_server::IstioCertificateService;
use workload_ca::proto::istio::{IstioCertificateRequest, IstioCertificateResponse};
use workload_ca::server::jwt::{IssuerConfig, KeySource};

/// Relative difference from the expected count that fails the run.
const TOLERANCE: f64 = 0.02;
/// SDS streams subscribed during `sds_push`.
const STREAMS: usize = 8;
const TD: &str = "cluster.local";
const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "istio-ca";

/// A measured path: its name, the two iteration counts, and how many units
/// one iteration is (streams pushed to).
struct PathSpec {
    name: &'static str,
    n1: u64,
    n2: u64,
    units: u64,
}

const PATHS: &[PathSpec] = &[
    PathSpec {
        name: "sign",
        n1: 20,
        n2: 120,
        units: 1,
    },
    PathSpec {
        name: "request",
        n1: 20,
        n2: 120,
        units: 1,
    },
    PathSpec {
        name: "sds_push",
        n1: 10,
        n2: 60,
        units: STREAMS as u64,
    },
];

const CHILD_ENV: &str = "WORKLOAD_CA_INSTRUCTIONS_CHILD";

fn main() -> ExitCode {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(&spec);
        return ExitCode::SUCCESS;
    }
    parent()
}

/// The only function callgrind collects in (and everything it calls).
#[inline(never)]
fn instr_measured_region<R>(f: impl FnOnce() -> R) -> R {
    std::hint::black_box(f())
}

// ---------------------------------------------------------------- parent

fn parent() -> ExitCode {
    let mut bless = false;
    let mut keep: Option<PathBuf> = None;
    let mut only = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bless" => bless = true,
            "--keep" => keep = args.next().map(PathBuf::from),
            "--bench" => {}
            name if PATHS.iter().any(|p| p.name == name) => only.push(name.to_owned()),
            other => {
                eprintln!("unknown argument {other:?}: --bless, --keep DIR, or path names");
                return ExitCode::FAILURE;
            }
        }
    }
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("valgrind is not installed: this bench counts instructions under callgrind");
        return ExitCode::FAILURE;
    }
    let dir = tempfile::tempdir().unwrap();
    make_fixtures(dir.path());
    let exe = std::env::current_exe().unwrap();
    let expected_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/instructions.expected");
    let mut expected = read_expected(&expected_path);

    let mut failed = false;
    println!(
        "{:<10} {:>14} {:>14} {:>8}  (instructions per operation; tolerance {:.0}%)",
        "path",
        "measured",
        "expected",
        "diff",
        TOLERANCE * 100.0
    );
    for p in PATHS {
        if !only.is_empty() && !only.iter().any(|o| o == p.name) {
            continue;
        }
        let t1 = run_child(&exe, dir.path(), p.name, p.n1, keep.as_deref());
        let t2 = run_child(&exe, dir.path(), p.name, p.n2, keep.as_deref());
        let per_op = t2.saturating_sub(t1) / ((p.n2 - p.n1) * p.units);
        let (exp_text, diff_text) = match expected.iter().find(|(k, _)| k == p.name) {
            Some((_, e)) => {
                let diff = per_op as f64 / *e as f64 - 1.0;
                if diff.abs() > TOLERANCE && !bless {
                    failed = true;
                }
                (e.to_string(), format!("{:+.2}%", diff * 100.0))
            }
            None => {
                if !bless {
                    failed = true;
                }
                ("none".into(), "-".into())
            }
        };
        println!(
            "{:<10} {:>14} {:>14} {:>8}  (totals: {t1} at N={}, {t2} at N={}; {} per iteration)",
            p.name, per_op, exp_text, diff_text, p.n1, p.n2, p.units
        );
        expected.retain(|(k, _)| k != p.name);
        expected.push((p.name.to_owned(), per_op));
    }
    if bless {
        expected.sort_by_key(|(k, _)| PATHS.iter().position(|p| p.name == k));
        write_expected(&expected_path, &expected);
        println!("wrote {}", expected_path.display());
        return ExitCode::SUCCESS;
    }
    if failed {
        println!(
            "a count differs from {} by more than {:.0}%: above is a regression to find; \
             below (or missing) means the file is stale: rerun with `-- --bless` and commit it",
            expected_path.display(),
            TOLERANCE * 100.0
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Runs one path `n` times under callgrind; its total instruction count.
fn run_child(exe: &Path, dir: &Path, name: &str, n: u64, keep: Option<&Path>) -> u64 {
    let out = dir.join(format!("callgrind.{name}.{n}.out"));
    let status = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg("--collect-atstart=no")
        .arg("--toggle-collect=*instr_measured_region*")
        .arg("--quiet")
        .arg(exe)
        .env(CHILD_ENV, format!("{name}:{n}:{}", dir.display()))
        .status()
        .unwrap();
    assert!(status.success(), "{name} N={n} under callgrind: {status}");
    let text = std::fs::read_to_string(&out).unwrap();
    if let Some(k) = keep {
        std::fs::create_dir_all(k).unwrap();
        std::fs::copy(&out, k.join(out.file_name().unwrap())).unwrap();
    }
    // One file per process (threads are summed); "totals:" or "summary:".
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no totals in {}", out.display()))
}

fn read_expected(path: &Path) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            Some((k.trim().to_owned(), v.trim().replace('_', "").parse().ok()?))
        })
        .collect()
}

fn write_expected(path: &Path, counts: &[(String, u64)]) {
    let mut f = std::fs::File::create(path).unwrap();
    writeln!(
        f,
        "# Instructions per operation under callgrind: see benches/instructions.rs.\n\
         # Checked by `cargo bench --bench instructions`; rewritten by `-- --bless`."
    )
    .unwrap();
    for (k, v) in counts {
        writeln!(f, "{k} = {v}").unwrap();
    }
}

// -------------------------------------------------------------- fixtures

/// Everything random, made once: the CA, the issuer's RSA key and its JWKS,
/// a token, a CSR, and two workload certificates for the SDS pushes.
fn make_fixtures(dir: &Path) {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use rsa::pkcs8::DecodePublicKey as _;
    use rsa::traits::PublicKeyParts as _;
    workload_ca::server::jwt_crypto::install();
    let now = SystemTime::now();
    let td = TrustDomain::new(TD).unwrap();
    let files = Authority::generate_root(
        &td,
        KeyAlgorithm::EcdsaP256,
        Duration::from_secs(86_400 * 365),
        now,
    )
    .unwrap();
    let cacerts = dir.join("cacerts");
    std::fs::create_dir_all(&cacerts).unwrap();
    for (name, text) in [
        ("ca-cert.pem", files.ca_cert.as_str()),
        ("ca-key.pem", files.ca_key.as_str()),
        ("cert-chain.pem", files.cert_chain.as_str()),
        ("root-cert.pem", files.root_cert.as_str()),
    ] {
        std::fs::write(cacerts.join(name), text).unwrap();
    }

    // The service-account issuer: RSA-2048, RS256, published as a JWKS.
    let rsa_key = PrivateKey::generate(KeyAlgorithm::Rsa2048).unwrap();
    let public = rsa::RsaPublicKey::from_public_key_der(&rsa_key.spki_der()).unwrap();
    let kid = B64
        .encode(&ring::digest::digest(&ring::digest::SHA256, &rsa_key.spki_der()).as_ref()[..16]);
    let jwks = serde_json::json!({"keys": [{
        "use": "sig", "kty": "RSA", "alg": "RS256", "kid": kid,
        "n": B64.encode(public.n().to_bytes_be()), "e": B64.encode(public.e().to_bytes_be()),
    }]});
    let iat = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "aud": [AUDIENCE], "exp": iat + 3600, "iat": iat, "nbf": iat, "iss": ISSUER,
        "sub": "system:serviceaccount:prod:web",
        "kubernetes.io": {
            "namespace": "prod",
            "pod": {"name": "web-7d4b9c-x2x9q", "uid": "0b6f3c1e-5a43-4c6e-9d8e-2f0a7c9b1d11"},
            "serviceaccount": {"name": "web", "uid": "6a1c2f7e-3b8d-4e5f-a0c1-9d2e3f4a5b6c"},
        },
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid);
    let token = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(rsa_key.to_pem().as_bytes()).unwrap(),
    )
    .unwrap();

    let (_, csr) = key_and_csr();
    // Two certificates for the workload, pushed in turn.
    let authority = Authority::from_files(&files, &td, now).unwrap();
    let id =
        workload_ca::identity::SpiffeId::parse("spiffe://cluster.local/ns/prod/sa/web").unwrap();
    let mut certs = Vec::new();
    for _ in 0..2 {
        let (key, csr) = key_and_csr();
        let issued = authority
            .sign_leaf(
                &workload_ca::ca::check_pem_csr(&csr).unwrap(),
                &id,
                Duration::from_secs(3600),
                now,
            )
            .unwrap();
        certs.push(serde_json::json!({"key": key, "chain": issued.chain}));
    }
    let fixtures = serde_json::json!({
        "jwks": jwks.to_string(), "token": token, "csr": csr, "certs": certs,
    });
    std::fs::write(dir.join("fixtures.json"), fixtures.to_string()).unwrap();
}

/// A P-256 key (PEM) and a CSR for it, as Istio's agent sends.
fn key_and_csr() -> (String, String) {
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let kp = rcgen::KeyPair::from_pem(&key.to_pem()).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&kp).unwrap().pem().unwrap();
    (key.to_pem().to_string(), csr)
}

struct Fixtures {
    dir: PathBuf,
    value: serde_json::Value,
}

impl Fixtures {
    fn load(dir: &Path) -> Self {
        let text = std::fs::read_to_string(dir.join("fixtures.json")).unwrap();
        Self {
            dir: dir.to_owned(),
            value: serde_json::from_str(&text).unwrap(),
        }
    }

    fn str(&self, k: &str) -> &str {
        self.value[k].as_str().unwrap()
    }

    fn ca_files(&self) -> CaFiles {
        workload_ca::ca::CacertsDir::new(self.dir.join("cacerts"))
            .load()
            .unwrap()
            .unwrap()
    }

    fn issuers(&self) -> Vec<IssuerConfig> {
        vec![IssuerConfig {
            issuer: ISSUER.into(),
            keys: KeySource::Static(vec![self.str("jwks").to_owned()]),
        }]
    }

    fn request_bytes(&self) -> Vec<u8> {
        IstioCertificateRequest {
            csr: self.str("csr").to_owned(),
            validity_duration: 3600,
            metadata: None,
        }
        .encode_to_vec()
    }

    fn bearer(&self) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
        format!("Bearer {}", self.str("token")).parse().unwrap()
    }
}

// ----------------------------------------------------------------- child

fn child(spec: &str) {
    let mut parts = spec.splitn(3, ':');
    let (name, n, dir) = (
        parts.next().unwrap(),
        parts.next().unwrap().parse::<u64>().unwrap(),
        PathBuf::from(parts.next().unwrap()),
    );
    workload_ca::server::jwt_crypto::install();
    // What `ca server` logs with by default: text, `info`.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(std::io::sink)
        .init();
    let fixtures = Fixtures::load(&dir);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match name {
        "sign" => sign(&rt, &fixtures, n),
        "request" => request(&rt, &fixtures, n),
        "sds_push" => sds_push(&rt, &fixtures, n),
        other => panic!("unknown path {other}"),
    }
}

fn sign(rt: &Runtime, fx: &Fixtures, n: u64) {
    let now = SystemTime::now();
    let td = TrustDomain::new(TD).unwrap();
    let set = AuthoritySet::single_since(
        Authority::from_files(&fx.ca_files(), &td, now).unwrap(),
        now,
    )
    .unwrap();
    let service = rt
        .block_on(workload_ca::server::inproc::certificate_service(
            set,
            fx.issuers(),
            vec![AUDIENCE.into()],
            TtlPolicy::default(),
            now,
        ))
        .unwrap();
    let body = fx.request_bytes();
    let bearer = fx.bearer();
    instr_measured_region(|| {
        rt.block_on(async {
            for _ in 0..n {
                let req = IstioCertificateRequest::decode(body.as_slice()).unwrap();
                let mut req = tonic::Request::new(req);
                req.metadata_mut().insert("authorization", bearer.clone());
                let resp = service.create_certificate(req).await.unwrap();
                let out = resp.into_inner().encode_to_vec();
                assert!(out.len() > 500);
                std::hint::black_box(out);
            }
        })
    });
}

fn request(rt: &Runtime, fx: &Fixtures, n: u64) {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
    use workload_ca::proto::istio::istio_certificate_service_client::IstioCertificateServiceClient;
    use workload_ca::server::tls::ServingSpec;
    use workload_ca::server::{CaSource, ServerConfig};
    let state = tempfile::tempdir_in(&fx.dir).unwrap();
    let config = ServerConfig {
        state_dir: state.path().join("state"),
        trust_domain: TrustDomain::new(TD).unwrap(),
        ca: CaSource::PluggedIn(fx.dir.join("cacerts")),
        listen: "127.0.0.1:0".parse().unwrap(),
        ops_listen: None,
        serving: ServingSpec {
            dns_names: vec!["localhost".into()],
            ips: vec![],
            ttl: Duration::from_secs(3600),
        },
        ttl: TtlPolicy::default(),
        jwt_issuers: fx.issuers(),
        jwt_audiences: vec![AUDIENCE.into()],
        dev_issuer: false,
        jwks_refresh: Duration::from_secs(3600),
        drain_timeout: Duration::from_secs(1),
        max_token_lifetime: workload_ca::server::jwt::DEFAULT_MAX_TOKEN_LIFETIME,
        limits: workload_ca::limits::ServerLimits::default(),
        admin_socket: None,
        auto_rotate: None,
        auto_rotate_interval: workload_ca::server::AUTO_ROTATION_INTERVAL,
        reissue_rate: 50,
    };
    let csr = fx.str("csr").to_owned();
    let bearer = fx.bearer();
    let (running, mut client) = rt.block_on(async {
        let running = workload_ca::server::start(config).await.unwrap();
        let root = std::fs::read_to_string(&running.root_cert_path).unwrap();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root))
            .domain_name("localhost");
        let channel = Channel::from_shared(format!("https://{}", running.grpc_addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        (running, IstioCertificateServiceClient::new(channel))
    });
    instr_measured_region(|| {
        rt.block_on(async {
            for _ in 0..n {
                let mut req = tonic::Request::new(IstioCertificateRequest {
                    csr: csr.clone(),
                    validity_duration: 3600,
                    metadata: None,
                });
                req.metadata_mut().insert("authorization", bearer.clone());
                let resp: IstioCertificateResponse =
                    client.create_certificate(req).await.unwrap().into_inner();
                assert_eq!(resp.cert_chain.len(), 2);
                std::hint::black_box(resp);
            }
        })
    });
    rt.block_on(async {
        drop(client);
        running.shutdown().await.unwrap();
    });
}

/// One SDS stream as Envoy holds it, subscribed to `default`.
struct Stream {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
}

impl Stream {
    async fn ack(&self, r: &DiscoveryResponse) {
        self.tx
            .send(DiscoveryRequest {
                version_info: r.version_info.clone(),
                resource_names: vec!["default".into()],
                type_url: workload_ca::agent::sds::SECRET_TYPE_URL.into(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

fn sds_push(rt: &Runtime, fx: &Fixtures, n: u64) {
    use workload_ca::agent::metrics::AgentMetrics;
    use workload_ca::agent::sds::{Sds, serve};
    use workload_ca::agent::workload::{CertWatch, accept_chain};
    let now = SystemTime::now();
    let certs: Vec<_> = fx.value["certs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let key = PrivateKey::from_pem(c["key"].as_str().unwrap()).unwrap();
            let chain: Vec<String> = serde_json::from_value(c["chain"].clone()).unwrap();
            rt.block_on(async { accept_chain(&key, &chain, now).unwrap() })
        })
        .collect();
    let roots = certs[0].1.clone();
    let certs: Vec<Arc<_>> = certs.into_iter().map(|(c, _)| Arc::new(c)).collect();
    let (cert_tx, cert) = watch::channel(Some(certs[0].clone()));
    let (_roots_tx, roots) = watch::channel(Some(Arc::new(roots)));
    let metrics = Arc::new(AgentMetrics::new().unwrap());
    let (stop_tx, stop) = watch::channel(false);
    let socket = fx.dir.join(format!("sds-{n}.sock"));
    let (served, mut streams) = rt.block_on(async {
        let served = serve(
            &socket,
            Sds::new(CertWatch { cert, roots }, metrics.clone()),
            stop,
        )
        .unwrap();
        let path = socket.clone();
        let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")
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
            .unwrap();
        let mut streams = Vec::new();
        for _ in 0..STREAMS {
            let mut client = SecretDiscoveryServiceClient::new(channel.clone());
            let (tx, rx) = mpsc::channel(4);
            tx.send(DiscoveryRequest {
                resource_names: vec!["default".into()],
                type_url: workload_ca::agent::sds::SECRET_TYPE_URL.into(),
                ..Default::default()
            })
            .await
            .unwrap();
            let rx = client
                .stream_secrets(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let mut s = Stream { tx, rx };
            let first = s.rx.message().await.unwrap().unwrap();
            s.ack(&first).await;
            streams.push(s);
        }
        (served, streams)
    });
    let acks = &metrics.sds_ack_latency;
    instr_measured_region(|| {
        rt.block_on(async {
            for i in 0..n {
                let target = acks.get_sample_count() + STREAMS as u64;
                cert_tx.send_replace(Some(certs[(i as usize + 1) % 2].clone()));
                for s in &mut streams {
                    let r = s.rx.message().await.unwrap().unwrap();
                    assert_eq!(r.resources.len(), 1);
                    s.ack(&r).await;
                }
                // Every ACK matched before the next push, so no push races
                // an ACK.
                while acks.get_sample_count() < target {
                    tokio::task::yield_now().await;
                }
            }
        })
    });
    rt.block_on(async {
        stop_tx.send_replace(true);
        drop(streams);
        let _ = served.task.await;
    });
}
