//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz builds with
//! `--cfg fuzzing`); also compiled for the unit tests, which replay the
//! checked-in seeds. Not API: hidden, and absent from normal builds.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, Waker},
};

use tokio::io::{AsyncRead, ReadBuf};
use tungstenite::protocol::frame::FrameHeader;

use crate::{
    engine::wire::{DeflateParams, FrameReader, WireError, WireLimits},
    message::Message,
};

/// What the frame reader made of one input.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Messages and control frames, in order (data messages as (text?, bytes)).
    pub items: Vec<Item>,
    /// The close code of the protocol error that stopped it, if any.
    pub error: Option<u16>,
    /// The stream ended inside a frame or message.
    pub truncated: bool,
    /// The most heap the reader held after any read.
    pub max_buffered: usize,
}

/// One thing the reader yielded.
#[derive(Debug)]
pub enum Item {
    /// A text message: its bytes as the reader handed them over.
    Text(Vec<u8>),
    /// A binary message's length.
    Binary(usize),
    /// A ping or pong.
    Control,
    /// A close frame (its code).
    Close(Option<u16>),
}

/// An input's settings byte: bit 0 permessage-deflate negotiated, bit 1 the
/// client keeps its deflate context between messages, bit 2 tight limits
/// (4 KiB messages and frames instead of 1 MiB), bits 3-5 the client's window
/// bits (8 + n, at most 15).
#[derive(Debug, Clone, Copy)]
struct Settings {
    deflate: Option<DeflateParams>,
    limits: WireLimits,
}

impl Settings {
    fn from_byte(b: u8) -> Self {
        let deflate = (b & 1 == 1).then(|| DeflateParams {
            server_no_context_takeover: true,
            client_no_context_takeover: b & 2 == 0,
            server_max_window_bits: 15,
            client_max_window_bits: (8 + ((b >> 3) & 7)).min(15),
            level: 1,
            threshold: 0,
        });
        let size = if b & 4 == 4 { 4 << 10 } else { 1 << 20 };
        Self {
            deflate,
            limits: WireLimits {
                max_message_size: size,
                max_frame_size: size,
                // Time-dependent, so not fuzzed: off.
                inflate: None,
            },
        }
    }

    /// The reader's heap may not grow past this, whatever the input.
    fn memory_bound(&self) -> usize {
        // A frame's payload in the read buffer, the message being assembled
        // (both may round up to twice their size), two inflaters.
        2 * (self.limits.max_frame_size + self.limits.max_message_size) + 256 * 1024
    }
}

/// Hands out `data` in chunks whose sizes cycle through `pattern` (a byte
/// `b` is `16 * b` bytes, 0 is one byte; a chunk never exceeds the reader's
/// buffer).
struct Chunked<'a> {
    data: &'a [u8],
    pattern: &'a [u8],
    turn: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let size = match self.pattern {
            [] => self.data.len(),
            p => match p[self.turn % p.len()] {
                0 => 1,
                b => usize::from(b) * 16,
            },
        };
        self.turn += 1;
        let n = size.min(self.data.len()).min(buf.remaining());
        let (now, rest) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

/// Runs the frame reader over `input`: byte 0 the settings, bytes 1-4 the
/// chunk pattern, the rest the client's byte stream.
pub fn read_frames(input: &[u8]) -> Outcome {
    let (settings, pattern, stream) = split(input);
    let mut reader = FrameReader::new(settings.limits, settings.deflate, 2048);
    let mut io = Chunked {
        data: stream,
        pattern,
        turn: 0,
    };
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Outcome::default();
    // Every turn consumes input or ends: the bound is generous.
    for _ in 0..stream.len() + 16 {
        let polled = reader.poll_read(&mut io, &mut cx);
        out.max_buffered = out.max_buffered.max(reader.buffered_bytes());
        match polled {
            Poll::Pending => break,
            Poll::Ready(Ok(None)) => break,
            Poll::Ready(Ok(Some(inbound))) => {
                let close = matches!(inbound, Message::Close(_));
                out.items.push(match inbound {
                    Message::Text(t) => Item::Text(t.as_bytes().to_vec()),
                    Message::Binary(b) => Item::Binary(b.len()),
                    Message::Ping(_) | Message::Pong(_) => Item::Control,
                    Message::Close(f) => Item::Close(f.map(|f| f.code)),
                });
                if close {
                    // The engine reads nothing after a close frame.
                    break;
                }
            }
            Poll::Ready(Err(WireError::Io(_))) => {
                out.truncated = true;
                break;
            }
            Poll::Ready(Err(WireError::Protocol(p))) => {
                out.error = Some(p.close_code());
                break;
            }
        }
    }
    out
}

