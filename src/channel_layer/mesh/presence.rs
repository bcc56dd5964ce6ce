//! Presence in the mesh, on the transport's [`Store`].
//!
//! Each process keeps its channels' entries ([`LocalPresence`]) and writes
//! each of them as one stored entry (connection, user, info, the token of
//! the user's stay): on a join it writes that entry, on a leave it removes
//! it, so a join or a leave costs O(1) whatever the group's size. Entries
//! are not refreshed one by one: per group, the process keeps a liveness
//! with the configured TTL, refreshed every third of the TTL
//! ([`Store::presence_alive`]). A listing is the entries whose process is
//! alive. When the store did not have the process alive (its first entry
//! in the group, its liveness expired while it was stalled, the broker lost
//! its store) or a write failed, the process writes all its entries of the
//! group again on that refresh, and at once after a reconnect.
//!
//! A process that stops without leaving stops refreshing: its liveness
//! expires at most one TTL after its last refresh, so its members are out
//! of listings at most one TTL after it stopped. Its entries are then
//! garbage: every process refreshing the group lists the group's processes
//! ([`Store::presence_processes`]), and for each one no longer alive, the
//! one process that wins the store's claim for it removes its entries
//! ([`Store::presence_collect`]) and, in groups with notifications,
//! announces the `presence.leave` of its users not present on a live
//! process (without their data, as on Redis; once per stay, see below):
//! within TTL + TTL/3 of the stop.
//!
//! Notifications are collapsed per user across processes without a lock
//! in the broker: a join is announced when the user was not present
//! elsewhere before this process wrote its entry, a leave when it is not
//! present elsewhere after this process removed its own (both read only
//! the user's entries, [`Store::presence_user`]). Each entry carries the
//! token of its user's stay in the group: a connection joining while the
//! user is present (here or elsewhere) takes the stay's token, else it
//! starts a new stay. When the last connections of a user on several
//! processes leave at the same moment (or crash), each may find the user
//! gone; only the one that wins the store's claim for the stay announces
//! the leave (if the claim cannot be made, it announces anyway). Two
//! processes joining the same user at the same moment may both announce
//! it (and start two stays, whose leaves may then both be announced); no
//! join or leave goes unannounced.

use std::{
    collections::HashSet,
    sync::{Arc, Weak},
    time::Duration,
};

use bytes::Bytes;

use super::{lock, Inner, PresenceListing, Store, Transport};
use crate::channel_layer::{
    local::LocalChannels,
    names,
    presence::{self, group_by_user, LocalPresence},
    validate_group_name, ChannelLayerError, Event, EventCodecError, Feature, PresenceChange,
    PresenceConfig, PresenceInfo, PresenceMember, PRESENCE_JOIN, PRESENCE_LEAVE,
};

/// An entry's stored value: JSON `[info, stay]` (see the module docs).
fn encode(info: &PresenceInfo, stay: Option<&str>) -> Bytes {
    let mut stored = vec![info.to_stored()];
    stored.extend(stay.map(str::to_owned));
    serde_json::to_vec(&stored).unwrap_or_default().into()
}

fn decode(bytes: &[u8]) -> Result<(PresenceInfo, Option<String>), EventCodecError> {
    let malformed = || EventCodecError::new("malformed presence entry");
    let stored: Vec<String> = serde_json::from_slice(bytes)
        .map_err(|e| EventCodecError::new(format_args!("malformed presence entry: {e}")))?;
    let mut stored = stored.into_iter();
    let info = stored
        .next()
        .and_then(|info| PresenceInfo::from_stored(info.as_bytes()))
        .ok_or_else(malformed)?;
    Ok((info, stored.next()))
}

/// The live entries of a listing, decoded (a malformed one is skipped).
fn live_entries(
    group: &str,
    listing: &PresenceListing,
    except: Option<&str>,
) -> Vec<(String, PresenceInfo, Option<String>)> {
    listing
        .entries
        .iter()
        .filter(|e| listing.alive.contains(&e.process) && Some(e.process.as_str()) != except)
        .filter_map(|e| match decode(&e.entry) {
            Ok((info, stay)) => Some((e.channel.clone(), info, stay)),
            Err(err) => {
                tracing::warn!(group, process = e.process, "{err}");
                None
            }
        })
        .collect()
}

