//! The mesh's [`Transport`] on a Redis Cluster: `SPUBLISH` on the command
//! connection, and shard subscriptions on one plain RESP3 connection per
//! primary, each owned by its own task ([`NodeTask`]): a node that is down
//! holds up, drops or loses nothing on the others. One task
//! ([`Subscriptions`]) keeps the slot map (`CLUSTER SLOTS`, read on the
//! command connection), routes each shard channel to the primary owning its
//! slot and moves channels when slots move or a primary is replaced.

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use redis::{
    aio::MultiplexedConnection,
    cluster_async::ClusterConnection,
    cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot},
    AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, ProtocolVersion, PushInfo, PushKind,
    RedisError, Value,
};
use tokio::{sync::mpsc, time::Instant};

use super::{query, Layout, Receivers, RedisFailure};
use crate::channel_layer::{
    local::Counters,
    mesh::{live_subject, Inbox, Incoming, Queues, Store, Transport, TransportError},
    redis::{
        ask,
        queue::RedisQueues,
        store::{incoming, RedisStore},
    },
    redis_pubsub::{within, SubscriberError, CONNECT_TIMEOUT, RECONNECT_MAX, RECONNECT_MIN},
    BoxFuture,
};

/// What a subscription command is answered with.
type Ack = tokio::sync::oneshot::Sender<Result<(), RedisFailure>>;

/// How often each primary's subscription connection is pinged, and how
/// often the slot map is read again while a primary is down or a channel
/// has no owner.
const HEALTH_CHECK: Duration = Duration::from_secs(2);

/// Bytes of payloads queued between the node connections and the mesh's
/// inbox, at most; past it a message is dropped and counted in
/// `dropped_other` (see the layer's docs, "Limits").
const QUEUED_BYTES: usize = 16 << 20;

/// Redis Cluster for the mesh.
pub(in crate::channel_layer::redis) struct ClusterTransport {
    conn: ClusterConnection,
    pub(super) layout: Layout,
    commands: mpsc::UnboundedSender<Command>,
    /// Whether every primary answers and every subscription is confirmed.
    pub(super) connected: Arc<Connected>,
    store: RedisStore<ClusterConnection>,
    queues: RedisQueues<ClusterConnection, Receivers>,
}

impl std::fmt::Debug for ClusterTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTransport")
            .field("connected", &self.connected.get())
            .finish_non_exhaustive()
    }
}

/// Whether every primary answers and every wanted subscription is
/// confirmed: each node task writes its own entry.
#[derive(Default)]
pub(in crate::channel_layer::redis) struct Connected {
    /// Per primary (`host:port`): connected, and every channel it serves
    /// confirmed.
    nodes: Mutex<HashMap<String, bool>>,
    /// Wanted channels whose slot has no known owner.
    unrouted: AtomicBool,
}

impl Connected {
    pub(in crate::channel_layer::redis) fn get(&self) -> bool {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        !self.unrouted.load(Ordering::Relaxed) && !nodes.is_empty() && nodes.values().all(|&ok| ok)
    }

    /// A new primary, not connected yet.
    fn add(&self, node: &str) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.insert(node.to_owned(), false);
    }

    /// A primary's state (unless it was removed: its task is ending).
    fn set(&self, node: &str, ok: bool) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = nodes.get_mut(node) {
            *entry = ok;
        }
    }

    fn remove(&self, node: &str) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.remove(node);
    }

    fn all_nodes_ok(&self) -> bool {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.values().all(|&ok| ok)
    }
}

enum Command {
    Subscribe(String, Ack),
    Unsubscribe(String, Ack),
}

