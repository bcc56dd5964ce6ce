//! The cross-process protocol, written once over a small [`Transport`].
//!
//! A mesh layer is one process's view of a set of processes sharing a
//! broker. It keeps the same local state as the in-memory layer (its
//! channels and which of them are in which group, [`Registry`]) and uses
//! the broker only between processes:
//!
//! * **Routing by owner.** A channel `specific.<token>!<n>` belongs to the
//!   process `specific.<token>`: a send to it from elsewhere is a request
//!   on that process's subject `{prefix}.proc.{process}`, answered with a
//!   [`Status`], so `ChannelFull` and `NoSuchChannel` are exact across
//!   processes (a broker that reports no subscriber gives `NoSuchChannel`
//!   at once). A named channel (no `!`, a worker channel) is a queue
//!   subscription to `{prefix}.channel.{name}`: each send is a request that
//!   one receiving process answers. On a broker without queue
//!   subscriptions it is a queue the broker keeps ([`Queues`]): a send
//!   pushes, each receiver pops when it has room.
//! * **Groups** are subjects `{prefix}.group.{group}`, subscribed while the
//!   process has a member (the subscription follows membership, one
//!   change at a time). A group send hands the event to local members
//!   first, then publishes it once; the other processes fan it out.
//! * **Membership** of another process's channel is a request to it; it
//!   subscribes before answering. A named channel joins a group in the
//!   transport's [`Store`] (expiring after [`MeshConfig::named_expiry`]
//!   unless added again); a group send reads the named members alongside
//!   its own broker call and then sends the event to each, as a send to
//!   the channel (one process receiving it, or the broker's queue, takes
//!   it; a full one or one nobody receives counts as dropped).
//! * **One envelope** ([`Envelope`]): origin, sequence number, and an enum
//!   of operations. Duplicates (same origin and sequence) are dropped.
//! * **Timeouts and one retry.** Every broker operation has the layer's
//!   timeout, and so has waiting for a reply. An operation that failed
//!   with [`TransportError::NotSent`] is tried once more within the same
//!   timeout; nothing that may have reached the broker is resent.
//!
//! * **Histories** (groups a [`HistoryPolicy`] applies to, on a transport
//!   with a [`Store`]): a group send appends the event to the group's
//!   history, which gives it its offset and publishes it on the group's
//!   live subject `{prefix}.hlive.{group}`, subscribed (with the group
//!   subject) while the process has a member. Each process hands history
//!   events to its members through the [`Sequencer`]: in offset order,
//!   once, reading gaps back from the history; the sending process hands
//!   its own event on as soon as the store answered with the offset. After
//!   a reconnect every followed group catches up. Ephemeral events take the
//!   plain group path. See [`history`].
//! * **Presence** (with a [`PresenceConfig`], on a transport with a
//!   [`Store`]): each process writes one entry per connection on a join
//!   and removes it on a leave, and keeps a liveness per group with a TTL,
//!   refreshed every third of it; a listing is the entries of live
//!   processes. See [`presence`].
//! * **Flush** drops this process's group memberships and queued events,
//!   and empties the [`Store`] under the prefix ([`Store::clear`]):
//!   histories (the next send starts a new epoch), presence and named
//!   members, of every process. Another process that still has presence
//!   entries writes them again on its next refresh, as after a broker lost
//!   its store.
//!
//! Each broker supplies only [`Transport`]'s three primitives, and
//! optionally a [`Store`] and [`Queues`]. The in-process [`sim`] transport injects faults
//! (drop, delay, duplicate, reorder, partition, restart) on a paused clock
//! for the tests, and keeps histories and presence in memory.

mod envelope;
mod history;
mod presence;
#[cfg(test)]
pub(crate) mod sim;
#[cfg(all(test, feature = "testing"))]
mod tests;
mod transport;

use super::local::lock;
use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

#[cfg(feature = "nats")]
pub(crate) use self::transport::history_subject;
#[cfg(feature = "redis")]
pub(crate) use self::transport::QueueConsumer;
pub(crate) use self::{
    envelope::{Dedup, Envelope, Op, Status},
    transport::{
        live_subject, Arrival, HistoryRange, Inbox, Incoming, PresenceListing, Queues, Store,
        StoredEntry, Transport, TransportError,
    },
};
use super::{
    local::{no_such_channel, Counters, LocalChannels, Owner, Registry},
    names,
    presence::LocalPresence,
    sequencer::Sequencer,
    validate_channel_name, validate_group_name, BoxFuture, Capabilities, ChannelLayer,
    ChannelLayerError, ChannelLayerStats, ChannelReceiver, Event, Feature, GroupSendReport,
    HistoryPolicy, PresenceConfig, PresenceInfo, PresenceMember, Recovery, StreamPosition,
};

