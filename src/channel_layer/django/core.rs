//! `channels_redis.core.RedisChannelLayer`'s format: sorted sets of
//! messages per process (`<prefix>specific.<client>!`) or named channel,
//! groups as sorted sets `<prefix>:group:<name>` scored by join time.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, Weak,
    },
    time::Duration,
};

use tokio::{runtime::Handle, sync::watch};

use super::{
    codec::{consistent_hash, Codec, Dict, Target},
    conn::Host,
    escape_glob, lock, now_secs_f64, Counters, DjangoConfig,
};
use crate::channel_layer::{
    local::{LocalChannels, Registry},
    names, redis_keys,
    redis_pubsub::{RECONNECT_MAX, RECONNECT_MIN},
    validate_channel_name, validate_group_name, BoxFuture, Capabilities, ChannelLayer,
    ChannelLayerError, ChannelLayerStats, ChannelReceiver, ChannelSender, Delivery, Event, Feature,
    GroupSendReport,
};

/// How long one `BZPOPMIN` blocks (channels_redis' `brpop_timeout`).
const BLOCK: Duration = Duration::from_secs(5);
/// A `BZPOPMIN` reply: key, member, score (nil on timeout).
type BzPopMin = Option<(Vec<u8>, Vec<u8>, f64)>;

/// Messages taken per `ZPOPMIN` when the process key is not empty.
const BATCH: usize = 100;

/// `KEYS[1]` message key; `ARGV`: message, now, expiry, capacity.
/// channels_redis' `send` as one atomic step. Returns 1 if added, 0 if full.
const SEND_SCRIPT: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, math.floor(tonumber(ARGV[2])) - tonumber(ARGV[3]))
if redis.call('ZCOUNT', KEYS[1], '-inf', '+inf') >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
";

/// `KEYS`: message keys of one host; `ARGV`: one message per key, one
/// capacity per key, now, expiry. channels_redis' group-send script with its
/// expiry pipeline folded in. Returns the 1-based indexes of full keys.
const GROUP_SEND_SCRIPT: &str = r"
local n = #KEYS
local now = ARGV[2 * n + 1]
local expiry = ARGV[2 * n + 2]
local full = {}
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], 0, math.floor(tonumber(now)) - tonumber(expiry))
  if redis.call('ZCOUNT', KEYS[i], '-inf', '+inf') < tonumber(ARGV[n + i]) then
    redis.call('ZADD', KEYS[i], now, ARGV[i])
    redis.call('EXPIRE', KEYS[i], expiry)
  else
    full[#full + 1] = i
  end
end
return full
";

/// A [`ChannelLayer`] speaking `channels_redis.core.RedisChannelLayer`'s
/// format; see the [module docs](super).
///
/// Cloning is cheap and shares the connections and local state (a clone is
/// the same "process"). Dropping the last clone stops its background tasks.
#[derive(Clone)]
pub struct DjangoChannelLayer {
    inner: Arc<Inner>,
}

struct Inner {
    config: DjangoConfig,
    hosts: Vec<Host>,
    codec: Arc<Codec>,
    send_index: AtomicUsize,
    /// This process's channels; its process name is `specific.<client
    /// prefix>`, and with the `!`, channels_redis' non-local name of our
    /// channels.
    registry: Registry,
    /// Groups of each local channel (for the refresh task and for leaving
    /// them when a receiver is dropped).
    memberships: Mutex<HashMap<String, HashSet<String>>>,
    counters: Arc<Counters>,
    send_script: redis::Script,
    group_send_script: redis::Script,
    runtime: Handle,
    /// Dropped with the layer: tells the background tasks to stop.
    _shutdown: watch::Sender<()>,
}

impl fmt::Debug for DjangoChannelLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DjangoChannelLayer")
            .field("hosts", &self.inner.config.hosts())
            .field("prefix", &self.inner.config.prefix)
            .field("process", &self.inner.process())
            .finish_non_exhaustive()
    }
}

