//! Where CA material lives: a trait, and the local-directory backend.
//!
//! The directory layout is Istio's (`ca-cert.pem`, `ca-key.pem`,
//! `cert-chain.pem`, `root-cert.pem`), so a plugged-in `cacerts` directory
//! and our own state directory are read by the same code. A Kubernetes Secret
//! backend implements the same trait.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::Error;

/// The signing certificate: the first of the four files of an Istio
/// `cacerts` directory.
pub const CA_CERT: &str = "ca-cert.pem";
/// The signing certificate's private key (PEM).
pub const CA_KEY: &str = "ca-key.pem";
/// The signing certificate and the chain above it, up to the root.
pub const CERT_CHAIN: &str = "cert-chain.pem";
/// The root certificate(s).
pub const ROOT_CERT: &str = "root-cert.pem";
/// All four, in a fixed order.
pub const FILES: [&str; 4] = [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT];

/// The four pieces of CA material, in Istio's naming.
#[derive(Clone)]
pub struct CaFiles {
    /// `ca-cert.pem`: the signing certificate.
    pub ca_cert: String,
    /// `ca-key.pem`: its private key.
    pub ca_key: Zeroizing<String>,
    /// `cert-chain.pem`: the signing certificate and the chain above it.
    pub cert_chain: String,
    /// `root-cert.pem`: the root(s).
    pub root_cert: String,
}

impl fmt::Debug for CaFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaFiles")
            .field("ca_cert", &self.ca_cert)
            .field("ca_key", &"<redacted>")
            .field("cert_chain", &self.cert_chain)
            .field("root_cert", &self.root_cert)
            .finish()
    }
}

/// CA material as four files in one directory: an Istio `cacerts`
/// directory (a plugged-in CA, or one imported with `ca rotate-root
/// prepare --from`), and each authority's directory in the state store.
#[derive(Clone, Debug)]
pub struct CacertsDir {
    dir: PathBuf,
}

impl CacertsDir {
    /// The files of directory `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Store {
            location: self.dir.display().to_string(),
            reason: reason.into(),
        }
    }

    /// The four files, or `None` when none of them is there.
    ///
    /// # Errors
    /// [`Error::Store`] when some but not all are there, or one is
    /// unreadable: a partial directory is never treated as empty.
    pub fn load(&self) -> Result<Option<CaFiles>, Error> {
        let present: Vec<&str> = FILES
            .iter()
            .copied()
            .filter(|f| self.dir.join(f).exists())
            .collect();
        if present.is_empty() {
            return Ok(None);
        }
        if present.len() != FILES.len() {
            let missing: Vec<&str> = FILES
                .iter()
                .copied()
                .filter(|f| !present.contains(f))
                .collect();
            return Err(self.err(format!(
                "partial CA material: has {}, missing {}; refusing to start. Restore the missing files, \
                 or remove the directory to create a new CA (every certificate issued so far will stop verifying)",
                present.join(", "),
                missing.join(", ")
            )));
        }
        let read = |name: &str| {
            let path = self.dir.join(name);
            fs::read_to_string(&path)
                .map_err(|e| self.err(format!("reading {}: {e}", path.display())))
        };
        Ok(Some(CaFiles {
            ca_cert: read(CA_CERT)?,
            ca_key: Zeroizing::new(read(CA_KEY)?),
            cert_chain: read(CERT_CHAIN)?,
            root_cert: read(ROOT_CERT)?,
        }))
    }

    /// Writes all four files into a fresh sibling directory, then renames it
    /// into place, so a crash never leaves a partial CA behind. `Ok(false)`:
    /// the directory already exists, and nothing was written.
    ///
    /// # Errors
    /// [`Error::Store`] when writing fails.
    pub fn create(&self, files: &CaFiles) -> Result<bool, Error> {
        let parent = self
            .dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = self
            .dir
            .file_name()
            .ok_or_else(|| self.err("the CA directory has no name"))?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| self.err(format!("creating {}: {e}", parent.display())))?;
        let tmp = parent.join(temp_name(name).map_err(|e| self.err(e.to_string()))?);
        // `create` fails if the name exists: we only ever remove what we made.
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(|e| self.err(format!("creating {}: {e}", tmp.display())))?;
        // Each failure names the file it was writing.
        let write = |name: &str, text: &str, mode: u32| {
            let path = tmp.join(name);
            write_new_file(&path, text.as_bytes(), mode)
                .map_err(|e| format!("writing {}: {e}", path.display()))
        };
        let write_all = || -> Result<(), String> {
            write(CA_KEY, &files.ca_key, 0o600)?;
            crash_point("cacerts-partial");
            write(CA_CERT, &files.ca_cert, 0o644)?;
            write(CERT_CHAIN, &files.cert_chain, 0o644)?;
            write(ROOT_CERT, &files.root_cert, 0o644)?;
            File::open(&tmp)
                .and_then(|d| d.sync_all())
                .map_err(|e| format!("syncing {}: {e}", tmp.display()))
        };
        if let Err(e) = write_all() {
            // Nothing half-written stays: the temporary directory goes.
            let _ = fs::remove_dir_all(&tmp);
            return Err(self.err(format!("writing the CA files: {e}")));
        }
        match fs::rename(&tmp, &self.dir) {
            Ok(()) => {
                File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| self.err(format!("syncing: {e}")))?;
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::DirectoryNotEmpty | io::ErrorKind::AlreadyExists
                ) =>
            {
                let _ = fs::remove_dir_all(&tmp);
                Ok(false)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                Err(self.err(format!("moving the new CA into place: {e}")))
            }
        }
    }
}

