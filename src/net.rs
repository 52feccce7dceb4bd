//! Serving connections under the limits of [`crate::limits`]: one accept
//! loop for TCP (with TLS) and Unix sockets, HTTP/2 connections for gRPC and
//! HTTP/1 for the operations endpoint, and a drain with one deadline.
//!
//! - [`Acceptor`] caps connections in all and per source address, and TLS
//!   handshakes in progress in all and per source (so one source cannot
//!   take the pool), each handshake under a deadline. A refused connection
//!   is closed at once, counted, and logged at a rate-limited pace.
//! - [`serve_h2`] serves one HTTP/2 connection: concurrent streams and the
//!   header list size advertised and enforced by HTTP/2 (refusals seen on the
//!   wire and counted), a preface deadline, an idle timeout, a maximum age,
//!   and a deadline on every request that covers a body that never comes.
//! - [`serve_http1`] serves one HTTP/1 connection (the operations endpoint)
//!   with a header-read deadline and a deadline on the whole connection.
//!
//! On shutdown the accept loop stops and drops its listener, every
//! connection gets `GOAWAY` (in-flight calls finish), and every connection
//! task still running at the drain deadline is aborted; the acceptor's task
//! ends only once every connection task has. (Each call runs in a task of
//! its own that hyper spawns; it ends with its call: within the request
//! deadline on the CA, at shutdown for SDS streams.)

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::limits::{AcceptLimits, HTTP2_PREFACE_LEN, Http2Limits, OpsLimits, Refusals, label};
use crate::logsafe::WarnLimiter;

/// A listening socket: TCP (with the peer's address) or Unix.
pub trait Listener: Send + 'static {
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

/// Open and handshaking connections, in all and per source.
#[derive(Default)]
struct Occupancy {
    total: usize,
    pending: usize,
    /// Per source; entries are removed when its last connection closes.
    by_source: HashMap<IpAddr, Source>,
}

#[derive(Default)]
struct Source {
    open: usize,
    pending: usize,
    /// Calls in flight over all of this source's connections.
    calls: Arc<AtomicUsize>,
}

/// Calls in flight: from the connection's source (TCP) and in all. Given to
/// each connection's `serve`.
#[derive(Clone, Default)]
pub struct Calls {
    pub source: Option<Arc<AtomicUsize>>,
    pub all: Arc<AtomicUsize>,
}

/// A connection's place in [`Occupancy`]; released on drop.
struct Ticket {
    occupancy: Arc<Mutex<Occupancy>>,
    source: Option<IpAddr>,
    pending: bool,
    source_calls: Option<Arc<AtomicUsize>>,
}

