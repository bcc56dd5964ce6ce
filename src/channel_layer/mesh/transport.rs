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

impl std::error::Error for TransportError {}

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

    /// Sets this process's presence entries in `group` to `entries`
    /// (opaque to the store), kept for `ttl` unless put again.
    fn presence_put<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
        entries: Bytes,
        ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Removes this process's presence entries in `group` (listed as
    /// removed for `ttl`).
    fn presence_remove<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
        ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Every process's presence record in `group` that has not expired:
    /// (process, `Some(entries)`), or (process, `None`) for one the process
    /// removed itself (kept as removed for the TTL, so a record that
    /// expired can be told from one that was removed).
    fn presence_list<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<PresenceRecords, TransportError>>;

    /// Claims announcing that `process`'s members left `group` (its record
    /// expired): true for exactly one caller among every process.
    fn presence_claim<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
        ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<bool, TransportError>>;
}

/// What [`Store::presence_list`] answers: (process, its record, or `None`
/// when the process removed it).
pub(crate) type PresenceRecords = Vec<(String, Option<Bytes>)>;

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
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    pub(crate) async fn send(&self, message: Incoming) -> bool {
        self.tx.send(Arrival::Message(message)).await.is_ok()
    }
}
