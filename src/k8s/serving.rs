//! TLS serving certificates in `kubernetes.io/tls` Secrets, for components
//! that present our chain but do not ask for it: istiod, when this CA takes
//! over an Istio install's CA (`ENABLE_CA_SERVER=false` leaves istiod
//! without a certificate of its own; it reads `--tlsCertFile`,
//! `--tlsKeyFile` and `--caCertFile` from a mounted Secret instead).
//!
//! For each `--serving-secret NAMESPACE/NAME=DNS[,DNS...]`, the leader keeps
//! the Secret holding:
//! - `tls.key`: a P-256 key the CA generates (never logged, never kept in
//!   memory beyond one write);
//! - `tls.crt`: a server certificate for exactly those DNS names, signed by
//!   the active authority, then its intermediates (no root);
//! - `ca.crt`: the whole current trust bundle.
//!
//! It is rewritten when it is missing, malformed or edited (key and
//! certificate not a pair, other names), past half its life, not from the
//! active authority, or holding another bundle: so a root rotation reaches
//! it before activation and after, and its [`Copies`] (one Secret) hold
//! both gates until it does. A Secret of that name not labelled as ours is
//! never touched; it holds the gates instead, since nobody keeps it current.
//!
//! The Secret is read every [`RESYNC`] and at every change of the authority
//! set or of leadership: one GET per 10 s, off the hot path.

use crate::sync::LockExt;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams, Preconditions};
use tokio::sync::watch;

use super::Error;
use super::secrets::{MANAGED_BY as MANAGED_BY_LABEL, MANAGER as MANAGED_BY};
use crate::ca::bundle::{parse_pem_certs, verify_path};
use crate::ca::issue::Controller;
use crate::ca::rotation::{Copies, CopyCounter};
use crate::ca::{AuthoritySet, KeyAlgorithm, LeafIssuer, PrivateKey};
use crate::drain::Tasks;

/// How often the Secret is read when nothing else happens.
pub const RESYNC: Duration = Duration::from_secs(10);
/// The Secret's type.
pub const TLS_TYPE: &str = "kubernetes.io/tls";
/// Renewed after this fraction of the certificate's life.
pub const REFRESH_FRACTION: f64 = 0.5;

/// One `--serving-secret`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServingSecret {
    /// The Secret's namespace.
    pub namespace: String,
    /// The Secret's name.
    pub name: String,
    /// The DNS names the certificate covers.
    pub dns_names: Vec<String>,
}

impl FromStr for ServingSecret {
    type Err = String;

    /// `NAMESPACE/NAME=DNS[,DNS...]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let form = || format!("{s:?} is not NAMESPACE/NAME=DNS[,DNS...]");
        let (secret, names) = s.split_once('=').ok_or_else(form)?;
        let (namespace, name) = secret.split_once('/').ok_or_else(form)?;
        let dns_names: Vec<String> = names
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        let label = |x: &str| {
            !x.is_empty()
                && x.len() <= 253
                && x.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        if !label(namespace) || !label(name) || dns_names.is_empty() {
            return Err(form());
        }
        if let Some(bad) = dns_names.iter().find(|n| !label(n)) {
            return Err(format!("{s:?}: {bad:?} is not a DNS name"));
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            dns_names,
        })
    }
}

impl ServingSecret {
    fn kind(&self) -> String {
        format!("Secret {}/{}", self.namespace, self.name)
    }
}

/// What a Secret read holds, for the set in use.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// As it should be.
    Current,
    /// Ours, to be rewritten (why).
    Stale(&'static str),
    /// Absent: to be created.
    Missing,
    /// Not ours: left alone.
    Foreign,
}

fn text<'a>(s: &'a Secret, key: &str) -> Option<&'a str> {
    s.data
        .as_ref()?
        .get(key)
        .and_then(|b| std::str::from_utf8(&b.0).ok())
}

