//! The CA's trust bundle as a signer-linked ClusterTrustBundle (KEP-3257):
//! `<signer name with / as :>:<suffix>` (e.g. `workload-ca.io:spiffe:primary`),
//! `spec.signerName` set, `spec.trustBundle` = every root the live
//! authority set trusts (the active one, a prepared one, a retiring one).
//! Pods mount it with a `clusterTrustBundle` projected volume, by name or
//! by `signerName` plus the label selector `workload-ca.io/bundle=<suffix>`
//! (the kubelet keeps the file current).
//!
//! Written at `v1`, or at `v1beta1` where `v1` is not served (discovery at
//! start). Only the leader writes (create, or replace with the
//! resourceVersion read, so a write never undoes a change it did not see);
//! every replica watches the object, so an edit or a deletion is repaired
//! at once and the copy counter always says what the API server holds.
//!
//! The copy counter ([`Publisher::counter`], kind `ClusterTrustBundle`,
//! total 1) compares what the object holds with the live set's bundle, so
//! a rotation's activate (and retire) gate waits until the bundle that
//! trusts the prepared root is published and its readers have had
//! `--bundle-propagation` to see it.

use crate::sync::LockExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

use super::Error;
use super::cache::{CacheOptions, Change, reflect};
use crate::ca::AuthoritySet;
use crate::ca::rotation::{Copies, CopyCounter};

/// What the rotation evidence calls these copies.
pub const KIND: &str = "ClusterTrustBundle";
/// The label pods select the bundle with (its value: the suffix).
pub const LABEL: &str = "workload-ca.io/bundle";
/// How often the object is checked even when nothing was heard.
const RESYNC: Duration = Duration::from_secs(60);

/// The object's name for `signer` and `suffix`.
pub fn name(signer: &str, suffix: &str) -> String {
    format!("{}:{suffix}", signer.replace('/', ":"))
}

/// What the API server holds, as last read or written.
#[derive(Default)]
struct Held {
    /// The trustBundle held (`None`: no object).
    bundle: Option<String>,
    /// Since when it holds that.
    since: Option<SystemTime>,
    /// Whether it is ours as we would write it (labels, signer name).
    shaped: bool,
}

/// A ClusterTrustBundle publisher.
pub struct Publisher {
    client: kube::Client,
    signer: String,
    name: String,
    suffix: String,
    authorities: watch::Receiver<Arc<AuthoritySet>>,
    leader: watch::Receiver<bool>,
    held: Mutex<Held>,
    changed: Notify,
}

impl Publisher {
    /// A publisher of `authorities`' bundle for `signer` (the object named
    /// after it and `suffix`), writing while `leader` is true.
    pub fn new(
        client: kube::Client,
        signer: &str,
        suffix: &str,
        authorities: watch::Receiver<Arc<AuthoritySet>>,
        leader: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            signer: signer.to_owned(),
            name: name(signer, suffix),
            suffix: suffix.to_owned(),
            authorities,
            leader,
            held: Mutex::new(Held::default()),
            changed: Notify::new(),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.locked()
    }

