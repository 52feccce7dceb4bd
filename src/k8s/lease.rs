//! Leader election through a `coordination.k8s.io/v1` Lease, as client-go
//! does it: the holder renews the Lease every [`LeaseOptions::retry`]; a
//! candidate takes it over (optimistic concurrency on its resourceVersion)
//! only once it has seen no renewal for a whole [`LeaseOptions::duration`],
//! measured on its own clock from when it last saw the Lease change, so
//! clock skew between replicas does not matter. A leader that has not
//! renewed for [`LeaseOptions::renew_deadline`] (shorter than the
//! duration) steps down before anyone else may take over: two replicas
//! never both believe they lead, as long as their clocks run at the same
//! rate. On shutdown the leader releases the Lease so the next one need
//! not wait.
//!
//! **An API server that does not answer.** Every round (read, then create
//! or replace) is given up at the leader's renew deadline, so leadership
//! ends then even when a call hangs: on a connection to an API server gone
//! silent (a partition, its host gone) a call would otherwise wait for the
//! client's read timeout (75 s), long after another replica took the
//! Lease, and the old leader would go on believing it leads. The renew
//! deadline is counted from before the round that renewed, never from its
//! answer. Releasing at shutdown is bounded the same way.
//!
//! **Writes of a leader that lost the Lease.** A replica stops issuing
//! single-writer writes when [`Leadership`] turns false (each controller
//! checks it before each write, or aborts its writes in flight), but a
//! write already sent cannot be called back: over a partition TCP delivers
//! it late, after another replica took over (`tests/kube_lease_loss.rs`
//! plays that). So every single-writer write is conditional: a create
//! fails if the object exists, an update or delete carries the
//! resourceVersion (and UID) it was decided on, so a late write that lands
//! after the new leader wrote is refused (409) and changes nothing, and one
//! that lands before is what the new leader then sees and judges (the
//! deletion of a spent evidence report, [`super::evidence`], included).
//!
//! What leading means is up to the caller: it reads [`Leadership`].
//! Single-writer work (the automatic rotation here, the controllers of
//! secret mode later) runs only while it is true; everything whose
//! correctness does not depend on one writer (signing, and rotation steps,
//! which are compare-and-swap on the CA Secret) runs on every replica.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How the Lease is held.
#[derive(Clone, Debug)]
pub struct LeaseOptions {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's name in `holderIdentity` (its pod name).
    pub identity: String,
    /// How long a Lease not renewed stays another replica's.
    pub duration: Duration,
    /// A leader that has not renewed for this long steps down.
    pub renew_deadline: Duration,
    /// How often the Lease is renewed or tried.
    pub retry: Duration,
}

impl LeaseOptions {
    /// client-go's defaults: 15 s, 10 s, 2 s.
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// Whether this replica leads, as it changes.
#[derive(Clone)]
pub struct Leadership(watch::Receiver<bool>);

impl Leadership {
    /// Leading now.
    pub fn is_leader(&self) -> bool {
        *self.0.borrow()
    }

    /// The underlying receiver (to wait for a change).
    pub fn receiver(&self) -> watch::Receiver<bool> {
        self.0.clone()
    }
}

/// What this replica last saw of the Lease.
struct Observed {
    /// holder, renewTime, resourceVersion: any change is a renewal.
    record: (Option<String>, Option<String>, Option<String>),
    at: Instant,
}

/// Starts electing; the task runs (and releases the Lease when leading)
/// until `shutdown` fires.
pub fn spawn(
    client: Client,
    opts: LeaseOptions,
    mut shutdown: watch::Receiver<bool>,
) -> (Leadership, JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut rounds = LeaseRounds {
            api: Api::namespaced(client, &opts.namespace),
            opts: opts.clone(),
            observed: None,
        };
        elect(&mut rounds, &opts, &tx, &mut shutdown).await;
        if *tx.borrow() {
            tx.send_replace(false);
            match tokio::time::timeout(opts.renew_deadline, release(&rounds.api, &opts)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(lease = %opts.name, error = %e, "releasing the Lease failed; the next leader waits for it to expire")
                }
                Err(_) => {
                    tracing::warn!(lease = %opts.name, "releasing the Lease: no answer in time; the next leader waits for it to expire")
                }
            }
        }
    });
    (Leadership(rx), task)
}

/// What one election round returns: `Ok(true)` when this replica holds the
/// Lease now, `Ok(false)` when another does.
type RoundFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, kube::Error>> + Send + 'a>>;

/// The election's calls to the API server, one round at a time.
trait Rounds: Send {
    /// Creates, renews or takes over the Lease.
    fn round(&mut self) -> RoundFuture<'_>;
}

