//! Kubernetes RBAC evaluation in test code: which rule elements of the
//! rendered Roles, ClusterRoles and their bindings allow a logged request.
//!
//! It follows the API server's authorizer (`rbac/v1` PolicyRule matching):
//! verbs, apiGroups, resources (`res`, `res/sub`, `*/sub`, `*`),
//! resourceNames (a request without a name, such as a list or a create,
//! matches only rules without resourceNames), nonResourceURLs (exact or
//! with a trailing `*`, only through a ClusterRoleBinding); a RoleBinding
//! grants its rules only in its own namespace; subjects are
//! ServiceAccounts, Users or Groups.
//!
//! Built-in grants assumed of a real cluster: none bound (every binding
//! the CA needs is in deploy/), and the definition of the one built-in
//! ClusterRole deploy/ binds, `system:service-account-issuer-discovery`
//! (`get` on `/.well-known/openid-configuration` and `/openid/v1/jwks`),
//! in [`builtin_cluster_role`].

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::rbac::v1::{PolicyRule, RoleRef, Subject};

use super::manifests::Object;

/// A request as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Request {
    pub user: String,
    pub groups: Vec<String>,
    pub verb: String,
    pub api_group: String,
    /// `pods` or `pods/status`; empty for a non-resource URL.
    pub resource: String,
    pub namespace: String,
    pub name: String,
    /// The URL path (non-resource requests).
    pub path: String,
}

impl Request {
    pub fn describe(&self) -> String {
        if self.resource.is_empty() {
            format!("{} {}", self.verb, self.path)
        } else {
            let group = if self.api_group.is_empty() {
                "core"
            } else {
                &self.api_group
            };
            let ns = if self.namespace.is_empty() {
                "(cluster)".to_owned()
            } else {
                format!("ns={}", self.namespace)
            };
            let name = if self.name.is_empty() {
                String::new()
            } else {
                format!(" name={}", self.name)
            };
            format!("{} {group}/{} {ns}{name}", self.verb, self.resource)
        }
    }
}

/// One element of a rule: a single (group, resource, verb, name) or
/// (URL, verb) it grants, named by where it comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Element {
    /// `ClusterRole/x via ClusterRoleBinding/y` or `Role/ns/x via ...`.
    pub source: String,
    pub api_group: String,
    pub resource: String,
    pub verb: String,
    /// Empty: any name.
    pub resource_name: String,
    pub url: String,
}

impl Element {
    fn matches(&self, r: &Request) -> bool {
        if !self.url.is_empty() {
            return r.resource.is_empty()
                && (self.verb == r.verb || self.verb == "*")
                && (self.url == r.path
                    || self.url == "*"
                    || (self.url.ends_with('*')
                        && r.path.starts_with(self.url.trim_end_matches('*'))));
        }
        if r.resource.is_empty() {
            return false;
        }
        let sub = r.resource.split_once('/').map(|(_, s)| s);
        (self.verb == r.verb || self.verb == "*")
            && (self.api_group == r.api_group || self.api_group == "*")
            && (self.resource == r.resource
                || self.resource == "*"
                || sub.is_some_and(|s| self.resource == format!("*/{s}")))
            && (self.resource_name.is_empty() || self.resource_name == r.name)
    }
}

/// A binding's grant: its elements, for whom, and in which namespace
/// (`None`: everywhere, a ClusterRoleBinding).
#[derive(Debug, Clone)]
struct Grant {
    subjects: Vec<Subject>,
    namespace: Option<String>,
    elements: Vec<Element>,
}

/// The RBAC objects of a rendered overlay.
pub struct Rbac {
    grants: Vec<Grant>,
    /// Problems found while reading (a binding to a missing role, a
    /// wildcard).
    pub problems: Vec<String>,
}

