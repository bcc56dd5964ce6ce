//! The one task that owns a Redis Pub/Sub connection, shared by the Redis
//! layer (the mesh's transport on one server), the Django Pub/Sub layer
//! (one per shard) and the Redis Cluster layer (one per primary): it
//! subscribes and unsubscribes to match what its [`Handler`] wants, hands
//! what arrives to the handler, checks the idle connection with `PING`, and
//! reconnects with a backoff (subscribing again to everything wanted, then
//! telling the handler) when the connection breaks. What it subscribes with
//! is its [`Kind`]: plain `SUBSCRIBE` on a RESP2 connection, or sharded
//! `SSUBSCRIBE` on a RESP3 connection to a cluster primary ([`Sharded`]),
//! which may refuse a channel for now (tried again with the backoff) or
//! say that its slot is served elsewhere (the handler moves it). Also the
//! connection timings the layers' other connections use, and the command
//! connection they open.
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

/// Channels per `SUBSCRIBE` or `UNSUBSCRIBE` (a sharded connection sends
/// one command a channel).
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
    /// A Redis Cluster node is down; the subscription is made in the
    /// background.
    #[cfg(feature = "redis-cluster")]
    #[error("{0}")]
    Unreachable(String),
    /// The answer was not the one asked for: the connection is dropped.
    #[cfg(feature = "redis-cluster")]
    #[error("unexpected answer to Redis {0}")]
    Unexpected(&'static str),
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

/// How long opening a connection may take, for a layer whose commands get
/// `timeout`: `timeout` plus [`CONNECT_TIMEOUT`] (at most `timeout`). The
/// one bound of every connect, Pub/Sub and command connections alike.
pub(crate) fn connect_bound(timeout: Duration) -> Duration {
    CONNECT_TIMEOUT.min(timeout) + timeout
}

/// Opens a self-reconnecting command connection with `client`: each command
/// gets `timeout`, and after a connection error redis-rs connects again
/// (twice at most, [`RECONNECT_MIN`] to [`RECONNECT_MAX`] apart). `None`
/// when connecting took more than [`connect_bound`]`(timeout)`.
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
    match tokio::time::timeout(connect_bound(timeout), connect).await {
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
    /// Channels moved to this connection from another (a Redis Cluster
    /// slot migrated, or a primary was replaced): each synced like
    /// [`Command::Sync`], then, if any was subscribed, the handler is told
    /// as after a reconnect (they may have missed messages meanwhile).
    #[cfg(feature = "redis-cluster")]
    Adopt(Vec<(String, Option<Ack>)>),
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

    /// Called after channels the server refused, or adopted ones, were
    /// subscribed (they may have missed messages); false when the layer is
    /// gone (the task ends). By default as after a reconnect.
    fn restored(&self) -> impl Future<Output = bool> + Send {
        self.reconnected()
    }

    /// `channel`, still wanted, is not served by this connection's server
    /// (only a sharded connection says so: the server answered `MOVED`, or
    /// ended the subscription because the channel's slot migrated): the
    /// layer routes it elsewhere and answers `ack`, the waiter of the
    /// subscription, if any.
    fn moved(&self, channel: String, ack: Option<Ack>) {
        tracing::debug!(channel, "Redis Pub/Sub channel served elsewhere");
        drop(ack);
    }
}

/// A layer's handle on its Pub/Sub task: dropping every clone of
/// `commands` ends the task.
pub(crate) struct Subscriber {
    /// Where the task takes its commands.
    pub(crate) commands: mpsc::UnboundedSender<Command>,
    /// Whether the Pub/Sub connection is up and serves every wanted
    /// channel it may (written by the task).
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

    /// Whether the Pub/Sub connection is up (false while reconnecting, and
    /// while the server refuses a wanted channel).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// The flag [`is_connected`](Self::is_connected) reads, for a layer
    /// that sums up several tasks.
    #[cfg(feature = "redis-cluster")]
    pub(crate) fn connected_flag(&self) -> Arc<AtomicBool> {
        self.connected.clone()
    }
}

/// A Pub/Sub task's end of its [`Subscriber`], before it runs.
pub(crate) struct NotStarted {
    commands: mpsc::UnboundedReceiver<Command>,
    connected: Arc<AtomicBool>,
}

impl NotStarted {
    /// Opens a plain Pub/Sub connection with `client`, `PSUBSCRIBE`d to
    /// `patterns` (then and after each reconnect), and starts the task on
    /// it; each command gets `timeout`.
    pub(crate) async fn start<H: Handler>(
        self,
        client: &redis::Client,
        patterns: Vec<String>,
        timeout: Duration,
        handler: H,
    ) -> Result<(), SubscriberError> {
        let kind = Plain {
            client: client.clone(),
            patterns,
        };
        let conn = kind.open(timeout).await?;
        self.run(kind, Some(conn), timeout, handler);
        Ok(())
    }

    /// Starts the task on a Redis Cluster primary's sharded connection,
    /// which it opens in the background (and again, with the backoff,
    /// until it can); until then the connection counts as down.
    #[cfg(feature = "redis-cluster")]
    pub(crate) fn spawn_sharded<H: Handler>(self, kind: Sharded, timeout: Duration, handler: H) {
        self.connected.store(false, Ordering::Relaxed);
        self.run(kind, None, timeout, handler);
    }

    fn run<K: Kind, H: Handler>(
        self,
        kind: K,
        conn: Option<K::Conn>,
        timeout: Duration,
        handler: H,
    ) {
        let task = PubSubTask {
            kind,
            timeout,
            handler,
            commands: self.commands,
            ever_up: conn.is_some(),
            conn,
            subscribed: HashSet::new(),
            refused: HashSet::new(),
            waiting: Vec::new(),
            backoff: RECONNECT_MIN,
            next_attempt: Instant::now(),
            connected: self.connected,
        };
        tokio::spawn(task.run());
    }
}

/// What a connection says on its own.
enum Push {
    /// A message on a subscribed channel.
    Message(Msg),
    /// The server ended the subscription to this channel (a sharded
    /// connection: the channel's slot migrated, or it confirms our own
    /// `SUNSUBSCRIBE`).
    #[cfg_attr(not(feature = "redis-cluster"), allow(dead_code))]
    Ended(String),
}

/// The channels a server would not subscribe to on a connection that is
/// otherwise fine (only sharded connections refuse single channels).
#[derive(Default)]
struct Refusals {
    /// Answered `MOVED`: the channel's slot is served elsewhere.
    moved: Vec<String>,
    /// Refused otherwise (e.g. `TRYAGAIN`): tried again later.
    refused: Vec<(String, SubscriberError)>,
}

/// What a Pub/Sub task subscribes with: the [`Connection`] it opens, how
/// often it checks it, and what it answers while there is none.
trait Kind: Send + Sync + 'static {
    /// An open connection.
    type Conn: Connection;
    /// How often the idle connection is checked with `PING`.
    const HEALTH_CHECK: Duration;

    /// What the logs call the connection.
    fn name(&self) -> &str;

    /// What a subscription gets while there is no connection.
    fn down(&self) -> SubscriberError;

    /// Opens a connection, whose commands get `timeout`.
    fn open(
        &self,
        timeout: Duration,
    ) -> impl Future<Output = Result<Self::Conn, SubscriberError>> + Send;
}

