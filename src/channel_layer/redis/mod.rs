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
//! Each layer instance (normally one per process) keeps the same local state
//! as [`InMemoryChannelLayer`](super::InMemoryChannelLayer): its channels, and
//! which of them belong to which group. Redis only carries traffic between
//! processes, so a fan-out costs O(processes), not O(members):
//!
//! * **Process channels.** Every instance gets a random process name
//!   `specific.<token>` and [`new_channel`](ChannelLayer::new_channel) names
//!   its channels `specific.<token>!<n>` (Django's process-specific channel
//!   names). The instance subscribes once to the Pub/Sub channel
//!   `{prefix}:proc:specific.<token>`, so a [`send`](ChannelLayer::send) to
//!   such a name from another process is one `PUBLISH`. When Redis reports no
//!   subscriber (the process is gone), the send fails with
//!   [`ChannelLayerError::NoSuchChannel`]. Sends to a channel of the sending
//!   instance itself never touch Redis.
//! * **Groups.** An instance subscribes to `{prefix}:group:{group}` while at
//!   least one of its channels is a member. [`group_send`](ChannelLayer::group_send)
//!   encodes the event once and `PUBLISH`es it once; every subscribed process
//!   decodes it once and hands the same [`Event`] to its local members with
//!   [`ChannelSender::send_lossy`] (a full member drops it, is counted and
//!   sees [`RecvError::Lagged`](super::RecvError::Lagged)). The sending
//!   instance delivers to its own members directly, before the `PUBLISH`
//!   (they never wait for Redis, and ignore their own publication), so its
//!   [`GroupSendReport::local_members`] counts them exactly; other processes
//!   add one each to [`GroupSendReport::remote_receivers`], and count their members in their own [`stats`](ChannelLayer::stats).
//! * **Named channels** without `!` (worker channels such as `"thumbnails"`,
//!   consumed with [`receive`](ChannelLayer::receive)) are Redis lists
//!   `{prefix}:channel:{name}`: a send is an `LPUSH` (refused with
//!   [`ChannelLayerError::ChannelFull`] when the list holds `capacity`
//!   events; the list expires `expiry` after the last push), and each receiver
//!   runs a `BRPOP` loop on its own connection, so each event goes to exactly
//!   one receiver across all processes.
//! * **Membership.** [`group_add`](ChannelLayer::group_add) and
//!   [`group_discard`](ChannelLayer::group_discard) on a channel of this
//!   instance change local state and (un)subscribe before returning. On a
//!   channel of another process they ask that process over its process
//!   channel and wait for its reply. Dropping a receiver (a connection closing)
//!   removes its channel from every group at once, and a group with no local
//!   member left is unsubscribed. Memberships of process channels are never
//!   stored in Redis: when a process crashes its subscriptions vanish with its
//!   connection, so its members cannot linger. Named channels can be group
//!   members too; those memberships are kept in the sorted set
//!   `{prefix}:group:{group}` (score: time added), expire after
//!   `group_expiry` unless added again, and receive a group send as an `LPUSH`
//!   done by the same script that publishes it.
//!
//! # Presence
//!
//! Presence lives in Redis per group and per process, so that a process
//! that dies cannot leave members behind: with `{base}` =
//! `{prefix}:presence:{group}`, each process keeps a hash
//! `{base}:c:{process}` (channel → `[user, data]` as JSON) and a hash
//! `{base}:u:{process}` (user → its connections there), and the sorted set
//! `{base}:procs` scores every process by when its entries expire. Every
//! third of [`PresenceConfig::ttl`] a live process renews its score in the
//! groups it has members in, and only those (a process in 3 groups makes 3
//! calls, whatever the number of groups in Redis). A listing
//! ([`presence`](ChannelLayer::presence)) reads the processes whose score
//! is in the future, so a crashed process's members disappear within the
//! TTL; the first live process to refresh the group afterwards removes
//! their keys and sends the [`PRESENCE_LEAVE`](super::PRESENCE_LEAVE) of
//! users who had no other connection (their data is not in it: it went
//! with the dead process). The keys also expire after twice the TTL. Joins
//! and leaves run one script each, which checks the other live processes
//! for the same user, so notifications are collapsed per user across
//! processes. After Redis lost the keys (flush, restart) the next refresh
//! writes this process's entries again; after a restart that is at once,
//! when the Pub/Sub connection comes back. Times are Redis's (`TIME`), so the
//! processes' clocks do not matter.
//!
//! # History and recovery
//!
//! For a group with a [`HistoryPolicy`] (every process must configure the
//! same ones), [`group_send`](ChannelLayer::group_send) runs one script
//! that increments the group's offset, appends the event to the capped
//! stream `{prefix}:history:{group}` (`XADD ... MAXLEN n`, entry id
//! `{offset}-0`) and `PUBLISH`es it with its offset and epoch, so two
//! processes sending to one group can never interleave offsets and
//! payloads. The epoch and last offset are kept in the hash
//! `{prefix}:history-meta:{group}`; both keys expire
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
//! answered with the offset (it does not depend on its own Pub/Sub copy,
//! which it then drops as a repeat), other processes get it through
//! Pub/Sub. When the offsets a process sees jump (another sender's event is
//! still on its way, the Pub/Sub connection was down, Redis dropped a slow
//! subscriber), it holds the later event back and reads the missing ones
//! from the stream first. When the epoch changes (Redis restarted without
//! persistence, the history expired), it reads the new epoch from its
//! first offset, so events published before it subscribed again are not
//! lost; and right after re-subscribing it reads what every history group
//! missed without waiting for the next event. When a process subscribes to
//! a history group it first reads the group's position (one `HMGET`), so
//! events sent while it subscribes are read, not missed.
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
//! never duplicated. Events published while a process is disconnected from
//! Redis are lost for that process, and so are events queued in Redis lists
//! when a Redis server without persistence restarts (with the named-channel
//! memberships stored there). A direct send from another process to a full
//! channel cannot fail synchronously (Pub/Sub does not answer): the
//! receiving process drops the event, counts it in
//! [`ChannelLayerStats::dropped_full`] and marks the receiver as lagging, as a
//! group send would. Events for a channel whose receiver is gone are counted
//! in [`ChannelLayerStats::dropped_other`]. A process too slow to read its Pub/Sub
//! traffic is disconnected by Redis (`client-output-buffer-limit pubsub`),
//! reconnects, and loses what was published in between.
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
//! was asked, error or not.
//!
//! ## Order
//!
//! Every command goes over one multiplexed connection, in the order sent,
//! and each process's Pub/Sub task fans out in the order Redis delivers. So
//! events one task sends (awaiting each) reach every member in that order,
//! local and remote; events from different senders are not ordered. A send
//! that timed out may still run, but before any later send of the same
//! layer, or not at all.
//!
//! # Faults
//!
//! Every Redis command has a timeout (2 s by default, see
//! [`RedisChannelLayerBuilder::timeout`]), so while Redis is unreachable
//! sends fail promptly with [`ChannelLayerError::Backend`] instead of
//! hanging. A command refused because the connection manager's last
//! reconnect failed (it had never reached Redis) is tried once more, on a
//! fresh connection, within the same timeout: the first command after Redis
//! comes back succeeds instead of reporting the outage that just ended. One background task owns the Pub/Sub connection; when it breaks
//! (Redis restarted, network failure, a missed health-check `PING`) the task
//! reconnects with exponential backoff (50 ms doubling up to 1 s) and
//! subscribes again to the process channel and every group that has a local
//! member, so messages flow again without any action by the application.
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
//! if Redis stays away it fails, but the membership is kept and takes effect
//! on reconnection (the connection's consumer usually closes on the error,
//! which removes it).
//!
//! The layer needs `PUBLISH`/`SUBSCRIBE`, `EVAL`/`EVALSHA` (small Lua
//! scripts), list, hash, sorted-set and stream commands (Redis 5 or
//! later). It does not run on a Redis Cluster (the scripts touch keys they
//! do not declare); use a single primary, optionally behind Sentinel, or
//! `RedisClusterChannelLayer` (feature `redis-cluster`), which uses the
//! cluster's sharded Pub/Sub.
//!
//! # Wire format
//!
//! Every Pub/Sub message and list item is a MessagePack array
//! `[origin: str, op: int, id: int, group: str, channel: str, event: bin]`:
//! `origin` is the sending process (`specific.<token>`), `event` an
//! [`Event::encode`]d event (see the [channel layer wire
//! format](super#wire-format)) and `op` one of `0` (event for a group),
//! `1` (event for `channel`), `2`/`3` (add/discard `channel` to/from `group`,
//! request `id`), `4`/`5`/`6` (reply to request `id`: done, no such channel,
//! failed). A group event of a group with history carries its offset in
//! `id` and its epoch in `channel` (the history script packs it with Redis's
//! `cmsgpack`). Keys and channels are `{prefix}:proc:{process}`,
//! `{prefix}:group:{group}`, `{prefix}:channel:{name}`, and those of
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
mod history;
mod presence;
mod shared;
mod subscriber;
mod wire;
mod worker;

