//! Counters users can read: connections, messages and drops.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A snapshot of a [`WebSocketLayer`](crate::WebSocketLayer)'s counters
/// since it was built (see [`WebSocketLayer::stats`](crate::WebSocketLayer::stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionStats {
    /// Connections open now.
    pub open_connections: u64,
    /// Connections accepted in total.
    pub accepted_connections: u64,
    /// Handshakes refused (bad requests, origin, limits, consumers' rejections).
    pub rejected_handshakes: u64,
    /// Data messages received from clients by consumers.
    pub messages_in: u64,
    /// Data messages written to clients by consumers.
    pub messages_out: u64,
    /// Events or messages dropped because a client was too slow (its
    /// connection was then closed with 4008).
    pub dropped_slow: u64,
    /// Consumer handlers that panicked.
    pub panics: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    open: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    dropped_slow: AtomicU64,
    panics: AtomicU64,
}

impl Metrics {
    pub(crate) fn opened(&self) {
        self.open.fetch_add(1, Relaxed);
        self.accepted.fetch_add(1, Relaxed);
    }
    pub(crate) fn closed(&self) {
        self.open.fetch_sub(1, Relaxed);
    }
    pub(crate) fn rejected(&self) {
        self.rejected.fetch_add(1, Relaxed);
    }
    pub(crate) fn message_in(&self) {
        self.messages_in.fetch_add(1, Relaxed);
    }
    pub(crate) fn message_out(&self) {
        self.messages_out.fetch_add(1, Relaxed);
    }
    pub(crate) fn dropped_slow(&self, n: u64) {
        self.dropped_slow.fetch_add(n, Relaxed);
    }
    pub(crate) fn panicked(&self) {
        self.panics.fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> ConnectionStats {
        ConnectionStats {
            open_connections: self.open.load(Relaxed),
            accepted_connections: self.accepted.load(Relaxed),
            rejected_handshakes: self.rejected.load(Relaxed),
            messages_in: self.messages_in.load(Relaxed),
            messages_out: self.messages_out.load(Relaxed),
            dropped_slow: self.dropped_slow.load(Relaxed),
            panics: self.panics.load(Relaxed),
        }
    }
}
