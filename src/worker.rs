//! Background workers: code that consumes named channels (Django's `runworker`).
//!
//! Anything holding the channel layer can hand work to a worker by sending
//! to a well-known channel name; the worker's handler for the event's type
//! runs, with a configurable number of events in flight. An error or panic in
//! one event is logged and counted; the worker goes on. Shutdown stops taking
//! new events and waits for the running ones.
//!
//! ```
//! use std::sync::Arc;
//! use tower_channels::channel_layer::{ChannelLayer, Event, InMemoryChannelLayer};
//! use tower_channels::worker::{Worker, WorkerContext};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let layer: Arc<dyn ChannelLayer> = Arc::new(InMemoryChannelLayer::new());
//! let mut replies = layer.new_channel().await.unwrap();
//!
//! let worker = Worker::new(layer.clone())
//!     .channel("thumbnails")
//!     .concurrency(4)
//!     .on("thumbnail.make", |ctx: WorkerContext, event: Event| async move {
//!         let (name, reply_to): (String, String) = event.body()?;
//!         ctx.send(&reply_to, Event::text("thumbnail.done", format!("{name}.png"))).await?;
//!         Ok(())
//!     })
//!     .start()
//!     .await
//!     .unwrap();
//!
//! let body = ("cat".to_owned(), replies.name().to_owned());
//! layer.send("thumbnails", Event::new("thumbnail.make", body)).await.unwrap();
//! let done = replies.recv().await.unwrap();
//! assert_eq!(done.as_message().and_then(|m| m.as_text()), Some("cat.png"));
//! worker.shutdown().await;
//! # });
//! ```

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    panic::AssertUnwindSafe,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use futures_util::{stream::SelectAll, FutureExt, StreamExt};
use tokio::{
    sync::{oneshot, Semaphore},
    task::JoinSet,
};

use crate::channel_layer::{
    BoxError, BoxFuture, ChannelLayer, ChannelLayerError, ChannelReceiver, Event, GroupSendReport,
    RecvError,
};

type Tagged = futures_util::stream::BoxStream<'static, (Arc<str>, Result<Event, RecvError>)>;
type Handler =
    Arc<dyn Fn(WorkerContext, Event) -> BoxFuture<'static, Result<(), BoxError>> + Send + Sync>;

/// What a worker handler gets besides the event: the layer, to reply.
#[derive(Clone)]
pub struct WorkerContext {
    layer: Arc<dyn ChannelLayer>,
    channel: Arc<str>,
}

impl WorkerContext {
    /// The channel the event arrived on.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The channel layer.
    pub fn channel_layer(&self) -> &Arc<dyn ChannelLayer> {
        &self.layer
    }

    /// Sends `event` to `channel` (e.g. the consumer that asked for the work).
    pub async fn send(&self, channel: &str, event: Event) -> Result<(), ChannelLayerError> {
        self.layer.send(channel, event).await
    }

    /// Sends `event` to every member of `group`.
    pub async fn group_send(
        &self,
        group: &str,
        event: Event,
    ) -> Result<GroupSendReport, ChannelLayerError> {
        self.layer.group_send(group, event).await
    }
}

impl fmt::Debug for WorkerContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerContext")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

/// Builds a worker; see the [module docs](self).
pub struct Worker {
    layer: Arc<dyn ChannelLayer>,
    channels: Vec<String>,
    concurrency: usize,
    handlers: HashMap<String, Handler>,
}

impl Worker {
    /// A worker on `layer`, with no channels yet and one event at a time.
    pub fn new(layer: Arc<dyn ChannelLayer>) -> Self {
        Self {
            layer,
            channels: Vec::new(),
            concurrency: 1,
            handlers: HashMap::new(),
        }
    }

    /// Consumes the named channel `name` (call again for more channels).
    pub fn channel(mut self, name: impl Into<String>) -> Self {
        self.channels.push(name.into());
        self
    }

