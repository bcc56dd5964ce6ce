//! The channel-layer conformance suite against `InMemoryChannelLayer`.

use std::sync::Arc;

use tower_channels::channel_layer::{
    BoxFuture, ChannelLayer, ChannelLayerError, ChannelLayerStats, ChannelReceiver, Event, Feature,
    GroupPattern, GroupSendReport, HistoryPolicy, InMemoryChannelLayer, PresenceInfo,
    StreamPosition,
};
use tower_channels::testing::conformance::{self, Suite};

/// A fresh layer configured as the presence and history checks expect.
fn layer() -> Arc<dyn ChannelLayer> {
    Arc::new(
        InMemoryChannelLayer::with_capacity(16)
            .with_history(conformance::history_policy())
            .with_presence(conformance::presence_config()),
    )
}

/// The whole suite: the pair is two clones of one layer.
fn suite() -> Suite<'static> {
    Suite::new(|| async { layer() }).pair(|| async {
        let layer = layer();
        (layer.clone(), layer)
    })
}

#[tokio::test]
async fn conformance() {
    suite().run().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_multi_thread() {
    suite().run().await;
}

/// A layer that keeps histories, but not for the groups the checks use,
/// reports history: the suite says how to configure it instead of failing
/// in a check.
#[tokio::test]
#[should_panic(expected = "configure it with conformance::history_policy()")]
async fn unconfigured_history_is_named() {
    Suite::new(|| async {
        Arc::new(
            InMemoryChannelLayer::with_capacity(16)
                .with_history(HistoryPolicy::new(GroupPattern::prefix("elsewhere.")))
                .with_presence(conformance::presence_config()),
        ) as Arc<dyn ChannelLayer>
    })
    .run()
    .await;
}

/// A layer without a history policy does not report history, so the
/// history checks do not run on it (and the others pass).
#[tokio::test]
async fn a_layer_without_history_runs_the_other_checks() {
    let layer =
        InMemoryChannelLayer::with_capacity(16).with_presence(conformance::presence_config());
    assert!(!layer.capabilities().supports(Feature::History));
    Suite::new(|| async {
        Arc::new(
            InMemoryChannelLayer::with_capacity(16).with_presence(conformance::presence_config()),
        ) as Arc<dyn ChannelLayer>
    })
    .run()
    .await;
}

/// The same for presence without the notifications the checks expect.
#[tokio::test]
#[should_panic(expected = "configure it with conformance::presence_config()")]
async fn unconfigured_presence_is_named() {
    Suite::new(|| async {
        Arc::new(
            InMemoryChannelLayer::with_capacity(16).with_history(conformance::history_policy()),
        ) as Arc<dyn ChannelLayer>
    })
    .run()
    .await;
}

#[test]
#[should_panic(expected = "the checks are: new_channel_names, send_receive_roundtrip")]
fn skipping_an_unknown_check_lists_the_checks() {
    let _ = Suite::new(|| async { layer() }).skip("no_such_check", "a typo");
}

/// A skipped check does not run: `no_such_channel` fails on this layer.
#[tokio::test]
async fn skipped_checks_do_not_run() {
    Suite::new(|| async {
        Arc::new(Minimal(InMemoryChannelLayer::with_capacity(16), true)) as Arc<dyn ChannelLayer>
    })
    .skip("no_such_channel", "sends to unknown channels succeed here")
    .run()
    .await;
}

/// The check skipped above fails on that layer when it runs.
#[tokio::test]
#[should_panic(expected = "expected NoSuchChannel")]
async fn unskipped_checks_run() {
    Suite::new(|| async {
        Arc::new(Minimal(InMemoryChannelLayer::with_capacity(16), true)) as Arc<dyn ChannelLayer>
    })
    .run()
    .await;
}

/// An in-memory layer implementing only the required methods (and
/// `stats`): the defaults answer presence and history as unsupported and
/// the capabilities are none. With `.1` set, a send to a channel nobody
/// receives succeeds (as on layers that cannot know), which fails the
/// `no_such_channel` check.
#[derive(Debug)]
struct Minimal(InMemoryChannelLayer, bool);

impl ChannelLayer for Minimal {
    fn new_channel(&self) -> BoxFuture<'_, Result<ChannelReceiver, ChannelLayerError>> {
        self.0.new_channel()
    }
    fn receive<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<ChannelReceiver, ChannelLayerError>> {
        self.0.receive(channel)
    }
    fn send<'a>(
        &'a self,
        channel: &'a str,
        event: Event,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        Box::pin(async move {
            match self.0.send(channel, event).await {
                Err(ChannelLayerError::NoSuchChannel { .. }) if self.1 => Ok(()),
                result => result,
            }
        })
    }
    fn group_add<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        self.0.group_add(group, channel)
    }
    fn group_discard<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        self.0.group_discard(group, channel)
    }
    fn group_send<'a>(
        &'a self,
        group: &'a str,
        event: Event,
    ) -> BoxFuture<'a, Result<GroupSendReport, ChannelLayerError>> {
        self.0.group_send(group, event)
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), ChannelLayerError>> {
        self.0.flush()
    }
    fn stats(&self) -> ChannelLayerStats {
        self.0.stats()
    }
}

#[tokio::test]
async fn default_methods_answer_unsupported() {
    let layer = Minimal(InMemoryChannelLayer::new(), false);
    let rx = layer.new_channel().await.unwrap();
    let info = PresenceInfo::new("a").unwrap();
    let err = layer.presence_join("g", rx.name(), info).await.unwrap_err();
    assert!(err.is_unsupported(), "{err}");
    assert_eq!(
        err.to_string(),
        "this channel layer does not support presence"
    );
    assert!(layer.presence("g").await.unwrap_err().is_unsupported());
    let err = layer
        .recover("g", &StreamPosition::new(1, "e"))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "this channel layer does not support history"
    );
}
