//! The mesh protocol on the simulated broker, on a paused clock: the
//! conformance suite, then each fault. No test sleeps to wait for
//! something; waits are bounded receives (which a paused clock runs
//! instantly when nothing can arrive).

use std::{collections::HashSet, sync::Arc, time::Duration};

use super::{
    sim::{self, Faults, SimNet},
    MeshConfig, MeshLayer,
};
use crate::{
    channel_layer::{
        error::error_chain, ChannelLayer, ChannelLayerError, ChannelReceiver, Event, GroupPattern,
        HistoryPolicy,
    },
    testing::conformance,
};

const TIMEOUT: Duration = Duration::from_secs(2);

/// Groups starting with this keep as many events as the simulated store.
const LONG_HISTORY: &str = "long";

fn config(capacity: usize) -> MeshConfig {
    MeshConfig {
        prefix: super::sim::PREFIX.into(),
        capacity,
        timeout: TIMEOUT,
        history: vec![
            conformance::history_policy(),
            HistoryPolicy::new(GroupPattern::prefix(LONG_HISTORY)).max_len(sim::KEPT),
        ],
        presence: Some(conformance::presence_config()),
        named_expiry: super::NAMED_MEMBER_EXPIRY,
    }
}

type Sim = MeshLayer<super::sim::SimTransport>;

async fn process(net: &SimNet, capacity: usize) -> Sim {
    let (transport, inbox) = net.connect();
    MeshLayer::start(transport, inbox, config(capacity), Arc::default())
        .await
        .expect("start a mesh process")
}

async fn recv(rx: &mut ChannelReceiver) -> Event {
    match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        Ok(Ok(e)) => e,
        other => panic!("{}: expected an event, got {other:?}", rx.name()),
    }
}

/// Receives until `expected` kinds all arrived, failing on a repeat.
async fn receive_set(rx: &mut ChannelReceiver, expected: &HashSet<String>) {
    let mut seen = HashSet::new();
    while seen.len() < expected.len() {
        let kind = recv(rx).await.kind().to_owned();
        assert!(expected.contains(&kind), "unexpected {kind}");
        assert!(seen.insert(kind.clone()), "{kind} delivered twice");
    }
}

/// The whole suite (the processes have presence and history).
#[tokio::test(start_paused = true)]
async fn conformance_on_the_simulated_broker() {
    conformance::Suite::new(|| async {
        let net = SimNet::new(1);
        Arc::new(process(&net, 16).await) as Arc<dyn ChannelLayer>
    })
    .pair(|| async {
        let net = SimNet::new(2);
        let a = process(&net, 16).await;
        let b = process(&net, 16).await;
        assert_ne!(a.process_name(), b.process_name());
        (
            Arc::new(a) as Arc<dyn ChannelLayer>,
            Arc::new(b) as Arc<dyn ChannelLayer>,
        )
    })
    .run()
    .await;
}

/// Duplicated and reordered messages: every group event and direct send
/// arrives once (order across messages is not promised under reordering).
#[tokio::test(start_paused = true)]
async fn duplicates_and_reordering_deliver_once() {
    let net = SimNet::new(7);
    let a = process(&net, 1000).await;
    let b = process(&net, 1000).await;
    let mut member = b.new_channel().await.unwrap();
    b.group_add("room", member.name()).await.unwrap();
    net.set_faults(Faults {
        duplicate: 500,
        max_delay: Duration::from_millis(20),
        ..Faults::default()
    });
    let mut expected = HashSet::new();
    for i in 0..100 {
        let kind = format!("g.{i}");
        a.group_send("room", Event::bare(kind.clone()))
            .await
            .unwrap();
        expected.insert(kind);
    }
    for i in 0..50 {
        let kind = format!("d.{i}");
        a.send(member.name(), Event::bare(kind.clone()))
            .await
            .unwrap();
        expected.insert(kind);
    }
    receive_set(&mut member, &expected).await;
    // Nothing more: copies still in flight are repeats (dropped), so a
    // sentinel sent with the faults off comes next.
    net.set_faults(Faults::default());
    a.send(member.name(), Event::bare("sentinel"))
        .await
        .unwrap();
    assert_eq!(recv(&mut member).await.kind(), "sentinel");
}

