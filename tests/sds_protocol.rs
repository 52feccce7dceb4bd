//! The SDS server against a scripted client on a real Unix socket: what a
//! real Envoy sends (REFERENCE section 3), and what it must get back.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use workload_ca::agent::metrics::AgentMetrics;
use workload_ca::agent::sds::{self, SECRET_TYPE_URL, Sds};
use workload_ca::agent::workload::{CertWatch, RootBundle, WorkloadCert};
use workload_ca::ca::Authority;
use workload_ca::proto::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use workload_ca::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use workload_ca::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;

const ID: &str = "spiffe://cluster.local/ns/prod/sa/web";
const WAIT: Duration = Duration::from_secs(5);

/// A CA and the watch channels an agent would feed.
struct Fixture {
    authority: Authority,
    cert_tx: watch::Sender<Option<Arc<WorkloadCert>>>,
    roots_tx: watch::Sender<Option<Arc<RootBundle>>>,
    watch: CertWatch,
    metrics: Arc<AgentMetrics>,
    _dir: tempfile::TempDir,
    socket: PathBuf,
    _stop: watch::Sender<bool>,
}

fn authority() -> Authority {
    common::authority()
}

impl Fixture {
    /// With a certificate already published, unless `empty`.
    async fn new(empty: bool) -> Self {
        let authority = authority();
        let (cert_tx, cert) = watch::channel(None);
        let (roots_tx, roots) = watch::channel(None);
        if !empty {
            let (c, r) = common::sds::issue(&authority, ID);
            cert_tx.send_replace(Some(Arc::new(c)));
            roots_tx.send_replace(Some(Arc::new(r)));
        }
        let watch = CertWatch { cert, roots };
        let metrics = Arc::new(AgentMetrics::new().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sds.sock");
        let (stop, stop_rx) = watch::channel(false);
        sds::serve(&socket, Sds::new(watch.clone(), metrics.clone()), stop_rx).unwrap();
        Self {
            authority,
            cert_tx,
            roots_tx,
            watch,
            metrics,
            _dir: dir,
            socket,
            _stop: stop,
        }
    }

    fn rotate(&self) -> String {
        let (c, _r) = common::sds::issue(&self.authority, ID);
        let v = c.version.clone();
        self.cert_tx.send_replace(Some(Arc::new(c)));
        v
    }

    fn new_roots(&self) -> String {
        let other = authority();
        let mut pem = self.watch.roots.borrow().as_ref().unwrap().pem.clone();
        pem.push_str(&other.roots().pem());
        let bundle = RootBundle::new(pem, None);
        let version = bundle.version.clone();
        self.roots_tx.send_replace(Some(Arc::new(bundle)));
        version
    }

    async fn client(&self) -> SecretDiscoveryServiceClient<Channel> {
        SecretDiscoveryServiceClient::new(connect(&self.socket).await)
    }
}

async fn connect(path: &Path) -> Channel {
    common::unix_channel(path).await
}

/// One StreamSecrets stream driven by hand.
use common::sds::SotwStream as Stream;

fn secrets(resp: &DiscoveryResponse) -> Vec<Secret> {
    resp.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, SECRET_TYPE_URL);
            Secret::decode(a.value.as_slice()).unwrap()
        })
        .collect()
}

fn cert_pem(s: &Secret) -> String {
    match &s.r#type {
        Some(secret::Type::TlsCertificate(t)) => match &t
            .certificate_chain
            .as_ref()
            .unwrap()
            .specifier
        {
            Some(
                workload_ca::proto::envoy::config::core::v3::data_source::Specifier::InlineBytes(b),
            ) => String::from_utf8(b.clone()).unwrap(),
            other => panic!("chain as {other:?}"),
        },
        other => panic!("not a TlsCertificate: {other:?}"),
    }
}

