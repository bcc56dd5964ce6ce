//! Raw deflate for permessage-deflate, on flate2 (zlib-rs backend).
//!
//! RFC 7692 section 7.2.1: a message is compressed with a sync flush and the
//! trailing empty stored block `00 00 ff ff` is removed; the receiver appends
//! it back before inflating the last frame.
//!
//! Without context takeover the (de)compressor is not the connection's: it is
//! taken from a per-thread pool for one message and reset before it goes back,
//! so idle connections hold none and a busy thread reuses the same few.

use std::{
    cell::RefCell,
    fmt,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};

use super::ProtocolError;
use crate::message::Utf8Bytes;

/// The empty stored block a sync flush ends with (RFC 7692 section 7.2.1).
pub(crate) const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Most pooled compressors (and, separately, decompressors) kept per thread.
pub(crate) const POOL_MAX: usize = 4;

thread_local! {
    static DEFLATERS: RefCell<Vec<(u8, u32, Compress)>> = const { RefCell::new(Vec::new()) };
    static INFLATERS: RefCell<Vec<Decompress>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a fresh raw-deflate compressor for `(window_bits, level)`,
/// borrowed from this thread's pool, and resets it afterwards.
fn with_pooled_deflater<R>(window_bits: u8, level: u32, f: impl FnOnce(&mut Compress) -> R) -> R {
    let pooled = DEFLATERS
        .try_with(|pool| {
            let mut pool = pool.borrow_mut();
            let at = pool
                .iter()
                .position(|(b, l, _)| *b == window_bits && *l == level)?;
            Some(pool.swap_remove(at).2)
        })
        .ok()
        .flatten();
    let mut compress = pooled.unwrap_or_else(|| new_deflater(window_bits, level));
    let out = f(&mut compress);
    compress.reset();
    let _ = DEFLATERS.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() >= POOL_MAX {
            pool.remove(0);
        }
        pool.push((window_bits, level, compress));
    });
    out
}

/// A raw-deflate compressor (flate2 accepts window bits 9..=15; negotiation never
/// agrees on less).
pub(crate) fn new_deflater(window_bits: u8, level: u32) -> Compress {
    Compress::new_with_window_bits(
        flate2::Compression::new(level.min(9)),
        false,
        window_bits.clamp(9, 15),
    )
}

/// A raw-deflate decompressor able to inflate what a `window_bits` compressor
/// produces (at least 9: a 9-bit window inflates 8-bit streams too).
pub(crate) fn new_inflater(window_bits: u8) -> Decompress {
    Decompress::new_with_window_bits(false, window_bits.clamp(9, 15))
}

/// Takes a 15-bit decompressor from this thread's pool (or makes one).
pub(crate) fn take_pooled_inflater() -> Decompress {
    INFLATERS
        .try_with(|pool| pool.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| new_inflater(15))
}

/// Resets a decompressor from [`take_pooled_inflater`] and gives it back.
pub(crate) fn return_pooled_inflater(mut inflater: Decompress) {
    inflater.reset(false);
    let _ = INFLATERS.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_MAX {
            pool.push(inflater);
        }
    });
}

/// Compresses one whole message with `compress` (sync flush, tail removed).
/// `None` if flate2 reports an error (the caller sends the message plain).
pub(crate) fn compress_message(compress: &mut Compress, input: &[u8]) -> Option<Vec<u8>> {
    let start_in = compress.total_in();
    let mut out = Vec::with_capacity(input.len() / 2 + 64);
    loop {
        let consumed = usize::try_from(compress.total_in() - start_in).ok()?;
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(256));
        }
        compress
            .compress_vec(&input[consumed..], &mut out, FlushCompress::Sync)
            .ok()?;
        let consumed = usize::try_from(compress.total_in() - start_in).ok()?;
        // zlib's contract: the flush is complete once output space is left over.
        if consumed == input.len() && out.len() < out.capacity() {
            break;
        }
    }
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
    Some(out)
}

/// Compresses a message with a pooled compressor (no context takeover).
pub(crate) fn compress_pooled(window_bits: u8, level: u32, input: &[u8]) -> Option<Vec<u8>> {
    with_pooled_deflater(window_bits, level, |c| compress_message(c, input))
}

