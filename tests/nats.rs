//! `NatsChannelLayer` against a real nats-server.
//!
//! NATS is taken from `NATS_URL` (as `.ci/setup.sh` starts it); if nothing
//! answers there and `nats-server` is installed, each test starts its own
//! on a free port. With neither, the tests print `skipped: no NATS (...)`
//! and pass, unless `TOWER_CHANNELS_REQUIRE_NATS=1`. Tests that restart the
//! server always run their own.
#![cfg(feature = "nats")]

mod common;

use std::{
    collections::HashSet,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use futures_util::SinkExt;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tower_channels::{
    channel_layer::{
        nats::NatsChannelLayer, ChannelLayer, ChannelLayerError, Event, Feature, StreamPosition,
    },
    testing::conformance,
};

use common::layers::{free_port, recv, unique_suffix};

// ------------------------------------------------------------------ server

/// A nats-server this test started (JetStream on, temporary store); killed
/// and its directory removed when dropped.
struct NatsServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    fn available() -> bool {
        Command::new("nats-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    async fn start() -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tower-channels-nats-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("NATS store directory");
        let mut server = NatsServer {
            port: free_port(),
            dir,
            child: None,
        };
        server.restart().await;
        server
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn restart(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let child = Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        // Process start-up: poll until it greets.
        while !answers(&self.url()).await {
            assert!(
                Instant::now() < deadline,
                "nats-server {} did not start",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether a NATS server greets at `url` (it sends `INFO` first).
async fn answers(url: &str) -> bool {
    let hostport = url.trim_start_matches("nats://").to_owned();
    let greet = async {
        let mut stream = tokio::net::TcpStream::connect(&hostport).await.ok()?;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.ok()?;
        Some(buf == *b"INFO")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), greet).await,
        Ok(Some(true))
    )
}

struct Target {
    url: String,
    _server: Option<NatsServer>,
}

fn skip(why: &str) {
    common::layers::skip("NATS", "TOWER_CHANNELS_REQUIRE_NATS", why);
}

async fn nats() -> Option<Target> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    if answers(&url).await {
        return Some(Target { url, _server: None });
    }
    own_server(&format!("nothing answers at {url}"))
        .await
        .map(|s| Target {
            url: s.url(),
            _server: Some(s),
        })
}

async fn own_server(why: &str) -> Option<NatsServer> {
    if !NatsServer::available() {
        skip(&format!("{why} and nats-server is not installed"));
        return None;
    }
    Some(NatsServer::start().await)
}

fn unique_prefix(test: &str) -> String {
    format!("tc-test.{test}.p{}", unique_suffix())
}

async fn layer(url: &str, prefix: &str, capacity: usize) -> NatsChannelLayer {
    NatsChannelLayer::builder(url)
        .prefix(prefix)
        .capacity(capacity)
        .timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

// -------------------------------------------------------------------- tests

#[tokio::test]
async fn conformance_suite() {
    let Some(nats) = nats().await else { return };
    let url = nats.url.clone();
    common::layers::conformance_suite(unique_prefix, "conformance", |prefix| {
        let url = url.clone();
        async move { layer(&url, &prefix, 16).await }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_multi_thread() {
    let Some(nats) = nats().await else { return };
    let url = nats.url.clone();
    let connect = |prefix: String| {
        let url = url.clone();
        async move { layer(&url, &prefix, 16).await }
    };
    common::layers::suite(unique_prefix, "conformance-mt", &connect)
        .run()
        .await;
}

/// Direct sends across processes answer exactly: full, gone, delivered; a
/// named channel cannot join a group without JetStream (no store).
#[tokio::test]
async fn direct_sends_and_limits() {
    let Some(nats) = nats().await else { return };
    let prefix = unique_prefix("direct");
    let a = layer(&nats.url, &prefix, 2).await;
    let b = layer(&nats.url, &prefix, 2).await;
    let mut on_b = b.new_channel().await.unwrap();
    a.send(on_b.name(), Event::bare("1")).await.unwrap();
    a.send(on_b.name(), Event::bare("2")).await.unwrap();
    match a.send(on_b.name(), Event::bare("3")).await {
        Err(ChannelLayerError::ChannelFull { .. }) => {}
        other => panic!("expected ChannelFull, got {other:?}"),
    }
    assert_eq!(recv(&mut on_b).await.kind(), "1");
    assert_eq!(recv(&mut on_b).await.kind(), "2");
    let name = on_b.name().to_owned();
    drop(on_b);
    assert!(matches!(
        a.send(&name, Event::bare("gone")).await,
        Err(ChannelLayerError::NoSuchChannel { .. })
    ));
    assert!(matches!(
        a.send("nobody-receives-this", Event::bare("x")).await,
        Err(ChannelLayerError::NoSuchChannel { .. })
    ));
    // Named channels as group members need the JetStream store, and the
    // layer says so.
    let err = a.group_add("news", "mailer").await.unwrap_err();
    assert!(err.is_unsupported(), "{err}");
    assert!(!a
        .capabilities()
        .supports(tower_channels::channel_layer::Feature::NamedGroupMembers));
    let report = a.group_send("empty", Event::bare("x")).await.unwrap();
    assert_eq!(report.remote_receivers, None);
}

/// Worker channels are load-balanced over the processes receiving them:
/// every job arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_channel_across_processes() {
    let Some(nats) = nats().await else { return };
    let prefix = unique_prefix("worker");
    let a = layer(&nats.url, &prefix, 256).await;
    let b = layer(&nats.url, &prefix, 256).await;
    let sender = layer(&nats.url, &prefix, 256).await;
    let jobs = 200u32;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let total = Arc::new(AtomicUsize::new(0));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    for (who, l) in [("a", &a), ("b", &b)] {
        let mut rx = l.receive("thumbnails").await.unwrap();
        let (seen, total, done_tx) = (seen.clone(), total.clone(), done_tx.clone());
        tokio::spawn(async move {
            let mut mine = 0;
            loop {
                tokio::select! {
                    event = rx.recv() => {
                        let n: u32 = event.unwrap().body().unwrap();
                        seen.lock().unwrap().push(n);
                        mine += 1;
                        if total.fetch_add(1, Ordering::SeqCst) + 1 == jobs as usize {
                            let _ = done_tx.send(());
                        }
                    }
                    () = done_tx.closed() => break,
                }
                if total.load(Ordering::SeqCst) >= jobs as usize {
                    break;
                }
            }
            (who, mine)
        });
    }
    for n in 0..jobs {
        sender
            .send("thumbnails", Event::new("thumbnail.make", n))
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(20), done_rx.recv())
        .await
        .expect("every job received within 20 s");
    let seen = seen.lock().unwrap().clone();
    let unique: HashSet<u32> = seen.iter().copied().collect();
    assert_eq!(seen.len(), jobs as usize, "a job was received twice");
    assert_eq!(unique.len(), jobs as usize);
}

/// The NATS server is killed mid-traffic: sends to other processes fail at
/// once; when it is back on the same port, async-nats reconnects and
/// re-subscribes groups, process and worker channels by itself.
#[tokio::test]
async fn nats_restart() {
    let Some(mut server) = own_server("the restart test needs its own server").await else {
        return;
    };
    let url = server.url();
    let prefix = unique_prefix("restart");
    let a = layer(&url, &prefix, 16).await;
    let b = layer(&url, &prefix, 16).await;
    let mut member = b.new_channel().await.unwrap();
    b.group_add("room", member.name()).await.unwrap();
    let mut worker = b.receive("jobs").await.unwrap();
    a.group_send("room", Event::bare("before")).await.unwrap();
    assert_eq!(recv(&mut member).await.kind(), "before");

    server.kill();
    // The client notices the closed connection on its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.is_connected() {
        assert!(
            Instant::now() < deadline,
            "a still connected 10 s after the kill"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let err = a.group_send("room", Event::bare("lost")).await.unwrap_err();
    assert!(matches!(err, ChannelLayerError::Backend(_)), "{err}");
    assert!(
        error_chain(&err).contains("not connected to NATS"),
        "{err:?}"
    );
    let err = a
        .send(member.name(), Event::bare("lost"))
        .await
        .unwrap_err();
    assert!(matches!(err, ChannelLayerError::Backend(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
    // Sends within a process need no NATS.
    b.send(member.name(), Event::bare("local")).await.unwrap();
    assert_eq!(recv(&mut member).await.kind(), "local");

    server.restart().await;
    let restarted = Instant::now();
    loop {
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "no group delivery 30 s after the restart"
        );
        if a.group_send("room", Event::bare("after")).await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        match tokio::time::timeout(Duration::from_millis(200), member.recv()).await {
            Ok(Ok(e)) if e.kind() == "after" => break,
            Ok(Ok(e)) => panic!("unexpected {e:?}"),
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => {}
        }
    }
    eprintln!(
        "nats restart: group delivery resumed {:?} after the server was back",
        restarted.elapsed()
    );
    a.send(member.name(), Event::bare("direct-after"))
        .await
        .unwrap();
    a.send("jobs", Event::bare("job-after")).await.unwrap();
    assert_eq!(recv(&mut worker).await.kind(), "job-after");
    loop {
        let e = recv(&mut member).await;
        if e.kind() == "direct-after" {
            break;
        }
        assert_eq!(e.kind(), "after");
    }
}

// ------------------------------------------------------ presence and history

/// A layer with the conformance checks' history policy and presence.
async fn configured(url: &str, prefix: &str) -> NatsChannelLayer {
    NatsChannelLayer::builder(url)
        .prefix(prefix)
        .capacity(64)
        .timeout(Duration::from_secs(2))
        .history(conformance::history_policy())
        .presence(conformance::presence_config())
        .build()
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {}", error_chain(&e)))
}

#[tokio::test]
async fn conformance_presence_history() {
    let Some(nats) = nats().await else { return };
    let url = nats.url.clone();
    let plain = layer(&url, &unique_prefix("caps"), 16).await;
    assert!(!plain.capabilities().supports(Feature::History));
    assert!(!plain.capabilities().supports(Feature::Presence));
    assert!(plain
        .recover("g", &StreamPosition::new(1, "e"))
        .await
        .unwrap_err()
        .is_unsupported());
    common::layers::conformance_suite(unique_prefix, "conformance-ph", |prefix| {
        let url = url.clone();
        async move {
            let layer = configured(&url, &prefix).await;
            assert!(layer.capabilities().supports(Feature::History));
            assert!(layer.capabilities().supports(Feature::Presence));
            layer
        }
    })
    .await;
}

/// With JetStream, named channels are group members: the conformance
/// checks gated on the capability (`worker_channel`, `pair_worker`) run in
/// `conformance_presence_history`; here, a full named member.
#[tokio::test]
async fn named_group_members() {
    let Some(nats) = nats().await else { return };
    let prefix = unique_prefix("named");
    let a = configured(&nats.url, &prefix).await;
    let b = configured(&nats.url, &prefix).await;
    assert!(a.capabilities().supports(Feature::NamedGroupMembers));
    // A full named member counts as dropped; the group send succeeds.
    let mut group_member = a.new_channel().await.unwrap();
    a.group_add("named.full", group_member.name())
        .await
        .unwrap();
    let _jobs = b.receive("named.jobs").await.unwrap();
    a.group_add("named.full", "named.jobs").await.unwrap();
    let mut dropped = 0;
    for n in 0..70u32 {
        let report = a
            .group_send("named.full", Event::new("n", n))
            .await
            .unwrap();
        dropped += report.dropped;
        assert_eq!(recv(&mut group_member).await.kind(), "n");
    }
    assert_eq!(dropped, 70 - 64, "capacity 64: the rest dropped");
}

/// `flush` empties what the JetStream store keeps under its prefix, for
/// every process: histories (recovering fails, the next send starts a new
/// epoch), presence, named members (a group send no longer reaches them).
/// Another prefix on the same NATS keeps its own.
#[tokio::test]
async fn flush_empties_the_store_of_its_prefix_only() {
    use tower_channels::channel_layer::{PresenceInfo, RecoveryFailure};
    let Some(nats) = nats().await else { return };
    let prefix = unique_prefix("flush");
    let a = configured(&nats.url, &prefix).await;
    let b = configured(&nats.url, &prefix).await;
    let other = configured(&nats.url, &unique_prefix("flush-other")).await;
    let history = format!("{}.flush", conformance::HISTORY_GROUPS);
    let room = "flush.room";
    let since_first = |p: &StreamPosition| StreamPosition::new(1, p.epoch());
    let users = |members: Vec<tower_channels::channel_layer::PresenceMember>| -> Vec<String> {
        members.iter().map(|m| m.user_id().to_owned()).collect()
    };
    // The same groups, user and named channel under both prefixes.
    let mut kept = Vec::new();
    for (layer, receiver) in [(&a, &b), (&other, &other)] {
        let mut last = None;
        for n in 0..3u32 {
            let sent = layer.group_send(&history, Event::new("h", n)).await;
            last = sent.unwrap().position;
        }
        let last = last.unwrap();
        let r = layer.recover(&history, &since_first(&last)).await.unwrap();
        assert_eq!(r.events().len(), 2, "{r:?}");
        let member = layer.new_channel().await.unwrap();
        let ada = PresenceInfo::new("ada").unwrap();
        layer.presence_join(room, member.name(), ada).await.unwrap();
        assert_eq!(users(layer.presence(room).await.unwrap()), ["ada"]);
        let mut jobs = receiver.receive("flush.jobs").await.unwrap();
        layer.group_add(room, "flush.jobs").await.unwrap();
        let report = layer.group_send(room, Event::bare("before")).await.unwrap();
        assert_eq!(report.remote_receivers, Some(1), "{report:?}");
        assert_eq!(recv(&mut jobs).await.kind(), "before");
        kept.push((last, member, jobs));
    }
    let (old, _member, mut jobs) = kept.remove(0);
    let (other_last, _other_member, mut other_jobs) = kept.remove(0);

    a.flush().await.unwrap();

    let r = b.recover(&history, &old).await.unwrap();
    assert_eq!(r.failure(), Some(RecoveryFailure::EpochChanged), "{r:?}");
    assert!(r.events().is_empty());
    assert!(a.presence(room).await.unwrap().is_empty());
    assert!(b.presence(room).await.unwrap().is_empty());
    let report = a.group_send(room, Event::bare("after")).await.unwrap();
    assert_eq!((report.remote_receivers, report.dropped), (None, 0));
    a.send("flush.jobs", Event::bare("marker")).await.unwrap();
    assert_eq!(
        recv(&mut jobs).await.kind(),
        "marker",
        "a group send reached a flushed named member"
    );
    let new = b.group_send(&history, Event::bare("h")).await.unwrap();
    let new = new.position.unwrap();
    assert_eq!(new.offset(), 1);
    assert_ne!(new.epoch(), old.epoch());
    // A process that appended before the flush continues the new epoch.
    let next = a.group_send(&history, Event::bare("h")).await.unwrap();
    assert_eq!(next.position, Some(StreamPosition::new(2, new.epoch())));

    // The other prefix is untouched.
    let r = other
        .recover(&history, &since_first(&other_last))
        .await
        .unwrap();
    assert_eq!(r.events().len(), 2, "{r:?}");
    assert_eq!(users(other.presence(room).await.unwrap()), ["ada"]);
    let report = other.group_send(room, Event::bare("kept")).await.unwrap();
    assert_eq!(report.remote_receivers, Some(1), "{report:?}");
    assert_eq!(recv(&mut other_jobs).await.kind(), "kept");
}

/// Many concurrent history sends from three processes: offsets are
/// contiguous and unique (the expected-last-sequence race is retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_history_sends_get_contiguous_offsets() {
    let Some(nats) = nats().await else { return };
    let prefix = unique_prefix("contended");
    let group = format!("{}.contended", conformance::HISTORY_GROUPS);
    let layers = [
        configured(&nats.url, &prefix).await,
        configured(&nats.url, &prefix).await,
        configured(&nats.url, &prefix).await,
    ];
    let mut member = layers[0].new_channel().await.unwrap();
    layers[0].group_add(&group, member.name()).await.unwrap();
    let sends = layers.iter().map(|l| {
        let group = group.clone();
        async move {
            let mut offsets = Vec::new();
            for n in 0..20u32 {
                let report = l.group_send(&group, Event::new("h", n)).await.unwrap();
                offsets.push(report.position.unwrap().offset());
            }
            offsets
        }
    });
    let mut all: Vec<u64> = futures_util::future::join_all(sends)
        .await
        .into_iter()
        .flatten()
        .collect();
    all.sort_unstable();
    assert_eq!(all, (1..=60).collect::<Vec<_>>());
    for expected in 1..=60u64 {
        let event = recv(&mut member).await;
        assert_eq!(event.position().map(StreamPosition::offset), Some(expected));
    }
}

/// NATS restarts with the same store: every history send answered OK,
/// before or after, reaches a member that stayed connected, in order and
/// once, and is recovered; the epoch is kept; presence is listed again.
#[tokio::test]
async fn history_and_presence_survive_a_nats_restart() {
    let Some(mut server) = own_server("the restart test needs its own server").await else {
        return;
    };
    let url = server.url();
    let prefix = unique_prefix("hist-restart");
    let group = format!("{}.restart", conformance::HISTORY_GROUPS);
    let a = configured(&url, &prefix).await;
    let b = configured(&url, &prefix).await;
    let mut member = b.new_channel().await.unwrap();
    let alice = tower_channels::channel_layer::PresenceInfo::new("alice").unwrap();
    b.presence_join(&group, member.name(), alice).await.unwrap();
    let mut answered = Vec::new();
    for n in 0..3u32 {
        let report = a.group_send(&group, Event::new("h", n)).await.unwrap();
        answered.push(report.position.unwrap());
    }
    let first = answered[0].clone();

    server.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.is_connected() || b.is_connected() {
        assert!(
            Instant::now() < deadline,
            "still connected 10 s after the kill"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(a.group_send(&group, Event::bare("down")).await.is_err());
    server.restart().await;

    let restarted = Instant::now();
    while answered.len() < 8 {
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "history sends still failing 30 s after the restart"
        );
        match a.group_send(&group, Event::new("h", answered.len())).await {
            Ok(report) => answered.push(report.position.unwrap()),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(
        answered.iter().all(|p| p.epoch() == first.epoch()),
        "the history survived the restart: {answered:?}"
    );
    // A send that failed ("unknown") may have been stored too: the member
    // gets one contiguous run of offsets, once each, holding every answered one.
    let top = answered.last().map_or(0, StreamPosition::offset);
    let mut received = Vec::new();
    while received.last().copied().unwrap_or(0) < top {
        let event = recv(&mut member).await;
        let position = event.position().expect("a history event has a position");
        assert_eq!(position.epoch(), first.epoch());
        received.push(position.offset());
    }
    assert_eq!(received, (1..=top).collect::<Vec<_>>());
    assert!(answered.iter().all(|p| received.contains(&p.offset())));
    let recovery = b.recover(&group, &first).await.unwrap();
    let recovered: Vec<u64> = recovery
        .events()
        .iter()
        .filter_map(|e| e.position().map(StreamPosition::offset))
        .collect();
    assert_eq!(recovered, (2..=top).collect::<Vec<_>>(), "{recovery:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let members = b.presence(&group).await;
        if let Ok(members) = &members {
            if members.len() == 1 && members[0].user_id() == "alice" {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "presence after the restart: {members:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// NATS restarts without its store: history sends work again in a new
/// epoch from offset 1 (the stream is made again), a member that stayed
/// connected follows the new epoch, recovering an old position says the
/// epoch changed, and presence is written again.
#[tokio::test]
async fn history_and_presence_after_nats_lost_its_store() {
    let Some(mut server) = own_server("the restart test needs its own server").await else {
        return;
    };
    let url = server.url();
    let prefix = unique_prefix("store-lost");
    let group = format!("{}.lost", conformance::HISTORY_GROUPS);
    let a = configured(&url, &prefix).await;
    let b = configured(&url, &prefix).await;
    let mut member = b.new_channel().await.unwrap();
    let alice = tower_channels::channel_layer::PresenceInfo::new("alice").unwrap();
    b.presence_join(&group, member.name(), alice).await.unwrap();
    let old = a
        .group_send(&group, Event::bare("h"))
        .await
        .unwrap()
        .position
        .unwrap();
    assert_eq!(recv(&mut member).await.position(), Some(&old));

    server.kill();
    std::fs::remove_dir_all(&server.dir).expect("remove the NATS store");
    std::fs::create_dir_all(&server.dir).expect("NATS store directory");
    server.restart().await;

    let restarted = Instant::now();
    let new = loop {
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "history sends still failing 30 s after the restart"
        );
        match a.group_send(&group, Event::bare("h")).await {
            Ok(report) => break report.position.unwrap(),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    assert_ne!(
        new.epoch(),
        old.epoch(),
        "a new epoch after the store was lost"
    );
    // The member gets the new epoch from its first offset, in order.
    let mut offsets = Vec::new();
    while offsets.last().copied().unwrap_or(0) < new.offset() {
        let event = recv(&mut member).await;
        let position = event.position().expect("position").clone();
        assert_eq!(position.epoch(), new.epoch());
        offsets.push(position.offset());
    }
    assert_eq!(offsets, (1..=new.offset()).collect::<Vec<_>>());
    let recovery = b.recover(&group, &old).await.unwrap();
    assert_eq!(
        recovery.failure(),
        Some(tower_channels::channel_layer::RecoveryFailure::EpochChanged),
        "{recovery:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let members = b.presence(&group).await;
        if matches!(&members, Ok(m) if m.len() == 1 && m[0].user_id() == "alice") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "presence after the store was lost: {members:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A process that stops without leaving (its receiver is never dropped,
/// the layer is): its members vanish from listings within the TTL of its
/// last refresh, which came at most a third of the TTL before it stopped,
/// and a live process announces their `presence.leave` once, within
/// TTL + TTL/3.
#[tokio::test]
async fn presence_of_a_stopped_process_expires() {
    use tower_channels::channel_layer::{
        GroupPattern, PresenceChange, PresenceConfig, PresenceInfo, PRESENCE_JOIN, PRESENCE_LEAVE,
    };
    let Some(nats) = nats().await else { return };
    let prefix = unique_prefix("presence-expiry");
    let ttl = Duration::from_secs(2);
    let make = || {
        NatsChannelLayer::builder(&nats.url)
            .prefix(&prefix)
            .presence(PresenceConfig::new().ttl(ttl).notify(GroupPattern::any()))
            .build()
    };
    let a = make().await.unwrap();
    let b = make().await.unwrap();
    let info = |u: &str| PresenceInfo::new(u).unwrap();
    let mut on_a = a.new_channel().await.unwrap();
    a.presence_join("room", on_a.name(), info("ada"))
        .await
        .unwrap();
    let on_b = b.new_channel().await.unwrap();
    b.presence_join("room", on_b.name(), info("bob"))
        .await
        .unwrap();
    assert_eq!(a.presence("room").await.unwrap().len(), 2);
    for _ in 0..2 {
        assert_eq!(recv(&mut on_a).await.kind(), PRESENCE_JOIN);
    }
    // The "crash": bob's channel never leaves, and its process goes away.
    std::mem::forget(on_b);
    drop(b);
    let stopped = Instant::now();
    // JetStream expires by a timer: allow it a second past each bound.
    let slack = Duration::from_secs(1);
    loop {
        let users: Vec<String> = a
            .presence("room")
            .await
            .unwrap()
            .iter()
            .map(|m| m.user_id().to_owned())
            .collect();
        if users == ["ada"] {
            break;
        }
        assert!(
            stopped.elapsed() < ttl + slack,
            "bob still listed {:?} after his process stopped: {users:?}",
            stopped.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed_until = stopped.elapsed();
    let leave = recv(&mut on_a).await;
    assert_eq!(leave.kind(), PRESENCE_LEAVE);
    assert_eq!(leave.body::<PresenceChange>().unwrap().user_id, "bob");
    let announced = stopped.elapsed();
    assert!(announced < ttl + ttl / 3 + slack, "{announced:?}");
    eprintln!("a stopped process's member left the listing after {listed_until:?}, announced after {announced:?}");
    // Ada's own process keeps refreshing her; bob is announced once.
    tokio::time::sleep(ttl * 2).await;
    assert_eq!(a.presence("room").await.unwrap().len(), 1);
    assert!(on_a.try_recv().is_none(), "a second announcement");
}

/// Bob on B, alice on A, then a second connection of alice on B: the joins
/// of bob and alice are announced once each, the second connection is not
/// announced at all (alice was present on A already), and presence lists
/// both users. Each member receives exactly those notifications: a marker
/// sent by each process after the last join comes next.
#[tokio::test]
async fn second_connection_of_a_user_on_another_process_is_not_announced() {
    use tower_channels::channel_layer::{
        GroupPattern, HistoryPolicy, PresenceChange, PresenceConfig, PresenceInfo, PRESENCE_JOIN,
    };
    let Some(nats) = nats().await else { return };
    let prefix = unique_prefix("presence-second");
    let make = || {
        NatsChannelLayer::builder(&nats.url)
            .prefix(&prefix)
            .timeout(Duration::from_secs(2))
            .history(HistoryPolicy::new(GroupPattern::prefix("chat")))
            .presence(PresenceConfig::new().notify(GroupPattern::prefix("chat")))
            .build()
    };
    let a = make().await.unwrap();
    let b = make().await.unwrap();
    let group = "chat_room";
    let info = |u: &str| PresenceInfo::new(u).unwrap();
    let users = |members: Vec<tower_channels::channel_layer::PresenceMember>| -> Vec<String> {
        members.iter().map(|m| m.user_id().to_owned()).collect()
    };
    // What a member received, up to `markers` markers.
    async fn received(
        rx: &mut tower_channels::channel_layer::ChannelReceiver,
        markers: usize,
    ) -> Vec<String> {
        let mut seen = Vec::new();
        let mut left = markers;
        while left > 0 {
            let event = recv(rx).await;
            match event.kind() {
                "marker" => {
                    left -= 1;
                    seen.push(format!("marker {}", event.body::<String>().unwrap()));
                }
                kind => {
                    let change = event.body::<PresenceChange>().unwrap();
                    seen.push(format!("{kind} {}", change.user_id));
                }
            }
        }
        seen
    }
    let mut bob = b.new_channel().await.unwrap();
    b.presence_join(group, bob.name(), info("bob"))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut bob)
            .await
            .body::<PresenceChange>()
            .unwrap()
            .user_id,
        "bob"
    );
    let mut alice1 = a.new_channel().await.unwrap();
    a.presence_join(group, alice1.name(), info("alice"))
        .await
        .unwrap();
    for rx in [&mut bob, &mut alice1] {
        let join = recv(rx).await;
        assert_eq!(join.kind(), PRESENCE_JOIN);
        assert_eq!(join.body::<PresenceChange>().unwrap().user_id, "alice");
    }
    assert_eq!(users(b.presence(group).await.unwrap()), ["alice", "bob"]);

    let mut alice2 = b.new_channel().await.unwrap();
    b.presence_join(group, alice2.name(), info("alice"))
        .await
        .unwrap();
    for (layer, name) in [(&a, "a"), (&b, "b")] {
        let marker = Event::new("marker", name).ephemeral();
        layer.group_send(group, marker).await.unwrap();
    }
    for (rx, who) in [
        (&mut bob, "bob"),
        (&mut alice1, "alice on A"),
        (&mut alice2, "alice on B"),
    ] {
        let mut seen = received(rx, 2).await;
        seen.sort();
        assert_eq!(seen, ["marker a", "marker b"], "{who} received");
    }
    assert_eq!(users(b.presence(group).await.unwrap()), ["alice", "bob"]);
    assert_eq!(users(a.presence(group).await.unwrap()), ["alice", "bob"]);

    // Both tabs close at the same moment (as the chat's two closes do):
    // alice leaves once.
    let (left_a, left_b) = tokio::join!(
        a.group_discard(group, alice1.name()),
        b.group_discard(group, alice2.name())
    );
    left_a.unwrap();
    left_b.unwrap();
    for (layer, name) in [(&a, "a"), (&b, "b")] {
        let marker = Event::new("marker", name).ephemeral();
        layer.group_send(group, marker).await.unwrap();
    }
    let mut seen = received(&mut bob, 2).await;
    seen.sort();
    assert_eq!(
        seen,
        ["marker a", "marker b", "presence.leave alice"],
        "bob received"
    );
    assert_eq!(users(a.presence(group).await.unwrap()), ["bob"]);
}

// ------------------------------------------------------------- chat example

use common::*;

/// The text of a chat frame (`message`, without its history position), or
/// the frame itself when it is not a chat message (an error frame).
fn text_of(frame: &str) -> String {
    serde_json::from_str::<serde_json::Value>(frame)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| frame.to_owned())
}

async fn send_text(ws: &mut Client, text: &str) {
    ws.send(WsMessage::text(text.to_owned())).await.unwrap();
}

/// Two chat example processes share rooms through NATS.
#[tokio::test]
async fn two_chat_processes_share_a_room() {
    let Some(nats) = nats().await else { return };
    let (_a, addr_a) = spawn_example_with("chat", &["--nats", &nats.url]);
    let (_b, addr_b) = spawn_example_with("chat", &["--nats", &nats.url]);
    let room = format!("/ws/chat/nats-e2e-{}", std::process::id());
    let mut on_a = connect(addr_a, &room).await;
    let mut on_b = connect(addr_b, &room).await;
    let mut elsewhere = connect(addr_b, &format!("{room}-other")).await;
    send_text(&mut on_a, r#"{"message":"from a"}"#).await;
    assert_eq!(text_of(&next_text(&mut on_a).await), "from a");
    assert_eq!(text_of(&next_text(&mut on_b).await), "from a");
    send_text(&mut on_b, r#"{"message":"from b"}"#).await;
    assert_eq!(text_of(&next_text(&mut on_b).await), "from b");
    assert_eq!(text_of(&next_text(&mut on_a).await), "from b");
    send_text(&mut elsewhere, r#"{"message":"other room"}"#).await;
    assert_eq!(text_of(&next_text(&mut elsewhere).await), "other room");
}

/// The NATS server restarts under two chat processes: messages sent while
/// it is down get an error frame, and the same sockets carry messages
/// again once it is back, without being closed.
#[tokio::test]
async fn chat_survives_nats_restart() {
    let Some(mut server) = own_server("the restart test needs its own server").await else {
        return;
    };
    let url = server.url();
    let (_a, addr_a) = spawn_example_with("chat", &["--nats", &url]);
    let (_b, addr_b) = spawn_example_with("chat", &["--nats", &url]);
    let mut on_a = connect(addr_a, "/ws/chat/restart").await;
    let mut on_b = connect(addr_b, "/ws/chat/restart").await;
    send_text(&mut on_a, r#"{"message":"hello"}"#).await;
    assert_eq!(text_of(&next_text(&mut on_a).await), "hello");
    assert_eq!(text_of(&next_text(&mut on_b).await), "hello");

    server.kill();
    // Until a's client notices, a send may still be accepted; once it has,
    // the sender is told its message was not delivered. Either way a's own
    // socket gets its copy (local members are served before NATS is
    // asked), so a's frames are read until the error frame.
    let deadline = Instant::now() + Duration::from_secs(10);
    'outage: loop {
        assert!(
            Instant::now() < deadline,
            "no error frame while NATS was down"
        );
        send_text(&mut on_a, r#"{"message":"during"}"#).await;
        while let Ok(t) =
            tokio::time::timeout(Duration::from_millis(300), next_text(&mut on_a)).await
        {
            if t.contains("temporarily unavailable") {
                break 'outage;
            }
            assert_eq!(text_of(&t), "during");
        }
    }

    server.restart().await;
    let started = Instant::now();
    let text = r#"{"message":"after restart"}"#;
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "room silent 30 s after NATS restarted"
        );
        send_text(&mut on_a, text).await;
        // b may first get "during" sends that a's client accepted before it
        // noticed the outage and flushed after reconnecting.
        let got = tokio::time::timeout(Duration::from_millis(300), async {
            loop {
                let t = next_text(&mut on_b).await;
                if text_of(&t) != "during" {
                    return t;
                }
            }
        })
        .await;
        if let Ok(got) = got {
            assert_eq!(text_of(&got), "after restart");
            break;
        }
    }
    // Both sockets still carry messages: a sync marker reaches both, after
    // any late copies (a's own copies and error frames of earlier tries, b's
    // copies of them).
    send_text(&mut on_a, r#"{"message":"sync"}"#).await;
    for ws in [&mut on_a, &mut on_b] {
        loop {
            let t = next_text(ws).await;
            if text_of(&t) == "sync" {
                break;
            }
            assert!(
                text_of(&t) == "after restart"
                    || text_of(&t) == "during"
                    || t.contains("temporarily unavailable"),
                "{t}"
            );
        }
    }
}
