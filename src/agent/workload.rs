//! One workload identity's certificate: a fresh key for every certificate,
//! renewal at a fraction of the lifetime with jitter, exponential back-off on
//! CA errors, and publication through `tokio::sync::watch`.
//!
//! Scheduling uses tokio time (monotonic): the wall clock is read when a
//! certificate is accepted, to turn its NotAfter into a tokio deadline, and
//! again at every wake-up (at least every [`WALL_CLOCK_CHECK`]) to catch a
//! wall clock that jumped. The wall clock is injected ([`WallClock`]), so the
//! whole policy, clock jumps included, runs under tokio's paused clock in
//! tests.
//!
//! Clock jumps (the wall clock, `SystemTime`, moves; tokio's clock does not):
//! - forward past the renewal point: renewed at the next check (a
//!   certificate is due by whichever clock says so first); forward past
//!   NotAfter: withdrawn (expired by either clock), renewed when the CA
//!   answers.
//! - backward: the renewal point is on tokio's clock, so it is not delayed.
//!   An answer not yet valid by this node's clock (the CA's clock ahead by
//!   more than its 2-minute backdating) is refused, never served; the
//!   current certificate is kept and the request retried with back-off.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::Instant;
use x509_parser::prelude::FromDer;
use zeroize::Zeroizing;

use super::Error;
pub use super::bundle::RootBundle;
use super::bundle::{AgentBundle, Retirement};
use super::client::CaClient;
use super::metrics::AgentMetrics;
use crate::ca::bundle::{single_spiffe_id, to_pem, verify_path};
use crate::ca::{KeyAlgorithm, PrivateKey};
use crate::identity::SpiffeId;

/// A certificate and its key, as served to proxies.
pub struct WorkloadCert {
    /// The SPIFFE ID the certificate names.
    pub identity: SpiffeId,
    /// Leaf, then intermediates, PEM (no roots).
    pub chain_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: Zeroizing<String>,
    /// The leaf's serial number, lower-case hex.
    pub serial_hex: String,
    /// The leaf alone, DER.
    pub leaf_der: Vec<u8>,
    /// The leaf's NotAfter.
    pub not_after: SystemTime,
    /// NotAfter on tokio's clock: past it the certificate is withdrawn.
    pub expires_at: Instant,
    /// Opaque version for xDS (the serial).
    pub version: String,
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity)
            .field("serial", &self.serial_hex)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// When and how to renew.
#[derive(Clone, Debug)]
pub struct RotationPolicy {
    /// The key type generated for each certificate.
    pub key: KeyAlgorithm,
    /// Requested lifetime; zero asks for the CA's default.
    pub ttl: Duration,
    /// Renew after this fraction of the lifetime (0 < f < 1).
    pub fraction: f64,
    /// Relative jitter on that point: 0.1 means +-10%.
    pub jitter: f64,
    /// The back-off before the first retry (before jitter); it doubles per
    /// retry up to `backoff_max`.
    pub backoff_initial: Duration,
    /// The ceiling of the doubling back-off.
    pub backoff_max: Duration,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        Self {
            key: KeyAlgorithm::EcdsaP256,
            ttl: Duration::ZERO,
            fraction: 0.5,
            jitter: 0.1,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
        }
    }
}

impl RotationPolicy {
    /// How long after issuance to renew a certificate with `remaining`
    /// lifetime, for a uniform random `u` in [0, 1). Never later than one
    /// tenth of the lifetime before expiry, never sooner than
    /// [`MIN_RENEWAL_INTERVAL`] (a CA handing out nearly expired leaves must
    /// not get a fleet renewing in a tight loop).
    pub fn renew_after(&self, remaining: Duration, u: f64) -> Duration {
        let factor = self.fraction * (1.0 + self.jitter * (2.0 * u - 1.0));
        let latest = remaining.mul_f64(LATEST_RENEWAL);
        remaining
            .mul_f64(factor.clamp(0.0, 1.0))
            .min(latest)
            .max(MIN_RENEWAL_INTERVAL)
    }

