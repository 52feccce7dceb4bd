//! What one hostile client can do to a real `ca server` and `ca agent`
//! (release builds, default limits). Run: `cargo bench --bench abuse`.
//!
//! - `server streams`: one connection sends HEADERS for 100,000 gRPC streams
//!   and never a body; resident memory before, at the peak, and after the
//!   connection closes.
//! - `server streams, one source at its caps`: as many connections as one
//!   source may hold, each with as many body-less streams as it may open.
//! - `agent streams`: the same against one SDS socket of a node-mode agent.
//! - `new connection under a connection flood`: a legitimate client's new
//!   TLS connection plus one CreateCertificate, timed alone and while one
//!   source holds every connection it may (per-source cap) and keeps
//!   reopening silent TCP connections.
// A benchmark: a panic is a failed run, not a fault of the CA.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::h2raw::{self, RawH2};
use common::procs::*;
use common::{key_and_csr, request};
use workload_ca::ca::KeyAlgorithm;

const FLOOD_STREAMS: u32 = 100_000;
const LATENCY_SAMPLES: usize = 200;

/// Sends HEADERS for `FLOOD_STREAMS` streams on `raw`, reading what comes
/// back as it goes; returns (peak RSS of `pid` in KiB, streams refused).
async fn flood<S>(raw: &mut RawH2<S>, headers: &[(String, String)], pid: u32) -> (u64, usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let mut peak = rss_kib(pid);
    let mut refused = 0;
    let mut id = 1u32;
    while id < 2 * FLOOD_STREAMS {
        for _ in 0..500 {
            if raw.send_headers(id, headers, false).await.is_err() {
                return (peak, refused);
            }
            id += 2;
        }
        let e = raw.collect(Duration::from_millis(5)).await;
        refused += e.refused();
        peak = peak.max(rss_kib(pid));
        if e.closed {
            break;
        }
    }
    let e = raw.collect(Duration::from_millis(500)).await;
    refused += e.refused();
    (peak.max(rss_kib(pid)), refused)
}

fn mb(kib: u64) -> String {
    format!("{:.1} MB", kib as f64 / 1024.0)
}

