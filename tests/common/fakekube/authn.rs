//! Authentication as the API server does it for service-account tokens
//! (k8s.io/apiserver .../token/jwt and pkg/serviceaccount/claims.go): issuer,
//! RS256 signature by a published key, audiences, times with go-jose's one
//! minute leeway, then the bound objects (service account, pod, node or
//! secret) by name and uid. Plus the two APIs built on it: TokenReview and
//! TokenRequest (`serviceaccounts/<name>/token`).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::resources::{ApiError, FieldError, Res};
use super::store::{Store, meta_str};
use super::timefmt;
use super::tokens::{self, Issuer};

/// go-jose's jwt.DefaultLeeway.
const LEEWAY: i64 = 60;
const EXTENDED_EXPIRATION: i64 = 24 * 365 * 60 * 60;
const WARN_ONLY_EXPIRATION: i64 = 60 * 60 + 7;

/// An authenticated user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserInfo {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    pub fn to_json(&self) -> Value {
        let mut u = json!({"username": self.username, "groups": self.groups});
        if !self.uid.is_empty() {
            u["uid"] = json!(self.uid);
        }
        if !self.extra.is_empty() {
            u["extra"] = json!(self.extra);
        }
        u
    }
}

/// Why a token was refused.
#[derive(Clone, Debug)]
pub enum Refused {
    /// No authenticator claimed it (not a JWT, another issuer).
    Unhandled,
    /// Claimed and refused, with the validator's message.
    Error(String),
}

impl Refused {
    /// How TokenReview reports it.
    pub fn message(&self) -> String {
        match self {
            Refused::Unhandled => "invalid bearer token".into(),
            Refused::Error(e) => format!("[invalid bearer token, {e}]"),
        }
    }
}

fn quoted(list: &[String]) -> String {
    let items: Vec<String> = list.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", items.join(" "))
}

