use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
    },
};

use super::{
    channel, names, validate_channel_name, validate_group_name, BoxFuture, ChannelLayer,
    ChannelLayerError, ChannelReceiver, ChannelSender, Delivery, Event, GroupSendReport,
    LayerStats, TrySendError,
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
/// assert_eq!(report.delivered, 1);
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
    state: RwLock<State>,
    group_sends: AtomicU64,
    delivered: AtomicU64,
    dropped_full: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    channels: HashMap<String, Entry>,
    groups: HashMap<String, HashMap<String, ChannelSender>>,
}

#[derive(Debug)]
struct Entry {
    sender: ChannelSender,
    groups: HashSet<String>,
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
                state: RwLock::default(),
                group_sends: AtomicU64::new(0),
                delivered: AtomicU64::new(0),
                dropped_full: AtomicU64::new(0),
            }),
        }
    }

    /// Number of members of `group` (0 for an unknown group).
    pub fn group_len(&self, group: &str) -> usize {
        self.inner.read().groups.get(group).map_or(0, HashMap::len)
    }

    /// Number of channels that currently have a receiver.
    pub fn channel_count(&self) -> usize {
        self.inner.read().channels.len()
    }
}

impl Inner {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        // Critical sections only insert and remove map entries; a panic in one
        // cannot break an invariant, so poisoning is ignored.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn register(self: &Arc<Self>, name: String) -> Result<ChannelReceiver, ChannelLayerError> {
        let (tx, rx) = channel(name.clone(), self.capacity);
        {
            let mut st = self.write();
            if let Some(existing) = st.channels.get(&name) {
                if !existing.sender.is_closed() {
                    return Err(ChannelLayerError::backend(format!(
                        "channel {name:?} already has a receiver in this process"
                    )));
                }
            }
            st.channels.insert(
                name.clone(),
                Entry {
                    sender: tx,
                    groups: HashSet::new(),
                },
            );
        }
        let weak: Weak<Inner> = Arc::downgrade(self);
        Ok(rx.on_drop(move || {
            if let Some(inner) = weak.upgrade() {
                inner.forget(&name);
            }
        }))
    }

    fn forget(&self, name: &str) {
        let mut st = self.write();
        // Only forget the entry if it still belongs to the dropped receiver.
        let Some(entry) = st.channels.get(name) else {
            return;
        };
        if !entry.sender.is_closed() {
            return;
        }
        let Some(entry) = st.channels.remove(name) else {
            return;
        };
        for group in entry.groups {
            if let Some(members) = st.groups.get_mut(&group) {
                members.remove(name);
                if members.is_empty() {
                    st.groups.remove(&group);
                }
            }
        }
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
        let result = (|| {
            validate_channel_name(channel)?;
            let st = self.inner.read();
            let entry =
                st.channels
                    .get(channel)
                    .ok_or_else(|| ChannelLayerError::NoSuchChannel {
                        channel: channel.to_owned(),
                    })?;
            match entry.sender.try_send(event) {
                Ok(()) => Ok(()),
                Err(TrySendError::Full(_)) => Err(ChannelLayerError::ChannelFull {
                    channel: channel.to_owned(),
                }),
                Err(_) => Err(ChannelLayerError::NoSuchChannel {
                    channel: channel.to_owned(),
                }),
            }
        })();
        Box::pin(std::future::ready(result))
    }

    fn group_add<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        let result = (|| {
            validate_group_name(group)?;
            validate_channel_name(channel)?;
            let mut st = self.inner.write();
            let entry =
                st.channels
                    .get_mut(channel)
                    .ok_or_else(|| ChannelLayerError::NoSuchChannel {
                        channel: channel.to_owned(),
                    })?;
            entry.groups.insert(group.to_owned());
            let sender = entry.sender.clone();
            st.groups
                .entry(group.to_owned())
                .or_default()
                .insert(channel.to_owned(), sender);
            Ok(())
        })();
        Box::pin(std::future::ready(result))
    }

    fn group_discard<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        let result = (|| {
            validate_group_name(group)?;
            validate_channel_name(channel)?;
            let mut st = self.inner.write();
            if let Some(entry) = st.channels.get_mut(channel) {
                entry.groups.remove(group);
            }
            if let Some(members) = st.groups.get_mut(group) {
                members.remove(channel);
                if members.is_empty() {
                    st.groups.remove(group);
                }
            }
            Ok(())
        })();
        Box::pin(std::future::ready(result))
    }

    fn group_send<'a>(
        &'a self,
        group: &'a str,
        event: Event,
    ) -> BoxFuture<'a, Result<GroupSendReport, ChannelLayerError>> {
        let result = (|| {
            validate_group_name(group)?;
            let mut report = GroupSendReport::default();
            let st = self.inner.read();
            if let Some(members) = st.groups.get(group) {
                for sender in members.values() {
                    match sender.send_lossy(event.clone()) {
                        Delivery::Delivered => report.delivered += 1,
                        Delivery::Dropped => report.dropped += 1,
                        // Receiver dropped; its on_drop hook removes it shortly.
                        Delivery::Closed => {}
                    }
                }
            }
            drop(st);
            let inner = &self.inner;
            inner.group_sends.fetch_add(1, Ordering::Relaxed);
            inner
                .delivered
                .fetch_add(report.delivered as u64, Ordering::Relaxed);
            inner
                .dropped_full
                .fetch_add(report.dropped as u64, Ordering::Relaxed);
            Ok(report)
        })();
        Box::pin(std::future::ready(result))
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ChannelLayerError>> {
        let mut st = self.inner.write();
        st.groups.clear();
        for entry in st.channels.values_mut() {
            entry.groups.clear();
            entry.sender.clear();
        }
        drop(st);
        Box::pin(std::future::ready(Ok(())))
    }

    fn stats(&self) -> LayerStats {
        LayerStats {
            group_sends: self.inner.group_sends.load(Ordering::Relaxed),
            delivered: self.inner.delivered.load(Ordering::Relaxed),
            dropped_full: self.inner.dropped_full.load(Ordering::Relaxed),
            ..LayerStats::default()
        }
    }
}
