//! The review cache: by token digest, bounded, each entry until its own expiry.

use super::*;

/// Reviews by token digest, bounded, each until its own expiry.
pub(super) struct Cache {
    entries: HashMap<Key, Entry>,
    /// Every entry by (expiry, insertion number): expired ones first, then
    /// the soonest to expire.
    by_expiry: BTreeMap<(Instant, u64), Key>,
    max: usize,
    seq: u64,
}

pub(super) struct Entry {
    outcome: Outcome,
    expires: Instant,
    seq: u64,
}

impl Cache {
    pub(super) fn new(max: usize) -> Self {
        Self {
            entries: HashMap::new(),
            by_expiry: BTreeMap::new(),
            max,
            seq: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn get(&mut self, key: &Key, now: Instant) -> Option<Outcome> {
        let e = self.entries.get(key)?;
        if e.expires > now {
            return Some(e.outcome.clone());
        }
        self.remove(key);
        None
    }

    pub(super) fn remove(&mut self, key: &Key) {
        if let Some(e) = self.entries.remove(key) {
            self.by_expiry.remove(&(e.expires, e.seq));
        }
    }

    pub(super) fn insert(&mut self, key: Key, outcome: Outcome, expires: Instant, now: Instant) {
        self.remove(&key);
        if self.max == 0 || expires <= now {
            return;
        }
        // Expired entries first, whatever the room (each is removed once).
        while let Some((&(at, _), _)) = self.by_expiry.first_key_value() {
            if at > now {
                break;
            }
            self.pop_first();
        }
        // Then the soonest to expire, until there is room.
        while self.entries.len() >= self.max {
            if !self.pop_first() {
                break;
            }
        }
        self.seq = self.seq.wrapping_add(1);
        self.by_expiry.insert((expires, self.seq), key);
        self.entries.insert(
            key,
            Entry {
                outcome,
                expires,
                seq: self.seq,
            },
        );
    }

    pub(super) fn pop_first(&mut self) -> bool {
        match self.by_expiry.pop_first() {
            Some((_, key)) => {
                self.entries.remove(&key);
                true
            }
            None => false,
        }
    }
}
