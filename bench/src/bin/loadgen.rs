//! WebSocket load generator for the chat/echo servers (the crate's `chat`
//! example and the `baseline` server).
//!
//! ```text
//! loadgen echo        --addr A [--conns 50] [--size 64] [--duration 10] [--warmup 1] [--server-pid P]
//! loadgen fanout      --addr A [--addr2 B [--split N]] [--subs 1000] [--msgs 500] [--size 100] [--rate 0] [--server-pid P]...
//! loadgen idle        --addr A [--conns 5000] --server-pid P
//! loadgen connections --addr A [--conns 19900] [--procs N] [--local-ip 127.0.0.2-127.0.0.5]... [--server-pid P]
//! loadgen post-rtt    --addr LB --upstream A --upstream B [--msgs 500] [--rate 50] [--size 100] [--server-pid P]...
//! ```
//!
//! `fanout --sub-transport sse` and `idle --transport sse` use the crate's
//! HTTP fallback (Server-Sent Events sessions) instead of WebSockets for the
//! subscribers / idle connections; `post-rtt` sends chat messages by `POST`
//! through a load balancer to a WebSocket member on the other process.
//!
//! Every mode prints a human-readable summary and then exactly one JSON
//! line (starting with `{"mode":`), and exits non-zero if anything was
//! lost, corrupted or failed.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures_util::stream::{self, SplitSink};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tower_channels_bench::fallback::{self, Poster, Sse, SseEvent};
use tower_channels_bench::procfs::{self, CpuMeter};
use tower_channels_bench::{err, Args, Result, Summary};

type Ws = WebSocketStream<TcpStream>;

const USAGE: &str =
    "usage: loadgen <echo|fanout|idle|connections|post-rtt> --addr HOST:PORT [options]
  common:      --server-pid PID (repeatable; CPU/RSS are summed over them)
  echo:        --conns 50 --size 64 --duration 10 --warmup 1
  fanout:      --subs 1000 --msgs 500 --size 100 [--addr2 HOST:PORT [--split N]] [--room NAME]
               [--timeout 30]
               [--rate MSGS_PER_S (0: back to back)] [--sub-transport ws|sse]
  idle:        --conns 5000 [--transport ws|sse]
  post-rtt:    --addr LOAD_BALANCER --upstream A --upstream B [--msgs 500] [--rate 50] [--size 100]
               [--timeout 30]
  connections: --conns 19900 [--procs N] [--local-ip IP|IP-IP]... [--concurrency 64]
               [--source-port-base 10000 (0: kernel-chosen source ports)]";

/// Time allowed for one TCP connect + WebSocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for a single echo to come back.
const ECHO_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1);
    let mode = argv.next().unwrap_or_default();
    let result = match Args::parse(argv, &[]) {
        Ok(args) => match mode.as_str() {
            "echo" => echo(args).await,
            "fanout" => fanout(args).await,
            "idle" => idle(args).await,
            "connections" => connections(args).await,
            "post-rtt" => post_rtt(args).await,
            "conn-worker" => conn_worker(args).await,
            _ => err(USAGE),
        },
        Err(e) => Err(e),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("loadgen {mode}: error: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// Connection helpers

fn ws_config() -> WebSocketConfig {
    // Small read buffers keep the load generator's own memory modest when it
    // holds thousands of connections; it does not change what the server does.
    WebSocketConfig::default().read_buffer_size(16 * 1024)
}

/// Source addresses for many connections from one machine.
///
/// Connection number `g = offset + i * stride` (`i` counts this process's
/// connections, `offset`/`stride` interleave several worker processes) uses
/// source IP `ips[g % ips.len()]` and source port `port_base + g / ips.len()`.
/// Choosing the port ourselves keeps `bind` O(1); letting the kernel pick one
/// for a bound-but-unconnected socket (`bind(ip:0)`) scans the port table
/// and gets quadratically slow with tens of thousands of sockets.
#[derive(Debug, Default)]
struct Sources {
    ips: Vec<IpAddr>,
    offset: usize,
    stride: usize,
    port_base: u16,
}

impl Sources {
    fn for_index(&self, i: usize) -> Option<SocketAddr> {
        if self.ips.is_empty() {
            return None;
        }
        let g = self.offset + i * self.stride.max(1);
        let ip = self.ips[g % self.ips.len()];
        let port = usize::from(self.port_base) + g / self.ips.len();
        // Past the end of the port space (or without a base): any free port.
        let port = u16::try_from(port)
            .ok()
            .filter(|_| self.port_base > 0)
            .unwrap_or(0);
        Some(SocketAddr::new(ip, port))
    }
}

/// TCP connect (optionally from `source`) and WebSocket handshake.
async fn connect(addr: SocketAddr, path: &str, source: Option<SocketAddr>) -> Result<Ws> {
    let fut = async {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(source) = source {
            socket.set_reuseaddr(true)?;
            if let Err(e) = socket.bind(source) {
                if source.port() == 0 || e.kind() != std::io::ErrorKind::AddrInUse {
                    return Err(e.into());
                }
                // Someone else holds that port: let the kernel choose.
                socket.bind(SocketAddr::new(source.ip(), 0))?;
            }
        }
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        let url = format!("ws://{addr}{path}");
        let (ws, _response) =
            tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config())).await?;
        Result::Ok(ws)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, fut).await {
        Ok(res) => res,
        Err(_) => err(format!("connect to {addr}{path} timed out")),
    }
}

/// Opens `n` connections with at most `concurrency` handshakes in flight,
/// from the source addresses given by `sources`. Returns the open
/// connections and the errors.
async fn open_many(
    addr: SocketAddr,
    path: &str,
    n: usize,
    concurrency: usize,
    sources: &Sources,
) -> (Vec<Ws>, Vec<String>) {
    let results: Vec<Result<Ws>> = stream::iter(0..n)
        .map(|i| connect(addr, path, sources.for_index(i)))
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut open = Vec::with_capacity(n);
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(ws) => open.push(ws),
            Err(e) => errors.push(e.to_string()),
        }
    }
    (open, errors)
}

/// How subscribers and idle connections reach the server.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Transport {
    WebSocket,
    /// The HTTP fallback's Server-Sent Events session.
    Sse,
}

impl Transport {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "ws" => Ok(Self::WebSocket),
            "sse" => Ok(Self::Sse),
            _ => err(format!("unknown transport `{s}` (ws or sse)")),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::WebSocket => "ws",
            Self::Sse => "sse",
        }
    }
}

/// A subscriber's connection: a WebSocket or an SSE session.
enum Sub {
    Ws(Ws),
    Sse(Sse),
}

