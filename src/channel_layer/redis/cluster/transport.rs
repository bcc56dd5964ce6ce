//! The mesh's [`Transport`] on a Redis Cluster: `SPUBLISH` on the command
//! connection, shard subscriptions on a second cluster connection whose
//! RESP3 pushes a handler ([`Pushes`]) queues for the mesh without waiting,
//! and one task ([`Subscriptions`]) that owns the subscriptions: it
//! (un)subscribes as asked, subscribes again after a node connection
//! dropped, a health check failed or a slot moved, and then tells the mesh.

use std::{
    collections::HashSet,
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use redis::{
    cluster::{ClusterClient, ClusterConfig},
    cluster_async::ClusterConnection,
    cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo},
    PushInfo, PushKind, Value,
};
use tokio::{sync::mpsc, time::Instant};

use super::{connect, query, Layout, Receivers, RedisFailure};
use crate::channel_layer::{
    local::Counters,
    mesh::{live_subject, Inbox, Incoming, Queues, Store, Transport, TransportError},
    redis::{
        ask,
        queue::RedisQueues,
        store::{live_event, RedisStore},
    },
    redis_pubsub::{within, RECONNECT_MAX, RECONNECT_MIN},
    BoxFuture,
};

/// What the subscription task answers a command with.
type Ack = tokio::sync::oneshot::Sender<Result<(), RedisFailure>>;

/// How often every primary is pinged to tell whether the layer is connected.
const HEALTH_CHECK: Duration = Duration::from_secs(2);

/// How long health checks fail before the subscription connection is
/// replaced ([`Subscriptions::reopen`]); again as long as they fail.
const REOPEN: Duration = Duration::from_secs(6);

/// How long after a disturbance (a node connection dropped, a health check
/// or a subscription failed) each health check subscribes again to
/// everything: while redis-rs recovers from a lost node it may replace
/// other node connections without telling, and their shard subscriptions
/// go with them.
const SETTLE: Duration = Duration::from_secs(10);

/// Bytes of payloads queued between the push handler and the mesh's
/// inbox, at most; past it a message is dropped and counted in
/// `dropped_other` (see the layer's docs, "Limits").
const QUEUED_BYTES: usize = 16 << 20;

/// Redis Cluster for the mesh.
pub(in crate::channel_layer::redis) struct ClusterTransport {
    conn: ClusterConnection,
    pub(super) layout: Layout,
    commands: mpsc::UnboundedSender<Command>,
    /// Whether every primary answers and every subscription is confirmed.
    pub(super) connected: Arc<AtomicBool>,
    store: RedisStore<ClusterConnection>,
    queues: RedisQueues<ClusterConnection, Receivers>,
}

