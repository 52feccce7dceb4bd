//! The namespaces the CA writes copies into (secret-mode Secrets, root
//! ConfigMaps): those a label selector picks, less an exclusion list, less
//! those being deleted (the API server refuses new objects there, and the
//! namespace controller removes what they hold).
//!
//! Followed with a watch (the shared reflector, the selector applied by the
//! API server, so a namespace that stops matching is seen deleted) and
//! published on a `watch` channel: readers always see the live set.

use crate::sync::LockExt;
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use kube::core::{ClusterResourceScope, ObjectMeta};
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::cache::CacheOptions;
use super::reflect::{Change, Freshen, reflect};

/// Which namespaces: every one, or those a label selector picks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// `*`: every namespace.
    All,
    /// A label selector, as `kubectl get -l` takes it.
    Labels(String),
}

impl FromStr for Selector {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s {
            "" => Err("empty selector: give a label selector, or * for every namespace".into()),
            "*" => Ok(Self::All),
            _ if s.chars().any(char::is_control) => {
                Err("a label selector has no control characters".into())
            }
            _ => Ok(Self::Labels(s.to_owned())),
        }
    }
}

/// The managed namespaces now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Managed {
    /// The watch's first list is in (before that, nothing is known: no
    /// writer acts on an empty set it has not seen).
    pub synced: bool,
    /// The managed namespaces' names.
    pub names: BTreeSet<String>,
}

/// A namespace: its metadata (namespaces are few) and phase; its spec is
/// not decoded.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct SlimNamespace {
    /// Its metadata: the name and deletionTimestamp are read.
    pub metadata: ObjectMeta,
    /// Its status.
    #[serde(default)]
    pub status: SlimNsStatus,
}

/// The part of a namespace's status the CA reads.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct SlimNsStatus {
    /// `status.phase`: `Active` or `Terminating`.
    pub phase: Option<String>,
}

impl kube::Resource for SlimNamespace {
    type DynamicType = ();
    type Scope = ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Namespace".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "namespaces".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// What the reflector keeps of a namespace: its name, and whether it may
/// receive objects.
pub(crate) struct NsRow {
    name: String,
    open: bool,
}

fn ns_row(ns: SlimNamespace) -> Option<NsRow> {
    let terminating = ns.metadata.deletion_timestamp.is_some()
        || ns.status.phase.as_deref() == Some("Terminating");
    Some(NsRow {
        name: ns.metadata.name?,
        open: !terminating,
    })
}

/// Whether `name` is managed under `exclude`.
pub fn admitted(name: &str, exclude: &[String]) -> bool {
    !exclude.iter().any(|e| e == name)
}

/// Follows the namespaces `selector` picks, less `exclude`, until
/// `shutdown`.
pub fn spawn(
    client: Client,
    selector: &Selector,
    exclude: Vec<String>,
    shutdown: watch::Receiver<bool>,
) -> (watch::Receiver<Arc<Managed>>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(Arc::new(Managed::default()));
    let opts = CacheOptions {
        labels: match selector {
            Selector::All => None,
            Selector::Labels(l) => Some(l.clone()),
        },
        ..CacheOptions::default()
    };
    let api: Api<SlimNamespace> = Api::all(client);
    let names = Mutex::new(BTreeSet::<String>::new());
    let synced = std::sync::atomic::AtomicBool::new(false);
    let sink = move |change: Change<NsRow>| {
        let mut set = names.locked();
        match change {
            Change::Reset(rows) => {
                set.clear();
                set.extend(
                    rows.into_iter()
                        .filter(|r| r.open && admitted(&r.name, &exclude))
                        .map(|r| r.name),
                );
            }
            Change::Upsert(r) => {
                if r.open && admitted(&r.name, &exclude) {
                    set.insert(r.name);
                } else {
                    set.remove(&r.name);
                }
            }
            Change::Delete { name, .. } => {
                set.remove(&name);
            }
            Change::Fresh(Freshen::Synced(_)) => {
                synced.store(true, std::sync::atomic::Ordering::Release);
            }
            Change::Fresh(_) => return,
        }
        let next = Managed {
            synced: synced.load(std::sync::atomic::Ordering::Acquire),
            names: set.clone(),
        };
        tx.send_if_modified(|cur| {
            if **cur == next {
                false
            } else {
                *cur = Arc::new(next);
                true
            }
        });
    };
    let task = tokio::spawn(reflect(api, "namespaces", opts, shutdown, ns_row, sink));
    (rx, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse() {
        assert_eq!("*".parse::<Selector>(), Ok(Selector::All));
        assert_eq!(
            "istio-injection=enabled".parse::<Selector>(),
            Ok(Selector::Labels("istio-injection=enabled".into()))
        );
        assert!("".parse::<Selector>().is_err());
        assert!("a\nb".parse::<Selector>().is_err());
    }

    #[test]
    fn terminating_namespaces_are_closed() {
        let ns: SlimNamespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "gone", "resourceVersion": "7", "labels": {"a": "b"}},
            "status": {"phase": "Terminating"}
        }))
        .unwrap();
        let row = ns_row(ns).unwrap();
        assert_eq!(row.name, "gone");
        assert!(!row.open);
        let ns: SlimNamespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "prod"}})).unwrap();
        assert!(ns_row(ns).unwrap().open);
        assert!(!admitted("kube-system", &["kube-system".into()]));
    }
}
