//! `certificates.k8s.io` in the fake: PodCertificateRequests (namespaced,
//! with a `status` subresource) and ClusterTrustBundles (cluster-scoped),
//! each served as `v1` and `v1beta1` from one storage, as the real API
//! server's conversion does: objects are stored in a superset form
//! (apiVersion `certificates.k8s.io/v1`, plus the deprecated v1beta1-only
//! `spec.pkixPublicKey` / `spec.proofOfPossession`), and each version sees
//! its own view ([`view`]): v1 never shows the legacy key fields.
//!
//! Which versions are served is a [`CertVersions`] setting, reflected in
//! discovery (`/apis`, `/apis/certificates.k8s.io`, `/apis/certificates.k8s.io/<v>`).
//!
//! Validation follows pkg/apis/certificates/validation (Kubernetes 1.36+:
//! `stubPKCS10Request` replaces the legacy pair) and the registry
//! strategies (pkg/registry/certificates/...): status cleared on create,
//! `maxExpirationSeconds` defaulted to 86400, spec immutable, status written
//! only through `/status` and immutable once Issued, Denied or Failed.

use serde_json::{Value, json};

use super::certcrypto::{self, KeyClass};
use super::resources::{ApiError, FieldError, Res, is_dns_label, is_dns_subdomain};
use super::timefmt;

pub const GROUP: &str = "certificates.k8s.io";
const STORAGE: &str = "certificates.k8s.io/v1";

/// `certificates.MinMaxExpirationSeconds` and friends.
const MIN_MAX_EXPIRATION: i64 = 3600;
const KUBERNETES_MAX_MAX_EXPIRATION: i64 = 86400;
const MAX_MAX_EXPIRATION: i64 = 7_862_400;
const MAX_KEY_MATERIAL: usize = 10 * 1024;
const MAX_CHAIN: usize = 100 * 1024;
const MAX_USER_ANNOTATIONS: usize = 256 * 1024;

/// Which versions of certificates.k8s.io the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CertVersions {
    pub v1: bool,
    pub v1beta1: bool,
}

impl CertVersions {
    pub const BOTH: Self = Self {
        v1: true,
        v1beta1: true,
    };
    pub const V1_ONLY: Self = Self {
        v1: true,
        v1beta1: false,
    };
    pub const V1BETA1_ONLY: Self = Self {
        v1: false,
        v1beta1: true,
    };

    pub fn served(self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.v1 {
            v.push("v1");
        }
        if self.v1beta1 {
            v.push("v1beta1");
        }
        v
    }
}

impl Default for CertVersions {
    fn default() -> Self {
        Self::BOTH
    }
}

pub fn is_cert(res: Res) -> bool {
    matches!(res, Res::PodCertificateRequests | Res::ClusterTrustBundles)
}

/// The resource a certificates.k8s.io URL names, if its version is served.
pub fn resolve(versions: CertVersions, version: &str, plural: &str) -> Option<Res> {
    if !versions.served().contains(&version) {
        return None;
    }
    match plural {
        "podcertificaterequests" => Some(Res::PodCertificateRequests),
        "clustertrustbundles" => Some(Res::ClusterTrustBundles),
        _ => None,
    }
}

/// What a body sent to `version` becomes in storage: the storage
/// apiVersion; through v1, the v1beta1-only fields are unknown and dropped
/// (the default `fieldValidation=Warn`), except that an update keeps the
/// stored ones (`old`).
pub fn intake(res: Res, version: &str, body: &mut Value, old: Option<&Value>) {
    if !is_cert(res) || !body.is_object() {
        return;
    }
    if body.get("apiVersion").and_then(Value::as_str) == Some(&format!("{GROUP}/{version}")) {
        body["apiVersion"] = json!(STORAGE);
    }
    if res == Res::PodCertificateRequests
        && version == "v1"
        && let Some(spec) = body.get_mut("spec").and_then(Value::as_object_mut)
    {
        for f in ["pkixPublicKey", "proofOfPossession"] {
            spec.remove(f);
            if let Some(v) = old.and_then(|o| o.pointer(&format!("/spec/{f}"))) {
                spec.insert(f.into(), v.clone());
            }
        }
    }
}

