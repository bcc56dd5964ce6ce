//! The channel-layer conformance suite: the behaviour every
//! [`ChannelLayer`] backend must share with
//! [`InMemoryChannelLayer`](crate::channel_layer::InMemoryChannelLayer).
//!
//! [`Suite::new`] takes a function that makes a fresh layer (a fresh key
//! prefix for backends that store state outside the process, and a small
//! capacity such as 16: the checks fill channels until they are full);
//! [`Suite::pair`] adds the checks on two instances sharing state, like two
//! processes of one application (for a backend confined to one process, two
//! clones of one layer). [`Suite::run`] runs every check that applies: the
//! presence and history checks run when the layer's
//! [`capabilities`](ChannelLayer::capabilities) report
//! [`Feature::Presence`] and [`Feature::History`], so such a layer must be
//! configured with [`presence_config`] and [`history_policy`]. A backend
//! that cannot pass a check by design names it in [`Suite::skip`], with the
//! reason.
//!
//! ```
//! use std::sync::Arc;
//! use tower_channels::channel_layer::{ChannelLayer, InMemoryChannelLayer};
//! use tower_channels::testing::conformance::{self, Suite};
//!
//! fn layer() -> Arc<dyn ChannelLayer> {
//!     Arc::new(
//!         InMemoryChannelLayer::with_capacity(16)
//!             .with_history(conformance::history_policy())
//!             .with_presence(conformance::presence_config()),
//!     )
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! Suite::new(|| async { layer() })
//!     .pair(|| async {
//!         let layer = layer();
//!         (layer.clone(), layer)
//!     })
//!     .run()
//!     .await;
//! # });
//! ```
//!
//! The checks never sleep to wait for something: they await receivers with
//! a timeout (5 s), and check that an event did *not* arrive by sending a
//! sentinel event afterwards and expecting the sentinel first. They panic on
//! failure, like assertions.
//!
//! # The checks
//!
//! By the names [`Suite::skip`] takes, in the order they run. On one layer:
//!
//! * `new_channel_names`: `new_channel` returns unique, valid,
//!   process-specific (`!`) names.
//! * `send_receive_roundtrip`: typed bodies, text and binary messages and
//!   bare events arrive intact and in order.
//! * `no_such_channel`: sends to a channel nobody receives fail with
//!   `NoSuchChannel`.
//! * `channel_full`: a direct send to a full channel fails with
//!   `ChannelFull`, and succeeds again once the receiver made room.
//! * `groups`: `group_add` / `group_send` / `group_discard`; adding twice
//!   and discarding a non-member are not errors.
//! * `no_delivery_to_other_groups`: a group send reaches only that group's
//!   members.
//! * `full_member_lags`: a group send never waits for a full member: it
//!   drops the event for it, counts it in the report and the stats, and the
//!   member sees `Lagged`.
//! * `dropped_receiver_leaves_groups`: dropping a receiver removes its
//!   channel from every group.
//! * `invalid_names`: names that break Django's rules are refused with
//!   `InvalidName`.
//! * `flush`: drops every group and every queued event; channels keep
//!   working.
//! * `worker_channel`: a named channel (no `!`) is received with `receive`
//!   and sent to by name; with [`Feature::NamedGroupMembers`], it is a group
//!   member too.
//! * `stats`: counts group sends and local deliveries.
//! * With [`Feature::History`]: `history_offsets` (group sends to a history
//!   group return consecutive offsets of one epoch, carried by the
//!   delivered events), `history_recovery` (exactly the events after a
//!   position, or why not), `ephemeral_events` (delivered without a
//!   position, never stored), `recovery_switch_exactly_once` (join, recover,
//!   then live while two publishers send: no gap, no duplicate).
//! * With [`Feature::Presence`]: `presence_listing` (members grouped by
//!   user, leaving with the group or their channel) and
//!   `presence_notifications` (join and leave events, collapsed per user,
//!   only where configured).
//!
//! On two instances ([`Suite::pair`]): `pair_direct` (direct sends both
//! ways), `pair_groups` (groups spanning both, membership changed from
//! either side), `pair_worker` (a named channel received on one gets what
//! the other sends); with history `pair_history`, `pair_ephemeral_events`,
//! `pair_recovery_switch_exactly_once`; with presence `pair_presence` (one
//! listing, notifications collapsed per user across processes).

use std::{fmt, future::Future, pin::Pin, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use crate::channel_layer::{
    validate_channel_name, Capabilities, ChannelLayer, ChannelLayerError, ChannelReceiver, Event,
    Feature, GroupPattern, HistoryPolicy, PresenceChange, PresenceConfig, PresenceInfo,
    PresenceMember, RecoveryFailure, RecvError, StreamPosition, PRESENCE_JOIN, PRESENCE_LEAVE,
};
use crate::message::Message;

/// Groups with this prefix keep a history in the history checks: a layer
/// reporting [`Feature::History`] must be configured with [`history_policy`].
pub const HISTORY_GROUPS: &str = "conformance.history";
/// Groups with this prefix get join and leave notifications in the presence
/// checks: a layer reporting [`Feature::Presence`] must be configured with
/// [`presence_config`].
pub const NOTIFY_GROUPS: &str = "conformance.notify";

/// Events the checks' histories keep.
const HISTORY_LEN: usize = 8;

/// The history policy the history checks expect: groups starting with
/// [`HISTORY_GROUPS`] keep their last 8 events.
pub fn history_policy() -> HistoryPolicy {
    HistoryPolicy::new(GroupPattern::prefix(HISTORY_GROUPS)).max_len(HISTORY_LEN)
}

/// The presence configuration the presence checks expect: groups starting
/// with [`NOTIFY_GROUPS`] get join and leave notifications.
pub fn presence_config() -> PresenceConfig {
    PresenceConfig::new().notify(GroupPattern::prefix(NOTIFY_GROUPS))
}

/// How long a check waits for an event that must arrive.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends before a check gives up filling a channel.
const MAX_FILL: usize = 100_000;

const SENTINEL: &str = "conformance.sentinel";

/// The typed body the checks send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Body {
    text: String,
    n: u32,
    tags: Vec<String>,
}

fn body(n: u32) -> Body {
    Body {
        text: format!("héllo {n}"),
        n,
        tags: vec!["a".into(), "b".into()],
    }
}

// ------------------------------------------------------------------ suite

type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;
type Pair = (Arc<dyn ChannelLayer>, Arc<dyn ChannelLayer>);
type Make<'a> = Box<dyn FnMut() -> LocalFuture<'a, Arc<dyn ChannelLayer>> + 'a>;
type MakePair<'a> = Box<dyn FnMut() -> LocalFuture<'a, Pair> + 'a>;
type SingleCheck = for<'l> fn(&'l dyn ChannelLayer) -> LocalFuture<'l, ()>;
type PairCheck = for<'l> fn(&'l dyn ChannelLayer, &'l dyn ChannelLayer) -> LocalFuture<'l, ()>;