impl ClusterTransport {
    /// Reads the slot map, starts a task per primary (connecting with
    /// `seed`'s credentials and TLS settings) and the task routing the
    /// subscriptions, delivering into `inbox`; commands go over the
    /// connection `queues` uses, with its layout and timeout.
    pub(super) async fn start(
        seed: ConnectionInfo,
        inbox: Inbox,
        counters: Arc<Counters>,
        store: RedisStore<ClusterConnection>,
        queues: RedisQueues<ClusterConnection, Receivers>,
    ) -> Result<Self, RedisFailure> {
        let (conn, layout, timeout) = (queues.conn.clone(), queues.layout.clone(), queues.timeout);
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (forward, forward_rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let connected = Arc::new(Connected::default());
        let queued = Arc::new(AtomicUsize::new(0));
        let pushes = Arc::new(Pushes {
            live_prefix: live_subject(&layout.prefix, ""),
            layout: layout.clone(),
            forward,
            queued: queued.clone(),
            counters,
        });
        let mut task = Subscriptions {
            conn: conn.clone(),
            seed,
            timeout,
            inbox: inbox.clone(),
            pushes,
            commands: commands_rx,
            events,
            events_tx: events_tx.downgrade(),
            slots: HashMap::new(),
            nodes: HashMap::new(),
            assigned: HashMap::new(),
            unrouted: HashMap::new(),
            refresh_at: None,
            last_refresh: None,
            reading: false,
            connected: connected.clone(),
        };
        task.refresh().await?;
        tokio::spawn(forward_to(inbox, forward_rx, queued));
        tokio::spawn(task.run(events_tx));
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

// ------------------------------------------------------------------ pushes

/// Queues the shard messages of every node connection for the mesh, in
/// redis-rs's connection tasks: never waits.
struct Pushes {
    layout: Layout,
    /// `{prefix}.hlive.`: stored history events arrive on these subjects.
    live_prefix: String,
    forward: mpsc::UnboundedSender<(Incoming, usize)>,
    /// Bytes in `forward`, bounded by [`QUEUED_BYTES`].
    queued: Arc<AtomicUsize>,
    counters: Arc<Counters>,
}

fn text(value: Option<&Value>) -> Option<&[u8]> {
    match value? {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn text_str(value: Option<&Value>) -> Option<&str> {
    text(value).and_then(|c| std::str::from_utf8(c).ok())
}

impl Pushes {
    fn message(&self, push: &PushInfo) {
        let Some((channel, payload)) = text_str(push.data.first()).zip(text(push.data.get(1)))
        else {
            Counters::add(&self.counters.dropped_other, 1);
            return;
        };
        let Some(subject) = self.layout.subject(channel) else {
            Counters::add(&self.counters.dropped_other, 1);
            return;
        };
        let Some(incoming) = incoming(subject, payload, &self.live_prefix, &self.counters) else {
            return;
        };
        let bytes = incoming.payload.len();
        if self.queued.fetch_add(bytes, Ordering::Relaxed) + bytes > QUEUED_BYTES {
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
            tracing::debug!(
                subject = incoming.subject,
                "shard messages queue full: dropping one"
            );
            Counters::add(&self.counters.dropped_other, 1);
            return;
        }
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

// ---------------------------------------------------------------- routing

/// What a node task tells the routing task.
enum Event {
    /// The node (`host:port`) answered `MOVED` to a subscription (or ended
    /// one that is still wanted: its slot migrated); the channel left it.
    Moved {
        node: String,
        channel: String,
        ack: Option<Ack>,
    },
    /// The node is reachable again after an outage: read the slot map (a
    /// replica may have taken over some of its slots meanwhile).
    Back,
    /// The slot map, read in the background.
    Slots(Result<HashMap<Slot, String>, RedisFailure>),
}

/// What the routing task asks of a node task.
enum NodeCommand {
    Subscribe(String, Ack),
    Unsubscribe(String, Ack),
    /// Channels that moved to this node (a slot migrated, a primary was
    /// replaced): subscribed, then the mesh is told.
    Adopt(Vec<(String, Option<Ack>)>),
    /// Channels that moved away from this node.
    Release(Vec<String>),
}

/// A node task, seen from the routing task.
struct Node {
    commands: mpsc::UnboundedSender<NodeCommand>,
}

/// Owns the slot map and the routes of the shard subscriptions until the
/// transport is dropped.
struct Subscriptions {
    /// The command connection: `CLUSTER SLOTS`.
    conn: ClusterConnection,
    /// Where credentials and TLS settings for node connections come from.
    seed: ConnectionInfo,
    timeout: Duration,
    inbox: Inbox,
    pushes: Arc<Pushes>,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedReceiver<Event>,
    /// Handed to node tasks (weak: the routing task ends with the transport).
    events_tx: mpsc::WeakUnboundedSender<Event>,
    /// Each slot's primary (`host:port`).
    slots: HashMap<Slot, String>,
    /// A task per primary.
    nodes: HashMap<String, Node>,
    /// Each wanted channel's node.
    assigned: HashMap<String, String>,
    /// Wanted channels without a node (their slot had no known owner, or
    /// they moved), with the subscriptions waiting on them.
    unrouted: HashMap<String, Vec<Ack>>,
    /// When to read the slot map again.
    refresh_at: Option<Instant>,
    last_refresh: Option<Instant>,
    /// Whether the slot map is being read.
    reading: bool,
    connected: Arc<Connected>,
}

enum Wake {
    Command(Option<Command>),
    Event(Option<Event>),
    Refresh,
    Health,
}

impl Subscriptions {
    async fn run(mut self, events_tx: mpsc::UnboundedSender<Event>) {
        // Held here only until the loop starts: node tasks hold weak ones,
        // and `self.events` must not end while the task runs.
        let _events_tx = events_tx;
        let mut health = tokio::time::interval_at(Instant::now() + HEALTH_CHECK, HEALTH_CHECK);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let refresh_at = self.refresh_at;
            let wake = tokio::select! {
                biased;
                cmd = self.commands.recv() => Wake::Command(cmd),
                event = self.events.recv() => Wake::Event(event),
                () = async {
                    match refresh_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => Wake::Refresh,
                _ = health.tick() => Wake::Health,
            };
            match wake {
                // The transport is gone.
                Wake::Command(None) | Wake::Event(None) => return,
                Wake::Command(Some(cmd)) => self.command(cmd),
                Wake::Event(Some(event)) => self.event(event),
                Wake::Refresh => {
                    self.refresh_at = None;
                    self.read_slots_in_background();
                }
                Wake::Health => {
                    // A primary is down (a replica may be taking over) or
                    // a channel has no owner: read the slot map again.
                    if !self.connected.all_nodes_ok() || !self.unrouted.is_empty() {
                        self.refresh_soon(Duration::ZERO);
                    }
                }
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Subscribe(channel, ack) => {
                if let Some(node) = self.owner(&channel) {
                    let node = node.to_owned();
                    self.assigned.insert(channel.clone(), node.clone());
                    self.tell(&node, NodeCommand::Subscribe(channel, ack));
                } else {
                    // Subscribed in the background once its slot has an owner.
                    let _ = ack.send(Err(RedisFailure::Unreachable(format!(
                        "no primary known for shard channel {channel}"
                    ))));
                    self.unrouted.entry(channel).or_default();
                    self.connected.unrouted.store(true, Ordering::Relaxed);
                    self.refresh_soon(RECONNECT_MIN);
                }
            }
            Command::Unsubscribe(channel, ack) => {
                self.unrouted.remove(&channel);
                self.connected
                    .unrouted
                    .store(!self.unrouted.is_empty(), Ordering::Relaxed);
                match self.assigned.remove(&channel) {
                    Some(node) => self.tell(&node, NodeCommand::Unsubscribe(channel, ack)),
                    None => {
                        let _ = ack.send(Ok(()));
                    }
                }
            }
        }
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::Moved { node, channel, ack } => {
                // Only if still wanted there: not unsubscribed (or moved
                // elsewhere by a newer slot map) meanwhile.
                if self.assigned.get(&channel) == Some(&node) {
                    tracing::info!(
                        channel,
                        node,
                        "a shard channel's slot moved; reading the slot map"
                    );
                    self.assigned.remove(&channel);
                    let waiting = self.unrouted.entry(channel).or_default();
                    waiting.extend(ack);
                    self.connected.unrouted.store(true, Ordering::Relaxed);
                    self.refresh_soon(RECONNECT_MIN);
                } else if let Some(ack) = ack {
                    // Being subscribed where the newer slot map says.
                    let _ = ack.send(Err(RedisFailure::Unreachable(format!(
                        "the slot of shard channel {channel} moved"
                    ))));
                }
            }
            Event::Back => self.refresh_soon(Duration::ZERO),
            Event::Slots(slots) => {
                self.reading = false;
                match slots {
                    Ok(slots) => self.apply(slots),
                    Err(e) => {
                        tracing::debug!("reading the cluster's slot map: {e}");
                        self.refresh_soon(HEALTH_CHECK);
                    }
                }
            }
        }
    }

    /// Reads the slot map again after `delay`, and at most once per
    /// [`RECONNECT_MIN`].
    fn refresh_soon(&mut self, delay: Duration) {
        let mut at = Instant::now() + delay;
        if let Some(last) = self.last_refresh {
            at = at.max(last + RECONNECT_MIN);
        }
        self.refresh_at = Some(self.refresh_at.map_or(at, |t| t.min(at)));
    }

    fn owner(&self, channel: &str) -> Option<&str> {
        self.slots.get(&Slot::for_key(channel)).map(String::as_str)
    }

    fn tell(&mut self, node: &str, command: NodeCommand) {
        if let Some(n) = self.nodes.get(node) {
            if let Err(mpsc::error::SendError(command)) = n.commands.send(command) {
                // The node task is gone (the runtime is shutting down).
                match command {
                    NodeCommand::Subscribe(_, ack) | NodeCommand::Unsubscribe(_, ack) => {
                        let _ = ack.send(Err(RedisFailure::Stopped));
                    }
                    NodeCommand::Adopt(_) | NodeCommand::Release(_) => {}
                }
            }
        }
    }

    /// Reads the slot map (`CLUSTER SLOTS`) and [applies](Self::apply) it
    /// (at start-up).
    async fn refresh(&mut self) -> Result<(), RedisFailure> {
        self.last_refresh = Some(Instant::now());
        let slots = read_slots(&self.conn, self.timeout, self.seed_host()).await?;
        self.apply(slots);
        Ok(())
    }

    /// Reads the slot map in a task of its own (a node that is down may
    /// be asked and hold it up; nothing else waits meanwhile), which hands
    /// it to [`Subscriptions::apply`].
    fn read_slots_in_background(&mut self) {
        if self.reading {
            return;
        }
        let Some(events) = self.events_tx.upgrade() else {
            return;
        };
        self.reading = true;
        self.last_refresh = Some(Instant::now());
        let (conn, timeout, seed_host) =
            (self.conn.clone(), self.timeout, self.seed_host().to_owned());
        tokio::spawn(async move {
            let slots = read_slots(&conn, timeout, &seed_host).await;
            let _ = events.send(Event::Slots(slots));
        });
    }

    /// Starts a task for each new primary of `slots`, ends those of nodes
    /// that are no longer primaries and moves every channel whose slot
    /// changed owner (subscribing it at the new one, which then tells the
    /// mesh).
    fn apply(&mut self, slots: HashMap<Slot, String>) {
        let primaries: HashSet<&String> = slots.values().collect();
        for &primary in &primaries {
            if !self.nodes.contains_key(primary) {
                let node = self.spawn_node(primary);
                self.nodes.insert(primary.clone(), node);
            }
        }
        let gone: Vec<String> = self
            .nodes
            .keys()
            .filter(|n| !primaries.contains(n))
            .cloned()
            .collect();
        for node in gone {
            tracing::info!(
                node,
                "no longer a primary: closing its subscription connection"
            );
            self.nodes.remove(&node);
            self.connected.remove(&node);
        }
        self.slots = slots;

        // Channels that moved, by old and new node.
        let mut released: HashMap<String, Vec<String>> = HashMap::new();
        let mut adopted: HashMap<String, Vec<(String, Option<Ack>)>> = HashMap::new();
        for (channel, node) in &mut self.assigned {
            let Some(owner) = self.slots.get(&Slot::for_key(channel)) else {
                continue;
            };
            if owner != node {
                released
                    .entry(std::mem::replace(node, owner.clone()))
                    .or_default()
                    .push(channel.clone());
                adopted
                    .entry(owner.clone())
                    .or_default()
                    .push((channel.clone(), None));
            }
        }
        let unrouted: Vec<String> = self.unrouted.keys().cloned().collect();
        for channel in unrouted {
            let Some(owner) = self.slots.get(&Slot::for_key(&channel)).cloned() else {
                continue;
            };
            let acks = self.unrouted.remove(&channel).unwrap_or_default();
            self.assigned.insert(channel.clone(), owner.clone());
            let moves = adopted.entry(owner).or_default();
            if acks.is_empty() {
                moves.push((channel, None));
            } else {
                moves.extend(acks.into_iter().map(|ack| (channel.clone(), Some(ack))));
            }
        }
        self.connected
            .unrouted
            .store(!self.unrouted.is_empty(), Ordering::Relaxed);
        for (node, channels) in released {
            self.tell(&node, NodeCommand::Release(channels));
        }
        for (node, channels) in adopted {
            self.tell(&node, NodeCommand::Adopt(channels));
        }
    }

    fn seed_host(&self) -> &str {
        match self.seed.addr() {
            ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => host,
            _ => "127.0.0.1",
        }
    }

    fn spawn_node(&self, address: &str) -> Node {
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (internal_tx, internal) = mpsc::unbounded_channel();
        self.connected.add(address);
        let task = NodeTask {
            address: address.to_owned(),
            info: node_info(&self.seed, address),
            timeout: self.timeout,
            inbox: self.inbox.clone(),
            pushes: self.pushes.clone(),
            commands: commands_rx,
            internal,
            internal_tx: internal_tx.downgrade(),
            events: self.events_tx.clone(),
            conn: None,
            generation: 0,
            channels: HashSet::new(),
            pending: HashSet::new(),
            ever_up: false,
            backoff: RECONNECT_MIN,
            next_attempt: Instant::now(),
            connected: self.connected.clone(),
        };
        tokio::spawn(task.run(internal_tx));
        Node { commands }
    }
}

/// The slot map: each slot's primary, from `CLUSTER SLOTS` on the command
/// connection (a node that is down may be asked: a few tries).
async fn read_slots(
    conn: &ClusterConnection,
    timeout: Duration,
    seed_host: &str,
) -> Result<HashMap<Slot, String>, RedisFailure> {
    let mut last = None;
    for _ in 0..3 {
        let mut conn = conn.clone();
        let ask = conn.route_command(
            redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        );
        match within(timeout, "CLUSTER SLOTS", ask).await {
            Ok(reply) => {
                return parse_slots(&reply, seed_host)
                    .ok_or(RedisFailure::Malformed("CLUSTER SLOTS"));
            }
            Err(e) => last = Some(RedisFailure::from(e)),
        }
    }
    Err(last.unwrap_or(RedisFailure::Stopped))
}

/// `CLUSTER SLOTS`' answer as each slot's primary, `host:port`; a primary
/// without a host name is at `seed_host`. `None` if malformed.
fn parse_slots(reply: &Value, seed_host: &str) -> Option<HashMap<Slot, String>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    let int = |v: &Value| match v {
        Value::Int(n) => u16::try_from(*n).ok(),
        _ => None,
    };
    let mut slots = HashMap::new();
    for range in ranges {
        let Value::Array(range) = range else {
            return None;
        };
        let (start, end) = (int(range.first()?)?, int(range.get(1)?)?);
        let Value::Array(primary) = range.get(2)? else {
            return None;
        };
        let host = text_str(primary.first())?;
        let host = if host.is_empty() || host == "?" {
            seed_host
        } else {
            host
        };
        let port = int(primary.get(1)?)?;
        let address = format!("{host}:{port}");
        for n in start..=end {
            slots.insert(Slot::new(n)?, address.clone());
        }
    }
    Some(slots)
}

/// `seed` with `address` (`host:port`) instead of its own, RESP3 (shard
/// messages arrive as pushes).
fn node_info(seed: &ConnectionInfo, address: &str) -> ConnectionInfo {
    let (host, port) = address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse().ok()?)))
        .unwrap_or_else(|| (address.to_owned(), 6379));
    let addr = match seed.addr().clone() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host,
            port,
            insecure,
            tls_params,
        },
        _ => ConnectionAddr::Tcp(host, port),
    };
    let redis = seed
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    seed.clone().set_addr(addr).set_redis_settings(redis)
}

// ------------------------------------------------------------------ nodes

/// What a node connection's push handler tells its task.
enum Internal {
    /// The connection of this generation dropped.
    Dropped(u64),
    /// The server ended the subscription to this channel on the connection
    /// of this generation (its slot migrated; or it confirms our own
    /// `SUNSUBSCRIBE`).
    Ended(u64, String),
}

/// Owns one primary's subscription connection until the routing task
/// drops it: subscribes as asked, checks the connection's health,
/// reconnects and subscribes again after it dropped (then tells the mesh).
struct NodeTask {
    /// `host:port`.
    address: String,
    info: ConnectionInfo,
    timeout: Duration,
    inbox: Inbox,
    pushes: Arc<Pushes>,
    commands: mpsc::UnboundedReceiver<NodeCommand>,
    internal: mpsc::UnboundedReceiver<Internal>,
    /// Handed to each connection's push handler.
    internal_tx: mpsc::WeakUnboundedSender<Internal>,
    events: mpsc::WeakUnboundedSender<Event>,
    conn: Option<MultiplexedConnection>,
    /// Of `conn`: what its push handler reports about.
    generation: u64,
    /// The shard channels this node serves for us.
    channels: HashSet<String>,
    /// Of `channels`, those not confirmed on `conn`.
    pending: HashSet<String>,
    /// Whether a connection was ever made (a reconnect is news to the mesh
    /// and to the routing task; the first connect is not).
    ever_up: bool,
    backoff: Duration,
    /// When to connect again (without `conn`) or retry `pending` (with it).
    next_attempt: Instant,
    connected: Arc<Connected>,
}

enum NodeWake {
    Command(Option<NodeCommand>),
    Internal(Option<Internal>),
    Retry,
    Health,
}

/// How a subscription command went.
enum Outcome {
    Done,
    /// `MOVED`: the channel's slot is elsewhere.
    Moved,
    /// The connection cannot be trusted any more (it failed, timed out, or
    /// answered something else than asked): reconnect.
    Broken(RedisFailure),
    /// The server refused (e.g. `TRYAGAIN`): retried later.
    Refused(RedisFailure),
}

impl NodeTask {
    async fn run(mut self, internal_tx: mpsc::UnboundedSender<Internal>) {
        // Push handlers hold weak senders; `self.internal` must not end.
        let _internal_tx = internal_tx;
        let mut health = tokio::time::interval_at(Instant::now() + HEALTH_CHECK, HEALTH_CHECK);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.conn.is_none() && Instant::now() >= self.next_attempt && !self.reconnect().await
            {
                return;
            }
            let retrying = self.conn.is_none() || !self.pending.is_empty();
            let next_attempt = self.next_attempt;
            let wake = tokio::select! {
                biased;
                internal = self.internal.recv() => NodeWake::Internal(internal),
                cmd = self.commands.recv() => NodeWake::Command(cmd),
                () = tokio::time::sleep_until(next_attempt), if retrying => NodeWake::Retry,
                _ = health.tick() => NodeWake::Health,
            };
            let alive = match wake {
                // The routing task dropped this node (or the transport is gone).
                NodeWake::Command(None) | NodeWake::Internal(None) => false,
                NodeWake::Command(Some(cmd)) => self.command(cmd).await,
                NodeWake::Internal(Some(internal)) => {
                    self.internal(internal);
                    true
                }
                NodeWake::Retry => self.retry().await,
                NodeWake::Health => {
                    self.health().await;
                    true
                }
            };
            if !alive {
                return;
            }
        }
    }