impl Sub {
    /// The next text message; `None` when the server closed.
    async fn next_text(&mut self) -> Option<Result<String>> {
        match self {
            Sub::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => return Some(Ok(t.as_str().to_owned())),
                    Some(Ok(Message::Close(_))) | None => return None,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Some(Err(e.into())),
                }
            },
            Sub::Sse(sse) => loop {
                match sse.next_event().await {
                    Ok(Some(SseEvent::Text(t))) => return Some(Ok(t)),
                    // The close event says why (4008: slow client).
                    Ok(Some(SseEvent::Close(c))) => return Some(err(format!("closed: {c}"))),
                    Ok(None) => return None,
                    Ok(Some(_)) => {}
                    Err(e) => return Some(Err(e)),
                }
            },
        }
    }
}

/// Opens an SSE session on `path` (`transport=sse` is appended) and waits
/// for its `open` event: the consumer's `connect` has run. Returns the
/// stream, the response headers and the `open` event's JSON.
async fn open_sse(addr: SocketAddr, path: &str) -> Result<(Sse, http::HeaderMap, String)> {
    let fut = async {
        let (mut sse, headers) = Sse::open(addr, &format!("{path}?transport=sse")).await?;
        loop {
            match sse.next_event().await? {
                Some(SseEvent::Open(json)) => return Ok((sse, headers, json)),
                Some(SseEvent::Close(c)) => return err(format!("SSE session closed: {c}")),
                Some(_) => {}
                None => return err("SSE response ended before the open event"),
            }
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, fut).await {
        Ok(res) => res,
        Err(_) => err(format!("SSE session on {addr}{path} not open in time")),
    }
}

/// Opens `n` subscriber connections (`concurrency` at a time).
async fn open_subs(
    addr: SocketAddr,
    path: &str,
    n: usize,
    concurrency: usize,
    transport: Transport,
) -> (Vec<Sub>, Vec<String>) {
    match transport {
        Transport::WebSocket => {
            let (ws, errors) = open_many(addr, path, n, concurrency, &Sources::default()).await;
            (ws.into_iter().map(Sub::Ws).collect(), errors)
        }
        Transport::Sse => {
            let results: Vec<Result<Sse>> = stream::iter(0..n)
                .map(|_| async move { open_sse(addr, path).await.map(|(s, _, _)| s) })
                .buffer_unordered(concurrency.max(1))
                .collect()
                .await;
            let mut open = Vec::with_capacity(n);
            let mut errors = Vec::new();
            for r in results {
                match r {
                    Ok(s) => open.push(Sub::Sse(s)),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            (open, errors)
        }
    }
}

/// Waits for the next text message, skipping control frames.
async fn next_text(ws: &mut Ws) -> Result<String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Binary(_))) => return err("unexpected binary message"),
            Some(Ok(Message::Close(_))) | None => return err("connection closed by server"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// Sends `payload` and waits for the identical echo; returns the round trip.
async fn echo_once(ws: &mut Ws, payload: &str) -> Result<Duration> {
    let t0 = Instant::now();
    let fut = async {
        ws.send(Message::text(payload)).await?;
        let reply = next_text(ws).await?;
        if reply != payload {
            return err(format!("echo mismatch: sent {payload:?}, got {reply:?}"));
        }
        Ok(t0.elapsed())
    };
    match tokio::time::timeout(ECHO_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => err("echo timed out"),
    }
}

/// Sends one echo on every connection (`concurrency` at a time).
/// Returns the round trips in ns and the errors.
async fn check_all(conns: &mut [Ws], concurrency: usize, tag: &str) -> (Vec<u64>, Vec<String>) {
    let results: Vec<Result<Duration>> = stream::iter(conns.iter_mut().enumerate())
        .map(|(i, ws)| async move { echo_once(ws, &format!("check {tag} {i}")).await })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut rtts = Vec::with_capacity(results.len());
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(d) => rtts.push(d.as_nanos() as u64),
            Err(e) => errors.push(e.to_string()),
        }
    }
    (rtts, errors)
}

fn parse_addr(s: &str) -> Result<SocketAddr> {
    match s.parse() {
        Ok(a) => Ok(a),
        Err(e) => err(format!("invalid address `{s}`: {e}")),
    }
}

/// Parses `--local-ip` values: single addresses or IPv4 ranges
/// `127.0.0.2-127.0.0.9` (inclusive), comma-separated or repeated.
fn parse_ips(values: &[String]) -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in values.iter().flat_map(|v| v.split(',')) {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (Ipv4Addr, Ipv4Addr) = match (a.parse(), b.parse()) {
                (Ok(a), Ok(b)) => (a, b),
                _ => return err(format!("invalid IP range `{part}`")),
            };
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a > 65_536 {
                return err(format!("invalid IP range `{part}`"));
            }
            out.extend((a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))));
        } else {
            match part.parse() {
                Ok(ip) => out.push(ip),
                Err(_) => return err(format!("invalid IP `{part}`")),
            }
        }
    }
    Ok(out)
}

fn pids(args: &mut Args) -> Result<Vec<u32>> {
    args.all("server-pid")
        .iter()
        .map(|p| {
            p.parse::<u32>()
                .or_else(|e| err(format!("invalid --server-pid `{p}`: {e}")))
        })
        .collect()
}

fn rss_sum(pids: &[u32]) -> Result<u64> {
    pids.iter().map(|&p| procfs::rss_kib(p)).sum()
}

fn per(total: f64, n: u64) -> f64 {
    if n == 0 {
        f64::NAN
    } else {
        total / n as f64
    }
}

/// JSON numbers cannot be NaN/inf: map those to null.
fn num(x: f64) -> serde_json::Value {
    if x.is_finite() {
        json!((x * 1000.0).round() / 1000.0)
    } else {
        serde_json::Value::Null
    }
}

fn print_errors(errors: &[String]) {
    for e in errors.iter().take(5) {
        eprintln!("  error: {e}");
    }
    if errors.len() > 5 {
        eprintln!("  ... and {} more errors", errors.len() - 5);
    }
}

// ---------------------------------------------------------------------------
// echo

