//! The HTTPS front: TLS (rustls, HTTP/1.1), connection handling with the
//! fault switches, request parsing (RequestInfoFactory's URL layout and
//! verbs), authentication, the request log, injected failures.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::authn::{self, TokenCache, UserInfo};
use super::resources::ApiError;
use super::store::Store;
use super::timefmt;
use super::tokens::Issuer;

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// One request as the API server's authorizer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// The authenticated user ("" when authentication failed).
    pub user: String,
    pub groups: Vec<String>,
    /// get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: String,
    pub api_group: String,
    /// The resource ("" for a non-resource URL such as /openid/v1/jwks).
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// The URL path (what RBAC's nonResourceURLs match).
    pub path: String,
    /// The HTTP status answered (200 for a watch that started).
    pub code: u16,
    /// The client's address (the audit log's `sourceIPs`): which replica,
    /// when each connects from its own loopback address.
    pub source: Option<std::net::IpAddr>,
    /// When the answer was decided (the audit log's `stageTimestamp`).
    pub at: std::time::Instant,
    /// The name of the object a successful create made (the URL names
    /// none; the audit log's `objectRef` takes it from the object).
    pub created: String,
}

impl RequestRecord {
    /// `pods`, `serviceaccounts/token`; the path for non-resource URLs.
    pub fn resource_path(&self) -> String {
        if self.resource.is_empty() {
            self.path.clone()
        } else if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

/// A failure to inject: the next `remaining` requests of (verb, resource).
#[derive(Clone, Debug)]
pub struct Fault {
    pub verb: String,
    pub resource: String,
    pub code: u16,
    pub remaining: usize,
}

/// The address a request's connection came from (a request extension).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub std::net::SocketAddr);

/// Everything the server and the test's handle share.
pub struct Shared {
    pub store: Mutex<Store>,
    pub issuer: RwLock<Issuer>,
    pub token_cache: Mutex<TokenCache>,
    pub admin_token: String,
    pub static_users: Mutex<HashMap<String, UserInfo>>,
    pub log: Mutex<Vec<RequestRecord>>,
    pub faults: Mutex<Vec<Fault>>,
    pub down: AtomicBool,
    /// Bumped to drop every open connection.
    pub kill: tokio::sync::watch::Sender<u64>,
    /// Bumped to end every open watch cleanly.
    pub watch_epoch: tokio::sync::watch::Sender<u64>,
    pub open_watches: AtomicUsize,
    pub reviews_in_flight: AtomicUsize,
    pub max_reviews_in_flight: AtomicUsize,
    pub review_latency: Mutex<Duration>,
    pub bookmark_interval: Mutex<Duration>,
    /// The seeding helper's pods, (Pending, Running), once created fully.
    pub pod_templates: Mutex<[Option<Value>; 2]>,
    pub jwks_uri: String,
    /// The certificates.k8s.io versions served.
    pub cert_versions: super::certificates::CertVersions,
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn json_response(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::OK))
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, private")
        .body(Full::new(Bytes::from(v.to_string())).boxed_unsync())
        .expect("response")
}

pub fn text_response(code: u16, text: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::OK))
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(text.to_string())).boxed_unsync())
        .expect("response")
}

pub fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.code, &e.to_status());
    if let Some(s) = e.retry_after {
        r.headers_mut().insert("retry-after", s.into());
    }
    r
}

/// Parsed query parameters (form-encoded, last value wins).
#[derive(Clone, Debug, Default)]
pub struct Query(pub HashMap<String, String>);

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Query {
    pub fn parse(q: Option<&str>) -> Self {
        let mut m = HashMap::new();
        for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            m.insert(percent_decode(k), percent_decode(v));
        }
        Self(m)
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    pub fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1" | "True" | "TRUE"))
    }
}

/// RequestInfoFactory: what a URL and method mean.
#[derive(Clone, Debug, Default)]
pub struct ReqInfo {
    pub is_resource: bool,
    pub verb: String,
    pub api_prefix: String,
    pub api_group: String,
    pub api_version: String,
    pub namespace: String,
    pub resource: String,
    pub subresource: String,
    pub name: String,
    pub path: String,
    /// The client's address, from the connection.
    pub source: Option<std::net::IpAddr>,
    /// The name of the object a create made.
    pub created: String,
}

