//! The mesh's [`Transport`] on a Redis Cluster: `SPUBLISH` on the command
//! connection, and shard subscriptions on one RESP3 connection per primary,
//! each owned by its own shared Pub/Sub task
//! ([`redis_pubsub`](crate::channel_layer::redis_pubsub), sharded kind:
//! health check, reconnect with backoff, re-subscription): a node that is
//! down holds up, drops or loses nothing on the others. One task
//! ([`Subscriptions`]) keeps the slot map (`CLUSTER SLOTS`, read on the
//! command connection), routes each shard channel to the primary owning its
//! slot and moves channels when slots move or a primary is replaced.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use redis::{
    cluster_async::ClusterConnection,
    cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot},
    ConnectionAddr, ConnectionInfo, Msg, ProtocolVersion, PushInfo, Value,
};
use tokio::{sync::mpsc, time::Instant};

use super::{query, Layout, Receivers, RedisFailure};
use crate::channel_layer::{
    local::{lock, Counters},
    mesh::{live_subject, Inbox, Incoming, Queues, Store, Transport, TransportError},
    redis::{
        ask,
        queue::RedisQueues,
        store::{incoming, RedisStore},
    },
    redis_pubsub::{
        self, within, Ack, Handler, Sharded, Subscriber, SubscriberError, RECONNECT_MIN,
    },
    BoxFuture,
};

/// How often the slot map is read again while a primary is down or a
/// channel has no owner.
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
/// confirmed: each node's Pub/Sub task writes its own flag.
#[derive(Default)]
pub(in crate::channel_layer::redis) struct Connected {
    /// Per primary (`host:port`): connected, and every channel it serves
    /// confirmed.
    nodes: Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// Wanted channels whose slot has no known owner.
    unrouted: AtomicBool,
}

impl Connected {
    pub(in crate::channel_layer::redis) fn get(&self) -> bool {
        let nodes = lock(&self.nodes);
        !self.unrouted.load(Ordering::Relaxed) && !nodes.is_empty() && all_ok(&nodes)
    }

    /// A new primary, with the flag its task writes.
    fn add(&self, node: &str, ok: Arc<AtomicBool>) {
        lock(&self.nodes).insert(node.to_owned(), ok);
    }

    fn remove(&self, node: &str) {
        lock(&self.nodes).remove(node);
    }

    fn all_nodes_ok(&self) -> bool {
        all_ok(&lock(&self.nodes))
    }
}