fn split(input: &[u8]) -> (Settings, &[u8], &[u8]) {
    let settings = Settings::from_byte(input.first().copied().unwrap_or(0));
    let pattern = input.get(1..5).unwrap_or(&[]);
    let stream = input.get(5..).unwrap_or(&[]);
    (settings, pattern, stream)
}

/// [`read_frames`], then the invariants; panics on a violation:
///
/// * every text message is valid UTF-8, and no message exceeds the limit;
/// * the reader's heap stays under a bound set by the limits, not the input;
/// * an unmasked client frame is never accepted: if the stream holds one
///   after complete frames (none of them a close), the reader fails at or
///   before it, and yields at most one item per frame before it.
pub fn check(input: &[u8]) {
    let (settings, _, stream) = split(input);
    let out = read_frames(input);
    for item in &out.items {
        match item {
            Item::Text(t) => {
                assert!(std::str::from_utf8(t).is_ok(), "invalid UTF-8 accepted");
                assert!(t.len() <= settings.limits.max_message_size);
            }
            Item::Binary(n) => assert!(*n <= settings.limits.max_message_size),
            Item::Control | Item::Close(_) => {}
        }
    }
    assert!(
        out.max_buffered <= settings.memory_bound(),
        "reader held {} bytes, bound {}",
        out.max_buffered,
        settings.memory_bound()
    );
    if let Some(index) = first_unmasked_frame(stream) {
        assert!(
            out.error.is_some(),
            "unmasked frame {index} accepted: {out:?}"
        );
        assert!(out.items.len() <= index, "items from an unmasked frame");
    }
}

/// The index of the first unmasked frame that follows only complete frames,
/// none of them a close (tungstenite's header parser).
fn first_unmasked_frame(mut stream: &[u8]) -> Option<usize> {
    let mut index = 0;
    loop {
        let mut cursor = io::Cursor::new(stream);
        let (header, len) = FrameHeader::parse(&mut cursor).ok()??;
        if header.mask.is_none() {
            return Some(index);
        }
        if header.opcode
            == tungstenite::protocol::frame::coding::OpCode::Control(
                tungstenite::protocol::frame::coding::Control::Close,
            )
        {
            return None;
        }
        let end = usize::try_from(cursor.position())
            .ok()?
            .checked_add(usize::try_from(len).ok()?)?;
        stream = stream.get(end..)?;
        index += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::close_code;

    /// The checked-in seeds of `fuzz/seeds/frame_reader` pass the fuzz
    /// target's invariants (so the target and the seeds cannot rot).
    #[test]
    fn fuzz_seeds_pass_the_invariants() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/frame_reader");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).expect("seed directory") {
            let path = entry.expect("entry").path();
            let input = std::fs::read(&path).expect("seed");
            check(&input);
            // Some seeds' outcomes, so the invariants are not checked on
            // inputs that never reach the frames.
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let error = read_frames(&input).error;
            let expected = match name {
                "04_control_too_large" | "08_continuation_alone" | "20_unmasked_after_valid" => {
                    Some(close_code::PROTOCOL)
                }
                "10_utf8_invalid_split" | "18_deflate_corrupt" | "24_deflate_invalid_utf8" => {
                    Some(close_code::INVALID)
                }
                "17_deflate_bomb_tight" | "22_text_too_big_tight" => Some(close_code::SIZE),
                "01_text"
                | "07_fragments_with_ping"
                | "14_deflate_text"
                | "16_deflate_fragmented"
                | "15_deflate_context_takeover"
                | "23_byte_at_a_time" => None,
                _ => error,
            };
            assert_eq!(error, expected, "{name}");
            seen += 1;
        }
        assert!(seen >= 10, "only {seen} seeds");
    }

    #[test]
    fn an_unmasked_frame_is_refused_and_a_masked_one_accepted() {
        // Settings 0, no chunk pattern bytes that matter, then a frame.
        let unmasked = [0, 1, 1, 1, 1, 0x81, 0x02, b'h', b'i'];
        let out = read_frames(&unmasked);
        assert_eq!(out.error, Some(crate::message::close_code::PROTOCOL));
        check(&unmasked);
        let mut masked = vec![0, 1, 1, 1, 1, 0x81, 0x82, 0, 0, 0, 0, b'h', b'i'];
        masked.extend_from_slice(&[0x88, 0x80, 0, 0, 0, 0]);
        let out = read_frames(&masked);
        assert!(matches!(&out.items[..], [Item::Text(t), Item::Close(None)] if t == b"hi"));
        check(&masked);
    }
}
