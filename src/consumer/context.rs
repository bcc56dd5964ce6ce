use std::{
    collections::VecDeque,
    fmt,
    sync::{Arc, Mutex, MutexGuard},
};

use serde::Serialize;

use crate::{
    channel_layer::{
        ChannelLayer, ChannelLayerError, Event, GroupSendReport, PresenceInfo, PresenceMember,
        Recovery, StreamPosition,
    },
    message::{CloseCode, CloseFrame, Message, Utf8Bytes},
    Error, Scope,
};

/// Messages a handler sent and the connection has not written yet.
///
/// Shared between the handler's [`Context`] and the connection driver, which
/// run in the same task (so the lock is never contended).
#[derive(Debug)]
pub(crate) struct Outbound {
    state: Mutex<OutState>,
    max_bytes: usize,
}

#[derive(Debug, Default)]
pub(crate) struct OutState {
    pub(crate) queue: VecDeque<Message>,
    pub(crate) bytes: usize,
    /// A close requested by the handler, sent after the queued messages.
    pub(crate) close: Option<CloseFrame>,
    /// Queued bytes exceeded the limit: the client is too slow.
    pub(crate) overflow: bool,
    /// No more messages are accepted.
    pub(crate) closed: bool,
}

impl Outbound {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            state: Mutex::default(),
            max_bytes,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, OutState> {
        // Critical sections are pushes and pops; a poisoned lock holds a valid queue.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, msg: Message) -> Result<(), Error> {
        let mut st = self.lock();
        if st.closed || st.close.is_some() || st.overflow {
            return Err(Error::closed());
        }
        let len = msg.len();
        if !st.queue.is_empty() && st.bytes + len > self.max_bytes {
            st.overflow = true;
            st.queue.clear();
            st.bytes = 0;
            return Err(Error::closed());
        }
        st.bytes += len;
        st.queue.push_back(msg);
        Ok(())
    }

    pub(crate) fn pop(&self) -> Option<Message> {
        let mut st = self.lock();
        let m = st.queue.pop_front()?;
        st.bytes -= m.len();
        Some(m)
    }
}

/// What a consumer's handlers use to talk to their connection: Django's
/// `self.send`, `self.close`, `self.channel_layer`, `self.channel_name`,
/// `self.scope` and `self.groups`.
///
/// Sending never waits: messages are queued and written by the connection
/// while the handler goes on. A client that falls more than
/// [`max_outbound_bytes`](crate::WebSocketConfig::max_outbound_bytes) behind is
/// closed with [`SLOW_CONSUMER`](crate::message::close_code::SLOW_CONSUMER).
pub struct Context {
    scope: Scope,
    layer: Arc<dyn ChannelLayer>,
    channel_name: String,
    groups: Vec<String>,
    pub(crate) outbound: Arc<Outbound>,
}

impl Context {
    pub(crate) fn new(
        scope: Scope,
        layer: Arc<dyn ChannelLayer>,
        channel_name: String,
        outbound: Arc<Outbound>,
    ) -> Self {
        Self {
            scope,
            layer,
            channel_name,
            groups: Vec::new(),
            outbound,
        }
    }

    /// The request that opened the connection.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// This connection's unique channel name.
    pub fn channel_name(&self) -> &str {
        &self.channel_name
    }

    /// The channel layer, e.g. to send to another channel.
    pub fn channel_layer(&self) -> &Arc<dyn ChannelLayer> {
        &self.layer
    }

    /// Groups this connection joined through [`group_add`](Self::group_add).
    pub fn groups(&self) -> &[String] {
        &self.groups
    }

    /// Queues a message for the client. Fails once the connection is closing.
    pub fn send(&self, message: impl Into<Message>) -> Result<(), Error> {
        self.outbound.push(message.into())
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
        let mut st = self.outbound.lock();
        if st.close.is_none() && !st.closed {
            st.close = Some(CloseFrame::new(code, reason));
        }
    }

    /// Adds this connection to `group`; it leaves automatically on disconnect.
    pub async fn group_add(&mut self, group: &str) -> Result<(), ChannelLayerError> {
        self.layer.group_add(group, &self.channel_name).await?;
        if !self.groups.iter().any(|g| g == group) {
            self.groups.push(group.to_owned());
        }
        Ok(())
    }

    /// Removes this connection from `group`.
    pub async fn group_discard(&mut self, group: &str) -> Result<(), ChannelLayerError> {
        self.layer.group_discard(group, &self.channel_name).await?;
        self.groups.retain(|g| g != group);
        Ok(())
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
    /// with `info`; it leaves both automatically on disconnect.
    pub async fn presence_join(
        &mut self,
        group: &str,
        info: PresenceInfo,
    ) -> Result<(), ChannelLayerError> {
        self.layer
            .presence_join(group, &self.channel_name, info)
            .await?;
        if !self.groups.iter().any(|g| g == group) {
            self.groups.push(group.to_owned());
        }
        Ok(())
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

    /// Leaves every group (run by the driver on disconnect).
    pub(crate) async fn leave_groups(&mut self) {
        for g in std::mem::take(&mut self.groups) {
            if let Err(e) = self.layer.group_discard(&g, &self.channel_name).await {
                tracing::warn!(group = %g, error = %e, "group_discard failed on disconnect");
            }
        }
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("channel_name", &self.channel_name)
            .field("route", &self.scope.route())
            .field("groups", &self.groups)
            .finish_non_exhaustive()
    }
}
