//! A channel layer on Redis that spans processes (feature `redis`).
//!
//! [`RedisChannelLayer`] lets consumers in several server processes (or
//! machines) share groups and send to each other, like Django's
//! `channels_redis` `RedisPubSubChannelLayer`.
//!
//! ```
//! use std::{sync::Arc, time::Duration};
//! use tower_channels::channel_layer::redis::RedisChannelLayer;
//! use tower_channels::channel_layer::{BoxError, ChannelLayer, Event};
//!
//! async fn doc_main() -> Result<(), BoxError> {
//!     // `RedisChannelLayer::connect(url)` takes every default.
//!     let layer = RedisChannelLayer::builder("redis://127.0.0.1:6379")
//!         .prefix("myapp") // keys and Pub/Sub channels start with "myapp:"
//!         .capacity(100) // events a channel holds before sends fail or drop
//!         .group_expiry(Duration::from_secs(24 * 3600))
//!         .build()
//!         .await?;
//!     let layer: Arc<dyn ChannelLayer> = Arc::new(layer);
//!
//!     // A connection's channel, and a group it joins:
//!     let mut inbox = layer.new_channel().await?;
//!     layer.group_add("lobby", inbox.name()).await?;
//!
//!     // From any process sharing the Redis server and prefix:
//!     layer.group_send("lobby", Event::text("chat.message", "hello")).await?;
//!     let event = inbox.recv().await?;
//!     assert_eq!(event.kind(), "chat.message");
//!
//!     // A worker channel, load-balanced across the processes receiving it:
//!     let mut jobs = layer.receive("thumbnails").await?;
//!     layer.send("thumbnails", Event::bare("thumbnail.make")).await?;
//!     assert_eq!(jobs.recv().await?.kind(), "thumbnail.make");
//!     Ok(())
//! }
//! ```
//!
//! # How it works
//!
//! The protocol is the mesh's, shared with the other layers that span
//! processes ([`NatsChannelLayer`](super::nats) runs the same one): each
//! instance (normally one per process) keeps the same local state as
//! [`InMemoryChannelLayer`](super::InMemoryChannelLayer), its channels and
//! which of them belong to which group, and Redis only carries traffic
//! between processes, so a fan-out costs O(processes), not O(members).
//! This module is only the Redis side: `PUBLISH`, a Pub/Sub task, Lua
//! scripts for histories, presence and named members, and lists for named
//! channels.
//!
//! * **Process channels.** Every instance gets a random process name
//!   `specific.<token>` and [`new_channel`](ChannelLayer::new_channel) names
//!   its channels `specific.<token>!<n>` (Django's process-specific channel
//!   names). The instance subscribes once to the Pub/Sub channel
//!   `{prefix}.proc.specific.<token>`. A [`send`](ChannelLayer::send) to
//!   such a name from another process is a request published there, which
//!   that process answers, so the sender gets
//!   [`ChannelLayerError::ChannelFull`] and
//!   [`ChannelLayerError::NoSuchChannel`] exactly; when Redis reports no
//!   subscriber (the process is gone) the send fails with `NoSuchChannel`
//!   at once. Sends to a channel of the sending instance never touch Redis.
//! * **Groups.** An instance subscribes to `{prefix}.group.{group}` while at
//!   least one of its channels is a member. [`group_send`](ChannelLayer::group_send)
//!   hands the event to the sending instance's own members first (they
//!   never wait for, or miss, Redis), then `PUBLISH`es it once; every other
//!   subscribed process hands it to its local members without waiting (a
//!   full member drops it, is counted and sees
//!   [`RecvError::Lagged`](super::RecvError::Lagged)).
//!   [`GroupSendReport::remote_receivers`](super::GroupSendReport::remote_receivers) counts the other processes
//!   Redis handed it to.
//! * **Named channels** without `!` (worker channels such as `"thumbnails"`,
//!   consumed with [`receive`](ChannelLayer::receive)) are Redis lists
//!   `{prefix}:channel:{name}`: a send is an `LPUSH` (refused with
//!   [`ChannelLayerError::ChannelFull`] when the list holds `capacity`
//!   events; the list expires `expiry` after the last push), and each receiver
//!   runs a `BRPOP` loop on its own connection, popping only when it has
//!   room, so each event goes to exactly one receiver across all processes.
//! * **Membership.** [`group_add`](ChannelLayer::group_add) and
//!   [`group_discard`](ChannelLayer::group_discard) on a channel of this
//!   instance change local state and (un)subscribe before returning. On a
//!   channel of another process they ask that process and wait for its
//!   reply. Dropping a receiver removes its channel from every group at
//!   once, and a group with no local member left is unsubscribed.
//!   Memberships of process channels are never stored in Redis: when a
//!   process crashes its subscriptions vanish with its connection. Named
//!   channels can be group members too: those memberships are kept in the
//!   sorted set `{prefix}:group:{group}` (scored by when each expires,
//!   `group_expiry` after it was last added), read alongside each group
//!   send, which pushes the event onto each member's list (counted in
//!   `remote_receivers`, or in `dropped` when the list is full).
//!
//! # Presence
//!
//! Per group, with `{base}` = `{prefix}:presence:{group}`: the sorted set
//! `{base}:procs` scores each process that wrote presence there by when its
//! liveness expires (Redis's clock, so the processes' clocks do not
//! matter), and the hash `{base}:users` maps each user to its connections
//! (MessagePack `[[process, channel, entry], ...]`). A join or a leave
//! rewrites one user's field; every third of [`PresenceConfig::ttl`] a live
//! process renews its liveness in the groups it has members in (and both
//! keys' expiry, twice the TTL). A listing keeps the connections of live
//! processes, so a crashed process's members disappear within the TTL; the
//! first live process to find it dead afterwards (a `SET NX` claim decides
//! which) removes its entries and announces the users who left with it.
//! After Redis lost the keys (flush, restart) each process writes its
//! entries again at once when its Pub/Sub connection comes back, and on its
//! next refresh otherwise. Joins and leaves are announced once per user
//! across processes, as the mesh does for every broker.
//!
//! # History and recovery
//!
//! For a group with a [`HistoryPolicy`] (every process must configure the
//! same ones), [`group_send`](ChannelLayer::group_send) runs one script
//! that increments the group's offset, appends the event to the capped
//! stream `{prefix}:history:{group}` (`XADD ... MAXLEN n`, entry id
//! `{offset}-0`) and `PUBLISH`es it with its offset and epoch on
//! `{prefix}.hlive.{group}`, so two processes sending to one group can
//! never interleave offsets and payloads. The epoch and last offset are
//! kept in the hash `{prefix}:history-meta:{group}`; both keys expire
//! [`ttl`](HistoryPolicy::ttl) after the last send, and when either is
//! missing (expired, evicted, Redis flushed or restarted without
//! persistence) the next send starts a new random epoch at offset 1, so
//! old positions fail to recover with
//! [`RecoveryFailure::EpochChanged`](super::RecoveryFailure::EpochChanged)
//! instead of silently skipping events.
//!
//! Each process delivers a group's history events to its members in
//! offset order, each once, whichever way they arrive: the sending
//! process hands the event to its own members as soon as the script
//! answered with the offset (it does not depend on its own Pub/Sub copy),
//! other processes get it through Pub/Sub. When the offsets a process sees
//! jump, it reads the missing ones from the stream first; when the epoch
//! changes it reads the new epoch from its first offset; after its Pub/Sub
//! connection comes back it reads what every history group missed. When a
//! process subscribes to a history group it first reads the group's
//! position, so events sent while it subscribes are read, not missed.
//! [`recover`](ChannelLayer::recover) reads the stream in one script.
//!
//! What this cannot give back: an event Redis acknowledged to its sender
//! but had not yet written to another process's Pub/Sub connection when it
//! died, on a Redis without persistence (the stream went with it). The
//! sender's own members have it; with `appendonly yes` and `appendfsync
//! always` the other processes read it back after the restart too
//! (`tests/redis_faults.rs` tests both).
//!
//! # Delivery semantics
//!
//! At most once, as in Django Channels: an event is delivered once or lost,
//! never duplicated. Events of groups without history published while a
//! process is disconnected from Redis are lost for that process, and so
//! are events queued in Redis lists when a Redis server without
//! persistence restarts (with the named-channel memberships stored there).
//! A process too slow to read its Pub/Sub traffic is disconnected by Redis
//! (`client-output-buffer-limit pubsub`), reconnects, and loses what was
//! published in between (history groups read it back).
//!
//! ## Timeouts: "timed out" means "unknown"
//!
//! A command that times out was sent and may still run: with Redis stalled
//! (paused, swapping, a long script), a [`group_send`](ChannelLayer::group_send)
//! fails after the timeout, then Redis runs the queued `PUBLISH` and the
//! other processes' members get the event, once. The same holds for a
//! connection that breaks while a command is in flight. So an error from a
//! send means "delivered to some, all or none of the members elsewhere",
//! never "delivered twice": nothing here resends a command that may have
//! reached Redis. This process's own members got a group send before Redis
//! was asked, error or not (except in history groups, see below).
//!
//! ## Order
//!
//! Every command goes over one multiplexed connection, in the order sent,
//! and each process's Pub/Sub task hands messages on in the order Redis
//! delivers. So events one task sends (awaiting each) reach every member in
//! that order, local and remote; events from different senders are not
//! ordered (in a history group they are, by offset).
//!
//! # Faults
//!
//! Every Redis command has a timeout (2 s by default, see
//! [`RedisChannelLayerBuilder::timeout`]), so while Redis is unreachable
//! sends fail promptly with [`ChannelLayerError::Backend`] instead of
//! hanging. A command refused because the connection manager's last
//! reconnect failed (it had never reached Redis) is tried once more, on a
//! fresh connection, within the same timeout: the first command after Redis
//! comes back succeeds instead of reporting the outage that just ended. One
//! background task owns the Pub/Sub connection; when it breaks (Redis
//! restarted, network failure, a missed health-check `PING`) the task
//! reconnects with exponential backoff (50 ms doubling up to 1 s),
//! subscribes again to everything it was subscribed to, and then the layer
//! reads back what its history groups missed and writes its presence again.
//! Command connections are re-established the same way by redis-rs's
//! [`ConnectionManager`], and worker receivers by their own loop.
//!
//! While Redis is unreachable a group send fails (its members in this
//! process still get the event, except in history groups: there the offset
//! comes from Redis, so nobody gets an event whose send failed before
//! Redis assigned one), and so does a direct send to another
//! process or a named channel; sends to channels of the same instance keep
//! working. A [`group_add`](ChannelLayer::group_add) of a local channel
//! waits, within the timeout, for the Pub/Sub connection to come back (it
//! is retried at once instead of after the full backoff) and then succeeds;
//! if Redis stays away it fails, but the subscription is made on
//! reconnection.
//!
//! The layer needs `PUBLISH`/`SUBSCRIBE`, `EVAL`/`EVALSHA` (small Lua
//! scripts, with Redis's `cmsgpack`), list, hash, sorted-set and stream
//! commands (Redis 5 or later). It does not run on a Redis Cluster (a
//! script publishes on a channel it does not declare); use a single
//! primary, optionally behind Sentinel, or `RedisClusterChannelLayer`
//! (feature `redis-cluster`), which uses the cluster's sharded Pub/Sub.
//!
//! # Flush
//!
//! [`flush`](ChannelLayer::flush) also deletes every key under the prefix
//! (the mesh store's `clear`: one `SCAN` and `DEL`
//! per batch): histories start new epochs, presence lists nobody, named
//! channels leave their groups and the events queued in their lists are
//! dropped, for every process sharing the prefix. A process that still has
//! presence members writes them again on its next refresh.
//!
//! # Wire format
//!
//! Every Pub/Sub message is the mesh's MessagePack envelope
//! `[origin, seq, op]`, whose operation carries an event in the [channel
//! layer wire format](super#wire-format), except on the live channels of
//! history groups, `{prefix}.hlive.{group}`: there a message is
//! `{offset}:{epoch}:` followed by the encoded event. A named channel's
//! list holds encoded events. Pub/Sub channels are `{prefix}.proc.{process}`,
//! `{prefix}.group.{group}` and `{prefix}.hlive.{group}`; keys are
//! `{prefix}:channel:{name}`, `{prefix}:group:{group}` and those of
//! [presence](#presence) and [history](#history-and-recovery).
//!
//! # Why redis-rs
//!
//! [redis-rs](https://docs.rs/redis) is the most used Redis client for Rust and the only one with both a
//! multiplexed, self-reconnecting command connection
//! ([`ConnectionManager`]) and an async
//! Pub/Sub connection that can subscribe while messages stream in
//! ([`PubSub::split`](::redis::aio::PubSub::split)), on tokio, with TLS,
//! Sentinel and RESP3 available behind its own features.

