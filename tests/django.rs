//! The `django` channel layers against a real Django Channels app: the
//! tutorial chat app in `tests/django/` served by daphne, with
//! channels_redis' core or pubsub layer, and real Redis.
//!
//! Needs `python3` with Django, channels, channels_redis and daphne (see
//! `.ci/setup.sh`) and Redis at `REDIS_URL` (default
//! `redis://127.0.0.1:6379`). Without Django the tests print `skipped: ...`
//! unless `TOWER_CHANNELS_REQUIRE_DJANGO=1`; without Redis, unless
//! `TOWER_CHANNELS_REQUIRE_REDIS=1`. Every test uses its own key prefix, so
//! tests share one Redis server safely; the two-host and restart tests start
//! their own `redis-server` on a free port.
#![cfg(feature = "django")]

mod common;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::{
    connect,
    layers::free_port,
    next_text,
    redis_server::{answers, RedisServer},
    spawn_example_with, within, Client,
};
use futures_util::SinkExt;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tower_channels::channel_layer::{
    django::{DjangoChannelLayer, DjangoConfig, DjangoPubSubChannelLayer},
    ChannelLayer, ChannelLayerError, ChannelReceiver, Event,
};
use tower_channels::testing::conformance::Suite;

/// The tutorial's event body: `{"type": "chat.message", "message": ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ChatMessage {
    message: String,
}

fn chat(message: &str) -> Event {
    Event::new(
        "chat.message",
        ChatMessage {
            message: message.to_owned(),
        },
    )
}

// ------------------------------------------------------------ environment

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// Redis and Django, or `None` after printing `skipped: ...`.
async fn env() -> Option<String> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    if !answers(&url).await {
        if required("TOWER_CHANNELS_REQUIRE_REDIS") || required("TOWER_CHANNELS_REQUIRE_DJANGO") {
            panic!("no Redis at {url} (TOWER_CHANNELS_REQUIRE_REDIS/DJANGO=1)");
        }
        println!("skipped: no Redis at {url}");
        return None;
    }
    let probe = Command::new("python3")
        .args(["-c", "import django, channels, channels_redis, daphne"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        if required("TOWER_CHANNELS_REQUIRE_DJANGO") {
            panic!("python3 cannot import django, channels, channels_redis and daphne (TOWER_CHANNELS_REQUIRE_DJANGO=1); run .ci/setup.sh");
        }
        println!(
            "skipped: python3 with Django, channels, channels_redis and daphne is not installed"
        );
        return None;
    }
    Some(url)
}

fn unique_prefix(test: &str) -> String {
    // Ends in '.': pubsub channel names start with the prefix.
    format!("tcdj-{test}-{}.", common::layers::unique_suffix())
}

fn app_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/django")
}

