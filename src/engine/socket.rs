//! The engine's only contact with the wire: the [`wire`](super::wire) codec
//! over the upgraded transport.

use std::{
    io,
    task::{ready, Context, Poll},
};

use bytes::Bytes;

use super::{
    wire::{DeflateParams, FrameReader, FrameWriter, Outbound, WireError, WireLimits},
    Transport,
};
use crate::{
    message::{CloseCode, CloseFrame, Message},
    WebSocketConfig,
};

/// Why reading stopped.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The transport failed or ended inside a frame.
    Io,
    /// The peer broke the protocol or a limit: close with this code.
    Protocol {
        code: CloseCode,
        reason: &'static str,
    },
}

/// A server-side WebSocket over `Transport`: a frame reader and a frame
/// writer with their own buffers (both return to their idle size after a
/// large message).
#[derive(Debug)]
pub(crate) struct Socket {
    io: Transport,
    reader: FrameReader,
    writer: FrameWriter,
    /// Frames queued in the writer up to this many bytes before they must
    /// go to the transport.
    write_buffer: usize,
}

impl Socket {
    pub(crate) fn new(
        io: Transport,
        config: &WebSocketConfig,
        deflate: Option<DeflateParams>,
    ) -> Self {
        let limits = WireLimits {
            max_message_size: config.max_message_size,
            max_frame_size: config.max_frame_size,
        };
        Self {
            io,
            reader: FrameReader::new(limits, deflate, config.read_buffer_size),
            writer: FrameWriter::new(deflate, config.write_buffer_size),
            write_buffer: config.write_buffer_size.max(1),
        }
    }

    /// The next message or control frame from the peer.
    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Message>, ReadError>> {
        self.reader
            .poll_read(&mut self.io, cx)
            .map_err(|e| match e {
                WireError::Io(_) => ReadError::Io,
                WireError::Protocol(p) => ReadError::Protocol {
                    code: p.close_code(),
                    reason: p.reason(),
                },
            })
    }

    /// Ready when another frame may be queued: the writer holds less than
    /// one write buffer. When it holds more, writes it to the transport
    /// first, and is pending (with `cx` registered) while the transport is.
    pub(crate) fn poll_writable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.writer.queued_bytes() >= self.write_buffer {
            ready!(self.writer.poll_flush(&mut self.io, cx))?;
        }
        Poll::Ready(Ok(()))
    }

    /// Whether the writer holds less than one write buffer.
    pub(crate) fn has_room(&self) -> bool {
        self.writer.queued_bytes() < self.write_buffer
    }

    pub(crate) fn queue(&mut self, out: &Outbound) {
        self.writer.queue(out);
    }

    pub(crate) fn queue_ping(&mut self) {
        self.writer
            .queue(&Outbound::Message(Message::Ping(Bytes::new())));
    }

    pub(crate) fn queue_pong(&mut self, payload: Bytes) {
        self.writer
            .queue(&Outbound::Message(Message::Pong(payload)));
    }

    pub(crate) fn queue_close(&mut self, frame: Option<CloseFrame>) {
        self.writer.queue(&Outbound::Message(Message::Close(frame)));
    }

    pub(crate) fn has_unflushed(&self) -> bool {
        self.writer.queued_bytes() > 0
    }

    /// Bytes queued in the writer and not yet on the socket.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.writer.queued_bytes()
    }

    /// Heap bytes the reader and writer hold now (tests, docs).
    #[allow(dead_code)]
    pub(crate) fn buffered_bytes(&self) -> usize {
        self.reader.buffered_bytes() + self.writer.buffered_bytes()
    }

    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.writer.poll_flush(&mut self.io, cx)
    }
}
