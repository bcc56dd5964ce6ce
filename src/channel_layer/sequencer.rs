//! History events to a process's members in offset order, each once,
//! whichever way they arrive.
//!
//! A history event can reach a process twice: the sending process knows
//! its offset when the broker answers the send, and the broker's
//! publication brings it again (to every subscribed process). Events of
//! other senders may arrive later than a higher offset, or not at all
//! while the subscription was down. One [`Track`] per group remembers the
//! last position delivered here and:
//!
//! * delivers the next offset at once and drops one already delivered;
//! * on a jump, keeps the early event back and reads the missing offsets
//!   from the history, then delivers in order. At most [`MAX_PENDING`]
//!   events are kept back; later ones are let go, as they are in the
//!   history too and the read brings them back;
//! * on a new epoch (the history was reset: expired, flushed, the broker
//!   restarted), delivers what it kept back of the old epoch and reads the
//!   new one from its first offset, so events published in the new epoch
//!   before this process subscribed again are not lost; events of an epoch
//!   it already left are dropped;
//! * after a reconnect, [`Sequencer::catch_up`] reads what was missed
//!   without waiting for the next event.
//!
//! A read that fails (the broker is down, or only the connection that
//! reads is) keeps the held-back events and is tried again after a delay
//! ([`SequencerHost::catch_up_later`], [`RETRY_MIN`] doubling up to
//! [`RETRY_MAX`]) until it succeeds or the group is left, whether or not
//! more events arrive; meanwhile events after the gap are kept back, not
//! read again one by one. So an event is given up only when the history
//! no longer has it: a read that says so (the history was trimmed past
//! the position, or lost) delivers what was held back and counts the
//! missing offsets as lost.

use super::local::lock;
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::Mutex as AsyncMutex;

use super::{
    local::Counters, BoxFuture, ChannelLayerError, Event, Recovery, RecoveryFailure, StreamPosition,
};

/// Events of one group held back while missing offsets are read; events
/// after these are let go (the read brings them back from the history).
/// Bounds the memory a stalled history read can hold (events are shared,
/// so this is at most `MAX_PENDING` references per group).
pub(crate) const MAX_PENDING: usize = 1024;

/// The first delay before a failed history read is tried again.
pub(crate) const RETRY_MIN: Duration = Duration::from_millis(100);

/// The longest delay between retries of a failing history read.
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(2);

/// Epochs remembered per group as "left", whose late events are dropped.
const RETIRED: usize = 8;

/// What a layer gives the [`Sequencer`]: reading a group's history and
/// handing events to its local members.
pub(crate) trait SequencerHost: Send + Sync {
    /// The events of `group` after `since` (what
    /// [`ChannelLayer::recover`](super::ChannelLayer::recover) returns).
    fn read_history<'a>(
        &'a self,
        group: &'a str,
        since: &'a StreamPosition,
    ) -> BoxFuture<'a, Result<Recovery, ChannelLayerError>>;

    /// Hands `event` to every local member of `group`.
    fn deliver(&self, group: &str, event: &Event);

    /// Calls [`Sequencer::retry`] for `group` after `delay` (a history
    /// read failed), unless the layer is gone by then.
    fn catch_up_later(&self, group: &str, delay: Duration);

    /// `count` events of `group` could not be delivered here (`None`: an
    /// unknown number); `why` says why.
    fn lost(&self, group: &str, count: Option<u64>, why: &str);
}

/// What a layer's [`SequencerHost::lost`] does: counts the events in
/// `dropped_other` (an unknown number as one) and warns.
pub(crate) fn count_lost(counters: &Counters, group: &str, count: Option<u64>, why: &str) {
    let count = count.unwrap_or(1);
    Counters::add(
        &counters.dropped_other,
        usize::try_from(count).unwrap_or(usize::MAX),
    );
    tracing::warn!(
        group,
        lost = count,
        "history events missed here cannot be delivered: {why}"
    );
}

