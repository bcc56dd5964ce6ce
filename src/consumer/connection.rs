use std::{fmt, sync::Arc};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::sync::oneshot;

use super::WebSocket;
use crate::{
    channel_layer::{BoxError, BoxFuture, ChannelLayer},
    engine::{
        http::HttpOpen, wire::DeflateParams, Engine, Host, Link, Peer, Probe, Runtime, Slot,
        Socket, Transport,
    },
    handshake::rejection::{ConsumerFailed, HandshakeRejection},
    Error, Scope,
};

/// How a connection attempt gets its transport once the handshake is answered.
pub(crate) enum UpgradeSource {
    /// hyper hands over the upgraded connection after the 101/200 response.
    Hyper(hyper::upgrade::OnUpgrade),
    /// An in-process transport (the test [`Communicator`](crate::testing::Communicator)).
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    Ready(Transport),
    /// An HTTP fallback session (SSE, HTTP-streaming, long-poll), created
    /// on accept.
    Http(HttpOpen),
}

/// What the consumer decided about the handshake.
pub(crate) enum Decision {
    Accept {
        protocol: Option<String>,
        headers: HeaderMap,
    },
    Reject(http::Response<Bytes>),
}

/// A WebSocket handshake waiting for its consumer's decision: the request
/// every consumer [`Service`](tower_service::Service) is called with.
///
/// Inspect the [`scope`](Self::scope), then [`accept`](Self::accept) it (the
/// client gets `101 Switching Protocols`, you get a [`WebSocket`]) or
/// [`reject`](Self::reject) it with an HTTP status. Dropping it undecided
/// rejects with 403, as closing before `accept()` does in Django.
pub struct Connection {
    pub(crate) scope: Scope,
    pub(crate) runtime: Arc<Runtime>,
    upgrade: Option<UpgradeSource>,
    decision: Option<oneshot::Sender<Decision>>,
    /// Created with the channel (on accept, or earlier by `channel_name`).
    link: Option<Arc<Link>>,
    /// Where `accept` leaves the engine for the connection task's [`Host`].
    slot: Arc<Slot>,
    /// permessage-deflate as negotiated from the request, with the
    /// response's `Sec-WebSocket-Extensions` value.
    deflate: Option<(DeflateParams, HeaderValue)>,
}

impl Connection {
    /// The one constructor: a connection attempt for `consumer`, and the
    /// task that runs it (the consumer's future and, once accepted, the
    /// engine). The receiver gets the consumer's decision.
    pub(crate) fn start(
        scope: Scope,
        runtime: Arc<Runtime>,
        upgrade: UpgradeSource,
        deflate: Option<(DeflateParams, HeaderValue)>,
        consumer: impl FnOnce(Connection) -> BoxFuture<'static, ()>,
    ) -> (oneshot::Receiver<Decision>, Host) {
        let (tx, rx) = oneshot::channel();
        let slot = Arc::new(Slot::default());
        let probe = scope.extensions().get::<Probe>().cloned();
        let conn = Connection {
            scope,
            runtime: runtime.clone(),
            upgrade: Some(upgrade),
            decision: Some(tx),
            link: None,
            slot: slot.clone(),
            deflate,
        };
        let app = consumer(conn);
        (rx, Host::new(runtime, slot, app, probe))
    }

    /// This connection's shared state, creating its channel if needed.
    pub(crate) async fn link(&mut self) -> Result<&Arc<Link>, Error> {
        if self.link.is_none() {
            let inbox = self.runtime.channel_layer.new_channel().await?;
            let probe = self.scope.extensions().get::<Probe>().cloned();
            self.link = Some(Link::new(self.runtime.clone(), inbox, probe));
        }
        self.link.as_ref().ok_or_else(Error::closed)
    }

    /// The request that opened the connection.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The channel layer this connection uses.
    pub fn channel_layer(&self) -> &Arc<dyn ChannelLayer> {
        &self.runtime.channel_layer
    }

