//! Faults of the CA process, seen from its clients and from real `ca agent`
//! processes (issue 11):
//!
//! - the CA killed (`kill -9`) under load and restarted on the same state
//!   directory and port: every call ends, with a certificate or an error,
//!   within a bound; the agents serve a valid certificate over SDS the
//!   whole time and take a new one from the restarted CA by themselves;
//! - the CA away for longer than a certificate's lifetime: the agent says
//!   so (an error log naming the CA and the time left, metrics, `/readyz`
//!   false *before* expiry), serves nothing expired, and recovers when the
//!   CA returns.
//!
//! Every certificate seen, from the CA or over SDS, is checked by
//! rustls-webpki against the CA's root file, at the moment it was asked for.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::procs::{AgentProc, metric_at};
use common::sds::served;
use common::{ders, dev_token, http_get, key_and_csr, request, tls_channel};
use rustls_pki_types::{CertificateDer, UnixTime};
use workload_ca::ca::{CLOCK_SKEW_BACKDATE, KeyAlgorithm};
use x509_parser::prelude::FromDer;

/// A `ca server --dev` on a state directory, on a port it keeps across
/// restarts.
struct Ca {
    child: Child,
    grpc: SocketAddr,
    state: PathBuf,
}

impl Ca {
    /// Starts the CA on `state`, listening on `listen` (`127.0.0.1:0` the
    /// first time, the port it had on a restart).
    fn start(state: &Path, listen: &str) -> Self {
        use std::io::{BufRead, BufReader};
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state.with_extension("log"))
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ca"))
            .args(["server", "--dev", "--listen", listen, "--ops-listen", "off"])
            .arg("--state-dir")
            .arg(state)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut grpc = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(rest) = line.trim().strip_prefix("gRPC (TLS)") {
                let addr = rest.trim_start_matches([' ', ':']);
                grpc = addr.split_whitespace().next().map(|a| a.parse().unwrap());
            }
            if line.trim().starts_with("auth ") {
                break;
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
        let grpc = grpc.unwrap_or_else(|| {
            panic!(
                "the CA did not start on {listen}:\n{}",
                std::fs::read_to_string(state.with_extension("log")).unwrap_or_default()
            )
        });
        Self {
            child,
            grpc,
            state: state.to_owned(),
        }
    }

    fn root_pem(&self) -> String {
        std::fs::read_to_string(self.state.join("root-cert.pem")).unwrap()
    }

