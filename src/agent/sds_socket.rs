//! The SDS socket: bound privately, served until shutdown.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::sync::watch;

use super::super::Error;
use super::super::sds_routes::SdsRoutes;
use super::{SDS_DRAIN, Sds};

/// Who may connect to an SDS socket, checked on every connection with the
/// kernel's account of the peer (`SO_PEERCRED`), so a process is refused
/// even when the socket's file permissions would let it connect (a shared
/// group, a socket directory mounted into another pod, root).
///
/// What it does not check: the peer's pid (a process may pass the
/// connection on), or anything after the connection is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerRule {
    /// The uid the connecting process must run as.
    pub uid: u32,
    /// The gid it must run as too, when set.
    pub gid: Option<u32>,
}

impl PeerRule {
    /// True when the peer's `uid` and `gid` satisfy the rule.
    #[must_use]
    pub fn admits(&self, uid: u32, gid: u32) -> bool {
        // A peer reporting an overflow id is from an unmapped user
        // namespace: never this rule's process, whatever the rule says.
        let overflow = |id: u32, what: &str| id == u32::MAX || id == overflow_id(what);
        uid == self.uid
            && self.gid.is_none_or(|g| g == gid)
            && !overflow(uid, "uid")
            && !(self.gid.is_some() && overflow(gid, "gid"))
    }
}

impl std::fmt::Display for PeerRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.gid {
            Some(gid) => write!(f, "uid {} gid {gid}", self.uid),
            None => write!(f, "uid {}", self.uid),
        }
    }
}

impl std::str::FromStr for PeerRule {
    type Err = String;

    /// `UID` or `UID:GID`, numeric. The kernel's overflow ids are refused:
    /// `SO_PEERCRED` reports them for every process whose id is not mapped
    /// into the agent's user namespace, so a rule naming one would let all
    /// of those in. So is `-1` (4294967295), which no process has.
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |t: &str, what: &str| {
            let id = t
                .parse::<u32>()
                .map_err(|_| format!("{s:?}: the {what} must be a number (UID or UID:GID)"))?;
            if id == u32::MAX || id == overflow_id(what) {
                return Err(format!(
                    "{s:?}: {what} {id} is refused: the kernel reports it for any process whose {what} is not mapped into this user namespace (or it is -1)"
                ));
            }
            Ok(id)
        };
        match s.split_once(':') {
            Some((uid, gid)) => Ok(Self {
                uid: num(uid, "uid")?,
                gid: Some(num(gid, "gid")?),
            }),
            None => Ok(Self {
                uid: num(s, "uid")?,
                gid: None,
            }),
        }
    }
}

/// The kernel's overflow uid or gid (`/proc/sys/kernel/overflow{uid,gid}`,
/// 65534 unless changed), read once per process: every connection's peer
/// check asks.
fn overflow_id(what: &str) -> u32 {
    static UID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    static GID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let cell = if what == "gid" { &GID } else { &UID };
    *cell.get_or_init(|| {
        std::fs::read_to_string(format!("/proc/sys/kernel/overflow{what}"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(65534)
    })
}

/// Gives the socket file at `path` to the rule's uid and gid, if bound.
fn give_to_peer(path: &Path, peer: Option<PeerRule>) -> std::io::Result<()> {
    let Some(rule) = peer else {
        return Ok(());
    };
    std::os::unix::fs::chown(path, Some(rule.uid), rule.gid).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("giving the socket to its peer ({rule}): {e}"),
        )
    })
}

/// A bound SDS socket, serving until shutdown.
pub struct SdsSocket {
    /// Where it is bound.
    pub path: PathBuf,
    /// The task accepting on it; ends at shutdown.
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
/// With a [`PeerRule`] ([`Sds::with_peer`]), a connection from any other uid (or gid) is closed
/// before a byte is read, counted under the `peer_credentials` refusal and
/// logged (rate-limited per peer uid).
///
/// The socket file is given to the rule's uid (and gid), mode 0600, before
/// it is placed, so the bound process can connect and no other non-root
/// one can; that takes the agent running as root (node mode), and an agent
/// that cannot chown refuses to start rather than serve a socket its peer
/// cannot open. Workloads that share a uid (every Istio proxy runs as 1337)
/// are not told apart by it: give each its own uid or gid.
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
        super::super::workload::random_bits().map_err(|e| err(e.to_string()))?
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
                .and_then(|()| give_to_peer(&tmp, sds.peer))
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
    let peer = sds.peer;
    let mut sds = sds;
    sds.shutdown = Some(shutdown.clone());
    let limits = sds.limits.clone();
    let refusals = sds.metrics.refusals.clone();
    let routes = tonic::service::Routes::new(SdsRoutes::new(sds, limits.http2.max_message_bytes));
    let shown = path.display().to_string();
    let peer_refusals = refusals.clone();
    let warn = std::sync::Arc::new(crate::logsafe::WarnLimiter::<Option<u32>>::new());
    let check_peer = move |io: tokio::net::UnixStream, _| {
        let admitted = match peer {
            None => Some(io),
            Some(rule) => match io.peer_cred() {
                Ok(c) if rule.admits(c.uid(), c.gid()) => Some(io),
                Ok(c) => {
                    peer_refusals.refused(crate::limits::label::PEER_CREDENTIALS);
                    crate::peer_warn!(
                        warn,
                        Some(c.uid()),
                        peer_refusals,
                        socket = %shown,
                        uid = c.uid(),
                        gid = c.gid(),
                        pid = ?c.pid(),
                        expected = %rule,
                        "SDS connection refused: the peer process is not the one this socket is bound to"
                    );
                    None
                }
                Err(e) => {
                    peer_refusals.refused(crate::limits::label::PEER_CREDENTIALS);
                    crate::peer_warn!(warn, None, peer_refusals, socket = %shown, error = %e, "SDS connection refused: its peer credentials cannot be read");
                    None
                }
            },
        };
        std::future::ready(admitted)
    };
    let accept = crate::net::Acceptor {
        name: format!("SDS {}", path.display()),
        listener,
        limits: limits.accept.clone(),
        refusals: refusals.clone(),
        shutdown: shutdown.clone(),
        drain: SDS_DRAIN,
        refusal_label: None,
    }
    .spawn(check_peer, move |io, calls, stop| {
        let routes = routes.clone();
        let limits = limits.clone();
        let refusals = refusals.clone();
        async move {
            crate::net::serve_h2(io, (), routes, &limits.http2, &refusals, calls, stop).await;
        }
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_reporting_an_overflow_id_is_never_admitted() {
        let overflow = overflow_id("uid");
        // A rule built in code (not parsed) naming the overflow id.
        let rule = PeerRule {
            uid: overflow,
            gid: None,
        };
        assert!(!rule.admits(overflow, 0));
        let rule = PeerRule {
            uid: 7,
            gid: Some(overflow_id("gid")),
        };
        assert!(!rule.admits(7, overflow_id("gid")));
        assert!(
            !PeerRule {
                uid: u32::MAX,
                gid: None
            }
            .admits(u32::MAX, 0)
        );
        // Anything else is judged by the rule.
        let rule = PeerRule {
            uid: 7,
            gid: Some(8),
        };
        assert!(rule.admits(7, 8));
        assert!(!rule.admits(7, 9));
        assert!(!rule.admits(6, 8));
    }
}
