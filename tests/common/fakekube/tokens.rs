//! The service-account token issuer: RS256 keys with the API server's key
//! ids (base64url SHA-256 of the PKIX public key), JWTs shaped as
//! k8s.io/kubernetes/pkg/serviceaccount/claims.go writes them, the JWKS at
//! `/openid/v1/jwks` and the discovery document at
//! `/.well-known/openid-configuration`.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::signature::{self, KeyPair as _, RsaKeyPair};
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey};
use rsa::traits::PublicKeyParts;
use serde_json::{Map, Value, json};

use super::resources::Res;
use super::store::{Store, meta_str, new_uid};

/// An RS256 signing key.
pub struct SigningKey {
    pub kid: String,
    pair: RsaKeyPair,
    n: String,
    e: String,
}

impl SigningKey {
    /// A fresh RSA-2048 key.
    pub fn generate() -> Self {
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("RSA key");
        let pkcs8 = key.to_pkcs8_der().expect("PKCS#8");
        let spki = key.to_public_key().to_public_key_der().expect("SPKI");
        let kid = B64URL.encode(ring::digest::digest(&ring::digest::SHA256, spki.as_bytes()));
        let pair = RsaKeyPair::from_pkcs8(pkcs8.as_bytes()).expect("ring accepts the key");
        Self {
            kid,
            pair,
            n: B64URL.encode(key.n().to_bytes_be()),
            e: B64URL.encode(key.e().to_bytes_be()),
        }
    }

    /// The JWK the API server publishes.
    pub fn jwk(&self) -> Value {
        json!({"use": "sig", "kty": "RSA", "kid": self.kid, "alg": "RS256", "n": self.n, "e": self.e})
    }

    /// A compact JWS over the claims, header `{"alg":"RS256","kid":...}`.
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "RS256", "kid": self.kid});
        let input = format!(
            "{}.{}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string())
        );
        let mut sig = vec![0u8; self.pair.public().modulus_len()];
        self.pair
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .expect("sign");
        format!("{input}.{}", B64URL.encode(sig))
    }

    /// Whether this key signed a token (RS256 only).
    pub fn verifies(&self, signing_input: &[u8], sig: &[u8]) -> bool {
        signature::UnparsedPublicKey::new(
            &signature::RSA_PKCS1_2048_8192_SHA256,
            self.pair.public_key().as_ref(),
        )
        .verify(signing_input, sig)
        .is_ok()
    }
}

/// A key no fake publishes, for "signed by another issuer" tests.
pub fn untrusted_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(SigningKey::generate)
}

/// The issuer's keys: the last one signs, all are published and verify.
pub struct Issuer {
    pub issuer: String,
    pub api_audiences: Vec<String>,
    pub keys: Vec<SigningKey>,
    /// `--service-account-extend-token-expiration` (default on).
    pub extend_expiration: bool,
}

impl Issuer {
    pub fn active(&self) -> &SigningKey {
        self.keys.last().expect("a key")
    }

    pub fn jwks(&self) -> Value {
        json!({"keys": self.keys.iter().map(SigningKey::jwk).collect::<Vec<_>>()})
    }

    /// The discovery document (pkg/serviceaccount/openidmetadata.go).
    pub fn discovery(&self, jwks_uri: &str) -> Value {
        json!({
            "issuer": self.issuer,
            "jwks_uri": jwks_uri,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        })
    }
}

/// What a test mints a token for.
#[derive(Clone, Debug)]
pub struct TokenSpec {
    pub namespace: String,
    pub service_account: String,
    /// Bind to this pod (its uid, and its node, are looked up).
    pub pod: Option<String>,
    /// Bind to this node when no pod is given (a node-bound token); with a
    /// pod it must be the pod's node or `None`.
    pub node: Option<String>,
    /// Empty: the API server's audiences (its issuer URL by default).
    pub audiences: Vec<String>,
    pub lifetime: Duration,
    /// `iat` and `nbf`; `None`: now. A past time with a short lifetime
    /// makes an expired token.
    pub issued_at: Option<SystemTime>,
    /// Overrides `iss`.
    pub issuer: Option<String>,
}

impl TokenSpec {
    pub fn new(namespace: &str, service_account: &str) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
            pod: None,
            node: None,
            audiences: Vec::new(),
            lifetime: Duration::from_secs(3600),
            issued_at: None,
            issuer: None,
        }
    }

    pub fn pod(mut self, pod: &str) -> Self {
        self.pod = Some(pod.into());
        self
    }

    pub fn node(mut self, node: &str) -> Self {
        self.node = Some(node.into());
        self
    }

    pub fn audiences(mut self, auds: &[&str]) -> Self {
        self.audiences = auds.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn lifetime(mut self, d: Duration) -> Self {
        self.lifetime = d;
        self
    }

    pub fn issued_at(mut self, t: SystemTime) -> Self {
        self.issued_at = Some(t);
        self
    }

    pub fn issuer(mut self, iss: &str) -> Self {
        self.issuer = Some(iss.into());
        self
    }
}