/// A check on one layer (`single!(name)`), or one that needs a feature
/// (`single!(name, Feature)`).
macro_rules! single {
    ($name:ident) => {
        single!(@ $name, None)
    };
    ($name:ident, $feature:ident) => {
        single!(@ $name, Some(Feature::$feature))
    };
    (@ $name:ident, $feature:expr) => {
        (stringify!($name), $feature, {
            fn check(layer: &dyn ChannelLayer) -> LocalFuture<'_, ()> {
                Box::pin($name(layer))
            }
            check as SingleCheck
        })
    };
}

/// A check on two instances sharing state, as `single!`.
macro_rules! pair {
    ($name:ident) => {
        pair!(@ $name, None)
    };
    ($name:ident, $feature:ident) => {
        pair!(@ $name, Some(Feature::$feature))
    };
    (@ $name:ident, $feature:expr) => {
        (stringify!($name), $feature, {
            fn check<'l>(a: &'l dyn ChannelLayer, b: &'l dyn ChannelLayer) -> LocalFuture<'l, ()> {
                Box::pin($name(a, b))
            }
            check as PairCheck
        })
    };
}

/// Every check on one layer, in the order [`Suite::run`] runs them.
const SINGLE: &[(&str, Option<Feature>, SingleCheck)] = &[
    single!(new_channel_names),
    single!(send_receive_roundtrip),
    single!(no_such_channel),
    single!(channel_full),
    single!(groups),
    single!(no_delivery_to_other_groups),
    single!(full_member_lags),
    single!(dropped_receiver_leaves_groups),
    single!(invalid_names),
    single!(flush),
    single!(worker_channel),
    single!(stats),
    single!(history_offsets, History),
    single!(history_recovery, History),
    single!(ephemeral_events, History),
    single!(recovery_switch_exactly_once, History),
    single!(presence_listing, Presence),
    single!(presence_notifications, Presence),
];

/// Every check on two instances, in the order [`Suite::run`] runs them.
const PAIR: &[(&str, Option<Feature>, PairCheck)] = &[
    pair!(pair_direct),
    pair!(pair_groups),
    pair!(pair_worker),
    pair!(pair_history, History),
    pair!(pair_ephemeral_events, History),
    pair!(pair_recovery_switch_exactly_once, History),
    pair!(pair_presence, Presence),
];

/// The conformance suite for one backend: every check, each on fresh layers.
///
/// Built with [`new`](Suite::new), optionally given a [`pair`](Suite::pair)
/// maker and checks to [`skip`](Suite::skip), then [`run`](Suite::run).
/// See the [module docs](self).
pub struct Suite<'a> {
    make: Make<'a>,
    make_pair: Option<MakePair<'a>>,
    skipped: Vec<(&'static str, String)>,
}

impl fmt::Debug for Suite<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Suite")
            .field("pair", &self.make_pair.is_some())
            .field("skipped", &self.skipped)
            .finish_non_exhaustive()
    }
}

impl<'a> Suite<'a> {
    /// A suite whose checks on one layer each run on a fresh layer from
    /// `make`.
    pub fn new<F, Fut>(mut make: F) -> Self
    where
        F: FnMut() -> Fut + 'a,
        Fut: Future<Output = Arc<dyn ChannelLayer>> + 'a,
    {
        Suite {
            make: Box::new(move || Box::pin(make())),
            make_pair: None,
            skipped: Vec::new(),
        }
    }

    /// Adds the checks on two instances sharing state (two processes of one
    /// application), each on a fresh pair from `make_pair`. Without it, only
    /// the checks on one layer run.
    #[must_use]
    pub fn pair<F, Fut>(mut self, mut make_pair: F) -> Self
    where
        F: FnMut() -> Fut + 'a,
        Fut: Future<Output = (Arc<dyn ChannelLayer>, Arc<dyn ChannelLayer>)> + 'a,
    {
        self.make_pair = Some(Box::new(move || Box::pin(make_pair())));
        self
    }

    /// Does not run the check named `check` (one of [the
    /// checks](self#the-checks), such as `"no_such_channel"`), for a layer
    /// that cannot pass it by design; [`run`](Suite::run) prints `why`.
    ///
    /// # Panics
    ///
    /// When no check has that name (the message lists the names).
    #[must_use]
    pub fn skip(mut self, check: &str, why: &str) -> Self {
        let names = SINGLE.iter().map(|c| c.0).chain(PAIR.iter().map(|c| c.0));
        let Some(name) = names.clone().find(|name| *name == check) else {
            panic!(
                "conformance: no check named {check:?}; the checks are: {}",
                names.collect::<Vec<_>>().join(", ")
            );
        };
        self.skipped.push((name, why.to_owned()));
        self
    }

    /// Runs every check that applies, each on a fresh layer (or pair),
    /// printing each name as it passes. The presence and history checks
    /// run on layers whose capabilities report [`Feature::Presence`] and
    /// [`Feature::History`].
    ///
    /// # Panics
    ///
    /// When a check fails, like an assertion (the message says what
    /// failed, a line on stderr which check), when `make` returns layers
    /// of different capabilities, or when a layer reporting presence or
    /// history is not configured as the checks expect (the message says
    /// how).
    ///
    /// The future is not `Send` (the makers need not be): await it in the
    /// test itself, as in `#[tokio::test]`, not in a spawned task.
    pub async fn run(self) {
        let Suite {
            mut make,
            make_pair,
            skipped,
        } = self;
        let first = make().await;
        let capabilities = first.capabilities();
        let mut spare = Some(first);
        let (mut history_checked, mut presence_checked) = (false, false);
        for &(name, feature, check) in SINGLE {
            if !applies(&skipped, name, feature, capabilities) {
                continue;
            }
            let layer = match spare.take() {
                Some(layer) => layer,
                None => make().await,
            };
            assert_eq!(
                layer.capabilities(),
                capabilities,
                "conformance: the layers from `make` report different capabilities"
            );
            if feature == Some(Feature::History) && !history_checked {
                expect_history(&*layer).await;
                history_checked = true;
            }
            if feature == Some(Feature::Presence) && !presence_checked {
                expect_notifications(&*layer).await;
                presence_checked = true;
            }
            let _running = Running(name);
            check(&*layer).await;
            eprintln!("conformance: {name} ok");
        }
        let Some(mut make_pair) = make_pair else {
            eprintln!("conformance: the checks on two instances did not run (no Suite::pair)");
            return;
        };
        let first = make_pair().await;
        let capabilities = first.0.capabilities();
        let mut spare = Some(first);
        for &(name, feature, check) in PAIR {
            if !applies(&skipped, name, feature, capabilities) {
                continue;
            }
            let (a, b) = match spare.take() {
                Some(pair) => pair,
                None => make_pair().await,
            };
            let _running = Running(name);
            check(&*a, &*b).await;
            eprintln!("conformance: {name} ok");
        }
    }
}

/// Whether the check `name` runs, saying why on stderr when not.
fn applies(
    skipped: &[(&str, String)],
    name: &str,
    feature: Option<Feature>,
    capabilities: Capabilities,
) -> bool {
    if let Some((_, why)) = skipped.iter().find(|(n, _)| *n == name) {
        eprintln!("conformance: {name} skipped: {why}");
        return false;
    }
    match feature {
        Some(feature) if !capabilities.supports(feature) => {
            eprintln!("conformance: {name} does not apply (the layer has no {feature})");
            false
        }
        _ => true,
    }
}

