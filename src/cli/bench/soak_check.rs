//! What `ca bench soak` checks in every certificate it gets, the CA's trust
//! bundle it checks them against, and where it counts what went wrong.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use prost::Message;

use crate::proto::envoy::config::core::v3::data_source::Specifier;
use crate::proto::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use crate::proto::envoy::service::discovery::v3::DiscoveryResponse;

/// How many errors are kept in full for the report.
const EXAMPLES: usize = 10;

/// Every error of the run by kind, the first few with their detail.
#[derive(Default)]
pub(super) struct Errors {
    inner: Mutex<(BTreeMap<String, u64>, Vec<String>)>,
}

impl Errors {
    /// Counts one error of `kind`; `detail` is kept for the first few.
    pub(super) fn add(&self, kind: &str, detail: impl FnOnce() -> String) {
        if let Ok(mut g) = self.inner.lock() {
            *g.0.entry(kind.to_owned()).or_default() += 1;
            if g.1.len() < EXAMPLES {
                let d = detail();
                g.1.push(format!("{kind}: {d}"));
            }
        }
    }

    /// The counts by kind and the examples.
    pub(super) fn snapshot(&self) -> (BTreeMap<String, u64>, Vec<String>) {
        self.inner
            .lock()
            .map(|g| (g.0.clone(), g.1.clone()))
            .unwrap_or_default()
    }

    /// Errors so far.
    pub(super) fn total(&self) -> u64 {
        self.inner.lock().map(|g| g.0.values().sum()).unwrap_or(0)
    }
}

/// How long a read of the bundle file is used before it is read again.
const ROOTS_FRESH: Duration = Duration::from_secs(1);

/// The CA's trust bundle (its `root-cert.pem`, rewritten at each rotation
/// step), and the roots a completed rotation retired.
pub(super) struct Roots {
    path: PathBuf,
    cache: Mutex<(Instant, Vec<Vec<u8>>)>,
    retired: Mutex<Vec<Vec<u8>>>,
}

impl Roots {
    /// Reads the bundle at `path`.
    pub(super) fn new(path: PathBuf) -> Self {
        let now = read_roots(&path);
        Self {
            path,
            cache: Mutex::new((Instant::now(), now)),
            retired: Mutex::new(Vec::new()),
        }
    }

    /// The bundle's roots (DER): the last read unless it is older than a
    /// second or `fresh` is asked.
    pub(super) fn current(&self, fresh: bool) -> Vec<Vec<u8>> {
        let Ok(mut g) = self.cache.lock() else {
            return read_roots(&self.path);
        };
        if fresh || g.0.elapsed() > ROOTS_FRESH {
            *g = (Instant::now(), read_roots(&self.path));
        }
        g.1.clone()
    }

    /// From now on, `old` roots must sign nothing that is checked.
    pub(super) fn retire(&self, old: Vec<Vec<u8>>) {
        if let Ok(mut g) = self.retired.lock() {
            *g = old;
        }
    }

    /// `verify` must pass with the bundle's roots as anchors (once more on
    /// a fresh read when it fails: the bundle may just have changed) and
    /// fail with each retired root alone.
    pub(super) fn check(
        &self,
        verify: impl Fn(&[&[u8]]) -> Result<(), String>,
    ) -> Result<(), String> {
        let roots = self.current(false);
        let anchors: Vec<&[u8]> = roots.iter().map(Vec::as_slice).collect();
        if let Err(first) = verify(&anchors) {
            let roots = self.current(true);
            let anchors: Vec<&[u8]> = roots.iter().map(Vec::as_slice).collect();
            verify(&anchors).map_err(|_| format!("not under the CA's bundle: {first}"))?;
        }
        let retired = self.retired.lock().map(|g| g.clone()).unwrap_or_default();
        for old in &retired {
            if verify(&[old.as_slice()]).is_ok() {
                return Err("chains to the retired root".into());
            }
        }
        Ok(())
    }
}

/// The certificates (DER) in the PEM file at `path`; none when unreadable.
pub(super) fn read_roots(path: &std::path::Path) -> Vec<Vec<u8>> {
    std::fs::read(path)
        .map(|b| pem_ders(&b))
        .unwrap_or_default()
}

