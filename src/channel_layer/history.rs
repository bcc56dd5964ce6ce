//! History and recovery: value types shared by every backend.

use std::{fmt, sync::Arc, time::Duration};

use super::{Event, GroupPattern};

/// Events a history keeps unless [`HistoryPolicy::max_len`] says otherwise.
pub const DEFAULT_HISTORY_LEN: usize = 100;
/// The most events [`HistoryPolicy::max_len`] accepts.
pub const MAX_HISTORY_LEN: usize = 100_000;
/// How long a history lives after its last event unless
/// [`HistoryPolicy::ttl`] says otherwise.
pub const DEFAULT_HISTORY_TTL: Duration = Duration::from_secs(300);

/// Which groups keep a history of their events, and how much.
///
/// A group matching the policy's [`GroupPattern`] keeps its last
/// [`max_len`](Self::max_len) group sends, each with a monotonically
/// increasing offset; the whole history is forgotten [`ttl`](Self::ttl)
/// after its last event (then a new epoch starts). Every process of an
/// application must use the same policies.
///
/// ```
/// use std::time::Duration;
/// use tower_channels::channel_layer::{GroupPattern, HistoryPolicy, InMemoryChannelLayer};
///
/// let layer = InMemoryChannelLayer::new().with_history(
///     HistoryPolicy::new(GroupPattern::prefix("chat_"))
///         .max_len(500)
///         .ttl(Duration::from_secs(600)),
/// );
/// # drop(layer);
/// ```
#[derive(Debug, Clone)]
pub struct HistoryPolicy {
    groups: GroupPattern,
    max_len: usize,
    ttl: Duration,
}

impl HistoryPolicy {
    /// History for the groups matching `groups`, keeping
    /// [`DEFAULT_HISTORY_LEN`] events for [`DEFAULT_HISTORY_TTL`].
    pub fn new(groups: GroupPattern) -> Self {
        Self {
            groups,
            max_len: DEFAULT_HISTORY_LEN,
            ttl: DEFAULT_HISTORY_TTL,
        }
    }

    /// Events kept per group, clamped to `1..=`[`MAX_HISTORY_LEN`].
    pub fn max_len(mut self, max_len: usize) -> Self {
        self.max_len = max_len.clamp(1, MAX_HISTORY_LEN);
        self
    }

    /// How long a history lives after its last event (at least one second).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// Whether the policy applies to `group`.
    pub fn applies_to(&self, group: &str) -> bool {
        self.groups.matches(group)
    }

    /// Events kept per group.
    pub fn len_limit(&self) -> usize {
        self.max_len
    }

    /// How long a history lives after its last event.
    pub fn time_limit(&self) -> Duration {
        self.ttl
    }
}

/// The first policy that applies to `group`.
pub(crate) fn policy_for<'a>(
    policies: &'a [HistoryPolicy],
    group: &str,
) -> Option<&'a HistoryPolicy> {
    policies.iter().find(|p| p.applies_to(group))
}

/// Where an event sits in a group's history: its offset, and the epoch the
/// offset belongs to.
///
/// Offsets start at 1 and grow by one per group send. The epoch names one
/// unbroken history: when the backend loses it (Redis flushed or restarted,
/// the history expired), a new epoch starts and offsets of the old one mean
/// nothing any more. Clients keep the position of the last event they saw
/// and hand it to [`ChannelLayer::recover`](super::ChannelLayer::recover)
/// when they reconnect. Cloning is cheap.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StreamPosition {
    offset: u64,
    epoch: Arc<str>,
}

impl StreamPosition {
    /// The position `offset` in `epoch`.
    pub fn new(offset: u64, epoch: impl Into<Arc<str>>) -> Self {
        Self {
            offset,
            epoch: epoch.into(),
        }
    }

    /// The offset: 1 for the first event of an epoch.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The epoch.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }
}

impl fmt::Debug for StreamPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.offset, self.epoch)
    }
}

/// `{"offset": N, "epoch": "E"}`, e.g. flattened into a frame for the
/// client to send back when it reconnects (see
/// [`consumer::Join`](crate::consumer::Join)).
impl serde::Serialize for StreamPosition {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("StreamPosition", 2)?;
        s.serialize_field("offset", &self.offset)?;
        s.serialize_field("epoch", &*self.epoch)?;
        s.end()
    }
}

/// Why a recovery could not give the events after a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecoveryFailure {
    /// The history was lost and started again (the position's epoch is not
    /// the current one), or the position lies beyond the history.
    EpochChanged,
    /// Events after the position were already trimmed from the history
    /// (it keeps only the last [`HistoryPolicy::max_len`] events).
    TooOld,
}

impl fmt::Display for RecoveryFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecoveryFailure::EpochChanged => "the history was reset (epoch changed)",
            RecoveryFailure::TooOld => "the position is older than the history",
        })
    }
}

