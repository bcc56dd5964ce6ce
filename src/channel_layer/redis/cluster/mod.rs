//! The Redis layer on a Redis Cluster (feature `redis-cluster`): its docs
//! are on [`RedisClusterChannelLayer`], public as
//! `channel_layer::redis::RedisClusterChannelLayer`. The protocol is the
//! mesh's; this module is the cluster's transport ([`transport`]: sharded
//! Pub/Sub) and the builder, and reuses the Redis layer's store and queues
//! with a hash-tagged [`Layout`].

mod transport;

use std::{fmt, time::Duration};

use redis::{
    cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig},
    cluster_async::ClusterConnection,
    cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo},
    FromRedisValue, IntoConnectionInfo, ProtocolVersion, Value,
};

use self::transport::ClusterTransport;
use super::{
    failure, query,
    queue::{Connector, BLOCK},
    storage, Connection, Layout, RedisFailure, DEFAULT_EXPIRY, DEFAULT_GROUP_EXPIRY,
    DEFAULT_PREFIX, DEFAULT_TIMEOUT,
};
use crate::channel_layer::{
    local::Counters,
    mesh::{Inbox, MeshConfig, MeshLayer, TransportError},
    redis_keys::{self, Keyspace},
    redis_pubsub::{connect_bound, CONNECT_TIMEOUT},
    BoxFuture, ChannelLayer, ChannelLayerError, HistoryPolicy, PresenceConfig, DEFAULT_CAPACITY,
};

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
    /// `"tower-channels"`); it may not contain `{` or `}` (the layer's hash
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

    /// The timeout of each operation, redirects and retries included
    /// (default 2 s): how long a send to a shard that is
    /// down takes to fail. It also bounds each wait on an answer, as on the
    /// [Redis layer](super::RedisChannelLayerBuilder::timeout): a
    /// subscription, and another process's reply to a direct send or a
    /// group change of one of its channels.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(10));
        self
    }

    /// Connects to the cluster (discovering every node from the reachable
    /// seeds) and subscribes to this process's channel.
    pub async fn build(self) -> Result<RedisClusterChannelLayer, ChannelLayerError> {
        if self.prefix.is_empty() || self.prefix.contains(['{', '}']) {
            return Err(RedisFailure::Config(
                "the Redis key prefix must not be empty nor contain '{' or '}'",
            )
            .into());
        }
        if self.urls.is_empty() {
            return Err(RedisFailure::Config("no Redis Cluster seed URL given").into());
        }
        let timeout = self.timeout;
        let client = |protocol: ProtocolVersion, response_timeout: Duration| {
            ClusterClientBuilder::new(self.urls.iter().map(String::as_str))
                .use_protocol(protocol)
                .connection_timeout(CONNECT_TIMEOUT.min(timeout))
                .response_timeout(response_timeout)
                .retries(4)
                .min_retry_wait(20)
                .max_retry_wait(500)
                .build()
                .map_err(|e| RedisFailure::Redis("invalid Redis Cluster URL".into(), e))
        };
        let commands = client(ProtocolVersion::RESP2, timeout)?;
        // Each primary's subscription connection is made like the first
        // seed's (credentials, TLS), at the primary's address.
        let seed = self.urls[0]
            .as_str()
            .into_connection_info()
            .map_err(|e| RedisFailure::Redis("invalid Redis Cluster URL".into(), e))?;
        let receivers = Receivers(client(ProtocolVersion::RESP2, BLOCK + timeout)?);

        let conn = connect(&commands, ClusterConfig::new(), timeout).await?;
        let counters = std::sync::Arc::new(Counters::default());
        let (inbox, messages) = Inbox::new();
        let config = MeshConfig {
            prefix: self.prefix,
            capacity: self.capacity,
            timeout,
            history: self.history,
            presence: Some(self.presence),
            named_expiry: self.group_expiry,
        };
        let (store, queues) = storage(conn, receivers, true, &config, self.expiry);
        let transport =
            ClusterTransport::start(seed, inbox, counters.clone(), store, queues).await?;
        let mesh = MeshLayer::start(transport, messages, config, counters).await?;
        Ok(RedisClusterChannelLayer { mesh })
    }
}

