//! Watches: order, bookmarks, 410 Expired and kube-runtime's recovery,
//! streaming lists, selector transitions.

use std::collections::BTreeMap;
use std::pin::pin;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;
use tokio_stream::StreamExt;

use super::common::fakekube::{FakeKube, FakeOptions};
use super::within;

fn cm(name: &str, labels: serde_json::Value) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": labels}, "data": {"v": "0"}}),
    )
    .unwrap()
}

fn describe(e: &WatchEvent<ConfigMap>) -> String {
    match e {
        WatchEvent::Added(o) => format!("ADDED {}", o.metadata.name.clone().unwrap()),
        WatchEvent::Modified(o) => format!("MODIFIED {}", o.metadata.name.clone().unwrap()),
        WatchEvent::Deleted(o) => format!("DELETED {}", o.metadata.name.clone().unwrap()),
        WatchEvent::Bookmark(b) => format!("BOOKMARK {}", b.metadata.resource_version),
        WatchEvent::Error(s) => format!("ERROR {}", s.code),
    }
}

#[tokio::test]
async fn watch_from_a_list_sees_changes_in_order() {
    let fake = FakeKube::start().await;
    let api: Api<ConfigMap> = Api::namespaced(fake.client().await, "default");
    api.create(&PostParams::default(), &cm("before", json!({})))
        .await
        .unwrap();
    let list = api.list(&ListParams::default()).await.unwrap();
    let rv = list.metadata.resource_version.unwrap();
    let stream = api
        .watch(&WatchParams::default().timeout(30), &rv)
        .await
        .unwrap();
    let mut stream = pin!(stream);
    api.create(&PostParams::default(), &cm("w", json!({})))
        .await
        .unwrap();
    let patch = Patch::Merge(json!({"data": {"v": "1"}}));
    api.patch("w", &PatchParams::default(), &patch)
        .await
        .unwrap();
    api.delete("w", &Default::default()).await.unwrap();
    let mut seen = Vec::new();
    let mut last_rv = 0u64;
    while seen.len() < 3 {
        let ev = within(10, stream.next()).await.unwrap().unwrap();
        if let WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) = &ev {
            let rv: u64 = o
                .metadata
                .resource_version
                .clone()
                .unwrap()
                .parse()
                .unwrap();
            assert!(rv > last_rv, "resourceVersions increase");
            last_rv = rv;
        }
        seen.push(describe(&ev));
    }
    assert_eq!(
        seen,
        ["ADDED w", "MODIFIED w", "DELETED w"],
        "nothing from before the list"
    );
    assert_eq!(
        last_rv,
        fake.resource_version(),
        "DELETED carries the deletion's resourceVersion"
    );
}

#[tokio::test]
async fn watch_without_resource_version_starts_with_the_current_state() {
    let fake = FakeKube::start().await;
    let api: Api<ConfigMap> = Api::namespaced(fake.client().await, "default");
    api.create(&PostParams::default(), &cm("one", json!({})))
        .await
        .unwrap();
    let stream = api
        .watch(&WatchParams::default().timeout(30), "0")
        .await
        .unwrap();
    let mut stream = pin!(stream);
    let mut added = Vec::new();
    for _ in 0..2 {
        added.push(describe(&within(10, stream.next()).await.unwrap().unwrap()));
    }
    added.sort();
    assert_eq!(added, ["ADDED kube-root-ca.crt", "ADDED one"]);
}

