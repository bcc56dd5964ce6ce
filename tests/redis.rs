//! `RedisChannelLayer` against a real Redis server.
//!
//! Redis is taken from `REDIS_URL` (default `redis://127.0.0.1:6379`); if
//! nothing answers there and `redis-server` is installed, each test starts
//! its own server on a free port. With neither, the tests print
//! `skipped: no Redis (...)` and pass, unless `TOWER_CHANNELS_REQUIRE_REDIS=1`.
//! The restart test always runs its own server, which it kills and restarts.
#![cfg(feature = "redis")]

mod common;

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tower_channels::channel_layer::{
    redis::RedisChannelLayer, BoxFuture, ChannelLayer, ChannelLayerError, Event, GroupPattern,
    PresenceChange, PresenceConfig, PresenceInfo, RecoveryFailure, RecvError, PRESENCE_JOIN,
    PRESENCE_LEAVE,
};
use tower_channels::testing::conformance;

use common::{
    layers::{recv, unique_suffix, RECV},
    redis_server::{answers, RedisServer},
};

// ------------------------------------------------------------------ servers

/// Where a test finds Redis; keeps a server it started alive.
struct Target {
    url: String,
    _server: Option<RedisServer>,
}

fn skip(why: &str) -> Option<Target> {
    common::layers::skip("Redis", "TOWER_CHANNELS_REQUIRE_REDIS", why);
    None
}

async fn redis() -> Option<Target> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    if answers(&url).await {
        return Some(Target { url, _server: None });
    }
    if !RedisServer::available() {
        return skip(&format!(
            "nothing answers at {url} and redis-server is not installed"
        ));
    }
    let server = RedisServer::start().await;
    Some(Target {
        url: server.url(),
        _server: Some(server),
    })
}

fn unique_prefix(test: &str) -> String {
    format!("tc-test:{test}:{}", unique_suffix())
}

