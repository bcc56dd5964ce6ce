//! Frames in, messages out: the inbound half of the codec.

use std::{
    future::Future,
    io::{self, Cursor},
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use flate2::Decompress;
use tokio::{
    io::{AsyncRead, AsyncReadExt, ReadBuf},
    time::Instant,
};
use tungstenite::protocol::frame::{
    coding::{CloseCode as TsCloseCode, Control, Data, OpCode},
    FrameHeader,
};

use super::{
    deflate::{self, TAIL},
    DeflateParams, ProtocolError, WireError, WireLimits,
};
use crate::message::{CloseFrame, Message, Utf8Bytes};

/// Longest frame header (2 + 8 length + 4 mask).
const MAX_HEADER: usize = 14;

/// Largest read into the stack buffer used while the reader holds no buffer.
const IDLE_READ: usize = 4096;

/// Reads frames from an `AsyncRead` into messages, with its own read buffer.
///
/// Between messages the reader holds no buffer at all: the first read after
/// a quiet spell goes into a stack buffer and only what arrived is copied to
/// the heap, so an idle connection costs no read buffer (issue 9's idle
/// memory target; the copy is at most `read_buffer_size` bytes per wake-up).
///
/// Cancel-safe: all progress lives in `self`, so dropping a pending
/// `poll_read` future loses nothing.
#[derive(Debug)]
pub(crate) struct FrameReader {
    limits: WireLimits,
    deflate: Option<DeflateParams>,
    read_buffer_size: usize,
    buf: BytesMut,
    /// Bytes needed in `buf` before the next frame can be decoded.
    need: usize,
    /// Boxed: most messages are one uncompressed frame, and the reader is
    /// part of every idle connection's state.
    partial: Option<Box<Partial>>,
    /// The client's deflate context, kept between messages (client context
    /// takeover only; otherwise a pooled one lives in `Partial`).
    context: Option<Box<Decompress>>,
    failed: Option<ProtocolError>,
    /// What compressed frames may still inflate to (`WireLimits::inflate`).
    /// Made on the first compressed frame (full, as it would be by then
    /// anyway); boxed, as most connections never compress.
    inflate_budget: Option<Box<InflateBudget>>,
}

/// A token bucket of inflated bytes.
#[derive(Debug)]
struct InflateBudget {
    per_second: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl InflateBudget {
    fn new((per_second, burst): (u64, u64), max_message_size: usize) -> Self {
        let capacity = (burst as f64).max(max_message_size as f64);
        Self {
            per_second: per_second as f64,
            capacity,
            tokens: capacity,
            last: Instant::now(),
        }
    }

    /// Spends `n` inflated bytes; an error once the budget is overdrawn.
    fn charge(&mut self, n: usize) -> Result<(), ProtocolError> {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.capacity) - n as f64;
        self.last = now;
        if self.tokens < 0.0 {
            Err(ProtocolError::InflateRateExceeded)
        } else {
            Ok(())
        }
    }
}

/// A fragmented or compressed message being assembled.
#[derive(Debug)]
struct Partial {
    text: bool,
    /// Plain (inflated) payload so far.
    data: Vec<u8>,
    /// Bytes of `data` known to be valid UTF-8 (text only).
    utf8_checked: usize,
    /// The decompressor for this message (compressed messages only).
    inflater: Option<Inflater>,
}

#[derive(Debug)]
enum Inflater {
    /// Borrowed from the thread's pool for this message.
    Pooled(Decompress),
    /// The connection's own (`FrameReader::context`), moved here for the message.
    Context(Box<Decompress>),
}

impl Inflater {
    fn get(&mut self) -> &mut Decompress {
        match self {
            Inflater::Pooled(d) => d,
            Inflater::Context(d) => d,
        }
    }
}

impl FrameReader {
    /// A reader enforcing `limits`, inflating when `deflate` was negotiated, and
    /// reading `read_buffer_size` bytes at a time (its idle buffer size).
    pub(crate) fn new(
        limits: WireLimits,
        deflate: Option<DeflateParams>,
        read_buffer_size: usize,
    ) -> Self {
        Self {
            limits,
            deflate,
            read_buffer_size: read_buffer_size.max(MAX_HEADER),
            buf: BytesMut::new(),
            need: 2,
            partial: None,
            context: None,
            failed: None,
            inflate_budget: None,
        }
    }

    /// Next message or control frame. `Ready(Ok(None))` = clean EOF (between
    /// messages). I/O errors, and EOF inside a frame or message, are
    /// `WireError::Io`. After a protocol error the reader keeps returning it.
    pub(crate) fn poll_read<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Message>, WireError>> {
        if let Some(e) = &self.failed {
            return Poll::Ready(Err(e.clone().into()));
        }
        loop {
            let decoded = self.decode();
            if let Some(done) = self.settle(decoded) {
                return Poll::Ready(done);
            }
            if self.buf.len() >= self.need {
                // A fragment was consumed; decode the next frame.
                continue;
            }
            if self.buf.capacity() == 0 {
                // Idle (no buffer held): read onto the stack first.
                // Uninitialised: zeroing it cost a 2 KiB memset per wake-up
                // (including every read that finds nothing).
                let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); IDLE_READ];
                let mut read = ReadBuf::uninit(&mut stack[..self.read_buffer_size.min(IDLE_READ)]);
                ready!(std::pin::Pin::new(&mut *io).poll_read(cx, &mut read))
                    .map_err(WireError::Io)?;
                let filled = read.filled();
                if filled.is_empty() {
                    return Poll::Ready(self.end_of_stream());
                }
                // The common case, a whole small message per read, is
                // decoded from the stack: only its payload is copied to the
                // heap, and no read buffer is taken.
                let (first, used) = match self.parse(filled) {
                    Ok(Parsed::Frame(header, header_len, len)) => {
                        let total = header_len + len;
                        let payload = BytesMut::from(&filled[header_len..total]);
                        (Some(self.payload(&header, payload)), total)
                    }
                    Ok(Parsed::Need(need)) => {
                        self.need = need;
                        (None, 0)
                    }
                    Err(e) => (Some(Err(e)), filled.len()),
                };
                let rest = &filled[used..];
                if !rest.is_empty() {
                    self.buf
                        .reserve(self.need.max(self.read_buffer_size).max(rest.len()));
                    self.buf.extend_from_slice(rest);
                }
                if let Some(done) = first.and_then(|decoded| self.settle(decoded)) {
                    return Poll::Ready(done);
                }
                // A fragment was absorbed, or the frame is incomplete.
                continue;
            }
            let want = self.need.max(self.read_buffer_size);
            if self.buf.capacity() < want {
                self.buf.reserve(want - self.buf.len());
            }
            // `read_buf` fills the spare capacity without zeroing it; the future is
            // stateless, so polling it once and dropping it is cancel-safe.
            let read = std::pin::pin!(io.read_buf(&mut self.buf));
            let n = ready!(read.poll(cx)).map_err(WireError::Io)?;
            if n == 0 {
                return Poll::Ready(self.end_of_stream());
            }
        }
    }

    /// What a decoded frame means for `poll_read`, from the buffer or the
    /// stack alike: a message to hand out (the buffer is given back if
    /// nothing more is held), an error to keep returning (everything held is
    /// dropped), or `None` to read on.
    fn settle(
        &mut self,
        decoded: Result<Option<Message>, ProtocolError>,
    ) -> Option<Result<Option<Message>, WireError>> {
        match decoded {
            Ok(Some(msg)) => {
                self.shrink_if_idle();
                Some(Ok(Some(msg)))
            }
            Ok(None) => None,
            Err(e) => {
                self.failed = Some(e.clone());
                self.release();
                Some(Err(e.into()))
            }
        }
    }

    /// The peer closed its side: clean between messages, an error inside one.
    fn end_of_stream(&self) -> Result<Option<Message>, WireError> {
        if self.buf.is_empty() && self.partial.is_none() {
            Ok(None)
        } else {
            Err(WireError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a websocket frame",
            )))
        }
    }

    /// Bytes this reader holds now (read buffer + partial message + inflater
    /// window estimate), for budgets and tests.
    pub(crate) fn buffered_bytes(&self) -> usize {
        let partial = self.partial.as_ref().map_or(0, |p| {
            p.data.capacity() + p.inflater.as_ref().map_or(0, |_| INFLATER_ESTIMATE)
        });
        let context = self.context.as_ref().map_or(0, |_| INFLATER_ESTIMATE);
        self.buf.capacity() + partial + context
    }

    /// Decodes at most one frame from `buf`. `Ok(None)`: need more bytes (set
    /// in `need`) or a fragment was absorbed (`need` <= `buf.len()`).
    fn decode(&mut self) -> Result<Option<Message>, ProtocolError> {
        let (header, header_len, len) = match self.parse(&self.buf)? {
            Parsed::Frame(header, header_len, len) => (header, header_len, len),
            Parsed::Need(need) => {
                self.need = need;
                return Ok(None);
            }
        };
        let mut payload = self.buf.split_to(header_len + len);
        payload.advance(header_len);
        self.payload(&header, payload)
    }

    /// The first frame in `bytes`: its header, checked, with its length
    /// and its payload's once `bytes` holds the whole frame.
    fn parse(&self, bytes: &[u8]) -> Result<Parsed, ProtocolError> {
        let mut cursor = Cursor::new(bytes);
        let Some((header, len)) =
            FrameHeader::parse(&mut cursor).map_err(|_| ProtocolError::BadOpcode)?
        else {
            return Ok(Parsed::Need((bytes.len() + 1).max(2)));
        };
        let header_len = usize::try_from(cursor.position()).unwrap_or(MAX_HEADER);
        // Check everything the header tells before buffering the payload.
        let len = self.check_header(&header, len)?;
        if bytes.len() < header_len + len {
            return Ok(Parsed::Need(header_len + len));
        }
        Ok(Parsed::Frame(header, header_len, len))
    }

    /// A whole frame's (still masked) payload: unmasks it and hands it on.
    fn payload(
        &mut self,
        header: &FrameHeader,
        mut payload: BytesMut,
    ) -> Result<Option<Message>, ProtocolError> {
        if let Some(mask) = header.mask {
            apply_mask(&mut payload, mask);
        }
        self.need = 2;
        self.frame(header, payload)
    }

    fn check_header(&self, h: &FrameHeader, len: u64) -> Result<usize, ProtocolError> {
        if h.rsv2 || h.rsv3 {
            return Err(ProtocolError::ReservedBits);
        }
        if h.mask.is_none() {
            return Err(ProtocolError::UnmaskedFrame);
        }
        match h.opcode {
            OpCode::Control(_) => {
                if h.rsv1 {
                    return Err(ProtocolError::ReservedBits);
                }
                if !h.is_final {
                    return Err(ProtocolError::FragmentedControl);
                }
                if len > 125 {
                    return Err(ProtocolError::ControlTooLarge);
                }
            }
            OpCode::Data(Data::Continue) => {
                let Some(p) = &self.partial else {
                    return Err(ProtocolError::UnexpectedContinuation);
                };
                if h.rsv1 {
                    // RFC 7692 section 6.1: RSV1 only on the first frame.
                    return Err(ProtocolError::ReservedBits);
                }
                if p.inflater.is_none() && exceeds(p.data.len(), len, self.limits.max_message_size)
                {
                    return Err(ProtocolError::MessageTooLarge);
                }
            }
            OpCode::Data(_) => {
                if self.partial.is_some() {
                    return Err(ProtocolError::ExpectedContinuation);
                }
                if h.rsv1 && self.deflate.is_none() {
                    return Err(ProtocolError::CompressionNotNegotiated);
                }
                if !h.rsv1 && exceeds(0, len, self.limits.max_message_size) {
                    return Err(ProtocolError::MessageTooLarge);
                }
            }
        }
        if len > self.limits.max_frame_size as u64 {
            return Err(ProtocolError::FrameTooLarge);
        }
        usize::try_from(len).map_err(|_| ProtocolError::FrameTooLarge)
    }

    fn frame(
        &mut self,
        header: &FrameHeader,
        payload: BytesMut,
    ) -> Result<Option<Message>, ProtocolError> {
        let text = match header.opcode {
            OpCode::Control(Control::Ping) => return Ok(Some(Message::Ping(payload.freeze()))),
            OpCode::Control(Control::Pong) => return Ok(Some(Message::Pong(payload.freeze()))),
            OpCode::Control(Control::Close) => return close(&payload.freeze()).map(Some),
            // Rejected by `FrameHeader::parse`.
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                return Err(ProtocolError::BadOpcode)
            }
            OpCode::Data(Data::Continue) => return self.continuation(header.is_final, &payload),
            OpCode::Data(Data::Text) => true,
            OpCode::Data(Data::Binary) => false,
        };
        if header.is_final && !header.rsv1 {
            // The common case: one frame, no copy.
            return complete(text, payload.freeze()).map(Some);
        }
        let inflater = header.rsv1.then(|| self.take_inflater());
        self.partial = Some(Box::new(Partial {
            text,
            data: Vec::new(),
            utf8_checked: 0,
            inflater,
        }));
        self.continuation(header.is_final, &payload)
    }

    /// Appends a frame's payload to the partial message; completes it on FIN.
    fn continuation(
        &mut self,
        is_final: bool,
        payload: &[u8],
    ) -> Result<Option<Message>, ProtocolError> {
        let limit = self.limits.max_message_size;
        let Some(p) = self.partial.as_mut() else {
            return Err(ProtocolError::UnexpectedContinuation);
        };
        match p.inflater.as_mut() {
            Some(inflater) => {
                let before = p.data.len();
                deflate::inflate_into(inflater.get(), payload, &mut p.data, limit)?;
                if is_final {
                    deflate::inflate_into(inflater.get(), &TAIL, &mut p.data, limit)?;
                }
                let inflated = p.data.len() - before;
                if let Some(rate) = self.limits.inflate {
                    let max = self.limits.max_message_size;
                    self.inflate_budget
                        .get_or_insert_with(|| Box::new(InflateBudget::new(rate, max)))
                        .charge(inflated)?;
                }
            }
            None => {
                // Grow towards the limit without doubling past it.
                let needed = p.data.len() + payload.len();
                if needed > p.data.capacity() {
                    let target = needed.max(p.data.capacity() * 2).min(limit).max(needed);
                    p.data.reserve_exact(target - p.data.len());
                }
                p.data.extend_from_slice(payload);
            }
        }
        if p.text {
            // Fail fast on invalid UTF-8; an incomplete sequence at the end of
            // a fragment is fine until the last one.
            match std::str::from_utf8(&p.data[p.utf8_checked..]) {
                Ok(_) => p.utf8_checked = p.data.len(),
                Err(e) if e.error_len().is_some() => return Err(ProtocolError::InvalidUtf8),
                Err(e) => {
                    p.utf8_checked += e.valid_up_to();
                    if is_final {
                        return Err(ProtocolError::InvalidUtf8);
                    }
                }
            }
        }
        if !is_final {
            return Ok(None);
        }
        let Some(p) = self.partial.take() else {
            return Err(ProtocolError::UnexpectedContinuation);
        };
        let p = *p;
        self.put_back_inflater(p.inflater);
        complete(p.text, Bytes::from(p.data)).map(Some)
    }

    fn take_inflater(&mut self) -> Inflater {
        let client_window = self.deflate.map_or(15, |d| d.client_max_window_bits);
        match self.deflate {
            Some(d) if !d.client_no_context_takeover => Inflater::Context(
                self.context
                    .take()
                    .unwrap_or_else(|| Box::new(deflate::new_inflater(client_window))),
            ),
            _ => Inflater::Pooled(deflate::take_pooled_inflater()),
        }
    }

    fn put_back_inflater(&mut self, inflater: Option<Inflater>) {
        match inflater {
            Some(Inflater::Pooled(d)) => deflate::return_pooled_inflater(d),
            Some(Inflater::Context(d)) => self.context = Some(d),
            None => {}
        }
    }

    /// Between messages, with nothing more read: give the read buffer back
    /// (the next read starts on the stack).
    fn shrink_if_idle(&mut self) {
        if self.partial.is_none() && self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// After a protocol error: drop everything held.
    fn release(&mut self) {
        self.buf = BytesMut::new();
        if let Some(p) = self.partial.take() {
            if let Some(Inflater::Pooled(d)) = p.inflater {
                deflate::return_pooled_inflater(d);
            }
        }
        self.context = None;
    }
}