/// An open Pub/Sub connection: its subscribe and unsubscribe commands, and
/// what it hears.
trait Connection: Send {
    /// Subscribes to `channels`: an error when the connection cannot be
    /// trusted any more, else the channels the server would not take.
    fn subscribe(
        &mut self,
        channels: &[String],
    ) -> impl Future<Output = Result<Refusals, SubscriberError>> + Send;

    /// Unsubscribes from `channels`; an error when the connection cannot be
    /// trusted any more.
    fn unsubscribe(
        &mut self,
        channels: &[String],
    ) -> impl Future<Output = Result<(), SubscriberError>> + Send;

    /// Checks the connection.
    fn ping(&mut self) -> impl Future<Output = Result<(), SubscriberError>> + Send;

    /// What the connection says next; `None` once it closed.
    fn next(&mut self) -> impl Future<Output = Option<Push>> + Send;
}

/// Waits for `connect`, at most [`connect_bound`]`(timeout)`.
async fn connecting<T>(
    timeout: Duration,
    connect: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, SubscriberError> {
    let wait = connect_bound(timeout);
    match tokio::time::timeout(wait, connect).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(SubscriberError::Connect(Arc::new(e))),
        Err(_) => Err(SubscriberError::ConnectTimeout(wait)),
    }
}

/// Plain Pub/Sub (`SUBSCRIBE`) on a RESP2 connection opened with `client`,
/// `PSUBSCRIBE`d to `patterns`.
struct Plain {
    client: redis::Client,
    patterns: Vec<String>,
}

