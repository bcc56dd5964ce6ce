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
//! * `GET /`: the chat page;
//! * `/ws/chat/{room}`: send `{"message": "..."}`, every member of the room
//!   (the sender included) receives `{"message": "..."}`;
//! * `/ws/echo`: echoes every message;
//! * `POST /rooms/{room}/messages`: an ordinary HTTP handler that sends the
//!   request body to everyone in the room through the channel layer.
//!
//! `--django redis://127.0.0.1:6379` (channels_redis' core layer) or
//! `--django-pubsub URL` (its pubsub layer, with `--prefix`, default `asgi`; needs
//! `--features django`) shares the rooms with the Django Channels tutorial
//! app: its group is `chat_<room>` and its event the tutorial's
//! `{"type": "chat.message", "message": ...}`.
//!
//! `--max-message-size BYTES` raises the incoming message and frame limits
//! (1 MiB by default); the Autobahn run (`.ci/autobahn.sh`) uses 16 MiB.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::Html,
    routing::{get, post},
    Router,
};
use serde::{Deserialize, Serialize};
use tower_channels::{
    channel_layer::{validate_group_name, BoxError, ChannelLayer, Event},
    consumer::{
        consumer, json_consumer, Accept, Context, JsonWebsocketConsumer, Reject, WebsocketConsumer,
    },
    message::Message,
    origin::AllowedOrigins,
    WebSocketConfig, WebSocketLayer,
};

#[derive(Deserialize)]
struct ChatIn {
    message: String,
}

/// One per connection on `/ws/chat/{room}`.
struct Chat {
    group: String,
}

impl JsonWebsocketConsumer for Chat {
    type Incoming = ChatIn;

    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        if validate_group_name(&self.group).is_err() {
            return Err(Reject::new(StatusCode::BAD_REQUEST).body("invalid room name"));
        }
        ctx.group_add(&self.group).await?;
        Ok(Accept::new())
    }

    async fn receive_json(&mut self, ctx: &mut Context, msg: ChatIn) -> Result<(), BoxError> {
        if let Err(e) = ctx.group_send(&self.group, chat_event(&msg.message)).await {
            // A broker outage (Redis or NATS restarting) is temporary: tell
            // this client its message was not delivered and keep the socket.
            let error = serde_json::json!({ "error": format!("not delivered: {e}") });
            ctx.send(Message::text(error.to_string()))?;
        }
        Ok(())
    }

    async fn event(&mut self, ctx: &mut Context, event: Event) -> Result<(), BoxError> {
        match event.as_message() {
            Some(frame) => ctx.send(frame.clone())?,
            // A typed `chat.message` (Django's dict): render it, as the tutorial's
            // `chat_message` handler does.
            None if event.kind() == "chat.message" => {
                let chat: ChatMessage = event.body()?;
                ctx.send_json(&chat)?;
            }
            None => return Err(format!("no handler for event type {:?}", event.kind()).into()),
        }
        Ok(())
    }
}

/// Django's `{"type": "chat.message", "message": ...}` without its type.
#[derive(Clone, Serialize, Deserialize)]
struct ChatMessage {
    message: String,
}

/// Whether events must have a Django dict form (`--django*`).
static DJANGO_EVENTS: AtomicBool = AtomicBool::new(false);

/// The `chat.message` event: the outgoing frame, encoded once for every
/// member; with `--django*` the tutorial's dict, which each member renders.
fn chat_event(message: &str) -> Event {
    if DJANGO_EVENTS.load(Ordering::Relaxed) {
        let message = message.to_owned();
        return Event::new("chat.message", ChatMessage { message });
    }
    let text = serde_json::json!({ "message": message }).to_string();
    Event::text("chat.message", text)
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
        .group_send(&format!("chat_{room}"), chat_event(&body))
        .await
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(format!(
        "delivered to {} connections here and {} other processes\n",
        report.local_members,
        report.remote_receivers.unwrap_or(0)
    ))
}

