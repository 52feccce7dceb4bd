//! Locks that fail loudly.
//!
//! A [`Mutex`] is poisoned when a thread panics while holding it. This crate
//! does not panic by design (no `unwrap`/`expect`, every failure an error
//! value), so a poisoned lock means a bug. [`LockExt::locked`] never hides
//! one: the first use of a lock after a panic logs an error naming where it
//! was taken, counts it ([`poisoned_locks`], exported as
//! `workload_ca_poisoned_locks_total`), and clears the poison. The data is
//! then used as the panicking thread left it: the critical sections that
//! use these keep their data whole at each step (map inserts, counters,
//! swaps). Nothing is replaced by a default value, and no caller skips its
//! work. Tables whose several indexes are updated in steps (the cluster
//! caches of `k8s::cache`) handle a poisoning themselves: refused from
//! (fail closed) and emptied, never read torn.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

static POISONED: AtomicU64 = AtomicU64::new(0);

/// How many poisoned locks this process has found (each panic while a lock
/// was held counts once, when the lock is next taken).
#[must_use]
pub fn poisoned_locks() -> u64 {
    POISONED.load(Ordering::Relaxed)
}

/// Counts a poisoning found where it cannot be logged (the log writer's
/// own locks).
pub fn count_poisoned() {
    POISONED.fetch_add(1, Ordering::Relaxed);
}

/// Taking a [`Mutex`] without `unwrap` and without hiding a poisoning.
pub trait LockExt<T> {
    /// The lock's guard; a poisoning is logged, counted and cleared.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> LockExt<T> for Mutex<T> {
    #[track_caller]
    fn locked(&self) -> MutexGuard<'_, T> {
        match self.lock() {
            Ok(guard) => guard,
            Err(poisoned) => {
                poisoned_here();
                self.clear_poison();
                poisoned.into_inner()
            }
        }
    }
}

/// Taking an [`RwLock`] without `unwrap` and without hiding a poisoning.
pub trait RwLockExt<T> {
    /// The read guard; a poisoning is logged, counted and cleared.
    fn read_locked(&self) -> RwLockReadGuard<'_, T>;
    /// The write guard; a poisoning is logged, counted and cleared.
    fn write_locked(&self) -> RwLockWriteGuard<'_, T>;
}

#[track_caller]
fn poisoned_here() {
    POISONED.fetch_add(1, Ordering::Relaxed);
    let at = std::panic::Location::caller();
    tracing::error!(
        lock = %at,
        "a thread panicked while holding this lock (a bug): going on with its data as left"
    );
}

impl<T> RwLockExt<T> for RwLock<T> {
    #[track_caller]
    fn read_locked(&self) -> RwLockReadGuard<'_, T> {
        match self.read() {
            Ok(guard) => guard,
            Err(poisoned) => {
                poisoned_here();
                self.clear_poison();
                poisoned.into_inner()
            }
        }
    }

    #[track_caller]
    fn write_locked(&self) -> RwLockWriteGuard<'_, T> {
        match self.write() {
            Ok(guard) => guard,
            Err(poisoned) => {
                poisoned_here();
                self.clear_poison();
                poisoned.into_inner()
            }
        }
    }
}

/// Registers `workload_ca_poisoned_locks_total` in `registry`.
///
/// # Errors
/// A registration error (the name used twice in one registry).
pub fn register(registry: &prometheus::Registry) -> Result<(), prometheus::Error> {
    let counter = prometheus::core::GenericCounter::<prometheus::core::AtomicU64>::with_opts(
        prometheus::Opts::new(
            "workload_ca_poisoned_locks_total",
            "Locks found poisoned by a panic (a bug; each is also logged as an error).",
        ),
    )?;
    registry.register(Box::new(PoisonedLocks(counter)))
}

/// Reads [`poisoned_locks`] at each scrape.
#[derive(Clone)]
struct PoisonedLocks(prometheus::core::GenericCounter<prometheus::core::AtomicU64>);

impl prometheus::core::Collector for PoisonedLocks {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let now = poisoned_locks();
        let seen = self.0.get();
        if now > seen {
            self.0.inc_by(now - seen);
        }
        self.0.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_counted_once_cleared_and_keeps_its_data() {
        let m = std::sync::Arc::new(Mutex::new(vec![1]));
        let held = m.clone();
        let _ = std::thread::spawn(move || {
            let mut v = held.lock().unwrap();
            v.push(2);
            panic!("while holding the lock");
        })
        .join();
        assert!(m.is_poisoned());
        let before = poisoned_locks();
        assert_eq!(*m.locked(), [1, 2], "the data as the thread left it");
        assert!(!m.is_poisoned(), "cleared");
        assert_eq!(*m.locked(), [1, 2]);

        let rw = std::sync::Arc::new(RwLock::new(1));
        let held = rw.clone();
        let _ = std::thread::spawn(move || {
            let mut guard = held.write().unwrap();
            *guard = 2;
            panic!("while holding the lock");
        })
        .join();
        assert!(rw.is_poisoned());
        assert_eq!(*rw.read_locked(), 2);
        assert!(!rw.is_poisoned(), "cleared");
        *rw.write_locked() = 3;
        assert_eq!(*rw.read_locked(), 3);
        // Other tests may poison locks concurrently: at least ours counted.
        assert!(poisoned_locks() > before);

        let registry = prometheus::Registry::new();
        register(&registry).unwrap();
        let families = registry.gather();
        let value = families[0].get_metric()[0].get_counter().get_value();
        assert_eq!(families[0].name(), "workload_ca_poisoned_locks_total");
        assert!(value >= 1.0, "{value}");
    }
}
