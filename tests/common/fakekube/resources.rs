//! The resources the fake serves, their URL layout and kinds, and the
//! `meta.k8s.io/v1 Status` errors of the real API server
//! (k8s.io/apimachinery/pkg/api/errors), message for message.

use serde_json::{Value, json};

/// A resource the fake stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Res {
    Namespaces,
    Nodes,
    ServiceAccounts,
    Secrets,
    ConfigMaps,
    Pods,
    Leases,
    Events,
    PodCertificateRequests,
    ClusterTrustBundles,
}

/// How `metadata.name` is validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRule {
    /// RFC 1123 subdomain (most resources).
    Subdomain,
    /// RFC 1123 label (namespaces).
    Label,
    /// Only a valid path segment (core/v1 events: ValidatePathSegmentName).
    PathSegment,
    /// Checked by the resource's own validation (ClusterTrustBundles:
    /// `<signer with / as :>:<subdomain>`).
    Custom,
}

pub struct Info {
    pub plural: &'static str,
    pub kind: &'static str,
    pub group: &'static str,
    pub version: &'static str,
    pub namespaced: bool,
    /// `ReturnDeletedObject` of the generic registry: DELETE answers the
    /// object (pods, service accounts, namespaces) rather than a Status.
    pub delete_returns_object: bool,
    /// A `status` subresource: the main resource's writes leave status alone.
    pub status_subresource: bool,
    pub name_rule: NameRule,
    /// Field selectors supported beyond metadata.name / metadata.namespace.
    pub fields: &'static [&'static str],
}

pub const ALL: [Res; 10] = [
    Res::Namespaces,
    Res::Nodes,
    Res::ServiceAccounts,
    Res::Secrets,
    Res::ConfigMaps,
    Res::Pods,
    Res::Leases,
    Res::Events,
    Res::PodCertificateRequests,
    Res::ClusterTrustBundles,
];

