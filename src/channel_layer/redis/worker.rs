//! Receivers of named channels: a `BRPOP` loop on a dedicated connection.

use std::{sync::Arc, time::Duration};

use redis::{aio::MultiplexedConnection, AsyncConnectionConfig};
use tokio::sync::oneshot;

use crate::channel_layer::channel;

use super::{
    wire::Envelope, ChannelLayerError, ChannelReceiver, ChannelSender, Counters, Inner, QueryError,
    CONNECT_TIMEOUT, RECONNECT_MAX, RECONNECT_MIN,
};

/// How long one `BRPOP` blocks.
const BLOCK: Duration = Duration::from_secs(5);

async fn connect(
    client: &redis::Client,
    timeout: Duration,
) -> Result<MultiplexedConnection, QueryError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT.min(timeout)))
        .set_response_timeout(Some(BLOCK + timeout));
    match tokio::time::timeout(
        CONNECT_TIMEOUT.min(timeout) + timeout,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(QueryError::Redis(e)),
        Err(_) => Err(QueryError::Timeout(timeout)),
    }
}

/// Connects, then starts receiving the named channel `name` in the background.
pub(super) async fn start(inner: &Inner, name: &str) -> Result<ChannelReceiver, ChannelLayerError> {
    let conn = connect(&inner.client, inner.config.timeout)
        .await
        .map_err(|e| e.context(&format!("connect to receive {name:?}")))?;
    let (tx, rx) = channel(name, inner.config.capacity);
    let (stop_tx, stop) = oneshot::channel::<()>();
    let worker = Worker {
        client: inner.client.clone(),
        key: inner.config.list_key(name),
        timeout: inner.config.timeout,
        sender: tx,
        stop,
        counters: inner.counters.clone(),
    };
    tokio::spawn(worker.run(conn));
    // Dropping the receiver drops `stop_tx`, which ends the loop.
    Ok(rx.on_drop(move || drop(stop_tx)))
}

struct Worker {
    client: redis::Client,
    key: String,
    timeout: Duration,
    sender: ChannelSender,
    stop: oneshot::Receiver<()>,
    counters: Arc<Counters>,
}

impl Worker {
    async fn run(mut self, conn: MultiplexedConnection) {
        let mut conn = Some(conn);
        let mut backoff = RECONNECT_MIN;
        loop {
            let Some(c) = conn.as_mut() else {
                let connected = tokio::select! {
                    _ = &mut self.stop => return,
                    c = connect(&self.client, self.timeout) => c,
                };
                match connected {
                    Ok(c) => {
                        tracing::info!(key = %self.key, "reconnected to Redis");
                        conn = Some(c);
                        backoff = RECONNECT_MIN;
                    }
                    Err(e) => {
                        tracing::debug!(key = %self.key, "Redis reconnect failed: {e:?}");
                        tokio::select! {
                            _ = &mut self.stop => return,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(RECONNECT_MAX);
                    }
                }
                continue;
            };
            let mut brpop = redis::cmd("BRPOP");
            brpop.arg(&self.key).arg(BLOCK.as_secs());
            let popped = tokio::select! {
                biased;
                _ = &mut self.stop => return,
                r = brpop.query_async::<Option<(Vec<u8>, Vec<u8>)>>(c) => r,
            };
            match popped {
                Ok(None) => {}
                Ok(Some((_, payload))) => {
                    if !self.deliver(&payload).await {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(key = %self.key, "BRPOP failed: {e}; reconnecting");
                    conn = None;
                }
            }
        }
    }

    /// Hands a popped event to the local queue, waiting while it is full.
    /// Returns false when the receiver is gone.
    async fn deliver(&mut self, payload: &[u8]) -> bool {
        let decoded = Envelope::from_bytes(payload).and_then(|env| env.decode_event());
        let event = match decoded {
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
