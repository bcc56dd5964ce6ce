//! The one error type of the Pub/Sub tasks on redis-rs, shared by the
//! Redis Cluster and Django pubsub layers.

use std::{sync::Arc, time::Duration};

use redis::RedisError;

/// Why a redis-rs Pub/Sub task could not subscribe or unsubscribe (the
/// Redis Cluster and Django pubsub layers).
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum SubscriberError {
    #[cfg_attr(not(feature = "django"), allow(dead_code))]
    #[error("cannot connect to Redis Pub/Sub")]
    Connect(#[source] Arc<RedisError>),
    #[cfg_attr(not(feature = "django"), allow(dead_code))]
    #[error("connecting to Redis Pub/Sub timed out")]
    ConnectTimeout,
    #[error("{0} failed")]
    Command(String, #[source] Arc<RedisError>),
    #[error("{0} timed out after {1:?}")]
    CommandTimeout(String, Duration),
    #[cfg_attr(not(feature = "django"), allow(dead_code))]
    #[error("not connected to Redis (reconnecting)")]
    Reconnecting,
}
