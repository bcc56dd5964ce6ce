use std::{fmt, future::Future};

use serde::de::DeserializeOwned;

use super::{
    callback::forward_event, websocket_consumer, Accept, CallbackConsumer, Context, Reject,
    WebSocketConsumer,
};
use crate::{
    channel_layer::{BoxError, Event},
    message::{close_code, CloseCode, Message},
    Scope,
};

/// A consumer that speaks JSON: Django's `AsyncJsonWebsocketConsumer`, typed.
///
/// Incoming text is decoded into [`Incoming`](Self::Incoming) with serde;
/// send JSON back with [`Context::send_json`]. Wrap it with [`json_consumer`].
///
/// # Decode failures
///
/// A message that does not decode goes to [`decode_error`](Self::decode_error),
/// whose default closes the connection: **1003** (unsupported data) for a
/// binary message, **1007** (invalid payload) for text that is not valid JSON
/// for `Incoming`, with the serde error as reason. Never a panic.
///
/// ```
/// use serde::Deserialize;
/// use tower_channels::consumer::{json_consumer, Context, JsonWebSocketConsumer};
/// use tower_channels::channel_layer::BoxError;
///
/// #[derive(Deserialize)]
/// #[serde(tag = "op")]
/// enum Cmd { Add { a: i64, b: i64 } }
///
/// struct Calc;
/// impl JsonWebSocketConsumer for Calc {
///     type Incoming = Cmd;
///     async fn receive_json(&mut self, ctx: &mut Context, cmd: Cmd) -> Result<(), BoxError> {
///         match cmd {
///             Cmd::Add { a, b } => ctx.send_json(&serde_json::json!({ "sum": a + b }))?,
///         }
///         Ok(())
///     }
/// }
///
/// let service = json_consumer(|_scope| Calc);
/// ```
pub trait JsonWebSocketConsumer: Send + 'static {
    /// The type incoming text messages decode into.
    type Incoming: DeserializeOwned + Send + 'static;

    /// Decides the handshake; see [`WebSocketConsumer::connect`].
    fn connect(
        &mut self,
        ctx: &mut Context,
    ) -> impl Future<Output = Result<Accept, Reject>> + Send {
        let _ = ctx;
        async { Ok(Accept::new()) }
    }

    /// Handles one decoded message.
    fn receive_json(
        &mut self,
        ctx: &mut Context,
        message: Self::Incoming,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Handles a message that did not decode; see the trait docs for the default.
    fn decode_error(
        &mut self,
        ctx: &mut Context,
        error: JsonDecodeError,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        ctx.close(error.close_code(), error.close_reason());
        async { Ok(()) }
    }

    /// Handles a channel-layer event; see [`WebSocketConsumer::event`].
    fn event(
        &mut self,
        ctx: &mut Context,
        event: Event,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let result = forward_event(ctx, &event);
        async move { result }
    }

    /// Runs after the connection closed; see [`WebSocketConsumer::disconnect`].
    fn disconnect(
        &mut self,
        ctx: &mut Context,
        code: CloseCode,
    ) -> impl Future<Output = ()> + Send {
        let _ = (ctx, code);
        async {}
    }
}

/// Why an incoming message did not decode.
#[derive(Debug)]
pub struct JsonDecodeError {
    binary: bool,
    source: Option<serde_json::Error>,
}

impl JsonDecodeError {
    /// Whether the message was binary rather than text.
    pub fn is_binary(&self) -> bool {
        self.binary
    }

    /// The close reason the default handler sends: the Display text, with
    /// serde's description for bad JSON (e.g. `invalid JSON: expected value
    /// at line 1 column 1`), so a developer sees it in the browser.
    pub(crate) fn close_reason(&self) -> String {
        match &self.source {
            Some(e) => format!("{self}: {e}"),
            None => self.to_string(),
        }
    }

    /// The close code the default handler uses: 1003 for binary, 1007 for bad JSON.
    pub fn close_code(&self) -> CloseCode {
        if self.binary {
            close_code::UNSUPPORTED
        } else {
            close_code::INVALID
        }
    }
}

impl fmt::Display for JsonDecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.binary {
            "binary messages are not supported"
        } else {
            "invalid JSON"
        })
    }
}

impl std::error::Error for JsonDecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// Adapts a [`JsonWebSocketConsumer`] to [`WebSocketConsumer`] (what
/// [`json_consumer`] runs).
#[derive(Debug, Clone)]
pub struct JsonConsumer<C>(pub C);

/// Renamed [`JsonConsumer`] (it clashed with `axum::Json`).
#[deprecated(since = "0.1.0", note = "renamed to `JsonConsumer`")]
pub type Json<C> = JsonConsumer<C>;

impl<C: JsonWebSocketConsumer> WebSocketConsumer for JsonConsumer<C> {
    fn connect(
        &mut self,
        ctx: &mut Context,
    ) -> impl Future<Output = Result<Accept, Reject>> + Send {
        self.0.connect(ctx)
    }

    async fn receive(&mut self, ctx: &mut Context, message: Message) -> Result<(), BoxError> {
        let decoded = match &message {
            Message::Text(t) => {
                serde_json::from_str::<C::Incoming>(t).map_err(|e| JsonDecodeError {
                    binary: false,
                    source: Some(e),
                })
            }
            _ => Err(JsonDecodeError {
                binary: true,
                source: None,
            }),
        };
        match decoded {
            Ok(m) => self.0.receive_json(ctx, m).await,
            Err(e) => self.0.decode_error(ctx, e).await,
        }
    }

    fn event(
        &mut self,
        ctx: &mut Context,
        event: Event,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        self.0.event(ctx, event)
    }

    fn disconnect(
        &mut self,
        ctx: &mut Context,
        code: CloseCode,
    ) -> impl Future<Output = ()> + Send {
        self.0.disconnect(ctx, code)
    }
}

/// Makes a consumer service from a factory of [`JsonWebSocketConsumer`]s.
pub fn json_consumer<F, C>(
    factory: F,
) -> CallbackConsumer<impl Fn(&Scope) -> JsonConsumer<C> + Clone + Send + Sync + 'static>
where
    F: Fn(&Scope) -> C + Clone + Send + Sync + 'static,
    C: JsonWebSocketConsumer,
{
    websocket_consumer(move |scope: &Scope| JsonConsumer(factory(scope)))
}
