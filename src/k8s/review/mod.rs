//! Service-account tokens judged by the API server (`authentication.k8s.io/v1`
//! TokenReview), for clusters whose service-account issuer keys this CA
//! cannot read.
//!
//! # Why this exists, and why it is built this way
//!
//! By default a token is checked locally against the issuer's public keys
//! (`/openid/v1/jwks`), with no API call on the CSR path. Some clusters do
//! not let us read those keys (the discovery endpoints not reachable, RBAC
//! without `system:service-account-issuer-discovery`, tokens accepted by a
//! webhook or an external issuer): there the API server is the only judge,
//! and every CSR would cost a TokenReview. That is how istiod and istio-csr
//! fall over under mass pod starts: a review per CSR, uncached, behind a
//! client-side throttle shared with every other API call (Istio #27945:
//! reviews waiting up to ~24 s in a 600-pod cluster). Here instead:
//!
//! - results are cached ([`TokenReviewer::review`]), keyed by the SHA-256 of
//!   the token, never the token itself;
//! - concurrent requests for one token share one review (singleflight);
//! - at most [`ReviewOptions::max_in_flight`] reviews are at the API server
//!   at once; beyond it reviews wait in a first-come first-served queue (the
//!   semaphore is fair) for up to [`ReviewOptions::queue_timeout`], so a
//!   burst is served late rather than refused, and the API server, not a
//!   local rate, sets the pace;
//! - each review may take [`ReviewOptions::review_timeout`] (the client
//!   retries 429 and 5xx with back-off inside that time).
//!
//! A caller that goes away while its review is still queued withdraws it
//! (unless another caller waits for the same token), so queued reviews never
//! outnumber waiting callers, which the gRPC layer bounds. A review already
//! at the API server finishes and is cached: the caller's retry finds it.
//!
//! # What is cached, for how long, and why that is safe
//!
//! - An accepted token: until its `exp` less [`ReviewOptions::expiry_margin`],
//!   at most [`ReviewOptions::max_positive_ttl`]; a token without a readable
//!   `exp` (legacy Secret tokens, or not a JWT) for
//!   [`ReviewOptions::default_positive_ttl`]. `exp` is read from the payload
//!   without verifying anything: it only bounds the cache lifetime, which is
//!   capped anyway, and the API server has just accepted exactly this token
//!   (the key is a digest of all of it).
//! - A refused token: [`ReviewOptions::negative_ttl`], so a storm of one bad
//!   token is not a storm of reviews, yet a token refused for a passing
//!   reason (the API server's own caches catching up) works again soon.
//! - A review that could not be made (API error, timeout, queue deadline):
//!   never; the caller is told [`ReviewError::is_unavailable`] and retries.
//!
//! The cache holds at most [`ReviewOptions::max_entries`]; when full, expired
//! entries go first, then those soonest to expire: refusals (seconds) before
//! accepted tokens (minutes), so a flood of distinct bad tokens cannot push
//! out the good ones, and memory stays bounded whatever is presented.
//!
//! A cached acceptance says the token was genuine and bound to live objects
//! when it was reviewed. The caller re-checks the bindings on every use
//! against the watch caches ([`crate::ca::policy::check_binding`]: the
//! service account and the pod must still exist with the token's UIDs), so
//! the cached review of a deleted pod's token is still refused. What the
//! cache can extend, by at most `max_positive_ttl`, is a revocation that
//! check is blind to: a token bound to a Secret whose Secret was deleted, or
//! bound only to a Node that was deleted. (The API server itself keeps
//! accepting a deleted service account's token for 10-30 s.)
//!
//! # Checked, and not checked
//!
//! Checked: `status.authenticated` is true and `status.error` empty; the
//! user is `system:serviceaccount:<ns>:<sa>` in group
//! `system:serviceaccounts`; `status.audiences` names one of ours (an API
//! server that returns none is not audience aware and is refused); the
//! pod binding in `user.extra` comes as one name and one UID.
//!
//! Not checked here: the bindings against the cluster (the caller, as
//! above); that names are valid DNS-1123 names (building the SPIFFE ID
//! does); the node's existence; the `credential-id` (JTI) extra, which is
//! ignored; anything the API server says beyond that: its answer is trusted.
//! The `error` text of a refusal is the API server's, shown escaped and cut
//! to [`crate::limits::MAX_LOGGED_PEER_BYTES`], with the token blanked out
//! should it appear.

