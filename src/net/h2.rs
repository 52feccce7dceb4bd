//! One HTTP/2 connection under [`Http2Limits`]: streams and header lists
//! advertised and enforced by HTTP/2 (its own refusals read off the wire and
//! counted), preface, idle, age and GOAWAY deadlines, calls in flight capped
//! per source and in all, a deadline on every call, and a close when an
//! answer is never taken.

use crate::sync::LockExt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use super::Calls;
use super::frames::{
    ENHANCE_YOUR_CALM, FRAME_GOAWAY, FRAME_RST_STREAM, FrameScanner, PROTOCOL_ERROR, REFUSED_STREAM,
};
use crate::limits::{HTTP2_PREFACE_LEN, Http2Limits, Refusals, label};

/// Per-connection counters shared by the I/O wrapper, the request layer
/// and the connection's watchdog.
struct ConnStats {
    opened: Instant,
    bytes_in: AtomicU64,
    /// Calls in flight on this connection, by a sequence number (so the
    /// first entry is the oldest), with when each began.
    /// The flag: whether the call has a deadline (a long-lived stream,
    /// such as the bundle watch, has none and never counts as stalled).
    calls: Mutex<std::collections::BTreeMap<u64, (Instant, bool)>>,
    next_call: AtomicU64,
    /// Milliseconds after `opened` at which the last call ended.
    idle_since_ms: AtomicU64,
    refusals: Refusals,
    /// Long-lived calls open on this connection.
    watches: Arc<AtomicUsize>,
    /// Told once, when the first call is answered (see [`Calls::answered`]).
    answered: Option<Arc<tokio::sync::Notify>>,
    answered_sent: AtomicBool,
}

impl ConnStats {
    /// A call was answered (a response frame went out, or the call ended):
    /// the first time, the acceptor is told, and the connection leaves the
    /// admission pool.
    fn answered(&self) {
        if let Some(n) = &self.answered
            && !self.answered_sent.swap(true, Ordering::AcqRel)
        {
            n.notify_one();
        }
    }

    fn stream_opened(self: &Arc<Self>, timed: bool) -> StreamGuard {
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        self.calls.locked().insert(id, (Instant::now(), timed));
        StreamGuard(self.clone(), id)
    }

    /// How long the connection has had no call in flight; `None` while it
    /// has one.
    fn idle_for(&self, now: Instant) -> Option<Duration> {
        if !self.calls.locked().is_empty() {
            return None;
        }
        let since = self.opened + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(now.saturating_duration_since(since))
    }

