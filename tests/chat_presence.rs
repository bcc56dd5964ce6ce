//! The chat example on its default in-memory layer: presence, join and
//! leave messages, recovery after a disconnect, and clear answers to bad
//! recovery parameters. (`chat_layers.rs` runs the same protocol across
//! processes on Redis and Redis Cluster.)

mod common;

use common::*;
use futures_util::SinkExt;
use http::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;

async fn next_json(ws: &mut Client) -> Value {
    let raw = next_text(ws).await;
    serde_json::from_str(&raw).unwrap_or_else(|e| panic!("not JSON: {raw:?}: {e}"))
}

async fn say(ws: &mut Client, text: &str) {
    ws.send(WsMessage::text(json!({ "message": text }).to_string()))
        .await
        .expect("send");
}

#[tokio::test]
async fn presence_and_recovery_in_one_process() {
    let (_chat, addr) = spawn_example("chat");
    let mut bob = connect(addr, "/ws/chat/mem?user=bob").await;
    assert_eq!(
        next_json(&mut bob).await,
        json!({"type": "join", "user": "bob"})
    );
    let mut alice = connect(addr, "/ws/chat/mem?user=alice").await;
    assert_eq!(
        next_json(&mut bob).await,
        json!({"type": "join", "user": "alice"})
    );
    assert_eq!(
        next_json(&mut alice).await,
        json!({"type": "join", "user": "alice"})
    );
    alice
        .send(WsMessage::text(r#"{"type":"presence"}"#))
        .await
        .expect("send");
    assert_eq!(
        next_json(&mut alice).await,
        json!({"type": "presence", "members": ["alice", "bob"]})
    );

    say(&mut alice, "one").await;
    let one = next_json(&mut bob).await;
    assert_eq!(
        (one["message"].as_str(), one["user"].as_str()),
        (Some("one"), Some("alice"))
    );
    assert_eq!(next_json(&mut alice).await, one);
    close(&mut alice).await;
    assert_eq!(
        next_json(&mut bob).await,
        json!({"type": "leave", "user": "alice"})
    );

    // Bob talks while alice is away; she comes back with her last position.
    for m in ["two", "three"] {
        say(&mut bob, m).await;
        assert_eq!(next_json(&mut bob).await["message"], m);
    }
    let (offset, epoch) = (
        one["offset"].as_u64().unwrap(),
        one["epoch"].as_str().unwrap(),
    );
    let mut alice = connect(
        addr,
        &format!("/ws/chat/mem?user=alice&offset={offset}&epoch={epoch}"),
    )
    .await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let v = next_json(&mut alice).await;
        if v["type"].is_null() {
            got.push((
                v["message"].as_str().unwrap().to_owned(),
                v["offset"].as_u64().unwrap(),
            ));
        }
    }
    assert_eq!(
        got,
        [
            ("two".to_owned(), offset + 1),
            ("three".to_owned(), offset + 2)
        ]
    );

    // A position of another epoch cannot be recovered, and says so first.
    let mut stale = connect(addr, "/ws/chat/mem?offset=1&epoch=gone").await;
    assert_eq!(
        next_json(&mut stale).await,
        json!({"type": "recovery_failed"})
    );
    say(&mut stale, "four").await;
    assert_eq!(next_json(&mut stale).await["offset"], offset + 3);
}

#[tokio::test]
async fn bad_recovery_parameters_are_rejected() {
    let (_chat, addr) = spawn_example("chat");
    for (query, body) in [
        ("offset=abc&epoch=e", "invalid offset"),
        ("offset=1", "offset and epoch go together"),
        ("epoch=e", "offset and epoch go together"),
        ("offset=1&epoch=", "offset and epoch go together"),
    ] {
        let reply = http1(addr, empty(ws_req(addr, &format!("/ws/chat/x?{query}")))).await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (StatusCode::BAD_REQUEST, body),
            "?{query}"
        );
    }
    let long = "u".repeat(300);
    let reply = http1(
        addr,
        empty(ws_req(addr, &format!("/ws/chat/x?user={long}"))),
    )
    .await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::BAD_REQUEST, "invalid user name")
    );
}
