//! Every limit of the CA's ports crossed against a real `ca server`
//! process: the refusal is seen on the wire and counted, a legitimate client
//! on another connection still gets its certificate, and the process's open
//! file descriptors return to their level before.
//!
//! The hostile side is a raw HTTP/2 client (tests/common/h2raw.rs) that
//! breaks the rules a real client keeps, connecting from 127.0.0.2 so that
//! the per-source limits see another host than the legitimate 127.0.0.1.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::time::Duration;

use common::h2raw::{self, RawH2};
use common::procs::*;
use common::*;
use tokio::io::AsyncWriteExt;
use workload_ca::limits::label;

const PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

#[tokio::test]
async fn streams_per_connection_are_advertised_and_enforced() {
    let ca = CaProc::start(&["--max-streams-per-connection", "8"]);
    ca.legit_issue().await;
    let fds = fd_count(ca.pid());

    let mut raw = ca.raw_from(OTHER_HOST).await;
    let headers = h2raw::grpc_headers("localhost", PATH);
    // Headers, never a body: each stream stays open until its deadline.
    for i in 0..40u32 {
        raw.send_headers(1 + 2 * i, &headers, false).await.unwrap();
    }
    let events = raw
        .collect_until(Duration::from_secs(10), |e| e.refused() >= 32)
        .await;
    assert_eq!(events.max_concurrent_streams, Some(8), "advertised");
    assert_eq!(events.refused(), 32, "enforced: {:?}", events.resets);

    ca.legit_issue().await;
    assert!(ca.refusals(label::STREAMS_PER_CONNECTION).await >= 32.0);
    drop(raw);
    fds_return_to(ca.pid(), fds).await;
}