/// An object as `version` shows it.
pub fn view(res: Res, version: &str, obj: &Value) -> Value {
    let mut v = obj.clone();
    if !is_cert(res) || !v.is_object() {
        return v;
    }
    if v.get("apiVersion").is_some() {
        v["apiVersion"] = json!(format!("{GROUP}/{version}"));
    }
    if res == Res::PodCertificateRequests
        && version == "v1"
        && let Some(spec) = v.get_mut("spec").and_then(Value::as_object_mut)
    {
        spec.remove("pkixPublicKey");
        spec.remove("proofOfPossession");
    }
    v
}

/// The APIGroup document of certificates.k8s.io, when any version is served.
pub fn api_group(versions: CertVersions) -> Option<Value> {
    let served = versions.served();
    let preferred = *served.first()?;
    let gv = |v: &str| json!({"groupVersion": format!("{GROUP}/{v}"), "version": v});
    Some(json!({
        "kind": "APIGroup", "apiVersion": "v1", "name": GROUP,
        "versions": served.iter().map(|v| gv(v)).collect::<Vec<_>>(),
        "preferredVersion": gv(preferred),
    }))
}

/// The APIResourceList of `certificates.k8s.io/<version>`.
pub fn resources(versions: CertVersions, version: &str) -> Option<Value> {
    if !versions.served().contains(&version) {
        return None;
    }
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
    Some(json!({
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{GROUP}/{version}"),
        "resources": [
            {"name": "clustertrustbundles", "singularName": "clustertrustbundle", "namespaced": false, "kind": "ClusterTrustBundle", "verbs": verbs},
            {"name": "podcertificaterequests", "singularName": "podcertificaterequest", "namespaced": true, "kind": "PodCertificateRequest", "verbs": verbs},
            {"name": "podcertificaterequests/status", "singularName": "", "namespaced": true, "kind": "PodCertificateRequest", "verbs": ["get", "patch", "update"]},
        ],
    }))
}

// ---- shared rules ----

fn s<'a>(obj: &'a Value, ptr: &str) -> &'a str {
    obj.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

/// apivalidation.ValidateSignerName.
pub fn signer_name_errors(field: &str, signer: &str) -> Vec<FieldError> {
    if signer.is_empty() {
        return vec![FieldError::required(field, "")];
    }
    let segments: Vec<&str> = signer.split('/').collect();
    if segments.len() != 2 {
        return vec![FieldError::invalid(
            field,
            signer,
            "must be a fully qualified domain and path of the form 'example.com/signer-name'",
        )];
    }
    let mut errs = Vec::new();
    if segments[0].len() > 253 {
        errs.push(FieldError::too_long(field, 253));
    }
    let labels: Vec<&str> = segments[0].split('.').collect();
    if let Some(bad) = labels.iter().find(|l| !is_dns_label(l)) {
        errs.push(FieldError::invalid(
            field,
            segments[0],
            &format!("validating label {bad:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"),
        ));
    }
    if labels.len() < 2 {
        errs.push(FieldError::invalid(
            field,
            segments[0],
            "should be a domain with at least two segments separated by dots",
        ));
    }
    if let Some(bad) = segments[1].split('.').find(|l| !is_dns_subdomain(l)) {
        errs.push(FieldError::invalid(
            field,
            segments[1],
            &format!("validating label {bad:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"),
        ));
    }
    let max = 253 + 253 + 63 + 1 + 1;
    if signer.len() > max {
        errs.push(FieldError::too_long(field, max));
    }
    errs
}

pub fn immutable(field: &str, value: &Value) -> FieldError {
    FieldError::invalid_raw(field, value.to_string(), "field is immutable")
}

pub use super::trustbundles::{ctb_errors, ctb_update_errors};

// ---- PodCertificateRequest ----

