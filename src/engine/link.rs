//! The state a connection's application side (a consumer's [`Context`], a raw
//! `WebSocket` handle) shares with its engine.
//!
//! Both sides normally run in the same task (the [`Host`](super::Host) polls
//! the application, then the engine), so the lock is uncontended; a handle
//! moved to another task still works, because every wait registers the
//! waker of whoever polls.
//!
//! [`Context`]: crate::consumer::Context

use std::{
    collections::VecDeque,
    sync::Arc,
    task::{Context as TaskContext, Poll, Waker},
};

use parking_lot::{Mutex, MutexGuard};

use crate::{
    channel_layer::{ChannelLayerError, ChannelReceiver, Event, PresenceInfo, RecvError},
    message::{CloseCode, CloseFrame, Message},
    Error,
};

use super::{Outbound, Probe, Runtime};

/// What [`WebSocket::next`](crate::consumer::WebSocket::next) yields, and
/// what a consumer's handlers are called with: a message from the client or
/// an event from the channel layer.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Incoming {
    /// A message from the client.
    Message(Message),
    /// An event sent to this connection's channel or one of its groups.
    Event(Event),
    /// Group sends dropped this many events because the connection fell behind.
    Lagged(u64),
}

/// What the application sees of the connection's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// Before the handshake was answered (`connect` runs).
    Handshake,
    /// Messages flow both ways.
    Open,
    /// Closing started: nothing more is sent; incoming messages read before
    /// the close are still handed out, then the close.
    Closing,
    /// The engine is done; the code is the one `disconnect` gets.
    Closed(CloseCode),
}

/// How the application asked to close.
#[derive(Debug)]
pub(crate) struct CloseRequest {
    pub(crate) frame: CloseFrame,
    /// Send after the queued messages (`Context::close`), or drop them
    /// (a handler error).
    pub(crate) after_queued: bool,
}

#[derive(Debug)]
pub(crate) struct State {
    pub(crate) status: Status,
    // Application -> engine.
    pub(crate) out: VecDeque<Outbound>,
    pub(crate) out_bytes: usize,
    /// Boxed, as `peer_close`: set once in a connection's life, and the
    /// link is part of every idle connection's memory.
    pub(crate) close: Option<Box<CloseRequest>>,
    /// A send would have crossed the hard cap: the client is too slow.
    pub(crate) overflow: bool,
    /// The layer is shutting down: close with 1001 after the queued output.
    pub(crate) shutdown: bool,
    // Engine -> application.
    pub(crate) incoming: VecDeque<Message>,
    pub(crate) in_bytes: usize,
    /// The close the peer sent (or the abnormal end), handed out after `incoming`.
    pub(crate) peer_close: Option<Box<Option<CloseFrame>>>,
    /// Everything the application queued has been written to the socket.
    pub(crate) flushed: bool,
    /// Data moved more than once the same way since the last ping: an
    /// emptied `out` or `incoming` keeps its allocation (up to 16 entries)
    /// for the next message. Otherwise an emptied queue gives it back, so
    /// a connection that answered once (a liveness check) and went quiet
    /// holds none. Set and cleared by the engine
    /// ([`State::note_data`], [`State::release_idle_queues`]).
    pub(crate) busy: bool,
    // Channel layer membership: one place for every consumer form.
    pub(crate) inbox: Option<ChannelReceiver>,
    pub(crate) groups: Vec<String>,
    // Wake-ups.
    app_waker: Option<Waker>,
    host_waker: Option<Waker>,
    /// The host is polling: wake-ups between its two sides become a flag.
    in_host: bool,
    /// The application waits for room in the queue or for the flush
    /// (`poll_ready`, `poll_flushed`): only then does the engine's progress
    /// on the output wake it. A consumer that only queues is not polled
    /// again after every write.
    waits_output: bool,
    dirty: bool,
    /// Application handles alive ([`AppLink`]s).
    handles: usize,
}

/// Shared by the application handles and the engine of one connection.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) runtime: Arc<Runtime>,
    /// Shared with the channel's queue and registry entry.
    channel_name: Arc<str>,
    state: Mutex<State>,
    /// A test's probe (see [`Probe`]); `None` outside tests.
    probe: Option<Probe>,
}