impl Res {
    pub fn info(self) -> &'static Info {
        match self {
            Res::Namespaces => &Info {
                plural: "namespaces",
                kind: "Namespace",
                group: "",
                version: "v1",
                namespaced: false,
                delete_returns_object: true,
                status_subresource: true,
                name_rule: NameRule::Label,
                fields: &["status.phase"],
            },
            Res::Nodes => &Info {
                plural: "nodes",
                kind: "Node",
                group: "",
                version: "v1",
                namespaced: false,
                delete_returns_object: false,
                status_subresource: true,
                name_rule: NameRule::Subdomain,
                fields: &["spec.unschedulable"],
            },
            Res::ServiceAccounts => &Info {
                plural: "serviceaccounts",
                kind: "ServiceAccount",
                group: "",
                version: "v1",
                namespaced: true,
                delete_returns_object: true,
                status_subresource: false,
                name_rule: NameRule::Subdomain,
                fields: &[],
            },
            Res::Secrets => &Info {
                plural: "secrets",
                kind: "Secret",
                group: "",
                version: "v1",
                namespaced: true,
                delete_returns_object: false,
                status_subresource: false,
                name_rule: NameRule::Subdomain,
                fields: &["type"],
            },
            Res::ConfigMaps => &Info {
                plural: "configmaps",
                kind: "ConfigMap",
                group: "",
                version: "v1",
                namespaced: true,
                delete_returns_object: false,
                status_subresource: false,
                name_rule: NameRule::Subdomain,
                fields: &[],
            },
            Res::Pods => &Info {
                plural: "pods",
                kind: "Pod",
                group: "",
                version: "v1",
                namespaced: true,
                delete_returns_object: true,
                status_subresource: true,
                name_rule: NameRule::Subdomain,
                fields: &[
                    "spec.nodeName",
                    "spec.serviceAccountName",
                    "spec.restartPolicy",
                    "spec.schedulerName",
                    "spec.hostNetwork",
                    "status.phase",
                    "status.podIP",
                    "status.nominatedNodeName",
                ],
            },
            // pkg/registry/core/event/strategy.go: ToSelectableFields.
            Res::Events => &Info {
                plural: "events",
                kind: "Event",
                group: "",
                version: "v1",
                namespaced: true,
                delete_returns_object: false,
                status_subresource: false,
                name_rule: NameRule::PathSegment,
                fields: &[
                    "involvedObject.kind",
                    "involvedObject.namespace",
                    "involvedObject.name",
                    "involvedObject.uid",
                    "involvedObject.apiVersion",
                    "involvedObject.resourceVersion",
                    "involvedObject.fieldPath",
                    "reason",
                    "reportingComponent",
                    "source",
                    "type",
                ],
            },
            Res::Leases => &Info {
                plural: "leases",
                kind: "Lease",
                group: "coordination.k8s.io",
                version: "v1",
                namespaced: true,
                delete_returns_object: false,
                status_subresource: false,
                name_rule: NameRule::Subdomain,
                fields: &[],
            },
            // Stored as v1; v1beta1 is a view (see `certificates`).
            Res::PodCertificateRequests => &Info {
                plural: "podcertificaterequests",
                kind: "PodCertificateRequest",
                group: "certificates.k8s.io",
                version: "v1",
                namespaced: true,
                delete_returns_object: false,
                status_subresource: true,
                name_rule: NameRule::Subdomain,
                fields: &["spec.signerName", "spec.podName", "spec.nodeName"],
            },
            Res::ClusterTrustBundles => &Info {
                plural: "clustertrustbundles",
                kind: "ClusterTrustBundle",
                group: "certificates.k8s.io",
                version: "v1",
                namespaced: false,
                delete_returns_object: false,
                status_subresource: false,
                name_rule: NameRule::Custom,
                fields: &["spec.signerName"],
            },
        }
    }

    pub fn plural(self) -> &'static str {
        self.info().plural
    }

    pub fn kind(self) -> &'static str {
        self.info().kind
    }

    pub fn namespaced(self) -> bool {
        self.info().namespaced
    }

    /// `v1` or `group/version`.
    pub fn api_version(self) -> &'static str {
        match self {
            Res::Leases => "coordination.k8s.io/v1",
            Res::PodCertificateRequests | Res::ClusterTrustBundles => "certificates.k8s.io/v1",
            _ => "v1",
        }
    }

    pub fn from_plural(group: &str, version: &str, plural: &str) -> Option<Res> {
        ALL.into_iter().find(|r| {
            let i = r.info();
            i.group == group && i.version == version && i.plural == plural
        })
    }

    pub fn from_kind(api_version: &str, kind: &str) -> Option<Res> {
        ALL.into_iter()
            .find(|r| r.api_version() == api_version && r.kind() == kind)
    }

    /// `secrets`, `leases.coordination.k8s.io`: GroupResource.String().
    pub fn qualified(self) -> String {
        let i = self.info();
        if i.group.is_empty() {
            i.plural.to_string()
        } else {
            format!("{}.{}", i.plural, i.group)
        }
    }

    /// `Secret`, `Lease.coordination.k8s.io`: GroupKind.String().
    pub fn qualified_kind(self) -> String {
        let i = self.info();
        if i.group.is_empty() {
            i.kind.to_string()
        } else {
            format!("{}.{}", i.kind, i.group)
        }
    }
}

/// An error answered as a `Status`.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u32>,
}

