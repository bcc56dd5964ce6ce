//! Django Channels for tower: WebSocket consumers, groups and channel layers
//! as tower middleware.
//!
//! Put a [`WebSocketLayer`] in front of any hyper-based service (an axum
//! `Router`, a warp filter turned into a service, a plain hyper service).
//! Requests that match one of its routes and ask for a WebSocket are answered
//! by the layer; every other request goes to the inner service untouched.
//! Each accepted connection gets:
//!
//! * its own **consumer** ([`consumer`]): `connect` / `receive` / `event` /
//!   `disconnect`, as in Django Channels, in callback, typed-JSON or raw
//!   tower-`Service` form;
//! * its own **channel name**, to which anyone holding the channel layer can
//!   send events (an HTTP handler, a background task, a [`worker`]);
//! * access to a **channel layer** ([`channel_layer`]) with groups:
//!   in-memory by default, Redis (feature `redis`) across processes, or your
//!   own backend behind the same dyn-compatible trait.
//!
//! # Example
//!
//! The chat room of the Django Channels tutorial, served by axum:
//!
//! ```no_run
//! use axum::{response::Html, routing::get, Router};
//! use serde::Deserialize;
//! use tower_channels::{
//!     channel_layer::{BoxError, Event},
//!     consumer::{json_consumer, Accept, Context, JsonWebsocketConsumer, Reject},
//!     WebSocketLayer,
//! };
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
//!         // Encoded once; every member's default `event` forwards it.
//!         let text = serde_json::json!({ "message": msg.message }).to_string();
//!         ctx.group_send(&self.group, Event::text("chat.message", text)).await?;
//!         Ok(())
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), BoxError> {
//!     let channels = WebSocketLayer::new().route(
//!         "/ws/chat/{room}",
//!         json_consumer(|scope| Chat {
//!             group: format!("chat_{}", scope.param("room").unwrap_or_default()),
//!         }),
//!     );
//!     let app = Router::new()
//!         .route("/", get(|| async { Html("<h1>chat</h1>") }))
//!         .layer(channels);
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//!     axum::serve(listener, app).await?;
//!     Ok(())
//! }
//! ```
//!
//! # Hosts
//!
//! The layer works wherever the server enables connection upgrades:
//!
//! * **axum**: `Router::layer(channels)` and `axum::serve` (HTTP/1.1 and
//!   HTTP/2 extended CONNECT). Serve with
//!   `into_make_service_with_connect_info::<SocketAddr>()` to get
//!   [`Scope::peer_addr`].
//! * **warp**: wrap `warp::service(filter)` with the layer and serve it with
//!   hyper-util (`examples/warp.rs`).
//! * **hyper**: wrap any `Service<Request<Incoming>>` and serve with
//!   `serve_connection_with_upgrades` (`examples/hyper.rs`); insert
//!   [`PeerAddr`] for the peer address.
//!
//! A server without upgrade support gets a clear `500` answer
//! ([`handshake::rejection::UpgradeUnavailable`]) instead of a hang.
//!
//! # Sending from outside a connection
//!
//! [`WebSocketLayer::channel_layer`] returns the `Arc<dyn ChannelLayer>`; give
//! it to HTTP handlers (as axum state) or tasks and call
//! [`send`](channel_layer::ChannelLayer::send) with a connection's channel
//! name or [`group_send`](channel_layer::ChannelLayer::group_send).
//!
//! # Testing consumers
//!
//! [`testing::Communicator`] runs a consumer in-process, without TCP, like
//! Django's `WebsocketCommunicator`.
//!
//! # Production
//!
//! Limits with safe defaults ([`WebSocketConfig`]): message and frame size,
//! outbound queue per connection (slow clients are closed with 4008),
//! heartbeats and idle timeout, optional connection limit and rate limit;
//! [`origin`] validation against cross-site WebSocket hijacking; graceful
//! shutdown ([`middleware::ShutdownHandle`]); panics and errors in a consumer close
//! only its own connection with 1011; counters in [`WebSocketLayer::stats`] and
//! a `tracing` span per connection (DEBUG level: route, path, peer, channel).
//!
//! # Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `axum` | yes | reads axum's `ConnectInfo<SocketAddr>` (peer address) and keeps `OriginalUri` in the scope |
//! | `redis` | no | `channel_layer::redis::RedisChannelLayer` |
//!
//! # Cancel safety
//!
//! [`channel_layer::ChannelReceiver::recv`] and
//! [`consumer::WebSocket::recv`]/[`next`](consumer::WebSocket::next) are
//! cancel-safe and can be used in `tokio::select!`.
//!
//! # Minimum supported Rust version
//!
//! 1.85 (the `redis` feature: 1.88, as the redis crate requires).

// Library code must not unwrap (peers control most inputs); tests may.
#![warn(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod channel_layer;
mod compression;
mod config;
pub mod consumer;
mod engine;
mod error;
pub mod handshake;
pub mod message;
mod metrics;
pub mod middleware;
pub mod origin;
pub mod route;
mod scope;
pub mod testing;
pub mod worker;

pub use self::{
    compression::Compression,
    config::{RateLimit, WebSocketConfig},
    error::Error,
    metrics::ConnectionStats,
    middleware::{WebSocketLayer, WebSocketService},
    scope::{PeerAddr, Scope},
};

/// The README's code blocks, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
