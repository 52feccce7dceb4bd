//! cfssl side by side: the API CA server many users reach for (Debian's
//! golang-cfssl, `cfssl serve`) against ours, in one run on this machine,
//! with the same CA key type and the same number of requests in flight.
//!
//! Run: `cargo bench --bench cfssl` (options after `--`, see [`Opts`]), e.g.
//! `cargo bench --bench cfssl -- --duration 30 --concurrency 64 --connections 8`.
//!
//! - cfssl: a CA made with openssl, a signing profile of a SPIFFE-like leaf
//!   (1 h, digital signature + key encipherment, server + client auth), and
//!   `cfssl serve` as a child. Load: `POST /api/v1/cfssl/sign`
//!   `{"certificate_request": "<PEM>"}` over plain HTTP/1.1 keep-alive
//!   connections, no authentication. HTTP/1.1 carries one request at a time
//!   per connection, so C requests in flight take C connections. Every
//!   answer must be a 200 with `"success":true` and a certificate; a sample
//!   is checked with `openssl verify` against the CA and for the CSR's key.
//!   cfssl's CPU comes from /proc/<pid>/stat over the measured window.
//! - ours: `ca bench warm --json` (CreateCertificate over h2 + TLS with a
//!   service-account token per request, C streams over K connections),
//!   whose JSON gives the same figures.
//!
//! Then the two side by side, and the ratios against issue 10's targets:
//! at least 1.7x cfssl's rate, p99 at most a tenth of cfssl's. A short sweep
//! of cfssl over other concurrencies shows whether its rate is limited by
//! concurrency or by CPU.
//!
//! Client and servers share the machine's cores; the client runs on one
//! thread and its CPU per certificate is reported for both sides.
// A benchmark: a panic is a failed run, not a fault of the CA.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use load::{Figures, load_cfssl};

#[path = "cfssl/load.rs"]
mod load;

/// Command-line options (after `cargo bench --bench cfssl --`).
struct Opts {
    /// Measured seconds of each run (`--duration`, default 30).
    duration: Duration,
    /// Unmeasured seconds before it (`--warmup`, default 2).
    warmup: Duration,
    /// Requests in flight (`--concurrency`, default 64).
    concurrency: usize,
    /// Our side's h2 connections (`--connections`, default 8).
    connections: usize,
    /// Distinct CSRs (and identities on our side) (`--identities`, 1000).
    identities: usize,
    /// CA key: `ecdsa-p256` (default) or `rsa-2048` (`--ca-key`).
    ca_key: String,
    /// cfssl's other concurrencies (`--sweep 1,8,16,128`; `--sweep ''` none).
    sweep: Vec<usize>,
    /// Measured seconds of each sweep point (`--sweep-duration`, default 5).
    sweep_duration: Duration,
    /// cfssl's `-loglevel` (`--cfssl-loglevel`; default: cfssl's own, 1 =
    /// info, three lines per signature, as ours writes its audit line).
    cfssl_loglevel: Option<u8>,
    /// Skip our side (`--cfssl-only`).
    cfssl_only: bool,
}

