use super::*;
use crate::message::{CloseFrame, Utf8Bytes};
use flate2::{Decompress, FlushDecompress};
use std::{future::poll_fn, task::Waker};

/// A server frame as a client sees it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ServerFrame {
    pub(crate) rsv1: bool,
    pub(crate) opcode: u8,
    pub(crate) payload: Vec<u8>,
}

/// Splits what a server wrote into frames (unmasked, FIN set).
pub(crate) fn parse_server_frames(mut wire: &[u8]) -> Vec<ServerFrame> {
    let mut out = Vec::new();
    while !wire.is_empty() {
        let mut cursor = Cursor::new(wire);
        let (h, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
        assert!(h.is_final && h.mask.is_none() && !h.rsv2 && !h.rsv3);
        let start = cursor.position() as usize;
        let end = start + len as usize;
        out.push(ServerFrame {
            rsv1: h.rsv1,
            opcode: u8::from(h.opcode),
            payload: wire[start..end].to_vec(),
        });
        wire = &wire[end..];
    }
    out
}

/// Inflates like a client (flate2 directly, tail appended).
pub(crate) fn client_inflate(d: &mut Decompress, payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&deflate::TAIL);
    let mut out = Vec::with_capacity(1 << 20);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    out
}

/// An in-memory sink that records how it was written to.
#[derive(Default)]
pub(crate) struct Recorder {
    pub(crate) data: Vec<u8>,
    /// One entry per write call: the (pointer, length) of every slice.
    pub(crate) calls: Vec<Vec<(usize, usize)>>,
    pub(crate) vectored: bool,
    /// Accept at most this many bytes per call (0 = no limit).
    pub(crate) max_per_call: usize,
    /// Return `Pending` (after waking) before every write.
    pub(crate) stutter: bool,
    pending_next: bool,
    pub(crate) flushes: usize,
}

impl Recorder {
    fn take(&mut self, bufs: &[IoSlice<'_>]) -> usize {
        self.calls.push(
            bufs.iter()
                .map(|b| (b.as_ptr() as usize, b.len()))
                .collect(),
        );
        let mut budget = if self.max_per_call == 0 {
            usize::MAX
        } else {
            self.max_per_call
        };
        let mut n = 0;
        for b in bufs {
            let k = b.len().min(budget);
            self.data.extend_from_slice(&b[..k]);
            n += k;
            budget -= k;
            if budget == 0 {
                break;
            }
        }
        n
    }

    fn stutter(&mut self, cx: &mut Context<'_>) -> bool {
        if self.stutter {
            self.pending_next = !self.pending_next;
            if self.pending_next {
                cx.waker().wake_by_ref();
                return true;
            }
        }
        false
    }
}

impl AsyncWrite for Recorder {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.stutter(cx) {
            return Poll::Pending;
        }
        Poll::Ready(Ok(self.take(&[IoSlice::new(buf)])))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.stutter(cx) {
            return Poll::Pending;
        }
        Poll::Ready(Ok(self.take(bufs)))
    }

    fn is_write_vectored(&self) -> bool {
        self.vectored
    }

    fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.flushes += 1;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

pub(crate) fn flush_now(writer: &mut FrameWriter, io: &mut Recorder) {
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(r) = writer.poll_flush(io, &mut cx) {
            r.unwrap();
            return;
        }
    }
}

fn written(deflate: Option<DeflateParams>, msgs: &[Message]) -> Vec<ServerFrame> {
    let mut w = FrameWriter::new(deflate, 8192);
    let mut io = Recorder::default();
    for m in msgs {
        w.queue(&Outbound::Message(m.clone()));
    }
    flush_now(&mut w, &mut io);
    parse_server_frames(&io.data)
}

fn json(n: usize) -> String {
    let mut s = String::from("[");
    for i in 0..n {
        s.push_str(&format!(
            r#"{{"type":"chat.message","user":"user{}","message":"hello number {i}"}},"#,
            i % 7
        ));
    }
    s.push(']');
    s
}

