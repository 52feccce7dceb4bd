//! A deliberately misbehaving HTTP/2 client that writes raw frames.
//!
//! Well-behaved clients (h2, tonic) never cross a server's limits, so they
//! cannot test how the server enforces them. [`RawH2`] writes whatever frames
//! the test asks for: more concurrent streams than `SETTINGS_MAX_CONCURRENT_STREAMS`,
//! oversized header lists, headers without a body, no connection preface at all.
//!
//! Header blocks are encoded with the simplest HPACK representation ("literal
//! header field without indexing, new name"), so no encoder state is needed.
//! Responses are not HPACK-decoded: [`Events`] records which streams got
//! HEADERS, which ended, which were reset and how, and any GOAWAY.
//!
//! Every write is flushed (over TLS, unflushed data never leaves), and writes
//! to a peer that has gone away return an `io::Error` rather than panicking.
#![allow(dead_code)]

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout};

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The default `SETTINGS_MAX_FRAME_SIZE`; outgoing frames never exceed it.
pub const MAX_FRAME_SIZE: usize = 16_384;

// Frame types.
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

// Frame flags.
pub const FLAG_END_STREAM: u8 = 0x1;
pub const FLAG_ACK: u8 = 0x1;
pub const FLAG_END_HEADERS: u8 = 0x4;

// Error codes (RST_STREAM, GOAWAY).
pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

// SETTINGS parameter identifiers.
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// One frame as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    /// With the reserved bit cleared.
    pub stream_id: u32,
    pub payload: Vec<u8>,
}

/// What the server did during one [`RawH2::collect`] / [`RawH2::collect_until`] call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Events {
    /// From the latest server SETTINGS that carried it.
    pub max_concurrent_streams: Option<u32>,
    /// From the latest server SETTINGS that carried it.
    pub max_header_list_size: Option<u32>,
    /// `(stream id, error code)` for each RST_STREAM, in arrival order.
    pub resets: Vec<(u32, u32)>,
    /// `(last stream id, error code)` of the latest GOAWAY.
    pub goaway: Option<(u32, u32)>,
    /// Stream ids that received a HEADERS frame (once per frame).
    pub headers_on: Vec<u32>,
    /// Stream ids that received a frame with END_STREAM.
    pub end_streams: Vec<u32>,
    /// EOF or an I/O error was seen.
    pub closed: bool,
}

impl Events {
    /// How many streams were reset with `REFUSED_STREAM`.
    pub fn refused(&self) -> usize {
        self.resets
            .iter()
            .filter(|(_, code)| *code == REFUSED_STREAM)
            .count()
    }

    /// The RST_STREAM error codes, in arrival order.
    pub fn reset_codes(&self) -> Vec<u32> {
        self.resets.iter().map(|(_, code)| *code).collect()
    }
}

/// Request headers for a gRPC unary call: pseudo-headers first, then
/// `content-type` and `te`. `scheme` is `"https"` or `"http"`.
pub fn grpc_headers_scheme(scheme: &str, authority: &str, path: &str) -> Vec<(String, String)> {
    [
        (":method", "POST"),
        (":scheme", scheme),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_owned(), v.to_owned()))
    .collect()
}

/// [`grpc_headers_scheme`] with `:scheme https`.
pub fn grpc_headers(authority: &str, path: &str) -> Vec<(String, String)> {
    grpc_headers_scheme("https", authority, path)
}

