//! The chat example's rooms across processes, on every layer that spans
//! processes and keeps history and presence: the same tests run on Redis
//! (`REDIS_URL`, default `redis://127.0.0.1:6379`) and on a Redis Cluster
//! (`REDIS_CLUSTER_URLS`, comma-separated seed URLs), each as a module of
//! its own (`redis::...`, `redis_cluster::...`). A broker that does not
//! answer skips its tests (`skipped: ...`), unless its
//! `TOWER_CHANNELS_REQUIRE_*` switch is `1`.
//!
//! Each test starts two or three chat processes (`spawn_example_with`) on
//! one broker and talks to them over WebSockets: recovery after a
//! disconnect on the same and another process, exactly once across replay
//! and live with two publishers, presence across processes, and a killed
//! process whose members leave and whose client recovers on another one.
#![cfg(any(feature = "redis", feature = "nats"))]

mod common;

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use common::{layers::skip, *};
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;

// ------------------------------------------------------------------ brokers

/// A broker the chat example shares rooms through: the flag selecting it,
/// where its URL comes from and the switch that makes its absence fail.
#[derive(Debug, Clone, Copy)]
struct Broker {
    name: &'static str,
    /// The example's flag, followed by the URL.
    flag: &'static str,
    /// The environment variable with the URL (or comma-separated URLs).
    env: &'static str,
    default: Option<&'static str>,
    /// `TOWER_CHANNELS_REQUIRE_*`.
    require: &'static str,
}

/// Chat processes on one broker, sharing a prefix of their own: tests
/// running at once do not share keys, subjects, history streams or (on
/// NATS) a presence bucket whose TTL one of them sets.
struct Chats {
    broker: Broker,
    url: String,
    prefix: String,
}

impl Chats {
    /// The broker's URL if every one of its addresses answers; `None`
    /// (after printing why) when the test must skip.
    async fn on(broker: Broker) -> Option<Self> {
        let Some(url) = std::env::var(broker.env)
            .ok()
            .or(broker.default.map(str::to_owned))
        else {
            skip(
                broker.name,
                broker.require,
                &format!("{} is not set", broker.env),
            );
            return None;
        };
        for one in url.split(',') {
            let addr = host_port(one.trim());
            let probe = tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(addr)).await;
            if !matches!(probe, Ok(Ok(_))) {
                skip(
                    broker.name,
                    broker.require,
                    &format!("nothing answers at {addr} ({}={url})", broker.env),
                );
                return None;
            }
        }
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("chat-test-{}-{n}", std::process::id());
        Some(Self {
            broker,
            url,
            prefix,
        })
    }

    /// Starts a chat process on the broker, with `extra` arguments.
    fn spawn(&self, extra: &[&str]) -> (ChildGuard, SocketAddr) {
        let mut args = vec![
            self.broker.flag,
            self.url.as_str(),
            "--prefix",
            self.prefix.as_str(),
        ];
        args.extend_from_slice(extra);
        spawn_example_with("chat", &args)
    }
}

/// `host:port` of `scheme://[user@]host:port[/path]`.
fn host_port(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.split('/').next().unwrap_or(rest);
    rest.rsplit_once('@').map_or(rest, |(_, host)| host)
}

/// Redis, which the example's `--redis` shares rooms through.
#[cfg(feature = "redis")]
const REDIS: Broker = Broker {
    name: "Redis",
    flag: "--redis",
    env: "REDIS_URL",
    default: Some("redis://127.0.0.1:6379"),
    require: "TOWER_CHANNELS_REQUIRE_REDIS",
};

