//! Consumers tested in-process with the `Communicator`: no TCP, no server.

use std::sync::Arc;

use http::StatusCode;
use serde::Deserialize;
use tokio::sync::mpsc;
use tower_channels::{
    channel_layer::{BoxError, ChannelLayer, Event, InMemoryChannelLayer},
    consumer::{
        json_consumer, websocket_consumer, Accept, Context, JsonWebSocketConsumer, Reject,
        WebSocketConsumer,
    },
    message::{close_code, CloseCode, Message},
    testing::Communicator,
    WebSocketLayer,
};

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Cmd {
    Join { room: String },
    Say { room: String, text: String },
}

/// A small chat protocol with typed commands.
struct Rooms {
    disconnected: mpsc::UnboundedSender<CloseCode>,
}

impl JsonWebSocketConsumer for Rooms {
    type Incoming = Cmd;

    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        match ctx.scope().query_param("token").as_deref() {
            Some("secret") => {}
            Some(_) => return Err(Reject::new(StatusCode::UNAUTHORIZED).body("bad token")),
            None => return Err(Reject::default()),
        }
        match ctx.scope().subprotocols().iter().find(|p| *p == "rooms.v1") {
            Some(p) => Ok(Accept::new().subprotocol(p.clone())),
            None => Ok(Accept::new()),
        }
    }

    async fn receive_json(&mut self, ctx: &mut Context, cmd: Cmd) -> Result<(), BoxError> {
        match cmd {
            Cmd::Join { room } => {
                ctx.group_add(&room).await?;
                ctx.send_json(&serde_json::json!({ "joined": room }))?;
            }
            Cmd::Say { room, text } => {
                let frame = serde_json::json!({ "room": room, "text": text }).to_string();
                ctx.group_send(&room, Event::text("room.message", frame))
                    .await?;
            }
        }
        Ok(())
    }

    async fn disconnect(&mut self, _ctx: &mut Context, code: CloseCode) {
        let _ = self.disconnected.send(code);
    }
}

fn rooms(
    layer: &Arc<dyn ChannelLayer>,
    uri: &str,
    protocols: Option<&str>,
) -> (Communicator, mpsc::UnboundedReceiver<CloseCode>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut request = http::Request::get(uri);
    if let Some(p) = protocols {
        request = request.header("sec-websocket-protocol", p);
    }
    let comm = Communicator::with_request(
        json_consumer(move |_| Rooms {
            disconnected: tx.clone(),
        }),
        "/ws/rooms",
        request.body(()).unwrap(),
        layer.clone(),
    );
    (comm, rx)
}

#[tokio::test]
async fn connect_rejects_with_default_and_chosen_status() {
    let layer: Arc<dyn ChannelLayer> = Arc::new(InMemoryChannelLayer::new());
    let (mut anonymous, _) = rooms(&layer, "/ws/rooms", None);
    assert_eq!(
        anonymous.connect().await.unwrap_err().status,
        StatusCode::FORBIDDEN
    );
    let (mut wrong, _) = rooms(&layer, "/ws/rooms?token=guess", None);
    let rejected = wrong.connect().await.unwrap_err();
    assert_eq!(rejected.status, StatusCode::UNAUTHORIZED);
    assert_eq!(&rejected.body[..], b"bad token");
}

#[tokio::test]
async fn subprotocol_is_chosen_from_the_offer() {
    let layer: Arc<dyn ChannelLayer> = Arc::new(InMemoryChannelLayer::new());
    let (mut comm, _) = rooms(&layer, "/ws/rooms?token=secret", Some("other, rooms.v1"));
    assert_eq!(
        comm.connect().await.unwrap().subprotocol.as_deref(),
        Some("rooms.v1")
    );
    let (mut plain, _) = rooms(&layer, "/ws/rooms?token=secret", None);
    assert_eq!(plain.connect().await.unwrap().subprotocol, None);
}

#[tokio::test]
async fn groups_through_two_communicators() {
    let layer: Arc<dyn ChannelLayer> = Arc::new(InMemoryChannelLayer::new());
    let (mut alice, _) = rooms(&layer, "/ws/rooms?token=secret", None);
    let (mut bob, mut bob_gone) = rooms(&layer, "/ws/rooms?token=secret", None);
    let (mut carol, _) = rooms(&layer, "/ws/rooms?token=secret", None);
    for c in [&mut alice, &mut bob, &mut carol] {
        c.connect().await.unwrap();
    }
    for (c, room) in [(&mut alice, "a"), (&mut bob, "a"), (&mut carol, "b")] {
        c.send_json(&serde_json::json!({ "type": "join", "room": room }))
            .await;
        let joined: serde_json::Value = c.receive_json().await.unwrap();
        assert_eq!(joined["joined"], room);
    }
    alice
        .send_json(&serde_json::json!({ "type": "say", "room": "a", "text": "hi" }))
        .await;
    for c in [&mut alice, &mut bob] {
        let got: serde_json::Value = c.receive_json().await.unwrap();
        assert_eq!(got, serde_json::json!({ "room": "a", "text": "hi" }));
    }
    assert!(carol.receive_nothing().await, "room b must not see room a");

    bob.disconnect(close_code::NORMAL).await;
    assert_eq!(bob_gone.recv().await, Some(close_code::NORMAL));
    // Bob left room "a" on disconnect: only Alice remains.
    let report = layer
        .group_send("a", Event::text("room.message", "after"))
        .await
        .unwrap();
    assert_eq!(report.local_members, 1);
    assert_eq!(alice.receive_text().await.unwrap(), "after");
}

