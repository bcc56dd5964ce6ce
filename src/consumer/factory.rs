//! Naming and building consumer services: the [`ConsumerService`] bound, the
//! nameable [`BoxConsumerService`], and [`try_consumer`] /
//! [`try_json_consumer`], whose async factory may reject the handshake
//! before any consumer exists.

use std::{convert::Infallible, fmt, future::Future, task::Poll};

use futures_util::TryFutureExt;
use tower_service::Service;

use super::{driver, Connection, JsonConsumer, JsonWebSocketConsumer, Reject, WebSocketConsumer};
use crate::{
    channel_layer::{BoxError, BoxFuture},
    Scope,
};

/// What [`WebSocketLayer::route`](crate::WebSocketLayer::route) accepts: a
/// [`Service`] taking a [`Connection`], cloneable and `Send`, whose future is
/// `Send + 'static` and whose error converts into [`BoxError`].
///
/// It is implemented for every such service, so it works as a trait alias:
/// write `impl ConsumerService` where a function returns a consumer and the
/// compiler knows everything the layer needs (a bare
/// `impl Service<Connection> + Clone + Send` does not say that its future is
/// `Send`).
///
/// ```
/// use tower_channels::consumer::{websocket_consumer, ConsumerService, WebSocketConsumer};
/// use tower_channels::WebSocketLayer;
///
/// struct Echo;
/// impl WebSocketConsumer for Echo {}
///
/// // Shared by `main` and the tests.
/// pub fn echo() -> impl ConsumerService {
///     websocket_consumer(|_| Echo)
/// }
///
/// let layer = WebSocketLayer::new().route("/ws/echo", echo());
/// ```
pub trait ConsumerService:
    Service<
        Connection,
        Response = (),
        Error = <Self as ConsumerService>::Failure,
        Future = <Self as ConsumerService>::Running,
    > + Clone
    + Send
    + 'static
{
    /// The service's error type ([`Service::Error`]).
    type Failure: Into<BoxError>;
    /// The service's future ([`Service::Future`]).
    type Running: Future<Output = Result<(), <Self as ConsumerService>::Failure>> + Send + 'static;

    /// Boxes this service into the nameable [`BoxConsumerService`].
    fn boxed(self) -> BoxConsumerService
    where
        Self: Sized,
    {
        BoxConsumerService::new(self)
    }
}

impl<S> ConsumerService for S
where
    S: Service<Connection, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Failure = S::Error;
    type Running = S::Future;
}

/// A type-erased consumer service with a name you can write: store it in a
/// struct, return it from a function, or keep several different consumers in
/// one `Vec` (axum's `BoxCloneService`, for consumers).
///
/// ```
/// use tower_channels::consumer::{websocket_consumer, BoxConsumerService, ConsumerService, WebSocketConsumer};
///
/// struct Echo;
/// impl WebSocketConsumer for Echo {}
/// struct Quiet;
/// impl WebSocketConsumer for Quiet {}
///
/// struct Routes { echo: BoxConsumerService, quiet: BoxConsumerService }
///
/// let routes = Routes { echo: websocket_consumer(|_| Echo).boxed(), quiet: websocket_consumer(|_| Quiet).boxed() };
/// let layer = tower_channels::WebSocketLayer::new()
///     .route("/ws/echo", routes.echo.clone())
///     .route("/ws/quiet", routes.quiet);
/// ```
pub struct BoxConsumerService(Box<dyn ErasedConsumer>);

trait ErasedConsumer: Send {
    fn clone_box(&self) -> Box<dyn ErasedConsumer>;
    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), BoxError>>;
    fn call(&mut self, conn: Connection) -> BoxFuture<'static, Result<(), BoxError>>;
}

impl<S: ConsumerService> ErasedConsumer for S {
    fn clone_box(&self) -> Box<dyn ErasedConsumer> {
        Box::new(self.clone())
    }

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), BoxError>> {
        Service::poll_ready(self, cx).map_err(Into::into)
    }

    fn call(&mut self, conn: Connection) -> BoxFuture<'static, Result<(), BoxError>> {
        Box::pin(Service::call(self, conn).map_err(Into::into))
    }
}

impl BoxConsumerService {
    /// Boxes `service` (also available as [`ConsumerService::boxed`]).
    pub fn new(service: impl ConsumerService) -> Self {
        Self(Box::new(service))
    }
}

impl Clone for BoxConsumerService {
    fn clone(&self) -> Self {
        Self(self.0.clone_box())
    }
}

impl fmt::Debug for BoxConsumerService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxConsumerService").finish_non_exhaustive()
    }
}

