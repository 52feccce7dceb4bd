use std::time::SystemTime;

use super::*;
use crate::identity::SpiffeId;

fn cert(serial: &str, life: Duration) -> Option<Arc<WorkloadCert>> {
    Some(Arc::new(WorkloadCert {
        identity: SpiffeId::parse("spiffe://cluster.local/ns/prod/sa/web").unwrap(),
        chain_pem: String::new(),
        key_pem: zeroize::Zeroizing::new(String::new()),
        serial_hex: serial.into(),
        leaf_der: Vec::new(),
        not_after: SystemTime::now() + life,
        expires_at: Instant::now() + life,
        version: serial.into(),
    }))
}

struct Rig {
    tx: watch::Sender<Option<Arc<WorkloadCert>>>,
    health: Health,
    metrics: Arc<AgentMetrics>,
    _stop: watch::Sender<bool>,
}

fn rig(policy: &RotationPolicy) -> Rig {
    let metrics = Arc::new(AgentMetrics::new().unwrap());
    let (tx, cert) = watch::channel(None);
    let (_, roots) = watch::channel(None);
    let watches = vec![("web".to_owned(), CertWatch { cert, roots })];
    let health = Health::new("ca.example:15012", policy, metrics.clone(), &watches);
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(health.clone().follow(0, stop_rx));
    Rig {
        tx,
        health,
        metrics,
        _stop: stop,
    }
}

fn gauge(m: &AgentMetrics, which: &str) -> f64 {
    match which {
        "left" => m.cert_remaining.with_label_values(&["web"]).get(),
        "failures" => m.renewal_failures.with_label_values(&["web"]).get() as f64,
        _ => m.ready.with_label_values(&["web"]).get() as f64,
    }
}

#[test]
fn the_margin_is_a_fifth_or_half_what_the_latest_renewal_leaves() {
    let default = RotationPolicy::default();
    assert_eq!(unready_share(&default), 0.2);
    let late = RotationPolicy {
        fraction: 0.8,
        jitter: 0.1,
        ..RotationPolicy::default()
    };
    // Renewal as late as 88% of the lifetime: half of the 12% left.
    assert!((unready_share(&late) - 0.06).abs() < 1e-9);
    let latest = RotationPolicy {
        fraction: 0.95,
        jitter: 0.5,
        ..RotationPolicy::default()
    };
    assert!(
        (unready_share(&latest) - 0.05).abs() < 1e-9,
        "never past 90%"
    );
}

#[tokio::test(start_paused = true)]
async fn readiness_ends_a_fifth_of_the_lifetime_before_expiry_and_returns_with_a_new_cert() {
    let r = rig(&RotationPolicy::default());
    assert!(
        r.health
            .ready()
            .unwrap_err()
            .contains("waiting for a first")
    );
    assert_eq!(r.health.state_of(0), Some(State::Waiting));

    r.tx.send_replace(cert("aa", Duration::from_secs(100)));
    tokio::task::yield_now().await;
    let t0 = Instant::now();
    r.health.ready().unwrap();
    r.health.refresh_gauges();
    assert_eq!(gauge(&r.metrics, "ready"), 1.0);
    assert_eq!(gauge(&r.metrics, "left"), 100.0);

    // Renewals fail from here on.
    let failures = r.metrics.csr_failures.with_label_values(&["web"]);
    failures.inc_by(3);
    tokio::time::sleep_until(t0 + Duration::from_millis(79_900)).await;
    r.health.ready().expect("still more than a fifth left");
    r.health.refresh_gauges();
    assert_eq!(gauge(&r.metrics, "failures"), 3.0);

    tokio::time::sleep_until(t0 + Duration::from_millis(80_100)).await;
    let why = r.health.ready().unwrap_err();
    assert!(
        why.contains("web") && why.contains("ca.example:15012") && why.contains("19.9s"),
        "{why}"
    );
    r.health.refresh_gauges();
    assert_eq!(gauge(&r.metrics, "ready"), 0.0);
    assert!((gauge(&r.metrics, "left") - 19.9).abs() < 1e-6);

    // Past expiry: still not ready, nothing left, even before the manager
    // withdraws the certificate.
    tokio::time::sleep_until(t0 + Duration::from_secs(100)).await;
    assert!(r.health.ready().unwrap_err().contains("expired"));
    assert_eq!(r.health.state_of(0), Some(State::Expired));
    r.tx.send_replace(None);
    tokio::task::yield_now().await;
    assert_eq!(r.health.state_of(0), Some(State::Expired));
    failures.inc();
    r.health.refresh_gauges();
    assert_eq!(gauge(&r.metrics, "left"), 0.0);
    assert_eq!(gauge(&r.metrics, "failures"), 4.0);

    // The CA returns: a new certificate, ready again, the failures reset.
    r.tx.send_replace(cert("bb", Duration::from_secs(100)));
    tokio::task::yield_now().await;
    r.health.ready().unwrap();
    r.health.refresh_gauges();
    assert_eq!(gauge(&r.metrics, "failures"), 0.0);
    assert_eq!(gauge(&r.metrics, "ready"), 1.0);
}

#[tokio::test(start_paused = true)]
async fn the_margin_is_taken_from_the_lifetime_the_agent_saw() {
    let r = rig(&RotationPolicy::default());
    // A short certificate: 10 s seen, so not ready in its last 2 s.
    r.tx.send_replace(cert("aa", Duration::from_secs(10)));
    tokio::task::yield_now().await;
    let t0 = Instant::now();
    tokio::time::sleep_until(t0 + Duration::from_millis(7_900)).await;
    r.health.ready().unwrap();
    tokio::time::sleep_until(t0 + Duration::from_millis(8_100)).await;
    assert!(matches!(r.health.state_of(0), Some(State::Ending { .. })));
    // Renewed inside the margin: ready at once.
    r.tx.send_replace(cert("bb", Duration::from_secs(10)));
    tokio::task::yield_now().await;
    r.health.ready().unwrap();
}