/// A plain Pub/Sub connection's two halves.
struct PubSub {
    sink: PubSubSink,
    stream: PubSubStream,
    timeout: Duration,
}

impl Kind for Plain {
    type Conn = PubSub;
    const HEALTH_CHECK: Duration = Duration::from_secs(5);

    fn name(&self) -> &str {
        "Redis Pub/Sub"
    }

    fn down(&self) -> SubscriberError {
        SubscriberError::Reconnecting
    }

    async fn open(&self, timeout: Duration) -> Result<PubSub, SubscriberError> {
        let pubsub = connecting(timeout, self.client.get_async_pubsub()).await?;
        let (mut sink, stream) = pubsub.split();
        if !self.patterns.is_empty() {
            within(timeout, "PSUBSCRIBE", sink.psubscribe(&self.patterns)).await?;
        }
        Ok(PubSub {
            sink,
            stream,
            timeout,
        })
    }
}

impl Connection for PubSub {
    async fn subscribe(&mut self, channels: &[String]) -> Result<Refusals, SubscriberError> {
        within(self.timeout, "SUBSCRIBE", self.sink.subscribe(channels)).await?;
        Ok(Refusals::default())
    }

    async fn unsubscribe(&mut self, channels: &[String]) -> Result<(), SubscriberError> {
        within(self.timeout, "UNSUBSCRIBE", self.sink.unsubscribe(channels)).await
    }

    async fn ping(&mut self) -> Result<(), SubscriberError> {
        let ping = self.sink.ping::<redis::Value>();
        within(self.timeout, "PING", ping).await.map(drop)
    }

    async fn next(&mut self) -> Option<Push> {
        self.stream.next().await.map(Push::Message)
    }
}

/// Owns the Pub/Sub connection until its [`Subscriber`] is dropped or the
/// handler says the layer is gone.
struct PubSubTask<H, K: Kind> {
    kind: K,
    timeout: Duration,
    handler: H,
    commands: mpsc::UnboundedReceiver<Command>,
    conn: Option<K::Conn>,
    /// Whether a connection was ever open: the first one is no reconnect,
    /// and news to the handler only if it subscribed to something.
    ever_up: bool,
    /// Channels subscribed on the current connection.
    subscribed: HashSet<String>,
    /// Wanted channels the server refused on the current connection, tried
    /// again at `next_attempt`.
    refused: HashSet<String>,
    /// Subscriptions asked for while disconnected, answered once the
    /// connection is back (with [`Handler::WAIT_FOR_RECONNECT`]).
    waiting: Vec<Ack>,
    backoff: Duration,
    /// When to connect again (without `conn`) or retry `refused` (with it).
    next_attempt: Instant,
    connected: Arc<AtomicBool>,
}

enum Wake {
    Command(Option<Command>),
    Push(Option<Push>),
    Ping,
    Retry,
}

