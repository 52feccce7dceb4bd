//! Per-resource strategies of the real registry: decoding (Secret
//! `stringData` merged into `data`, base64 checks, MicroTime normalised),
//! defaulting, validation, immutability, and what the main resource may not
//! change (status, most of a pod's spec).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Map, Value, json};

use super::resources::{ApiError, FieldError, Res, validate_config_key};
use super::selectors::{valid_label_key, valid_label_value};
use super::timefmt;

const MAX_DATA: usize = 1024 * 1024;
const IMMUTABLE: &str = "field is immutable when `immutable` is set";

fn name_of(obj: &Value) -> String {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn cannot_decode(res: Res, why: &str) -> ApiError {
    ApiError::bad_request(format!(
        "{} in version \"{}\" cannot be handled as a {}: {why}",
        res.kind(),
        res.info().version,
        res.kind()
    ))
}

fn b64_error(s: &str) -> Option<String> {
    match B64.decode(s) {
        Ok(_) => None,
        Err(base64::DecodeError::InvalidByte(i, _))
        | Err(base64::DecodeError::InvalidLastSymbol(i, _)) => {
            Some(format!("illegal base64 data at input byte {i}"))
        }
        Err(_) => Some(format!("illegal base64 data at input byte {}", s.len())),
    }
}

/// What the decoder does before anything else sees the object.
pub fn decode(res: Res, obj: &mut Value) -> Result<(), ApiError> {
    if !obj.is_object() {
        return Err(cannot_decode(res, "expected an object"));
    }
    match res {
        Res::Secrets => {
            if let Some(data) = obj.get("data").and_then(Value::as_object) {
                for v in data.values() {
                    let Some(s) = v.as_str() else {
                        return Err(cannot_decode(res, "illegal base64 data: not a string"));
                    };
                    if let Some(e) = b64_error(s) {
                        return Err(cannot_decode(res, &e));
                    }
                }
            }
            // Convert_v1_Secret_To_core_Secret: stringData overrides data.
            if let Some(Value::Object(sd)) =
                obj.as_object_mut().and_then(|m| m.remove("stringData"))
            {
                let m = obj.as_object_mut().expect("object");
                let data = m.entry("data").or_insert_with(|| json!({}));
                if !data.is_object() {
                    *data = json!({});
                }
                for (k, v) in sd {
                    let s = v.as_str().unwrap_or_default().to_string();
                    data[k] = json!(B64.encode(s.as_bytes()));
                }
            }
        }
        Res::ConfigMaps => {
            if let Some(data) = obj.get("binaryData").and_then(Value::as_object) {
                for v in data.values() {
                    if let Some(e) = v.as_str().and_then(b64_error) {
                        return Err(cannot_decode(res, &e));
                    }
                }
            }
        }
        Res::Leases => {
            if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                for f in ["acquireTime", "renewTime"] {
                    if let Some(Value::String(t)) = spec.get(f) {
                        let Some((s, us)) = timefmt::parse(t) else {
                            return Err(cannot_decode(
                                res,
                                &format!("parsing time {t:?}: cannot parse as RFC3339"),
                            ));
                        };
                        spec.insert(f.into(), json!(timefmt::micro(s, us)));
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Drops what Go's `omitempty` drops on the way out.
pub fn normalize(obj: &mut Value) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in [
            "labels",
            "annotations",
            "ownerReferences",
            "finalizers",
            "managedFields",
        ] {
            if meta.get(k).is_some_and(is_empty_or_null) {
                meta.remove(k);
            }
        }
        if meta.get("generateName").is_some_and(is_empty_or_null) {
            meta.remove("generateName");
        }
    }
    if let Some(m) = obj.as_object_mut() {
        for k in ["data", "binaryData"] {
            if m.get(k).is_some_and(is_empty_or_null) {
                m.remove(k);
            }
        }
    }
}

fn is_empty_or_null(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

fn meta_errors(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) {
        for (k, v) in labels {
            if !valid_label_key(k) {
                errs.push(FieldError::invalid("metadata.labels", k, "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"));
            }
            match v.as_str() {
                Some(s) if valid_label_value(s) => {}
                _ => errs.push(FieldError::invalid_raw("metadata.labels", v.to_string(), "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')")),
            }
        }
    }
    if let Some(anns) = obj
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
    {
        for k in anns.keys() {
            if !valid_label_key(k) {
                errs.push(FieldError::invalid("metadata.annotations", k, "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"));
            }
        }
    }
    if let Some(refs) = obj
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
    {
        for (i, r) in refs.iter().enumerate() {
            for f in ["apiVersion", "kind", "name", "uid"] {
                if r.get(f).and_then(Value::as_str).is_none_or(str::is_empty) {
                    let detail = match f {
                        "uid" => "uid must not be empty",
                        "name" => "name must not be empty",
                        "kind" => "kind must not be empty",
                        _ => "version must not be empty",
                    };
                    errs.push(FieldError::invalid_raw(
                        &format!("metadata.ownerReferences[{i}].{f}"),
                        "\"\"".into(),
                        detail,
                    ));
                }
            }
        }
        let controllers = refs
            .iter()
            .filter(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
            .count();
        if controllers > 1 {
            errs.push(FieldError::invalid_raw(
                "metadata.ownerReferences",
                "[...]".into(),
                "Only one reference can have Controller set to true",
            ));
        }
    }
    errs
}

fn data_errors(obj: &Value, field: &str, decoded: bool, total: &mut usize) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Some(m) = obj.get(field).and_then(Value::as_object) {
        for (k, v) in m {
            errs.extend(validate_config_key(k, &format!("{field}[{k}]")));
            let s = v.as_str().unwrap_or_default();
            *total += if decoded {
                B64.decode(s).map(|b| b.len()).unwrap_or(0)
            } else {
                s.len()
            };
        }
    }
    errs
}

fn secret_errors(obj: &Value) -> Vec<FieldError> {
    let mut total = 0;
    let mut errs = data_errors(obj, "data", true, &mut total);
    if total > MAX_DATA {
        errs.push(FieldError::too_long("data", MAX_DATA));
    }
    let has = |k: &str| obj.pointer(&format!("/data/{k}")).is_some();
    match obj.get("type").and_then(Value::as_str).unwrap_or("Opaque") {
        "kubernetes.io/tls" => {
            for k in ["tls.crt", "tls.key"] {
                if !has(k) {
                    errs.push(FieldError::required(&format!("data[{k}]"), ""));
                }
            }
        }
        "kubernetes.io/service-account-token"
            if obj
                .pointer("/metadata/annotations/kubernetes.io~1service-account.name")
                .is_none() =>
        {
            errs.push(FieldError::required(
                "metadata.annotations[kubernetes.io/service-account.name]",
                "",
            ));
        }
        "kubernetes.io/dockerconfigjson" if !has(".dockerconfigjson") => {
            errs.push(FieldError::required("data[.dockerconfigjson]", ""));
        }
        _ => {}
    }
    errs
}

fn configmap_errors(obj: &Value) -> Vec<FieldError> {
    let mut total = 0;
    let mut errs = data_errors(obj, "data", false, &mut total);
    errs.extend(data_errors(obj, "binaryData", true, &mut total));
    if let (Some(d), Some(b)) = (
        obj.get("data").and_then(Value::as_object),
        obj.get("binaryData").and_then(Value::as_object),
    ) {
        for k in d.keys().filter(|k| b.contains_key(*k)) {
            errs.push(FieldError::invalid(
                &format!("data[{k}]"),
                k,
                "duplicate of key present in binaryData",
            ));
        }
    }
    if total > MAX_DATA {
        errs.push(FieldError::too_long("[]", MAX_DATA));
    }
    errs
}

fn pod_errors(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    match obj.pointer("/spec/containers").and_then(Value::as_array) {
        Some(cs) if !cs.is_empty() => {
            for (i, c) in cs.iter().enumerate() {
                let name = c.get("name").and_then(Value::as_str).unwrap_or("");
                if name.is_empty() {
                    errs.push(FieldError::required(
                        &format!("spec.containers[{i}].name"),
                        "",
                    ));
                } else if !super::resources::is_dns_label(name) {
                    errs.extend(super::resources::validate_name(
                        super::resources::NameRule::Label,
                        name,
                        &format!("spec.containers[{i}].name"),
                    ));
                }
                if c.get("image")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    errs.push(FieldError::required(
                        &format!("spec.containers[{i}].image"),
                        "",
                    ));
                }
            }
        }
        _ => errs.push(FieldError::required("spec.containers", "")),
    }
    errs
}

fn lease_errors(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Some(d) = obj
        .pointer("/spec/leaseDurationSeconds")
        .and_then(Value::as_i64)
        && d <= 0
    {
        errs.push(FieldError::invalid_raw(
            "spec.leaseDurationSeconds",
            d.to_string(),
            "must be greater than 0",
        ));
    }
    if let Some(t) = obj
        .pointer("/spec/leaseTransitions")
        .and_then(Value::as_i64)
        && t < 0
    {
        errs.push(FieldError::invalid_raw(
            "spec.leaseTransitions",
            t.to_string(),
            "must be greater than or equal to 0",
        ));
    }
    errs
}

/// pkg/apis/core/validation/events.go: legacyValidateEvent, the only
/// validation core/v1 applies to Events (create and update).
fn event_errors(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let s = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or("");
    let ns = s("/metadata/namespace");
    let involved_ns = s("/involvedObject/namespace");
    let mismatch = || {
        FieldError::invalid(
            "involvedObject.namespace",
            involved_ns,
            "does not match event.namespace",
        )
    };
    let event_time = obj.get("eventTime").is_some_and(|t| !t.is_null());
    if !event_time {
        if involved_ns.is_empty() {
            if !ns.is_empty() && ns != "default" {
                errs.push(mismatch());
            }
        } else if ns != involved_ns {
            errs.push(mismatch());
        }
    } else {
        if involved_ns.is_empty() && ns != "default" && ns != "kube-system" {
            errs.push(mismatch());
        }
        let controller = s("/reportingComponent");
        if controller.is_empty() {
            errs.push(FieldError::required("reportingComponent", ""));
        } else if !valid_label_key(controller) {
            errs.push(FieldError::invalid("reportingComponent", controller, "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"));
        }
        for (field, limit) in [("reportingInstance", 128), ("action", 128), ("reason", 128)] {
            let v = s(&format!("/{field}"));
            if v.is_empty() {
                errs.push(FieldError::required(field, ""));
            }
            if v.len() > limit {
                errs.push(FieldError::invalid(
                    field,
                    "",
                    &format!("can have at most {limit} characters"),
                ));
            }
        }
        if s("/message").len() > 1024 {
            errs.push(FieldError::invalid(
                "message",
                "",
                "can have at most 1024 characters",
            ));
        }
    }
    if !super::resources::is_dns_subdomain(ns) {
        errs.push(FieldError::invalid(
            "namespace",
            ns,
            super::resources::SUBDOMAIN_MSG,
        ));
    }
    errs
}

fn validate(res: Res, obj: &Value) -> Result<(), ApiError> {
    let mut errs = meta_errors(obj);
    errs.extend(match res {
        Res::Secrets => secret_errors(obj),
        Res::ConfigMaps => configmap_errors(obj),
        Res::Pods => pod_errors(obj),
        Res::Leases => lease_errors(obj),
        Res::Events => event_errors(obj),
        Res::ClusterTrustBundles => super::certificates::ctb_errors(obj, None),
        _ => Vec::new(),
    });
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(res, &name_of(obj), &errs))
    }
}

fn set_default(obj: &mut Value, ptr: &str, v: Value) {
    if obj.pointer(ptr).is_none_or(Value::is_null) {
        let (parent, key) = ptr.rsplit_once('/').expect("pointer");
        if obj.pointer(parent).is_none_or(|p| !p.is_object()) {
            set_default(obj, parent, json!({}));
        }
        if let Some(p) = obj.pointer_mut(parent).and_then(Value::as_object_mut) {
            p.insert(key.to_string(), v);
        }
    }
}

/// Defaulting and PrepareForCreate, then validation.
pub fn on_create(res: Res, obj: &mut Value) -> Result<(), ApiError> {
    match res {
        Res::Secrets => set_default(obj, "/type", json!("Opaque")),
        Res::Namespaces => {
            let name = name_of(obj);
            set_default(obj, "/metadata/labels", json!({}));
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["status"] = json!({"phase": "Active"});
        }
        Res::Pods => {
            set_default(obj, "/spec/serviceAccountName", json!("default"));
            let sa = obj["spec"]["serviceAccountName"].clone();
            obj["spec"]["serviceAccount"] = sa;
            set_default(obj, "/spec/restartPolicy", json!("Always"));
            set_default(obj, "/spec/dnsPolicy", json!("ClusterFirst"));
            set_default(obj, "/spec/schedulerName", json!("default-scheduler"));
            set_default(obj, "/spec/terminationGracePeriodSeconds", json!(30));
            set_default(obj, "/spec/securityContext", json!({}));
            if let Some(cs) = obj
                .pointer_mut("/spec/containers")
                .and_then(Value::as_array_mut)
            {
                for c in cs {
                    if c.is_object() {
                        set_default(c, "/terminationMessagePath", json!("/dev/termination-log"));
                        set_default(c, "/terminationMessagePolicy", json!("File"));
                        set_default(c, "/imagePullPolicy", json!("IfNotPresent"));
                        set_default(c, "/resources", json!({}));
                    }
                }
            }
            // PrepareForCreate: the status is the server's.
            obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
            obj["metadata"]["generation"] = json!(1);
        }
        Res::PodCertificateRequests => {
            super::certificates::pcr_prepare_create(obj);
            let errs = super::certificates::pcr_create_errors(obj);
            if !errs.is_empty() {
                return Err(ApiError::invalid(res, &name_of(obj), &errs));
            }
        }
        _ => {}
    }
    validate(res, obj)
}

/// The pod spec with the fields an update may change blanked out.
fn pod_spec_fixed(spec: &Value) -> Value {
    let mut s = spec.clone();
    if let Some(m) = s.as_object_mut() {
        for k in [
            "activeDeadlineSeconds",
            "tolerations",
            "terminationGracePeriodSeconds",
            "schedulingGates",
        ] {
            m.remove(k);
        }
        for list in ["containers", "initContainers"] {
            if let Some(cs) = m.get_mut(list).and_then(Value::as_array_mut) {
                for c in cs {
                    if let Some(cm) = c.as_object_mut() {
                        cm.remove("image");
                    }
                }
            }
        }
    }
    s
}

/// PrepareForUpdate and ValidateUpdate. `subresource` is `Some("status")`
/// for the status subresource: only the status moves.
pub fn on_update(
    res: Res,
    old: &Value,
    new: &mut Value,
    subresource: Option<&str>,
) -> Result<(), ApiError> {
    let name = name_of(old);
    if subresource == Some("status") {
        let status = new.get("status").cloned().unwrap_or(json!({}));
        let meta = new.get("metadata").cloned();
        *new = old.clone();
        new["status"] = status;
        if res == Res::PodCertificateRequests {
            // ResetObjectMetaForStatus: labels and annotations stay.
            let errs = super::certificates::pcr_status_errors(old, new, timefmt::now_secs());
            if !errs.is_empty() {
                return Err(ApiError::invalid(res, &name, &errs));
            }
            return validate(res, new);
        }
        if let Some(Value::Object(m)) = meta {
            for k in ["labels", "annotations"] {
                if let Some(v) = m.get(k) {
                    new["metadata"][k] = v.clone();
                }
            }
        }
        return validate(res, new);
    }
    if res.info().status_subresource {
        match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
    }
    let mut errs = Vec::new();
    match res {
        Res::Secrets | Res::ConfigMaps => {
            if res == Res::Secrets {
                set_default(new, "/type", json!("Opaque"));
                let (ot, nt) = (&old["type"], &new["type"]);
                if ot != nt {
                    errs.push(FieldError::invalid_raw(
                        "type",
                        nt.to_string(),
                        "field is immutable",
                    ));
                }
            }
            if old.get("immutable").and_then(Value::as_bool) == Some(true) {
                if new.get("immutable").and_then(Value::as_bool) != Some(true) {
                    errs.push(FieldError::forbidden("immutable", IMMUTABLE));
                }
                for f in ["data", "binaryData"] {
                    let empty = Value::Object(Map::new());
                    if old.get(f).unwrap_or(&empty) != new.get(f).unwrap_or(&empty) {
                        errs.push(FieldError::forbidden(f, IMMUTABLE));
                    }
                }
            }
        }
        Res::PodCertificateRequests => {
            errs.extend(super::certificates::pcr_update_errors(old, new));
        }
        Res::ClusterTrustBundles => {
            // The rest (name, bundle) is checked as on create.
            errs.extend(super::certificates::ctb_update_errors(old, new));
        }
        Res::Namespaces => {
            new["spec"] = old.get("spec").cloned().unwrap_or(json!({}));
            set_default(new, "/metadata/labels", json!({}));
            new["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
        }
        Res::Pods => {
            let (os, ns) = (
                old.get("spec").cloned().unwrap_or(json!({})),
                new.get("spec").cloned().unwrap_or(json!({})),
            );
            if pod_spec_fixed(&os) != pod_spec_fixed(&ns) {
                errs.push(FieldError::forbidden("spec", "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)"));
            }
            let generation = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            new["metadata"]["generation"] =
                json!(if os != ns { generation + 1 } else { generation });
        }
        _ => {}
    }
    if !errs.is_empty() {
        return Err(ApiError::invalid(res, &name, &errs));
    }
    validate(res, new)
}
