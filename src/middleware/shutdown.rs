use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{sync::Notify, task::AbortHandle};

/// Tracks a layer's connection tasks and drives graceful shutdown.
#[derive(Debug, Default)]
struct Tasks {
    running: HashMap<u64, AbortHandle>,
    /// Tasks that finished before they were registered (a fast rejection
    /// on another worker thread).
    finished_early: Vec<u64>,
}

#[derive(Debug, Default)]
pub(crate) struct Tracker {
    pub(crate) shutting_down: AtomicBool,
    /// Woken once when shutdown starts; every connection listens.
    pub(crate) signal: Arc<Notify>,
    tasks: Mutex<Tasks>,
    next_id: AtomicU64,
    all_done: Notify,
}

impl Tracker {
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Number of connection tasks (handshakes in progress and open connections).
    pub(crate) fn len(&self) -> usize {
        self.tasks().running.len()
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, Tasks> {
        // Map inserts and removals only; poisoning cannot break an invariant.
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn register(&self, id: u64, handle: AbortHandle) {
        let mut tasks = self.tasks();
        if let Some(i) = tasks.finished_early.iter().position(|&f| f == id) {
            tasks.finished_early.swap_remove(i);
            return;
        }
        tasks.running.insert(id, handle);
    }

    pub(crate) fn finished(&self, id: u64) {
        let mut tasks = self.tasks();
        if tasks.running.remove(&id).is_none() {
            tasks.finished_early.push(id);
            return;
        }
        if tasks.running.is_empty() {
            drop(tasks);
            self.all_done.notify_waiters();
        }
    }
}

/// What a [`ShutdownHandle::shutdown`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Connections that closed cleanly (close 1001 sent, `disconnect` ran).
    pub closed: usize,
    /// Connections still open at the deadline, which were dropped.
    pub aborted: usize,
}

/// Shuts a [`WebSocketLayer`](crate::WebSocketLayer)'s WebSockets down
/// gracefully; get one from
/// [`WebSocketLayer::shutdown_handle`](crate::WebSocketLayer::shutdown_handle).
///
/// [`shutdown`](Self::shutdown):
/// 1. new handshakes get `503 Service Unavailable` (with `Retry-After`);
/// 2. every open connection is sent close **1001** (going away);
/// 3. every consumer's `disconnect` runs and its groups are left;
/// 4. the future resolves when all connections are done, or at the deadline,
///    when the remaining ones are dropped.
///
/// axum's graceful shutdown does not cover upgraded connections (they live
/// outside the HTTP connection), so run both:
///
/// ```no_run
/// # async fn doc(listener: tokio::net::TcpListener, app: axum::Router, channels: tower_channels::WebSocketLayer) {
/// use std::time::Duration;
///
/// let handle = channels.shutdown_handle();
/// axum::serve(listener, app)
///     .with_graceful_shutdown(async move {
///         tokio::signal::ctrl_c().await.ok();
///         handle.shutdown(Duration::from_secs(10)).await;
///     })
///     .await
///     .unwrap();
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    pub(crate) tracker: Arc<Tracker>,
}

impl ShutdownHandle {
    /// Whether shutdown has started.
    pub fn is_shutting_down(&self) -> bool {
        self.tracker.is_shutting_down()
    }

    /// Connection tasks still running (handshakes and open connections).
    pub fn connections(&self) -> usize {
        self.tracker.len()
    }

    /// Starts shutdown and waits until every connection is done or `deadline`
    /// passes. Calling it again waits again.
    pub async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        let t = &self.tracker;
        let before = t.len();
        t.shutting_down.store(true, Ordering::Release);
        t.signal.notify_waiters();
        let wait = async {
            loop {
                let done = t.all_done.notified();
                tokio::pin!(done);
                done.as_mut().enable();
                if t.len() == 0 {
                    return;
                }
                done.await;
            }
        };
        if tokio::time::timeout(deadline, wait).await.is_ok() {
            return ShutdownReport {
                closed: before,
                aborted: 0,
            };
        }
        let handles: Vec<AbortHandle> = t.tasks().running.drain().map(|(_, h)| h).collect();
        for h in &handles {
            h.abort();
        }
        tracing::warn!(
            aborted = handles.len(),
            "shutdown deadline passed; dropping connections"
        );
        ShutdownReport {
            closed: before.saturating_sub(handles.len()),
            aborted: handles.len(),
        }
    }
}
