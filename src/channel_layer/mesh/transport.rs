//! What a broker gives the mesh: publish, subscribe, unsubscribe, an
//! inbox the broker's messages arrive in, and optionally a [`Store`] for
//! histories and presence.

use std::fmt;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::channel_layer::{BoxError, BoxFuture, StreamPosition};

/// Messages an [`Inbox`] holds before the transport drops what arrives
/// (counted in `dropped_other`). A message is at most one encoded event
/// plus about 200 bytes of envelope, so the inbox holds at most
/// `INBOX_CAPACITY` such messages.
pub(crate) const INBOX_CAPACITY: usize = 4096;

/// A transport failure. `NotSent` means the broker certainly did not get
/// the operation (the connection was refused or is known to be down), so
/// the mesh may try it once more; anything else may have reached it.
#[derive(Debug)]
pub(crate) enum TransportError {
    /// The operation did not leave this process.
    NotSent(BoxError),
    /// The operation may or may not have reached the broker.
    Failed(BoxError),
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportError::NotSent(e) => write!(f, "not sent: {e}"),
            TransportError::Failed(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for TransportError {
    /// The cause's own source: the cause is displayed as this error.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TransportError::NotSent(e) | TransportError::Failed(e) => e.source(),
        }
    }
}

/// The primitives the mesh protocol needs from a broker. Subjects are the
/// mesh's names (`{prefix}.proc.{process}`, `{prefix}.group.{group}`,
/// `{prefix}.channel.{name}`); a transport may map them to its own.
///
/// A transport re-subscribes by itself after a reconnection (as async-nats
/// and the Redis layers' Pub/Sub tasks do): a subscription stays until
/// [`unsubscribe`](Self::unsubscribe).
pub(crate) trait Transport: fmt::Debug + Send + Sync + 'static {
    /// Publishes `payload` on `subject`, at most once. Returns how many
    /// subscribers the broker handed it to, when the broker tells
    /// (`Some(0)`: nobody, e.g. the process owning a channel is gone).
    fn publish<'a>(
        &'a self,
        subject: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Option<usize>, TransportError>>;

    /// Delivers the messages published on `subject` to the inbox from now
    /// on. With `queue`, each message goes to one of the processes that
    /// subscribed with `queue` (worker channels), not to all.
    fn subscribe<'a>(
        &'a self,
        subject: &'a str,
        queue: bool,
    ) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Stops delivering `subject`.
    fn unsubscribe<'a>(&'a self, subject: &'a str) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Whether [`request`](Self::request) is the broker's own request/reply.
    fn has_request(&self) -> bool {
        false
    }

    /// The broker's own request/reply, if it has one (NATS): publishes
    /// `payload` with a reply subject and returns the first answer, or
    /// `Ok(None)` when the broker knows nobody listens. `None` (the
    /// default): the mesh publishes the request and waits for an answer on
    /// its process subject.
    fn request<'a>(
        &'a self,
        subject: &'a str,
        payload: Bytes,
    ) -> Option<BoxFuture<'a, Result<Option<Bytes>, TransportError>>> {
        let _ = (subject, payload);
        None
    }

    /// The broker's storage for group histories and presence, if it has
    /// one (`None`, the default: the mesh reports neither
    /// [`Feature::History`](crate::channel_layer::Feature::History) nor
    /// [`Feature::Presence`](crate::channel_layer::Feature::Presence)).
    fn store(&self) -> Option<&dyn Store> {
        None
    }

    /// The broker's queues for named channels, for a broker without queue
    /// subscriptions (Redis lists). `None` (the default): a named channel
    /// is a queue subscription ([`subscribe`](Self::subscribe) with
    /// `queue`) and each send a request one receiver answers.
    fn queues(&self) -> Option<&dyn Queues> {
        None
    }
}

/// Named channels as queues the broker keeps (see [`Transport::queues`]):
/// a send pushes the encoded event, each receiver pops, so each event goes
/// to one receiver, and waits in the broker while nobody receives.
pub(crate) trait Queues: Send + Sync {
    /// Appends `payload` (an encoded event) to `channel`'s queue; `false`
    /// when the queue is full (it holds the layer's capacity).
    fn push<'a>(
        &'a self,
        channel: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<bool, TransportError>>;

    /// Starts taking `channel`'s items: each [`QueueConsumer::next`]
    /// pops one, so a consumer only takes what its receiver has room for.
    fn consume<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn QueueConsumer>, TransportError>>;
}

/// Pops one named channel's queue (made by [`Queues::consume`]).
pub(crate) trait QueueConsumer: Send {
    /// The next item, waiting until there is one (reconnecting meanwhile,
    /// if the connection breaks).
    fn next(&mut self) -> BoxFuture<'_, Bytes>;
}

