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

use std::{borrow::Cow, future::Future, sync::Mutex};

use redis::{Cmd, FromRedisValue};

use super::{lock, LocalChannels, LuaScript, QueryError};
use crate::channel_layer::{
    presence::LocalPresence,
    sequencer::{count_lost, Sequencer, SequencerHost},
    BoxFuture, ChannelLayerError, Event, GroupSendReport, HistoryPolicy, PresenceConfig, Recovery,
    StreamPosition,
};

/// Names the per-group keys of presence and history.
#[derive(Debug)]
pub(super) struct GroupKeys {
    prefix: String,
    /// Whether the group is written as a hash tag (`{group}`, Redis Cluster).
    hash_tag: bool,
}

impl GroupKeys {
    pub(super) fn plain(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            hash_tag: false,
        }
    }

    /// Keys whose slot is the group name's (the prefix has no braces).
    #[cfg_attr(not(feature = "redis-cluster"), allow(dead_code))]
    pub(super) fn hash_tagged(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            hash_tag: true,
        }
    }

    fn group<'a>(&self, group: &'a str) -> Cow<'a, str> {
        if self.hash_tag {
            Cow::Owned(format!("{{{group}}}"))
        } else {
            Cow::Borrowed(group)
        }
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