/// A direct send whose request or reply is lost times out with an error
/// (it does not hang), within the layer's timeout.
#[tokio::test(start_paused = true)]
async fn lost_replies_time_out() {
    let net = SimNet::new(3);
    let a = process(&net, 16).await;
    let b = process(&net, 16).await;
    let mut inbox = b.new_channel().await.unwrap();
    net.set_faults(Faults {
        drop: 1000,
        ..Faults::default()
    });
    let started = tokio::time::Instant::now();
    let err = a.send(inbox.name(), Event::bare("lost")).await.unwrap_err();
    assert!(
        error_chain(&err).contains("timed out"),
        "{}",
        error_chain(&err)
    );
    assert_eq!(started.elapsed(), TIMEOUT);
    net.set_faults(Faults::default());
    a.send(inbox.name(), Event::bare("after")).await.unwrap();
    assert_eq!(recv(&mut inbox).await.kind(), "after");
}

/// "Timed out" means "unknown": a reply delayed past the timeout fails the
/// send, and the event is still delivered, once.
#[tokio::test(start_paused = true)]
async fn a_timed_out_send_may_still_arrive() {
    let net = SimNet::new(4);
    let a = process(&net, 16).await;
    let b = process(&net, 16).await;
    let mut inbox = b.new_channel().await.unwrap();
    net.set_faults(Faults {
        max_delay: TIMEOUT * 3,
        ..Faults::default()
    });
    let mut failed = 0;
    for i in 0..10 {
        if a.send(inbox.name(), Event::bare(format!("e.{i}")))
            .await
            .is_err()
        {
            failed += 1;
        }
    }
    assert!(
        failed > 0,
        "some replies should take longer than the timeout"
    );
    let expected: HashSet<String> = (0..10).map(|i| format!("e.{i}")).collect();
    receive_set(&mut inbox, &expected).await;
}

/// A partitioned process: its sends fail promptly (not sent, tried once
/// more), nobody can reach its channels (`NoSuchChannel`, as for a process
/// that is gone), and after healing everything works again.
#[tokio::test(start_paused = true)]
async fn partitioned_process() {
    let net = SimNet::new(5);
    let a = process(&net, 16).await;
    let (tb, inbox_b) = net.connect();
    let b_transport_net = net.clone();
    let b = MeshLayer::start(tb, inbox_b, config(16), Arc::default())
        .await
        .unwrap();
    let mut on_a = a.new_channel().await.unwrap();
    a.group_add("room", on_a.name()).await.unwrap();
    let mut on_b = b.new_channel().await.unwrap();
    b.group_add("room", on_b.name()).await.unwrap();

    b_transport_net.partition(&b.inner.transport, true);
    let started = tokio::time::Instant::now();
    let calls = net.publish_calls();
    let err = b.group_send("room", Event::bare("cut")).await.unwrap_err();
    assert!(matches!(err, ChannelLayerError::Backend(_)), "{err}");
    assert!(started.elapsed() < TIMEOUT, "not sent: fails at once");
    assert_eq!(net.publish_calls() - calls, 2, "not sent: tried once more");
    // b's own member still got it (local members come first).
    assert_eq!(recv(&mut on_b).await.kind(), "cut");
    let err = a.send(on_b.name(), Event::bare("x")).await.unwrap_err();
    assert!(
        matches!(err, ChannelLayerError::NoSuchChannel { .. }),
        "{err}"
    );
    a.group_send("room", Event::bare("missed by b"))
        .await
        .unwrap();
    assert_eq!(recv(&mut on_a).await.kind(), "missed by b");

    b_transport_net.partition(&b.inner.transport, false);
    a.group_send("room", Event::bare("healed")).await.unwrap();
    assert_eq!(recv(&mut on_a).await.kind(), "healed");
    assert_eq!(recv(&mut on_b).await.kind(), "healed");
}

