//! The agent's one trust bundle, shared by every workload, and the
//! announcement of retiring authorities.
//!
//! The bundle is fed by every verified CSR answer (with the generation from
//! the `x-workload-ca-bundle-generation` response metadata when the CA sent
//! it) and by `WatchBundle` pushes (see [`super::watcher`]). Bundles are
//! ordered by generation: one with a generation replaces the current one
//! only if its generation is higher (any generation beats none); one without
//! (an answer from a CA that is not ours) replaces the current one only when
//! the current has no generation either and the content differs. So a late
//! answer carrying an older bundle never undoes a newer one.
//!
//! A [`Retirement`] names the signing certificates of authorities being
//! retired; each workload whose current leaf was issued by one of them
//! renews at a uniformly random moment within the announced window.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::ca::bundle::{parse_pem_certs, verify_path};

/// The trust bundle learnt from the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootBundle {
    /// Every trusted root, PEM.
    pub pem: String,
    /// Opaque version for xDS: the generation (decimal) when known, a digest
    /// of the bundle otherwise.
    pub version: String,
    /// The CA's generation of this bundle, when the CA told us.
    pub generation: Option<u64>,
}

impl RootBundle {
    /// A bundle of `pem` (taken as is), versioned by `generation` when known.
    pub fn new(pem: String, generation: Option<u64>) -> Self {
        let version = match generation {
            Some(g) => g.to_string(),
            None => digest(&pem),
        };
        Self {
            pem,
            version,
            generation,
        }
    }

    /// A bundle from a PEM text that must hold at least one certificate and
    /// nothing else; the PEM is re-encoded (one block per certificate).
    ///
    /// # Errors
    /// Why the text is unusable.
    pub fn parse(text: &str, generation: Option<u64>) -> Result<Self, String> {
        let certs = parse_pem_certs(text).map_err(|e| e.to_string())?;
        if certs.is_empty() {
            return Err("no certificate in the bundle".into());
        }
        let pem: String = certs.iter().map(|c| c.pem().to_owned()).collect();
        Ok(Self::new(pem, generation))
    }

    /// The same roots under another generation (and so another version).
    #[must_use]
    pub fn with_generation(self, generation: Option<u64>) -> Self {
        Self::new(self.pem, generation)
    }

    /// Whether this bundle is to replace `current` (see the module doc).
    pub fn supersedes(&self, current: Option<&RootBundle>) -> bool {
        let Some(current) = current else {
            return true;
        };
        match (self.generation, current.generation) {
            (Some(new), Some(old)) => new > old,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => self.pem != current.pem,
        }
    }
}

/// The first 8 bytes of the SHA-256 of `pem`, in hex.
fn digest(pem: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, pem.as_bytes());
    crate::ca::bundle::hex(digest.as_ref().get(..8).unwrap_or_default())
}

/// Authorities being retired, as announced by a `BundleUpdate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retirement {
    /// Signing certificates (DER) of the retiring authorities.
    pub signers: Vec<Vec<u8>>,
    /// When the announcement arrived.
    pub received: Instant,
    /// Leaves they issued are replaced within this long of `received`.
    pub window: Duration,
}

impl Retirement {
    /// Whether `leaf_der` path-validates (clientAuth) to one of the retiring
    /// signers taken as trust anchors: webpki accepts any certificate as an
    /// anchor, so a retiring intermediate under an unchanged root counts.
    pub fn issued(&self, leaf_der: &[u8], now: SystemTime) -> bool {
        if self.signers.is_empty() {
            return false;
        }
        let anchors: Vec<&[u8]> = self.signers.iter().map(Vec::as_slice).collect();
        verify_path(
            leaf_der,
            &[],
            &anchors,
            now,
            webpki::KeyUsage::client_auth(),
        )
        .is_ok()
    }

