//! Handshakes over real HTTP/1.1: every rejection (status, headers and
//! plain-text body), consumers refusing in `connect`, and subprotocol choice.

mod common;

use std::net::SocketAddr;

use axum::{routing::get, Router};
use common::*;
use http::StatusCode;
use tower_channels::{
    consumer::{
        from_fn, websocket_consumer, Accept, Connection, Context, Reject, WebSocketConsumer,
    },
    WebSocketLayer,
};

/// Accepts with whatever subprotocol the `?proto=` query names.
struct Chooser;

impl WebSocketConsumer for Chooser {
    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        let offered = ctx.scope().subprotocols().join(",");
        ctx.send_text(format!("offered={offered}"))?;
        Ok(match ctx.scope().query_param("proto") {
            Some(p) => Accept::new().subprotocol(p).header("x-chosen", "yes"),
            None => Accept::new(),
        })
    }
}

/// Refuses: 403 by default, or the status in `?status=` with a body.
struct Gatekeeper;

impl WebSocketConsumer for Gatekeeper {
    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        match ctx.scope().query_param("status") {
            None => Err(Reject::default()),
            Some(s) => {
                let status = StatusCode::from_bytes(s.as_bytes()).map_err(|_| Reject::default())?;
                Err(Reject::new(status)
                    .body("log in first")
                    .header("www-authenticate", "Bearer"))
            }
        }
    }
}

async fn server() -> SocketAddr {
    let channels = WebSocketLayer::new()
        .route("/ws/echo", websocket_consumer(|_| Chooser))
        .route("/ws/private", websocket_consumer(|_| Gatekeeper))
        .route(
            "/ws/undecided",
            // Drops the connection without deciding: rejected like Django.
            from_fn(|conn: Connection| async move {
                drop(conn);
                Ok(())
            }),
        )
        .route(
            "/ws/raw",
            from_fn(|conn: Connection| async move {
                if conn.scope().query_param("reject").is_some() {
                    conn.reject(Reject::new(StatusCode::NOT_FOUND).body("no such room"));
                    return Ok(());
                }
                let mut ws = conn.accept(Accept::new()).await?;
                ws.send("raw hello").await?;
                Ok(())
            }),
        );
    serve_axum(
        Router::new()
            .route("/", get(|| async { "inner" }))
            .layer(channels),
    )
    .await
}

/// Sends the request and checks status, body and the plain-text content type.
async fn expect_rejection(
    addr: SocketAddr,
    req: http::request::Builder,
    status: StatusCode,
    body: &str,
) -> Reply {
    let reply = http1(addr, empty(req)).await;
    assert_eq!(reply.status, status, "status; body was {:?}", reply.body);
    assert_eq!(reply.body, body, "plain-text body for {status}");
    assert_eq!(
        reply.headers.get("content-type").map(|v| v.to_str().ok()),
        Some(Some("text/plain; charset=utf-8")),
        "content type for {status}"
    );
    reply
}

#[tokio::test]
async fn bad_version_is_426_with_supported_version() {
    let addr = server().await;
    let req = get_req(addr, "/ws/echo")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "8")
        .header("sec-websocket-key", KEY);
    let reply = expect_rejection(
        addr,
        req,
        StatusCode::UPGRADE_REQUIRED,
        "Sec-WebSocket-Version must be 13",
    )
    .await;
    assert_eq!(
        reply.headers["sec-websocket-version"], "13",
        "426 names the supported version"
    );

    let missing = get_req(addr, "/ws/echo")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-key", KEY);
    expect_rejection(
        addr,
        missing,
        StatusCode::UPGRADE_REQUIRED,
        "Sec-WebSocket-Version must be 13",
    )
    .await;
}

#[tokio::test]
async fn missing_key_is_400() {
    let addr = server().await;
    let req = get_req(addr, "/ws/echo")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13");
    expect_rejection(
        addr,
        req,
        StatusCode::BAD_REQUEST,
        "missing Sec-WebSocket-Key header",
    )
    .await;
}

#[tokio::test]
async fn bad_key_is_400() {
    let addr = server().await;
    for key in [
        "short",
        "dGhlIHNhbXBsZSBub25jZQ",
        "dGhlIHNhbXBsZSBub25jZQ!=",
    ] {
        let req = get_req(addr, "/ws/echo")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", key);
        expect_rejection(
            addr,
            req,
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key must be 16 bytes, base64-encoded",
        )
        .await;
    }
}

#[tokio::test]
async fn post_is_405_with_allow_get() {
    let addr = server().await;
    let req = ws_req(addr, "/ws/echo").method("POST");
    let reply = expect_rejection(
        addr,
        req,
        StatusCode::METHOD_NOT_ALLOWED,
        "WebSocket upgrade requests must use the GET method",
    )
    .await;
    assert_eq!(reply.headers["allow"], "GET", "405 carries Allow: GET");
}

#[tokio::test]
async fn missing_connection_upgrade_is_400() {
    let addr = server().await;
    let req = get_req(addr, "/ws/echo")
        .header("connection", "keep-alive")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", KEY);
    expect_rejection(
        addr,
        req,
        StatusCode::BAD_REQUEST,
        "Connection header did not include 'upgrade'",
    )
    .await;
}

