//! The SDS routes on the wire. `StreamSecrets` and `DeltaSecrets` read
//! their requests with [`Requests`] (a buffer that does not outlive its
//! message, see `sds_inbound`); tonic's own `Streaming` is handed an empty
//! body. `FetchSecrets` (unary) goes to the generated service.

use std::convert::Infallible;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::codegen::{Body, BoxFuture, Service, StdError};

use super::sds::{BoxStream, Sds};
use super::sds_inbound::{Inbound, Requests};
use crate::proto::SmallCodec;
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use crate::proto::envoy::service::secret::v3::secret_discovery_service_server::{
    SERVICE_NAME, SecretDiscoveryServiceServer,
};

/// The routes served here; the other methods go to the generated service.
const STREAM_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
const DELTA_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets";

/// The SDS service: the streaming methods with their own request reader,
/// the rest generated.
#[derive(Clone)]
pub(super) struct SdsRoutes {
    generated: SecretDiscoveryServiceServer<Sds>,
    sds: Sds,
    max_message_bytes: usize,
}

impl SdsRoutes {
    /// Requests longer than `max_message_bytes` are refused with
    /// `OUT_OF_RANGE` on every method (by tonic on `FetchSecrets`, by
    /// [`Requests`] on the streams).
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
    type Response = DiscoveryResponse;
    type ResponseStream = BoxStream<DiscoveryResponse>;
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
            Ok(if sotw {
                stream::<DiscoveryRequest, DiscoveryResponse, B>(sds, body, req, max).await
            } else {
                stream::<DeltaDiscoveryRequest, DeltaDiscoveryResponse, B>(sds, body, req, max)
                    .await
            })
        })
    }
}

/// One streaming method's call: its requests read from `body` by
/// [`Requests`], `req` (with an empty body) handed to tonic.
async fn stream<Req, Resp, B>(
    sds: Sds,
    body: B,
    req: http::Request<tonic::body::Body>,
    max: usize,
) -> http::Response<tonic::body::Body>
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
    Method<Req>: tonic::server::StreamingService<Req, Response = Resp>,
    <Method<Req> as tonic::server::StreamingService<Req>>::ResponseStream: Send + 'static,
{
    let requests: Inbound<Req> = Box::pin(Requests::new(body, max));
    let method = Method {
        sds,
        requests: Some(requests),
    };
    let mut grpc = tonic::server::Grpc::new(SmallCodec::<Resp, Req>::default())
        .apply_max_message_size_config(Some(max), None);
    grpc.streaming(method, req).await
}