async fn echo(mut args: Args) -> Result<bool> {
    let addr = parse_addr(&args.required::<String>("addr")?)?;
    let conns: usize = args.get("conns", 50)?;
    let size: usize = args.get("size", 64)?;
    let duration: f64 = args.get("duration", 10.0)?;
    let warmup: f64 = args.get("warmup", 1.0)?;
    let pids = pids(&mut args)?;
    args.finish()?;

    let (ws, mut errors) = open_many(addr, "/ws/echo", conns, 64, &Sources::default()).await;
    if !errors.is_empty() {
        print_errors(&errors);
        return err(format!("{} of {conns} connections failed", errors.len()));
    }

    let start = Instant::now() + Duration::from_secs_f64(warmup);
    let end = start + Duration::from_secs_f64(duration);
    let handles: Vec<_> = ws
        .into_iter()
        .enumerate()
        .map(|(id, ws)| tokio::spawn(echo_loop(ws, id, size, start, end)))
        .collect();

    tokio::time::sleep_until(start.into()).await;
    let cpu = CpuMeter::start(&pids, procfs::clock_ticks_per_sec())?;
    tokio::time::sleep_until(end.into()).await;
    let cpu_us = cpu.elapsed_us()?;

    let mut rtts = Vec::new();
    for h in handles {
        match h.await {
            Ok((samples, None)) => rtts.extend(samples),
            Ok((samples, Some(e))) => {
                rtts.extend(samples);
                errors.push(e);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    let msgs = rtts.len() as u64;
    let rtt = Summary::of(&mut rtts);
    let rate = msgs as f64 / duration;
    let cpu_per_msg = per(cpu_us as f64, msgs);
    print_errors(&errors);
    println!(
        "echo: {conns} conns, {size} B, {duration} s: {rate:.0} msgs/s, RTT p50 {:.0} µs p99 {:.0} µs, \
         server CPU {cpu_per_msg:.2} µs/msg, errors {}",
        rtt.p50_us,
        rtt.p99_us,
        errors.len()
    );
    let ok = errors.is_empty() && msgs > 0;
    println!(
        "{}",
        json!({
            "mode": "echo", "ok": ok, "conns": conns, "size": size, "duration_s": duration,
            "msgs": msgs, "msgs_per_s": num(rate),
            "rtt_p50_us": num(rtt.p50_us), "rtt_p99_us": num(rtt.p99_us), "rtt_max_us": num(rtt.max_us),
            "server_cpu_us": cpu_us, "cpu_us_per_msg": num(cpu_per_msg), "errors": errors.len(),
        })
    );
    Ok(ok)
}

/// Closed loop on one connection: send, wait for the echo, repeat until
/// `end`. Returns the round trips (ns) completed inside `[start, end)`.
async fn echo_loop(
    mut ws: Ws,
    id: usize,
    size: usize,
    start: Instant,
    end: Instant,
) -> (Vec<u64>, Option<String>) {
    let mut samples = Vec::new();
    let mut payload = String::with_capacity(size);
    for seq in 0u64.. {
        if Instant::now() >= end {
            break;
        }
        payload.clear();
        let _ = write!(payload, "{id}:{seq}:");
        while payload.len() < size {
            payload.push('x');
        }
        match echo_once(&mut ws, &payload).await {
            Ok(rtt) => {
                let done = Instant::now();
                if done >= start && done < end {
                    samples.push(rtt.as_nanos() as u64);
                }
            }
            Err(e) => return (samples, Some(format!("connection {id}: {e}"))),
        }
    }
    let _ = ws.close(None).await;
    (samples, None)
}

// ---------------------------------------------------------------------------
// fanout

#[derive(Serialize)]
struct ChatOut<'a> {
    message: &'a str,
}

#[derive(Deserialize)]
struct ChatIn {
    message: String,
}

fn chat_json(text: &str) -> String {
    serde_json::to_string(&ChatOut { message: text }).unwrap_or_default()
}

/// Inner text of data message `seq`: `d <seq> <nanos> xxxx…` padded to `size`.
fn data_text(seq: usize, nanos: u64, size: usize) -> String {
    let mut s = format!("d {seq} {nanos} ");
    while s.len() < size {
        s.push('x');
    }
    s
}

enum Chat {
    Data { seq: usize, nanos: u64 },
    Probe(u64),
    Hello(u64),
    Bad(String),
}

fn classify(raw: &str, size: usize) -> Chat {
    let Ok(ChatIn { message }) = serde_json::from_str::<ChatIn>(raw) else {
        return Chat::Bad(raw.to_owned());
    };
    let mut parts = message.split(' ');
    let tag = parts.next();
    let a = parts.next().and_then(|x| x.parse::<u64>().ok());
    match (tag, a) {
        (Some("probe"), Some(k)) => Chat::Probe(k),
        (Some("hello"), Some(n)) => Chat::Hello(n),
        (Some("d"), Some(seq)) => match parts.next().and_then(|x| x.parse::<u64>().ok()) {
            Some(nanos) if message == data_text(seq as usize, nanos, size) => Chat::Data {
                seq: seq as usize,
                nanos,
            },
            _ => Chat::Bad(message),
        },
        _ => Chat::Bad(message),
    }
}

enum Event {
    /// Subscriber `.0` saw probe `.1`.
    SubProbe(usize, u64),
    /// A subscriber received all messages.
    SubDone,
    /// The publisher saw its own hello.
    PubHello,
    /// The publisher saw its own probe.
    PubProbe(u64),
}

#[derive(Default)]
struct SubResult {
    /// Arrival time (ns since base) per sequence number, `u64::MAX` if missing.
    arrivals: Vec<u64>,
    /// One-way latencies (ns) of every delivery.
    latencies: Vec<u64>,
    received: u64,
    duplicates: u64,
    corrupt: u64,
    error: Option<String>,
}

struct Subscriber {
    id: usize,
    msgs: usize,
    size: usize,
    base: Instant,
    events: mpsc::UnboundedSender<Event>,
    stop: watch::Receiver<bool>,
}

impl Subscriber {
    /// Reads until all `msgs` data messages arrived or `stop` is set.
    /// Returns the connection too so it stays open until the run is over.
    async fn run(mut self, mut ws: Sub) -> (SubResult, Sub) {
        let mut r = SubResult {
            arrivals: vec![u64::MAX; self.msgs],
            ..SubResult::default()
        };
        while (r.received as usize) < self.msgs {
            let next = tokio::select! {
                biased;
                m = ws.next_text() => m,
                _ = self.stop.changed() => break,
            };
            let raw = match next {
                Some(Ok(t)) => t,
                None => {
                    r.error = Some(format!("subscriber {}: closed by server", self.id));
                    break;
                }
                Some(Err(e)) => {
                    r.error = Some(format!("subscriber {}: {e}", self.id));
                    break;
                }
            };
            let now = self.base.elapsed().as_nanos() as u64;
            match classify(&raw, self.size) {
                Chat::Data { seq, nanos } if seq < self.msgs => {
                    if r.arrivals[seq] == u64::MAX {
                        r.arrivals[seq] = now;
                        r.latencies.push(now.saturating_sub(nanos));
                        r.received += 1;
                    } else {
                        r.duplicates += 1;
                    }
                }
                Chat::Probe(k) => {
                    let _ = self.events.send(Event::SubProbe(self.id, k));
                }
                Chat::Hello(_) => {}
                Chat::Data { seq, .. } => {
                    r.corrupt += 1;
                    r.error.get_or_insert_with(|| {
                        format!("subscriber {}: bad sequence {seq}", self.id)
                    });
                }
                Chat::Bad(text) => {
                    r.corrupt += 1;
                    r.error.get_or_insert_with(|| {
                        format!("subscriber {}: unexpected message {text:?}", self.id)
                    });
                }
            }
        }
        if r.received as usize == self.msgs {
            let _ = self.events.send(Event::SubDone);
        }
        (r, ws)
    }
}

async fn fanout(mut args: Args) -> Result<bool> {
    let addr = parse_addr(&args.required::<String>("addr")?)?;
    let addr2 = args.opt("addr2").map(|a| parse_addr(&a)).transpose()?;
    let subs: usize = args.get("subs", 1000)?;
    let msgs: usize = args.get("msgs", 500)?;
    let size: usize = args.get("size", 100)?;
    let timeout: f64 = args.get("timeout", 30.0)?;
    let transport = Transport::parse(&args.get("sub-transport", "ws".to_owned())?)?;
    // Subscribers on the first server (the publisher's); the rest go to
    // --addr2. 0 measures the receiving process alone.
    let split: usize = args.get("split", subs.div_ceil(2))?;
    if split > subs {
        return err(format!("--split {split} is more than --subs {subs}"));
    }
    // Messages per second; 0 sends back to back.
    let rate: f64 = args.get("rate", 0.0)?;
    if !rate.is_finite() || rate < 0.0 {
        return err(format!("invalid --rate {rate}: must be >= 0"));
    }
    let base = Instant::now();
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let room: String = args.get("room", format!("bench{}x{unique}", std::process::id()))?;
    let pids = pids(&mut args)?;
    args.finish()?;
    let path = format!("/ws/chat/{room}");

    // 1. Connect the subscribers (alternating between the two servers).
    let (mut ws1, mut errors) = open_subs(addr, &path, split, 64, transport).await;
    let (ws2, errors2) = open_subs(addr2.unwrap_or(addr), &path, subs - split, 64, transport).await;
    errors.extend(errors2);
    if !errors.is_empty() {
        print_errors(&errors);
        return err(format!(
            "{} of {subs} subscribers failed to connect",
            errors.len()
        ));
    }
    ws1.extend(ws2);

    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let handles: Vec<_> = ws1
        .into_iter()
        .enumerate()
        .map(|(id, ws)| {
            let sub = Subscriber {
                id,
                msgs,
                size,
                base,
                events: ev_tx.clone(),
                stop: stop_rx.clone(),
            };
            tokio::spawn(sub.run(ws))
        })
        .collect();

    // 2. The publisher joins the room (on the first server) and drains it.
    let publisher = connect(addr, &path, None).await?;
    let (mut pub_tx, pub_rx) = publisher.split();
    let hello = base.elapsed().as_nanos() as u64;
    let pub_reader = tokio::spawn(drain_publisher(pub_rx, hello, size, ev_tx.clone()));
    drop(ev_tx);

    // 3. Make sure everybody joined: no sleeps, only observed messages.
    let join_deadline = tokio::time::Instant::now() + Duration::from_secs_f64(timeout);
    let rounds = join_room(&mut pub_tx, &mut ev_rx, subs, hello, join_deadline).await?;

    // 4. Publish: back to back, or message k at `publish_start + k / rate`
    // (a late message goes out at once, so the schedule catches up).
    let cpu = CpuMeter::start(&pids, procfs::clock_ticks_per_sec())?;
    let mut sent = Vec::with_capacity(msgs);
    let publish_start = tokio::time::Instant::now();
    for seq in 0..msgs {
        if rate > 0.0 {
            let at = publish_start + Duration::from_secs_f64(seq as f64 / rate);
            tokio::time::sleep_until(at).await;
        }
        let nanos = base.elapsed().as_nanos() as u64;
        pub_tx
            .send(Message::text(chat_json(&data_text(seq, nanos, size))))
            .await?;
        sent.push(nanos);
    }
    let publish_s = publish_start.elapsed().as_secs_f64();

    // 5. Wait until every subscriber has everything, or the timeout.
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(timeout);
    let mut done = 0;
    let mut timed_out = false;
    while done < subs {
        match tokio::time::timeout_at(deadline, ev_rx.recv()).await {
            Ok(Some(Event::SubDone)) => done += 1,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                timed_out = true;
                break;
            }
        }
    }
    let cpu_us = cpu.elapsed_us()?;
    let _ = stop_tx.send(true);

    let mut results = Vec::with_capacity(subs);
    let mut conns = Vec::with_capacity(subs);
    for h in handles {
        match h.await {
            Ok((r, ws)) => {
                results.push(r);
                conns.push(ws);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    pub_reader.abort();
    drop(conns);

    // 6. Report.
    let expected = (subs * msgs) as u64;
    let mut delivered = 0;
    let mut duplicates = 0;
    let mut corrupt = 0;
    let mut latencies = Vec::with_capacity(expected as usize);
    let mut completion = vec![0u64; msgs];
    let mut last_arrival = 0;
    for r in &results {
        delivered += r.received;
        duplicates += r.duplicates;
        corrupt += r.corrupt;
        latencies.extend_from_slice(&r.latencies);
        for (seq, &t) in r.arrivals.iter().enumerate() {
            if t != u64::MAX {
                completion[seq] = completion[seq].max(t.saturating_sub(sent[seq]));
                last_arrival = last_arrival.max(t);
            }
        }
        if let Some(e) = &r.error {
            errors.push(e.clone());
        }
    }
    let lost = expected - delivered;
    let elapsed_s = last_arrival.saturating_sub(sent.first().copied().unwrap_or(0)) as f64 / 1e9;
    let delivery_rate = delivered as f64 / elapsed_s;
    let lat = Summary::of(&mut latencies);
    let comp = Summary::of(&mut completion);
    let cpu_per_delivery = per(cpu_us as f64, delivered);
    let cpu_per_msg = per(cpu_us as f64, msgs as u64);
    print_errors(&errors);
    println!(
        "fanout: {subs} {} subs{}, {msgs} msgs, {size} B, {}: {delivered}/{expected} delivered, \
         lost {lost}, {delivery_rate:.0} deliveries/s, latency p50 {:.0} µs p99 {:.0} µs, \
         broadcast completion p50 {:.0} µs p99 {:.0} µs max {:.0} µs, \
         server CPU {cpu_per_delivery:.2} µs/delivery ({cpu_per_msg:.0} µs/msg), join rounds {rounds}{}",
        transport.name(),
        if addr2.is_some() { " on 2 servers" } else { "" },
        if rate > 0.0 {
            format!("rate {rate} msgs/s (published in {publish_s:.2} s)")
        } else {
            "rate 0 (back to back)".to_owned()
        },
        lat.p50_us,
        lat.p99_us,
        comp.p50_us,
        comp.p99_us,
        comp.max_us,
        if timed_out { ", TIMED OUT" } else { "" },
    );
    let ok = lost == 0 && duplicates == 0 && corrupt == 0 && errors.is_empty();
    println!(
        "{}",
        json!({
            "mode": "fanout", "ok": ok, "subs": subs, "msgs": msgs, "size": size,
            "transport": transport.name(),
            "rate": num(rate), "publish_s": num(publish_s),
            "servers": if addr2.is_some() { 2 } else { 1 },
            "expected": expected, "delivered": delivered, "lost": lost,
            "duplicates": duplicates, "corrupt": corrupt, "errors": errors.len(),
            "timed_out": timed_out, "join_rounds": rounds,
            "elapsed_s": num(elapsed_s), "deliveries_per_s": num(delivery_rate),
            "latency_p50_us": num(lat.p50_us), "latency_p99_us": num(lat.p99_us),
            "latency_max_us": num(lat.max_us),
            "completion_p50_us": num(comp.p50_us), "completion_p99_us": num(comp.p99_us),
            "completion_max_us": num(comp.max_us),
            "server_cpu_us": cpu_us, "cpu_us_per_delivery": num(cpu_per_delivery),
            "cpu_us_per_msg": num(cpu_per_msg),
        })
    );
    Ok(ok)
}

/// Reads the publisher's own copy of the room traffic and reports its
/// hello/probes.
async fn drain_publisher(
    mut rx: stream::SplitStream<Ws>,
    hello: u64,
    size: usize,
    events: mpsc::UnboundedSender<Event>,
) {
    while let Some(Ok(msg)) = rx.next().await {
        if let Message::Text(raw) = msg {
            let ev = match classify(&raw, size) {
                Chat::Hello(n) if n == hello => Event::PubHello,
                Chat::Probe(k) => Event::PubProbe(k),
                _ => continue,
            };
            if events.send(ev).is_err() {
                break;
            }
        }
    }
}

/// Proves every subscriber is a member of the room before publishing.
///
/// The publisher first waits for its own `hello` (it has joined). Then, in
/// rounds, it sends `probe k` and waits until it saw `probe k` itself and
/// every subscriber already confirmed before the round saw it too; a
/// subscriber is confirmed by the first probe it receives (it is a member,
/// and per-connection delivery is in order, so it will get all data sent
/// afterwards). Rounds repeat until all subscribers are confirmed; usually
/// one or two rounds are enough. Returns the number of rounds.
async fn join_room(
    pub_tx: &mut SplitSink<Ws, Message>,
    events: &mut mpsc::UnboundedReceiver<Event>,
    subs: usize,
    hello: u64,
    deadline: tokio::time::Instant,
) -> Result<u64> {
    pub_tx
        .send(Message::text(chat_json(&format!("hello {hello}"))))
        .await?;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::PubHello)) => break,
            Ok(Some(_)) => {}
            Ok(None) => return err("publisher connection closed while joining"),
            Err(_) => return err("publisher never received its own message"),
        }
    }

    // confirmed_in[i]: round in which subscriber i was confirmed (0 = not yet).
    let mut confirmed_in = vec![0u64; subs];
    let mut last_probe = vec![0u64; subs];
    let mut confirmed = 0;
    let mut round = 0;
    while confirmed < subs {
        round += 1;
        // Everyone confirmed so far must see this round's probe.
        let mut pending = confirmed;
        let mut publisher_saw = false;
        pub_tx
            .send(Message::text(chat_json(&format!("probe {round}"))))
            .await?;
        while confirmed < subs && !(publisher_saw && pending == 0) {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(Event::SubProbe(i, k))) => {
                    if confirmed_in[i] == 0 {
                        confirmed_in[i] = round;
                        confirmed += 1;
                    } else if k == round && confirmed_in[i] < round && last_probe[i] < round {
                        pending -= 1;
                    }
                    last_probe[i] = last_probe[i].max(k);
                }
                Ok(Some(Event::PubProbe(k))) => publisher_saw |= k == round,
                Ok(Some(Event::PubHello | Event::SubDone)) => {}
                Ok(None) => return err("connections closed while joining"),
                Err(_) => {
                    return err(format!(
                        "join incomplete: {confirmed} of {subs} subscribers confirmed after {round} probe rounds"
                    ))
                }
            }
        }
    }
    Ok(round)
}