/// How long a named channel stays a member of a group unless added again
/// (channels_redis' `group_expiry` default, as on Redis).
#[cfg(any(test, feature = "nats"))]
pub(crate) const NAMED_MEMBER_EXPIRY: Duration = Duration::from_secs(86_400);

/// `impl ChannelLayer for $layer`, every method delegated to its
/// [`MeshLayer`] field `$mesh` (a broker layer is a transport and a
/// builder around the mesh). `ChannelLayer` is the caller's (in scope
/// there, as its docs link to it).
#[cfg(any(feature = "nats", feature = "redis"))]
macro_rules! delegate_to_mesh {
    ($layer:ty, $mesh:ident) => {
        impl ChannelLayer for $layer {
            fn capabilities(&self) -> $crate::channel_layer::Capabilities {
                self.$mesh.capabilities()
            }

            fn new_channel(
                &self,
            ) -> $crate::channel_layer::BoxFuture<
                '_,
                Result<
                    $crate::channel_layer::ChannelReceiver,
                    $crate::channel_layer::ChannelLayerError,
                >,
            > {
                self.$mesh.new_channel()
            }

            fn receive<'a>(
                &'a self,
                channel: &'a str,
            ) -> $crate::channel_layer::BoxFuture<
                'a,
                Result<
                    $crate::channel_layer::ChannelReceiver,
                    $crate::channel_layer::ChannelLayerError,
                >,
            > {
                self.$mesh.receive(channel)
            }

            fn send<'a>(
                &'a self,
                channel: &'a str,
                event: $crate::channel_layer::Event,
            ) -> $crate::channel_layer::BoxFuture<
                'a,
                Result<(), $crate::channel_layer::ChannelLayerError>,
            > {
                self.$mesh.send(channel, event)
            }

            fn group_add<'a>(
                &'a self,
                group: &'a str,
                channel: &'a str,
            ) -> $crate::channel_layer::BoxFuture<
                'a,
                Result<(), $crate::channel_layer::ChannelLayerError>,
            > {
                self.$mesh.group_add(group, channel)
            }

            fn group_discard<'a>(
                &'a self,
                group: &'a str,
                channel: &'a str,
            ) -> $crate::channel_layer::BoxFuture<
                'a,
                Result<(), $crate::channel_layer::ChannelLayerError>,
            > {
                self.$mesh.group_discard(group, channel)
            }

            fn group_send<'a>(
                &'a self,
                group: &'a str,
                event: $crate::channel_layer::Event,
            ) -> $crate::channel_layer::BoxFuture<
                'a,
                Result<
                    $crate::channel_layer::GroupSendReport,
                    $crate::channel_layer::ChannelLayerError,
                >,
            > {
                self.$mesh.group_send(group, event)
            }

            fn flush(
                &self,
            ) -> $crate::channel_layer::BoxFuture<
                '_,
                Result<(), $crate::channel_layer::ChannelLayerError>,
            > {
                self.$mesh.flush()
            }

            fn stats(&self) -> $crate::channel_layer::ChannelLayerStats {
                self.$mesh.stats()
            }

            fn presence_join<'a>(
                &'a self,
                group: &'a str,
                channel: &'a str,
                info: $crate::channel_layer::PresenceInfo,
            ) -> $crate::channel_layer::BoxFuture<
                'a,
                Result<(), $crate::channel_layer::ChannelLayerError>,
            > {
                self.$mesh.presence_join(group, channel, info)
            }

            fn presence<'a>(
                &'a self,
                group: &'a str,
            ) -> $crate::channel_layer::BoxFuture<
                'a,
                Result<
                    Vec<$crate::channel_layer::PresenceMember>,
                    $crate::channel_layer::ChannelLayerError,
                >,
            > {
                self.$mesh.presence(group)
            }

            fn recover<'a>(
                &'a self,
                group: &'a str,
                since: &'a $crate::channel_layer::StreamPosition,
            ) -> $crate::channel_layer::BoxFuture<
                'a,
                Result<$crate::channel_layer::Recovery, $crate::channel_layer::ChannelLayerError>,
            > {
                self.$mesh.recover(group, since)
            }
        }
    };
}
#[cfg(any(feature = "nats", feature = "redis"))]
pub(crate) use delegate_to_mesh;

