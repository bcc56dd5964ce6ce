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
//!   [`GroupSendReport::remote_receivers`](super::GroupSendReport::remote_receivers) is `None`.
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
//! The protocol is the mesh's, shared with the other layers that span
//! processes: every message is one MessagePack envelope
//! `[origin, seq, op]` whose operation carries an event in the [channel
//! layer wire format](super#wire-format); direct sends and membership
//! requests use NATS's own request/reply. This module is only the NATS
//! transport: publish, (queue) subscribe, unsubscribe, request.
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
//! is disconnected are lost for it (at most once, as in Django Channels),
//! except in groups with a history: it reads those back once reconnected.
//! Each subscription buffers at most `capacity` messages on the client;
//! beyond that async-nats drops them (a slow consumer) and the layer counts
//! them in [`ChannelLayerStats::dropped_other`](super::ChannelLayerStats::dropped_other).
//!
//! # Presence and history
//!
//! Both need JetStream (`nats-server -js`) and are off unless configured:
//! [`history`](NatsChannelLayerBuilder::history) and
//! [`presence`](NatsChannelLayerBuilder::presence) on the builder, which
//! then creates (or updates) what they need and fails if JetStream does not
//! answer. [`capabilities`](ChannelLayer::capabilities) reports
//! [`Feature::History`](super::Feature::History) and
//! [`Feature::Presence`](super::Feature::Presence) only then. The protocol
//! (offsets, the sequencer, recovery, presence records and notifications)
//! is the mesh's, written once for every broker; this module only stores.
//!
//! ```
//! use std::time::Duration;
//! use tower_channels::channel_layer::nats::NatsChannelLayer;
//! use tower_channels::channel_layer::{
//!     BoxError, ChannelLayer, Event, Feature, GroupPattern, HistoryPolicy, PresenceConfig,
//! };
//!
//! async fn doc_main() -> Result<(), BoxError> {
//!     let layer = NatsChannelLayer::builder("nats://127.0.0.1:4222")
//!         .history(HistoryPolicy::new(GroupPattern::prefix("chat_")).max_len(500))
//!         .presence(PresenceConfig::new().ttl(Duration::from_secs(10)))
//!         .build()
//!         .await?;
//!     layer.capabilities().require(&[Feature::History, Feature::Presence])?;
//!     let sent = layer.group_send("chat_lobby", Event::text("chat.message", "hi")).await?;
//!     let since = sent.position.expect("a history group");
//!     let missed = layer.recover("chat_lobby", &since).await?;
//!     assert!(missed.is_recovered());
//!     Ok(())
//! }
//! ```
//!
//! ## History and recovery
//!
//! * **One stream per prefix**, `tower-channels-history-{prefix}` (`.` in
//!   the prefix written `_d`, `_` written `_u`), file storage, on the
//!   subjects `{prefix}.hist.>`: a group's history is the subject
//!   `{prefix}.hist.{group}`. It keeps, per group, the largest `max_len` of
//!   the configured policies (`max_msgs_per_subject`) for the longest `ttl`
//!   (`max_age`: each event is dropped that long after it was stored); a
//!   recovery applies the group's own policy's `max_len`. A NATS restart
//!   with the same store keeps every history and its epoch; one that lost
//!   its store (no `-sd` volume) loses them: the layer makes the stream and
//!   the presence buckets again when it finds them missing, histories start
//!   new epochs (members follow them from offset 1, recoveries from an old
//!   position answer [`RecoveryFailure::EpochChanged`](super::RecoveryFailure::EpochChanged)),
//!   and each process writes its presence again once reconnected.
//! * **Contiguous offsets.** Each event carries its epoch and offset in the
//!   headers `Tower-Channels-Epoch` and `Tower-Channels-Offset`. A process
//!   remembers per group the stream sequence and position of the last event
//!   it appended, publishes the next offset with
//!   `Nats-Expected-Last-Subject-Sequence` set to that sequence, and when
//!   another process got there first (wrong last sequence) reads the
//!   subject's last event and tries again after a short jittered pause,
//!   until it wins or the layer's timeout passes (then the send fails and
//!   its event was not stored). Under heavy contention from several
//!   processes on one group, sends therefore slow down rather than
//!   interleave offsets. An empty subject (never written, or every event
//!   expired) starts a new random epoch at offset 1 with expected sequence
//!   0, so exactly one process starts it.
//! * **Delivery.** The stream republishes every stored event to
//!   `{prefix}.hlive.{group}` (JetStream's republish), which a process
//!   subscribes to (core NATS) while it has a member in the group, beside
//!   the group subject that carries ephemeral events and presence
//!   notifications. An append that JetStream refused is never republished,
//!   so members only ever see stored events. The sending process hands its
//!   event to its own members when JetStream acknowledged it, through the
//!   sequencer, which keeps every process's delivery in offset order and
//!   once, reads gaps back from the stream, and reads what a group missed
//!   after async-nats reconnects.
//! * **Reads** (recovery, gaps) take the subject's last event (the latest
//!   position), then an ordered consumer filtered on the subject, from its
//!   oldest event up to that position: at most `max_len` events.
//! * While the client is disconnected, history sends and reads fail at once
//!   (not buffered); members in the sending process do not get an event
//!   whose send failed.
//!
//! ## Presence
//!
//! Two KV buckets. `tower-channels-members-{prefix}` (no max age) holds
//! one key per group and user, `{group}.=u.{user}` (the user id as a
//! URL-safe base64 token), whose value lists the user's connections in the
//! group: JSON `[[process, channel, entry], ...]`, the entry being the
//! connection's info and the token of the user's stay. A presence join
//! adds its connection and a leave removes it, compare-and-set on that one
//! key (expected revision): a read and a small write each, whatever the
//! group's size. A key stays (as `[]`) after its user's last connection
//! left, until [`flush`](ChannelLayer::flush). The key `{group}.=procs`
//! lists the processes that wrote presence in the group.
//! `tower-channels-presence-{prefix}`, whose max age is the presence TTL,
//! holds the liveness `{group}.=alive.{process}` of each process in each
//! group, which the process updates every third of the TTL (with the
//! revision it wrote last: when that fails, the key expired or NATS lost
//! it, and the process writes its entries of the group again), and the
//! claims below. A listing reads the group's user keys with one consumer
//! and keeps the connections of processes whose liveness is there. The
//! members of a process that stopped without leaving vanish from listings
//! when its liveness expires: at most one TTL after its last refresh, so
//! at most one TTL after it stopped (30 s by default). Every process
//! refreshing the group looks for processes listed there without a
//! liveness; the one that creates the key `{group}.=gone.{process}` (only
//! one creation succeeds) removes that process's connections from the
//! user keys (each written over the revision read before it checked the
//! liveness, so a process that comes back keeps what it writes again) and,
//! in groups with notifications, sends the `presence.leave` of its users
//! not present on a live process, without their data: within TTL + TTL/3
//! of the stop (40 s by default), as on Redis.
//!
//! Notifications are collapsed per user across processes without a lock
//! in the broker: a join is announced when the user has no entry of
//! another live process before this one wrote its own, a leave when it has
//! none after this one removed its own. When a user's last connections on
//! several processes leave (or stop) at the same moment, the process that
//! creates the key `{group}.=gone.left.{stay}` (the token of the user's
//! stay in the group, stored with its entries) announces the leave, once.
//! Two processes joining the same user at the same moment may both
//! announce it; none is missed.
//!
//! ## Named channels as group members
//!
//! With the JetStream store (`.history(..)` or `.presence(..)`), a named
//! (worker) channel can join a group: the KV bucket
//! `tower-channels-groups-{prefix}` holds one key per group, `{group}.=n`,
//! listing its named members with when each was added (changed
//! compare-and-set); a membership lasts one day
//! (channels_redis' `group_expiry` default) unless added again, and the
//! bucket's max age drops a key a day after its last change. Every group
//! send reads that key (one round trip) and sends the event to each named
//! member as a send to the channel (one process receiving it takes it);
//! a full one, or one nobody receives, counts in the report's `dropped`.
//! Without the store, `group_add` of a name without `!` fails with
//! [`ChannelLayerError::Unsupported`], and
//! [`capabilities`](ChannelLayer::capabilities) says so.
//!
//! ## Flush
//!
//! [`flush`](ChannelLayer::flush) also purges the prefix's history stream
//! and its buckets (those of other prefixes are untouched): histories
//! start new epochs on their next send (recovering an older position
//! answers [`RecoveryFailure::EpochChanged`](super::RecoveryFailure::EpochChanged)),
//! presence lists nobody, and named channels are no longer group members,
//! for every process. A process that still has presence members writes
//! them again on its next refresh, as after NATS lost its store.
//!
//! # Not yet supported
//!
//! * Replicated streams: the history stream and presence buckets have one
//!   replica (a NATS cluster keeps them on one server).
//!
//! # Why async-nats
//!
//! [async-nats](https://docs.rs/async-nats) (re-exported as [`async_nats`])
//! is the NATS maintainers' own Rust client, on tokio, with reconnection,
//! re-subscription, queue groups, request/reply and JetStream.

