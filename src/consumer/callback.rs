use std::{convert::Infallible, fmt, future::Future, task::Poll};

use futures_util::FutureExt;
use tower_service::Service;

use super::{driver, Accept, Connection, Context, Reject};
use crate::{
    channel_layer::{BoxError, BoxFuture, Event},
    engine::Outbound,
    message::{CloseCode, Message},
    Scope,
};

/// A consumer written as callbacks: Django's `AsyncWebsocketConsumer`.
///
/// A new value is made for every connection (see [`websocket_consumer`]). Every method
/// has a default, so implement only what you need.
///
/// # When the callbacks are called
///
/// * [`connect`](Self::connect) once, before the handshake is answered: return
///   [`Accept`] (optionally choosing a subprotocol) or a [`Reject`] with the
///   HTTP status the client gets (403 by default).
/// * [`receive`](Self::receive) for every text or binary message.
/// * [`event`](Self::event) for every channel-layer event sent to this
///   connection's channel or one of its groups.
/// * [`disconnect`](Self::disconnect) once, with the close code, after the
///   connection closed for any reason (client close, server close, timeout,
///   handler error). Not called if `connect` rejected, nor after a panic.
///
/// Handlers of one connection run one at a time, in order; other connections
/// are unaffected by a slow handler. While a handler runs, the connection
/// keeps answering pings and writing what the handler sends.
///
/// A handler returning `Err` closes the connection with 1011 and the error is
/// logged (except [`UnhandledEvent`](super::UnhandledEvent), which is
/// ignored and counted); a handler that panics closes with 1011, its groups are left, and
/// only this connection is affected.
///
/// # Example
///
/// ```
/// use tower_channels::consumer::{Context, WebSocketConsumer};
/// use tower_channels::channel_layer::{BoxError, Event};
/// use tower_channels::message::Message;
///
/// struct Chat { group: String }
///
/// impl WebSocketConsumer for Chat {
///     async fn connect(&mut self, ctx: &mut Context) -> Result<tower_channels::consumer::Accept, tower_channels::consumer::Reject> {
///         ctx.group_add(&self.group).await?;
///         Ok(Default::default())
///     }
///
///     async fn receive(&mut self, ctx: &mut Context, msg: Message) -> Result<(), BoxError> {
///         if let Message::Text(text) = msg {
///             // Encoded once, forwarded by every member's default `event`.
///             ctx.group_send(&self.group, Event::text("chat.message", text)).await?;
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait WebSocketConsumer: Send + 'static {
    /// Decides the handshake. The default accepts without a subprotocol.
    fn connect(
        &mut self,
        ctx: &mut Context,
    ) -> impl Future<Output = Result<Accept, Reject>> + Send {
        let _ = ctx;
        async { Ok(Accept::new()) }
    }

    /// Handles a text or binary message from the client. The default ignores it.
    fn receive(
        &mut self,
        ctx: &mut Context,
        message: Message,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let _ = (ctx, message);
        async { Ok(()) }
    }

    /// Handles a channel-layer event.
    ///
    /// The default forwards events that carry a WebSocket message
    /// ([`Event::message`], the "fastlane") to the client unchanged and
    /// ignores any other event with a warning and a count
    /// ([`UnhandledEvent`](super::UnhandledEvent)); Django closes instead,
    /// which [`forward_event_strict`](super::forward_event_strict) does.
    /// Dispatch on [`Event::kind`], or decode into a serde enum with
    /// [`Event::decode_tagged`], to handle typed events.
    fn event(
        &mut self,
        ctx: &mut Context,
        event: Event,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let result = forward_event(ctx, &event);
        async move { result }
    }

    /// Runs once after the connection closed, with the close code (the
    /// client's, or the server's when it closed first; 1006 when the
    /// connection dropped without a close frame).
    fn disconnect(
        &mut self,
        ctx: &mut Context,
        code: CloseCode,
    ) -> impl Future<Output = ()> + Send {
        let _ = (ctx, code);
        async {}
    }
}

/// The default `event` behaviour: forward fastlane messages; for any other
/// event return [`UnhandledEvent`](super::UnhandledEvent), which the
/// connection logs, counts and ignores (it does not close).
///
/// A text or binary event is written from its shared payload: a group send
/// to 1,000 members is compressed once per negotiated parameter set.
pub fn forward_event(ctx: &Context, event: &Event) -> Result<(), BoxError> {
    if let Some(p) = event.shared_payload() {
        return Ok(ctx.send_out(Outbound::Shared(p.clone()))?);
    }
    match event.as_message() {
        Some(m) => Ok(ctx.send(m.clone())?),
        None => Err(super::UnhandledEvent::new(event.kind()).into()),
    }
}

/// Makes a consumer service from a factory that builds one
/// [`WebSocketConsumer`] per connection from its scope.
///
/// ```
/// use tower_channels::{consumer::{websocket_consumer, WebSocketConsumer}, WebSocketLayer};
///
/// struct Room { name: String }
/// impl WebSocketConsumer for Room {}
///
/// let layer = WebSocketLayer::new().route(
///     "/ws/chat/{room}",
///     websocket_consumer(|scope| Room { name: scope.param("room").unwrap_or_default().to_owned() }),
/// );
/// ```
pub fn websocket_consumer<F, C>(factory: F) -> CallbackConsumer<F>
where
    F: Fn(&Scope) -> C + Clone + Send + Sync + 'static,
    C: WebSocketConsumer,
{
    CallbackConsumer { factory }
}

/// Renamed [`websocket_consumer`] (a function named like its module).
#[deprecated(since = "0.1.0", note = "renamed to `websocket_consumer`")]
pub fn consumer<F, C>(factory: F) -> CallbackConsumer<F>
where
    F: Fn(&Scope) -> C + Clone + Send + Sync + 'static,
    C: WebSocketConsumer,
{
    websocket_consumer(factory)
}

/// The [`Service`] made by [`websocket_consumer`]: runs a [`WebSocketConsumer`] per connection.
#[derive(Clone)]
pub struct CallbackConsumer<F> {
    factory: F,
}

impl<F> fmt::Debug for CallbackConsumer<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallbackConsumer").finish_non_exhaustive()
    }
}

impl<F, C> Service<Connection> for CallbackConsumer<F>
where
    F: Fn(&Scope) -> C + Clone + Send + Sync + 'static,
    C: WebSocketConsumer,
{
    type Response = ();
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<(), Infallible>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, conn: Connection) -> Self::Future {
        let consumer = (self.factory)(conn.scope());
        // Not an `async` block: it would hold `consumer` and `conn` again
        // beside the future it awaits, for the life of the connection.
        Box::pin(driver::run(consumer, conn).map(Ok))
    }
}
