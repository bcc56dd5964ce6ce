//! The chat app of the Django Channels tutorial, on axum, with the in-memory
//! channel layer (or Redis with `--redis`, a Redis Cluster with
//! `--redis-cluster URL,URL,...`, NATS with `--nats URL`, or a Django app's
//! channels_redis with `--django` / `--django-pubsub`).
//!
//! ```text
//! cargo run --example chat -- --addr 127.0.0.1:8000
//! ```
//!
//! Then open <http://127.0.0.1:8000/>, pick a room in two tabs and talk.
//!
//! * `GET /`: the chat page, and `GET /tower-channels.js`: the JavaScript
//!   client it imports (`clients/js/tower-channels.js`);
//! * `/ws/chat/{room}`: send `{"message": "..."}`, every member of the room
//!   (the sender included) receives `{"message": "...", "offset": N,
//!   "epoch": "E"}` (plus `"user"` when the sender named itself). Rooms keep
//!   a history of their last 100 messages, and have presence, on every
//!   layer that has both: in-memory, `--redis`, `--redis-cluster` and
//!   `--nats` (with `--django*`, rooms are plain: messages carry no offset
//!   and there is no presence):
//!   * `?user=NAME` names the member for presence; members get
//!     `{"type": "join", "user": U}` when a user's first connection joins
//!     and `{"type": "leave", "user": U}` when its last one leaves;
//!   * sending `{"type": "presence"}` answers
//!     `{"type": "presence", "members": [names]}` (on plain rooms,
//!     `{"type": "error", "error": "no presence"}`);
//!   * connecting with `?offset=N&epoch=E` (the last message seen) first
//!     delivers the messages missed since, then live ones, with no gap and
//!     no duplicate; when that is impossible (history reset or trimmed) the
//!     first message is `{"type": "recovery_failed"}`;
//! * `/ws/echo`: echoes every message;
//! * `POST /rooms/{room}/messages`: an ordinary HTTP handler that sends the
//!   request body to everyone in the room through the channel layer (same
//!   origin check and size limit as the WebSocket; `503` when the channel
//!   layer fails).
//!
//! Room names are any text (`café` included): [`room_group`] maps each to a
//! valid group name. A failed `group_send` (Redis restarting) is answered
//! with `{"type":"error","error":"temporarily unavailable"}` and the socket
//! stays open.
//!
//! With `--features example-metrics`, `GET /metrics` serves the layer's metrics in
//! Prometheus' text format (`metrics-exporter-prometheus`, rendered into an
//! axum route).
//!
//! `--django redis://127.0.0.1:6379` (channels_redis' core layer) or
//! `--django-pubsub URL` (its pubsub layer, with `--prefix`, default `asgi`; needs
//! `--features django`) shares the rooms with the Django Channels tutorial
//! app: its group is `chat_<room>` and its event the tutorial's
//! `{"type": "chat.message", "message": ...}`.
//!
//! `--max-message-size BYTES` raises the incoming message and frame limits
//! (1 MiB by default); the Autobahn run (`.ci/autobahn.sh`) uses 16 MiB.
//! `--compression-threshold BYTES` sets the size below which messages go out
//! uncompressed on a permessage-deflate connection (256 by default; the
//! Autobahn run uses 0, so every message of its 12.* and 13.* cases is
//! compressed).
//! `--inflate-limit BYTES_PER_SEC` sets [`WebSocketConfig::inflate_limit`]'s
//! sustained rate of inflated bytes per connection (4 MiB/s by default; 0
//! turns it off: the Autobahn run does, since its 12.* and 13.* cases send
//! compressed messages of up to 256 KiB back to back as a stress test).
//! `--write-delay-ms MS` sets [`WebSocketConfig::write_delay`]: outgoing
//! messages wait up to that long to be batched into one write (off by
//! default, and 0 is off too; `bench/` measures its effect).
//! `--presence-ttl SECS` sets how long the members of a crashed process stay
//! listed with `--redis` or `--redis-cluster` (30 s by default; their leave
//! is announced within the TTL and a third).
//! `--prefix P` names the layer's keys, channels and subjects on `--redis`,
//! `--redis-cluster` and `--nats` (the layers' defaults otherwise): apps,
//! or tests, sharing a broker keep apart by prefix.
//!
//! The HTTP fallback is on ([`HttpFallback`]): a browser that cannot open a
//! WebSocket reaches the same consumers by Server-Sent Events,
//! HTTP-streaming or long-polling (`GET /ws/chat/{room}?transport=sse`,
//! messages `POST`ed to the session). `--http-secret SECRET` signs the
//! session tokens; processes behind one load balancer without sticky
//! sessions must share it (random per process by default).
//!
//! The router is served by the accept loop the examples share
//! (`examples/support/serve.rs`, hyper-util) rather than `axum::serve`, which
//! has no timeouts: `--header-read-timeout SECS` (10), `--idle-timeout SECS`
//! (60: a connection with no request in flight, silent TCP and idle HTTP/2
//! included, is shut down) and `--keep-alive SECS` (20, HTTP/2 pings); accept
//! errors are retried with a backoff.

