//! The CA's authorities as one set, each in a state, and the trust bundle
//! they make (root rotation moves authorities through the states).
//!
//! - *prepared*: its root is trusted everywhere; it signs nothing.
//! - *active*: signs every new leaf and the server's own certificate.
//!   Exactly one authority is active at all times.
//! - *retiring*: still trusted, signs nothing; its leaves are being
//!   replaced.
//! - *gone*: no longer in the set: not trusted, nothing renews with it.
//!
//! The trust bundle is the union of the roots of every authority in the
//! set, and the set carries a generation that increases on every change.
//! A set is immutable: each step makes a new one, which the server
//! publishes whole (one `watch`), so every reader sees one consistent set.

use std::sync::Arc;
use std::time::SystemTime;

use super::{Authority, Cert, CheckedCsr, Error, Issued, TrustBundle};
use crate::identity::{SpiffeId, TrustDomain};

/// Where an authority is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum State {
    /// In the bundle, not signing yet: proxies learn its root before it signs.
    Prepared,
    /// The one authority that signs.
    Active,
    /// No longer signing; its root stays in the bundle until its leaves are gone.
    Retiring,
}

impl State {
    /// Where its roots come in the trust bundle: active, then prepared,
    /// then retiring.
    pub fn bundle_rank(self) -> u8 {
        match self {
            Self::Active => 0,
            Self::Prepared => 1,
            Self::Retiring => 2,
        }
    }

    /// The state's name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prepared => "prepared",
            Self::Active => "active",
            Self::Retiring => "retiring",
        }
    }
}

/// One authority and its state.
#[derive(Clone, Debug)]
pub struct Member {
    /// Its certificates and signing key.
    pub authority: Arc<Authority>,
    /// Where it is in its life.
    pub state: State,
    /// When it entered this state.
    pub since: SystemTime,
}

/// Every authority of the CA, and their trust bundle.
#[derive(Debug)]
pub struct AuthoritySet {
    members: Vec<Member>,
    /// The one active member's authority (`new` checks there is one).
    active: Arc<Authority>,
    generation: u64,
    bundle: TrustBundle,
    bundle_pem: String,
    /// The bundle as a SPIFFE trust bundle, `spiffe_sequence` = generation.
    spiffe_jwks: String,
}

/// How often a SPIFFE bundle consumer should fetch the bundle again
/// (`spiffe_refresh_hint`).
pub const BUNDLE_REFRESH_HINT_SECS: u64 = 300;

impl AuthoritySet {
    /// A set of one, active since `now`, at generation 1.
    ///
    /// # Errors
    /// As [`AuthoritySet::new`].
    pub fn single_since(active: Authority, now: SystemTime) -> Result<Self, Error> {
        Self::new(
            vec![Member {
                authority: Arc::new(active),
                state: State::Active,
                since: now,
            }],
            1,
        )
    }

    /// A set from its members, checked: exactly one active, at most one
    /// prepared, one trust domain.
    ///
    /// # Errors
    /// [`Error::Material`] naming what is wrong.
    pub fn new(members: Vec<Member>, generation: u64) -> Result<Self, Error> {
        let count = |s: State| members.iter().filter(|m| m.state == s).count();
        let active = members.iter().find(|m| m.state == State::Active);
        let (Some(active), 1) = (active, count(State::Active)) else {
            return Err(Error::Material(format!(
                "a CA needs exactly one active authority; this set has {}",
                count(State::Active)
            )));
        };
        let active = active.authority.clone();
        if count(State::Prepared) > 1 {
            return Err(Error::Material(
                "at most one authority may be prepared at a time".into(),
            ));
        }
        let td = active.trust_domain();
        if members.iter().any(|m| m.authority.trust_domain() != td) {
            return Err(Error::Material(
                "every authority of a CA serves the same trust domain".into(),
            ));
        }
        // The bundle: active roots first, then prepared, then retiring;
        // each root once.
        let mut ordered: Vec<&Member> = members.iter().collect();
        ordered.sort_by_key(|m| m.state.bundle_rank());
        let mut roots: Vec<Cert> = Vec::new();
        for m in ordered {
            for r in m.authority.roots().roots() {
                if !roots.iter().any(|have| have.der() == r.der()) {
                    roots.push(r.clone());
                }
            }
        }
        let bundle = TrustBundle::new(roots)?;
        // Rendered once per set, which also refuses a root a SPIFFE bundle
        // cannot express (it would break the bundle for every consumer).
        let spiffe_jwks = bundle.to_spiffe_jwks(generation, BUNDLE_REFRESH_HINT_SECS)?;
        let bundle_pem = bundle.pem();
        Ok(Self {
            members,
            active,
            generation,
            bundle,
            bundle_pem,
            spiffe_jwks,
        })
    }

