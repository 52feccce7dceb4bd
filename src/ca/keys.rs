//! Private keys: generation, PEM import/export, and redaction.
//!
//! All signing goes through ring (via rcgen). ring cannot generate RSA keys,
//! so RSA keys are generated with the `rsa` crate and handed to ring as
//! PKCS#8; the `rsa` crate never signs anything (its timing advisory,
//! RUSTSEC-2023-0071, concerns private-key operations on attacker-chosen
//! input, which key generation is not).

use std::fmt;
use std::str::FromStr;

use rcgen::{
    KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519, PKCS_RSA_SHA256,
};
use rustls_pki_types::PrivatePkcs8KeyDer;
use zeroize::Zeroizing;

use super::Error;

/// The key types this project generates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 (the CLI's default).
    EcdsaP256,
    /// ECDSA on P-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
    /// RSA, 2048-bit modulus.
    Rsa2048,
    /// RSA, 3072-bit modulus.
    Rsa3072,
    /// RSA, 4096-bit modulus.
    Rsa4096,
}

impl KeyAlgorithm {
    /// Every accepted spelling, for help texts.
    pub const NAMES: &'static [&'static str] = &[
        "ecdsa-p256",
        "ecdsa-p384",
        "ed25519",
        "rsa-2048",
        "rsa-3072",
        "rsa-4096",
    ];

    /// The modulus size of an RSA algorithm; `None` for the others.
    pub fn rsa_bits(self) -> Option<usize> {
        match self {
            Self::Rsa2048 => Some(2048),
            Self::Rsa3072 => Some(3072),
            Self::Rsa4096 => Some(4096),
            _ => None,
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::EcdsaP256 => "ecdsa-p256",
            Self::EcdsaP384 => "ecdsa-p384",
            Self::Ed25519 => "ed25519",
            Self::Rsa2048 => "rsa-2048",
            Self::Rsa3072 => "rsa-3072",
            Self::Rsa4096 => "rsa-4096",
        })
    }
}

impl FromStr for KeyAlgorithm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "ecdsa-p256" | "p256" | "ec-p256" => Self::EcdsaP256,
            "ecdsa-p384" | "p384" | "ec-p384" => Self::EcdsaP384,
            "ed25519" => Self::Ed25519,
            "rsa-2048" | "rsa2048" => Self::Rsa2048,
            "rsa-3072" | "rsa3072" => Self::Rsa3072,
            "rsa-4096" | "rsa4096" => Self::Rsa4096,
            _ => {
                return Err(Error::Key(format!(
                    "unknown key algorithm {s:?}; expected one of {}",
                    Self::NAMES.join(", ")
                )));
            }
        })
    }
}

/// A private key. Its `Debug` output never shows key material.
pub struct PrivateKey(KeyPair);

