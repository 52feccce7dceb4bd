//! `ca server --kube --pod-certificates` / `--cluster-trust-bundle`: the
//! PodCertificateRequest signer and the ClusterTrustBundle publisher
//! (`crate::k8s::pcr`, `crate::k8s::trustbundle`), as controllers that
//! start once the CA is up.

use std::time::Duration;

use clap::Args;

use super::parse_duration;
use crate::identity::TrustDomain;
use crate::k8s;
use crate::server::cluster::Controller;

/// Options of the PodCertificateRequest signer.
#[derive(Args, Debug, Clone)]
pub struct PcrArgs {
    /// Sign PodCertificateRequests for `--pcr-signer-name` (pods mounting
    /// a `podCertificate` volume get a SPIFFE certificate of their service
    /// account). Needs `update` on `podcertificaterequests/status` and
    /// `sign` on the signer name.
    #[arg(long, env = "CA_POD_CERTIFICATES")]
    pub pod_certificates: bool,
    /// The signer name PodCertificateRequests ask for.
    #[arg(long, env = "CA_PCR_SIGNER_NAME", default_value = k8s::pcr::DEFAULT_SIGNER_NAME)]
    pub pcr_signer_name: String,
    /// Status writes in flight at once, on the signer's own API client
    /// (so a burst never queues the Lease or token checks behind it).
    #[arg(long, env = "CA_PCR_MAX_IN_FLIGHT", default_value_t = 16)]
    pub pcr_max_in_flight: usize,
    /// Requests older than this are left alone (the kubelet has made a new
    /// one; kube-controller-manager deletes them).
    #[arg(long, env = "CA_PCR_MAX_AGE", default_value = "15m", value_parser = parse_duration)]
    pub pcr_max_age: Duration,
    /// Publish the trust bundle (every trusted root) as the ClusterTrustBundle
    /// `<signer name with / as :>:<suffix>`, kept current through
    /// rotations. Needs `attest` on the signer name.
    #[arg(long, env = "CA_CLUSTER_TRUST_BUNDLE")]
    pub cluster_trust_bundle: bool,
    /// The ClusterTrustBundle's name suffix (also its `workload-ca.io/bundle` label).
    #[arg(
        long,
        env = "CA_CLUSTER_TRUST_BUNDLE_SUFFIX",
        default_value = "primary"
    )]
    pub cluster_trust_bundle_suffix: String,
}

/// The controllers `args` ask for. `client_opts` builds the signer's own
/// client; `leader` is the replica's leadership.
///
/// # Errors
/// The signer's client cannot be built; the metrics cannot be registered.
pub(super) async fn controllers(
    args: &PcrArgs,
    client_opts: &k8s::client::ClientOptions,
    shared_client: kube::Client,
    trust_domain: &TrustDomain,
    propagation: Duration,
    leader: tokio::sync::watch::Receiver<bool>,
    registry: &prometheus::Registry,
) -> anyhow::Result<Vec<Controller>> {
    let mut out: Vec<Controller> = Vec::new();
    if args.pod_certificates {
        let client = k8s::client::client(&k8s::client::ClientOptions {
            max_in_flight: args.pcr_max_in_flight.max(1),
            ..client_opts.clone()
        })
        .await?;
        let metrics = k8s::pcr::Metrics::register(registry)?;
        let opts = k8s::pcr::SignerOptions {
            signer_name: args.pcr_signer_name.clone(),
            trust_domain: trust_domain.clone(),
            max_in_flight: args.pcr_max_in_flight.max(1),
            max_age: args.pcr_max_age,
            refresh_fraction: crate::ca::ROTATION_FRACTION,
            // Pods that mount the published ClusterTrustBundle learn a new
            // root from it, and its counter holds activation until it has
            // it: their leaves need hold only retirement.
            tracked: if args.cluster_trust_bundle {
                crate::ca::Tracked::RetireOnly
            } else {
                crate::ca::Tracked::Ledger
            },
        };
        let leader = leader.clone();
        out.push(Box::new(move |issuer, tasks| {
            let task = k8s::pcr::spawn(client, opts, issuer, leader, metrics, tasks.signal());
            tasks.adopt("kube-pcr-signer", task);
            Vec::new()
        }));
    }
    if args.cluster_trust_bundle {
        let signer = args.pcr_signer_name.clone();
        let suffix = args.cluster_trust_bundle_suffix.clone();
        out.push(Box::new(move |issuer, tasks| {
            let publisher = k8s::trustbundle::Publisher::new(
                shared_client,
                &signer,
                &suffix,
                issuer.authorities(),
                leader,
            );
            tasks.adopt("kube-cluster-trust-bundle", publisher.spawn(tasks.signal()));
            vec![publisher.counter(propagation)]
        }));
    }
    Ok(out)
}
