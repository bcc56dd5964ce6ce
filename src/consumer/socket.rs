use std::{
    fmt,
    future::poll_fn,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
};

use futures_util::{SinkExt, Stream, StreamExt};
use tokio_tungstenite::WebSocketStream;

use super::transport::Transport;
use crate::{
    channel_layer::{
        ChannelLayer, ChannelReceiver, Event, GroupSendReport, PresenceInfo, PresenceMember,
        Recovery, RecvError, StreamPosition,
    },
    message::{CloseCode, CloseFrame, Message, Utf8Bytes},
    middleware::Runtime,
    Error, Scope,
};

/// What [`WebSocket::next`] yields: a message from the client or an event
/// from the channel layer.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Incoming {
    /// A message from the client.
    Message(Message),
    /// An event sent to this connection's channel or one of its groups.
    Event(Event),
    /// Group sends dropped this many events because the connection fell behind.
    Lagged(u64),
}

/// An accepted WebSocket connection: the raw form of a consumer.
///
/// You get one from [`Connection::accept`](super::Connection::accept). It
/// reads and writes messages and gives access to this connection's channel
/// (its name, its [`groups`](Self::group_add) and the [events](Self::next)
/// sent to it). Pings are answered automatically.
///
/// The [`WebsocketConsumer`](super::WebsocketConsumer) trait is built on this
/// type and adds what long-lived connections need (heartbeats, outbound
/// limits, panic isolation, concurrent reads while a handler runs); use
/// `WebSocket` directly when you want full control.
pub struct WebSocket {
    pub(crate) stream: WebSocketStream<Transport>,
    pub(crate) inbox: ChannelReceiver,
    pub(crate) scope: Scope,
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) groups: Vec<String>,
    protocol: Option<String>,
}

