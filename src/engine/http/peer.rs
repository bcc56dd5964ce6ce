//! The engine's side of an HTTP session: reads `POST`ed messages, writes
//! rendered output, answers requests carried from other processes.

use std::{
    collections::VecDeque,
    io,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::{
    remote,
    render::{render, Frame},
    session::{Limits, Session},
    HttpKind, Sessions,
};
use crate::{
    channel_layer::{ChannelReceiver, RecvError},
    engine::{socket::ReadError, Outbound, Runtime},
    message::{close_code, CloseFrame, Message},
    Error,
};

/// An accepted HTTP session waiting for its engine: what
/// [`Connection::accept`](crate::consumer::Connection::accept) turns into an
/// [`HttpPeer`].
#[derive(Debug)]
pub(crate) struct HttpOpen {
    kind: HttpKind,
    sessions: Arc<Sessions>,
    /// The opening `GET` waits for the session here.
    ready: oneshot::Sender<Arc<Session>>,
}

impl HttpOpen {
    pub(crate) fn new(
        kind: HttpKind,
        sessions: Arc<Sessions>,
    ) -> (Self, oneshot::Receiver<Arc<Session>>) {
        let (ready, rx) = oneshot::channel();
        (
            Self {
                kind,
                sessions,
                ready,
            },
            rx,
        )
    }

    pub(crate) fn kind(&self) -> HttpKind {
        self.kind
    }

    /// Creates the session (its control channel, its token, the `open`
    /// frame), registers it and hands it to the opening `GET`.
    pub(crate) async fn open(
        self,
        runtime: &Runtime,
        protocol: Option<&str>,
    ) -> Result<HttpPeer, Error> {
        let control = runtime.channel_layer.new_channel().await?;
        let id = control.name().to_owned();
        let token = self.sessions.token(&id);
        let open = render(
            self.kind,
            &Frame::Open {
                session: &id,
                token: &token,
                protocol,
            },
        )
        .unwrap_or_default();
        let config = &runtime.config;
        let limits = Limits {
            in_bytes: config.max_read_ahead_bytes,
            in_messages: config.max_buffered_messages.max(1),
            out_bytes: self.sessions.config.get_buffer_size(),
        };
        let session = Session::new(id, self.kind, limits, runtime.channel_layer.clone(), open);
        self.sessions.insert(session.clone());
        if self.ready.send(session.clone()).is_err() {
            self.sessions.remove(session.id());
            return Err(Error::handshake(
                "the client went away during the handshake",
            ));
        }
        Ok(HttpPeer {
            session,
            sessions: self.sessions,
            control: Some(control),
            pending: VecDeque::new(),
            pending_bytes: 0,
            close_sent: false,
            close_reported: false,
            delete_reported: false,
            gap_reported: false,
        })
    }
}

/// The engine's peer for an HTTP session (see [`Peer`](crate::engine::Peer)).
#[derive(Debug)]
pub(crate) struct HttpPeer {
    session: Arc<Session>,
    sessions: Arc<Sessions>,
    /// Requests from other processes; `None` once the layer dropped it.
    control: Option<ChannelReceiver>,
    /// Rendered and not yet handed to the session's buffer.
    pending: VecDeque<Bytes>,
    pending_bytes: usize,
    close_sent: bool,
    close_reported: bool,
    delete_reported: bool,
    gap_reported: bool,
}

impl HttpPeer {
    pub(crate) fn kind(&self) -> HttpKind {
        self.session.kind()
    }

    /// Serves requests carried from other processes.
    pub(crate) fn poll_control(&mut self, cx: &mut Context<'_>) {
        let Some(control) = &mut self.control else {
            return;
        };
        loop {
            match control.poll_recv(cx) {
                Poll::Ready(Ok(event)) => remote::serve(&self.session, &event),
                Poll::Ready(Err(RecvError::Lagged(n))) => {
                    tracing::warn!(dropped = n, "HTTP session control channel lagged");
                }
                Poll::Ready(Err(_)) => {
                    self.control = None;
                    return;
                }
                Poll::Pending => return,
            }
        }
    }

    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Message>, ReadError>> {
        let mut st = self.session.lock();
        if let Some(m) = st.inbound.pop_front() {
            st.inbound_bytes -= m.len();
            return Poll::Ready(Ok(Some(m)));
        }
        if st.gap && !self.gap_reported {
            self.gap_reported = true;
            return Poll::Ready(Err(ReadError::Protocol {
                code: close_code::PROTOCOL,
                reason: "sequence gap",
            }));
        }
        if st.deleted && !self.delete_reported {
            self.delete_reported = true;
            return Poll::Ready(Ok(Some(Message::Close(Some(CloseFrame::new(
                close_code::NORMAL,
                "",
            ))))));
        }
        if self.close_sent && !self.close_reported {
            // Nobody answers a close over HTTP: once ours is queued the
            // session is as good as closed by both sides.
            self.close_reported = true;
            return Poll::Ready(Ok(Some(Message::Close(None))));
        }
        if std::mem::take(&mut st.alive) {
            return Poll::Ready(Ok(Some(Message::Pong(Bytes::new()))));
        }
        if st.gone {
            return Poll::Ready(Ok(None));
        }
        st.register_engine(cx);
        Poll::Pending
    }

    pub(crate) fn has_room(&self) -> bool {
        self.queued_bytes() < self.session.limits().out_bytes
    }

    pub(crate) fn queued_bytes(&self) -> usize {
        self.pending_bytes + self.session.lock().chunk_bytes
    }

    pub(crate) fn has_unflushed(&self) -> bool {
        !self.pending.is_empty()
    }

    pub(crate) fn poll_writable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.has_room() {
            return Poll::Ready(Ok(()));
        }
        ready!(self.poll_flush(cx))?;
        let mut st = self.session.lock();
        if st.gone {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if self.pending_bytes + st.chunk_bytes < self.session.limits().out_bytes {
            return Poll::Ready(Ok(()));
        }
        st.register_engine(cx);
        Poll::Pending
    }

    fn push(&mut self, frame: &Frame<'_>) {
        if let Some(b) = render(self.kind(), frame) {
            self.pending_bytes += b.len();
            self.pending.push_back(b);
        }
    }

    pub(crate) fn queue(&mut self, out: &Outbound) {
        match out {
            Outbound::Message(Message::Text(t)) => self.push(&Frame::Text(t.as_str())),
            Outbound::Message(Message::Binary(b)) => self.push(&Frame::Binary(b)),
            Outbound::Message(Message::Ping(_)) => self.queue_ping(),
            Outbound::Message(Message::Pong(_)) => {}
            Outbound::Message(Message::Close(frame)) => self.queue_close(frame.clone()),
            Outbound::Shared(p) => {
                if !p.is_text() {
                    self.push(&Frame::Binary(p.plain()));
                } else if let Ok(text) = std::str::from_utf8(p.plain()) {
                    self.push(&Frame::Text(text));
                }
            }
        }
    }

    pub(crate) fn queue_ping(&mut self) {
        self.push(&Frame::Ping);
    }

    pub(crate) fn queue_close(&mut self, frame: Option<CloseFrame>) {
        match frame {
            Some(f) => self.push(&Frame::Close {
                code: f.code,
                reason: f.reason.as_str(),
            }),
            None => self.push(&Frame::Close {
                code: close_code::STATUS,
                reason: "",
            }),
        }
        self.close_sent = true;
        self.session.lock().closing = true;
    }

    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pending.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let mut st = self.session.lock();
        if st.gone {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if self.kind() != HttpKind::Poll
            && !st.chunks.is_empty()
            && st.chunk_bytes >= self.session.limits().out_bytes
        {
            st.register_engine(cx);
            return Poll::Pending;
        }
        st.chunk_bytes += self.pending_bytes;
        st.chunks.extend(self.pending.drain(..));
        self.pending_bytes = 0;
        self.session.output_ready(&mut st);
        Poll::Ready(Ok(()))
    }

    /// The engine is done: the body ends after what it holds. A long-poll
    /// session stays reachable for `within` (the close timeout), so the
    /// client can still fetch its last frames, the close among them.
    pub(crate) fn close(self, within: Duration) {
        self.session.end();
        let HttpPeer {
            session, sessions, ..
        } = self;
        let linger = session.kind() == HttpKind::Poll && !within.is_zero();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if linger && !session.is_drained() => {
                rt.spawn(async move {
                    tokio::time::sleep(within).await;
                    sessions.remove(session.id());
                });
            }
            _ => sessions.remove(session.id()),
        }
    }
}