#[cfg(feature = "redis-cluster")]
mod cluster;
mod queue;
mod store;
mod transport;

#[cfg(feature = "redis-cluster")]
pub use self::cluster::{RedisClusterChannelLayer, RedisClusterChannelLayerBuilder};

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redis::{
    aio::{ConnectionLike, ConnectionManager},
    FromRedisValue, RedisError, Script, ScriptInvocation,
};

use self::{
    queue::{Connector, RedisQueues},
    store::RedisStore,
    transport::RedisTransport,
};
use super::{
    local::Counters,
    mesh::{Inbox, MeshConfig, MeshLayer, TransportError},
    redis_keys::{self, Keyspace},
    redis_pubsub::{command_connection, connect_bound, SubscriberError},
    BoxFuture, ChannelLayer, ChannelLayerError, HistoryPolicy, PresenceConfig, DEFAULT_CAPACITY,
};

/// The default key prefix.
pub(crate) const DEFAULT_PREFIX: &str = "tower-channels";
/// How long a named channel's membership of a group lasts unless renewed
/// (Django's default: one day).
pub(crate) const DEFAULT_GROUP_EXPIRY: Duration = Duration::from_secs(86_400);
/// How long events wait in a named channel's list after the last push.
pub(crate) const DEFAULT_EXPIRY: Duration = Duration::from_secs(60);
/// The default timeout of each Redis command.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// `KEYS[1]` list; `ARGV`: payload, capacity, expiry (s). Returns 1 if
/// pushed, 0 if full. A named channel's send on both Redis layers.
const SEND_SCRIPT: &str = r"
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
";

