//! `ca server --kube`: the CA on Kubernetes. Builds the cluster integration
//! the server runs with (`server::cluster::Cluster`) from `crate::k8s`.

use crate::sync::LockExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::parse_duration;
use crate::ca::policy::{ClusterView, NodeAgents, check_binding};
use crate::drain::Tasks;
use crate::identity::{SpiffeId, TrustDomain};
use crate::k8s;
use crate::server::auth::{
    AuthContext, AuthError, AuthFuture, Authenticator, Caller, TokenFault, bearer_token,
};
use crate::server::cluster::{Cluster, ReadyCheck};
use crate::server::jwt::{IssuerConfig, KeySource};

/// The Kubernetes options of `ca server` (`--kube` and what it enables).
#[derive(Args, Debug, Clone)]
pub struct KubeArgs {
    /// Run on Kubernetes: the CA in a Secret, tokens checked against the
    /// cluster, node agents allowed by `--trusted-node-accounts`.
    #[arg(long, env = "CA_KUBE")]
    pub kube: bool,
    /// Kubeconfig file (default: `KUBECONFIG`, `~/.kube/config`, then the
    /// pod's own service account).
    #[arg(long, env = "CA_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the CA's Lease and replica reports (and of its
    /// Secrets unless `--ca-secret-namespace` says otherwise).
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub kube_namespace: String,
    /// Namespace of `--ca-secret` and `--cacerts-secret` when not the CA's
    /// own: taking over an Istio install's CA (`istio-system`) while the
    /// CA, its Lease and reports live in a namespace nobody else writes.
    #[arg(long, env = "CA_SECRET_NAMESPACE")]
    pub ca_secret_namespace: Option<String>,
    /// Secret holding the CA's authorities (Istio's self-signed layout at
    /// the top level, plus the rotation state).
    #[arg(long, env = "CA_SECRET", default_value = "istio-ca-secret")]
    pub ca_secret: String,
    /// Secret of a plugged-in CA (Istio's `cacerts`), read to seed an
    /// empty store; never written.
    #[arg(long, env = "CA_CACERTS_SECRET", default_value = "cacerts")]
    pub cacerts_secret: String,
    /// Service accounts (`namespace/name`, comma-separated) that may ask
    /// for the identities of pods on their own node (`ImpersonatedIdentity`),
    /// e.g. `istio-system/ztunnel`. Empty: nobody.
    #[arg(long, env = "CA_TRUSTED_NODE_ACCOUNTS", value_delimiter = ',')]
    pub trusted_node_accounts: Vec<String>,
    /// The `iss` of the cluster's service-account tokens, when it differs
    /// from what the API server's discovery document says.
    #[arg(long, env = "CA_KUBE_ISSUER")]
    pub kube_issuer: Option<String>,
    /// Requests in flight to the API server at once (beyond it they queue
    /// in the CA; there is no QPS throttle, see `k8s::client`).
    #[arg(long, env = "CA_KUBE_MAX_IN_FLIGHT", default_value_t = k8s::client::DEFAULT_MAX_IN_FLIGHT)]
    pub kube_max_in_flight: usize,
    /// How long tokens are still judged against the watch caches while
    /// their watch is broken (API server unreachable); after that they are
    /// refused as unavailable until the watch is back.
    #[arg(long, env = "CA_KUBE_CACHE_MAX_STALE", default_value = "5m", value_parser = parse_duration)]
    pub kube_cache_max_stale: Duration,
    /// Check tokens with the TokenReview API instead of the issuer's keys
    /// (for clusters whose issuer keys cannot be read): one review per
    /// token, cached until shortly before it expires (at most 5 min).
    #[arg(long, env = "CA_TOKEN_REVIEW")]
    pub token_review: bool,
    /// TokenReviews at the API server at once; more callers queue.
    #[arg(long, env = "CA_TOKEN_REVIEW_MAX_IN_FLIGHT", default_value_t = 16)]
    pub token_review_max_in_flight: usize,
    /// How long a caller waits in the TokenReview queue before it is told
    /// to retry (`Unavailable`).
    #[arg(long, env = "CA_TOKEN_REVIEW_QUEUE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub token_review_queue_timeout: Duration,
    /// This replica's name (its pod's, through the downward API); a random
    /// suffix is added per start, so a restarted replica's evidence is
    /// kept apart from what it published before.
    #[arg(long, env = "POD_NAME")]
    pub replica_name: Option<String>,
    /// The Lease replicas elect their leader with.
    #[arg(long, env = "CA_LEADER_LEASE", default_value = "workload-ca-leader")]
    pub leader_lease: String,
    /// How long an unrenewed Lease stays its holder's (the leader renews
    /// every duration/7.5 and steps down after 2/3 of it).
    #[arg(long, env = "CA_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// How long after the CA rewrites a copy of the trust bundle (a mounted
    /// Secret or ConfigMap, a ClusterTrustBundle) its readers may still see
    /// the old one: the kubelet's sync of mounted volumes plus the
    /// workload's reload. Rotation gates wait this long after the last copy
    /// is rewritten.
    #[arg(long, env = "CA_BUNDLE_PROPAGATION", default_value = "90s", value_parser = parse_duration)]
    pub bundle_propagation: Duration,
    /// Keep a `kubernetes.io/tls` Secret with a serving certificate for
    /// these DNS names (`NAMESPACE/NAME=DNS[,DNS...]`, repeatable), e.g.
    /// istiod's when this CA replaces Istio's:
    /// `istio-system/istiod-tls=istiod.istio-system.svc`.
    #[arg(long, env = "CA_SERVING_SECRETS", value_delimiter = ';')]
    pub serving_secret: Vec<k8s::serving::ServingSecret>,
    /// Secret mode: `istio.<account>` Secrets written for service accounts.
    #[command(flatten)]
    pub secret_mode: super::kube_secrets::SecretModeArgs,
    /// The PodCertificateRequest signer.
    #[command(flatten)]
    pub pcr: super::kube_pcr::PcrArgs,
}

