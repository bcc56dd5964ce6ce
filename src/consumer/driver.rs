//! The callback loop behind [`WebSocketConsumer`]: hands the engine's input
//! to the handlers, one at a time. The engine keeps the socket serviced
//! (pings, pongs, writes, read-ahead, limits) while a handler runs: both are
//! polled by the connection task's host.

use std::{
    future::{poll_fn, Future},
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
};

use futures_util::FutureExt;

use super::{Connection, Context, Incoming, Reject, WebSocketConsumer};
use crate::{
    channel_layer::BoxError,
    engine::{panic_message, Link, Status},
    message::{close_code, CloseCode, CloseFrame, Message},
    metrics::{Handler, HandlerTimer},
};

enum Outcome {
    Done,
    Failed(BoxError),
    Panicked(String),
}

/// Runs `consumer` on `conn` from handshake to disconnect.
///
/// The handshake runs in a boxed future of its own, made here, before the
/// loop's future: an `async fn`'s arguments keep their place in its state
/// for its whole life, so `run` being `async` would hold the `Connection`
/// (and the consumer) a second time for the life of the connection. The
/// loop's state is what an idle connection's application side costs.
pub(crate) fn run<C: WebSocketConsumer>(
    consumer: C,
    conn: Connection,
) -> impl Future<Output = ()> + Send {
    serve(Box::pin(open(consumer, conn)))
}

/// The callback loop, after the handshake `open`.
async fn serve<C, F>(open: Pin<Box<F>>)
where
    C: WebSocketConsumer,
    F: Future<Output = Option<(C, Context, Arc<Link>)>> + Send,
{
    let Some((mut consumer, mut ctx, link)) = open.await else {
        return;
    };
    let mut timer = HandlerTimer::default();
    let code = loop {
        // Events `Context::join` recovered go first, then the inbox.
        let recovered = ctx.resume.as_mut().and_then(|r| r.next_recovered());
        let input = match recovered {
            Some(event) => Ok(Incoming::Event(event)),
            None => {
                poll_fn(|cx| {
                    let input = next_input(&link, cx);
                    if input.is_pending() {
                        timer.waited();
                    }
                    input
                })
                .await
            }
        };
        let input = match input {
            Ok(input) => input,
            Err(code) => break code,
        };
        let (handler, timed) = match &input {
            Incoming::Message(_) => (Handler::Receive, true),
            Incoming::Event(_) => (Handler::Event, link.runtime.config.time_event_handlers),
            Incoming::Lagged(_) => (Handler::Event, false),
        };
        timer.start(handler, timed);
        let outcome = match input {
            // Handler futures are boxed while they run: inline, the largest
            // of them would be part of every idle connection's state.
            Incoming::Message(m) => guard(Box::pin(consumer.receive(&mut ctx, m))).await,
            Incoming::Event(e) if ctx.resume.as_mut().is_some_and(|r| r.skips(&e)) => {
                // Recovery delivered it already, or the consumer asked to
                // skip its own presence changes (`Join`).
                Outcome::Done
            }
            Incoming::Event(e) => guard(Box::pin(consumer.event(&mut ctx, e))).await,
            Incoming::Lagged(n) => {
                link.runtime.metrics.dropped_slow(n);
                tracing::warn!(dropped = n, "slow consumer: events dropped; closing");
                link.close(
                    CloseFrame::new(close_code::SLOW_CONSUMER, "slow consumer: events dropped"),
                    false,
                );
                Outcome::Done
            }
        };
        timer.finish(&link.runtime.metrics);
        match outcome {
            Outcome::Done => {}
            Outcome::Failed(e) => {
                if link.status() != Status::Open {
                    // Typically a send that failed because the connection is closing.
                    tracing::debug!(
                        error = &*e as &(dyn std::error::Error + 'static),
                        "consumer handler failed while closing"
                    );
                } else if let Some(unhandled) = e.downcast_ref::<super::UnhandledEvent>() {
                    // An event type this consumer does not know: not fatal.
                    super::unhandled::log_ignored(unhandled.kind());
                    link.runtime.metrics.ignored_event();
                } else if link.lock().overflow {
                    // The send failed because the client is too slow: the
                    // engine closes with 4008, not as a consumer error.
                } else {
                    tracing::error!(
                        error = &*e as &(dyn std::error::Error + 'static),
                        "consumer handler failed; closing with 1011"
                    );
                    link.close(CloseFrame::new(close_code::ERROR, "internal error"), false);
                }
            }
            Outcome::Panicked(msg) => {
                tracing::error!(panic = %msg, "consumer panicked; closing with 1011");
                link.runtime.metrics.panicked();
                link.close(CloseFrame::new(close_code::ERROR, "internal error"), false);
            }
        }
    };
    // `disconnect` runs after every accepted connection, a handler's panic
    // included, so per-connection app state (presence, counters) is released.
    if let Err(p) = AssertUnwindSafe(Box::pin(consumer.disconnect(&mut ctx, code)))
        .catch_unwind()
        .await
    {
        tracing::error!(panic = %panic_message(&*p), "consumer panicked in disconnect");
        link.runtime.metrics.panicked();
    }
    tracing::debug!(code, "connection closed");
}

/// The handshake: creates the channel, runs `connect`, answers the client.
async fn open<C: WebSocketConsumer>(
    mut consumer: C,
    mut conn: Connection,
) -> Option<(C, Context, Arc<Link>)> {
    let link = match conn.link().await {
        Ok(l) => l.clone(),
        Err(e) => {
            conn.reject(Reject::from(e));
            return None;
        }
    };
    tracing::Span::current().record("channel", link.channel_name());
    let mut ctx = Context::new(conn.scope.clone(), link.app_handle());
    let decided = AssertUnwindSafe(consumer.connect(&mut ctx))
        .catch_unwind()
        .await;
    let accept = match decided {
        Ok(Ok(accept)) => accept,
        Ok(Err(reject)) => {
            conn.reject(reject);
            link.leave_groups().await;
            return None;
        }
        Err(panic) => {
            tracing::error!(panic = %panic_message(&*panic), "consumer panicked in connect");
            link.runtime.metrics.panicked();
            conn.reject(Reject::new(http::StatusCode::INTERNAL_SERVER_ERROR));
            link.leave_groups().await;
            return None;
        }
    };
    match conn.accept_engine(accept).await {
        Ok(_) => Some((consumer, ctx, link)),
        Err(e) => {
            tracing::debug!(error = %e, "handshake not completed");
            link.leave_groups().await;
            None
        }
    }
}

/// The next input for a handler, or the close code once the connection is
/// over (the callback forms see the peer's close through `disconnect`).
fn next_input(link: &Link, cx: &mut TaskContext<'_>) -> Poll<Result<Incoming, CloseCode>> {
    loop {
        match link.poll_incoming(cx) {
            Poll::Ready(Some(Incoming::Message(Message::Close(_)))) => continue,
            Poll::Ready(Some(input)) => return Poll::Ready(Ok(input)),
            Poll::Ready(None) => return link.poll_closed(cx).map(Err),
            Poll::Pending => return Poll::Pending,
        }
    }
}

/// Runs a handler, turning a panic into an outcome.
async fn guard<F>(fut: F) -> Outcome
where
    F: Future<Output = Result<(), BoxError>>,
{
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(Ok(())) => Outcome::Done,
        Ok(Err(e)) => Outcome::Failed(e),
        Err(p) => Outcome::Panicked(panic_message(&*p)),
    }
}
