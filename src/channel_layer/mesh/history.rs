//! Group histories in the mesh, on the transport's [`Store`].
//!
//! * **Sending.** A group send to a history group appends the encoded event
//!   to the store, which assigns the offset and publishes the stored event
//!   on the group's live subject. The sending process hands the event to
//!   its own members through the [`Sequencer`] as soon as the store
//!   answered (it does not wait for, or depend on, its own live copy).
//! * **Receiving.** While a process has a member in a history group it
//!   subscribes to the live subject (as well as the group subject, which
//!   carries ephemeral events and presence notifications). Before
//!   subscribing it reads the group's latest position, so what is
//!   published in between is read back from the history, not missed. Live
//!   copies go through the sequencer: in offset order, once, gaps read back.
//! * **Reconnecting.** When the transport reports that its connection is
//!   back, every followed group catches up ([`Sequencer::catch_up`]).
//! * **Recovering** reads the store and applies the policy's `max_len`:
//!   offsets older than the last `max_len` are trimmed ([`RecoveryFailure::TooOld`]),
//!   whatever the store still keeps.

use std::sync::Arc;

use bytes::Bytes;

use super::{HistoryRange, Inner, Store, Transport};
use crate::channel_layer::{
    history::policy_for,
    local::LocalChannels,
    sequencer::{self, Base, SequencerHost},
    validate_group_name, BoxFuture, ChannelLayerError, Event, EventCodecError, Feature,
    GroupSendReport, HistoryPolicy, Recovery, RecoveryFailure, StreamPosition,
};

impl<T: Transport> Inner<T> {
    /// The store, or `Unsupported` (`feature`) when the transport has none.
    pub(super) fn store(&self, feature: Feature) -> Result<&dyn Store, ChannelLayerError> {
        self.transport
            .store()
            .ok_or(ChannelLayerError::Unsupported {
                feature: feature.name(),
            })
    }

    /// The history policy of `group`, when the transport can keep one.
    pub(super) fn history_policy(&self, group: &str) -> Option<&HistoryPolicy> {
        self.transport.store()?;
        policy_for(&self.config.history, group)
    }

    /// A group send to a history group (not ephemeral).
    pub(super) async fn group_send_with_history(
        &self,
        group: &str,
        event: &Event,
    ) -> Result<GroupSendReport, ChannelLayerError> {
        let store = self.store(Feature::History)?;
        let encoded = event.encode()?;
        let local_members = self.registry.group_len(group);
        let position = self
            .attempt(&format!("history append to {group:?}"), || {
                store.append(group, encoded.clone())
            })
            .await?;
        self.counters.group_sent(0);
        if local_members > 0 {
            let own = event.clone().with_position(position.clone());
            self.sequencer.offer(self, group, own).await;
        }
        Ok(GroupSendReport {
            local_members,
            remote_receivers: None,
            dropped: 0,
            position: Some(position),
        })
    }

    /// Makes the live subscription of history group `group` match `want`
    /// (whether it has local members), following it from its current
    /// position before subscribing.
    pub(super) async fn sync_history(
        &self,
        group: &str,
        want: bool,
    ) -> Result<(), ChannelLayerError> {
        let live = super::live_subject(&self.config.prefix, group);
        if want && !self.sequencer.follows(group) {
            let base = match self.latest(group).await {
                Ok(Some(position)) => Base::At(position),
                Ok(None) => Base::Empty,
                Err(e) => {
                    tracing::debug!(group, "reading the history position failed: {e}");
                    Base::Unknown
                }
            };
            self.sequencer.start(group, base);
        }
        self.sync_subject(&live, want, false).await?;
        if !want {
            self.sequencer
                .retain(|g| g != group || self.registry.group_len(g) > 0);
        }
        Ok(())
    }

    async fn latest(&self, group: &str) -> Result<Option<StreamPosition>, ChannelLayerError> {
        let store = self.store(Feature::History)?;
        self.attempt(&format!("reading the position of {group:?}"), || {
            store.latest(group)
        })
        .await
    }

    /// A stored event the broker published on a live subject.
    pub(super) async fn history_received(
        &self,
        subject: &str,
        payload: &Bytes,
        position: StreamPosition,
    ) {
        let live_prefix = super::live_subject(&self.config.prefix, "");
        let Some(group) = subject.strip_prefix(&live_prefix) else {
            return;
        };
        match Event::decode(payload) {
            Ok(event) => {
                let event = event.with_position(position);
                self.sequencer.offer(self, group, event).await;
            }
            Err(e) => {
                tracing::warn!(group, "dropping a history event: {e}");
                crate::channel_layer::local::Counters::add(&self.counters.dropped_other, 1);
            }
        }
    }

    /// The connection came back: every followed group reads what it
    /// missed, and presence is written again, in a task.
    pub(super) fn reconnected(self: &Arc<Self>) {
        let inner = self.clone();
        tokio::spawn(async move {
            for group in inner.sequencer.groups() {
                inner.sequencer.catch_up(&*inner, &group).await;
            }
            inner.refresh_presence().await;
        });
    }