/// The certificates (DER) in PEM text.
pub(super) fn pem_ders(pem: &[u8]) -> Vec<Vec<u8>> {
    pem::parse_many(pem)
        .unwrap_or_default()
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect()
}

/// What one SDS response carried (state of the world: every name the
/// stream asked for).
#[derive(Default)]
pub(super) struct Pushed {
    /// `default`'s certificate chain (PEM).
    pub chain: Option<Vec<u8>>,
    /// `ROOTCA`'s trusted CAs (PEM).
    pub roots: Option<Vec<u8>>,
}

/// Decodes the secrets of an SDS response.
///
/// # Errors
/// A resource that is not a secret, or one with no inline data.
pub(super) fn decode(resp: &DiscoveryResponse) -> Result<Pushed, String> {
    let mut out = Pushed::default();
    for any in &resp.resources {
        let s = Secret::decode(any.value.as_slice()).map_err(|e| format!("undecodable: {e}"))?;
        let inline = |d: Option<&crate::proto::envoy::config::core::v3::DataSource>| match d
            .and_then(|d| d.specifier.as_ref())
        {
            Some(Specifier::InlineBytes(b)) => Ok(b.clone()),
            _ => Err(format!("secret {} has no inline bytes", s.name)),
        };
        match &s.r#type {
            Some(secret::Type::TlsCertificate(t)) => {
                out.chain = Some(inline(t.certificate_chain.as_ref())?);
            }
            Some(secret::Type::ValidationContext(v)) => {
                out.roots = Some(inline(v.trusted_ca.as_ref())?);
            }
            _ => return Err(format!("secret {} of an unexpected type", s.name)),
        }
    }
    Ok(out)
}

/// Checks a pushed certificate chain: its leaf names exactly the SPIFFE ID
/// whose path is `path`, is valid now, and path-validates (rustls-webpki,
/// clientAuth) to the `ROOTCA` it came with and to the CA's bundle (and to
/// no retired root). Returns the leaf's NotAfter.
///
/// # Errors
/// What is wrong, as text.
pub(super) fn check_leaf(
    chain_pem: &[u8],
    rootca_pem: &[u8],
    roots: &Roots,
    path: &str,
    now: SystemTime,
) -> Result<SystemTime, String> {
    let ders = pem_ders(chain_pem);
    let (leaf, intermediates) = ders.split_first().ok_or("an empty certificate chain")?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| format!("unparsable leaf: {e}"))?;
    let id = crate::ca::bundle::single_spiffe_id(&cert)?;
    if id.path() != path {
        return Err(format!("names {id}, expected the path {path}"));
    }
    let not_after = crate::ca::bundle::not_after(&cert);
    let verify = |anchors: &[&[u8]]| {
        crate::ca::bundle::verify_path(
            leaf,
            intermediates,
            anchors,
            now,
            webpki::KeyUsage::client_auth(),
        )
    };
    let pushed = pem_ders(rootca_pem);
    let anchors: Vec<&[u8]> = pushed.iter().map(Vec::as_slice).collect();
    verify(&anchors).map_err(|e| format!("not under the ROOTCA pushed with it: {e}"))?;
    roots.check(verify)?;
    Ok(not_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_count_by_kind_and_keep_the_first() {
        let e = Errors::default();
        for i in 0..15 {
            e.add(if i % 2 == 0 { "a" } else { "b" }, || format!("#{i}"));
        }
        let (counts, examples) = e.snapshot();
        assert_eq!(counts.get("a"), Some(&8));
        assert_eq!(counts.get("b"), Some(&7));
        assert_eq!(e.total(), 15);
        assert_eq!(examples.len(), EXAMPLES);
        assert_eq!(examples.first().map(String::as_str), Some("a: #0"));
    }

    #[test]
    fn only_certificates_from_pem() {
        let pem = "-----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n\
                   -----BEGIN PRIVATE KEY-----\nBAUG\n-----END PRIVATE KEY-----\n";
        assert_eq!(pem_ders(pem.as_bytes()), vec![vec![1, 2, 3]]);
        assert!(pem_ders(b"junk").is_empty());
    }
}
