//! Who may get which identity: the one place that decides it.
//!
//! A caller proves a service account (a token, or a current certificate).
//! On Kubernetes the proof is also checked against the cluster as the CA's
//! watch caches see it ([`ClusterView`]): the pod and service account a
//! token is bound to must still exist with the same UIDs
//! ([`check_binding`]). A caller asking for another identity
//! (`ImpersonatedIdentity`, how a node agent such as ztunnel gets
//! certificates for the pods on its node) is allowed only by
//! [`authorize`]: its service account is a trusted node account, and a pod
//! running the requested service account is on the caller's node.
//!
//! Not checked here: the token's signature, times and audience (the
//! authenticator's job, before any of this), and whether the cache is
//! current to the instant (it is as current as its watch: seconds).

use crate::identity::{SpiffeId, TrustDomain};

/// An object a token is bound to: name and UID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundObject {
    /// Its `metadata.name`.
    pub name: String,
    /// Its `metadata.uid` (a recreated object has a new one).
    pub uid: String,
}

/// What a verified service-account token (or a TokenReview of it) says
/// about its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenFacts {
    /// The service account's namespace.
    pub namespace: String,
    /// The service account's name.
    pub service_account: String,
    /// The service account's UID, when the token carries it (bound tokens do).
    pub service_account_uid: Option<String>,
    /// The pod the token is bound to, if any.
    pub pod: Option<BoundObject>,
    /// The node the token was issued on (KEP-4193, Kubernetes 1.32+).
    pub node: Option<BoundObject>,
}

/// A pod as the cache holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    /// The pod's UID.
    pub uid: String,
    /// The service account the pod runs as.
    pub service_account: String,
    /// `spec.nodeName`, once scheduled.
    pub node: Option<String>,
}

/// The cluster as the CA's watch caches see it. Every method answers from
/// memory.
pub trait ClusterView: Send + Sync {
    /// Whether the caches have synced since they last lost their watches.
    fn synced(&self) -> bool;
    /// The pod `namespace/name`, if it exists.
    fn pod(&self, namespace: &str, name: &str) -> Option<PodFacts>;
    /// The UID of service account `namespace/name`, if it exists.
    fn service_account_uid(&self, namespace: &str, name: &str) -> Option<String>;
    /// Whether a pod of service account `namespace/service_account` is
    /// scheduled on `node`.
    fn runs_on_node(&self, node: &str, namespace: &str, service_account: &str) -> bool;
    /// Whether a pod of service account `namespace/service_account` is
    /// running anywhere.
    fn runs_anywhere(&self, namespace: &str, service_account: &str) -> bool;
}

/// Why a caller was refused. Each has a stable [`Refusal::metric_label`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The watch caches have not synced since they last lost their watches.
    #[error("the cluster caches have not synced yet")]
    NotSynced,
    /// The pod the token is bound to is not in the cache.
    #[error("pod {namespace}/{name} no longer exists")]
    PodGone {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
    },
    /// The bound pod exists under another UID than the token's.
    #[error(
        "pod {namespace}/{name} has UID {current}, the token names {token} (the pod was recreated)"
    )]
    PodRecreated {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
        /// The UID the token names.
        token: String,
        /// The UID of the pod that exists now.
        current: String,
    },
    /// The bound pod runs as another service account than the token's.
    #[error("pod {namespace}/{name} runs as service account {runs_as}, not the token's {token}")]
    PodServiceAccount {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
        /// The service account the token names.
        token: String,
        /// The service account the pod runs as.
        runs_as: String,
    },
    /// The token's service account is not in the cache.
    #[error("service account {namespace}/{name} no longer exists")]
    ServiceAccountGone {
        /// The service account's namespace.
        namespace: String,
        /// The service account's name.
        name: String,
    },
    /// The service account exists under another UID than the token's.
    #[error(
        "service account {namespace}/{name} has UID {current}, the token names {token} (it was recreated)"
    )]
    ServiceAccountRecreated {
        /// The service account's namespace.
        namespace: String,
        /// The service account's name.
        name: String,
        /// The UID the token names.
        token: String,
        /// The UID of the service account that exists now.
        current: String,
    },
    /// An impersonation request from a caller that is not a trusted node
    /// account.
    #[error(
        "{caller} is not a trusted node account and may not request certificates for {requested}"
    )]
    NotTrustedNode {
        /// The caller's identity.
        caller: String,
        /// The identity it asked for.
        requested: String,
    },
    /// An impersonation request whose token names neither a node nor a pod.
    #[error("impersonation needs a service-account token naming the caller's node or pod")]
    NoCallerNode,
    /// No pod of the requested identity is scheduled on the caller's node.
    #[error("no pod of {requested} runs on node {node}")]
    NotOnNode {
        /// The identity asked for.
        requested: String,
        /// The caller's node.
        node: String,
    },
    /// The requested identity is not a service account of our trust domain.
    #[error("{requested} is not a service-account identity of trust domain {trust_domain}")]
    BadRequested {
        /// The identity asked for.
        requested: String,
        /// Our trust domain.
        trust_domain: String,
    },
    /// A renewal for a service account none of whose pods is running.
    #[error(
        "no pod of service account {namespace}/{name} is running: its certificate is not renewed"
    )]
    NoRunningPod {
        /// The service account's namespace.
        namespace: String,
        /// The service account's name.
        name: String,
    },
}