impl Link {
    pub(crate) fn new(
        runtime: Arc<Runtime>,
        inbox: ChannelReceiver,
        probe: Option<Probe>,
    ) -> Arc<Self> {
        Arc::new(Self {
            runtime,
            channel_name: inbox.shared_name(),
            probe,
            state: Mutex::new(State {
                status: Status::Handshake,
                out: VecDeque::new(),
                out_bytes: 0,
                close: None,
                overflow: false,
                shutdown: false,
                incoming: VecDeque::new(),
                in_bytes: 0,
                peer_close: None,
                flushed: true,
                busy: false,
                inbox: Some(inbox),
                groups: Vec::new(),
                app_waker: None,
                host_waker: None,
                in_host: false,
                waits_output: false,
                dirty: false,
                handles: 0,
            }),
        })
    }

    /// A handle for the application side; the engine closes the connection
    /// once the application ended and no handle is left.
    pub(crate) fn app_handle(self: &Arc<Self>) -> AppLink {
        self.lock().handles += 1;
        AppLink(self.clone())
    }

    pub(crate) fn handles(&self) -> usize {
        self.lock().handles
    }

    pub(crate) fn channel_name(&self) -> &str {
        &self.channel_name
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // parking_lot's mutex: taken several times per delivery, and it
        // does not poison (critical sections are queue pushes and pops and
        // flag writes, consistent after a panic) nor check the thread's
        // panic count on unlock, as std's does.
        self.state.lock()
    }

    // ----- application side -------------------------------------------------

    /// Queues `out` without waiting. Fails once the connection is closing,
    /// or when the hard cap would be crossed (the engine then closes 4008).
    pub(crate) fn push(&self, out: Outbound) -> Result<(), Error> {
        let mut st = self.lock();
        if !matches!(st.status, Status::Open | Status::Handshake)
            || st.close.is_some()
            || st.overflow
        {
            return Err(Error::closed());
        }
        let len = out.len();
        let hard = self.runtime.config.outbound_hard_limit();
        if !st.out.is_empty() && st.out_bytes + len > hard {
            st.overflow = true;
            st.out = VecDeque::new();
            st.out_bytes = 0;
            st.wake_host();
            return Err(Error::closed());
        }
        st.out_bytes += len;
        st.out.push_back(out);
        st.flushed = false;
        st.wake_host();
        Ok(())
    }