/// Where this process's entries of a group stand in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Written {
    /// Every local entry is stored and the liveness was written.
    InStep,
    /// A write failed: the next refresh removes this process's entries and
    /// writes them all again.
    Resync,
}

impl<T: Transport> Inner<T> {
    /// The presence settings and the store, or `Unsupported`.
    pub(super) fn presence_store(
        &self,
    ) -> Result<(&PresenceConfig, &dyn Store), ChannelLayerError> {
        let store = self.store(Feature::Presence)?;
        let config = self
            .config
            .presence
            .as_ref()
            .ok_or(ChannelLayerError::Unsupported {
                feature: Feature::Presence.name(),
            })?;
        Ok((config, store))
    }

    /// The presence TTL, when presence is on.
    pub(super) fn presence_ttl(&self) -> Option<Duration> {
        self.presence_store()
            .ok()
            .map(|(config, _)| config.time_limit())
    }

    fn mark(&self, group: &str, written: Written) {
        lock(&self.presence_groups).insert(group.to_owned(), written);
    }

    /// Writes one local entry (callers hold `presence_writes`).
    async fn write_entry(
        &self,
        group: &str,
        channel: &str,
        info: &PresenceInfo,
    ) -> Result<(), ChannelLayerError> {
        let (_, store) = self.presence_store()?;
        let stay = lock(&self.presence_stays)
            .get(&(group.to_owned(), info.user_id().to_owned()))
            .cloned();
        let entry = encode(info, stay.as_deref());
        let process = self.process();
        let written = self
            .attempt(&format!("writing the presence of {group:?}"), || {
                store.presence_add(group, process, info.user_id(), channel, entry.clone())
            })
            .await;
        if written.is_err() {
            self.mark(group, Written::Resync);
        }
        written
    }

    /// Refreshes this process's liveness in `group`; writes its entries
    /// again when the store did not have it alive or a write failed (see
    /// the module docs). Callers hold `presence_writes`.
    async fn keep_alive(&self, group: &str) -> Result<(), ChannelLayerError> {
        let (config, store) = self.presence_store()?;
        let process = self.process();
        let state = lock(&self.presence_groups).get(group).copied();
        if state == Some(Written::Resync) {
            self.attempt(&format!("removing the presence of {group:?}"), || {
                store.presence_drop(group, process)
            })
            .await?;
        }
        let ttl = config.time_limit();
        let was_alive = self
            .attempt(&format!("refreshing the presence of {group:?}"), || {
                store.presence_alive(group, process, ttl)
            })
            .await;
        let was_alive = match was_alive {
            Ok(was_alive) => was_alive,
            Err(e) => {
                self.mark(group, Written::Resync);
                return Err(e);
            }
        };
        if state != Some(Written::InStep) || !was_alive {
            self.mark(group, Written::Resync);
            let entries = lock(&self.presence).entries(group);
            for (channel, info) in entries {
                self.write_entry(group, &channel, &info).await?;
            }
        }
        self.mark(group, Written::InStep);
        Ok(())
    }