/// Configures and connects a [`RedisChannelLayer`]; made by
/// [`RedisChannelLayer::builder`].
#[derive(Debug, Clone)]
#[must_use = "call .build().await to connect"]
pub struct RedisChannelLayerBuilder {
    url: String,
    prefix: String,
    capacity: usize,
    group_expiry: Duration,
    expiry: Duration,
    timeout: Duration,
    history: Vec<HistoryPolicy>,
    presence: PresenceConfig,
}

impl RedisChannelLayerBuilder {
    /// Keeps a history for the groups `policy` applies to, in Redis (see
    /// [history](self#history-and-recovery)); the first matching policy
    /// wins when called more than once. Every process must use the same
    /// policies.
    pub fn history(mut self, policy: HistoryPolicy) -> Self {
        self.history.push(policy);
        self
    }

    /// Sets which groups get presence notifications and how long a
    /// crashed process's members stay listed (see [presence](self#presence)).
    pub fn presence(mut self, config: PresenceConfig) -> Self {
        self.presence = config;
        self
    }

    /// The prefix of every key and Pub/Sub channel (default
    /// `"tower-channels"`). Applications sharing one Redis server use
    /// different prefixes; processes of one application use the same.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Events a channel holds before direct sends fail with
    /// [`ChannelLayerError::ChannelFull`] and group sends drop (default
    /// [`DEFAULT_CAPACITY`]). Applies to local queues and to named channels'
    /// Redis lists.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// How long a named channel stays in a group after its last
    /// [`group_add`](ChannelLayer::group_add) (default one day).
    pub fn group_expiry(mut self, expiry: Duration) -> Self {
        self.group_expiry = expiry.max(Duration::from_secs(1));
        self
    }