use crate::sync::LockExt;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use base64::Engine;
use k8s_openapi::api::authentication::v1::{
    TokenReview, TokenReviewSpec, TokenReviewStatus, UserInfo,
};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::{Semaphore, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::Error;
use crate::ca::policy::{BoundObject, TokenFacts};

/// `user.extra` key: the name of the pod the token is bound to.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// `user.extra` key: the UID of the pod the token is bound to.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// `user.extra` key: the node the token was issued on (KEP-4193).
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// `user.extra` key: that node's UID.
pub const EXTRA_NODE_UID: &str = "authentication.kubernetes.io/node-uid";
/// The group every service account is in.
pub const SERVICE_ACCOUNTS_GROUP: &str = "system:serviceaccounts";
/// The user-name prefix of a service account.
pub const SERVICE_ACCOUNT_USER_PREFIX: &str = "system:serviceaccount:";
/// Istio's default token audience.
pub const DEFAULT_AUDIENCE: &str = "istio-ca";
/// Largest token sent for review (as the local JWT authenticator's limit).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The review's answer, or why there is none.
pub type ReviewFuture<'a> =
    Pin<Box<dyn Future<Output = Result<TokenReviewStatus, Error>> + Send + 'a>>;

/// Whatever reviews a token: the API server ([`KubeReviewBackend`]), or a
/// script in tests.
pub trait ReviewBackend: Send + Sync {
    /// The status of a TokenReview of `token` for `audiences`.
    fn review<'a>(&'a self, token: &'a str, audiences: &'a [String]) -> ReviewFuture<'a>;
}

/// TokenReview through the Kubernetes API (`create` on
/// `authentication.k8s.io/v1` `tokenreviews`; RBAC: `create` on
/// `tokenreviews`, as `system:auth-delegator` grants).
#[derive(Clone)]
pub struct KubeReviewBackend {
    api: kube::Api<TokenReview>,
}

impl KubeReviewBackend {
    /// TokenReviews through `client`.
    pub fn new(client: kube::Client) -> Self {
        Self {
            api: kube::Api::all(client),
        }
    }
}

impl ReviewBackend for KubeReviewBackend {
    fn review<'a>(&'a self, token: &'a str, audiences: &'a [String]) -> ReviewFuture<'a> {
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    audiences: Some(audiences.to_vec()),
                    token: token.to_owned(),
                },
                ..TokenReview::default()
            };
            let answer = self
                .api
                .create(&kube::api::PostParams::default(), &review)
                .await
                .map_err(|e| Error::api("TokenReview", e))?;
            answer.status.ok_or_else(|| Error::Invalid {
                what: "TokenReview".into(),
                reason: "the answer has no status".into(),
            })
        })
    }
}

/// How the reviewer caches, and how hard it may push the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReviewOptions {
    /// `spec.audiences` of every review; the answer must name one of them.
    /// Not empty.
    pub audiences: Vec<String>,
    /// Reviews at the API server at once.
    pub max_in_flight: usize,
    /// How long a review may wait for a slot before failing `Unavailable`.
    pub queue_timeout: Duration,
    /// How long one review may take at the API server (retries included).
    pub review_timeout: Duration,
    /// Cache entries, accepted and refused tokens together.
    pub max_entries: usize,
    /// The longest an accepted token stays cached, whatever its `exp`.
    pub max_positive_ttl: Duration,
    /// How long an accepted token without a readable `exp` stays cached.
    pub default_positive_ttl: Duration,
    /// An accepted token leaves the cache this long before its `exp`.
    pub expiry_margin: Duration,
    /// How long a refused token stays cached.
    pub negative_ttl: Duration,
}