/// Inflates `input` into `out`, failing with `MessageTooLarge` as soon as `out`
/// would exceed `limit` bytes (so a bomb never allocates more than about
/// `limit`). A deflate stream that ends (BFINAL) is restarted, so data after
/// it is inflated as a new stream.
pub(crate) fn inflate_into(
    inflater: &mut Decompress,
    input: &[u8],
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<(), ProtocolError> {
    let mut offset = 0;
    loop {
        if out.len() == out.capacity() {
            // Room for at most one byte past the limit, to detect going over.
            let room = limit.saturating_add(1).saturating_sub(out.len());
            if room == 0 {
                return Err(ProtocolError::MessageTooLarge);
            }
            let grow = out.capacity().max(4096).min(room);
            out.reserve_exact(grow);
        }
        let (in_before, out_before) = (inflater.total_in(), out.len());
        let status = inflater
            .decompress_vec(&input[offset..], out, FlushDecompress::Sync)
            .map_err(|_| ProtocolError::InvalidDeflate)?;
        if out.len() > limit {
            return Err(ProtocolError::MessageTooLarge);
        }
        offset += usize::try_from(inflater.total_in() - in_before)
            .map_err(|_| ProtocolError::InvalidDeflate)?;
        let progressed = inflater.total_in() != in_before || out.len() != out_before;
        if status == Status::StreamEnd {
            inflater.reset(false);
        }
        let done = offset >= input.len() && out.len() < out.capacity();
        if done {
            return Ok(());
        }
        if !progressed && status != Status::StreamEnd {
            // Input left, output space left, and no progress: broken stream.
            return Err(ProtocolError::InvalidDeflate);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inflate_all(data: &[u8], limit: usize) -> Result<Vec<u8>, ProtocolError> {
        let mut d = new_inflater(15);
        let mut out = Vec::new();
        inflate_into(&mut d, data, &mut out, limit)?;
        inflate_into(&mut d, &TAIL, &mut out, limit)?;
        Ok(out)
    }

    #[test]
    fn compressed_message_inflates_with_plain_flate2() {
        let json = br#"{"type":"chat.message","message":"hello hello hello hello"}"#.repeat(20);
        let c = compress_pooled(15, 1, &json).unwrap();
        assert!(c.len() < json.len() / 4, "{} of {}", c.len(), json.len());
        assert!(!c.ends_with(&TAIL));
        // Independent check with flate2's own raw inflater.
        let mut d = Decompress::new(false);
        let mut out = Vec::with_capacity(json.len() + 16);
        let mut input = c.clone();
        input.extend_from_slice(&TAIL);
        d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
            .unwrap();
        assert_eq!(out, json);
        assert_eq!(inflate_all(&c, 1 << 20).unwrap(), json);
    }

    #[test]
    fn pooled_compressor_starts_fresh_every_message() {
        // Without a reset, the second message would refer back to the first.
        let msg = b"the same message, twice, through the same pooled compressor".repeat(4);
        let a = compress_pooled(15, 1, &msg).unwrap();
        let b = compress_pooled(15, 1, &msg).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn inflate_respects_the_limit_exactly() {
        let data = vec![b'a'; 10_000];
        let c = compress_pooled(15, 1, &data).unwrap();
        assert_eq!(inflate_all(&c, 10_000).unwrap().len(), 10_000);
        assert_eq!(inflate_all(&c, 9_999), Err(ProtocolError::MessageTooLarge));
    }

    #[test]
    fn garbage_is_invalid_deflate() {
        // 0xff: BTYPE 11 (reserved), an invalid block type.
        assert_eq!(
            inflate_all(&[0xff, 0xff, 0xff, 0xff], 1 << 20),
            Err(ProtocolError::InvalidDeflate)
        );
    }

    #[test]
    fn bfinal_stream_followed_by_more_data_is_inflated() {
        // A client may end a message with a final block; the tail then starts
        // a new (empty) stream.
        let mut c = Compress::new(flate2::Compression::new(6), false);
        let mut out = Vec::with_capacity(256);
        c.compress_vec(b"final block", &mut out, FlushCompress::Finish)
            .unwrap();
        assert_eq!(inflate_all(&out, 1024).unwrap(), b"final block");
    }
}
