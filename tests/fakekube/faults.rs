//! Fault injection, authentication failures, and a real kubectl (when the
//! machine has one) driving the fake through a kubeconfig file.

use std::pin::pin;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::api::{ListParams, PostParams, WatchParams};
use tokio_stream::StreamExt;

use super::common::fakekube::FakeKube;
use super::{secret, status, within};

#[tokio::test]
async fn injected_failures_then_recovery() {
    let fake = FakeKube::start().await;
    let api: Api<Secret> = Api::namespaced(fake.client().await, "default");
    fake.fail_next("list", "secrets", 500, 2);
    fake.fail_next("create", "secrets", 429, 1);
    for _ in 0..2 {
        let e = status(api.list(&ListParams::default()).await.unwrap_err());
        assert_eq!((e.code, e.reason.as_str()), (500, "InternalError"));
    }
    api.list(&ListParams::default()).await.unwrap();
    // kube's client retries a 429 (after its Retry-After): one call, two requests.
    api.create(&PostParams::default(), &secret("s", &[]))
        .await
        .unwrap();
    fake.fail_next("get", "secrets", 403, 1);
    let e = status(api.get("s").await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (403, "Forbidden"));
    let codes: Vec<u16> = fake.requests().iter().map(|r| r.code).collect();
    assert_eq!(codes, [500, 500, 200, 429, 201, 403]);
}

#[tokio::test]
async fn bad_credentials_are_401() {
    let fake = FakeKube::start().await;
    let api: Api<Secret> = Api::namespaced(fake.client_with_token("not-a-token").await, "default");
    let e = status(api.list(&ListParams::default()).await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (401, "Unauthorized"));
    fake.add_user_token("static-token", "alice", &["devs"]);
    let alice: Api<Secret> =
        Api::namespaced(fake.client_with_token("static-token").await, "default");
    alice.list(&ListParams::default()).await.unwrap();
    let last = fake.requests().pop().unwrap();
    assert_eq!(last.user, "alice");
    assert_eq!(last.groups, ["devs", "system:authenticated"]);
}

#[tokio::test]
async fn down_drops_connections_and_watches_then_comes_back() {
    let fake = FakeKube::start().await;
    let api: Api<ConfigMap> = Api::namespaced(fake.client().await, "default");
    let stream = api
        .watch(
            &WatchParams::default().timeout(60),
            &fake.resource_version().to_string(),
        )
        .await
        .unwrap();
    let mut stream = pin!(stream);
    within(10, async {
        while fake.open_watches() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    fake.set_down(true);
    // The open watch ends (with an error or a clean end), requests fail.
    let _ = within(10, stream.next()).await;
    assert!(api.list(&ListParams::default()).await.is_err());
    fake.set_down(false);
    api.list(&ListParams::default()).await.unwrap();
    // close_watches ends watches cleanly.
    let stream = api
        .watch(
            &WatchParams::default().timeout(60),
            &fake.resource_version().to_string(),
        )
        .await
        .unwrap();
    let mut stream = pin!(stream);
    within(10, async {
        while fake.open_watches() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    fake.close_watches();
    assert!(
        within(10, stream.next()).await.is_none(),
        "a clean end of stream"
    );
}

/// kubectl (client-go) as an independent client, when installed.
#[tokio::test]
async fn kubectl_drives_the_fake_through_a_kubeconfig() {
    if std::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        eprintln!("kubectl not installed: skipped");
        return;
    }
    let fake = FakeKube::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig, fake.admin_token());
    let manifest = dir.path().join("cm.json");
    std::fs::write(&manifest, r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"from-kubectl"},"data":{"a":"1"}}"#).unwrap();
    let run = |args: Vec<String>| {
        let kubeconfig = kubeconfig.clone();
        async move {
            let out = tokio::process::Command::new("kubectl")
                .env("KUBECONFIG", &kubeconfig)
                .arg("--request-timeout=20s")
                .args(&args)
                .kill_on_drop(true)
                .output();
            let out = within(60, out).await.unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            (out.status.success(), text)
        }
    };
    let m = manifest.display().to_string();
    // The fake serves no OpenAPI documents: client-side validation off.
    let (ok, out) = run(vec![
        "apply".into(),
        "--server-side".into(),
        "--validate=false".into(),
        "-f".into(),
        m.clone(),
    ])
    .await;
    assert!(ok, "{out}");
    let (ok, out) = run(vec![
        "get".into(),
        "configmap".into(),
        "from-kubectl".into(),
        "-o".into(),
        "jsonpath={.data.a}".into(),
    ])
    .await;
    assert!(ok && out.trim() == "1", "{out}");
    let cm = fake
        .get_json("configmaps", "default", "from-kubectl")
        .unwrap();
    assert_eq!(cm["metadata"]["managedFields"][0]["manager"], "kubectl");
    assert_eq!(cm["metadata"]["managedFields"][0]["operation"], "Apply");
    let (ok, out) = run(vec!["get".into(), "configmap".into(), "nope".into()]).await;
    assert!(
        !ok && out.contains("configmaps \"nope\" not found"),
        "{out}"
    );
    // kubectl's typed commands (`create secret generic`) send protobuf, which
    // the fake does not speak (415); `create -f` sends JSON.
    let secret = dir.path().join("secret.json");
    std::fs::write(
        &secret,
        r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"k"},"stringData":{"x":"y"}}"#,
    )
    .unwrap();
    let (ok, out) = run(vec![
        "create".into(),
        "--validate=false".into(),
        "-f".into(),
        secret.display().to_string(),
    ])
    .await;
    assert!(ok, "{out}");
    let (ok, out) = run(vec!["delete".into(), "secret".into(), "k".into()]).await;
    assert!(ok, "{out}");
    assert!(fake.get_json("secrets", "default", "k").is_none());
    assert!(fake.count("patch", "configmaps") >= 1);
}