    fn state(&self) {
        self.connected.set(
            &self.address,
            self.conn.is_some() && self.pending.is_empty(),
        );
    }

    fn tell(&self, event: Event) {
        if let Some(events) = self.events.upgrade() {
            let _ = events.send(event);
        }
    }

    /// Returns false when the mesh is gone.
    async fn command(&mut self, cmd: NodeCommand) -> bool {
        match cmd {
            NodeCommand::Subscribe(channel, ack) => {
                self.channels.insert(channel.clone());
                self.pending.insert(channel.clone());
                if self.conn.is_none() {
                    // Subscribed once the node is back (then the mesh is told).
                    let _ = ack.send(Err(self.unreachable()));
                    self.state();
                    return true;
                }
                match self.ssubscribe(&channel).await {
                    Outcome::Done => {
                        let _ = ack.send(Ok(()));
                    }
                    Outcome::Moved => {
                        self.channels.remove(&channel);
                        self.pending.remove(&channel);
                        self.moved(channel, Some(ack));
                    }
                    Outcome::Broken(e) => {
                        tracing::warn!(
                            channel,
                            node = self.address,
                            "{e}; retrying in the background"
                        );
                        let _ = ack.send(Err(e));
                        self.disconnected();
                    }
                    Outcome::Refused(e) => {
                        tracing::warn!(
                            channel,
                            node = self.address,
                            "{e}; retrying in the background"
                        );
                        let _ = ack.send(Err(e));
                        self.retry_later();
                    }
                }
                self.state();
                true
            }
            NodeCommand::Unsubscribe(channel, ack) => {
                self.unsubscribe(&channel).await;
                let _ = ack.send(Ok(()));
                self.state();
                true
            }
            NodeCommand::Release(channels) => {
                for channel in channels {
                    self.unsubscribe(&channel).await;
                }
                self.state();
                true
            }
            NodeCommand::Adopt(channels) => {
                let mut restored = false;
                for (channel, ack) in channels {
                    self.channels.insert(channel.clone());
                    self.pending.insert(channel.clone());
                    let outcome = match self.conn {
                        Some(_) => self.ssubscribe(&channel).await,
                        None => Outcome::Broken(self.unreachable()),
                    };
                    match outcome {
                        Outcome::Done => {
                            restored = true;
                            if let Some(ack) = ack {
                                let _ = ack.send(Ok(()));
                            }
                        }
                        Outcome::Moved => {
                            self.channels.remove(&channel);
                            self.pending.remove(&channel);
                            self.moved(channel, ack);
                        }
                        Outcome::Broken(e) => {
                            tracing::debug!(channel, node = self.address, "{e}");
                            if let Some(ack) = ack {
                                let _ = ack.send(Err(e));
                            }
                            self.disconnected();
                        }
                        Outcome::Refused(e) => {
                            tracing::debug!(channel, node = self.address, "{e}");
                            if let Some(ack) = ack {
                                let _ = ack.send(Err(e));
                            }
                            self.retry_later();
                        }
                    }
                }
                self.state();
                // Moved channels may have missed events meanwhile: the mesh
                // reads back what its history groups missed.
                !restored || self.inbox.reconnected().await
            }
        }
    }