    /// How long events wait in a named channel's list after the last push
    /// (default 60 s).
    pub fn expiry(mut self, expiry: Duration) -> Self {
        self.expiry = expiry.max(Duration::from_secs(1));
        self
    }

    /// The timeout of each Redis command (default 2 s):
    /// how long an operation may take while Redis is unreachable before it
    /// fails.
    ///
    /// It also bounds each wait on an answer: a subscription confirmed by
    /// the Pub/Sub task (which may be reconnecting), and another process's
    /// reply to a direct send or a group change of one of its channels.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(10));
        self
    }

    /// Connects to Redis and subscribes to this process's channel. Fails
    /// when Redis cannot be reached within the timeout.
    pub async fn build(self) -> Result<RedisChannelLayer, ChannelLayerError> {
        if self.prefix.is_empty() {
            return Err(RedisFailure::Config("the Redis key prefix must not be empty").into());
        }
        let client = redis::Client::open(self.url.as_str())
            .map_err(|e| RedisFailure::Redis("invalid Redis URL".into(), e))?;
        let timeout = self.timeout;
        let conn = command_connection(&client, timeout)
            .await
            .map_err(|e| match e {
                Some(e) => RedisFailure::Redis("cannot connect to Redis".into(), e),
                None => RedisFailure::Timeout("connecting to Redis".into(), connect_bound(timeout)),
            })?;
        let counters = Arc::new(Counters::default());
        let (inbox, messages) = Inbox::new();
        let config = MeshConfig {
            prefix: self.prefix,
            capacity: self.capacity,
            timeout,
            history: self.history,
            presence: Some(self.presence),
            named_expiry: self.group_expiry,
        };
        let (store, queues) = storage(conn, client, false, &config, self.expiry);
        let transport = RedisTransport::start(inbox, counters.clone(), store, queues).await?;
        let mesh = MeshLayer::start(transport, messages, config, counters).await?;
        Ok(RedisChannelLayer { mesh })
    }
}