impl Ticket {
    /// Takes a place, or names the limit that refuses it.
    fn take(
        occupancy: &Arc<Mutex<Occupancy>>,
        limits: &AcceptLimits,
        source: Option<IpAddr>,
    ) -> Result<Self, &'static str> {
        let mut o = occupancy.lock().map_err(|_| label::CONNECTIONS)?;
        if o.total >= limits.max_connections {
            return Err(label::CONNECTIONS);
        }
        if o.pending >= limits.max_pending_handshakes {
            return Err(label::PENDING_HANDSHAKES);
        }
        let mut source_calls = None;
        if let Some(ip) = source {
            let (open, pending) = o.by_source.get(&ip).map_or((0, 0), |s| (s.open, s.pending));
            if limits
                .max_connections_per_source
                .is_some_and(|max| open >= max)
            {
                return Err(label::CONNECTIONS_PER_SOURCE);
            }
            if pending >= limits.max_pending_handshakes_per_source {
                return Err(label::PENDING_HANDSHAKES_PER_SOURCE);
            }
            let e = o.by_source.entry(ip).or_default();
            e.open += 1;
            e.pending += 1;
            source_calls = Some(e.calls.clone());
        }
        o.total += 1;
        o.pending += 1;
        Ok(Self {
            occupancy: occupancy.clone(),
            source,
            pending: true,
            source_calls,
        })
    }

    /// The handshake is over (done or failed): the place in the handshake
    /// pool is freed, the connection's stays.
    fn handshake_done(&mut self) {
        if !std::mem::take(&mut self.pending) {
            return;
        }
        if let Ok(mut o) = self.occupancy.lock() {
            o.pending = o.pending.saturating_sub(1);
            if let Some(e) = self.source.and_then(|ip| o.by_source.get_mut(&ip)) {
                e.pending = e.pending.saturating_sub(1);
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.handshake_done();
        if let Ok(mut o) = self.occupancy.lock() {
            o.total = o.total.saturating_sub(1);
            if let Some(ip) = self.source {
                let gone = o.by_source.get_mut(&ip).is_some_and(|e| {
                    e.open = e.open.saturating_sub(1);
                    e.open == 0 && e.pending == 0
                });
                if gone {
                    o.by_source.remove(&ip);
                }
            }
        }
    }
}

/// An accept loop under [`AcceptLimits`].
pub struct Acceptor<L> {
    /// What is being served, for logs ("CA gRPC", "SDS <path>", "ops").
    pub name: String,
    pub listener: L,
    pub limits: AcceptLimits,
    pub refusals: Refusals,
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
        let all_calls = Arc::new(AtomicUsize::new(0));
        let warn = WarnLimiter::<Option<IpAddr>>::new();
        let mut conns = JoinSet::new();
        loop {
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
            let refusals = refusals.clone();
            let stop = shutdown.clone();
            let deadline = limits.handshake_timeout;
            let calls = Calls {
                source: ticket.source_calls.clone(),
                all: all_calls.clone(),
            };
            conns.spawn(async move {
                let done = tokio::time::timeout(deadline, handshake(io, source)).await;
                ticket.handshake_done();
                match done {
                    Ok(Some(conn)) => serve(conn, calls, stop).await,
                    Ok(None) => {}
                    Err(_) => {
                        refusals.refused(label::HANDSHAKE_TIMEOUT);
                        tracing::debug!(peer = ?source, "handshake timed out");
                    }
                }
                drop(ticket);
            });
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

/// Per-connection counters shared by the I/O wrapper, the request layer
/// and the connection's watchdog.
struct ConnStats {
    opened: Instant,
    bytes_in: AtomicU64,
    /// Calls in flight on this connection, by a sequence number (so the
    /// first entry is the oldest), with when each began.
    calls: Mutex<std::collections::BTreeMap<u64, Instant>>,
    next_call: AtomicU64,
    /// Milliseconds after `opened` at which the last call ended.
    idle_since_ms: AtomicU64,
    refusals: Refusals,
}

impl ConnStats {
    fn stream_opened(self: &Arc<Self>) -> StreamGuard {
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut calls) = self.calls.lock() {
            calls.insert(id, Instant::now());
        }
        StreamGuard(self.clone(), id)
    }

    /// How long the connection has had no call in flight; `None` while it
    /// has one.
    fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.calls.lock().map_or(true, |c| !c.is_empty()) {
            return None;
        }
        let since = self.opened + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(now.saturating_duration_since(since))
    }

    /// When the oldest call in flight began.
    fn oldest_call(&self) -> Option<Instant> {
        self.calls
            .lock()
            .ok()
            .and_then(|c| c.first_key_value().map(|(_, at)| *at))
    }

    /// A stream reset the server's HTTP/2 layer sent on its own.
    /// `REFUSED_STREAM`: the stream cap. `PROTOCOL_ERROR`: h2 answers an
    /// oversized header list with HTTP 431 and then this reset (any other
    /// malformed stream is counted there too).
    fn reset_sent(&self, code: u32) {
        match code {
            REFUSED_STREAM => self.refusals.refused(label::STREAMS_PER_CONNECTION),
            PROTOCOL_ERROR => self.refusals.refused(label::HEADER_LIST_SIZE),
            _ => {}
        }
    }
}

/// One call (stream) in flight, until its response body is done.
struct StreamGuard(Arc<ConnStats>, u64);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let Ok(mut calls) = self.0.calls.lock() else {
            return;
        };
        calls.remove(&self.1);
        if calls.is_empty() {
            let ms = u64::try_from(self.0.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.0.idle_since_ms.store(ms, Ordering::Release);
        }
    }
}

