//! The node agent's limits, crossed against a real `ca agent` process in
//! node mode (workloads `a` and `b`, each with its own socket) talking to a
//! real `ca server`: one workload's socket flooded, the other's proxy still
//! served, every refusal counted, descriptors back to their level, and a
//! peer's text never forging a log line.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::time::Duration;

use common::h2raw::{self, RawH2};
use common::procs::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use workload_ca::agent::sds::SECRET_TYPE_URL;
use workload_ca::limits::{PEER_WARN_BURST, label};
use workload_ca::proto::envoy::service::discovery::v3::DiscoveryRequest;
use workload_ca::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use workload_ca::proto::google::rpc::Status as RpcStatus;

const STREAM: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";

struct Node {
    agent: AgentProc,
    _ca: CaProc,
}

async fn node(args: &[&str]) -> Node {
    let ca = CaProc::start(&[]);
    let workloads = [("a", ca.token("prod", "a")), ("b", ca.token("prod", "b"))];
    let agent = AgentProc::start(ca.grpc, &ca.root_pem(), &workloads, args);
    agent.wait_ready().await;
    Node { agent, _ca: ca }
}

async fn raw(socket: &std::path::Path) -> RawH2<tokio::net::UnixStream> {
    RawH2::handshake(tokio::net::UnixStream::connect(socket).await.unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn connections_per_socket_are_capped_per_socket() {
    let n = node(&["--sds-max-connections", "4"]).await;
    let (a, b) = (n.agent.socket("a"), n.agent.socket("b"));
    fetch_default(&b).await;
    let fds = fd_count(n.agent.pid());

    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(raw(&a).await);
    }
    for _ in 0..3 {
        let mut s = tokio::net::UnixStream::connect(&a).await.unwrap();
        assert!(
            closed_within(&mut s, Duration::from_secs(2)).await,
            "over the cap"
        );
    }
    // The other workload's proxy is served as usual.
    fetch_default(&b).await;
    assert_eq!(n.agent.refusals(label::CONNECTIONS).await, 3.0);
    drop(held);
    fds_return_to(n.agent.pid(), fds).await;
    fetch_default(&a).await;
}

#[tokio::test]
async fn streams_per_connection_are_advertised_and_enforced() {
    let n = node(&["--sds-max-streams-per-connection", "4"]).await;
    let fds = fd_count(n.agent.pid());
    let mut c = raw(&n.agent.socket("a")).await;
    let headers = h2raw::grpc_headers_scheme("http", "localhost", STREAM);
    for i in 0..50u32 {
        c.send_headers(1 + 2 * i, &headers, false).await.unwrap();
    }
    let events = c
        .collect_until(Duration::from_secs(10), |e| e.refused() >= 46)
        .await;
    assert_eq!(events.max_concurrent_streams, Some(4));
    assert_eq!(events.refused(), 46, "{:?}", events.resets);
    fetch_default(&n.agent.socket("b")).await;
    assert!(n.agent.refusals(label::STREAMS_PER_CONNECTION).await >= 46.0);
    drop(c);
    fds_return_to(n.agent.pid(), fds).await;
}

#[tokio::test]
async fn silent_connections_meet_the_preface_deadline() {
    let n = node(&["--sds-preface-timeout", "1s"]).await;
    let fds = fd_count(n.agent.pid());
    let mut s = tokio::net::UnixStream::connect(n.agent.socket("a"))
        .await
        .unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    assert_eq!(n.agent.refusals(label::PREFACE_TIMEOUT).await, 1.0);
    fetch_default(&n.agent.socket("a")).await;
    drop(s);
    fds_return_to(n.agent.pid(), fds).await;
}

/// A StreamSecrets stream on `socket`'s workload: its request sender and
/// its responses.
async fn open_stream(
    socket: &std::path::Path,
) -> (
    mpsc::Sender<DiscoveryRequest>,
    tonic::Streaming<workload_ca::proto::envoy::service::discovery::v3::DiscoveryResponse>,
) {
    let mut client = SecretDiscoveryServiceClient::new(common::unix_channel(socket).await);
    let (tx, rx) = mpsc::channel(64);
    let stream = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

/// The name cap's answer.
fn assert_exhausted(err: &tonic::Status) {
    assert_eq!(
        err.code(),
        tonic::Code::ResourceExhausted,
        "{}",
        err.message()
    );
}

fn request(names: &[String], nonce: &str, nack: Option<&str>) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: String::new(),
        node: None,
        resource_names: names.to_vec(),
        type_url: SECRET_TYPE_URL.into(),
        response_nonce: nonce.into(),
        error_detail: nack.map(|m| RpcStatus {
            code: 13,
            message: m.into(),
            details: vec![],
        }),
    }
}