use std::{net::SocketAddr, sync::Arc, time::Duration};
use tracing_subscriber::prelude::*;

#[path = "../support/serve.rs"]
mod serve;
use serve::{serve, Limits};

use axum::{
    extract::{DefaultBodyLimit, Path, State},
    http::{request::Parts, StatusCode},
    response::Html,
    routing::{get, post},
    Router,
};
use serde::{Deserialize, Serialize};
use tower_channels::{
    channel_layer::{
        validate_group_name, BoxError, ChannelLayer, Event, Feature, GroupPattern, HistoryPolicy,
        InMemoryChannelLayer, PresenceChange, PresenceConfig, PresenceInfo, StreamPosition,
        PRESENCE_JOIN, PRESENCE_LEAVE,
    },
    consumer::{
        forward_event, json_consumer, position_from_query, websocket_consumer, Accept, Context,
        JsonWebSocketConsumer, Reject, WebSocketConsumer,
    },
    message::Message,
    origin::AllowedOrigins,
    Compression, HttpFallback, InflateLimit, WebSocketConfig, WebSocketLayer,
};

/// What a chat client sends: `{"message": "..."}` or `{"type": "presence"}`.
#[derive(Deserialize)]
struct ChatIn {
    #[serde(rename = "type")]
    kind: Option<String>,
    message: Option<String>,
}

/// The body of a `chat.message` event.
#[derive(Clone, Serialize, Deserialize)]
struct ChatBody {
    message: String,
    user: Option<String>,
}

/// What a chat client receives for a message: `{"message": ..., "offset":
/// N, "epoch": "E", "user": ...}` (the position in rooms with history).
#[derive(Serialize)]
struct ChatOut<'a> {
    message: &'a str,
    #[serde(flatten)]
    position: Option<&'a StreamPosition>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
}

/// One per connection on `/ws/chat/{room}`.
struct Chat {
    group: String,
    user: Option<String>,
    /// Whether the rooms have presence on this process's layer (decided
    /// once at startup: [`ChatLayer`]).
    presence: bool,
}

/// The group of a room: history and presence notifications apply to `chat_*`.
const ROOMS: &str = "chat_";

fn bad_request(body: &'static str) -> Reject {
    Reject::new(StatusCode::BAD_REQUEST).body(body)
}

impl Chat {
    /// Sends a `chat.message` event to the client with its history position.
    /// The frame is the same for every member, so it is rendered (and
    /// compressed) once per group send, not once per member.
    fn deliver(&mut self, ctx: &Context, event: &Event) -> Result<(), BoxError> {
        let frame = event.render_once(|event| -> Result<Message, BoxError> {
            let body: ChatBody = event.body()?;
            let frame = ChatOut {
                message: &body.message,
                position: event.position(),
                user: body.user.as_deref(),
            };
            Ok(Message::text(serde_json::to_string(&frame)?))
        })?;
        forward_event(ctx, &frame)
    }
}

