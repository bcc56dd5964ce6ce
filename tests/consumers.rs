//! Consumers over real connections: groups, sends from HTTP handlers, JSON
//! dispatch and decode errors, request extensions from outer middleware,
//! handler errors and panics.

mod common;

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{Path, State},
    http::StatusCode,
    routing::post,
    Router,
};
use common::*;
use futures_util::SinkExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tower_channels::{
    channel_layer::{BoxError, ChannelLayer, Event, InMemoryChannelLayer},
    consumer::{
        json_consumer, websocket_consumer, Accept, Context, JsonWebSocketConsumer, Reject,
        WebSocketConsumer,
    },
    message::{self, CloseCode},
    WebSocketLayer,
};

/// What a chat consumer reports when it goes away.
#[derive(Debug)]
enum Gone {
    /// `disconnect` ran, after `group_discard`.
    Disconnected { group: String, code: CloseCode },
    /// The consumer value was dropped (after the driver left its groups).
    Dropped(String),
}

#[derive(Deserialize)]
struct ChatIn {
    message: String,
}

/// The tutorial's chat consumer; reports its disconnect on `gone`.
struct Chat {
    group: String,
    /// Whether `disconnect` leaves the group itself (Django style) or relies
    /// on the automatic leave.
    discard: bool,
    gone: mpsc::UnboundedSender<Gone>,
}

impl JsonWebSocketConsumer for Chat {
    type Incoming = ChatIn;

    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        ctx.group_add(&self.group).await?;
        Ok(Accept::new())
    }

    async fn receive_json(&mut self, ctx: &mut Context, msg: ChatIn) -> Result<(), BoxError> {
        let text = serde_json::json!({ "message": msg.message }).to_string();
        ctx.group_send(&self.group, Event::text("chat.message", text))
            .await?;
        Ok(())
    }

    async fn disconnect(&mut self, ctx: &mut Context, code: CloseCode) {
        if self.discard {
            ctx.group_discard(&self.group).await.expect("group_discard");
            assert!(ctx.groups().is_empty(), "group_discard forgets the group");
        }
        let _ = self.gone.send(Gone::Disconnected {
            group: self.group.clone(),
            code,
        });
    }
}

impl Drop for Chat {
    fn drop(&mut self) {
        let _ = self.gone.send(Gone::Dropped(self.group.clone()));
    }
}

struct ChatServer {
    addr: SocketAddr,
    layer: InMemoryChannelLayer,
    gone: mpsc::UnboundedReceiver<Gone>,
}

async fn chat_server() -> ChatServer {
    let layer = InMemoryChannelLayer::new();
    let (tx, gone) = mpsc::unbounded_channel();
    let tx2 = tx.clone();
    let channels = WebSocketLayer::new()
        .with_channel_layer(Arc::new(layer.clone()))
        .route(
            "/ws/chat/{room}",
            json_consumer(move |scope| Chat {
                group: format!("chat_{}", scope.param("room").unwrap_or_default()),
                discard: true,
                gone: tx.clone(),
            }),
        )
        .route(
            "/ws/auto/{room}",
            json_consumer(move |scope| Chat {
                group: format!("auto_{}", scope.param("room").unwrap_or_default()),
                discard: false,
                gone: tx2.clone(),
            }),
        );
    let addr = serve_axum(Router::new().layer(channels)).await;
    ChatServer { addr, layer, gone }
}

async fn send_chat(ws: &mut Client, text: &str) {
    let body = serde_json::json!({ "message": text }).to_string();
    ws.send(Message::text(body))
        .await
        .expect("send chat message");
}

fn chat_json(text: &str) -> String {
    serde_json::json!({ "message": text }).to_string()
}