    /// `ChannelLayer::recover` (and the sequencer's reads).
    pub(super) async fn recover(
        &self,
        group: &str,
        since: &StreamPosition,
    ) -> Result<Recovery, ChannelLayerError> {
        validate_group_name(group)?;
        let store = self.store(Feature::History)?;
        if self.config.history.is_empty() {
            return Err(ChannelLayerError::Unsupported {
                feature: Feature::History.name(),
            });
        }
        let Some(policy) = policy_for(&self.config.history, group) else {
            return Err(ChannelLayerError::NoHistory {
                group: group.to_owned(),
            });
        };
        let range = self
            .attempt(&format!("reading the history of {group:?}"), || {
                store.read(group, since)
            })
            .await?;
        Ok(recovery(range, since, policy.len_limit())?)
    }
}

/// What a read of the history means for a recovery from `since`, in a
/// group keeping `max_len` events.
fn recovery(
    range: Option<HistoryRange>,
    since: &StreamPosition,
    max_len: usize,
) -> Result<Recovery, EventCodecError> {
    let Some(range) = range else {
        return Ok(Recovery::failed(RecoveryFailure::EpochChanged, None));
    };
    let latest = range.latest;
    let top = latest.offset();
    if latest.epoch() != since.epoch() || since.offset() > top {
        return Ok(Recovery::failed(
            RecoveryFailure::EpochChanged,
            Some(latest),
        ));
    }
    let kept_from = range
        .first
        .max(top.saturating_sub(max_len as u64).saturating_add(1));
    if since.offset() < top && since.offset() + 1 < kept_from {
        return Ok(Recovery::failed(RecoveryFailure::TooOld, Some(latest)));
    }
    let mut events = Vec::new();
    let mut next = since.offset() + 1;
    for (offset, payload) in range.events {
        if offset < next {
            continue;
        }
        if offset > next {
            // Trimmed while it was read.
            return Ok(Recovery::failed(RecoveryFailure::TooOld, Some(latest)));
        }
        let position = StreamPosition::new(offset, latest.epoch());
        events.push(Event::decode(&payload)?.with_position(position));
        next += 1;
    }
    if next <= top {
        return Ok(Recovery::failed(RecoveryFailure::TooOld, Some(latest)));
    }
    Ok(Recovery::recovered(events, latest))
}

impl<T: Transport> SequencerHost for Inner<T> {
    fn read_history<'a>(
        &'a self,
        group: &'a str,
        since: &'a StreamPosition,
    ) -> BoxFuture<'a, Result<Recovery, ChannelLayerError>> {
        Box::pin(self.recover(group, since))
    }

    fn deliver(&self, group: &str, event: &Event) {
        self.fan_out(group, event);
    }

    fn catch_up_later(&self, group: &str, delay: std::time::Duration) {
        let (inner, group) = (self.me.clone(), group.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(inner) = inner.upgrade() {
                inner.sequencer.retry(&*inner, &group).await;
            }
        });
    }

    fn lost(&self, group: &str, count: Option<u64>, why: &str) {
        sequencer::count_lost(&self.counters, group, count, why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(top: u64, first: u64, from: u64) -> Option<HistoryRange> {
        let event = Event::bare("h").encode().unwrap();
        Some(HistoryRange {
            latest: StreamPosition::new(top, "e"),
            first,
            events: (from..=top).map(|o| (o, event.clone())).collect(),
        })
    }

    fn offsets(r: &Recovery) -> Vec<u64> {
        r.events()
            .iter()
            .map(|e| e.position().unwrap().offset())
            .collect()
    }

    #[test]
    fn recovery_rules() {
        let at = |o| StreamPosition::new(o, "e");
        let r = recovery(None, &at(1), 8).unwrap();
        assert_eq!(r.failure(), Some(RecoveryFailure::EpochChanged));
        let r = recovery(range(5, 1, 1), &StreamPosition::new(1, "x"), 8).unwrap();
        assert_eq!(r.failure(), Some(RecoveryFailure::EpochChanged));
        let r = recovery(range(5, 1, 1), &at(6), 8).unwrap();
        assert_eq!(r.failure(), Some(RecoveryFailure::EpochChanged));
        assert_eq!(
            offsets(&recovery(range(5, 1, 1), &at(2), 8).unwrap()),
            [3, 4, 5]
        );
        assert!(recovery(range(5, 1, 1), &at(5), 8)
            .unwrap()
            .events()
            .is_empty());
        // The store keeps more than the policy's max_len: trimmed anyway.
        let r = recovery(range(20, 1, 1), &at(11), 8).unwrap();
        assert_eq!(r.failure(), Some(RecoveryFailure::TooOld));
        assert_eq!(
            offsets(&recovery(range(20, 1, 1), &at(12), 8).unwrap()),
            (13..=20).collect::<Vec<_>>()
        );
        // Trimmed by the store, or while reading: too old.
        let r = recovery(range(20, 15, 15), &at(12), 8).unwrap();
        assert_eq!(r.failure(), Some(RecoveryFailure::TooOld));
        let r = recovery(range(20, 1, 16), &at(13), 8).unwrap();
        assert_eq!(r.failure(), Some(RecoveryFailure::TooOld));
    }
}
