//! certificates.k8s.io in the fake, through the real kube client:
//! PodCertificateRequests and ClusterTrustBundles served as v1 and v1beta1
//! from one storage, discovery per served version, create and status
//! validation (pkg/apis/certificates/validation), field selectors.

use std::time::{Duration, SystemTime};

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use serde_json::{Value, json};

use super::common::fakekube::certificates::CertVersions;
use super::common::fakekube::kubelet::{self, KeyType, KubeletKey, PodRef, RequestOptions};
use super::common::fakekube::{FakeKube, FakeOptions};
use super::status;

const SIGNER: &str = "example.com/spiffe";

fn ar(version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("certificates.k8s.io", version, kind),
        plural,
    )
}

fn pcrs(client: &kube::Client, version: &str, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        ns,
        &ar(version, "PodCertificateRequest", "podcertificaterequests"),
    )
}

fn ctbs(client: &kube::Client, version: &str) -> Api<DynamicObject> {
    Api::all_with(
        client.clone(),
        &ar(version, "ClusterTrustBundle", "clustertrustbundles"),
    )
}

fn obj(v: Value) -> DynamicObject {
    serde_json::from_value(v).unwrap()
}

fn j(o: &DynamicObject) -> Value {
    serde_json::to_value(o).unwrap()
}

async fn start(versions: CertVersions) -> FakeKube {
    FakeKube::start_with(FakeOptions {
        certificates: versions,
        ..FakeOptions::default()
    })
    .await
}

async fn create(
    client: &kube::Client,
    version: &str,
    key: &KubeletKey,
    pod: &PodRef,
    opts: &RequestOptions,
) -> Result<DynamicObject, kube::Error> {
    let body = kubelet::request(version, SIGNER, pod, key, opts);
    pcrs(client, version, &pod.namespace)
        .create(&PostParams::default(), &obj(body))
        .await
}

/// A CA and a leaf for `spki` valid [nb, na].
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

fn ca() -> Ca {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, "ca");
    let cert = p.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: rcgen::Issuer::new(p, key),
    }
}

fn leaf(ca: &Ca, spki: &[u8], nb: SystemTime, na: SystemTime) -> String {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.not_before = nb.into();
    p.not_after = na.into();
    let pk = rcgen::SubjectPublicKeyInfo::from_der(spki).unwrap();
    p.signed_by(&pk, &ca.issuer).unwrap().pem()
}