/// Storage a broker may offer the mesh: group histories and presence
/// entries. Optional (see [`Transport::store`]); the mesh builds
/// `recover`, history group sends and presence on it, once for every
/// broker.
///
/// Once an event is stored, the broker publishes it to the subscribers of
/// the group's live subject ([`live_subject`]); the copy arrives in the
/// inbox as an [`Incoming`] with its `position`. An event whose append
/// failed is never published there.
pub(crate) trait Store: Send + Sync {
    /// Appends `event` (an encoded [`Event`](crate::channel_layer::Event))
    /// to `group`'s history and publishes it to the live subject,
    /// atomically: offsets of one group are contiguous (1, 2, 3... in one
    /// epoch). An empty history (never written, expired, lost) starts a
    /// new random epoch at offset 1. Returns the event's position.
    fn append<'a>(
        &'a self,
        group: &'a str,
        event: Bytes,
    ) -> BoxFuture<'a, Result<StreamPosition, TransportError>>;

    /// The position of the newest event of `group`; `None` when its
    /// history is empty.
    fn latest<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Option<StreamPosition>, TransportError>>;

    /// Reads `group`'s history: `None` when it is empty. A store may leave
    /// `events` empty when `since` is of another epoch or older than the
    /// history (the mesh then fails the recovery).
    fn read<'a>(
        &'a self,
        group: &'a str,
        since: &'a StreamPosition,
    ) -> BoxFuture<'a, Result<Option<HistoryRange>, TransportError>>;

    /// Writes one presence entry: `process`'s connection `channel` of
    /// user `user` in `group`, with `entry` (opaque to the store). Entries
    /// do not expire by themselves: they count while their process is
    /// alive in the group ([`presence_alive`](Self::presence_alive)).
    /// Writes O(1) data, whatever the group's size.
    fn presence_add<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
        user: &'a str,
        channel: &'a str,
        entry: Bytes,
    ) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Removes the entry [`presence_add`](Self::presence_add) wrote (no
    /// error when there is none). O(1).
    fn presence_remove<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
        user: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Marks `process` alive in `group` for `ttl` (the process calls it
    /// every third of the TTL while it has entries there) and records it as
    /// one of the group's processes until
    /// [`presence_retire`](Self::presence_retire),
    /// [`presence_drop`](Self::presence_drop) or
    /// [`presence_collect`](Self::presence_collect). Returns whether it was
    /// alive already: `false` the first time, after it expired or after
    /// the store lost it, when the caller writes its entries again (they
    /// may be gone). O(1).
    fn presence_alive<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
        ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<bool, TransportError>>;

    /// Removes `process`'s liveness in `group` and its record as one of
    /// the group's processes: it has no entries there any more (it removed
    /// them). O(1).
    fn presence_retire<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Removes `process` from `group`: its liveness and every entry it
    /// has there, which the process may not know (`flush`, or after a
    /// write failed). May cost O(entries).
    fn presence_drop<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Removes `process`'s entries in `group` and its record as one of the
    /// group's processes if it is not alive there; entries it writes once
    /// alive again are kept (the check and the removal are atomic, or
    /// each removal is written only over what was read before the check).
    /// Rare (a process stopped without leaving): may cost O(entries).
    fn presence_collect<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Every entry of `group` and which of their processes are alive.
    /// O(entries).
    fn presence_list<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<PresenceListing, TransportError>>;

    /// The entries of user `user` in `group` and which of their processes
    /// are alive: O(the user's connections), whatever the group's size.
    fn presence_user<'a>(
        &'a self,
        group: &'a str,
        user: &'a str,
    ) -> BoxFuture<'a, Result<PresenceListing, TransportError>>;

    /// The processes recorded in `group` (see
    /// [`presence_alive`](Self::presence_alive)), each with whether it is
    /// alive: O(processes). A process listed as not alive crashed or was
    /// cut off; its entries are garbage for
    /// [`presence_collect`](Self::presence_collect).
    fn presence_processes<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, bool)>, TransportError>>;

    /// Makes the named channel `channel` a member of `group` until
    /// `expiry` passed (adding it again renews it). O(1).
    fn named_add<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
        expiry: std::time::Duration,
    ) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Removes the named channel `channel` from `group` (no error when it
    /// is not a member). O(1).
    fn named_remove<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>>;

    /// The named members of `group` whose membership has not expired.
    /// Asked on every group send, so a store answers in one round trip
    /// (NATS reads the group's key in its bucket).
    fn named_members<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, TransportError>>;

    /// Claims `key` in `group` (announcing a leave): true for exactly one
    /// caller among every process until `ttl` passed.
    fn presence_claim<'a>(
        &'a self,
        group: &'a str,
        key: &'a str,
        ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<bool, TransportError>>;

    /// Empties what the store keeps under the layer's prefix, for every
    /// group and every process (`flush`): the histories (the next
    /// [`append`](Self::append) to a group starts a new epoch at offset
    /// 1), the presence entries, livenesses, records of processes and
    /// claims, and the named members. What other prefixes keep on the same
    /// broker is untouched. A store forgets any cache of what it removed
    /// (e.g. the last offset it appended). May cost O(what is stored).
    fn clear(&self) -> BoxFuture<'_, Result<(), TransportError>>;
}

