//! The per-connection loop behind [`WebsocketConsumer`]: one task per
//! connection runs the handlers one at a time while it keeps the socket
//! serviced (pings, pongs, writes, read-ahead) and enforces the limits.

use std::{
    any::Any,
    collections::VecDeque,
    future::{poll_fn, Future},
    panic::AssertUnwindSafe,
    pin::{pin, Pin},
    sync::Arc,
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use futures_util::{FutureExt, Sink, Stream};
use tokio::{
    sync::futures::OwnedNotified,
    time::{Instant, Sleep},
};
use tokio_tungstenite::tungstenite::Message as TsMessage;

use super::{context::Outbound, Connection, Context, Reject, WebSocket, WebsocketConsumer};
use crate::{
    channel_layer::{BoxError, Event, RecvError},
    message::{close_code, CloseCode, CloseFrame, Message},
    Error, RateLimit, WebSocketConfig,
};

enum Input {
    Message(Message),
    Event(Event),
    Closed(CloseCode),
}

enum Outcome {
    Done,
    Failed(BoxError),
    Panicked(String),
}

/// Runs `consumer` on `conn` from handshake to disconnect.
///
/// The handshake and the final cleanup run in boxed futures of their own, so
/// the state this task keeps for the (long) life of the connection holds only
/// what the message loop needs: that is most of an idle connection's memory.
pub(crate) async fn run<C: WebsocketConsumer>(consumer: C, conn: Connection) {
    let Some((mut consumer, mut ctx, mut io)) = Box::pin(open(consumer, conn)).await else {
        return;
    };
    let runtime = io.ws.runtime.clone();
    runtime.metrics.opened();
    let mut panicked = false;
    let code = loop {
        let input = poll_fn(|cx| io.poll_io(cx, true)).await;
        let started = std::time::Instant::now();
        let outcome = match input {
            Input::Message(m) => run_handler(consumer.receive(&mut ctx, m), &mut io).await,
            Input::Event(e) => run_handler(consumer.event(&mut ctx, e), &mut io).await,
            Input::Closed(code) => break code,
        };
        runtime.metrics.handler_time(started.elapsed());
        match outcome {
            Outcome::Done => {}
            Outcome::Failed(e) => {
                if io.closing.is_some() || io.terminated.is_some() {
                    // Typically a send that failed because the connection is closing.
                    tracing::debug!(error = %e, "consumer handler failed while closing");
                } else if let Some(unhandled) = e.downcast_ref::<super::UnhandledEvent>() {
                    // An event type this consumer does not know: not fatal.
                    super::unhandled::log_ignored(unhandled.kind());
                    runtime.metrics.ignored_event();
                } else if io.outbound.lock().overflow {
                    // The send failed because the client is too slow: poll_write
                    // closes with SLOW_CONSUMER, not as a consumer error.
                } else {
                    tracing::error!(error = %e, "consumer handler failed; closing with 1011");
                    io.start_close(close_code::ERROR, "internal error");
                }
            }
            Outcome::Panicked(msg) => {
                tracing::error!(panic = %msg, "consumer panicked; closing with 1011");
                runtime.metrics.panicked();
                panicked = true;
                io.start_close(close_code::ERROR, "internal error");
            }
        }
    };
    drop(io);
    Box::pin(finish(consumer, ctx, code, panicked)).await;
    runtime.metrics.closed();
    runtime.metrics.closed_with(code);
}

/// The handshake: creates the channel, runs `connect`, answers the client.
async fn open<C: WebsocketConsumer>(
    mut consumer: C,
    mut conn: Connection,
) -> Option<(C, Context, Io)> {
    let runtime = conn.runtime.clone();
    let channel_name = match conn.channel_name().await {
        Ok(n) => n.to_owned(),
        Err(e) => {
            conn.reject(Reject::from(e));
            return None;
        }
    };
    tracing::Span::current().record("channel", channel_name.as_str());
    let outbound = Arc::new(Outbound::new(runtime.config.max_outbound_bytes));
    let mut ctx = Context::new(
        conn.scope.clone(),
        runtime.channel_layer.clone(),
        channel_name,
        outbound.clone(),
    );
    let decided = AssertUnwindSafe(consumer.connect(&mut ctx))
        .catch_unwind()
        .await;
    let accept = match decided {
        Ok(Ok(accept)) => accept,
        Ok(Err(reject)) => {
            conn.reject(reject);
            ctx.leave_groups().await;
            return None;
        }
        Err(panic) => {
            tracing::error!(panic = %panic_message(&*panic), "consumer panicked in connect");
            conn.reject(Reject::new(http::StatusCode::INTERNAL_SERVER_ERROR));
            ctx.leave_groups().await;
            return None;
        }
    };
    match conn.accept(accept).await {
        Ok(ws) => {
            let io = Io::new(ws, outbound, &runtime.config);
            Some((consumer, ctx, io))
        }
        Err(e) => {
            tracing::debug!(error = %e, "handshake not completed");
            ctx.leave_groups().await;
            None
        }
    }
}

/// After the connection closed: `disconnect` (unless a handler panicked),
/// then leave every group.
async fn finish<C: WebsocketConsumer>(
    mut consumer: C,
    mut ctx: Context,
    code: CloseCode,
    panicked: bool,
) {
    if !panicked {
        if let Err(p) = AssertUnwindSafe(consumer.disconnect(&mut ctx, code))
            .catch_unwind()
            .await
        {
            tracing::error!(panic = %panic_message(&*p), "consumer panicked in disconnect");
        }
    }
    ctx.leave_groups().await;
    tracing::debug!(code, "connection closed");
}

/// Polls the handler to completion while servicing the socket in the background.
async fn run_handler<F>(fut: F, io: &mut Io) -> Outcome
where
    F: Future<Output = Result<(), BoxError>>,
{
    let mut fut = pin!(AssertUnwindSafe(fut).catch_unwind());
    poll_fn(|cx| {
        if let Poll::Ready(r) = fut.as_mut().poll(cx) {
            return Poll::Ready(match r {
                Ok(Ok(())) => Outcome::Done,
                Ok(Err(e)) => Outcome::Failed(e),
                Err(p) => Outcome::Panicked(panic_message(&*p)),
            });
        }
        // Only `Closed` can come back with `accept = false`; it is remembered.
        let _ = io.poll_io(cx, false);
        Poll::Pending
    })
    .await
}

fn panic_message(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// The socket side of a connection.
struct Io {
    ws: WebSocket,
    outbound: Arc<Outbound>,
    pending_in: VecDeque<Message>,
    max_pending: usize,
    /// The close code once closing started (ours, or the peer's).
    closing: Option<CloseCode>,
    close_to_send: Option<CloseFrame>,
    /// Drop the connection as soon as our close frame is flushed (the peer
    /// broke the protocol or stopped answering; no reply is awaited).
    fail_fast: bool,
    terminated: Option<CloseCode>,
    dirty: bool,
    read_done: bool,
    inbox_done: bool,
    ping_due: bool,
    timer: Option<Pin<Box<Sleep>>>,
    ping_interval: Option<Duration>,
    idle_timeout: Option<Duration>,
    close_timeout: Duration,
    last_seen: Instant,
    next_ping: Option<Instant>,
    close_deadline: Option<Instant>,
    /// Registered once on the first poll; woken when shutdown starts.
    shutdown: Option<Pin<Box<OwnedNotified>>>,
    shutdown_registered: bool,
    rate: Option<(RateLimit, f64, Instant)>,
}

impl Io {
    fn new(ws: WebSocket, outbound: Arc<Outbound>, config: &WebSocketConfig) -> Self {
        let now = Instant::now();
        let mut io = Io {
            ws,
            outbound,
            pending_in: VecDeque::new(),
            max_pending: config.max_buffered_messages.max(1),
            closing: None,
            close_to_send: None,
            fail_fast: false,
            terminated: None,
            dirty: true,
            read_done: false,
            inbox_done: false,
            ping_due: false,
            timer: None,
            ping_interval: config.ping_interval,
            idle_timeout: config.idle_timeout,
            close_timeout: config.close_timeout,
            last_seen: now,
            next_ping: config.ping_interval.map(|i| now + i),
            close_deadline: None,
            shutdown: None,
            shutdown_registered: false,
            rate: config
                .rate_limit
                .map(|r| (r, f64::from(r.burst.max(1)), now)),
        };
        io.shutdown = Some(Box::pin(
            io.ws.runtime.tracker.signal.clone().notified_owned(),
        ));
        io.rearm_timer();
        io
    }

    fn next_deadline(&self) -> Option<Instant> {
        if self.closing.is_some() {
            // Pings and idleness no longer matter, only the close handshake.
            return self.close_deadline;
        }
        let idle = self.idle_timeout.map(|t| self.last_seen + t);
        [self.close_deadline, idle, self.next_ping]
            .into_iter()
            .flatten()
            .min()
    }

    fn rearm_timer(&mut self) {
        match (self.next_deadline(), &mut self.timer) {
            (Some(d), Some(t)) => t.as_mut().reset(d),
            (Some(d), None) => self.timer = Some(Box::pin(tokio::time::sleep_until(d))),
            (None, _) => self.timer = None,
        }
    }

    fn terminate(&mut self, code: CloseCode) {
        if self.terminated.is_none() {
            self.terminated = Some(code);
            self.outbound.lock().closed = true;
        }
    }

    /// Starts the closing handshake: no more input is handed to the consumer
    /// and queued output is dropped.
    fn start_close(&mut self, code: CloseCode, reason: &'static str) {
        self.start_close_frame(CloseFrame::new(code, reason), true);
    }

    fn start_close_frame(&mut self, frame: CloseFrame, drop_queued: bool) {
        if self.closing.is_some() || self.terminated.is_some() {
            return;
        }
        self.closing = Some(frame.code);
        self.close_to_send = Some(frame);
        {
            let mut st = self.outbound.lock();
            st.closed = true;
            if drop_queued {
                st.queue.clear();
                st.bytes = 0;
            }
        }
        self.pending_in.clear();
        self.close_deadline = Some(Instant::now() + self.close_timeout);
        self.rearm_timer();
    }

    /// Drives the socket. With `accept`, returns the next message or event
    /// for the consumer; without, only buffers input (a handler is running).
    /// Returns `Closed` once the connection is over.
    fn poll_io(&mut self, cx: &mut TaskContext<'_>, accept: bool) -> Poll<Input> {
        if !self.shutdown_registered {
            // One poll registers this task's waker with the shutdown signal;
            // polling again on every wake-up would take the shared lock.
            self.shutdown_registered = true;
            if let Some(n) = &mut self.shutdown {
                if n.as_mut().poll(cx).is_ready() {
                    self.shutdown = None;
                }
            }
        }
        loop {
            if let Some(code) = self.terminated {
                return Poll::Ready(Input::Closed(code));
            }
            if self.closing.is_none() && self.ws.runtime.tracker.is_shutting_down() {
                self.shutdown = None;
                self.start_close(close_code::AWAY, "server shutting down");
            }
            self.poll_write(cx);
            if self.terminated.is_some() {
                continue;
            }
            let open = self.closing.is_none();
            if accept && open {
                if let Some(m) = self.pending_in.pop_front() {
                    return Poll::Ready(Input::Message(m));
                }
            }
            if !self.read_done && (accept || self.pending_in.len() < self.max_pending) {
                match Pin::new(&mut self.ws.stream).poll_next(cx) {
                    Poll::Ready(Some(Ok(msg))) => {
                        self.last_seen = Instant::now();
                        match msg {
                            TsMessage::Text(_) | TsMessage::Binary(_) => {
                                if let (true, Some(m)) = (open, Message::from_tungstenite(msg)) {
                                    self.ws.runtime.metrics.message_in();
                                    self.ws.runtime.metrics.bytes_in(m.len());
                                    if !self.take_token() {
                                        tracing::debug!("rate limit exceeded; closing with 1008");
                                        self.start_close(close_code::POLICY, "rate limit exceeded");
                                        continue;
                                    }
                                    if accept && self.pending_in.is_empty() {
                                        return Poll::Ready(Input::Message(m));
                                    }
                                    self.pending_in.push_back(m);
                                }
                            }
                            TsMessage::Close(frame) => {
                                // tungstenite queued the reply; reading on
                                // flushes it and then ends the stream.
                                if open {
                                    let code = frame.map_or(close_code::STATUS, |f| f.code.into());
                                    self.closing = Some(code);
                                    self.outbound.lock().closed = true;
                                    self.pending_in.clear();
                                    self.close_deadline = Some(Instant::now() + self.close_timeout);
                                    self.rearm_timer();
                                }
                                self.dirty = true;
                            }
                            // Pongs to our pings are queued by tungstenite.
                            _ => self.dirty = true,
                        }
                        continue;
                    }
                    Poll::Ready(Some(Err(e))) => {
                        self.read_done = true;
                        let err = Error::from(e);
                        if let Some(code) = self.closing {
                            self.terminate(code);
                        } else if err.is_io() || err.is_closed() {
                            self.terminate(close_code::ABNORMAL);
                        } else {
                            tracing::debug!(error = %err, "peer error; failing the connection");
                            let reason = match err.close_code() {
                                close_code::SIZE => "message too big",
                                close_code::INVALID => "invalid utf-8",
                                _ => "protocol error",
                            };
                            self.fail_fast = true;
                            self.start_close(err.close_code(), reason);
                        }
                        continue;
                    }
                    Poll::Ready(None) => {
                        self.read_done = true;
                        self.terminate(self.closing.unwrap_or(close_code::ABNORMAL));
                        continue;
                    }
                    Poll::Pending => {}
                }
            }
            if accept && open && !self.inbox_done {
                match self.ws.inbox.poll_recv(cx) {
                    Poll::Ready(Ok(e)) => return Poll::Ready(Input::Event(e)),
                    Poll::Ready(Err(RecvError::Lagged(n))) => {
                        self.ws.runtime.metrics.dropped_slow(n);
                        tracing::warn!(dropped = n, "slow consumer: events dropped; closing");
                        self.start_close(
                            close_code::SLOW_CONSUMER,
                            "slow consumer: events dropped",
                        );
                        continue;
                    }
                    Poll::Ready(Err(_)) => self.inbox_done = true,
                    Poll::Pending => {}
                }
            }
            if self.dirty {
                match Pin::new(&mut self.ws.stream).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        self.dirty = false;
                        if self.fail_fast && self.close_to_send.is_none() && self.closing.is_some()
                        {
                            self.terminate(self.closing.unwrap_or(close_code::ABNORMAL));
                            continue;
                        }
                    }
                    Poll::Ready(Err(_)) => {
                        self.terminate(self.closing.unwrap_or(close_code::ABNORMAL));
                        continue;
                    }
                    Poll::Pending => {}
                }
            }
            if self.poll_timer(cx) {
                continue;
            }
            return Poll::Pending;
        }
    }

    /// Spends one token of the rate limit; false when the budget is exhausted.
    fn take_token(&mut self) -> bool {
        let Some((limit, tokens, last)) = &mut self.rate else {
            return true;
        };
        let now = Instant::now();
        let refill = now.duration_since(*last).as_secs_f64() * limit.per_second;
        *tokens = (*tokens + refill).min(f64::from(limit.burst.max(1)));
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Moves queued output into the socket's write buffer (no flush).
    fn poll_write(&mut self, cx: &mut TaskContext<'_>) {
        loop {
            if self.terminated.is_some() {
                return;
            }
            if self.close_to_send.is_none() && !self.ping_due {
                if self.closing.is_some() {
                    return;
                }
                let mut st = self.outbound.lock();
                if st.overflow {
                    drop(st);
                    self.ws.runtime.metrics.dropped_slow(1);
                    tracing::warn!("slow consumer: outbound queue full; closing");
                    self.start_close(
                        close_code::SLOW_CONSUMER,
                        "slow consumer: outbound queue full",
                    );
                    continue;
                }
                if st.queue.is_empty() {
                    let close = st.close.take();
                    drop(st);
                    match close {
                        Some(frame) => {
                            self.start_close_frame(frame, false);
                            continue;
                        }
                        None => return,
                    }
                }
            }
            match Pin::new(&mut self.ws.stream).poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => {
                    self.terminate(self.closing.unwrap_or(close_code::ABNORMAL));
                    return;
                }
                Poll::Pending => return,
            }
            let msg = if let Some(frame) = self.close_to_send.take() {
                Message::Close(Some(frame))
            } else if std::mem::take(&mut self.ping_due) {
                Message::Ping(bytes::Bytes::new())
            } else {
                match self.outbound.pop() {
                    Some(m) => {
                        self.ws.runtime.metrics.message_out();
                        self.ws.runtime.metrics.bytes_out(m.len());
                        m
                    }
                    None => continue,
                }
            };
            if Pin::new(&mut self.ws.stream)
                .start_send(msg.into_tungstenite())
                .is_err()
            {
                self.terminate(self.closing.unwrap_or(close_code::ABNORMAL));
                return;
            }
            self.dirty = true;
        }
    }

    /// Handles ping, idle and close deadlines. Returns whether anything changed.
    fn poll_timer(&mut self, cx: &mut TaskContext<'_>) -> bool {
        let Some(timer) = &mut self.timer else {
            return false;
        };
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        let now = Instant::now();
        if self.close_deadline.is_some_and(|d| now >= d) {
            self.terminate(self.closing.unwrap_or(close_code::ABNORMAL));
            return true;
        }
        if self.closing.is_none() {
            if self.idle_timeout.is_some_and(|t| now >= self.last_seen + t) {
                tracing::debug!("idle timeout: the peer sent nothing, not even a pong");
                self.fail_fast = true;
                self.start_close(close_code::AWAY, "idle timeout");
                // The peer is gone: report an abnormal closure to disconnect.
                self.closing = Some(close_code::ABNORMAL);
                return true;
            }
            if let (Some(at), Some(every)) = (self.next_ping, self.ping_interval) {
                if now >= at {
                    self.ping_due = true;
                    self.next_ping = Some(now + every);
                }
            }
        }
        self.rearm_timer();
        true
    }
}
