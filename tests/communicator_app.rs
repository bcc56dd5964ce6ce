//! `Communicator::through`: the handshake through a whole axum app (its auth
//! middleware, nesting, `ConnectInfo`) in memory, and `wait_handled` instead
//! of sleeping (issue 14, item 7).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use axum::{
    extract::{ConnectInfo, Request},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use http::StatusCode;
use tokio::sync::Notify;
use tower_channels::{
    consumer::{from_fn, websocket_consumer, Accept, Connection, Context, WebSocketConsumer},
    message::Message,
    testing::Communicator,
    BoxError, WebSocketLayer,
};

#[derive(Clone)]
struct User(String);

/// The app's auth: `Authorization: Bearer secret` is user "ada", else 401.
async fn auth(mut req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    if token == Some("Bearer secret") {
        req.extensions_mut().insert(User("ada".into()));
        next.run(req).await
    } else {
        (StatusCode::UNAUTHORIZED, "log in first").into_response()
    }
}

/// Greets the user the auth middleware found, with the peer address.
struct Greeter {
    user: Option<String>,
    peer: Option<SocketAddr>,
}

impl WebSocketConsumer for Greeter {
    async fn connect(
        &mut self,
        ctx: &mut Context,
    ) -> Result<Accept, tower_channels::consumer::Reject> {
        let user = self.user.clone().unwrap_or_else(|| "nobody".into());
        let peer = self.peer.map_or("no peer".into(), |p| p.to_string());
        ctx.send_text(format!("hello {user} from {peer}"))?;
        Ok(Accept::new())
    }
}

fn app() -> Router {
    let channels = WebSocketLayer::new().route(
        "/ws",
        websocket_consumer(|scope| Greeter {
            user: scope.extensions().get::<User>().map(|u| u.0.clone()),
            peer: scope.peer_addr(),
        }),
    );
    // Nested: the layer's routes merged as routes (see the README).
    let api = Router::new()
        .route("/health", get(|| async { "ok" }))
        .merge(channels.into_router());
    Router::new()
        .nest("/api", api)
        .layer(middleware::from_fn(auth))
}

fn request(path: &str, token: Option<&str>) -> http::Request<()> {
    let mut b = http::Request::get(path);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(()).unwrap()
}

#[tokio::test]
async fn the_whole_app_authenticates_and_routes_the_socket() {
    let mut comm = Communicator::through(app(), request("/api/ws", Some("secret")));
    comm.connect()
        .await
        .expect("the app accepts a logged-in user");
    assert_eq!(comm.receive_text().await.unwrap(), "hello ada from no peer");
    comm.disconnect(1000).await;
}

#[tokio::test]
async fn the_apps_own_refusal_comes_back_as_rejected() {
    let mut comm = Communicator::through(app(), request("/api/ws", Some("wrong")));
    let rejected = comm.connect().await.unwrap_err();
    assert_eq!(rejected.status, StatusCode::UNAUTHORIZED);
    assert_eq!(&rejected.body[..], b"log in first");
    // No consumer was started, so nothing to wait for.
    assert!(comm.wait_finished(std::time::Duration::from_secs(1)).await);

    // A path no route of the layer matches reaches the app: 404.
    let mut comm = Communicator::through(app(), request("/api/nothing", Some("secret")));
    assert_eq!(
        comm.connect().await.unwrap_err().status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn request_extensions_reach_the_service() {
    let addr: SocketAddr = "192.0.2.7:4242".parse().unwrap();
    let mut req = request("/api/ws", Some("secret"));
    req.extensions_mut().insert(ConnectInfo(addr));
    let mut comm = Communicator::through(app(), req);
    comm.connect().await.unwrap();
    assert_eq!(
        comm.receive_text().await.unwrap(),
        "hello ada from 192.0.2.7:4242"
    );
}

/// Counts messages after some work that yields to the runtime many times
/// (as a database write would), and never answers.
struct Slow(Arc<AtomicUsize>);

impl WebSocketConsumer for Slow {
    async fn receive(&mut self, _: &mut Context, _: Message) -> Result<(), BoxError> {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn wait_handled_returns_once_every_message_was_handled() {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let channels =
        WebSocketLayer::new().route("/ws", websocket_consumer(move |_| Slow(counter.clone())));
    let app = Router::new().layer(channels);
    let mut comm = Communicator::through(app, request("/ws", None));
    comm.connect().await.unwrap();
    for n in 1..=20 {
        comm.send_text(format!("{n}")).await;
        if n % 7 == 0 {
            assert!(comm.wait_handled().await);
            assert_eq!(seen.load(Ordering::SeqCst), n);
        }
    }
    assert!(comm.wait_handled().await);
    assert_eq!(seen.load(Ordering::SeqCst), 20);
    comm.disconnect(1000).await;
}

#[tokio::test]
async fn wait_handled_works_for_the_raw_form_and_times_out_when_stuck() {
    let seen = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let (counter, gate) = (seen.clone(), release.clone());
    let raw = from_fn(move |conn: Connection| {
        let (counter, gate) = (counter.clone(), gate.clone());
        async move {
            let mut ws = conn.accept(Accept::new()).await?;
            while let Some(Ok(m)) = ws.recv().await {
                if m.as_text() == Some("block") {
                    gate.notified().await;
                }
                counter.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, BoxError>(())
        }
    });
    let mut comm = Communicator::new(raw, "/ws");
    comm.connect().await.unwrap();
    comm.send_text("one").await;
    assert!(comm.wait_handled().await);
    assert_eq!(seen.load(Ordering::SeqCst), 1);

    // The consumer is stuck on this one: not handled.
    comm.send_text("block").await;
    assert!(!comm.wait_handled().await);
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    release.notify_one();
    assert!(comm.wait_handled().await);
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    comm.disconnect(1000).await;
}
