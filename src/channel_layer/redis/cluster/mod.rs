//! The Redis layer on a Redis Cluster (feature `redis-cluster`): its docs
//! are on [`RedisClusterChannelLayer`], public as
//! `channel_layer::redis::RedisClusterChannelLayer`.

mod history;
mod presence;
mod shared;
mod subscriber;
mod wire;
mod worker;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, OnceLock, Weak,
    },
    time::Duration,
};

use redis::{
    cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig},
    cluster_async::ClusterConnection,
    cluster_routing::{
        MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo, SingleNodeRoutingInfo,
    },
    Cmd, FromRedisValue, ProtocolVersion, Value,
};
use tokio::sync::{mpsc, oneshot};

use self::{
    shared::{GroupKeys, Host, Shared},
    subscriber::Command,
    wire::Envelope,
};
use super::{
    escape_glob, unix_now, CONNECT_TIMEOUT, DEFAULT_EXPIRY, DEFAULT_GROUP_EXPIRY, DEFAULT_PREFIX,
    DEFAULT_TIMEOUT, RECONNECT_MAX, RECONNECT_MIN, SEND_SCRIPT,
};
use crate::channel_layer::{
    local::{lock, no_such_channel, Counters, LocalChannels, Owner, Registry},
    names,
    subscriber_error::SubscriberError,
    validate_channel_name, validate_group_name, BoxFuture, Capabilities, ChannelLayer,
    ChannelLayerError, ChannelLayerStats, ChannelReceiver, Event, Feature, GroupSendReport,
    HistoryPolicy, PresenceConfig, PresenceInfo, PresenceMember, Recovery, StreamPosition,
    DEFAULT_CAPACITY,
};

/// The part of both group send scripts after the event is known:
/// `SPUBLISH`es `msg` and, if the group has named members, prunes and lists
/// them. `KEYS[1]`: the group's shard channel and the sorted set of its
/// named members (one name, one slot); `ARGV`: 1 now (s), 2 group expiry
/// (s). Sets `receivers` and `members`.
const PUBLISH_AND_LIST: &str = r"
local receivers = redis.call('SPUBLISH', KEYS[1], msg)
local members = {}
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
  members = redis.call('ZRANGE', KEYS[1], 0, -1)
end
";

/// A group send without history: [`PUBLISH_AND_LIST`] of the payload
/// (`ARGV[3]`). Returns `{subscribers, named members}`.
fn group_send_script() -> LuaScript {
    static SOURCE: OnceLock<String> = OnceLock::new();
    LuaScript::composed(
        &SOURCE,
        &[
            "local msg = ARGV[3]",
            PUBLISH_AND_LIST,
            "return {receivers, members}",
        ],
    )
}

/// A group send with history: [`history::APPEND`] (its arguments from
/// `ARGV[3]`, `KEYS[2..3]` the stream and meta hash, on the group's slot),
/// then [`PUBLISH_AND_LIST`] of the envelope with the offset. Returns
/// `{subscribers, named members, offset, epoch}`.
fn history_send_script() -> LuaScript {
    static SOURCE: OnceLock<String> = OnceLock::new();
    LuaScript::composed(
        &SOURCE,
        &[
            history::APPEND,
            "local offset, epoch, msg = append(3)",
            PUBLISH_AND_LIST,
            "return {receivers, members, offset, epoch}",
        ],
    )
}

/// Configures and connects a [`RedisClusterChannelLayer`]; made by
/// [`RedisClusterChannelLayer::builder`].
#[derive(Debug, Clone)]
#[must_use = "call .build().await to connect"]
pub struct RedisClusterChannelLayerBuilder {
    urls: Vec<String>,
    prefix: String,
    capacity: usize,
    group_expiry: Duration,
    expiry: Duration,
    timeout: Duration,
    history: Vec<HistoryPolicy>,
    presence: PresenceConfig,
}

impl RedisClusterChannelLayerBuilder {
    /// Keeps a history for the groups `policy` applies to, on the group's
    /// slot (see [history](RedisClusterChannelLayer#presence-history-and-recovery)); the first
    /// matching policy applies. Every process must configure the same ones.
    pub fn history(mut self, policy: HistoryPolicy) -> Self {
        self.history.push(policy);
        self
    }

    /// Sets which groups get presence notifications and how long a
    /// crashed process's members stay listed (see
    /// [presence](RedisClusterChannelLayer#presence-history-and-recovery)).
    pub fn presence(mut self, config: PresenceConfig) -> Self {
        self.presence = config;
        self
    }

    /// The prefix of every key and shard channel (default
    /// [`DEFAULT_PREFIX`]); it may not contain `{` or `}` (the layer's hash
    /// tags follow it).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Events a channel holds (default [`DEFAULT_CAPACITY`]); see
    /// [`RedisChannelLayerBuilder::capacity`](super::RedisChannelLayerBuilder::capacity).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// How long a named channel stays in a group after its last
    /// [`group_add`](ChannelLayer::group_add) (default [`DEFAULT_GROUP_EXPIRY`]).
    pub fn group_expiry(mut self, expiry: Duration) -> Self {
        self.group_expiry = expiry.max(Duration::from_secs(1));
        self
    }

