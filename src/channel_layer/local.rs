//! The channels and groups of one process: the state the in-memory layer is
//! made of, and that the layers spanning processes keep locally to fan out
//! per process; and what every backend does with it the same way
//! ([`LocalChannels`]).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
    },
};

use super::{
    channel, validate_channel_name, ChannelLayerError, ChannelLayerStats, ChannelReceiver,
    ChannelSender, Delivery, Event, TrySendError,
};

/// The channels of one layer instance (a "process"), named
/// `<process>!<n>`, and their groups.
#[derive(Debug)]
pub(crate) struct Registry {
    /// The process name: what this instance's channel names start with,
    /// before the `!`.
    process: String,
    next_id: AtomicU64,
    state: RwLock<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Keyed by the channel's own name (shared with its queue).
    channels: HashMap<Arc<str>, Entry>,
    groups: HashMap<String, HashMap<String, ChannelSender>>,
}

#[derive(Debug)]
struct Entry {
    sender: ChannelSender,
    /// The groups it is in; `None` until it joins one. Boxed: a registry
    /// slot per channel, most of them (idle connections) in no group or
    /// not yet.
    // The box is the point: 8 bytes in the slot instead of the set's 48.
    #[allow(clippy::box_collection)]
    groups: Option<Box<HashSet<String>>>,
}

/// Locks `m`, ignoring poisoning: the channel layers' critical sections
/// only insert and remove entries, so a panic in one cannot leave the
/// state inconsistent.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn no_such_channel(channel: &str) -> ChannelLayerError {
    ChannelLayerError::NoSuchChannel {
        channel: channel.to_owned(),
    }
}

/// Whose a channel is, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner<'a> {
    /// A channel of this instance: `<process>!<n>`.
    Local,
    /// A channel of another process (the part of its name before the `!`).
    Process(&'a str),
    /// A named channel (no `!`), such as a worker channel.
    Named,
}

impl Registry {
    /// An empty registry for the process named `process`.
    pub(crate) fn new(process: String) -> Self {
        Self {
            process,
            next_id: AtomicU64::new(0),
            state: RwLock::default(),
        }
    }