#[tokio::test]
async fn too_many_subprotocols_is_400() {
    let addr = server().await;
    let many = (0..17)
        .map(|i| format!("p{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let req = ws_req(addr, "/ws/echo").header("sec-websocket-protocol", many);
    expect_rejection(
        addr,
        req,
        StatusCode::BAD_REQUEST,
        "Sec-WebSocket-Protocol offers too many or malformed protocols",
    )
    .await;
    // The limit is configurable.
    let channels = WebSocketLayer::new()
        .with_config(tower_channels::WebSocketConfig::default().max_subprotocols(2))
        .route("/ws/echo", websocket_consumer(|_| Chooser));
    let addr = serve_axum(Router::new().layer(channels)).await;
    let req = ws_req(addr, "/ws/echo").header("sec-websocket-protocol", "a, b, c");
    expect_rejection(
        addr,
        req,
        StatusCode::BAD_REQUEST,
        "Sec-WebSocket-Protocol offers too many or malformed protocols",
    )
    .await;
    let (mut ws, _) = connect_with_protocols(addr, "/ws/echo?proto=a", "a, b").await;
    assert_eq!(
        next_text(&mut ws).await,
        "offered=a,b",
        "two protocols are within the limit"
    );
}

#[tokio::test]
async fn consumer_rejects_with_403_by_default() {
    let addr = server().await;
    expect_rejection(
        addr,
        ws_req(addr, "/ws/private"),
        StatusCode::FORBIDDEN,
        "Forbidden",
    )
    .await;
    // Dropping the connection without deciding is a rejection too.
    expect_rejection(
        addr,
        ws_req(addr, "/ws/undecided"),
        StatusCode::FORBIDDEN,
        "connection rejected",
    )
    .await;
}

#[tokio::test]
async fn consumer_rejects_with_chosen_status_body_and_headers() {
    let addr = server().await;
    let reply = expect_rejection(
        addr,
        ws_req(addr, "/ws/private?status=401"),
        StatusCode::UNAUTHORIZED,
        "log in first",
    )
    .await;
    assert_eq!(
        reply.headers["www-authenticate"], "Bearer",
        "Reject::header is sent"
    );

    // The raw form rejects the same way.
    expect_rejection(
        addr,
        ws_req(addr, "/ws/raw?reject=1"),
        StatusCode::NOT_FOUND,
        "no such room",
    )
    .await;
    let mut ws = connect(addr, "/ws/raw").await;
    assert_eq!(next_text(&mut ws).await, "raw hello");
}

#[tokio::test]
async fn tungstenite_client_sees_the_rejection_status() {
    let addr = server().await;
    let err = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/private?status=401"))
        .await
        .expect_err("handshake must fail");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(res) => {
            assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(res.body().as_deref(), Some(&b"log in first"[..]));
        }
        other => panic!("expected an HTTP error, got {other:?}"),
    }
}

#[tokio::test]
async fn subprotocol_is_chosen_among_offered() {
    let addr = server().await;
    let (mut ws, res) = connect_with_protocols(addr, "/ws/echo?proto=b", "a, b").await;
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(
        res.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"b"[..]),
        "the consumer's choice is in the response"
    );
    assert_eq!(res.headers()["x-chosen"], "yes", "Accept::header is sent");
    assert_eq!(
        next_text(&mut ws).await,
        "offered=a,b",
        "scope lists offered protocols in order"
    );

    // No choice: no Sec-WebSocket-Protocol header in the response.
    let reply = http1(
        addr,
        empty(ws_req(addr, "/ws/echo").header("sec-websocket-protocol", "a")),
    )
    .await;
    assert_eq!(reply.status, StatusCode::SWITCHING_PROTOCOLS);
    assert!(
        reply.headers.get("sec-websocket-protocol").is_none(),
        "no protocol chosen"
    );
}

#[tokio::test]
async fn choosing_an_unoffered_subprotocol_is_500() {
    let addr = server().await;
    let req = ws_req(addr, "/ws/echo?proto=c").header("sec-websocket-protocol", "a, b");
    expect_rejection(
        addr,
        req,
        StatusCode::INTERNAL_SERVER_ERROR,
        "consumer failed before accepting the connection",
    )
    .await;
    // Not offering any protocol at all is the same mistake.
    expect_rejection(
        addr,
        ws_req(addr, "/ws/echo?proto=c"),
        StatusCode::INTERNAL_SERVER_ERROR,
        "consumer failed before accepting the connection",
    )
    .await;
}

#[tokio::test]
async fn successful_handshake_response_headers() {
    let addr = server().await;
    let reply = http1(addr, empty(ws_req(addr, "/ws/echo"))).await;
    assert_eq!(reply.status, StatusCode::SWITCHING_PROTOCOLS);
    // RFC 6455 section 1.3: the accept key for the example nonce.
    assert_eq!(
        reply.headers["sec-websocket-accept"],
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
    assert!(reply.headers["upgrade"]
        .as_bytes()
        .eq_ignore_ascii_case(b"websocket"));
    assert!(reply.headers["connection"]
        .as_bytes()
        .eq_ignore_ascii_case(b"upgrade"));
}

#[tokio::test]
async fn rejections_are_counted() {
    let channels = WebSocketLayer::new().route("/ws/echo", websocket_consumer(|_| Chooser));
    let addr = serve_axum(Router::new().layer(channels.clone())).await;
    let before = channels.stats().rejected_handshakes;
    let req = get_req(addr, "/ws/echo")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13");
    http1(addr, empty(req)).await;
    assert_eq!(
        channels.stats().rejected_handshakes,
        before + 1,
        "a bad handshake counts as rejected"
    );
}

#[tokio::test]
async fn consumer_rejections_are_counted() {
    let channels = WebSocketLayer::new().route("/ws/private", websocket_consumer(|_| Gatekeeper));
    let addr = serve_axum(Router::new().layer(channels.clone())).await;
    let reply = http1(addr, empty(ws_req(addr, "/ws/private"))).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    // `ConnectionStats::rejected_handshakes` is documented to include consumers' rejections.
    assert_eq!(
        channels.stats().rejected_handshakes,
        1,
        "a consumer's rejection in connect counts as rejected"
    );
}
