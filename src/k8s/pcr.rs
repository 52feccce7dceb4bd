//! A signer of PodCertificateRequests (KEP-4317): pods that mount a
//! `podCertificate` volume with our signer name get a SPIFFE X.509 leaf,
//! `spiffe://<td>/ns/<ns>/sa/<spec.serviceAccountName>`, from the running CA.
//!
//! **What the API server vouches for.** Node restriction admission lets a
//! kubelet create a request only for a pod on its node, with the pod's own
//! service account; create validation checks the stub PKCS#10 request's
//! signature (or, from kubelets before 1.36, the proof of possession over
//! the pod UID) and the key type. So the identity comes from the spec and
//! possession is not verified again here: it would only repeat the API
//! server's check, at a public-key operation per request. Only the public
//! key is taken from the request (through [`crate::ca::check_public_key`]);
//! the leaf is built from the identity alone (no requested extensions).
//!
//! **Version.** Requests are watched at `v1beta1` while it is served: it
//! is a superset of `v1`, and only it shows the `pkixPublicKey` of legacy
//! requests (a `v1` reader sees such a request without a key); else at `v1`
//! ([`super::discovery::pod_certificate_version`]). The choice is made at
//! start (an upgrade that stops serving `v1beta1` breaks the watch; a
//! restart picks `v1`).
//!
//! **Replicas: leader only.** Only the replica holding the Lease signs and
//! writes statuses. Sharing the work would sign most requests twice (each
//! replica's watch sees every request) and record the lost leaves in the
//! ledger, where they hold rotation gates for their lifetime for nobody.
//! Every replica keeps the watch cache, so a new leader starts at once.
//! Nothing is lost or duplicated across a leader change: every request
//! without a condition is pending on every replica; a status is written
//! with `PUT .../status` carrying the resourceVersion read, so of two
//! writers at most one succeeds (the other gets 409, reads the request
//! again and finds it answered); a request with a condition is never
//! touched; a replica that stops leading stops writing before its next
//! write (writes already sent complete or lose as above).
//!
//! **Throughput.** No QPS throttle anywhere; status writes go through a
//! client of their own with its own cap ([`SignerOptions::max_in_flight`]),
//! so a burst never queues lease renewals (and so leadership) or token
//! checks behind it; signing runs in batches on the blocking pool.
//!
//! **Lifetime.** `min(spec.maxExpirationSeconds, the server's max TTL)`,
//! counted from the leaf's NotBefore (backdated by
//! [`crate::ca::CLOCK_SKEW_BACKDATE`]), cut at the end of the CA's own
//! chain; the API server refuses lifetimes under an hour, so a chain that
//! ends sooner answers `Failed` (`CAChainEndsTooSoon`) without signing.
//! `beginRefreshAt` is at [`crate::ca::ROTATION_FRACTION`] of the lifetime
//! (the node agent's default; the kubelet adds its own jitter).
//!
//! **Chain.** `certificateChain` is the leaf then our intermediates, never
//! a root: the kubelet presents the chain in TLS handshakes and pods get
//! the roots from the ClusterTrustBundle ([`super::trustbundle`]).
//!
//! **Old requests.** A request older than [`SignerOptions::max_age`] is
//! left alone: kube-controller-manager deletes such requests, the kubelet
//! makes a new one, and a leaf signed for it would only hold rotation
//! gates (it is in the ledger) for nobody.

use crate::sync::LockExt;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore, watch};

use super::Error;
use super::cache::{CacheOptions, Change, reflect};
use crate::ca::{CheckedCsr, LeafFor, LeafIssuer, Tracked, TtlPolicy};
use crate::identity::{SpiffeId, TrustDomain};

/// The signer name by default.
pub const DEFAULT_SIGNER_NAME: &str = "workload-ca.io/spiffe";
/// The shortest lifetime the API server accepts.
pub const MIN_LIFETIME: Duration = Duration::from_secs(3600);
/// `beginRefreshAt` is kept this far from both ends (the API server's rule).
const REFRESH_MARGIN: Duration = Duration::from_secs(600);
/// Requests decided and signed per trip to the blocking pool.
const BATCH: usize = 64;
/// How many times a write that lost to a concurrent change is retried.
const CONFLICT_RETRIES: usize = 3;

