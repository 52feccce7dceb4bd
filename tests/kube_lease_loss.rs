//! A replica that loses its API server, then its Lease (issue 11): two real
//! `ca server --kube` replicas, each reaching the fake API server through a
//! proxy of its own that connects from its own loopback address (A from
//! 127.0.0.2, B from 127.0.0.3), so the fake's request log (the audit log's
//! `sourceIPs`) tells which replica made each write, and when it landed.
//!
//! A leads and does the single-writer work (secret mode's `istio.<sa>`
//! Secrets, the root ConfigMap, the ClusterTrustBundle, PodCertificateRequest
//! statuses). Then only A is cut off, three ways:
//!
//! - **refused**: A's proxy closes every connection and stops listening
//!   (connection refused), as when the API server's endpoint is gone;
//! - **silent**: nothing is forwarded and nothing closed (no FIN, no RST),
//!   what is sent is lost, new connections are accepted and never answered;
//! - **stalled**: a partition as TCP lives it: nothing moves, nothing is
//!   lost; when the partition heals, every byte sent during it (requests A
//!   made while it still led, included) is delivered late.
//!
//! In each: A keeps signing from its caches (every chain verified by
//! rustls-webpki); A steps down before B takes over; every write of
//! single-writer work A makes after its step-down that reaches the API
//! server is refused there (none at all unless the partition delivered
//! them late; they are conditional writes); B does the work that appears
//! during the cut and after; each object is written successfully once; when
//! A is back it stays a follower and turns (or stays) ready. In the refused
//! case A also reports not ready during the cut (a silent API server is
//! noticed only by the watches' idle timeout, 65 s, longer than these cuts;
//! `tests/kube_ready.rs` covers that).
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use common::fakekube::RequestRecord;
use common::fakekube::kubelet::{self, KeyType, KubeletKey, PodRef, RequestOptions};
use common::kubeca::{CA_NS, KubeCluster, issue, leaf_ids, wait_ready, within};
use common::procs::CaProc;
use common::{ders, http_get, leaf_facts, webpki_verify};

const READY: Duration = Duration::from_secs(30);
const SIGNER: &str = "workload-ca.io/spiffe";
const CTB: &str = "workload-ca.io:spiffe:primary";
/// `--lease-duration`; the renew deadline is 2/3 of it.
const LEASE: Duration = Duration::from_secs(3);
const ARGS: [&str; 10] = [
    "--pod-certificates",
    "--cluster-trust-bundle",
    "--secret-mode-namespaces",
    "team=mesh",
    "--root-configmap-namespaces",
    "team=mesh",
    "--bundle-propagation",
    "1s",
    "--lease-duration",
    "3s",
];
const LEADING: &str = "leading: single-writer work runs here";
const STEPPED_DOWN: &str = "no longer leading";
const A_SOURCE: &str = "127.0.0.2";
const B_SOURCE: &str = "127.0.0.3";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Pass,
    /// Listener closed, connections closed: connection refused.
    Refuse,
    /// Nothing forwarded, what arrives dropped, nothing closed.
    Silent,
    /// Nothing forwarded, nothing lost: delivered when the mode changes.
    Stall,
}

/// A TCP proxy in front of the fake for one replica, connecting from
/// `source`, that can cut that replica off in one of the [`Mode`]s.
struct Cut {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    task: JoinHandle<()>,
}

