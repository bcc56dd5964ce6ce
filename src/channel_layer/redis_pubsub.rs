//! The one task that owns a Redis Pub/Sub connection, shared by the Redis
//! layer (the mesh's transport on one server) and the Django Pub/Sub layer
//! (one per shard): it subscribes and unsubscribes to match what its
//! [`Handler`] wants, hands what arrives to the handler, checks the idle
//! connection with `PING`, and reconnects with a backoff (subscribing again
//! to everything wanted, then telling the handler) when the connection
//! breaks. Also the connection timings both layers' other connections use,
//! and the command connection both open.
//!
//! Declared beside `redis` rather than in it: the `django` feature does not
//! turn on `redis`.

use std::{
    collections::HashSet,
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use futures_util::StreamExt;
use redis::{
    aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink, PubSubStream},
    Msg, RedisError,
};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

/// How long opening a connection may take (at most the command timeout);
/// a wait that includes connecting allows this on top of the timeout.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The first delay before reconnecting (or retrying) after a failure; it
/// doubles with each failure in a row, up to [`RECONNECT_MAX`].
pub(crate) const RECONNECT_MIN: Duration = Duration::from_millis(50);
/// The longest delay before reconnecting.
pub(crate) const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// How often an idle Pub/Sub connection is checked with `PING`.
const HEALTH_CHECK: Duration = Duration::from_secs(5);
/// Channels per `SUBSCRIBE` or `UNSUBSCRIBE`.
const CHUNK: usize = 256;

/// Why a Pub/Sub task could not subscribe or unsubscribe, or a Pub/Sub
/// connection could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum SubscriberError {
    #[error("cannot connect to Redis Pub/Sub")]
    Connect(#[source] Arc<RedisError>),
    #[error("connecting to Redis Pub/Sub timed out after {0:?} (is Redis reachable?)")]
    ConnectTimeout(Duration),
    #[error("Redis {0} failed")]
    Command(String, #[source] Arc<RedisError>),
    #[error("Redis {0} timed out after {1:?} (is Redis reachable?)")]
    CommandTimeout(String, Duration),
    #[error("not connected to Redis (reconnecting)")]
    Reconnecting,
}

/// `f` (a Redis command called `what`) within `timeout`.
pub(crate) async fn within<T>(
    timeout: Duration,
    what: &str,
    f: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, SubscriberError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(SubscriberError::Command(what.to_owned(), Arc::new(e))),
        Err(_) => Err(SubscriberError::CommandTimeout(what.to_owned(), timeout)),
    }
}

/// Opens a self-reconnecting command connection with `client`: each command
/// gets `timeout`, and after a connection error redis-rs connects again
/// (twice at most, [`RECONNECT_MIN`] to [`RECONNECT_MAX`] apart). `None`
/// when connecting took more than `timeout` + [`CONNECT_TIMEOUT`].
pub(crate) async fn command_connection(
    client: &redis::Client,
    timeout: Duration,
) -> Result<ConnectionManager, Option<RedisError>> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT.min(timeout)))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(2)
        .set_min_delay(RECONNECT_MIN)
        .set_max_delay(RECONNECT_MAX);
    let connect = ConnectionManager::new_with_config(client.clone(), config);
    match tokio::time::timeout(timeout + CONNECT_TIMEOUT, connect).await {
        Ok(result) => result.map_err(Some),
        Err(_) => Err(None),
    }
}

/// What a Pub/Sub task answers a [`Command`] with.
pub(crate) type Ack = oneshot::Sender<Result<(), SubscriberError>>;

/// What a Pub/Sub task is asked to do.
pub(crate) enum Command {
    /// Subscribe to or unsubscribe from `channel` so that the subscription
    /// matches [`Handler::wanted`]; answered on `ack` if given.
    Sync { channel: String, ack: Option<Ack> },
    /// The same for every channel subscribed.
    #[cfg_attr(not(feature = "django"), allow(dead_code))]
    SyncAll { ack: Ack },
}

/// What differs between the layers that run a Pub/Sub task: which channels
/// are wanted, where messages go, and what follows a reconnect.
pub(crate) trait Handler: Send + Sync + 'static {
    /// Whether a subscription asked for while the connection is down (or
    /// whose `SUBSCRIBE` broke it) is answered once the connection is back
    /// (its waiter times out on its own), rather than failing at once with
    /// [`SubscriberError::Reconnecting`] or the command's error.
    const WAIT_FOR_RECONNECT: bool;

    /// Whether `channel` should be subscribed now.
    fn wanted(&self, channel: &str) -> bool;

    /// Every channel to subscribe to on a new connection.
    fn all_wanted(&self) -> Vec<String>;

    /// Hands on a message; false when the layer is gone (the task ends).
    fn message(&self, msg: &Msg) -> impl Future<Output = bool> + Send;

    /// Called after a reconnect (everything wanted is subscribed again);
    /// false when the layer is gone (the task ends).
    fn reconnected(&self) -> impl Future<Output = bool> + Send;
}

