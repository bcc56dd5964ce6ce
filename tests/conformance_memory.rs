//! The channel-layer conformance suite against `InMemoryChannelLayer`.

use std::sync::Arc;

use tower_channels::channel_layer::{ChannelLayer, InMemoryChannelLayer};
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
