//! The channels and groups of one process: the state the in-memory layer is
//! made of, and that the Redis layer keeps locally to fan out per process.

use std::{
    collections::{HashMap, HashSet},
    sync::{RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use super::{ChannelLayerError, ChannelSender, Delivery, Event, TrySendError};

#[derive(Debug, Default)]
pub(crate) struct Registry {
    state: RwLock<State>,
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

pub(crate) fn no_such_channel(channel: &str) -> ChannelLayerError {
    ChannelLayerError::NoSuchChannel {
        channel: channel.to_owned(),
    }
}

impl Registry {
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
        st.channels.insert(
            name.to_owned(),
            Entry {
                sender,
                groups: HashSet::new(),
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
        for group in entry.groups {
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
        entry.groups.insert(group.to_owned());
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
            entry.groups.remove(group);
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
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn group_names(&self) -> Vec<String> {
        self.read().groups.keys().cloned().collect()
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
            entry.groups.clear();
            entry.sender.clear();
        }
    }
}