/// Judges `secret` against `set` at `now`.
fn judge(
    spec: &ServingSecret,
    secret: Option<&Secret>,
    set: &AuthoritySet,
    now: SystemTime,
) -> Verdict {
    let Some(secret) = secret else {
        return Verdict::Missing;
    };
    let ours = secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY);
    if !ours {
        return Verdict::Foreign;
    }
    if secret.type_.as_deref() != Some(TLS_TYPE) {
        return Verdict::Stale("wrong type");
    }
    let (Some(crt), Some(key), Some(ca)) = (
        text(secret, "tls.crt"),
        text(secret, "tls.key"),
        text(secret, "ca.crt"),
    ) else {
        return Verdict::Stale("data missing");
    };
    if ca != set.bundle_pem() {
        return Verdict::Stale("another bundle");
    }
    let Ok(certs) = parse_pem_certs(crt) else {
        return Verdict::Stale("tls.crt malformed");
    };
    let Some(leaf) = certs.first() else {
        return Verdict::Stale("tls.crt empty");
    };
    let Ok(parsed) = leaf.parsed() else {
        return Verdict::Stale("tls.crt malformed");
    };
    // Signed by the active authority, through the intermediates given.
    let intermediates: Vec<Vec<u8>> = certs.iter().skip(1).map(|c| c.der().to_vec()).collect();
    if verify_path(
        leaf.der(),
        &intermediates,
        &[set.active().signer().der()],
        now,
        webpki::KeyUsage::server_auth(),
    )
    .is_err()
    {
        return Verdict::Stale("not from the active authority, or expired");
    }
    let Ok(private) = PrivateKey::from_pem(key) else {
        return Verdict::Stale("tls.key malformed");
    };
    if private.spki_der() != parsed.public_key().raw {
        return Verdict::Stale("key and certificate are not a pair");
    }
    let mut names: Vec<String> = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let mut wanted = spec.dns_names.clone();
    names.sort();
    wanted.sort();
    if names != wanted {
        return Verdict::Stale("other DNS names");
    }
    let from = crate::ca::bundle::time_from_unix(parsed.validity().not_before.timestamp());
    let until = crate::ca::bundle::not_after(&parsed);
    let refresh = until
        .duration_since(from)
        .map(|life| from + life.mul_f64(REFRESH_FRACTION))
        .unwrap_or(from);
    if now >= refresh {
        return Verdict::Stale("past half its life");
    }
    Verdict::Current
}

/// What the counter reports.
#[derive(Default)]
struct State {
    writer: bool,
    generation: u64,
    current: bool,
    settled_since: Option<SystemTime>,
}

/// The controller for `spec`: only while `leader` says so it writes.
pub fn controller(
    client: Client,
    spec: ServingSecret,
    leader: watch::Receiver<bool>,
    ttl: Duration,
    propagation: Duration,
) -> Controller {
    Box::new(move |issuer: Arc<dyn LeafIssuer>, tasks: &mut Tasks| {
        let state = Arc::new(Mutex::new(State::default()));
        let kind = spec.kind();
        let counter: CopyCounter = {
            let state = state.clone();
            Arc::new(move |_now| {
                let s = state.locked();
                if !s.writer {
                    return Copies::not_writing(&kind);
                }
                Copies {
                    kind: kind.clone(),
                    writer: true,
                    generation: s.generation,
                    total: 1,
                    current: usize::from(s.current),
                    settled_since: s.settled_since,
                    propagation,
                    behind: if s.current {
                        Vec::new()
                    } else {
                        vec![kind.clone()]
                    },
                }
            })
        };
        let task = tokio::spawn(run(
            client,
            spec,
            issuer,
            leader,
            ttl,
            state,
            tasks.signal(),
        ));
        tasks.adopt("serving-secret", task);
        vec![counter]
    })
}

