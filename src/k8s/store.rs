//! The CA's authorities in one Kubernetes Secret ([`SecretStore`]), and a
//! plugged-in CA read from Istio's `cacerts` Secret ([`read_cacerts`]).
//!
//! # Layout
//!
//! One Secret, `istio-ca-secret` by default, of type `istio.io/ca-root`
//! when we create it. At the top level it is what istiod writes and reads:
//!
//! - `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`: the *active*
//!   authority's, so istiod and any tool that reads this Secret see the CA
//!   that signs;
//! - `root-cert.pem`: the trust bundle of the whole set (every member's
//!   roots, active first, then prepared, then retiring; each root once):
//!   the same text the server publishes as its `root-cert.pem`. istiod's own
//!   Secret has the one self-signed root there, and a set of one still does.
//!   During a rotation a reader of `root-cert.pem` copies it to decide what
//!   to trust (another cluster's mesh, a gateway, a script): it must see
//!   the prepared root before that root signs, and the retiring root until
//!   its leaves are gone: the bundle, not the active root alone (the shape
//!   Istio's plugged-in rotation gives `cacerts`: old and new roots
//!   together). The four keys still form a valid CA, and read back as one.
//!
//! Added for rotation: `authorities.json` (the directory store's manifest,
//! same JSON: `{generation, members: [{id, state, since}]}`) and each
//! member's four files under `<id>.ca-cert.pem`, `<id>.ca-key.pem`,
//! `<id>.cert-chain.pem`, `<id>.root-cert.pem` (ids are 16 hex digits, so
//! every key matches the API server's `[-._a-zA-Z0-9]+`). Other data keys
//! (istiod's empty `key.pem`, anything an operator added) are kept on
//! every write, as are labels, annotations and owner references; we add
//! `app.kubernetes.io/managed-by: workload-ca` when no manager is named,
//! and the annotations `workload-ca/generation` and `workload-ca/active`.
//!
//! # Reading
//!
//! - No Secret, or one with none of our keys (pre-created empty, so RBAC
//!   can name it): nothing stored yet. The first swap creates it, or
//!   replaces the empty one at the `resourceVersion` read.
//! - The top-level keys alone (istiod's `istio-ca-secret`, or one written
//!   by hand): a set of one at generation 1, adopted as the directory store
//!   adopts its layout before rotation. Like istiod, which reads only
//!   `ca-cert.pem` and `ca-key.pem` there, an empty or missing
//!   `root-cert.pem` and `cert-chain.pem` mean a self-signed `ca-cert.pem`.
//!   The first swap moves it into the layout above.
//! - A manifest: every member's four keys must be there, no member key may
//!   belong to an id the manifest does not name, and the top-level keys
//!   must be exactly the ones the set makes. Anything else (half written,
//!   edited by hand, istiod's root rotator having rewritten `ca-cert.pem`)
//!   is an error, never an empty store.
//!
//! # Writing
//!
//! [`KeyStore::swap`] from `None` creates the Secret (409: someone else
//! did, `false`); from `Some(g)` it reads the Secret, compares the
//! manifest's generation with `g`, and replaces the Secret at the
//! `resourceVersion` it read, so a concurrent writer's replace fails with
//! 409 and that swap returns `false`. Replicas starting together therefore
//! agree on one CA: the losers of the create read the winner's. A write
//! whose total data would pass the API server's 1 MiB limit is refused
//! before it is sent.
//!
//! # Following
//!
//! [`SecretStore::spawn_watch`] runs a `kube::runtime::watcher` on the one
//! Secret (field selector `metadata.name`), keeping its generation in
//! memory (never its keys). While that watch is live, [`KeyStore::generation`]
//! answers from memory and [`KeyStore::poll_interval`] is 150 ms, so a
//! follower sees another replica's change within a second at no API cost;
//! otherwise both fall back to a GET every 2 s. A watch that fails is
//! marked not live at once and re-listed with back-off.
//!
//! # Not checked here
//!
//! - The certificates themselves: [`KeyStore::load`] returns what the
//!   Secret holds; validation is [`crate::ca::AuthoritySet::from_stored`]'s.
//! - That the watch is current when it reports nothing: a connection that
//!   dies without an error is noticed by the watcher's idle timeout (the
//!   60 s server-side watch timeout plus 5 s) and the reconnect that
//!   follows (which the client's read timeout bounds, see
//!   [`super::client`]); until then the copy may be that much behind, and
//!   the store still counts as live.
//! - Whether the Secret was deleted: a server that saw its Secret go keeps
//!   its set in memory and logs it, but a restart then starts a new CA.
//! - Copies of the keys in request and response bodies and in kube's types
//!   are ordinary memory, not zeroised.
//! - The `type` of a Secret we did not create (it cannot be changed);
//!   `immutable: true` is refused with an error at the first write.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::watcher;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use zeroize::Zeroizing;

