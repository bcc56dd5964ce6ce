//! `channels_redis.pubsub.RedisPubSubChannelLayer`'s format: one Redis
//! Pub/Sub channel per channel name, `<prefix>__group__<name>` per group,
//! plain serialized dicts (no random prefix, no `__asgi_channel__`).

use std::{
    collections::HashSet,
    fmt,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use futures_util::StreamExt;
use redis::{
    aio::{PubSubSink, PubSubStream},
    Msg,
};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

use super::{
    codec::{consistent_hash, Codec, Dict, Target},
    conn::{Host, CONNECT_TIMEOUT, RECONNECT_MAX, RECONNECT_MIN},
    escape_glob, lock, BackendError, Counters, DjangoConfig,
};
use crate::channel_layer::{
    local::{no_such_channel, LocalChannels, Registry},
    names,
    subscriber_error::SubscriberError,
    validate_channel_name, validate_group_name, BoxFuture, Capabilities, ChannelLayer,
    ChannelLayerError, ChannelLayerStats, ChannelReceiver, Event, Feature, GroupSendReport,
};

/// How often an idle Pub/Sub connection is checked with `PING`.
const HEALTH_CHECK: Duration = Duration::from_secs(5);

/// A [`ChannelLayer`] speaking `channels_redis.pubsub.RedisPubSubChannelLayer`'s
/// format; see the [module docs](super).
///
/// Cloning is cheap and shares the connections and local state. Dropping
/// the last clone stops its subscriber tasks.
#[derive(Clone)]
pub struct DjangoPubSubChannelLayer {
    inner: Arc<Inner>,
}

struct Inner {
    config: DjangoConfig,
    shards: Vec<Shard>,
    codec: Codec,
    /// `<prefix>__group__`.
    group_prefix: String,
    /// This process's channels; its process name is
    /// `<prefix>specific.<token>`.
    registry: Registry,
    /// Named channels received in this process.
    named: Mutex<HashSet<String>>,
    counters: Arc<Counters>,
}

struct Shard {
    host: Host,
    commands: mpsc::UnboundedSender<Command>,
}

type Ack = oneshot::Sender<Result<(), SubscriberError>>;

enum Command {
    /// Subscribe to or unsubscribe from one Redis channel to match local state.
    Sync { channel: String, ack: Option<Ack> },
    /// Same for every channel subscribed (after a flush).
    SyncAll { ack: Ack },
}

impl fmt::Debug for DjangoPubSubChannelLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DjangoPubSubChannelLayer")
            .field("hosts", &self.inner.config.hosts())
            .field("prefix", &self.inner.config.prefix)
            .field("process", &self.inner.process())
            .finish_non_exhaustive()
    }
}

impl DjangoPubSubChannelLayer {
    /// Connects to every host and subscribes to this process's channels.
    pub async fn connect(config: &DjangoConfig) -> Result<Self, ChannelLayerError> {
        config.validate()?;
        let config = config.clone();
        let codec = Codec::new(
            config.serializer_format,
            0,
            &config.symmetric_encryption_keys,
            None,
        )?;
        let mut shards = Vec::new();
        let mut receivers = Vec::new();
        for url in config.hosts() {
            let host = Host::connect(&url, config.timeout).await?;
            let (commands, rx) = mpsc::unbounded_channel();
            shards.push(Shard { host, commands });
            receivers.push(rx);
        }
        let process = format!("{}specific.{}", config.prefix, names::random_token(16));
        validate_channel_name(&format!("{process}!0"))
            .map_err(|e| BackendError::PrefixMakesInvalidNames(config.prefix.clone(), e))?;
        let inner = Arc::new(Inner {
            group_prefix: format!("{}__group__", config.prefix),
            shards,
            codec,
            registry: Registry::new(process),
            named: Mutex::default(),
            counters: Arc::default(),
            config,
        });
        for (index, commands) in receivers.into_iter().enumerate() {
            let conn = open(&inner, index)
                .await
                .map_err(|e| BackendError::Subscriber("cannot subscribe to Redis".into(), e))?;
            let sub = Subscriber {
                inner: Arc::downgrade(&inner),
                index,
                commands,
                conn: Some(conn),
                subscribed: HashSet::new(),
                backoff: RECONNECT_MIN,
                next_attempt: Instant::now(),
            };
            tokio::spawn(sub.run());
        }
        Ok(DjangoPubSubChannelLayer { inner })
    }

    /// The start of this instance's channel names, `<prefix>specific.<token>`.
    pub fn process_name(&self) -> &str {
        self.inner.process()
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

    /// Unsubscribes from the groups left without a local member, and from
    /// the channel itself if it was a named one.
    fn forgotten(self: &Arc<Self>, channel: &str, emptied: Vec<String>) {
        let mut unsync: Vec<String> = emptied.iter().map(|g| self.group_channel(g)).collect();
        if lock(&self.named).remove(channel) {
            unsync.push(channel.to_owned());
        }
        for channel in unsync {
            // The task is gone only when the layer is, and then nothing is subscribed.
            let _ = self
                .shard_of(&channel)
                .commands
                .send(Command::Sync { channel, ack: None });
        }
    }
}

impl Inner {
    fn shard_of(&self, redis_channel: &str) -> &Shard {
        &self.shards[consistent_hash(redis_channel, self.shards.len())]
    }

