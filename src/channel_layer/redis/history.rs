//! Group histories on Redis: a capped stream per group, the offset assigned
//! by the same script that publishes the event (see the module docs'
//! "History and recovery").

use super::{lock, names, unix_now, wire, BackendError, Counters, Inner, LocalChannels, LuaScript};
use crate::channel_layer::{
    history::policy_for,
    sequencer::{Base, SequencerHost},
    BoxFuture, ChannelLayerError, Event, GroupSendReport, HistoryPolicy, Recovery, RecoveryFailure,
    StreamPosition,
};

/// `KEYS[1]` group (Pub/Sub channel and sorted set of named members);
/// `ARGV`: 1 list payload, 2 now (s), 3 group expiry (s), 4 capacity,
/// 5 list expiry (s), 6 list key prefix, 7 stream key, 8 meta key,
/// 9 origin, 10 group, 11 encoded event, 12 max len, 13 ttl (ms), 14 a new epoch.
/// Returns `{subscribers, pushed, full, offset, epoch}`.
///
/// The stream and its meta hash (`epoch`, `top`) expire together; a
/// missing stream or meta starts a new epoch at offset 1. The Pub/Sub
/// message is the wire envelope with `id` = offset and `channel` = epoch.
pub(super) const SEND_SCRIPT: &str = r"
local stream, meta = ARGV[7], ARGV[8]
local epoch = redis.call('HGET', meta, 'epoch')
if (not epoch) or redis.call('EXISTS', stream) == 0 then
  epoch = ARGV[14]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch, 'top', 0)
end
local offset = redis.call('HINCRBY', meta, 'top', 1)
redis.call('XADD', stream, 'MAXLEN', ARGV[12], offset .. '-0', 'e', ARGV[11])
redis.call('PEXPIRE', stream, ARGV[13])
redis.call('PEXPIRE', meta, ARGV[13])
local msg = cmsgpack.pack({ARGV[9], 0, offset, ARGV[10], epoch, ARGV[11]})
local receivers = redis.call('PUBLISH', KEYS[1], msg)
local pushed, full = 0, 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[2]) - tonumber(ARGV[3]))
  local cap = tonumber(ARGV[4])
  for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    local key = ARGV[6] .. member
    if redis.call('LLEN', key) < cap then
      redis.call('LPUSH', key, ARGV[1])
      redis.call('EXPIRE', key, ARGV[5])
      pushed = pushed + 1
    else
      full = full + 1
    end
  end
end
return {receivers, pushed, full, offset, epoch}
";

/// `ARGV`: stream key, meta key, since offset, since epoch. Returns bulk
/// strings: `{'none'}`, `{'epoch'|'old', epoch, top}` or
/// `{'ok', epoch, top, offset1, event1, offset2, event2, ...}`.
pub(super) const RECOVER_SCRIPT: &str = r"
local stream, meta = ARGV[1], ARGV[2]
local epoch = redis.call('HGET', meta, 'epoch')
if (not epoch) or redis.call('EXISTS', stream) == 0 then return {'none'} end
local top = tonumber(redis.call('HGET', meta, 'top'))
local since = tonumber(ARGV[3])
if epoch ~= ARGV[4] or since > top then return {'epoch', epoch, tostring(top)} end
local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
local first_offset = tonumber(string.match(first[1][1], '^(%d+)'))
if first_offset > since + 1 then return {'old', epoch, tostring(top)} end
local out = {'ok', epoch, tostring(top)}
for _, e in ipairs(redis.call('XRANGE', stream, (since + 1) .. '-0', '+')) do
  out[#out + 1] = string.match(e[1], '^(%d+)')
  out[#out + 1] = e[2][2]
end
return out
";

#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) send: LuaScript,
    pub(super) recover: LuaScript,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            send: LuaScript::new(SEND_SCRIPT),
            recover: LuaScript::new(RECOVER_SCRIPT),
        }
    }
}

impl SequencerHost for Inner {
    fn read_history<'a>(
        &'a self,
        group: &'a str,
        since: &'a StreamPosition,
    ) -> BoxFuture<'a, Result<Recovery, ChannelLayerError>> {
        Box::pin(self.recover(group, since))
    }

    fn deliver(&self, group: &str, event: &Event) {
        self.fan_out(group, event);
    }

    fn lost(&self, group: &str, count: Option<u64>, why: &str) {
        let count = count.unwrap_or(1);
        Counters::add(
            &self.counters.dropped_other,
            usize::try_from(count).unwrap_or(usize::MAX),
        );
        tracing::warn!(
            group,
            lost = count,
            "history events missed here cannot be delivered: {why}"
        );
    }
}

impl Inner {
    /// Follows the history groups among `groups` not followed yet, from
    /// the group's current position (read before subscribing, so what is
    /// published in between is read from the stream, not missed).
    pub(super) async fn follow_history(&self, groups: &[String]) {
        for group in groups {
            if policy_for(&self.config.history, group).is_none() || self.sequencer.follows(group) {
                continue;
            }
            let base = match self
                .query::<(Option<String>, Option<u64>)>(
                    "HMGET",
                    redis::cmd("HMGET")
                        .arg(self.meta_key(group))
                        .arg("epoch")
                        .arg("top"),
                )
                .await
            {
                Ok((Some(epoch), Some(top))) => Base::At(StreamPosition::new(top, epoch)),
                Ok(_) => Base::Empty,
                Err(e) => {
                    tracing::debug!(group, "reading the history position failed: {e}");
                    Base::Unknown
                }
            };
            self.sequencer.start(group, base);
        }
    }

