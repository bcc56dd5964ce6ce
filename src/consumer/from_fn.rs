use std::{fmt, future::Future, task::Poll};

use tower_service::Service;

use super::Connection;
use crate::channel_layer::BoxError;

/// A consumer service from an async closure over the raw [`Connection`].
///
/// ```
/// use tower_channels::consumer::{from_fn, Accept, Connection};
/// use tower_channels::WebSocketLayer;
///
/// let echo = from_fn(|conn: Connection| async move {
///     let mut ws = conn.accept(Accept::new()).await?;
///     while let Some(Ok(msg)) = ws.recv().await {
///         if msg.is_close() { break; }
///         ws.send(msg).await?;
///     }
///     Ok(())
/// });
/// let layer = WebSocketLayer::new().route("/ws/echo", echo);
/// ```
pub fn from_fn<F, Fut>(f: F) -> FromFn<F>
where
    F: Fn(Connection) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    FromFn { f }
}

/// The service made by [`from_fn`].
#[derive(Clone)]
pub struct FromFn<F> {
    f: F,
}

impl<F> fmt::Debug for FromFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FromFn").finish_non_exhaustive()
    }
}

impl<F, Fut> Service<Connection> for FromFn<F>
where
    F: Fn(Connection) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = Fut;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, conn: Connection) -> Fut {
        (self.f)(conn)
    }
}
