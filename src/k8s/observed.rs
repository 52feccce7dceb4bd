//! What a watch saw of the objects a copy controller keeps ([`super::copies`]):
//! one small verdict per object (never its data), its identity and version,
//! applied from watch changes and from the engine's own writes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::reflect::{Change, Freshen};

/// An object: (namespace, name).
pub type Key = (Arc<str>, Arc<str>);

/// `ns/name`, for logs and messages.
pub fn shown(key: &Key) -> String {
    format!("{}/{}", key.0, key.1)
}

/// What the watch saw of one object: its identity and version, and the
/// verdict computed when the event arrived.
#[derive(Clone, Debug)]
pub struct Seen<F> {
    /// The object's `metadata.uid`.
    pub uid: String,
    /// The `metadata.resourceVersion` the verdict was computed at.
    pub resource_version: String,
    /// The verdict.
    pub facts: F,
}

/// The verdicts of one kind of object, from its watch.
#[derive(Debug)]
pub struct Observed<F> {
    map: HashMap<Key, Seen<F>>,
    synced: bool,
    /// Known only from a write's answer, not (yet) from the watch: such an
    /// entry may outlive the object (deleted before the answer came).
    unconfirmed: HashSet<Key>,
    /// Since when the watch is broken or silent (others' changes unseen).
    broken_since: Option<Instant>,
}

impl<F> Default for Observed<F> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            synced: false,
            unconfirmed: HashSet::new(),
            broken_since: None,
        }
    }
}

/// Whether resourceVersion `new` is older than `old` (both as the
/// integers every API server serves; opaque ones are never taken as older).
fn older(new: &str, old: &str) -> bool {
    matches!((new.parse::<u64>(), old.parse::<u64>()), (Ok(n), Ok(o)) if n < o)
}

impl<F> Observed<F> {
    /// Replaces every object with `rows`, from a fresh list: the watch is synced.
    pub fn reset(&mut self, rows: Vec<(Key, Seen<F>)>) {
        self.map = rows.into_iter().collect();
        self.synced = true;
        self.unconfirmed.clear();
    }

    /// What a write's answer brought (see [`Observed::upsert`]), until the
    /// watch confirms it.
    pub fn note_written(&mut self, key: Key, seen: Seen<F>) {
        if !self.map.contains_key(&key) {
            self.unconfirmed.insert(key.clone());
        }
        self.upsert_inner(key, seen);
    }

    /// Takes in what the watch brought; whether the verdicts changed (a
    /// health report changes none).
    pub(crate) fn apply(&mut self, change: Change<(Key, Seen<F>)>) -> bool {
        match change {
            Change::Reset(rows) => self.reset(rows),
            Change::Upsert((k, s)) => self.upsert(k, s),
            Change::Delete { namespace, name } => self.remove(&namespace, &name),
            Change::Fresh(f) => {
                self.freshen(&f);
                return false;
            }
        }
        true
    }

    /// What the watch says of its health.
    pub(crate) fn freshen(&mut self, f: &Freshen) {
        match f {
            Freshen::Synced(_) | Freshen::Healthy => self.broken_since = None,
            Freshen::Broken(_) | Freshen::Silent(_) => {
                self.broken_since.get_or_insert_with(Instant::now);
            }
        }
    }

    /// How long the watch has been broken, if it is.
    pub fn broken_for(&self) -> Option<Duration> {
        self.broken_since.map(|t| t.elapsed())
    }

    /// Whether the watch has shown the object (not only a write's answer).
    pub fn confirmed(&self, key: &Key) -> bool {
        !self.unconfirmed.contains(key)
    }

    /// Takes in what the watch (or a write's answer) brought, unless what
    /// is held is already newer.
    pub fn upsert(&mut self, key: Key, seen: Seen<F>) {
        self.unconfirmed.remove(&key);
        self.upsert_inner(key, seen);
    }

    fn upsert_inner(&mut self, key: Key, seen: Seen<F>) {
        match self.map.get(&key) {
            Some(old)
                if old.uid == seen.uid && older(&seen.resource_version, &old.resource_version) => {}
            _ => {
                self.map.insert(key, seen);
            }
        }
    }

    /// Forgets object `namespace/name` (deleted).
    pub fn remove(&mut self, namespace: &str, name: &str) {
        let key = (Arc::from(namespace), Arc::from(name));
        self.unconfirmed.remove(&key);
        self.map.remove(&key);
    }

    /// Every object seen.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Seen<F>)> {
        self.map.iter()
    }

    /// The object `key`, if seen.
    pub fn get(&self, key: &Key) -> Option<&Seen<F>> {
        self.map.get(key)
    }

    /// Whether a full list has been taken in since the watch started.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// How many objects are held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// How long an object watch may be down before its copies count as
/// unknown (a watch renewed after a compaction is down for a moment).
pub const WATCH_DOWN_GRACE: Duration = Duration::from_secs(10);

/// A shared [`Observed`] and the notification its changes ring.
pub type Shared<F> = Arc<Mutex<Observed<F>>>;
