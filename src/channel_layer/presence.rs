//! Presence: value types shared by every backend, and the per-process
//! bookkeeping both built-in layers use.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::{EventCodecError, GroupPattern};

/// The longest user id [`PresenceInfo::new`] accepts, in bytes.
pub const MAX_USER_ID_LEN: usize = 256;
/// The most bytes the JSON form of [`PresenceInfo::with_data`] may take.
pub const MAX_PRESENCE_DATA: usize = 1024;
/// How long a crashed process's members stay listed unless
/// [`PresenceConfig::ttl`] says otherwise.
pub const DEFAULT_PRESENCE_TTL: Duration = Duration::from_secs(30);

/// Event type of a join notification (body: [`PresenceChange`]).
pub const PRESENCE_JOIN: &str = "presence.join";
/// Event type of a leave notification (body: [`PresenceChange`]).
pub const PRESENCE_LEAVE: &str = "presence.leave";

/// Who a connection is, for presence: a user id and a small optional value
/// (a display name, a device...), stored as JSON.
///
/// ```
/// use tower_channels::channel_layer::PresenceInfo;
///
/// let info = PresenceInfo::new("alice")?.with_data(&serde_json::json!({ "device": "phone" }))?;
/// assert_eq!(info.user_id(), "alice");
/// assert_eq!(info.data_json(), Some(r#"{"device":"phone"}"#));
/// assert!(PresenceInfo::new("").is_err());
/// # Ok::<_, tower_channels::channel_layer::InvalidPresence>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceInfo {
    user_id: String,
    data: Option<String>,
}

impl PresenceInfo {
    /// A connection of user `user_id` (1 to [`MAX_USER_ID_LEN`] bytes).
    pub fn new(user_id: impl Into<String>) -> Result<Self, InvalidPresence> {
        let user_id = user_id.into();
        if user_id.is_empty() {
            return Err(InvalidPresence("the user id must not be empty"));
        }
        if user_id.len() > MAX_USER_ID_LEN {
            return Err(InvalidPresence("the user id is longer than 256 bytes"));
        }
        Ok(Self {
            user_id,
            data: None,
        })
    }

    /// Attaches `data`, serialized as JSON of at most [`MAX_PRESENCE_DATA`] bytes.
    pub fn with_data<T: Serialize + ?Sized>(mut self, data: &T) -> Result<Self, InvalidPresence> {
        let json = serde_json::to_string(data)
            .map_err(|_| InvalidPresence("the presence data does not serialize to JSON"))?;
        if json.len() > MAX_PRESENCE_DATA {
            return Err(InvalidPresence(
                "the presence data is larger than 1024 bytes",
            ));
        }
        self.data = Some(json);
        Ok(self)
    }

    /// The user id.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// The attached data as JSON text.
    pub fn data_json(&self) -> Option<&str> {
        self.data.as_deref()
    }

    /// How backends store one connection's info: JSON `[user_id, data]`.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn to_stored(&self) -> String {
        serde_json::to_string(&(&self.user_id, &self.data)).unwrap_or_default()
    }

    /// Reads [`to_stored`](Self::to_stored) output; `None` when malformed.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn from_stored(stored: &[u8]) -> Option<Self> {
        let (user_id, data): (String, Option<String>) = serde_json::from_slice(stored).ok()?;
        (!user_id.is_empty()).then_some(Self { user_id, data })
    }
}

/// Presence info that broke the limits of [`PresenceInfo`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid presence info: {0}")]
pub struct InvalidPresence(&'static str);

/// One user present in a group, with every connection it has there
/// (Phoenix's "metas": one user with three tabs is one member with three
/// connections).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceMember {
    user_id: String,
    connections: Vec<PresenceConnection>,
}

impl PresenceMember {
    /// The user id.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// The user's connections in the group, ordered by channel name.
    pub fn connections(&self) -> &[PresenceConnection] {
        &self.connections
    }
}

/// One connection of a [`PresenceMember`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceConnection {
    channel: String,
    data: Option<String>,
}

impl PresenceConnection {
    /// The connection's channel name.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The data it joined with, as JSON text.
    pub fn data_json(&self) -> Option<&str> {
        self.data.as_deref()
    }

    /// The data it joined with, decoded.
    pub fn data<T: DeserializeOwned>(&self) -> Result<Option<T>, EventCodecError> {
        self.data
            .as_deref()
            .map(|d| serde_json::from_str(d).map_err(EventCodecError::new))
            .transpose()
    }
}