impl<H: Handler, K: Kind> PubSubTask<H, K> {
    async fn run(mut self) {
        let mut ping = tokio::time::interval_at(Instant::now() + K::HEALTH_CHECK, K::HEALTH_CHECK);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.conn.is_none() && Instant::now() >= self.next_attempt && !self.reconnect().await
            {
                return;
            }
            let (next_attempt, retrying) = (self.next_attempt, !self.refused.is_empty());
            let wake = match self.conn.as_mut() {
                Some(conn) => tokio::select! {
                    cmd = self.commands.recv() => Wake::Command(cmd),
                    push = conn.next() => Wake::Push(push),
                    _ = ping.tick() => Wake::Ping,
                    () = tokio::time::sleep_until(next_attempt), if retrying => Wake::Retry,
                },
                None => tokio::select! {
                    cmd = self.commands.recv() => Wake::Command(cmd),
                    () = tokio::time::sleep_until(next_attempt) => Wake::Retry,
                },
            };
            let alive = match wake {
                // The layer is gone.
                Wake::Command(None) => false,
                Wake::Command(Some(Command::Sync { channel, ack })) => {
                    self.sync(vec![channel], ack).await;
                    true
                }
                Wake::Command(Some(Command::SyncAll { ack })) => {
                    let all = self.subscribed.iter().cloned().collect();
                    self.sync(all, Some(ack)).await;
                    true
                }
                #[cfg(feature = "redis-cluster")]
                Wake::Command(Some(Command::Adopt(channels))) => self.adopt(channels).await,
                Wake::Push(Some(Push::Message(msg))) => self.handler.message(&msg).await,
                Wake::Push(Some(Push::Ended(channel))) => {
                    self.ended(channel);
                    true
                }
                Wake::Push(None) => {
                    self.disconnected("the Redis Pub/Sub connection closed");
                    true
                }
                Wake::Ping => {
                    self.ping().await;
                    true
                }
                Wake::Retry => self.retry().await,
            };
            if !alive {
                return;
            }
        }
    }

    /// Opens a connection and subscribes to everything wanted. Returns
    /// false when the layer is gone.
    async fn reconnect(&mut self) -> bool {
        match self.connect().await {
            Ok(refusals) => {
                let again = std::mem::replace(&mut self.ever_up, true);
                if again {
                    tracing::info!(
                        connection = self.kind.name(),
                        "reconnected to Redis Pub/Sub and subscribed again"
                    );
                }
                self.backoff = RECONNECT_MIN;
                let _ = self.refusals(refusals, &mut None);
                self.set_connected();
                for ack in self.waiting.drain(..) {
                    let _ = ack.send(Ok(()));
                }
                if again {
                    self.handler.reconnected().await
                } else {
                    // A first connection: news only for what it subscribed.
                    self.subscribed.is_empty() || self.handler.restored().await
                }
            }
            Err(e) => {
                tracing::debug!(
                    connection = self.kind.name(),
                    retry_in = ?self.backoff,
                    "Redis Pub/Sub reconnect failed: {e}"
                );
                self.retry_later();
                true
            }
        }
    }

    /// Opens a connection and subscribes to every wanted channel.
    async fn connect(&mut self) -> Result<Refusals, SubscriberError> {
        let mut conn = self.kind.open(self.timeout).await?;
        let channels = self.handler.all_wanted();
        let mut refusals = Refusals::default();
        for chunk in channels.chunks(CHUNK) {
            let more = conn.subscribe(chunk).await?;
            refusals.moved.extend(more.moved);
            refusals.refused.extend(more.refused);
        }
        self.conn = Some(conn);
        self.subscribed = channels.into_iter().collect();
        for channel in &refusals.moved {
            self.subscribed.remove(channel);
        }
        for (channel, _) in &refusals.refused {
            self.subscribed.remove(channel);
        }
        Ok(refusals)
    }

    /// Hands moved channels to the handler (the first with `ack`) and
    /// notes refused ones to try again later; the first refusal, if any.
    fn refusals(
        &mut self,
        refusals: Refusals,
        ack: &mut Option<Ack>,
    ) -> Result<(), SubscriberError> {
        for channel in refusals.moved {
            self.handler.moved(channel, ack.take());
        }
        let mut first = Ok(());
        for (channel, e) in refusals.refused {
            tracing::warn!(
                channel,
                connection = self.kind.name(),
                "{e}; retrying in the background"
            );
            if first.is_ok() {
                first = Err(e);
            }
            self.refused.insert(channel);
        }
        if first.is_err() {
            self.retry_later();
        }
        first
    }

    fn retry_later(&mut self) {
        self.next_attempt = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
    }

    fn set_connected(&self) {
        let ok = self.conn.is_some() && self.refused.is_empty();
        self.connected.store(ok, Ordering::Relaxed);
    }

    fn disconnected(&mut self, reason: &str) {
        if self.conn.take().is_none() {
            return;
        }
        tracing::warn!(connection = self.kind.name(), "{reason}; reconnecting");
        self.subscribed.clear();
        self.refused.clear();
        self.backoff = RECONNECT_MIN;
        self.next_attempt = Instant::now() + RECONNECT_MIN;
        self.set_connected();
    }

    async fn ping(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if let Err(e) = conn.ping().await {
            self.disconnected(&format!("Redis Pub/Sub health check: {e}"));
        }
    }

    /// The server ended the subscription to `channel`: if it is still
    /// wanted (not our own unsubscription), its slot migrated and the
    /// handler routes it elsewhere.
    fn ended(&mut self, channel: String) {
        if self.subscribed.remove(&channel) && self.handler.wanted(&channel) {
            self.handler.moved(channel, None);
        }
    }

    /// Tries the refused channels again (with a connection; without one the
    /// loop reconnects). Returns false when the layer is gone.
    async fn retry(&mut self) -> bool {
        if self.conn.is_none() || self.refused.is_empty() {
            return true;
        }
        let channels = self.refused.drain().collect();
        let restored = self.sync(channels, None).await;
        if self.refused.is_empty() {
            self.backoff = RECONNECT_MIN;
        }
        if !restored {
            return true;
        }
        tracing::info!(
            connection = self.kind.name(),
            refused = self.refused.len(),
            "Redis Pub/Sub subscriptions restored"
        );
        self.handler.restored().await
    }

    /// Syncs each of `channels` (moved here), answering its ack, then tells
    /// the handler if any was subscribed. Returns false when the layer is
    /// gone.
    #[cfg(feature = "redis-cluster")]
    async fn adopt(&mut self, channels: Vec<(String, Option<Ack>)>) -> bool {
        let mut restored = false;
        for (channel, ack) in channels {
            restored |= self.sync(vec![channel], ack).await;
        }
        !restored || self.handler.restored().await
    }

    /// Subscribes to the channels among `channels` that the handler wants
    /// and unsubscribes from the others, then answers `ack` (which goes
    /// along to the handler with a lone channel that moved). Returns
    /// whether any channel was subscribed.
    async fn sync(&mut self, channels: Vec<String>, mut ack: Option<Ack>) -> bool {
        let lone = channels.len() == 1;
        let (mut sub, mut unsub) = (Vec::new(), Vec::new());
        for c in channels {
            self.refused.remove(&c);
            match (self.handler.wanted(&c), self.subscribed.contains(&c)) {
                (true, false) => sub.push(c),
                (false, true) => unsub.push(c),
                _ => {}
            }
        }
        let subscribing = !sub.is_empty();
        let result = match self.apply(&sub, unsub).await {
            Ok(refusals) if lone => self.refusals(refusals, &mut ack),
            Ok(refusals) => self.refusals(refusals, &mut None),
            // Without a connection nothing is subscribed: unsubscribing is done.
            Err(_) if !subscribing => Ok(()),
            Err(_) if H::WAIT_FOR_RECONNECT => {
                // Answered once reconnected (which subscribes to every
                // wanted channel), tried soon rather than after the full
                // backoff.
                if let Some(ack) = ack {
                    self.waiting.retain(|a| !a.is_closed());
                    self.waiting.push(ack);
                }
                self.next_attempt = self.next_attempt.min(Instant::now() + RECONNECT_MIN);
                return false;
            }
            result => result.map(drop),
        };
        self.set_connected();
        if let Some(ack) = ack {
            let _ = ack.send(result);
        }
        sub.iter().any(|c| self.subscribed.contains(c))
    }

    /// Unsubscribes from `unsub`, then subscribes to `sub`; a failure
    /// drops the connection (reconnecting subscribes to what is wanted).
    async fn apply(
        &mut self,
        sub: &[String],
        unsub: Vec<String>,
    ) -> Result<Refusals, SubscriberError> {
        let mut refusals = Refusals::default();
        if sub.is_empty() && unsub.is_empty() {
            return Ok(refusals);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(self.kind.down());
        };
        let mut result = Ok(());
        for chunk in unsub.chunks(CHUNK) {
            result = conn.unsubscribe(chunk).await;
            if result.is_err() {
                break;
            }
            for c in chunk {
                self.subscribed.remove(c);
            }
        }
        if result.is_ok() {
            for chunk in sub.chunks(CHUNK) {
                let more = match conn.subscribe(chunk).await {
                    Ok(more) => more,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                };
                let taken = |c: &&String| {
                    !more.moved.contains(c) && !more.refused.iter().any(|(r, _)| r == *c)
                };
                self.subscribed.extend(chunk.iter().filter(taken).cloned());
                refusals.moved.extend(more.moved);
                refusals.refused.extend(more.refused);
            }
        }
        match result {
            Ok(()) => Ok(refusals),
            Err(e) => {
                self.disconnected(&e.to_string());
                Err(e)
            }
        }
    }
}

