//! What presence and history need from a Redis layer, single node or
//! cluster: the [`Host`] trait both layers' `Inner` implement, and the
//! [`Shared`] state both keep. The scripts and the Rust around them
//! ([`history`](super::history), [`presence`](super::presence)) are
//! written once over these; a layer supplies only how a command or script
//! reaches its server (one connection, or the slot's node in a cluster)
//! and how a plain group send goes out.
//!
//! Every key a script touches is named by [`GroupKeys`] and carries the
//! group in the same place: on a cluster as a hash tag (`{group}`), so the
//! group's stream, offset and epoch and its presence entries all live on
//! the group's slot and every script call runs on one node.

use std::{future::Future, sync::Mutex, time::Duration};

use redis::{Cmd, FromRedisValue};
use tokio::sync::oneshot;

use super::{lock, wire, BackendError, LocalChannels, LuaScript, QueryError, CONNECT_TIMEOUT};
use crate::channel_layer::{
    local::no_such_channel,
    presence::LocalPresence,
    sequencer::{count_lost, Sequencer, SequencerHost},
    subscriber_error::SubscriberError,
    BoxFuture, ChannelLayerError, Event, GroupSendReport, HistoryPolicy, PresenceConfig, Recovery,
    StreamPosition,
};

// ------------------------------------------------------------------ waits
//
// One policy for both layers' waits on an answer from another task or
// process (they had drifted apart: the cluster waited twice the timeout
// plus the connect timeout for a reply, the single-node layer the timeout
// alone, too short for a reply that follows a subscription).

/// How long a layer waits for its subscriber task to confirm a
/// (un)subscription: the task may be (re)connecting (up to the connect
/// timeout), then reads a history group's position and (un)subscribes,
/// each within the command `timeout`.
pub(super) fn ack_wait(timeout: Duration) -> Duration {
    timeout * 2 + CONNECT_TIMEOUT
}

/// How long a process waits for another process's reply to a membership
/// request: the other confirms its (un)subscription ([`ack_wait`]) before
/// it publishes the reply, within `timeout`.
pub(super) fn reply_wait(timeout: Duration) -> Duration {
    ack_wait(timeout) + timeout
}

/// The subscriber task's answer `done` to a command about `what`, waited
/// for up to [`ack_wait`].
pub(super) async fn wait_ack(
    done: oneshot::Receiver<Result<(), SubscriberError>>,
    timeout: Duration,
    what: String,
) -> Result<(), ChannelLayerError> {
    let wait = ack_wait(timeout);
    match tokio::time::timeout(wait, done).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(BackendError::Subscriber(what, e).into()),
        Ok(Err(_)) => Err(BackendError::SubscriberStopped.into()),
        Err(_) => Err(BackendError::Timeout(what, wait).into()),
    }
}

/// Another process's reply `reply` to the membership request `op` (add or
/// discard `channel`), described by `what`, waited for up to
/// [`reply_wait`].
pub(super) async fn wait_reply(
    reply: oneshot::Receiver<u8>,
    op: u8,
    channel: &str,
    timeout: Duration,
    what: String,
) -> Result<(), ChannelLayerError> {
    let wait = reply_wait(timeout);
    match tokio::time::timeout(wait, reply).await {
        Ok(Ok(wire::OP_REPLY_OK)) => Ok(()),
        Ok(Ok(wire::OP_REPLY_NO_SUCH_CHANNEL)) if op == wire::OP_GROUP_ADD => {
            Err(no_such_channel(channel))
        }
        Ok(Ok(wire::OP_REPLY_NO_SUCH_CHANNEL)) => Ok(()),
        Ok(Ok(_)) => Err(BackendError::RemoteFailed(what).into()),
        Ok(Err(_)) => Err(BackendError::NoReply(what).into()),
        Err(_) => Err(BackendError::Timeout(what, wait).into()),
    }
}

/// Names the per-group keys of presence and history: the group is a hash
/// tag (`{group}`), so they all live on the group's slot.
#[derive(Debug)]
pub(super) struct GroupKeys {
    prefix: String,
}

