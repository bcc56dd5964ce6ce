use std::{
    fmt,
    future::poll_fn,
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex},
    task::Poll,
};

use futures_util::FutureExt;
use tower_layer::Layer;

use super::{Runtime, ShutdownHandle, WebSocketService};
use crate::{
    channel_layer::{BoxError, BoxFuture, ChannelLayer, InMemoryChannelLayer},
    consumer::{Connection, ConsumerService},
    metrics::ConnectionStats,
    origin::AllowedOrigins,
    route::{Params, RoutePattern},
    WebSocketConfig,
};

pub(crate) type BoxConsumer = Arc<dyn Fn(Connection) -> BoxFuture<'static, ()> + Send + Sync>;

/// Logs a consumer service that failed to become ready (the connection is
/// then dropped undecided: 403).
fn not_ready(route: &str, e: &BoxError) {
    tracing::error!(
        error = &**e as &(dyn std::error::Error + 'static),
        route,
        "consumer service not ready"
    );
}

/// Logs a consumer service whose call failed.
fn consumer_failed(route: &str, e: &BoxError) {
    tracing::error!(
        error = &**e as &(dyn std::error::Error + 'static),
        route,
        "consumer failed"
    );
}

#[derive(Clone)]
pub(crate) struct Route {
    pub(crate) pattern: RoutePattern,
    pub(crate) consumer: BoxConsumer,
}

/// The tower [`Layer`] that answers WebSocket handshakes on its routes and
/// runs a consumer per connection. See the [crate docs](crate) for an example.
///
/// Cheap to clone (an `Arc`). Requests that do not match a route, or that do
/// not ask for a WebSocket, go to the inner service untouched.
#[derive(Clone)]
pub struct WebSocketLayer {
    pub(crate) routes: Arc<[Route]>,
    pub(crate) runtime: Arc<Runtime>,
}

impl Default for WebSocketLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl WebSocketLayer {
    /// A layer with no routes, an [`InMemoryChannelLayer`] and default
    /// [`WebSocketConfig`].
    pub fn new() -> Self {
        Self {
            routes: Arc::new([]),
            runtime: Arc::new(Runtime::new(Arc::new(InMemoryChannelLayer::new()))),
        }
    }

    /// Adds a route: requests for paths matching `pattern` (e.g.
    /// `/ws/chat/{room}`) that ask for a WebSocket are handed to `consumer`,
    /// any [`Service`](tower_service::Service) taking a [`Connection`]: see [`crate::consumer`].
    /// Routes are tried in the order they were added.
    ///
    /// A pattern starts with `/`; its segments are literals or `{name}`
    /// captures (one whole segment each), and a final `{*name}` captures the
    /// rest of the path. Captured values are percent-decoded and available
    /// in [`Scope::params`](crate::Scope::params): `/ws/chat/{room}` matches
    /// `/ws/chat/lobby` (`room` = `lobby`) but neither `/ws/chat` nor
    /// `/ws/chat/a/b`; `/files/{*path}` matches `/files/a/b%20c` (`path` =
    /// `a/b c`).
    ///
    /// # Panics
    ///
    /// If `pattern` is not valid: it does not start with `/`, a capture is
    /// empty, repeated, not a whole segment, or `{*name}` is not last.
    pub fn route(mut self, pattern: &str, consumer: impl ConsumerService) -> Self {
        let pattern = RoutePattern::new(pattern).unwrap_or_else(|e| panic!("{e}"));
        let consumer = Mutex::new(consumer);
        let consumer: BoxConsumer = Arc::new(move |conn: Connection| {
            let mut svc = consumer.lock().unwrap_or_else(|e| e.into_inner()).clone();
            // A service that is ready at once (every consumer of this crate
            // is) is called here, and its future is the connection's
            // application future with only the error log around it: an
            // `async` block awaiting it would hold the `Connection` and the
            // service beside it for the life of the connection.
            let mut noop = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
            match svc.poll_ready(&mut noop) {
                Poll::Ready(Ok(())) => {
                    let scope = conn.scope().clone();
                    // The call (the consumer's factory) runs here, in the
                    // connection's span (see `spawn_connection`); a panic
                    // in it is the consumer's, as one in its future is.
                    match std::panic::catch_unwind(AssertUnwindSafe(|| svc.call(conn))) {
                        Ok(running) => Box::pin(running.map(move |done| {
                            if let Err(e) = done {
                                consumer_failed(scope.route(), &e.into());
                            }
                        })),
                        // Raised again where the host polls the
                        // application, which logs it, counts it and closes
                        // with 1011, as for a panic in the future itself.
                        Err(p) => Box::pin(async move { std::panic::resume_unwind(p) }),
                    }
                }
                Poll::Ready(Err(e)) => {
                    not_ready(conn.scope().route(), &e.into());
                    Box::pin(std::future::ready(()))
                }
                Poll::Pending => Box::pin(async move {
                    if let Err(e) = poll_fn(|cx| svc.poll_ready(cx)).await {
                        not_ready(conn.scope().route(), &e.into());
                        return;
                    }
                    let scope = conn.scope().clone();
                    if let Err(e) = svc.call(conn).await {
                        consumer_failed(scope.route(), &e.into());
                    }
                }),
            }
        });
        let mut routes = self.routes.to_vec();
        routes.push(Route { pattern, consumer });
        self.routes = routes.into();
        self
    }

    /// Uses `layer` as the channel layer (e.g. a shared Redis layer, or an
    /// in-memory layer you also hand to HTTP handlers).
    pub fn with_channel_layer(mut self, layer: Arc<dyn ChannelLayer>) -> Self {
        self.update_runtime(|r| r.channel_layer = layer);
        self
    }

    /// Sets the per-connection settings.
    pub fn with_config(mut self, config: WebSocketConfig) -> Self {
        self.update_runtime(|r| r.config = config);
        self
    }

    /// Sets which `Origin`s may connect (default: any); see [`crate::origin`].
    pub fn allowed_origins(mut self, origins: AllowedOrigins) -> Self {
        self.update_runtime(|r| r.origins = origins);
        self
    }

    /// Turns the HTTP fallback on: every route also answers Server-Sent
    /// Events, HTTP-streaming and long-poll sessions (`GET
    /// <route>?transport=sse|stream|poll`, or a bare `EventSource`), with
    /// the client's messages `POST`ed to the session, for the same consumers
    /// and under the same settings, limits and counters as WebSockets. See
    /// [`HttpFallback`](crate::HttpFallback) and the protocol in the README.
    ///
    /// Off by default: without it such requests go to the inner service.
    pub fn http_fallback(mut self, fallback: crate::HttpFallback) -> Self {
        let sessions = Arc::new(crate::engine::http::Sessions::new(fallback));
        self.update_runtime(|r| r.http = Some(sessions));
        self
    }

    /// A handle for graceful shutdown of this layer's connections.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            tracker: self.runtime.tracker.clone(),
        }
    }

    fn update_runtime(&mut self, f: impl FnOnce(&mut Runtime)) {
        self.runtime = Arc::new(self.runtime.rebuilt(f));
    }

    /// The channel layer, for sending to connections from HTTP handlers,
    /// background tasks or workers.
    pub fn channel_layer(&self) -> Arc<dyn ChannelLayer> {
        self.runtime.channel_layer.clone()
    }

    /// The per-connection settings.
    pub fn config(&self) -> &WebSocketConfig {
        &self.runtime.config
    }

    /// Counters since the layer was built.
    pub fn stats(&self) -> ConnectionStats {
        self.runtime.metrics.snapshot()
    }

    pub(crate) fn match_route(&self, path: &str) -> Option<(&Route, Params)> {
        self.routes
            .iter()
            .find_map(|r| r.pattern.matches(path).map(|p| (r, p)))
    }
}

impl fmt::Debug for WebSocketLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebSocketLayer")
            .field(
                "routes",
                &self
                    .routes
                    .iter()
                    .map(|r| r.pattern.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("channel_layer", &self.runtime.channel_layer)
            .field("config", &self.runtime.config)
            .finish()
    }
}

impl<S> Layer<S> for WebSocketLayer {
    type Service = WebSocketService<S>;

    fn layer(&self, inner: S) -> WebSocketService<S> {
        WebSocketService {
            inner,
            layer: self.clone(),
        }
    }
}