    /// Back-off before retry number `attempt` (0-based): doubling from
    /// `backoff_initial`, capped at `backoff_max`, then "equal jitter" (half
    /// fixed, half random) so a fleet does not retry in lockstep.
    ///
    /// With `remaining` validity left on the certificate being served, the
    /// delay is also capped at a quarter of it (but not below
    /// `backoff_initial`): retries grow more urgent as expiry nears, so a CA
    /// that returns shortly before expiry is not missed.
    pub fn retry_delay(&self, attempt: u32, u: f64, remaining: Option<Duration>) -> Duration {
        let delay = self.backoff(attempt, u);
        match remaining {
            Some(r) => delay.min((r / 4).max(self.backoff_initial)),
            None => delay,
        }
    }

    /// The uncapped back-off before retry number `attempt` (0-based).
    pub fn backoff(&self, attempt: u32, u: f64) -> Duration {
        let exp = self
            .backoff_initial
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.backoff_max);
        exp / 2 + exp.mul_f64(u.clamp(0.0, 1.0) / 2.0)
    }
}

/// The latest share of a certificate's lifetime at which it is renewed,
/// whatever the fraction and jitter.
pub const LATEST_RENEWAL: f64 = 0.9;

impl RotationPolicy {
    /// The latest share of the lifetime at which [`Self::renew_after`] can
    /// renew (the fraction with the most jitter, capped).
    #[must_use]
    pub fn latest_renewal_share(&self) -> f64 {
        (self.fraction * (1.0 + self.jitter)).clamp(0.0, LATEST_RENEWAL)
    }
}

/// The shortest time between two renewals.
pub const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(1);

/// 64 random bits from the system's source.
///
/// # Errors
/// The system random source failed.
pub fn random_bits() -> io::Result<u64> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| io::Error::other("the system random source failed"))?;
    Ok(u64::from_le_bytes(b))
}

/// A uniform random number in [0, 1), for jitter. If the system random
/// source fails, that is logged as an error every time and the middle of
/// the range (no jitter) is used: renewals go on, without their spread.
pub fn unit_random() -> f64 {
    match random_bits() {
        Ok(bits) => (bits >> 11) as f64 / (1u64 << 53) as f64,
        Err(e) => {
            tracing::error!(error = %e, "renewal jitter unavailable: renewing without it");
            0.5
        }
    }
}

/// The wall clock a [`CertManager`] reads (`SystemTime::now` outside tests).
pub type WallClock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The longest a manager sleeps without reading the wall clock: how late a
/// forward jump of the wall clock past the renewal point is noticed.
pub const WALL_CLOCK_CHECK: Duration = Duration::from_secs(10);

/// How far the wall clock may run ahead of tokio's before a renewal is made
/// early for it: NTP slewing is not a jump.
const WALL_CLOCK_SLACK: Duration = Duration::from_secs(1);

/// What the rest of the agent watches.
#[derive(Clone)]
pub struct CertWatch {
    /// The current certificate (`None` until the first, or once withdrawn).
    pub cert: watch::Receiver<Option<Arc<WorkloadCert>>>,
    /// The agent-wide trust bundle (the same for every workload).
    pub roots: watch::Receiver<Option<Arc<RootBundle>>>,
}

/// Keeps one identity's certificate fresh.
pub struct CertManager<C> {
    name: String,
    client: Arc<C>,
    policy: RotationPolicy,
    cert_tx: watch::Sender<Option<Arc<WorkloadCert>>>,
    bundle: AgentBundle,
    metrics: Arc<AgentMetrics>,
    wall: WallClock,
}

impl<C: CaClient> CertManager<C> {
    /// `name` labels logs and metrics (the workload name in node mode). The
    /// manager has a trust bundle of its own; see [`CertManager::sharing`].
    pub fn new(
        name: impl Into<String>,
        client: Arc<C>,
        policy: RotationPolicy,
        metrics: Arc<AgentMetrics>,
    ) -> (Self, CertWatch) {
        Self::sharing(name, client, policy, metrics, AgentBundle::new())
    }

