//! The mesh's [`Transport`] on one Redis server: `PUBLISH` on the
//! multiplexed command connection, and one task that owns the Pub/Sub
//! connection: it subscribes and unsubscribes as asked, hands what arrives
//! to the mesh's inbox, and reconnects (subscribing everything again, then
//! telling the mesh) when the connection breaks.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::StreamExt;
use redis::{
    aio::{ConnectionManager, PubSubSink, PubSubStream},
    Msg,
};
use tokio::{sync::mpsc, time::Instant};

use super::{
    ask, query, queue::RedisQueues, store::RedisStore, within, Ack, RedisFailure, CONNECT_TIMEOUT,
    RECONNECT_MAX, RECONNECT_MIN,
};
use crate::channel_layer::{
    local::Counters,
    mesh::{live_subject, Inbox, Queues, Store, Transport, TransportError},
    BoxFuture,
};

/// How often an idle Pub/Sub connection is checked with `PING`.
const HEALTH_CHECK: Duration = Duration::from_secs(5);
/// Channels per `SUBSCRIBE` when subscribing again.
const CHUNK: usize = 256;

/// Redis for the mesh: commands, the Pub/Sub task, the store and the
/// named channels' lists.
pub(super) struct RedisTransport {
    pub(super) conn: ConnectionManager,
    commands: mpsc::UnboundedSender<Command>,
    /// Whether the Pub/Sub connection is up (written by its task).
    pub(super) connected: Arc<AtomicBool>,
    store: RedisStore<ConnectionManager>,
    queues: RedisQueues<ConnectionManager, redis::Client>,
}

impl std::fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTransport")
            .field("connected", &self.connected.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

enum Command {
    Subscribe(String, Ack),
    Unsubscribe(String, Ack),
}

/// The Pub/Sub connection's two halves.
pub(super) struct PubSub {
    sink: PubSubSink,
    stream: PubSubStream,
}

/// Opens a Pub/Sub connection and subscribes to `channels`.
pub(super) async fn open(
    client: &redis::Client,
    channels: &[String],
    timeout: Duration,
) -> Result<PubSub, RedisFailure> {
    let wait = CONNECT_TIMEOUT.min(timeout) + timeout;
    let pubsub = match tokio::time::timeout(wait, client.get_async_pubsub()).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            return Err(RedisFailure::Redis(
                "cannot connect to Redis Pub/Sub".into(),
                e,
            ))
        }
        Err(_) => {
            return Err(RedisFailure::Timeout(
                "connecting to Redis Pub/Sub".into(),
                wait,
            ))
        }
    };
    let (mut sink, stream) = pubsub.split();
    for chunk in channels.chunks(CHUNK) {
        within(timeout, "SUBSCRIBE", sink.subscribe(chunk.to_vec())).await?;
    }
    Ok(PubSub { sink, stream })
}

impl RedisTransport {
    /// Starts the Pub/Sub task on `pubsub` (opened with nothing
    /// subscribed), delivering into `inbox`; commands go over the
    /// connection `queues` uses, with its timeout.
    pub(super) fn start(
        pubsub: PubSub,
        inbox: Inbox,
        counters: Arc<Counters>,
        store: RedisStore<ConnectionManager>,
        queues: RedisQueues<ConnectionManager, redis::Client>,
    ) -> Self {
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let connected = Arc::new(AtomicBool::new(true));
        let conn = queues.conn.clone();
        let task = PubSubTask {
            client: queues.connector.clone(),
            timeout: queues.timeout,
            inbox,
            counters,
            live_prefix: live_subject(&queues.layout.prefix, ""),
            commands: commands_rx,
            conn: Some(pubsub),
            wanted: HashSet::new(),
            waiting: Vec::new(),
            backoff: RECONNECT_MIN,
            next_attempt: Instant::now(),
            connected: connected.clone(),
        };
        tokio::spawn(task.run());
        Self {
            conn,
            commands,
            connected,
            store,
            queues,
        }
    }
}

impl Transport for RedisTransport {
    fn publish<'a>(
        &'a self,
        subject: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Option<usize>, TransportError>> {
        Box::pin(async move {
            let mut publish = redis::cmd("PUBLISH");
            publish.arg(subject).arg(payload.as_ref());
            Ok(Some(query(&self.conn, "PUBLISH", &publish).await?))
        })
    }

