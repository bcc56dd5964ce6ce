//! The HTTP fallback (issue 25): SSE, HTTP-streaming and long-poll sessions
//! for the three consumer forms, over real sockets (axum on 127.0.0.1:0, a
//! raw hyper client), every status of the `POST`/`DELETE` protocol, and two
//! servers sharing a Redis channel layer where requests land on the process
//! that does not hold the session.

mod common;

use std::{net::SocketAddr, time::Duration};

use axum::Router;
use base64::Engine as _;
use bytes::Bytes;
use common::{within, TIMEOUT};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::{net::TcpStream, sync::mpsc};
use tower_channels::{
    consumer::{
        from_fn, json_consumer, websocket_consumer, Accept, Connection, Context,
        JsonWebSocketConsumer, WebSocketConsumer,
    },
    message::{CloseCode, Message},
    BoxError, HttpFallback, WebSocketConfig, WebSocketLayer,
};

// ------------------------------------------------------------------ consumers

/// Echoes messages; reports its close code; answers "scope" with the query.
#[derive(Clone)]
struct Echo {
    gone: mpsc::UnboundedSender<CloseCode>,
}

impl WebSocketConsumer for Echo {
    async fn receive(&mut self, ctx: &mut Context, msg: Message) -> Result<(), BoxError> {
        if msg.as_text() == Some("query") {
            ctx.send(Message::text(ctx.scope().query().unwrap_or("").to_owned()))?;
        } else if msg.as_text() == Some("flood") {
            // Until the connection refuses (the slow-client policy).
            let chunk = "x".repeat(16 << 10);
            while ctx.send(Message::text(chunk.clone())).is_ok() {
                tokio::task::yield_now().await;
            }
        } else {
            ctx.send(msg)?;
        }
        Ok(())
    }

    async fn disconnect(&mut self, _: &mut Context, code: CloseCode) {
        let _ = self.gone.send(code);
    }
}

/// Echoes JSON values.
struct JsonEcho {
    gone: mpsc::UnboundedSender<CloseCode>,
}

impl JsonWebSocketConsumer for JsonEcho {
    type Incoming = Value;

    async fn receive_json(&mut self, ctx: &mut Context, v: Value) -> Result<(), BoxError> {
        ctx.send_json(&v)?;
        Ok(())
    }

    async fn disconnect(&mut self, _: &mut Context, code: CloseCode) {
        let _ = self.gone.send(code);
    }
}

#[derive(Clone, Copy, Debug)]
enum Form {
    Callback,
    Json,
    Raw,
}

const FORMS: [Form; 3] = [Form::Callback, Form::Json, Form::Raw];

fn fallback() -> HttpFallback {
    HttpFallback::new()
        .secret(b"test secret".to_vec())
        .poll_timeout(Duration::from_millis(300))
}

/// A layer with `/ws/echo` in `form`; the receiver gets each close code.
fn echo_layer(
    form: Form,
    config: WebSocketConfig,
) -> (WebSocketLayer, mpsc::UnboundedReceiver<CloseCode>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let layer = WebSocketLayer::new().with_config(config);
    let layer = match form {
        Form::Callback => layer.route(
            "/ws/echo",
            websocket_consumer(move |_| Echo { gone: tx.clone() }),
        ),
        Form::Json => layer.route(
            "/ws/echo",
            json_consumer(move |_| JsonEcho { gone: tx.clone() }),
        ),
        Form::Raw => layer.route(
            "/ws/echo",
            from_fn(move |conn: Connection| {
                let gone = tx.clone();
                async move {
                    let mut ws = conn.accept(Accept::new()).await?;
                    // The raw form sees the peer's close frame, else the end.
                    let mut code = 1006;
                    while let Some(Ok(msg)) = ws.recv().await {
                        if let Message::Close(frame) = msg {
                            code = frame.map_or(1005, |f| f.code);
                            break;
                        }
                        if ws.send(msg).await.is_err() {
                            break;
                        }
                    }
                    let _ = gone.send(code);
                    Ok(())
                }
            }),
        ),
    };
    (layer.http_fallback(fallback()), rx)
}

async fn serve(layer: WebSocketLayer) -> SocketAddr {
    common::serve_axum(Router::new().layer(layer)).await
}