/// One presence entry as stored (see [`Store::presence_add`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredEntry {
    /// The process that wrote it.
    pub(crate) process: String,
    /// The connection.
    pub(crate) channel: String,
    /// What the mesh stored.
    pub(crate) entry: Bytes,
}

/// What [`Store::presence_list`] and [`Store::presence_user`] answer.
#[derive(Debug, Default)]
pub(crate) struct PresenceListing {
    /// The entries, of live and dead processes.
    pub(crate) entries: Vec<StoredEntry>,
    /// Which of the entries' processes are alive in the group.
    pub(crate) alive: std::collections::HashSet<String>,
}

/// The subject a broker may store `group`'s history on: `{prefix}.hist.{group}`.
#[cfg_attr(not(feature = "nats"), allow(dead_code))]
pub(crate) fn history_subject(prefix: &str, group: &str) -> String {
    format!("{prefix}.hist.{group}")
}

/// The subject stored events of `group` are published on, which the mesh
/// subscribes to: `{prefix}.hlive.{group}`.
pub(crate) fn live_subject(prefix: &str, group: &str) -> String {
    format!("{prefix}.hlive.{group}")
}

/// What [`Store::read`] found.
#[derive(Debug)]
pub(crate) struct HistoryRange {
    /// The newest event's position.
    pub(crate) latest: StreamPosition,
    /// The offset of the oldest event kept.
    pub(crate) first: u64,
    /// The events after the asked position (offset, encoded event),
    /// oldest first, up to `latest`.
    pub(crate) events: Vec<(u64, Bytes)>,
}

/// One message the broker delivered.
#[derive(Debug)]
pub(crate) struct Incoming {
    /// The subject it was published on.
    pub(crate) subject: String,
    /// Where to answer, for a request made with the broker's own
    /// request/reply ([`Transport::request`]).
    pub(crate) reply_to: Option<String>,
    pub(crate) payload: Bytes,
    /// Set on a stored history event (published on a live subject, see
    /// [`Store`]): its position; the payload is the encoded event.
    pub(crate) position: Option<StreamPosition>,
}

/// What arrives in an [`Inbox`].
#[derive(Debug)]
pub(crate) enum Arrival {
    /// A message the broker delivered.
    Message(Incoming),
    /// The connection came back after an outage (subscriptions are back):
    /// the mesh reads what its history groups missed and writes its
    /// presence again.
    Reconnected,
}

/// Where a transport puts what the broker delivers, bounded by
/// [`INBOX_CAPACITY`].
#[derive(Debug, Clone)]
pub(crate) struct Inbox {
    tx: mpsc::Sender<Arrival>,
}

impl Inbox {
    pub(crate) fn new() -> (Self, mpsc::Receiver<Arrival>) {
        let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
        (Self { tx }, rx)
    }

    /// Hands a message to the mesh without waiting; false when the inbox is
    /// full or the mesh is gone (the message is dropped).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn deliver(
        &self,
        subject: &str,
        payload: Bytes,
        position: Option<StreamPosition>,
    ) -> bool {
        self.tx
            .try_send(Arrival::Message(Incoming {
                subject: subject.to_owned(),
                reply_to: None,
                payload,
                position,
            }))
            .is_ok()
    }

    /// Tells the mesh the connection is back; false when the mesh is gone.
    pub(crate) async fn reconnected(&self) -> bool {
        self.tx.send(Arrival::Reconnected).await.is_ok()
    }

    /// Hands a message to the mesh, waiting while the inbox is full (the
    /// broker client then buffers, within its own bound); false when the
    /// mesh is gone.
    #[cfg_attr(not(any(feature = "nats", feature = "redis")), allow(dead_code))]
    pub(crate) async fn send(&self, message: Incoming) -> bool {
        self.tx.send(Arrival::Message(message)).await.is_ok()
    }
}
