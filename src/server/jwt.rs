//! Bearer-token authentication: Kubernetes service-account JWTs validated
//! locally against configured public keys.
//!
//! Checked for every token: exactly one `authorization` value (two are
//! ambiguous and refused); at most [`MAX_TOKEN_BYTES`]; an asymmetric `alg`
//! (HMAC and `none` refused); no `crit` header parameter (RFC 7515 4.1.11:
//! we understand no extension, so any critical one is refused); an issuer
//! (`iss`) that is configured; a signature by one of that issuer's keys
//! (matched by `kid` when the token names one, and by the key's `alg` when
//! the JWK names one); `exp` in the future and `nbf` in the past, with
//! [`LEEWAY_SECS`] of leeway; `iat` not in the future beyond
//! the same leeway; `iat` present (Kubernetes always sets it) and a
//! lifetime (`exp` less `iat`) no longer than the configured ceiling ([`DEFAULT_MAX_TOKEN_LIFETIME`]: one
//! year, what Kubernetes' extended projected tokens get); an `aud` among the
//! configured audiences; `sub` of the form `system:serviceaccount:<ns>:<sa>`,
//! and, when present, a `kubernetes.io` claim that agrees with it.
//!
//! Not checked: whether the pod named in the token still exists (that needs
//! the Kubernetes API: a TokenReview authenticator is a later issue). A key
//! without a `kid` (PEM keys) is tried for any token.

use crate::sync::RwLockExt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::BodyExt;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey};

use super::Error;
use super::auth::{AuthContext, AuthError, AuthFuture, Authenticator, Caller, TokenFault};
use super::jwt_token::{Claims, NamedRef, Token};
use crate::ca::policy::{BoundObject, ClusterView, TokenFacts, check_binding};
use crate::identity::{SpiffeId, TrustDomain};
use crate::logsafe::peer;

/// Largest bearer token accepted.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Clock leeway for `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 10;
/// The default ceiling on a token's lifetime: Kubernetes extends projected
/// tokens to one year when `--service-account-extend-token-expiration` is on.
pub const DEFAULT_MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(365 * 86_400);
/// Largest JWKS document fetched from a URL.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// A public key a token may be signed with.
#[derive(Clone)]
pub struct VerifyKey {
    /// The JWK's `kid`; `None` for PEM keys, which any token may try.
    pub kid: Option<String>,
    /// The JWK's `alg`, if it names one.
    pub alg: Option<String>,
    /// The key itself.
    pub key: DecodingKey,
}

/// Where an issuer's keys come from.
#[derive(Clone, Debug)]
pub enum KeySource {
    /// A JWKS JSON document or PEM public keys in a file (re-read on refresh).
    File(PathBuf),
    /// A JWKS served over plain HTTP on a loopback address.
    Url(http::Uri),
    /// Keys known at start (the development issuer).
    Static(Vec<String>),
    /// A JWKS document published by another part of the process (the
    /// Kubernetes API server's, fetched by `crate::k8s::jwks`); `None`
    /// until the first fetch. A token naming a key id we do not know
    /// pokes `stale`, so a rotated issuer key is fetched at once.
    Published {
        /// The latest document, `None` until the first fetch.
        jwks: tokio::sync::watch::Receiver<Option<String>>,
        /// Poked when a token names an unknown key id.
        stale: Arc<tokio::sync::Notify>,
    },
}

impl KeySource {
    /// `http://` URLs (loopback only) or file paths.
    ///
    /// # Errors
    /// [`Error::Config`] for a URL that is not plain HTTP on a loopback host.
    pub fn parse(s: &str) -> Result<Self, Error> {
        if !s.contains("://") {
            return Ok(Self::File(PathBuf::from(s)));
        }
        let uri: http::Uri = s
            .parse()
            .map_err(|e| Error::Config(format!("JWKS URL {s:?}: {e}")))?;
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if uri.scheme_str() != Some("http") || !loopback {
            return Err(Error::Config(format!(
                "JWKS URL {s:?}: only http:// URLs on a loopback address are supported; use a file for anything else"
            )));
        }
        Ok(Self::Url(uri))
    }
}

