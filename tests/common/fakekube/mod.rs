//! An in-process fake Kubernetes API server for the tests.
//!
//! It serves HTTPS on 127.0.0.1 (port 0) with the real URL layout, and is
//! reachable both from the test itself ([`FakeKube::client`], a real
//! `kube::Client` built from a kubeconfig) and from child processes
//! ([`FakeKube::write_kubeconfig`], then `KUBECONFIG`). It runs on a thread
//! of its own, with its own runtime, so a test that blocks (waiting on a
//! child process) does not stall it.
//!
//! Served: core v1 `namespaces`, `nodes`, `serviceaccounts` (+ `token`),
//! `secrets`, `configmaps`, `pods` (+ `status`), `events`, `coordination.k8s.io/v1`
//! `leases`, `authentication.k8s.io/v1` `tokenreviews`,
//! `certificates.k8s.io` `podcertificaterequests` (+ `status`) and
//! `clustertrustbundles` at v1 and/or v1beta1 ([`certificates`]), and the
//! issuer discovery documents. Verbs, errors (as `Status`), watches, paging,
//! selectors, server-side apply, garbage collection and service-account
//! tokens follow the real API server; what does not is listed in
//! [`LIMITS`].
//!
//! Controllers that run beside a real API server run synchronously here,
//! inside the request that makes their work due: the garbage collector,
//! the namespace controller (deleting a namespace deletes its content
//! before the call returns), the serviceaccount and root-CA publisher
//! controllers (each new namespace gets a `default` ServiceAccount and a
//! `kube-root-ca.crt` ConfigMap, unless [`FakeOptions::namespace_controllers`]
//! is off). The namespaces `default`, `kube-system`, `kube-public` and
//! `kube-node-lease` exist from the start.

#![allow(dead_code)]

mod apply;
mod authn;
mod certcrypto;
pub mod certificates;
mod fields;
mod gc;
mod handlers;
mod http;
pub mod kubelet;
mod patch;
mod resources;
mod rules;
mod selectors;
mod store;
mod timefmt;
mod tokens;
mod trustbundles;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

pub use authn::UserInfo;
pub use http::RequestRecord;
pub use tokens::TokenSpec;

use http::{Shared, lock};
use resources::{ALL, Res};
use store::Store;

