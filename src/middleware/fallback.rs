//! The HTTP fallback's requests (see [`HttpFallback`](crate::HttpFallback)):
//! opening a session (`GET ?transport=sse|stream|poll`, or `Accept:
//! text/event-stream`), long-polls, `POST`s and `DELETE`s to a session.
//! The sessions themselves run on the engine (`engine::http`); this module
//! turns requests into calls on them and answers with a status.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::sync::oneshot;

use super::WebSocketLayer;
use crate::{
    channel_layer::{BoxError, BoxFuture},
    consumer::{Decision, UpgradeSource},
    engine::http::{
        position_from_event_id, remote_delete, remote_poll, remote_post, HttpKind, HttpOpen,
        PollWaiter, Session, SessionBody, Sessions,
    },
    handshake::{
        self,
        rejection::{ConnectionRejected, ConsumerFailed, InvalidSubprotocols, OriginNotAllowed},
        HandshakeRejection,
    },
    message::{Message, Utf8Bytes},
    scope::query_param,
};

/// The body of an HTTP fallback response: a short one, or a session's stream.
#[derive(Debug)]
pub(crate) enum HttpBody {
    Full(Bytes),
    Session(SessionBody),
}

pub(crate) type HttpResponse = Response<HttpBody>;

/// What an HTTP fallback request asks for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum HttpRequest {
    Open(HttpKind),
    Poll,
    Post,
    Delete,
}

/// Whether `req` is an HTTP fallback request (header and query lookups only).
pub(crate) fn classify<B>(req: &Request<B>) -> Option<HttpRequest> {
    let query = req.uri().query().unwrap_or("");
    let has_session = query_param(query, "session").is_some();
    let transport = query_param(query, "transport");
    match *req.method() {
        Method::GET if has_session => {
            (transport.as_deref() == Some("poll")).then_some(HttpRequest::Poll)
        }
        Method::GET => match transport {
            Some(t) => HttpKind::parse(&t).map(HttpRequest::Open),
            None => req
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .any(|v| {
                    v.to_str()
                        .is_ok_and(|s| s.to_ascii_lowercase().contains("text/event-stream"))
                })
                .then_some(HttpRequest::Open(HttpKind::Sse)),
        },
        Method::POST if has_session => Some(HttpRequest::Post),
        Method::DELETE if has_session => Some(HttpRequest::Delete),
        _ => None,
    }
}