#[tokio::test]
async fn a_call_whose_body_never_comes_meets_its_deadline() {
    use http_body_util::StreamBody;
    let ca = CaProc::start(&["--request-timeout", "1s"]);
    let fds = fd_count(ca.pid());

    // A real HTTP/2 client whose request body never ends (one byte, then
    // nothing): the server answers DEADLINE_EXCEEDED instead of waiting.
    let tls = ca.tls_from(OTHER_HOST).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<hyper::body::Frame<hyper::body::Bytes>, std::convert::Infallible>,
    >(1);
    tx.send(Ok(hyper::body::Frame::data(
        hyper::body::Bytes::from_static(&[0]),
    )))
    .await
    .unwrap();
    let req = http::Request::post(format!("https://localhost{PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap();
    let started = std::time::Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .expect("answered, not held")
        .unwrap();
    assert_eq!(
        resp.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"4"[..]),
        "DEADLINE_EXCEEDED: {:?}",
        resp.headers()
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    drop((tx, resp));

    ca.legit_issue().await;
    assert_eq!(ca.refusals(label::REQUEST_TIMEOUT).await, 1.0);
    drop(send);
    fds_return_to(ca.pid(), fds).await;
}

#[tokio::test]
async fn header_lists_are_bounded() {
    let ca = CaProc::start(&["--max-header-list-bytes", "4096"]);
    let fds = fd_count(ca.pid());
    let mut raw = ca.raw_from(OTHER_HOST).await;
    let mut headers = h2raw::grpc_headers("localhost", PATH);
    headers.push((
        "authorization".into(),
        format!("Bearer {}", "x".repeat(8192)),
    ));
    raw.send_headers(1, &headers, false).await.unwrap();
    let events = raw
        .collect_until(Duration::from_secs(5), |e| !e.resets.is_empty())
        .await;
    assert_eq!(events.max_header_list_size, Some(4096), "advertised");
    assert!(
        events.resets.iter().any(|(id, _)| *id == 1),
        "the oversized stream is reset: {events:?}"
    );
    ca.legit_issue().await;
    assert_eq!(ca.refusals(label::HEADER_LIST_SIZE).await, 1.0);
    drop(raw);
    fds_return_to(ca.pid(), fds).await;
}

#[tokio::test]
async fn silent_connections_meet_the_handshake_and_preface_deadlines() {
    let ca = CaProc::start(&["--handshake-timeout", "1s", "--preface-timeout", "1s"]);
    ca.legit_issue().await;
    let fds = fd_count(ca.pid());

    // TCP, never a ClientHello.
    let mut tcp = ca.tcp_from(OTHER_HOST).await.unwrap();
    // TLS done, never the HTTP/2 preface.
    let mut tls = ca.tls_from(OTHER_HOST).await.unwrap();
    assert!(
        closed_within(&mut tcp, Duration::from_secs(5)).await,
        "handshake deadline"
    );
    assert!(
        closed_within(&mut tls, Duration::from_secs(5)).await,
        "preface deadline"
    );

    ca.legit_issue().await;
    assert_eq!(ca.refusals(label::HANDSHAKE_TIMEOUT).await, 1.0);
    assert_eq!(ca.refusals(label::PREFACE_TIMEOUT).await, 1.0);
    drop((tcp, tls));
    fds_return_to(ca.pid(), fds).await;
}

#[tokio::test]
async fn idle_connections_get_goaway() {
    let ca = CaProc::start(&["--idle-timeout", "1s"]);
    let fds = fd_count(ca.pid());
    let mut raw = ca.raw_from(OTHER_HOST).await;
    let events = raw
        .collect_until(Duration::from_secs(6), |e| e.closed)
        .await;
    assert_eq!(
        events.goaway.map(|(_, code)| code),
        Some(h2raw::NO_ERROR),
        "a graceful GOAWAY: {events:?}"
    );
    assert!(events.closed);
    ca.legit_issue().await;
    assert!(ca.refusals(label::IDLE_TIMEOUT).await >= 1.0);
    drop(raw);
    fds_return_to(ca.pid(), fds).await;
}

#[tokio::test]
async fn connections_per_source_are_capped() {
    let ca = CaProc::start(&["--max-connections-per-source", "5"]);
    ca.legit_issue().await;
    let fds = fd_count(ca.pid());

    // Five connections from the other host are held open (preface sent)...
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(ca.raw_from(OTHER_HOST).await);
    }
    // ... and its sixth to eighth are closed at once.
    for _ in 0..3 {
        let mut tcp = ca.tcp_from(OTHER_HOST).await.unwrap();
        assert!(closed_within(&mut tcp, Duration::from_secs(2)).await);
    }
    // Another host is not affected, new connection or old.
    ca.legit_issue().await;
    assert_eq!(ca.refusals(label::CONNECTIONS_PER_SOURCE).await, 3.0);
    drop(held);
    fds_return_to(ca.pid(), fds).await;
}

/// A CA with a handshake pool of `pool`, `per_source` of it per source and
/// a 30 s handshake deadline, then `each` silent TCP connections (never a
/// ClientHello) from every one of `hosts`. Returns the CA, its descriptors
/// before, the connections, and how many of them it closed at once.
async fn silent_connections(
    pool: &str,
    per_source: &str,
    hosts: &[&str],
    each: usize,
) -> (CaProc, usize, Vec<tokio::net::TcpStream>, usize) {
    let ca = CaProc::start(&[
        "--max-pending-handshakes",
        pool,
        "--max-pending-handshakes-per-source",
        per_source,
        "--handshake-timeout",
        "30s",
    ]);
    let fds = fd_count(ca.pid());
    let mut silent = Vec::new();
    for host in hosts {
        for _ in 0..each {
            silent.push(ca.tcp_from(host).await.unwrap());
        }
    }
    let closed = count_closed(&mut silent, Duration::from_secs(1)).await;
    (ca, fds, silent, closed)
}

#[tokio::test]
async fn one_source_cannot_take_the_handshake_pool() {
    // Twenty from one source: four hold places, waiting for their
    // handshake; the other sixteen wait their turn, not closed.
    let (ca, fds, silent, closed) = silent_connections("64", "4", &[OTHER_HOST], 20).await;
    assert_eq!(closed, 0);
    // Everyone else still connects and is served meanwhile.
    ca.legit_issue().await;
    assert_eq!(
        ca.refusals(label::PENDING_HANDSHAKES_PER_SOURCE).await,
        16.0
    );
    drop(silent);
    fds_return_to(ca.pid(), fds).await;
}

/// TLS connections (handshake done, nothing sent after it) from each of
/// `hosts`, `each` opened at once per host: the ones the CA keeps.
async fn silent_tls(
    ca: &CaProc,
    hosts: &[&str],
    each: usize,
) -> Vec<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let opening = hosts.iter().flat_map(|h| std::iter::repeat_n(*h, each));
    let opened = futures_util::future::join_all(
        opening.map(|h| tokio::time::timeout(Duration::from_secs(5), ca.tls_from(h))),
    )
    .await;
    opened.into_iter().filter_map(|r| r.ok()?.ok()).collect()
}