/// Where a group stands in this process.
#[derive(Debug, Clone)]
pub(crate) enum Base {
    /// Not known (the history could not be read when subscribing): the
    /// first event is delivered as it is and becomes the position.
    Unknown,
    /// The group had no history when this process subscribed: every epoch
    /// seen first is read from its first offset.
    Empty,
    /// The last position delivered here.
    At(StreamPosition),
}

#[derive(Debug)]
struct Track {
    base: Base,
    retired: Vec<Arc<str>>,
    /// Events of the base's epoch after a gap, by offset.
    pending: BTreeMap<u64, Event>,
    /// A retry of a failed read is scheduled: events after a gap wait
    /// for it instead of each reading again.
    retrying: bool,
    /// The delay before the next retry.
    retry_delay: Duration,
}

/// The [`Track`]s of the history groups this process is subscribed to.
#[derive(Debug, Default)]
pub(crate) struct Sequencer {
    groups: Mutex<HashMap<String, Arc<AsyncMutex<Track>>>>,
}

impl Sequencer {
    fn track(&self, group: &str) -> Option<Arc<AsyncMutex<Track>>> {
        lock(&self.groups).get(group).cloned()
    }

    /// Starts following `group` from `base` (when subscribing); keeps the
    /// position of a group already followed (a re-subscription after a
    /// reconnect continues where it was).
    pub(crate) fn start(&self, group: &str, base: Base) {
        lock(&self.groups)
            .entry(group.to_owned())
            .or_insert_with(|| {
                Arc::new(AsyncMutex::new(Track {
                    base,
                    retired: Vec::new(),
                    pending: BTreeMap::new(),
                    retrying: false,
                    retry_delay: RETRY_MIN,
                }))
            });
    }

    /// Whether `group` is followed.
    pub(crate) fn follows(&self, group: &str) -> bool {
        lock(&self.groups).contains_key(group)
    }

    /// Stops following the groups for which `keep` is false (unsubscribed).
    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        lock(&self.groups).retain(|group, _| keep(group));
    }

    /// The groups followed.
    pub(crate) fn groups(&self) -> Vec<String> {
        lock(&self.groups).keys().cloned().collect()
    }

    /// A history event of `group` arrived (from the broker or from this
    /// process's own send). Without a track (not subscribed), it is
    /// handed on as it is: there is nothing to keep in order with.
    pub(crate) async fn offer<H: SequencerHost + ?Sized>(
        &self,
        host: &H,
        group: &str,
        event: Event,
    ) {
        match (self.track(group), event.position().is_some()) {
            (Some(track), true) => track.lock().await.offer(host, group, event).await,
            _ => host.deliver(group, &event),
        }
    }

    /// Reads what `group` missed since its position (after a reconnect).
    pub(crate) async fn catch_up<H: SequencerHost + ?Sized>(&self, host: &H, group: &str) {
        if let Some(track) = self.track(group) {
            track.lock().await.catch_up(host, group).await;
        }
    }

    /// The retry [`SequencerHost::catch_up_later`] scheduled: reads again
    /// (and schedules the next retry if it fails). Nothing once `group`
    /// is no longer followed.
    pub(crate) async fn retry<H: SequencerHost + ?Sized>(&self, host: &H, group: &str) {
        if let Some(track) = self.track(group) {
            let mut track = track.lock().await;
            track.retrying = false;
            track.catch_up(host, group).await;
        }
    }
}

impl Track {
    async fn offer<H: SequencerHost + ?Sized>(&mut self, host: &H, group: &str, event: Event) {
        let Some(pos) = event.position().cloned() else {
            return;
        };
        let last = match &self.base {
            Base::Unknown => {
                host.deliver(group, &event);
                self.base = Base::At(pos);
                return;
            }
            Base::Empty => {
                self.base = Base::At(StreamPosition::new(0, pos.epoch()));
                0
            }
            Base::At(last) if last.epoch() == pos.epoch() => last.offset(),
            Base::At(_) if self.retired.iter().any(|e| **e == *pos.epoch()) => {
                tracing::debug!(group, ?pos, "dropping an event of an earlier epoch");
                return;
            }
            Base::At(_) => {
                self.new_epoch(host, group, pos.epoch());
                0
            }
        };
        if pos.offset() <= last || self.pending.contains_key(&pos.offset()) {
            return; // Delivered already (or held back): a duplicate.
        }
        if pos.offset() == last + 1 {
            host.deliver(group, &event);
            self.base = Base::At(pos);
            self.drain_contiguous(host, group);
            return;
        }
        if self.pending.len() < MAX_PENDING {
            self.pending.insert(pos.offset(), event);
        }
        // Else let go: it is in the history, which the read brings back.
        if !self.retrying {
            self.catch_up(host, group).await;
        }
    }