fn all_ok(nodes: &HashMap<String, Arc<AtomicBool>>) -> bool {
    nodes.values().all(|ok| ok.load(Ordering::Relaxed))
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

/// A reply's text field.
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

/// What a node's Pub/Sub task tells the routing task.
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

/// A primary's Pub/Sub task, seen from the routing task.
struct Node {
    subscriber: Subscriber,
    /// The channels routed to the node (its task subscribes to them).
    wanted: Arc<Mutex<HashSet<String>>>,
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
    /// Handed to node handlers (weak: the routing task ends with the transport).
    events_tx: mpsc::WeakUnboundedSender<Event>,
    /// Each slot's primary (`host:port`).
    slots: HashMap<Slot, String>,
    /// A Pub/Sub task per primary.
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
        // Held here only until the loop starts: node handlers hold weak ones,
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
                    self.want(&node, channel, true, Some(ack));
                } else {
                    // Subscribed in the background once its slot has an owner.
                    let _ = ack.send(Err(SubscriberError::Unreachable(format!(
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
                    Some(node) => self.want(&node, channel, false, Some(ack)),
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
                    if let Some(n) = self.nodes.get(&node) {
                        lock(&n.wanted).remove(&channel);
                    }
                    let waiting = self.unrouted.entry(channel).or_default();
                    waiting.extend(ack);
                    self.connected.unrouted.store(true, Ordering::Relaxed);
                    self.refresh_soon(RECONNECT_MIN);
                } else if let Some(ack) = ack {
                    // Being subscribed where the newer slot map says.
                    let _ = ack.send(Err(SubscriberError::Unreachable(format!(
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

    /// Notes whether `node` serves `channel`, and has its task subscribe or
    /// unsubscribe to match, then answer `ack` (dropped, which the waiter
    /// takes for a stopped task, if the node's task is gone).
    fn want(&self, node: &str, channel: String, wanted: bool, ack: Option<Ack>) {
        let Some(n) = self.nodes.get(node) else {
            return;
        };
        if wanted {
            lock(&n.wanted).insert(channel.clone());
        } else {
            lock(&n.wanted).remove(&channel);
        }
        let _ = n
            .subscriber
            .commands
            .send(redis_pubsub::Command::Sync { channel, ack });
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
            for channel in channels {
                self.want(&node, channel, false, None);
            }
        }
        for (node, channels) in adopted {
            let Some(n) = self.nodes.get(&node) else {
                continue;
            };
            lock(&n.wanted).extend(channels.iter().map(|(channel, _)| channel.clone()));
            // Subscribed there, then the mesh reads back what it missed.
            let _ = n
                .subscriber
                .commands
                .send(redis_pubsub::Command::Adopt(channels));
        }
    }

    fn seed_host(&self) -> &str {
        match self.seed.addr() {
            ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => host,
            _ => "127.0.0.1",
        }
    }

    /// Starts the Pub/Sub task of the primary at `address`.
    fn spawn_node(&self, address: &str) -> Node {
        let wanted = Arc::new(Mutex::new(HashSet::new()));
        let (subscriber, task) = Subscriber::new();
        let pushes = self.pushes.clone();
        let kind = Sharded {
            address: address.to_owned(),
            info: node_info(&self.seed, address),
            deliver: Arc::new(move |push: PushInfo| pushes.message(&push)),
        };
        let handler = ToNode {
            address: address.to_owned(),
            wanted: wanted.clone(),
            inbox: self.inbox.clone(),
            events: self.events_tx.clone(),
        };
        task.spawn_sharded(kind, self.timeout, handler);
        self.connected.add(address, subscriber.connected_flag());
        Node { subscriber, wanted }
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

/// What a primary's Pub/Sub task does for the routing task and the mesh
/// (its shard messages go from the connection to [`Pushes`] directly).
struct ToNode {
    /// `host:port`.
    address: String,
    /// The channels routed to this primary.
    wanted: Arc<Mutex<HashSet<String>>>,
    inbox: Inbox,
    events: mpsc::WeakUnboundedSender<Event>,
}

impl ToNode {
    fn tell(&self, event: Event) {
        if let Some(events) = self.events.upgrade() {
            let _ = events.send(event);
        }
    }
}

impl Handler for ToNode {
    /// A subscription the node cannot make now fails at once; it is made
    /// in the background (then the mesh is told).
    const WAIT_FOR_RECONNECT: bool = false;

    fn wanted(&self, channel: &str) -> bool {
        lock(&self.wanted).contains(channel)
    }

    fn all_wanted(&self) -> Vec<String> {
        lock(&self.wanted).iter().cloned().collect()
    }

    /// Never called: a sharded connection hands its messages to [`Pushes`].
    async fn message(&self, _msg: &Msg) -> bool {
        true
    }

    /// The routing task reads the slot map (a replica may have taken over
    /// some of the node's slots meanwhile), and the mesh reads what its
    /// history groups missed and writes its presence again.
    async fn reconnected(&self) -> bool {
        self.tell(Event::Back);
        self.restored().await
    }

    /// The mesh reads what its history groups missed and writes its
    /// presence again.
    async fn restored(&self) -> bool {
        self.inbox.reconnected().await
    }

    fn moved(&self, channel: String, ack: Option<Ack>) {
        self.tell(Event::Moved {
            node: self.address.clone(),
            channel,
            ack,
        });
    }
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
}