#[test]
fn plain_frames_encode() {
    let frames = written(
        None,
        &[
            Message::text("hi"),
            Message::binary(vec![1, 2]),
            Message::Ping(Bytes::from_static(b"p")),
            Message::Pong(Bytes::new()),
            Message::close(1000, "bye"),
            Message::Close(None),
        ],
    );
    let f = |opcode, payload: &[u8]| ServerFrame {
        rsv1: false,
        opcode,
        payload: payload.to_vec(),
    };
    assert_eq!(
        frames,
        vec![
            f(1, b"hi"),
            f(2, &[1, 2]),
            f(9, b"p"),
            f(10, b""),
            f(8, b"\x03\xe8bye"),
            f(8, b""),
        ]
    );
}

#[test]
fn long_close_reason_set_on_the_field_is_cut_at_a_char_boundary() {
    let close = Message::Close(Some(CloseFrame {
        code: 4000,
        reason: Utf8Bytes::from("é".repeat(100)),
    }));
    let frames = written(None, &[close]);
    assert_eq!(frames[0].payload.len(), 2 + 122);
    assert!(std::str::from_utf8(&frames[0].payload[2..]).is_ok());
}

#[test]
fn compression_round_trip_without_context_takeover() {
    let text = json(20);
    let d = DeflateParams::no_context_takeover(1, 256);
    let frames = written(
        Some(d),
        &[
            Message::text(text.clone()),
            Message::text(text.clone()),
            Message::text("short"),
            Message::Ping(Bytes::from(vec![b'a'; 125])),
        ],
    );
    assert!(frames[0].rsv1 && frames[1].rsv1);
    assert!(frames[0].payload.len() < text.len() / 3);
    // No context: both messages compress to the same bytes.
    assert_eq!(frames[0].payload, frames[1].payload);
    for f in &frames[..2] {
        // A fresh client inflater for every message.
        let mut d = Decompress::new(false);
        assert_eq!(client_inflate(&mut d, &f.payload), text.as_bytes());
    }
    // Below the threshold, and control frames: never compressed.
    assert!(!frames[2].rsv1 && !frames[3].rsv1);
    assert_eq!(frames[2].payload, b"short");
}

#[test]
fn compression_round_trip_with_context_takeover() {
    let text = json(20);
    let d = DeflateParams {
        server_no_context_takeover: false,
        ..DeflateParams::no_context_takeover(1, 0)
    };
    let frames = written(
        Some(d),
        &[Message::text(text.clone()), Message::text(text.clone())],
    );
    assert!(frames[0].rsv1 && frames[1].rsv1);
    // The second message refers back to the first.
    assert!(
        frames[1].payload.len() < frames[0].payload.len() / 2,
        "{} vs {}",
        frames[1].payload.len(),
        frames[0].payload.len()
    );
    let mut client = Decompress::new(false);
    assert_eq!(
        client_inflate(&mut client, &frames[0].payload),
        text.as_bytes()
    );
    assert_eq!(
        client_inflate(&mut client, &frames[1].payload),
        text.as_bytes()
    );
}

#[test]
fn small_window_output_inflates_with_that_window() {
    let text = json(50);
    let d = DeflateParams {
        server_max_window_bits: 9,
        ..DeflateParams::no_context_takeover(1, 0)
    };
    let frames = written(Some(d), &[Message::text(text.clone())]);
    let mut client = Decompress::new_with_window_bits(false, 9);
    assert_eq!(
        client_inflate(&mut client, &frames[0].payload),
        text.as_bytes()
    );
}

