//! The requests of a run, made before the clock starts: an identity, its
//! token, a key and its CSR, and the encoded gRPC message and headers of its
//! `CreateCertificate` call.

use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use prost::Message;

use super::LoadArgs;
use super::target::Target;
use crate::agent::workload::csr_for;
use crate::ca::PrivateKey;
use crate::proto::istio::IstioCertificateRequest;

/// The namespace of the bench's service accounts.
pub(super) const NAMESPACE: &str = "bench";
/// RSA keys are slow to make: CSRs of RSA keys share this many keys.
const RSA_KEYS: usize = 8;
/// The method's path.
pub(super) const CREATE_CERTIFICATE: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// One identity's call, ready to send.
pub(super) struct Prepared {
    /// `:authority`, content type, `te`, the bearer token.
    pub headers: HeaderMap,
    /// The gRPC frame: flag, length, the encoded request.
    pub body: Bytes,
    /// `/ns/<ns>/sa/<sa>`: what the issued certificate must name.
    pub path: String,
    /// Index into [`Work::keys`].
    pub key: usize,
}

/// Every identity's call.
pub(super) struct Work {
    pub calls: Vec<Prepared>,
    pub keys: Vec<PrivateKey>,
    /// The algorithm the tokens are signed with (for the floor).
    pub token_algorithm: jsonwebtoken::Algorithm,
    pub uri: http::Uri,
}

impl Work {
    /// Call `i` of [`Work::calls`], counted modulo their number (there is
    /// at least one: `timed` takes its indices modulo the count too).
    #[allow(clippy::indexing_slicing)] // `% len` is in bounds; no calls panics on `%` as before.
    pub(super) fn call(&self, i: usize) -> &Prepared {
        &self.calls[i % self.calls.len()]
    }

    /// Makes `--identities` calls (or one per token of a token file).
    ///
    /// # Errors
    /// A token or key that cannot be made.
    pub(super) fn prepare(target: &Target, load: &LoadArgs) -> anyhow::Result<Arc<Self>> {
        let n = load.identities;
        let keys = (0..if load.csr_key.rsa_bits().is_some() {
            RSA_KEYS.min(n)
        } else {
            n
        })
            .map(|_| PrivateKey::generate(load.csr_key))
            .collect::<Result<Vec<_>, _>>()
            .context("generating CSR keys")?;
        let mut calls = Vec::with_capacity(n);
        let mut token_algorithm = None;
        // Key `i % keys.len()` for call `i`.
        for (i, (key, key_pair)) in (0..n).zip(keys.iter().enumerate().cycle()) {
            let sa = format!("sa-{i}");
            let token = target.tokens.token(NAMESPACE, &sa)?;
            let header =
                jsonwebtoken::decode_header(&token).context("a token that is not a JWT")?;
            token_algorithm.get_or_insert(header.alg);
            let path = path_of(&token).unwrap_or_else(|| format!("/ns/{NAMESPACE}/sa/{sa}"));
            let csr = csr_for(key_pair)?;
            calls.push(Prepared {
                headers: headers(&token)?,
                body: grpc_frame(&IstioCertificateRequest {
                    csr,
                    validity_duration: 0,
                    metadata: None,
                }),
                path,
                key,
            });
        }
        let uri = format!("https://{}{CREATE_CERTIFICATE}", target.server_name)
            .parse()
            .context("the server name as a URI authority")?;
        Ok(Arc::new(Self {
            calls,
            keys,
            token_algorithm: token_algorithm.unwrap_or(jsonwebtoken::Algorithm::RS256),
            uri,
        }))
    }
}

/// `/ns/<ns>/sa/<sa>` of a service-account token's `sub`
/// (`system:serviceaccount:<ns>:<sa>`), read without verifying it (the CA
/// does that).
fn path_of(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let sub = claims.get("sub")?.as_str()?;
    let rest = sub.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    Some(format!("/ns/{ns}/sa/{sa}"))
}

fn headers(token: &str) -> anyhow::Result<HeaderMap> {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(http::header::TE, HeaderValue::from_static("trailers"));
    let mut auth = HeaderValue::try_from(format!("Bearer {token}"))
        .context("a token that cannot be a header value")?;
    auth.set_sensitive(true);
    h.insert(http::header::AUTHORIZATION, auth);
    Ok(h)
}

/// A gRPC length-prefixed message (uncompressed).
pub(super) fn grpc_frame(msg: &impl Message) -> Bytes {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&body);
    Bytes::from(out)
}