/// A [`ChannelLayer`] on Redis Pub/Sub and lists, for applications that run
/// in several processes. See the [module docs](self).
///
/// Cloning is cheap and shares the connection and local state (a clone is
/// the same "process"). Dropping the last clone closes the connections.
#[derive(Clone)]
pub struct RedisChannelLayer {
    mesh: MeshLayer<RedisTransport>,
}

impl fmt::Debug for RedisChannelLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisChannelLayer")
            .field("prefix", &self.mesh.config().prefix)
            .field("process", &self.process_name())
            .field("capacity", &self.mesh.config().capacity)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl RedisChannelLayer {
    /// Connects with every default (prefix `"tower-channels"`, capacity
    /// [`DEFAULT_CAPACITY`], ...). `url` is a redis-rs URL such as
    /// `redis://127.0.0.1:6379`, `redis://:password@host/2` or `rediss://host`
    /// (TLS needs one of redis-rs's TLS features).
    pub async fn connect(url: &str) -> Result<Self, ChannelLayerError> {
        Self::builder(url).build().await
    }

    /// A builder to set the prefix, capacity, expiries and timeout before connecting.
    pub fn builder(url: impl Into<String>) -> RedisChannelLayerBuilder {
        RedisChannelLayerBuilder {
            url: url.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
            capacity: DEFAULT_CAPACITY,
            group_expiry: DEFAULT_GROUP_EXPIRY,
            expiry: DEFAULT_EXPIRY,
            timeout: DEFAULT_TIMEOUT,
            history: Vec::new(),
            presence: PresenceConfig::new(),
        }
    }

    /// This instance's process name, `specific.<token>`: the part of its
    /// channel names before the `!`.
    pub fn process_name(&self) -> &str {
        self.mesh.process_name()
    }

    /// Whether the Pub/Sub connection is up (false while reconnecting).
    pub fn is_connected(&self) -> bool {
        self.mesh.transport().subscriber.is_connected()
    }
}

/// A Redis failure, wrapped in [`ChannelLayerError::Backend`] (through
/// the mesh's errors where the mesh ran the operation).
#[derive(Debug, thiserror::Error)]
enum RedisFailure {
    #[error("{0}")]
    Redis(String, #[source] RedisError),
    #[error("{0} timed out after {1:?} (is Redis reachable?)")]
    Timeout(String, Duration),
    /// The builder was given settings that cannot work.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    /// A Lua script answered something it never returns.
    #[error("malformed reply of the {0} script")]
    Malformed(&'static str),
    /// The Pub/Sub task ended (the runtime is shutting down).
    #[error("the Redis Pub/Sub task has stopped")]
    Stopped,
    /// A Pub/Sub connection or subscription failed.
    #[error(transparent)]
    PubSub(#[from] SubscriberError),
}

impl From<RedisFailure> for ChannelLayerError {
    fn from(e: RedisFailure) -> Self {
        ChannelLayerError::backend(e)
    }
}

/// A failed command as the mesh sees it: `NotSent` when the connection
/// was refused (the connection manager's last reconnect failed, so the
/// command never reached Redis and the mesh may try it once more, on the
/// connection the manager makes again), else `Failed`.
fn failure(what: &str, e: RedisError) -> TransportError {
    let refused = e.is_connection_refusal();
    let e = RedisFailure::Redis(format!("Redis {what} failed"), e).into();
    if refused {
        TransportError::NotSent(e)
    } else {
        TransportError::Failed(e)
    }
}

/// A command connection the [store](store) and the [named
/// channels](queue) run on: one server ([`ConnectionManager`]) or a
/// cluster (redis-rs's `ClusterConnection`, which routes each command and
/// script call by its first key).
trait Connection: ConnectionLike + Clone + Send + Sync + 'static {
    /// Deletes every key matching `pattern` (on every primary of a cluster).
    fn delete_matching<'a>(&'a self, pattern: &'a str)
        -> BoxFuture<'a, Result<(), TransportError>>;
}

impl Connection for ConnectionManager {
    fn delete_matching<'a>(
        &'a self,
        pattern: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move { redis_keys::delete_matching(&Server(self), pattern).await })
    }
}