/// The broker restarts: operations fail while it is down (promptly), then
/// the subscriptions are back and group sends and direct sends work.
#[tokio::test(start_paused = true)]
async fn broker_restart() {
    let net = SimNet::new(6);
    let a = process(&net, 16).await;
    let b = process(&net, 16).await;
    let mut on_b = b.new_channel().await.unwrap();
    b.group_add("room", on_b.name()).await.unwrap();

    let restarting = {
        let net = net.clone();
        tokio::spawn(async move { net.restart(Duration::from_secs(1)).await })
    };
    tokio::task::yield_now().await;
    let err = a.group_send("room", Event::bare("down")).await.unwrap_err();
    assert!(
        error_chain(&err).contains("broker is down"),
        "{}",
        error_chain(&err)
    );
    restarting.await.unwrap();

    a.group_send("room", Event::bare("up")).await.unwrap();
    assert_eq!(recv(&mut on_b).await.kind(), "up");
    a.send(on_b.name(), Event::bare("direct")).await.unwrap();
    assert_eq!(recv(&mut on_b).await.kind(), "direct");
}

/// Membership of another process's channel is a request: it subscribes
/// before answering, and a channel that is gone is `NoSuchChannel`. A
/// named member gets group sends through the store.
#[tokio::test(start_paused = true)]
async fn remote_membership() {
    let net = SimNet::new(8);
    let a = process(&net, 16).await;
    let b = process(&net, 16).await;
    let mut on_b = b.new_channel().await.unwrap();
    a.group_add("room", on_b.name()).await.unwrap();
    a.group_send("room", Event::bare("hi")).await.unwrap();
    assert_eq!(recv(&mut on_b).await.kind(), "hi");
    a.group_discard("room", on_b.name()).await.unwrap();
    let gone = b.new_channel().await.unwrap();
    let name = gone.name().to_owned();
    drop(gone);
    let err = a.group_add("room", &name).await.unwrap_err();
    assert!(
        matches!(err, ChannelLayerError::NoSuchChannel { .. }),
        "{err}"
    );
    // A named channel joins in the store; group sends reach it.
    let mut workers = b.receive("workers").await.unwrap();
    a.group_add("room", "workers").await.unwrap();
    let report = a.group_send("room", Event::bare("job")).await.unwrap();
    assert_eq!(recv(&mut workers).await.kind(), "job");
    assert_eq!((report.remote_receivers, report.dropped), (Some(1), 0));
    drop(workers);
    let report = a.group_send("room", Event::bare("job")).await.unwrap();
    assert_eq!(report.dropped, 1, "nobody receives the named member");
}

/// An operation that may have reached the broker is never resent: the
/// send fails ("unknown") and the event arrives once.
#[tokio::test(start_paused = true)]
async fn maybe_sent_is_not_retried() {
    let net = SimNet::new(9);
    let a = process(&net, 16).await;
    let b = process(&net, 16).await;
    let mut on_b = b.new_channel().await.unwrap();
    b.group_add("room", on_b.name()).await.unwrap();
    net.set_faults(Faults {
        lose_answer: 1000,
        ..Faults::default()
    });
    let calls = net.publish_calls();
    let err = a.group_send("room", Event::bare("once")).await.unwrap_err();
    assert_eq!(net.publish_calls() - calls, 1, "maybe sent: not resent");
    assert!(
        error_chain(&err).contains("broke after sending"),
        "{}",
        error_chain(&err)
    );
    net.set_faults(Faults::default());
    a.group_send("room", Event::bare("next")).await.unwrap();
    assert_eq!(recv(&mut on_b).await.kind(), "once");
    assert_eq!(recv(&mut on_b).await.kind(), "next");
}

/// A subscription whose answer was lost may have taken effect at the
/// broker: the group add fails, and when the group's last member here
/// leaves, the subscription is taken back instead of staying behind (and
/// bringing the group's traffic to a process with no member in it).
#[tokio::test(start_paused = true)]
async fn a_failed_subscription_does_not_outlive_the_membership() {
    let net = SimNet::new(12);
    let a = process(&net, 16).await;
    let on_a = a.new_channel().await.unwrap();
    let subject = format!("{}.group.room", super::sim::PREFIX);
    net.set_faults(Faults {
        lose_subscribe_answer: 1000,
        ..Faults::default()
    });
    let err = a.group_add("room", on_a.name()).await.unwrap_err();
    assert!(
        error_chain(&err).contains("broke after subscribing"),
        "{}",
        error_chain(&err)
    );
    net.set_faults(Faults::default());
    assert!(
        net.subscribed(a.transport(), &subject),
        "the subscription took effect"
    );
    a.group_discard("room", on_a.name()).await.unwrap();
    assert!(
        !net.subscribed(a.transport(), &subject),
        "the failed subscription stayed after the last member left"
    );
}

