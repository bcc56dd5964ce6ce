//! Shard subscriptions: push messages are handled as redis-rs reads them
//! ([`Inner::push`]); one task keeps `SSUBSCRIBE`s in line with local
//! membership, retries those that failed, and checks the nodes' health;
//! another ([`sequence`]) hands history events to the sequencer, which may
//! have to read the history first (a push handler must not wait).

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Weak,
    },
    time::Duration,
};

use redis::{
    cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo},
    PushInfo, PushKind, Value,
};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

use super::{
    history, lock, presence,
    wire::{self, Envelope},
    within, Counters, Inner, LocalChannels, QueryError, SubscriberError, RECONNECT_MAX,
    RECONNECT_MIN,
};
use crate::channel_layer::Event;

/// How often every primary is pinged to tell whether the layer is connected.
const HEALTH_CHECK: Duration = Duration::from_secs(2);

/// Bytes of history events (their encoded payloads) waiting for the
/// [`sequence`] task, at most. Past it an event is dropped and counted in
/// `dropped_other`; it is not lost for good: the next event of its group
/// shows the gap, and the sequencer reads the missing offsets from the
/// stream.
const RECEIVED_BYTES: usize = 16 << 20;

/// A history event read from a push, on its way to the sequencer.
#[derive(Debug)]
pub(super) struct Arrival {
    group: String,
    event: Event,
    offset: u64,
    epoch: String,
    bytes: usize,
}

/// The queue from the push handler to the [`sequence`] task, bounded by
/// [`RECEIVED_BYTES`].
#[derive(Debug)]
pub(super) struct Received {
    tx: mpsc::UnboundedSender<Arrival>,
    bytes: AtomicUsize,
}

pub(super) type ReceivedRx = mpsc::UnboundedReceiver<Arrival>;

impl Received {
    pub(super) fn new(tx: mpsc::UnboundedSender<Arrival>) -> Self {
        Self {
            tx,
            bytes: AtomicUsize::new(0),
        }
    }
}

/// Hands the history events of pushes to the sequencer, in the order
/// they arrived, until the layer is dropped.
pub(super) async fn sequence(inner: Weak<Inner>, mut rx: ReceivedRx) {
    while let Some(arrival) = rx.recv().await {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner
            .received
            .bytes
            .fetch_sub(arrival.bytes, Ordering::Relaxed);
        history::received(
            &*inner,
            &arrival.group,
            arrival.event,
            arrival.offset,
            &arrival.epoch,
        )
        .await;
    }
}

pub(super) type Ack = oneshot::Sender<Result<(), SubscriberError>>;

#[derive(Debug)]
pub(super) enum Command {
    /// Subscribe to or unsubscribe from `group` to match local membership.
    Sync { group: String, ack: Option<Ack> },
    /// Same for every group (after a flush).
    SyncAll { ack: Ack },
    /// Another process asks to add (`op` = add) or discard its channel.
    Remote {
        op: u8,
        origin: String,
        id: u64,
        group: String,
        channel: String,
    },
    /// The server ended the process channel's subscription (slot migrated).
    Process,
    /// A node connection dropped: once every primary answers, subscribe
    /// again to everything wanted (whatever redis-rs restored by itself).
    Resync,
}

/// `SSUBSCRIBE`s one shard channel, waiting for the confirmation.
pub(super) async fn ssubscribe(inner: &Inner, channel: &str) -> Result<(), SubscriberError> {
    let mut conn = inner.pubsub.clone();
    within(inner.config.timeout, conn.ssubscribe(channel))
        .await
        .map_err(|e| describe(e, "SSUBSCRIBE", channel))
}

async fn sunsubscribe(inner: &Inner, channel: &str) -> Result<(), SubscriberError> {
    let mut conn = inner.pubsub.clone();
    within(inner.config.timeout, conn.sunsubscribe(channel))
        .await
        .map_err(|e| describe(e, "SUNSUBSCRIBE", channel))
}

fn describe(e: QueryError, what: &str, channel: &str) -> SubscriberError {
    let what = format!("{what} {channel:?}");
    match e {
        QueryError::Redis(e) => SubscriberError::Command(what, std::sync::Arc::new(e)),
        QueryError::Timeout(d) => SubscriberError::CommandTimeout(what, d),
    }
}

