//! Accepting connections under [`AcceptLimits`]: connections in all and per
//! source, connections being admitted in all and per source (so one source
//! cannot take the pool), each handshake under a deadline; calls in flight
//! counted per source for [`super::serve_h2`]; the drain at shutdown.
//!
//! Admission: a connection holds a place in the admission pool from accept
//! through its TLS handshake and until its first call is answered
//! ([`Calls::answered`]), or [`AcceptLimits::admission_hold`] after the
//! handshake, whichever comes first; then it is served on without a place.
//! So a burst of new connections costs the buffers of at most the pool's
//! size at once, not of every connection whose call waits for the CPU.
//!
//! The pool in all is back-pressure, not a refusal: while it is full the
//! loop stops accepting, and new connections wait in the kernel's listen
//! backlog ([`LISTEN_BACKLOG`]) until a place is freed. A mass start of pods
//! is then served a little later instead of refused. One source holds at
//! most its share of the pool (handshakes and holds alike), so a few
//! sources cannot take it; a source's connections past its share wait for
//! its turn in their own tasks (accepted, nothing read), and only the cap on
//! a source's open connections refuses. A client that behaves is admitted
//! until its first answer; a hostile one can leave admission early (by
//! answering itself a reset), so against an attacker the memory bound is
//! `max_connections`, not the pool.

use crate::sync::LockExt;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::limits::{AcceptLimits, Refusals, label};
use crate::logsafe::WarnLimiter;

/// A listening socket: TCP (with the peer's address) or Unix.
pub trait Listener: Send + 'static {
    /// The connection type.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection and, for TCP, its source address.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, Option<IpAddr>)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<(Self::Io, Option<IpAddr>)> {
        let (s, addr) = tokio::net::TcpListener::accept(self).await?;
        let _ = s.set_nodelay(true);
        Ok((s, Some(source_of(addr.ip()))))
    }
}

/// The "source" per-source limits count: the IPv4 address, or the /64 of
/// an IPv6 address (one host usually holds a whole /64, so counting single
/// IPv6 addresses would give it unlimited sources).
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                v6.to_bits() & !((1u128 << 64) - 1),
            )),
        },
        v4 => v4,
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<(Self::Io, Option<IpAddr>)> {
        let (s, _) = tokio::net::UnixListener::accept(self).await?;
        Ok((s, None))
    }
}

/// The listen backlog asked for: connections the kernel completes and holds
/// while the accept loop waits for room in the handshake pool. Linux caps it
/// at `net.core.somaxconn` (4096 by default since 5.4).
pub const LISTEN_BACKLOG: u32 = 65_535;