    /// As [`CertManager::new`], feeding and watching the agent-wide
    /// `bundle`: the roots of every verified answer are offered to it, and
    /// the manager renews early when it announces the retirement of the
    /// authority that issued the current leaf.
    pub fn sharing(
        name: impl Into<String>,
        client: Arc<C>,
        policy: RotationPolicy,
        metrics: Arc<AgentMetrics>,
        bundle: AgentBundle,
    ) -> (Self, CertWatch) {
        let (cert_tx, cert) = watch::channel(None);
        let roots = bundle.subscribe();
        let name = name.into();
        // Every series from the start: a dashboard shows 0, not a gap.
        metrics.csr_failures.with_label_values(&[&name]);
        metrics.csr_retries.with_label_values(&[&name]);
        metrics.token_unusable.with_label_values(&[&name]);
        (
            Self {
                name,
                client,
                policy,
                cert_tx,
                bundle,
                metrics,
                wall: Arc::new(SystemTime::now),
            },
            CertWatch { cert, roots },
        )
    }

    /// Reads `wall` instead of `SystemTime::now` (tests jump it).
    #[must_use]
    pub fn with_wall_clock(mut self, wall: WallClock) -> Self {
        self.wall = wall;
        self
    }

    /// Runs until `shutdown` changes.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut attempt: u32 = 0;
        let mut retiring = self.bundle.retiring();
        loop {
            let started = Instant::now();
            let fetched = tokio::select! {
                r = self.fetch() => r,
                _ = shutdown.changed() => return,
            };
            let (next, renew_wall) = match fetched {
                Ok((cert, roots)) => {
                    self.metrics
                        .csr_latency
                        .with_label_values(&[&self.name])
                        .observe(started.elapsed().as_secs_f64());
                    attempt = 0;
                    let remaining = cert.expires_at.saturating_duration_since(Instant::now());
                    let after = self.policy.renew_after(remaining, unit_random());
                    tracing::info!(
                        workload = %self.name, identity = %cert.identity, serial = %cert.serial_hex,
                        lifetime_s = remaining.as_secs(), renew_in_s = after.as_secs_f64(),
                        "certificate obtained"
                    );
                    self.metrics
                        .cert_expiry
                        .with_label_values(&[&self.name])
                        .set(unix_secs(cert.not_after));
                    // Roots first: a proxy must trust a new root before it
                    // sees a certificate that chains to it. An older
                    // generation than the one held is not published.
                    let version = roots.version.clone();
                    if self.bundle.offer(roots) {
                        tracing::info!(workload = %self.name, version = %version, "trust bundle changed");
                    }
                    self.cert_tx.send_replace(Some(Arc::new(cert)));
                    // The same point on the wall clock: whichever comes first.
                    let wall_due = (self.wall)()
                        .checked_add(after)
                        .and_then(|t| t.checked_add(WALL_CLOCK_SLACK));
                    (Instant::now() + after, wall_due)
                }
                Err(e) => {
                    self.metrics
                        .csr_failures
                        .with_label_values(&[&self.name])
                        .inc();
                    if attempt > 0 {
                        self.metrics
                            .csr_retries
                            .with_label_values(&[&self.name])
                            .inc();
                    }
                    let remaining = self
                        .cert_tx
                        .borrow()
                        .as_ref()
                        .map(|c| c.expires_at.saturating_duration_since(Instant::now()));
                    let delay = self.policy.retry_delay(attempt, unit_random(), remaining);
                    attempt = attempt.saturating_add(1);
                    let serving = self.cert_tx.borrow().as_ref().map(|c| c.serial_hex.clone());
                    match &e {
                        Error::TokenExpired { .. } | Error::Token(_) => {
                            self.metrics
                                .token_unusable
                                .with_label_values(&[&self.name])
                                .inc();
                            tracing::error!(
                            workload = %self.name, error = %crate::logsafe::peer(&e.to_string()), retry_in_ms = delay.as_millis() as u64, ?serving,
                            "NOT requesting a certificate: the service-account token is unusable; waiting for a fresh one"
                            );
                        }
                        // The CA's own words: escaped and truncated.
                        _ => tracing::warn!(
                            workload = %self.name, error = %crate::logsafe::peer(&e.to_string()), retry_in_ms = delay.as_millis() as u64, ?serving,
                            "certificate request failed; keeping the current certificate while it is valid"
                        ),
                    }
                    (Instant::now() + delay, None)
                }
            };
            if !self
                .wait_until(next, renew_wall, &mut retiring, &mut shutdown)
                .await
            {
                return;
            }
        }
    }

    /// Sleeps until `next` on tokio's clock or `next_wall` on the wall
    /// clock, whichever comes first (or sooner, when the authority that
    /// issued the current leaf is announced as retiring), withdrawing the
    /// certificate if it expires first by either clock. False when shutdown
    /// was requested.
    async fn wait_until(
        &self,
        next: Instant,
        next_wall: Option<SystemTime>,
        retiring: &mut watch::Receiver<Option<Arc<Retirement>>>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut early = self.early_renewal(retiring);
        // The sender lives in `self.bundle`; the flag only rules out a spin.
        let mut announcements = true;
        loop {
            let due = early.filter(|e| *e < next).unwrap_or(next);
            let expiry = self.cert_tx.borrow().as_ref().map(|c| c.expires_at);
            let wake = expiry
                .filter(|e| *e < due)
                .unwrap_or(due)
                .min(Instant::now() + WALL_CLOCK_CHECK);
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                r = retiring.changed(), if announcements => {
                    match r {
                        Ok(()) => early = self.early_renewal(retiring),
                        Err(_) => announcements = false,
                    }
                    continue;
                }
                _ = shutdown.changed() => return false,
            }
            let now = Instant::now();
            let wall = (self.wall)();
            let not_after = self.cert_tx.borrow().as_ref().map(|c| c.not_after);
            if expiry.is_some_and(|e| e <= now) {
                tracing::error!(workload = %self.name, "certificate expired before it could be renewed; no longer serving it");
                self.cert_tx.send_replace(None);
            } else if not_after.is_some_and(|t| t <= wall) {
                tracing::error!(
                    workload = %self.name, wall_clock = unix_secs(wall), not_after = not_after.map(unix_secs),
                    "the wall clock says the certificate has expired (did the clock jump forward?); no longer serving it"
                );
                self.cert_tx.send_replace(None);
            }
            if next_wall.is_some_and(|w| w <= wall) && now < due {
                tracing::warn!(
                    workload = %self.name, wall_clock = unix_secs(wall),
                    "the wall clock passed the renewal point before tokio's clock did (did the clock jump forward?); renewing now"
                );
                return true;
            }
            if now >= due {
                if due < next {
                    tracing::info!(workload = %self.name, "renewing early: the authority that issued the certificate is being retired");
                }
                return true;
            }
        }
    }

    /// When to renew because the current leaf's issuer is retiring (a
    /// random moment within the announced window), if it is.
    fn early_renewal(
        &self,
        retiring: &mut watch::Receiver<Option<Arc<Retirement>>>,
    ) -> Option<Instant> {
        let retirement = retiring.borrow_and_update().clone()?;
        let cert = self.cert_tx.borrow().clone()?;
        let at =
            retirement.renew_by(&cert.leaf_der, (self.wall)(), Instant::now(), unit_random())?;
        tracing::debug!(
            workload = %self.name, serial = %cert.serial_hex,
            renew_in_s = at.saturating_duration_since(Instant::now()).as_secs_f64(),
            "the authority that issued the certificate is being retired; renewing early"
        );
        Some(at)
    }

    async fn fetch(&self) -> Result<(WorkloadCert, RootBundle), Error> {
        let alg = self.policy.key;
        let key = if matches!(
            alg,
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096
        ) {
            tokio::task::spawn_blocking(move || PrivateKey::generate(alg))
                .await
                .map_err(|e| Error::Config(format!("key generation task: {e}")))??
        } else {
            PrivateKey::generate(alg)?
        };
        let csr = csr_for(&key)?;
        let (chain, generation) = self.client.sign(csr, self.policy.ttl).await?;
        let (cert, roots) = accept_chain(&key, &chain, (self.wall)())?;
        Ok((cert, roots.with_generation(generation)))
    }
}

