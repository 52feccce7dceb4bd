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

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
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
        let bad = if token.is_empty() {
            Some("empty")
        } else if token.len() > MAX_TOKEN_BYTES {
            Some("larger than 16 KiB")
        } else {
            None
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
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
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

/// What a TokenReview status says of the token, judged.
fn judge(status: &TokenReviewStatus, audiences: &[String], token: &str) -> Outcome {
    let error = status.error.as_deref().unwrap_or_default();
    if status.authenticated != Some(true) || !error.is_empty() {
        let why = if error.is_empty() {
            "not authenticated"
        } else {
            error
        };
        return Err(ReviewError::NotAuthenticated(sanitize(why, token)));
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.as_deref().unwrap_or_default();
    let (namespace, service_account) = service_account(username)
        .ok_or_else(|| ReviewError::NotServiceAccount(sanitize(username, token)))?;
    if !user
        .groups
        .iter()
        .flatten()
        .any(|g| g == SERVICE_ACCOUNTS_GROUP)
    {
        return Err(ReviewError::NotInServiceAccountsGroup);
    }
    let granted = status.audiences.as_deref().unwrap_or_default();
    if !granted.iter().any(|a| audiences.contains(a)) {
        return Err(ReviewError::Audience(sanitize(&granted.join(","), token)));
    }
    let pod = match bound(&user, EXTRA_POD_NAME, EXTRA_POD_UID, token)? {
        (Some(name), Some(uid)) => Some(BoundObject { name, uid }),
        (None, None) => None,
        _ => {
            return Err(ReviewError::BadBinding(format!(
                "{EXTRA_POD_NAME} and {EXTRA_POD_UID} come together"
            )));
        }
    };
    // A node name alone is what the API server reports for a token whose
    // node reference has no UID; a UID alone names nothing.
    let node = match bound(&user, EXTRA_NODE_NAME, EXTRA_NODE_UID, token)? {
        (Some(name), uid) => Some(BoundObject {
            name,
            uid: uid.unwrap_or_default(),
        }),
        (None, None) => None,
        (None, Some(_)) => {
            return Err(ReviewError::BadBinding(format!(
                "{EXTRA_NODE_UID} without {EXTRA_NODE_NAME}"
            )));
        }
    };
    Ok(TokenFacts {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        service_account_uid: user.uid.filter(|u| !u.is_empty()),
        pod,
        node,
    })
}

/// `(namespace, service account)` of `system:serviceaccount:<ns>:<sa>`.
fn service_account(username: &str) -> Option<(&str, &str)> {
    let (ns, sa) = username
        .strip_prefix(SERVICE_ACCOUNT_USER_PREFIX)?
        .split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then_some((ns, sa))
}

/// The single values of two `user.extra` keys, each absent or one
/// non-empty value.
fn bound(
    user: &UserInfo,
    name_key: &str,
    uid_key: &str,
    token: &str,
) -> Result<(Option<String>, Option<String>), ReviewError> {
    let one = |key: &str| -> Result<Option<String>, ReviewError> {
        match user
            .extra
            .as_ref()
            .and_then(|e| e.get(key))
            .map(Vec::as_slice)
        {
            None | Some([]) => Ok(None),
            Some([v]) if !v.is_empty() => Ok(Some(v.clone())),
            Some(values) => Err(ReviewError::BadBinding(format!(
                "{key} holds {} values, first {}",
                values.len(),
                sanitize(
                    values.first().map(String::as_str).unwrap_or_default(),
                    token
                )
            ))),
        }
    };
    Ok((one(name_key)?, one(uid_key)?))
}

/// Text from the API server made safe to show: the token blanked out should
/// it appear, escaped, and bounded.
fn sanitize(text: &str, token: &str) -> String {
    if !token.is_empty() && text.contains(token) {
        crate::logsafe::peer(&text.replace(token, "<token>")).to_string()
    } else {
        crate::logsafe::peer(text).to_string()
    }
}

/// The `exp` claim of a JWT, read without verifying anything.
fn token_exp(token: &str) -> Option<u64> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?;
    exp.as_u64().or_else(|| {
        exp.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    })
}

fn digest(token: &str) -> Key {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(d.as_ref());
    key
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Reviews by token digest, bounded, each until its own expiry.
struct Cache {
    entries: HashMap<Key, Entry>,
    /// Every entry by (expiry, insertion number): expired ones first, then
    /// the soonest to expire.
    by_expiry: BTreeMap<(Instant, u64), Key>,
    max: usize,
    seq: u64,
}

struct Entry {
    outcome: Outcome,
    expires: Instant,
    seq: u64,
}

impl Cache {
    fn new(max: usize) -> Self {
        Self {
            entries: HashMap::new(),
            by_expiry: BTreeMap::new(),
            max,
            seq: 0,
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn get(&mut self, key: &Key, now: Instant) -> Option<Outcome> {
        let e = self.entries.get(key)?;
        if e.expires > now {
            return Some(e.outcome.clone());
        }
        self.remove(key);
        None
    }

    fn remove(&mut self, key: &Key) {
        if let Some(e) = self.entries.remove(key) {
            self.by_expiry.remove(&(e.expires, e.seq));
        }
    }

    fn insert(&mut self, key: Key, outcome: Outcome, expires: Instant, now: Instant) {
        self.remove(&key);
        if self.max == 0 || expires <= now {
            return;
        }
        // Expired entries first, whatever the room (each is removed once).
        while let Some((&(at, _), _)) = self.by_expiry.first_key_value() {
            if at > now {
                break;
            }
            self.pop_first();
        }
        // Then the soonest to expire, until there is room.
        while self.entries.len() >= self.max {
            if !self.pop_first() {
                break;
            }
        }
        self.seq = self.seq.wrapping_add(1);
        self.by_expiry.insert((expires, self.seq), key);
        self.entries.insert(
            key,
            Entry {
                outcome,
                expires,
                seq: self.seq,
            },
        );
    }

    fn pop_first(&mut self) -> bool {
        match self.by_expiry.pop_first() {
            Some((_, key)) => {
                self.entries.remove(&key);
                true
            }
            None => false,
        }
    }
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use serde_json::json;

    use super::*;

    /// The wall clock at the start of every test, in Unix seconds.
    const NOW: u64 = 1_800_000_000;

    /// A JWT-shaped token, distinct per `tag`, with `exp` when given.
    fn jwt(tag: &str, exp: Option<u64>) -> String {
        let claims = match exp {
            Some(exp) => json!({ "sub": tag, "exp": exp }),
            None => json!({ "sub": tag }),
        };
        format!(
            "{}.{}.sig-{tag}",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }

    fn extra(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<String>> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), vec![(*v).to_owned()]))
            .collect()
    }

    /// What the API server answers for a pod-bound token of default/web.
    fn accepted() -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec!["istio-ca".into()]),
            error: None,
            user: Some(UserInfo {
                username: Some("system:serviceaccount:default:web".into()),
                uid: Some("sa-uid".into()),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    "system:serviceaccounts:default".into(),
                    "system:authenticated".into(),
                ]),
                extra: Some(extra(&[
                    (EXTRA_POD_NAME, "web-1"),
                    (EXTRA_POD_UID, "pod-uid"),
                    (EXTRA_NODE_NAME, "node-a"),
                    (EXTRA_NODE_UID, "node-uid"),
                    ("authentication.kubernetes.io/credential-id", "JTI=abc"),
                ])),
            }),
        }
    }

    fn refused(why: &str) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(false),
            error: Some(why.into()),
            ..TokenReviewStatus::default()
        }
    }

    type Answer = Box<dyn Fn(&str) -> Result<TokenReviewStatus, Error> + Send + Sync>;

    /// A backend answering by script, counting calls and the most in flight.
    struct Scripted {
        answer: Answer,
        delay: Duration,
        stuck: bool,
        calls: AtomicUsize,
        in_flight: AtomicUsize,
        max_in_flight: AtomicUsize,
        audiences: Mutex<Vec<Vec<String>>>,
    }

    impl Scripted {
        fn new(
            answer: impl Fn(&str) -> Result<TokenReviewStatus, Error> + Send + Sync + 'static,
        ) -> Self {
            Self {
                answer: Box::new(answer),
                delay: Duration::ZERO,
                stuck: false,
                calls: AtomicUsize::new(0),
                in_flight: AtomicUsize::new(0),
                max_in_flight: AtomicUsize::new(0),
                audiences: Mutex::new(Vec::new()),
            }
        }
        fn accepting() -> Self {
            Self::new(|_| Ok(accepted()))
        }
        fn delayed(mut self, delay: Duration) -> Self {
            self.delay = delay;
            self
        }
        fn stuck(mut self) -> Self {
            self.stuck = true;
            self
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    struct Leave<'a>(&'a AtomicUsize);
    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl ReviewBackend for Scripted {
        fn review<'a>(&'a self, token: &'a str, audiences: &'a [String]) -> ReviewFuture<'a> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                let _leave = Leave(&self.in_flight);
                self.max_in_flight.fetch_max(now, Ordering::SeqCst);
                self.audiences.lock().unwrap().push(audiences.to_vec());
                if self.stuck {
                    std::future::pending::<()>().await;
                }
                if !self.delay.is_zero() {
                    tokio::time::sleep(self.delay).await;
                }
                (self.answer)(token)
            })
        }
    }

    /// A reviewer whose wall clock starts at [`NOW`] and follows tokio's
    /// (paused) clock.
    fn reviewer(backend: &Arc<Scripted>, options: ReviewOptions) -> (TokenReviewer, Registry) {
        let registry = Registry::new();
        let start = Instant::now();
        let clock: WallClock =
            Arc::new(move || SystemTime::UNIX_EPOCH + Duration::from_secs(NOW) + start.elapsed());
        let backend: Arc<dyn ReviewBackend> = backend.clone();
        let r = TokenReviewer::with_clock(backend, options, &registry, clock).unwrap();
        (r, registry)
    }

    fn lookups(r: &TokenReviewer, result: &str) -> u64 {
        r.inner.metrics.lookups.with_label_values(&[result]).get()
    }

    fn outcomes(r: &TokenReviewer, outcome: &str) -> u64 {
        r.inner.metrics.outcomes.with_label_values(&[outcome]).get()
    }

    #[tokio::test(start_paused = true)]
    async fn a_valid_review_gives_every_fact() {
        let backend = Arc::new(Scripted::accepting());
        let (r, registry) = reviewer(&backend, ReviewOptions::default());
        let facts = r.review(&jwt("a", None)).await.unwrap();
        assert_eq!(
            facts,
            TokenFacts {
                namespace: "default".into(),
                service_account: "web".into(),
                service_account_uid: Some("sa-uid".into()),
                pod: Some(BoundObject {
                    name: "web-1".into(),
                    uid: "pod-uid".into()
                }),
                node: Some(BoundObject {
                    name: "node-a".into(),
                    uid: "node-uid".into()
                }),
            }
        );
        assert_eq!(
            *backend.audiences.lock().unwrap(),
            vec![vec!["istio-ca".to_owned()]]
        );
        assert_eq!(outcomes(&r, "authenticated"), 1);
        // Every metric is registered under its name.
        let mut text = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut text,
        )
        .unwrap();
        let text = String::from_utf8(text).unwrap();
        for name in [
            "workload_ca_tokenreview_cache_lookups_total{result=\"miss\"} 1",
            "workload_ca_tokenreview_outcomes_total{outcome=\"authenticated\"} 1",
            "workload_ca_tokenreview_in_flight 0",
            "workload_ca_tokenreview_queued 0",
            "workload_ca_tokenreview_cache_entries 1",
            "workload_ca_tokenreview_queue_wait_seconds_count 1",
            "workload_ca_tokenreview_duration_seconds_count 1",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        // A second reviewer cannot register the same metrics twice.
        let again = TokenReviewer::new(backend.clone(), ReviewOptions::default(), &registry);
        assert!(matches!(again, Err(Error::Config(_))));
        let none = ReviewOptions {
            audiences: vec![],
            ..ReviewOptions::default()
        };
        assert!(TokenReviewer::new(backend, none, &Registry::new()).is_err());
    }

    #[test]
    fn what_is_not_a_service_account_of_ours_is_refused() {
        let ours = vec!["istio-ca".to_owned()];
        let judged = |s: TokenReviewStatus| judge(&s, &ours, "the-token");
        assert!(judged(accepted()).is_ok());

        let with_user = |f: &dyn Fn(&mut UserInfo)| {
            let mut s = accepted();
            f(s.user.as_mut().unwrap());
            judged(s)
        };
        for name in [
            "alice",
            "system:serviceaccount:default",
            "system:serviceaccount::web",
            "system:serviceaccount:default:",
            "system:serviceaccount:a:b:c",
            "system:serviceaccounts:default:web",
        ] {
            let e = with_user(&|u| u.username = Some(name.into())).unwrap_err();
            assert_eq!(e.metric_label(), "not_service_account", "{name}");
            assert!(!e.is_unavailable());
        }
        let e = with_user(&|u| u.username = None).unwrap_err();
        assert_eq!(e.metric_label(), "not_service_account");

        let e = with_user(&|u| {
            u.groups = Some(vec![
                "system:serviceaccounts:default".into(),
                "system:authenticated".into(),
            ])
        })
        .unwrap_err();
        assert_eq!(e, ReviewError::NotInServiceAccountsGroup);
        assert!(with_user(&|u| u.groups = None).is_err());

        for audiences in [Some(vec!["kubernetes".to_owned()]), Some(vec![]), None] {
            let mut s = accepted();
            s.audiences = audiences.clone();
            let e = judged(s).unwrap_err();
            assert_eq!(e.metric_label(), "audience", "{audiences:?}");
            assert!(!e.is_unavailable());
        }
        // One of ours among others is enough.
        let mut s = accepted();
        s.audiences = Some(vec!["other".into(), "istio-ca".into()]);
        assert!(judged(s).is_ok());

        // Not authenticated, or authenticated with an error.
        let e = judged(refused("token has expired")).unwrap_err();
        assert_eq!(
            e,
            ReviewError::NotAuthenticated("\"token has expired\"".into())
        );
        let mut s = accepted();
        s.error = Some("lookup failed".into());
        assert_eq!(judged(s).unwrap_err().metric_label(), "not_authenticated");
        let mut s = accepted();
        s.authenticated = None;
        assert_eq!(judged(s).unwrap_err().metric_label(), "not_authenticated");

        // Bindings: a pod comes with name and UID, one value each; a node
        // may come by name alone.
        let e = with_user(&|u| {
            u.extra = Some(extra(&[(EXTRA_POD_NAME, "web-1")]));
        })
        .unwrap_err();
        assert_eq!(e.metric_label(), "bad_binding");
        let e = with_user(&|u| {
            let mut x = extra(&[(EXTRA_POD_UID, "u")]);
            x.insert(EXTRA_POD_NAME.into(), vec!["a".into(), "b".into()]);
            u.extra = Some(x);
        })
        .unwrap_err();
        assert_eq!(e.metric_label(), "bad_binding");
        let e = with_user(&|u| u.extra = Some(extra(&[(EXTRA_NODE_UID, "n")]))).unwrap_err();
        assert_eq!(e.metric_label(), "bad_binding");
        let facts = with_user(&|u| u.extra = Some(extra(&[(EXTRA_NODE_NAME, "node-a")]))).unwrap();
        assert_eq!(facts.pod, None);
        assert_eq!(
            facts.node,
            Some(BoundObject {
                name: "node-a".into(),
                uid: String::new()
            })
        );
        let facts = with_user(&|u| {
            u.extra = None;
            u.uid = None;
        })
        .unwrap();
        assert_eq!(
            (facts.pod, facts.node, facts.service_account_uid),
            (None, None, None)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refusal_texts_are_escaped_bounded_and_never_carry_the_token() {
        let token = jwt("secret", None);
        let echoed = format!("bad token {token}\nsecond line {}", "x".repeat(4000));
        let backend = Arc::new(Scripted::new(move |_| Ok(refused(&echoed))));
        let (r, _) = reviewer(&backend, ReviewOptions::default());
        let e = r.review(&token).await.unwrap_err();
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains(&token), "{shown}");
        assert!(!shown.contains('\n'), "{shown}");
        assert!(shown.contains("<token>"), "{shown}");
        assert!(
            e.to_string().len() < 2 * crate::limits::MAX_LOGGED_PEER_BYTES,
            "{e}"
        );
        // An API error's text too.
        let t2 = token.clone();
        let backend = Arc::new(Scripted::new(move |_| {
            Err(Error::Config(format!("server said {t2}")))
        }));
        let (r, _) = reviewer(&backend, ReviewOptions::default());
        let e = r.review(&token).await.unwrap_err();
        assert_eq!(e.metric_label(), "api_error");
        assert!(!format!("{e} {e:?}").contains(&token));
        assert_eq!(token_id(&token).len(), 16);
        assert!(!format!("{r:?}").contains(&token));
    }

    #[tokio::test(start_paused = true)]
    async fn empty_or_oversized_tokens_are_not_sent() {
        let backend = Arc::new(Scripted::accepting());
        let (r, _) = reviewer(&backend, ReviewOptions::default());
        for t in [String::new(), "a".repeat(MAX_TOKEN_BYTES + 1)] {
            let e = r.review(&t).await.unwrap_err();
            assert_eq!(e.metric_label(), "bad_token");
            assert!(!e.is_unavailable());
        }
        assert!(r.review(&"a".repeat(MAX_TOKEN_BYTES)).await.is_ok());
        assert_eq!(backend.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_accepted_token_is_cached_until_its_exp_less_the_margin() {
        let backend = Arc::new(Scripted::accepting());
        let (r, _) = reviewer(&backend, ReviewOptions::default());
        let token = jwt("a", Some(NOW + 100));
        r.review(&token).await.unwrap();
        assert_eq!(backend.calls(), 1);
        tokio::time::advance(Duration::from_secs(89)).await;
        r.review(&token).await.unwrap();
        assert_eq!(backend.calls(), 1, "cached until exp - 10 s");
        assert_eq!(lookups(&r, "hit"), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        r.review(&token).await.unwrap();
        assert_eq!(backend.calls(), 2, "gone at exp - 10 s");
        // Within the margin of its exp: not cached at all.
        r.review(&token).await.unwrap();
        assert_eq!(backend.calls(), 3);
        assert_eq!(r.cached_entries(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_accepted_token_is_cached_at_most_the_ceiling_and_briefly_without_exp() {
        let backend = Arc::new(Scripted::accepting());
        let (r, _) = reviewer(&backend, ReviewOptions::default());
        let long = jwt("long", Some(NOW + 86_400));
        let no_exp = jwt("no-exp", None);
        let opaque = "not-a-jwt".to_owned();
        let bad_exp = format!(
            "{}.{}.s",
            URL_SAFE_NO_PAD.encode("{}"),
            URL_SAFE_NO_PAD.encode(r#"{"exp":"tomorrow"}"#)
        );
        for t in [&long, &no_exp, &opaque, &bad_exp] {
            r.review(t).await.unwrap();
        }
        assert_eq!(backend.calls(), 4);
        tokio::time::advance(Duration::from_secs(59)).await;
        for t in [&long, &no_exp, &opaque, &bad_exp] {
            r.review(t).await.unwrap();
        }
        assert_eq!(backend.calls(), 4);
        tokio::time::advance(Duration::from_secs(2)).await;
        for t in [&no_exp, &opaque, &bad_exp] {
            r.review(t).await.unwrap();
        }
        assert_eq!(backend.calls(), 7, "60 s without a readable exp");
        tokio::time::advance(Duration::from_secs(299 - 61)).await;
        r.review(&long).await.unwrap();
        assert_eq!(backend.calls(), 7);
        tokio::time::advance(Duration::from_secs(2)).await;
        r.review(&long).await.unwrap();
        assert_eq!(backend.calls(), 8, "at most 5 minutes whatever the exp");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_token_is_cached_briefly() {
        let backend = Arc::new(Scripted::new(|_| Ok(refused("invalid bearer token"))));
        let (r, _) = reviewer(&backend, ReviewOptions::default());
        let token = jwt("bad", Some(NOW + 3600));
        for _ in 0..5 {
            let e = r.review(&token).await.unwrap_err();
            assert_eq!(e.metric_label(), "not_authenticated");
            assert!(!e.is_unavailable());
        }
        assert_eq!(backend.calls(), 1);
        assert_eq!(lookups(&r, "negative_hit"), 4);
        tokio::time::advance(Duration::from_secs(9)).await;
        r.review(&token).await.unwrap_err();
        assert_eq!(backend.calls(), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        r.review(&token).await.unwrap_err();
        assert_eq!(backend.calls(), 2, "refusals are cached 10 s only");
    }

    #[tokio::test(start_paused = true)]
    async fn a_review_that_could_not_be_made_is_never_cached() {
        let backend = Arc::new(Scripted::new(|_| {
            Err(Error::Config("connection refused".into()))
        }));
        let (r, _) = reviewer(&backend, ReviewOptions::default());
        let token = jwt("a", Some(NOW + 3600));
        for _ in 0..3 {
            let e = r.review(&token).await.unwrap_err();
            assert_eq!(e.metric_label(), "api_error");
            assert!(e.is_unavailable());
        }
        assert_eq!(backend.calls(), 3);
        assert_eq!(r.cached_entries(), 0);

        // Too slow: a timeout, also not cached.
        let backend = Arc::new(Scripted::accepting().delayed(Duration::from_secs(6)));
        let (r, _) = reviewer(&backend, ReviewOptions::default());
        let started = Instant::now();
        let e = r.review(&token).await.unwrap_err();
        assert_eq!(e, ReviewError::Timeout(Duration::from_secs(5)));
        assert!(e.is_unavailable());
        assert!(started.elapsed() >= Duration::from_secs(5));
        r.review(&token).await.unwrap_err();
        assert_eq!(backend.calls(), 2);
        assert_eq!(r.cached_entries(), 0);
        assert_eq!(outcomes(&r, "timeout"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_never_holds_more_than_its_bound() {
        let backend = Arc::new(Scripted::accepting());
        let options = ReviewOptions {
            max_entries: 100,
            ..ReviewOptions::default()
        };
        let (r, _) = reviewer(&backend, options);
        for i in 0..1_000 {
            r.review(&jwt(&format!("t{i}"), None)).await.unwrap();
            assert!(r.cached_entries() <= 100, "{} entries", r.cached_entries());
        }
        assert_eq!(r.cached_entries(), 100);
        assert_eq!(r.inner.metrics.entries.get(), 100);
        assert_eq!(backend.calls(), 1_000);
        // The newest stayed, the oldest went.
        r.review(&jwt("t999", None)).await.unwrap();
        assert_eq!(backend.calls(), 1_000);
        r.review(&jwt("t0", None)).await.unwrap();
        assert_eq!(backend.calls(), 1_001);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_bad_tokens_does_not_push_out_good_ones() {
        let backend = Arc::new(Scripted::new(|t| {
            if t.contains("sig-bad") {
                Ok(refused("invalid bearer token"))
            } else {
                Ok(accepted())
            }
        }));
        let options = ReviewOptions {
            max_entries: 100,
            ..ReviewOptions::default()
        };
        let (r, _) = reviewer(&backend, options);
        let good: Vec<String> = (0..50).map(|i| jwt(&format!("good{i}"), None)).collect();
        for t in &good {
            r.review(t).await.unwrap();
        }
        for i in 0..1_000 {
            let bad = jwt(&format!("bad{i}"), None);
            assert!(r.review(&bad).await.is_err());
            assert!(r.cached_entries() <= 100);
        }
        assert_eq!(backend.calls(), 1_050);
        for t in &good {
            r.review(t).await.unwrap();
        }
        assert_eq!(backend.calls(), 1_050, "the good tokens stayed cached");
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_served_within_the_cap() {
        let backend = Arc::new(Scripted::accepting().delayed(Duration::from_millis(50)));
        let (r, _) = reviewer(&backend, ReviewOptions::default());
        let started = Instant::now();
        let tasks: Vec<_> = (0..1_000)
            .map(|i| {
                let r = r.clone();
                tokio::spawn(async move { r.review(&jwt(&format!("t{i}"), None)).await })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap().is_ok());
        }
        assert_eq!(backend.calls(), 1_000);
        assert_eq!(backend.max_in_flight.load(Ordering::SeqCst), 16);
        // 63 rounds of 16 at 50 ms each.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(3_150) && took < Duration::from_secs(4),
            "{took:?}"
        );
        let m = &r.inner.metrics;
        assert_eq!(m.queue_wait.get_sample_count(), 1_000);
        // The last ones waited about 3.1 s each; the sum is far above zero.
        assert!(
            m.queue_wait.get_sample_sum() > 1_000.0,
            "{}",
            m.queue_wait.get_sample_sum()
        );
        assert_eq!(m.duration.get_sample_count(), 1_000);
        assert_eq!((m.in_flight.get(), m.queued.get()), (0, 0));
        assert_eq!(outcomes(&r, "authenticated"), 1_000);
        assert_eq!(outcomes(&r, "queue_deadline"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn queued_reviews_fail_unavailable_at_the_deadline_not_before() {
        let backend = Arc::new(Scripted::accepting().stuck());
        let options = ReviewOptions {
            max_in_flight: 2,
            queue_timeout: Duration::from_secs(10),
            review_timeout: Duration::from_secs(60),
            ..ReviewOptions::default()
        };
        let (r, _) = reviewer(&backend, options);
        let started = Instant::now();
        let tasks: Vec<_> = (0..5)
            .map(|i| {
                let r = r.clone();
                tokio::spawn(async move {
                    let out = r.review(&jwt(&format!("t{i}"), None)).await;
                    (out, started.elapsed())
                })
            })
            .collect();
        let mut deadline = 0;
        let mut timeout = 0;
        for t in tasks {
            let (out, at) = t.await.unwrap();
            let e = out.unwrap_err();
            assert!(e.is_unavailable());
            match e {
                ReviewError::QueueDeadline(_) => {
                    deadline += 1;
                    assert!(
                        at >= Duration::from_secs(10) && at < Duration::from_millis(10_100),
                        "{at:?}"
                    );
                }
                ReviewError::Timeout(_) => {
                    timeout += 1;
                    assert!(
                        at >= Duration::from_secs(60) && at < Duration::from_millis(60_100),
                        "{at:?}"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((deadline, timeout), (3, 2));
        assert_eq!(backend.calls(), 2);
        assert_eq!(backend.max_in_flight.load(Ordering::SeqCst), 2);
        assert_eq!(outcomes(&r, "queue_deadline"), 3);
        assert_eq!(r.inner.metrics.queue_wait.get_sample_count(), 5);
        assert_eq!((r.cached_entries(), r.reviews_under_way()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_for_one_token_share_one_review() {
        let backend = Arc::new(Scripted::accepting().delayed(Duration::from_millis(50)));
        let (r, _) = reviewer(&backend, ReviewOptions::default());
        let token = jwt("shared", Some(NOW + 3600));
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let (r, token) = (r.clone(), token.clone());
                tokio::spawn(async move { r.review(&token).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().service_account, "web");
        }
        assert_eq!(backend.calls(), 1);
        assert_eq!((lookups(&r, "miss"), lookups(&r, "joined")), (1, 99));
        assert_eq!(r.reviews_under_way(), 0);

        // Refusals and failures are shared the same way.
        let backend = Arc::new(
            Scripted::new(|_| Err(Error::Config("down".into()))).delayed(Duration::from_millis(50)),
        );
        let (r, _) = reviewer(&backend, ReviewOptions::default());
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let (r, token) = (r.clone(), token.clone());
                tokio::spawn(async move { r.review(&token).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap_err().metric_label(), "api_error");
        }
        assert_eq!(backend.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_review_nobody_waits_for_is_withdrawn() {
        let backend = Arc::new(Scripted::accepting().delayed(Duration::from_secs(1)));
        let options = ReviewOptions {
            max_in_flight: 1,
            ..ReviewOptions::default()
        };
        let (r, _) = reviewer(&backend, options);
        let spawn = |tag: &'static str| {
            let r = r.clone();
            tokio::spawn(async move { r.review(&jwt(tag, None)).await })
        };
        let a = spawn("a");
        let b = spawn("b");
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(r.reviews_under_way(), 2);
        assert_eq!(r.inner.metrics.queued.get(), 1);
        b.abort();
        assert!(b.await.unwrap_err().is_cancelled());
        assert_eq!(r.reviews_under_way(), 1);
        a.await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(backend.calls(), 1, "b was never reviewed");
        assert_eq!(outcomes(&r, "abandoned"), 1);
        assert_eq!(r.inner.metrics.queued.get(), 0);

        // Withdrawn only when nobody waits: the first caller leaving does not
        // cancel the second's review.
        let c1 = spawn("c");
        let c2 = spawn("c");
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        c1.abort();
        assert!(c1.await.unwrap_err().is_cancelled());
        assert!(c2.await.unwrap().is_ok());
        assert_eq!(backend.calls(), 2);

        // A review already at the API server finishes and is cached.
        let d = spawn("d");
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(r.inner.metrics.in_flight.get(), 1);
        d.abort();
        assert!(d.await.unwrap_err().is_cancelled());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(backend.calls(), 3);
        r.review(&jwt("d", None)).await.unwrap();
        assert_eq!(backend.calls(), 3);
    }

    #[tokio::test]
    async fn the_kube_backend_posts_a_token_review() {
        type Seen = Arc<Mutex<Vec<(http::Method, String, serde_json::Value)>>>;
        let seen: Seen = Arc::default();
        let log = seen.clone();
        let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let log = log.clone();
            async move {
                let (parts, body) = req.into_parts();
                let sent: serde_json::Value = serde_json::from_slice(&body.collect_bytes().await?)?;
                log.lock()
                    .unwrap()
                    .push((parts.method, parts.uri.path().to_owned(), sent.clone()));
                let (status, answer) = if sent["spec"]["token"] == "forbidden" {
                    (
                        403,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "message": "tokenreviews is forbidden", "reason": "Forbidden", "code": 403}),
                    )
                } else {
                    let mut answer = sent;
                    answer["status"] = json!({
                        "authenticated": true,
                        "audiences": ["istio-ca"],
                        "user": {"username": "system:serviceaccount:default:web",
                                 "groups": ["system:serviceaccounts"]},
                    });
                    (201, answer)
                };
                let body = kube::client::Body::from(serde_json::to_vec(&answer)?);
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    http::Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(body)?,
                )
            }
        });
        let backend = KubeReviewBackend::new(kube::Client::new(service, "default"));
        let status = backend
            .review("tok", &["istio-ca".to_owned()])
            .await
            .unwrap();
        assert_eq!(status.authenticated, Some(true));
        {
            let seen = seen.lock().unwrap();
            let (method, path, sent) = &seen[0];
            assert_eq!(*method, http::Method::POST);
            assert_eq!(path, "/apis/authentication.k8s.io/v1/tokenreviews");
            assert_eq!(sent["apiVersion"], "authentication.k8s.io/v1");
            assert_eq!(sent["kind"], "TokenReview");
            assert_eq!(
                sent["spec"],
                json!({"token": "tok", "audiences": ["istio-ca"]})
            );
        }
        let e = backend.review("forbidden", &[]).await.unwrap_err();
        assert_eq!(e.metric_label(), "api");
    }
}
