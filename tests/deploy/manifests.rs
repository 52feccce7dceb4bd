//! `kubectl kustomize` of deploy/, and every rendered document parsed
//! strictly into its k8s-openapi type: deserialized, serialized again, and
//! required to come out equal, so a misspelled or unknown field (dropped by
//! the typed struct) fails, as does a kind this test does not know.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Everything kustomize can build under deploy/: the bases and overlays.
pub const KUSTOMIZATIONS: &[&str] = &[
    "ca",
    "agent",
    "grafana",
    "overlays/standalone",
    "overlays/ca-only",
    "overlays/istio",
    "overlays/monitoring",
    "overlays/secret-mode",
    "overlays/token-review",
    "ca-secret",
];

pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// One rendered object, typed.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(Box<Namespace>),
    ServiceAccount(Box<ServiceAccount>),
    Service(Box<Service>),
    ConfigMap(Box<ConfigMap>),
    Deployment(Box<Deployment>),
    DaemonSet(Box<DaemonSet>),
    PodDisruptionBudget(Box<PodDisruptionBudget>),
    Role(Box<Role>),
    ClusterRole(Box<ClusterRole>),
    RoleBinding(Box<RoleBinding>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
}

/// `kubectl kustomize deploy/<dir>`: the YAML stream. Fails (never skips)
/// without kubectl: `.ci/test` installs it.
pub fn render_yaml(dir: &str) -> String {
    let path = deploy_dir().join(dir);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "kubectl is needed to render deploy/ ({e}); install it (see .ci/test) \
                 or put it on PATH"
            )
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 from kubectl")
}

/// The documents of a YAML stream, as JSON values.
pub fn documents(yaml: &str) -> Vec<Value> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(yaml).unwrap_or_else(|e| panic!("YAML: {e}\n{yaml}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// Values equal once `null`s, empty maps and empty lists are dropped (what
/// serialization omits).
pub fn normalize(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), normalize(v)))
                .filter(|(_, v)| !is_empty(v))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalize).collect()),
        other => other.clone(),
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// The first difference between two values, as a JSON path.
pub fn first_difference(path: &str, a: &Value, b: &Value) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys()) {
                let (va, vb) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                if let Some(d) = first_difference(&format!("{path}.{k}"), va, vb) {
                    return Some(d);
                }
            }
            None
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (va, vb))| first_difference(&format!("{path}[{i}]"), va, vb)),
        _ if a == b => None,
        _ => Some(format!(
            "{path}: {a} in the manifest, {b} after the typed round trip"
        )),
    }
}

/// Deserializes `doc` into `T` and requires the round trip to keep it.
pub fn strict<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    match first_difference("", &normalize(doc), &normalize(&back)) {
        None => Ok(typed),
        Some(d) => Err(format!(
            "not kept by the typed struct (unknown field?): {d}"
        )),
    }
}

/// A document as its typed object; unknown kinds are an error.
pub fn typed(doc: &Value) -> Result<Object, String> {
    let api = doc["apiVersion"].as_str().unwrap_or("");
    let kind = doc["kind"].as_str().unwrap_or("");
    Ok(match (api, kind) {
        ("v1", "Namespace") => Object::Namespace(Box::new(strict(doc)?)),
        ("v1", "ServiceAccount") => Object::ServiceAccount(Box::new(strict(doc)?)),
        ("v1", "Service") => Object::Service(Box::new(strict(doc)?)),
        ("v1", "ConfigMap") => Object::ConfigMap(Box::new(strict(doc)?)),
        ("apps/v1", "Deployment") => Object::Deployment(Box::new(strict(doc)?)),
        ("apps/v1", "DaemonSet") => Object::DaemonSet(Box::new(strict(doc)?)),
        ("policy/v1", "PodDisruptionBudget") => Object::PodDisruptionBudget(Box::new(strict(doc)?)),
        ("rbac.authorization.k8s.io/v1", "Role") => Object::Role(Box::new(strict(doc)?)),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
            Object::ClusterRole(Box::new(strict(doc)?))
        }
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
            Object::RoleBinding(Box::new(strict(doc)?))
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            Object::ClusterRoleBinding(Box::new(strict(doc)?))
        }
        _ => return Err(format!("unknown kind {api} {kind}: add it to typed()")),
    })
}

/// `kubectl kustomize deploy/<dir>`, every document typed (panics naming
/// the document that is not).
pub fn render(dir: &str) -> Vec<Object> {
    documents(&render_yaml(dir))
        .iter()
        .map(|d| {
            typed(d).unwrap_or_else(|e| {
                panic!("deploy/{dir}: {} {}: {e}", d["kind"], d["metadata"]["name"])
            })
        })
        .collect()
}

pub fn deployments(objs: &[Object]) -> Vec<&Deployment> {
    objs.iter()
        .filter_map(|o| match o {
            Object::Deployment(d) => Some(&**d),
            _ => None,
        })
        .collect()
}

pub fn daemonsets(objs: &[Object]) -> Vec<&DaemonSet> {
    objs.iter()
        .filter_map(|o| match o {
            Object::DaemonSet(d) => Some(&**d),
            _ => None,
        })
        .collect()
}

pub fn services(objs: &[Object]) -> Vec<&Service> {
    objs.iter()
        .filter_map(|o| match o {
            Object::Service(d) => Some(&**d),
            _ => None,
        })
        .collect()
}

/// A container's plain environment value (`None`: absent or from a ref).
pub fn env_value(c: &k8s_openapi::api::core::v1::Container, name: &str) -> Option<String> {
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

/// A container's environment variable taken from the pod's own field.
pub fn env_field(c: &k8s_openapi::api::core::v1::Container, name: &str) -> Option<String> {
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value_from
        .as_ref()?
        .field_ref
        .as_ref()
        .map(|f| f.field_path.clone())
}
