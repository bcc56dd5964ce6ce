//! Counters users can read ([`ConnectionStats`]), and with the `metrics`
//! feature the same figures through the [`metrics`](https://docs.rs/metrics)
//! facade, for Prometheus or any other exporter.
//!
//! The table of emitted metrics is in the [crate docs](crate#metrics).

use std::sync::{
    atomic::{AtomicU64, Ordering::Relaxed},
    Arc,
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
    /// HTTP fallback sessions (SSE, HTTP-streaming, long-poll) open now;
    /// also counted in `open_connections`.
    pub open_http_sessions: u64,
    /// HTTP fallback sessions accepted in total; also counted in
    /// `accepted_connections`.
    pub accepted_http_sessions: u64,
}

/// The transports, as the `transport` label names them.
const TRANSPORTS: [&str; 4] = ["websocket", "sse", "stream", "poll"];

fn transport_index(transport: &str) -> usize {
    TRANSPORTS.iter().position(|t| *t == transport).unwrap_or(0)
}

/// A layer's counters: what [`ConnectionStats`] reads, and with the
/// `metrics` feature the facade's handles, registered once per layer.
///
/// Nothing here is written per message: a connection counts its messages
/// in a [`LocalCounts`] and folds them once per flush or wake-up into the
/// stripe of its thread, so connections on different threads do not
/// contend on a cache line. The facade's message counters are written once
/// a second and at each close ([`publish`](Self::publish)), with no key
/// lookup.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    open: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    /// The per-message counts, one set per worker thread (see [`Stripe`]).
    stripes: [Stripe; STRIPES],
    dropped_slow: AtomicU64,
    slow_closes: AtomicU64,
    ignored_events: AtomicU64,
    panics: AtomicU64,
    http_open: AtomicU64,
    http_accepted: AtomicU64,
    #[cfg(feature = "metrics")]
    handles: std::sync::OnceLock<Handles>,
    /// The per-message totals already handed to the recorder (see
    /// [`Metrics::publish`]).
    #[cfg(feature = "metrics")]
    published: std::sync::Mutex<[u64; 4]>,
    /// Whether the publishing task was started (by the first connection).
    #[cfg(feature = "metrics")]
    publishing: std::sync::atomic::AtomicBool,
}

/// The facade's handles, registered with the recorder installed when the
/// layer first needs one (install the recorder before serving).
#[cfg(feature = "metrics")]
#[derive(Debug)]
struct Handles {
    open: metrics::Gauge,
    accepted: metrics::Counter,
    rejected: metrics::Counter,
    messages_in: metrics::Counter,
    messages_out: metrics::Counter,
    bytes_in: metrics::Counter,
    bytes_out: metrics::Counter,
    dropped: metrics::Counter,
    slow_closes: metrics::Counter,
    ignored_events: metrics::Counter,
    panics: metrics::Counter,
    /// `handler_duration_seconds{handler="receive"}`.
    receive: metrics::Histogram,
    /// `{handler="event"}`, registered at its first sample, so that a
    /// layer that does not time `event` handlers shows no empty series.
    event: std::sync::OnceLock<metrics::Histogram>,
    /// Per transport (see [`TRANSPORTS`]): open sessions, accepted sessions.
    by_transport: [(metrics::Gauge, metrics::Counter); 4],
}

#[cfg(feature = "metrics")]
impl Handles {
    fn register() -> Self {
        Self {
            open: metrics::gauge!("tower_channels_connections_open"),
            accepted: metrics::counter!("tower_channels_connections_accepted_total"),
            rejected: metrics::counter!("tower_channels_handshakes_rejected_total"),
            messages_in: metrics::counter!("tower_channels_messages_received_total"),
            messages_out: metrics::counter!("tower_channels_messages_sent_total"),
            bytes_in: metrics::counter!("tower_channels_received_bytes_total"),
            bytes_out: metrics::counter!("tower_channels_sent_bytes_total"),
            dropped: metrics::counter!("tower_channels_dropped_total"),
            slow_closes: metrics::counter!("tower_channels_slow_client_closes_total"),
            ignored_events: metrics::counter!("tower_channels_ignored_events_total"),
            panics: metrics::counter!("tower_channels_panics_total"),
            receive: metrics::histogram!("tower_channels_handler_duration_seconds", "handler" => "receive"),
            event: std::sync::OnceLock::new(),
            by_transport: TRANSPORTS.map(|t| {
                (
                    metrics::gauge!("tower_channels_transport_connections_open", "transport" => t),
                    metrics::counter!("tower_channels_transport_connections_accepted_total", "transport" => t),
                )
            }),
        }
    }
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

/// Stripes of the per-message counters: a power of two, more than the
/// worker threads of most servers.
const STRIPES: usize = 16;

/// One set of the per-message counters, on cache lines of its own: a fold
/// writes the stripe of the thread it runs on, so connections on different
/// worker threads never write the same line. Snapshots add the stripes up.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe {
    messages_in: AtomicU64,
    bytes_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_out: AtomicU64,
}