/// A CSR with an empty subject and no SAN: the CA names the identity from
/// the caller's credentials.
pub fn csr_for(key: &PrivateKey) -> Result<String, Error> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .serialize_request(key.key_pair())
        .and_then(|r| r.pem())
        .map_err(|e| Error::Config(format!("building the CSR: {e}")))
}

/// Checks a CA response before anything is served: at least leaf + roots,
/// the leaf is for our key, carries exactly one SPIFFE ID, is valid now and
/// path-validates (rustls-webpki) to the roots in the response.
///
/// # Errors
/// [`Error::BadResponse`] naming what is wrong.
pub fn accept_chain(
    key: &PrivateKey,
    chain: &[String],
    now: SystemTime,
) -> Result<(WorkloadCert, RootBundle), Error> {
    let bad = |m: String| Error::BadResponse(m);
    let [leaf_pem, middle @ .., roots_pem] = chain else {
        return Err(bad(format!(
            "cert_chain has {} elements, expected at least 2",
            chain.len()
        )));
    };
    let leaf_der = pem_ders(leaf_pem)
        .map_err(bad)?
        .into_iter()
        .next()
        .ok_or_else(|| bad("empty leaf".into()))?;
    let mut intermediates = Vec::new();
    for m in middle {
        intermediates.extend(pem_ders(m).map_err(bad)?);
    }
    let roots = pem_ders(roots_pem).map_err(bad)?;
    if roots.is_empty() {
        return Err(bad("no root in the last element".into()));
    }
    let (_, leaf) = x509_parser::certificate::X509Certificate::from_der(&leaf_der)
        .map_err(|e| bad(format!("leaf: {e}")))?;
    if leaf.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(bad("the leaf is not for the key we sent".into()));
    }
    let identity = single_spiffe_id(&leaf).map_err(|e| bad(format!("the leaf has {e}")))?;
    let not_before = crate::ca::bundle::time_from_unix(leaf.validity().not_before.timestamp());
    if now < not_before {
        return Err(bad(format!(
            "the leaf is not valid before {} and this node's clock reads {}: is the clock behind? Not serving it",
            unix_secs(not_before),
            unix_secs(now)
        )));
    }
    let anchors: Vec<&[u8]> = roots.iter().map(Vec::as_slice).collect();
    verify_path(
        &leaf_der,
        &intermediates,
        &anchors,
        now,
        webpki::KeyUsage::client_auth(),
    )
    .map_err(|e| {
        bad(format!(
            "the leaf does not verify to the roots sent with it: {e}"
        ))
    })?;

    let not_after = crate::ca::bundle::not_after(&leaf);
    let remaining = not_after.duration_since(now).unwrap_or_default();
    let serial_hex = leaf.raw_serial_as_string().replace(':', "");
    let mut chain_pem = to_pem("CERTIFICATE", &leaf_der);
    for d in &intermediates {
        chain_pem.push_str(&to_pem("CERTIFICATE", d));
    }
    let roots_pem: String = roots.iter().map(|d| to_pem("CERTIFICATE", d)).collect();
    Ok((
        WorkloadCert {
            identity,
            chain_pem,
            key_pem: key.to_pem(),
            version: serial_hex.clone(),
            serial_hex,
            leaf_der,
            not_after,
            expires_at: Instant::now() + remaining,
        },
        RootBundle::new(roots_pem, None),
    ))
}