impl DjangoChannelLayer {
    /// Connects to every host and starts receiving this process's key.
    /// Fails when a host cannot be reached within the timeout or the
    /// configuration cannot work (see the [module docs](super#configuration)).
    pub async fn connect(config: &DjangoConfig) -> Result<Self, ChannelLayerError> {
        config.validate()?;
        let config = config.clone();
        let mut hosts = Vec::new();
        for url in config.hosts() {
            hosts.push(Host::connect(&url, config.timeout).await?);
        }
        let codec = Codec::new(
            config.serializer_format,
            config.random_prefix_length,
            &config.symmetric_encryption_keys,
            Some(config.expiry.as_secs() + 10),
        )?;
        // channels_redis' client prefix is a uuid4 hex: 32 hex digits.
        let client = format!("{:016x}{:016x}", names::random_u64(), names::random_u64());
        let (shutdown, stopped) = watch::channel(());
        let inner = Arc::new(Inner {
            hosts,
            codec: Arc::new(codec),
            send_index: AtomicUsize::new(0),
            registry: Registry::new(format!("specific.{client}")),
            memberships: Mutex::default(),
            counters: Arc::default(),
            send_script: redis::Script::new(SEND_SCRIPT),
            group_send_script: redis::Script::new(GROUP_SEND_SCRIPT),
            runtime: Handle::current(),
            _shutdown: shutdown,
            config,
        });
        let key = format!("{}{}!", inner.config.prefix, inner.process());
        // Read our process key on every host: Django's `send` may put
        // messages on the host of the full channel name (see the module docs).
        for host in &inner.hosts {
            let pop = Popper {
                host: host.clone(),
                key: key.clone(),
                stopped: stopped.clone(),
                sink: Sink::Process(Arc::downgrade(&inner)),
            };
            tokio::spawn(pop.run());
        }
        tokio::spawn(refresh(Arc::downgrade(&inner), stopped));
        Ok(DjangoChannelLayer { inner })
    }

    /// This instance's process name, `specific.<client prefix>`: the part of
    /// its channel names before the `!`.
    pub fn process_name(&self) -> &str {
        self.inner.process()
    }
}

/// channels_redis' `non_local_name`: up to and including the `!`.
fn non_local(channel: &str) -> &str {
    match channel.find('!') {
        Some(i) => &channel[..=i],
        None => channel,
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

    /// Leaves the channel's groups in Redis too.
    fn forgotten(self: &Arc<Self>, channel: &str, _emptied: Vec<String>) {
        let Some(groups) = lock(&self.memberships).remove(channel) else {
            return;
        };
        let inner = self.clone();
        let name = channel.to_owned();
        self.runtime.spawn(async move {
            for group in groups {
                let mut zrem = redis::cmd("ZREM");
                zrem.arg(inner.group_key(&group)).arg(&name);
                if let Err(e) = inner.group_host(&group).query::<()>("ZREM", &zrem).await {
                    tracing::debug!(group, channel = name, "leaving a group failed: {e}");
                }
            }
        });
    }
}

impl Inner {
    fn group_key(&self, group: &str) -> String {
        format!("{}:group:{group}", self.config.prefix)
    }

    fn group_host(&self, group: &str) -> &Host {
        &self.hosts[consistent_hash(group, self.hosts.len())]
    }

    /// A message popped from our process key.
    fn deliver(&self, bytes: &[u8]) {
        let decoded = match self.codec.deserialize(bytes) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(process = %self.process(), "dropping a message: {e}");
                Counters::add(&self.counters.dropped_other, 1);
                return;
            }
        };
        // Unlike `deliver_remote`, a delivered message counts in `delivered`.
        let one = |channel: &str| match self.registry.send_lossy(channel, decoded.event.clone()) {
            Some(Delivery::Delivered) => Counters::add(&self.counters.delivered, 1),
            Some(Delivery::Dropped) => Counters::add(&self.counters.dropped_full, 1),
            Some(Delivery::Closed) | None => Counters::add(&self.counters.dropped_other, 1),
        };
        match &decoded.target {
            Target::One(c) => one(c),
            Target::Many(cs) => cs.iter().for_each(|c| one(c)),
            Target::None => Counters::add(&self.counters.dropped_other, 1),
        }
    }

    async fn zadd_members(&self, group: &str, channels: &[&str]) -> Result<(), ChannelLayerError> {
        let key = self.group_key(group);
        let now = now_secs_f64();
        let mut pipe = redis::pipe();
        let zadd = pipe.cmd("ZADD").arg(&key);
        for c in channels {
            zadd.arg(now).arg(*c);
        }
        zadd.ignore();
        pipe.cmd("EXPIRE")
            .arg(&key)
            .arg(self.config.group_expiry.as_secs())
            .ignore();
        self.group_host(group).query_pipe("ZADD", &pipe).await
    }

    async fn flush_host(&self, host: &Host) -> Result<(), ChannelLayerError> {
        let pattern = format!("{}*", escape_glob(&self.config.prefix));
        redis_keys::delete_matching(host, &pattern).await
    }
}

