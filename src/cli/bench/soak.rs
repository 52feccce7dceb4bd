//! `ca bench soak`: everything at once for minutes, counting every error
//! and watching memory and file descriptors.
//!
//! Starts the CA (`ca server` on the embedded default, its admin socket on,
//! no automatic rotation, the load's certificates short-lived), then N
//! `ca agent` processes in node mode, each with W workloads on short
//! certificates so that they renew every few seconds. Each workload gets
//! one SDS stream (`default` and `ROOTCA`) that ACKs every response and
//! checks every new certificate (one SPIFFE ID, the right one; valid now;
//! a path, with rustls-webpki, to the `ROOTCA` pushed with it and to the
//! CA's current bundle). Beside them, a paced `CreateCertificate` load
//! keeps the CA busy, some of its answers checked the same way. In the
//! middle, `ca rotate-root` (the command itself, on the CA's state
//! directory) runs the whole root rotation, every step waiting on its
//! gate, with everything still running; after it, every certificate must
//! chain to the new root and not to the old one, and at the end every
//! stream's `ROOTCA` must be the CA's bundle.
//!
//! RSS and open descriptors of the CA and of each agent are sampled every
//! few seconds; start and end figures are taken after a warm-up. The run
//! fails on any error, or when a process grew beyond the limits.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::agent_proc::{self as proc, AgentProc, Obtained};
use super::agent_report::Machine;
use super::client;
use super::procfs;
use super::soak_check::{self as check, Errors, Roots};
pub use super::soak_report::SoakReport;
use super::soak_report::{
    AgentCounters, Limits, LoadFigures, ProcFigures, RotationFigures, Sample, SdsFigures, figures,
};
use super::soak_tasks::{LoadWorker, Pace, StreamSpec, stream_task};
use super::target::{self, TempDir};
use super::work::{NAMESPACE, Work};
use super::{BenchArgs, OnOff};
use crate::cli::parse_duration;

/// The soak's own flags.
#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    /// `ca agent` processes (node mode).
    #[arg(id = "soak-agents", long = "soak-agents", default_value_t = 4)]
    pub agents: usize,
    /// Workloads per agent, each with one SDS stream (`default`, `ROOTCA`).
    #[arg(id = "soak-workloads", long = "soak-workloads", default_value_t = 3)]
    pub workloads: usize,
    /// Lifetime of the agents' certificates (they renew at about half).
    #[arg(id = "soak-cert-ttl", long = "soak-cert-ttl", default_value = "6s", value_parser = parse_duration)]
    pub cert_ttl: Duration,
    /// `CreateCertificate` calls per second of the background load.
    #[arg(id = "soak-rate", long = "soak-rate", default_value_t = 500)]
    pub rate: u32,
    /// Calls in flight of the background load (each worker on a
    /// connection of its own).
    #[arg(
        id = "soak-concurrency",
        long = "soak-concurrency",
        default_value_t = 8
    )]
    pub concurrency: usize,
    /// Lifetime of the load's certificates (the CA's `--default-ttl`): the
    /// rotation's gates wait for those issued before each step to expire.
    #[arg(id = "soak-load-ttl", long = "soak-load-ttl", default_value = "10s", value_parser = parse_duration)]
    pub load_ttl: Duration,
    /// Warm-up before the start figures of memory and descriptors.
    #[arg(id = "soak-warmup", long = "soak-warmup", default_value = "30s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// How often RSS and open descriptors are sampled.
    #[arg(id = "soak-sample", long = "soak-sample", default_value = "5s", value_parser = parse_duration)]
    pub sample: Duration,
    /// Largest RSS growth of any process, start to end, in MiB.
    #[arg(
        id = "soak-max-rss-growth",
        long = "soak-max-rss-growth",
        default_value_t = 4
    )]
    pub max_rss_growth_mib: u64,
    /// Largest growth of any process's open descriptors, start to end.
    #[arg(
        id = "soak-max-fd-growth",
        long = "soak-max-fd-growth",
        default_value_t = 2
    )]
    pub max_fd_growth: u64,
    /// No root rotation in the middle.
    #[arg(id = "soak-no-rotation", long = "soak-no-rotation")]
    pub no_rotation: bool,
}