/// Groups `(channel, info)` pairs by user, users and connections sorted.
pub(crate) fn group_by_user(
    entries: impl IntoIterator<Item = (String, PresenceInfo)>,
) -> Vec<PresenceMember> {
    let mut users: BTreeMap<String, Vec<PresenceConnection>> = BTreeMap::new();
    for (channel, info) in entries {
        users
            .entry(info.user_id)
            .or_default()
            .push(PresenceConnection {
                channel,
                data: info.data,
            });
    }
    users
        .into_iter()
        .map(|(user_id, mut connections)| {
            connections.sort_by(|a, b| a.channel.cmp(&b.channel));
            PresenceMember {
                user_id,
                connections,
            }
        })
        .collect()
}

/// The body of [`PRESENCE_JOIN`] and [`PRESENCE_LEAVE`] events: a user's
/// first connection to a group joined, or its last one left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PresenceChange {
    /// The user.
    pub user_id: String,
    /// The data of the connection that joined or left, as JSON text.
    pub data: Option<String>,
}

impl PresenceChange {
    pub(crate) fn new(info: &PresenceInfo) -> Self {
        Self {
            user_id: info.user_id.clone(),
            data: info.data.clone(),
        }
    }
}

/// How a layer keeps presence: which groups get join and leave
/// notifications, and how long a crashed process's members linger.
///
/// ```
/// use std::time::Duration;
/// use tower_channels::channel_layer::{GroupPattern, InMemoryChannelLayer, PresenceConfig};
///
/// let layer = InMemoryChannelLayer::new().with_presence(
///     PresenceConfig::new()
///         .notify(GroupPattern::prefix("chat_"))
///         .ttl(Duration::from_secs(10)),
/// );
/// # drop(layer);
/// ```
#[derive(Debug, Clone)]
pub struct PresenceConfig {
    notify: GroupPattern,
    ttl: Duration,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl PresenceConfig {
    /// No notifications, [`DEFAULT_PRESENCE_TTL`].
    pub fn new() -> Self {
        Self {
            notify: GroupPattern::none(),
            ttl: DEFAULT_PRESENCE_TTL,
        }
    }

    /// Groups whose members receive [`PRESENCE_JOIN`] and
    /// [`PRESENCE_LEAVE`] events (none by default). Collapsed per user: a
    /// user's first connection to the group is a join, its last a leave.
    pub fn notify(mut self, groups: GroupPattern) -> Self {
        self.notify = groups;
        self
    }

    /// How long the members of a process that stopped without leaving stay
    /// listed, at most (default [`DEFAULT_PRESENCE_TTL`], at least 300 ms).
    /// A live process refreshes its members every third of it, so the
    /// `presence.leave` of a crashed process's members, sent by the next
    /// live process to refresh the group, comes within TTL + TTL/3. Layers
    /// confined to one process ignore it: their members leave when their
    /// channel does.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_millis(300));
        self
    }

    /// Whether `group` gets join and leave notifications.
    pub fn notifies(&self, group: &str) -> bool {
        self.notify.matches(group)
    }

    /// The configured TTL.
    pub fn time_limit(&self) -> Duration {
        self.ttl
    }
}

/// Runs `leave(group)` for each of `groups` in a task: a channel's
/// receiver was dropped and it leaves its presence groups (the TTL covers
/// the case where this never runs, e.g. outside a runtime).
#[cfg(any(test, feature = "redis", feature = "nats"))]
pub(crate) fn leave_in_background<F, Fut>(groups: Vec<String>, leave: F)
where
    F: Fn(String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), super::ChannelLayerError>> + Send,
{
    if groups.is_empty() {
        return;
    }
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        for group in groups {
            if let Err(e) = leave(group.clone()).await {
                tracing::debug!(group, "presence leave on close failed: {e}");
            }
        }
    });
}

/// Calls `refresh` every third of `ttl` while `inner` lives: how a
/// process keeps its presence entries from expiring.
#[cfg(any(test, feature = "redis", feature = "nats"))]
pub(crate) async fn refresh_loop<T, F, Fut>(inner: std::sync::Weak<T>, ttl: Duration, refresh: F)
where
    F: Fn(std::sync::Arc<T>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let period = ttl / 3;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        refresh(inner).await;
    }
}

/// The presence entries of one process's channels.
#[derive(Debug, Default)]
pub(crate) struct LocalPresence {
    groups: HashMap<String, GroupPresence>,
    by_channel: HashMap<String, HashSet<String>>,
}

#[derive(Debug, Default)]
struct GroupPresence {
    entries: HashMap<String, PresenceInfo>,
    /// Connections per user.
    users: HashMap<String, usize>,
}

/// What a local join or leave changed.
#[derive(Debug)]
pub(crate) struct LocalChange {
    /// The info joined with or left with.
    pub(crate) info: PresenceInfo,
    /// The user's first local connection joined or its last one left.
    pub(crate) collapsed: bool,
}