/// A plain-text answer.
fn status(code: StatusCode, reason: &'static str) -> HttpResponse {
    let mut res = Response::new(HttpBody::Full(Bytes::from_static(reason.as_bytes())));
    *res.status_mut() = code;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if code == StatusCode::TOO_MANY_REQUESTS || code == StatusCode::SERVICE_UNAVAILABLE {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    res
}

fn no_content() -> HttpResponse {
    let mut res = Response::new(HttpBody::Full(Bytes::new()));
    *res.status_mut() = StatusCode::NO_CONTENT;
    res
}

fn rejection(r: impl Into<HandshakeRejection>) -> HttpResponse {
    r.into().into_response().map(HttpBody::Full)
}

/// `frames`, a JSON array, as a long-poll answer.
fn frames(frames: Bytes) -> HttpResponse {
    let mut res = Response::new(HttpBody::Full(frames));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

const FORGED: &str =
    "invalid session token (every process of a deployment must share the HttpFallback secret)";

/// The session a request names, with its token checked.
#[allow(clippy::result_large_err)]
fn session_of(sessions: &Sessions, query: &str) -> Result<String, HttpResponse> {
    let Some(id) = query_param(query, "session").filter(|s| !s.is_empty()) else {
        return Err(status(StatusCode::BAD_REQUEST, "missing session"));
    };
    let token = query_param(query, "token").unwrap_or_default();
    if !sessions.verify(&id, &token) {
        return Err(status(StatusCode::FORBIDDEN, FORGED));
    }
    Ok(id)
}

impl WebSocketLayer {
    /// Serves an HTTP fallback request on `route`.
    pub(crate) fn serve_http<B>(
        &self,
        sessions: Arc<Sessions>,
        what: HttpRequest,
        req: Request<B>,
    ) -> BoxFuture<'static, HttpResponse>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let runtime = self.runtime.clone();
        let (parts, body) = req.into_parts();
        // The origin policy holds for every request to a session, not only
        // the opening one (a cross-site page must not POST into it).
        if !runtime.origins.allows(&parts) {
            if matches!(what, HttpRequest::Open(_)) {
                runtime.metrics.rejected();
            }
            return Box::pin(std::future::ready(rejection(OriginNotAllowed)));
        }
        let req = Request::from_parts(parts, body);
        // How long a process that does not hold the session waits for the
        // one that does (through the channel layer) before answering 404.
        let wait = runtime.config.close_timeout;
        match what {
            HttpRequest::Open(kind) => match self.open_session(sessions, kind, req) {
                Ok(fut) => fut,
                Err(r) => {
                    runtime.metrics.rejected();
                    tracing::debug!(%r, "HTTP session refused");
                    Box::pin(std::future::ready(rejection(r)))
                }
            },
            HttpRequest::Poll => {
                let query = req.uri().query().unwrap_or("").to_owned();
                Box::pin(async move {
                    let id = match session_of(&sessions, &query) {
                        Ok(id) => id,
                        Err(r) => return r,
                    };
                    let ack = match query_param(&query, "ack").map(|a| a.parse::<u64>()) {
                        None => 0,
                        Some(Ok(a)) => a,
                        Some(Err(_)) => return status(StatusCode::BAD_REQUEST, "invalid ack"),
                    };
                    let timeout = sessions.config.poll_timeout;
                    match sessions.get(&id) {
                        Some(s) => match local_poll(&s, ack, timeout).await {
                            Some(f) => frames(f),
                            None => {
                                sessions.remove(&id);
                                status(StatusCode::NOT_FOUND, "unknown or closed session")
                            }
                        },
                        None => {
                            match remote_poll(&*runtime.channel_layer, &id, ack, wait, timeout)
                                .await
                            {
                                Some(f) => frames(f),
                                None => status(StatusCode::NOT_FOUND, "unknown or closed session"),
                            }
                        }
                    }
                })
            }
            HttpRequest::Post => {
                let (parts, body) = req.into_parts();
                let max = runtime.config.max_message_size;
                Box::pin(async move {
                    let query = parts.uri.query().unwrap_or("");
                    let id = match session_of(&sessions, query) {
                        Ok(id) => id,
                        Err(r) => return r,
                    };
                    let Some(seq) = query_param(query, "seq")
                        .and_then(|s| s.parse::<u64>().ok())
                        .filter(|s| *s > 0)
                    else {
                        return status(StatusCode::BAD_REQUEST, "missing or invalid seq");
                    };
                    if runtime.tracker.is_shutting_down() {
                        return status(StatusCode::SERVICE_UNAVAILABLE, "server is shutting down");
                    }
                    let message = match read_message(&parts.headers, body, max).await {
                        Ok(m) => m,
                        Err(r) => return r,
                    };
                    let outcome = match sessions.get(&id) {
                        Some(s) => Some(s.post(seq, message)),
                        None => {
                            remote_post(&*runtime.channel_layer, &id, seq, &message, wait).await
                        }
                    };
                    match outcome {
                        Some(o) => match o.status() {
                            StatusCode::NO_CONTENT => no_content(),
                            StatusCode::CONFLICT => {
                                status(StatusCode::CONFLICT, "sequence gap: the session is closed")
                            }
                            StatusCode::TOO_MANY_REQUESTS => status(
                                StatusCode::TOO_MANY_REQUESTS,
                                "session inbox full; retry the same seq",
                            ),
                            _ => status(StatusCode::NOT_FOUND, "unknown or closed session"),
                        },
                        None => status(StatusCode::NOT_FOUND, "unknown or closed session"),
                    }
                })
            }
            HttpRequest::Delete => {
                let query = req.uri().query().unwrap_or("").to_owned();
                Box::pin(async move {
                    let id = match session_of(&sessions, &query) {
                        Ok(id) => id,
                        Err(r) => return r,
                    };
                    let closed = match sessions.get(&id) {
                        Some(s) => s.delete(),
                        None => remote_delete(&*runtime.channel_layer, &id, wait).await,
                    };
                    if closed {
                        no_content()
                    } else {
                        status(StatusCode::NOT_FOUND, "unknown or closed session")
                    }
                })
            }
        }
    }

    /// Opens a session: the consumer's `connect` decides, as for a handshake.
    fn open_session<B>(
        &self,
        sessions: Arc<Sessions>,
        kind: HttpKind,
        req: Request<B>,
    ) -> Result<BoxFuture<'static, HttpResponse>, HandshakeRejection> {
        let (mut parts, _body) = req.into_parts();
        let (route, params) = self
            .match_route(parts.uri.path())
            .ok_or(HandshakeRejection::from(ConnectionRejected))?;
        self.admit(&parts)?;
        let runtime = &self.runtime;
        let protocols =
            handshake::parse_subprotocols(&parts.headers, runtime.config.max_subprotocols)
                .ok_or(InvalidSubprotocols)?;
        if kind == HttpKind::Sse {
            resume_from_last_event_id(&mut parts);
        }
        let (open, ready) = HttpOpen::new(kind, sessions);
        let route = route.clone();
        let decision = self.spawn_connection(
            &route,
            params,
            parts,
            protocols,
            UpgradeSource::Http(open),
            None,
        );
        Ok(Box::pin(async move {
            let headers = match decision.await {
                Ok(Decision::Accept { headers, .. }) => headers,
                Ok(Decision::Reject(res)) => return res.map(HttpBody::Full),
                Err(_) => return rejection(ConnectionRejected),
            };
            let Ok(session) = ready.await else {
                return rejection(ConsumerFailed);
            };
            session_response(kind, session, headers).await
        }))
    }
}