#[tokio::test]
async fn first_request_ack_rotation_push_and_nack() {
    let f = Fixture::new(false).await;
    let mut client = f.client().await;
    let mut s = Stream::open(&mut client).await;
    s.send(&["default"], "", "", None).await;
    let r1 = s.recv().await.unwrap();
    let sec = secrets(&r1);
    assert_eq!(sec.len(), 1);
    assert_eq!(
        sec[0].name, "default",
        "Secret.name must equal the requested name"
    );
    assert!(cert_pem(&sec[0]).contains("BEGIN CERTIFICATE"));
    assert!(
        matches!(&sec[0].r#type, Some(secret::Type::TlsCertificate(t)) if t.private_key.is_some())
    );

    // ACK: nothing is resent; the next message is the rotation.
    s.send(&["default"], &r1.version_info, &r1.nonce, None)
        .await;
    let v2 = f.rotate();
    let r2 = s.recv().await.unwrap();
    assert!(
        r2.version_info.contains(&v2),
        "pushed the rotated secret: {}",
        r2.version_info
    );
    assert_ne!(r2.nonce, r1.nonce);

    // NACK: logged and counted, not resent; the next message is the next rotation.
    s.send(
        &["default"],
        &r1.version_info,
        &r2.nonce,
        Some("Failed to load certificate chain"),
    )
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while f.metrics.sds_nacks.with_label_values(&["default"]).get() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the NACK was not counted"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let v3 = f.rotate();
    let r3 = s.recv().await.unwrap();
    assert!(r3.version_info.contains(&v3));
    assert_eq!(f.metrics.sds_nacks.with_label_values(&["default"]).get(), 1);
}

#[tokio::test]
async fn stale_nonces_are_ignored() {
    let f = Fixture::new(false).await;
    let mut client = f.client().await;
    let mut s = Stream::open(&mut client).await;
    s.send(&["default"], "", "", None).await;
    let r1 = s.recv().await.unwrap();
    // A request carrying a nonce we never sent (or an old one) changes nothing,
    // not even the subscribed names.
    s.send(&["ROOTCA"], &r1.version_info, "not-a-nonce-we-sent", None)
        .await;
    let v2 = f.rotate();
    let r2 = s.recv().await.unwrap();
    assert_eq!(secrets(&r2)[0].name, "default");
    assert!(r2.version_info.contains(&v2));
    // The current nonce with new names switches the subscription.
    s.send(&["ROOTCA"], &r2.version_info, &r2.nonce, None).await;
    let r3 = s.recv().await.unwrap();
    assert_eq!(secrets(&r3)[0].name, "ROOTCA");
}

#[tokio::test]
async fn a_reconnect_with_the_last_version_is_answered() {
    let f = Fixture::new(false).await;
    let mut client = f.client().await;
    let mut s = Stream::open(&mut client).await;
    s.send(&["default"], "", "", None).await;
    let r1 = s.recv().await.unwrap();
    drop(s);
    // What Envoy sends after the agent restarts: last accepted version, no nonce.
    let mut client = f.client().await;
    let mut again = Stream::open(&mut client).await;
    again.send(&["default"], &r1.version_info, "", None).await;
    let r = again
        .recv()
        .await
        .expect("answered despite carrying the current version");
    assert_eq!(r.version_info, r1.version_info);
    assert_eq!(secrets(&r)[0].name, "default");
}

#[tokio::test]
async fn unknown_and_foreign_names_end_only_their_stream() {
    let f = Fixture::new(false).await;
    let mut client = f.client().await;
    let mut good = Stream::open(&mut client).await;
    good.send(&["default"], "", "", None).await;
    good.recv().await.unwrap();

    let mut unknown = Stream::open(&mut client).await;
    unknown.send(&["file-cert"], "", "", None).await;
    let e = unknown.recv().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("file-cert") && e.message().contains("ROOTCA"),
        "{}",
        e.message()
    );

    let mut foreign = Stream::open(&mut client).await;
    foreign
        .send(&["spiffe://cluster.local/ns/prod/sa/admin"], "", "", None)
        .await;
    let e = foreign.recv().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains(ID));

    // SPIRE's bundle name (the trust domain's ID) answers like ROOTCA.
    let mut bundle = Stream::open(&mut client).await;
    bundle.send(&["spiffe://cluster.local"], "", "", None).await;
    let r = bundle.recv().await.unwrap();
    assert_eq!(secrets(&r)[0].name, "spiffe://cluster.local");
    assert!(matches!(
        &secrets(&r)[0].r#type,
        Some(secret::Type::ValidationContext(_))
    ));

    // Our own SPIFFE ID answers like default, under that exact name.
    let mut own = Stream::open(&mut client).await;
    own.send(&[ID], "", "", None).await;
    let r = own.recv().await.unwrap();
    assert_eq!(secrets(&r)[0].name, ID);

    // The first stream is unaffected.
    let v = f.rotate();
    assert!(good.recv().await.unwrap().version_info.contains(&v));
}

