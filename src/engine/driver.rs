//! The per-connection state machine: see the [module docs](super).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::task::{waker_ref, ArcWake, AtomicWaker};
use tokio::time::{Instant, Sleep};

use super::{
    link::{keeps_capacity, leave, Link, Status},
    peer::Peer,
    socket::ReadError,
    Outbound,
};
use crate::{
    channel_layer::BoxFuture,
    message::{close_code, CloseCode, CloseFrame, Message},
    metrics::LocalCounts,
    WebSocketConfig,
};

/// Most queued messages taken from the link per lock when they are
/// compressed (encoded outside the lock); without compression a lock moves
/// a write buffer's worth (see `Engine::move_queued`).
const MOVE_BATCH: usize = 16;

/// Where a connection is in its life.
#[derive(Debug)]
enum Phase {
    /// Messages flow both ways.
    Open,
    /// A close started; only the closing handshake matters now. Boxed:
    /// most of a connection's life is spent open, and the engine is part
    /// of every idle connection's memory.
    Closing(Box<Closing>),
    /// Done: the socket is dropped; `code` goes to `disconnect`.
    Closed { code: CloseCode },
}

#[derive(Debug)]
struct Closing {
    /// The code the application's `disconnect` gets.
    code: CloseCode,
    /// Give up (drop the socket) at this instant.
    deadline: Instant,
    /// Our close frame (or our reply to the peer's: `Some(None)` is an
    /// empty close), until it is handed to the writer.
    to_send: Option<Option<CloseFrame>>,
    /// Queued application output is still written before `to_send`.
    drain: bool,
    /// The peer's close arrived (or its reply to ours).
    peer_closed: bool,
    /// Drop the connection as soon as our close frame is flushed: the peer
    /// broke the protocol or stopped answering; no reply is awaited.
    fail_fast: bool,
}

/// The waker the engine polls its socket, timer and group leaving with.
///
/// The connection's task is woken by its application side too (an event in
/// its inbox, a message queued by a handler), far more often than by the
/// socket when the server mostly writes (fan-out). A wake through this
/// waker sets `woken` first, so the engine polls the socket's read side and
/// the timer again only when one of them may have changed, not on every
/// wake-up: a read poll goes through several layers of boxed I/O (hyper's
/// upgrade, its rewind buffers, tokio's readiness) for nothing.
#[derive(Debug, Default)]
struct IoWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl ArcWake for IoWake {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.woken.store(true, Ordering::Release);
        arc_self.task.wake();
    }
}