/// Says on stderr which check failed when it panics.
struct Running(&'static str);

impl Drop for Running {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("conformance: {} failed", self.0);
        }
    }
}

/// Fails clearly when a layer reports [`Feature::Presence`] but sends no
/// join notifications for [`NOTIFY_GROUPS`] (it was not configured with
/// [`presence_config`]).
async fn expect_notifications(layer: &dyn ChannelLayer) {
    let group = format!("{NOTIFY_GROUPS}.configured");
    let mut rx = new_channel(layer).await;
    ok(
        "presence_join",
        layer.presence_join(&group, rx.name(), info("conformance")),
    )
    .await;
    match tokio::time::timeout(RECV_TIMEOUT, rx.recv()).await {
        Ok(Ok(event)) if event.kind() == PRESENCE_JOIN => {}
        other => panic!(
            "conformance: the layer reports Feature::Presence but sent no {PRESENCE_JOIN} \
             for {group:?} (got {other:?}): configure it with conformance::presence_config()"
        ),
    }
}

/// Fails clearly when a layer reports [`Feature::History`] but keeps no
/// history for [`HISTORY_GROUPS`] (it was not configured with
/// [`history_policy`]).
async fn expect_history(layer: &dyn ChannelLayer) {
    let group = format!("{HISTORY_GROUPS}.configured");
    let report = ok(
        "group_send",
        layer.group_send(&group, Event::bare("conformance.configured")),
    )
    .await;
    assert!(
        report.position.is_some(),
        "conformance: the layer reports Feature::History but keeps no history for \
         {group:?}: configure it with conformance::history_policy()"
    );
}

// ---------------------------------------------------------------- helpers

async fn recv(rx: &mut ChannelReceiver) -> Event {
    match tokio::time::timeout(RECV_TIMEOUT, rx.recv()).await {
        Ok(Ok(event)) => event,
        Ok(Err(e)) => panic!("channel {:?}: expected an event, got {e}", rx.name()),
        Err(_) => panic!("channel {:?}: no event within {RECV_TIMEOUT:?}", rx.name()),
    }
}

async fn expect_kind(rx: &mut ChannelReceiver, kind: &str) -> Event {
    let event = recv(rx).await;
    assert_eq!(
        event.kind(),
        kind,
        "channel {:?} received the wrong event",
        rx.name()
    );
    event
}

/// Checks that nothing is queued for `rx`: sends a sentinel through `via`
/// and expects it to be the next event.
async fn expect_nothing(via: &dyn ChannelLayer, rx: &mut ChannelReceiver) {
    let name = rx.name().to_owned();
    via.send(&name, Event::bare(SENTINEL))
        .await
        .unwrap_or_else(|e| panic!("sending the sentinel to {name:?}: {e}"));
    expect_kind(rx, SENTINEL).await;
}

async fn new_channel(layer: &dyn ChannelLayer) -> ChannelReceiver {
    layer
        .new_channel()
        .await
        .unwrap_or_else(|e| panic!("new_channel: {e}"))
}

async fn ok<T>(what: &str, fut: impl Future<Output = Result<T, ChannelLayerError>>) -> T {
    fut.await.unwrap_or_else(|e| {
        // With the causes: a backend error says little by itself.
        let chain: Vec<String> =
            std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
                .map(ToString::to_string)
                .collect();
        panic!("{what}: {}", chain.join(": "))
    })
}

/// Direct-sends until the channel is full; returns how many were accepted.
async fn fill(layer: &dyn ChannelLayer, channel: &str) -> usize {
    for n in 0..MAX_FILL {
        match layer.send(channel, Event::new("conformance.fill", n)).await {
            Ok(()) => {}
            Err(e) if e.is_channel_full() => {
                assert!(n > 0, "channel {channel:?} was full before the first send");
                return n;
            }
            Err(e) => panic!("filling {channel:?}: unexpected error {e}"),
        }
    }
    panic!("channel {channel:?} accepted {MAX_FILL} events without becoming full; use a smaller capacity")
}

// ---------------------------------------------------------------- checks

/// `new_channel` returns unique, valid, process-specific (`!`) names.
async fn new_channel_names(layer: &dyn ChannelLayer) {
    let mut receivers = Vec::new();
    let mut names = std::collections::HashSet::new();
    for _ in 0..64 {
        let rx = new_channel(layer).await;
        let name = rx.name().to_owned();
        validate_channel_name(&name)
            .unwrap_or_else(|e| panic!("new_channel made an invalid name: {e}"));
        assert!(
            name.contains('!'),
            "new_channel names are process-specific (`!`): {name:?}"
        );
        assert!(
            names.insert(name.clone()),
            "new_channel returned {name:?} twice"
        );
        receivers.push(rx);
    }
}

/// Typed bodies, text and binary messages and bare events arrive intact and in order.
async fn send_receive_roundtrip(layer: &dyn ChannelLayer) {
    let mut rx = new_channel(layer).await;
    let name = rx.name().to_owned();
    ok(
        "send typed",
        layer.send(&name, Event::new("conformance.typed", body(7))),
    )
    .await;
    ok(
        "send text",
        layer.send(
            &name,
            Event::text("conformance.text", "{\"message\":\"hi ✓\"}"),
        ),
    )
    .await;
    ok(
        "send binary",
        layer.send(
            &name,
            Event::message("conformance.binary", vec![0u8, 255, 7]),
        ),
    )
    .await;
    ok(
        "send bare",
        layer.send(&name, Event::bare("conformance.bare")),
    )
    .await;
    for n in 0..5u32 {
        ok("send", layer.send(&name, Event::new("conformance.seq", n))).await;
    }

    let typed = expect_kind(&mut rx, "conformance.typed").await;
    assert_eq!(typed.handler_name(), "conformance_typed");
    assert_eq!(typed.body::<Body>().expect("typed body"), body(7));
    let json: serde_json::Value = typed.body().expect("typed body as JSON");
    assert_eq!(json["n"], 7);
    let text = expect_kind(&mut rx, "conformance.text").await;
    assert_eq!(
        text.as_message(),
        Some(&Message::text("{\"message\":\"hi ✓\"}"))
    );
    let binary = expect_kind(&mut rx, "conformance.binary").await;
    assert_eq!(
        binary.as_message(),
        Some(&Message::binary(vec![0u8, 255, 7]))
    );
    assert!(expect_kind(&mut rx, "conformance.bare").await.is_bare());
    for n in 0..5u32 {
        let event = expect_kind(&mut rx, "conformance.seq").await;
        assert_eq!(
            event.body::<u32>().expect("u32 body"),
            n,
            "events arrived out of order"
        );
    }
}

/// Sends to a channel nobody receives fail with `NoSuchChannel`.
async fn no_such_channel(layer: &dyn ChannelLayer) {
    let rx = new_channel(layer).await;
    let name = rx.name().to_owned();
    drop(rx);
    for channel in [name.as_str(), "specific.conformance0nobody!1"] {
        match layer.send(channel, Event::bare("conformance.lost")).await {
            Err(ChannelLayerError::NoSuchChannel { channel: c }) => assert_eq!(c, channel),
            other => panic!("send to {channel:?}: expected NoSuchChannel, got {other:?}"),
        }
    }
}

