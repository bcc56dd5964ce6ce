//! permessage-deflate costs: fan-out of a 1 KiB JSON message to compressing
//! subscribers, and idle connections with deflate negotiated.
//!
//! ```text
//! bench/deflate.sh                      # full run (release build)
//! bench/deflate.sh --smoke              # tiny sizes, correctness only
//! deflate run [--subs 1000] [--msgs 200] [--rounds 2] [--idle 5000] [--smoke]
//! deflate serve --compression on|off --render shared|member   (started by `run`)
//! ```
//!
//! `serve` is a tower-channels server (plain hyper, one `WebSocketLayer`):
//! `/ws/{room}` joins the room's group; `/pub/{room}` sends every text it
//! receives to the room. With `--render shared` the group send is
//! `Event::text` (one shared payload, deflated once per parameter set); with
//! `--render member` each member's consumer sends its own copy of the
//! message (`ctx.send`), so every member deflates it: what a consumer that
//! renders per member costs.
//!
//! `run` starts a fresh server per configuration and round (alternating),
//! connects `--subs` subscribers that offer `permessage-deflate` (a raw
//! client: tungstenite's frame parser, flate2 to check every 16th message),
//! waits until every upgrade is answered (the consumer joins the group
//! before accepting, so that means joined), sends `--msgs` messages back to
//! back from the publisher, and measures the server's CPU time (utime +
//! stime from `/proc`) until every subscriber has them all. Then `--idle`
//! connections are opened and held, with and without deflate, and the
//! server's RSS growth per connection is reported.

use std::{io::Cursor, net::SocketAddr, process::ExitCode, time::Instant};

use bytes::{Buf, BytesMut};
use flate2::{Decompress, FlushDecompress, Status};
use futures_util::{stream, StreamExt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    process::{Child, Command},
};
use tower_channels::{
    channel_layer::{validate_group_name, BoxError, Event},
    consumer::{websocket_consumer, Accept, Context, Reject, WebSocketConsumer},
    message::Message,
    Compression, WebSocketConfig, WebSocketLayer,
};
use tower_channels_bench::{err, median, procfs, spawn_listening, Args, Result};
use tungstenite::protocol::frame::{
    coding::{Data, OpCode},
    Frame, FrameHeader,
};

#[tokio::main]
async fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1);
    let mode = argv.next().unwrap_or_default();
    let result = match Args::parse(argv, &["smoke"]) {
        Ok(args) => match mode.as_str() {
            "serve" => serve(args).await.map(|()| true),
            "run" => run(args).await,
            "bomb" => bomb(args).await,
            "stall" => stall(args).await,
            _ => err("usage: deflate run [--subs N] [--msgs N] [--rounds N] [--idle N] [--smoke] | deflate bomb [--bombers 4] [--secs 5] [--rounds 2] | deflate stall [--clients 20] [--size 524288] [--rate 20] [--secs 8] | deflate serve ..."),
        },
        Err(e) => Err(e),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("deflate {mode}: error: {e}");
            ExitCode::FAILURE
        }
    }
}

// ----- server ----------------------------------------------------------------

/// `/echo`: sends every message back (its own bytes: nothing is shared with
/// other connections, so a client that never reads holds its own queue).
struct EchoBack;