    /// `kill -9`, and wait for it.
    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Ca {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// What a served or issued leaf says about itself.
#[derive(Clone, Debug)]
struct Leaf {
    serial: String,
    /// When the CA signed it (NotBefore plus the CA's backdating), Unix s.
    issued: i64,
    not_after: i64,
}

/// rustls-webpki path validation of `chain[0]` through the middle elements
/// to the CA's own root, at Unix time `at` (fractional seconds are
/// rounded up: the check is never more lenient than `at`).
fn verify_at(chain: &[String], root_pem: &str, at: f64) -> Result<Leaf, String> {
    let leaf_der = ders(chain.first().ok_or("empty chain")?).remove(0);
    let middle: Vec<CertificateDer<'static>> = chain[1..chain.len() - 1]
        .iter()
        .flat_map(|e| ders(e))
        .map(CertificateDer::from)
        .collect();
    let roots: Vec<CertificateDer<'static>> = ders(root_pem)
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap())
        .collect();
    let leaf = CertificateDer::from(leaf_der.clone());
    let ee = webpki::EndEntityCert::try_from(&leaf).map_err(|e| e.to_string())?;
    let time = UnixTime::since_unix_epoch(Duration::from_secs(at.ceil() as u64));
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &middle,
        time,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| format!("{e:?}"))?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&leaf_der).unwrap();
    Ok(Leaf {
        serial: cert.raw_serial_as_string().replace(':', ""),
        issued: cert.validity().not_before.timestamp() + CLOCK_SKEW_BACKDATE.as_secs() as i64,
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// One look at an agent: what its SDS socket served and what `/readyz`
/// said, both asked at `at` (Unix s).
#[derive(Debug)]
struct Sample {
    at: f64,
    served: Result<Leaf, String>,
    ready: u16,
}

/// Samples `socket` (and the agent's `/readyz` at `ops`) every `every`
/// until `stop`: each served certificate must verify against `root_pem` at
/// the time it was asked for, else the test fails at once.
fn sampler(
    socket: PathBuf,
    ops: SocketAddr,
    root_pem: String,
    every: Duration,
    wait: Duration,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    tokio::spawn(async move {
        let mut samples = Vec::new();
        // Bounded: at most 2,000 samples (the tests stop well before).
        while !stop.load(Ordering::SeqCst) && samples.len() < 2000 {
            let at = unix_now();
            let ready = http_get(ops, "/readyz").await.0;
            let served = match served(&socket, wait).await {
                Ok(s) => Ok(verify_at(&s.chain, &root_pem, at).unwrap_or_else(|e| {
                    panic!(
                        "{} served a certificate invalid at {at}: {e}",
                        socket.display()
                    )
                })),
                Err(e) => Err(e),
            };
            samples.push(Sample { at, served, ready });
            tokio::time::sleep(every).await;
        }
        samples
    })
}

/// How one CreateCertificate call ended.
#[derive(Debug)]
struct Call {
    started: f64,
    took: Duration,
    outcome: Result<String, tonic::Code>,
}

/// A client calling CreateCertificate in a loop (a fresh key each time)
/// until `stop`, at most 5,000 times; each call bounded by a deadline.
fn caller(
    addr: SocketAddr,
    root_pem: String,
    token: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Call>> {
    tokio::spawn(async move {
        // One channel for the whole run: it reconnects by itself.
        let channel = tls_channel(addr, &root_pem, None).await.unwrap();
        let mut client =
            workload_ca::proto::istio::istio_certificate_service_client::IstioCertificateServiceClient::new(
                channel,
            );
        let mut calls = Vec::new();
        while !stop.load(Ordering::SeqCst) && calls.len() < 5000 {
            let (_key, csr) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
            let started = unix_now();
            let t = Instant::now();
            let r =
                tokio::time::timeout(CLIENT_DEADLINE, request(&mut client, &csr, Some(&token), 0))
                    .await
                    .unwrap_or_else(|_| {
                        panic!("a call hung past the client deadline {CLIENT_DEADLINE:?}")
                    });
            let took = t.elapsed();
            let outcome = match r {
                Ok(chain) => Ok(verify_at(&chain, &root_pem, started)
                    .unwrap_or_else(|e| panic!("an issued certificate does not verify: {e}"))
                    .serial),
                Err(s) => Err(s.code()),
            };
            calls.push(Call {
                started,
                took,
                outcome,
            });
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        calls
    })
}

/// Every call must end within this (the CA restarts in well under it).
const CALL_BOUND: Duration = Duration::from_secs(10);
/// The callers' own deadline: reaching it means a call hung.
const CLIENT_DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_killed_under_load_and_restarted_loses_no_caller_and_no_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let ca = Ca::start(&state, "127.0.0.1:0");
    let addr = ca.grpc;
    let root = ca.root_pem();

    // Two agents renewing every ~2 s (a tenth of a 20 s lifetime, so an
    // outage of several seconds stays far from expiry and from the
    // readiness margin), one of them for two workloads.
    let args = [
        "--cert-ttl",
        "20s",
        "--rotation-fraction",
        "0.1",
        "--retry-max-delay",
        "1s",
    ];
    let mut a = AgentProc::start(
        addr,
        &root,
        &[
            ("web", dev_token(&state, "prod", "web")),
            ("db", dev_token(&state, "prod", "db")),
        ],
        &args,
    );
    let mut b = AgentProc::start(
        addr,
        &root,
        &[("api", dev_token(&state, "prod", "api"))],
        &args,
    );
    a.wait_ready().await;
    b.wait_ready().await;

    let stop = Arc::new(AtomicBool::new(false));
    let samplers: Vec<_> = [(&a, "web"), (&a, "db"), (&b, "api")]
        .into_iter()
        .map(|(agent, w)| {
            sampler(
                agent.socket(w),
                agent.ops,
                root.clone(),
                Duration::from_millis(100),
                Duration::from_secs(3),
                stop.clone(),
            )
        })
        .collect();
    let callers: Vec<_> = (0..4)
        .map(|_| {
            caller(
                addr,
                root.clone(),
                dev_token(&state, "prod", "load"),
                stop.clone(),
            )
        })
        .collect();

    // Steady state, with renewals, then the kill.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed = unix_now();
    ca.kill9();
    // Away longer than the longest renewal period (2.2 s): every workload
    // asks, and fails, at least once meanwhile.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let ca = Ca::start(&state, &addr.to_string());
    let restarted = unix_now();
    assert_eq!(ca.grpc, addr, "restarted on the same port");
    assert_eq!(ca.root_pem(), root, "the same root from the same state");
    // Long enough for every agent to renew from the restarted CA.
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::SeqCst);

    let mut calls = Vec::new();
    for c in callers {
        calls.extend(c.await.unwrap());
    }
    let certs = calls.iter().filter(|c| c.outcome.is_ok()).count();
    let errors: Vec<&Call> = calls.iter().filter(|c| c.outcome.is_err()).collect();
    let slowest = calls.iter().map(|c| c.took).max().unwrap();
    let mut codes = std::collections::BTreeMap::new();
    for c in &errors {
        *codes
            .entry(format!("{:?}", c.outcome.as_ref().unwrap_err()))
            .or_insert(0) += 1;
    }
    eprintln!(
        "outage {:.2}s (kill to restarted banner); {} calls: {certs} certificates, {} errors {codes:?}; slowest call {slowest:?}",
        restarted - killed,
        calls.len(),
        errors.len(),
    );
    assert!(
        slowest < CALL_BOUND,
        "a call took {slowest:?}, beyond the bound {CALL_BOUND:?}"
    );
    assert!(
        !errors.is_empty(),
        "the kill was seen by the callers (else the test proves nothing)"
    );
    for c in &errors {
        assert!(
            c.started + c.took.as_secs_f64() >= killed && c.started <= restarted + 2.0,
            "an error outside the outage: {c:?}"
        );
        assert_ne!(c.outcome, Err(tonic::Code::DeadlineExceeded), "{c:?}");
    }
    assert!(
        calls
            .iter()
            .any(|c| c.started > restarted && c.outcome.is_ok()),
        "the callers got certificates from the restarted CA"
    );

    for (agent, w) in [(&a, "web"), (&a, "db"), (&b, "api")] {
        let failed = metric_at(
            agent.ops,
            &format!("workload_ca_agent_csr_failures_total{{workload=\"{w}\"}}"),
        )
        .await;
        eprintln!("{w}: {failed} failed certificate requests during the outage");
        assert!(failed >= 1.0, "{w} asked while the CA was away");
    }
    for (s, name) in samplers.into_iter().zip(["a/web", "a/db", "b/api"]) {
        let samples = s.await.unwrap();
        let no_cert: Vec<&Sample> = samples.iter().filter(|s| s.served.is_err()).collect();
        assert!(
            no_cert.is_empty(),
            "{name}: SDS served no certificate: {no_cert:?}"
        );
        let unready: Vec<&Sample> = samples.iter().filter(|s| s.ready != 200).collect();
        assert!(unready.is_empty(), "{name}: not ready: {unready:?}");
        let leaves: Vec<&Leaf> = samples
            .iter()
            .filter_map(|s| s.served.as_ref().ok())
            .collect();
        let mut serials: Vec<&str> = leaves.iter().map(|l| l.serial.as_str()).collect();
        serials.dedup();
        // A certificate the restarted CA signed: after the kill.
        let first_new = samples.iter().find(|s| {
            s.served
                .as_ref()
                .is_ok_and(|l| l.issued as f64 >= killed.floor() + 1.0)
        });
        let first_new = first_new.unwrap_or_else(|| {
            panic!("{name}: no certificate from the restarted CA was served: {serials:?}")
        });
        eprintln!(
            "{name}: {} SDS samples, all valid and ready; {} certificates served; first from the restarted CA seen {:.2}s after it was up",
            samples.len(),
            serials.len(),
            first_new.at - restarted
        );
    }
    for agent in [&mut a, &mut b] {
        assert!(
            agent.child.try_wait().unwrap().is_none(),
            "the agents ran throughout"
        );
    }
}

/// What the agent's `/metrics` said at `at` (Unix s).
#[derive(Debug)]
struct Gauges {
    at: f64,
    remaining: f64,
    failures: f64,
    ready: f64,
}

fn gauges(ops: SocketAddr, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<Gauges>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        while !stop.load(Ordering::SeqCst) && out.len() < 1000 {
            let at = unix_now();
            out.push(Gauges {
                at,
                remaining: metric_at(ops, "workload_ca_agent_cert_remaining_seconds").await,
                failures: metric_at(ops, "workload_ca_agent_renewal_failures_consecutive").await,
                ready: metric_at(ops, "workload_ca_agent_ready").await,
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        out
    })
}

/// The agent's JSON log lines whose message contains `text`.
fn logged(log: &str, text: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"].as_str().is_some_and(|m| m.contains(text)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_away_longer_than_a_lifetime_is_said_loudly_before_expiry_and_survived() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let ca = Ca::start(&state, "127.0.0.1:0");
    let addr = ca.grpc;
    let root = ca.root_pem();
    let agent = AgentProc::start(
        addr,
        &root,
        &[("web", dev_token(&state, "prod", "web"))],
        &[
            "--cert-ttl",
            "6s",
            "--rotation-jitter",
            "0",
            "--retry-max-delay",
            "1s",
            "--log-format",
            "json",
        ],
    );
    agent.wait_ready().await;
    let socket = agent.socket("web");
    let first = served(&socket, Duration::from_secs(5)).await.unwrap();
    let first = verify_at(&first.chain, &root, unix_now()).unwrap();
    let killed = unix_now();
    ca.kill9();

    let stop = Arc::new(AtomicBool::new(false));
    let sds = sampler(
        socket.clone(),
        agent.ops,
        root.clone(),
        Duration::from_millis(100),
        Duration::from_secs(1),
        stop.clone(),
    );
    let metrics = gauges(agent.ops, stop.clone());

    // Away until well past the certificate's expiry.
    let expiry = first.not_after as f64;
    let back_at = expiry + 4.0;
    tokio::time::sleep(Duration::from_secs_f64((back_at - unix_now()).max(0.0))).await;
    // Until then the CA was certainly away.
    let restarting = unix_now();
    let ca = Ca::start(&state, &addr.to_string());
    let restarted = unix_now();
    assert_eq!(ca.grpc, addr);
    let outage = restarted - killed;
    let lifetime = (first.not_after - first.issued) as f64;
    assert!(
        outage > lifetime,
        "away {outage:.1}s, longer than the {lifetime}s lifetime"
    );

    // Recovery, by itself: ready again with a new certificate.
    let deadline = Instant::now() + Duration::from_secs(20);
    let recovered = loop {
        let ready = http_get(agent.ops, "/readyz").await.0 == 200;
        let now_served = served(&socket, Duration::from_secs(1)).await;
        if let Ok(s) = &now_served
            && ready
            && verify_at(&s.chain, &root, unix_now()).unwrap().serial != first.serial
        {
            break unix_now();
        }
        assert!(
            Instant::now() < deadline,
            "not recovered 20 s after the CA returned:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.store(true, Ordering::SeqCst);
    let samples = sds.await.unwrap();
    let gauges = metrics.await.unwrap();

    // Not ready before expiry, while the proxy is still served a valid
    // certificate: the first unready sample is one.
    let unready = samples
        .iter()
        .find(|s| s.ready != 200)
        .expect("/readyz went false");
    let served_then = unready
        .served
        .as_ref()
        .expect("still served a valid certificate when readiness ended");
    assert_eq!(served_then.serial, first.serial);
    assert!(unready.at < expiry, "{unready:?}, expiry {expiry}");
    // And stayed so until the CA returned.
    assert!(
        samples
            .iter()
            .filter(|s| s.at > unready.at && s.at + 0.5 < restarting)
            .all(|s| s.ready != 200),
        "ready again without a CA"
    );
    // Nothing served between expiry and the CA's return (every certificate
    // served was also checked valid when asked for).
    let dark: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= expiry && s.at + 1.0 < restarting)
        .collect();
    assert!(!dark.is_empty(), "sampled after expiry");
    assert!(
        dark.iter().all(|s| s.served.is_err()),
        "served after expiry: {dark:?}"
    );

    // The metrics said it too.
    let ending = gauges
        .iter()
        .find(|g| g.at < expiry && g.ready == 0.0)
        .expect("workload_ca_agent_ready 0 before expiry");
    assert!(
        ending.remaining > 0.0 && ending.remaining <= lifetime * 0.2 + 0.5,
        "{ending:?}"
    );
    assert!(ending.failures >= 1.0, "{ending:?}");
    assert!(
        gauges
            .iter()
            .filter(|g| g.at > expiry + 0.5 && g.at + 0.5 < restarting)
            .all(|g| g.remaining == 0.0 && g.ready == 0.0),
        "{gauges:?}"
    );

    // And the log, naming the CA and the time left.
    let log = agent.log_text();
    let soon = logged(&log, "expires soon and the CA has not renewed it");
    let first_soon = soon.first().expect("an error before expiry");
    assert_eq!(first_soon["level"], "ERROR");
    assert_eq!(first_soon["ca"], addr.to_string().as_str(), "{first_soon}");
    let left = first_soon["left_s"].as_f64().unwrap();
    assert!(left > 0.0 && left <= lifetime * 0.2 + 0.5, "{first_soon}");
    assert!(first_soon["failed_requests"].as_u64().unwrap() >= 1);
    assert!(soon.len() <= 6, "loud, not a flood: {} lines", soon.len());
    assert_eq!(
        logged(
            &log,
            "the certificate expired and the CA has not renewed it"
        )
        .len(),
        1
    );
    assert_eq!(logged(&log, "ready again").len(), 1);

    eprintln!(
        "lifetime {lifetime}s; CA away {outage:.1}s; /readyz false {:.2}s before expiry (gauges: {:.2}s left, {} failed requests); {} errors logged before expiry; {} SDS samples after expiry, none served; ready with a new certificate {:.2}s after the CA returned",
        expiry - unready.at,
        ending.remaining,
        ending.failures,
        soon.len(),
        dark.len(),
        recovered - restarted,
    );
}
