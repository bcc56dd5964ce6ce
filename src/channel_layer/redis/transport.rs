//! The mesh's [`Transport`] on one Redis server: `PUBLISH` on the
//! multiplexed command connection, and the shared Pub/Sub task
//! ([`redis_pubsub`](crate::channel_layer::redis_pubsub)) for
//! subscriptions: it subscribes to what the mesh asked for, hands what
//! arrives to the mesh's inbox, and reconnects (subscribing everything
//! again, then telling the mesh) when the connection breaks.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use redis::{aio::ConnectionManager, Msg};

use super::{ask, query, queue::RedisQueues, store::RedisStore, RedisFailure};
use crate::channel_layer::{
    local::{lock, Counters},
    mesh::{live_subject, Inbox, Queues, Store, Transport, TransportError},
    redis_pubsub::{Command, Handler, Subscriber},
    BoxFuture,
};

/// Redis for the mesh: commands, the Pub/Sub task, the store and the
/// named channels' lists.
pub(super) struct RedisTransport {
    pub(super) conn: ConnectionManager,
    pub(super) subscriber: Subscriber,
    /// What the mesh subscribed to (the Pub/Sub task subscribes to it).
    wanted: Arc<Mutex<HashSet<String>>>,
    store: RedisStore<ConnectionManager>,
    queues: RedisQueues<ConnectionManager, redis::Client>,
}

impl std::fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTransport")
            .field("connected", &self.subscriber.is_connected())
            .finish_non_exhaustive()
    }
}

impl RedisTransport {
    /// Opens the Pub/Sub connection (nothing subscribed) and starts its
    /// task, delivering into `inbox`; commands go over the connection
    /// `queues` uses, with its timeout.
    pub(super) async fn start(
        inbox: Inbox,
        counters: Arc<Counters>,
        store: RedisStore<ConnectionManager>,
        queues: RedisQueues<ConnectionManager, redis::Client>,
    ) -> Result<Self, RedisFailure> {
        let wanted = Arc::new(Mutex::new(HashSet::new()));
        let handler = ToMesh {
            inbox,
            counters,
            live_prefix: live_subject(&queues.layout.prefix, ""),
            wanted: wanted.clone(),
        };
        let (subscriber, task) = Subscriber::new();
        task.start(&queues.connector, Vec::new(), queues.timeout, handler)
            .await?;
        Ok(Self {
            conn: queues.conn.clone(),
            subscriber,
            wanted,
            store,
            queues,
        })
    }

    /// Notes whether the mesh wants `subject`, then asks the Pub/Sub task
    /// to subscribe or unsubscribe to match, and waits for it.
    async fn want(&self, subject: &str, wanted: bool) -> Result<(), TransportError> {
        if wanted {
            lock(&self.wanted).insert(subject.to_owned());
        } else {
            lock(&self.wanted).remove(subject);
        }
        ask(&self.subscriber.commands, |ack| Command::Sync {
            channel: subject.to_owned(),
            ack: Some(ack),
        })
        .await
    }
}

impl Transport for RedisTransport {
    fn publish<'a>(
        &'a self,
        subject: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Option<usize>, TransportError>> {
        Box::pin(async move {
            let mut publish = redis::cmd("PUBLISH");
            publish.arg(subject).arg(payload.as_ref());
            Ok(Some(query(&self.conn, "PUBLISH", &publish).await?))
        })
    }

    fn subscribe<'a>(
        &'a self,
        subject: &'a str,
        _queue: bool,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        // Named channels are lists here (`queues`): never a queue subscription.
        Box::pin(self.want(subject, true))
    }

    fn unsubscribe<'a>(&'a self, subject: &'a str) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(self.want(subject, false))
    }

    fn store(&self) -> Option<&dyn Store> {
        Some(&self.store)
    }

    fn queues(&self) -> Option<&dyn Queues> {
        Some(&self.queues)
    }
}

/// What the Pub/Sub task does for the mesh.
struct ToMesh {
    inbox: Inbox,
    counters: Arc<Counters>,
    /// `{prefix}.hlive.`: stored history events arrive on these.
    live_prefix: String,
    wanted: Arc<Mutex<HashSet<String>>>,
}

impl Handler for ToMesh {
    const WAIT_FOR_RECONNECT: bool = true;

    fn wanted(&self, channel: &str) -> bool {
        lock(&self.wanted).contains(channel)
    }

    fn all_wanted(&self) -> Vec<String> {
        lock(&self.wanted).iter().cloned().collect()
    }

    /// Hands a message to the mesh; false when the mesh is gone.
    async fn message(&self, msg: &Msg) -> bool {
        let subject = msg.get_channel_name().to_owned();
        let payload = msg.get_payload_bytes();
        match super::store::incoming(subject, payload, &self.live_prefix, &self.counters) {
            Some(incoming) => self.inbox.send(incoming).await,
            None => true,
        }
    }

    /// The mesh reads what its history groups missed and writes its
    /// presence again.
    async fn reconnected(&self) -> bool {
        self.inbox.reconnected().await
    }
}
