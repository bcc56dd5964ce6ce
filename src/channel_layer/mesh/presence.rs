//! Presence in the mesh, on the transport's [`Store`].
//!
//! Each process keeps its channels' entries ([`LocalPresence`]) and writes
//! those of a group as one record per (group, process), JSON
//! `[[channel, [user, data], stay], ...]`, with the configured TTL: on every
//! join and leave, every third of the TTL, and at once after a reconnect
//! (the broker may have lost it). A listing reads every process's record.
//!
//! A process that stops without leaving stops refreshing: its record is
//! gone at most one TTL after its last refresh, so at most one TTL after
//! it stopped (the store expires records TTL after they were written). In
//! groups with notifications, every process refreshing the group compares
//! the listing with the one of its previous refresh: a record that vanished
//! without being removed (a removed record stays listed as removed for the
//! TTL) expired, and the one process that wins the store's claim for it
//! announces the `presence.leave` of its users not present elsewhere
//! (without their data, as on Redis): within TTL + TTL/3 of the stop.
//!
//! Notifications are collapsed per user across processes without a lock
//! in the broker: a join is announced when the user was not present
//! elsewhere before this process wrote its entry, a leave when it is not
//! present elsewhere after this process removed its own. Each entry
//! carries the token of its user's stay in the group: a connection joining
//! while the user is present (here or elsewhere) takes the stay's token,
//! else it starts a new stay. When the last connections of a user on
//! several processes leave at the same moment, each may find the user
//! gone; only the one that wins the store's claim for the stay announces
//! the leave (if the claim cannot be made, it announces anyway). Two
//! processes joining the same user at the same moment may both announce
//! it (and start two stays, whose leaves may then both be announced); no
//! join or leave goes unannounced.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Weak},
    time::Duration,
};

use bytes::Bytes;

use super::{lock, Inner, Store, Transport};
use crate::channel_layer::{
    local::LocalChannels,
    names,
    presence::{self, group_by_user, LocalPresence},
    validate_group_name, ChannelLayerError, Event, EventCodecError, Feature, PresenceChange,
    PresenceConfig, PresenceInfo, PresenceMember, PRESENCE_JOIN, PRESENCE_LEAVE,
};

/// An entry as stored: the channel, its info, and the token of its user's
/// stay in the group (see the module docs).
type Entry = (String, PresenceInfo, Option<String>);

/// One process's entries of a group, as stored.
fn encode(entries: &[Entry]) -> Bytes {
    let stored: Vec<Vec<String>> = entries
        .iter()
        .map(|(channel, info, stay)| {
            let mut entry = vec![channel.clone(), info.to_stored()];
            entry.extend(stay.clone());
            entry
        })
        .collect();
    serde_json::to_vec(&stored).unwrap_or_default().into()
}