/// Drives one WebSocket connection: socket I/O, timers, limits, the outbound
/// queue and the closing handshake. Its settings are the layer's
/// [`WebSocketConfig`] (shared, see [`config`](Self::config)); its fields
/// are what changes.
pub(crate) struct Engine {
    link: Arc<Link>,
    /// The WebSocket or HTTP session; `None` once closed.
    socket: Option<Peer>,
    phase: Phase,
    /// Leaving the groups once a close started.
    leaving: Option<BoxFuture<'static, ()>>,
    read_done: bool,
    /// The peer's close, held until the application took the messages
    /// read before it.
    deferred_close: Option<Box<Option<CloseFrame>>>,
    ping_due: bool,
    /// Boxed, as `over_budget_since` and `rate`: rarely set (or only with
    /// a setting), and the engine is part of every idle connection's
    /// memory.
    pong_due: Option<Box<Bytes>>,
    timer: Pin<Box<Sleep>>,
    timer_at: Option<Instant>,
    /// Outgoing data waits for the write delay until then.
    hold_until: Option<Instant>,
    last_seen: Instant,
    next_ping: Option<Instant>,
    /// Since when the queue has been above the soft budget, and `drained`
    /// at that moment.
    over_budget_since: Option<Box<(Instant, usize)>>,
    /// Bytes of application output moved to the writer so far.
    drained: usize,
    /// Application output was moved to the writer (or dropped by a close)
    /// since the application was last told that all of it is written.
    unflushed: bool,
    /// The rate limit's tokens and when they were last counted.
    rate: Option<Box<(f64, Instant)>>,
    /// Messages counted since the last fold into the layer's metrics.
    counts: LocalCounts,
    /// The transport's name (the metrics' `transport` label).
    transport: &'static str,
    /// Wakes the task on socket and timer events and notes them.
    io: Arc<IoWake>,
    /// Messages read and batches moved to the writer since the last ping
    /// (saturating; see [`State::busy`](super::link::State)).
    data_in: u8,
    data_out: u8,
    /// The read side answered `Pending` and nothing woke `io` since.
    read_armed: bool,
    /// The timer was polled at its current deadline and has not fired.
    timer_armed: bool,
    /// The next deadline (see [`next_deadline`](Self::next_deadline)),
    /// computed again only after one of its inputs changed
    /// (`deadline_stale`), not on every poll.
    deadline: Option<Instant>,
    deadline_stale: bool,
    /// What this poll already knows of the link: the application's
    /// requests were checked (`app_checked`), its queue was found empty
    /// (`out_empty`). Within one poll only the engine changes the link
    /// (an application on another task that queues or closes wakes the
    /// host, which polls again), so a round after the first takes the
    /// lock again only when the engine's own move may have changed the
    /// answer (an emptied queue lets a close after the queued output go).
    app_checked: bool,
    out_empty: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

impl Engine {
    pub(crate) fn new(link: Arc<Link>, socket: Peer) -> Self {
        let now = Instant::now();
        let runtime = link.runtime.clone();
        let config = &runtime.config;
        link.lock().status = Status::Open;
        let transport = socket.transport();
        runtime.metrics.opened(transport);
        let mut e = Engine {
            socket: Some(socket),
            phase: Phase::Open,
            leaving: None,
            read_done: false,
            deferred_close: None,
            ping_due: false,
            pong_due: None,
            timer: Box::pin(tokio::time::sleep_until(now)),
            timer_at: None,
            hold_until: None,
            last_seen: now,
            next_ping: config.ping_interval.map(|i| now + i),
            over_budget_since: None,
            drained: 0,
            unflushed: false,
            rate: config
                .rate_limit
                .map(|r| Box::new((f64::from(r.burst.max(1)), now))),
            counts: LocalCounts::default(),
            transport,
            io: Arc::default(),
            data_in: 0,
            data_out: 0,
            read_armed: false,
            timer_armed: false,
            deadline: None,
            deadline_stale: true,
            app_checked: false,
            out_empty: false,
            link,
        };
        e.rearm_timer();
        e
    }

    /// The layer's settings.
    fn config(&self) -> &WebSocketConfig {
        &self.link.runtime.config
    }

    /// The write delay, if one is set.
    fn write_delay(&self) -> Option<Duration> {
        self.config().write_delay.filter(|d| !d.is_zero())
    }

    /// Starts the closing handshake with our `frame`. With `drain`, queued
    /// application output is written first; otherwise it is dropped.
    fn start_close(&mut self, frame: CloseFrame, drain: bool, fail_fast: bool) {
        if !matches!(self.phase, Phase::Open) {
            return;
        }
        let code = frame.code;
        self.enter_closing(Closing {
            code,
            deadline: Instant::now() + self.config().close_timeout,
            to_send: Some(Some(frame)),
            drain,
            peer_closed: false,
            fail_fast,
        });
    }

    fn enter_closing(&mut self, closing: Closing) {
        let drain = closing.drain;
        self.phase = Phase::Closing(Box::new(closing));
        self.unflushed = true;
        // Leave the groups and drop the inbox at once: no more events are
        // held for a connection that is going away.
        let (groups, inbox) = self.link.start_closing(drain);
        drop(inbox);
        self.start_leaving(groups);
        self.ping_due = false;
        self.over_budget_since = None;
        self.deadline_stale = true;
        self.rearm_timer();
    }