fn history_group(name: &str) -> String {
    format!("{}.{name}", conformance::HISTORY_GROUPS)
}

/// Receives `n` history events and returns their (offset, epoch).
async fn positions(rx: &mut ChannelReceiver, n: usize) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let event = recv(rx).await;
        let pos = event
            .position()
            .unwrap_or_else(|| panic!("{event:?} has no position"));
        out.push((pos.offset(), pos.epoch().to_owned()));
    }
    out
}

/// History events under drops, duplicates and reordering of the live
/// copies: a member elsewhere gets every offset once, in order (gaps are
/// read back from the history); the sender's member too.
#[tokio::test(start_paused = true)]
async fn history_in_order_once_under_faults() {
    let net = SimNet::new(21);
    let a = process(&net, 1000).await;
    let b = process(&net, 1000).await;
    let group = history_group("faults");
    let mut on_a = a.new_channel().await.unwrap();
    a.group_add(&group, on_a.name()).await.unwrap();
    let mut on_b = b.new_channel().await.unwrap();
    b.group_add(&group, on_b.name()).await.unwrap();
    net.set_faults(Faults {
        drop: 200,
        duplicate: 300,
        max_delay: Duration::from_millis(20),
        ..Faults::default()
    });
    let mut epoch = None;
    for i in 0..60u64 {
        let sender = if i % 2 == 0 { &a } else { &b };
        let pos = sender
            .group_send(&group, Event::new("h", i))
            .await
            .unwrap()
            .position
            .unwrap();
        epoch.get_or_insert_with(|| pos.epoch().to_owned());
    }
    net.set_faults(Faults::default());
    // A last send without faults reveals any trailing gap.
    a.group_send(&group, Event::new("h", 60u64)).await.unwrap();
    let epoch = epoch.unwrap();
    let expected: Vec<(u64, String)> = (1..=61).map(|o| (o, epoch.clone())).collect();
    assert_eq!(positions(&mut on_b, 61).await, expected);
    assert_eq!(positions(&mut on_a, 61).await, expected);
}

/// Live copies lost while a process is cut off are read back when the
/// connection is back (catch-up), without waiting for the next event.
#[tokio::test(start_paused = true)]
async fn history_catches_up_after_a_restart() {
    let net = SimNet::new(22);
    let a = process(&net, 100).await;
    let b = process(&net, 100).await;
    let group = history_group("restart");
    let mut on_b = b.new_channel().await.unwrap();
    b.group_add(&group, on_b.name()).await.unwrap();
    a.group_send(&group, Event::bare("h")).await.unwrap();
    assert_eq!(positions(&mut on_b, 1).await[0].0, 1);
    net.set_faults(Faults {
        drop: 1000,
        ..Faults::default()
    });
    for _ in 0..3 {
        a.group_send(&group, Event::bare("h")).await.unwrap();
    }
    net.set_faults(Faults::default());
    net.restart(Duration::from_millis(100)).await;
    let got: Vec<u64> = positions(&mut on_b, 3).await.iter().map(|p| p.0).collect();
    assert_eq!(got, [2, 3, 4]);
}

/// The broker lost its histories: the next send starts a new epoch at 1,
/// members elsewhere follow it, and recovering an old position says so.
#[tokio::test(start_paused = true)]
async fn a_lost_history_starts_a_new_epoch() {
    let net = SimNet::new(23);
    let a = process(&net, 100).await;
    let b = process(&net, 100).await;
    let group = history_group("epoch");
    let mut on_b = b.new_channel().await.unwrap();
    b.group_add(&group, on_b.name()).await.unwrap();
    let old = a
        .group_send(&group, Event::bare("h"))
        .await
        .unwrap()
        .position
        .unwrap();
    positions(&mut on_b, 1).await;
    net.forget_histories();
    let new = a
        .group_send(&group, Event::bare("h"))
        .await
        .unwrap()
        .position
        .unwrap();
    assert_eq!(new.offset(), 1);
    assert_ne!(new.epoch(), old.epoch());
    assert_eq!(positions(&mut on_b, 1).await, [(1, new.epoch().to_owned())]);
    let r = b.recover(&group, &old).await.unwrap();
    assert_eq!(
        r.failure(),
        Some(crate::channel_layer::RecoveryFailure::EpochChanged)
    );
}