impl JsonWebSocketConsumer for Chat {
    type Incoming = ChatIn;

    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        if validate_group_name(&self.group).is_err() {
            return Err(bad_request("room name too long"));
        }
        // `?offset=&epoch=`: the last message the client saw, if any. Joining
        // recovers what it missed after it; those messages reach `event`
        // before live ones, each once. Layers without presence (Django's)
        // still chat: the member joins plainly.
        let since = position_from_query(ctx.scope())?;
        let mut join = ctx.join(&self.group).resume_from(since);
        if let (Some(user), true) = (&self.user, self.presence) {
            let info =
                PresenceInfo::new(user.as_str()).map_err(|_| bad_request("invalid user name"))?;
            join = join.presence(info);
        }
        if join.await?.has_gap() {
            ctx.send_json(&serde_json::json!({ "type": "recovery_failed" }))?;
        }
        Ok(Accept::new())
    }

    async fn receive_json(&mut self, ctx: &mut Context, msg: ChatIn) -> Result<(), BoxError> {
        match (msg.kind.as_deref(), msg.message) {
            (Some("presence"), _) if !self.presence => {
                ctx.send_json(&serde_json::json!({ "type": "error", "error": "no presence" }))?
            }
            (Some("presence"), _) => {
                let members = ctx.presence(&self.group).await?;
                let names: Vec<&str> = members.iter().map(|m| m.user_id()).collect();
                ctx.send_json(&serde_json::json!({ "type": "presence", "members": names }))?;
            }
            (None, Some(message)) => {
                let event = chat_event(message, self.user.clone());
                // A broker blip (Redis or NATS restarting) is not this
                // client's fault: tell it and keep the socket (members in
                // this process got the message anyway; members elsewhere
                // may or may not have).
                if let Err(e) = ctx.group_send(&self.group, event).await {
                    tracing::warn!(error = &e as &dyn std::error::Error, group = %self.group, "group send failed");
                    ctx.send_text(r#"{"type":"error","error":"temporarily unavailable"}"#)?;
                }
            }
            _ => {
                ctx.send_json(&serde_json::json!({ "type": "error", "error": "unknown message" }))?
            }
        }
        Ok(())
    }

    async fn event(&mut self, ctx: &mut Context, event: Event) -> Result<(), BoxError> {
        match event.kind() {
            "chat.message" => self.deliver(ctx, &event),
            kind @ (PRESENCE_JOIN | PRESENCE_LEAVE) => {
                let change: PresenceChange = event.body()?;
                let kind = if kind == PRESENCE_JOIN {
                    "join"
                } else {
                    "leave"
                };
                ctx.send_json(&serde_json::json!({ "type": kind, "user": change.user_id }))?;
                Ok(())
            }
            _ => forward_event(ctx, &event),
        }
    }
}

/// The `chat.message` event; each member's consumer adds the history
/// position. As a typed event it is also the Django tutorial's dict
/// (`{"type": "chat.message", "message": ...}`), so `--django*` works as is.
fn chat_event(message: String, user: Option<String>) -> Event {
    Event::new("chat.message", ChatBody { message, user })
}

/// The group of a chat room, `chat_<room>` as in the Django tutorial. Group
/// names allow only ASCII letters, digits, `-`, `_` and `.`; other room
/// names (`café`, `a b`) are hex-encoded under `chat-x.`, a prefix a plain
/// name cannot produce, so the mapping is one-to-one. Names too long for a
/// group (100 characters) are refused by `connect`.
fn room_group(room: &str) -> String {
    let plain = room
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if plain && !room.is_empty() {
        format!("{ROOMS}{room}")
    } else {
        let hex: String = room.bytes().map(|b| format!("{b:02x}")).collect();
        format!("chat-x.{hex}")
    }
}

/// `/ws/echo`: sends every message back.
struct Echo;

impl WebSocketConsumer for Echo {
    async fn receive(&mut self, ctx: &mut Context, msg: Message) -> Result<(), BoxError> {
        ctx.send(msg)?;
        Ok(())
    }
}

/// What the HTTP handlers share.
#[derive(Clone)]
struct AppState {
    channel_layer: Arc<dyn ChannelLayer>,
    /// The WebSocket's origin policy, applied to `POST`s too.
    origins: AllowedOrigins,
    /// The WebSocket's message size limit, applied to `POST` bodies and the
    /// frames they become.
    max_message_size: usize,
}

/// Refuses cross-site requests (CSRF): a browser's `Sec-Fetch-Site:
/// cross-site`, or an `Origin` the WebSocket would refuse. Non-browser
/// clients send neither and pass, as on the WebSocket.
fn same_site(state: &AppState, parts: &Parts) -> bool {
    let cross_site = parts
        .headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"));
    !cross_site && state.origins.allows(parts)
}