/// The rounds against the real Lease.
struct LeaseRounds {
    api: Api<Lease>,
    opts: LeaseOptions,
    observed: Option<Observed>,
}

impl Rounds for LeaseRounds {
    fn round(&mut self) -> RoundFuture<'_> {
        Box::pin(try_acquire_or_renew(
            &self.api,
            &self.opts,
            &mut self.observed,
        ))
    }
}

/// The election loop, until `shutdown`: publishes in `tx` whether this
/// replica leads, which is never longer than a renew deadline after its
/// last renewal, whatever the rounds do.
async fn elect(
    rounds: &mut dyn Rounds,
    opts: &LeaseOptions,
    tx: &watch::Sender<bool>,
    shutdown: &mut watch::Receiver<bool>,
) {
    let publish = |leading: bool| {
        tx.send_if_modified(|cur| {
            if *cur == leading {
                return false;
            }
            if leading {
                tracing::info!(lease = %opts.name, identity = %opts.identity, "leading: single-writer work runs here");
            } else {
                tracing::warn!(lease = %opts.name, identity = %opts.identity, "no longer leading");
            }
            *cur = leading;
            true
        });
    };
    let mut term = Term::default();
    loop {
        // Counted from before the round: the Lease was renewed at the
        // API server no earlier than this, and the others count its
        // duration from when they see that renewal.
        let started = Instant::now();
        // Past the deadline, leadership ends before any call is made: a
        // round may then take a renew deadline of its own.
        publish(term.leading_at(started, opts));
        let limit = term.round_deadline(started, opts);
        match tokio::time::timeout_at(limit, rounds.round()).await {
            Ok(Ok(held)) => term.answered(held, started),
            Ok(Err(e)) => {
                tracing::warn!(lease = %opts.name, error = %e, "leader election: Lease call failed")
            }
            Err(_) => {
                tracing::warn!(lease = %opts.name, waited = ?started.elapsed(), "leader election: no answer from the API server in time")
            }
        }
        let now = Instant::now();
        publish(term.leading_at(now, opts));
        // The next round, or the deadline if it comes first, so that
        // leadership ends at the deadline and not a retry later.
        tokio::select! {
            _ = tokio::time::sleep_until(term.next_wake(now, opts)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// This replica's belief that it leads: when it last renewed the Lease
/// (counted from before that round). It leads only while that is less
/// than a renew deadline ago, whatever the API server does meanwhile.
#[derive(Default, Debug, Clone, Copy)]
struct Term {
    renewed: Option<Instant>,
}

impl Term {
    /// Whether it leads at `now` (forgetting a renewal past its deadline).
    fn leading_at(&mut self, now: Instant, opts: &LeaseOptions) -> bool {
        if self.renewed.is_some_and(|t| now >= t + opts.renew_deadline) {
            self.renewed = None;
        }
        self.renewed.is_some()
    }

    /// A round started at `started` (after [`Term::leading_at`]) answered:
    /// the Lease is held, or another replica holds it.
    fn answered(&mut self, held: bool, started: Instant) {
        self.renewed = held.then_some(started);
    }

    /// When a round started at `started` is given up: a leader's at its
    /// renew deadline (so leadership ends then, answer or not), a
    /// candidate's after a renew deadline.
    fn round_deadline(&self, started: Instant, opts: &LeaseOptions) -> Instant {
        match self.renewed {
            Some(t) => (t + opts.renew_deadline).min(started + opts.renew_deadline),
            None => started + opts.renew_deadline,
        }
    }

    /// When to start the next round, from `now`: a retry later, or at the
    /// renew deadline if that comes first.
    fn next_wake(&self, now: Instant, opts: &LeaseOptions) -> Instant {
        let retry = now + opts.retry;
        match self.renewed {
            Some(t) => retry.min(t + opts.renew_deadline),
            None => retry,
        }
    }
}

fn now_micro() -> Option<MicroTime> {
    k8s_openapi::jiff::Timestamp::try_from(SystemTime::now())
        .ok()
        .map(MicroTime)
}

fn record_of(lease: &Lease) -> (Option<String>, Option<String>, Option<String>) {
    let spec = lease.spec.clone().unwrap_or_default();
    (
        spec.holder_identity.filter(|h| !h.is_empty()),
        spec.renew_time.map(|t| t.0.to_string()),
        lease.metadata.resource_version.clone(),
    )
}

/// One round: create the Lease, renew it, or take it over when it has
/// expired as this replica saw it. `Ok(true)`: this replica holds it now.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    opts: &LeaseOptions,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let duration_secs = i32::try_from(opts.duration.as_secs()).unwrap_or(i32::MAX);
    let current = match api.get_opt(&opts.name).await? {
        Some(l) => l,
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(opts.name.clone()),
                    namespace: Some(opts.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(opts.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: now_micro(),
                    renew_time: now_micro(),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        }
    };
    let record = record_of(&current);
    let now = Instant::now();
    match observed {
        Some(o) if o.record == record => {}
        _ => {
            *observed = Some(Observed {
                record: record.clone(),
                at: now,
            })
        }
    }
    let holder = record.0.clone();
    let mine = holder.as_deref() == Some(opts.identity.as_str());
    let expired = holder.is_none()
        || observed
            .as_ref()
            .is_some_and(|o| now.duration_since(o.at) >= opts.duration);
    if !mine && !expired {
        return Ok(false);
    }
    let mut next = current.clone();
    let spec = next.spec.get_or_insert_with(Default::default);
    if !mine {
        spec.holder_identity = Some(opts.identity.clone());
        spec.acquire_time = now_micro();
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        tracing::info!(lease = %opts.name, previous = ?holder, "taking over the Lease");
    }
    spec.lease_duration_seconds = Some(duration_secs);
    spec.renew_time = now_micro();
    match api.replace(&opts.name, &PostParams::default(), &next).await {
        Ok(l) => {
            *observed = Some(Observed {
                record: record_of(&l),
                at: Instant::now(),
            });
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up (holder cleared), if this replica still holds it.
async fn release(api: &Api<Lease>, opts: &LeaseOptions) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&opts.name).await? else {
        return Ok(());
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(opts.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = now_micro();
    api.replace(&opts.name, &PostParams::default(), &lease)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_never_outlasts_the_leaders_renew_deadline() {
        let opts = LeaseOptions::new("ns", "lease", "me");
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(4);
        let mut term = Term::default();
        term.answered(true, t0);
        // A leader renewed at t0: its round ends at t0 + 10 s whenever it
        // starts, so leadership ends then, answer or not.
        assert!(term.leading_at(later, &opts));
        assert_eq!(term.round_deadline(later, &opts), t0 + opts.renew_deadline);
        // A candidate: a renew deadline from the round's start.
        let candidate = Term::default();
        assert_eq!(
            candidate.round_deadline(later, &opts),
            later + opts.renew_deadline
        );
        // Past the deadline it is a candidate before its round starts.
        let past = t0 + opts.renew_deadline + Duration::from_secs(1);
        assert!(!term.leading_at(past, &opts));
        assert_eq!(term.round_deadline(past, &opts), past + opts.renew_deadline);
    }

    /// A round script: the first answers `Ok(true)` (renewed), the next
    /// `fast` fail at once (connection refused), every later one hangs (a
    /// silent API server).
    struct Script {
        calls: u32,
        fast: u32,
    }

    impl Rounds for Script {
        fn round(&mut self) -> RoundFuture<'_> {
            self.calls += 1;
            let n = self.calls;
            let fast = self.fast;
            Box::pin(async move {
                match n {
                    1 => Ok(true),
                    n if n <= fast + 1 => Err(kube::Error::LinesCodecMaxLineLengthExceeded),
                    _ => std::future::pending().await,
                }
            })
        }
    }

    /// The real loop on a paused clock, the API server refusing and then
    /// going silent, at every offset of the switch against the retries:
    /// leadership ends no later than a renew deadline after the renewal.
    /// (It used to end up to a renew deadline later: a round starting just
    /// past the deadline, the flag still up from the round before, got a
    /// deadline of its own.)
    #[tokio::test(start_paused = true)]
    async fn leadership_ends_at_the_renew_deadline_whatever_the_rounds_do() {
        let opts = LeaseOptions::new("ns", "lease", "me");
        let most = opts.renew_deadline.as_millis() / opts.retry.as_millis() + 2;
        for fast in 0..=u32::try_from(most).unwrap() {
            let (tx, mut rx) = watch::channel(false);
            let (stop, mut shutdown) = watch::channel(false);
            let t0 = Instant::now();
            let run = opts.clone();
            let task = tokio::spawn(async move {
                let mut script = Script { calls: 0, fast };
                elect(&mut script, &run, &tx, &mut shutdown).await;
            });
            rx.wait_for(|l| *l).await.unwrap();
            rx.wait_for(|l| !*l).await.unwrap();
            let led = t0.elapsed();
            let deadline = opts.renew_deadline;
            assert!(
                led <= deadline,
                "{fast} refused rounds then silence: led for {led:?}, the deadline is {deadline:?}"
            );
            stop.send_replace(true);
            task.abort();
        }
    }
}
