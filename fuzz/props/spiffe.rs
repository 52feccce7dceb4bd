//! SPIFFE ID property, shared by `fuzz_targets/spiffe_id_roundtrip.rs` and
//! `tests/properties.rs`: the parser accepts exactly what the SPIFFE ID
//! rules (REFERENCE.md section 2; SPIFFE ID specification section 2) allow,
//! as an independent oracle written from the rules reads them, and what it
//! accepts round-trips (`workload_ca::identity::check_roundtrip`).

use workload_ca::identity::{SpiffeId, TrustDomain};

/// A trust domain: 1 to 255 bytes of `[a-z0-9._-]`. That charset leaves
/// out upper case, `:` (ports), `@` (user info), `%` (percent-encoding).
pub fn trust_domain_ok(td: &str) -> bool {
    (1..=255).contains(&td.len())
        && td
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
}

/// A SPIFFE ID: `spiffe://`, a trust domain, then zero or more
/// `/segment`s, each non-empty, not `.` or `..`, of `[a-zA-Z0-9._-]`
/// (which leaves out `?` and `#`: no query, no fragment; and `%`); at
/// most 2048 bytes in all.
pub fn id_ok(s: &str) -> bool {
    if s.len() > 2048 {
        return false;
    }
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return false;
    };
    let (td, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if !trust_domain_ok(td) {
        return false;
    }
    if path.is_empty() {
        return true;
    }
    path[1..].split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    })
}

/// The property on one string.
///
/// # Errors
/// Where the parser and the rules disagree (a broken round trip panics).
pub fn check(s: &str) -> Result<(), String> {
    workload_ca::identity::check_roundtrip(s);
    let parsed = SpiffeId::parse(s);
    if parsed.is_ok() != id_ok(s) {
        return Err(format!(
            "SpiffeId::parse({s:?}) = {parsed:?}, the rules say {}",
            id_ok(s)
        ));
    }
    let td = TrustDomain::new(s);
    if td.is_ok() != trust_domain_ok(s) {
        return Err(format!(
            "TrustDomain::new({s:?}) = {td:?}, the rules say {}",
            trust_domain_ok(s)
        ));
    }
    if let Ok(id) = parsed {
        let (td, path) = (id.trust_domain(), id.path());
        if format!("spiffe://{}{path}", td.as_str()) != s
            || !(path.is_empty() || path.starts_with('/'))
        {
            return Err(format!("{s:?} splits into {td:?} and {path:?}"));
        }
    }
    Ok(())
}
