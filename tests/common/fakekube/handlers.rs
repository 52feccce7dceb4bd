//! Routing and the REST verbs: get, list, create, update, patch, delete
//! on the served resources, the `status` and `token` subresources,
//! TokenReview, and the non-resource URLs (issuer discovery, version,
//! health, API discovery).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use http::Request;
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::apply::validate_patch_options;
use super::authn;
use super::certificates;
use super::gc::DeleteOptions;
use super::http::{
    Body, Peer, Query, ReqInfo, Shared, authenticate, error_response, json_response, lock,
    parse_json, read_body, record, request_info, take_fault, text_response,
};
use super::resources::{ALL, ApiError, FieldError, Res};
use super::selectors::{FieldSelector, LabelSelector};
use super::store::{ListAt, Obj};
use super::timefmt;

fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// One request, end to end.
pub async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> http::Response<Body> {
    if shared.down.load(Ordering::SeqCst) {
        let mut r = error_response(&ApiError::injected(503));
        r.headers_mut()
            .insert("connection", "close".parse().expect("header"));
        return r;
    }
    let (parts, body) = req.into_parts();
    let q = Query::parse(parts.uri.query());
    let mut info = request_info(&parts.method, parts.uri.path(), &q);
    info.source = parts.extensions.get::<Peer>().map(|p| p.0.ip());
    let Some(user) = bearer(&parts.headers).and_then(|t| authenticate(&shared, t)) else {
        record(&shared, None, &info, 401);
        return error_response(&ApiError::unauthorized());
    };
    if let Some(e) = take_fault(&shared, &info) {
        record(&shared, Some(&user), &info, e.code);
        return error_response(&e);
    }
    let manager = q.get("fieldManager").map(String::from).unwrap_or_else(|| {
        parts
            .headers
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|ua| {
                ua.split('/')
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(128)
                    .collect()
            })
            .unwrap_or_default()
    });
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|c| c.split(';').next().unwrap_or("").trim().to_string())
        .unwrap_or_default();
    if !content_type.is_empty() && !content_type.contains("json") && !content_type.contains("yaml")
    {
        // The fake speaks JSON only (no protobuf, no CBOR).
        let e = ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {content_type})"
            ),
        );
        record(&shared, Some(&user), &info, 415);
        return error_response(&e);
    }
    let resp = if info.is_resource {
        match resource_request(&shared, &info, &q, &manager, &content_type, body).await {
            Ok(r) => r,
            Err(e) => error_response(&e),
        }
    } else {
        non_resource(&shared, &info, &parts.method)
    };
    if let Some(Created(n)) = resp.extensions().get::<Created>() {
        info.created = n.clone();
    }
    record(&shared, Some(&user), &info, resp.status().as_u16());
    resp
}

/// The name of the object a create made (the URL names none), for the log.
#[derive(Clone, Debug)]
struct Created(String);

fn non_resource(shared: &Shared, info: &ReqInfo, method: &http::Method) -> http::Response<Body> {
    if method != http::Method::GET {
        return text_response(405, "405: Method Not Allowed");
    }
    let issuer = shared
        .issuer
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match info.path.as_str() {
        "/openid/v1/jwks" => {
            let mut r = json_response(200, &issuer.jwks());
            r.headers_mut().insert(
                "content-type",
                "application/jwk-set+json".parse().expect("header"),
            );
            r
        }
        "/.well-known/openid-configuration" => {
            json_response(200, &issuer.discovery(&shared.jwks_uri))
        }
        "/version" => json_response(
            200,
            &json!({
                "major": "1", "minor": "37", "emulationMajor": "1", "emulationMinor": "37",
                "gitVersion": "v1.37.0-fakekube", "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.25",
                "compiler": "gc", "platform": "linux/amd64"
            }),
        ),
        "/healthz" | "/livez" | "/readyz" => text_response(200, "ok"),
        "/api" => json_response(
            200,
            &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
        ),
        "/apis" => json_response(200, &{
            let mut groups = vec![
                json!({"name": "coordination.k8s.io", "versions": [{"groupVersion": "coordination.k8s.io/v1", "version": "v1"}],
                     "preferredVersion": {"groupVersion": "coordination.k8s.io/v1", "version": "v1"}}),
                json!({"name": "authentication.k8s.io", "versions": [{"groupVersion": "authentication.k8s.io/v1", "version": "v1"}],
                     "preferredVersion": {"groupVersion": "authentication.k8s.io/v1", "version": "v1"}}),
            ];
            if let Some(mut g) = certificates::api_group(shared.cert_versions) {
                if let Some(m) = g.as_object_mut() {
                    m.remove("kind");
                    m.remove("apiVersion");
                }
                groups.push(g);
            }
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        }),
        "/apis/certificates.k8s.io" => match certificates::api_group(shared.cert_versions) {
            Some(g) => json_response(200, &g),
            None => text_response(404, "404 page not found\n"),
        },
        path if path.starts_with("/apis/certificates.k8s.io/") => {
            let version = path.trim_start_matches("/apis/certificates.k8s.io/");
            match certificates::resources(shared.cert_versions, version) {
                Some(v) => json_response(200, &v),
                None => text_response(404, "404 page not found\n"),
            }
        }
        path => match discovery(path) {
            Some(v) => json_response(200, &v),
            None => text_response(404, "404 page not found\n"),
        },
    }
}