async fn post_message(
    State(state): State<AppState>,
    Path(room): Path<String>,
    parts: Parts,
    body: String,
) -> Result<String, (StatusCode, &'static str)> {
    if !same_site(&state, &parts) {
        return Err((StatusCode::FORBIDDEN, "cross-site request refused\n"));
    }
    let group = room_group(&room);
    if validate_group_name(&group).is_err() {
        return Err((StatusCode::BAD_REQUEST, "room name too long\n"));
    }
    // The frame, not only the body, must fit (JSON escaping can grow it).
    let frame_len = serde_json::json!({ "message": body }).to_string().len();
    if frame_len > state.max_message_size {
        return Err((StatusCode::PAYLOAD_TOO_LARGE, "message too large\n"));
    }
    let report = state
        .channel_layer
        .group_send(&group, chat_event(body, None))
        .await
        .map_err(|e| {
            // Logged here; the client learns only that it may retry.
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                group,
                "group send failed"
            );
            (StatusCode::SERVICE_UNAVAILABLE, "temporarily unavailable\n")
        })?;
    let offset = report.position.map_or(0, |p| p.offset());
    Ok(format!(
        "delivered to {} connections here and {} other processes (offset {offset})\n",
        report.local_members,
        report.remote_receivers.unwrap_or(0)
    ))
}

/// `GET /tower-channels.js`: the JavaScript client, built into the binary.
async fn js_client() -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/javascript; charset=utf-8",
        )],
        include_str!("../../clients/js/tower-channels.js"),
    )
}

