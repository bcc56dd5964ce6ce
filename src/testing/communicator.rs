use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::StatusCode;
use http_body::Body;
use hyper::body::Incoming;
use serde::{de::DeserializeOwned, Serialize};
use tower_service::Service;

use super::{
    client::Client,
    http_client::{self, HttpClient, HttpTransport},
    through,
};
use crate::{
    channel_layer::{BoxError, BoxFuture, ChannelLayer, InMemoryChannelLayer},
    consumer::{Connection, Decision, UpgradeSource},
    engine::{Probe, Progress, Runtime, Transport},
    message::{CloseCode, CloseFrame, Message, Utf8Bytes},
    route::RoutePattern,
    Scope, WebSocketLayer,
};

/// How long [`Communicator::receive`] waits by default.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long [`Communicator::receive_nothing`] listens.
const NOTHING_TIMEOUT: Duration = Duration::from_millis(100);

/// Tests a consumer without a network: Django's `WebsocketCommunicator`.
///
/// The consumer runs exactly as under the layer (same driver, limits and
/// channel layer); only the transport is an in-memory pipe, driven by a real
/// WebSocket client. [`through`](Self::through) runs the handshake through a
/// whole application instead (an axum `Router` with its layers), so its auth
/// middleware and routing are tested too.
///
/// Instead of sleeping until the consumer has acted on a message that gets
/// no reply, call [`wait_handled`](Self::wait_handled).
///
/// ```
/// use tower_channels::channel_layer::BoxError;
/// use tower_channels::consumer::{websocket_consumer, Context, WebSocketConsumer};
/// use tower_channels::message::Message;
/// use tower_channels::testing::Communicator;
///
/// struct Echo;
/// impl WebSocketConsumer for Echo {
///     async fn receive(&mut self, ctx: &mut Context, msg: Message) -> Result<(), BoxError> {
///         ctx.send(msg)?;
///         Ok(())
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let mut comm = Communicator::new(websocket_consumer(|_| Echo), "/ws/echo");
/// comm.connect().await.expect("accepted");
/// comm.send_text("hello").await;
/// assert_eq!(comm.receive_text().await.unwrap(), "hello");
/// assert!(comm.receive_nothing().await);
/// comm.disconnect(1000).await;
/// # });
/// ```
pub struct Communicator {
    start: Option<Start>,
    client: Option<Peer>,
    probe: Probe,
    /// Data messages sent to the consumer.
    sent: u64,
    layer: Option<Arc<dyn ChannelLayer>>,
}

enum Start {
    /// The consumer runs on an in-memory pipe, without HTTP.
    Direct {
        runtime: Arc<Runtime>,
        scope: Scope,
        consumer: Box<dyn FnOnce(Connection) -> BoxFuture<'static, ()> + Send>,
    },
    /// The handshake goes through a whole service (see [`Communicator::through`]).
    Through(BoxFuture<'static, Result<(Peer, Option<String>), Rejected>>),
}

/// The client's side: a WebSocket, or a session of the HTTP fallback.
#[derive(Debug)]
enum Peer {
    WebSocket(Client),
    Http(Box<HttpClient>),
}

impl Peer {
    async fn send(&mut self, message: Message) -> std::io::Result<()> {
        match self {
            Peer::WebSocket(c) => c.send(message).await,
            Peer::Http(c) => c.send(message).await,
        }
    }

    async fn next(&mut self) -> Option<std::io::Result<Message>> {
        match self {
            Peer::WebSocket(c) => c.next().await,
            Peer::Http(c) => c.next().await,
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Peer::WebSocket(c) => c.flush().await,
            Peer::Http(_) => Ok(()),
        }
    }
}

/// The consumer accepted the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Accepted {
    /// The subprotocol it chose.
    pub subprotocol: Option<String>,
}

/// The consumer (or the layer) refused the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rejected {
    /// The HTTP status the client would get.
    pub status: StatusCode,
    /// The response body.
    pub body: Bytes,
}

/// What went wrong while receiving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiveError {
    /// Nothing arrived in time.
    #[error("nothing received within {0:?}")]
    Timeout(Duration),
    /// The connection closed (with this close frame, if any).
    #[error("connection closed: {0:?}")]
    Closed(Option<CloseFrame>),
    /// A message of another kind arrived.
    #[error("unexpected message: {0:?}")]
    Unexpected(Message),
    /// The text was not the JSON expected.
    #[error("invalid JSON")]
    Json(#[source] serde_json::Error),
    /// The connection is not open (call `connect` first).
    #[error("not connected")]
    NotConnected,
}