use super::Error;
use crate::ca;
use crate::ca::authorities::State;
use crate::ca::authority::authority_id;
use crate::ca::bundle::{Cert, parse_pem_certs};
use crate::ca::keystore::{
    DEFAULT_POLL_INTERVAL, KeyStore, MANIFEST, Manifest, StoreFuture, Stored, StoredMember,
    parse_state, valid_id,
};
use crate::ca::store::{CA_CERT, CA_KEY, CERT_CHAIN, CaFiles, FILES, ROOT_CERT};

/// The Secret istiod keeps its self-signed CA in.
pub const DEFAULT_SECRET_NAME: &str = "istio-ca-secret";
/// The Secret of a plugged-in CA.
pub const DEFAULT_CACERTS_NAME: &str = "cacerts";
/// The type of the Secret we create (istiod's).
pub const SECRET_TYPE: &str = "istio.io/ca-root";
/// The most a Secret's data may hold (the API server's limit: the values'
/// bytes, summed).
pub const MAX_SECRET_BYTES: usize = 1024 * 1024;
/// [`KeyStore::poll_interval`] while the watch is live.
pub const WATCHED_POLL_INTERVAL: Duration = Duration::from_millis(150);
/// The label marking the Secret as ours.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const MANAGED_BY: &str = "workload-ca";
/// Annotation: the stored set's generation.
pub const GENERATION_ANNOTATION: &str = "workload-ca/generation";
/// Annotation: the id of the active authority.
pub const ACTIVE_ANNOTATION: &str = "workload-ca/active";

/// A `kubernetes.io/tls` `cacerts` (as cert-manager writes it), which
/// istiod also reads: signer (and chain), key, root.
const TLS_CERT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const TLS_CA: &str = "ca.crt";

/// The server ends each watch after this long and the watcher resumes it;
/// kube's watcher gives up on a silent connection 5 s later.
const WATCH_TIMEOUT_SECS: u32 = 60;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

type Data = BTreeMap<String, ByteString>;

/// The CA's authorities in one Secret. Cheap to clone (clones share the
/// watched copy).
#[derive(Clone)]
pub struct SecretStore {
    api: Api<Secret>,
    namespace: String,
    name: String,
    shared: Arc<Shared>,
}

struct Shared {
    watched: watch::Sender<Watched>,
    /// A watch task is running (at most one per store).
    watching: AtomicBool,
}

/// What the watch last saw.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Watched {
    live: bool,
    /// The Secret's generation (`None`: no Secret, or nothing stored in
    /// it), or why it does not decode.
    generation: Result<Option<u64>, String>,
}

impl fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretStore")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("watch_live", &self.watch_live())
            .finish_non_exhaustive()
    }
}

impl SecretStore {
    /// The store in Secret `name` of `namespace`. No API call is made here;
    /// start the watch with [`SecretStore::spawn_watch`].
    pub fn new(
        client: kube::Client,
        namespace: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        let namespace = namespace.into();
        Self {
            api: Api::namespaced(client, &namespace),
            namespace,
            name: name.into(),
            shared: Arc::new(Shared {
                watched: watch::channel(Watched {
                    live: false,
                    generation: Ok(None),
                })
                .0,
                watching: AtomicBool::new(false),
            }),
        }
    }