/// How the signer runs.
#[derive(Clone, Debug)]
pub struct SignerOptions {
    /// The `spec.signerName` this signer answers.
    pub signer_name: String,
    /// The trust domain of the SPIFFE IDs it signs.
    pub trust_domain: TrustDomain,
    /// Status writes in flight at once (on the signer's own client).
    pub max_in_flight: usize,
    /// Requests older than this are left alone.
    pub max_age: Duration,
    /// Where in the lifetime `beginRefreshAt` falls.
    pub refresh_fraction: f64,
    /// How rotations account for the leaves: [`Tracked::RetireOnly`] when
    /// this CA publishes the ClusterTrustBundle pods take their roots from
    /// (its copy counter holds activation), else [`Tracked::Ledger`].
    pub tracked: Tracked,
}

/// A request, as the signer reads it.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// The request's namespace (the pod's).
    pub namespace: String,
    /// The request's name.
    pub name: String,
    /// The request's UID (empty when absent).
    pub uid: String,
    /// The resourceVersion read, sent back with the status write.
    pub resource_version: String,
    /// `spec.signerName`.
    pub signer_name: String,
    /// `spec.serviceAccountName`: the pod's service account.
    pub service_account: String,
    /// `spec.maxExpirationSeconds`, when set.
    pub max_expiration_seconds: Option<i64>,
    /// `spec.stubPKCS10Request` (DER), empty when absent or not base64.
    pub stub_csr: Vec<u8>,
    /// `spec.pkixPublicKey` (DER SPKI), empty when absent or not base64.
    pub pkix_public_key: Vec<u8>,
    /// The keys of `spec.unverifiedUserAnnotations`.
    pub user_annotation_keys: Vec<String>,
    /// `metadata.creationTimestamp`, when set.
    pub created: Option<SystemTime>,
    /// Issued, Denied or Failed already.
    pub answered: bool,
    /// The spec as read, sent back with the status.
    pub spec: Value,
}

/// What to answer.
#[derive(Clone, Debug)]
pub enum Decision {
    /// Sign a leaf for the request's key.
    Issue {
        /// The pod's service-account identity.
        id: SpiffeId,
        /// The request's public key, checked.
        key: CheckedCsr,
        /// The leaf's lifetime.
        ttl: Duration,
    },
    /// Answer `Denied`: the request itself is unacceptable.
    Deny {
        /// The condition's `reason`.
        reason: &'static str,
        /// The condition's `message`.
        message: String,
    },
    /// Answer `Failed`: the request cannot be signed now (no usable key, lifetime).
    Fail {
        /// The condition's `reason`.
        reason: &'static str,
        /// The condition's `message`.
        message: String,
    },
}

/// What the decision needs to know of the CA.
#[derive(Clone, Debug)]
pub struct Context {
    /// Our trust domain.
    pub trust_domain: TrustDomain,
    /// The server's TTL policy.
    pub ttl: TtlPolicy,
    /// The end of the active authority's chain.
    pub chain_not_after: SystemTime,
}

/// The leaf's lifetime for a request (`Err`: a `Failed` reason and
/// message): see the module documentation.
pub fn lifetime(
    max_expiration_seconds: Option<i64>,
    ttl: &TtlPolicy,
    chain_not_after: SystemTime,
    now: SystemTime,
) -> Result<Duration, (&'static str, String)> {
    let asked =
        Duration::from_secs(u64::try_from(max_expiration_seconds.unwrap_or(86_400)).unwrap_or(0));
    let want = asked.min(ttl.max_ttl);
    let not_before = now
        .checked_sub(crate::ca::CLOCK_SKEW_BACKDATE)
        .unwrap_or(now);
    let end = (not_before + want).min(chain_not_after);
    let got = end.duration_since(not_before).unwrap_or(Duration::ZERO);
    if got < MIN_LIFETIME {
        return Err((
            "CAChainEndsTooSoon",
            format!(
                "the CA's chain ends in {} s: a certificate would live {} s, less than the hour the API server requires",
                chain_not_after
                    .duration_since(now)
                    .unwrap_or(Duration::ZERO)
                    .as_secs(),
                got.as_secs()
            ),
        ));
    }
    // The signer counts the lifetime from `now`; the leaf's NotBefore is
    // backdated, so ask for that much less.
    Ok(got.saturating_sub(now.duration_since(not_before).unwrap_or(Duration::ZERO)))
}

