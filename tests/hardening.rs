//! Hardening over real sockets: size limits (1009), rate limits (1008),
//! connection limits (503), missing pongs, slow clients (4008), graceful
//! shutdown (1001) and origin checks (403).
//!
//! Every server is a real axum server on 127.0.0.1:0 with the layer; clients
//! are tokio-tungstenite or raw TCP where a misbehaving client is needed.
//! Nothing sleeps to synchronize: the tests wait for signals from the
//! consumers, or poll a condition in a bounded loop.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::Router;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::{mpsc, Notify, RwLock},
};
use tokio_tungstenite::tungstenite::{
    self,
    client::IntoClientRequest,
    protocol::{
        frame::{
            coding::{Data, OpCode},
            Frame,
        },
        WebSocketConfig as ClientConfig,
    },
    Message,
};
use tower_channels::{
    channel_layer::{BoxError, Event, InMemoryChannelLayer},
    consumer::{
        from_fn, websocket_consumer, Accept, Connection, Context, Reject, WebSocketConsumer,
    },
    message::{self, close_code, CloseCode},
    origin::AllowedOrigins,
    RateLimit, WebSocketConfig, WebSocketLayer,
};

/// The slow-client test saturates both cores and measures the process' RSS:
/// it runs alone (write lock); the other tests, which depend on timers
/// (pings, rate budgets), share the read lock.
static LOAD: RwLock<()> = RwLock::const_new(());

// ---------------------------------------------------------------------------
// A probe consumer and helpers
// ---------------------------------------------------------------------------

/// Echoes text and binary messages and reports its disconnect code.
///
/// * `"block"`: reports on `entered`, waits for `release`, then sends `"released"`;
/// * `"hang"`: reports on `entered`, then never returns.
#[derive(Clone)]
struct Probe {
    gone: mpsc::UnboundedSender<CloseCode>,
    entered: mpsc::UnboundedSender<()>,
    release: Arc<Notify>,
}

impl WebSocketConsumer for Probe {
    async fn receive(&mut self, ctx: &mut Context, msg: message::Message) -> Result<(), BoxError> {
        match msg.as_text() {
            Some("block") => {
                let _ = self.entered.send(());
                self.release.notified().await;
                ctx.send_text("released")?;
            }
            Some("hang") => {
                let _ = self.entered.send(());
                std::future::pending::<()>().await;
            }
            _ => ctx.send(msg)?,
        }
        Ok(())
    }

    async fn disconnect(&mut self, _ctx: &mut Context, code: CloseCode) {
        let _ = self.gone.send(code);
    }
}

/// A [`Probe`] and the receiving ends of its signals.
struct Probes {
    probe: Probe,
    gone: mpsc::UnboundedReceiver<CloseCode>,
    entered: mpsc::UnboundedReceiver<()>,
}

fn probes() -> Probes {
    let (gone_tx, gone) = mpsc::unbounded_channel();
    let (entered_tx, entered) = mpsc::unbounded_channel();
    Probes {
        probe: Probe {
            gone: gone_tx,
            entered: entered_tx,
            release: Arc::new(Notify::new()),
        },
        gone,
        entered,
    }
}

impl Probes {
    /// A layer with the probe on `/ws/probe` and `config`.
    fn layer(&self, config: WebSocketConfig) -> WebSocketLayer {
        let probe = self.probe.clone();
        WebSocketLayer::new()
            .with_config(config)
            .route("/ws/probe", websocket_consumer(move |_| probe.clone()))
    }

    /// The code the next finished connection's `disconnect` got.
    async fn next_disconnect(&mut self) -> CloseCode {
        within("a consumer's disconnect", self.gone.recv())
            .await
            .expect("the probe's sender lives as long as the layer")
    }
}

async fn serve(channels: &WebSocketLayer) -> SocketAddr {
    serve_axum(Router::new().layer(channels.clone())).await
}

