//! Agent metrics (Prometheus). The `workload` label is the workload's name
//! (`default` in sidecar mode); `resource` is the SDS resource name.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use super::Error;
use crate::limits::Refusals;

/// The node agent's metrics, in their own registry.
pub struct AgentMetrics {
    registry: Registry,
    /// `workload_ca_agent_cert_expiry_timestamp{workload}`: the certificate's NotAfter, Unix seconds.
    pub cert_expiry: IntGaugeVec,
    /// Seconds until the served certificate expires (0: none served); set
    /// when `/metrics` is rendered.
    pub cert_remaining: GaugeVec,
    /// Failed certificate requests since the last certificate obtained.
    pub renewal_failures: IntGaugeVec,
    /// 1 while `/readyz` counts the workload ready (see [`super::health`]).
    pub ready: IntGaugeVec,
    /// `workload_ca_agent_csr_duration_seconds`: from key generation to a verified certificate.
    pub csr_latency: HistogramVec,
    /// `workload_ca_agent_csr_failures_total`: failed certificate requests.
    pub csr_failures: IntCounterVec,
    /// `workload_ca_agent_csr_retries_total`: requests retried after a failure.
    pub csr_retries: IntCounterVec,
    /// Certificate requests not made: the token was missing, unreadable or
    /// expired (the current certificate is kept while valid).
    pub token_unusable: IntCounterVec,
    /// `workload_ca_agent_sds_streams`: connected SDS streams.
    pub sds_streams: IntGauge,
    /// `workload_ca_agent_sds_pushes_total{resource}`: SDS responses sent.
    pub sds_pushes: IntCounterVec,
    /// `workload_ca_agent_sds_nacks_total`: SDS responses the proxy rejected.
    pub sds_nacks: IntCounterVec,
    /// `workload_ca_agent_sds_push_to_ack_seconds`: from a change to the proxy's ACK of its push.
    pub sds_ack_latency: prometheus::Histogram,
    /// The generation of the trust bundle the agent holds (0: none known).
    pub bundle_generation: IntGauge,
    /// The lowest bundle generation ACKed by every proxy subscribed to the
    /// bundle (the held generation when none is).
    pub bundle_acked_generation: IntGauge,
    /// Proxy streams subscribed to the trust bundle.
    pub bundle_proxies: IntGauge,
    /// `workload_ca_agent_limit_refusals_total{limit}`,
    /// `workload_ca_agent_log_suppressed_total`.
    pub refusals: Refusals,
}