    /// Creates this connection's channel now (it is otherwise created on
    /// accept) and returns its name, so `connect` code can join groups first.
    pub async fn channel_name(&mut self) -> Result<&str, Error> {
        Ok(self.link().await?.channel_name())
    }

    /// Accepts the handshake and waits for the upgraded connection.
    ///
    /// Fails if the chosen subprotocol was not offered by the client (the
    /// client then gets 500: a browser would fail the connection anyway), if
    /// the channel layer cannot create a channel, or if the client went away.
    pub async fn accept(self, accept: Accept) -> Result<WebSocket, Error> {
        let scope = self.scope.clone();
        let protocol = accept.subprotocol.clone();
        let link = self.accept_engine(accept).await?;
        Ok(WebSocket::new(link.app_handle(), scope, protocol))
    }

    /// Accepts and hands the engine to the connection task; returns the link.
    pub(crate) async fn accept_engine(mut self, accept: Accept) -> Result<Arc<Link>, Error> {
        if let Some(p) = &accept.subprotocol {
            if !self.scope.subprotocols().iter().any(|o| o == p) {
                self.send_decision(Decision::Reject(
                    HandshakeRejection::from(ConsumerFailed).into_response(),
                ));
                return Err(Error::handshake(format!(
                    "subprotocol {p:?} was not offered by the client"
                )));
            }
        }
        let link = match self.link().await {
            Ok(l) => l.clone(),
            Err(e) => {
                self.send_decision(Decision::Reject(
                    HandshakeRejection::from(ConsumerFailed).into_response(),
                ));
                return Err(e);
            }
        };
        let mut headers = accept.headers;
        let deflate = self.deflate.take().map(|(params, answer)| {
            headers.insert(http::header::SEC_WEBSOCKET_EXTENSIONS, answer);
            params
        });
        let protocol = accept.subprotocol.clone();
        if !self.send_decision(Decision::Accept {
            protocol: accept.subprotocol,
            headers,
        }) {
            return Err(Error::handshake(
                "the client went away during the handshake",
            ));
        }
        let config = &self.runtime.config;
        let peer = match self.upgrade.take() {
            Some(UpgradeSource::Hyper(on)) => {
                let upgraded = on.await.map_err(Error::handshake)?;
                Peer::WebSocket(Socket::new(Transport::upgraded(upgraded), config, deflate))
            }
            Some(UpgradeSource::Ready(t)) => Peer::WebSocket(Socket::new(t, config, deflate)),
            Some(UpgradeSource::Http(open)) => {
                Peer::Http(open.open(&self.runtime, protocol.as_deref()).await?)
            }
            None => return Err(Error::handshake("connection already accepted")),
        };
        self.slot.put(Engine::new(link.clone(), peer));
        Ok(link)
    }

