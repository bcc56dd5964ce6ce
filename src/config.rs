//! Per-connection settings: buffer sizes, limits and timers.

use std::time::Duration;

use crate::Compression;

/// Settings applied to every connection of a [`WebSocketLayer`](crate::WebSocketLayer).
///
/// The defaults keep an idle connection small (no read buffer between
/// messages, a write buffer that is released once the queue is written, and
/// no deflate state between messages) and cap what a peer can make the
/// server hold. A connection that keeps sending (a second message since
/// the last ping) keeps a write buffer of at most 1 KiB and its emptied
/// message queues (up to 16 entries each) between messages, given back
/// after a ping interval without data (with no ping interval, until it
/// closes).
///
/// | setting | default |
/// |---|---|
/// | [`read_buffer_size`](Self::read_buffer_size) | 2 KiB |
/// | [`write_buffer_size`](Self::write_buffer_size) | 8 KiB |
/// | [`max_message_size`](Self::max_message_size) | 1 MiB |
/// | [`max_frame_size`](Self::max_frame_size) | 1 MiB |
/// | [`max_outbound_bytes`](Self::max_outbound_bytes) | 1 MiB (soft; hard cap 4x, 4 MiB) |
/// | [`slow_client_timeout`](Self::slow_client_timeout) | 5 s |
/// | [`max_read_ahead_bytes`](Self::max_read_ahead_bytes) | 64 KiB |
/// | [`write_delay`](Self::write_delay) | off |
/// | [`compression`](Self::compression) | permessage-deflate when the client offers it ([`Compression::default`]) |
/// | [`ping_interval`](Self::ping_interval) | 25 s |
/// | [`idle_timeout`](Self::idle_timeout) | 60 s |
/// | [`close_timeout`](Self::close_timeout) | 5 s |
/// | [`max_buffered_messages`](Self::max_buffered_messages) | 64 |
/// | [`max_subprotocols`](Self::max_subprotocols) | 16 |
/// | [`max_connections`](Self::max_connections) | unlimited |
/// | [`rate_limit`](Self::rate_limit) | off |
/// | [`inflate_limit`](Self::inflate_limit) | 4 MiB/s, bursts of 1 MiB (close 1008) |
///
/// # Slow clients
///
/// A client is slow when it does not read what the server sends. The policy
/// is by time, not by burst size:
///
/// * [`max_outbound_bytes`](Self::max_outbound_bytes) is a **soft budget**
///   on the bytes a connection has queued and not yet written to the socket
///   (its own queue plus the frame writer's buffer). A connection above it
///   must read at least one budget's worth within every
///   [`slow_client_timeout`](Self::slow_client_timeout) (1 MiB per 5 s by
///   default, i.e. 200 KiB/s): each time it has, the clock restarts. A burst
///   of 3,000 x 4 KB messages therefore passes a client that keeps reading,
///   however large the burst is relative to the budget, while a client that
///   stops reading is closed `slow_client_timeout` after it fell behind.
/// * **4 x the soft budget is a hard cap**: a send that would cross it
///   closes the connection at once. This bounds the memory one connection
///   can hold whatever the timing: with the defaults, a client that never
///   reads holds at most 4 MiB of queued messages (plus the message it is
///   sending, up to [`max_message_size`](Self::max_message_size)). Measured
///   (`bench/deflate.sh`'s `deflate stall`: 20 clients that send 512 KiB
///   messages to an echo route and never read), 4.7 MiB of server RSS per
///   client at the peak; with the former 16 x cap, 17 MiB. A burst to a
///   client that keeps reading rarely reaches the cap, since it is drained
///   as it is queued (3,000 x 4 KB to 50 readers passes, `tests/hardening.rs`).
/// * Either way the connection is closed with
///   [`SLOW_CONSUMER`](crate::message::close_code::SLOW_CONSUMER) (4008): its
///   queue is dropped at once, it leaves its groups and its inbox is dropped
///   at once, and the close frame is still written after the bytes already
///   in the socket's write buffer (the client sees why it was closed if it
///   ever reads again), waiting at most [`close_timeout`](Self::close_timeout).
///
/// Bytes are counted as the client's lag on the wire: a group message shared
/// by 1,000 members counts its full length against each member's budget,
/// because each member must read all of it; the payload itself is held once
/// in memory for the whole group (see [`Event::text`](crate::channel_layer::Event::text)).
///
/// For comparison, Centrifugo closes a client whose queue exceeds 1 MiB at
/// once (close code 3008), without a grace period; Phoenix does not bound a
/// socket's outbound queue at all (the process mailbox grows until the VM
/// runs out of memory).
///
/// ```
/// use std::time::Duration;
/// use tower_channels::WebSocketConfig;
///
/// let config = WebSocketConfig::default()
///     .max_message_size(64 * 1024)
///     .ping_interval(Some(Duration::from_secs(10)));
/// # let _ = config;
/// ```
#[derive(Debug, Clone)]
pub struct WebSocketConfig {
    pub(crate) read_buffer_size: usize,
    pub(crate) write_buffer_size: usize,
    pub(crate) max_message_size: usize,
    pub(crate) max_frame_size: usize,
    pub(crate) max_outbound_bytes: usize,
    pub(crate) slow_client_timeout: Duration,
    pub(crate) max_read_ahead_bytes: usize,
    pub(crate) write_delay: Option<Duration>,
    pub(crate) compression: Compression,
    pub(crate) ping_interval: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) close_timeout: Duration,
    pub(crate) max_buffered_messages: usize,
    pub(crate) max_subprotocols: usize,
    pub(crate) max_connections: Option<usize>,
    pub(crate) rate_limit: Option<RateLimit>,
    pub(crate) inflate_limit: Option<InflateLimit>,
    pub(crate) time_event_handlers: bool,
}