    /// When the oldest call in flight with a deadline began.
    fn oldest_call(&self) -> Option<Instant> {
        self.calls
            .locked()
            .values()
            .find(|(_, timed)| *timed)
            .map(|(at, _)| *at)
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
        self.0.answered();
        let mut calls = self.0.calls.locked();
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
///
/// While [`Drive`] corks it, what HTTP/2 writes is held (up to
/// [`CORK_MAX_BYTES`]) and goes out with the next write or flush after the
/// cork is lifted: one TLS record and one `writev` for what a pass over the
/// connection produced (a SETTINGS acknowledgement, an answer's HEADERS, DATA
/// and trailers, the answers of other calls), where HTTP/2 alone writes a
/// few (it writes an answer's trailers after a flow-control step).
struct Observed<S> {
    inner: S,
    stats: Arc<ConnStats>,
    scanner: FrameScanner,
    cork: Arc<AtomicBool>,
    /// Bytes written while corked, from `held_from` on not yet passed on.
    held: Vec<u8>,
    held_from: usize,
}

/// What a corked connection holds at most before it writes through: one
/// TLS record's worth (eight or so answers).
const CORK_MAX_BYTES: usize = 16 * 1024;

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
    /// Corked, and the client's preface read. (Not before: the server's
    /// SETTINGS go out at once, whatever the client waits for, since HTTP/2
    /// does not flush again until the preface is in.)
    fn corked(&self) -> bool {
        self.cork.load(Ordering::Relaxed)
            && self.stats.bytes_in.load(Ordering::Relaxed) >= HTTP2_PREFACE_LEN
    }

    /// Whether `len` more bytes may be held rather than written.
    fn holds(&self, len: usize) -> bool {
        self.corked() && self.held.len().saturating_add(len) <= CORK_MAX_BYTES
    }

    /// Passes on what is held; `Ready(Ok)` once nothing is.
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(rest) = self.held.get(self.held_from..).filter(|r| !r.is_empty()) {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held_from = self.held_from.saturating_add(n);
        }
        // Freed, not kept: an idle connection holds no buffer.
        self.held = Vec::new();
        self.held_from = 0;
        Poll::Ready(Ok(()))
    }

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
        if this.holds(buf.len()) {
            this.scan(buf);
            if this.held.capacity() == 0 {
                this.held.reserve(4096);
            }
            this.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        ready!(this.poll_release(cx))?;
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.scan(buf.get(..n).unwrap_or(buf));
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = bufs.iter().fold(0usize, |n, b| n.saturating_add(b.len()));
        if this.holds(len) {
            if this.held.capacity() == 0 {
                this.held.reserve(4096);
            }
            for b in bufs {
                this.scan(b);
                this.held.extend_from_slice(b);
            }
            return Poll::Ready(Ok(len));
        }
        ready!(this.poll_release(cx))?;
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            let mut left = n;
            for b in bufs {
                if left == 0 {
                    break;
                }
                let take = left.min(b.len());
                this.scan(b.get(..take).unwrap_or_default());
                left -= take;
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.corked() {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
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

/// Long-lived calls (bundle watches) one connection may hold open: an
/// agent needs one.
pub(super) const MAX_WATCHES_PER_CONNECTION: usize = 1;
/// Long-lived calls open in all (one per node of a large cluster).
pub(super) const MAX_WATCHES: usize = 16_384;

/// One count a call takes a place in: the counter (none: not counted),
/// its maximum (none: unlimited), and the limit's label.
type Count<'a> = (Option<&'a Arc<AtomicUsize>>, Option<usize>, &'static str);

/// A call's place in the source's and the server's in-flight counts.
struct CallSlot(Vec<Arc<AtomicUsize>>);

impl CallSlot {
    /// A long-lived call's place in its connection's and the server's
    /// counts of them, or the limit that refuses it.
    fn take_watch(
        connection: &Arc<AtomicUsize>,
        all: &Arc<AtomicUsize>,
    ) -> Result<Self, &'static str> {
        Self::take_in([
            (
                Some(connection),
                Some(MAX_WATCHES_PER_CONNECTION),
                label::WATCHES_PER_CONNECTION,
            ),
            (Some(all), Some(MAX_WATCHES), label::WATCHES),
        ])
    }

    /// A call's place in its source's and the server's counts of calls in
    /// flight, or the limit that refuses it.
    fn take(
        calls: &Calls,
        max_per_source: Option<usize>,
        max: Option<usize>,
    ) -> Result<Self, &'static str> {
        Self::take_in([
            (
                calls.source.as_ref(),
                max_per_source,
                label::CALLS_PER_SOURCE,
            ),
            (Some(&calls.all), max, label::CALLS),
        ])
    }

    /// Takes a place in each count (absent ones skipped) under its maximum
    /// (none: unlimited), or names the limit that refuses it; what was
    /// taken is given back on drop either way.
    fn take_in(counts: [Count<'_>; 2]) -> Result<Self, &'static str> {
        let mut slot = Self(Vec::with_capacity(2));
        for (counter, max, limit) in counts {
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
        let long_lived = LONG_LIVED.contains(&req.uri().path());
        let guard = self.stats.stream_opened(!long_lived);
        let refusals = self.stats.refusals.clone();
        // Refused before the handler (and its buffers) exist: a client
        // holding many calls open costs little more than their streams.
        // Long-lived calls have their own budget (a few per connection, so
        // bounded by the connection limits) and never use the CSR calls'.
        let taken = if long_lived {
            CallSlot::take_watch(&self.stats.watches, &self.calls.watches)
        } else {
            CallSlot::take(&self.calls, self.max_calls_per_source, self.max_calls)
        };
        let slot = match taken {
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
            _ if long_lived => None,
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
                // The first answer of a long-lived stream (SDS) is a frame
                // of a body that never ends.
                guard.0.answered();
                frame
            });
            Ok(http::Response::from_parts(
                parts,
                tonic::body::Body::new(body),
            ))
        })
    }
}

/// Calls that stay open for the life of the connection (they answer with
/// a stream of updates): no call deadline, never counted as stalled. They
/// still count against the call limits, and end with the connection (at
/// its maximum age, its client reconnects).
const LONG_LIVED: &[&str] = &["/workloadca.v1.TrustBundleService/WatchBundle"];

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

/// The executor hyper hands a connection's streams to: they are polled by
/// the connection's own task ([`Drive`]) rather than spawned as tasks of
/// their own. A call's answer is then queued in the same task that writes
/// the connection, so HEADERS, DATA and trailers (and the answers of every
/// call that finished meanwhile) go out in one TLS write, instead of the
/// connection's task being woken on another thread (and writing) for each
/// frame; no task is spawned per call. Calls of one connection run one at
/// a time; a server's parallelism is across connections.
#[derive(Clone, Default)]
struct ConnStreams(Arc<Mutex<Vec<BoxFuture<()>>>>);

impl<F> hyper::rt::Executor<F> for ConnStreams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.locked().push(Box::pin(fut));
    }
}