impl Default for ReviewOptions {
    fn default() -> Self {
        Self {
            audiences: vec![DEFAULT_AUDIENCE.to_owned()],
            // Half the client's own cap (`client::DEFAULT_MAX_IN_FLIGHT`):
            // reviews can never starve the watches and the Secret store.
            max_in_flight: 16,
            // With `review_timeout`, 15 s: the server's default request
            // deadline, after which nobody is waiting anyway.
            queue_timeout: Duration::from_secs(10),
            review_timeout: Duration::from_secs(5),
            // Tens of thousands of pods' tokens; at most a few hundred
            // bytes each (digest, names, UIDs, index).
            max_entries: 100_000,
            // One review per token per 5 minutes costs nothing, and bounds
            // what a cached review can outlive (see the module docs).
            max_positive_ttl: Duration::from_secs(5 * 60),
            default_positive_ttl: Duration::from_secs(60),
            expiry_margin: Duration::from_secs(10),
            negative_ttl: Duration::from_secs(10),
        }
    }
}

/// Why a token was not accepted. [`ReviewError::is_unavailable`] tells a
/// refusal (gRPC `Unauthenticated`) from a review that could not be made
/// (`Unavailable`: the client retries); each has a stable
/// [`ReviewError::metric_label`]. Texts from the API server are escaped and
/// bounded; no variant holds the token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReviewError {
    /// Not sent for review: empty, or above [`MAX_TOKEN_BYTES`].
    #[error("token not reviewed: {0}")]
    BadToken(&'static str),
    /// The API server did not authenticate the token.
    #[error("the API server refused the token: {0}")]
    NotAuthenticated(String),
    /// Authenticated, but not as a service account.
    #[error("the token's user {0} is not a service account")]
    NotServiceAccount(String),
    /// Authenticated, but not in group `system:serviceaccounts`.
    #[error("the token's user is not in group {SERVICE_ACCOUNTS_GROUP}")]
    NotInServiceAccountsGroup,
    /// The review's audiences are none of ours (or there are none).
    #[error("the review names audiences {0}, none of ours")]
    Audience(String),
    /// The binding in `user.extra` is malformed.
    #[error("the review's binding is malformed: {0}")]
    BadBinding(String),
    /// The API call failed.
    #[error("TokenReview failed: {0}")]
    Api(String),
    /// The API call took longer than the review timeout.
    #[error("TokenReview took longer than {0:?}")]
    Timeout(Duration),
    /// No slot for the review within the queue timeout.
    #[error("no TokenReview slot within {0:?} (the API server is slow or the CA overloaded)")]
    QueueDeadline(Duration),
    /// The review ended without an answer (withdrawn, or its task failed).
    #[error("the TokenReview ended without an answer")]
    Abandoned,
}

impl ReviewError {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::BadToken(_) => "bad_token",
            Self::NotAuthenticated(_) => "not_authenticated",
            Self::NotServiceAccount(_) => "not_service_account",
            Self::NotInServiceAccountsGroup => "not_in_service_accounts_group",
            Self::Audience(_) => "audience",
            Self::BadBinding(_) => "bad_binding",
            Self::Api(_) => "api_error",
            Self::Timeout(_) => "timeout",
            Self::QueueDeadline(_) => "queue_deadline",
            Self::Abandoned => "abandoned",
        }
    }

    /// Whether the token could not be reviewed (tell the client
    /// `Unavailable`, it may retry) rather than was refused.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Api(_) | Self::Timeout(_) | Self::QueueDeadline(_) | Self::Abandoned
        )
    }
}

/// Every outcome label, for pre-created series.
const OUTCOMES: &[&str] = &[
    "authenticated",
    "bad_token",
    "not_authenticated",
    "not_service_account",
    "not_in_service_accounts_group",
    "audience",
    "bad_binding",
    "api_error",
    "timeout",
    "queue_deadline",
    "abandoned",
];
const LOOKUPS: &[&str] = &["hit", "negative_hit", "miss", "joined"];
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The wall clock, read to compare a token's `exp` with now.
pub type WallClock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// A short, non-reversible name of a token for log lines (16 hex digits of
/// its SHA-256).
pub fn token_id(token: &str) -> String {
    crate::ca::bundle::hex(&digest(token)[..8])
}

/// Reviews service-account tokens through a [`ReviewBackend`], with a cache,
/// a cap on reviews in flight, a queue with a deadline and singleflight (see
/// the module docs). Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct TokenReviewer {
    inner: Arc<Inner>,
}

impl fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

type Key = [u8; 32];
type Outcome = Result<TokenFacts, ReviewError>;