impl Refusal {
    /// Every [`Refusal::metric_label`], so metrics can show each at 0
    /// from the start.
    pub const METRIC_LABELS: &'static [&'static str] = &[
        "not_synced",
        "pod_gone",
        "pod_recreated",
        "pod_service_account",
        "service_account_gone",
        "service_account_recreated",
        "not_trusted_node",
        "no_caller_node",
        "not_on_node",
        "bad_requested_identity",
        "no_running_pod",
    ];

    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::NotSynced => "not_synced",
            Self::PodGone { .. } => "pod_gone",
            Self::PodRecreated { .. } => "pod_recreated",
            Self::PodServiceAccount { .. } => "pod_service_account",
            Self::ServiceAccountGone { .. } => "service_account_gone",
            Self::ServiceAccountRecreated { .. } => "service_account_recreated",
            Self::NotTrustedNode { .. } => "not_trusted_node",
            Self::NoCallerNode => "no_caller_node",
            Self::NotOnNode { .. } => "not_on_node",
            Self::BadRequested { .. } => "bad_requested_identity",
            Self::NoRunningPod { .. } => "no_running_pod",
        }
    }

    /// Whether asking again later may succeed for the same reason (the
    /// caches are catching up) rather than being a refusal.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::NotSynced)
    }
}

/// The token's bindings hold in the cluster as cached: its service account
/// exists (with the token's UID when it names one) and, when the token is
/// bound to a pod, that pod exists with the token's UID and runs as the
/// token's service account.
///
/// # Errors
/// The first binding that fails, as a [`Refusal`].
pub fn check_binding(facts: &TokenFacts, view: &dyn ClusterView) -> Result<(), Refusal> {
    if !view.synced() {
        return Err(Refusal::NotSynced);
    }
    let (ns, sa) = (&facts.namespace, &facts.service_account);
    let current = view
        .service_account_uid(ns, sa)
        .ok_or_else(|| Refusal::ServiceAccountGone {
            namespace: ns.clone(),
            name: sa.clone(),
        })?;
    if let Some(token) = &facts.service_account_uid
        && *token != current
    {
        return Err(Refusal::ServiceAccountRecreated {
            namespace: ns.clone(),
            name: sa.clone(),
            token: token.clone(),
            current,
        });
    }
    if let Some(bound) = &facts.pod {
        let pod = view.pod(ns, &bound.name).ok_or_else(|| Refusal::PodGone {
            namespace: ns.clone(),
            name: bound.name.clone(),
        })?;
        if pod.uid != bound.uid {
            return Err(Refusal::PodRecreated {
                namespace: ns.clone(),
                name: bound.name.clone(),
                token: bound.uid.clone(),
                current: pod.uid,
            });
        }
        if pod.service_account != *sa {
            return Err(Refusal::PodServiceAccount {
                namespace: ns.clone(),
                name: bound.name.clone(),
                token: sa.clone(),
                runs_as: pod.service_account,
            });
        }
    }
    Ok(())
}

