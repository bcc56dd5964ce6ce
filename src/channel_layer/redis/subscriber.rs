//! The background task that owns the Pub/Sub connection: receives and fans
//! out messages, keeps subscriptions in line with local membership, and
//! reconnects (re-subscribing everything) when the connection breaks.

use std::{
    collections::HashSet,
    sync::{atomic::Ordering, Arc, Weak},
    time::Duration,
};

use futures_util::StreamExt;
use redis::{
    aio::{PubSubSink, PubSubStream},
    Msg,
};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

use super::{
    history, lock, presence,
    wire::{self, Envelope},
    Counters, Inner, LocalChannels, SubscriberError, CONNECT_TIMEOUT, RECONNECT_MAX, RECONNECT_MIN,
};

/// How often an idle Pub/Sub connection is checked with `PING`.
const HEALTH_CHECK: Duration = Duration::from_secs(5);
/// Channels per `SUBSCRIBE` when re-subscribing.
const CHUNK: usize = 256;

pub(super) type Ack = oneshot::Sender<Result<(), SubscriberError>>;

#[derive(Debug)]
pub(super) enum Command {
    /// Subscribe to or unsubscribe from `group` to match local membership.
    Sync { group: String, ack: Option<Ack> },
    /// Same for every group (after a flush).
    SyncAll { ack: Ack },
}

pub(super) struct PubSub {
    sink: PubSubSink,
    stream: PubSubStream,
}

/// Opens a Pub/Sub connection and subscribes to the process channel and to
/// every group with a local member.
pub(super) async fn open(inner: &Inner) -> Result<PubSub, SubscriberError> {
    let timeout = inner.config.timeout;
    let pubsub = match tokio::time::timeout(
        CONNECT_TIMEOUT.min(timeout) + timeout,
        inner.client.get_async_pubsub(),
    )
    .await
    {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Err(SubscriberError::Connect(Arc::new(e))),
        Err(_) => return Err(SubscriberError::ConnectTimeout),
    };
    let (mut sink, stream) = pubsub.split();
    subscribe(&mut sink, vec![inner.proc_channel.clone()], timeout).await?;
    // Membership may change while we subscribe; the commands queued for
    // those changes reconcile afterwards.
    let groups: Vec<String> = inner.registry.group_names();
    history::follow(inner, &groups).await;
    for chunk in groups.chunks(CHUNK) {
        let channels = chunk.iter().map(|g| inner.config.group_key(g)).collect();
        subscribe(&mut sink, channels, timeout).await?;
    }
    *lock(&inner.subscribed) = groups.into_iter().collect();
    let subscribed = lock(&inner.subscribed);
    inner.shared.sequencer.retain(|g| subscribed.contains(g));
    drop(subscribed);
    Ok(PubSub { sink, stream })
}

async fn subscribe(
    sink: &mut PubSubSink,
    channels: Vec<String>,
    timeout: Duration,
) -> Result<(), SubscriberError> {
    match tokio::time::timeout(timeout, sink.subscribe(channels)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(SubscriberError::Command("SUBSCRIBE".into(), Arc::new(e))),
        Err(_) => Err(SubscriberError::CommandTimeout("SUBSCRIBE".into(), timeout)),
    }
}

async fn unsubscribe(
    sink: &mut PubSubSink,
    channels: Vec<String>,
    timeout: Duration,
) -> Result<(), SubscriberError> {
    match tokio::time::timeout(timeout, sink.unsubscribe(channels)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(SubscriberError::Command("UNSUBSCRIBE".into(), Arc::new(e))),
        Err(_) => Err(SubscriberError::CommandTimeout(
            "UNSUBSCRIBE".into(),
            timeout,
        )),
    }
}

pub(super) struct Subscriber {
    inner: Weak<Inner>,
    counters: Arc<Counters>,
    commands: mpsc::UnboundedReceiver<Command>,
    conn: Option<PubSub>,
    backoff: Duration,
    next_attempt: Instant,
    /// Membership changes made while disconnected, acknowledged once `open`
    /// has subscribed again (their waiters time out on their own).
    waiting: Vec<Ack>,
}

enum Wake {
    Command(Option<Command>),
    Message(Option<Msg>),
    Ping,
    Retry,
}

impl Subscriber {
    pub(super) fn new(
        inner: &Arc<Inner>,
        commands: mpsc::UnboundedReceiver<Command>,
        conn: PubSub,
    ) -> Self {
        Self {
            inner: Arc::downgrade(inner),
            counters: inner.counters.clone(),
            commands,
            conn: Some(conn),
            backoff: RECONNECT_MIN,
            next_attempt: Instant::now(),
            waiting: Vec::new(),
        }
    }

