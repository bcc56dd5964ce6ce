//! The payload of a fast-lane group send, shared by every member.
//!
//! A value type, below both the channel layer (an [`Event`] carries one) and
//! the engine (whose frame writer compresses and writes it), so neither
//! imports the other: the engine hands its deflate function to
//! [`SharedPayload::compressed_with`] and its header encoder to
//! [`SharedPayload::plain_header_with`], and this module keeps the results.
//!
//! [`Event`]: crate::channel_layer::Event

use std::{
    fmt,
    sync::{Arc, Mutex, OnceLock},
};

use bytes::Bytes;

use crate::message::Utf8Bytes;

/// A data payload shared by many connections (a fast-lane group send). Holds
/// the plain bytes and caches the compressed form per distinct
/// `(server_max_window_bits, level)`, so 1,000 members that negotiated the same
/// params cost one compression (only valid with `server_no_context_takeover`;
/// with context takeover each connection compresses itself).
#[derive(Clone)]
pub(crate) struct SharedPayload(Arc<Shared>);

struct Shared {
    text: bool,
    plain: Bytes,
    /// `(window_bits, level, compressed)`; `None`: deflate failed (sent plain).
    compressed: Mutex<Vec<(u8, u32, Option<Bytes>)>>,
    /// The frame header of the plain payload, encoded by the first member's
    /// writer and copied by the others (server frames are unmasked, so
    /// every member sends the same header).
    plain_header: OnceLock<FrameHeaderBytes>,
    #[cfg(test)]
    compressions: std::sync::atomic::AtomicUsize,
}

impl SharedPayload {
    fn new(text: bool, plain: Bytes) -> Self {
        Self(Arc::new(Shared {
            text,
            plain,
            compressed: Mutex::new(Vec::new()),
            plain_header: OnceLock::new(),
            #[cfg(test)]
            compressions: std::sync::atomic::AtomicUsize::new(0),
        }))
    }

    /// A text payload.
    pub(crate) fn text(t: Utf8Bytes) -> Self {
        Self::new(true, t.into())
    }

    /// A binary payload.
    pub(crate) fn binary(b: Bytes) -> Self {
        Self::new(false, b)
    }

    /// Plain payload length.
    pub(crate) fn len(&self) -> usize {
        self.0.plain.len()
    }

    /// Whether the plain payload is empty.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.plain.is_empty()
    }

    /// Whether this is a text payload.
    pub(crate) fn is_text(&self) -> bool {
        self.0.text
    }

    /// The plain bytes.
    pub(crate) fn plain(&self) -> &Bytes {
        &self.0.plain
    }

    /// The payload compressed for `(window_bits, level)` by `compress` (the
    /// engine's deflate without context takeover), computed on first use and
    /// cached; `None` only if deflate failed. It may be longer than the
    /// payload: the writer decides.
    pub(crate) fn compressed_with(
        &self,
        window_bits: u8,
        level: u32,
        compress: impl FnOnce(&[u8]) -> Option<Vec<u8>>,
    ) -> Option<Bytes> {
        // Compress under the lock: concurrent members wait for the one
        // compression instead of racing to do it twice.
        let mut cache = self
            .0
            .compressed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((_, _, c)) = cache
            .iter()
            .find(|(b, l, _)| *b == window_bits && *l == level)
        {
            return c.clone();
        }
        #[cfg(test)]
        self.0
            .compressions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let c = compress(&self.0.plain).map(Bytes::from);
        cache.push((window_bits, level, c.clone()));
        c
    }

    /// The plain payload's frame header, encoded by `encode` on first use
    /// and shared by every member after it: a group send's header is
    /// encoded once, as its payload is compressed once.
    pub(crate) fn plain_header_with(
        &self,
        encode: impl FnOnce() -> FrameHeaderBytes,
    ) -> &FrameHeaderBytes {
        self.0.plain_header.get_or_init(encode)
    }

    /// How many times this payload was compressed (tests).
    #[cfg(test)]
    pub(crate) fn compressions(&self) -> usize {
        self.0
            .compressions
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// An encoded WebSocket frame header (at most 14 bytes: 2, 8 for a 64-bit
/// length, 4 for a client's mask).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameHeaderBytes {
    bytes: [u8; 14],
    len: u8,
}

impl FrameHeaderBytes {
    /// The header held in `bytes[..len]`.
    pub(crate) fn new(bytes: [u8; 14], len: usize) -> Self {
        Self {
            bytes,
            len: len.min(14) as u8,
        }
    }

    /// The encoded bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl fmt::Debug for SharedPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedPayload")
            .field("text", &self.0.text)
            .field("len", &self.0.plain.len())
            .finish_non_exhaustive()
    }
}
