//! The HTTP/1.1 load of `cargo bench --bench cfssl`: keep-alive
//! connections, one request in flight on each, pre-encoded bodies, every
//! answer checked, latency and /proc CPU over a measured window.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The figures of one run, on either side.
#[derive(Default, Clone)]
pub struct Figures {
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub seconds: f64,
    pub certs_per_sec: f64,
    /// p50, p90, p99, max, in milliseconds.
    pub latency_ms: [f64; 4],
    pub server_cpu_us: f64,
    pub client_cpu_us: f64,
    pub server_peak_rss: u64,
}

/// What became of one request.
#[derive(Clone, Copy, PartialEq)]
enum Outcome {
    Ok,
    Status(u16),
    /// 200 without `"success":true` and a certificate.
    BadBody,
    /// Connect, write or read failure.
    Io,
}

impl Outcome {
    fn label(self) -> String {
        match self {
            Outcome::Ok => "ok".into(),
            Outcome::Status(s) => format!("http {s}"),
            Outcome::BadBody => "no certificate".into(),
            Outcome::Io => "connection".into(),
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Each request's completion time, latency and outcome on one connection,
/// and the first two answers kept as samples (CSR index, body).
type ConnLog = (Vec<(Instant, Duration, Outcome)>, Vec<(usize, Bytes)>);

async fn connect(addr: SocketAddr) -> std::io::Result<http1::SendRequest<Full<Bytes>>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One keep-alive connection sending requests back to back until `stop`.
async fn connection(
    addr: SocketAddr,
    bodies: Arc<Vec<Bytes>>,
    first: usize,
    stride: usize,
    stop: Arc<AtomicBool>,
) -> ConnLog {
    let host = addr.to_string();
    let mut log = Vec::with_capacity(1 << 12);
    let mut samples = Vec::new();
    let mut sender: Option<http1::SendRequest<Full<Bytes>>> = None;
    let mut i = first;
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        if sender.as_mut().is_none_or(|s| s.is_closed()) {
            match connect(addr).await {
                Ok(s) => sender = Some(s),
                Err(_) => {
                    log.push((Instant::now(), t0.elapsed(), Outcome::Io));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else { continue };
        let idx = i % bodies.len();
        i += stride;
        let req = hyper::Request::post("/api/v1/cfssl/sign")
            .header(hyper::header::HOST, &host)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bodies[idx].clone()))
            .unwrap();
        let t0 = Instant::now();
        let outcome = match s.ready().await {
            Err(_) => Err(()),
            Ok(()) => match s.send_request(req).await {
                Err(_) => Err(()),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    match resp.into_body().collect().await {
                        Err(_) => Err(()),
                        Ok(body) => Ok((status, body.to_bytes())),
                    }
                }
            },
        };
        let outcome = match outcome {
            Err(()) => {
                sender = None;
                Outcome::Io
            }
            Ok((200, body)) => {
                if contains(&body, br#""success":true"#) && contains(&body, b"BEGIN CERTIFICATE") {
                    if samples.len() < 2 {
                        samples.push((idx, body));
                    }
                    Outcome::Ok
                } else {
                    Outcome::BadBody
                }
            }
            Ok((status, _)) => Outcome::Status(status),
        };
        log.push((Instant::now(), t0.elapsed(), outcome));
    }
    (log, samples)
}

/// utime + stime of a process (`self` for this one), in seconds.
fn cpu_secs(pid: &str, ticks_per_sec: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces: fields count from after its ')'.
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .collect();
    (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) as f64 / ticks_per_sec
}

fn clock_ticks() -> f64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// Nearest-rank percentile of sorted latencies, in milliseconds.
fn pct(sorted: &[Duration], p: f64) -> f64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e3
}

/// Drives the server at `addr` (process `server_pid`) with `concurrency`
/// connections, one request in flight on each, for `warmup` then a
/// measured `duration`.
pub async fn load_cfssl(
    addr: SocketAddr,
    server_pid: u32,
    bodies: &Arc<Vec<Bytes>>,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> (Figures, Vec<(usize, Bytes)>) {
    let ticks = clock_ticks();
    let pid = server_pid.to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..concurrency)
        .map(|c| {
            tokio::spawn(connection(
                addr,
                bodies.clone(),
                c,
                concurrency,
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(warmup).await;
    let (m0, server0, client0) = (
        Instant::now(),
        cpu_secs(&pid, ticks),
        cpu_secs("self", ticks),
    );
    tokio::time::sleep(duration).await;
    let (m1, server1, client1) = (
        Instant::now(),
        cpu_secs(&pid, ticks),
        cpu_secs("self", ticks),
    );
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    let mut fig = Figures::default();
    let mut samples = Vec::new();
    for t in tasks {
        let (log, mut s) = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("a connection did not finish within 60 s of the end")
            .unwrap();
        samples.append(&mut s);
        for (done, latency, outcome) in log {
            if done < m0 || done > m1 {
                continue;
            }
            if outcome == Outcome::Ok {
                fig.ok += 1;
                lat.push(latency);
            } else {
                *fig.errors.entry(outcome.label()).or_default() += 1;
            }
        }
    }
    if fig.ok == 0 {
        return (fig, samples);
    }
    lat.sort();
    fig.seconds = (m1 - m0).as_secs_f64();
    fig.certs_per_sec = fig.ok as f64 / fig.seconds;
    fig.latency_ms = [
        pct(&lat, 0.50),
        pct(&lat, 0.90),
        pct(&lat, 0.99),
        pct(&lat, 1.0),
    ];
    fig.server_cpu_us = (server1 - server0) / fig.ok as f64 * 1e6;
    fig.client_cpu_us = (client1 - client0) / fig.ok as f64 * 1e6;
    fig.server_peak_rss = peak_rss(server_pid);
    (fig, samples)
}