impl WebSocketConsumer for EchoBack {
    async fn receive(
        &mut self,
        ctx: &mut Context,
        msg: Message,
    ) -> std::result::Result<(), BoxError> {
        ctx.send(msg)?;
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Render {
    Shared,
    Member,
}

struct Member {
    group: String,
    render: Render,
    publisher: bool,
}

impl WebSocketConsumer for Member {
    async fn connect(&mut self, ctx: &mut Context) -> std::result::Result<Accept, Reject> {
        if validate_group_name(&self.group).is_err() {
            return Err(Reject::new(http::StatusCode::BAD_REQUEST));
        }
        if !self.publisher {
            ctx.group_add(&self.group).await?;
        }
        Ok(Accept::new())
    }

    async fn receive(
        &mut self,
        ctx: &mut Context,
        msg: Message,
    ) -> std::result::Result<(), BoxError> {
        if let Message::Text(t) = msg {
            ctx.group_send(&self.group, Event::text("fan.out", t))
                .await?;
        }
        Ok(())
    }

    async fn event(
        &mut self,
        ctx: &mut Context,
        event: Event,
    ) -> std::result::Result<(), BoxError> {
        match (self.render, event.as_message()) {
            // The shared payload: deflated once for the whole group.
            (Render::Shared, _) => tower_channels::consumer::forward_event(ctx, &event),
            // This member's own message: deflated by this connection.
            (Render::Member, Some(m)) => Ok(ctx.send(m.clone())?),
            (Render::Member, None) => Ok(()),
        }
    }
}

async fn serve(mut args: Args) -> Result<()> {
    let compression = match args.get("compression", "on".to_owned())?.as_str() {
        "on" => Compression::default(),
        "off" => Compression::disabled(),
        other => return err(format!("--compression on|off, not {other}")),
    };
    let render = match args.get("render", "shared".to_owned())?.as_str() {
        "shared" => Render::Shared,
        "member" => Render::Member,
        other => return err(format!("--render shared|member, not {other}")),
    };
    let inflate_limit = match args.get("inflate-limit", "on".to_owned())?.as_str() {
        "on" => Some(tower_channels::InflateLimit::default()),
        "off" => None,
        other => return err(format!("--inflate-limit on|off, not {other}")),
    };
    let addr: SocketAddr = args.get("addr", "127.0.0.1:0".parse()?)?;
    args.finish()?;

    let room = |scope: &tower_channels::Scope| scope.param("room").unwrap_or("").to_owned();
    let channels = WebSocketLayer::new()
        .route(
            "/ws/{room}",
            websocket_consumer(move |scope| Member {
                group: room(scope),
                render,
                publisher: false,
            }),
        )
        .route("/echo", websocket_consumer(|_| EchoBack))
        .route(
            "/pub/{room}",
            websocket_consumer(move |scope| Member {
                group: room(scope),
                render,
                publisher: true,
            }),
        )
        .with_config(
            WebSocketConfig::default()
                .compression(compression)
                .inflate_limit(inflate_limit),
        );
    let not_found = tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
        Ok::<_, std::convert::Infallible>(
            http::Response::builder()
                .status(404)
                .body(String::new())
                .unwrap_or_default(),
        )
    });
    let app = tower_layer::Layer::layer(&channels, not_found);

    let listener = TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .with_upgrades()
                .await;
        });
    }
}

// ----- client ----------------------------------------------------------------

/// The 1 KiB JSON chat message number `seq`: varied words (so it
/// compresses like real chat JSON, not like a run of one byte).
fn message(seq: usize) -> String {
    const WORDS: [&str; 32] = [
        "the",
        "deploy",
        "finished",
        "on",
        "staging",
        "and",
        "metrics",
        "look",
        "fine",
        "but",
        "latency",
        "p99",
        "went",
        "up",
        "after",
        "cache",
        "warmup",
        "please",
        "check",
        "dashboard",
        "before",
        "we",
        "ship",
        "to",
        "production",
        "tomorrow",
        "morning",
        "thanks",
        "team",
        "rollback",
        "plan",
        "ready",
    ];
    let mut x = (seq as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut text = String::new();
    let head = format!(
        r#"{{"type":"chat.message","room":"ops","seq":{seq},"user":{{"id":{},"name":"user-{}","avatar":"https://cdn.example.com/a/{}.png"}},"sent_at":"2026-12-03T08:{:02}:{:02}.{:03}Z","text":""#,
        1000 + seq % 97,
        seq % 97,
        seq % 97,
        seq / 60 % 60,
        seq % 60,
        seq % 1000
    );
    while head.len() + text.len() < 1000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        text.push_str(WORDS[(x % 32) as usize]);
        text.push(' ');
    }
    format!("{head}{}\",\"reactions\":[]}}", text.trim_end())
}

