//! A channel layer on NATS that spans processes (feature `nats`).
//!
//! [`NatsChannelLayer`] does what [`RedisChannelLayer`](super) does with
//! NATS core subjects: consumers in several processes share groups, send
//! to each other's channels, and share worker channels. NATS routes every
//! message only to the servers and clients that subscribe to its subject,
//! and a NATS cluster (or supercluster) spreads subjects over its servers,
//! so it scales out without shards to plan.
//!
//! ```
//! use std::sync::Arc;
//! use tower_channels::channel_layer::nats::NatsChannelLayer;
//! use tower_channels::channel_layer::{BoxError, ChannelLayer, Event};
//!
//! async fn doc_main() -> Result<(), BoxError> {
//!     let layer = NatsChannelLayer::builder("nats://127.0.0.1:4222")
//!         .prefix("myapp") // subjects start with "myapp."
//!         .capacity(100)
//!         .build()
//!         .await?;
//!     let layer: Arc<dyn ChannelLayer> = Arc::new(layer);
//!
//!     let mut inbox = layer.new_channel().await?;
//!     layer.group_add("lobby", inbox.name()).await?;
//!     layer.group_send("lobby", Event::text("chat.message", "hello")).await?;
//!     assert_eq!(inbox.recv().await?.kind(), "chat.message");
//!
//!     // A worker channel, load-balanced over the processes receiving it:
//!     let mut jobs = layer.receive("thumbnails").await?;
//!     layer.send("thumbnails", Event::bare("thumbnail.make")).await?;
//!     assert_eq!(jobs.recv().await?.kind(), "thumbnail.make");
//!     Ok(())
//! }
//! ```
//!
//! # How it works
//!
//! * **Groups are subjects.** A process subscribes to `{prefix}.group.{group}`
//!   while at least one of its channels is a member (one subscription per
//!   group, whatever the number of members), and unsubscribes when the last
//!   one leaves. [`group_send`](ChannelLayer::group_send) encodes the event
//!   once and publishes it once; each subscribed process hands it to its
//!   local members with [`ChannelSender::send_lossy`](super::ChannelSender::send_lossy)
//!   (a full member drops it, is counted and sees
//!   [`RecvError::Lagged`](super::RecvError::Lagged)). The sending process
//!   delivers to its own members directly. NATS does not tell a publisher
//!   how many subscribers got a message, so
//!   [`GroupSendReport::remote_receivers`] is `None`.
//! * **Direct sends** to a channel `specific.<token>!<n>` of another process
//!   are a NATS request to that process's subject `{prefix}.proc.specific.<token>`;
//!   the process routes it to the channel and answers, so the sender gets
//!   [`ChannelLayerError::ChannelFull`] and [`ChannelLayerError::NoSuchChannel`]
//!   exactly (NATS answers "no responders" when the process is gone).
//! * **Worker channels** (names without `!`, consumed with
//!   [`receive`](ChannelLayer::receive)) are queue-group subscriptions to
//!   `{prefix}.channel.{name}`: NATS hands each send to one receiver among
//!   all processes. A send is a request too: it fails with `NoSuchChannel`
//!   when nobody receives the channel, and with `ChannelFull` when the
//!   receiver NATS picked is full. Nothing is queued on the server.
//! * **Membership** of another process's channel
//!   ([`group_add`](ChannelLayer::group_add) with a channel made elsewhere)
//!   is a request to that process, which subscribes before it answers.
//!
//! Every message is a MessagePack array `[origin, op, channel, event]`
//! (`event` in the [channel layer wire format](super#wire-format)).
//!
//! # Faults
//!
//! async-nats reconnects by itself (50 ms doubling up to 1 s here) and
//! subscribes again to every live subscription, so groups, process and
//! worker channels work again after a NATS restart without any action. While
//! it is disconnected, sends to other processes fail at once with
//! [`ChannelLayerError::Backend`] (`not connected to NATS`) instead of being
//! buffered, and [`is_connected`](NatsChannelLayer::is_connected) is false;
//! sends within the process keep working. Events published while a process
//! is disconnected are lost for it (at most once, as in Django Channels).
//! Each subscription buffers at most `capacity` messages on the client;
//! beyond that async-nats drops them (a slow consumer) and the layer counts
//! them in [`ChannelLayerStats::dropped_other`].
//!
//! # Not yet supported
//!
//! * Named (worker) channels as group members: core NATS stores nothing, so
//!   such a membership needs JetStream; `group_add` of a name without `!`
//!   fails with a clear error.
//! * Presence and history on JetStream (KV for presence, a stream per
//!   history group) are not implemented yet.
//!
//! # Why async-nats
//!
//! [async-nats](https://docs.rs/async-nats) (re-exported as [`async_nats`])
//! is the NATS maintainers' own Rust client, on tokio, with reconnection,
//! re-subscription, queue groups, request/reply and JetStream.