    /// Every member, in their stored order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Increases on every change of the set.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The union of every member's roots.
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The bundle as PEM, rendered once per set.
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// The bundle as a SPIFFE trust bundle (JWK Set).
    pub fn spiffe_jwks(&self) -> &str {
        &self.spiffe_jwks
    }

    /// The authority that signs.
    pub fn active(&self) -> &Arc<Authority> {
        &self.active
    }

    /// The active authority's trust domain (every member's).
    pub fn trust_domain(&self) -> &TrustDomain {
        self.active().trust_domain()
    }

    /// The signing certificates a renewal's client certificate may chain
    /// to: the active and retiring authorities (a prepared one has signed
    /// nothing here; a plugged-in intermediate already used elsewhere must
    /// not renew its leaves here early).
    pub fn renewal_signers(&self) -> Vec<&Cert> {
        self.members
            .iter()
            .filter(|m| m.state != State::Prepared)
            .map(|m| m.authority.signer())
            .collect()
    }

    /// A workload leaf from the active authority; the last element of the
    /// chain is the whole trust bundle, so clients that learn their roots
    /// from answers (Istio's agents) learn every trusted root.
    ///
    /// # Errors
    /// As [`Authority::sign_leaf`].
    pub fn sign_leaf(
        &self,
        csr: &CheckedCsr,
        caller: &SpiffeId,
        ttl: std::time::Duration,
        now: SystemTime,
    ) -> Result<Issued, Error> {
        let mut issued = self.active().sign_leaf(csr, caller, ttl, now)?;
        if let Some(last) = issued.chain.last_mut() {
            last.clone_from(&self.bundle_pem);
        }
        Ok(issued)
    }

    /// A new set with `next` prepared: trusted everywhere, signing nothing.
    ///
    /// # Errors
    /// [`Error::Material`] if one is already prepared (and still valid: an
    /// expired one is replaced), or `next` serves another trust domain.
    pub fn prepare(&self, next: Authority, now: SystemTime) -> Result<Self, Error> {
        if self.members.iter().any(|m| m.authority.id() == next.id()) {
            return Err(Error::Material(format!(
                "authority {} is already part of this CA",
                next.id()
            )));
        }
        // A prepared authority that expired before it was activated can
        // never be: the new one takes its place.
        let mut members: Vec<Member> = self
            .members
            .iter()
            .filter(|m| !(m.state == State::Prepared && m.authority.chain_not_after() <= now))
            .cloned()
            .collect();
        members.push(Member {
            authority: Arc::new(next),
            state: State::Prepared,
            since: now,
        });
        Self::new(members, self.generation + 1)
    }

    /// A new set in which the prepared authority signs and the active one
    /// is retiring.
    ///
    /// # Errors
    /// [`Error::Material`] if nothing is prepared, or it is not valid now.
    pub fn activate(&self, now: SystemTime) -> Result<Self, Error> {
        let Some(prepared) = self.members.iter().find(|m| m.state == State::Prepared) else {
            return Err(Error::Material(
                "no authority is prepared; prepare one first".into(),
            ));
        };
        let valid_from = prepared.authority.not_before().unwrap_or(now);
        if now >= prepared.authority.chain_not_after() || now < valid_from {
            return Err(Error::Material(format!(
                "the prepared authority {} is not valid now; prepare another",
                prepared.authority.id()
            )));
        }
        let members = self
            .members
            .iter()
            .map(|m| {
                let state = match m.state {
                    State::Prepared => State::Active,
                    State::Active | State::Retiring => State::Retiring,
                };
                Member {
                    authority: m.authority.clone(),
                    since: if state == m.state { m.since } else { now },
                    state,
                }
            })
            .collect();
        Self::new(members, self.generation + 1)
    }

