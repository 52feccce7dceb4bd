//! Secret mode (Istio's legacy Citadel layout): a Secret `istio.<sa>` of
//! type `istio.io/key-and-cert` for every service account of the managed
//! namespaces ([`super::scope`]), holding a key the CA generated
//! (`key.pem`), its certificate chain (`cert-chain.pem`: the leaf, then the
//! intermediates of a plugged-in CA; no root, as Citadel wrote it) and the
//! whole current trust bundle (`root-cert.pem`), annotated
//! `istio.io/service-account.name: <sa>`.
//!
//! Ours: labelled `workload-ca.io/managed-by: workload-ca` and owned by its
//! service account (ownerReference to the account's UID, so the garbage
//! collector deletes it with the account). A Secret of that name without
//! our label is foreign: left alone, reported in an Event and a metric.
//!
//! The watch keeps no Secret data: each Secret is judged when its event
//! arrives ([`examine`]) and only the verdict is kept ([`SecretFacts`]):
//! whether it is ours, the owner's UID, and for a sound one (key matches
//! the leaf, chain verifies to its `root-cert.pem`, one SPIFFE ID) the
//! identity, the signing authority, a digest of the bundle and the
//! validity. [`SecretCopier::judge`] compares that with the live set: the
//! bundle must be the set's, the leaf from its active authority, the
//! identity the account's, and the refresh point (a fraction of the
//! lifetime, as the agent's `--rotation-fraction`) not reached.

use crate::sync::LockExt;
use crate::sync::RwLockExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use kube::{Client, core::ObjectMeta};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::Error;
use super::cache::CacheOptions;
use super::copies::{Copier, Judgement, Key, Seen, Shared, WriteFuture, Written};
use super::reflect::{Change, reflect};
use super::scope::Managed;
use super::slim::SlimServiceAccount;
use crate::ca::{AuthoritySet, KeyAlgorithm, LeafIssuer, PrivateKey, Tracked};
use crate::identity::SpiffeId;

/// The Secret type of Istio's secret mode.
pub const SECRET_TYPE: &str = "istio.io/key-and-cert";
/// The annotation naming the service account.
pub const SA_ANNOTATION: &str = "istio.io/service-account.name";
/// The label marking what the CA owns.
pub const MANAGED_BY: &str = "workload-ca.io/managed-by";
/// Its value.
pub const MANAGER: &str = "workload-ca";
/// Secret names: this prefix and the account's name.
pub const PREFIX: &str = "istio.";
/// The Secret's key of the workload's private key.
pub const KEY_PEM: &str = "key.pem";
/// The Secret's key of the leaf and intermediates.
pub const CHAIN_PEM: &str = "cert-chain.pem";
/// The Secret's key of the trust bundle.
pub const ROOT_PEM: &str = "root-cert.pem";
/// The most roots a Secret of ours holds (a bundle mid-rotation holds two
/// or three) before it is judged unsound without a signature check.
pub const MAX_ROOTS: usize = 16;
/// The most intermediates after the leaf.
pub const MAX_INTERMEDIATES: usize = 8;

/// What a sound Secret holds, in short.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafFacts {
    /// The leaf's SPIFFE ID.
    pub id: Box<str>,
    /// The id of the authority that signed the leaf.
    pub issuer: Box<str>,
    /// SHA-256 of `root-cert.pem`.
    pub bundle: [u8; 32],
    /// The leaf's NotBefore.
    pub not_before: SystemTime,
    /// The leaf's NotAfter.
    pub not_after: SystemTime,
}

/// The verdict kept per `istio.io/key-and-cert` Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretFacts {
    /// Labelled as ours.
    pub ours: bool,
    /// The UID of the owner reference naming its service account.
    pub owner_uid: Option<Box<str>>,
    /// The content, or why it is not sound (a Secret not ours is not
    /// examined: anyone may write one).
    pub content: Result<LeafFacts, &'static str>,
    /// SHA-256 of its `root-cert.pem`, ours or not: a foreign copy holds
    /// the rotation gates unless it holds the live bundle.
    pub bundle: Option<[u8; 32]>,
}