    /// Whether `user` is present in `group` on another live process, and
    /// the token of its stay there (the least of two, so that later joins
    /// agree on one).
    async fn user_elsewhere(
        &self,
        group: &str,
        user: &str,
    ) -> Result<Option<Option<String>>, ChannelLayerError> {
        let (_, store) = self.presence_store()?;
        let listing = self
            .attempt(&format!("reading the presence of {group:?}"), || {
                store.presence_user(group, user)
            })
            .await?;
        let mut found: Option<Option<String>> = None;
        for (_, info, stay) in live_entries(group, &listing, Some(self.process())) {
            if info.user_id() != user {
                continue;
            }
            let known = found.get_or_insert(None);
            *known = match (known.take(), stay) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Ok(found)
    }

    /// Sends a join or leave notification if the group wants them: a
    /// plain group send, never part of a history.
    async fn notify(&self, group: &str, kind: &'static str, change: PresenceChange) {
        let Ok((config, _)) = self.presence_store() else {
            return;
        };
        if !config.notifies(group) {
            return;
        }
        if let Err(e) = self
            .group_send_plain(group, &Event::new(kind, change))
            .await
        {
            tracing::warn!(group, kind, "presence notification failed: {e}");
        }
    }

    /// The presence part of `presence_join` (the channel is a member of
    /// the group already).
    pub(super) async fn presence_join(
        &self,
        group: &str,
        channel: &str,
        info: PresenceInfo,
    ) -> Result<(), ChannelLayerError> {
        let (_, store) = self.presence_store()?;
        let user = info.user_id().to_owned();
        let (elsewhere, joined, replaced, replaced_stay) = {
            let _one_at_a_time = self.presence_writes.lock().await;
            // Read before writing: a join is never missed (see the module docs).
            let elsewhere = self.user_elsewhere(group, &user).await?;
            if lock(&self.presence_groups).get(group) != Some(&Written::InStep) {
                self.keep_alive(group).await?;
            }
            let (joined, replaced) = lock(&self.presence).join(group, channel, info);
            let replaced_stay = {
                let mut stays = lock(&self.presence_stays);
                // The user's stay: this process's, else the one of its
                // connections elsewhere, else a new one.
                stays
                    .entry((group.to_owned(), user.clone()))
                    .or_insert_with(|| {
                        elsewhere
                            .clone()
                            .flatten()
                            .unwrap_or_else(|| names::random_token(16))
                    });
                replaced
                    .as_ref()
                    .filter(|old| old.collapsed)
                    .and_then(|old| {
                        stays.remove(&(group.to_owned(), old.info.user_id().to_owned()))
                    })
            };
            if let Some(old) = replaced.as_ref().filter(|old| old.info.user_id() != user) {
                // The old entry is stored under the old user.
                let process = self.process();
                let removed = self
                    .attempt(&format!("writing the presence of {group:?}"), || {
                        store.presence_remove(group, process, old.info.user_id(), channel)
                    })
                    .await;
                if removed.is_err() {
                    self.mark(group, Written::Resync);
                }
                removed?;
            }
            self.write_entry(group, channel, &joined.info).await?;
            (elsewhere, joined, replaced, replaced_stay)
        };
        let same_user = replaced
            .as_ref()
            .is_some_and(|old| old.info.user_id() == joined.info.user_id());
        if let Some(old) = replaced.filter(|old| old.collapsed && !same_user) {
            // The old user may be present elsewhere: ask the store.
            if self
                .user_elsewhere(group, old.info.user_id())
                .await?
                .is_none()
            {
                self.announce_leave(group, PresenceChange::new(&old.info), replaced_stay)
                    .await;
            }
        }
        if joined.collapsed && !same_user && elsewhere.is_none() {
            self.notify(group, PRESENCE_JOIN, PresenceChange::new(&joined.info))
                .await;
        }
        Ok(())
    }

    /// Announces that a user left `group`, once per stay: of the processes
    /// whose last connection of the user left (or crashed) at the same
    /// moment, the one that wins the store's claim for the stay does.
    async fn announce_leave(&self, group: &str, change: PresenceChange, stay: Option<String>) {
        if let (Some(stay), Ok((config, store))) = (stay, self.presence_store()) {
            if !config.notifies(group) {
                return;
            }
            let ttl = config.time_limit();
            let key = format!("left.{stay}");
            let claimed = self
                .attempt(&format!("claiming a presence leave in {group:?}"), || {
                    store.presence_claim(group, &key, ttl)
                })
                .await;
            // When the claim cannot be made, announce: no leave goes
            // unannounced.
            if matches!(claimed, Ok(false)) {
                return;
            }
        }
        self.notify(group, PRESENCE_LEAVE, change).await;
    }

    /// Removes `channel`'s presence in `group`, here and in the store.
    pub(super) async fn presence_leave(
        &self,
        group: &str,
        channel: &str,
    ) -> Result<(), ChannelLayerError> {
        let Ok((_, store)) = self.presence_store() else {
            return Ok(());
        };
        let process = self.process();
        let (left, stay) = {
            let _one_at_a_time = self.presence_writes.lock().await;
            let Some(left) = lock(&self.presence).leave(group, channel) else {
                return Ok(());
            };
            let stay = left.collapsed.then(|| {
                lock(&self.presence_stays)
                    .remove(&(group.to_owned(), left.info.user_id().to_owned()))
            });
            let what = format!("removing the presence of {group:?}");
            let removed = self
                .attempt(&what, || {
                    store.presence_remove(group, process, left.info.user_id(), channel)
                })
                .await;
            if removed.is_err() {
                self.mark(group, Written::Resync);
            }
            removed?;
            if lock(&self.presence).len(group) == 0
                && lock(&self.presence_groups).get(group) == Some(&Written::InStep)
            {
                // The last entry here: leave the group's processes too
                // (after a failed write, the refresh drops it all).
                let retired = self
                    .attempt(&what, || store.presence_retire(group, process))
                    .await;
                if retired.is_ok() {
                    lock(&self.presence_groups).remove(group);
                }
                if let Err(e) = retired {
                    tracing::debug!(group, "leaving the presence of a group failed: {e}");
                }
            }
            (left, stay.flatten())
        };
        // Read after removing: a leave is never missed (see the module docs).
        if left.collapsed
            && self
                .user_elsewhere(group, left.info.user_id())
                .await?
                .is_none()
        {
            self.announce_leave(group, PresenceChange::new(&left.info), stay)
                .await;
        }
        Ok(())
    }

    /// A channel's receiver was dropped: leave its presence groups in the
    /// background (the TTL covers the case where this never runs).
    pub(super) fn forget_presence(self: &Arc<Self>, channel: &str) {
        let groups = lock(&self.presence).groups_of(channel);
        let (inner, channel) = (Arc::clone(self), channel.to_owned());
        presence::leave_in_background(groups, move |group| {
            let (inner, channel) = (inner.clone(), channel.clone());
            async move { inner.presence_leave(&group, &channel).await }
        });
    }

    /// `ChannelLayer::presence`.
    pub(super) async fn presence_list(
        &self,
        group: &str,
    ) -> Result<Vec<PresenceMember>, ChannelLayerError> {
        validate_group_name(group)?;
        let (_, store) = self.presence_store()?;
        let listing = self
            .attempt(&format!("reading the presence of {group:?}"), || {
                store.presence_list(group)
            })
            .await?;
        let entries = live_entries(group, &listing, None)
            .into_iter()
            .map(|(channel, info, _)| (channel, info));
        Ok(group_by_user(entries.collect::<Vec<_>>()))
    }

    /// Refreshes this process's liveness in every group it has entries in
    /// (writing them again where needed), leaves the groups it has none
    /// in any more, and collects the entries of processes that stopped.
    pub(super) async fn refresh_presence(&self) {
        let Ok((_, store)) = self.presence_store() else {
            return;
        };
        let groups: HashSet<String> = lock(&self.presence)
            .group_names()
            .into_iter()
            .chain(lock(&self.presence_groups).keys().cloned())
            .collect();
        for group in groups {
            {
                let _one_at_a_time = self.presence_writes.lock().await;
                let refreshed = if lock(&self.presence).len(&group) == 0 {
                    // Leaving the group failed: try again.
                    let process = self.process();
                    let in_step = lock(&self.presence_groups).get(&group) == Some(&Written::InStep);
                    let dropped = self
                        .attempt(&format!("removing the presence of {group:?}"), || {
                            if in_step {
                                store.presence_retire(&group, process)
                            } else {
                                store.presence_drop(&group, process)
                            }
                        })
                        .await;
                    if dropped.is_ok() {
                        lock(&self.presence_groups).remove(&group);
                    }
                    dropped
                } else {
                    self.keep_alive(&group).await
                };
                if let Err(e) = refreshed {
                    tracing::debug!(group, "presence refresh failed: {e}");
                    continue;
                }
            }
            if let Err(e) = self.collect_stopped(&group).await {
                tracing::debug!(group, "collecting stopped processes' presence failed: {e}");
            }
        }
    }

    /// Removes the entries of the processes of `group` that are no longer
    /// alive, announcing their users' leaves (see the module docs).
    async fn collect_stopped(&self, group: &str) -> Result<(), ChannelLayerError> {
        let (config, store) = self.presence_store()?;
        let own = self.process();
        let processes = self
            .attempt(&format!("reading the presence of {group:?}"), || {
                store.presence_processes(group)
            })
            .await?;
        let mut listing = None;
        for (process, _) in processes
            .into_iter()
            .filter(|(process, alive)| !alive && process != own)
        {
            let ttl = config.time_limit();
            let claimed = self
                .attempt(&format!("claiming a presence leave in {group:?}"), || {
                    store.presence_claim(group, &process, ttl)
                })
                .await?;
            if !claimed {
                continue;
            }
            let listing = match &mut listing {
                Some(listing) => listing,
                None => listing.insert(
                    self.attempt(&format!("reading the presence of {group:?}"), || {
                        store.presence_list(group)
                    })
                    .await?,
                ),
            };
            let present: HashSet<String> = live_entries(group, listing, None)
                .into_iter()
                .map(|(_, info, _)| info.user_id().to_owned())
                .collect();
            let mut gone: Vec<(String, Option<String>)> = Vec::new();
            for entry in listing.entries.iter().filter(|e| e.process == process) {
                if let Ok((info, stay)) = decode(&entry.entry) {
                    if !present.contains(info.user_id())
                        && !gone.iter().any(|(u, _)| u == info.user_id())
                    {
                        gone.push((info.user_id().to_owned(), stay));
                    }
                }
            }
            self.attempt(&format!("removing stopped presence in {group:?}"), || {
                store.presence_collect(group, &process)
            })
            .await?;
            for (user_id, stay) in gone {
                // The user's data went with its process.
                let change = PresenceChange {
                    user_id,
                    data: None,
                };
                self.announce_leave(group, change, stay).await;
            }
        }
        Ok(())
    }

    /// Forgets every local entry and empties the store (`flush`, see
    /// [`Store::clear`]): histories, every process's presence and the
    /// named members under the prefix. Runs with the presence writes held,
    /// so no refresh writes this process's entries back meanwhile. When
    /// emptying fails, the groups this process had written are marked to
    /// be dropped on the next refresh (their entries may still be stored).
    pub(super) async fn clear_store(&self) -> Result<(), ChannelLayerError> {
        let Some(store) = self.transport.store() else {
            return Ok(());
        };
        let _one_at_a_time = self.presence_writes.lock().await;
        let groups: HashSet<String> = {
            let mut presence = lock(&self.presence);
            let groups = presence.group_names();
            *presence = LocalPresence::default();
            groups
                .into_iter()
                .chain(lock(&self.presence_groups).drain().map(|(group, _)| group))
                .collect()
        };
        lock(&self.presence_stays).clear();
        let cleared = self
            .attempt("emptying the store (flush)", || store.clear())
            .await;
        if cleared.is_err() && self.presence_store().is_ok() {
            for group in groups {
                self.mark(&group, Written::Resync);
            }
        }
        cleared
    }
}

/// Refreshes this process's presence every third of the TTL until the
/// layer is dropped.
pub(super) async fn refresh_loop<T: Transport>(inner: Weak<Inner<T>>, ttl: Duration) {
    presence::refresh_loop(
        inner,
        ttl,
        |inner| async move { inner.refresh_presence().await },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_roundtrip() {
        let info = PresenceInfo::new("ada").unwrap().with_data(&1).unwrap();
        let bytes = encode(&info, Some("stay1"));
        assert_eq!(
            decode(&bytes).unwrap(),
            (info.clone(), Some("stay1".into()))
        );
        assert_eq!(decode(&encode(&info, None)).unwrap(), (info, None));
        assert!(decode(b"garbage").is_err());
        assert!(decode(b"[]").is_err());
        assert!(decode(br#"["not info"]"#).is_err());
    }
}