/// The built-in ClusterRoles deploy/ may bind (see the module doc).
pub fn builtin_cluster_role(name: &str) -> Option<Vec<PolicyRule>> {
    match name {
        // Bound to system:authenticated in every cluster (a default
        // binding; see `Rbac::from_objects`).
        "system:discovery" => Some(vec![PolicyRule {
            non_resource_urls: Some(
                [
                    "/api",
                    "/api/*",
                    "/apis",
                    "/apis/*",
                    "/healthz",
                    "/livez",
                    "/openapi",
                    "/openapi/*",
                    "/readyz",
                    "/version",
                    "/version/",
                ]
                .map(String::from)
                .to_vec(),
            ),
            verbs: vec!["get".into()],
            ..Default::default()
        }]),
        "system:service-account-issuer-discovery" => Some(vec![PolicyRule {
            non_resource_urls: Some(vec![
                "/.well-known/openid-configuration".into(),
                "/openid/v1/jwks".into(),
            ]),
            verbs: vec!["get".into()],
            ..Default::default()
        }]),
        _ => None,
    }
}

fn elements(
    source: &str,
    rules: &[PolicyRule],
    cluster: bool,
    problems: &mut Vec<String>,
) -> Vec<Element> {
    let mut out = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let src = format!("{source} rule {i}");
        let all = |v: &Option<Vec<String>>| v.clone().unwrap_or_default();
        let (groups, resources, names, urls) = (
            all(&rule.api_groups),
            all(&rule.resources),
            all(&rule.resource_names),
            all(&rule.non_resource_urls),
        );
        for x in rule
            .verbs
            .iter()
            .chain(&groups)
            .chain(&resources)
            .chain(&urls)
        {
            if x.contains('*') {
                problems.push(format!("{src}: wildcard {x:?} (not least privilege)"));
            }
        }
        if !urls.is_empty() && (!resources.is_empty() || !cluster) {
            problems.push(format!(
                "{src}: nonResourceURLs only work alone in a ClusterRole bound cluster-wide"
            ));
        }
        for verb in &rule.verbs {
            for url in &urls {
                out.push(Element {
                    source: src.clone(),
                    verb: verb.clone(),
                    url: url.clone(),
                    api_group: String::new(),
                    resource: String::new(),
                    resource_name: String::new(),
                });
            }
            for g in &groups {
                for r in &resources {
                    let names = if names.is_empty() {
                        vec![String::new()]
                    } else {
                        names.clone()
                    };
                    for n in names {
                        out.push(Element {
                            source: src.clone(),
                            api_group: g.clone(),
                            resource: r.clone(),
                            verb: verb.clone(),
                            resource_name: n,
                            url: String::new(),
                        });
                    }
                }
            }
        }
    }
    out
}

