//! The Kubernetes client, with its limits chosen on purpose.
//!
//! client-go throttles every client to a QPS and burst (istiod: 80/160
//! shared by all its calls), and that throttle is where istiod and
//! istio-csr fall over under mass pod starts: each CSR waits behind a
//! TokenReview in the same queue. kube-rs has no such throttle; ours is
//! instead:
//!
//! - no API call at all on the CSR path by default (tokens are checked
//!   locally against the issuer's keys and the watch caches);
//! - a cap on requests in flight to the API server ([`ClientOptions::max_in_flight`]):
//!   beyond it requests queue in the client rather than pile onto an API
//!   server that is already slow. A watch holds its slot only until the
//!   API server answers its headers;
//! - the API server's own back-pressure obeyed: 429 (API Priority and
//!   Fairness) and 503/504 are retried with back-off, honouring
//!   `Retry-After` (kube's server-aware retry policy);
//! - connect, write and read timeouts, so a vanished API server is
//!   noticed: one that goes silent (its host gone, a partition: no FIN, no
//!   RST) fails no request by itself, and a request sent on a pooled
//!   connection to it would wait forever. The read timeout is longer than
//!   any watch we run lasts (they are renewed every 60 s, and the server
//!   ends each one), so only a dead connection reaches it.
//!
//! TokenReview, when chosen, has its own concurrency cap and queue
//! ([`super::review`]).

use std::path::PathBuf;
use std::time::Duration;

use kube::client::ClientBuilder;

use super::Error;

/// How the client reaches the API server, and how hard it may push.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// A kubeconfig file; `None`: `KUBECONFIG`, `~/.kube/config`, then the
    /// in-cluster service account, in that order.
    pub kubeconfig: Option<PathBuf>,
    /// Requests in flight to the API server at once.
    pub max_in_flight: usize,
    /// How long to wait for a connection.
    pub connect_timeout: Duration,
    /// How long a response (a watch's stream included) may bring no byte
    /// before the request fails. Must exceed every watch's own timeout.
    pub read_timeout: Duration,
}

/// Requests in flight to the API server, by default.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 32;

/// [`ClientOptions::read_timeout`] by default: the watches' 60 s, plus a
/// margin.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(75);

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            connect_timeout: Duration::from_secs(10),
            read_timeout: DEFAULT_READ_TIMEOUT,
        }
    }
}

/// The client configuration: the kubeconfig named, or inferred.
///
/// # Errors
/// [`Error::Config`] when no configuration can be found or read.
pub async fn config(opts: &ClientOptions) -> Result<kube::Config, Error> {
    let mut config = match &opts.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| Error::Config(e.to_string()))?,
    };
    config.connect_timeout = Some(opts.connect_timeout);
    config.read_timeout = Some(opts.read_timeout);
    config.default_retry = true;
    Ok(config)
}

/// A client with the limits of [`ClientOptions`].
///
/// # Errors
/// [`Error::Config`] when no configuration can be found, or the TLS set-up
/// it names fails.
pub async fn client(opts: &ClientOptions) -> Result<kube::Client, Error> {
    let config = config(opts).await?;
    from_config(config, opts.max_in_flight)
}

/// A client from a configuration, capped at `max_in_flight` requests.
///
/// # Errors
/// [`Error::Config`] when the TLS set-up the configuration names fails.
pub fn from_config(config: kube::Config, max_in_flight: usize) -> Result<kube::Client, Error> {
    let builder = ClientBuilder::try_from(config).map_err(|e| Error::Config(e.to_string()))?;
    Ok(builder
        .with_layer(&tower::limit::ConcurrencyLimitLayer::new(
            max_in_flight.max(1),
        ))
        .build())
}
