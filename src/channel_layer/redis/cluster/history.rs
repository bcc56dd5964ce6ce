//! Group histories on Redis, for both layers: a capped stream per group,
//! the offset assigned by the same script that publishes the event (see
//! the module docs' "History and recovery"). The scripts and the Rust
//! around them run on any [`Host`]; a layer's history send script is
//! [`APPEND`] followed by the part it shares with its plain group send
//! (how it publishes and reaches named members).

use super::{
    names,
    shared::{Host, Via},
    BackendError,
};
use crate::channel_layer::{
    history::policy_for, sequencer::Base, validate_group_name, ChannelLayerError, Event,
    HistoryPolicy, Recovery, RecoveryFailure, StreamPosition,
};

/// The Lua function both layers' history send scripts start with:
/// `append(i)` appends the event to the group's stream and returns
/// `offset, epoch, msg`, where `msg` is what to publish (the wire envelope
/// with `id` = offset and `channel` = epoch). `KEYS[2]` is the group's
/// stream, `KEYS[3]` its meta hash (`KEYS[1]` is the group's channel, for
/// the layer's part); its arguments are `ARGV[i..i+5]`, appended by
/// [`history_args`]: origin, group, encoded event, max len, ttl (ms), a new
/// epoch.
///
/// The stream and its meta hash (`epoch`, `top`) expire together; a
/// missing stream or meta starts a new epoch at offset 1.
pub(super) const APPEND: &str = r"
local function append(i)
  local stream, meta = KEYS[2], KEYS[3]
  local epoch = redis.call('HGET', meta, 'epoch')
  if (not epoch) or redis.call('EXISTS', stream) == 0 then
    epoch = ARGV[i + 5]
    redis.call('DEL', stream)
    redis.call('HSET', meta, 'epoch', epoch, 'top', 0)
  end
  local offset = redis.call('HINCRBY', meta, 'top', 1)
  redis.call('XADD', stream, 'MAXLEN', ARGV[i + 3], offset .. '-0', 'e', ARGV[i + 2])
  redis.call('PEXPIRE', stream, ARGV[i + 4])
  redis.call('PEXPIRE', meta, ARGV[i + 4])
  return offset, epoch, cmsgpack.pack({ARGV[i], 0, offset, ARGV[i + 1], epoch, ARGV[i + 2]})
end
";

/// The keys of a history send: the group's Pub/Sub channel (`group_key`),
/// stream and meta hash.
pub(super) fn send_keys<H: Host>(inner: &H, group: &str, group_key: String) -> [String; 3] {
    let keys = &inner.shared().keys;
    [group_key, keys.stream(group), keys.meta(group)]
}

/// Appends [`APPEND`]'s arguments, after the layer's own.
pub(super) fn history_args(
    c: &mut redis::Cmd,
    origin: &str,
    group: &str,
    encoded: &[u8],
    policy: &HistoryPolicy,
    epoch: &str,
) {
    let ttl_ms = u64::try_from(policy.time_limit().as_millis()).unwrap_or(u64::MAX);
    c.arg(origin)
        .arg(group)
        .arg(encoded)
        .arg(policy.len_limit())
        .arg(ttl_ms)
        .arg(epoch);
}

/// A fresh epoch, used if the send starts one.
pub(super) fn new_epoch() -> String {
    names::random_token(10)
}

/// After a history send answered `position`: local members get the event
/// through the sequencer, which keeps them in offset order with other
/// senders' events and drops the copy Pub/Sub brings back.
pub(super) async fn deliver_own<H: Host>(
    inner: &H,
    group: &str,
    event: &Event,
    position: &StreamPosition,
    local_members: usize,
) {
    if local_members > 0 {
        let event = event.clone().with_position(position.clone());
        inner
            .shared()
            .sequencer
            .offer(&Via(inner), group, event)
            .await;
    }
}

/// A history event another process (or this one) published, as Pub/Sub
/// brought it: `id` its offset, `epoch` its epoch.
pub(super) async fn received<H: Host>(inner: &H, group: &str, event: Event, id: u64, epoch: &str) {
    let event = event.with_position(StreamPosition::new(id, epoch));
    inner
        .shared()
        .sequencer
        .offer(&Via(inner), group, event)
        .await;
}

/// The history policy of `group`, if it has one and `event` is not
/// ephemeral (an ephemeral event goes out as a plain group send: not
/// stored, no offset, and receivers fan it out without the sequencer).
pub(super) fn policy<'a, H: Host>(
    inner: &'a H,
    group: &str,
    event: &Event,
) -> Option<&'a HistoryPolicy> {
    policy_for(&inner.shared().history, group).filter(|_| !event.is_ephemeral())
}

/// Follows the history groups among `groups` not followed yet, from the
/// group's current position (read before subscribing, so what is
/// published in between is read from the stream, not missed).
pub(super) async fn follow<H: Host>(inner: &H, groups: &[String]) {
    let shared = inner.shared();
    for group in groups {
        if policy_for(&shared.history, group).is_none() || shared.sequencer.follows(group) {
            continue;
        }
        let base = match inner
            .query::<(Option<String>, Option<u64>)>(
                "HMGET",
                redis::cmd("HMGET")
                    .arg(shared.keys.meta(group))
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
        shared.sequencer.start(group, base);
    }
}

/// Stops following `group` (its subscription ended because it has no
/// local member left).
pub(super) fn unfollow<H: Host>(inner: &H, group: &str) {
    inner.shared().sequencer.retain(|g| g != group);
}

/// Reads what `groups` missed while their subscription was down (they
/// are subscribed again), in a task: messages keep flowing meanwhile, each
/// group's sequencer keeps the order.
pub(super) fn catch_up<H: Host>(inner: &std::sync::Arc<H>, groups: Vec<String>) {
    if groups.is_empty() {
        return;
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        let sequencer = &inner.shared().sequencer;
        for group in groups {
            sequencer.catch_up(&Via(&*inner), &group).await;
        }
    });
}

/// `KEYS`: stream, meta; `ARGV`: since offset, since epoch. Returns bulk
/// strings: `{'none'}`, `{'epoch'|'old', epoch, top}` or
/// `{'ok', epoch, top, offset1, event1, offset2, event2, ...}`.
pub(super) const RECOVER_SCRIPT: &str = r"
local stream, meta = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
if (not epoch) or redis.call('EXISTS', stream) == 0 then return {'none'} end
local top = tonumber(redis.call('HGET', meta, 'top'))
local since = tonumber(ARGV[1])
if epoch ~= ARGV[2] or since > top then return {'epoch', epoch, tostring(top)} end
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

/// `ChannelLayer::recover` of both layers (and the sequencer's reads).
pub(super) async fn recover<H: Host>(
    inner: &H,
    group: &str,
    since: &StreamPosition,
) -> Result<Recovery, ChannelLayerError> {
    validate_group_name(group)?;
    let shared = inner.shared();
    if policy_for(&shared.history, group).is_none() {
        return Err(ChannelLayerError::NoHistory {
            group: group.to_owned(),
        });
    }
    let (stream, meta) = (shared.keys.stream(group), shared.keys.meta(group));
    let reply: Vec<Vec<u8>> = inner
        .eval("recover", &shared.recover, &[&stream, &meta], |c| {
            c.arg(since.offset()).arg(since.epoch());
        })
        .await?;
    parse_recovery(&reply).ok_or_else(|| BackendError::MalformedReply("recover").into())
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
