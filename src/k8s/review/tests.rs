//! Tests of the TokenReview path (`super`), with a scripted backend.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;

use super::*;

/// The wall clock at the start of every test, in Unix seconds.
const NOW: u64 = 1_800_000_000;

/// A JWT-shaped service-account token for our audience, distinct per
/// `tag`, expiring at `exp` (default: in an hour).
fn jwt(tag: &str, exp: Option<u64>) -> String {
    jwt_claims(
        tag,
        json!({
            "sub": format!("system:serviceaccount:prod:{tag}"),
            "aud": ["istio-ca"],
            "exp": exp.unwrap_or(NOW + 3600),
        }),
    )
}

fn jwt_claims(tag: &str, claims: serde_json::Value) -> String {
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
    // Exactly at the bound: a plausible token padded to 16 KiB is sent.
    let base = jwt("pad", None);
    let padded = format!("{base}{}", "a".repeat(MAX_TOKEN_BYTES - base.len()));
    assert_eq!(padded.len(), MAX_TOKEN_BYTES);
    assert!(r.review(&padded).await.is_ok());
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
async fn an_accepted_token_is_cached_at_most_the_ceiling_and_implausible_ones_never_reviewed() {
    let backend = Arc::new(Scripted::accepting());
    let (r, _) = reviewer(&backend, ReviewOptions::default());
    let long = jwt("long", Some(NOW + 86_400));
    r.review(&long).await.unwrap();
    assert_eq!(backend.calls(), 1);
    tokio::time::advance(Duration::from_secs(299)).await;
    r.review(&long).await.unwrap();
    assert_eq!(backend.calls(), 1);
    tokio::time::advance(Duration::from_secs(2)).await;
    r.review(&long).await.unwrap();
    assert_eq!(backend.calls(), 2, "at most 5 minutes whatever the exp");

    // What cannot pass a review costs none: no exp, an unreadable exp,
    // not a JWT, not a service account, another audience, expired.
    let sa = |t: &str| format!("system:serviceaccount:prod:{t}");
    let implausible = [
        jwt_claims("no-exp", json!({"sub": sa("x"), "aud": ["istio-ca"]})),
        jwt_claims(
            "bad-exp",
            json!({"sub": sa("x"), "aud": ["istio-ca"], "exp": "tomorrow"}),
        ),
        "not-a-jwt".to_owned(),
        jwt_claims(
            "user",
            json!({"sub": "alice", "aud": ["istio-ca"], "exp": NOW + 60}),
        ),
        jwt_claims(
            "aud",
            json!({"sub": sa("x"), "aud": ["vault"], "exp": NOW + 60}),
        ),
        jwt_claims(
            "aud-str",
            json!({"sub": sa("x"), "aud": "istio-ca", "exp": NOW + 600_000}),
        ),
        jwt_claims(
            "old",
            json!({"sub": sa("x"), "aud": ["istio-ca"], "exp": NOW - 1}),
        ),
    ];
    for (i, t) in implausible.iter().enumerate() {
        let e = r.review(t).await;
        // A lone string audience is still ours (RFC 7519 allows it).
        if i == 5 {
            assert!(e.is_ok(), "{e:?}");
            continue;
        }
        assert_eq!(e.unwrap_err().metric_label(), "bad_token", "{i}");
    }
    assert_eq!(backend.calls(), 3, "only the plausible token was reviewed");
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
