//! Presence on Redis (see the module docs' "Presence").
//!
//! Per group, with `base` = `{prefix}:presence:{group}`:
//!
//! * `{base}:procs`, a sorted set of the processes with members, scored by
//!   when their entries expire (Redis time, ms); a process refreshes the
//!   score of the groups it has members in, and only those;
//! * `{base}:c:{process}`, a hash channel → JSON `[user, data]`;
//! * `{base}:u:{process}`, a hash user → connections in that process.
//!
//! A listing reads the hashes of the processes whose score is in the
//! future, so a crashed process's members vanish within the TTL. Its keys
//! also expire in Redis (twice the TTL), and the first live process to
//! refresh the group after the TTL removes them and announces the users who
//! left with them.

use std::{
    sync::{Arc, OnceLock, Weak},
    time::Duration,
};

use super::{lock, BackendError, Inner, LocalChannels, LuaScript, RedisChannelLayer};
use crate::channel_layer::{
    presence::group_by_user, ChannelLayer, ChannelLayerError, Event, PresenceChange, PresenceInfo,
    PresenceMember, PRESENCE_JOIN, PRESENCE_LEAVE,
};

/// Computes `now` (ms, Redis clock), the process's keys and the alive
/// processes other than ours. Shared head of every presence script.
const PRELUDE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local base, proc = ARGV[1], ARGV[2]
local procs = base .. ':procs'
local c, u = base .. ':c:' .. proc, base .. ':u:' .. proc
local function present_elsewhere(user)
  for _, p in ipairs(redis.call('ZRANGEBYSCORE', procs, now, '+inf')) do
    if p ~= proc and redis.call('HEXISTS', base .. ':u:' .. p, user) == 1 then return true end
  end
  return false
end
local function touch(ttl)
  redis.call('ZADD', procs, now + ttl, proc)
  redis.call('PEXPIRE', procs, 2 * ttl)
  redis.call('PEXPIRE', c, 2 * ttl)
  redis.call('PEXPIRE', u, 2 * ttl)
end
";

/// `ARGV`: base, process, channel, stored info, user, ttl (ms).
/// Returns 1 when this is the user's first connection in the group.
///
/// Idempotent: when a refresh already wrote the entry (it races with the
/// join), the count is not incremented again.
const JOIN: &str = r"
local n
if redis.call('HSET', c, ARGV[3], ARGV[4]) == 1 then
  n = redis.call('HINCRBY', u, ARGV[5], 1)
else
  n = tonumber(redis.call('HGET', u, ARGV[5]) or '1')
end
touch(tonumber(ARGV[6]))
if n == 1 and not present_elsewhere(ARGV[5]) then return 1 end
return 0
";

/// `ARGV`: base, process, channel, user. Returns 1 when this was the
/// user's last connection in the group.
///
/// When the entry is already gone (a refresh rewrote this process's
/// entries without it), only answers whether the user is gone.
const LEAVE: &str = r"
if redis.call('HDEL', c, ARGV[3]) == 0 then
  if redis.call('HEXISTS', u, ARGV[4]) == 0 and not present_elsewhere(ARGV[4]) then return 1 end
  return 0
end
local n = redis.call('HINCRBY', u, ARGV[4], -1)
if n <= 0 then redis.call('HDEL', u, ARGV[4]) end
if redis.call('HLEN', c) == 0 then
  redis.call('DEL', c, u)
  redis.call('ZREM', procs, proc)
end
if n <= 0 and not present_elsewhere(ARGV[4]) then return 1 end
return 0
";