    /// How long events wait in a named channel's list after the last push
    /// (default [`DEFAULT_EXPIRY`]).
    pub fn expiry(mut self, expiry: Duration) -> Self {
        self.expiry = expiry.max(Duration::from_secs(1));
        self
    }

    /// The timeout of each operation, redirects and retries included
    /// (default [`DEFAULT_TIMEOUT`]): how long a send to a shard that is down
    /// takes to fail.
    ///
    /// Waits on an answer, not one command, derive from it the same way on
    /// both Redis layers: a subscription is confirmed within twice the
    /// timeout plus a second (reconnecting, then reading a history group's
    /// position and subscribing), another process's reply to a group change
    /// of one of its channels within three times the timeout plus a second.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(10));
        self
    }

    /// Connects to the cluster (discovering every node from the reachable
    /// seeds) and subscribes to this process's channel.
    pub async fn build(self) -> Result<RedisClusterChannelLayer, ChannelLayerError> {
        if self.prefix.is_empty() || self.prefix.contains(['{', '}']) {
            return Err(BackendError::Config(
                "the Redis key prefix must not be empty nor contain '{' or '}'",
            )
            .into());
        }
        if self.urls.is_empty() {
            return Err(BackendError::Config("no Redis Cluster seed URL given").into());
        }
        let timeout = self.timeout;
        let builder = |response_timeout: Duration| {
            ClusterClientBuilder::new(self.urls.iter().map(String::as_str))
                .use_protocol(ProtocolVersion::RESP3)
                .connection_timeout(CONNECT_TIMEOUT.min(timeout))
                .response_timeout(response_timeout)
                .retries(4)
                .min_retry_wait(20)
                .max_retry_wait(500)
        };
        let invalid = |e| BackendError::Redis("invalid Redis Cluster URL".into(), e);
        let client = builder(timeout).build().map_err(invalid)?;
        let worker_client = builder(worker::BLOCK + timeout).build().map_err(invalid)?;

        let shared = Shared::new(
            GroupKeys::hash_tagged(&self.prefix),
            self.history,
            self.presence,
        );
        let config = Keys {
            capacity: self.capacity,
            group_expiry: self.group_expiry,
            expiry: self.expiry,
            timeout,
            group_prefix: format!("{}:group:{{", self.prefix),
            prefix: self.prefix,
        };
        let conn = connect(&client, ClusterConfig::new(), timeout).await?;
        // Pushes reach the layer through this slot, filled once `Inner` exists.
        let handler: Arc<OnceLock<Weak<Inner>>> = Arc::default();
        let push_handler = handler.clone();
        let pubsub = connect(
            &client,
            ClusterConfig::new().set_push_sender(move |push: redis::PushInfo| {
                if let Some(inner) = push_handler.get().and_then(Weak::upgrade) {
                    inner.push(&push);
                }
                Ok::<(), std::convert::Infallible>(())
            }),
            timeout,
        )
        .await?;

        let process = format!("specific.{}", names::random_token(12));
        let proc_channel = config.proc_key(&process);
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (received, received_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            group_send: group_send_script(),
            send: LuaScript::new(SEND_SCRIPT),
            history_send: history_send_script(),
            shared,
            received: subscriber::Received::new(received),
            config,
            proc_channel,
            worker_client,
            conn,
            pubsub,
            next_request: AtomicU64::new(1),
            registry: Registry::new(process),
            subscribed: Mutex::default(),
            connected: AtomicBool::new(false),
            pending: Mutex::default(),
            commands,
            counters: Arc::default(),
        });
        let _ = handler.set(Arc::downgrade(&inner));
        inner.load_scripts().await?;
        subscriber::ssubscribe(&inner, &inner.proc_channel)
            .await
            .map_err(|e| {
                BackendError::Subscriber(
                    format!(
                        "cannot subscribe to the process channel {:?}",
                        inner.proc_channel
                    ),
                    e,
                )
            })?;
        inner.connected.store(true, Ordering::Relaxed);
        tokio::spawn(subscriber::Subscriber::new(&inner, commands_rx).run());
        tokio::spawn(subscriber::sequence(Arc::downgrade(&inner), received_rx));
        tokio::spawn(presence::refresh_loop(
            Arc::downgrade(&inner),
            inner.shared.presence_config.time_limit(),
        ));
        Ok(RedisClusterChannelLayer { inner })
    }
}

async fn connect(
    client: &ClusterClient,
    config: ClusterConfig,
    timeout: Duration,
) -> Result<ClusterConnection, ChannelLayerError> {
    let wait = timeout + CONNECT_TIMEOUT;
    match tokio::time::timeout(wait, client.get_async_connection_with_config(config)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => {
            Err(BackendError::Redis("cannot connect to the Redis Cluster".into(), e).into())
        }
        Err(_) => Err(BackendError::Timeout("connecting to the Redis Cluster".into(), wait).into()),
    }
}