/// A direct send to a full channel fails with `ChannelFull`, and succeeds
/// again once the receiver made room.
async fn channel_full(layer: &dyn ChannelLayer) {
    let mut rx = new_channel(layer).await;
    let name = rx.name().to_owned();
    let accepted = fill(layer, &name).await;
    match layer.send(&name, Event::bare("conformance.over")).await {
        Err(ChannelLayerError::ChannelFull { channel }) => assert_eq!(channel, name),
        other => panic!("expected ChannelFull, got {other:?}"),
    }
    let first = expect_kind(&mut rx, "conformance.fill").await;
    assert_eq!(first.body::<usize>().expect("fill body"), 0);
    ok(
        "send after making room",
        layer.send(&name, Event::bare("conformance.room")),
    )
    .await;
    for n in 1..accepted {
        let event = expect_kind(&mut rx, "conformance.fill").await;
        assert_eq!(event.body::<usize>().expect("fill body"), n);
    }
    expect_kind(&mut rx, "conformance.room").await;
}

/// group_add / group_send / group_discard; adding twice and discarding a
/// non-member are not errors.
async fn groups(layer: &dyn ChannelLayer) {
    let mut a = new_channel(layer).await;
    let mut b = new_channel(layer).await;
    ok("group_add a", layer.group_add("conformance", a.name())).await;
    ok("group_add b", layer.group_add("conformance", b.name())).await;
    ok(
        "group_add b again",
        layer.group_add("conformance", b.name()),
    )
    .await;

    let report = ok(
        "group_send",
        layer.group_send("conformance", Event::new("conformance.g1", body(1))),
    )
    .await;
    assert!(
        report.local_members >= 1,
        "group_send reported no delivery: {report:?}"
    );
    assert_eq!(report.dropped, 0);
    assert_eq!(
        expect_kind(&mut a, "conformance.g1")
            .await
            .body::<Body>()
            .expect("body"),
        body(1)
    );
    assert_eq!(
        expect_kind(&mut b, "conformance.g1")
            .await
            .body::<Body>()
            .expect("body"),
        body(1)
    );
    // Added twice, delivered once.
    expect_nothing(layer, &mut b).await;

    ok(
        "group_discard b",
        layer.group_discard("conformance", b.name()),
    )
    .await;
    ok(
        "group_discard b again",
        layer.group_discard("conformance", b.name()),
    )
    .await;
    ok(
        "group_discard unknown group",
        layer.group_discard("conformance.unknown", b.name()),
    )
    .await;
    ok(
        "group_send",
        layer.group_send("conformance", Event::text("conformance.g2", "two")),
    )
    .await;
    assert_eq!(
        expect_kind(&mut a, "conformance.g2").await.as_message(),
        Some(&Message::text("two"))
    );
    expect_nothing(layer, &mut b).await;

    let report = ok(
        "group_send to empty group",
        layer.group_send("conformance.empty", Event::bare("x")),
    )
    .await;
    assert_eq!((report.local_members, report.dropped), (0, 0));
}

/// A group send reaches only that group's members.
async fn no_delivery_to_other_groups(layer: &dyn ChannelLayer) {
    let mut a = new_channel(layer).await;
    let mut c = new_channel(layer).await;
    ok("group_add", layer.group_add("conformance.one", a.name())).await;
    ok("group_add", layer.group_add("conformance.two", c.name())).await;
    ok(
        "group_send",
        layer.group_send("conformance.one", Event::bare("conformance.one")),
    )
    .await;
    expect_kind(&mut a, "conformance.one").await;
    expect_nothing(layer, &mut c).await;
}

/// A group send never waits for a full member: it drops the event for it,
/// counts it in the report and the stats, and the member sees `Lagged`.
async fn full_member_lags(layer: &dyn ChannelLayer) {
    let mut full = new_channel(layer).await;
    let mut fine = new_channel(layer).await;
    let full_name = full.name().to_owned();
    ok("group_add", layer.group_add("conformance.lag", &full_name)).await;
    ok("group_add", layer.group_add("conformance.lag", fine.name())).await;
    let accepted = fill(layer, &full_name).await;
    let before = layer.stats();

    let report = ok(
        "group_send",
        layer.group_send("conformance.lag", Event::bare("conformance.g")),
    )
    .await;
    assert_eq!(
        report.dropped, 1,
        "the full member must be counted as dropped: {report:?}"
    );
    assert!(report.local_members >= 1, "{report:?}");
    let after = layer.stats();
    assert_eq!(
        after.dropped_full,
        before.dropped_full + 1,
        "stats: {after:?}"
    );

    expect_kind(&mut fine, "conformance.g").await;
    match tokio::time::timeout(RECV_TIMEOUT, full.recv()).await {
        Ok(Err(RecvError::Lagged(1))) => {}
        other => panic!("the full member must see Lagged(1), got {other:?}"),
    }
    for _ in 0..accepted {
        expect_kind(&mut full, "conformance.fill").await;
    }
    expect_nothing(layer, &mut full).await;
}

/// Dropping a receiver removes its channel from every group.
async fn dropped_receiver_leaves_groups(layer: &dyn ChannelLayer) {
    let rx = new_channel(layer).await;
    ok("group_add", layer.group_add("conformance.drop", rx.name())).await;
    ok("group_add", layer.group_add("conformance.drop2", rx.name())).await;
    drop(rx);
    for group in ["conformance.drop", "conformance.drop2"] {
        let report = ok(
            "group_send",
            layer.group_send(group, Event::bare("conformance.g")),
        )
        .await;
        assert_eq!(
            (report.local_members, report.dropped),
            (0, 0),
            "a dropped receiver is still in {group:?}"
        );
    }
    // The group still works for new members.
    let mut again = new_channel(layer).await;
    ok(
        "group_add",
        layer.group_add("conformance.drop", again.name()),
    )
    .await;
    ok(
        "group_send",
        layer.group_send("conformance.drop", Event::bare("conformance.g2")),
    )
    .await;
    expect_kind(&mut again, "conformance.g2").await;
}

/// Names that break Django's rules are refused with `InvalidName`.
async fn invalid_names(layer: &dyn ChannelLayer) {
    let rx = new_channel(layer).await;
    let good = rx.name().to_owned();
    let long = "x".repeat(100);
    let check = |what: &str, result: Result<(), ChannelLayerError>| match result {
        Err(ChannelLayerError::InvalidName(_)) => {}
        other => panic!("{what}: expected InvalidName, got {other:?}"),
    };
    for bad in ["", "bad name", "a!b!c", "!a", "ünï", long.as_str()] {
        check(bad, layer.send(bad, Event::bare("x")).await);
        check(bad, layer.receive(bad).await.map(drop));
        check(bad, layer.group_add("conformance", bad).await);
        check(bad, layer.group_discard("conformance", bad).await);
    }
    for bad in ["", "bad/group", "a!b", long.as_str()] {
        check(bad, layer.group_add(bad, &good).await);
        check(bad, layer.group_discard(bad, &good).await);
        check(bad, layer.group_send(bad, Event::bare("x")).await.map(drop));
    }
}