#[tokio::test]
async fn group_messages_reach_every_member_of_the_room_only() {
    let mut srv = chat_server().await;
    let addr = srv.addr;
    let mut a1 = connect(addr, "/ws/chat/a").await;
    let mut a2 = connect(addr, "/ws/chat/a").await;
    let mut b = connect(addr, "/ws/chat/b").await;
    // Handshake answered means `connect` (and its group_add) completed.
    assert_eq!(srv.layer.group_len("chat_a"), 2, "two members in room a");
    assert_eq!(srv.layer.group_len("chat_b"), 1, "one member in room b");

    send_chat(&mut a1, "hello a").await;
    assert_eq!(
        next_text(&mut a1).await,
        chat_json("hello a"),
        "the sender receives its own message"
    );
    assert_eq!(
        next_text(&mut a2).await,
        chat_json("hello a"),
        "the other member receives it"
    );
    // Had room b received "hello a", it would come before this.
    send_chat(&mut b, "hello b").await;
    assert_eq!(
        next_text(&mut b).await,
        chat_json("hello b"),
        "room b never saw room a's message"
    );
    send_chat(&mut a2, "again").await;
    assert_eq!(next_text(&mut a1).await, chat_json("again"));
    assert_eq!(next_text(&mut a2).await, chat_json("again"));

    // Leaving: disconnect runs group_discard, then reports.
    close(&mut a2).await;
    match within("a2's disconnect", srv.gone.recv()).await {
        Some(Gone::Disconnected { group, code }) => {
            assert_eq!(group, "chat_a");
            assert_eq!(code, 1000, "disconnect gets the client's close code");
        }
        other => panic!("expected a disconnect report, got {other:?}"),
    }
    assert_eq!(
        srv.layer.group_len("chat_a"),
        1,
        "group_discard in disconnect left the group"
    );
    send_chat(&mut a1, "alone").await;
    assert_eq!(
        next_text(&mut a1).await,
        chat_json("alone"),
        "the remaining member still chats"
    );
}

#[tokio::test]
async fn groups_are_left_automatically_when_the_connection_ends() {
    let mut srv = chat_server().await;
    let mut c1 = connect(srv.addr, "/ws/auto/x").await;
    let c2 = connect(srv.addr, "/ws/auto/x").await;
    assert_eq!(srv.layer.group_len("auto_x"), 2);

    // Drop the TCP connection without a close frame.
    drop(c2);
    match within("c2's disconnect", srv.gone.recv()).await {
        Some(Gone::Disconnected { group, .. }) => assert_eq!(group, "auto_x"),
        other => panic!("expected a disconnect report, got {other:?}"),
    }
    // The consumer is dropped once the driver has left its groups.
    match within("c2's consumer to be dropped", srv.gone.recv()).await {
        Some(Gone::Dropped(group)) => assert_eq!(group, "auto_x"),
        other => panic!("expected the consumer to be dropped, got {other:?}"),
    }
    assert_eq!(
        srv.layer.group_len("auto_x"),
        1,
        "the closed connection left its group"
    );
    send_chat(&mut c1, "still here").await;
    assert_eq!(next_text(&mut c1).await, chat_json("still here"));
    close(&mut c1).await;
    within("c1 to finish", async {
        while !matches!(srv.gone.recv().await, Some(Gone::Dropped(_)) | None) {}
    })
    .await;
    assert_eq!(srv.layer.group_len("auto_x"), 0, "empty group");
    assert_eq!(srv.layer.channel_count(), 0, "every channel is gone");
}

#[tokio::test]
async fn dropped_connection_disconnects_with_1006() {
    let mut srv = chat_server().await;
    let ws = connect(srv.addr, "/ws/auto/y").await;
    drop(ws);
    match within("the disconnect", srv.gone.recv()).await {
        Some(Gone::Disconnected { code, .. }) => {
            assert_eq!(
                code, 1006,
                "documented: 1006 when the connection dropped without a close frame"
            )
        }
        other => panic!("expected a disconnect report, got {other:?}"),
    }
}

/// Tells the client its channel name on connect; forwards events (default).
struct Named;

impl WebSocketConsumer for Named {
    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        ctx.send_text(ctx.channel_name().to_owned())?;
        Ok(Accept::new())
    }
}

async fn notify(
    State(layer): State<Arc<dyn ChannelLayer>>,
    Path(channel): Path<String>,
    body: String,
) -> (StatusCode, String) {
    match layer.send(&channel, Event::text("notify", body)).await {
        Ok(()) => (StatusCode::OK, "sent".into()),
        Err(e) => (StatusCode::NOT_FOUND, e.to_string()),
    }
}

