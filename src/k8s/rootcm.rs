//! Root distribution: the ConfigMap `istio-ca-root-cert` (key
//! `root-cert.pem`: the whole current trust bundle) in every managed
//! namespace ([`super::scope`]), kept current through rotations.
//!
//! Ours: labelled `workload-ca.io/managed-by: workload-ca`. istiod writes
//! the same name (labelled `istio.io/config: "true"`); such a ConfigMap,
//! or any other without our label, is foreign: never overwritten, reported
//! in an Event and a metric. There is no adoption switch: a CA taking over
//! from istiod is the only one writing once istiod's CA is off, and then
//! the ConfigMaps it left are deleted by hand (an automatic adoption would
//! fight a still-running istiod, each rewriting the other's root).
//!
//! The watch keeps, per ConfigMap, whether it is ours and a digest of its
//! `root-cert.pem`; never its data.

use crate::sync::LockExt;
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use kube::{Client, core::ObjectMeta};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::Error;
use super::cache::CacheOptions;
use super::copies::{Copier, Judgement, Key, Seen, Shared, WriteFuture, Written};
use super::reflect::reflect;
use super::scope::Managed;
use super::secrets::{BundleDigest, MANAGED_BY, MANAGER, ROOT_PEM, digest};
use crate::ca::AuthoritySet;

/// The ConfigMap's name.
pub const NAME: &str = "istio-ca-root-cert";
/// istiod's label on the ConfigMaps it writes.
pub const ISTIOD_LABEL: &str = "istio.io/config";

/// The verdict kept per ConfigMap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CmFacts {
    /// Labelled as ours.
    pub ours: bool,
    /// Labelled by istiod.
    pub istiod: bool,
    /// SHA-256 of `root-cert.pem`, if it has one.
    pub bundle: Option<[u8; 32]>,
}

/// Judges a ConfigMap as it arrives.
pub fn examine(cm: &ConfigMap) -> Option<(Key, Seen<CmFacts>)> {
    let meta = &cm.metadata;
    let (ns, name) = (meta.namespace.as_deref()?, meta.name.as_deref()?);
    if name != NAME {
        return None;
    }
    let label = |k: &str| meta.labels.as_ref().and_then(|l| l.get(k)).cloned();
    let facts = CmFacts {
        ours: label(MANAGED_BY).as_deref() == Some(MANAGER),
        istiod: label(ISTIOD_LABEL).is_some(),
        bundle: cm
            .data
            .as_ref()
            .and_then(|d| d.get(ROOT_PEM))
            .map(|v| digest(v.as_bytes())),
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

fn cm_row(cm: ConfigMap) -> Option<(Key, Seen<CmFacts>)> {
    examine(&cm)
}

/// Compares a ConfigMap's verdict with the live bundle's digest.
pub fn judge_facts(facts: &CmFacts, bundle: &[u8; 32]) -> Judgement {
    if !facts.ours {
        return Judgement::Foreign(if facts.istiod {
            "written by istiod (labelled istio.io/config)"
        } else {
            "not labelled workload-ca.io/managed-by=workload-ca"
        });
    }
    if facts.bundle.as_ref() != Some(bundle) {
        return Judgement::Write("bundle");
    }
    Judgement::Current { refresh_at: None }
}

/// The root ConfigMap copier.
pub struct RootCmCopier {
    client: Client,
    scope: watch::Receiver<Arc<Managed>>,
    observed: Shared<CmFacts>,
    bundle: BundleDigest,
}

impl RootCmCopier {
    /// A copier writing the root ConfigMap into the namespaces of `scope`.
    pub fn new(client: Client, scope: watch::Receiver<Arc<Managed>>) -> Self {
        Self {
            client,
            scope,
            observed: Arc::default(),
            bundle: BundleDigest::default(),
        }
    }

    /// Starts the watch of `istio-ca-root-cert` ConfigMaps; each change
    /// rings `dirty`.
    pub fn spawn_watch(
        &self,
        dirty: Arc<Notify>,
        shutdown: watch::Receiver<bool>,
    ) -> (&'static str, JoinHandle<()>) {
        let observed = self.observed.clone();
        let api: Api<ConfigMap> = Api::all(self.client.clone());
        let opts = CacheOptions {
            fields: Some(format!("metadata.name={NAME}")),
            ..CacheOptions::default()
        };
        let task = tokio::spawn(reflect(
            api,
            "configmaps",
            opts,
            shutdown,
            cm_row,
            move |change| {
                let changed = observed.locked().apply(change);
                if changed {
                    dirty.notify_one();
                }
            },
        ));
        ("root-configmaps", task)
    }

    fn bundle_digest(&self, set: &AuthoritySet) -> [u8; 32] {
        self.bundle.of(set)
    }
}

fn build(key: &Key, bundle_pem: &str, resource_version: Option<String>) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(key.1.to_string()),
            namespace: Some(key.0.to_string()),
            labels: Some([(MANAGED_BY.to_owned(), MANAGER.to_owned())].into()),
            resource_version,
            ..ObjectMeta::default()
        },
        data: Some([(ROOT_PEM.to_owned(), bundle_pem.to_owned())].into()),
        ..ConfigMap::default()
    }
}