/// The answer to an opening `GET`.
async fn session_response(kind: HttpKind, session: Arc<Session>, extra: HeaderMap) -> HttpResponse {
    let mut res = match kind {
        HttpKind::Poll => match local_poll(&session, 0, Duration::ZERO).await {
            Some(f) => frames(f),
            None => rejection(ConsumerFailed),
        },
        HttpKind::Sse | HttpKind::Stream => {
            let mut res = Response::new(HttpBody::Session(SessionBody::new(session)));
            let h = res.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(if kind == HttpKind::Sse {
                    "text/event-stream"
                } else {
                    "application/x-ndjson"
                }),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            h.insert("x-accel-buffering", HeaderValue::from_static("no"));
            res
        }
    };
    for (name, value) in extra {
        if let Some(name) = name {
            res.headers_mut().append(name, value);
        }
    }
    res
}

/// A long-poll of a session this process holds: the frames after `ack`,
/// `[]` after `timeout`, `None` when the session is over and drained.
async fn local_poll(session: &Session, ack: u64, timeout: Duration) -> Option<Bytes> {
    let (tx, rx) = oneshot::channel();
    if !session.poll(ack, PollWaiter::Local(tx)) {
        return None;
    }
    let empty = Bytes::from_static(b"[]");
    if timeout.is_zero() {
        // The opening poll: the `open` frame is always there.
        return Some(rx.await.unwrap_or(empty));
    }
    Some(match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(f)) => f,
        _ => empty,
    })
}

/// A `POST` body as one message: binary for `application/octet-stream`,
/// else text (which must be UTF-8); at most `max` bytes.
#[allow(clippy::result_large_err)]
async fn read_message<B>(headers: &HeaderMap, body: B, max: usize) -> Result<Message, HttpResponse>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let too_large = || {
        status(
            StatusCode::PAYLOAD_TOO_LARGE,
            "message larger than max_message_size",
        )
    };
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|n| n > max as u64)
    {
        return Err(too_large());
    }
    let bytes = match Limited::new(body, max).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Err(_) => {
            return Err(status(
                StatusCode::BAD_REQUEST,
                "could not read the request body",
            ))
        }
    };
    let binary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/octet-stream"))
        });
    if binary {
        return Ok(Message::Binary(bytes));
    }
    Utf8Bytes::try_from_bytes(bytes)
        .map(Message::Text)
        .map_err(|_| status(StatusCode::BAD_REQUEST, "text message is not valid UTF-8"))
}