/// When the kubelet should start refreshing: `fraction` of the way from
/// `not_before` to `not_after`, at least ten minutes from either end.
pub fn begin_refresh_at(
    not_before: SystemTime,
    not_after: SystemTime,
    fraction: f64,
) -> SystemTime {
    let life = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let at = not_before + life.mul_f64(fraction.clamp(0.0, 1.0));
    let earliest = not_before + REFRESH_MARGIN;
    let latest = not_after.checked_sub(REFRESH_MARGIN).unwrap_or(not_before);
    at.max(earliest).min(latest)
}

/// The subject public key a request is for.
fn public_key(req: &Request) -> Result<Vec<u8>, String> {
    use x509_parser::prelude::FromDer as _;
    if !req.stub_csr.is_empty() {
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&req.stub_csr)
                .map_err(|e| format!("the stub PKCS#10 request does not parse: {e}"))?;
        return Ok(csr.certification_request_info.subject_pki.raw.to_vec());
    }
    if !req.pkix_public_key.is_empty() {
        return Ok(req.pkix_public_key.clone());
    }
    Err("the request carries no public key (stubPKCS10Request and pkixPublicKey are empty)".into())
}

/// The answer to `req` (pure: no signing).
pub fn decide(req: &Request, ctx: &Context, now: SystemTime) -> Decision {
    // We know no user annotation: deny any (the API's advice to signers).
    if let Some(k) = req.user_annotation_keys.first() {
        return Decision::Deny {
            reason: "InvalidUnverifiedUserAnnotations",
            message: format!(
                "this signer knows no unverifiedUserAnnotations; got {:?}",
                crate::logsafe::peer(k)
            ),
        };
    }
    let spki = match public_key(req) {
        Ok(k) => k,
        Err(why) => {
            return Decision::Fail {
                reason: "NoPublicKey",
                message: why,
            };
        }
    };
    let key = match crate::ca::check_public_key(&spki) {
        Ok(k) => k,
        Err(e) => {
            return Decision::Deny {
                reason: "UnsupportedKeyType",
                message: format!(
                    "{e}; use keyType ECDSAP256, ECDSAP384, ED25519, RSA3072 or RSA4096"
                ),
            };
        }
    };
    let id = match SpiffeId::for_service_account(
        &ctx.trust_domain,
        &req.namespace,
        &req.service_account,
    ) {
        Ok(id) => id,
        Err(e) => {
            return Decision::Deny {
                reason: "InvalidIdentity",
                message: format!("no SPIFFE ID for this service account: {e}"),
            };
        }
    };
    match lifetime(
        req.max_expiration_seconds,
        &ctx.ttl,
        ctx.chain_not_after,
        now,
    ) {
        Ok(ttl) => Decision::Issue { id, key, ttl },
        Err((reason, message)) => Decision::Fail { reason, message },
    }
}

fn b64_field(spec: &Value, f: &str) -> Vec<u8> {
    spec.get(f)
        .and_then(Value::as_str)
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .unwrap_or_default()
}

/// RFC 3339, whole seconds, UTC (metav1.Time).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(0))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// A request from a watched object.
pub fn request_of(o: DynamicObject) -> Option<Request> {
    let meta = o.metadata;
    let spec = o.data.get("spec").cloned().unwrap_or(Value::Null);
    let answered = o
        .data
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                matches!(
                    c.get("type").and_then(Value::as_str),
                    Some("Issued" | "Denied" | "Failed")
                )
            })
        });
    let s = |f: &str| {
        spec.get(f)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    Some(Request {
        namespace: meta.namespace?,
        name: meta.name?,
        uid: meta.uid.unwrap_or_default(),
        resource_version: meta.resource_version.unwrap_or_default(),
        signer_name: s("signerName"),
        service_account: s("serviceAccountName"),
        max_expiration_seconds: spec.get("maxExpirationSeconds").and_then(Value::as_i64),
        stub_csr: b64_field(&spec, "stubPKCS10Request"),
        pkix_public_key: b64_field(&spec, "pkixPublicKey"),
        user_annotation_keys: spec
            .get("unverifiedUserAnnotations")
            .and_then(Value::as_object)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default(),
        created: meta.creation_timestamp.map(|t| {
            SystemTime::UNIX_EPOCH
                + Duration::from_secs(u64::try_from(t.0.as_second()).unwrap_or(0))
        }),
        answered,
        spec,
    })
}

