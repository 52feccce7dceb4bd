//! The vocabulary of the SDS streams property (`sds.rs`): the
//! certificates and bundles drawn from, the names, nonces and events, and
//! the independent checks of what was sent.

use rcgen::string::Ia5String;
use rcgen::{CertificateParams, KeyPair, PublicKeyData, SanType};
use workload_ca::agent::sds_state::Refusal;
use workload_ca::identity::SpiffeId;
use workload_ca::proto::envoy::config::core::v3::{DataSource, data_source};
use workload_ca::proto::google::rpc::Status as RpcStatus;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

pub const TRUST_DOMAIN: &str = "fuzz.test";
/// The workload's identity (certificates 0 to 2 of the pool).
pub const OWN: &str = "spiffe://fuzz.test/ns/app/sa/web";
/// Another identity (certificate 3 of the pool: the workload changed).
pub const OTHER: &str = "spiffe://fuzz.test/ns/app/sa/db";
/// The most names a stream may name.
pub const MAX_NAMES: usize = 6;
/// The most streams open at once.
pub const MAX_STREAMS: usize = 6;

/// A certificate as the agent holds it.
pub struct Issued {
    pub identity: SpiffeId,
    pub version: String,
    pub chain_pem: String,
    pub key_pem: String,
}

/// Certificates and bundles to draw from (made once).
pub struct Pool {
    pub certs: Vec<Issued>,
    pub bundles: Vec<String>,
}

impl Pool {
    /// # Panics
    /// When a certificate cannot be made.
    pub fn generate() -> Self {
        let issue = |id: &str, n: usize| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(id).unwrap())];
            let cert = params.self_signed(&key).unwrap();
            Issued {
                identity: SpiffeId::parse(id).unwrap(),
                version: format!("serial-{n}"),
                chain_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            }
        };
        let certs = vec![issue(OWN, 0), issue(OWN, 1), issue(OWN, 2), issue(OTHER, 3)];
        let bundles = (0..3).map(|i| format!("bundle {i}\n")).collect();
        Self { certs, bundles }
    }
}

/// A name a request may carry.
#[derive(Clone, Debug)]
pub enum Name {
    Default,
    RootCa,
    Own,
    TrustDomain,
    Other,
    OtherDomain,
    /// Near misses of served names.
    Near(u8),
    Garbage(String),
}

impl Name {
    pub fn text(&self) -> String {
        match self {
            Self::Default => "default".into(),
            Self::RootCa => "ROOTCA".into(),
            Self::Own => OWN.into(),
            Self::TrustDomain => format!("spiffe://{TRUST_DOMAIN}"),
            Self::Other => OTHER.into(),
            Self::OtherDomain => "spiffe://other.test".into(),
            Self::Near(i) => match i % 6 {
                0 => "Default".into(),
                1 => "rootca".into(),
                2 => format!("{OWN}/"),
                3 => format!("spiffe://{TRUST_DOMAIN}/"),
                4 => "spiffe://".into(),
                _ => "".into(),
            },
            Self::Garbage(s) => s.clone(),
        }
    }
}

/// The nonce a request carries.
#[derive(Clone, Debug)]
pub enum NonceSel {
    Empty,
    /// The last one this stream received.
    Last,
    /// One sent earlier, on any stream.
    Earlier(u8),
    Garbage(String),
}

/// A version the delta client claims to hold.
#[derive(Clone, Debug)]
pub enum VersionSel {
    /// The resource's current version.
    Current,
    /// Certificate `i`'s version.
    Cert(u8),
    Garbage(String),
}

/// One thing that happens.
#[derive(Clone, Debug)]
pub enum Event {
    /// A new stream (delta if true).
    Open(bool),
    /// A request on SotW stream `stream` (modulo those open; one is opened
    /// if there is none).
    Sotw {
        stream: u8,
        names: Vec<Name>,
        nonce: NonceSel,
        nack: bool,
        wrong_type: bool,
    },
    /// A request on delta stream `stream`; `initial` only counts on the
    /// stream's first request.
    Delta {
        stream: u8,
        subscribe: Vec<Name>,
        unsubscribe: Vec<Name>,
        initial: Vec<(Name, VersionSel)>,
        nonce: NonceSel,
        nack: bool,
    },
    /// The certificate becomes pool certificate `i`.
    Rotate(u8),
    /// The certificate expires (until the next rotation).
    Expire,
    /// The bundle becomes pool bundle `i`, with or without a generation.
    Bundle(u8, bool),
}

/// What one event made the streams do, for tests to look at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Per response: `(name, carried a private key)` of each resource.
    pub sent: Vec<Vec<(String, bool)>>,
    /// Streams ended, with why.
    pub ended: Vec<Refusal>,
    /// Bundle generations reported ACKed.
    pub acked: Vec<u64>,
}

pub fn inline(d: &Option<DataSource>) -> Option<&[u8]> {
    match d.as_ref()?.specifier.as_ref()? {
        data_source::Specifier::InlineBytes(b) => Some(b),
        _ => None,
    }
}

pub fn is_bundle(name: &str) -> bool {
    name == "ROOTCA"
        || name
            .strip_prefix("spiffe://")
            .is_some_and(|td| !td.is_empty() && !td.contains('/'))
}

pub fn req_nack(nack: bool) -> Option<RpcStatus> {
    nack.then(|| RpcStatus {
        code: 13,
        message: "rejected".into(),
        details: vec![],
    })
}

/// The key's public half is the chain's leaf's.
pub fn check_key_matches_leaf(chain: &[u8], key: &[u8], name: &str) -> Result<(), String> {
    let chain = std::str::from_utf8(chain).map_err(|e| e.to_string())?;
    let leaf = pem::parse_many(chain)
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .ok_or("an empty chain")?;
    let (_, cert) = X509Certificate::from_der(leaf.contents()).map_err(|e| e.to_string())?;
    let key = KeyPair::from_pem(std::str::from_utf8(key).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    if cert.tbs_certificate.subject_pki.raw != key.subject_public_key_info().as_slice() {
        return Err(format!("{name}: the key is not the leaf's"));
    }
    // A SPIFFE ID name gets its own certificate only.
    if name.starts_with("spiffe://") {
        let uris: Vec<&str> = cert
            .extensions()
            .iter()
            .filter_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => Some(&san.general_names),
                _ => None,
            })
            .flatten()
            .filter_map(|g| match g {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect();
        if uris != [name] {
            return Err(format!("{name}: sent a certificate for {uris:?}"));
        }
    }
    Ok(())
}