/// The `seq` field of a message.
fn seq_of(json: &str) -> Option<usize> {
    let rest = json.split_once("\"seq\":")?.1;
    rest.split(',').next()?.parse().ok()
}

/// Opens a WebSocket to `path`, offering permessage-deflate when `deflate`.
/// Returns the socket, the bytes read past the response, and whether the
/// server accepted the extension.
async fn open(addr: SocketAddr, path: &str, deflate: bool) -> Result<(TcpStream, BytesMut, bool)> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let key = tungstenite::handshake::client::generate_key();
    let ext = if deflate {
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    } else {
        ""
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n"
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if tcp.read_buf(&mut buf).await? == 0 {
            return err("connection closed during the handshake");
        }
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(len) = response.parse(&buf)? {
            if response.code != Some(101) {
                return err(format!("handshake answered {:?}", response.code));
            }
            let negotiated = response.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("sec-websocket-extensions")
                    && String::from_utf8_lossy(h.value).contains("permessage-deflate")
            });
            buf.advance(len);
            return Ok((tcp, buf, negotiated));
        }
        if buf.len() > 16 << 10 {
            return err("handshake response too large");
        }
    }
}

/// What one subscriber saw.
#[derive(Default, Debug)]
struct Received {
    messages: usize,
    compressed: usize,
    wire_bytes: usize,
    checked: usize,
}

/// Reads `want` messages (ignoring control frames), checking every 16th
/// against the expected text (inflating it when compressed).
async fn subscribe(mut tcp: TcpStream, mut buf: BytesMut, want: usize) -> Result<Received> {
    let mut got = Received::default();
    let mut inflate = Decompress::new(false);
    while got.messages < want {
        let mut cursor = Cursor::new(&buf[..]);
        let parsed = FrameHeader::parse(&mut cursor)?;
        let frame = match parsed {
            Some((header, len)) => {
                let start = cursor.position() as usize;
                let len = len as usize;
                if buf.len() >= start + len {
                    buf.advance(start);
                    got.wire_bytes += start + len;
                    Some((header, buf.split_to(len)))
                } else {
                    None
                }
            }
            None => None,
        };
        let Some((header, payload)) = frame else {
            buf.reserve(16 << 10);
            if tcp.read_buf(&mut buf).await? == 0 {
                return err(format!("closed after {} of {want} messages", got.messages));
            }
            continue;
        };
        match header.opcode {
            OpCode::Data(Data::Text) if header.is_final => {}
            OpCode::Data(_) => return err("fragmented or binary message"),
            OpCode::Control(_) => continue,
        }
        let seq = got.messages;
        got.messages += 1;
        if header.rsv1 {
            got.compressed += 1;
        }
        if seq % 16 == 0 || seq + 1 == want {
            let text = if header.rsv1 {
                inflate.reset(false);
                let mut input = payload.to_vec();
                input.extend_from_slice(&[0, 0, 0xff, 0xff]);
                let mut out = Vec::with_capacity(4096);
                let status = inflate.decompress_vec(&input, &mut out, FlushDecompress::Sync)?;
                if status == Status::BufError || inflate.total_in() as usize != input.len() {
                    return err("inflate did not consume the message");
                }
                String::from_utf8(out)?
            } else {
                String::from_utf8(payload.to_vec())?
            };
            if text != message(seq) {
                return err(format!(
                    "message {seq} differs (seq field {:?})",
                    seq_of(&text)
                ));
            }
            got.checked += 1;
        }
    }
    Ok(got)
}

fn text_frame(text: String) -> Result<Vec<u8>> {
    let mut frame = Frame::message(text.into_bytes(), OpCode::Data(Data::Text), true);
    // Any mask will do for a benchmark peer on loopback.
    frame.header_mut().mask = Some([0x37, 0xfa, 0x21, 0x3d]);
    let mut out = Vec::with_capacity(frame.len());
    frame.format(&mut out)?;
    Ok(out)
}

