//! The one envelope every mesh message travels in: the sending process, a
//! sequence number (unique per process, also the request id), and one
//! operation.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::channel_layer::{ChannelLayerError, EventCodecError};

/// `[origin, seq, op]` as a MessagePack array.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Envelope<'a> {
    /// The sending process; replies go to its process subject.
    pub(crate) origin: &'a str,
    /// Unique per origin: duplicates are recognised by it, and requests
    /// are answered with it.
    pub(crate) seq: u64,
    #[serde(borrow)]
    pub(crate) op: Op<'a>,
}

/// What a message asks.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Op<'a> {
    /// An event for every local member of `group`.
    Group {
        group: &'a str,
        #[serde(with = "serde_bytes")]
        event: &'a [u8],
    },
    /// An event for one channel; answered with a [`Op::Reply`].
    Channel {
        channel: &'a str,
        #[serde(with = "serde_bytes")]
        event: &'a [u8],
    },
    /// Add `channel` (of the receiving process) to `group`; answered.
    Join { group: &'a str, channel: &'a str },
    /// Remove `channel` from `group`; answered.
    Leave { group: &'a str, channel: &'a str },
    /// The answer to the request `seq` of the receiving process.
    Reply { request: u64, status: Status },
}

/// How a request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Status {
    Ok,
    NoSuchChannel,
    ChannelFull,
    /// The receiving process could not do it (e.g. subscribe).
    Failed,
}

impl<'a> Envelope<'a> {
    pub(crate) fn to_bytes(&self) -> Result<Vec<u8>, ChannelLayerError> {
        rmp_serde::to_vec(self)
            .map_err(|e| EventCodecError::new(format_args!("mesh envelope: {e}")).into())
    }

    pub(crate) fn from_bytes(bytes: &'a [u8]) -> Result<Self, EventCodecError> {
        rmp_serde::from_slice(bytes)
            .map_err(|e| EventCodecError::new(format_args!("mesh envelope: {e}")))
    }
}

/// Sequence numbers remembered per origin, below the highest seen.
pub(crate) const DEDUP_WINDOW: u64 = 1024;
/// Origins remembered; past this the oldest-inserted half is forgotten
/// (their late duplicates could then be delivered again).
pub(crate) const DEDUP_ORIGINS: usize = 4096;

/// Recognises messages seen before (a broker or network that duplicates):
/// per origin, the sequence numbers within [`DEDUP_WINDOW`] of the highest
/// one seen. A message older than the window counts as seen (dropped: at
/// most once). Memory: at most [`DEDUP_ORIGINS`] × [`DEDUP_WINDOW`] numbers.
#[derive(Debug, Default)]
pub(crate) struct Dedup {
    origins: HashMap<String, Window>,
}

#[derive(Debug, Default)]
struct Window {
    top: u64,
    seen: BTreeSet<u64>,
}

impl Dedup {
    /// Whether `(origin, seq)` is new; records it.
    pub(crate) fn first_time(&mut self, origin: &str, seq: u64) -> bool {
        if !self.origins.contains_key(origin) && self.origins.len() >= DEDUP_ORIGINS {
            let forget: Vec<String> = self
                .origins
                .keys()
                .take(DEDUP_ORIGINS / 2)
                .cloned()
                .collect();
            for origin in forget {
                self.origins.remove(&origin);
            }
        }
        let window = self.origins.entry(origin.to_owned()).or_default();
        if seq + DEDUP_WINDOW <= window.top || !window.seen.insert(seq) {
            return false;
        }
        if seq > window.top {
            window.top = seq;
            let floor = seq.saturating_sub(DEDUP_WINDOW);
            while window.seen.first().is_some_and(|&first| first < floor) {
                window.seen.pop_first();
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_garbage() {
        let env = Envelope {
            origin: "specific.a",
            seq: 7,
            op: Op::Channel {
                channel: "specific.b!1",
                event: b"xyz",
            },
        };
        let bytes = env.to_bytes().unwrap();
        let back = Envelope::from_bytes(&bytes).unwrap();
        assert_eq!((back.origin, back.seq), ("specific.a", 7));
        assert!(
            matches!(back.op, Op::Channel { channel: "specific.b!1", event } if event == b"xyz")
        );
        assert!(Envelope::from_bytes(b"\xc1garbage").is_err());
        assert!(Envelope::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn dedup_window() {
        let mut d = Dedup::default();
        assert!(d.first_time("a", 1));
        assert!(!d.first_time("a", 1));
        assert!(d.first_time("a", 3));
        assert!(d.first_time("a", 2), "reordered, not a duplicate");
        assert!(d.first_time("b", 1), "per origin");
        assert!(d.first_time("a", 3 + DEDUP_WINDOW));
        assert!(!d.first_time("a", 3), "older than the window");
    }
}
