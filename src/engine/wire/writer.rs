//! Messages in, frames out: the outbound half of the codec.

use std::{
    collections::VecDeque,
    io::{self, Cursor, IoSlice},
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use flate2::Compress;
use tokio::io::AsyncWrite;
use tungstenite::protocol::frame::{
    coding::{Control, Data, OpCode},
    FrameHeader,
};

use super::{deflate, DeflateParams};
use crate::message::Message;
use crate::payload::{FrameHeaderBytes, SharedPayload};

/// Payloads at least this long are written from their own `Bytes` (a vectored
/// write of header + payload); shorter ones are copied into the write buffer.
/// Copying 4 KiB costs about as much as the extra iovec and the shared
/// refcount traffic it avoids (a group payload's refcount is touched by every
/// member's task), so small frames stay batched in one buffer.
pub(crate) const ZERO_COPY_MIN: usize = 4096;

/// The small-frame buffer's first capacity.
const FIRST_BUFFER: usize = 512;

/// The largest small-frame buffer kept between writes while a connection
/// sends data (see [`FrameWriter::poll_flush`]): allocating and freeing it
/// per write was a tenth of a paced delivery's instructions.
const KEPT_BUFFER: usize = 1024;

/// Most slices handed to one vectored write (Linux's `IOV_MAX` is 1024; this
/// keeps the array on the stack).
const MAX_IOVECS: usize = 64;

/// What the writer sends: an outgoing message as the application queued it
/// (the engine's outbound queue holds these), or a control frame.
#[derive(Debug, Clone)]
pub(crate) enum Outbound {
    /// A message of this connection (data or control).
    Message(Message),
    /// A data payload shared with other connections (a group send),
    /// compressed once per negotiated parameter set.
    Shared(SharedPayload),
}

impl Outbound {
    /// What it counts against the outbound budget: its payload bytes.
    pub(crate) fn len(&self) -> usize {
        match self {
            Outbound::Message(m) => m.len(),
            Outbound::Shared(p) => p.len(),
        }
    }
}

/// Encodes and writes frames with one write buffer for small frames and
/// vectored writes (header + shared `Bytes`, no copy) for large payloads;
/// drains what is queued before one flush.
pub(crate) struct FrameWriter {
    deflate: Option<DeflateParams>,
    /// The server's deflate context (server context takeover only). Boxed:
    /// the writer is part of every connection's state, compressing or not.
    context: Option<Box<Compress>>,
    write_buffer_size: usize,
    /// Small frames, not yet moved to `segments`.
    buf: BytesMut,
    /// Frames ready to write, in order.
    segments: VecDeque<Bytes>,
    queued: usize,
    /// A data frame was queued since the last flush.
    data_queued: bool,
    /// Flushes that carried data since the last ping (saturating). From the
    /// second one on, the small-frame buffer is kept between writes: a
    /// connection that answered once (an echo, a liveness check) and went
    /// quiet holds none. A ping goes out every ping interval and resets
    /// the count, so a connection that wrote no data for a whole interval
    /// gives its buffer back once that ping is written.
    data_flushes: u8,
}

impl std::fmt::Debug for FrameWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameWriter")
            .field("deflate", &self.deflate)
            .field("context", &self.context.is_some())
            .field("queued", &self.queued)
            .finish_non_exhaustive()
    }
}

impl FrameWriter {
    /// A writer compressing per `deflate` (when negotiated), allocating a
    /// buffer for small frames when it has something to send (growing
    /// towards `write_buffer_size`, which the engine fills at most per
    /// write) and releasing it once the queue is written, except for a
    /// buffer of at most 1 KiB kept while the connection keeps sending data
    /// (from its second write with data until the next ping).
    pub(crate) fn new(deflate: Option<DeflateParams>, write_buffer_size: usize) -> Self {
        Self {
            deflate,
            context: None,
            write_buffer_size,
            buf: BytesMut::new(),
            segments: VecDeque::new(),
            queued: 0,
            data_queued: false,
            data_flushes: 0,
        }
    }

    /// Makes room in the small-frame buffer for `bytes` more before a
    /// batch is encoded: one allocation for the batch instead of doubling
    /// through it (a realloc copies the buffer each time; that was a sixth
    /// of a fan-out burst's instructions).
    pub(crate) fn reserve(&mut self, bytes: usize) {
        if self.buf.capacity() - self.buf.len() < bytes {
            self.buf
                .reserve(bytes.max(FIRST_BUFFER.min(self.write_buffer_size)));
        }
    }

    /// Whether permessage-deflate was negotiated.
    pub(crate) fn compresses(&self) -> bool {
        self.deflate.is_some()
    }