fn text(value: Option<&Value>) -> Option<&[u8]> {
    match value? {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

impl Inner {
    /// A push message from a node, called by redis-rs's connection task:
    /// must not wait.
    pub(super) fn push(&self, push: &PushInfo) {
        match push.kind {
            PushKind::SMessage => {
                let (Some(channel), Some(payload)) =
                    (text(push.data.first()), text(push.data.get(1)))
                else {
                    Counters::add(&self.counters.dropped_other, 1);
                    return;
                };
                match std::str::from_utf8(channel) {
                    Ok(channel) => self.message(channel, payload),
                    Err(_) => Counters::add(&self.counters.dropped_other, 1),
                }
            }
            PushKind::SUnsubscribe => {
                let Some(channel) =
                    text(push.data.first()).and_then(|c| std::str::from_utf8(c).ok())
                else {
                    return;
                };
                if channel == self.proc_channel {
                    tracing::info!(
                        channel,
                        "the process channel's shard subscription ended; subscribing again"
                    );
                    let _ = self.commands.send(Command::Process);
                } else if let Some(group) = self.config.group_of(channel) {
                    // Ours end with the last local member; any other was
                    // ended by the server (its slot moved away).
                    if self.has_local_members(group) {
                        lock(&self.subscribed).remove(group);
                        let _ = self.commands.send(Command::Sync {
                            group: group.to_owned(),
                            ack: None,
                        });
                    }
                }
            }
            PushKind::Disconnection => {
                self.connected.store(false, Ordering::Relaxed);
                let _ = self.commands.send(Command::Resync);
            }
            _ => {}
        }
    }

    fn message(&self, channel: &str, payload: &[u8]) {
        let env = match Envelope::from_bytes(payload) {
            Ok(env) => env,
            Err(e) => {
                tracing::warn!(channel, "dropping a Redis message: {e}");
                Counters::add(&self.counters.dropped_other, 1);
                return;
            }
        };
        if let Some(group) = self.config.group_of(channel) {
            if env.op != wire::OP_GROUP_EVENT {
                Counters::add(&self.counters.dropped_other, 1);
            } else if env.origin != self.process() || env.id != 0 {
                // Our own group sends were delivered locally by
                // `group_send`. Those of history groups (`id` is their
                // offset, `channel` their epoch) go through the sequencer,
                // which drops the copies already delivered.
                match env.decode_event() {
                    Ok(event) if env.id == 0 => {
                        self.fan_out(group, &event);
                    }
                    Ok(event) => {
                        self.to_sequencer(group, event, env.id, env.channel, payload.len())
                    }
                    Err(e) => {
                        tracing::warn!(group, "dropping a group event: {e}");
                        Counters::add(&self.counters.dropped_other, 1);
                    }
                }
            }
            return;
        }
        if channel != self.proc_channel {
            Counters::add(&self.counters.dropped_other, 1);
            return;
        }
        match env.op {
            wire::OP_CHANNEL_EVENT => match env.decode_event() {
                Ok(event) => self.deliver_remote(env.channel, event),
                Err(e) => {
                    tracing::warn!(channel = env.channel, "dropping an event: {e}");
                    Counters::add(&self.counters.dropped_other, 1);
                }
            },
            wire::OP_GROUP_ADD | wire::OP_GROUP_DISCARD => {
                let _ = self.commands.send(Command::Remote {
                    op: env.op,
                    origin: env.origin.to_owned(),
                    id: env.id,
                    group: env.group.to_owned(),
                    channel: env.channel.to_owned(),
                });
            }
            wire::OP_REPLY_OK | wire::OP_REPLY_NO_SUCH_CHANNEL | wire::OP_REPLY_FAILED => {
                self.complete_request(env.id, env.op);
            }
            _ => Counters::add(&self.counters.dropped_other, 1),
        }
    }
}

impl Inner {
    fn to_sequencer(&self, group: &str, event: Event, offset: u64, epoch: &str, bytes: usize) {
        let queued = &self.received.bytes;
        if queued.fetch_add(bytes, Ordering::Relaxed) + bytes > RECEIVED_BYTES {
            queued.fetch_sub(bytes, Ordering::Relaxed);
            tracing::debug!(
                group,
                offset,
                "history events queue full: the gap is read back"
            );
            Counters::add(&self.counters.dropped_other, 1);
            return;
        }
        let arrival = Arrival {
            group: group.to_owned(),
            event,
            offset,
            epoch: epoch.to_owned(),
            bytes,
        };
        if self.received.tx.send(arrival).is_err() {
            // The task is gone only when the layer is.
            queued.fetch_sub(bytes, Ordering::Relaxed);
        }
    }
}

pub(super) struct Subscriber {
    inner: Weak<Inner>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Groups whose (un)subscription failed, retried with backoff.
    retry: HashSet<String>,
    /// Whether the process channel must be subscribed again.
    process_lost: bool,
    /// Whether every subscription must be made again once the nodes answer.
    resync: bool,
    backoff: Duration,
    next_retry: Instant,
}

enum Wake {
    Command(Option<Command>),
    Retry,
    Health,
}

impl Subscriber {
    pub(super) fn new(inner: &Arc<Inner>, commands: mpsc::UnboundedReceiver<Command>) -> Self {
        Self {
            inner: Arc::downgrade(inner),
            commands,
            retry: HashSet::new(),
            process_lost: false,
            resync: false,
            backoff: RECONNECT_MIN,
            next_retry: Instant::now(),
        }
    }

    fn pending(&self) -> bool {
        self.process_lost || self.resync || !self.retry.is_empty()
    }

    /// Runs until the layer is dropped.
    pub(super) async fn run(mut self) {
        let mut health = tokio::time::interval_at(Instant::now() + HEALTH_CHECK, HEALTH_CHECK);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = if self.pending() {
                tokio::select! {
                    cmd = self.commands.recv() => Wake::Command(cmd),
                    () = tokio::time::sleep_until(self.next_retry) => Wake::Retry,
                    _ = health.tick() => Wake::Health,
                }
            } else {
                tokio::select! {
                    cmd = self.commands.recv() => Wake::Command(cmd),
                    _ = health.tick() => Wake::Health,
                }
            };
            let Some(inner) = self.inner.upgrade() else {
                return;
            };
            match wake {
                Wake::Command(None) => return,
                Wake::Command(Some(cmd)) => self.command(&inner, cmd).await,
                Wake::Retry => self.retry(&inner).await,
                Wake::Health => self.health(&inner).await,
            }
        }
    }

    async fn command(&mut self, inner: &Inner, cmd: Command) {
        match cmd {
            Command::Sync { group, ack } => {
                let result = self.reconcile(inner, vec![group]).await;
                if let Some(ack) = ack {
                    let _ = ack.send(result);
                }
            }
            Command::SyncAll { ack } => {
                let mut groups: HashSet<String> = lock(&inner.subscribed).clone();
                groups.extend(inner.registry.group_names());
                groups.extend(self.retry.drain());
                let result = self.reconcile(inner, groups.into_iter().collect()).await;
                let _ = ack.send(result);
            }
            Command::Process => self.resubscribe_process(inner).await,
            Command::Resync => {
                if !self.pending() {
                    self.backoff = RECONNECT_MIN;
                }
                self.resync = true;
                self.next_retry = Instant::now() + self.backoff;
            }
            Command::Remote {
                op,
                origin,
                id,
                group,
                channel,
            } => {
                let status = if !inner.registry.is_local(&channel)
                    || crate::channel_layer::validate_group_name(&group).is_err()
                {
                    wire::OP_REPLY_NO_SUCH_CHANNEL
                } else if op == wire::OP_GROUP_ADD {
                    match inner.registry.group_add(&group, &channel) {
                        Err(_) => wire::OP_REPLY_NO_SUCH_CHANNEL,
                        Ok(()) => match self.reconcile(inner, vec![group]).await {
                            Ok(()) => wire::OP_REPLY_OK,
                            Err(_) => wire::OP_REPLY_FAILED,
                        },
                    }
                } else {
                    inner.registry.group_discard(&group, &channel);
                    match self.reconcile(inner, vec![group]).await {
                        Ok(()) => wire::OP_REPLY_OK,
                        Err(_) => wire::OP_REPLY_FAILED,
                    }
                };
                reply(inner, &origin, id, status);
            }
        }
    }

    async fn resubscribe_process(&mut self, inner: &Inner) {
        match ssubscribe(inner, &inner.proc_channel).await {
            Ok(()) => self.process_lost = false,
            Err(e) => {
                tracing::warn!(process = %inner.process(), "{e}; retrying");
                self.failed(inner);
                self.process_lost = true;
            }
        }
    }

    fn failed(&mut self, inner: &Inner) {
        if !self.pending() {
            self.backoff = RECONNECT_MIN;
        }
        self.next_retry = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
        inner.connected.store(false, Ordering::Relaxed);
    }

    async fn retry(&mut self, inner: &Arc<Inner>) {
        let resynced = self.resync;
        if self.resync {
            if !ping_all(inner).await {
                self.next_retry = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
                return;
            }
            self.resync = false;
            self.process_lost = true;
            tracing::info!(process = %inner.process(), "a node connection dropped and every primary answers again: subscribing again");
            // Forget what was confirmed: `reconcile` subscribes again.
            let groups: Vec<String> = lock(&inner.subscribed).drain().collect();
            self.retry.extend(groups);
            self.retry.extend(inner.registry.group_names());
        }
        if self.process_lost {
            self.resubscribe_process(inner).await;
        }
        let groups: Vec<String> = self.retry.drain().collect();
        if !groups.is_empty() && self.reconcile(inner, groups).await.is_ok() {
            tracing::info!(process = %inner.process(), "shard subscriptions restored");
        }
        if resynced && !self.resync {
            // Re-announce presence (a restarted node lost it); what the
            // history groups missed is read back as each is subscribed
            // again (`reconcile`).
            presence::refresh_soon(inner);
        }
        if !self.pending() {
            self.backoff = RECONNECT_MIN;
        }
    }

    async fn health(&mut self, inner: &Inner) {
        let ok = ping_all(inner).await;
        inner
            .connected
            .store(ok && !self.pending(), Ordering::Relaxed);
    }

    /// Subscribes to the groups that have local members and unsubscribes
    /// from those that have none; a failure is retried in the background.
    async fn reconcile(
        &mut self,
        inner: &Inner,
        groups: Vec<String>,
    ) -> Result<(), SubscriberError> {
        let mut result = Ok(());
        // History groups subscribed again (a node restarted, a slot moved):
        // what they missed meanwhile is read back.
        let mut resumed = Vec::new();
        for group in groups {
            let wanted = inner.has_local_members(&group);
            let subscribed = lock(&inner.subscribed).contains(&group);
            let key = inner.config.group_key(&group);
            let outcome = match (wanted, subscribed) {
                (true, false) => {
                    let followed = inner.shared.sequencer.follows(&group);
                    // Read the position before subscribing, so what is
                    // published in between is read, not missed.
                    history::follow(inner, std::slice::from_ref(&group)).await;
                    ssubscribe(inner, &key).await.map(|()| {
                        lock(&inner.subscribed).insert(group.clone());
                        if followed {
                            resumed.push(group.clone());
                        }
                    })
                }
                (false, true) => {
                    // Recorded before the SUNSUBSCRIBE goes out: a member
                    // joining meanwhile must not take the group for
                    // subscribed while the subscription goes away (its
                    // `Sync`, queued behind this one, subscribes again).
                    lock(&inner.subscribed).remove(&group);
                    history::unfollow(inner, &group);
                    sunsubscribe(inner, &key).await
                }
                _ => Ok(()),
            };
            if let Err(e) = outcome {
                tracing::warn!(group, "{e}; retrying in the background");
                self.failed(inner);
                self.retry.insert(group.clone());
                if result.is_ok() {
                    // `e` names the shard channel, which contains the group.
                    result = Err(e);
                }
            } else {
                self.retry.remove(&group);
            }
        }
        if let Some(inner) = self.inner.upgrade() {
            history::catch_up(&inner, resumed);
        }
        result
    }
}

/// Whether every primary answers a `PING` on the subscription connection.
async fn ping_all(inner: &Inner) -> bool {
    let mut conn = inner.pubsub.clone();
    let ping = conn.route_command(
        redis::cmd("PING"),
        RoutingInfo::MultiNode((
            MultipleNodeRoutingInfo::AllMasters,
            Some(ResponsePolicy::AllSucceeded),
        )),
    );
    within(inner.config.timeout, ping).await.is_ok()
}

/// Answers a membership request without holding up the task.
fn reply(inner: &Inner, process: &str, id: u64, status: u8) {
    let Ok(payload) = Envelope::control(inner.process(), status, id, "", "").to_bytes() else {
        return;
    };
    let channel = inner.config.proc_key(process);
    let mut conn = inner.conn.clone();
    let timeout = inner.config.timeout;
    tokio::spawn(async move {
        let mut publish = redis::cmd("SPUBLISH");
        publish.arg(&channel).arg(payload);
        if within(timeout, publish.query_async::<i64>(&mut conn))
            .await
            .is_err()
        {
            tracing::debug!(channel, "could not reply to a group membership request");
        }
    });
}
