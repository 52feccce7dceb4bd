//! `ca bench agent`: S simulated Envoys on one real `ca agent`.
//!
//! Starts `ca agent` (this same binary) in sidecar mode against the target
//! CA, with a short certificate lifetime so that it rotates every few
//! seconds, its per-socket connection and stream caps raised to fit S, and
//! its JSON log read for the moment it obtains each certificate. Then opens
//! S SDS streams shaped like real Envoys' (S/2 proxies, each one Unix-socket
//! HTTP/2 connection with a stream for `default` and one for `ROOTCA`, the
//! first request on each carrying a ~61 KB node), or with
//! `--shape one-stream-per-connection` each stream on a connection of its
//! own, on a current-thread runtime of its own (so the client costs one core at most),
//! and holds them through R rotations. Per rotation: from the agent's "certificate
//! obtained" log time to each stream's receipt of the new certificate, and
//! the streams that missed it; the agent's RSS (idle, end, peak) and CPU
//! from /proc, and its own metrics page.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use tokio::sync::mpsc;

use super::Target;
use super::agent_proc::{self as proc, AgentProc, Obtained};
pub use super::agent_report::AgentReport;
use super::agent_report::{
    AgentFigures, AgentMetrics, ClientFigures, Machine, OpenFigures, PushSummary, RotationFigures,
    TARGET_PUSH_MS, TARGET_RSS_BYTES, Targets, spread,
};
pub use super::agent_streams::Shape;
use super::agent_streams::{self as streams, ENVOY_NODE_BYTES, Event, Plan};
use super::procfs;
use super::target::TempDir;

/// Options of `ca bench agent`.
#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// SDS streams (in the envoy shape, half as many proxies).
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// How the streams sit on connections: `envoy` (one connection per
    /// proxy, one stream per resource name, as real Envoys) or
    /// `one-stream-per-connection` (the worst case: a connection per
    /// stream, each subscribed to both names).
    #[arg(long, value_enum, default_value_t = Shape::Envoy)]
    pub shape: Shape,
    /// Encoded size of the `node` in each stream's first request (Envoy's,
    /// with its extensions, is about 61 KB); later requests carry none.
    #[arg(long, default_value_t = ENVOY_NODE_BYTES)]
    pub node_bytes: usize,
    /// Certificate rotations to measure.
    #[arg(long, default_value_t = 5)]
    pub rotations: usize,
    /// Lifetime of the agent's certificates; it renews at half of it (+-10%).
    #[arg(long, default_value = "6s", value_parser = crate::cli::parse_duration)]
    pub cert_ttl: Duration,
    /// Time after a rotation by which a stream that has not received it
    /// counts as having missed it.
    #[arg(long, default_value = "5s", value_parser = crate::cli::parse_duration)]
    pub push_timeout: Duration,
    /// Connections being opened at once (a connection's streams then send their first requests without waiting for one another).
    #[arg(long, default_value_t = 64)]
    pub open_parallel: usize,
    /// Threads of the runtime holding the streams (1: current-thread).
    #[arg(long, default_value_t = 1)]
    pub stream_threads: usize,
    /// An extra flag for the agent (repeatable), e.g. `--agent-arg=--key-algorithm=rsa-2048`.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    pub agent_args: Vec<String>,
}

/// Descriptors besides the streams' (runtime, pipes, logs, the CA's
/// connection).
const FD_MARGIN: u64 = 64;
/// How long the agent may take to obtain its first certificate.
const FIRST_CERT_WAIT: Duration = Duration::from_secs(30);
/// Pause after the last rotation before reading the agent's memory and
/// metrics (its last ACKs arrive).
const SETTLE: Duration = Duration::from_millis(500);
/// Live progress period (on a terminal).
const TICK: Duration = Duration::from_millis(250);

