use super::*;
use crate::message::close_code;
use flate2::{Compress, Compression as Level, FlushCompress};
use std::future::poll_fn;

const LIMITS: WireLimits = WireLimits {
    max_message_size: 1 << 20,
    max_frame_size: 1 << 20,
    inflate: None,
};

/// A masked client frame, as a browser would send it.
pub(crate) fn client_frame(fin: bool, rsv1: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let header = FrameHeader {
        is_final: fin,
        rsv1,
        rsv2: false,
        rsv3: false,
        opcode: OpCode::from(opcode),
        mask: Some(mask),
    };
    let mut out = Vec::new();
    header.format(payload.len() as u64, &mut out).unwrap();
    let mut body = payload.to_vec();
    apply_mask(&mut body, mask);
    out.extend_from_slice(&body);
    out
}

/// Raw deflate as a client would do it, with flate2 directly: sync flush, tail removed.
pub(crate) fn client_deflate(c: &mut Compress, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert!(out.ends_with(&TAIL));
    out.truncate(out.len() - 4);
    out
}

fn deflate_params(client_no_context_takeover: bool) -> DeflateParams {
    DeflateParams {
        client_no_context_takeover,
        ..DeflateParams::no_context_takeover(1, 0)
    }
}

/// Reads everything `wire` holds: the messages, then the error or clean EOF.
async fn read_all(
    reader: &mut FrameReader,
    mut wire: impl AsyncRead + Unpin,
) -> (Vec<Message>, Option<WireError>) {
    let mut out = Vec::new();
    loop {
        match poll_fn(|cx| reader.poll_read(&mut wire, cx)).await {
            Ok(Some(m)) => out.push(m),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

async fn read_bytes(
    limits: WireLimits,
    deflate: Option<DeflateParams>,
    wire: &[u8],
) -> (Vec<Message>, Option<ProtocolError>) {
    let mut reader = FrameReader::new(limits, deflate, 2048);
    let (msgs, err) = read_all(&mut reader, wire).await;
    let err = err.map(|e| match e {
        WireError::Protocol(p) => p,
        WireError::Io(e) => panic!("unexpected i/o error {e}"),
    });
    (msgs, err)
}

async fn protocol_error(deflate: Option<DeflateParams>, wire: &[u8]) -> ProtocolError {
    read_bytes(LIMITS, deflate, wire)
        .await
        .1
        .expect("a protocol error")
}

fn text(s: &str) -> Message {
    Message::Text(Utf8Bytes::from(s))
}

/// Hands out one byte per read, returning `Pending` (after waking) in between.
struct Trickle<'a> {
    data: &'a [u8],
    pending: bool,
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pending {
            self.pending = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.pending = true;
        if let Some((first, rest)) = self.data.split_first() {
            buf.put_slice(&[*first]);
            self.data = rest;
        }
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn single_frames_and_control_frames() {
    let mut wire = client_frame(true, false, 1, b"hello");
    wire.extend(client_frame(true, false, 2, &[0, 1, 2]));
    wire.extend(client_frame(true, false, 9, b"ping"));
    wire.extend(client_frame(true, false, 10, b"pong"));
    wire.extend(client_frame(true, false, 8, b"\x03\xe8bye"));
    let (msgs, err) = read_bytes(LIMITS, None, &wire).await;
    assert_eq!(err, None);
    assert_eq!(
        msgs,
        vec![
            text("hello"),
            Message::Binary(Bytes::from_static(&[0, 1, 2])),
            Message::Ping(Bytes::from_static(b"ping")),
            Message::Pong(Bytes::from_static(b"pong")),
            Message::Close(Some(CloseFrame::new(close_code::NORMAL, "bye"))),
        ]
    );
}

#[tokio::test]
async fn fragments_with_control_frames_in_between() {
    let mut wire = client_frame(false, false, 1, b"Hel");
    wire.extend(client_frame(true, false, 9, b"p1"));
    wire.extend(client_frame(false, false, 0, b"lo, "));
    wire.extend(client_frame(true, false, 10, b""));
    wire.extend(client_frame(true, false, 0, b"world"));
    wire.extend(client_frame(false, false, 2, b"\x01"));
    wire.extend(client_frame(true, false, 0, b"\x02"));
    let expected = vec![
        Message::Ping(Bytes::from_static(b"p1")),
        Message::Pong(Bytes::new()),
        text("Hello, world"),
        Message::Binary(Bytes::from_static(&[1, 2])),
    ];
    let (msgs, err) = read_bytes(LIMITS, None, &wire).await;
    assert_eq!((msgs, err), (expected.clone(), None));
    // The same bytes one at a time, with a `Pending` between every byte.
    let mut reader = FrameReader::new(LIMITS, None, 2048);
    let (msgs, err) = read_all(
        &mut reader,
        Trickle {
            data: &wire,
            pending: false,
        },
    )
    .await;
    assert!(err.is_none());
    assert_eq!(msgs, expected);
}

#[tokio::test]
async fn utf8_split_across_fragments_is_fine() {
    let s = "é€𝄞";
    let b = s.as_bytes();
    let mut wire = Vec::new();
    // Split inside every multi-byte sequence.
    wire.extend(client_frame(false, false, 1, &b[..1]));
    wire.extend(client_frame(false, false, 0, &b[1..3]));
    wire.extend(client_frame(false, false, 0, &b[3..6]));
    wire.extend(client_frame(true, false, 0, &b[6..]));
    let (msgs, err) = read_bytes(LIMITS, None, &wire).await;
    assert_eq!((msgs, err), (vec![text(s)], None));
}

#[tokio::test]
async fn invalid_utf8_fails_fast_and_at_the_end() {
    // An impossible byte in the first fragment fails before the message ends.
    let wire = client_frame(false, false, 1, b"ok \xff");
    assert_eq!(
        protocol_error(None, &wire).await,
        ProtocolError::InvalidUtf8
    );
    // A sequence cut off by the last fragment.
    let mut wire = client_frame(false, false, 1, b"caf");
    wire.extend(client_frame(true, false, 0, b"\xc3"));
    let e = protocol_error(None, &wire).await;
    assert_eq!(
        (e.clone(), e.close_code()),
        (ProtocolError::InvalidUtf8, 1007)
    );
    // A single frame.
    let wire = client_frame(true, false, 1, b"\xc3\x28");
    assert_eq!(
        protocol_error(None, &wire).await,
        ProtocolError::InvalidUtf8
    );
}

#[tokio::test]
async fn close_frames_are_validated() {
    let ok = |payload: &'static [u8]| async move {
        read_bytes(LIMITS, None, &client_frame(true, false, 8, payload)).await
    };
    assert_eq!(ok(b"").await, (vec![Message::Close(None)], None));
    assert_eq!(
        ok(b"\x0b\xb8").await.0,
        vec![Message::Close(Some(CloseFrame::new(3000, "")))]
    );
    assert_eq!(
        ok(b"\x0f\x9f").await.0,
        vec![Message::Close(Some(CloseFrame::new(3999, "")))]
    );
    for (payload, want) in [
        (&b"\x03"[..], ProtocolError::CloseTooShort),
        (b"\x03\xed", ProtocolError::InvalidCloseCode), // 1005
        (b"\x03\xee", ProtocolError::InvalidCloseCode), // 1006
        (b"\x03\xec", ProtocolError::InvalidCloseCode), // 1004
        (b"\x03\xf7", ProtocolError::InvalidCloseCode), // 1015
        (b"\x03\xe7", ProtocolError::InvalidCloseCode), // 999
        (b"\x13\x88", ProtocolError::InvalidCloseCode), // 5000
        (b"\x00\x00", ProtocolError::InvalidCloseCode), // 0
        (b"\x03\xe8\xff", ProtocolError::InvalidCloseReason),
    ] {
        let e = protocol_error(None, &client_frame(true, false, 8, payload)).await;
        assert_eq!(e, want, "{payload:?}");
    }
    assert_eq!(ProtocolError::InvalidCloseReason.close_code(), 1007);
    assert_eq!(ProtocolError::InvalidCloseCode.close_code(), 1002);
}

#[tokio::test]
async fn framing_violations() {
    let mut rsv2 = client_frame(true, false, 1, b"x");
    rsv2[0] |= 0x20;
    let mut unmasked = client_frame(true, false, 1, b"");
    unmasked[1] &= 0x7f;
    let mut text_in_fragmented = client_frame(false, false, 1, b"a");
    text_in_fragmented.extend(client_frame(true, false, 1, b"b"));
    let mut rsv1_on_continuation = client_frame(false, true, 1, b"");
    rsv1_on_continuation.extend(client_frame(true, true, 0, b""));
    let cases: Vec<(Vec<u8>, Option<DeflateParams>, ProtocolError)> = vec![
        (
            client_frame(false, false, 9, b""),
            None,
            ProtocolError::FragmentedControl,
        ),
        (
            client_frame(true, false, 9, &[0; 126]),
            None,
            ProtocolError::ControlTooLarge,
        ),
        (
            client_frame(true, true, 9, b""),
            Some(deflate_params(true)),
            ProtocolError::ReservedBits,
        ),
        (rsv2, None, ProtocolError::ReservedBits),
        (
            client_frame(true, false, 3, b""),
            None,
            ProtocolError::BadOpcode,
        ),
        (
            client_frame(true, false, 11, b""),
            None,
            ProtocolError::BadOpcode,
        ),
        (unmasked, None, ProtocolError::UnmaskedFrame),
        (
            client_frame(true, false, 0, b"x"),
            None,
            ProtocolError::UnexpectedContinuation,
        ),
        (
            text_in_fragmented,
            None,
            ProtocolError::ExpectedContinuation,
        ),
        (
            client_frame(true, true, 1, b"x"),
            None,
            ProtocolError::CompressionNotNegotiated,
        ),
        (
            rsv1_on_continuation,
            Some(deflate_params(true)),
            ProtocolError::ReservedBits,
        ),
    ];
    for (wire, deflate, want) in cases {
        let e = protocol_error(deflate, &wire).await;
        assert_eq!(e, want);
        assert_eq!(e.close_code(), 1002);
    }
}

#[tokio::test]
async fn oversized_frames_fail_before_their_payload_arrives() {
    let limits = WireLimits {
        max_message_size: 100,
        max_frame_size: 60,
        inflate: None,
    };
    // Only the header of a frame announcing 61 bytes: rejected at once.
    let header = &client_frame(true, false, 2, &[0; 61])[..6];
    let (msgs, err) = read_bytes(limits, None, header).await;
    assert!(msgs.is_empty());
    assert_eq!(err, Some(ProtocolError::FrameTooLarge));
    assert_eq!(ProtocolError::FrameTooLarge.close_code(), 1009);
    // Two fragments of 60 make a message of 120.
    let mut wire = client_frame(false, false, 2, &[0; 60]);
    wire.extend(&client_frame(true, false, 0, &[0; 60])[..8]);
    let (_, err) = read_bytes(limits, None, &wire).await;
    assert_eq!(err, Some(ProtocolError::MessageTooLarge));
    // A 64-bit length that no usize holds.
    let mut huge = vec![0x82, 0xff];
    huge.extend_from_slice(&u64::MAX.to_be_bytes());
    huge.extend_from_slice(&[1, 2, 3, 4]);
    assert_eq!(
        read_bytes(limits, None, &huge).await.1,
        Some(ProtocolError::MessageTooLarge)
    );
}

#[tokio::test]
async fn eof_between_messages_is_clean_inside_is_not() {
    let mut reader = FrameReader::new(LIMITS, None, 2048);
    let (msgs, err) = read_all(&mut reader, &client_frame(true, false, 1, b"a")[..]).await;
    assert_eq!(msgs.len(), 1);
    assert!(err.is_none());
    for wire in [
        client_frame(true, false, 1, b"abc")[..4].to_vec(),
        client_frame(false, false, 1, b"abc"),
    ] {
        let mut reader = FrameReader::new(LIMITS, None, 2048);
        let (_, err) = read_all(&mut reader, &wire[..]).await;
        match err {
            Some(WireError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn compressed_messages_inflate() {
    let json = br#"{"type":"chat.message","message":"compressed hello"}"#.repeat(10);
    let mut c = Compress::new(Level::new(6), false);
    let deflated = client_deflate(&mut c, &json);
    // One frame.
    let mut wire = client_frame(true, true, 1, &deflated);
    // Three fragments with a ping in between (only the first has RSV1).
    let mut c = Compress::new(Level::new(6), false);
    let deflated2 = client_deflate(&mut c, &json);
    let (a, rest) = deflated2.split_at(5);
    let (b, d) = rest.split_at(rest.len() / 2);
    wire.extend(client_frame(false, true, 2, a));
    wire.extend(client_frame(true, false, 9, b"!"));
    wire.extend(client_frame(false, false, 0, b));
    wire.extend(client_frame(true, false, 0, d));
    // An uncompressed message in between compressed ones is fine.
    wire.extend(client_frame(true, false, 1, b"plain"));
    let (msgs, err) = read_bytes(LIMITS, Some(deflate_params(true)), &wire).await;
    assert_eq!(err, None);
    let json_text = std::str::from_utf8(&json).unwrap();
    assert_eq!(
        msgs,
        vec![
            text(json_text),
            Message::Ping(Bytes::from_static(b"!")),
            Message::Binary(Bytes::from(json.clone())),
            text("plain"),
        ]
    );
}

#[tokio::test]
async fn client_context_takeover_keeps_the_window() {
    // The client keeps its context: the second message refers to the first.
    let msg = b"a message long enough to be referred back to by the next one".repeat(3);
    let mut c = Compress::new(Level::new(6), false);
    let first = client_deflate(&mut c, &msg);
    let second = client_deflate(&mut c, &msg);
    assert!(second.len() < first.len() / 2, "second refers back");
    let mut wire = client_frame(true, true, 2, &first);
    wire.extend(client_frame(true, true, 2, &second));

    let (msgs, err) = read_bytes(LIMITS, Some(deflate_params(false)), &wire).await;
    assert_eq!(err, None);
    assert_eq!(msgs, vec![Message::Binary(Bytes::from(msg.clone())); 2]);

    // A server that (per negotiation) inflates every message fresh cannot
    // resolve the back-reference: 1007, not garbage.
    let (msgs, err) = read_bytes(LIMITS, Some(deflate_params(true)), &wire).await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(err, Some(ProtocolError::InvalidDeflate));
}

#[tokio::test]
async fn invalid_deflate_data_is_1007() {
    let wire = client_frame(true, true, 1, &[0xff, 0xfe, 0xfd, 0xfc, 0xfb]);
    let e = protocol_error(Some(deflate_params(true)), &wire).await;
    assert_eq!(
        (e.clone(), e.close_code()),
        (ProtocolError::InvalidDeflate, 1007)
    );
}

#[tokio::test]
async fn compressed_invalid_utf8_is_1007() {
    let mut c = Compress::new(Level::new(6), false);
    let wire = client_frame(true, true, 1, &client_deflate(&mut c, b"bad \xff text"));
    assert_eq!(
        protocol_error(Some(deflate_params(true)), &wire).await,
        ProtocolError::InvalidUtf8
    );
}

#[tokio::test]
async fn compression_bomb_is_1009_without_the_memory() {
    // 64 MiB of zeros in about 64 KiB: a sync-flushed raw stream of 1 MiB of
    // zeros ends byte-aligned and only refers to its own output, so 64 copies
    // of it are one valid stream (and cheap to build in a debug test).
    let mut c = Compress::new(Level::new(9), false);
    let chunk = client_deflate(&mut c, &vec![0u8; 1 << 20]);
    let mut bomb = Vec::new();
    for _ in 0..64 {
        bomb.extend_from_slice(&chunk);
        bomb.extend_from_slice(&TAIL);
    }
    assert!(bomb.len() < 100 * 1024, "bomb is {} bytes", bomb.len());
    let wire = client_frame(true, true, 2, &bomb);
    let e = protocol_error(Some(deflate_params(true)), &wire).await;
    assert_eq!(
        (e.clone(), e.close_code()),
        (ProtocolError::MessageTooLarge, 1009)
    );

    // The inflater stops at the limit: the output never holds more than limit + 1.
    let mut d = deflate::new_inflater(15);
    let mut out = Vec::new();
    let r = deflate::inflate_into(&mut d, &bomb, &mut out, LIMITS.max_message_size);
    assert_eq!(r, Err(ProtocolError::MessageTooLarge));
    assert!(
        out.capacity() <= LIMITS.max_message_size + 1,
        "{}",
        out.capacity()
    );

    // And it really is 64 MiB of zeros.
    let mut d = deflate::new_inflater(15);
    let mut out = Vec::new();
    deflate::inflate_into(&mut d, &bomb, &mut out, 64 << 20).unwrap();
    assert_eq!(out.len(), 64 << 20);
    assert!(out.iter().all(|&b| b == 0));
}

#[tokio::test]
async fn buffers_shrink_back_after_a_1_mib_message() {
    let limits = WireLimits {
        max_message_size: 4 << 20,
        max_frame_size: 4 << 20,
        inflate: None,
    };
    let big = vec![7u8; 1 << 20];
    let mut c = Compress::new(Level::new(1), false);
    let deflated = client_deflate(&mut c, &big);
    let halves = big.split_at(big.len() / 2);
    let wires = [
        client_frame(true, false, 2, &big),
        [
            client_frame(false, false, 2, halves.0),
            client_frame(true, false, 0, halves.1),
        ]
        .concat(),
        client_frame(true, true, 2, &deflated),
    ];
    for wire in wires {
        let mut reader = FrameReader::new(limits, Some(deflate_params(true)), 2048);
        // Then a small message, as an idle connection would get a ping.
        let wire = [wire, client_frame(true, false, 9, b"")].concat();
        let mut io = &wire[..];
        let first = poll_fn(|cx| reader.poll_read(&mut io, cx)).await.unwrap();
        assert_eq!(first, Some(Message::Binary(Bytes::from(big.clone()))));
        let ping = poll_fn(|cx| reader.poll_read(&mut io, cx)).await.unwrap();
        assert_eq!(ping, Some(Message::Ping(Bytes::new())));
        assert!(
            reader.buffered_bytes() <= 2048,
            "reader holds {} bytes",
            reader.buffered_bytes()
        );
    }
}

/// Hands out one chunk per read.
struct Chunks<'a>(std::collections::VecDeque<&'a [u8]>);

impl AsyncRead for Chunks<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(chunk) = self.0.pop_front() {
            buf.put_slice(chunk);
        }
        Poll::Ready(Ok(()))
    }
}

/// Reads that each start while the reader holds no buffer go onto the
/// stack and decode from there: a whole frame, a frame and the start of the
/// next, half a frame, a first fragment, a bad frame. The messages are the
/// same as from a buffer, and between messages the reader holds nothing.
#[tokio::test]
async fn reads_onto_the_stack_decode_whole_frames_and_keep_the_rest() {
    let a = client_frame(true, false, 1, b"alone");
    let b = client_frame(true, false, 2, b"first of two");
    let c = client_frame(true, false, 1, b"second of two, half in the next read");
    let (c1, c2) = c.split_at(10);
    let f1 = client_frame(false, false, 1, b"frag");
    let f2 = client_frame(true, false, 0, b"ment");
    let ping = client_frame(true, false, 9, b"p");
    let two = [b.clone(), c1.to_vec()].concat();
    let mut io = Chunks([&a[..], &two, c2, &f1, &f2, &ping].into_iter().collect());
    let mut reader = FrameReader::new(LIMITS, None, 2048);
    let first = poll_fn(|cx| reader.poll_read(&mut io, cx)).await.unwrap();
    assert_eq!(first, Some(text("alone")));
    assert_eq!(reader.buffered_bytes(), 0, "a whole frame takes no buffer");
    let (msgs, err) = read_all(&mut reader, &mut io).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(
        msgs,
        vec![
            Message::Binary(Bytes::from_static(b"first of two")),
            text("second of two, half in the next read"),
            text("fragment"),
            Message::Ping(Bytes::from_static(b"p")),
        ]
    );
    assert_eq!(
        reader.buffered_bytes(),
        0,
        "no buffer held between messages"
    );

    // A protocol violation read onto the stack fails as from a buffer.
    let bad = client_frame(true, true, 1, b"rsv1 without deflate");
    let mut io = Chunks([&a[..], &bad].into_iter().collect());
    let mut reader = FrameReader::new(LIMITS, None, 2048);
    let (msgs, err) = read_all(&mut reader, &mut io).await;
    assert_eq!(msgs, vec![text("alone")]);
    assert!(matches!(
        err,
        Some(WireError::Protocol(ProtocolError::CompressionNotNegotiated))
    ));
}

#[test]
fn mask_matches_a_bytewise_xor() {
    let mask = [1, 2, 3, 4];
    for len in 0..40 {
        let data: Vec<u8> = (0..len as u8).collect();
        let mut fast = data.clone();
        apply_mask(&mut fast, mask);
        let slow: Vec<u8> = data
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert_eq!(fast, slow);
    }
}