    /// Refuses the handshake with `reject`'s status (403 by default).
    pub fn reject(mut self, reject: Reject) {
        if let Some(err) = &reject.error {
            tracing::error!(
                error = &**err as &(dyn std::error::Error + 'static),
                route = self.scope.route(),
                "consumer failed in connect"
            );
        }
        self.send_decision(Decision::Reject(reject.into_response()));
    }

    fn send_decision(&mut self, d: Decision) -> bool {
        if matches!(d, Decision::Reject(_)) {
            self.runtime.metrics.rejected();
        }
        self.decision.take().is_some_and(|tx| tx.send(d).is_ok())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Dropped undecided: the client gets 403, which counts as a rejection.
        if self.decision.is_some() {
            self.runtime.metrics.rejected();
        }
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// How to accept a handshake: an optional subprotocol (one the client offered)
/// and extra response headers.
///
/// ```
/// use tower_channels::consumer::Accept;
///
/// let accept = Accept::new().subprotocol("graphql-ws").header("x-server", "demo");
/// ```
#[derive(Debug, Clone, Default)]
pub struct Accept {
    pub(crate) subprotocol: Option<String>,
    pub(crate) headers: HeaderMap,
}

impl Accept {
    /// Accept without a subprotocol or extra headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Chooses one of the subprotocols the client offered
    /// ([`Scope::subprotocols`]).
    pub fn subprotocol(mut self, protocol: impl Into<String>) -> Self {
        self.subprotocol = Some(protocol.into());
        self
    }

    /// Adds a response header to the handshake response.
    ///
    /// # Panics
    ///
    /// If `name` or `value` is not a valid header name or value.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        let name = HeaderName::try_from(name).expect("invalid header name in Accept::header");
        let value = HeaderValue::try_from(value).expect("invalid header value in Accept::header");
        self.headers.append(name, value);
        self
    }
}

/// How to refuse a handshake: an HTTP status (403 by default) and a body.
///
/// Any error converts into a `Reject` with 500 (and is logged), so `?`
/// works in `connect`:
///
/// ```
/// use http::StatusCode;
/// use tower_channels::consumer::Reject;
///
/// let r = Reject::new(StatusCode::UNAUTHORIZED).body("log in first");
/// assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
/// assert_eq!(Reject::default().status(), StatusCode::FORBIDDEN);
///
/// let from_err: Reject = std::io::Error::other("db down").into();
/// assert_eq!(from_err.status(), StatusCode::INTERNAL_SERVER_ERROR);
/// ```
#[derive(Debug)]
pub struct Reject {
    status: StatusCode,
    body: Bytes,
    headers: HeaderMap,
    error: Option<BoxError>,
}

impl Default for Reject {
    fn default() -> Self {
        Self::new(StatusCode::FORBIDDEN)
    }
}

impl Reject {
    /// A rejection with `status` and the status' reason as body.
    pub fn new(status: StatusCode) -> Self {
        Self {
            status,
            body: Bytes::from_static(status.canonical_reason().unwrap_or("rejected").as_bytes()),
            headers: HeaderMap::new(),
            error: None,
        }
    }

    /// 403 Forbidden, the default.
    pub fn forbidden() -> Self {
        Self::default()
    }

    /// Sets the plain-text body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Adds a response header.
    ///
    /// # Panics
    ///
    /// If `name` or `value` is not a valid header name or value.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        let name = HeaderName::try_from(name).expect("invalid header name in Reject::header");
        let value = HeaderValue::try_from(value).expect("invalid header value in Reject::header");
        self.headers.append(name, value);
        self
    }

    /// The status the client will get.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub(crate) fn into_response(self) -> http::Response<Bytes> {
        let mut res = http::Response::new(self.body);
        *res.status_mut() = self.status;
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        for (name, value) in self.headers {
            if let Some(name) = name {
                res.headers_mut().append(name, value);
            }
        }
        res
    }
}

/// Any error, a [`BoxError`](crate::BoxError) included, is a 500 (logged,
/// never shown to the client): `?` works on them in `connect`.
///
/// ```
/// use tower_channels::{consumer::Reject, BoxError};
///
/// fn load_user(token: &str) -> Result<String, BoxError> {
///     Err(format!("no user for {token:?}").into())
/// }
///
/// fn connect(token: &str) -> Result<String, Reject> {
///     let user = load_user(token)?; // BoxError -> Reject
///     let _port: u16 = "80".parse()?; // any std::error::Error -> Reject
///     Ok(user)
/// }
///
/// let r = connect("t").unwrap_err();
/// assert_eq!(r.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
/// ```
// Bounded by `Into<BoxError>`, not `std::error::Error`: `BoxError` itself is
// no `Error`, and a separate `From<BoxError>` impl would overlap (E0119).
impl<E> From<E> for Reject
where
    E: Into<BoxError>,
{
    fn from(e: E) -> Self {
        let mut r = Reject::new(StatusCode::INTERNAL_SERVER_ERROR);
        r.error = Some(e.into());
        r
    }
}