#[tokio::test]
async fn http_handler_sends_to_a_connection_by_channel_name() {
    let channels = WebSocketLayer::new().route("/ws/named", websocket_consumer(|_| Named));
    let app = Router::new()
        .route("/notify/{channel}", post(notify))
        .with_state(channels.channel_layer())
        .layer(channels);
    let addr = serve_axum(app).await;
    let mut ws = connect(addr, "/ws/named").await;
    let name = next_text(&mut ws).await;
    assert!(
        name.contains('!'),
        "a channel name looks like a Django one: {name:?}"
    );

    let req = http::Request::post(format!("/notify/{name}"))
        .header("host", addr.to_string())
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"export ready",
        )))
        .expect("request");
    let reply = http1(addr, req).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "sent"),
        "POST /notify"
    );
    assert_eq!(
        next_text(&mut ws).await,
        "export ready",
        "the event reached the client"
    );

    // An unknown channel is an error the handler can report.
    let req = http::Request::post("/notify/specific.nobody!0")
        .header("host", addr.to_string())
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"lost",
        )))
        .expect("request");
    assert_eq!(
        http1(addr, req).await.status,
        StatusCode::NOT_FOUND,
        "no such channel"
    );
    close(&mut ws).await;
}

/// Typed JSON commands, dispatched on `"type"`.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Cmd {
    Add { a: i64, b: i64 },
    Greet { name: String },
    Bye,
}

struct Calc;

impl JsonWebSocketConsumer for Calc {
    type Incoming = Cmd;

    async fn receive_json(&mut self, ctx: &mut Context, cmd: Cmd) -> Result<(), BoxError> {
        match cmd {
            Cmd::Add { a, b } => ctx.send_json(&serde_json::json!({ "sum": a + b }))?,
            Cmd::Greet { name } => {
                ctx.send_json(&serde_json::json!({ "greeting": format!("hello {name}") }))?
            }
            Cmd::Bye => ctx.close(message::close_code::NORMAL, "bye"),
        }
        Ok(())
    }
}

async fn calc_server() -> SocketAddr {
    serve_axum(
        Router::new().layer(WebSocketLayer::new().route("/ws/calc", json_consumer(|_| Calc))),
    )
    .await
}

/// Sends the number of messages the client asks for, then closes, all in
/// one handler call.
struct SayAndGo;

impl WebSocketConsumer for SayAndGo {
    async fn receive(&mut self, ctx: &mut Context, msg: message::Message) -> Result<(), BoxError> {
        let n: usize = msg.as_text().unwrap_or_default().parse()?;
        for i in 0..n {
            ctx.send_text(format!("{i:0>100}"))?;
        }
        ctx.close(message::close_code::NORMAL, "done");
        Ok(())
    }
}

/// A close asked for after sends goes after them, without waiting for
/// anything else to wake the connection: in one batch (1, 3 messages) and
/// across several write buffers (300 x 100 B).
#[tokio::test]
async fn messages_sent_before_a_close_reach_the_client_before_it() {
    let addr = serve_axum(
        Router::new().layer(WebSocketLayer::new().route("/ws", websocket_consumer(|_| SayAndGo))),
    )
    .await;
    for n in [1usize, 3, 300] {
        let mut ws = connect(addr, "/ws").await;
        ws.send(Message::text(n.to_string())).await.expect("send");
        for i in 0..n {
            assert_eq!(
                next_text(&mut ws).await,
                format!("{i:0>100}"),
                "message {i} of {n}"
            );
        }
        assert_eq!(
            next_close(&mut ws).await,
            (1000, "done".to_owned()),
            "after {n}"
        );
    }
}

