//! The agent's rotation policy under tokio's paused clock: renewal at the
//! configured fraction (with jitter), back-off while the CA is away, the
//! current certificate kept while valid and withdrawn at expiry, recovery
//! when the CA returns. The scripted CA signs with a real `Authority`.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;
use workload_ca::agent::Error;
use workload_ca::agent::client::{CaClient, SignFuture};
use workload_ca::agent::metrics::AgentMetrics;
use workload_ca::agent::workload::{CertManager, CertWatch, RotationPolicy};
use workload_ca::ca::{Authority, check_csr};
use workload_ca::identity::SpiffeId;

struct ScriptedCa {
    authority: Authority,
    id: SpiffeId,
    ttl: Duration,
    up: AtomicBool,
    calls: AtomicUsize,
}

impl ScriptedCa {
    fn new(ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            authority: common::authority(),
            id: SpiffeId::parse("spiffe://cluster.local/ns/prod/sa/web").unwrap(),
            ttl,
            up: AtomicBool::new(true),
            calls: AtomicUsize::new(0),
        })
    }
}

impl CaClient for ScriptedCa {
    fn sign(&self, csr_pem: String, _ttl: Duration) -> SignFuture<'_> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if !self.up.load(Ordering::SeqCst) {
                return Err(Error::Ca {
                    code: tonic::Code::Unavailable,
                    message: "CA is down".into(),
                });
            }
            let csr = check_csr(csr_pem.as_bytes())?;
            Ok((
                self.authority
                    .sign_leaf(&csr, &self.id, self.ttl, SystemTime::now())?
                    .chain,
                None,
            ))
        })
    }
}

fn start(
    ca: Arc<ScriptedCa>,
    policy: RotationPolicy,
) -> (CertWatch, watch::Sender<bool>, Arc<AgentMetrics>) {
    let metrics = Arc::new(AgentMetrics::new().unwrap());
    let (manager, w) = CertManager::new("web", ca, policy, metrics.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(manager.run(stop_rx));
    (w, stop_tx, metrics)
}

async fn next_serial(w: &mut CertWatch) -> Option<String> {
    w.cert.changed().await.unwrap();
    w.cert
        .borrow_and_update()
        .as_ref()
        .map(|c| c.serial_hex.clone())
}

#[tokio::test(start_paused = true)]
async fn renews_at_half_life_with_jitter_and_a_fresh_key() {
    let ca = ScriptedCa::new(Duration::from_secs(600));
    let (mut w, _stop, _m) = start(ca.clone(), RotationPolicy::default());
    let first = next_serial(&mut w).await.unwrap();
    let first_key = w.cert.borrow().as_ref().unwrap().key_pem.to_string();
    let t0 = Instant::now();
    for _ in 0..5 {
        let before = Instant::now();
        let serial = next_serial(&mut w).await.unwrap();
        let waited = Instant::now() - before;
        // 300 s +-10% of the remaining life, which NotAfter's one-second
        // granularity can make up to a second shorter than 600 s.
        assert!(
            waited >= Duration::from_secs(269) && waited <= Duration::from_secs(330),
            "renewed after {waited:?}, expected 300s +-10%"
        );
        assert_ne!(serial, first);
    }
    assert_ne!(
        w.cert.borrow().as_ref().unwrap().key_pem.to_string(),
        first_key,
        "a fresh key for every certificate"
    );
    assert_eq!(ca.calls.load(Ordering::SeqCst), 6);
    assert!(Instant::now() - t0 < Duration::from_secs(5 * 330));
    let roots = w.roots.borrow().clone().unwrap();
    assert!(roots.pem.contains("BEGIN CERTIFICATE"));
}

#[tokio::test(start_paused = true)]
async fn keeps_serving_while_the_ca_is_away_withdraws_at_expiry_and_recovers() {
    let ca = ScriptedCa::new(Duration::from_secs(60));
    let policy = RotationPolicy {
        jitter: 0.0,
        ..RotationPolicy::default()
    };
    let (mut w, _stop, metrics) = start(ca.clone(), policy);
    let first = next_serial(&mut w).await.unwrap();
    let issued = Instant::now();
    ca.up.store(false, Ordering::SeqCst);

    // Renewal at 30s fails; the certificate is still served until it expires.
    tokio::time::sleep_until(issued + Duration::from_secs(58)).await;
    assert_eq!(
        w.cert.borrow().as_ref().map(|c| c.serial_hex.clone()),
        Some(first.clone()),
        "kept while valid"
    );
    let calls_while_down = ca.calls.load(Ordering::SeqCst) - 1;
    assert!(
        calls_while_down >= 5,
        "retried with back-off: {calls_while_down} attempts in 28s"
    );
    assert!(
        calls_while_down <= 30,
        "back-off, not a busy loop: {calls_while_down} attempts in 28s"
    );

    // Never serve an expired certificate.
    tokio::time::sleep_until(issued + Duration::from_secs(61)).await;
    assert!(w.cert.borrow().is_none(), "withdrawn at expiry");
    assert!(metrics.csr_retries.with_label_values(&["web"]).get() >= 4);

    // The CA returns: recovery within one maximum back-off.
    ca.up.store(true, Ordering::SeqCst);
    let back = Instant::now();
    loop {
        w.cert.changed().await.unwrap();
        if w.cert.borrow().is_some() {
            break;
        }
    }
    assert!(
        Instant::now() - back <= Duration::from_secs(31),
        "recovered after {:?}",
        Instant::now() - back
    );
    assert_ne!(w.cert.borrow().as_ref().unwrap().serial_hex, first);
}

#[tokio::test(start_paused = true)]
async fn a_fleet_started_together_does_not_renew_together() {
    let ca = ScriptedCa::new(Duration::from_secs(3600));
    let mut fleet = Vec::new();
    for _ in 0..20 {
        let (mut w, stop, _m) = start(ca.clone(), RotationPolicy::default());
        next_serial(&mut w).await;
        fleet.push((w, stop));
    }
    for (w, _) in &mut fleet {
        next_serial(w).await;
    }
    // A renewed certificate expires one lifetime after its renewal, so the
    // spread of expiries is the spread of renewal instants (window: +-180s).
    let expiries: Vec<Instant> = fleet
        .iter()
        .map(|(w, _)| w.cert.borrow().as_ref().unwrap().expires_at)
        .collect();
    let (min, max) = (
        *expiries.iter().min().unwrap(),
        *expiries.iter().max().unwrap(),
    );
    assert!(
        max - min >= Duration::from_secs(120),
        "renewals spread over {:?}",
        max - min
    );
}
