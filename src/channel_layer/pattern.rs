use std::fmt;

/// Which groups a layer feature applies to: one group, every group whose
/// name starts with a prefix, or every group.
///
/// Used by [`HistoryPolicy`](super::HistoryPolicy) and
/// [`PresenceConfig::notify`](super::PresenceConfig::notify).
///
/// ```
/// use tower_channels::channel_layer::GroupPattern;
///
/// let rooms = GroupPattern::prefix("chat_");
/// assert!(rooms.matches("chat_lobby"));
/// assert!(!rooms.matches("news"));
/// assert!(GroupPattern::exact("news").matches("news"));
/// assert!(GroupPattern::any().matches("anything"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct GroupPattern(Kind);

#[derive(Clone, PartialEq, Eq)]
enum Kind {
    Exact(String),
    Prefix(String),
    Any,
    None,
}

impl GroupPattern {
    /// The group named `name`.
    pub fn exact(name: impl Into<String>) -> Self {
        Self(Kind::Exact(name.into()))
    }

    /// Every group whose name starts with `prefix`.
    pub fn prefix(prefix: impl Into<String>) -> Self {
        Self(Kind::Prefix(prefix.into()))
    }

    /// Every group.
    pub fn any() -> Self {
        Self(Kind::Any)
    }

    /// No group.
    pub fn none() -> Self {
        Self(Kind::None)
    }

    /// Whether `group` matches.
    pub fn matches(&self, group: &str) -> bool {
        match &self.0 {
            Kind::Exact(name) => name == group,
            Kind::Prefix(prefix) => group.starts_with(prefix.as_str()),
            Kind::Any => true,
            Kind::None => false,
        }
    }
}

impl fmt::Debug for GroupPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Kind::Exact(name) => write!(f, "GroupPattern::exact({name:?})"),
            Kind::Prefix(prefix) => write!(f, "GroupPattern::prefix({prefix:?})"),
            Kind::Any => f.write_str("GroupPattern::any()"),
            Kind::None => f.write_str("GroupPattern::none()"),
        }
    }
}