struct Args {
    addr: SocketAddr,
    redis: Option<String>,
    django: Option<(String, bool)>,
    prefix: Option<String>,
    redis_cluster: Option<String>,
    nats: Option<String>,
    max_message_size: Option<usize>,
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
            "-h" | "--help" => {
                return Err(
                    "usage: chat [--addr 127.0.0.1:8000] [--redis redis://127.0.0.1:6379] \
                     [--django URL | --django-pubsub URL [--prefix asgi]] \
                     [--redis-cluster URL,URL,...] [--nats nats://127.0.0.1:4222] \
                     [--max-message-size BYTES]"
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
                group: format!("chat_{}", scope.param("room").unwrap_or_default()),
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
    if let Some(url) = &args.redis {
        channels = channels.with_channel_layer(redis_layer(url).await?);
    }
    if let Some((url, pubsub)) = &args.django {
        DJANGO_EVENTS.store(true, Ordering::Relaxed);
        channels =
            channels.with_channel_layer(django_layer(url, *pubsub, args.prefix.as_deref()).await?);
    }
    if let Some(urls) = &args.redis_cluster {
        channels = channels.with_channel_layer(redis_cluster_layer(urls).await?);
    }
    if let Some(url) = &args.nats {
        channels = channels.with_channel_layer(nats_layer(url).await?);
    }
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
async fn redis_layer(url: &str) -> Result<Arc<dyn ChannelLayer>, BoxError> {
    Ok(Arc::new(
        tower_channels::channel_layer::redis::RedisChannelLayer::connect(url).await?,
    ))
}

#[cfg(not(feature = "redis"))]
async fn redis_layer(_url: &str) -> Result<Arc<dyn ChannelLayer>, BoxError> {
    Err("--redis needs the `redis` feature: cargo run --features redis --example chat".into())
}

#[cfg(feature = "django")]
async fn django_layer(
    url: &str,
    pubsub: bool,
    prefix: Option<&str>,
) -> Result<Arc<dyn ChannelLayer>, BoxError> {
    use tower_channels::channel_layer::django::{
        DjangoChannelLayer, DjangoConfig, DjangoPubSubChannelLayer,
    };
    let config = DjangoConfig::new([url]).prefix(prefix.unwrap_or("asgi"));
    Ok(if pubsub {
        Arc::new(DjangoPubSubChannelLayer::connect(&config).await?)
    } else {
        Arc::new(DjangoChannelLayer::connect(&config).await?)
    })
}

#[cfg(not(feature = "django"))]
async fn django_layer(
    _url: &str,
    _pubsub: bool,
    _prefix: Option<&str>,
) -> Result<Arc<dyn ChannelLayer>, BoxError> {
    Err("--django needs the `django` feature: cargo run --features django --example chat".into())
}

#[cfg(feature = "redis-cluster")]
async fn redis_cluster_layer(urls: &str) -> Result<Arc<dyn ChannelLayer>, BoxError> {
    use tower_channels::channel_layer::redis::RedisClusterChannelLayer;
    Ok(Arc::new(
        RedisClusterChannelLayer::connect(urls.split(',').map(str::trim)).await?,
    ))
}

#[cfg(not(feature = "redis-cluster"))]
async fn redis_cluster_layer(_urls: &str) -> Result<Arc<dyn ChannelLayer>, BoxError> {
    Err("--redis-cluster needs the `redis-cluster` feature".into())
}

#[cfg(feature = "nats")]
async fn nats_layer(url: &str) -> Result<Arc<dyn ChannelLayer>, BoxError> {
    use tower_channels::channel_layer::nats::NatsChannelLayer;
    Ok(Arc::new(NatsChannelLayer::connect(url).await?))
}

#[cfg(not(feature = "nats"))]
async fn nats_layer(_url: &str) -> Result<Arc<dyn ChannelLayer>, BoxError> {
    Err("--nats needs the `nats` feature: cargo run --features nats --example chat".into())
}