/// Waits until `cond` holds, re-checking after letting other tasks run;
/// bounded by [`TIMEOUT`].
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// Reads until the stream ends, so the client answers a close frame.
async fn drain<S>(ws: &mut S)
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    within("the connection to end", async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// The reply to a WebSocket handshake on `path` with extra headers, read whole.
async fn handshake_reply(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = ws_req(addr, path);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    http1(addr, empty(req)).await
}

/// A tokio-tungstenite handshake that must be refused: the HTTP status.
async fn refused_status(req: impl IntoClientRequest + Unpin) -> StatusCode {
    match within("a refused handshake", tokio_tungstenite::connect_async(req)).await {
        Err(tungstenite::Error::Http(res)) => res.status(),
        Err(e) => panic!("expected an HTTP error response, got {e}"),
        Ok((_, res)) => panic!("expected a refusal, got {}", res.status()),
    }
}

// ---------------------------------------------------------------------------
// 1. Size limits
// ---------------------------------------------------------------------------

/// Sends `msgs` from another task (the server stops reading at the first
/// frame past a limit, so a full socket could stall a send) while reading
/// the server's close frame.
async fn send_expecting_close(addr: SocketAddr, msgs: Vec<Message>) -> (u16, String) {
    let ws = connect(addr, "/ws/probe").await;
    let (mut tx, mut rx) = ws.split();
    let sender = tokio::spawn(async move {
        for m in msgs {
            if tx.feed(m).await.is_err() {
                return;
            }
        }
        let _ = tx.flush().await;
    });
    let close = next_close(&mut rx).await;
    sender.abort();
    close
}

fn text_fragments(total: usize, fragment: usize) -> Vec<Message> {
    let n = total.div_ceil(fragment);
    (0..n)
        .map(|i| {
            let opcode = if i == 0 {
                OpCode::Data(Data::Text)
            } else {
                OpCode::Data(Data::Continue)
            };
            let len = fragment.min(total - i * fragment);
            Message::Frame(Frame::message(vec![b'f'; len], opcode, i + 1 == n))
        })
        .collect()
}

#[tokio::test]
async fn oversize_message_closes_1009_with_default_limits() {
    let _shared = LOAD.read().await;
    let mut p = probes();
    let channels = p.layer(WebSocketConfig::default());
    let addr = serve(&channels).await;

    // Just under the limits: echoed.
    let mut ws = connect(addr, "/ws/probe").await;
    let big = "a".repeat((1 << 20) - 16);
    ws.send(Message::text(big.clone())).await.expect("send");
    assert_eq!(
        next_text(&mut ws).await.len(),
        big.len(),
        "1 MiB - 16 echoed"
    );
    close(&mut ws).await;
    assert_eq!(p.next_disconnect().await, close_code::NORMAL);

    // 2 MiB of text in one frame.
    let started = Instant::now();
    let (code, reason) = send_expecting_close(addr, vec![Message::text("x".repeat(2 << 20))]).await;
    assert_eq!(
        (code, reason.as_str()),
        (1009, "message too large"),
        "a 2 MiB message"
    );
    assert_eq!(p.next_disconnect().await, close_code::SIZE);
    eprintln!(
        "2 MiB single frame: closed 1009 after {:?}",
        started.elapsed()
    );

    // 2 MiB of text in 512 KiB fragments: every frame is within
    // max_frame_size, the message is not.
    let (code, _) = send_expecting_close(addr, text_fragments(2 << 20, 512 << 10)).await;
    assert_eq!(code, 1009, "a 2 MiB message in four 512 KiB frames");
    assert_eq!(p.next_disconnect().await, close_code::SIZE);
}

#[tokio::test]
async fn oversize_frame_closes_1009_even_when_the_message_would_fit() {
    let _shared = LOAD.read().await;
    let mut p = probes();
    let config = WebSocketConfig::default()
        .max_frame_size(16 << 10)
        .max_message_size(256 << 10);
    let addr = serve(&p.layer(config)).await;

    // 64 KiB in 8 KiB fragments: each frame is small, the message fits.
    let mut ws = connect(addr, "/ws/probe").await;
    for m in text_fragments(64 << 10, 8 << 10) {
        ws.feed(m).await.expect("feed fragment");
    }
    ws.flush().await.expect("flush");
    assert_eq!(
        next_text(&mut ws).await.len(),
        64 << 10,
        "fragmented 64 KiB echoed"
    );
    close(&mut ws).await;
    assert_eq!(p.next_disconnect().await, close_code::NORMAL);

    // The same 64 KiB as one frame: past max_frame_size.
    let (code, reason) =
        send_expecting_close(addr, vec![Message::text("z".repeat(64 << 10))]).await;
    assert_eq!((code, reason.as_str()), (1009, "frame too large"));
    assert_eq!(p.next_disconnect().await, close_code::SIZE);

    // A message past max_message_size made of small frames.
    let (code, _) = send_expecting_close(addr, text_fragments(512 << 10, 8 << 10)).await;
    assert_eq!(code, 1009, "512 KiB message in 8 KiB frames");
    assert_eq!(p.next_disconnect().await, close_code::SIZE);
}

// ---------------------------------------------------------------------------
// 2. Rate limit
// ---------------------------------------------------------------------------

#[tokio::test]
async fn rate_limit_closes_a_flooding_client_with_1008_and_spares_a_polite_one() {
    let _shared = LOAD.read().await;
    let mut p = probes();
    let channels = p.layer(WebSocketConfig::default().rate_limit(Some(RateLimit::new(10.0, 5))));
    let addr = serve(&channels).await;
    let mut polite = connect(addr, "/ws/probe").await;
    let mut flood = connect(addr, "/ws/probe").await;

    let started = Instant::now();
    for i in 0..100 {
        flood
            .feed(Message::text(format!("flood {i}")))
            .await
            .expect("feed");
    }
    flood.flush().await.expect("flush");
    let mut echoed = 0u32;
    let (code, reason) = within("the flooder's close", async {
        loop {
            match flood.next().await {
                Some(Ok(Message::Text(_))) => echoed += 1,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(Some(f)))) => {
                    break (u16::from(f.code), f.reason.as_str().to_owned())
                }
                other => panic!("expected echoes then a close frame, got {other:?}"),
            }
        }
    })
    .await;
    let elapsed = started.elapsed();
    assert_eq!(
        (code, reason.as_str()),
        (1008, "rate limit exceeded"),
        "100 messages at once"
    );
    // At most the burst plus what refilled meanwhile (queued echoes are
    // dropped when the close starts, so fewer may arrive).
    let budget = 5 + (elapsed.as_secs_f64() * 10.0).ceil() as u32;
    assert!(
        echoed <= budget,
        "{echoed} echoes, budget {budget} after {elapsed:?}"
    );
    drain(&mut flood).await;
    assert_eq!(p.next_disconnect().await, close_code::POLICY);
    eprintln!("flood: {echoed} echoes before 1008 after {elapsed:?}");

    // 15 messages at ~6.7/s, more than the burst: never closed.
    let mut tick = tokio::time::interval(Duration::from_millis(150));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..15 {
        tick.tick().await;
        echo_text(&mut polite, &format!("polite {i}")).await;
    }
    close(&mut polite).await;
    assert_eq!(
        p.next_disconnect().await,
        close_code::NORMAL,
        "the polite client closed itself"
    );
    assert_eq!(
        channels.stats().messages_in,
        15 + 100.min(channels.stats().messages_in - 15)
    );
}

// ---------------------------------------------------------------------------
// 3. Connection limit
// ---------------------------------------------------------------------------

#[tokio::test]
async fn connection_limit_answers_503_with_retry_after_until_a_slot_frees() {
    let _shared = LOAD.read().await;
    let mut p = probes();
    let channels = p.layer(WebSocketConfig::default().max_connections(Some(2)));
    let handle = channels.shutdown_handle();
    let addr = serve(&channels).await;
    let mut a = connect(addr, "/ws/probe").await;
    let mut b = connect(addr, "/ws/probe").await;

    let reply = handshake_reply(addr, "/ws/probe", &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let retry_after = reply
        .headers
        .get("retry-after")
        .expect("Retry-After on 503")
        .to_str()
        .expect("ASCII Retry-After");
    assert!(
        retry_after.parse::<u64>().is_ok_and(|s| s > 0),
        "Retry-After in seconds: {retry_after:?}"
    );
    assert_eq!(
        reply.body, "too many WebSocket connections; retry later",
        "plain-text body"
    );
    assert_eq!(
        reply.headers["content-type"], "text/plain; charset=utf-8",
        "content type"
    );
    let url = format!("ws://{addr}/ws/probe");
    assert_eq!(
        refused_status(url.as_str()).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(channels.stats().rejected_handshakes, 2);
    echo_text(&mut a, "a still works").await;
    echo_text(&mut b, "b still works").await;

    close(&mut a).await;
    assert_eq!(p.next_disconnect().await, close_code::NORMAL);
    // The slot is released when the connection task ends, just after
    // `disconnect` returned.
    wait_until("the closed connection's slot", || handle.connections() < 2).await;
    let mut c = connect(addr, "/ws/probe").await;
    echo_text(&mut c, "c got the freed slot").await;
    echo_text(&mut b, "b unaffected").await;
}

// ---------------------------------------------------------------------------
// 4. Missing pongs
// ---------------------------------------------------------------------------

const PING: Duration = Duration::from_millis(100);
const IDLE: Duration = Duration::from_millis(300);

fn ping_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .ping_interval(Some(PING))
        .idle_timeout(Some(IDLE))
}

/// Server frames in `buf` (unmasked, short payloads): (opcode, payload).
fn parse_frames(mut buf: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while buf.len() >= 2 {
        let opcode = buf[0] & 0x0f;
        assert_eq!(buf[1] & 0x80, 0, "server frames are not masked");
        let len = usize::from(buf[1] & 0x7f);
        assert!(len < 126, "only control frames expected");
        frames.push((opcode, buf[2..2 + len].to_vec()));
        buf = &buf[2 + len..];
    }
    assert!(buf.is_empty(), "trailing partial frame");
    frames
}

#[tokio::test]
async fn client_that_never_answers_pings_is_closed_and_disconnect_runs() {
    let _shared = LOAD.read().await;
    let mut p = probes();
    let addr = serve(&p.layer(ping_config())).await;
    // Taken before the handshake: the server's idle clock starts before the
    // client reads the 101, so this is never later than the server's start.
    let open = Instant::now();
    let stream = TcpStream::connect(addr).await.expect("connect");
    let mut stream = raw_handshake(stream, addr, "/ws/probe", "").await.0;

    // Never read, never answer: the idle timeout closes it.
    let code = within("disconnect of the silent client", p.gone.recv()).await;
    let after = open.elapsed();
    eprintln!("silent client: disconnect({code:?}) after {after:?}");
    assert_eq!(
        code,
        Some(close_code::ABNORMAL),
        "documented: the peer is gone, disconnect sees 1006"
    );
    assert!(after >= IDLE, "not before the idle timeout: {after:?}");
    assert!(after < Duration::from_secs(3), "promptly: {after:?}");

    // What the server sent meanwhile: pings, then close 1001, then EOF.
    let mut buf = Vec::new();
    within("EOF from the server", stream.read_to_end(&mut buf))
        .await
        .expect("the server closes the TCP connection cleanly");
    let frames = parse_frames(&buf);
    let pings = frames.iter().filter(|(op, _)| *op == 0x9).count();
    let (op, close) = frames.last().expect("at least a close frame");
    assert_eq!(*op, 0x8, "last frame is a close: {frames:?}");
    assert_eq!(
        (u16::from_be_bytes([close[0], close[1]]), &close[2..]),
        (1001, &b"idle timeout"[..])
    );
    assert!(
        pings >= 1,
        "pinged before giving up: {pings} pings in {frames:?}"
    );
    assert_eq!(
        pings + 1,
        frames.len(),
        "only pings and the close: {frames:?}"
    );
}

#[tokio::test]
async fn pongs_keep_a_client_alive_while_its_consumer_is_busy() {
    let _shared = LOAD.read().await;
    let mut p = probes();
    let addr = serve(&p.layer(ping_config())).await;
    let mut ws = connect(addr, "/ws/probe").await;
    ws.send(Message::text("block")).await.expect("send");
    within("the handler to start", p.entered.recv()).await;

    // Keep reading (tungstenite answers each ping on the next read) for five
    // idle timeouts while the handler waits.
    let window = 5 * IDLE;
    let deadline = tokio::time::Instant::now() + window;
    let mut pings = 0;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(other) => {
                panic!("the connection must stay open while the handler is busy: {other:?}")
            }
        }
    }
    eprintln!("busy consumer: {pings} pings answered in {window:?}");
    assert!(pings >= 5, "{pings} pings in {window:?} at {PING:?}");
    assert!(p.gone.try_recv().is_err(), "no disconnect yet");

    p.probe.release.notify_one();
    assert_eq!(next_text(&mut ws).await, "released");
    echo_text(&mut ws, "still open").await;
    close(&mut ws).await;
    assert_eq!(p.next_disconnect().await, close_code::NORMAL);
}

