//! The echo and chat consumers in front of a warp app, served with graceful
//! shutdown, the peer address and a header-read timeout.
//!
//! ```text
//! cargo run --features example-warp --example warp -- --addr 127.0.0.1:8000 [--header-read-timeout SECS]
//! ```
//!
//! * `GET /`: answered by warp;
//! * `GET /private`: warp's own auth filter (`Authorization: Bearer secret`);
//! * `/ws/echo`: echoes every text and binary message;
//! * `/ws/chat/{room}`: send `{"message": "..."}`, every member of the room
//!   (the sender included) receives `{"message": "..."}`; only with
//!   `?token=secret` (checked in `connect`).
//!
//! `warp::serve` takes filters, not tower services, so the layered service is
//! served with hyper-util, which is what warp runs on anyway, through the
//! accept loop the examples share (`examples/support/serve.rs`):
//!
//! * **peer address**: each request gets [`PeerAddr`] as an extension, so
//!   consumers see [`Scope::peer_addr`](tower_channels::Scope::peer_addr);
//! * **bounded connections**: hyper closes a connection whose request
//!   headers are not complete in time (`--header-read-timeout`, 10 s) once
//!   it has a timer; a connection with no request in flight (silent TCP, an
//!   HTTP/2 connection that opens no stream) is shut down after
//!   `--idle-timeout` (60 s); HTTP/2 peers are pinged (`--keep-alive`, 20 s);
//!   without these (as under `axum::serve`) such connections are held
//!   forever;
//! * **accept errors** (out of file descriptors) are retried with a backoff;
//! * **graceful shutdown** on Ctrl-C: stop accepting, close every WebSocket
//!   with 1001 and run its `disconnect` ([`ShutdownHandle`]), then let
//!   in-flight HTTP requests finish (hyper's `graceful_shutdown`), bounded.
//!
//! [`PeerAddr`]: tower_channels::PeerAddr
//! # Where warp's filters run
//!
//! The layer wraps `warp::service(filter)`, so it sees every request first:
//! a WebSocket handshake on one of its routes is answered by the layer and
//! never reaches a warp filter, including auth filters such as `/private`'s.
//! Authenticate sockets in the consumer's `connect` (from the scope's headers
//! or query, as `/ws/chat` does), or with a tower layer outside the
//! WebSocket layer; warp filters keep guarding everything else.
//!
//! [`ShutdownHandle`]: tower_channels::middleware::ShutdownHandle

use std::{convert::Infallible, net::SocketAddr, time::Duration};
use tracing_subscriber::prelude::*;

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
use warp::Filter;

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
    token: Option<String>,
}

impl JsonWebSocketConsumer for Chat {
    type Incoming = ChatIn;

    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        // warp's filters do not run for sockets: check credentials here.
        if self.token.as_deref() != Some("secret") {
            return Err(Reject::new(http::StatusCode::UNAUTHORIZED).body("token required"));
        }
        if validate_group_name(&self.group).is_err() {
            return Err(Reject::new(http::StatusCode::BAD_REQUEST).body("invalid room name"));
        }
        ctx.group_add(&self.group).await?;
        Ok(Accept::new())
    }

    async fn receive_json(&mut self, ctx: &mut Context, msg: ChatIn) -> Result<(), BoxError> {
        let text = serde_json::json!({ "message": msg.message }).to_string();
        // A broker failure is reported to the client; the socket stays open.
        if ctx
            .group_send(&self.group, Event::text("chat.message", text))
            .await
            .is_err()
        {
            ctx.send_text(r#"{"type":"error","error":"temporarily unavailable"}"#)?;
        }
        Ok(())
    }
}

/// warp's auth: a filter that passes with `Authorization: Bearer secret`
/// and otherwise rejects (warp answers 401 through `recover`).
fn bearer() -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and_then(|auth: Option<String>| async move {
            if auth.as_deref() == Some("Bearer secret") {
                Ok(())
            } else {
                Err(warp::reject::custom(Unauthorized))
            }
        })
        .untuple_one()
}

#[derive(Debug)]
struct Unauthorized;
impl warp::reject::Reject for Unauthorized {}

async fn recover(r: warp::Rejection) -> Result<impl warp::Reply, Infallible> {
    let status = if r.find::<Unauthorized>().is_some() {
        warp::http::StatusCode::UNAUTHORIZED
    } else {
        warp::http::StatusCode::NOT_FOUND
    };
    Ok(warp::reply::with_status(String::new(), status))
}

struct Args {
    addr: SocketAddr,
    limits: Limits,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: ([127, 0, 0, 1], 8000).into(),
        limits: Limits::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--addr" => {
                let v = it.next().ok_or("--addr needs a value")?;
                args.addr = v.parse().map_err(|e| format!("bad --addr {v:?}: {e}"))?;
            }
            other if args.limits.parse_flag(other, &mut it)? => {}
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: warp [--addr 127.0.0.1:8000] {}",
                    Limits::USAGE
                ))
            }
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
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    let args = parse_args().unwrap_or_else(|msg| {
        eprintln!("{msg}");
        std::process::exit(2)
    });

    let channels = WebSocketLayer::new()
        .route("/ws/echo", websocket_consumer(|_| Echo))
        .route(
            "/ws/chat/{room}",
            json_consumer(|scope| Chat {
                group: format!("chat_{}", scope.param("room").unwrap_or_default()),
                token: scope.query_param("token"),
            }),
        );
    let index = warp::path::end()
        .and(warp::get())
        .map(|| String::from("hello from warp\n"));
    let private = warp::path("private")
        .and(warp::path::end())
        .and(bearer())
        .map(|| String::from("secret stuff\n"));
    let filter = index.or(private).recover(recover);
    let websockets = channels.shutdown_handle();
    let service = channels.layer(warp::service(filter));

    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    println!("listening on {}", listener.local_addr()?);
    // On Ctrl-C: stop accepting, close every WebSocket with 1001 and run its
    // `disconnect`, then let in-flight HTTP requests finish (bounded).
    let shutdown = async move {
        let _ = tokio::signal::ctrl_c().await;
        let report = websockets.shutdown(Duration::from_secs(10)).await;
        tracing::info!(
            closed = report.closed,
            aborted = report.aborted,
            "websockets shut down"
        );
    };
    serve(listener, service, args.limits, shutdown).await;
    Ok(())
}
