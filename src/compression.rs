//! permessage-deflate settings (RFC 7692), re-exported as [`crate::Compression`].

/// permessage-deflate settings (RFC 7692): whether to accept a client's offer and how to
/// compress.
///
/// Compression is **on by default** whenever the client offers it (every
/// browser, Python `websockets`, Node `ws` and Django/daphne do). The defaults
/// are chosen so that an idle connection carries no compressor state:
///
/// | setting | default | meaning |
/// |---|---|---|
/// | [`level`](Self::level) | 1 | zlib level 0-9; 1 is the fastest and compresses chat-sized JSON nearly as well as 6 |
/// | [`threshold`](Self::threshold) | 256 bytes | messages shorter than this are sent uncompressed |
/// | [`server_context_takeover`](Self::server_context_takeover) | `false` | the server starts a fresh deflate stream for every message |
/// | [`client_context_takeover`](Self::client_context_takeover) | `false` | the server asks the client to do the same (`client_no_context_takeover`) |
/// | [`server_max_window_bits`](Self::server_max_window_bits) | 15 | the server's LZ77 window, 9-15 (512 B to 32 KiB) |
/// | [`client_max_window_bits`](Self::client_max_window_bits) | 15 | the window the client may use, 8-15, when it offers the parameter |
///
/// Without context takeover each message is compressed on its own: the
/// compressor is borrowed from a small per-thread pool for the duration of one
/// message, so a connection between messages holds no deflate state, and a
/// message sent to a whole group ([`Event::text`](crate::channel_layer::Event::text))
/// is compressed **once** for every member that negotiated the same window
/// and level. Context takeover compresses repeated content better (a message
/// may refer to the previous ones) but costs a compressor per connection
/// (about 256 KiB at window 15 for the server side, 40 KiB for the client
/// side) and a per-connection compression of every group message.
///
/// ```
/// use tower_channels::Compression;
///
/// // The defaults: on when offered, level 1, 256-byte threshold, no context takeover.
/// let default = Compression::default();
/// assert_eq!(default, Compression::new().level(1).threshold(256));
///
/// // Compress harder, and only messages of 1 KiB and more.
/// let tuned = Compression::default().level(6).threshold(1024);
///
/// // Never negotiate compression.
/// let off = Compression::disabled();
/// # let _ = (tuned, off);
/// ```
///
/// Like tower-http's layers, the settings are write-only: set them here,
/// read them in the type's `Debug` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Compression {
    pub(crate) enabled: bool,
    pub(crate) level: u32,
    pub(crate) threshold: usize,
    pub(crate) server_context_takeover: bool,
    pub(crate) client_context_takeover: bool,
    pub(crate) server_max_window_bits: u8,
    pub(crate) client_max_window_bits: u8,
}

impl Default for Compression {
    fn default() -> Self {
        Self {
            enabled: true,
            level: 1,
            threshold: 256,
            server_context_takeover: false,
            client_context_takeover: false,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
        }
    }
}

impl Compression {
    /// The default settings: compression is negotiated when the client offers it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Never negotiate compression: the `Sec-WebSocket-Extensions` offer is ignored.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// Sets the zlib compression level, 0 (store only) to 9 (smallest output).
    ///
    /// # Panics
    ///
    /// If `level` is above 9.
    pub fn level(mut self, level: u32) -> Self {
        assert!(level <= 9, "compression level must be 0..=9, got {level}");
        self.level = level;
        self
    }

    /// Messages whose payload is shorter than `bytes` are sent uncompressed
    /// (deflate cannot shrink tiny payloads and costs CPU for nothing).
    ///
    /// Above the threshold, a message that deflate would make longer is sent
    /// uncompressed too (RFC 7692 allows it without context takeover).
    /// `threshold(0)` compresses every message, even those, for peers that
    /// mishandle uncompressed messages in a compressed session.
    pub fn threshold(mut self, bytes: usize) -> Self {
        self.threshold = bytes;
        self
    }

    /// Whether the server keeps its deflate context between messages
    /// (`false` by default: the server answers `server_no_context_takeover`
    /// even when the client did not ask for it). A client that asks for
    /// `server_no_context_takeover` always gets it.
    pub fn server_context_takeover(mut self, enabled: bool) -> Self {
        self.server_context_takeover = enabled;
        self
    }

    /// Whether the client may keep its deflate context between messages
    /// (`false` by default: the server answers `client_no_context_takeover`,
    /// so it can inflate every message with a fresh, pooled decompressor).
    pub fn client_context_takeover(mut self, enabled: bool) -> Self {
        self.client_context_takeover = enabled;
        self
    }

    /// The largest LZ77 window the server compresses with, as a power of two
    /// (9 = 512 bytes to 15 = 32 KiB). A client asking for less gets what it
    /// asks for; an offer of 8 is declined (zlib cannot compress with a
    /// 256-byte window), and the next offer, if any, is considered.
    ///
    /// # Panics
    ///
    /// If `bits` is outside 9..=15.
    pub fn server_max_window_bits(mut self, bits: u8) -> Self {
        assert!(
            (9..=15).contains(&bits),
            "server_max_window_bits must be 9..=15, got {bits}"
        );
        self.server_max_window_bits = bits;
        self
    }

    /// The largest LZ77 window the client may compress with (8..=15), sent as
    /// `client_max_window_bits` when the client's offer carries that
    /// parameter (a client that does not offer it may use 15).
    ///
    /// # Panics
    ///
    /// If `bits` is outside 8..=15.
    pub fn client_max_window_bits(mut self, bits: u8) -> Self {
        assert!(
            (8..=15).contains(&bits),
            "client_max_window_bits must be 8..=15, got {bits}"
        );
        self.client_max_window_bits = bits;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_sets_every_setting() {
        let c = Compression::new()
            .level(9)
            .threshold(0)
            .server_context_takeover(true)
            .client_context_takeover(true)
            .server_max_window_bits(10)
            .client_max_window_bits(8);
        assert!(c.enabled);
        assert_eq!(c.level, 9);
        assert_eq!(c.threshold, 0);
        assert!(c.server_context_takeover);
        assert!(c.client_context_takeover);
        assert_eq!(c.server_max_window_bits, 10);
        assert_eq!(c.client_max_window_bits, 8);
    }

    #[test]
    #[should_panic(expected = "server_max_window_bits must be 9..=15")]
    fn server_window_of_8_is_refused() {
        let _ = Compression::new().server_max_window_bits(8);
    }

    #[test]
    #[should_panic(expected = "compression level must be 0..=9")]
    fn level_above_9_is_refused() {
        let _ = Compression::new().level(10);
    }
}