async fn server_streams() {
    let ca = CaProc::start(&[]);
    for _ in 0..5 {
        ca.legit_issue().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(ca.pid());
    let mut raw = ca.raw_from(OTHER_HOST).await;
    let headers = h2raw::grpc_headers(
        "localhost",
        "/istio.v1.auth.IstioCertificateService/CreateCertificate",
    );
    let started = Instant::now();
    let (peak, refused) = flood(&mut raw, &headers, ca.pid()).await;
    let took = started.elapsed();
    drop(raw);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(ca.pid());
    ca.legit_issue().await;
    println!(
        "server streams: {FLOOD_STREAMS} body-less streams on one connection in {took:.1?} ({refused} refused by the stream cap): RSS {} before, {} peak, {} after",
        mb(before),
        mb(peak),
        mb(after)
    );
}

async fn agent_streams() {
    let ca = CaProc::start(&[]);
    let workloads = [("a", ca.token("prod", "a")), ("b", ca.token("prod", "b"))];
    let agent = AgentProc::start(ca.grpc, &ca.root_pem(), &workloads, &[]);
    agent.wait_ready().await;
    fetch_default(&agent.socket("a")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The other workload's usual latency.
    let mut usual = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        fetch_default(&agent.socket("b")).await;
        usual.push(t.elapsed());
    }
    usual.sort();
    let usual = usual[usual.len() / 2];
    let before = rss_kib(agent.pid());
    let mut raw = RawH2::handshake(
        tokio::net::UnixStream::connect(agent.socket("a"))
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    let headers = h2raw::grpc_headers_scheme(
        "http",
        "localhost",
        "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
    );
    let started = Instant::now();
    let (peak, refused) = flood(&mut raw, &headers, agent.pid()).await;
    let took = started.elapsed();
    // The other workload's latency during the flood.
    let t = Instant::now();
    fetch_default(&agent.socket("b")).await;
    let other = t.elapsed();
    drop(raw);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(agent.pid());
    println!(
        "agent streams: {FLOOD_STREAMS} body-less SDS streams on one connection in {took:.1?} ({refused} refused): RSS {} before, {} peak, {} after; the other workload's FetchSecrets meanwhile: {other:.1?} (usually {usual:.1?}, a new connection each time)",
        mb(before),
        mb(peak),
        mb(after)
    );
}

/// New TLS connection + CreateCertificate, `LATENCY_SAMPLES` times.
async fn new_connection_latency(ca: &CaProc) -> (Duration, Duration) {
    let token = ca.token("prod", "web");
    let csrs: Vec<String> = (0..LATENCY_SAMPLES)
        .map(|_| key_and_csr(KeyAlgorithm::EcdsaP256, None).1)
        .collect();
    let mut samples = Vec::new();
    for csr in &csrs {
        let t = Instant::now();
        let mut client = ca.client().await;
        request(&mut client, csr, Some(&token), 0).await.unwrap();
        samples.push(t.elapsed());
    }
    samples.sort();
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

/// One source at its caps: `--max-connections-per-source` connections, each
/// with `--max-streams-per-connection` body-less streams held open; twice,
/// to tell memory the allocator keeps from memory that leaks.
async fn server_streams_one_source() {
    let ca = CaProc::start(&[]);
    let limits = workload_ca::limits::ServerLimits::default();
    let conns = limits.accept.max_connections_per_source.unwrap_or(1000);
    let streams = limits.http2.max_streams_per_connection;
    ca.legit_issue().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let headers = h2raw::grpc_headers(
        "localhost",
        "/istio.v1.auth.IstioCertificateService/CreateCertificate",
    );
    // Idle connections first: what one connection costs.
    let before = rss_kib(ca.pid());
    let mut idle = Vec::new();
    for _ in 0..conns {
        idle.push(ca.raw_from(OTHER_HOST).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with_idle = rss_kib(ca.pid());
    drop(idle);
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "server idle connections: {conns} (TLS + HTTP/2, from one source): RSS {} before, {} with them open ({:.1} KB each)",
        mb(before),
        mb(with_idle),
        (with_idle.saturating_sub(before)) as f64 / conns as f64
    );
    for round in 1..=2 {
        let before = rss_kib(ca.pid());
        let started = Instant::now();
        let mut held = Vec::new();
        let mut peak = before;
        for _ in 0..conns {
            let mut raw = ca.raw_from(OTHER_HOST).await;
            for i in 0..streams {
                raw.send_headers(1 + 2 * i, &headers, false).await.unwrap();
            }
            held.push(raw);
            if held.len() % 50 == 0 {
                peak = peak.max(rss_kib(ca.pid()));
            }
        }
        let took = started.elapsed();
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak = peak.max(rss_kib(ca.pid()));
        let t = Instant::now();
        ca.legit_issue().await;
        let legit = t.elapsed();
        drop(held);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_kib(ca.pid());
        println!(
            "server streams, one source at its caps (round {round}): {conns} connections x {streams} body-less streams ({} streams, {} calls held, the rest refused) opened in {took:.1?}: RSS {} before, {} peak, {} after; a legitimate new connection + certificate meanwhile: {legit:.1?}",
            conns * streams as usize,
            limits.http2.max_calls_per_source.unwrap_or(0),
            mb(before),
            mb(peak),
            mb(after)
        );
    }
}

async fn connection_flood() {
    let ca = CaProc::start(&[]);
    ca.legit_issue().await;
    let (p50, p99) = new_connection_latency(&ca).await;
    println!("new connection + certificate, alone: p50 {p50:.2?}, p99 {p99:.2?}");

    // The attacker runs on its own thread and runtime, so the legitimate
    // client's runtime is not the one it keeps busy (the machine's two
    // cores are still shared by all three).
    let limits = workload_ca::limits::ServerLimits::default();
    let hold = limits.accept.max_connections_per_source.unwrap_or(1000)
        - limits.accept.max_pending_handshakes_per_source;
    let (grpc, root) = (ca.grpc, ca.root_pem());
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicUsize::new(0));
    let held_n = Arc::new(AtomicUsize::new(0));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let attacker = {
        let (stop, attempts, held_n) = (stop.clone(), attempts.clone(), held_n.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                // Handshaken connections held open, up to what the
                // per-source cap leaves beside a full handshake quota...
                let connector = tls_connector(&root);
                let mut held = Vec::new();
                while held.len() < hold {
                    let tcp = tcp_from(OTHER_HOST, grpc).await.unwrap();
                    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
                    let tls = connector.connect(name, tcp).await.unwrap();
                    held.push(RawH2::handshake(tls).await.unwrap());
                }
                held_n.store(held.len(), Ordering::Relaxed);
                // ... and silent connections reopened as fast as they are
                // closed, holding the handshake quota and beyond.
                let mut silent = Vec::new();
                for _ in 0..128 {
                    let (stop, attempts) = (stop.clone(), attempts.clone());
                    silent.push(tokio::spawn(async move {
                        while !stop.load(Ordering::Relaxed) {
                            attempts.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut s) = tcp_from(OTHER_HOST, grpc).await {
                                closed_within(&mut s, Duration::from_secs(1)).await;
                            }
                        }
                    }));
                }
                let _ = ready_tx.send(());
                for t in silent {
                    let _ = t.await;
                }
                drop(held);
            });
        })
    };
    ready_rx.recv().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (p50, p99) = new_connection_latency(&ca).await;
    stop.store(true, Ordering::Relaxed);
    attacker.join().unwrap();
    println!(
        "new connection + certificate, while 127.0.0.2 holds {} connections and made {} more attempts: p50 {p50:.2?}, p99 {p99:.2?} (refused: {} per-source connections, {} per-source handshakes)",
        held_n.load(Ordering::Relaxed),
        attempts.load(Ordering::Relaxed),
        ca.refusals("connections_per_source").await,
        ca.refusals("pending_handshakes_per_source").await,
    );
}

#[tokio::main]
async fn main() {
    server_streams().await;
    server_streams_one_source().await;
    agent_streams().await;
    connection_flood().await;
}
