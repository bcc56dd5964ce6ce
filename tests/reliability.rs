//! Reliability under misbehaving peers, over real sockets (issue 26): close
//! frames that reach a client that is still sending (lingering close), on
//! axum and on a plain hyper host, over HTTP/1.1 and HTTP/2 (RFC 8441).
//!
//! Nothing sleeps to synchronize: every wait is bounded by
//! [`TIMEOUT`](common::TIMEOUT).

mod common;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use axum::Router;
use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tower_channels::{
    channel_layer::BoxError,
    consumer::{websocket_consumer, Context, WebSocketConsumer},
    message::{self, close_code},
    WebSocketLayer,
};
use tower_layer::Layer;

/// Echoes every message.
struct Echo;

impl WebSocketConsumer for Echo {
    async fn receive(&mut self, ctx: &mut Context, msg: message::Message) -> Result<(), BoxError> {
        ctx.send(msg)?;
        Ok(())
    }
}

fn channels() -> WebSocketLayer {
    WebSocketLayer::new().route("/ws/echo", websocket_consumer(|_| Echo))
}

async fn hyper_inner(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"inner"))))
}

/// The layer on axum (`axum::serve`) and on a plain hyper-util host.
async fn hosts() -> [(&'static str, SocketAddr); 2] {
    [
        ("axum", serve_axum(Router::new().layer(channels())).await),
        (
            "hyper",
            serve_tower(channels().layer(tower::service_fn(hyper_inner))).await,
        ),
    ]
}

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A masked client frame header (FIN set) for `opcode` and `len` payload bytes.
fn client_header(opcode: u8, len: u64) -> Vec<u8> {
    let mut h = vec![0x80 | opcode];
    match len {
        0..=125 => h.push(0x80 | len as u8),
        126..=0xffff => {
            h.push(0x80 | 126);
            h.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            h.push(0x80 | 127);
            h.extend_from_slice(&len.to_be_bytes());
        }
    }
    h.extend_from_slice(&MASK);
    h
}

/// A masked client frame with a short payload.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = client_header(opcode, payload.len() as u64);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    f
}

/// Reads one server frame (unmasked) from `r`: (opcode, payload).
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(u8, Vec<u8>)> {
    let b0 = r.read_u8().await?;
    let b1 = r.read_u8().await?;
    assert_eq!(b1 & 0x80, 0, "server frames are not masked");
    let len = match b1 & 0x7f {
        126 => u64::from(r.read_u16().await?),
        127 => r.read_u64().await?,
        n => u64::from(n),
    };
    let mut payload = vec![0; usize::try_from(len).expect("frame length")];
    r.read_exact(&mut payload).await?;
    Ok((b0 & 0x0f, payload))
}

