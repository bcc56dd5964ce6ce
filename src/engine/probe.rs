//! How far a connection's application got, for tests: the
//! [`Communicator`](crate::testing::Communicator) puts a [`Probe`] in the
//! request's extensions and waits on it, instead of sleeping, until the
//! consumer has handled every message it was sent or its task has ended.
//!
//! A connection without one (every connection outside tests) pays one
//! `Option` check per message handed to the application.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// Shared between a test and the connection it drives. Found by the engine in
/// the request's extensions (crate-private, so no application can insert one).
#[derive(Debug, Clone, Default)]
pub(crate) struct Probe(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    state: Mutex<Progress>,
    changed: Notify,
}

/// What the probe has seen.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Data messages handed to the application.
    pub(crate) taken: u64,
    /// The application asked for the next message and none was there: it is
    /// done with the ones it took.
    pub(crate) waiting: bool,
    /// A connection's task was made for this probe.
    pub(crate) started: bool,
    /// The connection's task ended (`disconnect` ran).
    pub(crate) finished: bool,
}

impl Probe {
    fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.lock());
        self.0.changed.notify_waiters();
    }

    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A data message was handed to the application.
    pub(crate) fn taken(&self) {
        self.update(|p| {
            p.taken += 1;
            p.waiting = false;
        });
    }

    /// The application waits for a message and the queue is empty.
    pub(crate) fn waiting(&self) {
        if !self.lock().waiting {
            self.update(|p| p.waiting = true);
        }
    }

    /// The connection's task ended.
    pub(crate) fn finished(&self) {
        self.update(|p| p.finished = true);
    }

    /// The progress now.
    #[cfg(feature = "testing")]
    pub(crate) fn progress(&self) -> Progress {
        *self.lock()
    }

    /// Waits until `done` holds for the progress; returns it.
    #[cfg(feature = "testing")]
    pub(crate) async fn wait_for(&self, done: impl Fn(Progress) -> bool) -> Progress {
        loop {
            let changed = self.0.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so no update is missed.
            changed.as_mut().enable();
            let now = self.progress();
            if done(now) {
                return now;
            }
            changed.await;
        }
    }
}

/// Sets [`Progress::started`], then [`Progress::finished`] when dropped:
/// held by the connection's task.
#[derive(Debug)]
pub(crate) struct FinishOnDrop(Option<Probe>);

impl FinishOnDrop {
    pub(crate) fn new(probe: Option<Probe>) -> Self {
        if let Some(p) = &probe {
            p.update(|p| p.started = true);
        }
        Self(probe)
    }
}

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            p.finished();
        }
    }
}