#[tokio::test]
async fn resource_names_per_stream_are_capped() {
    let n = node(&["--sds-max-resource-names", "3"]).await;
    let (tx, mut stream) = open_stream(&n.agent.socket("a")).await;
    let names: Vec<String> = (0..4)
        .map(|i| format!("spiffe://cluster.local/x{i}"))
        .collect();
    tx.send(request(&names, "", None)).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_exhausted(&err);
    assert_eq!(n.agent.refusals(label::RESOURCE_NAMES).await, 1.0);
    // Within the cap, on a new stream, it is served.
    let (tx, mut stream) = open_stream(&n.agent.socket("a")).await;
    tx.send(request(&["default".into(), "ROOTCA".into()], "", None))
        .await
        .unwrap();
    let resp = stream.message().await.unwrap().unwrap();
    assert_eq!(resp.resources.len(), 2);
}

/// Ten thousand NACKs do not write ten thousand lines, and the text in
/// them never starts a line, in either log format.
#[tokio::test]
async fn nack_floods_are_rate_limited_and_cannot_forge_lines() {
    for format in ["text", "json"] {
        let n = node(&["--log-format", format]).await;
        let (tx, mut stream) = open_stream(&n.agent.socket("a")).await;
        let names = vec!["default".to_string()];
        tx.send(request(&names, "", None)).await.unwrap();
        let first = stream.message().await.unwrap().unwrap();
        let forged = "bad\nFORGED 2026-11-30T00:00:00Z  INFO workload_ca::agent: certificate renewed\r\x1b[2K\u{202e}";
        let nacks = 2_000;
        for _ in 0..nacks {
            tx.send(request(&names, &first.nonce, Some(forged)))
                .await
                .unwrap();
        }
        // Every NACK was read: the counter shows them all.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while metric_at(n.agent.ops, "workload_ca_agent_sds_nacks_total").await < f64::from(nacks) {
            assert!(std::time::Instant::now() < deadline, "NACKs not all read");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let suppressed = metric_at(n.agent.ops, "workload_ca_agent_log_suppressed_total").await;
        let log = n.agent.log_text();
        assert_log_safe(&log, format);
        // A burst per 10 s window: one window unless this machine is very
        // slow; every NACK either logged or counted as suppressed.
        let warned = log.lines().filter(|l| l.contains("NACK")).count();
        assert!(
            warned >= PEER_WARN_BURST as usize && warned <= 2 * PEER_WARN_BURST as usize,
            "{format}: {warned}"
        );
        assert_eq!(warned as f64 + suppressed, f64::from(nacks), "{format}");
        // The flooded workload is still served.
        fetch_default(&n.agent.socket("a")).await;
    }
}