/// Pings, then starts a binary frame one byte over the 1 MiB default limit
/// and keeps sending (the rest of the frame, then more) until told to stop
/// or the server hangs up. The client must read the pong and then the 1009
/// close frame: never a reset, never an EOF before the close frame.
async fn oversize_while_sending<S>(stream: S, what: &str)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let stop = stop.clone();
        async move {
            wr.write_all(&client_frame(0x9, b"p")).await?;
            wr.write_all(&client_header(0x2, (1 << 20) + 1)).await?;
            // The frame's payload, then as much again: a client in the middle
            // of a large send does not look at what it receives.
            let chunk = vec![0x55u8; 16 * 1024];
            let mut sent = 0usize;
            while !stop.load(Ordering::Relaxed) && sent < 8 << 20 {
                wr.write_all(&chunk).await?;
                sent += chunk.len();
            }
            Ok::<_, std::io::Error>(wr)
        }
    });
    let frames = within(&format!("{what}: the pong and the close frame"), async {
        let pong = read_frame(&mut rd).await?;
        let close = read_frame(&mut rd).await?;
        Ok::<_, std::io::Error>((pong, close))
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let ((op1, p1), (op2, p2)) =
        frames.unwrap_or_else(|e| panic!("{what}: lost the close frame to {e:?}"));
    assert_eq!((op1, p1.as_slice()), (0xA, &b"p"[..]), "{what}: pong");
    assert_eq!(op2, 0x8, "{what}: close frame");
    let code = u16::from_be_bytes([p2[0], p2[1]]);
    assert_eq!(code, close_code::SIZE, "{what}: close code");
    // The writer ends: it stopped, or the server hung up once it lingered
    // long enough.
    let _ = within(&format!("{what}: the writer"), writer).await;
}

/// Issue 26 (1): a client still sending after a violation reads the 1009,
/// on both hosts over HTTP/1.1 (before lingering close, 100 of 100 tries
/// ended in ECONNRESET).
#[tokio::test]
async fn close_frame_reaches_a_client_that_is_still_sending_http1() {
    for (host, addr) in hosts().await {
        for i in 0..20 {
            let stream = TcpStream::connect(addr).await.expect("connect");
            let (stream, _) = raw_handshake(stream, addr, "/ws/echo", "").await;
            oversize_while_sending(stream, &format!("{host} HTTP/1.1 try {i}")).await;
        }
    }
}

/// The same over HTTP/2 extended CONNECT: the 1009 arrives on the stream.
#[tokio::test]
async fn close_frame_reaches_a_client_that_is_still_sending_http2() {
    for (host, addr) in hosts().await {
        let mut sender = h2_client(addr).await;
        for i in 0..5 {
            let req = h2_connect(addr, "/ws/echo");
            let mut res = within("the CONNECT response", sender.send_request(req))
                .await
                .expect("send CONNECT");
            assert_eq!(res.status(), StatusCode::OK);
            let upgraded = within("the HTTP/2 upgrade", hyper::upgrade::on(&mut res))
                .await
                .expect("upgraded stream");
            oversize_while_sending(TokioIo::new(upgraded), &format!("{host} HTTP/2 try {i}")).await;
        }
    }
}

// ---------------------------------------------------------------------------
// Hosts that hold: the example binaries (hyper, warp, chat)
// ---------------------------------------------------------------------------

/// The examples served by the shared accept loop (`examples/support/serve.rs`).
fn example_hosts() -> &'static [&'static str] {
    if cfg!(feature = "example-warp") {
        &["hyper", "warp", "chat"]
    } else {
        &["hyper", "chat"]
    }
}

/// Reads until the server hangs up (EOF or a reset), failing after
/// [`TIMEOUT`]: the server closed the connection in bounded time.
async fn server_hangs_up(stream: &mut TcpStream, what: &str) {
    let mut sink = Vec::new();
    let _ = within(what, stream.read_to_end(&mut sink)).await;
}

/// The HTTP/2 client preface and an empty SETTINGS frame (RFC 9113 3.4).
const H2_PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Issue 26 (2): a TCP connection that sends nothing, and an HTTP/2
/// connection that sends its preface and SETTINGS and then nothing, are
/// closed in bounded time (idle limit, HTTP/2 keep-alive: 0.3 s here) on
/// every example host; an
/// HTTP/2 WebSocket opened before keeps working after that (the idle
/// shutdown of its connection is a GOAWAY, which ends no open stream).
#[tokio::test]
async fn example_hosts_close_silent_and_idle_http2_connections() {
    for &name in example_hosts() {
        let (_child, addr) = spawn_example_with(
            name,
            &[
                "--idle-timeout",
                "0.3",
                "--header-read-timeout",
                "0.3",
                "--keep-alive",
                "0.3",
            ],
        );
        let mut sender = h2_client(addr).await;
        let mut res = within(
            "the CONNECT response",
            sender.send_request(h2_connect(addr, "/ws/echo")),
        )
        .await
        .expect("send CONNECT");
        assert_eq!(res.status(), StatusCode::OK, "{name}: extended CONNECT");
        let upgraded = within("the HTTP/2 upgrade", hyper::upgrade::on(&mut res))
            .await
            .expect("upgraded stream");
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await;

        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let mut idle_h2 = TcpStream::connect(addr).await.expect("connect");
        idle_h2
            .write_all(H2_PREFACE_AND_SETTINGS)
            .await
            .expect("write the preface");
        server_hangs_up(
            &mut silent,
            &format!("{name}: closing a silent TCP connection"),
        )
        .await;
        server_hangs_up(
            &mut idle_h2,
            &format!("{name}: closing an idle HTTP/2 connection"),
        )
        .await;

        // The idle limit has passed for the WebSocket's connection too.
        echo_text(&mut ws, "still open").await;
    }
}

