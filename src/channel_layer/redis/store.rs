//! The mesh's [`Store`] on Redis, one server or a cluster: histories in
//! streams, presence in two keys per group, named members in a sorted set,
//! each operation one command or one Lua script (see the module docs'
//! "Keys"). Every key of a group is named by the [`Layout`], which on a
//! cluster hash-tags the group, so each script touches (and publishes on)
//! one slot only.

use std::{collections::HashSet, time::Duration};

use bytes::Bytes;
use redis::{FromRedisValue, Script};

use super::{invoke, query, unix_now, Connection, Layout, RedisFailure};
use crate::channel_layer::{
    history::policy_for,
    local::Counters,
    mesh::{
        live_subject, HistoryRange, Incoming, PresenceListing, Store, StoredEntry, TransportError,
    },
    names,
    redis_keys::escape_glob,
    BoxFuture, HistoryPolicy, StreamPosition,
};

/// `KEYS`: stream, meta hash. `ARGV`: live channel, encoded event, max
/// len, ttl (ms), a new epoch. Appends the event with the next offset
/// (starting a new epoch at 1 when the stream or its meta is gone),
/// publishes `{offset}:{epoch}:{event}` on the live channel and returns
/// `{offset, epoch}`. `$PUBLISH` is the layout's publish command
/// ([`Layout::publish`]: `SPUBLISH` on a cluster, where the live channel
/// hashes to the slot of both keys).
const APPEND: &str = r"
local stream, meta = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
if (not epoch) or redis.call('EXISTS', stream) == 0 then
  epoch = ARGV[5]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch, 'top', 0)
end
local offset = redis.call('HINCRBY', meta, 'top', 1)
redis.call('XADD', stream, 'MAXLEN', ARGV[3], offset .. '-0', 'e', ARGV[2])
redis.call('PEXPIRE', stream, ARGV[4])
redis.call('PEXPIRE', meta, ARGV[4])
redis.call('$PUBLISH', ARGV[1], offset .. ':' .. epoch .. ':' .. ARGV[2])
return {offset, epoch}
";

/// `KEYS`: stream, meta hash. Returns `{top, epoch}`, or nil when the
/// history is empty.
const LATEST: &str = r"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if (not epoch) or redis.call('EXISTS', KEYS[1]) == 0 then return false end
return {redis.call('HGET', KEYS[2], 'top'), epoch}
";

