//! The SDS socket: bound privately, served until shutdown.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::sync::watch;

use super::super::Error;
use super::super::sds_routes::SdsRoutes;
use super::{SDS_DRAIN, Sds};

/// A bound SDS socket, serving until shutdown.
pub struct SdsSocket {
    pub path: PathBuf,
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds `path` and serves `sds` on it until `shutdown` fires.
///
/// The socket is bound inside a fresh private (0700) directory next to
/// `path`, restricted to 0600, then hard-linked into place, which fails
/// rather than replace anything that appeared meanwhile. So it is never
/// reachable with looser permissions, and never overwrites another socket.
/// On shutdown the path is removed only if it is still our socket (same
/// device and inode): an overlapping successor's socket is left alone.
///
/// An existing socket is replaced only when connecting to it is refused
/// (left by a crashed agent); a live one, one we may not connect to, or a
/// path that is not a socket is an error. Abstract names (`@name`) are
/// refused: they have no file permissions to protect the keys.
///
/// # Errors
/// [`Error::Socket`].
pub fn serve(
    path: &Path,
    sds: Sds,
    mut shutdown: watch::Receiver<bool>,
) -> Result<SdsSocket, Error> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let err = |reason: String| Error::Socket {
        path: path.to_owned(),
        reason,
    };
    if path.as_os_str().to_string_lossy().starts_with('@') {
        return Err(err(
            "abstract sockets are not supported: they cannot be protected by file permissions"
                .into(),
        ));
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let private = dir.join(format!(
        ".sds-{:016x}",
        super::super::workload::unit_random().to_bits()
    ));
    let tmp = private.join("s");
    for p in [path, tmp.as_path()] {
        if p.as_os_str().len() > 107 {
            return Err(err(format!(
                "{} is longer than the 107 bytes a Unix socket path may have",
                p.display()
            )));
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(err("another process is serving on it".into())),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "replacing a stale socket");
                    std::fs::remove_file(path)
                        .map_err(|e| err(format!("removing the stale socket: {e}")))?;
                }
                Err(e) => {
                    return Err(err(format!(
                        "exists and cannot be probed ({e}); refusing to replace it"
                    )));
                }
            }
        }
        Ok(_) => {
            return Err(err(
                "exists and is not a socket; refusing to replace it".into()
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e.to_string())),
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| err(format!("creating {}: {e}", private.display())))?;
    let placed = tokio::net::UnixListener::bind(&tmp)
        .map_err(|e| format!("binding: {e}"))
        .and_then(|l| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .and_then(|()| std::fs::hard_link(&tmp, path))
                .map_err(|e| format!("placing the socket: {e}"))?;
            Ok(l)
        });
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    let listener = placed.map_err(err)?;
    let ours = std::fs::symlink_metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .map_err(|e| err(e.to_string()))?;
    let owned = path.to_owned();
    // Unlinked as soon as shutdown begins, not after the drain: a proxy that
    // keeps its stream open must not leave the file behind when the process
    // exits at its deadline. Only our own socket (same inode) is removed.
    let remove_ours = move |p: &Path| {
        if std::fs::symlink_metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == ours) {
            let _ = std::fs::remove_file(p);
        }
    };
    let mut sds = sds;
    sds.shutdown = Some(shutdown.clone());
    let limits = sds.limits.clone();
    let refusals = sds.metrics.refusals.clone();
    let routes = tonic::service::Routes::new(SdsRoutes::new(sds, limits.http2.max_message_bytes));
    let accept = crate::net::Acceptor {
        name: format!("SDS {}", path.display()),
        listener,
        limits: limits.accept.clone(),
        refusals: refusals.clone(),
        shutdown: shutdown.clone(),
        drain: SDS_DRAIN,
        refusal_label: None,
    }
    .spawn(
        |io, _| std::future::ready(Some(io)),
        move |io, calls, stop| {
            let routes = routes.clone();
            let limits = limits.clone();
            let refusals = refusals.clone();
            async move {
                crate::net::serve_h2(io, (), routes, &limits.http2, &refusals, calls, stop).await;
            }
        },
    );
    let task = tokio::spawn(async move {
        let _ = shutdown.changed().await;
        remove_ours(&owned);
        if let Err(e) = accept.await {
            tracing::error!(path = %owned.display(), error = %e, "SDS server failed");
        }
        remove_ours(&owned);
    });
    Ok(SdsSocket {
        path: path.to_owned(),
        task,
    })
}
