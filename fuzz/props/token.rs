//! Token-check property, shared by `fuzz_targets/token_check.rs` and
//! `tests/properties.rs`: `JwtAuthenticator::verify` never accepts a token
//! that is unsigned (`alg: none`), signed with a symmetric algorithm or by
//! a key it was not given, expired, not yet valid, issued in the future,
//! too long-lived, from another issuer or for another audience; and a
//! well-made token is accepted. The oracle reads the token again with
//! base64, serde_json and ring directly (not through jsonwebtoken or the
//! CA's parser) and applies the rules of `src/server/jwt.rs` at the same
//! instant, which the check takes from its caller.

use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{self as sig, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};
use workload_ca::server::jwt::{IssuerConfig, JwtAuthenticator, KeySource};

/// The clock leeway the rules allow (README: 10 s), written here, not taken
/// from the implementation, so a wrong leeway there is caught.
const LEEWAY_SECS: u64 = 10;

pub const ISSUER: &str = "https://issuer.fuzz.test";
pub const AUDIENCE: &str = "workload-ca.fuzz.test";
pub const TRUST_DOMAIN: &str = "fuzz.test";
/// The authenticator's ceiling on a token's lifetime.
pub const MAX_LIFETIME: u64 = 3600;
/// The caller's clock: any fixed instant will do, the check reads no other.
pub const NOW: u64 = 1_800_000_000;

/// Which key signs a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signer {
    /// No signature at all (an empty third part).
    Empty,
    /// The configured Ed25519 key (kid `ed`, alg EdDSA).
    Ed,
    /// The configured P-256 key (kid `ec`, alg ES256).
    Ec,
    /// The configured RSA-2048 key (kid `rsa`, no alg), with the
    /// encoding the header's `alg` names (RS256 when it names none).
    Rsa,
    /// An Ed25519 key nobody configured.
    UnknownEd,
    /// A P-256 key nobody configured.
    UnknownEc,
    /// The bytes given, as the signature.
    Garbage,
}

/// A token to build.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The header's `alg` (any JSON value, `none` and `HS256` included).
    pub alg: Value,
    pub kid: Option<String>,
    pub crit: bool,
    pub signer: Signer,
    pub garbage: Vec<u8>,
    /// Claims, each absent when `None`: any JSON value.
    pub iss: Option<Value>,
    pub aud: Option<Value>,
    pub sub: Option<Value>,
    pub exp: Option<Value>,
    pub nbf: Option<Value>,
    pub iat: Option<Value>,
    /// One byte of the final token replaced: (position, byte).
    pub mutate: Option<(usize, u8)>,
}

impl Spec {
    /// A token every rule accepts: EdDSA by the configured key, our issuer
    /// and audience, valid from 10 s ago for 10 minutes.
    pub fn good() -> Self {
        Self {
            alg: json!("EdDSA"),
            kid: Some("ed".into()),
            crit: false,
            signer: Signer::Ed,
            garbage: Vec::new(),
            iss: Some(json!(ISSUER)),
            aud: Some(json!([AUDIENCE])),
            sub: Some(json!("system:serviceaccount:default:web")),
            exp: Some(json!(NOW + 600)),
            nbf: Some(json!(NOW - 10)),
            iat: Some(json!(NOW - 10)),
            mutate: None,
        }
    }
}

/// The configured keys and the unknown ones.
pub struct Keys {
    ed: Ed25519KeyPair,
    ec: EcdsaKeyPair,
    rsa: RsaKeyPair,
    unknown_ed: Ed25519KeyPair,
    unknown_ec: EcdsaKeyPair,
}

impl Keys {
    /// Fresh keys (the RSA one from the CA's own generator, in PKCS#8).
    ///
    /// # Panics
    /// When a key cannot be made.
    pub fn generate() -> Self {
        let rng = SystemRandom::new();
        let ed = || {
            let doc = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
            Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
        };
        let ec = || {
            let a = &sig::ECDSA_P256_SHA256_FIXED_SIGNING;
            let doc = EcdsaKeyPair::generate_pkcs8(a, &rng).unwrap();
            EcdsaKeyPair::from_pkcs8(a, doc.as_ref(), &rng).unwrap()
        };
        let rsa_pem = crate::keys::rsa_pem(2048);
        let rsa_der = pem::parse(rsa_pem.as_bytes()).unwrap().into_contents();
        Self {
            ed: ed(),
            ec: ec(),
            rsa: RsaKeyPair::from_pkcs8(&rsa_der).unwrap(),
            unknown_ed: ed(),
            unknown_ec: ec(),
        }
    }