struct Inner {
    backend: Arc<dyn ReviewBackend>,
    options: ReviewOptions,
    slots: Arc<Semaphore>,
    state: Mutex<State>,
    metrics: Metrics,
    clock: WallClock,
}

struct State {
    cache: Cache,
    flights: HashMap<Key, Flight>,
    next_flight: u64,
}

/// A review under way, shared by every caller asking for its token.
struct Flight {
    id: u64,
    answer: watch::Receiver<Option<Outcome>>,
    waiters: usize,
    /// It has its slot (and is, or is about to be, at the API server).
    started: bool,
    task: AbortHandle,
}

impl TokenReviewer {
    /// A reviewer over `backend`, its metrics registered into `registry`.
    ///
    /// # Errors
    /// [`Error::Config`] for options without an audience, or metrics that
    /// cannot be registered (already registered in `registry`).
    pub fn new(
        backend: Arc<dyn ReviewBackend>,
        options: ReviewOptions,
        registry: &Registry,
    ) -> Result<Self, Error> {
        Self::with_clock(backend, options, registry, Arc::new(SystemTime::now))
    }

    /// [`TokenReviewer::new`] with the wall clock given (tests).
    ///
    /// # Errors
    /// As [`TokenReviewer::new`].
    pub fn with_clock(
        backend: Arc<dyn ReviewBackend>,
        options: ReviewOptions,
        registry: &Registry,
        clock: WallClock,
    ) -> Result<Self, Error> {
        if options.audiences.is_empty() || options.audiences.iter().any(String::is_empty) {
            return Err(Error::Config(
                "TokenReview needs at least one audience, none empty".into(),
            ));
        }
        let metrics = Metrics::register(registry)
            .map_err(|e| Error::Config(format!("TokenReview metrics: {e}")))?;
        let permits = options.max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        Ok(Self {
            inner: Arc::new(Inner {
                backend,
                slots: Arc::new(Semaphore::new(permits)),
                state: Mutex::new(State {
                    cache: Cache::new(options.max_entries),
                    flights: HashMap::new(),
                    next_flight: 0,
                }),
                metrics,
                clock,
                options,
            }),
        })
    }

    /// The options it was built with.
    pub fn options(&self) -> &ReviewOptions {
        &self.inner.options
    }

    /// Entries in the cache now (expired ones included until evicted).
    pub fn cached_entries(&self) -> usize {
        self.inner.lock().cache.len()
    }

    /// Reviews under way (queued or at the API server).
    pub fn reviews_under_way(&self) -> usize {
        self.inner.lock().flights.len()
    }

    /// What the API server says of `token`: from the cache, from a review
    /// already under way for it, or from a new review (queued behind the
    /// cap). See the module docs for what is checked and cached.
    ///
    /// # Errors
    /// Why the token was refused, or could not be reviewed
    /// ([`ReviewError::is_unavailable`]).
    pub async fn review(&self, token: &str) -> Result<TokenFacts, ReviewError> {
        let m = &self.inner.metrics;
        let now = (self.inner.clock)()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let bad = if token.is_empty() {
            Some("empty")
        } else if token.len() > MAX_TOKEN_BYTES {
            Some("larger than 16 KiB")
        } else {
            implausible(token, &self.inner.options.audiences, now)
        };
        if let Some(why) = bad {
            let e = ReviewError::BadToken(why);
            m.outcome(&Err(e.clone()));
            return Err(e);
        }
        let key = digest(token);
        let (mut answer, id) = {
            let mut st = self.inner.lock();
            if let Some(hit) = st.cache.get(&key, Instant::now()) {
                let label = if hit.is_ok() { "hit" } else { "negative_hit" };
                m.lookups.with_label_values(&[label]).inc();
                m.entries.set(gauge_value(st.cache.len()));
                return hit;
            }
            if let Some(f) = st.flights.get_mut(&key) {
                f.waiters += 1;
                m.lookups.with_label_values(&["joined"]).inc();
                (f.answer.clone(), f.id)
            } else {
                let handle =
                    tokio::runtime::Handle::try_current().map_err(|_| ReviewError::Abandoned)?;
                m.lookups.with_label_values(&["miss"]).inc();
                let id = st.next_flight;
                st.next_flight = st.next_flight.wrapping_add(1);
                let (tx, rx) = watch::channel(None);
                let task = handle.spawn(Arc::clone(&self.inner).run(
                    key,
                    id,
                    Zeroizing::new(token.to_owned()),
                    tx,
                ));
                st.flights.insert(
                    key,
                    Flight {
                        id,
                        answer: rx.clone(),
                        waiters: 1,
                        started: false,
                        task: task.abort_handle(),
                    },
                );
                (rx, id)
            }
        };
        let _waiter = Waiter {
            inner: &self.inner,
            key,
            id,
        };
        // The value goes from None to Some once: two rounds at most.
        for _ in 0..3 {
            if let Some(outcome) = answer.borrow_and_update().clone() {
                return outcome;
            }
            if answer.changed().await.is_err() {
                break;
            }
        }
        let last = answer.borrow().clone();
        last.unwrap_or(Err(ReviewError::Abandoned))
    }
}

