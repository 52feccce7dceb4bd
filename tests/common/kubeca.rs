//! `ca server --kube` against the fake API server: a cluster with the CA's
//! namespace and service account, a kubeconfig carrying that account's
//! token, and helpers to mint workload tokens and ask for certificates.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use workload_ca::ca::KeyAlgorithm;
use workload_ca::proto::istio::IstioCertificateRequest;

use super::fakekube::{FakeKube, TokenSpec};
use super::procs::CaProc;
use super::{key_and_csr, leaf_facts};

/// The CA's namespace.
pub const CA_NS: &str = "istio-system";

pub struct KubeCluster {
    pub fake: FakeKube,
    pub dir: TempDir,
    pub kubeconfig: PathBuf,
}

impl KubeCluster {
    /// A fake cluster with `istio-system/workload-ca` (the CA's own
    /// account, in the kubeconfig) and nodes `node-a`, `node-b`.
    pub async fn start() -> Self {
        let fake = FakeKube::start().await;
        fake.create_namespace(CA_NS);
        fake.create_service_account(CA_NS, "workload-ca");
        fake.create_node("node-a");
        fake.create_node("node-b");
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        // The CA's own credential: a static token for its service account
        // (in a cluster the kubelet keeps its projected token fresh; a
        // minted one would die with the signing key in key-rotation tests).
        let token = "workload-ca-test-credential";
        fake.add_user_token(
            token,
            "system:serviceaccount:istio-system:workload-ca",
            &[
                "system:serviceaccounts",
                "system:serviceaccounts:istio-system",
            ],
        );
        fake.write_kubeconfig(&kubeconfig, token);
        Self {
            fake,
            dir,
            kubeconfig,
        }
    }

    /// `ca server --kube` on its own state directory `name`.
    pub fn start_ca(&self, name: &str, args: &[&str]) -> CaProc {
        self.start_ca_in(name, CA_NS, args)
    }

    /// The same, in namespace `ns` (its Lease and replica reports).
    pub fn start_ca_in(&self, name: &str, ns: &str, args: &[&str]) -> CaProc {
        let kc = self.kubeconfig.to_str().unwrap().to_owned();
        let mut all = vec![
            "--kube",
            "--kubeconfig",
            kc.as_str(),
            "--kube-namespace",
            ns,
        ];
        all.extend_from_slice(args);
        CaProc::start_plain(&self.dir.path().join(name), &all, &[])
    }

    /// A namespace, service account and pod on `node`; the pod's UID.
    pub fn workload(&self, ns: &str, sa: &str, pod: &str, node: &str) -> String {
        if self.fake.get_json("namespaces", "", ns).is_none() {
            self.fake.create_namespace(ns);
        }
        if self.fake.get_json("serviceaccounts", ns, sa).is_none() {
            self.fake.create_service_account(ns, sa);
        }
        self.fake.create_pod(ns, pod, sa, Some(node))
    }

    /// A bound token for `ns/sa` and its pod, audience `istio-ca`.
    pub fn pod_token(&self, ns: &str, sa: &str, pod: &str) -> String {
        self.fake
            .mint_token(TokenSpec::new(ns, sa).pod(pod).audiences(&["istio-ca"]))
    }
}

/// CreateCertificate with `token`, asking for `impersonate` when given.
pub async fn issue(
    ca: &CaProc,
    token: &str,
    impersonate: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let (_k, csr) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
    let metadata = impersonate.map(|id| prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(id.into())),
            },
        )]
        .into(),
    });
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 0,
        metadata,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    ca.client()
        .await
        .create_certificate(req)
        .await
        .map(|r| r.into_inner().cert_chain)
}

/// The URI SANs of a chain's leaf.
pub fn leaf_ids(chain: &[String]) -> Vec<String> {
    leaf_facts(&chain[0]).uris
}

/// Polls until `ca`'s `/readyz` answers 200 (at most `limit`).
pub async fn wait_ready(ca: &CaProc, limit: Duration) {
    let start = Instant::now();
    loop {
        let (code, body) = super::http_get(ca.ops, "/readyz").await;
        if code == 200 {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "not ready after {limit:?}: {body}\n{}",
            ca.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Retries `f` every 50 ms until it returns `Some`, at most `limit`; the
/// value and how long it took.
pub async fn within<T, F, Fut>(limit: Duration, mut f: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return (v, start.elapsed());
        }
        assert!(start.elapsed() < limit, "nothing within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