fn details(name: &str, group: &str, kind: &str) -> Value {
    let mut d = json!({ "name": name, "kind": kind });
    if !group.is_empty() {
        d["group"] = json!(group);
    }
    d
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    /// errors.NewNotFound.
    pub fn not_found(res: Res, name: &str) -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", res.qualified()),
        );
        e.details = Some(details(name, res.info().group, res.plural()));
        e
    }

    /// errors.NewAlreadyExists.
    pub fn already_exists(res: Res, name: &str) -> Self {
        let mut e = Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", res.qualified()),
        );
        e.details = Some(details(name, res.info().group, res.plural()));
        e
    }

    /// errors.NewConflict with a free-form cause.
    pub fn conflict(res: Res, name: &str, why: &str) -> Self {
        let mut e = Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                res.qualified()
            ),
        );
        e.details = Some(details(name, res.info().group, res.plural()));
        e
    }

    /// The optimistic-concurrency conflict (storage.ErrCodeResourceVersionConflicts).
    pub fn stale(res: Res, name: &str) -> Self {
        Self::conflict(
            res,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// errors.NewInvalid.
    pub fn invalid(res: Res, name: &str, errs: &[FieldError]) -> Self {
        Self::invalid_kind(
            &res.qualified_kind(),
            res.info().group,
            res.kind(),
            name,
            errs,
        )
    }

    pub fn invalid_kind(
        qualified_kind: &str,
        group: &str,
        kind: &str,
        name: &str,
        errs: &[FieldError],
    ) -> Self {
        let rendered: Vec<String> = errs.iter().map(FieldError::to_string).collect();
        let agg = if rendered.len() == 1 {
            rendered[0].clone()
        } else {
            format!("[{}]", rendered.join(", "))
        };
        let mut e = Self::new(
            422,
            "Invalid",
            format!("{qualified_kind} \"{name}\" is invalid: {agg}"),
        );
        let mut d = details(name, group, kind);
        d["causes"] = Value::Array(
            errs.iter()
                .map(|f| json!({"reason": f.kind.reason(), "message": f.body(), "field": f.field}))
                .collect(),
        );
        e.details = Some(d);
        e
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// errors.NewForbidden.
    pub fn forbidden(res: Res, name: &str, why: &str) -> Self {
        let mut e = Self::new(
            403,
            "Forbidden",
            format!("{} \"{name}\" is forbidden: {why}", res.qualified()),
        );
        e.details = Some(details(name, res.info().group, res.plural()));
        e
    }

    /// errors.NewResourceExpired (410 Gone, reason Expired, no details).
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            500,
            "InternalError",
            format!("Internal error occurred: {}", message.into()),
        )
    }

    pub fn not_found_path() -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
        e.details = Some(json!({}));
        e
    }

    pub fn method_not_allowed(verb: &str, what: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("{verb} is not supported on resources of kind \"{what}\""),
        )
    }

    /// A status of the code a test injects.
    pub fn injected(code: u16) -> Self {
        let (reason, message) = match code {
            400 => ("BadRequest", "injected bad request"),
            401 => ("Unauthorized", "Unauthorized"),
            403 => ("Forbidden", "injected: forbidden"),
            404 => ("NotFound", "injected: not found"),
            409 => ("Conflict", "injected: conflict"),
            410 => ("Expired", "injected: expired"),
            422 => ("Invalid", "injected: invalid"),
            429 => (
                "TooManyRequests",
                "Too many requests, please try again later.",
            ),
            503 => (
                "ServiceUnavailable",
                "injected: the server is currently unable to handle the request",
            ),
            504 => (
                "Timeout",
                "injected: the server was unable to return a response in the time allotted",
            ),
            _ => ("InternalError", "Internal error occurred: injected failure"),
        };
        let mut e = Self::new(code, reason, message);
        if matches!(code, 429 | 503) {
            e.retry_after = Some(1);
        }
        e
    }

    /// The `Status` body.
    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

/// The success `Status` of a DELETE for resources that do not answer the
/// object.
pub fn delete_success(res: Res, name: &str, uid: &str) -> Value {
    let mut d = details(name, res.info().group, res.plural());
    d["uid"] = json!(uid);
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": d,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldErrorKind {
    Invalid,
    Required,
    Forbidden,
    TooLong,
    Duplicate,
}

impl FieldErrorKind {
    fn reason(self) -> &'static str {
        match self {
            Self::Invalid => "FieldValueInvalid",
            Self::Required => "FieldValueRequired",
            Self::Forbidden => "FieldValueForbidden",
            Self::TooLong => "FieldValueTooLong",
            Self::Duplicate => "FieldValueDuplicate",
        }
    }
}

/// field.Error of k8s.io/apimachinery/pkg/util/validation/field.
#[derive(Clone, Debug)]
pub struct FieldError {
    pub kind: FieldErrorKind,
    pub field: String,
    /// The bad value as Go's `%#v` prints it (strings quoted).
    pub value: Option<String>,
    pub detail: String,
}