/// One caller waiting for a flight; when the last one leaves before the
/// review has its slot, the review is withdrawn.
struct Waiter<'a> {
    inner: &'a Inner,
    key: Key,
    id: u64,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        let Some(f) = st.flights.get_mut(&self.key) else {
            return;
        };
        if f.id != self.id {
            return;
        }
        f.waiters = f.waiters.saturating_sub(1);
        if f.waiters == 0
            && !f.started
            && let Some(f) = st.flights.remove(&self.key)
        {
            f.task.abort();
            self.inner.metrics.outcome(&Err(ReviewError::Abandoned));
        }
    }
}

/// Removes its flight however the review task ends (answer, panic, abort).
struct FlightEnd {
    inner: Arc<Inner>,
    key: Key,
    id: u64,
}

impl Drop for FlightEnd {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        if st.flights.get(&self.key).is_some_and(|f| f.id == self.id) {
            st.flights.remove(&self.key);
        }
    }
}

/// Holds a gauge up while it lives.
struct Up(IntGauge);

impl Up {
    fn new(g: &IntGauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.locked()
    }

    /// The review task of one flight: queue, review, cache, answer.
    async fn run(
        self: Arc<Self>,
        key: Key,
        id: u64,
        token: Zeroizing<String>,
        answer: watch::Sender<Option<Outcome>>,
    ) {
        let end = FlightEnd {
            inner: Arc::clone(&self),
            key,
            id,
        };
        let outcome = self.attempt(key, id, &token).await;
        let lifetime = self.cache_lifetime(&outcome, &token);
        let mut st = self.lock();
        if st.flights.get(&key).is_none_or(|f| f.id != id) {
            // Withdrawn after it got its slot: nobody is waiting.
            return;
        }
        self.metrics.outcome(&outcome);
        let now = Instant::now();
        if let Some(expires) = lifetime.and_then(|l| now.checked_add(l)) {
            st.cache.insert(key, outcome.clone(), expires, now);
            self.metrics.entries.set(gauge_value(st.cache.len()));
        }
        // Under the lock: a caller either finds the flight (and then this
        // answer) or the cache entry, never neither.
        st.flights.remove(&key);
        answer.send_replace(Some(outcome));
        drop(st);
        drop(end);
    }

    async fn attempt(&self, key: Key, id: u64, token: &str) -> Outcome {
        let m = &self.metrics;
        let queued_at = Instant::now();
        let permit = {
            let _queued = Up::new(&m.queued);
            let slot = tokio::time::timeout(
                self.options.queue_timeout,
                Arc::clone(&self.slots).acquire_owned(),
            )
            .await;
            m.queue_wait.observe(queued_at.elapsed().as_secs_f64());
            match slot {
                Ok(Ok(permit)) => permit,
                Ok(Err(_closed)) => return Err(ReviewError::Abandoned),
                Err(_elapsed) => {
                    return Err(ReviewError::QueueDeadline(self.options.queue_timeout));
                }
            }
        };
        {
            let mut st = self.lock();
            match st.flights.get_mut(&key) {
                Some(f) if f.id == id => f.started = true,
                _ => return Err(ReviewError::Abandoned),
            }
        }
        let _in_flight = Up::new(&m.in_flight);
        let started = Instant::now();
        let result = tokio::time::timeout(
            self.options.review_timeout,
            self.backend.review(token, &self.options.audiences),
        )
        .await;
        m.duration.observe(started.elapsed().as_secs_f64());
        drop(permit);
        match result {
            Err(_elapsed) => Err(ReviewError::Timeout(self.options.review_timeout)),
            Ok(Err(e)) => {
                let e = ReviewError::Api(sanitize(&e.to_string(), token));
                tracing::debug!(token = %token_id(token), error = %e, "TokenReview failed");
                Err(e)
            }
            Ok(Ok(status)) => judge(&status, &self.options.audiences, token),
        }
    }

