//! Channel layers: how consumers, HTTP handlers and workers talk to each other.
//!
//! A [`ChannelLayer`] is Django Channels' channel layer as a dyn-compatible
//! trait, used as `Arc<dyn ChannelLayer>`:
//!
//! * every connection gets a unique **channel** ([`ChannelLayer::new_channel`]);
//!   anyone holding the layer can [`send`](ChannelLayer::send) an [`Event`] to it
//!   by name, and the consumer's `event` handler runs;
//! * channels join and leave **groups** ([`group_add`](ChannelLayer::group_add),
//!   [`group_discard`](ChannelLayer::group_discard)), and
//!   [`group_send`](ChannelLayer::group_send) reaches every member;
//! * named channels such as `"thumbnails"` are consumed with
//!   [`receive`](ChannelLayer::receive), which is how workers get their work.
//!
//! [`InMemoryChannelLayer`] (the default) works inside one process. The
//! `redis` feature adds `redis::RedisChannelLayer`, which spans processes
//! (its module docs describe how, and what it guarantees). The `django`
//! feature adds `django::DjangoChannelLayer` and `django::DjangoPubSubChannelLayer`,
//! which speak channels_redis' formats so Rust and Django consumers share groups;
//! `redis-cluster` adds `redis::RedisClusterChannelLayer` for a Redis Cluster
//! (sharded Pub/Sub), and `nats` adds `nats::NatsChannelLayer`.
//!
//! # Example
//!
//! Send to a connection from anywhere, e.g. an axum handler that holds the layer:
//!
//! ```
//! use std::sync::Arc;
//! use tower_channels::channel_layer::{ChannelLayer, Event, InMemoryChannelLayer};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let layer: Arc<dyn ChannelLayer> = Arc::new(InMemoryChannelLayer::new());
//!
//! // What a connection does when it opens:
//! let mut inbox = layer.new_channel().await?;
//! let name = inbox.name().to_owned();
//!
//! // What an HTTP handler or background task does:
//! layer.send(&name, Event::text("notify", "your export is ready")).await?;
//!
//! let event = inbox.recv().await.unwrap();
//! assert_eq!(event.kind(), "notify");
//! # Ok::<_, tower_channels::channel_layer::ChannelLayerError>(())
//! # }).unwrap();
//! ```
//!
//! # Delivery semantics
//!
//! At most once, as in Django Channels. A direct send to a full channel fails
//! with [`ChannelLayerError::ChannelFull`]; a group send never waits for a
//! slow member: it drops the event for that member, counts it in
//! [`GroupSendReport::dropped`] and marks the member's receiver as lagging
//! ([`RecvError::Lagged`]), which makes a connection close itself with
//! [`SLOW_CONSUMER`](crate::message::close_code::SLOW_CONSUMER) rather than
//! silently miss events.
//!
//! **An error means "unknown", not "not delivered".** A backend that crosses
//! processes gives each operation a timeout; when a send times out (or the
//! connection breaks mid-command) the broker may still run it afterwards, so
//! some or all members may get the event later: still at most once each, but
//! the sender cannot know. On the Redis, Redis Cluster and NATS layers,
//! members in the sending process get a group send before the broker is
//! asked, so they have it even when the call fails (in Redis groups with
//! history: as soon as Redis assigned the offset, whatever its Pub/Sub
//! does); the Django core layer hands it to them after the broker
//! answered, and the Django Pub/Sub layer through the broker. What each
//! layer supports is [`ChannelLayer::capabilities`]; the README has a
//! table per layer.
//! Handle an error as a service would handle any "maybe" (tell the client it
//! may retry, keep its socket: see [`consumer`](crate::consumer#when-a-send-fails));
//! do not resend blindly when duplicates would hurt, or make events
//! idempotent (an id the client de-duplicates).
//!
//! **Order.** Events one task sends (awaiting each send) reach each member in
//! the order sent, whichever backend; events from different senders, or one
//! sender's events to different members, have no order between them.
//!
//! # Names
//!
//! Channel and group names follow Django: ASCII letters, digits, `-`, `_`,
//! `.`, shorter than 100 characters; channel names may contain one `!`.
//! Invalid names fail with [`ChannelLayerError::InvalidName`].
//!
//! # Presence
//!
//! [`presence_join`](ChannelLayer::presence_join) adds a channel to a group
//! with a [`PresenceInfo`] (a user id and a small JSON value), and
//! [`presence`](ChannelLayer::presence) lists who is in the group across
//! every process, grouped by user: one user with three tabs is one
//! [`PresenceMember`] with three [`connections`](PresenceMember::connections).
//! A channel leaves the presence list when it leaves the group
//! ([`group_discard`](ChannelLayer::group_discard), or its receiver being
//! dropped when the connection closes). Groups matching
//! [`PresenceConfig::notify`] also get [`PRESENCE_JOIN`] and
//! [`PRESENCE_LEAVE`] events (body [`PresenceChange`]), collapsed per user:
//! a user's first connection is a join, its last one a leave. Backends that
//! span processes forget the members of a process that died within
//! [`PresenceConfig::ttl`].
//!
//! # History and recovery
//!
//! Groups matching a [`HistoryPolicy`] keep their last events: each
//! [`group_send`](ChannelLayer::group_send) gets the next offset of the
//! group's history, returned in [`GroupSendReport::position`] and carried
//! by every delivered copy ([`Event::position`]). A client that reconnects
//! with the last [`StreamPosition`] it saw gets what it missed from
//! [`recover`](ChannelLayer::recover), or a [`RecoveryFailure`] when the
//! history cannot say (it was reset, or trimmed past the position). Join
//! first, then recover, then deliver live events through the
//! [`StreamCursor`] of the [`Recovery`]: no event is missed or repeated
//! across the switch (see [`Recovery`] for the example).
//!
//! Presence and join/leave events are not part of the history.
//!
//! # Wire format
//!
//! Backends that cross processes encode events with [`Event::encode`]: a
//! MessagePack array `[type: str, tag: int, data: bin]`, where tag `0` means
//! no body, `1` a MessagePack-encoded body (maps with field names), `2` a
//! text WebSocket message (UTF-8 bytes) and `3` a binary one.
//!
//! # Writing a backend
//!
//! Implement [`ChannelLayer`]; every method returns a [`BoxFuture`], so no
//! `async-trait` is needed. Deliver incoming events into the bounded queues
//! made by [`channel()`]: keep the [`ChannelSender`], return the
//! [`ChannelReceiver`] (use [`ChannelReceiver::on_drop`] to forget a channel
//! when its receiver goes away), use [`ChannelSender::try_send`] for direct
//! sends and [`ChannelSender::send_lossy`] for group fan-out. Then run the
//! conformance [`Suite`](crate::testing::conformance::Suite) (feature
//! `testing`) against your type.
//! Presence and history are optional: the default
//! [`presence_join`](ChannelLayer::presence_join),
//! [`presence`](ChannelLayer::presence) and [`recover`](ChannelLayer::recover)
//! fail with [`ChannelLayerError::Unsupported`]; a backend that implements
//! them sets [`Event::with_position`] on delivered history events and
//! reports them in [`capabilities`](ChannelLayer::capabilities), and the
//! suite runs their checks too.

