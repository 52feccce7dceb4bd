//! The three load shapes against `CreateCertificate`, and checking what
//! came back.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use bytes::Bytes;
use prost::Message;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::client::{self, CALL_TIMEOUT, CallError, Tls};
use super::procfs;
use super::report::{self, Latency, Live, Report, ServerFigures};
use super::target::Target;
use super::work::Work;
use super::{LoadArgs, Mode};
use crate::proto::istio::IstioCertificateResponse;

/// What one worker saw.
#[derive(Default)]
struct Tally {
    ok: u64,
    errors: BTreeMap<String, u64>,
    /// Latencies of measured calls, microseconds.
    micros: Vec<u32>,
    /// Answers kept for verification: the call's index and its message.
    kept: Vec<(usize, Bytes)>,
}

impl Tally {
    fn record(
        &mut self,
        result: Result<Bytes, CallError>,
        index: usize,
        latency: Duration,
        live: &Live,
    ) {
        let ok = result.is_ok();
        live.record(ok, latency);
        self.micros
            .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
        match result {
            Ok(body) => {
                self.ok += 1;
                if !body.is_empty() {
                    self.kept.push((index, body));
                }
            }
            Err(e) => *self.errors.entry(e.label()).or_default() += 1,
        }
    }

    fn merge(&mut self, other: Self) {
        self.ok += other.ok;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.micros.extend(other.micros);
        self.kept.extend(other.kept);
    }
}

/// Whether a worker should keep this answer's body (the first `verify`).
fn want_body(keep: &AtomicUsize, verify: usize) -> bool {
    keep.load(Ordering::Relaxed) < verify && keep.fetch_add(1, Ordering::Relaxed) < verify
}

/// CPU seconds of the server and of this process at one moment.
#[derive(Clone, Copy)]
struct Cpu {
    server: Option<f64>,
    client: Option<f64>,
}

impl Cpu {
    fn now(server_pid: Option<u32>) -> Self {
        Self {
            server: server_pid.and_then(|p| procfs::cpu_seconds(Some(p))),
            client: procfs::cpu_seconds(None),
        }
    }
}

/// Shared state of a timed run (warm, cold).
struct Window {
    measure_from: Instant,
    stop: AtomicBool,
    /// Measured calls completed so far (for `--requests`).
    measured: AtomicU64,
    enough: Notify,
    limit: Option<u64>,
}

impl Window {
    fn measuring(&self, now: Instant) -> bool {
        now >= self.measure_from && !self.stop.load(Ordering::Relaxed)
    }

    /// Counts a measured call; signals the end when `--requests` are done.
    fn count(&self) {
        let n = self.measured.fetch_add(1, Ordering::Relaxed) + 1;
        if self.limit.is_some_and(|l| n >= l) {
            self.enough.notify_one();
        }
    }
}

/// Client source addresses on loopback: 127.1.x.y, y in 1..=250.
fn sources(target: SocketAddr, asked: Option<usize>, default: usize) -> Vec<Option<IpAddr>> {
    let n = asked.unwrap_or(if target.ip().is_loopback() && target.is_ipv4() {
        default
    } else {
        0
    });
    if n == 0 {
        return vec![None];
    }
    (0..n)
        .map(|i| {
            let hi = u8::try_from(i / 250).unwrap_or(u8::MAX);
            let lo = u8::try_from(i % 250 + 1).unwrap_or(1);
            Some(IpAddr::V4(Ipv4Addr::new(127, 1, hi, lo)))
        })
        .collect()
}

/// Runs `controller` over a window: warm-up, then the measured part, ended
/// by `--duration` or `--requests`. Returns the window's length and the
/// CPU used in it.
async fn clock(
    window: Arc<Window>,
    duration: Duration,
    server_pid: Option<u32>,
) -> (Duration, Cpu, Cpu) {
    tokio::time::sleep_until(window.measure_from).await;
    let start = Instant::now();
    let before = Cpu::now(server_pid);
    if window.limit.is_some() {
        window.enough.notified().await;
    } else {
        tokio::time::sleep(duration).await;
    }
    window.stop.store(true, Ordering::Relaxed);
    let after = Cpu::now(server_pid);
    (start.elapsed(), before, after)
}

/// Warm: `--connections` long-lived connections carry `--concurrency`
/// calls in flight.
///
/// # Errors
/// A connection that cannot be opened.
pub(super) async fn warm(
    target: &Target,
    work: &Arc<Work>,
    load: &LoadArgs,
) -> anyhow::Result<Report> {
    let addr = client::resolve(&target.addr).await?;
    let tls = Tls::new(&target.root_cert, &target.server_name, false)?;
    let mut conns = Vec::new();
    for _ in 0..load.connections {
        conns.push(
            client::connect(addr, None, &tls)
                .await
                .map_err(|e| anyhow::anyhow!("connecting to {addr}: {}", e.label()))?,
        );
    }
    let k = conns.len();
    timed(Mode::Warm, target, work, load, (k, 0), |w| {
        // In bounds: `w % k` with k the number of connections.
        #[allow(clippy::indexing_slicing)]
        let (send, work) = (conns[w % k].clone(), work.clone());
        move |i, body| {
            let (mut send, work) = (send.clone(), work.clone());
            async move { client::call(&mut send, &work.uri, work.call(i), body).await }
        }
    })
    .await
}