/// Re-adds this process's memberships well within `group_expiry`.
async fn refresh(inner: Weak<Inner>, mut stopped: watch::Receiver<()>) {
    let every = match inner.upgrade() {
        Some(i) => i.config.refresh_interval(),
        None => return,
    };
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tick.tick() => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        let mut by_group: HashMap<String, Vec<String>> = HashMap::new();
        for (channel, groups) in lock(&inner.memberships).iter() {
            for g in groups {
                by_group.entry(g.clone()).or_default().push(channel.clone());
            }
        }
        for (group, channels) in by_group {
            let refs: Vec<&str> = channels.iter().map(String::as_str).collect();
            if let Err(e) = inner.zadd_members(&group, &refs).await {
                tracing::warn!(group, "refreshing group memberships failed: {e}");
            }
        }
    }
}

enum Sink {
    /// Our process key: deliver to local channels by `__asgi_channel__`.
    Process(Weak<Inner>),
    /// A named channel's key: one receiver, waited on when full.
    Named {
        sender: ChannelSender,
        codec: Arc<Codec>,
        counters: Arc<Counters>,
    },
}

/// Pops one key on one host: `ZPOPMIN` batches while it has messages, a
/// blocking `BZPOPMIN` when it is empty; reconnects on errors.
struct Popper {
    host: Host,
    key: String,
    stopped: watch::Receiver<()>,
    sink: Sink,
}

