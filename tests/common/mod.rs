//! Helpers shared by the integration tests: servers on 127.0.0.1:0, a
//! WebSocket client, raw HTTP/1.1 requests and the example binaries.
//!
//! Every wait is bounded by [`TIMEOUT`]; nothing sleeps.
#![allow(dead_code)]

pub(crate) mod layers;
#[cfg(any(feature = "redis", feature = "django"))]
pub(crate) mod redis_server;

use std::{
    future::Future,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    task::Poll,
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt, Stream, StreamExt};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::Builder,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::{
    tungstenite::{self, client::IntoClientRequest, protocol::frame::coding::CloseCode, Message},
    MaybeTlsStream, WebSocketStream,
};
use tower::ServiceExt;
use tower_channels::PeerAddr;

/// How long any single wait in a test may take before the test fails.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A client connection made by [`connect`].
pub(crate) type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A valid `Sec-WebSocket-Key` (the RFC 6455 example).
pub(crate) const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Binds 127.0.0.1:0.
pub(crate) async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("listener address");
    (listener, addr)
}

/// Serves `app` with `axum::serve` (HTTP/1.1 and HTTP/2, with connect info)
/// on 127.0.0.1:0 and returns its address.
pub(crate) async fn serve_axum(app: axum::Router) -> SocketAddr {
    let (listener, addr) = bind().await;
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .expect("axum::serve failed");
    });
    addr
}

/// Serves any tower service with hyper-util's auto builder (HTTP/1.1 with
/// upgrades, HTTP/2 with extended CONNECT), inserting [`PeerAddr`] into every
/// request, on 127.0.0.1:0. This is how warp services and plain hyper
/// services are served.
pub(crate) async fn serve_tower<S, B>(service: S) -> SocketAddr
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (listener, addr) = bind().await;
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let service = service.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    req.extensions_mut().insert(PeerAddr(peer));
                    service.clone().oneshot(req)
                });
                let mut builder = Builder::new(TokioExecutor::new());
                builder.http2().enable_connect_protocol();
                let _ = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Opens an HTTP/2 connection and waits until the server's SETTINGS enabled
/// extended CONNECT (no sleeping: the connection is polled until it is).
pub(crate) async fn h2_client(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    let mut conn = Box::pin(conn);
    // hyper runs the h2 connection on a task of its own, which applies the
    // server's SETTINGS without waking us: drive our half, then yield to it.
    within("the server's SETTINGS_ENABLE_CONNECT_PROTOCOL", async {
        while !conn.is_extended_connect_protocol_enabled() {
            std::future::poll_fn(|cx| match conn.as_mut().poll(cx) {
                Poll::Ready(r) => panic!("HTTP/2 connection ended early: {r:?}"),
                Poll::Pending => Poll::Ready(()),
            })
            .await;
            tokio::task::yield_now().await;
        }
    })
    .await;
    tokio::spawn(conn);
    sender
}

/// An RFC 8441 extended CONNECT request for a WebSocket on `path`.
pub(crate) fn h2_connect(addr: SocketAddr, path: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(format!("http://{addr}{path}"))
        .extension(hyper::ext::Protocol::from_static("websocket"))
        .header("sec-websocket-version", "13")
        .body(Empty::new())
        .expect("valid request")
}

/// Opens a WebSocket to `ws://{addr}{path}`.
pub(crate) async fn connect(addr: SocketAddr, path: &str) -> Client {
    let url = format!("ws://{addr}{path}");
    let (ws, res) = within(&url, tokio_tungstenite::connect_async(url.as_str()))
        .await
        .unwrap_or_else(|e| panic!("WebSocket handshake to {url} failed: {e}"));
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS, "{url}");
    ws
}

/// Opens a WebSocket offering `protocols`; returns the socket and the
/// handshake response.
pub(crate) async fn connect_with_protocols(
    addr: SocketAddr,
    path: &str,
    protocols: &str,
) -> (Client, tungstenite::handshake::client::Response) {
    let url = format!("ws://{addr}{path}");
    let mut req = url.as_str().into_client_request().expect("client request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        protocols.parse().expect("header value"),
    );
    within(&url, tokio_tungstenite::connect_async(req))
        .await
        .unwrap_or_else(|e| panic!("WebSocket handshake to {url} failed: {e}"))
}

/// Sends a WebSocket handshake for `path` on `stream` by hand (with
/// `extra_headers`, each ending in `\r\n`), checks the 101 and its accept
/// key, and returns the stream, positioned at the first frame, with the
/// response head in lower case.
pub(crate) async fn raw_handshake(
    mut stream: TcpStream,
    addr: SocketAddr,
    path: &str,
    extra_headers: &str,
) -> (TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra_headers}\r\n"
    );
    stream
        .write_all(req.as_bytes())
        .await
        .expect("write handshake");
    let mut head = Vec::new();
    within("the 101 response", async {
        // Byte by byte, so no frame byte is consumed with the head.
        while !head.ends_with(b"\r\n\r\n") {
            head.push(stream.read_u8().await.expect("read the response head"));
        }
    })
    .await;
    let head = String::from_utf8(head)
        .expect("ASCII head")
        .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    (stream, head)
}

/// Awaits `fut`, failing the test after [`TIMEOUT`].
pub(crate) async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {TIMEOUT:?} waiting for {what}"))
}

/// The next message that is not a ping or pong.
pub(crate) async fn next_msg<S>(ws: &mut S) -> Message
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    within("the next WebSocket message", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => return m,
                Some(Err(e)) => panic!("WebSocket error while waiting for a message: {e}"),
                None => panic!("WebSocket closed while waiting for a message"),
            }
        }
    })
    .await
}

