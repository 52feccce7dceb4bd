//! Where the CA's authorities live: a versioned store with a
//! compare-and-swap update, and its local-directory backend.
//!
//! The whole set is one value with a generation. Every change is a swap
//! from the generation the writer read to the next one: two writers never
//! both succeed, and a writer that lost reads again (the Kubernetes Secret
//! backend does the same with the Secret's `resourceVersion`).
//!
//! The directory backend keeps each authority in its own directory (Istio's
//! four `cacerts` files, named by the authority's id) and the set in one
//! manifest, `authorities.json`. A swap writes the directories it needs
//! first, then replaces the manifest atomically, then deletes the
//! directories no member names any more. A `kill -9` at any instant leaves
//! the manifest before or after the swap, never between, and every
//! directory it names complete: a key is only deleted once its authority
//! has left the set (and so its root the bundle).

use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::authorities::State;
use super::authority::authority_id;
use super::bundle::{parse_pem_certs, unix};
use super::keys::KeyAlgorithm;
use super::store::{
    CA_CERT, CA_KEY, CERT_CHAIN, CaFiles, CacertsDir, FILES, ROOT_CERT, atomic_write, crash_point,
    write_new_or_keep,
};
use super::{Authority, AuthoritySet, Error};
use crate::identity::TrustDomain;

/// One authority as stored.
#[derive(Clone, Debug)]
pub struct StoredMember {
    /// The authority's id ([`authority_id`]).
    pub id: String,
    /// Active, prepared or retiring.
    pub state: State,
    /// When it entered its state (seconds since the Unix epoch).
    pub since: u64,
    /// Its certificates and key.
    pub files: CaFiles,
}

/// The CA's authorities as stored.
#[derive(Clone, Debug)]
pub struct Stored {
    /// Increases on every change of the set.
    pub generation: u64,
    /// Every authority of the set.
    pub members: Vec<StoredMember>,
}

/// What a [`KeyStore`] call returns: boxed, so stores are used as
/// `Arc<dyn KeyStore>` (a directory here, a Secret on Kubernetes).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>;

/// How often a follower asks a store whose changes it cannot be told about
/// for its generation.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Versioned storage for the CA's authorities.
pub trait KeyStore: Send + Sync {
    /// Where the material lives, for messages.
    fn describe(&self) -> String;

    /// The stored set, or `None` if nothing is stored yet.
    ///
    /// # Errors
    /// [`Error::Store`] when the store is unreadable or only partly there:
    /// a partial or corrupt store is never treated as empty.
    fn load(&self) -> StoreFuture<'_, Option<Stored>>;

    /// The stored generation alone (cheap: a reader that polls for changes
    /// loads the whole set only when this moved).
    ///
    /// # Errors
    /// As [`KeyStore::load`].
    fn generation(&self) -> StoreFuture<'_, Option<u64>>;

    /// Stores `next` if the stored generation is still `expected` (`None`:
    /// nothing stored yet). `Ok(false)`: someone else changed the store
    /// first, and nothing was written.
    ///
    /// # Errors
    /// [`Error::Store`] when writing fails; the stored set is then the one
    /// before the swap.
    fn swap<'a>(&'a self, expected: Option<u64>, next: &'a Stored) -> StoreFuture<'a, bool>;

    /// How often a follower should call [`KeyStore::generation`]: a store
    /// that keeps a watched copy answers from memory and can be asked often.
    fn poll_interval(&self) -> Duration {
        DEFAULT_POLL_INTERVAL
    }

    /// Whether a running server puts its authorities back when the store is
    /// found empty (a deleted Kubernetes Secret, which the next replica to
    /// start would otherwise fill with an unrelated root). A local
    /// directory is not: its removal is an operator's deliberate act.
    fn restore_when_wiped(&self) -> bool {
        false
    }
}

impl AuthoritySet {
    /// The set as the store keeps it.
    pub fn to_stored(&self) -> Stored {
        Stored {
            generation: self.generation(),
            members: self
                .members()
                .iter()
                .map(|m| StoredMember {
                    id: m.authority.id().to_owned(),
                    state: m.state,
                    since: unix(m.since),
                    files: m.authority.files().clone(),
                })
                .collect(),
        }
    }