    fn subscribe<'a>(
        &'a self,
        subject: &'a str,
        _queue: bool,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        // Named channels are lists here (`queues`): never a queue subscription.
        Box::pin(ask(&self.commands, |ack| {
            Command::Subscribe(subject.to_owned(), ack)
        }))
    }

    fn unsubscribe<'a>(&'a self, subject: &'a str) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(ask(&self.commands, |ack| {
            Command::Unsubscribe(subject.to_owned(), ack)
        }))
    }

    fn store(&self) -> Option<&dyn Store> {
        Some(&self.store)
    }

    fn queues(&self) -> Option<&dyn Queues> {
        Some(&self.queues)
    }
}

/// Owns the Pub/Sub connection until the transport is dropped.
struct PubSubTask {
    client: redis::Client,
    timeout: Duration,
    inbox: Inbox,
    counters: Arc<Counters>,
    /// `{prefix}.hlive.`: stored history events arrive on these.
    live_prefix: String,
    commands: mpsc::UnboundedReceiver<Command>,
    conn: Option<PubSub>,
    /// What the mesh subscribed to: subscribed again after a reconnect.
    wanted: HashSet<String>,
    /// Subscriptions asked for while disconnected, answered once the
    /// connection is back (their waiters time out on their own).
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

impl PubSubTask {
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
                // The transport is gone.
                Wake::Command(None) => return,
                Wake::Command(Some(cmd)) => self.command(cmd).await,
                Wake::Message(Some(msg)) => {
                    if !self.message(&msg).await {
                        return;
                    }
                }
                Wake::Message(None) => self.disconnected("the Redis Pub/Sub connection closed"),
                Wake::Ping => self.ping().await,
                Wake::Retry => {}
            }
        }
    }

    /// Returns false when the mesh is gone.
    async fn reconnect(&mut self) -> bool {
        let channels: Vec<String> = self.wanted.iter().cloned().collect();
        match open(&self.client, &channels, self.timeout).await {
            Ok(conn) => {
                tracing::info!("reconnected to Redis Pub/Sub and subscribed again");
                self.conn = Some(conn);
                self.backoff = RECONNECT_MIN;
                self.connected.store(true, Ordering::Relaxed);
                for ack in self.waiting.drain(..) {
                    let _ = ack.send(Ok(()));
                }
                // The mesh reads what its history groups missed and writes
                // its presence again.
                self.inbox.reconnected().await
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

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Subscribe(channel, ack) => {
                self.wanted.insert(channel.clone());
                let Some(conn) = self.conn.as_mut() else {
                    // Answered once reconnected (which subscribes to every
                    // wanted channel), tried soon rather than after the
                    // full backoff.
                    self.waiting.retain(|a| !a.is_closed());
                    self.waiting.push(ack);
                    self.next_attempt = self.next_attempt.min(Instant::now() + RECONNECT_MIN);
                    return;
                };
                match within(
                    self.timeout,
                    "SUBSCRIBE",
                    conn.sink.subscribe(channel.as_str()),
                )
                .await
                {
                    Ok(()) => {
                        let _ = ack.send(Ok(()));
                    }
                    Err(e) => {
                        self.disconnected(&e.to_string());
                        self.waiting.push(ack);
                    }
                }
            }
            Command::Unsubscribe(channel, ack) => {
                self.wanted.remove(&channel);
                if let Some(conn) = self.conn.as_mut() {
                    if let Err(e) = within(
                        self.timeout,
                        "UNSUBSCRIBE",
                        conn.sink.unsubscribe(channel.as_str()),
                    )
                    .await
                    {
                        // Reconnecting subscribes to what is wanted only.
                        self.disconnected(&e.to_string());
                    }
                }
                let _ = ack.send(Ok(()));
            }
        }
    }

    /// Hands a message to the mesh; false when the mesh is gone.
    async fn message(&mut self, msg: &Msg) -> bool {
        let subject = msg.get_channel_name().to_owned();
        let payload = msg.get_payload_bytes();
        match super::store::incoming(subject, payload, &self.live_prefix, &self.counters) {
            Some(incoming) => self.inbox.send(incoming).await,
            None => true,
        }
    }
}
