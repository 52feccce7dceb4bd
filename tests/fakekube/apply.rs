//! Server-side apply: managers, conflicts, force, pruning, managedFields.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::common::fakekube::FakeKube;
use super::status;

fn config(data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": data})
}

fn managers(fake: &FakeKube) -> Vec<(String, String, Value)> {
    let obj = fake.get_json("configmaps", "default", "shared").unwrap();
    obj["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["manager"].as_str().unwrap_or("").to_string(),
                e["operation"].as_str().unwrap().to_string(),
                e["fieldsV1"].clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn two_managers_conflict_force_and_prune() {
    let fake = FakeKube::start().await;
    let api: Api<ConfigMap> = Api::namespaced(fake.client().await, "default");
    let a = PatchParams::apply("manager-a");
    let b = PatchParams::apply("manager-b");
    // Apply to a missing object creates it.
    let created = api
        .patch(
            "shared",
            &a,
            &Patch::Apply(config(json!({"key": "1", "own": "a"}))),
        )
        .await
        .unwrap();
    assert_eq!(created.data.unwrap()["key"], "1");
    assert_eq!(
        managers(&fake),
        [(
            "manager-a".to_string(),
            "Apply".to_string(),
            json!({"f:data": {"f:key": {}, "f:own": {}}})
        )]
    );
    // The same value from another manager: shared, no conflict.
    api.patch("shared", &b, &Patch::Apply(config(json!({"key": "1"}))))
        .await
        .unwrap();
    // A different value: conflict, with the real message.
    let e = status(
        api.patch("shared", &b, &Patch::Apply(config(json!({"key": "2"}))))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        e.message,
        "Apply failed with 1 conflict: conflict with \"manager-a\": .data.key"
    );
    let cause = &e.details.unwrap().causes[0];
    assert_eq!(
        (cause.reason.as_str(), cause.field.as_str()),
        ("FieldManagerConflict", ".data.key")
    );
    let e = status(
        api.patch(
            "shared",
            &b,
            &Patch::Apply(config(json!({"key": "2", "own": "b"}))),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        e.message,
        "Apply failed with 2 conflicts: conflicts with \"manager-a\":\n- .data.key\n- .data.own"
    );
    // Force takes ownership.
    api.patch(
        "shared",
        &b.clone().force(),
        &Patch::Apply(config(json!({"key": "2"}))),
    )
    .await
    .unwrap();
    let m = managers(&fake);
    assert_eq!(m.len(), 2);
    assert_eq!(
        m[0],
        (
            "manager-a".to_string(),
            "Apply".to_string(),
            json!({"f:data": {"f:own": {}}})
        )
    );
    assert_eq!(
        m[1],
        (
            "manager-b".to_string(),
            "Apply".to_string(),
            json!({"f:data": {"f:key": {}}})
        )
    );
    // A field a manager stops applying goes, when nobody else owns it.
    api.patch("shared", &a, &Patch::Apply(config(json!({}))))
        .await
        .unwrap();
    let data = api.get("shared").await.unwrap().data.unwrap();
    assert!(!data.contains_key("own"), "{data:?}");
    assert_eq!(data["key"], "2", "owned by manager-b: kept");
    // ... but stays when another manager still owns it.
    api.patch("shared", &a, &Patch::Apply(config(json!({"key": "2"}))))
        .await
        .unwrap();
    api.patch("shared", &a, &Patch::Apply(config(json!({}))))
        .await
        .unwrap();
    assert_eq!(api.get("shared").await.unwrap().data.unwrap()["key"], "2");
}

#[tokio::test]
async fn updates_are_tracked_and_conflict_with_appliers() {
    let fake = FakeKube::start().await;
    let api: Api<ConfigMap> = Api::namespaced(fake.client().await, "default");
    let cm: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "shared", "labels": {"app": "x"}}, "data": {"key": "1"}}),
    )
    .unwrap();
    api.create(
        &PostParams {
            field_manager: Some("creator".into()),
            ..Default::default()
        },
        &cm,
    )
    .await
    .unwrap();
    assert_eq!(
        managers(&fake),
        [(
            "creator".to_string(),
            "Update".to_string(),
            json!({"f:data": {".": {}, "f:key": {}}, "f:metadata": {"f:labels": {".": {}, "f:app": {}}}})
        )]
    );
    let e = status(
        api.patch(
            "shared",
            &PatchParams::apply("applier"),
            &Patch::Apply(config(json!({"key": "2"}))),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        e.message,
        "Apply failed with 1 conflict: conflict with \"creator\" using v1: .data.key"
    );
    // A merge patch by another manager steals the field without conflict.
    let pp = PatchParams {
        field_manager: Some("editor".into()),
        ..Default::default()
    };
    api.patch("shared", &pp, &Patch::Merge(json!({"data": {"key": "3"}})))
        .await
        .unwrap();
    let m = managers(&fake);
    assert!(
        m.iter().any(|(n, op, f)| n == "editor"
            && op == "Update"
            && *f == json!({"f:data": {"f:key": {}}})),
        "{m:?}"
    );
    assert!(
        m.iter()
            .any(|(n, _, f)| n == "creator" && f.pointer("/f:data/f:key").is_none()),
        "{m:?}"
    );
}

#[tokio::test]
async fn apply_needs_a_field_manager() {
    let fake = FakeKube::start().await;
    let client = fake.client().await;
    let req = http::Request::patch("/api/v1/namespaces/default/configmaps/shared")
        .header("content-type", "application/apply-patch+yaml")
        .body(config(json!({"a": "b"})).to_string().into_bytes())
        .unwrap();
    let e = status(client.request::<Value>(req).await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        e.message,
        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"
    );
    let req =
        http::Request::patch("/api/v1/namespaces/default/configmaps/kube-root-ca.crt?force=true")
            .header("content-type", "application/merge-patch+json")
            .body(b"{}".to_vec())
            .unwrap();
    let e = status(client.request::<Value>(req).await.unwrap_err());
    assert!(
        e.message
            .ends_with("force: Forbidden: may not be specified for non-apply patch"),
        "{}",
        e.message
    );
}
