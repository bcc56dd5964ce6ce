//! The layer under every server it supports: axum, warp and plain hyper, over
//! HTTP/1.1 upgrades and HTTP/2 extended CONNECT (RFC 8441), plus the warp
//! and hyper example binaries.

mod common;

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use axum::{routing::get, Router};
use bytes::Bytes;
use common::*;
use futures_util::SinkExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::{
    tungstenite::{protocol::Role, Message},
    WebSocketStream,
};
use tower_channels::{
    channel_layer::{BoxError, ChannelLayer, InMemoryChannelLayer},
    consumer::{websocket_consumer, Context, WebSocketConsumer},
    message,
    middleware::{ResponseBody, ResponseFuture},
    Scope, WebSocketLayer, WebSocketService,
};
use tower_layer::Layer;

/// Echoes every message; on connect, sends a description of its scope.
struct Echo;

impl WebSocketConsumer for Echo {
    async fn connect(
        &mut self,
        ctx: &mut Context,
    ) -> Result<tower_channels::consumer::Accept, tower_channels::consumer::Reject> {
        let s = ctx.scope();
        let peer = s.peer_addr().map_or("none".to_owned(), |a| a.to_string());
        ctx.send_text(format!(
            "hello {:?} {} {} peer={peer}",
            s.version(),
            s.method(),
            s.path()
        ))?;
        Ok(Default::default())
    }

    async fn receive(&mut self, ctx: &mut Context, msg: message::Message) -> Result<(), BoxError> {
        ctx.send(msg)?;
        Ok(())
    }
}

fn channels() -> WebSocketLayer {
    WebSocketLayer::new().route("/ws/echo", websocket_consumer(|_| Echo))
}

fn axum_app() -> Router {
    Router::new()
        .route("/", get(|| async { "inner" }))
        .route(
            "/ws/echo",
            get(|| async { "inner page on a WebSocket path" }),
        )
        .layer(channels())
}

/// Connects to `/ws/echo`, checks the greeting, echoes text and binary.
async fn check_echo(addr: SocketAddr, server: &str) {
    let mut ws = connect(addr, "/ws/echo").await;
    let local = match ws.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(s) => s.local_addr().expect("local addr"),
        _ => unreachable!("plain TCP"),
    };
    assert_eq!(
        next_text(&mut ws).await,
        format!("hello HTTP/1.1 GET /ws/echo peer={local}"),
        "{server}: greeting with the scope (peer address must be the client's)"
    );
    echo_text(&mut ws, &format!("text via {server}")).await;
    echo_binary(&mut ws, b"\x00\x01binary\xff").await;
    close(&mut ws).await;
}

#[tokio::test]
async fn axum_upgrade_and_echo() {
    let addr = serve_axum(axum_app()).await;
    check_echo(addr, "axum").await;
}

#[cfg(feature = "example-warp")]
#[tokio::test]
async fn warp_upgrade_and_echo() {
    use warp::Filter;
    let filter = warp::path::end().map(|| String::from("inner"));
    let addr = serve_tower(channels().layer(warp::service(filter))).await;
    check_echo(addr, "warp").await;
    let reply = http1(addr, empty(get_req(addr, "/"))).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "inner"),
        "warp inner service"
    );
}

async fn hyper_inner(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"inner"))))
}

#[tokio::test]
async fn hyper_upgrade_and_echo() {
    let addr = serve_tower(channels().layer(tower::service_fn(hyper_inner))).await;
    check_echo(addr, "hyper").await;
    let reply = http1(addr, empty(get_req(addr, "/"))).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "inner"),
        "hyper inner service"
    );
}

async fn check_h2_echo(addr: SocketAddr, server: &str) {
    let mut sender = h2_client(addr).await;
    let mut res = within(
        "the CONNECT response",
        sender.send_request(h2_connect(addr, "/ws/echo")),
    )
    .await
    .expect("send CONNECT");
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "{server}: extended CONNECT answered with 200"
    );
    let upgraded = within("the HTTP/2 upgrade", hyper::upgrade::on(&mut res))
        .await
        .expect("upgraded stream");
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    let greeting = next_text(&mut ws).await;
    assert!(
        greeting.starts_with("hello HTTP/2.0 CONNECT /ws/echo peer=127.0.0.1:"),
        "{server}: scope over HTTP/2, got {greeting:?}"
    );
    echo_text(&mut ws, "over h2").await;
    echo_binary(&mut ws, b"h2 bytes").await;

    // A second WebSocket multiplexed on the same connection.
    let mut res2 = sender
        .send_request(h2_connect(addr, "/ws/echo"))
        .await
        .expect("second CONNECT");
    assert_eq!(res2.status(), StatusCode::OK);
    let upgraded2 = hyper::upgrade::on(&mut res2).await.expect("second upgrade");
    let mut ws2 =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded2), Role::Client, None).await;
    next_text(&mut ws2).await;
    echo_text(&mut ws2, "second stream").await;
    echo_text(&mut ws, "first stream still works").await;

    ws.close(None).await.expect("close");
    assert!(
        matches!(next_msg(&mut ws).await, Message::Close(_)),
        "close reply"
    );

    // A plain GET on the same HTTP/2 connection still reaches the inner service.
    let req = Request::get(format!("http://{addr}/"))
        .body(Empty::new())
        .expect("request");
    let res = sender.send_request(req).await.expect("GET over h2");
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, "inner", "{server}: inner service over HTTP/2");
}

