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
//! served with hyper-util, which is what warp runs on anyway. This accept
//! loop is the whole recipe (about 40 lines, no helper crate needed):
//!
//! * **peer address**: each request gets [`PeerAddr`] as an extension, so
//!   consumers see [`Scope::peer_addr`](tower_channels::Scope::peer_addr);
//! * **header-read timeout**: hyper closes a connection whose request
//!   headers are not complete in time (10 s here) once it has a timer; without
//!   one (as under `axum::serve`) a half-sent request is held forever;
//! * **graceful shutdown** on Ctrl-C: stop accepting, close every WebSocket
//!   with 1001 and run its `disconnect` ([`ShutdownHandle`]), then let
//!   in-flight HTTP requests finish (hyper's `graceful_shutdown`), bounded.
//!
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

use http::Request;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto::Builder,
};
use serde::Deserialize;
use tokio::sync::watch;
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
    header_read_timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: ([127, 0, 0, 1], 8000).into(),
        header_read_timeout: Duration::from_secs(10),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--addr" => {
                let v = it.next().ok_or("--addr needs a value")?;
                args.addr = v.parse().map_err(|e| format!("bad --addr {v:?}: {e}"))?;
            }
            "--header-read-timeout" => {
                let v = it.next().ok_or("--header-read-timeout needs seconds")?;
                let secs: f64 = v
                    .parse()
                    .map_err(|e| format!("bad --header-read-timeout {v:?}: {e}"))?;
                args.header_read_timeout = Duration::try_from_secs_f64(secs)
                    .map_err(|e| format!("bad --header-read-timeout {v:?}: {e}"))?;
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: warp [--addr 127.0.0.1:8000] \
                     [--header-read-timeout SECS]"
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
    // Every connection task holds a receiver; `closed()` tells when all ended.
    let (stop, stopping) = watch::channel(false);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // E.g. too many open files: keep serving the others.
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = &mut ctrl_c => break,
        };
        let service = service.clone();
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            // hyper's `Service` takes `&self`; each request gets a clone of
            // the tower service, with the client's address as an extension.
            let hyper_service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(PeerAddr(peer));
                service.clone().oneshot(req)
            });
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(args.header_read_timeout);
            builder.http2().enable_connect_protocol();
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), hyper_service);
            tokio::pin!(conn);
            let finished = tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = stopping.wait_for(|s| *s) => None,
            };
            let result = match finished {
                Some(r) => r,
                None => {
                    // Finish the request in flight, then close.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection error");
            }
        });
    }
    drop(listener);
    let report = websockets.shutdown(Duration::from_secs(10)).await;
    tracing::info!(
        closed = report.closed,
        aborted = report.aborted,
        "websockets shut down"
    );
    let _ = stop.send(true);
    drop(stopping);
    if tokio::time::timeout(Duration::from_secs(10), stop.closed())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open after 10 s; exiting");
    }
    Ok(())
}
