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
use tower_channels::testing::conformance::Suite;

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

/// The conformance [`Suite`] (without the pair checks) on instances with
/// prefixes of their own, made by `unique_prefix(test)`. `connect(prefix)`
/// connects one instance; one that reports presence or history must be
/// configured with `conformance::history_policy()` and
/// `conformance::presence_config()`.
pub(crate) fn suite<'a, L, F, Fut>(
    unique_prefix: fn(&str) -> String,
    test: &'a str,
    connect: &'a F,
) -> Suite<'a>
where
    L: ChannelLayer,
    F: Fn(String) -> Fut,
    Fut: Future<Output = L> + 'a,
{
    Suite::new(move || {
        let layer = connect(unique_prefix(test));
        async move { Arc::new(layer.await) as Arc<dyn ChannelLayer> }
    })
}

/// The whole conformance suite: [`suite`], with the pair checks on two
/// instances sharing one prefix (two processes of one application, with
/// different process names).
pub(crate) async fn conformance_suite<L, F, Fut>(
    unique_prefix: fn(&str) -> String,
    test: &str,
    connect: F,
) where
    L: Process,
    F: Fn(String) -> Fut,
    Fut: Future<Output = L>,
{
    let pair_test = format!("{test}-pair");
    suite(unique_prefix, test, &connect)
        .pair(|| {
            let prefix = unique_prefix(&pair_test);
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
        .run()
        .await;
}
