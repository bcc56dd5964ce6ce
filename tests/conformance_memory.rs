//! The channel-layer conformance suite against `InMemoryChannelLayer`.

use std::sync::Arc;

use tower_channels::channel_layer::{
    BoxFuture, ChannelLayer, ChannelLayerError, ChannelReceiver, Event, GroupSendReport,
    InMemoryChannelLayer, PresenceInfo, StreamPosition,
};
use tower_channels::testing::conformance;

fn layer() -> Arc<dyn ChannelLayer> {
    Arc::new(InMemoryChannelLayer::with_capacity(16))
}

#[tokio::test]
async fn conformance_single_layer() {
    conformance::run_all(|| async { layer() }).await;
}

#[tokio::test]
async fn conformance_pair_of_clones() {
    conformance::run_pair(|| async {
        let layer = layer();
        (layer.clone(), layer)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_single_layer_multi_thread() {
    conformance::run_all(|| async { layer() }).await;
}

fn configured() -> Arc<dyn ChannelLayer> {
    Arc::new(
        InMemoryChannelLayer::with_capacity(16)
            .with_history(conformance::history_policy())
            .with_presence(conformance::presence_config()),
    )
}

#[tokio::test]
async fn conformance_presence_history() {
    conformance::run_presence_history(|| async { configured() }).await;
}

#[tokio::test]
async fn conformance_presence_history_pair_of_clones() {
    conformance::run_presence_history_pair(|| async {
        let layer = configured();
        (layer.clone(), layer)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_presence_history_multi_thread() {
    conformance::run_presence_history(|| async { configured() }).await;
}

#[tokio::test]
async fn default_methods_answer_unsupported() {
    #[derive(Debug)]
    struct Minimal(InMemoryChannelLayer);
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
            self.0.send(channel, event)
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
    }
    let layer = Minimal(InMemoryChannelLayer::new());
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
