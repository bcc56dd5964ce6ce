//! The message-level WebSocket codec and permessage-deflate (RFC 6455 + RFC 7692).
//!
//! tungstenite stays the source of the wire primitives: frame headers are
//! parsed and formatted by `tungstenite::protocol::frame::FrameHeader`, opcodes
//! and close-code classes come from `tungstenite::protocol::frame::coding`.
//! What tungstenite does not let us extend lives here: the message state
//! machine (fragmentation, control frames between fragments, streaming UTF-8
//! validation with the standard library), the size limits, and
//! permessage-deflate, done by `flate2` (pure-Rust `zlib-rs` backend, raw
//! deflate with window bits).
//!
//! * [`negotiate`] reads the client's `Sec-WebSocket-Extensions` offers and
//!   answers one of them ([`DeflateParams`] + the response header value).
//! * [`FrameReader`] turns bytes from an `AsyncRead` into
//!   [`Message`](crate::message::Message)s (data messages and control frames), inflating compressed messages and checking the
//!   message size limit on the *inflated* size while inflating.
//! * [`FrameWriter`] encodes [`Outbound`] messages (the engine's queue items), compresses data messages
//!   at or above the threshold, and writes the queue with vectored writes
//!   (small frames are copied into one buffer, large payloads are written
//!   from their shared `Bytes` without a copy) before one flush.
//! * [`SharedPayload`](crate::payload::SharedPayload) is a group-send payload that caches its compressed form
//!   per `(server_max_window_bits, level)`: 1,000 members that negotiated the
//!   same parameters cost one compression.
//!
//! ```ignore
//! // How the engine drives it (crate-private, so this is not compiled).
//! let (params, answer) = wire::negotiate(req.headers().get_all(SEC_WEBSOCKET_EXTENSIONS), &cfg)
//!     .map_or((None, None), |(p, h)| (Some(p), Some(h)));
//! let mut reader = FrameReader::new(limits, params, config.read_buffer_size);
//! let mut writer = FrameWriter::new(params, config.write_buffer_size);
//! while let Some(msg) = poll_fn(|cx| reader.poll_read(&mut io_read, cx)).await? {
//!     if let Message::Ping(p) = msg { writer.queue(&Outbound::Message(Message::Pong(p))); }
//!     poll_fn(|cx| writer.poll_flush(&mut io_write, cx)).await?;
//! }
//! ```
//!
//! # Memory
//!
//! Without context takeover (the default both ways) no compressor or
//! decompressor belongs to a connection: one is taken from a per-thread pool
//! (at most [`deflate::POOL_MAX`] of each kind per thread) for the duration of
//! one message and reset before it goes back. Once a message is read and
//! nothing more is buffered the read buffer is released (the next read goes
//! to the stack first), and the write buffer is released once the queue is
//! written, so an idle connection with deflate negotiated holds
//! (measured by the `idle_connection_memory_with_deflate` test after one
//! compressed message each way, x86-64):
//!
//! | what | bytes |
//! |---|---|
//! | `FrameReader` struct | 440 |
//! | `FrameWriter` struct | 240 |
//! | read buffer | 0 |
//! | write buffer | 0 |
//! | deflate state | 0 |
//! | total | 680 |
//!
//! A whole idle connection (task, engine, link, scope, channel, socket) is
//! about 5.5 KiB of heap; `bench/deflate.sh` reports the server's RSS per
//! idle connection with and without deflate.
//!
//! With context takeover the connection owns its compressor / decompressor
//! between messages (see `context_takeover_memory`).
//!
//! # Crates considered
//!
//! Checked for RFC 7692 over hyper 1's upgraded IO *and* the ability to write
//! one pre-compressed frame to many connections:
//!
//! * **yawc** (0.3): RFC 6455 + RFC 7692 on tokio IO, Autobahn-clean, with an
//!   axum extractor and window bits via zlib. Compression state lives inside
//!   each `WebSocket`, so a group send compresses once per member; there is
//!   no way to hand it an already-compressed payload for an RSV1 frame, and
//!   it would replace tungstenite (the design card's choice) wholesale.
//! * **fastwebsockets** (0.10): fast frame layer over hyper upgrades, but no
//!   permessage-deflate at all (RSV1 frames are rejected).
//! * **tokio-websockets** (0.12): tokio codec, no permessage-deflate
//!   (declined upstream so far); we would still write the extension ourselves.
//! * **soketto** (0.8): `futures` IO, a deflate extension "mostly conformant
//!   with RFC 7692" owned by each connection, no shared pre-compressed frames,
//!   and a second IO trait family next to tokio's.
//! * **ratchet_deflate** / **ws-deflate style crates**: per-connection
//!   encoders tied to their own WebSocket types (ratchet); none exposes
//!   "compress once, frame many".
//!
//! So the codec is ours on top of tungstenite's primitives, and deflate is
//! flate2's.

// Used by the engine (issue 9): the engine helper plugs this module in; until
// then much of it is reached only from the tests below.
#![allow(dead_code, unused_imports)]

pub(crate) mod deflate;
mod negotiate;
mod reader;
mod writer;

use crate::message::{close_code, CloseCode};

pub(crate) use self::{
    negotiate::{negotiate, DeflateParams},
    reader::FrameReader,
    writer::{FrameWriter, Outbound},
};

/// Limits the decoder enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WireLimits {
    /// Largest message, after reassembly and after inflating.
    pub(crate) max_message_size: usize,
    /// Largest single frame payload (as received, i.e. compressed).
    pub(crate) max_frame_size: usize,
    /// Inflated bytes per second and burst (`crate::InflateLimit`), if bounded.
    pub(crate) inflate: Option<(u64, u64)>,
}