    /// A new set without the retiring authorities: their roots leave the
    /// bundle, and nothing renews with their leaves.
    ///
    /// # Errors
    /// [`Error::Material`] if nothing is retiring.
    pub fn retire(&self) -> Result<Self, Error> {
        if !self.members.iter().any(|m| m.state == State::Retiring) {
            return Err(Error::Material("no authority is retiring".into()));
        }
        let members = self
            .members
            .iter()
            .filter(|m| m.state != State::Retiring)
            .cloned()
            .collect();
        Self::new(members, self.generation + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::KeyAlgorithm;
    use std::time::Duration;

    fn authority(td: &str) -> Authority {
        crate::ca::testing::authority(td, 86_400)
    }

    fn states(set: &AuthoritySet) -> Vec<State> {
        set.members().iter().map(|m| m.state).collect()
    }

    #[test]
    fn a_rotation_moves_through_the_states_with_a_new_generation_each_time() {
        let old = authority("td");
        let old_root = old.roots().roots()[0].der().to_vec();
        let set = AuthoritySet::single_since(old, SystemTime::now()).unwrap();
        assert_eq!((set.generation(), set.bundle().roots().len()), (1, 1));

        let next = authority("td");
        let new_root = next.roots().roots()[0].der().to_vec();
        let prepared = set.prepare(next, SystemTime::now()).unwrap();
        assert_eq!(states(&prepared), [State::Active, State::Prepared]);
        assert_eq!(prepared.generation(), 2);
        assert!(prepared.bundle().contains(&old_root) && prepared.bundle().contains(&new_root));
        assert_eq!(
            prepared.active().roots().roots()[0].der(),
            old_root,
            "the old one still signs"
        );
        assert!(
            prepared
                .prepare(authority("td"), SystemTime::now())
                .is_err(),
            "one prepared at a time"
        );

        let active = prepared.activate(SystemTime::now()).unwrap();
        assert_eq!(states(&active), [State::Retiring, State::Active]);
        assert_eq!(active.generation(), 3);
        assert_eq!(active.active().roots().roots()[0].der(), new_root);
        assert_eq!(
            active.bundle().roots()[0].der(),
            new_root,
            "the active root first"
        );
        assert_eq!(
            active.renewal_signers().len(),
            2,
            "the retiring one still renews"
        );

        let retired = active.retire().unwrap();
        assert_eq!(states(&retired), [State::Active]);
        assert_eq!(retired.generation(), 4);
        assert!(!retired.bundle().contains(&old_root));
        assert_eq!(retired.renewal_signers().len(), 1);
        assert!(retired.retire().is_err() && retired.activate(SystemTime::now()).is_err());
    }

    #[test]
    fn leaves_carry_the_whole_bundle_and_come_from_the_active_authority() {
        let set = AuthoritySet::single_since(authority("td"), SystemTime::now())
            .unwrap()
            .prepare(authority("td"), SystemTime::now())
            .unwrap();
        let key = crate::ca::PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let csr_pem = {
            let params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .serialize_request(key.key_pair())
                .unwrap()
                .pem()
                .unwrap()
        };
        let csr = crate::ca::check_csr(csr_pem.as_bytes()).unwrap();
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        let issued = set
            .sign_leaf(&csr, &id, Duration::from_secs(60), SystemTime::now())
            .unwrap();
        assert_eq!(issued.chain.last().unwrap(), set.bundle_pem());
        assert_eq!(
            crate::ca::bundle::parse_pem_certs(set.bundle_pem())
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn a_set_never_lacks_its_one_active_authority() {
        let a = Arc::new(authority("td"));
        let member = |state| Member {
            authority: a.clone(),
            state,
            since: SystemTime::now(),
        };
        assert!(AuthoritySet::new(vec![member(State::Prepared)], 1).is_err());
        assert!(AuthoritySet::new(vec![member(State::Active), member(State::Active)], 1).is_err());
        assert!(AuthoritySet::new(vec![], 1).is_err());
        let other = Member {
            authority: Arc::new(authority("elsewhere")),
            state: State::Prepared,
            since: SystemTime::now(),
        };
        assert!(AuthoritySet::new(vec![member(State::Active), other], 1).is_err());
    }
}
