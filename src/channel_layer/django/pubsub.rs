//! `channels_redis.pubsub.RedisPubSubChannelLayer`'s format: one Redis
//! Pub/Sub channel per channel name, `<prefix>__group__<name>` per group,
//! plain serialized dicts (no random prefix, no `__asgi_channel__`).

use std::{
    collections::HashSet,
    fmt,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use redis::Msg;
use tokio::sync::oneshot;

use super::{
    codec::{consistent_hash, Codec, Dict, Target},
    conn::Host,
    escape_glob, lock, BackendError, Counters, DjangoConfig,
};
use crate::channel_layer::{
    local::{no_such_channel, LocalChannels, Registry},
    names,
    redis_pubsub::{connect_bound, Command, Handler, Subscriber, SubscriberError},
    validate_channel_name, validate_group_name, BoxFuture, Capabilities, ChannelLayer,
    ChannelLayerError, ChannelLayerStats, ChannelReceiver, Event, Feature, GroupSendReport,
};

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
    /// Its Pub/Sub task, subscribed to what [`Inner::wanted`] says.
    subscriber: Subscriber,
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
        let mut tasks = Vec::new();
        for url in config.hosts() {
            let host = Host::connect(&url, config.timeout).await?;
            let (subscriber, task) = Subscriber::new();
            shards.push(Shard { host, subscriber });
            tasks.push(task);
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
        // Our channels' pattern, on every shard.
        let pattern = format!("{}!*", escape_glob(inner.process()));
        for (index, task) in tasks.into_iter().enumerate() {
            let handler = ToLayer {
                inner: Arc::downgrade(&inner),
                index,
            };
            let client = &inner.shards[index].host.client;
            task.start(client, vec![pattern.clone()], inner.config.timeout, handler)
                .await
                .map_err(|e| BackendError::Subscriber("cannot subscribe to Redis".into(), e))?;
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
                .subscriber
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
            .subscriber
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
    let bound = connect_bound(timeout);
    match tokio::time::timeout(bound, done).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(BackendError::Subscriber(what, e).into()),
        Ok(Err(_)) => Err(BackendError::SubscriberStopped.into()),
        Err(_) => Err(BackendError::Timeout(what, bound).into()),
    }
}

/// What a shard's Pub/Sub task does for the layer: subscribe to the
/// shard's channels local state wants, and deliver into the registry.
struct ToLayer {
    inner: Weak<Inner>,
    index: usize,
}

impl Handler for ToLayer {
    const WAIT_FOR_RECONNECT: bool = false;

    fn wanted(&self, channel: &str) -> bool {
        self.inner
            .upgrade()
            .is_some_and(|inner| inner.wanted(channel))
    }

    /// Every group and named channel this shard should carry.
    fn all_wanted(&self) -> Vec<String> {
        let Some(inner) = self.inner.upgrade() else {
            return Vec::new();
        };
        let mut wanted: Vec<String> = inner
            .registry
            .group_names()
            .iter()
            .map(|g| inner.group_channel(g))
            .collect();
        wanted.extend(lock(&inner.named).iter().cloned());
        wanted.retain(|c| consistent_hash(c, inner.shards.len()) == self.index);
        wanted
    }

    async fn message(&self, msg: &Msg) -> bool {
        let Some(inner) = self.inner.upgrade() else {
            return false;
        };
        inner.message(msg);
        true
    }

    async fn reconnected(&self) -> bool {
        self.inner.strong_count() > 0
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
                    .subscriber
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