async fn code(rx: &mut mpsc::UnboundedReceiver<CloseCode>) -> CloseCode {
    within("the consumer's close code", rx.recv())
        .await
        .expect("a close code")
}

// --------------------------------------------------------------------- client

/// Sends `req` on a new HTTP/1.1 connection; the response with its body unread.
async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> http::Response<Incoming> {
    within("an HTTP response", async {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("client handshake");
        tokio::spawn(conn);
        sender.send_request(req).await.expect("send request")
    })
    .await
}

fn get(addr: SocketAddr, path: &str) -> http::request::Builder {
    Request::get(path).header("host", addr.to_string())
}

/// A session's response stream, read line by line.
struct Stream {
    body: Incoming,
    buf: Vec<u8>,
}

impl Stream {
    async fn line(&mut self) -> Option<String> {
        within("a line of the session stream", async {
            loop {
                if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = self.buf.drain(..=i).collect();
                    return Some(String::from_utf8(line[..i].to_vec()).expect("UTF-8"));
                }
                match self.body.frame().await {
                    Some(Ok(f)) => {
                        if let Ok(d) = f.into_data() {
                            self.buf.extend_from_slice(&d);
                        }
                    }
                    _ => return None,
                }
            }
        })
        .await
    }

    /// The next SSE event as (event name, data), comments skipped.
    async fn event(&mut self) -> Option<(String, String, Option<String>)> {
        let (mut name, mut data, mut id) = (String::from("message"), Vec::new(), None);
        loop {
            let line = self.line().await?;
            if line.is_empty() {
                if data.is_empty() {
                    continue;
                }
                return Some((name, data.join("\n"), id));
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(": ").unwrap_or((&line, ""));
            match field {
                "event" => name = value.to_owned(),
                "data" => data.push(value.to_owned()),
                "id" => id = Some(value.to_owned()),
                other => panic!("unexpected SSE field {other:?}"),
            }
        }
    }

    /// The next ndjson object that is not a ping.
    async fn object(&mut self) -> Option<Value> {
        loop {
            let v: Value = serde_json::from_str(&self.line().await?).expect("an ndjson line");
            if v["type"] != "ping" {
                return Some(v);
            }
        }
    }

    /// Whether the body ends (after skipping heartbeats).
    async fn ends(&mut self) -> bool {
        loop {
            match self.line().await {
                None => return true,
                Some(l) if l.is_empty() || l.starts_with(':') || l.contains("\"ping\"") => {}
                Some(other) => panic!("expected the end, got {other:?}"),
            }
        }
    }
}

/// An open session: where to send, and its stream (SSE/stream).
struct Session {
    addr: SocketAddr,
    id: String,
    token: String,
    seq: u64,
    stream: Option<Stream>,
}