/// A process that stops refreshing (cut off for good) drops out of the
/// listing within the TTL, and exactly one live process announces its
/// user's `presence.leave` within TTL + TTL/3; the live one stays.
#[tokio::test(start_paused = true)]
async fn presence_of_a_silent_process_expires() {
    use crate::channel_layer::{PresenceChange, PresenceInfo, PRESENCE_JOIN, PRESENCE_LEAVE};
    let net = SimNet::new(24);
    let a = process(&net, 16).await;
    let c = process(&net, 16).await;
    let (tb, inbox_b) = net.connect();
    let b = MeshLayer::start(tb, inbox_b, config(16), Arc::default())
        .await
        .unwrap();
    let group = format!("{}.silent", conformance::NOTIFY_GROUPS);
    let info = |u: &str| PresenceInfo::new(u).unwrap();
    let mut on_a = a.new_channel().await.unwrap();
    a.presence_join(&group, on_a.name(), info("ada"))
        .await
        .unwrap();
    let mut on_c = c.new_channel().await.unwrap();
    c.presence_join(&group, on_c.name(), info("cy"))
        .await
        .unwrap();
    let on_b = b.new_channel().await.unwrap();
    b.presence_join(&group, on_b.name(), info("bob"))
        .await
        .unwrap();
    assert_eq!(a.presence(&group).await.unwrap().len(), 3);
    for (rx, joins) in [(&mut on_a, 3), (&mut on_c, 2)] {
        for _ in 0..joins {
            assert_eq!(recv(rx).await.kind(), PRESENCE_JOIN);
        }
    }
    net.partition(&b.inner.transport, true);
    let cut = tokio::time::Instant::now();
    let ttl = conformance::presence_config().time_limit();
    let users = |members: Vec<crate::channel_layer::PresenceMember>| -> Vec<String> {
        members.iter().map(|m| m.user_id().to_owned()).collect()
    };
    loop {
        if users(a.presence(&group).await.unwrap()) == ["ada", "cy"] {
            break;
        }
        assert!(
            cut.elapsed() <= ttl,
            "bob still listed {:?} after the cut",
            cut.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for rx in [&mut on_a, &mut on_c] {
        let leave = recv(rx).await;
        assert_eq!(leave.kind(), PRESENCE_LEAVE);
        assert_eq!(leave.body::<PresenceChange>().unwrap().user_id, "bob");
    }
    assert!(cut.elapsed() <= ttl + ttl / 3, "{:?}", cut.elapsed());
    // Announced once: nothing more comes, and ada and cy stay.
    tokio::time::sleep(ttl * 3).await;
    assert_eq!(users(a.presence(&group).await.unwrap()), ["ada", "cy"]);
    for rx in [&mut on_a, &mut on_c] {
        assert!(rx.try_recv().is_none(), "a second announcement");
    }
    drop(on_b);
}

/// `flush` empties the store for every process: histories (recovering
/// an old position fails, the next send starts a new epoch that members
/// elsewhere follow), presence (listed nobody; a process that still has
/// entries writes them again on its next refresh) and named members (a
/// group send no longer reaches them).
#[tokio::test(start_paused = true)]
async fn flush_empties_the_store() {
    use crate::channel_layer::{PresenceInfo, RecoveryFailure, StreamPosition};
    let net = SimNet::new(25);
    let a = process(&net, 64).await;
    let b = process(&net, 64).await;
    let history = history_group("flush");
    let mut on_b = b.new_channel().await.unwrap();
    b.group_add(&history, on_b.name()).await.unwrap();
    let mut last = None;
    for i in 0..3u64 {
        let sent = a.group_send(&history, Event::new("h", i)).await.unwrap();
        last = sent.position;
    }
    let old = last.unwrap();
    assert_eq!(positions(&mut on_b, 3).await.len(), 3);
    assert!(b
        .recover(&history, &StreamPosition::new(1, old.epoch()))
        .await
        .unwrap()
        .is_recovered());

    let room = "flush.room";
    let info = |u: &str| PresenceInfo::new(u).unwrap();
    let on_a = a.new_channel().await.unwrap();
    a.presence_join(room, on_a.name(), info("ada"))
        .await
        .unwrap();
    let bob = b.new_channel().await.unwrap();
    b.presence_join(room, bob.name(), info("bob"))
        .await
        .unwrap();
    let users = |members: Vec<crate::channel_layer::PresenceMember>| -> Vec<String> {
        members.iter().map(|m| m.user_id().to_owned()).collect()
    };
    assert_eq!(users(a.presence(room).await.unwrap()), ["ada", "bob"]);

    let mut jobs = b.receive("flush.jobs").await.unwrap();
    a.group_add(room, "flush.jobs").await.unwrap();
    // b's process (bob) and the named member.
    let report = a.group_send(room, Event::bare("before")).await.unwrap();
    assert_eq!(report.remote_receivers, Some(2), "{report:?}");
    assert_eq!(recv(&mut jobs).await.kind(), "before");

    a.flush().await.unwrap();

    let r = b.recover(&history, &old).await.unwrap();
    assert_eq!(r.failure(), Some(RecoveryFailure::EpochChanged));
    assert!(r.events().is_empty());
    assert!(a.presence(room).await.unwrap().is_empty());
    let report = a.group_send(room, Event::bare("after")).await.unwrap();
    assert_eq!((report.local_members, report.dropped), (0, 0));
    // b's process only: bob is still its member.
    assert_eq!(report.remote_receivers, Some(1), "{report:?}");
    a.send("flush.jobs", Event::bare("marker")).await.unwrap();
    assert_eq!(
        recv(&mut jobs).await.kind(),
        "marker",
        "a group send reached a flushed named member"
    );

    let new = a
        .group_send(&history, Event::bare("h"))
        .await
        .unwrap()
        .position
        .unwrap();
    assert_eq!(new.offset(), 1);
    assert_ne!(new.epoch(), old.epoch());
    assert_eq!(positions(&mut on_b, 1).await, [(1, new.epoch().to_owned())]);

    // b still has bob: it writes him again on its next refresh.
    let ttl = conformance::presence_config().time_limit();
    let flushed = tokio::time::Instant::now();
    while users(a.presence(room).await.unwrap()) != ["bob"] {
        assert!(flushed.elapsed() <= ttl, "bob not written again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((on_a, bob));
}

/// A process whose command connection is down while its subscription
/// works (its history reads fail): the events after a gap are kept back
/// (at most `MAX_PENDING`, later ones let go) and, once it reads again,
/// everything is read back in order, without another event to prompt
/// it (a retry): nothing is lost.
#[tokio::test(start_paused = true)]
async fn history_read_back_once_the_reading_connection_returns() {
    use crate::channel_layer::sequencer::MAX_PENDING;
    let net = SimNet::new(31);
    let a = process(&net, sim::KEPT).await;
    let b = process(&net, sim::KEPT).await;
    let group = format!("{LONG_HISTORY}.reads");
    let mut on_a = a.new_channel().await.unwrap();
    a.group_add(&group, on_a.name()).await.unwrap();
    // a misses offset 1 live...
    net.set_faults(Faults {
        drop: 1000,
        ..Faults::default()
    });
    let first = b.group_send(&group, Event::new("h", 1u64)).await.unwrap();
    let epoch = first.position.unwrap().epoch().to_owned();
    net.set_faults(Faults::default());
    // ... and cannot read it back while more than MAX_PENDING follow.
    net.cut_commands(a.transport(), true);
    let n = MAX_PENDING as u64 + 100;
    for i in 2..=n {
        b.group_send(&group, Event::new("h", i)).await.unwrap();
    }
    let early = tokio::time::timeout(Duration::from_secs(1), on_a.recv()).await;
    assert!(early.is_err(), "delivered across the gap: {early:?}");
    net.cut_commands(a.transport(), false);
    let expected: Vec<(u64, String)> = (1..=n).map(|o| (o, epoch.clone())).collect();
    assert_eq!(positions(&mut on_a, n as usize).await, expected);
    assert_eq!(a.stats().dropped_other, 0, "nothing counted lost");
}

/// Two processes send to a history group in loops while the broker is
/// restarted twice (its histories kept, as a Redis with `appendfsync
/// always`), with live copies delayed, duplicated and reordered and some
/// answers lost: every send answered OK reaches every member, once, in
/// offset order. Over many seeds.
#[tokio::test(start_paused = true)]
async fn history_sends_answered_ok_reach_everyone_across_restarts() {
    for seed in 100..140 {
        sends_across_restarts(seed).await;
    }
}

async fn sends_across_restarts(seed: u64) {
    use tokio::sync::watch;
    let net = SimNet::new(seed);
    let a = Arc::new(process(&net, sim::KEPT).await);
    let b = Arc::new(process(&net, sim::KEPT).await);
    let group = format!("{LONG_HISTORY}.restarts{seed}");
    let mut members = Vec::new();
    for layer in [&a, &a, &b] {
        let member = layer.new_channel().await.unwrap();
        layer.group_add(&group, member.name()).await.unwrap();
        members.push(member);
    }
    net.set_faults(Faults {
        duplicate: 100,
        max_delay: Duration::from_millis(3),
        lose_answer: 50,
        ..Faults::default()
    });
    let (stop, stopped) = watch::channel(false);
    let sender = |layer: Arc<Sim>, name: &'static str| {
        let (group, stopped) = (group.clone(), stopped.clone());
        let (tx, answered) = watch::channel(0usize);
        let task = tokio::spawn(async move {
            let mut ok = Vec::new();
            let mut i = 0;
            while !*stopped.borrow() {
                i += 1;
                let kind = format!("{name}.{i}");
                match layer.group_send(&group, Event::bare(kind.clone())).await {
                    Ok(_) => {
                        ok.push(kind);
                        tx.send_replace(ok.len());
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(3)).await,
                }
                // Pacing (on the paused clock), so a few hundred sends
                // cover the restarts.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            ok
        });
        (task, answered)
    };
    let mut senders = [sender(a.clone(), "a"), sender(b.clone(), "b")];
    for round in 0..3 {
        for (_, answered) in &mut senders {
            let n = *answered.borrow() + 8;
            answered.wait_for(|&k| k >= n).await.unwrap();
        }
        if round < 2 {
            let down = Duration::from_millis(200 + seed % 300);
            net.restart_with(down, Duration::from_millis(300)).await;
        }
    }
    stop.send_replace(true);
    net.set_faults(Faults::default());
    let mut expected = Vec::new();
    for (task, _) in senders {
        expected.extend(task.await.unwrap());
    }
    for member in &mut members {
        let mut missing: HashSet<&str> = expected.iter().map(String::as_str).collect();
        let mut log = Vec::new();
        let mut seen = HashSet::new();
        let mut last: Option<crate::channel_layer::StreamPosition> = None;
        while !missing.is_empty() {
            let event = match tokio::time::timeout(Duration::from_secs(5), member.recv()).await {
                Ok(Ok(event)) => event,
                other => panic!(
                    "seed {seed}: {}: {} of {} answered OK never arrived ({:?}): {other:?}; got {}",
                    member.name(),
                    missing.len(),
                    expected.len(),
                    missing.iter().take(5).collect::<Vec<_>>(),
                    log.join(" ")
                ),
            };
            let kind = event.kind().to_owned();
            assert!(seen.insert(kind.clone()), "seed {seed}: {kind} twice");
            let pos = event.position().unwrap().clone();
            log.push(format!("{kind}@{}:{}", pos.offset(), pos.epoch()));
            if let Some(last) = &last {
                if last.epoch() == pos.epoch() {
                    assert!(
                        pos.offset() > last.offset(),
                        "seed {seed}: {kind} at {pos:?} after {last:?}"
                    );
                }
            }
            last = Some(pos);
            missing.remove(kind.as_str());
        }
    }
}