/// Runs the bench against `target`. `json` only tells that the report
/// will be printed as JSON (the progress line still goes to a terminal's
/// stderr).
///
/// # Errors
/// Bad arguments, too few file descriptors, the agent not starting or
/// dying, streams that cannot open, or no rotation in time.
pub async fn run(args: &AgentArgs, target: &Target, json: bool) -> anyhow::Result<AgentReport> {
    let _ = json;
    if args.streams == 0 || args.rotations == 0 {
        bail!("--streams and --rotations must be at least 1");
    }
    if args.cert_ttl < Duration::from_secs(2) {
        bail!("--cert-ttl must be at least 2s (the agent renews at half of it)");
    }
    check_fds(args.shape.connections(args.streams))?;
    let dir = TempDir::new("ca-bench-agent")?;
    let token = dir.path().join("token");
    write_private(&token, &target.tokens.token("bench", "agent")?)?;
    let socket = dir.path().join("sds.sock");
    let (flags, raised) = agent_flags(args, target, &token, &socket);
    let exe = std::env::current_exe().context("locating the ca binary")?;
    let job = Job {
        args: args.clone(),
        exe,
        flags,
        raised,
        socket,
    };
    // The streams live on a runtime of their own: one thread by default,
    // whatever runtime the caller has.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let threads = args.stream_threads.max(1);
    std::thread::Builder::new()
        .name("bench-agent".into())
        .spawn(move || {
            let rt = if threads == 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    .enable_all()
                    .build()
            };
            let result = match rt {
                Ok(rt) => rt.block_on(job.run()),
                Err(e) => Err(anyhow::anyhow!("starting the client runtime: {e}")),
            };
            let _ = tx.send(result);
        })
        .context("starting the client thread")?;
    let report = rx.await.context("the client thread died")?;
    drop(dir);
    report
}

/// How long to wait for the agent's last log lines after the last push.
const LOG_GRACE: Duration = Duration::from_millis(500);

fn check_fds(connections: usize) -> anyhow::Result<()> {
    let need = connections as u64 + FD_MARGIN;
    match procfs::open_files_limit() {
        Some(limit) if limit < need => bail!(
            "{connections} connections need about {need} open files in this process and in the agent, but the limit is {limit} (ulimit -n); raise it or use fewer --streams"
        ),
        Some(_) => Ok(()),
        None => Ok(()),
    }
}

fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// The agent's command line (after `agent`), and the flags that raise its
/// limits.
fn agent_flags(
    args: &AgentArgs,
    target: &Target,
    token: &std::path::Path,
    socket: &std::path::Path,
) -> (Vec<String>, Vec<String>) {
    let cap = (args.streams + 16).to_string();
    let raised = vec![
        format!("--sds-max-connections={cap}"),
        format!("--sds-max-streams={cap}"),
    ];
    let mut flags = vec![
        format!("--ca-addr={}", target.addr),
        format!("--ca-server-name={}", target.server_name),
        format!("--ca-root-cert={}", target.root_cert.display()),
        format!("--token-file={}", token.display()),
        format!("--sds-socket={}", socket.display()),
        "--ops-listen=127.0.0.1:0".into(),
        "--agent-name=bench-agent".into(),
        format!("--cert-ttl={}ms", args.cert_ttl.as_millis()),
    ];
    flags.extend(raised.iter().cloned());
    flags.extend(args.agent_args.iter().cloned());
    (flags, raised)
}

struct Job {
    args: AgentArgs,
    exe: PathBuf,
    flags: Vec<String>,
    raised: Vec<String>,
    socket: PathBuf,
}

/// A rotation being measured.
struct Rotation {
    serial: String,
    /// The agent's log time, once its line is read.
    agent_at: Option<SystemTime>,
    /// When the bench first learned of it (log line or push).
    seen: Instant,
    done: bool,
}

/// Everything the streams and the agent's log have told so far.
#[derive(Default)]
struct Seen {
    opened: usize,
    ended: Vec<(usize, String)>,
    /// Each stream's first version (not a rotation).
    initial: HashSet<String>,
    /// Per version, each stream's first receipt of it.
    receipts: HashMap<String, HashMap<usize, SystemTime>>,
    /// Log times per serial.
    logged: HashMap<String, SystemTime>,
    rotations: Vec<Rotation>,
}