    fn group_channel(&self, group: &str) -> String {
        format!("{}{group}", self.group_prefix)
    }

    /// Whether this process should be subscribed to `redis_channel`.
    fn wanted(&self, redis_channel: &str) -> bool {
        match redis_channel.strip_prefix(self.group_prefix.as_str()) {
            Some(group) => self.registry.group_len(group) > 0,
            None => lock(&self.named).contains(redis_channel),
        }
    }

    /// Asks the shard of `redis_channel` to match the subscription to local
    /// state, and waits for it.
    async fn sync(&self, redis_channel: String) -> Result<(), ChannelLayerError> {
        let (ack, done) = oneshot::channel();
        let what = format!("subscribing to {redis_channel:?}");
        self.shard_of(&redis_channel)
            .commands
            .send(Command::Sync {
                channel: redis_channel,
                ack: Some(ack),
            })
            .map_err(|_| BackendError::SubscriberStopped)?;
        wait(done, what, self.config.timeout).await
    }

    fn message(&self, msg: &Msg) {
        let name = msg.get_channel_name();
        let event = match self.codec.deserialize(msg.get_payload_bytes()) {
            Ok(d) => d.event,
            Err(e) => {
                tracing::warn!(channel = name, "dropping a message: {e}");
                Counters::add(&self.counters.dropped_other, 1);
                return;
            }
        };
        match name.strip_prefix(self.group_prefix.as_str()) {
            Some(group) => {
                self.fan_out(group, &event);
            }
            None => self.deliver_remote(name, event),
        }
    }

    async fn publish(&self, channel: &str, payload: Vec<u8>) -> Result<usize, ChannelLayerError> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(channel).arg(payload);
        self.shard_of(channel).host.query("PUBLISH", &cmd).await
    }
}

async fn wait(
    done: oneshot::Receiver<Result<(), SubscriberError>>,
    what: String,
    timeout: Duration,
) -> Result<(), ChannelLayerError> {
    match tokio::time::timeout(timeout + CONNECT_TIMEOUT, done).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(BackendError::Subscriber(what, e).into()),
        Ok(Err(_)) => Err(BackendError::SubscriberStopped.into()),
        Err(_) => Err(BackendError::Timeout(what, timeout + CONNECT_TIMEOUT).into()),
    }
}

struct PubSub {
    sink: PubSubSink,
    stream: PubSubStream,
}

/// Opens shard `index`'s Pub/Sub connection: our channel pattern, then every
/// group and named channel this process needs there.
async fn open(inner: &Inner, index: usize) -> Result<PubSub, SubscriberError> {
    let timeout = inner.config.timeout;
    let host = &inner.shards[index].host;
    let pubsub = match tokio::time::timeout(
        CONNECT_TIMEOUT.min(timeout) + timeout,
        host.client.get_async_pubsub(),
    )
    .await
    {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Err(SubscriberError::Connect(Arc::new(e))),
        Err(_) => return Err(SubscriberError::ConnectTimeout),
    };
    let (mut sink, stream) = pubsub.split();
    let pattern = format!("{}!*", escape_glob(inner.process()));
    within(timeout, "PSUBSCRIBE", sink.psubscribe(pattern)).await?;
    Ok(PubSub { sink, stream })
}

async fn within(
    timeout: Duration,
    what: &str,
    fut: impl std::future::Future<Output = redis::RedisResult<()>>,
) -> Result<(), SubscriberError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(SubscriberError::Command(what.to_owned(), Arc::new(e))),
        Err(_) => Err(SubscriberError::CommandTimeout(what.to_owned(), timeout)),
    }
}

/// Owns one shard's Pub/Sub connection; reconnects and re-subscribes.
struct Subscriber {
    inner: Weak<Inner>,
    index: usize,
    commands: mpsc::UnboundedReceiver<Command>,
    conn: Option<PubSub>,
    /// Redis channels subscribed on the current connection.
    subscribed: HashSet<String>,
    backoff: Duration,
    next_attempt: Instant,
}

enum Wake {
    Command(Option<Command>),
    Message(Option<Msg>),
    Ping,
    Retry,
}

impl Subscriber {
    async fn run(mut self) {
        let mut ping = tokio::time::interval_at(Instant::now() + HEALTH_CHECK, HEALTH_CHECK);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.conn.is_none() && Instant::now() >= self.next_attempt {
                let Some(inner) = self.inner.upgrade() else {
                    return;
                };
                self.reconnect(&inner).await;
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
            let Some(inner) = self.inner.upgrade() else {
                return;
            };
            match wake {
                Wake::Command(None) => return,
                Wake::Command(Some(Command::Sync { channel, ack })) => {
                    let result = self.reconcile(&inner, vec![channel]).await;
                    if let Some(ack) = ack {
                        let _ = ack.send(result);
                    }
                }
                Wake::Command(Some(Command::SyncAll { ack })) => {
                    let all = self.subscribed.iter().cloned().collect();
                    let _ = ack.send(self.reconcile(&inner, all).await);
                }
                Wake::Message(Some(msg)) => inner.message(&msg),
                Wake::Message(None) => self.disconnected("the Redis Pub/Sub connection closed"),
                Wake::Ping => {
                    if let Some(conn) = self.conn.as_mut() {
                        let pinged = tokio::time::timeout(
                            inner.config.timeout,
                            conn.sink.ping::<redis::Value>(),
                        )
                        .await;
                        if !matches!(pinged, Ok(Ok(_))) {
                            self.disconnected("Redis Pub/Sub PING failed");
                        }
                    }
                }
                Wake::Retry => {}
            }
        }
    }

