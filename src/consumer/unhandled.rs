//! Events no handler takes: ignored by default (rolling deploys), or fatal
//! on request (Django's behaviour).

use std::{
    collections::HashSet,
    fmt,
    sync::{Mutex, OnceLock},
};

use super::Context;
use crate::{channel_layer::Event, BoxError};

/// The error [`forward_event`](super::forward_event) returns for an event
/// that carries no WebSocket message and that no handler took.
///
/// A handler that returns it (directly or with `?`) does **not** close the
/// connection: the connection logs a warning (once per event type and
/// process, then at DEBUG), counts it in
/// [`ConnectionStats::ignored_events`](crate::ConnectionStats::ignored_events)
/// (`tower_channels_ignored_events_total` with the `metrics` feature) and
/// goes on. So a newer process that adds an event type in a rolling deploy
/// does not disconnect every member on the older ones. For Django's
/// behaviour (close with 1011), call [`forward_event_strict`] instead.
#[derive(Debug)]
pub struct UnhandledEvent {
    kind: String,
}

impl UnhandledEvent {
    /// An unhandled event of type `kind`.
    pub fn new(kind: impl Into<String>) -> Self {
        Self { kind: kind.into() }
    }

    /// The event's type.
    pub fn kind(&self) -> &str {
        &self.kind
    }
}

impl fmt::Display for UnhandledEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no handler for event type {:?}", self.kind)
    }
}

impl std::error::Error for UnhandledEvent {}

/// An event no handler took is fatal: [`forward_event`](super::forward_event)
/// but failing (and so closing the connection with 1011, as Django does) on
/// an event without a WebSocket message.
///
/// ```
/// use tower_channels::{
///     channel_layer::Event,
///     consumer::{forward_event_strict, Context, WebSocketConsumer},
///     BoxError,
/// };
///
/// struct Strict;
///
/// impl WebSocketConsumer for Strict {
///     async fn event(&mut self, ctx: &mut Context, event: Event) -> Result<(), BoxError> {
///         forward_event_strict(ctx, &event)
///     }
/// }
/// ```
pub fn forward_event_strict(ctx: &Context, event: &Event) -> Result<(), BoxError> {
    match super::forward_event(ctx, event) {
        Err(e) => match e.downcast::<UnhandledEvent>() {
            Ok(unhandled) => Err(format!("{unhandled} (strict)").into()),
            Err(other) => Err(other),
        },
        ok => ok,
    }
}

/// Logs an ignored event: a warning the first time a type is seen in this
/// process (at most [`MAX_WARNED`] types remembered), DEBUG afterwards, so a
/// group of thousands does not log thousands of lines per event.
pub(crate) fn log_ignored(kind: &str) {
    const MAX_WARNED: usize = 256;
    static WARNED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let mut warned = WARNED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if warned.len() < MAX_WARNED && warned.insert(kind.to_owned()) {
        tracing::warn!(
            event_type = kind,
            "no handler for event type; ignored (further ones at DEBUG)"
        );
    } else {
        tracing::debug!(event_type = kind, "no handler for event type; ignored");
    }
}
