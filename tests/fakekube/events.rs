//! core/v1 Events: legacyValidateEvent (the only validation that version
//! applies), path-segment names, and the field selectors of the event
//! registry.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{ListParams, ObjectMeta, PostParams};

use super::common::fakekube::FakeKube;
use super::status;

fn event(name: &str, involved_ns: Option<&str>, reason: &str) -> Event {
    Event {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Secret".into()),
            name: Some("istio.web".into()),
            namespace: involved_ns.map(String::from),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some("m".into()),
        type_: Some("Warning".into()),
        source: Some(EventSource {
            component: Some("workload-ca".into()),
            host: None,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn legacy_events_are_validated_and_selected_like_the_real_server() {
    let fake = FakeKube::start().await;
    fake.create_namespace("prod");
    let client = fake.client().await;
    let prod: Api<Event> = Api::namespaced(client.clone(), "prod");
    let pp = PostParams::default();

    // Sound: the involved object in the event's namespace; any name that
    // is a path segment (not a DNS subdomain: upper case is fine).
    prod.create(&pp, &event("istio.web.ABC", Some("prod"), "SecretNotOwned"))
        .await
        .unwrap();
    prod.create(&pp, &event("other", Some("prod"), "Other"))
        .await
        .unwrap();

    // The involved object's namespace must be the event's.
    let e = status(
        prod.create(&pp, &event("x1", Some("default"), "R"))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    assert!(
        e.message.contains(
            "involvedObject.namespace: Invalid value: \"default\": does not match event.namespace"
        ),
        "{}",
        e.message
    );
    // A cluster-scoped involved object: only in "default" (or no namespace).
    let e = status(prod.create(&pp, &event("x2", None, "R")).await.unwrap_err());
    assert_eq!(e.code, 422, "{}", e.message);
    let default: Api<Event> = Api::namespaced(client.clone(), "default");
    default
        .create(&pp, &event("node-event", None, "R"))
        .await
        .unwrap();

    // Names: path segments only.
    let e = status(
        prod.create(&pp, &event("50%", Some("prod"), "R"))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    assert!(e.message.contains("may not contain '%'"), "{}", e.message);

    // With eventTime (a "new" event through core/v1): reporting fields
    // are required.
    let mut new_style = event("x3", Some("prod"), "");
    new_style.event_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
    let e = status(prod.create(&pp, &new_style).await.unwrap_err());
    assert_eq!(e.code, 422);
    for missing in [
        "reportingComponent",
        "reportingInstance",
        "action",
        "reason",
    ] {
        assert!(
            e.message.contains(&format!("{missing}: Required value")),
            "{missing}: {}",
            e.message
        );
    }
    new_style.reporting_component = Some("workload-ca".into());
    new_style.reporting_instance = Some("ca-0".into());
    new_style.action = Some("Check".into());
    new_style.reason = Some("R".into());
    prod.create(&pp, &new_style).await.unwrap();

    // Field selectors of the event registry.
    let by_name = prod
        .list(&ListParams::default().fields("involvedObject.name=istio.web,reason=SecretNotOwned"))
        .await
        .unwrap();
    assert_eq!(by_name.items.len(), 1);
    assert_eq!(
        by_name.items[0].metadata.name.as_deref(),
        Some("istio.web.ABC")
    );
    let by_source = prod
        .list(&ListParams::default().fields("source=workload-ca,type=Warning"))
        .await
        .unwrap();
    assert_eq!(by_source.items.len(), 3);
    let e = status(
        prod.list(&ListParams::default().fields("message=m"))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 400);
    assert!(
        e.message.contains("field label not supported: message"),
        "{}",
        e.message
    );
    // Refused requests are logged too.
    assert_eq!(fake.count("create", "events"), 8);
}