// ---------------------------------------------------------------------------
// 5. Slow client
// ---------------------------------------------------------------------------

const SUBSCRIBERS: usize = 500;
const MESSAGES: usize = 2000;
const MESSAGE_SIZE: usize = 1024;
/// Messages the publisher may be ahead of the slowest fast subscriber: far
/// below the outbound limit (256 messages) and the channel capacity (1024).
const WINDOW: usize = 128;
const MAX_OUTBOUND: usize = 256 << 10;
/// The whole fan-out takes about 5 s in a debug build on 2 cores.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// SO_SNDBUF of the server's sockets (the kernel doubles it).
const SERVER_SNDBUF: u32 = 32 << 10;

/// A chat room member; reports (whether it is the slow one, disconnect code).
struct Member {
    slow: bool,
    gone: mpsc::UnboundedSender<(bool, CloseCode)>,
}

impl WebSocketConsumer for Member {
    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        ctx.group_add("room").await?;
        Ok(Accept::new())
    }

    async fn disconnect(&mut self, _ctx: &mut Context, code: CloseCode) {
        let _ = self.gone.send((self.slow, code));
    }
}

/// Publishes every text message to the room as a fastlane event.
struct Publisher;

impl WebSocketConsumer for Publisher {
    async fn receive(&mut self, ctx: &mut Context, msg: message::Message) -> Result<(), BoxError> {
        if let message::Message::Text(text) = msg {
            ctx.group_send("room", Event::text("chat.message", text))
                .await?;
        }
        Ok(())
    }
}

/// Subscribers' progress, for the publisher's flow control.
struct Progress {
    received: Vec<AtomicUsize>,
    advanced: Notify,
}

impl Progress {
    fn min(&self) -> usize {
        self.received
            .iter()
            .map(|r| r.load(Ordering::Acquire))
            .min()
            .unwrap_or(MESSAGES)
    }
}

fn payload(seq: usize) -> String {
    let mut s = format!("{seq:06}:");
    s.extend(std::iter::repeat_n('.', MESSAGE_SIZE - s.len()));
    s
}

fn vm_rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