    /// The Secret's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Secret's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the watch is running and has a current copy (for readiness).
    pub fn watch_live(&self) -> bool {
        self.shared.watched.borrow().live
    }

    /// Starts watching the Secret until `shutdown` turns `true` (or its
    /// sender is dropped); register the handle with the caller's tasks.
    /// One watch per store: a second call returns a task that ends at once.
    pub fn spawn_watch(&self, shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(this.run_watch(shutdown))
    }

    async fn run_watch(self, mut shutdown: watch::Receiver<bool>) {
        if self.shared.watching.swap(true, Ordering::SeqCst) {
            tracing::warn!(secret = %self.describe(), "the CA secret is already watched");
            return;
        }
        // Not live once this task ends, however it ends (an abort too).
        let _guard = WatchGuard(self.shared.clone());
        let config = watcher::Config::default()
            .fields(&format!("metadata.name={}", self.name))
            .timeout(WATCH_TIMEOUT_SECS);
        let mut backoff = BACKOFF_MIN;
        loop {
            // A fresh watcher after every failure: its list is the signal
            // that the copy is current again.
            let mut stream = std::pin::pin!(watcher(self.api.clone(), config.clone()));
            let mut listed: Option<Secret> = None;
            let lost = loop {
                let next = tokio::select! {
                    _ = shutdown.wait_for(|stop| *stop) => return,
                    next = stream.next() => next,
                };
                match next {
                    None => break "the watch ended".to_owned(),
                    Some(Err(e)) => break e.to_string(),
                    Some(Ok(watcher::Event::Init)) => listed = None,
                    Some(Ok(watcher::Event::InitApply(s))) => {
                        if s.metadata.name.as_deref() == Some(self.name.as_str()) {
                            listed = Some(s);
                        }
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        if !self.watch_live() {
                            tracing::info!(secret = %self.describe(), "watching the CA secret");
                        }
                        self.publish(listed.take().as_ref(), true);
                        backoff = BACKOFF_MIN;
                    }
                    Some(Ok(watcher::Event::Apply(s))) => self.publish(Some(&s), true),
                    Some(Ok(watcher::Event::Delete(_))) => {
                        tracing::warn!(
                            secret = %self.describe(),
                            "the CA secret was deleted; serving the authorities in memory, but a restart would create a new CA"
                        );
                        self.publish(None, true);
                    }
                }
            };
            self.shared.watched.send_modify(|w| w.live = false);
            tracing::warn!(
                secret = %self.describe(), error = %lost, retry_in = ?backoff,
                "lost the watch of the CA secret; reading it directly until it is back"
            );
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Keeps the generation of `secret` (never its keys) as the copy.
    fn publish(&self, secret: Option<&Secret>, live: bool) {
        let generation = match secret {
            None => Ok(None),
            Some(s) => decode_secret(s).map(|s| s.map(|s| s.generation)),
        };
        if let Err(reason) = &generation {
            tracing::error!(secret = %self.describe(), %reason, "the CA secret cannot be read");
        }
        self.shared
            .watched
            .send_replace(Watched { live, generation });
    }

    fn err(&self, reason: impl Into<String>) -> ca::Error {
        ca::Error::Store {
            location: self.describe(),
            reason: reason.into(),
        }
    }

    fn api_err(&self, what: &str, e: kube::Error) -> ca::Error {
        self.err(Error::api(what, e).to_string())
    }

    async fn get(&self) -> Result<Option<Secret>, ca::Error> {
        self.api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.api_err("reading", e))
    }

    async fn read(&self) -> Result<Option<Stored>, ca::Error> {
        match self.get().await? {
            None => Ok(None),
            Some(s) => decode_secret(&s).map_err(|r| self.err(r)),
        }
    }

    async fn swap_inner(&self, expected: Option<u64>, next: &Stored) -> Result<bool, ca::Error> {
        let ours = encode(next).map_err(|r| self.err(r))?;
        let Some(current) = self.get().await? else {
            if expected.is_some() {
                return Ok(false);
            }
            let secret = created(&self.namespace, &self.name, ours.clone(), next);
            check_size(secret.data.as_ref()).map_err(|r| self.err(r))?;
            return match self.api.create(&PostParams::default(), &secret).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => self.lost_or_ours(&ours).await,
                Err(e) => Err(self.api_err("creating", e)),
            };
        };
        let stored = decode_secret(&current).map_err(|r| self.err(r))?;
        if stored.map(|s| s.generation) != expected {
            return Ok(false);
        }
        if current.immutable == Some(true) {
            return Err(self.err("the Secret is immutable; it cannot be written"));
        }
        if current.metadata.resource_version.is_none() {
            return Err(self.err("the Secret read has no resourceVersion"));
        }
        let secret = replaced(current, ours.clone(), next);
        check_size(secret.data.as_ref()).map_err(|r| self.err(r))?;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &secret)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 || s.is_not_found() => {
                self.lost_or_ours(&ours).await
            }
            Err(e) => Err(self.api_err("replacing", e)),
        }
    }

    /// After a 409: `false`, unless what is stored is exactly what we
    /// wrote (a retried request whose first attempt had landed).
    async fn lost_or_ours(&self, ours: &Data) -> Result<bool, ca::Error> {
        let now = self
            .get()
            .await
            .map_err(|e| self.err(format!("the write's outcome is unknown: {e}")))?;
        let data = now.as_ref().and_then(|s| s.data.as_ref());
        Ok(data.is_some_and(|d| ours.iter().all(|(k, v)| d.get(k) == Some(v))))
    }
}