#[tokio::test]
async fn http2_extended_connect_under_axum() {
    let addr = serve_axum(axum_app()).await;
    check_h2_echo(addr, "axum").await;
}

#[tokio::test]
async fn http2_extended_connect_under_hyper() {
    let addr = serve_tower(channels().layer(tower::service_fn(hyper_inner))).await;
    check_h2_echo(addr, "hyper").await;
}

#[tokio::test]
async fn http2_connect_handshake_needs_version_13() {
    let addr = serve_axum(axum_app()).await;
    let mut sender = h2_client(addr).await;
    let mut req = h2_connect(addr, "/ws/echo");
    req.headers_mut().remove("sec-websocket-version");
    let res = sender.send_request(req).await.expect("send CONNECT");
    assert_eq!(res.status(), StatusCode::UPGRADE_REQUIRED);
    assert_eq!(res.headers()["sec-websocket-version"], "13");
}

#[tokio::test]
async fn pass_through_to_inner_service() {
    let addr = serve_axum(axum_app()).await;
    // A path no consumer route matches, even when it asks for a WebSocket.
    let reply = http1(addr, empty(ws_req(addr, "/"))).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "inner"),
        "non-matching path"
    );
    // A plain GET (no Upgrade header) on a WebSocket route.
    let reply = http1(addr, empty(get_req(addr, "/ws/echo"))).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "inner page on a WebSocket path"),
        "plain GET on a WebSocket path"
    );
    // `Upgrade: h2c` is not a WebSocket request.
    let reply = http1(
        addr,
        empty(
            get_req(addr, "/ws/echo")
                .header("upgrade", "h2c")
                .header("connection", "upgrade"),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "Upgrade: h2c passes through");
    // Unknown paths still get the inner service's 404.
    let reply = http1(addr, empty(get_req(addr, "/nope"))).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn axum_peer_address_comes_from_connect_info() {
    // `check_echo` asserts the exact peer address; this also checks a server
    // without connect info gives none.
    let layer = channels();
    let app = Router::new()
        .route("/", get(|| async { "inner" }))
        .layer(layer);
    let (listener, addr) = bind().await;
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    let mut ws = connect(addr, "/ws/echo").await;
    assert_eq!(
        next_text(&mut ws).await,
        "hello HTTP/1.1 GET /ws/echo peer=none"
    );
}

#[cfg(feature = "example-warp")]
#[tokio::test]
async fn warp_example_serves_echo_chat_and_index() {
    check_example("warp", "hello from warp\n", "?token=secret").await;
}

#[tokio::test]
async fn hyper_example_serves_echo_chat_and_index() {
    check_example("hyper", "hello from hyper\n", "").await;
}

/// warp's auth filter guards its own routes, not the sockets the layer
/// answers first; the chat consumer checks the token in `connect`.
#[cfg(feature = "example-warp")]
#[tokio::test]
async fn warp_example_auth_filters_and_sockets() {
    let (_child, addr) = spawn_example("warp");
    let reply = http1(addr, empty(get_req(addr, "/private"))).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let authed = get_req(addr, "/private").header("authorization", "Bearer secret");
    let reply = http1(addr, empty(authed)).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "secret stuff\n")
    );
    let reply = http1(addr, empty(ws_req(addr, "/ws/chat/lobby"))).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.body);
    assert_eq!(reply.body, "token required");
}