#[tokio::test]
async fn decode_errors_close_with_documented_codes() {
    let layer: Arc<dyn ChannelLayer> = Arc::new(InMemoryChannelLayer::new());
    let (mut bad_json, mut gone) = rooms(&layer, "/ws/rooms?token=secret", None);
    bad_json.connect().await.unwrap();
    bad_json.send_text("{not json").await;
    assert_eq!(bad_json.receive_close().await.unwrap(), close_code::INVALID);
    assert!(
        bad_json
            .wait_finished(std::time::Duration::from_secs(5))
            .await
    );
    assert_eq!(gone.recv().await, Some(close_code::INVALID));

    let (mut binary, _) = rooms(&layer, "/ws/rooms?token=secret", None);
    binary.connect().await.unwrap();
    binary.send_binary(vec![1u8, 2, 3]).await;
    assert_eq!(
        binary.receive_close().await.unwrap(),
        close_code::UNSUPPORTED
    );

    let (mut unknown, _) = rooms(&layer, "/ws/rooms?token=secret", None);
    unknown.connect().await.unwrap();
    unknown.send_text(r#"{"type":"dance"}"#).await;
    assert_eq!(unknown.receive_close().await.unwrap(), close_code::INVALID);
}

struct Echo;

impl WebSocketConsumer for Echo {
    async fn receive(&mut self, ctx: &mut Context, msg: Message) -> Result<(), BoxError> {
        ctx.send(msg)?;
        Ok(())
    }
}

#[tokio::test]
async fn communicator_from_a_layer_route() {
    let channels = WebSocketLayer::new()
        .route("/ws/echo/{name}", websocket_consumer(|_| Echo))
        .route(
            "/ws/rooms",
            json_consumer(|_| Rooms {
                disconnected: mpsc::unbounded_channel().0,
            }),
        );
    let mut comm = Communicator::from_layer(
        &channels,
        http::Request::get("/ws/echo/x").body(()).unwrap(),
    );
    comm.connect().await.unwrap();
    comm.send_binary(&b"\x00\xff"[..]).await;
    assert_eq!(&comm.receive_binary().await.unwrap()[..], b"\x00\xff");
    comm.send_text("text").await;
    assert_eq!(comm.receive_text().await.unwrap(), "text");
    assert!(comm.receive_nothing().await);
    comm.disconnect(close_code::NORMAL).await;
}

/// A consumer that fails on one message: the connection closes with 1011.
struct Fragile;

impl WebSocketConsumer for Fragile {
    async fn receive(&mut self, ctx: &mut Context, msg: Message) -> Result<(), BoxError> {
        match msg.as_text() {
            Some("error") => Err("refused".into()),
            Some("panic") => panic!("consumer panicked on purpose"),
            _ => Ok(ctx.send(msg)?),
        }
    }
}

#[tokio::test]
async fn handler_errors_and_panics_close_with_1011() {
    for trigger in ["error", "panic"] {
        let mut comm = Communicator::new(websocket_consumer(|_| Fragile), "/ws/fragile");
        comm.connect().await.unwrap();
        comm.send_text("fine").await;
        assert_eq!(comm.receive_text().await.unwrap(), "fine");
        comm.send_text(trigger).await;
        assert_eq!(
            comm.receive_close().await.unwrap(),
            close_code::ERROR,
            "{trigger}"
        );
    }
}

/// Tells the client its channel name, then relies on the default `event`.
struct Announce;

impl WebSocketConsumer for Announce {
    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        ctx.send_text(ctx.channel_name().to_owned())?;
        Ok(Accept::new())
    }
}

#[tokio::test]
async fn default_event_forwards_messages_and_ignores_other_events() {
    let layer: Arc<dyn ChannelLayer> = Arc::new(InMemoryChannelLayer::new());
    let request = http::Request::get("/ws/announce").body(()).unwrap();
    let mut comm = Communicator::with_request(
        websocket_consumer(|_| Announce),
        "/ws/announce",
        request,
        layer.clone(),
    );
    comm.connect().await.unwrap();
    let name = comm.receive_text().await.unwrap();
    layer
        .send(&name, Event::text("note", "fast"))
        .await
        .unwrap();
    assert_eq!(comm.receive_text().await.unwrap(), "fast");
    // No handler: ignored (and counted), the connection stays open; events
    // arrive in order, so "after" proves "no.handler" was handled first.
    layer.send(&name, Event::bare("no.handler")).await.unwrap();
    layer
        .send(&name, Event::text("note", "after"))
        .await
        .unwrap();
    assert_eq!(comm.receive_text().await.unwrap(), "after");
    // `disconnect` waits for the consumer's task to end.
    comm.disconnect(close_code::NORMAL).await;
    // The channel is gone with the connection.
    assert!(layer.send(&name, Event::bare("late")).await.is_err());
}
