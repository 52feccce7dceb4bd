//! Readiness of a `ca server --kube` replica that loses the API server:
//! it turns not ready (so load balancers prefer replicas that see the
//! cluster) but keeps signing for tokens its watch caches can vouch for,
//! and turns ready again once the API server is back.
//!
//! The fake's `set_down` closes every connection, which a client notices
//! at once. An API server that goes *silent* instead (its host gone, a
//! partition: nothing closed) is played by [`Blackhole`], a proxy that
//! stops forwarding: the watch caches and the client must notice that by
//! their own clocks.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use workload_ca::ca::KeyStore;
use workload_ca::ca::keystore::{RootSpec, load_or_create};
use workload_ca::ca::policy::ClusterView;
use workload_ca::identity::TrustDomain;
use workload_ca::k8s::cache::{CacheOptions, ClusterCache};
use workload_ca::k8s::client::{self, ClientOptions};
use workload_ca::k8s::store::SecretStore;

use common::fakekube::FakeKube;
use common::kubeca::{KubeCluster, issue, leaf_ids, wait_ready, within};
use common::{http_get, webpki_verify};

const READY: Duration = Duration::from_secs(30);
/// The watch caches' default `ready_grace` (`k8s::cache::CacheOptions`).
const GRACE: Duration = Duration::from_secs(10);
/// Slack for the caches to notice and for the poll.
const SLACK: Duration = Duration::from_secs(5);
const SECRET_WATCH_DOWN: &str = "the CA Secret's watch has not been live";
const CACHE_DOWN: &str = "watch cache is not synced";

