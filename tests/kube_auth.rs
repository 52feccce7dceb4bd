//! Kubernetes authentication against the fake API server, through real
//! `ca server --kube` processes: bound tokens checked locally with no API
//! call per CSR, their pods and service accounts confirmed from the watch
//! caches, node-agent impersonation, and TokenReview under a burst.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::time::Duration;

use common::fakekube::TokenSpec;
use common::kubeca::{CA_NS, KubeCluster, issue, leaf_ids, wait_ready, within};
use common::{openssl_verify, webpki_verify};
use tonic::Code;

const READY: Duration = Duration::from_secs(30);

/// API requests other than watches (which stream, and are renewed on
/// their own clock) made since the counters were reset.
fn calls(k: &KubeCluster) -> Vec<String> {
    k.fake
        .requests()
        .into_iter()
        .filter(|r| r.verb != "watch")
        .map(|r| format!("{} {} {}/{}", r.verb, r.resource, r.namespace, r.name))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_tokens_are_checked_locally_and_refused_once_their_bindings_go() {
    let k = KubeCluster::start().await;
    let web_pod = k.workload("prod", "web", "web-1", "node-a");
    let ca = k.start_ca("ca", &[]);
    wait_ready(&ca, READY).await;
    let token = k.pod_token("prod", "web", "web-1");

    // A valid bound token: certificates, and not one API call for them.
    let chain = issue(&ca, &token, None)
        .await
        .expect("a bound token is accepted");
    webpki_verify(&chain);
    openssl_verify(&chain);
    assert_eq!(leaf_ids(&chain), ["spiffe://cluster.local/ns/prod/sa/web"]);
    k.fake.reset_counters();
    for _ in 0..20 {
        issue(&ca, &token, None).await.unwrap();
    }
    assert_eq!(calls(&k), Vec::<String>::new(), "API calls on the hot path");

    // Tokens the cluster did not sign, or not for us, or expired.
    let mut foreign = k.fake.token_claims(
        &TokenSpec::new("prod", "web")
            .pod("web-1")
            .audiences(&["istio-ca"]),
    );
    let untrusted = k.fake.sign_claims_untrusted(&foreign);
    foreign["iss"] = "https://other.example".into();
    let other_issuer = k.fake.sign_claims(&foreign);
    let other_audience = k.fake.mint_token(
        TokenSpec::new("prod", "web")
            .pod("web-1")
            .audiences(&["vault"]),
    );
    let expired = k.fake.mint_token(
        TokenSpec::new("prod", "web")
            .pod("web-1")
            .audiences(&["istio-ca"])
            .issued_at(std::time::SystemTime::now() - Duration::from_secs(7200))
            .lifetime(Duration::from_secs(3600)),
    );
    // Each refusal is counted under the check that failed.
    for (what, t, reason) in [
        ("signed by an unknown key", &untrusted, "token_unknown_key"),
        ("another issuer", &other_issuer, "token_issuer"),
        ("another audience", &other_audience, "token_audience"),
        ("expired", &expired, "token_expired"),
    ] {
        let metric = format!("workload_ca_auth_refusals_total{{reason=\"{reason}\"}}");
        let before = ca.metric(&metric).await;
        let e = issue(&ca, t, None).await.expect_err(what);
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        assert_eq!(ca.metric(&metric).await, before + 1.0, "{what}: {metric}");
    }

    // The pod deleted: refused within seconds.
    assert!(k.fake.delete("pods", "prod", "web-1"));
    let (code, took) = within(Duration::from_secs(10), || async {
        match issue(&ca, &token, None).await {
            Err(e) => Some(e.code()),
            Ok(_) => None,
        }
    })
    .await;
    assert_eq!(code, Code::Unauthenticated);
    println!("a deleted pod's token was refused {took:?} after the deletion");

    // Recreated under the same name: the old token names the old UID.
    let new_uid = k.fake.create_pod("prod", "web-1", "web", Some("node-a"));
    assert_ne!(new_uid, web_pod);
    let fresh = k.pod_token("prod", "web", "web-1");
    within(Duration::from_secs(10), || async {
        issue(&ca, &fresh, None).await.ok()
    })
    .await;
    let e = issue(&ca, &token, None).await.expect_err("old pod UID");
    assert_eq!(e.code(), Code::Unauthenticated);

    // The service account deleted (its pods with it, by the fake's GC? no:
    // pods are not owned by their account; the account alone goes).
    assert!(k.fake.delete("serviceaccounts", "prod", "web"));
    within(Duration::from_secs(10), || async {
        issue(&ca, &fresh, None).await.err().map(|e| e.code())
    })
    .await;

    for reason in ["pod_gone", "pod_recreated", "service_account_gone"] {
        let n = ca
            .metric(&format!(
                "workload_ca_auth_refusals_total{{reason=\"{reason}\"}}"
            ))
            .await;
        assert!(n >= 1.0, "refusals counted by reason {reason}: {n}");
    }
    let log = ca.log_text();
    assert!(!log.contains(&token), "a token reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_agents_get_only_the_identities_of_pods_on_their_node() {
    let k = KubeCluster::start().await;
    k.workload(CA_NS, "ztunnel", "ztunnel-a", "node-a");
    k.workload("prod", "web", "web-1", "node-a");
    k.workload("prod", "db", "db-1", "node-b");
    let ca = k.start_ca("ca", &["--trusted-node-accounts", "istio-system/ztunnel"]);
    wait_ready(&ca, READY).await;
    let ztunnel = k.pod_token(CA_NS, "ztunnel", "ztunnel-a");
    let web = "spiffe://cluster.local/ns/prod/sa/web";
    let db = "spiffe://cluster.local/ns/prod/sa/db";

    let chain = issue(&ca, &ztunnel, Some(web))
        .await
        .expect("a pod on its node");
    assert_eq!(leaf_ids(&chain), [web]);
    webpki_verify(&chain);

    let e = issue(&ca, &ztunnel, Some(db))
        .await
        .expect_err("a pod on another node");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("node-a"), "{}", e.message());

    let web_token = k.pod_token("prod", "web", "web-1");
    let e = issue(&ca, &web_token, Some(db))
        .await
        .expect_err("untrusted account");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("not a trusted node account"),
        "{}",
        e.message()
    );

    // A node-bound token of the node agent (KEP-4193): its node from the claim.
    let node_b = k.fake.mint_token(
        TokenSpec::new(CA_NS, "ztunnel")
            .node("node-b")
            .audiences(&["istio-ca"]),
    );
    let chain = issue(&ca, &node_b, Some(db)).await.expect("node claim");
    assert_eq!(leaf_ids(&chain), [db]);

    // The pod gone: nothing of that identity on the node any more.
    assert!(k.fake.delete("pods", "prod", "web-1"));
    let (code, _) = within(Duration::from_secs(10), || async {
        issue(&ca, &ztunnel, Some(web))
            .await
            .err()
            .map(|e| e.code())
    })
    .await;
    assert_eq!(code, Code::PermissionDenied);
    for reason in ["not_on_node", "not_trusted_node"] {
        let n = ca
            .metric(&format!(
                "workload_ca_identity_refusals_total{{reason=\"{reason}\"}}"
            ))
            .await;
        assert!(n >= 1.0, "{reason}: {n}");
    }
    assert!(ca.metric("workload_ca_impersonations_total").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_review_burst_is_served_within_the_concurrency_cap() {
    const TOKENS: usize = 1000;
    const CAP: usize = 4;
    let k = KubeCluster::start().await;
    k.workload("prod", "web", "web-1", "node-a");
    // Every caller here shares one source address; the per-source call
    // cap is for abuse, not for this burst (in a cluster each pod is its
    // own source).
    let ca = k.start_ca(
        "ca",
        &[
            "--token-review",
            "--token-review-max-in-flight",
            &CAP.to_string(),
            "--max-calls-per-source",
            "2048",
        ],
    );
    wait_ready(&ca, READY).await;
    k.fake.set_token_review_latency(Duration::from_millis(10));
    k.fake.reset_max_reviews_in_flight();
    // Distinct tokens (each its own jti), all fired at once on a few
    // connections.
    let tokens: Vec<String> = (0..TOKENS)
        .map(|_| k.pod_token("prod", "web", "web-1"))
        .collect();
    let clients: Vec<_> = futures_clients(&ca, 8).await;
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, token) in tokens.into_iter().enumerate() {
        let mut client = clients[i % clients.len()].clone();
        tasks.spawn(async move {
            let (_k, csr) = common::key_and_csr(workload_ca::ca::KeyAlgorithm::EcdsaP256, None);
            common::request(&mut client, &csr, Some(&token), 0).await
        });
    }
    let mut failures = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r.unwrap() {
            failures.push(format!("{:?}: {}", e.code(), e.message()));
        }
    }
    let took = started.elapsed();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let peak = k.fake.max_reviews_in_flight();
    assert!(peak <= CAP, "{peak} reviews in flight, cap {CAP}");
    assert!(peak >= 2, "the burst did run reviews concurrently ({peak})");
    assert_eq!(
        k.fake.count("create", "tokenreviews"),
        TOKENS,
        "one review per distinct token"
    );
    println!(
        "{TOKENS} distinct tokens by TokenReview in {took:?}, at most {peak} reviews in flight"
    );
    // The same tokens again: from the cache.
    k.fake.reset_counters();
    let token = k.pod_token("prod", "web", "web-1");
    issue(&ca, &token, None).await.unwrap();
    issue(&ca, &token, None).await.unwrap();
    assert_eq!(k.fake.count("create", "tokenreviews"), 1);
    // A deleted pod's cached review is still refused (the binding check).
    assert!(k.fake.delete("pods", "prod", "web-1"));
    within(Duration::from_secs(10), || async {
        issue(&ca, &token, None).await.err().map(|e| e.code())
    })
    .await;
}