struct Server {
    child: Child,
    addr: SocketAddr,
    pid: u32,
}

impl Server {
    async fn start(compression: &str, render: &str) -> Result<Self> {
        Self::start_with(&["--compression", compression, "--render", render]).await
    }

    async fn start_with(serve_args: &[&str]) -> Result<Self> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("serve").args(serve_args);
        let (child, addr, pid) = spawn_listening(cmd).await?;
        Ok(Self { child, addr, pid })
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// One fan-out measurement.
#[derive(Debug)]
struct Fanout {
    cpu_us_per_delivery: f64,
    deliveries_per_s: f64,
    wire_bytes_per_delivery: f64,
    compressed_share: f64,
}

async fn fanout(server: &Server, subs: usize, msgs: usize, deflate: bool) -> Result<Fanout> {
    let addr = server.addr;
    let opened: Vec<Result<(TcpStream, BytesMut, bool)>> = stream::iter(0..subs)
        .map(|_| open(addr, "/ws/bench", deflate))
        .buffer_unordered(64)
        .collect()
        .await;
    let mut readers = Vec::with_capacity(subs);
    for o in opened {
        let (tcp, buf, _negotiated) = o?;
        readers.push(tokio::spawn(subscribe(tcp, buf, msgs)));
    }
    let (mut publisher, _, _) = open(addr, "/pub/bench", false).await?;
    let frames: Vec<Vec<u8>> = (0..msgs)
        .map(|s| text_frame(message(s)))
        .collect::<Result<_>>()?;

    let ticks = procfs::clock_ticks_per_sec();
    let meter = procfs::CpuMeter::start(&[server.pid], ticks)?;
    let started = Instant::now();
    let send = tokio::spawn(async move {
        for f in frames {
            publisher.write_all(&f).await?;
        }
        // Kept open until every subscriber is done.
        Ok::<_, std::io::Error>(publisher)
    });
    let mut total = Received::default();
    for r in readers {
        let got = r.await??;
        total.messages += got.messages;
        total.compressed += got.compressed;
        total.wire_bytes += got.wire_bytes;
        total.checked += got.checked;
    }
    let elapsed = started.elapsed();
    let cpu_us = meter.elapsed_us()?;
    drop(send.await??);
    let deliveries = (subs * msgs) as f64;
    if total.messages != subs * msgs {
        return err(format!("{} of {} deliveries", total.messages, subs * msgs));
    }
    Ok(Fanout {
        cpu_us_per_delivery: cpu_us as f64 / deliveries,
        deliveries_per_s: deliveries / elapsed.as_secs_f64(),
        wire_bytes_per_delivery: total.wire_bytes as f64 / deliveries,
        compressed_share: total.compressed as f64 / deliveries,
    })
}

/// RSS growth per connection for `conns` idle connections, in KiB.
async fn idle(server: &Server, path: &str, conns: usize, deflate: bool) -> Result<(f64, bool)> {
    let before = procfs::rss_kib(server.pid)?;
    let opened: Vec<Result<(TcpStream, BytesMut, bool)>> = stream::iter(0..conns)
        .map(|_| open(server.addr, path, deflate))
        .buffer_unordered(64)
        .collect()
        .await;
    let mut held = Vec::with_capacity(conns);
    let mut all_negotiated = true;
    for o in opened {
        let (tcp, _, negotiated) = o?;
        all_negotiated &= negotiated == deflate;
        held.push(tcp);
    }
    // Every upgrade was answered, so every connection is accepted and idle.
    let after = procfs::rss_kib(server.pid)?;
    drop(held);
    Ok((
        after.saturating_sub(before) as f64 / conns as f64,
        all_negotiated,
    ))
}

async fn run(mut args: Args) -> Result<bool> {
    let smoke = args.flag("smoke");
    let subs: usize = args.get("subs", if smoke { 20 } else { 1000 })?;
    let msgs: usize = args.get("msgs", if smoke { 20 } else { 200 })?;
    let rounds: usize = args.get("rounds", if smoke { 1 } else { 2 })?;
    let idle_conns: usize = args.get("idle", if smoke { 50 } else { 5000 })?;
    args.finish()?;

    // (label, server compression, render, client offers deflate)
    let configs = [
        ("uncompressed, shared payload", "off", "shared", false),
        ("compressed once per group send", "on", "shared", true),
        ("compressed per member", "on", "member", true),
    ];
    let mut results: Vec<Vec<Fanout>> = configs.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, (label, compression, render, deflate)) in configs.iter().enumerate() {
            let server = Server::start(compression, render).await?;
            let r = fanout(&server, subs, msgs, *deflate).await;
            server.stop().await;
            let r = r?;
            if *deflate && r.compressed_share < 1.0 {
                eprintln!(
                    "{label}: only {:.0}% of deliveries compressed",
                    r.compressed_share * 100.0
                );
                return Ok(false);
            }
            println!(
                "round {round} {label}: {:.0} deliveries/s, {:.3} µs CPU/delivery, {:.0} B/delivery on the wire",
                r.deliveries_per_s, r.cpu_us_per_delivery, r.wire_bytes_per_delivery
            );
            results[i].push(r);
        }
    }

    let med = |rs: &[Fanout], f: fn(&Fanout) -> f64| {
        median(&rs.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0)
    };
    let base_cpu = med(&results[0], |r| r.cpu_us_per_delivery);
    println!();
    println!(
        "Fan-out of a {} B JSON message to {subs} subscribers, {msgs} messages back to back, median of {rounds}:",
        message(0).len()
    );
    println!();
    println!("| server | deliveries/s | server CPU µs/delivery | vs uncompressed | bytes/delivery on the wire |");
    println!("|---|---:|---:|---:|---:|");
    for ((label, ..), rs) in configs.iter().zip(&results) {
        let cpu = med(rs, |r| r.cpu_us_per_delivery);
        println!(
            "| {label} | {:.0} | {cpu:.3} | {:.2} | {:.0} |",
            med(rs, |r| r.deliveries_per_s),
            cpu / base_cpu,
            med(rs, |r| r.wire_bytes_per_delivery)
        );
    }

    // Idle: the publisher route holds no group membership; the subscriber
    // route is a member of one group.
    println!();
    println!("| idle connections ({idle_conns}) | server RSS KiB/conn, deflate negotiated | without compression |");
    println!("|---|---:|---:|");
    let mut ok = true;
    for (label, path) in [
        ("no group", "/pub/idle"),
        ("member of one group", "/ws/idle"),
    ] {
        let mut kib = Vec::new();
        for (compression, deflate) in [("on", true), ("off", false)] {
            let server = Server::start(compression, "shared").await?;
            let r = idle(&server, path, idle_conns, deflate).await;
            server.stop().await;
            let (k, negotiated_as_expected) = r?;
            ok &= negotiated_as_expected;
            kib.push(k);
        }
        println!("| {label} | {:.2} | {:.2} |", kib[0], kib[1]);
    }
    if !ok {
        eprintln!("idle: deflate was not negotiated as expected");
        return Ok(false);
    }
    Ok(true)
}