// ---------------------------------------------------------------------------
// idle

async fn idle(mut args: Args) -> Result<bool> {
    let addr = parse_addr(&args.required::<String>("addr")?)?;
    let conns: usize = args.get("conns", 5000)?;
    let concurrency: usize = args.get("concurrency", 64)?;
    let transport = Transport::parse(&args.get("transport", "ws".to_owned())?)?;
    let pids = pids(&mut args)?;
    args.finish()?;
    if pids.is_empty() {
        return err("idle needs --server-pid");
    }
    if transport == Transport::Sse {
        return idle_sse(addr, conns, concurrency, &pids).await;
    }

    let rss_before = rss_sum(&pids)?;
    let t0 = Instant::now();
    let (mut ws, mut errors) =
        open_many(addr, "/ws/echo", conns, concurrency, &Sources::default()).await;
    let open_s = t0.elapsed().as_secs_f64();
    let (mut rtts, check_errors) = check_all(&mut ws, concurrency, "idle").await;
    errors.extend(check_errors);
    let rss_after = rss_sum(&pids)?;
    let fds: usize = pids.iter().map(|&p| procfs::fd_count(p).unwrap_or(0)).sum();
    let answered = rtts.len();
    let rtt = Summary::of(&mut rtts);
    drop(ws);

    let kib_per_conn = (rss_after as f64 - rss_before as f64) / conns as f64;
    print_errors(&errors);
    println!(
        "idle: {answered}/{conns} connections open and answering (opened in {open_s:.1} s), server RSS \
         {rss_before} KiB -> {rss_after} KiB = {kib_per_conn:.1} KiB/conn, server fds {fds}"
    );
    let ok = errors.is_empty() && answered == conns;
    println!(
        "{}",
        json!({
            "mode": "idle", "ok": ok, "conns": conns, "answered": answered, "errors": errors.len(),
            "rss_kib_before": rss_before, "rss_kib_after": rss_after,
            "kib_per_conn": num(kib_per_conn), "server_fds": fds, "open_s": num(open_s),
            "check_rtt_p50_us": num(rtt.p50_us), "check_rtt_p99_us": num(rtt.p99_us),
        })
    );
    Ok(ok)
}