struct Args {
    addr: SocketAddr,
    redis: Option<String>,
    django: Option<(String, bool)>,
    prefix: Option<String>,
    redis_cluster: Option<String>,
    nats: Option<String>,
    max_message_size: Option<usize>,
    compression_threshold: Option<usize>,
    write_delay_ms: Option<u64>,
    inflate_limit: Option<u64>,
    presence_ttl: Option<Duration>,
    http_secret: Option<String>,
    limits: Limits,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: ([127, 0, 0, 1], 8000).into(),
        redis: None,
        django: None,
        prefix: None,
        redis_cluster: None,
        nats: None,
        max_message_size: None,
        compression_threshold: None,
        write_delay_ms: None,
        inflate_limit: None,
        presence_ttl: None,
        http_secret: None,
        limits: Limits::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--addr" => {
                let v = it.next().ok_or("--addr needs a value")?;
                args.addr = v.parse().map_err(|e| format!("bad --addr {v:?}: {e}"))?;
            }
            "--redis" => args.redis = Some(it.next().ok_or("--redis needs a URL")?),
            "--django" => args.django = Some((it.next().ok_or("--django needs a URL")?, false)),
            "--prefix" => args.prefix = Some(it.next().ok_or("--prefix needs a value")?),
            "--django-pubsub" => {
                args.django = Some((it.next().ok_or("--django-pubsub needs a URL")?, true))
            }
            "--redis-cluster" => {
                args.redis_cluster = Some(it.next().ok_or("--redis-cluster needs URL,URL,...")?)
            }
            "--nats" => args.nats = Some(it.next().ok_or("--nats needs a URL")?),
            "--max-message-size" => {
                let v = it.next().ok_or("--max-message-size needs a value")?;
                let n = v
                    .parse()
                    .map_err(|e| format!("bad --max-message-size {v:?}: {e}"))?;
                args.max_message_size = Some(n);
            }
            "--compression-threshold" => {
                let v = it.next().ok_or("--compression-threshold needs a value")?;
                let n = v
                    .parse()
                    .map_err(|e| format!("bad --compression-threshold {v:?}: {e}"))?;
                args.compression_threshold = Some(n);
            }
            "--write-delay-ms" => {
                let v = it.next().ok_or("--write-delay-ms needs a value")?;
                let n = v
                    .parse()
                    .map_err(|e| format!("bad --write-delay-ms {v:?}: {e}"))?;
                args.write_delay_ms = Some(n);
            }
            "--inflate-limit" => {
                let v = it.next().ok_or("--inflate-limit needs a value")?;
                let n = v
                    .parse()
                    .map_err(|e| format!("bad --inflate-limit {v:?}: {e}"))?;
                args.inflate_limit = Some(n);
            }
            "--presence-ttl" => {
                let v = it.next().ok_or("--presence-ttl needs a value")?;
                let secs: f64 = v
                    .parse()
                    .map_err(|e| format!("bad --presence-ttl {v:?}: {e}"))?;
                args.presence_ttl = Some(
                    Duration::try_from_secs_f64(secs)
                        .map_err(|e| format!("bad --presence-ttl {v:?}: {e}"))?,
                );
            }
            "--http-secret" => {
                args.http_secret = Some(it.next().ok_or("--http-secret needs a value")?)
            }
            "-h" | "--help" => {
                return Err(
                    "usage: chat [--addr 127.0.0.1:8000] [--redis redis://127.0.0.1:6379] \
                     [--django URL | --django-pubsub URL [--prefix asgi]] \
                     [--redis-cluster URL,URL,...] [--nats nats://127.0.0.1:4222] \
                     [--max-message-size BYTES] [--compression-threshold BYTES] \
                     [--write-delay-ms MS] [--inflate-limit BYTES_PER_SEC] [--presence-ttl SECS] \
                     [--http-secret SECRET] "
                        .to_owned()
                        + Limits::USAGE,
                )
            }
            other if args.limits.parse_flag(other, &mut it)? => {}
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // `RUST_LOG` as `level` or `target=level,...` (tracing-subscriber's
    // `Targets`: no regex engine to compile, unlike `EnvFilter`).
    let filter: tracing_subscriber::filter::Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
        });
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer())
        .with(filter)
        .init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    // The channel layer first: whether rooms have presence is decided here,
    // once, not on every connection.
    let layer = chat_layer(&args).await?;
    layer.check()?;
    let presence = layer.rooms;
    let mut channels = WebSocketLayer::new()
        .with_channel_layer(layer.layer)
        .route(
            "/ws/chat/{room}",
            json_consumer(move |scope| Chat {
                group: room_group(scope.param("room").unwrap_or_default()),
                user: scope.query_param("user").filter(|u| !u.is_empty()),
                presence,
            }),
        )
        .route("/ws/echo", websocket_consumer(|_| Echo));
    // Only pages served by this host may open sockets or POST (defence
    // against cross-site WebSocket hijacking and CSRF); clients without
    // Origin are allowed. Behind a proxy or in production, list the origins
    // instead: `same_host` trusts the Host header (see `tower_channels::origin`).
    let origins = AllowedOrigins::same_host();
    channels = channels.allowed_origins(origins.clone());
    let mut config = WebSocketConfig::default();
    if let Some(n) = args.max_message_size {
        config = config.max_message_size(n).max_frame_size(n);
    }
    if let Some(n) = args.compression_threshold {
        config = config.compression(Compression::default().threshold(n));
    }
    if let Some(ms) = args.write_delay_ms {
        config = config.write_delay(Some(Duration::from_millis(ms)));
    }
    match args.inflate_limit {
        None => {}
        Some(0) => config = config.inflate_limit(None),
        // Bursts of one second's worth (raised to the message size limit).
        Some(rate) => config = config.inflate_limit(Some(InflateLimit::new(rate, rate))),
    }
    channels = channels.with_config(config);
    // SSE, HTTP-streaming and long-poll for clients without WebSocket.
    let mut fallback = HttpFallback::new();
    if let Some(secret) = &args.http_secret {
        fallback = fallback.secret(secret.as_bytes().to_vec());
    }
    channels = channels.http_fallback(fallback);
    // The POST endpoint takes messages as large as the sockets do (1 MiB,
    // `WebSocketConfig`'s default, unless `--max-message-size`).
    let max_message_size = args.max_message_size.unwrap_or(1 << 20);
    // axum's graceful shutdown does not reach upgraded sockets: on Ctrl-C,
    // close them with 1001 and run every disconnect, then let axum finish.
    let websockets = channels.shutdown_handle();
    let app = Router::new()
        .route("/", get(|| async { Html(include_str!("index.html")) }))
        // The JavaScript client the page imports (clients/js in the repository).
        .route("/tower-channels.js", get(js_client))
        .merge(metrics_route()?)
        .route(
            "/rooms/{room}/messages",
            // axum stops reading a body past this limit (413).
            post(post_message).layer(DefaultBodyLimit::max(max_message_size)),
        )
        .with_state(AppState {
            channel_layer: channels.channel_layer(),
            origins,
            max_message_size,
        })
        .layer(channels);

    let shutdown = async move {
        let _ = tokio::signal::ctrl_c().await;
        let report = websockets.shutdown(Duration::from_secs(10)).await;
        tracing::info!(
            closed = report.closed,
            aborted = report.aborted,
            "websockets shut down"
        );
    };

    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    println!("listening on {}", listener.local_addr()?);
    // Not `axum::serve`: it has no header-read or idle timeout, so silent and
    // half-sent connections would be held forever (README, "Reliability").
    serve(listener, app, args.limits, shutdown).await;
    Ok(())
}

