//! How close each workload is to serving nothing, said loudly and early.
//!
//! A workload is *ready* while it serves a certificate with more than the
//! readiness margin of its lifetime left ([`unready_share`]: a fifth with
//! the default rotation policy). A healthy agent renews at about half the
//! lifetime, so readiness only ends after renewals have failed for a good
//! part of it, and it ends *before* the certificate expires, while the
//! proxy still holds a valid one: long enough before for an orchestrator
//! to take the workload out of rotation.
//!
//! When that margin is crossed the agent logs an error naming the CA and
//! the time left, again each time that time halves, and once more at
//! expiry (after which nothing is served for the workload: SDS filters
//! expired certificates out). A new certificate makes it ready again, and
//! says so. `/metrics` shows, per workload, the seconds left on the served
//! certificate, the failed requests since the last certificate, and the
//! readiness itself.
//!
//! The lifetime is the one the agent saw: the time left when it first
//! observed the certificate (the CA backdates NotBefore, so NotBefore would
//! overstate it). Everything runs on tokio's clock, so the margin is tested
//! under a paused clock.

use std::sync::{Arc, Mutex};

use crate::sync::LockExt;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::metrics::AgentMetrics;
use super::workload::{CertWatch, RotationPolicy, WorkloadCert};

/// The largest share of a certificate's lifetime, before its expiry, in
/// which the agent reports not ready.
pub const UNREADY_SHARE: f64 = 0.2;

/// The share of a certificate's lifetime, before its expiry, in which the
/// agent reports not ready: [`UNREADY_SHARE`], or half of what is left at
/// the latest renewal point `policy` can choose, whichever is smaller (so a
/// late `--rotation-fraction` does not end readiness before every renewal).
pub fn unready_share(policy: &RotationPolicy) -> f64 {
    UNREADY_SHARE.min((1.0 - policy.latest_renewal_share()) / 2.0)
}

/// The certificate a workload last obtained, as first observed.
#[derive(Default)]
struct Seen {
    serial: Option<String>,
    /// Time left when first observed.
    lifetime: Duration,
    /// `csr_failures` then: later failures are consecutive ones.
    failures_before: u64,
}

struct Tracked {
    name: String,
    cert: watch::Receiver<Option<Arc<WorkloadCert>>>,
    seen: Mutex<Seen>,
}

/// Where one workload stands.
#[derive(Debug, PartialEq)]
pub enum State {
    /// No certificate obtained yet.
    Waiting,
    /// Serving one with more than the margin left.
    Fresh {
        /// Validity left.
        left: Duration,
        /// The readiness margin it is above.
        margin: Duration,
    },
    /// Serving one inside the margin: not ready.
    Ending {
        /// Validity left.
        left: Duration,
    },
    /// The last one expired; nothing served.
    Expired,
}

/// The readiness and the loud signals of every workload of an agent.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    /// The CA's address, named in the logs.
    ca: String,
    share: f64,
    metrics: Arc<AgentMetrics>,
    workloads: Vec<Tracked>,
}

impl Health {
    /// Tracks `watches` for an agent renewing under `policy` from the CA at
    /// `ca`.
    pub fn new(
        ca: impl Into<String>,
        policy: &RotationPolicy,
        metrics: Arc<AgentMetrics>,
        watches: &[(String, CertWatch)],
    ) -> Self {
        for (name, _) in watches {
            metrics.renewal_failures.with_label_values(&[name]).set(0);
            metrics.cert_remaining.with_label_values(&[name]).set(0.0);
            metrics.ready.with_label_values(&[name]).set(0);
        }
        Self {
            inner: Arc::new(Inner {
                ca: ca.into(),
                share: unready_share(policy),
                metrics,
                workloads: watches
                    .iter()
                    .map(|(name, w)| Tracked {
                        name: name.clone(),
                        cert: w.cert.clone(),
                        seen: Mutex::new(Seen::default()),
                    })
                    .collect(),
            }),
        }
    }

    fn failures(&self, t: &Tracked) -> u64 {
        self.inner
            .metrics
            .csr_failures
            .with_label_values(&[&t.name])
            .get()
    }

    /// Records a certificate not seen before; true if there was one.
    fn observe(&self, t: &Tracked, now: Instant) -> bool {
        let Some(cert) = t.cert.borrow().clone() else {
            return false;
        };
        let mut seen = t.seen.locked();
        if seen.serial.as_deref() == Some(cert.serial_hex.as_str()) {
            return false;
        }
        *seen = Seen {
            serial: Some(cert.serial_hex.clone()),
            lifetime: cert.expires_at.saturating_duration_since(now),
            failures_before: self.failures(t),
        };
        true
    }