/// An SSE reconnection (`EventSource` sends `Last-Event-ID`) without
/// `offset` and `epoch` in its query resumes from the event id: both are
/// added to the query the consumer sees.
fn resume_from_last_event_id(parts: &mut http::request::Parts) {
    let query = parts.uri.query().unwrap_or("");
    if query_param(query, "offset").is_some() || query_param(query, "epoch").is_some() {
        return;
    }
    let Some((offset, epoch)) = parts
        .headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(position_from_event_id)
    else {
        return;
    };
    let epoch = percent_encoding::utf8_percent_encode(epoch, percent_encoding::NON_ALPHANUMERIC);
    let sep = if query.is_empty() { "" } else { "&" };
    let pq = format!(
        "{}?{query}{sep}offset={offset}&epoch={epoch}",
        parts.uri.path()
    );
    let mut uri = http::uri::Parts::from(parts.uri.clone());
    if let Ok(pq) = pq.parse() {
        uri.path_and_query = Some(pq);
        if let Ok(u) = http::Uri::from_parts(uri) {
            parts.uri = u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify_of(method: &str, uri: &str, accept: Option<&str>) -> Option<&'static str> {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(a) = accept {
            b = b.header("accept", a);
        }
        classify(&b.body(()).unwrap()).map(|r| match r {
            HttpRequest::Open(HttpKind::Sse) => "sse",
            HttpRequest::Open(HttpKind::Stream) => "stream",
            HttpRequest::Open(HttpKind::Poll) => "poll-open",
            HttpRequest::Poll => "poll",
            HttpRequest::Post => "post",
            HttpRequest::Delete => "delete",
        })
    }

    #[test]
    fn classifies_only_fallback_requests() {
        assert_eq!(classify_of("GET", "/ws?transport=sse", None), Some("sse"));
        assert_eq!(
            classify_of("GET", "/ws?a=1&transport=stream", None),
            Some("stream")
        );
        assert_eq!(
            classify_of("GET", "/ws?transport=poll", None),
            Some("poll-open")
        );
        assert_eq!(
            classify_of("GET", "/ws?session=s&token=t&transport=poll&ack=3", None),
            Some("poll")
        );
        assert_eq!(
            classify_of("GET", "/ws", Some("text/event-stream")),
            Some("sse")
        );
        assert_eq!(
            classify_of("POST", "/ws?session=s&seq=1", None),
            Some("post")
        );
        assert_eq!(classify_of("DELETE", "/ws?session=s", None), Some("delete"));
        // Everything else goes to the inner service.
        assert_eq!(classify_of("GET", "/ws", Some("text/html")), None);
        assert_eq!(
            classify_of("GET", "/ws?transport=carrier-pigeon", None),
            None
        );
        assert_eq!(classify_of("GET", "/ws?session=app-own-param", None), None);
        assert_eq!(classify_of("POST", "/ws", None), None);
        assert_eq!(classify_of("PUT", "/ws?session=s", None), None);
    }

    #[test]
    fn last_event_id_resumes_only_without_a_position() {
        let parts = |uri: &str, id: &str| {
            let (mut p, ()) = Request::get(uri)
                .header("last-event-id", id)
                .body(())
                .unwrap()
                .into_parts();
            resume_from_last_event_id(&mut p);
            p.uri.to_string()
        };
        assert_eq!(parts("/ws/r", "e1:5"), "/ws/r?offset=5&epoch=e1");
        assert_eq!(
            parts("/ws/r?u=a", "e:1:5"),
            "/ws/r?u=a&offset=5&epoch=e%3A1"
        );
        assert_eq!(
            parts("/ws/r?offset=1&epoch=x", "e1:5"),
            "/ws/r?offset=1&epoch=x"
        );
        assert_eq!(parts("/ws/r", "garbage"), "/ws/r");
    }
}