async fn open(addr: SocketAddr, transport: &str) -> Session {
    let res = send(
        addr,
        get(addr, &format!("/ws/echo?transport={transport}"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
    let stream = Stream {
        body: res.into_body(),
        buf: Vec::new(),
    };
    let mut stream = Some(stream);
    let open: Value = match transport {
        "sse" => {
            assert_eq!(ct, "text/event-stream");
            let (name, data, _) = stream.as_mut().unwrap().event().await.expect("open event");
            assert_eq!(name, "open");
            serde_json::from_str(&data).unwrap()
        }
        "stream" => {
            assert_eq!(ct, "application/x-ndjson");
            stream.as_mut().unwrap().object().await.expect("open line")
        }
        _ => {
            assert_eq!(ct, "application/json");
            let body = stream
                .take()
                .unwrap()
                .body
                .collect()
                .await
                .unwrap()
                .to_bytes();
            let frames: Vec<Value> = serde_json::from_slice(&body).unwrap();
            assert_eq!(frames.len(), 1, "{frames:?}");
            frames[0].clone()
        }
    };
    if transport != "sse" {
        assert_eq!(open["type"], "open");
    }
    assert_eq!(open["transport"], transport);
    assert!(open["protocol"].is_null());
    Session {
        addr,
        id: open["session"].as_str().unwrap().to_owned(),
        token: open["token"].as_str().unwrap().to_owned(),
        seq: 0,
        stream,
    }
}

fn session_query(id: &str, token: &str) -> String {
    format!("session={id}&token={token}")
}

impl Session {
    fn q(&self) -> String {
        session_query(&self.id, &self.token)
    }

    async fn post_raw(
        &self,
        to: SocketAddr,
        query: &str,
        body: &[u8],
        ct: &str,
    ) -> (StatusCode, String) {
        let req = Request::post(format!("/ws/echo?{query}"))
            .header("host", to.to_string())
            .header("content-type", ct)
            .body(Full::new(Bytes::copy_from_slice(body)))
            .unwrap();
        let res = send(to, req).await;
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// POSTs `text` with the next seq to `to`.
    async fn post_to(&mut self, to: SocketAddr, text: &str) -> StatusCode {
        self.seq += 1;
        let q = format!("{}&seq={}", self.q(), self.seq);
        self.post_raw(to, &q, text.as_bytes(), "text/plain").await.0
    }

    async fn post(&mut self, text: &str) -> StatusCode {
        self.post_to(self.addr, text).await
    }

    async fn delete_at(&self, to: SocketAddr) -> StatusCode {
        let req = Request::delete(format!("/ws/echo?{}", self.q()))
            .header("host", to.to_string())
            .body(Full::new(Bytes::new()))
            .unwrap();
        send(to, req).await.status()
    }

    async fn poll_at(&self, to: SocketAddr, ack: u64) -> (StatusCode, Vec<Value>) {
        let req = get(
            to,
            &format!("/ws/echo?{}&transport=poll&ack={ack}", self.q()),
        )
        .body(Full::new(Bytes::new()))
        .unwrap();
        let res = send(to, req).await;
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let frames = if status == StatusCode::OK {
            serde_json::from_slice(&body).expect("a JSON array")
        } else {
            Vec::new()
        };
        (status, frames)
    }

    fn stream(&mut self) -> &mut Stream {
        self.stream.as_mut().expect("a streaming session")
    }
}

/// The text a form echoes for `sent`: the JSON consumer re-serializes.
fn msg(form: Form, n: u32) -> String {
    match form {
        Form::Json => format!("{{\"n\":{n}}}"),
        _ => format!("message {n}"),
    }
}

// ---------------------------------------------------------------------- tests

#[tokio::test]
async fn sse_echo_and_delete_for_every_consumer_form() {
    for form in FORMS {
        let (layer, mut gone) = echo_layer(form, WebSocketConfig::default());
        let addr = serve(layer).await;
        let mut s = open(addr, "sse").await;
        for n in 1..=3 {
            assert_eq!(
                s.post(&msg(form, n)).await,
                StatusCode::NO_CONTENT,
                "{form:?}"
            );
        }
        for n in 1..=3 {
            let (name, data, _) = s.stream().event().await.expect("echo");
            assert_eq!((name.as_str(), data), ("message", msg(form, n)), "{form:?}");
        }
        if !matches!(form, Form::Json) {
            // Binary: `application/octet-stream`, echoed as `event: binary`.
            s.seq += 1;
            let q = format!("{}&seq={}", s.q(), s.seq);
            let (st, _) = s
                .post_raw(addr, &q, &[0, 1, 2, 255], "application/octet-stream")
                .await;
            assert_eq!(st, StatusCode::NO_CONTENT);
            let (name, data, _) = s.stream().event().await.expect("binary echo");
            assert_eq!(name, "binary");
            assert_eq!(
                base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .unwrap(),
                [0, 1, 2, 255]
            );
        }
        assert_eq!(s.delete_at(addr).await, StatusCode::NO_CONTENT);
        let (name, data, _) = s.stream().event().await.expect("close event");
        assert_eq!(name, "close");
        let close: Value = serde_json::from_str(&data).unwrap();
        assert_eq!(close["code"], 1000, "{form:?}");
        assert!(s.stream().ends().await);
        assert_eq!(code(&mut gone).await, 1000, "{form:?}");
        // The session is gone: 404.
        assert_eq!(s.post("late").await, StatusCode::NOT_FOUND);
        assert_eq!(s.delete_at(addr).await, StatusCode::NOT_FOUND);
    }
}

#[tokio::test]
async fn ndjson_stream_echo_for_every_consumer_form() {
    for form in FORMS {
        let (layer, mut gone) = echo_layer(form, WebSocketConfig::default());
        let addr = serve(layer).await;
        let mut s = open(addr, "stream").await;
        assert_eq!(s.post(&msg(form, 1)).await, StatusCode::NO_CONTENT);
        let v = s.stream().object().await.unwrap();
        assert_eq!(v["type"], "text");
        assert_eq!(v["data"], msg(form, 1), "{form:?}");
        // The client goes away: the consumer sees an abnormal close.
        drop(s.stream.take());
        assert_eq!(code(&mut gone).await, 1006, "{form:?}");
    }
}

#[tokio::test]
async fn bare_event_source_request_and_last_event_id() {
    let (layer, _gone) = echo_layer(Form::Callback, WebSocketConfig::default());
    let addr = serve(layer).await;
    // No `transport`: `Accept: text/event-stream` opens SSE; Last-Event-ID
    // becomes `offset` and `epoch` in the query the consumer sees.
    let res = send(
        addr,
        get(addr, "/ws/echo?room=a")
            .header("accept", "text/event-stream")
            .header("last-event-id", "ep:och:41")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["cache-control"], "no-cache");
    assert_eq!(res.headers()["x-accel-buffering"], "no");
    let mut stream = Stream {
        body: res.into_body(),
        buf: Vec::new(),
    };
    let (_, data, _) = stream.event().await.unwrap();
    let open: Value = serde_json::from_str(&data).unwrap();
    let mut s = Session {
        addr,
        id: open["session"].as_str().unwrap().to_owned(),
        token: open["token"].as_str().unwrap().to_owned(),
        seq: 0,
        stream: Some(stream),
    };
    assert_eq!(s.post("query").await, StatusCode::NO_CONTENT);
    let (_, data, _) = s.stream().event().await.unwrap();
    assert_eq!(data, "room=a&offset=41&epoch=ep%3Aoch");
    // A positioned message carries its SSE id; multi-line text is split.
    let positioned = r#"{"offset":7,"epoch":"e1","message":"hi"}"#;
    assert_eq!(s.post(positioned).await, StatusCode::NO_CONTENT);
    let (_, data, id) = s.stream().event().await.unwrap();
    assert_eq!((data.as_str(), id.as_deref()), (positioned, Some("e1:7")));
    assert_eq!(s.post("two\nlines").await, StatusCode::NO_CONTENT);
    let (_, data, id) = s.stream().event().await.unwrap();
    assert_eq!((data.as_str(), id), ("two\nlines", None));
}

#[tokio::test]
async fn post_statuses() {
    for form in FORMS {
        let config = WebSocketConfig::default().max_message_size(1024);
        let (layer, mut gone) = echo_layer(form, config);
        let addr = serve(layer).await;
        let mut s = open(addr, "sse").await;
        let q = s.q();
        // 403: a forged token, or another session's.
        let (st, body) = s
            .post_raw(
                addr,
                &format!("session={}&token=forged&seq=1", s.id),
                b"x",
                "text/plain",
            )
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        assert!(body.contains("secret"), "{body}");
        // 404: a well-signed session that does not exist.
        let other = open(addr, "sse").await;
        assert_eq!(other.delete_at(addr).await, StatusCode::NO_CONTENT);
        let (st, _) = other
            .post_raw(addr, &format!("{}&seq=1", other.q()), b"x", "text/plain")
            .await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        // 400: no seq, a bad seq, no session, text that is not UTF-8.
        for bad in [
            q.clone(),
            format!("{q}&seq=x"),
            format!("{q}&seq=0"),
            "token=a&seq=1&session=".into(),
        ] {
            let (st, _) = s.post_raw(addr, &bad, b"x", "text/plain").await;
            assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}");
        }
        let (st, body) = s
            .post_raw(addr, &format!("{q}&seq=1"), b"\xff\xfe", "text/plain")
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        assert!(body.contains("UTF-8"), "{body}");
        // 413: past max_message_size; the seq is not spent.
        let (st, _) = s
            .post_raw(addr, &format!("{q}&seq=1"), &[b'a'; 1025], "text/plain")
            .await;
        assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
        // 204 then a duplicate, dropped: echoed once.
        assert_eq!(s.post(&msg(form, 1)).await, StatusCode::NO_CONTENT);
        let (st, _) = s
            .post_raw(
                addr,
                &format!("{q}&seq=1"),
                msg(form, 9).as_bytes(),
                "text/plain",
            )
            .await;
        assert_eq!(st, StatusCode::NO_CONTENT);
        assert_eq!(s.post(&msg(form, 2)).await, StatusCode::NO_CONTENT);
        assert_eq!(s.stream().event().await.unwrap().1, msg(form, 1));
        assert_eq!(
            s.stream().event().await.unwrap().1,
            msg(form, 2),
            "{form:?}: the duplicate was dropped"
        );
        // 409: a gap closes the session with 1002.
        let (st, _) = s
            .post_raw(addr, &format!("{q}&seq=5"), b"x", "text/plain")
            .await;
        assert_eq!(st, StatusCode::CONFLICT);
        let (name, data, _) = s.stream().event().await.unwrap();
        assert_eq!(name, "close");
        let close: Value = serde_json::from_str(&data).unwrap();
        assert_eq!(close["code"], 1002);
        assert_eq!(close["reason"], "sequence gap");
        assert!(s.stream().ends().await);
        let mut codes = vec![code(&mut gone).await, code(&mut gone).await];
        codes.sort();
        // The deleted session, then the failed one (the raw form sees no
        // close frame from a peer that broke the protocol: the end, 1006).
        match form {
            Form::Raw => assert_eq!(codes, [1000, 1006]),
            _ => assert_eq!(codes, [1000, 1002], "{form:?}"),
        }
        assert_eq!(s.post("after").await, StatusCode::NOT_FOUND);
    }
}

#[tokio::test]
async fn long_poll_is_lossless_and_acked() {
    for form in FORMS {
        let (layer, mut gone) = echo_layer(form, WebSocketConfig::default());
        let addr = serve(layer).await;
        let mut s = open(addr, "poll").await;
        // Nothing yet: `[]` after the poll timeout.
        let (st, frames) = s.poll_at(addr, 1).await;
        assert_eq!((st, frames.len()), (StatusCode::OK, 0));
        assert_eq!(s.post(&msg(form, 1)).await, StatusCode::NO_CONTENT);
        assert_eq!(s.post(&msg(form, 2)).await, StatusCode::NO_CONTENT);
        let mut got = Vec::new();
        let mut acked = 1;
        while got.len() < 2 {
            let (_, frames) = s.poll_at(addr, acked).await;
            got.extend(
                frames
                    .iter()
                    .map(|f| f["data"].as_str().unwrap().to_owned()),
            );
            // Not acknowledged yet: a poll with the same ack gets them again.
            let (_, again) = s.poll_at(addr, acked).await;
            assert_eq!(again, frames, "{form:?}: unacked frames are re-sent");
            acked += frames.len() as u64;
        }
        assert_eq!(got, [msg(form, 1), msg(form, 2)]);
        assert_eq!(s.delete_at(addr).await, StatusCode::NO_CONTENT);
        let (_, frames) = s.poll_at(addr, acked).await;
        assert_eq!(frames.last().unwrap()["type"], "close", "{frames:?}");
        assert_eq!(code(&mut gone).await, 1000);
    }
}

#[tokio::test]
async fn poll_session_without_polls_expires() {
    let config = WebSocketConfig::default()
        .idle_timeout(Some(Duration::from_millis(300)))
        .ping_interval(None);
    let (layer, mut gone) = echo_layer(Form::Callback, config);
    let addr = serve(layer).await;
    let mut s = open(addr, "poll").await;
    assert_eq!(code(&mut gone).await, 1006);
    assert_eq!(s.post("late").await, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn poll_client_that_never_polls_is_closed_4008() {
    let config = WebSocketConfig::default()
        .max_outbound_bytes(64 << 10)
        .slow_client_timeout(Duration::from_millis(200));
    let (layer, mut gone) = echo_layer(Form::Callback, config);
    let layer = layer.http_fallback(fallback().buffer_size(16 << 10));
    let addr = serve(layer).await;
    let mut s = open(addr, "poll").await;
    assert_eq!(s.post("flood").await, StatusCode::NO_CONTENT);
    assert_eq!(code(&mut gone).await, 4008);
}

#[tokio::test]
async fn heartbeats_and_shutdown_on_sse() {
    let config = WebSocketConfig::default().ping_interval(Some(Duration::from_millis(50)));
    let (layer, mut gone) = echo_layer(Form::Callback, config);
    let shutdown = layer.shutdown_handle();
    let stats = layer.clone();
    let addr = serve(layer).await;
    let mut s = open(addr, "sse").await;
    assert_eq!(s.stream().line().await.as_deref(), Some(": ping"));
    assert_eq!(stats.stats().open_http_sessions, 1);
    let report = tokio::spawn(async move { shutdown.shutdown(TIMEOUT).await });
    let (name, data, _) = s.stream().event().await.unwrap();
    assert_eq!(name, "close");
    assert!(data.contains("1001"), "{data}");
    assert!(s.stream().ends().await);
    assert_eq!(code(&mut gone).await, 1001);
    within("shutdown", report).await.unwrap();
    assert_eq!(stats.stats().open_http_sessions, 0);
    assert_eq!(stats.stats().accepted_http_sessions, 1);
}

#[tokio::test]
async fn post_flood_is_closed_by_the_rate_limit() {
    let config =
        WebSocketConfig::default().rate_limit(Some(tower_channels::RateLimit::new(1.0, 3)));
    let (layer, mut gone) = echo_layer(Form::Callback, config);
    let addr = serve(layer).await;
    let mut s = open(addr, "stream").await;
    let mut statuses = Vec::new();
    for n in 0..6 {
        statuses.push(s.post(&format!("m{n}")).await);
    }
    // Accepted until the session closes, then 404.
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::NO_CONTENT || *s == StatusCode::NOT_FOUND),
        "{statuses:?}"
    );
    let mut close = None;
    while let Some(v) = s.stream().object().await {
        if v["type"] == "close" {
            close = Some(v);
        }
    }
    assert_eq!(close.expect("a close line")["code"], 1008);
    assert_eq!(code(&mut gone).await, 1008);
}

#[tokio::test]
async fn origin_policy_holds_for_every_request() {
    let (layer, _gone) = echo_layer(Form::Callback, WebSocketConfig::default());
    let layer = layer.allowed_origins(tower_channels::origin::AllowedOrigins::list([
        "https://good.example",
    ]));
    let addr = serve(layer).await;
    let res = send(
        addr,
        get(addr, "/ws/echo?transport=sse")
            .header("origin", "https://evil.example")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let mut s = open(addr, "sse").await;
    let q = format!("{}&seq=1", s.q());
    let req = Request::post(format!("/ws/echo?{q}"))
        .header("host", addr.to_string())
        .header("origin", "https://evil.example")
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    assert_eq!(send(addr, req).await.status(), StatusCode::FORBIDDEN);
    assert_eq!(s.post("fine").await, StatusCode::NO_CONTENT);
    assert_eq!(s.stream().event().await.unwrap().1, "fine");
}

#[tokio::test]
async fn without_http_fallback_requests_pass_through() {
    let layer = WebSocketLayer::new().route(
        "/ws/echo",
        websocket_consumer(|_| Echo {
            gone: mpsc::unbounded_channel().0,
        }),
    );
    let addr = serve(layer).await;
    let res = send(
        addr,
        get(addr, "/ws/echo?transport=sse")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(
        res.status(),
        StatusCode::NOT_FOUND,
        "the inner router's answer"
    );
}

#[tokio::test]
async fn connect_reject_is_the_status_of_the_opening_get() {
    let layer = WebSocketLayer::new()
        .route(
            "/ws/echo",
            from_fn(|conn: Connection| async move {
                conn.reject(
                    tower_channels::consumer::Reject::new(StatusCode::UNAUTHORIZED).body("log in"),
                );
                Ok(())
            }),
        )
        .http_fallback(fallback());
    let addr = serve(layer).await;
    for t in ["sse", "stream", "poll"] {
        let res = send(
            addr,
            get(addr, &format!("/ws/echo?transport={t}"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"log in");
    }
}

/// Two servers on one Redis channel layer: every request lands on the
/// process that does not hold the session.
#[cfg(feature = "redis")]
#[tokio::test]
async fn requests_to_the_other_process_through_redis() {
    use std::sync::Arc;
    use tower_channels::channel_layer::redis::RedisChannelLayer;
    let Ok(url) = std::env::var("REDIS_URL") else {
        common::layers::skip(
            "Redis",
            "TOWER_CHANNELS_REQUIRE_REDIS",
            "REDIS_URL is not set",
        );
        return;
    };
    let prefix = format!("tc-test:http:{}", common::layers::unique_suffix());
    let redis = || async {
        let l = RedisChannelLayer::builder(&url)
            .prefix(&prefix)
            .build()
            .await
            .expect("connect to Redis");
        Arc::new(l)
    };
    for form in FORMS {
        // B waits 1 s (its close timeout) for an answer about a session
        // nobody holds.
        let config = WebSocketConfig::default().close_timeout(Duration::from_secs(1));
        let (a, mut gone) = echo_layer(form, config.clone());
        let (b, _) = echo_layer(form, config);
        let a = serve(
            a.with_channel_layer(redis().await)
                .http_fallback(fallback()),
        )
        .await;
        let b = serve(
            b.with_channel_layer(redis().await)
                .http_fallback(fallback()),
        )
        .await;
        // SSE held by A; POSTs and the DELETE go to B.
        let mut s = open(a, "sse").await;
        for n in 1..=3 {
            assert_eq!(
                s.post_to(b, &msg(form, n)).await,
                StatusCode::NO_CONTENT,
                "{form:?}"
            );
        }
        for n in 1..=3 {
            assert_eq!(s.stream().event().await.unwrap().1, msg(form, n));
        }
        // A duplicate and a gap through B.
        s.seq -= 1;
        assert_eq!(s.post_to(b, "dup").await, StatusCode::NO_CONTENT);
        assert_eq!(s.delete_at(b).await, StatusCode::NO_CONTENT);
        let (name, _, _) = s.stream().event().await.unwrap();
        assert_eq!(name, "close", "{form:?}: the duplicate was dropped");
        assert_eq!(code(&mut gone).await, 1000);
        // Long-poll held by A, polled and posted on B.
        let mut p = open(a, "poll").await;
        assert_eq!(p.post_to(b, &msg(form, 1)).await, StatusCode::NO_CONTENT);
        let mut acked = 1;
        let mut got = Vec::new();
        while got.is_empty() {
            let (st, frames) = p.poll_at(b, acked).await;
            assert_eq!(st, StatusCode::OK);
            acked += frames.len() as u64;
            got.extend(frames);
        }
        assert_eq!(got[0]["data"], msg(form, 1));
        // The gap through B: 409, the session closes.
        let (st, _) = p
            .post_raw(b, &format!("{}&seq=9", p.q()), b"x", "text/plain")
            .await;
        assert_eq!(st, StatusCode::CONFLICT);
        let _ = code(&mut gone).await;
        // A session nobody holds: 404 (after the wait for an answer).
        assert_eq!(p.post_to(b, "late").await, StatusCode::NOT_FOUND);
    }
}

/// The test kit drives each HTTP transport, for every consumer form.
#[tokio::test]
async fn communicator_drives_every_http_transport() {
    use tower_channels::testing::{Communicator, HttpTransport};
    for form in FORMS {
        for transport in [
            HttpTransport::Sse,
            HttpTransport::Stream,
            HttpTransport::Poll,
        ] {
            let (layer, mut gone) = echo_layer(form, WebSocketConfig::default());
            let app = Router::new().layer(layer);
            let request = Request::get("/ws/echo").body(()).unwrap();
            let mut comm = Communicator::through_http(app, request, transport);
            comm.connect().await.expect("accepted");
            comm.send_text(msg(form, 1)).await;
            comm.send_text(msg(form, 2)).await;
            assert_eq!(
                comm.receive_text().await.unwrap(),
                msg(form, 1),
                "{form:?} {transport:?}"
            );
            assert_eq!(comm.receive_text().await.unwrap(), msg(form, 2));
            assert!(comm.wait_handled().await);
            comm.disconnect(1000).await;
            assert_eq!(code(&mut gone).await, 1000, "{form:?} {transport:?}");
        }
    }
}

/// A consumer that only sends is a plain SSE stream: a bare `EventSource`
/// request (no `transport`, no client library) gets group events.
#[tokio::test]
async fn plain_sse_stream_of_group_events() {
    use tower_channels::channel_layer::Event;
    struct Dashboard;
    impl WebSocketConsumer for Dashboard {
        async fn connect(
            &mut self,
            ctx: &mut Context,
        ) -> Result<Accept, tower_channels::consumer::Reject> {
            ctx.group_add("dashboard").await?;
            Ok(Accept::new())
        }
    }
    let layer = WebSocketLayer::new()
        .route("/events", websocket_consumer(|_| Dashboard))
        .http_fallback(fallback());
    let channel_layer = layer.channel_layer();
    let addr = serve(layer).await;
    let res = send(
        addr,
        get(addr, "/events")
            .header("accept", "text/event-stream")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    let mut stream = Stream {
        body: res.into_body(),
        buf: Vec::new(),
    };
    assert_eq!(stream.event().await.unwrap().0, "open");
    // The group membership exists once `open` is written (connect ran).
    for n in 0..3 {
        channel_layer
            .group_send("dashboard", Event::text("tick", format!("{{\"n\":{n}}}")))
            .await
            .unwrap();
    }
    for n in 0..3 {
        let (name, data, _) = stream.event().await.unwrap();
        assert_eq!((name.as_str(), data), ("message", format!("{{\"n\":{n}}}")));
    }
}

/// An SSE client that stops reading is closed 4008 by the slow-client
/// policy, as a WebSocket is; what the session held for it is dropped.
#[tokio::test]
async fn sse_client_that_stops_reading_is_closed_4008() {
    use tower_channels::testing::{Communicator, HttpTransport};
    let config = WebSocketConfig::default()
        .max_outbound_bytes(64 << 10)
        .slow_client_timeout(Duration::from_millis(200))
        .close_timeout(Duration::from_millis(200));
    let (layer, mut gone) = echo_layer(Form::Callback, config);
    let layer = layer.http_fallback(fallback().buffer_size(16 << 10));
    let stats = layer.clone();
    let app = Router::new().layer(layer);
    let request = Request::get("/ws/echo").body(()).unwrap();
    let mut comm = Communicator::through_http(app, request, HttpTransport::Sse);
    comm.connect().await.expect("accepted");
    comm.send_text("flood").await;
    assert_eq!(code(&mut gone).await, 4008);
    assert!(comm.wait_finished(TIMEOUT).await);
    assert_eq!(stats.stats().open_http_sessions, 0);
    assert_eq!(stats.stats().slow_client_closes, 1);
}

/// A full session inbox answers 429; the client retries the same seq and
/// nothing is lost or duplicated.
#[tokio::test]
async fn full_inbox_is_429_and_a_retry_loses_nothing() {
    use std::sync::Arc;
    use tokio::sync::Semaphore;
    /// Echoes, but each message waits for a permit the test hands out.
    struct Gated(Arc<Semaphore>);
    impl WebSocketConsumer for Gated {
        async fn receive(&mut self, ctx: &mut Context, msg: Message) -> Result<(), BoxError> {
            self.0.acquire().await?.forget();
            ctx.send(msg)?;
            Ok(())
        }
    }
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let layer = WebSocketLayer::new()
        .with_config(WebSocketConfig::default().max_buffered_messages(1))
        .route("/ws/echo", websocket_consumer(move |_| Gated(g.clone())))
        .http_fallback(fallback());
    let addr = serve(layer).await;
    let mut s = open(addr, "sse").await;
    // The consumer holds one, the engine reads ahead one, the inbox holds
    // one: a 429 comes within a few POSTs.
    let mut sent = 0;
    let refused = loop {
        let st = s.post(&format!("m{}", sent + 1)).await;
        if st == StatusCode::TOO_MANY_REQUESTS {
            break sent + 1;
        }
        assert_eq!(st, StatusCode::NO_CONTENT);
        sent += 1;
        assert!(sent < 10, "no 429 with a full inbox");
    };
    gate.add_permits(100);
    // Retry the refused seq until the inbox has room.
    s.seq -= 1;
    let text = format!("m{refused}");
    within("a retried POST accepted", async {
        loop {
            let st = s.post(&text).await;
            if st == StatusCode::NO_CONTENT {
                break;
            }
            assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
            s.seq -= 1;
            tokio::task::yield_now().await;
        }
    })
    .await;
    for n in 1..=refused {
        assert_eq!(s.stream().event().await.unwrap().1, format!("m{n}"));
    }
}
