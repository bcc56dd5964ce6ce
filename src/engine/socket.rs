//! The engine's only contact with the wire: the [`wire`](super::wire) codec
//! over the upgraded transport.

use std::{
    io,
    task::{Context, Poll},
};

use bytes::Bytes;

use super::{
    wire::{DeflateParams, FrameReader, FrameWriter, Outbound, WireError, WireLimits},
    Out, Transport,
};
use crate::{
    message::{CloseCode, CloseFrame, Message},
    WebSocketConfig,
};

pub(crate) use super::wire::Inbound;

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
    deflate: bool,
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
            deflate: deflate.is_some(),
        }
    }

    /// Whether permessage-deflate was negotiated.
    #[allow(dead_code)]
    pub(crate) fn compressing(&self) -> bool {
        self.deflate
    }

    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Inbound>, ReadError>> {
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

    /// Ready when another frame may be queued (the engine bounds how much it
    /// queues by [`queued_bytes`](Self::queued_bytes)).
    pub(crate) fn poll_writable(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    pub(crate) fn queue(&mut self, out: &Out) -> io::Result<()> {
        match out {
            Out::Message(m) => self.writer.queue(Outbound::Message(m)),
            Out::Shared(p) => self.writer.queue(Outbound::Shared(p)),
        }
        Ok(())
    }

    pub(crate) fn queue_ping(&mut self) -> io::Result<()> {
        self.writer
            .queue(Outbound::Message(&Message::Ping(Bytes::new())));
        Ok(())
    }

    pub(crate) fn queue_pong(&mut self, payload: Bytes) -> io::Result<()> {
        self.writer
            .queue(Outbound::Message(&Message::Pong(payload)));
        Ok(())
    }

    pub(crate) fn queue_close(&mut self, frame: Option<CloseFrame>) -> io::Result<()> {
        self.writer.queue(Outbound::Message(&Message::Close(frame)));
        Ok(())
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