    /// The broker moved to `epoch`: what was held back of the old one is
    /// delivered, and the new one is followed from its start.
    fn new_epoch<H: SequencerHost + ?Sized>(&mut self, host: &H, group: &str, epoch: &str) {
        self.flush_pending(host, group, "the history was reset");
        if let Base::At(old) = &self.base {
            if self.retired.len() == RETIRED {
                self.retired.remove(0);
            }
            self.retired.push(old.epoch().into());
        }
        self.base = Base::At(StreamPosition::new(0, epoch));
    }

    /// Reads the history after the position and delivers it, with what
    /// was held back, in order.
    async fn catch_up<H: SequencerHost + ?Sized>(&mut self, host: &H, group: &str) {
        // At most one epoch change per call: the read after it starts at
        // the new epoch's first offset.
        for _ in 0..2 {
            let Base::At(since) = self.base.clone() else {
                return;
            };
            let recovery = match host.read_history(group, &since).await {
                Ok(recovery) => {
                    self.retry_delay = RETRY_MIN;
                    recovery
                }
                Err(e) => {
                    // Keep what was held back and try again later (the
                    // catch-up after a reconnect, too, may come first).
                    tracing::debug!(
                        group,
                        retry_in = ?self.retry_delay,
                        "reading missed history events failed: {e}"
                    );
                    if !self.retrying {
                        self.retrying = true;
                        host.catch_up_later(group, self.retry_delay);
                        self.retry_delay = (self.retry_delay * 2).min(RETRY_MAX);
                    }
                    return;
                }
            };
            if recovery.is_recovered() {
                for event in recovery.into_events() {
                    let Some(pos) = event.position().cloned() else {
                        continue;
                    };
                    if pos.epoch() == since.epoch() && pos.offset() > self.offset() {
                        self.pending.remove(&pos.offset());
                        host.deliver(group, &event);
                        self.base = Base::At(pos);
                    }
                }
                self.flush_pending(host, group, "events missing from the history");
                return;
            }
            match (recovery.failure(), recovery.latest()) {
                (Some(RecoveryFailure::EpochChanged), Some(latest))
                    if latest.epoch() != since.epoch()
                        && !self.retired.iter().any(|e| **e == *latest.epoch()) =>
                {
                    let epoch = latest.epoch().to_owned();
                    self.new_epoch(host, group, &epoch);
                }
                (failure, _) => {
                    if !self.pending.is_empty() {
                        let why = failure.map_or_else(String::new, |f| f.to_string());
                        self.flush_pending(host, group, &why);
                    }
                    return;
                }
            }
        }
    }

    /// Delivers the held-back events that follow the position without a gap.
    fn drain_contiguous<H: SequencerHost + ?Sized>(&mut self, host: &H, group: &str) {
        loop {
            let next = self.offset() + 1;
            let Some(event) = self.pending.remove(&next) else {
                return;
            };
            host.deliver(group, &event);
            if let Some(pos) = event.position() {
                self.base = Base::At(pos.clone());
            }
        }
    }

    fn offset(&self) -> u64 {
        match &self.base {
            Base::At(pos) => pos.offset(),
            _ => 0,
        }
    }

