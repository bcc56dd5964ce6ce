//! HTTP session transports: Server-Sent Events, HTTP-streaming (ndjson) and
//! long-polling, for clients that cannot open a WebSocket.
//!
//! An HTTP session is one more kind of [`Peer`](super::Peer) under the same
//! engine: the consumer, the outbound queue, the budget and slow-client
//! policy, heartbeats, the idle timeout, the limits, the rate limit,
//! shutdown and the counters are the WebSocket's, unchanged. Only the two
//! ends differ:
//!
//! * **out**: what the engine writes is rendered (`render`) into a
//!   response body (SSE / ndjson) or into the long-poll buffer of frames not
//!   yet acknowledged, both bounded by [`HttpFallback::buffer_size`] bytes
//!   (past it the engine stops moving messages and the outbound budget
//!   takes over, as for a WebSocket whose socket is full);
//! * **in**: each `POST` to the session is one message, numbered by the
//!   client (`seq`), queued in the session's inbox up to the connection's
//!   read-ahead limits (`429` past them) and read by the engine as it reads
//!   a socket.
//!
//! A request that lands on a process which does not hold the session is
//! handed over through the channel layer: every session has a control
//! channel of its own (its name is the session id) which the engine polls
//! itself, so the consumer never sees these requests, and they are served
//! even while the application is busy or never reads its events.
//!
//! The wire format is the contract with the JavaScript client
//! (`HTTP-PROTOCOL.md` in the repository, and the README).
//!
//! The public face is [`HttpFallback`](crate::HttpFallback) (with an example).

mod peer;
mod remote;
mod render;
mod session;
mod token;

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

pub(crate) use self::{
    peer::{HttpOpen, HttpPeer},
    remote::{remote_delete, remote_poll, remote_post},
    render::position_from_event_id,
    session::{PollWaiter, Session, SessionBody},
};

/// Which HTTP transport a session uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HttpKind {
    /// Server-Sent Events (`text/event-stream`).
    Sse,
    /// HTTP-streaming: one JSON object per line (`application/x-ndjson`).
    Stream,
    /// Long-polling: JSON arrays of frames, acknowledged by the next poll.
    Poll,
}

impl HttpKind {
    /// The `transport` query value.
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "sse" => Some(Self::Sse),
            "stream" => Some(Self::Stream),
            "poll" => Some(Self::Poll),
            _ => None,
        }
    }

    /// The name used in the protocol and as the metrics' `transport` label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Sse => "sse",
            Self::Stream => "stream",
            Self::Poll => "poll",
        }
    }
}

/// The HTTP fallback of a [`WebSocketLayer`](crate::WebSocketLayer):
/// Server-Sent Events, HTTP-streaming and long-polling sessions for the same
/// consumers, for clients that cannot open a WebSocket (see
/// [`WebSocketLayer::http_fallback`](crate::WebSocketLayer::http_fallback)).
///
/// | setting | default |
/// |---|---|
/// | [`secret`](Self::secret) | random per process |
/// | [`poll_timeout`](Self::poll_timeout) | 25 s |
/// | [`buffer_size`](Self::buffer_size) | 64 KiB |
///
/// Session tokens are HMAC-SHA256 of the session id under the secret, so
/// every process of a deployment checks them locally; the processes behind
/// one load balancer must therefore share the secret (the default, random
/// per process, only suits a single process: a request carried to another
/// process is refused with `403`).
///
/// ```
/// use std::time::Duration;
/// use tower_channels::{
///     consumer::{websocket_consumer, Context, WebSocketConsumer},
///     message::Message,
///     BoxError, HttpFallback, WebSocketLayer,
/// };
///
/// struct Echo;
///
/// impl WebSocketConsumer for Echo {
///     async fn receive(&mut self, ctx: &mut Context, msg: Message) -> Result<(), BoxError> {
///         ctx.send(msg)?;
///         Ok(())
///     }
/// }
///
/// // `GET /ws/echo?transport=sse` (or `Accept: text/event-stream`) now opens
/// // an SSE session on the same consumer; `POST`s to it are its messages.
/// let layer = WebSocketLayer::new()
///     .route("/ws/echo", websocket_consumer(|_| Echo))
///     .http_fallback(
///         HttpFallback::new()
///             .secret(b"the same secret on every process".to_vec())
///             .poll_timeout(Duration::from_secs(20)),
///     );
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct HttpFallback {
    secret: Arc<[u8]>,
    poll_timeout: Duration,
    buffer_size: usize,
}

impl Default for HttpFallback {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for HttpFallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpFallback")
            .field("secret", &"..")
            .field("poll_timeout", &self.poll_timeout)
            .field("buffer_size", &self.buffer_size)
            .finish()
    }
}

impl HttpFallback {
    /// The defaults: a random secret (one process only), a 25 s poll
    /// timeout and 64 KiB of buffered output per session.
    ///
    /// # Panics
    ///
    /// If the operating system has no random source for the secret.
    pub fn new() -> Self {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).expect("no random source for the HTTP fallback secret");
        Self {
            secret: Arc::from(&secret[..]),
            poll_timeout: Duration::from_secs(25),
            buffer_size: 64 << 10,
        }
    }

    /// The key session tokens are signed with. Every process serving the
    /// same sessions (behind one load balancer) must use the same secret.
    pub fn secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.secret = Arc::from(secret.into());
        self
    }

    /// How long a long-poll request waits for a frame before it is
    /// answered with an empty array.
    pub fn poll_timeout(mut self, timeout: Duration) -> Self {
        self.poll_timeout = timeout;
        self
    }

    /// The most output a session holds rendered and not yet taken by the
    /// client (the response body's buffer, or the long-poll frames not yet
    /// acknowledged), plus at most one message; further output waits in the
    /// connection's outbound queue, under its
    /// [budget](crate::WebSocketConfig#slow-clients).
    pub fn buffer_size(mut self, bytes: usize) -> Self {
        self.buffer_size = bytes.max(1);
        self
    }

    /// The long-poll timeout (see [`poll_timeout`](Self::poll_timeout)).
    pub fn get_poll_timeout(&self) -> Duration {
        self.poll_timeout
    }

    /// The session buffer (see [`buffer_size`](Self::buffer_size)).
    pub fn get_buffer_size(&self) -> usize {
        self.buffer_size
    }
}

/// A layer's HTTP sessions held by this process, and their settings.
#[derive(Debug)]
pub(crate) struct Sessions {
    pub(crate) config: HttpFallback,
    map: Mutex<HashMap<String, Arc<Session>>>,
}

impl Sessions {
    pub(crate) fn new(config: HttpFallback) -> Self {
        Self {
            config,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Session>>> {
        // Inserts and removals only: a poisoned map is still consistent.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session `id`, if this process holds it.
    pub(crate) fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.map().get(id).cloned()
    }

    pub(crate) fn insert(&self, session: Arc<Session>) {
        self.map().insert(session.id().to_owned(), session);
    }

    pub(crate) fn remove(&self, id: &str) {
        self.map().remove(id);
    }

    /// The token of session `id`.
    pub(crate) fn token(&self, id: &str) -> String {
        token::sign(&self.config.secret, id)
    }

    /// Whether `token` is the token of session `id`.
    pub(crate) fn verify(&self, id: &str, token: &str) -> bool {
        token::verify(&self.config.secret, id, token)
    }
}
