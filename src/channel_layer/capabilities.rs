//! What a channel layer supports beyond the core API, so an application
//! can check at startup instead of failing on first use.

use std::fmt;

use super::ChannelLayerError;

/// An optional feature of a [`ChannelLayer`](super::ChannelLayer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Feature {
    /// [`presence_join`](super::ChannelLayer::presence_join),
    /// [`presence`](super::ChannelLayer::presence) and join/leave events.
    Presence,
    /// Group histories with offsets and
    /// [`recover`](super::ChannelLayer::recover).
    History,
    /// Named channels (no `!`, such as worker channels) as group members.
    NamedGroupMembers,
    /// Groups and sends that reach other processes.
    CrossProcess,
}

impl Feature {
    /// The name used in [`ChannelLayerError::Unsupported`].
    pub fn name(self) -> &'static str {
        match self {
            Feature::Presence => "presence",
            Feature::History => "history",
            Feature::NamedGroupMembers => "named channels as group members",
            Feature::CrossProcess => "delivery across processes",
        }
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The optional [`Feature`]s a layer supports, from
/// [`ChannelLayer::capabilities`](super::ChannelLayer::capabilities).
///
/// Check them where the application starts, so a layer that cannot do
/// what the consumers need fails there, once, with a clear error, and not
/// on every connection:
///
/// ```
/// use tower_channels::channel_layer::{
///     ChannelLayer, Feature, GroupPattern, HistoryPolicy, InMemoryChannelLayer,
/// };
///
/// let layer = InMemoryChannelLayer::new();
/// // History is reported once the layer keeps one:
/// assert!(layer.capabilities().require(&[Feature::History]).is_err());
/// let layer = layer.with_history(HistoryPolicy::new(GroupPattern::prefix("room.")));
/// layer.capabilities().require(&[Feature::Presence, Feature::History])?;
/// assert!(!layer.capabilities().supports(Feature::CrossProcess));
/// # Ok::<_, tower_channels::channel_layer::ChannelLayerError>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    presence: bool,
    history: bool,
    named_group_members: bool,
    cross_process: bool,
}

impl Capabilities {
    /// No optional feature (what [`ChannelLayer`](super::ChannelLayer)'s
    /// default reports).
    pub const NONE: Capabilities = Capabilities {
        presence: false,
        history: false,
        named_group_members: false,
        cross_process: false,
    };

    /// `self` with `feature` supported (for backends reporting theirs).
    #[must_use]
    pub const fn with(mut self, feature: Feature) -> Self {
        match feature {
            Feature::Presence => self.presence = true,
            Feature::History => self.history = true,
            Feature::NamedGroupMembers => self.named_group_members = true,
            Feature::CrossProcess => self.cross_process = true,
        }
        self
    }

    /// Whether `feature` is supported.
    pub const fn supports(&self, feature: Feature) -> bool {
        match feature {
            Feature::Presence => self.presence,
            Feature::History => self.history,
            Feature::NamedGroupMembers => self.named_group_members,
            Feature::CrossProcess => self.cross_process,
        }
    }

    /// Fails with [`ChannelLayerError::Unsupported`] naming the first of
    /// `features` that is not supported.
    pub fn require(&self, features: &[Feature]) -> Result<(), ChannelLayerError> {
        match features.iter().find(|f| !self.supports(**f)) {
            Some(feature) => Err(ChannelLayerError::Unsupported {
                feature: feature.name(),
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_names_the_missing_feature() {
        let caps = Capabilities::NONE.with(Feature::History);
        assert!(caps.supports(Feature::History));
        assert!(caps.require(&[Feature::History]).is_ok());
        let err = caps
            .require(&[Feature::History, Feature::Presence])
            .unwrap_err();
        assert!(err.is_unsupported());
        assert!(err.to_string().contains("presence"), "{err}");
        assert_eq!(Capabilities::default(), Capabilities::NONE);
    }
}