fn condition(ty: &str, reason: &str, message: &str, now: SystemTime) -> Value {
    json!({
        "type": ty, "status": "True", "reason": reason,
        "message": message, "lastTransitionTime": rfc3339(now),
    })
}

/// The status of an issued leaf.
fn issued_status(
    leaf: &LeafFor,
    id: &SpiffeId,
    fraction: f64,
    now: SystemTime,
) -> Result<Value, String> {
    use x509_parser::prelude::FromDer as _;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&leaf.issued.leaf_der)
        .map_err(|e| format!("our own leaf does not parse: {e}"))?;
    let secs = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    let nb = secs(cert.validity().not_before.timestamp());
    let na = secs(cert.validity().not_after.timestamp());
    let chain = &leaf.issued.chain;
    // Leaf and intermediates; the last element is the root bundle.
    let without_roots = chain.get(..chain.len().saturating_sub(1)).unwrap_or(&[]);
    Ok(json!({
        "conditions": [condition("Issued", "Issued", &format!("issued {id} (serial {})", leaf.issued.serial_hex), now)],
        "certificateChain": without_roots.concat(),
        "notBefore": rfc3339(nb),
        "notAfter": rfc3339(na),
        "beginRefreshAt": rfc3339(begin_refresh_at(nb, na, fraction)),
    }))
}

/// Requests without an answer, as the watch cache sees them.
#[derive(Default)]
struct Queue {
    inner: Mutex<QueueInner>,
    notify: Notify,
}

#[derive(Default)]
struct QueueInner {
    pending: HashMap<(String, String), Request>,
    working: HashSet<(String, String)>,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueInner> {
        self.inner.locked()
    }

    fn apply(&self, signer: &str, change: Change<Request>) {
        let mut q = self.lock();
        let key = |r: &Request| (r.namespace.clone(), r.name.clone());
        match change {
            Change::Reset(rows) => {
                let working = std::mem::take(&mut q.working);
                q.pending = rows
                    .into_iter()
                    .filter(|r| r.signer_name == signer && !r.answered)
                    .map(|r| (key(&r), r))
                    .filter(|(k, _)| !working.contains(k))
                    .collect();
                q.working = working;
            }
            Change::Upsert(r) => {
                let k = key(&r);
                if r.answered || r.signer_name != signer {
                    q.pending.remove(&k);
                } else if !q.working.contains(&k) {
                    q.pending.insert(k, r);
                }
            }
            Change::Delete { namespace, name } => {
                q.pending.remove(&(namespace, name));
            }
            Change::Fresh(_) => return,
        }
        drop(q);
        self.notify.notify_one();
    }

    /// Up to `n` pending requests, oldest first, now being worked on.
    fn take(&self, n: usize) -> Vec<Request> {
        let mut q = self.lock();
        let mut keys: Vec<_> = q
            .pending
            .iter()
            .map(|(k, r)| (r.created, k.clone()))
            .collect();
        keys.sort();
        keys.truncate(n);
        let mut out = Vec::with_capacity(keys.len());
        for (_, k) in keys {
            if let Some(r) = q.pending.remove(&k) {
                q.working.insert(k);
                out.push(r);
            }
        }
        out
    }

    /// Done with `r`: answered (or gone), or put back to be taken again.
    fn finish(&self, r: Request, again: bool) {
        let mut q = self.lock();
        let k = (r.namespace.clone(), r.name.clone());
        q.working.remove(&k);
        if again {
            q.pending.insert(k, r);
            drop(q);
            self.notify.notify_one();
        }
    }
}

/// The signer's moving parts, shared by its tasks.
struct Signer {
    opts: SignerOptions,
    api: ApiResource,
    client: kube::Client,
    issuer: Arc<dyn LeafIssuer>,
    queue: Queue,
    metrics: Metrics,
    leader: watch::Receiver<bool>,
    writes: Arc<Semaphore>,
}