pub use async_nats;

mod store;

use super::{local::lock, names};
use std::{
    collections::HashMap,
    fmt,
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use async_nats::{client::RequestErrorKind, connection::State, Client, Subscriber};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::task::JoinHandle;

use self::store::JetStreamStore;
use super::{
    local::Counters,
    mesh::{Inbox, Incoming, MeshConfig, MeshLayer, Store, Transport, TransportError},
    BoxError, BoxFuture, ChannelLayer, ChannelLayerError, HistoryPolicy, PresenceConfig,
    DEFAULT_CAPACITY,
};

/// The default subject prefix.
const DEFAULT_PREFIX: &str = "tower-channels";
/// The default timeout of requests (direct sends, membership changes) and
/// subscription round trips.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

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
    history: Vec<HistoryPolicy>,
    presence: Option<PresenceConfig>,
}

impl fmt::Debug for NatsChannelLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsChannelLayerBuilder")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .field("capacity", &self.capacity)
            .field("timeout", &self.timeout)
            .field("history", &self.history)
            .field("presence", &self.presence)
            .finish_non_exhaustive()
    }
}

impl NatsChannelLayerBuilder {
    /// Keeps a history for the groups `policy` applies to, in a JetStream
    /// stream (see [history](self#history-and-recovery)); the first
    /// matching policy applies. Call once per policy; every process of an
    /// application must use the same policies. Needs JetStream.
    pub fn history(mut self, policy: HistoryPolicy) -> Self {
        self.history.push(policy);
        self
    }