/// `flush` drops every group and every queued event; channels keep working.
async fn flush(layer: &dyn ChannelLayer) {
    let mut rx = new_channel(layer).await;
    let name = rx.name().to_owned();
    ok("group_add", layer.group_add("conformance.flush", &name)).await;
    ok("send", layer.send(&name, Event::bare("conformance.queued"))).await;
    ok("flush", layer.flush()).await;
    assert!(rx.try_recv().is_none(), "flush must drop queued events");
    let report = ok(
        "group_send",
        layer.group_send("conformance.flush", Event::bare("conformance.g")),
    )
    .await;
    assert_eq!(
        report.local_members, 0,
        "flush must drop groups: {report:?}"
    );
    expect_nothing(layer, &mut rx).await;
}

/// A named channel (no `!`) is received with `receive` and sent to by name.
async fn worker_channel(layer: &dyn ChannelLayer) {
    let mut rx = ok("receive", layer.receive("conformance.worker")).await;
    assert_eq!(rx.name(), "conformance.worker");
    ok(
        "send",
        layer.send("conformance.worker", Event::new("conformance.job", body(3))),
    )
    .await;
    ok(
        "send",
        layer.send("conformance.worker", Event::text("conformance.job2", "two")),
    )
    .await;
    assert_eq!(
        expect_kind(&mut rx, "conformance.job")
            .await
            .body::<Body>()
            .expect("body"),
        body(3)
    );
    expect_kind(&mut rx, "conformance.job2").await;

    // A layer with named group members delivers group sends to them.
    if !layer
        .capabilities()
        .supports(crate::channel_layer::Feature::NamedGroupMembers)
    {
        return;
    }
    let group = "conformance.worker-group";
    let mut member = new_channel(layer).await;
    ok("group_add", layer.group_add(group, member.name())).await;
    ok("group_add named", layer.group_add(group, rx.name())).await;
    ok("group_add named again", layer.group_add(group, rx.name())).await;
    ok(
        "group_send",
        layer.group_send(group, Event::new("conformance.named", body(4))),
    )
    .await;
    for receiver in [&mut rx, &mut member] {
        assert_eq!(
            expect_kind(receiver, "conformance.named")
                .await
                .body::<Body>()
                .expect("body"),
            body(4)
        );
    }
    ok("group_discard named", layer.group_discard(group, rx.name())).await;
    ok(
        "group_send",
        layer.group_send(group, Event::bare("conformance.after")),
    )
    .await;
    expect_kind(&mut member, "conformance.after").await;
    expect_nothing(layer, &mut rx).await;
}

/// `stats` counts group sends and local deliveries.
async fn stats(layer: &dyn ChannelLayer) {
    let mut a = new_channel(layer).await;
    let mut b = new_channel(layer).await;
    ok("group_add", layer.group_add("conformance.stats", a.name())).await;
    ok("group_add", layer.group_add("conformance.stats", b.name())).await;
    let before = layer.stats();
    for _ in 0..3 {
        ok(
            "group_send",
            layer.group_send("conformance.stats", Event::bare("conformance.s")),
        )
        .await;
    }
    for _ in 0..3 {
        expect_kind(&mut a, "conformance.s").await;
        expect_kind(&mut b, "conformance.s").await;
    }
    let after = layer.stats();
    assert_eq!(after.group_sends, before.group_sends + 3, "{after:?}");
    assert_eq!(after.delivered, before.delivered + 6, "{after:?}");
    assert_eq!(after.dropped_full, before.dropped_full, "{after:?}");
}

/// Direct sends between two instances, both ways.
async fn pair_direct(a: &dyn ChannelLayer, b: &dyn ChannelLayer) {
    let mut on_a = new_channel(a).await;
    let mut on_b = new_channel(b).await;
    ok(
        "b -> a",
        b.send(on_a.name(), Event::new("conformance.direct", body(1))),
    )
    .await;
    ok(
        "a -> b",
        a.send(on_b.name(), Event::text("conformance.direct", "to b")),
    )
    .await;
    assert_eq!(
        expect_kind(&mut on_a, "conformance.direct")
            .await
            .body::<Body>()
            .expect("body"),
        body(1)
    );
    assert_eq!(
        expect_kind(&mut on_b, "conformance.direct")
            .await
            .as_message(),
        Some(&Message::text("to b"))
    );
    // A channel is received where it was made, whoever sends to it.
    expect_nothing(b, &mut on_a).await;
    expect_nothing(a, &mut on_b).await;
}

/// Groups spanning two instances; membership changed from either side.
async fn pair_groups(a: &dyn ChannelLayer, b: &dyn ChannelLayer) {
    let mut on_a = new_channel(a).await;
    let mut on_b = new_channel(b).await;
    ok(
        "group_add on a",
        a.group_add("conformance.pair", on_a.name()),
    )
    .await;
    ok(
        "group_add on b",
        b.group_add("conformance.pair", on_b.name()),
    )
    .await;
    for (n, from) in [a, b].into_iter().enumerate() {
        ok(
            "group_send",
            from.group_send("conformance.pair", Event::new("conformance.p", n)),
        )
        .await;
        for rx in [&mut on_a, &mut on_b] {
            assert_eq!(
                expect_kind(rx, "conformance.p")
                    .await
                    .body::<usize>()
                    .expect("body"),
                n
            );
        }
    }

    // b adds a's channel to a group, and removes it again.
    ok(
        "group_add from b",
        b.group_add("conformance.pair2", on_a.name()),
    )
    .await;
    ok(
        "group_send",
        b.group_send("conformance.pair2", Event::bare("conformance.p2")),
    )
    .await;
    expect_kind(&mut on_a, "conformance.p2").await;
    ok(
        "group_discard from b",
        b.group_discard("conformance.pair2", on_a.name()),
    )
    .await;
    ok(
        "group_send",
        b.group_send("conformance.pair2", Event::bare("conformance.p3")),
    )
    .await;
    expect_nothing(b, &mut on_a).await;

    // A connection closing on b leaves the group for everyone.
    drop(on_b);
    ok(
        "group_send",
        a.group_send("conformance.pair", Event::bare("conformance.p4")),
    )
    .await;
    expect_kind(&mut on_a, "conformance.p4").await;
    ok(
        "group_send",
        b.group_send("conformance.pair", Event::bare("conformance.p5")),
    )
    .await;
    expect_kind(&mut on_a, "conformance.p5").await;
    expect_nothing(a, &mut on_a).await;
}