/// The keys of the one server `conn` is connected to.
struct Server<'a, C>(&'a C);

impl<C: Connection> Keyspace for Server<'_, C> {
    type Error = TransportError;

    fn scan<'a>(
        &'a self,
        scan: &'a redis::Cmd,
    ) -> BoxFuture<'a, Result<redis_keys::ScanStep, TransportError>> {
        Box::pin(query(self.0, "SCAN", scan))
    }

    fn delete<'a>(&'a self, del: &'a redis::Cmd) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(query(self.0, "DEL", del))
    }
}

/// The names of keys and Pub/Sub channels under a prefix. On one server a
/// key is `{prefix}:{kind}:{name}` and a channel is the mesh's subject
/// `{prefix}.{kind}.{name}`. On a cluster (`sharded`) the name (a group, a
/// named channel, a process) is a hash tag, `{prefix}:{kind}:{<name>}` and
/// `{prefix}.{kind}.{<name>}` (the braces literal), so every key and shard
/// channel of one group hashes to the group's slot, and scripts publish
/// with `SPUBLISH`.
#[derive(Debug, Clone)]
struct Layout {
    prefix: String,
    sharded: bool,
}

impl Layout {
    fn new(prefix: &str, sharded: bool) -> Self {
        Self {
            prefix: prefix.to_owned(),
            sharded,
        }
    }

    fn tagged<'a>(&self, name: &'a str) -> std::borrow::Cow<'a, str> {
        if self.sharded {
            format!("{{{name}}}").into()
        } else {
            name.into()
        }
    }

    /// The key of `kind` for `name`: `{prefix}:{kind}:{name}`, the name
    /// hash-tagged on a cluster.
    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}:{kind}:{}", self.prefix, self.tagged(name))
    }

    /// The Pub/Sub channel of the mesh subject `{prefix}.{kind}.{name}`:
    /// the subject itself, or with the name hash-tagged on a cluster.
    fn channel(&self, subject: &str) -> String {
        if !self.sharded {
            return subject.to_owned();
        }
        let split = subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|s| s.strip_prefix('.'))
            .and_then(|s| s.split_once('.'));
        match split {
            Some((kind, name)) => format!("{}.{kind}.{{{name}}}", self.prefix),
            // Not a mesh subject: no tag (never made by the mesh).
            None => subject.to_owned(),
        }
    }

    /// The mesh subject of a channel [`channel`](Self::channel) made;
    /// `None` for another one. (Only the cluster's subscriptions map
    /// channels back; a single server's are the subjects.)
    #[cfg_attr(not(any(test, feature = "redis-cluster")), allow(dead_code))]
    fn subject(&self, channel: &str) -> Option<String> {
        if !self.sharded {
            return Some(channel.to_owned());
        }
        let (kind, tagged) = channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('.')?
            .split_once('.')?;
        let name = tagged.strip_prefix('{')?.strip_suffix('}')?;
        Some(format!("{}.{kind}.{name}", self.prefix))
    }

    /// The command scripts publish with: `PUBLISH`, `SPUBLISH` on a cluster.
    fn publish(&self) -> &'static str {
        if self.sharded {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }
}