/// The names `--output-dir` shows in each workload's directory, with their
/// modes: the key, the chain (leaf first) and the trust bundle.
pub const OUTPUT_FILES: [(&str, u32); 3] = [
    ("key.pem", 0o600),
    ("cert-chain.pem", 0o644),
    ("root-cert.pem", 0o644),
];

/// The link naming the directory that holds the files being published.
pub const OUTPUT_DATA_LINK: &str = "..data";

/// Publishes a key, its chain and the roots in `dir` together, as the
/// kubelet's AtomicWriter publishes a projected volume:
///
/// 1. a new directory `..<unix seconds>_<nanoseconds>.<random>` (0700) gets
///    the three files (the key 0600), each fsynced, then the directory;
/// 2. a temporary symlink to it is renamed over `..data` (one atomic step),
///    and `dir` is fsynced;
/// 3. the visible names (`key.pem`…) are symlinks to `..data/<name>`, made
///    once (a regular file left by an older agent is replaced by a rename);
/// 4. the directories `..data` no longer names are removed.
///
/// So whoever resolves `..data` once sees a key, chain and roots published
/// together: never a new key with an old chain. (Opening the visible names
/// one after the other may straddle a swap: a reader that needs the set
/// compares `..data`'s target before and after, as the tests do.) A failure
/// before step 2 leaves the previous set in place.
///
/// # Errors
/// The I/O error of the step that failed.
pub fn publish_files(
    dir: &Path,
    key_pem: &[u8],
    chain_pem: &[u8],
    roots_pem: &[u8],
) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    use std::os::unix::fs::symlink;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let random = random_bits()? & 0xff_ffff;
    let name = format!(
        "..{}_{:09}.{random:06x}",
        stamp.as_secs(),
        stamp.subsec_nanos()
    );
    let data = dir.join(&name);
    std::fs::DirBuilder::new().mode(0o700).create(&data)?;
    let contents = [key_pem, chain_pem, roots_pem];
    let written = OUTPUT_FILES
        .iter()
        .zip(contents)
        .try_for_each(|((file, mode), bytes)| {
            crate::ca::store::write_new_file(&data.join(file), bytes, *mode)
        })
        .and_then(|()| std::fs::File::open(&data)?.sync_all());
    let swapped = written.and_then(|()| {
        let tmp = dir.join(crate::ca::store::temp_name(OUTPUT_DATA_LINK.as_ref())?);
        symlink(&name, &tmp)?;
        std::fs::rename(&tmp, dir.join(OUTPUT_DATA_LINK)).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    });
    if let Err(e) = swapped {
        let _ = std::fs::remove_dir_all(&data);
        return Err(e);
    }
    for (file, _) in OUTPUT_FILES {
        let visible = dir.join(file);
        let target = Path::new(OUTPUT_DATA_LINK).join(file);
        if std::fs::read_link(&visible).is_ok_and(|t| t == target) {
            continue;
        }
        let tmp = dir.join(crate::ca::store::temp_name(file.as_ref())?);
        symlink(&target, &tmp)?;
        std::fs::rename(&tmp, &visible).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
    }
    std::fs::File::open(dir)?.sync_all()?;
    // The previous sets (and what a crash left: their temporaries). The
    // set `..data` names now is never removed, even if another agent
    // swapped it meanwhile; a failure is logged and the rest goes on: the
    // new set is published already.
    let live = std::fs::read_link(dir.join(OUTPUT_DATA_LINK)).ok();
    for entry in std::fs::read_dir(dir)?.flatten() {
        let n = entry.file_name();
        let n = n.to_string_lossy();
        let is_live = live.as_deref().is_some_and(|l| l == Path::new(n.as_ref()));
        let stale_set =
            n.starts_with("..") && n != OUTPUT_DATA_LINK && n != name.as_str() && !is_live;
        let stale_tmp = n.starts_with('.') && n.contains(".tmp-");
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let removed = if stale_set && is_dir {
            std::fs::remove_dir_all(entry.path())
        } else if stale_tmp && !is_dir {
            std::fs::remove_file(entry.path())
        } else {
            continue;
        };
        if let Err(e) = removed {
            tracing::warn!(path = %entry.path().display(), error = %e, "could not remove an old set of certificate files");
        }
    }
    Ok(())
}

fn pem_ders(text: &str) -> Result<Vec<Vec<u8>>, String> {
    pem::parse_many(text)
        .map_err(|e| format!("bad PEM: {e}"))?
        .into_iter()
        .map(|p| {
            if p.tag() == "CERTIFICATE" {
                Ok(p.into_contents())
            } else {
                Err(format!("unexpected PEM block {:?}", p.tag()))
            }
        })
        .collect()
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
#[path = "workload_tests.rs"]
mod tests;