mod wire;

pub use async_nats;

use std::{
    collections::HashMap,
    fmt,
    sync::{atomic::Ordering, Arc, Weak},
    time::Duration,
};

use async_nats::{client::RequestErrorKind, connection::State, Client, Subscriber};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::{sync::mpsc, task::JoinHandle};

use self::wire::Envelope;
use super::{
    local::{no_such_channel, Counters, LocalChannels, Owner, Registry},
    names, validate_channel_name, validate_group_name, BoxError, BoxFuture, ChannelLayer,
    ChannelLayerError, ChannelLayerStats, ChannelReceiver, ChannelSender, Event, GroupSendReport,
    TrySendError, DEFAULT_CAPACITY,
};

/// The default subject prefix.
pub const DEFAULT_PREFIX: &str = "tower-channels";
/// The default timeout of requests (direct sends, membership changes) and
/// subscription round trips.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// The queue group of worker-channel subscriptions.
const QUEUE_GROUP: &str = "tower-channels-workers";
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// Configures and connects a [`NatsChannelLayer`]; made by
/// [`NatsChannelLayer::builder`].
#[must_use = "call .build().await to connect"]
pub struct NatsChannelLayerBuilder {
    url: String,
    prefix: String,
    capacity: usize,
    timeout: Duration,
    options: Option<async_nats::ConnectOptions>,
}

impl fmt::Debug for NatsChannelLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsChannelLayerBuilder")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .field("capacity", &self.capacity)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl NatsChannelLayerBuilder {
    /// The first token(s) of every subject (default [`DEFAULT_PREFIX`]).
    /// Applications sharing a NATS account use different prefixes.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Events a channel holds before direct sends fail with
    /// [`ChannelLayerError::ChannelFull`] and group sends drop (default
    /// [`DEFAULT_CAPACITY`]); also the client-side buffer of each subscription.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// How long a request or subscription may take before it fails (default
    /// [`DEFAULT_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(10));
        self
    }

    /// Connect options (credentials, TLS, name...) to start from; the layer
    /// sets its own timeouts, reconnect policy and buffer sizes on them.
    pub fn options(mut self, options: async_nats::ConnectOptions) -> Self {
        self.options = Some(options);
        self
    }

    /// Connects to NATS and subscribes to this process's subject. Fails when
    /// NATS cannot be reached within the timeout.
    pub async fn build(self) -> Result<NatsChannelLayer, ChannelLayerError> {
        let prefix_ok = !self.prefix.is_empty()
            && self.prefix.split('.').all(|t| {
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !prefix_ok {
            return Err(NatsError::Other(format!(
                "invalid NATS subject prefix {:?}: dot-separated tokens of ASCII letters, digits, '-' and '_'",
                self.prefix
            ))
            .into());
        }
        let counters = Arc::new(Counters::default());
        let slow = counters.clone();
        let options = self
            .options
            .unwrap_or_default()
            .connection_timeout(self.timeout)
            .request_timeout(Some(self.timeout))
            .subscription_capacity(self.capacity)
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                let shift = u32::try_from(attempts.min(8)).unwrap_or(8);
                (RECONNECT_MIN * 2u32.pow(shift)).min(RECONNECT_MAX)
            })
            .event_callback(move |event| {
                let slow = slow.clone();
                async move {
                    match event {
                        async_nats::Event::SlowConsumer(_) => {
                            slow.dropped_other.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!("NATS subscription overflowed (slow consumer); a message was dropped");
                        }
                        async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
                        async_nats::Event::Connected => tracing::info!("connected to NATS"),
                        other => tracing::debug!("NATS: {other}"),
                    }
                }
            });
        let client = match tokio::time::timeout(
            self.timeout * 2,
            options.connect(self.url.as_str()),
        )
        .await
        {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                return Err(NatsError::Nats("cannot connect to NATS".into(), e.into()).into())
            }
            Err(_) => {
                return Err(
                    NatsError::Timeout("connecting to NATS".into(), self.timeout * 2).into(),
                )
            }
        };

        let process = format!("specific.{}", names::random_token(12));
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            proc_subject: format!("{}.proc.{process}", self.prefix),
            prefix: self.prefix,
            capacity: self.capacity,
            timeout: self.timeout,
            client,
            registry: Registry::new(process),
            groups: tokio::sync::Mutex::default(),
            commands,
            counters,
        });
        let sub = inner.subscribe(inner.proc_subject.clone(), None).await?;
        let weak = Arc::downgrade(&inner);
        let proc_task = tokio::spawn(process_loop(weak.clone(), sub));
        tokio::spawn(sync_loop(weak, commands_rx));
        Ok(NatsChannelLayer {
            inner,
            _proc_task: Arc::new(AbortOnDrop(proc_task)),
        })
    }
}