impl std::fmt::Debug for ClusterTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTransport")
            .field("connected", &self.connected.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

enum Command {
    Subscribe(String, Ack),
    Unsubscribe(String, Ack),
    /// The server ended a shard subscription (its slot moved).
    Ended(String),
    /// A node connection dropped: subscribe again to everything.
    Resync,
}

impl ClusterTransport {
    /// Connects the subscription connection (with `client`) and starts its
    /// task, delivering into `inbox`; commands go over the connection
    /// `queues` uses, with its layout and timeout.
    pub(super) async fn start(
        client: &ClusterClient,
        inbox: Inbox,
        counters: Arc<Counters>,
        store: RedisStore<ClusterConnection>,
        queues: RedisQueues<ClusterConnection, Receivers>,
    ) -> Result<Self, RedisFailure> {
        let (conn, layout, timeout) = (queues.conn.clone(), queues.layout.clone(), queues.timeout);
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (forward, forward_rx) = mpsc::unbounded_channel();
        let connected = Arc::new(AtomicBool::new(true));
        let queued = Arc::new(AtomicUsize::new(0));
        let pushes = Pushes {
            live_prefix: live_subject(&layout.prefix, ""),
            layout: layout.clone(),
            forward,
            queued: queued.clone(),
            counters,
            commands: commands.downgrade(),
            connected: connected.clone(),
        };
        let pushes = Arc::new(pushes);
        let pubsub = connect(client, push_config(&pushes), timeout).await?;
        tokio::spawn(forward_to(inbox.clone(), forward_rx, queued));
        let task = Subscriptions {
            client: client.clone(),
            pushes,
            failing_since: None,
            pubsub,
            timeout,
            inbox,
            commands: commands_rx,
            wanted: HashSet::new(),
            retry: HashSet::new(),
            resync: false,
            resumed: false,
            disturbed: None,
            backoff: RECONNECT_MIN,
            next_retry: Instant::now(),
            connected: connected.clone(),
        };
        tokio::spawn(task.run());
        Ok(Self {
            conn,
            layout,
            commands,
            connected,
            store,
            queues,
        })
    }
}

impl Transport for ClusterTransport {
    fn publish<'a>(
        &'a self,
        subject: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Option<usize>, TransportError>> {
        Box::pin(async move {
            let mut publish = redis::cmd("SPUBLISH");
            publish
                .arg(self.layout.channel(subject))
                .arg(payload.as_ref());
            Ok(Some(query(&self.conn, "SPUBLISH", &publish).await?))
        })
    }

    fn subscribe<'a>(
        &'a self,
        subject: &'a str,
        _queue: bool,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        // Named channels are lists here (`queues`): never a queue subscription.
        let channel = self.layout.channel(subject);
        Box::pin(ask(&self.commands, |ack| Command::Subscribe(channel, ack)))
    }

    fn unsubscribe<'a>(&'a self, subject: &'a str) -> BoxFuture<'a, Result<(), TransportError>> {
        let channel = self.layout.channel(subject);
        Box::pin(ask(&self.commands, |ack| {
            Command::Unsubscribe(channel, ack)
        }))
    }

    fn store(&self) -> Option<&dyn Store> {
        Some(&self.store)
    }

    fn queues(&self) -> Option<&dyn Queues> {
        Some(&self.queues)
    }
}

/// Handles the subscription connection's pushes, in redis-rs's connection
/// task: never waits.
struct Pushes {
    layout: Layout,
    /// `{prefix}.hlive.`: stored history events arrive on these subjects.
    live_prefix: String,
    forward: mpsc::UnboundedSender<(Incoming, usize)>,
    /// Bytes in `forward`, bounded by [`QUEUED_BYTES`].
    queued: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    /// Weak: the subscription task ends with the transport.
    commands: mpsc::WeakUnboundedSender<Command>,
    connected: Arc<AtomicBool>,
}