/// Connects `client` with `config`, within [`connect_bound`]`(timeout)`.
async fn connect(
    client: &ClusterClient,
    config: ClusterConfig,
    timeout: Duration,
) -> Result<ClusterConnection, RedisFailure> {
    let wait = connect_bound(timeout);
    match tokio::time::timeout(wait, client.get_async_connection_with_config(config)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(RedisFailure::Redis(
            "cannot connect to the Redis Cluster".into(),
            e,
        )),
        Err(_) => Err(RedisFailure::Timeout(
            "connecting to the Redis Cluster".into(),
            wait,
        )),
    }
}

/// Makes each named channel receiver's cluster connection (a `BRPOP` must
/// not hold up other commands), with a response timeout of [`BLOCK`] plus
/// the layer's.
#[derive(Clone)]
struct Receivers(ClusterClient);

impl Connector for Receivers {
    type Conn = ClusterConnection;

    fn connect(&self, _timeout: Duration) -> BoxFuture<'_, redis::RedisResult<ClusterConnection>> {
        Box::pin(self.0.get_async_connection())
    }
}

impl Connection for ClusterConnection {
    /// `SCAN` runs on each primary in turn (a cluster's `SCAN` covers one
    /// node); `DEL` is routed by key.
    fn delete_matching<'a>(
        &'a self,
        pattern: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let primaries = route(
                self,
                "listing the cluster's primaries",
                redis::cmd("PING"),
                RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
            )
            .await?;
            let Value::Map(primaries) = primaries else {
                return Err(malformed("listing the primaries"));
            };
            for (address, _) in primaries {
                let address =
                    String::from_redis_value(address).map_err(|_| malformed("a node address"))?;
                let Some((host, port)) = address
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.to_owned(), p.parse().ok()?)))
                else {
                    return Err(malformed("a node address"));
                };
                let node = Primary {
                    conn: self,
                    host,
                    port,
                };
                redis_keys::delete_matching(&node, pattern).await?;
            }
            Ok(())
        })
    }
}

fn malformed(what: &'static str) -> TransportError {
    TransportError::Failed(RedisFailure::Malformed(what).into())
}

/// Runs `cmd` (`what`, in errors) where `routing` says.
async fn route(
    conn: &ClusterConnection,
    what: &str,
    cmd: redis::Cmd,
    routing: RoutingInfo,
) -> Result<Value, TransportError> {
    conn.clone()
        .route_command(cmd, routing)
        .await
        .map_err(|e| failure(what, e))
}

/// The keys of one primary of the cluster.
struct Primary<'a> {
    conn: &'a ClusterConnection,
    host: String,
    port: u16,
}

impl Keyspace for Primary<'_> {
    type Error = TransportError;

    fn scan<'a>(
        &'a self,
        scan: &'a redis::Cmd,
    ) -> BoxFuture<'a, Result<redis_keys::ScanStep, TransportError>> {
        Box::pin(async move {
            let node = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: self.host.clone(),
                port: self.port,
            });
            let reply = route(self.conn, "SCAN", scan.clone(), node).await?;
            FromRedisValue::from_redis_value(reply).map_err(|_| malformed("SCAN"))
        })
    }

    /// redis-rs splits a `DEL` of several slots into one per slot.
    fn delete<'a>(&'a self, del: &'a redis::Cmd) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(query(self.conn, "DEL", del))
    }
}