/// A [`ChannelLayer`] on NATS core subjects. See the [module docs](self).
///
/// Cloning is cheap and shares the connection and local state (a clone is
/// the same "process"). Dropping the last clone unsubscribes everything.
#[derive(Clone)]
pub struct NatsChannelLayer {
    inner: Arc<Inner>,
    _proc_task: Arc<AbortOnDrop>,
}

impl fmt::Debug for NatsChannelLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsChannelLayer")
            .field("prefix", &self.inner.prefix)
            .field("process", &self.inner.process())
            .field("capacity", &self.inner.capacity)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl NatsChannelLayer {
    /// Connects with every default. `url` is a NATS URL such as
    /// `nats://127.0.0.1:4222` (or several, comma-separated).
    pub async fn connect(url: &str) -> Result<Self, ChannelLayerError> {
        Self::builder(url).build().await
    }

    /// A builder to set the prefix, capacity, timeout and connect options.
    pub fn builder(url: impl Into<String>) -> NatsChannelLayerBuilder {
        NatsChannelLayerBuilder {
            url: url.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
            capacity: DEFAULT_CAPACITY,
            timeout: DEFAULT_TIMEOUT,
            options: None,
        }
    }

    /// The subject prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// This instance's process name, `specific.<token>`.
    pub fn process_name(&self) -> &str {
        self.inner.process()
    }

    /// Events a channel holds.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Whether the NATS connection is up (false while reconnecting).
    pub fn is_connected(&self) -> bool {
        self.inner.client.connection_state() == State::Connected
    }

    /// The subject that carries `group`.
    pub fn group_subject(&self, group: &str) -> String {
        self.inner.group_subject(group)
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
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A backend failure, wrapped in [`ChannelLayerError::Backend`].
#[derive(Debug, thiserror::Error)]
enum NatsError {
    #[error("{0}")]
    Nats(String, #[source] BoxError),
    #[error("{0} timed out after {1:?} (is NATS reachable?)")]
    Timeout(String, Duration),
    #[error("{0}")]
    Other(String),
}

impl From<NatsError> for ChannelLayerError {
    fn from(e: NatsError) -> Self {
        ChannelLayerError::backend(e)
    }
}

enum SyncCommand {
    /// Make the subscription of a group match local membership.
    Group(String),
}

struct Inner {
    prefix: String,
    /// `{prefix}.proc.{process}`.
    proc_subject: String,
    capacity: usize,
    timeout: Duration,
    client: Client,
    /// This process's channels; its process name is `specific.<token>`.
    registry: Registry,
    /// The subscription task of each group with local members.
    groups: tokio::sync::Mutex<HashMap<String, AbortOnDrop>>,
    commands: mpsc::UnboundedSender<SyncCommand>,
    counters: Arc<Counters>,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner")
            .field("prefix", &self.prefix)
            .field("head", &self.process())
            .finish_non_exhaustive()
    }
}

/// What a process answers to a request.
const REPLY_OK: u8 = 0;
const REPLY_NO_SUCH_CHANNEL: u8 = 1;
const REPLY_FULL: u8 = 2;
const REPLY_FAILED: u8 = 3;

impl LocalChannels for Inner {
    fn registry(&self) -> &Registry {
        &self.registry
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Has the sync task unsubscribe from the groups left without a local member.
    fn forgotten(self: &Arc<Self>, _channel: &str, emptied: Vec<String>) {
        for group in emptied {
            let _ = self.commands.send(SyncCommand::Group(group));
        }
    }
}

impl Inner {
    fn group_subject(&self, group: &str) -> String {
        format!("{}.group.{group}", self.prefix)
    }

    fn worker_subject(&self, channel: &str) -> String {
        format!("{}.channel.{channel}", self.prefix)
    }

    fn proc_subject_of(&self, process: &str) -> String {
        format!("{}.proc.{process}", self.prefix)
    }

    fn check_connected(&self) -> Result<(), ChannelLayerError> {
        match self.client.connection_state() {
            State::Connected => Ok(()),
            _ => Err(NatsError::Other("not connected to NATS (reconnecting)".into()).into()),
        }
    }

    /// Subscribes and waits until the server has the subscription.
    async fn subscribe(
        &self,
        subject: String,
        queue: Option<&str>,
    ) -> Result<Subscriber, ChannelLayerError> {
        self.check_connected()?;
        let what = format!("subscribing to {subject:?}");
        let subscribe = async {
            let sub = match queue {
                Some(q) => {
                    self.client
                        .queue_subscribe(subject.clone(), q.to_owned())
                        .await
                }
                None => self.client.subscribe(subject.clone()).await,
            }
            .map_err(|e| NatsError::Nats(what.clone(), e.into()))?;
            // `flush` only writes the SUB out. The server handles one
            // connection's commands in order, so once a message published
            // after it comes back on a probe subscription of this connection,
            // the SUB is in place and other processes' requests reach it.
            let probe_subject = self.client.new_inbox();
            let mut probe = self
                .client
                .subscribe(probe_subject.clone())
                .await
                .map_err(|e| NatsError::Nats(what.clone(), e.into()))?;
            self.client
                .publish(probe_subject, Bytes::new())
                .await
                .map_err(|e| NatsError::Nats(what.clone(), e.into()))?;
            self.client
                .flush()
                .await
                .map_err(|e| NatsError::Nats(what.clone(), e.into()))?;
            if probe.next().await.is_none() {
                return Err(NatsError::Other(format!("{what}: the connection closed")));
            }
            Ok::<_, NatsError>(sub)
        };
        match tokio::time::timeout(self.timeout, subscribe).await {
            Ok(r) => r.map_err(Into::into),
            Err(_) => Err(NatsError::Timeout(what, self.timeout).into()),
        }
    }

    async fn publish(&self, subject: String, payload: Vec<u8>) -> Result<(), ChannelLayerError> {
        self.check_connected()?;
        let what = format!("publishing to {subject:?}");
        match tokio::time::timeout(self.timeout, self.client.publish(subject, payload.into())).await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(NatsError::Nats(what, e.into()).into()),
            Err(_) => Err(NatsError::Timeout(what, self.timeout).into()),
        }
    }

    /// A request answered with one status byte; `None` when nobody listens.
    async fn request(
        &self,
        subject: String,
        payload: Vec<u8>,
    ) -> Result<Option<u8>, ChannelLayerError> {
        self.check_connected()?;
        let what = format!("request to {subject:?}");
        match tokio::time::timeout(self.timeout, self.client.request(subject, payload.into())).await
        {
            Ok(Ok(reply)) => Ok(Some(reply.payload.first().copied().unwrap_or(REPLY_FAILED))),
            Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => Ok(None),
            Ok(Err(e)) if e.kind() == RequestErrorKind::TimedOut => {
                Err(NatsError::Timeout(what, self.timeout).into())
            }
            Ok(Err(e)) => Err(NatsError::Nats(what, e.into()).into()),
            Err(_) => Err(NatsError::Timeout(what, self.timeout).into()),
        }
    }

    /// Subscribes to `group` if it has local members and is not subscribed,
    /// unsubscribes if it has none.
    async fn sync_group(self: &Arc<Self>, group: &str) -> Result<(), ChannelLayerError> {
        let mut groups = self.groups.lock().await;
        let wanted = self.registry.group_len(group) > 0;
        match (wanted, groups.contains_key(group)) {
            (true, false) => {
                let sub = self
                    .subscribe(self.group_subject(group), None)
                    .await
                    .map_err(|e| {
                        NatsError::Nats(format!("joining group {group:?}"), Box::new(e))
                    })?;
                let task = tokio::spawn(group_loop(Arc::downgrade(self), group.to_owned(), sub));
                groups.insert(group.to_owned(), AbortOnDrop(task));
            }
            // Dropping the task drops its subscriber, which unsubscribes.
            (false, true) => drop(groups.remove(group)),
            _ => {}
        }
        Ok(())
    }

    /// An event or request on this process's subject.
    async fn on_process_message(self: &Arc<Self>, msg: async_nats::Message) {
        let status = match Envelope::from_bytes(&msg.payload) {
            Err(e) => {
                tracing::warn!("dropping a NATS message: {e}");
                Counters::add(&self.counters.dropped_other, 1);
                REPLY_FAILED
            }
            Ok(env) => match env.op {
                wire::OP_CHANNEL_EVENT => match env.decode_event() {
                    Ok(event) => match self.registry.send(env.channel, event) {
                        Ok(()) => REPLY_OK,
                        Err(e) if e.is_channel_full() => REPLY_FULL,
                        Err(_) => REPLY_NO_SUCH_CHANNEL,
                    },
                    Err(e) => {
                        tracing::warn!(channel = env.channel, "dropping an event: {e}");
                        Counters::add(&self.counters.dropped_other, 1);
                        REPLY_FAILED
                    }
                },
                wire::OP_GROUP_ADD | wire::OP_GROUP_DISCARD => {
                    if validate_group_name(env.group).is_err()
                        || !self.registry.is_local(env.channel)
                    {
                        REPLY_NO_SUCH_CHANNEL
                    } else if env.op == wire::OP_GROUP_ADD {
                        match self.registry.group_add(env.group, env.channel) {
                            Err(_) => REPLY_NO_SUCH_CHANNEL,
                            Ok(()) => match self.sync_group(env.group).await {
                                Ok(()) => REPLY_OK,
                                Err(_) => REPLY_FAILED,
                            },
                        }
                    } else {
                        self.registry.group_discard(env.group, env.channel);
                        match self.sync_group(env.group).await {
                            Ok(()) => REPLY_OK,
                            Err(_) => REPLY_FAILED,
                        }
                    }
                }
                _ => {
                    Counters::add(&self.counters.dropped_other, 1);
                    REPLY_FAILED
                }
            },
        };
        self.reply(msg.reply, status).await;
    }

    async fn reply(&self, to: Option<async_nats::Subject>, status: u8) {
        if let Some(to) = to {
            let sent = tokio::time::timeout(
                self.timeout,
                self.client.publish(to, Bytes::copy_from_slice(&[status])),
            )
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                tracing::debug!("could not answer a NATS request");
            }
        }
    }
}

/// Receives this process's subject; requests that change membership run
/// in their own task so they do not hold up events.
async fn process_loop(inner: Weak<Inner>, mut sub: Subscriber) {
    while let Some(msg) = sub.next().await {
        let Some(inner) = inner.upgrade() else { return };
        let is_membership = Envelope::from_bytes(&msg.payload)
            .is_ok_and(|env| matches!(env.op, wire::OP_GROUP_ADD | wire::OP_GROUP_DISCARD));
        if is_membership {
            tokio::spawn(async move { inner.on_process_message(msg).await });
        } else {
            inner.on_process_message(msg).await;
        }
    }
}

/// Receives one group's subject and fans out to its local members.
async fn group_loop(inner: Weak<Inner>, group: String, mut sub: Subscriber) {
    while let Some(msg) = sub.next().await {
        let Some(inner) = inner.upgrade() else { return };
        match Envelope::from_bytes(&msg.payload) {
            Ok(env) if env.op == wire::OP_GROUP_EVENT => {
                // Our own group sends were delivered by `group_send`.
                if env.origin == inner.process() {
                    continue;
                }
                match env.decode_event() {
                    Ok(event) => {
                        inner.fan_out(&group, &event);
                    }
                    Err(e) => {
                        tracing::warn!(group, "dropping a group event: {e}");
                        Counters::add(&inner.counters.dropped_other, 1);
                    }
                }
            }
            Ok(_) => Counters::add(&inner.counters.dropped_other, 1),
            Err(e) => {
                tracing::warn!(group, "dropping a NATS message: {e}");
                Counters::add(&inner.counters.dropped_other, 1);
            }
        }
    }
}

/// Unsubscribes groups whose last member's receiver was dropped.
async fn sync_loop(inner: Weak<Inner>, mut commands: mpsc::UnboundedReceiver<SyncCommand>) {
    while let Some(SyncCommand::Group(group)) = commands.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        if let Err(e) = inner.sync_group(&group).await {
            tracing::warn!(group, "{e}");
        }
    }
}