    async fn reconnect(&mut self, inner: &Inner) {
        match open(inner, self.index).await {
            Ok(conn) => {
                self.conn = Some(conn);
                self.subscribed.clear();
                self.backoff = RECONNECT_MIN;
                // Everything this shard should carry.
                let mut wanted: Vec<String> = inner
                    .registry
                    .group_names()
                    .iter()
                    .map(|g| inner.group_channel(g))
                    .collect();
                wanted.extend(lock(&inner.named).iter().cloned());
                wanted.retain(|c| consistent_hash(c, inner.shards.len()) == self.index);
                if let Err(e) = self.reconcile(inner, wanted).await {
                    tracing::debug!("re-subscribing failed: {e}");
                } else {
                    tracing::info!(process = %inner.process(), "connected to Redis Pub/Sub and subscribed");
                }
            }
            Err(e) => {
                tracing::debug!(retry_in = ?self.backoff, "Redis Pub/Sub reconnect failed: {e}");
                self.next_attempt = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
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
    }

    /// Subscribes to the channels that local state needs and unsubscribes
    /// from the others, among `channels`.
    async fn reconcile(
        &mut self,
        inner: &Inner,
        channels: Vec<String>,
    ) -> Result<(), SubscriberError> {
        let (mut sub, mut unsub) = (Vec::new(), Vec::new());
        for c in channels {
            match (inner.wanted(&c), self.subscribed.contains(&c)) {
                (true, false) => sub.push(c),
                (false, true) => unsub.push(c),
                _ => {}
            }
        }
        if sub.is_empty() && unsub.is_empty() {
            return Ok(());
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(SubscriberError::Reconnecting);
        };
        let timeout = inner.config.timeout;
        let mut result = Ok(());
        if !unsub.is_empty() {
            result = within(timeout, "UNSUBSCRIBE", conn.sink.unsubscribe(&unsub)).await;
            if result.is_ok() {
                for c in &unsub {
                    self.subscribed.remove(c);
                }
            }
        }
        if result.is_ok() && !sub.is_empty() {
            result = within(timeout, "SUBSCRIBE", conn.sink.subscribe(&sub)).await;
            if result.is_ok() {
                self.subscribed.extend(sub);
            }
        }
        if let Err(e) = &result {
            self.disconnected(&e.to_string());
        }
        result
    }
}

impl ChannelLayer for DjangoPubSubChannelLayer {
    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE.with(Feature::CrossProcess)
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
            if let Some(rx) = inner.receive_local(channel)? {
                return Ok(rx);
            }
            // A named channel: listed in `named` before `sync`, which
            // subscribes to what is listed.
            let rx = inner.register(channel.to_owned())?;
            lock(&inner.named).insert(channel.to_owned());
            inner.sync(channel.to_owned()).await?;
            Ok(rx)
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
            if inner.registry.is_local(channel) {
                return inner.registry.send(channel, event);
            }
            let payload = inner
                .codec
                .serialize(&Dict::from_event(&event)?, &Target::None)?;
            match inner.publish(channel, payload).await? {
                0 => Err(no_such_channel(channel)),
                _ => Ok(()),
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
            if !inner.registry.is_local(channel) {
                return Err(BackendError::ForeignChannel(channel.to_owned()).into());
            }
            inner.registry.group_add(group, channel)?;
            inner.sync(inner.group_channel(group)).await
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
            if !inner.registry.is_local(channel) {
                return Ok(());
            }
            inner.registry.group_discard(group, channel);
            inner.sync(inner.group_channel(group)).await
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
            let payload = inner
                .codec
                .serialize(&Dict::from_event(&event)?, &Target::None)?;
            let receivers = inner.publish(&inner.group_channel(group), payload).await?;
            inner.counters.group_sent(0);
            Ok(GroupSendReport {
                position: None,
                local_members: 0,
                remote_receivers: Some(receivers),
                dropped: 0,
            })
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ChannelLayerError>> {
        Box::pin(async move {
            let inner = &self.inner;
            inner.registry.clear();
            for shard in &inner.shards {
                let (ack, done) = oneshot::channel();
                shard
                    .commands
                    .send(Command::SyncAll { ack })
                    .map_err(|_| BackendError::SubscriberStopped)?;
                wait(
                    done,
                    "unsubscribing from every group".into(),
                    inner.config.timeout,
                )
                .await?;
            }
            Ok(())
        })
    }

    fn stats(&self) -> ChannelLayerStats {
        self.inner.counters.stats()
    }
}
