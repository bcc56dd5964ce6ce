//! The engine's only contact with the wire: reads frames into messages,
//! queues and flushes outgoing frames.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio_tungstenite::{
    tungstenite::{self as ts, protocol::Role},
    WebSocketStream,
};

use super::{Out, Transport};
use crate::{
    message::{close_code, CloseCode, CloseFrame, Message, Utf8Bytes},
    WebSocketConfig,
};

/// A message read from the client.
#[derive(Debug)]
pub(crate) enum Inbound {
    Text(Utf8Bytes),
    Binary(Bytes),
    Ping(Bytes),
    #[allow(dead_code)] // the payload of our pings is empty
    Pong(Bytes),
    Close(Option<CloseFrame>),
}

/// Why reading stopped.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The transport failed or ended without a close frame.
    Io,
    /// The peer broke the protocol or a limit: close with this code.
    Protocol {
        code: CloseCode,
        reason: &'static str,
    },
}

pub(crate) struct Socket {
    ws: WebSocketStream<Transport>,
    dirty: bool,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket").finish_non_exhaustive()
    }
}

impl Socket {
    pub(crate) async fn new(transport: Transport, config: &WebSocketConfig) -> Self {
        let ws =
            WebSocketStream::from_raw_socket(transport, Role::Server, Some(config.tungstenite()))
                .await;
        Self { ws, dirty: false }
    }

    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Inbound>, ReadError>> {
        loop {
            return match Pin::new(&mut self.ws).poll_next(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(None) => Poll::Ready(Ok(None)),
                Poll::Ready(Some(Ok(m))) => {
                    let Some(m) = Message::from_tungstenite(m) else {
                        continue;
                    };
                    // tungstenite queues pong and close replies itself.
                    self.dirty = true;
                    Poll::Ready(Ok(Some(match m {
                        Message::Text(t) => Inbound::Text(t),
                        Message::Binary(b) => Inbound::Binary(b),
                        Message::Ping(b) => Inbound::Ping(b),
                        Message::Pong(b) => Inbound::Pong(b),
                        Message::Close(c) => Inbound::Close(c),
                    })))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Err(read_error(&e))),
            };
        }
    }

    /// Ready when another frame may be queued.
    pub(crate) fn poll_writable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws)
            .poll_ready(cx)
            .map_err(io::Error::other)
    }

    pub(crate) fn queue(&mut self, out: Out) -> io::Result<()> {
        self.dirty = true;
        Pin::new(&mut self.ws)
            .start_send(out.into_message().into_tungstenite())
            .map_err(io::Error::other)
    }

    pub(crate) fn queue_ping(&mut self) -> io::Result<()> {
        self.queue(Out::Message(Message::Ping(Bytes::new())))
    }

    /// Answers a ping (tungstenite answers by itself: nothing to do).
    pub(crate) fn queue_pong(&mut self, _payload: Bytes) -> io::Result<()> {
        Ok(())
    }

    pub(crate) fn queue_close(&mut self, frame: CloseFrame) -> io::Result<()> {
        self.queue(Out::Message(Message::Close(Some(frame))))
    }

    /// Replies to the peer's close (tungstenite replies by itself).
    pub(crate) fn queue_close_reply(&mut self, _frame: Option<&CloseFrame>) -> io::Result<()> {
        Ok(())
    }

    pub(crate) fn has_unflushed(&self) -> bool {
        self.dirty
    }

    /// Bytes queued in the writer and not yet on the socket (an estimate).
    pub(crate) fn queued_bytes(&self) -> usize {
        0
    }

    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.ws).poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                self.dirty = false;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(ts::Error::ConnectionClosed)) => {
                self.dirty = false;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(io::Error::other(e))),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn read_error(e: &ts::Error) -> ReadError {
    use ts::{error::ProtocolError as P, Error as E};
    let (code, reason) = match e {
        E::ConnectionClosed | E::AlreadyClosed | E::Io(_) => return ReadError::Io,
        E::Protocol(P::ResetWithoutClosingHandshake) => return ReadError::Io,
        E::Capacity(_) => (close_code::SIZE, "message too big"),
        E::Utf8(_) => (close_code::INVALID, "invalid utf-8"),
        _ => (close_code::PROTOCOL, "protocol error"),
    };
    ReadError::Protocol { code, reason }
}
