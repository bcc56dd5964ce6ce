//! Events a consumer does not handle (issue 14, item 5), over real sockets:
//! ignored and counted by default, fatal with `forward_event_strict`, and
//! typed dispatch into a serde enum with `Event::decode_tagged`.

mod common;

use std::sync::Arc;

use common::*;
use serde::{Deserialize, Serialize};
use tower_channels::{
    channel_layer::{ChannelLayer, Event, InMemoryChannelLayer},
    consumer::{
        forward_event, forward_event_strict, websocket_consumer, Accept, Context, Reject,
        WebSocketConsumer,
    },
    message::close_code,
    BoxError, WebSocketLayer,
};

/// Joins `room`; events go to the default `event` (or the strict one).
struct Member {
    strict: bool,
}

impl WebSocketConsumer for Member {
    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        ctx.group_add("room").await?;
        Ok(Accept::new())
    }

    async fn event(&mut self, ctx: &mut Context, event: Event) -> Result<(), BoxError> {
        if self.strict {
            forward_event_strict(ctx, &event)
        } else {
            forward_event(ctx, &event)
        }
    }
}

#[derive(Serialize, Deserialize, Clone)]
struct Joined {
    user: String,
}

#[derive(Deserialize)]
#[serde(tag = "type")]
enum RoomEvent {
    #[serde(rename = "user.joined")]
    Joined { user: String },
    #[serde(rename = "room.closed")]
    Closed,
}

/// Dispatches known types through a serde enum, leaves the rest to the default.
struct Typed;

impl WebSocketConsumer for Typed {
    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        ctx.group_add("room").await?;
        Ok(Accept::new())
    }

    async fn event(&mut self, ctx: &mut Context, event: Event) -> Result<(), BoxError> {
        match event.decode_tagged::<RoomEvent>() {
            Ok(RoomEvent::Joined { user }) => ctx.send_text(format!("{user} joined"))?,
            Ok(RoomEvent::Closed) => ctx.close(close_code::NORMAL, "room closed"),
            Err(_) => forward_event(ctx, &event)?,
        }
        Ok(())
    }
}

async fn serve(layer: WebSocketLayer) -> std::net::SocketAddr {
    serve_axum(axum::Router::new().layer(layer)).await
}

#[tokio::test]
async fn unknown_event_types_are_ignored_and_counted() {
    let channel_layer: Arc<dyn ChannelLayer> = Arc::new(InMemoryChannelLayer::new());
    let layer = WebSocketLayer::new()
        .with_channel_layer(channel_layer.clone())
        .route("/ws", websocket_consumer(|_| Member { strict: false }))
        .route("/ws/typed", websocket_consumer(|_| Typed));
    let addr = serve(layer.clone()).await;
    let mut a = connect(addr, "/ws").await;
    let mut b = connect(addr, "/ws").await;
    let mut typed = connect(addr, "/ws/typed").await;

    // A newer process's event type: nobody handles it, nobody is closed.
    let report = channel_layer
        .group_send("room", Event::bare("feature.from.the.future"))
        .await
        .unwrap();
    assert_eq!(report.local_members, 3);
    channel_layer
        .group_send(
            "room",
            Event::new("user.joined", Joined { user: "ada".into() }),
        )
        .await
        .unwrap();
    channel_layer
        .group_send("room", Event::text("chat.message", "still here"))
        .await
        .unwrap();
    // Events reach each member in order, so these frames come after the
    // unknown events were handled (and ignored).
    assert_eq!(next_text(&mut a).await, "still here");
    assert_eq!(next_text(&mut b).await, "still here");
    assert_eq!(next_text(&mut typed).await, "ada joined");
    assert_eq!(next_text(&mut typed).await, "still here");
    // 3 members ignored the unknown type; Member ignored user.joined twice.
    assert_eq!(layer.stats().ignored_events, 5);

    channel_layer
        .group_send("room", Event::bare("room.closed"))
        .await
        .unwrap();
    assert_eq!(next_close(&mut typed).await.0, close_code::NORMAL);
}