impl Popper {
    async fn run(mut self) {
        let mut backoff = RECONNECT_MIN;
        let mut conn = None;
        loop {
            let Some(c) = conn.as_mut() else {
                let connected = tokio::select! {
                    _ = self.stopped.changed() => return,
                    c = self.host.blocking_connection(BLOCK) => c,
                };
                match connected {
                    Ok(c) => {
                        conn = Some(c);
                        backoff = RECONNECT_MIN;
                    }
                    Err(e) => {
                        tracing::debug!(key = %self.key, host = %self.host.url, "Redis reconnect failed: {e}");
                        tokio::select! {
                            _ = self.stopped.changed() => return,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(RECONNECT_MAX);
                    }
                }
                continue;
            };
            let batch = match &self.sink {
                Sink::Process(_) => BATCH,
                Sink::Named { .. } => 1,
            };
            let mut zpop = redis::cmd("ZPOPMIN");
            zpop.arg(&self.key).arg(batch);
            let popped: redis::RedisResult<Vec<(Vec<u8>, f64)>> = tokio::select! {
                biased;
                _ = self.stopped.changed() => return,
                r = zpop.query_async(c) => r,
            };
            let items = match popped {
                Ok(items) if !items.is_empty() => items.into_iter().map(|(m, _)| m).collect(),
                Ok(_) => {
                    let mut bzpop = redis::cmd("BZPOPMIN");
                    bzpop.arg(&self.key).arg(BLOCK.as_secs());
                    let r: redis::RedisResult<BzPopMin> = tokio::select! {
                        biased;
                        _ = self.stopped.changed() => return,
                        r = bzpop.query_async(c) => r,
                    };
                    match r {
                        Ok(Some((_, member, _))) => vec![member],
                        Ok(None) => continue,
                        Err(e) => {
                            tracing::warn!(key = %self.key, "BZPOPMIN failed: {e}; reconnecting");
                            conn = None;
                            continue;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(key = %self.key, "ZPOPMIN failed: {e}; reconnecting");
                    conn = None;
                    continue;
                }
            };
            for item in items {
                if !self.deliver(&item).await {
                    return;
                }
            }
        }
    }

    /// Returns false when there is nobody left to deliver to.
    async fn deliver(&mut self, item: &[u8]) -> bool {
        match &self.sink {
            Sink::Process(inner) => match inner.upgrade() {
                Some(inner) => {
                    inner.deliver(item);
                    true
                }
                None => false,
            },
            Sink::Named {
                sender,
                codec,
                counters,
            } => {
                let event = match codec.deserialize(item) {
                    Ok(d) => d.event,
                    Err(e) => {
                        tracing::warn!(key = %self.key, "dropping a message: {e}");
                        Counters::add(&counters.dropped_other, 1);
                        return true;
                    }
                };
                let sender = sender.clone();
                tokio::select! {
                    _ = self.stopped.changed() => false,
                    sent = sender.send(event) => sent.is_ok(),
                }
            }
        }
    }
}

impl ChannelLayer for DjangoChannelLayer {
    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
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
            if let Some(rx) = inner.receive_local(channel)? {
                return Ok(rx);
            }
            // A named channel: messages go round-robin over the hosts, so
            // read it on each.
            let (tx, rx) = crate::channel_layer::channel(channel, inner.config.capacity);
            let (stop, stopped) = watch::channel(());
            let codec = inner.codec.clone();
            for host in &inner.hosts {
                let pop = Popper {
                    host: host.clone(),
                    key: format!("{}{channel}", inner.config.prefix),
                    stopped: stopped.clone(),
                    sink: Sink::Named {
                        sender: tx.clone(),
                        codec: codec.clone(),
                        counters: inner.counters.clone(),
                    },
                };
                tokio::spawn(pop.run());
            }
            Ok(rx.on_drop(move || drop(stop)))
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
            let dict = Dict::from_event(&event)?;
            let (key, host, target) = if channel.contains('!') {
                let nl = non_local(channel);
                (
                    format!("{}{nl}", inner.config.prefix),
                    consistent_hash(nl, inner.hosts.len()),
                    Target::One(channel.to_owned()),
                )
            } else {
                let i = inner.send_index.fetch_add(1, Ordering::Relaxed) % inner.hosts.len();
                (format!("{}{channel}", inner.config.prefix), i, Target::None)
            };
            let message = inner.codec.serialize(&dict, &target)?;
            let mut invocation = inner.send_script.key(&key);
            invocation
                .arg(message)
                .arg(now_secs_f64())
                .arg(inner.config.expiry.as_secs())
                .arg(inner.config.capacity_of(channel));
            let added: i64 = inner.hosts[host].eval("send", &invocation).await?;
            if added == 0 {
                return Err(ChannelLayerError::ChannelFull {
                    channel: channel.to_owned(),
                });
            }
            Ok(())
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
            if inner.registry.is_local(channel) {
                inner.registry.group_add(group, channel)?;
                lock(&inner.memberships)
                    .entry(channel.to_owned())
                    .or_default()
                    .insert(group.to_owned());
            }
            inner.zadd_members(group, &[channel]).await
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
            if inner.registry.is_local(channel) {
                inner.registry.group_discard(group, channel);
                if let Some(groups) = lock(&inner.memberships).get_mut(channel) {
                    groups.remove(group);
                }
            }
            let mut zrem = redis::cmd("ZREM");
            zrem.arg(inner.group_key(group)).arg(channel);
            inner.group_host(group).query("ZREM", &zrem).await
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
            let key = inner.group_key(group);
            let now = now_secs_f64();
            let mut pipe = redis::pipe();
            pipe.cmd("ZREMRANGEBYSCORE")
                .arg(&key)
                .arg(0)
                .arg(now as u64 - inner.config.group_expiry.as_secs().min(now as u64))
                .ignore()
                .cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1);
            let (members,): (Vec<String>,) = inner
                .group_host(group)
                .query_pipe("group send", &pipe)
                .await?;

            // Other processes' keys (and named channels), each with the
            // channels it carries, bucketed by host as channels_redis does.
            let mut keys: HashMap<String, (usize, usize, Vec<String>)> = HashMap::new();
            for member in members {
                if inner.registry.is_local(&member) || validate_channel_name(&member).is_err() {
                    continue;
                }
                let nl = non_local(&member);
                let key = format!("{}{nl}", inner.config.prefix);
                let entry = keys.entry(key).or_insert_with(|| {
                    (
                        consistent_hash(nl, inner.hosts.len()),
                        inner.config.capacity_of(&member),
                        Vec::new(),
                    )
                });
                entry.2.push(member);
            }
            let (mut pushed, mut full) = (0, 0);
            if !keys.is_empty() {
                let dict = Dict::from_event(&event)?;
                let mut by_host: HashMap<usize, Vec<(String, usize, Vec<String>)>> = HashMap::new();
                for (key, (host, capacity, channels)) in keys {
                    by_host
                        .entry(host)
                        .or_default()
                        .push((key, capacity, channels));
                }
                for (host, entries) in by_host {
                    let mut invocation = inner.group_send_script.prepare_invoke();
                    for (key, _, _) in &entries {
                        invocation.key(key);
                    }
                    for (_, _, channels) in &entries {
                        let target = Target::Many(channels.clone());
                        invocation.arg(inner.codec.serialize(&dict, &target)?);
                    }
                    for (_, capacity, _) in &entries {
                        invocation.arg(*capacity);
                    }
                    invocation.arg(now).arg(inner.config.expiry.as_secs());
                    let over: Vec<usize> =
                        inner.hosts[host].eval("group send", &invocation).await?;
                    for i in &over {
                        if let Some((key, _, channels)) =
                            i.checked_sub(1).and_then(|i| entries.get(i))
                        {
                            tracing::info!(group, key, "channel over capacity in group send");
                            full += channels.len();
                        }
                    }
                    pushed += entries.len().saturating_sub(over.len());
                }
            }
            let (delivered, dropped) = inner.fan_out(group, &event);
            inner.counters.group_sent(dropped + full);
            Ok(GroupSendReport {
                position: None,
                local_members: delivered,
                remote_receivers: Some(pushed),
                dropped: dropped + full,
            })
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ChannelLayerError>> {
        Box::pin(async move {
            let inner = &self.inner;
            inner.registry.clear();
            lock(&inner.memberships).clear();
            for host in &inner.hosts {
                inner.flush_host(host).await?;
            }
            Ok(())
        })
    }

    fn stats(&self) -> ChannelLayerStats {
        self.inner.counters.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_local_names() {
        assert_eq!(non_local("specific.abc!def"), "specific.abc!");
        assert_eq!(non_local("thumbnails"), "thumbnails");
    }

    #[tokio::test]
    async fn unreachable_redis_fails_promptly() {
        let started = std::time::Instant::now();
        let config = DjangoConfig::new(["redis://127.0.0.1:1"]).timeout(Duration::from_millis(300));
        assert!(DjangoChannelLayer::connect(&config).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            DjangoChannelLayer::connect(&DjangoConfig::new(["not a url"]))
                .await
                .is_err()
        );
    }
}
