//! The error type of WebSocket operations.

use std::fmt;

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

    /// The channel layer failed.
    pub fn is_channel_layer(&self) -> bool {
        self.kind == Kind::ChannelLayer
    }

    /// The handshake could not be completed (the client went away or the
    /// server could not upgrade the connection).
    pub fn is_handshake(&self) -> bool {
        self.kind == Kind::Handshake
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
            Kind::ChannelLayer => "channel layer error",
            Kind::Handshake => "websocket handshake failed",
            Kind::Encode => "message could not be encoded",
        };
        // The cause is `source()`, not repeated here.
        f.write_str(what)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as _)
    }
}