/// The Redis layer on a Redis Cluster, with sharded Pub/Sub (feature `redis-cluster`).
///
/// [`RedisClusterChannelLayer`] is [`RedisChannelLayer`](super::RedisChannelLayer)
/// for a Redis Cluster (Redis 7 or newer): the same local state, process
/// channels, groups, worker channels and [wire format](super#wire-format),
/// but every message goes to one shard instead of the whole cluster.
/// Classic `PUBLISH` on a cluster is broadcast to every node over the
/// cluster bus, so adding nodes adds no Pub/Sub capacity; sharded Pub/Sub
/// (`SPUBLISH`/`SSUBSCRIBE`) keeps a channel's traffic on the shard that
/// owns its slot, so capacity grows with the number of shards.
///
/// ```
/// use std::sync::Arc;
/// use tower_channels::channel_layer::redis::RedisClusterChannelLayer;
/// use tower_channels::channel_layer::{BoxError, ChannelLayer, Event};
///
/// async fn doc_main() -> Result<(), BoxError> {
///     // Any reachable nodes of the cluster; the others are discovered.
///     let layer = RedisClusterChannelLayer::builder([
///         "redis://10.0.0.1:6379",
///         "redis://10.0.0.2:6379",
///     ])
///     .prefix("myapp")
///     .build()
///     .await?;
///     let layer: Arc<dyn ChannelLayer> = Arc::new(layer);
///
///     let mut inbox = layer.new_channel().await?;
///     layer.group_add("lobby", inbox.name()).await?;
///     layer.group_send("lobby", Event::text("chat.message", "hello")).await?;
///     assert_eq!(inbox.recv().await?.kind(), "chat.message");
///     Ok(())
/// }
/// ```
///
/// # How it works
///
/// * **Slots.** Every key and shard channel carries a hash tag, so
///   everything about one group lives on one slot: the group's shard
///   channel and the sorted set of its named members are both
///   `{prefix}:group:{<group>}` (the braces are literal: the slot is the
///   group name's). A process channel is `{prefix}:proc:{<process>}`, a
///   worker channel's list `{prefix}:channel:{<name>}`. Different groups
///   spread over the shards by their names.
/// * **Group sends** run one script on the group's slot: `SPUBLISH` to the
///   shard channel and, if the group has named members, prune and list
///   them; each named member's list (on its own slot) is then pushed to
///   with the same capacity check as a direct send.
/// * **Subscriptions.** Each process `SSUBSCRIBE`s to its process channel
///   and to the shard channel of each group with a local member, on the
///   shard that owns it, through one multiplexed cluster connection, and
///   unsubscribes when the group's last local member leaves. Incoming
///   messages are RESP3 push messages, fanned out as soon as they are read.
/// * **Worker channels** are `BRPOP` loops, each on its own cluster
///   connection (a blocking command must not hold up the others).
///
/// # Presence, history and recovery
///
/// As on the [Redis layer](super#presence) (see there, and its
/// [history](super#history-and-recovery)), with the same scripts, the same
/// Rust around them and the same sequencer; only the keys differ: they
/// carry the group's hash tag, so a group's stream
/// `{prefix}:history:{<group>}`, its offset and epoch
/// `{prefix}:history-meta:{<group>}` and its presence keys
/// `{prefix}:presence:{<group>}:...` all live on the group's slot, with its
/// shard channel, and each script call runs on that one node. A history
/// send is one script there (append, `SPUBLISH` with the offset and epoch,
/// list the named members); the sending process's members get the event
/// once the offset is known, other processes through their shard
/// subscription, each in offset order and once (see [Limits](#limits)
/// for the queue between the two).
///
/// When the node owning a history group restarts without persistence, the
/// group's history and epoch are gone: the next send starts a new epoch,
/// old positions fail to recover with
/// [`RecoveryFailure::EpochChanged`](crate::channel_layer::RecoveryFailure::EpochChanged),
/// and each process reads the new epoch from its first offset, so sends
/// answered while it was still subscribing again are not lost. Once every
/// primary answers again, each process writes its presence on the node
/// again and reads back what its history groups missed (as it does for a
/// history group whose subscription ended because its slot moved).
/// `tests/redis_cluster.rs` (`history_survives_node_restart`) checks both.
///
/// # Redirects, restarts and slot migration
///
/// Routing, `MOVED`/`ASK` redirects, reconnection and re-subscription come
/// from redis-rs's cluster connection
/// ([`redis::cluster_async`]); redis 1.x
/// supports sharded Pub/Sub there (`ClusterConnection::ssubscribe`, RESP3
/// pushes delivered to a `push_sender`), so this layer keeps no slot map of
/// its own:
///
/// * a command sent to a node that no longer owns the slot is redirected
///   and redis-rs refreshes its slot map;
/// * when a node connection drops (a restart), redis-rs reconnects; in our
///   tests its own re-subscription did not always restore the shard
///   channels, so on redis-rs's disconnection push the layer waits until
///   every primary answers `PING` and then `SSUBSCRIBE`s again to
///   everything it needs (a repeated `SSUBSCRIBE` is harmless);
/// * when a slot migrates, the old owner ends its shard subscriptions with
///   `SUNSUBSCRIBE` pushes; the layer subscribes again to each one it still
///   needs, which redis-rs routes to the new owner;
/// * a subscription that failed (its shard was down) is retried in the
///   background with backoff (50 ms doubling up to 1 s) until it succeeds
///   or is no longer needed.
///
/// While a shard is down, operations on its slots fail within the timeout
/// with a [`ChannelLayerError::Backend`] naming the group or channel and the
/// key (`group send to "lobby" (key "myapp:group:{lobby}") failed: ...`); the
/// other shards keep working (set `cluster-require-full-coverage no` on
/// the servers, otherwise Redis itself refuses every command once the
/// cluster marks the shard as failed). Delivery semantics are those of the
/// Redis layer: at most once, except in history groups; messages of other
/// groups published while a process is not subscribed on a shard are lost
/// for it.
///
/// The layer needs Redis 7 (`SPUBLISH`/`SSUBSCRIBE`), `EVALSHA`, list,
/// sorted-set, hash and stream commands, `SCAN` (only for [`flush`](ChannelLayer::flush)),
/// and RESP3 (set for you).
///
/// # Known issue
///
/// While a node is down, redis-rs's cluster connection recovers from the
/// lost node in the same task that forwards push messages; in our tests
/// (`chat_survives_node_restarts`) messages from the *healthy* shards could
/// be held up (or, rarely, lost) until the dead node came back. A layer
/// built on one plain connection per node would avoid that; it was not
/// built here because redis-rs does everything else (routing, redirects,
/// re-subscription) right.
///
/// # Limits
///
/// redis-rs keeps an unbounded queue between a node connection and the
/// task that hands push messages to this layer; the layer drains it without
/// waiting (fan-out never blocks), and Redis's own `client-output-buffer-limit
/// pubsub` disconnects a client that falls too far behind.
/// History events go from there to the sequencer's task through a queue
/// of at most 16 MiB of payloads; past it an event is dropped (counted in
/// `dropped_other`) and read back from the group's stream when the group's
/// next event shows the gap; until then it is missing here.
///
/// Cloning is cheap and shares the connections and local state (a clone is
/// the same "process"). Dropping the last clone closes the connections.
#[derive(Clone)]
pub struct RedisClusterChannelLayer {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisClusterChannelLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisClusterChannelLayer")
            .field("prefix", &self.inner.config.prefix)
            .field("process", &self.inner.process())
            .field("capacity", &self.inner.config.capacity)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl RedisClusterChannelLayer {
    /// Connects with every default. `urls` are seed nodes such as
    /// `redis://127.0.0.1:7000`; one reachable node is enough.
    pub async fn connect<I, S>(urls: I) -> Result<Self, ChannelLayerError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::builder(urls).build().await
    }