    fn stream_key(&self, group: &str) -> String {
        format!("{}:history:{group}", self.config.prefix)
    }

    fn meta_key(&self, group: &str) -> String {
        format!("{}:history-meta:{group}", self.config.prefix)
    }

    /// A group send to a group with history. Local members get the event
    /// once the script answered with its offset, through the sequencer,
    /// which keeps them in offset order with other senders' events and
    /// drops the copy Pub/Sub brings back.
    pub(super) async fn group_send_with_history(
        &self,
        group: &str,
        event: &Event,
        policy: &HistoryPolicy,
    ) -> Result<GroupSendReport, ChannelLayerError> {
        let encoded = event.encode()?;
        let list_payload =
            wire::event_envelope(self.process(), wire::OP_GROUP_EVENT, group, "", event)?;
        let key = self.config.group_key(group);
        let subscribed_before = lock(&self.subscribed).contains(group);
        let local_members = self.registry.group_len(group);
        let ttl_ms = u64::try_from(policy.time_limit().as_millis()).unwrap_or(u64::MAX);
        let (receivers, pushed, full, offset, epoch): (usize, usize, usize, u64, String) = self
            .eval("group send with history", &self.history_scripts.send, |c| {
                c.arg(1)
                    .arg(&key)
                    .arg(&list_payload)
                    .arg(unix_now())
                    .arg(self.config.group_expiry.as_secs())
                    .arg(self.config.capacity)
                    .arg(self.config.expiry.as_secs())
                    .arg(&self.config.list_prefix)
                    .arg(self.stream_key(group))
                    .arg(self.meta_key(group))
                    .arg(self.process())
                    .arg(group)
                    .arg(encoded.as_ref())
                    .arg(policy.len_limit())
                    .arg(ttl_ms)
                    .arg(names::random_token(10));
            })
            .await?;
        self.counters.group_sent(full);
        let own = usize::from(subscribed_before || lock(&self.subscribed).contains(group));
        let position = StreamPosition::new(offset, epoch);
        if local_members > 0 {
            let event = event.clone().with_position(position.clone());
            self.sequencer.offer(self, group, event).await;
        }
        Ok(GroupSendReport {
            local_members,
            remote_receivers: Some(receivers.saturating_sub(own) + pushed),
            dropped: full,
            position: Some(position),
        })
    }

    pub(super) async fn recover(
        &self,
        group: &str,
        since: &StreamPosition,
    ) -> Result<Recovery, ChannelLayerError> {
        let reply: Vec<Vec<u8>> = self
            .eval("recover", &self.history_scripts.recover, |c| {
                c.arg(0)
                    .arg(self.stream_key(group))
                    .arg(self.meta_key(group))
                    .arg(since.offset())
                    .arg(since.epoch());
            })
            .await?;
        parse_recovery(&reply).ok_or_else(|| BackendError::MalformedReply("recover").into())
    }
}

fn text(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

fn parse_recovery(reply: &[Vec<u8>]) -> Option<Recovery> {
    let status = text(reply.first()?)?;
    if status == "none" {
        return Some(Recovery::failed(RecoveryFailure::EpochChanged, None));
    }
    let epoch: std::sync::Arc<str> = text(reply.get(1)?)?.into();
    let top: u64 = text(reply.get(2)?)?.parse().ok()?;
    let latest = StreamPosition::new(top, epoch.clone());
    match status {
        "epoch" => Some(Recovery::failed(
            RecoveryFailure::EpochChanged,
            Some(latest),
        )),
        "old" => Some(Recovery::failed(RecoveryFailure::TooOld, Some(latest))),
        "ok" => {
            let rest = &reply[3..];
            if rest.len() % 2 != 0 {
                return None;
            }
            let mut events = Vec::with_capacity(rest.len() / 2);
            for pair in rest.chunks(2) {
                let offset: u64 = text(&pair[0])?.parse().ok()?;
                let event = Event::decode(&pair[1]).ok()?;
                events.push(event.with_position(StreamPosition::new(offset, epoch.clone())));
            }
            Some(Recovery::recovered(events, latest))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_replies() {
        let b = |s: &str| s.as_bytes().to_vec();
        let r = parse_recovery(&[b("none")]).unwrap();
        assert_eq!(r.failure(), Some(RecoveryFailure::EpochChanged));
        let r = parse_recovery(&[b("old"), b("e"), b("9")]).unwrap();
        assert_eq!(r.failure(), Some(RecoveryFailure::TooOld));
        assert_eq!(r.latest(), Some(&StreamPosition::new(9, "e")));
        let ev = Event::text("k", "hi").encode().unwrap().to_vec();
        let r = parse_recovery(&[b("ok"), b("e"), b("3"), b("3"), ev]).unwrap();
        assert_eq!(r.events()[0].position(), Some(&StreamPosition::new(3, "e")));
        assert!(parse_recovery(&[b("ok"), b("e"), b("3"), b("3")]).is_none());
        assert!(parse_recovery(&[b("ok"), b("e"), b("x")]).is_none());
        assert!(parse_recovery(&[]).is_none());
    }
}