/// What the fake does not do as the real API server does.
pub const LIMITS: &str = "\
- Only the resources listed in the module documentation are served; no RBAC (every authenticated request is allowed, and logged for later checks); no admission webhooks.
- dryRun is refused (400). Apply bodies must be JSON (YAML that is not JSON is refused). Strategic merge patch is approximated (merge patch, keyed lists merged by key, no $patch directives).
- Field ownership knows a small schema: maps (labels, annotations, data, ...), a few associative lists (containers by name, ownerReferences by uid, ...), finalizers as a set; every other list is atomic.
- Pods are deleted at once (no graceful termination: no kubelet); pods are not garbage-collected when their node goes.
- Garbage collection, namespace deletion and the per-namespace default ServiceAccount / kube-root-ca.crt run synchronously.
- Lists are served from the history (exact at any resourceVersion still in it); limit is honoured even with resourceVersion=0.
- Validation covers names, labels, Secret/ConfigMap keys, sizes, types and immutability, the pod spec's required fields and update restrictions, Lease durations; not every rule of the real validators.
- JSON only: a protobuf or CBOR request body is refused (415), so kubectl's typed commands (e.g. `create secret generic`) fail while `create -f`/`apply` work; no OpenAPI documents (kubectl needs --validate=false).
- core/v1 Events are validated as the real server does for that version (legacyValidateEvent only, names as path segments); there is no events.k8s.io API, no TTL (events are never deleted by age) and no count aggregation.
- Token checks use the real order and messages, but TokenReview error strings are only as close as the fake can tell (\"[invalid bearer token, ...]\").
- certificates.k8s.io: no RBAC, so neither the `sign` (status writes) nor the `attest` (ClusterTrustBundles with a signer name) check on `signers`, and no node restriction on PodCertificateRequest creation (the pod, its node and its service account are not looked up). The stub PKCS#10 request is checked for parsing, signature and key type only (not for an empty subject or extensions); messages of the stub path and of user-annotation keys are the fake's own where the real text was not at hand. A main-resource update of a legacy (pkixPublicKey) request through v1 keeps the v1beta1-only fields (the real server would lose them in conversion). ClusterTrustBundle updates re-parse an unchanged trustBundle. Public keys are compared as DER bytes (Go compares them as keys). No kube-controller-manager: PodCertificateRequests are never cleaned up.";

/// Options fixed at start.
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// `--service-account-issuer` (kubeadm's default).
    pub issuer: String,
    /// `--api-audiences`; empty: the issuer.
    pub api_audiences: Vec<String>,
    /// How often a watch that allows bookmarks gets one (the real server:
    /// about a minute).
    pub bookmark_interval: Duration,
    /// Events kept for watches and paged lists.
    pub history_limit: usize,
    /// The `default` ServiceAccount and `kube-root-ca.crt` ConfigMap in
    /// every new namespace.
    pub namespace_controllers: bool,
    /// `--service-account-extend-token-expiration`.
    pub extend_token_expiration: bool,
    /// Which versions of certificates.k8s.io (PodCertificateRequests,
    /// ClusterTrustBundles) are served.
    pub certificates: certificates::CertVersions,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            issuer: "https://kubernetes.default.svc.cluster.local".into(),
            api_audiences: Vec::new(),
            bookmark_interval: Duration::from_secs(60),
            history_limit: 100_000,
            namespace_controllers: true,
            extend_token_expiration: true,
            certificates: certificates::CertVersions::BOTH,
        }
    }
}

/// A running fake API server. Dropping it stops it.
pub struct FakeKube {
    shared: Arc<Shared>,
    addr: SocketAddr,
    ca_pem: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("random");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A CA and a serving certificate for 127.0.0.1, localhost and the
/// in-cluster names: (CA PEM, chain, key).
fn serving_tls() -> (
    String,
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fakekube-ca");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec![
        "127.0.0.1".to_string(),
        "localhost".into(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
        "kubernetes.default.svc.cluster.local".into(),
    ])
    .expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kube-apiserver");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca).expect("leaf");
    let chain = vec![cert.der().clone()];
    let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    (ca.pem(), chain, key_der)
}

fn res_named(resource: &str) -> Res {
    ALL.into_iter()
        .find(|r| r.plural() == resource)
        .unwrap_or_else(|| panic!("the fake does not serve {resource:?}"))
}

impl FakeKube {
    /// Starts a fake with the default options.
    pub async fn start() -> Self {
        Self::start_with(FakeOptions::default()).await
    }