/// `KEYS`: stream, meta hash. `ARGV`: since offset, since epoch. Returns
/// nil when the history is empty, else `{epoch, top, first offset,
/// offset1, event1, ...}` with the events after `since` when it is of this
/// epoch and still kept.
const READ: &str = r"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if (not epoch) or redis.call('EXISTS', KEYS[1]) == 0 then return false end
local top = tonumber(redis.call('HGET', KEYS[2], 'top'))
local first = top + 1
local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if oldest[1] then first = tonumber(string.match(oldest[1][1], '^(%d+)')) end
local out = {epoch, tostring(top), tostring(first)}
local since = tonumber(ARGV[1])
if epoch == ARGV[2] and since < top and since + 1 >= first then
  for _, e in ipairs(redis.call('XRANGE', KEYS[1], (since + 1) .. '-0', '+')) do
    out[#out + 1] = string.match(e[1], '^(%d+)')
    out[#out + 1] = e[2][2]
  end
end
return out
";

/// The head of every presence script. `KEYS`: the group's processes (a
/// sorted set, scored by when their liveness expires, ms of Redis's
/// clock) and users (a hash: user → MessagePack list of `[process,
/// channel, entry]`). `ARGV[1]`: how long both keys live after a write
/// (ms).
const PRESENCE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local procs, users = KEYS[1], KEYS[2]
local function touch()
  redis.call('PEXPIRE', procs, ARGV[1])
  redis.call('PEXPIRE', users, ARGV[1])
end
local function entries_of(user)
  local packed = redis.call('HGET', users, user)
  if packed then return cmsgpack.unpack(packed) end
  return {}
end
local function put(user, list)
  if #list == 0 then
    redis.call('HDEL', users, user)
  else
    redis.call('HSET', users, user, cmsgpack.pack(list))
  end
end
local function without(list, process, channel)
  local kept = {}
  for _, e in ipairs(list) do
    if e[1] ~= process or (channel and e[2] ~= channel) then kept[#kept + 1] = e end
  end
  return kept
end
local function remove_process(process)
  local all = redis.call('HGETALL', users)
  for i = 1, #all, 2 do
    local list = cmsgpack.unpack(all[i + 1])
    local kept = without(list, process, nil)
    if #kept ~= #list then put(all[i], kept) end
  end
end
";

/// `ARGV`: keep, process, user, channel, entry.
const PRESENCE_ADD: &str = r"
local list = without(entries_of(ARGV[3]), ARGV[2], ARGV[4])
list[#list + 1] = {ARGV[2], ARGV[4], ARGV[5]}
put(ARGV[3], list)
touch()
return 1
";

/// `ARGV`: keep, process, user, channel.
const PRESENCE_REMOVE: &str = r"
put(ARGV[3], without(entries_of(ARGV[3]), ARGV[2], ARGV[4]))
return 1
";

/// `ARGV`: keep, process, ttl (ms). Returns 1 when the process was alive
/// (and its entries are there).
const PRESENCE_ALIVE: &str = r"
local old = redis.call('ZSCORE', procs, ARGV[2])
redis.call('ZADD', procs, now + tonumber(ARGV[3]), ARGV[2])
touch()
if old and tonumber(old) > now and redis.call('EXISTS', users) == 1 then return 1 end
return 0
";

/// `ARGV`: keep, process.
const PRESENCE_DROP: &str = r"
redis.call('ZREM', procs, ARGV[2])
remove_process(ARGV[2])
return 1
";

/// `ARGV`: keep, process.
const PRESENCE_COLLECT: &str = r"
local score = redis.call('ZSCORE', procs, ARGV[2])
if score and tonumber(score) > now then return 0 end
redis.call('ZREM', procs, ARGV[2])
remove_process(ARGV[2])
return 1
";

/// `ARGV`: keep, then a user or nothing. Returns `{alive processes,
/// {user, entries, ...}}`.
const PRESENCE_LIST: &str = r"
local alive = redis.call('ZRANGEBYSCORE', procs, '(' .. now, '+inf')
if ARGV[2] then
  local packed = redis.call('HGET', users, ARGV[2])
  if packed then return {alive, {ARGV[2], packed}} end
  return {alive, {}}
end
return {alive, redis.call('HGETALL', users)}
";

/// `ARGV`: keep. Returns `{{process, alive (1 or 0)}, ...}`.
const PRESENCE_PROCESSES: &str = r"
local out = {}
local all = redis.call('ZRANGE', procs, 0, -1, 'WITHSCORES')
for i = 1, #all, 2 do
  local alive = 0
  if tonumber(all[i + 1]) > now then alive = 1 end
  out[#out + 1] = {all[i], alive}
end
return out
";

/// `KEYS`: the group's named members (a sorted set scored by when each
/// expires, s). `ARGV`: expiry (s), channel, ttl (s). Adds or renews the
/// member; the set expires with its newest member.
const NAMED_ADD: &str = r"
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
";

/// `KEYS`: the group's named members. `ARGV`: now (s). Drops the expired
/// ones, returns the rest.
const NAMED_MEMBERS: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
return redis.call('ZRANGE', KEYS[1], 0, -1)
";

/// The scripts, each the [`PRESENCE`] head and a body where it applies.
struct Scripts {
    append: Script,
    latest: Script,
    read: Script,
    add: Script,
    remove: Script,
    alive: Script,
    drop: Script,
    collect: Script,
    list: Script,
    processes: Script,
    named_add: Script,
    named_members: Script,
}

impl Scripts {
    /// The scripts, publishing with `publish` (`PUBLISH` or `SPUBLISH`).
    fn new(publish: &str) -> Self {
        let presence = |body: &str| Script::new(&format!("{PRESENCE}{body}"));
        Self {
            append: Script::new(&APPEND.replace("$PUBLISH", publish)),
            latest: Script::new(LATEST),
            read: Script::new(READ),
            add: presence(PRESENCE_ADD),
            remove: presence(PRESENCE_REMOVE),
            alive: presence(PRESENCE_ALIVE),
            drop: presence(PRESENCE_DROP),
            collect: presence(PRESENCE_COLLECT),
            list: presence(PRESENCE_LIST),
            processes: presence(PRESENCE_PROCESSES),
            named_add: Script::new(NAMED_ADD),
            named_members: Script::new(NAMED_MEMBERS),
        }
    }
}

/// Histories, presence and named members in Redis, on the connection `C`
/// (one server or a cluster).
pub(super) struct RedisStore<C> {
    conn: C,
    layout: Layout,
    history: Vec<HistoryPolicy>,
    /// How long a group's presence keys live after the last write (twice
    /// the presence TTL: a live process writes every third of it).
    keep_ms: u64,
    scripts: Scripts,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl<C: Connection> RedisStore<C> {
    pub(super) fn new(
        conn: C,
        layout: Layout,
        history: Vec<HistoryPolicy>,
        presence_ttl: Duration,
    ) -> Self {
        let scripts = Scripts::new(layout.publish());
        Self {
            conn,
            layout,
            history,
            keep_ms: millis(presence_ttl * 2),
            scripts,
        }
    }

    fn stream(&self, group: &str) -> String {
        self.layout.key("history", group)
    }

    fn meta(&self, group: &str) -> String {
        self.layout.key("history-meta", group)
    }

    /// `{prefix}:presence:{group}`, which the group's presence keys extend.
    fn presence_base(&self, group: &str) -> String {
        self.layout.key("presence", group)
    }

    fn presence_keys(&self, group: &str) -> [String; 2] {
        let base = self.presence_base(group);
        [format!("{base}:procs"), format!("{base}:users")]
    }

    fn named_key(&self, group: &str) -> String {
        self.layout.key("group", group)
    }

    /// Runs `script` on `keys` with `args` (by its SHA1, loading it again
    /// where Redis forgot it).
    async fn eval<T: FromRedisValue>(
        &self,
        what: &str,
        script: &Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<T, TransportError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        for arg in args {
            invocation.arg(*arg);
        }
        invoke(&self.conn, what, &invocation).await
    }

    /// A presence script on `group`'s keys; `args` come after the keep time.
    async fn presence<T: FromRedisValue, const N: usize>(
        &self,
        what: &str,
        script: &Script,
        group: &str,
        args: [&[u8]; N],
    ) -> Result<T, TransportError> {
        let [procs, users] = self.presence_keys(group);
        let keep = self.keep_ms.to_string();
        let mut all: Vec<&[u8]> = vec![keep.as_bytes()];
        all.extend_from_slice(&args);
        self.eval(what, script, &[&procs, &users], &all).await
    }

    async fn listing(
        &self,
        group: &str,
        user: Option<&str>,
    ) -> Result<PresenceListing, TransportError> {
        let (alive, flat): (Vec<String>, Vec<Vec<u8>>) = match user {
            Some(user) => {
                self.presence(
                    "presence of a user",
                    &self.scripts.list,
                    group,
                    [user.as_bytes()],
                )
                .await?
            }
            None => {
                self.presence("presence listing", &self.scripts.list, group, [])
                    .await?
            }
        };
        let mut entries = Vec::new();
        for pair in flat.chunks(2) {
            let [_, packed] = pair else {
                return Err(malformed("presence listing"));
            };
            let list: Vec<(String, String, serde_bytes::ByteBuf)> =
                rmp_serde::from_slice(packed).map_err(|_| malformed("presence listing"))?;
            entries.extend(
                list.into_iter()
                    .map(|(process, channel, entry)| StoredEntry {
                        process,
                        channel,
                        entry: Bytes::from(entry.into_vec()),
                    }),
            );
        }
        Ok(PresenceListing {
            entries,
            alive: alive.into_iter().collect::<HashSet<_>>(),
        })
    }
}

fn malformed(what: &'static str) -> TransportError {
    TransportError::Failed(RedisFailure::Malformed(what).into())
}

/// Parses [`READ`]'s answer.
fn history_range(reply: &[Vec<u8>]) -> Option<HistoryRange> {
    let text = |i: usize| std::str::from_utf8(reply.get(i)?).ok();
    let epoch = text(0)?;
    let top: u64 = text(1)?.parse().ok()?;
    let first: u64 = text(2)?.parse().ok()?;
    let rest = reply.get(3..)?;
    let mut events = Vec::with_capacity(rest.len() / 2);
    for pair in rest.chunks(2) {
        let [offset, event] = pair else {
            return None;
        };
        let offset: u64 = std::str::from_utf8(offset).ok()?.parse().ok()?;
        events.push((offset, Bytes::copy_from_slice(event)));
    }
    Some(HistoryRange {
        latest: StreamPosition::new(top, epoch),
        first,
        events,
    })
}

/// A Pub/Sub message on `subject` as the mesh takes it (on both Redis
/// layers): a stored history event, on a `live_prefix` subject
/// (`{prefix}.hlive.`), is split into its position and event; `None`
/// (counted in `dropped_other`) if such an event is malformed.
pub(super) fn incoming(
    subject: String,
    payload: &[u8],
    live_prefix: &str,
    counters: &Counters,
) -> Option<Incoming> {
    let (payload, position) = if subject.starts_with(live_prefix) {
        match live_event(payload) {
            Some((position, event)) => (event, Some(position)),
            None => {
                tracing::warn!(subject, "dropping a malformed history event");
                Counters::add(&counters.dropped_other, 1);
                return None;
            }
        }
    } else {
        (Bytes::copy_from_slice(payload), None)
    };
    Some(Incoming {
        subject,
        reply_to: None,
        payload,
        position,
    })
}

/// Parses a stored event as [`APPEND`] publishes it: `{offset}:{epoch}:`
/// then the encoded event.
pub(super) fn live_event(payload: &[u8]) -> Option<(StreamPosition, Bytes)> {
    let mut parts = payload.splitn(3, |&b| b == b':');
    let offset: u64 = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let epoch = std::str::from_utf8(parts.next()?).ok()?;
    let event = parts.next()?;
    Some((
        StreamPosition::new(offset, epoch),
        Bytes::copy_from_slice(event),
    ))
}

impl<C: Connection> Store for RedisStore<C> {
    fn append<'a>(
        &'a self,
        group: &'a str,
        event: Bytes,
    ) -> BoxFuture<'a, Result<StreamPosition, TransportError>> {
        Box::pin(async move {
            let policy = policy_for(&self.history, group)
                .ok_or_else(|| malformed("history append (no policy)"))?;
            let live = self
                .layout
                .channel(&live_subject(&self.layout.prefix, group));
            let (len, ttl) = (
                policy.len_limit().to_string(),
                millis(policy.time_limit()).to_string(),
            );
            let epoch = names::random_token(10);
            let (offset, epoch): (u64, String) = self
                .eval(
                    "history append",
                    &self.scripts.append,
                    &[&self.stream(group), &self.meta(group)],
                    &[
                        live.as_bytes(),
                        &event,
                        len.as_bytes(),
                        ttl.as_bytes(),
                        epoch.as_bytes(),
                    ],
                )
                .await?;
            Ok(StreamPosition::new(offset, epoch))
        })
    }

    fn latest<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Option<StreamPosition>, TransportError>> {
        Box::pin(async move {
            let latest: Option<(u64, String)> = self
                .eval(
                    "history position",
                    &self.scripts.latest,
                    &[&self.stream(group), &self.meta(group)],
                    &[],
                )
                .await?;
            Ok(latest.map(|(top, epoch)| StreamPosition::new(top, epoch)))
        })
    }

    fn read<'a>(
        &'a self,
        group: &'a str,
        since: &'a StreamPosition,
    ) -> BoxFuture<'a, Result<Option<HistoryRange>, TransportError>> {
        Box::pin(async move {
            let offset = since.offset().to_string();
            let reply: Option<Vec<Vec<u8>>> = self
                .eval(
                    "history read",
                    &self.scripts.read,
                    &[&self.stream(group), &self.meta(group)],
                    &[offset.as_bytes(), since.epoch().as_bytes()],
                )
                .await?;
            match reply {
                None => Ok(None),
                Some(reply) => history_range(&reply)
                    .map(Some)
                    .ok_or_else(|| malformed("history read")),
            }
        })
    }

    fn presence_add<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
        user: &'a str,
        channel: &'a str,
        entry: Bytes,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let args = [
                process.as_bytes(),
                user.as_bytes(),
                channel.as_bytes(),
                entry.as_ref(),
            ];
            self.presence("presence add", &self.scripts.add, group, args)
                .await
        })
    }

    fn presence_remove<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
        user: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        let args = [process, user, channel].map(str::as_bytes);
        Box::pin(self.presence("presence remove", &self.scripts.remove, group, args))
    }

    fn presence_alive<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, TransportError>> {
        Box::pin(async move {
            let ttl = millis(ttl).to_string();
            let args = [process.as_bytes(), ttl.as_bytes()];
            self.presence("presence liveness", &self.scripts.alive, group, args)
                .await
        })
    }

    fn presence_retire<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let [procs, _] = self.presence_keys(group);
            let mut zrem = redis::cmd("ZREM");
            zrem.arg(&procs).arg(process);
            query(&self.conn, "presence retire", &zrem).await
        })
    }

    fn presence_drop<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        let args = [process.as_bytes()];
        Box::pin(self.presence("presence drop", &self.scripts.drop, group, args))
    }

    fn presence_collect<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        let args = [process.as_bytes()];
        Box::pin(self.presence("presence collect", &self.scripts.collect, group, args))
    }

    fn presence_list<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<PresenceListing, TransportError>> {
        Box::pin(self.listing(group, None))
    }

    fn presence_user<'a>(
        &'a self,
        group: &'a str,
        user: &'a str,
    ) -> BoxFuture<'a, Result<PresenceListing, TransportError>> {
        Box::pin(self.listing(group, Some(user)))
    }

    fn presence_processes<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, bool)>, TransportError>> {
        Box::pin(async move {
            let processes: Vec<(String, i64)> = self
                .presence("presence processes", &self.scripts.processes, group, [])
                .await?;
            Ok(processes
                .into_iter()
                .map(|(process, alive)| (process, alive == 1))
                .collect())
        })
    }

    fn named_add<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
        expiry: Duration,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let expires = unix_now().saturating_add(expiry.as_secs()).to_string();
            let ttl = expiry.as_secs().to_string();
            let args = [expires.as_bytes(), channel.as_bytes(), ttl.as_bytes()];
            self.eval(
                "adding a named member",
                &self.scripts.named_add,
                &[&self.named_key(group)],
                &args,
            )
            .await
        })
    }

    fn named_remove<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let mut zrem = redis::cmd("ZREM");
            zrem.arg(self.named_key(group)).arg(channel);
            query(&self.conn, "removing a named member", &zrem).await
        })
    }

    fn named_members<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, TransportError>> {
        Box::pin(async move {
            let now = unix_now().to_string();
            self.eval(
                "reading the named members",
                &self.scripts.named_members,
                &[&self.named_key(group)],
                &[now.as_bytes()],
            )
            .await
        })
    }

    fn presence_claim<'a>(
        &'a self,
        group: &'a str,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, TransportError>> {
        Box::pin(async move {
            let mut set = redis::cmd("SET");
            set.arg(format!("{}:claim:{key}", self.presence_base(group)))
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(millis(ttl).max(1));
            let claimed: Option<String> = query(&self.conn, "presence claim", &set).await?;
            Ok(claimed.is_some())
        })
    }

    /// Deletes every key under the prefix (`SCAN`, then `DEL` of each
    /// batch, on every primary of a cluster), the named channels' lists
    /// included, so a flush also drops the events queued there.
    fn clear(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let pattern = format!("{}:*", escape_glob(&self.layout.prefix));
            self.conn.delete_matching(&pattern).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        let b = |s: &str| s.as_bytes().to_vec();
        let range = history_range(&[b("e"), b("9"), b("3"), b("4"), b("ev")]).unwrap();
        assert_eq!(range.latest, StreamPosition::new(9, "e"));
        assert_eq!(range.first, 3);
        assert_eq!(range.events, vec![(4, Bytes::from_static(b"ev"))]);
        assert!(history_range(&[b("e"), b("9"), b("3"), b("4")]).is_none());
        assert!(history_range(&[b("e"), b("x"), b("3")]).is_none());
        assert!(history_range(&[]).is_none());

        let (position, event) = live_event(b"12:abc:x:y").unwrap();
        assert_eq!(position, StreamPosition::new(12, "abc"));
        assert_eq!(&event[..], b"x:y");
        assert!(live_event(b"x:abc:e").is_none());
        assert!(live_event(b"12").is_none());
    }
}