/// The stripe of the current thread: threads are numbered in the order they
/// first fold, modulo [`STRIPES`].
fn stripe_index() -> usize {
    use std::cell::Cell;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    INDEX.with(|i| {
        if i.get() == usize::MAX {
            i.set(NEXT.fetch_add(1, Relaxed) as usize % STRIPES);
        }
        i.get()
    })
}

/// Adds `n` to a counter that is read only by snapshots.
fn add(counter: &AtomicU64, n: u64) {
    if n > 0 {
        counter.fetch_add(n, Relaxed);
    }
}

/// How often the per-message counts reach the recorder: the message
/// counters of the `metrics` facade lag the layer's own
/// ([`ConnectionStats`]) by at most this much, and by nothing once a
/// connection closed.
#[cfg(feature = "metrics")]
const PUBLISH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Metrics {
    #[cfg(feature = "metrics")]
    fn handles(&self) -> &Handles {
        self.handles.get_or_init(Handles::register)
    }

    /// Hands the per-message counts folded since the last call to the
    /// recorder's counters. The recorder's counters are shared by every
    /// thread; written per fold (every flush of every connection) they cost
    /// a contended atomic add each, so they are written here instead: once
    /// a second (a task [`opened`](Self::opened) starts) and when a
    /// connection closes.
    #[cfg(feature = "metrics")]
    fn publish(&self) {
        let totals = [
            self.sum(|s| &s.messages_in),
            self.sum(|s| &s.bytes_in),
            self.sum(|s| &s.messages_out),
            self.sum(|s| &s.bytes_out),
        ];
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        let h = self.handles();
        let counters = [&h.messages_in, &h.bytes_in, &h.messages_out, &h.bytes_out];
        for ((counter, total), done) in counters.into_iter().zip(totals).zip(published.iter_mut()) {
            // Stripes are read one after the other while folds go on, so a
            // total is at least what an earlier call read.
            if total > *done {
                counter.increment(total - *done);
                *done = total;
            }
        }
    }

    /// Starts the task that calls [`publish`](Self::publish) every
    /// [`PUBLISH_EVERY`] while the layer lives, on the runtime of the first
    /// connection.
    #[cfg(feature = "metrics")]
    fn start_publishing(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let metrics = Arc::downgrade(self);
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(PUBLISH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match metrics.upgrade() {
                    Some(m) => m.publish(),
                    None => return,
                }
            }
        });
    }

    /// A connection on `transport` (`websocket`, `sse`, `stream`, `poll`) opened.
    pub(crate) fn opened(self: &Arc<Self>, transport: &'static str) {
        self.open.fetch_add(1, Relaxed);
        self.accepted.fetch_add(1, Relaxed);
        let i = transport_index(transport);
        if i > 0 {
            self.http_open.fetch_add(1, Relaxed);
            self.http_accepted.fetch_add(1, Relaxed);
        }
        emit! {
            // Once per layer, whatever registered the handles first (a
            // rejected handshake registers them without a connection).
            if !self.publishing.swap(true, Relaxed) {
                self.start_publishing();
            }
            let h = self.handles();
            h.open.increment(1.0);
            h.accepted.increment(1);
            h.by_transport[i].0.increment(1.0);
            h.by_transport[i].1.increment(1);
        }
    }
    /// A connection on `transport` ended.
    pub(crate) fn closed(&self, transport: &'static str) {
        self.open.fetch_sub(1, Relaxed);
        let i = transport_index(transport);
        if i > 0 {
            self.http_open.fetch_sub(1, Relaxed);
        }
        emit! {
            // What the connection counted reaches the recorder before its
            // close is counted (`closed_with`).
            self.publish();
            let h = self.handles();
            h.open.decrement(1.0);
            h.by_transport[i].0.decrement(1.0);
        }
    }
    /// A connection ended with `code` (the close code its `disconnect` got).
    pub(crate) fn closed_with(&self, code: CloseCode) {
        if code == close_code::SLOW_CONSUMER {
            self.slow_closes.fetch_add(1, Relaxed);
            emit! { self.handles().slow_closes.increment(1); }
        }
        emit! {
            // Once per connection; the label set is bounded (see `code_label`).
            metrics::counter!("tower_channels_closes_total", "code" => code_label(code)).increment(1);
        }
    }
    pub(crate) fn rejected(&self) {
        self.rejected.fetch_add(1, Relaxed);
        emit! { self.handles().rejected.increment(1); }
    }
    pub(crate) fn dropped_slow(&self, n: u64) {
        self.dropped_slow.fetch_add(n, Relaxed);
        emit! { self.handles().dropped.increment(n); }
    }
    pub(crate) fn ignored_event(&self) {
        self.ignored_events.fetch_add(1, Relaxed);
        emit! { self.handles().ignored_events.increment(1); }
    }
    pub(crate) fn panicked(&self) {
        self.panics.fetch_add(1, Relaxed);
        emit! { self.handles().panics.increment(1); }
    }

    /// One per-message counter, summed over the stripes.
    fn sum(&self, counter: impl Fn(&Stripe) -> &AtomicU64) -> u64 {
        self.stripes.iter().map(|s| counter(s).load(Relaxed)).sum()
    }

    pub(crate) fn snapshot(&self) -> ConnectionStats {
        ConnectionStats {
            open_connections: self.open.load(Relaxed),
            accepted_connections: self.accepted.load(Relaxed),
            rejected_handshakes: self.rejected.load(Relaxed),
            messages_in: self.sum(|s| &s.messages_in),
            messages_out: self.sum(|s| &s.messages_out),
            bytes_in: self.sum(|s| &s.bytes_in),
            bytes_out: self.sum(|s| &s.bytes_out),
            dropped_slow: self.dropped_slow.load(Relaxed),
            slow_client_closes: self.slow_closes.load(Relaxed),
            ignored_events: self.ignored_events.load(Relaxed),
            panics: self.panics.load(Relaxed),
            open_http_sessions: self.http_open.load(Relaxed),
            accepted_http_sessions: self.http_accepted.load(Relaxed),
        }
    }
}