/// A named channel received on one instance gets what the other sends.
async fn pair_worker(a: &dyn ChannelLayer, b: &dyn ChannelLayer) {
    let mut jobs = ok("receive on a", a.receive("conformance.pair-worker")).await;
    for n in 0..3u32 {
        ok(
            "send from b",
            b.send("conformance.pair-worker", Event::new("conformance.job", n)),
        )
        .await;
    }
    for n in 0..3u32 {
        assert_eq!(
            expect_kind(&mut jobs, "conformance.job")
                .await
                .body::<u32>()
                .expect("body"),
            n
        );
    }

    // A named member added on one instance gets the other's group sends.
    if !b
        .capabilities()
        .supports(crate::channel_layer::Feature::NamedGroupMembers)
    {
        return;
    }
    let group = "conformance.pair-worker-group";
    ok(
        "group_add named on b",
        b.group_add(group, "conformance.pair-worker"),
    )
    .await;
    for (from, n) in [(a, 10u32), (b, 11)] {
        ok(
            "group_send",
            from.group_send(group, Event::new("conformance.named", n)),
        )
        .await;
        assert_eq!(
            expect_kind(&mut jobs, "conformance.named")
                .await
                .body::<u32>()
                .expect("body"),
            n
        );
    }
    ok(
        "group_discard named on a",
        a.group_discard(group, "conformance.pair-worker"),
    )
    .await;
    ok(
        "group_send",
        b.group_send(group, Event::bare("conformance.after")),
    )
    .await;
    expect_nothing(b, &mut jobs).await;
}

// ------------------------------------------------------ presence and history

fn offset_of(event: &Event) -> u64 {
    event
        .position()
        .unwrap_or_else(|| panic!("event {event:?} of a history group has no position"))
        .offset()
}

