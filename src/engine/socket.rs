//! The engine's only contact with the wire: the [`wire`](super::wire) codec
//! over the upgraded transport.

use std::{
    io,
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    /// The transport failed or ended (read, write or flush): nothing is
    /// left to linger for.
    broken: bool,
}

/// The most a lingering close reads and discards (see [`Socket::close`]).
pub(crate) const LINGER_MAX_BYTES: usize = 1 << 20;

impl Socket {
    pub(crate) fn new(
        io: Transport,
        config: &WebSocketConfig,
        deflate: Option<DeflateParams>,
    ) -> Self {
        let limits = WireLimits {
            max_message_size: config.max_message_size,
            max_frame_size: config.max_frame_size,
            inflate: config.inflate_limit.map(|l| (l.bytes_per_second, l.burst)),
        };
        Self {
            io,
            reader: FrameReader::new(limits, deflate, config.read_buffer_size),
            writer: FrameWriter::new(deflate, config.write_buffer_size),
            write_buffer: config.write_buffer_size.max(1),
            broken: false,
        }
    }

    /// Closes the connection, lingering when the peer may still be sending.
    ///
    /// Closing a TCP socket with unread input makes the kernel answer with
    /// a reset, and a reset makes the peer's kernel drop what it had not yet
    /// handed to the application: the close frame we just wrote (1002,
    /// 1007, 1009, ...) is lost to a client that is still in the middle of a
    /// send. So, as HTTP servers do (Apache's and nginx's lingering close),
    /// once everything is written the write side is shut down (a FIN after
    /// the close frame) and input is read and discarded until the peer
    /// closes, for at most `within` and [`LINGER_MAX_BYTES`], on a task of
    /// its own; the connection's buffers are dropped now. A transport that
    /// already failed, or whose output is not all written (the peer does
    /// not read), is dropped at once. Without a Tokio runtime, or for the
    /// in-memory transport of tests, the socket is dropped at once.
    pub(crate) fn close(self, within: Duration) {
        let Socket {
            io,
            reader,
            writer,
            broken,
            ..
        } = self;
        let unflushed = writer.queued_bytes() > 0;
        drop((reader, writer));
        if broken || unflushed || within.is_zero() {
            return;
        }
        let Transport::Upgraded(_) = io else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(linger(io, within));
    }

    /// The next message or control frame from the peer.
    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Message>, ReadError>> {
        let res = self.reader.poll_read(&mut self.io, cx);
        if matches!(
            res,
            Poll::Ready(Ok(None)) | Poll::Ready(Err(WireError::Io(_)))
        ) {
            self.broken = true;
        }
        res.map_err(|e| match e {
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
            ready!(self.poll_flush(cx))?;
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

    /// See [`FrameWriter::reserve`].
    pub(crate) fn reserve(&mut self, bytes: usize) {
        self.writer.reserve(bytes);
    }

    /// Whether permessage-deflate was negotiated.
    pub(crate) fn compresses(&self) -> bool {
        self.writer.compresses()
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
        let res = self.writer.poll_flush(&mut self.io, cx);
        if matches!(res, Poll::Ready(Err(_))) {
            self.broken = true;
        }
        res
    }
}

/// The lingering half of [`Socket::close`]: shut the write side down, then
/// read and discard until the peer closes, `within` passes or
/// [`LINGER_MAX_BYTES`] were read.
async fn linger(mut io: Transport, within: Duration) {
    let _ = tokio::time::timeout(within, async {
        if io.shutdown().await.is_err() {
            return;
        }
        // On the heap (only while lingering), large enough that discarding
        // costs few system calls.
        let mut buf = vec![0u8; 16 * 1024];
        let mut left = LINGER_MAX_BYTES;
        while left > 0 {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}