async fn run(
    client: Client,
    spec: ServingSecret,
    issuer: Arc<dyn LeafIssuer>,
    mut leader: watch::Receiver<bool>,
    ttl: Duration,
    state: Arc<Mutex<State>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Secret> = Api::namespaced(client, &spec.namespace);
    let mut authorities = issuer.authorities();
    loop {
        let leading = *leader.borrow_and_update();
        let set = authorities.borrow_and_update().clone();
        if leading {
            let current = match reconcile(&api, &spec, issuer.as_ref(), &set, ttl).await {
                Ok(current) => current,
                Err(e) => {
                    tracing::warn!(secret = %spec.kind(), error = %e, "keeping the serving Secret failed; retrying");
                    false
                }
            };
            let mut s = state.locked();
            let was = s.writer && s.current && s.generation == set.generation();
            s.writer = true;
            s.current = current;
            s.generation = set.generation();
            if !current {
                s.settled_since = None;
            } else if !was {
                s.settled_since = Some(SystemTime::now());
            }
        } else {
            *state.locked() = State::default();
        }
        tokio::select! {
            _ = tokio::time::sleep(RESYNC) => {}
            r = authorities.changed() => if r.is_err() { return },
            r = leader.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

/// Reads the Secret and writes it when it is ours and not current (or
/// missing). Whether it is current afterwards.
async fn reconcile(
    api: &Api<Secret>,
    spec: &ServingSecret,
    issuer: &dyn LeafIssuer,
    set: &AuthoritySet,
    ttl: Duration,
) -> Result<bool, Error> {
    let found = api
        .get_opt(&spec.name)
        .await
        .map_err(|e| Error::api(format!("reading {}", spec.kind()), e))?;
    let now = SystemTime::now();
    let why = match judge(spec, found.as_ref(), set, now) {
        Verdict::Current => return Ok(true),
        Verdict::Foreign => {
            tracing::warn!(secret = %spec.kind(), "the serving Secret exists and is not managed by workload-ca; left alone (rotation gates wait for it)");
            return Ok(false);
        }
        Verdict::Missing => "missing",
        Verdict::Stale(why) => why,
    };
    // A Secret's type cannot change: ours of another type is deleted (only
    // that very object, as read) and created again.
    let found = match found {
        Some(old) if old.type_.as_deref() != Some(TLS_TYPE) => {
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: old.metadata.uid.clone(),
                    resource_version: old.metadata.resource_version.clone(),
                }),
                ..DeleteParams::default()
            };
            api.delete(&spec.name, &dp)
                .await
                .map_err(|e| Error::api(format!("deleting {} (wrong type)", spec.kind()), e))?;
            tracing::info!(secret = %spec.kind(), "deleted the serving Secret of the wrong type, to create it again");
            None
        }
        other => other,
    };
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
    let leaf = issuer.issue_serving(&key, &spec.dns_names, ttl, now, "serving-secret")?;
    let chain = &leaf.issued.chain;
    let crt: String = chain
        .split_last()
        .map(|(_, r)| r)
        .unwrap_or_default()
        .concat();
    let data: BTreeMap<String, ByteString> = [
        ("tls.crt", crt.into_bytes()),
        ("tls.key", key.to_pem().as_bytes().to_vec()),
        ("ca.crt", set.bundle_pem().as_bytes().to_vec()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v)))
    .collect();
    let labels = BTreeMap::from([(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned())]);
    let written = match found {
        None => {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(spec.name.clone()),
                    namespace: Some(spec.namespace.clone()),
                    labels: Some(labels),
                    ..ObjectMeta::default()
                },
                type_: Some(TLS_TYPE.to_owned()),
                data: Some(data),
                ..Secret::default()
            };
            api.create(&PostParams::default(), &secret).await
        }
        Some(mut secret) => {
            // The resourceVersion read stays: a concurrent edit makes this
            // a conflict, and the next round judges again.
            secret.data = Some(data);
            secret.string_data = None;
            secret.type_ = Some(TLS_TYPE.to_owned());
            secret.metadata.managed_fields = None;
            api.replace(&spec.name, &PostParams::default(), &secret)
                .await
        }
    };
    written.map_err(|e| Error::api(format!("writing {}", spec.kind()), e))?;
    tracing::info!(secret = %spec.kind(), why, "serving Secret written");
    Ok(true)
}

#[cfg(test)]
#[path = "serving_tests.rs"]
mod tests;