/// A connection holds its admission place after its handshake, until its
/// first answer: sources that finish handshakes and then send nothing hold
/// at most their share each (the per-source cap counts them), so another
/// source is still admitted at once, not after their hold.
#[tokio::test]
async fn silent_connections_after_the_handshake_hold_only_their_share() {
    let ca = CaProc::start(&[
        "--max-pending-handshakes",
        "20",
        "--max-pending-handshakes-per-source",
        "4",
        "--admission-hold",
        "60s",
        "--preface-timeout",
        "60s",
    ]);
    let fds = fd_count(ca.pid());
    let hosts = [OTHER_HOST, THIRD_HOST, "127.0.0.4", "127.0.0.5"];
    // Four each: kept, holding 16 of the 20 places once their handshakes
    // are done. Four more each, after: closed at accept.
    let mut held = silent_tls(&ca, &hosts, 4).await;
    assert_eq!(held.len(), 16);
    held.extend(silent_tls(&ca, &hosts, 4).await);
    assert_eq!(held.len(), 16, "the per-source share counts held places");
    assert_eq!(
        ca.refusals(label::PENDING_HANDSHAKES_PER_SOURCE).await,
        16.0
    );
    // A fifth source is served well before the 60 s hold or preface
    // deadline would free a place.
    tokio::time::timeout(Duration::from_secs(10), ca.legit_issue())
        .await
        .expect("another source is admitted while the silent ones hold their places");
    drop(held);
    fds_return_to(ca.pid(), fds).await;
}

/// The admission place is given back at the first answer, and after the
/// hold bound by a connection that never answers (it stays open, served
/// on); neither keeps its place for its life.
#[tokio::test]
async fn admission_places_are_released_by_the_first_answer_or_the_hold() {
    let ca = CaProc::start(&[
        "--max-pending-handshakes",
        "1",
        "--admission-hold",
        "60s",
        "--preface-timeout",
        "60s",
    ]);
    // A client answered once keeps its connection, not its place.
    let mut first = ca.client().await;
    let (_k, csr) = key_and_csr(workload_ca::ca::KeyAlgorithm::EcdsaP256, None);
    request(&mut first, &csr, Some(&ca.token("prod", "web")), 0)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), ca.legit_issue())
        .await
        .expect("the first answer released the place");
    drop((first, ca));

    let ca = CaProc::start(&[
        "--max-pending-handshakes",
        "2",
        "--admission-hold",
        "1s",
        "--preface-timeout",
        "60s",
    ]);
    let fds = fd_count(ca.pid());
    // Two silent connections fill the pool; after the 1 s hold they give
    // their places back and the legitimate client is admitted.
    let mut held = silent_tls(&ca, &[OTHER_HOST], 2).await;
    assert_eq!(held.len(), 2);
    tokio::time::timeout(Duration::from_secs(20), ca.legit_issue())
        .await
        .expect("the hold bound released the places");
    let paused = ca.refusals(label::PENDING_HANDSHAKES).await;
    assert!(paused >= 1.0, "the pause is counted");
    for tls in &mut held {
        let closed = closed_within(tls, Duration::from_millis(100)).await;
        assert!(!closed, "still served");
    }
    drop(held);
    fds_return_to(ca.pid(), fds).await;
}