/// Cold: every call on a new TCP + TLS + HTTP/2 connection, closed after
/// its answer.
///
/// # Errors
/// A bad root file or address.
pub(super) async fn cold(
    target: &Target,
    work: &Arc<Work>,
    load: &LoadArgs,
) -> anyhow::Result<Report> {
    let addr = client::resolve(&target.addr).await?;
    let tls = Tls::new(&target.root_cert, &target.server_name, load.resume)?;
    let sources = sources(addr, load.sources, 16);
    let n = sources.iter().flatten().count();
    let mut report = timed(Mode::Cold, target, work, load, (0, n), |w| {
        // In bounds: modulo the number of sources.
        #[allow(clippy::indexing_slicing)]
        let (source, tls, work) = (sources[w % sources.len()], tls.clone(), work.clone());
        move |i, body| {
            let (tls, work) = (tls.clone(), work.clone());
            async move { one_connection(addr, source, &tls, &work, i, body).await }
        }
    })
    .await?;
    report.resumed = tls.resumed.load(Ordering::Relaxed);
    Ok(report)
}

/// `--concurrency` workers over a warm-up and a measured window. Worker
/// `w` makes call `i` (keeping its body when told) with `caller(w)`.
async fn timed<C, F, Fut>(
    mode: Mode,
    target: &Target,
    work: &Arc<Work>,
    load: &LoadArgs,
    (connections, sources): (usize, usize),
    caller: C,
) -> anyhow::Result<Report>
where
    C: Fn(usize) -> F,
    F: FnMut(usize, bool) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Bytes, CallError>> + Send,
{
    let window = Arc::new(Window {
        measure_from: Instant::now() + load.warmup,
        stop: AtomicBool::new(false),
        measured: AtomicU64::new(0),
        enough: Notify::new(),
        limit: load.requests,
    });
    let live = Arc::new(Live::default());
    let next = Arc::new(AtomicUsize::new(0));
    let keep = Arc::new(AtomicUsize::new(0));
    let name = match mode {
        Mode::Warm => "warm",
        _ => "cold",
    };
    let progress = report::progress(name, live.clone());
    let clock = tokio::spawn(clock(window.clone(), load.duration(), target.server_pid));
    let mut workers = Vec::new();
    for w in 0..load.concurrency {
        let mut call = caller(w);
        let (window, live, next, keep) = (window.clone(), live.clone(), next.clone(), keep.clone());
        let (verify, calls) = (load.verify, work.calls.len());
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while !window.stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed) % calls;
                let body = want_body(&keep, verify);
                let t = Instant::now();
                let r = match tokio::time::timeout(CALL_TIMEOUT, call(i, body)).await {
                    Ok(r) => r,
                    Err(_) => Err(CallError::Timeout),
                };
                let end = Instant::now();
                if window.measuring(end) {
                    window.count();
                    tally.record(r, i, end - t, &live);
                } else if let (Ok(b), true) = (r, body) {
                    // A warm-up answer may still be verified.
                    tally.kept.push((i, b));
                }
            }
            tally
        }));
    }
    let (elapsed, before, after) = clock.await.context("the run's clock failed")?;
    let mut total = Tally::default();
    for w in workers {
        total.merge(w.await.context("a load task failed")?);
    }
    report::end_progress(progress);
    build(
        mode,
        target,
        work,
        load,
        connections,
        sources,
        total,
        elapsed,
        before,
        after,
    )
}

async fn one_connection(
    addr: SocketAddr,
    source: Option<IpAddr>,
    tls: &Tls,
    work: &Work,
    i: usize,
    body: bool,
) -> Result<Bytes, CallError> {
    let mut send = client::connect(addr, source, tls).await?;
    client::call(&mut send, &work.uri, work.call(i), body).await
}