#[cfg(feature = "redis-cluster")]
pub use self::cluster::{RedisClusterChannelLayer, RedisClusterChannelLayerBuilder};

pub(super) use super::local::lock;
use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    Cmd, FromRedisValue, RedisError,
};
use tokio::sync::{mpsc, oneshot};

use self::{
    shared::{GroupKeys, Host, Shared},
    subscriber::{Command, Subscriber},
    wire::Envelope,
};
use super::{
    local::{no_such_channel, Counters, LocalChannels, Owner, Registry},
    names,
    subscriber_error::SubscriberError,
    validate_channel_name, validate_group_name, BoxFuture, Capabilities, ChannelLayer,
    ChannelLayerError, ChannelLayerStats, ChannelReceiver, ChannelSender, Event, Feature,
    GroupSendReport, HistoryPolicy, PresenceConfig, PresenceInfo, PresenceMember, Recovery,
    StreamPosition, DEFAULT_CAPACITY,
};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "tower-channels";
/// How long a named channel's membership of a group lasts unless renewed
/// (Django's default: one day).
pub const DEFAULT_GROUP_EXPIRY: Duration = Duration::from_secs(86_400);
/// How long events wait in a named channel's list after the last push.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(60);
/// The default timeout of each Redis command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// `KEYS[1]` list; `ARGV`: payload, capacity, expiry (s). Returns 1 if pushed, 0 if full.
const SEND_SCRIPT: &str = r"
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
";