    /// A builder to set the prefix, capacity, expiries, timeout, history and
    /// presence before connecting.
    pub fn builder<I, S>(urls: I) -> RedisClusterChannelLayerBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RedisClusterChannelLayerBuilder {
            urls: urls.into_iter().map(Into::into).collect(),
            prefix: DEFAULT_PREFIX.to_owned(),
            capacity: DEFAULT_CAPACITY,
            group_expiry: DEFAULT_GROUP_EXPIRY,
            expiry: DEFAULT_EXPIRY,
            timeout: DEFAULT_TIMEOUT,
            history: Vec::new(),
            presence: PresenceConfig::new(),
        }
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.config.prefix
    }

    /// This instance's process name, `specific.<token>`.
    pub fn process_name(&self) -> &str {
        self.inner.process()
    }

    /// Events a channel holds.
    pub fn capacity(&self) -> usize {
        self.inner.config.capacity
    }

    /// Whether every node answered the last health check and every wanted
    /// subscription is confirmed (false while a shard is down or a
    /// subscription is being retried).
    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }

    /// The key (and shard channel) that holds `group`; its slot is the one
    /// of the group name. Useful to see where a group lives
    /// (`CLUSTER KEYSLOT`).
    pub fn group_key(&self, group: &str) -> String {
        self.inner.config.group_key(group)
    }

    /// Number of this process's channels in `group`.
    pub fn local_group_len(&self, group: &str) -> usize {
        self.inner.registry.group_len(group)
    }

    /// Number of this process's channels that have a receiver.
    pub fn channel_count(&self) -> usize {
        self.inner.registry.channel_count()
    }
}

#[derive(Debug)]
struct Keys {
    prefix: String,
    /// `{prefix}:group:{`
    group_prefix: String,
    capacity: usize,
    group_expiry: Duration,
    expiry: Duration,
    timeout: Duration,
}

impl Keys {
    fn group_key(&self, group: &str) -> String {
        format!("{}{group}}}", self.group_prefix)
    }

    /// The group a shard channel belongs to, if it is a group's.
    fn group_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(self.group_prefix.as_str())?
            .strip_suffix('}')
    }

    fn list_key(&self, channel: &str) -> String {
        format!("{}:channel:{{{channel}}}", self.prefix)
    }

    fn proc_key(&self, process: &str) -> String {
        format!("{}:proc:{{{process}}}", self.prefix)
    }
}

