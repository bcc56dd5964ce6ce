//! Second echo baseline: `fastwebsockets` on plain hyper 1, written the way
//! its own echo example is (one task per connection, `FragmentCollector`,
//! automatic pong and close), so the crate's echo path can be compared
//! with the fastest Rust WebSocket engine as well as with axum's.
//!
//! Serves only `/ws/echo` (any path is accepted); `fastws --addr
//! 127.0.0.1:0` prints `listening on <addr>` when ready.

use std::io::Write;

use bytes::Bytes;
use fastwebsockets::{upgrade, FragmentCollector, OpCode, WebSocketError};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tower_channels_bench::{Args, Result};

/// Echoes every text and binary message until the client closes.
async fn echo(fut: upgrade::UpgradeFut) -> std::result::Result<(), WebSocketError> {
    let mut ws = FragmentCollector::new(fut.await?);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => break,
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            _ => {}
        }
    }
    Ok(())
}

async fn upgrade_request(
    mut req: Request<Incoming>,
) -> std::result::Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, fut) = upgrade::upgrade(&mut req)?;
    tokio::spawn(async move {
        if let Err(e) = echo(fut).await {
            // Clients of the bench close abruptly at the end of a run.
            if !matches!(
                e,
                WebSocketError::UnexpectedEOF | WebSocketError::ConnectionClosed
            ) {
                eprintln!("connection error: {e}");
            }
        }
    });
    Ok(response)
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse(std::env::args().skip(1), &[])?;
    let addr: String = args.get("addr", "127.0.0.1:8000".to_owned())?;
    args.finish()?;

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let conn = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(upgrade_request))
                .with_upgrades();
            if let Err(e) = conn.await {
                eprintln!("http error: {e}");
            }
        });
    }
}
