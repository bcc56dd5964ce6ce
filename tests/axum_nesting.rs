//! The layer inside a real axum 0.8 app (issue 14, item 1): layer order with
//! an auth middleware, `route_layer`, and nested routers, over real sockets.

mod common;

use axum::{
    extract::Request,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use common::*;
use futures_util::SinkExt;
use http::StatusCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tower_channels::{
    consumer::{websocket_consumer, Context, WebSocketConsumer},
    message::Message,
    BoxError, WebSocketLayer,
};

#[derive(Clone)]
struct User(String);

/// The app's auth: `?token=secret` is user "ada"; anything else is 401.
async fn auth(mut req: Request, next: Next) -> Response {
    if req.uri().query() == Some("token=secret") {
        req.extensions_mut().insert(User("ada".into()));
        next.run(req).await
    } else {
        (StatusCode::UNAUTHORIZED, "log in first").into_response()
    }
}

/// Answers any message with the user the request carried and the path.
struct WhoAmI {
    user: String,
    path: String,
}

impl WebSocketConsumer for WhoAmI {
    async fn receive(&mut self, ctx: &mut Context, _: Message) -> Result<(), BoxError> {
        ctx.send_text(format!("{} at {}", self.user, self.path))?;
        Ok(())
    }
}

fn channels() -> WebSocketLayer {
    WebSocketLayer::new().route(
        "/ws",
        websocket_consumer(|scope| WhoAmI {
            user: scope
                .extensions()
                .get::<User>()
                .map_or("anonymous".into(), |u| u.0.clone()),
            path: scope.path().to_owned(),
        }),
    )
}

fn rest() -> Router {
    Router::new().route("/users", get(|| async { "[]" }))
}

async fn status(addr: std::net::SocketAddr, path: &str) -> StatusCode {
    http1(addr, empty(ws_req(addr, path))).await.status
}

async fn who(addr: std::net::SocketAddr, path: &str) -> String {
    let mut ws = connect(addr, path).await;
    ws.send(WsMessage::text("?")).await.unwrap();
    next_text(&mut ws).await
}

#[tokio::test]
async fn auth_added_after_the_layer_runs_first() {
    // `.layer(channels).layer(auth)`: auth wraps channels, sees every
    // handshake, refuses or passes the user on.
    let app = rest().layer(channels()).layer(middleware::from_fn(auth));
    let addr = serve_axum(app).await;
    assert_eq!(status(addr, "/ws").await, StatusCode::UNAUTHORIZED);
    assert_eq!(who(addr, "/ws?token=secret").await, "ada at /ws");
}

#[tokio::test]
async fn auth_added_before_the_layer_never_sees_sockets() {
    // `.layer(auth).layer(channels)`: channels is outside and answers the
    // handshake before auth runs: the consumer gets no user.
    let app = rest().layer(middleware::from_fn(auth)).layer(channels());
    let addr = serve_axum(app).await;
    assert_eq!(who(addr, "/ws").await, "anonymous at /ws");
    let reply = http1(addr, empty(get_req(addr, "/users"))).await;
    assert_eq!(
        reply.status,
        StatusCode::UNAUTHORIZED,
        "REST still behind auth"
    );
}

#[tokio::test]
async fn route_layer_skips_the_layer_but_not_its_router() {
    // `.route_layer(auth)` wraps matched routes only; the layer's paths are
    // no axum routes...
    let app = rest()
        .route_layer(middleware::from_fn(auth))
        .layer(channels());
    let addr = serve_axum(app).await;
    assert_eq!(who(addr, "/ws").await, "anonymous at /ws");
    // ...unless merged as routes with `into_router`.
    let app = rest()
        .merge(channels().into_router())
        .route_layer(middleware::from_fn(auth));
    let addr = serve_axum(app).await;
    assert_eq!(status(addr, "/ws").await, StatusCode::UNAUTHORIZED);
    assert_eq!(who(addr, "/ws?token=secret").await, "ada at /ws");
}

#[tokio::test]
async fn nested_routers() {
    // A nested router only gets paths matching its own routes: the layer
    // on it never sees /api/ws.
    let app = Router::new().nest("/api", rest().layer(channels()));
    let addr = serve_axum(app).await;
    assert_eq!(status(addr, "/api/ws").await, StatusCode::NOT_FOUND);

    // Fix 1: the layer's routes as routes of the nested router (matched
    // relative to the prefix, as axum hands the path down).
    let api = rest()
        .merge(channels().into_router())
        .layer(middleware::from_fn(auth));
    let app = Router::new().nest("/api", api);
    let addr = serve_axum(app).await;
    assert_eq!(status(addr, "/api/ws").await, StatusCode::UNAUTHORIZED);
    assert_eq!(who(addr, "/api/ws?token=secret").await, "ada at /ws");
    assert_eq!(status(addr, "/ws").await, StatusCode::NOT_FOUND);
    // A plain GET on a WebSocket route is told to upgrade.
    let reply = http1(addr, empty(get_req(addr, "/api/ws?token=secret"))).await;
    assert_eq!(reply.status, StatusCode::UPGRADE_REQUIRED);

    // Fix 2: the layer on the outer router, with the full path.
    let outer_channels = WebSocketLayer::new().route(
        "/api/ws",
        websocket_consumer(|scope| WhoAmI {
            user: "anonymous".into(),
            path: scope.path().to_owned(),
        }),
    );
    let app = Router::new().nest("/api", rest()).layer(outer_channels);
    let addr = serve_axum(app).await;
    assert_eq!(who(addr, "/api/ws").await, "anonymous at /api/ws");
}
