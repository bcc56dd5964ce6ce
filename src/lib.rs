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
//!     consumer::{json_consumer, Accept, Context, JsonWebSocketConsumer, Reject},
//!     WebSocketLayer,
//! };
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
//!   hyper-util (`examples/warp.rs`: peer address, graceful shutdown,
//!   header-read timeout). The layer runs before every warp filter, so warp's
//!   auth filters never see handshakes on its routes: authenticate sockets
//!   in `connect` or with a tower layer outside.
//! * **hyper**: wrap any `Service<Request<Incoming>>` and serve with
//!   `serve_connection_with_upgrades` (`examples/hyper.rs`); insert
//!   [`PeerAddr`] for the peer address.
//!
//! A server without upgrade support gets a clear `500` answer instead of a
//! hang (see [refused handshakes](middleware#refused-handshakes)).
//!
//! In axum, the layer added last runs first (`.layer(channels).layer(auth)`
//! authenticates handshakes), `route_layer` does not see the layer's paths,
//! and a nested router needs [`WebSocketLayer::into_router`]: see
//! [`middleware`](middleware#layer-order).
//!
//! **Header-read timeout.** hyper closes a connection whose request headers
//! are incomplete after a timeout only when it has a timer; `axum::serve`
//! gives it none, so half-sent requests are held forever. With hyper-util
//! (hyper, warp, or an axum `Router` served by hand) set
//! `builder.http1().timer(TokioTimer::new()).header_read_timeout(..)` as
//! `examples/hyper.rs` and `examples/warp.rs` do; in front of `axum::serve`,
//! let a reverse proxy enforce it (nginx `client_header_timeout`).
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
//! `testing::Communicator` runs a consumer in-process, without TCP, like
//! Django's `WebsocketCommunicator`. The test kit is behind the `testing`
//! feature; turn it on for your tests only:
//!
//! ```toml
//! [dev-dependencies]
//! tower-channels = { version = "0.1", features = ["testing"] }
//! ```
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
//! | `django` | no | `channel_layer::django`: share groups with a Django Channels app (channels_redis core and pubsub formats) |
//! | `redis-cluster` | no | `channel_layer::redis::RedisClusterChannelLayer` (Redis Cluster, sharded Pub/Sub) |
//! | `nats` | no | `channel_layer::nats::NatsChannelLayer` |
//! | `testing` | no | `testing`: the test kit (`Communicator`, `WireCheckLayer`, the channel-layer conformance suite) and hyper's client; for `[dev-dependencies]` |
//! | `metrics` | no | counters, gauges and a histogram through the [`metrics`](https://docs.rs/metrics) facade (below) |
//! | `example-warp`, `test-browser`, `example-metrics` | no | not API: only build `examples/warp.rs`, `tests/browser.rs` and the chat example's `GET /metrics` |
//!
//! # Metrics
//!
//! [`WebSocketLayer::stats`] returns counters to poll. With the `metrics`
//! feature the same figures, and more, go to whatever recorder the
//! application installs (e.g. `metrics-exporter-prometheus`: the chat
//! example serves it on `GET /metrics`). Names follow Prometheus'
//! conventions, prefixed `tower_channels_`:
//!
//! | name | kind | what |
//! |---|---|---|
//! | `tower_channels_connections_open` | gauge | connections open now |
//! | `tower_channels_connections_accepted_total` | counter | handshakes accepted |
//! | `tower_channels_transport_connections_open{transport}` | gauge | the same by transport: `websocket`, and with [`HttpFallback`] `sse`, `stream`, `poll` |
//! | `tower_channels_transport_connections_accepted_total{transport}` | counter | accepted connections and sessions by transport |
//! | `tower_channels_handshakes_rejected_total` | counter | handshakes refused |
//! | `tower_channels_messages_received_total` / `_sent_total` | counter | data messages from / to clients |
//! | `tower_channels_received_bytes_total` / `sent_bytes_total` | counter | their payload bytes |
//! | `tower_channels_closes_total{code}` | counter | closed connections by close code (`1000`..`1015`, `4008`, else `other`) |
//! | `tower_channels_slow_client_closes_total` | counter | connections closed with 4008 |
//! | `tower_channels_dropped_total` | counter | events and messages dropped for slow clients |
//! | `tower_channels_ignored_events_total` | counter | events no handler took ([`consumer::UnhandledEvent`]) |
//! | `tower_channels_group_sends_total` | counter | successful group sends (built-in layers) |
//! | `tower_channels_group_send_dropped_total` | counter | members a group send skipped (queue full) |
//! | `tower_channels_handler_duration_seconds{handler}` | histogram | time in consumers' `receive` handlers (`handler="receive"`), and in their `event` handlers (`"event"`) when [`WebSocketConfig::time_event_handlers`] is on |
//! | `tower_channels_panics_total` | counter | handlers that panicked |
//!
//! Recording costs an atomic add: a layer registers its handles once, when
//! it first needs them (so install the recorder before serving), and a
//! connection folds its message and byte counts into [`ConnectionStats`]
//! once per write or wake-up, before the client can see the messages
//! counted, into counters of its worker thread's own (no cache line is
//! written by two threads). The four message and byte counters reach the
//! recorder from there once a second and whenever a connection closes, so
//! they lag [`WebSocketLayer::stats`] by at most a second. The histogram
//! reads the clock once per handler call it times. It times `receive`
//! (one sample per client message) but, unless asked, not `event`, which
//! a group send runs once per member: a Prometheus exporter stores every
//! sample until it renders, which on a fan-out burst cost about 10 % of
//! the server's CPU.
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
#[cfg(any(fuzzing, test))]
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
pub mod message;
mod metrics;
pub mod middleware;
pub mod origin;
mod payload;
mod route;
mod scope;
#[cfg(feature = "testing")]
pub mod testing;
pub mod worker;

/// A boxed error: what handlers, consumers and channel-layer backends return
/// (the same type as [`channel_layer::BoxError`]).
pub use self::channel_layer::BoxError;

pub use self::{
    compression::Compression,
    config::{InflateLimit, RateLimit, WebSocketConfig},
    engine::http::HttpFallback,
    error::Error,
    metrics::ConnectionStats,
    middleware::{layer::WebSocketLayer, service::WebSocketService},
    route::Params,
    scope::{PeerAddr, Scope},
};

/// The README's code blocks, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