/// APIResourceList for /api/v1 and /apis/<group>/<version>.
fn discovery(path: &str) -> Option<Value> {
    let gv = path
        .strip_prefix("/api/")
        .or_else(|| path.strip_prefix("/apis/"))?;
    let verbs = json!([
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch"
    ]);
    let mut resources: Vec<Value> = Vec::new();
    for r in ALL {
        if r.api_version() != gv {
            continue;
        }
        let i = r.info();
        resources.push(json!({"name": i.plural, "singularName": i.kind.to_lowercase(), "namespaced": i.namespaced, "kind": i.kind, "verbs": verbs}));
        if i.status_subresource {
            resources.push(json!({"name": format!("{}/status", i.plural), "singularName": "", "namespaced": i.namespaced, "kind": i.kind, "verbs": ["get", "patch", "update"]}));
        }
        if r == Res::ServiceAccounts {
            resources.push(json!({"name": "serviceaccounts/token", "singularName": "", "namespaced": true, "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest", "verbs": ["create"]}));
        }
    }
    if gv == "authentication.k8s.io/v1" {
        resources.push(json!({"name": "tokenreviews", "singularName": "tokenreview", "namespaced": false, "kind": "TokenReview", "verbs": ["create"]}));
    }
    (!resources.is_empty()).then(|| json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}))
}

fn manager_or_empty(m: &str) -> &str {
    m
}