/// One connection's message counts since its last fold into the layer's
/// [`Metrics`]: plain integers, written per message without touching a
/// shared cache line.
#[derive(Debug, Default)]
pub(crate) struct LocalCounts {
    messages_in: u64,
    bytes_in: u64,
    messages_out: u64,
    bytes_out: u64,
}

impl LocalCounts {
    /// A data message of `bytes` payload bytes was read.
    pub(crate) fn message_in(&mut self, bytes: usize) {
        self.messages_in += 1;
        self.bytes_in += bytes as u64;
    }

    /// A data message of `bytes` payload bytes went to the writer.
    pub(crate) fn message_out(&mut self, bytes: usize) {
        self.messages_out += 1;
        self.bytes_out += bytes as u64;
    }

    /// Adds the counts to `metrics` and starts again from zero. The engine
    /// folds before every flush (so a client that saw a reply sees it
    /// counted) and before it waits (so a handler sees its input counted).
    pub(crate) fn fold(&mut self, metrics: &Metrics) {
        if self.messages_in == 0 && self.messages_out == 0 {
            return;
        }
        let LocalCounts {
            messages_in,
            bytes_in,
            messages_out,
            bytes_out,
        } = std::mem::take(self);
        let stripe = &metrics.stripes[stripe_index()];
        add(&stripe.messages_in, messages_in);
        add(&stripe.bytes_in, bytes_in);
        add(&stripe.messages_out, messages_out);
        add(&stripe.bytes_out, bytes_out);
    }
}