/// Whether `name` is one [`temp_name`] makes: what an interrupted atomic
/// write leaves behind.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

/// Removes what interrupted atomic writes left directly in `dir`.
pub fn remove_temp_leftovers(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if !is_temp_name(&e.file_name().to_string_lossy()) {
            continue;
        }
        let path = e.path();
        let _ = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
    }
}

/// `.<name>.tmp-<128 random bits>`: unique across processes and replicas
/// sharing a volume (PIDs are not: every container's main process is 1).
pub(crate) fn temp_name(name: &std::ffi::OsStr) -> io::Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| io::Error::other("system random source failed"))?;
    let suffix = super::bundle::hex(&bytes);
    Ok(format!(".{}.tmp-{suffix}", name.to_string_lossy()))
}

pub(crate) fn write_new_file(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Replaces `path` atomically: a temporary file in the same directory,
/// written with `mode`, fsynced, renamed over `path`, then the directory
/// fsynced. Readers see the old content or the new, never a mix.
///
/// # Errors
/// Any I/O error; the temporary file is removed on failure.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = dir.join(temp_name(name)?);
    // `write_new_file` refuses an existing name: we only remove what we made.
    let result = write_new_file(&tmp, bytes, mode).and_then(|()| {
        if name == super::keystore::MANIFEST {
            crash_point("manifest-temp");
        }
        fs::rename(&tmp, path)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    File::open(dir)?.sync_all()
}

/// Creates the empty marker file `path` (kept if it exists), durably.
pub(crate) fn write_new_or_keep(path: &Path) -> io::Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    f.sync_all()?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Fault injection for the crash tests: when the environment variable
/// [`CRASH_ENV`] names `point`, the process aborts there, as `kill -9`
/// would stop it (no destructor, no flush). Points: `cacerts-partial`
/// (an authority's directory half written), `members-written` (every
/// directory written, the manifest not yet), `manifest-temp` (the new
/// manifest written beside the old, not yet renamed), `manifest-written`
/// (renamed, nothing deleted yet), `sweeping` (one old directory deleted).
pub fn crash_point(point: &str) {
    if std::env::var_os(CRASH_ENV).is_some_and(|v| v == point) {
        std::process::abort();
    }
}

/// See [`crash_point`].
pub const CRASH_ENV: &str = "WORKLOAD_CA_CRASH_AT";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{Authority, KeyAlgorithm};
    use crate::identity::TrustDomain;
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, SystemTime};

    fn root() -> CaFiles {
        Authority::generate_root(
            &TrustDomain::new("td").unwrap(),
            KeyAlgorithm::EcdsaP256,
            Duration::from_secs(60),
            SystemTime::now(),
        )
        .unwrap()
    }

    #[test]
    fn a_second_create_loses_and_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CacertsDir::new(tmp.path().join("ca"));
        let (a, b) = (root(), root());
        assert!(dir.create(&a).unwrap());
        assert!(!dir.create(&b).unwrap());
        assert_eq!(dir.load().unwrap().unwrap().ca_cert, a.ca_cert);
        assert_eq!(
            fs::read_dir(tmp.path()).unwrap().count(),
            1,
            "no temporary directory left behind"
        );
        let mode = fs::metadata(dir.dir().join(CA_KEY))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(dir.dir()).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
    }

    #[test]
    fn atomic_write_replaces_with_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        atomic_write(&path, b"one", 0o600).unwrap();
        atomic_write(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn debug_redacts_the_key() {
        let dbg = format!("{:?}", root());
        assert!(dbg.contains("<redacted>"));
        assert!(!dbg.contains("PRIVATE KEY"));
    }
}