    /// Turns presence on, in a JetStream KV bucket: which groups get
    /// presence notifications and how long a crashed process's members stay
    /// listed (see [presence](self#presence)). Needs JetStream.
    pub fn presence(mut self, config: PresenceConfig) -> Self {
        self.presence = Some(config);
        self
    }

    /// The first token(s) of every subject (default `"tower-channels"`).
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
    /// 2 s).
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
            return Err(NatsError::InvalidPrefix(self.prefix.clone()).into());
        }
        let counters = Arc::new(Counters::default());
        let slow = counters.clone();
        let (inbox, messages) = Inbox::new();
        let on_reconnect = inbox.clone();
        let reconnected = Arc::new(std::sync::atomic::AtomicBool::new(false));
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
                let on_reconnect = on_reconnect.clone();
                let reconnected = reconnected.clone();
                async move {
                    match event {
                        async_nats::Event::SlowConsumer(_) => {
                            slow.dropped_other.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!("NATS subscription overflowed (slow consumer); a message was dropped");
                        }
                        async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
                        async_nats::Event::Connected => {
                            tracing::info!("connected to NATS");
                            // The first connection is not a reconnection.
                            if reconnected.swap(true, Ordering::Relaxed) {
                                on_reconnect.reconnected().await;
                            }
                        }
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
        let store = if self.history.is_empty() && self.presence.is_none() {
            None
        } else {
            Some(
                JetStreamStore::open(
                    client.clone(),
                    &self.prefix,
                    self.timeout,
                    &self.history,
                    self.presence.as_ref(),
                    crate::channel_layer::mesh::NAMED_MEMBER_EXPIRY,
                )
                .await?,
            )
        };
        let transport = NatsTransport {
            client,
            inbox,
            timeout: self.timeout,
            subscriptions: Mutex::default(),
            store,
        };
        let config = MeshConfig {
            prefix: self.prefix,
            capacity: self.capacity,
            timeout: self.timeout,
            history: self.history,
            presence: self.presence,
            named_expiry: crate::channel_layer::mesh::NAMED_MEMBER_EXPIRY,
        };
        let mesh = MeshLayer::start(transport, messages, config, counters).await?;
        Ok(NatsChannelLayer { mesh })
    }
}