    /// The set from what the store keeps, every authority validated again.
    ///
    /// # Errors
    /// [`Error::Material`] naming the authority that fails validation, or a
    /// member whose material does not match its id.
    pub fn from_stored(stored: &Stored, td: &TrustDomain, now: SystemTime) -> Result<Self, Error> {
        let mut members = Vec::new();
        for m in &stored.members {
            // Only the active authority must be valid now; one that signs
            // nothing may have expired in the set (and can be retired).
            let authority = if m.state == State::Active {
                Authority::from_files(&m.files, td, now)
            } else {
                Authority::from_files_any_time(&m.files, td, now)
            }
            .map_err(|e| {
                // Said once: "CA material refused: authority <id>: <file>: ...".
                let why = match e {
                    Error::Material(why) => why,
                    other => other.to_string(),
                };
                Error::Material(format!("authority {}: {why}", m.id))
            })?;
            if m.state != State::Active && authority.chain_not_after() <= now {
                tracing::warn!(
                    authority = %m.id, state = m.state.as_str(),
                    "authority has expired; retire it (`ca rotate-root retire`)"
                );
            }
            if authority.id() != m.id {
                return Err(Error::Material(format!(
                    "authority {}: its ca-cert.pem is authority {}",
                    m.id,
                    authority.id()
                )));
            }
            members.push(super::Member {
                authority: std::sync::Arc::new(authority),
                state: m.state,
                since: UNIX_EPOCH + Duration::from_secs(m.since),
            });
        }
        Self::new(members, stored.generation)
    }
}

/// What to generate when a store is empty.
#[derive(Clone, Debug)]
pub struct RootSpec {
    /// The trust domain of the root.
    pub trust_domain: TrustDomain,
    /// The root key's algorithm.
    pub algorithm: KeyAlgorithm,
    /// How long the root is valid.
    pub lifetime: Duration,
}

/// Loads the CA's authorities from `store`; when it is empty, stores the
/// set of one made from `seed` (a plugged-in CA's files), or a freshly
/// generated root. Returns the set and whether it was created now.
///
/// # Errors
/// Whatever the store or validation reports: stored material that fails
/// validation is refused, never replaced.
pub async fn load_or_create(
    store: &dyn KeyStore,
    spec: &RootSpec,
    seed: Option<&CaFiles>,
    now: SystemTime,
) -> Result<(AuthoritySet, bool), Error> {
    if let Some(stored) = store.load().await? {
        let set = AuthoritySet::from_stored(&stored, &spec.trust_domain, now).map_err(|e| {
            Error::Store {
                location: store.describe(),
                reason: format!(
                    "{e}; refusing to start (a stored CA that fails validation is never replaced): \
                     restore the file from a backup"
                ),
            }
        })?;
        return Ok((set, false));
    }
    let files = match seed {
        Some(f) => f.clone(),
        None => Authority::generate_root(&spec.trust_domain, spec.algorithm, spec.lifetime, now)?,
    };
    let set =
        AuthoritySet::single_since(Authority::from_files(&files, &spec.trust_domain, now)?, now)?;
    if store.swap(None, &set.to_stored()).await? {
        return Ok((set, true));
    }
    let stored = store.load().await?.ok_or_else(|| Error::Store {
        location: store.describe(),
        reason: "another process created the CA but it cannot be read back".into(),
    })?;
    Ok((
        AuthoritySet::from_stored(&stored, &spec.trust_domain, now)?,
        false,
    ))
}

/// The manifest's name in a [`DirStore`].
pub const MANIFEST: &str = "authorities.json";
const LOCK: &str = ".lock";
const SERVER_LOCK: &str = ".server";
/// Present while the very first swap (the CA's creation) writes: authority
/// directories without a manifest are an interrupted creation only then.
const CREATING: &str = ".creating";

