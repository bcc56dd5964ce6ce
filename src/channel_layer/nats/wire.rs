//! The envelope every NATS message of the layer travels in: a MessagePack
//! array `[origin, op, group, channel, event]`.

use serde::{Deserialize, Serialize};

use crate::channel_layer::{ChannelLayerError, Event, EventCodecError};

/// An event for every local member of `group`.
pub(super) const OP_GROUP_EVENT: u8 = 0;
/// An event for `channel` (a request, answered with a status byte).
pub(super) const OP_CHANNEL_EVENT: u8 = 1;
/// Add `channel` (owned by the receiving process) to `group` (a request).
pub(super) const OP_GROUP_ADD: u8 = 2;
/// Remove `channel` from `group` (a request).
pub(super) const OP_GROUP_DISCARD: u8 = 3;

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Envelope<'a> {
    /// The sending process (`specific.<token>`).
    pub(super) origin: &'a str,
    pub(super) op: u8,
    pub(super) group: &'a str,
    pub(super) channel: &'a str,
    /// An [`Event::encode`]d event, or empty.
    #[serde(with = "serde_bytes")]
    pub(super) event: &'a [u8],
}

impl<'a> Envelope<'a> {
    pub(super) fn control(origin: &'a str, op: u8, group: &'a str, channel: &'a str) -> Self {
        Envelope {
            origin,
            op,
            group,
            channel,
            event: &[],
        }
    }

    pub(super) fn to_bytes(&self) -> Result<Vec<u8>, ChannelLayerError> {
        rmp_serde::to_vec(self)
            .map_err(|e| EventCodecError::new(format_args!("envelope: {e}")).into())
    }

    pub(super) fn from_bytes(bytes: &'a [u8]) -> Result<Self, EventCodecError> {
        rmp_serde::from_slice(bytes)
            .map_err(|e| EventCodecError::new(format_args!("malformed envelope: {e}")))
    }

    pub(super) fn decode_event(&self) -> Result<Event, EventCodecError> {
        Event::decode(self.event)
    }
}

/// Encodes `event` once and wraps it.
pub(super) fn event_envelope(
    origin: &str,
    op: u8,
    group: &str,
    channel: &str,
    event: &Event,
) -> Result<Vec<u8>, ChannelLayerError> {
    let encoded = event.encode()?;
    Envelope {
        origin,
        op,
        group,
        channel,
        event: &encoded,
    }
    .to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_garbage() {
        let bytes =
            event_envelope("specific.a", OP_GROUP_EVENT, "lobby", "", &Event::bare("x")).unwrap();
        let env = Envelope::from_bytes(&bytes).unwrap();
        assert_eq!(
            (env.origin, env.op, env.group),
            ("specific.a", OP_GROUP_EVENT, "lobby")
        );
        assert_eq!(env.decode_event().unwrap().kind(), "x");
        assert!(Envelope::from_bytes(b"\x01").is_err());
    }
}