mod capabilities;
#[cfg(feature = "django")]
pub mod django;
mod error;
mod event;
mod history;
mod local;
mod memory;
#[cfg(any(test, feature = "nats", feature = "redis"))]
mod mesh;
mod names;
#[cfg(feature = "nats")]
pub mod nats;
mod pattern;
mod presence;
mod queue;
#[cfg(feature = "redis")]
pub mod redis;
// These two are shared by the Redis and the Django layers (the `django`
// feature does not turn on `redis`), so declared here rather than in `redis`.
#[cfg(any(feature = "redis", feature = "django"))]
#[path = "redis/keys.rs"]
mod redis_keys;
#[cfg(any(feature = "redis", feature = "django"))]
mod redis_pubsub;
#[cfg(any(test, feature = "redis", feature = "nats"))]
mod sequencer;

use std::{fmt, future::Future, pin::Pin};

pub use self::{
    capabilities::{Capabilities, Feature},
    error::{BoxError, ChannelLayerError, EventCodecError, InvalidName},
    event::Event,
    history::{
        HistoryPolicy, Recovery, RecoveryFailure, StreamCursor, StreamPosition,
        DEFAULT_HISTORY_LEN, DEFAULT_HISTORY_TTL, MAX_HISTORY_LEN,
    },
    memory::{InMemoryChannelLayer, DEFAULT_CAPACITY},
    names::{validate_channel_name, validate_group_name, MAX_NAME_LENGTH},
    pattern::GroupPattern,
    presence::{
        InvalidPresence, PresenceChange, PresenceConfig, PresenceConnection, PresenceInfo,
        PresenceMember, DEFAULT_PRESENCE_TTL, MAX_PRESENCE_DATA, MAX_USER_ID_LEN, PRESENCE_JOIN,
        PRESENCE_LEAVE,
    },
    queue::{channel, ChannelReceiver, ChannelSender, Delivery, RecvError, TrySendError},
};

/// A boxed, `Send` future: what [`ChannelLayer`] methods return so the trait
/// stays dyn-compatible.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a [`group_send`](ChannelLayer::group_send) did.
///
/// The two counts never mix: `local_members` counts connections (channels)
/// of this process, `remote_receivers` what a broker reported for everyone
/// else, so a "delivered to N devices" answer cannot change meaning when the
/// backend changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupSendReport {
    /// Members in this process (channels with a local receiver) the event
    /// was handed to.
    pub local_members: usize,
    /// Receivers outside this process the broker handed the event to: other
    /// processes subscribed to the group, plus named channels queued on the
    /// broker. A process counts once however many members it has. `None` on layers
    /// that do not span processes (in-memory) or whose broker does not tell
    /// (NATS).
    pub remote_receivers: Option<usize>,
    /// Local members whose channel was full (the event was dropped for them
    /// and they were marked as lagging), plus named channels the broker
    /// found at capacity.
    pub dropped: usize,
    /// Where the event went in the group's history, for groups with a
    /// [`HistoryPolicy`]; `None` otherwise.
    pub position: Option<StreamPosition>,
}

