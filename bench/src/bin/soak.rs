//! A bounded soak of the chat example on Redis: two chat processes sharing
//! a room through their own `redis-server` (on a free port), steady members
//! counting every delivery, a publisher (every `--large-every`th message is
//! 256 KiB), connection churn, members that never read, and a Redis restart
//! halfway through.
//!
//! ```text
//! bench/soak.sh [--secs 60] [--steady 40] [--slow 4] [--rate 20] [--churn 20] [--large-every 25]
//! soak --chat-bin target/release/examples/chat [same options]
//! ```
//!
//! A send is *answered OK* when the publisher (a room member itself)
//! receives its own message back through the room; a refused one is answered
//! `{"type":"error","error":"temporarily unavailable"}` (Redis down: not a
//! loss). Reports, per steady member that stayed connected, the answered-OK
//! sequence numbers it did not receive (summed: deliveries lost) and the ones
//! it received more than once (duplicates); healthy sockets closed; sends
//! neither answered OK nor refused; how each never-reading member ended (its
//! socket is drained after the run, as a real client would read it: close
//! code 4008 expected); churned connections; and the chat processes' summed
//! RSS at start, peak and 5 s after every client is gone. Exits non-zero if
//! a delivery was lost, duplicated, or a healthy socket closed.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    process::{ExitCode, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use tokio::{
    net::{TcpListener, TcpStream},
    process::{Child, Command},
};
use tokio_tungstenite::{tungstenite::Message, WebSocketStream};
use tower_channels_bench::{err, procfs, spawn_listening, Args, Result};