async fn resource_request(
    shared: &Arc<Shared>,
    info: &ReqInfo,
    q: &Query,
    manager: &str,
    content_type: &str,
    body: Incoming,
) -> Result<http::Response<Body>, ApiError> {
    if q.get("dryRun").is_some_and(|d| !d.is_empty()) {
        return Err(ApiError::bad_request(
            "dryRun is not supported by the fake API server",
        ));
    }
    if info.api_group == "authentication.k8s.io"
        && info.api_version == "v1"
        && info.resource == "tokenreviews"
    {
        if info.verb != "create" || !info.name.is_empty() || !info.namespace.is_empty() {
            return Err(ApiError::method_not_allowed(&info.verb, "TokenReview"));
        }
        let body = parse_json(&read_body(body).await?)?;
        return token_review(shared, &body).await;
    }
    let res = if info.api_group == certificates::GROUP {
        certificates::resolve(shared.cert_versions, &info.api_version, &info.resource)
    } else {
        Res::from_plural(&info.api_group, &info.api_version, &info.resource)
    }
    .ok_or_else(ApiError::not_found_path)?;
    // What this version shows of a stored object.
    let version = info.api_version.as_str();
    let out = |o: &Value| certificates::view(res, version, o);
    let ns = info.namespace.as_str();
    let namespace_request = res == Res::Namespaces;
    if !res.namespaced() && !ns.is_empty() && !namespace_request {
        return Err(ApiError::not_found_path());
    }
    let sub = info.subresource.as_str();
    let sub = match (res, sub) {
        (_, "") => None,
        (Res::Pods | Res::Nodes | Res::Namespaces | Res::PodCertificateRequests, "status") => {
            Some("status")
        }
        (Res::ServiceAccounts, "token") => Some("token"),
        _ => return Err(ApiError::not_found_path()),
    };
    if res.namespaced() && ns.is_empty() && !matches!(info.verb.as_str(), "list" | "watch") {
        return Err(ApiError::not_found_path());
    }
    let name = info.name.as_str();
    match info.verb.as_str() {
        "get" => {
            let store = lock(&shared.store);
            let obj = store
                .get(res, ns, name)
                .ok_or_else(|| ApiError::not_found(res, name))?;
            Ok(json_response(200, &out(&obj)))
        }
        "list" => list(shared, res, version, ns, q),
        "watch" => super::watch::serve(shared.clone(), res, version, ns, name, q),
        "create" => {
            let body = parse_json(&read_body(body).await?)?;
            if sub == Some("token") {
                let store = lock(&shared.store);
                let issuer = shared
                    .issuer
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let out = authn::token_request(&store, &issuer, ns, name, &body)?;
                return Ok(json_response(201, &out));
            }
            if !name.is_empty() {
                return Err(ApiError::method_not_allowed("create", res.kind()));
            }
            let mut body = body;
            certificates::intake(res, version, &mut body, None);
            let obj = lock(&shared.store).create(res, ns, body, manager_or_empty(manager))?;
            let mut r = json_response(201, &out(&obj));
            if let Some(n) = obj["metadata"]["name"].as_str() {
                r.extensions_mut().insert(Created(n.to_string()));
            }
            Ok(r)
        }
        "update" => {
            let mut body = parse_json(&read_body(body).await?)?;
            let mut store = lock(&shared.store);
            let old = store.get(res, ns, name);
            certificates::intake(res, version, &mut body, old.as_deref());
            let (obj, created) = store.update(res, ns, name, body, manager, sub)?;
            Ok(json_response(if created { 201 } else { 200 }, &out(&obj)))
        }
        "patch" => {
            let bytes = read_body(body).await?;
            patch(
                shared,
                (res, version),
                ns,
                name,
                sub,
                q,
                manager,
                content_type,
                &bytes,
            )
        }
        "delete" => {
            let bytes = read_body(body).await?;
            let body = parse_json(&bytes)?;
            let opts = DeleteOptions::parse(&body, q.get("propagationPolicy"))?;
            let deleted = lock(&shared.store).delete(res, ns, name, &opts)?;
            Ok(json_response(200, &out(&deleted.body)))
        }
        verb => Err(ApiError::method_not_allowed(verb, res.kind())),
    }
}

#[allow(clippy::too_many_arguments)]
fn patch(
    shared: &Shared,
    (res, version): (Res, &str),
    ns: &str,
    name: &str,
    sub: Option<&str>,
    q: &Query,
    manager: &str,
    content_type: &str,
    bytes: &[u8],
) -> Result<http::Response<Body>, ApiError> {
    let apply = content_type == "application/apply-patch+yaml";
    validate_patch_options(apply, q.get("fieldManager"), q.get("force"))?;
    let mut body: Value = serde_json::from_slice(bytes).map_err(|e| {
        if apply {
            ApiError::bad_request(format!(
                "error decoding YAML: the fake API server accepts JSON apply bodies only: {e}"
            ))
        } else {
            ApiError::bad_request(format!("error decoding patch: {e}"))
        }
    })?;
    let mut store = lock(&shared.store);
    match content_type {
        "application/apply-patch+yaml" => {
            if sub.is_some() {
                return Err(ApiError::bad_request(
                    "the fake API server does not apply to subresources",
                ));
            }
            let old = store.get(res, ns, name);
            certificates::intake(res, version, &mut body, old.as_deref());
            let (obj, created) = store.apply(res, ns, name, body, manager, q.flag("force"))?;
            Ok(json_response(
                if created { 201 } else { 200 },
                &certificates::view(res, version, &obj),
            ))
        }
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            let strategic = content_type.starts_with("application/strategic");
            let obj = store.patch_merge(res, ns, name, &body, strategic, manager, sub)?;
            Ok(json_response(200, &certificates::view(res, version, &obj)))
        }
        "application/json-patch+json" => {
            let old = store
                .get(res, ns, name)
                .ok_or_else(|| ApiError::not_found(res, name))?;
            let mut doc = (*old).clone();
            super::patch::json_patch(&mut doc, &body)?;
            if body.as_array().is_some_and(|ops| {
                !ops.iter().any(|o| {
                    o.get("path").and_then(Value::as_str) == Some("/metadata/resourceVersion")
                })
            }) {
                doc["metadata"]["resourceVersion"] = json!("");
            }
            if old.pointer("/metadata/managedFields") == doc.pointer("/metadata/managedFields")
                && let Some(m) = doc["metadata"].as_object_mut()
            {
                m.remove("managedFields");
            }
            let (obj, _) = store.update(res, ns, name, doc, manager, sub)?;
            Ok(json_response(200, &certificates::view(res, version, &obj)))
        }
        _ => Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {content_type:?})"
            ),
        )),
    }
}

