//! What a run measured: counts, latencies, CPU and memory, the floor, and
//! how they print.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use super::Mode;
use super::floor::Floor;

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    /// Percentiles of latencies in microseconds (sorted in place).
    pub fn of(micros: &mut [u32]) -> Self {
        micros.sort_unstable();
        let at = |p: f64| {
            if micros.is_empty() {
                return 0.0;
            }
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss
            )]
            let i = ((micros.len() as f64 * p).ceil() as usize).clamp(1, micros.len()) - 1;
            micros.get(i).map_or(0.0, |m| f64::from(*m) / 1e3)
        };
        Self {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// The CA's own figures, when it runs here.
#[derive(Debug, Clone, Serialize)]
pub struct ServerFigures {
    pub pid: u32,
    pub cpu_us_per_cert: Option<f64>,
    /// The process's peak resident memory (`VmHWM`) at the end of the run.
    pub peak_rss_bytes: Option<u64>,
}

/// A run's report (`--json` prints it as is).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The load shape measured.
    pub mode: Mode,
    /// Calls completed in the measured window (successes and errors).
    pub requests: u64,
    /// Successful calls (a certificate received).
    pub ok: u64,
    /// Failed calls by cause (`grpc Unauthenticated`, `tls: ...`).
    pub errors: BTreeMap<String, u64>,
    /// The measured window (burst: from firing to the last answer).
    pub seconds: f64,
    /// Successful calls per second of the window.
    pub certs_per_sec: f64,
    /// Latency of the measured calls (successes and errors).
    pub latency_ms: Latency,
    /// The client's own CPU per certificate (this process).
    pub client_cpu_us_per_cert: Option<f64>,
    /// The CA's own figures, when it runs here.
    pub server: Option<ServerFigures>,
    /// The unavoidable work per certificate, measured here.
    pub floor: Option<Floor>,
    /// The server's CPU per certificate over the floor.
    pub floor_ratio: Option<f64>,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Long-lived connections (warm).
    pub connections: usize,
    /// Identities (tokens and CSRs) the calls cycle through.
    pub identities: usize,
    /// Client source addresses (cold, burst).
    pub sources: usize,
    /// Responses decoded and checked: chain to the root, SPIFFE ID.
    pub verified: usize,
    /// TLS handshakes that resumed a session (cold with --resume).
    pub resumed: u64,
}

impl Report {
    /// Sets the floor and the ratio to it.
    pub fn set_floor(&mut self, floor: Option<Floor>) {
        self.floor = floor;
        self.floor_ratio = floor
            .zip(self.server.as_ref().and_then(|s| s.cpu_us_per_cert))
            .filter(|(f, _)| f.per_cert_us() > 0.0)
            .map(|(f, cpu)| cpu / f.per_cert_us());
    }