#[test]
fn incompressible_payload_goes_plain_without_context_takeover() {
    // A xorshift sequence: deflate cannot shrink it.
    let mut x: u32 = 0x1234_5678;
    let noise: Vec<u8> = (0..2000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let frames = written(
        Some(DeflateParams::no_context_takeover(1, 16)),
        &[Message::binary(noise.clone())],
    );
    assert!(!frames[0].rsv1);
    assert_eq!(frames[0].payload, noise);

    // Threshold 0 means "compress everything", even when it grows.
    let frames = written(
        Some(DeflateParams::no_context_takeover(1, 0)),
        &[Message::binary(noise.clone())],
    );
    assert!(frames[0].rsv1);
    assert!(frames[0].payload.len() > noise.len());
    assert_eq!(
        client_inflate(&mut Decompress::new(false), &frames[0].payload),
        noise
    );
}

#[test]
fn shared_payload_is_compressed_once_for_n_writers() {
    let text = json(15);
    let payload = SharedPayload::text(Utf8Bytes::from(text.clone()));
    let d = DeflateParams::no_context_takeover(1, 256);
    let mut outputs = Vec::new();
    for _ in 0..100 {
        let mut w = FrameWriter::new(Some(d), 8192);
        let mut io = Recorder::default();
        w.queue(&Outbound::Shared(payload.clone()));
        flush_now(&mut w, &mut io);
        outputs.push(io.data);
    }
    assert_eq!(payload.compressions(), 1);
    assert!(outputs.windows(2).all(|w| w[0] == w[1]));
    let frames = parse_server_frames(&outputs[0]);
    assert!(frames[0].rsv1);
    assert_eq!(
        client_inflate(&mut Decompress::new(false), &frames[0].payload),
        text.as_bytes()
    );

    // Another window size is another compression; the same params again are not.
    let small = DeflateParams {
        server_max_window_bits: 10,
        ..d
    };
    for params in [small, d, small] {
        let mut w = FrameWriter::new(Some(params), 8192);
        w.queue(&Outbound::Shared(payload.clone()));
    }
    assert_eq!(payload.compressions(), 2);

    // With context takeover each connection compresses itself (the cache is not used).
    let takeover = DeflateParams {
        server_no_context_takeover: false,
        ..d
    };
    let fresh = SharedPayload::text(Utf8Bytes::from(text.clone()));
    let mut w = FrameWriter::new(Some(takeover), 8192);
    let mut io = Recorder::default();
    w.queue(&Outbound::Shared(fresh.clone()));
    flush_now(&mut w, &mut io);
    assert_eq!(fresh.compressions(), 0);
    let frames = parse_server_frames(&io.data);
    assert!(frames[0].rsv1);
    assert_eq!(
        client_inflate(&mut Decompress::new(false), &frames[0].payload),
        text.as_bytes()
    );

    // Below the threshold, or without deflate: plain, never compressed.
    let tiny = SharedPayload::binary(Bytes::from_static(b"tiny"));
    let mut w = FrameWriter::new(Some(d), 8192);
    w.queue(&Outbound::Shared(tiny.clone()));
    let mut w2 = FrameWriter::new(None, 8192);
    w2.queue(&Outbound::Shared(payload.clone()));
    assert_eq!(tiny.compressions(), 0);
}

#[test]
fn shared_payload_compressed_once_across_threads() {
    let payload = SharedPayload::text(Utf8Bytes::from(json(15)));
    let d = DeflateParams::no_context_takeover(1, 0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..25 {
                    let mut w = FrameWriter::new(Some(d), 8192);
                    w.queue(&Outbound::Shared(payload.clone()));
                }
            });
        }
    });
    assert_eq!(payload.compressions(), 1);
}

#[test]
fn large_payloads_are_written_vectored_without_a_copy() {
    let big = Bytes::from(vec![9u8; 64 * 1024]);
    let shared = SharedPayload::binary(Bytes::from(vec![5u8; 32 * 1024]));
    let mut w = FrameWriter::new(None, 8192);
    w.queue(&Outbound::Message(Message::text("small one")));
    w.queue(&Outbound::Message(Message::Binary(big.clone())));
    w.queue(&Outbound::Shared(shared.clone()));
    w.queue(&Outbound::Message(Message::text("small two")));
    // 64 KiB needs the 8-byte length form, 32 KiB the 2-byte one.
    let expected_len = (2 + 9) + (10 + 65536) + (4 + 32768) + (2 + 9);
    assert_eq!(w.queued_bytes(), expected_len);

    let mut io = Recorder {
        vectored: true,
        ..Recorder::default()
    };
    flush_now(&mut w, &mut io);
    // One vectored call: [small + header], [big], [header], [shared], [small].
    assert_eq!(io.calls.len(), 1, "{:?}", io.calls);
    let slices = &io.calls[0];
    assert_eq!(slices.len(), 5);
    // The payloads are the caller's own buffers: no copy.
    assert_eq!(slices[1], (big.as_ptr() as usize, big.len()));
    assert_eq!(
        slices[3],
        (shared.plain().as_ptr() as usize, shared.plain().len())
    );
    assert_eq!(io.flushes, 1);
    assert_eq!(w.queued_bytes(), 0);
    let frames = parse_server_frames(&io.data);
    assert_eq!(frames.len(), 4);
    assert_eq!(frames[1].payload, &big[..]);
    assert_eq!(frames[2].payload, &shared.plain()[..]);
}

