//! Prometheus metrics, under Istio's `citadel_server_*` names where Istio has
//! one (so existing dashboards and alerts keep working), `workload_ca_*`
//! otherwise. Counters keep Istio's exact names, without a `_total` suffix.

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use super::Error;
use crate::limits::Refusals;

/// Kinds of signing error, the `error` label of `citadel_server_csr_sign_err_count`.
pub const SIGN_ERROR_KINDS: &[&str] = &["identity_mismatch", "ttl", "signer_expired", "internal"];

/// The CA server's metrics, in their own registry.
pub struct Metrics {
    registry: Registry,
    /// `citadel_server_csr_count`: CreateCertificate requests.
    pub csr_count: IntCounter,
    /// `citadel_server_success_cert_issuance_count`: certificates issued.
    pub success_cert_issuance: IntCounter,
    /// `citadel_server_authentication_failure_count`: callers not authenticated.
    pub authentication_failure: IntCounter,
    /// `citadel_server_csr_parsing_err_count`: CSRs that did not parse or pass the key policy.
    pub csr_parsing_err: IntCounter,
    /// `citadel_server_id_extraction_err_count`: callers refused the identity they asked for.
    pub id_extraction_err: IntCounter,
    /// `citadel_server_csr_sign_err_count{error}`, by [`SIGN_ERROR_KINDS`].
    pub csr_sign_err: IntCounterVec,
    /// `citadel_server_root_cert_expiry_timestamp`: the root's NotAfter, Unix seconds.
    pub root_cert_expiry: IntGauge,
    /// `citadel_server_cert_chain_expiry_timestamp`: the chain's end, Unix seconds.
    pub cert_chain_expiry: IntGauge,
    /// `workload_ca_serving_cert_expiry_timestamp`: the serving certificate's NotAfter, Unix seconds.
    pub serving_cert_expiry: IntGauge,
    /// `workload_ca_limit_refusals_total{limit}`, `workload_ca_log_suppressed_total`.
    pub refusals: Refusals,
    /// Presented credentials refused, by reason (`token`, `certificate`,
    /// `unavailable`, or a binding reason such as `pod_gone`).
    pub auth_refusals: IntCounterVec,
    /// Callers refused the identity they asked for, by reason
    /// (`not_trusted_node`, `not_on_node`, ...).
    pub identity_refusals: IntCounterVec,
    /// Certificates issued to a node agent for another identity.
    pub impersonations: IntCounter,
    /// TLS handshakes completed on the gRPC port, full and resumed
    /// (`workload_ca_tls_handshakes_total{kind}`).
    pub handshakes: Handshakes,
}

/// Completed TLS handshakes by kind.
#[derive(Clone)]
pub struct Handshakes {
    /// Full handshakes.
    pub full: IntCounter,
    /// Resumed handshakes (session tickets or IDs).
    pub resumed: IntCounter,
}

impl Metrics {
    /// # Errors
    /// [`Error::Config`] if a metric cannot be registered (a programming error).
    pub fn new() -> Result<Self, Error> {
        Self::with_registry(Registry::new())
    }

    /// The server's metrics in `registry`, which may already hold others
    /// (the Kubernetes adapters'): `/metrics` shows them all.
    ///
    /// # Errors
    /// [`Error::Config`] if a metric cannot be registered (a name taken twice).
    pub fn with_registry(registry: Registry) -> Result<Self, Error> {
        let reg_err = |e: prometheus::Error| Error::Config(format!("metrics: {e}"));
        let counter = |name: &str, help: &str| -> Result<IntCounter, Error> {
            let c = IntCounter::new(name, help).map_err(reg_err)?;
            registry.register(Box::new(c.clone())).map_err(reg_err)?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, Error> {
            let g = IntGauge::new(name, help).map_err(reg_err)?;
            registry.register(Box::new(g.clone())).map_err(reg_err)?;
            Ok(g)
        };
        crate::sync::register(&registry).map_err(reg_err)?;
        let csr_sign_err = IntCounterVec::new(
            Opts::new(
                "citadel_server_csr_sign_err_count",
                "The number of errors occurred when signing the CSR.",
            ),
            &["error"],
        )
        .map_err(reg_err)?;
        registry
            .register(Box::new(csr_sign_err.clone()))
            .map_err(reg_err)?;
        for kind in SIGN_ERROR_KINDS {
            csr_sign_err.with_label_values(&[kind]);
        }
        let counter_vec = |name: &str, help: &str, label: &str| -> Result<IntCounterVec, Error> {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).map_err(reg_err)?;
            registry.register(Box::new(c.clone())).map_err(reg_err)?;
            Ok(c)
        };
        let auth_refusals = counter_vec(
            "workload_ca_auth_refusals_total",
            "Presented credentials refused, by reason.",
            "reason",
        )?;
        let identity_refusals = counter_vec(
            "workload_ca_identity_refusals_total",
            "Authenticated callers refused the identity they asked for, by reason.",
            "reason",
        )?;
        // Every reason from the start: a dashboard shows 0, not a gap.
        for l in super::auth::AuthError::metric_labels() {
            auth_refusals.with_label_values(&[l]);
        }
        for l in crate::ca::policy::Refusal::METRIC_LABELS {
            identity_refusals.with_label_values(&[l]);
        }
        let handshakes = counter_vec(
            "workload_ca_tls_handshakes_total",
            "TLS handshakes completed on the gRPC port: full, or resumed from a session ticket.",
            "kind",
        )?;
        let handshakes = Handshakes {
            full: handshakes.with_label_values(&["full"]),
            resumed: handshakes.with_label_values(&["resumed"]),
        };
        let impersonations = counter(
            "workload_ca_impersonations_total",
            "Certificates issued to a trusted node agent for a pod on its node.",
        )?;
        Ok(Self {
            csr_count: counter(
                "citadel_server_csr_count",
                "The number of CSRs received by Citadel server.",
            )?,
            success_cert_issuance: counter(
                "citadel_server_success_cert_issuance_count",
                "The number of certificates issuances that have succeeded.",
            )?,
            authentication_failure: counter(
                "citadel_server_authentication_failure_count",
                "The number of authentication failures.",
            )?,
            csr_parsing_err: counter(
                "citadel_server_csr_parsing_err_count",
                "The number of errors occurred when parsing the CSR.",
            )?,
            id_extraction_err: counter(
                "citadel_server_id_extraction_err_count",
                "The number of errors occurred when extracting the ID from CSR.",
            )?,
            csr_sign_err,
            root_cert_expiry: gauge(
                "citadel_server_root_cert_expiry_timestamp",
                "The unix timestamp, in seconds, when Citadel root cert will expire.",
            )?,
            cert_chain_expiry: gauge(
                "citadel_server_cert_chain_expiry_timestamp",
                "The unix timestamp, in seconds, when Citadel cert chain will expire.",
            )?,
            serving_cert_expiry: gauge(
                "workload_ca_serving_cert_expiry_timestamp",
                "The unix timestamp, in seconds, when the CA server's own TLS certificate will expire.",
            )?,
            refusals: Refusals::register(&registry, "workload_ca").map_err(reg_err)?,
            auth_refusals,
            identity_refusals,
            impersonations,
            handshakes,
            registry,
        })
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

/// Seconds since the epoch, for expiry gauges.
pub fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