impl Communicator {
    /// A communicator for `consumer` (any consumer service) and a GET of
    /// `path`, on a fresh [`InMemoryChannelLayer`].
    pub fn new<S>(consumer: S, path: &str) -> Self
    where
        S: Service<Connection> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
    {
        let request = http::Request::get(path)
            .body(())
            .unwrap_or_else(|_| http::Request::new(()));
        Self::with_request(
            consumer,
            path,
            request,
            Arc::new(InMemoryChannelLayer::new()),
        )
    }

    /// A communicator for `consumer` with a full request as scope (headers,
    /// extensions, subprotocols...), matched against the `route` pattern, on
    /// `layer` (share one layer between communicators to test groups).
    pub fn with_request<S>(
        mut consumer: S,
        route: &str,
        request: http::Request<()>,
        layer: Arc<dyn ChannelLayer>,
    ) -> Self
    where
        S: Service<Connection> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
    {
        let runtime = Arc::new(Runtime::new(layer.clone()));
        let probe = Probe::default();
        let scope = Scope::for_test(route, with_probe(request, &probe));
        Self {
            start: Some(Start::Direct {
                runtime,
                scope,
                consumer: Box::new(move |conn| {
                    Box::pin(async move {
                        if std::future::poll_fn(|cx| consumer.poll_ready(cx))
                            .await
                            .is_ok()
                        {
                            if let Err(e) = consumer.call(conn).await {
                                let e: BoxError = e.into();
                                tracing::error!(error = %e, "consumer failed");
                            }
                        }
                    })
                }),
            }),
            client: None,
            probe,
            sent: 0,
            layer: Some(layer),
        }
    }

    /// A communicator for the route of `layer` that matches `request`'s path,
    /// using the layer's channel layer and settings.
    ///
    /// # Panics
    ///
    /// If no route of `layer` matches the path.
    pub fn from_layer(layer: &WebSocketLayer, request: http::Request<()>) -> Self {
        let path = request.uri().path().to_owned();
        let (route, _) = layer
            .match_route(&path)
            .unwrap_or_else(|| panic!("no route of the layer matches {path:?}"));
        let consumer = route.consumer.clone();
        let pattern: RoutePattern = route.pattern.clone();
        let probe = Probe::default();
        let scope = Scope::for_test(pattern.as_str(), with_probe(request, &probe));
        Self {
            start: Some(Start::Direct {
                runtime: layer.runtime.clone(),
                scope,
                consumer: Box::new(move |conn| consumer(conn)),
            }),
            client: None,
            probe,
            sent: 0,
            layer: Some(layer.channel_layer()),
        }
    }