    /// Stops serving `channel` here.
    async fn unsubscribe(&mut self, channel: &str) {
        self.channels.remove(channel);
        self.pending.remove(channel);
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let mut cmd = redis::cmd("SUNSUBSCRIBE");
        cmd.arg(channel);
        match within(self.timeout, "SUNSUBSCRIBE", cmd.query_async::<Value>(conn)).await {
            Ok(reply) if confirms(&reply, &PushKind::SUnsubscribe, channel) => {}
            Ok(reply) => {
                tracing::debug!(channel, ?reply, "unexpected answer to SUNSUBSCRIBE");
                self.disconnected();
            }
            // `MOVED` (the slot left this node, which ended the
            // subscription) or another refusal: nothing to undo.
            Err(SubscriberError::Command(_, e)) if !broken(&e) => {
                tracing::debug!(channel, node = self.address, "SUNSUBSCRIBE: {e}");
            }
            Err(e) => {
                // Reconnecting subscribes to what is wanted only.
                tracing::debug!(channel, node = self.address, "{e}");
                self.disconnected();
            }
        }
    }

    fn internal(&mut self, internal: Internal) {
        match internal {
            Internal::Dropped(generation) if generation == self.generation => {
                self.disconnected();
            }
            Internal::Ended(generation, channel)
                if generation == self.generation && self.channels.remove(&channel) =>
            {
                // Still wanted here: its slot migrated (our own
                // unsubscriptions leave `channels` first).
                self.pending.remove(&channel);
                self.state();
                self.moved(channel, None);
            }
            Internal::Dropped(_) | Internal::Ended(..) => {}
        }
    }

