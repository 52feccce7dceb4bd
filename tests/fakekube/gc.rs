//! Deletion: ownerReference garbage collection with each propagation
//! policy, dangling owners, preconditions, namespace deletion.

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, ServiceAccount};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams, Preconditions};
use serde_json::json;

use super::common::fakekube::FakeKube;
use super::{secret, status};

fn owned_cm(name: &str, owner: &ConfigMap) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "ownerReferences": [{
        "apiVersion": "v1", "kind": "ConfigMap",
        "name": owner.metadata.name.clone().unwrap(),
        "uid": owner.metadata.uid.clone().unwrap(),
    }]}}))
    .unwrap()
}

fn named(name: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}})).unwrap()
}

#[tokio::test]
async fn deleting_an_owner_deletes_its_dependents_unless_orphaned() {
    let fake = FakeKube::start().await;
    let api: Api<ConfigMap> = Api::namespaced(fake.client().await, "default");
    let pp = PostParams::default();
    for (policy, params) in [
        ("background", DeleteParams::background()),
        ("foreground", DeleteParams::foreground()),
        ("default", DeleteParams::default()),
    ] {
        let owner = api
            .create(&pp, &named(&format!("{policy}-owner")))
            .await
            .unwrap();
        let child = api
            .create(&pp, &owned_cm(&format!("{policy}-child"), &owner))
            .await
            .unwrap();
        api.create(&pp, &owned_cm(&format!("{policy}-grandchild"), &child))
            .await
            .unwrap();
        api.delete(&format!("{policy}-owner"), &params)
            .await
            .unwrap();
        for n in ["owner", "child", "grandchild"] {
            assert!(
                api.get_opt(&format!("{policy}-{n}"))
                    .await
                    .unwrap()
                    .is_none(),
                "{policy}: {n} still there"
            );
        }
    }
    let owner = api.create(&pp, &named("orphan-owner")).await.unwrap();
    api.create(&pp, &owned_cm("orphan-child", &owner))
        .await
        .unwrap();
    let answered = api
        .delete("orphan-owner", &DeleteParams::orphan())
        .await
        .unwrap();
    let answered = answered
        .left()
        .expect("the object, still finalizing, is answered");
    assert!(answered.metadata.deletion_timestamp.is_some());
    assert_eq!(
        answered.metadata.finalizers,
        Some(vec!["orphan".to_string()])
    );
    assert!(api.get_opt("orphan-owner").await.unwrap().is_none());
    let child = api.get("orphan-child").await.unwrap();
    assert!(
        child
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty(),
        "orphaned: the reference is removed"
    );
}

#[tokio::test]
async fn dependents_of_absent_owners_are_collected() {
    let fake = FakeKube::start().await;
    let api: Api<ConfigMap> = Api::namespaced(fake.client().await, "default");
    let pp = PostParams::default();
    let ghost = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some("ghost".into()),
            uid: Some("00000000-0000-4000-8000-000000000000".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    api.create(&pp, &owned_cm("dangling", &ghost))
        .await
        .unwrap();
    assert!(
        api.get_opt("dangling").await.unwrap().is_none(),
        "collected: its owner does not exist"
    );
    // Two owners, one gone: the dependent stays, the dangling reference goes.
    let live = api.create(&pp, &named("live")).await.unwrap();
    let mut two = owned_cm("two-owners", &live);
    let mut refs = two.metadata.owner_references.clone().unwrap();
    refs.push(owned_cm("x", &ghost).metadata.owner_references.unwrap()[0].clone());
    two.metadata.owner_references = Some(refs);
    api.create(&pp, &two).await.unwrap();
    let kept = api.get("two-owners").await.unwrap();
    let refs = kept.metadata.owner_references.unwrap();
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0].name, "live");
    // Owners of kinds the fake does not serve are left alone.
    let foreign: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "foreign", "ownerReferences": [{
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "d", "uid": "11111111-1111-4111-8111-111111111111"}]}}))
    .unwrap();
    api.create(&pp, &foreign).await.unwrap();
    assert!(api.get_opt("foreign").await.unwrap().is_some());
}

#[tokio::test]
async fn delete_answers_and_preconditions() {
    let fake = FakeKube::start().await;
    let client = fake.client().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let s = secrets
        .create(&PostParams::default(), &secret("s", &[]))
        .await
        .unwrap();
    let wrong = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some("not-the-uid".into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    let e = status(secrets.delete("s", &wrong).await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert!(
        e.message
            .contains("Precondition failed: UID in precondition: not-the-uid"),
        "{}",
        e.message
    );
    let stale = DeleteParams {
        preconditions: Some(Preconditions {
            uid: None,
            resource_version: Some("1".into()),
        }),
        ..Default::default()
    };
    assert_eq!(
        status(secrets.delete("s", &stale).await.unwrap_err()).code,
        409
    );
    // Secrets answer a Status; pods and service accounts the object.
    let right = DeleteParams {
        preconditions: Some(Preconditions {
            uid: s.metadata.uid.clone(),
            resource_version: s.metadata.resource_version.clone(),
        }),
        ..Default::default()
    };
    let answer = secrets.delete("s", &right).await.unwrap();
    let st = answer.right().expect("a Status");
    assert_eq!(st.details.unwrap().uid, s.metadata.uid.unwrap());
    assert_eq!(
        status(
            secrets
                .delete("s", &DeleteParams::default())
                .await
                .unwrap_err()
        )
        .code,
        404
    );
    fake.create_service_account("default", "sa");
    let sas: Api<ServiceAccount> = Api::namespaced(client, "default");
    assert!(
        sas.delete("sa", &DeleteParams::default())
            .await
            .unwrap()
            .is_left()
    );
}

#[tokio::test]
async fn deleting_a_namespace_deletes_what_is_in_it() {
    let fake = FakeKube::start().await;
    let client = fake.client().await;
    fake.create_namespace("doomed");
    fake.create_service_account("doomed", "web");
    fake.create_pod("doomed", "p", "web", None);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "doomed");
    secrets
        .create(&PostParams::default(), &secret("s", &[]))
        .await
        .unwrap();
    let nss: Api<Namespace> = Api::all(client.clone());
    let answered = nss
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .unwrap();
    assert_eq!(
        answered.status.unwrap().phase.as_deref(),
        Some("Terminating")
    );
    assert!(nss.get_opt("doomed").await.unwrap().is_none());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "doomed");
    assert!(
        pods.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(
        secrets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(fake.list_json("serviceaccounts", "doomed").is_empty());
    // Recreated, it starts empty but for what the controllers add.
    fake.create_namespace("doomed");
    let sas: Vec<_> = fake.list_json("serviceaccounts", "doomed");
    assert_eq!(sas.len(), 1);
    assert_eq!(sas[0]["metadata"]["name"], "default");
}
