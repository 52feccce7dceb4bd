//! The `WatchBundle` client: one stream per agent to the CA's
//! `workloadca.v1.TrustBundleService`, over the same channel as
//! CreateCertificate and authenticated the same way (the first workload's
//! token, re-read on every (re)connect).
//!
//! The agent reports at once, then whenever something in the report changes
//! (the bundle generation held, the lowest generation its proxies ACKed, how
//! many proxies watch the bundle, the workloads' leaves). Every update the
//! CA pushes is applied to the agent-wide bundle under its ordering rule,
//! and its retiring signers are announced to the certificate managers.
//!
//! A broken stream is reopened with the rotation back-off; a CA without the
//! service (`Unimplemented`) is asked again every [`UNIMPLEMENTED_RETRY`],
//! and logged once. Meanwhile the agent keeps learning the bundle from its
//! CSR answers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::acks::{AckSummary, BundleAcks};
use super::bundle::{AgentBundle, RootBundle};
use super::client::TokenFile;
use super::workload::{RotationPolicy, WorkloadCert, unit_random};
use crate::logsafe::peer;
use crate::proto::workloadca::trust_bundle_service_client::TrustBundleServiceClient;
use crate::proto::workloadca::{AgentReport, BundleUpdate};

/// How often a CA without `TrustBundleService` is asked again.
pub const UNIMPLEMENTED_RETRY: Duration = Duration::from_secs(300);

/// The agent's side of `WatchBundle`.
pub struct BundleWatcher {
    channel: Channel,
    token: TokenFile,
    agent: String,
    bundle: AgentBundle,
    acks: BundleAcks,
    leaves: Vec<watch::Receiver<Option<Arc<WorkloadCert>>>>,
    policy: RotationPolicy,
    unimplemented_retry: Duration,
}

/// How one stream ended.
enum Ended {
    /// Shutdown was requested.
    Stopped,
    /// The CA does not serve `TrustBundleService`.
    Unimplemented,
    /// Anything else; `updated`: an update was received first.
    Failed { reason: String, updated: bool },
}

impl BundleWatcher {
    /// `leaves`: each workload's certificate watch, in workload order.
    pub fn new(
        channel: Channel,
        token: TokenFile,
        agent: String,
        bundle: AgentBundle,
        acks: BundleAcks,
        leaves: Vec<watch::Receiver<Option<Arc<WorkloadCert>>>>,
        policy: RotationPolicy,
    ) -> Self {
        Self {
            channel,
            token,
            agent,
            bundle,
            acks,
            leaves,
            policy,
            unimplemented_retry: UNIMPLEMENTED_RETRY,
        }
    }

    /// Asks a CA without the service again after `delay` instead of
    /// [`UNIMPLEMENTED_RETRY`].
    #[must_use]
    pub fn with_unimplemented_retry(mut self, delay: Duration) -> Self {
        self.unimplemented_retry = delay;
        self
    }

    /// The valid leaves, as many as fit in a report the CA reads (a
    /// margin kept for the other fields); the rest are left out, logged.
    fn leaves_within_limit(&self, now: tokio::time::Instant) -> Vec<Vec<u8>> {
        let budget = crate::proto::MAX_REPORT_BYTES - 4096;
        let mut used = 0;
        let mut leaves = Vec::new();
        for w in &self.leaves {
            let Some(der) = w
                .borrow()
                .as_ref()
                .filter(|c| c.expires_at > now)
                .map(|c| c.leaf_der.clone())
            else {
                continue;
            };
            used += der.len() + 8;
            if used > budget {
                tracing::warn!(
                    reported = leaves.len(),
                    workloads = self.leaves.len(),
                    "too many leaves for one report; the rest are not reported"
                );
                break;
            }
            leaves.push(der);
        }
        leaves
    }

    /// What the agent reports now.
    pub fn report(&self) -> AgentReport {
        let held = self.bundle.generation().unwrap_or(0);
        let acks: AckSummary = self.acks.summary();
        let now = tokio::time::Instant::now();
        AgentReport {
            agent: self.agent.clone(),
            bundle_generation: held,
            acked_generation: acks.acked_or(held),
            proxies: acks.proxies,
            leaves: self.leaves_within_limit(now),
        }
    }