impl PrivateKey {
    /// Generates a fresh key.
    ///
    /// # Errors
    /// [`Error::Key`] if the system random source or the key encoding fails.
    pub fn generate(alg: KeyAlgorithm) -> Result<Self, Error> {
        if let Some(bits) = alg.rsa_bits() {
            use rsa::pkcs8::EncodePrivateKey;
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits)
                .map_err(|e| Error::Key(format!("RSA key generation failed: {e}")))?;
            let der = key
                .to_pkcs8_der()
                .map_err(|e| Error::Key(format!("RSA key encoding failed: {e}")))?;
            return Self::from_pkcs8_der(der.as_bytes());
        }
        let alg = match alg {
            KeyAlgorithm::EcdsaP384 => &PKCS_ECDSA_P384_SHA384,
            KeyAlgorithm::Ed25519 => &PKCS_ED25519,
            _ => &PKCS_ECDSA_P256_SHA256,
        };
        KeyPair::generate_for(alg)
            .map(Self)
            .map_err(|e| Error::Key(format!("key generation failed: {e}")))
    }

    /// Parses a PEM private key: PKCS#8 (`PRIVATE KEY`) of any supported type,
    /// or PKCS#1 RSA (`RSA PRIVATE KEY`, as older `openssl genrsa` writes).
    ///
    /// # Errors
    /// [`Error::Key`] for anything else, including SEC1 EC keys
    /// (`EC PRIVATE KEY`: convert them with `openssl pkcs8 -topk8 -nocrypt`),
    /// encrypted keys, and RSA keys under 2048 bits (ring refuses them).
    pub fn from_pem(pem_text: &str) -> Result<Self, Error> {
        let block =
            pem::parse(pem_text).map_err(|e| Error::Key(format!("not a PEM private key: {e}")))?;
        let der = Zeroizing::new(block.contents().to_vec());
        match block.tag() {
            "PRIVATE KEY" => Self::from_pkcs8_der(&der),
            "RSA PRIVATE KEY" => {
                use rsa::pkcs1::DecodeRsaPrivateKey;
                use rsa::pkcs8::EncodePrivateKey;
                let key = rsa::RsaPrivateKey::from_pkcs1_der(&der)
                    .map_err(|e| Error::Key(format!("bad PKCS#1 RSA key: {e}")))?;
                let pkcs8 = key
                    .to_pkcs8_der()
                    .map_err(|e| Error::Key(format!("RSA key encoding failed: {e}")))?;
                Self::from_pkcs8_der(pkcs8.as_bytes())
            }
            "EC PRIVATE KEY" => Err(Error::Key(
                "SEC1 \"EC PRIVATE KEY\" is not supported: convert it with `openssl pkcs8 -topk8 -nocrypt`".into(),
            )),
            other => Err(Error::Key(format!("unsupported PEM block {other:?} for a private key"))),
        }
    }

    fn from_pkcs8_der(der: &[u8]) -> Result<Self, Error> {
        let der = PrivatePkcs8KeyDer::from(der);
        // Try the algorithms ring supports; RSA keys sign with PKCS#1 SHA-256.
        KeyPair::try_from(&der)
            .map(Self)
            .or_else(|_| KeyPair::from_pkcs8_der_and_sign_algo(&der, &PKCS_RSA_SHA256).map(Self))
            .map_err(|e| {
                Error::Key(format!(
                    "unsupported or malformed PKCS#8 key (RSA must be 2048 to 8192 bits): {e}"
                ))
            })
    }

    /// The key as PKCS#8 PEM, wiped from memory when dropped.
    pub fn to_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.0.serialize_pem())
    }

    /// The raw public key bits as they appear in a SubjectPublicKeyInfo.
    pub fn public_key_raw(&self) -> &[u8] {
        self.0.public_key_raw()
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Vec<u8> {
        use rcgen::PublicKeyData;
        self.0.subject_public_key_info()
    }

    pub(crate) fn key_pair(&self) -> &KeyPair {
        &self.0
    }

    pub(crate) fn into_key_pair(self) -> KeyPair {
        self.0
    }

    /// A short name of the key type, for logs.
    pub fn kind(&self) -> &'static str {
        let alg = self.0.algorithm();
        if alg == &PKCS_ECDSA_P256_SHA256 {
            "ecdsa-p256"
        } else if alg == &PKCS_ECDSA_P384_SHA384 {
            "ecdsa-p384"
        } else if alg == &PKCS_ED25519 {
            "ed25519"
        } else {
            "rsa"
        }
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey({}, <redacted>)", self.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_and_reload_each_fast_type() {
        for alg in [
            KeyAlgorithm::EcdsaP256,
            KeyAlgorithm::EcdsaP384,
            KeyAlgorithm::Ed25519,
            KeyAlgorithm::Rsa2048,
        ] {
            let key = PrivateKey::generate(alg).unwrap();
            let again = PrivateKey::from_pem(&key.to_pem()).unwrap();
            assert_eq!(key.public_key_raw(), again.public_key_raw(), "{alg}");
        }
    }

    #[test]
    fn debug_never_shows_key_material() {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let dbg = format!("{key:?}");
        assert_eq!(dbg, "PrivateKey(ecdsa-p256, <redacted>)");
        let pem = key.to_pem();
        let body: String = pem.lines().nth(1).unwrap().chars().take(16).collect();
        assert!(!dbg.contains(&body));
    }

    #[test]
    fn algorithm_names_roundtrip() {
        for name in KeyAlgorithm::NAMES {
            assert_eq!(name.parse::<KeyAlgorithm>().unwrap().to_string(), *name);
        }
        assert!("dsa".parse::<KeyAlgorithm>().is_err());
    }

    #[test]
    fn rejects_sec1_and_garbage() {
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n";
        assert!(matches!(PrivateKey::from_pem(sec1), Err(Error::Key(m)) if m.contains("pkcs8")));
        assert!(PrivateKey::from_pem("hello").is_err());
    }
}