impl FieldError {
    pub fn invalid(field: &str, value: &str, detail: &str) -> Self {
        Self {
            kind: FieldErrorKind::Invalid,
            field: field.into(),
            value: Some(format!("{value:?}")),
            detail: detail.into(),
        }
    }

    pub fn invalid_raw(field: &str, value: String, detail: &str) -> Self {
        Self {
            kind: FieldErrorKind::Invalid,
            field: field.into(),
            value: Some(value),
            detail: detail.into(),
        }
    }

    pub fn required(field: &str, detail: &str) -> Self {
        Self {
            kind: FieldErrorKind::Required,
            field: field.into(),
            value: None,
            detail: detail.into(),
        }
    }

    pub fn forbidden(field: &str, detail: &str) -> Self {
        Self {
            kind: FieldErrorKind::Forbidden,
            field: field.into(),
            value: None,
            detail: detail.into(),
        }
    }

    pub fn too_long(field: &str, max: usize) -> Self {
        Self {
            kind: FieldErrorKind::TooLong,
            field: field.into(),
            value: None,
            detail: format!("must have at most {max} bytes"),
        }
    }

    /// ErrorBody(): the message without the field path.
    pub fn body(&self) -> String {
        let head = match self.kind {
            FieldErrorKind::Invalid => "Invalid value",
            FieldErrorKind::Required => "Required value",
            FieldErrorKind::Forbidden => "Forbidden",
            FieldErrorKind::TooLong => "Too long",
            FieldErrorKind::Duplicate => "Duplicate value",
        };
        let mut s = head.to_string();
        if let Some(v) = &self.value {
            s.push_str(": ");
            s.push_str(v);
        }
        if !self.detail.is_empty() {
            s.push_str(": ");
            s.push_str(&self.detail);
        }
        s
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.body())
    }
}

pub const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";

fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

pub fn is_dns_label(s: &str) -> bool {
    s.len() <= 63 && is_label(s)
}

pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_label)
}

/// Validates a name (or a generateName prefix, which may end with '-' and
/// is checked with a placeholder suffix, as ValidateObjectMeta does).
pub fn validate_name(rule: NameRule, name: &str, field: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    match rule {
        NameRule::Subdomain => {
            if name.len() > 253 {
                errs.push(FieldError::invalid(
                    field,
                    name,
                    "must be no more than 253 characters",
                ));
            }
            if !is_dns_subdomain(name) {
                errs.push(FieldError::invalid(field, name, SUBDOMAIN_MSG));
            }
        }
        NameRule::PathSegment => {
            // apimachinery/pkg/api/validation/path: ValidatePathSegmentName.
            if name == "." || name == ".." {
                errs.push(FieldError::invalid(
                    field,
                    name,
                    &format!("may not be '{name}'"),
                ));
            }
            for bad in ["/", "%"] {
                if name.contains(bad) {
                    errs.push(FieldError::invalid(
                        field,
                        name,
                        &format!("may not contain '{bad}'"),
                    ));
                }
            }
        }
        NameRule::Label => {
            if name.len() > 63 {
                errs.push(FieldError::invalid(
                    field,
                    name,
                    "must be no more than 63 characters",
                ));
            }
            if !is_label(name) {
                errs.push(FieldError::invalid(field, name, LABEL_MSG));
            }
        }
        NameRule::Custom => {}
    }
    errs
}

/// `[-._a-zA-Z0-9]+`, at most 253: Secret and ConfigMap keys.
pub fn validate_config_key(key: &str, field: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if key.len() > 253 {
        errs.push(FieldError::invalid(
            field,
            key,
            "must be no more than 253 characters",
        ));
    }
    let ok = !key.is_empty()
        && key
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if !ok {
        errs.push(FieldError::invalid(field, key, "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"));
    } else if key == "." || key == ".." || key.starts_with("..") {
        errs.push(FieldError::invalid(
            field,
            key,
            "must not be '.' or '..' or start with '..'",
        ));
    }
    errs
}