/// The part of both group send scripts after the event is known: publishes
/// `msg` and pushes `ARGV[1]` to the named members' lists. `KEYS[1]` group
/// (Pub/Sub channel and sorted set of named members); `ARGV`: 1 list
/// payload, 2 now (s), 3 group expiry (s), 4 capacity, 5 list expiry (s),
/// 6 list key prefix. Sets `receivers`, `pushed` and `full`.
const PUBLISH_AND_PUSH: &str = r"
local receivers = redis.call('PUBLISH', KEYS[1], msg)
local pushed, full = 0, 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[2]) - tonumber(ARGV[3]))
  local cap = tonumber(ARGV[4])
  for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    local key = ARGV[6] .. member
    if redis.call('LLEN', key) < cap then
      redis.call('LPUSH', key, ARGV[1])
      redis.call('EXPIRE', key, ARGV[5])
      pushed = pushed + 1
    else
      full = full + 1
    end
  end
end
";

/// A group send without history: [`PUBLISH_AND_PUSH`] of the payload
/// (`ARGV[1]`). Returns `{subscribers, pushed, full}`.
fn group_send_script() -> LuaScript {
    static SOURCE: OnceLock<String> = OnceLock::new();
    LuaScript::composed(
        &SOURCE,
        &[
            "local msg = ARGV[1]",
            PUBLISH_AND_PUSH,
            "return {receivers, pushed, full}",
        ],
    )
}