fn key_errors(field: &str, spki: &[u8], value: &str) -> Result<KeyClass, Vec<FieldError>> {
    let Some(class) = certcrypto::classify(spki) else {
        return Err(vec![FieldError::invalid(
            field,
            value,
            "must be a valid PKIX-serialized public key",
        )]);
    };
    let err = |v: String, why: &str| Err(vec![FieldError::invalid(field, &v, why)]);
    match class {
        KeyClass::EcOther => err(
            "curve unknown".into(),
            "elliptic public keys must use curve P256 or P384",
        ),
        KeyClass::Rsa(b) if b != 3072 && b != 4096 => err(
            format!("{b}-bit modulus"),
            "RSA keys must have modulus size 3072 or 4096",
        ),
        KeyClass::Unknown => err(
            value.into(),
            "unknown public key type; supported types are Ed25519, ECDSA, and RSA",
        ),
        c => Ok(c),
    }
}

fn b64(obj: &Value, ptr: &str) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    let text = s(obj, ptr);
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| e.to_string())
}

/// The key a request is for: the stub CSR's, or the legacy pkixPublicKey.
pub fn requested_key(obj: &Value) -> Option<Vec<u8>> {
    let stub = b64(obj, "/spec/stubPKCS10Request").ok()?;
    if !stub.is_empty() {
        return certcrypto::stub_csr_key(&stub).ok();
    }
    b64(obj, "/spec/pkixPublicKey")
        .ok()
        .filter(|k| !k.is_empty())
}

fn uid_errors(obj: &Value, field: &str, errs: &mut Vec<FieldError>) {
    let v = s(obj, &format!("/spec/{field}"));
    let path = format!("spec.{field}");
    if v.is_empty() {
        errs.push(FieldError::invalid(&path, v, "must not be empty"));
    }
    if v.len() > 128 {
        errs.push(FieldError::too_long(&path, 128));
    }
}

/// User annotations: keys domain-prefixed (`example.com/key`) qualified
/// names, the whole field at most 256 KiB.
fn user_annotation_errors(anns: &serde_json::Map<String, Value>) -> Vec<FieldError> {
    const F: &str = "spec.unverifiedUserAnnotations";
    let mut errs = Vec::new();
    let mut total = 0;
    for (k, v) in anns {
        total += k.len() + v.as_str().map_or(0, str::len);
        let ok = k.split_once('/').is_some_and(|(p, n)| {
            is_dns_subdomain(p) && super::selectors::valid_label_key(n) && !n.contains('/')
        });
        if !ok {
            errs.push(FieldError::invalid(
                F,
                k,
                "must be a domain-prefixed key (such as \"acme.io/foo\")",
            ));
        }
    }
    if total > MAX_USER_ANNOTATIONS {
        errs.push(FieldError::too_long(F, MAX_USER_ANNOTATIONS));
    }
    errs
}

/// PrepareForCreate and defaulting.
pub fn pcr_prepare_create(obj: &mut Value) {
    if let Some(m) = obj.as_object_mut() {
        m.remove("status");
    }
    if obj
        .pointer("/spec/maxExpirationSeconds")
        .is_none_or(Value::is_null)
    {
        if !obj.get("spec").is_some_and(Value::is_object) {
            obj["spec"] = json!({});
        }
        obj["spec"]["maxExpirationSeconds"] = json!(KUBERNETES_MAX_MAX_EXPIRATION);
    }
}

