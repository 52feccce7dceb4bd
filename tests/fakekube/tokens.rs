//! Service-account tokens: claims, JWKS and discovery, TokenReview,
//! TokenRequest, key rotation, tokens as API credentials.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenReview};
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use serde_json::{Value, json};

use super::common::fakekube::{FakeKube, TokenSpec};
use super::status;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A fake with namespace `prod`, SA `web`, node `node-1`, pod `web-0`.
async fn cluster() -> (FakeKube, String, String, String) {
    let fake = FakeKube::start().await;
    fake.create_namespace("prod");
    let sa = fake.create_service_account("prod", "web");
    let node = fake.create_node("node-1");
    let pod = fake.create_pod("prod", "web-0", "web", Some("node-1"));
    (fake, sa, node, pod)
}

async fn get_text(fake: &FakeKube, path: &str) -> String {
    let req = http::Request::get(path).body(Vec::new()).unwrap();
    fake.client().await.request_text(req).await.unwrap()
}

fn verify(token: &str, jwks: &str, aud: &str) -> Value {
    workload_ca::server::jwt_crypto::install();
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(jwks).unwrap();
    let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
    let jwk = set.find(&kid).expect("the token's kid is published");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_audience(&[aud]);
    v.set_issuer(&[ISSUER]);
    v.set_required_spec_claims(&["exp", "iat", "nbf", "iss", "aud", "sub"]);
    jsonwebtoken::decode::<Value>(token, &key, &v)
        .unwrap()
        .claims
}

#[tokio::test]
async fn minted_tokens_carry_every_claim_and_verify_against_the_jwks() {
    let (fake, sa_uid, node_uid, pod_uid) = cluster().await;
    let token = fake.mint_token(
        TokenSpec::new("prod", "web")
            .pod("web-0")
            .audiences(&["istio-ca"]),
    );
    let jwks = get_text(&fake, "/openid/v1/jwks").await;
    let c = verify(&token, &jwks, "istio-ca");
    assert_eq!(c["iss"], ISSUER);
    assert_eq!(c["aud"], json!(["istio-ca"]), "aud is an array");
    assert_eq!(c["sub"], "system:serviceaccount:prod:web");
    let (iat, nbf, exp) = (
        c["iat"].as_i64().unwrap(),
        c["nbf"].as_i64().unwrap(),
        c["exp"].as_i64().unwrap(),
    );
    assert_eq!(iat, nbf);
    assert_eq!(exp - iat, 3600);
    assert_eq!(c["jti"].as_str().unwrap().len(), 36);
    assert_eq!(
        c["kubernetes.io"],
        json!({
            "namespace": "prod",
            "serviceaccount": {"name": "web", "uid": sa_uid},
            "pod": {"name": "web-0", "uid": pod_uid},
            "node": {"name": "node-1", "uid": node_uid},
        })
    );
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
    let jwks: Value = serde_json::from_str(&jwks).unwrap();
    let key = &jwks["keys"][0];
    assert_eq!(
        (
            key["kty"].as_str(),
            key["alg"].as_str(),
            key["use"].as_str()
        ),
        (Some("RSA"), Some("RS256"), Some("sig"))
    );
    let discovery: Value =
        serde_json::from_str(&get_text(&fake, "/.well-known/openid-configuration").await).unwrap();
    assert_eq!(discovery["issuer"], ISSUER);
    assert_eq!(
        discovery["jwks_uri"],
        format!("{}/openid/v1/jwks", fake.url())
    );
    assert_eq!(discovery["response_types_supported"], json!(["id_token"]));
    assert_eq!(discovery["subject_types_supported"], json!(["public"]));
    assert_eq!(
        discovery["id_token_signing_alg_values_supported"],
        json!(["RS256"])
    );
    assert_eq!(fake.count("get", "/openid/v1/jwks"), 1);
}

