//! Tests of `k8s::cache`: the indexes, freshness on the paused clock, and
//! the reflector against a stand-in API server that goes silent.

use std::convert::Infallible;

use super::*;
use std::sync::atomic::AtomicU64;

fn row(ns: &str, name: &str, uid: &str, sa: &str, node: &str, running: bool) -> PodRow {
    PodRow {
        namespace: ns.into(),
        name: name.into(),
        uid: uid.into(),
        service_account: sa.into(),
        node: Some(node.into()),
        running,
        deleted_at: None,
    }
}

#[test]
fn a_pod_being_deleted_vouches_for_a_minute_and_never_for_its_node() {
    let cache = ClusterCache::new(CacheOptions::default(), &Registry::new()).unwrap();
    let now = std::time::SystemTime::now();
    let mut terminating = row("a", "t", "u1", "web", "n1", false);
    terminating.deleted_at = Some(now - Duration::from_secs(30));
    let mut stuck = row("a", "s", "u2", "web", "n1", false);
    stuck.deleted_at = Some(now - Duration::from_secs(61));
    cache.apply_pods(Change::Reset(vec![terminating, stuck]));
    assert!(
        cache.pod("a", "t").is_some(),
        "within the API server's leeway"
    );
    assert!(
        cache.pod("a", "s").is_none(),
        "deleted more than a minute ago"
    );
    assert!(!cache.runs_on_node("n1", "a", "web"));
    assert!(!cache.runs_anywhere("a", "web"));
}

#[test]
fn the_node_index_follows_moves_finishes_and_deletions() {
    let mut p = Pods::default();
    p.upsert(row("a", "web-1", "u1", "web", "n1", true));
    p.upsert(row("a", "web-2", "u2", "web", "n1", true));
    let on = |p: &Pods, node: &str| {
        p.on_node
            .get(node)
            .and_then(|m| m.get(&(Arc::from("a"), Arc::from("web"))))
            .copied()
    };
    assert_eq!(on(&p, "n1"), Some(2));
    p.remove("a", "web-1");
    assert_eq!(on(&p, "n1"), Some(1));
    // Finished pods vouch for nothing on their node.
    p.upsert(row("a", "web-2", "u2", "web", "n1", false));
    assert_eq!(on(&p, "n1"), None);
    assert!(p.on_node.is_empty());
    // Recreated elsewhere under the same name.
    p.upsert(row("a", "web-2", "u3", "web", "n2", true));
    assert_eq!(on(&p, "n2"), Some(1));
    assert_eq!(p.by_name.len(), 1);
    p.reset(vec![row("a", "x", "u4", "web", "n3", true)]);
    assert_eq!(on(&p, "n2"), None);
    assert_eq!(on(&p, "n3"), Some(1));
}

#[tokio::test(start_paused = true)]
async fn a_broken_watch_is_tolerated_for_a_while_then_refused() {
    let registry = Registry::new();
    let opts = CacheOptions {
        max_stale: Duration::from_secs(60),
        ready_grace: Duration::from_secs(5),
        ..CacheOptions::default()
    };
    let cache = ClusterCache::new(opts, &registry).unwrap();
    assert!(!cache.synced());
    assert!(cache.ready().is_err());
    cache.apply_pods(Change::Reset(vec![row("a", "p", "u", "web", "n", true)]));
    cache.apply_pods(Change::Fresh(Freshen::Synced(Duration::ZERO)));
    cache.apply_sas(Change::Reset(vec![SaRow {
        namespace: "a".into(),
        name: "web".into(),
        uid: "s".into(),
    }]));
    assert!(!cache.synced(), "both kinds must have synced");
    cache.apply_sas(Change::Fresh(Freshen::Synced(Duration::ZERO)));
    assert!(cache.synced());
    assert!(cache.ready().is_ok());
    assert_eq!(cache.service_account_uid("a", "web").as_deref(), Some("s"));
    assert!(cache.runs_on_node("n", "a", "web"));

    cache.apply_pods(Change::Fresh(Freshen::Broken("watch")));
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(
        cache.ready().is_err(),
        "readiness turns false after the grace"
    );
    assert!(cache.synced(), "lookups still answer");
    tokio::time::advance(Duration::from_secs(60)).await;
    assert!(!cache.synced(), "past max_stale the cache is not used");
    cache.apply_pods(Change::Fresh(Freshen::Healthy));
    assert!(cache.synced() && cache.ready().is_ok());
    assert_eq!(cache.lookups(), (1, 0));
}

fn synced_cache(opts: CacheOptions) -> Arc<ClusterCache> {
    let cache = ClusterCache::new(opts, &Registry::new()).unwrap();
    cache.apply_pods(Change::Reset(vec![row("a", "p", "u", "web", "n", true)]));
    cache.apply_pods(Change::Fresh(Freshen::Synced(Duration::ZERO)));
    cache.apply_sas(Change::Reset(Vec::new()));
    cache.apply_sas(Change::Fresh(Freshen::Synced(Duration::ZERO)));
    assert!(cache.ready().is_ok() && cache.synced());
    cache
}

#[tokio::test(start_paused = true)]
async fn a_silent_watch_is_broken_since_the_last_word_heard() {
    let cache = synced_cache(CacheOptions {
        max_stale: Duration::from_secs(60),
        ready_grace: Duration::from_secs(5),
        ..CacheOptions::default()
    });
    let heard = Instant::now();
    tokio::time::advance(Duration::from_secs(70)).await;
    assert!(cache.ready().is_ok(), "nothing reported yet");
    cache.apply_pods(Change::Fresh(Freshen::Silent(heard)));
    assert!(cache.ready().is_err(), "past the grace at once");
    assert!(!cache.synced(), "70 s since the last word: past max_stale");
    cache.apply_pods(Change::Fresh(Freshen::Healthy));
    assert!(cache.ready().is_ok() && cache.synced());

    // A break already known stands: a later silence does not move it on.
    cache.apply_sas(Change::Fresh(Freshen::Broken("watch")));
    tokio::time::advance(Duration::from_secs(3)).await;
    cache.apply_sas(Change::Fresh(Freshen::Silent(Instant::now())));
    assert!(cache.ready().is_ok(), "broken 3 s ago, within the grace");
    tokio::time::advance(Duration::from_secs(3)).await;
    assert!(cache.ready().is_err(), "broken 6 s ago");
}