    fn moved(&self, channel: String, ack: Option<Ack>) {
        self.tell(Event::Moved {
            node: self.address.clone(),
            channel,
            ack,
        });
    }

    fn unreachable(&self) -> RedisFailure {
        RedisFailure::Unreachable(format!(
            "Redis Cluster node {} is unreachable",
            self.address
        ))
    }

    /// The connection is lost (or cannot be trusted): reconnect soon and
    /// subscribe again to every channel.
    fn disconnected(&mut self) {
        if self.conn.take().is_some() {
            tracing::warn!(
                node = self.address,
                "subscription connection lost; reconnecting"
            );
            self.backoff = RECONNECT_MIN;
            self.next_attempt = Instant::now() + RECONNECT_MIN;
        }
        self.pending.extend(self.channels.iter().cloned());
        self.state();
    }

    fn retry_later(&mut self) {
        self.next_attempt = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
    }

    /// `SSUBSCRIBE channel` on the connection, which must be there.
    async fn ssubscribe(&mut self, channel: &str) -> Outcome {
        let Some(conn) = self.conn.as_mut() else {
            return Outcome::Broken(self.unreachable());
        };
        let mut cmd = redis::cmd("SSUBSCRIBE");
        cmd.arg(channel);
        let outcome = match tokio::time::timeout(self.timeout, cmd.query_async::<Value>(conn)).await
        {
            Ok(Ok(reply)) if confirms(&reply, &PushKind::SSubscribe, channel) => Outcome::Done,
            Ok(Ok(reply)) => {
                // A push the server sent on its own (an ended subscription)
                // was taken for the answer: the answers are out of step.
                tracing::debug!(channel, ?reply, "unexpected answer to SSUBSCRIBE");
                Outcome::Broken(RedisFailure::Malformed("SSUBSCRIBE"))
            }
            Ok(Err(e)) if e.redirect_node().is_some() => Outcome::Moved,
            Ok(Err(e)) => {
                let broken = broken(&e);
                let e = RedisFailure::Redis("Redis SSUBSCRIBE failed".into(), e);
                if broken {
                    Outcome::Broken(e)
                } else {
                    Outcome::Refused(e)
                }
            }
            Err(_) => Outcome::Broken(RedisFailure::Timeout(
                "Redis SSUBSCRIBE".into(),
                self.timeout,
            )),
        };
        if matches!(outcome, Outcome::Done) {
            self.pending.remove(channel);
        }
        outcome
    }

