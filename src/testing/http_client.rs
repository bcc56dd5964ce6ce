//! The [`Communicator`](super::Communicator)'s client of the HTTP fallback
//! (SSE, HTTP-streaming, long-poll): every request goes through the whole
//! service over an in-memory HTTP/1.1 connection, as a browser's would over
//! the network, and what the session writes is read back as [`Message`]s.

use std::{collections::VecDeque, io};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use bytes::{Bytes, BytesMut};
use http::{header, Extensions, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tower_service::Service;

use super::Rejected;
use crate::{
    channel_layer::{BoxError, BoxFuture},
    message::{CloseFrame, Message, Utf8Bytes},
};

/// Which transport of the HTTP fallback a
/// [`Communicator::through_http`](super::Communicator::through_http) uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HttpTransport {
    /// Server-Sent Events.
    Sse,
    /// HTTP-streaming (ndjson).
    Stream,
    /// Long-polling.
    Poll,
}

impl HttpTransport {
    fn as_str(self) -> &'static str {
        match self {
            Self::Sse => "sse",
            Self::Stream => "stream",
            Self::Poll => "poll",
        }
    }
}

/// The most a test client buffers of a session's stream.
const MAX_BUFFER: usize = 64 << 20;

type Sender =
    Box<dyn Fn(Request<Full<Bytes>>) -> BoxFuture<'static, io::Result<Response<Incoming>>> + Send>;

/// Sends each request on a new in-memory HTTP/1.1 connection to `service`,
/// with `extensions` put back on the request the service receives.
fn sender<S, B>(service: S, extensions: Extensions) -> Sender
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Box::new(move |request| {
        let service = service.clone();
        let extensions = extensions.clone();
        Box::pin(async move {
            let (server_io, client_io) = tokio::io::duplex(64 << 10);
            let serve = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().extend(extensions.clone());
                let mut service = service.clone();
                async move {
                    std::future::poll_fn(|cx| service.poll_ready(cx))
                        .await
                        .map_err(io::Error::other)?;
                    service.call(req).await.map_err(io::Error::other)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(server_io), serve)
                    .await;
            });
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client_io))
                .await
                .map_err(io::Error::other)?;
            tokio::spawn(conn);
            sender.send_request(request).await.map_err(io::Error::other)
        })
    })
}

/// An open session, seen from the client.
pub(crate) struct HttpClient {
    send: Sender,
    path: String,
    headers: http::HeaderMap,
    transport: HttpTransport,
    session: String,
    token: String,
    seq: u64,
    /// Long-poll: frames received so far (the `ack`).
    received: u64,
    /// Parsed, not yet handed out.
    inbox: VecDeque<Message>,
    /// SSE / HTTP-streaming: the response body and what was read of it.
    stream: Option<Incoming>,
    buf: BytesMut,
    ended: bool,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("transport", &self.transport)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

fn other(why: impl Into<String>) -> io::Error {
    io::Error::other(why.into())
}

/// Opens a session on `transport` through `service`: the client and the
/// subprotocol, or the response that refused it.
pub(crate) async fn open<S, B>(
    service: S,
    request: Request<()>,
    transport: HttpTransport,
) -> Result<(HttpClient, Option<String>), Rejected>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (mut parts, ()) = request.into_parts();
    let extensions = std::mem::take(&mut parts.extensions);
    let send = sender(service, extensions);
    parts.version = Version::HTTP_11;
    if !parts.headers.contains_key(header::HOST) {
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_static("localhost"));
    }
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map_or(String::new(), |q| format!("{q}&"));
    let uri = format!("{path}?{query}transport={}", transport.as_str());
    let mut req = Request::get(uri)
        .body(Full::new(Bytes::new()))
        .map_err(|e| failed(&e.to_string()))?;
    *req.headers_mut() = parts.headers.clone();
    let response = send(req).await.map_err(|e| failed(&e.to_string()))?;
    let status = response.status();
    if status != StatusCode::OK {
        let body = response
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        return Err(Rejected { status, body });
    }
    let mut client = HttpClient {
        send,
        path,
        headers: parts.headers,
        transport,
        session: String::new(),
        token: String::new(),
        seq: 0,
        received: 0,
        inbox: VecDeque::new(),
        stream: None,
        buf: BytesMut::new(),
        ended: false,
    };
    let open = match transport {
        HttpTransport::Poll => {
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| failed(&e.to_string()))?
                .to_bytes();
            let frames: Vec<Value> =
                serde_json::from_slice(&body).map_err(|e| failed(&e.to_string()))?;
            client.received = frames.len() as u64;
            let mut frames = frames.into_iter();
            let open = frames.next().ok_or_else(|| failed("no open frame"))?;
            for f in frames {
                client.take_json(&f);
            }
            open
        }
        HttpTransport::Sse | HttpTransport::Stream => {
            client.stream = Some(response.into_body());
            client
                .next_value()
                .await
                .map_err(|e| failed(&e.to_string()))?
                .ok_or_else(|| failed("no open event"))?
        }
    };
    client.session = open["session"].as_str().unwrap_or_default().to_owned();
    client.token = open["token"].as_str().unwrap_or_default().to_owned();
    let protocol = open["protocol"].as_str().map(str::to_owned);
    Ok((client, protocol))
}

fn failed(why: &str) -> Rejected {
    Rejected {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        body: Bytes::from(why.to_owned()),
    }
}

impl HttpClient {
    fn session_uri(&self, extra: &str) -> String {
        let enc = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        format!(
            "{}?session={}&token={}{extra}",
            self.path,
            enc(&self.session),
            enc(&self.token)
        )
    }