/// How the Django side is configured (environment of daphne and `layer.py`).
#[derive(Clone)]
struct Django {
    backend: &'static str,
    hosts: Vec<String>,
    prefix: String,
    extra: Vec<(&'static str, String)>,
}

impl Django {
    fn new(backend: &'static str, url: &str, prefix: &str) -> Self {
        Django {
            backend,
            hosts: vec![url.to_owned()],
            prefix: prefix.to_owned(),
            extra: Vec::new(),
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(app_dir())
            .env("DJANGO_SETTINGS_MODULE", "mysite.settings")
            .env("CHANNELS_BACKEND", self.backend)
            .env("CHANNELS_HOSTS", self.hosts.join(","))
            .env("CHANNELS_PREFIX", &self.prefix)
            .envs(self.extra.iter().map(|(k, v)| (*k, v.as_str())));
        cmd
    }

    /// Starts daphne on a free port and waits until it accepts connections.
    async fn serve(&self) -> Daphne {
        let port = free_port();
        let child = self
            .command("python3")
            .args([
                "-m",
                "daphne",
                "-v",
                "0",
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .arg("mysite.asgi:application")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn daphne");
        let daphne = Daphne {
            child,
            addr: ([127, 0, 0, 1], port).into(),
        };
        // Process start-up (importing Django takes a second), not event
        // synchronization: poll the port with a deadline.
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(daphne.addr).await.is_err() {
            assert!(Instant::now() < deadline, "daphne did not start on {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        daphne
    }

    /// Runs `layer.py` with `args` and returns its stdout lines.
    async fn layer_py(&self, args: &[&str]) -> Vec<String> {
        let mut cmd = tokio::process::Command::from(self.command("python3"));
        cmd.arg("layer.py").args(args).stderr(Stdio::inherit());
        let out = within("layer.py", cmd.output())
            .await
            .expect("run layer.py");
        assert!(out.status.success(), "layer.py {args:?} failed: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// A daphne process serving the Django app; killed when dropped.
struct Daphne {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Daphne {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis")
}

async fn recv(rx: &mut ChannelReceiver) -> Event {
    within(&format!("an event on {}", rx.name()), rx.recv())
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", rx.name()))
}

async fn say(ws: &mut Client, message: &str) {
    let text = serde_json::json!({ "message": message }).to_string();
    ws.send(WsMessage::text(text)).await.expect("send");
}

async fn heard(ws: &mut Client) -> String {
    let text = next_text(ws).await;
    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON from the chat");
    v["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message in {text}"))
        .to_owned()
}

// ------------------------------------------------------------ shared rooms

/// The chat example (`--django` or `--django-pubsub`) and the Django
/// tutorial app serve one room: each side sees the other's messages, and a
/// `group_send` from plain Python reaches both.
async fn room_is_shared(backend: &'static str, flag: &str) {
    let Some(url) = env().await else { return };
    let prefix = unique_prefix(backend);
    let django = Django::new(backend, &url, &prefix);
    let daphne = django.serve().await;
    let (_rust, rust_addr) = spawn_example_with("chat", &[flag, &url, "--prefix", &prefix]);

    let room = "lobby";
    let mut on_django = connect(daphne.addr, &format!("/ws/chat/{room}/")).await;
    let mut on_rust = connect(rust_addr, &format!("/ws/chat/{room}")).await;
    // Both joined before their handshakes were answered (Django's
    // consumer awaits group_add before accept; so does the Rust one).

    say(&mut on_django, "from django").await;
    assert_eq!(heard(&mut on_django).await, "from django");
    assert_eq!(heard(&mut on_rust).await, "from django");

    say(&mut on_rust, "from rust").await;
    assert_eq!(heard(&mut on_rust).await, "from rust");
    assert_eq!(heard(&mut on_django).await, "from rust");

    // A view or Celery task: plain Python, outside any consumer.
    let out = django
        .layer_py(&["group_send", "chat_lobby", "from a view"])
        .await;
    assert_eq!(out, ["sent 1"]);
    assert_eq!(heard(&mut on_rust).await, "from a view");
    assert_eq!(heard(&mut on_django).await, "from a view");

    // Another room hears nothing of this one: its first message is its own.
    let mut elsewhere = connect(rust_addr, "/ws/chat/elsewhere").await;
    say(&mut elsewhere, "other room").await;
    assert_eq!(heard(&mut elsewhere).await, "other room");
}

#[tokio::test]
async fn core_room_is_shared_with_django() {
    room_is_shared("core", "--django").await;
}

#[tokio::test]
async fn pubsub_room_is_shared_with_django() {
    room_is_shared("pubsub", "--django-pubsub").await;
}

// ------------------------------------------------- send to a Django consumer

async fn rust_send_reaches_django_consumer(backend: &'static str) {
    let Some(url) = env().await else { return };
    let prefix = unique_prefix(backend);
    let django = Django::new(backend, &url, &prefix);
    let daphne = django.serve().await;
    let config = DjangoConfig::new([url.as_str()]).prefix(&prefix);
    let layer: Arc<dyn ChannelLayer> = match backend {
        "core" => Arc::new(DjangoChannelLayer::connect(&config).await.expect("connect")),
        _ => Arc::new(
            DjangoPubSubChannelLayer::connect(&config)
                .await
                .expect("connect"),
        ),
    };

    let mut inbox = connect(daphne.addr, "/ws/inbox/").await;
    let hello: serde_json::Value = serde_json::from_str(&next_text(&mut inbox).await).unwrap();
    let name = hello["channel_name"].as_str().expect("channel_name");

    layer.send(name, chat("direct ✓")).await.expect("send");
    let got: serde_json::Value = serde_json::from_str(&next_text(&mut inbox).await).unwrap();
    // Exactly the dict a Django sender would have sent (msgpack str, not
    // bin, or json.dumps would have failed in the consumer).
    assert_eq!(
        got["event"],
        serde_json::json!({"type": "chat.message", "message": "direct ✓"})
    );

    // A fast-lane event has no dict form: a clear error, nothing sent.
    match layer.send(name, Event::text("chat.message", "{}")).await {
        Err(ChannelLayerError::Codec(e)) => {
            assert!(e.to_string().contains("no dict form"), "{e}")
        }
        other => panic!("expected a codec error, got {other:?}"),
    }
    layer.send(name, chat("after")).await.expect("send");
    let got: serde_json::Value = serde_json::from_str(&next_text(&mut inbox).await).unwrap();
    assert_eq!(got["event"]["message"], "after");
}

#[tokio::test]
async fn core_send_reaches_a_django_consumer() {
    rust_send_reaches_django_consumer("core").await;
}

#[tokio::test]
async fn pubsub_send_reaches_a_django_consumer() {
    rust_send_reaches_django_consumer("pubsub").await;
}

// --------------------------------------------------------------- expiry

/// Memberships of live Rust channels are re-added within `group_expiry`, so
/// Django's `group_send` (which drops members older than `group_expiry`)
/// still reaches them long after; a membership nobody refreshes expires.
#[tokio::test]
async fn group_memberships_are_refreshed_within_group_expiry() {
    let Some(url) = env().await else { return };
    let prefix = unique_prefix("expiry");
    let expiry = Duration::from_secs(2);
    let mut django = Django::new("core", &url, &prefix);
    django.extra.push(("CHANNELS_GROUP_EXPIRY", "2".into()));
    let layer = DjangoChannelLayer::connect(
        &DjangoConfig::new([url.as_str()])
            .prefix(&prefix)
            .group_expiry(expiry)
            .group_refresh(Duration::from_millis(400)),
    )
    .await
    .expect("connect");
    let mut rx = layer.new_channel().await.unwrap();
    layer.group_add("chat_expiry", rx.name()).await.unwrap();
    // A named channel's membership: not ours to refresh.
    layer
        .group_add("chat_expiry", "stale.member")
        .await
        .unwrap();

    let mut conn = redis_conn(&url).await;
    let key = format!("{prefix}:group:chat_expiry");
    let joined = Instant::now();
    // Wait (polling Redis, bounded) until 2.5 expiries have passed, checking
    // on the way that our score keeps being renewed.
    let mut renewed = false;
    let first: f64 = redis::cmd("ZSCORE")
        .arg(&key)
        .arg(rx.name())
        .query_async(&mut conn)
        .await
        .unwrap();
    while joined.elapsed() < expiry * 5 / 2 {
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(&key)
            .arg(rx.name())
            .query_async(&mut conn)
            .await
            .unwrap();
        let score = score.expect("our membership vanished from Redis");
        renewed |= score > first;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(renewed, "the membership score was never renewed");

    let out = django
        .layer_py(&["group_send", "chat_expiry", "still here"])
        .await;
    assert_eq!(out, ["sent 1"]);
    let event = recv(&mut rx).await;
    assert_eq!(event.kind(), "chat.message");
    assert_eq!(event.body::<ChatMessage>().unwrap().message, "still here");
    // Django's group_send removed the unrefreshed member.
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(&key)
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(members, [rx.name().to_owned()]);
}

// --------------------------------------------------------------- capacity

/// A Rust `send` to a channel holding `capacity` messages fails with
/// `ChannelFull`, exactly where channels_redis raises it, and Django reads
/// what Rust sent.
#[tokio::test]
async fn capacity_is_shared_with_django() {
    let Some(url) = env().await else { return };
    let prefix = unique_prefix("capacity");
    let mut django = Django::new("core", &url, &prefix);
    django.extra.push(("CHANNELS_CAPACITY", "5".into()));
    let layer = DjangoChannelLayer::connect(
        &DjangoConfig::new([url.as_str()])
            .prefix(&prefix)
            .capacity(5),
    )
    .await
    .expect("connect");
    for n in 0..5 {
        layer
            .send("jobs", chat(&format!("job {n}")))
            .await
            .expect("send within capacity");
    }
    match layer.send("jobs", chat("one too many")).await {
        Err(ChannelLayerError::ChannelFull { channel }) => assert_eq!(channel, "jobs"),
        other => panic!("expected ChannelFull, got {other:?}"),
    }
    assert_eq!(
        django.layer_py(&["send", "jobs", "x"]).await,
        ["ChannelFull"]
    );

    let got = django.layer_py(&["receive", "jobs", "5"]).await;
    let messages: Vec<String> = got
        .iter()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["type"], "chat.message", "{line}");
            v["message"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        messages,
        (0..5).map(|n| format!("job {n}")).collect::<Vec<_>>()
    );
    // Room again, for both.
    layer.send("jobs", chat("room")).await.expect("send");
    assert_eq!(django.layer_py(&["send", "jobs", "x"]).await, ["ok"]);

    // Django -> Rust on a named channel.
    let mut jobs = layer.receive("jobs").await.unwrap();
    for expected in ["room", "x"] {
        let event = recv(&mut jobs).await;
        assert_eq!(event.body::<ChatMessage>().unwrap().message, expected);
    }
}

/// `symmetric_encryption_keys`: Fernet with channels_redis' key derivation,
/// both ways.
#[tokio::test]
async fn encrypted_messages_cross_both_ways() {
    let Some(url) = env().await else { return };
    let prefix = unique_prefix("fernet");
    let mut django = Django::new("core", &url, &prefix);
    django
        .extra
        .push(("CHANNELS_SYMMETRIC_KEY", "correct horse".into()));
    let layer = DjangoChannelLayer::connect(
        &DjangoConfig::new([url.as_str()])
            .prefix(&prefix)
            .symmetric_encryption_keys(["correct horse"]),
    )
    .await
    .expect("connect");
    layer.send("sealed", chat("secret ✓")).await.expect("send");
    let got = django.layer_py(&["receive", "sealed", "1"]).await;
    let v: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
    assert_eq!(v["message"], "secret ✓");

    let mut rx = layer.new_channel().await.unwrap();
    layer.group_add("chat_sealed", rx.name()).await.unwrap();
    django
        .layer_py(&["group_send", "chat_sealed", "from django"])
        .await;
    assert_eq!(
        recv(&mut rx).await.body::<ChatMessage>().unwrap().message,
        "from django"
    );
    // What Redis holds is not readable without the key.
    layer.send("sealed", chat("plain?")).await.expect("send");
    let mut conn = redis_conn(&url).await;
    let raw: Vec<Vec<u8>> = redis::cmd("ZRANGE")
        .arg(format!("{prefix}sealed"))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(raw.len(), 1);
    assert!(!String::from_utf8_lossy(&raw[0]).contains("plain?"));
}

// --------------------------------------------------------------- two hosts

/// A two-host ring (crc32 consistent hash, as channels_redis): groups land
/// on both hosts, and group sends cross both ways on each.
#[tokio::test]
async fn two_host_ring_matches_channels_redis() {
    let Some(url) = env().await else { return };
    let second = RedisServer::start().await;
    let prefix = unique_prefix("ring");
    let hosts = [url.clone(), second.url()];
    let mut django = Django::new("core", &url, &prefix);
    django.hosts = hosts.to_vec();
    let daphne = django.serve().await;
    let layer = DjangoChannelLayer::connect(&DjangoConfig::new(hosts.clone()).prefix(&prefix))
        .await
        .expect("connect");

    // crc32 & 0xFFF puts chat_alpha, chat_bravo, chat_delta on host 0 and
    // chat_lobby, chat_charlie, chat_echo on host 1 (checked below).
    let rooms: Vec<String> = ["alpha", "bravo", "charlie", "delta", "echo", "lobby"]
        .map(String::from)
        .to_vec();
    let mut rust_members = Vec::new();
    let mut django_members = Vec::new();
    for room in &rooms {
        let rx = layer.new_channel().await.unwrap();
        layer
            .group_add(&format!("chat_{room}"), rx.name())
            .await
            .unwrap();
        rust_members.push(rx);
        django_members.push(connect(daphne.addr, &format!("/ws/chat/{room}/")).await);
    }
    // The groups are spread over both servers as channels_redis spreads them.
    for host in &hosts {
        let mut conn = redis_conn(host).await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:group:*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!keys.is_empty(), "no group on {host}");
    }

    // Django -> Rust on every group.
    let groups: Vec<String> = rooms.iter().map(|r| format!("chat_{r}")).collect();
    django
        .layer_py(&["group_send", &groups.join(","), "from django"])
        .await;
    for (rx, ws) in rust_members.iter_mut().zip(&mut django_members) {
        assert_eq!(
            recv(rx).await.body::<ChatMessage>().unwrap().message,
            "from django"
        );
        assert_eq!(heard(ws).await, "from django");
    }
    // Rust -> Django on every group.
    for (group, ws) in groups.iter().zip(&mut django_members) {
        let report = layer.group_send(group, chat("from rust")).await.unwrap();
        assert_eq!(report.local_members, 1, "{report:?}");
        assert_eq!(report.remote_receivers, Some(1), "{report:?}");
        assert_eq!(heard(ws).await, "from rust");
    }
    for rx in &mut rust_members {
        assert_eq!(
            recv(rx).await.body::<ChatMessage>().unwrap().message,
            "from rust"
        );
    }
}

// --------------------------------------------------------------- faults

/// The first command after a Redis restart succeeds, and the receive loop
/// reads again: a Python send after the restart reaches the Rust channel.
#[tokio::test]
async fn core_layer_survives_a_redis_restart() {
    let Some(_url) = env().await else { return };
    let mut server = RedisServer::start().await;
    let prefix = unique_prefix("restart");
    let django = Django::new("core", &server.url(), &prefix);
    let layer = DjangoChannelLayer::connect(
        &DjangoConfig::new([server.url()])
            .prefix(&prefix)
            .timeout(Duration::from_secs(3)),
    )
    .await
    .expect("connect");
    let mut rx = layer.new_channel().await.unwrap();
    layer.group_add("chat_restart", rx.name()).await.unwrap();

    server.kill();
    server.restart().await;
    // The first command on the old connection fails and is retried once.
    layer
        .group_add("chat_restart", rx.name())
        .await
        .expect("the first command after a restart");
    django
        .layer_py(&["group_send", "chat_restart", "after restart"])
        .await;
    assert_eq!(
        recv(&mut rx).await.body::<ChatMessage>().unwrap().message,
        "after restart"
    );
}

/// The pubsub layer re-subscribes after a Redis restart (a Django
/// `group_send` reaches the Rust member again) and its first command after
/// the restart succeeds.
#[tokio::test]
async fn pubsub_layer_survives_a_redis_restart() {
    let Some(_url) = env().await else { return };
    let mut server = RedisServer::start().await;
    let prefix = unique_prefix("restartps");
    let django = Django::new("pubsub", &server.url(), &prefix);
    let layer = DjangoPubSubChannelLayer::connect(
        &DjangoConfig::new([server.url()])
            .prefix(&prefix)
            .timeout(Duration::from_secs(3)),
    )
    .await
    .expect("connect");
    let mut rx = layer.new_channel().await.unwrap();
    layer.group_add("chat_restart", rx.name()).await.unwrap();

    server.kill();
    server.restart().await;
    // Wait (bounded) until the subscriber task has re-subscribed: Redis
    // itself tells how many subscribers the group channel has.
    let mut conn = redis_conn(&server.url()).await;
    let group_channel = format!("{prefix}__group__chat_restart");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, n): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&group_channel)
            .query_async(&mut conn)
            .await
            .unwrap();
        if n == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never re-subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    django
        .layer_py(&["group_send", "chat_restart", "after restart"])
        .await;
    assert_eq!(
        recv(&mut rx).await.body::<ChatMessage>().unwrap().message,
        "after restart"
    );
    // A command on the (re-established) command connection.
    let report = layer
        .group_send("chat_restart", chat("from rust"))
        .await
        .expect("group_send after a restart");
    assert_eq!(report.remote_receivers, Some(1));
    assert_eq!(
        recv(&mut rx).await.body::<ChatMessage>().unwrap().message,
        "from rust"
    );
}

// ------------------------------------------------------------ conformance

/// The shared suite, minus the checks that cannot apply (each says why).
/// The layer has no presence or history, so those checks do not apply.
/// No pair checks: across Redis they send `Event::text` (worker_channel
/// too) or bare integers, which have no Django dict form (a Codec error,
/// by design).
#[tokio::test]
async fn conformance_core() {
    let Some(url) = env().await else { return };
    Suite::new(|| async {
        let config = DjangoConfig::new([url.as_str()])
            .prefix(unique_prefix("conf"))
            .capacity(16);
        Arc::new(DjangoChannelLayer::connect(&config).await.expect("connect"))
            as Arc<dyn ChannelLayer>
    })
    .skip(
        "no_such_channel",
        "like channels_redis, the core layer cannot know whether another \
         process still reads a key (sends to it expire)",
    )
    .skip(
        "worker_channel",
        "it sends Event::text across Redis, which has no Django dict form",
    )
    .run()
    .await;
}

/// The shared suite, minus the checks that cannot apply (each says why);
/// no pair checks (fast-lane or non-map bodies across Redis, and a pubsub
/// `group_add` only takes channels of its own process).
#[tokio::test]
async fn conformance_pubsub() {
    let Some(url) = env().await else { return };
    let no_sender_id = "channels_redis' pubsub format has no sender id, so group sends \
        reach local members through Redis too and the report cannot count them \
        (local_members is 0; see the module docs)";
    Suite::new(|| async {
        let config = DjangoConfig::new([url.as_str()])
            .prefix(unique_prefix("confps"))
            .capacity(16);
        Arc::new(
            DjangoPubSubChannelLayer::connect(&config)
                .await
                .expect("connect"),
        ) as Arc<dyn ChannelLayer>
    })
    .skip("groups", no_sender_id)
    .skip("full_member_lags", no_sender_id)
    .skip("dropped_receiver_leaves_groups", no_sender_id)
    .skip("flush", no_sender_id)
    .skip(
        "worker_channel",
        "it sends Event::text across Redis, which has no Django dict form",
    )
    .run()
    .await;
}

// -------------------------------------------------------------- benchmark

/// Wall-clock seconds since the Unix epoch (the Python publisher reports
/// its start in the same clock).
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Connects `subs` clients to `ws://{addr}{path}`, runs `publish` (which
/// returns the wall-clock time of its first send), and counts deliveries
/// until all `subs × msgs` arrived or nothing came for 10 s. Returns
/// (delivered, seconds from the first send to the last arrival, seconds
/// the burst took, seconds from its end to the last arrival).
async fn fan_out<F, Fut>(
    addr: SocketAddr,
    path: &str,
    subs: usize,
    msgs: usize,
    publish: F,
) -> (usize, f64, f64, f64)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = (f64, f64)>,
{
    use futures_util::StreamExt;
    let total = Arc::new(AtomicU64::new(0));
    let last = Arc::new(std::sync::Mutex::new(0.0f64));
    let sem = Arc::new(tokio::sync::Semaphore::new(10));
    let mut clients = Vec::new();
    for _ in 0..subs {
        let sem = sem.clone();
        let path = path.to_owned();
        clients.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            connect(addr, &path).await
        }));
    }
    let mut readers = Vec::new();
    for c in clients {
        let mut ws = c.await.unwrap();
        let (total, last) = (total.clone(), last.clone());
        readers.push(tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            while let Some(Ok(WsMessage::Text(t))) = ws.next().await {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                let seq: usize = v["message"].as_str().unwrap()[2..].parse().unwrap();
                assert!(
                    seq < msgs && seen.insert(seq),
                    "duplicate or bad message {t}"
                );
                total.fetch_add(1, Ordering::Relaxed);
                *last.lock().unwrap() = unix_now();
            }
        }));
    }
    let (start, end) = publish().await;
    let expected = (subs * msgs) as u64;
    let mut seen = 0;
    let mut idle_since = Instant::now();
    while total.load(Ordering::Relaxed) < expected && idle_since.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = total.load(Ordering::Relaxed);
        if now > seen {
            seen = now;
            idle_since = Instant::now();
        }
    }
    for r in readers {
        r.abort();
    }
    let delivered = total.load(Ordering::Relaxed) as usize;
    let last = *last.lock().unwrap();
    (delivered, (last - start).max(1e-9), end - start, last - end)
}

/// The fan-out benchmark with Rust clients (tokio-tungstenite), which read
/// faster than the Python clients of `bench/django/fanout.py`:
///
/// ```text
/// cargo test --release --features django --test django -- --ignored --nocapture fanout_benchmark
/// ```
///
/// `BENCH_SUBS` (1000) and `BENCH_MSGS` (20) set the size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture (see bench/django/README.md)"]
async fn fanout_benchmark() {
    let Some(url) = env().await else { return };
    let var = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (subs, msgs) = (var("BENCH_SUBS", 1000), var("BENCH_MSGS", 20));
    let prefix = unique_prefix("bench");
    let django = Django::new("core", &url, &prefix);
    let daphne = django.serve().await;
    let (_rust, rust_addr) = spawn_example_with("chat", &["--django", &url, "--prefix", &prefix]);
    let publish_django = || async {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/django/fanout.py");
        let mut child = tokio::process::Command::from(django.command("python3"))
            .arg(script)
            .args(["--publish", &msgs.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("publisher");
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(out.next_line().await.unwrap().as_deref(), Some("ready"));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"go\n")
            .await
            .unwrap();
        let line = out.next_line().await.unwrap().unwrap();
        let start: f64 = line.trim_start_matches("start ").parse().unwrap();
        let line = out.next_line().await.unwrap().unwrap();
        let end: f64 = line.trim_start_matches("end ").parse().unwrap();
        child.wait().await.unwrap();
        (start, end)
    };
    let publish_rust = || async {
        let mut ws = connect(rust_addr, "/ws/chat/bench").await;
        let start = unix_now();
        for n in 0..msgs {
            say(&mut ws, &format!("d {n}")).await;
        }
        let end = unix_now();
        for _ in 0..msgs {
            next_text(&mut ws).await;
        }
        (start, end)
    };
    let runs = [
        (
            "django -> django",
            fan_out(daphne.addr, "/ws/chat/bench/", subs, msgs, publish_django).await,
        ),
        (
            "django -> rust",
            fan_out(rust_addr, "/ws/chat/bench", subs, msgs, publish_django).await,
        ),
        (
            "rust -> django",
            fan_out(daphne.addr, "/ws/chat/bench/", subs, msgs, publish_rust).await,
        ),
    ];
    let base = runs[0].1 .0 as f64 / runs[0].1 .1;
    println!(
        "| scenario | subscribers × messages | delivered | lost | deliveries/s \
         | vs django -> django | publisher burst s | last delivery after burst ms |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, (delivered, secs, burst, tail)) in runs {
        let rate = delivered as f64 / secs;
        let lost = subs * msgs - delivered;
        println!(
            "| {name} | {subs} × {msgs} | {delivered} | {lost} ({:.1}%) | {rate:.0} | {:.1}x \
             | {burst:.2} | {:.0} |",
            100.0 * lost as f64 / (subs * msgs) as f64,
            rate / base,
            tail * 1000.0
        );
    }
}