    /// Connects (when there is no connection) and subscribes to what is
    /// pending. Returns false when the mesh is gone.
    async fn retry(&mut self) -> bool {
        if self.conn.is_none() {
            return self.reconnect().await;
        }
        self.subscribe_pending().await
    }

    /// Subscribes to every pending channel on the connection; tells the
    /// mesh if any was restored. Returns false when the mesh is gone.
    async fn subscribe_pending(&mut self) -> bool {
        let channels: Vec<String> = self.pending.iter().cloned().collect();
        let mut restored = false;
        for channel in channels {
            match self.ssubscribe(&channel).await {
                Outcome::Done => restored = true,
                Outcome::Moved => {
                    self.channels.remove(&channel);
                    self.pending.remove(&channel);
                    self.moved(channel, None);
                }
                Outcome::Broken(e) => {
                    tracing::debug!(channel, node = self.address, "{e}");
                    self.disconnected();
                    self.retry_later();
                    break;
                }
                Outcome::Refused(e) => {
                    tracing::debug!(channel, node = self.address, "{e}");
                    self.retry_later();
                }
            }
        }
        if self.pending.is_empty() {
            self.backoff = RECONNECT_MIN;
        }
        self.state();
        if restored {
            tracing::info!(
                node = self.address,
                pending = self.pending.len(),
                "shard subscriptions restored"
            );
            // The mesh reads what its history groups missed and writes its
            // presence again.
            return self.inbox.reconnected().await;
        }
        true
    }

