//! Presence on Redis, for both layers (see the module docs' "Presence"):
//! the scripts and the Rust around them run on any [`Host`].
//!
//! Per group, with `base` = [`GroupKeys::presence_base`](super::shared::GroupKeys::presence_base)
//! (`{prefix}:presence:{group}`; on a cluster the group is a hash tag, so
//! every key below is on the group's slot):
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

use super::{lock, shared::Host, BackendError, LuaScript};
use crate::channel_layer::{
    presence::{self, group_by_user, leave_in_background},
    validate_channel_name, validate_group_name, ChannelLayer, ChannelLayerError, Event,
    PresenceChange, PresenceInfo, PresenceMember, PRESENCE_JOIN, PRESENCE_LEAVE,
};

/// Computes `now` (ms, Redis clock), the process's keys and the alive
/// processes other than ours. Shared head of every presence script:
/// `KEYS[1]` is `{base}:procs` (declared, so a cluster routes the call to
/// the group's slot; the other keys are on the same slot).
const PRELUDE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local base, proc = ARGV[1], ARGV[2]
local procs = KEYS[1]
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
    join: LuaScript,
    leave: LuaScript,
    refresh: LuaScript,
    restore: LuaScript,
    list: LuaScript,
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

fn ttl_ms<H: Host>(inner: &H) -> u64 {
    u64::try_from(inner.shared().presence_config.time_limit().as_millis()).unwrap_or(u64::MAX)
}

/// The base of `group`'s presence keys and the key every script declares.
fn keys<H: Host>(inner: &H, group: &str) -> (String, String) {
    let base = inner.shared().keys.presence_base(group);
    let procs = format!("{base}:procs");
    (base, procs)
}

/// Sends a join or leave notification if the group wants them: a plain
/// group send, never part of the history.
async fn notify<H: Host>(inner: &H, group: &str, kind: &'static str, change: PresenceChange) {
    if !inner.shared().presence_config.notifies(group) {
        return;
    }
    if let Err(e) = inner
        .group_send_plain(group, &Event::new(kind, change))
        .await
    {
        tracing::warn!(group, kind, "presence notification failed: {e}");
    }
}

/// `ChannelLayer::presence_join` of both layers: `layer` is the layer
/// whose `inner` this is (its `group_add` subscribes).
pub(super) async fn join<H: Host>(
    layer: &dyn ChannelLayer,
    inner: &H,
    group: &str,
    channel: &str,
    info: PresenceInfo,
) -> Result<(), ChannelLayerError> {
    validate_group_name(group)?;
    validate_channel_name(channel)?;
    if !inner.registry().is_local(channel) {
        // Only this process can keep a channel's presence alive.
        return Err(crate::channel_layer::local::no_such_channel(channel));
    }
    layer.group_add(group, channel).await?;
    let (joined, replaced) = lock(&inner.shared().presence).join(group, channel, info);
    let same_user = replaced
        .as_ref()
        .is_some_and(|old| old.info.user_id() == joined.info.user_id());
    match replaced {
        // The join below overwrites the entry; the user stays.
        Some(_) if same_user => {}
        Some(old) => leave_remote(inner, group, channel, old.info).await?,
        None => {}
    }
    let (base, procs) = keys(inner, group);
    let first: i64 = inner
        .eval(
            "presence join",
            &inner.shared().scripts.join,
            &[&procs],
            |c| {
                c.arg(&base)
                    .arg(inner.process())
                    .arg(channel)
                    .arg(joined.info.to_stored())
                    .arg(joined.info.user_id())
                    .arg(ttl_ms(inner));
            },
        )
        .await?;
    if first == 1 && !same_user {
        notify(
            inner,
            group,
            PRESENCE_JOIN,
            PresenceChange::new(&joined.info),
        )
        .await;
    }
    Ok(())
}

/// Removes `channel`'s presence in `group`, here and in Redis.
pub(super) async fn leave<H: Host>(
    inner: &H,
    group: &str,
    channel: &str,
) -> Result<(), ChannelLayerError> {
    let left = lock(&inner.shared().presence).leave(group, channel);
    match left {
        Some(change) => leave_remote(inner, group, channel, change.info).await,
        None => Ok(()),
    }
}