/// Polls `check` (a presence listing) until it holds, for at most [`RECV_TIMEOUT`].
async fn presence_until(
    layer: &dyn ChannelLayer,
    group: &str,
    what: &str,
    check: impl Fn(&[PresenceMember]) -> bool,
) -> Vec<PresenceMember> {
    let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
    loop {
        let members = ok("presence", layer.presence(group)).await;
        if check(&members) {
            return members;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence of {group:?}: {what} within {RECV_TIMEOUT:?}; it is {members:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn users(members: &[PresenceMember]) -> Vec<(&str, usize)> {
    members
        .iter()
        .map(|m| (m.user_id(), m.connections().len()))
        .collect()
}

fn info(user: &str) -> PresenceInfo {
    PresenceInfo::new(user).expect("valid presence info")
}

/// Group sends to a history group return consecutive offsets of one epoch,
/// and members get events carrying them; other groups have no positions.
async fn history_offsets(layer: &dyn ChannelLayer) {
    let group = format!("{HISTORY_GROUPS}.offsets");
    let mut rx = new_channel(layer).await;
    ok("group_add", layer.group_add(&group, rx.name())).await;
    let mut epoch = None;
    for n in 1..=3u64 {
        let report = ok(
            "group_send",
            layer.group_send(&group, Event::new("conformance.h", n)),
        )
        .await;
        let pos = report
            .position
            .unwrap_or_else(|| panic!("group_send to {group:?} returned no position"));
        assert_eq!(pos.offset(), n, "offsets start at 1 and grow by one");
        assert!(!pos.epoch().is_empty(), "empty epoch");
        let epoch = epoch.get_or_insert_with(|| pos.epoch().to_owned());
        assert_eq!(
            pos.epoch(),
            epoch.as_str(),
            "the epoch changed between sends"
        );
        let event = expect_kind(&mut rx, "conformance.h").await;
        assert_eq!(event.position(), Some(&pos), "delivered event's position");
        assert_eq!(event.body::<u64>().expect("body"), n);
    }
    ok("group_add", layer.group_add("conformance.plain", rx.name())).await;
    let report = ok(
        "group_send",
        layer.group_send("conformance.plain", Event::bare("conformance.plain")),
    )
    .await;
    assert_eq!(
        report.position, None,
        "a group without history has no position"
    );
    assert_eq!(
        expect_kind(&mut rx, "conformance.plain").await.position(),
        None
    );
    match layer
        .recover("conformance.plain", &StreamPosition::new(1, "x"))
        .await
    {
        Err(ChannelLayerError::NoHistory { group }) => assert_eq!(group, "conformance.plain"),
        other => panic!("recover on a group without history: expected NoHistory, got {other:?}"),
    }
}

/// An [ephemeral](Event::ephemeral) group send to a history group reaches
/// the members of `a`'s and `b`'s group (pass one layer twice for a single
/// instance) without a position, takes no offset and is never recovered.
async fn ephemeral_between(a: &dyn ChannelLayer, b: &dyn ChannelLayer, group: &str) {
    let mut here = new_channel(a).await;
    let mut there = new_channel(b).await;
    ok("group_add", a.group_add(group, here.name())).await;
    ok("group_add", b.group_add(group, there.name())).await;
    let first = ok(
        "group_send",
        a.group_send(group, Event::new("conformance.h", 1u64)),
    )
    .await
    .position
    .unwrap_or_else(|| panic!("group_send to {group:?} returned no position"));
    for rx in [&mut here, &mut there] {
        assert_eq!(
            offset_of(&expect_kind(rx, "conformance.h").await),
            first.offset()
        );
    }
    let typing = ok(
        "ephemeral group_send",
        a.group_send(group, Event::text("conformance.typing", "ada").ephemeral()),
    )
    .await;
    assert_eq!(typing.position, None, "an ephemeral send takes no offset");
    for rx in [&mut here, &mut there] {
        let event = expect_kind(rx, "conformance.typing").await;
        assert_eq!(
            event.position(),
            None,
            "a delivered ephemeral event has no position"
        );
    }
    let next = ok(
        "group_send",
        b.group_send(group, Event::new("conformance.h", 2u64)),
    )
    .await
    .position
    .unwrap_or_else(|| panic!("group_send to {group:?} returned no position"));
    assert_eq!(
        (next.offset(), next.epoch()),
        (first.offset() + 1, first.epoch()),
        "the ephemeral send took no offset"
    );
    for rx in [&mut here, &mut there] {
        assert_eq!(
            offset_of(&expect_kind(rx, "conformance.h").await),
            next.offset()
        );
    }
    let recovery = ok("recover", a.recover(group, &first)).await;
    assert!(recovery.is_recovered(), "recover: {recovery:?}");
    let kinds: Vec<(&str, Option<u64>)> = recovery
        .events()
        .iter()
        .map(|e| (e.kind(), e.position().map(StreamPosition::offset)))
        .collect();
    assert_eq!(
        kinds,
        [("conformance.h", Some(next.offset()))],
        "the ephemeral event is not in the history"
    );
}

/// Ephemeral events on one instance (see [`pair_ephemeral_events`]).
async fn ephemeral_events(layer: &dyn ChannelLayer) {
    ephemeral_between(layer, layer, &format!("{HISTORY_GROUPS}.ephemeral")).await;
}

/// An ephemeral group send to a history group: delivered to members on
/// both instances without a position, no offset taken, never recovered.
async fn pair_ephemeral_events(a: &dyn ChannelLayer, b: &dyn ChannelLayer) {
    ephemeral_between(a, b, &format!("{HISTORY_GROUPS}.pair-ephemeral")).await;
}

/// Recovery gives exactly the events after a position, or says why not.
async fn history_recovery(layer: &dyn ChannelLayer) {
    let group = format!("{HISTORY_GROUPS}.recovery");
    let mut positions = Vec::new();
    for n in 1..=5u64 {
        let report = ok(
            "group_send",
            layer.group_send(&group, Event::new("conformance.h", n)),
        )
        .await;
        positions.push(report.position.expect("position"));
    }
    let epoch = positions[0].epoch().to_owned();
    let r = ok("recover", layer.recover(&group, &positions[1])).await;
    assert!(r.is_recovered(), "{r:?}");
    let got: Vec<(u64, u64)> = r
        .events()
        .iter()
        .map(|e| (offset_of(e), e.body::<u64>().expect("body")))
        .collect();
    assert_eq!(got, vec![(3, 3), (4, 4), (5, 5)], "events after offset 2");
    assert_eq!(r.latest(), Some(&positions[4]));

    let r = ok("recover at the top", layer.recover(&group, &positions[4])).await;
    assert!(r.is_recovered() && r.events().is_empty(), "{r:?}");

    for (what, since) in [
        ("another epoch", StreamPosition::new(2, format!("{epoch}x"))),
        (
            "an offset beyond the history",
            StreamPosition::new(99, epoch.clone()),
        ),
    ] {
        let r = ok("recover", layer.recover(&group, &since)).await;
        assert_eq!(
            r.failure(),
            Some(RecoveryFailure::EpochChanged),
            "recover from {what}: {r:?}"
        );
        assert!(r.events().is_empty());
    }
    let r = ok(
        "recover in a group never sent to",
        layer.recover(&format!("{HISTORY_GROUPS}.empty"), &positions[0]),
    )
    .await;
    assert_eq!(r.failure(), Some(RecoveryFailure::EpochChanged), "{r:?}");

    // Trimmed to the last HISTORY_LEN events.
    for n in 6..=20u64 {
        ok(
            "group_send",
            layer.group_send(&group, Event::new("conformance.h", n)),
        )
        .await;
    }
    let r = ok(
        "recover a trimmed position",
        layer.recover(&group, &positions[0]),
    )
    .await;
    assert_eq!(r.failure(), Some(RecoveryFailure::TooOld), "{r:?}");
    let oldest_kept = 20 - HISTORY_LEN as u64;
    let r = ok(
        "recover the oldest kept position",
        layer.recover(&group, &StreamPosition::new(oldest_kept, epoch.clone())),
    )
    .await;
    let offsets: Vec<u64> = r.events().iter().map(offset_of).collect();
    assert_eq!(offsets, (oldest_kept + 1..=20).collect::<Vec<_>>(), "{r:?}");
}

/// Publishes `count` events to `group`, one per permit.
async fn paced_publisher(
    layer: &dyn ChannelLayer,
    group: &str,
    permits: &tokio::sync::Semaphore,
    count: usize,
) {
    for n in 0..count {
        let Ok(permit) = permits.acquire().await else {
            return;
        };
        permit.forget();
        layer
            .group_send(group, Event::new("conformance.flow", n))
            .await
            .unwrap_or_else(|e| panic!("publisher: {e}"));
    }
}

/// A member joins, recovers and goes live while `publishers` keep sending
/// to the group; checks it sees every offset after its position exactly
/// once, in order. Events are paced so the member's channel never fills.
async fn join_recover_live(
    member_layer: &dyn ChannelLayer,
    publishers: [&dyn ChannelLayer; 2],
    group: &str,
) {
    const BEFORE: u64 = 10;
    const PER_PUBLISHER: usize = 25;
    const IN_FLIGHT: usize = 6;
    let mut since = None;
    for n in 0..BEFORE {
        let report = ok(
            "group_send",
            publishers[0].group_send(group, Event::new("conformance.flow", n)),
        )
        .await;
        since = report.position;
    }
    let since = since.expect("position");
    let top = BEFORE + (PER_PUBLISHER * publishers.len()) as u64;
    let permits = tokio::sync::Semaphore::new(0);
    let member = async {
        // Publishing runs while the member joins and recovers.
        permits.add_permits(IN_FLIGHT);
        let mut rx = new_channel(member_layer).await;
        ok("group_add", member_layer.group_add(group, rx.name())).await;
        let recovery = ok("recover", member_layer.recover(group, &since)).await;
        assert!(recovery.is_recovered(), "{recovery:?}");
        let mut cursor = recovery.cursor();
        let mut seen: Vec<u64> = Vec::new();
        for event in recovery.events() {
            assert!(cursor.accept(event), "a recovered event was refused");
            seen.push(offset_of(event));
        }
        while seen.last().copied().unwrap_or(since.offset()) < top {
            let event = recv(&mut rx).await;
            permits.add_permits(1);
            if cursor.accept(&event) {
                assert_eq!(event.position().map(|p| p.epoch()), Some(since.epoch()));
                seen.push(offset_of(&event));
            }
        }
        seen
    };
    let (seen, (), ()) = tokio::join!(
        member,
        paced_publisher(publishers[0], group, &permits, PER_PUBLISHER),
        paced_publisher(publishers[1], group, &permits, PER_PUBLISHER),
    );
    let expected: Vec<u64> = (since.offset() + 1..=top).collect();
    assert_eq!(
        seen, expected,
        "recovered then live events must cover every offset once, in order"
    );
}

/// Join, recover, then live, while two publishers keep sending: no gap,
/// no duplicate.
async fn recovery_switch_exactly_once(layer: &dyn ChannelLayer) {
    let group = format!("{HISTORY_GROUPS}.switch");
    join_recover_live(layer, [layer, layer], &group).await;
}

/// The same as [`recovery_switch_exactly_once`] with one publisher on each
/// instance and the member on `b`.
async fn pair_recovery_switch_exactly_once(a: &dyn ChannelLayer, b: &dyn ChannelLayer) {
    let group = format!("{HISTORY_GROUPS}.pair-switch");
    join_recover_live(b, [a, b], &group).await;
}

/// History written through one instance is recovered through the other.
async fn pair_history(a: &dyn ChannelLayer, b: &dyn ChannelLayer) {
    let group = format!("{HISTORY_GROUPS}.pair");
    let mut on_b = new_channel(b).await;
    ok("group_add", b.group_add(&group, on_b.name())).await;
    let first = ok(
        "group_send",
        a.group_send(&group, Event::new("conformance.h", 1u64)),
    )
    .await
    .position
    .expect("position");
    let second = ok(
        "group_send",
        b.group_send(&group, Event::new("conformance.h", 2u64)),
    )
    .await
    .position
    .expect("position");
    assert_eq!(
        (second.offset(), second.epoch()),
        (first.offset() + 1, first.epoch()),
        "both instances share one history"
    );
    assert_eq!(offset_of(&expect_kind(&mut on_b, "conformance.h").await), 1);
    assert_eq!(offset_of(&expect_kind(&mut on_b, "conformance.h").await), 2);
    let r = ok("recover on b", b.recover(&group, &first)).await;
    assert_eq!(
        r.events().iter().map(offset_of).collect::<Vec<_>>(),
        vec![2]
    );
    let r = ok("recover on a", a.recover(&group, &first)).await;
    assert_eq!(
        r.events().iter().map(offset_of).collect::<Vec<_>>(),
        vec![2]
    );
}

/// Presence lists members grouped by user; they leave with the group or
/// when their channel goes away.
async fn presence_listing(layer: &dyn ChannelLayer) {
    let group = "conformance.presence";
    let tab1 = new_channel(layer).await;
    let tab2 = new_channel(layer).await;
    let bob = new_channel(layer).await;
    let data = serde_json::json!({ "name": "Alice" });
    ok(
        "presence_join",
        layer.presence_join(
            group,
            tab1.name(),
            info("alice").with_data(&data).expect("data"),
        ),
    )
    .await;
    ok(
        "presence_join",
        layer.presence_join(group, tab2.name(), info("alice")),
    )
    .await;
    ok(
        "presence_join",
        layer.presence_join(group, bob.name(), info("bob")),
    )
    .await;
    let members = ok("presence", layer.presence(group)).await;
    assert_eq!(
        users(&members),
        vec![("alice", 2), ("bob", 1)],
        "{members:?}"
    );
    let tab1_conn = members[0]
        .connections()
        .iter()
        .find(|c| c.channel() == tab1.name())
        .unwrap_or_else(|| panic!("{:?} not listed: {members:?}", tab1.name()));
    assert_eq!(
        tab1_conn.data::<serde_json::Value>().expect("data"),
        Some(data)
    );
    assert!(ok("presence", layer.presence("conformance.nobody"))
        .await
        .is_empty());

    // A presence member is a group member.
    let mut tab2 = tab2;
    ok(
        "group_send",
        layer.group_send(group, Event::bare("conformance.to-present")),
    )
    .await;
    expect_kind(&mut tab2, "conformance.to-present").await;

    ok("group_discard", layer.group_discard(group, tab1.name())).await;
    let members = ok("presence", layer.presence(group)).await;
    assert_eq!(
        users(&members),
        vec![("alice", 1), ("bob", 1)],
        "{members:?}"
    );
    drop(bob);
    presence_until(
        layer,
        group,
        "bob leaves when his channel is dropped",
        |m| users(m) == vec![("alice", 1)],
    )
    .await;

    // Only channels with a receiver here can be present.
    let err = layer
        .presence_join(group, "specific.nobody!1", info("ghost"))
        .await
        .expect_err("presence_join of an unknown channel");
    assert!(
        matches!(err, ChannelLayerError::NoSuchChannel { .. }),
        "expected NoSuchChannel, got {err}"
    );
    assert!(
        layer.presence("no spaces").await.is_err(),
        "invalid group name"
    );
    drop(tab2);
    presence_until(layer, group, "the group empties", <[_]>::is_empty).await;
}

/// Join and leave notifications, collapsed per user, only where configured.
async fn presence_notifications(layer: &dyn ChannelLayer) {
    let group = format!("{NOTIFY_GROUPS}.room");
    let mut watcher = new_channel(layer).await;
    ok(
        "presence_join",
        layer.presence_join(&group, watcher.name(), info("watcher")),
    )
    .await;
    let own = expect_kind(&mut watcher, PRESENCE_JOIN).await;
    assert_eq!(
        own.body::<PresenceChange>().expect("body").user_id,
        "watcher"
    );
    // Joining again as the same user only updates the info.
    let updated = info("watcher").with_data(&2).expect("data");
    ok(
        "presence_join again",
        layer.presence_join(&group, watcher.name(), updated),
    )
    .await;
    expect_nothing(layer, &mut watcher).await;
    let members = ok("presence", layer.presence(&group)).await;
    assert_eq!(
        members[0].connections()[0].data_json(),
        Some("2"),
        "{members:?}"
    );

    let tab1 = new_channel(layer).await;
    let tab2 = new_channel(layer).await;
    ok(
        "presence_join",
        layer.presence_join(&group, tab1.name(), info("alice")),
    )
    .await;
    let join = expect_kind(&mut watcher, PRESENCE_JOIN).await;
    assert_eq!(
        join.body::<PresenceChange>().expect("body").user_id,
        "alice"
    );
    ok(
        "presence_join",
        layer.presence_join(&group, tab2.name(), info("alice")),
    )
    .await;
    expect_nothing(layer, &mut watcher).await;
    ok("group_discard", layer.group_discard(&group, tab1.name())).await;
    expect_nothing(layer, &mut watcher).await;
    drop(tab2);
    let leave = expect_kind(&mut watcher, PRESENCE_LEAVE).await;
    assert_eq!(
        leave.body::<PresenceChange>().expect("body").user_id,
        "alice"
    );
    assert_eq!(leave.position(), None, "notifications are not history");

    // Groups not configured for notifications get none.
    let quiet = "conformance.quiet";
    let mut member = new_channel(layer).await;
    ok(
        "presence_join",
        layer.presence_join(quiet, member.name(), info("m")),
    )
    .await;
    let other = new_channel(layer).await;
    ok(
        "presence_join",
        layer.presence_join(quiet, other.name(), info("o")),
    )
    .await;
    drop(other);
    presence_until(layer, quiet, "o leaves", |m| users(m) == vec![("m", 1)]).await;
    expect_nothing(layer, &mut member).await;
}

/// Presence across instances: one listing, notifications collapsed per user
/// across processes.
async fn pair_presence(a: &dyn ChannelLayer, b: &dyn ChannelLayer) {
    let group = format!("{NOTIFY_GROUPS}.pair");
    let mut watcher = new_channel(a).await;
    ok(
        "presence_join on a",
        a.presence_join(&group, watcher.name(), info("watcher")),
    )
    .await;
    expect_kind(&mut watcher, PRESENCE_JOIN).await;
    let bob = new_channel(b).await;
    ok(
        "presence_join on b",
        b.presence_join(&group, bob.name(), info("bob")),
    )
    .await;
    let join = expect_kind(&mut watcher, PRESENCE_JOIN).await;
    assert_eq!(join.body::<PresenceChange>().expect("body").user_id, "bob");
    for layer in [a, b] {
        let members = ok("presence", layer.presence(&group)).await;
        assert_eq!(
            users(&members),
            vec![("bob", 1), ("watcher", 1)],
            "{members:?}"
        );
    }
    // Bob opens a second connection on the other instance: no new join.
    let bob_on_a = new_channel(a).await;
    ok(
        "presence_join on a",
        a.presence_join(&group, bob_on_a.name(), info("bob")),
    )
    .await;
    expect_nothing(a, &mut watcher).await;
    let members = ok("presence", b.presence(&group)).await;
    assert_eq!(
        users(&members),
        vec![("bob", 2), ("watcher", 1)],
        "{members:?}"
    );
    // Leaving on b is not his last connection; leaving on a is.
    ok("group_discard on b", b.group_discard(&group, bob.name())).await;
    expect_nothing(a, &mut watcher).await;
    drop(bob_on_a);
    let leave = expect_kind(&mut watcher, PRESENCE_LEAVE).await;
    assert_eq!(leave.body::<PresenceChange>().expect("body").user_id, "bob");
    presence_until(b, &group, "only the watcher is left", |m| {
        users(m) == vec![("watcher", 1)]
    })
    .await;
}