/// The live bundle's SHA-256, computed once per generation.
#[derive(Debug)]
pub struct BundleDigest(Mutex<(u64, [u8; 32])>);

impl Default for BundleDigest {
    fn default() -> Self {
        Self(Mutex::new((u64::MAX, [0; 32])))
    }
}

impl BundleDigest {
    /// That of `set`'s bundle.
    pub fn of(&self, set: &AuthoritySet) -> [u8; 32] {
        let mut b = self.0.locked();
        if b.0 != set.generation() {
            *b = (set.generation(), digest(set.bundle_pem().as_bytes()));
        }
        b.1
    }
}

/// SHA-256 of `bytes`.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The service account a Secret name is for.
pub fn account_of(name: &str) -> Option<&str> {
    name.strip_prefix(PREFIX).filter(|s| !s.is_empty())
}

/// Judges a Secret as it arrives; `None` for Secrets that are not named
/// `istio.<sa>` (of our type but not ours to keep). Verifies signatures:
/// call it off the async workers.
pub fn examine(secret: &Secret, now: SystemTime) -> Option<(Key, Seen<SecretFacts>)> {
    examine_as(secret, |sa| content(secret, sa, now))
}

/// [`examine`], with the content of a Secret that is ours judged by
/// `content` (for a write's answer: what was written, known without
/// checking it again).
fn examine_as(
    secret: &Secret,
    content: impl FnOnce(&str) -> Result<LeafFacts, &'static str>,
) -> Option<(Key, Seen<SecretFacts>)> {
    let meta = &secret.metadata;
    let ns = meta.namespace.as_deref()?;
    let name = meta.name.as_deref()?;
    let sa = account_of(name)?;
    let ours = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY))
        .is_some_and(|v| v == MANAGER);
    let owner_uid = meta.owner_references.as_ref().and_then(|refs| {
        refs.iter()
            .find(|r| r.api_version == "v1" && r.kind == "ServiceAccount" && r.name == sa)
            .map(|r| Box::from(r.uid.as_str()))
    });
    let bundle = secret
        .data
        .as_ref()
        .and_then(|d| d.get(ROOT_PEM))
        .map(|v| digest(&v.0));
    let facts = SecretFacts {
        ours,
        owner_uid,
        content: if ours { content(sa) } else { Err("not ours") },
        bundle,
    };
    Some((
        (Arc::from(ns), Arc::from(name)),
        Seen {
            uid: meta.uid.clone().unwrap_or_default(),
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            facts,
        },
    ))
}

