use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::local::lock;
use super::{
    history::policy_for,
    local::{Counters, LocalChannels, Registry},
    names,
    presence::{group_by_user, LocalPresence},
    validate_channel_name, validate_group_name, BoxFuture, Capabilities, ChannelLayer,
    ChannelLayerError, ChannelLayerStats, ChannelReceiver, Event, Feature, GroupSendReport,
    HistoryPolicy, PresenceChange, PresenceConfig, PresenceInfo, PresenceMember, Recovery,
    RecoveryFailure, StreamPosition, PRESENCE_JOIN, PRESENCE_LEAVE,
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
/// (its connection closed) the channel leaves every group at once, and its
/// presence with them.
///
/// [Presence](super#presence) and [history](super#history-and-recovery)
/// work as on every backend, inside this process: see
/// [`with_history`](Self::with_history) and [`with_presence`](Self::with_presence).
/// A history lives in memory (bounded by its policy's `max_len`) and its
/// epoch changes when it expires or the process restarts.
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
    capacity: usize,
    registry: Registry,
    counters: Counters,
    history: Vec<HistoryPolicy>,
    presence_config: PresenceConfig,
    streams: Mutex<Streams>,
    presence: Mutex<LocalPresence>,
}

/// The histories of groups with a [`HistoryPolicy`].
#[derive(Debug)]
struct Streams {
    map: HashMap<String, Arc<Mutex<Stream>>>,
    last_sweep: Instant,
}

/// How often expired histories are dropped from the map.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Stream {
    epoch: Arc<str>,
    top: u64,
    /// The last events, each carrying its position; offsets
    /// `top - len + 1 ..= top`.
    events: VecDeque<Event>,
    last: Instant,
    ttl: Duration,
}

impl Stream {
    fn new(ttl: Duration) -> Self {
        Self {
            epoch: names::random_token(10).into(),
            top: 0,
            events: VecDeque::new(),
            last: Instant::now(),
            ttl,
        }
    }

    fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.last) > self.ttl
    }

    fn latest(&self) -> Option<StreamPosition> {
        (self.top > 0).then(|| StreamPosition::new(self.top, self.epoch.clone()))
    }
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
                capacity: capacity.max(1),
                registry: Registry::new(format!("specific.{}", names::random_token(12))),
                counters: Counters::default(),
                history: Vec::new(),
                presence_config: PresenceConfig::new(),
                streams: Mutex::new(Streams {
                    map: HashMap::new(),
                    last_sweep: Instant::now(),
                }),
                presence: Mutex::default(),
            }),
        }
    }

    /// Keeps a history for the groups `policy` applies to (the first
    /// matching policy wins when called more than once).
    ///
    /// # Panics
    ///
    /// If the layer was cloned already: configure it before sharing it.
    pub fn with_history(mut self, policy: HistoryPolicy) -> Self {
        self.configure().history.push(policy);
        self
    }

    /// Sets how presence notifies groups (see [`PresenceConfig`]).
    ///
    /// # Panics
    ///
    /// If the layer was cloned already: configure it before sharing it.
    pub fn with_presence(mut self, config: PresenceConfig) -> Self {
        self.configure().presence_config = config;
        self
    }

    fn configure(&mut self) -> &mut Inner {
        Arc::get_mut(&mut self.inner).expect("configure an InMemoryChannelLayer before cloning it")
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

impl LocalChannels for Inner {
    fn registry(&self) -> &Registry {
        &self.registry
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Membership needs no more: the channel left its groups with the
    /// registry. Its presence goes with them.
    fn forgotten(self: &Arc<Self>, channel: &str, _emptied: Vec<String>) {
        let groups = lock(&self.presence).groups_of(channel);
        for group in groups {
            self.presence_leave(&group, channel);
        }
    }
}

impl Inner {
    /// Sends a join or leave notification (never part of the history).
    fn notify(&self, group: &str, kind: &'static str, info: &PresenceInfo) {
        if self.presence_config.notifies(group) {
            let event = Event::new(kind, PresenceChange::new(info));
            self.registry.fan_out(group, &event);
        }
    }

    fn presence_leave(&self, group: &str, channel: &str) {
        let left = lock(&self.presence).leave(group, channel);
        if let Some(change) = left.filter(|c| c.collapsed) {
            self.notify(group, PRESENCE_LEAVE, &change.info);
        }
    }

    /// The history of `group`, made (or started again) as needed.
    fn stream(&self, group: &str, policy: &HistoryPolicy) -> Arc<Mutex<Stream>> {
        let now = Instant::now();
        let mut streams = lock(&self.streams);
        if now.duration_since(streams.last_sweep) > SWEEP_EVERY {
            streams.last_sweep = now;
            streams.map.retain(|_, s| !lock(s).expired(now));
        }
        streams
            .map
            .entry(group.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new(Stream::new(policy.time_limit()))))
            .clone()
    }

    /// A group send to a group with history: the offset is assigned and the
    /// event delivered under the history's lock, so members see offsets in order.
    fn send_with_history(
        &self,
        group: &str,
        event: Event,
        policy: &HistoryPolicy,
    ) -> (usize, usize, StreamPosition) {
        let stream = self.stream(group, policy);
        let mut s = lock(&stream);
        let now = Instant::now();
        if s.expired(now) {
            *s = Stream::new(policy.time_limit());
        }
        s.top += 1;
        s.last = now;
        s.ttl = policy.time_limit();
        let position = StreamPosition::new(s.top, s.epoch.clone());
        let event = event.with_position(position.clone());
        s.events.push_back(event.clone());
        while s.events.len() > policy.len_limit() {
            s.events.pop_front();
        }
        let (delivered, dropped) = self.registry.fan_out(group, &event);
        (delivered, dropped, position)
    }

    fn recover(&self, group: &str, since: &StreamPosition) -> Result<Recovery, ChannelLayerError> {
        if policy_for(&self.history, group).is_none() {
            return Err(ChannelLayerError::NoHistory {
                group: group.to_owned(),
            });
        }
        let Some(stream) = lock(&self.streams).map.get(group).cloned() else {
            return Ok(Recovery::failed(RecoveryFailure::EpochChanged, None));
        };
        let s = lock(&stream);
        if s.expired(Instant::now()) {
            return Ok(Recovery::failed(RecoveryFailure::EpochChanged, None));
        }
        let latest = s.latest();
        if *s.epoch != *since.epoch() || since.offset() > s.top {
            return Ok(Recovery::failed(RecoveryFailure::EpochChanged, latest));
        }
        let first = s.top + 1 - s.events.len() as u64;
        if since.offset() + 1 < first {
            return Ok(Recovery::failed(RecoveryFailure::TooOld, latest));
        }
        let skip = (since.offset() + 1 - first) as usize;
        let events = s.events.iter().skip(skip).cloned().collect();
        Ok(match latest {
            Some(latest) => Recovery::recovered(events, latest),
            None => Recovery::failed(RecoveryFailure::EpochChanged, None),
        })
    }
}

impl ChannelLayer for InMemoryChannelLayer {
    /// Presence and named group members always; history once a
    /// [`HistoryPolicy`] was given ([`with_history`](Self::with_history)),
    /// as on the cross-process layers.
    fn capabilities(&self) -> Capabilities {
        let capabilities = Capabilities::NONE
            .with(Feature::Presence)
            .with(Feature::NamedGroupMembers);
        if self.inner.history.is_empty() {
            capabilities
        } else {
            capabilities.with(Feature::History)
        }
    }

    fn new_channel(&self) -> BoxFuture<'_, Result<ChannelReceiver, ChannelLayerError>> {
        Box::pin(std::future::ready(self.inner.new_process_channel()))
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
            .map(|()| {
                self.inner.registry.group_discard(group, channel);
                self.inner.presence_leave(group, channel);
            });
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
                let inner = &self.inner;
                let history = policy_for(&inner.history, group).filter(|_| !event.is_ephemeral());
                let (delivered, dropped, position) = match history {
                    Some(policy) => {
                        let (d, f, p) = inner.send_with_history(group, event, policy);
                        (d, f, Some(p))
                    }
                    None => {
                        let (d, f) = inner.registry.fan_out(group, &event);
                        (d, f, None)
                    }
                };
                let counters = &inner.counters;
                Counters::add(&counters.delivered, delivered);
                Counters::add(&counters.dropped_full, dropped);
                counters.group_sent(dropped);
                GroupSendReport {
                    local_members: delivered,
                    remote_receivers: None,
                    dropped,
                    position,
                }
            });
        Box::pin(std::future::ready(result))
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ChannelLayerError>> {
        self.inner.registry.clear();
        lock(&self.inner.presence).clear();
        lock(&self.inner.streams).map.clear();
        Box::pin(std::future::ready(Ok(())))
    }

    fn stats(&self) -> ChannelLayerStats {
        // `dropped_other` stays 0: nothing is decoded or relayed here.
        self.inner.counters.stats()
    }

    fn presence_join<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
        info: PresenceInfo,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        let result = validate_group_name(group)
            .and_then(|()| validate_channel_name(channel))
            .map_err(ChannelLayerError::from)
            .and_then(|()| self.inner.registry.group_add(group, channel))
            .map(|()| {
                let inner = &self.inner;
                let (joined, replaced) = lock(&inner.presence).join(group, channel, info);
                if let Some(old) = replaced.filter(|c| c.collapsed) {
                    inner.notify(group, PRESENCE_LEAVE, &old.info);
                }
                if joined.collapsed {
                    inner.notify(group, PRESENCE_JOIN, &joined.info);
                }
            });
        Box::pin(std::future::ready(result))
    }

    fn presence<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Vec<PresenceMember>, ChannelLayerError>> {
        let result = validate_group_name(group)
            .map_err(ChannelLayerError::from)
            .map(|()| group_by_user(lock(&self.inner.presence).entries(group)));
        Box::pin(std::future::ready(result))
    }

    fn recover<'a>(
        &'a self,
        group: &'a str,
        since: &'a StreamPosition,
    ) -> BoxFuture<'a, Result<Recovery, ChannelLayerError>> {
        let result = validate_group_name(group)
            .map_err(ChannelLayerError::from)
            .and_then(|()| self.inner.recover(group, since));
        Box::pin(std::future::ready(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel_layer::GroupPattern;

    #[tokio::test]
    async fn history_expires_into_a_new_epoch() {
        let layer = InMemoryChannelLayer::new()
            .with_history(HistoryPolicy::new(GroupPattern::exact("g")).ttl(Duration::from_secs(1)));
        let first = layer
            .group_send("g", Event::bare("e"))
            .await
            .unwrap()
            .position
            .unwrap();
        // Waiting for the TTL to pass is the behaviour under test.
        std::thread::sleep(Duration::from_millis(1100));
        let r = layer.recover("g", &first).await.unwrap();
        assert_eq!(r.failure(), Some(RecoveryFailure::EpochChanged));
        let next = layer
            .group_send("g", Event::bare("e"))
            .await
            .unwrap()
            .position
            .unwrap();
        assert_eq!(next.offset(), 1);
        assert_ne!(next.epoch(), first.epoch());
    }

    #[test]
    #[should_panic(expected = "before cloning")]
    fn configuring_a_shared_layer_panics() {
        let layer = InMemoryChannelLayer::new();
        let _clone = layer.clone();
        let _ = layer.with_presence(PresenceConfig::new());
    }
}