async fn leave_remote<H: Host>(
    inner: &H,
    group: &str,
    channel: &str,
    info: PresenceInfo,
) -> Result<(), ChannelLayerError> {
    let (base, procs) = keys(inner, group);
    let last: i64 = inner
        .eval(
            "presence leave",
            &inner.shared().scripts.leave,
            &[&procs],
            |c| {
                c.arg(&base)
                    .arg(inner.process())
                    .arg(channel)
                    .arg(info.user_id());
            },
        )
        .await?;
    if last == 1 {
        notify(inner, group, PRESENCE_LEAVE, PresenceChange::new(&info)).await;
    }
    Ok(())
}

/// A channel's receiver was dropped: leave its presence groups in the
/// background (the TTL covers the case where this never runs).
pub(super) fn forget<H: Host>(inner: &Arc<H>, channel: &str) {
    let groups = lock(&inner.shared().presence).groups_of(channel);
    let (inner, channel) = (Arc::clone(inner), channel.to_owned());
    leave_in_background(groups, move |group| {
        let (inner, channel) = (inner.clone(), channel.clone());
        async move { leave(&*inner, &group, &channel).await }
    });
}

/// `ChannelLayer::presence` of both layers.
pub(super) async fn list<H: Host>(
    inner: &H,
    group: &str,
) -> Result<Vec<PresenceMember>, ChannelLayerError> {
    validate_group_name(group)?;
    let (base, procs) = keys(inner, group);
    let flat: Vec<Vec<u8>> = inner
        .eval("presence", &inner.shared().scripts.list, &[&procs], |c| {
            c.arg(&base).arg(inner.process());
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

/// Renews this process's entries in `group`, writes them again if Redis
/// lost them, and announces users of dead processes who left.
async fn refresh_group<H: Host>(inner: &H, group: &str) -> Result<(), ChannelLayerError> {
    let shared = inner.shared();
    let (base, procs) = keys(inner, group);
    let local = lock(&shared.presence).len(group);
    let reply: Vec<String> = inner
        .eval(
            "presence refresh",
            &shared.scripts.refresh,
            &[&procs],
            |c| {
                c.arg(&base)
                    .arg(inner.process())
                    .arg(ttl_ms(inner))
                    .arg(local);
            },
        )
        .await?;
    let mut reply = reply.into_iter();
    if reply.next().as_deref() == Some("0") {
        let entries = lock(&shared.presence).entries(group);
        if !entries.is_empty() {
            inner
                .eval::<i64>(
                    "presence restore",
                    &shared.scripts.restore,
                    &[&procs],
                    |c| {
                        c.arg(&base).arg(inner.process()).arg(ttl_ms(inner));
                        for (channel, info) in &entries {
                            c.arg(channel).arg(info.to_stored()).arg(info.user_id());
                        }
                    },
                )
                .await?;
        }
    }
    for user_id in reply {
        // The user's data went with the dead process's keys.
        let change = PresenceChange {
            user_id,
            data: None,
        };
        notify(inner, group, PRESENCE_LEAVE, change).await;
    }
    Ok(())
}

/// Refreshes this process's presence every third of the TTL, in the groups
/// it has members in (only those), until the layer is dropped.
pub(super) async fn refresh_loop<H: Host>(inner: Weak<H>, ttl: Duration) {
    presence::refresh_loop(inner, ttl, |inner| async move { refresh(&*inner).await }).await;
}

/// [`refresh`] in a task: after a reconnect, when the server may have lost
/// this process's entries.
pub(super) fn refresh_soon<H: Host>(inner: &Arc<H>) {
    let inner = inner.clone();
    tokio::spawn(async move { refresh(&*inner).await });
}

/// Refreshes this process's presence in every group it has members in
/// (and writes it again where Redis lost it): every third of the TTL, and
/// at once after the subscriptions came back, so a listing after a
/// restart is whole again without waiting for the tick.
pub(super) async fn refresh<H: Host>(inner: &H) {
    let groups = lock(&inner.shared().presence).group_names();
    for group in groups {
        if let Err(e) = refresh_group(inner, &group).await {
            tracing::debug!(group, "presence refresh failed: {e}");
        }
    }
}