    pub async fn start_with(opts: FakeOptions) -> Self {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("fakekube".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("bind 127.0.0.1:0");
                    let addr = listener.local_addr().expect("addr");
                    let (ca_pem, chain, key) = serving_tls();
                    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
                        rustls::crypto::ring::default_provider(),
                    ))
                    .with_safe_default_protocol_versions()
                    .expect("TLS versions")
                    .with_no_client_auth()
                    .with_single_cert(chain, key)
                    .expect("serving certificate");
                    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
                    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
                    let shared = Arc::new(build_shared(&opts, addr, &ca_pem));
                    if ready_tx.send((shared.clone(), addr, ca_pem)).is_err() {
                        return;
                    }
                    http::serve(shared, listener, acceptor, stop_rx).await;
                });
                rt.shutdown_timeout(Duration::from_millis(200));
            })
            .expect("fakekube thread");
        let (shared, addr, ca_pem) = ready_rx.await.expect("fakekube started");
        Self {
            shared,
            addr,
            ca_pem,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The CA that signed the serving certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A bearer token with every right (user `kubernetes-admin`, group
    /// `system:masters`).
    pub fn admin_token(&self) -> &str {
        &self.shared.admin_token
    }

    /// Accepts `token` as the given user from now on.
    pub fn add_user_token(&self, token: &str, username: &str, groups: &[&str]) {
        let mut groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        groups.push("system:authenticated".into());
        lock(&self.shared.static_users).insert(
            token.to_string(),
            UserInfo {
                username: username.into(),
                uid: String::new(),
                groups,
                extra: BTreeMap::new(),
            },
        );
    }

    // ---- kubeconfig and clients ----

    /// A kubeconfig for this server, the given bearer token and namespace.
    pub fn kubeconfig_yaml(&self, token: &str, namespace: &str) -> String {
        let ca = base64::engine::general_purpose::STANDARD.encode(self.ca_pem.as_bytes());
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fakekube\n  cluster:\n    server: {url}\n    certificate-authority-data: {ca}\nusers:\n- name: fakekube-user\n  user:\n    token: \"{token}\"\ncontexts:\n- name: fakekube\n  context:\n    cluster: fakekube\n    user: fakekube-user\n    namespace: {namespace}\ncurrent-context: fakekube\npreferences: {{}}\n",
            url = self.url(),
        )
    }

    /// Writes a kubeconfig (namespace `default`) to `path`.
    pub fn write_kubeconfig(&self, path: &Path, token: &str) {
        std::fs::write(path, self.kubeconfig_yaml(token, "default")).expect("write kubeconfig");
    }

    /// The client configuration a kubeconfig with `token` gives.
    pub async fn config_for(&self, token: &str) -> kube::Config {
        let kc = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_yaml(token, "default"))
            .expect("kubeconfig parses");
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .expect("kubeconfig loads")
    }

    /// A client authenticated as the admin.
    pub async fn client(&self) -> kube::Client {
        self.client_with_token(&self.shared.admin_token.clone())
            .await
    }

    /// A client presenting `token`.
    pub async fn client_with_token(&self, token: &str) -> kube::Client {
        kube::Client::try_from(self.config_for(token).await).expect("client")
    }

    // ---- the request log ----

    /// Every request since the start or the last reset, in completion order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.log).clone()
    }

    /// Requests of a verb on a resource (`pods`, `serviceaccounts/token`,
    /// or a non-resource path such as `/openid/v1/jwks`).
    pub fn count(&self, verb: &str, resource: &str) -> usize {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.verb == verb && r.resource_path() == resource)
            .count()
    }

    /// Request counts by (verb, resource).
    pub fn counters(&self) -> BTreeMap<(String, String), usize> {
        let mut m = BTreeMap::new();
        for r in lock(&self.shared.log).iter() {
            *m.entry((r.verb.clone(), r.resource_path())).or_insert(0) += 1;
        }
        m
    }

    pub fn total_requests(&self) -> usize {
        lock(&self.shared.log).len()
    }

    /// Forgets the request log (and so the counters).
    pub fn reset_counters(&self) {
        lock(&self.shared.log).clear();
    }

    // ---- objects, bypassing HTTP ----

    /// Creates a namespace (as a POST would); answers its uid.
    pub fn create_namespace(&self, name: &str) -> String {
        let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        uid(&self.create_json(obj).expect("namespace created"))
    }

    pub fn create_service_account(&self, ns: &str, name: &str) -> String {
        let obj = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}});
        uid(&self.create_json(obj).expect("service account created"))
    }

    pub fn create_node(&self, name: &str) -> String {
        let obj = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        });
        uid(&self.create_json(obj).expect("node created"))
    }

    /// Creates a pod of service account `sa` (which must exist), bound to
    /// `node` and Running when a node is given (Pending otherwise);
    /// answers its uid.
    ///
    /// The first pod of each shape goes through the whole create path;
    /// later ones are copies of it with their own names (the same
    /// admission checks, a fraction of the cost: 10,000 pods take well
    /// under a second).
    pub fn create_pod(&self, ns: &str, name: &str, sa: &str, node: Option<&str>) -> String {
        let running = node.is_some();
        let mut store = lock(&self.shared.store);
        let template = lock(&self.shared.pod_templates)[usize::from(running)].clone();
        if let Some(mut obj) = template {
            let errs =
                resources::validate_name(resources::NameRule::Subdomain, name, "metadata.name");
            assert!(errs.is_empty(), "pod name {name:?}: {}", errs[0]);
            assert!(
                store.namespace_exists(ns),
                "pod {ns}/{name}: namespaces \"{ns}\" not found"
            );
            assert!(
                store.get(Res::ServiceAccounts, ns, sa).is_some(),
                "pod {ns}/{name}: serviceaccount \"{sa}\" not found"
            );
            let key = store::key_of(Res::Pods, ns, name);
            assert!(
                !store.objects.contains_key(&key),
                "pod {ns}/{name} already exists"
            );
            let now = json!(timefmt::now_rfc3339());
            let meta = &mut obj["metadata"];
            meta["name"] = json!(name);
            meta["namespace"] = json!(ns);
            meta["creationTimestamp"] = now.clone();
            meta["managedFields"][0]["time"] = now;
            obj["spec"]["serviceAccountName"] = json!(sa);
            obj["spec"]["serviceAccount"] = json!(sa);
            if let Some(n) = node {
                obj["spec"]["nodeName"] = json!(n);
            }
            return uid(&store.put_new(key, obj));
        }
        let mut spec = json!({
            "serviceAccountName": sa,
            "containers": [{"name": "app", "image": "registry.example/app:1"}],
        });
        if let Some(n) = node {
            spec["nodeName"] = json!(n);
        }
        let body = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns}, "spec": spec});
        let obj = store
            .create_with(Res::Pods, ns, body, "fakekube", |p| {
                if running {
                    p["status"] = json!({"phase": "Running", "qosClass": "BestEffort", "podIP": "10.244.0.10", "hostIP": "10.0.0.10"});
                }
            })
            .unwrap_or_else(|e| panic!("pod {ns}/{name}: {}", e.message));
        let mut template = (*obj).clone();
        if let Some(m) = template["metadata"].as_object_mut() {
            for k in ["uid", "resourceVersion", "creationTimestamp"] {
                m.remove(k);
            }
        }
        lock(&self.shared.pod_templates)[usize::from(running)] = Some(template);
        uid(&obj)
    }

    /// Creates any served object as a POST would (validation, defaulting,
    /// admission); the error is the Status the API would answer.
    pub fn create_json(&self, mut obj: Value) -> Result<Value, Value> {
        let version = obj
            .get("apiVersion")
            .and_then(Value::as_str)
            .and_then(|v| v.strip_prefix("certificates.k8s.io/"))
            .map(String::from);
        if let Some(v) = version {
            let res = Res::from_kind(
                "certificates.k8s.io/v1",
                obj.get("kind").and_then(Value::as_str).unwrap_or(""),
            )
            .expect("a certificates.k8s.io kind");
            certificates::intake(res, &v, &mut obj, None);
        }
        let res = Self::res_of(&obj);
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        lock(&self.shared.store)
            .create(res, &ns, obj, "fakekube")
            .map(|o| (*o).clone())
            .map_err(|e| e.to_status())
    }

    fn res_of(obj: &Value) -> Res {
        let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
        Res::from_kind(api_version, kind)
            .unwrap_or_else(|| panic!("the fake does not serve {api_version} {kind}"))
    }

    /// The stored object (`namespace` "" for cluster-scoped resources).
    pub fn get_json(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        lock(&self.shared.store)
            .get(res_named(resource), namespace, name)
            .map(|o| (*o).clone())
    }

    /// Every stored object of a resource (in a namespace, or all with "").
    pub fn list_json(&self, resource: &str, namespace: &str) -> Vec<Value> {
        let res = res_named(resource);
        lock(&self.shared.store)
            .objects
            .iter()
            .filter(|(k, _)| k.0 == res && (namespace.is_empty() || k.1 == namespace))
            .map(|(_, o)| (**o).clone())
            .collect()
    }

    /// Stores an object as given, without validation (status included):
    /// the escape hatch for states the API would not let a client write.
    /// Keeps the uid and creationTimestamp of an existing object when the
    /// value has none; bumps the resourceVersion; watchers see the event.
    pub fn put_json(&self, mut obj: Value) -> Value {
        let res = Self::res_of(&obj);
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .expect("metadata.name")
            .to_string();
        let mut store = lock(&self.shared.store);
        let key = store::key_of(res, &ns, &name);
        let out = match store.objects.get(&key).cloned() {
            Some(old) => {
                for k in ["uid", "creationTimestamp"] {
                    if obj["metadata"].get(k).is_none() {
                        obj["metadata"][k] = old["metadata"][k].clone();
                    }
                }
                store.put_existing(key, obj)
            }
            None => {
                let o = store.put_new(key, obj);
                store.after_create(res, &name);
                o
            }
        };
        store.collect_garbage();
        (*out).clone()
    }

    /// Deletes an object (background propagation, as a plain DELETE);
    /// false when it did not exist.
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) -> bool {
        lock(&self.shared.store)
            .delete(
                res_named(resource),
                namespace,
                name,
                &gc::DeleteOptions::default(),
            )
            .is_ok()
    }

    /// The current resourceVersion (etcd's revision).
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).rv
    }

    /// Drops the event history: watches and paged lists from any earlier
    /// resourceVersion get 410 Expired; open watches behind it are closed.
    pub fn compact(&self) {
        lock(&self.shared.store).compact();
    }

    // ---- tokens ----

    /// The issuer (`iss`).
    pub fn issuer(&self) -> String {
        self.issuer_read().issuer.clone()
    }

    fn issuer_read(&self) -> std::sync::RwLockReadGuard<'_, tokens::Issuer> {
        self.shared
            .issuer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The claims a bound token for `spec` carries (fresh jti each call).
    pub fn token_claims(&self, spec: &TokenSpec) -> Value {
        let issuer = self.issuer_read();
        let store = lock(&self.shared.store);
        tokens::spec_claims(&store, &issuer, spec).unwrap_or_else(|e| panic!("mint_token: {e}"))
    }

    /// A bound service-account token, signed by the current key. Panics
    /// when the service account (or the pod, node) does not exist.
    pub fn mint_token(&self, spec: TokenSpec) -> String {
        let claims = self.token_claims(&spec);
        self.sign_claims(&claims)
    }

    /// Signs arbitrary claims with the current key.
    pub fn sign_claims(&self, claims: &Value) -> String {
        self.issuer_read().active().sign(claims)
    }

    /// Signs with a key this fake never published (kid of its own).
    pub fn sign_claims_untrusted(&self, claims: &Value) -> String {
        tokens::untrusted_key().sign(claims)
    }

    /// The published keys.
    pub fn jwks(&self) -> Value {
        self.issuer_read().jwks()
    }

    /// The kid of the key that signs now.
    pub fn signing_kid(&self) -> String {
        self.issuer_read().active().kid.clone()
    }

    /// Adds a key (published at once) and signs with it from now on;
    /// answers its kid. Tokens of older keys verify until
    /// [`FakeKube::drop_old_keys`].
    pub fn rotate_signing_key(&self) -> String {
        let key = tokens::SigningKey::generate();
        let kid = key.kid.clone();
        self.shared
            .issuer
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys
            .push(key);
        kid
    }

    /// Unpublishes every key but the current one.
    pub fn drop_old_keys(&self) {
        let mut issuer = self
            .shared
            .issuer
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = issuer.keys.len();
        issuer.keys.drain(..n - 1);
    }

    /// How long a successful token authentication is cached (the real
    /// API server: 10 s). Default 0: every review sees the current state.
    pub fn set_token_cache_ttl(&self, ttl: Duration) {
        lock(&self.shared.token_cache).ttl = ttl;
    }

    /// How long the token validator still sees deleted service accounts,
    /// pods, nodes and secrets (its informer's lag). Default 0.
    pub fn set_informer_lag(&self, lag: Duration) {
        lock(&self.shared.store).informer_lag = lag;
    }

    /// A delay inside every TokenReview.
    pub fn set_token_review_latency(&self, d: Duration) {
        *lock(&self.shared.review_latency) = d;
    }

    /// The most TokenReviews that were in flight at once.
    pub fn max_reviews_in_flight(&self) -> usize {
        self.shared.max_reviews_in_flight.load(Ordering::SeqCst)
    }

    pub fn reviews_in_flight(&self) -> usize {
        self.shared.reviews_in_flight.load(Ordering::SeqCst)
    }

    pub fn reset_max_reviews_in_flight(&self) {
        self.shared.max_reviews_in_flight.store(0, Ordering::SeqCst);
    }

    // ---- faults ----

    /// Down: new connections are closed at once, open ones (watches
    /// included) are dropped, a request that still arrives gets 503.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        if down {
            self.shared.kill.send_modify(|e| *e += 1);
            self.shared.watch_epoch.send_modify(|e| *e += 1);
        }
    }

    pub fn is_down(&self) -> bool {
        self.shared.down.load(Ordering::SeqCst)
    }

    /// Ends every open watch cleanly (as the server's timeouts do).
    pub fn close_watches(&self) {
        self.shared.watch_epoch.send_modify(|e| *e += 1);
    }

    /// Watches being served now.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// The next `n` requests of `verb` on `resource` (as in
    /// [`FakeKube::count`]; "*" for any) fail with `code` and a Status
    /// (429 and 503 with `Retry-After: 1`).
    pub fn fail_next(&self, verb: &str, resource: &str, code: u16, n: usize) {
        lock(&self.shared.faults).push(http::Fault {
            verb: verb.into(),
            resource: resource.into(),
            code,
            remaining: n,
        });
    }

    /// The bookmark period of watches started from now on.
    pub fn set_bookmark_interval(&self, d: Duration) {
        *lock(&self.shared.bookmark_interval) = d;
    }
}

