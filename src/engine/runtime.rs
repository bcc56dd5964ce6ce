//! What every connection of a layer shares: the channel layer, the settings,
//! the counters and the shutdown tracker.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
};

use tokio::{sync::Notify, task::AbortHandle};

use super::{http::Sessions, Link};
use crate::{
    channel_layer::{ChannelLayer, InMemoryChannelLayer},
    metrics::Metrics,
    origin::AllowedOrigins,
    WebSocketConfig,
};

/// What every connection of a layer shares.
#[derive(Debug)]
pub(crate) struct Runtime {
    pub(crate) channel_layer: Arc<dyn ChannelLayer>,
    pub(crate) config: WebSocketConfig,
    pub(crate) origins: AllowedOrigins,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) tracker: Arc<Tracker>,
    /// The HTTP fallback's sessions in this process, when it is on.
    pub(crate) http: Option<Arc<Sessions>>,
}

impl Runtime {
    /// A runtime on `channel_layer` with default settings.
    pub(crate) fn new(channel_layer: Arc<dyn ChannelLayer>) -> Self {
        Self {
            channel_layer,
            config: WebSocketConfig::default(),
            origins: AllowedOrigins::default(),
            metrics: Arc::default(),
            tracker: Arc::default(),
            http: None,
        }
    }

    /// The same runtime with fresh counters (the layer's builder methods).
    pub(crate) fn rebuilt(&self, f: impl FnOnce(&mut Runtime)) -> Self {
        let mut r = Self {
            channel_layer: self.channel_layer.clone(),
            config: self.config.clone(),
            origins: self.origins.clone(),
            metrics: Arc::default(),
            tracker: self.tracker.clone(),
            http: self.http.clone(),
        };
        f(&mut r);
        r
    }
}

impl Default for Runtime {
    fn default() -> Self {
        Self::new(Arc::new(InMemoryChannelLayer::new()))
    }
}

/// Tracks a layer's connection tasks and drives graceful shutdown.
#[derive(Debug, Default)]
struct Tasks {
    running: HashMap<u64, AbortHandle>,
    /// The links of the connections past their handshake, which
    /// [`Tracker::start_shutdown`] closes. A connection does not wait on a
    /// shared signal of its own: that would cost every idle connection a
    /// waiter and every poll of its engine a lock of the signal's list.
    links: HashMap<u64, Weak<Link>>,
    /// Tasks that finished before they were registered (a fast rejection
    /// on another worker thread).
    finished_early: Vec<u64>,
}

#[derive(Debug, Default)]
pub(crate) struct Tracker {
    pub(crate) shutting_down: AtomicBool,
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

    /// Connection task `id` opened its engine on `link`: shutdown closes it
    /// from now on. Returns false when shutdown already started (the engine
    /// closes at once).
    pub(crate) fn attach(&self, id: u64, link: &Arc<Link>) -> bool {
        let mut tasks = self.tasks();
        // Read under the lock `start_shutdown` takes after setting the flag:
        // either this sees the flag or `start_shutdown` sees the link.
        if self.is_shutting_down() {
            return false;
        }
        tasks.links.insert(id, Arc::downgrade(link));
        true
    }

    pub(crate) fn finished(&self, id: u64) {
        let mut tasks = self.tasks();
        tasks.links.remove(&id);
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

impl Tracker {
    /// Starts shutdown: new handshakes are refused, every connection closes with 1001.
    pub(crate) fn start_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        let links: Vec<Arc<Link>> = self
            .tasks()
            .links
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for link in links {
            link.shut_down();
        }
    }

    /// Waits until no connection task is left.
    pub(crate) async fn all_finished(&self) {
        loop {
            let done = self.all_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.len() == 0 {
                return;
            }
            done.await;
        }
    }

    /// Aborts every task still running; returns how many.
    pub(crate) fn abort_all(&self) -> usize {
        let handles: Vec<AbortHandle> = self.tasks().running.drain().map(|(_, h)| h).collect();
        for h in &handles {
            h.abort();
        }
        handles.len()
    }
}
