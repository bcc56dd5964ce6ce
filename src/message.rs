//! WebSocket messages as the crate's own types.
//!
//! These mirror axum's `Message`: no type of the WebSocket implementation
//! underneath is part of the API, so upgrading it never breaks your code.
//!
//! ```
//! use tower_channels::message::{close_code, CloseFrame, Message};
//!
//! let hello = Message::text("hello");
//! assert_eq!(hello.as_text(), Some("hello"));
//!
//! let bye = Message::Close(Some(CloseFrame::new(close_code::NORMAL, "done")));
//! assert!(bye.is_close());
//! ```

use std::{fmt, ops::Deref};

use bytes::Bytes;
use tungstenite as ts;

/// A WebSocket close code (RFC 6455 section 7.4).
///
/// See [`close_code`] for the codes this crate uses.
pub type CloseCode = u16;

/// Close codes used by this crate, from RFC 6455 section 7.4.1 plus the
/// application codes the crate defines in the 4000-4999 range.
pub mod close_code {
    use super::CloseCode;

    /// 1000: normal closure; the purpose of the connection was fulfilled.
    pub const NORMAL: CloseCode = 1000;
    /// 1001: the endpoint is going away (server shutdown, page navigation).
    pub const AWAY: CloseCode = 1001;
    /// 1002: the peer violated the WebSocket protocol.
    pub const PROTOCOL: CloseCode = 1002;
    /// 1003: the endpoint received data of a type it cannot accept.
    pub const UNSUPPORTED: CloseCode = 1003;
    /// 1005: no status code was present (never sent on the wire).
    pub const STATUS: CloseCode = 1005;
    /// 1006: the connection was closed without a closing handshake (never sent on the wire).
    pub const ABNORMAL: CloseCode = 1006;
    /// 1007: a message's payload was inconsistent with its type (e.g. invalid UTF-8 or JSON).
    pub const INVALID: CloseCode = 1007;
    /// 1008: a message violated the server's policy (e.g. the rate limit).
    pub const POLICY: CloseCode = 1008;
    /// 1009: a message was too big to process.
    pub const SIZE: CloseCode = 1009;
    /// 1010: the client expected an extension the server did not negotiate.
    pub const EXTENSION: CloseCode = 1010;
    /// 1011: the server hit an unexpected condition (a consumer error or panic).
    pub const ERROR: CloseCode = 1011;
    /// 1012: the server is restarting.
    pub const RESTART: CloseCode = 1012;
    /// 1013: try again later (temporary overload).
    pub const AGAIN: CloseCode = 1013;
    /// 4008: the client did not read fast enough; its outbound queue overflowed
    /// and events would otherwise have been lost. Chosen by this crate in the
    /// private-use range (Centrifugo uses 3008 for the same condition).
    pub const SLOW_CONSUMER: CloseCode = 4008;
}

/// UTF-8 text, cheap to clone (a reference-counted [`Bytes`] underneath).
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Utf8Bytes(ts::Utf8Bytes);

impl Utf8Bytes {
    /// Creates text from a static string without copying.
    pub const fn from_static(s: &'static str) -> Self {
        Self(ts::Utf8Bytes::from_static(s))
    }

    /// Returns the text as a string slice.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// Returns the underlying bytes (cheap: no copy).
    pub fn as_bytes(&self) -> &Bytes {
        self.0.as_ref()
    }

    /// Checks that `bytes` are UTF-8 and wraps them without copying.
    pub fn try_from_bytes(bytes: Bytes) -> Result<Self, std::str::Utf8Error> {
        ts::Utf8Bytes::try_from(bytes).map(Self)
    }
}

impl Deref for Utf8Bytes {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Utf8Bytes {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for Utf8Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Utf8Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<String> for Utf8Bytes {
    fn from(s: String) -> Self {
        Self(s.into())
    }
}

impl From<&str> for Utf8Bytes {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

impl From<&String> for Utf8Bytes {
    fn from(s: &String) -> Self {
        Self(s.as_str().into())
    }
}

impl From<Utf8Bytes> for Bytes {
    fn from(s: Utf8Bytes) -> Self {
        s.0.into()
    }
}

impl PartialEq<str> for Utf8Bytes {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Utf8Bytes {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// The payload of a close message: a code and a short reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// The close code, see [`close_code`].
    pub code: CloseCode,
    /// A human-readable reason (at most 123 bytes on the wire).
    pub reason: Utf8Bytes,
}

impl CloseFrame {
    /// Creates a close frame. A reason longer than the 123 bytes a control
    /// frame can carry is cut at a character boundary.
    pub fn new(code: CloseCode, reason: impl Into<Utf8Bytes>) -> Self {
        let reason: Utf8Bytes = reason.into();
        let reason = if reason.len() > 123 {
            let mut end = 123;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            Utf8Bytes::from(&reason[..end])
        } else {
            reason
        };
        Self { code, reason }
    }
}

/// A WebSocket message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message.
    Text(Utf8Bytes),
    /// A binary message.
    Binary(Bytes),
    /// A ping (payload of at most 125 bytes). Pings are answered automatically.
    Ping(Bytes),
    /// A pong (payload of at most 125 bytes).
    Pong(Bytes),
    /// A close message, with an optional code and reason.
    Close(Option<CloseFrame>),
}

impl Message {
    /// Creates a text message.
    pub fn text(text: impl Into<Utf8Bytes>) -> Self {
        Message::Text(text.into())
    }

    /// Creates a binary message.
    pub fn binary(data: impl Into<Bytes>) -> Self {
        Message::Binary(data.into())
    }

    /// Creates a close message with a code and a reason.
    pub fn close(code: CloseCode, reason: impl Into<Utf8Bytes>) -> Self {
        Message::Close(Some(CloseFrame::new(code, reason)))
    }

    /// The text of a text message.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Message::Text(t) => Some(t.as_str()),
            _ => None,
        }
    }

    /// The payload of a binary message.
    pub fn as_binary(&self) -> Option<&Bytes> {
        match self {
            Message::Binary(b) => Some(b),
            _ => None,
        }
    }

    /// Whether this is a close message.
    pub fn is_close(&self) -> bool {
        matches!(self, Message::Close(_))
    }

    /// Payload length in bytes (what this message costs in an outbound queue).
    pub fn len(&self) -> usize {
        match self {
            Message::Text(t) => t.len(),
            Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
            Message::Close(c) => c.as_ref().map_or(0, |c| 2 + c.reason.len()),
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<String> for Message {
    fn from(s: String) -> Self {
        Message::text(s)
    }
}

impl From<&str> for Message {
    fn from(s: &str) -> Self {
        Message::text(s)
    }
}

impl From<Bytes> for Message {
    fn from(b: Bytes) -> Self {
        Message::Binary(b)
    }
}

impl From<Vec<u8>> for Message {
    fn from(b: Vec<u8>) -> Self {
        Message::Binary(b.into())
    }
}
