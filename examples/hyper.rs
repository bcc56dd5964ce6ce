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
//! The accept loop inserts [`PeerAddr`] into every request so consumers see
//! the client's address in their scope, and gives hyper a timer so that
//! connections whose request headers do not arrive within 10 s are closed
//! (`header_read_timeout`; without a timer hyper has none, and a client
//! that sends half a request holds its connection forever).

use std::{convert::Infallible, net::SocketAddr, time::Duration};
use tracing_subscriber::prelude::*;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto::Builder,
};
use serde::Deserialize;
use tower::ServiceExt;
use tower_channels::{
    channel_layer::{validate_group_name, BoxError, Event},
    consumer::{
        json_consumer, websocket_consumer, Accept, Context, JsonWebSocketConsumer, Reject,
        WebSocketConsumer,
    },
    message::Message,
    PeerAddr, WebSocketLayer,
};
use tower_layer::Layer;

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

/// `--addr ADDR` and `--header-read-timeout SECS` (default 10).
fn parse_args() -> Result<(SocketAddr, Duration), String> {
    let mut addr: SocketAddr = ([127, 0, 0, 1], 8000).into();
    let mut header_read_timeout = Duration::from_secs(10);
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--addr" => {
                let v = it.next().ok_or("--addr needs a value")?;
                addr = v.parse().map_err(|e| format!("bad --addr {v:?}: {e}"))?;
            }
            "--header-read-timeout" => {
                let v = it.next().ok_or("--header-read-timeout needs seconds")?;
                header_read_timeout = v
                    .parse::<f64>()
                    .ok()
                    .and_then(|s| Duration::try_from_secs_f64(s).ok())
                    .ok_or_else(|| format!("bad --header-read-timeout {v:?}"))?;
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: hyper [--addr 127.0.0.1:8000] \
                     [--header-read-timeout SECS]"
                ))
            }
        }
    }
    Ok((addr, header_read_timeout))
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
    let (addr, header_read_timeout) = parse_args().unwrap_or_else(|msg| {
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
    loop {
        let (stream, peer) = listener.accept().await?;
        let service = service.clone();
        tokio::spawn(async move {
            // hyper's `Service` takes `&self`; each request gets a clone of the
            // tower service, with the client's address as an extension.
            let hyper_service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(PeerAddr(peer));
                service.clone().oneshot(req)
            });
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            builder.http2().enable_connect_protocol();
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), hyper_service)
                .await
            {
                tracing::debug!(error = %e, "connection error");
            }
        });
    }
}