async fn review(
    fake: &FakeKube,
    token: &str,
    auds: &[&str],
) -> k8s_openapi::api::authentication::v1::TokenReviewStatus {
    let api: Api<TokenReview> = Api::all(fake.client().await);
    let tr: TokenReview =
        serde_json::from_value(json!({"spec": {"token": token, "audiences": auds}})).unwrap();
    api.create(&PostParams::default(), &tr)
        .await
        .unwrap()
        .status
        .unwrap()
}

#[tokio::test]
async fn token_review_accepts_and_refuses_as_the_api_server_does() {
    let (fake, sa_uid, node_uid, pod_uid) = cluster().await;
    let token = fake.mint_token(
        TokenSpec::new("prod", "web")
            .pod("web-0")
            .audiences(&["istio-ca"]),
    );
    let ok = review(&fake, &token, &["istio-ca", "other"]).await;
    assert_eq!(ok.authenticated, Some(true), "{ok:?}");
    assert_eq!(ok.audiences, Some(vec!["istio-ca".to_string()]));
    let user = ok.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:prod:web")
    );
    assert_eq!(user.uid.as_deref(), Some(sa_uid.as_str()));
    assert_eq!(
        user.groups.unwrap(),
        [
            "system:serviceaccounts",
            "system:serviceaccounts:prod",
            "system:authenticated"
        ]
    );
    let extra = user.extra.unwrap();
    assert_eq!(extra["authentication.kubernetes.io/pod-name"], ["web-0"]);
    assert_eq!(
        extra["authentication.kubernetes.io/pod-uid"],
        [pod_uid.as_str()]
    );
    assert_eq!(extra["authentication.kubernetes.io/node-name"], ["node-1"]);
    assert_eq!(extra["authentication.kubernetes.io/node-uid"], [node_uid]);
    assert!(extra["authentication.kubernetes.io/credential-id"][0].starts_with("JTI="));

    let refused = |s: k8s_openapi::api::authentication::v1::TokenReviewStatus| {
        assert_ne!(s.authenticated, Some(true), "{s:?}");
        s.error.unwrap()
    };
    // Another audience.
    let e = refused(review(&fake, &token, &["vault"]).await);
    assert_eq!(
        e,
        "[invalid bearer token, token audiences [\"istio-ca\"] is invalid for the target audiences [\"vault\"]]"
    );
    // No audiences asked: the API server's own (its issuer).
    refused(review(&fake, &token, &[]).await);
    let api_token = fake.mint_token(TokenSpec::new("prod", "web"));
    assert_eq!(
        review(&fake, &api_token, &[]).await.audiences,
        Some(vec![ISSUER.to_string()])
    );
    // Expired (well past the one-minute leeway).
    let old = SystemTime::now() - Duration::from_secs(7200);
    let expired = fake.mint_token(
        TokenSpec::new("prod", "web")
            .audiences(&["istio-ca"])
            .issued_at(old)
            .lifetime(Duration::from_secs(600)),
    );
    assert!(
        refused(review(&fake, &expired, &["istio-ca"]).await)
            .contains("service account token has expired")
    );
    // Signed by a key the issuer does not publish.
    let claims = fake.token_claims(&TokenSpec::new("prod", "web").audiences(&["istio-ca"]));
    let forged = fake.sign_claims_untrusted(&claims);
    assert!(
        refused(review(&fake, &forged, &["istio-ca"]).await)
            .contains("error in cryptographic primitive")
    );
    // The pod deleted: invalidated.
    let pods: Api<Pod> = Api::namespaced(fake.client().await, "prod");
    pods.delete("web-0", &DeleteParams::default())
        .await
        .unwrap();
    let e = refused(review(&fake, &token, &["istio-ca"]).await);
    assert_eq!(
        e,
        "[invalid bearer token, service account token has been invalidated]"
    );
    // Recreated under the same name: another uid, still refused.
    let new_uid = fake.create_pod("prod", "web-0", "web", Some("node-1"));
    let e = refused(review(&fake, &token, &["istio-ca"]).await);
    assert_eq!(
        e,
        format!(
            "[invalid bearer token, pod UID ({new_uid}) does not match service account pod ref claim ({pod_uid})]"
        )
    );
    // The service account deleted.
    let sa_token = fake.mint_token(TokenSpec::new("prod", "web").audiences(&["istio-ca"]));
    fake.delete("serviceaccounts", "prod", "web");
    assert!(
        refused(review(&fake, &sa_token, &["istio-ca"]).await)
            .contains("serviceaccounts \"web\" not found")
    );
    // An empty token is a bad request.
    let api: Api<TokenReview> = Api::all(fake.client().await);
    let tr: TokenReview = serde_json::from_value(json!({"spec": {"token": ""}})).unwrap();
    assert_eq!(
        status(api.create(&PostParams::default(), &tr).await.unwrap_err()).code,
        400
    );
}