/// A [`ChannelLayer`] on NATS core subjects. See the [module docs](self).
///
/// Cloning is cheap and shares the connection and local state (a clone is
/// the same "process"). Dropping the last clone unsubscribes everything.
#[derive(Clone)]
pub struct NatsChannelLayer {
    mesh: MeshLayer<NatsTransport>,
}

impl fmt::Debug for NatsChannelLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsChannelLayer")
            .field("prefix", &self.mesh.config().prefix)
            .field("process", &self.process_name())
            .field("capacity", &self.mesh.config().capacity)
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
            history: Vec::new(),
            presence: None,
        }
    }

    /// This instance's process name, `specific.<token>`.
    pub fn process_name(&self) -> &str {
        self.mesh.process_name()
    }

    /// Whether the NATS connection is up (false while reconnecting).
    pub fn is_connected(&self) -> bool {
        self.mesh.transport().client.connection_state() == State::Connected
    }
}

/// A backend failure, wrapped in [`ChannelLayerError::Backend`].
#[derive(Debug, thiserror::Error)]
enum NatsError {
    #[error("{0}")]
    Nats(String, #[source] BoxError),
    #[error("{0} timed out after {1:?} (is NATS reachable?)")]
    Timeout(String, Duration),
    /// The subject prefix breaks NATS's subject rules.
    #[error(
        "invalid NATS subject prefix {0:?}: dot-separated tokens of ASCII letters, digits, '-' and '_'"
    )]
    InvalidPrefix(String),
    /// The client is between connections.
    #[error("not connected to NATS (reconnecting)")]
    Reconnecting,
}

impl From<NatsError> for ChannelLayerError {
    fn from(e: NatsError) -> Self {
        ChannelLayerError::backend(e)
    }
}

/// The NATS transport of the mesh: one client; each subscription is a task
/// that forwards its messages to the mesh's inbox (dropping the task
/// unsubscribes).
struct NatsTransport {
    client: Client,
    inbox: Inbox,
    timeout: Duration,
    subscriptions: Mutex<HashMap<String, AbortOnDrop>>,
    /// Histories and presence, when configured.
    store: Option<JetStreamStore>,
}

impl fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsTransport")
            .field("state", &self.client.connection_state())
            .finish_non_exhaustive()
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn failed(what: &str, e: impl Into<BoxError>) -> TransportError {
    TransportError::Failed(NatsError::Nats(what.to_owned(), e.into()).into())
}

impl NatsTransport {
    /// Operations fail at once while the client is reconnecting (NATS
    /// would buffer them): not sent, so the mesh tries once more.
    fn check_connected(&self) -> Result<(), TransportError> {
        match self.client.connection_state() {
            State::Connected => Ok(()),
            _ => Err(TransportError::NotSent(NatsError::Reconnecting.into())),
        }
    }