fn content(secret: &Secret, sa: &str, now: SystemTime) -> Result<LeafFacts, &'static str> {
    use x509_parser::prelude::FromDer;
    if secret.type_.as_deref() != Some(SECRET_TYPE) {
        return Err("type");
    }
    let annotated = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SA_ANNOTATION));
    if annotated.map(String::as_str) != Some(sa) {
        return Err("annotation");
    }
    let data = secret.data.as_ref().ok_or("no data")?;
    let text = |k: &str| -> Result<&str, &'static str> {
        let v = data.get(k).ok_or("missing data")?;
        std::str::from_utf8(&v.0).map_err(|_| "data not UTF-8")
    };
    let (key_pem, chain_pem, root_pem) = (text(KEY_PEM)?, text(CHAIN_PEM)?, text(ROOT_PEM)?);
    let key = PrivateKey::from_pem(key_pem).map_err(|_| "malformed key.pem")?;
    let chain =
        crate::ca::bundle::parse_pem_certs(chain_pem).map_err(|_| "malformed cert-chain.pem")?;
    let roots =
        crate::ca::bundle::parse_pem_certs(root_pem).map_err(|_| "malformed root-cert.pem")?;
    let (leaf, inter) = chain.split_first().ok_or("empty cert-chain.pem")?;
    if roots.is_empty() {
        return Err("empty root-cert.pem");
    }
    // Whoever may write Secrets there could make each look cost a
    // signature check per certificate: ours never hold this many.
    if roots.len() > MAX_ROOTS || inter.len() > MAX_INTERMEDIATES {
        return Err("too many certificates");
    }
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(leaf.der())
        .map_err(|_| "malformed cert-chain.pem")?;
    if parsed.public_key().raw != key.spki_der().as_slice() {
        return Err("key.pem does not match the certificate");
    }
    let id = crate::ca::bundle::single_spiffe_id(&parsed).map_err(|_| "identity")?;
    let inter_ders: Vec<Vec<u8>> = inter.iter().map(|c| c.der().to_vec()).collect();
    let anchors: Vec<&[u8]> = roots.iter().map(|c| c.der()).collect();
    crate::ca::bundle::verify_path(
        leaf.der(),
        &inter_ders,
        &anchors,
        now,
        webpki::KeyUsage::client_auth(),
    )
    .map_err(|_| "chain does not verify to root-cert.pem")?;
    // The signer: the first certificate after the leaf, or the root that
    // signed it directly.
    let signer = inter
        .first()
        .into_iter()
        .chain(roots.iter())
        .find(|c| {
            c.parsed()
                .is_ok_and(|p| parsed.verify_signature(Some(p.public_key())).is_ok())
        })
        .ok_or("no signer")?;
    Ok(LeafFacts {
        id: id.as_str().into(),
        issuer: crate::ca::authority::authority_id(signer.der()).into(),
        bundle: digest(root_pem.as_bytes()),
        not_before: crate::ca::bundle::time_from_unix(parsed.validity().not_before.timestamp()),
        not_after: crate::ca::bundle::not_after(&parsed),
    })
}

/// Runs `f` where blocking is allowed: in place on a multi-threaded
/// runtime's worker (its other tasks move elsewhere), directly otherwise.
fn off_worker<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn secret_row(secret: Secret) -> Option<(Key, Seen<SecretFacts>)> {
    off_worker(|| examine(&secret, SystemTime::now()))
}

/// When a leaf from `not_before` to `not_after` is refreshed: at
/// `fraction` of its life, and at least 10 minutes (at most half the
/// remaining lifetime, for short ones) before it expires.
pub fn refresh_at(not_before: SystemTime, not_after: SystemTime, fraction: f64) -> SystemTime {
    let life = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let at = not_before + life.mul_f64(fraction.clamp(0.05, 0.95));
    let margin = Duration::from_secs(600).min(life / 2);
    at.min(not_after.checked_sub(margin).unwrap_or(not_before))
}

/// A service account a Secret is wanted for.
#[derive(Clone, Debug)]
pub struct Account {
    /// The service account's name.
    pub name: Arc<str>,
    /// The service account's UID: the Secret's owner reference names it.
    pub uid: Arc<str>,
}

/// The service accounts, by namespace, from a watch.
#[derive(Default)]
pub struct Accounts {
    by_ns: HashMap<Arc<str>, BTreeMap<Arc<str>, Arc<str>>>,
    synced: bool,
}

/// How Secrets are made.
#[derive(Clone, Debug)]
pub struct SecretOptions {
    /// The lifetime of the leaves written.
    pub ttl: Duration,
    /// Renewed after this fraction of a leaf's life.
    pub fraction: f64,
    /// The key type of the leaves.
    pub key: KeyAlgorithm,
}

/// The secret-mode copier.
pub struct SecretCopier {
    client: Client,
    issuer: Arc<dyn LeafIssuer>,
    scope: watch::Receiver<Arc<Managed>>,
    accounts: Arc<RwLock<Accounts>>,
    observed: Shared<SecretFacts>,
    opts: SecretOptions,
    /// The digest of the live bundle, by generation.
    bundle: BundleDigest,
}

impl SecretCopier {
    /// A copier writing leaves from `issuer` into the namespaces of `scope`.
    pub fn new(
        client: Client,
        issuer: Arc<dyn LeafIssuer>,
        scope: watch::Receiver<Arc<Managed>>,
        opts: SecretOptions,
    ) -> Self {
        Self {
            client,
            issuer,
            scope,
            accounts: Arc::default(),
            observed: Arc::default(),
            opts,
            bundle: BundleDigest::default(),
        }
    }