#[tokio::test]
async fn total_connections_are_capped() {
    let ca = CaProc::start(&[
        "--max-connections",
        "6",
        "--max-connections-per-source",
        "100",
    ]);
    let fds = fd_count(ca.pid());
    // A client connected before the flood keeps being served.
    let mut existing = ca.client().await;
    let token = ca.token("prod", "web");

    let mut held = Vec::new();
    for host in [OTHER_HOST, THIRD_HOST] {
        for _ in 0..2 {
            held.push(ca.raw_from(host).await);
        }
    }
    held.push(ca.raw_from(THIRD_HOST).await);
    // Six open: the seventh is closed at once, from whichever host.
    let mut tcp = ca.tcp_from(OTHER_HOST).await.unwrap();
    assert!(closed_within(&mut tcp, Duration::from_secs(2)).await);
    let mut tcp = ca.tcp_from("127.0.0.4").await.unwrap();
    assert!(closed_within(&mut tcp, Duration::from_secs(2)).await);

    let (_k, csr) = key_and_csr(workload_ca::ca::KeyAlgorithm::EcdsaP256, None);
    let chain = request(&mut existing, &csr, Some(&token), 0)
        .await
        .expect("an established client is still served");
    webpki_verify(&chain);
    assert_eq!(ca.refusals(label::CONNECTIONS).await, 2.0);

    drop(held);
    drop(existing);
    fds_return_to(ca.pid(), fds).await;
    ca.legit_issue().await;
}

#[tokio::test]
async fn the_metrics_port_has_deadlines_and_caps() {
    let ca = CaProc::start(&[
        "--ops-max-connections",
        "6",
        "--ops-max-connections-per-source",
        "4",
        "--ops-header-read-timeout",
        "1s",
        "--ops-connection-timeout",
        "3s",
    ]);
    let fds = fd_count(ca.pid());
    // Half-sent requests from one source: closed at the header-read
    // deadline; its fifth is refused at once.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut s = tcp_from(OTHER_HOST, ca.ops).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    let mut fifth = tcp_from(OTHER_HOST, ca.ops).await.unwrap();
    assert!(closed_within(&mut fifth, Duration::from_secs(2)).await);
    // The probes of another source still get through, and the CA port is
    // unaffected.
    assert_eq!(http_get(ca.ops, "/healthz").await.0, 200);
    ca.legit_issue().await;
    // Two more sources fill the total: the next is refused.
    let mut third = tcp_from(THIRD_HOST, ca.ops).await.unwrap();
    let mut fourth = tcp_from("127.0.0.4", ca.ops).await.unwrap();
    let mut over = tcp_from("127.0.0.5", ca.ops).await.unwrap();
    assert!(closed_within(&mut over, Duration::from_secs(2)).await);
    for s in slow.iter_mut().chain([&mut third, &mut fourth]) {
        assert!(
            closed_within(s, Duration::from_secs(4)).await,
            "header-read deadline"
        );
    }
    assert_eq!(ca.refusals(label::OPS_CONNECTIONS).await, 2.0);
    assert!(ca.refusals(label::OPS_TIMEOUT).await >= 6.0);
    drop((slow, fifth, third, fourth, over));
    fds_return_to(ca.pid(), fds).await;
    assert_eq!(http_get(ca.ops, "/readyz").await.0, 200);
}

