//! The envelope every Redis message travels in (see the module docs' "Wire format").

use serde::{Deserialize, Serialize};

use crate::channel_layer::{ChannelLayerError, Event, EventCodecError};

/// An event for every local member of `group` (on `{prefix}:group:{group}`,
/// and pushed as is onto the lists of named channels in the group).
pub(super) const OP_GROUP_EVENT: u8 = 0;
/// An event for one channel (on `{prefix}:proc:{process}` or a named channel's list).
pub(super) const OP_CHANNEL_EVENT: u8 = 1;
/// Add `channel` (owned by the receiving process) to `group`; answered with a reply.
pub(super) const OP_GROUP_ADD: u8 = 2;
/// Remove `channel` from `group`; answered with a reply.
pub(super) const OP_GROUP_DISCARD: u8 = 3;
/// Reply to request `id`: done.
pub(super) const OP_REPLY_OK: u8 = 4;
/// Reply to request `id`: the process has no such channel.
pub(super) const OP_REPLY_NO_SUCH_CHANNEL: u8 = 5;
/// Reply to request `id`: the process could not subscribe to the group.
pub(super) const OP_REPLY_FAILED: u8 = 6;

/// `[origin, op, id, group, channel, event]` as a MessagePack array.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Envelope<'a> {
    /// The sending process (`specific.<token>`), where replies go.
    pub(super) origin: &'a str,
    pub(super) op: u8,
    /// Request id for group add/discard and their replies, else 0.
    pub(super) id: u64,
    pub(super) group: &'a str,
    pub(super) channel: &'a str,
    /// An [`Event::encode`]d event, or empty.
    #[serde(with = "serde_bytes")]
    pub(super) event: &'a [u8],
}

impl<'a> Envelope<'a> {
    pub(super) fn control(
        origin: &'a str,
        op: u8,
        id: u64,
        group: &'a str,
        channel: &'a str,
    ) -> Self {
        Envelope {
            origin,
            op,
            id,
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
        id: 0,
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
        let bytes = event_envelope(
            "specific.abc",
            OP_GROUP_EVENT,
            "lobby",
            "",
            &Event::text("chat.message", "hi"),
        )
        .unwrap();
        let env = Envelope::from_bytes(&bytes).unwrap();
        assert_eq!(
            (env.origin, env.op, env.group),
            ("specific.abc", OP_GROUP_EVENT, "lobby")
        );
        assert_eq!(env.decode_event().unwrap().kind(), "chat.message");
        assert!(Envelope::from_bytes(b"\x01\x02").is_err());
        assert!(Envelope::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    }
}
