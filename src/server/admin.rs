//! The admin API: root rotation steps and status, on a Unix socket only
//! the operator can reach (mode 0600 in a 0700 state directory). Nothing
//! of it is on the CSR port. HTTP/1 with JSON bodies:
//!
//! - `GET /v1/rotation` -> [`RotationStatus`]
//! - `POST /v1/rotation/{prepare,activate,retire}` with [`StepRequest`] ->
//!   200 and the new [`RotationStatus`]; 409 with the reasons when the
//!   step's gate is closed; 400 when the step does not apply.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tokio::sync::watch;
use zeroize::Zeroizing;

use super::Error;
use super::rotate::{RotationStatus, Rotator, Step, StepError};
use crate::ca::CaFiles;

/// The admin socket's name in the state directory, by default.
pub const DEFAULT_SOCKET: &str = "admin.sock";

/// The body of a step.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StepRequest {
    /// Take the step even though its gate is closed (`--force`).
    #[serde(default)]
    pub force: bool,
    /// `prepare` only: a `cacerts` set to prepare instead of a new root.
    #[serde(default)]
    pub from: Option<CacertsBody>,
}

/// The four files of a `cacerts` directory.
#[derive(Serialize, Deserialize)]
pub struct CacertsBody {
    /// `ca-cert.pem`: the signing certificate.
    pub ca_cert: String,
    /// `ca-key.pem`: its private key (never shown in Debug).
    #[serde(serialize_with = "ser_key", deserialize_with = "de_key")]
    pub ca_key: Zeroizing<String>,
    /// `cert-chain.pem`: the signing certificate and the chain above it.
    pub cert_chain: String,
    /// `root-cert.pem`: the root(s).
    pub root_cert: String,
}

fn ser_key<S: serde::Serializer>(key: &Zeroizing<String>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(key)
}

fn de_key<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Zeroizing<String>, D::Error> {
    String::deserialize(d).map(Zeroizing::new)
}

impl std::fmt::Debug for CacertsBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacertsBody")
            .field("ca_key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl From<CacertsBody> for CaFiles {
    fn from(b: CacertsBody) -> Self {
        Self {
            ca_cert: b.ca_cert,
            ca_key: b.ca_key,
            cert_chain: b.cert_chain,
            root_cert: b.root_cert,
        }
    }
}

impl From<&CaFiles> for CacertsBody {
    fn from(f: &CaFiles) -> Self {
        Self {
            ca_cert: f.ca_cert.clone(),
            ca_key: f.ca_key.clone(),
            cert_chain: f.cert_chain.clone(),
            root_cert: f.root_cert.clone(),
        }
    }
}

/// An error answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Why the request failed.
    pub error: String,
    /// What a closed gate is waiting for.
    #[serde(default)]
    pub missing: Vec<String>,
}

type Answer = Result<Json<RotationStatus>, (StatusCode, Json<ErrorBody>)>;

async fn status(State(r): State<Arc<Rotator>>) -> Json<RotationStatus> {
    Json(r.status())
}

async fn step(r: Arc<Rotator>, step: Step, req: StepRequest) -> Answer {
    match r.take(step, req.from.map(CaFiles::from), req.force).await {
        Ok(_) => Ok(Json(r.status())),
        Err(StepError::Gated { missing, .. }) => Err((
            StatusCode::CONFLICT,
            Json(ErrorBody {
                error: format!("not yet safe to {}", step.as_str()),
                missing,
            }),
        )),
        Err(StepError::Failed(e)) => Err((
            StatusCode::BAD_REQUEST,
            Json(ErrorBody {
                error: e.to_string(),
                missing: Vec::new(),
            }),
        )),
    }
}

/// Binds a Unix socket at `path` that only this user can ever reach: bound
/// in a fresh 0700 directory beside it, made 0600, then renamed into place
/// (so no umask or directory mode leaves a moment where others can
/// connect).
fn bind_private(path: &Path) -> Result<UnixListener, Error> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::Config(format!("admin socket {}: no file name", path.display())))?;
    let tmp = parent.join(crate::ca::store::temp_name(name).map_err(|e| Error::io(path, e))?);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    let inner = tmp.join("s");
    let bound = UnixListener::bind(&inner)
        .map_err(|e| Error::io(&inner, e))
        .and_then(|l| {
            std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))
                .and_then(|()| std::fs::rename(&inner, path))
                .map_err(|e| Error::io(path, e))?;
            Ok(l)
        });
    let _ = std::fs::remove_dir_all(&tmp);
    bound
}

/// Binds the admin socket at `path` (replacing a stale one) and serves it
/// until `shutdown` changes.
///
/// # Errors
/// [`Error::Io`] when the socket cannot be bound, or another server
/// already answers on it.
pub async fn spawn(
    path: &Path,
    rotator: Arc<Rotator>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(PathBuf, tokio::task::JoinHandle<()>), Error> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(Error::Config(format!(
                "admin socket {}: something that is not a socket is there; not replacing it",
                path.display()
            )));
        }
        // Only a socket nobody listens on is stale.
        match tokio::net::UnixStream::connect(path).await {
            Ok(_) => {
                return Err(Error::Config(format!(
                    "admin socket {}: another server is listening on it",
                    path.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
            }
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    let listener = bind_private(path)?;
    let app = axum::Router::new()
        .route("/v1/rotation", get(status))
        .route(
            "/v1/rotation/prepare",
            post(
                |State(r): State<Arc<Rotator>>, Json(req): Json<StepRequest>| {
                    step(r, Step::Prepare, req)
                },
            ),
        )
        .route(
            "/v1/rotation/activate",
            post(
                |State(r): State<Arc<Rotator>>, Json(req): Json<StepRequest>| {
                    step(r, Step::Activate, req)
                },
            ),
        )
        .route(
            "/v1/rotation/retire",
            post(
                |State(r): State<Arc<Rotator>>, Json(req): Json<StepRequest>| {
                    step(r, Step::Retire, req)
                },
            ),
        )
        .with_state(rotator);
    let owned = path.to_owned();
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.changed().await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin socket failed");
        }
        let _ = std::fs::remove_file(&owned);
    });
    Ok((path.to_owned(), task))
}