/// `ARGV`: base, process, ttl (ms), number of local entries. Renews this
/// process's entries and removes those of processes whose TTL passed.
/// Returns `{kept, users who left with them...}`; `kept` is `'0'` when this
/// process's entries in Redis do not match its local ones (Redis flushed
/// or restarted, or a leave failed while Redis was unreachable) and must be
/// written again.
const REFRESH: &str = r"
local ttl = tonumber(ARGV[3])
local kept = '0'
if redis.call('HLEN', c) == tonumber(ARGV[4]) then kept = '1' end
touch(ttl)
local out = {kept}
local dead = redis.call('ZRANGEBYSCORE', procs, '-inf', '(' .. now)
for _, p in ipairs(dead) do
  local users = redis.call('HKEYS', base .. ':u:' .. p)
  redis.call('DEL', base .. ':c:' .. p, base .. ':u:' .. p)
  redis.call('ZREM', procs, p)
  for _, user in ipairs(users) do
    if redis.call('HEXISTS', u, user) == 0 and not present_elsewhere(user) then
      out[#out + 1] = user
    end
  end
end
return out
";

/// `ARGV`: base, process, ttl (ms), then channel, stored info, user for
/// every local entry. Writes this process's entries again.
const RESTORE: &str = r"
redis.call('DEL', c, u)
for i = 4, #ARGV, 3 do
  redis.call('HSET', c, ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', u, ARGV[i + 2], 1)
end
touch(tonumber(ARGV[3]))
return 1
";

/// `ARGV`: base, process. Returns `{channel, stored info, ...}` of every
/// live process.
const LIST: &str = r"
local out = {}
for _, p in ipairs(redis.call('ZRANGEBYSCORE', procs, now, '+inf')) do
  local kv = redis.call('HGETALL', base .. ':c:' .. p)
  for i = 1, #kv do out[#out + 1] = kv[i] end
end
return out
";

#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) join: LuaScript,
    pub(super) leave: LuaScript,
    pub(super) refresh: LuaScript,
    pub(super) restore: LuaScript,
    pub(super) list: LuaScript,
}

/// The scripts' source: the prelude followed by each body, built once.
fn sources() -> &'static [String; 5] {
    static SOURCES: OnceLock<[String; 5]> = OnceLock::new();
    SOURCES.get_or_init(|| [JOIN, LEAVE, REFRESH, RESTORE, LIST].map(|b| format!("{PRELUDE}{b}")))
}

impl Scripts {
    pub(super) fn new() -> Self {
        let [join, leave, refresh, restore, list] = sources();
        Self {
            join: LuaScript::new(join),
            leave: LuaScript::new(leave),
            refresh: LuaScript::new(refresh),
            restore: LuaScript::new(restore),
            list: LuaScript::new(list),
        }
    }

    pub(super) fn all(&self) -> [&LuaScript; 5] {
        [
            &self.join,
            &self.leave,
            &self.refresh,
            &self.restore,
            &self.list,
        ]
    }
}

fn ttl_ms(inner: &Inner) -> u64 {
    u64::try_from(inner.config.presence.time_limit().as_millis()).unwrap_or(u64::MAX)
}

impl Inner {
    fn presence_base(&self, group: &str) -> String {
        format!("{}:presence:{group}", self.config.prefix)
    }

    /// Sends a join or leave notification if the group wants them: a plain
    /// group send, never part of the history.
    async fn notify(&self, group: &str, kind: &'static str, change: PresenceChange) {
        if !self.config.presence.notifies(group) {
            return;
        }
        if let Err(e) = self
            .group_send_plain(group, &Event::new(kind, change))
            .await
        {
            tracing::warn!(group, kind, "presence notification failed: {e}");
        }
    }

    pub(super) async fn presence_join(
        &self,
        group: &str,
        channel: &str,
        info: PresenceInfo,
    ) -> Result<(), ChannelLayerError> {
        let (joined, replaced) = lock(&self.presence).join(group, channel, info);
        let base = self.presence_base(group);
        let same_user = replaced
            .as_ref()
            .is_some_and(|old| old.info.user_id() == joined.info.user_id());
        match replaced {
            // The join below overwrites the entry; the user stays.
            Some(_) if same_user => {}
            Some(old) => self.presence_leave_remote(group, channel, old.info).await?,
            None => {}
        }
        let first: i64 = self
            .eval("presence join", &self.presence_scripts.join, |c| {
                c.arg(0)
                    .arg(&base)
                    .arg(self.process())
                    .arg(channel)
                    .arg(joined.info.to_stored())
                    .arg(joined.info.user_id())
                    .arg(ttl_ms(self));
            })
            .await?;
        if first == 1 && !same_user {
            self.notify(group, PRESENCE_JOIN, PresenceChange::new(&joined.info))
                .await;
        }
        Ok(())
    }

    /// Removes `channel`'s presence in `group`, here and in Redis.
    pub(super) async fn presence_leave(
        &self,
        group: &str,
        channel: &str,
    ) -> Result<(), ChannelLayerError> {
        let left = lock(&self.presence).leave(group, channel);
        match left {
            Some(change) => {
                self.presence_leave_remote(group, channel, change.info)
                    .await
            }
            None => Ok(()),
        }
    }

