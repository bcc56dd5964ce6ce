//! [`WireCheckLayer`]: a channel layer for tests that sends every event
//! through the wire encoding, so encoding bugs show up without Redis.

use std::sync::Arc;

use crate::channel_layer::{
    BoxFuture, ChannelLayer, ChannelLayerError, ChannelLayerStats, ChannelReceiver, Event,
    GroupSendReport, InMemoryChannelLayer,
};

/// Wraps a channel layer (by default a fresh [`InMemoryChannelLayer`]) and
/// round-trips every event of [`send`](ChannelLayer::send) and
/// [`group_send`](ChannelLayer::group_send) through [`Event::encode`] and
/// [`Event::decode`], as a layer that crosses processes does.
///
/// The in-memory layer hands the same `Event` value to every receiver, so an
/// event body that does not survive MessagePack (a `#[serde(skip)]` field, a
/// map with non-string keys, a type whose `Serialize` and `Deserialize`
/// disagree) works in tests and breaks on Redis. Under this layer it fails
/// the send with [`ChannelLayerError::Codec`] or arrives as Redis would
/// deliver it.
///
/// ```
/// use std::sync::Arc;
/// use serde::{Deserialize, Serialize};
/// use tower_channels::channel_layer::{ChannelLayer, Event};
/// use tower_channels::testing::WireCheckLayer;
///
/// #[derive(Clone, Serialize, Deserialize, PartialEq, Debug)]
/// struct Note { text: String, #[serde(skip)] cached: u32 }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let layer: Arc<dyn ChannelLayer> = Arc::new(WireCheckLayer::new());
/// let mut inbox = layer.new_channel().await.unwrap();
/// layer.send(inbox.name(), Event::new("note", Note { text: "hi".into(), cached: 7 })).await.unwrap();
/// let got: Note = inbox.recv().await.unwrap().body().unwrap();
/// // The skipped field did not cross the wire, as it would not on Redis.
/// assert_eq!(got, Note { text: "hi".into(), cached: 0 });
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct WireCheckLayer {
    inner: Arc<dyn ChannelLayer>,
}

impl Default for WireCheckLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl WireCheckLayer {
    /// Round-trips events over a fresh [`InMemoryChannelLayer`].
    pub fn new() -> Self {
        Self::wrap(Arc::new(InMemoryChannelLayer::new()))
    }

    /// Round-trips events over `inner`.
    pub fn wrap(inner: Arc<dyn ChannelLayer>) -> Self {
        Self { inner }
    }
}

/// The event as another process would decode it.
fn round_trip(event: &Event) -> Result<Event, ChannelLayerError> {
    Ok(Event::decode(&event.encode()?)?)
}

impl ChannelLayer for WireCheckLayer {
    fn new_channel(&self) -> BoxFuture<'_, Result<ChannelReceiver, ChannelLayerError>> {
        self.inner.new_channel()
    }

    fn receive<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<ChannelReceiver, ChannelLayerError>> {
        self.inner.receive(channel)
    }

    fn send<'a>(
        &'a self,
        channel: &'a str,
        event: Event,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        Box::pin(async move { self.inner.send(channel, round_trip(&event)?).await })
    }

    fn group_add<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        self.inner.group_add(group, channel)
    }

    fn group_discard<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        self.inner.group_discard(group, channel)
    }

    fn group_send<'a>(
        &'a self,
        group: &'a str,
        event: Event,
    ) -> BoxFuture<'a, Result<GroupSendReport, ChannelLayerError>> {
        Box::pin(async move { self.inner.group_send(group, round_trip(&event)?).await })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ChannelLayerError>> {
        self.inner.flush()
    }

    fn stats(&self) -> ChannelLayerStats {
        self.inner.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;

    #[tokio::test]
    async fn an_event_the_wire_cannot_carry_fails_where_memory_passes_it() {
        let ping = || Event::message("odd", Message::Ping(bytes::Bytes::from_static(b"p")));
        let memory = InMemoryChannelLayer::new();
        let rx = memory.new_channel().await.unwrap();
        memory.send(rx.name(), ping()).await.unwrap();

        let layer = WireCheckLayer::new();
        let rx = layer.new_channel().await.unwrap();
        let err = layer.send(rx.name(), ping()).await.unwrap_err();
        assert!(matches!(err, ChannelLayerError::Codec(_)), "{err:?}");
        layer.group_add("g", rx.name()).await.unwrap();
        let err = layer.group_send("g", ping()).await.unwrap_err();
        assert!(matches!(err, ChannelLayerError::Codec(_)), "{err:?}");
    }

    #[tokio::test]
    async fn group_sends_arrive_decoded() {
        let layer = WireCheckLayer::new();
        let mut rx = layer.new_channel().await.unwrap();
        layer.group_add("g", rx.name()).await.unwrap();
        layer
            .group_send("g", Event::new("n", vec![1u8, 2, 3]))
            .await
            .unwrap();
        let got = rx.recv().await.unwrap();
        // A decoded event holds MessagePack bytes, not the sender's value.
        assert!(got.downcast_ref::<Vec<u8>>().is_none());
        assert_eq!(got.body::<Vec<u8>>().unwrap(), vec![1, 2, 3]);
    }
}