/// Marks the watch not live when its task ends.
struct WatchGuard(Arc<Shared>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.watched.send_modify(|w| w.live = false);
        self.0.watching.store(false, Ordering::SeqCst);
    }
}

impl KeyStore for SecretStore {
    fn restore_when_wiped(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!("secret {}/{}", self.namespace, self.name)
    }

    /// Always a GET (it is called once per change).
    fn load(&self) -> StoreFuture<'_, Option<Stored>> {
        Box::pin(self.read())
    }

    /// From the watched copy while it is live, else a GET.
    fn generation(&self) -> StoreFuture<'_, Option<u64>> {
        Box::pin(async move {
            let watched = self.shared.watched.borrow().clone();
            if watched.live {
                return watched.generation.map_err(|r| self.err(r));
            }
            Ok(self.read().await?.map(|s| s.generation))
        })
    }

    fn swap<'a>(&'a self, expected: Option<u64>, next: &'a Stored) -> StoreFuture<'a, bool> {
        Box::pin(self.swap_inner(expected, next))
    }

    /// Often while the watched copy is live and readable; otherwise at
    /// the pace of a store read directly (an unreadable Secret is then not
    /// reported seven times a second).
    fn poll_interval(&self) -> Duration {
        let watched = self.shared.watched.borrow();
        if watched.live && watched.generation.is_ok() {
            WATCHED_POLL_INTERVAL
        } else {
            DEFAULT_POLL_INTERVAL
        }
    }
}

/// A plugged-in CA from Secret `name` in `namespace` (Istio's `cacerts`):
/// `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`, or
/// istiod's `kubernetes.io/tls` form (`tls.crt`: the signer then its
/// intermediates, `tls.key`, `ca.crt`: the root). `None` when there is no
/// such Secret. Only read, never written. The material is not validated
/// here ([`crate::ca::Authority::from_files`] does).
///
/// # Errors
/// [`Error::Api`] when the Secret cannot be read; [`Error::Invalid`] when
/// it exists but holds a partial CA, or none at all (a plugged-in CA that
/// is meant but wrong must not turn into a fresh self-signed root).
pub async fn read_cacerts(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Option<CaFiles>, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let what = format!("secret {namespace}/{name}");
    let Some(secret) = api
        .get_opt(name)
        .await
        .map_err(|e| Error::api(format!("reading {what}"), e))?
    else {
        return Ok(None);
    };
    let empty = Data::new();
    let files = cacerts_files(secret.data.as_ref().unwrap_or(&empty));
    files
        .and_then(|f| {
            f.ok_or_else(|| {
                format!(
                    "holds no CA: none of {} (nor {TLS_CERT}, {TLS_KEY}, {TLS_CA})",
                    FILES.join(", ")
                )
            })
        })
        .map(Some)
        .map_err(|reason| Error::Invalid { what, reason })
}

