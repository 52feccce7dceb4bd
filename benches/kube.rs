//! Kubernetes authentication under load, against the fake API server, with
//! real `ca server` processes (release build). Run: `cargo bench --bench kube`.
//!
//! Part 1, certificates per second and server CPU per CSR, four ways of
//! checking the same kind of bound service-account token, all in one run:
//!
//! - `local (--kube)`: the cluster's JWKS plus the pod and service-account
//!   watch caches; no API call per CSR.
//! - `JWKS file`: `--jwt-issuer ISSUER=FILE` with the fake's JWKS written
//!   to a file and no `--kube` (signature and claims only: the baseline).
//! - `TokenReview cached`: `--kube --token-review`, a pool of tokens all
//!   reviewed during the warm-up, so every measured request is a cache hit.
//! - `TokenReview uncached`: the same server, a token never seen before on
//!   every request, each one reviewed by the fake (no added latency).
//!
//! Each mode: [`WARMUP`] requests, then [`REPS`] timed runs of
//! [`REQUESTS`] CreateCertificate calls, [`CONCURRENCY`] in flight over
//! [`CONNECTIONS`] HTTP/2 connections, modes interleaved rep by rep (so a
//! noisy neighbour hurts them alike); the median and the spread are shown.
//! CPU per CSR is the server process's utime+stime (/proc/<pid>/stat)
//! over the run, divided by the certificates issued. CSRs and tokens are
//! made before the clock starts.
//!
//! Part 2, 10,000 pods: the resident memory of `ca server --kube` once
//! synced with an empty cluster and with [`SEED_PODS`] pods (and their
//! service accounts), and the time to sync from empty (its log's
//! `watch cache synced took_ms`, the
//! `workload_ca_kube_cache_last_list_milliseconds` gauge, and spawn to
//! `/readyz` 200), [`SYNC_REPS`] fresh servers each; the memory of a
//! server that was already running when the pods came (through its
//! watches); and how long the same list takes this process as raw text
//! (the fake's share) and decoded as `k8s_openapi` Pods.
//!
//! The fake API server and the client share this process, and with the
//! server the machine's cores (and with whatever else runs: the load
//! average is printed): throughput is a floor and moves with the
//! neighbours; CPU per CSR is the server's alone, and steadier.
// A benchmark: a panic is a failed run, not a fault of the CA.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
// The fake API server's own lints (not ours to change here).
#[allow(
    clippy::type_complexity,
    clippy::collapsible_if,
    clippy::collapsible_match
)]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fakekube::{FakeKube, TokenSpec};
use common::kubeca::{KubeCluster, wait_ready};
use common::procs::{CaProc, clock_ticks, cpu_ticks, hwm_kib, loadavg, metric_at, rss_kib};
use common::{http_get, key_and_csr};
use tokio::sync::Semaphore;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use workload_ca::ca::KeyAlgorithm;
use workload_ca::proto::istio::IstioCertificateRequest;
use workload_ca::proto::istio::istio_certificate_service_client::IstioCertificateServiceClient;

/// Timed requests per mode and repetition.
const REQUESTS: usize = 5_000;
/// Untimed requests per mode before the first repetition.
const WARMUP: usize = 500;
const REPS: usize = 3;
const CONCURRENCY: usize = 64;
const CONNECTIONS: usize = 8;
/// Distinct tokens reused by the local, JWKS-file and cached-review modes
/// (all reviewed during the cached mode's warm-up).
const TOKEN_POOL: usize = 500;
// The cached mode's warm-up must review every token of the pool.
const _: () = assert!(TOKEN_POOL <= WARMUP);
/// Part 1's pods (in namespace `load`, on node-a) and their service
/// accounts: the tokens are bound to them.
const LOAD_PODS: usize = 100;
const LOAD_SAS: usize = 10;
/// Part 2: pods in [`SEED_NAMESPACES`] namespaces of
/// [`SEED_SAS_PER_NS`] service accounts each.
const SEED_PODS: usize = 10_000;
const SEED_NAMESPACES: usize = 100;
const SEED_SAS_PER_NS: usize = 10;
/// Part 2: fresh servers started on each cluster.
const SYNC_REPS: usize = 3;
const READY_LIMIT: Duration = Duration::from_secs(120);

type Client = IstioCertificateServiceClient<Channel>;

