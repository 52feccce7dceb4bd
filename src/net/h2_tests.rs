use super::*;

use bytes::Bytes;
use hyper::body::Frame;

#[test]
fn grpc_timeouts_parse_per_the_spec() {
    let t = |v: &str| {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-timeout", v.parse().unwrap());
        grpc_timeout(&h)
    };
    assert_eq!(t("5S"), Some(Duration::from_secs(5)));
    assert_eq!(t("250m"), Some(Duration::from_millis(250)));
    assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
    assert_eq!(t("100u"), Some(Duration::from_micros(100)));
    for bad in ["", "S", "5", "5x", "123456789S", "-1S"] {
        assert_eq!(t(bad), None, "{bad:?}");
    }
}

/// An in-memory connection counting the writes that reach it.
struct Counting {
    inner: tokio::io::DuplexStream,
    writes: Arc<AtomicUsize>,
}

impl AsyncRead for Counting {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counting {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.writes.fetch_add(1, Ordering::SeqCst);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// One call on `client`: the answer's body length and its trailers' status.
async fn call(client: &mut h2::client::SendRequest<Bytes>) -> (usize, String) {
    let request = http::Request::post("http://ca/test.Service/Call")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (answer, _) = client.send_request(request, true).unwrap();
    let mut body = answer.await.unwrap().into_body();
    let mut len = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        len += chunk.len();
        body.flow_control().release_capacity(chunk.len()).unwrap();
    }
    let trailers = body.trailers().await.unwrap().unwrap();
    (len, trailers["grpc-status"].to_str().unwrap().to_owned())
}

#[tokio::test]
async fn an_answer_goes_out_in_one_write() {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let writes = Arc::new(AtomicUsize::new(0));
    let server_io = Counting {
        inner: server_io,
        writes: writes.clone(),
    };
    // A gRPC-shaped answer: HEADERS, a DATA frame, then trailers (which
    // HTTP/2 alone writes separately, after a flow-control step).
    let service = tower::service_fn(|_: http::Request<hyper::body::Incoming>| async {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames = futures_util::stream::iter([
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![7u8; 1500]))),
            Ok(Frame::trailers(trailers)),
        ]);
        let body = tonic::body::Body::new(http_body_util::StreamBody::new(frames));
        Ok::<_, std::convert::Infallible>(http::Response::new(body))
    });
    let limits = crate::limits::ServerLimits::default().http2;
    let refusals = Refusals::register(&prometheus::Registry::new(), "test").unwrap();
    let (_stop_tx, stop) = watch::channel(false);
    let server = tokio::spawn(async move {
        serve_h2(
            server_io,
            (),
            service,
            &limits,
            &refusals,
            Calls::default(),
            stop,
        )
        .await;
    });

    let (mut client, conn) = h2::client::handshake(client_io).await.unwrap();
    let conn = tokio::spawn(conn);
    // The first call also carries the connection's settings exchange.
    assert_eq!(call(&mut client).await, (1500, "0".to_owned()));
    for _ in 0..3 {
        let before = writes.load(Ordering::SeqCst);
        assert_eq!(call(&mut client).await, (1500, "0".to_owned()));
        assert_eq!(
            writes.load(Ordering::SeqCst) - before,
            1,
            "HEADERS, DATA and trailers in one write"
        );
    }
    drop(client);
    server.abort();
    conn.abort();
}