/// Parses a continue token: `(resourceVersion, after (namespace, name))`.
fn parse_continue(token: &str) -> Result<(u64, (String, String)), ApiError> {
    let bad = |why: &str| ApiError::bad_request(format!("continue key is not valid: {why}"));
    let raw = B64URL
        .decode(token.trim_end_matches('='))
        .map_err(|_| bad("incorrect encoded start resourceVersion (version meta.k8s.io/v1)"))?;
    let v: Value = serde_json::from_slice(&raw)
        .map_err(|_| bad("incorrect encoded start resourceVersion (version meta.k8s.io/v1)"))?;
    if v.get("v").and_then(Value::as_str) != Some("meta.k8s.io/v1") {
        return Err(bad("server does not recognize this encoded version"));
    }
    let rv = v
        .get("rv")
        .and_then(Value::as_u64)
        .filter(|r| *r > 0)
        .ok_or_else(|| bad("incorrect encoded start resourceVersion (version meta.k8s.io/v1)"))?;
    let start = v
        .get("start")
        .and_then(Value::as_str)
        .unwrap_or("")
        .trim_end_matches('\u{0}');
    let (ns, name) = start
        .split_once('/')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap_or((String::new(), start.to_string()));
    Ok((rv, (ns, name)))
}

fn make_continue(rv: u64, ns: &str, name: &str) -> String {
    let start = if ns.is_empty() {
        format!("{name}\u{0}")
    } else {
        format!("{ns}/{name}\u{0}")
    };
    B64URL.encode(json!({"v": "meta.k8s.io/v1", "rv": rv, "start": start}).to_string())
}

fn list_options_invalid(errs: &[FieldError]) -> ApiError {
    ApiError::invalid_kind(
        "ListOptions.meta.k8s.io",
        "meta.k8s.io",
        "ListOptions",
        "",
        errs,
    )
}