/// Sharded Pub/Sub (`SSUBSCRIBE`, one channel a command) on a RESP3
/// connection to one Redis Cluster primary: its shard messages go to
/// `deliver` straight from redis-rs's connection task (which must never
/// wait); a channel whose slot is elsewhere is reported as moved.
#[cfg(feature = "redis-cluster")]
pub(crate) struct Sharded {
    /// `host:port`.
    pub(crate) address: String,
    /// The node's address and the settings (RESP3) to connect with.
    pub(crate) info: redis::ConnectionInfo,
    /// Takes each `smessage` push.
    pub(crate) deliver: Arc<dyn Fn(redis::PushInfo) + Send + Sync>,
}

/// A [`Sharded`] connection.
#[cfg(feature = "redis-cluster")]
struct ShardedConn {
    conn: redis::aio::MultiplexedConnection,
    /// From the connection's push handler: each subscription the server
    /// ended, and `None` when the connection dropped.
    ended: mpsc::UnboundedReceiver<Option<String>>,
    timeout: Duration,
}

#[cfg(feature = "redis-cluster")]
impl Kind for Sharded {
    type Conn = ShardedConn;
    const HEALTH_CHECK: Duration = Duration::from_secs(2);

    fn name(&self) -> &str {
        &self.address
    }

    fn down(&self) -> SubscriberError {
        SubscriberError::Unreachable(format!(
            "Redis Cluster node {} is unreachable",
            self.address
        ))
    }

