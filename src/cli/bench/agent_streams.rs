//! The SDS clients of `ca bench agent`, in one of two shapes:
//!
//! - [`Shape::Envoy`] (the default), as real Envoys hold them (REFERENCE
//!   section 3): S streams are S/2 proxies, each one HTTP/2 connection with
//!   one `StreamSecrets` stream per resource name (`default`, `ROOTCA`).
//!   The first request on each stream carries a node of realistic size
//!   (Envoy's `extensions` list, ~61 KB); later ones carry none.
//! - [`Shape::OneStreamPerConnection`]: the worst case for connections:
//!   each stream its own connection, subscribed to both names, with the
//!   same first request.
//!
//! Every stream ACKs each response with its nonce; streams subscribed to
//! `default` report each response (its version of `default` and the
//! wall-clock moment) to the coordinator.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;

use crate::agent::sds::{DEFAULT, ROOTCA, SECRET_TYPE_URL};
use crate::proto::envoy::service::discovery::v3::DiscoveryResponse;

/// How long a stream may take to connect and get its first response.
const OPEN_WAIT: Duration = Duration::from_secs(30);
/// Envoy 1.40's first request's `node`, with its extensions (REFERENCE
/// section 3): about 61 KB.
pub(super) const ENVOY_NODE_BYTES: usize = 61 * 1000;

/// How the streams sit on connections.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// One connection per simulated Envoy, one stream per resource name.
    Envoy,
    /// One connection per stream, each subscribed to both names.
    OneStreamPerConnection,
}

impl Shape {
    /// The connections holding `streams` streams.
    pub(super) fn connections(self, streams: usize) -> usize {
        match self {
            Self::Envoy => streams.div_ceil(2),
            Self::OneStreamPerConnection => streams,
        }
    }

    /// The streams subscribed to `default` (those a rotation reaches).
    pub(super) fn cert_streams(self, streams: usize) -> usize {
        self.connections(streams)
    }

    /// The resource names of each stream on connection `conn`.
    fn names(self, streams: usize, conn: usize) -> Vec<Vec<&'static str>> {
        match self {
            Self::OneStreamPerConnection => vec![vec![DEFAULT, ROOTCA]],
            // An odd count leaves the last proxy with `default` only.
            Self::Envoy if 2 * conn + 1 == streams => vec![vec![DEFAULT]],
            Self::Envoy => vec![vec![DEFAULT], vec![ROOTCA]],
        }
    }
}