/// Which handler a [`HandlerTimer`] times: the label `handler` of
/// `tower_channels_handler_duration_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handler {
    /// `receive`: a client message. Always timed.
    Receive,
    /// `event`: a channel-layer event; timed only when
    /// [`WebSocketConfig::time_event_handlers`](crate::WebSocketConfig::time_event_handlers)
    /// is on (one sample per delivery of a group send otherwise).
    Event,
}

/// Times handler calls for `tower_channels_handler_duration_seconds`, with
/// one read of the TSC clock (`quanta`) per timed call: a call's start is
/// the previous timed call's end when its input was already waiting, so
/// only a call after a wait (or after a call not timed) reads the clock
/// twice. Without the `metrics` feature it is empty and reads nothing.
#[derive(Debug, Default)]
pub(crate) struct HandlerTimer {
    #[cfg(feature = "metrics")]
    mark: Option<quanta::Instant>,
    /// The handler started last, when it is timed.
    #[cfg(feature = "metrics")]
    timing: Option<Handler>,
}

impl HandlerTimer {
    /// The next input had to be waited for: the last mark is stale.
    pub(crate) fn waited(&mut self) {
        emit! { self.mark = None; }
    }

    /// A `handler` starts; `timed` says whether it is timed.
    pub(crate) fn start(&mut self, handler: Handler, timed: bool) {
        let _ = (handler, timed);
        emit! {
            if !timed {
                // Its time must not count as the next timed call's.
                self.mark = None;
                self.timing = None;
                return;
            }
            if self.mark.is_none() {
                self.mark = Some(quanta::Instant::now());
            }
            self.timing = Some(handler);
        }
    }

    /// The handler started last ended: records its duration if timed.
    pub(crate) fn finish(&mut self, metrics: &Metrics) {
        let _ = metrics;
        emit! {
            let Some(handler) = self.timing.take() else {
                return;
            };
            let now = quanta::Instant::now();
            if let Some(start) = self.mark.replace(now) {
                let handles = metrics.handles();
                let histogram = match handler {
                    Handler::Receive => &handles.receive,
                    Handler::Event => handles.event.get_or_init(|| {
                        metrics::histogram!("tower_channels_handler_duration_seconds", "handler" => "event")
                    }),
                };
                histogram.record(now.duration_since(start).as_secs_f64());
            }
        }
    }
}

/// A successful group send on any channel layer, with how many members it
/// skipped (their queues were full). The handles are registered once per
/// process, at the first group send.
pub(crate) fn group_sent(dropped: usize) {
    let _ = dropped;
    emit! {
        static HANDLES: std::sync::OnceLock<(metrics::Counter, metrics::Counter)> =
            std::sync::OnceLock::new();
        let (sends, skipped) = HANDLES.get_or_init(|| {
            (
                metrics::counter!("tower_channels_group_sends_total"),
                metrics::counter!("tower_channels_group_send_dropped_total"),
            )
        });
        sends.increment(1);
        if dropped > 0 {
            skipped.increment(dropped as u64);
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

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use super::*;
    use metrics::{
        Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString,
        Unit,
    };
    use std::sync::Mutex;

    /// Records the `handler` label of every histogram sample.
    #[derive(Default)]
    struct Capture(Arc<Mutex<Vec<String>>>);

    struct Sample {
        label: String,
        samples: Arc<Mutex<Vec<String>>>,
    }

    impl HistogramFn for Sample {
        fn record(&self, _value: f64) {
            self.samples.lock().unwrap().push(self.label.clone());
        }
    }

    impl Recorder for Capture {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            let label = key
                .labels()
                .find(|l| l.key() == "handler")
                .map_or_else(String::new, |l| l.value().to_owned());
            Histogram::from_arc(Arc::new(Sample {
                label,
                samples: self.0.clone(),
            }))
        }
    }

    #[test]
    fn handler_timer_records_only_timed_calls_under_their_label() {
        let capture = Capture::default();
        let samples = capture.0.clone();
        metrics::with_local_recorder(&capture, || {
            let metrics = Metrics::default();
            let mut timer = HandlerTimer::default();
            timer.start(Handler::Receive, true);
            timer.finish(&metrics);
            timer.start(Handler::Event, false);
            timer.finish(&metrics);
            timer.waited();
            timer.start(Handler::Event, true);
            timer.finish(&metrics);
        });
        assert_eq!(*samples.lock().unwrap(), ["receive", "event"]);
    }
}
