//! Runs a connection's application and its engine in one task.

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use futures_util::FutureExt;

use super::{panic_message, Engine, FinishOnDrop, Probe, Runtime, Tracker};
use crate::{
    channel_layer::BoxFuture,
    message::{close_code, CloseFrame},
};

/// Where `accept` leaves the engine for the host to pick up.
#[derive(Debug, Default)]
pub(crate) struct Slot(Mutex<Option<Engine>>);

impl Slot {
    pub(crate) fn put(&self, engine: Engine) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(engine);
    }

    fn take(&self) -> Option<Engine> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The future a connection task runs: the application (a consumer's callback
/// loop, or the user's raw future) and, once the handshake is accepted, the
/// engine, polled one after the other in the same task.
///
/// The application ending does not end the connection while a handle to it
/// is alive; when none is left the engine closes with 1000 and finishes the
/// closing handshake. A panicking application closes with 1011.
pub(crate) struct Host {
    runtime: Arc<Runtime>,
    /// Released once the engine is taken: it is as large as the engine.
    slot: Option<Arc<Slot>>,
    app: Option<BoxFuture<'static, ()>>,
    engine: Option<Engine>,
    engine_done: bool,
    /// Told when the connection's task is done (see [`Host::tracked`]).
    tracked: Option<(Arc<Tracker>, u64)>,
    /// Dropped last (after the application and the engine): tells a test's
    /// probe that the connection's task ended.
    _finish: FinishOnDrop,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl Host {
    pub(crate) fn new(
        runtime: Arc<Runtime>,
        slot: Arc<Slot>,
        app: BoxFuture<'static, ()>,
        probe: Option<Probe>,
    ) -> Self {
        Self {
            runtime,
            slot: Some(slot),
            app: Some(app),
            engine: None,
            engine_done: false,
            tracked: None,
            _finish: FinishOnDrop::new(probe),
        }
    }

    /// Reports the end of this connection to `tracker` as task `id`.
    pub(crate) fn tracked(mut self, tracker: Arc<Tracker>, id: u64) -> Self {
        self.tracked = Some((tracker, id));
        self
    }
}

impl Future for Host {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        // Bounded: a pair of sides that keep waking each other yields.
        for _ in 0..64 {
            if let Some(e) = &this.engine {
                e.link().enter_host(cx.waker());
            }
            if let Some(app) = &mut this.app {
                match AssertUnwindSafe(app.as_mut()).catch_unwind().poll_unpin(cx) {
                    Poll::Pending => {}
                    Poll::Ready(Ok(())) => this.app = None,
                    Poll::Ready(Err(p)) => {
                        this.app = None;
                        tracing::error!(panic = %panic_message(&*p), "consumer panicked; closing with 1011");
                        this.runtime.metrics.panicked();
                        if let Some(e) = this.slot_engine() {
                            e.link()
                                .close(CloseFrame::new(close_code::ERROR, "internal error"), false);
                        }
                    }
                }
            }
            if this.engine.is_none() && !this.engine_done {
                if let Some(e) = this.take_engine() {
                    e.link().enter_host(cx.waker());
                    this.engine = Some(e);
                }
            }
            let mut again = false;
            if let Some(e) = &mut this.engine {
                if this.app.is_none() && e.application_detached() {
                    e.application_gone();
                }
                // What the application changed just now the engine sees in
                // this poll: only what the engine changes for the
                // application calls for another turn.
                e.link().engine_turn();
                let done = e.poll(cx).is_ready();
                again = e.link().leave_host();
                if done {
                    this.engine = None;
                    this.engine_done = true;
                    again = this.app.is_some();
                }
            }
            if this.app.is_none() && this.engine.is_none() {
                if let Some((tracker, id)) = this.tracked.take() {
                    tracker.finished(id);
                }
                return Poll::Ready(());
            }
            if !again {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Host {
    fn slot_engine(&mut self) -> Option<&mut Engine> {
        if self.engine.is_none() && !self.engine_done {
            self.engine = self.take_engine();
        }
        self.engine.as_mut()
    }

    /// The engine `accept` left in the slot, if it did; the slot goes with
    /// it, and the tracker learns the link shutdown is to close.
    fn take_engine(&mut self) -> Option<Engine> {
        let engine = self.slot.as_ref()?.take()?;
        self.slot = None;
        if let Some((tracker, id)) = &self.tracked {
            if !tracker.attach(*id, engine.link()) {
                engine.link().shut_down();
            }
        }
        Some(engine)
    }
}