/// The connection's bytes: counts what comes in (for the preface deadline)
/// and reads the frame headers of what HTTP/2 sends out, so that refusals
/// made inside the HTTP/2 layer (`REFUSED_STREAM`, `GOAWAY` with
/// `ENHANCE_YOUR_CALM`) are counted.
struct Observed<S> {
    inner: S,
    stats: Arc<ConnStats>,
    scanner: FrameScanner,
}

impl<S: AsyncRead + Unpin> AsyncRead for Observed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        this.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> Observed<S> {
    fn scan(&mut self, bytes: &[u8]) {
        let stats = &self.stats;
        self.scanner
            .feed(bytes, &mut |kind, code| match (kind, code) {
                (FRAME_RST_STREAM, code) => stats.reset_sent(code),
                (FRAME_GOAWAY, ENHANCE_YOUR_CALM) => stats.refusals.refused(label::RESET_FLOOD),
                _ => {}
            });
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Observed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.scan(&buf[..n.min(buf.len())]);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            let mut left = n;
            for b in bufs {
                if left == 0 {
                    break;
                }
                let take = left.min(b.len());
                this.scan(&b[..take]);
                left -= take;
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_GOAWAY: u8 = 0x7;
const PROTOCOL_ERROR: u32 = 0x1;
const REFUSED_STREAM: u32 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Follows HTTP/2 frame boundaries in a byte stream and reports the error
/// code of every `RST_STREAM` and `GOAWAY` frame.
#[derive(Default)]
struct FrameScanner {
    head: [u8; 9],
    head_len: usize,
    kind: u8,
    /// Payload bytes of the current frame still to come.
    remaining: usize,
    code: [u8; 8],
    code_len: usize,
    code_want: usize,
}

impl FrameScanner {
    fn feed(&mut self, mut bytes: &[u8], report: &mut impl FnMut(u8, u32)) {
        while !bytes.is_empty() {
            if self.remaining == 0 {
                let n = (9 - self.head_len).min(bytes.len());
                self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
                self.head_len += n;
                bytes = &bytes[n..];
                if self.head_len == 9 {
                    self.head_len = 0;
                    self.remaining = usize::from(self.head[0]) << 16
                        | usize::from(self.head[1]) << 8
                        | usize::from(self.head[2]);
                    self.kind = self.head[3];
                    self.code_len = 0;
                    self.code_want = match self.kind {
                        FRAME_RST_STREAM => 4,
                        FRAME_GOAWAY => 8,
                        _ => 0,
                    };
                }
                continue;
            }
            let n = self.remaining.min(bytes.len());
            if self.code_len < self.code_want {
                let take = (self.code_want - self.code_len).min(n);
                self.code[self.code_len..self.code_len + take].copy_from_slice(&bytes[..take]);
                self.code_len += take;
                if self.code_len == self.code_want {
                    let at = self.code_want - 4;
                    let code = u32::from_be_bytes([
                        self.code[at],
                        self.code[at + 1],
                        self.code[at + 2],
                        self.code[at + 3],
                    ]);
                    report(self.kind, code);
                }
            }
            self.remaining -= n;
            bytes = &bytes[n..];
        }
    }
}

/// The per-connection request layer: connection info for the handlers,
/// streams counted, and the request deadline.
#[derive(Clone)]
struct ConnService<S, I> {
    inner: S,
    info: I,
    stats: Arc<ConnStats>,
    request_timeout: Option<Duration>,
    calls: Calls,
    max_calls_per_source: Option<usize>,
    max_calls: Option<usize>,
}

/// A call's place in the source's and the server's in-flight counts.
struct CallSlot(Vec<Arc<AtomicUsize>>);

impl CallSlot {
    /// Takes a place in each count under its maximum, or names the limit
    /// that refuses the call.
    fn take(
        calls: &Calls,
        max_per_source: Option<usize>,
        max: Option<usize>,
    ) -> Result<Self, &'static str> {
        let mut slot = Self(Vec::with_capacity(2));
        for (counter, max, limit) in [
            (
                calls.source.as_ref(),
                max_per_source,
                label::CALLS_PER_SOURCE,
            ),
            (Some(&calls.all), max, label::CALLS),
        ] {
            let Some(counter) = counter else { continue };
            let before = counter.fetch_add(1, Ordering::AcqRel);
            slot.0.push(counter.clone());
            if max.is_some_and(|max| before >= max) {
                return Err(limit);
            }
        }
        Ok(slot)
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        for c in &self.0 {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A gRPC service as tonic's `Routes` is one: never fails, answers with
/// tonic's body, cloned per connection.
pub trait GrpcService<B>:
    tower::Service<
        http::Request<B>,
        Response = http::Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<T, B> GrpcService<B> for T where
    T: tower::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

impl<S, I, B> tower::Service<http::Request<B>> for ConnService<S, I>
where
    S: GrpcService<B>,
    I: Clone + Send + Sync + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let guard = self.stats.stream_opened();
        let refusals = self.stats.refusals.clone();
        // Refused before the handler (and its buffers) exist: a client
        // holding many calls open costs little more than their streams.
        let slot = match CallSlot::take(&self.calls, self.max_calls_per_source, self.max_calls) {
            Ok(slot) => slot,
            Err(limit) => {
                refusals.refused(limit);
                drop(req);
                return Box::pin(std::future::ready(Ok(tonic::Status::resource_exhausted(
                    "too many calls in flight; retry with back-off",
                )
                .into_http())));
            }
        };
        req.extensions_mut().insert(self.info.clone());
        // The client's own deadline shortens ours, never lengthens it.
        let deadline = match (self.request_timeout, grpc_timeout(req.headers())) {
            (Some(ours), Some(theirs)) => Some(ours.min(theirs)),
            (ours, _) => ours,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = match deadline {
                None => fut.await?,
                Some(d) => match tokio::time::timeout(d, fut).await {
                    Ok(r) => r?,
                    Err(_) => {
                        refusals.refused(label::REQUEST_TIMEOUT);
                        return Ok(tonic::Status::deadline_exceeded(format!(
                            "request not completed within {d:?}"
                        ))
                        .into_http());
                    }
                },
            };
            // tonic answers an over-long message with OUT_OF_RANGE before
            // the handler runs (a trailers-only response).
            if resp
                .headers()
                .get("grpc-status")
                .is_some_and(|v| v.as_bytes() == b"11")
            {
                refusals.refused(label::MESSAGE_SIZE);
            }
            // The stream counts as in flight until its response body is done
            // (SDS responses are long-lived streams).
            let (parts, body) = resp.into_parts();
            let body = body.map_frame(move |frame| {
                let _in_flight = (&guard, &slot);
                frame
            });
            Ok(http::Response::from_parts(
                parts,
                tonic::body::Body::new(body),
            ))
        })
    }
}

/// The `grpc-timeout` request header: up to 8 digits and a unit (`H`, `M`,
/// `S`, `m`, `u`, `n`), per the gRPC over HTTP/2 spec.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Serves one HTTP/2 connection with `service` (usually tonic's `Routes`)
/// until it closes, its preface deadline passes without a preface, or
/// shutdown (then gracefully). `info` is inserted into every request's
/// extensions (tonic's connect info, for `remote_addr` and `peer_certs`).
pub async fn serve_h2<IO, S, I>(
    io: IO,
    info: I,
    service: S,
    limits: &Http2Limits,
    refusals: &Refusals,
    calls: Calls,
    mut shutdown: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: GrpcService<hyper::body::Incoming>,
    I: Clone + Send + Sync + 'static,
{
    let stats = Arc::new(ConnStats {
        opened: Instant::now(),
        bytes_in: AtomicU64::new(0),
        calls: Mutex::new(std::collections::BTreeMap::new()),
        next_call: AtomicU64::new(0),
        idle_since_ms: AtomicU64::new(0),
        refusals: refusals.clone(),
    });
    let io = Observed {
        inner: io,
        stats: stats.clone(),
        scanner: FrameScanner::default(),
    };
    let svc = ConnService {
        inner: service,
        info,
        stats: stats.clone(),
        request_timeout: limits.request_timeout,
        calls,
        max_calls_per_source: limits.max_calls_per_source,
        max_calls: limits.max_calls,
    };
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams_per_connection)
        .max_header_list_size(limits.max_header_list_bytes)
        .initial_stream_window_size(limits.stream_window_bytes)
        .initial_connection_window_size(limits.connection_window_bytes)
        .max_local_error_reset_streams(limits.max_reset_streams)
        .max_pending_accept_reset_streams(limits.max_pending_accept_resets)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
    tokio::pin!(conn);

    let opened = stats.opened;
    let mut preface_due = Some(opened + limits.preface_timeout);
    let age_due = limits.max_connection_age.map(|a| opened + a);
    // A call still in flight this long after it began has had its answer
    // (DEADLINE_EXCEEDED at the latest) for a second: a client that does
    // not take it (a zero flow-control window) loses the connection.
    let stall = limits.request_timeout.map(|t| t + STALL_GRACE);
    let mut draining_since: Option<Instant> = None;
    loop {
        let now = Instant::now();
        // The next moment something may have to happen.
        let idle_due = limits.idle_timeout.map(|idle| match stats.idle_for(now) {
            Some(for_) => now + idle.saturating_sub(for_),
            None => now + idle,
        });
        let stall_due = stall.map(|s| stats.oldest_call().map_or(now + s, |at| at + s));
        let wake = match draining_since {
            // After GOAWAY, only the grace period (and stalled calls) count.
            Some(since) => [Some(since + limits.goaway_grace), stall_due],
            None => [
                [preface_due, idle_due, age_due].into_iter().flatten().min(),
                stall_due,
            ],
        }
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(now + Duration::from_secs(3600));
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "HTTP/2 connection ended with an error");
                }
                return;
            }
            _ = shutdown.changed(), if draining_since.is_none() => {
                conn.as_mut().graceful_shutdown();
                draining_since = Some(Instant::now());
            }
            _ = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                if stall
                    .zip(stats.oldest_call())
                    .is_some_and(|(s, at)| now >= at + s)
                {
                    refusals.refused(label::RESPONSE_STALLED);
                    tracing::debug!("a call outlived its deadline (its answer not taken); closing the connection");
                    return;
                }
                if draining_since.is_some_and(|since| now >= since + limits.goaway_grace) {
                    tracing::debug!("calls still open after the GOAWAY grace period; closing the connection");
                    return;
                }
                if draining_since.is_some() {
                    continue;
                }
                if preface_due.is_some_and(|due| now >= due) {
                    preface_due = None;
                    if stats.bytes_in.load(Ordering::Relaxed) < HTTP2_PREFACE_LEN {
                        refusals.refused(label::PREFACE_TIMEOUT);
                        tracing::debug!("no HTTP/2 preface before the deadline; closing");
                        return;
                    }
                }
                let idle = limits
                    .idle_timeout
                    .zip(stats.idle_for(now))
                    .is_some_and(|(max, for_)| for_ >= max);
                if idle {
                    refusals.refused(label::IDLE_TIMEOUT);
                    tracing::debug!("idle connection; sending GOAWAY");
                }
                if idle || age_due.is_some_and(|due| now >= due) {
                    conn.as_mut().graceful_shutdown();
                    draining_since = Some(now);
                }
            }
        }
    }
}