pub fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

fn reference(name: &str, uid: &str) -> Value {
    let mut m = Map::new();
    if !name.is_empty() {
        m.insert("name".into(), json!(name));
    }
    if !uid.is_empty() {
        m.insert("uid".into(), json!(uid));
    }
    Value::Object(m)
}

/// The claims of a bound token (claims.go `Claims`). `node` is the node
/// reference: a pod's node (uid empty when the Node object is missing) or
/// the node a token is bound to.
#[allow(clippy::too_many_arguments)]
pub fn claims(
    issuer: &str,
    sa: &Value,
    pod: Option<&Value>,
    node: Option<(String, String)>,
    audiences: &[String],
    iat: i64,
    exp: i64,
    warnafter: Option<i64>,
) -> Value {
    let ns = meta_str(sa, "namespace").unwrap_or("");
    let sa_name = meta_str(sa, "name").unwrap_or("");
    let mut k8s = Map::new();
    k8s.insert("namespace".into(), json!(ns));
    k8s.insert(
        "serviceaccount".into(),
        reference(sa_name, meta_str(sa, "uid").unwrap_or("")),
    );
    if let Some(p) = pod {
        k8s.insert(
            "pod".into(),
            reference(
                meta_str(p, "name").unwrap_or(""),
                meta_str(p, "uid").unwrap_or(""),
            ),
        );
    }
    if let Some((n, u)) = node {
        k8s.insert("node".into(), reference(&n, &u));
    }
    if let Some(w) = warnafter {
        k8s.insert("warnafter".into(), json!(w));
    }
    json!({
        "aud": audiences,
        "exp": exp,
        "iat": iat,
        "iss": issuer,
        "jti": new_uid(),
        "kubernetes.io": k8s,
        "nbf": iat,
        "sub": format!("system:serviceaccount:{ns}:{sa_name}"),
    })
}

/// The node reference a pod-bound token carries (TokenREST.Create): the
/// pod's node with its uid, or its name alone when the Node is missing.
pub fn pod_node(store: &Store, pod: &Value) -> Option<(String, String)> {
    let node = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())?;
    let uid = store
        .get(Res::Nodes, "", node)
        .and_then(|n| meta_str(&n, "uid").map(String::from))
        .unwrap_or_default();
    Some((node.to_string(), uid))
}

/// Claims for a test's TokenSpec, from the stored objects.
pub fn spec_claims(store: &Store, issuer: &Issuer, spec: &TokenSpec) -> Result<Value, String> {
    let sa = store
        .get(Res::ServiceAccounts, &spec.namespace, &spec.service_account)
        .ok_or_else(|| {
            format!(
                "serviceaccount {}/{} does not exist",
                spec.namespace, spec.service_account
            )
        })?;
    let pod = match &spec.pod {
        Some(p) => Some(
            store
                .get(Res::Pods, &spec.namespace, p)
                .ok_or_else(|| format!("pod {}/{p} does not exist", spec.namespace))?,
        ),
        None => None,
    };
    let node = match (&pod, &spec.node) {
        (Some(p), want) => {
            let n = pod_node(store, p);
            if let Some(w) = want
                && n.as_ref().map(|x| &x.0) != Some(w)
            {
                return Err(format!(
                    "pod {} does not run on node {w}",
                    spec.pod.as_deref().unwrap_or("")
                ));
            }
            n
        }
        (None, Some(n)) => {
            let node = store
                .get(Res::Nodes, "", n)
                .ok_or_else(|| format!("node {n} does not exist"))?;
            Some((n.clone(), meta_str(&node, "uid").unwrap_or("").to_string()))
        }
        (None, None) => None,
    };
    let iat = unix(spec.issued_at.unwrap_or_else(SystemTime::now));
    let auds = if spec.audiences.is_empty() {
        issuer.api_audiences.clone()
    } else {
        spec.audiences.clone()
    };
    let iss = spec.issuer.clone().unwrap_or_else(|| issuer.issuer.clone());
    Ok(claims(
        &iss,
        &sa,
        pod.as_deref(),
        node,
        &auds,
        iat,
        iat + spec.lifetime.as_secs() as i64,
        None,
    ))
}

/// A decoded, not yet verified JWT.
pub struct Jwt {
    pub header: Value,
    pub claims: Value,
    pub signing_input: Vec<u8>,
    pub signature: Vec<u8>,
}

pub fn parse_jwt(token: &str) -> Option<Jwt> {
    let mut parts = token.split('.');
    let (h, c, s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let header: Value = serde_json::from_slice(&B64URL.decode(h).ok()?).ok()?;
    let claims: Value = serde_json::from_slice(&B64URL.decode(c).ok()?).ok()?;
    Some(Jwt {
        header,
        claims,
        signing_input: format!("{h}.{c}").into_bytes(),
        signature: B64URL.decode(s).ok()?,
    })
}
