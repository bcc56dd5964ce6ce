//! The bounded per-channel queue every backend delivers into.

use std::{
    collections::VecDeque,
    fmt,
    future::poll_fn,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use parking_lot::{Mutex, MutexGuard};

use super::Event;

/// Creates a bounded queue for the channel `name` holding at most `capacity`
/// events.
///
/// Backends give the [`ChannelReceiver`] to whoever consumes the channel and
/// keep the [`ChannelSender`] to deliver into it. The queue allocates nothing
/// until the first event arrives, so an idle connection costs a few dozen bytes.
///
/// ```
/// use tower_channels::channel_layer::{channel, Event, TrySendError};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let (tx, mut rx) = channel("worker", 1);
/// tx.try_send(Event::bare("a")).unwrap();
/// assert!(matches!(tx.try_send(Event::bare("b")), Err(TrySendError::Full(_))));
/// assert_eq!(rx.recv().await.unwrap().kind(), "a");
/// # });
/// ```
pub fn channel(name: impl Into<String>, capacity: usize) -> (ChannelSender, ChannelReceiver) {
    let shared = Arc::new(Shared {
        name: Arc::from(name.into()),
        capacity: capacity.max(1),
        state: Mutex::new(State {
            queue: VecDeque::new(),
            waker: None,
            lagged: 0,
            receiver_alive: true,
            senders: 1,
            space_waiters: Vec::new(),
        }),
    });
    (
        ChannelSender {
            shared: shared.clone(),
        },
        ChannelReceiver {
            shared,
            on_drop: None,
        },
    )
}

struct Shared {
    /// Shared with the registry's key, the drop hook and the connection
    /// (one allocation per channel, not one per holder).
    name: Arc<str>,
    capacity: usize,
    state: Mutex<State>,
}

struct State {
    queue: VecDeque<Event>,
    waker: Option<Waker>,
    /// Events dropped by lossy sends since the receiver last looked.
    lagged: u64,
    receiver_alive: bool,
    senders: usize,
    /// Senders waiting for space ([`ChannelSender::send`]); empty (and
    /// unallocated) unless a channel is full.
    space_waiters: Vec<Waker>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // parking_lot's mutex (see `Link::lock`): every critical section is
        // a push, pop or flag write, consistent after a panic.
        self.state.lock()
    }
}

/// The error of [`ChannelSender::try_send`]; gives the event back.
#[derive(Debug)]
#[non_exhaustive]
pub enum TrySendError {
    /// The channel holds `capacity` events already.
    Full(Event),
    /// The receiver is gone.
    Closed(Event),
}

/// What a [`ChannelSender::send_lossy`] did with the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The event was queued.
    Delivered,
    /// The channel was full: the event was dropped and the receiver will see
    /// [`RecvError::Lagged`] (a connection then closes itself as a slow consumer).
    Dropped,
    /// The receiver is gone.
    Closed,
}

/// The sending half of a channel queue. Cheap to clone.
pub struct ChannelSender {
    shared: Arc<Shared>,
}

impl ChannelSender {
    /// The channel's name, shared (no copy).
    pub(crate) fn shared_name(&self) -> Arc<str> {
        self.shared.name.clone()
    }

    /// The channel's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Drops every queued event (used by [`flush`](super::ChannelLayer::flush)).
    pub fn clear(&self) {
        self.shared.lock().queue.clear();
    }

    /// Whether the receiver has been dropped.
    pub fn is_closed(&self) -> bool {
        !self.shared.lock().receiver_alive
    }