#[tokio::test]
async fn bookmarks_arrive_when_asked() {
    let fake = FakeKube::start_with(FakeOptions {
        bookmark_interval: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let api: Api<ConfigMap> = Api::namespaced(fake.client().await, "default");
    let rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let stream = api
        .watch(&WatchParams::default().timeout(30), &rv)
        .await
        .unwrap();
    let mut stream = pin!(stream);
    api.create(&PostParams::default(), &cm("b", json!({})))
        .await
        .unwrap();
    let mut kinds = Vec::new();
    while !kinds.iter().any(|k: &String| k.starts_with("BOOKMARK")) {
        kinds.push(describe(&within(10, stream.next()).await.unwrap().unwrap()));
    }
    assert_eq!(kinds[0], "ADDED b");
    let bookmark_rv: u64 = kinds.last().unwrap()["BOOKMARK ".len()..].parse().unwrap();
    assert!(
        bookmark_rv >= fake.resource_version() - 1,
        "a bookmark carries the latest resourceVersion"
    );
    // Without bookmarks asked for, none come; the watch ends at its timeout.
    let stream = api
        .watch(&WatchParams::default().timeout(1).disable_bookmarks(), &rv)
        .await
        .unwrap();
    let events: Vec<_> = within(10, stream.collect::<Vec<_>>()).await;
    assert!(
        events
            .iter()
            .all(|e| !matches!(e, Ok(WatchEvent::Bookmark(_))))
    );
}

#[tokio::test]
async fn a_compacted_resource_version_gets_410_expired() {
    let fake = FakeKube::start().await;
    let api: Api<ConfigMap> = Api::namespaced(fake.client().await, "default");
    let old = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    api.create(&PostParams::default(), &cm("c", json!({})))
        .await
        .unwrap();
    fake.compact();
    let floor = fake.resource_version();
    let stream = api
        .watch(&WatchParams::default().timeout(30), &old)
        .await
        .unwrap();
    let events: Vec<_> = within(10, stream.collect::<Vec<_>>()).await;
    assert_eq!(events.len(), 1, "one ERROR event, then the stream ends");
    match &events[0] {
        Ok(WatchEvent::Error(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));
            assert_eq!(
                s.message,
                format!("too old resource version: {old} ({floor})")
            );
        }
        other => panic!("expected an ERROR event, got {other:?}"),
    }
    // From the floor itself, the watch is served.
    let stream = api
        .watch(&WatchParams::default().timeout(1), &floor.to_string())
        .await
        .unwrap();
    let events: Vec<_> = within(10, stream.collect::<Vec<_>>()).await;
    assert!(events.is_empty());
}

#[tokio::test]
async fn kube_runtime_watcher_relists_after_410_and_converges() {
    let fake = FakeKube::start().await;
    let api: Api<ConfigMap> = Api::namespaced(fake.client().await, "default");
    for i in 0..3 {
        api.create(&PostParams::default(), &cm(&format!("r{i}"), json!({})))
            .await
            .unwrap();
    }
    let (reader, writer) = reflector::store::<ConfigMap>();
    let stream = watcher(api.clone(), watcher::Config::default().page_size(2))
        .default_backoff()
        .reflect(writer)
        .touched_objects();
    let mut stream = pin!(stream);
    // The reflector's store fills at InitDone, which the stream only passes
    // on its way to the next event: poll with short bounds.
    within(10, async {
        while reader.state().len() < 4 {
            let _ = tokio::time::timeout(Duration::from_millis(50), stream.next()).await;
        }
    })
    .await;
    fake.reset_counters();
    // The watch is cut; meanwhile the world changes and history is lost.
    fake.close_watches();
    api.delete("r0", &Default::default()).await.unwrap();
    api.create(&PostParams::default(), &cm("r9", json!({})))
        .await
        .unwrap();
    fake.compact();
    let names = |r: &reflector::Store<ConfigMap>| {
        let mut n: Vec<String> = r
            .state()
            .iter()
            .map(|c| c.metadata.name.clone().unwrap())
            .collect();
        n.sort();
        n
    };
    within(20, async {
        while names(&reader) != ["kube-root-ca.crt", "r1", "r2", "r9"] {
            let _ = tokio::time::timeout(Duration::from_millis(50), stream.next()).await;
        }
    })
    .await;
    assert!(
        fake.count("list", "configmaps") >= 1,
        "the watcher listed again after the 410"
    );
    assert!(fake.count("watch", "configmaps") >= 2);
}

#[tokio::test]
async fn streaming_lists_end_with_the_initial_events_bookmark() {
    let fake = FakeKube::start().await;
    let api: Api<ConfigMap> = Api::namespaced(fake.client().await, "default");
    api.create(&PostParams::default(), &cm("s1", json!({})))
        .await
        .unwrap();
    let stream = watcher(api.clone(), watcher::Config::default().streaming_lists());
    let mut stream = pin!(stream);
    let mut init = Vec::new();
    within(10, async {
        loop {
            match stream.next().await.unwrap().unwrap() {
                watcher::Event::Init => {}
                watcher::Event::InitApply(o) => init.push(o.metadata.name.unwrap()),
                watcher::Event::InitDone => break,
                other => panic!("{other:?} before InitDone"),
            }
        }
    })
    .await;
    init.sort();
    assert_eq!(init, ["kube-root-ca.crt", "s1"]);
    assert_eq!(
        fake.count("list", "configmaps"),
        0,
        "no list: the watch streamed it"
    );
    api.create(&PostParams::default(), &cm("s2", json!({})))
        .await
        .unwrap();
    match within(10, stream.next()).await.unwrap().unwrap() {
        watcher::Event::Apply(o) => assert_eq!(o.metadata.name.as_deref(), Some("s2")),
        other => panic!("{other:?}"),
    }
    // sendInitialEvents without its companions is invalid.
    let raw = fake.client().await;
    let req = http::Request::get(
        "/api/v1/namespaces/default/configmaps?watch=true&sendInitialEvents=true",
    )
    .body(Vec::new())
    .unwrap();
    let e = super::status(raw.request::<serde_json::Value>(req).await.unwrap_err());
    assert_eq!(e.code, 422);
}

#[tokio::test]
async fn selector_watches_see_objects_leave_and_enter() {
    let fake = FakeKube::start().await;
    let api: Api<ConfigMap> = Api::namespaced(fake.client().await, "default");
    api.create(&PostParams::default(), &cm("sel", json!({"team": "a"})))
        .await
        .unwrap();
    let rv = fake.resource_version().to_string();
    let stream = api
        .watch(&WatchParams::default().labels("team=a").timeout(30), &rv)
        .await
        .unwrap();
    let mut stream = pin!(stream);
    let relabel = |t: &str| Patch::Merge(json!({"metadata": {"labels": {"team": t}}}));
    api.patch("sel", &PatchParams::default(), &relabel("b"))
        .await
        .unwrap();
    api.patch("sel", &PatchParams::default(), &relabel("a"))
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(describe(&within(10, stream.next()).await.unwrap().unwrap()));
    }
    assert_eq!(seen, ["DELETED sel", "ADDED sel"]);
    let labels: BTreeMap<String, String> = api.get("sel").await.unwrap().metadata.labels.unwrap();
    assert_eq!(labels["team"], "a");
}