fn text(value: Option<&Value>) -> Option<&[u8]> {
    match value? {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

impl Pushes {
    fn push(&self, push: &PushInfo) {
        match push.kind {
            PushKind::SMessage => {
                let channel = text(push.data.first()).and_then(|c| std::str::from_utf8(c).ok());
                match (channel, text(push.data.get(1))) {
                    (Some(channel), Some(payload)) => self.message(channel, payload),
                    _ => Counters::add(&self.counters.dropped_other, 1),
                }
            }
            PushKind::SUnsubscribe => {
                // Ours are unwanted by then; the task subscribes again to
                // any other (the server ended it: its slot moved).
                let channel = text(push.data.first()).and_then(|c| std::str::from_utf8(c).ok());
                if let Some(channel) = channel {
                    self.tell(Command::Ended(channel.to_owned()));
                }
            }
            PushKind::Disconnection => {
                self.connected.store(false, Ordering::Relaxed);
                self.tell(Command::Resync);
            }
            _ => {}
        }
    }

    fn tell(&self, command: Command) {
        if let Some(commands) = self.commands.upgrade() {
            let _ = commands.send(command);
        }
    }

    fn message(&self, channel: &str, payload: &[u8]) {
        let Some(subject) = self.layout.subject(channel) else {
            Counters::add(&self.counters.dropped_other, 1);
            return;
        };
        let (payload, position) = if subject.starts_with(&self.live_prefix) {
            match live_event(payload) {
                Some((position, event)) => (event, Some(position)),
                None => {
                    tracing::warn!(subject, "dropping a malformed history event");
                    Counters::add(&self.counters.dropped_other, 1);
                    return;
                }
            }
        } else {
            (Bytes::copy_from_slice(payload), None)
        };
        let bytes = payload.len();
        if self.queued.fetch_add(bytes, Ordering::Relaxed) + bytes > QUEUED_BYTES {
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
            tracing::debug!(subject, "shard messages queue full: dropping one");
            Counters::add(&self.counters.dropped_other, 1);
            return;
        }
        let incoming = Incoming {
            subject,
            reply_to: None,
            payload,
            position,
        };
        if self.forward.send((incoming, bytes)).is_err() {
            // The mesh is gone.
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
        }
    }
}

/// Hands queued messages to the mesh, waiting while its inbox is full,
/// until the mesh is gone.
async fn forward_to(
    inbox: Inbox,
    mut rx: mpsc::UnboundedReceiver<(Incoming, usize)>,
    queued: Arc<AtomicUsize>,
) {
    while let Some((incoming, bytes)) = rx.recv().await {
        queued.fetch_sub(bytes, Ordering::Relaxed);
        if !inbox.send(incoming).await {
            return;
        }
    }
}

/// A subscription connection's configuration: its pushes go to `pushes`.
fn push_config(pushes: &Arc<Pushes>) -> ClusterConfig {
    let pushes = pushes.clone();
    ClusterConfig::new().set_push_sender(move |push: PushInfo| {
        pushes.push(&push);
        Ok::<(), Infallible>(())
    })
}

/// Owns the shard subscriptions until the transport is dropped.
struct Subscriptions {
    /// Makes a new subscription connection ([`Subscriptions::reopen`]).
    client: ClusterClient,
    pushes: Arc<Pushes>,
    /// Since when health checks fail, if they do.
    failing_since: Option<Instant>,
    pubsub: ClusterConnection,
    timeout: Duration,
    inbox: Inbox,
    commands: mpsc::UnboundedReceiver<Command>,
    /// The shard channels the mesh subscribed to.
    wanted: HashSet<String>,
    /// Wanted channels whose subscription failed or ended, retried.
    retry: HashSet<String>,
    /// Whether to subscribe again to everything once every primary answers.
    resync: bool,
    /// Whether to tell the mesh once the subscriptions are back (it then
    /// reads what its history groups missed and writes its presence again).
    resumed: bool,
    /// When the last disturbance was (see [`SETTLE`]).
    disturbed: Option<Instant>,
    backoff: Duration,
    next_retry: Instant,
    connected: Arc<AtomicBool>,
}

enum Wake {
    Command(Option<Command>),
    Retry,
    Health,
}

impl Subscriptions {
    fn pending(&self) -> bool {
        self.resync || !self.retry.is_empty()
    }

    async fn run(mut self) {
        let mut health = tokio::time::interval_at(Instant::now() + HEALTH_CHECK, HEALTH_CHECK);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = if self.pending() {
                tokio::select! {
                    cmd = self.commands.recv() => Wake::Command(cmd),
                    () = tokio::time::sleep_until(self.next_retry) => Wake::Retry,
                    _ = health.tick() => Wake::Health,
                }
            } else {
                tokio::select! {
                    cmd = self.commands.recv() => Wake::Command(cmd),
                    _ = health.tick() => Wake::Health,
                }
            };
            let alive = match wake {
                // The transport is gone.
                Wake::Command(None) => false,
                Wake::Command(Some(cmd)) => {
                    self.command(cmd).await;
                    true
                }
                Wake::Retry => self.retry().await,
                Wake::Health => {
                    self.health().await;
                    true
                }
            };
            if !alive {
                return;
            }
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Subscribe(channel, ack) => {
                self.wanted.insert(channel.clone());
                let result = self.ssubscribe(&channel).await;
                match &result {
                    Ok(()) => {
                        self.retry.remove(&channel);
                    }
                    Err(e) => {
                        tracing::warn!(channel, "{e}; retrying in the background");
                        self.retry.insert(channel);
                        self.failed();
                    }
                }
                let _ = ack.send(result);
            }
            Command::Unsubscribe(channel, ack) => {
                self.wanted.remove(&channel);
                self.retry.remove(&channel);
                let mut conn = self.pubsub.clone();
                if let Err(e) =
                    within(self.timeout, "SUNSUBSCRIBE", conn.sunsubscribe(&channel)).await
                {
                    // The node is unreachable: its connection and the
                    // subscription go together.
                    tracing::debug!(channel, "{e}");
                }
                let _ = ack.send(Ok(()));
            }
            Command::Ended(channel) => {
                if self.wanted.contains(&channel) {
                    tracing::info!(channel, "a shard subscription ended; subscribing again");
                    if !self.pending() {
                        self.backoff = RECONNECT_MIN;
                        self.next_retry = Instant::now();
                    }
                    self.retry.insert(channel);
                    self.resumed = true;
                }
            }
            Command::Resync => self.lost(),
        }
    }

    /// Everything is to be subscribed again once every primary answers.
    fn lost(&mut self) {
        if !self.pending() {
            self.backoff = RECONNECT_MIN;
            self.next_retry = Instant::now() + RECONNECT_MIN;
        }
        self.resync = true;
        self.disturbed = Some(Instant::now());
        self.connected.store(false, Ordering::Relaxed);
    }

    fn failed(&mut self) {
        self.disturbed = Some(Instant::now());
        self.next_retry = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
        self.connected.store(false, Ordering::Relaxed);
    }

    async fn ssubscribe(&self, channel: &str) -> Result<(), RedisFailure> {
        let mut conn = self.pubsub.clone();
        Ok(within(self.timeout, "SSUBSCRIBE", conn.ssubscribe(channel)).await?)
    }

    /// Retries what is pending; false when the mesh is gone.
    /// Subscribes again to what is pending (everything, after a
    /// disturbance); what fails (its shard is down) stays pending, the rest
    /// is restored at once. Returns false when the mesh is gone.
    async fn retry(&mut self) -> bool {
        if std::mem::take(&mut self.resync) {
            tracing::debug!("subscribing again to every shard channel");
            self.resumed = true;
            self.retry.extend(self.wanted.iter().cloned());
        }
        let channels: Vec<String> = self.retry.iter().cloned().collect();
        let mut restored = false;
        for channel in channels {
            match self.ssubscribe(&channel).await {
                Ok(()) => {
                    self.retry.remove(&channel);
                    restored = true;
                }
                Err(e) => tracing::debug!(channel, retry_in = ?self.backoff, "{e}"),
            }
        }
        if self.retry.is_empty() {
            self.backoff = RECONNECT_MIN;
            self.connected.store(true, Ordering::Relaxed);
        } else {
            self.failed();
        }
        if restored && self.resumed {
            // Told again when what is still pending comes back.
            self.resumed = !self.retry.is_empty();
            tracing::info!(pending = self.retry.len(), "shard subscriptions restored");
            return self.inbox.reconnected().await;
        }
        true
    }

    /// Replaces the subscription connection with a new one (redis-rs's can
    /// stay broken after a node came back: its slot refresh finds no
    /// connection), then subscribes again to everything.
    async fn reopen(&mut self) {
        let config = push_config(&self.pushes);
        match connect(&self.client, config, self.timeout).await {
            Ok(pubsub) => {
                tracing::warn!("health checks keep failing: a new subscription connection");
                self.pubsub = pubsub;
                self.lost();
            }
            Err(e) => tracing::debug!("a new subscription connection failed: {e}"),
        }
    }

    async fn health(&mut self) {
        if self.ping_all().await {
            self.failing_since = None;
            self.connected.store(!self.pending(), Ordering::Relaxed);
            let settling = self.disturbed.is_some_and(|at| at.elapsed() < SETTLE);
            if settling && !self.pending() {
                // Not a new disturbance: `disturbed` stays.
                tracing::debug!("settling after a disturbance: subscribing again");
                self.resync = true;
                self.next_retry = Instant::now();
            }
        } else {
            // A node may have restarted (and lost our subscriptions)
            // without redis-rs telling: subscribe again.
            tracing::warn!("a primary did not answer the health check");
            let since = *self.failing_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= REOPEN {
                self.failing_since = Some(Instant::now());
                self.reopen().await;
            } else if !self.resync {
                self.lost();
            }
        }
    }

    /// Whether every primary answers a `PING` on the subscription connection.
    async fn ping_all(&self) -> bool {
        let mut conn = self.pubsub.clone();
        let ping = conn.route_command(
            redis::cmd("PING"),
            RoutingInfo::MultiNode((
                MultipleNodeRoutingInfo::AllMasters,
                Some(ResponsePolicy::AllSucceeded),
            )),
        );
        within(self.timeout, "PING", ping).await.is_ok()
    }
}
