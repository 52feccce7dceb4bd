//! SPIFFE identities as validated newtypes.
//!
//! A [`TrustDomain`] or [`SpiffeId`] can only be built through the parsers
//! here, so a value of either type always satisfies the SPIFFE ID rules
//! (SPIFFE ID specification, section 2):
//!
//! - scheme `spiffe`, lower case, followed by `://`;
//! - trust domain of 1 to 255 bytes from `[a-z0-9._-]` (no upper case, no
//!   port, no user info, no percent-encoding);
//! - path made of `/`-separated segments from `[a-zA-Z0-9._-]`, none empty,
//!   none `.` or `..`, no trailing `/`;
//! - no query or fragment; the whole ID at most 2048 bytes.
//!
//! Parsing never normalises: an ID is accepted exactly as written or
//! rejected, so `parse(s).to_string() == s` for every accepted `s` (the fuzz
//! target in `fuzz/` asserts this).
//!
//! Not checked here: whether a trust domain is one this CA serves, and whether
//! a path names a Kubernetes service account; see
//! [`SpiffeId::service_account`] for the latter.

use std::fmt;
use std::str::FromStr;

/// Longest trust domain name, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest SPIFFE ID, in bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
const SCHEME: &str = "spiffe://";

/// Why a trust domain or SPIFFE ID was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The ID is the empty string.
    #[error("SPIFFE ID is empty")]
    Empty,
    /// It does not start with `spiffe://`.
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    /// Nothing between `spiffe://` and the path.
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain is over [`MAX_TRUST_DOMAIN_LEN`] bytes.
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    /// A trust-domain character outside `[a-z0-9._-]`, at this byte.
    #[error(
        "trust domain has a character outside [a-z0-9._-] at byte {0} (upper case, ports, user info and percent-encoding are not allowed)"
    )]
    BadTrustDomainChar(usize),
    /// The whole ID is over [`MAX_SPIFFE_ID_LEN`] bytes.
    #[error("SPIFFE ID is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    /// A path character outside `[a-zA-Z0-9._-]`, at this byte.
    #[error("path segment has a character outside [a-zA-Z0-9._-] at byte {0}")]
    BadPathChar(usize),
    /// Two slashes in a row.
    #[error("path has an empty segment")]
    EmptySegment,
    /// A `.` or `..` segment.
    #[error("path has a \".\" or \"..\" segment")]
    DotSegment,
    /// The path ends with `/`.
    #[error("path ends with \"/\"")]
    TrailingSlash,
    /// A namespace or service account that is not a DNS-1123 subdomain.
    #[error("{0:?} is not a valid Kubernetes namespace or service account name")]
    BadKubernetesName(String),
}

impl Error {
    /// Every [`Error::metric_label`].
    pub const METRIC_LABELS: &[&str] = &[
        "empty",
        "wrong_scheme",
        "empty_trust_domain",
        "trust_domain_too_long",
        "bad_trust_domain_char",
        "too_long",
        "bad_path_char",
        "empty_segment",
        "dot_segment",
        "trailing_slash",
        "bad_kubernetes_name",
    ];

    /// A short, stable label for metrics and logs (every variant named).
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::WrongScheme => "wrong_scheme",
            Self::EmptyTrustDomain => "empty_trust_domain",
            Self::TrustDomainTooLong => "trust_domain_too_long",
            Self::BadTrustDomainChar(_) => "bad_trust_domain_char",
            Self::TooLong => "too_long",
            Self::BadPathChar(_) => "bad_path_char",
            Self::EmptySegment => "empty_segment",
            Self::DotSegment => "dot_segment",
            Self::TrailingSlash => "trailing_slash",
            Self::BadKubernetesName(_) => "bad_kubernetes_name",
        }
    }
}

/// A SPIFFE trust domain, such as `cluster.local`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (no scheme).
    ///
    /// # Errors
    /// [`Error::EmptyTrustDomain`], [`Error::TrustDomainTooLong`],
    /// [`Error::BadTrustDomainChar`].
    pub fn new(name: &str) -> Result<Self, Error> {
        validate_trust_domain(name, 0)?;
        Ok(Self(name.to_owned()))
    }

    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID of the trust domain itself, `spiffe://<td>` (no path),
    /// as carried by signing certificates.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            id: format!("{SCHEME}{}", self.0),
            td_end: SCHEME.len() + self.0.len(),
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

/// A SPIFFE ID such as `spiffe://cluster.local/ns/default/sa/web`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    /// Byte offset where the trust domain ends and the path begins.
    td_end: usize,
}