impl Service<Connection> for BoxConsumerService {
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<(), BoxError>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, conn: Connection) -> Self::Future {
        self.0.call(conn)
    }
}

/// Makes a consumer service from an **async, fallible** factory: it gets the
/// connection's [`Scope`] (cheap to clone) and either builds the consumer or
/// rejects the handshake with a [`Reject`] (its status, e.g. 401, is what the
/// client gets) before any consumer exists.
///
/// This is where authentication, database look-ups and app state belong: the
/// consumer then holds a `User`, not an `Option<User>` it must `expect()`.
/// Under the `axum` feature, [`extract`] runs axum extractors here.
///
/// ```
/// use http::StatusCode;
/// use tower_channels::consumer::{try_consumer, Reject, WebSocketConsumer};
/// use tower_channels::WebSocketLayer;
///
/// #[derive(Clone)]
/// struct User(String);
/// struct Inbox { user: User }
/// impl WebSocketConsumer for Inbox {}
///
/// let layer = WebSocketLayer::new().route(
///     "/ws/inbox",
///     try_consumer(|scope| async move {
///         // e.g. put there by an auth middleware outside the layer
///         let user = scope.extensions().get::<User>().cloned()
///             .ok_or_else(|| Reject::new(StatusCode::UNAUTHORIZED).body("log in first"))?;
///         Ok(Inbox { user })
///     }),
/// );
/// ```
pub fn try_consumer<F, Fut, C>(factory: F) -> TryConsumer<F>
where
    F: Fn(Scope) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<C, Reject>> + Send + 'static,
    C: WebSocketConsumer,
{
    TryConsumer { factory }
}

/// [`try_consumer`] for a [`JsonWebSocketConsumer`].
#[allow(clippy::type_complexity)]
pub fn try_json_consumer<F, Fut, C>(
    factory: F,
) -> TryConsumer<
    impl Fn(Scope) -> futures_util::future::MapOk<Fut, fn(C) -> JsonConsumer<C>>
        + Clone
        + Send
        + Sync
        + 'static,
>
where
    F: Fn(Scope) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<C, Reject>> + Send + 'static,
    C: JsonWebSocketConsumer,
{
    TryConsumer {
        factory: move |scope: Scope| {
            factory(scope).map_ok(JsonConsumer as fn(C) -> JsonConsumer<C>)
        },
    }
}

/// The service made by [`try_consumer`] and [`try_json_consumer`].
#[derive(Clone)]
pub struct TryConsumer<F> {
    factory: F,
}

impl<F> fmt::Debug for TryConsumer<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TryConsumer").finish_non_exhaustive()
    }
}

impl<F, Fut, C> Service<Connection> for TryConsumer<F>
where
    F: Fn(Scope) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<C, Reject>> + Send + 'static,
    C: WebSocketConsumer,
{
    type Response = ();
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<(), Infallible>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, conn: Connection) -> Self::Future {
        let making = (self.factory)(conn.scope().clone());
        Box::pin(async move {
            match making.await {
                Ok(consumer) => driver::run(consumer, conn).await,
                Err(reject) => conn.reject(reject),
            }
            Ok(())
        })
    }
}

