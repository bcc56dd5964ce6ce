//! One Redis host of the ring: a self-reconnecting command connection whose
//! commands have a deadline and are retried once after a connection error
//! (so the first command after a Redis restart succeeds).

use std::{future::Future, time::Duration};

use redis::{
    aio::{ConnectionManager, MultiplexedConnection},
    AsyncConnectionConfig, Cmd, FromRedisValue, RedisError, RedisResult,
};
use tokio::time::{timeout_at, Instant};

use super::BackendError;
use crate::channel_layer::{
    redis_pubsub::{command_connection, connect_bound, CONNECT_TIMEOUT},
    ChannelLayerError,
};

#[derive(Clone)]
pub(super) struct Host {
    pub(super) url: String,
    pub(super) client: redis::Client,
    conn: ConnectionManager,
    pub(super) timeout: Duration,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Whether `e` means the connection (not the command) failed, so the
/// command did not run and may be retried on a fresh connection.
fn is_connection_error(e: &RedisError) -> bool {
    e.is_connection_dropped() || e.is_connection_refusal() || e.is_io_error()
}

impl Host {
    pub(super) async fn connect(url: &str, timeout: Duration) -> Result<Self, ChannelLayerError> {
        let client = redis::Client::open(url)
            .map_err(|e| BackendError::Redis(format!("invalid Redis URL {url:?}"), e))?;
        let conn = command_connection(&client, timeout)
            .await
            .map_err(|e| match e {
                Some(e) => BackendError::Redis(format!("cannot connect to Redis at {url}"), e),
                None => BackendError::Timeout(
                    format!("connecting to Redis at {url}"),
                    connect_bound(timeout),
                ),
            })?;
        Ok(Host {
            url: url.to_owned(),
            client,
            conn,
            timeout,
        })
    }

    /// Runs `op` on the command connection within the timeout; after a
    /// connection-level error it runs it once more (redis-rs reconnects in
    /// between) if time is left.
    pub(super) async fn run<T, F, Fut>(&self, what: &str, op: F) -> Result<T, ChannelLayerError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let deadline = Instant::now() + self.timeout;
        let timed_out = || BackendError::Timeout(format!("Redis {what}"), self.timeout).into();
        let failed = |e| BackendError::Redis(format!("Redis {what} failed"), e).into();
        match timeout_at(deadline, op(self.conn.clone())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if is_connection_error(&e) => {
                tracing::debug!(host = %self.url, "Redis {what}: {e}; retrying once");
                match timeout_at(deadline, op(self.conn.clone())).await {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(e)) => Err(failed(e)),
                    Err(_) => Err(timed_out()),
                }
            }
            Ok(Err(e)) => Err(failed(e)),
            Err(_) => Err(timed_out()),
        }
    }

    pub(super) async fn query<T: FromRedisValue>(
        &self,
        what: &str,
        cmd: &Cmd,
    ) -> Result<T, ChannelLayerError> {
        self.run(what, |mut c| async move { cmd.query_async(&mut c).await })
            .await
    }

    pub(super) async fn query_pipe<T: FromRedisValue>(
        &self,
        what: &str,
        pipe: &redis::Pipeline,
    ) -> Result<T, ChannelLayerError> {
        self.run(what, |mut c| async move { pipe.query_async(&mut c).await })
            .await
    }

    /// `EVALSHA`, falling back to `EVAL` when Redis forgot the script.
    pub(super) async fn eval<T: FromRedisValue>(
        &self,
        what: &str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, ChannelLayerError> {
        self.run(what, |mut c| async move {
            invocation.invoke_async(&mut c).await
        })
        .await
    }

    /// A dedicated connection for blocking commands (`BZPOPMIN`), whose
    /// responses may take `block` plus the timeout.
    pub(super) async fn blocking_connection(
        &self,
        block: Duration,
    ) -> Result<MultiplexedConnection, String> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT.min(self.timeout)))
            .set_response_timeout(Some(block + self.timeout));
        match tokio::time::timeout(
            connect_bound(self.timeout),
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("timed out after {:?}", self.timeout)),
        }
    }
}

/// `SCAN` and `DEL` on the server, with [`Host::query`]'s timeout and retry.
impl crate::channel_layer::redis_keys::Keyspace for Host {
    type Error = ChannelLayerError;

    fn scan<'a>(
        &'a self,
        scan: &'a Cmd,
    ) -> crate::channel_layer::BoxFuture<
        'a,
        Result<crate::channel_layer::redis_keys::ScanStep, ChannelLayerError>,
    > {
        Box::pin(self.query("SCAN", scan))
    }

    fn delete<'a>(
        &'a self,
        del: &'a Cmd,
    ) -> crate::channel_layer::BoxFuture<'a, Result<(), ChannelLayerError>> {
        Box::pin(self.query("DEL", del))
    }
}