fn small_client_config() -> ClientConfig {
    ClientConfig::default().read_buffer_size(4 << 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_is_closed_4008_while_500_others_get_every_message() {
    let _exclusive = LOAD.write().await;
    let t0 = Instant::now();
    let (gone_tx, mut gone) = mpsc::unbounded_channel();
    let config = WebSocketConfig::default()
        .max_outbound_bytes(MAX_OUTBOUND)
        // The stalled client is over its budget within the first few hundred
        // messages; closed half a second later.
        .slow_client_timeout(Duration::from_millis(500))
        // The server waits this long for the slow client's close reply; the
        // test reads it only after the fast subscribers are done.
        .close_timeout(Duration::from_secs(60));
    let channels = WebSocketLayer::new()
        .with_config(config)
        .route(
            "/ws/room",
            websocket_consumer(move |scope| Member {
                slow: scope.query() == Some("slow"),
                gone: gone_tx.clone(),
            }),
        )
        .route("/ws/pub", websocket_consumer(|_| Publisher));
    // Linux grows loopback send buffers up to tcp_wmem's maximum (4 MiB
    // here), which would swallow the slow client's whole 2 MB stream: cap the
    // server sockets' SO_SNDBUF (accepted sockets inherit the listener's).
    let listener = TcpSocket::new_v4().expect("socket");
    listener
        .set_send_buffer_size(SERVER_SNDBUF)
        .expect("SO_SNDBUF");
    listener
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    let listener = listener.listen(1024).expect("listen");
    let addr = listener.local_addr().expect("address");
    let app = Router::new().layer(channels.clone());
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .expect("axum::serve failed");
    });
    let rss_before = vm_rss_kib("VmRSS:");

    // The slow client: a tiny receive buffer, and it never reads.
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = socket.connect(addr).await.expect("connect");
    let (mut slow, _) = within(
        "the slow client's handshake",
        tokio_tungstenite::client_async_with_config(
            format!("ws://{addr}/ws/room?slow"),
            stream,
            Some(small_client_config()),
        ),
    )
    .await
    .expect("slow client handshake");

    // The subscribers, one task each.
    let progress = Arc::new(Progress {
        received: (0..SUBSCRIBERS).map(|_| AtomicUsize::new(0)).collect(),
        advanced: Notify::new(),
    });
    let url = format!("ws://{addr}/ws/room");
    let mut subscribers = Vec::with_capacity(SUBSCRIBERS);
    for chunk in (0..SUBSCRIBERS).collect::<Vec<_>>().chunks(50) {
        let connected = futures_util::future::join_all(chunk.iter().map(|_| {
            tokio_tungstenite::connect_async_with_config(
                url.as_str(),
                Some(small_client_config()),
                false,
            )
        }));
        for r in within("50 subscribers to connect", connected).await {
            subscribers.push(r.expect("subscriber handshake").0);
        }
    }
    let t_connected = t0.elapsed();
    let rss_connected = vm_rss_kib("VmRSS:");
    let readers: Vec<_> = subscribers
        .into_iter()
        .enumerate()
        .map(|(i, mut ws)| {
            let progress = progress.clone();
            tokio::spawn(async move {
                let mut n = 0;
                while n < MESSAGES {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) => {
                            assert_eq!(t.len(), MESSAGE_SIZE, "subscriber {i}: message size");
                            assert_eq!(
                                t[..6].parse::<usize>().ok(),
                                Some(n),
                                "subscriber {i}: messages in order, none missing"
                            );
                            n += 1;
                            progress.received[i].store(n, Ordering::Release);
                            if n % 16 == 0 || n == MESSAGES {
                                progress.advanced.notify_waiters();
                            }
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        other => panic!("subscriber {i} after {n} messages: {other:?}"),
                    }
                }
                (n, ws)
            })
        })
        .collect();

    // The publisher, a chat client whose messages its consumer group-sends.
    let mut publisher = connect(addr, "/ws/pub").await;
    for seq in 0..MESSAGES {
        if seq >= progress.min() + WINDOW {
            publisher.flush().await.expect("flush");
            loop {
                let advanced = progress.advanced.notified();
                tokio::pin!(advanced);
                advanced.as_mut().enable();
                if seq < progress.min() + WINDOW {
                    break;
                }
                within("the subscribers to catch up", advanced).await;
            }
        }
        publisher
            .feed(Message::text(payload(seq)))
            .await
            .expect("publish");
    }
    publisher.flush().await.expect("flush");

    let mut clients = Vec::with_capacity(SUBSCRIBERS);
    let mut total = 0;
    let delivered = tokio::time::timeout(DELIVERY_TIMEOUT, futures_util::future::join_all(readers))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "not delivered within {DELIVERY_TIMEOUT:?}: slowest subscriber at {}; {:?}",
                progress.min(),
                channels.stats()
            )
        });
    for r in delivered {
        let (n, ws) = r.expect("subscriber task");
        total += n;
        clients.push(ws);
    }
    let t_delivered = t0.elapsed();
    let rss_after = vm_rss_kib("VmRSS:");
    let hwm = vm_rss_kib("VmHWM:");
    let stats = channels.stats();
    assert_eq!(
        total,
        SUBSCRIBERS * MESSAGES,
        "every subscriber got every message"
    );

    // The stalled client was closed while the others were served (by time:
    // it stayed above its budget); once it reads it gets the close frame.
    wait_until("the stalled client to be closed", || {
        channels.stats().dropped_slow >= 1
    })
    .await;
    // Now read the slow client: what got through, then the close frame.
    let mut slow_received = 0usize;
    let mut close = None;
    eprintln!("slow client: stats once delivered {stats:?} at {t_delivered:?}");
    let end = tokio::time::timeout(TIMEOUT, async {
        loop {
            match slow.next().await {
                Some(Ok(Message::Text(t))) => {
                    assert_eq!(
                        t[..6].parse::<usize>().ok(),
                        Some(slow_received),
                        "the slow client's messages are in order too"
                    );
                    slow_received += 1;
                }
                Some(Ok(Message::Close(f))) => close = f,
                Some(Ok(_)) => {}
                Some(Err(e)) => break Some(e),
                None => break None,
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "timed out reading the slow client after {slow_received} messages (close: {close:?}); {:?}",
            channels.stats()
        )
    });
    let slow_gone = match within("the slow member's disconnect", gone.recv()).await {
        Some((true, code)) => code,
        Some((false, code)) => panic!("a fast subscriber disconnected first, with {code}"),
        None => unreachable!("the layer holds a sender"),
    };
    let t_end = t0.elapsed();

    eprintln!(
        "slow client: {SUBSCRIBERS} subscribers x {MESSAGES} messages of {MESSAGE_SIZE} B; \
         connected in {t_connected:?}, delivered by {t_delivered:?}, total {t_end:?}"
    );
    eprintln!(
        "slow client: fast subscribers received {total} messages; the slow one {slow_received} \
         then close {close:?} (stream end: {end:?}); its disconnect got {slow_gone}"
    );
    eprintln!(
        "slow client: RSS before {} KiB, with {} connections {} KiB, after delivery {} KiB \
         (growth {} KiB), peak {} KiB",
        rss_before,
        SUBSCRIBERS + 1,
        rss_connected,
        rss_after,
        rss_after.saturating_sub(rss_before),
        hwm
    );
    eprintln!("slow client: stats {stats:?}");

    let close = close.expect("the slow client got a close frame");
    assert_eq!(
        (u16::from(close.code), slow_gone),
        (4008, close_code::SLOW_CONSUMER),
        "the slow client is closed as a slow consumer: {close:?}"
    );
    assert!(
        slow_received < MESSAGES,
        "the slow client missed messages: it got {slow_received}"
    );
    assert!(stats.dropped_slow >= 1, "{stats:?}");
    assert!(
        rss_after.saturating_sub(rss_before) < 64 << 10,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert!(gone.try_recv().is_err(), "no fast subscriber disconnected");
    drop(clients);
}

// ---------------------------------------------------------------------------
// 6. Graceful shutdown
// ---------------------------------------------------------------------------

#[tokio::test]
async fn graceful_shutdown_closes_every_connection_with_1001() {
    let _shared = LOAD.read().await;
    let mut p = probes();
    let channels = p.layer(WebSocketConfig::default());
    let handle = channels.shutdown_handle();
    let addr = serve(&channels).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut ws = connect(addr, "/ws/probe").await;
        echo_text(&mut ws, &format!("client {i}")).await;
        clients.push(ws);
    }
    assert_eq!(handle.connections(), 20);

    let started = Instant::now();
    let shutdown = tokio::spawn({
        let handle = handle.clone();
        async move { handle.shutdown(Duration::from_secs(5)).await }
    });
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let close = next_close(&mut ws).await;
                drain(&mut ws).await;
                close
            })
        })
        .collect();

    wait_until("shutdown to start", || handle.is_shutting_down()).await;
    let reply = handshake_reply(addr, "/ws/probe", &[]).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "server is shutting down"),
        "a handshake during shutdown"
    );
    assert!(reply.headers.contains_key("retry-after"));

    for r in readers {
        assert_eq!(
            r.await.expect("reader task"),
            (1001, "server shutting down".to_owned())
        );
    }
    let report = within("shutdown", shutdown).await.expect("shutdown task");
    eprintln!("shutdown of 20: {report:?} in {:?}", started.elapsed());
    assert_eq!((report.closed, report.aborted), (20, 0), "{report:?}");
    let mut codes = Vec::new();
    while let Ok(code) = p.gone.try_recv() {
        codes.push(code);
    }
    assert_eq!(
        codes,
        vec![close_code::AWAY; 20],
        "every disconnect ran before shutdown returned"
    );
    assert_eq!(handle.connections(), 0);
    assert_eq!(channels.stats().open_connections, 0);

    let reply = handshake_reply(addr, "/ws/probe", &[]).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "after shutdown"
    );
    let url = format!("ws://{addr}/ws/probe");
    assert_eq!(
        refused_status(url.as_str()).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn shutdown_deadline_aborts_a_consumer_stuck_in_a_handler() {
    let _shared = LOAD.read().await;
    let mut p = probes();
    let channels = p.layer(WebSocketConfig::default());
    let handle = channels.shutdown_handle();
    let addr = serve(&channels).await;
    let mut stuck = connect(addr, "/ws/probe").await;
    let mut fine = connect(addr, "/ws/probe").await;
    stuck.send(Message::text("hang")).await.expect("send");
    within("the handler to hang", p.entered.recv()).await;

    let fine_reader = tokio::spawn(async move {
        let close = next_close(&mut fine).await;
        drain(&mut fine).await;
        close
    });
    let stuck_reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        within("the stuck connection to end", async {
            while let Some(Ok(m)) = stuck.next().await {
                seen.push(m);
            }
        })
        .await;
        (seen, Instant::now())
    });

    let deadline = Duration::from_millis(500);
    let started = Instant::now();
    let report = within("shutdown", handle.shutdown(deadline)).await;
    let took = started.elapsed();
    eprintln!("shutdown with a stuck handler: {report:?} in {took:?}");
    assert_eq!((report.closed, report.aborted), (1, 1), "{report:?}");
    assert!(took >= deadline, "waited for the deadline: {took:?}");

    assert_eq!(
        fine_reader.await.expect("reader"),
        (1001, "server shutting down".to_owned())
    );
    assert_eq!(
        p.next_disconnect().await,
        close_code::AWAY,
        "the well-behaved consumer's disconnect"
    );
    let (seen, ended) = stuck_reader.await.expect("reader");
    eprintln!(
        "stuck connection saw {seen:?}, ended {:?} after shutdown started",
        ended - started
    );
    assert!(
        p.gone.try_recv().is_err(),
        "the aborted consumer's disconnect did not run"
    );
    assert_eq!(handle.connections(), 0);
}