#[test]
fn partial_and_pending_writes_produce_the_same_bytes() {
    let msgs = [
        Message::text("a"),
        Message::Binary(Bytes::from(vec![3u8; 10_000])),
        Message::text(json(30)),
        Message::Ping(Bytes::from_static(b"x")),
    ];
    let mut reference = Recorder::default();
    let mut w = FrameWriter::new(Some(DeflateParams::no_context_takeover(1, 100)), 8192);
    for m in &msgs {
        w.queue(&Outbound::Message(m.clone()));
    }
    flush_now(&mut w, &mut reference);
    for vectored in [false, true] {
        let mut io = Recorder {
            vectored,
            max_per_call: 7,
            stutter: true,
            ..Recorder::default()
        };
        let mut w = FrameWriter::new(Some(DeflateParams::no_context_takeover(1, 100)), 8192);
        for m in &msgs {
            w.queue(&Outbound::Message(m.clone()));
        }
        flush_now(&mut w, &mut io);
        assert_eq!(io.data, reference.data);
        assert_eq!(io.flushes, 1);
        assert_eq!(w.queued_bytes(), 0);
    }
}

#[tokio::test]
async fn write_buffer_is_released_after_a_1_mib_message() {
    let mut w = FrameWriter::new(Some(DeflateParams::no_context_takeover(1, 256)), 8192);
    let mut io = Recorder::default();
    let big = Message::text("x".repeat(1 << 20));
    w.queue(&Outbound::Message(big.clone()));
    w.queue(&Outbound::Message(Message::binary(vec![1u8; 1 << 20])));
    assert!(w.buffered_bytes() > 0);
    poll_fn(|cx| w.poll_flush(&mut io, cx)).await.unwrap();
    assert_eq!(w.buffered_bytes(), 0);
    assert_eq!(w.queued_bytes(), 0);
}

#[test]
fn zero_writes_are_an_error() {
    struct Zero;
    impl AsyncWrite for Zero {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(0))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }
    let mut w = FrameWriter::new(None, 8192);
    w.queue(&Outbound::Message(Message::text("x")));
    let mut cx = Context::from_waker(Waker::noop());
    match w.poll_flush(&mut Zero, &mut cx) {
        Poll::Ready(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::WriteZero),
        other => panic!("{other:?}"),
    }
}