/// One module of tests per broker, each running the test bodies below on
/// it. Adding a broker is one entry.
macro_rules! on_every_broker {
    ($($(#[$cfg:meta])* $module:ident => $broker:expr,)*) => {$(
        $(#[$cfg])*
        mod $module {
            use super::*;

            const BROKER: Broker = $broker;

            #[tokio::test]
            async fn two_processes_share_a_room() {
                super::two_processes_share_a_room(BROKER).await;
            }

            #[tokio::test]
            async fn recovery_after_disconnect_on_same_and_other_process() {
                super::recovery_after_disconnect_on_same_and_other_process(BROKER).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn exactly_once_across_replay_and_live_with_two_publishers() {
                super::exactly_once_across_replay_and_live_with_two_publishers(BROKER).await;
            }

            #[tokio::test]
            async fn presence_join_and_leave_across_processes() {
                super::presence_join_and_leave_across_processes(BROKER).await;
            }

            #[tokio::test]
            async fn killed_process_leaves_and_its_client_recovers_elsewhere() {
                super::killed_process_leaves_and_its_client_recovers_elsewhere(BROKER).await;
            }
        }
    )*};
}

on_every_broker! {
    #[cfg(feature = "redis")]
    redis => REDIS,
    #[cfg(feature = "redis-cluster")]
    redis_cluster => Broker {
        name: "Redis Cluster",
        flag: "--redis-cluster",
        env: "REDIS_CLUSTER_URLS",
        default: None,
        require: "TOWER_CHANNELS_REQUIRE_REDIS_CLUSTER",
    },
    #[cfg(feature = "nats")]
    nats => Broker {
        name: "NATS",
        flag: "--nats",
        env: "NATS_URL",
        default: None,
        require: "TOWER_CHANNELS_REQUIRE_NATS",
    },
}

// ------------------------------------------------------------------ helpers

/// A chat message as a client receives it.
#[derive(Debug, Clone, PartialEq)]
struct ChatMsg {
    text: String,
    offset: u64,
    epoch: String,
}

fn parse(raw: &str) -> Value {
    serde_json::from_str(raw).unwrap_or_else(|e| panic!("not JSON: {raw:?}: {e}"))
}

/// The next message, which must be a chat message with a history position.
async fn next_chat(ws: &mut Client) -> ChatMsg {
    let raw = next_text(ws).await;
    let v = parse(&raw);
    match (
        v["message"].as_str(),
        v["offset"].as_u64(),
        v["epoch"].as_str(),
    ) {
        (Some(text), Some(offset), Some(epoch)) => ChatMsg {
            text: text.to_owned(),
            offset,
            epoch: epoch.to_owned(),
        },
        _ => panic!("expected a chat message with offset and epoch, got {raw}"),
    }
}

/// The next message, which must be `{"type": kind, ...}`.
async fn next_typed(ws: &mut Client, kind: &str) -> Value {
    let raw = next_text(ws).await;
    let v = parse(&raw);
    assert_eq!(v["type"], kind, "expected a {kind:?} message, got {raw}");
    v
}

async fn say(ws: &mut Client, text: &str) {
    ws.send(WsMessage::text(json!({ "message": text }).to_string()))
        .await
        .expect("send a chat message");
}

/// Asks for the room's presence and returns the names, sorted.
async fn presence(ws: &mut Client) -> Vec<String> {
    ws.send(WsMessage::text(r#"{"type":"presence"}"#))
        .await
        .expect("send a presence request");
    let v = next_typed(ws, "presence").await;
    let mut names: Vec<String> = v["members"]
        .as_array()
        .unwrap_or_else(|| panic!("members is not a list: {v}"))
        .iter()
        .map(|n| n.as_str().expect("a name").to_owned())
        .collect();
    names.sort();
    names
}

/// A room name no other test run uses.
fn room(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{test}-{}-{nanos}", std::process::id())
}

fn resume(room: &str, last: &ChatMsg) -> String {
    format!(
        "/ws/chat/{room}?offset={}&epoch={}",
        last.offset, last.epoch
    )
}

// -------------------------------------------------------------- the tests

/// A client on each process, same room: each sees the other's messages;
/// another room sees neither.
async fn two_processes_share_a_room(broker: Broker) {
    let Some(chats) = Chats::on(broker).await else {
        return;
    };
    let (_a, addr_a) = chats.spawn(&[]);
    let (_b, addr_b) = chats.spawn(&[]);
    let room = format!("/ws/chat/{}", room("share"));
    let mut on_a = connect(addr_a, &room).await;
    let mut on_b = connect(addr_b, &room).await;
    let mut elsewhere = connect(addr_b, &format!("{room}-other")).await;

    // Joining completes before the handshake is answered (connect runs
    // group_add, which subscribes before returning), so both are members now.
    say(&mut on_a, "from a").await;
    assert_eq!(next_chat(&mut on_a).await.text, "from a");
    assert_eq!(next_chat(&mut on_b).await.text, "from a");

    say(&mut on_b, "from b").await;
    assert_eq!(next_chat(&mut on_b).await.text, "from b");
    assert_eq!(next_chat(&mut on_a).await.text, "from b");

    // The other room saw neither: its first message is its own.
    say(&mut elsewhere, "other room").await;
    assert_eq!(next_chat(&mut elsewhere).await.text, "other room");
}

/// A client misses messages while disconnected and gets exactly those when
/// it comes back with its last position, on the same process and on the
/// other one, then live messages.
async fn recovery_after_disconnect_on_same_and_other_process(broker: Broker) {
    let Some(chats) = Chats::on(broker).await else {
        return;
    };
    let (_a, addr_a) = chats.spawn(&[]);
    let (_b, addr_b) = chats.spawn(&[]);
    let room = room("recover");
    let path = format!("/ws/chat/{room}");
    let mut talker = connect(addr_b, &path).await;
    let mut reader = connect(addr_a, &path).await;
    say(&mut talker, "m1").await;
    assert_eq!(next_chat(&mut talker).await.text, "m1");
    let seen = next_chat(&mut reader).await;
    assert_eq!(seen.text, "m1");
    close(&mut reader).await;

    // Missed while away, then back on the same process.
    for m in ["m2", "m3"] {
        say(&mut talker, m).await;
        assert_eq!(next_chat(&mut talker).await.text, m);
    }
    let mut reader = connect(addr_a, &resume(&room, &seen)).await;
    let m2 = next_chat(&mut reader).await;
    let m3 = next_chat(&mut reader).await;
    assert_eq!((m2.text.as_str(), m3.text.as_str()), ("m2", "m3"));
    assert_eq!((m2.offset, m3.offset), (seen.offset + 1, seen.offset + 2));
    assert_eq!(m3.epoch, seen.epoch);
    say(&mut talker, "m4").await;
    assert_eq!(next_chat(&mut talker).await.text, "m4");
    let m4 = next_chat(&mut reader).await;
    assert_eq!((m4.text.as_str(), m4.offset), ("m4", seen.offset + 3));
    drop(reader);

    // Missed again, back on the other process.
    say(&mut talker, "m5").await;
    assert_eq!(next_chat(&mut talker).await.text, "m5");
    let mut reader = connect(addr_b, &resume(&room, &m4)).await;
    let m5 = next_chat(&mut reader).await;
    assert_eq!((m5.text.as_str(), m5.offset), ("m5", m4.offset + 1));
    say(&mut talker, "m6").await;
    assert_eq!(next_chat(&mut reader).await.text, "m6");

    // Resuming at the latest position delivers nothing old: the next
    // message is live.
    let latest = next_chat(&mut talker).await;
    assert_eq!(latest.text, "m6");
    let mut current = connect(addr_a, &resume(&room, &latest)).await;
    say(&mut talker, "m7").await;
    assert_eq!(next_chat(&mut current).await.text, "m7");
}

/// Two processes publish as fast as they can while a client comes back
/// with an old position: it gets every message after it exactly once, in
/// offset order, whether it came from history or live.
async fn exactly_once_across_replay_and_live_with_two_publishers(broker: Broker) {
    let Some(chats) = Chats::on(broker).await else {
        return;
    };
    let (_a, addr_a) = chats.spawn(&[]);
    let (_b, addr_b) = chats.spawn(&[]);
    let room = room("switch");
    let path = format!("/ws/chat/{room}");
    // The witness stays connected and sees everything live.
    let mut witness = connect(addr_b, &path).await;
    let mut early = connect(addr_a, &path).await;
    say(&mut early, "before").await;
    let since = next_chat(&mut early).await;
    assert_eq!(next_chat(&mut witness).await, since);
    drop(early);

    const EACH: usize = 60;
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let publish = |addr, name: &'static str, started: Option<tokio::sync::oneshot::Sender<()>>| {
        let path = path.clone();
        tokio::spawn(async move {
            let mut ws = connect(addr, &path).await;
            let mut started = started;
            for i in 0..EACH {
                say(&mut ws, &format!("{name}-{i}")).await;
                if i == EACH / 4 {
                    if let Some(tx) = started.take() {
                        let _ = tx.send(());
                    }
                }
            }
            // Read our copies so the server never sees a slow client.
            let mut own = 0;
            while own < EACH {
                let m = next_chat(&mut ws).await;
                if m.text.starts_with(name) {
                    own += 1;
                }
            }
        })
    };
    let pa = publish(addr_a, "a", Some(started_tx));
    let pb = publish(addr_b, "b", None);
    within("the publishers to start", started_rx)
        .await
        .expect("publisher a started");
    let mut back = connect(addr_a, &resume(&room, &since)).await;
    let mut got = Vec::new();
    let mut last_of = HashSet::new();
    while last_of.len() < 2 {
        let m = next_chat(&mut back).await;
        if m.text == format!("a-{}", EACH - 1) || m.text == format!("b-{}", EACH - 1) {
            last_of.insert(m.text.clone());
        }
        got.push(m);
    }
    pa.await.expect("publisher a");
    pb.await.expect("publisher b");
    let mut truth = Vec::new();
    while truth.len() < 2 * EACH {
        truth.push(next_chat(&mut witness).await);
    }
    // Everything after `since`, up to the last message received.
    let top = got.last().expect("messages").offset;
    let expected: Vec<ChatMsg> = truth.into_iter().filter(|m| m.offset <= top).collect();
    assert_eq!(got.len(), expected.len(), "count: got {got:?}");
    assert_eq!(got, expected, "recovered then live, each once, in order");
    let offsets: Vec<u64> = got.iter().map(|m| m.offset).collect();
    assert_eq!(
        offsets,
        (since.offset + 1..=top).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
}

/// When Redis loses a room's history, a client resuming from an old
/// position is told so first, then gets live messages of the new epoch.
#[cfg(feature = "redis")]
#[tokio::test]
async fn recovery_fails_after_the_redis_history_is_flushed() {
    let Some(chats) = Chats::on(REDIS).await else {
        return;
    };
    let url = chats.url.clone();
    let (_a, addr) = chats.spawn(&[]);
    let room = room("flushed");
    let path = format!("/ws/chat/{room}");
    let mut ws = connect(addr, &path).await;
    say(&mut ws, "old").await;
    let old = next_chat(&mut ws).await;
    close(&mut ws).await;

    let client = ::redis::Client::open(url.as_str()).expect("Redis client");
    let mut conn = within(
        "a Redis connection",
        client.get_multiplexed_async_connection(),
    )
    .await
    .expect("connect to Redis");
    let deleted: i64 = ::redis::cmd("DEL")
        .arg(format!("{}:history:chat_{room}", chats.prefix))
        .arg(format!("{}:history-meta:chat_{room}", chats.prefix))
        .query_async(&mut conn)
        .await
        .expect("DEL");
    assert_eq!(deleted, 2, "the room's history keys should have existed");

    let mut back = connect(addr, &resume(&room, &old)).await;
    next_typed(&mut back, "recovery_failed").await;
    say(&mut back, "new").await;
    let new = next_chat(&mut back).await;
    assert_eq!((new.text.as_str(), new.offset), ("new", 1));
    assert_ne!(new.epoch, old.epoch, "a new epoch");
}

/// Presence spans both processes, grouped by user; joins and leaves are
/// announced once per user, on the first and last connection.
async fn presence_join_and_leave_across_processes(broker: Broker) {
    let Some(chats) = Chats::on(broker).await else {
        return;
    };
    let (_a, addr_a) = chats.spawn(&[]);
    let (_b, addr_b) = chats.spawn(&[]);
    let room = room("presence");
    let as_user = |user: &str| format!("/ws/chat/{room}?user={user}");
    let mut bob = connect(addr_b, &as_user("bob")).await;
    assert_eq!(next_typed(&mut bob, "join").await["user"], "bob");
    let mut alice1 = connect(addr_a, &as_user("alice")).await;
    assert_eq!(next_typed(&mut alice1, "join").await["user"], "alice");
    assert_eq!(next_typed(&mut bob, "join").await["user"], "alice");
    assert_eq!(presence(&mut bob).await, ["alice", "bob"]);
    assert_eq!(presence(&mut alice1).await, ["alice", "bob"]);

    // A second tab on the other process: one member, no new join.
    let mut alice2 = connect(addr_b, &as_user("alice")).await;
    say(&mut alice2, "tab 2 here").await;
    assert_eq!(next_chat(&mut bob).await.text, "tab 2 here");
    assert_eq!(presence(&mut bob).await, ["alice", "bob"]);

    // Closing one tab is not a leave; closing the last one is.
    close(&mut alice1).await;
    close(&mut alice2).await;
    assert_eq!(next_typed(&mut bob, "leave").await["user"], "alice");
    say(&mut bob, "after").await;
    assert_eq!(next_chat(&mut bob).await.text, "after");
    assert_eq!(presence(&mut bob).await, ["bob"]);
}

/// Three processes; one is killed. It cannot say goodbye: its members
/// leave the others' presence within the documented bound (the TTL and a
/// third, see `PresenceConfig::ttl`), and a client that was on it
/// reconnects to another process and gets exactly what it missed, then
/// live messages.
async fn killed_process_leaves_and_its_client_recovers_elsewhere(broker: Broker) {
    let Some(chats) = Chats::on(broker).await else {
        return;
    };
    let ttl = Duration::from_secs(1);
    let ttl_arg = ttl.as_secs().to_string();
    let extra = ["--presence-ttl", ttl_arg.as_str()];
    let (a, addr_a) = chats.spawn(&extra);
    let (_b, addr_b) = chats.spawn(&extra);
    let (_c, addr_c) = chats.spawn(&extra);
    let room = room("killed");
    let path = format!("/ws/chat/{room}");
    let as_user = |user: &str| format!("{path}?user={user}");
    let mut bob = connect(addr_b, &as_user("bob")).await;
    assert_eq!(next_typed(&mut bob, "join").await["user"], "bob");
    let mut dave = connect(addr_c, &as_user("dave")).await;
    assert_eq!(next_typed(&mut dave, "join").await["user"], "dave");
    assert_eq!(next_typed(&mut bob, "join").await["user"], "dave");
    let mut carol = connect(addr_a, &as_user("carol")).await;
    for ws in [&mut carol, &mut bob, &mut dave] {
        assert_eq!(next_typed(ws, "join").await["user"], "carol");
    }
    assert_eq!(presence(&mut bob).await, ["bob", "carol", "dave"]);
    // Joined after every join was announced, so it sees only chat messages.
    let mut reader = connect(addr_a, &path).await;
    say(&mut bob, "m1").await;
    for ws in [&mut bob, &mut dave, &mut carol] {
        assert_eq!(next_chat(ws).await.text, "m1");
    }
    let seen = next_chat(&mut reader).await;
    assert_eq!(seen.text, "m1");

    let killed = std::time::Instant::now();
    drop(a); // SIGKILL: no leave, no cleanup
    drop((carol, reader));
    // The documented bound after the kill (the TTL and a third), plus a
    // second for the announcement to travel on a busy machine.
    let bound = ttl + ttl / 3 + Duration::from_secs(1);
    for ws in [&mut bob, &mut dave] {
        assert_eq!(next_typed(ws, "leave").await["user"], "carol");
        let after = killed.elapsed();
        assert!(
            after < bound,
            "carol left {after:?} after her process died (TTL {ttl:?}, bound {bound:?})"
        );
    }
    assert_eq!(presence(&mut dave).await, ["bob", "dave"]);

    // Missed while its process was gone, from both live processes.
    say(&mut bob, "m2").await;
    assert_eq!(next_chat(&mut bob).await.text, "m2");
    say(&mut dave, "m3").await;
    assert_eq!(next_chat(&mut bob).await.text, "m3");
    for expected in ["m2", "m3"] {
        assert_eq!(next_chat(&mut dave).await.text, expected);
    }
    let mut reader = connect(addr_c, &resume(&room, &seen)).await;
    let m2 = next_chat(&mut reader).await;
    let m3 = next_chat(&mut reader).await;
    assert_eq!((m2.text.as_str(), m3.text.as_str()), ("m2", "m3"));
    assert_eq!((m2.offset, m3.offset), (seen.offset + 1, seen.offset + 2));
    assert_eq!((&m2.epoch, &m3.epoch), (&seen.epoch, &seen.epoch));
    say(&mut bob, "m4").await;
    let m4 = next_chat(&mut reader).await;
    assert_eq!((m4.text.as_str(), m4.offset), ("m4", seen.offset + 3));
}
