//! A consumer that hands slow work to a background worker, which replies to
//! the consumer's own channel when done (Django's `runworker` pattern).
//!
//! ```text
//! cargo run --example worker -- --addr 127.0.0.1:8002
//! ```
//!
//! Connect to `ws://127.0.0.1:8002/ws/thumbnails` and send a file name, e.g.
//! `cat.jpg`; the reply `{"thumbnail":"cat.jpg.thumb.png","bytes":...}` comes
//! from the worker. With `--redis URL` (and `--features redis`) the worker
//! and the web process can be separate processes.

use std::{net::SocketAddr, sync::Arc};
use tracing_subscriber::prelude::*;

use axum::Router;
use serde::{Deserialize, Serialize};
use tower_channels::{
    channel_layer::{BoxError, ChannelLayer, Event, InMemoryChannelLayer},
    consumer::{websocket_consumer, Context, WebSocketConsumer},
    message::Message,
    worker::{Worker, WorkerContext},
    WebSocketLayer,
};

/// The job a consumer hands to the worker.
#[derive(Clone, Serialize, Deserialize)]
struct MakeThumbnail {
    file: String,
    reply_to: String,
}

/// `/ws/thumbnails`: every text message is a file to make a thumbnail of.
struct Thumbnails;

impl WebSocketConsumer for Thumbnails {
    async fn receive(&mut self, ctx: &mut Context, msg: Message) -> Result<(), BoxError> {
        let Message::Text(file) = msg else {
            return Ok(());
        };
        let job = MakeThumbnail {
            file: file.to_string(),
            reply_to: ctx.channel_name().to_owned(),
        };
        // Returns at once: the worker replies later through our channel, and
        // the default `event` handler forwards its message to the client.
        // A full queue or a Redis outage is the client's to retry, not a
        // reason to drop its socket.
        if let Err(e) = ctx
            .send_to("thumbnails", Event::new("thumbnail.make", job))
            .await
        {
            tracing::warn!(error = %e, "could not queue the job");
            ctx.send_text(r#"{"type":"error","error":"temporarily unavailable"}"#)?;
        }
        Ok(())
    }
}

/// The worker's handler: the "slow" work, then a reply to the consumer.
async fn make_thumbnail(ctx: WorkerContext, event: Event) -> Result<(), BoxError> {
    let job: MakeThumbnail = event.body()?;
    let bytes = tokio::task::spawn_blocking({
        let file = job.file.clone();
        // Stand-in for image processing: some CPU work on the blocking pool.
        move || {
            file.bytes()
                .fold(0u64, |acc, b| acc.wrapping_mul(31).wrapping_add(b.into()))
                % 50_000
        }
    })
    .await?;
    let reply =
        serde_json::json!({ "thumbnail": format!("{}.thumb.png", job.file), "bytes": bytes });
    ctx.send(
        &job.reply_to,
        Event::text("thumbnail.done", reply.to_string()),
    )
    .await?;
    Ok(())
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
    let mut addr: SocketAddr = ([127, 0, 0, 1], 8002).into();
    let mut redis: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--addr", Some(v)) => addr = v.parse()?,
            ("--redis", Some(v)) => redis = Some(v),
            _ => return Err("usage: worker [--addr 127.0.0.1:8002] [--redis URL]".into()),
        }
    }
    let layer: Arc<dyn ChannelLayer> = match redis {
        Some(url) => redis_layer(&url).await?,
        None => Arc::new(InMemoryChannelLayer::new()),
    };

    let worker = Worker::new(layer.clone())
        .channel("thumbnails")
        .concurrency(4)
        .on("thumbnail.make", make_thumbnail)
        .start()
        .await?;

    let channels = WebSocketLayer::new()
        .with_channel_layer(layer)
        .route("/ws/thumbnails", websocket_consumer(|_| Thumbnails));
    let app = Router::new().layer(channels);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    // Let the jobs in flight finish.
    let stats = worker.shutdown().await;
    tracing::info!(
        handled = stats.handled,
        failed = stats.failed,
        "worker drained"
    );
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
    Err("--redis needs the `redis` feature: cargo run --features redis --example worker".into())
}
