//! Key material, CSR checks, certificate profiles, signing, the trust bundle
//! and CA storage. Synchronous and free of networking: the clock is always
//! passed in, so every rule here is testable at any instant.

pub mod authorities;
pub mod authority;
pub mod bundle;
pub mod csr;
pub mod issue;
pub mod keys;
pub mod keystore;
pub mod policy;
pub mod profile;
pub mod rotation;
pub mod store;

use std::time::Duration;

pub use authorities::{AuthoritySet, Member, State as AuthorityState};
pub use authority::{Authority, CLOCK_SKEW_BACKDATE, Issued, TtlPolicy};

/// Where in a leaf's lifetime its holder starts renewing it by default:
/// the node agent's `--rotation-fraction` and a PodCertificateRequest's
/// `beginRefreshAt` (Istio's agent and SPIRE renew at half too).
pub const ROTATION_FRACTION: f64 = 0.5;
pub use bundle::{Cert, TrustBundle};
pub use csr::{CheckedCsr, check_csr, check_own_key, check_pem_csr, check_public_key};
pub use issue::{LeafFor, LeafIssuer, Tracked};
pub use keys::{KeyAlgorithm, PrivateKey};
pub use keystore::{DirStore, KeyStore, Stored, StoredMember};
pub use store::{CaFiles, CacertsDir};

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The CSR is larger than the limit (checked before parsing).
    #[error("CSR of {size} bytes exceeds the {max}-byte limit")]
    CsrTooLarge {
        /// Its size in bytes.
        size: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// The CSR is not a DER or PEM PKCS#10 request we can read.
    #[error("malformed CSR: {0}")]
    CsrMalformed(String),
    /// The CSR's key is of a type or size not allowed.
    #[error("CSR key not allowed: {0}")]
    CsrKeyType(String),
    /// The CSR's self-signature does not verify.
    #[error("CSR signature rejected: {0}")]
    CsrSignature(String),
    /// The CSR names another identity than the caller proved.
    #[error("the CSR asks for identity {requested}, but the caller may only have {allowed}")]
    IdentityMismatch {
        /// What the CSR asks for (escaped when it came from the caller).
        requested: String,
        /// The identity the caller proved.
        allowed: String,
    },
    /// The identity is in another trust domain than this CA's.
    #[error("identity {id} is outside this CA's trust domain {expected}")]
    WrongTrustDomain {
        /// The identity.
        id: String,
        /// This CA's trust domain.
        expected: String,
    },
    /// The requested lifetime is above the maximum.
    #[error("requested lifetime {}s exceeds the maximum {}s", requested.as_secs(), max.as_secs())]
    TtlTooLong {
        /// What was asked for.
        requested: Duration,
        /// The most this CA issues.
        max: Duration,
    },
    /// The active signing certificate is past its NotAfter.
    #[error("the signing certificate has expired")]
    SignerExpired,
    /// A key cannot be generated, parsed or used.
    #[error("key: {0}")]
    Key(String),
    /// A certificate cannot be parsed or built.
    #[error("certificate: {0}")]
    Cert(String),
    /// Signing a leaf failed.
    #[error("signing failed: {0}")]
    Signing(String),
    /// CA material (a root, an intermediate, its key) fails validation.
    #[error("CA material refused: {0}")]
    Material(String),
    /// The authorities' store cannot be read or written, or is not whole.
    #[error("CA store {location}: {reason}")]
    Store {
        /// Which file or Secret.
        location: String,
        /// What failed.
        reason: String,
    },
}

impl Error {
    /// Every [`Error::metric_label`], so metrics can show each at 0.
    pub const METRIC_LABELS: &[&str] = &[
        "csr_too_large",
        "csr_malformed",
        "csr_key_type",
        "csr_signature",
        "identity_mismatch",
        "wrong_trust_domain",
        "ttl_too_long",
        "signer_expired",
        "key",
        "certificate",
        "signing",
        "material",
        "store",
    ];

    /// A short, stable label for metrics and logs. The match names every
    /// variant, so a new one cannot fall into a catch-all unnoticed.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::CsrTooLarge { .. } => "csr_too_large",
            Self::CsrMalformed(_) => "csr_malformed",
            Self::CsrKeyType(_) => "csr_key_type",
            Self::CsrSignature(_) => "csr_signature",
            Self::IdentityMismatch { .. } => "identity_mismatch",
            Self::WrongTrustDomain { .. } => "wrong_trust_domain",
            Self::TtlTooLong { .. } => "ttl_too_long",
            Self::SignerExpired => "signer_expired",
            Self::Key(_) => "key",
            Self::Cert(_) => "certificate",
            Self::Signing(_) => "signing",
            Self::Material(_) => "material",
            Self::Store { .. } => "store",
        }
    }
}

/// Material for unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::time::{Duration, SystemTime};

    use super::{Authority, KeyAlgorithm};
    use crate::identity::TrustDomain;

    /// A CSR (PEM) for a fresh P-256 key, empty subject, no SAN.
    pub(crate) fn csr_pem() -> String {
        let key = super::PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        rcgen::CertificateParams::default()
            .serialize_request(key.key_pair())
            .unwrap()
            .pem()
            .unwrap()
    }

    /// A fresh self-signed P-256 authority for `td`, valid for `secs`.
    pub(crate) fn authority(td: &str, secs: u64) -> Authority {
        let td = TrustDomain::new(td).unwrap();
        let now = SystemTime::now();
        let files =
            Authority::generate_root(&td, KeyAlgorithm::EcdsaP256, Duration::from_secs(secs), now)
                .unwrap();
        Authority::from_files(&files, &td, now).unwrap()
    }
}

#[cfg(test)]
mod error_tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use super::Error;

    #[test]
    fn every_variant_has_its_own_listed_label() {
        let s = || "x".to_owned();
        let all = [
            Error::CsrTooLarge { size: 2, max: 1 },
            Error::CsrMalformed(s()),
            Error::CsrKeyType(s()),
            Error::CsrSignature(s()),
            Error::IdentityMismatch {
                requested: s(),
                allowed: s(),
            },
            Error::WrongTrustDomain {
                id: s(),
                expected: s(),
            },
            Error::TtlTooLong {
                requested: Duration::from_secs(2),
                max: Duration::from_secs(1),
            },
            Error::SignerExpired,
            Error::Key(s()),
            Error::Cert(s()),
            Error::Signing(s()),
            Error::Material(s()),
            Error::Store {
                location: s(),
                reason: s(),
            },
        ];
        let labels: BTreeSet<_> = all.iter().map(Error::metric_label).collect();
        assert_eq!(labels.len(), all.len(), "labels are not distinct");
        let listed: BTreeSet<_> = Error::METRIC_LABELS.iter().copied().collect();
        assert_eq!(labels, listed);
    }
}