// ---------------------------------------------------------------------------
// 7. Origin
// ---------------------------------------------------------------------------

#[tokio::test]
async fn same_host_origin_policy_refuses_other_origins_before_consumer_code() {
    let _shared = LOAD.read().await;
    let p = probes();
    let made = Arc::new(AtomicBool::new(false));
    let probe = p.probe.clone();
    let flag = made.clone();
    let channels = WebSocketLayer::new()
        .allowed_origins(AllowedOrigins::same_host())
        .route(
            "/ws/probe",
            websocket_consumer(move |_| {
                flag.store(true, Ordering::SeqCst);
                probe.clone()
            }),
        );
    let addr = serve(&channels).await;

    for origin in [
        "http://evil.example".to_owned(),
        // Same host, another port: another origin.
        format!("http://127.0.0.1:{}", addr.port().wrapping_add(1).max(1)),
        "null".to_owned(),
    ] {
        let reply = handshake_reply(addr, "/ws/probe", &[("origin", &origin)]).await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (StatusCode::FORBIDDEN, "origin not allowed"),
            "Origin: {origin}"
        );
    }
    let mut req = format!("ws://{addr}/ws/probe")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "origin",
        "http://evil.example".parse().expect("header value"),
    );
    assert_eq!(refused_status(req).await, StatusCode::FORBIDDEN);
    assert!(
        !made.load(Ordering::SeqCst),
        "no consumer was made for a refused origin"
    );
    assert_eq!(channels.stats().rejected_handshakes, 4);
    assert_eq!(channels.stats().accepted_connections, 0);

    // The page's own origin (same host and port as Host): accepted.
    let mut req = format!("ws://{addr}/ws/probe")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "origin",
        format!("http://{addr}").parse().expect("header value"),
    );
    let (mut ws, res) = within(
        "a same-origin handshake",
        tokio_tungstenite::connect_async(req),
    )
    .await
    .expect("same-origin handshake");
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert!(made.load(Ordering::SeqCst), "the consumer was made");
    echo_text(&mut ws, "same origin").await;

    // No Origin (not a browser): accepted.
    let mut ws = connect(addr, "/ws/probe").await;
    echo_text(&mut ws, "no origin").await;
    assert_eq!(channels.stats().accepted_connections, 2);
}

// ---------------------------------------------------------------------------
// 7. The raw form runs on the same engine
// ---------------------------------------------------------------------------

/// A raw `from_fn` consumer: echoes until the connection ends, reports how
/// its `recv` loop ended (the close code it saw, 1006 for a plain end).
fn raw_echo(ended: mpsc::UnboundedSender<CloseCode>) -> WebSocketLayer {
    WebSocketLayer::new().route(
        "/ws/raw",
        from_fn(move |conn: Connection| {
            let ended = ended.clone();
            async move {
                let mut ws = conn.accept(Accept::new()).await?;
                let mut code = close_code::ABNORMAL;
                while let Some(Ok(msg)) = ws.recv().await {
                    if let message::Message::Close(frame) = &msg {
                        code = frame.as_ref().map_or(close_code::STATUS, |f| f.code);
                        break;
                    }
                    if ws.send(msg).await.is_err() {
                        break;
                    }
                }
                let _ = ended.send(code);
                Ok(())
            }
        }),
    )
}

/// A listener whose accepted sockets have small kernel buffers, so a client
/// that does not read is felt by the server at once.
async fn serve_small_buffers(channels: &WebSocketLayer) -> SocketAddr {
    let listener = TcpSocket::new_v4().expect("socket");
    listener
        .set_send_buffer_size(SERVER_SNDBUF)
        .expect("SO_SNDBUF");
    listener
        .set_recv_buffer_size(SERVER_SNDBUF)
        .expect("SO_RCVBUF");
    listener
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    let listener = listener.listen(1024).expect("listen");
    let addr = listener.local_addr().expect("address");
    let app = Router::new().layer(channels.clone());
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .expect("axum::serve failed");
    });
    addr
}

/// A client socket with a 4 KiB receive buffer.
async fn small_client(addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.set_send_buffer_size(4096).expect("SO_SNDBUF");
    socket.connect(addr).await.expect("connect")
}

#[tokio::test]
async fn raw_form_gets_pings_and_the_idle_timeout_and_counts_in_stats() {
    let _shared = LOAD.read().await;
    let (ended_tx, mut ended) = mpsc::unbounded_channel();
    let channels = raw_echo(ended_tx).with_config(ping_config());
    let addr = serve(&channels).await;
    let stream = TcpStream::connect(addr).await.expect("connect");
    let mut stream = raw_handshake(stream, addr, "/ws/raw", "").await.0;
    wait_until("the raw connection to count as open", || {
        channels.stats().open_connections == 1
    })
    .await;
    assert_eq!(channels.stats().accepted_connections, 1);

    // Never answer: pings, then the idle timeout closes it.
    let code = within("the raw consumer's recv loop to end", ended.recv()).await;
    assert_eq!(
        code,
        Some(close_code::ABNORMAL),
        "recv ends without a close"
    );
    let mut buf = Vec::new();
    within("EOF from the server", stream.read_to_end(&mut buf))
        .await
        .expect("clean EOF");
    let frames = parse_frames(&buf);
    let pings = frames.iter().filter(|(op, _)| *op == 0x9).count();
    let (op, close) = frames.last().expect("a close frame");
    assert_eq!(*op, 0x8, "{frames:?}");
    assert_eq!(
        (u16::from_be_bytes([close[0], close[1]]), &close[2..]),
        (1001, &b"idle timeout"[..])
    );
    assert!(pings >= 1, "the raw form is pinged: {frames:?}");
    wait_until("the raw connection to count as closed", || {
        channels.stats().open_connections == 0
    })
    .await;
}