/// The manifest's JSON (also the Kubernetes Secret backend's).
#[derive(Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub(crate) generation: u64,
    pub(crate) members: Vec<ManifestMember>,
    /// Authorities this swap took out of the set: their directories are
    /// deleted at start if a crash left them. Any other directory the
    /// manifest does not name is moved aside, never deleted (the manifest
    /// may be an older copy restored from a backup).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) removed: Vec<String>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct ManifestMember {
    pub(crate) id: String,
    pub(crate) state: String,
    pub(crate) since: u64,
}

impl Manifest {
    /// The manifest of `stored` (its files are kept beside it).
    pub(crate) fn of(stored: &Stored) -> Self {
        Self {
            generation: stored.generation,
            members: stored
                .members
                .iter()
                .map(|m| ManifestMember {
                    id: m.id.clone(),
                    state: m.state.as_str().to_owned(),
                    since: m.since,
                })
                .collect(),
            removed: Vec::new(),
        }
    }
}

/// The CA's authorities in a local directory (`<state-dir>/ca`).
///
/// A directory written before rotation existed (the four files directly in
/// it, no manifest) reads as a set of one at generation 1; the first swap
/// moves it into the new layout.
#[derive(Clone, Debug)]
pub struct DirStore {
    dir: PathBuf,
}

