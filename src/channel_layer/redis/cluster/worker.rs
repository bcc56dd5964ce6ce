//! Receivers of named channels on a cluster: a `BRPOP` loop on a dedicated
//! cluster connection (redis-rs follows the list's slot and reconnects).

use std::{sync::Arc, time::Duration};

use redis::cluster_async::ClusterConnection;
use tokio::sync::oneshot;

use super::{connect, wire::Envelope, Counters, Inner, RECONNECT_MAX, RECONNECT_MIN};
use crate::channel_layer::{channel, ChannelLayerError, ChannelReceiver, ChannelSender};

/// How long one `BRPOP` blocks.
pub(super) const BLOCK: Duration = Duration::from_secs(5);

/// Connects, then receives the named channel `name` in the background.
pub(super) async fn start(inner: &Inner, name: &str) -> Result<ChannelReceiver, ChannelLayerError> {
    let conn = connect(
        &inner.worker_client,
        redis::cluster::ClusterConfig::new(),
        inner.config.timeout,
    )
    .await?;
    let (tx, rx) = channel(name, inner.config.capacity);
    let (stop_tx, stop) = oneshot::channel::<()>();
    let worker = Worker {
        key: inner.config.list_key(name),
        sender: tx,
        stop,
        counters: inner.counters.clone(),
    };
    tokio::spawn(worker.run(conn));
    // Dropping the receiver drops `stop_tx`, which ends the loop.
    Ok(rx.on_drop(move || drop(stop_tx)))
}

struct Worker {
    key: String,
    sender: ChannelSender,
    stop: oneshot::Receiver<()>,
    counters: Arc<Counters>,
}

impl Worker {
    async fn run(mut self, mut conn: ClusterConnection) {
        let mut backoff = RECONNECT_MIN;
        loop {
            let mut brpop = redis::cmd("BRPOP");
            brpop.arg(&self.key).arg(BLOCK.as_secs());
            let popped = tokio::select! {
                biased;
                _ = &mut self.stop => return,
                r = brpop.query_async::<Option<(Vec<u8>, Vec<u8>)>>(&mut conn) => r,
            };
            match popped {
                Ok(None) => backoff = RECONNECT_MIN,
                Ok(Some((_, payload))) => {
                    backoff = RECONNECT_MIN;
                    if !self.deliver(&payload).await {
                        return;
                    }
                }
                Err(e) => {
                    // The connection repairs itself; wait before asking again
                    // so a shard that is down is not hammered.
                    tracing::warn!(key = %self.key, retry_in = ?backoff, "BRPOP failed: {e}");
                    tokio::select! {
                        _ = &mut self.stop => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                }
            }
        }
    }

    /// Hands a popped event to the local queue, waiting while it is full.
    /// Returns false when the receiver is gone.
    async fn deliver(&mut self, payload: &[u8]) -> bool {
        let event = match Envelope::from_bytes(payload).and_then(|env| env.decode_event()) {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(key = %self.key, "dropping an event: {e}");
                Counters::add(&self.counters.dropped_other, 1);
                return true;
            }
        };
        tokio::select! {
            _ = &mut self.stop => {
                Counters::add(&self.counters.dropped_other, 1);
                false
            }
            sent = self.sender.send(event) => {
                if sent.is_err() {
                    Counters::add(&self.counters.dropped_other, 1);
                }
                sent.is_ok()
            }
        }
    }
}