/// `idle --transport sse`: `conns` SSE sessions on `/ws/echo`, each counted
/// once its `open` event arrived (the consumer's `connect` ran and the
/// session is registered); unlike the WebSocket form they do not answer an
/// echo (that would need a `POST` per session on a second connection).
async fn idle_sse(
    addr: SocketAddr,
    conns: usize,
    concurrency: usize,
    pids: &[u32],
) -> Result<bool> {
    let rss_before = rss_sum(pids)?;
    let t0 = Instant::now();
    let (sessions, errors) = open_subs(addr, "/ws/echo", conns, concurrency, Transport::Sse).await;
    let open_s = t0.elapsed().as_secs_f64();
    let rss_after = rss_sum(pids)?;
    let fds: usize = pids.iter().map(|&p| procfs::fd_count(p).unwrap_or(0)).sum();
    let open = sessions.len();
    drop(sessions);
    let kib_per_conn = (rss_after as f64 - rss_before as f64) / conns as f64;
    print_errors(&errors);
    println!(
        "idle sse: {open}/{conns} SSE sessions open (opened in {open_s:.1} s), server RSS \
         {rss_before} KiB -> {rss_after} KiB = {kib_per_conn:.1} KiB/session, server fds {fds}"
    );
    let ok = errors.is_empty() && open == conns;
    println!(
        "{}",
        json!({
            "mode": "idle", "transport": "sse", "ok": ok, "conns": conns, "answered": open,
            "errors": errors.len(), "rss_kib_before": rss_before, "rss_kib_after": rss_after,
            "kib_per_conn": num(kib_per_conn), "server_fds": fds, "open_s": num(open_s),
        })
    );
    Ok(ok)
}