    /// The process name, the part of this instance's channel names before
    /// the `!`.
    #[cfg_attr(
        not(any(feature = "redis", feature = "nats", feature = "django")),
        allow(dead_code)
    )]
    pub(crate) fn process(&self) -> &str {
        &self.process
    }

    /// A new, unique name for a channel of this process: `<process>!<n>`.
    pub(crate) fn new_process_channel(&self) -> String {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{}!{id}", self.process)
    }

    /// Whose `channel` is: the part of its name before the first `!` is
    /// the process it belongs to.
    #[cfg_attr(
        not(any(feature = "redis", feature = "nats", feature = "django")),
        allow(dead_code)
    )]
    pub(crate) fn owner<'a>(&self, channel: &'a str) -> Owner<'a> {
        match channel.split_once('!') {
            Some((process, _)) if process == self.process => Owner::Local,
            Some((process, _)) => Owner::Process(process),
            None => Owner::Named,
        }
    }

    /// Whether `channel` is a channel of this process.
    #[cfg_attr(
        not(any(feature = "redis", feature = "nats", feature = "django")),
        allow(dead_code)
    )]
    pub(crate) fn is_local(&self, channel: &str) -> bool {
        self.owner(channel) == Owner::Local
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // Critical sections only insert and remove map entries; a panic in one
        // cannot break an invariant, so poisoning is ignored.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the sending half of a new channel. Fails if the name already
    /// has a live receiver in this process.
    pub(crate) fn insert(
        &self,
        name: &str,
        sender: ChannelSender,
    ) -> Result<(), ChannelLayerError> {
        let mut st = self.write();
        if st.channels.get(name).is_some_and(|e| !e.sender.is_closed()) {
            return Err(ChannelLayerError::backend(format!(
                "channel {name:?} already has a receiver in this process"
            )));
        }
        let key = if sender.name() == name {
            sender.shared_name()
        } else {
            Arc::from(name)
        };
        st.channels.insert(
            key,
            Entry {
                sender,
                groups: None,
            },
        );
        Ok(())
    }

    /// Forgets a channel whose receiver was dropped and removes it from its
    /// groups; returns the groups left without members. Does nothing if the
    /// name now belongs to a newer, live receiver.
    pub(crate) fn forget(&self, name: &str) -> Vec<String> {
        let mut st = self.write();
        if !st.channels.get(name).is_some_and(|e| e.sender.is_closed()) {
            return Vec::new();
        }
        let Some(entry) = st.channels.remove(name) else {
            return Vec::new();
        };
        let mut emptied = Vec::new();
        for group in entry.groups.into_iter().flat_map(|g| *g) {
            if let Some(members) = st.groups.get_mut(&group) {
                members.remove(name);
                if members.is_empty() {
                    st.groups.remove(&group);
                    emptied.push(group);
                }
            }
        }
        emptied
    }

    /// Adds a live local channel to a group.
    pub(crate) fn group_add(&self, group: &str, channel: &str) -> Result<(), ChannelLayerError> {
        let mut st = self.write();
        let entry = st
            .channels
            .get_mut(channel)
            .filter(|e| !e.sender.is_closed())
            .ok_or_else(|| no_such_channel(channel))?;
        entry
            .groups
            .get_or_insert_with(Box::default)
            .insert(group.to_owned());
        let sender = entry.sender.clone();
        st.groups
            .entry(group.to_owned())
            .or_default()
            .insert(channel.to_owned(), sender);
        Ok(())
    }

    /// Removes a channel from a group (no error if it was not a member).
    pub(crate) fn group_discard(&self, group: &str, channel: &str) {
        let mut st = self.write();
        if let Some(entry) = st.channels.get_mut(channel) {
            if let Some(groups) = &mut entry.groups {
                groups.remove(group);
            }
        }
        if let Some(members) = st.groups.get_mut(group) {
            members.remove(channel);
            if members.is_empty() {
                st.groups.remove(group);
            }
        }
    }

    /// Number of local members of `group`.
    pub(crate) fn group_len(&self, group: &str) -> usize {
        self.read().groups.get(group).map_or(0, HashMap::len)
    }

    /// Groups with at least one local member.
    #[cfg_attr(not(feature = "django"), allow(dead_code))]
    pub(crate) fn group_names(&self) -> Vec<String> {
        self.read().groups.keys().cloned().collect()
    }

    /// Whether `name` has a live receiver here.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn has_channel(&self, name: &str) -> bool {
        self.read()
            .channels
            .get(name)
            .is_some_and(|e| !e.sender.is_closed())
    }

    /// Number of local channels with a receiver.
    pub(crate) fn channel_count(&self) -> usize {
        self.read().channels.len()
    }

    /// Hands `event` to every local member of `group` without waiting;
    /// returns (delivered, dropped because full).
    pub(crate) fn fan_out(&self, group: &str, event: &Event) -> (usize, usize) {
        let (mut delivered, mut dropped) = (0, 0);
        let st = self.read();
        if let Some(members) = st.groups.get(group) {
            for sender in members.values() {
                match sender.send_lossy(event.clone()) {
                    Delivery::Delivered => delivered += 1,
                    Delivery::Dropped => dropped += 1,
                    // Receiver dropped; its on_drop hook removes it shortly.
                    Delivery::Closed => {}
                }
            }
        }
        (delivered, dropped)
    }

    /// A direct send to a local channel: `ChannelFull` when it is full.
    pub(crate) fn send(&self, channel: &str, event: Event) -> Result<(), ChannelLayerError> {
        let st = self.read();
        let entry = st
            .channels
            .get(channel)
            .ok_or_else(|| no_such_channel(channel))?;
        match entry.sender.try_send(event) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(ChannelLayerError::ChannelFull {
                channel: channel.to_owned(),
            }),
            Err(_) => Err(no_such_channel(channel)),
        }
    }

    /// A send that must not wait (an event relayed from another process):
    /// `None` when the channel is unknown here.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn send_lossy(&self, channel: &str, event: Event) -> Option<Delivery> {
        self.read()
            .channels
            .get(channel)
            .map(|e| e.sender.send_lossy(event))
    }

    /// Drops every group membership and every queued event (`flush`).
    pub(crate) fn clear(&self) {
        let mut st = self.write();
        st.groups.clear();
        for entry in st.channels.values_mut() {
            entry.groups = None;
            entry.sender.clear();
        }
    }
}

/// Counters behind [`ChannelLayer::stats`](super::ChannelLayer::stats).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) group_sends: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) dropped_full: AtomicU64,
    pub(crate) dropped_other: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        if n > 0 {
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// A group send succeeded; `dropped` members (local or named channels)
    /// did not get it because they were full. Counts it in
    /// [`stats`](super::ChannelLayer::stats) and in the metrics: the one
    /// place every layer records a group send.
    pub(crate) fn group_sent(&self, dropped: usize) {
        self.group_sends.fetch_add(1, Ordering::Relaxed);
        crate::metrics::group_sent(dropped);
    }

    pub(crate) fn stats(&self) -> ChannelLayerStats {
        ChannelLayerStats {
            group_sends: self.group_sends.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            dropped_full: self.dropped_full.load(Ordering::Relaxed),
            dropped_other: self.dropped_other.load(Ordering::Relaxed),
        }
    }
}

/// What every backend does the same way with its [`Registry`]: the state
/// behind a layer (its `Inner`) implements the four required methods and
/// gets channel creation, `receive`'s local part and counted local delivery.
/// `receive` of a channel another process created: only the layer that
/// made a `<process>!<n>` name receives it.
#[derive(Debug, thiserror::Error)]
#[error(
    "channel {channel:?} belongs to process {process:?}: only the layer that created it can \
     receive it (use new_channel, or a name without '!')"
)]
pub(crate) struct NotOwned {
    channel: String,
    process: String,
}

