//! The floor: what the unavoidable work of one `CreateCertificate` costs
//! in-process on this machine, one operation at a time on one thread:
//!
//! - `csr_verify`: the CSR's self-signature (ring), on its signed bytes;
//! - `token_verify`: the token's signature (ring), as an issuer of that
//!   algorithm signs it (RS256: a 2048-bit key, as the Kubernetes API
//!   server's);
//! - `sign`: our leaf profile (`ca::profile::leaf`: random serial, SPIFFE
//!   SAN, key usages) DER-encoded and signed by a CA key of the run's type
//!   (rcgen `signed_by`);
//! - `encode`: the leaf as PEM.
//!
//! Not in it, because a CA could in principle avoid them: TLS record
//! crypto, HTTP/2 and gRPC framing, protobuf, parsing PEM/DER and JSON,
//! the audit line, metrics. The server's CPU per certificate divided by
//! this floor says how much of that overhead is left.
//!
//! A new connection (cold, burst) adds the server's side of a full TLS 1.3
//! handshake that no server can skip ([`ConnectionFloor`]): the ephemeral
//! key exchange (X25519, what rustls, Go and BoringSSL clients offer first:
//! a key pair and the agreement) and the CertificateVerify signature with
//! the CA's serving key (P-256). Not in it: the TCP connection's life in
//! the kernel, the handshake's hashing and key schedule, the certificate
//! chain's encoding, HTTP/2 set-up.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use jsonwebtoken::Algorithm;
use ring::signature::{self as sig, KeyPair as _};
use serde::Serialize;
use x509_parser::prelude::FromDer;

use crate::agent::workload::csr_for;
use crate::ca::{Authority, KeyAlgorithm, PrivateKey, bundle, profile};
use crate::identity::{SpiffeId, TrustDomain};

/// Microseconds per operation.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Floor {
    pub csr_verify_us: f64,
    pub token_verify_us: f64,
    pub sign_us: f64,
    pub encode_us: f64,
    pub total_us: f64,
    /// What a new connection adds (cold and burst runs).
    pub connection: Option<ConnectionFloor>,
}

/// The server's unavoidable work of a full TLS 1.3 handshake, in
/// microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ConnectionFloor {
    /// An X25519 key pair and its agreement with the client's share.
    pub key_exchange_us: f64,
    /// An ECDSA P-256 signature (CertificateVerify).
    pub handshake_sign_us: f64,
    pub total_us: f64,
}

impl Floor {
    /// Per certificate: the request's floor, plus a handshake's when every
    /// certificate comes on a new connection.
    pub fn per_cert_us(&self) -> f64 {
        self.total_us + self.connection.map_or(0.0, |c| c.total_us)
    }
}

/// Measures [`ConnectionFloor`].
///
/// # Errors
/// A key that cannot be made or a signature that fails.
pub(super) fn measure_connection() -> anyhow::Result<ConnectionFloor> {
    use ring::agreement;
    let rng = ring::rand::SystemRandom::new();
    let client = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng)
        .map_err(|_| anyhow::anyhow!("X25519 key"))?;
    let client_share = client
        .compute_public_key()
        .map_err(|_| anyhow::anyhow!("X25519 public key"))?
        .as_ref()
        .to_vec();
    let key_exchange_us = per_op(|| {
        let ours = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng)
            .map_err(|_| anyhow::anyhow!("X25519 key"))?;
        std::hint::black_box(
            ours.compute_public_key()
                .map_err(|_| anyhow::anyhow!("X25519 public key"))?,
        );
        let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, &client_share);
        agreement::agree_ephemeral(ours, &peer, |secret| {
            std::hint::black_box(secret.len());
        })
        .map_err(|_| anyhow::anyhow!("X25519 agreement"))
    })?;
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
    let der = pem::parse(key.to_pem().as_bytes())?.into_contents();
    let pair = sig::EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_ASN1_SIGNING, &der, &rng)
        .map_err(|e| anyhow::anyhow!("EC key: {e}"))?;
    // What TLS 1.3 signs: 64 spaces, the context string, a SHA-256 hash.
    let mut content = vec![b' '; 64];
    content.extend_from_slice(b"TLS 1.3, server CertificateVerify\0");
    content.extend_from_slice(&[0x5a; 32]);
    let handshake_sign_us = per_op(|| {
        std::hint::black_box(
            pair.sign(&rng, &content)
                .map_err(|_| anyhow::anyhow!("EC signing failed"))?,
        );
        Ok(())
    })?;
    Ok(ConnectionFloor {
        key_exchange_us,
        handshake_sign_us,
        total_us: key_exchange_us + handshake_sign_us,
    })
}

/// Each operation runs in rounds of at least this long; the fastest round
/// counts (the floor is what the machine can do, not its noise).
const ROUND: Duration = Duration::from_millis(150);
const ROUNDS: usize = 5;

/// Microseconds per call of `f`, the fastest of [`ROUNDS`] rounds.
fn per_op(mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    // Warm the caches and find a batch size.
    let t = Instant::now();
    let mut warm = 0u32;
    while t.elapsed() < ROUND / 4 || warm < 3 {
        f()?;
        warm += 1;
    }
    let batch = warm.max(1);
    let mut best = f64::MAX;
    for _ in 0..ROUNDS {
        let mut n = 0u32;
        let t = Instant::now();
        while t.elapsed() < ROUND {
            for _ in 0..batch {
                f()?;
            }
            n += batch;
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e6 / f64::from(n));
    }
    Ok(best)
}