async fn readyz(ca: &common::procs::CaProc) -> (u16, String) {
    http_get(ca.ops, "/readyz").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_its_api_server_is_not_ready_but_keeps_signing_from_its_caches() {
    let k = KubeCluster::start().await;
    k.workload("prod", "web", "web-1", "node-a");
    let ca = k.start_ca("ca", &[]);
    wait_ready(&ca, READY).await;
    let token = k.pod_token("prod", "web", "web-1");
    issue(&ca, &token, None)
        .await
        .expect("issued with the API up");

    k.fake.set_down(true);
    let down = Instant::now();
    // The CA Secret's watch and the caches are lost at once; readiness
    // says so after their 10 s grace.
    let (body, _) = within(GRACE + SLACK, || async {
        let (code, body) = readyz(&ca).await;
        (code != 200).then_some(body)
    })
    .await;
    let not_ready = down.elapsed();
    assert!(
        body.contains(SECRET_WATCH_DOWN) || body.contains(CACHE_DOWN),
        "{body}"
    );
    // The watch caches follow once their grace has passed.
    within(GRACE + SLACK, || async {
        let (code, body) = readyz(&ca).await;
        assert_ne!(code, 200, "ready again while the API server is down");
        body.contains(CACHE_DOWN).then_some(())
    })
    .await;
    let caches_behind = down.elapsed();
    println!(
        "API server down: /readyz not ready after {not_ready:?} ({}), the caches' check after {caches_behind:?}",
        body.trim()
    );
    assert!(
        caches_behind + Duration::from_secs(1) >= GRACE,
        "the caches were reported behind before their grace: {caches_behind:?}"
    );

    // Signing goes on: the token is checked against the issuer's keys and
    // the caches, with no API call (max_stale is 5 minutes).
    for _ in 0..5 {
        let chain = issue(&ca, &token, None)
            .await
            .expect("issued from the caches while the API server is down");
        webpki_verify(&chain);
        assert_eq!(leaf_ids(&chain), ["spiffe://cluster.local/ns/prod/sa/web"]);
    }
    let (code, _) = readyz(&ca).await;
    assert_ne!(code, 200);

    k.fake.set_down(false);
    let up = Instant::now();
    wait_ready(&ca, Duration::from_secs(60)).await;
    println!(
        "API server back after {:?} down: ready again after {:?}",
        up - down,
        up.elapsed()
    );
    let chain = issue(&ca, &token, None).await.expect("issued once back");
    webpki_verify(&chain);
}

/// A TCP proxy in front of the fake that can go silent: while silent it
/// forwards nothing in either direction and closes nothing (the API
/// server's host gone, or a network partition: no FIN, no RST), and new
/// connections are accepted but never answered.
struct Blackhole {
    addr: SocketAddr,
    silent: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Blackhole {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (silent, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            // Held until the proxy stops, so nothing is ever closed.
            let mut held = Vec::new();
            let mut pumps = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if *rx.borrow() {
                    held.push(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                pumps.spawn(pump(cr, sw, rx.clone()));
                pumps.spawn(pump(sr, cw, rx.clone()));
            }
        });
        Self { addr, silent, task }
    }

    fn silence(&self, on: bool) {
        self.silent.send_replace(on);
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` while the proxy is not silent; while it is, what
/// arrives is dropped and an end of stream is not passed on.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, silent: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                if *silent.borrow() {
                    // Keep `to` open: a silent network sends no FIN.
                    std::future::pending::<()>().await;
                }
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if *silent.borrow() {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A client of the fake through `proxy`, made as `ca server --kube` makes
/// its own (a kubeconfig, `k8s::client::client`).
async fn proxied_client(
    fake: &FakeKube,
    proxy: SocketAddr,
    read_timeout: Duration,
) -> kube::Client {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let yaml = fake
        .kubeconfig_yaml(fake.admin_token(), "default")
        .replace(&fake.url(), &format!("https://{proxy}"));
    std::fs::write(&kubeconfig, yaml).unwrap();
    client::client(&ClientOptions {
        kubeconfig: Some(kubeconfig),
        read_timeout,
        ..ClientOptions::default()
    })
    .await
    .unwrap()
}

async fn until(limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// An API server that goes silent (no FIN, no RST: its host gone, or a
/// partition) is noticed too: no watch event or bookmark within the
/// watch's own timeout (plus a margin) counts as a broken watch, so
/// readiness turns false and, past `max_stale`, the caches stop vouching.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_api_server_is_noticed_by_the_watch_caches() {
    let fake = FakeKube::start().await;
    fake.create_namespace("prod");
    fake.create_service_account("prod", "web");
    fake.create_pod("prod", "web-1", "web", None);
    let proxy = Blackhole::start(fake.addr()).await;
    // The caches' own silence detection, not the client's read timeout.
    let client = proxied_client(&fake, proxy.addr, Duration::from_secs(60)).await;
    let registry = prometheus::Registry::new();
    let opts = CacheOptions {
        max_stale: Duration::from_secs(4),
        ready_grace: Duration::from_secs(1),
        watch_timeout: 2,
        request_timeout: Duration::from_secs(2),
        ..CacheOptions::default()
    };
    let cache = ClusterCache::new(opts, &registry).unwrap();
    let (stop, rx) = watch::channel(false);
    let tasks = cache.spawn(client, rx);
    until(READY, || cache.ready().is_ok()).await;
    assert!(cache.pod("prod", "web-1").is_some());

    proxy.silence(true);
    let not_ready = until(Duration::from_secs(30), || cache.ready().is_err()).await;
    let stale = until(Duration::from_secs(30), || !cache.synced()).await;
    println!("silent API server: not ready after {not_ready:?}, caches not used after {stale:?}");
    proxy.silence(false);
    let back = until(Duration::from_secs(60), || {
        cache.ready().is_ok() && cache.synced()
    })
    .await;
    println!("API server answering again: ready after {back:?}");
    assert!(cache.pod("prod", "web-1").is_some());

    stop.send_replace(true);
    for (name, task) in tasks {
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap_or_else(|_| panic!("{name} stops on shutdown"))
            .unwrap();
    }
}

/// A request to an API server that went silent fails within the client's
/// read timeout instead of waiting forever on a pooled connection (the CA
/// Secret's reads and writes, a watch being renewed, the issuer's keys).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_a_silent_api_server_fails_instead_of_waiting_forever() {
    const READ_TIMEOUT: Duration = Duration::from_secs(2);
    let fake = FakeKube::start().await;
    fake.create_namespace("istio-system");
    let proxy = Blackhole::start(fake.addr()).await;
    let store = SecretStore::new(
        proxied_client(&fake, proxy.addr, READ_TIMEOUT).await,
        "istio-system",
        "istio-ca-secret",
    );
    let spec = RootSpec {
        trust_domain: TrustDomain::new("cluster.local").unwrap(),
        algorithm: workload_ca::ca::KeyAlgorithm::EcdsaP256,
        lifetime: Duration::from_secs(86_400),
    };
    let (set, _) = load_or_create(&store, &spec, None, std::time::SystemTime::now())
        .await
        .unwrap();

    proxy.silence(true);
    let start = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(30), store.generation())
        .await
        .expect("the read fails rather than waiting forever");
    let took = start.elapsed();
    let e = got
        .expect_err("no answer from a silent API server")
        .to_string();
    println!("silent API server: the store's read failed after {took:?}: {e}");
    assert!(took >= READ_TIMEOUT, "{took:?}: {e}");

    proxy.silence(false);
    let start = Instant::now();
    loop {
        if let Ok(Ok(g)) = tokio::time::timeout(Duration::from_secs(10), store.generation()).await {
            assert_eq!(g, Some(set.generation()));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the store does not read again"
        );
    }
    println!(
        "answering again: the store reads after {:?}",
        start.elapsed()
    );
}
