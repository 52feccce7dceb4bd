//! A ring-backed `jsonwebtoken` crypto provider.
//!
//! jsonwebtoken 11 ships providers for aws-lc-rs and RustCrypto only. This
//! one routes every JWT signature check through ring, the same library that
//! verifies our TLS handshakes and CSRs, so one audited implementation does
//! all public-key verification. It supports the asymmetric algorithms only:
//! RS256/384/512, PS256/384/512, ES256/384 and EdDSA. HMAC (`HS*`) is refused
//! on purpose: a CA must never accept tokens signed with a shared secret.
//! `alg: none` cannot even be expressed in jsonwebtoken's `Algorithm`.

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::jwk::{EllipticCurve, ThumbprintHash};
use jsonwebtoken::signature::{self, Signer, Verifier};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::rand::SystemRandom;
use ring::signature::{self as sig, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};

/// Installs the provider for the process. Safe to call more than once.
pub fn install() {
    let _ = PROVIDER.install_default();
}

static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils {
        rsa_pub_components_from_private_key: rsa_components_from_private_key,
        rsa_pub_components_from_public_key: |_| Err(ErrorKind::InvalidKeyFormat.into()),
        ec_pub_components_from_private_key: ec_components_from_private_key,
        ed_pub_components_from_private_key: ed_components_from_private_key,
        compute_digest,
    },
};

fn rsa_params(alg: Algorithm) -> Option<&'static sig::RsaParameters> {
    Some(match alg {
        Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

fn verification_alg(alg: Algorithm) -> Result<&'static dyn sig::VerificationAlgorithm, Error> {
    if let Some(params) = rsa_params(alg) {
        return Ok(params);
    }
    Ok(match alg {
        Algorithm::ES256 => &sig::ECDSA_P256_SHA256_FIXED,
        Algorithm::ES384 => &sig::ECDSA_P384_SHA384_FIXED,
        Algorithm::EdDSA => &sig::ED25519,
        // HMAC, and anything a future jsonwebtoken adds, is refused.
        _ => return Err(ErrorKind::InvalidAlgorithm.into()),
    })
}

struct RingVerifier {
    alg: Algorithm,
    key: DecodingKey,
}

impl Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        if verify(self.alg, &self.key, msg, signature) {
            Ok(())
        } else {
            Err(signature::Error::new())
        }
    }
}

/// Whether `signature` over `msg` verifies with `key` under `alg`: an
/// asymmetric algorithm (HMAC refused) of the key's own family, checked by
/// ring. What jsonwebtoken's `decode` does through this provider, without
/// building a boxed verifier holding a copy of the key.
pub(crate) fn verify(alg: Algorithm, key: &DecodingKey, msg: &[u8], signature: &[u8]) -> bool {
    if key.family() != alg.family() {
        return false;
    }
    let Ok(ring_alg) = verification_alg(alg) else {
        return false;
    };
    match key.kind() {
        DecodingKeyKind::SecretOrDer(der) => sig::UnparsedPublicKey::new(ring_alg, der)
            .verify(msg, signature)
            .is_ok(),
        DecodingKeyKind::RsaModulusExponent { n, e } => rsa_params(alg).is_some_and(|params| {
            sig::RsaPublicKeyComponents { n, e }
                .verify(params, msg, signature)
                .is_ok()
        }),
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

fn new_verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    if key.family() != alg.family() {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    verification_alg(*alg)?;
    Ok(Box::new(RingVerifier {
        alg: *alg,
        key: key.clone(),
    }))
}

enum SignerKey {
    Ecdsa(EcdsaKeyPair),
    Rsa(RsaKeyPair, &'static dyn sig::RsaEncoding),
    Ed(Ed25519KeyPair),
}

struct RingSigner {
    alg: Algorithm,
    key: SignerKey,
}

impl Signer<Vec<u8>> for RingSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let rng = SystemRandom::new();
        match &self.key {
            SignerKey::Ecdsa(k) => k
                .sign(&rng, msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| signature::Error::new()),
            SignerKey::Ed(k) => Ok(k.sign(msg).as_ref().to_vec()),
            SignerKey::Rsa(k, enc) => {
                let mut out = vec![0; k.public().modulus_len()];
                k.sign(*enc, &rng, msg, &mut out)
                    .map_err(|_| signature::Error::new())?;
                Ok(out)
            }
        }
    }
}

impl JwtSigner for RingSigner {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

fn new_signer(alg: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    let der = key.as_bytes();
    let rng = SystemRandom::new();
    let rsa = |enc: &'static dyn sig::RsaEncoding| {
        RsaKeyPair::from_pkcs8(der)
            .or_else(|_| RsaKeyPair::from_der(der))
            .map(|k| SignerKey::Rsa(k, enc))
            .map_err(|e| Error::from(ErrorKind::InvalidRsaKey(e.to_string())))
    };
    let ec = |a: &'static sig::EcdsaSigningAlgorithm| {
        EcdsaKeyPair::from_pkcs8(a, der, &rng)
            .map(SignerKey::Ecdsa)
            .map_err(|_| Error::from(ErrorKind::InvalidEcdsaKey))
    };
    let key = match alg {
        Algorithm::ES256 => ec(&sig::ECDSA_P256_SHA256_FIXED_SIGNING)?,
        Algorithm::ES384 => ec(&sig::ECDSA_P384_SHA384_FIXED_SIGNING)?,
        Algorithm::RS256 => rsa(&sig::RSA_PKCS1_SHA256)?,
        Algorithm::RS384 => rsa(&sig::RSA_PKCS1_SHA384)?,
        Algorithm::RS512 => rsa(&sig::RSA_PKCS1_SHA512)?,
        Algorithm::PS256 => rsa(&sig::RSA_PSS_SHA256)?,
        Algorithm::PS384 => rsa(&sig::RSA_PSS_SHA384)?,
        Algorithm::PS512 => rsa(&sig::RSA_PSS_SHA512)?,
        Algorithm::EdDSA => SignerKey::Ed(
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
                .map_err(|_| Error::from(ErrorKind::InvalidEddsaKey))?,
        ),
        _ => return Err(ErrorKind::InvalidAlgorithm.into()),
    };
    Ok(Box::new(RingSigner { alg: *alg, key }))
}