/// Counters a channel layer keeps since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChannelLayerStats {
    /// Group sends made through this layer.
    pub group_sends: u64,
    /// Events handed to local receivers by group sends.
    pub delivered: u64,
    /// Events dropped because a member's channel was full.
    pub dropped_full: u64,
    /// Events that could not be decoded or delivered for another reason
    /// (e.g. a backend error on the receive path).
    pub dropped_other: u64,
}

/// A channel layer backend: Django Channels' channel-layer API.
///
/// Dyn-compatible: use it as `Arc<dyn ChannelLayer>`. See the
/// [module docs](self) for semantics and for how to write a backend.
pub trait ChannelLayer: fmt::Debug + Send + Sync + 'static {
    /// Creates a new channel with a unique name (available as
    /// [`ChannelReceiver::name`]) and returns its receiver. The channel exists
    /// until the receiver is dropped, which also removes it from its groups.
    fn new_channel(&self) -> BoxFuture<'_, Result<ChannelReceiver, ChannelLayerError>>;

    /// Starts receiving the named channel `channel` (e.g. `"thumbnails"`):
    /// how workers consume work sent to a well-known name.
    fn receive<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<ChannelReceiver, ChannelLayerError>>;

    /// Sends `event` to one channel. Fails with
    /// [`ChannelLayerError::ChannelFull`] when the channel is full and
    /// [`ChannelLayerError::NoSuchChannel`] when the layer knows nobody
    /// receives it.
    fn send<'a>(
        &'a self,
        channel: &'a str,
        event: Event,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>>;

    /// Adds `channel` to `group`. Adding twice is not an error.
    fn group_add<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>>;

    /// Removes `channel` from `group`. Removing a non-member is not an error.
    fn group_discard<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>>;

    /// Sends `event` to every member of `group`, never waiting on a slow
    /// member (see [delivery semantics](self#delivery-semantics)).
    fn group_send<'a>(
        &'a self,
        group: &'a str,
        event: Event,
    ) -> BoxFuture<'a, Result<GroupSendReport, ChannelLayerError>>;

    /// Drops every group and every queued event (Django's `flush`), for tests.
    /// A layer that keeps histories, presence or named group members in a
    /// broker empties them too, for every process sharing its prefix.
    fn flush(&self) -> BoxFuture<'_, Result<(), ChannelLayerError>>;

    /// Counters since the layer was created. The default returns zeros.
    fn stats(&self) -> ChannelLayerStats {
        ChannelLayerStats::default()
    }

    /// The optional [`Feature`]s this layer supports (presence, history,
    /// named channels as group members, delivery across processes). Check
    /// them when the application starts, with
    /// [`Capabilities::require`]: a consumer that calls
    /// [`presence_join`](Self::presence_join) on a layer without presence
    /// otherwise fails every connection with
    /// [`ChannelLayerError::Unsupported`]. The default reports
    /// [`Capabilities::NONE`].
    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
    }

    /// Adds `channel` to `group` (as [`group_add`](Self::group_add)) and
    /// lists it in the group's [`presence`](Self::presence) with `info`
    /// (see [presence](self#presence)). It leaves with the group: on
    /// [`group_discard`](Self::group_discard) or when its receiver is
    /// dropped. Joining again replaces the info.
    ///
    /// The default fails with [`ChannelLayerError::Unsupported`].
    fn presence_join<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
        info: PresenceInfo,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        let _ = (group, channel, info);
        Box::pin(std::future::ready(Err(ChannelLayerError::Unsupported {
            feature: "presence",
        })))
    }

    /// The members present in `group` across every process of the layer,
    /// one [`PresenceMember`] per user, ordered by user id.
    ///
    /// The default fails with [`ChannelLayerError::Unsupported`].
    fn presence<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Vec<PresenceMember>, ChannelLayerError>> {
        let _ = group;
        Box::pin(std::future::ready(Err(ChannelLayerError::Unsupported {
            feature: "presence",
        })))
    }

    /// The events of `group` after `since`, from its history (see
    /// [history](self#history-and-recovery)), or why they cannot be given.
    /// Fails with [`ChannelLayerError::NoHistory`] for a group without a
    /// [`HistoryPolicy`].
    ///
    /// The default fails with [`ChannelLayerError::Unsupported`].
    fn recover<'a>(
        &'a self,
        group: &'a str,
        since: &'a StreamPosition,
    ) -> BoxFuture<'a, Result<Recovery, ChannelLayerError>> {
        let _ = (group, since);
        Box::pin(std::future::ready(Err(ChannelLayerError::Unsupported {
            feature: "history",
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn dyn_channel_layer_is_send_sync() {
        assert_send_sync::<std::sync::Arc<dyn ChannelLayer>>();
        assert_send_sync::<InMemoryChannelLayer>();
        assert_send_sync::<Event>();
        assert_send_sync::<ChannelReceiver>();
        assert_send_sync::<ChannelSender>();
    }
}