    /// Encodes one message/frame into the queue (compressing data messages per
    /// params/threshold; never control frames).
    pub(crate) fn queue(&mut self, msg: &Outbound) {
        match msg {
            Outbound::Message(Message::Text(t)) => self.data(true, t.as_bytes()),
            Outbound::Message(Message::Binary(b)) => self.data(false, b),
            Outbound::Message(Message::Ping(b)) => {
                self.data_flushes = 0;
                self.control(Control::Ping, &b[..b.len().min(125)]);
            }
            Outbound::Message(Message::Pong(b)) => {
                self.control(Control::Pong, &b[..b.len().min(125)]);
            }
            Outbound::Message(Message::Close(c)) => {
                let mut payload = [0u8; 125];
                let len = match c {
                    None => 0,
                    Some(c) => {
                        payload[..2].copy_from_slice(&c.code.to_be_bytes());
                        // A reason set directly on the public field may be long:
                        // cut at a character boundary to fit 123 bytes.
                        let mut end = c.reason.len().min(123);
                        while !c.reason.is_char_boundary(end) {
                            end -= 1;
                        }
                        payload[2..2 + end].copy_from_slice(&c.reason.as_bytes()[..end]);
                        2 + end
                    }
                };
                self.control(Control::Close, &payload[..len]);
            }
            Outbound::Shared(p) => self.shared(p),
        }
    }