struct Inner {
    config: Keys,
    /// `{prefix}:proc:{<process>}`.
    proc_channel: String,
    /// Makes one connection per worker receiver (longer response timeout for `BRPOP`).
    worker_client: ClusterClient,
    /// Commands.
    conn: ClusterConnection,
    /// Shard subscriptions; its pushes come to [`Inner::push`].
    pubsub: ClusterConnection,
    send: LuaScript,
    group_send: LuaScript,
    /// [`history_send_script`].
    history_send: LuaScript,
    /// Presence and history, shared with the single-node layer.
    shared: Shared,
    /// History events read from pushes, on their way to the sequencer.
    received: subscriber::Received,
    next_request: AtomicU64,
    /// This process's channels; its process name is `specific.<token>`.
    registry: Registry,
    /// Groups whose `SSUBSCRIBE` was confirmed (and not ended since).
    subscribed: Mutex<HashSet<String>>,
    connected: AtomicBool,
    pending: Mutex<HashMap<u64, oneshot::Sender<u8>>>,
    commands: mpsc::UnboundedSender<Command>,
    counters: Arc<Counters>,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner")
            .field("config", &self.config)
            .field("head", &self.process())
            .finish_non_exhaustive()
    }
}

impl LocalChannels for Inner {
    fn registry(&self) -> &Registry {
        &self.registry
    }

    fn capacity(&self) -> usize {
        self.config.capacity
    }

    fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Unsubscribes from the groups left without a local member, and
    /// removes the channel's presence.
    fn forgotten(self: &Arc<Self>, channel: &str, emptied: Vec<String>) {
        for group in emptied {
            let _ = self.commands.send(Command::Sync { group, ack: None });
        }
        presence::forget(self, channel);
    }
}

impl Host for Inner {
    fn shared(&self) -> &Shared {
        &self.shared
    }

    fn query_raw<T: FromRedisValue + Send>(
        &self,
        cmd: &Cmd,
    ) -> impl std::future::Future<Output = Result<T, QueryError>> + Send {
        let mut conn = self.conn.clone();
        within(self.config.timeout, async move {
            cmd.query_async::<T>(&mut conn).await
        })
    }

    fn group_send_plain(
        &self,
        group: &str,
        event: &Event,
    ) -> impl std::future::Future<Output = Result<GroupSendReport, ChannelLayerError>> + Send {
        Inner::group_send_plain(self, group, event)
    }
}

impl Inner {
    async fn route(
        &self,
        what: &str,
        cmd: Cmd,
        routing: RoutingInfo,
    ) -> Result<Value, ChannelLayerError> {
        let mut conn = self.conn.clone();
        within(self.config.timeout, conn.route_command(cmd, routing))
            .await
            .map_err(|e| e.context(what))
    }

    /// Loads the scripts on every primary (`SCRIPT LOAD` to all of them).
    async fn load_scripts(&self) -> Result<(), ChannelLayerError> {
        let own = [&self.send, &self.group_send, &self.history_send];
        for script in own.into_iter().chain(self.shared.all_scripts()) {
            let mut load = redis::cmd("SCRIPT");
            load.arg("LOAD").arg(script.code);
            let sha = self
                .route(
                    "loading a Lua script",
                    load,
                    RoutingInfo::MultiNode((
                        MultipleNodeRoutingInfo::AllMasters,
                        Some(ResponsePolicy::AllSucceeded),
                    )),
                )
                .await?;
            *lock(&script.sha) = String::from_redis_value(sha)
                .map_err(|e| BackendError::Redis("loading a Lua script".into(), e.into()))?;
        }
        Ok(())
    }

    async fn spublish(&self, channel: &str, payload: &[u8]) -> Result<usize, ChannelLayerError> {
        self.query(
            &format!("SPUBLISH to {channel:?}"),
            redis::cmd("SPUBLISH").arg(channel).arg(payload),
        )
        .await
    }

    fn has_local_members(&self, group: &str) -> bool {
        self.registry.group_len(group) > 0
    }

    /// Makes the subscription of `group` match local membership, waiting
    /// for the subscriber task.
    async fn sync_group(&self, group: &str) -> Result<(), ChannelLayerError> {
        if lock(&self.subscribed).contains(group) == self.has_local_members(group) {
            return Ok(());
        }
        let (ack, done) = oneshot::channel();
        self.commands
            .send(Command::Sync {
                group: group.to_owned(),
                ack: Some(ack),
            })
            .map_err(|_| BackendError::SubscriberStopped)?;
        shared::wait_ack(
            done,
            self.config.timeout,
            format!("subscribing to group {group:?}"),
        )
        .await
    }

    async fn remote_membership(
        &self,
        op: u8,
        process: &str,
        group: &str,
        channel: &str,
    ) -> Result<(), ChannelLayerError> {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let payload = Envelope::control(self.process(), op, id, group, channel).to_bytes()?;
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let _cleanup = PendingGuard { inner: self, id };
        if self
            .spublish(&self.config.proc_key(process), &payload)
            .await?
            == 0
        {
            return if op == wire::OP_GROUP_ADD {
                Err(no_such_channel(channel))
            } else {
                Ok(())
            };
        }
        let what = format!("asking process {process:?} to update group {group:?}");
        shared::wait_reply(rx, op, channel, self.config.timeout, what).await
    }

    fn complete_request(&self, id: u64, op: u8) {
        if let Some(tx) = lock(&self.pending).remove(&id) {
            let _ = tx.send(op);
        }
    }