/// How the stand-in answers watches.
#[derive(Clone, Copy, PartialEq)]
enum Silence {
    /// Headers, then nothing: not an event, not the end.
    Stream,
    /// Not even the headers.
    Start,
    /// Lists are not answered either.
    List,
}

type Answer = http::Response<http_body_util::combinators::BoxBody<hyper::body::Bytes, Infallible>>;
fn list_answer(path: &str) -> Answer {
    use http_body_util::BodyExt;
    let body = if path.ends_with("/pods") {
        serde_json::json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "10"}, "items": [
            {"metadata": {"name": "p", "namespace": "a", "uid": "u"},
             "spec": {"serviceAccountName": "web", "nodeName": "n", "containers": []},
             "status": {"phase": "Running"}}]})
    } else {
        serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccountList", "metadata": {"resourceVersion": "10"}, "items": [
            {"metadata": {"name": "web", "namespace": "a", "uid": "s"}}]})
    };
    http::Response::builder()
        .header("content-type", "application/json")
        .body(
            http_body_util::Full::new(hyper::body::Bytes::from(body.to_string()))
                .map_err(|e| match e {})
                .boxed(),
        )
        .unwrap()
}

/// Requests a stand-in received: (lists, watches).
type Seen = Arc<[AtomicU64; 2]>;

/// A client of a stand-in API server that lists one pod and one service
/// account and then goes silent on every watch (or every list); and the
/// requests it received.
fn silent_server(silence: Silence) -> (kube::Client, Seen) {
    use http_body_util::BodyExt;
    let seen: Seen = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let counts = seen.clone();
    let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        let seen = counts.clone();
        async move {
            let query = req.uri().query().unwrap_or("").to_owned();
            if !query.contains("watch=true") {
                seen[0].fetch_add(1, Ordering::SeqCst);
                if silence == Silence::List {
                    std::future::pending::<()>().await;
                }
                return Ok::<_, Infallible>(list_answer(req.uri().path()));
            }
            seen[1].fetch_add(1, Ordering::SeqCst);
            if silence == Silence::Start {
                std::future::pending::<()>().await;
            }
            let never = tokio_stream::pending::<
                Result<hyper::body::Frame<hyper::body::Bytes>, Infallible>,
            >();
            Ok(http::Response::builder()
                .body(http_body_util::StreamBody::new(never).boxed())
                .unwrap())
        }
    });
    (kube::Client::new(svc, "default"), seen)
}

/// Sleeps (on the paused clock) until `f`, checking every 100 ms, at most
/// `limit`.
async fn until(limit: Duration, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_watch_that_brings_nothing_or_never_starts_counts_as_broken() {
    for silence in [Silence::Stream, Silence::Start] {
        let (client, seen) = silent_server(silence);
        let opts = CacheOptions {
            max_stale: Duration::from_secs(300),
            ready_grace: Duration::from_secs(5),
            watch_timeout: 60,
            request_timeout: Duration::from_secs(30),
            ..CacheOptions::default()
        };
        let cache = ClusterCache::new(opts, &Registry::new()).unwrap();
        let (stop, rx) = watch::channel(false);
        let tasks = cache.spawn(client, rx);
        until(Duration::from_secs(1), || cache.ready().is_ok()).await;
        let synced = Instant::now();
        assert_eq!(cache.len(), (1, 1));
        // Broken from the last word (the watch's start) once the watch
        // has brought nothing for its timeout plus the margin; or, when
        // it never starts, from the request timeout.
        let noticed = match silence {
            Silence::Stream => Duration::from_secs(60) + WATCH_IDLE_MARGIN,
            Silence::Start => Duration::from_secs(30) + Duration::from_secs(5),
            Silence::List => unreachable!(),
        };
        tokio::time::sleep(noticed - Duration::from_secs(1)).await;
        assert!(cache.ready().is_ok(), "{}: still within", noticed.as_secs());
        until(Duration::from_secs(2), || cache.ready().is_err()).await;
        let took = synced.elapsed();
        assert!(took <= noticed + Duration::from_secs(1), "{took:?}");
        assert!(cache.synced(), "lookups still answer within max_stale");
        let tried = || seen[1].load(Ordering::SeqCst);
        assert!(tried() >= 2, "each watch tried again: {}", tried());
        until(Duration::from_secs(400), || !cache.synced()).await;
        assert!(tried() >= 4, "and again: {}", tried());
        stop.send_replace(true);
        for (_, task) in tasks {
            task.await.unwrap();
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_list_that_never_answers_is_tried_again() {
    let (client, seen) = silent_server(Silence::List);
    let opts = CacheOptions {
        request_timeout: Duration::from_secs(30),
        ..CacheOptions::default()
    };
    let cache = ClusterCache::new(opts, &Registry::new()).unwrap();
    let (stop, rx) = watch::channel(false);
    let tasks = cache.spawn(client, rx);
    let lists = || seen[0].load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(lists(), 2, "one list per kind, waiting");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(lists(), 4, "each timed out and was tried again");
    assert!(!cache.synced() && cache.ready().is_err());
    stop.send_replace(true);
    for (_, task) in tasks {
        task.await.unwrap();
    }
}
