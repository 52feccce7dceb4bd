//! State-of-the-world SDS on the wire. A response is encoded once per
//! change and shared by every stream that sends it: all of
//! `DiscoveryResponse` but its nonce, which each stream appends (the nonce
//! is the message's last field, so the bytes are exactly prost's encoding of
//! the whole message). The `StreamSecrets` route sends these; it and
//! `DeltaSecrets` read their requests with [`Requests`] (a buffer that does
//! not outlive its message); `FetchSecrets` goes to the generated service.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Service, StdError};
use zeroize::Zeroizing;

use super::sds::{BoxStream, Sds, Snapshot};
use super::sds_inbound::{Inbound, Requests};
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use crate::proto::envoy::service::secret::v3::secret_discovery_service_server::{
    SERVICE_NAME, SecretDiscoveryServiceServer,
};

/// `DiscoveryResponse.nonce`, its last field.
const NONCE_FIELD: u32 = 5;
/// The route served here; the other methods go to the generated service.
const STREAM_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
const DELTA_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets";
/// Codec buffers as `crate::proto::SmallCodec`'s: 1 KiB to start with (a
/// push is about 2 KB and grows it once), yielding at 32 KiB.
const CODEC_BUFFER_BYTES: usize = 1024;
const CODEC_YIELD_BYTES: usize = 32 * 1024;
/// Distinct sets of subscribed names whose current response is kept (a
/// proxy opens one stream per name: `default`, `ROOTCA`, or both, or the
/// SPIFFE IDs). A set beyond these is encoded per stream, as before.
const MAX_SHARED: usize = 8;

/// A response without its nonce, encoded once. It holds the private key,
/// so its bytes are wiped when the last stream drops it.
pub(super) struct Encoded {
    pub(super) version_info: String,
    bytes: Zeroizing<Vec<u8>>,
}

impl Encoded {
    /// Encodes `resp` (whose nonce is ignored).
    pub(super) fn new(resp: DiscoveryResponse) -> Self {
        let resp = DiscoveryResponse {
            nonce: String::new(),
            ..resp
        };
        Self {
            bytes: Zeroizing::new(resp.encode_to_vec()),
            version_info: resp.version_info,
        }
    }
}

/// One stream's response: the shared body and its own nonce.
pub(super) struct SotwPush {
    pub(super) body: Arc<Encoded>,
    pub(super) nonce: String,
}

impl SotwPush {
    /// The whole response as a message (for the generated service's
    /// method, which the route below does not use).
    pub(super) fn message(&self) -> Result<DiscoveryResponse, Status> {
        let mut resp = DiscoveryResponse::decode(self.body.bytes.as_slice())
            .map_err(|e| Status::internal(format!("re-reading a response: {e}")))?;
        resp.nonce.clone_from(&self.nonce);
        Ok(resp)
    }
}

/// The current response per set of names, with the snapshot it was made
/// from (held, so that the pointers compared cannot be reused).
struct Entry {
    names: BTreeSet<String>,
    snap: Snapshot,
    body: Arc<Encoded>,
}

/// Responses shared by the streams of one socket.
#[derive(Default)]
pub(super) struct SharedResponses(Mutex<Vec<Entry>>);

fn same<T>(a: Option<&Arc<T>>, b: Option<&Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

impl SharedResponses {
    /// The response for `names` in `snap`, made by `make` (`Ok(None)`: not
    /// all resources exist yet) unless another stream already made it.
    pub(super) fn get(
        &self,
        names: &BTreeSet<String>,
        snap: &Snapshot,
        make: impl FnOnce() -> Result<Option<DiscoveryResponse>, Status>,
    ) -> Result<Option<Arc<Encoded>>, Status> {
        let matches = |e: &Entry| {
            same(e.snap.0.as_ref(), snap.0.as_ref())
                && same(e.snap.1.as_ref(), snap.1.as_ref())
                && e.names == *names
        };
        if let Ok(entries) = self.0.lock()
            && let Some(e) = entries.iter().find(|e| matches(e))
        {
            return Ok(Some(e.body.clone()));
        }
        // Made outside the lock: two streams may both make it once.
        let Some(resp) = make()? else {
            return Ok(None);
        };
        let body = Arc::new(Encoded::new(resp));
        if let Ok(mut entries) = self.0.lock() {
            // A set's older response is dropped, and past the cap the
            // least recently made one.
            entries.retain(|e| e.names != *names);
            if entries.len() >= MAX_SHARED {
                entries.remove(0);
            }
            entries.push(Entry {
                names: names.clone(),
                snap: snap.clone(),
                body: body.clone(),
            });
        }
        Ok(Some(body))
    }
}

/// Writes a shared body and the stream's nonce.
#[derive(Debug, Default)]
pub(super) struct PushEncoder;

impl Encoder for PushEncoder {
    type Item = SotwPush;
    type Error = Status;

    fn encode(&mut self, item: SotwPush, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        use bytes::BufMut;
        dst.put_slice(&item.body.bytes);
        if !item.nonce.is_empty() {
            prost::encoding::string::encode(NONCE_FIELD, &item.nonce, dst);
        }
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(CODEC_BUFFER_BYTES, CODEC_YIELD_BYTES)
    }
}

/// Requests decoded by prost, responses written by [`PushEncoder`].
#[derive(Debug, Default)]
struct SotwCodec;

impl Codec for SotwCodec {
    type Encode = SotwPush;
    type Decode = DiscoveryRequest;
    type Encoder = PushEncoder;
    type Decoder = tonic_prost::ProstDecoder<DiscoveryRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        PushEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(BufferSettings::new(CODEC_BUFFER_BYTES, CODEC_YIELD_BYTES))
    }
}