/// One trusted token issuer.
#[derive(Clone, Debug)]
pub struct IssuerConfig {
    /// The `iss` claim its tokens carry.
    pub issuer: String,
    /// Where its public keys come from.
    pub keys: KeySource,
}

struct Issuer {
    config: IssuerConfig,
    /// `iss=<issuer, escaped> pod=`: the start of every caller's log detail.
    detail_prefix: String,
    keys: RwLock<Arc<Vec<VerifyKey>>>,
    /// The cluster whose tokens this issuer signs: every token's pod and
    /// service account must still exist there.
    cluster: Option<Arc<dyn ClusterView>>,
}

impl Issuer {
    /// Replaces the keys; a source that now yields no usable key is an
    /// error and the previous keys stay.
    async fn refresh(&self) -> Result<usize, Error> {
        let keys = load_keys(&self.config.keys).await?;
        let n = keys.len();
        if n == 0 {
            return Err(Error::Config(format!(
                "issuer {:?} has no usable public key",
                self.config.issuer
            )));
        }
        *self.keys.write_locked() = Arc::new(keys);
        Ok(n)
    }

    fn keys(&self) -> Arc<Vec<VerifyKey>> {
        self.keys.read_locked().clone()
    }
}

/// Validates bearer tokens from any configured issuer.
pub struct JwtAuthenticator {
    trust_domain: TrustDomain,
    audiences: Vec<String>,
    issuers: Vec<Arc<Issuer>>,
    max_lifetime: Duration,
}

impl JwtAuthenticator {
    /// Loads every issuer's keys once; a key source that cannot be read at
    /// start is a configuration error.
    ///
    /// # Errors
    /// [`Error::Config`] for an unreadable or empty key source, or no audience.
    pub async fn new(
        trust_domain: TrustDomain,
        audiences: Vec<String>,
        configs: Vec<IssuerConfig>,
    ) -> Result<Self, Error> {
        if audiences.is_empty() {
            return Err(Error::Config(
                "at least one JWT audience is required".into(),
            ));
        }
        let mut issuers = Vec::new();
        for config in configs {
            let detail_prefix = format!("iss={} pod=", peer(&config.issuer));
            let issuer = Arc::new(Issuer {
                detail_prefix,
                config,
                keys: RwLock::new(Arc::default()),
                cluster: None,
            });
            issuer.refresh().await?;
            issuers.push(issuer);
        }
        Ok(Self {
            trust_domain,
            audiences,
            issuers,
            max_lifetime: DEFAULT_MAX_TOKEN_LIFETIME,
        })
    }

    /// Refuses tokens that live longer than `max` (from `iat` to `exp`).
    #[must_use]
    pub fn with_max_lifetime(mut self, max: Duration) -> Self {
        self.max_lifetime = max;
        self
    }

    /// Checks every token of `issuer` against the cluster as `view` sees
    /// it ([`crate::ca::policy::check_binding`]), and requires such tokens
    /// to carry the `kubernetes.io` claim that names their bindings.
    ///
    /// # Errors
    /// [`Error::Config`] if no issuer of that name is configured.
    pub fn with_cluster_view(
        mut self,
        issuer: &str,
        view: Arc<dyn ClusterView>,
    ) -> Result<Self, Error> {
        let slot = self
            .issuers
            .iter_mut()
            .find(|i| i.config.issuer == issuer)
            .ok_or_else(|| Error::Config(format!("no issuer {issuer:?} to bind to the cluster")))?;
        let Some(i) = Arc::get_mut(slot) else {
            return Err(Error::Config("issuer already shared".into()));
        };
        i.cluster = Some(view);
        Ok(self)
    }