/// What a stream saw.
#[derive(Debug)]
pub(super) enum Event {
    /// Its first response arrived (and was ACKed): the stream is open.
    Opened,
    /// A response carrying this version of `default`, received at `at`
    /// (streams subscribed to `default` only).
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

/// What the streams look like.
#[derive(Clone, Copy, Debug)]
pub(super) struct Plan {
    pub shape: Shape,
    pub streams: usize,
    /// Size of the `node` in each stream's first request.
    pub node_bytes: usize,
    /// Connections opening at once.
    pub parallel: usize,
}

/// Opens the streams of `plan` to `socket`; each reports to `events`.
/// Streams are numbered so that those subscribed to `default` come first
/// (0 .. `cert_streams`).
pub(super) fn start(socket: PathBuf, plan: Plan, events: mpsc::UnboundedSender<Event>) -> Streams {
    let gate = Arc::new(Semaphore::new(plan.parallel.max(1)));
    let node = Arc::new(wire::envoy_node(plan.node_bytes));
    let cert_streams = plan.shape.cert_streams(plan.streams);
    let mut tasks = JoinSet::new();
    let mut other = cert_streams;
    for conn in 0..plan.shape.connections(plan.streams) {
        let (socket, events, gate, node) =
            (socket.clone(), events.clone(), gate.clone(), node.clone());
        let ids: Vec<(usize, Vec<&'static str>)> = plan
            .shape
            .names(plan.streams, conn)
            .into_iter()
            .map(|names| {
                if names.contains(&DEFAULT) {
                    (conn, names)
                } else {
                    other += 1;
                    (other - 1, names)
                }
            })
            .collect();
        tasks.spawn(async move {
            let ended = |stream: usize, reason: String| {
                let _ = events.send(Event::Ended { stream, reason });
            };
            let permit = gate.acquire().await;
            let channel = tokio::time::timeout(OPEN_WAIT, connect(socket)).await;
            let channel = match channel {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return ids.into_iter().for_each(|(s, _)| ended(s, e.clone())),
                Err(_) => {
                    let e = format!("no connection within {OPEN_WAIT:?}");
                    return ids.into_iter().for_each(|(s, _)| ended(s, e.clone()));
                }
            };
            let mut streams = JoinSet::new();
            for (stream, names) in ids {
                let (channel, events, node) = (channel.clone(), events.clone(), node.clone());
                streams.spawn(async move {
                    let reason = match run_stream(stream, channel, &names, &node, &events).await {
                        Ok(()) => "the agent ended the stream".to_owned(),
                        Err(e) => e,
                    };
                    let _ = events.send(Event::Ended { stream, reason });
                });
            }
            drop(permit);
            while streams.join_next().await.is_some() {}
        });
    }
    Streams { _tasks: tasks }
}

async fn run_stream(
    stream: usize,
    channel: tonic::transport::Channel,
    names: &[&'static str],
    node: &wire::Node,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(), String> {
    let names: Vec<String> = names.iter().map(|&n| n.to_owned()).collect();
    let reports = names.iter().any(|n| n == DEFAULT);
    let (tx, mut inbound) =
        tokio::time::timeout(OPEN_WAIT, open(stream, channel, names.clone(), node))
            .await
            .map_err(|_| format!("no stream within {OPEN_WAIT:?}"))??;
    let first = tokio::time::timeout(OPEN_WAIT, inbound.message())
        .await
        .map_err(|_| format!("no first response within {OPEN_WAIT:?}"))?;
    let mut msg = first;
    let mut opened = false;
    loop {
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(s) => return Err(format!("{:?}: {}", s.code(), s.message())),
        };
        let at = SystemTime::now();
        if reports {
            let version = default_version(&resp.version_info)
                .unwrap_or_default()
                .to_owned();
            let _ = events.send(Event::Push {
                stream,
                version,
                at,
            });
        }
        ack(&tx, resp, &names).await?;
        if !opened {
            opened = true;
            let _ = events.send(Event::Opened);
        }
        msg = inbound.message().await;
    }
}

/// A connection of its own to `socket`.
pub(super) async fn connect(socket: PathBuf) -> Result<tonic::transport::Channel, String> {
    let endpoint = tonic::transport::Endpoint::from_static("http://sds.local");
    endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .map_err(|e| format!("connecting: {e}"))
}

pub(super) type Opened = (
    mpsc::Sender<wire::Request>,
    tonic::Streaming<DiscoveryResponse>,
);

/// A `StreamSecrets` stream on `channel` whose first request (with the
/// node, as Envoy's) is sent.
pub(super) async fn open(
    stream: usize,
    channel: tonic::transport::Channel,
    names: Vec<String>,
    node: &wire::Node,
) -> Result<Opened, String> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| format!("connection not ready: {e}"))?;
    let (tx, rx) = mpsc::channel(4);
    let mut node = node.clone();
    node.id = format!("sidecar~10.0.0.1~bench-{stream}.bench~bench.svc.cluster.local");
    tx.send(wire::Request {
        version_info: String::new(),
        node: Some(node),
        resource_names: names,
        type_url: SECRET_TYPE_URL.into(),
        response_nonce: String::new(),
    })
    .await
    .map_err(|_| "the request stream closed".to_owned())?;
    let path = http::uri::PathAndQuery::from_static(
        "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
    );
    let inbound = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            path,
            crate::proto::SmallCodec::<wire::Request, DiscoveryResponse>::default(),
        )
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

/// Envoy's `DiscoveryRequest` as it is on the wire, with the parts of
/// `node` the agent's own types leave out (`extensions`, field 9: the
/// bulk of a real first request; the agent skips it as an unknown field,
/// as it does a real Envoy's).
pub(super) mod wire {
    /// `envoy.service.discovery.v3.DiscoveryRequest` (without
    /// `error_detail`: the bench never NACKs).
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct Request {
        #[prost(string, tag = "1")]
        pub version_info: String,
        #[prost(message, optional, tag = "2")]
        pub node: Option<Node>,
        #[prost(string, repeated, tag = "3")]
        pub resource_names: Vec<String>,
        #[prost(string, tag = "4")]
        pub type_url: String,
        #[prost(string, tag = "5")]
        pub response_nonce: String,
    }