impl Seen {
    fn event(&mut self, e: Event, all_open: bool, max_rotations: usize) {
        match e {
            Event::Opened => self.opened += 1,
            Event::Ended { stream, reason } => self.ended.push((stream, reason)),
            Event::Push {
                stream,
                version,
                at,
            } => {
                if !all_open {
                    self.initial.insert(version.clone());
                } else {
                    self.learn(&version, max_rotations);
                }
                self.receipts
                    .entry(version)
                    .or_default()
                    .entry(stream)
                    .or_insert(at);
            }
        }
    }

    fn obtained(&mut self, o: Obtained, max_rotations: usize) {
        self.logged.insert(o.serial.clone(), o.at);
        self.learn(&o.serial, max_rotations);
        if let Some(r) = self.rotations.iter_mut().find(|r| r.serial == o.serial) {
            r.agent_at = Some(o.at);
        }
    }

    /// A version no stream started with is a rotation.
    fn learn(&mut self, serial: &str, max_rotations: usize) {
        if self.initial.is_empty()
            || self.initial.contains(serial)
            || self.rotations.len() >= max_rotations
            || self.rotations.iter().any(|r| r.serial == serial)
        {
            return;
        }
        self.rotations.push(Rotation {
            serial: serial.to_owned(),
            agent_at: self.logged.get(serial).copied(),
            seen: Instant::now(),
            done: false,
        });
    }

    /// Marks rotations complete (every stream has it) or timed out.
    fn settle(&mut self, streams: usize, timeout: Duration) {
        for r in &mut self.rotations {
            let n = self.receipts.get(&r.serial).map_or(0, HashMap::len);
            if !r.done && (n >= streams || r.seen.elapsed() >= timeout) {
                r.done = true;
            }
        }
    }

    fn done(&self) -> usize {
        self.rotations.iter().filter(|r| r.done).count()
    }

    fn figures(&self, r: &Rotation, streams: usize) -> RotationFigures {
        let empty = HashMap::new();
        let first_by_stream = self.receipts.get(&r.serial).unwrap_or(&empty);
        let earliest = first_by_stream.values().min().copied();
        let (from, origin) = match (r.agent_at, earliest) {
            (Some(a), _) => ("agent_log", Some(a)),
            (None, e) => ("first_stream", e),
        };
        let ms: Vec<f64> = first_by_stream
            .values()
            .map(|at| {
                origin
                    .and_then(|o| at.duration_since(o).ok())
                    .unwrap_or_default()
                    .as_secs_f64()
                    * 1e3
            })
            .collect();
        let received = ms.len();
        let (first_ms, p50_ms, p99_ms, last_ms) = spread(ms);
        RotationFigures {
            serial: r.serial.clone(),
            from,
            received,
            missed: streams.saturating_sub(received),
            first_ms,
            p50_ms,
            p99_ms,
            last_ms,
        }
    }
}

/// CPU time of a process (`None`: this one), in ms.
fn cpu_ms(pid: Option<u32>) -> f64 {
    procfs::cpu_seconds(pid).map_or(0.0, |s| s * 1e3)
}

