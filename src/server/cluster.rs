//! What a cluster integration brings to the server. The server knows
//! nothing of Kubernetes: the CLI builds these from `crate::k8s` and hands
//! them over as trait objects (the store, the cluster view, authenticators,
//! readiness checks, and the tasks that feed them).

use std::sync::Arc;

use super::auth::Authenticator;
use super::jwt::IssuerConfig;
use crate::ca::CaFiles;
use crate::ca::KeyStore;
use crate::ca::policy::{ClusterView, NodeAgents};
use crate::ca::rotation::{Evidence, PeerEvidence};
use crate::drain::Tasks;

/// A named readiness condition: `Err(why)` while it does not hold.
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

pub use crate::ca::issue::Controller;

/// The parts of a cluster integration the server uses.
pub struct Cluster {
    /// Where the authorities live (instead of `<state-dir>/ca`).
    pub store: Arc<dyn KeyStore>,
    /// A plugged-in CA to seed an empty store with; when the store is not
    /// empty it must be one of its authorities.
    pub seed: Option<CaFiles>,
    /// Where the seed came from, for messages.
    pub seed_from: String,
    /// The pods and service accounts as the watch caches see them.
    pub view: Arc<dyn ClusterView>,
    /// The cluster's token issuer, checked locally (its keys published by
    /// the cluster integration); every token it signs is checked against
    /// [`Cluster::view`].
    pub issuer: Option<IssuerConfig>,
    /// Other token authenticators (TokenReview), tried before client
    /// certificates.
    pub authenticators: Vec<Arc<dyn Authenticator>>,
    /// Who may ask for the identities of the pods on their node.
    pub node_agents: NodeAgents,
    /// Readiness conditions (caches synced, store watched).
    pub ready: Vec<ReadyCheck>,
    /// Where the integration registered its metrics; the server adds its
    /// own, and `/metrics` shows both.
    pub registry: prometheus::Registry,
    /// The integration's running tasks, stopped with the server's under the
    /// same deadline.
    pub tasks: Tasks,
    /// The other replicas' rotation evidence: every rotation step is judged
    /// on the whole fleet.
    pub peers: Option<Arc<dyn PeerEvidence>>,
    /// Where this replica's own evidence is published for the others.
    pub local_evidence: Option<tokio::sync::watch::Sender<Option<Arc<Evidence>>>>,
    /// Whether this replica leads: single-writer work (the automatic
    /// rotation) runs only while it does. `None`: always.
    pub leader: Option<tokio::sync::watch::Receiver<bool>>,
    /// Work started once the CA is up.
    pub controllers: Vec<Controller>,
}
