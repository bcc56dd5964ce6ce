//! Per-connection settings: buffer sizes, limits and timers.

use std::time::Duration;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig as TsConfig;

/// Settings applied to every connection of a [`WebSocketLayer`](crate::WebSocketLayer).
///
/// The defaults keep an idle connection small (a 2 KiB read buffer instead of
/// tungstenite's 128 KiB) and cap what a peer can make the server hold.
///
/// | setting | default |
/// |---|---|
/// | [`read_buffer_size`](Self::read_buffer_size) | 2 KiB |
/// | [`write_buffer_size`](Self::write_buffer_size) | 8 KiB |
/// | [`max_message_size`](Self::max_message_size) | 1 MiB |
/// | [`max_frame_size`](Self::max_frame_size) | 1 MiB |
/// | [`max_outbound_bytes`](Self::max_outbound_bytes) | 1 MiB |
/// | [`ping_interval`](Self::ping_interval) | 25 s |
/// | [`idle_timeout`](Self::idle_timeout) | 60 s |
/// | [`close_timeout`](Self::close_timeout) | 5 s |
/// | [`max_buffered_messages`](Self::max_buffered_messages) | 64 |
/// | [`max_subprotocols`](Self::max_subprotocols) | 16 |
/// | [`max_connections`](Self::max_connections) | unlimited |
/// | [`rate_limit`](Self::rate_limit) | off |
///
/// ```
/// use std::time::Duration;
/// use tower_channels::WebSocketConfig;
///
/// let config = WebSocketConfig::default()
///     .max_message_size(64 * 1024)
///     .ping_interval(Some(Duration::from_secs(10)));
/// assert_eq!(config.get_max_message_size(), 64 * 1024);
/// ```
#[derive(Debug, Clone)]
pub struct WebSocketConfig {
    pub(crate) read_buffer_size: usize,
    pub(crate) write_buffer_size: usize,
    pub(crate) max_message_size: usize,
    pub(crate) max_frame_size: usize,
    pub(crate) max_outbound_bytes: usize,
    pub(crate) ping_interval: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) close_timeout: Duration,
    pub(crate) max_buffered_messages: usize,
    pub(crate) max_subprotocols: usize,
    pub(crate) max_connections: Option<usize>,
    pub(crate) rate_limit: Option<RateLimit>,
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

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            read_buffer_size: 2 * 1024,
            write_buffer_size: 8 * 1024,
            max_message_size: 1 << 20,
            max_frame_size: 1 << 20,
            max_outbound_bytes: 1 << 20,
            ping_interval: Some(Duration::from_secs(25)),
            idle_timeout: Some(Duration::from_secs(60)),
            close_timeout: Duration::from_secs(5),
            max_buffered_messages: 64,
            max_subprotocols: 16,
            max_connections: None,
            rate_limit: None,
        }
    }
}

macro_rules! setting {
    ($(#[$doc:meta])* $name:ident, $get:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.$name = value;
            self
        }

        #[doc = concat!("The current `", stringify!($name), "` setting.")]
        pub fn $get(&self) -> $ty {
            self.$name
        }
    };
}

impl WebSocketConfig {
    setting!(
        /// Bytes read from the socket at a time. This buffer lives as long as
        /// the connection, so it dominates the memory of idle connections.
        read_buffer_size, get_read_buffer_size: usize
    );
    setting!(
        /// Outgoing frames are batched up to this many bytes before a write;
        /// every batch is flushed once the queue is empty. The buffer keeps
        /// its size after a burst, so it is kept small by default.
        write_buffer_size, get_write_buffer_size: usize
    );
    setting!(
        /// Largest incoming message (after reassembling fragments). A bigger
        /// one closes the connection with 1009 before its payload is buffered.
        max_message_size, get_max_message_size: usize
    );
    setting!(
        /// Largest incoming frame payload; a bigger one closes with 1009.
        max_frame_size, get_max_frame_size: usize
    );
    setting!(
        /// Bytes of outgoing messages a connection may have queued and not yet
        /// written. A client that falls further behind is closed with
        /// [`SLOW_CONSUMER`](crate::message::close_code::SLOW_CONSUMER) (4008).
        max_outbound_bytes, get_max_outbound_bytes: usize
    );
    setting!(
        /// How often the server pings the client; `None` disables pings.
        ping_interval, get_ping_interval: Option<std::time::Duration>
    );
    setting!(
        /// A connection that sends nothing (no data, no pong) for this long is
        /// closed and its consumer's `disconnect` runs; `None` disables it.
        idle_timeout, get_idle_timeout: Option<std::time::Duration>
    );
    setting!(
        /// How long to wait for the client's reply to a close frame before
        /// dropping the connection.
        close_timeout, get_close_timeout: std::time::Duration
    );
    setting!(
        /// Incoming messages read ahead while a handler is still running; past
        /// this the server stops reading (TCP backpressure).
        max_buffered_messages, get_max_buffered_messages: usize
    );
    setting!(
        /// Handshakes offering more subprotocols than this are rejected with 400.
        max_subprotocols, get_max_subprotocols: usize
    );

    setting!(
        /// Most connections (open plus handshaking) the layer serves at once;
        /// past it handshakes get `503` with `Retry-After`. `None`: no limit.
        max_connections, get_max_connections: Option<usize>
    );
    setting!(
        /// Per-connection inbound message budget; `None` (the default) is off.
        rate_limit, get_rate_limit: Option<RateLimit>
    );

    pub(crate) fn tungstenite(&self) -> TsConfig {
        TsConfig::default()
            .read_buffer_size(self.read_buffer_size)
            .write_buffer_size(self.write_buffer_size)
            .max_write_buffer_size(
                self.write_buffer_size
                    .saturating_add(self.max_outbound_bytes)
                    .saturating_add(self.max_message_size),
            )
            .max_message_size(Some(self.max_message_size))
            .max_frame_size(Some(self.max_frame_size))
    }
}