    /// Writes out everything queued (vectored when the IO supports it) and flushes.
    pub(crate) fn poll_flush<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        // Only small frames (the common case): write the buffer itself,
        // without moving it into the segment queue.
        while self.segments.is_empty() && !self.buf.is_empty() {
            let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.buf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.buf.advance(n);
            self.queued = self.queued.saturating_sub(n);
        }
        self.seal();
        while !self.segments.is_empty() {
            let n = if io.is_write_vectored() && self.segments.len() > 1 {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let mut count = 0;
                for (slot, seg) in slices.iter_mut().zip(self.segments.iter()) {
                    *slot = IoSlice::new(seg);
                    count += 1;
                }
                ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count]))?
            } else {
                let front = self.segments.front().map_or(&[][..], |s| &s[..]);
                ready!(Pin::new(&mut *io).poll_write(cx, front))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(n);
        }
        ready!(Pin::new(&mut *io).poll_flush(cx))?;
        // Between writes of a connection that keeps sending data, keep a
        // small buffer (at most KEPT_BUFFER bytes; `try_reclaim` rewinds it
        // without allocating); otherwise hold none: an idle connection
        // costs no write buffer.
        if std::mem::take(&mut self.data_queued) {
            self.data_flushes = self.data_flushes.saturating_add(1);
        }
        self.buf.clear();
        let keep = self.data_flushes >= 2
            && self
                .buf
                .try_reclaim(FIRST_BUFFER.min(self.write_buffer_size))
            && self.buf.capacity() <= KEPT_BUFFER;
        if !keep {
            self.buf = BytesMut::new();
        }
        if self.segments.capacity() > 0 {
            self.segments = VecDeque::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Bytes queued and not yet written (counted against the connection's
    /// outbound budget).
    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued
    }

    /// Heap bytes this writer holds now (buffers and, with server context
    /// takeover, an estimate of the compressor).
    pub(crate) fn buffered_bytes(&self) -> usize {
        let segments: usize = self.segments.iter().map(Bytes::len).sum();
        self.buf.capacity()
            + segments
            + self.segments.capacity() * std::mem::size_of::<Bytes>()
            + self.context.as_ref().map_or(0, |_| DEFLATER_ESTIMATE)
    }

    fn data(&mut self, text: bool, payload: &Bytes) {
        self.data_queued = true;
        let opcode = OpCode::Data(if text { Data::Text } else { Data::Binary });
        match self.deflate {
            Some(d) if payload.len() >= d.threshold && !payload.is_empty() => {
                if d.server_no_context_takeover {
                    match deflate::compress_pooled(d.server_max_window_bits, d.level, payload) {
                        // Without context takeover, sending plain when deflate
                        // does not help is always allowed (except with
                        // threshold 0: compress everything).
                        Some(c) if compressed_is_better(&d, c.len(), payload.len()) => {
                            self.frame(opcode, true, &Bytes::from(c));
                        }
                        _ => self.frame(opcode, false, payload),
                    }
                } else {
                    self.compress_with_context(opcode, payload, d);
                }
            }
            _ => self.frame(opcode, false, payload),
        }
    }

    fn shared(&mut self, p: &SharedPayload) {
        self.data_queued = true;
        let opcode = OpCode::Data(if p.is_text() {
            Data::Text
        } else {
            Data::Binary
        });
        match self.deflate {
            Some(d) if p.len() >= d.threshold && !p.is_empty() => {
                if d.server_no_context_takeover {
                    let (bits, level) = (d.server_max_window_bits, d.level);
                    match p.compressed_with(bits, level, |plain| {
                        deflate::compress_pooled(bits, level, plain)
                    }) {
                        Some(c) if compressed_is_better(&d, c.len(), p.len()) => {
                            self.frame(opcode, true, &c)
                        }
                        _ => self.frame(opcode, false, p.plain()),
                    }
                } else {
                    self.compress_with_context(opcode, p.plain(), d);
                }
            }
            _ => {
                // Encoded by the first member's writer, copied by the rest.
                let header = p.plain_header_with(|| encode_header(opcode, false, p.len()));
                self.push_frame(header.as_bytes(), p.plain());
            }
        }
    }

    /// Compresses with the connection's own deflate context. Always sends the
    /// compressed form: the data is in the context's window now, and a client
    /// that never saw it could not resolve references to it.
    fn compress_with_context(&mut self, opcode: OpCode, payload: &Bytes, d: DeflateParams) {
        let context = self.context.get_or_insert_with(|| {
            Box::new(deflate::new_deflater(d.server_max_window_bits, d.level))
        });
        match deflate::compress_message(context, payload) {
            Some(c) => self.frame(opcode, true, &Bytes::from(c)),
            None => {
                // flate2 failed (it does not in practice). A fresh context only
                // refers to data sent after it, which the client has too.
                self.context = None;
                self.frame(opcode, false, payload);
            }
        }
    }

    fn control(&mut self, control: Control, payload: &[u8]) {
        let header = encode_header(OpCode::Control(control), false, payload.len());
        self.push_header(header.as_bytes(), payload.len());
        self.buf.extend_from_slice(payload);
        self.queued += payload.len();
    }

    fn frame(&mut self, opcode: OpCode, compressed: bool, payload: &Bytes) {
        let header = encode_header(opcode, compressed, payload.len());
        self.push_frame(header.as_bytes(), payload);
    }

    /// Queues an encoded `header` and its `payload`: copied into the write
    /// buffer when small, as a segment of its own (no copy) when large.
    fn push_frame(&mut self, header: &[u8], payload: &Bytes) {
        self.push_header(header, payload.len());
        if payload.len() >= ZERO_COPY_MIN {
            self.seal();
            self.segments.push_back(payload.clone());
        } else {
            self.buf.extend_from_slice(payload);
        }
        self.queued += payload.len();
    }

    /// Appends an encoded header of a frame whose payload is `len` bytes.
    fn push_header(&mut self, header: &[u8], len: usize) {
        // The buffer is dropped after every flush (an idle connection holds
        // none), so a frame often finds it empty: start at what this frame
        // needs, small enough for the allocator's fast path; a batch grows
        // it by doubling, or `reserve`s it whole first.
        self.reserve(header.len() + len.min(ZERO_COPY_MIN));
        self.buf.extend_from_slice(header);
        self.queued += header.len();
    }

    /// Moves the small-frame buffer's content into the segment queue.
    fn seal(&mut self) {
        if !self.buf.is_empty() {
            self.segments.push_back(self.buf.split().freeze());
        }
    }

    fn advance(&mut self, mut n: usize) {
        self.queued = self.queued.saturating_sub(n);
        while n > 0 {
            let Some(front) = self.segments.front_mut() else {
                return;
            };
            if n >= front.len() {
                n -= front.len();
                self.segments.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
}

/// Encodes the header of an unmasked, final frame (tungstenite's encoder).
fn encode_header(opcode: OpCode, rsv1: bool, len: usize) -> FrameHeaderBytes {
    let header = FrameHeader {
        is_final: true,
        rsv1,
        rsv2: false,
        rsv3: false,
        opcode,
        mask: None,
    };
    let mut bytes = [0u8; 14];
    let mut cursor = Cursor::new(&mut bytes[..]);
    // 14 bytes always hold an unmasked header: formatting cannot fail.
    let _ = header.format(len as u64, &mut cursor);
    let n = usize::try_from(cursor.position()).unwrap_or(0);
    FrameHeaderBytes::new(bytes, n)
}

/// zlib-rs deflate state at window 15 and the default memory level (an
/// estimate for budgets; see the module docs for the measurement).
const DEFLATER_ESTIMATE: usize = 256 * 1024;

/// Whether to send the compressed form of a message without context
/// takeover: when it is shorter, or always with a threshold of 0 (the user
/// asked for every message compressed).
fn compressed_is_better(d: &DeflateParams, compressed: usize, plain: usize) -> bool {
    d.threshold == 0 || compressed < plain
}

#[cfg(test)]
mod tests;