/// A group send with history: [`history::APPEND`] (its arguments from
/// `ARGV[7]`, `KEYS[2..3]` the stream and meta hash), then
/// [`PUBLISH_AND_PUSH`] of the envelope with the offset. Returns
/// `{subscribers, pushed, full, offset, epoch}`.
fn history_send_script() -> LuaScript {
    static SOURCE: OnceLock<String> = OnceLock::new();
    LuaScript::composed(
        &SOURCE,
        &[
            history::APPEND,
            "local offset, epoch, msg = append(7)",
            PUBLISH_AND_PUSH,
            "return {receivers, pushed, full, offset, epoch}",
        ],
    )
}

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
    /// [`DEFAULT_PREFIX`]). Applications sharing one Redis server use
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

    /// The timeout of each Redis command (default [`DEFAULT_TIMEOUT`]):
    /// how long an operation may take while Redis is unreachable before it
    /// fails.
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

    /// Connects to Redis and subscribes to this process's channel. Fails
    /// when Redis cannot be reached within the timeout.
    pub async fn build(self) -> Result<RedisChannelLayer, ChannelLayerError> {
        if self.prefix.is_empty() {
            return Err(BackendError::Config("the Redis key prefix must not be empty").into());
        }
        let client = redis::Client::open(self.url.as_str())
            .map_err(|e| BackendError::Redis("invalid Redis URL".into(), e))?;
        let config = Config {
            capacity: self.capacity,
            group_expiry: self.group_expiry,
            expiry: self.expiry,
            timeout: self.timeout,
            group_prefix: format!("{}:group:", self.prefix),
            list_prefix: format!("{}:channel:", self.prefix),
            prefix: self.prefix,
        };
        let shared = Shared::new(
            GroupKeys::plain(&config.prefix),
            self.history,
            self.presence,
        );
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT.min(config.timeout)))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(2)
            .set_min_delay(RECONNECT_MIN)
            .set_max_delay(RECONNECT_MAX);
        let conn = match tokio::time::timeout(
            config.timeout + CONNECT_TIMEOUT,
            ConnectionManager::new_with_config(client.clone(), manager_config),
        )
        .await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                return Err(BackendError::Redis("cannot connect to Redis".into(), e).into())
            }
            Err(_) => {
                return Err(BackendError::Timeout(
                    "connecting to Redis".into(),
                    config.timeout + CONNECT_TIMEOUT,
                )
                .into())
            }
        };

        let process = format!("specific.{}", names::random_token(12));
        let proc_channel = format!("{}:proc:{process}", config.prefix);
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            scripts: Scripts {
                send: LuaScript::new(SEND_SCRIPT),
                group_send: group_send_script(),
            },
            history_send: history_send_script(),
            shared,
            config,
            proc_channel,
            client,
            conn,
            next_request: AtomicU64::new(1),
            registry: Registry::new(process),
            subscribed: Mutex::default(),
            connected: AtomicBool::new(false),
            pending: Mutex::default(),
            commands,
            counters: Arc::default(),
        });
        inner.load_scripts().await?;
        let pubsub = subscriber::open(&inner)
            .await
            .map_err(|e| BackendError::Subscriber("cannot subscribe to Redis".into(), e))?;
        inner.connected.store(true, Ordering::Relaxed);
        tokio::spawn(Subscriber::new(&inner, commands_rx, pubsub).run());
        tokio::spawn(presence::refresh_loop(
            Arc::downgrade(&inner),
            inner.shared.presence_config.time_limit(),
        ));
        Ok(RedisChannelLayer { inner })
    }
}

/// A [`ChannelLayer`] on Redis Pub/Sub and lists, for applications that run
/// in several processes. See the [module docs](self).
///
/// Cloning is cheap and shares the connection and local state (a clone is
/// the same "process"). Dropping the last clone closes the connections.
#[derive(Clone)]
pub struct RedisChannelLayer {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisChannelLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisChannelLayer")
            .field("prefix", &self.inner.config.prefix)
            .field("process", &self.inner.process())
            .field("capacity", &self.inner.config.capacity)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl RedisChannelLayer {
    /// Connects with every default (prefix [`DEFAULT_PREFIX`], capacity
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

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.config.prefix
    }

    /// This instance's process name, `specific.<token>`: the part of its
    /// channel names before the `!`.
    pub fn process_name(&self) -> &str {
        self.inner.process()
    }

    /// Events a channel holds.
    pub fn capacity(&self) -> usize {
        self.inner.config.capacity
    }

    /// Whether the Pub/Sub connection is up (false while reconnecting).
    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
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
struct Config {
    prefix: String,
    /// `{prefix}:group:`
    group_prefix: String,
    /// `{prefix}:channel:`
    list_prefix: String,
    capacity: usize,
    group_expiry: Duration,
    expiry: Duration,
    timeout: Duration,
}

impl Config {
    fn group_key(&self, group: &str) -> String {
        format!("{}{group}", self.group_prefix)
    }

    fn list_key(&self, channel: &str) -> String {
        format!("{}{channel}", self.list_prefix)
    }