    fn request(
        &self,
        method: Method,
        uri: String,
        body: Bytes,
    ) -> io::Result<Request<Full<Bytes>>> {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(body))
            .map_err(io::Error::other)?;
        for name in [
            header::HOST,
            header::ORIGIN,
            header::COOKIE,
            header::AUTHORIZATION,
        ] {
            if let Some(v) = self.headers.get(&name) {
                req.headers_mut().insert(name, v.clone());
            }
        }
        Ok(req)
    }

    /// Sends a data message (a `POST`) or a close (a `DELETE`).
    pub(crate) async fn send(&mut self, message: Message) -> io::Result<()> {
        let (body, content_type) = match message {
            Message::Text(t) => (t.as_bytes().clone(), "text/plain; charset=utf-8"),
            Message::Binary(b) => (b, "application/octet-stream"),
            Message::Close(_) => {
                let req = self.request(Method::DELETE, self.session_uri(""), Bytes::new())?;
                let res = (self.send)(req).await?;
                return match res.status() {
                    StatusCode::NO_CONTENT | StatusCode::NOT_FOUND => Ok(()),
                    s => Err(other(format!("DELETE answered {s}"))),
                };
            }
            // Nothing pings over HTTP.
            Message::Ping(_) | Message::Pong(_) => return Ok(()),
        };
        self.seq += 1;
        let uri = self.session_uri(&format!("&seq={}", self.seq));
        let mut req = self.request(Method::POST, uri, body)?;
        req.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        let res = (self.send)(req).await?;
        match res.status() {
            StatusCode::NO_CONTENT => Ok(()),
            s => Err(other(format!("POST answered {s}"))),
        }
    }

    /// The next message from the session: data, then its close, then `None`.
    pub(crate) async fn next(&mut self) -> Option<io::Result<Message>> {
        loop {
            if let Some(m) = self.inbox.pop_front() {
                return Some(Ok(m));
            }
            if self.ended {
                return None;
            }
            match self.transport {
                HttpTransport::Poll => {
                    if let Err(e) = self.poll().await {
                        return Some(Err(e));
                    }
                }
                HttpTransport::Sse | HttpTransport::Stream => match self.next_value().await {
                    Ok(Some(v)) => self.take_json(&v),
                    Ok(None) => self.ended = true,
                    Err(e) => return Some(Err(e)),
                },
            }
        }
    }

    async fn poll(&mut self) -> io::Result<()> {
        let uri = self.session_uri(&format!("&transport=poll&ack={}", self.received));
        let req = self.request(Method::GET, uri, Bytes::new())?;
        let res = (self.send)(req).await?;
        if res.status() == StatusCode::NOT_FOUND {
            self.ended = true;
            return Ok(());
        }
        if res.status() != StatusCode::OK {
            return Err(other(format!("poll answered {}", res.status())));
        }
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(io::Error::other)?
            .to_bytes();
        let frames: Vec<Value> = serde_json::from_slice(&body).map_err(io::Error::other)?;
        self.received += frames.len() as u64;
        for f in &frames {
            self.take_json(f);
        }
        Ok(())
    }

    /// A frame in its JSON form (SSE events are turned into it).
    fn take_json(&mut self, v: &Value) {
        let data = v["data"].as_str().unwrap_or_default();
        let message = match v["type"].as_str() {
            Some("text") => Message::Text(Utf8Bytes::from(data)),
            Some("binary") => match STANDARD.decode(data) {
                Ok(b) => Message::Binary(b.into()),
                Err(_) => return,
            },
            Some("close") => {
                // Nothing follows a close.
                self.ended = true;
                let code = v["code"].as_u64().and_then(|c| u16::try_from(c).ok());
                let reason = v["reason"].as_str().unwrap_or_default();
                Message::Close(code.map(|c| CloseFrame::new(c, reason)))
            }
            _ => return,
        };
        self.inbox.push_back(message);
    }

    /// The next frame of the stream as JSON (an SSE event converted), or
    /// `None` at its end.
    async fn next_value(&mut self) -> io::Result<Option<Value>> {
        match self.transport {
            HttpTransport::Stream => loop {
                let Some(line) = self.line().await? else {
                    return Ok(None);
                };
                if !line.is_empty() {
                    return serde_json::from_str(&line)
                        .map(Some)
                        .map_err(io::Error::other);
                }
            },
            _ => {
                let (mut event, mut data) = (String::from("message"), Vec::new());
                loop {
                    let Some(line) = self.line().await? else {
                        return Ok(None);
                    };
                    if line.is_empty() {
                        if data.is_empty() {
                            continue;
                        }
                        let data = data.join("\n");
                        return Ok(Some(match event.as_str() {
                            "message" => serde_json::json!({"type": "text", "data": data}),
                            "binary" => serde_json::json!({"type": "binary", "data": data}),
                            _ => {
                                let mut v: Value =
                                    serde_json::from_str(&data).map_err(io::Error::other)?;
                                v["type"] = Value::from(event);
                                v
                            }
                        }));
                    }
                    if line.starts_with(':') {
                        continue;
                    }
                    let (field, value) = line.split_once(':').unwrap_or((&line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "event" => event = value.to_owned(),
                        "data" => data.push(value.to_owned()),
                        _ => {}
                    }
                }
            }
        }
    }

    async fn line(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(i + 1);
                return String::from_utf8(line[..i].to_vec())
                    .map(Some)
                    .map_err(io::Error::other);
            }
            let Some(body) = &mut self.stream else {
                return Ok(None);
            };
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        if self.buf.len() + d.len() > MAX_BUFFER {
                            return Err(other("session stream line too long"));
                        }
                        self.buf.extend_from_slice(&d);
                    }
                }
                Some(Err(e)) => return Err(io::Error::other(e)),
                None => {
                    self.stream = None;
                    return Ok(None);
                }
            }
        }
    }
}