    async fn open(&self, timeout: Duration) -> Result<ShardedConn, SubscriberError> {
        use redis::{PushInfo, PushKind};
        let (ended_tx, ended) = mpsc::unbounded_channel();
        let deliver = self.deliver.clone();
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT.min(timeout)))
            .set_response_timeout(Some(timeout))
            .set_push_sender(move |push: PushInfo| {
                match push.kind {
                    PushKind::SMessage => deliver(push),
                    PushKind::SUnsubscribe => {
                        if let Some(channel) = text(push.data.first()) {
                            let _ = ended_tx.send(Some(channel.to_owned()));
                        }
                    }
                    PushKind::Disconnection => {
                        let _ = ended_tx.send(None);
                    }
                    _ => {}
                }
                Ok::<(), std::convert::Infallible>(())
            });
        let conn = connecting(timeout, async {
            redis::Client::open(self.info.clone())?
                .get_multiplexed_async_connection_with_config(&config)
                .await
        })
        .await?;
        Ok(ShardedConn {
            conn,
            ended,
            timeout,
        })
    }
}

#[cfg(feature = "redis-cluster")]
impl Connection for ShardedConn {
    async fn subscribe(&mut self, channels: &[String]) -> Result<Refusals, SubscriberError> {
        let mut refusals = Refusals::default();
        for channel in channels {
            let kind = redis::PushKind::SSubscribe;
            match self.command("SSUBSCRIBE", kind, channel).await? {
                None => {}
                Some(e) if e.redirect_node().is_some() => refusals.moved.push(channel.clone()),
                Some(e) => {
                    let e = SubscriberError::Command("SSUBSCRIBE".into(), e);
                    refusals.refused.push((channel.clone(), e));
                }
            }
        }
        Ok(refusals)
    }