    /// How long `outcome` may be cached, if at all.
    fn cache_lifetime(&self, outcome: &Outcome, token: &str) -> Option<Duration> {
        let o = &self.options;
        let lifetime = match outcome {
            Ok(_) => match token_exp(token) {
                Some(exp) => {
                    let now = (self.clock)()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default();
                    Duration::from_secs(exp)
                        .checked_sub(now)?
                        .checked_sub(o.expiry_margin)?
                }
                None => o.default_positive_ttl,
            }
            .min(o.max_positive_ttl),
            Err(e) if e.is_unavailable() => return None,
            Err(_) => o.negative_ttl,
        };
        Some(lifetime).filter(|l| !l.is_zero())
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `workload_ca_tokenreview_*`.
struct Metrics {
    /// `workload_ca_tokenreview_cache_lookups_total{result}`: `hit`,
    /// `negative_hit` (a cached refusal), `miss` (a review started),
    /// `joined` (a review already under way shared).
    lookups: IntCounterVec,
    /// `workload_ca_tokenreview_outcomes_total{outcome}`: one per review
    /// (and per token refused before review), by [`ReviewError::metric_label`]
    /// or `authenticated`.
    outcomes: IntCounterVec,
    in_flight: IntGauge,
    queued: IntGauge,
    entries: IntGauge,
    queue_wait: Histogram,
    duration: Histogram,
}

impl Metrics {
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let lookups = IntCounterVec::new(
            Opts::new(
                "workload_ca_tokenreview_cache_lookups_total",
                "Token lookups in the TokenReview cache, by result (hit, negative_hit, miss, joined).",
            ),
            &["result"],
        )?;
        let outcomes = IntCounterVec::new(
            Opts::new(
                "workload_ca_tokenreview_outcomes_total",
                "TokenReviews by outcome: authenticated, or the reason for refusal or failure.",
            ),
            &["outcome"],
        )?;
        let in_flight = IntGauge::new(
            "workload_ca_tokenreview_in_flight",
            "TokenReviews at the API server now.",
        )?;
        let queued = IntGauge::new(
            "workload_ca_tokenreview_queued",
            "TokenReviews waiting for a slot now.",
        )?;
        let entries = IntGauge::new(
            "workload_ca_tokenreview_cache_entries",
            "Entries in the TokenReview cache.",
        )?;
        let queue_wait = Histogram::with_opts(
            HistogramOpts::new(
                "workload_ca_tokenreview_queue_wait_seconds",
                "Time a TokenReview waited for a slot.",
            )
            .buckets(SECONDS_BUCKETS.to_vec()),
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "workload_ca_tokenreview_duration_seconds",
                "Time a TokenReview took at the API server.",
            )
            .buckets(SECONDS_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(lookups.clone()))?;
        registry.register(Box::new(outcomes.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(queued.clone()))?;
        registry.register(Box::new(entries.clone()))?;
        registry.register(Box::new(queue_wait.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        for l in LOOKUPS {
            lookups.with_label_values(&[l]);
        }
        for o in OUTCOMES {
            outcomes.with_label_values(&[o]);
        }
        Ok(Self {
            lookups,
            outcomes,
            in_flight,
            queued,
            entries,
            queue_wait,
            duration,
        })
    }

    fn outcome(&self, outcome: &Outcome) {
        let label = match outcome {
            Ok(_) => "authenticated",
            Err(e) => e.metric_label(),
        };
        self.outcomes.with_label_values(&[label]).inc();
    }
}

mod answer;
mod cache;
use answer::{digest, implausible, judge, sanitize, token_exp};
use cache::Cache;
#[cfg(test)]
mod tests;