#[tokio::test]
async fn rootca_pushes_reach_rootca_streams_only() {
    let f = Fixture::new(false).await;
    let mut client = f.client().await;
    let mut certs = Stream::open(&mut client).await;
    let mut roots = Stream::open(&mut client).await;
    certs.send(&["default"], "", "", None).await;
    roots.send(&["ROOTCA"], "", "", None).await;
    let c1 = certs.recv().await.unwrap();
    let r1 = roots.recv().await.unwrap();
    assert!(
        matches!(&secrets(&r1)[0].r#type, Some(secret::Type::ValidationContext(v)) if v.trusted_ca.is_some())
    );
    certs
        .send(&["default"], &c1.version_info, &c1.nonce, None)
        .await;
    roots
        .send(&["ROOTCA"], &r1.version_info, &r1.nonce, None)
        .await;

    let rv = f.new_roots();
    let r2 = roots.recv().await.unwrap();
    assert!(r2.version_info.contains(&rv));
    // The certificate stream got nothing for the bundle change: its next
    // message is the next rotation.
    let cv = f.rotate();
    assert!(certs.recv().await.unwrap().version_info.contains(&cv));
}

#[tokio::test]
async fn nothing_is_sent_before_a_certificate_exists_nor_after_it_expired() {
    let f = Fixture::new(true).await;
    let mut client = f.client().await;
    let mut s = Stream::open(&mut client).await;
    s.send(&["default"], "", "", None).await;
    // Publish an already-expired certificate: still nothing.
    let (mut c, r) = common::sds::issue(&f.authority, ID);
    c.expires_at = tokio::time::Instant::now();
    f.roots_tx.send_replace(Some(Arc::new(r)));
    f.cert_tx.send_replace(Some(Arc::new(c)));
    // A valid one is what arrives first.
    let v = f.rotate();
    let first = s.recv().await.unwrap();
    assert!(
        first.version_info.contains(&v),
        "the first response is the valid certificate"
    );
}

#[tokio::test]
async fn fetch_secrets_answers_once() {
    let f = Fixture::new(false).await;
    let mut client = f.client().await;
    let resp = client
        .fetch_secrets(DiscoveryRequest {
            resource_names: vec!["default".into(), "ROOTCA".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<String> = secrets(&resp).into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["ROOTCA", "default"]);
    let e = client
        .fetch_secrets(DiscoveryRequest {
            resource_names: vec!["nope".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}

async fn next_delta(
    resp: &mut tonic::Streaming<
        workload_ca::proto::envoy::service::discovery::v3::DeltaDiscoveryResponse,
    >,
) -> workload_ca::proto::envoy::service::discovery::v3::DeltaDiscoveryResponse {
    tokio::time::timeout(WAIT, resp.message())
        .await
        .expect("in time")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn delta_subscribe_unsubscribe_and_reconnect() {
    let f = Fixture::new(false).await;
    let mut client = f.client().await;
    let (tx, rx) = mpsc::channel(8);
    let mut resp = client
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(DeltaDiscoveryRequest {
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: vec!["default".into(), "ROOTCA".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let r1 = next_delta(&mut resp).await;
    let mut names: Vec<&str> = r1.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["ROOTCA", "default"]);
    let held: std::collections::HashMap<String, String> = r1
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    // ACK, unsubscribe ROOTCA and subscribe our SPIFFE ID: the answer (just
    // the new name) shows the change was applied.
    tx.send(DeltaDiscoveryRequest {
        response_nonce: r1.nonce.clone(),
        resource_names_unsubscribe: vec!["ROOTCA".into()],
        resource_names_subscribe: vec![ID.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let r2 = next_delta(&mut resp).await;
    assert_eq!(
        r2.resources
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        [ID]
    );
    // Now a bundle change is not sent, a rotation is (for both names).
    f.new_roots();
    let v = f.rotate();
    let r2 = next_delta(&mut resp).await;
    let mut names: Vec<&str> = r2.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["default", ID], "no ROOTCA after unsubscribing");
    assert!(r2.resources.iter().all(|r| r.version == v));
    drop(tx);

    // Reconnect telling the server what it holds: only what changed is sent.
    let (tx, rx) = mpsc::channel(8);
    let mut resp = client
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut initial = held.clone();
    initial.insert("default".into(), v.clone());
    tx.send(DeltaDiscoveryRequest {
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: vec!["default".into(), "ROOTCA".into()],
        initial_resource_versions: initial,
        ..Default::default()
    })
    .await
    .unwrap();
    let r3 = next_delta(&mut resp).await;
    assert_eq!(
        r3.resources.len(),
        1,
        "default is current; only the changed ROOTCA is sent"
    );
    assert_eq!(r3.resources[0].name, "ROOTCA");
    // An unknown name ends the delta stream with a clear error.
    tx.send(DeltaDiscoveryRequest {
        resource_names_subscribe: vec!["bogus".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let e = tokio::time::timeout(WAIT, resp.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn the_socket_is_private_stale_ones_are_replaced_live_ones_are_not() {
    let f = Fixture::new(false).await;
    let meta = std::fs::symlink_metadata(&f.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // A live socket is not taken over.
    let (_s, rx) = watch::channel(false);
    let err = sds::serve(&f.socket, Sds::new(f.watch.clone(), f.metrics.clone()), rx)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("another process"), "{err}");

    // A stale socket (bound, nobody accepting) is replaced.
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let (_s2, rx2) = watch::channel(false);
    sds::serve(&stale, Sds::new(f.watch.clone(), f.metrics.clone()), rx2)
        .expect("stale socket replaced");
    let mut client = SecretDiscoveryServiceClient::new(connect(&stale).await);
    let mut s = Stream::open(&mut client).await;
    s.send(&["default"], "", "", None).await;
    s.recv().await.unwrap();

    // A regular file is never deleted.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    let (_s3, rx3) = watch::channel(false);
    assert!(sds::serve(&file, Sds::new(f.watch.clone(), f.metrics.clone()), rx3).is_err());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[tokio::test]
async fn an_old_agent_never_removes_its_successors_socket() {
    let f = Fixture::new(false).await;
    let (stop_old, rx_old) = watch::channel(false);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sds.sock");
    let old = sds::serve(&path, Sds::new(f.watch.clone(), f.metrics.clone()), rx_old).unwrap();
    // The successor takes the path over (as after the old one stopped accepting).
    std::fs::remove_file(&path).unwrap();
    let (_stop_new, rx_new) = watch::channel(false);
    sds::serve(&path, Sds::new(f.watch.clone(), f.metrics.clone()), rx_new).unwrap();
    // The old agent finishes its shutdown: the successor's socket stays.
    stop_old.send(true).unwrap();
    old.task.await.unwrap();
    assert!(path.exists(), "the successor's socket was removed");
    let mut client = SecretDiscoveryServiceClient::new(connect(&path).await);
    let mut s = Stream::open(&mut client).await;
    s.send(&["default"], "", "", None).await;
    s.recv().await.unwrap();
    // No private temporary directories are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, [std::ffi::OsString::from("sds.sock")]);
    // Abstract names are refused with a clear message.
    let (_s, rx) = watch::channel(false);
    let e = sds::serve(
        Path::new("@sds"),
        Sds::new(f.watch.clone(), f.metrics.clone()),
        rx,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("abstract"), "{e}");
}
