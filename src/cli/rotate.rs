//! `ca rotate-root`: the whole staged rotation, or one step of it.
//!
//! With a server running on the state directory, every step goes through
//! its admin socket, so it is gated on what the server knows (the agents'
//! confirmations, what it issued). With none, the command works on the
//! state directory itself, under the store's lock; `status` and `prepare`
//! need nothing more, `activate` and `retire` need `--force` (nothing can
//! confirm what proxies hold while no server runs), and a server started
//! later picks the change up.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

use super::{parse_duration, parse_key_algorithm, server::parse_trust_domain};
use crate::ca::{Authority, AuthoritySet, CacertsDir, DirStore, KeyAlgorithm, KeyStore};
use crate::identity::TrustDomain;
use crate::server::admin::{CacertsBody, DEFAULT_SOCKET, ErrorBody, StepRequest};
use crate::server::fleet::{Fleet, Saved, saved_path};
use crate::server::rotate::{RotationStatus, Step, status_of};

/// `ca rotate-root`: the whole rotation, or one step.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RotateArgs {
    /// One step only; none: the whole rotation.
    #[command(subcommand)]
    pub step: Option<StepCommand>,
    /// Print the schedule and what each step waits for; change nothing.
    #[arg(long)]
    pub plan: bool,
    /// Prepare this `cacerts` directory (a plugged-in CA, possibly under
    /// another root) instead of a newly generated root.
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// Take each step even if its gate is closed.
    #[arg(long)]
    pub force: bool,
    /// How long to wait for each gate before giving up (the rotation stays
    /// where it is; run the command again to go on).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub timeout: Duration,
    /// The CA to act on.
    #[command(flatten)]
    pub target: Target,
}

/// The steps `ca rotate-root` can take one at a time.
#[derive(Subcommand, Debug)]
pub enum StepCommand {
    /// Add a new authority whose root is trusted everywhere; it signs nothing.
    Prepare {
        /// A `cacerts` directory to prepare instead of a new root.
        #[arg(long)]
        from: Option<PathBuf>,
        /// Even on the state directory of a server whose admin socket does
        /// not answer (it follows the change within seconds).
        #[arg(long)]
        force: bool,
    },
    /// Sign with the prepared authority; the active one starts retiring.
    Activate {
        /// Even though not every proxy confirmed the new bundle.
        #[arg(long)]
        force: bool,
    },
    /// Remove the retiring authority and its root from the bundle.
    Retire {
        /// Even though leaves of the retiring authority may still be in use.
        #[arg(long)]
        force: bool,
    },
    /// Show each authority, the bundle generation and the agents' confirmations.
    Status {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Which CA.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The server's state directory.
    #[arg(long, global = true, env = "CA_STATE_DIR", default_value = "ca-state")]
    pub state_dir: PathBuf,
    /// The server's admin socket. Default: `<state-dir>/admin.sock`.
    #[arg(long, global = true, env = "CA_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// Without a server: the trust domain, for validating stored material.
    #[arg(long, global = true, env = "CA_TRUST_DOMAIN", default_value = "cluster.local", value_parser = parse_trust_domain)]
    pub trust_domain: TrustDomain,
    /// Without a server: key type of a newly generated root.
    #[arg(long, global = true, env = "CA_ROOT_KEY", default_value = "ecdsa-p256", value_parser = parse_key_algorithm)]
    pub root_key: KeyAlgorithm,
    /// Without a server: lifetime of a newly generated root.
    #[arg(long, global = true, env = "CA_ROOT_LIFETIME", default_value = "10y", value_parser = parse_duration)]
    pub root_lifetime: Duration,
}

/// The CA a command talks to.
enum Ca {
    Server(PathBuf),
    /// The state directory; `Some(why)` when a server is running on it
    /// that this command cannot reach.
    Offline(Target, Option<String>),
}

/// What a step answered.
enum Outcome {
    Done(RotationStatus),
    Gated(Vec<String>),
}

impl Ca {
    /// The server behind the admin socket; or, when there is none (no
    /// socket, or a stale one), the state directory itself. Any other
    /// failure to connect is an error, not a quiet switch to the directory.
    async fn find(target: &Target) -> anyhow::Result<Self> {
        let socket = target
            .admin_socket
            .clone()
            .unwrap_or_else(|| target.state_dir.join(DEFAULT_SOCKET));
        match tokio::net::UnixStream::connect(&socket).await {
            Ok(_) => Ok(Self::Server(socket)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                let running = DirStore::new(target.state_dir.join("ca")).server_running();
                let why = running.then(|| {
                    format!(
                        "a server is running on {} but its admin socket {} does not answer ({e})",
                        target.state_dir.display(),
                        socket.display()
                    )
                });
                Ok(Self::Offline(target.clone(), why))
            }
            Err(e) => bail!("admin socket {}: {e}", socket.display()),
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Server(s) => format!("the server at {}", s.display()),
            Self::Offline(t, None) => format!(
                "{} (no server is running on it)",
                t.state_dir.join("ca").display()
            ),
            Self::Offline(t, Some(_)) => format!(
                "{} (its server's admin socket does not answer)",
                t.state_dir.join("ca").display()
            ),
        }
    }

