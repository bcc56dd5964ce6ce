//! What the tests of the layers spanning processes (Redis, Redis Cluster,
//! NATS) share: a free port, unique prefixes, a bounded receive, and the
//! conformance suite on two instances of one layer as two processes.

use std::{
    future::Future,
    net::TcpListener,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tower_channels::channel_layer::{ChannelLayer, ChannelReceiver, Event};
use tower_channels::testing::conformance;

/// A port on 127.0.0.1 nothing listens on right now.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `{pid}-{nanos}-{n}`: the end of a key or subject prefix no other test
/// (of this run or an earlier one) uses.
pub(crate) fn unique_suffix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Says the test is skipped because `service` is missing (`why`), or
/// panics when the environment variable `require` is `1` (as in CI, where
/// nothing may be skipped).
pub(crate) fn skip(service: &str, require: &str, why: &str) {
    if std::env::var(require).is_ok_and(|v| v == "1") {
        panic!("no {service} ({why}) and {require}=1");
    }
    eprintln!("skipped: no {service} ({why})");
}

/// How long [`recv`] waits for an event.
pub(crate) const RECV: Duration = Duration::from_secs(5);

/// The next event on `rx`; panics after [`RECV`] or on an error.
pub(crate) async fn recv(rx: &mut ChannelReceiver) -> Event {
    match tokio::time::timeout(RECV, rx.recv()).await {
        Ok(Ok(e)) => e,
        other => panic!("{}: expected an event, got {other:?}", rx.name()),
    }
}

/// A layer instance standing for one process of an application.
pub(crate) trait Process: ChannelLayer {
    /// The instance's process name (the part of its channel names before `!`).
    fn process_name(&self) -> &str;
}

#[cfg(feature = "redis")]
impl Process for tower_channels::channel_layer::redis::RedisChannelLayer {
    fn process_name(&self) -> &str {
        tower_channels::channel_layer::redis::RedisChannelLayer::process_name(self)
    }
}

#[cfg(feature = "redis-cluster")]
impl Process for tower_channels::channel_layer::redis::RedisClusterChannelLayer {
    fn process_name(&self) -> &str {
        tower_channels::channel_layer::redis::RedisClusterChannelLayer::process_name(self)
    }
}

#[cfg(feature = "nats")]
impl Process for tower_channels::channel_layer::nats::NatsChannelLayer {
    fn process_name(&self) -> &str {
        tower_channels::channel_layer::nats::NatsChannelLayer::process_name(self)
    }
}

/// [`conformance::run_all`] on instances with prefixes of their own, made
/// by `unique_prefix(test)`. `connect(prefix)` connects one instance.
pub(crate) async fn run_all<L, F, Fut>(unique_prefix: fn(&str) -> String, test: &str, connect: F)
where
    L: ChannelLayer,
    F: Fn(String) -> Fut,
    Fut: Future<Output = L>,
{
    conformance::run_all(|| {
        let layer = connect(unique_prefix(test));
        async move { Arc::new(layer.await) as Arc<dyn ChannelLayer> }
    })
    .await;
}

/// The presence and history checks: [`conformance::run_presence_history`]
/// on fresh instances, then [`conformance::run_presence_history_pair`] on
/// two sharing a prefix. `connect(prefix)` connects one instance
/// configured with [`conformance::history_policy`] and
/// [`conformance::presence_config`].
#[allow(dead_code)] // Not every test binary has a layer with presence.
pub(crate) async fn presence_history_suite<L, F, Fut>(unique_prefix: fn(&str) -> String, connect: F)
where
    L: ChannelLayer,
    F: Fn(String) -> Fut,
    Fut: Future<Output = L>,
{
    conformance::run_presence_history(|| {
        let layer = connect(unique_prefix("conformance-ph"));
        async move { Arc::new(layer.await) as Arc<dyn ChannelLayer> }
    })
    .await;
    conformance::run_presence_history_pair(|| {
        let prefix = unique_prefix("conformance-ph-pair");
        let (a, b) = (connect(prefix.clone()), connect(prefix));
        async move {
            (
                Arc::new(a.await) as Arc<dyn ChannelLayer>,
                Arc::new(b.await) as Arc<dyn ChannelLayer>,
            )
        }
    })
    .await;
}

/// The conformance suite: [`run_all`], then [`conformance::run_pair`] on
/// two instances sharing one prefix (two processes of one application,
/// with different process names). `connect(prefix)` connects one instance;
/// `unique_prefix(test)` makes a prefix for `test` no other test uses.
pub(crate) async fn conformance_suite<L, F, Fut>(unique_prefix: fn(&str) -> String, connect: F)
where
    L: Process,
    F: Fn(String) -> Fut,
    Fut: Future<Output = L>,
{
    run_all(unique_prefix, "conformance", &connect).await;
    conformance::run_pair(|| {
        let prefix = unique_prefix("conformance-pair");
        let (a, b) = (connect(prefix.clone()), connect(prefix));
        async move {
            let a = a.await;
            let b = b.await;
            assert_ne!(a.process_name(), b.process_name());
            (
                Arc::new(a) as Arc<dyn ChannelLayer>,
                Arc::new(b) as Arc<dyn ChannelLayer>,
            )
        }
    })
    .await;
}