fn rfc3339(t: SystemTime) -> String {
    let s = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    time::OffsetDateTime::from_unix_timestamp(s)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn cond(ty: &str, reason: &str) -> Value {
    json!({"type": ty, "status": "True", "reason": reason, "message": "m",
           "lastTransitionTime": rfc3339(SystemTime::now())})
}

/// An Issued status for `key`, lifetime `life`, refresh at half.
fn issued(ca: &Ca, key: &KubeletKey, life: Duration) -> Value {
    let now = SystemTime::now();
    let nb = now - Duration::from_secs(60);
    let na = nb + life;
    json!({
        "conditions": [cond("Issued", "Issued")],
        "certificateChain": leaf(ca, &key.spki_der, nb, na),
        "notBefore": rfc3339(nb), "notAfter": rfc3339(na),
        "beginRefreshAt": rfc3339(nb + life / 2),
    })
}

async fn write_status(
    api: &Api<DynamicObject>,
    current: &DynamicObject,
    status: Value,
) -> Result<DynamicObject, kube::Error> {
    let mut v = j(current);
    v["status"] = status;
    api.replace_status(
        current.metadata.name.as_deref().unwrap(),
        &PostParams::default(),
        &obj(v),
    )
    .await
}

#[tokio::test]
async fn discovery_shows_the_served_versions() {
    for (versions, want) in [
        (CertVersions::BOTH, vec!["v1", "v1beta1"]),
        (CertVersions::V1_ONLY, vec!["v1"]),
        (CertVersions::V1BETA1_ONLY, vec!["v1beta1"]),
    ] {
        let fake = start(versions).await;
        let client = fake.client().await;
        let groups = client.list_api_groups().await.unwrap();
        let g = groups
            .groups
            .iter()
            .find(|g| g.name == "certificates.k8s.io")
            .expect("the group is listed");
        let got: Vec<&str> = g.versions.iter().map(|v| v.version.as_str()).collect();
        assert_eq!(got, want);
        assert_eq!(g.preferred_version.as_ref().unwrap().version, want[0]);
        for v in ["v1", "v1beta1"] {
            let r = client
                .list_api_group_resources(&format!("certificates.k8s.io/{v}"))
                .await;
            if want.contains(&v) {
                let names: Vec<String> = r.unwrap().resources.into_iter().map(|r| r.name).collect();
                assert!(names.contains(&"podcertificaterequests/status".to_string()));
                assert!(names.contains(&"clustertrustbundles".to_string()));
            } else {
                assert!(r.is_err(), "{v} is not served");
                let e = pcrs(&client, v, "default")
                    .list(&ListParams::default())
                    .await
                    .unwrap_err();
                assert_eq!(status(e).code, 404);
            }
        }
    }
}

#[tokio::test]
async fn one_storage_two_views() {
    let fake = start(CertVersions::BOTH).await;
    let client = fake.client().await;
    let key = KubeletKey::generate(KeyType::EcdsaP256);
    let pod = PodRef::new("default", "web-0", "default");
    let legacy = RequestOptions {
        legacy: true,
        ..Default::default()
    };
    let created = create(&client, "v1beta1", &key, &pod, &legacy)
        .await
        .unwrap();
    let name = created.metadata.name.clone().unwrap();
    assert!(name.starts_with("web-0-"), "generateName: {name}");
    let v = j(&created);
    assert_eq!(v["spec"]["maxExpirationSeconds"], json!(86400), "defaulted");
    assert!(v["spec"]["pkixPublicKey"].is_string());
    // The same object through v1: no legacy fields.
    let seen = j(&pcrs(&client, "v1", "default").get(&name).await.unwrap());
    assert_eq!(seen["apiVersion"], json!("certificates.k8s.io/v1"));
    assert!(seen["spec"].get("pkixPublicKey").is_none());
    assert!(seen["spec"].get("proofOfPossession").is_none());
    assert_eq!(seen["metadata"]["uid"], v["metadata"]["uid"]);
    // A v1 request (stub CSR) seen through v1beta1.
    let stub = create(&client, "v1", &key, &pod, &RequestOptions::default())
        .await
        .unwrap();
    let beta = pcrs(&client, "v1beta1", "default")
        .get(stub.metadata.name.as_deref().unwrap())
        .await
        .unwrap();
    assert_eq!(j(&beta)["apiVersion"], json!("certificates.k8s.io/v1beta1"));
    assert!(j(&beta)["spec"]["stubPKCS10Request"].is_string());
    // A status sent with the create is dropped.
    let mut body = kubelet::request("v1", SIGNER, &pod, &key, &RequestOptions::default());
    body["status"] = json!({"conditions": [cond("Issued", "Issued")]});
    let c = pcrs(&client, "v1", "default")
        .create(&PostParams::default(), &obj(body))
        .await
        .unwrap();
    assert!(
        j(&c)
            .get("status")
            .is_none_or(|s| s.get("conditions").is_none())
    );
}

#[tokio::test]
async fn create_validation_follows_the_api_server() {
    let fake = start(CertVersions::BOTH).await;
    let client = fake.client().await;
    let pod = PodRef::new("default", "web-0", "default");
    let p256 = KubeletKey::generate(KeyType::EcdsaP256);
    let invalid = |e: kube::Error| {
        let s = status(e);
        assert_eq!(
            (s.code, s.reason.as_str()),
            (422, "Invalid"),
            "{}",
            s.message
        );
        s.message
    };
    for (secs, ok) in [
        (3599, false),
        (3600, true),
        (7_862_400, true),
        (7_862_401, false),
    ] {
        let opts = RequestOptions {
            max_expiration_seconds: Some(secs),
            ..Default::default()
        };
        let r = create(&client, "v1", &p256, &pod, &opts).await;
        if ok {
            r.unwrap();
        } else {
            let m = invalid(r.unwrap_err());
            assert!(
                m.contains("spec.maxExpirationSeconds: Invalid value: ")
                    && m.contains("must be in the range [3600, 7862400]"),
                "{m}"
            );
        }
    }
    // A stub request signed by another key.
    let other = KubeletKey::generate(KeyType::EcdsaP256);
    let mut body = kubelet::request("v1", SIGNER, &pod, &p256, &RequestOptions::default());
    let mut forged = other.stub_csr();
    let n = forged.len();
    forged[n - 5] ^= 0x55;
    use base64::Engine as _;
    body["spec"]["stubPKCS10Request"] =
        json!(base64::engine::general_purpose::STANDARD.encode(&forged));
    let m = invalid(
        pcrs(&client, "v1", "default")
            .create(&PostParams::default(), &obj(body))
            .await
            .unwrap_err(),
    );
    assert!(m.contains("spec.stubPKCS10Request"), "{m}");
    // A legacy proof of possession over another pod's UID.
    let mut body = kubelet::request(
        "v1beta1",
        SIGNER,
        &pod,
        &p256,
        &RequestOptions {
            legacy: true,
            ..Default::default()
        },
    );
    body["spec"]["podUID"] = json!("another-uid");
    let m = invalid(
        pcrs(&client, "v1beta1", "default")
            .create(&PostParams::default(), &obj(body))
            .await
            .unwrap_err(),
    );
    assert!(
        m.contains(
            "spec.proofOfPossession: Invalid value: could not verify proof-of-possession signature"
        ),
        "{m}"
    );
    // The legacy pair alone through v1: unknown fields, so no key at all.
    let body = kubelet::request(
        "v1",
        SIGNER,
        &pod,
        &p256,
        &RequestOptions {
            legacy: true,
            ..Default::default()
        },
    );
    let m = invalid(
        pcrs(&client, "v1", "default")
            .create(&PostParams::default(), &obj(body))
            .await
            .unwrap_err(),
    );
    assert!(m.contains("spec.stubPKCS10Request: Required value"), "{m}");
    // Every kubelet key type, both ways, is accepted (P-521 included).
    for kt in KeyType::ALL {
        let key = KubeletKey::generate(kt);
        create(&client, "v1", &key, &pod, &RequestOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{kt:?} stub: {e}"));
        create(
            &client,
            "v1beta1",
            &key,
            &pod,
            &RequestOptions {
                legacy: true,
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{kt:?} legacy: {e}"));
        // The same proof for another pod fails, whoever checks it
        // (ring or the openssl CLI).
        let mut body = kubelet::request(
            "v1beta1",
            SIGNER,
            &pod,
            &key,
            &RequestOptions {
                legacy: true,
                ..Default::default()
            },
        );
        body["spec"]["podUID"] = json!("another-uid");
        let m = invalid(
            pcrs(&client, "v1beta1", "default")
                .create(&PostParams::default(), &obj(body))
                .await
                .unwrap_err(),
        );
        assert!(
            m.contains("could not verify proof-of-possession"),
            "{kt:?}: {m}"
        );
    }
    // A bad signer name.
    let mut body = kubelet::request("v1", "no-slash", &pod, &p256, &RequestOptions::default());
    body["spec"]["signerName"] = json!("no-slash");
    let m = invalid(
        pcrs(&client, "v1", "default")
            .create(&PostParams::default(), &obj(body))
            .await
            .unwrap_err(),
    );
    assert!(
        m.contains("must be a fully qualified domain and path"),
        "{m}"
    );
}

#[tokio::test]
async fn status_rules_and_immutability() {
    let fake = start(CertVersions::BOTH).await;
    let client = fake.client().await;
    let api = pcrs(&client, "v1", "default");
    let pod = PodRef::new("default", "web-0", "default");
    let key = KubeletKey::generate(KeyType::Ed25519);
    let ca = ca();
    let hour = Duration::from_secs(3600);
    let fresh = || async {
        create(&client, "v1", &key, &pod, &RequestOptions::default())
            .await
            .unwrap()
    };
    let invalid = |e: kube::Error| {
        let s = status(e);
        assert_eq!(s.code, 422, "{}", s.message);
        s.message
    };

    // Too short a lifetime.
    let p = fresh().await;
    let m = invalid(
        write_status(&api, &p, issued(&ca, &key, hour - Duration::from_secs(1)))
            .await
            .unwrap_err(),
    );
    assert!(
        m.contains("leaf certificate lifetime must be >= 1 hour"),
        "{m}"
    );
    // Longer than maxExpirationSeconds (86400).
    let m = invalid(
        write_status(&api, &p, issued(&ca, &key, 25 * hour))
            .await
            .unwrap_err(),
    );
    assert!(
        m.contains("must be <= spec.maxExpirationSeconds (86400)"),
        "{m}"
    );
    // Another key.
    let other = KubeletKey::generate(KeyType::Ed25519);
    let m = invalid(
        write_status(&api, &p, issued(&ca, &other, 2 * hour))
            .await
            .unwrap_err(),
    );
    assert!(
        m.contains("leaf certificate was not issued to the requested public key"),
        "{m}"
    );
    // notAfter not the leaf's.
    let mut st = issued(&ca, &key, 2 * hour);
    st["notAfter"] = json!(rfc3339(SystemTime::now() + 3 * hour));
    let m = invalid(write_status(&api, &p, st).await.unwrap_err());
    assert!(
        m.contains("must be set to the NotAfter time encoded in the leaf certificate"),
        "{m}"
    );
    // Two terminal conditions.
    let m = invalid(
        write_status(
            &api,
            &p,
            json!({"conditions": [cond("Denied", "A"), cond("Failed", "B")]}),
        )
        .await
        .unwrap_err(),
    );
    assert!(
        m.contains("There may be at most one condition with type"),
        "{m}"
    );
    // Denied with a chain.
    let mut st = issued(&ca, &key, 2 * hour);
    st["conditions"] = json!([cond("Denied", "UnsupportedKeyType")]);
    let m = invalid(write_status(&api, &p, st).await.unwrap_err());
    assert!(
        m.contains("non-condition status fields must be empty"),
        "{m}"
    );
    // beginRefreshAt too late.
    let mut st = issued(&ca, &key, 2 * hour);
    st["beginRefreshAt"] = st["notAfter"].clone();
    let m = invalid(write_status(&api, &p, st).await.unwrap_err());
    assert!(
        m.contains("must be at least 10 minutes before status.notAfter"),
        "{m}"
    );

    // A good one, then nothing more.
    let done = write_status(&api, &p, issued(&ca, &key, 2 * hour))
        .await
        .unwrap();
    assert_eq!(j(&done)["status"]["conditions"][0]["type"], json!("Issued"));
    let m = invalid(
        write_status(&api, &done, issued(&ca, &key, 2 * hour))
            .await
            .unwrap_err(),
    );
    assert!(
        m.ends_with("status: Invalid value: immutable after PodCertificateRequest is issued, denied, or failed"),
        "{m}"
    );
    let m = invalid(
        write_status(&api, &done, json!({"conditions": [cond("Failed", "X")]}))
            .await
            .unwrap_err(),
    );
    assert!(
        m.contains("immutable after PodCertificateRequest is issued"),
        "{m}"
    );

    // A write from a stale read loses (optimistic concurrency).
    let q = fresh().await;
    write_status(
        &api,
        &q,
        json!({"conditions": [cond("Denied", "UnsupportedKeyType")]}),
    )
    .await
    .unwrap();
    let e = status(
        write_status(&api, &q, issued(&ca, &key, 2 * hour))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));

    // The spec is immutable; the main resource cannot write status.
    let r = fresh().await;
    let mut v = j(&r);
    v["spec"]["maxExpirationSeconds"] = json!(7200);
    let m = invalid(
        api.replace(
            r.metadata.name.as_deref().unwrap(),
            &PostParams::default(),
            &obj(v),
        )
        .await
        .unwrap_err(),
    );
    assert!(
        m.contains("spec: Invalid value: ") && m.contains("field is immutable"),
        "{m}"
    );
    let mut v = j(&r);
    v["status"] = json!({"conditions": [cond("Denied", "X")]});
    let kept = api
        .replace(
            r.metadata.name.as_deref().unwrap(),
            &PostParams::default(),
            &obj(v),
        )
        .await
        .unwrap();
    assert!(
        j(&kept)
            .get("status")
            .is_none_or(|s| s.get("conditions").is_none())
    );
}

#[tokio::test]
async fn field_selectors_of_the_real_server() {
    let fake = start(CertVersions::BOTH).await;
    let client = fake.client().await;
    let key = KubeletKey::generate(KeyType::EcdsaP256);
    let pod = PodRef::new("default", "web-0", "default");
    create(&client, "v1", &key, &pod, &RequestOptions::default())
        .await
        .unwrap();
    let mut other = kubelet::request("v1", "other.io/x", &pod, &key, &RequestOptions::default());
    other["spec"]["signerName"] = json!("other.io/x");
    pcrs(&client, "v1", "default")
        .create(&PostParams::default(), &obj(other))
        .await
        .unwrap();
    for v in ["v1", "v1beta1"] {
        let api = pcrs(&client, v, "default");
        let mine = api
            .list(&ListParams::default().fields(&format!("spec.signerName={SIGNER}")))
            .await
            .unwrap();
        assert_eq!(mine.items.len(), 1);
        let by_pod = api
            .list(&ListParams::default().fields("spec.podName=web-0,spec.nodeName=node-1"))
            .await
            .unwrap();
        assert_eq!(by_pod.items.len(), 2);
    }
    let e = status(
        pcrs(&client, "v1", "default")
            .list(&ListParams::default().fields("spec.serviceAccountName=default"))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 400);
    assert_eq!(
        e.message,
        "field label not supported: spec.serviceAccountName"
    );
}

#[tokio::test]
async fn cluster_trust_bundles() {
    let fake = start(CertVersions::BOTH).await;
    let client = fake.client().await;
    let ca1 = ca();
    let ca2 = ca();
    let bundle = |pem: &str, name: &str, signer: Option<&str>, v: &str| {
        let mut spec = json!({"trustBundle": pem});
        if let Some(s) = signer {
            spec["signerName"] = json!(s);
        }
        obj(
            json!({"apiVersion": format!("certificates.k8s.io/{v}"), "kind": "ClusterTrustBundle",
                   "metadata": {"name": name, "labels": {"a": "b"}}, "spec": spec}),
        )
    };
    let invalid = |e: kube::Error| {
        let s = status(e);
        assert_eq!(s.code, 422, "{}", s.message);
        s.message
    };
    let pp = PostParams::default();
    let api = ctbs(&client, "v1");
    let two = format!("{}{}", ca1.pem, ca2.pem);
    let made = api
        .create(
            &pp,
            &bundle(&two, "example.com:spiffe:primary", Some(SIGNER), "v1"),
        )
        .await
        .unwrap();
    // The same object through v1beta1.
    let beta = ctbs(&client, "v1beta1")
        .get("example.com:spiffe:primary")
        .await
        .unwrap();
    assert_eq!(j(&beta)["spec"]["trustBundle"], json!(two));
    // Name prefix.
    let m = invalid(
        api.create(&pp, &bundle(&ca1.pem, "primary", Some(SIGNER), "v1"))
            .await
            .unwrap_err(),
    );
    assert!(m.contains("ClusterTrustBundle for signerName example.com/spiffe must be named with prefix example.com:spiffe:"), "{m}");
    let m = invalid(
        api.create(&pp, &bundle(&ca1.pem, "a:b", None, "v1"))
            .await
            .unwrap_err(),
    );
    assert!(
        m.contains("ClusterTrustBundle without signer name must not have \":\" in its name"),
        "{m}"
    );
    // Not a CA; not a certificate; empty; duplicates.
    let leaf_key = KubeletKey::generate(KeyType::EcdsaP256);
    let now = SystemTime::now();
    let not_ca = leaf(
        &ca1,
        &leaf_key.spki_der,
        now,
        now + Duration::from_secs(3600),
    );
    let m = invalid(
        api.create(&pp, &bundle(&not_ca, "x", None, "v1"))
            .await
            .unwrap_err(),
    );
    assert!(m.contains("entry 0 does not have the CA bit set"), "{m}");
    let m = invalid(
        api.create(
            &pp,
            &bundle(
                &format!("{}{}", ca1.pem, leaf_key.private_pem),
                "x",
                None,
                "v1",
            ),
        )
        .await
        .unwrap_err(),
    );
    assert!(m.contains("entry 1 has bad block type: PRIVATE KEY"), "{m}");
    let m = invalid(
        api.create(&pp, &bundle("", "x", None, "v1"))
            .await
            .unwrap_err(),
    );
    assert!(
        m.contains("at least one trust anchor must be provided"),
        "{m}"
    );
    let m = invalid(
        api.create(
            &pp,
            &bundle(&format!("{}{}", ca1.pem, ca1.pem), "x", None, "v1"),
        )
        .await
        .unwrap_err(),
    );
    assert!(m.contains("duplicate trust anchor (indices [0 1])"), "{m}");
    // signerName is immutable; the bundle is not.
    let mut v = j(&made);
    v["spec"]["trustBundle"] = json!(ca2.pem);
    let updated = api
        .replace("example.com:spiffe:primary", &pp, &obj(v))
        .await
        .unwrap();
    let mut v = j(&updated);
    v["spec"]["signerName"] = json!("example.com/other");
    let m = invalid(
        api.replace("example.com:spiffe:primary", &pp, &obj(v))
            .await
            .unwrap_err(),
    );
    assert!(
        m.contains("spec.signerName: Invalid value: \"example.com/other\": field is immutable"),
        "{m}"
    );
    // Selected by signer name.
    let found = api
        .list(
            &ListParams::default()
                .fields(&format!("spec.signerName={SIGNER}"))
                .labels("a=b"),
        )
        .await
        .unwrap();
    assert_eq!(found.items.len(), 1);
}