    /// Connects to the node and subscribes to its channels again. Returns
    /// false when the mesh is gone.
    async fn reconnect(&mut self) -> bool {
        self.generation += 1;
        let generation = self.generation;
        let (pushes, internal) = (self.pushes.clone(), self.internal_tx.clone());
        let tell = move |what: Internal| {
            if let Some(internal) = internal.upgrade() {
                let _ = internal.send(what);
            }
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT.min(self.timeout)))
            .set_response_timeout(Some(self.timeout))
            .set_push_sender(move |push: PushInfo| {
                match push.kind {
                    PushKind::SMessage => pushes.message(&push),
                    PushKind::SUnsubscribe => {
                        if let Some(channel) = text_str(push.data.first()) {
                            tell(Internal::Ended(generation, channel.to_owned()));
                        }
                    }
                    PushKind::Disconnection => tell(Internal::Dropped(generation)),
                    _ => {}
                }
                Ok::<(), Infallible>(())
            });
        let wait = CONNECT_TIMEOUT.min(self.timeout) + self.timeout;
        let connect = async {
            redis::Client::open(self.info.clone())?
                .get_multiplexed_async_connection_with_config(&config)
                .await
        };
        match tokio::time::timeout(wait, connect).await {
            Ok(Ok(conn)) => {
                let again = self.ever_up;
                self.ever_up = true;
                self.conn = Some(conn);
                self.backoff = RECONNECT_MIN;
                self.pending.extend(self.channels.iter().cloned());
                if again {
                    tracing::info!(node = self.address, "reconnected to the node");
                    // A replica may have taken over some of its slots.
                    self.tell(Event::Back);
                }
                self.subscribe_pending().await
            }
            Ok(Err(e)) => {
                tracing::debug!(node = self.address, retry_in = ?self.backoff, "connecting: {e}");
                self.retry_later();
                self.state();
                true
            }
            Err(_) => {
                tracing::debug!(node = self.address, retry_in = ?self.backoff, "connecting timed out");
                self.retry_later();
                self.state();
                true
            }
        }
    }

    async fn health(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        match within(
            self.timeout,
            "PING",
            redis::cmd("PING").query_async::<Value>(conn),
        )
        .await
        {
            Ok(Value::SimpleString(s)) if s == "PONG" => {}
            Ok(reply) => {
                tracing::debug!(node = self.address, ?reply, "unexpected answer to PING");
                self.disconnected();
            }
            Err(e) => {
                tracing::warn!(node = self.address, "health check failed: {e}");
                self.disconnected();
            }
        }
    }
}