#[tokio::test]
async fn strict_consumers_close_with_1011_as_django_does() {
    let channel_layer: Arc<dyn ChannelLayer> = Arc::new(InMemoryChannelLayer::new());
    let layer = WebSocketLayer::new()
        .with_channel_layer(channel_layer.clone())
        .route(
            "/ws/strict",
            websocket_consumer(|_| Member { strict: true }),
        )
        .route("/ws", websocket_consumer(|_| Member { strict: false }));
    let addr = serve(layer.clone()).await;
    let mut strict = connect(addr, "/ws/strict").await;
    let mut lenient = connect(addr, "/ws").await;
    channel_layer
        .group_send("room", Event::bare("unknown.kind"))
        .await
        .unwrap();
    assert_eq!(next_close(&mut strict).await.0, close_code::ERROR);
    channel_layer
        .group_send("room", Event::text("chat.message", "hi"))
        .await
        .unwrap();
    assert_eq!(next_text(&mut lenient).await, "hi");
    assert_eq!(layer.stats().ignored_events, 1);
}

/// One enum both builds the events a consumer sends and decodes those it
/// receives (issue 24, item 3): every kind string is written once.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(tag = "type")]
enum DocEvent {
    #[serde(rename = "doc.edit")]
    Edit { by: String, text: String },
    #[serde(rename = "doc.cursor")]
    Cursor(Cursor),
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Cursor {
    by: String,
    at: u32,
}

/// Sends `edit TEXT` / `cursor N` from its client to the document as typed
/// events; renders the other members' events for its client.
struct Editor {
    name: String,
}

impl WebSocketConsumer for Editor {
    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        ctx.group_add("doc").await?;
        Ok(Accept::new())
    }

    async fn receive(
        &mut self,
        ctx: &mut Context,
        message: tower_channels::message::Message,
    ) -> Result<(), BoxError> {
        let text = message.as_text().unwrap_or_default();
        let by = self.name.clone();
        let event = match text.split_once(' ') {
            Some(("cursor", at)) => DocEvent::Cursor(Cursor {
                by,
                at: at.parse()?,
            }),
            _ => DocEvent::Edit {
                by,
                text: text.trim_start_matches("edit ").to_owned(),
            },
        };
        ctx.group_send("doc", Event::tagged(event)?).await?;
        Ok(())
    }

    async fn event(&mut self, ctx: &mut Context, event: Event) -> Result<(), BoxError> {
        match event.decode_tagged::<DocEvent>()? {
            DocEvent::Edit { by, text } => {
                ctx.send_text(format!("{} {by}: {text}", event.kind()))?
            }
            DocEvent::Cursor(Cursor { by, at }) => {
                ctx.send_text(format!("{} {by} at {at}", event.kind()))?
            }
        }
        Ok(())
    }
}

#[tokio::test]
async fn one_tagged_enum_builds_and_decodes_events() {
    use tower_channels::testing::Communicator;
    let layer = WebSocketLayer::new()
        .with_channel_layer(Arc::new(InMemoryChannelLayer::new()))
        .route(
            "/ws/{name}",
            websocket_consumer(|scope| Editor {
                name: scope.param("name").unwrap_or_default().to_owned(),
            }),
        );
    let app = axum::Router::new().layer(layer);
    let get = |path: &str| http::Request::get(path).body(()).unwrap();
    let mut ada = Communicator::through(app.clone(), get("/ws/ada"));
    let mut bob = Communicator::through(app, get("/ws/bob"));
    ada.connect().await.unwrap();
    bob.connect().await.unwrap();

    ada.send_text("edit hello").await;
    assert_eq!(bob.receive_text().await.unwrap(), "doc.edit ada: hello");
    assert_eq!(ada.receive_text().await.unwrap(), "doc.edit ada: hello");
    bob.send_text("cursor 5").await;
    assert_eq!(ada.receive_text().await.unwrap(), "doc.cursor bob at 5");
    assert_eq!(bob.receive_text().await.unwrap(), "doc.cursor bob at 5");

    // Across processes the body travels without its tag and decodes the same.
    let event = Event::tagged(DocEvent::Cursor(Cursor {
        by: "eve".into(),
        at: 9,
    }))
    .unwrap();
    let wire = Event::decode(&event.encode().unwrap()).unwrap();
    assert_eq!(wire.kind(), "doc.cursor");
    assert_eq!(
        wire.body::<serde_json::Value>().unwrap(),
        serde_json::json!({"by": "eve", "at": 9})
    );
    assert_eq!(
        wire.decode_tagged::<DocEvent>().unwrap(),
        DocEvent::Cursor(Cursor {
            by: "eve".into(),
            at: 9
        })
    );
    ada.disconnect(1000).await;
    bob.disconnect(1000).await;
}
