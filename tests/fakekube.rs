//! The fake Kubernetes API server (tests/common/fakekube), checked against
//! the real API server's documented behaviour with the real kube client.

mod common;

use common::fakekube::FakeKube;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;

#[tokio::test]
async fn smoke() {
    let fake = FakeKube::start().await;
    let client = fake.client().await;
    let secrets: Api<Secret> = Api::namespaced(client, "default");
    let list = secrets.list(&Default::default()).await.unwrap();
    assert!(list.items.is_empty());
}