impl AgentMetrics {
    /// # Errors
    /// [`Error::Config`] if a metric cannot be registered (a programming error).
    pub fn new() -> Result<Self, Error> {
        let registry = Registry::new();
        let e = |e: prometheus::Error| Error::Config(format!("metrics: {e}"));
        crate::sync::register(&registry).map_err(e)?;
        let cert_expiry = IntGaugeVec::new(
            Opts::new(
                "workload_ca_agent_cert_expiry_timestamp",
                "Unix time at which the workload certificate expires.",
            ),
            &["workload"],
        )
        .map_err(e)?;
        let csr_latency = HistogramVec::new(
            HistogramOpts::new(
                "workload_ca_agent_csr_duration_seconds",
                "Time from key generation to a verified certificate.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["workload"],
        )
        .map_err(e)?;
        let csr_failures = IntCounterVec::new(
            Opts::new(
                "workload_ca_agent_csr_failures_total",
                "Failed certificate requests.",
            ),
            &["workload"],
        )
        .map_err(e)?;
        let csr_retries = IntCounterVec::new(
            Opts::new(
                "workload_ca_agent_csr_retries_total",
                "Certificate requests retried after a failure.",
            ),
            &["workload"],
        )
        .map_err(e)?;
        let token_unusable = IntCounterVec::new(
            Opts::new(
                "workload_ca_agent_token_unusable_total",
                "Certificate requests not made because the service-account token was missing, unreadable or expired.",
            ),
            &["workload"],
        )
        .map_err(e)?;
        registry
            .register(Box::new(token_unusable.clone()))
            .map_err(e)?;
        let sds_streams =
            IntGauge::new("workload_ca_agent_sds_streams", "Connected SDS streams.").map_err(e)?;
        let sds_pushes = IntCounterVec::new(
            Opts::new("workload_ca_agent_sds_pushes_total", "SDS responses sent."),
            &["resource"],
        )
        .map_err(e)?;
        let sds_nacks = IntCounterVec::new(
            Opts::new(
                "workload_ca_agent_sds_nacks_total",
                "SDS responses rejected by the proxy.",
            ),
            &["resource"],
        )
        .map_err(e)?;
        registry
            .register(Box::new(cert_expiry.clone()))
            .map_err(e)?;
        registry
            .register(Box::new(csr_latency.clone()))
            .map_err(e)?;
        registry
            .register(Box::new(csr_failures.clone()))
            .map_err(e)?;
        registry
            .register(Box::new(csr_retries.clone()))
            .map_err(e)?;
        registry
            .register(Box::new(sds_streams.clone()))
            .map_err(e)?;
        registry.register(Box::new(sds_pushes.clone())).map_err(e)?;
        registry.register(Box::new(sds_nacks.clone())).map_err(e)?;
        let sds_ack_latency = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "workload_ca_agent_sds_push_to_ack_seconds",
                "From a certificate or bundle change to the proxy's ACK of the push.",
            )
            .buckets(vec![0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
        )
        .map_err(e)?;
        registry
            .register(Box::new(sds_ack_latency.clone()))
            .map_err(e)?;
        let bundle_generation = IntGauge::new(
            "workload_ca_agent_bundle_generation",
            "Generation of the trust bundle the agent holds (0 when the CA sent none).",
        )
        .map_err(e)?;
        let bundle_acked_generation = IntGauge::new(
            "workload_ca_agent_bundle_acked_generation",
            "Lowest trust bundle generation ACKed by the proxies subscribed to it.",
        )
        .map_err(e)?;
        let bundle_proxies = IntGauge::new(
            "workload_ca_agent_bundle_proxies",
            "SDS streams subscribed to the trust bundle.",
        )
        .map_err(e)?;
        let cert_remaining = GaugeVec::new(
            Opts::new(
                "workload_ca_agent_cert_remaining_seconds",
                "Seconds until the served certificate expires (0 when none is served).",
            ),
            &["workload"],
        )
        .map_err(e)?;
        let renewal_failures = IntGaugeVec::new(
            Opts::new(
                "workload_ca_agent_renewal_failures_consecutive",
                "Failed certificate requests since the last certificate was obtained.",
            ),
            &["workload"],
        )
        .map_err(e)?;
        let ready = IntGaugeVec::new(
            Opts::new(
                "workload_ca_agent_ready",
                "1 while the served certificate has more than the readiness margin left.",
            ),
            &["workload"],
        )
        .map_err(e)?;
        registry
            .register(Box::new(cert_remaining.clone()))
            .map_err(e)?;
        for g in [&renewal_failures, &ready] {
            registry.register(Box::new(g.clone())).map_err(e)?;
        }
        for g in [
            &bundle_generation,
            &bundle_acked_generation,
            &bundle_proxies,
        ] {
            registry.register(Box::new(g.clone())).map_err(e)?;
        }
        Ok(Self {
            refusals: Refusals::register(&registry, "workload_ca_agent").map_err(e)?,
            registry,
            cert_expiry,
            cert_remaining,
            renewal_failures,
            ready,
            csr_latency,
            csr_failures,
            csr_retries,
            token_unusable,
            sds_streams,
            sds_pushes,
            sds_nacks,
            sds_ack_latency,
            bundle_generation,
            bundle_acked_generation,
            bundle_proxies,
        })
    }

    /// The raw metric families (for benchmarks and tests).
    pub fn registry_gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