impl SpiffeId {
    /// Parses a SPIFFE ID, accepting it only exactly as the rules write it.
    ///
    /// # Errors
    /// Every [`Error`] variant except [`Error::BadKubernetesName`].
    pub fn parse(s: &str) -> Result<Self, Error> {
        if s.is_empty() {
            return Err(Error::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(Error::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(Error::WrongScheme)?;
        let td_len = rest.find('/').unwrap_or(rest.len());
        validate_trust_domain(&rest[..td_len], SCHEME.len())?;
        let td_end = SCHEME.len() + td_len;
        validate_path(&s[td_end..], td_end)?;
        Ok(Self {
            id: s.to_owned(),
            td_end,
        })
    }

    /// The Kubernetes workload identity `spiffe://<td>/ns/<ns>/sa/<sa>`.
    ///
    /// # Errors
    /// [`Error::BadKubernetesName`] if `namespace` or `service_account` is not
    /// a DNS-1123 name (lower case alphanumerics, `-` and `.`, at most 253
    /// bytes, starting and ending alphanumeric), or [`Error::TooLong`].
    pub fn for_service_account(
        td: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, Error> {
        for name in [namespace, service_account] {
            if !is_dns1123_subdomain(name) {
                return Err(Error::BadKubernetesName(name.to_owned()));
            }
        }
        Self::parse(&format!("{SCHEME}{td}/ns/{namespace}/sa/{service_account}"))
    }

    /// The trust domain part.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.id[SCHEME.len()..self.td_end].to_owned())
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[self.td_end..]
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// `(namespace, service account)` when the path is exactly
    /// `/ns/<ns>/sa/<sa>`.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let mut parts = self.path().strip_prefix('/')?.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa)) if parts.next().is_none() => {
                Some((ns, sa))
            }
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

fn validate_trust_domain(td: &str, offset: usize) -> Result<(), Error> {
    if td.is_empty() {
        return Err(Error::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(Error::TrustDomainTooLong);
    }
    match td
        .bytes()
        .position(|b| !matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'))
    {
        Some(i) => Err(Error::BadTrustDomainChar(offset + i)),
        None => Ok(()),
    }
}

fn validate_path(path: &str, offset: usize) -> Result<(), Error> {
    if path.is_empty() {
        return Ok(());
    }
    // The caller split at the first '/', so a non-empty path starts with one.
    let mut start = offset + 1;
    for segment in path[1..].split('/') {
        if segment.is_empty() {
            return Err(if start == offset + path.len() {
                Error::TrailingSlash
            } else {
                Error::EmptySegment
            });
        }
        if segment == "." || segment == ".." {
            return Err(Error::DotSegment);
        }
        if let Some(i) = segment
            .bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')))
        {
            return Err(Error::BadPathChar(start + i));
        }
        start += segment.len() + 1;
    }
    Ok(())
}

fn is_dns1123_subdomain(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 253
        && bytes
            .iter()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.'))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// The round-trip property the fuzz target asserts, shared with the unit
/// tests so both check the same thing: any input that parses formats back to
/// itself and re-parses to an equal value, and its trust domain parses too.
///
/// # Panics
/// When the property does not hold (that is the point).
#[doc(hidden)]
pub fn check_roundtrip(input: &str) {
    if let Ok(id) = SpiffeId::parse(input) {
        assert_eq!(id.to_string(), input);
        assert_eq!(SpiffeId::parse(id.as_str()).as_ref(), Ok(&id));
        let td = id.trust_domain();
        assert_eq!(TrustDomain::new(td.as_str()).as_ref(), Ok(&td));
        assert_eq!(format!("{}{}", td.id(), id.path()), input);
    }
    if let Ok(td) = TrustDomain::new(input) {
        assert_eq!(td.as_str(), input);
        assert_eq!(
            SpiffeId::parse(td.id().as_str()).map(|i| i.trust_domain()),
            Ok(td)
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_error_has_its_own_listed_label() {
        let all = [
            Error::Empty,
            Error::WrongScheme,
            Error::EmptyTrustDomain,
            Error::TrustDomainTooLong,
            Error::BadTrustDomainChar(0),
            Error::TooLong,
            Error::BadPathChar(0),
            Error::EmptySegment,
            Error::DotSegment,
            Error::TrailingSlash,
            Error::BadKubernetesName(String::new()),
        ];
        let labels: std::collections::BTreeSet<_> = all.iter().map(Error::metric_label).collect();
        assert_eq!(labels.len(), all.len(), "labels are not distinct");
        assert_eq!(labels, Error::METRIC_LABELS.iter().copied().collect());
    }

    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for ok in [
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/default/sa/web",
            "spiffe://a-b_c.0/x/Y.z-_",
            "spiffe://td/.../a", // three dots is a legal segment
        ] {
            let id = SpiffeId::parse(ok).unwrap();
            assert_eq!(id.as_str(), ok);
        }
    }

    #[test]
    fn each_rule_has_its_error() {
        let long_td = format!("spiffe://{}", "a".repeat(256));
        let long_id = format!("spiffe://td/{}", "a".repeat(2048));
        let cases: Vec<(&str, Error)> = vec![
            ("", Error::Empty),
            ("http://td/a", Error::WrongScheme),
            ("SPIFFE://td/a", Error::WrongScheme),
            ("spiffe:/td/a", Error::WrongScheme),
            ("spiffe:///a", Error::EmptyTrustDomain),
            ("spiffe://", Error::EmptyTrustDomain),
            (&long_td, Error::TrustDomainTooLong),
            ("spiffe://Td/a", Error::BadTrustDomainChar(9)),
            ("spiffe://td:8080/a", Error::BadTrustDomainChar(11)),
            ("spiffe://user@td/a", Error::BadTrustDomainChar(13)),
            ("spiffe://t%41d/a", Error::BadTrustDomainChar(10)),
            (&long_id, Error::TooLong),
            ("spiffe://td/a/", Error::TrailingSlash),
            ("spiffe://td/", Error::TrailingSlash),
            ("spiffe://td//a", Error::EmptySegment),
            ("spiffe://td/a/./b", Error::DotSegment),
            ("spiffe://td/..", Error::DotSegment),
            ("spiffe://td/a?x=1", Error::BadPathChar(13)),
            ("spiffe://td/a#frag", Error::BadPathChar(13)),
            ("spiffe://td/a%20b", Error::BadPathChar(13)),
            ("spiffe://td/é", Error::BadPathChar(12)),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input), Err(want), "{input:?}");
        }
    }

    #[test]
    fn length_limits_are_inclusive() {
        let td = "a".repeat(MAX_TRUST_DOMAIN_LEN);
        assert!(TrustDomain::new(&td).is_ok());
        let path = "b".repeat(MAX_SPIFFE_ID_LEN - "spiffe://td/".len());
        assert!(SpiffeId::parse(&format!("spiffe://td/{path}")).is_ok());
    }

    #[test]
    fn parts_and_service_account() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/prod/sa/web").unwrap();
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.path(), "/ns/prod/sa/web");
        assert_eq!(id.service_account(), Some(("prod", "web")));
        for other in [
            "spiffe://td",
            "spiffe://td/ns/prod",
            "spiffe://td/ns/prod/sa/web/extra",
            "spiffe://td/x/prod/sa/web",
        ] {
            assert_eq!(
                SpiffeId::parse(other).unwrap().service_account(),
                None,
                "{other}"
            );
        }
        let td = TrustDomain::new("cluster.local").unwrap();
        assert_eq!(td.id().as_str(), "spiffe://cluster.local");
        assert_eq!(td.id().path(), "");
    }

    #[test]
    fn service_account_ids_use_kubernetes_names() {
        let td = TrustDomain::new("td").unwrap();
        let id = SpiffeId::for_service_account(&td, "prod", "web-1").unwrap();
        assert_eq!(id.as_str(), "spiffe://td/ns/prod/sa/web-1");
        for (ns, sa) in [
            ("", "a"),
            ("Prod", "a"),
            ("a", "b_c"),
            ("-a", "b"),
            ("a", "b/c"),
        ] {
            assert!(
                matches!(
                    SpiffeId::for_service_account(&td, ns, sa),
                    Err(Error::BadKubernetesName(_))
                ),
                "{ns}/{sa}"
            );
        }
    }

    #[test]
    fn trust_domain_rules() {
        assert!(TrustDomain::new("example.org").is_ok());
        assert_eq!(TrustDomain::new(""), Err(Error::EmptyTrustDomain));
        assert_eq!(TrustDomain::new("a/b"), Err(Error::BadTrustDomainChar(1)));
        assert_eq!(
            TrustDomain::new("EXAMPLE"),
            Err(Error::BadTrustDomainChar(0))
        );
        assert_eq!("td".parse::<TrustDomain>().unwrap().to_string(), "td");
    }

    #[test]
    fn roundtrip_property_on_generated_inputs() {
        // A deterministic spread of near-valid inputs, the same property the
        // fuzz target checks on arbitrary bytes.
        let alphabet = [
            "a", "Z", "0", ".", "-", "_", "/", "%", ":", "@", "?", "é", "..",
        ];
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            let mut s = String::from("spiffe://");
            for _ in 0..(state % 12) {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                s.push_str(alphabet[(state >> 33) as usize % alphabet.len()]);
            }
            check_roundtrip(&s);
            check_roundtrip(&s["spiffe://".len()..]);
        }
    }
}
