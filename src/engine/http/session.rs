//! The state an HTTP session shares between its engine ([`HttpPeer`]), its
//! response body ([`SessionBody`]) and the requests to it (`POST`, poll
//! `GET`, `DELETE`), local or carried from another process.
//!
//! [`HttpPeer`]: super::HttpPeer

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

use super::{remote, HttpKind};
use crate::{channel_layer::ChannelLayer, message::Message};

/// Where the answer to a long-poll goes: the `GET` waiting in this process,
/// or a reply channel of the process the `GET` landed on.
#[derive(Debug)]
pub(crate) enum PollWaiter {
    Local(oneshot::Sender<Bytes>),
    Remote(String),
}

/// What a `POST` to the session came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PostOutcome {
    /// Queued, or a duplicate of one that was (`204`).
    Accepted,
    /// The session is closed or closing (`404`).
    Closed,
    /// `seq` skipped a number: the session closes (`409`).
    Gap,
    /// The session's inbox is full (`429`).
    Full,
}

impl PostOutcome {
    pub(crate) fn status(self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            Self::Accepted => StatusCode::NO_CONTENT,
            Self::Closed => StatusCode::NOT_FOUND,
            Self::Gap => StatusCode::CONFLICT,
            Self::Full => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub(crate) fn from_status(status: u16) -> Self {
        match status {
            204 => Self::Accepted,
            409 => Self::Gap,
            429 => Self::Full,
            _ => Self::Closed,
        }
    }
}

/// The limits of a session's two buffers.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Inbox: bytes and messages (the connection's read-ahead limits).
    pub(super) in_bytes: usize,
    pub(super) in_messages: usize,
    /// Rendered output not yet taken by the client.
    pub(super) out_bytes: usize,
}

#[derive(Debug, Default)]
pub(super) struct State {
    // Client -> engine.
    pub(super) inbound: VecDeque<Message>,
    pub(super) inbound_bytes: usize,
    /// The last `seq` accepted.
    last_seq: u64,
    /// A `DELETE` arrived: the engine reads a close.
    pub(super) deleted: bool,
    /// A `seq` gap: the engine fails the connection with 1002.
    pub(super) gap: bool,
    /// The client showed itself (took output, polled): the engine reads a pong.
    pub(super) alive: bool,
    pub(super) engine_waker: Option<Waker>,
    // Engine -> client.
    /// Rendered output: body chunks, or long-poll frames not acknowledged.
    pub(super) chunks: VecDeque<Bytes>,
    pub(super) chunk_bytes: usize,
    /// Long-poll: the number of the first frame in `chunks` (`open` is 1).
    first_frame: u64,
    body_waker: Option<Waker>,
    poll_waiter: Option<PollWaiter>,
    /// The response body was dropped: the client went away.
    pub(super) gone: bool,
    /// Our close is queued: no more `POST`s.
    pub(super) closing: bool,
    /// The engine is done: the body ends after `chunks`.
    pub(super) ended: bool,
}

/// One HTTP session; see the [module docs](self).
#[derive(Debug)]
pub(crate) struct Session {
    id: String,
    kind: HttpKind,
    limits: Limits,
    /// Where replies to requests from other processes go.
    layer: Arc<dyn ChannelLayer>,
    state: Mutex<State>,
}

impl Session {
    pub(super) fn new(
        id: String,
        kind: HttpKind,
        limits: Limits,
        layer: Arc<dyn ChannelLayer>,
        open: Bytes,
    ) -> Arc<Self> {
        let mut state = State {
            first_frame: 1,
            ..State::default()
        };
        state.chunk_bytes = open.len();
        state.chunks.push_back(open);
        Arc::new(Self {
            id,
            kind,
            limits,
            layer,
            state: Mutex::new(state),
        })
    }