/// The Redis layer on a Redis Cluster, with sharded Pub/Sub (feature `redis-cluster`).
///
/// [`RedisClusterChannelLayer`] is [`RedisChannelLayer`](super::RedisChannelLayer)
/// for a Redis Cluster (Redis 7 or newer): the same protocol (the mesh's,
/// which [`NatsChannelLayer`](crate::channel_layer::nats) runs too), the
/// same local state, process channels, groups, named channels, presence,
/// history and recovery, the same Lua scripts and
/// [wire format](super#wire-format), but every message goes to one shard
/// instead of the whole cluster. Classic `PUBLISH` on a cluster is
/// broadcast to every node over the cluster bus, so adding nodes adds no
/// Pub/Sub capacity; sharded Pub/Sub (`SPUBLISH`/`SSUBSCRIBE`) keeps a
/// channel's traffic on the shard that owns its slot, so capacity grows
/// with the number of shards.
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
/// What is said in the [Redis layer's docs](super#how-it-works) holds here,
/// with these differences:
///
/// * **Slots.** Every key and shard channel carries the name it is about
///   as a hash tag, so everything about one group lives on one slot, the
///   group name's: its shard channels `{prefix}.group.{<group>}` and
///   `{prefix}.hlive.{<group>}`, the sorted set of its named members
///   `{prefix}:group:{<group>}` ([`group_key`](Self::group_key)), its
///   history `{prefix}:history:{<group>}` and `{prefix}:history-meta:{<group>}`
///   and its presence keys `{prefix}:presence:{<group>}:...` (the braces
///   are literal). A process channel is `{prefix}.proc.{<process>}`, a
///   named channel's list `{prefix}:channel:{<name>}`. Different groups
///   spread over the shards by their names.
/// * **Sharded Pub/Sub.** Every publication is an `SPUBLISH`, to the shard
///   owning the channel's slot; the history scripts publish with `SPUBLISH`
///   too, on the group's live channel, which is on the slot of every key
///   the script touches, so a script call runs on one node. Each process
///   `SSUBSCRIBE`s to its process channel and, while it has a member
///   there, to each group's channels: on one plain RESP3 connection per
///   primary (messages arrive as pushes), each channel at the primary
///   owning its slot.
/// * **Named channels' receivers** are `BRPOP` loops, each on its own
///   cluster connection (a blocking command must not hold up the others).
///
/// # Presence, history and recovery
///
/// As on the [Redis layer](super#presence) (see there, and its
/// [history](super#history-and-recovery)), with the same scripts: each
/// call runs on the node owning the group's slot. When that node restarts
/// without persistence, the group's history and epoch are gone: the next
/// send starts a new epoch, old positions fail to recover with
/// [`RecoveryFailure::EpochChanged`](crate::channel_layer::RecoveryFailure::EpochChanged),
/// and each process reads the new epoch from its first offset, so sends
/// answered while it was still subscribing again are not lost. Once its
/// subscriptions are back, each process writes its presence again and
/// reads back what its history groups missed (as after a slot migration).
/// `tests/redis_cluster.rs` (`history_survives_node_restart`) checks both.
///
/// # Redirects, restarts and slot migration
///
/// Commands (publications, the store, named channels) go through redis-rs's
/// cluster connection ([`redis::cluster_async`]): its routing, `MOVED`/`ASK`
/// redirects and reconnection. Subscriptions do not: the layer reads the
/// slot map (`CLUSTER SLOTS`, on that connection) and keeps one
/// subscription connection per primary (made with the first seed URL's
/// settings, such as user, password and TLS, at the address `CLUSTER
/// SLOTS` gives), each with its own task, so what happens to one node's
/// connection does not touch the others':
///
/// * each connection is health-checked (a `PING` every 2 s); when it drops
///   or a check fails, its task reconnects (backoff 50 ms doubling up to
///   1 s) and `SSUBSCRIBE`s again to every channel that node serves; the
///   slot map is read again then, and every 2 s while a primary is down,
///   so channels whose slots a replica took over move to it (with
///   `cluster-node-timeout 1000`, groups on a killed primary's slots were
///   delivered again about 4 s after the kill, 1.6-2.1 s of it after the
///   cluster promoted the replica: `a_replica_takes_over_a_dead_primary`
///   in `tests/redis_cluster.rs`);
/// * when a slot migrates, the old owner answers `MOVED` to a subscription
///   or ends it with a `SUNSUBSCRIBE` push; the layer reads the slot map
///   again and subscribes at the new owner;
/// * a subscription to a node that is down fails at once and is made in
///   the background when the node is back.
///
/// After any of these the layer reads back what its history groups missed
/// and writes its presence again.
///
/// While a shard is down, operations on its slots fail within the timeout
/// with a [`ChannelLayerError::Backend`] naming the group or channel
/// (`group send to "lobby" failed: ...`); the other shards keep working
/// (set `cluster-require-full-coverage no` on the servers, otherwise Redis
/// itself refuses every command once the cluster marks the shard as
/// failed). A [`group_add`](ChannelLayer::group_add) that cannot subscribe
/// there fails, and the subscription is made in the background once the
/// shard is back. Delivery semantics are those of the Redis layer: at most
/// once, except in history groups; messages of other groups published while
/// a process is not subscribed on a shard are lost for it.
///
/// The layer needs Redis 7 (`SPUBLISH`/`SSUBSCRIBE`), `EVALSHA` (with
/// `cmsgpack`), list, sorted-set, hash and stream commands, `SCAN` (only
/// for [`flush`](ChannelLayer::flush), on every primary) and RESP3 (set
/// for you, on the subscription connections).
///
/// A node that is down affects only the groups (and process channels) whose
/// slots it serves: messages of the other shards keep arriving, neither
/// held up nor lost, through the outage and the node's return
/// (`tests/redis_cluster.rs`, `healthy_shards_lose_nothing_while_a_node_is_down`).
///
/// # Limits
///
/// Each subscription connection hands its messages to a handler that
/// never waits: it queues each message for the layer, up to 16 MiB of
/// payloads (all connections together). Past it a message is dropped (counted
/// in `dropped_other`): an event of a history group is read back from the
/// group's stream when the group's next event shows the gap, one of
/// another group is lost for this process. Redis's own
/// `client-output-buffer-limit pubsub` disconnects a client that falls too
/// far behind.
///
/// During a slot migration, a `SUNSUBSCRIBE` push that arrives while the
/// layer waits on that node's answer to a command takes the answer's place;
/// the layer notices (the answer names another channel, or is no `PONG`)
/// and reconnects to that node, so that node's other channels are
/// subscribed again after a short gap (history groups read back what they
/// missed; events of other groups in that gap are lost for the process).
///
/// Cloning is cheap and shares the connections and local state (a clone is
/// the same "process"). Dropping the last clone closes the connections.
#[derive(Clone)]
pub struct RedisClusterChannelLayer {
    mesh: MeshLayer<ClusterTransport>,
}

