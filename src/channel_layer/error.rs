use std::fmt;

/// A boxed error, the error type of backends and consumers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a channel or group name was refused.
///
/// Names follow Django Channels: ASCII letters, digits, `-`, `_` and `.`,
/// shorter than 100 characters. A channel name may carry one `!` that splits
/// it into a process part and a local part (`specific.abc!42`); group names may not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} name {name:?}: {reason}")]
pub struct InvalidName {
    pub(crate) kind: NameKind,
    pub(crate) name: String,
    pub(crate) reason: &'static str,
}

impl InvalidName {
    /// The refused name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Why it was refused, e.g. `"must be shorter than 100 characters"`.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NameKind {
    Channel,
    Group,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Channel => "channel",
            NameKind::Group => "group",
        })
    }
}

/// An error from a [`ChannelLayer`](super::ChannelLayer) operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelLayerError {
    /// A channel or group name broke the naming rules.
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    /// A direct send met a full channel; the event was not delivered.
    #[error("channel {channel:?} is full")]
    ChannelFull {
        /// The full channel.
        channel: String,
    },
    /// A direct send named a channel nobody receives (its consumer disconnected,
    /// or it was never created on this layer); the event was not delivered.
    #[error("no receiver for channel {channel:?}")]
    NoSuchChannel {
        /// The channel that has no receiver.
        channel: String,
    },
    /// The event could not be encoded or decoded for the wire.
    #[error("event codec error")]
    Codec(#[from] EventCodecError),
    /// Presence info broke the limits of
    /// [`PresenceInfo`](super::PresenceInfo).
    #[error(transparent)]
    InvalidPresence(#[from] super::InvalidPresence),
    /// The backend does not implement this feature (presence, history).
    #[error("this channel layer does not support {feature}")]
    Unsupported {
        /// The missing feature, e.g. `"presence"`.
        feature: &'static str,
    },
    /// [`recover`](super::ChannelLayer::recover) was asked for a group
    /// that no [`HistoryPolicy`](super::HistoryPolicy) applies to.
    #[error("group {group:?} keeps no history")]
    NoHistory {
        /// The group.
        group: String,
    },
    /// The backend failed (for example Redis is unreachable).
    #[error("channel layer backend error")]
    Backend(#[source] BoxError),
}

/// `err` and its sources joined by `: `, for tests that look for a cause.
#[cfg(all(
    test,
    any(feature = "redis-cluster", feature = "nats", feature = "testing")
))]
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(err), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

impl ChannelLayerError {
    /// Wraps a backend error.
    pub fn backend(err: impl Into<BoxError>) -> Self {
        ChannelLayerError::Backend(err.into())
    }

    /// Whether this is [`ChannelLayerError::Unsupported`].
    pub fn is_unsupported(&self) -> bool {
        matches!(self, ChannelLayerError::Unsupported { .. })
    }

    /// Whether this is [`ChannelLayerError::ChannelFull`].
    pub fn is_channel_full(&self) -> bool {
        matches!(self, ChannelLayerError::ChannelFull { .. })
    }
}

/// An event body could not be encoded, decoded, or converted to the requested type.
///
/// Its Display says what failed (e.g. `event "chat.message": decoding the
/// body`); the serializer's own error, when there is one, is its
/// [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct EventCodecError {
    msg: String,
    #[source]
    source: Option<BoxError>,
}

impl EventCodecError {
    pub(crate) fn new(msg: impl fmt::Display) -> Self {
        Self {
            msg: msg.to_string(),
            source: None,
        }
    }

    /// What failed (`msg`), caused by `source`.
    pub(crate) fn caused(msg: impl fmt::Display, source: impl Into<BoxError>) -> Self {
        Self {
            msg: msg.to_string(),
            source: Some(source.into()),
        }
    }
}
