//! Faults of the node agent, against real processes: the agent killed
//! (`kill -9`) under a real Envoy and a plain SDS client, and restarted on
//! the same sockets; and `--output-dir` read during many rotations.
//! (Token and clock faults: `tests/agent_ca.rs` and the paused-clock tests
//! of `src/agent/workload_tests.rs`.)
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::envoy::{Envoy, mtls_get, server_bootstrap, tls_client};
use common::procs::CaProc;
use common::sds::{SotwStream, served};
use common::*;
use workload_ca::agent::workload::OUTPUT_DATA_LINK;
use workload_ca::agent::{self};
use workload_ca::ca::{KeyAlgorithm, PrivateKey};
use workload_ca::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use x509_parser::prelude::FromDer;

const WEB: &str = "spiffe://cluster.local/ns/prod/sa/web";

/// A `ca agent` process in node mode for workload `web`, on files in `dir`
/// that outlive it (token, root file, socket directory, log), so a restart
/// finds what the killed one left.
struct AgentAt {
    child: Child,
    ops: SocketAddr,
}

impl AgentAt {
    fn start(dir: &Path, ca: &CaProc) -> Self {
        use std::io::{BufRead, BufReader};
        std::fs::write(dir.join("root.pem"), ca.root_pem()).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ca"))
            .args(["agent", "--ca-addr", &ca.grpc.to_string()])
            .args(["--ca-server-name", "localhost", "--ca-root-cert"])
            .arg(dir.join("root.pem"))
            .arg("--socket-dir")
            .arg(dir.join("sds"))
            .arg("--workload")
            .arg(format!("web={}", dir.join("web.token").display()))
            .args(["--ops-listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut banner = Vec::new();
        let ops = loop {
            let Some(Ok(line)) = lines.next() else {
                panic!(
                    "the agent did not start: {banner:?}\n{}",
                    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
                );
            };
            if let Some(rest) = line.split_once("http://").map(|(_, r)| r) {
                break rest.split('/').next().unwrap().parse().unwrap();
            }
            banner.push(line);
        };
        std::thread::spawn(move || lines.for_each(drop));
        Self { child, ops }
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_get(self.ops, "/readyz").await.0 != 200 {
            assert!(Instant::now() < deadline, "agent never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no handler runs, the socket file stays behind.
    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for AgentAt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Handshakes with Envoy's listener (each verified: chain to our roots,
/// SPIFFE ID `WEB`) until one presents a serial other than `old`; every
/// handshake must succeed.
async fn serial_other_than(
    client: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    old: &str,
    envoy: &Envoy,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (serial, body) = mtls_get(client, addr)
            .await
            .unwrap_or_else(|e| panic!("handshake through Envoy: {e}\n{}", envoy.log()));
        assert_eq!(body, "served by web");
        let serial = serial.replace(':', "");
        if serial != old {
            return serial;
        }
        assert!(
            Instant::now() < deadline,
            "Envoy still serves {old} 20 s after the agent came back\n{}",
            envoy.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the agent serves now on `socket` to a fresh FetchSecrets,
/// verified by two independent verifiers: its serial.
async fn served_verified(socket: &Path) -> String {
    let s = served(socket, Duration::from_secs(5)).await.unwrap();
    webpki_verify(&s.chain);
    openssl_verify(&s.chain);
    let f = leaf_facts(&s.chain[0]);
    assert_eq!(f.uris, [WEB]);
    assert!(f.not_after > now_secs() && f.not_before <= now_secs() + 1);
    s.serial
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_restarts_on_its_stale_socket_and_envoy_and_sds_clients_reconnect() {
    let ca = CaProc::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.token"), ca.token("prod", "web")).unwrap();
    let socket: PathBuf = dir.path().join("sds/web/socket");
    let first_agent = AgentAt::start(dir.path(), &ca);
    first_agent.wait_ready().await;

    let envoy = Envoy::start(&server_bootstrap(&socket, "served by web", None));
    envoy.wait_live().await;
    let addr = envoy.listener("mtls").await;
    let client = {
        let (key, csr) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
        let chain = request(
            &mut ca.client().await,
            &csr,
            Some(&ca.token("test", "client")),
            0,
        )
        .await
        .unwrap();
        webpki_verify(&chain);
        tls_client(
            chain.last().unwrap(),
            &chain[..chain.len() - 1].concat(),
            &key,
            Some(WEB),
        )
    };
    let first = served_verified(&socket).await;
    let (serial, _) = mtls_get(&client, addr).await.unwrap();
    assert_eq!(serial.replace(':', ""), first, "Envoy serves the agent's");

    // A plain SDS client holding a stream, as Envoy does.
    let mut sds = SecretDiscoveryServiceClient::new(unix_channel(&socket).await);
    let mut stream = SotwStream::open(&mut sds).await;
    stream.send(&["default"], "", "", None).await;
    let r = stream.recv().await.unwrap();
    assert_eq!(r.version_info, format!("default={first}"));
    stream.ack(&["default"], &r).await;
    let updates = envoy.stat("sds.default.update_success").await;

    first_agent.kill9();
    assert!(
        std::fs::symlink_metadata(&socket).is_ok(),
        "kill -9 leaves the socket file behind"
    );
    assert!(
        stream.recv().await.is_err(),
        "the stream ends with the agent"
    );
    // Envoy keeps its last secret meanwhile.
    let (serial, _) = mtls_get(&client, addr).await.unwrap();
    assert_eq!(serial.replace(':', ""), first);

    // The same command on the same files: the stale socket is replaced.
    let second_agent = AgentAt::start(dir.path(), &ca);
    second_agent.wait_ready().await;
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(log.contains("replacing a stale socket"), "{log}");
    let second = served_verified(&socket).await;
    assert_ne!(second, first, "a new process, a new key and certificate");

    // Envoy reconnects by itself and serves the new certificate.
    assert_eq!(
        serial_other_than(&client, addr, &first, &envoy).await,
        second
    );
    assert!(envoy.stat("sds.default.update_success").await > updates);
    assert_eq!(envoy.stat("sds.default.update_rejected").await, 0);

    // The plain client's channel reconnects too (a call may fail while it
    // notices the old connection is gone; a client retries): a new stream
    // is served.
    let mut failed = Vec::new();
    let mut stream = loop {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        match sds
            .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Ok(r) => {
                break SotwStream {
                    tx,
                    rx: r.into_inner(),
                };
            }
            Err(e) => failed.push(e.to_string()),
        }
        assert!(
            failed.len() < 20,
            "the SDS channel never reconnected: {failed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "SDS client reopened its stream after {} failed call(s): {failed:?}",
        failed.len()
    );
    stream.send(&["default", "ROOTCA"], "", "", None).await;
    let r = stream.recv().await.unwrap();
    assert_eq!(r.resources.len(), 2);
    assert!(
        r.version_info.contains(&format!("default={second}")),
        "{}",
        r.version_info
    );
    drop(stream);
    drop(second_agent);
}

/// A reader of `--output-dir` through the visible names, during many
/// rotations: whenever `..data` did not move while it opened `key.pem` and
/// `cert-chain.pem`, the key is the leaf's. Returns (consistent reads,
/// reads that straddled a swap, distinct leaves seen).
fn read_while_rotating(dir: &Path, stop: &AtomicBool) -> (u32, u32, usize) {
    let (mut consistent, mut straddled) = (0u32, 0u32);
    let mut leaves = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let Ok(before) = std::fs::read_link(dir.join(OUTPUT_DATA_LINK)) else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        let key = std::fs::read_to_string(dir.join("key.pem"));
        let chain = std::fs::read_to_string(dir.join("cert-chain.pem"));
        let after = std::fs::read_link(dir.join(OUTPUT_DATA_LINK)).unwrap();
        if before != after {
            straddled += 1;
            continue;
        }
        let (key, chain) = (key.unwrap(), chain.unwrap());
        let key = PrivateKey::from_pem(&key).expect("a whole key");
        let leaf = ders(&chain).remove(0);
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&leaf).unwrap();
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw(),
            "a key published with another certificate's chain (serial {})",
            cert.raw_serial_as_string()
        );
        leaves.insert(cert.raw_serial_as_string());
        consistent += 1;
    }
    (consistent, straddled, leaves.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_dir_readers_never_see_a_new_key_with_an_old_chain() {
    use std::os::unix::fs::PermissionsExt;
    let ca = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), ca.token("prod", "web")).unwrap();
    let out = dir.path().join("out");
    // Two-second certificates: renewed every second (the shortest interval).
    let mut config = agent_config(&ca, dir.path());
    config.policy.ttl = Duration::from_secs(2);
    config.output_dir = Some(out.clone());
    let agent = agent::start(config).await.unwrap();
    let web = out.join("web");
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (web, stop) = (web.clone(), stop.clone());
        std::thread::spawn(move || read_while_rotating(&web, &stop))
    };
    // Eight rotations, or 30 s.
    let mut rotations = agent.watches[0].1.cert.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = 0;
    while seen < 8 && Instant::now() < deadline {
        if tokio::time::timeout(Duration::from_secs(5), rotations.changed())
            .await
            .is_ok_and(|r| r.is_ok())
            && rotations.borrow_and_update().is_some()
        {
            seen += 1;
        }
    }
    // Let the writer publish the last one.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let (consistent, straddled, leaves) = reader.join().unwrap();
    eprintln!(
        "{seen} rotations; {consistent} consistent reads of {leaves} leaves, {straddled} straddled a swap"
    );
    assert!(seen >= 8, "only {seen} rotations in 30 s");
    assert!(
        leaves >= 5 && consistent >= 50,
        "{consistent} reads of {leaves} leaves"
    );

    // The published set verifies, with the modes kept.
    let mut chain: Vec<String> =
        ders(&std::fs::read_to_string(web.join("cert-chain.pem")).unwrap())
            .iter()
            .map(|d| workload_ca::ca::bundle::to_pem("CERTIFICATE", d))
            .collect();
    chain.push(std::fs::read_to_string(web.join("root-cert.pem")).unwrap());
    webpki_verify(&chain);
    openssl_verify(&chain);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&web.join("key.pem")), 0o600);
    assert_eq!(mode(&web), 0o700);
    assert_eq!(mode(&web.join(OUTPUT_DATA_LINK)), 0o700);
    agent.shutdown().await;
}
