//! Named channels as Redis lists (the mesh's [`Queues`]), on one server or
//! a cluster: a send is an `LPUSH` (refused when the list holds `capacity`
//! events), each receiver runs a `BRPOP` loop on its own connection.

use std::time::Duration;

use bytes::Bytes;
use redis::{aio::ConnectionLike, aio::MultiplexedConnection, AsyncConnectionConfig, Script};

use super::{failure, invoke, Connection, Layout};
use crate::channel_layer::{
    mesh::{QueueConsumer, Queues, TransportError},
    redis_pubsub::{CONNECT_TIMEOUT, RECONNECT_MAX, RECONNECT_MIN},
    BoxFuture,
};

/// How long one `BRPOP` blocks.
pub(super) const BLOCK: Duration = Duration::from_secs(5);

/// Makes the connection of one receiver's `BRPOP` loop, whose answers may
/// take [`BLOCK`] plus the timeout: a `redis::Client`, or on a cluster a
/// `ClusterClient` built with that response timeout.
pub(super) trait Connector: Clone + Send + Sync + 'static {
    /// The connection made.
    type Conn: ConnectionLike + Send + 'static;

    /// Connects, within the timeout of each command `timeout`.
    fn connect(&self, timeout: Duration) -> BoxFuture<'_, redis::RedisResult<Self::Conn>>;
}

impl Connector for redis::Client {
    type Conn = MultiplexedConnection;

    fn connect(&self, timeout: Duration) -> BoxFuture<'_, redis::RedisResult<Self::Conn>> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT.min(timeout)))
            .set_response_timeout(Some(BLOCK + timeout));
        Box::pin(async move {
            self.get_multiplexed_async_connection_with_config(&config)
                .await
        })
    }
}

/// The lists of named channels, `{prefix}:channel:{name}` (the name
/// hash-tagged on a cluster), on the connection `C`; receivers connect
/// with `K`.
pub(super) struct RedisQueues<C, K> {
    pub(super) connector: K,
    pub(super) conn: C,
    pub(super) layout: Layout,
    pub(super) capacity: usize,
    /// How long events wait in a list after the last push.
    pub(super) expiry: Duration,
    pub(super) timeout: Duration,
    pub(super) send: Script,
}

impl<C, K> RedisQueues<C, K> {
    fn key(&self, channel: &str) -> String {
        self.layout.key("channel", channel)
    }
}

impl<C: Connection, K: Connector> Queues for RedisQueues<C, K> {
    fn push<'a>(
        &'a self,
        channel: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<bool, TransportError>> {
        Box::pin(async move {
            let mut push = self.send.key(self.key(channel));
            push.arg(payload.as_ref())
                .arg(self.capacity)
                .arg(self.expiry.as_secs());
            let pushed: i64 = invoke(&self.conn, "LPUSH", &push).await?;
            Ok(pushed == 1)
        })
    }

    fn consume<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn QueueConsumer>, TransportError>> {
        Box::pin(async move {
            let what = format!("connecting to receive {channel:?}");
            let conn = self
                .connector
                .connect(self.timeout)
                .await
                .map_err(|e| failure(&what, e))?;
            Ok(Box::new(Popper {
                connector: self.connector.clone(),
                key: self.key(channel),
                timeout: self.timeout,
                conn: Some(conn),
                backoff: RECONNECT_MIN,
            }) as Box<dyn QueueConsumer>)
        })
    }
}

/// One receiver's `BRPOP` loop, on its own connection.
struct Popper<K: Connector> {
    connector: K,
    key: String,
    timeout: Duration,
    conn: Option<K::Conn>,
    backoff: Duration,
}

impl<K: Connector> QueueConsumer for Popper<K> {
    fn next(&mut self) -> BoxFuture<'_, Bytes> {
        Box::pin(async move {
            loop {
                let Some(conn) = self.conn.as_mut() else {
                    match self.connector.connect(self.timeout).await {
                        Ok(c) => {
                            // The backoff is reset by a BRPOP that answers.
                            tracing::info!(key = %self.key, "reconnected to Redis");
                            self.conn = Some(c);
                        }
                        Err(e) => {
                            tracing::debug!(key = %self.key, "Redis reconnect failed: {e}");
                            tokio::time::sleep(self.backoff).await;
                            self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
                        }
                    }
                    continue;
                };
                let popped = redis::cmd("BRPOP")
                    .arg(&self.key)
                    .arg(BLOCK.as_secs())
                    .query_async::<Option<(Vec<u8>, Vec<u8>)>>(conn)
                    .await;
                match popped {
                    Ok(None) => self.backoff = RECONNECT_MIN,
                    Ok(Some((_, payload))) => {
                        self.backoff = RECONNECT_MIN;
                        return Bytes::from(payload);
                    }
                    Err(e) => {
                        // Waits before asking again, so a server (or a
                        // cluster's shard) that is down is not hammered.
                        tracing::warn!(
                            key = %self.key,
                            retry_in = ?self.backoff,
                            "BRPOP failed: {e}; reconnecting"
                        );
                        self.conn = None;
                        tokio::time::sleep(self.backoff).await;
                        self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
                    }
                }
            }
        })
    }
}