/// A bearer `authorization` value, encoded once.
fn bearer(token: &str) -> AsciiMetadataValue {
    format!("Bearer {token}").parse().expect("ASCII token")
}

fn request(csr: &str, auth: &AsciiMetadataValue) -> tonic::Request<IstioCertificateRequest> {
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr.to_owned(),
        validity_duration: 0,
        metadata: None,
    });
    req.metadata_mut().insert("authorization", auth.clone());
    req
}

/// One timed run.
#[derive(Clone, Copy, Debug)]
struct Run {
    per_sec: f64,
    /// Server CPU per certificate, µs.
    server_us: f64,
    /// This process's CPU (client and fake API server) per certificate, µs.
    bench_us: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// `n` CreateCertificate calls, request `i` with CSR `csrs[i % len]` and
/// token `tokens[i % len]` on connection `i % CONNECTIONS`, at most
/// [`CONCURRENCY`] in flight. Panics on any failure: the figures would
/// mean nothing.
async fn timed(
    pid: u32,
    clients: &[Client],
    csrs: &Arc<Vec<String>>,
    tokens: &Arc<Vec<AsciiMetadataValue>>,
    n: usize,
) -> Run {
    let ticks = clock_ticks();
    let pid_s = pid.to_string();
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    let (cpu0, self0) = (cpu_ticks(&pid_s), cpu_ticks("self"));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = slots.clone().acquire_owned().await.unwrap();
        let mut client = clients[i % clients.len()].clone();
        let (csrs, tokens) = (csrs.clone(), tokens.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let t = Instant::now();
            let req = request(&csrs[i % csrs.len()], &tokens[i % tokens.len()]);
            if let Err(e) = client.create_certificate(req).await {
                panic!("request {i} failed: {:?}: {}", e.code(), e.message());
            }
            t.elapsed()
        }));
    }
    let mut lat = Vec::with_capacity(n);
    for t in tasks {
        lat.push(t.await.expect("a request failed"));
    }
    let total = start.elapsed().as_secs_f64();
    let (cpu1, self1) = (cpu_ticks(&pid_s), cpu_ticks("self"));
    lat.sort();
    let pct = |p: f64| lat[((n as f64 * p) as usize).min(n - 1)].as_secs_f64() * 1e3;
    let per = |d: u64| d as f64 / ticks / n as f64 * 1e6;
    Run {
        per_sec: n as f64 / total,
        server_us: per(cpu1 - cpu0),
        bench_us: per(self1 - self0),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    }
}

/// The median and the extremes.
fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

async fn clients(ca: &CaProc) -> Vec<Client> {
    let mut out = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        out.push(ca.client().await);
    }
    out
}

/// `n` bound tokens (audience istio-ca) for the pods `load/pod-<i % LOAD_PODS>`,
/// each with its own jti, signed on two threads.
fn mint(fake: &FakeKube, n: usize) -> Vec<AsciiMetadataValue> {
    let half = n.div_ceil(2);
    let one = |range: std::ops::Range<usize>| -> Vec<AsciiMetadataValue> {
        range
            .map(|i| {
                let pod = i % LOAD_PODS;
                let sa = format!("sa-{}", pod % LOAD_SAS);
                bearer(
                    &fake.mint_token(
                        TokenSpec::new("load", &sa)
                            .pod(&format!("pod-{pod}"))
                            .audiences(&["istio-ca"]),
                    ),
                )
            })
            .collect()
    };
    std::thread::scope(|s| {
        let a = s.spawn(|| one(0..half));
        let b = one(half..n);
        let mut out = a.join().expect("minting thread");
        out.extend(b);
        out
    })
}

struct Mode {
    name: &'static str,
    pid: u32,
    clients: Vec<Client>,
    /// Tokens of the warm-up, then of each repetition.
    warmup: Arc<Vec<AsciiMetadataValue>>,
    reps: Vec<Arc<Vec<AsciiMetadataValue>>>,
    runs: Vec<Run>,
    /// TokenReviews the fake answered during each repetition.
    reviews: Vec<usize>,
}