    fn proc_key(&self, process: &str) -> String {
        format!("{}:proc:{process}", self.prefix)
    }
}

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
struct Scripts {
    send: LuaScript,
    group_send: LuaScript,
}

struct Inner {
    config: Config,
    /// `{prefix}:proc:{process}`.
    proc_channel: String,
    client: redis::Client,
    conn: ConnectionManager,
    scripts: Scripts,
    /// [`history_send_script`].
    history_send: LuaScript,
    /// Presence and history, shared with the cluster layer.
    shared: Shared,
    next_request: AtomicU64,
    /// This process's channels; its process name is `specific.<token>`.
    registry: Registry,
    /// Groups whose Pub/Sub subscription Redis confirmed; written by the subscriber task.
    subscribed: Mutex<HashSet<String>>,
    connected: AtomicBool,
    /// Remote group add/discard requests waiting for their reply.
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

/// A backend failure, wrapped in [`ChannelLayerError::Backend`]. The
/// `String`s say what was being done; causes are typed `source`s.
#[derive(Debug, thiserror::Error)]
enum BackendError {
    #[error("{0}")]
    Redis(String, #[source] RedisError),
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
    #[cfg_attr(not(feature = "redis-cluster"), allow(dead_code))]
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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
            // The task is gone only when the layer is, and then nothing is subscribed.
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
        self.within_timeout(move || {
            let mut conn = self.conn.clone();
            async move { cmd.query_async::<T>(&mut conn).await }
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
    /// Runs a pipeline (in a `MULTI` if atomic) with the layer's timeout.
    async fn query_pipe(
        &self,
        what: &str,
        pipe: &redis::Pipeline,
    ) -> Result<(), ChannelLayerError> {
        self.within_timeout(|| {
            let mut conn = self.conn.clone();
            async move { pipe.query_async::<()>(&mut conn).await }
        })
        .await
        .map_err(|e| e.context(what))
    }

    /// Runs `attempt` within the layer's timeout. An attempt that failed
    /// because the connection was refused (the connection manager's last
    /// reconnect failed, so the command never reached Redis) is made once
    /// more, on the connection the manager re-establishes, within the same
    /// timeout: the first command after a Redis restart then succeeds.
    /// Errors that may have reached Redis are never retried (at most once).
    async fn within_timeout<T, F>(&self, attempt: impl Fn() -> F) -> Result<T, QueryError>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let attempts = async {
            match attempt().await {
                Err(e) if never_sent(&e) => {
                    tracing::debug!(error = %e, "Redis command retried after reconnecting");
                    attempt().await
                }
                other => other,
            }
        };
        match tokio::time::timeout(self.config.timeout, attempts).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(QueryError::Redis(e)),
            Err(_) => Err(QueryError::Timeout(self.config.timeout)),
        }
    }

    async fn load_scripts(&self) -> Result<(), ChannelLayerError> {
        let own = [
            &self.scripts.send,
            &self.scripts.group_send,
            &self.history_send,
        ];
        for script in own.into_iter().chain(self.shared.all_scripts()) {
            let sha: String = self
                .query(
                    "loading a Lua script",
                    redis::cmd("SCRIPT").arg("LOAD").arg(script.code),
                )
                .await?;
            *lock(&script.sha) = sha;
        }
        Ok(())
    }

    async fn publish(&self, channel: &str, payload: &[u8]) -> Result<usize, ChannelLayerError> {
        self.query("PUBLISH", redis::cmd("PUBLISH").arg(channel).arg(payload))
            .await
    }

    fn has_local_members(&self, group: &str) -> bool {
        self.registry.group_len(group) > 0
    }

    /// A group send to a group without history: encoded once, published
    /// once, delivered to local members directly.
    async fn group_send_plain(
        &self,
        group: &str,
        event: &Event,
    ) -> Result<GroupSendReport, ChannelLayerError> {
        let payload = wire::event_envelope(self.process(), wire::OP_GROUP_EVENT, group, "", event)?;
        let key = self.config.group_key(group);
        // Whether Redis counted this process among the receivers: it was
        // if the subscription was confirmed before the PUBLISH ran and
        // its removal (if any) confirmed after. During (un)subscription
        // races the count of other processes may be off by one.
        let subscribed_before = lock(&self.subscribed).contains(group);
        // This process ignores its own publication and delivers here,
        // first: its members never wait for (or miss) a Redis round trip.
        let (delivered, dropped) = self.fan_out(group, event);
        let (receivers, pushed, full): (usize, usize, usize) = self
            .eval("group send", &self.scripts.group_send, &[&key], |c| {
                self.publish_and_push_args(c, &payload);
            })
            .await?;
        self.counters.group_sent(dropped + full);
        let own = usize::from(subscribed_before || lock(&self.subscribed).contains(group));
        Ok(GroupSendReport {
            local_members: delivered,
            remote_receivers: Some(receivers.saturating_sub(own) + pushed),
            dropped: dropped + full,
            position: None,
        })
    }

    /// The arguments of [`PUBLISH_AND_PUSH`] (`ARGV[1..=6]`).
    fn publish_and_push_args(&self, c: &mut Cmd, payload: &[u8]) {
        c.arg(payload)
            .arg(unix_now())
            .arg(self.config.group_expiry.as_secs())
            .arg(self.config.capacity)
            .arg(self.config.expiry.as_secs())
            .arg(&self.config.list_prefix);
    }

    /// A group send to a group with history: one script appends the
    /// event, publishes it with its offset and pushes it to named members;
    /// local members get it once the offset is known, through the
    /// sequencer ([`history::deliver_own`]).
    async fn group_send_with_history(
        &self,
        group: &str,
        event: &Event,
        policy: &HistoryPolicy,
    ) -> Result<GroupSendReport, ChannelLayerError> {
        let encoded = event.encode()?;
        let list_payload =
            wire::event_envelope(self.process(), wire::OP_GROUP_EVENT, group, "", event)?;
        let keys = history::send_keys(self, group, self.config.group_key(group));
        let subscribed_before = lock(&self.subscribed).contains(group);
        let local_members = self.registry.group_len(group);
        let fresh = history::new_epoch();
        let (receivers, pushed, full, offset, epoch): (usize, usize, usize, u64, String) = self
            .eval(
                "group send with history",
                &self.history_send,
                &keys.each_ref().map(String::as_str),
                |c| {
                    self.publish_and_push_args(c, &list_payload);
                    history::history_args(c, self.process(), group, &encoded, policy, &fresh);
                },
            )
            .await?;
        self.counters.group_sent(full);
        let own = usize::from(subscribed_before || lock(&self.subscribed).contains(group));
        let position = StreamPosition::new(offset, epoch);
        history::deliver_own(self, group, event, &position, local_members).await;
        Ok(GroupSendReport {
            local_members,
            remote_receivers: Some(receivers.saturating_sub(own) + pushed),
            dropped: full,
            position: Some(position),
        })
    }

    /// Makes the subscription of `group` match local membership, waiting for
    /// the subscriber task to confirm it.
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

    /// Asks the process owning `channel` to add it to or discard it from
    /// `group`, and waits for its reply.
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
        let receivers = self
            .publish(&self.config.proc_key(process), &payload)
            .await?;
        if receivers == 0 {
            return if op == wire::OP_GROUP_ADD {
                Err(no_such_channel(channel))
            } else {
                Ok(())
            };
        }
        let what = format!("asking process {process:?} to update group {group:?}");
        shared::wait_reply(rx, op, channel, self.config.timeout, what).await
    }