#[tokio::main]
async fn main() -> ExitCode {
    match Args::parse(std::env::args().skip(1), &[]) {
        Ok(args) => match soak(args).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("soak: error: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port())
}

async fn start_redis(bin: &str, port: u16) -> Result<Child> {
    let child = Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            return err("redis-server did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(child)
}

async fn start_chat(bin: &str, redis: &str) -> Result<(Child, SocketAddr, u32)> {
    let mut cmd = Command::new(bin);
    cmd.args(["--addr", "127.0.0.1:0", "--redis", redis])
        .env("RUST_LOG", "error");
    spawn_listening(cmd).await
}

/// The sequence number of a chat frame carrying `soak-<seq>-...`.
fn seq_of(frame: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(frame).ok()?;
    let m = v.get("message")?.as_str()?;
    m.strip_prefix("soak-")?.split('-').next()?.parse().ok()
}

/// What a steady member saw: how often it received each sequence number, and
/// whether its socket was closed before the end.
struct Seen {
    got: BTreeMap<u64, u32>,
    closed: bool,
}

/// Receptions beyond the first, over all sequence numbers in `counts`.
fn extra_copies(counts: &BTreeMap<u64, u32>) -> u64 {
    counts
        .values()
        .map(|&n| u64::from(n.saturating_sub(1)))
        .sum()
}

/// A steady member: counts every sequence number it receives until `stop`.
async fn member(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    joined: tokio::sync::mpsc::Sender<()>,
) -> Result<Seen> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/chat/soak")).await?;
    // The chat consumer joins the room before it accepts: joined now.
    let _ = joined.send(()).await;
    let mut got = BTreeMap::new();
    loop {
        let next = tokio::time::timeout(Duration::from_millis(200), ws.next()).await;
        if stop.load(Ordering::Relaxed) {
            let _ = ws.close(None).await;
            return Ok(Seen { got, closed: false });
        }
        match next {
            Err(_) => {}
            Ok(Some(Ok(Message::Text(t)))) => {
                if let Some(seq) = seq_of(&t) {
                    *got.entry(seq).or_insert(0) += 1;
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => return Ok(Seen { got, closed: true }),
        }
    }
}

type Ws = WebSocketStream<TcpStream>;

/// The close code of a client that does not read fast enough.
const SLOW_CLIENT: u16 = 4008;

/// A member that never reads after its handshake (4 KiB receive buffer): the
/// server should close it 4008 once it falls behind.
async fn slow_reader(addr: SocketAddr) -> Result<Ws> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let tcp = socket.connect(addr).await?;
    let url = format!("ws://{addr}/ws/chat/soak");
    let (ws, _) = tokio_tungstenite::client_async(url, tcp).await?;
    Ok(ws)
}

/// How a never-reading member's connection ended, read after the run.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum SlowEnd {
    /// A close frame with this code arrived.
    Close(u16),
    /// The stream ended or failed without a close frame.
    NoClose(String),
    /// Still open after the drain's time limit.
    Open,
}

/// Drains a never-reading member's socket (every queued message, then the
/// close frame, as a client that reads late would see it), for at most
/// `limit`.
async fn drain_slow(mut ws: Ws, limit: Duration) -> SlowEnd {
    let read = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => {
                    return SlowEnd::Close(frame.map_or(1005, |f| u16::from(f.code)));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return SlowEnd::NoClose(e.to_string()),
                None => return SlowEnd::NoClose("end of stream".to_owned()),
            }
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .unwrap_or(SlowEnd::Open)
}

/// Opens and closes connections to `churn-N` rooms at `rate` a second,
/// each sending one message; counts (opened, failed).
async fn churn(addrs: [SocketAddr; 2], rate: f64, stop: Arc<AtomicBool>) -> (u64, u64) {
    let (mut opened, mut failed) = (0, 0);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        i += 1;
        let url = format!("ws://{}/ws/chat/churn-{}", addrs[(i % 2) as usize], i % 10);
        let ok = async {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.ok()?;
            ws.send(Message::text(r#"{"message":"churn"}"#))
                .await
                .ok()?;
            ws.close(None).await.ok()
        };
        match tokio::time::timeout(Duration::from_secs(5), ok).await {
            Ok(Some(())) => opened += 1,
            _ => failed += 1,
        }
    }
    (opened, failed)
}

async fn soak(mut args: Args) -> Result<bool> {
    let secs: f64 = args.get("secs", 60.0)?;
    let steady: usize = args.get("steady", 40)?;
    let slow: usize = args.get("slow", 4)?;
    let rate: f64 = args.get("rate", 20.0)?;
    let churn_rate: f64 = args.get("churn", 20.0)?;
    let large_every: u64 = args.get("large-every", 25)?;
    let chat_bin: String = args.get("chat-bin", "target/release/examples/chat".to_owned())?;
    let redis_bin: String = args.get("redis-server", "redis-server".to_owned())?;
    args.finish()?;

    let port = free_port().await?;
    let redis_url = format!("redis://127.0.0.1:{port}");
    let mut redis = start_redis(&redis_bin, port).await?;
    let (_a, addr_a, pid_a) = start_chat(&chat_bin, &redis_url).await?;
    let (_b, addr_b, pid_b) = start_chat(&chat_bin, &redis_url).await?;
    let rss = || -> Result<u64> { Ok(procfs::rss_kib(pid_a)? + procfs::rss_kib(pid_b)?) };
    let rss_start = rss()?;

    let stop = Arc::new(AtomicBool::new(false));
    let mut members = Vec::new();
    let (joined_tx, mut joined) = tokio::sync::mpsc::channel(steady.max(1));
    for i in 0..steady {
        let addr = if i % 2 == 0 { addr_a } else { addr_b };
        members.push(tokio::spawn(member(addr, stop.clone(), joined_tx.clone())));
    }
    drop(joined_tx);
    for _ in 0..steady {
        if joined.recv().await.is_none() {
            return err("a steady member failed to connect");
        }
    }
    let mut slow_conns = Vec::new();
    for i in 0..slow {
        slow_conns.push(slow_reader(if i % 2 == 0 { addr_a } else { addr_b }).await?);
    }
    let churner = tokio::spawn(churn([addr_a, addr_b], churn_rate, stop.clone()));

    let (mut publisher, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr_a}/ws/chat/soak")).await?;
    let refused = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(secs);
    let restart_at = started + Duration::from_secs_f64(secs / 2.0);
    let mut restarted = false;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut seq = 0u64;
    let mut peak = rss_start;
    // Sends answered OK: the publisher's own copies, with how often each came.
    let mut accepted = BTreeMap::new();
    while Instant::now() < until {
        tick.tick().await;
        if !restarted && Instant::now() >= restart_at {
            restarted = true;
            let _ = redis.kill().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            redis = start_redis(&redis_bin, port).await?;
        }
        let pad = if large_every > 0 && seq % large_every == large_every - 1 {
            256 << 10
        } else {
            100
        };
        let text = serde_json::json!({ "message": format!("soak-{seq}-{}", "x".repeat(pad)) });
        publisher.send(Message::text(text.to_string())).await?;
        seq += 1;
        // The publisher is a member too: take what arrived meanwhile.
        while let Ok(Some(Ok(msg))) =
            tokio::time::timeout(Duration::from_millis(1), publisher.next()).await
        {
            if let Message::Text(t) = msg {
                if t.contains("temporarily unavailable") {
                    refused.fetch_add(1, Ordering::Relaxed);
                } else if let Some(s) = seq_of(&t) {
                    *accepted.entry(s).or_insert(0u32) += 1;
                }
            }
        }
        peak = peak.max(rss()?);
    }
    // Deliveries in flight arrive.
    let drain_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < drain_until {
        if let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_millis(100), publisher.next()).await
        {
            if t.contains("temporarily unavailable") {
                refused.fetch_add(1, Ordering::Relaxed);
            } else if let Some(s) = seq_of(&t) {
                *accepted.entry(s).or_insert(0u32) += 1;
            }
        }
        peak = peak.max(rss()?);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = publisher.close(None).await;
    // The never-reading members read now, all at once.
    let slow_ends: Vec<_> = slow_conns
        .into_iter()
        .map(|ws| tokio::spawn(drain_slow(ws, Duration::from_secs(10))))
        .collect();
    let mut results = Vec::new();
    for m in members {
        results.push(m.await??);
    }
    let (churned, churn_failed) = churner.await?;
    let mut slow_counts: BTreeMap<SlowEnd, usize> = BTreeMap::new();
    for end in slow_ends {
        *slow_counts.entry(end.await?).or_default() += 1;
    }
    let slow_4008 = slow_counts
        .get(&SlowEnd::Close(SLOW_CLIENT))
        .copied()
        .unwrap_or(0);
    let slow_other: Vec<String> = slow_counts
        .iter()
        .filter(|(end, _)| **end != SlowEnd::Close(SLOW_CLIENT))
        .map(|(end, n)| format!("{n} x {end:?}"))
        .collect();

    let refused = refused.load(Ordering::Relaxed);
    let answered: BTreeSet<u64> = accepted.keys().copied().collect();
    let healthy = results.iter().filter(|m| !m.closed);
    let healthy_closed = results.iter().filter(|m| m.closed).count();
    // Per member: answered-OK sends it did not receive.
    let lost: usize = healthy
        .clone()
        .map(|m| answered.iter().filter(|s| !m.got.contains_key(s)).count())
        .sum();
    let duplicates: u64 =
        results.iter().map(|m| extra_copies(&m.got)).sum::<u64>() + extra_copies(&accepted);
    // Received by a member although the publisher never got its own copy.
    let unconfirmed: BTreeSet<u64> = healthy
        .flat_map(|m| m.got.keys().copied())
        .filter(|s| !answered.contains(s))
        .collect();
    let unanswered = seq.saturating_sub(answered.len() as u64 + refused);
    let deliveries: u64 = results
        .iter()
        .flat_map(|m| m.got.values())
        .map(|&n| u64::from(n))
        .sum();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_after = rss()?;
    println!(
        "soak {secs} s: {seq} published ({} answered OK, {refused} refused while Redis restarted, \
         {unanswered} neither), {steady} steady members on 2 processes, {slow} never-reading members, \
         {churned} churned connections ({churn_failed} failed)",
        answered.len(),
    );
    println!(
        "deliveries {deliveries}, lost {lost} (per member, of the sends answered OK), \
         duplicates {duplicates}, received but not answered OK {}; healthy sockets closed {healthy_closed}; \
         never-reading members closed 4008: {slow_4008} of {slow}{}",
        unconfirmed.len(),
        if slow_other.is_empty() {
            String::new()
        } else {
            format!(" (others: {})", slow_other.join(", "))
        }
    );
    println!(
        "RSS of the two processes: start {rss_start} KiB, peak {peak} KiB, 5 s after {rss_after} KiB"
    );
    Ok(lost == 0 && duplicates == 0 && healthy_closed == 0)
}