/// Burst: every identity at once, each on its own new connection; the
/// time from firing until the last holds its certificate.
///
/// # Errors
/// More identities than this process may open files for.
pub(super) async fn burst(
    target: &Target,
    work: &Arc<Work>,
    load: &LoadArgs,
) -> anyhow::Result<Report> {
    let addr = client::resolve(&target.addr).await?;
    let tls = Tls::new(&target.root_cert, &target.server_name, false)?;
    let n = work.calls.len();
    if let Some(limit) = procfs::open_files_limit() {
        let need = u64::try_from(n).unwrap_or(u64::MAX).saturating_add(64);
        if need > limit {
            bail!(
                "a burst of {n} needs about {need} open files; this process may open {limit} (raise `ulimit -n`)"
            );
        }
    }
    let sources = Arc::new(sources(addr, load.sources, n.div_ceil(48)));
    let live = Arc::new(Live::default());
    let keep = Arc::new(AtomicUsize::new(0));
    let progress = report::progress("burst", live.clone());
    let before = Cpu::now(target.server_pid);
    let fired = Instant::now();
    let mut workers = Vec::with_capacity(n);
    for i in 0..n {
        // In bounds: modulo the number of sources.
        #[allow(clippy::indexing_slicing)]
        let source = sources[i % sources.len()];
        let (live, keep, work, tls) = (live.clone(), keep.clone(), work.clone(), tls.clone());
        let verify = load.verify;
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let body = want_body(&keep, verify);
            let r = match tokio::time::timeout(
                CALL_TIMEOUT,
                one_connection(addr, source, &tls, &work, i, body),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(CallError::Timeout),
            };
            // Latency counts from the moment the burst fired.
            tally.record(r, i, fired.elapsed(), &live);
            tally
        }));
    }
    let mut total = Tally::default();
    for w in workers {
        total.merge(w.await.context("a burst task failed")?);
    }
    let elapsed = fired.elapsed();
    let after = Cpu::now(target.server_pid);
    report::end_progress(progress);
    let k = sources.iter().flatten().count();
    build(
        Mode::Burst,
        target,
        work,
        load,
        0,
        k,
        total,
        elapsed,
        before,
        after,
    )
}

#[allow(clippy::too_many_arguments)]
fn build(
    mode: Mode,
    target: &Target,
    work: &Work,
    load: &LoadArgs,
    connections: usize,
    sources: usize,
    mut total: Tally,
    elapsed: Duration,
    before: Cpu,
    after: Cpu,
) -> anyhow::Result<Report> {
    let verified = verify(target, work, &total.kept, &mut total.errors, load.verify)?;
    let ok = total.ok;
    #[allow(clippy::cast_precision_loss)]
    let per_cert = |a: Option<f64>, b: Option<f64>| {
        a.zip(b)
            .filter(|_| ok > 0)
            .map(|(a, b)| (b - a).max(0.0) * 1e6 / ok as f64)
    };
    let server = target.server_pid.map(|pid| ServerFigures {
        pid,
        cpu_us_per_cert: per_cert(before.server, after.server),
        peak_rss_bytes: procfs::memory_bytes(pid, "VmHWM"),
    });
    let errors: u64 = total.errors.values().sum();
    let secs = elapsed.as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    Ok(Report {
        mode,
        requests: ok + errors,
        ok,
        errors: total.errors,
        seconds: secs,
        certs_per_sec: if secs > 0.0 { ok as f64 / secs } else { 0.0 },
        latency_ms: Latency::of(&mut total.micros),
        client_cpu_us_per_cert: per_cert(before.client, after.client),
        server,
        floor: None,
        floor_ratio: None,
        concurrency: if mode == Mode::Burst {
            work.calls.len()
        } else {
            load.concurrency
        },
        connections,
        identities: work.calls.len(),
        sources,
        verified,
        resumed: 0,
    })
}

/// Decodes and checks kept answers: the leaf is for the CSR's key, names
/// exactly the identity of the call's token, and chains (rustls-webpki) to
/// the roots the run trusts. A bad answer counts as an error.
fn verify(
    target: &Target,
    work: &Work,
    kept: &[(usize, Bytes)],
    errors: &mut BTreeMap<String, u64>,
    limit: usize,
) -> anyhow::Result<usize> {
    let pem = std::fs::read(&target.root_cert)
        .with_context(|| format!("reading {}", target.root_cert.display()))?;
    let roots: Vec<Vec<u8>> = pem::parse_many(&pem)?
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect();
    let anchors: Vec<&[u8]> = roots.iter().map(Vec::as_slice).collect();
    let now = SystemTime::now();
    let mut checked = 0;
    for (i, body) in kept.iter().take(limit) {
        let call = work.call(*i);
        let outcome = check_answer(body, call, work, &anchors, now);
        checked += 1;
        if let Err(why) = outcome {
            *errors.entry(format!("bad certificate: {why}")).or_default() += 1;
        }
    }
    Ok(checked)
}

pub(super) fn check_answer(
    body: &[u8],
    call: &super::work::Prepared,
    work: &Work,
    anchors: &[&[u8]],
    now: SystemTime,
) -> Result<(), String> {
    let msg = body.get(5..).ok_or("short gRPC frame")?;
    let response =
        IstioCertificateResponse::decode(msg).map_err(|e| format!("undecodable: {e}"))?;
    let key = work.keys.get(call.key).ok_or("no key")?;
    let (cert, _) = crate::agent::workload::accept_chain(key, &response.cert_chain, now)
        .map_err(|e| e.to_string())?;
    if cert.identity.path() != call.path {
        return Err(format!(
            "names {} for a token of {}",
            cert.identity, call.path
        ));
    }
    let ders: Vec<Vec<u8>> = response
        .cert_chain
        .iter()
        .skip(1)
        .filter_map(|p| pem::parse(p).ok().map(pem::Pem::into_contents))
        .collect();
    crate::ca::bundle::verify_path(
        &cert.leaf_der,
        &ders,
        anchors,
        now,
        webpki::KeyUsage::client_auth(),
    )
    .map_err(|e| format!("does not chain to the trusted roots: {e}"))
}