    /// A reply to one of our requests arrived.
    fn complete_request(&self, id: u64, op: u8) {
        if let Some(tx) = lock(&self.pending).remove(&id) {
            let _ = tx.send(op);
        }
    }

    async fn flush_keys(&self) -> Result<(), ChannelLayerError> {
        let pattern = format!("{}:*", escape_glob(&self.config.prefix));
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = self
                .query(
                    "SCAN",
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(500),
                )
                .await?;
            if !keys.is_empty() {
                self.query::<()>("DEL", redis::cmd("DEL").arg(&keys))
                    .await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
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

#[derive(Debug)]
enum QueryError {
    Redis(RedisError),
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

/// Whether a failed command certainly did not reach Redis, so one retry
/// cannot run it twice.
fn never_sent(e: &RedisError) -> bool {
    e.is_connection_refusal()
}

fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl ChannelLayer for RedisChannelLayer {
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
                        .publish(&inner.config.proc_key(process), &payload)
                        .await?
                    {
                        0 => Err(no_such_channel(channel)),
                        _ => Ok(()),
                    }
                }
                None => {
                    let key = inner.config.list_key(channel);
                    let pushed: i64 = inner
                        .eval("LPUSH", &inner.scripts.send, &[&key], |c| {
                            c.arg(&payload)
                                .arg(inner.config.capacity)
                                .arg(inner.config.expiry.as_secs());
                        })
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
                    inner.query_pipe("ZADD", &pipe).await
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
                    inner
                        .query::<()>(
                            "ZREM",
                            redis::cmd("ZREM")
                                .arg(inner.config.group_key(group))
                                .arg(channel),
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
            {
                inner.registry.clear();
                inner.shared.clear();
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_escaping() {
        assert_eq!(escape_glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
        assert_eq!(escape_glob("tower-channels"), "tower-channels");
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