impl DirStore {
    /// A store in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory holding authority `id`'s files.
    pub fn member_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Store {
            location: self.dir.display().to_string(),
            reason: reason.into(),
        }
    }

    /// An exclusive lock on the store, held until the file is dropped:
    /// swaps in this and every other process take it.
    fn lock(&self) -> Result<File, Error> {
        let file = self.lock_file(LOCK)?;
        file.lock()
            .map_err(|e| self.err(format!("taking the lock: {e}")))?;
        Ok(file)
    }

    /// A shared lock for reading, on a lock file opened read-only (so an
    /// operator who may only read the store can still run `status`); none
    /// when there is no lock file yet.
    fn lock_shared(&self) -> Result<Option<File>, Error> {
        let file = match File::open(self.dir.join(LOCK)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err(format!("opening the lock: {e}"))),
        };
        file.lock_shared()
            .map_err(|e| self.err(format!("taking the lock: {e}")))?;
        Ok(Some(file))
    }

    /// The lock file `name` in the store's directory (both made if absent).
    fn lock_file(&self, name: &str) -> Result<File, Error> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| self.err(format!("creating the directory: {e}")))?;
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.dir.join(name))
            .map_err(|e| self.err(format!("opening {name}: {e}")))
    }

    /// Held by a running server for its whole life, so `ca rotate-root`
    /// can tell that one is running. `None` when another process holds it.
    ///
    /// # Errors
    /// [`Error::Store`] when the lock file cannot be opened.
    pub fn server_lock(&self) -> Result<Option<File>, Error> {
        let file = self.lock_file(SERVER_LOCK)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(self.err(format!("server lock: {e}"))),
        }
    }

    /// Whether a server holds [`DirStore::server_lock`] now.
    pub fn server_running(&self) -> bool {
        let Ok(file) = File::open(self.dir.join(SERVER_LOCK)) else {
            return false;
        };
        matches!(
            file.try_lock_shared(),
            Err(std::fs::TryLockError::WouldBlock)
        )
    }

    fn read_manifest(&self) -> Result<Option<Manifest>, Error> {
        let path = self.dir.join(MANIFEST);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err(format!("reading {MANIFEST}: {e}"))),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| self.err(format!("{MANIFEST} is not valid: {e}")))
    }

    fn load_sync(&self) -> Result<Option<Stored>, Error> {
        // Shared with other readers, never in the middle of a swap (whose
        // sweep may be deleting a directory the old manifest named).
        let _lock = self.lock_shared()?;
        let Some(manifest) = self.read_manifest()? else {
            return self.load_without_manifest();
        };
        let mut members = Vec::new();
        for m in manifest.members {
            let state = parse_state(&m.state)
                .ok_or_else(|| self.err(format!("{MANIFEST}: unknown state {:?}", m.state)))?;
            if !valid_id(&m.id) {
                return Err(self.err(format!("{MANIFEST}: bad authority id {:?}", m.id)));
            }
            let files = CacertsDir::new(self.member_dir(&m.id))
                .load()?
                .ok_or_else(|| {
                    self.err(format!(
                        "{MANIFEST} names authority {} but its directory is missing; refusing to start",
                        m.id
                    ))
                })?;
            members.push(StoredMember {
                id: m.id,
                state,
                since: m.since,
                files,
            });
        }
        Ok(Some(Stored {
            generation: manifest.generation,
            members,
        }))
    }

    /// No manifest: the layout before rotation, or nothing stored yet;
    /// never authorities' directories that no manifest names any more.
    fn load_without_manifest(&self) -> Result<Option<Stored>, Error> {
        let legacy = self.load_legacy()?;
        if legacy.is_none() {
            self.refuse_orphans()?;
        }
        Ok(legacy)
    }

    /// Authorities' directories with no manifest to name them: the
    /// manifest was lost (deleted, or a restore that missed it, such as
    /// `cp dir/*`, which skips dot files). Taking that store as empty would
    /// create a new root beside the old keys; it is refused instead. Only
    /// the CA's creation interrupted before its manifest (the `.creating`
    /// marker still there) leaves directories that were never in use; the
    /// swap that creates the CA then sweeps them.
    fn refuse_orphans(&self) -> Result<(), Error> {
        if self.dir.join(CREATING).exists() {
            return Ok(());
        }
        let entries = match fs::read_dir(&self.dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            other => other.map_err(|e| self.err(format!("listing the directory: {e}")))?,
        };
        let ids: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| valid_id(n))
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        Err(self.err(format!(
            "{MANIFEST} is missing but the directories of authorities {} are here: which of them \
             the CA uses is unknown; refusing to start rather than create a new root. Restore \
             {MANIFEST} from a backup, or remove {} to create a new CA (every certificate issued \
             so far will stop verifying)",
            ids.join(", "),
            self.dir.display()
        )))
    }

    /// The four files directly in the directory: one active authority.
    fn load_legacy(&self) -> Result<Option<Stored>, Error> {
        let Some(files) = CacertsDir::new(&self.dir).load()? else {
            return Ok(None);
        };
        let id = parse_pem_certs(&files.ca_cert)
            .ok()
            .and_then(|c| c.first().map(|c| authority_id(c.der())))
            .ok_or_else(|| Error::Material("ca-cert.pem holds no usable certificate".into()))?;
        let since = fs::metadata(self.dir.join(FILES[0]))
            .and_then(|m| m.modified())
            .map(unix)
            .unwrap_or(0);
        Ok(Some(Stored {
            generation: 1,
            members: vec![StoredMember {
                id,
                state: State::Active,
                since,
                files,
            }],
        }))
    }

    fn swap_sync(&self, expected: Option<u64>, next: &Stored) -> Result<bool, Error> {
        let _lock = self.lock()?;
        let manifest = self.read_manifest()?;
        let legacy = manifest.is_none() && self.load_without_manifest()?.is_some();
        let current = match &manifest {
            Some(m) => Some(m.generation),
            None if legacy => Some(1),
            None => None,
        };
        if current != expected {
            return Ok(false);
        }
        let kept: Vec<String> = manifest
            .iter()
            .flat_map(|m| m.members.iter().map(|m| m.id.clone()))
            .collect();
        let creating = self.dir.join(CREATING);
        if manifest.is_none() && !legacy {
            write_new_or_keep(&creating)
                .map_err(|e| self.err(format!("writing {}: {e}", creating.display())))?;
        }
        // 1. Every member's directory, complete, before the manifest names
        // it; the ones already stored must still hold what the set holds.
        let mut created = Vec::new();
        let written = self.write_members(next, &kept, &mut created);
        // 2. The manifest: the swap happens at this rename.
        let removed: Vec<String> = kept
            .iter()
            .filter(|id| !next.members.iter().any(|m| &m.id == *id))
            .cloned()
            .collect();
        match written.and_then(|()| self.write_manifest(next, removed)) {
            Ok(true) => {}
            // In place, but not known to be durable: nothing is deleted (a
            // power loss could still bring the old manifest back, and it
            // must find its directories; the next start tidies).
            Ok(false) => {
                let _ = fs::remove_file(&creating);
                return Ok(true);
            }
            Err(e) => {
                // The swap did not happen: the keys it wrote for it go (no
                // manifest names them), so a failed step leaves nothing.
                let mut all_removed = true;
                for dir in &created {
                    if let Err(rm) = fs::remove_dir_all(dir) {
                        all_removed = false;
                        tracing::warn!(path = %dir.display(), error = %rm, "could not remove the directory of a failed swap; the next start removes it");
                    }
                }
                // A failed creation that left nothing needs no marker; one
                // that left a directory keeps it, so the next start may
                // sweep that directory.
                if all_removed {
                    let _ = fs::remove_file(&creating);
                }
                return Err(e);
            }
        }
        crash_point("manifest-written");
        // 3. What no member names any more: gone authorities' keys, the
        // files of the layout before the manifest, leftovers of crashes.
        let ids: Vec<&str> = next.members.iter().map(|m| m.id.as_str()).collect();
        self.sweep(&ids);
        let _ = fs::remove_file(&creating);
        Ok(true)
    }

    /// Step 2 of a swap: the manifest of `next`, atomically. `Ok(false)`:
    /// it is in place but syncing the directory failed afterwards, so the
    /// swap happened (saying otherwise would have the caller report a step
    /// that was taken as refused).
    fn write_manifest(&self, next: &Stored, removed: Vec<String>) -> Result<bool, Error> {
        let manifest = Manifest {
            removed,
            ..Manifest::of(next)
        };
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| self.err(format!("encoding {MANIFEST}: {e}")))?;
        crash_point("members-written");
        let path = self.dir.join(MANIFEST);
        match atomic_write(&path, text.as_bytes(), 0o600) {
            Ok(()) => Ok(true),
            Err(e) if fs::read_to_string(&path).is_ok_and(|t| t == text) => {
                tracing::warn!(error = %e, "the new manifest is in place but syncing the directory failed");
                Ok(false)
            }
            Err(e) => Err(self.err(format!("writing {}: {e}", path.display()))),
        }
    }

    /// Step 1 of a swap: a directory for each new member of `next` (each
    /// one made pushed on `created`), and each kept member checked against
    /// what is on disk: a file corrupted or replaced under a running
    /// server is refused, not named by a new manifest that the next start
    /// could not load.
    fn write_members(
        &self,
        next: &Stored,
        kept: &[String],
        created: &mut Vec<PathBuf>,
    ) -> Result<(), Error> {
        for m in &next.members {
            if !valid_id(&m.id) {
                return Err(self.err(format!("bad authority id {:?}", m.id)));
            }
            let dir = CacertsDir::new(self.member_dir(&m.id));
            if kept.contains(&m.id) {
                self.check_kept(&dir, m)?;
                continue;
            }
            // Left over from a swap that crashed before its manifest: not
            // part of the set, so it may be replaced.
            if dir.dir().exists() {
                fs::remove_dir_all(dir.dir())
                    .map_err(|e| self.err(format!("removing a stale {}: {e}", m.id)))?;
            }
            if dir.create(&m.files)? {
                created.push(dir.dir().to_owned());
            }
        }
        Ok(())
    }

    /// That authority `m`'s files on disk are the ones in the set.
    fn check_kept(&self, dir: &CacertsDir, m: &StoredMember) -> Result<(), Error> {
        let Some(on_disk) = dir.load()? else {
            return Err(self.err(format!(
                "the directory of authority {} is missing; refusing to write a set that names it",
                m.id
            )));
        };
        let pairs = [
            (CA_CERT, &on_disk.ca_cert, &m.files.ca_cert),
            (CA_KEY, &*on_disk.ca_key, &*m.files.ca_key),
            (CERT_CHAIN, &on_disk.cert_chain, &m.files.cert_chain),
            (ROOT_CERT, &on_disk.root_cert, &m.files.root_cert),
        ];
        for (name, disk, set) in pairs {
            if disk != set {
                return Err(self.err(format!(
                    "{} differs from authority {}'s in use (corrupted or replaced on disk); \
                     refusing to write a set that names it. Restore the file (a restart would \
                     refuse to load it)",
                    dir.dir().join(name).display(),
                    m.id
                )));
            }
        }
        Ok(())
    }

    /// Deletes what a swap interrupted by a crash left behind (the keys of
    /// authorities no longer in the set, half-written directories). Run at
    /// start: without it, a retired key could stay on disk until the next
    /// change.
    ///
    /// # Errors
    /// [`Error::Store`] when the lock or the manifest cannot be read.
    pub fn tidy(&self) -> Result<(), Error> {
        if !self.dir.join(MANIFEST).exists() {
            return Ok(());
        }
        let _lock = self.lock()?;
        if let Some(m) = self.read_manifest()? {
            let ids: Vec<&str> = m.members.iter().map(|m| m.id.as_str()).collect();
            let removed: Vec<&str> = m.removed.iter().map(String::as_str).collect();
            self.sweep_at_start(&ids, &removed);
        }
        Ok(())
    }

    /// Removes every authority directory and legacy file that `ids` does
    /// not name. Failures are logged: the swap has happened already.
    ///
    fn sweep(&self, ids: &[&str]) {
        self.sweep_with(ids, &[], false);
    }

    /// As [`Self::sweep`], at start, from a manifest this process did not
    /// write (it may be an older copy restored from a backup): the
    /// authorities its swap took out (`removed`) are deleted; any other
    /// directory it does not name is renamed `.unnamed-<id>` and logged,
    /// never deleted, since it may hold the key in use.
    fn sweep_at_start(&self, ids: &[&str], removed: &[&str]) {
        self.sweep_with(ids, removed, true);
    }

    fn sweep_with(&self, ids: &[&str], removed: &[&str], at_start: bool) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let stale = if FILES.contains(&name.as_str()) {
                true
            } else if valid_id(&name) {
                !ids.contains(&name.as_str())
            } else {
                // Temporary directories of interrupted writes.
                super::store::is_temp_name(&name)
            };
            if !stale {
                continue;
            }
            if at_start && valid_id(&name) && !removed.contains(&name.as_str()) {
                let to = self.dir.join(format!(".unnamed-{name}"));
                match fs::rename(&path, &to) {
                    Ok(()) => tracing::warn!(
                        path = %to.display(),
                        "an authority's directory that {MANIFEST} does not name was moved aside, not deleted (a crash during a swap, or a manifest restored from an older backup): delete it once the CA is known to be right"
                    ),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "could not move aside an authority's directory that {MANIFEST} does not name")
                    }
                }
                continue;
            }
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            crash_point("sweeping");
            match removed {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed CA material no longer in the set")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove CA material no longer in the set")
                }
            }
        }
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
    }
}