#[tokio::test]
async fn raw_form_gets_1001_on_shutdown_and_finishes_the_close() {
    let _shared = LOAD.read().await;
    let (ended_tx, mut ended) = mpsc::unbounded_channel();
    let channels = raw_echo(ended_tx);
    let handle = channels.shutdown_handle();
    let addr = serve(&channels).await;
    let mut ws = connect(addr, "/ws/raw").await;
    echo_text(&mut ws, "before shutdown").await;

    let shutdown = tokio::spawn({
        let handle = handle.clone();
        async move { handle.shutdown(Duration::from_secs(10)).await }
    });
    assert_eq!(
        next_close(&mut ws).await,
        (1001, "server shutting down".to_owned())
    );
    drain(&mut ws).await;
    let report = within("shutdown", shutdown).await.expect("shutdown task");
    assert_eq!((report.closed, report.aborted), (1, 0), "{report:?}");
    assert_eq!(
        within("the raw consumer", ended.recv()).await,
        Some(close_code::ABNORMAL),
        "the raw consumer's recv saw the end"
    );
    assert_eq!(channels.stats().open_connections, 0);
}

#[tokio::test]
async fn raw_form_outbound_budget_closes_a_stalled_client_with_4008() {
    let _shared = LOAD.read().await;
    let (result_tx, mut result) = mpsc::unbounded_channel();
    let config = WebSocketConfig::default()
        .max_outbound_bytes(64 << 10)
        .slow_client_timeout(Duration::from_millis(200));
    let channels = WebSocketLayer::new().with_config(config).route(
        "/ws/firehose",
        from_fn(move |conn: Connection| {
            let result_tx = result_tx.clone();
            async move {
                let mut ws = conn.accept(Accept::new()).await?;
                let chunk = bytes::Bytes::from(vec![b'x'; 16 << 10]);
                let mut sent = 0usize;
                // `feed` waits while the queue is over budget; the engine
                // closes the stalled client, and the wait ends with an error.
                let err = loop {
                    if let Err(e) = ws.feed(message::Message::Binary(chunk.clone())).await {
                        break e;
                    }
                    sent += 1;
                };
                let _ = result_tx.send((sent, err.is_closed()));
                Ok(())
            }
        }),
    );
    let addr = serve_small_buffers(&channels).await;
    let stream = small_client(addr).await;
    let (mut ws, _) = within(
        "the handshake",
        tokio_tungstenite::client_async_with_config(
            format!("ws://{addr}/ws/firehose"),
            stream,
            Some(small_client_config()),
        ),
    )
    .await
    .expect("handshake");
    // Never read until the server gave up on us.
    let (sent, closed) = within("the firehose to be stopped", result.recv())
        .await
        .expect("result");
    assert!(closed, "feed fails as closed");
    assert!(sent < 100, "backpressure held the producer: {sent} chunks");
    assert_eq!(channels.stats().dropped_slow, 1);
    // What was in flight, then the close frame: the client learns why.
    let close = within("the close frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => break f,
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("a close frame with a code");
    assert_eq!(u16::from(close.code), close_code::SLOW_CONSUMER);
}

// ---------------------------------------------------------------------------
// 8. Memory bounded under every input (issue 10)
// ---------------------------------------------------------------------------

/// A masked client frame, formatted by tungstenite.
fn client_frame(mut frame: Frame) -> Vec<u8> {
    frame.header_mut().mask = Some([0x37, 0xfa, 0x21, 0x3d]);
    let mut out = Vec::new();
    frame.format(&mut out).expect("format");
    out
}

/// Echoes binary messages; counts in `parked` the connections that finished
/// their echo and are idle.
fn blob_echo(parked: Arc<AtomicUsize>) -> WebSocketLayer {
    struct Blob(Arc<AtomicUsize>);
    impl WebSocketConsumer for Blob {
        async fn receive(
            &mut self,
            ctx: &mut Context,
            msg: message::Message,
        ) -> Result<(), BoxError> {
            ctx.send(msg)?;
            self.0.fetch_add(1, Ordering::AcqRel);
            Ok(())
        }
    }
    WebSocketLayer::new()
        .with_config(WebSocketConfig::default().max_message_size(2 << 20))
        .route(
            "/ws/blob",
            websocket_consumer(move |_| Blob(parked.clone())),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffers_return_to_idle_size_after_a_large_message() {
    let _exclusive = LOAD.write().await;
    const CONNECTIONS: usize = 100;
    const SIZE: usize = 1 << 20;
    let parked = Arc::new(AtomicUsize::new(0));
    let channels = blob_echo(parked.clone());
    let addr = serve(&channels).await;
    let mut streams = Vec::new();
    for _ in 0..CONNECTIONS {
        let stream = TcpStream::connect(addr).await.expect("connect");
        streams.push(raw_handshake(stream, addr, "/ws/blob", "").await.0);
    }
    let rss_idle = vm_rss_kib("VmRSS:");
    // One connection at a time: each reads a 1 MiB message and writes it
    // back; the client discards the echo as it reads it (no client buffer).
    let frame = client_frame(Frame::message(
        vec![b'm'; SIZE],
        OpCode::Data(Data::Binary),
        true,
    ));
    let mut sink = vec![0u8; 64 << 10];
    for (i, s) in streams.iter_mut().enumerate() {
        s.write_all(&frame).await.expect("send 1 MiB");
        let mut left = SIZE + 10; // 127-length header: 2 + 8 bytes
        within("the 1 MiB echo", async {
            while left > 0 {
                let n = s
                    .read(&mut sink[..left.min(64 << 10)])
                    .await
                    .expect("read the echo");
                assert!(n > 0, "connection {i} ended");
                left -= n;
            }
        })
        .await;
    }
    wait_until("every echo to be counted", || {
        parked.load(Ordering::Acquire) == CONNECTIONS
    })
    .await;
    let rss_after = vm_rss_kib("VmRSS:");
    let growth = rss_after.saturating_sub(rss_idle);
    eprintln!(
        "large message: {CONNECTIONS} connections each echoed 1 MiB: RSS idle {rss_idle} KiB, \
         after {rss_after} KiB (growth {growth} KiB, {} KiB per connection)",
        growth / CONNECTIONS as u64
    );
    // tungstenite kept its read and write buffers at their peak (~2 MiB per
    // connection, 200 MiB here); the engine's go back to their idle size.
    assert!(
        growth < 32 << 10,
        "RSS grew {growth} KiB after {CONNECTIONS} x 1 MiB echoes"
    );
    drop(streams);
}

#[tokio::test]
async fn read_ahead_is_bounded_in_bytes_while_a_handler_is_busy() {
    let _shared = LOAD.read().await;
    const MESSAGES: usize = 40;
    const SIZE: usize = 256 << 10;
    let mut p = probes();
    let channels = p.layer(WebSocketConfig::default());
    let addr = serve_small_buffers(&channels).await;
    let stream = small_client(addr).await;
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        format!("ws://{addr}/ws/probe"),
        stream,
        Some(small_client_config()),
    )
    .await
    .expect("handshake");
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::text("block")).await.expect("send");
    within("the handler to start", p.entered.recv()).await;

    let sender = tokio::spawn(async move {
        for i in 0..MESSAGES {
            let body = format!("{i:04}").repeat(SIZE / 4);
            tx.feed(Message::text(body)).await.expect("feed");
        }
        tx.flush().await.expect("flush");
        tx
    });
    // While the handler waits, the server reads one message ahead (64 KiB
    // of read-ahead is less than one message) and then leaves the socket
    // alone: the client cannot get its 10 MiB out.
    let mut sender = sender;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut sender)
            .await
            .is_err(),
        "the client was held back by TCP"
    );
    let read = channels.stats().messages_in;
    eprintln!("read-ahead: {read} messages of {SIZE} B read while the handler was busy");
    assert!(
        read <= 3,
        "read ahead of a busy handler: {read} messages of 256 KiB"
    );

    p.probe.release.notify_one();
    assert_eq!(next_text(&mut rx).await, "released");
    for i in 0..MESSAGES {
        let echo = next_text(&mut rx).await;
        assert_eq!(echo.len(), SIZE);
        assert_eq!(&echo[..4], format!("{i:04}"), "in order, none lost");
    }
    let _tx = within("the client to finish sending", sender)
        .await
        .expect("sender");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_from_a_client_that_never_reads_is_timed_out_holding_one_pong() {
    let _exclusive = LOAD.write().await;
    const CLIENTS: usize = 20;
    let mut p = probes();
    let channels = p.layer(ping_config());
    let addr = serve_small_buffers(&channels).await;
    let rss_before = vm_rss_kib("VmRSS:");
    let ping = client_frame(Frame::ping(vec![b'p'; 125]));
    let batch: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 64).collect();
    let batch = Arc::new(batch);
    let mut floods = Vec::new();
    for _ in 0..CLIENTS {
        let stream = small_client(addr).await;
        let mut stream = raw_handshake(stream, addr, "/ws/probe", "").await.0;
        let batch = batch.clone();
        floods.push(tokio::spawn(async move {
            // Pings until the server hangs up; never a read.
            let mut sent = 0usize;
            while stream.write_all(&batch).await.is_ok() {
                sent += 64;
            }
            sent
        }));
    }
    let started = Instant::now();
    for _ in 0..CLIENTS {
        // Pings are not liveness: the idle timeout still closes them.
        assert_eq!(p.next_disconnect().await, close_code::ABNORMAL);
    }
    let elapsed = started.elapsed();
    let rss_after = vm_rss_kib("VmRSS:");
    let mut pings = 0;
    for f in floods {
        pings += within("the flood to stop", f).await.expect("flood task");
    }
    eprintln!(
        "ping flood: {CLIENTS} clients sent {pings} pings of 125 B without reading; all \
         timed out after {elapsed:?}; RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(pings > CLIENTS * 64, "the clients flooded: {pings} pings");
    assert!(
        rss_after.saturating_sub(rss_before) < 16 << 10,
        "the server held at most one pong per connection: RSS {rss_before} -> {rss_after} KiB"
    );
}