    /// Records what the object holds now.
    fn observe(&self, obj: Option<&Value>, now: SystemTime) {
        let bundle = obj
            .and_then(|o| o.pointer("/spec/trustBundle"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let shaped = obj.is_some_and(|o| {
            o.pointer("/spec/signerName").and_then(Value::as_str) == Some(self.signer.as_str())
                && o.pointer(&format!("/metadata/labels/{}", LABEL.replace('/', "~1")))
                    .and_then(Value::as_str)
                    == Some(self.suffix.as_str())
        });
        let mut h = self.held();
        if h.bundle != bundle {
            h.bundle = bundle;
            h.since = Some(now);
        }
        h.shaped = shaped;
    }

    /// The copy counter for the rotation evidence.
    pub fn counter(self: &Arc<Self>, propagation: Duration) -> CopyCounter {
        let this = self.clone();
        Arc::new(move |_now: SystemTime| {
            if !*this.leader.borrow() {
                return Copies::not_writing(KIND);
            }
            let set = this.authorities.borrow().clone();
            let h = this.held();
            let current = h.bundle.as_deref() == Some(set.bundle_pem());
            Copies {
                kind: KIND.to_owned(),
                writer: true,
                generation: set.generation(),
                total: 1,
                current: usize::from(current),
                settled_since: if current { h.since } else { None },
                propagation,
                behind: if current {
                    Vec::new()
                } else {
                    vec![this.name.clone()]
                },
            }
        })
    }

    /// Runs until `shutdown`: discovery, the watch (every replica), the
    /// writes (while leading).
    pub fn spawn(self: &Arc<Self>, shutdown: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let Some(version) = discover(&this.client, shutdown.clone()).await else {
                return;
            };
            let ar = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(
                    super::discovery::CERTIFICATES,
                    version,
                    "ClusterTrustBundle",
                ),
                "clustertrustbundles",
            );
            tracing::info!(name = %this.name, version, "publishing the trust bundle as a ClusterTrustBundle");
            let api: Api<DynamicObject> = Api::all_with(this.client.clone(), &ar);
            let watch_task = {
                let me = this.clone();
                let opts = CacheOptions {
                    fields: Some(format!("metadata.name={}", this.name)),
                    ..CacheOptions::default()
                };
                tokio::spawn(reflect(
                    api.clone(),
                    KIND,
                    opts,
                    shutdown.clone(),
                    |o: DynamicObject| serde_json::to_value(o).ok(),
                    move |c| {
                        let now = SystemTime::now();
                        match c {
                            Change::Reset(rows) => me.observe(rows.first(), now),
                            Change::Upsert(o) => me.observe(Some(&o), now),
                            Change::Delete { .. } => me.observe(None, now),
                            Change::Fresh(_) => return,
                        }
                        me.changed.notify_one();
                    },
                ))
            };
            this.run(&api, &ar, shutdown).await;
            let _ = watch_task.await;
        })
    }

    async fn run(
        &self,
        api: &Api<DynamicObject>,
        ar: &ApiResource,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut leader = self.leader.clone();
        let mut authorities = self.authorities.clone();
        let mut backoff = Duration::from_millis(200);
        loop {
            if *shutdown.borrow() {
                return;
            }
            let mut wait = RESYNC;
            if *leader.borrow_and_update() {
                match self.reconcile(api, ar).await {
                    Ok(()) => backoff = Duration::from_millis(200),
                    Err(e) => {
                        tracing::warn!(error = %e, name = %self.name, "ClusterTrustBundle not written; retrying");
                        wait = backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
            authorities.mark_unchanged();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.changed.notified() => {}
                _ = authorities.changed() => {}
                _ = leader.changed() => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One pass: make the object hold the live bundle.
    async fn reconcile(&self, api: &Api<DynamicObject>, ar: &ApiResource) -> Result<(), Error> {
        let bundle = self.authorities.borrow().bundle_pem().to_owned();
        {
            let h = self.held();
            if h.bundle.as_deref() == Some(bundle.as_str()) && h.shaped {
                return Ok(());
            }
        }
        let existing = api
            .get_opt(&self.name)
            .await
            .map_err(|e| Error::api("reading the ClusterTrustBundle", e))?;
        let mut obj = DynamicObject::new(&self.name, ar);
        obj.metadata.labels = Some([(LABEL.to_owned(), self.suffix.clone())].into());
        obj.data = json!({"spec": {"signerName": self.signer, "trustBundle": bundle}});
        if !*self.leader.borrow() {
            return Ok(());
        }
        let written = match existing {
            None => api.create(&PostParams::default(), &obj).await,
            Some(old) => {
                let old_json = serde_json::to_value(&old).unwrap_or(Value::Null);
                self.observe(Some(&old_json), SystemTime::now());
                {
                    let h = self.held();
                    if h.bundle.as_deref() == Some(bundle.as_str()) && h.shaped {
                        return Ok(());
                    }
                }
                obj.metadata.resource_version = old.metadata.resource_version.clone();
                let mut labels = old.metadata.labels.clone().unwrap_or_default();
                labels.insert(LABEL.to_owned(), self.suffix.clone());
                obj.metadata.labels = Some(labels);
                obj.metadata.annotations = old.metadata.annotations.clone();
                api.replace(&self.name, &PostParams::default(), &obj).await
            }
        }
        .map_err(|e| Error::api("writing the ClusterTrustBundle", e))?;
        let v = serde_json::to_value(&written).unwrap_or(Value::Null);
        self.observe(Some(&v), SystemTime::now());
        tracing::info!(name = %self.name, generation = self.authorities.borrow().generation(), "ClusterTrustBundle holds the trust bundle");
        Ok(())
    }
}

/// The version to write at, retried until found (or shutdown: `None`).
async fn discover(client: &kube::Client, shutdown: watch::Receiver<bool>) -> Option<&'static str> {
    super::discovery::wait_for_version(
        client,
        "clustertrustbundles",
        super::discovery::trust_bundle_version,
        shutdown,
    )
    .await
}