impl Rbac {
    pub fn from_objects(objs: &[Object]) -> Self {
        let mut roles: BTreeMap<String, Vec<PolicyRule>> = BTreeMap::new();
        let mut defined = BTreeMap::new();
        let mut problems_early = Vec::new();
        for o in objs {
            match o {
                Object::Role(r) => {
                    let key = format!(
                        "Role/{}/{}",
                        r.metadata.namespace.clone().unwrap_or_default(),
                        r.metadata.name.clone().unwrap_or_default()
                    );
                    roles.insert(key.clone(), r.rules.clone().unwrap_or_default());
                    defined.insert(key, false);
                }
                Object::ClusterRole(r) => {
                    let key = format!(
                        "ClusterRole/{}",
                        r.metadata.name.clone().unwrap_or_default()
                    );
                    // Aggregation hands these rules to other roles (or
                    // others' rules to this one): nothing here checks that.
                    let aggregates = r
                        .metadata
                        .labels
                        .iter()
                        .flatten()
                        .any(|(k, _)| k.starts_with("rbac.authorization.k8s.io/aggregate-to-"));
                    if aggregates || r.aggregation_rule.is_some() {
                        problems_early.push(format!("{key}: aggregation is not allowed"));
                    }
                    roles.insert(key.clone(), r.rules.clone().unwrap_or_default());
                    defined.insert(key, false);
                }
                _ => {}
            }
        }
        let mut problems = problems_early;
        let mut grants = Vec::new();
        let mut bind = |kind: &str,
                        name: &str,
                        ns: Option<String>,
                        role_ref: &RoleRef,
                        subjects: Vec<Subject>| {
            let key = match role_ref.kind.as_str() {
                "Role" => format!("Role/{}/{}", ns.clone().unwrap_or_default(), role_ref.name),
                _ => format!("ClusterRole/{}", role_ref.name),
            };
            let rules = match roles.get(&key) {
                Some(r) => {
                    defined.insert(key.clone(), true);
                    r.clone()
                }
                None => match builtin_cluster_role(&role_ref.name) {
                    Some(r) if role_ref.kind == "ClusterRole" => r,
                    _ => {
                        problems.push(format!("{kind}/{name}: no {key} to bind"));
                        return;
                    }
                },
            };
            // Only service accounts: a group or user subject hands the
            // CA's rights to whoever else is in it.
            for s in &subjects {
                if s.kind != "ServiceAccount" {
                    problems.push(format!(
                        "{kind}/{name}: binds {} {:?}; only service accounts may be bound",
                        s.kind, s.name
                    ));
                }
            }
            let source = format!("{key} via {kind}/{name}");
            let cluster = ns.is_none();
            grants.push(Grant {
                subjects,
                namespace: ns,
                elements: elements(&source, &rules, cluster, &mut problems),
            });
        };
        for o in objs {
            match o {
                Object::RoleBinding(b) => bind(
                    "RoleBinding",
                    b.metadata.name.as_deref().unwrap_or(""),
                    Some(b.metadata.namespace.clone().unwrap_or_default()),
                    &b.role_ref,
                    b.subjects.clone().unwrap_or_default(),
                ),
                Object::ClusterRoleBinding(b) => bind(
                    "ClusterRoleBinding",
                    b.metadata.name.as_deref().unwrap_or(""),
                    None,
                    &b.role_ref,
                    b.subjects.clone().unwrap_or_default(),
                ),
                _ => {}
            }
        }
        // The cluster's own default binding every authenticated client
        // has: API discovery.
        if let Some(rules) = builtin_cluster_role("system:discovery") {
            let source =
                "ClusterRole/system:discovery via ClusterRoleBinding/system:discovery (built in)";
            grants.push(Grant {
                subjects: vec![Subject {
                    kind: "Group".into(),
                    name: "system:authenticated".into(),
                    api_group: Some("rbac.authorization.k8s.io".into()),
                    namespace: None,
                }],
                namespace: None,
                // Its wildcards are the cluster's, not ours to judge.
                elements: elements(source, &rules, true, &mut Vec::new()),
            });
        }
        for (role, bound) in &defined {
            if !*bound {
                problems.push(format!("{role} is bound to nobody"));
            }
        }
        Self { grants, problems }
    }

    fn applies(g: &Grant, user: &str, groups: &[String]) -> bool {
        g.subjects.iter().any(|s| match s.kind.as_str() {
            "ServiceAccount" => {
                user == format!(
                    "system:serviceaccount:{}:{}",
                    s.namespace.as_deref().unwrap_or(""),
                    s.name
                )
            }
            "User" => user == s.name,
            "Group" => groups.contains(&s.name),
            _ => false,
        })
    }

    /// Every service account any binding names, as `ns/name`.
    pub fn bound_accounts(&self) -> BTreeSet<String> {
        self.grants
            .iter()
            .flat_map(|g| g.subjects.iter())
            .filter(|s| s.kind == "ServiceAccount")
            .map(|s| format!("{}/{}", s.namespace.as_deref().unwrap_or(""), s.name))
            .collect()
    }

    /// Every element granted to `user` (in `groups`).
    pub fn elements_of(&self, user: &str, groups: &[String]) -> BTreeSet<Element> {
        self.grants
            .iter()
            .filter(|g| Self::applies(g, user, groups))
            .flat_map(|g| g.elements.iter().cloned())
            .collect()
    }

    /// The elements that allow `r` (empty: forbidden).
    pub fn allowing(&self, r: &Request) -> Vec<Element> {
        self.grants
            .iter()
            .filter(|g| Self::applies(g, &r.user, &r.groups))
            .filter(|g| match &g.namespace {
                None => true,
                Some(ns) => !r.resource.is_empty() && r.namespace == *ns,
            })
            .flat_map(|g| g.elements.iter().filter(|e| e.matches(r)).cloned())
            .collect()
    }

    /// The elements credited with allowing `r`: for a request naming an
    /// object, those naming it when there are any (so an element for any
    /// name is not counted as used by a request a narrower one covers).
    pub fn credited(&self, r: &Request) -> Vec<Element> {
        let all = self.allowing(r);
        if r.name.is_empty() || !all.iter().any(|e| e.resource_name == r.name) {
            return all;
        }
        all.into_iter()
            .filter(|e| e.resource_name == r.name)
            .collect()
    }
}