/// A TCP listener on `addr` with [`LISTEN_BACKLOG`] (tokio's `bind` asks for
/// 1024), `SO_REUSEADDR` set as `bind` does.
///
/// # Errors
/// The socket, bind or listen error.
pub fn listen_tcp(addr: std::net::SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Descriptors kept back from connections: listeners, files, the runtime,
/// outgoing connections.
const FD_RESERVE: u64 = 256;

/// The process's soft limit on open files (Linux, from /proc).
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// `limits` with `max_connections` lowered to what the open-files limit
/// allows (less [`FD_RESERVE`]), with a warning: past it, `accept` itself
/// would fail (EMFILE) for every client alike, rather than our limits
/// refusing the excess.
pub fn within_fd_limit(mut limits: AcceptLimits) -> AcceptLimits {
    if let Some(files) = open_files_limit() {
        let room = usize::try_from(files.saturating_sub(FD_RESERVE))
            .unwrap_or(usize::MAX)
            .max(1);
        if limits.max_connections > room {
            tracing::warn!(
                configured = limits.max_connections,
                open_files_limit = files,
                using = room,
                "--max-connections is above what the open-files limit allows; using less (raise `ulimit -n` to allow more)"
            );
            limits.max_connections = room;
        }
    }
    limits
}

/// Open connections in all, open and admitting ones per source. (The
/// admission pool in all is the acceptor's semaphore.)
#[derive(Default)]
struct Occupancy {
    total: usize,
    /// Per source; entries are removed when its last connection closes.
    by_source: HashMap<IpAddr, Source>,
}

struct Source {
    open: usize,
    /// Connections holding a place in the admission pool (or waiting for
    /// one): handshaking, or handshake done and first call not answered.
    admitting: usize,
    /// The source's share of the pool: at most this many of its admitting
    /// connections hold a place; the others wait for their turn (their
    /// sockets open, nothing read from them) instead of being refused.
    share: Arc<Semaphore>,
    /// Calls in flight over all of this source's connections.
    calls: Arc<AtomicUsize>,
}

impl Source {
    fn new(share: usize) -> Self {
        Self {
            open: 0,
            admitting: 0,
            share: Arc::new(Semaphore::new(share.max(1))),
            calls: Arc::default(),
        }
    }
}

/// Calls in flight: from the connection's source (TCP) and in all. Given to
/// each connection's `serve`.
#[derive(Clone, Default)]
pub struct Calls {
    /// Calls in flight from this connection's source (TCP only).
    pub source: Option<Arc<AtomicUsize>>,
    /// Calls in flight in all.
    pub all: Arc<AtomicUsize>,
    /// Long-lived calls (bundle watches) open in all.
    pub watches: Arc<AtomicUsize>,
    /// Signalled by the connection when its first call is answered (its
    /// first response frame is sent, or the call ends): the connection
    /// then leaves the admission pool. `None`: nobody waits for it.
    pub answered: Option<Arc<Notify>>,
}

/// A connection's place in [`Occupancy`] and, while it is being admitted,
/// in the admission pool; released on drop.
struct Ticket {
    occupancy: Arc<Mutex<Occupancy>>,
    source: Option<IpAddr>,
    admitting: bool,
    place: Option<OwnedSemaphorePermit>,
    /// The source's share (TCP), and this connection's turn in it.
    share: Option<Arc<Semaphore>>,
    turn: Option<OwnedSemaphorePermit>,
    source_calls: Option<Arc<AtomicUsize>>,
}

impl Ticket {
    /// Counts a newly accepted connection (as being admitted, before it has
    /// a place in the pool), or names the limit that refuses it.
    fn take(
        occupancy: &Arc<Mutex<Occupancy>>,
        limits: &AcceptLimits,
        source: Option<IpAddr>,
    ) -> Result<Self, &'static str> {
        let mut o = occupancy.locked();
        if o.total >= limits.max_connections {
            return Err(label::CONNECTIONS);
        }
        let mut source_calls = None;
        let mut share = None;
        if let Some(ip) = source {
            let open = o.by_source.get(&ip).map_or(0, |s| s.open);
            if limits
                .max_connections_per_source
                .is_some_and(|max| open >= max)
            {
                return Err(label::CONNECTIONS_PER_SOURCE);
            }
            let e = o
                .by_source
                .entry(ip)
                .or_insert_with(|| Source::new(limits.max_pending_handshakes_per_source));
            e.open += 1;
            e.admitting += 1;
            source_calls = Some(e.calls.clone());
            share = Some(e.share.clone());
        }
        o.total += 1;
        Ok(Self {
            occupancy: occupancy.clone(),
            source,
            admitting: true,
            place: None,
            share,
            turn: None,
            source_calls,
        })
    }

    /// Admission is over (first answer, hold bound, failed handshake): the
    /// place in the pool and in the source's share is freed, the
    /// connection's stays.
    fn admitted(&mut self) {
        if !std::mem::take(&mut self.admitting) {
            return;
        }
        self.place = None;
        self.turn = None;
        let mut o = self.occupancy.locked();
        if let Some(e) = self.source.and_then(|ip| o.by_source.get_mut(&ip)) {
            e.admitting = e.admitting.saturating_sub(1);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admitted();
        let mut o = self.occupancy.locked();
        o.total = o.total.saturating_sub(1);
        if let Some(ip) = self.source {
            let gone = o.by_source.get_mut(&ip).is_some_and(|e| {
                e.open = e.open.saturating_sub(1);
                e.open == 0 && e.admitting == 0
            });
            if gone {
                o.by_source.remove(&ip);
            }
        }
    }
}

/// Serves `conn` while it holds its admission place: the place is given
/// back when `answered` fires or `hold` has passed (zero: at once),
/// whichever comes first; the connection is served on either way.
async fn serve_admitted<F: Future<Output = ()>>(
    serving: F,
    ticket: &mut Ticket,
    answered: &Notify,
    hold: Duration,
) {
    if hold.is_zero() {
        ticket.admitted();
        serving.await;
        return;
    }
    let mut serving = std::pin::pin!(serving);
    tokio::select! {
        () = &mut serving => return,
        () = answered.notified() => {}
        () = tokio::time::sleep(hold) => {}
    }
    ticket.admitted();
    serving.await;
}

/// An accept loop under [`AcceptLimits`].
pub struct Acceptor<L> {
    /// What is being served, for logs ("CA gRPC", "SDS <path>", "ops").
    pub name: String,
    /// The socket connections are accepted from.
    pub listener: L,
    /// Connection and handshake limits.
    pub limits: AcceptLimits,
    /// Where refusals are counted.
    pub refusals: Refusals,
    /// Turns true when the server shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// How long connections may take to finish after shutdown begins.
    pub drain: Duration,
    /// Count every refused connection under this label rather than the
    /// limit's own (the operations endpoint's limits are its own).
    pub refusal_label: Option<&'static str>,
}

impl<L: Listener> Acceptor<L> {
    /// Runs the accept loop in a task. Each accepted connection gets its own
    /// task: `handshake` (under the handshake deadline; `None` when it
    /// failed, which it logs itself), then `serve`, which must return when
    /// the shutdown receiver it is given fires (after a graceful close).
    pub fn spawn<H, HF, C, S, SF>(self, handshake: H, serve: S) -> JoinHandle<()>
    where
        H: Fn(L::Io, Option<IpAddr>) -> HF + Send + Sync + 'static,
        HF: Future<Output = Option<C>> + Send + 'static,
        C: Send + 'static,
        S: Fn(C, Calls, watch::Receiver<bool>) -> SF + Send + Sync + 'static,
        SF: Future<Output = ()> + Send + 'static,
    {
        tokio::spawn(self.run(Arc::new(handshake), Arc::new(serve)))
    }

    async fn run<H, HF, C, S, SF>(self, handshake: Arc<H>, serve: Arc<S>)
    where
        H: Fn(L::Io, Option<IpAddr>) -> HF + Send + Sync + 'static,
        HF: Future<Output = Option<C>> + Send + 'static,
        C: Send + 'static,
        S: Fn(C, Calls, watch::Receiver<bool>) -> SF + Send + Sync + 'static,
        SF: Future<Output = ()> + Send + 'static,
    {
        let Self {
            name,
            listener,
            limits,
            refusals,
            mut shutdown,
            drain,
            refusal_label,
        } = self;
        let occupancy = Arc::new(Mutex::new(Occupancy::default()));
        let pool = Arc::new(Semaphore::new(limits.max_pending_handshakes.max(1)));
        let all_calls = Arc::new(AtomicUsize::new(0));
        let all_watches = Arc::new(AtomicUsize::new(0));
        let warn = WarnLimiter::<Option<IpAddr>>::new();
        let mut conns = JoinSet::new();
        'accepting: loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                _ = shutdown.changed() => break,
            };
            let (io, source) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: back off rather than spin.
                    crate::peer_warn!(warn, None, refusals, server = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // The caps first: a refused connection never waits.
            let mut ticket = match Ticket::take(&occupancy, &limits, source) {
                Ok(t) => t,
                Err(limit) => {
                    refusals.refused(refusal_label.unwrap_or(limit));
                    crate::peer_warn!(warn, source, refusals, server = %name, peer = ?source, limit, "connection refused: limit reached");
                    drop(io);
                    continue;
                }
            };
            let handshake = handshake.clone();
            let serve = serve.clone();
            let conn_refusals = refusals.clone();
            let stop = shutdown.clone();
            let deadline = limits.handshake_timeout;
            let hold = limits.admission_hold;
            let answered = Arc::new(Notify::new());
            let calls = Calls {
                source: ticket.source_calls.clone(),
                all: all_calls.clone(),
                watches: all_watches.clone(),
                answered: (!hold.is_zero()).then(|| answered.clone()),
            };
            // The connection, once it has its turn and its place.
            let connection = move |mut ticket: Ticket| async move {
                let done = tokio::time::timeout(deadline, handshake(io, source)).await;
                match done {
                    Ok(Some(conn)) => {
                        let serving = serve(conn, calls, stop);
                        serve_admitted(serving, &mut ticket, &answered, hold).await;
                    }
                    Ok(None) => {}
                    Err(_) => {
                        conn_refusals.refused(label::HANDSHAKE_TIMEOUT);
                        tracing::debug!(peer = ?source, "handshake timed out");
                    }
                }
                drop(ticket);
            };
            // Its source's turn: at once within the source's share; over
            // it, the connection waits in its own task (for its turn, then
            // a place) while the loop accepts on. Nothing is read from it
            // meanwhile, and it counts against its source's open cap.
            if let Some(share) = ticket.share.clone() {
                match share.clone().try_acquire_owned() {
                    Ok(turn) => ticket.turn = Some(turn),
                    Err(_) => {
                        refusals
                            .refused(refusal_label.unwrap_or(label::PENDING_HANDSHAKES_PER_SOURCE));
                        tracing::debug!(server = %name, peer = ?source, "source over its share of the admission pool; the connection waits its turn");
                        let pool = pool.clone();
                        let mut quit = shutdown.clone();
                        conns.spawn(async move {
                            tokio::select! {
                                t = share.acquire_owned() => match t {
                                    Ok(t) => ticket.turn = Some(t),
                                    Err(_) => return,
                                },
                                _ = quit.changed() => return,
                            }
                            tokio::select! {
                                p = pool.acquire_owned() => match p {
                                    Ok(p) => ticket.place = Some(p),
                                    Err(_) => return,
                                },
                                _ = quit.changed() => return,
                            }
                            connection(ticket).await;
                        });
                        continue;
                    }
                }
            }
            // Then a place in the admission pool: while it is full, this
            // connection waits and the next ones wait in the listen backlog.
            let place = match pool.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    refusals.refused(refusal_label.unwrap_or(label::PENDING_HANDSHAKES));
                    tracing::debug!(server = %name, "admission pool full; accepting paused");
                    loop {
                        tokio::select! {
                            p = pool.clone().acquire_owned() => match p {
                                Ok(p) => break p,
                                Err(_) => break 'accepting,
                            },
                            Some(_) = conns.join_next(), if !conns.is_empty() => {}
                            _ = shutdown.changed() => break 'accepting,
                        }
                    }
                }
            };
            ticket.place = Some(place);
            conns.spawn(connection(ticket));
        }
        // New connections are refused from here on.
        drop(listener);
        let all_done = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(drain, all_done).await.is_err() {
            tracing::warn!(server = %name, open = conns.len(), "drain deadline reached; closing the remaining connections");
            conns.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_stay_within_the_open_files_limit() {
        let files = open_files_limit().expect("Linux /proc/self/limits");
        let mut limits = crate::limits::ServerLimits::default().accept;
        limits.max_connections = usize::MAX;
        let within = within_fd_limit(limits.clone());
        assert_eq!(
            within.max_connections as u64,
            files.saturating_sub(FD_RESERVE).max(1)
        );
        limits.max_connections = 10;
        assert_eq!(within_fd_limit(limits).max_connections, 10);
    }

    /// A connection admitted and then silent (its serving never ends)
    /// keeps its place in the pool and its source's share until the hold
    /// bound, then gives both back and is served on; an answer gives them
    /// back at once.
    #[tokio::test(start_paused = true)]
    async fn the_admission_place_lasts_until_the_answer_or_the_hold() {
        let limits = crate::limits::ServerLimits::default().accept;
        let occupancy = Arc::new(Mutex::new(Occupancy::default()));
        let pool = Arc::new(Semaphore::new(1));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let admitting = || {
            let o = occupancy.lock().unwrap();
            o.by_source.get(&ip).map(|s| (s.open, s.admitting))
        };
        for answer in [false, true] {
            let mut ticket = Ticket::take(&occupancy, &limits, Some(ip)).unwrap();
            ticket.place = Some(pool.clone().try_acquire_owned().unwrap());
            let answered = Arc::new(Notify::new());
            let signal = answered.clone();
            let task = tokio::spawn(async move {
                let hold = Duration::from_secs(1);
                serve_admitted(std::future::pending(), &mut ticket, &signal, hold).await;
            });
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(admitting(), Some((1, 1)));
            assert_eq!(pool.available_permits(), 0);
            if answer {
                answered.notify_one();
                tokio::time::sleep(Duration::from_millis(1)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(600)).await;
            }
            assert_eq!(admitting(), Some((1, 0)), "released, still open");
            assert_eq!(pool.available_permits(), 1);
            assert!(!task.is_finished(), "served on");
            task.abort();
            let _ = task.await;
            assert_eq!(admitting(), None);
        }
    }

    #[test]
    fn ipv6_sources_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_of(a), source_of(b));
        assert_ne!(source_of(a), source_of(c));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(source_of(mapped), "10.1.2.3".parse::<IpAddr>().unwrap());
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(source_of(v4), v4);
    }
}