/// What an idle connection with permessage-deflate negotiated holds after it
/// read and wrote a compressed message: the reader and writer structs plus
/// their heap buffers. The numbers in the module docs' memory table come
/// from this test's output (`cargo test --lib idle_connection_memory --
/// --nocapture`).
#[tokio::test]
async fn idle_connection_memory_with_deflate() {
    use crate::engine::wire::{FrameReader, WireLimits};
    use tungstenite::protocol::frame::Frame;
    let params = DeflateParams::no_context_takeover(1, 0);
    let limits = WireLimits {
        max_message_size: 1 << 20,
        max_frame_size: 1 << 20,
        inflate: None,
    };
    let mut reader = FrameReader::new(limits, Some(params), 2048);
    let mut w = FrameWriter::new(Some(params), 8192);
    let text = "a JSON-ish chat line ".repeat(200);

    // One compressed message in (a masked client frame), one out.
    let mut c = flate2::Compress::new(flate2::Compression::new(1), false);
    let mut deflated = Vec::with_capacity(text.len() + 64);
    c.compress_vec(text.as_bytes(), &mut deflated, flate2::FlushCompress::Sync)
        .unwrap();
    deflated.truncate(deflated.len() - deflate::TAIL.len());
    let mut frame = Frame::message(deflated, OpCode::Data(Data::Text), true);
    frame.header_mut().rsv1 = true;
    frame.header_mut().mask = Some([1, 2, 3, 4]);
    let mut wire = Vec::new();
    frame.format(&mut wire).unwrap();
    let mut input = &wire[..];
    let got = poll_fn(|cx| reader.poll_read(&mut input, cx))
        .await
        .unwrap();
    assert!(matches!(got, Some(Message::Text(t)) if t.as_str() == text));
    let mut io = Recorder::default();
    let out = Message::text(text);
    w.queue(&Outbound::Message(out.clone()));
    flush_now(&mut w, &mut io);
    assert!(parse_server_frames(&io.data)[0].rsv1, "sent compressed");

    let structs = std::mem::size_of::<FrameReader>() + std::mem::size_of::<FrameWriter>();
    // Between messages the reader holds no read buffer (the next read
    // starts on the stack) and the writer released its buffer.
    assert_eq!(reader.buffered_bytes(), 0, "idle reader holds a buffer");
    let heap = reader.buffered_bytes() + w.buffered_bytes();
    println!(
        "idle connection with deflate: FrameReader {} B + FrameWriter {} B structs, \
         read buffer {} B, write buffer {} B, total {} B",
        std::mem::size_of::<FrameReader>(),
        std::mem::size_of::<FrameWriter>(),
        reader.buffered_bytes(),
        w.buffered_bytes(),
        structs + heap,
    );
    // A connection sending data keeps a small write buffer between
    // writes; a ping interval without data gives it back.
    assert!(
        w.buffered_bytes() <= KEPT_BUFFER,
        "{} B kept",
        w.buffered_bytes()
    );
    assert!(structs + heap <= 8 << 10, "{} bytes", structs + heap);
    w.queue(&Outbound::Message(Message::Ping(Bytes::new())));
    flush_now(&mut w, &mut io);
    assert_eq!(
        w.buffered_bytes(),
        0,
        "the write buffer is released after a ping"
    );
}

/// A connection that sends small messages writes each from the same buffer
/// (no allocation per write); a burst that grew it past `KEPT_BUFFER`, or
/// a ping after a quiet interval, gives it back; control frames alone keep
/// none.
#[test]
fn write_buffer_is_kept_between_small_writes_and_bounded() {
    let mut w = FrameWriter::new(None, 8192);
    let mut io = Recorder::default();
    // Control frames only (pongs): nothing kept.
    w.queue(&Outbound::Message(Message::Pong(Bytes::from_static(b"p"))));
    flush_now(&mut w, &mut io);
    assert_eq!(w.buffered_bytes(), 0);

    w.queue(&Outbound::Message(Message::text("a".repeat(100))));
    flush_now(&mut w, &mut io);
    let kept = w.buffered_bytes();
    assert!((1..=KEPT_BUFFER).contains(&kept), "{kept} B kept");
    let first = w.buf.as_ptr();
    w.queue(&Outbound::Message(Message::text("b".repeat(100))));
    assert_eq!(
        w.buf.as_ptr(),
        first,
        "the next frame reuses the kept buffer"
    );
    flush_now(&mut w, &mut io);
    assert_eq!(w.buffered_bytes(), kept);

    // A burst grows the buffer past the bound: released after the flush.
    for _ in 0..20 {
        w.queue(&Outbound::Message(Message::text("c".repeat(200))));
    }
    flush_now(&mut w, &mut io);
    assert!(
        w.buffered_bytes() <= KEPT_BUFFER,
        "{} B",
        w.buffered_bytes()
    );

    // Everything arrived, in order.
    let frames = parse_server_frames(&io.data);
    assert_eq!(frames.len(), 23);
}