    async fn status(&self) -> anyhow::Result<RotationStatus> {
        match self {
            Self::Server(socket) => {
                let (code, body) = request(socket, "GET", "/v1/rotation", None).await?;
                if code != 200 {
                    bail!(
                        "the server answered {code}: {}",
                        String::from_utf8_lossy(&body)
                    );
                }
                serde_json::from_slice(&body).context("reading the server's status")
            }
            Self::Offline(t, why) => {
                let now = SystemTime::now();
                let set = offline_set(t, now).await?;
                let fleet = offline_fleet(&t.state_dir);
                let mut status = status_of(&set, &fleet.evidence(now), fleet.agents(), now);
                if !matches!(Step::next_for(&set), Step::Prepare) {
                    status.blocked_by.insert(
                        0,
                        why.clone().unwrap_or_else(|| {
                            "no server is running: nothing can confirm what the proxies hold".into()
                        }),
                    );
                }
                Ok(status)
            }
        }
    }

    /// Takes `step`. An error says which step failed and that nothing
    /// changed, then why (the file and the cause, for a state directory
    /// that is read-only, full or corrupt).
    async fn step(&self, step: Step, from: Option<&Path>, force: bool) -> anyhow::Result<Outcome> {
        self.try_step(step, from, force).await.with_context(|| {
            format!(
                "{} failed; the CA's authorities are as they were",
                step.as_str()
            )
        })
    }

    async fn try_step(
        &self,
        step: Step,
        from: Option<&Path>,
        force: bool,
    ) -> anyhow::Result<Outcome> {
        let from = match from {
            Some(dir) => Some(
                CacertsDir::new(dir)
                    .load()?
                    .with_context(|| format!("{} holds no cacerts files", dir.display()))?,
            ),
            None => None,
        };
        match self {
            Self::Server(socket) => {
                let body = StepRequest {
                    force,
                    from: from.as_ref().map(CacertsBody::from),
                };
                let body = serde_json::to_vec(&body)?;
                let path = format!("/v1/rotation/{}", step.as_str());
                let (code, answer) = request(socket, "POST", &path, Some(body)).await?;
                match code {
                    200 => Ok(Outcome::Done(serde_json::from_slice(&answer)?)),
                    409 => {
                        let e: ErrorBody = serde_json::from_slice(&answer)?;
                        Ok(Outcome::Gated(e.missing))
                    }
                    _ => {
                        let e: ErrorBody = serde_json::from_slice(&answer).unwrap_or(ErrorBody {
                            error: String::from_utf8_lossy(&answer).into_owned(),
                            missing: Vec::new(),
                        });
                        bail!("{}", e.error)
                    }
                }
            }
            Self::Offline(t, why) => {
                let now = SystemTime::now();
                if let (Some(why), false) = (why, force) {
                    return Ok(Outcome::Gated(vec![format!(
                        "{why}: changing its state directory behind its back needs --force"
                    )]));
                }
                if step != Step::Prepare && !force {
                    return Ok(Outcome::Gated(vec![format!(
                        "no server is running on {}: nothing can confirm what the proxies hold",
                        t.state_dir.display()
                    )]));
                }
                let store = DirStore::new(t.state_dir.join("ca"));
                let set = offline_set(t, now).await?;
                let next = match step {
                    Step::Prepare => {
                        let (td, alg, life) = (t.trust_domain.clone(), t.root_key, t.root_lifetime);
                        let authority = tokio::task::spawn_blocking(move || {
                            let files = match from {
                                Some(f) => f,
                                None => Authority::generate_root(&td, alg, life, now)?,
                            };
                            Authority::from_files(&files, &td, now)
                        })
                        .await??;
                        set.prepare(authority, now)?
                    }
                    Step::Activate => set.activate(now)?,
                    Step::Retire => set.retire()?,
                };
                // The store's lock and generation check: a writer that
                // changed it meanwhile wins, and this one changes nothing.
                if !store
                    .swap(Some(set.generation()), &next.to_stored())
                    .await?
                {
                    bail!(
                        "the stored authorities changed meanwhile; nothing done, run the command again"
                    );
                }
                Ok(Outcome::Done(status_of(
                    &next,
                    &offline_fleet(&t.state_dir).evidence(now),
                    Vec::new(),
                    now,
                )))
            }
        }
    }
}

async fn offline_set(t: &Target, now: SystemTime) -> anyhow::Result<AuthoritySet> {
    let store = DirStore::new(t.state_dir.join("ca"));
    let stored = store
        .load()
        .await?
        .with_context(|| format!("no CA in {}", store.dir().display()))?;
    Ok(AuthoritySet::from_stored(&stored, &t.trust_domain, now)?)
}

/// What the last server saved, as the server would see it had it just
/// started (every agent disconnected, no settling: nothing runs).
fn offline_fleet(state_dir: &Path) -> Fleet {
    let saved = std::fs::read_to_string(saved_path(state_dir))
        .ok()
        .and_then(|t| serde_json::from_str::<Saved>(&t).ok())
        .unwrap_or_default();
    Fleet::new(saved, 1, SystemTime::UNIX_EPOCH)
}

/// One HTTP/1 request on the admin socket.
async fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<(u16, Bytes)> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "admin")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let resp = sender.send_request(req).await?;
    let code = resp.status().as_u16();
    let bytes = resp.into_body().collect().await?.to_bytes();
    conn.abort();
    Ok((code, bytes))
}