/// A protocol violation by the peer; the engine closes with
/// [`close_code`](Self::close_code) and [`reason`](Self::reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProtocolError {
    /// A reserved opcode (3-7, 11-15).
    #[error("reserved opcode")]
    BadOpcode,
    /// RSV2 or RSV3 set, or RSV1 on a control or continuation frame.
    #[error("reserved bits set")]
    ReservedBits,
    /// RSV1 set although permessage-deflate was not negotiated.
    #[error("compressed frame without negotiated compression")]
    CompressionNotNegotiated,
    /// A client frame without a mask (RFC 6455 section 5.1).
    #[error("unmasked client frame")]
    UnmaskedFrame,
    /// A control frame with FIN clear.
    #[error("fragmented control frame")]
    FragmentedControl,
    /// A control frame payload above 125 bytes.
    #[error("control frame payload above 125 bytes")]
    ControlTooLarge,
    /// A continuation frame with no message to continue.
    #[error("continuation frame without a message")]
    UnexpectedContinuation,
    /// A new text or binary frame while a fragmented message is unfinished.
    #[error("data frame inside a fragmented message")]
    ExpectedContinuation,
    /// A frame payload above `max_frame_size`.
    #[error("frame too large")]
    FrameTooLarge,
    /// A message above `max_message_size` (for compressed messages: inflated).
    #[error("message too large")]
    MessageTooLarge,
    /// A text message that is not UTF-8.
    #[error("invalid utf-8 in a text message")]
    InvalidUtf8,
    /// A close reason that is not UTF-8.
    #[error("invalid utf-8 in a close reason")]
    InvalidCloseReason,
    /// A close code that must not be sent (RFC 6455 section 7.4).
    #[error("invalid close code")]
    InvalidCloseCode,
    /// A close payload of exactly one byte.
    #[error("close payload of one byte")]
    CloseTooShort,
    /// Compressed data that does not inflate.
    #[error("invalid compressed data")]
    InvalidDeflate,
    /// Compressed messages inflating faster than `inflate_limit` allows.
    #[error("inflate rate exceeded")]
    InflateRateExceeded,
}

impl ProtocolError {
    /// The close code to send for this violation.
    pub(crate) fn close_code(&self) -> CloseCode {
        match self {
            Self::FrameTooLarge | Self::MessageTooLarge => close_code::SIZE,
            Self::InvalidUtf8 | Self::InvalidCloseReason | Self::InvalidDeflate => {
                close_code::INVALID
            }
            Self::BadOpcode
            | Self::ReservedBits
            | Self::CompressionNotNegotiated
            | Self::UnmaskedFrame
            | Self::FragmentedControl
            | Self::ControlTooLarge
            | Self::UnexpectedContinuation
            | Self::ExpectedContinuation
            | Self::InvalidCloseCode
            | Self::CloseTooShort => close_code::PROTOCOL,
            Self::InflateRateExceeded => close_code::POLICY,
        }
    }

    /// The close reason to send (short, ASCII, fits a close frame).
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::BadOpcode => "reserved opcode",
            Self::InflateRateExceeded => "inflate rate exceeded",
            Self::ReservedBits => "reserved bits set",
            Self::CompressionNotNegotiated => "compressed frame without negotiated compression",
            Self::UnmaskedFrame => "unmasked client frame",
            Self::FragmentedControl => "fragmented control frame",
            Self::ControlTooLarge => "control frame payload above 125 bytes",
            Self::UnexpectedContinuation => "continuation frame without a message",
            Self::ExpectedContinuation => "data frame inside a fragmented message",
            Self::FrameTooLarge => "frame too large",
            Self::MessageTooLarge => "message too large",
            Self::InvalidUtf8 => "invalid utf-8 in a text message",
            Self::InvalidCloseReason => "invalid utf-8 in a close reason",
            Self::InvalidCloseCode => "invalid close code",
            Self::CloseTooShort => "close payload of one byte",
            Self::InvalidDeflate => "invalid compressed data",
        }
    }
}

/// Why [`FrameReader::poll_read`] failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    /// Reading the socket failed (or it ended inside a frame or message).
    #[error("websocket read failed")]
    Io(#[source] std::io::Error),
    /// The peer violated the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

impl From<std::io::Error> for WireError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_fit_a_close_frame_and_match_display() {
        let all = [
            ProtocolError::BadOpcode,
            ProtocolError::ReservedBits,
            ProtocolError::CompressionNotNegotiated,
            ProtocolError::UnmaskedFrame,
            ProtocolError::FragmentedControl,
            ProtocolError::ControlTooLarge,
            ProtocolError::UnexpectedContinuation,
            ProtocolError::ExpectedContinuation,
            ProtocolError::FrameTooLarge,
            ProtocolError::MessageTooLarge,
            ProtocolError::InvalidUtf8,
            ProtocolError::InvalidCloseReason,
            ProtocolError::InvalidCloseCode,
            ProtocolError::CloseTooShort,
            ProtocolError::InvalidDeflate,
        ];
        for e in all {
            assert!(e.reason().len() <= 123);
            assert_eq!(e.to_string(), e.reason());
            assert!(matches!(e.close_code(), 1002 | 1007 | 1009));
        }
        assert_eq!(ProtocolError::MessageTooLarge.close_code(), 1009);
        assert_eq!(ProtocolError::InvalidDeflate.close_code(), 1007);
        assert_eq!(ProtocolError::CloseTooShort.close_code(), 1002);
    }
}