    /// Subscribes and waits until the server has the subscription.
    async fn subscribe_confirmed(
        &self,
        subject: &str,
        queue: bool,
    ) -> Result<Subscriber, TransportError> {
        self.check_connected()?;
        let what = format!("subscribing to {subject:?}");
        let sub = if queue {
            self.client
                .queue_subscribe(subject.to_owned(), QUEUE_GROUP.to_owned())
                .await
        } else {
            self.client.subscribe(subject.to_owned()).await
        }
        .map_err(|e| failed(&what, e))?;
        // `flush` only writes the SUB out. The server handles one
        // connection's commands in order, so once a message published
        // after it comes back on a probe subscription of this connection,
        // the SUB is in place and other processes' requests reach it.
        let probe_subject = self.client.new_inbox();
        let mut probe = self
            .client
            .subscribe(probe_subject.clone())
            .await
            .map_err(|e| failed(&what, e))?;
        self.client
            .publish(probe_subject, Bytes::new())
            .await
            .map_err(|e| failed(&what, e))?;
        self.client.flush().await.map_err(|e| failed(&what, e))?;
        if probe.next().await.is_none() {
            return Err(failed(&what, "the connection closed"));
        }
        Ok(sub)
    }
}

/// Forwards one subscription's messages to the mesh.
async fn forward(subject: String, mut sub: Subscriber, inbox: Inbox) {
    while let Some(msg) = sub.next().await {
        let message = Incoming {
            subject: subject.clone(),
            reply_to: msg.reply.map(|r| r.to_string()),
            position: store::position_of(msg.headers.as_ref()),
            payload: msg.payload,
        };
        if !inbox.send(message).await {
            return;
        }
    }
}

impl Transport for NatsTransport {
    fn publish<'a>(
        &'a self,
        subject: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Option<usize>, TransportError>> {
        Box::pin(async move {
            self.check_connected()?;
            self.client
                .publish(subject.to_owned(), payload)
                .await
                .map_err(|e| failed(&format!("publishing to {subject:?}"), e))?;
            // NATS does not tell how many subscribers got it.
            Ok(None)
        })
    }

    fn subscribe<'a>(
        &'a self,
        subject: &'a str,
        queue: bool,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let sub = self.subscribe_confirmed(subject, queue).await?;
            let task = tokio::spawn(forward(subject.to_owned(), sub, self.inbox.clone()));
            lock(&self.subscriptions).insert(subject.to_owned(), AbortOnDrop(task));
            Ok(())
        })
    }

    fn unsubscribe<'a>(&'a self, subject: &'a str) -> BoxFuture<'a, Result<(), TransportError>> {
        // Dropping the task drops its subscriber, which unsubscribes.
        drop(lock(&self.subscriptions).remove(subject));
        Box::pin(std::future::ready(Ok(())))
    }

    fn has_request(&self) -> bool {
        true
    }

    fn request<'a>(
        &'a self,
        subject: &'a str,
        payload: Bytes,
    ) -> Option<BoxFuture<'a, Result<Option<Bytes>, TransportError>>> {
        Some(Box::pin(async move {
            self.check_connected()?;
            let what = format!("request to {subject:?}");
            match self.client.request(subject.to_owned(), payload).await {
                Ok(reply) => Ok(Some(reply.payload)),
                Err(e) if e.kind() == RequestErrorKind::NoResponders => Ok(None),
                Err(e) if e.kind() == RequestErrorKind::TimedOut => Err(TransportError::Failed(
                    NatsError::Timeout(what, self.timeout).into(),
                )),
                Err(e) => Err(failed(&what, e)),
            }
        }))
    }

    fn store(&self) -> Option<&dyn Store> {
        self.store.as_ref().map(|s| s as &dyn Store)
    }
}

crate::channel_layer::mesh::delegate_to_mesh!(NatsChannelLayer, mesh);

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
}
