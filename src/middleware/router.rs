//! The layer's routes as an axum `Router` (feature `axum`), for nesting.

use std::{
    convert::Infallible,
    future::{ready, Ready},
    task::{Context, Poll},
};

use axum::body::Body;
use http::{header, HeaderValue, Request, Response, StatusCode};
use tower_service::Service;

use super::{WebSocketLayer, WebSocketService};

impl WebSocketLayer {
    /// The layer's routes as axum routes: each pattern answers WebSocket
    /// handshakes, and other requests to it with `426 Upgrade Required`.
    ///
    /// Use it where a layer cannot see the request: a router nested with
    /// [`Router::nest`](axum::Router::nest) only receives paths that match
    /// one of its own routes, so `nest("/api", api.layer(channels))` never
    /// hands `/api/ws` to the layer (axum answers 404). Merged as routes, the
    /// WebSocket paths are routes of the nested router: they are matched
    /// relative to the prefix (axum strips it before calling the route), and
    /// [`route_layer`](axum::Router::route_layer) middleware (auth) runs for
    /// them too. [`Scope::path`](crate::Scope::path) is the path the route
    /// saw; with the `axum` feature the full one is in `OriginalUri`.
    ///
    /// ```
    /// use axum::{routing::get, Router};
    /// use tower_channels::{consumer::{websocket_consumer, WebSocketConsumer}, WebSocketLayer};
    ///
    /// struct Echo;
    /// impl WebSocketConsumer for Echo {}
    ///
    /// let channels = WebSocketLayer::new().route("/ws", websocket_consumer(|_| Echo));
    /// let api: Router = Router::new()
    ///     .route("/users", get(|| async { "[]" }))
    ///     .merge(channels.into_router()); // answers /api/ws once nested
    /// let app: Router = Router::new().nest("/api", api);
    /// ```
    ///
    /// # Panics
    ///
    /// As [`Router::route_service`](axum::Router::route_service): if a
    /// pattern is not a valid axum path. Merging panics if the other router
    /// has a route with the same path.
    pub fn into_router<S>(self) -> axum::Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let service = WebSocketService::new(UpgradeRequired, self.clone());
        self.routes
            .iter()
            .fold(axum::Router::new(), |router, route| {
                router.route_service(route.pattern.as_str(), service.clone())
            })
    }
}

/// Answers a request that is not a WebSocket handshake on a WebSocket route.
#[derive(Clone, Copy, Debug)]
struct UpgradeRequired;

impl<B> Service<Request<B>> for UpgradeRequired {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<B>) -> Self::Future {
        let mut res = Response::new(Body::from("this path only serves WebSockets\n"));
        *res.status_mut() = StatusCode::UPGRADE_REQUIRED;
        let headers = res.headers_mut();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        ready(Ok(res))
    }
}
