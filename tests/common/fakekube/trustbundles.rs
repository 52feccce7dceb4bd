//! ClusterTrustBundle validation (ValidateClusterTrustBundle,
//! ValidateClusterTrustBundleUpdate, validateTrustBundle).

use serde_json::Value;

use super::certcrypto;
use super::certificates::{immutable, signer_name_errors};
use super::resources::{FieldError, is_dns_subdomain};

const MAX_TRUST_BUNDLE: usize = 1024 * 1024;

fn s<'a>(obj: &'a Value, ptr: &str) -> &'a str {
    obj.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

/// apivalidation.ValidateClusterTrustBundleName.
fn ctb_name_errors(name: &str, signer: &str) -> Vec<FieldError> {
    let bad = |why: &str| vec![FieldError::invalid("metadata.name", name, why)];
    if signer.is_empty() {
        if name.contains(':') {
            return bad("ClusterTrustBundle without signer name must not have \":\" in its name");
        }
        return if is_dns_subdomain(name) {
            Vec::new()
        } else {
            bad(
                "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
            )
        };
    }
    let prefix = format!("{}:", signer.replace('/', ":"));
    match name.strip_prefix(&prefix) {
        None => bad(&format!(
            "ClusterTrustBundle for signerName {signer} must be named with prefix {prefix}"
        )),
        Some(rest) if !is_dns_subdomain(rest) => bad(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
        ),
        Some(_) => Vec::new(),
    }
}

/// validateTrustBundle: CERTIFICATE blocks only, no headers, each a CA
/// certificate with valid basic constraints, no duplicates, at least one.
fn trust_bundle_errors(text: &str) -> Vec<FieldError> {
    const F: &str = "spec.trustBundle";
    let bad = |why: String| FieldError {
        kind: super::resources::FieldErrorKind::Invalid,
        field: F.into(),
        value: Some("\"<value omitted>\"".into()),
        detail: why,
    };
    if text.len() > MAX_TRUST_BUNDLE {
        return vec![FieldError::too_long(F, MAX_TRUST_BUNDLE)];
    }
    let blocks = pem::parse_many(text).unwrap_or_default();
    let mut errs = Vec::new();
    let mut seen: Vec<(Vec<u8>, Vec<usize>)> = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        if b.tag() != "CERTIFICATE" {
            errs.push(bad(format!("entry {i} has bad block type: {}", b.tag())));
            continue;
        }
        if b.headers().iter().next().is_some() {
            errs.push(bad(format!("entry {i} has PEM block headers")));
            continue;
        }
        let Some(c) = certcrypto::parse_cert(b.contents()) else {
            errs.push(bad(format!("entry {i} does not parse as X.509")));
            continue;
        };
        if !c.is_ca {
            errs.push(bad(format!("entry {i} does not have the CA bit set")));
            continue;
        }
        if !c.basic_constraints {
            errs.push(bad(format!("entry {i} has invalid basic constraints")));
            continue;
        }
        match seen.iter_mut().find(|(d, _)| d == b.contents()) {
            Some((_, idx)) => idx.push(i),
            None => seen.push((b.contents().to_vec(), vec![i])),
        }
    }
    if !errs.is_empty() {
        return errs;
    }
    if seen.is_empty() {
        errs.push(bad("at least one trust anchor must be provided".into()));
    }
    for (_, idx) in &seen {
        if idx.len() > 1 {
            let list: Vec<String> = idx.iter().map(usize::to_string).collect();
            errs.push(bad(format!(
                "duplicate trust anchor (indices [{}])",
                list.join(" ")
            )));
        }
    }
    errs
}

/// ValidateClusterTrustBundleUpdate's own part: signerName is immutable.
pub fn ctb_update_errors(old: &Value, new: &Value) -> Vec<FieldError> {
    let norm = |v: &Value| v.as_str().unwrap_or("").to_string();
    if norm(&old["spec"]["signerName"]) != norm(&new["spec"]["signerName"]) {
        return vec![immutable("spec.signerName", &new["spec"]["signerName"])];
    }
    Vec::new()
}

/// ValidateClusterTrustBundle (create) / ValidateClusterTrustBundleUpdate.
pub fn ctb_errors(obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let name = s(obj, "/metadata/name");
    let signer = s(obj, "/spec/signerName");
    let mut errs = ctb_name_errors(name, signer);
    if !signer.is_empty() {
        errs.extend(signer_name_errors("spec.signerName", signer));
    }
    let bundle = s(obj, "/spec/trustBundle");
    let unchanged = old.is_some_and(|o| s(o, "/spec/trustBundle") == bundle);
    if !unchanged {
        errs.extend(trust_bundle_errors(bundle));
    }
    if let Some(o) = old {
        errs.extend(ctb_update_errors(o, obj));
    }
    errs
}
