//! A JWS compact token taken apart once: its header and claims decoded and
//! parsed a single time each, its signature checked with ring directly, and
//! the registered claims validated as jsonwebtoken's `Validation` would
//! (required `exp`, `iss`, `aud`, `sub`; `exp` and `nbf` with leeway; an
//! audience among ours). [`super::jwt::JwtAuthenticator`] does the rest
//! (which issuer, which key, `iat`, the lifetime, the subject).
//!
//! Why not `jsonwebtoken::decode`: it decodes the header again, builds a
//! boxed verifier with a copy of the key, and parses the claims twice; with
//! the header and `crit` checks and the issuer lookup before it, a token was
//! decoded and parsed three times. Everything is refused exactly as before:
//! only the number of passes changed.

use super::auth::TokenFault;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde::Deserialize;

/// The parts of a token, decoded but not yet trusted.
pub(super) struct Token<'a> {
    pub header: Header,
    pub claims: Claims,
    /// `<header>.<payload>`: what the signature covers.
    pub signing_input: &'a [u8],
    /// The signature, still base64url: decoded by [`signature`] once the
    /// claims have named a trusted issuer.
    pub signature_b64: &'a str,
}

/// The JOSE header fields we read. Unknown fields are ignored, as
/// jsonwebtoken does; `crit` is kept so that it can be refused.
#[derive(Deserialize)]
pub(super) struct Header {
    pub alg: Algorithm,
    #[serde(default)]
    pub kid: Option<String>,
    /// Present at all (`null` included) is `Some`: any `crit` is refused.
    #[serde(default, deserialize_with = "present")]
    pub crit: Option<serde_json::Value>,
}

/// A member that is present, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// Every claim the CA reads.
#[derive(Deserialize)]
pub(super) struct Claims {
    #[serde(default)]
    pub iss: Option<String>,
    #[serde(default)]
    pub sub: Option<String>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    pub exp: Option<u64>,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default)]
    pub iat: Option<u64>,
    #[serde(rename = "kubernetes.io", default)]
    pub kubernetes: Option<KubernetesClaim>,
}

/// `aud`: one string or an array of them (RFC 7519 4.1.3). Read by a
/// visitor of its own: serde's untagged enums build an error for every
/// variant that does not match, and Kubernetes sends arrays.
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for Audience {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Audience;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Audience, E> {
                Ok(Audience::One(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Audience, A::Error> {
                let mut all = Vec::with_capacity(seq.size_hint().unwrap_or(1).min(16));
                while let Some(a) = seq.next_element::<String>()? {
                    all.push(a);
                }
                Ok(Audience::Many(all))
            }
        }
        d.deserialize_any(Visit)
    }
}

#[derive(Deserialize)]
pub(super) struct KubernetesClaim {
    pub namespace: String,
    pub serviceaccount: Option<NamedRef>,
    pub pod: Option<NamedRef>,
    pub node: Option<NamedRef>,
}

#[derive(Deserialize)]
pub(super) struct NamedRef {
    pub name: String,
    pub uid: Option<String>,
}

impl<'a> Token<'a> {
    /// Splits and decodes `token` (exactly three base64url parts without
    /// padding, as jsonwebtoken reads them).
    ///
    /// # Errors
    /// A message naming the malformed part.
    pub(super) fn parse(token: &'a str) -> Result<Self, String> {
        let mut parts = token.split('.');
        let (Some(head), Some(payload), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("malformed header: not three dot-separated parts".into());
        };
        let header: Header = decode_json(head).map_err(|e| format!("malformed header: {e}"))?;
        let claims: Claims = decode_json(payload).map_err(|e| format!("malformed claims: {e}"))?;
        Ok(Self {
            header,
            claims,
            // `head.payload`, which `split` found at the token's start.
            signing_input: token
                .as_bytes()
                .get(..head.len() + 1 + payload.len())
                .unwrap_or_default(),
            signature_b64: sig,
        })
    }
}

/// A token's signature bytes, from its third part.
///
/// # Errors
/// It is not base64url without padding.
pub(super) fn signature(b64: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|e| format!("malformed signature: {e}"))
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, String> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

impl Claims {
    /// jsonwebtoken's validation of the registered claims, at `now` (Unix
    /// seconds): `exp`, `iss`, `aud` and `sub` present; not expired and
    /// not before `nbf`, each with `leeway` seconds; `iss` is `issuer`; an
    /// `aud` among `audiences`.
    ///
    /// # Errors
    /// Which check failed, and what is wrong in jsonwebtoken's words.
    pub(super) fn validate(
        &self,
        issuer: &str,
        audiences: &[String],
        leeway: u64,
        now: u64,
    ) -> Result<(), (TokenFault, &'static str)> {
        use TokenFault::{Expired, Issuer, Malformed, NotYetValid};
        let Some(exp) = self.exp else {
            return Err((Malformed, "Missing required claim: exp"));
        };
        if self.iss.is_none() {
            return Err((Malformed, "Missing required claim: iss"));
        }
        let Some(aud) = &self.aud else {
            return Err((Malformed, "Missing required claim: aud"));
        };
        if self.sub.is_none() {
            return Err((Malformed, "Missing required claim: sub"));
        }
        if exp < now.saturating_sub(leeway) {
            return Err((Expired, "ExpiredSignature"));
        }
        if self.nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
            return Err((NotYetValid, "ImmatureSignature"));
        }
        if self.iss.as_deref() != Some(issuer) {
            return Err((Issuer, "InvalidIssuer"));
        }
        let ours = |a: &String| audiences.contains(a);
        let known = match aud {
            Audience::One(a) => ours(a),
            Audience::Many(list) => list.iter().any(ours),
        };
        if !known {
            return Err((TokenFault::Audience, "InvalidAudience"));
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "jwt_token_tests.rs"]
mod tests;