/// Runs `ca rotate-root`.
///
/// # Errors
/// A step that failed, a gate that stayed closed past `--timeout`.
pub async fn run(args: RotateArgs) -> anyhow::Result<()> {
    let ca = Ca::find(&args.target).await?;
    match args.step {
        Some(StepCommand::Status { json }) => {
            let status = ca.status().await?;
            if json {
                say!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&ca, &status);
            }
            Ok(())
        }
        Some(StepCommand::Prepare { from, force }) => {
            one(&ca, Step::Prepare, from.as_deref(), force).await
        }
        Some(StepCommand::Activate { force }) => one(&ca, Step::Activate, None, force).await,
        Some(StepCommand::Retire { force }) => one(&ca, Step::Retire, None, force).await,
        None if args.plan => {
            let status = ca.status().await?;
            print_plan(&ca, &status, args.from.as_deref());
            Ok(())
        }
        None => whole(&ca, &args).await,
    }
}

async fn one(ca: &Ca, step: Step, from: Option<&Path>, force: bool) -> anyhow::Result<()> {
    match ca.step(step, from, force).await? {
        Outcome::Done(status) => {
            say!(
                "{}: done (bundle generation {})",
                step.as_str(),
                status.generation
            );
            print_status(ca, &status);
            Ok(())
        }
        Outcome::Gated(missing) => bail!(
            "not yet safe to {}:\n  - {}\nwait, or pass --force to {} anyway",
            step.as_str(),
            missing.join("\n  - "),
            step.as_str()
        ),
    }
}