fn cacerts_files(data: &Data) -> Result<Option<CaFiles>, String> {
    // istiod's order: the TLS form when `tls.crt` is there.
    if !data.contains_key(TLS_CERT) {
        return istio_files(data);
    }
    let need = |key: &str| -> Result<&str, String> {
        text(data, key)?
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("has {TLS_CERT} but no {key}"))
    };
    let certs = parse_pem_certs(need(TLS_CERT)?).map_err(|e| format!("{TLS_CERT}: {e}"))?;
    let (signer, chain) = certs
        .split_first()
        .ok_or_else(|| format!("{TLS_CERT} holds no certificate"))?;
    Ok(Some(CaFiles {
        ca_cert: signer.pem().to_owned(),
        ca_key: Zeroizing::new(need(TLS_KEY)?.to_owned()),
        cert_chain: chain.iter().map(Cert::pem).collect(),
        root_cert: need(TLS_CA)?.to_owned(),
    }))
}

fn decode_secret(secret: &Secret) -> Result<Option<Stored>, String> {
    let created = secret
        .metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| u64::try_from(t.0.as_second()).ok())
        .unwrap_or(0);
    let empty = Data::new();
    decode(secret.data.as_ref().unwrap_or(&empty), created)
}

/// The stored set a Secret's data holds (see the module's documentation);
/// `created`: when the Secret was made, the `since` of an adopted
/// authority.
fn decode(data: &Data, created: u64) -> Result<Option<Stored>, String> {
    let Some(manifest) = text(data, MANIFEST)? else {
        if let Some(key) = data.keys().find(|k| split_member_key(k).is_some()) {
            return Err(format!(
                "holds {key} but no {MANIFEST}: written in part or edited by hand; refusing it. \
                 Restore {MANIFEST}, or remove every <id>.* key to adopt the top-level keys as the CA"
            ));
        }
        return adopt(data, created);
    };
    let manifest: Manifest =
        serde_json::from_str(manifest).map_err(|e| format!("{MANIFEST} is not valid: {e}"))?;
    if manifest.members.is_empty() {
        return Err(format!("{MANIFEST} names no authority"));
    }
    let mut members: Vec<StoredMember> = Vec::new();
    for m in manifest.members {
        let state = parse_state(&m.state)
            .ok_or_else(|| format!("{MANIFEST}: unknown state {:?}", m.state))?;
        if !valid_id(&m.id) {
            return Err(format!("{MANIFEST}: bad authority id {:?}", m.id));
        }
        if members.iter().any(|have| have.id == m.id) {
            return Err(format!("{MANIFEST} names authority {} twice", m.id));
        }
        let files = member_files(data, &m.id)?;
        members.push(StoredMember {
            id: m.id,
            state,
            since: m.since,
            files,
        });
    }
    if let Some(key) = data
        .keys()
        .find(|k| split_member_key(k).is_some_and(|(id, _)| !members.iter().any(|m| m.id == id)))
    {
        return Err(format!(
            "holds {key}, of an authority {MANIFEST} does not name; refusing it"
        ));
    }
    let stored = Stored {
        generation: manifest.generation,
        members,
    };
    let view = istio_view(&stored)?;
    for (file, want) in entries(&view) {
        match text(data, file)? {
            Some(have) if have == want => {}
            Some(_) => {
                return Err(format!(
                    "{file} is not what {MANIFEST} makes of its authorities: the Istio keys were \
                     changed outside workload-ca; refusing it. To take them as the CA, remove \
                     {MANIFEST} and every <id>.* key"
                ));
            }
            None => return Err(format!("{file} is missing; refusing it")),
        }
    }
    Ok(Some(stored))
}