async fn part1() {
    println!(
        "== Part 1: certificates per second, {REQUESTS} requests x {REPS} reps per mode \
         ({WARMUP} warm-up), {CONCURRENCY} in flight over {CONNECTIONS} HTTP/2 connections, \
         client and fake API server in this process =="
    );
    let k = KubeCluster::start().await;
    k.fake.create_namespace("load");
    for s in 0..LOAD_SAS {
        k.fake.create_service_account("load", &format!("sa-{s}"));
    }
    for p in 0..LOAD_PODS {
        k.fake.create_pod(
            "load",
            &format!("pod-{p}"),
            &format!("sa-{}", p % LOAD_SAS),
            Some("node-a"),
        );
    }

    let started = Instant::now();
    let csrs: Arc<Vec<String>> = Arc::new(
        (0..REQUESTS)
            .map(|_| key_and_csr(KeyAlgorithm::EcdsaP256, None).1)
            .collect(),
    );
    let pool = Arc::new(mint(&k.fake, TOKEN_POOL));
    let fresh = mint(&k.fake, WARMUP + REPS * REQUESTS);
    let fresh_warmup = Arc::new(fresh[..WARMUP].to_vec());
    let fresh_reps: Vec<_> = (0..REPS)
        .map(|r| Arc::new(fresh[WARMUP + r * REQUESTS..WARMUP + (r + 1) * REQUESTS].to_vec()))
        .collect();
    drop(fresh);
    println!(
        "   {REQUESTS} CSRs and {} tokens made in {:.1} s",
        TOKEN_POOL + WARMUP + REPS * REQUESTS,
        started.elapsed().as_secs_f64()
    );

    let jwks_path = k.dir.path().join("jwks.json");
    std::fs::write(&jwks_path, k.fake.jwks().to_string()).unwrap();
    let issuer_flag = format!("{}={}", k.fake.issuer(), jwks_path.display());
    let local = k.start_ca("local", &["--ca-secret", "bench-local"]);
    let file = CaProc::start_plain(
        &k.dir.path().join("file"),
        &["--jwt-issuer", &issuer_flag],
        &[],
    );
    let review = k.start_ca("review", &["--token-review", "--ca-secret", "bench-review"]);
    for ca in [&local, &file, &review] {
        wait_ready(ca, READY_LIMIT).await;
    }
    let pool_reps = vec![pool.clone(); REPS];
    let mut modes = vec![
        Mode {
            name: "local (--kube)",
            pid: local.pid(),
            clients: clients(&local).await,
            warmup: pool.clone(),
            reps: pool_reps.clone(),
            runs: Vec::new(),
            reviews: Vec::new(),
        },
        Mode {
            name: "JWKS file",
            pid: file.pid(),
            clients: clients(&file).await,
            warmup: pool.clone(),
            reps: pool_reps.clone(),
            runs: Vec::new(),
            reviews: Vec::new(),
        },
        Mode {
            name: "TokenReview, cached",
            pid: review.pid(),
            clients: clients(&review).await,
            warmup: pool.clone(),
            reps: pool_reps,
            runs: Vec::new(),
            reviews: Vec::new(),
        },
        Mode {
            name: "TokenReview, uncached",
            pid: review.pid(),
            clients: clients(&review).await,
            warmup: fresh_warmup,
            reps: fresh_reps,
            runs: Vec::new(),
            reviews: Vec::new(),
        },
    ];

    for m in &modes {
        timed(m.pid, &m.clients, &csrs, &m.warmup, WARMUP).await;
    }
    for rep in 0..REPS {
        // Forward, then backward: each mode's neighbours change from rep
        // to rep, and local and file always run one after the other.
        let order: Vec<usize> = if rep % 2 == 0 {
            (0..modes.len()).collect()
        } else {
            (0..modes.len()).rev().collect()
        };
        for i in order {
            let m = &mut modes[i];
            let before = k.fake.count("create", "tokenreviews");
            let run = timed(m.pid, &m.clients, &csrs, &m.reps[rep], REQUESTS).await;
            let reviews = k.fake.count("create", "tokenreviews") - before;
            println!(
                "   rep {}  {:<22} {:>6.0} certs/s  server {:>4.0} µs CPU/CSR  client+fake {:>4.0} µs  p50 {:>5.1} ms  p99 {:>5.1} ms  {reviews} TokenReviews",
                rep + 1,
                m.name,
                run.per_sec,
                run.server_us,
                run.bench_us,
                run.p50_ms,
                run.p99_ms,
            );
            m.runs.push(run);
            m.reviews.push(reviews);
        }
    }

    let of = |m: &Mode, f: fn(&Run) -> f64| stats(&m.runs.iter().map(f).collect::<Vec<_>>());
    let base_rate = of(&modes[1], |r| r.per_sec).0;
    let base_cpu = of(&modes[1], |r| r.server_us).0;
    println!();
    println!(
        "{:<22} | {:>22} | {:>25} | {:>14} | {:>7} | {:>7} | {:>11} | {:>16}",
        "mode",
        "certs/s median (range)",
        "server µs CPU/CSR (range)",
        "client+fake µs",
        "p50 ms",
        "p99 ms",
        "reviews/rep",
        "vs file: rate/CPU"
    );
    println!(
        "{}",
        "-".repeat(22 + 22 + 25 + 14 + 7 + 7 + 11 + 16 + 7 * 3)
    );
    for m in &modes {
        let (rate, rlo, rhi) = of(m, |r| r.per_sec);
        let (cpu, clo, chi) = of(m, |r| r.server_us);
        let reviews = m.reviews.iter().max().copied().unwrap_or(0);
        println!(
            "{:<22} | {:>7.0} ({:>5.0}-{:<5.0}) | {:>9.0} ({:>5.0}-{:<5.0}) | {:>14.0} | {:>7.1} | {:>7.1} | {:>11} | {:>+7.1}% {:>+6.1}%",
            m.name,
            rate,
            rlo,
            rhi,
            cpu,
            clo,
            chi,
            of(m, |r| r.bench_us).0,
            of(m, |r| r.p50_ms).0,
            of(m, |r| r.p99_ms).0,
            reviews,
            (rate / base_rate - 1.0) * 100.0,
            (cpu / base_cpu - 1.0) * 100.0,
        );
    }
    let local_rate = of(&modes[0], |r| r.per_sec).0;
    let delta = (local_rate / base_rate - 1.0) * 100.0;
    println!(
        "\nlocal validation vs JWKS file, certificates per second: {delta:+.1}% (medians; target: no more than 10% fewer): {}",
        if delta >= -10.0 { "met" } else { "NOT met" }
    );
    // Adjacent runs share their neighbours' noise: their ratio is steadier.
    let paired: Vec<f64> = modes[0]
        .runs
        .iter()
        .zip(&modes[1].runs)
        .map(|(l, f)| (l.per_sec / f.per_sec - 1.0) * 100.0)
        .collect();
    let cpu: Vec<f64> = modes[0]
        .runs
        .iter()
        .zip(&modes[1].runs)
        .map(|(l, f)| (l.server_us / f.server_us - 1.0) * 100.0)
        .collect();
    let show = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:+.1}%"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "rep by rep (adjacent runs), local vs file: certs/s {} (median {:+.1}%); server CPU/CSR {} (median {:+.1}%)",
        show(&paired),
        stats(&paired).0,
        show(&cpu),
        stats(&cpu).0
    );
    let expected = [0, 0, 0, REQUESTS];
    for (m, want) in modes.iter().zip(expected) {
        if m.reviews.iter().any(|n| *n != want) {
            println!(
                "WARNING: {} made {:?} TokenReviews per rep, expected {want}",
                m.name, m.reviews
            );
        }
    }
    println!();
}