    /// The human report on stdout.
    pub fn print_human(&self) {
        let mode = match self.mode {
            Mode::Warm => "warm",
            Mode::Cold => "cold",
            Mode::Burst => "burst",
            Mode::Agent => "agent",
            Mode::Soak => "soak",
        };
        let errors: u64 = self.errors.values().sum();
        let mut out = String::new();
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "ca bench {mode}: {} certificates in {:.2} s = {:.0} certs/s, {errors} errors",
            self.ok, self.seconds, self.certs_per_sec
        );
        let conns = match self.mode {
            Mode::Warm => format!("{} connections", self.connections),
            Mode::Cold => "a new connection per call".into(),
            Mode::Burst | Mode::Agent | Mode::Soak => "a connection each".into(),
        };
        let _ = writeln!(
            out,
            "  load      : {} in flight, {conns}, {} identities{}",
            self.concurrency,
            self.identities,
            if self.sources > 0 {
                format!(", {} source addresses", self.sources)
            } else {
                String::new()
            }
        );
        let l = self.latency_ms;
        let _ = writeln!(
            out,
            "  latency   : p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            l.p50, l.p90, l.p99, l.max
        );
        for (cause, n) in &self.errors {
            let _ = writeln!(out, "  error     : {n} x {cause}");
        }
        if let Some(s) = &self.server {
            let cpu = s
                .cpu_us_per_cert
                .map_or("?".into(), |c| format!("{c:.1} us"));
            let rss = s
                .peak_rss_bytes
                .map_or("?".into(), |b| format!("{:.1} MiB", mib(b)));
            let _ = writeln!(
                out,
                "  server    : CPU {cpu} per certificate, peak RSS {rss} (pid {})",
                s.pid
            );
        }
        if let Some(c) = self.client_cpu_us_per_cert {
            let _ = writeln!(
                out,
                "  client    : CPU {c:.1} us per certificate (this process)"
            );
        }
        if let Some(f) = &self.floor {
            let _ = writeln!(
                out,
                "  floor     : {:.1} us = CSR verify {:.1} + token verify {:.1} + sign {:.1} + PEM {:.1}",
                f.total_us, f.csr_verify_us, f.token_verify_us, f.sign_us, f.encode_us
            );
            if let Some(c) = &f.connection {
                let _ = writeln!(
                    out,
                    "  + handshake: {:.1} us per new connection = key exchange (X25519) {:.1} + CertificateVerify (P-256) {:.1}",
                    c.total_us, c.key_exchange_us, c.handshake_sign_us
                );
            }
        }
        if let Some(r) = self.floor_ratio {
            let _ = writeln!(
                out,
                "  vs floor  : server CPU per certificate = {r:.2} x the floor{}",
                if self.floor.is_some_and(|f| f.connection.is_some()) {
                    " (with the handshake)"
                } else {
                    ""
                }
            );
        }
        if self.resumed > 0 {
            let _ = writeln!(out, "  resumed   : {} TLS sessions", self.resumed);
        }
        let _ = writeln!(
            out,
            "  verified  : {} answers checked (chain to the root, SPIFFE ID)",
            self.verified
        );
        print!("{out}");
    }
}

#[allow(clippy::cast_precision_loss)]
fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Counters the workers bump and the progress line reads: successes,
/// errors, and a coarse latency histogram (bucket `i` holds latencies
/// below `2^(i/4)` microseconds).
pub(super) struct Live {
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

const BUCKETS: usize = 128;

impl Default for Live {
    fn default() -> Self {
        Self {
            ok: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Live {
    pub(super) fn record(&self, ok: bool, latency: Duration) {
        if ok {
            self.ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let us = latency.as_micros().max(1);
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let i = ((us as f64).log2() * 4.0) as usize;
        if let Some(b) = self.buckets.get(i.min(BUCKETS - 1)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> (u64, u64, [u64; BUCKETS]) {
        (
            self.ok.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            self.buckets.each_ref().map(|b| b.load(Ordering::Relaxed)),
        )
    }
}

/// Prints a progress line on stderr every second while `live` runs, when
/// stderr is a terminal; returns the task to abort at the end.
pub(super) fn progress(
    name: &'static str,
    live: std::sync::Arc<Live>,
) -> Option<tokio::task::JoinHandle<()>> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    Some(tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut last = live.snapshot();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = live.snapshot();
            let ok = now.0 - last.0;
            let err = now.1 - last.1;
            let delta: Vec<u64> = now.2.iter().zip(&last.2).map(|(n, l)| n - l).collect();
            let total: u64 = delta.iter().sum();
            let mut seen = 0;
            let mut p99_us = 0.0;
            for (i, n) in delta.iter().enumerate() {
                seen += n;
                #[allow(clippy::cast_precision_loss)]
                if total > 0 && seen as f64 >= total as f64 * 0.99 {
                    p99_us = 2f64.powf((i + 1) as f64 / 4.0);
                    break;
                }
            }
            eprint!(
                "\r[{name}] {:>5.0} s  {ok:>7} certs/s  errors {err:<6} p99 < {:.2} ms   ",
                start.elapsed().as_secs_f64(),
                p99_us / 1e3
            );
            last = now;
        }
    }))
}

/// Ends a progress line.
pub(super) fn end_progress(task: Option<tokio::task::JoinHandle<()>>) {
    if let Some(t) = task {
        t.abort();
        eprintln!();
    }
}