    /// The issuers, for the startup log.
    pub fn issuer_names(&self) -> Vec<String> {
        self.issuers
            .iter()
            .map(|i| i.config.issuer.clone())
            .collect()
    }

    /// Re-reads every file or URL key source every `period`, keeping the last
    /// good keys when a refresh fails. Ends when `shutdown` fires.
    pub fn spawn_refresh(
        self: &Arc<Self>,
        period: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        // A published source is taken at once when it changes (there is at
        // most one: the cluster's).
        let mut published = self.issuers.iter().find_map(|i| match &i.config.keys {
            KeySource::Published { jwks, .. } => Some(jwks.clone()),
            _ => None,
        });
        tokio::spawn(async move {
            loop {
                let changed = async {
                    match published.as_mut() {
                        Some(rx) => {
                            if rx.changed().await.is_err() {
                                std::future::pending::<()>().await;
                            }
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                // A tick re-reads files and URLs; a published document is
                // taken when (and only when) it changes.
                let published_changed = tokio::select! {
                    _ = tokio::time::sleep(period) => false,
                    _ = changed => true,
                    _ = shutdown.changed() => return,
                };
                for issuer in &this.issuers {
                    let due = match issuer.config.keys {
                        KeySource::Static(_) => false,
                        KeySource::Published { .. } => published_changed,
                        KeySource::File(_) | KeySource::Url(_) => !published_changed,
                    };
                    if !due {
                        continue;
                    }
                    if let Err(e) = issuer.refresh().await {
                        tracing::warn!(issuer = %issuer.config.issuer, error = %e, "JWKS refresh failed; keeping the previous keys");
                    }
                }
            }
        })
    }

    /// Every check of the module docs, at `now`: the caller's clock (a
    /// request's [`AuthContext::now`]), never the system's, so expiry and
    /// `nbf` are testable at any instant. The token is decoded and parsed
    /// once ([`Token::parse`]).
    ///
    /// # Errors
    /// [`AuthError::Token`] naming the first check that failed, or the
    /// cluster binding's refusal.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Caller, AuthError> {
        use TokenFault::{Issuer, Malformed, Signature, UnknownKey};
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::token(
                Malformed,
                format!("longer than {MAX_TOKEN_BYTES} bytes"),
            ));
        }
        let Token {
            header,
            claims,
            signing_input,
            signature_b64,
        } = Token::parse(token).map_err(|e| AuthError::token(Malformed, e))?;
        // RFC 7515 4.1.11: a recipient must refuse a token whose `crit`
        // names an extension it does not understand; we understand none.
        if let Some(crit) = &header.crit {
            return Err(AuthError::token(
                TokenFault::Algorithm,
                format!(
                    "critical header parameter(s) {} not understood",
                    peer(&crit.to_string())
                ),
            ));
        }
        if matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return Err(AuthError::token(
                TokenFault::Algorithm,
                format!("symmetric algorithm {:?} is not accepted", header.alg),
            ));
        }
        let iss = claims
            .iss
            .as_deref()
            .ok_or_else(|| AuthError::token(Issuer, "no iss claim"))?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.config.issuer == iss)
            .ok_or_else(|| AuthError::token(Issuer, format!("issuer {iss:?} is not trusted")))?;

        let keys = issuer.keys();
        let alg_name = format!("{:?}", header.alg);
        let mut candidates = keys
            .iter()
            // A key without a kid (PEM keys) may sign a token that names one:
            // Kubernetes tokens always carry a kid.
            .filter(|k| header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
            .filter(|k| k.alg.as_ref().is_none_or(|a| *a == alg_name))
            .peekable();
        if candidates.peek().is_none() {
            if let KeySource::Published { stale, .. } = &issuer.config.keys {
                stale.notify_one();
            }
            return Err(AuthError::token(
                UnknownKey,
                format!(
                    "no key of issuer {iss:?} matches kid {:?} and alg {alg_name}",
                    header.kid
                ),
            ));
        }
        let signature = super::jwt_token::signature(signature_b64)
            .map_err(|e| AuthError::token(Malformed, e))?;
        if !candidates
            .any(|key| super::jwt_crypto::verify(header.alg, &key.key, signing_input, &signature))
        {
            return Err(AuthError::token(Signature, "InvalidSignature"));
        }
        // A clock before 1970 reads as 0 (no real deployment has one).
        let now = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        claims
            .validate(iss, &self.audiences, LEEWAY_SECS, now)
            .map_err(|(fault, what)| AuthError::token(fault, what))?;
        self.check_times(&claims, now)?;
        self.caller(claims, issuer)
    }

    /// `iat` not in the future (beyond the leeway), and the lifetime under
    /// the ceiling. `exp` and `nbf` were checked by jsonwebtoken.
    fn check_times(&self, claims: &Claims, now: u64) -> Result<(), AuthError> {
        use TokenFault::{Lifetime, NotYetValid};
        // Kubernetes always sets `iat`; without it a token's lifetime could
        // not be bounded (a ten-year token would pass in its last year).
        let Some(iat) = claims.iat else {
            return Err(AuthError::token(Lifetime, "no iat claim"));
        };
        if iat > now.saturating_add(LEEWAY_SECS) {
            return Err(AuthError::token(
                NotYetValid,
                format!("issued in the future (iat {iat}, now {now})"),
            ));
        }
        let lifetime = claims.exp.unwrap_or(0).saturating_sub(iat);
        if lifetime > self.max_lifetime.as_secs() {
            return Err(AuthError::token(
                Lifetime,
                format!(
                    "lifetime of {lifetime} s is above the ceiling of {} s",
                    self.max_lifetime.as_secs()
                ),
            ));
        }
        Ok(())
    }

    fn caller(&self, claims: Claims, issuer: &Issuer) -> Result<Caller, AuthError> {
        let bad = |m: String| AuthError::token(TokenFault::Subject, m);
        let sub = claims.sub.as_deref().unwrap_or_default();
        let rest = sub
            .strip_prefix("system:serviceaccount:")
            .ok_or_else(|| bad(format!("sub {sub:?} is not a service account")))?;
        let (ns, sa) = rest
            .split_once(':')
            .ok_or_else(|| bad(format!("sub {sub:?} is malformed")))?;
        let mut facts = TokenFacts {
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
            service_account_uid: None,
            pod: None,
            node: None,
        };
        if let Some(k) = claims.kubernetes {
            if k.namespace != ns || k.serviceaccount.as_ref().is_some_and(|s| s.name != sa) {
                return Err(bad(format!(
                    "kubernetes.io claim disagrees with sub {sub:?}"
                )));
            }
            facts.service_account_uid = k.serviceaccount.and_then(|s| s.uid);
            facts.pod = k.pod.map(bound);
            facts.node = k.node.map(bound);
        }
        if let Some(view) = &issuer.cluster {
            // A cluster's bound tokens name their service account's UID;
            // a token that does not cannot be tied to what exists now.
            if facts.service_account_uid.is_none() {
                return Err(AuthError::token(
                    TokenFault::Unbound,
                    "no kubernetes.io service account UID: not a bound service-account token",
                ));
            }
            check_binding(&facts, view.as_ref()).map_err(AuthError::from)?;
        }
        let identity = SpiffeId::for_service_account(&self.trust_domain, ns, sa)
            .map_err(|e| bad(e.to_string()))?;
        let pod = facts.pod.as_ref().map(|p| p.name.as_str()).unwrap_or("");
        Ok(Caller {
            identity,
            method: "jwt",
            detail: {
                use std::fmt::Write;
                let mut d = String::with_capacity(issuer.detail_prefix.len() + pod.len() + 2);
                d.push_str(&issuer.detail_prefix);
                let _ = write!(d, "{}", peer(pod));
                d
            },
            max_ttl: None,
            // Only what was checked against the cluster may be used to
            // judge impersonation (a node claim of another issuer's token
            // says nothing about this cluster's nodes).
            facts: issuer.cluster.is_some().then_some(facts),
        })
    }
}

