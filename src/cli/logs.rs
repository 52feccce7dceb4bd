//! The log writer: lines gathered in memory and written to stderr in one
//! `write` every [`FLUSH_INTERVAL`] (or as soon as [`FLUSH_BYTES`] are
//! waiting), instead of one `write` per line. The CA logs a line per
//! certificate issued; at thousands per second, a system call each was a
//! measurable share of the server's time.
//!
//! Nothing is lost or reordered: warnings and errors are written at once,
//! after everything gathered before them; the buffer never holds more than
//! [`FLUSH_BYTES`] (the line that would cross it writes it out itself); and
//! [`LogGuard`], held until the process returns from `main`, writes what is
//! left when it is dropped (a normal exit, an error, a panic unwinding out of
//! `run`). Only a process killed outright (SIGKILL) can lose the last
//! [`FLUSH_INTERVAL`] of lines.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// How long a line may wait in memory.
pub(super) const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// Bytes gathered before they are written regardless of the interval.
pub(super) const FLUSH_BYTES: usize = 64 * 1024;

#[derive(Default)]
struct Shared {
    buf: Mutex<Vec<u8>>,
    /// Set (under `buf`'s lock) when the guard is dropped.
    stop: Mutex<bool>,
    wake: Condvar,
}

/// A lock of the log writer's own. Not [`crate::sync::LockExt::locked`]:
/// that logs a poisoning, and logging from here would take the writer's
/// lock again. A poisoning here is cleared and counted, silently.
fn quiet<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| {
        m.clear_poison();
        crate::sync::count_poisoned();
        poisoned.into_inner()
    })
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        quiet(&self.buf)
    }

    /// Writes out what is gathered, holding the lock so that lines stay in
    /// order. (stderr is unbuffered: each `write_all` is one `write`.)
    fn flush_locked(buf: &mut Vec<u8>) {
        if !buf.is_empty() {
            let _ = io::stderr().lock().write_all(buf);
            buf.clear();
        }
    }

    fn flush(&self) {
        Self::flush_locked(&mut self.lock());
    }
}

/// Gathers lines for stderr (see the module docs). Cloned into the
/// subscriber; [`BufferedStderr::start`] gives the guard.
#[derive(Clone)]
pub(super) struct BufferedStderr(Arc<Shared>);

/// Writes what is left and stops the flushing thread when dropped.
pub(super) struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BufferedStderr {
    /// The writer and its guard, with the thread that writes every
    /// [`FLUSH_INTERVAL`].
    ///
    /// # Errors
    /// The thread could not be started.
    pub(super) fn start() -> io::Result<(Self, LogGuard)> {
        Self::start_every(FLUSH_INTERVAL)
    }

    fn start_every(interval: Duration) -> io::Result<(Self, LogGuard)> {
        let shared = Arc::new(Shared::default());
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || {
                let mut stop = quiet(&for_thread.stop);
                while !*stop {
                    stop = for_thread
                        .wake
                        .wait_timeout(stop, interval)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                    for_thread.flush();
                }
            })?;
        Ok((
            Self(shared.clone()),
            LogGuard {
                shared,
                thread: Some(thread),
            },
        ))
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        *quiet(&self.shared.stop) = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.shared.flush();
    }
}

/// One event's writer: `urgent` ones (warnings, errors) are written at once.
pub(super) struct EventWriter<'a> {
    shared: &'a Shared,
    urgent: bool,
}

impl Write for EventWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut buf = self.shared.lock();
        if buf.len() + bytes.len() > FLUSH_BYTES {
            Shared::flush_locked(&mut buf);
        }
        buf.extend_from_slice(bytes);
        if self.urgent {
            Shared::flush_locked(&mut buf);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BufferedStderr {
    fn writer(&self, urgent: bool) -> EventWriter<'_> {
        EventWriter {
            shared: &self.0,
            urgent,
        }
    }
}

impl<'a> MakeWriter<'a> for BufferedStderr {
    type Writer = EventWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        self.writer(true)
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        self.writer(*meta.level() <= Level::WARN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(w: &BufferedStderr) -> Vec<u8> {
        w.0.lock().clone()
    }

    #[test]
    fn lines_wait_and_urgent_ones_go_at_once_after_them() {
        let (writer, guard) = BufferedStderr::start_every(Duration::from_secs(3600)).unwrap();
        writer.writer(false).write_all(b"one\n").unwrap();
        assert_eq!(held(&writer), b"one\n", "kept");
        writer.writer(true).write_all(b"two\n").unwrap();
        assert!(held(&writer).is_empty(), "written with what came before");
        // A line crossing the bound writes out what was gathered first.
        let mut w = writer.writer(false);
        w.write_all(&vec![b'x'; FLUSH_BYTES - 10]).unwrap();
        w.write_all(b"0123456789abc\n").unwrap();
        assert_eq!(held(&writer), b"0123456789abc\n");
        drop(guard);
        assert!(held(&writer).is_empty(), "the guard writes what is left");
    }

    #[test]
    fn the_thread_writes_what_waits() {
        let (writer, _guard) = BufferedStderr::start_every(Duration::from_millis(5)).unwrap();
        writer.writer(false).write_all(b"waiting\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !held(&writer).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "written by the thread"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
