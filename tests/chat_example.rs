//! The chat example's HTTP side and room names, over real sockets against
//! the example binary: `POST /rooms/{room}/messages` refuses cross-site
//! requests and oversized bodies, and non-ASCII room names work.

mod common;

use bytes::Bytes;
use common::*;
use futures_util::SinkExt;
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio_tungstenite::tungstenite::Message as WsMessage;

fn post(addr: std::net::SocketAddr, path: &str, body: &str) -> http::request::Builder {
    Request::post(path)
        .header("host", addr.to_string())
        .header("content-length", body.len())
}

fn with_body(b: http::request::Builder, body: &str) -> Request<Full<Bytes>> {
    b.body(Full::new(Bytes::from(body.to_owned())))
        .expect("valid request")
}

#[tokio::test]
async fn post_is_held_to_the_websocket_origin_policy() {
    let (_chat, addr) = spawn_example("chat");
    let mut member = connect(addr, "/ws/chat/csrf").await;
    let path = "/rooms/csrf/messages";

    // Cross-site by Origin, and by Sec-Fetch-Site: refused before sending.
    let evil = post(addr, path, "evil").header("origin", "http://evil.example");
    let reply = http1(addr, with_body(evil, "evil")).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    let fetch = post(addr, path, "evil").header("sec-fetch-site", "cross-site");
    let reply = http1(addr, with_body(fetch, "evil")).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);

    // The page's own origin (and a client without Origin) may post.
    let own = post(addr, path, "hello")
        .header("origin", format!("http://{addr}"))
        .header("sec-fetch-site", "same-origin");
    let reply = http1(addr, with_body(own, "hello")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(chat_message(&next_text(&mut member).await), "hello");
    let reply = http1(addr, with_body(post(addr, path, "curl"), "curl")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    // The refused posts never reached the room: the next frame is "curl".
    assert_eq!(chat_message(&next_text(&mut member).await), "curl");
}

#[tokio::test]
async fn post_has_the_websocket_size_limit() {
    let (_chat, addr) = spawn_example_with("chat", &["--max-message-size", "1000"]);
    let mut member = connect(addr, "/ws/chat/size").await;
    let path = "/rooms/size/messages";
    let big = "x".repeat(1001);
    let reply = http1(addr, with_body(post(addr, path, &big), &big)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    // A body under the limit whose frame (JSON-escaped) is over it.
    let escaped = "\u{1}".repeat(300); // 300 bytes, 1,800 once escaped as \u0001
    let reply = http1(addr, with_body(post(addr, path, &escaped), &escaped)).await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.body
    );
    let fits = "y".repeat(900);
    let reply = http1(addr, with_body(post(addr, path, &fits), &fits)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(chat_message(&next_text(&mut member).await), fits);
}

#[tokio::test]
async fn non_ascii_room_names_work_and_stay_apart() {
    let (_chat, addr) = spawn_example("chat");
    // What the page sends for `café` (encodeURIComponent), and a plain room
    // whose name is the hex of `café`'s bytes, which must not share its group.
    let mut cafe = connect(addr, "/ws/chat/caf%C3%A9").await;
    let mut cafe2 = connect(addr, "/ws/chat/caf%C3%A9").await;
    let mut lookalike = connect(addr, "/ws/chat/636166c3a9").await;
    cafe.send(WsMessage::text(r#"{"message":"un café"}"#))
        .await
        .unwrap();
    assert_eq!(chat_message(&next_text(&mut cafe).await), "un café");
    assert_eq!(chat_message(&next_text(&mut cafe2).await), "un café");
    // POST to the same room by its encoded name.
    let path = "/rooms/caf%C3%A9/messages";
    let reply = http1(addr, with_body(post(addr, path, "posted"), "posted")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(chat_message(&next_text(&mut cafe2).await), "posted");
    lookalike
        .send(WsMessage::text(r#"{"message":"hex"}"#))
        .await
        .unwrap();
    assert_eq!(chat_message(&next_text(&mut lookalike).await), "hex");
    assert_eq!(chat_message(&next_text(&mut cafe).await), "posted");

    // A room name too long for a group is refused with 400, not 500.
    let long = "%C3%A9".repeat(60);
    let req = empty(ws_req(addr, &format!("/ws/chat/{long}")));
    let reply = http1(addr, req).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.body, "room name too long");
}

/// Issue 23: the message counters reach the recorder while the connection
/// stays open (published once a second), also when a refused handshake was
/// the first thing the layer counted (it registers the recorder's handles
/// before any connection opened).
#[cfg(feature = "example-metrics")]
#[tokio::test]
async fn message_counters_reach_the_recorder_while_connected() {
    let (_chat, addr) = spawn_example("chat");
    let evil = empty(ws_req(addr, "/ws/chat/published").header("origin", "http://evil.example"));
    assert_eq!(http1(addr, evil).await.status, StatusCode::FORBIDDEN);
    let mut ws = connect(addr, "/ws/chat/published").await;
    ws.send(WsMessage::text(r#"{"message":"counted"}"#))
        .await
        .unwrap();
    assert_eq!(chat_message(&next_text(&mut ws).await), "counted");
    // The publishing period is a second; the deadline leaves room for a
    // busy machine. The socket stays open throughout.
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let reply = http1(addr, empty(get_req(addr, "/metrics"))).await;
        assert_eq!(reply.status, StatusCode::OK);
        let lines: Vec<&str> = reply.body.lines().collect();
        if lines.contains(&"tower_channels_messages_received_total 1")
            && lines.contains(&"tower_channels_messages_sent_total 1")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "message counters not published while connected:\n{}",
            reply.body
        );
        tokio::task::yield_now().await;
    }
    close(&mut ws).await;
}

/// Issue 14 (13): the chat example's `GET /metrics` in Prometheus' format
/// reflects real traffic.
#[cfg(feature = "example-metrics")]
#[tokio::test]
async fn metrics_endpoint_is_scraped() {
    let (_chat, addr) = spawn_example("chat");
    let mut ws = connect(addr, "/ws/chat/metrics").await;
    ws.send(WsMessage::text(r#"{"message":"counted"}"#))
        .await
        .unwrap();
    let frame = next_text(&mut ws).await;
    assert_eq!(chat_message(&frame), "counted");
    let sent_bytes = format!("tower_channels_sent_bytes_total {}", frame.len());
    // A refused handshake (cross-site) is counted too.
    let evil = empty(ws_req(addr, "/ws/chat/metrics").header("origin", "http://evil.example"));
    assert_eq!(http1(addr, evil).await.status, StatusCode::FORBIDDEN);
    close(&mut ws).await;

    // The close is recorded after `disconnect` ran; poll the scrape until it shows.
    let deadline = std::time::Instant::now() + TIMEOUT;
    let text = loop {
        let reply = http1(addr, empty(get_req(addr, "/metrics"))).await;
        assert_eq!(reply.status, StatusCode::OK);
        if reply
            .body
            .contains("tower_channels_closes_total{code=\"1000\"} 1")
        {
            break reply.body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no close in:\n{}",
            reply.body
        );
        tokio::task::yield_now().await;
    };
    for line in [
        "tower_channels_connections_accepted_total 1",
        "tower_channels_connections_open 0",
        "tower_channels_handshakes_rejected_total 1",
        "tower_channels_messages_received_total 1",
        "tower_channels_messages_sent_total 1",
        "tower_channels_received_bytes_total 21",
        sent_bytes.as_str(),
        "tower_channels_group_sends_total 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    assert!(
        text.contains("# TYPE tower_channels_handler_duration_seconds summary")
            || text.contains("# TYPE tower_channels_handler_duration_seconds histogram"),
        "{text}"
    );
    // One client message, one `receive` call timed; the `event` call that
    // delivered the room's message back is not timed by default.
    assert!(
        text.lines()
            .any(|l| l == r#"tower_channels_handler_duration_seconds_count{handler="receive"} 1"#),
        "{text}"
    );
    assert!(!text.contains(r#"handler="event""#), "{text}");
}
