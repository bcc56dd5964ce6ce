//! Async, fallible consumer factories (`try_consumer`, axum extractors via
//! `extract`) and the nameable consumer types, over a real axum server.

mod common;

use axum::{
    extract::{FromRequestParts, State},
    middleware::{self, Next},
    response::Response,
    Router,
};
use http::{request::Parts, Request, StatusCode};
use tower_channels::{
    channel_layer::BoxError,
    consumer::{
        extract, try_consumer, try_json_consumer, websocket_consumer, BoxConsumerService,
        ConsumerService, Context, JsonWebSocketConsumer, Reject, WebSocketConsumer,
    },
    message::Message,
    WebSocketLayer,
};

use common::{connect, echo_text, empty, http1, next_text, serve_axum, ws_req};

#[derive(Clone, Debug)]
struct User(String);

/// What an app's auth middleware does: a token header becomes a `User`.
async fn auth(mut req: Request<axum::body::Body>, next: Next) -> Response {
    if let Some(name) = req
        .headers()
        .get("x-token")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.strip_prefix("token-"))
    {
        let user = User(name.to_owned());
        req.extensions_mut().insert(user);
    }
    next.run(req).await
}

/// An axum extractor reading that `User`, rejecting with 401.
struct AuthUser(User);

impl<S: Send + Sync> FromRequestParts<S> for AuthUser {
    type Rejection = (StatusCode, [(&'static str, &'static str); 1], &'static str);

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<User>()
            .cloned()
            .map(AuthUser)
            .ok_or((
                StatusCode::UNAUTHORIZED,
                [("www-authenticate", "Token")],
                "no user",
            ))
    }
}

#[derive(Clone)]
struct AppState {
    greeting: &'static str,
}

/// Greets its user by name: it holds a `User`, never an `Option<User>`.
struct Greeter {
    user: User,
    greeting: &'static str,
}

impl JsonWebSocketConsumer for Greeter {
    type Incoming = serde_json::Value;

    async fn receive_json(
        &mut self,
        ctx: &mut Context,
        _msg: serde_json::Value,
    ) -> Result<(), BoxError> {
        ctx.send(format!("{} {}", self.greeting, self.user.0))?;
        Ok(())
    }
}

/// Shared between `main` and tests: the return type can be written.
fn greeter(state: AppState) -> impl ConsumerService {
    try_json_consumer(move |scope| {
        let state = state.clone();
        async move {
            let AuthUser(user) = extract(&scope, &state).await?;
            let State(app) = extract::<State<AppState>, _>(&scope, &state).await?;
            Ok(Greeter {
                user,
                greeting: app.greeting,
            })
        }
    })
}

fn app() -> Router {
    let channels =
        WebSocketLayer::new().route("/ws/greet", greeter(AppState { greeting: "hello" }));
    // `.layer(channels).layer(auth)`: auth runs first, so the consumer sees its `User`.
    Router::new()
        .layer(channels)
        .layer(middleware::from_fn(auth))
}

#[tokio::test]
async fn extractor_rejection_answers_the_handshake_before_any_consumer() {
    let addr = serve_axum(app()).await;
    let reply = http1(addr, empty(ws_req(addr, "/ws/greet"))).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.body, "no user");
    assert_eq!(
        reply.headers.get("www-authenticate").map(|v| v.as_bytes()),
        Some(&b"Token"[..])
    );
}

#[tokio::test]
async fn extractors_and_state_build_the_consumer() {
    let addr = serve_axum(app()).await;
    let url = format!("ws://{addr}/ws/greet");
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        url.as_str(),
    )
    .expect("request");
    req.headers_mut()
        .insert("x-token", "token-ada".parse().expect("header"));
    let (mut ws, _) = common::within("handshake", tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake");
    futures_util::SinkExt::send(&mut ws, tokio_tungstenite::tungstenite::Message::text("{}"))
        .await
        .expect("send");
    assert_eq!(next_text(&mut ws).await, "hello ada");
}

struct Echo;

impl WebSocketConsumer for Echo {
    async fn receive(&mut self, ctx: &mut Context, msg: Message) -> Result<(), BoxError> {
        ctx.send(msg)?;
        Ok(())
    }
}

#[tokio::test]
async fn try_consumer_rejects_with_its_status_and_accepts_otherwise() {
    let gate = try_consumer(|scope| async move {
        match scope.query_param("pass").as_deref() {
            Some("yes") => Ok(Echo),
            _ => Err(Reject::new(StatusCode::PAYMENT_REQUIRED).body("pay first")),
        }
    });
    let addr = serve_axum(Router::new().layer(WebSocketLayer::new().route("/ws", gate))).await;

    let reply = http1(addr, empty(ws_req(addr, "/ws?pass=no"))).await;
    assert_eq!(reply.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(reply.body, "pay first");

    let mut ws = connect(addr, "/ws?pass=yes").await;
    echo_text(&mut ws, "through").await;
}

#[tokio::test]
async fn boxed_consumers_of_different_types_share_one_type() {
    let gate = try_consumer(|_scope| async { Ok::<_, Reject>(Echo) });
    let routes: Vec<(&str, BoxConsumerService)> = vec![
        ("/ws/a", websocket_consumer(|_| Echo).boxed()),
        ("/ws/b", gate.boxed()),
    ];
    let mut layer = WebSocketLayer::new();
    for (path, svc) in routes {
        layer = layer.route(path, svc);
    }
    let addr = serve_axum(Router::new().layer(layer)).await;
    for path in ["/ws/a", "/ws/b"] {
        let mut ws = connect(addr, path).await;
        echo_text(&mut ws, path).await;
    }
}