/// The top-level keys alone: one active authority at generation 1.
fn adopt(data: &Data, created: u64) -> Result<Option<Stored>, String> {
    let Some(files) = istio_files(data)? else {
        return Ok(None);
    };
    let id = parse_pem_certs(&files.ca_cert)
        .ok()
        .and_then(|c| c.first().map(|c| authority_id(c.der())))
        .ok_or_else(|| format!("{CA_CERT} holds no usable certificate"))?;
    Ok(Some(Stored {
        generation: 1,
        members: vec![StoredMember {
            id,
            state: State::Active,
            since: created,
            files,
        }],
    }))
}

/// Istio's four keys, read as istiod reads them: `ca-cert.pem` and
/// `ca-key.pem` needed; with neither `root-cert.pem` nor `cert-chain.pem`
/// (empty counts as absent), `ca-cert.pem` is its own root. `None` when
/// none is there.
fn istio_files(data: &Data) -> Result<Option<CaFiles>, String> {
    let get = |key: &str| -> Result<Option<&str>, String> {
        Ok(text(data, key)?.filter(|t| !t.trim().is_empty()))
    };
    let (cert, key, chain, root) = (
        get(CA_CERT)?,
        get(CA_KEY)?,
        get(CERT_CHAIN)?,
        get(ROOT_CERT)?,
    );
    let (Some(cert), Some(key)) = (cert, key) else {
        let present: Vec<&str> = FILES
            .iter()
            .zip([cert, key, chain, root])
            .filter_map(|(f, v)| v.map(|_| *f))
            .collect();
        if present.is_empty() {
            return Ok(None);
        }
        return Err(format!(
            "partial CA: has {} but not both {CA_CERT} and {CA_KEY}; refusing it",
            present.join(", ")
        ));
    };
    let root = match (root, chain) {
        (Some(r), _) => r,
        (None, None) => cert,
        (None, Some(_)) => return Err(format!("has {CERT_CHAIN} but no {ROOT_CERT}; refusing it")),
    };
    Ok(Some(CaFiles {
        ca_cert: cert.to_owned(),
        ca_key: Zeroizing::new(key.to_owned()),
        cert_chain: chain.unwrap_or_default().to_owned(),
        root_cert: root.to_owned(),
    }))
}

fn member_files(data: &Data, id: &str) -> Result<CaFiles, String> {
    let keys = FILES.map(|f| member_key(id, f));
    let missing: Vec<&str> = keys
        .iter()
        .filter(|k| !data.contains_key(*k))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{MANIFEST} names authority {id} but {} is missing; refusing it",
            missing.join(", ")
        ));
    }
    let get = |k: &String| text(data, k).map(Option::unwrap_or_default);
    let [cert, key, chain, root] = &keys;
    Ok(CaFiles {
        ca_cert: get(cert)?.to_owned(),
        ca_key: Zeroizing::new(get(key)?.to_owned()),
        cert_chain: get(chain)?.to_owned(),
        root_cert: get(root)?.to_owned(),
    })
}

/// What the top-level keys hold for `stored`: the active authority's
/// files, with the set's trust bundle as `root-cert.pem`.
fn istio_view(stored: &Stored) -> Result<CaFiles, String> {
    let mut active = stored.members.iter().filter(|m| m.state == State::Active);
    let (Some(a), None) = (active.next(), active.next()) else {
        return Err("a CA needs exactly one active authority".into());
    };
    // As `AuthoritySet`'s bundle: active, prepared, retiring; each root once.
    let mut ordered: Vec<&StoredMember> = stored.members.iter().collect();
    ordered.sort_by_key(|m| m.state.bundle_rank());
    let mut roots: Vec<Cert> = Vec::new();
    for m in ordered {
        let certs = parse_pem_certs(&m.files.root_cert)
            .map_err(|e| format!("authority {}: {ROOT_CERT}: {e}", m.id))?;
        for c in certs {
            if !roots.iter().any(|r| r.der() == c.der()) {
                roots.push(c);
            }
        }
    }
    Ok(CaFiles {
        ca_cert: a.files.ca_cert.clone(),
        ca_key: a.files.ca_key.clone(),
        cert_chain: a.files.cert_chain.clone(),
        root_cert: roots.iter().map(Cert::pem).collect(),
    })
}