    /// Starts the watches of service accounts and `istio.io/key-and-cert`
    /// Secrets; each change rings `dirty`.
    pub fn spawn_watches(
        &self,
        dirty: Arc<Notify>,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<(&'static str, JoinHandle<()>)> {
        let accounts = {
            let accounts = self.accounts.clone();
            let dirty = dirty.clone();
            let api: Api<SlimServiceAccount> = Api::all(self.client.clone());
            tokio::spawn(reflect(
                api,
                "serviceaccounts",
                CacheOptions::default(),
                shutdown.clone(),
                account_row,
                move |change| {
                    apply_accounts(&mut accounts.write_locked(), change);
                    dirty.notify_one();
                },
            ))
        };
        let secrets = {
            let observed = self.observed.clone();
            let api: Api<Secret> = Api::all(self.client.clone());
            let opts = CacheOptions {
                fields: Some(format!("type={SECRET_TYPE}")),
                // Pages of Secrets carry keys: smaller pages, less held at once.
                page_size: 100,
                ..CacheOptions::default()
            };
            tokio::spawn(reflect(
                api,
                "secrets",
                opts,
                shutdown,
                secret_row,
                move |change| {
                    let changed = observed.locked().apply(change);
                    if changed {
                        dirty.notify_one();
                    }
                },
            ))
        };
        vec![
            ("secret-mode-serviceaccounts", accounts),
            ("secret-mode-secrets", secrets),
        ]
    }

    fn bundle_digest(&self, set: &AuthoritySet) -> [u8; 32] {
        self.bundle.of(set)
    }

    /// Key, leaf and chain for `key`'s account, signed by the live set.
    fn material(
        &self,
        ns: &str,
        sa: &str,
        set: &AuthoritySet,
    ) -> Result<(zeroize::Zeroizing<String>, String, LeafFacts), Error> {
        let id = SpiffeId::for_service_account(set.trust_domain(), ns, sa).map_err(|e| {
            Error::Invalid {
                what: format!("service account {ns}/{sa}"),
                reason: e.to_string(),
            }
        })?;
        let key = PrivateKey::generate(self.opts.key)?;
        let checked = crate::ca::check_own_key(&key)?;
        let leaf = self.issuer.issue(
            &checked,
            &id,
            self.opts.ttl,
            SystemTime::now(),
            "secret-mode",
            Tracked::Copies,
        )?;
        // Leaf and intermediates; the bundle (the chain's last element)
        // goes to root-cert.pem.
        let chain = &leaf.issued.chain;
        let chain_pem: String = chain
            .split_last()
            .map(|(_, r)| r)
            .unwrap_or_default()
            .concat();
        // What a watch event of this Secret will show, known already.
        let not_before = {
            use x509_parser::prelude::FromDer;
            x509_parser::certificate::X509Certificate::from_der(&leaf.issued.leaf_der)
                .map(|(_, c)| {
                    crate::ca::bundle::time_from_unix(c.validity().not_before.timestamp())
                })
                .map_err(|e| Error::Invalid {
                    what: "the leaf just signed".into(),
                    reason: e.to_string(),
                })?
        };
        let facts = LeafFacts {
            id: id.as_str().into(),
            issuer: leaf.authority.as_str().into(),
            bundle: digest(set.bundle_pem().as_bytes()),
            not_before,
            not_after: leaf.issued.not_after,
        };
        Ok((key.to_pem(), chain_pem, facts))
    }
}

fn account_row(sa: SlimServiceAccount) -> Option<(String, String, String)> {
    let m = sa.metadata;
    Some((m.namespace?, m.name?, m.uid?))
}

fn apply_accounts(a: &mut Accounts, change: Change<(String, String, String)>) {
    match change {
        Change::Reset(rows) => {
            a.by_ns.clear();
            for (ns, name, uid) in rows {
                a.by_ns
                    .entry(Arc::from(ns))
                    .or_default()
                    .insert(Arc::from(name), Arc::from(uid));
            }
            a.synced = true;
        }
        Change::Upsert((ns, name, uid)) => {
            a.by_ns
                .entry(Arc::from(ns))
                .or_default()
                .insert(Arc::from(name), Arc::from(uid));
        }
        Change::Delete { namespace, name } => {
            if let Some(m) = a.by_ns.get_mut(namespace.as_str()) {
                m.remove(name.as_str());
                if m.is_empty() {
                    a.by_ns.remove(namespace.as_str());
                }
            }
        }
        Change::Fresh(_) => {}
    }
}

/// The Secret written for `key`.
fn build(
    key: &Key,
    account: &Account,
    key_pem: &str,
    chain_pem: String,
    bundle_pem: &str,
    resource_version: Option<String>,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(key.1.to_string()),
            namespace: Some(key.0.to_string()),
            labels: Some([(MANAGED_BY.to_owned(), MANAGER.to_owned())].into()),
            annotations: Some([(SA_ANNOTATION.to_owned(), account.name.to_string())].into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "ServiceAccount".into(),
                name: account.name.to_string(),
                uid: account.uid.to_string(),
                ..OwnerReference::default()
            }]),
            resource_version,
            ..ObjectMeta::default()
        },
        type_: Some(SECRET_TYPE.into()),
        data: Some(
            [
                (KEY_PEM.to_owned(), ByteString(key_pem.as_bytes().to_vec())),
                (CHAIN_PEM.to_owned(), ByteString(chain_pem.into_bytes())),
                (
                    ROOT_PEM.to_owned(),
                    ByteString(bundle_pem.as_bytes().to_vec()),
                ),
            ]
            .into(),
        ),
        ..Secret::default()
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 || s.code == 404)
}

