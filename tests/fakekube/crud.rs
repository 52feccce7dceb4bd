//! Create, get, update, list: errors, optimistic concurrency, selectors,
//! paging, validation, Secrets, Leases, the request log, scale.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::Api;
use kube::api::{ListParams, ObjectMeta, PostParams};
use serde_json::json;

use super::common::fakekube::FakeKube;
use super::{secret, status};

#[tokio::test]
async fn create_twice_is_already_exists() {
    let fake = FakeKube::start().await;
    let api: Api<Secret> = Api::namespaced(fake.client().await, "default");
    let created = api
        .create(&PostParams::default(), &secret("s", &[("k", "v")]))
        .await
        .unwrap();
    let meta = &created.metadata;
    assert!(meta.uid.as_deref().is_some_and(|u| u.len() == 36));
    assert!(meta.creation_timestamp.is_some());
    assert!(
        meta.resource_version
            .as_deref()
            .unwrap()
            .parse::<u64>()
            .is_ok()
    );
    assert_eq!(
        created.type_.as_deref(),
        Some("Opaque"),
        "type defaults to Opaque"
    );
    let e = status(
        api.create(&PostParams::default(), &secret("s", &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(e.message, "secrets \"s\" already exists");
    let d = e.details.unwrap();
    assert_eq!((d.name.as_str(), d.kind.as_str()), ("s", "secrets"));
}

#[tokio::test]
async fn get_missing_is_not_found() {
    let fake = FakeKube::start().await;
    let client = fake.client().await;
    let e = status(
        Api::<Secret>::namespaced(client.clone(), "default")
            .get("nope")
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (404, "NotFound"));
    assert_eq!(e.message, "secrets \"nope\" not found");
    let e = status(
        Api::<Lease>::namespaced(client.clone(), "default")
            .get("nope")
            .await
            .unwrap_err(),
    );
    assert_eq!(e.message, "leases.coordination.k8s.io \"nope\" not found");
    assert_eq!(e.details.unwrap().group, "coordination.k8s.io");
    // get_opt maps the 404 to None.
    assert!(
        Api::<Secret>::namespaced(client, "default")
            .get_opt("nope")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn namespaces_must_exist_and_names_must_be_valid() {
    let fake = FakeKube::start().await;
    let client = fake.client().await;
    let ghost: Api<Secret> = Api::namespaced(client.clone(), "ghost");
    let e = status(
        ghost
            .create(&PostParams::default(), &secret("s", &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (e.code, e.message.as_str()),
        (404, "namespaces \"ghost\" not found")
    );
    // Listing in a namespace that does not exist is an empty list, not 404.
    assert!(
        ghost
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    fake.create_namespace("ghost");
    ghost
        .create(&PostParams::default(), &secret("s", &[]))
        .await
        .unwrap();

    let api: Api<Secret> = Api::namespaced(client.clone(), "default");
    let e = status(
        api.create(&PostParams::default(), &secret("Bad_Name", &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert!(e.message.starts_with("Secret \"Bad_Name\" is invalid: metadata.name: Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain"), "{}", e.message);
    let d = e.details.unwrap();
    assert_eq!(d.kind, "Secret");
    assert_eq!(d.causes[0].field, "metadata.name");
    assert_eq!(d.causes[0].reason, "FieldValueInvalid");

    let e = status(
        api.create(&PostParams::default(), &Secret::default())
            .await
            .unwrap_err(),
    );
    assert!(
        e.message
            .ends_with("metadata.name: Required value: name or generateName is required"),
        "{}",
        e.message
    );
    let generated = api
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta {
                    generate_name: Some("gen-".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let name = generated.metadata.name.unwrap();
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");
}

#[tokio::test]
async fn update_needs_the_current_resource_version() {
    let fake = FakeKube::start().await;
    let api: Api<ConfigMap> = Api::namespaced(fake.client().await, "default");
    let mut cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("cm".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    cm.data = Some(BTreeMap::from([("a".to_string(), "1".to_string())]));
    let v1 = api.create(&PostParams::default(), &cm).await.unwrap();
    let rv1: u64 = v1
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()
        .unwrap();

    let mut next = v1.clone();
    next.data = Some(BTreeMap::from([("a".to_string(), "2".to_string())]));
    let v2 = api
        .replace("cm", &PostParams::default(), &next)
        .await
        .unwrap();
    let rv2: u64 = v2
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rv2 > rv1);

    // The same write again carries rv1: stale.
    let e = status(
        api.replace("cm", &PostParams::default(), &next)
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        e.message,
        "Operation cannot be fulfilled on configmaps \"cm\": the object has been modified; please apply your changes to the latest version and try again"
    );
    // No resourceVersion: an unconditional update.
    let mut blind = next.clone();
    blind.metadata.resource_version = None;
    blind.data = Some(BTreeMap::from([("a".to_string(), "3".to_string())]));
    let v3 = api
        .replace("cm", &PostParams::default(), &blind)
        .await
        .unwrap();
    assert!(
        v3.metadata
            .resource_version
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > rv2
    );
    // A no-op update does not move the resourceVersion.
    let same = api
        .replace("cm", &PostParams::default(), &api.get("cm").await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        same.metadata.resource_version,
        api.get("cm").await.unwrap().metadata.resource_version
    );
    // PUT on something absent: 404 (ConfigMaps do not allow create-on-update).
    let mut absent = blind.clone();
    absent.metadata.name = Some("absent".into());
    assert_eq!(
        status(
            api.replace("absent", &PostParams::default(), &absent)
                .await
                .unwrap_err()
        )
        .code,
        404
    );
}

#[tokio::test]
async fn secrets_merge_string_data_and_honour_immutability() {
    let fake = FakeKube::start().await;
    let api: Api<Secret> = Api::namespaced(fake.client().await, "default");
    let mut s = secret("s", &[("a", "1")]);
    s.string_data = Some(BTreeMap::from([("b".to_string(), "two".to_string())]));
    s.type_ = Some("example.com/custom".into());
    let got = api.create(&PostParams::default(), &s).await.unwrap();
    let data = got.data.clone().unwrap();
    assert_eq!(data["b"].0, b"two");
    assert_eq!(data["a"].0, b"1");
    assert!(got.string_data.is_none(), "stringData is write-only");

    let mut retyped = got.clone();
    retyped.type_ = Some("Opaque".into());
    let e = status(
        api.replace("s", &PostParams::default(), &retyped)
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    assert!(
        e.message
            .contains("type: Invalid value: \"Opaque\": field is immutable"),
        "{}",
        e.message
    );

    let mut frozen = got.clone();
    frozen.immutable = Some(true);
    let frozen = api
        .replace("s", &PostParams::default(), &frozen)
        .await
        .unwrap();
    let mut changed = frozen.clone();
    changed
        .data
        .as_mut()
        .unwrap()
        .insert("c".into(), k8s_openapi::ByteString(b"3".to_vec()));
    let e = status(
        api.replace("s", &PostParams::default(), &changed)
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    assert!(
        e.message
            .contains("data: Forbidden: field is immutable when `immutable` is set"),
        "{}",
        e.message
    );
    let mut thawed = frozen.clone();
    thawed.immutable = Some(false);
    assert_eq!(
        status(
            api.replace("s", &PostParams::default(), &thawed)
                .await
                .unwrap_err()
        )
        .code,
        422
    );

    // Bad base64 is refused by the decoder (400), a bad key by validation (422).
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        fake.client().await,
        "default",
        &kube::api::ApiResource::erase::<Secret>(&()),
    );
    let bad: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "b64"}, "data": {"k": "***"}
    }))
    .unwrap();
    assert_eq!(
        status(raw.create(&PostParams::default(), &bad).await.unwrap_err()).code,
        400
    );
    let e = status(
        api.create(
            &PostParams::default(),
            &secret("badkey", &[("no spaces", "x")]),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    assert!(
        e.message.contains("data[no spaces]: Invalid value"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn list_with_label_and_field_selectors() {
    let fake = FakeKube::start().await;
    fake.create_service_account("default", "web");
    for (name, node) in [("a", "n1"), ("b", "n1"), ("c", "n2")] {
        fake.create_pod("default", name, "web", Some(node));
    }
    fake.create_pod("default", "pending", "web", None);
    let client = fake.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let names = |l: kube::core::ObjectList<Pod>| -> Vec<String> {
        l.items
            .into_iter()
            .map(|p| p.metadata.name.unwrap())
            .collect()
    };
    let on_n1 = pods
        .list(&ListParams::default().fields("spec.nodeName=n1"))
        .await
        .unwrap();
    assert_eq!(names(on_n1), ["a", "b"]);
    let not_n1 = pods
        .list(&ListParams::default().fields("spec.nodeName!=n1"))
        .await
        .unwrap();
    assert_eq!(names(not_n1), ["c", "pending"]);
    let running = pods
        .list(&ListParams::default().fields("status.phase=Running,spec.serviceAccountName=web"))
        .await
        .unwrap();
    assert_eq!(running.items.len(), 3);
    let e = status(
        pods.list(&ListParams::default().fields("spec.foo=bar"))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (400, "BadRequest"));
    assert_eq!(e.message, "field label not supported: spec.foo");

    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    for (name, labels) in [
        ("x", json!({"app": "a", "tier": "1"})),
        ("y", json!({"app": "b"})),
        ("z", json!({})),
    ] {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    let sel = |s: &'static str| {
        let cms = cms.clone();
        async move {
            let mut n: Vec<String> = cms
                .list(&ListParams::default().labels(s))
                .await
                .unwrap()
                .items
                .into_iter()
                .map(|c| c.metadata.name.unwrap())
                .filter(|n| n != "kube-root-ca.crt")
                .collect();
            n.sort();
            n
        }
    };
    assert_eq!(sel("app=a").await, ["x"]);
    assert_eq!(sel("app==a").await, ["x"]);
    assert_eq!(
        sel("app!=a").await,
        ["y", "z"],
        "!= matches objects without the label"
    );
    assert_eq!(sel("app in (a,b)").await, ["x", "y"]);
    assert_eq!(sel("app notin (a)").await, ["y", "z"]);
    assert_eq!(sel("tier").await, ["x"]);
    assert_eq!(sel("!tier,app").await, ["y"]);
    assert_eq!(
        status(
            cms.list(&ListParams::default().labels("app in"))
                .await
                .unwrap_err()
        )
        .code,
        400
    );
}

#[tokio::test]
async fn paging_is_a_consistent_snapshot() {
    let fake = FakeKube::start().await;
    let api: Api<ConfigMap> = Api::namespaced(fake.client().await, "default");
    for i in 0..7 {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": format!("cm-{i}")}})).unwrap();
        api.create(&PostParams::default(), &cm).await.unwrap();
    }
    let first = api.list(&ListParams::default().limit(3)).await.unwrap();
    assert_eq!(first.items.len(), 3);
    let token = first.metadata.continue_.clone().expect("a continue token");
    assert_eq!(
        first.metadata.remaining_item_count,
        Some(5),
        "8 objects with kube-root-ca.crt"
    );
    // Changes after the first page are not seen by the rest of the list.
    api.delete("cm-5", &Default::default()).await.unwrap();
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "cm-9"}})).unwrap();
    api.create(&PostParams::default(), &cm).await.unwrap();
    let mut names: Vec<String> = first
        .items
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    let mut cont = Some(token);
    while let Some(c) = cont {
        let page = api
            .list(&ListParams::default().limit(3).continue_token(&c))
            .await
            .unwrap();
        assert_eq!(
            page.metadata.resource_version,
            first.metadata.resource_version
        );
        names.extend(page.items.iter().map(|c| c.metadata.name.clone().unwrap()));
        cont = page.metadata.continue_.filter(|c| !c.is_empty());
    }
    assert_eq!(
        names,
        [
            "cm-0",
            "cm-1",
            "cm-2",
            "cm-3",
            "cm-4",
            "cm-5",
            "cm-6",
            "kube-root-ca.crt"
        ]
    );
    // A continue token from before a compaction is too old: 410.
    let again = api.list(&ListParams::default().limit(3)).await.unwrap();
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "cm-11"}})).unwrap();
    api.create(&PostParams::default(), &cm).await.unwrap();
    fake.compact();
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "cm-10"}})).unwrap();
    api.create(&PostParams::default(), &cm).await.unwrap();
    let e = status(
        api.list(
            &ListParams::default()
                .limit(3)
                .continue_token(again.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
}

#[tokio::test]
async fn leases_support_leader_election() {
    let fake = FakeKube::start().await;
    let api: Api<Lease> = Api::namespaced(fake.client().await, "kube-system");
    assert_eq!(status(api.get("leader").await.unwrap_err()).code, 404);
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "leader"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15,
                 "acquireTime": "2026-01-02T03:04:05.123Z", "renewTime": "2026-01-02T03:04:05.123456Z",
                 "leaseTransitions": 0}
    }))
    .unwrap();
    let held = api.create(&PostParams::default(), &lease).await.unwrap();
    let raw = fake.get_json("leases", "kube-system", "leader").unwrap();
    assert_eq!(
        raw["spec"]["acquireTime"], "2026-01-02T03:04:05.123000Z",
        "MicroTime: six digits"
    );
    assert_eq!(raw["spec"]["renewTime"], "2026-01-02T03:04:05.123456Z");
    assert!(raw["metadata"].get("generation").is_none());
    // Two candidates race with the same resourceVersion: one wins.
    let mut a = held.clone();
    a.spec.as_mut().unwrap().lease_transitions = Some(1);
    let mut b = held.clone();
    b.spec.as_mut().unwrap().holder_identity = Some("b".into());
    api.replace("leader", &PostParams::default(), &a)
        .await
        .unwrap();
    let e = status(
        api.replace("leader", &PostParams::default(), &b)
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 409);
    let bad: Lease = serde_json::from_value(
        json!({"metadata": {"name": "bad"}, "spec": {"leaseDurationSeconds": 0}}),
    )
    .unwrap();
    assert_eq!(
        status(api.create(&PostParams::default(), &bad).await.unwrap_err()).code,
        422
    );
    // Leases, unlike most kinds, may be created by PUT.
    let put: Lease = serde_json::from_value(
        json!({"metadata": {"name": "put"}, "spec": {"holderIdentity": "c"}}),
    )
    .unwrap();
    api.replace("put", &PostParams::default(), &put)
        .await
        .unwrap();
}

#[tokio::test]
async fn counters_count_exactly_the_calls_made() {
    let fake = FakeKube::start().await;
    let client = fake.client().await;
    let api: Api<Secret> = Api::namespaced(client.clone(), "default");
    fake.reset_counters();
    assert_eq!(fake.total_requests(), 0);
    api.create(&PostParams::default(), &secret("a", &[]))
        .await
        .unwrap();
    api.get("a").await.unwrap();
    api.get("a").await.unwrap();
    let _ = api.get("missing").await;
    api.list(&ListParams::default()).await.unwrap();
    api.delete("a", &Default::default()).await.unwrap();
    assert_eq!(fake.count("create", "secrets"), 1);
    assert_eq!(fake.count("get", "secrets"), 3);
    assert_eq!(fake.count("list", "secrets"), 1);
    assert_eq!(fake.count("delete", "secrets"), 1);
    assert_eq!(fake.total_requests(), 6);
    let log = fake.requests();
    assert_eq!(log[0].user, "kubernetes-admin");
    assert_eq!(
        (log[0].namespace.as_str(), log[0].name.as_str()),
        ("default", "")
    );
    assert_eq!(
        (log[1].verb.as_str(), log[1].name.as_str(), log[1].code),
        ("get", "a", 200)
    );
    assert_eq!(log[3].code, 404);
    fake.reset_counters();
    assert!(fake.counters().is_empty());
}

#[tokio::test]
async fn ten_thousand_pods_seed_quickly_and_list() {
    let fake = FakeKube::start().await;
    fake.create_service_account("default", "web");
    for n in 0..10 {
        fake.create_node(&format!("node-{n}"));
    }
    let started = Instant::now();
    for i in 0..10_000 {
        fake.create_pod(
            "default",
            &format!("pod-{i:05}"),
            "web",
            Some(&format!("node-{}", i % 10)),
        );
    }
    let seeding = started.elapsed();
    eprintln!("seeding 10,000 pods: {seeding:?}");
    assert!(
        seeding < Duration::from_secs(2),
        "seeding 10,000 pods took {seeding:?}"
    );
    let pods: Api<Pod> = Api::namespaced(fake.client().await, "default");
    fake.reset_counters();
    let mut seen = 0;
    let mut cont: Option<String> = None;
    loop {
        let mut lp = ListParams::default().limit(500);
        if let Some(c) = &cont {
            lp = lp.continue_token(c);
        }
        let page = pods.list(&lp).await.unwrap();
        seen += page.items.len();
        cont = page.metadata.continue_.filter(|c| !c.is_empty());
        if cont.is_none() {
            break;
        }
    }
    assert_eq!(seen, 10_000);
    assert_eq!(fake.count("list", "pods"), 20);
    let on_3 = pods
        .list(&ListParams::default().fields("spec.nodeName=node-3"))
        .await
        .unwrap();
    assert_eq!(on_3.items.len(), 1000);
    let all = pods.list(&ListParams::default()).await.unwrap();
    assert_eq!(all.items.len(), 10_000);
}