pub(crate) trait LocalChannels: Send + Sync + Sized + 'static {
    /// This process's channels.
    fn registry(&self) -> &Registry;

    /// The process name, the part of this instance's channel names before
    /// the `!`.
    #[cfg_attr(
        not(any(feature = "redis", feature = "nats", feature = "django")),
        allow(dead_code)
    )]
    fn process(&self) -> &str {
        self.registry().process()
    }

    /// Events a channel of this process holds.
    fn capacity(&self) -> usize;

    /// The layer's counters.
    fn counters(&self) -> &Counters;

    /// The receiver of `channel` was dropped and the registry forgot it;
    /// `emptied` are the groups it left without a local member (none when
    /// the name already belongs to a newer receiver).
    fn forgotten(self: &Arc<Self>, channel: &str, emptied: Vec<String>);

    /// Makes the channel `name` of this process; dropping its receiver
    /// forgets it (then [`forgotten`](Self::forgotten) runs).
    fn register(self: &Arc<Self>, name: String) -> Result<ChannelReceiver, ChannelLayerError> {
        let (tx, rx) = channel(name, self.capacity());
        let name = tx.shared_name();
        self.registry().insert(&name, tx)?;
        let weak: Weak<Self> = Arc::downgrade(self);
        Ok(rx.on_drop(move || {
            if let Some(inner) = weak.upgrade() {
                let emptied = inner.registry().forget(&name);
                inner.forgotten(&name, emptied);
            }
        }))
    }

    /// `new_channel`: a channel of this process with a new name.
    fn new_process_channel(self: &Arc<Self>) -> Result<ChannelReceiver, ChannelLayerError> {
        let name = self.registry().new_process_channel();
        self.register(name)
    }

    /// The part of `receive` every layer spanning processes shares:
    /// validates `channel`, registers it if it is a channel of this process
    /// and refuses one of another process ([`NotOwned`]). `None`: a named
    /// channel, which the backend receives its own way.
    #[cfg_attr(
        not(any(feature = "redis", feature = "nats", feature = "django")),
        allow(dead_code)
    )]
    fn receive_local(
        self: &Arc<Self>,
        channel: &str,
    ) -> Result<Option<ChannelReceiver>, ChannelLayerError> {
        validate_channel_name(channel)?;
        match self.registry().owner(channel) {
            Owner::Local => self.register(channel.to_owned()).map(Some),
            Owner::Process(process) => Err(ChannelLayerError::backend(NotOwned {
                channel: channel.to_owned(),
                process: process.to_owned(),
            })),
            Owner::Named => Ok(None),
        }
    }

    /// Hands `event` to every local member of `group`, counting them in
    /// `delivered` and `dropped_full`; returns (delivered, dropped).
    #[cfg_attr(
        not(any(feature = "redis", feature = "nats", feature = "django")),
        allow(dead_code)
    )]
    fn fan_out(&self, group: &str, event: &Event) -> (usize, usize) {
        let (delivered, dropped) = self.registry().fan_out(group, event);
        let counters = self.counters();
        Counters::add(&counters.delivered, delivered);
        Counters::add(&counters.dropped_full, dropped);
        (delivered, dropped)
    }

    /// An event another process sent to one of our channels: delivered
    /// without waiting; a full channel counts in `dropped_full`, an unknown
    /// or closed one in `dropped_other`.
    #[cfg_attr(not(feature = "django"), allow(dead_code))]
    fn deliver_remote(&self, channel: &str, event: Event) {
        let counters = self.counters();
        match self.registry().send_lossy(channel, event) {
            Some(Delivery::Delivered) => {}
            Some(Delivery::Dropped) => Counters::add(&counters.dropped_full, 1),
            Some(Delivery::Closed) | None => Counters::add(&counters.dropped_other, 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_and_process_channel_names() {
        let registry = Registry::new("specific.abc".into());
        assert_eq!(registry.new_process_channel(), "specific.abc!0");
        assert_eq!(registry.new_process_channel(), "specific.abc!1");
        assert_eq!(registry.owner("specific.abc!1"), Owner::Local);
        assert_eq!(registry.owner("specific.abc!x!y"), Owner::Local);
        assert_eq!(
            registry.owner("specific.xyz!1"),
            Owner::Process("specific.xyz")
        );
        // Only the whole process name matches.
        assert_eq!(
            registry.owner("specific.ab!1"),
            Owner::Process("specific.ab")
        );
        assert_eq!(registry.owner("thumbnails"), Owner::Named);
        assert!(registry.is_local("specific.abc!7"));
        assert!(!registry.is_local("thumbnails"));
    }
}
