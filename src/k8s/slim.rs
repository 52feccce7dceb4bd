//! Slim decodings of the objects the watch caches keep: only the fields a
//! check reads are decoded, so a list page of 500 pods (tens of megabytes
//! of JSON on a real cluster: containers, env, managed fields) never
//! becomes 500 full `k8s_openapi` Pods in memory.

use std::borrow::Cow;

use kube::core::{NamespaceResourceScope, ObjectMeta};
use serde::{Deserialize, Deserializer, Serialize};

/// The metadata a cache keys on; everything else is skipped unparsed.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    deletion_timestamp: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

fn slim_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = Meta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        deletion_timestamp: m.deletion_timestamp,
        ..ObjectMeta::default()
    })
}

/// A pod: its keys, service account, node and phase.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct SlimPod {
    /// Name, namespace, UID, resourceVersion and deletionTimestamp only.
    #[serde(deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    /// The pod's spec, trimmed.
    #[serde(default)]
    pub spec: SlimPodSpec,
    /// The pod's status, trimmed.
    #[serde(default)]
    pub status: SlimPodStatus,
}

/// The fields of a pod's `spec` the CA reads.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimPodSpec {
    /// `spec.serviceAccountName`.
    pub service_account_name: Option<String>,
    /// `spec.nodeName`, once scheduled.
    pub node_name: Option<String>,
}

/// The fields of a pod's `status` the CA reads.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct SlimPodStatus {
    /// `status.phase` (`Pending`, `Running`, `Succeeded`, ...).
    pub phase: Option<String>,
}

impl kube::Resource for SlimPod {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A service account: its keys alone.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct SlimServiceAccount {
    /// Name, namespace, UID, resourceVersion and deletionTimestamp only.
    #[serde(deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
}

impl kube::Resource for SlimServiceAccount {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "ServiceAccount".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "serviceaccounts".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_pod_decodes_to_what_the_cache_reads() {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "prod", "uid": "u1", "resourceVersion": "42",
                          "deletionTimestamp": "2026-11-30T06:00:00Z",
                          "labels": {"app": "web"}, "managedFields": [{"manager": "x"}]},
            "spec": {"serviceAccountName": "web", "nodeName": "node-a",
                     "containers": [{"name": "c", "image": "i", "env": [{"name": "A", "value": "B"}]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1"}
        });
        let p: SlimPod = serde_json::from_value(json).unwrap();
        assert_eq!(p.metadata.name.as_deref(), Some("web-1"));
        assert_eq!(p.metadata.uid.as_deref(), Some("u1"));
        assert_eq!(p.metadata.resource_version.as_deref(), Some("42"));
        assert!(p.metadata.labels.is_none());
        assert!(p.metadata.deletion_timestamp.is_some());
        assert_eq!(p.spec.node_name.as_deref(), Some("node-a"));
        assert_eq!(p.status.phase.as_deref(), Some("Running"));
        let bare: SlimPod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}})).unwrap();
        assert!(bare.spec.service_account_name.is_none());
    }
}
