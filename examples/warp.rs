//! The echo and chat consumers in front of a warp app.
//!
//! ```text
//! cargo run --example warp -- --addr 127.0.0.1:8000
//! ```
//!
//! * `GET /`: answered by warp;
//! * `/ws/echo`: echoes every text and binary message;
//! * `/ws/chat/{room}`: send `{"message": "..."}`, every member of the room
//!   (the sender included) receives `{"message": "..."}`.
//!
//! `warp::serve` takes filters, not tower services, so the layered service is
//! served with hyper-util, which is what warp runs on anyway.

use std::net::SocketAddr;

use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::Builder,
    service::TowerToHyperService,
};
use serde::Deserialize;
use tower_channels::{
    channel_layer::{validate_group_name, BoxError, Event},
    consumer::{
        consumer, json_consumer, Accept, Context, JsonWebsocketConsumer, Reject, WebsocketConsumer,
    },
    message::Message,
    WebSocketLayer,
};
use tower_layer::Layer;
use warp::Filter;

/// `/ws/echo`: sends every message back.
struct Echo;

impl WebsocketConsumer for Echo {
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

impl JsonWebsocketConsumer for Chat {
    type Incoming = ChatIn;

    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        if validate_group_name(&self.group).is_err() {
            return Err(Reject::new(http::StatusCode::BAD_REQUEST).body("invalid room name"));
        }
        ctx.group_add(&self.group).await?;
        Ok(Accept::new())
    }

    async fn receive_json(&mut self, ctx: &mut Context, msg: ChatIn) -> Result<(), BoxError> {
        let text = serde_json::json!({ "message": msg.message }).to_string();
        ctx.group_send(&self.group, Event::text("chat.message", text))
            .await?;
        Ok(())
    }
}

fn parse_addr() -> Result<SocketAddr, String> {
    let mut addr: SocketAddr = ([127, 0, 0, 1], 8000).into();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--addr" => {
                let v = it.next().ok_or("--addr needs a value")?;
                addr = v.parse().map_err(|e| format!("bad --addr {v:?}: {e}"))?;
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: warp [--addr 127.0.0.1:8000]"
                ))
            }
        }
    }
    Ok(addr)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let addr = parse_addr().unwrap_or_else(|msg| {
        eprintln!("{msg}");
        std::process::exit(2)
    });

    let channels = WebSocketLayer::new()
        .route("/ws/echo", consumer(|_| Echo))
        .route(
            "/ws/chat/{room}",
            json_consumer(|scope| Chat {
                group: format!("chat_{}", scope.param("room").unwrap_or_default()),
            }),
        );
    let index = warp::path::end()
        .and(warp::get())
        .map(|| String::from("hello from warp\n"));
    let service = channels.layer(warp::service(index));

    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _peer) = listener.accept().await?;
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let mut builder = Builder::new(TokioExecutor::new());
            builder.http2().enable_connect_protocol();
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "connection error");
            }
        });
    }
}