fn csr_algorithm(k: KeyAlgorithm) -> &'static dyn sig::VerificationAlgorithm {
    match k {
        KeyAlgorithm::EcdsaP384 => &sig::ECDSA_P384_SHA384_ASN1,
        KeyAlgorithm::Ed25519 => &sig::ED25519,
        k if k.rsa_bits().is_some() => &sig::RSA_PKCS1_2048_8192_SHA256,
        _ => &sig::ECDSA_P256_SHA256_ASN1,
    }
}

/// Measures the floor for CSRs of `csr_key`, a CA key of `ca_key` and
/// tokens signed with `token`.
///
/// # Errors
/// A key that cannot be made, or a verification that fails (which would
/// make the figure meaningless).
pub(super) fn measure(
    csr_key: KeyAlgorithm,
    ca_key: KeyAlgorithm,
    token: Algorithm,
) -> anyhow::Result<Floor> {
    let now = SystemTime::now();
    // The CSR's signature.
    let leaf_key = PrivateKey::generate(csr_key)?;
    let csr_pem = csr_for(&leaf_key)?;
    let csr_der = pem::parse(csr_pem.as_bytes())?.into_contents();
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&csr_der)
        .map_err(|e| anyhow::anyhow!("our own CSR does not parse: {e}"))?;
    let signed = csr.certification_request_info.raw;
    let signature = csr.signature_value.data.to_vec();
    let spki = csr
        .certification_request_info
        .subject_pki
        .subject_public_key
        .data
        .to_vec();
    let csr_alg = csr_algorithm(csr_key);
    let csr_verify_us = per_op(|| {
        sig::UnparsedPublicKey::new(csr_alg, &spki)
            .verify(signed, &signature)
            .map_err(|_| anyhow::anyhow!("the CSR signature does not verify"))
    })?;

    // The token's signature, over a signing input of a bound token's size.
    let message = vec![b'e'; 900];
    let token_verify_us = match token {
        Algorithm::RS256 => {
            let key = PrivateKey::generate(KeyAlgorithm::Rsa2048)?;
            let der = pem::parse(key.to_pem().as_bytes())?.into_contents();
            let pair =
                sig::RsaKeyPair::from_pkcs8(&der).map_err(|e| anyhow::anyhow!("RSA key: {e}"))?;
            let mut s = vec![0; pair.public().modulus_len()];
            pair.sign(
                &sig::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                &message,
                &mut s,
            )
            .map_err(|_| anyhow::anyhow!("RSA signing failed"))?;
            let public = pair.public().as_ref().to_vec();
            per_op(|| {
                sig::UnparsedPublicKey::new(&sig::RSA_PKCS1_2048_8192_SHA256, &public)
                    .verify(&message, &s)
                    .map_err(|_| anyhow::anyhow!("the token signature does not verify"))
            })?
        }
        Algorithm::ES256 | Algorithm::ES384 => {
            let (signing, verify, alg) = if token == Algorithm::ES256 {
                (
                    &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
                    &sig::ECDSA_P256_SHA256_FIXED,
                    KeyAlgorithm::EcdsaP256,
                )
            } else {
                (
                    &sig::ECDSA_P384_SHA384_FIXED_SIGNING,
                    &sig::ECDSA_P384_SHA384_FIXED,
                    KeyAlgorithm::EcdsaP384,
                )
            };
            let key = PrivateKey::generate(alg)?;
            let der = pem::parse(key.to_pem().as_bytes())?.into_contents();
            let rng = ring::rand::SystemRandom::new();
            let pair = sig::EcdsaKeyPair::from_pkcs8(signing, &der, &rng)
                .map_err(|e| anyhow::anyhow!("EC key: {e}"))?;
            let s = pair
                .sign(&rng, &message)
                .map_err(|_| anyhow::anyhow!("EC signing failed"))?;
            let public = pair.public_key().as_ref().to_vec();
            per_op(|| {
                sig::UnparsedPublicKey::new(verify, &public)
                    .verify(&message, s.as_ref())
                    .map_err(|_| anyhow::anyhow!("the token signature does not verify"))
            })?
        }
        other => bail!("no floor for tokens signed with {other:?}"),
    };

    // Sign and encode our leaf profile.
    let td = TrustDomain::new("cluster.local")?;
    let root = Authority::generate_root(&td, ca_key, Duration::from_secs(86_400), now)?;
    let ca_pair = rcgen::KeyPair::from_pem(&root.ca_key).context("the floor's CA key")?;
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&root.ca_cert, ca_pair).context("the floor's CA")?;
    let id = SpiffeId::parse("spiffe://cluster.local/ns/bench/sa/sa-0")?;
    let public = rcgen::SubjectPublicKeyInfo::from_der(&leaf_key.spki_der())
        .context("the leaf key's SPKI")?;
    let rsa = csr_key.rsa_bits().is_some();
    let mut last = Vec::new();
    let sign_us = per_op(|| {
        let params = profile::leaf(&id, now, now + Duration::from_secs(3600), rsa)?;
        last = params.signed_by(&public, &issuer)?.der().to_vec();
        Ok(())
    })?;
    let encode_us = per_op(|| {
        std::hint::black_box(bundle::to_pem("CERTIFICATE", &last));
        Ok(())
    })?;
    Ok(Floor {
        csr_verify_us,
        token_verify_us,
        sign_us,
        encode_us,
        total_us: csr_verify_us + token_verify_us + sign_us + encode_us,
        connection: None,
    })
}