impl Copier for SecretCopier {
    type Want = Account;
    type Facts = SecretFacts;
    const LABEL: &'static str = "secrets";
    const KIND: &'static str = "Secrets istio.<sa>";
    const OBJECT_KIND: &'static str = "Secret";
    const FOREIGN_REASON: &'static str = "SecretNotOwned";

    fn wanted(&self) -> Option<Vec<(Key, Account)>> {
        let scope = self.scope.borrow().clone();
        if !scope.synced {
            return None;
        }
        let accounts = self.accounts.read_locked();
        if !accounts.synced {
            return None;
        }
        let mut out = Vec::new();
        for ns in &scope.names {
            let Some((ns_key, sas)) = accounts.by_ns.get_key_value(ns.as_str()) else {
                continue;
            };
            for (name, uid) in sas {
                // Secret names are DNS subdomains of at most 253 characters.
                if name.len() + PREFIX.len() > 253 {
                    continue;
                }
                out.push((
                    (ns_key.clone(), Arc::from(format!("{PREFIX}{name}"))),
                    Account {
                        name: name.clone(),
                        uid: uid.clone(),
                    },
                ));
            }
        }
        Some(out)
    }

    fn observed(&self) -> &Shared<SecretFacts> {
        &self.observed
    }

    fn judge(
        &self,
        key: &Key,
        want: &Account,
        seen: Option<&Seen<SecretFacts>>,
        set: &AuthoritySet,
        now: SystemTime,
    ) -> Judgement {
        let Some(seen) = seen else {
            return Judgement::Write("missing");
        };
        judge_facts(
            &seen.facts,
            &key.0,
            want,
            set.trust_domain(),
            &self.bundle_digest(set),
            set.active().id(),
            self.opts.fraction,
            now,
        )
    }

