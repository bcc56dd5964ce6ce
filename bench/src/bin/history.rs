//! What history and presence cost on the channel layers.
//!
//! ```text
//! cargo run --release -p tower-channels-bench --bin history -- [--redis URL]
//!     [--redis-cluster URL,URL,...] [--nats URL]
//!     [--members 100] [--sends 100000] [--redis-sends 10000] [--presence 10000] [--rounds 3]
//! ```
//!
//! * **Group send with history vs without**: `--members` channels of this
//!   process join a group, each drained by its own task; `--sends` group
//!   sends go out one after the other and the run ends when every member
//!   received every event. Reported: this process's CPU time (user +
//!   system, from `/proc/self/stat`) per delivery, and for Redis also the
//!   Redis server's CPU (`INFO cpu`) per send. Plain and history groups
//!   alternate over `--rounds`; the table shows medians.
//! * **Presence listing**: `--presence` channels join one group with
//!   presence (on Redis from two layer instances, i.e. two processes),
//!   then `presence()` is timed 20 times: median and maximum; then a tenth
//!   of the connections (at most 1000) leave one after the other (cost per
//!   leave), and every layer is flushed (teardown time).
//!
//! Each broker given is measured too (`--redis-sends` sends on each); the
//! broker's own CPU is read for a single Redis only. Without a broker only
//! the in-memory layer is measured.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;
use tower_channels::channel_layer::{
    nats::NatsChannelLayer,
    redis::{RedisChannelLayer, RedisClusterChannelLayer},
    ChannelLayer, Event, GroupPattern, HistoryPolicy, InMemoryChannelLayer, PresenceConfig,
    PresenceInfo,
};

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    redis: Option<String>,
    redis_cluster: Option<String>,
    nats: Option<String>,
    members: usize,
    sends: usize,
    redis_sends: usize,
    presence: usize,
    rounds: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        redis: None,
        redis_cluster: None,
        nats: None,
        members: 100,
        sends: 100_000,
        redis_sends: 10_000,
        presence: 10_000,
        rounds: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<usize>().map_err(|e| format!("{flag} {v:?}: {e}"));
        match flag.as_str() {
            "--redis" => args.redis = Some(value()?),
            "--redis-cluster" => args.redis_cluster = Some(value()?),
            "--nats" => args.nats = Some(value()?),
            "--members" => args.members = number(value()?)?.max(1),
            "--sends" => args.sends = number(value()?)?.max(1),
            "--redis-sends" => args.redis_sends = number(value()?)?.max(1),
            "--presence" => args.presence = number(value()?)?.max(1),
            "--rounds" => args.rounds = number(value()?)?.max(1),
            other => {
                return Err(format!(
                    "unknown argument {other:?} (see the source header)"
                ))
            }
        }
    }
    Ok(args)
}

/// CPU time (user + system) of this process, from `/proc/self/stat`.
fn cpu_now() -> Duration {
    let ticks_per_sec: u64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100);
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    Duration::from_micros(ticks * 1_000_000 / ticks_per_sec)
}

/// `used_cpu_user + used_cpu_sys` of the Redis server.
async fn redis_cpu(conn: &mut redis::aio::MultiplexedConnection) -> Result<Duration, Error> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(conn).await?;
    let mut secs = 0.0;
    for line in info.lines() {
        if let Some(v) = line
            .strip_prefix("used_cpu_user:")
            .or_else(|| line.strip_prefix("used_cpu_sys:"))
        {
            secs += v.trim().parse::<f64>()?;
        }
    }
    Ok(Duration::from_secs_f64(secs))
}

struct SendFigures {
    cpu_per_delivery_ns: f64,
    wall_per_send_us: f64,
    redis_cpu_per_send_us: Option<f64>,
}