/// The service-account token authenticator. `requested`: the audiences the
/// caller asks for (empty: the API server's). Answers the user and the
/// audiences the token is good for.
pub fn authenticate(
    store: &Store,
    issuer: &Issuer,
    token: &str,
    requested: &[String],
    now: i64,
) -> Result<(UserInfo, Vec<String>), Refused> {
    let jwt = tokens::parse_jwt(token).ok_or(Refused::Unhandled)?;
    if jwt.claims.get("iss").and_then(Value::as_str) != Some(issuer.issuer.as_str()) {
        return Err(Refused::Unhandled);
    }
    let crypto = || Refused::Error("go-jose/go-jose: error in cryptographic primitive".into());
    if jwt.header.get("alg").and_then(Value::as_str) != Some("RS256") {
        return Err(crypto());
    }
    let kid = jwt.header.get("kid").and_then(Value::as_str).unwrap_or("");
    let verified = issuer
        .keys
        .iter()
        .filter(|k| kid.is_empty() || k.kid == kid)
        .any(|k| k.verifies(&jwt.signing_input, &jwt.signature));
    if !verified {
        return Err(crypto());
    }
    let c = &jwt.claims;
    let token_auds: Vec<String> = match c.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    };
    let token_auds = if token_auds.is_empty() {
        issuer.api_audiences.clone()
    } else {
        token_auds
    };
    let requested = if requested.is_empty() {
        issuer.api_audiences.clone()
    } else {
        requested.to_vec()
    };
    let auds: Vec<String> = token_auds
        .iter()
        .filter(|a| requested.contains(a))
        .cloned()
        .collect();
    if auds.is_empty() {
        return Err(Refused::Error(format!(
            "token audiences {} is invalid for the target audiences {}",
            quoted(&token_auds),
            quoted(&requested)
        )));
    }
    let num = |k: &str| c.get(k).and_then(Value::as_i64);
    if let Some(nbf) = num("nbf")
        && now + LEEWAY < nbf
    {
        return Err(Refused::Error(
            "service account token is not valid yet".into(),
        ));
    }
    match num("exp") {
        Some(exp) if now - LEEWAY <= exp => {}
        _ => return Err(Refused::Error("service account token has expired".into())),
    }
    if let Some(iat) = num("iat")
        && now + LEEWAY < iat
    {
        return Err(Refused::Error(
            "service account token is issued in the future".into(),
        ));
    }
    let k = c.get("kubernetes.io").cloned().unwrap_or(Value::Null);
    let s = |p: &str| {
        k.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let ns = s("/namespace");
    let (sa_name, sa_uid) = (s("/serviceaccount/name"), s("/serviceaccount/uid"));
    if ns.is_empty() || sa_name.is_empty() {
        return Err(Refused::Unhandled);
    }
    let sa = store
        .get_lagged(Res::ServiceAccounts, &ns, &sa_name)
        .ok_or_else(|| Refused::Error(format!("serviceaccounts \"{sa_name}\" not found")))?;
    let live_uid = meta_str(&sa, "uid").unwrap_or("");
    if live_uid != sa_uid {
        return Err(Refused::Error(format!(
            "service account UID ({live_uid}) does not match claim ({sa_uid})"
        )));
    }
    let invalidated = || Refused::Error("service account token has been invalidated".into());
    if k.get("secret").is_some() {
        let (name, uid) = (s("/secret/name"), s("/secret/uid"));
        let secret = store
            .get_lagged(Res::Secrets, &ns, &name)
            .ok_or_else(invalidated)?;
        let live = meta_str(&secret, "uid").unwrap_or("");
        if live != uid {
            return Err(Refused::Error(format!(
                "secret UID ({live}) does not match service account secret ref claim ({uid})"
            )));
        }
    }
    let mut extra = BTreeMap::new();
    let has_pod = k.get("pod").is_some();
    if has_pod {
        let (name, uid) = (s("/pod/name"), s("/pod/uid"));
        let pod = store
            .get_lagged(Res::Pods, &ns, &name)
            .ok_or_else(invalidated)?;
        let live = meta_str(&pod, "uid").unwrap_or("");
        if live != uid {
            return Err(Refused::Error(format!(
                "pod UID ({live}) does not match service account pod ref claim ({uid})"
            )));
        }
        if !name.is_empty() && !uid.is_empty() {
            extra.insert(
                "authentication.kubernetes.io/pod-name".to_string(),
                vec![name],
            );
            extra.insert(
                "authentication.kubernetes.io/pod-uid".to_string(),
                vec![uid],
            );
        }
    }
    if k.get("node").is_some() {
        let (name, uid) = (s("/node/name"), s("/node/uid"));
        if !has_pod {
            // A node-bound token: the node must still exist, same uid.
            let node = store
                .get_lagged(Res::Nodes, "", &name)
                .ok_or_else(invalidated)?;
            let live = meta_str(&node, "uid").unwrap_or("");
            if live != uid {
                return Err(Refused::Error(format!(
                    "node UID ({live}) does not match service account node ref claim ({uid})"
                )));
            }
        }
        if !name.is_empty() {
            extra.insert(
                "authentication.kubernetes.io/node-name".to_string(),
                vec![name],
            );
            if !uid.is_empty() {
                extra.insert(
                    "authentication.kubernetes.io/node-uid".to_string(),
                    vec![uid],
                );
            }
        }
    }
    if let Some(jti) = c
        .get("jti")
        .and_then(Value::as_str)
        .filter(|j| !j.is_empty())
    {
        extra.insert(
            "authentication.kubernetes.io/credential-id".to_string(),
            vec![format!("JTI={jti}")],
        );
    }
    Ok((
        UserInfo {
            username: format!("system:serviceaccount:{ns}:{sa_name}"),
            uid: sa_uid,
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ],
            extra,
        },
        auds,
    ))
}

/// The API server's token success cache (`TokenSuccessCacheTTL`, 10 s on
/// a real kube-apiserver; 0, i.e. off, here unless a test sets it).
/// (token, requested audiences) -> (user, audiences, cached at).
type CacheMap = HashMap<(String, Vec<String>), (UserInfo, Vec<String>, Instant)>;

