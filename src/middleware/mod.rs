//! The tower middleware: [`WebSocketLayer`] makes [`WebSocketService`]s.
//!
//! ```
//! use axum::{routing::get, Router};
//! use tower_channels::{consumer::{consumer, WebsocketConsumer}, WebSocketLayer};
//!
//! struct Echo;
//! impl WebsocketConsumer for Echo {
//!     async fn receive(
//!         &mut self,
//!         ctx: &mut tower_channels::consumer::Context,
//!         msg: tower_channels::message::Message,
//!     ) -> Result<(), tower_channels::channel_layer::BoxError> {
//!         ctx.send(msg)?;
//!         Ok(())
//!     }
//! }
//!
//! let channels = WebSocketLayer::new().route("/ws/echo", consumer(|_| Echo));
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(channels);
//! ```

mod body;
mod future;
#[allow(clippy::module_inception)]
mod layer;
mod service;
mod shutdown;

pub use self::{
    body::ResponseBody,
    future::ResponseFuture,
    layer::WebSocketLayer,
    service::WebSocketService,
    shutdown::{ShutdownHandle, ShutdownReport},
};

pub(crate) use crate::engine::Runtime;