/// How long the CA Secret's watch may be down before readiness turns false.
const STORE_WATCH_GRACE: Duration = Duration::from_secs(10);

/// This replica's identity: its pod name (or host name) and a random suffix.
///
/// # Errors
/// The system random source failed.
fn replica_identity(name: Option<&str>) -> anyhow::Result<String> {
    let base = name
        .map(str::to_owned)
        .unwrap_or_else(super::agent::host_name);
    let mut bytes = [0u8; 3];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).map_err(|_| {
        anyhow::anyhow!(
            "the system random source failed (this replica's name needs a random suffix)"
        )
    })?;
    Ok(format!("{base}-{}", crate::ca::bundle::hex(&bytes)))
}

/// TokenReview as an authenticator: the review (cached, capped,
/// queued), then the same binding checks as local validation.
struct ReviewAuthenticator {
    reviewer: k8s::review::TokenReviewer,
    view: Arc<dyn ClusterView>,
    trust_domain: TrustDomain,
}

impl Authenticator for ReviewAuthenticator {
    fn name(&self) -> &'static str {
        "tokenreview"
    }

    fn authenticate<'a>(&'a self, ctx: &'a AuthContext<'a>) -> AuthFuture<'a> {
        Box::pin(async move {
            let Some(token) = bearer_token(ctx.metadata)? else {
                return Ok(None);
            };
            let facts = self.reviewer.review(token).await.map_err(|e| {
                let why = format!("token {}: {e}", k8s::review::token_id(token));
                if e.is_unavailable() {
                    AuthError::unavailable(why)
                } else {
                    AuthError::token(TokenFault::Review, why)
                }
            })?;
            check_binding(&facts, self.view.as_ref()).map_err(AuthError::from)?;
            let identity = SpiffeId::for_service_account(
                &self.trust_domain,
                &facts.namespace,
                &facts.service_account,
            )
            .map_err(|e| AuthError::token(TokenFault::Subject, e.to_string()))?;
            let detail = format!(
                "pod={}",
                crate::logsafe::peer(facts.pod.as_ref().map_or("", |p| p.name.as_str()))
            );
            Ok(Some(Caller {
                identity,
                method: "tokenreview",
                detail,
                max_ttl: None,
                facts: Some(facts),
            }))
        })
    }
}

