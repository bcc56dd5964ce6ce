//! Testing helpers: run a consumer without a network ([`Communicator`]),
//! and check a channel layer backend against the shared
//! [`conformance`] suite.
//!
//! Two communicators on one layer see each other's group messages:
//!
//! ```
//! use std::sync::Arc;
//! use tower_channels::channel_layer::{BoxError, Event, InMemoryChannelLayer};
//! use tower_channels::consumer::{websocket_consumer, Accept, Context, Reject, WebSocketConsumer};
//! use tower_channels::message::Message;
//! use tower_channels::testing::Communicator;
//!
//! struct Room;
//! impl WebSocketConsumer for Room {
//!     async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
//!         ctx.group_add("room").await?;
//!         Ok(Accept::new())
//!     }
//!     async fn receive(&mut self, ctx: &mut Context, msg: Message) -> Result<(), BoxError> {
//!         if let Message::Text(t) = msg {
//!             ctx.group_send("room", Event::text("chat.message", t)).await?;
//!         }
//!         Ok(())
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let layer = Arc::new(InMemoryChannelLayer::new());
//! let request = || http::Request::get("/ws/room").body(()).unwrap();
//! let mut alice = Communicator::with_request(websocket_consumer(|_| Room), "/ws/room", request(), layer.clone());
//! let mut bob = Communicator::with_request(websocket_consumer(|_| Room), "/ws/room", request(), layer.clone());
//! alice.connect().await.unwrap();
//! bob.connect().await.unwrap();
//! alice.send_text("hi").await;
//! assert_eq!(alice.receive_text().await.unwrap(), "hi");
//! assert_eq!(bob.receive_text().await.unwrap(), "hi");
//! # });
//! ```

mod client;
mod communicator;
pub mod conformance;
mod http_client;
mod through;
mod wire_check;

pub use self::communicator::{Accepted, Communicator, ReceiveError, Rejected};
pub use self::http_client::HttpTransport;
pub use self::wire_check::WireCheckLayer;