fn list(
    shared: &Shared,
    res: Res,
    version: &str,
    ns: &str,
    q: &Query,
) -> Result<http::Response<Body>, ApiError> {
    let labels = LabelSelector::parse(q.get("labelSelector").unwrap_or(""))?;
    let fields = FieldSelector::parse(res, q.get("fieldSelector").unwrap_or(""))?;
    let rv = q.get("resourceVersion").unwrap_or("");
    let rv_match = q.get("resourceVersionMatch").unwrap_or("");
    if q.get("sendInitialEvents").is_some() {
        return Err(list_options_invalid(&[FieldError::forbidden(
            "sendInitialEvents",
            "sendInitialEvents is forbidden for list",
        )]));
    }
    if !rv_match.is_empty() && rv.is_empty() {
        return Err(list_options_invalid(&[FieldError::forbidden(
            "resourceVersionMatch",
            "resourceVersionMatch is forbidden unless resourceVersion is provided",
        )]));
    }
    let limit = match q.get("limit") {
        Some(l) if !l.is_empty() => l.parse::<i64>().ok().filter(|l| *l > 0).map(|l| l as usize),
        _ => None,
    };
    let cont = q.get("continue").filter(|c| !c.is_empty());
    let (at, after) = if let Some(c) = cont {
        if !rv.is_empty() && rv != "0" {
            return Err(ApiError::bad_request(
                "specifying resource version is not allowed when using continue",
            ));
        }
        let (rv, after) = parse_continue(c)?;
        (ListAt::Exact(rv), Some(after))
    } else {
        let parsed =
            if rv.is_empty() || rv == "0" {
                None
            } else {
                Some(rv.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!("invalid resource version: {rv}"))
                })?)
            };
        match (rv_match, parsed) {
            ("Exact", None) => {
                return Err(list_options_invalid(&[FieldError::forbidden(
                    "resourceVersionMatch",
                    "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                )]));
            }
            ("Exact", Some(n)) => (ListAt::Exact(n), None),
            ("" | "NotOlderThan", Some(n)) => {
                let current = lock(&shared.store).rv;
                if n > current {
                    return Err(super::store::too_large(n, current));
                }
                (ListAt::Latest, None)
            }
            ("" | "NotOlderThan", None) => (ListAt::Latest, None),
            (other, _) => {
                return Err(list_options_invalid(&[FieldError::invalid(
                    "resourceVersionMatch",
                    other,
                    "supported values: \"Exact\", \"NotOlderThan\"",
                )]));
            }
        }
    };
    let store = lock(&shared.store);
    let page = store.list(res, Some(ns), &labels, &fields, at, after, limit).map_err(|e| {
        if cont.is_some() && e.code == 410 {
            ApiError::expired("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.")
        } else {
            e
        }
    })?;
    drop(store);
    let mut meta = json!({"resourceVersion": page.rv.to_string()});
    if let Some((cns, cname)) = &page.continue_from {
        meta["continue"] = json!(make_continue(page.rv, cns, cname));
    }
    if let Some(r) = page.remaining {
        meta["remainingItemCount"] = json!(r);
    }
    let mut body = list_body(res, meta, &page.items);
    if certificates::is_cert(res) {
        body["apiVersion"] = json!(format!("{}/{version}", certificates::GROUP));
        if let Some(items) = body["items"].as_array_mut() {
            for i in items.iter_mut() {
                *i = certificates::view(res, version, i);
            }
        }
    }
    Ok(json_response(200, &body))
}

/// A list body; items without apiVersion/kind, as the real server sends them.
pub fn list_body(res: Res, meta: Value, items: &[Obj]) -> Value {
    let items: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut v = (**o).clone();
            if let Some(m) = v.as_object_mut() {
                m.remove("apiVersion");
                m.remove("kind");
            }
            v
        })
        .collect();
    json!({
        "kind": format!("{}List", res.kind()),
        "apiVersion": res.api_version(),
        "metadata": meta,
        "items": items,
    })
}

struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.reviews_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn token_review(
    shared: &Arc<Shared>,
    body: &Value,
) -> Result<http::Response<Body>, ApiError> {
    let now = shared.reviews_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    let _guard = InFlight(shared);
    shared
        .max_reviews_in_flight
        .fetch_max(now, Ordering::SeqCst);
    let latency = *lock(&shared.review_latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if body
        .get("kind")
        .and_then(Value::as_str)
        .is_some_and(|k| k != "TokenReview")
    {
        return Err(ApiError::bad_request(
            "the object provided is unrecognized (must be of type TokenReview)",
        ));
    }
    let (token, auds) = authn::parse_review(body)?;
    let cached = lock(&shared.token_cache).get(&token, &auds);
    let result = match cached {
        Some(hit) => Ok(hit),
        None => {
            let issuer = shared
                .issuer
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let store = lock(&shared.store);
            let r = authn::authenticate(&store, &issuer, &token, &auds, timefmt::now_secs());
            if let Ok((u, a)) = &r {
                lock(&shared.token_cache).put(&token, &auds, u, a);
            }
            r
        }
    };
    let result = match result {
        Err(authn::Refused::Unhandled) => match lock(&shared.static_users).get(&token) {
            Some(u) => Ok((u.clone(), auds.clone())),
            None if token == shared.admin_token => Ok((super::http::admin(), auds.clone())),
            None => result,
        },
        other => other,
    };
    Ok(json_response(201, &authn::review_response(body, result)))
}
