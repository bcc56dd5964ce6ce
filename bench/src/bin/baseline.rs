//! Baseline chat/echo server written the way a user would without
//! `tower-channels`: axum's `WebSocketUpgrade` plus one
//! `tokio::sync::broadcast` channel per room, created on demand.
//!
//! Same routes, protocol and CLI as the crate's `chat` example:
//!
//! * `/ws/chat/{room}`: the client sends `{"message": "<text>"}`, every
//!   member of the room (sender included) receives `{"message": "<text>"}`.
//! * `/ws/echo`: echoes every text/binary message unchanged.
//!
//! `baseline --addr 127.0.0.1:0` prints `listening on <addr>` when ready.
//! All axum settings are left at their defaults on purpose.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tower_channels_bench::{Args, Result};

/// Messages buffered per room before a slow member starts lagging.
const ROOM_CAPACITY: usize = 1024;

#[derive(Clone, Default)]
struct AppState {
    rooms: Arc<Mutex<HashMap<String, broadcast::Sender<Utf8Bytes>>>>,
}

impl AppState {
    /// Joins `room`, creating its channel on first use.
    fn join(&self, room: &str) -> (broadcast::Sender<Utf8Bytes>, broadcast::Receiver<Utf8Bytes>) {
        let mut rooms = self.rooms.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = rooms
            .entry(room.to_owned())
            .or_insert_with(|| broadcast::channel(ROOM_CAPACITY).0)
            .clone();
        let rx = tx.subscribe();
        (tx, rx)
    }

    /// Drops the room's channel once its last member has left.
    fn leave(&self, room: &str) {
        let mut rooms = self.rooms.lock().unwrap_or_else(PoisonError::into_inner);
        if rooms.get(room).is_some_and(|tx| tx.receiver_count() == 0) {
            rooms.remove(room);
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ChatMessage {
    message: String,
}

async fn chat_handler(
    ws: WebSocketUpgrade,
    Path(room): Path<String>,
    State(state): State<AppState>,
) -> Response {
    ws.on_upgrade(move |socket| chat_socket(socket, room, state))
}

async fn chat_socket(socket: WebSocket, room: String, state: AppState) {
    let (tx, mut rx) = state.join(&room);
    let (mut sender, mut receiver) = socket.split();

    // Room -> socket.
    let mut send_task = tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(text) => {
                    if sender.send(Message::Text(text)).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("member lagged behind, {n} messages skipped");
                }
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    });

    // Socket -> room.
    let mut recv_task = tokio::spawn(async move {
        while let Some(Ok(msg)) = receiver.next().await {
            match msg {
                Message::Text(text) => {
                    let Ok(incoming) = serde_json::from_str::<ChatMessage>(&text) else {
                        continue;
                    };
                    if let Ok(out) = serde_json::to_string(&incoming) {
                        // Err only means nobody is listening.
                        let _ = tx.send(out.into());
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
    });

    // When either half ends, stop the other one, and make sure it (and so our
    // receiver) is gone before cleaning up the room.
    tokio::select! {
        _ = &mut send_task => {
            recv_task.abort();
            let _ = recv_task.await;
        }
        _ = &mut recv_task => {
            send_task.abort();
            let _ = send_task.await;
        }
    }
    state.leave(&room);
}

async fn echo_handler(ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(echo_socket)
}

async fn echo_socket(mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        let reply = match msg {
            Message::Text(_) | Message::Binary(_) => msg,
            Message::Close(_) => break,
            _ => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse(std::env::args().skip(1), &[])?;
    let addr: String = args.get("addr", "127.0.0.1:8000".to_owned())?;
    args.finish()?;

    let app = Router::new()
        .route("/ws/chat/{room}", get(chat_handler))
        .route("/ws/echo", get(echo_handler))
        .with_state(AppState::default());

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    axum::serve(listener, app).await?;
    Ok(())
}