/// A connection and its streams, polled together (see [`ConnStreams`]).
///
/// The connection's output is corked (see [`Observed`]) while a poll goes
/// round the connection and its calls; when nothing more is to be done, the
/// cork is lifted and one last round of the connection writes what all the
/// rounds produced.
struct Drive<C> {
    conn: Pin<Box<C>>,
    new: ConnStreams,
    running: FuturesUnordered<BoxFuture<()>>,
    cork: Arc<AtomicBool>,
}

/// Rounds of one poll of [`Drive`] before it yields to other tasks.
const DRIVE_ROUNDS: usize = 32;

impl<C: Future> Drive<C> {
    fn take_new(&mut self) -> bool {
        let mut new = self.new.0.locked();
        let any = !new.is_empty();
        self.running.extend(new.drain(..));
        any
    }
}

impl<C: Future> Future for Drive<C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut rounds = 0;
        let mut corked = true;
        loop {
            // Reads, new streams, and frames queued (written once uncorked).
            self.cork.store(corked, Ordering::Relaxed);
            if let Poll::Ready(out) = self.conn.as_mut().poll(cx) {
                self.cork.store(false, Ordering::Relaxed);
                return Poll::Ready(out);
            }
            let new = self.take_new();
            let mut finished = false;
            while let Poll::Ready(Some(())) = self.running.poll_next_unpin(cx) {
                finished = true;
            }
            rounds += 1;
            // Answers were queued (or streams began): the connection takes
            // them, and reads what came meanwhile, up to DRIVE_ROUNDS.
            let busy = new || finished;
            if busy && rounds < DRIVE_ROUNDS {
                corked = true;
                continue;
            }
            if !corked {
                // Still busy after DRIVE_ROUNDS: back after other tasks.
                if busy {
                    cx.waker().wake_by_ref();
                }
                return Poll::Pending;
            }
            // Nothing more for now: a last round, uncorked, writes it all.
            corked = false;
        }
    }
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
        watches: Arc::new(AtomicUsize::new(0)),
        answered: calls.answered.clone(),
        answered_sent: AtomicBool::new(false),
    });
    let cork = Arc::new(AtomicBool::new(false));
    let io = Observed {
        inner: io,
        stats: stats.clone(),
        scanner: FrameScanner::default(),
        cork: cork.clone(),
        held: Vec::new(),
        held_from: 0,
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
    let streams = ConnStreams::default();
    let mut builder = hyper::server::conn::http2::Builder::new(streams.clone());
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
    let mut conn = Drive {
        conn: Box::pin(conn),
        new: streams,
        running: FuturesUnordered::new(),
        cork,
    };

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
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "HTTP/2 connection ended with an error");
                }
                return;
            }
            _ = shutdown.changed(), if draining_since.is_none() => {
                conn.conn.as_mut().graceful_shutdown();
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
                    conn.conn.as_mut().graceful_shutdown();
                    draining_since = Some(now);
                }
            }
        }
    }
}

/// How long after its deadline a call's answer may wait for the client to
/// take it.
const STALL_GRACE: Duration = Duration::from_secs(1);

#[cfg(test)]
#[path = "h2_tests.rs"]
mod tests;
