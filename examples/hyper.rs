//! The echo and chat consumers in front of a plain hyper service.
//!
//! ```text
//! cargo run --example hyper -- --addr 127.0.0.1:8000
//! ```
//!
//! * `GET /`: answered by the inner `service_fn`;
//! * `/ws/echo`: echoes every text and binary message;
//! * `/ws/chat/{room}`: send `{"message": "..."}`, every member of the room
//!   (the sender included) receives `{"message": "..."}`.
//!
//! The accept loop (`examples/support/serve.rs`, shared with the warp and
//! chat examples) inserts [`PeerAddr`](tower_channels::PeerAddr) into every
//! request so consumers see the client's address in their scope, and bounds
//! every connection: half-sent requests (`--header-read-timeout`, 10 s),
//! silent or idle connections, HTTP/2 ones included (`--idle-timeout`,
//! 60 s), dead HTTP/2 peers (`--keep-alive`, 20 s); accept errors such as
//! running out of file descriptors are retried with a backoff.

use std::{convert::Infallible, net::SocketAddr};
use tracing_subscriber::prelude::*;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Deserialize;
use tower_channels::{
    channel_layer::{validate_group_name, BoxError, Event},
    consumer::{
        json_consumer, websocket_consumer, Accept, Context, JsonWebSocketConsumer, Reject,
        WebSocketConsumer,
    },
    message::Message,
    WebSocketLayer,
};
use tower_layer::Layer;

#[path = "support/serve.rs"]
mod serve;
use serve::{serve, Limits};

/// `/ws/echo`: sends every message back.
struct Echo;

impl WebSocketConsumer for Echo {
    async fn receive(&mut self, ctx: &mut Context, msg: Message) -> Result<(), BoxError> {
        ctx.send(msg)?;
        Ok(())
    }
}

#[derive(Deserialize)]
struct ChatIn {
    message: String,
}

/// `/ws/chat/{room}`: one per connection, member of the room's group.
struct Chat {
    group: String,
}

impl JsonWebSocketConsumer for Chat {
    type Incoming = ChatIn;

    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        if validate_group_name(&self.group).is_err() {
            return Err(Reject::new(StatusCode::BAD_REQUEST).body("invalid room name"));
        }
        ctx.group_add(&self.group).await?;
        Ok(Accept::new())
    }

    async fn receive_json(&mut self, ctx: &mut Context, msg: ChatIn) -> Result<(), BoxError> {
        let text = serde_json::json!({ "message": msg.message }).to_string();
        // A broker failure is reported to the client; the socket stays open.
        if let Err(e) = ctx
            .group_send(&self.group, Event::text("chat.message", text))
            .await
        {
            tracing::warn!(error = &e as &dyn std::error::Error, "group send failed");
            ctx.send_text(r#"{"type":"error","error":"temporarily unavailable"}"#)?;
        }
        Ok(())
    }
}

/// Everything that is not a WebSocket handshake on a consumer route.
async fn inner(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/") => (StatusCode::OK, "hello from hyper\n"),
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    Ok(res)
}

/// `--addr ADDR` and the host's [`Limits`] flags.
fn parse_args() -> Result<(SocketAddr, Limits), String> {
    let mut addr: SocketAddr = ([127, 0, 0, 1], 8000).into();
    let mut limits = Limits::default();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--addr" => {
                let v = it.next().ok_or("--addr needs a value")?;
                addr = v.parse().map_err(|e| format!("bad --addr {v:?}: {e}"))?;
            }
            other if limits.parse_flag(other, &mut it)? => {}
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: hyper [--addr 127.0.0.1:8000] {}",
                    Limits::USAGE
                ))
            }
        }
    }
    Ok((addr, limits))
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
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    let (addr, limits) = parse_args().unwrap_or_else(|msg| {
        eprintln!("{msg}");
        std::process::exit(2)
    });

    let channels = WebSocketLayer::new()
        .route("/ws/echo", websocket_consumer(|_| Echo))
        .route(
            "/ws/chat/{room}",
            json_consumer(|scope| Chat {
                group: format!("chat_{}", scope.param("room").unwrap_or_default()),
            }),
        );
    let service = channels.layer(tower::service_fn(inner));

    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    serve(listener, service, limits, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
    Ok(())
}