/// The SDS service: `StreamSecrets` with shared responses, the rest
/// generated.
#[derive(Clone)]
pub(super) struct SdsRoutes {
    generated: SecretDiscoveryServiceServer<Sds>,
    sds: Sds,
    max_message_bytes: usize,
}

impl SdsRoutes {
    /// Requests longer than `max_message_bytes` are refused (by tonic, with
    /// `OUT_OF_RANGE`) on every method.
    pub(super) fn new(sds: Sds, max_message_bytes: usize) -> Self {
        Self {
            generated: SecretDiscoveryServiceServer::new(sds.clone())
                .max_decoding_message_size(max_message_bytes),
            sds,
            max_message_bytes,
        }
    }
}

impl tonic::server::NamedService for SdsRoutes {
    const NAME: &'static str = SERVICE_NAME;
}

/// A streaming method whose requests are read by [`Requests`]: tonic's
/// own `Streaming` is handed an empty body and dropped unread.
struct Method<M> {
    sds: Sds,
    requests: Option<Inbound<M>>,
}

/// An empty stream, for a method called twice (never: one per request).
fn taken<M: Send + 'static>() -> Inbound<M> {
    Box::pin(tokio_stream::empty())
}

impl tonic::server::StreamingService<DiscoveryRequest> for Method<DiscoveryRequest> {
    type Response = SotwPush;
    type ResponseStream = BoxStream<SotwPush>;
    type Future = std::future::Ready<Result<tonic::Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, _: tonic::Request<tonic::Streaming<DiscoveryRequest>>) -> Self::Future {
        let requests = self.requests.take().unwrap_or_else(taken);
        std::future::ready(Ok(tonic::Response::new(self.sds.stream_sotw(requests))))
    }
}

impl tonic::server::StreamingService<DeltaDiscoveryRequest> for Method<DeltaDiscoveryRequest> {
    type Response = DeltaDiscoveryResponse;
    type ResponseStream = BoxStream<DeltaDiscoveryResponse>;
    type Future = std::future::Ready<Result<tonic::Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, _: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let requests = self.requests.take().unwrap_or_else(taken);
        std::future::ready(Ok(tonic::Response::new(self.sds.stream_delta(requests))))
    }
}

impl<B> Service<http::Request<B>> for SdsRoutes
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let max = self.max_message_bytes;
        let path = req.uri().path();
        if path != STREAM_SECRETS && path != DELTA_SECRETS {
            return self.generated.call(req);
        }
        let sotw = path == STREAM_SECRETS;
        // The body is read here; tonic sees an empty one.
        let (parts, body) = req.into_parts();
        let req = http::Request::from_parts(parts, tonic::body::Body::empty());
        let sds = self.sds.clone();
        Box::pin(async move {
            if sotw {
                let method = Method {
                    sds,
                    requests: Some(Box::pin(Requests::new(body, max)) as Inbound<DiscoveryRequest>),
                };
                let mut grpc = tonic::server::Grpc::new(SotwCodec)
                    .apply_max_message_size_config(Some(max), None);
                Ok(grpc.streaming(method, req).await)
            } else {
                let method = Method {
                    sds,
                    requests: Some(
                        Box::pin(Requests::new(body, max)) as Inbound<DeltaDiscoveryRequest>
                    ),
                };
                let mut grpc = tonic::server::Grpc::new(crate::proto::SmallCodec::<
                    DeltaDiscoveryResponse,
                    DeltaDiscoveryRequest,
                >::default())
                .apply_max_message_size_config(Some(max), None);
                Ok(grpc.streaming(method, req).await)
            }
        })
    }
}