    /// How many events may be handled at once (at least 1; default 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Runs `handler` for events of type `kind` (e.g. `"thumbnail.make"`).
    /// Events of a type without a handler are logged and counted as unhandled,
    /// as Django raises for a type without a handler.
    pub fn on<F, Fut>(mut self, kind: impl Into<String>, handler: F) -> Self
    where
        F: Fn(WorkerContext, Event) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |ctx, event| Box::pin(handler(ctx, event)));
        self.handlers.insert(kind.into(), handler);
        self
    }

    /// Subscribes to the channels and starts handling events on the current
    /// tokio runtime. Fails if a channel cannot be received (e.g. an invalid
    /// name, or another receiver of the same name in this process).
    pub async fn start(self) -> Result<WorkerHandle, ChannelLayerError> {
        let mut receivers = SelectAll::new();
        for name in &self.channels {
            let rx = self.layer.receive(name).await?;
            let channel: Arc<str> = Arc::from(name.as_str());
            receivers.push(tagged(rx, channel));
        }
        let stats = Arc::new(Counters::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(
            receivers,
            self.layer,
            Arc::new(self.handlers),
            self.concurrency,
            stats.clone(),
            stop_rx,
        ));
        Ok(WorkerHandle {
            stop: Some(stop_tx),
            task: Some(task),
            stats,
        })
    }
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("channels", &self.channels)
            .field("concurrency", &self.concurrency)
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn tagged(rx: ChannelReceiver, channel: Arc<str>) -> Tagged {
    rx.map(move |r| (channel.clone(), r)).boxed()
}

#[derive(Debug, Default)]
struct Counters {
    handled: AtomicU64,
    failed: AtomicU64,
    unhandled: AtomicU64,
    dropped: AtomicU64,
}

/// Counters of a running worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Events whose handler returned `Ok`.
    pub handled: u64,
    /// Events whose handler returned an error or panicked.
    pub failed: u64,
    /// Events of a type with no handler.
    pub unhandled: u64,
    /// Events the channel dropped because the worker fell behind.
    pub dropped: u64,
}

/// A running worker. Dropping it stops taking events without waiting;
/// [`shutdown`](Self::shutdown) waits for the events in flight.
#[derive(Debug)]
pub struct WorkerHandle {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    stats: Arc<Counters>,
}

impl WorkerHandle {
    /// Counters so far.
    pub fn stats(&self) -> WorkerStats {
        WorkerStats {
            handled: self.stats.handled.load(Ordering::Relaxed),
            failed: self.stats.failed.load(Ordering::Relaxed),
            unhandled: self.stats.unhandled.load(Ordering::Relaxed),
            dropped: self.stats.dropped.load(Ordering::Relaxed),
        }
    }

    /// Stops taking new events (its channels stop being received) and waits
    /// until every event in flight has been handled.
    pub async fn shutdown(mut self) -> WorkerStats {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.stats()
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn run(
    mut receivers: SelectAll<Tagged>,
    layer: Arc<dyn ChannelLayer>,
    handlers: Arc<HashMap<String, Handler>>,
    concurrency: usize,
    stats: Arc<Counters>,
    mut stop: oneshot::Receiver<()>,
) {
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut in_flight = JoinSet::new();
    loop {
        // Wait for capacity first, so a slow worker leaves events queued in
        // the channel (where the layer's capacity applies) instead of here.
        let permit = tokio::select! {
            _ = &mut stop => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let next = tokio::select! {
            _ = &mut stop => break,
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                drop(permit);
                if let Err(e) = done {
                    tracing::error!(error = %e, "worker task failed");
                }
                continue;
            }
            next = receivers.next() => next,
        };
        let Some((channel, received)) = next else {
            break;
        };
        let event = match received {
            Ok(e) => e,
            Err(RecvError::Lagged(n)) => {
                stats.dropped.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(channel = %channel, dropped = n, "worker fell behind: events dropped");
                continue;
            }
            Err(_) => continue,
        };
        let Some(handler) = handlers.get(event.kind()).cloned() else {
            stats.unhandled.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(channel = %channel, kind = event.kind(), "no worker handler for event type");
            continue;
        };
        let ctx = WorkerContext {
            layer: layer.clone(),
            channel: channel.clone(),
        };
        let stats = stats.clone();
        in_flight.spawn(async move {
            let kind = event.kind().to_owned();
            match AssertUnwindSafe(handler(ctx, event)).catch_unwind().await {
                Ok(Ok(())) => {
                    stats.handled.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(e)) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(channel = %channel, kind, error = &*e as &(dyn std::error::Error + 'static), "worker handler failed");
                }
                Err(_) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(channel = %channel, kind, "worker handler panicked");
                }
            }
            drop(permit);
        });
    }
    // Stop receiving, then drain what is in flight.
    drop(receivers);
    while let Some(done) = in_flight.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, "worker task failed");
        }
    }
}
