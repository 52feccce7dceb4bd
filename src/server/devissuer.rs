//! The development token issuer behind `ca token`.
//!
//! A P-256 key kept in the state directory (mode 0600) signs ES256 tokens in
//! the Kubernetes service-account layout, with issuer [`DEV_ISSUER`]. The
//! server trusts it only when started with `--dev`, and says so loudly. It
//! exists so that the embedded default works with nothing else running; in a
//! real cluster configure the cluster's issuer instead.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::Error;
use crate::ca::store::atomic_write;
use crate::ca::{KeyAlgorithm, PrivateKey};

/// The `iss` of development tokens.
pub const DEV_ISSUER: &str = "workload-ca-dev";
const KEY_FILE: &str = "dev-issuer-key.pem";

/// The development issuer's signing key.
#[derive(Debug)]
pub struct DevIssuer {
    key: PrivateKey,
    path: PathBuf,
}

impl DevIssuer {
    /// Loads the key from `state_dir`, creating it on first use.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Ca`] for an unreadable or corrupt key file.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, Error> {
        let path = state_dir.join(KEY_FILE);
        if path.exists() {
            return Self::load(state_dir);
        }
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
        atomic_write(&path, key.to_pem().as_bytes(), 0o600).map_err(|e| Error::io(&path, e))?;
        Ok(Self { key, path })
    }

    /// Loads an existing key.
    ///
    /// # Errors
    /// [`Error::Config`] when there is none yet (start `ca server --dev`
    /// first), [`Error::Io`] or [`Error::Ca`] otherwise.
    pub fn load(state_dir: &Path) -> Result<Self, Error> {
        let path = state_dir.join(KEY_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => zeroize::Zeroizing::new(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::Config(format!(
                    "no development issuer key at {}: start `ca server --dev --state-dir {}` first",
                    path.display(),
                    state_dir.display()
                )));
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        let key = PrivateKey::from_pem(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok(Self { key, path })
    }

    /// The file the development key is kept in.
    pub fn key_path(&self) -> &Path {
        &self.path
    }

    fn encoding_key(&self) -> EncodingKey {
        let pem = self.key.to_pem();
        // A PKCS#8 PEM we produced ourselves; the DER is what ring signs with.
        let der = pem::parse(pem.as_bytes())
            .map(|p| p.into_contents())
            .unwrap_or_default();
        EncodingKey::from_ec_der(&der)
    }

    /// The public key as a JWK set (what the server trusts).
    ///
    /// # Errors
    /// [`Error::Config`] if the key cannot be expressed as a JWK.
    pub fn jwks(&self) -> Result<String, Error> {
        let mut jwk = Jwk::from_encoding_key(&self.encoding_key(), Algorithm::ES256)
            .map_err(|e| Error::Config(format!("development key as JWK: {e}")))?;
        jwk.common.key_id = Some(self.kid());
        serde_json::to_string(&JwkSet { keys: vec![jwk] }).map_err(|e| Error::Config(e.to_string()))
    }

    fn kid(&self) -> String {
        use base64::Engine;
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.key.spki_der());
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(digest.as_ref().get(..12).unwrap_or_default())
    }

    /// Mints a service-account token for `namespace`/`service_account`.
    ///
    /// # Errors
    /// [`Error::Config`] if signing fails.
    pub fn mint(
        &self,
        namespace: &str,
        service_account: &str,
        audience: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, Error> {
        self.signer()
            .mint(namespace, service_account, audience, ttl, now)
    }

    /// What signs this issuer's tokens.
    pub fn signer(&self) -> TokenSigner {
        TokenSigner {
            key: self.encoding_key(),
            algorithm: Algorithm::ES256,
            key_id: Some(self.kid()),
            issuer: DEV_ISSUER.to_owned(),
        }
    }
}

/// Signs tokens in the Kubernetes service-account layout (`sub`
/// `system:serviceaccount:<ns>:<sa>`, the `kubernetes.io` claim) with any
/// key the ring provider signs with: the development issuer's, or a test
/// or benchmark issuer's (`ca bench --issuer-key`).
pub struct TokenSigner {
    /// The signing key.
    pub key: EncodingKey,
    /// The algorithm the key signs with.
    pub algorithm: Algorithm,
    /// The `kid` header, when the issuer's JWKS names its keys.
    pub key_id: Option<String>,
    /// The `iss` claim.
    pub issuer: String,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("algorithm", &self.algorithm)
            .field("key_id", &self.key_id)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// Mints a token for `namespace`/`service_account`, valid from `now`
    /// for `ttl`.
    ///
    /// # Errors
    /// [`Error::Config`] if signing fails.
    pub fn mint(
        &self,
        namespace: &str,
        service_account: &str,
        audience: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, Error> {
        let iat = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = TokenClaims {
            iss: &self.issuer,
            sub: format!("system:serviceaccount:{namespace}:{service_account}"),
            aud: vec![audience.to_owned()],
            iat,
            nbf: iat,
            exp: iat + ttl.as_secs(),
            kubernetes: K8s {
                namespace: namespace.to_owned(),
                serviceaccount: Named {
                    name: service_account.to_owned(),
                    uid: "dev".into(),
                },
            },
        };
        let mut header = Header::new(self.algorithm);
        header.kid.clone_from(&self.key_id);
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| Error::Config(format!("signing token: {e}")))
    }
}

#[derive(Serialize)]
struct TokenClaims<'a> {
    iss: &'a str,
    sub: String,
    aud: Vec<String>,
    iat: u64,
    nbf: u64,
    exp: u64,
    #[serde(rename = "kubernetes.io")]
    kubernetes: K8s,
}

#[derive(Serialize)]
struct K8s {
    namespace: String,
    serviceaccount: Named,
}

#[derive(Serialize)]
struct Named {
    name: String,
    uid: String,
}
