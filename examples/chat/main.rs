//! The chat app of the Django Channels tutorial, on axum, with the in-memory
//! channel layer (or Redis with `--redis`).
//!
//! ```text
//! cargo run --example chat -- --addr 127.0.0.1:8000
//! ```
//!
//! Then open <http://127.0.0.1:8000/>, pick a room in two tabs and talk.
//!
//! * `GET /`: the chat page;
//! * `/ws/chat/{room}`: send `{"message": "..."}`, every member of the room
//!   (the sender included) receives `{"message": "...", "offset": N,
//!   "epoch": "E"}` (plus `"user"` when the sender named itself). Rooms keep
//!   a history of their last 100 messages, and have presence:
//!   * `?user=NAME` names the member for presence; members get
//!     `{"type": "join", "user": U}` when a user's first connection joins
//!     and `{"type": "leave", "user": U}` when its last one leaves;
//!   * sending `{"type": "presence"}` answers
//!     `{"type": "presence", "members": [names]}`;
//!   * connecting with `?offset=N&epoch=E` (the last message seen) first
//!     delivers the messages missed since, then live ones, with no gap and
//!     no duplicate; when that is impossible (history reset or trimmed) the
//!     first message is `{"type": "recovery_failed"}`;
//! * `/ws/echo`: echoes every message;
//! * `POST /rooms/{room}/messages`: an ordinary HTTP handler that sends the
//!   request body to everyone in the room through the channel layer.
//!
//! `--max-message-size BYTES` raises the incoming message and frame limits
//! (1 MiB by default); the Autobahn run (`.ci/autobahn.sh`) uses 16 MiB.
//! `--presence-ttl SECS` sets how long the members of a crashed process stay
//! listed with `--redis` (30 s by default).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::Html,
    routing::{get, post},
    Router,
};
use serde::{Deserialize, Serialize};
use tower_channels::{
    channel_layer::{
        validate_group_name, BoxError, ChannelLayer, Event, GroupPattern, HistoryPolicy,
        InMemoryChannelLayer, PresenceChange, PresenceConfig, PresenceInfo, StreamCursor,
        StreamPosition, PRESENCE_JOIN, PRESENCE_LEAVE,
    },
    consumer::{
        consumer, forward_event, json_consumer, Accept, Context, JsonWebsocketConsumer, Reject,
        WebsocketConsumer,
    },
    message::Message,
    origin::AllowedOrigins,
    WebSocketConfig, WebSocketLayer,
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

/// One per connection on `/ws/chat/{room}`.
struct Chat {
    group: String,
    user: Option<String>,
    /// Drops live messages that recovery already delivered.
    cursor: StreamCursor,
}

/// The group of a room: history and presence notifications apply to `chat_*`.
const ROOMS: &str = "chat_";

fn bad_request(body: &'static str) -> Reject {
    Reject::new(StatusCode::BAD_REQUEST).body(body)
}

impl Chat {
    /// Sends a `chat.message` event to the client with its history position.
    fn deliver(&mut self, ctx: &Context, event: &Event) -> Result<(), BoxError> {
        if !self.cursor.accept(event) {
            return Ok(()); // Already delivered by recovery.
        }
        let body: ChatBody = event.body()?;
        let mut out = serde_json::json!({ "message": body.message });
        if let Some(pos) = event.position() {
            out["offset"] = pos.offset().into();
            out["epoch"] = pos.epoch().into();
        }
        if let Some(user) = body.user {
            out["user"] = user.into();
        }
        ctx.send_json(&out)?;
        Ok(())
    }
}

impl JsonWebsocketConsumer for Chat {
    type Incoming = ChatIn;

    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        if validate_group_name(&self.group).is_err() {
            return Err(bad_request("invalid room name"));
        }
        let scope = ctx.scope().clone();
        let since = match (scope.query_param("offset"), scope.query_param("epoch")) {
            (None, None) => None,
            (Some(offset), Some(epoch)) if !epoch.is_empty() => {
                let offset = offset.parse().map_err(|_| bad_request("invalid offset"))?;
                Some(StreamPosition::new(offset, epoch))
            }
            _ => return Err(bad_request("offset and epoch go together")),
        };
        // Join first, then recover: messages sent in between arrive twice
        // and the cursor drops the live copy.
        match &self.user {
            Some(user) => {
                let info = PresenceInfo::new(user.as_str())
                    .map_err(|_| bad_request("invalid user name"))?;
                ctx.presence_join(&self.group, info).await?;
            }
            None => ctx.group_add(&self.group).await?,
        }
        if let Some(since) = since {
            let recovery = ctx.recover(&self.group, &since).await?;
            self.cursor = recovery.cursor();
            if !recovery.is_recovered() {
                let _ = ctx.send_json(&serde_json::json!({ "type": "recovery_failed" }));
            }
            for event in recovery.events() {
                self.deliver(ctx, event)
                    .map_err(|_| Reject::new(StatusCode::INTERNAL_SERVER_ERROR))?;
            }
        }
        Ok(Accept::new())
    }

    async fn receive_json(&mut self, ctx: &mut Context, msg: ChatIn) -> Result<(), BoxError> {
        match (msg.kind.as_deref(), msg.message) {
            (Some("presence"), _) => {
                let members = ctx.presence(&self.group).await?;
                let names: Vec<&str> = members.iter().map(|m| m.user_id()).collect();
                ctx.send_json(&serde_json::json!({ "type": "presence", "members": names }))?;
            }
            (None, Some(message)) => {
                ctx.group_send(&self.group, chat_event(message, self.user.clone()))
                    .await?;
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

/// The `chat.message` event; each member's consumer adds the history position.
fn chat_event(message: String, user: Option<String>) -> Event {
    Event::new("chat.message", ChatBody { message, user })
}

/// `/ws/echo`: sends every message back.
struct Echo;

impl WebsocketConsumer for Echo {
    async fn receive(&mut self, ctx: &mut Context, msg: Message) -> Result<(), BoxError> {
        ctx.send(msg)?;
        Ok(())
    }
}

async fn post_message(
    State(layer): State<Arc<dyn ChannelLayer>>,
    Path(room): Path<String>,
    body: String,
) -> Result<String, (StatusCode, String)> {
    let report = layer
        .group_send(&format!("{ROOMS}{room}"), chat_event(body, None))
        .await
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let offset = report.position.map_or(0, |p| p.offset());
    Ok(format!(
        "delivered to {} connections here and {} other processes (offset {offset})\n",
        report.local_members,
        report.remote_receivers.unwrap_or(0)
    ))
}

struct Args {
    addr: SocketAddr,
    redis: Option<String>,
    max_message_size: Option<usize>,
    presence_ttl: Option<Duration>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: ([127, 0, 0, 1], 8000).into(),
        redis: None,
        max_message_size: None,
        presence_ttl: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--addr" => {
                let v = it.next().ok_or("--addr needs a value")?;
                args.addr = v.parse().map_err(|e| format!("bad --addr {v:?}: {e}"))?;
            }
            "--redis" => args.redis = Some(it.next().ok_or("--redis needs a URL")?),
            "--max-message-size" => {
                let v = it.next().ok_or("--max-message-size needs a value")?;
                let n = v
                    .parse()
                    .map_err(|e| format!("bad --max-message-size {v:?}: {e}"))?;
                args.max_message_size = Some(n);
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
            "-h" | "--help" => {
                return Err(
                    "usage: chat [--addr 127.0.0.1:8000] [--redis redis://127.0.0.1:6379] \
                     [--max-message-size BYTES] [--presence-ttl SECS]"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    let mut channels = WebSocketLayer::new()
        .route(
            "/ws/chat/{room}",
            json_consumer(|scope| Chat {
                group: format!("{ROOMS}{}", scope.param("room").unwrap_or_default()),
                user: scope.query_param("user").filter(|u| !u.is_empty()),
                cursor: StreamCursor::new(),
            }),
        )
        .route("/ws/echo", consumer(|_| Echo))
        // Only pages served by this host may open sockets (defence against
        // cross-site WebSocket hijacking); clients without Origin are allowed.
        .allowed_origins(AllowedOrigins::same_host());
    if let Some(n) = args.max_message_size {
        channels = channels.with_config(
            WebSocketConfig::default()
                .max_message_size(n)
                .max_frame_size(n),
        );
    }
    // Rooms keep their last 100 messages for 5 minutes, and announce who
    // comes and goes.
    let history = HistoryPolicy::new(GroupPattern::prefix(ROOMS));
    let mut presence = PresenceConfig::new().notify(GroupPattern::prefix(ROOMS));
    if let Some(ttl) = args.presence_ttl {
        presence = presence.ttl(ttl);
    }
    channels = channels.with_channel_layer(match &args.redis {
        Some(url) => redis_layer(url, history, presence).await?,
        None => Arc::new(
            InMemoryChannelLayer::new()
                .with_history(history)
                .with_presence(presence),
        ),
    });
    // axum's graceful shutdown does not reach upgraded sockets: on Ctrl-C,
    // close them with 1001 and run every disconnect, then let axum finish.
    let websockets = channels.shutdown_handle();
    let app = Router::new()
        .route("/", get(|| async { Html(include_str!("index.html")) }))
        .route("/rooms/{room}/messages", post(post_message))
        .with_state(channels.channel_layer())
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
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await?;
    Ok(())
}

#[cfg(feature = "redis")]
async fn redis_layer(
    url: &str,
    history: HistoryPolicy,
    presence: PresenceConfig,
) -> Result<Arc<dyn ChannelLayer>, BoxError> {
    Ok(Arc::new(
        tower_channels::channel_layer::redis::RedisChannelLayer::builder(url)
            .history(history)
            .presence(presence)
            .build()
            .await?,
    ))
}

#[cfg(not(feature = "redis"))]
async fn redis_layer(
    _url: &str,
    _history: HistoryPolicy,
    _presence: PresenceConfig,
) -> Result<Arc<dyn ChannelLayer>, BoxError> {
    Err("--redis needs the `redis` feature: cargo run --features redis --example chat".into())
}