impl WebSocket {
    pub(crate) fn new(
        stream: WebSocketStream<Transport>,
        inbox: ChannelReceiver,
        scope: Scope,
        runtime: Arc<Runtime>,
        protocol: Option<String>,
    ) -> Self {
        Self {
            stream,
            inbox,
            scope,
            runtime,
            groups: Vec::new(),
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
        self.inbox.name()
    }

    /// The channel layer.
    pub fn channel_layer(&self) -> &Arc<dyn ChannelLayer> {
        &self.runtime.channel_layer
    }

    /// Receives the next message from the client; `None` once the connection
    /// is closed. A received close is answered automatically and returned as
    /// [`Message::Close`]. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Result<Message, Error>> {
        loop {
            match self.stream.next().await? {
                Ok(m) => {
                    if let Some(m) = Message::from_tungstenite(m) {
                        return Some(Ok(m));
                    }
                }
                Err(e) => return Some(Err(e.into())),
            }
        }
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
        loop {
            match Pin::new(&mut self.stream).poll_next(cx) {
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(m))) => match Message::from_tungstenite(m) {
                    Some(m) => return Poll::Ready(Some(Ok(Incoming::Message(m)))),
                    None => continue,
                },
                Poll::Pending => {}
            }
            return match self.inbox.poll_recv(cx) {
                Poll::Ready(Ok(e)) => Poll::Ready(Some(Ok(Incoming::Event(e)))),
                Poll::Ready(Err(RecvError::Lagged(n))) => {
                    Poll::Ready(Some(Ok(Incoming::Lagged(n))))
                }
                // The layer dropped this channel: only client messages remain.
                Poll::Ready(Err(_)) | Poll::Pending => Poll::Pending,
            };
        }
    }

    /// Sends a message and flushes it.
    pub async fn send(&mut self, message: impl Into<Message>) -> Result<(), Error> {
        Ok(self.stream.send(message.into().into_tungstenite()).await?)
    }

    /// Queues a message without flushing (call [`flush`](Self::flush) after a batch).
    pub async fn feed(&mut self, message: impl Into<Message>) -> Result<(), Error> {
        Ok(self.stream.feed(message.into().into_tungstenite()).await?)
    }

    /// Writes out everything queued.
    pub async fn flush(&mut self) -> Result<(), Error> {
        Ok(self.stream.flush().await?)
    }

    /// Sends a close frame and waits (at most the configured close timeout)
    /// for the client's reply, then leaves the groups this socket joined.
    pub async fn close(
        mut self,
        code: CloseCode,
        reason: impl Into<Utf8Bytes>,
    ) -> Result<(), Error> {
        let frame = CloseFrame::new(code, reason);
        let res = self.send(Message::Close(Some(frame))).await;
        let timeout = self.runtime.config.close_timeout;
        let _ = tokio::time::timeout(timeout, async {
            while let Some(Ok(_)) = self.stream.next().await {}
        })
        .await;
        self.leave_groups().await;
        res
    }

    /// Adds this connection to `group`; it leaves automatically on close.
    pub async fn group_add(&mut self, group: &str) -> Result<(), Error> {
        self.runtime
            .channel_layer
            .group_add(group, self.inbox.name())
            .await?;
        if !self.groups.iter().any(|g| g == group) {
            self.groups.push(group.to_owned());
        }
        Ok(())
    }

    /// Removes this connection from `group`.
    pub async fn group_discard(&mut self, group: &str) -> Result<(), Error> {
        self.runtime
            .channel_layer
            .group_discard(group, self.inbox.name())
            .await?;
        self.groups.retain(|g| g != group);
        Ok(())
    }

    /// Sends `event` to every member of `group`.
    pub async fn group_send(&self, group: &str, event: Event) -> Result<GroupSendReport, Error> {
        Ok(self.runtime.channel_layer.group_send(group, event).await?)
    }

    // Presence and history: thin delegations to the channel layer.

    /// Adds this connection to `group` and lists it in the group's presence
    /// with `info`; it leaves both automatically on close.
    pub async fn presence_join(&mut self, group: &str, info: PresenceInfo) -> Result<(), Error> {
        self.runtime
            .channel_layer
            .presence_join(group, self.inbox.name(), info)
            .await?;
        if !self.groups.iter().any(|g| g == group) {
            self.groups.push(group.to_owned());
        }
        Ok(())
    }

    /// Who is present in `group`, across every process, one entry per user.
    pub async fn presence(&self, group: &str) -> Result<Vec<PresenceMember>, Error> {
        Ok(self.runtime.channel_layer.presence(group).await?)
    }

    /// The events of `group` after `since` (join the group first; see
    /// [`Recovery`] for delivering them without a gap or a duplicate).
    pub async fn recover(&self, group: &str, since: &StreamPosition) -> Result<Recovery, Error> {
        Ok(self.runtime.channel_layer.recover(group, since).await?)
    }

    /// Leaves every group this socket joined.
    pub(crate) async fn leave_groups(&mut self) {
        for g in std::mem::take(&mut self.groups) {
            if let Err(e) = self
                .runtime
                .channel_layer
                .group_discard(&g, self.inbox.name())
                .await
            {
                tracing::warn!(group = %g, error = %e, "group_discard failed while closing");
            }
        }
    }
}

impl Drop for WebSocket {
    fn drop(&mut self) {
        if self.groups.is_empty() {
            return;
        }
        // Leave groups even when the socket is dropped without `close`.
        let groups = std::mem::take(&mut self.groups);
        let layer = self.runtime.channel_layer.clone();
        let channel = self.inbox.name().to_owned();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                for g in groups {
                    let _ = layer.group_discard(&g, &channel).await;
                }
            });
        }
    }
}

impl fmt::Debug for WebSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebSocket")
            .field("channel_name", &self.channel_name())
            .field("route", &self.scope.route())
            .field("groups", &self.groups)
            .finish_non_exhaustive()
    }
}

impl Stream for WebSocket {
    type Item = Result<Message, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            return match Pin::new(&mut this.stream).poll_next(cx) {
                Poll::Ready(Some(Ok(m))) => match Message::from_tungstenite(m) {
                    Some(m) => Poll::Ready(Some(Ok(m))),
                    None => continue,
                },
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

impl futures_util::Sink<Message> for WebSocket {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<(), Error>> {
        Pin::new(&mut self.get_mut().stream)
            .poll_ready(cx)
            .map_err(Into::into)
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Error> {
        Pin::new(&mut self.get_mut().stream)
            .start_send(item.into_tungstenite())
            .map_err(Into::into)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<(), Error>> {
        Pin::new(&mut self.get_mut().stream)
            .poll_flush(cx)
            .map_err(Into::into)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<(), Error>> {
        Pin::new(&mut self.get_mut().stream)
            .poll_close(cx)
            .map_err(Into::into)
    }
}
