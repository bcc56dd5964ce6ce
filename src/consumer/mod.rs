//! Consumers: the code that runs for each WebSocket connection.
//!
//! Three forms, each built on the one below it:
//!
//! * [`JsonWebsocketConsumer`]: typed JSON messages (Django's
//!   `AsyncJsonWebsocketConsumer`), wrapped with [`json_consumer`];
//! * [`WebsocketConsumer`]: callbacks `connect` / `receive` / `event` /
//!   `disconnect` (Django's `AsyncWebsocketConsumer`), wrapped with [`consumer`];
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
//! use tower_channels::consumer::{json_consumer, Accept, Context, JsonWebsocketConsumer, Reject};
//! use tower_channels::WebSocketLayer;
//!
//! #[derive(Deserialize)]
//! struct Incoming { message: String }
//!
//! struct Chat { group: String }
//!
//! impl JsonWebsocketConsumer for Chat {
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

mod callback;
mod connection;
mod context;
mod driver;
mod from_fn;
mod json;
mod socket;

pub use self::{
    callback::{consumer, forward_event, ConsumerService, WebsocketConsumer},
    connection::{Accept, Connection, Reject},
    context::Context,
    from_fn::{from_fn, FromFn},
    json::{json_consumer, Json, JsonDecodeError, JsonWebsocketConsumer},
    socket::{Incoming, WebSocket},
};

pub(crate) use self::connection::{Decision, UpgradeSource};