/// A layer's handle on its Pub/Sub task: dropping every clone of
/// `commands` ends the task.
pub(crate) struct Subscriber {
    /// Where the task takes its commands.
    pub(crate) commands: mpsc::UnboundedSender<Command>,
    /// Whether the Pub/Sub connection is up (written by the task).
    connected: Arc<AtomicBool>,
}

impl Subscriber {
    /// A handle, and the task's end to [`start`](NotStarted::start) once
    /// its handler can be made.
    pub(crate) fn new() -> (Self, NotStarted) {
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let connected = Arc::new(AtomicBool::new(true));
        let task = NotStarted {
            commands: commands_rx,
            connected: connected.clone(),
        };
        (
            Self {
                commands,
                connected,
            },
            task,
        )
    }

    /// Whether the Pub/Sub connection is up (false while reconnecting).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

/// A Pub/Sub task's end of its [`Subscriber`], before it runs.
pub(crate) struct NotStarted {
    commands: mpsc::UnboundedReceiver<Command>,
    connected: Arc<AtomicBool>,
}

impl NotStarted {
    /// Opens a Pub/Sub connection with `client`, `PSUBSCRIBE`d to
    /// `patterns` (then and after each reconnect), and starts the task on
    /// it; each command gets `timeout`.
    pub(crate) async fn start<H: Handler>(
        self,
        client: &redis::Client,
        patterns: Vec<String>,
        timeout: Duration,
        handler: H,
    ) -> Result<(), SubscriberError> {
        let conn = open(client, &patterns, &[], timeout).await?;
        let task = PubSubTask {
            client: client.clone(),
            patterns,
            timeout,
            handler,
            commands: self.commands,
            conn: Some(conn),
            subscribed: HashSet::new(),
            waiting: Vec::new(),
            backoff: RECONNECT_MIN,
            next_attempt: Instant::now(),
            connected: self.connected,
        };
        tokio::spawn(task.run());
        Ok(())
    }
}

/// The Pub/Sub connection's two halves.
struct PubSub {
    sink: PubSubSink,
    stream: PubSubStream,
}

/// Opens a Pub/Sub connection, `PSUBSCRIBE`s to `patterns` and subscribes
/// to `channels`.
async fn open(
    client: &redis::Client,
    patterns: &[String],
    channels: &[String],
    timeout: Duration,
) -> Result<PubSub, SubscriberError> {
    let wait = CONNECT_TIMEOUT.min(timeout) + timeout;
    let pubsub = match tokio::time::timeout(wait, client.get_async_pubsub()).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Err(SubscriberError::Connect(Arc::new(e))),
        Err(_) => return Err(SubscriberError::ConnectTimeout(wait)),
    };
    let (mut sink, stream) = pubsub.split();
    if !patterns.is_empty() {
        within(timeout, "PSUBSCRIBE", sink.psubscribe(patterns)).await?;
    }
    for chunk in channels.chunks(CHUNK) {
        within(timeout, "SUBSCRIBE", sink.subscribe(chunk)).await?;
    }
    Ok(PubSub { sink, stream })
}

/// Owns the Pub/Sub connection until its [`Subscriber`] is dropped or the
/// handler says the layer is gone.
struct PubSubTask<H> {
    client: redis::Client,
    patterns: Vec<String>,
    timeout: Duration,
    handler: H,
    commands: mpsc::UnboundedReceiver<Command>,
    conn: Option<PubSub>,
    /// Channels subscribed on the current connection.
    subscribed: HashSet<String>,
    /// Subscriptions asked for while disconnected, answered once the
    /// connection is back (with [`Handler::WAIT_FOR_RECONNECT`]).
    waiting: Vec<Ack>,
    backoff: Duration,
    next_attempt: Instant,
    connected: Arc<AtomicBool>,
}

enum Wake {
    Command(Option<Command>),
    Message(Option<Msg>),
    Ping,
    Retry,
}