    fn state(&self, t: &Tracked, now: Instant) -> State {
        self.observe(t, now);
        let seen = t.seen.locked();
        let cert = t.cert.borrow().clone();
        match cert {
            Some(c) if c.expires_at > now => {
                let left = c.expires_at - now;
                let margin = seen.lifetime.mul_f64(self.inner.share);
                if left > margin {
                    State::Fresh { left, margin }
                } else {
                    State::Ending { left }
                }
            }
            _ if seen.serial.is_some() => State::Expired,
            _ => State::Waiting,
        }
    }

    /// Failed certificate requests since the last certificate obtained.
    fn consecutive_failures(&self, t: &Tracked) -> u64 {
        let before = t.seen.locked().failures_before;
        self.failures(t).saturating_sub(before)
    }

    /// Where workload number `i` stands now.
    pub fn state_of(&self, i: usize) -> Option<State> {
        let t = self.inner.workloads.get(i)?;
        Some(self.state(t, Instant::now()))
    }

    /// `Ok` when every workload serves a certificate with more than the
    /// readiness margin left; else why the first that does not.
    ///
    /// # Errors
    /// The workload that is not ready, and why.
    pub fn ready(&self) -> Result<(), String> {
        let now = Instant::now();
        for t in &self.inner.workloads {
            match self.state(t, now) {
                State::Fresh { .. } => {}
                State::Waiting => {
                    return Err(format!(
                        "workload {}: waiting for a first certificate",
                        t.name
                    ));
                }
                State::Ending { left } => {
                    return Err(format!(
                        "workload {}: the certificate expires in {:.1}s and the CA at {} has not renewed it",
                        t.name,
                        left.as_secs_f64(),
                        self.inner.ca
                    ));
                }
                State::Expired => {
                    return Err(format!(
                        "workload {}: the certificate expired; waiting for the CA at {}",
                        t.name, self.inner.ca
                    ));
                }
            }
        }
        Ok(())
    }

    /// Sets the per-workload gauges to their values now (before `/metrics`
    /// is rendered).
    pub fn refresh_gauges(&self) {
        let now = Instant::now();
        let m = &self.inner.metrics;
        for t in &self.inner.workloads {
            let state = self.state(t, now);
            let (left, ready) = match state {
                State::Fresh { left, .. } => (left, 1),
                State::Ending { left } => (left, 0),
                State::Waiting | State::Expired => (Duration::ZERO, 0),
            };
            m.cert_remaining
                .with_label_values(&[&t.name])
                .set(left.as_secs_f64());
            m.ready.with_label_values(&[&t.name]).set(ready);
            m.renewal_failures
                .with_label_values(&[&t.name])
                .set(i64::try_from(self.consecutive_failures(t)).unwrap_or(i64::MAX));
        }
    }

    /// Follows workload number `i` until `shutdown` changes: records each
    /// new certificate as it is published, and logs when readiness ends,
    /// as the time left halves, at expiry, and when it is ready again.
    pub async fn follow(self, i: usize, mut shutdown: watch::Receiver<bool>) {
        let Some(t) = self.inner.workloads.get(i) else {
            return;
        };
        let mut rx = t.cert.clone();
        // The time left when the last warning was logged.
        let mut warned: Option<Duration> = None;
        let mut expired_told = false;
        loop {
            rx.mark_unchanged();
            let now = Instant::now();
            let state = self.state(t, now);
            let wake = match state {
                State::Waiting => None,
                State::Fresh { left, margin } => {
                    if warned.is_some() || expired_told {
                        tracing::info!(
                            workload = %t.name, ca = %self.inner.ca,
                            left_s = left.as_secs(),
                            "a new certificate from the CA; ready again"
                        );
                    }
                    warned = None;
                    expired_told = false;
                    Some(now + (left - margin))
                }
                State::Ending { left } => {
                    if warned.is_none_or(|w| left <= w / 2) {
                        tracing::error!(
                            workload = %t.name, ca = %self.inner.ca,
                            left_s = left.as_secs_f64(),
                            failed_requests = self.consecutive_failures(t),
                            "the certificate expires soon and the CA has not renewed it; \
                             /readyz reports not ready until a new certificate arrives"
                        );
                        warned = Some(left);
                    }
                    // Next: when the time left halves (at least a second
                    // apart), or at expiry.
                    Some(now + (left / 2).max(Duration::from_secs(1)).min(left))
                }
                State::Expired => {
                    if !expired_told {
                        tracing::error!(
                            workload = %t.name, ca = %self.inner.ca,
                            failed_requests = self.consecutive_failures(t),
                            "the certificate expired and the CA has not renewed it; \
                             nothing is served for this workload until it does"
                        );
                        expired_told = true;
                    }
                    None
                }
            };
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                () = sleep_until(wake) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Sleeps until `at`; forever for `None`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[path = "health_tests.rs"]
mod tests;