/// How long after its deadline a call's answer may wait for the client to
/// take it.
const STALL_GRACE: Duration = Duration::from_secs(1);

/// Serves one HTTP/1 connection of the operations endpoint: headers within
/// `header_read_timeout`, the whole connection within `connection_timeout`.
pub async fn serve_http1<IO>(
    io: IO,
    router: axum::Router,
    limits: &OpsLimits,
    refusals: &Refusals,
    mut shutdown: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(64 * 1024);
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(router));
    tokio::pin!(conn);
    let deadline = tokio::time::sleep(limits.connection_timeout);
    tokio::pin!(deadline);
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    if e.is_timeout() {
                        refusals.refused(label::OPS_TIMEOUT);
                    }
                    tracing::debug!(error = %e, "ops connection ended with an error");
                }
                return;
            }
            _ = shutdown.changed(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = &mut deadline => {
                refusals.refused(label::OPS_TIMEOUT);
                return;
            }
        }
    }
}

/// Serves the operations endpoint on `listener` with its own limits.
pub fn spawn_ops(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: OpsLimits,
    refusals: Refusals,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let accept = AcceptLimits {
        max_connections: limits.max_connections,
        max_connections_per_source: Some(limits.max_connections_per_source),
        max_pending_handshakes: limits.max_connections,
        max_pending_handshakes_per_source: limits.max_connections_per_source,
        handshake_timeout: limits.header_read_timeout,
    };
    let serve_refusals = refusals.clone();
    Acceptor {
        name: "ops".into(),
        listener,
        limits: accept,
        refusals,
        shutdown,
        drain: Duration::from_secs(1),
        refusal_label: Some(label::OPS_CONNECTIONS),
    }
    .spawn(
        |io, _| std::future::ready(Some(io)),
        move |io, _, stop| {
            let router = router.clone();
            let limits = limits.clone();
            let refusals = serve_refusals.clone();
            async move { serve_http1(io, router, &limits, &refusals, stop).await }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, 0];
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

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

    #[test]
    fn grpc_timeouts_parse_per_the_spec() {
        let t = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&h)
        };
        assert_eq!(t("5S"), Some(Duration::from_secs(5)));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("100u"), Some(Duration::from_micros(100)));
        for bad in ["", "S", "5", "5x", "123456789S", "-1S"] {
            assert_eq!(t(bad), None, "{bad:?}");
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

    #[test]
    fn the_scanner_follows_frames_however_the_bytes_are_split() {
        let mut wire = Vec::new();
        wire.extend(frame(0x4, 0, &[0; 12])); // SETTINGS
        wire.extend(frame(0x1, 1, &[0x88; 40])); // HEADERS
        wire.extend(frame(FRAME_RST_STREAM, 3, &REFUSED_STREAM.to_be_bytes()));
        wire.extend(frame(0x0, 1, &[7; 1000])); // DATA
        wire.extend(frame(FRAME_RST_STREAM, 5, &PROTOCOL_ERROR.to_be_bytes()));
        let mut goaway = 5u32.to_be_bytes().to_vec();
        goaway.extend(ENHANCE_YOUR_CALM.to_be_bytes());
        goaway.extend(b"debug data");
        wire.extend(frame(FRAME_GOAWAY, 0, &goaway));
        let expected = vec![
            (FRAME_RST_STREAM, REFUSED_STREAM),
            (FRAME_RST_STREAM, PROTOCOL_ERROR),
            (FRAME_GOAWAY, ENHANCE_YOUR_CALM),
        ];
        for chunk in [1, 2, 3, 5, 8, 9, 10, 64, 4096] {
            let mut scanner = FrameScanner::default();
            let mut seen = Vec::new();
            for piece in wire.chunks(chunk) {
                scanner.feed(piece, &mut |k, c| seen.push((k, c)));
            }
            assert_eq!(seen, expected, "chunks of {chunk}");
        }
    }
}
