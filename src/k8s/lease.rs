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
        let api: Api<Lease> = Api::namespaced(client, &opts.namespace);
        let mut observed: Option<Observed> = None;
        let mut renewed: Option<Instant> = None;
        loop {
            // Counted from before the round: the Lease was renewed at the
            // API server no earlier than this, and the others count its
            // duration from when they see that renewal.
            let started = Instant::now();
            let limit = round_deadline(renewed, started, &opts);
            let round = try_acquire_or_renew(&api, &opts, &mut observed);
            match tokio::time::timeout_at(limit, round).await {
                Ok(Ok(true)) => renewed = Some(started),
                Ok(Ok(false)) => renewed = None,
                Ok(Err(e)) => {
                    tracing::warn!(lease = %opts.name, error = %e, "leader election: Lease call failed")
                }
                Err(_) => {
                    tracing::warn!(lease = %opts.name, waited = ?started.elapsed(), "leader election: no answer from the API server in time")
                }
            }
            let leading = renewed.is_some_and(|t| t.elapsed() < opts.renew_deadline);
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
            tokio::select! {
                _ = tokio::time::sleep(opts.retry) => {}
                _ = shutdown.changed() => break,
            }
        }
        if *tx.borrow() {
            tx.send_replace(false);
            match tokio::time::timeout(opts.renew_deadline, release(&api, &opts)).await {
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

/// When a round started at `started` is given up: a leader's at its renew
/// deadline (so leadership ends then, answer or not), a candidate's after
/// a renew deadline too.
fn round_deadline(renewed: Option<Instant>, started: Instant, opts: &LeaseOptions) -> Instant {
    match renewed {
        Some(t) if started < t + opts.renew_deadline => t + opts.renew_deadline,
        _ => started + opts.renew_deadline,
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
        // A leader renewed at t0: its round ends at t0 + 10 s whenever it
        // starts, so leadership ends then, answer or not.
        assert_eq!(
            round_deadline(Some(t0), later, &opts),
            t0 + opts.renew_deadline
        );
        // A candidate, or a leader past its deadline: a renew deadline from
        // the round's start.
        assert_eq!(
            round_deadline(None, later, &opts),
            later + opts.renew_deadline
        );
        let past = t0 + opts.renew_deadline + Duration::from_secs(1);
        assert_eq!(
            round_deadline(Some(t0), past, &opts),
            past + opts.renew_deadline
        );
    }
}