/// Prepare, wait, activate, wait, retire: each step as soon as its gate
/// opens, progress printed as it changes.
async fn whole(ca: &Ca, args: &RotateArgs) -> anyhow::Result<()> {
    let start = ca.status().await?;
    say!("rotating the root of {}", ca.describe());
    let mut step = step_of(&start);
    if step != Step::Prepare {
        say!("a rotation is in progress; going on from {}", step.as_str());
    }
    loop {
        let deadline = tokio::time::Instant::now() + args.timeout;
        let mut last_shown: Option<Vec<String>> = None;
        let from = if step == Step::Prepare {
            args.from.as_deref()
        } else {
            None
        };
        let status = loop {
            match ca.step(step, from, args.force).await? {
                Outcome::Done(status) => break status,
                Outcome::Gated(missing) => {
                    if last_shown.as_ref() != Some(&missing) {
                        say!("{}: waiting for", step.as_str());
                        for m in &missing {
                            say!("  - {m}");
                        }
                        last_shown = Some(missing.clone());
                    }
                    if tokio::time::Instant::now() >= deadline {
                        bail!(
                            "gave up waiting after {:?}; the rotation stays before {}. Run `ca rotate-root` again to go on, or add --force",
                            args.timeout,
                            step.as_str()
                        );
                    }
                    if matches!(ca, Ca::Offline(..)) {
                        bail!("{}", missing.join("; "));
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
        };
        let active = status
            .authorities
            .iter()
            .find(|a| a.state == "active")
            .map_or("?", |a| a.id.as_str());
        say!(
            "{}: done (bundle generation {}, active authority {active})",
            step.as_str(),
            status.generation
        );
        step = match step {
            Step::Prepare => Step::Activate,
            Step::Activate => Step::Retire,
            Step::Retire => {
                say!("rotation complete");
                print_status(ca, &status);
                return Ok(());
            }
        };
    }
}

/// How often the whole flow asks again while a gate is closed.
const POLL: Duration = Duration::from_millis(200);

fn step_of(status: &RotationStatus) -> Step {
    let has = |s: &str| status.authorities.iter().any(|a| a.state == s);
    if has("retiring") {
        Step::Retire
    } else if has("prepared") {
        Step::Activate
    } else {
        Step::Prepare
    }
}

fn print_status(ca: &Ca, s: &RotationStatus) {
    say!("CA             : {}", ca.describe());
    say!("bundle         : generation {}", s.generation);
    for a in &s.authorities {
        say!(
            "  {:<9} {}  since {}  expires {}\n            {}\n            sha256 {}",
            a.state,
            a.id,
            a.since,
            a.not_after,
            a.subject,
            a.fingerprint
        );
    }
    match ca {
        Ca::Server(_) => {
            say!(
                "agents         : {} of {} agents confirmed generation {}",
                s.confirmed,
                s.known,
                s.generation
            );
            if !s.behind.is_empty() {
                say!("  behind       : {}", s.behind.join(", "));
            }
        }
        Ca::Offline(..) => say!("agents         : not connected (no server answers)"),
    }
    for c in &s.copies {
        if c.writer {
            say!(
                "{:<15}: {} of {} hold generation {}{}",
                c.kind,
                if c.generation >= s.generation {
                    c.current
                } else {
                    0
                },
                c.total,
                s.generation,
                c.settled_since
                    .map(|t| format!(", all since {}", crate::ca::rotation::rfc3339(t)))
                    .unwrap_or_default()
            );
        } else {
            say!("{:<15}: not counted (no replica writes them now)", c.kind);
        }
    }
    if let Some(until) = &s.other_clients_until {
        say!(
            "other clients  : may hold an older bundle until {until} (they learn it at their next request)"
        );
    }
    if let Some(next) = &s.next_step {
        if s.blocked_by.is_empty() {
            say!("next step      : {next} (ready)");
        } else {
            say!("next step      : {next}, waiting for:");
            for m in &s.blocked_by {
                say!("  - {m}");
            }
        }
    }
}

fn print_plan(ca: &Ca, s: &RotationStatus, from: Option<&Path>) {
    say!("plan for {} (nothing is changed):", ca.describe());
    let step = step_of(s);
    let new_root = match from {
        Some(dir) => format!("the CA in {}", dir.display()),
        None => "a newly generated root".to_string(),
    };
    let steps = [
        (Step::Prepare, format!("prepare: add {new_root} to the bundle (generation {}); it signs nothing", s.generation + 1)),
        (Step::Activate, "activate: once every known agent's proxies ACKed that bundle and no other client may hold an older one, new leaves and the server's certificate are signed by the new authority; agents replace their old leaves early, spread out".to_string()),
        (Step::Retire, "retire: once no leaf of the old authority is in use or valid, its root leaves the bundle and its key is deleted".to_string()),
    ];
    let mut started = false;
    for (n, (st, text)) in steps.iter().enumerate() {
        if *st == step {
            started = true;
        }
        let mark = if started { " " } else { "x" };
        say!("  [{mark}] {}. {text}", n + 1);
    }
    if !s.blocked_by.is_empty() {
        say!("the next step ({}) now waits for:", step.as_str());
        for m in &s.blocked_by {
            say!("  - {m}");
        }
    }
}