    /// Deletes every key of the prefix on every primary.
    async fn flush_keys(&self) -> Result<(), ChannelLayerError> {
        let primaries = self
            .route(
                "listing the cluster's primaries",
                redis::cmd("PING"),
                RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
            )
            .await?;
        let Value::Map(primaries) = primaries else {
            return Err(BackendError::UnexpectedReply("listing the primaries".into()).into());
        };
        let pattern = format!("{}:*", escape_glob(&self.config.prefix));
        for (addr, _) in primaries {
            let addr = String::from_redis_value(addr)
                .map_err(|e| BackendError::Redis("reading a node address".into(), e.into()))?;
            let Some((host, port)) = addr
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h, p.parse().ok()?)))
            else {
                return Err(BackendError::UnexpectedReply(format!("node address {addr:?}")).into());
            };
            let mut cursor: u64 = 0;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(500);
                let reply = self
                    .route(
                        "SCAN",
                        scan,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.to_owned(),
                            port,
                        }),
                    )
                    .await?;
                let (next, keys): (u64, Vec<Vec<u8>>) = FromRedisValue::from_redis_value(reply)
                    .map_err(|e| BackendError::Redis("reading a SCAN reply".into(), e.into()))?;
                if !keys.is_empty() {
                    // redis-rs splits a multi-key DEL by slot.
                    self.query::<()>("DEL", redis::cmd("DEL").arg(&keys))
                        .await?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }
}

async fn within<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, QueryError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(QueryError::Redis(e)),
        Err(_) => Err(QueryError::Timeout(timeout)),
    }
}

struct PendingGuard<'a> {
    inner: &'a Inner,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.inner.pending).remove(&self.id);
    }
}

impl ChannelLayer for RedisClusterChannelLayer {
    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
            .with(Feature::Presence)
            .with(Feature::History)
            .with(Feature::NamedGroupMembers)
            .with(Feature::CrossProcess)
    }

    fn new_channel(&self) -> BoxFuture<'_, Result<ChannelReceiver, ChannelLayerError>> {
        Box::pin(std::future::ready(self.inner.new_process_channel()))
    }

    fn receive<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<ChannelReceiver, ChannelLayerError>> {
        Box::pin(async move {
            let inner = &self.inner;
            match inner.receive_local(channel)? {
                Some(rx) => Ok(rx),
                None => worker::start(inner, channel).await,
            }
        })
    }

    fn send<'a>(
        &'a self,
        channel: &'a str,
        event: Event,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        Box::pin(async move {
            validate_channel_name(channel)?;
            let inner = &self.inner;
            let process = match inner.registry.owner(channel) {
                Owner::Local => return inner.registry.send(channel, event),
                Owner::Process(process) => Some(process),
                Owner::Named => None,
            };
            let payload =
                wire::event_envelope(inner.process(), wire::OP_CHANNEL_EVENT, "", channel, &event)?;
            match process {
                Some(process) => {
                    match inner
                        .spublish(&inner.config.proc_key(process), &payload)
                        .await?
                    {
                        0 => Err(no_such_channel(channel)),
                        _ => Ok(()),
                    }
                }
                None => inner.push_list(channel, &payload).await,
            }
        })
    }

    fn group_add<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        Box::pin(async move {
            validate_group_name(group)?;
            validate_channel_name(channel)?;
            let inner = &self.inner;
            match inner.registry.owner(channel) {
                Owner::Local => {
                    inner.registry.group_add(group, channel)?;
                    inner.sync_group(group).await
                }
                Owner::Process(process) => {
                    inner
                        .remote_membership(wire::OP_GROUP_ADD, process, group, channel)
                        .await
                }
                Owner::Named => {
                    let key = inner.config.group_key(group);
                    let mut pipe = redis::pipe();
                    pipe.atomic()
                        .cmd("ZADD")
                        .arg(&key)
                        .arg(unix_now())
                        .arg(channel)
                        .ignore()
                        .cmd("EXPIRE")
                        .arg(&key)
                        .arg(inner.config.group_expiry.as_secs())
                        .ignore();
                    let mut conn = inner.conn.clone();
                    within(inner.config.timeout, pipe.query_async::<()>(&mut conn))
                        .await
                        .map_err(|e| e.context(&format!("ZADD to group {group:?} (key {key:?})")))
                }
            }
        })
    }

    fn group_discard<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        Box::pin(async move {
            validate_group_name(group)?;
            validate_channel_name(channel)?;
            let inner = &self.inner;
            match inner.registry.owner(channel) {
                Owner::Local => {
                    inner.registry.group_discard(group, channel);
                    let synced = inner.sync_group(group).await;
                    presence::leave(&**inner, group, channel).await?;
                    synced
                }
                Owner::Process(process) => {
                    inner
                        .remote_membership(wire::OP_GROUP_DISCARD, process, group, channel)
                        .await
                }
                Owner::Named => {
                    let key = inner.config.group_key(group);
                    inner
                        .query::<()>(
                            &format!("ZREM from group {group:?} (key {key:?})"),
                            redis::cmd("ZREM").arg(&key).arg(channel),
                        )
                        .await
                }
            }
        })
    }

    fn group_send<'a>(
        &'a self,
        group: &'a str,
        event: Event,
    ) -> BoxFuture<'a, Result<GroupSendReport, ChannelLayerError>> {
        Box::pin(async move {
            validate_group_name(group)?;
            let inner = &self.inner;
            match history::policy(&**inner, group, &event) {
                Some(policy) => inner.group_send_with_history(group, &event, policy).await,
                None => inner.group_send_plain(group, &event).await,
            }
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ChannelLayerError>> {
        Box::pin(async move {
            let inner = &self.inner;
            inner.registry.clear();
            inner.shared.clear();
            let (ack, done) = oneshot::channel();
            inner
                .commands
                .send(Command::SyncAll { ack })
                .map_err(|_| BackendError::SubscriberStopped)?;
            shared::wait_ack(
                done,
                inner.config.timeout,
                "unsubscribing from every group".into(),
            )
            .await?;
            inner.flush_keys().await
        })
    }

    fn stats(&self) -> ChannelLayerStats {
        self.inner.counters.stats()
    }

    fn presence_join<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
        info: PresenceInfo,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        Box::pin(presence::join(self, &*self.inner, group, channel, info))
    }

    fn presence<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Vec<PresenceMember>, ChannelLayerError>> {
        Box::pin(presence::list(&*self.inner, group))
    }

    fn recover<'a>(
        &'a self,
        group: &'a str,
        since: &'a StreamPosition,
    ) -> BoxFuture<'a, Result<Recovery, ChannelLayerError>> {
        Box::pin(history::recover(&*self.inner, group, since))
    }
}