async fn layer(url: &str, prefix: &str, capacity: usize) -> RedisChannelLayer {
    RedisChannelLayer::builder(url)
        .prefix(prefix)
        .capacity(capacity)
        .build()
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

// -------------------------------------------------------------------- tests

#[tokio::test]
async fn conformance_suite() {
    let Some(redis) = redis().await else { return };
    let url = redis.url.clone();
    common::layers::conformance_suite(unique_prefix, "conformance", |prefix| {
        let url = url.clone();
        async move { without_history(&url, &prefix).await }
    })
    .await;
}

/// A layer without history; its presence (always on) notifies as the
/// conformance checks expect.
async fn without_history(url: &str, prefix: &str) -> RedisChannelLayer {
    RedisChannelLayer::builder(url)
        .prefix(prefix)
        .capacity(16)
        .presence(conformance::presence_config())
        .build()
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

async fn configured(url: &str, prefix: &str) -> RedisChannelLayer {
    RedisChannelLayer::builder(url)
        .prefix(prefix)
        .capacity(16)
        .history(conformance::history_policy())
        .presence(conformance::presence_config())
        .build()
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// The whole suite on layers with presence and history (the checks of
/// both run then).
#[tokio::test]
async fn conformance_presence_history() {
    let Some(redis) = redis().await else { return };
    let url = redis.url.clone();
    common::layers::conformance_suite(unique_prefix, "conformance-ph", |prefix| {
        let url = url.clone();
        async move { configured(&url, &prefix).await }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_presence_history_multi_thread() {
    let Some(redis) = redis().await else { return };
    let url = redis.url.clone();
    common::layers::conformance_suite(unique_prefix, "conformance-ph-mt", |prefix| {
        let url = url.clone();
        async move { configured(&url, &prefix).await }
    })
    .await;
}

/// Deleting a group's history in Redis (as a flush, restart or eviction
/// would) starts a new epoch: old positions cannot be recovered.
#[tokio::test]
async fn history_epoch_changes_when_redis_loses_it() {
    let Some(redis) = redis().await else { return };
    let prefix = unique_prefix("epoch");
    let layer = configured(&redis.url, &prefix).await;
    let group = format!("{}.epoch", conformance::HISTORY_GROUPS);
    let mut last = None;
    for n in 0..3u32 {
        last = layer
            .group_send(&group, Event::new("e", n))
            .await
            .expect("group_send")
            .position;
    }
    let last = last.expect("position");
    assert_eq!(last.offset(), 3);
    let client = redis::Client::open(redis.url.as_str()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    for key in [
        format!("{prefix}:history:{group}"),
        format!("{prefix}:history-meta:{group}"),
    ] {
        let deleted: i64 = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("DEL");
        assert_eq!(deleted, 1, "{key} should have existed");
    }
    let r = layer.recover(&group, &last).await.expect("recover");
    assert_eq!(r.failure(), Some(RecoveryFailure::EpochChanged), "{r:?}");
    let next = layer
        .group_send(&group, Event::new("e", 9u32))
        .await
        .expect("group_send")
        .position
        .expect("position");
    assert_eq!(next.offset(), 1, "a new epoch starts at offset 1");
    assert_ne!(next.epoch(), last.epoch(), "the epoch must change");
    let r = layer.recover(&group, &last).await.expect("recover");
    assert_eq!(r.failure(), Some(RecoveryFailure::EpochChanged), "{r:?}");
    assert_eq!(r.latest(), Some(&next));

    // Only the stream evicted (meta kept): a new epoch too.
    let _: i64 = redis::cmd("DEL")
        .arg(format!("{prefix}:history:{group}"))
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let after = layer
        .group_send(&group, Event::new("e", 10u32))
        .await
        .expect("group_send")
        .position
        .expect("position");
    assert_eq!(after.offset(), 1);
    assert_ne!(after.epoch(), next.epoch());
}

/// A process that stops without leaving (its layer dropped, so it never
/// refreshes nor cleans up) loses its members within the presence TTL, and
/// the live process announces that they left.
#[tokio::test]
async fn crashed_process_members_expire() {
    let Some(redis) = redis().await else { return };
    let prefix = unique_prefix("presence-ttl");
    let ttl = Duration::from_millis(600);
    let build = || {
        RedisChannelLayer::builder(&redis.url)
            .prefix(&prefix)
            .presence(PresenceConfig::new().notify(GroupPattern::any()).ttl(ttl))
            .build()
    };
    let live = build().await.expect("layer");
    let doomed = build().await.expect("layer");
    let group = "room";
    let mut watcher = live.new_channel().await.expect("channel");
    live.presence_join(group, watcher.name(), PresenceInfo::new("watcher").unwrap())
        .await
        .expect("join");
    assert_eq!(recv(&mut watcher).await.kind(), PRESENCE_JOIN);
    let ghost_rx = doomed.new_channel().await.expect("channel");
    doomed
        .presence_join(group, ghost_rx.name(), PresenceInfo::new("ghost").unwrap())
        .await
        .expect("join");
    let join = recv(&mut watcher).await;
    assert_eq!(join.kind(), PRESENCE_JOIN);
    assert_eq!(join.body::<PresenceChange>().unwrap().user_id, "ghost");
    let listed = live.presence(group).await.expect("presence");
    assert_eq!(listed.len(), 2, "{listed:?}");

    // The process dies: nothing runs for it any more.
    let died = Instant::now();
    drop(doomed);
    let leave = recv(&mut watcher).await;
    assert_eq!(leave.kind(), PRESENCE_LEAVE);
    assert_eq!(leave.body::<PresenceChange>().unwrap().user_id, "ghost");
    let listed = live.presence(group).await.expect("presence");
    assert_eq!(
        listed.iter().map(|m| m.user_id()).collect::<Vec<_>>(),
        vec!["watcher"]
    );
    // Within the TTL plus one refresh period of the live process.
    let waited = died.elapsed();
    assert!(
        waited < ttl + ttl / 3 + Duration::from_millis(500),
        "the ghost left after {waited:?}"
    );
    drop(ghost_rx);
}

/// When Redis loses the presence keys (flushed, restarted without
/// persistence), the live process writes its members again on its next
/// refresh.
#[tokio::test]
async fn presence_is_restored_after_redis_loses_it() {
    let Some(redis) = redis().await else { return };
    let prefix = unique_prefix("presence-restore");
    let layer = RedisChannelLayer::builder(&redis.url)
        .prefix(&prefix)
        .presence(PresenceConfig::new().ttl(Duration::from_millis(600)))
        .build()
        .await
        .expect("layer");
    let rx = layer.new_channel().await.expect("channel");
    layer
        .presence_join("room", rx.name(), PresenceInfo::new("dora").unwrap())
        .await
        .expect("join");
    let client = redis::Client::open(redis.url.as_str()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:presence:*"))
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    assert!(!keys.is_empty(), "no presence keys under {prefix}");
    let _: i64 = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .expect("DEL");
    assert!(layer.presence("room").await.expect("presence").is_empty());
    // Poll until the refresh (every 200 ms) wrote it back.
    let deadline = Instant::now() + RECV;
    loop {
        let members = layer.presence("room").await.expect("presence");
        if members.len() == 1 {
            assert_eq!(members[0].user_id(), "dora");
            assert_eq!(members[0].connections()[0].channel(), rx.name());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "presence not restored in {RECV:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Events of a history group published while a process's Pub/Sub
/// connection is down are read from the history when it is back: its
/// members see every offset once, in order. Runs its own Redis, whose
/// Pub/Sub clients it kills.
#[tokio::test]
async fn history_fills_what_pubsub_missed() {
    if !RedisServer::available() {
        skip("redis-server is not installed");
        return;
    }
    let server = RedisServer::start().await;
    let url = server.url();
    let prefix = unique_prefix("gap");
    let member_layer = configured(&url, &prefix).await;
    let sender = configured(&url, &prefix).await;
    let group = format!("{}.gap", conformance::HISTORY_GROUPS);
    let mut rx = member_layer.new_channel().await.expect("channel");
    member_layer
        .group_add(&group, rx.name())
        .await
        .expect("group_add");
    sender
        .group_send(&group, Event::new("g", 1u32))
        .await
        .expect("send");
    assert_eq!(recv(&mut rx).await.position().map(|p| p.offset()), Some(1));

    // Drop every Pub/Sub connection; the two sends right after it happen
    // while the member's process is reconnecting (it waits 50 ms first).
    let client = redis::Client::open(url.as_str()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .expect("CLIENT KILL");
    for n in 2..=3u32 {
        sender
            .group_send(&group, Event::new("g", n))
            .await
            .expect("send while the member is disconnected");
    }
    // Once it is back, the next event reveals the gap.
    let deadline = Instant::now() + RECV;
    while !member_layer.is_connected() || !sender.is_connected() {
        assert!(Instant::now() < deadline, "no reconnection in {RECV:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Re-subscribed: is_connected turns true after the subscriptions.
    sender
        .group_send(&group, Event::new("g", 4u32))
        .await
        .expect("send");
    let mut got = Vec::new();
    for _ in 2..=4 {
        let event = recv(&mut rx).await;
        got.push((
            event.position().map(|p| p.offset()),
            event.body::<u32>().expect("body"),
        ));
    }
    assert_eq!(got, vec![(Some(2), 2), (Some(3), 3), (Some(4), 4)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_multi_thread() {
    let Some(redis) = redis().await else { return };
    let url = redis.url.clone();
    let connect = |prefix: String| {
        let url = url.clone();
        async move { without_history(&url, &prefix).await }
    };
    common::layers::suite(unique_prefix, "conformance-mt", &connect)
        .run()
        .await;
}

/// Two instances (two processes) exchange group and direct messages; a full
/// member in one is counted and lags when the other sends to its group; and
/// once an instance is gone its channels are gone for the other.
#[tokio::test]
async fn two_instances() {
    let Some(redis) = redis().await else { return };
    let prefix = unique_prefix("two");
    let capacity = 4;
    let a = layer(&redis.url, &prefix, capacity).await;
    let b = layer(&redis.url, &prefix, capacity).await;

    let mut on_a = a.new_channel().await.unwrap();
    let mut on_b = b.new_channel().await.unwrap();
    a.group_add("room", on_a.name()).await.unwrap();
    b.group_add("room", on_b.name()).await.unwrap();
    let report = a
        .group_send("room", Event::text("chat.message", "hi"))
        .await
        .unwrap();
    // One local member plus one other process.
    assert_eq!(
        (
            report.local_members,
            report.remote_receivers,
            report.dropped
        ),
        (1, Some(1), 0)
    );
    assert_eq!(recv(&mut on_a).await.kind(), "chat.message");
    assert_eq!(recv(&mut on_b).await.kind(), "chat.message");
    b.send(on_a.name(), Event::bare("direct")).await.unwrap();
    assert_eq!(recv(&mut on_a).await.kind(), "direct");

    // Fill b's member, then group send from a: b drops it, counts it and
    // marks the member as lagging.
    for _ in 0..capacity {
        b.send(on_b.name(), Event::bare("fill")).await.unwrap();
    }
    let before = b.stats();
    a.group_send("room", Event::bare("overflow")).await.unwrap();
    assert_eq!(recv(&mut on_a).await.kind(), "overflow");
    match tokio::time::timeout(RECV, on_b.recv()).await {
        Ok(Err(RecvError::Lagged(1))) => {}
        other => panic!("expected Lagged(1), got {other:?}"),
    }
    assert_eq!(b.stats().dropped_full, before.dropped_full + 1);
    for _ in 0..capacity {
        assert_eq!(recv(&mut on_b).await.kind(), "fill");
    }

    // b goes away (a crash looks the same to Redis): its subscriptions go
    // with its connection, so its channels stop existing for a.
    let b_channel = on_b.name().to_owned();
    drop(on_b);
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match a.send(&b_channel, Event::bare("anyone?")).await {
            Err(ChannelLayerError::NoSuchChannel { .. }) => break,
            // A request that reached b's connection while it was closing
            // is answered by nobody: it times out, as any such request.
            Err(e) if common::error_chain(&e).contains("timed out") => assert!(
                Instant::now() < deadline,
                "b's channel still has a subscriber"
            ),
            other => panic!("{other:?}"),
        }
        tokio::task::yield_now().await;
    }
    let report = a.group_send("room", Event::bare("alone")).await.unwrap();
    assert_eq!(
        (report.local_members, report.remote_receivers),
        (1, Some(0)),
        "only a's own member is left: {report:?}"
    );
    assert_eq!(recv(&mut on_a).await.kind(), "alone");
}

/// Worker channels are load-balanced: every job is received exactly once,
/// by one of the instances receiving it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_channel_across_instances() {
    let Some(redis) = redis().await else { return };
    let prefix = unique_prefix("worker");
    let a = layer(&redis.url, &prefix, 64).await;
    let b = layer(&redis.url, &prefix, 64).await;
    let sender = layer(&redis.url, &prefix, 64).await;
    let jobs = 200u32;

    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let total = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for (who, l) in [("a", &a), ("b", &b)] {
        let mut rx = l.receive("thumbnails").await.unwrap();
        let seen = seen.clone();
        let total = total.clone();
        handles.push(tokio::spawn(async move {
            let mut mine = 0;
            while total.load(Ordering::SeqCst) < jobs as usize {
                match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                    Ok(Ok(event)) => {
                        let n: u32 = event.body().unwrap();
                        seen.lock().unwrap().push(n);
                        total.fetch_add(1, Ordering::SeqCst);
                        mine += 1;
                    }
                    Ok(Err(e)) => panic!("{who}: {e}"),
                    Err(_) => {}
                }
            }
            (who, mine)
        }));
    }
    for n in 0..jobs {
        sender
            .send("thumbnails", Event::new("thumbnail.make", n))
            .await
            .unwrap();
    }
    let deadline = tokio::time::timeout(Duration::from_secs(20), async {
        let mut split = Vec::new();
        for h in handles {
            split.push(h.await.unwrap());
        }
        split
    });
    let split = deadline.await.expect("every job received within 20 s");
    let seen = seen.lock().unwrap().clone();
    let unique: HashSet<u32> = seen.iter().copied().collect();
    assert_eq!(seen.len(), jobs as usize, "a job was received twice");
    assert_eq!(unique.len(), jobs as usize);
    eprintln!("worker channel: {jobs} jobs split {split:?}");
}

/// A named (worker) channel can be a group member: its membership lives in
/// Redis, expires after `group_expiry`, and a group send pushes onto its list.
#[tokio::test]
async fn named_channel_in_group() {
    let Some(redis) = redis().await else { return };
    let prefix = unique_prefix("named-group");
    let a = layer(&redis.url, &prefix, 16).await;
    let b = layer(&redis.url, &prefix, 16).await;
    let mut mailer = a.receive("mailer").await.unwrap();

    b.group_add("news", "mailer").await.unwrap();
    let report = b
        .group_send("news", Event::text("news.item", "one"))
        .await
        .unwrap();
    assert_eq!(
        (
            report.local_members,
            report.remote_receivers,
            report.dropped
        ),
        (0, Some(1), 0)
    );
    assert_eq!(recv(&mut mailer).await.kind(), "news.item");

    // A membership older than group_expiry (a day) is dropped, not delivered to.
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{prefix}:group:news");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    redis::cmd("ZADD")
        .arg(&key)
        .arg(now - 2 * 86_400)
        .arg("stale-worker")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let report = a.group_send("news", Event::bare("news.two")).await.unwrap();
    assert_eq!(report.remote_receivers, Some(1), "only mailer: {report:?}");
    let stale: Option<f64> = redis::cmd("ZSCORE")
        .arg(&key)
        .arg("stale-worker")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(stale, None);
    assert_eq!(recv(&mut mailer).await.kind(), "news.two");

    a.group_discard("news", "mailer").await.unwrap();
    let report = b
        .group_send("news", Event::bare("news.three"))
        .await
        .unwrap();
    assert_eq!(report.remote_receivers, Some(0));
    b.send("mailer", Event::bare("sentinel")).await.unwrap();
    assert_eq!(recv(&mut mailer).await.kind(), "sentinel");
}

/// Redis is killed mid-traffic: sends fail promptly; when it is back on the
/// same port, both instances reconnect and re-subscribe by themselves.
#[tokio::test]
async fn redis_restart() {
    if !RedisServer::available() {
        skip("redis-server is not installed (needed to restart it)");
        return;
    }
    let mut server = RedisServer::start().await;
    let url = server.url();
    let prefix = unique_prefix("restart");
    let a = RedisChannelLayer::builder(&url)
        .prefix(&prefix)
        .timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let b = RedisChannelLayer::builder(&url)
        .prefix(&prefix)
        .timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let mut member = b.new_channel().await.unwrap();
    b.group_add("room", member.name()).await.unwrap();
    let mut worker = b.receive("jobs").await.unwrap();
    let mut on_a = a.new_channel().await.unwrap();
    a.group_send("room", Event::bare("before")).await.unwrap();
    assert_eq!(recv(&mut member).await.kind(), "before");

    server.kill();
    let killed = Instant::now();
    let member_name = member.name().to_owned();
    let attempts: [(&str, BoxFuture<'_, Result<(), ChannelLayerError>>); 3] = [
        (
            "group_send",
            Box::pin(async { a.group_send("room", Event::bare("lost")).await.map(drop) }),
        ),
        (
            "send to b",
            Box::pin(a.send(&member_name, Event::bare("lost"))),
        ),
        (
            "send to worker",
            Box::pin(a.send("jobs", Event::bare("lost"))),
        ),
    ];
    for (what, attempt) in attempts {
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .unwrap_or_else(|_| panic!("{what} hung while Redis was down"));
        let took = started.elapsed();
        let err = result.expect_err("a send while Redis is down must fail");
        assert!(
            matches!(err, ChannelLayerError::Backend(_)),
            "{what}: {err}"
        );
        eprintln!("redis down: {what} failed after {took:?}: {err}");
        assert!(took < Duration::from_secs(3), "{what} took {took:?}");
    }
    // Keep Redis down for a while: every attempt keeps failing promptly
    // (also once redis-rs's own reconnect attempts are used up), and the
    // layers' reconnect backoff reaches its cap.
    let mut failures = 0;
    while killed.elapsed() < Duration::from_secs(3) {
        let started = Instant::now();
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            a.send(&member_name, Event::bare("lost")),
        )
        .await
        .expect("send hung while Redis was down");
        assert!(result.is_err(), "a send while Redis is down must fail");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
        failures += 1;
    }
    assert!(
        !b.is_connected(),
        "b cannot be subscribed while Redis is down"
    );
    eprintln!("redis down: {failures} more sends failed promptly in 3 s");
    // A send within this process needs no Redis.
    b.send(&member_name, Event::bare("local")).await.unwrap();
    assert_eq!(recv(&mut member).await.kind(), "local");

    server.restart().await;
    let restarted = Instant::now();
    // Retry until the event arrives: the layers reconnect on their own.
    let mut tries = 0;
    loop {
        tries += 1;
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "no delivery 30 s after the restart"
        );
        if a.group_send("room", Event::bare("after")).await.is_err() {
            tokio::task::yield_now().await;
            continue;
        }
        match tokio::time::timeout(Duration::from_millis(200), member.recv()).await {
            Ok(Ok(e)) if e.kind() == "after" => break,
            Ok(Ok(e)) => panic!("unexpected {e:?}"),
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => {}
        }
    }
    let group_back = restarted.elapsed();
    assert!(b.is_connected());
    // a's process channel is subscribed again too.
    loop {
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "a's channel not back 30 s after the restart"
        );
        b.send(on_a.name(), Event::bare("to-a")).await.ok();
        if let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(200), on_a.recv()).await {
            assert_eq!(e.kind(), "to-a");
            break;
        }
    }
    assert!(a.is_connected());
    // The process channel and the worker are back too.
    a.send(&member_name, Event::bare("direct-after"))
        .await
        .unwrap();
    assert_eq!(recv(&mut member).await.kind(), "direct-after");
    a.send("jobs", Event::bare("job-after")).await.unwrap();
    assert_eq!(recv(&mut worker).await.kind(), "job-after");
    // Drain "after" events from earlier tries that were published but not yet seen.
    let report = a.group_send("room", Event::bare("final")).await.unwrap();
    assert_eq!(report.remote_receivers, Some(1));
    loop {
        let e = recv(&mut member).await;
        if e.kind() == "final" {
            break;
        }
        assert_eq!(e.kind(), "after");
    }
    eprintln!(
        "redis restart: group delivery resumed {group_back:?} after the server was back ({tries} tries)"
    );
}

/// Fan-out figures: one publisher, two subscriber instances with 500
/// members each, 1000 group sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_figures() {
    let Some(redis) = redis().await else { return };
    const MEMBERS: usize = 500;
    const SENDS: usize = 1000;
    let prefix = unique_prefix("fanout");
    let publisher = layer(&redis.url, &prefix, 2048).await;
    let subscribers = [
        layer(&redis.url, &prefix, 2048).await,
        layer(&redis.url, &prefix, 2048).await,
    ];

    let received = Arc::new(AtomicUsize::new(0));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let mut lagged = 0u64;
    for sub in &subscribers {
        for _ in 0..MEMBERS {
            let mut rx = sub.new_channel().await.unwrap();
            sub.group_add("fanout", rx.name()).await.unwrap();
            let received = received.clone();
            let done_tx = done_tx.clone();
            tokio::spawn(async move {
                let mut n = 0;
                // Stop after every send, or after 10 s without an event.
                while n < SENDS {
                    match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                        Ok(Ok(_)) => {
                            n += 1;
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(RecvError::Lagged(_))) => continue,
                        _ => break,
                    }
                }
                let _ = done_tx.send(n);
            });
        }
    }
    drop(done_tx);

    let payload = format!("{{\"message\":\"{}\"}}", "x".repeat(80));
    let started = Instant::now();
    for _ in 0..SENDS {
        let report = publisher
            .group_send("fanout", Event::text("chat.message", payload.clone()))
            .await
            .unwrap();
        assert_eq!(report.remote_receivers, Some(2), "two subscriber processes");
    }
    let published = started.elapsed();
    let mut finished = 0;
    let mut got = 0;
    while let Some(n) = done_rx.recv().await {
        finished += 1;
        got += n;
    }
    let elapsed = started.elapsed();
    assert_eq!(finished, 2 * MEMBERS);
    let expected = 2 * MEMBERS * SENDS;
    let lost = expected - got;
    for sub in &subscribers {
        let s = sub.stats();
        lagged += s.dropped_full;
        assert_eq!(s.dropped_other, 0);
    }
    eprintln!(
        "fan-out: {SENDS} group sends to 2 processes x {MEMBERS} members: published in {published:?} \
         ({:.0} sends/s); {got}/{expected} delivered in {elapsed:?} ({:.0} deliveries/s); lost {lost} \
         (dropped full {lagged})",
        SENDS as f64 / published.as_secs_f64(),
        got as f64 / elapsed.as_secs_f64(),
    );
    assert_eq!(received.load(Ordering::Relaxed), got);
    assert_eq!(lost, 0);
}