impl GroupKeys {
    /// Keys whose slot is the group name's (the prefix has no braces).
    pub(super) fn hash_tagged(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    fn group(&self, group: &str) -> String {
        format!("{{{group}}}")
    }

    /// The capped stream of the group's history.
    pub(super) fn stream(&self, group: &str) -> String {
        format!("{}:history:{}", self.prefix, self.group(group))
    }

    /// The hash of the history's `epoch` and `top` offset.
    pub(super) fn meta(&self, group: &str) -> String {
        format!("{}:history-meta:{}", self.prefix, self.group(group))
    }

    /// The prefix of the group's presence keys (see
    /// [`presence`](super::presence)); every key after it keeps the slot.
    pub(super) fn presence_base(&self, group: &str) -> String {
        format!("{}:presence:{}", self.prefix, self.group(group))
    }
}

/// The presence and history state of a layer.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) keys: GroupKeys,
    pub(super) history: Vec<HistoryPolicy>,
    pub(super) presence_config: PresenceConfig,
    pub(super) scripts: super::presence::Scripts,
    pub(super) recover: LuaScript,
    /// Presence entries of this process's channels, refreshed in Redis.
    pub(super) presence: Mutex<LocalPresence>,
    /// Delivers history events to local members in offset order, once
    /// (own sends, Pub/Sub, and reads of what was missed).
    pub(super) sequencer: Sequencer,
}

impl Shared {
    pub(super) fn new(
        keys: GroupKeys,
        history: Vec<HistoryPolicy>,
        presence_config: PresenceConfig,
    ) -> Self {
        Self {
            keys,
            history,
            presence_config,
            scripts: super::presence::Scripts::new(),
            recover: LuaScript::new(super::history::RECOVER_SCRIPT),
            presence: Mutex::default(),
            sequencer: Sequencer::default(),
        }
    }

    /// The scripts to load when connecting.
    pub(super) fn all_scripts(&self) -> impl Iterator<Item = &LuaScript> {
        self.scripts
            .all()
            .into_iter()
            .chain(std::iter::once(&self.recover))
    }

    /// Forgets every local entry (a flush).
    pub(super) fn clear(&self) {
        lock(&self.presence).clear();
    }
}

/// What the shared presence and history code needs from a layer.
pub(super) trait Host: LocalChannels {
    /// The layer's presence and history state.
    fn shared(&self) -> &Shared;

    /// Runs one command within the layer's timeout (routed by its first
    /// key on a cluster).
    fn query_raw<T: FromRedisValue + Send>(
        &self,
        cmd: &Cmd,
    ) -> impl Future<Output = Result<T, QueryError>> + Send;

    /// A group send that is not part of a history (presence notifications).
    fn group_send_plain(
        &self,
        group: &str,
        event: &Event,
    ) -> impl Future<Output = Result<GroupSendReport, ChannelLayerError>> + Send;

    /// Runs one command; `what` names it in the error.
    fn query<T: FromRedisValue + Send>(
        &self,
        what: &str,
        cmd: &Cmd,
    ) -> impl Future<Output = Result<T, ChannelLayerError>> + Send {
        async move { self.query_raw(cmd).await.map_err(|e| e.context(what)) }
    }

    /// Runs `script` on `keys` (on a cluster they share a slot, which
    /// routes the call) with the arguments `args` appends, by its SHA1,
    /// falling back to `EVAL` (which also caches it again) on a server
    /// that forgot it (restarted, or a node new to the cluster).
    fn eval<T: FromRedisValue + Send>(
        &self,
        what: &str,
        script: &LuaScript,
        keys: &[&str],
        args: impl Fn(&mut Cmd) + Send + Sync,
    ) -> impl Future<Output = Result<T, ChannelLayerError>> + Send {
        async move {
            let command = |name: &str, first: &str| {
                let mut cmd = redis::cmd(name);
                cmd.arg(first).arg(keys.len()).arg(keys);
                args(&mut cmd);
                cmd
            };
            let sha = lock(&script.sha).clone();
            if !sha.is_empty() {
                match self.query_raw(&command("EVALSHA", &sha)).await {
                    Err(QueryError::Redis(e)) if e.code() == Some("NOSCRIPT") => {}
                    other => return other.map_err(|e| e.context(what)),
                }
            }
            self.query(what, &command("EVAL", script.code)).await
        }
    }
}

/// A [`Host`] as the [`Sequencer`]'s host.
pub(super) struct Via<'a, H>(pub(super) &'a H);

impl<H: Host> SequencerHost for Via<'_, H> {
    fn read_history<'a>(
        &'a self,
        group: &'a str,
        since: &'a StreamPosition,
    ) -> BoxFuture<'a, Result<Recovery, ChannelLayerError>> {
        Box::pin(super::history::recover(self.0, group, since))
    }

    fn deliver(&self, group: &str, event: &Event) {
        self.0.fan_out(group, event);
    }

    fn lost(&self, group: &str, count: Option<u64>, why: &str) {
        count_lost(self.0.counters(), group, count, why);
    }
}