// ----- bomb ------------------------------------------------------------------

/// A masked, compressed (RSV1) text frame: `text` deflated as
/// permessage-deflate sends it (sync flush, tail removed).
fn compressed_text_frame(text: &[u8]) -> Result<Vec<u8>> {
    let mut deflater = flate2::Compress::new(flate2::Compression::new(6), false);
    let mut out = Vec::with_capacity(text.len() / 8 + 1024);
    loop {
        let consumed = usize::try_from(deflater.total_in())?;
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity());
        }
        deflater.compress_vec(&text[consumed..], &mut out, flate2::FlushCompress::Sync)?;
        if usize::try_from(deflater.total_in())? == text.len() && out.len() < out.capacity() {
            break;
        }
    }
    out.truncate(out.len().saturating_sub(4));
    let mut frame = Frame::message(out, OpCode::Data(Data::Text), true);
    frame.header_mut().rsv1 = true;
    frame.header_mut().mask = Some([0x37, 0xfa, 0x21, 0x3d]);
    let mut bytes = Vec::with_capacity(frame.len());
    frame.format(&mut bytes)?;
    Ok(bytes)
}

/// One bomber: opens `/pub/bomb` with permessage-deflate and sends `bomb`
/// back to back; when the server closes it, reconnects (as an attacker
/// would). Returns (connections, bombs sent).
async fn bomber(addr: SocketAddr, bomb: std::sync::Arc<Vec<u8>>, until: Instant) -> (u64, u64) {
    let (mut conns, mut sent) = (0, 0);
    while Instant::now() < until {
        let Ok((tcp, _, true)) = open(addr, "/pub/bomb", true).await else {
            continue;
        };
        conns += 1;
        let (mut rd, mut wr) = tcp.into_split();
        // Drain whatever the server sends (its close frame).
        tokio::spawn(async move {
            let mut sink = [0u8; 4096];
            while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        while Instant::now() < until && wr.write_all(&bomb).await.is_ok() {
            sent += 1;
        }
    }
    (conns, sent)
}

/// A healthy pair on room `h`: the publisher sends a 100 B message every
/// 10 ms, the subscriber times each delivery. Returns the round trips (ns).
async fn healthy(addr: SocketAddr, until: Instant) -> Result<Vec<u64>> {
    let (mut sub, mut sub_buf, _) = open(addr, "/ws/h", false).await?;
    let (mut publ, _, _) = open(addr, "/pub/h", false).await?;
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(10));
    while Instant::now() < until {
        tick.tick().await;
        let text = format!("{:0100}", samples.len());
        let start = Instant::now();
        publ.write_all(&text_frame(text)?).await?;
        // One unmasked server frame with a short payload.
        loop {
            let mut cursor = Cursor::new(&sub_buf[..]);
            if let Some((header, len)) = FrameHeader::parse(&mut cursor)? {
                let head = usize::try_from(cursor.position())?;
                let len = usize::try_from(len)?;
                if sub_buf.len() >= head + len {
                    let _ = header;
                    sub_buf.advance(head + len);
                    break;
                }
            }
            if sub.read_buf(&mut sub_buf).await? == 0 {
                return err("healthy subscriber closed");
            }
        }
        samples.push(u64::try_from(start.elapsed().as_nanos())?);
    }
    Ok(samples)
}

/// Server CPU and a healthy client's latency while `bombers` clients send
/// 1 KiB messages that inflate to 1 MiB, with and without the default
/// inflate limit (alternating servers, `rounds` times).
async fn bomb(mut args: Args) -> Result<bool> {
    let bombers: usize = args.get("bombers", 4)?;
    let secs: f64 = args.get("secs", 5.0)?;
    let rounds: usize = args.get("rounds", 2)?;
    args.finish()?;
    let bomb = std::sync::Arc::new(compressed_text_frame(&vec![b' '; (1 << 20) - 64])?);
    println!(
        "bomb frame: {} B on the wire, {} B inflated",
        bomb.len(),
        (1 << 20) - 64
    );
    let configs = [
        ("no bombers", "on", 0),
        ("bombers, inflate limit off", "off", bombers),
        ("bombers, default inflate limit", "on", bombers),
    ];
    let ticks = procfs::clock_ticks_per_sec();
    println!("| round | case | server CPU (cores) | healthy p50 ms | healthy p99 ms | bomber connections | bombs sent |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for round in 0..rounds {
        for (label, limit, n) in configs {
            let server = Server::start_with(&["--inflate-limit", limit]).await?;
            let cpu = procfs::CpuMeter::start(&[server.pid], ticks)?;
            let until = Instant::now() + std::time::Duration::from_secs_f64(secs);
            let tasks: Vec<_> = (0..n)
                .map(|_| tokio::spawn(bomber(server.addr, bomb.clone(), until)))
                .collect();
            let mut samples = healthy(server.addr, until).await?;
            let (mut conns, mut sent) = (0, 0);
            for t in tasks {
                let (c, s) = t.await?;
                conns += c;
                sent += s;
            }
            let cores = cpu.elapsed_us()? as f64 / 1e6 / secs;
            server.stop().await;
            let summary = tower_channels_bench::Summary::of(&mut samples);
            println!(
                "| {round} | {label} | {cores:.2} | {:.2} | {:.2} | {conns} | {sent} |",
                summary.p50_us / 1e3,
                summary.p99_us / 1e3
            );
        }
    }
    Ok(true)
}

// ----- stall -----------------------------------------------------------------

/// What never-reading clients cost: `clients` connections to `/echo` that
/// send `size`-byte messages at `rate` a second each for `secs` and never
/// read (4 KiB receive buffers), so each one's echoes queue on the server.
/// Reports the server's RSS at start, its peak, once every client is closed
/// (4008) and gone, and 5 s later.
async fn stall(mut args: Args) -> Result<bool> {
    let clients: usize = args.get("clients", 20)?;
    let size: usize = args.get("size", 512 << 10)?;
    let rate: f64 = args.get("rate", 20.0)?;
    let secs: f64 = args.get("secs", 8.0)?;
    args.finish()?;
    let server = Server::start_with(&["--compression", "off"]).await?;
    let rss = || procfs::rss_kib(server.pid);
    let start = rss()?;
    let fds_before = procfs::fd_count(server.pid)?;
    let frame = std::sync::Arc::new(text_frame("x".repeat(size))?);
    let until = Instant::now() + std::time::Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(4096)?;
        let mut tcp = socket.connect(server.addr).await?;
        let key = tungstenite::handshake::client::generate_key();
        let request = format!(
            "GET /echo HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            server.addr
        );
        tcp.write_all(request.as_bytes()).await?;
        let frame = frame.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs_f64(1.0 / rate));
            let mut sent = 0u64;
            while Instant::now() < until {
                tick.tick().await;
                // The server stops reading once it closed us: stop too.
                match tokio::time::timeout(std::time::Duration::from_secs(1), tcp.write_all(&frame))
                    .await
                {
                    Ok(Ok(())) => sent += 1,
                    _ => break,
                }
            }
            (tcp, sent)
        }));
    }
    let mut peak = start;
    while Instant::now() < until {
        peak = peak.max(rss()?);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut held = Vec::new();
    let mut sent = 0;
    for t in tasks {
        let (tcp, n) = t.await?;
        held.push(tcp);
        sent += n;
    }
    // Every client is closed 4008 and dropped after close_timeout (it does
    // not read its close frame): wait until the server's descriptors are
    // back, sampling the peak.
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    while procfs::fd_count(server.pid)? > fds_before && Instant::now() < deadline {
        peak = peak.max(rss()?);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let gone = rss()?;
    drop(held);
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let later = rss()?;
    server.stop().await;
    println!(
        "| {clients} | {} KiB | {sent} | {start} | {peak} | {:.0} | {gone} | {later} |",
        size >> 10,
        (peak.saturating_sub(start)) as f64 / clients as f64
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_a_kib_of_json_with_their_seq() {
        for seq in [0, 1, 77, 199, 5000] {
            let m = message(seq);
            assert!((1000..1100).contains(&m.len()), "{}", m.len());
            let v: serde_json::Value = serde_json::from_str(&m).unwrap();
            assert_eq!(v["seq"], seq);
            assert_eq!(seq_of(&m), Some(seq));
        }
        assert_ne!(message(1), message(2));
    }
}