    async fn presence_leave_remote(
        &self,
        group: &str,
        channel: &str,
        info: PresenceInfo,
    ) -> Result<(), ChannelLayerError> {
        let last: i64 = self
            .eval("presence leave", &self.presence_scripts.leave, |c| {
                c.arg(0)
                    .arg(self.presence_base(group))
                    .arg(self.process())
                    .arg(channel)
                    .arg(info.user_id());
            })
            .await?;
        if last == 1 {
            self.notify(group, PRESENCE_LEAVE, PresenceChange::new(&info))
                .await;
        }
        Ok(())
    }

    /// A channel's receiver was dropped: leave its presence groups in the
    /// background (the TTL covers the case where this never runs).
    pub(super) fn forget_presence(self: &Arc<Self>, channel: &str) {
        let groups = lock(&self.presence).groups_of(channel);
        if groups.is_empty() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = Arc::clone(self);
        let channel = channel.to_owned();
        handle.spawn(async move {
            for group in groups {
                if let Err(e) = inner.presence_leave(&group, &channel).await {
                    tracing::debug!(group, "presence leave on close failed: {e}");
                }
            }
        });
    }

    pub(super) async fn presence_list(
        &self,
        group: &str,
    ) -> Result<Vec<PresenceMember>, ChannelLayerError> {
        let flat: Vec<Vec<u8>> = self
            .eval("presence", &self.presence_scripts.list, |c| {
                c.arg(0).arg(self.presence_base(group)).arg(self.process());
            })
            .await?;
        if flat.len() % 2 != 0 {
            return Err(BackendError::MalformedReply("presence").into());
        }
        let entries = flat.chunks(2).filter_map(|pair| {
            let channel = String::from_utf8(pair[0].clone()).ok()?;
            Some((channel, PresenceInfo::from_stored(&pair[1])?))
        });
        Ok(group_by_user(entries))
    }

    /// Renews this process's entries in `group`, writes them again if
    /// Redis lost them, and announces users of dead processes who left.
    async fn refresh_group(&self, group: &str) -> Result<(), ChannelLayerError> {
        let base = self.presence_base(group);
        let local = lock(&self.presence).len(group);
        let reply: Vec<String> = self
            .eval("presence refresh", &self.presence_scripts.refresh, |c| {
                c.arg(0)
                    .arg(&base)
                    .arg(self.process())
                    .arg(ttl_ms(self))
                    .arg(local);
            })
            .await?;
        let mut reply = reply.into_iter();
        if reply.next().as_deref() == Some("0") {
            let entries = lock(&self.presence).entries(group);
            if !entries.is_empty() {
                self.eval::<i64>("presence restore", &self.presence_scripts.restore, |c| {
                    c.arg(0).arg(&base).arg(self.process()).arg(ttl_ms(self));
                    for (channel, info) in &entries {
                        c.arg(channel).arg(info.to_stored()).arg(info.user_id());
                    }
                })
                .await?;
            }
        }
        for user_id in reply {
            // The user's data went with the dead process's keys.
            let change = PresenceChange {
                user_id,
                data: None,
            };
            self.notify(group, PRESENCE_LEAVE, change).await;
        }
        Ok(())
    }
}

/// Refreshes this process's presence every third of the TTL, in the groups
/// it has members in (only those), until the layer is dropped.
pub(super) async fn refresh_loop(inner: Weak<Inner>, ttl: Duration) {
    let period = ttl / 3;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.refresh_presence().await;
    }
}

impl Inner {
    /// Refreshes this process's presence in every group it has members in
    /// (and writes it again where Redis lost it): every third of the TTL,
    /// and at once after the Pub/Sub connection came back, so a listing
    /// after a Redis restart is whole again without waiting for the tick.
    pub(super) async fn refresh_presence(&self) {
        let groups = lock(&self.presence).group_names();
        for group in groups {
            if let Err(e) = self.refresh_group(&group).await {
                tracing::debug!(group, "presence refresh failed: {e}");
            }
        }
    }
}

impl RedisChannelLayer {
    /// The `ChannelLayer::presence_join` of this layer.
    pub(super) fn presence_join_impl<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
        info: PresenceInfo,
    ) -> crate::channel_layer::BoxFuture<'a, Result<(), ChannelLayerError>> {
        Box::pin(async move {
            crate::channel_layer::validate_group_name(group)?;
            crate::channel_layer::validate_channel_name(channel)?;
            if !self.inner.registry.is_local(channel) {
                // Only this process can keep a channel's presence alive.
                return Err(super::no_such_channel(channel));
            }
            self.group_add(group, channel).await?;
            self.inner.presence_join(group, channel, info).await
        })
    }
}
