//! The signer's metrics.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

/// Counters of the signer.
#[derive(Clone)]
pub struct Metrics {
    pub(super) requests: IntCounterVec,
    pub(super) in_flight: IntGauge,
    pub(super) latency: Histogram,
    pub(super) writes: IntCounterVec,
}

impl Metrics {
    /// Registers the signer's metrics.
    ///
    /// # Errors
    /// When they are already registered.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "workload_ca_pod_certificate_requests_total",
                "PodCertificateRequests answered, by outcome (issued, denied, failed, skipped) and reason",
            ),
            &["outcome", "reason"],
        )?;
        let in_flight = IntGauge::new(
            "workload_ca_pod_certificate_requests_in_flight",
            "PodCertificateRequests taken up and not yet answered",
        )?;
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "workload_ca_pod_certificate_request_seconds",
                "From a PodCertificateRequest's creation to its status written",
            )
            .buckets(vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
        )?;
        let writes = IntCounterVec::new(
            Opts::new(
                "workload_ca_pod_certificate_status_writes_total",
                "Status writes, by result (ok, conflict, answered_elsewhere, gone, rejected, error, not_leader)",
            ),
            &["result"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(writes.clone()))?;
        Ok(Self {
            requests,
            in_flight,
            latency,
            writes,
        })
    }
}