/// Issue 26 (3): with 64 file descriptors, connections beyond the limit
/// make `accept` fail with EMFILE; every example host keeps running and
/// serves again once the clients are gone (the hyper example used to exit
/// from `main`).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn example_hosts_survive_running_out_of_file_descriptors() {
    const NOFILE: u32 = 64;
    for &name in example_hosts() {
        let (mut child, addr) =
            common::spawn_example_with_nofile(name, NOFILE, &["--idle-timeout", "60"]);
        let pid = child.0.id();
        let mut clients = Vec::new();
        for _ in 0..NOFILE + 16 {
            clients.push(TcpStream::connect(addr).await.expect("connect"));
        }
        // Every descriptor is in use: the rest wait in the listen backlog
        // while accept fails.
        let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        within(&format!("{name}: using all {NOFILE} descriptors"), async {
            while fds() < NOFILE as usize {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await;
        drop(clients);
        let reply = http1(addr, empty(get_req(addr, "/"))).await;
        assert_eq!(reply.status, StatusCode::OK, "{name}: serves again");
        assert!(
            child.0.try_wait().expect("try_wait").is_none(),
            "{name}: still running"
        );
    }
}

// ---------------------------------------------------------------------------
// The inflate budget
// ---------------------------------------------------------------------------

/// A masked, compressed (RSV1) text frame holding `text` deflated as
/// permessage-deflate sends it (sync flush, tail removed).
fn compressed_text_frame(text: &[u8]) -> Vec<u8> {
    let mut deflater = flate2::Compress::new(flate2::Compression::new(6), false);
    let mut out = Vec::with_capacity(text.len() / 8 + 1024);
    loop {
        let consumed = deflater.total_in() as usize;
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity());
        }
        deflater
            .compress_vec(&text[consumed..], &mut out, flate2::FlushCompress::Sync)
            .expect("deflate");
        if deflater.total_in() as usize == text.len() && out.len() < out.capacity() {
            break;
        }
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    let mut frame = client_header(0x1, out.len() as u64);
    frame[0] |= 0x40;
    frame.extend(out.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    frame
}

/// Opens a raw WebSocket to the echo route with permessage-deflate.
async fn deflate_client(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (stream, head) = raw_handshake(
        stream,
        addr,
        "/ws/echo",
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    )
    .await;
    assert!(head.contains("permessage-deflate"), "{head}");
    stream
}

/// Issue 26 (6): with the default inflate budget (4 MiB/s, bursts of 1 MiB),
/// a client sending 1 KiB messages that inflate to 1 MiB each is closed
/// with 1008 after the first one or two; a client sending compressed JSON
/// beside it gets every echo.
#[tokio::test]
async fn compression_bomb_client_is_closed_1008_and_json_client_is_not() {
    let addr = serve_axum(Router::new().layer(channels())).await;

    // One bomb: a 1 MiB - 64 text of spaces deflates to about 1 KiB.
    let bomb = compressed_text_frame(&vec![b' '; (1 << 20) - 64]);
    assert!(bomb.len() < 2048, "bomb frame is {} bytes", bomb.len());
    let (mut rd, mut wr) = deflate_client(addr).await.into_split();
    let sender = tokio::spawn(async move {
        for _ in 0..50 {
            if wr.write_all(&bomb).await.is_err() {
                break;
            }
        }
        wr
    });
    let (echoed, code, reason) = within("the bomb client's close", async {
        let mut echoed = 0;
        loop {
            let (op, payload) = read_frame(&mut rd).await.expect("read a frame");
            if op == 0x8 {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                break (
                    echoed,
                    code,
                    String::from_utf8_lossy(&payload[2..]).into_owned(),
                );
            }
            echoed += 1;
        }
    })
    .await;
    let _ = sender.await;
    assert_eq!(
        (code, reason.as_str()),
        (close_code::POLICY, "inflate rate exceeded")
    );
    assert!(
        (1..=2).contains(&echoed),
        "about 1 MiB of inflate passes before the close, got {echoed} echoes"
    );

    // Compressed JSON, 400 messages of about 2 KiB back to back.
    let mut json = deflate_client(addr).await;
    for i in 0..400 {
        let text = serde_json::json!({
            "type": "chat.message",
            "seq": i,
            "message": format!("message {i} ").repeat(150),
        })
        .to_string();
        json.write_all(&compressed_text_frame(text.as_bytes()))
            .await
            .expect("send JSON");
        let (op, _) = within("a JSON echo", read_frame(&mut json))
            .await
            .expect("read the echo");
        assert_ne!(op, 0x8, "the JSON client was closed at message {i}");
    }
}
