//! permessage-deflate (RFC 7692) against malicious peers, over real sockets:
//! a compression bomb closes with 1009 without the memory to hold it, and
//! data that is not deflate closes with 1007.
//!
//! The client is raw TCP: the handshake offers the extension by hand, frames
//! are formatted by tungstenite's frame primitives with RSV1 set, and the
//! payloads are deflated by flate2 (no client library sends a bomb on
//! purpose). Python `websockets` and Node `ws` test the well-behaved side in
//! `interop_python.rs` and `interop_node.rs`.

mod common;

use std::net::SocketAddr;

use axum::Router;
use common::*;
use flate2::{Compress, Compression as Level, FlushCompress};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_tungstenite::tungstenite::protocol::frame::{
    coding::{Data, OpCode},
    Frame,
};
use tower_channels::{
    channel_layer::BoxError,
    consumer::{websocket_consumer, Context, WebSocketConsumer},
    message::Message,
    WebSocketLayer,
};

struct Echo;

impl WebSocketConsumer for Echo {
    async fn receive(&mut self, ctx: &mut Context, msg: Message) -> Result<(), BoxError> {
        ctx.send(msg)?;
        Ok(())
    }
}

/// An echo server with the default limits (1 MiB messages) and the default
/// compression settings.
async fn serve_echo() -> SocketAddr {
    let channels = WebSocketLayer::new().route("/ws/echo", websocket_consumer(|_| Echo));
    serve_axum(Router::new().layer(channels)).await
}

/// Opens a connection offering permessage-deflate and checks the server
/// accepted it.
async fn deflate_handshake(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (stream, head) = raw_handshake(
        stream,
        addr,
        "/ws/echo",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    )
    .await;
    assert!(
        head.contains("sec-websocket-extensions: permessage-deflate"),
        "the server did not accept the offered extension:\n{head}"
    );
    stream
}

/// `data` deflated as one message of RFC 7692: raw deflate, sync flush, the
/// trailing `00 00 ff ff` removed.
fn deflate_message(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Level::best(), false);
    let mut out = Vec::with_capacity(data.len() / 512 + 64);
    let mut input = data;
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(64 << 10);
        }
        let before = c.total_in();
        c.compress_vec(input, &mut out, FlushCompress::Sync)
            .expect("deflate");
        input = &input[(c.total_in() - before) as usize..];
        if input.is_empty() && out.ends_with(&[0, 0, 0xff, 0xff]) {
            break;
        }
    }
    out.truncate(out.len() - 4);
    out
}

/// One masked client frame with RSV1 ("compressed") set.
fn compressed_frame(payload: Vec<u8>, opcode: Data) -> Vec<u8> {
    let mut frame = Frame::message(payload, OpCode::Data(opcode), true);
    frame.header_mut().rsv1 = true;
    frame.header_mut().mask = Some([0x37, 0xfa, 0x21, 0x3d]);
    let mut out = Vec::new();
    frame.format(&mut out).expect("format");
    out
}

/// Reads server frames until a close frame and returns its code; any data
/// frame before it fails the test.
async fn read_close_code(stream: &mut TcpStream) -> u16 {
    within("the close frame", async {
        let mut buf = Vec::new();
        loop {
            let n = stream.read_buf(&mut buf).await.expect("read");
            assert!(n > 0, "the server closed TCP without a close frame");
            if buf.len() < 2 {
                continue;
            }
            let opcode = buf[0] & 0x0f;
            assert_eq!(opcode, 0x8, "expected a close frame, got opcode {opcode}");
            let len = usize::from(buf[1] & 0x7f);
            assert!((2..126).contains(&len), "close frame length {len}");
            if buf.len() >= 2 + len {
                return u16::from_be_bytes([buf[2], buf[3]]);
            }
        }
    })
    .await
}

/// The process' peak resident set (`VmHWM`), KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

#[tokio::test]
async fn compression_bomb_closes_1009_without_inflating_it() {
    let addr = serve_echo().await;
    // 64 MiB of zeros deflate to about 64 KiB: under the 1 MiB frame limit,
    // far over the 1 MiB message limit once inflated.
    let bomb = deflate_message(&vec![0u8; 64 << 20]);
    assert!(bomb.len() < 1 << 20, "bomb is {} bytes", bomb.len());
    let frame = compressed_frame(bomb, Data::Binary);
    let peak_before = peak_rss_kib();

    let mut stream = deflate_handshake(addr).await;
    stream.write_all(&frame).await.expect("send the bomb");
    assert_eq!(read_close_code(&mut stream).await, 1009);

    // The server runs in this process: had it inflated the bomb, the peak
    // would have grown by 64 MiB.
    let grown = peak_rss_kib().saturating_sub(peak_before);
    assert!(
        grown < 16 << 10,
        "peak RSS grew by {grown} KiB while refusing the bomb"
    );
}

#[tokio::test]
async fn invalid_deflate_data_closes_1007() {
    let addr = serve_echo().await;
    let mut stream = deflate_handshake(addr).await;
    // Block type 3 is reserved in RFC 1951: no inflater accepts it.
    let garbage = vec![0xff, 0xff, 0xff, 0xff, 0x00, 0x13, 0x37];
    stream
        .write_all(&compressed_frame(garbage, Data::Text))
        .await
        .expect("send");
    assert_eq!(read_close_code(&mut stream).await, 1007);
}

#[tokio::test]
async fn a_compressed_message_is_inflated_and_echoed_compressed() {
    let addr = serve_echo().await;
    let mut stream = deflate_handshake(addr).await;
    let text = "tower-channels ".repeat(100);
    stream
        .write_all(&compressed_frame(
            deflate_message(text.as_bytes()),
            Data::Text,
        ))
        .await
        .expect("send");
    // The echo (1,500 bytes, over the 256-byte threshold) comes back as one
    // compressed text frame.
    let (rsv1, payload) = within("the echo", async {
        let mut buf = Vec::new();
        loop {
            stream.read_buf(&mut buf).await.expect("read");
            if buf.len() < 2 {
                continue;
            }
            assert_eq!(buf[0] & 0x0f, 0x1, "a text frame");
            assert_eq!(buf[0] & 0x80, 0x80, "FIN");
            let len = usize::from(buf[1] & 0x7f);
            let (start, len) = match len {
                126 if buf.len() >= 4 => (4, usize::from(u16::from_be_bytes([buf[2], buf[3]]))),
                126 => continue,
                127 => panic!("unexpectedly long echo"),
                n => (2, n),
            };
            if buf.len() >= start + len {
                return (buf[0] & 0x40 != 0, buf[start..start + len].to_vec());
            }
        }
    })
    .await;
    assert!(rsv1, "the echo was not compressed");
    assert!(payload.len() < text.len() / 4, "{} bytes", payload.len());
    let mut input = payload;
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut inflated = Vec::with_capacity(text.len() + 64);
    flate2::Decompress::new(false)
        .decompress_vec(&input, &mut inflated, flate2::FlushDecompress::Sync)
        .expect("inflate");
    assert_eq!(String::from_utf8(inflated).expect("UTF-8"), text);
}