    /// Runs until `shutdown` changes: one stream at a time, reopened after
    /// failures.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut attempt: u32 = 0;
        let mut told_unimplemented = false;
        loop {
            let delay = match self.session(&mut shutdown).await {
                Ended::Stopped => return,
                Ended::Unimplemented => {
                    if !told_unimplemented {
                        tracing::info!(
                            retry_in_s = self.unimplemented_retry.as_secs(),
                            "the CA does not serve the bundle watch (workloadca.v1.TrustBundleService); \
                             learning the trust bundle from certificate answers only"
                        );
                        told_unimplemented = true;
                    }
                    attempt = 0;
                    self.unimplemented_retry
                }
                Ended::Failed { reason, updated } => {
                    if updated {
                        attempt = 0;
                    }
                    let delay = self.policy.retry_delay(attempt, unit_random(), None);
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(
                        error = %peer(&reason), retry_in_ms = delay.as_millis() as u64,
                        "bundle watch failed; keeping the bundle learnt from certificate answers"
                    );
                    delay
                }
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One `WatchBundle` stream, until it fails or shutdown.
    async fn session(&self, shutdown: &mut watch::Receiver<bool>) -> Ended {
        let failed = |reason: String, updated: bool| Ended::Failed { reason, updated };
        let auth = match self.token.bearer(SystemTime::now()) {
            Ok(v) => v,
            Err(e) => return failed(e.to_string(), false),
        };
        let (tx, rx) = mpsc::channel(4);
        let mut last = self.report();
        if tx.try_send(last.clone()).is_err() {
            return failed("queueing the first report".into(), false);
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert("authorization", auth);
        let mut client = TrustBundleServiceClient::new(self.channel.clone());
        let opened = tokio::select! {
            r = client.watch_bundle(request) => r,
            _ = shutdown.changed() => return Ended::Stopped,
        };
        let mut inbound = match opened {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unimplemented => return Ended::Unimplemented,
            Err(s) => return failed(format!("{:?}: {}", s.code(), s.message()), false),
        };
        tracing::info!("bundle watch open");
        let mut bundle_rx = self.bundle.subscribe();
        let mut acks_rx = self.acks.watch();
        let mut leaves = self.leaves.clone();
        let mut updated = false;
        let mut dirty = false;
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(update)) => {
                        // The first update of a stream is the CA's bundle
                        // as it is now, even if its generation went back.
                        let first = !updated;
                        updated = true;
                        let before = self.bundle.generation();
                        if apply(&self.bundle, update, first)
                            && before > self.bundle.generation()
                        {
                            self.acks.forget();
                        }
                    }
                    Ok(None) => return failed("the CA ended the stream".into(), updated),
                    Err(s) if s.code() == tonic::Code::Unimplemented => return Ended::Unimplemented,
                    Err(s) => return failed(format!("{:?}: {}", s.code(), s.message()), updated),
                },
                r = bundle_rx.changed() => { if r.is_err() { return Ended::Stopped } dirty = true; }
                r = acks_rx.changed() => { if r.is_err() { return Ended::Stopped } dirty = true; }
                open = any_changed(&mut leaves) => { if !open { return Ended::Stopped } dirty = true; }
                permit = tx.reserve(), if dirty => {
                    let Ok(permit) = permit else {
                        return failed("the report stream closed".into(), updated);
                    };
                    dirty = false;
                    let report = self.report();
                    if report != last {
                        permit.send(report.clone());
                        last = report;
                    }
                }
                _ = shutdown.changed() => return Ended::Stopped,
            }
        }
    }
}

/// Applies one pushed update: the bundle, if it parses to at least one
/// certificate and is newer than the one held, and the retiring signers,
/// unless the update is older than the bundle held. True when the bundle
/// was published.
///
/// `authoritative` (the first update of a stream): a generation lower than
/// the one held is taken too. The CA's state was restored or recreated;
/// holding on to the higher number would ignore every bundle it sends.
pub fn apply(bundle: &AgentBundle, update: BundleUpdate, authoritative: bool) -> bool {
    let pushed = match RootBundle::parse(&update.bundle_pem, Some(update.generation)) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(
                generation = update.generation, error = %peer(&e),
                "ignoring a pushed bundle that holds no usable certificate"
            );
            return false;
        }
    };
    let held = bundle.generation();
    if authoritative && held.is_some_and(|held| held > update.generation) {
        tracing::warn!(
            held = held.unwrap_or_default(),
            generation = update.generation,
            "the CA's bundle generation went back (its state was restored or recreated); following it"
        );
        bundle.replace(pushed);
        bundle.announce_retiring(
            update.retiring_signers,
            Duration::from_secs(u64::from(update.reissue_within_seconds)),
        );
        return true;
    }
    if held.is_some_and(|held| held > update.generation) {
        tracing::debug!(
            generation = update.generation,
            "ignoring a pushed bundle older than the one held"
        );
        return false;
    }
    let published = bundle.offer(pushed);
    if published {
        tracing::info!(
            generation = update.generation,
            "trust bundle changed (pushed by the CA)"
        );
    }
    bundle.announce_retiring(
        update.retiring_signers,
        Duration::from_secs(u64::from(update.reissue_within_seconds)),
    );
    published
}

/// Resolves when one of `rxs` changes (true) or one's sender is gone
/// (false). Pending forever for none.
async fn any_changed<T: Send + Sync>(rxs: &mut [watch::Receiver<T>]) -> bool {
    let mut futures: Vec<Pin<Box<dyn Future<Output = bool> + Send + '_>>> = rxs
        .iter_mut()
        .map(|r| {
            Box::pin(async move { r.changed().await.is_ok() })
                as Pin<Box<dyn Future<Output = bool> + Send + '_>>
        })
        .collect();
    std::future::poll_fn(|cx| {
        for f in &mut futures {
            if let Poll::Ready(open) = f.as_mut().poll(cx) {
                return Poll::Ready(open);
            }
        }
        Poll::Pending
    })
    .await
}