/// A peer's text never starts a log line, in either format, and one peer's
/// repeated failures are rate-limited and counted.
#[tokio::test]
async fn peer_text_cannot_forge_log_lines() {
    for format in ["text", "json"] {
        let ca = CaProc::start(&["--log-format", format]);
        let forged =
            "x\nFORGED 2026-11-30T00:00:00Z  INFO workload_ca: certificate issued\r\x1b[2K\u{202e}";
        let mut client = ca.client().await;
        let (_k, csr) = key_and_csr(workload_ca::ca::KeyAlgorithm::EcdsaP256, None);
        // A good token whose pod name is hostile: issued, and logged.
        let now = now_secs();
        workload_ca::server::jwt_crypto::install();
        let good = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &serde_json::json!({
                "iss": "workload-ca-dev", "aud": ["istio-ca"], "sub": "system:serviceaccount:prod:web",
                "iat": now, "nbf": now, "exp": now + 600,
                "kubernetes.io": {"namespace": "prod", "serviceaccount": {"name": "web"}, "pod": {"name": forged}}
            }),
            &jsonwebtoken::EncodingKey::from_ec_pem(
                std::fs::read(ca.state.join("dev-issuer-key.pem")).unwrap().as_slice(),
            )
            .unwrap(),
        )
        .unwrap();
        request(&mut client, &csr, Some(&good), 0)
            .await
            .expect("a signed token is a signed token");
        // Bad tokens whose claims are hostile: refused, and logged.
        let token = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"ES256","typ":"JWT"}"#),
            b64(&serde_json::json!({"iss": forged, "sub": forged}).to_string())
        );
        for _ in 0..50 {
            let err = request(&mut client, &csr, Some(&token), 0)
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
        }
        let suppressed = ca.metric("workload_ca_log_suppressed_total").await;
        let log = ca.log_text();
        assert_log_safe(&log, format);
        // A burst per 10 s window (one window unless this machine is very
        // slow); every failure either logged or counted as suppressed.
        let warnings = log
            .lines()
            .filter(|l| l.contains("authentication failed"))
            .count();
        let burst = workload_ca::limits::PEER_WARN_BURST as usize;
        assert!(
            warnings >= burst && warnings <= 2 * burst,
            "{format}: {warnings}"
        );
        assert_eq!(warnings as f64 + suppressed, 50.0, "{format}");
        assert!(log.contains("certificate issued"), "{format}");
    }
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test]
async fn streams_reset_for_client_errors_end_the_connection() {
    let ca = CaProc::start(&[
        "--max-streams-per-connection",
        "2",
        "--max-reset-streams",
        "10",
    ]);
    let fds = fd_count(ca.pid());
    let mut raw = ca.raw_from(OTHER_HOST).await;
    let headers = h2raw::grpc_headers("localhost", PATH);
    for i in 0..40u32 {
        if raw.send_headers(1 + 2 * i, &headers, false).await.is_err() {
            break;
        }
    }
    let events = raw
        .collect_until(Duration::from_secs(10), |e| e.closed)
        .await;
    assert_eq!(
        events.goaway.map(|(_, code)| code),
        Some(h2raw::ENHANCE_YOUR_CALM),
        "{events:?}"
    );
    assert!(events.refused() <= 11, "{events:?}");
    ca.legit_issue().await;
    assert_eq!(ca.refusals(label::RESET_FLOOD).await, 1.0);
    drop(raw);
    fds_return_to(ca.pid(), fds).await;
}

#[tokio::test]
async fn connections_are_closed_at_their_maximum_age() {
    let ca = CaProc::start(&[
        "--max-connection-age",
        "1s",
        "--goaway-grace",
        "1s",
        "--idle-timeout",
        "0",
    ]);
    let fds = fd_count(ca.pid());
    let mut raw = ca.raw_from(OTHER_HOST).await;
    // Busy (a call in flight, its body never sent), yet told to go at its
    // age, and closed when the grace period after that is over.
    raw.send_headers(1, &h2raw::grpc_headers("localhost", PATH), false)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let events = raw
        .collect_until(Duration::from_secs(8), |e| e.closed)
        .await;
    assert_eq!(events.goaway.map(|(_, code)| code), Some(h2raw::NO_ERROR));
    assert!(events.closed, "closed after the grace period: {events:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "before the 15 s call deadline"
    );
    assert_eq!(ca.refusals(label::IDLE_TIMEOUT).await, 0.0, "not idle");
    ca.legit_issue().await;
    drop(raw);
    fds_return_to(ca.pid(), fds).await;
}