    /// When a leaf issued by a retiring signer is to be replaced, for a
    /// uniform random `u` in [0, 1): a moment between `now` (or the
    /// announcement, if later) and the end of the window. `None` when the
    /// leaf was not issued by a retiring signer or the window has passed.
    pub fn renew_by(
        &self,
        leaf_der: &[u8],
        wall_now: SystemTime,
        now: Instant,
        u: f64,
    ) -> Option<Instant> {
        let end = self.received + self.window;
        let start = now.max(self.received);
        if start > end || !self.issued(leaf_der, wall_now) {
            return None;
        }
        Some(start + (end - start).mul_f64(u.clamp(0.0, 1.0)))
    }
}

/// The agent-wide bundle and retirement announcement (cheap to clone: every
/// clone is the same channel).
#[derive(Clone, Debug)]
pub struct AgentBundle {
    roots: watch::Sender<Option<Arc<RootBundle>>>,
    retiring: watch::Sender<Option<Arc<Retirement>>>,
}

impl Default for AgentBundle {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentBundle {
    /// No bundle yet, nothing retiring.
    pub fn new() -> Self {
        Self {
            roots: watch::channel(None).0,
            retiring: watch::channel(None).0,
        }
    }

    /// Every bundle published, newest first on subscription.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<RootBundle>>> {
        self.roots.subscribe()
    }

    /// The bundle held now.
    pub fn current(&self) -> Option<Arc<RootBundle>> {
        self.roots.borrow().clone()
    }

    /// The generation of the bundle held now.
    pub fn generation(&self) -> Option<u64> {
        self.roots.borrow().as_ref().and_then(|b| b.generation)
    }

    /// Publishes `bundle` if it supersedes the current one (see the module
    /// doc), atomically with the check. True when it was published.
    pub fn offer(&self, bundle: RootBundle) -> bool {
        let mut bundle = Some(bundle);
        self.roots.send_if_modified(|current| {
            let newer = bundle
                .as_ref()
                .is_some_and(|b| b.supersedes(current.as_deref()));
            if newer && let Some(b) = bundle.take() {
                *current = Some(Arc::new(b));
            }
            newer
        })
    }

    /// Publishes `bundle` whatever it replaces (the CA said so on a fresh
    /// stream: see `watcher::apply`).
    pub fn replace(&self, bundle: RootBundle) {
        self.roots.send_replace(Some(Arc::new(bundle)));
    }

    /// The current announcement of retiring authorities.
    pub fn retiring(&self) -> watch::Receiver<Option<Arc<Retirement>>> {
        self.retiring.subscribe()
    }

