//! Named channels as Redis lists (the mesh's [`Queues`]): a send is an
//! `LPUSH` (refused when the list holds `capacity` events), each receiver
//! runs a `BRPOP` loop on its own connection.

use std::time::Duration;

use bytes::Bytes;
use redis::{aio::ConnectionManager, aio::MultiplexedConnection, AsyncConnectionConfig, Script};

use super::{failure, invoke, CONNECT_TIMEOUT, RECONNECT_MAX, RECONNECT_MIN};
use crate::channel_layer::{
    mesh::{QueueConsumer, Queues, TransportError},
    BoxFuture,
};

/// How long one `BRPOP` blocks.
const BLOCK: Duration = Duration::from_secs(5);

/// The lists of named channels, `{prefix}:channel:{name}`.
pub(super) struct RedisQueues {
    pub(super) client: redis::Client,
    pub(super) conn: ConnectionManager,
    pub(super) prefix: String,
    pub(super) capacity: usize,
    /// How long events wait in a list after the last push.
    pub(super) expiry: Duration,
    pub(super) timeout: Duration,
    pub(super) send: Script,
}

impl RedisQueues {
    fn key(&self, channel: &str) -> String {
        format!("{}:channel:{channel}", self.prefix)
    }
}

async fn connect(
    client: &redis::Client,
    timeout: Duration,
) -> redis::RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT.min(timeout)))
        .set_response_timeout(Some(BLOCK + timeout));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

impl Queues for RedisQueues {
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
            let conn = connect(&self.client, self.timeout)
                .await
                .map_err(|e| failure(&what, e))?;
            Ok(Box::new(Popper {
                client: self.client.clone(),
                key: self.key(channel),
                timeout: self.timeout,
                conn: Some(conn),
                backoff: RECONNECT_MIN,
            }) as Box<dyn QueueConsumer>)
        })
    }
}

/// One receiver's `BRPOP` loop, on its own connection.
struct Popper {
    client: redis::Client,
    key: String,
    timeout: Duration,
    conn: Option<MultiplexedConnection>,
    backoff: Duration,
}

impl QueueConsumer for Popper {
    fn next(&mut self) -> BoxFuture<'_, Bytes> {
        Box::pin(async move {
            loop {
                let Some(conn) = self.conn.as_mut() else {
                    match connect(&self.client, self.timeout).await {
                        Ok(c) => {
                            tracing::info!(key = %self.key, "reconnected to Redis");
                            self.conn = Some(c);
                            self.backoff = RECONNECT_MIN;
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
                    Ok(None) => {}
                    Ok(Some((_, payload))) => return Bytes::from(payload),
                    Err(e) => {
                        tracing::warn!(key = %self.key, "BRPOP failed: {e}; reconnecting");
                        self.conn = None;
                    }
                }
            }
        })
    }
}
