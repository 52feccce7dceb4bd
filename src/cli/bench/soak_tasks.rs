//! The tasks of `ca bench soak`: the SDS streams, which ACK every response
//! and check every certificate, and the paced background load.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

use super::agent_streams::{self as streams, default_version, wire};
use super::client::{self, CALL_TIMEOUT, CallError, Tls};
use super::soak::Shared;
use super::soak_check as check;
use super::work::Work;
use crate::agent::sds::{DEFAULT, ROOTCA};

/// How long a stream may take to connect and get its first response.
const START_WAIT: Duration = Duration::from_secs(30);
/// A stream whose certificate expired this long ago with no new one has
/// missed a rotation.
const MISS_GRACE: Duration = Duration::from_secs(1);
/// One load answer in this many is decoded and checked.
const VERIFY_EVERY: u64 = 100;

/// One SDS stream: which, on which socket, for which identity.
pub(super) struct StreamSpec {
    pub number: usize,
    pub socket: PathBuf,
    /// `/ns/<ns>/sa/<sa>` of its workload.
    pub path: String,
}

/// Holds a stream until `stop`, reopening it (after counting an error)
/// when it ends.
pub(super) async fn stream_task(
    spec: StreamSpec,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let r = tokio::select! {
            r = one_stream(&spec, &shared) => r,
            _ = stop.changed() => return,
        };
        if let Err(e) = r {
            shared
                .errors
                .add("SDS stream", || format!("stream {}: {e}", spec.number));
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn one_stream(spec: &StreamSpec, shared: &Shared) -> Result<(), String> {
    let channel = tokio::time::timeout(START_WAIT, streams::connect(spec.socket.clone()))
        .await
        .map_err(|_| format!("no connection within {START_WAIT:?}"))??;
    let names = vec![DEFAULT.to_owned(), ROOTCA.to_owned()];
    let node = wire::envoy_node(0);
    let (tx, mut inbound) = tokio::time::timeout(
        START_WAIT,
        streams::open(spec.number, channel, names.clone(), &node),
    )
    .await
    .map_err(|_| format!("no stream within {START_WAIT:?}"))??;
    let mut last: Option<String> = None;
    let mut rootca: Vec<u8> = Vec::new();
    let mut expires: Option<SystemTime> = None;
    loop {
        let wait = match expires {
            Some(t) => t.duration_since(SystemTime::now()).unwrap_or_default() + MISS_GRACE,
            None => START_WAIT,
        };
        let msg = match tokio::time::timeout(wait, inbound.message()).await {
            Ok(m) => m,
            Err(_) if expires.is_some() => {
                shared.missed.fetch_add(1, Ordering::Relaxed);
                shared.errors.add("missed rotation", || {
                    format!(
                        "stream {}: its certificate expired with no new one",
                        spec.number
                    )
                });
                expires = None;
                continue;
            }
            Err(_) => return Err(format!("no response within {START_WAIT:?}")),
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => return Err("the agent ended the stream".into()),
            Err(s) => return Err(format!("{:?}: {}", s.code(), s.message())),
        };
        shared.pushes.fetch_add(1, Ordering::Relaxed);
        match check::decode(&resp) {
            Err(e) => shared.errors.add("invalid SDS response", || e),
            Ok(pushed) => {
                if let Some(r) = pushed.roots {
                    rootca = r;
                    if let Ok(mut l) = shared.last_rootca.lock()
                        && let Some(slot) = l.get_mut(spec.number)
                    {
                        slot.clone_from(&rootca);
                    }
                }
                let version = default_version(&resp.version_info).map(str::to_owned);
                if version != last {
                    if last.is_some() {
                        shared.rotations.fetch_add(1, Ordering::Relaxed);
                    }
                    last = version;
                    let now = SystemTime::now();
                    let checked = pushed
                        .chain
                        .ok_or_else(|| "no certificate".to_owned())
                        .and_then(|c| {
                            check::check_leaf(&c, &rootca, &shared.roots, &spec.path, now)
                        });
                    match checked {
                        Ok(not_after) => {
                            expires = Some(not_after);
                            shared.checked.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => shared.errors.add("invalid SDS certificate", || {
                            format!("stream {}: {e}", spec.number)
                        }),
                    }
                }
            }
        }
        streams::ack(&tx, resp, &names).await?;
    }
}

/// The load's schedule: call `n` is due at `start + n * period`.
#[derive(Clone)]
pub(super) struct Pace {
    pub start: Instant,
    pub period: Duration,
    pub next: Arc<AtomicU64>,
}

/// One worker of the background load, on a connection of its own.
pub(super) struct LoadWorker {
    pub shared: Arc<Shared>,
    pub work: Arc<Work>,
    pub addr: std::net::SocketAddr,
    pub root_cert: PathBuf,
    pub server_name: String,
    pub pace: Pace,
}

impl LoadWorker {
    pub(super) async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut conn: Option<h2::client::SendRequest<Bytes>> = None;
        let calls = self.work.calls.len().max(1) as u64;
        while !*stop.borrow() {
            let n = self.pace.next.fetch_add(1, Ordering::Relaxed);
            let due = self.pace.start
                + self
                    .pace
                    .period
                    .saturating_mul(u32::try_from(n).unwrap_or(u32::MAX));
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                _ = stop.changed() => return,
            }
            if conn.is_none() {
                match self.connect().await {
                    Ok(c) => conn = Some(c),
                    Err(e) => {
                        self.error(&e);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            let Some(send) = conn.as_mut() else {
                continue;
            };
            let i = usize::try_from(n % calls).unwrap_or(0);
            let Some(call) = self.work.calls.get(i) else {
                continue;
            };
            let keep = n.is_multiple_of(VERIFY_EVERY);
            self.shared.requests.fetch_add(1, Ordering::Relaxed);
            let r = match tokio::time::timeout(
                CALL_TIMEOUT,
                client::call(send, &self.work.uri, call, keep),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(CallError::Timeout),
            };
            match r {
                Ok(body) => {
                    self.shared.ok.fetch_add(1, Ordering::Relaxed);
                    if keep {
                        self.verify(&body, call);
                    }
                }
                Err(e) => {
                    self.error(&e);
                    // A new connection after any failure.
                    conn = None;
                }
            }
        }
    }

    async fn connect(&self) -> Result<h2::client::SendRequest<Bytes>, CallError> {
        // The CA's bundle as it is now: its TLS certificate follows the
        // rotation.
        let tls = Tls::new(&self.root_cert, &self.server_name, false)
            .map_err(|e| CallError::Tls(std::io::Error::other(e.to_string())))?;
        match tokio::time::timeout(CALL_TIMEOUT, client::connect(self.addr, None, &tls)).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout),
        }
    }

    fn error(&self, e: &CallError) {
        self.shared
            .errors
            .add(&format!("load: {}", e.label()), || format!("{e:?}"));
    }

    fn verify(&self, body: &Bytes, call: &super::work::Prepared) {
        let now = SystemTime::now();
        let r = self
            .shared
            .roots
            .check(|anchors| super::load::check_answer(body, call, &self.work, anchors, now));
        match r {
            Ok(()) => {
                self.shared.verified.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.shared.errors.add("load: bad certificate", || e),
        }
    }
}