impl LocalPresence {
    /// Records `channel`'s presence in `group`. A channel joining again
    /// replaces its info: the old one leaves first (returned second); when
    /// the user stays the same, neither counts as a join or a leave.
    pub(crate) fn join(
        &mut self,
        group: &str,
        channel: &str,
        info: PresenceInfo,
    ) -> (LocalChange, Option<LocalChange>) {
        let mut replaced = self.leave(group, channel);
        let g = self.groups.entry(group.to_owned()).or_default();
        let count = g.users.entry(info.user_id.clone()).or_default();
        *count += 1;
        let mut collapsed = *count == 1;
        if let Some(old) = replaced
            .as_mut()
            .filter(|old| old.info.user_id == info.user_id)
        {
            old.collapsed = false;
            collapsed = false;
        }
        g.entries.insert(channel.to_owned(), info.clone());
        self.by_channel
            .entry(channel.to_owned())
            .or_default()
            .insert(group.to_owned());
        (LocalChange { info, collapsed }, replaced)
    }

    /// Removes `channel`'s presence in `group`, if any.
    pub(crate) fn leave(&mut self, group: &str, channel: &str) -> Option<LocalChange> {
        let g = self.groups.get_mut(group)?;
        let info = g.entries.remove(channel)?;
        let mut collapsed = false;
        if let Some(count) = g.users.get_mut(&info.user_id) {
            *count -= 1;
            if *count == 0 {
                g.users.remove(&info.user_id);
                collapsed = true;
            }
        }
        if g.entries.is_empty() {
            self.groups.remove(group);
        }
        if let Some(groups) = self.by_channel.get_mut(channel) {
            groups.remove(group);
            if groups.is_empty() {
                self.by_channel.remove(channel);
            }
        }
        Some(LocalChange { info, collapsed })
    }

    /// Groups `channel` is present in.
    pub(crate) fn groups_of(&self, channel: &str) -> Vec<String> {
        self.by_channel
            .get(channel)
            .map(|g| g.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Groups with at least one local presence entry.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn group_names(&self) -> Vec<String> {
        self.groups.keys().cloned().collect()
    }

    /// Number of entries of `group`.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn len(&self, group: &str) -> usize {
        self.groups.get(group).map_or(0, |g| g.entries.len())
    }

    /// The entries of `group`.
    pub(crate) fn entries(&self, group: &str) -> Vec<(String, PresenceInfo)> {
        self.groups
            .get(group)
            .map(|g| {
                g.entries
                    .iter()
                    .map(|(c, i)| (c.clone(), i.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Forgets everything (`flush`).
    pub(crate) fn clear(&mut self) {
        self.groups.clear();
        self.by_channel.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(user: &str) -> PresenceInfo {
        PresenceInfo::new(user).unwrap()
    }

    #[test]
    fn limits() {
        assert!(PresenceInfo::new("x".repeat(MAX_USER_ID_LEN)).is_ok());
        assert!(PresenceInfo::new("x".repeat(MAX_USER_ID_LEN + 1)).is_err());
        let big = "x".repeat(MAX_PRESENCE_DATA);
        assert!(info("a").with_data(&big).is_err());
        let err = PresenceInfo::new("").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid presence info: the user id must not be empty"
        );
    }

    #[test]
    fn stored_roundtrip() {
        let i = info("bob").with_data(&[1, 2]).unwrap();
        assert_eq!(PresenceInfo::from_stored(i.to_stored().as_bytes()), Some(i));
        assert_eq!(PresenceInfo::from_stored(b"garbage"), None);
        assert_eq!(PresenceInfo::from_stored(br#"["",null]"#), None);
    }

    #[test]
    fn local_collapse_per_user() {
        let mut p = LocalPresence::default();
        assert!(p.join("g", "c1", info("a")).0.collapsed);
        assert!(!p.join("g", "c2", info("a")).0.collapsed);
        assert!(p.join("g", "c3", info("b")).0.collapsed);
        let members = group_by_user(p.entries("g"));
        assert_eq!(members.len(), 2);
        assert_eq!(members[0].user_id(), "a");
        assert_eq!(members[0].connections().len(), 2);
        assert!(!p.leave("g", "c1").unwrap().collapsed);
        assert!(p.leave("g", "c2").unwrap().collapsed);
        assert!(p.leave("g", "c2").is_none());
        assert_eq!(p.groups_of("c3"), vec!["g".to_owned()]);
        // Re-joining replaces the old info.
        let (joined, replaced) = p.join("g", "c3", info("c"));
        assert!(joined.collapsed);
        assert!(replaced.unwrap().collapsed);
        assert_eq!(group_by_user(p.entries("g"))[0].user_id(), "c");
        // The same user joining again with new data is neither a leave nor a join.
        let (joined, replaced) = p.join("g", "c3", info("c").with_data(&1).unwrap());
        assert!(!joined.collapsed);
        assert!(!replaced.unwrap().collapsed);
        assert_eq!(p.entries("g")[0].1.data_json(), Some("1"));
    }
}