async fn futures_clients(
    ca: &common::procs::CaProc,
    n: usize,
) -> Vec<
    workload_ca::proto::istio::istio_certificate_service_client::IstioCertificateServiceClient<
        tonic::transport::Channel,
    >,
> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(ca.client().await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_issuer_key_is_fetched_when_a_token_names_it() {
    let k = KubeCluster::start().await;
    k.workload("prod", "web", "web-1", "node-a");
    let ca = k.start_ca("ca", &[]);
    wait_ready(&ca, READY).await;
    let old = k.pod_token("prod", "web", "web-1");
    issue(&ca, &old, None).await.expect("the first key");
    // The cluster rotates its service-account signing key: new tokens name
    // a key id the CA has not seen; it fetches the JWKS again at once
    // (the refresh period is minutes).
    k.fake.rotate_signing_key();
    k.fake.reset_counters();
    let new = k.pod_token("prod", "web", "web-1");
    let (_, took) = within(Duration::from_secs(15), || async {
        issue(&ca, &new, None).await.ok()
    })
    .await;
    println!("a token of a rotated issuer key was accepted {took:?} after the rotation");
    let fetches = k
        .fake
        .requests()
        .iter()
        .filter(|r| r.path == "/openid/v1/jwks")
        .count();
    assert!((1..=2).contains(&fetches), "{fetches} JWKS fetches");
    issue(&ca, &old, None)
        .await
        .expect("the old key still verifies");
    // Once the old key is gone from the JWKS (and the CA refetched it),
    // its tokens are refused.
    k.fake.drop_old_keys();
    let forged_kid = {
        let mut c = k.fake.token_claims(
            &TokenSpec::new("prod", "web")
                .pod("web-1")
                .audiences(&["istio-ca"]),
        );
        c["jti"] = "x".into();
        k.fake.sign_claims_untrusted(&c)
    };
    // An unknown key id pokes a refetch (at most one per 10 s).
    let _ = issue(&ca, &forged_kid, None).await;
    let start = std::time::Instant::now();
    while issue(&ca, &old, None).await.is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(25),
            "the old key's token is still accepted; JWKS fetches: {:?}\n{}",
            k.fake
                .requests()
                .iter()
                .filter(|r| r.path == "/openid/v1/jwks")
                .count(),
            ca.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_renews_only_while_its_account_has_a_running_pod() {
    let k = KubeCluster::start().await;
    k.workload("prod", "web", "web-1", "node-a");
    let ca = k.start_ca("ca", &[]);
    wait_ready(&ca, READY).await;
    let token = k.pod_token("prod", "web", "web-1");
    let (key, csr) = common::key_and_csr(workload_ca::ca::KeyAlgorithm::EcdsaP256, None);
    let chain = common::request(&mut ca.client().await, &csr, Some(&token), 3600)
        .await
        .unwrap();
    let renew = |chain: Vec<String>, key: String| {
        let ca = &ca;
        async move {
            let pem = chain[..chain.len() - 1].join("");
            let channel = common::tls_channel(ca.grpc, &ca.root_pem(), Some((&pem, &key)))
                .await
                .unwrap();
            let mut client = workload_ca::proto::istio::istio_certificate_service_client::IstioCertificateServiceClient::new(channel);
            let (_k, csr) = common::key_and_csr(workload_ca::ca::KeyAlgorithm::EcdsaP256, None);
            common::request(&mut client, &csr, None, 0).await
        }
    };
    let renewed = renew(chain.clone(), key.clone())
        .await
        .expect("renewal while the pod runs");
    assert_eq!(
        leaf_ids(&renewed),
        ["spiffe://cluster.local/ns/prod/sa/web"]
    );
    // The pod gone (the account stays): the certificate no longer renews,
    // and a bearer token refused for its binding is not rescued by it.
    assert!(k.fake.delete("pods", "prod", "web-1"));
    let (code, _) = within(Duration::from_secs(10), || {
        let (chain, key) = (chain.clone(), key.clone());
        async move { renew(chain, key).await.err().map(|e| e.code()) }
    })
    .await;
    assert_eq!(code, Code::Unauthenticated);
    let n = ca
        .metric("workload_ca_auth_refusals_total{reason=\"no_running_pod\"}")
        .await;
    assert!(n >= 1.0, "{n}");
}

/// Taking over an Istio install's CA: its Secret stays in istio-system
/// while the CA, its Lease and its replica reports live in a namespace of
/// their own, which nothing else writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_secret_may_live_in_another_namespace_than_the_ca() {
    let k = KubeCluster::start().await;
    k.fake.create_namespace("workload-ca");
    k.workload("prod", "web", "web-1", "node-a");
    let ca = k.start_ca_in("ca", "workload-ca", &["--ca-secret-namespace", CA_NS]);
    wait_ready(&ca, READY).await;
    let chain = issue(&ca, &k.pod_token("prod", "web", "web-1"), None)
        .await
        .expect("a bound token is accepted");
    webpki_verify(&chain);
    let secret = k
        .fake
        .get_json("secrets", CA_NS, "istio-ca-secret")
        .expect("the CA Secret is in istio-system");
    let root = String::from_utf8(
        base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            secret["data"]["root-cert.pem"].as_str().unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        chain.last().unwrap().trim(),
        root.trim(),
        "signed with that Secret's CA"
    );
    assert!(
        k.fake
            .get_json("secrets", "workload-ca", "istio-ca-secret")
            .is_none()
    );
    within(Duration::from_secs(10), || async {
        k.fake
            .get_json("leases", "workload-ca", "workload-ca-leader")
    })
    .await;
    assert!(
        k.fake
            .get_json("leases", CA_NS, "workload-ca-leader")
            .is_none()
    );
    let reports = k.fake.list_json("configmaps", "workload-ca");
    assert!(
        reports.iter().any(|c| c["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("workload-ca-evidence-")),
        "the replica report is in the CA's namespace"
    );
}