#[tokio::test]
async fn json_consumer_dispatches_typed_enum() {
    let addr = calc_server().await;
    let mut ws = connect(addr, "/ws/calc").await;
    ws.send(Message::text(r#"{"type":"add","a":2,"b":40}"#))
        .await
        .expect("send");
    assert_eq!(next_text(&mut ws).await, r#"{"sum":42}"#);
    ws.send(Message::text(r#"{"type":"greet","name":"ada"}"#))
        .await
        .expect("send");
    assert_eq!(next_text(&mut ws).await, r#"{"greeting":"hello ada"}"#);
    ws.send(Message::text(r#"{"type":"bye"}"#))
        .await
        .expect("send");
    assert_eq!(
        next_close(&mut ws).await,
        (1000, "bye".to_owned()),
        "Context::close"
    );
}

#[tokio::test]
async fn json_decode_error_closes_1007_with_reason() {
    let addr = calc_server().await;
    for bad in [
        "not json",
        r#"{"type":"nope"}"#,
        r#"{"type":"add","a":"x","b":1}"#,
    ] {
        let mut ws = connect(addr, "/ws/calc").await;
        ws.send(Message::text(bad)).await.expect("send");
        let (code, reason) = next_close(&mut ws).await;
        assert_eq!(code, 1007, "{bad:?} closes with 1007 (invalid payload)");
        assert!(
            reason.starts_with("invalid JSON: "),
            "reason names the error: {reason:?}"
        );
    }
}

#[tokio::test]
async fn json_binary_message_closes_1003_with_reason() {
    let addr = calc_server().await;
    let mut ws = connect(addr, "/ws/calc").await;
    ws.send(Message::binary(&b"{\"type\":\"bye\"}"[..]))
        .await
        .expect("send");
    assert_eq!(
        next_close(&mut ws).await,
        (1003, "binary messages are not supported".to_owned()),
        "binary closes with 1003 (unsupported data)"
    );
}

/// What an authentication middleware puts in the request.
#[derive(Clone, Debug)]
struct User(String);

struct WhoAmI;

impl WebSocketConsumer for WhoAmI {
    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        let Some(User(name)) = ctx.scope().extensions().get::<User>().cloned() else {
            return Err(Reject::new(StatusCode::UNAUTHORIZED).body("no user"));
        };
        let peer = ctx.scope().peer_addr().map(|a| a.to_string());
        ctx.send_text(format!(
            "user={name} peer={}",
            peer.as_deref().unwrap_or("none")
        ))?;
        Ok(Accept::new())
    }
}

async fn auth(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if let Some(name) = req.uri().query().and_then(|q| q.strip_prefix("user=")) {
        let user = User(name.to_owned());
        req.extensions_mut().insert(user);
    }
    next.run(req).await
}

#[tokio::test]
async fn scope_sees_extensions_from_outer_middleware_and_peer_address() {
    let channels = WebSocketLayer::new().route("/ws/me", websocket_consumer(|_| WhoAmI));
    let app = Router::new()
        .layer(channels)
        .layer(axum::middleware::from_fn(auth));
    let addr = serve_axum(app).await;

    let mut ws = connect(addr, "/ws/me?user=ada").await;
    let local = match ws.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(s) => s.local_addr().expect("local addr"),
        _ => unreachable!("plain TCP"),
    };
    assert_eq!(
        next_text(&mut ws).await,
        format!("user=ada peer={local}"),
        "the middleware's User and axum's ConnectInfo reach the scope"
    );
    let reply = http1(addr, empty(ws_req(addr, "/ws/me"))).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::UNAUTHORIZED, "no user")
    );

    // The same with a plain tower layer (MapRequest) instead of axum's.
    let channels = WebSocketLayer::new().route("/ws/me", websocket_consumer(|_| WhoAmI));
    let app = Router::new()
        .layer(channels)
        .layer(tower::util::MapRequestLayer::new(
            |mut req: axum::extract::Request| {
                req.extensions_mut().insert(User("grace".into()));
                req
            },
        ));
    let addr = serve_axum(app).await;
    let mut ws = connect(addr, "/ws/me").await;
    assert!(next_text(&mut ws)
        .await
        .starts_with("user=grace peer=127.0.0.1:"));
}

/// Echoes, fails on "fail", panics on "panic".
struct Fragile;

impl WebSocketConsumer for Fragile {
    async fn receive(&mut self, ctx: &mut Context, msg: message::Message) -> Result<(), BoxError> {
        match msg.as_text() {
            Some("fail") => Err("the handler failed".into()),
            Some("panic") => panic!("the handler panicked (expected by the test)"),
            _ => {
                ctx.send(msg)?;
                Ok(())
            }
        }
    }
}

fn fragile_layer() -> WebSocketLayer {
    WebSocketLayer::new().route("/ws/fragile", websocket_consumer(|_| Fragile))
}

#[tokio::test]
async fn handler_error_closes_1011() {
    let addr = serve_axum(Router::new().layer(fragile_layer())).await;
    let mut ws = connect(addr, "/ws/fragile").await;
    echo_text(&mut ws, "ok").await;
    ws.send(Message::text("fail")).await.expect("send");
    assert_eq!(
        next_close(&mut ws).await,
        (1011, "internal error".to_owned())
    );
}

#[tokio::test]
async fn handler_panic_closes_1011_and_spares_other_connections() {
    let channels = fragile_layer();
    let addr = serve_axum(Router::new().layer(channels.clone())).await;
    let mut bystander = connect(addr, "/ws/fragile").await;
    echo_text(&mut bystander, "before").await;

    let mut victim = connect(addr, "/ws/fragile").await;
    victim.send(Message::text("panic")).await.expect("send");
    assert_eq!(
        next_close(&mut victim).await,
        (1011, "internal error".to_owned())
    );
    assert_eq!(channels.stats().panics, 1, "the panic is counted");

    echo_text(&mut bystander, "after").await;
    echo_binary(&mut bystander, b"still alive").await;
    let mut newcomer = connect(addr, "/ws/fragile").await;
    echo_text(&mut newcomer, "new connection works").await;
}

/// Keeps a presence count: +1 in `connect`, -1 in `disconnect`; panics in
/// `receive` on "panic", in `event` on any event, and in `disconnect` when
/// told to.
struct Presence {
    online: Arc<std::sync::atomic::AtomicIsize>,
    gone: mpsc::UnboundedSender<CloseCode>,
    panic_in_disconnect: bool,
}

impl WebSocketConsumer for Presence {
    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        ctx.group_add("presence").await?;
        self.online
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Accept::new())
    }

    async fn receive(&mut self, _ctx: &mut Context, msg: message::Message) -> Result<(), BoxError> {
        if msg.as_text() == Some("panic") {
            panic!("receive panicked (expected by the test)");
        }
        Ok(())
    }

    async fn event(&mut self, _ctx: &mut Context, _event: Event) -> Result<(), BoxError> {
        panic!("event panicked (expected by the test)");
    }

    async fn disconnect(&mut self, _ctx: &mut Context, code: CloseCode) {
        self.online
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        let _ = self.gone.send(code);
        if self.panic_in_disconnect {
            panic!("disconnect panicked (expected by the test)");
        }
    }
}

#[tokio::test]
async fn a_panicking_handler_still_gets_disconnect() {
    let online = Arc::new(std::sync::atomic::AtomicIsize::new(0));
    let (gone_tx, mut gone) = mpsc::unbounded_channel();
    let memory = InMemoryChannelLayer::new();
    let channels = WebSocketLayer::new()
        .with_channel_layer(Arc::new(memory.clone()))
        .route(
            "/ws/presence",
            websocket_consumer({
                let online = online.clone();
                move |scope| Presence {
                    online: online.clone(),
                    gone: gone_tx.clone(),
                    panic_in_disconnect: scope.query() == Some("panic-again"),
                }
            }),
        );
    let addr = serve_axum(Router::new().layer(channels.clone())).await;

    // A panic in `receive`: 1011 to the client, `disconnect` runs.
    let mut ws = connect(addr, "/ws/presence").await;
    ws.send(Message::text("panic")).await.expect("send");
    assert_eq!(
        next_close(&mut ws).await,
        (1011, "internal error".to_owned())
    );
    finish(&mut ws).await;
    assert_eq!(next_gone(&mut gone).await, 1011);
    assert_eq!(online.load(std::sync::atomic::Ordering::SeqCst), 0);

    // A panic in `event`.
    let mut ws = connect(addr, "/ws/presence").await;
    wait_for(|| memory.group_len("presence") == 1).await;
    let layer = channels.channel_layer();
    layer
        .group_send("presence", Event::bare("anything"))
        .await
        .expect("group_send");
    assert_eq!(
        next_close(&mut ws).await,
        (1011, "internal error".to_owned())
    );
    finish(&mut ws).await;
    assert_eq!(next_gone(&mut gone).await, 1011);
    assert_eq!(online.load(std::sync::atomic::Ordering::SeqCst), 0);

    // `disconnect` itself panics after a handler panic: logged and counted,
    // nothing else breaks.
    let mut ws = connect(addr, "/ws/presence?panic-again").await;
    ws.send(Message::text("panic")).await.expect("send");
    assert_eq!(
        next_close(&mut ws).await,
        (1011, "internal error".to_owned())
    );
    finish(&mut ws).await;
    assert_eq!(next_gone(&mut gone).await, 1011);
    wait_for(|| channels.stats().panics == 4).await;
    wait_for(|| channels.stats().open_connections == 0).await;
    assert_eq!(
        memory.group_len("presence"),
        0,
        "groups left after every panic"
    );
    let mut ws = connect(addr, "/ws/presence").await;
    ws.send(Message::text("fine")).await.expect("send");
    close(&mut ws).await;
    assert_eq!(next_gone(&mut gone).await, 1000);
}

/// Waits until `cond` holds (bounded by the common timeout).
async fn wait_for(mut cond: impl FnMut() -> bool) {
    within("a condition", async {
        while !cond() {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

async fn next_gone(gone: &mut mpsc::UnboundedReceiver<CloseCode>) -> CloseCode {
    within("disconnect", gone.recv())
        .await
        .expect("sender alive")
}

/// Reads to the end, so the client's close reply is written.
async fn finish(ws: &mut Client) {
    within("the connection to end", async {
        while let Some(Ok(_)) = futures_util::StreamExt::next(ws).await {}
    })
    .await;
}

/// Code written against the names before issue 24 still compiles (the
/// function and the `Json` type with a deprecation warning).
#[test]
#[allow(deprecated)]
fn old_consumer_names_still_compile() {
    use tower_channels::consumer::{consumer, Json, JsonWebsocketConsumer, WebsocketConsumer};

    struct Old;
    impl WebsocketConsumer for Old {}
    struct OldJson;
    impl JsonWebsocketConsumer for OldJson {
        type Incoming = serde_json::Value;
        async fn receive_json(
            &mut self,
            _: &mut Context,
            _: Self::Incoming,
        ) -> Result<(), BoxError> {
            Ok(())
        }
    }
    let wrapped: Json<OldJson> = tower_channels::consumer::JsonConsumer(OldJson);
    let _ = (
        WebSocketLayer::new().route("/old", consumer(|_| Old)),
        json_consumer(|_| OldJson),
        wrapped,
    );
}

/// A consumer factory that panics (in the route's closure, before any
/// handler) is the consumer's panic: counted, the handshake refused, the
/// server and other connections untouched. The `Connection` is dropped
/// undecided, so the client gets 403, as for a `connect` that fails before
/// deciding (documented on `Connection`).
#[tokio::test]
async fn a_panicking_consumer_factory_is_contained() {
    let channels = fragile_layer().route(
        "/ws/broken",
        websocket_consumer(|_| -> Fragile { panic!("factory panicked (expected by the test)") }),
    );
    let addr = serve_axum(Router::new().layer(channels.clone())).await;
    let mut bystander = connect(addr, "/ws/fragile").await;
    echo_text(&mut bystander, "before").await;

    let refused = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/broken")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 403, "the handshake is refused");
        }
        other => panic!("expected the handshake to be refused with 403, got {other:?}"),
    }
    assert_eq!(channels.stats().panics, 1, "the panic is counted");

    echo_text(&mut bystander, "after").await;
    let mut newcomer = connect(addr, "/ws/fragile").await;
    echo_text(&mut newcomer, "new connection works").await;
}