/// A per-connection budget of incoming messages: `per_second` on average,
/// with bursts of up to `burst` (a token bucket). A client that keeps
/// exceeding it is closed with 1008 (policy violation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained messages per second.
    pub per_second: f64,
    /// Messages allowed in a burst above the sustained rate.
    pub burst: u32,
}

impl RateLimit {
    /// `per_second` messages per second with bursts of `burst`.
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self { per_second, burst }
    }
}

/// A per-connection budget of **inflated** bytes for permessage-deflate:
/// `bytes_per_second` on average, with bursts of up to `burst` bytes (a token
/// bucket, charged as each compressed frame is inflated). A connection that
/// exceeds it is closed with 1008 (policy violation, "inflate rate
/// exceeded").
///
/// Inflating costs the server CPU in proportion to what comes *out*, not
/// what comes in: a 1 KiB message can inflate to 1 MiB (about 0.6 ms of CPU),
/// so a client sending such messages back to back costs a core while sending
/// a few hundred KiB/s. `max_message_size` bounds the memory of one such
/// message, not the rate; this bounds the rate. Uncompressed messages are not
/// charged (their cost is already their size on the wire).
///
/// 1008 rather than 1009: no single message is too big (1009 is for that);
/// the connection broke a rate policy, as with [`RateLimit`].
///
/// The burst is raised to [`max_message_size`](WebSocketConfig::max_message_size)
/// if smaller, so one message of the largest allowed size always passes.
///
/// The default, 4 MiB/s with bursts of 1 MiB (one message of the default
/// largest size), is about 1,000 times what a chat client sends (a few KiB
/// of JSON a second); a bomb client gets about one message's worth of
/// inflate per connection before it is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflateLimit {
    /// Sustained inflated bytes per second.
    pub bytes_per_second: u64,
    /// Inflated bytes allowed in a burst above the sustained rate.
    pub burst: u64,
}

impl InflateLimit {
    /// `bytes_per_second` inflated bytes a second with bursts of `burst`.
    pub fn new(bytes_per_second: u64, burst: u64) -> Self {
        Self {
            bytes_per_second,
            burst,
        }
    }
}

impl Default for InflateLimit {
    /// 4 MiB/s with bursts of 1 MiB.
    fn default() -> Self {
        Self::new(4 << 20, 1 << 20)
    }
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            read_buffer_size: 2 * 1024,
            write_buffer_size: 8 * 1024,
            max_message_size: 1 << 20,
            max_frame_size: 1 << 20,
            max_outbound_bytes: 1 << 20,
            slow_client_timeout: Duration::from_secs(5),
            max_read_ahead_bytes: 64 << 10,
            write_delay: None,
            compression: Compression::default(),
            ping_interval: Some(Duration::from_secs(25)),
            idle_timeout: Some(Duration::from_secs(60)),
            close_timeout: Duration::from_secs(5),
            max_buffered_messages: 64,
            max_subprotocols: 16,
            max_connections: None,
            rate_limit: None,
            inflate_limit: Some(InflateLimit::default()),
            time_event_handlers: false,
        }
    }
}

/// A chained setter. The settings are write-only, as on tower-http's
/// layers: one idiom (builder methods, no getters) for every configuration
/// type; the values show in `Debug`.
macro_rules! setting {
    ($(#[$doc:meta])* $name:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.$name = value;
            self
        }
    };
}

