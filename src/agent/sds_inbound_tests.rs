use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;
use prost::Message;
use tokio_stream::StreamExt;

use super::*;
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::envoy::service::discovery::v3::DiscoveryRequest;

type Frames =
    StreamBody<tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>>;

fn body(frames: Vec<Result<Bytes, std::io::Error>>) -> Frames {
    StreamBody::new(tokio_stream::iter(
        frames
            .into_iter()
            .map(|f| f.map(Frame::data))
            .collect::<Vec<_>>(),
    ))
}

fn framed(msg: &DiscoveryRequest) -> Vec<u8> {
    let mut out = vec![0];
    out.extend(u32::try_from(msg.encoded_len()).unwrap().to_be_bytes());
    out.extend(msg.encode_to_vec());
    out
}

/// `bytes` cut into `size`-byte frames.
fn frames(bytes: &[u8], size: usize) -> Vec<Result<Bytes, std::io::Error>> {
    bytes
        .chunks(size)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect()
}

fn first_request(node_bytes: usize) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node {
            id: "sidecar~x".into(),
            cluster: "c".repeat(node_bytes),
            ..Node::default()
        }),
        resource_names: vec!["default".into()],
        ..DiscoveryRequest::default()
    }
}

fn ack(nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: "default=01".into(),
        resource_names: vec!["default".into()],
        response_nonce: nonce.into(),
        ..DiscoveryRequest::default()
    }
}

#[tokio::test]
async fn a_large_first_message_leaves_no_large_buffer() {
    let first = first_request(61_000);
    let mut wire = framed(&first);
    wire.extend(framed(&ack("1")));
    let mut r = Requests::<_, DiscoveryRequest>::new(body(frames(&wire, 16_384)), 256 * 1024);
    assert_eq!(r.next().await.unwrap().unwrap(), first);
    assert!(r.buf.capacity() <= KEEP_BYTES, "{}", r.buf.capacity());
    assert_eq!(r.next().await.unwrap().unwrap(), ack("1"));
    assert!(r.buf.capacity() <= KEEP_BYTES, "{}", r.buf.capacity());
    assert!(r.next().await.is_none());
    assert!(r.next().await.is_none());
}

/// Envoy's shape: the first request alone (the ACK comes only after an
/// answer). Its buffer is gone once it is decoded, not kept until the ACK.
#[tokio::test]
async fn a_large_first_message_alone_is_not_kept() {
    let first = first_request(61_000);
    let mut r =
        Requests::<_, DiscoveryRequest>::new(body(frames(&framed(&first), 16_384)), 256 * 1024);
    assert_eq!(r.next().await.unwrap().unwrap(), first);
    assert!(
        !r.buf.try_reclaim(KEEP_BYTES + 1),
        "the 61 KB allocation was kept"
    );
}

/// Many small messages in one frame: each byte of the rest moved at most
/// once (not the whole rest after every message).
#[tokio::test]
async fn many_small_messages_in_a_frame_decode_in_order() {
    let msgs: Vec<DiscoveryRequest> = (0..400).map(|i| ack(&i.to_string())).collect();
    let wire: Vec<u8> = msgs.iter().flat_map(framed).collect();
    assert!(wire.len() > 8 * KEEP_BYTES);
    let r = Requests::<_, DiscoveryRequest>::new(body(frames(&wire, wire.len())), 1024);
    let got: Vec<_> = r.map(Result::unwrap).collect().await;
    assert_eq!(got, msgs);
}

#[tokio::test]
async fn messages_split_anywhere_and_several_per_frame() {
    let msgs: Vec<DiscoveryRequest> = (0..5).map(|i| ack(&i.to_string())).collect();
    let wire: Vec<u8> = msgs.iter().flat_map(framed).collect();
    for size in [1, 3, 5, 7, wire.len()] {
        let r = Requests::<_, DiscoveryRequest>::new(body(frames(&wire, size)), 1024);
        let got: Vec<_> = r.map(Result::unwrap).collect().await;
        assert_eq!(got, msgs, "frames of {size}");
    }
}

#[tokio::test]
async fn too_long_a_message_is_refused_before_it_is_buffered() {
    let wire = framed(&first_request(10_000));
    let mut r = Requests::<_, DiscoveryRequest>::new(body(frames(&wire, 16)), 1000);
    let e = r.next().await.unwrap().unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    assert!(r.buf.capacity() < 1000, "{}", r.buf.capacity());
    assert!(r.next().await.is_none());
}

#[tokio::test]
async fn bad_frames_end_the_stream_with_an_error() {
    let mut compressed = framed(&ack("1"));
    compressed[0] = 1;
    let mut bad_flag = framed(&ack("1"));
    bad_flag[0] = 7;
    let mut cut = framed(&ack("1"));
    cut.pop();
    let garbage = [0, 0, 0, 0, 2, 0xff, 0xff];
    let broken = vec![
        Ok(Bytes::from(framed(&ack("1")))),
        Err(std::io::Error::other("reset")),
    ];
    for (wire, code) in [
        (vec![Ok(Bytes::from(compressed))], tonic::Code::Internal),
        (vec![Ok(Bytes::from(bad_flag))], tonic::Code::Internal),
        (vec![Ok(Bytes::from(cut))], tonic::Code::Internal),
        (
            vec![Ok(Bytes::copy_from_slice(&garbage))],
            tonic::Code::Internal,
        ),
    ] {
        let mut r = Requests::<_, DiscoveryRequest>::new(body(wire), 1024);
        let e = r.next().await.unwrap().unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(r.next().await.is_none());
    }
    let mut r = Requests::<_, DiscoveryRequest>::new(body(broken), 1024);
    assert_eq!(r.next().await.unwrap().unwrap(), ack("1"));
    assert!(r.next().await.unwrap().is_err());
    assert!(r.next().await.is_none());
}