    fn write(
        self: Arc<Self>,
        key: Key,
        want: Account,
        existing: Option<(String, String)>,
        set: Arc<AuthoritySet>,
    ) -> WriteFuture<SecretFacts> {
        Box::pin(async move {
            let this = self.clone();
            let (k, w, s) = (key.clone(), want.clone(), set.clone());
            let made = tokio::task::spawn_blocking(move || {
                let (key_pem, chain_pem, facts) = this.material(&k.0, &w.name, &s)?;
                let rv = existing.map(|(_, rv)| rv);
                Ok::<_, Error>((
                    build(&k, &w, &key_pem, chain_pem, s.bundle_pem(), rv),
                    facts,
                ))
            })
            .await;
            let (secret, facts) = match made {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Written::Failed(e),
                Err(e) => {
                    return Written::Failed(Error::Invalid {
                        what: "signing".into(),
                        reason: e.to_string(),
                    });
                }
            };
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &key.0);
            let update = secret.metadata.resource_version.is_some();
            let result = if update {
                api.replace(&key.1, &PostParams::default(), &secret).await
            } else {
                api.create(&PostParams::default(), &secret).await
            };
            drop(secret);
            match result {
                // Its content is what was just signed: not checked again
                // (the watch event that follows is).
                Ok(written) => match examine_as(&written, |_| Ok(facts)) {
                    Some((k, seen)) => Written::Done(!update, k, seen),
                    None => Written::Conflict,
                },
                Err(e) if !update && is_conflict(&e) => self.collided(&api, &key).await,
                Err(e) if is_conflict(&e) => Written::Conflict,
                Err(e) => Written::Failed(Error::api(format!("writing Secret {}", key.1), e)),
            }
        })
    }
}

impl SecretCopier {
    /// A create found the name taken by a Secret the watch does not show:
    /// of another type (the type is immutable). Ours: deleted, to be
    /// created again; foreign: left alone.
    async fn collided(&self, api: &Api<Secret>, key: &Key) -> Written<SecretFacts> {
        let found = match api.get_opt(&key.1).await {
            Ok(Some(s)) => s,
            Ok(None) => return Written::Conflict,
            Err(e) => return Written::Failed(Error::api(format!("reading Secret {}", key.1), e)),
        };
        if found.type_.as_deref() == Some(SECRET_TYPE) {
            return Written::Conflict;
        }
        let ours = found
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY))
            .is_some_and(|v| v == MANAGER);
        if !ours {
            return Written::Foreign("another type, not labelled as ours");
        }
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: found.metadata.uid.clone(),
                resource_version: found.metadata.resource_version.clone(),
            }),
            ..DeleteParams::default()
        };
        match api.delete(&key.1, &dp).await {
            Ok(_) => {
                tracing::info!(object = %super::copies::shown(key), "deleted our Secret of the wrong type, to create it again");
                Written::Conflict
            }
            Err(e) if is_conflict(&e) => Written::Conflict,
            Err(e) => Written::Failed(Error::api(format!("deleting Secret {}", key.1), e)),
        }
    }
}

/// Compares a Secret's verdict with what the live set calls for.
#[allow(clippy::too_many_arguments)]
pub fn judge_facts(
    facts: &SecretFacts,
    namespace: &str,
    want: &Account,
    trust_domain: &crate::identity::TrustDomain,
    bundle: &[u8; 32],
    active: &str,
    fraction: f64,
    now: SystemTime,
) -> Judgement {
    if !facts.ours {
        return Judgement::Foreign("not labelled workload-ca.io/managed-by=workload-ca");
    }
    let leaf = match &facts.content {
        Ok(l) => l,
        Err(why) => return Judgement::Write(why),
    };
    if facts.owner_uid.as_deref() != Some(&*want.uid) {
        return Judgement::Write("owner");
    }
    match SpiffeId::for_service_account(trust_domain, namespace, &want.name) {
        Ok(id) if id.as_str() == &*leaf.id => {}
        _ => return Judgement::Write("identity"),
    }
    if leaf.bundle != *bundle {
        return Judgement::Write("bundle");
    }
    if &*leaf.issuer != active {
        return Judgement::Write("authority");
    }
    let at = refresh_at(leaf.not_before, leaf.not_after, fraction);
    if now >= at {
        return Judgement::Write("refresh");
    }
    Judgement::Current {
        refresh_at: Some(at),
    }
}

#[cfg(test)]
#[path = "secrets_tests.rs"]
mod tests;

impl super::copies::CopyFacts for SecretFacts {
    fn ours(&self) -> bool {
        self.ours
    }

    fn bundle(&self) -> Option<[u8; 32]> {
        self.bundle
    }
}
