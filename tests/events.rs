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
