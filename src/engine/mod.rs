//! The connection engine: one per-connection state machine under every
//! consumer form.
//!
//! Every accepted WebSocket, whatever its consumer form
//! ([`WebSocketConsumer`](crate::consumer::WebSocketConsumer),
//! [`JsonWebSocketConsumer`](crate::consumer::JsonWebSocketConsumer), or the
//! raw [`WebSocket`](crate::consumer::WebSocket) of a
//! [`from_fn`](crate::consumer::from_fn) consumer), and the test
//! [`Communicator`](crate::testing::Communicator), runs on this engine. It
//! owns the socket I/O, the timers, the limits and the outbound queue; the
//! *application* (the callback loop, or the user's future holding a
//! `WebSocket`) shares a small state with it (`Link`) and is polled in the
//! same task by the `Host`, so the lock between them is never contended and
//! no message crosses a channel.
//!
//! The engine talks to a `Peer` (`peer.rs`): a WebSocket socket (the
//! frame codec over a byte transport), or an HTTP fallback session
//! (`http/`: SSE, HTTP-streaming, long-poll). Everything else here (the
//! phases, the outbound budget, heartbeats, timeouts, limits, shutdown,
//! counters) is the same code for both.
//!
//! Dependencies run one way: value types (message, payload, scope, config)
//! <- channel layer <- engine <- consumer <- middleware / testing.
//!
//! # Phases
//!
//! A connection is in exactly one phase:
//!
//! * **Open**: messages flow both ways. Incoming data is read ahead while the
//!   application is busy, up to
//!   [`max_read_ahead_bytes`](crate::WebSocketConfig::max_read_ahead_bytes);
//!   then the socket is not read (TCP holds the client back). Pings go out
//!   every [`ping_interval`](crate::WebSocketConfig::ping_interval); only
//!   data and pongs count as the client being alive (a ping does not), and
//!   only the latest ping is answered, so a ping flood holds one pong.
//! * **Closing**: entered when either side sends a close, the server shuts
//!   down (1001), a limit is crossed (1008, 1009, 4008), the peer breaks the
//!   protocol (1002, 1007) or goes silent (idle timeout). At that moment the
//!   connection leaves its groups and drops its inbox, so a closing
//!   connection holds no events and receives no group sends. Our close frame
//!   is queued (after the application's queued messages for a graceful
//!   close, instead of them otherwise) and is written before the engine gives
//!   up; the engine then waits for the peer's close, at most
//!   [`close_timeout`](crate::WebSocketConfig::close_timeout).
//! * **Closed**: the socket's buffers are dropped; the application sees the
//!   end (`disconnect` runs with the close code). The transport itself
//!   *lingers* when the peer may still be sending (see `Socket::close`): its
//!   write side is shut down after the close frame and input is discarded
//!   until the peer closes, at most
//!   [`close_timeout`](crate::WebSocketConfig::close_timeout) and 1 MiB,
//!   so the close frame is not lost to a TCP reset.
//!
//! # Outbound budget
//!
//! See [`WebSocketConfig`'s slow-client policy](crate::WebSocketConfig#slow-clients):
//! a soft budget that may be exceeded for at most
//! [`slow_client_timeout`](crate::WebSocketConfig::slow_client_timeout), a
//! hard cap at 4 times it, close 4008 either way. The engine moves queued
//! messages into the frame writer one write buffer at a time, so the
//! writer's buffer stays small and a close frame is never far behind.
//!
//! The raw `WebSocket`'s `send`/`feed` wait while the queue is above the
//! soft budget (backpressure, as a `Sink`); a [`Context`](crate::consumer::Context)'s
//! sends never wait and fail at the hard cap.

mod driver;
mod host;
pub(crate) mod http;
mod link;
mod peer;
mod probe;
mod runtime;
mod socket;
mod transport;
pub(crate) mod wire;

/// Re-exported as [`consumer::Incoming`](crate::consumer::Incoming).
pub use self::link::Incoming;

pub(crate) use self::{
    driver::Engine,
    host::{Host, Slot},
    link::{AppLink, Link, Status},
    peer::Peer,
    probe::{FinishOnDrop, Probe},
    runtime::{Runtime, Tracker},
    socket::Socket,
    transport::Transport,
    wire::Outbound,
};

/// Read by the test kit only.
#[cfg(feature = "testing")]
pub(crate) use self::probe::Progress;

use std::any::Any;

/// The text of a panic payload.
pub(crate) fn panic_message(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

#[cfg(all(test, target_pointer_width = "64"))]
mod size_tests {
    /// An idle connection's task holds its host (the engine and its socket
    /// inline) for the connection's life: rarely used state (a fragmented
    /// or compressed message in progress, deflate contexts, the closing
    /// handshake) is boxed so this stays small. Grew past the bound? Box
    /// the new field or justify raising it.
    #[test]
    fn connection_state_stays_small() {
        use std::mem::size_of;
        let sizes = [
            ("Host", size_of::<super::Host>(), 616),
            ("Engine", size_of::<super::Engine>(), 552),
            ("FrameReader", size_of::<super::wire::FrameReader>(), 136),
            ("FrameWriter", size_of::<super::wire::FrameWriter>(), 112),
            ("Link", size_of::<super::Link>(), 240),
        ];
        for (name, size, bound) in sizes {
            assert!(size <= bound, "{name} is {size} bytes (bound {bound})");
        }
    }
}