#[tokio::test]
async fn sds_messages_are_bounded() {
    use workload_ca::proto::envoy::config::core::v3::Node as EnvoyNode;
    let n = node(&["--sds-max-message-bytes", "4096"]).await;
    let mut sds =
        SecretDiscoveryServiceClient::new(common::unix_channel(&n.agent.socket("a")).await);
    let mut req = request(&["default".into()], "", None);
    req.node = Some(EnvoyNode {
        id: "x".repeat(8192),
        cluster: "c".into(),
        ..Default::default()
    });
    let err = sds.fetch_secrets(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{}", err.message());
    assert_eq!(n.agent.refusals(label::MESSAGE_SIZE).await, 1.0);
    // On both streaming methods too: refused, counted, the stream ended.
    let (tx, mut stream) = open_stream(&n.agent.socket("a")).await;
    tx.send(req).await.unwrap();
    let err = stream.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{}", err.message());
    assert_eq!(n.agent.refusals(label::MESSAGE_SIZE).await, 2.0);
    {
        use workload_ca::proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
        let (tx, rx) = mpsc::channel(4);
        tx.send(DeltaDiscoveryRequest {
            resource_names_subscribe: vec!["x".repeat(8192)],
            ..Default::default()
        })
        .await
        .unwrap();
        let mut stream = sds
            .delta_secrets(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let err = stream.message().await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange, "{}", err.message());
        assert_eq!(n.agent.refusals(label::MESSAGE_SIZE).await, 3.0);
    }
    fetch_default(&n.agent.socket("a")).await;
}

/// The name cap holds on every SDS entry point: Delta subscriptions, the
/// versions a Delta client says it holds, and Fetch.
#[tokio::test]
async fn resource_names_are_capped_on_delta_and_fetch_too() {
    use workload_ca::proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    let n = node(&["--sds-max-resource-names", "3"]).await;
    let socket = n.agent.socket("a");
    let mut client = SecretDiscoveryServiceClient::new(common::unix_channel(&socket).await);
    let many: Vec<String> = (0..4)
        .map(|i| format!("spiffe://cluster.local/x{i}"))
        .collect();

    let delta = |req: DeltaDiscoveryRequest| {
        let mut client = client.clone();
        async move {
            let (tx, rx) = mpsc::channel(4);
            tx.send(req).await.unwrap();
            let mut stream = client
                .delta_secrets(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let err = tokio::time::timeout(Duration::from_secs(5), stream.message())
                .await
                .unwrap()
                .unwrap_err();
            drop(tx);
            err
        }
    };
    let err = delta(DeltaDiscoveryRequest {
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: many.clone(),
        ..Default::default()
    })
    .await;
    assert_exhausted(&err);
    let err = delta(DeltaDiscoveryRequest {
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: vec!["default".into()],
        initial_resource_versions: many.iter().map(|n| (n.clone(), "1".to_string())).collect(),
        ..Default::default()
    })
    .await;
    assert_exhausted(&err);

    let err = client
        .fetch_secrets(request(&many, "", None))
        .await
        .unwrap_err();
    assert_exhausted(&err);
    assert_eq!(n.agent.refusals(label::RESOURCE_NAMES).await, 3.0);
    fetch_default(&socket).await;
}

/// Streams are capped per socket over all its connections: one process
/// cannot hold more than its share of the agent, whatever it connects.
#[tokio::test]
async fn streams_per_socket_are_capped() {
    let n = node(&["--sds-max-streams", "6"]).await;
    let fds = fd_count(n.agent.pid());
    let headers = h2raw::grpc_headers_scheme("http", "localhost", STREAM);
    let mut conns = Vec::new();
    for _ in 0..2 {
        let mut c = raw(&n.agent.socket("a")).await;
        for i in 0..4u32 {
            c.send_headers(1 + 2 * i, &headers, false).await.unwrap();
        }
        conns.push(c);
    }
    // Eight streams, six held: two (on whichever connection the agent
    // served last) answered at once with RESOURCE_EXHAUSTED.
    let mut answered = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while answered < 2 && std::time::Instant::now() < deadline {
        for c in &mut conns {
            answered += c
                .collect(Duration::from_millis(100))
                .await
                .end_streams
                .len();
        }
    }
    for c in &mut conns {
        answered += c
            .collect(Duration::from_millis(300))
            .await
            .end_streams
            .len();
    }
    assert_eq!(answered, 2);
    assert_eq!(n.agent.refusals(label::CALLS).await, 2.0);
    // The other socket has its own count.
    fetch_default(&n.agent.socket("b")).await;
    drop(conns);
    fds_return_to(n.agent.pid(), fds).await;
    fetch_default(&n.agent.socket("a")).await;
}

#[tokio::test]
async fn connections_holding_no_stream_are_reclaimed() {
    let n = node(&["--sds-idle-timeout", "1s"]).await;
    let mut c = raw(&n.agent.socket("a")).await;
    let events = c.collect_until(Duration::from_secs(6), |e| e.closed).await;
    assert_eq!(events.goaway.map(|(_, code)| code), Some(h2raw::NO_ERROR));
    assert!(events.closed);
    assert_eq!(n.agent.refusals(label::IDLE_TIMEOUT).await, 1.0);
}