/// Settings of a mesh layer.
#[derive(Debug, Clone)]
pub(crate) struct MeshConfig {
    /// What every subject starts with.
    pub(crate) prefix: String,
    /// Events a local channel holds.
    pub(crate) capacity: usize,
    /// The timeout of each broker operation and of waiting for a reply.
    pub(crate) timeout: Duration,
    /// Groups with a history (used when the transport has a [`Store`]).
    pub(crate) history: Vec<HistoryPolicy>,
    /// Presence, if configured (used when the transport has a [`Store`]).
    pub(crate) presence: Option<PresenceConfig>,
    /// How long a named channel stays a member of a group unless added
    /// again (`NAMED_MEMBER_EXPIRY` on NATS, `group_expiry` on Redis).
    pub(crate) named_expiry: Duration,
}

/// A channel layer: the mesh protocol over the transport `T`.
pub(crate) struct MeshLayer<T: Transport> {
    inner: Arc<Inner<T>>,
}

impl<T: Transport> Clone for MeshLayer<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<T: Transport> fmt::Debug for MeshLayer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshLayer")
            .field("process", &self.inner.process())
            .field("transport", &self.inner.transport)
            .finish_non_exhaustive()
    }
}

struct Inner<T> {
    transport: T,
    config: MeshConfig,
    registry: Registry,
    counters: Arc<Counters>,
    /// `{prefix}.proc.{process}`.
    proc_subject: String,
    next_seq: AtomicU64,
    /// Requests waiting for their reply, by sequence number.
    pending: Mutex<HashMap<u64, oneshot::Sender<Status>>>,
    /// Subjects subscribed: groups and named channels received here.
    subscribed: Mutex<HashSet<String>>,
    /// Subjects whose subscription failed in a way that may still have
    /// taken effect (an answer lost, or one a transport makes once its
    /// connection is back): unsubscribed when nobody here wants them, so a
    /// failed subscription does not outlive the membership that asked
    /// for it. Holds at most the subjects of failed subscriptions.
    maybe_subscribed: Mutex<HashSet<String>>,
    /// Subscription changes run one at a time, so they follow membership.
    subscribing: tokio::sync::Mutex<()>,
    dedup: Mutex<Dedup>,
    /// Delivers history events to local members in offset order, once.
    sequencer: Sequencer,
    /// This, for the tasks it starts later (the sequencer's retries).
    me: Weak<Inner<T>>,
    /// Presence entries of this process's channels.
    presence: Mutex<LocalPresence>,
    /// Presence writes run one at a time, so the store gets the entries
    /// in the order they changed.
    presence_writes: tokio::sync::Mutex<()>,
    /// Per group this process wrote presence in: whether the store has
    /// its entries (see the presence module docs).
    presence_groups: Mutex<HashMap<String, presence::Written>>,
    /// Per (group, user) present here: the token of the user's stay in
    /// the group, shared by its connections on every process (see the
    /// presence module docs).
    presence_stays: Mutex<HashMap<(String, String), String>>,
}

impl<T: Transport> MeshLayer<T> {
    /// Starts a process on `transport`, whose messages arrive in the inbox
    /// `messages` (made with [`Inbox::new`] and given to the transport):
    /// subscribes to the process subject and starts the task that handles
    /// incoming messages (it stops when the layer is dropped).
    /// `counters` are the layer's (a transport may count what its client
    /// drops in them).
    pub(crate) async fn start(
        transport: T,
        messages: mpsc::Receiver<Arrival>,
        config: MeshConfig,
        counters: Arc<Counters>,
    ) -> Result<Self, ChannelLayerError> {
        let process = format!("specific.{}", names::random_token(12));
        let proc_subject = format!("{}.proc.{process}", config.prefix);
        let inner = Arc::new_cyclic(|me| Inner {
            transport,
            config,
            registry: Registry::new(process),
            counters,
            proc_subject,
            next_seq: AtomicU64::new(1),
            pending: Mutex::default(),
            subscribed: Mutex::default(),
            maybe_subscribed: Mutex::default(),
            subscribing: tokio::sync::Mutex::new(()),
            dedup: Mutex::default(),
            sequencer: Sequencer::default(),
            me: me.clone(),
            presence: Mutex::default(),
            presence_writes: tokio::sync::Mutex::new(()),
            presence_groups: Mutex::default(),
            presence_stays: Mutex::default(),
        });
        inner
            .attempt("subscribing to the process subject", || {
                inner.transport.subscribe(&inner.proc_subject, false)
            })
            .await?;
        tokio::spawn(dispatch(Arc::downgrade(&inner), messages));
        if let Some(ttl) = inner.presence_ttl() {
            tokio::spawn(presence::refresh_loop(Arc::downgrade(&inner), ttl));
        }
        Ok(Self { inner })
    }

    /// This process's name, the part of its channel names before the `!`.
    pub(crate) fn process_name(&self) -> &str {
        self.inner.process()
    }

    /// The transport.
    // Used by the broker layers and the tests.
    pub(crate) fn transport(&self) -> &T {
        &self.inner.transport
    }