impl<H: Handler> PubSubTask<H> {
    async fn run(mut self) {
        let mut ping = tokio::time::interval_at(Instant::now() + HEALTH_CHECK, HEALTH_CHECK);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.conn.is_none() && Instant::now() >= self.next_attempt && !self.reconnect().await
            {
                return;
            }
            let wake = match self.conn.as_mut() {
                Some(conn) => tokio::select! {
                    cmd = self.commands.recv() => Wake::Command(cmd),
                    msg = conn.stream.next() => Wake::Message(msg),
                    _ = ping.tick() => Wake::Ping,
                },
                None => tokio::select! {
                    cmd = self.commands.recv() => Wake::Command(cmd),
                    () = tokio::time::sleep_until(self.next_attempt) => Wake::Retry,
                },
            };
            match wake {
                // The layer is gone.
                Wake::Command(None) => return,
                Wake::Command(Some(Command::Sync { channel, ack })) => {
                    self.sync(vec![channel], ack).await;
                }
                Wake::Command(Some(Command::SyncAll { ack })) => {
                    let all = self.subscribed.iter().cloned().collect();
                    self.sync(all, Some(ack)).await;
                }
                Wake::Message(Some(msg)) => {
                    if !self.handler.message(&msg).await {
                        return;
                    }
                }
                Wake::Message(None) => self.disconnected("the Redis Pub/Sub connection closed"),
                Wake::Ping => self.ping().await,
                Wake::Retry => {}
            }
        }
    }

    /// Returns false when the layer is gone.
    async fn reconnect(&mut self) -> bool {
        let channels = self.handler.all_wanted();
        match open(&self.client, &self.patterns, &channels, self.timeout).await {
            Ok(conn) => {
                tracing::info!("reconnected to Redis Pub/Sub and subscribed again");
                self.conn = Some(conn);
                self.subscribed = channels.into_iter().collect();
                self.backoff = RECONNECT_MIN;
                self.connected.store(true, Ordering::Relaxed);
                for ack in self.waiting.drain(..) {
                    let _ = ack.send(Ok(()));
                }
                self.handler.reconnected().await
            }
            Err(e) => {
                tracing::debug!(retry_in = ?self.backoff, "Redis Pub/Sub reconnect failed: {e}");
                self.next_attempt = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
                true
            }
        }
    }

    fn disconnected(&mut self, reason: &str) {
        if self.conn.take().is_none() {
            return;
        }
        tracing::warn!("{reason}; reconnecting");
        self.subscribed.clear();
        self.backoff = RECONNECT_MIN;
        self.next_attempt = Instant::now() + RECONNECT_MIN;
        self.connected.store(false, Ordering::Relaxed);
    }

    async fn ping(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if let Err(e) = within(self.timeout, "PING", conn.sink.ping::<redis::Value>()).await {
            self.disconnected(&format!("Redis Pub/Sub health check: {e}"));
        }
    }

    /// Subscribes to the channels among `channels` that the handler wants
    /// and unsubscribes from the others, then answers `ack`.
    async fn sync(&mut self, channels: Vec<String>, ack: Option<Ack>) {
        let (mut sub, mut unsub) = (Vec::new(), Vec::new());
        for c in channels {
            match (self.handler.wanted(&c), self.subscribed.contains(&c)) {
                (true, false) => sub.push(c),
                (false, true) => unsub.push(c),
                _ => {}
            }
        }
        let subscribing = !sub.is_empty();
        let result = match self.apply(sub, unsub).await {
            // Without a connection nothing is subscribed: unsubscribing is done.
            Err(_) if H::WAIT_FOR_RECONNECT && !subscribing => Ok(()),
            Err(_) if H::WAIT_FOR_RECONNECT => {
                // Answered once reconnected (which subscribes to every
                // wanted channel), tried soon rather than after the full
                // backoff.
                if let Some(ack) = ack {
                    self.waiting.retain(|a| !a.is_closed());
                    self.waiting.push(ack);
                }
                self.next_attempt = self.next_attempt.min(Instant::now() + RECONNECT_MIN);
                return;
            }
            result => result,
        };
        if let Some(ack) = ack {
            let _ = ack.send(result);
        }
    }

    /// Unsubscribes from `unsub`, then subscribes to `sub`; a failure
    /// drops the connection (reconnecting subscribes to what is wanted).
    async fn apply(&mut self, sub: Vec<String>, unsub: Vec<String>) -> Result<(), SubscriberError> {
        if sub.is_empty() && unsub.is_empty() {
            return Ok(());
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(SubscriberError::Reconnecting);
        };
        let mut result = Ok(());
        for chunk in unsub.chunks(CHUNK) {
            result = within(self.timeout, "UNSUBSCRIBE", conn.sink.unsubscribe(chunk)).await;
            if result.is_err() {
                break;
            }
            for c in chunk {
                self.subscribed.remove(c);
            }
        }
        if result.is_ok() {
            for chunk in sub.chunks(CHUNK) {
                result = within(self.timeout, "SUBSCRIBE", conn.sink.subscribe(chunk)).await;
                if result.is_err() {
                    break;
                }
                self.subscribed.extend(chunk.iter().cloned());
            }
        }
        if let Err(e) = &result {
            self.disconnected(&e.to_string());
        }
        result
    }
}