/// A gRPC length-prefixed message: flag 0 (uncompressed), big-endian u32
/// length, then `msg`.
pub fn grpc_message(msg: &[u8]) -> Vec<u8> {
    let len = u32::try_from(msg.len()).expect("gRPC message over 4 GiB");
    let mut out = Vec::with_capacity(5 + msg.len());
    out.push(0);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// Appends `value` as an HPACK integer with a `prefix_bits`-bit prefix
/// (RFC 7541 §5.1); `first` holds the bits above the prefix.
pub fn hpack_int(out: &mut Vec<u8>, first: u8, prefix_bits: u32, value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// Encodes a header block with "literal header field without indexing —
/// new name" for every field, strings not Huffman-coded.
pub fn encode_header_block<N: AsRef<[u8]>, V: AsRef<[u8]>>(headers: &[(N, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        let (name, value) = (name.as_ref(), value.as_ref());
        out.push(0x00);
        hpack_int(&mut out, 0x00, 7, name.len());
        out.extend_from_slice(name);
        hpack_int(&mut out, 0x00, 7, value.len());
        out.extend_from_slice(value);
    }
    out
}

/// Serialises one frame: 9-byte header then payload.
pub fn encode_frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 1 << 24, "frame payload over 2^24 - 1 bytes");
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Splits a payload into frame-sized pieces; an empty payload is one empty piece.
fn frame_chunks(bytes: &[u8]) -> Vec<&[u8]> {
    if bytes.is_empty() {
        vec![bytes]
    } else {
        bytes.chunks(MAX_FRAME_SIZE).collect()
    }
}

/// A raw HTTP/2 client connection over any byte stream.
pub struct RawH2<S> {
    io: S,
    /// Bytes read but not yet returned as frames.
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> RawH2<S> {
    /// Wraps `io` without writing anything (for tests that never send the
    /// preface, or send a broken one with [`RawH2::send_raw`]).
    pub fn new(io: S) -> Self {
        Self {
            io,
            buf: Vec::new(),
        }
    }

    /// Writes the client preface and an empty SETTINGS frame. Waits for nothing.
    pub async fn handshake(io: S) -> io::Result<Self> {
        let mut conn = Self::new(io);
        let mut out = PREFACE.to_vec();
        out.extend(encode_frame(SETTINGS, 0, 0, &[]));
        conn.send_raw(&out).await?;
        Ok(conn)
    }

    /// The underlying stream (e.g. to shut it down).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// Writes `bytes` verbatim and flushes.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// Writes one frame of any type, flags and size, unchecked.
    pub async fn send_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream_id: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        self.send_raw(&encode_frame(kind, flags, stream_id, payload))
            .await
    }

    /// Sends `headers` (see [`encode_header_block`]) on `stream_id`; accepts
    /// `&[(&str, &str)]` as well as the `Vec<(String, String)>` of [`grpc_headers`].
    pub async fn send_headers<N: AsRef<[u8]>, V: AsRef<[u8]>>(
        &mut self,
        stream_id: u32,
        headers: &[(N, V)],
        end_stream: bool,
    ) -> io::Result<()> {
        let block = encode_header_block(headers);
        self.send_header_block(stream_id, &block, end_stream).await
    }

    /// Sends an already-encoded header block: one HEADERS frame, followed by
    /// CONTINUATION frames if the block exceeds [`MAX_FRAME_SIZE`];
    /// END_HEADERS on the last frame, END_STREAM (if asked) on the HEADERS.
    pub async fn send_header_block(
        &mut self,
        stream_id: u32,
        block: &[u8],
        end_stream: bool,
    ) -> io::Result<()> {
        let chunks = frame_chunks(block);
        let mut out = Vec::with_capacity(block.len() + 9 * chunks.len());
        for (i, chunk) in chunks.iter().enumerate() {
            let (kind, mut flags) = if i == 0 {
                (HEADERS, if end_stream { FLAG_END_STREAM } else { 0 })
            } else {
                (CONTINUATION, 0)
            };
            if i + 1 == chunks.len() {
                flags |= FLAG_END_HEADERS;
            }
            out.extend(encode_frame(kind, flags, stream_id, chunk));
        }
        self.send_raw(&out).await
    }

    /// Sends `data` as DATA frames of at most [`MAX_FRAME_SIZE`] bytes,
    /// END_STREAM (if asked) on the last. Ignores flow control.
    pub async fn send_data(
        &mut self,
        stream_id: u32,
        data: &[u8],
        end_stream: bool,
    ) -> io::Result<()> {
        let chunks = frame_chunks(data);
        let mut out = Vec::with_capacity(data.len() + 9 * chunks.len());
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let flags = u8::from(last && end_stream) * FLAG_END_STREAM;
            out.extend(encode_frame(DATA, flags, stream_id, chunk));
        }
        self.send_raw(&out).await
    }

    /// Acknowledges the server's SETTINGS.
    pub async fn send_settings_ack(&mut self) -> io::Result<()> {
        self.send_frame(SETTINGS, FLAG_ACK, 0, &[]).await
    }

    /// Answers a server PING.
    pub async fn send_ping_ack(&mut self, payload: [u8; 8]) -> io::Result<()> {
        self.send_frame(PING, FLAG_ACK, 0, &payload).await
    }

    /// Resets `stream_id` with error `code`.
    pub async fn send_rst(&mut self, stream_id: u32, code: u32) -> io::Result<()> {
        self.send_frame(RST_STREAM, 0, stream_id, &code.to_be_bytes())
            .await
    }

    /// Reads the next frame; `None` on EOF at a frame boundary, an
    /// `UnexpectedEof` error on EOF mid-frame. Cancel-safe: a partially read
    /// frame stays buffered.
    pub async fn read_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let id = u32::from_be_bytes(self.buf[5..9].try_into().unwrap());
                    let frame = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream_id: id & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Ok(Some(frame));
                }
            }
            let mut chunk = [0u8; 8192];
            let n = self.io.read(&mut chunk).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads frames until EOF, an I/O error, or `limit` elapses; see
    /// [`RawH2::collect_until`].
    pub async fn collect(&mut self, limit: Duration) -> Events {
        self.collect_until(limit, |_| false).await
    }

    /// Reads frames until EOF, an I/O error, `limit` elapses, or `done`
    /// (checked after each frame) returns true. ACKs the server's SETTINGS
    /// and PINGs along the way (ignoring write errors: a closed connection
    /// shows up on the next read). Events cover only this call's frames.
    pub async fn collect_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&Events) -> bool,
    ) -> Events {
        let deadline = Instant::now() + limit;
        let mut ev = Events::default();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let frame = match timeout(remaining, self.read_frame()).await {
                Err(_elapsed) => break,
                Ok(Ok(Some(frame))) => frame,
                Ok(Ok(None) | Err(_)) => {
                    ev.closed = true;
                    break;
                }
            };
            self.record(&frame, &mut ev).await;
            if done(&ev) {
                break;
            }
        }
        ev
    }

    /// Folds one frame into `ev`, answering SETTINGS and PING.
    async fn record(&mut self, f: &Frame, ev: &mut Events) {
        let u32_at = |i: usize| {
            f.payload
                .get(i..i + 4)
                .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
        };
        if f.flags & FLAG_END_STREAM != 0 && matches!(f.kind, DATA | HEADERS) {
            ev.end_streams.push(f.stream_id);
        }
        match f.kind {
            HEADERS => ev.headers_on.push(f.stream_id),
            RST_STREAM => ev.resets.push((f.stream_id, u32_at(0).unwrap_or(0))),
            GOAWAY => {
                let last = u32_at(0).unwrap_or(0) & 0x7fff_ffff;
                ev.goaway = Some((last, u32_at(4).unwrap_or(0)));
            }
            SETTINGS if f.flags & FLAG_ACK == 0 => {
                for p in f.payload.chunks_exact(6) {
                    let value = u32::from_be_bytes(p[2..6].try_into().unwrap());
                    match u16::from_be_bytes([p[0], p[1]]) {
                        SETTINGS_MAX_CONCURRENT_STREAMS => ev.max_concurrent_streams = Some(value),
                        SETTINGS_MAX_HEADER_LIST_SIZE => ev.max_header_list_size = Some(value),
                        _ => {}
                    }
                }
                let _ = self.send_settings_ack().await;
            }
            PING if f.flags & FLAG_ACK == 0 => {
                if let Ok(payload) = <[u8; 8]>::try_from(f.payload.as_slice()) {
                    let _ = self.send_ping_ack(payload).await;
                }
            }
            _ => {}
        }
    }
}