/// `sends` group sends to `group`, every one received by all `members`.
async fn measure_sends(
    layer: &Arc<dyn ChannelLayer>,
    group: &str,
    members: usize,
    sends: usize,
    redis: Option<&mut redis::aio::MultiplexedConnection>,
) -> Result<SendFigures, Error> {
    let received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let total = (members * sends) as u64;
    let mut tasks = Vec::new();
    for _ in 0..members {
        let mut rx = layer.new_channel().await?;
        layer.group_add(group, rx.name()).await?;
        let (received, done) = (received.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = 0;
            while mine < sends {
                if rx.recv().await.is_err() {
                    break;
                }
                mine += 1;
                if received.fetch_add(1, Ordering::Relaxed) + 1 == total {
                    done.notify_one();
                }
            }
            mine
        }));
    }
    let mut redis = redis;
    let redis_before = match redis.as_deref_mut() {
        Some(c) => Some(redis_cpu(c).await?),
        None => None,
    };
    let cpu_before = cpu_now();
    let started = Instant::now();
    let all_done = done.notified();
    tokio::pin!(all_done);
    all_done.as_mut().enable();
    for n in 0..sends {
        layer
            .group_send(
                group,
                Event::text("bench", format!("{{\"message\":\"{n}\"}}")),
            )
            .await?;
    }
    if received.load(Ordering::Relaxed) < total {
        tokio::time::timeout(Duration::from_secs(120), all_done)
            .await
            .map_err(|_| "members did not receive every event in 120 s")?;
    }
    let wall = started.elapsed();
    let cpu = cpu_now().saturating_sub(cpu_before);
    let redis_cpu_per_send_us = match (redis, redis_before) {
        (Some(c), Some(before)) => {
            Some(redis_cpu(c).await?.saturating_sub(before).as_secs_f64() * 1e6 / sends as f64)
        }
        _ => None,
    };
    for task in tasks {
        let got = task.await?;
        if got != sends {
            return Err(format!("a member received {got} of {sends} events (lagged)").into());
        }
    }
    Ok(SendFigures {
        cpu_per_delivery_ns: cpu.as_nanos() as f64 / total as f64,
        wall_per_send_us: wall.as_secs_f64() * 1e6 / sends as f64,
        redis_cpu_per_send_us,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Alternates plain and history groups over `rounds`; prints one table row each.
async fn send_rows(
    name: &str,
    layer: Arc<dyn ChannelLayer>,
    args: &Args,
    sends: usize,
    mut redis: Option<redis::aio::MultiplexedConnection>,
) -> Result<(), Error> {
    let mut figures: [Vec<SendFigures>; 2] = [Vec::new(), Vec::new()];
    for round in 0..args.rounds {
        for (i, prefix) in ["plain", "hist"].into_iter().enumerate() {
            let group = format!("{prefix}.r{round}");
            let f = measure_sends(&layer, &group, args.members, sends, redis.as_mut()).await?;
            figures[i].push(f);
        }
    }
    let mut base = 0.0;
    for (i, label) in ["without history", "with history"].into_iter().enumerate() {
        let fs = &figures[i];
        let cpu = median(fs.iter().map(|f| f.cpu_per_delivery_ns).collect());
        let wall = median(fs.iter().map(|f| f.wall_per_send_us).collect());
        let redis_cpu = fs
            .iter()
            .map(|f| f.redis_cpu_per_send_us)
            .collect::<Option<Vec<_>>>()
            .map(|v| format!("{:.1}", median(v)))
            .unwrap_or_else(|| "–".into());
        if i == 0 {
            base = cpu;
        }
        // CPU time is read in clock ticks: tiny runs may measure none.
        let ratio = if base > 0.0 {
            format!("{:.2}×", cpu / base)
        } else {
            "–".into()
        };
        println!(
            "| {name} | {label} | {} × {sends} | {cpu:.0} | {ratio} | {wall:.1} | {redis_cpu} |",
            args.members
        );
    }
    Ok(())
}

async fn presence_row(
    name: &str,
    layers: &[Arc<dyn ChannelLayer>],
    members: usize,
) -> Result<(), Error> {
    let group = "presence.big";
    let mut keep = Vec::with_capacity(members);
    let joining = Instant::now();
    for i in 0..members {
        let layer = &layers[i % layers.len()];
        let rx = layer.new_channel().await?;
        let info = PresenceInfo::new(format!("user{}", i / 2))?;
        layer.presence_join(group, rx.name(), info).await?;
        keep.push(rx);
    }
    let join_us = joining.elapsed().as_secs_f64() * 1e6 / members as f64;
    let mut times = Vec::new();
    let mut users = 0;
    for _ in 0..20 {
        let started = Instant::now();
        let listed = layers[0].presence(group).await?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
        users = listed.len();
    }
    if users != members.div_ceil(2) {
        return Err(format!(
            "presence listed {users} users, expected {}",
            members.div_ceil(2)
        )
        .into());
    }
    let max = times.iter().copied().fold(0.0, f64::max);
    // Leaves of a sample of the connections, one after the other.
    let sample = (members / 10).clamp(1, 1000);
    let leaving = Instant::now();
    for (i, rx) in keep.iter().enumerate().take(sample) {
        layers[i % layers.len()]
            .group_discard(group, rx.name())
            .await?;
    }
    let leave_us = leaving.elapsed().as_secs_f64() * 1e6 / sample as f64;
    // Flush before the receivers go: dropped receivers would leave one
    // by one.
    let teardown = Instant::now();
    for layer in layers {
        layer.flush().await?;
    }
    drop(keep);
    println!(
        "| {name} | {members} connections ({users} users, {} process(es)) | {:.1} ms | {max:.1} ms | {join_us:.0} µs | {leave_us:.0} µs | {:.1} s |",
        layers.len(),
        median(times),
        teardown.elapsed().as_secs_f64()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let policy = || HistoryPolicy::new(GroupPattern::prefix("hist."));
    println!("Group send, {} rounds (medians):\n", args.rounds);
    println!("| layer | group | members × sends | this process's CPU per delivery (ns) | vs without | wall per send (µs) | Redis CPU per send (µs) |");
    println!("|---|---|---|---|---|---|---|");
    let memory: Arc<dyn ChannelLayer> =
        Arc::new(InMemoryChannelLayer::with_capacity(args.sends + 1).with_history(policy()));
    send_rows("in-memory", memory, &args, args.sends, None).await?;
    let prefix = format!("bench-history-{}", std::process::id());
    if let Some(url) = &args.redis {
        let redis_layer = || {
            RedisChannelLayer::builder(url.as_str())
                .prefix(&prefix)
                .capacity(args.redis_sends + 1)
                .history(policy())
                .build()
        };
        let layer: Arc<dyn ChannelLayer> = Arc::new(redis_layer().await?);
        let conn = redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        send_rows("Redis", layer.clone(), &args, args.redis_sends, Some(conn)).await?;
        layer.flush().await?;
    }
    if let Some(urls) = &args.redis_cluster {
        let layer: Arc<dyn ChannelLayer> = Arc::new(
            RedisClusterChannelLayer::builder(urls.split(','))
                .prefix(&prefix)
                .capacity(args.redis_sends + 1)
                .history(policy())
                .build()
                .await?,
        );
        send_rows(
            "Redis Cluster",
            layer.clone(),
            &args,
            args.redis_sends,
            None,
        )
        .await?;
        layer.flush().await?;
    }
    if let Some(url) = &args.nats {
        let layer: Arc<dyn ChannelLayer> = Arc::new(
            NatsChannelLayer::builder(url.as_str())
                .prefix(&prefix)
                .capacity(args.redis_sends + 1)
                .history(policy())
                .build()
                .await?,
        );
        send_rows("NATS", layer.clone(), &args, args.redis_sends, None).await?;
        layer.flush().await?;
    }

    println!("\nPresence listing (20 calls):\n");
    println!("| layer | group | median | max | join (per connection) | leave (per connection, {} sampled) | teardown (flush) |", (args.presence / 10).clamp(1, 1000));
    println!("|---|---|---|---|---|---|---|");
    let memory: Arc<dyn ChannelLayer> = Arc::new(InMemoryChannelLayer::new());
    presence_row("in-memory", &[memory], args.presence).await?;
    if let Some(url) = &args.redis {
        let build = || {
            RedisChannelLayer::builder(url.as_str())
                .prefix(&prefix)
                .build()
        };
        let a: Arc<dyn ChannelLayer> = Arc::new(build().await?);
        let b: Arc<dyn ChannelLayer> = Arc::new(build().await?);
        presence_row("Redis", &[a, b], args.presence).await?;
    }
    if let Some(urls) = &args.redis_cluster {
        let build = || {
            RedisClusterChannelLayer::builder(urls.split(','))
                .prefix(&prefix)
                .presence(PresenceConfig::new())
                .build()
        };
        let a: Arc<dyn ChannelLayer> = Arc::new(build().await?);
        let b: Arc<dyn ChannelLayer> = Arc::new(build().await?);
        presence_row("Redis Cluster", &[a, b], args.presence).await?;
    }
    if let Some(url) = &args.nats {
        let build = || {
            NatsChannelLayer::builder(url.as_str())
                .prefix(&prefix)
                .presence(PresenceConfig::new())
                .build()
        };
        let a: Arc<dyn ChannelLayer> = Arc::new(build().await?);
        let b: Arc<dyn ChannelLayer> = Arc::new(build().await?);
        presence_row("NATS", &[a, b], args.presence).await?;
    }
    Ok(())
}