impl WebSocketConfig {
    setting!(
        /// Bytes read from the socket at a time. The buffer is held only while
        /// a message is being read: between messages it is released, and the
        /// first read after a quiet spell goes to the stack (at most 4 KiB of
        /// it), so idle connections cost no read buffer.
        read_buffer_size: usize
    );
    setting!(
        /// Small outgoing frames are batched up to this many bytes before a
        /// write; every batch is flushed once the queue is empty. Large
        /// payloads (a shared group message) are not copied into it: their
        /// header goes out with the shared bytes in one vectored write. The
        /// buffer is released once the queue is written, so it costs an idle
        /// connection nothing.
        write_buffer_size: usize
    );
    setting!(
        /// Largest incoming message (after reassembling fragments). A bigger
        /// one closes the connection with 1009 before its payload is buffered.
        max_message_size: usize
    );
    setting!(
        /// Largest incoming frame payload; a bigger one closes with 1009.
        max_frame_size: usize
    );
    setting!(
        /// The soft budget of outgoing bytes a connection may have queued and
        /// not yet written; 4 times it is the hard cap. See
        /// [Slow clients](Self#slow-clients).
        max_outbound_bytes: usize
    );
    setting!(
        /// How long a connection above its soft outbound budget may go without
        /// reading a budget's worth before it is closed with 4008. See
        /// [Slow clients](Self#slow-clients).
        slow_client_timeout: Duration
    );
    setting!(
        /// Bytes of complete incoming messages read ahead while the consumer
        /// is busy (e.g. a handler waiting on a slow backend). When full, the
        /// server stops reading the socket, so the client is held back by
        /// TCP flow control instead of growing server memory. A single
        /// message larger than this is still read (up to
        /// [`max_message_size`](Self::max_message_size)), one at a time.
        max_read_ahead_bytes: usize
    );
    setting!(
        /// Waits up to this long after the first outgoing message before
        /// writing, so that messages produced meanwhile go out in one write
        /// (Centrifugo's `client_write_delay`). Saves system calls and TCP
        /// segments at very high fan-out rates, at the price of that much
        /// latency. `None` (the default) writes as soon as possible; control
        /// frames (pongs, close) are never delayed.
        write_delay: Option<Duration>
    );
    setting!(
        /// How often the server pings the client; `None` disables pings.
        ping_interval: Option<std::time::Duration>
    );
    setting!(
        /// A connection that sends nothing (no data, no pong) for this long is
        /// closed and its consumer's `disconnect` runs; `None` disables it.
        idle_timeout: Option<std::time::Duration>
    );
    setting!(
        /// How long to wait for the client's reply to a close frame before
        /// dropping the connection. Also bounds the *lingering close*: once
        /// our close frame is written, the write side is shut down and input
        /// is read and discarded (at most 1 MiB) until the client closes or
        /// this much time passes, so that a client still in the middle of a
        /// send reads the close code instead of a TCP reset. `Duration::ZERO`
        /// turns lingering off.
        close_timeout: std::time::Duration
    );
    setting!(
        /// Incoming messages read ahead while a handler is still running, in
        /// addition to [`max_read_ahead_bytes`](Self::max_read_ahead_bytes);
        /// past either the server stops reading (TCP backpressure).
        max_buffered_messages: usize
    );
    setting!(
        /// permessage-deflate (RFC 7692): negotiated when the client offers
        /// it, by default without context takeover, level 1, for messages of
        /// 256 bytes and more; [`Compression::disabled`] turns it off. See
        /// [`Compression`].
        compression: Compression
    );
    setting!(
        /// Handshakes offering more subprotocols than this are rejected with 400.
        max_subprotocols: usize
    );

    setting!(
        /// Most connections (open plus handshaking) the layer serves at once;
        /// past it handshakes get `503` with `Retry-After`. `None`: no limit.
        max_connections: Option<usize>
    );
    setting!(
        /// Per-connection inbound message budget; `None` (the default) is off.
        rate_limit: Option<RateLimit>
    );
    setting!(
        /// Per-connection budget of inflated bytes on permessage-deflate
        /// connections (see [`InflateLimit`]); `None` turns it off. On by
        /// default.
        inflate_limit: Option<InflateLimit>
    );

    setting!(
        /// Whether calls of consumers' `event` handlers are timed, in
        /// `tower_channels_handler_duration_seconds{handler="event"}`
        /// (feature `metrics`; `receive` handlers, one per client message,
        /// are always timed, in `{handler="receive"}`). Off by default, as
        /// Phoenix times `handle_in` but not the delivery of broadcasts: a
        /// group send runs an `event` handler per member, so timing them
        /// records one sample per delivery, and a Prometheus exporter
        /// stores each sample until it renders (measured: about 10 % of
        /// the server's CPU on a burst fan-out; see the README's
        /// performance section).
        time_event_handlers: bool
    );

    /// The hard cap of queued outgoing bytes (4 x the soft budget).
    pub(crate) fn outbound_hard_limit(&self) -> usize {
        self.max_outbound_bytes.saturating_mul(4)
    }
}