    /// Runs until the layer is dropped.
    pub(super) async fn run(mut self) {
        let mut ping = tokio::time::interval_at(Instant::now() + HEALTH_CHECK, HEALTH_CHECK);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.conn.is_none() && Instant::now() >= self.next_attempt && !self.reconnect().await
            {
                return;
            }
            let wake = match self.conn.as_mut() {
                Some(conn) => tokio::select! {
                    cmd = self.commands.recv() => Wake::Command(cmd),
                    msg = conn.stream.next() => Wake::Message(msg),
                    _ = ping.tick() => Wake::Ping,
                },
                None => tokio::select! {
                    cmd = self.commands.recv() => Wake::Command(cmd),
                    () = tokio::time::sleep_until(self.next_attempt) => Wake::Retry,
                },
            };
            match wake {
                // Every sender is in the layer: it is gone.
                Wake::Command(None) => return,
                Wake::Command(Some(cmd)) => self.command(cmd).await,
                Wake::Message(Some(msg)) => self.message(&msg).await,
                Wake::Message(None) => self.disconnected("the Redis Pub/Sub connection closed"),
                Wake::Ping => self.ping().await,
                Wake::Retry => {}
            }
        }
    }

    /// Returns false when the layer is gone.
    async fn reconnect(&mut self) -> bool {
        let Some(inner) = self.inner.upgrade() else {
            return false;
        };
        match open(&inner).await {
            Ok(conn) => {
                tracing::info!(process = %inner.process(), "reconnected to Redis Pub/Sub and re-subscribed");
                // Re-announce this process's presence (Redis may have lost
                // it) and read back what the history groups missed.
                presence::refresh_soon(&inner);
                history::catch_up(&inner, inner.shared.sequencer.groups());
                self.conn = Some(conn);
                self.backoff = RECONNECT_MIN;
                inner.connected.store(true, Ordering::Relaxed);
                for ack in self.waiting.drain(..) {
                    let _ = ack.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::debug!(process = %inner.process(), retry_in = ?self.backoff, "Redis Pub/Sub reconnect failed: {e}");
                self.next_attempt = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
            }
        }
        true
    }

    fn disconnected(&mut self, reason: &str) {
        if self.conn.take().is_none() {
            return;
        }
        self.backoff = RECONNECT_MIN;
        self.next_attempt = Instant::now() + RECONNECT_MIN;
        if let Some(inner) = self.inner.upgrade() {
            tracing::warn!(process = %inner.process(), "{reason}; reconnecting");
            lock(&inner.subscribed).clear();
            inner.connected.store(false, Ordering::Relaxed);
        }
    }

    async fn ping(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let timeout = self
            .inner
            .upgrade()
            .map_or(CONNECT_TIMEOUT, |i| i.config.timeout);
        match tokio::time::timeout(timeout, conn.sink.ping::<redis::Value>()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => self.disconnected(&format!("Redis Pub/Sub PING failed: {e}")),
            Err(_) => self.disconnected("Redis Pub/Sub PING timed out"),
        }
    }

    async fn command(&mut self, cmd: Command) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        if self.conn.is_none() {
            // `open` subscribes to every group with local members: answer
            // after it, and try it soon instead of after the full backoff,
            // so a `group_add` right after a Redis restart succeeds.
            let ack = match cmd {
                Command::Sync { ack, .. } => ack,
                Command::SyncAll { ack } => Some(ack),
            };
            if let Some(ack) = ack {
                self.waiting.retain(|a| !a.is_closed());
                self.waiting.push(ack);
                self.next_attempt = self.next_attempt.min(Instant::now() + RECONNECT_MIN);
            }
            return;
        }
        match cmd {
            Command::Sync { group, ack } => {
                let result = self.reconcile(&inner, vec![group]).await;
                if let Some(ack) = ack {
                    let _ = ack.send(result);
                }
            }
            Command::SyncAll { ack } => {
                let mut groups: HashSet<String> = lock(&inner.subscribed).clone();
                groups.extend(inner.registry.group_names());
                let result = self.reconcile(&inner, groups.into_iter().collect()).await;
                let _ = ack.send(result);
            }
        }
    }

    /// Subscribes to the groups that have local members and unsubscribes
    /// from those that have none.
    async fn reconcile(
        &mut self,
        inner: &Inner,
        groups: Vec<String>,
    ) -> Result<(), SubscriberError> {
        let (mut to_subscribe, mut to_unsubscribe) = (Vec::new(), Vec::new());
        {
            let subscribed = lock(&inner.subscribed);
            for group in groups {
                match (inner.has_local_members(&group), subscribed.contains(&group)) {
                    (true, false) => to_subscribe.push(group),
                    (false, true) => to_unsubscribe.push(group),
                    _ => {}
                }
            }
        }
        if to_subscribe.is_empty() && to_unsubscribe.is_empty() {
            return Ok(());
        }
        let Some(conn) = self.conn.as_mut() else {
            // `open` subscribes to every group with members once Redis is back.
            return Err(SubscriberError::Reconnecting);
        };
        let timeout = inner.config.timeout;
        let key = |g: &String| inner.config.group_key(g);
        let mut result = Ok(());
        // Leaving groups is recorded before the UNSUBSCRIBE goes out: a member
        // joining meanwhile must not take the group for subscribed (and
        // return at once from `sync_group`) while the subscription goes
        // away. It sees the group unsubscribed and queues a `Sync`, which
        // this task handles after this one, subscribing again.
        {
            let mut subscribed = lock(&inner.subscribed);
            for group in &to_unsubscribe {
                subscribed.remove(group);
            }
            inner.shared.sequencer.retain(|g| subscribed.contains(g));
        }
        for chunk in to_unsubscribe.chunks(CHUNK) {
            result = unsubscribe(&mut conn.sink, chunk.iter().map(key).collect(), timeout).await;
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            history::follow(inner, &to_subscribe).await;
            for chunk in to_subscribe.chunks(CHUNK) {
                result = subscribe(&mut conn.sink, chunk.iter().map(key).collect(), timeout).await;
                if result.is_err() {
                    break;
                }
                lock(&inner.subscribed).extend(chunk.iter().cloned());
            }
        }
        if let Err(e) = &result {
            self.disconnected(&e.to_string());
        }
        result
    }

    async fn message(&mut self, msg: &Msg) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let channel = msg.get_channel_name();
        let env = match Envelope::from_bytes(msg.get_payload_bytes()) {
            Ok(env) => env,
            Err(e) => {
                tracing::warn!(channel, "dropping a Redis message: {e}");
                Counters::add(&self.counters.dropped_other, 1);
                return;
            }
        };
        if let Some(group) = channel.strip_prefix(inner.config.group_prefix.as_str()) {
            if env.op != wire::OP_GROUP_EVENT {
                Counters::add(&self.counters.dropped_other, 1);
            } else if env.origin != inner.process() || env.id != 0 {
                // Our own group sends were delivered locally by `group_send`.
                // Those of history groups (`id` is their offset, `channel`
                // their epoch) go through the sequencer, which drops the
                // copies already delivered.
                match env.decode_event() {
                    Ok(event) => match env.id {
                        0 => {
                            inner.fan_out(group, &event);
                        }
                        offset => {
                            history::received(&*inner, group, event, offset, env.channel).await;
                        }
                    },
                    Err(e) => {
                        tracing::warn!(group, "dropping a group event: {e}");
                        Counters::add(&self.counters.dropped_other, 1);
                    }
                }
            }
            return;
        }
        if channel != inner.proc_channel {
            Counters::add(&self.counters.dropped_other, 1);
            return;
        }
        match env.op {
            wire::OP_CHANNEL_EVENT => match env.decode_event() {
                Ok(event) => inner.deliver_remote(env.channel, event),
                Err(e) => {
                    tracing::warn!(channel = env.channel, "dropping an event: {e}");
                    Counters::add(&self.counters.dropped_other, 1);
                }
            },
            wire::OP_GROUP_ADD | wire::OP_GROUP_DISCARD => {
                let status = if !inner.registry.is_local(env.channel)
                    || super::validate_group_name(env.group).is_err()
                {
                    wire::OP_REPLY_NO_SUCH_CHANNEL
                } else if env.op == wire::OP_GROUP_ADD {
                    match inner.registry.group_add(env.group, env.channel) {
                        Err(_) => wire::OP_REPLY_NO_SUCH_CHANNEL,
                        Ok(()) => match self.reconcile(&inner, vec![env.group.to_owned()]).await {
                            Ok(()) => wire::OP_REPLY_OK,
                            Err(_) => wire::OP_REPLY_FAILED,
                        },
                    }
                } else {
                    inner.registry.group_discard(env.group, env.channel);
                    match self.reconcile(&inner, vec![env.group.to_owned()]).await {
                        Ok(()) => wire::OP_REPLY_OK,
                        Err(_) => wire::OP_REPLY_FAILED,
                    }
                };
                reply(&inner, env.origin, env.id, status);
            }
            wire::OP_REPLY_OK | wire::OP_REPLY_NO_SUCH_CHANNEL | wire::OP_REPLY_FAILED => {
                inner.complete_request(env.id, env.op);
            }
            _ => Counters::add(&self.counters.dropped_other, 1),
        }
    }
}

/// Answers a membership request without holding up the message loop.
fn reply(inner: &Inner, process: &str, id: u64, status: u8) {
    let Ok(payload) = Envelope::control(inner.process(), status, id, "", "").to_bytes() else {
        return;
    };
    let channel = inner.config.proc_key(process);
    let mut conn = inner.conn.clone();
    let timeout = inner.config.timeout;
    tokio::spawn(async move {
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(&channel).arg(payload);
        if !matches!(
            tokio::time::timeout(timeout, publish.query_async::<i64>(&mut conn)).await,
            Ok(Ok(_))
        ) {
            tracing::debug!(channel, "could not reply to a group membership request");
        }
    });
}