/// What one fresh `ca server --kube` showed while syncing.
struct Synced {
    /// Spawn to `/readyz` 200.
    ready_ms: f64,
    /// `took_ms` of the log's `watch cache synced` lines.
    log_pods_ms: f64,
    log_sas_ms: f64,
    /// `workload_ca_kube_cache_last_list_milliseconds`.
    metric_pods_ms: f64,
    metric_sas_ms: f64,
    /// Objects held once synced.
    pods: f64,
    sas: f64,
    /// Resident memory a second after ready, and its peak so far (KiB).
    rss: u64,
    hwm: u64,
}

async fn metric(ops: SocketAddr, name: &str, kind: &str) -> f64 {
    metric_at(ops, &format!("{name}{{kind=\"{kind}\"}}")).await
}

/// The `took_ms` of `kind`'s `watch cache synced` log line.
fn logged_took(log: &str, kind: &str) -> f64 {
    let quoted = format!("kind=\"{kind}\"");
    let bare = format!("kind={kind} ");
    log.lines()
        .filter(|l| l.contains("watch cache synced") && (l.contains(&quoted) || l.contains(&bare)))
        .find_map(|l| {
            l.split("took_ms=")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(f64::NAN)
}

/// Starts `ca server --kube` on state `name`; waits for `/readyz` 200
/// (polled every 10 ms), then a second.
async fn start_and_sync(k: &KubeCluster, name: &str) -> (CaProc, Synced) {
    let started = Instant::now();
    let ca = k.start_ca(name, &[]);
    loop {
        if http_get(ca.ops, "/readyz").await.0 == 200 {
            break;
        }
        assert!(
            started.elapsed() < READY_LIMIT,
            "{name} not ready after {READY_LIMIT:?}:\n{}",
            ca.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ready_ms = started.elapsed().as_secs_f64() * 1e3;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log = ca.log_text();
    let objects = "workload_ca_kube_cache_objects";
    let last_list = "workload_ca_kube_cache_last_list_milliseconds";
    let s = Synced {
        ready_ms,
        log_pods_ms: logged_took(&log, "pods"),
        log_sas_ms: logged_took(&log, "serviceaccounts"),
        metric_pods_ms: metric(ca.ops, last_list, "pods").await,
        metric_sas_ms: metric(ca.ops, last_list, "serviceaccounts").await,
        pods: metric(ca.ops, objects, "pods").await,
        sas: metric(ca.ops, objects, "serviceaccounts").await,
        rss: rss_kib(ca.pid()),
        hwm: hwm_kib(ca.pid()),
    };
    (ca, s)
}

/// `SEED_NAMESPACES` namespaces `seed-<n>`, each with `SEED_SAS_PER_NS`
/// service accounts and its share of `SEED_PODS` running pods.
fn seed(fake: &FakeKube) {
    let per_ns = SEED_PODS / SEED_NAMESPACES;
    for n in 0..SEED_NAMESPACES {
        let ns = format!("seed-{n}");
        fake.create_namespace(&ns);
        for s in 0..SEED_SAS_PER_NS {
            fake.create_service_account(&ns, &format!("sa-{s}"));
        }
        for p in 0..per_ns {
            let node = if p % 2 == 0 { "node-a" } else { "node-b" };
            fake.create_pod(
                &ns,
                &format!("pod-{p}"),
                &format!("sa-{}", p % SEED_SAS_PER_NS),
                Some(node),
            );
        }
    }
}

/// Where a full list's time goes, measured from this process with a kube
/// client: (pages, bytes, ms for the pages as text, ms for them decoded as
/// `k8s_openapi` Pods as the server's cache does).
async fn list_cost(fake: &FakeKube) -> (usize, usize, f64, f64) {
    let client = fake.client().await;
    let page = 500;
    let started = Instant::now();
    let (mut pages, mut bytes, mut cont) = (0, 0, String::new());
    for _ in 0..10_000 {
        let mut path = format!("/api/v1/pods?limit={page}");
        if !cont.is_empty() {
            path.push_str(&format!("&continue={cont}"));
        }
        let text = client
            .request_text(http::Request::get(path).body(Vec::new()).unwrap())
            .await
            .expect("raw list");
        pages += 1;
        bytes += text.len();
        // A continue token is base64url: no escapes to undo.
        cont = text
            .split("\"continue\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_default()
            .to_owned();
        if cont.is_empty() {
            break;
        }
    }
    let raw_ms = started.elapsed().as_secs_f64() * 1e3;
    let api: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::all(client);
    let started = Instant::now();
    let mut params = kube::api::ListParams::default().limit(page);
    for _ in 0..10_000 {
        let list = api.list(&params).await.expect("typed list");
        match list.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => params = params.continue_token(&c),
            None => break,
        }
    }
    (pages, bytes, raw_ms, started.elapsed().as_secs_f64() * 1e3)
}

fn mib(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}

fn print_synced(label: &str, runs: &[Synced]) {
    let col = |f: fn(&Synced) -> f64| stats(&runs.iter().map(f).collect::<Vec<_>>());
    let ms = |f: fn(&Synced) -> f64| {
        let (m, lo, hi) = col(f);
        format!("{m:.0} ({lo:.0}-{hi:.0})")
    };
    let mem = |f: fn(&Synced) -> f64| {
        let (m, lo, hi) = col(f);
        format!("{} ({:.1}-{:.1})", mib(m), lo / 1024.0, hi / 1024.0)
    };
    println!(
        "{label:<16} | {:>6.0} | {:>5.0} | {:>16} | {:>13} | {:>13} | {:>13} | {:>13} | {:>22} | {:>22}",
        col(|s| s.pods).0,
        col(|s| s.sas).0,
        ms(|s| s.ready_ms),
        ms(|s| s.log_pods_ms),
        ms(|s| s.metric_pods_ms),
        ms(|s| s.log_sas_ms),
        ms(|s| s.metric_sas_ms),
        mem(|s| s.rss as f64),
        mem(|s| s.hwm as f64),
    );
}

async fn part2() {
    println!(
        "== Part 2: {SEED_PODS} pods in {SEED_NAMESPACES} namespaces, {SEED_SAS_PER_NS} service \
         accounts each; {SYNC_REPS} fresh `ca server --kube` per cluster state =="
    );
    let k = KubeCluster::start().await;
    let mut empty = Vec::new();
    let mut follower = None;
    for r in 0..SYNC_REPS {
        let (ca, s) = start_and_sync(&k, &format!("empty-{r}")).await;
        empty.push(s);
        // The first stays up, to follow the seeding through its watches.
        if r == 0 {
            follower = Some(ca);
        }
    }
    let follower = follower.unwrap();
    let follower_before = rss_kib(follower.pid());

    let started = Instant::now();
    seed(&k.fake);
    let seeded = started.elapsed();
    let started = Instant::now();
    loop {
        let pods = metric(follower.ops, "workload_ca_kube_cache_objects", "pods").await;
        if pods >= SEED_PODS as f64 {
            break;
        }
        assert!(
            started.elapsed() < READY_LIMIT,
            "the running server holds {pods} pods after {READY_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let caught_up = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let follower_after = rss_kib(follower.pid());

    let mut full = Vec::new();
    for r in 0..SYNC_REPS {
        let (_ca, s) = start_and_sync(&k, &format!("full-{r}")).await;
        full.push(s);
    }

    let (pages, bytes, raw_ms, typed_ms) = list_cost(&k.fake).await;

    println!(
        "   seeding the fake took {:.2} s; a server already running held every pod {:.2} s after the seeding ended",
        seeded.as_secs_f64(),
        caught_up.as_secs_f64()
    );
    println!();
    println!(
        "{:<16} | {:>6} | {:>5} | {:>16} | {:>13} | {:>13} | {:>13} | {:>13} | {:>22} | {:>22}",
        "cluster",
        "pods",
        "SAs",
        "to /readyz ms",
        "pods log ms",
        "pods gauge ms",
        "SAs log ms",
        "SAs gauge ms",
        "RSS after sync",
        "peak RSS (VmHWM)"
    );
    println!("{}", "-".repeat(16 + 6 + 5 + 16 + 13 * 4 + 22 * 2 + 3 * 9));
    print_synced("empty", &empty);
    print_synced(&format!("{SEED_PODS} pods"), &full);
    let rss = |v: &[Synced]| stats(&v.iter().map(|s| s.rss as f64).collect::<Vec<_>>()).0;
    let grown = rss(&full) - rss(&empty);
    println!(
        "\n{SEED_PODS} pods cost {} of RSS to a server syncing from empty ({:.0} bytes a pod, medians); \
         a server that was running when they came: {} -> {} (+{})",
        mib(grown),
        grown * 1024.0 / SEED_PODS as f64,
        mib(follower_before as f64),
        mib(follower_after as f64),
        mib(follower_after as f64 - follower_before as f64),
    );
    println!(
        "the same list from this process: {pages} pages, {} of JSON: {raw_ms:.0} ms as text (the fake serving), \
         {typed_ms:.0} ms decoded as k8s_openapi Pods (the server decodes only what its checks read)",
        mib(bytes as f64 / 1024.0)
    );
    drop(follower);
}

#[tokio::main]
async fn main() {
    let started = Instant::now();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!("{cores} cores, load average {} at the start", loadavg());
    part1().await;
    part2().await;
    println!(
        "\n(total {:.0} s, load average {} at the end)",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
}