/// Whether `reply` is the confirmation of `kind` for `channel`.
fn confirms(reply: &Value, kind: &PushKind, channel: &str) -> bool {
    match reply {
        Value::Push { kind: k, data } => {
            k == kind && text(data.first()) == Some(channel.as_bytes())
        }
        _ => false,
    }
}

/// Whether an error leaves the connection unusable.
fn broken(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error()
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::IntoConnectionInfo;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn slot_map_from_cluster_slots() {
        let range = |start: i64, end: i64, host: &str, port: i64| {
            Value::Array(vec![
                Value::Int(start),
                Value::Int(end),
                Value::Array(vec![bulk(host), Value::Int(port), bulk("id")]),
                // A replica: ignored.
                Value::Array(vec![bulk("10.0.0.9"), Value::Int(7009), bulk("id2")]),
            ])
        };
        let reply = Value::Array(vec![
            range(0, 5460, "10.0.0.1", 7000),
            range(5461, 10922, "", 7001),
            range(10923, 16383, "10.0.0.3", 7002),
        ]);
        let slots = parse_slots(&reply, "seed.example").unwrap();
        assert_eq!(slots.len(), 16384);
        let at = |n: u16| slots[&Slot::new(n).unwrap()].as_str();
        assert_eq!(at(0), "10.0.0.1:7000");
        assert_eq!(at(5461), "seed.example:7001");
        assert_eq!(at(16383), "10.0.0.3:7002");
        // The channel's hash tag decides its slot.
        let slot = Slot::for_key("tc.group.{lobby}");
        assert_eq!(slot, Slot::for_key("lobby"));
        assert!(slots.contains_key(&slot));

        // Malformed answers are refused, not trusted.
        for bad in [
            Value::Nil,
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(0),
                Value::Int(99_999),
                Value::Array(vec![bulk("h"), Value::Int(1)]),
            ])]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(0),
                Value::Int(1),
                Value::Array(vec![bulk("h"), Value::Int(-1)]),
            ])]),
        ] {
            assert!(parse_slots(&bad, "seed").is_none(), "{bad:?}");
        }
    }

    #[test]
    fn node_connections_take_the_seed_settings() {
        let seed = "redis://user:secret@10.0.0.1:7000/"
            .into_connection_info()
            .unwrap();
        let info = node_info(&seed, "10.0.0.2:7001");
        assert!(matches!(info.addr(), ConnectionAddr::Tcp(h, 7001) if h == "10.0.0.2"));
        assert_eq!(info.redis_settings().username(), Some("user"));
        assert_eq!(info.redis_settings().password(), Some("secret"));
        assert_eq!(info.redis_settings().protocol(), ProtocolVersion::RESP3);
    }

    #[test]
    fn confirmations_name_the_channel() {
        let push = |kind: PushKind, channel: &str| Value::Push {
            kind,
            data: vec![bulk(channel), Value::Int(1)],
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