    /// `envoy.config.core.v3.Node`: id, cluster, user agent and extensions.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct Node {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub cluster: String,
        #[prost(string, tag = "6")]
        pub user_agent_name: String,
        #[prost(message, repeated, tag = "9")]
        pub extensions: Vec<Extension>,
    }

    /// `envoy.config.core.v3.Extension`: name, category, type URLs.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct Extension {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub category: String,
        #[prost(string, repeated, tag = "6")]
        pub type_urls: Vec<String>,
    }

    /// A node of about `bytes` encoded bytes (at least its id and cluster):
    /// extensions named like Envoy's until the size is reached.
    pub(crate) fn envoy_node(bytes: usize) -> Node {
        use prost::Message;
        let mut node = Node {
            id: "sidecar~10.0.0.1~bench-0.bench~bench.svc.cluster.local".into(),
            cluster: "bench.bench".into(),
            user_agent_name: "envoy".into(),
            extensions: Vec::new(),
        };
        let mut i = 0;
        while node.encoded_len() < bytes {
            node.extensions.push(Extension {
                name: format!("envoy.filters.http.bench_{i}"),
                category: "envoy.filters.http".into(),
                type_urls: vec![format!(
                    "type.googleapis.com/envoy.extensions.filters.http.bench_{i}.v3.Config"
                )],
            });
            i += 1;
        }
        node
    }
}

/// Acknowledges `resp` as Envoy does: the version and the nonce echoed,
/// the names again, no node.
pub(super) async fn ack(
    tx: &mpsc::Sender<wire::Request>,
    resp: DiscoveryResponse,
    names: &[String],
) -> Result<(), String> {
    tx.send(wire::Request {
        version_info: resp.version_info,
        node: None,
        resource_names: names.to_vec(),
        type_url: SECRET_TYPE_URL.into(),
        response_nonce: resp.nonce,
    })
    .await
    .map_err(|_| "the request stream closed".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_version() {
        assert_eq!(
            super::default_version("ROOTCA=g3;default=0a1b"),
            Some("0a1b")
        );
        assert_eq!(super::default_version("ROOTCA=g3"), None);
    }

    #[test]
    fn node_size() {
        use prost::Message;
        let n = wire::envoy_node(ENVOY_NODE_BYTES).encoded_len();
        assert!(
            (ENVOY_NODE_BYTES..ENVOY_NODE_BYTES + 200).contains(&n),
            "{n}"
        );
        assert!(wire::envoy_node(0).extensions.is_empty());
    }

    #[test]
    fn shapes() {
        let e = Shape::Envoy;
        assert_eq!((e.connections(1000), e.cert_streams(1000)), (500, 500));
        assert_eq!(e.connections(7), 4);
        assert_eq!(e.names(7, 3), vec![vec![DEFAULT]]);
        assert_eq!(e.names(7, 2), vec![vec![DEFAULT], vec![ROOTCA]]);
        let o = Shape::OneStreamPerConnection;
        assert_eq!((o.connections(10), o.cert_streams(10)), (10, 10));
        assert_eq!(o.names(10, 0), vec![vec![DEFAULT, ROOTCA]]);
    }
}