/// Receives a worker channel through a queue-group subscription.
async fn worker_loop(sender: ChannelSender, inner: Weak<Inner>, mut sub: Subscriber) {
    while let Some(msg) = sub.next().await {
        let Some(inner) = inner.upgrade() else { return };
        let status = match Envelope::from_bytes(&msg.payload).and_then(|env| env.decode_event()) {
            Ok(event) => match sender.try_send(event) {
                Ok(()) => REPLY_OK,
                Err(TrySendError::Full(_)) => REPLY_FULL,
                Err(_) => {
                    // The receiver is gone: let NATS pick another one next time.
                    inner.reply(msg.reply, REPLY_NO_SUCH_CHANNEL).await;
                    return;
                }
            },
            Err(e) => {
                tracing::warn!(channel = sender.name(), "dropping an event: {e}");
                Counters::add(&inner.counters.dropped_other, 1);
                REPLY_FAILED
            }
        };
        inner.reply(msg.reply, status).await;
    }
}

fn request_outcome(channel: &str, status: Option<u8>) -> Result<(), ChannelLayerError> {
    match status {
        Some(REPLY_OK) => Ok(()),
        Some(REPLY_FULL) => Err(ChannelLayerError::ChannelFull {
            channel: channel.to_owned(),
        }),
        None | Some(REPLY_NO_SUCH_CHANNEL) => Err(no_such_channel(channel)),
        Some(_) => Err(NatsError::Other(format!(
            "the receiver of {channel:?} could not take the event"
        ))
        .into()),
    }
}

