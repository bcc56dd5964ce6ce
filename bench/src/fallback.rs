//! A client of the crate's HTTP fallback (protocol v1, README "HTTP
//! fallback"), as the load generator needs it: SSE sessions read as a
//! stream of events, and `POST`s of client messages over one keep-alive
//! HTTP/1.1 connection. hyper does the HTTP; only the `text/event-stream`
//! framing (lines, `field: value`, a blank line ends an event) is read
//! here.

use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE, HOST};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::{err, Result};

/// Bytes of one SSE line past which the stream is treated as broken (the
/// chat example's events are a few hundred bytes).
const MAX_LINE: usize = 1 << 20;

/// One dispatched SSE event.
#[derive(Debug)]
pub enum SseEvent {
    /// `event: open`: the session's JSON (`session`, `token`, ...).
    Open(String),
    /// A text message (`data:` lines, no `event:`).
    Text(String),
    /// `event: close`: the close JSON; the body ends next.
    Close(String),
    /// Any other event (`binary`).
    Other,
}

/// An open HTTP/1.1 connection to one server, its driver task aborted on drop.
struct Conn {
    send: http1::SendRequest<http_body_util::combinators::BoxBody<Bytes, hyper::Error>>,
    driver: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn open_conn(addr: SocketAddr) -> Result<Conn> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (send, conn) = http1::handshake(TokioIo::new(tcp)).await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Conn { send, driver })
}

fn boxed<B>(body: B) -> http_body_util::combinators::BoxBody<Bytes, hyper::Error>
where
    B: hyper::body::Body<Data = Bytes, Error = std::convert::Infallible> + Send + Sync + 'static,
{
    body.map_err(|never| match never {}).boxed()
}

/// Percent-encodes a query value (session ids contain `!` and `.`).
pub fn encode(value: &str) -> String {
    utf8_percent_encode(value, NON_ALPHANUMERIC).to_string()
}

/// An SSE session's response body, read event by event.
pub struct Sse {
    body: Incoming,
    /// Received bytes not yet split into lines; `pos` is where the unread
    /// part starts (compacted when a chunk is used up).
    buf: Vec<u8>,
    pos: usize,
    event: String,
    data: String,
    has_data: bool,
    _conn: Conn,
}

impl Sse {
    /// `GET path_and_query` (which carries `transport=sse`) on a new
    /// connection to `addr`; returns the stream and the response headers.
    /// A status other than 200 is an error with the response body.
    pub async fn open(addr: SocketAddr, path_and_query: &str) -> Result<(Self, HeaderMap)> {
        let mut conn = open_conn(addr).await?;
        let req = Request::get(path_and_query)
            .header(HOST, addr.to_string())
            .header(ACCEPT, "text/event-stream")
            .body(boxed(Empty::<Bytes>::new()))?;
        let resp = conn.send.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        if parts.status != StatusCode::OK {
            let text = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return err(format!(
                "GET {path_and_query}: {} {}",
                parts.status,
                String::from_utf8_lossy(&text)
            ));
        }
        let sse = Self {
            body,
            buf: Vec::new(),
            pos: 0,
            event: String::new(),
            data: String::new(),
            has_data: false,
            _conn: conn,
        };
        Ok((sse, parts.headers))
    }

    /// The next event; `None` when the body ended.
    pub async fn next_event(&mut self) -> Result<Option<SseEvent>> {
        loop {
            if let Some(n) = self.buf[self.pos..].iter().position(|&b| b == b'\n') {
                let end = self.pos + n;
                let mut line = &self.buf[self.pos..end];
                self.pos = end + 1;
                if let [rest @ .., b'\r'] = line {
                    line = rest;
                }
                if line.is_empty() {
                    if let Some(ev) = self.dispatch() {
                        return Ok(Some(ev));
                    }
                    continue;
                }
                let line = std::str::from_utf8(line)?;
                let (field, value) = match line.split_once(':') {
                    Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                    None => (line, ""),
                };
                match field {
                    "" => {} // a comment (`: ping`)
                    "event" => value.clone_into(&mut self.event),
                    "data" => {
                        if self.has_data {
                            self.data.push('\n');
                        }
                        self.data.push_str(value);
                        self.has_data = true;
                    }
                    _ => {} // `id`, `retry`
                }
                continue;
            }
            if self.buf.len() - self.pos > MAX_LINE {
                return err("SSE line longer than 1 MiB");
            }
            self.buf.drain(..self.pos);
            self.pos = 0;
            match self.body.frame().await {
                None => return Ok(None),
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = std::mem::take(&mut self.event);
        if !std::mem::replace(&mut self.has_data, false) {
            return None;
        }
        let data = std::mem::take(&mut self.data);
        Some(match event.as_str() {
            "" | "message" => SseEvent::Text(data),
            "open" => SseEvent::Open(data),
            "close" => SseEvent::Close(data),
            _ => SseEvent::Other,
        })
    }
}

/// The `session` and `token` of an `open` event's JSON.
pub fn session_of(open_json: &str) -> Result<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(open_json)?;
    match (v["session"].as_str(), v["token"].as_str()) {
        (Some(s), Some(t)) => Ok((s.to_owned(), t.to_owned())),
        _ => err(format!("open event without session/token: {open_json}")),
    }
}

/// `POST`s client messages of one session, one at a time, over one
/// keep-alive connection (reopened if the server or proxy closed it).
pub struct Poster {
    addr: SocketAddr,
    /// `<route>?session=..&token=..&seq=`.
    prefix: String,
    seq: u64,
    conn: Option<Conn>,
}

impl Poster {
    /// A poster for the session `session`/`token` of `route` on `addr`.
    pub fn new(addr: SocketAddr, route: &str, session: &str, token: &str) -> Self {
        Self {
            addr,
            prefix: format!(
                "{route}?session={}&token={}&seq=",
                encode(session),
                encode(token)
            ),
            seq: 0,
            conn: None,
        }
    }

    /// Sends the next message (text); returns the response headers.
    /// Anything but 204 is an error.
    pub async fn post(&mut self, text: String) -> Result<HeaderMap> {
        self.seq += 1;
        let conn = match &mut self.conn {
            Some(c) if !c.send.is_closed() => c,
            _ => self.conn.insert(open_conn(self.addr).await?),
        };
        conn.send.ready().await?;
        let req = Request::post(format!("{}{}", self.prefix, self.seq))
            .header(HOST, self.addr.to_string())
            .header(CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(boxed(Full::new(Bytes::from(text))))?;
        let resp = conn.send.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let text = body.collect().await?.to_bytes();
        if parts.status != StatusCode::NO_CONTENT {
            return err(format!(
                "POST seq {}: {} {}",
                self.seq,
                parts.status,
                String::from_utf8_lossy(&text)
            ));
        }
        Ok(parts.headers)
    }
}
