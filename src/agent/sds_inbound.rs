//! The requests of an SDS stream, read off its HTTP/2 body with a buffer
//! that does not outlive its message.
//!
//! tonic's `Streaming` keeps the decode buffer it grew for the largest
//! message so far for as long as the stream lives. An Envoy's first request
//! carries its whole node (~61 KB with extensions) and its later ones are
//! ACKs of ~150 bytes, so each stream held ~64 KB for its lifetime (SPIRE
//! #5348: ~3.5 GB at ~900 streams). Here a message's buffer is released
//! as soon as it is decoded, when it grew past [`KEEP_BYTES`]. The size
//! limit is the same (`max_message_bytes`, refused with `OUT_OF_RANGE`
//! before any of the message is buffered).

use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio_stream::Stream;
use tonic::Status;
use tonic::codegen::{Body, StdError};

/// The requests of one stream.
pub(super) type Inbound<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send + 'static>>;

/// gRPC's message header: compression flag and length.
const HEADER_BYTES: usize = 5;
/// A buffer larger than this is released once its message is decoded (an
/// ACK's is far smaller, a first request's far larger).
const KEEP_BYTES: usize = 1024;

/// The gRPC messages of an HTTP body, uncompressed (we accept no
/// compression), each at most `max` bytes.
pub(super) struct Requests<B, M> {
    body: Pin<Box<B>>,
    buf: BytesMut,
    max: usize,
    ended: bool,
    _message: PhantomData<fn() -> M>,
}

impl<B, M> Requests<B, M>
where
    B: Body + Send + 'static,
    B::Error: Into<StdError>,
    M: prost::Message + Default + 'static,
{
    pub(super) fn new(body: B, max: usize) -> Self {
        Self {
            body: Box::pin(body),
            buf: BytesMut::new(),
            max,
            ended: false,
            _message: PhantomData,
        }
    }

    /// The next whole message in the buffer, if there is one.
    fn message(&mut self) -> Result<Option<M>, Status> {
        let Some(&[flag, l0, l1, l2, l3]) = self.buf.get(..HEADER_BYTES) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([l0, l1, l2, l3]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        match flag {
            0 => {}
            1 => {
                // The gRPC spec: a compressed message without a negotiated
                // encoding is INTERNAL.
                return Err(Status::internal(
                    "a compressed message, but this server accepts no compression",
                ));
            }
            f => {
                return Err(Status::internal(format!(
                    "protocol error: the compression flag is {f}, not 0 or 1"
                )));
            }
        }
        if len > self.max {
            return Err(Status::out_of_range(format!(
                "Error, decoded message length too large: found {len} bytes, the limit is: {} bytes",
                self.max
            )));
        }
        let whole = HEADER_BYTES + len;
        let Some(body) = self.buf.get(HEADER_BYTES..whole) else {
            // The rest arrives in frames: room for exactly the message.
            self.buf.reserve(whole - self.buf.len());
            return Ok(None);
        };
        let msg =
            M::decode(body).map_err(|e| Status::internal(format!("decoding a request: {e}")))?;
        self.buf.advance(whole);
        if self.buf.len() <= KEEP_BYTES {
            // What follows (usually nothing) moves to a buffer its size, so
            // a buffer grown for a large message never outlives it. (A
            // larger rest stays where it is: each byte is moved at most
            // once, however many small messages share a frame.)
            self.buf = BytesMut::from(self.buf.as_ref());
        }
        Ok(Some(msg))
    }
}

impl<B, M> Stream for Requests<B, M>
where
    B: Body + Send + 'static,
    B::Error: Into<StdError>,
    M: prost::Message + Default + 'static,
{
    type Item = Result<M, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            match this.message() {
                Ok(Some(m)) => return Poll::Ready(Some(Ok(m))),
                Ok(None) => {}
                Err(s) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(s)));
                }
            }
            match ready!(this.body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            let n = chunk.len();
                            this.buf.put_slice(chunk);
                            data.advance(n);
                        }
                    }
                }
                Some(Err(e)) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(Status::from_error(e.into()))));
                }
                None => {
                    this.ended = true;
                    if !this.buf.is_empty() {
                        return Poll::Ready(Some(Err(Status::internal(
                            "the request ended inside a message",
                        ))));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "sds_inbound_tests.rs"]
mod tests;