    /// Ready when a backpressured sender may queue: the queue is within the
    /// soft budget.
    pub(crate) fn poll_ready(&self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Error>> {
        let mut st = self.lock();
        if !matches!(st.status, Status::Open) || st.close.is_some() || st.overflow {
            return Poll::Ready(Err(Error::closed()));
        }
        if st.out_bytes <= self.runtime.config.max_outbound_bytes {
            return Poll::Ready(Ok(()));
        }
        st.waits_output = true;
        st.register_app(cx);
        Poll::Pending
    }

    /// Ready once everything queued so far has been written to the socket.
    pub(crate) fn poll_flushed(&self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Error>> {
        let mut st = self.lock();
        if st.flushed {
            return Poll::Ready(Ok(()));
        }
        if matches!(st.status, Status::Closed(_)) || st.overflow {
            return Poll::Ready(Err(Error::closed()));
        }
        st.waits_output = true;
        st.register_app(cx);
        Poll::Pending
    }

    /// The next message read from the client: data in order, then the
    /// peer's close (`Message::Close`), then `None`.
    pub(crate) fn poll_message(&self, cx: &mut TaskContext<'_>) -> Poll<Option<Message>> {
        let mut st = self.lock();
        if let Some(m) = self.take_message(&mut st) {
            return Poll::Ready(m);
        }
        self.wait(st, cx)
    }

    /// The next message from the client or event for this connection, in
    /// one lock: messages first (then the peer's close), then events; `None`
    /// once the messages ended (the connection closed).
    pub(crate) fn poll_incoming(&self, cx: &mut TaskContext<'_>) -> Poll<Option<Incoming>> {
        let mut st = self.lock();
        if let Some(m) = self.take_message(&mut st) {
            return Poll::Ready(m.map(Incoming::Message));
        }
        if st.status == Status::Open {
            if let Some(inbox) = st.inbox.as_mut() {
                match inbox.poll_recv(cx) {
                    Poll::Ready(Ok(e)) => return Poll::Ready(Some(Incoming::Event(e))),
                    Poll::Ready(Err(RecvError::Lagged(n))) => {
                        return Poll::Ready(Some(Incoming::Lagged(n)))
                    }
                    // The layer dropped this channel: only client messages remain.
                    Poll::Ready(Err(_)) => st.inbox = None,
                    Poll::Pending => {}
                }
            }
        }
        self.wait(st, cx)
    }

    /// A message read from the client, the peer's close after them, or
    /// `Some(None)` once the connection is closed and both were taken.
    fn take_message(&self, st: &mut MutexGuard<'_, State>) -> Option<Option<Message>> {
        if let Some(m) = st.incoming.pop_front() {
            st.in_bytes -= m.len();
            if st.incoming.is_empty() && !keeps_capacity(st.busy, st.incoming.capacity()) {
                st.incoming = VecDeque::new();
            }
            // The engine may be waiting for read-ahead space.
            st.wake_host();
            if let Some(p) = &self.probe {
                p.taken();
            }
            return Some(Some(m));
        }
        if let Some(frame) = st.peer_close.take() {
            st.wake_host();
            return Some(Some(Message::Close(*frame)));
        }
        matches!(st.status, Status::Closed(_)).then_some(None)
    }

    /// Nothing to take: registers the application's waker.
    fn wait<T>(&self, mut st: MutexGuard<'_, State>, cx: &mut TaskContext<'_>) -> Poll<T> {
        st.register_app(cx);
        drop(st);
        if let Some(p) = &self.probe {
            p.waiting();
        }
        Poll::Pending
    }

    /// The close code once the engine is done.
    pub(crate) fn poll_closed(&self, cx: &mut TaskContext<'_>) -> Poll<CloseCode> {
        let mut st = self.lock();
        if let Status::Closed(code) = st.status {
            return Poll::Ready(code);
        }
        st.register_app(cx);
        Poll::Pending
    }

    pub(crate) fn status(&self) -> Status {
        self.lock().status
    }

    /// Asks the engine to close with `frame`.
    pub(crate) fn close(&self, frame: CloseFrame, after_queued: bool) {
        let mut st = self.lock();
        if st.close.is_none() && matches!(st.status, Status::Open | Status::Handshake) {
            st.close = Some(Box::new(CloseRequest {
                frame,
                after_queued,
            }));
            st.wake_host();
        }
    }

    /// Tells the engine that the layer is shutting down (see
    /// [`Tracker::start_shutdown`](super::Tracker::start_shutdown)).
    pub(crate) fn shut_down(&self) {
        let mut st = self.lock();
        st.shutdown = true;
        st.wake_host();
    }

    /// Joins `group` (and remembers it, to leave on close). Once closing
    /// started this is a no-op: the connection is leaving its groups.
    pub(crate) async fn group_add(&self, group: &str) -> Result<(), ChannelLayerError> {
        self.join(group, None).await
    }

    /// Joins `group` and lists this connection in its presence with `info`;
    /// both are left on close, as a plain membership.
    pub(crate) async fn presence_join(
        &self,
        group: &str,
        info: PresenceInfo,
    ) -> Result<(), ChannelLayerError> {
        self.join(group, Some(info)).await
    }

    async fn join(&self, group: &str, info: Option<PresenceInfo>) -> Result<(), ChannelLayerError> {
        if !self.is_live() {
            return Ok(());
        }
        let layer = &self.runtime.channel_layer;
        match info {
            Some(info) => layer.presence_join(group, &self.channel_name, info).await?,
            None => layer.group_add(group, &self.channel_name).await?,
        }
        let joined = {
            let mut st = self.lock();
            let live = matches!(st.status, Status::Open | Status::Handshake);
            if live && !st.groups.iter().any(|g| g == group) {
                st.groups.push(group.to_owned());
            }
            live
        };
        if !joined {
            // Closing started while joining: the engine already left the
            // groups it knew of; leave this one too.
            let _ = self
                .runtime
                .channel_layer
                .group_discard(group, &self.channel_name)
                .await;
        }
        Ok(())
    }

    pub(crate) async fn group_discard(&self, group: &str) -> Result<(), ChannelLayerError> {
        self.runtime
            .channel_layer
            .group_discard(group, &self.channel_name)
            .await?;
        self.lock().groups.retain(|g| g != group);
        Ok(())
    }

    pub(crate) fn groups(&self) -> Vec<String> {
        self.lock().groups.clone()
    }

    fn is_live(&self) -> bool {
        matches!(self.lock().status, Status::Open | Status::Handshake)
    }

    /// Leaves every group now (a rejected handshake; the engine does this
    /// itself when a close starts).
    pub(crate) async fn leave_groups(&self) {
        let groups = std::mem::take(&mut self.lock().groups);
        leave(&self.runtime, &self.channel_name, groups).await;
    }

    // ----- engine and host side ---------------------------------------------

    /// Starts closing as the application sees it: no more sends, the inbox
    /// is dropped and the groups are handed back for leaving.
    /// With `keep_queue`, what is queued is still written (a graceful close).
    pub(crate) fn start_closing(&self, keep_queue: bool) -> (Vec<String>, Option<ChannelReceiver>) {
        let mut st = self.lock();
        if matches!(st.status, Status::Open | Status::Handshake) {
            st.status = Status::Closing;
        }
        if !keep_queue {
            st.out = VecDeque::new();
            st.out_bytes = 0;
        }
        st.wake_app();
        (std::mem::take(&mut st.groups), st.inbox.take())
    }

    /// Marks the engine done and wakes whoever waits.
    pub(crate) fn finish(&self, code: CloseCode) -> (Vec<String>, Option<ChannelReceiver>) {
        let mut st = self.lock();
        st.status = Status::Closed(code);
        st.out = VecDeque::new();
        st.out_bytes = 0;
        st.incoming.shrink_to_fit();
        st.wake_app();
        (std::mem::take(&mut st.groups), st.inbox.take())
    }

    /// The host begins polling; wake-ups between its sides become a flag.
    pub(crate) fn enter_host(&self, waker: &Waker) {
        let mut st = self.lock();
        st.in_host = true;
        st.dirty = false;
        match &st.host_waker {
            Some(w) if w.will_wake(waker) => {}
            _ => st.host_waker = Some(waker.clone()),
        }
    }

    /// The host polls the engine next: the application's changes so far
    /// need no further turn (the engine is about to see them).
    pub(crate) fn engine_turn(&self) {
        self.lock().dirty = false;
    }

    /// The host stops polling; returns whether it must poll again.
    pub(crate) fn leave_host(&self) -> bool {
        let mut st = self.lock();
        st.in_host = false;
        std::mem::take(&mut st.dirty)
    }
}

/// Whether an emptied queue of `capacity` entries keeps its allocation:
/// only while the connection is [`busy`](State::busy), and only a small one.
pub(crate) fn keeps_capacity(busy: bool, capacity: usize) -> bool {
    busy && capacity <= 16
}

impl State {
    /// The engine moved data one way (a message read, or a batch moved to
    /// the writer); `moves` counts them since the last ping. From the second
    /// one the same way on, the connection is [`busy`](Self::busy): one
    /// exchange (a message and its answer) is not.
    pub(crate) fn note_data(&mut self, moves: &mut u8) {
        *moves = moves.saturating_add(1);
        if *moves >= 2 {
            self.busy = true;
        }
    }

    /// A ping went out (once per ping interval): the connection is no longer
    /// [`busy`](Self::busy) until data moves twice again, and its empty
    /// queues give their allocations back.
    pub(crate) fn release_idle_queues(&mut self) {
        self.busy = false;
        if self.out.is_empty() {
            self.out = VecDeque::new();
        }
        if self.incoming.is_empty() {
            self.incoming = VecDeque::new();
        }
    }

    fn register_app(&mut self, cx: &mut TaskContext<'_>) {
        match &self.app_waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => self.app_waker = Some(cx.waker().clone()),
        }
    }

    /// Wakes the host (its engine side) after the application changed something.
    pub(crate) fn wake_host(&mut self) {
        if self.in_host {
            self.dirty = true;
        } else if let Some(w) = &self.host_waker {
            w.wake_by_ref();
        }
    }

    /// Wakes the application if it waits for the output to move (see
    /// `waits_output`).
    pub(crate) fn wake_output_waiter(&mut self) {
        if std::mem::take(&mut self.waits_output) {
            self.wake_app();
        }
    }

    /// Wakes whoever waits on the application side.
    pub(crate) fn wake_app(&mut self) {
        let Some(w) = &self.app_waker else {
            return;
        };
        if self.in_host && self.host_waker.as_ref().is_some_and(|h| h.will_wake(w)) {
            // The host polls the application again before it returns; the
            // waker stays registered (no clone and drop per message).
            self.dirty = true;
        } else if let Some(w) = self.app_waker.take() {
            w.wake();
        }
    }
}

/// Leaves `groups` on the channel layer, logging failures.
pub(crate) async fn leave(runtime: &Runtime, channel: &str, groups: Vec<String>) {
    for g in groups {
        if let Err(e) = runtime.channel_layer.group_discard(&g, channel).await {
            tracing::warn!(group = %g, error = &e as &dyn std::error::Error, "group_discard failed while closing");
        }
    }
}

/// The application's handle on a [`Link`] (held by `Context` and `WebSocket`).
#[derive(Debug)]
pub(crate) struct AppLink(Arc<Link>);

impl std::ops::Deref for AppLink {
    type Target = Link;
    fn deref(&self) -> &Link {
        &self.0
    }
}

impl Clone for AppLink {
    fn clone(&self) -> Self {
        self.0.app_handle()
    }
}

impl Drop for AppLink {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.handles -= 1;
        if st.handles == 0 {
            st.wake_host();
        }
    }
}