impl ChannelLayer for NatsChannelLayer {
    fn new_channel(&self) -> BoxFuture<'_, Result<ChannelReceiver, ChannelLayerError>> {
        Box::pin(std::future::ready(self.inner.new_process_channel()))
    }

    fn receive<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<ChannelReceiver, ChannelLayerError>> {
        Box::pin(async move {
            let inner = &self.inner;
            if let Some(rx) = inner.receive_local(channel, |e| NatsError::Other(e).into())? {
                return Ok(rx);
            }
            // A worker channel: the queue subscription is in place (the
            // probe came back) before the receiver is handed out.
            let sub = inner
                .subscribe(inner.worker_subject(channel), Some(QUEUE_GROUP))
                .await?;
            let (tx, rx) = super::channel(channel, inner.capacity);
            let task = AbortOnDrop(tokio::spawn(worker_loop(tx, Arc::downgrade(inner), sub)));
            // Dropping the receiver ends the subscription.
            Ok(rx.on_drop(move || drop(task)))
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
            let subject = match inner.registry.owner(channel) {
                Owner::Local => return inner.registry.send(channel, event),
                Owner::Process(process) => inner.proc_subject_of(process),
                Owner::Named => inner.worker_subject(channel),
            };
            let payload =
                wire::event_envelope(inner.process(), wire::OP_CHANNEL_EVENT, "", channel, &event)?;
            let status = inner.request(subject, payload).await?;
            request_outcome(channel, status)
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
                    let payload =
                        Envelope::control(inner.process(), wire::OP_GROUP_ADD, group, channel)
                            .to_bytes()?;
                    let status = inner
                        .request(inner.proc_subject_of(process), payload)
                        .await?;
                    request_outcome(channel, status)
                }
                Owner::Named => Err(NatsError::Other(format!(
                    "cannot add the named channel {channel:?} to group {group:?}: the NATS layer \
                     does not support named channels in groups yet (it needs JetStream)"
                ))
                .into()),
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
                    inner.sync_group(group).await
                }
                Owner::Process(process) => {
                    let payload =
                        Envelope::control(inner.process(), wire::OP_GROUP_DISCARD, group, channel)
                            .to_bytes()?;
                    match inner
                        .request(inner.proc_subject_of(process), payload)
                        .await?
                    {
                        // Gone with its process, or not there: not a member either way.
                        None | Some(REPLY_OK | REPLY_NO_SUCH_CHANNEL) => Ok(()),
                        Some(_) => Err(NatsError::Other(format!(
                            "process {process:?} could not update group {group:?}"
                        ))
                        .into()),
                    }
                }
                // Named channels are never members (see group_add).
                Owner::Named => Ok(()),
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
            let payload =
                wire::event_envelope(inner.process(), wire::OP_GROUP_EVENT, group, "", &event)?;
            inner.publish(inner.group_subject(group), payload).await?;
            inner.counters.group_sends.fetch_add(1, Ordering::Relaxed);
            let (delivered, dropped) = inner.fan_out(group, &event);
            Ok(GroupSendReport {
                position: None,
                local_members: delivered,
                remote_receivers: None,
                dropped,
            })
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ChannelLayerError>> {
        Box::pin(async move {
            // Nothing is stored in NATS: dropping local state is the flush.
            self.inner.registry.clear();
            self.inner.groups.lock().await.clear();
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

    #[tokio::test]
    async fn bad_prefix_and_unreachable_server_fail_promptly() {
        for prefix in ["", "a..b", "a b", "a.*", "a.>"] {
            let err = NatsChannelLayer::builder("nats://127.0.0.1:1")
                .prefix(prefix)
                .build()
                .await
                .unwrap_err();
            assert!(
                crate::channel_layer::error::error_chain(&err).contains("prefix"),
                "{err:?}"
            );
        }
        let started = std::time::Instant::now();
        let err = NatsChannelLayer::builder("nats://127.0.0.1:1")
            .timeout(Duration::from_millis(300))
            .build()
            .await
            .unwrap_err();
        assert!(matches!(err, ChannelLayerError::Backend(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn outcomes() {
        assert!(request_outcome("c", Some(REPLY_OK)).is_ok());
        assert!(request_outcome("c", Some(REPLY_FULL))
            .unwrap_err()
            .is_channel_full());
        assert!(matches!(
            request_outcome("c", None),
            Err(ChannelLayerError::NoSuchChannel { .. })
        ));
        assert!(matches!(
            request_outcome("c", Some(REPLY_FAILED)),
            Err(ChannelLayerError::Backend(_))
        ));
    }
}