    /// Queues the event, or hands it back when the channel is full or closed.
    /// Used for direct sends, where the sender gets `ChannelFull`.
    pub fn try_send(&self, event: Event) -> Result<(), TrySendError> {
        let mut st = self.shared.lock();
        if !st.receiver_alive {
            return Err(TrySendError::Closed(event));
        }
        if st.queue.len() >= self.shared.capacity {
            return Err(TrySendError::Full(event));
        }
        st.queue.push_back(event);
        let waker = st.waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Queues the event, waiting while the channel is full; gives the event
    /// back if the receiver is gone. For producers that may wait (e.g. a
    /// backend's worker-channel loop), never for group fan-out.
    pub async fn send(&self, event: Event) -> Result<(), Event> {
        let mut event = Some(event);
        poll_fn(|cx| {
            let mut st = self.shared.lock();
            let Some(e) = event.take() else {
                return Poll::Ready(Ok(()));
            };
            if !st.receiver_alive {
                return Poll::Ready(Err(e));
            }
            if st.queue.len() >= self.shared.capacity {
                event = Some(e);
                if !st.space_waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    st.space_waiters.push(cx.waker().clone());
                }
                return Poll::Pending;
            }
            st.queue.push_back(e);
            let waker = st.waker.take();
            drop(st);
            if let Some(w) = waker {
                w.wake();
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Queues the event; when the channel is full the event is dropped and
    /// counted, and the receiver learns of it through [`RecvError::Lagged`].
    /// Never blocks. Used for group sends, where one slow member must not
    /// hold up the others.
    pub fn send_lossy(&self, event: Event) -> Delivery {
        let mut st = self.shared.lock();
        if !st.receiver_alive {
            return Delivery::Closed;
        }
        let delivery = if st.queue.len() >= self.shared.capacity {
            st.lagged += 1;
            Delivery::Dropped
        } else {
            st.queue.push_back(event);
            Delivery::Delivered
        };
        let waker = st.waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        delivery
    }
}

impl Clone for ChannelSender {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for ChannelSender {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.senders -= 1;
        if st.senders == 0 {
            let waker = st.waker.take();
            drop(st);
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

impl fmt::Debug for ChannelSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelSender")
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

/// Why [`ChannelReceiver::recv`] returned no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// Group sends dropped this many events because the channel was full.
    /// Receiving can go on; a connection closes itself as a slow consumer.
    #[error("channel lagged: {0} events dropped")]
    Lagged(u64),
    /// Every sender is gone: no event can arrive any more.
    #[error("channel closed")]
    Closed,
}

/// The receiving half of a channel: what a consumer or worker reads events from.
pub struct ChannelReceiver {
    shared: Arc<Shared>,
    on_drop: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl ChannelReceiver {
    /// The channel's name, shared (no copy).
    pub(crate) fn shared_name(&self) -> Arc<str> {
        self.shared.name.clone()
    }

    /// The channel's name: give it to others so they can
    /// [`send`](super::ChannelLayer::send) to this receiver.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Runs `f` when this receiver is dropped; backends use it to forget the
    /// channel and its group memberships.
    pub fn on_drop(mut self, f: impl FnOnce() + Send + Sync + 'static) -> Self {
        self.on_drop = Some(Box::new(f));
        self
    }

    /// Waits for the next event. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Event, RecvError> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Takes the next event if one is queued.
    pub fn try_recv(&mut self) -> Option<Result<Event, RecvError>> {
        let mut st = self.shared.lock();
        Self::take(&mut st)
    }

    /// Polls for the next event, registering the task to be woken.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Event, RecvError>> {
        let mut st = self.shared.lock();
        match Self::take(&mut st) {
            Some(r) => Poll::Ready(r),
            None => {
                match &mut st.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    slot => *slot = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }

    /// Moves every queued event into `out` (up to `max`), returning the
    /// number moved, or the lag/closed condition if nothing is queued.
    pub fn poll_recv_many(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<Event>,
        max: usize,
    ) -> Poll<Result<usize, RecvError>> {
        let mut st = self.shared.lock();
        if st.lagged > 0 {
            let n = std::mem::take(&mut st.lagged);
            return Poll::Ready(Err(RecvError::Lagged(n)));
        }
        let n = st.queue.len().min(max);
        if n > 0 {
            out.extend(st.queue.drain(..n));
            Self::wake_space_waiters(&mut st);
            if st.queue.is_empty() && st.queue.capacity() > 64 {
                st.queue.shrink_to(16);
            }
            return Poll::Ready(Ok(n));
        }
        if st.senders == 0 {
            return Poll::Ready(Err(RecvError::Closed));
        }
        st.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn take(st: &mut State) -> Option<Result<Event, RecvError>> {
        if st.lagged > 0 {
            let n = std::mem::take(&mut st.lagged);
            return Some(Err(RecvError::Lagged(n)));
        }
        if let Some(e) = st.queue.pop_front() {
            Self::wake_space_waiters(st);
            return Some(Ok(e));
        }
        if st.senders == 0 {
            return Some(Err(RecvError::Closed));
        }
        None
    }

    fn wake_space_waiters(st: &mut State) {
        for w in st.space_waiters.drain(..) {
            w.wake();
        }
    }

    /// Number of events waiting.
    pub fn len(&self) -> usize {
        self.shared.lock().queue.len()
    }

    /// Whether no event is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for ChannelReceiver {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            st.receiver_alive = false;
            st.queue.clear();
            Self::wake_space_waiters(&mut st);
        }
        if let Some(f) = self.on_drop.take() {
            f();
        }
    }
}

impl fmt::Debug for ChannelReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelReceiver")
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

impl futures_util::Stream for ChannelReceiver {
    type Item = Result<Event, RecvError>;

    fn poll_next(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut().poll_recv(cx) {
            Poll::Ready(Err(RecvError::Closed)) => Poll::Ready(None),
            Poll::Ready(r) => Poll::Ready(Some(r)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn send_waits_for_space_and_fails_when_closed() {
        let (tx, mut rx) = channel("c", 1);
        tx.send(Event::bare("1")).await.unwrap();
        let tx2 = tx.clone();
        let blocked = tokio::spawn(async move { tx2.send(Event::bare("2")).await.is_ok() });
        assert_eq!(rx.recv().await.unwrap().kind(), "1");
        assert!(blocked.await.unwrap());
        assert_eq!(rx.recv().await.unwrap().kind(), "2");
        tx.send(Event::bare("3")).await.unwrap();
        let tx3 = tx.clone();
        let waiting = tokio::spawn(async move { tx3.send(Event::bare("4")).await.is_err() });
        tokio::task::yield_now().await;
        drop(rx);
        assert!(
            waiting.await.unwrap(),
            "a dropped receiver fails the waiting send"
        );
    }

    #[tokio::test]
    async fn lossy_send_counts_and_reports_lag() {
        let (tx, mut rx) = channel("c", 2);
        assert_eq!(tx.send_lossy(Event::bare("1")), Delivery::Delivered);
        assert_eq!(tx.send_lossy(Event::bare("2")), Delivery::Delivered);
        assert_eq!(tx.send_lossy(Event::bare("3")), Delivery::Dropped);
        assert_eq!(rx.recv().await.unwrap_err(), RecvError::Lagged(1));
        assert_eq!(rx.recv().await.unwrap().kind(), "1");
        assert_eq!(rx.recv().await.unwrap().kind(), "2");
        drop(tx);
        assert_eq!(rx.recv().await.unwrap_err(), RecvError::Closed);
    }

    #[tokio::test]
    async fn dropped_receiver_closes_and_runs_hook() {
        let (hook_tx, hook_rx) = tokio::sync::oneshot::channel();
        let (tx, rx) = channel("c", 2);
        let rx = rx.on_drop(move || {
            let _ = hook_tx.send(());
        });
        drop(rx);
        assert!(tx.is_closed());
        assert!(matches!(
            tx.try_send(Event::bare("x")),
            Err(TrySendError::Closed(_))
        ));
        assert_eq!(tx.send_lossy(Event::bare("x")), Delivery::Closed);
        hook_rx.await.unwrap();
    }
}