#[derive(Default)]
pub struct TokenCache {
    pub ttl: Duration,
    entries: CacheMap,
}

impl TokenCache {
    pub fn get(&mut self, token: &str, auds: &[String]) -> Option<(UserInfo, Vec<String>)> {
        if self.ttl.is_zero() {
            return None;
        }
        let ttl = self.ttl;
        self.entries.retain(|_, (_, _, at)| at.elapsed() < ttl);
        self.entries
            .get(&(token.to_string(), auds.to_vec()))
            .map(|(u, a, _)| (u.clone(), a.clone()))
    }

    pub fn put(&mut self, token: &str, auds: &[String], user: &UserInfo, ok_auds: &[String]) {
        if !self.ttl.is_zero() {
            self.entries.insert(
                (token.to_string(), auds.to_vec()),
                (user.clone(), ok_auds.to_vec(), Instant::now()),
            );
        }
    }
}

fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The TokenReview request: `(token, audiences)`.
pub fn parse_review(body: &Value) -> Result<(String, Vec<String>), ApiError> {
    let token = body
        .pointer("/spec/token")
        .and_then(Value::as_str)
        .unwrap_or("");
    if token.is_empty() {
        return Err(ApiError::bad_request(
            "token is required for TokenReview in authentication",
        ));
    }
    Ok((
        token.to_string(),
        string_list(body.pointer("/spec/audiences")),
    ))
}

/// The TokenReview answer.
pub fn review_response(body: &Value, result: Result<(UserInfo, Vec<String>), Refused>) -> Value {
    let spec = body.get("spec").cloned().unwrap_or(json!({}));
    let status = match result {
        Ok((user, auds)) => {
            json!({"authenticated": true, "user": user.to_json(), "audiences": auds})
        }
        Err(r) => json!({"user": {}, "error": r.message()}),
    };
    json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": spec,
        "status": status,
    })
}

fn token_request_invalid(name: &str, errs: &[FieldError]) -> ApiError {
    ApiError::invalid_kind(
        "TokenRequest.authentication.k8s.io",
        "authentication.k8s.io",
        "TokenRequest",
        name,
        errs,
    )
}