impl Opts {
    fn parse() -> Self {
        let mut o = Opts {
            duration: Duration::from_secs(30),
            warmup: Duration::from_secs(2),
            concurrency: 64,
            connections: 8,
            identities: 1000,
            ca_key: "ecdsa-p256".into(),
            sweep: vec![1, 8, 16, 128],
            sweep_duration: Duration::from_secs(5),
            cfssl_loglevel: None,
            cfssl_only: false,
        };
        let mut args = std::env::args().skip(1);
        let secs = |v: String| Duration::from_secs_f64(v.trim_end_matches('s').parse().unwrap());
        while let Some(a) = args.next() {
            let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
            match a.as_str() {
                "--bench" => {}
                "--duration" => o.duration = secs(val()),
                "--warmup" => o.warmup = secs(val()),
                "--concurrency" => o.concurrency = val().parse().unwrap(),
                "--connections" => o.connections = val().parse().unwrap(),
                "--identities" => o.identities = val().parse().unwrap(),
                "--ca-key" => o.ca_key = val(),
                "--sweep" => {
                    o.sweep = val()
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(|s| s.parse().unwrap())
                        .collect()
                }
                "--sweep-duration" => o.sweep_duration = secs(val()),
                "--cfssl-loglevel" => o.cfssl_loglevel = Some(val().parse().unwrap()),
                "--cfssl-only" => o.cfssl_only = true,
                other => panic!("unknown option {other:?}"),
            }
        }
        assert!(
            matches!(o.ca_key.as_str(), "ecdsa-p256" | "rsa-2048"),
            "--ca-key ecdsa-p256|rsa-2048"
        );
        assert!(o.concurrency > 0 && o.identities > 0);
        o
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Installs cfssl from Debian's golang-cfssl when it is missing (as
/// `.ci/test` does).
fn ensure_cfssl() {
    let found = Command::new("cfssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return;
    }
    eprintln!("cfssl missing: apt-get install -y golang-cfssl");
    let ok = Command::new("sh")
        .args([
            "-c",
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -qq golang-cfssl >/dev/null",
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "could not install cfssl (Debian package golang-cfssl)");
}

/// A CA key and self-signed root made with openssl, and cfssl's signing
/// configuration of a SPIFFE-like leaf.
fn make_ca(dir: &Path, ca_key: &str) -> (PathBuf, PathBuf, PathBuf) {
    let key = dir.join("ca-key.pem");
    let cert = dir.join("ca.pem");
    let config = dir.join("config.json");
    if ca_key == "rsa-2048" {
        run(Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048"));
    } else {
        run(Command::new("openssl")
            .args([
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
            ])
            .arg(&key));
    }
    run(Command::new("openssl")
        .args(["req", "-x509", "-new", "-sha256", "-key"])
        .arg(&key)
        .args(["-subj", "/O=cfssl-bench/CN=cfssl-bench root", "-days", "2"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .arg("-out")
        .arg(&cert));
    std::fs::write(&config, CFSSL_CONFIG).unwrap();
    (key, cert, config)
}

/// cfssl's signing profile: what an X.509-SVID leaf carries (RFC-style
/// names of cfssl's usages), valid one hour.
const CFSSL_CONFIG: &str = r#"{
  "signing": {
    "default": {
      "expiry": "1h",
      "usages": ["digital signature", "key encipherment", "server auth", "client auth"]
    }
  }
}
"#;

/// A running `cfssl serve`, killed on drop.
struct Cfssl {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Cfssl {
    fn start(dir: &Path, ca: &(PathBuf, PathBuf, PathBuf), loglevel: Option<u8>) -> Self {
        // A free port: cfssl takes a port number, not port 0.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.join("cfssl.log");
        let mut cmd = Command::new("cfssl");
        cmd.args(["serve", "-address", "127.0.0.1", "-port", &port.to_string()])
            .arg("-ca")
            .arg(&ca.1)
            .arg("-ca-key")
            .arg(&ca.0)
            .arg("-config")
            .arg(&ca.2);
        if let Some(level) = loglevel {
            cmd.args(["-loglevel", &level.to_string()]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("cfssl.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut cfssl = Cfssl {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(cfssl.addr).is_err() {
            if let Ok(Some(status)) = cfssl.child.try_wait() {
                panic!("cfssl serve exited ({status}): {}", cfssl.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "cfssl serve did not listen: {}",
                cfssl.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        cfssl
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Cfssl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` P-256 CSRs, each with a SPIFFE ID as its URI SAN and a subject, and the JSON body
/// of each sign request, encoded once before the clock starts.
fn make_csrs(n: usize) -> (Vec<String>, Vec<Bytes>) {
    let mut pems = Vec::with_capacity(n);
    let mut bodies = Vec::with_capacity(n);
    for i in 0..n {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        // cfssl 1.2.0 drops URI SANs: without a subject its certificate
        // would name nothing (an empty subject and no SAN, which strict
        // verifiers reject). Ours names the identity in the URI SAN only.
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "cluster.local");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("bench/sa-{i}"));
        let uri = format!("spiffe://cluster.local/ns/bench/sa/sa-{i}");
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.as_str().try_into().unwrap())];
        let pem = params.serialize_request(&kp).unwrap().pem().unwrap();
        let body = serde_json::to_vec(&serde_json::json!({ "certificate_request": pem })).unwrap();
        pems.push(pem);
        bodies.push(Bytes::from(body));
    }
    (pems, bodies)
}

/// Checks sampled answers: each certificate verifies against the CA with
/// openssl and carries the public key of the CSR it answers. Returns the
/// first certificate's text.
fn check_samples(
    dir: &Path,
    ca_cert: &Path,
    pems: &[String],
    samples: &[(usize, Bytes)],
) -> String {
    assert!(!samples.is_empty());
    let mut first = String::new();
    for (n, (idx, body)) in samples.iter().take(8).enumerate() {
        let json: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(json["success"], true, "{json}");
        let cert = json["result"]["certificate"].as_str().unwrap();
        let cert_path = dir.join(format!("sample-{n}.pem"));
        let csr_path = dir.join(format!("sample-{n}.csr"));
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&csr_path, &pems[*idx]).unwrap();
        let verified = run(Command::new("openssl")
            .args(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"])
            .arg(ca_cert)
            .arg(&cert_path));
        assert!(verified.trim().ends_with(": OK"), "{verified}");
        let cert_key = run(Command::new("openssl")
            .args(["x509", "-noout", "-pubkey", "-in"])
            .arg(&cert_path));
        let csr_key = run(Command::new("openssl")
            .args(["req", "-noout", "-pubkey", "-in"])
            .arg(&csr_path));
        assert_eq!(
            cert_key, csr_key,
            "certificate {n} is not for its CSR's key"
        );
        if n == 0 {
            first = run(Command::new("openssl")
                .args([
                    "x509",
                    "-noout",
                    "-text",
                    "-certopt",
                    "no_pubkey,no_sigdump",
                    "-in",
                ])
                .arg(&cert_path));
        }
    }
    first
}

/// Our side: `ca bench warm --json`, or `None` when this build has no
/// `ca bench` yet.
fn load_ours(o: &Opts) -> Option<Figures> {
    let ca = env!("CARGO_BIN_EXE_ca");
    let has_bench = Command::new(ca)
        .args(["bench", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_bench {
        println!("ours: skipped: this build of `ca` has no `bench` command yet");
        return None;
    }
    let mut cmd = Command::new(ca);
    cmd.args(["bench", "warm", "--json"])
        .args(["--concurrency", &o.concurrency.to_string()])
        .args(["--connections", &o.connections.to_string()])
        .args(["--identities", &o.identities.to_string()])
        .args(["--duration", &format!("{}s", o.duration.as_secs_f64())])
        .args(["--warmup", &format!("{}s", o.warmup.as_secs_f64())])
        .args(["--ca-key", &o.ca_key])
        .stderr(Stdio::inherit());
    println!("ours: {cmd:?}");
    let out = run(&mut cmd);
    let j: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("`ca bench warm --json` printed no JSON ({e}): {out}"));
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let lat = &j["latency_ms"];
    let server = &j["server"];
    Some(Figures {
        ok: j["ok"].as_u64().unwrap_or(0),
        errors: j["errors"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default(),
        seconds: f(&j["seconds"]),
        certs_per_sec: f(&j["certs_per_sec"]),
        latency_ms: [
            f(&lat["p50"]),
            f(&lat["p90"]),
            f(&lat["p99"]),
            f(&lat["max"]),
        ],
        server_cpu_us: f(&server["cpu_us_per_cert"]),
        client_cpu_us: f(&j["client_cpu_us_per_cert"]),
        server_peak_rss: server["peak_rss_bytes"].as_u64().unwrap_or(0),
    })
}

fn errors_text(e: &BTreeMap<String, u64>) -> String {
    if e.is_empty() {
        return "0".into();
    }
    e.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn one_line(name: &str, c: usize, f: &Figures) -> String {
    format!(
        "{name}: C={c}: {:.0} certs/s ({} in {:.1}s), p50 {:.1} / p90 {:.1} / p99 {:.1} / max {:.1} ms, \
         server CPU {:.0} us/cert, client CPU {:.0} us/cert, errors {}",
        f.certs_per_sec,
        f.ok,
        f.seconds,
        f.latency_ms[0],
        f.latency_ms[1],
        f.latency_ms[2],
        f.latency_ms[3],
        f.server_cpu_us,
        f.client_cpu_us,
        errors_text(&f.errors)
    )
}

/// A table row: label, figure, decimals.
type Row = (&'static str, fn(&Figures) -> f64, usize);

fn table(o: &Opts, cfssl: &Figures, ours: Option<&Figures>) {
    let text = |k: &str, a: String, b: String| (k.to_string(), a, b);
    let mut rows = vec![
        text(
            "request",
            "POST /api/v1/cfssl/sign".into(),
            "CreateCertificate".into(),
        ),
        text(
            "transport",
            "HTTP/1.1, no auth".into(),
            "h2 + TLS, bearer token".into(),
        ),
        text(
            "in flight / connections",
            format!("{} / {}", o.concurrency, o.concurrency),
            format!("{} / {}", o.concurrency, o.connections),
        ),
    ];
    let figures: [Row; 8] = [
        ("certs/s", |f| f.certs_per_sec, 0),
        ("latency p50 ms", |f| f.latency_ms[0], 2),
        ("latency p90 ms", |f| f.latency_ms[1], 2),
        ("latency p99 ms", |f| f.latency_ms[2], 2),
        ("latency max ms", |f| f.latency_ms[3], 2),
        ("server CPU us/cert", |f| f.server_cpu_us, 0),
        ("client CPU us/cert", |f| f.client_cpu_us, 0),
        (
            "server peak RSS MiB",
            |f| f.server_peak_rss as f64 / 1048576.0,
            1,
        ),
    ];
    for (k, get, d) in figures {
        let b = ours.map_or("-".into(), |u| format!("{:.d$}", get(u)));
        rows.push(text(k, format!("{:.d$}", get(cfssl)), b));
    }
    let count = |f: &Figures| format!("{} / {}", f.ok, errors_text(&f.errors));
    rows.push(text(
        "certificates / errors",
        count(cfssl),
        ours.map_or("-".into(), count),
    ));
    println!();
    println!(
        "{:<24} {:<26} {:<26}",
        format!("CA key {}", o.ca_key),
        "cfssl 1.2.0 serve",
        "workload-ca server"
    );
    for (k, a, b) in rows {
        println!("{k:<24} {a:<26} {b:<26}");
    }
    if let Some(u) = ours {
        let rate = u.certs_per_sec / cfssl.certs_per_sec;
        let p99 = u.latency_ms[2] / cfssl.latency_ms[2];
        let cpu = u.server_cpu_us / cfssl.server_cpu_us;
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        println!();
        println!(
            "rate  ours / cfssl = {rate:.2}x   (target >= 1.7x: {})",
            verdict(rate >= 1.7)
        );
        println!(
            "p99   ours / cfssl = {p99:.3}    (target <= 0.100: {})",
            verdict(p99 <= 0.1)
        );
        println!("server CPU per certificate ours / cfssl = {cpu:.2}");
        // Both runs are CPU-bound on the same cores, client included: on an
        // otherwise idle machine the rates follow the CPU per certificate.
        // Other load on the machine moves the measured rates (and tails) far
        // more than it moves CPU per certificate.
        let projected =
            (cfssl.server_cpu_us + cfssl.client_cpu_us) / (u.server_cpu_us + u.client_cpu_us);
        println!(
            "rate ratio the CPU per certificate implies (server + client, cores saturated) = {projected:.2}x"
        );
    }
}

fn main() {
    let o = Opts::parse();
    ensure_cfssl();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path(), &o.ca_key);
    let (pems, bodies) = make_csrs(o.identities);
    let bodies = Arc::new(bodies);
    println!(
        "{}; load average before: {}; CA key {}; {} CSRs (P-256, SPIFFE URI SAN); {}s warm-up + {}s measured",
        run(Command::new("cfssl").arg("version"))
            .trim()
            .replace('\n', ", "),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim(),
        o.ca_key,
        o.identities,
        o.warmup.as_secs_f64(),
        o.duration.as_secs_f64()
    );

    let cfssl_fig = {
        let cfssl = Cfssl::start(dir.path(), &ca, o.cfssl_loglevel);
        let (fig, samples) = rt.block_on(load_cfssl(
            cfssl.addr,
            cfssl.pid(),
            &bodies,
            o.concurrency,
            o.warmup,
            o.duration,
        ));
        assert!(
            fig.ok > 0,
            "no certificate from cfssl: {}",
            cfssl.log_text()
        );
        let text = check_samples(dir.path(), &ca.1, &pems, &samples);
        println!(
            "cfssl: {} sampled certificates verified with openssl (CA chain, CSR key); the first:",
            samples.len().min(8)
        );
        for line in text.lines().filter(|l| {
            [
                "Subject:",
                "Not Before",
                "Not After",
                "X509v3",
                "Digital",
                "TLS Web",
                "CA:",
                "URI:",
            ]
            .iter()
            .any(|k| l.contains(k))
        }) {
            println!("    {}", line.trim());
        }
        println!("{}", one_line("cfssl", o.concurrency, &fig));
        for &c in &o.sweep {
            let (f, _) = rt.block_on(load_cfssl(
                cfssl.addr,
                cfssl.pid(),
                &bodies,
                c,
                Duration::from_secs(1),
                o.sweep_duration,
            ));
            println!("{}", one_line("cfssl sweep", c, &f));
        }
        // What cfssl complained of while serving (not its start-up notes).
        let log = cfssl.log_text();
        let noisy: Vec<&str> = log
            .lines()
            .skip_while(|l| !l.contains("Now listening"))
            .filter(|l| l.contains("[ERROR]") || l.contains("[WARNING]"))
            .take(5)
            .collect();
        if !noisy.is_empty() {
            println!("cfssl log, first warnings/errors:");
            for l in noisy {
                println!("    {l}");
            }
        }
        fig
    };

    let ours = if o.cfssl_only { None } else { load_ours(&o) };
    if let Some(u) = &ours {
        println!("{}", one_line("ours", o.concurrency, u));
    }
    table(&o, &cfssl_fig, ours.as_ref());
    println!(
        "load average after: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}
