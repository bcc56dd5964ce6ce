//! What the engine talks to: a WebSocket over a byte stream, or an HTTP
//! session (SSE, HTTP-streaming, long-poll). An enum, not a trait object:
//! the WebSocket path stays statically dispatched (one predictable branch
//! per call), and everything above it (the outbound queue and its budget,
//! heartbeats, timeouts, limits, shutdown, counters) is the same code for
//! both.

use std::{
    io,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;

use super::{
    http::HttpPeer,
    socket::{ReadError, Socket},
    Outbound,
};
use crate::message::{CloseFrame, Message};

/// The engine's peer; see the [module docs](self).
// The WebSocket stays inline (no pointer to chase on the hot path); an HTTP
// session pays the larger size, once per session.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Peer {
    WebSocket(Socket),
    Http(HttpPeer),
}

/// Forwards a call to the peer of either kind.
macro_rules! both {
    ($self:expr, $p:ident => $e:expr) => {
        match $self {
            Peer::WebSocket($p) => $e,
            Peer::Http($p) => $e,
        }
    };
}

impl Peer {
    /// The transport's name, as the metrics label it.
    pub(crate) fn transport(&self) -> &'static str {
        match self {
            Peer::WebSocket(_) => "websocket",
            Peer::Http(h) => h.kind().as_str(),
        }
    }

    /// Serves what arrives besides the data (an HTTP session's requests
    /// from other processes); nothing for a WebSocket.
    #[inline]
    pub(crate) fn poll_control(&mut self, cx: &mut Context<'_>) {
        if let Peer::Http(h) = self {
            h.poll_control(cx);
        }
    }

    #[inline]
    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Message>, ReadError>> {
        both!(self, p => p.poll_read(cx))
    }

    #[inline]
    pub(crate) fn poll_writable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, p => p.poll_writable(cx))
    }

    #[inline]
    pub(crate) fn has_room(&self) -> bool {
        both!(self, p => p.has_room())
    }

    #[inline]
    pub(crate) fn queue(&mut self, out: &Outbound) {
        both!(self, p => p.queue(out))
    }

    /// Whether queuing a message only copies it into the write buffer (a
    /// WebSocket without permessage-deflate): cheap enough to do while the
    /// link is locked.
    #[inline]
    pub(crate) fn encodes_by_copy(&self) -> bool {
        match self {
            Peer::WebSocket(s) => !s.compresses(),
            Peer::Http(_) => false,
        }
    }

    /// Makes room for about `bytes` of frames before a batch is encoded
    /// (a WebSocket's write buffer; an HTTP session grows its own).
    #[inline]
    pub(crate) fn reserve(&mut self, bytes: usize) {
        if let Peer::WebSocket(s) = self {
            s.reserve(bytes);
        }
    }

    #[inline]
    pub(crate) fn queue_ping(&mut self) {
        both!(self, p => p.queue_ping())
    }

    #[inline]
    pub(crate) fn queue_pong(&mut self, payload: Bytes) {
        match self {
            Peer::WebSocket(s) => s.queue_pong(payload),
            // Nothing pings over HTTP.
            Peer::Http(_) => {}
        }
    }

    #[inline]
    pub(crate) fn queue_close(&mut self, frame: Option<CloseFrame>) {
        both!(self, p => p.queue_close(frame))
    }

    #[inline]
    pub(crate) fn has_unflushed(&self) -> bool {
        both!(self, p => p.has_unflushed())
    }

    #[inline]
    pub(crate) fn queued_bytes(&self) -> usize {
        both!(self, p => p.queued_bytes())
    }

    #[inline]
    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, p => p.poll_flush(cx))
    }

    pub(crate) fn close(self, within: Duration) {
        both!(self, p => p.close(within))
    }
}
