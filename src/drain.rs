//! Every task a component starts, stopped together (the pattern of
//! istio/ztunnel's `drain`): one shutdown signal, one deadline for all of
//! them, then whatever is still running is aborted, so a stop always ends,
//! and ends within the deadline.

use std::future::Future;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The tasks of one component and the signal that asks them to stop.
pub struct Tasks {
    signal: watch::Sender<bool>,
    /// The signals of task sets merged into this one.
    merged: Vec<watch::Sender<bool>>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl Default for Tasks {
    fn default() -> Self {
        Self::new()
    }
}

impl Tasks {
    /// No tasks yet; the shutdown signal not sent.
    pub fn new() -> Self {
        Self {
            signal: watch::channel(false).0,
            merged: Vec::new(),
            tasks: Vec::new(),
        }
    }

    /// What a task watches to know it should stop (it changes to `true`
    /// once; a task should also stop if the sender is gone).
    pub fn signal(&self) -> watch::Receiver<bool> {
        self.signal.subscribe()
    }

    /// Starts `fut` as one of these tasks.
    pub fn spawn(&mut self, name: &'static str, fut: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push((name, tokio::spawn(fut)));
    }

    /// Adopts a task started elsewhere.
    pub fn adopt(&mut self, name: &'static str, task: JoinHandle<()>) {
        self.tasks.push((name, task));
    }

    /// Takes over `other`'s tasks: they are signalled and joined with these,
    /// under the same deadline.
    pub fn merge(&mut self, other: Tasks) {
        self.merged.push(other.signal);
        self.merged.extend(other.merged);
        self.tasks.extend(other.tasks);
    }

    /// Signals every task to stop without waiting (readiness can flip first).
    pub fn signal_stop(&self) {
        self.signal.send_replace(true);
        for s in &self.merged {
            s.send_replace(true);
        }
    }

    /// Signals stop, waits for every task until `deadline`, then aborts the
    /// ones still running and waits for them to go. Returns the names of
    /// the tasks that had to be aborted, and of those that panicked.
    pub async fn shutdown(self, deadline: Instant) -> Stopped {
        self.signal_stop();
        let mut stopped = Stopped::default();
        for (name, mut task) in self.tasks {
            let done = tokio::select! {
                // A task that has already ended is not "forced", even past
                // the deadline.
                biased;
                r = &mut task => Some(r),
                () = tokio::time::sleep_until(deadline) => None,
            };
            let result = match done {
                Some(r) => r,
                None => {
                    task.abort();
                    stopped.forced.push(name);
                    task.await
                }
            };
            if result.as_ref().is_err_and(tokio::task::JoinError::is_panic) {
                stopped.panicked.push(name);
            }
        }
        if !stopped.forced.is_empty() {
            tracing::warn!(tasks = ?stopped.forced, "shutdown deadline reached; stopped these tasks by force");
        }
        if !stopped.panicked.is_empty() {
            tracing::error!(tasks = ?stopped.panicked, "these tasks had panicked");
        }
        stopped
    }
}

/// How a [`Tasks::shutdown`] went.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stopped {
    /// Tasks still running at the deadline, aborted.
    pub forced: Vec<&'static str>,
    /// Tasks that had ended in a panic.
    pub panicked: Vec<&'static str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn tasks_that_stop_are_joined_and_the_rest_forced_at_the_deadline() {
        let mut tasks = Tasks::new();
        let mut polite = tasks.signal();
        tasks.spawn("polite", async move {
            let _ = polite.wait_for(|s| *s).await;
        });
        let mut slow = tasks.signal();
        tasks.spawn("slow to stop", async move {
            let _ = slow.wait_for(|s| *s).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        tasks.spawn("deaf", std::future::pending());
        tasks.spawn("panics", async { panic!("a bug") });

        let started = Instant::now();
        let stopped = tasks.shutdown(started + Duration::from_secs(5)).await;
        assert_eq!(stopped.forced, ["deaf"]);
        assert_eq!(stopped.panicked, ["panics"]);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(5),
            "one deadline for all"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_nothing_in_flight_shutdown_is_immediate() {
        let mut tasks = Tasks::new();
        let mut rx = tasks.signal();
        tasks.spawn("idle", async move {
            let _ = rx.wait_for(|s| *s).await;
        });
        let started = Instant::now();
        let stopped = tasks.shutdown(started + Duration::from_secs(60)).await;
        assert_eq!(stopped, Stopped::default());
        assert!(started.elapsed() < Duration::from_millis(1));
    }
}