/// What a token's `kubernetes.io` claim names, as the cluster view
/// checks it.
fn bound(r: NamedRef) -> BoundObject {
    BoundObject {
        name: r.name,
        uid: r.uid.unwrap_or_default(),
    }
}

impl Authenticator for JwtAuthenticator {
    fn name(&self) -> &'static str {
        "jwt"
    }

    fn authenticate<'a>(&'a self, ctx: &'a AuthContext<'a>) -> AuthFuture<'a> {
        Box::pin(async move {
            let Some(token) = super::auth::bearer_token(ctx.metadata)? else {
                return Ok(None);
            };
            self.verify(token, ctx.now).map(Some)
        })
    }
}

async fn load_keys(source: &KeySource) -> Result<Vec<VerifyKey>, Error> {
    match source {
        KeySource::Static(docs) => {
            let mut keys = Vec::new();
            for doc in docs {
                keys.extend(parse_key_document(doc).map_err(Error::Config)?);
            }
            Ok(keys)
        }
        KeySource::Published { jwks, .. } => {
            let text = jwks.borrow().clone().ok_or_else(|| {
                Error::Config("the cluster's JWKS has not been fetched yet".into())
            })?;
            parse_key_document(&text).map_err(|e| Error::Config(format!("cluster JWKS: {e}")))
        }
        KeySource::File(path) => {
            let text = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| Error::Config(format!("reading JWT keys {}: {e}", path.display())))?;
            parse_key_document(&text)
                .map_err(|e| Error::Config(format!("JWT keys {}: {e}", path.display())))
        }
        KeySource::Url(uri) => {
            let text = fetch(uri)
                .await
                .map_err(|e| Error::Config(format!("fetching JWKS {uri}: {e}")))?;
            parse_key_document(&text).map_err(|e| Error::Config(format!("JWKS {uri}: {e}")))
        }
    }
}