/// Starts the signer: discovery, then the watch cache (every replica) and
/// the dispatcher (while leading), until `shutdown`.
pub fn spawn(
    client: kube::Client,
    opts: SignerOptions,
    issuer: Arc<dyn LeafIssuer>,
    leader: watch::Receiver<bool>,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(version) = discover(&client, shutdown.clone()).await else {
            return;
        };
        tracing::info!(signer = %opts.signer_name, version, "signing PodCertificateRequests");
        let api = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(
                super::discovery::CERTIFICATES,
                version,
                "PodCertificateRequest",
            ),
            "podcertificaterequests",
        );
        let signer = Arc::new(Signer {
            writes: Arc::new(Semaphore::new(opts.max_in_flight.max(1))),
            opts,
            api,
            client,
            issuer,
            queue: Queue::default(),
            metrics,
            leader,
        });
        let cache = {
            let s = signer.clone();
            let api: Api<DynamicObject> = Api::all_with(s.client.clone(), &s.api);
            let fields = format!("spec.signerName={}", s.opts.signer_name);
            let opts = CacheOptions {
                fields: Some(fields),
                ..CacheOptions::default()
            };
            tokio::spawn(reflect(
                api,
                "PodCertificateRequest",
                opts,
                shutdown.clone(),
                request_of,
                move |c| s.queue.apply(&s.opts.signer_name, c),
            ))
        };
        signer.dispatch(shutdown).await;
        let _ = cache.await;
    })
}

/// The version to watch, retried until found (or shutdown: `None`).
async fn discover(client: &kube::Client, shutdown: watch::Receiver<bool>) -> Option<&'static str> {
    super::discovery::wait_for_version(
        client,
        "podcertificaterequests",
        super::discovery::pod_certificate_version,
        shutdown,
    )
    .await
}

enum Answer {
    Status(Value, &'static str, &'static str),
    Skip,
}

impl Signer {
    async fn dispatch(self: &Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut leader = self.leader.clone();
        loop {
            if *shutdown.borrow() {
                return;
            }
            if !*leader.borrow_and_update() {
                tokio::select! {
                    _ = leader.changed() => continue,
                    _ = shutdown.changed() => return,
                }
            }
            let batch = self.queue.take(BATCH);
            if batch.is_empty() {
                tokio::select! {
                    _ = self.queue.notify.notified() => {}
                    _ = leader.changed() => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            }
            self.metrics.in_flight.add(batch.len() as i64);
            let this = self.clone();
            let answered = tokio::task::spawn_blocking(move || {
                let now = SystemTime::now();
                batch
                    .into_iter()
                    .map(|r| {
                        let a = this.answer(&r, now);
                        (r, a)
                    })
                    .collect::<Vec<_>>()
            })
            .await;
            let Ok(answered) = answered else {
                tracing::error!("the signing batch panicked");
                continue;
            };
            for (req, answer) in answered {
                match answer {
                    Answer::Skip => {
                        self.metrics.in_flight.dec();
                        self.queue.finish(req, false);
                    }
                    Answer::Status(status, outcome, reason) => {
                        let permit = tokio::select! {
                            p = self.writes.clone().acquire_owned() => p,
                            _ = shutdown.changed() => return,
                        };
                        let Ok(permit) = permit else { return };
                        let this = self.clone();
                        tokio::spawn(async move {
                            this.write(req, status, outcome, reason).await;
                            this.metrics.in_flight.dec();
                            drop(permit);
                        });
                    }
                }
            }
        }
    }

    /// Decides and (for Issue) signs: CPU work, on the blocking pool.
    fn answer(&self, req: &Request, now: SystemTime) -> Answer {
        if let Some(c) = req.created
            && c + self.opts.max_age < now
        {
            self.metrics
                .requests
                .with_label_values(&["skipped", "TooOld"])
                .inc();
            return Answer::Skip;
        }
        let set = self.issuer.authorities().borrow().clone();
        let ctx = Context {
            trust_domain: self.opts.trust_domain.clone(),
            ttl: self.issuer.ttl(),
            chain_not_after: set.active().chain_not_after(),
        };
        let fail = |reason: &'static str, message: String| {
            Answer::Status(
                json!({"conditions": [condition("Failed", reason, &message, now)]}),
                "failed",
                reason,
            )
        };
        match decide(req, &ctx, now) {
            Decision::Deny { reason, message } => Answer::Status(
                json!({"conditions": [condition("Denied", reason, &message, now)]}),
                "denied",
                reason,
            ),
            Decision::Fail { reason, message } => fail(reason, message),
            Decision::Issue { id, key, ttl } => {
                match self
                    .issuer
                    .issue(&key, &id, ttl, now, "pod-certificate", self.opts.tracked)
                {
                    Ok(leaf) => match issued_status(&leaf, &id, self.opts.refresh_fraction, now) {
                        Ok(s) => Answer::Status(s, "issued", "Issued"),
                        Err(e) => fail("SigningFailed", e),
                    },
                    Err(e) => fail("SigningFailed", e.to_string()),
                }
            }
        }
    }