pub fn request_info(method: &http::Method, path: &str, q: &Query) -> ReqInfo {
    let mut info = ReqInfo {
        path: path.to_string(),
        verb: method.as_str().to_ascii_lowercase(),
        ..Default::default()
    };
    let mut parts: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    let prefix = parts.first().copied().unwrap_or("");
    if prefix != "api" && prefix != "apis" {
        return info;
    }
    info.api_prefix = prefix.to_string();
    parts.remove(0);
    if prefix == "apis" {
        if parts.len() < 2 {
            return info;
        }
        info.api_group = parts.remove(0).to_string();
    }
    if parts.is_empty() {
        return info;
    }
    info.api_version = parts.remove(0).to_string();
    if parts.is_empty() {
        return info;
    }
    info.is_resource = true;
    let mut legacy_watch = false;
    if parts[0] == "watch" {
        legacy_watch = true;
        parts.remove(0);
    }
    if parts.first() == Some(&"namespaces") && parts.len() >= 2 {
        info.namespace = parts[1].to_string();
        if parts.len() > 2 && !matches!(parts[2], "status" | "finalize") {
            parts.drain(..2);
        }
    }
    info.resource = parts.first().copied().unwrap_or("").to_string();
    info.name = parts.get(1).copied().unwrap_or("").to_string();
    info.subresource = parts.get(2).copied().unwrap_or("").to_string();
    info.verb = match method.as_str() {
        "GET" | "HEAD" => {
            if legacy_watch || q.flag("watch") {
                "watch".into()
            } else if info.name.is_empty() {
                "list".into()
            } else {
                "get".into()
            }
        }
        "POST" => "create".into(),
        "PUT" => "update".into(),
        "PATCH" => "patch".into(),
        "DELETE" => {
            if info.name.is_empty() {
                "deletecollection".into()
            } else {
                "delete".into()
            }
        }
        other => other.to_ascii_lowercase(),
    };
    // RequestInfoFactory: a list or watch whose field selector requires
    // metadata.name is authorized as a request for that name.
    if matches!(info.verb.as_str(), "list" | "watch")
        && info.name.is_empty()
        && let Some(name) = q.get("fieldSelector").and_then(|sel| {
            sel.split(',').find_map(|term| {
                let term = term.trim();
                term.strip_prefix("metadata.name==")
                    .or_else(|| term.strip_prefix("metadata.name="))
                    .filter(|n| !n.is_empty() && !n.contains('/') && *n != "." && *n != "..")
            })
        })
    {
        info.name = name.to_string();
    }
    info
}

pub fn admin() -> UserInfo {
    UserInfo {
        username: "kubernetes-admin".into(),
        uid: String::new(),
        groups: vec!["system:masters".into(), "system:authenticated".into()],
        extra: Default::default(),
    }
}

/// Authenticates a bearer token as the API server would.
pub fn authenticate(shared: &Shared, token: &str) -> Option<UserInfo> {
    if token == shared.admin_token {
        return Some(admin());
    }
    if let Some(u) = lock(&shared.static_users).get(token) {
        return Some(u.clone());
    }
    if let Some((u, _)) = lock(&shared.token_cache).get(token, &[]) {
        return Some(u);
    }
    let issuer = shared
        .issuer
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let store = lock(&shared.store);
    let (user, auds) =
        authn::authenticate(&store, &issuer, token, &[], timefmt::now_secs()).ok()?;
    lock(&shared.token_cache).put(token, &[], &user, &auds);
    Some(user)
}

/// Serves connections until `shutdown` fires.
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut shutdown => return,
        };
        let Ok((tcp, peer)) = accepted else {
            continue;
        };
        if shared.down.load(Ordering::SeqCst) {
            drop(tcp);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        let mut kill = shared.kill.subscribe();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc_shared = shared.clone();
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let shared = svc_shared.clone();
                req.extensions_mut().insert(Peer(peer));
                // In a task of its own, as the real API server does: a
                // write it has begun is finished (and logged) even when the
                // client goes away (a killed replica) mid-request.
                let handled = tokio::spawn(super::handlers::handle(shared, req));
                async move {
                    Ok::<_, Infallible>(handled.await.unwrap_or_else(|e| {
                        error_response(&ApiError::new(
                            500,
                            "InternalError",
                            format!("the handler failed: {e}"),
                        ))
                    }))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(tls), svc);
            tokio::select! {
                _ = conn => {}
                _ = kill.changed() => {}
            }
        });
    }
}

/// Logs a request.
pub fn record(shared: &Shared, user: Option<&UserInfo>, info: &ReqInfo, code: u16) {
    let r = RequestRecord {
        user: user.map(|u| u.username.clone()).unwrap_or_default(),
        groups: user.map(|u| u.groups.clone()).unwrap_or_default(),
        verb: info.verb.clone(),
        api_group: info.api_group.clone(),
        resource: if info.is_resource {
            info.resource.clone()
        } else {
            String::new()
        },
        subresource: info.subresource.clone(),
        namespace: info.namespace.clone(),
        name: info.name.clone(),
        path: info.path.clone(),
        code,
        source: info.source,
        at: std::time::Instant::now(),
        created: info.created.clone(),
    };
    lock(&shared.log).push(r);
}

/// The injected failure for this request, if any.
pub fn take_fault(shared: &Shared, info: &ReqInfo) -> Option<ApiError> {
    let rp = if info.subresource.is_empty() {
        info.resource.clone()
    } else {
        format!("{}/{}", info.resource, info.subresource)
    };
    let what = if info.is_resource {
        rp
    } else {
        info.path.clone()
    };
    let mut faults = lock(&shared.faults);
    let f = faults.iter_mut().find(|f| {
        f.remaining > 0 && f.verb == info.verb && (f.resource == what || f.resource == "*")
    })?;
    f.remaining -= 1;
    let code = f.code;
    faults.retain(|f| f.remaining > 0);
    Some(ApiError::injected(code))
}

/// Reads a whole request body (3 MiB, as the API server's limit).
pub async fn read_body(body: Incoming) -> Result<Bytes, ApiError> {
    let bytes = body
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?
        .to_bytes();
    if bytes.len() > 3 * 1024 * 1024 {
        return Err(ApiError::new(
            413,
            "RequestEntityTooLarge",
            "Request entity too large: limit is 3145728",
        ));
    }
    Ok(bytes)
}

pub fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the object provided is unrecognized: {e}")))
}