#[tokio::test]
async fn the_validator_lag_is_configurable() {
    let (fake, ..) = cluster().await;
    let token = fake.mint_token(TokenSpec::new("prod", "web").audiences(&["a"]));
    fake.set_informer_lag(Duration::from_secs(30));
    fake.delete("serviceaccounts", "prod", "web");
    assert_eq!(
        review(&fake, &token, &["a"]).await.authenticated,
        Some(true),
        "still in the validator's cache"
    );
    fake.set_informer_lag(Duration::ZERO);
    assert_ne!(
        review(&fake, &token, &["a"]).await.authenticated,
        Some(true)
    );
}

#[tokio::test]
async fn token_request_binds_to_the_pod_and_its_node() {
    let (fake, sa_uid, node_uid, pod_uid) = cluster().await;
    let sas: Api<ServiceAccount> = Api::namespaced(fake.client().await, "prod");
    let req = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
        "audiences": ["istio-ca"], "expirationSeconds": 1200,
        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "web-0", "uid": pod_uid}}});
    let tr: TokenRequest = sas
        .create_subresource("token", "web", &PostParams::default(), &req)
        .await
        .unwrap();
    assert_eq!(fake.count("create", "serviceaccounts/token"), 1);
    let st = tr.status.unwrap();
    let jwks = get_text(&fake, "/openid/v1/jwks").await;
    let c = verify(st.token.as_deref().unwrap(), &jwks, "istio-ca");
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        1200
    );
    assert_eq!(c["kubernetes.io"]["pod"]["uid"], pod_uid);
    assert_eq!(c["kubernetes.io"]["node"]["uid"], node_uid);
    assert_eq!(c["kubernetes.io"]["serviceaccount"]["uid"], sa_uid);
    assert_eq!(
        review(&fake, st.token.as_deref().unwrap(), &["istio-ca"])
            .await
            .authenticated,
        Some(true)
    );

    let bad = |body: Value| {
        let sas = sas.clone();
        async move {
            status(
                sas.create_subresource::<_, TokenRequest>(
                    "token",
                    "web",
                    &PostParams::default(),
                    &body,
                )
                .await
                .unwrap_err(),
            )
        }
    };
    let e = bad(json!({"spec": {"expirationSeconds": 599}})).await;
    assert_eq!(e.code, 422);
    assert!(e.message.ends_with("spec.expirationSeconds: Invalid value: 599: may not specify a duration less than 10 minutes"), "{}", e.message);
    fake.create_service_account("prod", "other");
    fake.create_pod("prod", "other-0", "other", Some("node-1"));
    let e = bad(
        json!({"spec": {"boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "other-0"}}}),
    )
    .await;
    assert_eq!(e.code, 400);
    assert_eq!(
        e.message,
        "cannot bind token for serviceaccount \"web\" to pod running with different serviceaccount name."
    );
    let e = bad(json!({"spec": {"boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "web-0", "uid": "0000"}}})).await;
    assert_eq!(e.code, 409);
    // The kubelet's 3607 s tokens for the API server are extended to a year, with warnafter.
    let st = sas
        .create_subresource::<_, TokenRequest>("token", "web", &PostParams::default(), &json!({"spec": {
            "expirationSeconds": 3607, "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "web-0"}}}))
        .await
        .unwrap()
        .status
        .unwrap();
    let c = verify(st.token.as_deref().unwrap(), &jwks, ISSUER);
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        365 * 86400
    );
    assert_eq!(
        c["kubernetes.io"]["warnafter"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        3607
    );
}

#[tokio::test]
async fn rotated_keys_verify_until_dropped() {
    let (fake, ..) = cluster().await;
    let old_kid = fake.signing_kid();
    let old = fake.mint_token(TokenSpec::new("prod", "web").audiences(&["a"]));
    let new_kid = fake.rotate_signing_key();
    assert_ne!(old_kid, new_kid);
    let new = fake.mint_token(TokenSpec::new("prod", "web").audiences(&["a"]));
    assert_eq!(
        jsonwebtoken::decode_header(&new).unwrap().kid.as_deref(),
        Some(new_kid.as_str())
    );
    let kids: Vec<String> = fake.jwks()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kids, [old_kid.clone(), new_kid.clone()]);
    assert_eq!(review(&fake, &old, &["a"]).await.authenticated, Some(true));
    fake.drop_old_keys();
    assert_ne!(review(&fake, &old, &["a"]).await.authenticated, Some(true));
    assert_eq!(review(&fake, &new, &["a"]).await.authenticated, Some(true));
}

#[tokio::test]
async fn service_account_tokens_are_api_credentials() {
    let (fake, ..) = cluster().await;
    let token = fake.mint_token(TokenSpec::new("prod", "web").pod("web-0"));
    let as_sa: Api<Secret> = Api::namespaced(fake.client_with_token(&token).await, "prod");
    as_sa.list(&ListParams::default()).await.unwrap();
    let last = fake.requests().pop().unwrap();
    assert_eq!(last.user, "system:serviceaccount:prod:web");
    assert!(
        last.groups
            .contains(&"system:serviceaccounts:prod".to_string())
    );
    assert_eq!(
        (
            last.verb.as_str(),
            last.resource.as_str(),
            last.namespace.as_str()
        ),
        ("list", "secrets", "prod")
    );
    // A token for another audience is not an API credential: 401 Status.
    let other = fake.mint_token(TokenSpec::new("prod", "web").audiences(&["istio-ca"]));
    let denied: Api<Secret> = Api::namespaced(fake.client_with_token(&other).await, "prod");
    let e = status(denied.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(
        (e.code, e.reason.as_str(), e.message.as_str()),
        (401, "Unauthorized", "Unauthorized")
    );
    assert_eq!(fake.requests().pop().unwrap().user, "");
}

#[tokio::test]
async fn token_review_latency_and_concurrency_are_measured() {
    let (fake, ..) = cluster().await;
    fake.set_token_review_latency(Duration::from_millis(500));
    let token = fake.mint_token(TokenSpec::new("prod", "web").audiences(&["a"]));
    let client = fake.client().await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let api: Api<TokenReview> = Api::all(client.clone());
        let tr: TokenReview =
            serde_json::from_value(json!({"spec": {"token": token, "audiences": ["a"]}})).unwrap();
        tasks.push(tokio::spawn(async move {
            api.create(&PostParams::default(), &tr).await.unwrap()
        }));
    }
    for t in tasks {
        let out = super::within(20, t).await.unwrap();
        assert_eq!(out.status.unwrap().authenticated, Some(true));
    }
    assert_eq!(
        fake.max_reviews_in_flight(),
        6,
        "nothing in the client caps them"
    );
    assert_eq!(fake.reviews_in_flight(), 0);
    assert_eq!(fake.count("create", "tokenreviews"), 6);
}