    /// Announces `signers` as retiring, to be replaced within `window` of
    /// now; no signer clears the announcement. The same announcement again
    /// (a reconnect resends it) keeps the moments already drawn.
    pub fn announce_retiring(&self, signers: Vec<Vec<u8>>, window: Duration) {
        self.retiring.send_if_modified(|current| {
            if signers.is_empty() {
                return current.take().is_some();
            }
            if current
                .as_ref()
                .is_some_and(|r| r.signers == signers && r.window == window)
            {
                return false;
            }
            *current = Some(Arc::new(Retirement {
                signers: signers.clone(),
                received: Instant::now(),
                window,
            }));
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{Authority, check_csr};
    use crate::identity::SpiffeId;

    fn authority() -> Authority {
        crate::ca::testing::authority("cluster.local", 86_400)
    }

    fn leaf(authority: &Authority) -> Vec<u8> {
        let csr = crate::ca::testing::csr_pem();
        authority
            .sign_leaf(
                &check_csr(csr.as_bytes()).unwrap(),
                &SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap(),
                Duration::from_secs(3600),
                SystemTime::now(),
            )
            .unwrap()
            .leaf_der
    }

    fn bundle(pem: &str, generation: Option<u64>) -> RootBundle {
        RootBundle::new(pem.to_owned(), generation)
    }

    #[test]
    fn versions_are_the_generation_when_known() {
        assert_eq!(bundle("a", Some(7)).version, "7");
        let digest = bundle("a", None).version;
        assert_eq!(digest.len(), 16);
        assert_ne!(digest, bundle("b", None).version);
        let a = authority();
        let parsed = RootBundle::parse(&a.roots().pem(), Some(3)).unwrap();
        assert_eq!(
            (parsed.version.as_str(), parsed.pem.clone()),
            ("3", a.roots().pem())
        );
        assert!(RootBundle::parse("", Some(4)).is_err());
        assert!(RootBundle::parse("garbage", Some(4)).is_err());
    }

    #[test]
    fn newer_generations_win_and_foreign_answers_never_undo_ours() {
        let agent = AgentBundle::new();
        assert!(agent.offer(bundle("foreign-1", None)), "first bundle");
        assert!(!agent.offer(bundle("foreign-1", None)), "same content");
        assert!(
            agent.offer(bundle("foreign-2", None)),
            "foreign content changed"
        );
        assert!(
            agent.offer(bundle("ours-5", Some(5))),
            "a generation beats none"
        );
        assert!(
            !agent.offer(bundle("foreign-3", None)),
            "foreign after ours"
        );
        assert!(!agent.offer(bundle("ours-4", Some(4))), "older generation");
        assert!(!agent.offer(bundle("ours-5b", Some(5))), "same generation");
        assert_eq!(agent.current().unwrap().pem, "ours-5");
        assert!(agent.offer(bundle("ours-6", Some(6))));
        assert_eq!(agent.generation(), Some(6));
        assert_eq!(agent.current().unwrap().version, "6");
    }

    #[test]
    fn a_leaf_is_issued_by_a_retiring_signer_only_if_it_chains_to_it() {
        let (old, new) = (authority(), authority());
        let retiring = Retirement {
            signers: vec![old.signer().der().to_vec()],
            received: Instant::now(),
            window: Duration::from_secs(60),
        };
        let now = SystemTime::now();
        assert!(retiring.issued(&leaf(&old), now));
        assert!(!retiring.issued(&leaf(&new), now));
        let none = Retirement {
            signers: vec![],
            ..retiring.clone()
        };
        assert!(!none.issued(&leaf(&old), now));
    }

    #[tokio::test(start_paused = true)]
    async fn early_renewal_falls_uniformly_within_the_window() {
        let old = authority();
        let agent = AgentBundle::new();
        let mut rx = agent.retiring();
        let t0 = Instant::now();
        agent.announce_retiring(vec![old.signer().der().to_vec()], Duration::from_secs(100));
        assert!(rx.has_changed().unwrap());
        let r = rx.borrow_and_update().clone().unwrap();
        let leaf = leaf(&old);
        let wall = SystemTime::now();
        assert_eq!(r.renew_by(&leaf, wall, t0, 0.0), Some(t0));
        assert_eq!(
            r.renew_by(&leaf, wall, t0, 0.5),
            Some(t0 + Duration::from_secs(50))
        );
        assert!(r.renew_by(&leaf, wall, t0, 0.999_999).unwrap() <= t0 + Duration::from_secs(100));
        // A leaf obtained later in the window: within what is left of it.
        tokio::time::advance(Duration::from_secs(80)).await;
        assert_eq!(
            r.renew_by(&leaf, wall, Instant::now(), 0.5),
            Some(t0 + Duration::from_secs(90))
        );
        tokio::time::advance(Duration::from_secs(21)).await;
        assert_eq!(
            r.renew_by(&leaf, wall, Instant::now(), 0.5),
            None,
            "window over"
        );

        // The same announcement again keeps its moment; none clears it.
        agent.announce_retiring(vec![old.signer().der().to_vec()], Duration::from_secs(100));
        assert!(!rx.has_changed().unwrap());
        agent.announce_retiring(vec![], Duration::from_secs(100));
        assert!(rx.borrow_and_update().is_none());
    }
}