/// A soak's length unless `--duration` says otherwise.
const DEFAULT_DURATION: Duration = Duration::from_secs(600);
/// How long agents may take to obtain their first certificates.
const START_WAIT: Duration = Duration::from_secs(30);
/// After the run, how long the root rotation may still take.
const ROTATION_GRACE: Duration = Duration::from_secs(120);
/// The main loop's period.
const TICK: Duration = Duration::from_millis(250);

/// What every task shares.
pub(super) struct Shared {
    pub errors: Errors,
    pub roots: Roots,
    pub pushes: AtomicU64,
    pub checked: AtomicU64,
    pub rotations: AtomicU64,
    pub missed: AtomicU64,
    pub requests: AtomicU64,
    pub ok: AtomicU64,
    pub verified: AtomicU64,
    /// Each stream's last `ROOTCA` (PEM).
    pub last_rootca: Mutex<Vec<Vec<u8>>>,
}

/// Runs the soak.
///
/// # Errors
/// Bad flags, or a CA or an agent that does not start. Errors during the
/// run are counted in the report instead.
pub async fn run(args: &BenchArgs) -> anyhow::Result<SoakReport> {
    let s = &args.soak;
    if args.target.addr.is_some() {
        bail!("soak starts a CA of its own (it rotates its root): drop --addr");
    }
    if s.agents == 0 || s.workloads == 0 || s.rate == 0 || s.concurrency == 0 {
        bail!(
            "--soak-agents, --soak-workloads, --soak-rate and --soak-concurrency must be at least 1"
        );
    }
    if s.cert_ttl < Duration::from_secs(2) || s.sample.is_zero() {
        bail!("--soak-cert-ttl must be at least 2s, --soak-sample more than 0");
    }
    let duration = args.load.duration.unwrap_or(DEFAULT_DURATION);
    let loadavg_start = procfs::loadavg();
    let mut targs = args.target.clone();
    targs.admin_socket = true;
    // A log line per certificate would fill the temporary directory.
    targs.audit = OnOff::Off;
    targs.server_args.push("--auto-rotate=off".into());
    targs
        .server_args
        .push(format!("--default-ttl={}ms", s.load_ttl.as_millis()));
    let (target, server) = target::open(&targs, &args.tokens).await?;
    let server = server.context("soak needs a CA it started")?;
    let ca_pid = target.server_pid.context("the started CA has no pid")?;
    let work = Work::prepare(&target, &args.load)?;
    let shared = Arc::new(Shared {
        errors: Errors::default(),
        roots: Roots::new(target.root_cert.clone()),
        pushes: AtomicU64::new(0),
        checked: AtomicU64::new(0),
        rotations: AtomicU64::new(0),
        missed: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        verified: AtomicU64::new(0),
        last_rootca: Mutex::new(vec![Vec::new(); s.agents * s.workloads]),
    });
    let initial_roots = shared.roots.current(true);
    if initial_roots.is_empty() {
        bail!("no root in {}", target.root_cert.display());
    }

    // The agents, each with its first certificates.
    let dir = TempDir::new("ca-bench-soak")?;
    let exe = std::env::current_exe().context("locating the ca binary")?;
    let mut agents = Vec::new();
    for k in 0..s.agents {
        agents.push(Agent::start(k, &exe, &target, s, dir.path())?);
    }
    for a in &mut agents {
        a.wait_first(s.workloads).await?;
    }

    // The streams and the load.
    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = JoinSet::new();
    for (k, a) in agents.iter().enumerate() {
        for w in 0..s.workloads {
            let spec = StreamSpec {
                number: k * s.workloads + w,
                socket: a.socket_dir.join(workload_name(w)).join("socket"),
                path: format!("/ns/{NAMESPACE}/sa/{}", account(k, w)),
            };
            tasks.spawn(stream_task(spec, shared.clone(), stop.clone()));
        }
    }
    let addr = client::resolve(&target.addr).await?;
    let start = Instant::now();
    let pace = Pace {
        start,
        period: Duration::from_secs_f64(1.0 / f64::from(s.rate)),
        next: Arc::new(AtomicU64::new(0)),
    };
    for _ in 0..s.concurrency {
        let load = LoadWorker {
            shared: shared.clone(),
            work: work.clone(),
            addr,
            root_cert: target.root_cert.clone(),
            server_name: target.server_name.clone(),
            pace: pace.clone(),
        };
        tasks.spawn(load.run(stop.clone()));
    }

    // The run: samples, the rotation in the middle.
    let mut series: Vec<(String, u32, Vec<Sample>)> = vec![("ca".into(), ca_pid, Vec::new())];
    series.extend(
        agents
            .iter()
            .enumerate()
            .map(|(k, a)| (format!("agent-{k}"), a.proc.pid, Vec::new())),
    );
    let mut renewals = 0u64;
    let mut rotation: Option<Rotation> = None;
    let mut next_sample = start;
    let mut tick = tokio::time::interval(TICK);
    let progress = Progress::new();
    loop {
        tick.tick().await;
        let now = Instant::now();
        let at = now.duration_since(start);
        for a in &mut agents {
            renewals += a.drain();
            if let Some(status) = a.proc.exited()
                && !a.gone
            {
                a.gone = true;
                let tail = a.proc.tail_text();
                shared
                    .errors
                    .add("agent exited", || format!("{} ({status}): {tail}", a.name));
            }
        }
        if now >= next_sample {
            next_sample += s.sample;
            for (_, pid, v) in &mut series {
                if let (Some(rss), Some(fds)) =
                    (procfs::memory_bytes(*pid, "VmRSS"), procfs::open_fds(*pid))
                {
                    v.push(Sample {
                        at: at.as_secs_f64(),
                        rss,
                        fds,
                    });
                }
            }
            progress.show(at, duration, &shared, rotation.as_ref());
        }
        if rotation.is_none() && !s.no_rotation && at >= duration / 2 {
            rotation = Some(Rotation::start(
                &exe,
                &server.state_dir,
                dir.path(),
                at,
                duration,
            )?);
        }
        if let Some(r) = &mut rotation
            && r.poll(&shared)
            && r.figures().completed
        {
            let now_roots = shared.roots.current(true);
            if now_roots.iter().any(|r| initial_roots.contains(r)) {
                shared.errors.add("root rotation", || {
                    "the old root is still in the CA's bundle after retire".into()
                });
            }
            shared.roots.retire(initial_roots.clone());
        }
        let rotating = rotation.as_ref().is_some_and(|r| r.done.is_none());
        if at >= duration && (!rotating || at >= duration + ROTATION_GRACE) {
            break;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    progress.clear();
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    for a in &mut agents {
        renewals += a.drain();
    }
    if let Some(r) = &mut rotation
        && r.done.is_none()
    {
        r.kill();
        shared.errors.add("root rotation", || {
            format!("not complete {ROTATION_GRACE:?} after the run")
        });
    }

    // The end: each stream's ROOTCA is the CA's bundle.
    let bundle = shared.roots.current(true);
    if let Ok(last) = shared.last_rootca.lock() {
        for (i, pem) in last.iter().enumerate() {
            let mut got = check::pem_ders(pem);
            let mut want = bundle.clone();
            got.sort();
            want.sort();
            if got != want {
                shared.errors.add("stale ROOTCA at the end", || {
                    format!(
                        "stream {i} holds {} roots that are not the CA's bundle",
                        got.len()
                    )
                });
            }
        }
    }
    let agent_metrics = agent_counters(&agents, &shared).await;
    let limits = Limits {
        rss_growth_bytes: s.max_rss_growth_mib * 1024 * 1024,
        fd_growth: s.max_fd_growth,
    };
    let warm = s.warmup.as_secs_f64();
    let mut procs: Vec<ProcFigures> = series
        .iter()
        .map(|(name, pid, v)| {
            let after: Vec<Sample> = v.iter().copied().filter(|x| x.at >= warm).collect();
            figures(
                name.clone(),
                *pid,
                if after.len() >= 2 { &after } else { v },
            )
        })
        .collect();
    drop(agents);
    drop(server);
    let ca = procs.remove(0);
    let (errors, error_examples) = shared.errors.snapshot();
    let error_total: u64 = errors.values().sum();
    let mut failures = Vec::new();
    if error_total > 0 {
        failures.push(format!("{error_total} errors"));
    }
    for p in std::iter::once(&ca).chain(&procs) {
        failures.extend(p.over(&limits));
    }
    let root_rotation = rotation.map(|r| r.figures());
    if root_rotation.as_ref().is_some_and(|r| !r.completed) {
        failures.push("the root rotation did not complete".into());
    }
    let ok = shared.ok.load(Ordering::Relaxed);
    #[allow(clippy::cast_precision_loss)]
    Ok(SoakReport {
        mode: "soak",
        seconds,
        agents: s.agents,
        workloads_per_agent: s.workloads,
        cert_ttl_ms: millis(s.cert_ttl),
        load: LoadFigures {
            rate: s.rate,
            concurrency: s.concurrency,
            cert_ttl_ms: millis(s.load_ttl),
            requests: shared.requests.load(Ordering::Relaxed),
            ok,
            verified: shared.verified.load(Ordering::Relaxed),
            certs_per_sec: ok as f64 / seconds.max(1e-9),
        },
        sds: SdsFigures {
            streams: s.agents * s.workloads,
            pushes: shared.pushes.load(Ordering::Relaxed),
            certificates_checked: shared.checked.load(Ordering::Relaxed),
            rotations_seen: shared.rotations.load(Ordering::Relaxed),
            missed_rotations: shared.missed.load(Ordering::Relaxed),
            renewals,
        },
        root_rotation,
        agent_metrics,
        ca,
        agent_procs: procs,
        limits,
        errors,
        error_total,
        error_examples,
        passed: failures.is_empty(),
        failures,
        machine: Machine {
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            loadavg_start,
            loadavg_end: procfs::loadavg(),
        },
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn workload_name(w: usize) -> String {
    format!("w{w}")
}

/// The service account of agent `k`'s workload `w`.
fn account(k: usize, w: usize) -> String {
    format!("soak-{k}-{w}")
}

/// A `ca agent` of the soak.
struct Agent {
    name: String,
    proc: AgentProc,
    obtained: mpsc::UnboundedReceiver<Obtained>,
    socket_dir: PathBuf,
    /// Certificates obtained so far.
    count: u64,
    gone: bool,
}

impl Agent {
    fn start(
        k: usize,
        exe: &Path,
        target: &target::Target,
        s: &SoakArgs,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let name = format!("soak-agent-{k}");
        let own = dir.join(&name);
        std::fs::create_dir(&own).with_context(|| format!("creating {}", own.display()))?;
        let socket_dir = own.join("sds");
        let mut flags = vec![
            format!("--ca-addr={}", target.addr),
            format!("--ca-server-name={}", target.server_name),
            format!("--ca-root-cert={}", target.root_cert.display()),
            format!("--socket-dir={}", socket_dir.display()),
            "--ops-listen=127.0.0.1:0".into(),
            format!("--agent-name={name}"),
            format!("--cert-ttl={}ms", s.cert_ttl.as_millis()),
        ];
        for w in 0..s.workloads {
            let token = own.join(format!("{}.token", workload_name(w)));
            write_private(&token, &target.tokens.token(NAMESPACE, &account(k, w))?)?;
            flags.push(format!(
                "--workload={}={}",
                workload_name(w),
                token.display()
            ));
        }
        let (proc, obtained) = AgentProc::spawn(exe, &flags)?;
        Ok(Self {
            name,
            proc,
            obtained,
            socket_dir,
            count: 0,
            gone: false,
        })
    }

    /// Waits for a first certificate of each of its workloads.
    async fn wait_first(&mut self, workloads: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_WAIT;
        while self.count < workloads as u64 {
            match tokio::time::timeout_at(deadline, self.obtained.recv()).await {
                Ok(Some(_)) => self.count += 1,
                _ => bail!(
                    "{} got no certificate for each workload within {START_WAIT:?}:\n{}",
                    self.name,
                    self.proc.tail_text()
                ),
            }
        }
        self.count = 0;
        Ok(())
    }

    /// Certificates obtained since the last call.
    fn drain(&mut self) -> u64 {
        let mut n = 0;
        while self.obtained.try_recv().is_ok() {
            n += 1;
        }
        self.count += n;
        n
    }
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
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

/// The agents' failure counters, summed; each failure is an error.
async fn agent_counters(agents: &[Agent], shared: &Shared) -> AgentCounters {
    let mut c = AgentCounters::default();
    for a in agents {
        let page = match a.proc.ops {
            Some(ops) => proc::metrics_page(ops).await,
            None => Err(anyhow::anyhow!("no metrics address in its banner")),
        };
        let page = match page {
            Ok(p) => p,
            Err(e) => {
                shared
                    .errors
                    .add("agent metrics", || format!("{}: {e:#}", a.name));
                continue;
            }
        };
        let m = |n: &str| proc::metric(&page, n).unwrap_or(0.0);
        let csr = m("workload_ca_agent_csr_failures_total");
        let nacks = m("workload_ca_agent_sds_nacks_total");
        let tokens = m("workload_ca_agent_token_unusable_total");
        let refusals = m("workload_ca_agent_limit_refusals_total");
        for (what, n) in [
            ("CSR failures", csr),
            ("SDS NACKs", nacks),
            ("unusable tokens", tokens),
            ("limit refusals", refusals),
        ] {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            for _ in 0..(n.max(0.0) as u64) {
                shared
                    .errors
                    .add(&format!("agent {what}"), || a.name.clone());
            }
        }
        c.csr_failures += csr;
        c.sds_nacks += nacks;
        c.token_unusable += tokens;
        c.limit_refusals += refusals;
        c.csr_retries += m("workload_ca_agent_csr_retries_total");
        c.sds_pushes += m("workload_ca_agent_sds_pushes_total");
    }
    c
}

/// `ca rotate-root` on the CA's state directory, running.
struct Rotation {
    child: Child,
    output: PathBuf,
    started: Instant,
    started_at: Duration,
    /// When it exited, and whether it succeeded.
    done: Option<(Duration, bool)>,
}

impl Rotation {
    fn start(
        exe: &Path,
        state: &Path,
        dir: &Path,
        at: Duration,
        duration: Duration,
    ) -> anyhow::Result<Self> {
        let output = dir.join("rotate-root.out");
        let out = std::fs::File::create(&output).context("creating the rotation's output")?;
        let err = out.try_clone()?;
        // Each gate may wait for the rest of the run and the grace.
        let gate = (duration / 2 + ROTATION_GRACE).as_secs().max(60);
        let child = Command::new(exe)
            .arg("rotate-root")
            .arg("--state-dir")
            .arg(state)
            .arg(format!("--timeout={gate}s"))
            .env_remove("CA_ADMIN_SOCKET")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("starting `ca rotate-root`")?;
        Ok(Self {
            child,
            output,
            started: Instant::now(),
            started_at: at,
            done: None,
        })
    }

    /// True once, when it has just exited.
    fn poll(&mut self, shared: &Shared) -> bool {
        if self.done.is_some() {
            return false;
        }
        let status = match self.child.try_wait() {
            Ok(Some(s)) => s,
            Ok(None) => return false,
            Err(e) => {
                shared
                    .errors
                    .add("root rotation", || format!("waiting for it: {e}"));
                self.done = Some((self.started.elapsed(), false));
                return true;
            }
        };
        let text = std::fs::read_to_string(&self.output).unwrap_or_default();
        let ok = status.success() && text.contains("rotation complete");
        if !ok {
            shared.errors.add("root rotation", || {
                format!("ca rotate-root exited {status}: {}", text.trim())
            });
        }
        self.done = Some((self.started.elapsed(), ok));
        true
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn figures(&self) -> RotationFigures {
        let text = std::fs::read_to_string(&self.output).unwrap_or_default();
        let (took, completed) = self.done.unwrap_or((self.started.elapsed(), false));
        RotationFigures {
            started_at_seconds: self.started_at.as_secs_f64(),
            seconds: took.as_secs_f64(),
            completed,
            output: text
                .lines()
                .filter(|l| {
                    l.contains(": done") || l.contains("waiting for") || l.starts_with("  - ")
                })
                .map(|l| crate::logsafe::terminal(l).into_owned())
                .collect(),
        }
    }
}

impl Drop for Rotation {
    fn drop(&mut self) {
        if self.done.is_none() {
            self.kill();
        }
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

    fn show(&self, at: Duration, of: Duration, shared: &Shared, rotation: Option<&Rotation>) {
        if !self.on {
            return;
        }
        let rot = match rotation.map(|r| r.done) {
            None => "not yet",
            Some(None) => "running",
            Some(Some((_, true))) => "done",
            Some(Some((_, false))) => "FAILED",
        };
        eprint!(
            "\r\x1b[2Kca bench soak: {:.0}/{:.0} s | {} certificates | {} SDS certificates checked | root rotation {rot} | {} errors",
            at.as_secs_f64(),
            of.as_secs_f64(),
            shared.ok.load(Ordering::Relaxed),
            shared.checked.load(Ordering::Relaxed),
            shared.errors.total()
        );
    }

    fn clear(&self) {
        if self.on {
            eprint!("\r\x1b[2K");
        }
    }
}