/// What [`ChannelLayer::recover`](super::ChannelLayer::recover) found.
///
/// Either every event after the asked position, in order (each carrying its
/// [`Event::position`]), or a [`RecoveryFailure`]: the application then
/// reloads its state some other way.
///
/// # Recovering without a gap or a duplicate
///
/// Join the group first, then recover, then deliver the recovered events,
/// then the live ones through a [`StreamCursor`] made by
/// [`cursor`](Self::cursor): events published between the join and the
/// recovery arrive both ways, and the cursor drops the live copies.
///
/// ```
/// use tower_channels::channel_layer::{
///     ChannelLayer, Event, GroupPattern, HistoryPolicy, InMemoryChannelLayer, StreamPosition,
/// };
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let layer = InMemoryChannelLayer::new().with_history(HistoryPolicy::new(GroupPattern::any()));
/// let first = layer.group_send("news", Event::text("news", "one")).await?;
/// let seen: StreamPosition = first.position.unwrap();
/// layer.group_send("news", Event::text("news", "two")).await?;
///
/// // The client comes back with the last position it saw:
/// let mut inbox = layer.new_channel().await?;
/// layer.group_add("news", inbox.name()).await?; // 1. join
/// let recovery = layer.recover("news", &seen).await?; // 2. recover
/// assert!(recovery.is_recovered());
/// let mut cursor = recovery.cursor();
/// for event in recovery.events() {
///     assert!(cursor.accept(event)); // 3. deliver what was missed
/// }
/// layer.group_send("news", Event::text("news", "three")).await?;
/// let live = inbox.recv().await?; // 4. then live, through the cursor
/// assert!(cursor.accept(&live));
/// assert_eq!(live.position().unwrap().offset(), 3);
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct Recovery {
    events: Vec<Event>,
    latest: Option<StreamPosition>,
    failure: Option<RecoveryFailure>,
}

impl Recovery {
    /// Every event after the asked position; `latest` is the position of
    /// the newest event in the history.
    pub fn recovered(events: Vec<Event>, latest: StreamPosition) -> Self {
        Self {
            events,
            latest: Some(latest),
            failure: None,
        }
    }

    /// Recovery failed; `latest` is the newest position in the history if
    /// there is one.
    pub fn failed(failure: RecoveryFailure, latest: Option<StreamPosition>) -> Self {
        Self {
            events: Vec::new(),
            latest,
            failure: Some(failure),
        }
    }

    /// Whether the events after the position were found.
    pub fn is_recovered(&self) -> bool {
        self.failure.is_none()
    }

    /// Why recovery failed.
    pub fn failure(&self) -> Option<RecoveryFailure> {
        self.failure
    }

    /// The recovered events, oldest first (empty when recovery failed).
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// The recovered events, oldest first.
    pub fn into_events(self) -> Vec<Event> {
        self.events
    }

    /// The newest position in the history when it was read.
    pub fn latest(&self) -> Option<&StreamPosition> {
        self.latest.as_ref()
    }

    /// A cursor for everything the connection delivers from now on: it
    /// accepts the recovered events, then only the live events they do not
    /// already cover. After a failed recovery it accepts every event (no
    /// history was delivered, so nothing can repeat).
    pub fn cursor(&self) -> StreamCursor {
        let last = match (&self.failure, self.events.first().and_then(Event::position)) {
            (Some(_), _) => None,
            (None, Some(first)) => Some(StreamPosition::new(
                first.offset.saturating_sub(1),
                first.epoch.clone(),
            )),
            (None, None) => self.latest.clone(),
        };
        StreamCursor { last }
    }
}

/// Drops events a connection already delivered: the seam between recovered
/// and live events (see [`Recovery`]).
#[derive(Debug, Clone, Default)]
pub struct StreamCursor {
    last: Option<StreamPosition>,
}

impl StreamCursor {
    /// A cursor that has seen nothing: it accepts every event.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `event` is new; if so the cursor moves to it. Events
    /// without a position (groups without history) are always new; an
    /// event of another epoch than the cursor's starts that epoch.
    pub fn accept(&mut self, event: &Event) -> bool {
        let Some(pos) = event.position() else {
            return true;
        };
        match &self.last {
            Some(last) if last.epoch == pos.epoch && pos.offset <= last.offset => false,
            _ => {
                self.last = Some(pos.clone());
                true
            }
        }
    }

    /// The position of the last accepted event.
    pub fn position(&self) -> Option<&StreamPosition> {
        self.last.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_drops_repeats_and_follows_epochs() {
        let at = |o, e: &str| Event::bare("x").with_position(StreamPosition::new(o, e));
        let recovered = Recovery::recovered(vec![at(3, "a")], StreamPosition::new(3, "a"));
        let mut c = recovered.cursor();
        assert!(c.accept(&recovered.events()[0]));
        assert!(!c.accept(&at(2, "a")));
        assert!(!c.accept(&at(3, "a")));
        assert!(c.accept(&at(4, "a")));
        assert!(!c.accept(&at(4, "a")));
        assert!(c.accept(&at(1, "b")));
        assert!(c.accept(&Event::bare("no history")));
        assert_eq!(c.position(), Some(&StreamPosition::new(1, "b")));
        let mut fresh = Recovery::failed(RecoveryFailure::TooOld, None).cursor();
        assert!(fresh.accept(&at(1, "a")));
    }

    #[test]
    fn policy_bounds() {
        let p = HistoryPolicy::new(GroupPattern::prefix("a"))
            .max_len(0)
            .ttl(Duration::ZERO);
        assert_eq!(p.len_limit(), 1);
        assert_eq!(p.time_limit(), Duration::from_secs(1));
        assert_eq!(
            HistoryPolicy::new(GroupPattern::any())
                .max_len(usize::MAX)
                .len_limit(),
            MAX_HISTORY_LEN
        );
        let ps = [HistoryPolicy::new(GroupPattern::exact("b")).max_len(5)];
        assert!(policy_for(&ps, "b").is_some());
        assert!(policy_for(&ps, "a").is_none());
    }
}
