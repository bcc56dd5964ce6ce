use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Weak,
};

use super::{
    channel, local::Registry, names, validate_channel_name, validate_group_name, BoxFuture,
    ChannelLayer, ChannelLayerError, ChannelLayerStats, ChannelReceiver, Event, GroupSendReport,
};

/// Default number of events a channel holds before sends to it fail
/// (direct sends) or drop and mark the receiver as lagging (group sends).
pub const DEFAULT_CAPACITY: usize = 1024;

/// The default channel layer: groups and channels inside one process.
///
/// Events are never serialized: the [`Event`] itself (one reference-counted
/// allocation) is handed to every receiver, so a group send of a ready
/// WebSocket message ([`Event::message`]) is encoded once for all members.
///
/// Membership needs no expiry here: when a channel's receiver is dropped
/// (its connection closed) the channel leaves every group at once.
///
/// ```
/// use std::sync::Arc;
/// use tower_channels::channel_layer::{ChannelLayer, Event, InMemoryChannelLayer};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let layer: Arc<dyn ChannelLayer> = Arc::new(InMemoryChannelLayer::new());
/// let mut rx = layer.new_channel().await.unwrap();
/// layer.group_add("lobby", rx.name()).await.unwrap();
/// let report = layer.group_send("lobby", Event::text("chat.message", "hi")).await.unwrap();
/// assert_eq!(report.local_members, 1);
/// assert_eq!(rx.recv().await.unwrap().kind(), "chat.message");
/// # });
/// ```
#[derive(Clone, Debug)]
pub struct InMemoryChannelLayer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    prefix: String,
    capacity: usize,
    next_id: AtomicU64,
    registry: Registry,
    group_sends: AtomicU64,
    delivered: AtomicU64,
    dropped_full: AtomicU64,
}

impl Default for InMemoryChannelLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryChannelLayer {
    /// A layer whose channels hold [`DEFAULT_CAPACITY`] events.
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }

    /// A layer whose channels hold `capacity` events each (at least 1).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                prefix: format!("specific.{}!", names::random_token(12)),
                capacity: capacity.max(1),
                next_id: AtomicU64::new(0),
                registry: Registry::default(),
                group_sends: AtomicU64::new(0),
                delivered: AtomicU64::new(0),
                dropped_full: AtomicU64::new(0),
            }),
        }
    }

    /// Number of members of `group` (0 for an unknown group).
    pub fn group_len(&self, group: &str) -> usize {
        self.inner.registry.group_len(group)
    }

    /// Number of channels that currently have a receiver.
    pub fn channel_count(&self) -> usize {
        self.inner.registry.channel_count()
    }
}

impl Inner {
    fn register(self: &Arc<Self>, name: String) -> Result<ChannelReceiver, ChannelLayerError> {
        let (tx, rx) = channel(name.clone(), self.capacity);
        self.registry.insert(&name, tx)?;
        let weak: Weak<Inner> = Arc::downgrade(self);
        Ok(rx.on_drop(move || {
            if let Some(inner) = weak.upgrade() {
                inner.registry.forget(&name);
            }
        }))
    }
}

impl ChannelLayer for InMemoryChannelLayer {
    fn new_channel(&self) -> BoxFuture<'_, Result<ChannelReceiver, ChannelLayerError>> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}{id}", self.inner.prefix);
        let result = self.inner.register(name);
        Box::pin(std::future::ready(result))
    }

    fn receive<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<ChannelReceiver, ChannelLayerError>> {
        let result = validate_channel_name(channel)
            .map_err(ChannelLayerError::from)
            .and_then(|()| self.inner.register(channel.to_owned()));
        Box::pin(std::future::ready(result))
    }

    fn send<'a>(
        &'a self,
        channel: &'a str,
        event: Event,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        let result = validate_channel_name(channel)
            .map_err(ChannelLayerError::from)
            .and_then(|()| self.inner.registry.send(channel, event));
        Box::pin(std::future::ready(result))
    }

    fn group_add<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        let result = validate_group_name(group)
            .and_then(|()| validate_channel_name(channel))
            .map_err(ChannelLayerError::from)
            .and_then(|()| self.inner.registry.group_add(group, channel));
        Box::pin(std::future::ready(result))
    }

    fn group_discard<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        let result = validate_group_name(group)
            .and_then(|()| validate_channel_name(channel))
            .map_err(ChannelLayerError::from)
            .map(|()| self.inner.registry.group_discard(group, channel));
        Box::pin(std::future::ready(result))
    }

    fn group_send<'a>(
        &'a self,
        group: &'a str,
        event: Event,
    ) -> BoxFuture<'a, Result<GroupSendReport, ChannelLayerError>> {
        let result = validate_group_name(group)
            .map_err(ChannelLayerError::from)
            .map(|()| {
                let (delivered, dropped) = self.inner.registry.fan_out(group, &event);
                let inner = &self.inner;
                inner.group_sends.fetch_add(1, Ordering::Relaxed);
                inner
                    .delivered
                    .fetch_add(delivered as u64, Ordering::Relaxed);
                inner
                    .dropped_full
                    .fetch_add(dropped as u64, Ordering::Relaxed);
                crate::metrics::group_sent(dropped);
                GroupSendReport {
                    local_members: delivered,
                    remote_receivers: None,
                    dropped,
                }
            });
        Box::pin(std::future::ready(result))
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ChannelLayerError>> {
        self.inner.registry.clear();
        Box::pin(std::future::ready(Ok(())))
    }

    fn stats(&self) -> ChannelLayerStats {
        ChannelLayerStats {
            group_sends: self.inner.group_sends.load(Ordering::Relaxed),
            delivered: self.inner.delivered.load(Ordering::Relaxed),
            dropped_full: self.inner.dropped_full.load(Ordering::Relaxed),
            ..ChannelLayerStats::default()
        }
    }
}