impl Inner {
    /// A group send to a group without history: one script on the group's
    /// slot publishes it and lists the named members, whose lists are then
    /// pushed to; local members get it directly, first.
    async fn group_send_plain(
        &self,
        group: &str,
        event: &Event,
    ) -> Result<GroupSendReport, ChannelLayerError> {
        let payload = wire::event_envelope(self.process(), wire::OP_GROUP_EVENT, group, "", event)?;
        let key = self.config.group_key(group);
        let subscribed_before = lock(&self.subscribed).contains(group);
        // This process ignores its own publication and delivers here,
        // first: its members never wait for (or miss) a shard round trip.
        let (delivered, dropped) = self.fan_out(group, event);
        let (receivers, named): (usize, Vec<String>) = self
            .eval(
                &format!("group send to {group:?} (key {key:?})"),
                &self.group_send,
                &[&key],
                |c| {
                    c.arg(unix_now())
                        .arg(self.config.group_expiry.as_secs())
                        .arg(&payload);
                },
            )
            .await?;
        let (pushed, full) = self.push_named(&named, &payload).await?;
        self.counters.group_sent(dropped + full);
        let own = usize::from(subscribed_before || lock(&self.subscribed).contains(group));
        Ok(GroupSendReport {
            position: None,
            local_members: delivered,
            remote_receivers: Some(receivers.saturating_sub(own) + pushed),
            dropped: dropped + full,
        })
    }

    /// A group send to a group with history: one script on the group's
    /// slot appends the event to the group's stream and publishes it with
    /// its offset; local members get it once the offset is known, through
    /// the sequencer ([`history::deliver_own`]); named members' lists are
    /// pushed to afterwards (they live on their own slots).
    async fn group_send_with_history(
        &self,
        group: &str,
        event: &Event,
        policy: &HistoryPolicy,
    ) -> Result<GroupSendReport, ChannelLayerError> {
        let encoded = event.encode()?;
        let payload = wire::event_envelope(self.process(), wire::OP_GROUP_EVENT, group, "", event)?;
        let keys = history::send_keys(self, group, self.config.group_key(group));
        let subscribed_before = lock(&self.subscribed).contains(group);
        let local_members = self.registry.group_len(group);
        let fresh = history::new_epoch();
        let (receivers, named, offset, epoch): (usize, Vec<String>, u64, String) = self
            .eval(
                &format!("group send to {group:?} (key {:?})", keys[0]),
                &self.history_send,
                &keys.each_ref().map(String::as_str),
                |c| {
                    c.arg(unix_now()).arg(self.config.group_expiry.as_secs());
                    history::history_args(c, self.process(), group, &encoded, policy, &fresh);
                },
            )
            .await?;
        let position = StreamPosition::new(offset, epoch);
        history::deliver_own(self, group, event, &position, local_members).await;
        let (pushed, full) = self.push_named(&named, &payload).await?;
        self.counters.group_sent(full);
        let own = usize::from(subscribed_before || lock(&self.subscribed).contains(group));
        Ok(GroupSendReport {
            local_members,
            remote_receivers: Some(receivers.saturating_sub(own) + pushed),
            dropped: full,
            position: Some(position),
        })
    }

    /// Pushes a group send to its named members' lists; returns (pushed, full).
    async fn push_named(
        &self,
        named: &[String],
        payload: &[u8],
    ) -> Result<(usize, usize), ChannelLayerError> {
        let (mut pushed, mut full) = (0, 0);
        for member in named {
            match self.push_list(member, payload).await {
                Ok(()) => pushed += 1,
                Err(e) if e.is_channel_full() => full += 1,
                Err(e) => return Err(e),
            }
        }
        Ok((pushed, full))
    }

