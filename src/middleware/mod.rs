//! The tower middleware: [`WebSocketLayer`] makes
//! [`WebSocketService`]s; this module holds their
//! response types and the shutdown handle.
//!
//! ```
//! use axum::{routing::get, Router};
//! use tower_channels::{consumer::{websocket_consumer, WebSocketConsumer}, WebSocketLayer};
//!
//! struct Echo;
//! impl WebSocketConsumer for Echo {
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
//! let channels = WebSocketLayer::new().route("/ws/echo", websocket_consumer(|_| Echo));
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(channels);
//! ```
//!
//! # Layer order
//!
//! In axum each `.layer(x)` wraps everything added before it, so the layer
//! added **last runs first**. The WebSocket layer answers its handshakes
//! itself and passes everything else inward:
//!
//! ```text
//! Router::new().route(..).layer(channels).layer(auth)
//!
//!   request ──▶ auth ──▶ channels ──┬─ WebSocket on its routes ──▶ consumer
//!                                   └─ anything else ─────────────▶ routes
//!
//! Router::new().route(..).layer(auth).layer(channels)
//!
//!   request ──▶ channels ──┬─ WebSocket on its routes ──▶ consumer   (auth never runs)
//!                          └─ anything else ──▶ auth ──▶ routes
//! ```
//!
//! * `.layer(channels).layer(auth)`: auth sees every handshake first; it can
//!   refuse it (its own 401) or put a `User` in the request extensions,
//!   which the consumer reads from [`Scope::extensions`](crate::Scope::extensions).
//!   This is usually what you want.
//! * `.layer(auth).layer(channels)`: sockets bypass auth (the consumer sees
//!   no `User`); only HTTP routes are protected.
//! * `.route_layer(auth)` wraps matched axum routes only, and the layer's
//!   paths are not axum routes: auth never runs for them. Use `.layer`, or
//!   merge the layer's routes as real routes with
//!   [`WebSocketLayer::into_router`] (feature `axum`), which `route_layer`
//!   then covers.
//! * tower's `ServiceBuilder::new().layer(a).layer(b)` reads the other way
//!   round: `a` is outermost and runs first.
//!
//! # Nested routers
//!
//! `Router::nest("/api", api)` hands the nested router only the requests
//! that match one of *its* routes (with `/api` stripped from the path). A
//! WebSocket layer applied to `api` therefore never sees `/api/ws`, and axum
//! answers 404. Either put the layer on the outer router with the full path
//! (`route("/api/ws", ..)`), or merge its routes into the nested router:
//!
//! ```
//! use axum::{routing::get, Router};
//! use tower_channels::{consumer::{websocket_consumer, WebSocketConsumer}, WebSocketLayer};
//!
//! struct Echo;
//! impl WebSocketConsumer for Echo {}
//!
//! let channels = WebSocketLayer::new().route("/ws", websocket_consumer(|_| Echo));
//! let api: Router = Router::new()
//!     .route("/users", get(|| async { "[]" }))
//!     .merge(channels.into_router()); // a route of `api`: /api/ws once nested
//! let app: Router = Router::new().nest("/api", api);
//! ```
//!
//! Patterns are matched against the path the router hands down
//! (`req.uri().path()`, prefix stripped); the full path stays in axum's
//! `OriginalUri`.
//!
//! # Refused handshakes
//!
//! A request that asks for a WebSocket on one of the layer's routes but
//! cannot get one is answered by the layer with a plain-text body and never
//! reaches a consumer (the consumer's own refusals are [`Reject`](crate::consumer::Reject)):
//!
//! | status | when |
//! |---|---|
//! | 405 (`Allow: GET`) | an HTTP/1.1 upgrade that is not a GET |
//! | 400 | HTTP/1.0, no `upgrade` in `Connection`, a missing or malformed `Sec-WebSocket-Key`, too many or malformed `Sec-WebSocket-Protocol` values |
//! | 426 (`Sec-WebSocket-Version: 13`) | `Sec-WebSocket-Version` missing or not 13 |
//! | 403 | the `Origin` is not allowed, or the consumer refused without a status |
//! | 500 | the server cannot upgrade connections (serve with `serve_connection_with_upgrades`, `axum::serve` or warp), or the consumer failed before deciding |
//! | 503 (`Retry-After`) | the layer is shutting down or at its connection limit |

mod body;
mod fallback;
mod future;
#[allow(clippy::module_inception)]
pub(crate) mod layer;
#[cfg(feature = "axum")]
mod router;
pub(crate) mod service;
mod shutdown;

pub use self::{
    body::ResponseBody,
    future::ResponseFuture,
    shutdown::{ShutdownHandle, ShutdownReport},
};

pub(crate) use self::{layer::WebSocketLayer, service::WebSocketService};
pub(crate) use crate::engine::Runtime;
