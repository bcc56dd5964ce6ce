//! What a broker gives the mesh: publish, subscribe, unsubscribe, and an
//! inbox the broker's messages arrive in.

use std::fmt;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::channel_layer::{BoxError, BoxFuture};

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
}

/// Where a transport puts what the broker delivers, bounded by
/// [`INBOX_CAPACITY`].
#[derive(Debug, Clone)]
pub(crate) struct Inbox {
    tx: mpsc::Sender<Incoming>,
}

impl Inbox {
    pub(crate) fn new() -> (Self, mpsc::Receiver<Incoming>) {
        let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
        (Self { tx }, rx)
    }

    /// Hands a message to the mesh without waiting; false when the inbox is
    /// full or the mesh is gone (the message is dropped).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn deliver(&self, subject: &str, payload: Bytes) -> bool {
        self.tx
            .try_send(Incoming {
                subject: subject.to_owned(),
                reply_to: None,
                payload,
            })
            .is_ok()
    }

    /// Hands a message to the mesh, waiting while the inbox is full (the
    /// broker client then buffers, within its own bound); false when the
    /// mesh is gone.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    pub(crate) async fn send(&self, message: Incoming) -> bool {
        self.tx.send(message).await.is_ok()
    }
}
