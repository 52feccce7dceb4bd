//! An SDS client the way Envoy speaks it (state of the world), and a
//! workload certificate issued in-process and accepted as the agent would.

use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use workload_ca::agent::bundle::RootBundle;
use workload_ca::agent::sds::SECRET_TYPE_URL;
use workload_ca::agent::workload::{WorkloadCert, accept_chain};
use workload_ca::ca::{Authority, KeyAlgorithm, PrivateKey, check_csr};
use workload_ca::identity::SpiffeId;
use workload_ca::proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use workload_ca::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use workload_ca::proto::google::rpc::Status as RpcStatus;

/// How long a response may take.
pub const WAIT: Duration = Duration::from_secs(5);

/// A certificate for `id` from `authority` (an hour), checked by the
/// agent's own `accept_chain`.
pub fn issue(authority: &Authority, id: &str) -> (WorkloadCert, RootBundle) {
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let kp = rcgen::KeyPair::from_pem(&key.to_pem()).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&kp)
        .unwrap()
        .pem()
        .unwrap();
    let chain = authority
        .sign_leaf(
            &check_csr(csr.as_bytes()).unwrap(),
            &SpiffeId::parse(id).unwrap(),
            Duration::from_secs(3600),
            SystemTime::now(),
        )
        .unwrap()
        .chain;
    accept_chain(&key, &chain, SystemTime::now()).unwrap()
}

/// One `StreamSecrets` stream.
pub struct SotwStream {
    pub tx: mpsc::Sender<DiscoveryRequest>,
    pub rx: tonic::Streaming<DiscoveryResponse>,
}

impl SotwStream {
    pub async fn open(client: &mut SecretDiscoveryServiceClient<Channel>) -> Self {
        let (tx, rx) = mpsc::channel(8);
        let rx = client
            .stream_secrets(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self { tx, rx }
    }

    /// A request; `error` makes it a NACK.
    pub async fn send(&self, names: &[&str], version: &str, nonce: &str, error: Option<&str>) {
        self.tx
            .send(DiscoveryRequest {
                version_info: version.into(),
                node: None,
                resource_names: names.iter().map(|s| s.to_string()).collect(),
                type_url: SECRET_TYPE_URL.into(),
                response_nonce: nonce.into(),
                error_detail: error.map(|m| RpcStatus {
                    code: 13,
                    message: m.into(),
                    details: vec![],
                }),
            })
            .await
            .unwrap();
    }

    /// The next response (within [`WAIT`]), or how the stream ended.
    pub async fn recv(&mut self) -> Result<DiscoveryResponse, tonic::Status> {
        match tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("a response in time")
        {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(tonic::Status::cancelled("stream closed")),
            Err(s) => Err(s),
        }
    }

    /// Envoy's ACK of `r`.
    pub async fn ack(&self, names: &[&str], r: &DiscoveryResponse) {
        self.send(names, &r.version_info, &r.nonce, None).await;
    }
}

/// What an agent's SDS socket serves now.
pub struct Served {
    /// As a `cert_chain` is laid out for the independent verifiers: one
    /// certificate per element (leaf first), the `ROOTCA` roots last.
    pub chain: Vec<String>,
    /// The leaf's serial, hex without separators (the agent's version).
    pub serial: String,
}

/// FetchSecrets of `default` and `ROOTCA` on `socket`, answered within
/// `wait`; the served key must be the leaf's.
pub async fn served(socket: &std::path::Path, wait: Duration) -> Result<Served, String> {
    use prost::Message;
    use workload_ca::proto::envoy::config::core::v3::data_source::Specifier;
    use workload_ca::proto::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
    use x509_parser::prelude::FromDer;
    let path = socket.to_owned();
    let endpoint = tonic::transport::Endpoint::try_from("http://[::]:50051").unwrap();
    let connect = endpoint.connect_with_connector(tower::service_fn(move |_| {
        let path = path.clone();
        async move {
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(path).await?,
            ))
        }
    }));
    let channel = tokio::time::timeout(wait, connect)
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let mut client = SecretDiscoveryServiceClient::new(channel);
    let call = client.fetch_secrets(DiscoveryRequest {
        resource_names: vec!["default".into(), "ROOTCA".into()],
        ..Default::default()
    });
    let resp = tokio::time::timeout(wait, call)
        .await
        .map_err(|_| format!("no answer within {wait:?}"))?
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let inline = |d: &Option<workload_ca::proto::envoy::config::core::v3::DataSource>| match d
        .as_ref()
        .and_then(|d| d.specifier.as_ref())
    {
        Some(Specifier::InlineBytes(b)) => String::from_utf8(b.clone()).unwrap(),
        other => panic!("not inline bytes: {other:?}"),
    };
    let (mut chain, mut roots, mut key) = (None, None, None);
    for any in &resp.resources {
        let s = Secret::decode(any.value.as_slice()).unwrap();
        match (s.name.as_str(), s.r#type) {
            ("default", Some(secret::Type::TlsCertificate(t))) => {
                chain = Some(inline(&t.certificate_chain));
                key = Some(inline(&t.private_key));
            }
            ("ROOTCA", Some(secret::Type::ValidationContext(v))) => {
                roots = Some(inline(&v.trusted_ca));
            }
            (name, other) => panic!("unexpected secret {name}: {other:?}"),
        }
    }
    let (chain, roots, key) = (
        chain.ok_or("no default")?,
        roots.ok_or("no ROOTCA")?,
        key.ok_or("no key")?,
    );
    let mut out: Vec<String> = super::ders(&chain)
        .iter()
        .map(|d| workload_ca::ca::bundle::to_pem("CERTIFICATE", d))
        .collect();
    let leaf = super::ders(&chain).remove(0);
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&leaf).unwrap();
    let key = PrivateKey::from_pem(&key).unwrap();
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw(),
        "the served key is the leaf's"
    );
    out.push(roots);
    Ok(Served {
        chain: out,
        serial: cert.raw_serial_as_string().replace(':', ""),
    })
}
