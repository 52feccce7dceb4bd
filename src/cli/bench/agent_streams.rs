//! The SDS clients of `ca bench agent`: each stream its own Unix-socket
//! HTTP/2 connection with one `StreamSecrets` stream, as S Envoys would
//! hold them. Each subscribes to `default` and `ROOTCA`, ACKs every
//! response with its nonce, and reports every response it receives (the
//! version of `default` and the wall-clock moment) to the coordinator.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;

use crate::agent::sds::{DEFAULT, ROOTCA, SECRET_TYPE_URL};
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use crate::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;

/// How long a stream may take to connect and get its first response.
const OPEN_WAIT: Duration = Duration::from_secs(30);

/// What a stream saw.
#[derive(Debug)]
pub(super) enum Event {
    /// Its first response arrived (and was ACKed): the stream is open.
    Opened,
    /// A response carrying this version of `default`, received at `at`.
    Push {
        stream: usize,
        version: String,
        at: SystemTime,
    },
    /// It ended or could not open.
    Ended { stream: usize, reason: String },
}

/// The running streams; all end when this is dropped.
pub(super) struct Streams {
    _tasks: JoinSet<()>,
}

/// Starts `count` streams to `socket`, at most `parallel` connecting at
/// once; each reports to `events`.
pub(super) fn start(
    socket: PathBuf,
    count: usize,
    parallel: usize,
    events: mpsc::UnboundedSender<Event>,
) -> Streams {
    let gate = Arc::new(Semaphore::new(parallel.max(1)));
    let mut tasks = JoinSet::new();
    for stream in 0..count {
        let (socket, events, gate) = (socket.clone(), events.clone(), gate.clone());
        tasks.spawn(async move {
            let reason = match run_stream(stream, socket, &events, &gate).await {
                Ok(()) => "the agent ended the stream".to_owned(),
                Err(e) => e,
            };
            let _ = events.send(Event::Ended { stream, reason });
        });
    }
    Streams { _tasks: tasks }
}

async fn run_stream(
    stream: usize,
    socket: PathBuf,
    events: &mpsc::UnboundedSender<Event>,
    gate: &Semaphore,
) -> Result<(), String> {
    let permit = gate.acquire().await.map_err(|e| e.to_string())?;
    let (tx, mut inbound) = tokio::time::timeout(OPEN_WAIT, open(stream, socket))
        .await
        .map_err(|_| format!("no connection within {OPEN_WAIT:?}"))??;
    let first = tokio::time::timeout(OPEN_WAIT, inbound.message())
        .await
        .map_err(|_| format!("no first response within {OPEN_WAIT:?}"))?;
    let mut msg = first;
    let mut opened = Some(permit);
    loop {
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(s) => return Err(format!("{:?}: {}", s.code(), s.message())),
        };
        let at = SystemTime::now();
        let version = default_version(&resp.version_info)
            .unwrap_or_default()
            .to_owned();
        let _ = events.send(Event::Push {
            stream,
            version,
            at,
        });
        // As Envoy: the ACK echoes the version and the nonce.
        tx.send(DiscoveryRequest {
            version_info: resp.version_info,
            node: None,
            resource_names: vec![DEFAULT.into(), ROOTCA.into()],
            type_url: SECRET_TYPE_URL.into(),
            response_nonce: resp.nonce,
            error_detail: None,
        })
        .await
        .map_err(|_| "the request stream closed".to_owned())?;
        if opened.take().is_some() {
            let _ = events.send(Event::Opened);
        }
        msg = inbound.message().await;
    }
}

type Opened = (
    mpsc::Sender<DiscoveryRequest>,
    tonic::Streaming<DiscoveryResponse>,
);

/// A connection of its own, and a `StreamSecrets` stream on it whose first
/// request (with a node, as Envoy's) is sent.
async fn open(stream: usize, socket: PathBuf) -> Result<Opened, String> {
    let endpoint = tonic::transport::Endpoint::from_static("http://sds.local");
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let mut client = SecretDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        version_info: String::new(),
        node: Some(Node {
            id: format!("bench~{stream}"),
            cluster: "bench".into(),
            ..Node::default()
        }),
        resource_names: vec![DEFAULT.into(), ROOTCA.into()],
        type_url: SECRET_TYPE_URL.into(),
        response_nonce: String::new(),
        error_detail: None,
    })
    .await
    .map_err(|_| "the request stream closed".to_owned())?;
    let inbound = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    Ok((tx, inbound))
}

/// The version of `default` in a response's `version_info`
/// (`ROOTCA=<v>;default=<serial>`).
pub(super) fn default_version(version_info: &str) -> Option<&str> {
    version_info
        .split(';')
        .find_map(|e| e.strip_prefix("default="))
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_version() {
        assert_eq!(
            super::default_version("ROOTCA=g3;default=0a1b"),
            Some("0a1b")
        );
        assert_eq!(super::default_version("ROOTCA=g3"), None);
    }
}