    /// The session id: the name of its control channel.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn kind(&self) -> HttpKind {
        self.kind
    }

    pub(super) fn layer(&self) -> Arc<dyn ChannelLayer> {
        self.layer.clone()
    }

    pub(super) fn limits(&self) -> Limits {
        self.limits
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // Queue pushes, pops and flags: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A `POST` numbered `seq` with `message`.
    pub(crate) fn post(&self, seq: u64, message: Message) -> PostOutcome {
        let mut st = self.lock();
        if st.ended || st.closing || st.deleted || st.gap {
            return PostOutcome::Closed;
        }
        if seq <= st.last_seq {
            return PostOutcome::Accepted;
        }
        if seq > st.last_seq + 1 {
            st.gap = true;
            st.wake_engine();
            return PostOutcome::Gap;
        }
        let len = message.len();
        if !st.inbound.is_empty()
            && (st.inbound_bytes + len > self.limits.in_bytes
                || st.inbound.len() >= self.limits.in_messages)
        {
            return PostOutcome::Full;
        }
        st.last_seq = seq;
        st.inbound_bytes += len;
        st.inbound.push_back(message);
        st.alive = true;
        st.wake_engine();
        PostOutcome::Accepted
    }

    /// A `DELETE`: false when the session is already closed.
    pub(crate) fn delete(&self) -> bool {
        let mut st = self.lock();
        if st.ended {
            return false;
        }
        st.deleted = true;
        st.wake_engine();
        true
    }

    /// A long-poll that received `ack` frames: drops them, then answers
    /// `waiter` with the frames after them, now if there are any, else when
    /// some arrive (a waiter already there is answered with `[]`). False,
    /// and `waiter` dropped, when the session is over and every frame was
    /// received: nothing is left to poll for.
    pub(crate) fn poll(&self, ack: u64, waiter: PollWaiter) -> bool {
        let mut st = self.lock();
        while st.first_frame <= ack {
            let Some(f) = st.chunks.pop_front() else {
                break;
            };
            st.chunk_bytes -= f.len();
            st.first_frame += 1;
        }
        if st.ended && st.chunks.is_empty() {
            return false;
        }
        st.alive = true;
        st.wake_engine();
        if let Some(older) = st.poll_waiter.take() {
            self.answer(older, Bytes::from_static(b"[]"));
        }
        if st.chunks.is_empty() {
            st.poll_waiter = Some(waiter);
        } else {
            let frames = frames_array(&st.chunks);
            drop(st);
            self.answer(waiter, frames);
        }
        true
    }

    /// New output was queued (long-poll): answers a waiting poll.
    pub(super) fn output_ready(&self, st: &mut MutexGuard<'_, State>) {
        match self.kind {
            HttpKind::Poll => {
                if !st.chunks.is_empty() || st.ended {
                    if let Some(w) = st.poll_waiter.take() {
                        let frames = frames_array(&st.chunks);
                        self.answer(w, frames);
                    }
                }
            }
            HttpKind::Sse | HttpKind::Stream => {
                if let Some(w) = st.body_waker.take() {
                    w.wake();
                }
            }
        }
    }

    fn answer(&self, waiter: PollWaiter, frames: Bytes) {
        match waiter {
            PollWaiter::Local(tx) => {
                // The request may have timed out: the frames stay unacked
                // and go with the next poll.
                let _ = tx.send(frames);
            }
            PollWaiter::Remote(reply) => remote::reply_frames(self.layer.clone(), reply, frames),
        }
    }

    /// The engine is done: the body ends after what it holds, a waiting
    /// poll gets the last frames.
    pub(super) fn end(&self) {
        let mut st = self.lock();
        st.ended = true;
        st.inbound.clear();
        st.inbound_bytes = 0;
        self.output_ready(&mut st);
    }

    /// Whether the session is over and a client has nothing left to fetch.
    pub(crate) fn is_drained(&self) -> bool {
        let st = self.lock();
        st.ended && st.chunks.is_empty()
    }
}

impl State {
    pub(super) fn wake_engine(&mut self) {
        if let Some(w) = self.engine_waker.take() {
            w.wake();
        }
    }

    pub(super) fn register_engine(&mut self, cx: &Context<'_>) {
        match &self.engine_waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => self.engine_waker = Some(cx.waker().clone()),
        }
    }
}

/// `frames` as a JSON array.
fn frames_array(frames: &VecDeque<Bytes>) -> Bytes {
    let len: usize = frames.iter().map(|f| f.len() + 1).sum();
    let mut out = BytesMut::with_capacity(len + 2);
    out.put_u8(b'[');
    for (i, f) in frames.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        out.put_slice(f);
    }
    out.put_u8(b']');
    out.freeze()
}

/// The response body of an SSE or HTTP-streaming session: what the engine
/// rendered, as the client reads it. Dropping it (the client went away)
/// ends the session.
#[derive(Debug)]
pub(crate) struct SessionBody {
    session: Arc<Session>,
}

impl SessionBody {
    pub(crate) fn new(session: Arc<Session>) -> Self {
        Self { session }
    }
}

impl Body for SessionBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut st = self.session.lock();
        if let Some(chunk) = st.chunks.pop_front() {
            st.chunk_bytes -= chunk.len();
            // The client takes what we write: it is alive, and the engine
            // may have waited for room.
            st.alive = true;
            st.wake_engine();
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if st.ended {
            return Poll::Ready(None);
        }
        match &st.body_waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => st.body_waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for SessionBody {
    fn drop(&mut self) {
        let mut st = self.session.lock();
        st.gone = true;
        st.wake_engine();
    }
}