fn rsa_components_from_private_key(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let k = RsaKeyPair::from_pkcs8(der)
        .or_else(|_| RsaKeyPair::from_der(der))
        .map_err(|e| Error::from(ErrorKind::InvalidRsaKey(e.to_string())))?;
    let c: sig::RsaPublicKeyComponents<Vec<u8>> = k.public().into();
    Ok((c.n, c.e))
}

fn ec_components_from_private_key(
    der: &[u8],
    alg: Algorithm,
) -> Result<(EllipticCurve, Vec<u8>, Vec<u8>), Error> {
    let (a, curve, len) = match alg {
        Algorithm::ES256 => (
            &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
            EllipticCurve::P256,
            32,
        ),
        Algorithm::ES384 => (
            &sig::ECDSA_P384_SHA384_FIXED_SIGNING,
            EllipticCurve::P384,
            48,
        ),
        _ => return Err(ErrorKind::InvalidEcdsaKey.into()),
    };
    let k = EcdsaKeyPair::from_pkcs8(a, der, &SystemRandom::new())
        .map_err(|_| Error::from(ErrorKind::InvalidEcdsaKey))?;
    let point = k.public_key().as_ref();
    match point.split_first() {
        Some((4, xy)) if xy.len() == 2 * len => {
            let (x, y) = xy.split_at(len);
            Ok((curve, x.to_vec(), y.to_vec()))
        }
        _ => Err(ErrorKind::InvalidEcdsaKey.into()),
    }
}

fn ed_components_from_private_key(der: &[u8], curve: &EllipticCurve) -> Result<Vec<u8>, Error> {
    match curve {
        EllipticCurve::Ed25519 => Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(|k| k.public_key().as_ref().to_vec())
            .map_err(|_| ErrorKind::InvalidEddsaKey.into()),
        _ => Err(ErrorKind::InvalidAlgorithm.into()),
    }
}

fn compute_digest(data: &[u8], hash: ThumbprintHash) -> Result<Vec<u8>, Error> {
    let alg = match hash {
        ThumbprintHash::SHA256 => &ring::digest::SHA256,
        ThumbprintHash::SHA384 => &ring::digest::SHA384,
        ThumbprintHash::SHA512 => &ring::digest::SHA512,
        _ => return Err(ErrorKind::InvalidAlgorithm.into()),
    };
    Ok(ring::digest::digest(alg, data).as_ref().to_vec())
}