impl Copier for RootCmCopier {
    type Want = ();
    type Facts = CmFacts;
    const LABEL: &'static str = "configmaps";
    const KIND: &'static str = "ConfigMaps istio-ca-root-cert";
    const OBJECT_KIND: &'static str = "ConfigMap";
    const FOREIGN_REASON: &'static str = "ConfigMapNotOwned";

    fn wanted(&self) -> Option<Vec<(Key, ())>> {
        let scope = self.scope.borrow().clone();
        if !scope.synced {
            return None;
        }
        let name: Arc<str> = Arc::from(NAME);
        Some(
            scope
                .names
                .iter()
                .map(|ns| ((Arc::from(ns.as_str()), name.clone()), ()))
                .collect(),
        )
    }

    fn observed(&self) -> &Shared<CmFacts> {
        &self.observed
    }

    fn judge(
        &self,
        _key: &Key,
        _want: &(),
        seen: Option<&Seen<CmFacts>>,
        set: &AuthoritySet,
        _now: SystemTime,
    ) -> Judgement {
        match seen {
            None => Judgement::Write("missing"),
            Some(s) => judge_facts(&s.facts, &self.bundle_digest(set)),
        }
    }

    fn write(
        self: Arc<Self>,
        key: Key,
        _want: (),
        existing: Option<(String, String)>,
        set: Arc<AuthoritySet>,
    ) -> WriteFuture<CmFacts> {
        Box::pin(async move {
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &key.0);
            let update = existing.is_some();
            let cm = build(&key, set.bundle_pem(), existing.map(|(_, rv)| rv));
            let result = if update {
                api.replace(&key.1, &PostParams::default(), &cm).await
            } else {
                api.create(&PostParams::default(), &cm).await
            };
            match result {
                Ok(written) => match examine(&written) {
                    Some((k, seen)) => Written::Done(!update, k, seen),
                    None => Written::Conflict,
                },
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Written::Conflict,
                Err(e) => Written::Failed(Error::api(format!("writing ConfigMap {}", key.1), e)),
            }
        })
    }
}

impl super::copies::CopyFacts for CmFacts {
    fn ours(&self) -> bool {
        self.ours
    }

    fn bundle(&self) -> Option<[u8; 32]> {
        self.bundle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(labels: &[(&str, &str)], root: Option<&str>) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(NAME.into()),
                namespace: Some("prod".into()),
                uid: Some("u".into()),
                resource_version: Some("5".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            data: root.map(|r| [(ROOT_PEM.to_owned(), r.to_owned())].into()),
            ..ConfigMap::default()
        }
    }

    #[test]
    fn ours_current_stale_and_foreign() {
        let bundle = digest(b"B");
        let (_, s) = examine(&cm(&[(MANAGED_BY, MANAGER)], Some("B"))).unwrap();
        assert_eq!(
            judge_facts(&s.facts, &bundle),
            Judgement::Current { refresh_at: None }
        );
        let (_, s) = examine(&cm(&[(MANAGED_BY, MANAGER)], Some("A"))).unwrap();
        assert_eq!(judge_facts(&s.facts, &bundle), Judgement::Write("bundle"));
        let (_, s) = examine(&cm(&[(MANAGED_BY, MANAGER)], None)).unwrap();
        assert_eq!(judge_facts(&s.facts, &bundle), Judgement::Write("bundle"));
        let (_, s) = examine(&cm(&[(ISTIOD_LABEL, "true")], Some("B"))).unwrap();
        assert!(matches!(
            judge_facts(&s.facts, &bundle),
            Judgement::Foreign(w) if w.contains("istiod")
        ));
        let (_, s) = examine(&cm(&[(MANAGED_BY, "someone-else")], Some("B"))).unwrap();
        assert!(matches!(
            judge_facts(&s.facts, &bundle),
            Judgement::Foreign(_)
        ));
        let mut other = cm(&[], None);
        other.metadata.name = Some("kube-root-ca.crt".into());
        assert!(examine(&other).is_none());
    }
}
