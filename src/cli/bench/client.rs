//! A lean HTTP/2 client over TLS for `CreateCertificate`: the h2 crate on
//! tokio-rustls, requests already encoded, nothing decoded that the
//! figures do not need (the gRPC status; the body only when asked to keep
//! it for verification).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpSocket;

use super::work::Prepared;

/// How long one call (or one connection set-up) may take before it
/// counts as an error.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call failed, as counted in the report.
#[derive(Debug)]
pub(super) enum CallError {
    /// TCP connect (refused, reset, no address).
    Connect(std::io::Error),
    /// The TLS handshake.
    Tls(std::io::Error),
    /// HTTP/2: a reset stream, a GOAWAY, a broken connection.
    Http2(h2::Error),
    /// An HTTP status other than 200.
    HttpStatus(u16),
    /// A gRPC status other than OK.
    Grpc(i32),
    /// No answer within [`CALL_TIMEOUT`].
    Timeout,
}

impl CallError {
    /// The report's key for this error.
    pub(super) fn label(&self) -> String {
        match self {
            Self::Connect(e) => format!("connect: {:?}", e.kind()),
            Self::Tls(e) => format!("tls: {:?}", e.kind()),
            Self::Http2(e) => match e.reason() {
                Some(r) => format!("http2: {r:?}"),
                None if e.is_io() => "http2: connection lost".into(),
                None => "http2: other".into(),
            },
            Self::HttpStatus(s) => format!("http {s}"),
            Self::Grpc(code) => format!("grpc {:?}", tonic::Code::from_i32(*code)),
            Self::Timeout => "timeout".into(),
        }
    }
}

/// TLS to the CA: its roots, ALPN h2, resumption on or off.
#[derive(Clone)]
pub(super) struct Tls {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
    /// Handshakes that resumed a session, over every clone.
    pub resumed: Arc<AtomicU64>,
}

impl Tls {
    /// # Errors
    /// An unreadable root file or a bad server name.
    pub(super) fn new(root_cert: &Path, server_name: &str, resume: bool) -> anyhow::Result<Self> {
        let pem =
            std::fs::read(root_cert).with_context(|| format!("reading {}", root_cert.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for block in pem::parse_many(&pem).context("the root file is not PEM")? {
            if block.tag() == "CERTIFICATE" {
                roots
                    .add(CertificateDer::from(block.into_contents()))
                    .context("a root certificate rustls refuses")?;
            }
        }
        if roots.is_empty() {
            anyhow::bail!("{} holds no certificate", root_cert.display());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        if !resume {
            config.resumption = rustls::client::Resumption::disabled();
        }
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            name: ServerName::try_from(server_name.to_owned())
                .with_context(|| format!("server name {server_name:?}"))?,
            resumed: Arc::default(),
        })
    }
}

/// Opens a connection: TCP (from `source` when given), TLS, HTTP/2. The
/// connection's driver runs in its own task until the connection closes
/// (when the returned handle and every clone of it are dropped).
///
/// # Errors
/// The stage that failed.
pub(super) async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    tls: &Tls,
) -> Result<SendRequest<Bytes>, CallError> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(CallError::Connect)?;
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(CallError::Connect)?;
    }
    let tcp = socket.connect(addr).await.map_err(CallError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let stream = tls
        .connector
        .connect(tls.name.clone(), tcp)
        .await
        .map_err(CallError::Tls)?;
    if stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        tls.resumed.fetch_add(1, Ordering::Relaxed);
    }
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .handshake(stream)
        .await
        .map_err(CallError::Http2)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// One `CreateCertificate` call on `send`. Returns the response message
/// (the gRPC frame) when `keep` is set, else an empty buffer.
///
/// # Errors
/// Anything but an HTTP 200 with gRPC status 0.
pub(super) async fn call(
    send: &mut SendRequest<Bytes>,
    uri: &http::Uri,
    call: &Prepared,
    keep: bool,
) -> Result<Bytes, CallError> {
    std::future::poll_fn(|cx| send.poll_ready(cx))
        .await
        .map_err(CallError::Http2)?;
    let mut req = http::Request::new(());
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = uri.clone();
    *req.headers_mut() = call.headers.clone();
    let (response, mut body_out) = send.send_request(req, false).map_err(CallError::Http2)?;
    body_out
        .send_data(call.body.clone(), true)
        .map_err(CallError::Http2)?;
    let response = response.await.map_err(CallError::Http2)?;
    if response.status() != http::StatusCode::OK {
        return Err(CallError::HttpStatus(response.status().as_u16()));
    }
    // A trailers-only answer (an error) carries grpc-status in its headers.
    if let Some(code) = grpc_status(response.headers())
        && code != 0
    {
        return Err(CallError::Grpc(code));
    }
    let mut body = response.into_body();
    let mut kept = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(CallError::Http2)?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if keep {
            kept.extend_from_slice(&chunk);
        }
    }
    let trailers = body.trailers().await.map_err(CallError::Http2)?;
    match trailers.as_ref().and_then(grpc_status) {
        Some(0) => Ok(kept.freeze()),
        Some(code) => Err(CallError::Grpc(code)),
        // No status at all: the call did not complete as gRPC.
        None => Err(CallError::Grpc(tonic::Code::Unknown as i32)),
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Resolves HOST:PORT once, before the clock starts.
///
/// # Errors
/// An address that does not resolve.
pub(super) async fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to nothing"))
}
