use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::sync::oneshot;
use tower_service::Service;
use tracing::Instrument;

use super::{fallback, layer::Route, ResponseBody, ResponseFuture, WebSocketLayer};
use crate::{
    channel_layer::BoxError,
    consumer::{Connection, Decision, UpgradeSource},
    engine::wire::DeflateParams,
    handshake::{
        self,
        rejection::{OriginNotAllowed, ShuttingDown, TooManyConnections, UpgradeUnavailable},
        HandshakeRejection,
    },
    route::Params,
    Scope,
};

/// The middleware made by [`WebSocketLayer`]: answers WebSocket handshakes on
/// its routes and passes every other request to `S`.
#[derive(Clone, Debug)]
pub struct WebSocketService<S> {
    pub(crate) inner: S,
    pub(crate) layer: WebSocketLayer,
}

impl<S> WebSocketService<S> {
    /// Wraps `inner` with `layer`.
    pub fn new(inner: S, layer: WebSocketLayer) -> Self {
        Self { inner, layer }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The layer's configuration and handles.
    pub fn layer(&self) -> &WebSocketLayer {
        &self.layer
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for WebSocketService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: http_body::Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        if !handshake::wants_websocket(&req) {
            // The HTTP fallback, when on: sessions on the same routes.
            if let Some(sessions) = &self.layer.runtime.http {
                if let Some(what) = fallback::classify(&req) {
                    if self.layer.match_route(req.uri().path()).is_some() {
                        let sessions = sessions.clone();
                        return ResponseFuture::http(self.layer.serve_http(sessions, what, req));
                    }
                }
            }
            return ResponseFuture::future(self.inner.call(req));
        }
        if self.layer.match_route(req.uri().path()).is_none() {
            return ResponseFuture::future(self.inner.call(req));
        }
        match self.layer.start_handshake(req) {
            Ok((decision, kind)) => ResponseFuture::handshake(decision, kind),
            Err(rejection) => {
                self.layer.runtime.metrics.rejected();
                tracing::debug!(%rejection, status = %rejection.status(), "handshake rejected");
                ResponseFuture::respond(rejection.into_response())
            }
        }
    }
}

impl WebSocketLayer {
    /// The admission policy every new connection passes, WebSocket or HTTP
    /// session: not shutting down, an allowed origin, room under
    /// `max_connections`.
    pub(crate) fn admit(&self, parts: &http::request::Parts) -> Result<(), HandshakeRejection> {
        let runtime = &self.runtime;
        if runtime.tracker.is_shutting_down() {
            return Err(ShuttingDown.into());
        }
        if !runtime.origins.allows(parts) {
            return Err(OriginNotAllowed.into());
        }
        if runtime
            .config
            .max_connections
            .is_some_and(|max| runtime.tracker.len() >= max)
        {
            return Err(TooManyConnections.into());
        }
        Ok(())
    }

    /// Validates a handshake and spawns its consumer, which decides.
    fn start_handshake<B>(
        &self,
        mut req: Request<B>,
    ) -> Result<(oneshot::Receiver<Decision>, handshake::Kind), HandshakeRejection> {
        let on_upgrade = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
        let (parts, _body) = req.into_parts();
        let (route, params) =
            self.match_route(parts.uri.path())
                .ok_or(HandshakeRejection::from(
                    crate::handshake::rejection::ConnectionRejected,
                ))?;
        let (kind, protocols) = handshake::validate(&parts, self.runtime.config.max_subprotocols)?;
        self.admit(&parts)?;
        let runtime = &self.runtime;
        let on_upgrade = on_upgrade.ok_or(UpgradeUnavailable)?;
        // permessage-deflate: answered on the 101 (HTTP/1.1) or the 200
        // (HTTP/2 extended CONNECT) alike.
        let deflate = crate::engine::wire::negotiate(
            parts
                .headers
                .get_all(http::header::SEC_WEBSOCKET_EXTENSIONS),
            &runtime.config.compression,
        );
        let rx = self.spawn_connection(
            route,
            params,
            parts,
            protocols,
            UpgradeSource::Hyper(on_upgrade),
            deflate,
        );
        Ok((rx, kind))
    }

    /// Starts a connection attempt on `route` (a WebSocket handshake or an
    /// HTTP session): its task runs the consumer and, once accepted, the
    /// engine. The receiver gets the consumer's decision.
    pub(crate) fn spawn_connection(
        &self,
        route: &Route,
        params: Params,
        parts: http::request::Parts,
        protocols: Vec<String>,
        source: UpgradeSource,
        deflate: Option<(DeflateParams, http::HeaderValue)>,
    ) -> oneshot::Receiver<Decision> {
        let runtime = &self.runtime;
        let transport = match &source {
            UpgradeSource::Http(open) => open.kind().as_str(),
            _ => "websocket",
        };
        let scope = Scope::new(route.pattern.as_str().into(), parts, params, protocols);
        let span = tracing::debug_span!(
            "websocket",
            route = scope.route(),
            path = scope.path(),
            transport,
            peer = scope.peer_addr().map(tracing::field::display),
            channel = tracing::field::Empty,
        );
        // The consumer service is called now (see `WebSocketLayer::route`):
        // in the connection's span, as its future runs.
        let (rx, host) = span.in_scope(|| {
            Connection::start(scope, runtime.clone(), source, deflate, |conn| {
                (route.consumer)(conn)
            })
        });
        let tracker = runtime.tracker.clone();
        let id = tracker.next_id();
        // The host is spawned as is: wrapped in an `async` block it would be
        // stored twice in the task (the captured value and the awaited one).
        let task = tokio::spawn(host.tracked(tracker, id).instrument(span));
        runtime.tracker.register(id, task.abort_handle());
        rx
    }
}
