use std::{
    fmt,
    future::poll_fn,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
};

use futures_util::Stream;

use crate::{
    channel_layer::{
        ChannelLayer, ChannelLayerError, Event, GroupSendReport, PresenceInfo, PresenceMember,
        Recovery, StreamPosition,
    },
    engine::{AppLink, Outbound},
    message::{CloseCode, CloseFrame, Message, Utf8Bytes},
    Error, Scope,
};

pub use crate::engine::Incoming;

/// An accepted WebSocket connection: the raw form of a consumer.
///
/// You get one from [`Connection::accept`](super::Connection::accept). It
/// reads and writes messages and gives access to this connection's channel
/// (its name, its [`groups`](Self::group_add) and the [events](Self::next)
/// sent to it).
///
/// It is a handle on the same connection engine the
/// [`WebSocketConsumer`](super::WebSocketConsumer) forms use (see
/// [`crate::engine`'s docs](crate::WebSocketConfig#slow-clients)), so it gets
/// the same guarantees: pings are sent and answered, an idle client is
/// closed, size and rate limits apply, the outbound budget applies
/// ([`send`](Self::send) and [`feed`](Self::feed) wait while the queue is
/// above it; a client that stays behind is closed with 4008), server
/// shutdown closes with 1001 and the closing handshake completes, the
/// connection counts in [`ConnectionStats`](crate::ConnectionStats), and its
/// groups are left as soon as it starts closing.
///
/// Control frames are handled by the engine: [`recv`](Self::recv) yields
/// text and binary messages, then the peer's close as [`Message::Close`],
/// then `None`. Protocol errors close the connection with the matching code
/// (1002, 1007, 1009); `recv` then returns `None`.
///
/// Dropping the handle (or returning from the consumer future without it)
/// closes the connection with 1000.
pub struct WebSocket {
    link: AppLink,
    scope: Scope,
    protocol: Option<String>,
}

impl WebSocket {
    pub(crate) fn new(link: AppLink, scope: Scope, protocol: Option<String>) -> Self {
        Self {
            link,
            scope,
            protocol,
        }
    }

    /// The request that opened the connection.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The subprotocol chosen at accept time.
    pub fn subprotocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// This connection's unique channel name: [`send`](ChannelLayer::send)
    /// events to it from anywhere.
    pub fn channel_name(&self) -> &str {
        self.link.channel_name()
    }

    /// The channel layer.
    pub fn channel_layer(&self) -> &Arc<dyn ChannelLayer> {
        &self.link.runtime.channel_layer
    }

    /// Receives the next message from the client; `None` once the connection
    /// is closed. The peer's close is answered automatically and returned as
    /// [`Message::Close`]. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Result<Message, Error>> {
        poll_fn(|cx| self.link.poll_message(cx)).await.map(Ok)
    }

    /// Receives the next message from the client or event from the channel
    /// layer, whichever comes first; `None` once the connection is closed.
    /// Cancel-safe.
    pub async fn next(&mut self) -> Option<Result<Incoming, Error>> {
        poll_fn(|cx| self.poll_next_incoming(cx)).await
    }

    fn poll_next_incoming(
        &mut self,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Incoming, Error>>> {
        self.link.poll_incoming(cx).map(|i| i.map(Ok))
    }

    /// Sends a message and waits until it is written to the socket.
    pub async fn send(&mut self, message: impl Into<Message>) -> Result<(), Error> {
        self.feed(message).await?;
        self.flush().await
    }

    /// Queues a message, waiting while the outbound queue is above its soft
    /// budget; call [`flush`](Self::flush) after a batch (the engine writes
    /// queued messages anyway, flushing only waits for it).
    pub async fn feed(&mut self, message: impl Into<Message>) -> Result<(), Error> {
        let message = message.into();
        poll_fn(|cx| self.link.poll_ready(cx)).await?;
        self.push(message)
    }

    fn push(&self, message: Message) -> Result<(), Error> {
        match message {
            Message::Close(frame) => {
                self.link.close(
                    frame
                        .unwrap_or_else(|| CloseFrame::new(crate::message::close_code::NORMAL, "")),
                    true,
                );
                Ok(())
            }
            // Pings and pongs are the engine's business.
            Message::Ping(_) | Message::Pong(_) => Ok(()),
            m => self.link.push(Outbound::Message(m)),
        }
    }

    /// Waits until everything queued is written to the socket.
    pub async fn flush(&mut self) -> Result<(), Error> {
        poll_fn(|cx| self.link.poll_flushed(cx)).await
    }

    /// Sends a close frame after the queued messages and waits (at most the
    /// configured close timeout) for the closing handshake to complete. The
    /// groups this socket joined are left as the close starts.
    pub async fn close(self, code: CloseCode, reason: impl Into<Utf8Bytes>) -> Result<(), Error> {
        self.link.close(CloseFrame::new(code, reason), true);
        poll_fn(|cx| self.link.poll_closed(cx)).await;
        Ok(())
    }

    /// Adds this connection to `group`; it leaves automatically on close.
    pub async fn group_add(&mut self, group: &str) -> Result<(), ChannelLayerError> {
        self.link.group_add(group).await
    }

    /// Removes this connection from `group`.
    pub async fn group_discard(&mut self, group: &str) -> Result<(), ChannelLayerError> {
        self.link.group_discard(group).await
    }

    /// Sends `event` to every member of `group`.
    pub async fn group_send(
        &self,
        group: &str,
        event: Event,
    ) -> Result<GroupSendReport, ChannelLayerError> {
        self.channel_layer().group_send(group, event).await
    }

    // Presence and history: thin delegations to the channel layer.

    /// Adds this connection to `group` and lists it in the group's presence
    /// with `info`; it leaves both automatically on close.
    pub async fn presence_join(
        &mut self,
        group: &str,
        info: PresenceInfo,
    ) -> Result<(), ChannelLayerError> {
        self.link.presence_join(group, info).await
    }

    /// Who is present in `group`, across every process, one entry per user.
    pub async fn presence(&self, group: &str) -> Result<Vec<PresenceMember>, ChannelLayerError> {
        self.channel_layer().presence(group).await
    }

    /// The events of `group` after `since` (join the group first; see
    /// [`Recovery`] for delivering them without a gap or a duplicate).
    pub async fn recover(
        &self,
        group: &str,
        since: &StreamPosition,
    ) -> Result<Recovery, ChannelLayerError> {
        self.channel_layer().recover(group, since).await
    }
}

impl fmt::Debug for WebSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebSocket")
            .field("channel_name", &self.channel_name())
            .field("route", &self.scope.route())
            .finish_non_exhaustive()
    }
}

impl Stream for WebSocket {
    type Item = Result<Message, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.link.poll_message(cx).map(|m| m.map(Ok))
    }
}

impl futures_util::Sink<Message> for WebSocket {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<(), Error>> {
        self.link.poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Error> {
        self.push(item)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<(), Error>> {
        self.link.poll_flushed(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<(), Error>> {
        self.link.close(
            CloseFrame::new(crate::message::close_code::NORMAL, ""),
            true,
        );
        self.link.poll_closed(cx).map(|_| Ok(()))
    }
}