    fn body(&self, req: &Request, status: &Value) -> DynamicObject {
        let mut o = DynamicObject::new(&req.name, &self.api).within(&req.namespace);
        o.metadata.uid = Some(req.uid.clone());
        o.metadata.resource_version = Some(req.resource_version.clone());
        o.data = json!({"spec": req.spec, "status": status});
        o
    }

    /// Writes the answer with the resourceVersion read; on a conflict,
    /// reads again and gives up if someone answered.
    async fn write(&self, mut req: Request, status: Value, outcome: &str, reason: &str) {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &req.namespace, &self.api);
        let count = |r: &str| self.metrics.writes.with_label_values(&[r]).inc();
        for _ in 0..=CONFLICT_RETRIES {
            if !*self.leader.borrow() {
                count("not_leader");
                self.queue.finish(req, true);
                return;
            }
            let started = Instant::now();
            match api
                .replace_status(&req.name, &PostParams::default(), &self.body(&req, &status))
                .await
            {
                Ok(_) => {
                    count("ok");
                    self.metrics
                        .requests
                        .with_label_values(&[outcome, reason])
                        .inc();
                    if let Some(c) = req.created {
                        let since = SystemTime::now()
                            .duration_since(c)
                            .unwrap_or(started.elapsed());
                        self.metrics.latency.observe(since.as_secs_f64());
                    }
                    tracing::debug!(namespace = %req.namespace, name = %req.name, outcome, reason, "PodCertificateRequest answered");
                    self.queue.finish(req, false);
                    return;
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    count("conflict");
                    match api.get_opt(&req.name).await {
                        Ok(Some(o)) => match request_of(o) {
                            Some(fresh) if fresh.uid == req.uid && !fresh.answered => {
                                req = fresh;
                            }
                            _ => {
                                count("answered_elsewhere");
                                self.queue.finish(req, false);
                                return;
                            }
                        },
                        Ok(None) => {
                            count("gone");
                            self.queue.finish(req, false);
                            return;
                        }
                        Err(e) => {
                            count("error");
                            tracing::warn!(error = %Error::api("reading a PodCertificateRequest", e), "retrying later");
                            self.queue.finish(req, true);
                            return;
                        }
                    }
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    count("gone");
                    self.queue.finish(req, false);
                    return;
                }
                Err(kube::Error::Api(s)) if s.code == 422 => {
                    // The API server refused our answer: say so once as
                    // Failed (never loop on it).
                    count("rejected");
                    tracing::error!(namespace = %req.namespace, name = %req.name, message = %s.message, "the API server refused a PodCertificateRequest status");
                    if outcome != "failed" {
                        let failed = json!({"conditions": [condition("Failed", "StatusRejected", &s.message, SystemTime::now())]});
                        Box::pin(self.write(req, failed, "failed", "StatusRejected")).await;
                    } else {
                        self.queue.finish(req, false);
                    }
                    return;
                }
                Err(e) => {
                    count("error");
                    tracing::warn!(error = %Error::api("writing a PodCertificateRequest status", e), "retrying later");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    self.queue.finish(req, true);
                    return;
                }
            }
        }
        self.queue.finish(req, true);
    }
}

#[path = "pcr_metrics.rs"]
mod metrics;
pub use metrics::Metrics;

#[cfg(test)]
#[path = "pcr_tests.rs"]
mod tests;