    /// Delivers what was held back, in order, counting the offsets missing
    /// between as lost.
    fn flush_pending<H: SequencerHost + ?Sized>(&mut self, host: &H, group: &str, why: &str) {
        for (offset, event) in std::mem::take(&mut self.pending) {
            let last = self.offset();
            if offset <= last {
                continue;
            }
            if offset > last + 1 {
                host.lost(group, Some(offset - last - 1), why);
            }
            host.deliver(group, &event);
            if let Some(pos) = event.position() {
                self.base = Base::At(pos.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A history in memory (epoch, events) and the deliveries made.
    #[derive(Default)]
    struct Host {
        epoch: Mutex<String>,
        history: Mutex<Vec<Event>>,
        down: Mutex<bool>,
        delivered: Mutex<Vec<(u64, String)>>,
        lost: Mutex<u64>,
        reads: Mutex<u64>,
        /// The delays of the retries asked for.
        retries: Mutex<Vec<Duration>>,
    }

    fn at(offset: u64, epoch: &str) -> Event {
        Event::bare("e").with_position(StreamPosition::new(offset, epoch))
    }

    impl Host {
        fn new(epoch: &str, top: u64) -> Self {
            let host = Host::default();
            host.reset(epoch, top);
            host
        }

        fn reset(&self, epoch: &str, top: u64) {
            *lock(&self.epoch) = epoch.to_owned();
            *lock(&self.history) = (1..=top).map(|o| at(o, epoch)).collect();
        }

        fn delivered(&self) -> Vec<(u64, String)> {
            lock(&self.delivered).clone()
        }
    }

    impl SequencerHost for Host {
        fn read_history<'a>(
            &'a self,
            _group: &'a str,
            since: &'a StreamPosition,
        ) -> BoxFuture<'a, Result<Recovery, ChannelLayerError>> {
            *lock(&self.reads) += 1;
            let result = if *lock(&self.down) {
                Err(ChannelLayerError::backend("down"))
            } else {
                let epoch = lock(&self.epoch).clone();
                let history = lock(&self.history).clone();
                let top = history.len() as u64;
                let latest = StreamPosition::new(top, epoch.as_str());
                Ok(if since.epoch() != epoch {
                    Recovery::failed(RecoveryFailure::EpochChanged, Some(latest))
                } else {
                    let events = history
                        .into_iter()
                        .filter(|e| e.position().unwrap().offset() > since.offset())
                        .collect();
                    Recovery::recovered(events, latest)
                })
            };
            Box::pin(std::future::ready(result))
        }

        fn deliver(&self, _group: &str, event: &Event) {
            let pos = event.position().unwrap();
            lock(&self.delivered).push((pos.offset(), pos.epoch().to_owned()));
        }

        fn lost(&self, _group: &str, count: Option<u64>, _why: &str) {
            *lock(&self.lost) += count.unwrap_or(0);
        }

        fn catch_up_later(&self, _group: &str, delay: Duration) {
            lock(&self.retries).push(delay);
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn offsets(host: &Host, epoch: &str) -> Vec<u64> {
        host.delivered()
            .into_iter()
            .filter(|(_, e)| e == epoch)
            .map(|(o, _)| o)
            .collect()
    }

    #[test]
    fn own_copy_first_then_broker_copy_is_dropped() {
        block_on(async {
            let host = Host::new("a", 5);
            let seq = Sequencer::default();
            seq.start("g", Base::At(StreamPosition::new(3, "a")));
            // Our own send answered 5 before the broker brought 4: 4 is read
            // from the history, then 5; the broker's 4 and 5 are repeats.
            seq.offer(&host, "g", at(5, "a")).await;
            seq.offer(&host, "g", at(4, "a")).await;
            seq.offer(&host, "g", at(5, "a")).await;
            assert_eq!(offsets(&host, "a"), [4, 5]);
        });
    }

    #[test]
    fn held_back_while_the_history_is_unreachable() {
        block_on(async {
            let host = Host::new("a", 3);
            let seq = Sequencer::default();
            seq.start("g", Base::At(StreamPosition::new(1, "a")));
            *lock(&host.down) = true;
            seq.offer(&host, "g", at(3, "a")).await;
            assert!(host.delivered().is_empty());
            // The broker's copy of 2 arrives: 2 then 3.
            seq.offer(&host, "g", at(2, "a")).await;
            assert_eq!(offsets(&host, "a"), [2, 3]);
            assert_eq!(*lock(&host.lost), 0);
        });
    }

    #[test]
    fn a_new_epoch_is_read_from_its_start() {
        block_on(async {
            let host = Host::new("a", 2);
            let seq = Sequencer::default();
            seq.start("g", Base::At(StreamPosition::new(2, "a")));
            // The broker restarted; epoch b's first events were published
            // before this process subscribed again.
            host.reset("b", 3);
            seq.offer(&host, "g", at(3, "b")).await;
            assert_eq!(offsets(&host, "b"), [1, 2, 3]);
            // A late event of epoch a is dropped, not delivered out of order.
            seq.offer(&host, "g", at(3, "a")).await;
            assert_eq!(host.delivered().len(), 3);
        });
    }

    #[test]
    fn catch_up_after_reconnect_crosses_epochs() {
        block_on(async {
            let host = Host::new("a", 4);
            let seq = Sequencer::default();
            seq.start("g", Base::At(StreamPosition::new(2, "a")));
            host.reset("b", 2);
            seq.catch_up(&host, "g").await;
            assert_eq!(offsets(&host, "b"), [1, 2]);
            // Epoch a's 3 and 4 are gone with the history: not recoverable.
            seq.offer(&host, "g", at(3, "b")).await;
            assert_eq!(offsets(&host, "b"), [1, 2, 3]);
        });
    }

    #[test]
    fn empty_and_unknown_bases() {
        block_on(async {
            let host = Host::new("a", 2);
            let seq = Sequencer::default();
            seq.start("empty", Base::Empty);
            seq.offer(&host, "empty", at(2, "a")).await;
            assert_eq!(offsets(&host, "a"), [1, 2]);
            let host = Host::new("a", 9);
            seq.start("unknown", Base::Unknown);
            seq.offer(&host, "unknown", at(9, "a")).await;
            assert_eq!(offsets(&host, "a"), [9]);
            // Not followed: handed on as it is.
            seq.offer(&host, "other", at(7, "a")).await;
            assert_eq!(offsets(&host, "a"), [9, 7]);
        });
    }

    #[test]
    fn trimmed_history_delivers_what_was_held_back() {
        block_on(async {
            let host = Host::new("a", 9);
            let seq = Sequencer::default();
            seq.start("g", Base::At(StreamPosition::new(1, "a")));
            // History gone entirely: reads answer "epoch changed" with no latest.
            *lock(&host.history) = Vec::new();
            *lock(&host.epoch) = "a".into();
            seq.offer(&host, "g", at(5, "a")).await;
            // The in-memory host answers "recovered" with nothing: 5 is
            // delivered and 2..4 counted lost.
            assert_eq!(offsets(&host, "a"), [5]);
            assert_eq!(*lock(&host.lost), 3);
        });
    }

    #[test]
    fn beyond_the_bound_events_are_read_back_by_the_retry() {
        block_on(async {
            let top = MAX_PENDING as u64 + 50;
            let host = Host::new("a", top);
            let seq = Sequencer::default();
            seq.start("g", Base::At(StreamPosition::new(1, "a")));
            *lock(&host.down) = true;
            // Offset 2 was missed; 3..=top arrive while reads fail.
            for offset in 3..=top {
                seq.offer(&host, "g", at(offset, "a")).await;
            }
            assert!(host.delivered().is_empty());
            // One read, one retry asked for: the events after it wait.
            assert_eq!(*lock(&host.reads), 1);
            assert_eq!(*lock(&host.retries), [RETRY_MIN]);
            // The retry fails too: the next one waits twice as long.
            seq.retry(&host, "g").await;
            assert_eq!(*lock(&host.retries), [RETRY_MIN, RETRY_MIN * 2]);
            *lock(&host.down) = false;
            seq.retry(&host, "g").await;
            assert_eq!(offsets(&host, "a"), (2..=top).collect::<Vec<_>>());
            assert_eq!(*lock(&host.lost), 0);
            assert_eq!(lock(&host.retries).len(), 2, "no retry after a success");
        });
    }
}