#[tokio::test]
async fn a_closing_connection_leaves_its_groups_at_once_and_its_4008_reaches_the_client() {
    let _shared = LOAD.read().await;
    let (gone_tx, mut gone) = mpsc::unbounded_channel();
    let memory = InMemoryChannelLayer::new();
    let config = WebSocketConfig::default()
        .max_outbound_bytes(64 << 10)
        .slow_client_timeout(Duration::from_millis(200))
        // Far longer than the test: leaving must not wait for it.
        .close_timeout(Duration::from_secs(60));
    let channels = WebSocketLayer::new()
        .with_channel_layer(Arc::new(memory.clone()))
        .with_config(config)
        .route(
            "/ws/room",
            websocket_consumer(move |_| Member {
                slow: true,
                gone: gone_tx.clone(),
            }),
        )
        .route("/ws/pub", websocket_consumer(|_| Publisher));
    let addr = serve_small_buffers(&channels).await;
    let stream = small_client(addr).await;
    let (mut slow, _) = tokio_tungstenite::client_async_with_config(
        format!("ws://{addr}/ws/room"),
        stream,
        Some(small_client_config()),
    )
    .await
    .expect("handshake");
    wait_until("the member to join", || memory.group_len("room") == 1).await;
    let mut publisher = connect(addr, "/ws/pub").await;
    let chunk = "c".repeat(4000);
    // Publish until the stalled member is closed as slow.
    let mut published = 0;
    while channels.stats().dropped_slow == 0 {
        publisher
            .send(Message::text(chunk.clone()))
            .await
            .expect("publish");
        published += 1;
        assert!(published < 100_000, "never closed: {:?}", channels.stats());
    }
    // The close started: out of the group and no inbox at once, not after
    // the (60 s) close timeout.
    wait_until("the closing member to leave its group", || {
        memory.group_len("room") == 0 && memory.channel_count() == 1
    })
    .await;
    // It reads again: what was in flight, then the 4008 close frame.
    let mut received = 0;
    let close = within("the slow client's close frame", async {
        loop {
            match slow.next().await {
                Some(Ok(Message::Text(_))) => received += 1,
                Some(Ok(Message::Close(f))) => break f,
                Some(Ok(_)) => {}
                other => panic!("after {received} messages: {other:?}"),
            }
        }
    })
    .await;
    let close = close.expect("a close code");
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (4008, "slow consumer: outbound queue full")
    );
    drain(&mut slow).await;
    assert_eq!(
        within("disconnect", gone.recv()).await,
        Some((true, close_code::SLOW_CONSUMER))
    );
    eprintln!("closing member: {published} published, it had read {received} when closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_3000_messages_reaches_50_readers_and_closes_the_stalled_one() {
    let _exclusive = LOAD.write().await;
    const READERS: usize = 50;
    const BURST: usize = 3000;
    const SIZE: usize = 4000;
    let (gone_tx, mut gone) = mpsc::unbounded_channel();
    // Default budget (1 MiB soft, 4 MiB hard, 5 s): the burst is 12 MB per
    // member, 12 times the soft budget.
    let channels = WebSocketLayer::new()
        .route(
            "/ws/room",
            websocket_consumer(move |scope| Member {
                slow: scope.query() == Some("stalled"),
                gone: gone_tx.clone(),
            }),
        )
        .route("/ws/pub", websocket_consumer(|_| Publisher));
    let addr = serve_small_buffers(&channels).await;
    let rss_before = vm_rss_kib("VmRSS:");
    let stream = small_client(addr).await;
    let (mut stalled, _) = tokio_tungstenite::client_async_with_config(
        format!("ws://{addr}/ws/room?stalled"),
        stream,
        Some(small_client_config()),
    )
    .await
    .expect("stalled client handshake");
    let url = format!("ws://{addr}/ws/room");
    let mut readers = Vec::new();
    for i in 0..READERS {
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url.as_str(), None, false)
            .await
            .expect("reader handshake");
        readers.push(tokio::spawn(async move {
            let mut n = 0;
            while n < BURST {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        assert_eq!(t[..6].parse::<usize>().ok(), Some(n), "reader {i} in order");
                        n += 1;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    other => panic!("reader {i} after {n} messages: {other:?}"),
                }
            }
            (n, ws)
        }));
    }
    let started = Instant::now();
    let mut publisher = connect(addr, "/ws/pub").await;
    for seq in 0..BURST {
        let mut s = format!("{seq:06}:");
        s.extend(std::iter::repeat_n('.', SIZE - s.len()));
        publisher.feed(Message::text(s)).await.expect("publish");
    }
    publisher.flush().await.expect("flush");
    let mut clients = Vec::new();
    for r in readers {
        let (n, ws) = tokio::time::timeout(DELIVERY_TIMEOUT, r)
            .await
            .unwrap_or_else(|_| panic!("not delivered: {:?}", channels.stats()))
            .expect("reader task");
        assert_eq!(n, BURST);
        clients.push(ws);
    }
    let delivered = started.elapsed();
    wait_until("the stalled client to be closed", || {
        channels.stats().dropped_slow >= 1
    })
    .await;
    let hwm = vm_rss_kib("VmHWM:");
    let close = within("the stalled client's close frame", async {
        loop {
            match stalled.next().await {
                Some(Ok(Message::Close(f))) => break f,
                Some(Ok(_)) => {}
                other => panic!("expected a close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("a close code");
    assert_eq!(u16::from(close.code), close_code::SLOW_CONSUMER);
    drain(&mut stalled).await;
    assert_eq!(
        within("the stalled member's disconnect", gone.recv()).await,
        Some((true, close_code::SLOW_CONSUMER))
    );
    assert!(gone.try_recv().is_err(), "no reader was closed");
    let stats = channels.stats();
    eprintln!(
        "burst: {BURST} x {SIZE} B to {READERS} readers delivered in {delivered:?}; the stalled \
         one closed 4008; RSS before {rss_before} KiB, peak {hwm} KiB; {stats:?}"
    );
    assert_eq!(stats.dropped_slow, 1, "{stats:?}");
    drop(clients);
}

/// Issue 26 (5): a client that sends and never reads holds at most the
/// documented bound on the server: its echoes queue up to the 4 MiB hard cap
/// (4 x the 1 MiB soft budget) and it is closed 4008 at once. Ten such
/// clients each send 12 MiB; the server's peak RSS grows by less than
/// 10 x 7 MiB (with the former 16 x cap, each queued all 12 MiB).
#[tokio::test]
async fn never_reading_clients_hold_at_most_the_hard_cap() {
    let _exclusive = LOAD.write().await;
    const CLIENTS: usize = 10;
    const MESSAGE: usize = 512 << 10;
    const MESSAGES: usize = 24;
    let p = probes();
    let channels = p.layer(WebSocketConfig::default());
    let addr = serve_small_buffers(&channels).await;
    let frame = Arc::new(client_frame(Frame::message(
        vec![0x5a; MESSAGE],
        OpCode::Data(Data::Binary),
        true,
    )));
    let hwm_before = vm_rss_kib("VmHWM:");
    let mut writers = Vec::new();
    for _ in 0..CLIENTS {
        let (mut stream, _) = raw_handshake(small_client(addr).await, addr, "/ws/probe", "").await;
        let frame = frame.clone();
        writers.push(tokio::spawn(async move {
            for _ in 0..MESSAGES {
                // The server discards input once it closed us, until it
                // drops the connection.
                if stream.write_all(&frame).await.is_err() {
                    break;
                }
            }
            stream
        }));
    }
    wait_until("every never-reading client closed 4008", || {
        channels.stats().dropped_slow >= CLIENTS as u64
    })
    .await;
    let grown_kib = vm_rss_kib("VmHWM:").saturating_sub(hwm_before);
    eprintln!("{CLIENTS} never-reading clients: peak RSS grew {grown_kib} KiB");
    assert!(
        grown_kib < (CLIENTS * 7 * 1024) as u64,
        "peak RSS grew {grown_kib} KiB for {CLIENTS} clients"
    );
    for w in writers {
        drop(within("a writer", w).await);
    }
}

/// Data frames from `buf` (unmasked server frames with payloads under 126
/// bytes): their payloads as text. Panics on a partial frame.
fn text_frames(mut buf: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        assert!(buf.len() >= 2, "partial frame header");
        assert_eq!(buf[0] & 0x0f, 0x1, "a text frame");
        let len = usize::from(buf[1] & 0x7f);
        assert!(
            len < 126 && buf.len() >= 2 + len,
            "short frames only, whole"
        );
        out.push(String::from_utf8(buf[2..2 + len].to_vec()).expect("utf-8"));
        buf = &buf[2 + len..];
    }
    out
}

/// `write_delay`: messages queued within the delay leave in one write, not
/// before the delay; after a batch the next message is held and sent again
/// (the deadline moves with each batch), and a later batch too.
#[tokio::test]
async fn write_delay_batches_messages_and_strands_none() {
    const DELAY: Duration = Duration::from_millis(150);
    let _shared = LOAD.read().await;
    let p = probes();
    let addr = serve(&p.layer(WebSocketConfig::default().write_delay(Some(DELAY)))).await;
    let stream = TcpStream::connect(addr).await.expect("connect");
    let mut stream = raw_handshake(stream, addr, "/ws/probe", "").await.0;
    stream.set_nodelay(true).expect("nodelay");

    // Reads until `n` frames arrived; returns them and how many reads it took.
    async fn frames(stream: &mut TcpStream, n: usize) -> (Vec<String>, usize) {
        let mut buf = Vec::new();
        let mut reads = 0;
        within("the echoed frames", async {
            while text_frames_complete(&buf) < n {
                let mut chunk = [0u8; 4096];
                let got = stream.read(&mut chunk).await.expect("read");
                assert!(got > 0, "the server closed");
                buf.extend_from_slice(&chunk[..got]);
                reads += 1;
            }
        })
        .await;
        (text_frames(&buf), reads)
    }

    for (round, count) in [(1, 5), (2, 1), (3, 3)] {
        // `count` messages in one TCP write: the server reads them at once
        // and the echo consumer queues `count` replies.
        let mut wire = Vec::new();
        let sent: Vec<String> = (0..count).map(|i| format!("r{round}m{i}")).collect();
        for text in &sent {
            wire.extend(client_frame(Frame::message(
                text.clone().into_bytes(),
                OpCode::Data(Data::Text),
                true,
            )));
        }
        let start = Instant::now();
        stream.write_all(&wire).await.expect("write");
        let (got, reads) = frames(&mut stream, count).await;
        let took = start.elapsed();
        assert_eq!(got, sent, "round {round}: every message, in order");
        assert!(
            took >= DELAY,
            "round {round}: held for the write delay, arrived after {took:?}"
        );
        assert_eq!(reads, 1, "round {round}: one write for the batch");
    }
}

/// How many whole frames `buf` holds (short unmasked frames).
fn text_frames_complete(mut buf: &[u8]) -> usize {
    let mut n = 0;
    while buf.len() >= 2 {
        let len = usize::from(buf[1] & 0x7f);
        if buf.len() < 2 + len {
            break;
        }
        buf = &buf[2 + len..];
        n += 1;
    }
    n
}
