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