    /// A communicator whose handshake goes through `service`, a whole
    /// application: an axum `Router` with its layers, a
    /// [`WebSocketService`](crate::WebSocketService), anything
    /// `hyper` can serve. The request is sent as a real HTTP/1.1 upgrade over
    /// an in-memory connection, so outer middleware (auth putting a user in
    /// the extensions, nesting, CORS) runs as in production, and a refusal by
    /// any of it comes back as [`Rejected`] from [`connect`](Self::connect).
    ///
    /// `request` gives the path, headers (a token, `Origin`,
    /// `Sec-WebSocket-Protocol`) and extensions (a `ConnectInfo`, say: they
    /// are put back on the request the service receives); the upgrade
    /// headers are added. The client offers no compression.
    ///
    /// ```
    /// use tower_channels::consumer::{websocket_consumer, Accept, Context, Reject, WebSocketConsumer};
    /// use tower_channels::testing::Communicator;
    /// use tower_channels::WebSocketLayer;
    /// use tower_layer::Layer;
    ///
    /// struct Hello;
    /// impl WebSocketConsumer for Hello {
    ///     async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
    ///         ctx.send_text("hello")?;
    ///         Ok(Accept::new())
    ///     }
    /// }
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// // The application: the layer in front of an inner service (here one
    /// // that answers 404; an axum Router in a real app).
    /// let not_found = tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
    ///     Ok::<_, std::convert::Infallible>(
    ///         http::Response::builder().status(404).body(String::new()).unwrap(),
    ///     )
    /// });
    /// let app = WebSocketLayer::new()
    ///     .route("/ws/hello", websocket_consumer(|_| Hello))
    ///     .layer(not_found);
    ///
    /// let mut comm = Communicator::through(app.clone(), http::Request::get("/ws/hello").body(()).unwrap());
    /// comm.connect().await.expect("accepted");
    /// assert_eq!(comm.receive_text().await.unwrap(), "hello");
    ///
    /// let mut other = Communicator::through(app, http::Request::get("/nope").body(()).unwrap());
    /// assert_eq!(other.connect().await.unwrap_err().status, 404);
    /// # });
    /// ```
    pub fn through<S, B>(service: S, request: http::Request<()>) -> Self
    where
        S: Service<http::Request<Incoming>, Response = http::Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let probe = Probe::default();
        let handshake = through::handshake(service, request, probe.clone());
        let handshake = async move {
            let (client, protocol) = handshake.await?;
            Ok((Peer::WebSocket(client), protocol))
        };
        Self {
            start: Some(Start::Through(Box::pin(handshake))),
            client: None,
            probe,
            sent: 0,
            layer: None,
        }
    }

    /// A communicator that reaches the consumer through `service` by the
    /// HTTP fallback's `transport` (see
    /// [`HttpFallback`](crate::HttpFallback), which the application's layer
    /// must turn on) instead of a WebSocket: `connect` opens the session
    /// (`GET <path>?transport=...`), each `send` is a `POST`, `receive`
    /// reads the SSE / ndjson stream or long-polls, and `disconnect` is a
    /// `DELETE`. Every request goes through the whole application over an
    /// in-memory HTTP/1.1 connection, as with [`through`](Self::through).
    /// Pings do not exist over HTTP; [`wait_handled`](Self::wait_handled)
    /// works as for a WebSocket.
    ///
    /// ```
    /// use tower_channels::consumer::{websocket_consumer, Context, WebSocketConsumer};
    /// use tower_channels::message::Message;
    /// use tower_channels::testing::{Communicator, HttpTransport};
    /// use tower_channels::{BoxError, HttpFallback, WebSocketLayer};
    /// use tower_layer::Layer;
    ///
    /// struct Echo;
    /// impl WebSocketConsumer for Echo {
    ///     async fn receive(&mut self, ctx: &mut Context, msg: Message) -> Result<(), BoxError> {
    ///         ctx.send(msg)?;
    ///         Ok(())
    ///     }
    /// }
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let not_found = tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
    ///     Ok::<_, std::convert::Infallible>(
    ///         http::Response::builder().status(404).body(String::new()).unwrap(),
    ///     )
    /// });
    /// let app = WebSocketLayer::new()
    ///     .route("/ws/echo", websocket_consumer(|_| Echo))
    ///     .http_fallback(HttpFallback::new())
    ///     .layer(not_found);
    /// for transport in [HttpTransport::Sse, HttpTransport::Stream, HttpTransport::Poll] {
    ///     let request = http::Request::get("/ws/echo").body(()).unwrap();
    ///     let mut comm = Communicator::through_http(app.clone(), request, transport);
    ///     comm.connect().await.expect("accepted");
    ///     comm.send_text("hi").await;
    ///     assert_eq!(comm.receive_text().await.unwrap(), "hi");
    ///     comm.disconnect(1000).await;
    /// }
    /// # });
    /// ```
    pub fn through_http<S, B>(
        service: S,
        mut request: http::Request<()>,
        transport: HttpTransport,
    ) -> Self
    where
        S: Service<http::Request<Incoming>, Response = http::Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let probe = Probe::default();
        request.extensions_mut().insert(probe.clone());
        let open = async move {
            let (client, protocol) = http_client::open(service, request, transport).await?;
            Ok((Peer::Http(Box::new(client)), protocol))
        };
        Self {
            start: Some(Start::Through(Box::pin(open))),
            client: None,
            probe,
            sent: 0,
            layer: None,
        }
    }

    /// The channel layer the consumer uses; `None` for a communicator made
    /// with [`through`](Self::through) (use the one the application's
    /// `WebSocketLayer` was given).
    pub fn channel_layer(&self) -> Option<&Arc<dyn ChannelLayer>> {
        self.layer.as_ref()
    }

    /// Runs the handshake: the consumer's `connect` decides.
    ///
    /// # Panics
    ///
    /// If called twice.
    pub async fn connect(&mut self) -> Result<Accepted, Rejected> {
        let start = self
            .start
            .take()
            .expect("Communicator::connect called twice");
        let (runtime, scope, consumer) = match start {
            Start::Direct {
                runtime,
                scope,
                consumer,
            } => (runtime, scope, consumer),
            Start::Through(handshake) => {
                let (client, subprotocol) = handshake.await?;
                self.client = Some(client);
                return Ok(Accepted { subprotocol });
            }
        };
        let (server, client) = tokio::io::duplex(64 * 1024);
        let (rx, host) = Connection::start(
            scope,
            runtime,
            UpgradeSource::Ready(Transport::Duplex(server)),
            // The in-memory client does not offer compression.
            None,
            consumer,
        );
        tokio::spawn(host);
        match rx.await {
            Ok(Decision::Accept { protocol, .. }) => {
                self.client = Some(Peer::WebSocket(Client::new(client)));
                Ok(Accepted {
                    subprotocol: protocol,
                })
            }
            Ok(Decision::Reject(res)) => Err(Rejected {
                status: res.status(),
                body: res.into_body(),
            }),
            Err(_) => Err(Rejected {
                status: StatusCode::FORBIDDEN,
                body: Bytes::from_static(b"connection rejected"),
            }),
        }
    }

    fn client(&mut self) -> &mut Peer {
        self.client
            .as_mut()
            .expect("the communicator is not connected: call connect() first")
    }

    /// Sends a message to the consumer.
    ///
    /// # Panics
    ///
    /// If not connected, or if the consumer's side is gone.
    pub async fn send(&mut self, message: impl Into<Message>) {
        let m = message.into();
        if matches!(m, Message::Text(_) | Message::Binary(_)) {
            self.sent += 1;
        }
        self.client()
            .send(m)
            .await
            .unwrap_or_else(|e| panic!("send to consumer failed: {e}"));
    }

    /// Sends a text message.
    pub async fn send_text(&mut self, text: impl Into<Utf8Bytes>) {
        self.send(Message::Text(text.into())).await;
    }

    /// Sends a binary message.
    pub async fn send_binary(&mut self, data: impl Into<Bytes>) {
        self.send(Message::Binary(data.into())).await;
    }

    /// Sends `value` as a JSON text message.
    ///
    /// # Panics
    ///
    /// If `value` cannot be serialized.
    pub async fn send_json<T: Serialize + ?Sized>(&mut self, value: &T) {
        let text = serde_json::to_string(value).expect("value serializes to JSON");
        self.send_text(text).await;
    }

    /// The next message, waiting at most 1 s. A close from the
    /// consumer is returned as [`Message::Close`].
    pub async fn receive(&mut self) -> Result<Message, ReceiveError> {
        self.receive_timeout(DEFAULT_TIMEOUT).await
    }

    /// The next message, waiting at most `timeout`.
    pub async fn receive_timeout(&mut self, timeout: Duration) -> Result<Message, ReceiveError> {
        let client = self.client.as_mut().ok_or(ReceiveError::NotConnected)?;
        loop {
            let next = tokio::time::timeout(timeout, client.next())
                .await
                .map_err(|_| ReceiveError::Timeout(timeout))?;
            match next {
                // The client answers pings and the close itself, as a
                // browser would, so the consumer can finish.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => {
                    let _ = client.flush().await;
                    return Ok(m);
                }
                Some(Err(_)) | None => return Err(ReceiveError::Closed(None)),
            }
        }
    }

    /// The next message, which must be text.
    pub async fn receive_text(&mut self) -> Result<String, ReceiveError> {
        match self.receive().await? {
            Message::Text(t) => Ok(t.as_str().to_owned()),
            Message::Close(c) => Err(ReceiveError::Closed(c)),
            other => Err(ReceiveError::Unexpected(other)),
        }
    }

    /// The next message, which must be binary.
    pub async fn receive_binary(&mut self) -> Result<Bytes, ReceiveError> {
        match self.receive().await? {
            Message::Binary(b) => Ok(b),
            Message::Close(c) => Err(ReceiveError::Closed(c)),
            other => Err(ReceiveError::Unexpected(other)),
        }
    }

    /// The next message, which must be JSON text decoding into `T`.
    pub async fn receive_json<T: DeserializeOwned>(&mut self) -> Result<T, ReceiveError> {
        let text = self.receive_text().await?;
        serde_json::from_str(&text).map_err(ReceiveError::Json)
    }

    /// The next message, which must be a close; returns its code (1005 if none).
    pub async fn receive_close(&mut self) -> Result<CloseCode, ReceiveError> {
        match self.receive().await? {
            Message::Close(c) => Ok(c.map_or(crate::message::close_code::STATUS, |c| c.code)),
            other => Err(ReceiveError::Unexpected(other)),
        }
    }

    /// Whether nothing arrives within 100 ms (Django's `receive_nothing`).
    pub async fn receive_nothing(&mut self) -> bool {
        matches!(
            self.receive_timeout(NOTHING_TIMEOUT).await,
            Err(ReceiveError::Timeout(_))
        )
    }

    /// Closes the connection with `code` and waits until the consumer's
    /// `disconnect` has run and its task ended.
    pub async fn disconnect(mut self, code: CloseCode) {
        if let Some(mut client) = self.client.take() {
            let frame = CloseFrame::new(code, "");
            let _ = client.send(Message::Close(Some(frame))).await;
            // Read until the consumer's side finishes the closing handshake.
            while let Ok(Some(Ok(_))) = tokio::time::timeout(DEFAULT_TIMEOUT, client.next()).await {
            }
        }
        self.wait_finished(DEFAULT_TIMEOUT * 5).await;
    }

    /// Waits until the consumer's task has ended (e.g. after it closed the
    /// connection itself), at most `timeout`; returns whether it ended.
    /// `true` at once if no connection was started.
    pub async fn wait_finished(&mut self, timeout: Duration) -> bool {
        if !self.probe.progress().started {
            return true;
        }
        self.wait_for(timeout, |p| p.finished).await.finished
    }

    /// Waits until the consumer has handled every message sent to it so far:
    /// its `receive` for the last one returned (a raw consumer: it asked for
    /// the next message), without the consumer having to answer. Use it where
    /// a test would otherwise sleep before looking at what a message did (a
    /// database row, a counter, another connection's inbox). Returns `false`
    /// if that did not happen within 1 s or the connection
    /// ended first.
    ///
    /// ```
    /// use std::sync::{atomic::{AtomicUsize, Ordering}, Arc};
    /// use tower_channels::channel_layer::BoxError;
    /// use tower_channels::consumer::{websocket_consumer, Context, WebSocketConsumer};
    /// use tower_channels::message::Message;
    /// use tower_channels::testing::Communicator;
    ///
    /// struct Count(Arc<AtomicUsize>);
    /// impl WebSocketConsumer for Count {
    ///     async fn receive(&mut self, _: &mut Context, _: Message) -> Result<(), BoxError> {
    ///         tokio::task::yield_now().await; // some work, e.g. a database write
    ///         self.0.fetch_add(1, Ordering::SeqCst);
    ///         Ok(())
    ///     }
    /// }
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let seen = Arc::new(AtomicUsize::new(0));
    /// let counter = seen.clone();
    /// let mut comm = Communicator::new(websocket_consumer(move |_| Count(counter.clone())), "/ws");
    /// comm.connect().await.unwrap();
    /// comm.send_text("one").await;
    /// comm.send_text("two").await;
    /// assert!(comm.wait_handled().await);
    /// assert_eq!(seen.load(Ordering::SeqCst), 2);
    /// # });
    /// ```
    pub async fn wait_handled(&mut self) -> bool {
        let sent = self.sent;
        let handled = move |p: Progress| p.taken >= sent && p.waiting;
        handled(
            self.wait_for(DEFAULT_TIMEOUT, move |p| p.finished || handled(p))
                .await,
        )
    }

    async fn wait_for(&self, timeout: Duration, done: impl Fn(Progress) -> bool) -> Progress {
        let probe = self.probe.clone();
        match tokio::time::timeout(timeout, probe.wait_for(done)).await {
            Ok(p) => p,
            Err(_) => self.probe.progress(),
        }
    }
}

impl fmt::Debug for Communicator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Communicator")
            .field("connected", &self.client.is_some())
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

/// `request` with `probe` in its extensions, where the engine finds it.
fn with_probe(mut request: http::Request<()>, probe: &Probe) -> http::Request<()> {
    request.extensions_mut().insert(probe.clone());
    request
}
