//! Two chat example processes share rooms through Redis: a client on each,
//! same room, each sees the other's messages.
#![cfg(feature = "redis")]

mod common;

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// The Redis URL to use, or `None` (after printing why) when the test must skip.
async fn redis_url() -> Option<String> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let hostport = url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .unwrap_or("127.0.0.1:6379")
        .to_owned();
    match tokio::net::TcpStream::connect(&hostport).await {
        Ok(_) => Some(url),
        Err(e) if std::env::var("TOWER_CHANNELS_REQUIRE_REDIS").as_deref() == Ok("1") => {
            panic!("no Redis at {url}: {e} (TOWER_CHANNELS_REQUIRE_REDIS=1)")
        }
        Err(e) => {
            println!("skipped: no Redis ({url}: {e})");
            None
        }
    }
}

#[tokio::test]
async fn two_chat_processes_share_a_room() {
    let Some(url) = redis_url().await else { return };
    let (_a, addr_a) = spawn_example_with("chat", &["--redis", &url]);
    let (_b, addr_b) = spawn_example_with("chat", &["--redis", &url]);
    let room = format!("/ws/chat/redis-e2e-{}", std::process::id());
    let mut on_a = connect(addr_a, &room).await;
    let mut on_b = connect(addr_b, &room).await;
    let mut elsewhere = connect(addr_b, &format!("{room}-other")).await;

    // Joining completes before the handshake is answered (connect runs
    // group_add, which subscribes before returning), so both are members now.
    on_a.send(WsMessage::text(r#"{"message":"from a"}"#))
        .await
        .unwrap();
    assert_eq!(next_text(&mut on_a).await, r#"{"message":"from a"}"#);
    assert_eq!(next_text(&mut on_b).await, r#"{"message":"from a"}"#);

    on_b.send(WsMessage::text(r#"{"message":"from b"}"#))
        .await
        .unwrap();
    assert_eq!(next_text(&mut on_b).await, r#"{"message":"from b"}"#);
    assert_eq!(next_text(&mut on_a).await, r#"{"message":"from b"}"#);

    // The other room saw neither: its first message is its own.
    elsewhere
        .send(WsMessage::text(r#"{"message":"other room"}"#))
        .await
        .unwrap();
    assert_eq!(
        next_text(&mut elsewhere).await,
        r#"{"message":"other room"}"#
    );
}