/// ValidatePodCertificateRequestCreate.
pub fn pcr_create_errors(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let signer = s(obj, "/spec/signerName");
    errs.extend(signer_name_errors("spec.signerName", signer));
    if let Some(a) = obj
        .pointer("/spec/unverifiedUserAnnotations")
        .and_then(Value::as_object)
    {
        errs.extend(user_annotation_errors(a));
    }
    for (f, kind) in [
        ("podName", "pod"),
        ("serviceAccountName", "sa"),
        ("nodeName", "node"),
    ] {
        let v = s(obj, &format!("/spec/{f}"));
        if !is_dns_subdomain(v) {
            let _ = kind;
            errs.push(FieldError::invalid(&format!("spec.{f}"), v, "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"));
        }
    }
    for f in ["podUID", "serviceAccountUID", "nodeUID"] {
        uid_errors(obj, f, &mut errs);
    }
    let Some(max) = obj
        .pointer("/spec/maxExpirationSeconds")
        .and_then(Value::as_i64)
    else {
        errs.push(FieldError::required(
            "spec.maxExpirationSeconds",
            "must be set",
        ));
        return errs;
    };
    let ceiling = if signer.starts_with("kubernetes.io/") {
        KUBERNETES_MAX_MAX_EXPIRATION
    } else {
        MAX_MAX_EXPIRATION
    };
    if !(MIN_MAX_EXPIRATION..=ceiling).contains(&max) {
        errs.push(FieldError::invalid_raw(
            "spec.maxExpirationSeconds",
            max.to_string(),
            &format!("must be in the range [{MIN_MAX_EXPIRATION}, {ceiling}]"),
        ));
    }
    let decoded = |f: &str| b64(obj, &format!("/spec/{f}")).unwrap_or_default();
    let (stub, pkix, pop) = (
        decoded("stubPKCS10Request"),
        decoded("pkixPublicKey"),
        decoded("proofOfPossession"),
    );
    for (f, v) in [
        ("stubPKCS10Request", &stub),
        ("pkixPublicKey", &pkix),
        ("proofOfPossession", &pop),
    ] {
        if v.len() > MAX_KEY_MATERIAL {
            errs.push(FieldError::too_long(&format!("spec.{f}"), MAX_KEY_MATERIAL));
            return errs;
        }
    }
    if !stub.is_empty() {
        for (f, v) in [("pkixPublicKey", &pkix), ("proofOfPossession", &pop)] {
            if !v.is_empty() {
                errs.push(FieldError::forbidden(
                    &format!("spec.{f}"),
                    "must be empty when spec.stubPKCS10Request is set",
                ));
            }
        }
        match certcrypto::stub_csr_key(&stub) {
            Err(why) => errs.push(FieldError::invalid(
                "spec.stubPKCS10Request",
                "<omitted>",
                &why,
            )),
            Ok(spki) => {
                if let Err(e) = key_errors("spec.stubPKCS10Request", &spki, "<omitted>") {
                    errs.extend(e);
                }
            }
        }
        return errs;
    }
    if pkix.is_empty() {
        errs.push(FieldError::required(
            "spec.stubPKCS10Request",
            "must be set (or, deprecated, spec.pkixPublicKey and spec.proofOfPossession)",
        ));
        return errs;
    }
    let class = match key_errors("spec.pkixPublicKey", &pkix, "<omitted>") {
        Ok(c) => c,
        Err(e) => {
            errs.extend(e);
            return errs;
        }
    };
    if !certcrypto::verify_pop(&pkix, class, s(obj, "/spec/podUID"), &pop) {
        errs.push(FieldError {
            kind: super::resources::FieldErrorKind::Invalid,
            field: "spec.proofOfPossession".into(),
            value: None,
            detail: "could not verify proof-of-possession signature".into(),
        });
    }
    errs
}

/// ValidatePodCertificateRequestUpdate: every spec field is immutable.
pub fn pcr_update_errors(old: &Value, new: &Value) -> Vec<FieldError> {
    if old.get("spec") != new.get("spec") {
        return vec![immutable("spec", &new["spec"])];
    }
    Vec::new()
}

fn omitted(field: &str, why: &str) -> FieldError {
    FieldError {
        kind: super::resources::FieldErrorKind::Invalid,
        field: field.into(),
        value: None,
        detail: why.into(),
    }
}

const TERMINAL: [&str; 3] = ["Issued", "Denied", "Failed"];

fn terminal(obj: &Value) -> Option<&str> {
    obj.pointer("/status/conditions")
        .and_then(Value::as_array)?
        .iter()
        .find(|c| {
            c.get("status").and_then(Value::as_str) == Some("True")
                && c.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| TERMINAL.contains(&t))
        })
        .and_then(|c| c.get("type")?.as_str())
}

fn valid_reason(r: &str) -> bool {
    let b = r.as_bytes();
    !b.is_empty()
        && b.len() <= 1024
        && b[0].is_ascii_alphabetic()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b',' | b':'))
        && b[b.len() - 1] != b','
        && b[b.len() - 1] != b':'
}