impl Cut {
    async fn start(target: SocketAddr, source: IpAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, rx) = watch::channel(Mode::Pass);
        let task = tokio::spawn(serve(listener, addr, target, source, rx));
        Self { addr, mode, task }
    }

    fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    listener: TcpListener,
    addr: SocketAddr,
    target: SocketAddr,
    source: IpAddr,
    mut mode: watch::Receiver<Mode>,
) {
    let mut listener = Some(listener);
    // Held (never closed) connections of the silent mode.
    let mut held = Vec::new();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let now = *mode.borrow_and_update();
        if now == Mode::Refuse {
            // Every connection closed, nobody listening.
            listener = None;
            conns.abort_all();
            held.clear();
            if mode.changed().await.is_err() {
                return;
            }
            continue;
        }
        if listener.is_none() {
            // Back on the same port (tokio sets SO_REUSEADDR).
            let mut tries = 0;
            listener = loop {
                match TcpListener::bind(addr).await {
                    Ok(l) => break Some(l),
                    Err(e) => {
                        tries += 1;
                        assert!(tries < 100, "rebinding {addr}: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            };
        }
        let l = listener.as_ref().unwrap();
        let accepted = tokio::select! {
            a = l.accept() => a,
            r = mode.changed() => { if r.is_err() { return } continue; }
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Ok((client, _)) = accepted else { continue };
        if now == Mode::Silent {
            held.push(client);
            continue;
        }
        conns.spawn(connect(client, target, source, mode.clone()));
    }
}

/// One proxied connection; while stalled, the connection to the fake is
/// made only once the stall ends (a SYN retransmitted). Aborting it closes
/// both sides.
async fn connect(
    client: TcpStream,
    target: SocketAddr,
    source: IpAddr,
    mut mode: watch::Receiver<Mode>,
) {
    while *mode.borrow_and_update() == Mode::Stall {
        if mode.changed().await.is_err() {
            return;
        }
    }
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let Ok(server) = socket.connect(target).await else {
        return;
    };
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let mut both = tokio::task::JoinSet::new();
    both.spawn(pump(cr, sw, mode.clone()));
    both.spawn(pump(sr, cw, mode));
    while both.join_next().await.is_some() {}
}

/// Copies `from` to `to` as the mode says: silent drops, stalled holds
/// (then delivers), an end of stream is not passed on while cut.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut mode: watch::Receiver<Mode>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        // Stalled: hold it until the partition heals.
        while *mode.borrow_and_update() == Mode::Stall {
            if mode.changed().await.is_err() {
                return;
            }
        }
        let now = *mode.borrow();
        if n == 0 {
            if now == Mode::Silent {
                std::future::pending::<()>().await;
            }
            let _ = to.shutdown().await;
            return;
        }
        if now == Mode::Silent {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// `ca server --kube` named `name`, reaching the fake through `proxy`.
fn start_ca(k: &KubeCluster, name: &str, proxy: SocketAddr) -> CaProc {
    let yaml = std::fs::read_to_string(&k.kubeconfig)
        .unwrap()
        .replace(&k.fake.url(), &format!("https://{proxy}"));
    assert!(yaml.contains(&proxy.to_string()));
    let kubeconfig = k.dir.path().join(format!("{name}.kubeconfig"));
    std::fs::write(&kubeconfig, yaml).unwrap();
    let kc = kubeconfig.to_str().unwrap();
    let mut args = vec!["--kube", "--kubeconfig", kc, "--kube-namespace", CA_NS];
    args.extend_from_slice(&ARGS);
    CaProc::start_plain(&k.dir.path().join(name), &args, &[])
}

/// How long after `since` the first log line saying `what` was written.
fn logged_at(ca: &CaProc, what: &str, since: SystemTime) -> Option<Duration> {
    let log = ca.log_text();
    let line = log.lines().find(|l| l.contains(what))?;
    let stamp = line.split_whitespace().next()?;
    let t = time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{stamp:?} in {line:?}: {e}"));
    let t = SystemTime::from(t);
    Some(
        t.duration_since(since)
            .unwrap_or_else(|e| panic!("{what:?} logged {:?} before the cut", e.duration())),
    )
}

fn count(ca: &CaProc, what: &str) -> usize {
    ca.log_text().matches(what).count()
}

/// A write (any verb that changes something).
fn is_write(r: &RequestRecord) -> bool {
    matches!(
        r.verb.as_str(),
        "create" | "update" | "patch" | "delete" | "deletecollection"
    )
}

/// Writes every replica makes whether it leads or not: its own evidence
/// report (a leader's deletion of a spent one is single-writer), and the
/// CA Secret (compare-and-swap, any replica).
fn is_shared_work(r: &RequestRecord) -> bool {
    r.namespace == CA_NS
        && ((r.resource == "configmaps"
            && name(r).starts_with("workload-ca-evidence-")
            && r.verb != "delete")
            || (r.resource == "secrets" && name(r) == "istio-ca-secret"))
}

fn single_writer_writes(k: &KubeCluster) -> Vec<RequestRecord> {
    k.fake
        .requests()
        .into_iter()
        .filter(|r| is_write(r) && !is_shared_work(r))
        .collect()
}

fn from(r: &RequestRecord, source: &str) -> bool {
    r.source == Some(source.parse().unwrap())
}

/// The object's name (a create's from the object).
fn name(r: &RequestRecord) -> &str {
    if r.name.is_empty() {
        &r.created
    } else {
        &r.name
    }
}

fn show(r: &RequestRecord) -> String {
    format!(
        "{:?} {} {} {}/{}{} -> {}",
        r.source,
        r.verb,
        r.resource,
        r.namespace,
        name(r),
        if r.subresource.is_empty() {
            String::new()
        } else {
            format!("/{}", r.subresource)
        },
        r.code
    )
}

fn b64(v: &Value) -> String {
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or(""))
            .unwrap_or_default(),
    )
    .unwrap_or_default()
}

/// PodCertificateRequests created as the kubelet would; their names and keys.
fn new_requests(k: &KubeCluster, prefix: &str, n: usize) -> Vec<(String, KubeletKey)> {
    (0..n)
        .map(|i| {
            let key = KubeletKey::generate(KeyType::EcdsaP256);
            let body = kubelet::request(
                "v1",
                SIGNER,
                &PodRef::new("shop", &format!("{prefix}-{i}"), "web"),
                &key,
                &RequestOptions::default(),
            );
            let made = k.fake.create_json(body).unwrap();
            (made["metadata"]["name"].as_str().unwrap().to_string(), key)
        })
        .collect()
}

/// How many of `reqs` have a condition.
fn answered(k: &KubeCluster, reqs: &[(String, KubeletKey)]) -> usize {
    reqs.iter()
        .filter(|(n, _)| {
            k.fake
                .get_json("podcertificaterequests", "shop", n)
                .is_some_and(|o| o.pointer("/status/conditions/0").is_some())
        })
        .count()
}

/// Waits until every request is Issued; checks each chain with webpki.
async fn issued(k: &KubeCluster, reqs: &[(String, KubeletKey)], root: &str, limit: Duration) {
    within(limit, || async {
        (answered(k, reqs) == reqs.len()).then_some(())
    })
    .await;
    for (n, key) in reqs {
        let o = k
            .fake
            .get_json("podcertificaterequests", "shop", n)
            .unwrap();
        assert_eq!(o["status"]["conditions"][0]["type"], "Issued", "{n}: {o}");
        let mut chain: Vec<String> = ders(o["status"]["certificateChain"].as_str().unwrap())
            .into_iter()
            .map(|d| workload_ca::ca::bundle::to_pem("CERTIFICATE", &d))
            .collect();
        chain.push(root.to_string());
        webpki_verify(&chain);
        assert_eq!(leaf_facts(&chain[0]).spki, key.spki_der, "{n}");
    }
}

/// Waits for secret mode's `istio.<sa>` Secret; checks its chain.
async fn secret_for(k: &KubeCluster, sa: &str, root: &str, limit: Duration) {
    let name = format!("istio.{sa}");
    let (s, _) = within(limit, || async {
        k.fake.get_json("secrets", "mesh-0", &name)
    })
    .await;
    let mut chain: Vec<String> = ders(&b64(&s["data"]["cert-chain.pem"]))
        .into_iter()
        .map(|d| workload_ca::ca::bundle::to_pem("CERTIFICATE", &d))
        .collect();
    chain.push(b64(&s["data"]["root-cert.pem"]));
    assert_eq!(b64(&s["data"]["root-cert.pem"]).trim(), root.trim());
    webpki_verify(&chain);
    assert_eq!(
        leaf_facts(&chain[0]).uris,
        [format!("spiffe://cluster.local/ns/mesh-0/sa/{sa}")]
    );
}

async fn scenario(mode: Mode) {
    let k = KubeCluster::start().await;
    k.workload("prod", "web", "web-1", "node-a");
    k.fake.create_namespace("shop");
    k.fake
        .create_json(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "mesh-0", "labels": {"team": "mesh"}}}))
        .unwrap();
    for i in 0..5 {
        k.fake.create_service_account("mesh-0", &format!("app-{i}"));
    }
    let pa = Cut::start(k.fake.addr(), A_SOURCE.parse().unwrap()).await;
    let pb = Cut::start(k.fake.addr(), B_SOURCE.parse().unwrap()).await;
    let a = start_ca(&k, "a", pa.addr);
    wait_ready(&a, READY).await;
    within(Duration::from_secs(10), || async {
        (count(&a, LEADING) == 1).then_some(())
    })
    .await;
    let b = start_ca(&k, "b", pb.addr);
    wait_ready(&b, READY).await;
    let root = a.root_pem();
    assert_eq!(b.root_pem(), root);

    // A does the single-writer work.
    let before = new_requests(&k, "before", 10);
    issued(&k, &before, &root, Duration::from_secs(20)).await;
    for sa in ["default", "app-0", "app-4"] {
        secret_for(&k, sa, &root, Duration::from_secs(20)).await;
    }
    within(Duration::from_secs(20), || async {
        let cm = k
            .fake
            .get_json("configmaps", "mesh-0", "istio-ca-root-cert")?;
        let ctb = k.fake.get_json("clustertrustbundles", "", CTB)?;
        (cm["data"]["root-cert.pem"].as_str()?.trim() == root.trim()
            && ctb["spec"]["trustBundle"].as_str()?.trim() == root.trim())
        .then_some(())
    })
    .await;
    let token = k.pod_token("prod", "web", "web-1");
    webpki_verify(&issue(&a, &token, None).await.unwrap());
    let early = single_writer_writes(&k);
    assert!(
        !early.is_empty() && early.iter().all(|r| from(r, A_SOURCE)),
        "A alone did the single-writer work: {:?}",
        early.iter().map(show).collect::<Vec<_>>()
    );
    assert_eq!(count(&b, LEADING), 0, "B follows");

    // Cut A off while it is answering a burst (its writes in flight), B
    // staying connected.
    let edge = new_requests(&k, "edge", 40);
    within(Duration::from_secs(20), || async {
        (answered(&k, &edge) >= 3).then_some(())
    })
    .await;
    pa.set(mode);
    let cut = Instant::now();
    let cut_wall = SystemTime::now();
    // Work that appears during the cut: B must do it once it leads.
    k.fake.create_service_account("mesh-0", "late-1");
    let during = new_requests(&k, "during", 5);

    let mut stepped_down = None;
    let mut took_over = None;
    let mut signed = 0;
    let mut not_ready = None;
    let mut sign_errors = Vec::new();
    // The cut lasts until A stepped down, B took over and did the new
    // work, and (refused) A reports not ready; bounded.
    let limit = Duration::from_secs(40);
    loop {
        let at = cut.elapsed();
        // Timed by the replicas' own log lines (the same clock), not by
        // this loop's polls.
        if stepped_down.is_none() {
            stepped_down = logged_at(&a, STEPPED_DOWN, cut_wall);
        }
        if took_over.is_none() {
            took_over = logged_at(&b, LEADING, cut_wall);
        }
        match issue(&a, &token, None).await {
            Ok(chain) => {
                webpki_verify(&chain);
                assert_eq!(leaf_ids(&chain), ["spiffe://cluster.local/ns/prod/sa/web"]);
                signed += 1;
            }
            Err(e) => sign_errors.push(e.to_string()),
        }
        if not_ready.is_none() && http_get(a.ops, "/readyz").await.0 != 200 {
            not_ready = Some(cut.elapsed());
        }
        let b_done = took_over.is_some()
            && k.fake
                .get_json("secrets", "mesh-0", "istio.late-1")
                .is_some()
            && answered(&k, &during) == during.len()
            && answered(&k, &edge) == edge.len();
        let ready_seen = mode != Mode::Refuse || not_ready.is_some();
        if stepped_down.is_some() && b_done && ready_seen {
            break;
        }
        assert!(
            at < limit,
            "{mode:?}: after {at:?}: stepped down {stepped_down:?}, B took over {took_over:?}, \
             B did the new work: {b_done}, A not ready {not_ready:?}\nA's log:\n{}\nB's log:\n{}",
            a.log_text(),
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stepped_down = stepped_down.unwrap();
    let took_over = took_over.unwrap();
    let stepdown_at = cut + stepped_down;
    let cut_for = cut.elapsed();
    assert!(
        sign_errors.is_empty(),
        "{mode:?}: A refused to sign during the cut: {sign_errors:?}"
    );
    assert!(
        stepped_down < took_over,
        "{mode:?}: A stepped down {stepped_down:?} after the cut, B led from {took_over:?}: both led"
    );
    issued(&k, &edge, &root, Duration::from_secs(5)).await;
    issued(&k, &during, &root, Duration::from_secs(5)).await;
    secret_for(&k, "late-1", &root, Duration::from_secs(5)).await;

    // A's connection returns: it follows, it is ready, B keeps the work.
    pa.set(Mode::Pass);
    let healed = Instant::now();
    wait_ready(&a, Duration::from_secs(90)).await;
    let ready_after = healed.elapsed();
    k.fake.create_service_account("mesh-0", "late-2");
    let after = new_requests(&k, "after", 5);
    issued(&k, &after, &root, Duration::from_secs(20)).await;
    secret_for(&k, "late-2", &root, Duration::from_secs(20)).await;
    webpki_verify(&issue(&a, &token, None).await.unwrap());
    // Room for anything A still had queued to land.
    tokio::time::sleep(LEASE).await;
    assert_eq!(count(&a, LEADING), 1, "{mode:?}: A led again");
    assert_eq!(count(&b, LEADING), 1);

    let writes = single_writer_writes(&k);
    let late: Vec<&RequestRecord> = writes
        .iter()
        .filter(|r| from(r, A_SOURCE) && r.at > stepdown_at)
        .collect();
    println!(
        "{mode:?}: A's writes that reached the API server after its step-down: {:?}",
        late.iter().map(|r| show(r)).collect::<Vec<_>>()
    );
    for r in &late {
        assert!(
            mode == Mode::Stall && r.code >= 400,
            "{mode:?}: A wrote after its step-down: {}",
            show(r)
        );
    }
    // One writer at a time: every successful write of A's before every one
    // of B's.
    let ok = |r: &&RequestRecord| r.code < 300;
    let last_a = writes
        .iter()
        .filter(ok)
        .filter(|r| from(r, A_SOURCE))
        .map(|r| r.at)
        .max()
        .unwrap();
    let first_b = writes
        .iter()
        .filter(ok)
        .filter(|r| from(r, B_SOURCE))
        .map(|r| r.at)
        .min()
        .expect("B did work");
    assert!(
        last_a < first_b,
        "{mode:?}: A and B wrote in the same period"
    );
    assert!(first_b > stepdown_at);
    // Each object written successfully once (nothing changed twice), Lease
    // aside.
    let mut per_object = std::collections::BTreeMap::new();
    for r in writes.iter().filter(ok).filter(|r| r.resource != "leases") {
        *per_object
            .entry(format!(
                "{}/{}/{}/{}",
                r.resource,
                r.namespace,
                name(r),
                r.subresource
            ))
            .or_insert(0) += 1;
    }
    let twice: Vec<_> = per_object.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "{mode:?}: written more than once: {twice:?}"
    );
    for (n, _) in before.iter().chain(&edge).chain(&during).chain(&after) {
        assert_eq!(
            per_object.get(&format!("podcertificaterequests/shop/{n}/status")),
            Some(&1),
            "{n}"
        );
    }
    let refused_late = late.len();
    println!(
        "{mode:?}: A stepped down {stepped_down:?} after the cut, B led {took_over:?} after it \
         (Lease {LEASE:?}); A signed {signed} certificates from its caches during the {cut_for:?} cut \
         (not ready after {not_ready:?}); ready again {ready_after:?} after its connection returned; \
         {} single-writer writes, {refused_late} of A's refused after its step-down",
        writes.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_refused_by_its_api_server_steps_down_and_writes_nothing_twice() {
    scenario(Mode::Refuse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_api_server_goes_silent_steps_down_and_writes_nothing_twice() {
    scenario(Mode::Silent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_partitioned_from_its_api_server_steps_down_and_late_writes_are_refused() {
    scenario(Mode::Stall).await;
}
