//! Kubernetes adapters (kube-rs): the CA's authorities in a Secret, watch
//! caches of pods and service accounts, service-account token checks and
//! leader election. Adapters only: what may be issued to whom is decided in
//! [`crate::ca::policy`], never here.
//!
//! Nothing here runs on the CSR hot path but in-memory lookups: the caches
//! are fed by watches, the issuer's keys by a periodic fetch. The one
//! exception is [`review`] (TokenReview), opted into for clusters whose
//! issuer keys cannot be read, and bounded by its own cache and
//! concurrency cap.

pub mod cache;
pub mod client;
pub mod discovery;
pub mod evidence;
pub mod jwks;
pub mod lease;
pub mod pcr;
mod reflect;
pub mod review;
pub mod serving;
pub mod slim;
pub mod store;
pub mod trustbundle;

// Copies of the CA's material in the cluster (secret mode, root ConfigMaps).
pub mod copies;
pub mod events;
pub mod observed;
pub mod pace;
pub mod rootcm;
pub mod scope;
pub mod secrets;

/// What can go wrong talking to the Kubernetes API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No usable client configuration (kubeconfig or in-cluster).
    #[error("Kubernetes client configuration: {0}")]
    Config(String),
    /// An API call failed.
    #[error("Kubernetes API: {what}: {source}")]
    Api {
        /// What was being done.
        what: String,
        /// The client's error.
        #[source]
        source: Box<kube::Error>,
    },
    /// What the API server holds is not what we expect (a malformed
    /// Secret, a JWKS that does not parse).
    #[error("{what}: {reason}")]
    Invalid {
        /// The object.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The CA layer refused what was read.
    #[error(transparent)]
    Ca(#[from] crate::ca::Error),
}

impl Error {
    pub(crate) fn api(what: impl Into<String>, source: kube::Error) -> Self {
        Self::Api {
            what: what.into(),
            source: Box::new(source),
        }
    }

    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
            Self::Api { .. } => "api",
            Self::Invalid { .. } => "invalid",
            Self::Ca(_) => "ca",
        }
    }
}