/// metav1validation.ValidateConditions and the known-condition rules.
fn condition_errors(conds: &[Value]) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let mut known = 0;
    for (i, c) in conds.iter().enumerate() {
        let p = |f: &str| format!("status.conditions[{i}].{f}");
        let ty = s(c, "/type");
        let status = s(c, "/status");
        if TERMINAL.contains(&ty) {
            known += 1;
            if known > 1 {
                errs.push(FieldError::invalid(&p("type"), ty, "There may be at most one condition with type \"Issued\", \"Denied\", or \"Failed\""));
            }
            if status != "True" {
                errs.push(FieldError::invalid_raw(
                    &p("status"),
                    format!("{status:?}"),
                    "supported values: \"True\"",
                ));
            }
        } else {
            errs.push(FieldError::invalid_raw(
                &p("type"),
                format!("{ty:?}"),
                "supported values: \"Issued\", \"Denied\", \"Failed\"",
            ));
        }
        if !matches!(status, "True" | "False" | "Unknown") {
            errs.push(FieldError::invalid_raw(
                &p("status"),
                format!("{status:?}"),
                "supported values: \"False\", \"True\", \"Unknown\"",
            ));
        }
        if c.get("lastTransitionTime").is_none_or(Value::is_null) {
            errs.push(FieldError::required(
                &p("lastTransitionTime"),
                "must be set",
            ));
        }
        let reason = s(c, "/reason");
        if reason.is_empty() {
            errs.push(FieldError::required(&p("reason"), "reason must be set"));
        } else if !valid_reason(reason) {
            errs.push(FieldError::invalid(&p("reason"), reason, "a condition reason must start with alphabetic character, optionally followed by a string of alphanumeric characters or '_,:', and must end with an alphanumeric character or '_' (e.g. 'my_name',  or 'MY_NAME',  or 'MyName',  or 'ReasonA,ReasonB',  or 'ReasonA:ReasonB', regex used for validation is '[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?')"));
        }
        if s(c, "/message").len() > 32768 {
            errs.push(FieldError::too_long(&p("message"), 32768));
        }
    }
    errs
}

fn time_of(status: &Value, f: &str) -> Option<i64> {
    status
        .get(f)
        .and_then(Value::as_str)
        .and_then(timefmt::parse)
        .map(|(s, _)| s)
}

/// ValidatePodCertificateRequestStatusUpdate (`now`: the server's clock).
pub fn pcr_status_errors(old: &Value, new: &Value, now: i64) -> Vec<FieldError> {
    let empty = Vec::new();
    let conds = new
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let errs = condition_errors(conds);
    if !errs.is_empty() {
        return errs;
    }
    let norm = |v: &Value| {
        let mut st = v.get("status").cloned().unwrap_or(json!({}));
        if let Some(m) = st.as_object_mut() {
            m.retain(|_, x| !x.is_null() && x != &json!([]) && x != &json!(""));
        }
        st
    };
    if terminal(old).is_some() {
        if norm(old) != norm(new) {
            return vec![omitted(
                "status",
                "immutable after PodCertificateRequest is issued, denied, or failed",
            )];
        }
        return Vec::new();
    }
    let status = norm(new);
    match terminal(new) {
        Some("Denied" | "Failed") => {
            if status.as_object().is_some_and(|m| m.len() > 1) {
                return vec![omitted(
                    "status",
                    "non-condition status fields must be empty when denying or failing the PodCertificateRequest",
                )];
            }
            Vec::new()
        }
        Some(_) => issued_errors(old, &status, now),
        None => {
            if norm(old) != status {
                return vec![omitted(
                    "status",
                    "status is immutable unless transitioning to \"Issued\", \"Denied\", or \"Failed\"",
                )];
            }
            Vec::new()
        }
    }
}