    /// `LPUSH` onto a named channel's list unless it is full.
    async fn push_list(&self, channel: &str, payload: &[u8]) -> Result<(), ChannelLayerError> {
        let key = self.config.list_key(channel);
        let pushed: i64 = self
            .eval(
                &format!("LPUSH to channel {channel:?} (key {key:?})"),
                &self.send,
                &[&key],
                |c| {
                    c.arg(payload)
                        .arg(self.config.capacity)
                        .arg(self.config.expiry.as_secs());
                },
            )
            .await?;
        if pushed == 0 {
            Err(ChannelLayerError::ChannelFull {
                channel: channel.to_owned(),
            })
        } else {
            Ok(())
        }
    }
}

/// A Lua script and the SHA1 Redis knows it by once loaded.
#[derive(Debug)]
pub(super) struct LuaScript {
    code: &'static str,
    sha: Mutex<String>,
}

impl LuaScript {
    fn new(code: &'static str) -> Self {
        Self {
            code,
            sha: Mutex::default(),
        }
    }

    /// A script made of `parts`, one per line, joined once into `source`
    /// (the caller's own static).
    fn composed(source: &'static OnceLock<String>, parts: &[&str]) -> Self {
        Self::new(source.get_or_init(|| parts.join("\n")))
    }
}

#[derive(Debug)]
enum QueryError {
    Redis(redis::RedisError),
    Timeout(Duration),
}

impl QueryError {
    fn context(self, what: &str) -> ChannelLayerError {
        match self {
            QueryError::Redis(e) => BackendError::Redis(format!("Redis {what} failed"), e).into(),
            QueryError::Timeout(d) => BackendError::Timeout(format!("Redis {what}"), d).into(),
        }
    }
}

/// A backend failure, wrapped in [`ChannelLayerError::Backend`]. The
/// `String`s say what was being done; causes are typed `source`s.
#[derive(Debug, thiserror::Error)]
enum BackendError {
    #[error("{0}")]
    Redis(String, #[source] redis::RedisError),
    #[error("{0} timed out after {1:?} (is Redis reachable?)")]
    Timeout(String, Duration),
    /// The builder was given settings that cannot work.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    /// A Lua script answered something it never returns.
    #[error("malformed reply of the {0} script")]
    MalformedReply(&'static str),
    /// The layer's Pub/Sub task ended (the runtime is shutting down).
    #[error("the Redis subscriber task has stopped")]
    SubscriberStopped,
    /// The Pub/Sub task could not do what was asked.
    #[error("{0}")]
    Subscriber(String, #[source] SubscriberError),
    /// Another process answered a membership change with a failure.
    #[error("{0}: it could not subscribe")]
    RemoteFailed(String),
    /// A reply that does not have the shape the command returns.
    #[error("unexpected reply: {0}")]
    UnexpectedReply(String),
    /// Another process dropped a membership request unanswered.
    #[error("{0}: no reply")]
    NoReply(String),
}

impl From<BackendError> for ChannelLayerError {
    fn from(e: BackendError) -> Self {
        ChannelLayerError::backend(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys {
            prefix: "app".into(),
            group_prefix: "app:group:{".into(),
            capacity: 1,
            group_expiry: Duration::from_secs(1),
            expiry: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn keys_carry_hash_tags() {
        let k = keys();
        assert_eq!(k.group_key("lobby"), "app:group:{lobby}");
        assert_eq!(k.group_of("app:group:{lobby}"), Some("lobby"));
        assert_eq!(k.group_of("app:proc:{specific.x}"), None);
        assert_eq!(k.list_key("jobs"), "app:channel:{jobs}");
        assert_eq!(k.proc_key("specific.x"), "app:proc:{specific.x}");
        // The slot is the group name's, whatever the prefix.
        let slot = |key: &str| redis::cluster_routing::Slot::for_key(key);
        assert_eq!(slot(&k.group_key("lobby")), slot("lobby"));
        // So do the history's and presence's keys, and every presence key
        // the scripts derive from the base.
        let g = GroupKeys::hash_tagged("app");
        for key in [
            g.stream("lobby"),
            g.meta("lobby"),
            format!("{}:procs", g.presence_base("lobby")),
            format!("{}:u:specific.x", g.presence_base("lobby")),
        ] {
            assert_eq!(slot(&key), slot("lobby"), "{key}");
        }
    }

    #[tokio::test]
    async fn bad_config_is_refused() {
        for prefix in ["", "a{b", "a}b"] {
            let err = RedisClusterChannelLayer::builder(["redis://127.0.0.1:1"])
                .prefix(prefix)
                .build()
                .await
                .unwrap_err();
            assert!(
                crate::channel_layer::error::error_chain(&err).contains("prefix"),
                "{err:?}"
            );
        }
        let none: [&str; 0] = [];
        let err = RedisClusterChannelLayer::connect(none).await.unwrap_err();
        assert!(
            crate::channel_layer::error::error_chain(&err).contains("no Redis Cluster seed URL"),
            "{err:?}"
        );
        let started = std::time::Instant::now();
        let err = RedisClusterChannelLayer::builder(["redis://127.0.0.1:1"])
            .timeout(Duration::from_millis(300))
            .build()
            .await
            .unwrap_err();
        assert!(matches!(err, ChannelLayerError::Backend(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