/// The store and the named channels' lists of a Redis layer with
/// `config`, on `conn` (one server, or a cluster when `sharded`); each
/// receiver of a named channel connects with `connector`, and events wait
/// `expiry` in a list after the last push.
fn storage<C: Connection, K: Connector>(
    conn: C,
    connector: K,
    sharded: bool,
    config: &MeshConfig,
    expiry: Duration,
) -> (RedisStore<C>, RedisQueues<C, K>) {
    let layout = Layout::new(&config.prefix, sharded);
    let presence_ttl = config
        .presence
        .as_ref()
        .map(PresenceConfig::time_limit)
        .unwrap_or_default();
    let store = RedisStore::new(
        conn.clone(),
        layout.clone(),
        config.history.clone(),
        presence_ttl,
    );
    let queues = RedisQueues {
        connector,
        conn,
        layout,
        capacity: config.capacity,
        expiry,
        timeout: config.timeout,
        send: Script::new(SEND_SCRIPT),
    };
    (store, queues)
}

/// Sends the command `make` builds (around the answer's sender) to a
/// subscription task (the Pub/Sub task, or the cluster's) and waits for
/// its answer.
async fn ask<C, E>(
    commands: &tokio::sync::mpsc::UnboundedSender<C>,
    make: impl FnOnce(tokio::sync::oneshot::Sender<Result<(), E>>) -> C,
) -> Result<(), TransportError>
where
    RedisFailure: From<E>,
{
    let (ack, done) = tokio::sync::oneshot::channel();
    commands
        .send(make(ack))
        .map_err(|_| TransportError::NotSent(RedisFailure::Stopped.into()))?;
    match done.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(TransportError::Failed(RedisFailure::from(e).into())),
        Err(_) => Err(TransportError::Failed(RedisFailure::Stopped.into())),
    }
}

/// Runs `cmd` (`what`, in errors) on a handle of `conn`.
async fn query<T: FromRedisValue, C: Connection>(
    conn: &C,
    what: &str,
    cmd: &redis::Cmd,
) -> Result<T, TransportError> {
    cmd.query_async(&mut conn.clone())
        .await
        .map_err(|e| failure(what, e))
}

/// Runs `script` (`what`, in errors) on a handle of `conn`, by its SHA1
/// (loading it again where Redis forgot it: on a cluster, on every primary).
async fn invoke<T: FromRedisValue, C: Connection>(
    conn: &C,
    what: &str,
    script: &ScriptInvocation<'_>,
) -> Result<T, TransportError> {
    script
        .invoke_async(&mut conn.clone())
        .await
        .map_err(|e| failure(what, e))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

crate::channel_layer::mesh::delegate_to_mesh!(RedisChannelLayer, mesh);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let one = Layout::new("app.x", false);
        assert_eq!(one.key("history", "lobby"), "app.x:history:lobby");
        assert_eq!(one.channel("app.x.group.lobby"), "app.x.group.lobby");
        assert_eq!(
            one.subject("app.x.group.lobby").unwrap(),
            "app.x.group.lobby"
        );
        assert_eq!(one.publish(), "PUBLISH");

        let sharded = Layout::new("app.x", true);
        assert_eq!(sharded.key("history", "lobby"), "app.x:history:{lobby}");
        assert_eq!(sharded.channel("app.x.group.a.b"), "app.x.group.{a.b}");
        assert_eq!(
            sharded.channel("app.x.proc.specific.t"),
            "app.x.proc.{specific.t}"
        );
        for subject in [
            "app.x.group.a.b",
            "app.x.hlive.lobby",
            "app.x.proc.specific.t",
        ] {
            assert_eq!(sharded.subject(&sharded.channel(subject)).unwrap(), subject);
        }
        assert!(sharded.subject("app.x.group.lobby").is_none());
        assert!(sharded.subject("other.group.{lobby}").is_none());
        assert_eq!(sharded.publish(), "SPUBLISH");
    }

    #[tokio::test]
    async fn unreachable_redis_fails_promptly() {
        let started = std::time::Instant::now();
        let err = RedisChannelLayer::builder("redis://127.0.0.1:1")
            .timeout(Duration::from_millis(500))
            .build()
            .await
            .unwrap_err();
        assert!(matches!(err, ChannelLayerError::Backend(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(RedisChannelLayer::connect("not a url").await.is_err());
    }
}