/// The cluster integration `args` describe; `None` without `--kube`.
///
/// # Errors
/// No client configuration, the issuer's keys unreadable (with the RBAC
/// to grant, or `--token-review`), a malformed `cacerts` Secret.
pub(super) async fn cluster(
    args: &KubeArgs,
    jwks_refresh: Duration,
    audiences: &[String],
    trust_domain: &TrustDomain,
) -> anyhow::Result<Option<Cluster>> {
    if !args.kube {
        return Ok(None);
    }
    let node_agents = NodeAgents::parse(&args.trusted_node_accounts)
        .map_err(|e| anyhow::anyhow!("--trusted-node-accounts: {e}"))?;
    let client_opts = k8s::client::ClientOptions {
        kubeconfig: args.kubeconfig.clone(),
        max_in_flight: args.kube_max_in_flight,
        ..Default::default()
    };
    let client = k8s::client::client(&client_opts)
        .await
        .context("the Kubernetes client")?;
    let registry = prometheus::Registry::new();
    let mut tasks = Tasks::new();

    let cache = k8s::cache::ClusterCache::new(
        k8s::cache::CacheOptions {
            max_stale: args.kube_cache_max_stale,
            ..Default::default()
        },
        &registry,
    )?;
    for (name, task) in cache.spawn(client.clone(), tasks.signal()) {
        tasks.adopt(name, task);
    }

    let mut authenticators: Vec<Arc<dyn Authenticator>> = Vec::new();
    let issuer_config = if args.token_review {
        let reviewer = k8s::review::TokenReviewer::new(
            Arc::new(k8s::review::KubeReviewBackend::new(client.clone())),
            k8s::review::ReviewOptions {
                audiences: audiences.to_vec(),
                max_in_flight: args.token_review_max_in_flight.max(1),
                queue_timeout: args.token_review_queue_timeout,
                ..Default::default()
            },
            &registry,
        )?;
        authenticators.push(Arc::new(ReviewAuthenticator {
            reviewer,
            view: cache.clone(),
            trust_domain: trust_domain.clone(),
        }));
        None
    } else {
        let issuer = k8s::jwks::ClusterIssuer::discover(&client, args.kube_issuer.clone())
            .await
            .context(
                "reading the cluster's service-account issuer keys (/openid/v1/jwks); \
                 bind the CA's service account to the system:service-account-issuer-discovery ClusterRole, \
                 or use --token-review",
            )?;
        tasks.adopt(
            "kube-jwks-refresh",
            issuer.spawn_refresh(client.clone(), jwks_refresh, tasks.signal()),
        );
        Some(IssuerConfig {
            issuer: issuer.issuer.clone(),
            keys: KeySource::Published {
                jwks: issuer.jwks.clone(),
                stale: issuer.stale.clone(),
            },
        })
    };

    let secret_ns = args
        .ca_secret_namespace
        .as_deref()
        .unwrap_or(&args.kube_namespace);
    let store = Arc::new(k8s::store::SecretStore::new(
        client.clone(),
        secret_ns,
        &args.ca_secret,
    ));
    tasks.adopt("kube-ca-secret-watch", store.spawn_watch(tasks.signal()));
    let seed = k8s::store::read_cacerts(&client, secret_ns, &args.cacerts_secret)
        .await
        .with_context(|| format!("reading Secret {}/{}", secret_ns, args.cacerts_secret))?;

    let ready: Vec<ReadyCheck> = vec![
        {
            let cache = cache.clone();
            Arc::new(move || cache.ready())
        },
        {
            // A watch renewed after a compaction or an API-server restart
            // is down for a moment on every replica at once: tolerated for
            // the caches' grace, so the Service is not emptied by a blip.
            let store = store.clone();
            let down_since = std::sync::Mutex::new(None::<std::time::Instant>);
            Arc::new(move || {
                let mut since = down_since.locked();
                if store.watch_live() {
                    *since = None;
                    return Ok(());
                }
                let t = *since.get_or_insert_with(std::time::Instant::now);
                if t.elapsed() < STORE_WATCH_GRACE {
                    Ok(())
                } else {
                    Err(format!(
                        "the CA Secret's watch has not been live for {} s",
                        t.elapsed().as_secs()
                    ))
                }
            })
        },
    ];
    // Several replicas: one leads single-writer work; rotation evidence is
    // shared through ConfigMaps.
    let replica = replica_identity(args.replica_name.as_deref())?;
    let mut lease =
        k8s::lease::LeaseOptions::new(&args.kube_namespace, &args.leader_lease, &replica);
    if args.lease_duration < Duration::from_secs(3) {
        anyhow::bail!("--lease-duration must be at least 3s");
    }
    lease.duration = args.lease_duration;
    lease.renew_deadline = args.lease_duration * 2 / 3;
    lease.retry = (args.lease_duration * 2 / 15).max(Duration::from_millis(200));
    let (leadership, task) = k8s::lease::spawn(client.clone(), lease, tasks.signal());
    tasks.adopt("kube-leader-election", task);
    let peers = k8s::evidence::Peers::new(&replica, args.kube_cache_max_stale);
    tasks.adopt(
        "kube-evidence-watch",
        peers.spawn(client.clone(), &args.kube_namespace, tasks.signal()),
    );
    let (local_evidence, local_rx) = tokio::sync::watch::channel(None);
    tasks.adopt(
        "kube-evidence-publish",
        k8s::evidence::spawn_publisher(
            client.clone(),
            &args.kube_namespace,
            &replica,
            local_rx,
            peers.clone(),
            leadership.receiver(),
            tasks.signal(),
        ),
    );
    tracing::info!(%replica, lease = %args.leader_lease, "replica of a CA on Kubernetes");

    // Work that signs through the running CA, single-writer under the
    // Lease: each returns the counters of the bundle copies it keeps.
    let mut controllers: Vec<crate::server::cluster::Controller> = Vec::new();
    for spec in &args.serving_secret {
        controllers.push(k8s::serving::controller(
            client.clone(),
            spec.clone(),
            leadership.receiver(),
            Duration::ZERO,
            args.bundle_propagation,
        ));
    }
    controllers.extend(super::kube_secrets::controllers(
        &args.secret_mode,
        super::kube_secrets::Context {
            client: &client,
            leader: leadership.receiver(),
            registry: &registry,
            propagation: args.bundle_propagation,
            replica: &replica,
        },
    )?);
    controllers.extend(
        super::kube_pcr::controllers(
            &args.pcr,
            &client_opts,
            client.clone(),
            trust_domain,
            args.bundle_propagation,
            leadership.receiver(),
            &registry,
        )
        .await
        .context("the PodCertificateRequest signer / ClusterTrustBundle publisher")?,
    );

    Ok(Some(Cluster {
        store,
        seed,
        seed_from: format!("Secret {}/{}", secret_ns, args.cacerts_secret),
        view: cache,
        issuer: issuer_config,
        authenticators,
        node_agents,
        ready,
        registry,
        tasks,
        peers: Some(peers),
        local_evidence: Some(local_evidence),
        leader: Some(leadership.receiver()),
        controllers,
    }))
}