/// What [`FrameReader::parse`] found at the start of the bytes.
enum Parsed {
    /// A whole frame: its header, the header's length and the payload's.
    Frame(FrameHeader, usize, usize),
    /// Not a whole frame yet: the bytes it needs.
    Need(usize),
}

/// zlib-rs inflate state plus its 32 KiB window (an estimate for budgets).
const INFLATER_ESTIMATE: usize = 7 * 1024 + 32 * 1024;

fn exceeds(have: usize, add: u64, limit: usize) -> bool {
    (have as u64).saturating_add(add) > limit as u64
}

/// A finished data message.
fn complete(text: bool, data: Bytes) -> Result<Message, ProtocolError> {
    if text {
        Utf8Bytes::try_from_bytes(data)
            .map(Message::Text)
            .map_err(|_| ProtocolError::InvalidUtf8)
    } else {
        Ok(Message::Binary(data))
    }
}

/// A close frame's payload: empty, or a valid code and a UTF-8 reason.
fn close(payload: &Bytes) -> Result<Message, ProtocolError> {
    match payload.len() {
        0 => Ok(Message::Close(None)),
        1 => Err(ProtocolError::CloseTooShort),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !TsCloseCode::from(code).is_allowed() {
                return Err(ProtocolError::InvalidCloseCode);
            }
            let reason = Utf8Bytes::try_from_bytes(payload.slice(2..))
                .map_err(|_| ProtocolError::InvalidCloseReason)?;
            Ok(Message::Close(Some(CloseFrame { code, reason })))
        }
    }
}

/// XORs `buf` with the 4-byte client mask (RFC 6455 section 5.3).
/// tungstenite's `apply_mask` is not public (its `mask` module is private), so
/// this is the plain XOR, eight bytes at a time.
fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

#[cfg(test)]
mod tests;