/// `GET /metrics` in Prometheus' text format: installs the process's
/// `metrics` recorder and renders it on request.
#[cfg(feature = "example-metrics")]
fn metrics_route<S: Clone + Send + Sync + 'static>() -> Result<Router<S>, BoxError> {
    // Histograms as Prometheus histograms (buckets), which add up across
    // instances, rather than the exporter's default summaries (quantiles
    // per process, and a sketch to update per sample).
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &[
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5,
            ],
        )?
        .install_recorder()?;
    // Histograms need periodic upkeep when no exporter task of the crate runs.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(Router::new().route("/metrics", get(move || std::future::ready(handle.render()))))
}

#[cfg(not(feature = "example-metrics"))]
fn metrics_route<S: Clone + Send + Sync + 'static>() -> Result<Router<S>, BoxError> {
    Ok(Router::new())
}

/// The rooms' history and presence: rooms keep their last 100 messages
/// for 5 minutes, and announce who comes and goes (`chat` covers
/// `chat_<room>` and `chat-x.<hex>`). The same on every layer that has
/// them.
struct Rooms {
    history: HistoryPolicy,
    presence: PresenceConfig,
}

impl Rooms {
    /// What a layer built with [`Rooms`] must support.
    const FEATURES: [Feature; 2] = [Feature::History, Feature::Presence];

    fn new(presence_ttl: Option<Duration>) -> Self {
        let mut presence = PresenceConfig::new().notify(GroupPattern::prefix("chat"));
        if let Some(ttl) = presence_ttl {
            presence = presence.ttl(ttl);
        }
        Self {
            history: HistoryPolicy::new(GroupPattern::prefix("chat")),
            presence,
        }
    }
}

/// A cross-process layer's builder with the rooms' history and presence:
/// the same two calls on every such builder (`.history(..)`,
/// `.presence(..)`).
#[cfg_attr(not(any(feature = "redis", feature = "nats")), allow(unused_macros))]
macro_rules! keep_rooms {
    ($builder:expr, $rooms:expr) => {{
        let rooms: Rooms = $rooms;
        $builder.history(rooms.history).presence(rooms.presence)
    }};
}

/// The chat's channel layer, and whether its rooms keep history and
/// presence ([`Rooms`]) or are plain.
struct ChatLayer {
    layer: Arc<dyn ChannelLayer>,
    rooms: bool,
}

impl ChatLayer {
    /// A layer built with [`Rooms`].
    fn with_rooms(layer: impl ChannelLayer) -> Self {
        Self {
            layer: Arc::new(layer),
            rooms: true,
        }
    }

    /// A layer built without them: plain rooms (members join without
    /// presence, messages carry no position).
    #[cfg_attr(not(feature = "django"), allow(dead_code))]
    fn plain(layer: impl ChannelLayer) -> Self {
        Self {
            layer: Arc::new(layer),
            rooms: false,
        }
    }

    /// Fails at startup, once, if the layer lacks what its rooms were built
    /// with, rather than on every connection.
    fn check(&self) -> Result<(), BoxError> {
        if self.rooms {
            self.layer.capabilities().require(&Rooms::FEATURES)?;
        }
        Ok(())
    }
}