// ---------------------------------------------------------------------------
// connections

/// Coordinator: spreads `--conns` over `--procs` worker processes (each one
/// is this binary in `conn-worker` mode) and source IPs, waits until all
/// connections are open at the same time, then has every one of them echo.
async fn connections(mut args: Args) -> Result<bool> {
    let addr = parse_addr(&args.required::<String>("addr")?)?;
    let conns: usize = args.get("conns", 19_900)?;
    let per_proc_default = 5_000;
    let procs: usize = args.get("procs", conns.div_ceil(per_proc_default).max(1))?;
    let concurrency: usize = args.get("concurrency", 64)?;
    let mut ip_args = args.all("local-ip");
    if ip_args.is_empty() {
        ip_args.push("127.0.0.2-127.0.0.5".to_owned());
    }
    let ips = parse_ips(&ip_args)?;
    let port_base: u16 = args.get("source-port-base", 10_000)?;
    let pids = pids(&mut args)?;
    args.finish()?;
    if procs == 0 || ips.is_empty() {
        return err("need at least one process and one source IP");
    }

    // Fail early with a clear message instead of EMFILE half way through.
    let per_proc = conns.div_ceil(procs);
    if let Some(limit) = procfs::open_files_limit() {
        if per_proc as u64 + 64 > limit {
            return err(format!(
                "{per_proc} connections per process exceed the open-file limit {limit}; \
                 use more --procs or raise `ulimit -n`"
            ));
        }
    }

    let ips_csv = ips
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let exe = std::env::current_exe()?;
    let rss_before = rss_sum(&pids).unwrap_or(0);
    let cpu = CpuMeter::start(&pids, procfs::clock_ticks_per_sec())?;
    let t0 = Instant::now();

    let mut workers = Vec::with_capacity(procs);
    for w in 0..procs {
        let count = conns / procs + usize::from(w < conns % procs);
        let mut child = tokio::process::Command::new(&exe)
            .arg("conn-worker")
            .args(["--addr", &addr.to_string()])
            .args(["--conns", &count.to_string()])
            .args(["--local-ip", &ips_csv])
            .args(["--source-offset", &w.to_string()])
            .args(["--source-stride", &procs.to_string()])
            .args(["--source-port-base", &port_base.to_string()])
            .args(["--concurrency", &concurrency.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return err("worker pipes unavailable");
        };
        workers.push((child, stdin, BufReader::new(stdout).lines()));
    }

    // Phase 1: every worker reports "established <ok> <failed>".
    let mut established = 0;
    let mut failed = 0;
    for (_, _, lines) in &mut workers {
        let (ok, bad) = worker_report(lines, "established").await?;
        established += ok;
        failed += bad;
    }
    let open_s = t0.elapsed().as_secs_f64();
    let fds: usize = pids.iter().map(|&p| procfs::fd_count(p).unwrap_or(0)).sum();
    let rss_after = rss_sum(&pids).unwrap_or(0);

    // Phase 2: with all connections open, each must answer an echo.
    for (_, stdin, _) in &mut workers {
        stdin.write_all(b"check\n").await?;
        stdin.flush().await?;
    }
    let mut answered = 0;
    for (_, _, lines) in &mut workers {
        let (ok, bad) = worker_report(lines, "checked").await?;
        answered += ok;
        failed += bad;
    }
    let cpu_us = cpu.elapsed_us()?;
    let total_s = t0.elapsed().as_secs_f64();

    // Phase 3: release everything.
    for (mut child, mut stdin, _) in workers {
        let _ = stdin.write_all(b"exit\n").await;
        drop(stdin);
        let _ = child.wait().await;
    }

    let kib_per_conn = (rss_after as f64 - rss_before as f64) / conns as f64;
    let cpu_per_conn = per(cpu_us as f64, conns as u64);
    println!(
        "connections: {established}/{conns} established concurrently in {open_s:.1} s over {procs} \
         processes and {} source IPs, {answered}/{conns} answered an echo while all were open, \
         failed {failed}; server fds {fds}, RSS {rss_before} KiB -> {rss_after} KiB \
         ({kib_per_conn:.1} KiB/conn), server CPU {cpu_per_conn:.0} µs/conn, total {total_s:.1} s",
        ips.len()
    );
    let ok = established == conns && answered == conns && failed == 0;
    println!(
        "{}",
        json!({
            "mode": "connections", "ok": ok, "conns": conns, "established": established,
            "answered": answered, "failed": failed, "procs": procs, "source_ips": ips.len(),
            "server_fds": fds, "rss_kib_before": rss_before, "rss_kib_after": rss_after,
            "kib_per_conn": num(kib_per_conn), "open_s": num(open_s), "total_s": num(total_s),
            "server_cpu_us": cpu_us, "cpu_us_per_conn": num(cpu_per_conn),
        })
    );
    Ok(ok)
}

/// Reads a `<word> <ok> <failed>` line from a worker.
async fn worker_report(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    word: &str,
) -> Result<(usize, usize)> {
    let Some(line) = lines.next_line().await? else {
        return err(format!(
            "connection worker exited before reporting `{word}`"
        ));
    };
    let mut parts = line.split_whitespace();
    if parts.next() != Some(word) {
        return err(format!("unexpected worker output: {line}"));
    }
    let mut num = || parts.next().and_then(|x| x.parse::<usize>().ok());
    match (num(), num()) {
        (Some(ok), Some(bad)) => Ok((ok, bad)),
        _ => err(format!("unexpected worker output: {line}")),
    }
}

/// Worker process for `connections`: opens its share, reports, waits for
/// `check`, echoes on every connection, reports, waits for `exit`/EOF.
async fn conn_worker(mut args: Args) -> Result<bool> {
    let addr = parse_addr(&args.required::<String>("addr")?)?;
    let conns: usize = args.required("conns")?;
    let sources = Sources {
        ips: parse_ips(&args.all("local-ip"))?,
        offset: args.get("source-offset", 0)?,
        stride: args.get("source-stride", 1)?,
        port_base: args.get("source-port-base", 0)?,
    };
    let concurrency: usize = args.get("concurrency", 64)?;
    args.finish()?;

    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let (mut ws, errors) = open_many(addr, "/ws/echo", conns, concurrency, &sources).await;
    print_errors(&errors);
    println!("established {} {}", ws.len(), errors.len());

    while let Some(line) = stdin.next_line().await? {
        match line.trim() {
            "check" => {
                let (rtts, errors) = check_all(&mut ws, concurrency, "conn").await;
                print_errors(&errors);
                println!("checked {} {}", rtts.len(), errors.len());
            }
            "exit" => break,
            _ => {}
        }
    }
    Ok(true)
}

// ---------------------------------------------------------------------------
// post-rtt

/// The process a response came from: the `x-upstream` header the load
/// balancer adds (nginx: `add_header X-Upstream $upstream_addr always;`; the
/// last address when it tried several).
fn upstream_of(headers: &http::HeaderMap) -> Result<SocketAddr> {
    let Some(value) = headers.get("x-upstream") else {
        return err("no x-upstream header: the load balancer must add it");
    };
    let value = value.to_str()?;
    parse_addr(value.rsplit(", ").next().unwrap_or(value))
}

/// What the member or the sender saw, at `base.elapsed()` ns.
enum Seen {
    Probe,
    Data(usize, u64),
}

/// Reads `sub` until it closes, reporting probes and data messages
/// (tagged `member`: the WebSocket member, else the sender's own stream).
async fn watch_room(
    mut sub: Sub,
    member: bool,
    size: usize,
    base: Instant,
    tx: mpsc::UnboundedSender<(bool, Seen)>,
) {
    while let Some(Ok(text)) = sub.next_text().await {
        let seen = match classify(&text, size) {
            Chat::Probe(_) => Seen::Probe,
            Chat::Data { seq, .. } => Seen::Data(seq, base.elapsed().as_nanos() as u64),
            _ => continue,
        };
        if tx.send((member, seen)).is_err() {
            break;
        }
    }
}

/// `post-rtt`: a sender with an SSE session opened through the load
/// balancer (`--addr`) `POST`s `--msgs` chat messages at `--rate` through
/// the same load balancer (round-robin: each `POST` lands on either
/// process); a WebSocket member of the room is connected directly to the
/// process that does *not* hold the session. Measures, per message, the
/// time from the start of the `POST` to the member's receipt (split by
/// whether the `POST` landed on the session's process or was forwarded
/// through the channel layer), to the sender's own copy on its SSE stream,
/// and the `POST`'s response time.
async fn post_rtt(mut args: Args) -> Result<bool> {
    let lb = parse_addr(&args.required::<String>("addr")?)?;
    let upstreams = args
        .all("upstream")
        .iter()
        .map(|a| parse_addr(a))
        .collect::<Result<Vec<_>>>()?;
    let msgs: usize = args.get("msgs", 500)?;
    let rate: f64 = args.get("rate", 50.0)?;
    let size: usize = args.get("size", 100)?;
    let timeout: f64 = args.get("timeout", 30.0)?;
    let pids = pids(&mut args)?;
    args.finish()?;
    if upstreams.len() != 2 {
        return err("post-rtt needs two --upstream addresses");
    }
    if !rate.is_finite() || rate <= 0.0 {
        return err(format!("invalid --rate {rate}: must be > 0"));
    }
    let base = Instant::now();
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let path = format!("/ws/chat/postrtt{}x{unique}", std::process::id());

    // 1. The sender's session, through the load balancer.
    let (sse, headers, open) = open_sse(lb, &path).await?;
    let holder = upstream_of(&headers)?;
    let Some(&other) = upstreams.iter().find(|&&u| u != holder) else {
        return err(format!("the session is on {holder}, not one of --upstream"));
    };
    let (session, token) = fallback::session_of(&open)?;
    // 2. The member, directly on the other process.
    let member = connect(other, &path, None).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let readers = [
        tokio::spawn(watch_room(Sub::Ws(member), true, size, base, tx.clone())),
        tokio::spawn(watch_room(Sub::Sse(sse), false, size, base, tx)),
    ];
    let mut poster = Poster::new(lb, &path, &session, &token);

    // 3. Join: probes until the member saw one (it is subscribed, across
    // processes, and later messages arrive in order).
    let join_deadline = tokio::time::Instant::now() + Duration::from_secs_f64(timeout);
    let mut probes = 0u64;
    'join: loop {
        probes += 1;
        poster.post(chat_json(&format!("probe {probes}"))).await?;
        let round = (tokio::time::Instant::now() + Duration::from_secs(1)).min(join_deadline);
        loop {
            match tokio::time::timeout_at(round, rx.recv()).await {
                Ok(Some((true, Seen::Probe))) => break 'join,
                Ok(Some(_)) => {}
                Ok(None) => return err("member or sender closed while joining"),
                Err(_) if tokio::time::Instant::now() >= join_deadline => {
                    return err(format!("the member saw none of {probes} probes"))
                }
                Err(_) => break,
            }
        }
    }

    // 4. Paced POSTs, one at a time (the protocol's order).
    let cpu = CpuMeter::start(&pids, procfs::clock_ticks_per_sec())?;
    let mut sent = Vec::with_capacity(msgs);
    let mut post_ns = Vec::with_capacity(msgs);
    let mut forwarded = Vec::with_capacity(msgs);
    let mut errors = Vec::new();
    let start = tokio::time::Instant::now();
    for seq in 0..msgs {
        tokio::time::sleep_until(start + Duration::from_secs_f64(seq as f64 / rate)).await;
        let t0 = base.elapsed().as_nanos() as u64;
        match poster.post(chat_json(&data_text(seq, t0, size))).await {
            Ok(h) => {
                post_ns.push(base.elapsed().as_nanos() as u64 - t0);
                forwarded.push(upstream_of(&h)? != holder);
                sent.push(t0);
            }
            Err(e) => {
                errors.push(e.to_string());
                break;
            }
        }
    }
    let posted = sent.len();

    // 5. Until the member and the sender have every message, or the timeout.
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(timeout);
    let mut member_at = vec![u64::MAX; posted];
    let mut sender_at = vec![u64::MAX; posted];
    let (mut member_got, mut sender_got, mut duplicates, mut stray) = (0, 0, 0u64, 0u64);
    let mut timed_out = false;
    while member_got < posted || sender_got < posted {
        let (is_member, seq, at) = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((m, Seen::Data(seq, at)))) => (m, seq, at),
            Ok(Some((_, Seen::Probe))) => continue,
            Ok(None) => {
                errors.push("member or sender closed".to_owned());
                break;
            }
            Err(_) => {
                timed_out = true;
                break;
            }
        };
        let (slots, got) = if is_member {
            (&mut member_at, &mut member_got)
        } else {
            (&mut sender_at, &mut sender_got)
        };
        match slots.get_mut(seq) {
            Some(slot) if *slot == u64::MAX => {
                *slot = at;
                *got += 1;
            }
            Some(_) => duplicates += 1,
            None => stray += 1,
        }
    }
    let cpu_us = cpu.elapsed_us()?;
    for r in readers {
        r.abort();
    }

    // 6. Report.
    let (mut direct, mut via, mut own) = (Vec::new(), Vec::new(), Vec::new());
    for seq in 0..posted {
        if member_at[seq] != u64::MAX {
            let d = member_at[seq].saturating_sub(sent[seq]);
            if forwarded[seq] {
                via.push(d);
            } else {
                direct.push(d);
            }
        }
        if sender_at[seq] != u64::MAX {
            own.push(sender_at[seq].saturating_sub(sent[seq]));
        }
    }
    let mut all: Vec<u64> = direct.iter().chain(&via).copied().collect();
    let n_forwarded = forwarded.iter().filter(|&&f| f).count();
    let (lat, lat_direct, lat_via) = (
        Summary::of(&mut all),
        Summary::of(&mut direct),
        Summary::of(&mut via),
    );
    let (lat_own, post) = (Summary::of(&mut own), Summary::of(&mut post_ns));
    let lost = (msgs - member_got) as u64;
    let lost_own = (msgs - sender_got) as u64;
    let cpu_per_msg = per(cpu_us as f64, posted as u64);
    print_errors(&errors);
    println!(
        "post-rtt: {posted}/{msgs} POSTs through {lb} at {rate} msgs/s (session on {holder}, \
         {n_forwarded} POSTs landed on {other} and were forwarded), member on {other}: \
         {member_got} received, lost {lost}; POST -> member p50 {:.0} µs p99 {:.0} µs \
         (POST on the session's process p50 {:.0} p99 {:.0}; forwarded p50 {:.0} p99 {:.0}); \
         POST -> own SSE copy p50 {:.0} µs p99 {:.0} µs (lost {lost_own}); \
         POST response p50 {:.0} µs p99 {:.0} µs; server CPU {cpu_per_msg:.0} µs/msg{}",
        lat.p50_us,
        lat.p99_us,
        lat_direct.p50_us,
        lat_direct.p99_us,
        lat_via.p50_us,
        lat_via.p99_us,
        lat_own.p50_us,
        lat_own.p99_us,
        post.p50_us,
        post.p99_us,
        if timed_out { ", TIMED OUT" } else { "" },
    );
    let ok = errors.is_empty() && lost == 0 && lost_own == 0 && duplicates == 0 && stray == 0;
    println!(
        "{}",
        json!({
            "mode": "post-rtt", "ok": ok, "msgs": msgs, "posted": posted, "rate": num(rate),
            "size": size, "forwarded": n_forwarded, "received": member_got, "lost": lost,
            "lost_own": lost_own, "duplicates": duplicates, "stray": stray,
            "errors": errors.len(), "timed_out": timed_out, "join_probes": probes,
            "latency_p50_us": num(lat.p50_us), "latency_p99_us": num(lat.p99_us),
            "latency_max_us": num(lat.max_us),
            "direct_p50_us": num(lat_direct.p50_us), "direct_p99_us": num(lat_direct.p99_us),
            "forwarded_p50_us": num(lat_via.p50_us), "forwarded_p99_us": num(lat_via.p99_us),
            "own_p50_us": num(lat_own.p50_us), "own_p99_us": num(lat_own.p99_us),
            "post_p50_us": num(post.p50_us), "post_p99_us": num(post.p99_us),
            "server_cpu_us": cpu_us, "cpu_us_per_msg": num(cpu_per_msg),
        })
    );
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_messages_round_trip() {
        let text = data_text(7, 123_456, 100);
        assert_eq!(text.len(), 100);
        match classify(&chat_json(&text), 100) {
            Chat::Data { seq, nanos } => assert_eq!((seq, nanos), (7, 123_456)),
            _ => panic!("not data"),
        }
        // Same text with whitespace after the colon, as another server may send.
        let spaced = format!("{{\"message\": \"{text}\"}}");
        assert!(matches!(classify(&spaced, 100), Chat::Data { .. }));
        let truncated = chat_json(&text[..90]);
        assert!(matches!(classify(&truncated, 100), Chat::Bad(_)));
        assert!(matches!(
            classify(&chat_json("probe 3"), 100),
            Chat::Probe(3)
        ));
    }

    #[test]
    fn ip_ranges() {
        let ips = parse_ips(&["127.0.0.2-127.0.0.4,127.0.1.1".to_owned()]).unwrap();
        assert_eq!(ips.len(), 4);
        assert_eq!(ips[3], "127.0.1.1".parse::<IpAddr>().unwrap());
        assert!(parse_ips(&["127.0.0.5-127.0.0.2".to_owned()]).is_err());
    }
}
