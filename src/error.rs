//! The error type of WebSocket operations.

use std::fmt;

use tokio_tungstenite::tungstenite;

use crate::channel_layer::ChannelLayerError;

/// An error from a WebSocket operation ([`WebSocket`](crate::consumer::WebSocket),
/// [`Context`](crate::consumer::Context)).
///
/// Opaque on purpose (the transport's own error types are not part of this
/// crate's API); ask it what happened with the `is_*` methods and follow
/// [`source`](std::error::Error::source) for details.
pub struct Error {
    kind: Kind,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Closed,
    Io,
    Protocol,
    Capacity,
    Utf8,
    ChannelLayer,
    Handshake,
    Encode,
}

impl Error {
    fn new(kind: Kind, source: Option<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self { kind, source }
    }

    pub(crate) fn closed() -> Self {
        Self::new(Kind::Closed, None)
    }

    pub(crate) fn encode(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new(Kind::Encode, Some(source.into()))
    }

    pub(crate) fn handshake(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new(Kind::Handshake, Some(source.into()))
    }

    /// The connection is closed (or closing): nothing more can be sent.
    pub fn is_closed(&self) -> bool {
        self.kind == Kind::Closed
    }

    /// The transport failed (reset, broken pipe...).
    pub fn is_io(&self) -> bool {
        self.kind == Kind::Io
    }

    /// The peer broke the WebSocket protocol.
    pub fn is_protocol(&self) -> bool {
        self.kind == Kind::Protocol
    }

    /// A message or frame exceeded the configured size limits.
    pub fn is_capacity(&self) -> bool {
        self.kind == Kind::Capacity
    }

    /// A text message was not valid UTF-8.
    pub fn is_utf8(&self) -> bool {
        self.kind == Kind::Utf8
    }

    /// The channel layer failed.
    pub fn is_channel_layer(&self) -> bool {
        self.kind == Kind::ChannelLayer
    }

    /// The handshake could not be completed (the client went away or the
    /// server could not upgrade the connection).
    pub fn is_handshake(&self) -> bool {
        self.kind == Kind::Handshake
    }

    /// The close code that fits this error when the server closes because of it.
    pub(crate) fn close_code(&self) -> crate::message::CloseCode {
        use crate::message::close_code;
        match self.kind {
            Kind::Protocol => close_code::PROTOCOL,
            Kind::Capacity => close_code::SIZE,
            Kind::Utf8 => close_code::INVALID,
            _ => close_code::ERROR,
        }
    }
}

impl From<tungstenite::Error> for Error {
    fn from(e: tungstenite::Error) -> Self {
        use tungstenite::Error as E;
        let kind = match &e {
            E::ConnectionClosed | E::AlreadyClosed => Kind::Closed,
            E::Io(_) => Kind::Io,
            // The peer dropped the TCP connection without a close frame.
            E::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake) => {
                Kind::Io
            }
            E::Capacity(_) => Kind::Capacity,
            E::Utf8(_) => Kind::Utf8,
            E::Protocol(_) => Kind::Protocol,
            _ => Kind::Protocol,
        };
        Self::new(kind, Some(Box::new(e)))
    }
}

impl From<ChannelLayerError> for Error {
    fn from(e: ChannelLayerError) -> Self {
        Self::new(Kind::ChannelLayer, Some(Box::new(e)))
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind);
        if let Some(s) = &self.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            Kind::Closed => "websocket connection closed",
            Kind::Io => "websocket transport error",
            Kind::Protocol => "websocket protocol error",
            Kind::Capacity => "websocket message too big",
            Kind::Utf8 => "websocket text was not valid utf-8",
            Kind::ChannelLayer => "channel layer error",
            Kind::Handshake => "websocket handshake failed",
            Kind::Encode => "message could not be encoded",
        };
        match &self.source {
            Some(s) => write!(f, "{what}: {s}"),
            None => f.write_str(what),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as _)
    }
}