impl Job {
    async fn run(self) -> anyhow::Result<AgentReport> {
        let a = &self.args;
        let loadavg_start = procfs::loadavg();
        let progress = Progress::new();
        let (mut agent, mut obtained) = AgentProc::spawn(&self.exe, &self.flags)?;
        let pid = agent.pid.to_string();
        let mut seen = Seen::default();

        // Its first certificate, before any stream.
        let first = tokio::time::timeout(FIRST_CERT_WAIT, obtained.recv())
            .await
            .ok()
            .flatten();
        let Some(first) = first else {
            bail!(
                "the agent got no certificate within {FIRST_CERT_WAIT:?}:\n{}",
                agent.tail_text()
            );
        };
        seen.logged.insert(first.serial, first.at);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let idle_rss = procfs::memory_bytes(agent.pid, "VmRSS").unwrap_or(0);

        // Open the streams.
        let (ev_tx, mut events) = mpsc::unbounded_channel();
        let cpu_open0 = cpu_ms(Some(agent.pid));
        let opening = Instant::now();
        let plan = Plan {
            shape: a.shape,
            streams: a.streams,
            node_bytes: a.node_bytes,
            parallel: a.open_parallel,
        };
        let cert_streams = a.shape.cert_streams(a.streams);
        let held = streams::start(self.socket.clone(), plan, ev_tx);
        let mut tick = tokio::time::interval(TICK);
        while seen.opened + seen.ended.len() < a.streams {
            tokio::select! {
                Some(e) = events.recv() => seen.event(e, false, a.rotations),
                Some(o) = obtained.recv() => seen.obtained(o, a.rotations),
                _ = tick.tick() => {
                    self.alive(&mut agent)?;
                    progress.show(&format!("opening streams: {}/{}", seen.opened, a.streams));
                }
            }
        }
        if let Some((stream, reason)) = seen.ended.first() {
            bail!(
                "{} of {} streams could not open (stream {stream}: {reason}); the agent ran with {}\nagent log:\n{}",
                seen.ended.len(),
                a.streams,
                self.flags.join(" "),
                agent.tail_text()
            );
        }
        let open_seconds = opening.elapsed().as_secs_f64();
        let cpu_open = cpu_ms(Some(agent.pid)) - cpu_open0;

        // The rotations.
        let phase = Instant::now();
        let (agent_cpu0, client_cpu0) = (cpu_ms(Some(agent.pid)), cpu_ms(None));
        let quiet_limit = a.cert_ttl + a.push_timeout + Duration::from_secs(30);
        let mut last_news = Instant::now();
        while seen.done() < a.rotations {
            let known = seen.rotations.len();
            tokio::select! {
                Some(e) = events.recv() => seen.event(e, true, a.rotations),
                Some(o) = obtained.recv() => seen.obtained(o, a.rotations),
                _ = tick.tick() => {
                    self.alive(&mut agent)?;
                    progress.show(&self.rotation_line(&seen));
                }
            }
            if seen.rotations.len() > known {
                last_news = Instant::now();
            }
            seen.settle(cert_streams, a.push_timeout);
            if seen.rotations.len() < a.rotations && last_news.elapsed() > quiet_limit {
                bail!(
                    "no rotation for {quiet_limit:?} ({} of {} seen)\nagent log:\n{}",
                    seen.rotations.len(),
                    a.rotations,
                    agent.tail_text()
                );
            }
        }
        // Late log lines: the agent writes its log in batches (at most
        // 50 ms apart); a line's time stamp is when it happened, not when
        // it was written.
        let grace = tokio::time::Instant::now() + LOG_GRACE;
        while let Ok(Some(o)) = tokio::time::timeout_at(grace, obtained.recv()).await {
            seen.obtained(o, a.rotations);
        }
        let phase_seconds = phase.elapsed().as_secs_f64();
        let agent_cpu = cpu_ms(Some(agent.pid)) - agent_cpu0;
        let client_cpu = cpu_ms(None) - client_cpu0;
        // The last ACKs reach the agent's metrics.
        tokio::time::sleep(SETTLE).await;
        let rss = procfs::memory_bytes(agent.pid, "VmRSS").unwrap_or(0);
        let peak = procfs::memory_bytes(agent.pid, "VmHWM").unwrap_or(0);
        let metrics = match agent.ops {
            Some(ops) => proc::metrics_page(ops)
                .await
                .ok()
                .map(|p| agent_metrics(&p)),
            None => None,
        };
        progress.clear();
        drop(held);
        drop(agent);

        let per_rotation: Vec<RotationFigures> = seen
            .rotations
            .iter()
            .map(|r| seen.figures(r, cert_streams))
            .collect();
        let max = per_rotation.iter().map(|r| r.last_ms).fold(0.0, f64::max);
        let missed_pushes = per_rotation.iter().map(|r| r.missed).sum();
        let timing_from = if per_rotation.iter().all(|r| r.from == "agent_log") {
            "agent_log"
        } else {
            "first_stream"
        };
        Ok(AgentReport {
            mode: "agent",
            shape: a.shape,
            streams: a.streams,
            connections: a.shape.connections(a.streams),
            cert_streams,
            node_bytes: a.node_bytes,
            rotations: per_rotation.len(),
            cert_ttl_ms: u64::try_from(a.cert_ttl.as_millis()).unwrap_or(u64::MAX),
            timing_from,
            targets: Targets {
                push_ms: TARGET_PUSH_MS,
                rss_bytes: TARGET_RSS_BYTES,
                push_met: missed_pushes == 0 && max <= TARGET_PUSH_MS,
                rss_met: peak > 0 && peak < TARGET_RSS_BYTES,
            },
            push_ms: PushSummary { max, per_rotation },
            missed_pushes,
            stream_errors: seen.ended.len(),
            open: OpenFigures {
                seconds: open_seconds,
                agent_cpu_ms: cpu_open,
            },
            agent: AgentFigures {
                pid: pid.parse().unwrap_or(0),
                idle_rss_bytes: idle_rss,
                rss_bytes: rss,
                peak_rss_bytes: peak,
                rss_per_stream_bytes: rss.saturating_sub(idle_rss) / a.streams as u64,
                cpu_ms_rotations: agent_cpu,
                rotation_phase_seconds: phase_seconds,
                cpu_ms_per_rotation: agent_cpu / a.rotations as f64,
                metrics,
            },
            client: ClientFigures {
                threads: a.stream_threads.max(1),
                cpu_ms_rotations: client_cpu,
            },
            agent_flags: self.raised.clone(),
            machine: Machine {
                cpus: std::thread::available_parallelism().map_or(1, usize::from),
                loadavg_start,
                loadavg_end: procfs::loadavg(),
            },
        })
    }