/// The next message, which must be text.
pub(crate) async fn next_text<S>(ws: &mut S) -> String
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    match next_msg(ws).await {
        Message::Text(t) => t.as_str().to_owned(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// The next message, which must be binary.
pub(crate) async fn next_binary<S>(ws: &mut S) -> Bytes
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    match next_msg(ws).await {
        Message::Binary(b) => b,
        other => panic!("expected a binary message, got {other:?}"),
    }
}

/// The next message, which must be a close frame: its code and reason.
pub(crate) async fn next_close<S>(ws: &mut S) -> (u16, String)
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    match next_msg(ws).await {
        Message::Close(Some(f)) => (u16::from(f.code), f.reason.as_str().to_owned()),
        other => panic!("expected a close frame with a code, got {other:?}"),
    }
}

/// Sends `text` and expects it back.
pub(crate) async fn echo_text<S>(ws: &mut S, text: &str)
where
    S: Stream<Item = Result<Message, tungstenite::Error>>
        + futures_util::Sink<Message, Error = tungstenite::Error>
        + Unpin,
{
    ws.send(Message::text(text)).await.expect("send text");
    assert_eq!(next_text(ws).await, text, "text echo");
}

/// Sends `data` as a binary message and expects it back.
pub(crate) async fn echo_binary<S>(ws: &mut S, data: &'static [u8])
where
    S: Stream<Item = Result<Message, tungstenite::Error>>
        + futures_util::Sink<Message, Error = tungstenite::Error>
        + Unpin,
{
    ws.send(Message::binary(Bytes::from_static(data)))
        .await
        .expect("send binary");
    assert_eq!(next_binary(ws).await, data, "binary echo");
}

/// Closes from the client side and waits for the server's close reply.
pub(crate) async fn close(ws: &mut Client) {
    ws.close(Some(tungstenite::protocol::CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .expect("send close");
    within("the server's close reply", async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// A response read whole: status, headers and body as text.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: String,
}

/// Sends one HTTP/1.1 request on a new connection and reads the response.
pub(crate) async fn http1(addr: SocketAddr, req: Request<Full<Bytes>>) -> Reply {
    within("an HTTP/1.1 response", async {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 client handshake");
        tokio::spawn(conn.with_upgrades());
        let res = sender.send_request(req).await.expect("send request");
        let (parts, body) = res.into_parts();
        let body = body.collect().await.expect("read body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8(body.to_vec()).expect("UTF-8 body"),
        }
    })
    .await
}

/// A GET of `path` with `Host` set.
pub(crate) fn get_req(addr: SocketAddr, path: &str) -> http::request::Builder {
    Request::get(path).header("host", addr.to_string())
}

/// A GET of `path` with every WebSocket handshake header correct.
pub(crate) fn ws_req(addr: SocketAddr, path: &str) -> http::request::Builder {
    get_req(addr, path)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", KEY)
}

/// Finishes a request builder with an empty body.
pub(crate) fn empty(b: http::request::Builder) -> Request<Full<Bytes>> {
    b.body(Full::new(Bytes::new())).expect("valid request")
}

/// Kills and reaps a child process when dropped.
#[derive(Debug)]
pub(crate) struct ChildGuard(pub(crate) Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `target/<profile>/examples/<name>`, built by `cargo test`.
pub(crate) fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test binary>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let path = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} not found: run `cargo test` (which builds the examples), or `cargo build --examples`",
        path.display()
    );
    path
}

/// Starts an example with `--addr 127.0.0.1:0` and waits for its
/// `listening on <addr>` line. Its output keeps being drained (and echoed to
/// stderr, so it shows on failure) until it exits.
pub(crate) fn spawn_example(name: &str) -> (ChildGuard, SocketAddr) {
    spawn_example_with(name, &[])
}

/// [`spawn_example`] with extra command-line arguments.
pub(crate) fn spawn_example_with(name: &str, extra: &[&str]) -> (ChildGuard, SocketAddr) {
    spawn_example_command(name, Command::new(example_binary(name)), extra)
}

/// [`spawn_example_with`] under a limit of `nofile` open file descriptors
/// (`ulimit -n` in a shell that then `exec`s the example, so the child's
/// pid is the example's).
pub(crate) fn spawn_example_with_nofile(
    name: &str,
    nofile: u32,
    extra: &[&str],
) -> (ChildGuard, SocketAddr) {
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
        .arg(example_binary(name));
    spawn_example_command(name, cmd, extra)
}

fn spawn_example_command(name: &str, mut cmd: Command, extra: &[&str]) -> (ChildGuard, SocketAddr) {
    let mut child = cmd
        .args(["--addr", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("failed to start example {name}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let guard = ChildGuard(child);
    let (tx, rx) = std::sync::mpsc::channel();
    let label = name.to_owned();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            match line.strip_prefix("listening on ") {
                Some(addr) if tx.is_some() => {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.trim().to_owned());
                    }
                }
                _ => eprintln!("[{label}] {line}"),
            }
        }
    });
    let addr = rx
        .recv_timeout(TIMEOUT)
        .unwrap_or_else(|_| panic!("example {name} did not print `listening on <addr>` in time"));
    let addr = addr
        .parse()
        .unwrap_or_else(|e| panic!("example {name} printed a bad address {addr:?}: {e}"));
    (guard, addr)
}

/// The `message` field of a chat example frame (`{"message": m, "offset": N,
/// "epoch": "E", ...}`); panics on anything else.
pub(crate) fn chat_message(frame: &str) -> String {
    let value: serde_json::Value =
        serde_json::from_str(frame).unwrap_or_else(|e| panic!("not JSON: {frame:?}: {e}"));
    value["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message in {frame:?}"))
        .to_owned()
}

/// `err` and its sources, joined by `: ` (Display strings do not repeat
/// their source, so a test that looks for a cause reads the chain).
#[allow(dead_code)]
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(err), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}