fn uid(obj: &Value) -> String {
    obj.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .expect("uid")
        .to_string()
}

fn build_shared(opts: &FakeOptions, addr: SocketAddr, ca_pem: &str) -> Shared {
    let mut store = Store::new(
        opts.history_limit,
        ca_pem.to_string(),
        opts.namespace_controllers,
    );
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        store
            .create(Res::Namespaces, "", obj, "kube-apiserver")
            .expect("namespace");
    }
    let api_audiences = if opts.api_audiences.is_empty() {
        vec![opts.issuer.clone()]
    } else {
        opts.api_audiences.clone()
    };
    let (kill, _) = tokio::sync::watch::channel(0);
    let (watch_epoch, _) = tokio::sync::watch::channel(0);
    Shared {
        store: Mutex::new(store),
        issuer: RwLock::new(tokens::Issuer {
            issuer: opts.issuer.clone(),
            api_audiences,
            keys: vec![tokens::SigningKey::generate()],
            extend_expiration: opts.extend_token_expiration,
        }),
        token_cache: Mutex::new(authn::TokenCache::default()),
        admin_token: random_hex(24),
        static_users: Mutex::new(HashMap::new()),
        log: Mutex::new(Vec::new()),
        faults: Mutex::new(Vec::new()),
        down: AtomicBool::new(false),
        kill,
        watch_epoch,
        open_watches: AtomicUsize::new(0),
        reviews_in_flight: AtomicUsize::new(0),
        max_reviews_in_flight: AtomicUsize::new(0),
        review_latency: Mutex::new(Duration::ZERO),
        bookmark_interval: Mutex::new(opts.bookmark_interval),
        pod_templates: Mutex::new([None, None]),
        jwks_uri: format!("https://{addr}/openid/v1/jwks"),
        cert_versions: opts.certificates,
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.shared.kill.send_modify(|e| *e += 1);
        self.shared.watch_epoch.send_modify(|e| *e += 1);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
