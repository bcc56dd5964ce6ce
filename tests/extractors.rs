//! axum extractors in a consumer's factory (`consumer::extract`) however the
//! layer is mounted: `Router::layer`, `merge(into_router())`, nested routers
//! (issue 24, item 4). The route's own path parameters reach `Path` and
//! `RawPathParams`; `State` is the state handed to `extract`, through
//! `FromRef` for a part of it, as in an axum handler.

use std::collections::HashMap;

use axum::{
    extract::{FromRef, MatchedPath, Path, RawPathParams, State},
    routing::get,
    Router,
};
use http::StatusCode;
use tower_channels::{
    consumer::{extract, try_consumer, Accept, Context, Reject, WebSocketConsumer},
    testing::Communicator,
    WebSocketLayer,
};

#[derive(Clone)]
struct AppState {
    greeting: Greeting,
}

#[derive(Clone)]
struct Greeting(&'static str);

impl FromRef<AppState> for Greeting {
    fn from_ref(state: &AppState) -> Self {
        state.greeting.clone()
    }
}

/// Sends one text made from what the extractors found, then echoes nothing.
struct Said(String);

impl WebSocketConsumer for Said {
    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        ctx.send_text(std::mem::take(&mut self.0))?;
        Ok(Accept::new())
    }
}

/// `/ws/rooms/{room}`: `Path<String>`, `State<Greeting>` by `FromRef` and
/// the whole `State<AppState>`.
fn room_layer(state: AppState) -> WebSocketLayer {
    WebSocketLayer::new().route(
        "/ws/rooms/{room}",
        try_consumer(move |scope| {
            let state = state.clone();
            async move {
                let Path(room) = extract::<Path<String>, _>(&scope, &state).await?;
                let State(Greeting(greeting)) = extract(&scope, &state).await?;
                let State(app) = extract::<State<AppState>, _>(&scope, &state).await?;
                assert_eq!(app.greeting.0, greeting);
                Ok(Said(format!("{greeting} {room}")))
            }
        }),
    )
}

fn state() -> AppState {
    AppState {
        greeting: Greeting("welcome to"),
    }
}

fn get_req(path: &str) -> http::Request<()> {
    http::Request::get(path).body(()).unwrap()
}

async fn first_text(app: Router, path: &str) -> String {
    let mut comm = Communicator::through(app, get_req(path));
    comm.connect().await.expect("accepted");
    let text = comm.receive_text().await.unwrap();
    comm.disconnect(1000).await;
    text
}

#[tokio::test]
async fn path_and_state_under_router_layer() {
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .layer(room_layer(state()));
    assert_eq!(first_text(app, "/ws/rooms/lobby").await, "welcome to lobby");
}

#[tokio::test]
async fn path_and_state_merged_as_routes() {
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .merge(room_layer(state()).into_router());
    assert_eq!(
        first_text(app, "/ws/rooms/kitchen").await,
        "welcome to kitchen"
    );
}

#[tokio::test]
async fn path_is_percent_decoded_as_axum_does() {
    let app = Router::new().layer(room_layer(state()));
    assert_eq!(
        first_text(app, "/ws/rooms/tea%20room").await,
        "welcome to tea room"
    );
}

/// `/ws/{kind}/{id}` read with a tuple, a map, `RawPathParams` and
/// `MatchedPath`; under a nest whose prefix has a parameter of its own.
fn detail_layer() -> WebSocketLayer {
    WebSocketLayer::new().route(
        "/ws/{kind}/{id}",
        try_consumer(|scope| async move {
            let Path(all) = extract::<Path<HashMap<String, String>>, _>(&scope, &()).await?;
            let raw = extract::<RawPathParams, _>(&scope, &()).await?;
            let names: Vec<&str> = raw.iter().map(|(k, _)| k).collect();
            let matched = extract::<MatchedPath, _>(&scope, &())
                .await
                .map(|m| m.as_str().to_owned())
                .unwrap_or_default();
            let mut pairs: Vec<_> = all.into_iter().collect();
            pairs.sort();
            Ok(Said(format!("{pairs:?} {names:?} {matched}")))
        }),
    )
}

#[tokio::test]
async fn every_parameter_reaches_path_in_a_nested_router() {
    // The layer's routes merged into a router nested under a prefix with a
    // parameter: axum's own routing, the prefix's `tenant` and the route's
    // parameters, once each.
    let api = Router::new()
        .route("/health", get(|| async { "ok" }))
        .merge(detail_layer().into_router());
    let app = Router::new().nest("/t/{tenant}", api);
    let text = first_text(app, "/t/acme/ws/doc/7").await;
    assert_eq!(
        text,
        r#"[("id", "7"), ("kind", "doc"), ("tenant", "acme")] ["tenant", "kind", "id"] /t/{tenant}/ws/{kind}/{id}"#
    );
}

#[tokio::test]
async fn tuple_path_under_the_outer_layer_of_a_nesting_app() {
    // The layer on the outer router, seeing the full path, with nested REST
    // routes beside it.
    let channels = WebSocketLayer::new().route(
        "/api/ws/{kind}/{id}",
        try_consumer(|scope| async move {
            let Path((kind, id)) = extract::<Path<(String, u32)>, _>(&scope, &()).await?;
            Ok(Said(format!("{kind} #{id}")))
        }),
    );
    let api = Router::new().route("/health", get(|| async { "ok" }));
    let app = Router::new().nest("/api", api).layer(channels);
    assert_eq!(first_text(app, "/api/ws/doc/7").await, "doc #7");
}

#[tokio::test]
async fn a_path_rejection_is_the_handshake_answer() {
    // `id` is no number: axum's own 400 with its text, before any consumer.
    let channels = WebSocketLayer::new().route(
        "/ws/{kind}/{id}",
        try_consumer(|scope| async move {
            let Path((_, id)) = extract::<Path<(String, u32)>, _>(&scope, &()).await?;
            Ok(Said(format!("{id}")))
        }),
    );
    let app = Router::new().layer(channels);
    let mut comm = Communicator::through(app, get_req("/ws/doc/seven"));
    let rejected = comm.connect().await.unwrap_err();
    assert_eq!(rejected.status, StatusCode::BAD_REQUEST);
    let body = String::from_utf8_lossy(&rejected.body);
    assert!(body.contains("`seven` to a `u32`"), "{body}");
}