/// POST serviceaccounts/<name>/token (TokenREST.Create).
pub fn token_request(
    store: &Store,
    issuer: &Issuer,
    ns: &str,
    name: &str,
    body: &Value,
) -> Result<Value, ApiError> {
    if let Some(n) = body
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        && n != name
    {
        return Err(token_request_invalid(
            name,
            &[FieldError::invalid(
                "metadata.name",
                n,
                "must match the service account name if specified",
            )],
        ));
    }
    if let Some(n) = body
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        && n != ns
    {
        return Err(token_request_invalid(
            name,
            &[FieldError::invalid(
                "metadata.namespace",
                n,
                "must match the service account namespace if specified",
            )],
        ));
    }
    let sa = store
        .get(Res::ServiceAccounts, ns, name)
        .ok_or_else(|| ApiError::not_found(Res::ServiceAccounts, name))?;
    let sa_uid = meta_str(&sa, "uid").unwrap_or("").to_string();
    if let Some(u) = body
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        && u != sa_uid
    {
        let mut e = ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on TokenRequest.authentication.k8s.io \"{name}\": the UID in the token request ({u}) does not match the UID of the service account ({sa_uid})"
            ),
        );
        e.details =
            Some(json!({"name": name, "group": "authentication.k8s.io", "kind": "TokenRequest"}));
        return Err(e);
    }
    let mut auds = string_list(body.pointer("/spec/audiences"));
    if auds.is_empty() {
        auds = issuer.api_audiences.clone();
    }
    let expiration = body
        .pointer("/spec/expirationSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(3600);
    if expiration < 600 {
        return Err(token_request_invalid(
            "",
            &[FieldError::invalid_raw(
                "spec.expirationSeconds",
                expiration.to_string(),
                "may not specify a duration less than 10 minutes",
            )],
        ));
    }
    if expiration > 1 << 32 {
        return Err(token_request_invalid(
            "",
            &[FieldError::invalid_raw(
                "spec.expirationSeconds",
                expiration.to_string(),
                "may not specify a duration larger than 2^32 seconds",
            )],
        ));
    }
    let bound = body
        .pointer("/spec/boundObjectRef")
        .filter(|v| v.is_object());
    let (mut pod, mut node, mut secret) = (None, None, None);
    if let Some(r) = bound {
        let kind = r.get("kind").and_then(Value::as_str).unwrap_or("");
        let api_version = r.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        let rname = r.get("name").and_then(Value::as_str).unwrap_or("");
        let uid = match (group, kind) {
            ("", "Pod") => {
                let p = store
                    .get(Res::Pods, ns, rname)
                    .ok_or_else(|| ApiError::not_found(Res::Pods, rname))?;
                if p.pointer("/spec/serviceAccountName")
                    .and_then(Value::as_str)
                    != Some(name)
                {
                    return Err(ApiError::bad_request(format!(
                        "cannot bind token for serviceaccount {name:?} to pod running with different serviceaccount name."
                    )));
                }
                node = tokens::pod_node(store, &p);
                let uid = meta_str(&p, "uid").unwrap_or("").to_string();
                pod = Some(p);
                uid
            }
            ("", "Node") => {
                let n = store
                    .get(Res::Nodes, "", rname)
                    .ok_or_else(|| ApiError::not_found(Res::Nodes, rname))?;
                let uid = meta_str(&n, "uid").unwrap_or("").to_string();
                node = Some((rname.to_string(), uid.clone()));
                uid
            }
            ("", "Secret") => {
                let s = store
                    .get(Res::Secrets, ns, rname)
                    .ok_or_else(|| ApiError::not_found(Res::Secrets, rname))?;
                let uid = meta_str(&s, "uid").unwrap_or("").to_string();
                secret = Some((rname.to_string(), uid.clone()));
                uid
            }
            _ => {
                let version = api_version.rsplit('/').next().unwrap_or("");
                return Err(ApiError::bad_request(format!(
                    "cannot bind token to object of type {group}/{version}, Kind={kind}"
                )));
            }
        };
        if let Some(want) = r
            .get("uid")
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty())
            && want != uid
        {
            let mut e = ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {kind} \"{rname}\": the UID in the bound object reference ({want}) does not match the UID in record. The object might have been deleted and then recreated"
                ),
            );
            e.details = Some(json!({"name": rname, "kind": kind}));
            return Err(e);
        }
    }
    let (now, _) = timefmt::now_parts();
    let (mut exp, mut warnafter) = (expiration, None);
    let kube_auds = auds.iter().all(|a| issuer.api_audiences.contains(a));
    if issuer.extend_expiration && pod.is_some() && expiration == WARN_ONLY_EXPIRATION && kube_auds
    {
        warnafter = Some(now + expiration);
        exp = EXTENDED_EXPIRATION;
    }
    let mut claims = tokens::claims(
        &issuer.issuer,
        &sa,
        pod.as_deref(),
        node,
        &auds,
        now,
        now + exp,
        warnafter,
    );
    if let Some((n, u)) = secret {
        claims["kubernetes.io"]["secret"] = json!({"name": n, "uid": u});
    }
    let token = issuer.active().sign(&claims);
    let mut spec = json!({"audiences": auds, "expirationSeconds": expiration});
    if let Some(r) = bound {
        spec["boundObjectRef"] = r.clone();
    }
    Ok(json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": name, "namespace": ns, "uid": sa_uid, "creationTimestamp": timefmt::rfc3339(now)},
        "spec": spec,
        "status": {"token": token, "expirationTimestamp": timefmt::rfc3339(now + expiration)},
    }))
}