    fn start_leaving(&mut self, groups: Vec<String>) {
        if groups.is_empty() {
            return;
        }
        let link = self.link.clone();
        let fut: BoxFuture<'static, ()> = Box::pin(async move {
            leave(&link.runtime, link.channel_name(), groups).await;
        });
        self.leaving = Some(match self.leaving.take() {
            Some(before) => Box::pin(async move {
                before.await;
                fut.await;
            }),
            None => fut,
        });
    }

    fn terminate(&mut self, code: CloseCode) {
        if matches!(self.phase, Phase::Closed { .. }) {
            return;
        }
        self.phase = Phase::Closed { code };
        self.deadline_stale = true;
        // The buffers go now (disconnect may run long); the transport
        // lingers if the peer may still be sending.
        if let Some(socket) = self.socket.take() {
            socket.close(self.config().close_timeout);
        }
        let (groups, inbox) = self.link.finish(code);
        drop(inbox);
        self.start_leaving(groups);
    }

    fn closing_code(&self) -> CloseCode {
        match &self.phase {
            Phase::Open => close_code::ABNORMAL,
            Phase::Closing(c) => c.code,
            Phase::Closed { code } => *code,
        }
    }

    /// Drives the connection; ready with the close code once it is over and
    /// its groups are left.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<CloseCode> {
        let io = Arc::clone(&self.io);
        io.task.register(cx.waker());
        if io.woken.swap(false, Ordering::AcqRel) {
            self.read_armed = false;
            self.timer_armed = false;
        }
        let waker = waker_ref(&io);
        (self.app_checked, self.out_empty) = (false, false);
        let res = self.poll_inner(&mut Context::from_waker(&waker));
        self.counts.fold(&self.link.runtime.metrics);
        res
    }

    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<CloseCode> {
        loop {
            if let Phase::Closed { code } = self.phase {
                if let Some(l) = &mut self.leaving {
                    if l.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    self.leaving = None;
                }
                return Poll::Ready(code);
            }
            if let Some(l) = &mut self.leaving {
                if l.as_mut().poll(cx).is_ready() {
                    self.leaving = None;
                }
            }
            if let Some(peer) = &mut self.socket {
                peer.poll_control(cx);
            }
            // Socket work until nothing moves; the timers and the shutdown
            // signal are polled once per round, not once per step.
            loop {
                self.check_application();
                if matches!(self.phase, Phase::Closed { .. }) {
                    break;
                }
                let wrote = self.poll_write(cx);
                let read = self.poll_read(cx);
                if matches!(self.phase, Phase::Closed { .. }) {
                    break;
                }
                let flushed = self.poll_flush(cx);
                if !(wrote || read || flushed) {
                    break;
                }
            }
            if matches!(self.phase, Phase::Closed { .. }) {
                continue;
            }
            if !self.poll_timer(cx) {
                return Poll::Pending;
            }
        }
    }

    /// Acts on what the application asked for: a close, or an overflow.
    fn check_application(&mut self) {
        if !matches!(self.phase, Phase::Open) || std::mem::replace(&mut self.app_checked, true) {
            return;
        }
        if self.deferred_close.is_some() && self.link.lock().incoming.is_empty() {
            let frame = self.deferred_close.take().and_then(|f| *f);
            self.peer_closed(frame);
            return;
        }
        let (overflow, shutdown, close) = {
            let mut st = self.link.lock();
            let overflow = st.overflow;
            let shutdown = std::mem::take(&mut st.shutdown);
            let close = if st.close.as_ref().is_some_and(|c| !c.after_queued) || st.out.is_empty() {
                st.close.take()
            } else {
                None
            };
            (overflow, shutdown, close)
        };
        if overflow {
            self.slow_close("slow consumer: outbound queue full");
        } else if shutdown {
            // The queued output is written first (`drain`).
            self.start_close(
                CloseFrame::new(close_code::AWAY, "server shutting down"),
                true,
                false,
            );
        } else if let Some(req) = close {
            self.start_close(req.frame, false, false);
        }
    }

    fn slow_close(&mut self, reason: &'static str) {
        self.link.runtime.metrics.dropped_slow(1);
        tracing::warn!(reason, "slow client; closing with 4008");
        self.start_close(
            CloseFrame::new(close_code::SLOW_CONSUMER, reason),
            false,
            false,
        );
    }

    /// Moves queued output into the writer, up to one write buffer at a time
    /// (so a close frame is never far behind); a full writer is written to
    /// the socket first. Returns whether anything moved.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        loop {
            let holding = self.holding();
            let Some(socket) = &mut self.socket else {
                return progress;
            };
            match socket.poll_writable(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => {
                    self.terminate(self.closing_code());
                    return true;
                }
                Poll::Pending => break,
            }
            let (draining, close_ready) = match &self.phase {
                Phase::Open => (true, false),
                Phase::Closing(c) => {
                    if c.to_send.is_none() || c.peer_closed {
                        // Our close is out (or the peer's arrived): no more pongs.
                        self.pong_due = None;
                    }
                    (c.drain && c.to_send.is_some(), c.to_send.is_some())
                }
                Phase::Closed { .. } => (false, false),
            };
            if let Some(p) = self.pong_due.take() {
                socket.queue_pong(*p);
            } else if std::mem::take(&mut self.ping_due) {
                socket.queue_ping();
                (self.data_in, self.data_out) = (0, 0);
                self.link.lock().release_idle_queues();
            } else if draining && !holding && !self.out_empty && self.move_queued() {
                // Moved a batch; the writer may have room for more.
            } else if let (true, Phase::Closing(c)) = (close_ready, &mut self.phase) {
                if let (Some(frame), Some(socket)) = (c.to_send.take(), &mut self.socket) {
                    socket.queue_close(frame);
                }
            } else {
                if self.hold_until.is_some_and(|t| Instant::now() >= t) {
                    // The delayed batch is out; the next one waits again.
                    self.hold_until = None;
                    self.deadline_stale = true;
                }
                break;
            }
            progress = true;
        }
        progress
    }

    /// Moves queued application output into the writer while it has room,
    /// at most a write buffer's worth per lock of the link. Without
    /// compression a message is encoded under the lock (a copy into the
    /// write buffer, as cheap as moving it out); with compression up to
    /// [`MOVE_BATCH`] messages are taken per lock and encoded outside it,
    /// so an application on another task is not held up by deflate.
    /// Returns whether anything moved.
    fn move_queued(&mut self) -> bool {
        let Some(socket) = &mut self.socket else {
            return false;
        };
        let config = &self.link.runtime.config;
        let inline = socket.encodes_by_copy();
        let mut moved = false;
        while socket.has_room() {
            let mut st = self.link.lock();
            if st.out.is_empty() {
                self.out_empty = true;
                break;
            }
            let mut room = config
                .write_buffer_size
                .saturating_sub(socket.queued_bytes());
            if inline && st.out.len() > 1 {
                // About what this batch encodes: its payloads (as much as
                // fits) and a short header each. (One frame sizes the
                // buffer itself.)
                let headers = st.out.len().saturating_mul(4);
                socket.reserve(st.out_bytes.min(room).saturating_add(headers));
            }
            let mut take = || {
                let out = st.out.pop_front()?;
                st.out_bytes -= out.len();
                room = room.saturating_sub(out.len());
                self.drained += out.len();
                self.counts.message_out(out.len());
                Some((out, room == 0))
            };
            let mut batch: Option<[Option<Outbound>; MOVE_BATCH]> = None;
            if inline {
                while let Some((out, full)) = take() {
                    socket.queue(&out);
                    if full {
                        break;
                    }
                }
            } else {
                let batch = batch.insert(Default::default());
                for slot in batch.iter_mut() {
                    let Some((out, full)) = take() else { break };
                    *slot = Some(out);
                    if full {
                        break;
                    }
                }
            }
            st.note_data(&mut self.data_out);
            let emptied = st.out.is_empty();
            if emptied && !keeps_capacity(st.busy, st.out.capacity()) {
                st.out = Default::default();
            }
            if emptied {
                self.out_empty = true;
                // A close asked for after the queued output can go now.
                self.app_checked &= st.close.is_none();
            }
            if st.out_bytes <= config.max_outbound_bytes {
                st.wake_output_waiter();
            }
            drop(st);
            for out in batch.iter_mut().flatten().map_while(Option::take) {
                socket.queue(&out);
            }
            moved = true;
            if emptied {
                // Nothing left; what the application queues meanwhile
                // wakes the host again (or sets its `dirty` flag), so the
                // next round or poll sees it without another lock here.
                break;
            }
        }
        self.unflushed |= moved;
        moved
    }

    /// Whether outgoing data waits for the write delay.
    fn holding(&mut self) -> bool {
        let Some(delay) = self.write_delay() else {
            return false;
        };
        let now = Instant::now();
        match self.hold_until {
            Some(t) if now >= t => false,
            Some(_) => true,
            None => {
                let queued = self.link.lock().out_bytes;
                if queued == 0 || queued >= self.config().write_buffer_size {
                    // Nothing to wait for, or a full batch is ready.
                    return false;
                }
                self.hold_until = Some(now + delay);
                self.deadline_stale = true;
                self.rearm_timer();
                true
            }
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        let mut seen = false;
        while !self.read_done && self.deferred_close.is_none() {
            if matches!(self.phase, Phase::Open) {
                if self.read_armed {
                    // Nothing can have arrived: `io` was not woken. (While
                    // closing, an HTTP peer's read answers our own close.)
                    break;
                }
                let config = &self.link.runtime.config;
                let st = self.link.lock();
                if !st.incoming.is_empty()
                    && (st.in_bytes >= config.max_read_ahead_bytes
                        || st.incoming.len() >= config.max_buffered_messages.max(1))
                {
                    // Full: stop reading, TCP holds the client back.
                    break;
                }
            }
            let Some(socket) = &mut self.socket else {
                return progress;
            };
            let item = match socket.poll_read(cx) {
                Poll::Pending => {
                    self.read_armed = true;
                    break;
                }
                Poll::Ready(r) => r,
            };
            progress = true;
            match item {
                Ok(Some(message)) => {
                    // Data, pongs and closes show the peer alive; a ping does not.
                    seen |= !matches!(message, Message::Ping(_));
                    self.on_inbound(message);
                }
                Ok(None) | Err(ReadError::Io) => {
                    self.read_done = true;
                    let code = self.closing_code();
                    self.terminate(code);
                }
                Err(ReadError::Protocol { code, reason }) => {
                    self.read_done = true;
                    tracing::debug!(code, reason, "peer error; failing the connection");
                    if matches!(self.phase, Phase::Open) {
                        self.start_close(CloseFrame::new(code, reason), false, true);
                    } else {
                        let code = self.closing_code();
                        self.terminate(code);
                    }
                }
            }
        }
        if seen && self.config().idle_timeout.is_some() {
            // One clock read per batch read, not per message.
            self.last_seen = Instant::now();
            self.deadline_stale = true;
        }
        progress
    }

    fn on_inbound(&mut self, message: Message) {
        match message {
            Message::Text(_) | Message::Binary(_) => {
                if !matches!(self.phase, Phase::Open) {
                    return;
                }
                self.counts.message_in(message.len());
                if !self.take_token() {
                    tracing::debug!("rate limit exceeded; closing with 1008");
                    self.start_close(
                        CloseFrame::new(close_code::POLICY, "rate limit exceeded"),
                        false,
                        false,
                    );
                    return;
                }
                let mut st = self.link.lock();
                st.note_data(&mut self.data_in);
                st.in_bytes += message.len();
                st.incoming.push_back(message);
                st.wake_app();
            }
            // Every ping is answered while the writer has room; when it is
            // backed up (the client does not read) only the latest is kept
            // (RFC 6455 5.5.3 allows it). A ping is not liveness: a client
            // flooding pings while never reading holds one pong and is still
            // timed out.
            Message::Ping(p) => {
                let answer = match &self.phase {
                    Phase::Open => true,
                    // Nothing follows our close frame (or the peer's).
                    Phase::Closing(c) => c.to_send.is_some() && !c.peer_closed,
                    Phase::Closed { .. } => false,
                };
                if !answer {
                    return;
                }
                match &mut self.socket {
                    Some(socket) if socket.has_room() => {
                        if let Some(older) = self.pong_due.take() {
                            socket.queue_pong(*older);
                        }
                        socket.queue_pong(p);
                    }
                    _ => self.pong_due = Some(Box::new(p)),
                }
            }
            Message::Pong(_) => {}
            Message::Close(frame) => {
                match &mut self.phase {
                    Phase::Open => {
                        if self.link.lock().incoming.is_empty() {
                            self.peer_closed(frame);
                        } else {
                            // Let the application take the messages that
                            // came before the close (and queue its answers)
                            // first; nothing more is read meanwhile.
                            self.deferred_close = Some(Box::new(frame));
                        }
                    }
                    Phase::Closing(c) => c.peer_closed = true,
                    Phase::Closed { .. } => {}
                }
            }
        }
    }

    /// The peer closed: reply (echoing its code) after the queued output.
    fn peer_closed(&mut self, frame: Option<CloseFrame>) {
        let code = frame.as_ref().map_or(close_code::STATUS, |f| f.code);
        let reply = frame.as_ref().map(|f| CloseFrame::new(f.code, ""));
        self.link.lock().peer_close = Some(Box::new(frame));
        self.enter_closing(Closing {
            code,
            deadline: Instant::now() + self.config().close_timeout,
            to_send: Some(reply),
            drain: true,
            peer_closed: true,
            fail_fast: false,
        });
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(socket) = &mut self.socket else {
            return false;
        };
        if !socket.has_unflushed() {
            self.after_flush();
            return false;
        }
        // Counted before the client can see it.
        self.counts.fold(&self.link.runtime.metrics);
        match socket.poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                self.after_flush();
                true
            }
            Poll::Ready(Err(_)) => {
                self.terminate(self.closing_code());
                true
            }
            Poll::Pending => false,
        }
    }

    /// Everything handed to the writer is on the socket.
    fn after_flush(&mut self) {
        if std::mem::take(&mut self.unflushed) {
            let mut st = self.link.lock();
            if st.out.is_empty() && !st.flushed {
                st.flushed = true;
                st.wake_output_waiter();
            }
        }
        if let Phase::Closing(c) = &self.phase {
            if c.to_send.is_none() && (c.peer_closed || c.fail_fast) {
                // Our close (or reply) is written; the handshake is complete,
                // or the peer is not worth waiting for.
                let code = c.code;
                self.terminate(code);
            }
        }
    }

    /// Spends one token of the rate limit; false when the budget is exhausted.
    fn take_token(&mut self) -> bool {
        let (Some(limit), Some(rate)) = (self.link.runtime.config.rate_limit, &mut self.rate)
        else {
            return true;
        };
        let (tokens, last) = &mut **rate;
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

    /// Queued bytes above the soft budget start the slow-client clock.
    fn check_budget(&mut self) {
        if !matches!(self.phase, Phase::Open) {
            self.set_over_budget(None);
            return;
        }
        let soft_budget = self.config().max_outbound_bytes;
        let queued =
            self.link.lock().out_bytes + self.socket.as_ref().map_or(0, Peer::queued_bytes);
        if queued > soft_budget {
            let now = Instant::now();
            let (since, at) = match self.over_budget_since.as_deref() {
                Some(&s) => s,
                None => {
                    self.set_over_budget(Some((now, self.drained)));
                    (now, self.drained)
                }
            };
            if self.drained - at >= soft_budget {
                // The client read a whole budget's worth: it is reading,
                // just behind a burst. The clock restarts.
                self.set_over_budget(Some((now, self.drained)));
            } else if now.duration_since(since) >= self.config().slow_client_timeout {
                self.slow_close("slow consumer: outbound queue full");
            }
        } else {
            self.set_over_budget(None);
        }
    }

    /// Sets when the queue went above the soft budget (a deadline input).
    fn set_over_budget(&mut self, since: Option<(Instant, usize)>) {
        if self.over_budget_since.as_deref() != since.as_ref() {
            self.over_budget_since = since.map(Box::new);
            self.deadline_stale = true;
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        match &self.phase {
            // Pings and idleness no longer matter, only the close handshake.
            Phase::Closing(c) => Some(c.deadline),
            Phase::Closed { .. } => None,
            Phase::Open => {
                let config = self.config();
                let idle = config.idle_timeout.map(|t| self.last_seen + t);
                let slow = self
                    .over_budget_since
                    .as_deref()
                    .map(|&(s, _)| s + config.slow_client_timeout);
                [idle, self.next_ping, slow, self.hold_until]
                    .into_iter()
                    .flatten()
                    .min()
            }
        }
    }

    fn rearm_timer(&mut self) {
        if std::mem::take(&mut self.deadline_stale) {
            self.deadline = self.next_deadline();
        }
        let next = self.deadline;
        if next != self.timer_at {
            if let Some(d) = next {
                self.timer.as_mut().reset(d);
            }
            self.timer_at = next;
            self.timer_armed = false;
        }
    }

    /// Handles the deadlines. Returns whether anything changed.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> bool {
        self.check_budget();
        self.rearm_timer();
        if self.timer_at.is_none() || self.timer_armed {
            return false;
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            self.timer_armed = true;
            return false;
        }
        // Read the clock only when a deadline passed: this runs on every
        // turn of the poll loop.
        let now = Instant::now();
        self.timer_at = None;
        match &self.phase {
            Phase::Closing(c) => {
                if now >= c.deadline {
                    let code = c.code;
                    self.terminate(code);
                }
            }
            Phase::Closed { .. } => {}
            Phase::Open => {
                if self
                    .config()
                    .idle_timeout
                    .is_some_and(|t| now >= self.last_seen + t)
                {
                    tracing::debug!("idle timeout: the peer sent no data and no pong");
                    self.start_close(
                        CloseFrame::new(close_code::AWAY, "idle timeout"),
                        false,
                        true,
                    );
                    // The peer is gone: report an abnormal closure to disconnect.
                    if let Phase::Closing(c) = &mut self.phase {
                        c.code = close_code::ABNORMAL;
                    }
                } else if let (Some(at), Some(every)) =
                    (self.next_ping, self.config().ping_interval)
                {
                    if now >= at {
                        self.ping_due = true;
                        self.next_ping = Some(now + every);
                        self.deadline_stale = true;
                    }
                }
                if self.hold_until.is_some_and(|t| now >= t) {
                    self.hold_until = None;
                    self.deadline_stale = true;
                }
            }
        }
        self.rearm_timer();
        true
    }

    pub(crate) fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Whether no application handle is left.
    pub(crate) fn application_detached(&self) -> bool {
        self.link.handles() == 0
    }

    /// The application is gone (its future ended and no handle is left):
    /// close normally if nothing else did.
    pub(crate) fn application_gone(&mut self) {
        if matches!(self.phase, Phase::Open) {
            self.start_close(CloseFrame::new(close_code::NORMAL, ""), true, false);
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.counts.fold(&self.link.runtime.metrics);
        self.link.runtime.metrics.closed(self.transport);
        if !matches!(self.phase, Phase::Closed { .. }) {
            // Aborted (shutdown deadline): the application sees the end.
            self.phase = Phase::Closed {
                code: close_code::ABNORMAL,
            };
            let (groups, _inbox) = self.link.finish(close_code::ABNORMAL);
            self.start_leaving(groups);
        }
        if let Phase::Closed { code } = self.phase {
            self.link.runtime.metrics.closed_with(code);
        }
        // Membership must not outlive the connection, even when its task is
        // dropped at a shutdown deadline.
        if let (Some(leaving), Ok(rt)) =
            (self.leaving.take(), tokio::runtime::Handle::try_current())
        {
            rt.spawn(leaving);
        }
    }
}