/// The layer of `--redis`, `--redis-cluster`, `--nats`, `--django*` (at
/// most one of them), or the in-memory one. Every layer that has history
/// and presence is built with the same [`Rooms`].
async fn chat_layer(args: &Args) -> Result<ChatLayer, BoxError> {
    let rooms = Rooms::new(args.presence_ttl);
    let chosen = [
        args.redis.is_some(),
        args.redis_cluster.is_some(),
        args.nats.is_some(),
        args.django.is_some(),
    ];
    if chosen.into_iter().filter(|&c| c).count() > 1 {
        return Err(
            "choose one of --redis, --redis-cluster, --nats, --django, --django-pubsub".into(),
        );
    }
    let prefix = args.prefix.as_deref();
    if let Some(url) = &args.redis {
        return redis_layer(url, prefix, rooms).await;
    }
    if let Some(urls) = &args.redis_cluster {
        return redis_cluster_layer(urls, prefix, rooms).await;
    }
    if let Some(url) = &args.nats {
        return nats_layer(url, prefix, rooms).await;
    }
    if let Some((url, pubsub)) = &args.django {
        // channels_redis' formats have neither history nor presence.
        return django_layer(url, *pubsub, args.prefix.as_deref()).await;
    }
    Ok(ChatLayer::with_rooms(
        InMemoryChannelLayer::new()
            .with_history(rooms.history)
            .with_presence(rooms.presence),
    ))
}

#[cfg(feature = "redis")]
async fn redis_layer(url: &str, prefix: Option<&str>, rooms: Rooms) -> Result<ChatLayer, BoxError> {
    use tower_channels::channel_layer::redis::RedisChannelLayer;
    let mut builder = RedisChannelLayer::builder(url);
    if let Some(prefix) = prefix {
        builder = builder.prefix(prefix);
    }
    Ok(ChatLayer::with_rooms(
        keep_rooms!(builder, rooms).build().await?,
    ))
}

#[cfg(not(feature = "redis"))]
async fn redis_layer(
    _url: &str,
    _prefix: Option<&str>,
    _rooms: Rooms,
) -> Result<ChatLayer, BoxError> {
    Err("--redis needs the `redis` feature: cargo run --features redis --example chat".into())
}

#[cfg(feature = "django")]
async fn django_layer(
    url: &str,
    pubsub: bool,
    prefix: Option<&str>,
) -> Result<ChatLayer, BoxError> {
    use tower_channels::channel_layer::django::{
        DjangoChannelLayer, DjangoConfig, DjangoPubSubChannelLayer,
    };
    let config = DjangoConfig::new([url]).prefix(prefix.unwrap_or("asgi"));
    Ok(if pubsub {
        ChatLayer::plain(DjangoPubSubChannelLayer::connect(&config).await?)
    } else {
        ChatLayer::plain(DjangoChannelLayer::connect(&config).await?)
    })
}

#[cfg(not(feature = "django"))]
async fn django_layer(
    _url: &str,
    _pubsub: bool,
    _prefix: Option<&str>,
) -> Result<ChatLayer, BoxError> {
    Err("--django needs the `django` feature: cargo run --features django --example chat".into())
}

#[cfg(feature = "redis-cluster")]
async fn redis_cluster_layer(
    urls: &str,
    prefix: Option<&str>,
    rooms: Rooms,
) -> Result<ChatLayer, BoxError> {
    use tower_channels::channel_layer::redis::RedisClusterChannelLayer;
    let mut builder = RedisClusterChannelLayer::builder(urls.split(',').map(str::trim));
    if let Some(prefix) = prefix {
        builder = builder.prefix(prefix);
    }
    Ok(ChatLayer::with_rooms(
        keep_rooms!(builder, rooms).build().await?,
    ))
}

#[cfg(not(feature = "redis-cluster"))]
async fn redis_cluster_layer(
    _urls: &str,
    _prefix: Option<&str>,
    _rooms: Rooms,
) -> Result<ChatLayer, BoxError> {
    Err("--redis-cluster needs the `redis-cluster` feature".into())
}

#[cfg(feature = "nats")]
async fn nats_layer(url: &str, prefix: Option<&str>, rooms: Rooms) -> Result<ChatLayer, BoxError> {
    use tower_channels::channel_layer::nats::NatsChannelLayer;
    let mut builder = NatsChannelLayer::builder(url);
    if let Some(prefix) = prefix {
        builder = builder.prefix(prefix);
    }
    Ok(ChatLayer::with_rooms(
        keep_rooms!(builder, rooms).build().await?,
    ))
}

#[cfg(not(feature = "nats"))]
async fn nats_layer(
    _url: &str,
    _prefix: Option<&str>,
    _rooms: Rooms,
) -> Result<ChatLayer, BoxError> {
    Err("--nats needs the `nats` feature: cargo run --features nats --example chat".into())
}