/// A JWKS JSON document, or one or more PEM public keys.
fn parse_key_document(text: &str) -> Result<Vec<VerifyKey>, String> {
    if text.trim_start().starts_with('{') {
        let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWK set: {e}"))?;
        return Ok(set
            .keys
            .iter()
            .filter(|jwk| {
                !matches!(
                    jwk.common.public_key_use,
                    Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
                )
            })
            .filter_map(|jwk| {
                let key = DecodingKey::from_jwk(jwk).ok()?;
                Some(VerifyKey {
                    kid: jwk.common.key_id.clone(),
                    alg: jwk.common.key_algorithm.map(|a| format!("{a:?}")),
                    key,
                })
            })
            .collect());
    }
    let blocks = pem::parse_many(text).map_err(|e| format!("neither a JWK set nor PEM: {e}"))?;
    blocks
        .iter()
        .map(|b| {
            let pem_text = crate::ca::bundle::to_pem(b.tag(), b.contents());
            DecodingKey::from_rsa_pem(pem_text.as_bytes())
                .or_else(|_| DecodingKey::from_ec_pem(pem_text.as_bytes()))
                .or_else(|_| DecodingKey::from_ed_pem(pem_text.as_bytes()))
                .map(|key| VerifyKey {
                    kid: None,
                    alg: None,
                    key,
                })
                .map_err(|e| format!("PEM block {:?} is not a supported public key: {e}", b.tag()))
        })
        .collect()
}

async fn fetch(uri: &http::Uri) -> Result<String, String> {
    let host = uri.host().ok_or("no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let addr = format!("{}:{port}", host);
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = http::Request::get(path)
        .header(http::header::HOST, host)
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| "request timed out".to_string())?
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| "body is not UTF-8".to_string())
}