impl fmt::Debug for RedisClusterChannelLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisClusterChannelLayer")
            .field("prefix", &self.mesh.config().prefix)
            .field("process", &self.process_name())
            .field("capacity", &self.mesh.config().capacity)
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

    /// This instance's process name, `specific.<token>`.
    pub fn process_name(&self) -> &str {
        self.mesh.process_name()
    }

    /// Whether every primary answered the last health check and every
    /// wanted subscription is confirmed (false while a shard is down or a
    /// subscription is being retried).
    pub fn is_connected(&self) -> bool {
        self.mesh.transport().connected.get()
    }

    /// The key of `group`'s named members, `{prefix}:group:{<group>}`; its
    /// slot is the group name's, as is the slot of every key and shard
    /// channel of the group. Useful to see where a group lives
    /// (`CLUSTER KEYSLOT`).
    pub fn group_key(&self, group: &str) -> String {
        self.mesh.transport().layout.key("group", group)
    }
}

crate::channel_layer::mesh::delegate_to_mesh!(RedisClusterChannelLayer, mesh);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_hash_tags() {
        let layout = Layout::new("app", true);
        let slot = |key: &str| redis::cluster_routing::Slot::for_key(key);
        // Every key and shard channel of a group is on the group name's slot.
        for key in [
            layout.key("group", "lobby"),
            layout.key("history", "lobby"),
            layout.key("history-meta", "lobby"),
            format!("{}:procs", layout.key("presence", "lobby")),
            format!("{}:claim:x", layout.key("presence", "lobby")),
            layout.channel("app.group.lobby"),
            layout.channel("app.hlive.lobby"),
        ] {
            assert_eq!(slot(&key), slot("lobby"), "{key}");
        }
        assert_eq!(layout.key("group", "lobby"), "app:group:{lobby}");
        assert_eq!(layout.key("channel", "jobs"), "app:channel:{jobs}");
        assert_eq!(
            layout.channel("app.proc.specific.x"),
            "app.proc.{specific.x}"
        );
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