/// The keys we write for `next` (only ours: see [`is_managed_key`]).
fn encode(next: &Stored) -> Result<Data, String> {
    let view = istio_view(next)?;
    let mut data = Data::new();
    for (i, m) in next.members.iter().enumerate() {
        if !valid_id(&m.id) {
            return Err(format!("bad authority id {:?}", m.id));
        }
        if next.members.iter().take(i).any(|o| o.id == m.id) {
            return Err(format!("authority {} is in the set twice", m.id));
        }
        for (file, v) in entries(&m.files) {
            data.insert(member_key(&m.id, file), bytes(v));
        }
    }
    let manifest = Manifest::of(next);
    let json =
        serde_json::to_string_pretty(&manifest).map_err(|e| format!("encoding {MANIFEST}: {e}"))?;
    data.insert(MANIFEST.to_owned(), bytes(&json));
    for (file, v) in entries(&view) {
        data.insert(file.to_owned(), bytes(v));
    }
    Ok(data)
}

/// A new Secret holding `ours`.
fn created(namespace: &str, name: &str, ours: Data, next: &Stored) -> Secret {
    let mut secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..ObjectMeta::default()
        },
        type_: Some(SECRET_TYPE.to_owned()),
        data: Some(ours),
        ..Secret::default()
    };
    stamp(&mut secret.metadata, next);
    secret
}

/// `current` with our keys replaced by `ours`; everything else kept (its
/// `resourceVersion` included, which makes the replace conditional).
fn replaced(mut current: Secret, ours: Data, next: &Stored) -> Secret {
    let mut data = current.data.take().unwrap_or_default();
    data.retain(|k, _| !is_managed_key(k));
    data.extend(ours);
    current.data = Some(data);
    current.string_data = None;
    current.metadata.managed_fields = None;
    stamp(&mut current.metadata, next);
    current
}

/// Our label (unless another manager is named) and annotations.
fn stamp(meta: &mut ObjectMeta, next: &Stored) {
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .entry(MANAGED_BY_LABEL.to_owned())
        .or_insert_with(|| MANAGED_BY.to_owned());
    let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(
        GENERATION_ANNOTATION.to_owned(),
        next.generation.to_string(),
    );
    if let Some(a) = next.members.iter().find(|m| m.state == State::Active) {
        annotations.insert(ACTIVE_ANNOTATION.to_owned(), a.id.clone());
    }
}

fn check_size(data: Option<&Data>) -> Result<(), String> {
    let size: usize = data.map_or(0, |d| d.values().map(|v| v.0.len()).sum());
    if size > MAX_SECRET_BYTES {
        return Err(format!(
            "the Secret would hold {size} bytes, over the {MAX_SECRET_BYTES} a Secret may hold; \
             nothing was written (retire an authority, or shorten its chain)"
        ));
    }
    Ok(())
}

/// Keys this store writes: Istio's four, the manifest, members' files.
fn is_managed_key(key: &str) -> bool {
    FILES.contains(&key) || key == MANIFEST || split_member_key(key).is_some()
}

fn member_key(id: &str, file: &str) -> String {
    format!("{id}.{file}")
}

/// `(id, file)` if `key` is a member's file.
fn split_member_key(key: &str) -> Option<(&str, &str)> {
    let (id, file) = key.split_once('.')?;
    (valid_id(id) && FILES.contains(&file)).then_some((id, file))
}

fn entries(files: &CaFiles) -> [(&'static str, &str); 4] {
    [
        (CA_CERT, files.ca_cert.as_str()),
        (CA_KEY, files.ca_key.as_str()),
        (CERT_CHAIN, files.cert_chain.as_str()),
        (ROOT_CERT, files.root_cert.as_str()),
    ]
}

fn bytes(text: &str) -> ByteString {
    ByteString(text.as_bytes().to_vec())
}

/// `key`'s value as text, if it is there.
fn text<'a>(data: &'a Data, key: &str) -> Result<Option<&'a str>, String> {
    data.get(key)
        .map(|v| std::str::from_utf8(&v.0).map_err(|_| format!("{key} is not UTF-8 text")))
        .transpose()
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
