use std::{fmt, sync::Arc};

use serde::Serialize;

use super::join::{Join, ResumeState};
use crate::{
    channel_layer::{
        ChannelLayer, ChannelLayerError, Event, GroupSendReport, PresenceInfo, PresenceMember,
        Recovery, StreamPosition,
    },
    engine::{AppLink, Outbound},
    message::{CloseCode, CloseFrame, Message, Utf8Bytes},
    Error, Scope,
};

/// What a consumer's handlers use to talk to their connection: Django's
/// `self.send`, `self.close`, `self.channel_layer`, `self.channel_name`,
/// `self.scope` and `self.groups`.
///
/// The `send*` methods write frames to this connection's client (like
/// axum's `WebSocket::send` and Django's `self.send`); events for other
/// connections go through [`group_send`](Self::group_send) and
/// [`send_to`](Self::send_to) (the channel layer's `send`). Channel-layer
/// methods return [`ChannelLayerError`], here and on
/// [`WebSocket`](crate::consumer::WebSocket).
///
/// Sending never waits: messages are queued and written by the connection
/// while the handler goes on. A client that stays behind is closed with
/// [`SLOW_CONSUMER`](crate::message::close_code::SLOW_CONSUMER); see
/// [the slow-client policy](crate::WebSocketConfig#slow-clients).
pub struct Context {
    scope: Scope,
    layer: Arc<dyn ChannelLayer>,
    pub(crate) link: AppLink,
    /// Set by [`join`](Self::join) when it resumed a group.
    pub(crate) resume: Option<Box<ResumeState>>,
}

impl Context {
    pub(crate) fn new(scope: Scope, link: AppLink) -> Self {
        Self {
            scope,
            layer: link.runtime.channel_layer.clone(),
            link,
            resume: None,
        }
    }

    /// The request that opened the connection.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// This connection's unique channel name.
    pub fn channel_name(&self) -> &str {
        self.link.channel_name()
    }

    /// The channel layer, e.g. to send to another channel.
    pub fn channel_layer(&self) -> &Arc<dyn ChannelLayer> {
        &self.layer
    }

    /// Groups this connection joined through [`group_add`](Self::group_add)
    /// (empty once it started closing: it leaves them then).
    pub fn groups(&self) -> Vec<String> {
        self.link.groups()
    }

    /// Queues a message for the client. Fails once the connection is closing.
    pub fn send(&self, message: impl Into<Message>) -> Result<(), Error> {
        self.send_out(Outbound::Message(message.into()))
    }

    pub(crate) fn send_out(&self, out: Outbound) -> Result<(), Error> {
        self.link.push(out)
    }

    /// Queues a text message.
    pub fn send_text(&self, text: impl Into<Utf8Bytes>) -> Result<(), Error> {
        self.send(Message::Text(text.into()))
    }

    /// Queues a binary message.
    pub fn send_binary(&self, data: impl Into<bytes::Bytes>) -> Result<(), Error> {
        self.send(Message::Binary(data.into()))
    }

    /// Serializes `value` as JSON and queues it as a text message.
    pub fn send_json<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), Error> {
        let text = serde_json::to_string(value).map_err(Error::encode)?;
        self.send(Message::text(text))
    }

    /// Closes the connection with `code` and `reason` after the messages
    /// already queued. The consumer's `disconnect` runs once the close completes.
    pub fn close(&self, code: CloseCode, reason: impl Into<Utf8Bytes>) {
        self.link.close(CloseFrame::new(code, reason), true);
    }

    /// Adds this connection to `group`; it leaves automatically as soon as
    /// the connection starts closing (a no-op once it has).
    pub async fn group_add(&mut self, group: &str) -> Result<(), ChannelLayerError> {
        self.link.group_add(group).await
    }

    /// Removes this connection from `group`.
    pub async fn group_discard(&mut self, group: &str) -> Result<(), ChannelLayerError> {
        if let Some(resume) = &mut self.resume {
            resume.forget(group);
        }
        self.link.group_discard(group).await
    }

    /// Sends `event` to every member of `group` (this connection included, if
    /// it is a member).
    pub async fn group_send(
        &self,
        group: &str,
        event: Event,
    ) -> Result<GroupSendReport, ChannelLayerError> {
        self.layer.group_send(group, event).await
    }

    /// Sends `event` to the channel `channel` (another connection or a worker).
    pub async fn send_to(&self, channel: &str, event: Event) -> Result<(), ChannelLayerError> {
        self.layer.send(channel, event).await
    }

    // Presence and history: thin delegations to the channel layer (see
    // `channel_layer`'s "Presence" and "History and recovery").

    /// Adds this connection to `group` and lists it in the group's presence
    /// with `info`; it leaves both automatically on disconnect. In a group
    /// with notifications this connection gets its own `presence.join`,
    /// like every member; [`join`](Self::join)`(group).presence(info)
    /// .skip_own_presence()` drops those about its own user.
    pub async fn presence_join(
        &mut self,
        group: &str,
        info: PresenceInfo,
    ) -> Result<(), ChannelLayerError> {
        self.link.presence_join(group, info).await
    }

    /// Joins `group`, optionally with presence and resuming after the
    /// client's last position, recovered events handed to `event` before
    /// live ones and live repeats dropped: see [`Join`].
    pub fn join(&mut self, group: &str) -> Join<'_> {
        Join::new(self, group)
    }

    pub(crate) fn resume_state(&mut self) -> &mut ResumeState {
        self.resume.get_or_insert_with(Box::default)
    }

    /// Who is present in `group`, across every process, one entry per user.
    pub async fn presence(&self, group: &str) -> Result<Vec<PresenceMember>, ChannelLayerError> {
        self.layer.presence(group).await
    }

    /// The events of `group` after `since` (join the group first; see
    /// [`Recovery`] for delivering them without a gap or a duplicate).
    pub async fn recover(
        &self,
        group: &str,
        since: &StreamPosition,
    ) -> Result<Recovery, ChannelLayerError> {
        self.layer.recover(group, since).await
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("channel_name", &self.channel_name())
            .field("route", &self.scope.route())
            .finish_non_exhaustive()
    }
}