impl KeyStore for DirStore {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    fn load(&self) -> StoreFuture<'_, Option<Stored>> {
        let this = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || this.load_sync())
                .await
                .map_err(|e| Error::Store {
                    location: String::new(),
                    reason: format!("store task: {e}"),
                })?
        })
    }

    fn generation(&self) -> StoreFuture<'_, Option<u64>> {
        let this = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let _lock = this.lock_shared()?;
                match this.read_manifest()? {
                    Some(m) => Ok(Some(m.generation)),
                    // The layout before the manifest is generation 1.
                    None => Ok(this.load_without_manifest()?.map(|s| s.generation)),
                }
            })
            .await
            .map_err(|e| Error::Store {
                location: String::new(),
                reason: format!("store task: {e}"),
            })?
        })
    }

    fn swap<'a>(&'a self, expected: Option<u64>, next: &'a Stored) -> StoreFuture<'a, bool> {
        let (this, next) = (self.clone(), next.clone());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || this.swap_sync(expected, &next))
                .await
                .map_err(|e| Error::Store {
                    location: String::new(),
                    reason: format!("store task: {e}"),
                })?
        })
    }
}

pub(crate) fn parse_state(s: &str) -> Option<State> {
    [State::Prepared, State::Active, State::Retiring]
        .into_iter()
        .find(|st| st.as_str() == s)
}

/// An authority id: 16 lower-case hex digits (so it is never a path).
pub(crate) fn valid_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
#[path = "keystore_tests.rs"]
mod tests;