    fn alive(&self, agent: &mut AgentProc) -> anyhow::Result<()> {
        if let Some(status) = agent.exited() {
            bail!("the agent exited ({status}):\n{}", agent.tail_text());
        }
        Ok(())
    }

    fn rotation_line(&self, seen: &Seen) -> String {
        let last = seen
            .rotations
            .iter()
            .rev()
            .find(|r| r.done)
            .map(|r| seen.figures(r, self.args.shape.cert_streams(self.args.streams)));
        let mut line = format!(
            "{} streams | rotations {}/{}",
            self.args.streams,
            seen.done(),
            self.args.rotations
        );
        if let Some(f) = last {
            line.push_str(&format!(
                " | last: {}/{} in {:.1} ms",
                f.received,
                self.args.shape.cert_streams(self.args.streams),
                f.last_ms
            ));
        }
        if !seen.ended.is_empty() {
            line.push_str(&format!(" | {} streams ended", seen.ended.len()));
        }
        line
    }
}

fn agent_metrics(page: &str) -> AgentMetrics {
    let m = |name: &str| proc::metric(page, name).unwrap_or(0.0);
    let acked = m("workload_ca_agent_sds_push_to_ack_seconds_count");
    let sum = m("workload_ca_agent_sds_push_to_ack_seconds_sum");
    AgentMetrics {
        sds_streams: m("workload_ca_agent_sds_streams"),
        pushes_acked: acked,
        push_to_ack_mean_ms: if acked > 0.0 { sum / acked * 1e3 } else { 0.0 },
        limit_refusals: m("workload_ca_agent_limit_refusals_total"),
    }
}

/// One live line on stderr, when it is a terminal.
struct Progress {
    on: bool,
}

impl Progress {
    fn new() -> Self {
        use std::io::IsTerminal;
        Self {
            on: std::io::stderr().is_terminal(),
        }
    }

    fn show(&self, line: &str) {
        if self.on {
            eprint!("\r\x1b[2Kca bench agent: {line}");
        }
    }

    fn clear(&self) {
        if self.on {
            eprint!("\r\x1b[2K");
        }
    }
}