fn issued_errors(old: &Value, status: &Value, now: i64) -> Vec<FieldError> {
    const CHAIN: &str = "status.certificateChain";
    let chain = s(status, "/certificateChain");
    if chain.len() > MAX_CHAIN {
        return vec![FieldError::too_long(CHAIN, MAX_CHAIN)];
    }
    let bad = |why: &str| vec![FieldError::invalid(CHAIN, "<omitted>", why)];
    let blocks = pem::parse_many(chain).unwrap_or_default();
    let Some(leaf_block) = blocks.first() else {
        return bad("issued certificate chain must contain at least one certificate");
    };
    if leaf_block.tag() != "CERTIFICATE" {
        return bad("issued certificate chain must consist entirely of CERTIFICATE PEM blocks");
    }
    let Some(leaf) = certcrypto::parse_cert(leaf_block.contents()) else {
        return bad("leaf certificate does not parse as valid X.509");
    };
    for d in &leaf.dns_names {
        if d.is_empty() || d.contains("..") || d.starts_with('.') || d.ends_with('.') {
            return vec![FieldError::invalid(
                CHAIN,
                d,
                "leaf certificate has an invalid DNSName",
            )];
        }
    }
    match requested_key(old) {
        Some(k) if k == leaf.spki_der => {}
        _ => return bad("leaf certificate was not issued to the requested public key"),
    }
    let mut errs = Vec::new();
    let (nb, na, br) = (
        time_of(status, "notBefore"),
        time_of(status, "notAfter"),
        time_of(status, "beginRefreshAt"),
    );
    if nb.is_none() {
        errs.push(FieldError::required(
            "status.notBefore",
            "must be present and consistent with the issued certificate",
        ));
    }
    if na.is_none() {
        errs.push(FieldError::required(
            "status.notAfter",
            "must be present and consistent with the issued certificate",
        ));
    }
    if br.is_none() {
        errs.push(FieldError::required(
            "status.beginRefreshAt",
            "must be present and in the range [notbefore+10min, notafter-10min]",
        ));
    }
    let (Some(nb), Some(na), Some(br)) = (nb, na, br) else {
        return errs;
    };
    let t = |secs: i64| json!(timefmt::rfc3339(secs)).to_string();
    if nb != leaf.not_before {
        return vec![FieldError::invalid_raw(
            "status.notBefore",
            t(nb),
            "must be set to the NotBefore time encoded in the leaf certificate",
        )];
    }
    if (nb - now).abs() >= 300 {
        return vec![FieldError::invalid_raw(
            "status.notBefore",
            t(nb),
            "must be set to within 5 minutes of kube-apiserver's current time",
        )];
    }
    if na != leaf.not_after {
        return vec![FieldError::invalid_raw(
            "status.notAfter",
            t(na),
            "must be set to the NotAfter time encoded in the leaf certificate",
        )];
    }
    let lifetime = leaf.not_after - leaf.not_before;
    if lifetime < 3600 {
        return vec![FieldError::invalid_raw(
            CHAIN,
            format!("{lifetime}s"),
            "leaf certificate lifetime must be >= 1 hour",
        )];
    }
    let max = old
        .pointer("/spec/maxExpirationSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(KUBERNETES_MAX_MAX_EXPIRATION);
    if lifetime > max {
        return vec![FieldError::invalid_raw(
            CHAIN,
            format!("{lifetime}s"),
            &format!("leaf certificate lifetime must be <= spec.maxExpirationSeconds ({max})"),
        )];
    }
    if br < nb + 600 {
        return vec![FieldError::invalid_raw(
            "status.beginRefreshAt",
            t(br),
            "must be at least 10 minutes after status.notBefore",
        )];
    }
    if br > na - 600 {
        return vec![FieldError::invalid_raw(
            "status.beginRefreshAt",
            t(br),
            "must be at least 10 minutes before status.notAfter",
        )];
    }
    for b in &blocks[1..] {
        if b.tag() != "CERTIFICATE" {
            return bad("issued certificate chain must consist entirely of CERTFICATE PEM blocks");
        }
        if certcrypto::parse_cert(b.contents()).is_none() {
            return bad("intermediate certificate does not parse as valid X.509");
        }
    }
    Vec::new()
}

/// The Invalid error of a certificates.k8s.io object.
pub fn invalid(res: Res, obj: &Value, errs: &[FieldError]) -> ApiError {
    ApiError::invalid(res, s(obj, "/metadata/name"), errs)
}