    async fn unsubscribe(&mut self, channels: &[String]) -> Result<(), SubscriberError> {
        for channel in channels {
            let kind = redis::PushKind::SUnsubscribe;
            // `MOVED` (the slot left this node, which ended the
            // subscription) or another refusal: nothing to undo.
            if let Some(e) = self.command("SUNSUBSCRIBE", kind, channel).await? {
                tracing::debug!(channel, "SUNSUBSCRIBE: {e}");
            }
        }
        Ok(())
    }

    async fn ping(&mut self) -> Result<(), SubscriberError> {
        let ping = redis::cmd("PING");
        match within(self.timeout, "PING", ping.query_async(&mut self.conn)).await? {
            redis::Value::SimpleString(s) if s == "PONG" => Ok(()),
            reply => {
                tracing::debug!(?reply, "unexpected answer to PING");
                Err(SubscriberError::Unexpected("PING"))
            }
        }
    }

    async fn next(&mut self) -> Option<Push> {
        self.ended.recv().await.flatten().map(Push::Ended)
    }
}

#[cfg(feature = "redis-cluster")]
impl ShardedConn {
    /// `command channel` (`SSUBSCRIBE` or `SUNSUBSCRIBE`), which a push of
    /// `kind` naming the channel confirms: the server's refusal, if it
    /// refused; an error when the connection cannot be trusted any more (it
    /// failed, or answered something else: a push the server sent on its
    /// own, such as an ended subscription, was taken for the answer).
    async fn command(
        &mut self,
        command: &'static str,
        kind: redis::PushKind,
        channel: &str,
    ) -> Result<Option<Arc<RedisError>>, SubscriberError> {
        let mut cmd = redis::cmd(command);
        cmd.arg(channel);
        match within(self.timeout, command, cmd.query_async(&mut self.conn)).await {
            Ok(reply) if confirms(&reply, &kind, channel) => Ok(None),
            Ok(reply) => {
                tracing::debug!(channel, ?reply, "unexpected answer to {command}");
                Err(SubscriberError::Unexpected(command))
            }
            Err(SubscriberError::Command(_, e)) if !broken(&e) => Ok(Some(e)),
            Err(e) => Err(e),
        }
    }
}

/// A push's or reply's text field.
#[cfg(feature = "redis-cluster")]
fn text(value: Option<&redis::Value>) -> Option<&str> {
    match value? {
        redis::Value::BulkString(b) => std::str::from_utf8(b).ok(),
        redis::Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// Whether `reply` is the confirmation of `kind` for `channel`.
#[cfg(feature = "redis-cluster")]
fn confirms(reply: &redis::Value, kind: &redis::PushKind, channel: &str) -> bool {
    match reply {
        redis::Value::Push { kind: k, data } => k == kind && text(data.first()) == Some(channel),
        _ => false,
    }
}

/// Whether an error leaves the connection unusable.
#[cfg(feature = "redis-cluster")]
fn broken(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error()
}

#[cfg(all(test, feature = "redis-cluster"))]
mod tests {
    use redis::{PushKind, Value};

    use super::confirms;

    #[test]
    fn confirmations_name_the_channel() {
        let push = |kind: PushKind, channel: &str| Value::Push {
            kind,
            data: vec![
                Value::BulkString(channel.as_bytes().to_vec()),
                Value::Int(1),
            ],
        };
        assert!(confirms(
            &push(PushKind::SSubscribe, "a"),
            &PushKind::SSubscribe,
            "a"
        ));
        assert!(!confirms(
            &push(PushKind::SSubscribe, "b"),
            &PushKind::SSubscribe,
            "a"
        ));
        assert!(!confirms(
            &push(PushKind::SUnsubscribe, "a"),
            &PushKind::SSubscribe,
            "a"
        ));
        assert!(!confirms(&Value::Okay, &PushKind::SSubscribe, "a"));
    }
}