/// Issue 10 (9): the examples that serve with hyper-util close a connection
/// whose request headers never complete (here after 0.3 s).
#[tokio::test]
async fn examples_close_half_sent_handshakes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let examples: &[&str] = if cfg!(feature = "example-warp") {
        &["hyper", "warp"]
    } else {
        &["hyper"]
    };
    for &name in examples {
        let (_child, addr) = spawn_example_with(name, &["--header-read-timeout", "0.3"]);
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /ws/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
            .await
            .expect("write half a request");
        let mut rest = Vec::new();
        // EOF (or a reset) within the test timeout: the server hung up.
        let read = within(
            "the server closing a half-sent request",
            stream.read_to_end(&mut rest),
        )
        .await;
        assert!(
            read.is_err() || rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"),
            "{name}: unexpected {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
}

async fn check_example(name: &str, index: &str, chat_query: &str) {
    let (_child, addr) = spawn_example(name);
    let reply = http1(addr, empty(get_req(addr, "/"))).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, index),
        "{name}: GET /"
    );

    let mut echo = connect(addr, "/ws/echo").await;
    echo_text(&mut echo, "hi").await;
    echo_binary(&mut echo, b"\x01\x02").await;

    let mut a1 = connect(addr, &format!("/ws/chat/lobby{chat_query}")).await;
    let mut a2 = connect(addr, &format!("/ws/chat/lobby{chat_query}")).await;
    let mut b = connect(addr, &format!("/ws/chat/other{chat_query}")).await;
    a1.send(Message::text(r#"{"message":"hello room"}"#))
        .await
        .expect("send");
    assert_eq!(
        next_text(&mut a1).await,
        r#"{"message":"hello room"}"#,
        "{name}: sender"
    );
    assert_eq!(
        next_text(&mut a2).await,
        r#"{"message":"hello room"}"#,
        "{name}: member"
    );
    b.send(Message::text(r#"{"message":"b only"}"#))
        .await
        .expect("send");
    assert_eq!(
        next_text(&mut b).await,
        r#"{"message":"b only"}"#,
        "{name}: other room"
    );
    a1.send(Message::text("not json")).await.expect("send");
    assert_eq!(
        next_close(&mut a1).await.0,
        1007,
        "{name}: bad JSON closes with 1007"
    );
}

// Compile-time: what servers move between threads is Send (and Sync where
// the inner service's types are).
fn assert_send_sync<T: Send + Sync>() {}
fn assert_send<T: Send>() {}

#[test]
fn public_types_are_send_and_sync() {
    assert_send_sync::<WebSocketLayer>();
    assert_send_sync::<WebSocketService<Router>>();
    assert_send_sync::<Arc<dyn ChannelLayer>>();
    assert_send_sync::<InMemoryChannelLayer>();
    assert_send_sync::<Scope>();
    assert_send_sync::<tower_channels::channel_layer::Event>();
    assert_send::<ResponseBody<axum::body::Body>>();
    type RouterFuture = <Router as tower::Service<Request<axum::body::Body>>>::Future;
    assert_send::<ResponseFuture<RouterFuture>>();
    type ReadyFuture = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;
    assert_send_sync::<ResponseFuture<ReadyFuture>>();
}

/// A hyper server that does not enable upgrades (`serve_connection` without
/// `with_upgrades`): the client is not left hanging and the consumer's
/// `accept` fails with a handshake error instead of waiting forever.
#[tokio::test]
async fn server_without_upgrade_support_does_not_hang() {
    let (tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    let raw =
        tower_channels::consumer::from_fn(move |conn: tower_channels::consumer::Connection| {
            let tx = tx.clone();
            async move {
                let result = conn.accept(tower_channels::consumer::Accept::new()).await;
                let _ = tx.send(
                    result
                        .map(|_| ())
                        .map_err(|e| (e.is_handshake(), e.to_string())),
                );
                Ok(())
            }
        });
    let svc = WebSocketLayer::new()
        .route("/ws/raw", raw)
        .layer(tower::service_fn(hyper_inner));
    let (listener, addr) = bind().await;
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            tower::ServiceExt::oneshot(svc.clone(), req)
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), svc)
            .await;
    });
    let client = within("the client handshake to end", async {
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws/raw")).await
    })
    .await;
    if let Ok((mut ws, _)) = client {
        // The 101 went out, but the connection cannot be upgraded: it ends.
        within("the connection to end", async {
            while let Some(Ok(_)) = futures_util::StreamExt::next(&mut ws).await {}
        })
        .await;
    }
    let result = within("the consumer's accept to return", accepted.recv())
        .await
        .expect("consumer ran");
    let (is_handshake, message) = result.expect_err("accept cannot succeed without upgrades");
    assert!(is_handshake, "a handshake error, got: {message}");
}

/// Issue 14 (10): Ctrl-C on the warp example closes sockets with 1001, then
/// the process exits.
#[cfg(feature = "example-warp")]
#[tokio::test]
async fn warp_example_shuts_down_gracefully() {
    let (mut child, addr) = spawn_example("warp");
    let mut ws = connect(addr, "/ws/echo").await;
    echo_text(&mut ws, "before").await;
    let pid = child.0.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("run kill");
    assert!(status.success());
    assert_eq!(next_close(&mut ws).await.0, 1001);
    // Send the close reply tungstenite queued, so the server need not wait
    // for its close timeout.
    let _ = ws.flush().await;
    let exit = within(
        "the warp example to exit",
        tokio::task::spawn_blocking(move || child.0.wait()),
    )
    .await
    .expect("join")
    .expect("wait");
    assert!(exit.success(), "{exit:?}");
}