/// A renewal with a current certificate, on Kubernetes: the certificate
/// proves only that its holder once had the identity; the identity's
/// service account must still exist and a pod of it still run, or a stolen
/// certificate (or one a node agent got for a pod that has left its node)
/// would renew forever after the workload is gone.
///
/// # Errors
/// Why the renewal is refused.
pub fn check_renewal(namespace: &str, name: &str, view: &dyn ClusterView) -> Result<(), Refusal> {
    if !view.synced() {
        return Err(Refusal::NotSynced);
    }
    if view.service_account_uid(namespace, name).is_none() {
        return Err(Refusal::ServiceAccountGone {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        });
    }
    if !view.runs_anywhere(namespace, name) {
        return Err(Refusal::NoRunningPod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Service accounts allowed to request certificates for the pods on their
/// own node (`namespace/name` each, e.g. `istio-system/ztunnel`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAgents(Vec<(String, String)>);

impl NodeAgents {
    /// From `namespace/name` entries; empty entries (an empty
    /// environment variable) name nobody.
    ///
    /// # Errors
    /// An entry that is not `namespace/name`.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let mut out = Vec::new();
        for e in entries {
            let e = e.as_ref().trim();
            if e.is_empty() {
                continue;
            }
            match e.split_once('/') {
                Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                    out.push((ns.to_owned(), sa.to_owned()));
                }
                _ => {
                    return Err(format!(
                        "trusted node account {e:?} is not of the form namespace/serviceaccount"
                    ));
                }
            }
        }
        Ok(Self(out))
    }

    fn contains(&self, ns: &str, sa: &str) -> bool {
        self.0.iter().any(|(n, s)| n == ns && s == sa)
    }

    /// Whether no account is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The identity a caller's certificate will name.
///
/// `caller` is what the caller proved, `facts` what its token says (absent
/// for a certificate renewal), `requested` the `ImpersonatedIdentity` it
/// asks for (absent, or equal to `caller`: no impersonation). Another
/// identity is granted only to a trusted node account, only for a
/// service-account identity of our trust domain, and only when a pod of
/// that service account runs on the caller's node: the node its token
/// names, or else the node of the pod its token is bound to.
///
/// # Errors
/// Why the request is refused.
pub fn authorize(
    caller: &SpiffeId,
    facts: Option<&TokenFacts>,
    requested: Option<&str>,
    node_agents: &NodeAgents,
    view: Option<&dyn ClusterView>,
    trust_domain: &TrustDomain,
) -> Result<SpiffeId, Refusal> {
    let Some(requested) = requested.filter(|r| *r != caller.as_str()) else {
        return Ok(caller.clone());
    };
    let not_trusted = || Refusal::NotTrustedNode {
        caller: caller.to_string(),
        requested: requested.to_owned(),
    };
    let Some((ns, sa)) = caller.service_account() else {
        return Err(not_trusted());
    };
    if !node_agents.contains(ns, sa) {
        return Err(not_trusted());
    }
    let bad_requested = || Refusal::BadRequested {
        requested: requested.to_owned(),
        trust_domain: trust_domain.to_string(),
    };
    let wanted = SpiffeId::parse(requested).map_err(|_| bad_requested())?;
    if &wanted.trust_domain() != trust_domain {
        return Err(bad_requested());
    }
    let (want_ns, want_sa) = wanted.service_account().ok_or_else(bad_requested)?;
    let (Some(facts), Some(view)) = (facts, view) else {
        return Err(Refusal::NoCallerNode);
    };
    if !view.synced() {
        return Err(Refusal::NotSynced);
    }
    let node = match (&facts.node, &facts.pod) {
        (Some(node), _) => node.name.clone(),
        (None, Some(pod)) => view
            .pod(&facts.namespace, &pod.name)
            .filter(|p| p.uid == pod.uid)
            .and_then(|p| p.node)
            .ok_or(Refusal::NoCallerNode)?,
        (None, None) => return Err(Refusal::NoCallerNode),
    };
    if !view.runs_on_node(&node, want_ns, want_sa) {
        return Err(Refusal::NotOnNode {
            requested: requested.to_owned(),
            node,
        });
    }
    Ok(wanted)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[derive(Default)]
    struct View {
        synced: bool,
        pods: HashMap<(String, String), PodFacts>,
        sas: HashMap<(String, String), String>,
    }

    impl View {
        fn with_pod(mut self, ns: &str, name: &str, uid: &str, sa: &str, node: &str) -> Self {
            self.pods.insert(
                (ns.into(), name.into()),
                PodFacts {
                    uid: uid.into(),
                    service_account: sa.into(),
                    node: Some(node.into()),
                },
            );
            self
        }
        fn with_sa(mut self, ns: &str, name: &str, uid: &str) -> Self {
            self.sas.insert((ns.into(), name.into()), uid.into());
            self
        }
    }

    impl ClusterView for View {
        fn synced(&self) -> bool {
            self.synced
        }
        fn pod(&self, ns: &str, name: &str) -> Option<PodFacts> {
            self.pods.get(&(ns.into(), name.into())).cloned()
        }
        fn service_account_uid(&self, ns: &str, name: &str) -> Option<String> {
            self.sas.get(&(ns.into(), name.into())).cloned()
        }
        fn runs_on_node(&self, node: &str, ns: &str, sa: &str) -> bool {
            self.pods.iter().any(|((n, _), p)| {
                n == ns && p.service_account == sa && p.node.as_deref() == Some(node)
            })
        }
        fn runs_anywhere(&self, ns: &str, sa: &str) -> bool {
            self.pods
                .iter()
                .any(|((n, _), p)| n == ns && p.service_account == sa)
        }
    }

    fn cluster() -> View {
        View {
            synced: true,
            ..View::default()
        }
        .with_sa("default", "web", "sa-1")
        .with_sa("istio-system", "ztunnel", "sa-z")
        .with_pod("default", "web-1", "pod-1", "web", "node-a")
        .with_pod("istio-system", "ztunnel-a", "pod-z", "ztunnel", "node-a")
        .with_sa("other", "db", "sa-2")
        .with_pod("other", "db-1", "pod-2", "db", "node-b")
    }

    fn facts(ns: &str, sa: &str, sa_uid: &str, pod: Option<(&str, &str)>) -> TokenFacts {
        TokenFacts {
            namespace: ns.into(),
            service_account: sa.into(),
            service_account_uid: Some(sa_uid.into()),
            pod: pod.map(|(n, u)| BoundObject {
                name: n.into(),
                uid: u.into(),
            }),
            node: None,
        }
    }

    #[test]
    fn a_bound_token_holds_while_its_pod_and_account_exist_with_its_uids() {
        let v = cluster();
        let f = facts("default", "web", "sa-1", Some(("web-1", "pod-1")));
        assert_eq!(check_binding(&f, &v), Ok(()));
        let unbound = facts("default", "web", "sa-1", None);
        assert_eq!(check_binding(&unbound, &v), Ok(()));

        let gone = facts("default", "web", "sa-1", Some(("web-2", "pod-9")));
        assert_eq!(
            check_binding(&gone, &v).unwrap_err().metric_label(),
            "pod_gone"
        );
        let recreated = facts("default", "web", "sa-1", Some(("web-1", "pod-old")));
        assert_eq!(
            check_binding(&recreated, &v).unwrap_err().metric_label(),
            "pod_recreated"
        );
        let sa_recreated = facts("default", "web", "sa-old", Some(("web-1", "pod-1")));
        assert_eq!(
            check_binding(&sa_recreated, &v).unwrap_err().metric_label(),
            "service_account_recreated"
        );
        let sa_gone = facts("default", "api", "sa-3", None);
        assert_eq!(
            check_binding(&sa_gone, &v).unwrap_err().metric_label(),
            "service_account_gone"
        );
        // A pod of another account in the same namespace does not vouch.
        let v = v.with_sa("default", "api", "sa-3");
        let other_pods = facts("default", "api", "sa-3", Some(("web-1", "pod-1")));
        assert_eq!(
            check_binding(&other_pods, &v).unwrap_err().metric_label(),
            "pod_service_account"
        );
        let unsynced = View::default();
        assert_eq!(check_binding(&f, &unsynced), Err(Refusal::NotSynced));
        assert!(Refusal::NotSynced.is_transient());
    }

    #[test]
    fn impersonation_only_for_trusted_node_accounts_and_pods_on_their_node() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let v = cluster();
        let trusted = NodeAgents::parse(&["istio-system/ztunnel"]).unwrap();
        let ztunnel = SpiffeId::parse("spiffe://cluster.local/ns/istio-system/sa/ztunnel").unwrap();
        let zfacts = facts(
            "istio-system",
            "ztunnel",
            "sa-z",
            Some(("ztunnel-a", "pod-z")),
        );
        let web = "spiffe://cluster.local/ns/default/sa/web";
        let db = "spiffe://cluster.local/ns/other/sa/db";
        let run = |caller: &SpiffeId, f: Option<&TokenFacts>, req: Option<&str>, t: &NodeAgents| {
            authorize(caller, f, req, t, Some(&v), &td)
        };

        // Its own identity, or none asked: no impersonation at all.
        assert_eq!(
            run(&ztunnel, None, None, &NodeAgents::default()),
            Ok(ztunnel.clone())
        );
        assert_eq!(
            run(
                &ztunnel,
                None,
                Some(ztunnel.as_str()),
                &NodeAgents::default()
            ),
            Ok(ztunnel.clone())
        );
        // A pod on its node (found through its own pod).
        assert_eq!(
            run(&ztunnel, Some(&zfacts), Some(web), &trusted)
                .unwrap()
                .as_str(),
            web
        );
        // Through the node claim, without a pod.
        let mut by_node = facts("istio-system", "ztunnel", "sa-z", None);
        by_node.node = Some(BoundObject {
            name: "node-b".into(),
            uid: "n-b".into(),
        });
        assert_eq!(
            run(&ztunnel, Some(&by_node), Some(db), &trusted)
                .unwrap()
                .as_str(),
            db
        );
        // A pod on another node.
        assert_eq!(
            run(&ztunnel, Some(&zfacts), Some(db), &trusted)
                .unwrap_err()
                .metric_label(),
            "not_on_node"
        );
        // An untrusted account.
        let webid = SpiffeId::parse(web).unwrap();
        let wfacts = facts("default", "web", "sa-1", Some(("web-1", "pod-1")));
        assert_eq!(
            run(&webid, Some(&wfacts), Some(db), &trusted)
                .unwrap_err()
                .metric_label(),
            "not_trusted_node"
        );
        // A pod that no longer exists: nothing of that account on the node.
        let mut gone = cluster();
        gone.pods.remove(&("default".into(), "web-1".into()));
        assert_eq!(
            authorize(
                &ztunnel,
                Some(&zfacts),
                Some(web),
                &trusted,
                Some(&gone),
                &td
            )
            .unwrap_err()
            .metric_label(),
            // Its own pod is on node-a, but web's is gone.
            "not_on_node"
        );
        // Outside the trust domain, or not a service account.
        for bad in [
            "spiffe://other.td/ns/default/sa/web",
            "spiffe://cluster.local/x",
            "nonsense",
        ] {
            assert_eq!(
                run(&ztunnel, Some(&zfacts), Some(bad), &trusted)
                    .unwrap_err()
                    .metric_label(),
                "bad_requested_identity",
                "{bad}"
            );
        }
        // No token facts (a certificate renewal), or no cluster view.
        assert_eq!(
            run(&ztunnel, None, Some(web), &trusted),
            Err(Refusal::NoCallerNode)
        );
        assert_eq!(
            authorize(&ztunnel, Some(&zfacts), Some(web), &trusted, None, &td),
            Err(Refusal::NoCallerNode)
        );
        // Its own pod recreated (the token's UID is stale): no node from it.
        let stale = facts(
            "istio-system",
            "ztunnel",
            "sa-z",
            Some(("ztunnel-a", "pod-old")),
        );
        assert_eq!(
            run(&ztunnel, Some(&stale), Some(web), &trusted),
            Err(Refusal::NoCallerNode)
        );
    }

    #[test]
    fn a_renewal_needs_its_account_and_a_running_pod_of_it() {
        let v = cluster();
        assert_eq!(check_renewal("default", "web", &v), Ok(()));
        let v = v.with_sa("default", "idle", "sa-9");
        assert_eq!(
            check_renewal("default", "idle", &v)
                .unwrap_err()
                .metric_label(),
            "no_running_pod"
        );
        assert_eq!(
            check_renewal("default", "gone", &v)
                .unwrap_err()
                .metric_label(),
            "service_account_gone"
        );
        assert_eq!(
            check_renewal("default", "web", &View::default()),
            Err(Refusal::NotSynced)
        );
    }

    #[test]
    fn every_refusal_label_is_listed() {
        let s = || String::from("x");
        let all = [
            Refusal::NotSynced,
            Refusal::PodGone {
                namespace: s(),
                name: s(),
            },
            Refusal::PodRecreated {
                namespace: s(),
                name: s(),
                token: s(),
                current: s(),
            },
            Refusal::PodServiceAccount {
                namespace: s(),
                name: s(),
                token: s(),
                runs_as: s(),
            },
            Refusal::ServiceAccountGone {
                namespace: s(),
                name: s(),
            },
            Refusal::ServiceAccountRecreated {
                namespace: s(),
                name: s(),
                token: s(),
                current: s(),
            },
            Refusal::NotTrustedNode {
                caller: s(),
                requested: s(),
            },
            Refusal::NoCallerNode,
            Refusal::NotOnNode {
                requested: s(),
                node: s(),
            },
            Refusal::BadRequested {
                requested: s(),
                trust_domain: s(),
            },
            Refusal::NoRunningPod {
                namespace: s(),
                name: s(),
            },
        ];
        let labels: Vec<&str> = all.iter().map(Refusal::metric_label).collect();
        assert_eq!(labels, Refusal::METRIC_LABELS);
    }

    #[test]
    fn node_account_entries_must_be_namespace_and_name() {
        assert!(NodeAgents::parse(&["a/b", " istio-system/ztunnel "]).is_ok());
        for bad in ["a", "/b", "a/", "a/b/c", " / "] {
            assert!(NodeAgents::parse(&[bad]).is_err(), "{bad}");
        }
        // An empty environment variable: nobody.
        assert!(NodeAgents::parse(&["", " "]).unwrap().is_empty());
    }
}