fn decode(bytes: &[u8]) -> Result<Vec<Entry>, EventCodecError> {
    let stored: Vec<Vec<String>> = serde_json::from_slice(bytes)
        .map_err(|e| EventCodecError::new(format_args!("malformed presence record: {e}")))?;
    Ok(stored
        .into_iter()
        .filter_map(|entry| {
            let mut entry = entry.into_iter();
            let channel = entry.next()?;
            let info = PresenceInfo::from_stored(entry.next()?.as_bytes())?;
            Some((channel, info, entry.next()))
        })
        .collect())
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

    /// Writes this process's entries of `group` as they are now (removes
    /// the record when there are none). Callers hold `presence_writes`.
    async fn write_presence(&self, group: &str) -> Result<(), ChannelLayerError> {
        let (config, store) = self.presence_store()?;
        let entries: Vec<Entry> = {
            let stays = lock(&self.presence_stays);
            lock(&self.presence)
                .entries(group)
                .into_iter()
                .map(|(channel, info)| {
                    let stay = stays
                        .get(&(group.to_owned(), info.user_id().to_owned()))
                        .cloned();
                    (channel, info, stay)
                })
                .collect()
        };
        let process = self.process();
        let what = format!("writing the presence of {group:?}");
        let ttl = config.time_limit();
        if entries.is_empty() {
            self.attempt(&what, || store.presence_remove(group, process, ttl))
                .await
        } else {
            let record = encode(&entries);
            self.attempt(&what, || {
                store.presence_put(group, process, record.clone(), ttl)
            })
            .await
        }
    }

    /// The users present in `group` in other processes, with the token of
    /// their stay when a record has one.
    async fn users_elsewhere(
        &self,
        group: &str,
    ) -> Result<HashMap<String, Option<String>>, ChannelLayerError> {
        let (_, store) = self.presence_store()?;
        let records = self
            .attempt(&format!("reading the presence of {group:?}"), || {
                store.presence_list(group)
            })
            .await?;
        let own = self.process();
        let mut users: HashMap<String, Option<String>> = HashMap::new();
        for (process, record) in records {
            let Some(record) = record.filter(|_| process != own) else {
                continue;
            };
            match decode(&record) {
                Ok(entries) => {
                    for (_, info, stay) in entries {
                        // Of two stays (joined at the same moment), the
                        // least, so that later joins agree on one.
                        let known = users.entry(info.user_id().to_owned()).or_default();
                        *known = match (known.take(), stay) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                    }
                }
                Err(e) => tracing::warn!(group, process, "{e}"),
            }
        }
        Ok(users)
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
        let (elsewhere, joined, replaced, replaced_stay) = {
            let _one_at_a_time = self.presence_writes.lock().await;
            // Read before writing: a join is never missed (see the module docs).
            let elsewhere = self.users_elsewhere(group).await?;
            let (joined, replaced) = lock(&self.presence).join(group, channel, info);
            let replaced_stay = {
                let mut stays = lock(&self.presence_stays);
                // The user's stay: this process's, else the one of its
                // connections elsewhere, else a new one.
                let user = joined.info.user_id();
                stays
                    .entry((group.to_owned(), user.to_owned()))
                    .or_insert_with(|| {
                        elsewhere
                            .get(user)
                            .cloned()
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
            self.write_presence(group).await?;
            (elsewhere, joined, replaced, replaced_stay)
        };
        let same_user = replaced
            .as_ref()
            .is_some_and(|old| old.info.user_id() == joined.info.user_id());
        if let Some(old) = replaced.filter(|old| old.collapsed && !same_user) {
            if !elsewhere.contains_key(old.info.user_id()) {
                self.announce_leave(group, &old.info, replaced_stay).await;
            }
        }
        if joined.collapsed && !same_user && !elsewhere.contains_key(joined.info.user_id()) {
            self.notify(group, PRESENCE_JOIN, PresenceChange::new(&joined.info))
                .await;
        }
        Ok(())
    }

    /// Announces that `info`'s user left `group`, once per stay: of the
    /// processes whose last connection of the user left at the same
    /// moment, the one that wins the store's claim for the stay does.
    async fn announce_leave(&self, group: &str, info: &PresenceInfo, stay: Option<String>) {
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
        self.notify(group, PRESENCE_LEAVE, PresenceChange::new(info))
            .await;
    }

    /// Removes `channel`'s presence in `group`, here and in the store.
    pub(super) async fn presence_leave(
        &self,
        group: &str,
        channel: &str,
    ) -> Result<(), ChannelLayerError> {
        let (left, stay) = {
            let _one_at_a_time = self.presence_writes.lock().await;
            let Some(left) = lock(&self.presence).leave(group, channel) else {
                return Ok(());
            };
            let stay = left.collapsed.then(|| {
                lock(&self.presence_stays)
                    .remove(&(group.to_owned(), left.info.user_id().to_owned()))
            });
            self.write_presence(group).await?;
            (left, stay.flatten())
        };
        // Read after removing: a leave is never missed (see the module docs).
        if left.collapsed
            && !self
                .users_elsewhere(group)
                .await?
                .contains_key(left.info.user_id())
        {
            self.announce_leave(group, &left.info, stay).await;
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
        let records = self
            .attempt(&format!("reading the presence of {group:?}"), || {
                store.presence_list(group)
            })
            .await?;
        let mut entries = Vec::new();
        for record in records.into_iter().filter_map(|(_, record)| record) {
            entries.extend(
                decode(&record)?
                    .into_iter()
                    .map(|(channel, info, _)| (channel, info)),
            );
        }
        Ok(group_by_user(entries))
    }

    /// Writes this process's entries of every group it has some in again.
    pub(super) async fn refresh_presence(&self) {
        if self.presence_store().is_err() {
            return;
        }
        let groups = lock(&self.presence).group_names();
        for group in groups {
            {
                let _one_at_a_time = self.presence_writes.lock().await;
                if let Err(e) = self.write_presence(&group).await {
                    tracing::debug!(group, "presence refresh failed: {e}");
                    continue;
                }
            }
            if let Err(e) = self.announce_expired(&group).await {
                tracing::debug!(group, "looking for expired presence failed: {e}");
            }
        }
    }

    /// Announces the users of the processes whose record in `group` expired
    /// since the last refresh (see the module docs), if the group wants
    /// notifications.
    async fn announce_expired(&self, group: &str) -> Result<(), ChannelLayerError> {
        let (config, store) = self.presence_store()?;
        if !config.notifies(group) {
            return Ok(());
        }
        let records = self
            .attempt(&format!("reading the presence of {group:?}"), || {
                store.presence_list(group)
            })
            .await?;
        let mut listed: HashMap<String, Option<HashSet<String>>> = HashMap::new();
        for (process, record) in records {
            let users = record.and_then(|r| decode(&r).ok()).map(|entries| {
                entries
                    .into_iter()
                    .map(|(_, info, _)| info.user_id().to_owned())
                    .collect()
            });
            listed.insert(process, users);
        }
        let present: HashSet<&String> = listed.values().flatten().flatten().collect();
        let previous = lock(&self.presence_seen).insert(
            group.to_owned(),
            listed
                .iter()
                .filter_map(|(p, users)| Some((p.clone(), users.clone()?)))
                .collect(),
        );
        let own = self.process();
        for (process, users) in previous.unwrap_or_default() {
            if process == own || listed.contains_key(&process) {
                continue; // Still there, or removed by itself (it announced).
            }
            let ttl = config.time_limit();
            let claimed = self
                .attempt(&format!("claiming a presence leave in {group:?}"), || {
                    store.presence_claim(group, &process, ttl)
                })
                .await?;
            if !claimed {
                continue;
            }
            for user_id in users.into_iter().filter(|u| !present.contains(u)) {
                // The user's data went with the expired record.
                let change = PresenceChange {
                    user_id,
                    data: None,
                };
                self.notify(group, PRESENCE_LEAVE, change).await;
            }
        }
        Ok(())
    }

    /// Forgets every local entry and removes this process's records (`flush`).
    pub(super) async fn presence_clear(&self) -> Result<(), ChannelLayerError> {
        if self.presence_store().is_err() {
            return Ok(());
        }
        let _one_at_a_time = self.presence_writes.lock().await;
        let groups = {
            let mut presence = lock(&self.presence);
            let groups = presence.group_names();
            *presence = LocalPresence::default();
            groups
        };
        lock(&self.presence_stays).clear();
        for group in groups {
            self.write_presence(&group).await?;
        }
        Ok(())
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
    fn records_roundtrip() {
        let info = PresenceInfo::new("ada").unwrap().with_data(&1).unwrap();
        let entry = ("c!1".to_owned(), info, Some("stay1".to_owned()));
        let bytes = encode(std::slice::from_ref(&entry));
        assert_eq!(decode(&bytes).unwrap(), vec![entry]);
        // Records without stays (older processes) still read.
        let old = br#"[["c!2","[\"bob\",null]"]]"#;
        let decoded = decode(old).unwrap();
        assert_eq!((decoded[0].1.user_id(), &decoded[0].2), ("bob", &None));
        assert!(decode(b"garbage").is_err());
    }
}