/// A client that opens no receive window cannot hold a call, and with it a
/// connection and a place in the call limits, beyond the call deadline.
#[tokio::test]
async fn a_client_that_never_takes_its_answer_loses_the_connection() {
    use prost::Message;
    let ca = CaProc::start(&["--request-timeout", "1s", "--max-connection-age", "0"]);
    let fds = fd_count(ca.pid());
    let mut raw = RawH2::new(ca.tls_from(OTHER_HOST).await.unwrap());
    raw.send_raw(h2raw::PREFACE).await.unwrap();
    // SETTINGS_INITIAL_WINDOW_SIZE = 0: the server may send no DATA.
    let mut settings = 0x4u16.to_be_bytes().to_vec();
    settings.extend(0u32.to_be_bytes());
    raw.send_frame(h2raw::SETTINGS, 0, 0, &settings)
        .await
        .unwrap();
    let (_k, csr) = key_and_csr(workload_ca::ca::KeyAlgorithm::EcdsaP256, None);
    let body = workload_ca::proto::istio::IstioCertificateRequest {
        csr,
        validity_duration: 0,
        metadata: None,
    }
    .encode_to_vec();
    let mut headers = h2raw::grpc_headers("localhost", PATH);
    headers.push((
        "authorization".into(),
        format!("Bearer {}", ca.token("prod", "web")),
    ));
    raw.send_headers(1, &headers, false).await.unwrap();
    raw.send_data(1, &h2raw::grpc_message(&body), true)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let events = raw
        .collect_until(Duration::from_secs(10), |e| e.closed)
        .await;
    assert!(events.headers_on.contains(&1), "answered: {events:?}");
    assert!(events.closed, "{events:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(ca.refusals(label::RESPONSE_STALLED).await, 1.0);
    ca.legit_issue().await;
    drop(raw);
    fds_return_to(ca.pid(), fds).await;
}

/// A full handshake pool refuses nothing: accepting pauses, and the
/// connections past it wait in the listen backlog until a handshake ends
/// (here: the silent ones reaching their deadline), then are served.
#[tokio::test]
async fn a_full_handshake_pool_makes_connections_wait_not_fail() {
    let ca = CaProc::start(&[
        "--max-pending-handshakes",
        "4",
        "--max-pending-handshakes-per-source",
        "100",
        "--handshake-timeout",
        "3s",
    ]);
    let fds = fd_count(ca.pid());
    let mut silent = Vec::new();
    for host in [OTHER_HOST, THIRD_HOST] {
        for _ in 0..3 {
            silent.push(ca.tcp_from(host).await.unwrap());
        }
    }
    // Four fill the pool and two wait in the backlog: none is closed.
    assert_eq!(
        count_closed(&mut silent, Duration::from_millis(250)).await,
        0
    );
    assert!(
        ca.refusals(label::PENDING_HANDSHAKES).await >= 1.0,
        "the pause is counted"
    );
    // A legitimate client waits its turn and is served.
    ca.legit_issue().await;
    assert_eq!(ca.refusals(label::CONNECTIONS).await, 0.0);
    // Every silent connection got its handshake, and met its deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while ca.refusals(label::HANDSHAKE_TIMEOUT).await < 6.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "six handshake deadlines"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count_closed(&mut silent, Duration::from_secs(1)).await, 6);
    drop(silent);
    fds_return_to(ca.pid(), fds).await;
}

#[tokio::test]
async fn request_messages_are_bounded() {
    let ca = CaProc::start(&["--max-request-bytes", "4096"]);
    let mut client = ca.client().await;
    let token = ca.token("prod", "web");
    let (_k, csr) = key_and_csr(workload_ca::ca::KeyAlgorithm::EcdsaP256, None);
    let padded = format!("{csr}{}", " ".repeat(8192));
    let err = request(&mut client, &padded, Some(&token), 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{}", err.message());
    assert_eq!(ca.refusals(label::MESSAGE_SIZE).await, 1.0);
    let chain = request(&mut client, &csr, Some(&token), 0).await.unwrap();
    webpki_verify(&chain);
}

/// HTTP/2 "rapid reset" (CVE-2023-44487): streams opened and reset at once,
/// in one burst, before the server could serve them.
#[tokio::test]
async fn rapid_resets_end_the_connection() {
    let ca = CaProc::start(&["--max-pending-accept-resets", "5"]);
    let fds = fd_count(ca.pid());
    let mut raw = ca.raw_from(OTHER_HOST).await;
    let block = h2raw::encode_header_block(&h2raw::grpc_headers("localhost", PATH));
    // Between our limit (5) and h2's own default (20): only the flag can
    // end this connection.
    let mut burst = Vec::new();
    for i in 0..12u32 {
        let id = 1 + 2 * i;
        burst.extend(h2raw::encode_frame(
            h2raw::HEADERS,
            h2raw::FLAG_END_HEADERS,
            id,
            &block,
        ));
        burst.extend(h2raw::encode_frame(
            h2raw::RST_STREAM,
            0,
            id,
            &h2raw::CANCEL.to_be_bytes(),
        ));
    }
    let _ = raw.send_raw(&burst).await;
    let events = raw
        .collect_until(Duration::from_secs(10), |e| e.closed)
        .await;
    assert_eq!(
        events.goaway.map(|(_, code)| code),
        Some(h2raw::ENHANCE_YOUR_CALM),
        "{events:?}"
    );
    ca.legit_issue().await;
    assert_eq!(ca.refusals(label::RESET_FLOOD).await, 1.0);
    drop(raw);
    fds_return_to(ca.pid(), fds).await;
}

/// What bounds one client's memory whatever it does with its connections:
/// calls in flight per source, then in all, refused before any handler.
#[tokio::test]
async fn calls_in_flight_are_capped_per_source_and_in_all() {
    let ca = CaProc::start(&[
        "--max-calls-per-source",
        "5",
        "--max-calls",
        "8",
        "--request-timeout",
        "30s",
    ]);
    let fds = fd_count(ca.pid());
    let headers = h2raw::grpc_headers("localhost", PATH);
    // Two connections from one source, four body-less calls each: the
    // sixth to eighth are answered at once (RESOURCE_EXHAUSTED, a complete
    // response), the first five stay open.
    let mut a = ca.raw_from(OTHER_HOST).await;
    let mut b = ca.raw_from(OTHER_HOST).await;
    for i in 0..4u32 {
        a.send_headers(1 + 2 * i, &headers, false).await.unwrap();
    }
    let ea = a.collect(Duration::from_millis(500)).await;
    for i in 0..4u32 {
        b.send_headers(1 + 2 * i, &headers, false).await.unwrap();
    }
    let eb = b
        .collect_until(Duration::from_secs(5), |e| e.end_streams.len() >= 3)
        .await;
    assert!(ea.end_streams.is_empty(), "{ea:?}");
    assert_eq!(eb.end_streams.len(), 3, "{eb:?}");
    assert_eq!(ca.refusals(label::CALLS_PER_SOURCE).await, 3.0);
    // Another source: three more fit under the total of eight, the fourth
    // does not.
    let mut c = ca.raw_from(THIRD_HOST).await;
    for i in 0..4u32 {
        c.send_headers(1 + 2 * i, &headers, false).await.unwrap();
    }
    let ec = c
        .collect_until(Duration::from_secs(5), |e| !e.end_streams.is_empty())
        .await;
    let more = c.collect(Duration::from_millis(300)).await;
    assert_eq!(
        ec.end_streams.len() + more.end_streams.len(),
        1,
        "one answered at once: {ec:?} {more:?}"
    );
    assert_eq!(ca.refusals(label::CALLS).await, 1.0);
    // Once they go, everyone is served again.
    drop((a, b, c));
    fds_return_to(ca.pid(), fds).await;
    ca.legit_issue().await;
}

/// Bundle watches live as long as their connection: outside the call
/// limits and deadlines, one per connection. Past the cap the call is
/// refused at once; the watches open stay served, and CSRs on the same
/// connection and source are not crowded out.
#[tokio::test]
async fn bundle_watches_have_their_own_small_budget_per_connection() {
    use workload_ca::proto::workloadca::AgentReport;
    use workload_ca::proto::workloadca::trust_bundle_service_client::TrustBundleServiceClient;
    let ca = CaProc::start(&["--max-calls-per-source", "2", "--request-timeout", "1s"]);
    let channel = tls_channel(ca.grpc, &ca.root_pem(), None).await.unwrap();
    let token = ca.token("prod", "web");
    let mut open = Vec::new();
    let mut refused = None;
    for i in 0..5 {
        let (tx, rx) = tokio::sync::mpsc::channel::<AgentReport>(1);
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        match TrustBundleServiceClient::new(channel.clone())
            .watch_bundle(req)
            .await
        {
            Ok(r) => open.push((tx, r.into_inner())),
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::ResourceExhausted, "watch {i}: {s:?}");
                refused = Some(i);
                break;
            }
        }
    }
    assert_eq!(refused, Some(1), "one per connection");
    assert_eq!(ca.refusals(label::WATCHES_PER_CONNECTION).await, 1.0);
    // Past the call deadline, the watches are still there and answer.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (_, updates) in &mut open {
        let first = updates.message().await.unwrap().unwrap();
        assert_eq!(first.generation, 1);
    }
    // A watch open, two CSR calls per source allowed: CSRs still pass, on
    // the same connection and on a new one.
    let (_k, csr) = key_and_csr(workload_ca::ca::KeyAlgorithm::EcdsaP256, None);
    let mut same = workload_ca::proto::istio::istio_certificate_service_client::IstioCertificateServiceClient::new(channel.clone());
    request(&mut same, &csr, Some(&token), 0).await.unwrap();
    ca.legit_issue().await;
    assert_eq!(ca.refusals(label::RESPONSE_STALLED).await, 0.0);
}
