//! What work running beside the server (a Kubernetes secret-mode
//! controller, a PodCertificateRequest signer) may ask of the running CA:
//! its live authority set, its lifetimes, and leaves signed and accounted
//! for exactly as the server's own.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::rotation::CopyCounter;
use super::{AuthoritySet, CheckedCsr, Error, Issued, PrivateKey, TtlPolicy};
use crate::identity::SpiffeId;

/// Work that needs the running CA (a secret-mode controller, a
/// PodCertificateRequest signer): started once the CA is up, with its
/// tasks adopted into the server's (stopped under the same deadline);
/// returns the counters of the bundle copies it keeps, which every
/// rotation gate then waits for.
pub type Controller =
    Box<dyn FnOnce(Arc<dyn LeafIssuer>, &mut crate::drain::Tasks) -> Vec<CopyCounter> + Send>;

/// How a rotation learns of a leaf issued through [`LeafIssuer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracked {
    /// In the issuance ledger: gates wait until it expires (the holder
    /// learns a new bundle only from its next certificate).
    Ledger,
    /// By its writer's [`super::rotation::Copies`]: the caller rewrites
    /// it when the bundle changes and counts it.
    Copies,
    /// In the issuance ledger for *retire* only: its holder takes its roots
    /// from a copy of the bundle this CA keeps and counts (a pod
    /// certificate's from the ClusterTrustBundle), so activation need not
    /// wait for it; the retiring root stays until it expires.
    RetireOnly,
}

/// A leaf signed through [`LeafIssuer::issue`].
#[derive(Clone, Debug)]
pub struct LeafFor {
    /// The leaf and its chain.
    pub issued: Issued,
    /// The generation of the set that signed it (its bundle is the chain's
    /// last element).
    pub generation: u64,
    /// The id of the authority that signed it.
    pub authority: String,
}

/// The running CA, as work beside the server sees it.
pub trait LeafIssuer: Send + Sync {
    /// The live authority set: its bundle and generation, followed as it
    /// changes (never a copy taken at start).
    fn authorities(&self) -> tokio::sync::watch::Receiver<Arc<AuthoritySet>>;

    /// The server's leaf lifetimes.
    fn ttl(&self) -> TtlPolicy;

    /// Signs a leaf naming `id` for `key`, with the active authority of
    /// the live set, logs it (with `via`), counts it in the server's
    /// metrics, and accounts for it as `tracked` says. `ttl` is cut to the
    /// server's maximum; zero means the server's default.
    ///
    /// [`Tracked::Copies`] is only for a caller whose copy counter (given
    /// back from its `Controller`) covers the leaf and rewrites it when the
    /// bundle changes; anything else is [`Tracked::Ledger`].
    ///
    /// # Errors
    /// As [`AuthoritySet::sign_leaf`].
    fn issue(
        &self,
        key: &CheckedCsr,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
        via: &'static str,
        tracked: Tracked,
    ) -> Result<LeafFor, Error>;

    /// Signs a TLS server certificate for `dns_names` and `key` (for a
    /// component that presents our chain but does not ask for it, such as
    /// istiod's serving certificate), with the active authority. Tracked
    /// as [`Tracked::Copies`]: only for a caller whose copy counter covers
    /// it.
    ///
    /// # Errors
    /// As [`super::Authority::sign_serving`].
    fn issue_serving(
        &self,
        key: &PrivateKey,
        dns_names: &[String],
        ttl: Duration,
        now: SystemTime,
        via: &'static str,
    ) -> Result<LeafFor, Error>;
}
