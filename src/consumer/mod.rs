//! Consumers: the code that runs for each WebSocket connection.
//!
//! Three forms, each built on the one below it:
//!
//! * [`JsonWebSocketConsumer`]: typed JSON messages (Django's
//!   `AsyncJsonWebsocketConsumer`), wrapped with [`json_consumer`];
//! * [`WebSocketConsumer`]: callbacks `connect` / `receive` / `event` /
//!   `disconnect` (Django's `AsyncWebsocketConsumer`), wrapped with [`websocket_consumer`];
//! * the raw form: any [`tower_service::Service`] that takes a [`Connection`]
//!   (the handshake waiting for a decision) is a consumer. [`from_fn`] makes
//!   one from a closure; [`Connection::accept`] gives a [`WebSocket`].
//!
//! Each connection gets its own consumer value and its own channel name.
//!
//! # Example
//!
//! The Django Channels chat tutorial, complete:
//!
//! ```
//! use serde::Deserialize;
//! use tower_channels::channel_layer::{BoxError, Event};
//! use tower_channels::consumer::{json_consumer, Accept, Context, JsonWebSocketConsumer, Reject};
//! use tower_channels::WebSocketLayer;
//!
//! #[derive(Deserialize)]
//! struct Incoming { message: String }
//!
//! struct Chat { group: String }
//!
//! impl JsonWebSocketConsumer for Chat {
//!     type Incoming = Incoming;
//!
//!     async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
//!         ctx.group_add(&self.group).await?;
//!         Ok(Accept::new())
//!     }
//!
//!     async fn receive_json(&mut self, ctx: &mut Context, msg: Incoming) -> Result<(), BoxError> {
//!         // Encode the outgoing frame once; every member forwards it.
//!         let text = serde_json::json!({ "message": msg.message }).to_string();
//!         ctx.group_send(&self.group, Event::text("chat.message", text)).await?;
//!         Ok(())
//!     }
//! }
//!
//! let layer = WebSocketLayer::new().route(
//!     "/ws/chat/{room}",
//!     json_consumer(|scope| Chat { group: format!("chat_{}", scope.param("room").unwrap_or("")) }),
//! );
//! ```
//!
//! # When a send fails
//!
//! A handler that returns an error closes its connection with 1011, which
//! is right for a bug and wrong for a broker blip: with `?` on
//! `group_send`, a Redis restart disconnects everyone who speaks in that
//! second. A channel-layer error means "maybe not delivered" (see the
//! [delivery semantics](crate::channel_layer#delivery-semantics)); answer
//! it as a production app answers a failed request: log it, tell the client
//! (which may retry or show a notice), keep the socket.
//!
//! ```
//! # use serde::Deserialize;
//! # use tower_channels::{channel_layer::Event, consumer::{Context, JsonWebSocketConsumer}, BoxError};
//! # #[derive(Deserialize)] struct Incoming { message: String }
//! # struct Chat { group: String }
//! impl JsonWebSocketConsumer for Chat {
//!     type Incoming = Incoming;
//!
//!     async fn receive_json(&mut self, ctx: &mut Context, msg: Incoming) -> Result<(), BoxError> {
//!         let text = serde_json::json!({ "message": msg.message }).to_string();
//!         if let Err(e) = ctx.group_send(&self.group, Event::text("chat.message", text)).await {
//!             // Recorded as an error, the log shows its cause (`error.sources`).
//!             tracing::warn!(error = &e as &dyn std::error::Error, "group send failed");
//!             // The details stay in the log; the client learns it may retry.
//!             ctx.send_text(r#"{"type":"error","error":"temporarily unavailable"}"#)?;
//!         }
//!         Ok(())
//!     }
//! }
//! ```
//!
//! Keep `?` for what should close the socket: a failed `ctx.send` (the
//! connection is gone) or a broken invariant. In `connect`, `?` on a
//! `group_add` error refuses the handshake with 500, which a client retries
//! like any failed request. An HTTP handler that sends to a group answers
//! `503 Service Unavailable` (`examples/chat/main.rs`, `POST
//! /rooms/{room}/messages`).

mod callback;
mod connection;
mod context;
mod driver;
mod factory;
mod from_fn;
mod join;
mod json;
mod socket;
mod unhandled;

pub use self::{
    callback::{forward_event, websocket_consumer, CallbackConsumer, WebSocketConsumer},
    connection::{Accept, Connection, Reject},
    context::Context,
    factory::{try_consumer, try_json_consumer, BoxConsumerService, ConsumerService, TryConsumer},
    from_fn::{from_fn, FromFn},
    join::{position_from_query, Join, Resumed},
    json::{json_consumer, JsonConsumer, JsonDecodeError, JsonWebSocketConsumer},
    socket::{Incoming, WebSocket},
    unhandled::{forward_event_strict, UnhandledEvent},
};

pub(crate) use self::connection::{Decision, UpgradeSource};

// Old names (issue 24), so existing code compiles. rustc ignores
// `#[deprecated]` on a re-export and a trait has no alias, so the old trait
// names are hidden re-exports; the function and the type warn.
#[allow(deprecated)]
pub use self::callback::consumer;
/// Renamed [`WebSocketConsumer`].
#[doc(hidden)]
pub use self::callback::WebSocketConsumer as WebsocketConsumer;
#[cfg(feature = "axum")]
pub use self::factory::extract;
#[allow(deprecated)]
pub use self::json::Json;
/// Renamed [`JsonWebSocketConsumer`].
#[doc(hidden)]
pub use self::json::JsonWebSocketConsumer as JsonWebsocketConsumer;
