//! Counters users can read ([`ConnectionStats`]), and with the `metrics`
//! feature the same figures through the [`metrics`](https://docs.rs/metrics)
//! facade, for Prometheus or any other exporter.
//!
//! The table of emitted metrics is in the [crate docs](crate#metrics).

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use crate::message::{close_code, CloseCode};

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
    /// Payload bytes of the messages received.
    pub bytes_in: u64,
    /// Payload bytes of the messages written.
    pub bytes_out: u64,
    /// Events or messages dropped because a client was too slow (its
    /// connection was then closed with 4008).
    pub dropped_slow: u64,
    /// Connections closed with 4008 because the client was too slow.
    pub slow_client_closes: u64,
    /// Channel-layer events that no handler took and that were ignored
    /// (see [`forward_event`](crate::consumer::forward_event)).
    pub ignored_events: u64,
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
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    dropped_slow: AtomicU64,
    slow_closes: AtomicU64,
    ignored_events: AtomicU64,
    panics: AtomicU64,
}

/// Emits through the `metrics` facade when the feature is on; nothing otherwise.
macro_rules! emit {
    ($($t:tt)*) => {
        #[cfg(feature = "metrics")]
        {
            $($t)*
        }
    };
}

impl Metrics {
    pub(crate) fn opened(&self) {
        self.open.fetch_add(1, Relaxed);
        self.accepted.fetch_add(1, Relaxed);
        emit! {
            metrics::gauge!("tower_channels_connections_open").increment(1.0);
            metrics::counter!("tower_channels_connections_accepted_total").increment(1);
        }
    }
    pub(crate) fn closed(&self) {
        self.open.fetch_sub(1, Relaxed);
        emit! { metrics::gauge!("tower_channels_connections_open").decrement(1.0); }
    }
    /// A connection ended with `code` (the close code its `disconnect` got).
    pub(crate) fn closed_with(&self, code: CloseCode) {
        if code == close_code::SLOW_CONSUMER {
            self.slow_closes.fetch_add(1, Relaxed);
            emit! { metrics::counter!("tower_channels_slow_client_closes_total").increment(1); }
        }
        emit! {
            metrics::counter!("tower_channels_closes_total", "code" => code_label(code)).increment(1);
        }
    }
    pub(crate) fn rejected(&self) {
        self.rejected.fetch_add(1, Relaxed);
        emit! { metrics::counter!("tower_channels_handshakes_rejected_total").increment(1); }
    }
    pub(crate) fn message_in(&self) {
        self.messages_in.fetch_add(1, Relaxed);
        emit! { metrics::counter!("tower_channels_messages_received_total").increment(1); }
    }
    pub(crate) fn bytes_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Relaxed);
        emit! { metrics::counter!("tower_channels_received_bytes_total").increment(n as u64); }
    }
    pub(crate) fn message_out(&self) {
        self.messages_out.fetch_add(1, Relaxed);
        emit! { metrics::counter!("tower_channels_messages_sent_total").increment(1); }
    }
    pub(crate) fn bytes_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Relaxed);
        emit! { metrics::counter!("tower_channels_sent_bytes_total").increment(n as u64); }
    }
    pub(crate) fn dropped_slow(&self, n: u64) {
        self.dropped_slow.fetch_add(n, Relaxed);
        emit! { metrics::counter!("tower_channels_dropped_total").increment(n); }
    }
    pub(crate) fn ignored_event(&self) {
        self.ignored_events.fetch_add(1, Relaxed);
        emit! { metrics::counter!("tower_channels_ignored_events_total").increment(1); }
    }
    pub(crate) fn panicked(&self) {
        self.panics.fetch_add(1, Relaxed);
        emit! { metrics::counter!("tower_channels_panics_total").increment(1); }
    }
    /// A `receive` or `event` handler ran for `elapsed`.
    pub(crate) fn handler_time(&self, elapsed: Duration) {
        let _ = elapsed;
        emit! {
            metrics::histogram!("tower_channels_handler_duration_seconds")
                .record(elapsed.as_secs_f64());
        }
    }

    pub(crate) fn snapshot(&self) -> ConnectionStats {
        ConnectionStats {
            open_connections: self.open.load(Relaxed),
            accepted_connections: self.accepted.load(Relaxed),
            rejected_handshakes: self.rejected.load(Relaxed),
            messages_in: self.messages_in.load(Relaxed),
            messages_out: self.messages_out.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            dropped_slow: self.dropped_slow.load(Relaxed),
            slow_client_closes: self.slow_closes.load(Relaxed),
            ignored_events: self.ignored_events.load(Relaxed),
            panics: self.panics.load(Relaxed),
        }
    }
}

/// A successful group send on any channel layer, with how many members it
/// skipped (their queues were full).
pub(crate) fn group_sent(dropped: usize) {
    let _ = dropped;
    emit! {
        metrics::counter!("tower_channels_group_sends_total").increment(1);
        if dropped > 0 {
            metrics::counter!("tower_channels_group_send_dropped_total").increment(dropped as u64);
        }
    }
}

/// The `code` label: the codes RFC 6455 and this crate define, else
/// `other` (clients choose any code from 3000 to 4999; one label each would
/// let them grow the series without bound).
#[cfg(feature = "metrics")]
fn code_label(code: CloseCode) -> &'static str {
    const CODES: [(CloseCode, &str); 16] = [
        (1000, "1000"),
        (1001, "1001"),
        (1002, "1002"),
        (1003, "1003"),
        (1005, "1005"),
        (1006, "1006"),
        (1007, "1007"),
        (1008, "1008"),
        (1009, "1009"),
        (1010, "1010"),
        (1011, "1011"),
        (1012, "1012"),
        (1013, "1013"),
        (1014, "1014"),
        (1015, "1015"),
        (close_code::SLOW_CONSUMER, "4008"),
    ];
    CODES
        .iter()
        .find(|(c, _)| *c == code)
        .map_or("other", |(_, label)| label)
}