/// Runs an axum extractor ([`FromRequestParts`](axum::extract::FromRequestParts))
/// on the upgrade request, with the app's `state`; its rejection becomes a
/// [`Reject`] with the same status, headers and body. For the factory of
/// [`try_consumer`] (feature `axum`).
///
/// Extractors see the request as a handler for the WebSocket route would:
/// [`Path`](axum::extract::Path) gets the route's parameters (after those of
/// enclosing `nest` prefixes) whether the layer is applied with
/// `Router::layer` or merged with
/// [`into_router`](crate::WebSocketLayer::into_router);
/// [`State<T>`](axum::extract::State) is `state`, or any `T:
/// FromRef<S>`, as in a handler. The router's own state does not reach a
/// layer, so pass the one you gave the router.
///
/// ```
/// use axum::extract::{FromRequestParts, State};
/// use http::{request::Parts, StatusCode};
/// use tower_channels::consumer::{extract, try_json_consumer, Context, JsonWebSocketConsumer};
///
/// #[derive(Clone)]
/// struct AppState { greeting: &'static str }
///
/// struct AuthUser(String);
/// impl<S: Send + Sync> FromRequestParts<S> for AuthUser {
///     type Rejection = (StatusCode, &'static str);
///     async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
///         match parts.headers.get("x-user").and_then(|v| v.to_str().ok()) {
///             Some(name) => Ok(AuthUser(name.to_owned())),
///             None => Err((StatusCode::UNAUTHORIZED, "who are you?")),
///         }
///     }
/// }
///
/// struct Hello { user: String, state: AppState }
/// impl JsonWebSocketConsumer for Hello {
///     type Incoming = serde_json::Value;
///     async fn receive_json(&mut self, ctx: &mut Context, _: serde_json::Value)
///         -> Result<(), tower_channels::channel_layer::BoxError> {
///         ctx.send(format!("{} {}", self.state.greeting, self.user))?;
///         Ok(())
///     }
/// }
///
/// let state = AppState { greeting: "hi" };
/// let hello = try_json_consumer(move |scope| {
///     let state = state.clone();
///     async move {
///         let AuthUser(user) = extract(&scope, &state).await?;
///         let State(state) = extract::<State<AppState>, _>(&scope, &state).await?;
///         Ok(Hello { user, state })
///     }
/// });
/// # let _ = tower_channels::WebSocketLayer::new().route("/ws", hello);
/// ```
#[cfg(feature = "axum")]
pub async fn extract<E, S>(scope: &Scope, state: &S) -> Result<E, Reject>
where
    E: axum::extract::FromRequestParts<S>,
    S: Send + Sync,
{
    use axum::response::IntoResponse;

    /// Rejection bodies are short texts; anything longer is cut.
    const MAX_REJECTION_BODY: usize = 16 * 1024;

    let mut parts = axum_parts(scope).await;
    match E::from_request_parts(&mut parts, state).await {
        Ok(value) => Ok(value),
        Err(rejection) => {
            let (parts, body) = rejection.into_response().into_parts();
            let body = axum::body::to_bytes(body, MAX_REJECTION_BODY)
                .await
                .unwrap_or_default();
            let mut reject = Reject::new(parts.status).body(body);
            for (name, value) in &parts.headers {
                if name == http::header::CONTENT_LENGTH || name == http::header::CONTENT_TYPE {
                    continue;
                }
                if let Ok(value) = value.to_str() {
                    reject = reject.header(name.as_str(), value);
                }
            }
            Err(reject)
        }
    }
}

/// The upgrade request's parts as an axum handler for the scope's route
/// would see them: with the route's path parameters where axum's
/// [`Path`](axum::extract::Path) and
/// [`RawPathParams`](axum::extract::RawPathParams) read them.
///
/// Mounted with [`into_router`](crate::WebSocketLayer::into_router) the
/// request went through axum's router, which stored them already. Under
/// `Router::layer` it did not (the WebSocket path is no axum route), so the
/// request is routed here through a one-route axum router with the scope's
/// pattern; axum appends the parameters to those of enclosing `nest`
/// prefixes, as it does for its own routes. axum keeps them in a private
/// type, so routing is the only way to put them there.
#[cfg(feature = "axum")]
async fn axum_parts(scope: &Scope) -> http::request::Parts {
    use axum::extract::{FromRequestParts, RawPathParams, Request};
    use axum::response::IntoResponse;

    /// Carries the routed request's extensions out of the handler.
    #[derive(Clone)]
    struct Routed(http::Extensions);

    let mut request = http::Request::new(());
    *request.method_mut() = scope.method().clone();
    *request.uri_mut() = scope.uri().clone();
    *request.version_mut() = scope.version();
    *request.headers_mut() = scope.headers().clone();
    *request.extensions_mut() = scope.extensions().clone();
    let (mut parts, ()) = request.into_parts();
    if scope.params().is_empty() {
        return parts;
    }
    if let Ok(raw) = RawPathParams::from_request_parts(&mut parts, &()).await {
        let routed_here = scope
            .params()
            .iter()
            .all(|(name, _)| raw.iter().any(|(key, _)| key == name));
        if routed_here {
            return parts;
        }
    }
    // The layer's patterns are valid axum paths (`into_router` mounts them);
    // should one not be, `Path` answers as before instead of a panic.
    let Ok(mut router) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        axum::Router::<()>::new().route(
            scope.route(),
            axum::routing::any(|request: Request| async move {
                let mut response = ().into_response();
                let (parts, _) = request.into_parts();
                response.extensions_mut().insert(Routed(parts.extensions));
                response
            }),
        )
    })) else {
        return parts;
    };
    let routed = tower_service::Service::call(
        &mut router,
        http::Request::from_parts(parts.clone(), axum::body::Body::empty()),
    );
    let Ok(mut response) = routed.await;
    if let Some(Routed(extensions)) = response.extensions_mut().remove::<Routed>() {
        parts.extensions = extensions;
    }
    parts
}