    /// The JWKS the authenticator is given.
    pub fn jwks(&self) -> String {
        let ec = self.ec.public_key().as_ref();
        let rsa: sig::RsaPublicKeyComponents<Vec<u8>> = self.rsa.public().into();
        json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "alg": "EdDSA", "use": "sig",
             "x": B64.encode(self.ed.public_key().as_ref())},
            {"kty": "EC", "crv": "P-256", "kid": "ec", "alg": "ES256", "use": "sig",
             "x": B64.encode(&ec[1..33]), "y": B64.encode(&ec[33..65])},
            {"kty": "RSA", "kid": "rsa", "use": "sig", "n": B64.encode(&rsa.n), "e": B64.encode(&rsa.e)},
        ]})
        .to_string()
    }

    /// The authenticator under test: one issuer with [`Keys::jwks`], our
    /// audience, a lifetime ceiling of [`MAX_LIFETIME`].
    ///
    /// # Panics
    /// When it cannot be built.
    pub fn authenticator(&self) -> JwtAuthenticator {
        workload_ca::server::jwt_crypto::install();
        let td = workload_ca::identity::TrustDomain::new(TRUST_DOMAIN).unwrap();
        let config = IssuerConfig {
            issuer: ISSUER.into(),
            keys: KeySource::Static(vec![self.jwks()]),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(JwtAuthenticator::new(
            td,
            vec![AUDIENCE.into()],
            vec![config],
        ))
        .unwrap()
        .with_max_lifetime(Duration::from_secs(MAX_LIFETIME))
    }

    /// The token `spec` describes.
    pub fn build(&self, spec: &Spec) -> String {
        let mut header = serde_json::Map::new();
        header.insert("alg".into(), spec.alg.clone());
        header.insert("typ".into(), json!("JWT"));
        if let Some(kid) = &spec.kid {
            header.insert("kid".into(), json!(kid));
        }
        if spec.crit {
            header.insert("crit".into(), json!(["exp"]));
        }
        let mut claims = serde_json::Map::new();
        for (name, v) in [
            ("iss", &spec.iss),
            ("aud", &spec.aud),
            ("sub", &spec.sub),
            ("exp", &spec.exp),
            ("nbf", &spec.nbf),
            ("iat", &spec.iat),
        ] {
            if let Some(v) = v {
                claims.insert(name.into(), v.clone());
            }
        }
        let input = format!(
            "{}.{}",
            B64.encode(Value::Object(header).to_string()),
            B64.encode(Value::Object(claims).to_string())
        );
        let msg = input.as_bytes();
        let rng = SystemRandom::new();
        let signature: Vec<u8> = match spec.signer {
            Signer::Empty => Vec::new(),
            Signer::Garbage => spec.garbage.clone(),
            Signer::Ed => self.ed.sign(msg).as_ref().to_vec(),
            Signer::UnknownEd => self.unknown_ed.sign(msg).as_ref().to_vec(),
            Signer::Ec => self.ec.sign(&rng, msg).unwrap().as_ref().to_vec(),
            Signer::UnknownEc => self.unknown_ec.sign(&rng, msg).unwrap().as_ref().to_vec(),
            Signer::Rsa => {
                let enc: &'static dyn sig::RsaEncoding = match spec.alg.as_str() {
                    Some("RS384") => &sig::RSA_PKCS1_SHA384,
                    Some("RS512") => &sig::RSA_PKCS1_SHA512,
                    Some("PS256") => &sig::RSA_PSS_SHA256,
                    Some("PS384") => &sig::RSA_PSS_SHA384,
                    Some("PS512") => &sig::RSA_PSS_SHA512,
                    _ => &sig::RSA_PKCS1_SHA256,
                };
                let mut out = vec![0; self.rsa.public().modulus_len()];
                self.rsa.sign(enc, &rng, msg, &mut out).unwrap();
                out
            }
        };
        let mut token = format!("{input}.{}", B64.encode(signature)).into_bytes();
        if let Some((at, byte)) = spec.mutate
            && !token.is_empty()
        {
            let at = at % token.len();
            token[at] = byte;
        }
        String::from_utf8_lossy(&token).into_owned()
    }

    /// Whether the configured key the header may name signed `msg` under
    /// `alg`, asked of ring directly. A `kid` names one key (an unknown one
    /// none); a key published with an `alg` signs under that one only.
    fn known_signature(&self, alg: &str, kid: Option<&str>, msg: &[u8], signature: &[u8]) -> bool {
        let allowed = |key_kid: &str| kid.is_none_or(|k| k == key_kid);
        let check = |a: &'static dyn sig::VerificationAlgorithm, key: &[u8]| {
            sig::UnparsedPublicKey::new(a, key)
                .verify(msg, signature)
                .is_ok()
        };
        let rsa = self.rsa.public_key().as_ref();
        match alg {
            "EdDSA" => allowed("ed") && check(&sig::ED25519, self.ed.public_key().as_ref()),
            "ES256" => {
                allowed("ec") && check(&sig::ECDSA_P256_SHA256_FIXED, self.ec.public_key().as_ref())
            }
            "RS256" => allowed("rsa") && check(&sig::RSA_PKCS1_2048_8192_SHA256, rsa),
            "RS384" => allowed("rsa") && check(&sig::RSA_PKCS1_2048_8192_SHA384, rsa),
            "RS512" => allowed("rsa") && check(&sig::RSA_PKCS1_2048_8192_SHA512, rsa),
            "PS256" => allowed("rsa") && check(&sig::RSA_PSS_2048_8192_SHA256, rsa),
            "PS384" => allowed("rsa") && check(&sig::RSA_PSS_2048_8192_SHA384, rsa),
            "PS512" => allowed("rsa") && check(&sig::RSA_PSS_2048_8192_SHA512, rsa),
            _ => false,
        }
    }

    /// Why the rules refuse `token` at [`NOW`], or `Ok` with the service
    /// account (namespace, name) it names when they accept it.
    ///
    /// # Errors
    /// The first rule the token breaks.
    pub fn oracle(&self, token: &str) -> Result<(String, String), String> {
        let parts: Vec<&str> = token.split('.').collect();
        let [head, body, signature] = parts.as_slice() else {
            return Err("not three parts".into());
        };
        let json = |p: &str| -> Result<serde_json::Map<String, Value>, String> {
            let bytes = B64.decode(p).map_err(|e| e.to_string())?;
            match serde_json::from_slice(&bytes).map_err(|e| e.to_string())? {
                Value::Object(m) => Ok(m),
                _ => Err("not an object".into()),
            }
        };
        let header = json(head)?;
        let claims = json(body)?;
        let alg = header.get("alg").and_then(Value::as_str).ok_or("no alg")?;
        if header.contains_key("crit") {
            return Err("crit".into());
        }
        let signature = B64.decode(signature).map_err(|e| e.to_string())?;
        let msg = &token.as_bytes()[..head.len() + 1 + body.len()];
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.as_str()),
            Some(_) => return Err("kid not a string".into()),
        };
        if !self.known_signature(alg, kid, msg, &signature) {
            return Err(format!("not signed by a configured key under {alg}"));
        }
        let time = |name: &str| {
            claims
                .get(name)
                .map(|v| v.as_u64().ok_or(format!("{name} not a u64")))
        };
        let exp = time("exp").ok_or("no exp")??;
        if exp.saturating_add(LEEWAY_SECS) < NOW {
            return Err("expired".into());
        }
        if let Some(nbf) = time("nbf").transpose()?
            && nbf > NOW + LEEWAY_SECS
        {
            return Err("not yet valid".into());
        }
        let iat = time("iat").ok_or("no iat")??;
        if iat > NOW + LEEWAY_SECS {
            return Err("issued in the future".into());
        }
        if exp.saturating_sub(iat) > MAX_LIFETIME {
            return Err("lives too long".into());
        }
        if claims.get("iss").and_then(Value::as_str) != Some(ISSUER) {
            return Err("another issuer".into());
        }
        let ours = match claims.get("aud") {
            Some(Value::String(a)) => a == AUDIENCE,
            Some(Value::Array(all)) => all.iter().any(|a| a.as_str() == Some(AUDIENCE)),
            _ => false,
        };
        if !ours {
            return Err("another audience".into());
        }
        let sub = claims.get("sub").and_then(Value::as_str).ok_or("no sub")?;
        let rest = sub
            .strip_prefix("system:serviceaccount:")
            .ok_or("sub not a service account")?;
        let (ns, sa) = rest.split_once(':').ok_or("sub malformed")?;
        Ok((ns.to_owned(), sa.to_owned()))
    }

    /// The property on one token: if the authenticator accepts it at
    /// [`NOW`], every rule does, and it names the service account of its
    /// `sub`. Returns whether it was accepted.
    ///
    /// # Errors
    /// What the authenticator accepted that it must not have.
    pub fn check(&self, auth: &JwtAuthenticator, token: &str) -> Result<bool, String> {
        let now = UNIX_EPOCH + Duration::from_secs(NOW);
        let Ok(caller) = auth.verify(token, now) else {
            return Ok(false);
        };
        let (ns, sa) = self
            .oracle(token)
            .map_err(|why| format!("accepted a token the rules refuse ({why}): {token}"))?;
        let want = format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}");
        if caller.identity.as_str() != want {
            return Err(format!(
                "accepted as {}, the token names {want}",
                caller.identity
            ));
        }
        Ok(true)
    }
}