    /// The settings.
    // Used by the broker layers (the mesh is also built for tests).
    #[cfg(any(feature = "nats", feature = "redis"))]
    pub(crate) fn config(&self) -> &MeshConfig {
        &self.inner.config
    }
}

impl<T: Transport> LocalChannels for Inner<T> {
    fn registry(&self) -> &Registry {
        &self.registry
    }

    fn capacity(&self) -> usize {
        self.config.capacity
    }

    fn counters(&self) -> &Counters {
        &self.counters
    }

    fn forgotten(self: &Arc<Self>, channel: &str, emptied: Vec<String>) {
        self.forget_presence(channel);
        let mut subjects: Vec<String> = emptied.iter().map(|g| self.group_subject(g)).collect();
        if self.registry.owner(channel) == Owner::Named {
            subjects.push(self.channel_subject(channel));
        }
        if subjects.is_empty() {
            return;
        }
        let inner = Arc::downgrade(self);
        let channel = channel.to_owned();
        tokio::spawn(async move {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            for group in emptied {
                let _ = inner.sync_group(&group).await;
            }
            if inner.registry.owner(&channel) == Owner::Named {
                let _ = inner.sync_named(&channel).await;
            }
        });
    }
}

impl<T: Transport> Inner<T> {
    fn group_subject(&self, group: &str) -> String {
        format!("{}.group.{group}", self.config.prefix)
    }

    fn channel_subject(&self, channel: &str) -> String {
        format!("{}.channel.{channel}", self.config.prefix)
    }

    fn proc_subject_of(&self, process: &str) -> String {
        format!("{}.proc.{process}", self.config.prefix)
    }

    fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs a transport operation within the timeout, once more when the
    /// first attempt certainly did not leave (`NotSent`).
    async fn attempt<R, F>(&self, what: &str, op: impl Fn() -> F) -> Result<R, ChannelLayerError>
    where
        F: std::future::Future<Output = Result<R, TransportError>>,
    {
        let attempts = async {
            match op().await {
                Err(TransportError::NotSent(e)) => {
                    tracing::debug!(error = %e, "{what}: trying once more");
                    op().await
                }
                other => other,
            }
        };
        match tokio::time::timeout(self.config.timeout, attempts).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(MeshError::Transport(what.to_owned(), e).into()),
            Err(_) => Err(MeshError::Timeout(what.to_owned(), self.config.timeout).into()),
        }
    }

    async fn publish(
        &self,
        what: &str,
        subject: &str,
        payload: &Bytes,
    ) -> Result<Option<usize>, ChannelLayerError> {
        self.attempt(what, || self.transport.publish(subject, payload.clone()))
            .await
    }

    /// Sends a request and waits for its reply. A broker that reports no
    /// subscriber answers [`Status::NoSuchChannel`] at once.
    async fn request(&self, subject: &str, op: Op<'_>) -> Result<Status, ChannelLayerError> {
        let seq = self.next_seq();
        let payload: Bytes = Envelope {
            origin: self.process(),
            seq,
            op,
        }
        .to_bytes()?
        .into();
        let what = format!("request to {subject:?}");
        if self.transport.has_request() {
            let answer = self
                .attempt(&what, || {
                    self.transport
                        .request(subject, payload.clone())
                        .unwrap_or_else(|| Box::pin(std::future::ready(Ok(None))))
                })
                .await?;
            return match answer {
                None => Ok(Status::NoSuchChannel),
                Some(bytes) => match Envelope::from_bytes(&bytes) {
                    Ok(Envelope {
                        op: Op::Reply { status, .. },
                        ..
                    }) => Ok(status),
                    _ => Err(MeshError::MalformedAnswer(what).into()),
                },
            };
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(seq, tx);
        let _cleanup = PendingGuard { inner: self, seq };
        if self.publish(&what, subject, &payload).await? == Some(0) {
            return Ok(Status::NoSuchChannel);
        }
        match tokio::time::timeout(self.config.timeout, rx).await {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(_)) => Err(MeshError::NoReply(what).into()),
            Err(_) => {
                Err(MeshError::Timeout(format!("{what}: the reply"), self.config.timeout).into())
            }
        }
    }

    /// Makes the subscription of `group` match local membership.
    async fn sync_group(&self, group: &str) -> Result<(), ChannelLayerError> {
        let want = self.registry.group_len(group) > 0;
        if self.history_policy(group).is_some() {
            self.sync_history(group, want).await?;
        }
        self.sync_subject(&self.group_subject(group), want, false)
            .await
    }

    /// Makes the queue subscription of the named channel match whether it
    /// is received here.
    async fn sync_named(&self, channel: &str) -> Result<(), ChannelLayerError> {
        let want = self.registry.has_channel(channel);
        self.sync_subject(&self.channel_subject(channel), want, true)
            .await
    }

    async fn sync_subject(
        &self,
        subject: &str,
        want: bool,
        queue: bool,
    ) -> Result<(), ChannelLayerError> {
        let _one_at_a_time = self.subscribing.lock().await;
        let have = lock(&self.subscribed).contains(subject);
        match (want, have) {
            (true, false) => {
                let subscribed = self
                    .attempt(&format!("subscribing to {subject:?}"), || {
                        self.transport.subscribe(subject, queue)
                    })
                    .await;
                if let Err(e) = subscribed {
                    lock(&self.maybe_subscribed).insert(subject.to_owned());
                    return Err(e);
                }
                lock(&self.maybe_subscribed).remove(subject);
                lock(&self.subscribed).insert(subject.to_owned());
            }
            (false, true) => {
                lock(&self.subscribed).remove(subject);
                self.attempt(&format!("unsubscribing from {subject:?}"), || {
                    self.transport.unsubscribe(subject)
                })
                .await?;
            }
            (false, false) if lock(&self.maybe_subscribed).remove(subject) => {
                let unsubscribed = self
                    .attempt(&format!("unsubscribing from {subject:?}"), || {
                        self.transport.unsubscribe(subject)
                    })
                    .await;
                if unsubscribed.is_err() {
                    // Tried again when the subject is next left.
                    lock(&self.maybe_subscribed).insert(subject.to_owned());
                }
                unsubscribed?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Answers request `seq` of `origin` (at `reply_to` when the broker's
    /// own request/reply carried it) without holding up the dispatch.
    fn reply(self: &Arc<Self>, to: &Reply, status: Status) {
        let inner = self.clone();
        let request = to.seq;
        let subject = to
            .reply_to
            .clone()
            .unwrap_or_else(|| self.proc_subject_of(&to.origin));
        tokio::spawn(async move {
            let env = Envelope {
                origin: inner.process(),
                seq: inner.next_seq(),
                op: Op::Reply { request, status },
            };
            let Ok(payload) = env.to_bytes() else {
                return;
            };
            if let Err(e) = inner.publish("reply", &subject, &payload.into()).await {
                tracing::debug!(subject, "could not reply to a request: {e}");
            }
        });
    }

    /// One message from the broker.
    async fn handle(self: &Arc<Self>, message: Incoming) {
        if let Some(position) = message.position {
            self.history_received(&message.subject, &message.payload, position)
                .await;
            return;
        }
        let subject = message.subject.as_str();
        let env = match Envelope::from_bytes(&message.payload) {
            Ok(env) => env,
            Err(e) => {
                tracing::warn!(subject, "dropping a mesh message: {e}");
                Counters::add(&self.counters.dropped_other, 1);
                return;
            }
        };
        if env.origin == self.process() && matches!(env.op, Op::Group { .. }) {
            // Our own group sends were delivered locally by `group_send`.
            return;
        }
        if !lock(&self.dedup).first_time(env.origin, env.seq) {
            return;
        }
        let to = Reply {
            origin: env.origin.to_owned(),
            seq: env.seq,
            reply_to: message.reply_to.clone(),
        };
        match env.op {
            Op::Group { group, event } => match Event::decode(event) {
                Ok(event) => {
                    self.fan_out(group, &event);
                }
                Err(e) => {
                    tracing::warn!(group, "dropping a group event: {e}");
                    Counters::add(&self.counters.dropped_other, 1);
                }
            },
            Op::Channel { channel, event } => {
                let status = match Event::decode(event) {
                    Ok(event) => match self.registry.send(channel, event) {
                        Ok(()) => Status::Ok,
                        Err(e) if e.is_channel_full() => Status::ChannelFull,
                        Err(_) => Status::NoSuchChannel,
                    },
                    Err(e) => {
                        tracing::warn!(channel, "dropping an event: {e}");
                        Counters::add(&self.counters.dropped_other, 1);
                        Status::Failed
                    }
                };
                self.reply(&to, status);
            }
            Op::Join { group, channel } | Op::Leave { group, channel } => {
                let join = matches!(env.op, Op::Join { .. });
                let (group, channel) = (group.to_owned(), channel.to_owned());
                let inner = self.clone();
                // Subscribing waits on the broker: not in the dispatch loop.
                tokio::spawn(async move {
                    let status = inner.membership(join, &group, &channel).await;
                    inner.reply(&to, status);
                });
            }
            Op::Reply { request, status } => {
                if let Some(tx) = lock(&self.pending).remove(&request) {
                    let _ = tx.send(status);
                }
            }
        }
    }

    /// A Join or Leave request for a channel of this process.
    async fn membership(&self, join: bool, group: &str, channel: &str) -> Status {
        if !self.registry.is_local(channel) || validate_group_name(group).is_err() {
            return Status::NoSuchChannel;
        }
        if join {
            if self.registry.group_add(group, channel).is_err() {
                return Status::NoSuchChannel;
            }
        } else {
            self.registry.group_discard(group, channel);
        }
        match self.sync_group(group).await {
            Ok(()) => Status::Ok,
            Err(_) => Status::Failed,
        }
    }
}

impl<T: Transport> Inner<T> {
    /// A group send outside any history: local members first, then one
    /// publication the other processes fan out.
    async fn group_send_plain(
        &self,
        group: &str,
        event: &Event,
    ) -> Result<GroupSendReport, ChannelLayerError> {
        let encoded = event.encode()?;
        let payload: Bytes = Envelope {
            origin: self.process(),
            seq: self.next_seq(),
            op: Op::Group {
                group,
                event: &encoded,
            },
        }
        .to_bytes()?
        .into();
        let subject = self.group_subject(group);
        let own = lock(&self.subscribed).contains(&subject);
        // Local members first: they never wait for (or miss) the broker.
        let (delivered, dropped) = self.fan_out(group, event);
        let receivers = self
            .publish(&format!("group send to {group:?}"), &subject, &payload)
            .await?;
        self.counters.group_sent(dropped);
        Ok(GroupSendReport {
            local_members: delivered,
            remote_receivers: receivers.map(|n| n.saturating_sub(usize::from(own))),
            dropped,
            position: None,
        })
    }
}

impl<T: Transport> Inner<T> {
    /// The named members of `group`, when the transport has a store.
    async fn named_members(&self, group: &str) -> Result<Vec<String>, ChannelLayerError> {
        let Some(store) = self.transport.store() else {
            return Ok(Vec::new());
        };
        self.attempt(&format!("reading the named members of {group:?}"), || {
            store.named_members(group)
        })
        .await
    }

    /// Sends `event` to each of `group`'s named `members`, as a send to
    /// the channel: counted in `remote_receivers` when a process (or the
    /// broker's queue) took it, in `dropped` when the channel was full or
    /// nobody receives it.
    async fn send_to_named(
        &self,
        group: &str,
        event: &Event,
        members: &[String],
        report: &mut GroupSendReport,
    ) -> Result<(), ChannelLayerError> {
        if members.is_empty() {
            return Ok(());
        }
        let encoded = event.encode()?;
        let sends = members.iter().map(|channel| {
            let encoded = &encoded;
            async move {
                let status = match self.transport.queues() {
                    Some(queues) => self
                        .push(queues, channel, encoded)
                        .await
                        .map(|()| Status::Ok),
                    None => {
                        let op = Op::Channel {
                            channel,
                            event: encoded,
                        };
                        self.request(&self.channel_subject(channel), op).await
                    }
                };
                (channel, status)
            }
        });
        for (channel, status) in futures_util::future::join_all(sends).await {
            match status {
                Ok(Status::Ok) => {
                    report.remote_receivers = Some(report.remote_receivers.unwrap_or(0) + 1);
                }
                Ok(status) => {
                    tracing::debug!(
                        group,
                        channel,
                        ?status,
                        "a named member did not take a group send"
                    );
                    report.dropped += 1;
                }
                Err(e) => {
                    tracing::debug!(group, channel, "sending to a named member failed: {e}");
                    report.dropped += 1;
                }
            }
        }
        Ok(())
    }

    /// A send to the named channel `channel` kept in the broker's queue.
    async fn push(
        &self,
        queues: &dyn Queues,
        channel: &str,
        encoded: &[u8],
    ) -> Result<(), ChannelLayerError> {
        let payload = Bytes::copy_from_slice(encoded);
        let pushed = self
            .attempt(&format!("send to {channel:?}"), || {
                queues.push(channel, payload.clone())
            })
            .await?;
        if pushed {
            Ok(())
        } else {
            Err(ChannelLayerError::ChannelFull {
                channel: channel.to_owned(),
            })
        }
    }

    /// `receive` of the named channel `channel` kept in the broker's queue:
    /// a task pops an event whenever the receiver has room for it (so the
    /// others wait in the broker, for other receivers), until the receiver
    /// is dropped.
    async fn consume_queue(
        &self,
        queues: &dyn Queues,
        channel: &str,
    ) -> Result<ChannelReceiver, ChannelLayerError> {
        let mut consumer = self
            .attempt(&format!("receiving {channel:?}"), || {
                queues.consume(channel)
            })
            .await?;
        let (sender, rx) = super::channel(channel, self.config.capacity);
        let (stop_tx, mut stop) = oneshot::channel::<()>();
        let counters = self.counters.clone();
        let name = channel.to_owned();
        tokio::spawn(async move {
            loop {
                let payload = tokio::select! {
                    _ = &mut stop => return,
                    payload = consumer.next() => payload,
                };
                let event = match Event::decode(&payload) {
                    Ok(event) => event,
                    Err(e) => {
                        tracing::warn!(channel = name, "dropping an event: {e}");
                        Counters::add(&counters.dropped_other, 1);
                        continue;
                    }
                };
                let sent = tokio::select! {
                    _ = &mut stop => Err(()),
                    sent = sender.send(event) => sent.map_err(drop),
                };
                if sent.is_err() {
                    Counters::add(&counters.dropped_other, 1);
                    return;
                }
            }
        });
        // Dropping the receiver drops `stop_tx`, which ends the task.
        Ok(rx.on_drop(move || drop(stop_tx)))
    }
}

/// Where the answer to a request goes.
struct Reply {
    origin: String,
    seq: u64,
    reply_to: Option<String>,
}

struct PendingGuard<'a, T> {
    inner: &'a Inner<T>,
    seq: u64,
}

impl<T> Drop for PendingGuard<'_, T> {
    fn drop(&mut self) {
        lock(&self.inner.pending).remove(&self.seq);
    }
}

/// Hands the broker's messages to the layer until it is dropped.
async fn dispatch<T: Transport>(inner: Weak<Inner<T>>, mut messages: mpsc::Receiver<Arrival>) {
    while let Some(arrival) = messages.recv().await {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        match arrival {
            Arrival::Message(message) => inner.handle(message).await,
            Arrival::Reconnected => inner.reconnected(),
        }
    }
}

/// A mesh failure, wrapped in [`ChannelLayerError::Backend`].
#[derive(Debug, thiserror::Error)]
enum MeshError {
    #[error("{0} failed")]
    Transport(String, #[source] TransportError),
    #[error("{0} timed out after {1:?}")]
    Timeout(String, Duration),
    /// An answer that is not a reply envelope.
    #[error("{0}: a malformed answer")]
    MalformedAnswer(String),
    /// The request's waiter was dropped unanswered.
    #[error("{0}: no reply")]
    NoReply(String),
    /// The owning process answered that it failed.
    #[error("the process owning {0:?} could not do it")]
    RemoteFailed(String),
}

impl From<MeshError> for ChannelLayerError {
    fn from(e: MeshError) -> Self {
        ChannelLayerError::backend(e)
    }
}

fn outcome(channel: &str, status: Status) -> Result<(), ChannelLayerError> {
    match status {
        Status::Ok => Ok(()),
        Status::NoSuchChannel => Err(no_such_channel(channel)),
        Status::ChannelFull => Err(ChannelLayerError::ChannelFull {
            channel: channel.to_owned(),
        }),
        Status::Failed => Err(MeshError::RemoteFailed(channel.to_owned()).into()),
    }
}

impl<T: Transport> ChannelLayer for MeshLayer<T> {
    fn capabilities(&self) -> Capabilities {
        let inner = &self.inner;
        let mut capabilities = Capabilities::NONE.with(Feature::CrossProcess);
        if inner.transport.store().is_some() {
            if !inner.config.history.is_empty() {
                capabilities = capabilities.with(Feature::History);
            }
            if inner.config.presence.is_some() {
                capabilities = capabilities.with(Feature::Presence);
            }
            capabilities = capabilities.with(Feature::NamedGroupMembers);
        }
        capabilities
    }

    fn new_channel(&self) -> BoxFuture<'_, Result<ChannelReceiver, ChannelLayerError>> {
        Box::pin(std::future::ready(self.inner.new_process_channel()))
    }

    fn receive<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<ChannelReceiver, ChannelLayerError>> {
        Box::pin(async move {
            let inner = &self.inner;
            match inner.receive_local(channel)? {
                Some(rx) => Ok(rx),
                None => match inner.transport.queues() {
                    Some(queues) => inner.consume_queue(queues, channel).await,
                    None => {
                        let rx = inner.register(channel.to_owned())?;
                        inner.sync_named(channel).await?;
                        Ok(rx)
                    }
                },
            }
        })
    }

    fn send<'a>(
        &'a self,
        channel: &'a str,
        event: Event,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        Box::pin(async move {
            validate_channel_name(channel)?;
            let inner = &self.inner;
            let subject = match inner.registry.owner(channel) {
                Owner::Local => return inner.registry.send(channel, event),
                Owner::Process(process) => inner.proc_subject_of(process),
                Owner::Named => match inner.transport.queues() {
                    Some(queues) => return inner.push(queues, channel, &event.encode()?).await,
                    None => inner.channel_subject(channel),
                },
            };
            let encoded = event.encode()?;
            let status = inner
                .request(
                    &subject,
                    Op::Channel {
                        channel,
                        event: &encoded,
                    },
                )
                .await?;
            outcome(channel, status)
        })
    }

    fn group_add<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        Box::pin(async move {
            validate_group_name(group)?;
            validate_channel_name(channel)?;
            let inner = &self.inner;
            match inner.registry.owner(channel) {
                Owner::Local => {
                    inner.registry.group_add(group, channel)?;
                    inner.sync_group(group).await
                }
                Owner::Process(process) => {
                    let status = inner
                        .request(&inner.proc_subject_of(process), Op::Join { group, channel })
                        .await?;
                    outcome(channel, status)
                }
                Owner::Named => {
                    let store = inner.store(Feature::NamedGroupMembers)?;
                    inner
                        .attempt(&format!("adding {channel:?} to {group:?}"), || {
                            store.named_add(group, channel, inner.config.named_expiry)
                        })
                        .await
                }
            }
        })
    }

    fn group_discard<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        Box::pin(async move {
            validate_group_name(group)?;
            validate_channel_name(channel)?;
            let inner = &self.inner;
            match inner.registry.owner(channel) {
                Owner::Local => {
                    inner.registry.group_discard(group, channel);
                    let synced = inner.sync_group(group).await;
                    inner.presence_leave(group, channel).await?;
                    synced
                }
                Owner::Process(process) => {
                    let status = inner
                        .request(
                            &inner.proc_subject_of(process),
                            Op::Leave { group, channel },
                        )
                        .await?;
                    // Leaving a channel that is gone is not an error.
                    match status {
                        Status::NoSuchChannel => Ok(()),
                        status => outcome(channel, status),
                    }
                }
                Owner::Named => match inner.transport.store() {
                    Some(store) => {
                        inner
                            .attempt(&format!("removing {channel:?} from {group:?}"), || {
                                store.named_remove(group, channel)
                            })
                            .await
                    }
                    None => Ok(()),
                },
            }
        })
    }

    fn group_send<'a>(
        &'a self,
        group: &'a str,
        event: Event,
    ) -> BoxFuture<'a, Result<GroupSendReport, ChannelLayerError>> {
        Box::pin(async move {
            validate_group_name(group)?;
            let inner = &self.inner;
            let send = async {
                match inner
                    .history_policy(group)
                    .filter(|_| !event.is_ephemeral())
                {
                    Some(_) => inner.group_send_with_history(group, &event).await,
                    None => inner.group_send_plain(group, &event).await,
                }
            };
            // The named members are read alongside the send, in the same
            // round trip on a pipelining client.
            let (report, named) =
                futures_util::future::join(send, inner.named_members(group)).await;
            let mut report = report?;
            inner
                .send_to_named(group, &event, &named?, &mut report)
                .await?;
            Ok(report)
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ChannelLayerError>> {
        Box::pin(async move {
            let inner = &self.inner;
            inner.registry.clear();
            let groups: Vec<String> = {
                let prefix = format!("{}.group.", inner.config.prefix);
                lock(&inner.subscribed)
                    .iter()
                    .filter_map(|s| s.strip_prefix(&prefix).map(str::to_owned))
                    .collect()
            };
            let synced = async {
                for group in groups {
                    inner.sync_group(&group).await?;
                }
                Ok(())
            }
            .await;
            // Histories, presence and named members, of every process.
            let cleared = inner.clear_store().await;
            synced.and(cleared)
        })
    }

    fn stats(&self) -> ChannelLayerStats {
        self.inner.counters.stats()
    }

    fn presence_join<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
        info: PresenceInfo,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        Box::pin(async move {
            validate_group_name(group)?;
            validate_channel_name(channel)?;
            self.inner.presence_store()?;
            if !self.inner.registry.is_local(channel) {
                // Only this process can keep a channel's presence alive.
                return Err(no_such_channel(channel));
            }
            self.group_add(group, channel).await?;
            self.inner.presence_join(group, channel, info).await
        })
    }

    fn presence<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Vec<PresenceMember>, ChannelLayerError>> {
        Box::pin(self.inner.presence_list(group))
    }

    fn recover<'a>(
        &'a self,
        group: &'a str,
        since: &'a StreamPosition,
    ) -> BoxFuture<'a, Result<Recovery, ChannelLayerError>> {
        Box::pin(self.inner.recover(group, since))
    }
}
