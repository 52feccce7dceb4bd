//! The cluster's service-account token issuer, read from the API server:
//! its name from `/.well-known/openid-configuration` and its public keys
//! from `/openid/v1/jwks` (RBAC: `system:service-account-issuer-discovery`).
//!
//! The keys are fetched at start (failing start-up if they cannot be
//! read: the operator then chooses `--token-review`), re-fetched every
//! refresh period, and at once (at most every [`MIN_REFETCH_GAP`]) when a
//! token names a key id we do not know: the issuer has rotated its key.
//! The latest document is published through a `watch` that the token
//! authenticator reads; a failed fetch keeps the previous keys.
//!
//! Not checked here: the documents are parsed by the authenticator, which
//! refuses a JWKS with no usable key and keeps the previous one.

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use serde::Deserialize;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::Error;

/// The shortest time between two fetches triggered by unknown key ids
/// (a stream of forged tokens must not become a stream of API calls).
pub const MIN_REFETCH_GAP: Duration = Duration::from_secs(10);

/// Where the API server publishes its issuer's discovery document.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// Where the API server publishes its issuer's public keys.
pub const JWKS_PATH: &str = "/openid/v1/jwks";

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
}

/// The cluster's issuer and its published keys.
pub struct ClusterIssuer {
    /// The `iss` of the cluster's service-account tokens.
    pub issuer: String,
    /// The latest JWKS document.
    pub jwks: watch::Receiver<Option<String>>,
    /// Poked by the authenticator when a token names an unknown key.
    pub stale: Arc<Notify>,
    tx: watch::Sender<Option<String>>,
}

async fn get_text(client: &Client, path: &str) -> Result<String, Error> {
    let request = http::Request::get(path)
        .header(http::header::ACCEPT, "application/json")
        .body(Vec::new())
        .map_err(|e| Error::Config(format!("GET {path}: {e}")))?;
    client
        .request_text(request)
        .await
        .map_err(|e| Error::api(format!("GET {path}"), e))
}

impl ClusterIssuer {
    /// Reads the issuer and its keys once. `issuer` overrides the
    /// discovered name (for API servers whose discovery document names
    /// another URL than the tokens' `iss`).
    ///
    /// # Errors
    /// [`Error::Api`] when either document cannot be read (typically RBAC:
    /// bind `system:service-account-issuer-discovery`), [`Error::Invalid`]
    /// when the discovery document is malformed.
    pub async fn discover(client: &Client, issuer: Option<String>) -> Result<Self, Error> {
        let issuer = match issuer {
            Some(i) => i,
            None => {
                let text = get_text(client, DISCOVERY_PATH).await?;
                let d: Discovery = serde_json::from_str(&text).map_err(|e| Error::Invalid {
                    what: DISCOVERY_PATH.into(),
                    reason: e.to_string(),
                })?;
                d.issuer
            }
        };
        let jwks = get_text(client, JWKS_PATH).await?;
        let (tx, rx) = watch::channel(Some(jwks));
        Ok(Self {
            issuer,
            jwks: rx,
            stale: Arc::new(Notify::new()),
            tx,
        })
    }

    /// Re-fetches the keys every `period`, and when poked (at most every
    /// [`MIN_REFETCH_GAP`]), until `shutdown` fires. Only a changed
    /// document is published.
    pub fn spawn_refresh(
        &self,
        client: Client,
        period: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let tx = self.tx.clone();
        let stale = self.stale.clone();
        tokio::spawn(async move {
            // The fetch at start does not count: a key rotated just after
            // it is fetched at the first token that names it.
            let mut last: Option<tokio::time::Instant> = None;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = stale.notified() => {
                        if let Some(next) = last.map(|l| l + MIN_REFETCH_GAP) {
                            tokio::select! {
                                _ = tokio::time::sleep_until(next) => {}
                                _ = shutdown.changed() => return,
                            }
                        }
                    }
                    _ = shutdown.changed() => return,
                }
                last = Some(tokio::time::Instant::now());
                match get_text(&client, JWKS_PATH).await {
                    Ok(text) => {
                        tx.send_if_modified(|cur| {
                            if cur.as_deref() == Some(text.as_str()) {
                                return false;
                            }
                            tracing::info!("the cluster's token issuer keys changed");
                            *cur = Some(text);
                            true
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "fetching the cluster's token issuer keys failed; keeping the previous ones");
                    }
                }
            }
        })
    }
}
