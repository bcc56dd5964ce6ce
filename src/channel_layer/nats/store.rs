//! The mesh's [`Store`] on JetStream: group histories in a stream,
//! presence in a KV bucket (see the module docs' "Presence and history").

use std::{collections::HashMap, fmt, sync::Mutex, time::Duration};

use async_nats::{
    jetstream::{
        self,
        consumer::{push, DeliverPolicy, ReplayPolicy},
        context::PublishErrorKind,
        kv,
        stream::{self, DiscardPolicy, LastRawMessageErrorKind, Republish, StorageType},
        ErrorCode,
    },
    Client, HeaderMap,
};
use bytes::Bytes;
use futures_util::StreamExt;

use super::{failed, lock, names, NatsError};
use crate::channel_layer::{
    mesh::{history_subject, live_subject, HistoryRange, PresenceRecords, Store, TransportError},
    BoxFuture, HistoryPolicy, PresenceConfig, StreamPosition,
};

/// The header carrying a stored event's epoch.
const EPOCH: &str = "Tower-Channels-Epoch";
/// The header carrying a stored event's offset.
const OFFSET: &str = "Tower-Channels-Offset";
/// Appends that lost the race for the next offset are tried again, up to
/// this many times in all, within the layer's timeout. A process whose
/// cache is stale needs two round trips (read the last event, publish)
/// where one with a fresh cache needs one, so under sustained contention
/// it may lose many times in a row; it waits a little (jittered) between
/// tries, and gives up at the timeout.
const APPEND_ATTEMPTS: u32 = 256;
/// The longest pause between two tries of an append.
const APPEND_BACKOFF: Duration = Duration::from_millis(5);

/// `prefix` as a stream or bucket name token: `_` is written `_u` and `.`
/// `_d`, so different prefixes never share a name.
fn escape(prefix: &str) -> String {
    prefix.replace('_', "_u").replace('.', "_d")
}

/// The name of the history stream of `prefix`.
pub(super) fn stream_name(prefix: &str) -> String {
    format!("tower-channels-history-{}", escape(prefix))
}

/// The name of the presence bucket of `prefix`.
pub(super) fn bucket_name(prefix: &str) -> String {
    format!("tower-channels-presence-{}", escape(prefix))
}

/// The KV key of `process`'s presence record in `group`. Group names
/// cannot contain `=`, so `{group}.=.` never is a prefix of another
/// group's keys.
fn presence_key(group: &str, process: &str) -> String {
    format!("{group}.=.{process}")
}

/// The KV key claiming the announcement that `process`'s members of
/// `group` left (outside the listing's `{group}.=.>`).
fn claim_key(group: &str, process: &str) -> String {
    format!("{group}.=gone.{process}")
}

/// The position a stored history message carries in its headers.
pub(super) fn position_of(headers: Option<&HeaderMap>) -> Option<StreamPosition> {
    let headers = headers?;
    let epoch = headers.get(EPOCH)?.as_str();
    let offset = headers.get(OFFSET)?.as_str().parse().ok()?;
    Some(StreamPosition::new(offset, epoch))
}

/// Histories and presence on JetStream.
pub(super) struct JetStreamStore {
    prefix: String,
    client: Client,
    js: jetstream::Context,
    history: Option<stream::Stream>,
    presence: Option<kv::Store>,
    /// The configurations of the stream and the bucket's stream, to make
    /// them again when NATS lost them (restarted without its store).
    configs: Vec<stream::Config>,
    /// Per group: the stream sequence and position of the last event this
    /// process appended or read, the expected last sequence of its next
    /// append.
    last: Mutex<HashMap<String, (u64, StreamPosition)>>,
}

impl fmt::Debug for JetStreamStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamStore")
            .field("prefix", &self.prefix)
            .field("history", &self.history.is_some())
            .field("presence", &self.presence.is_some())
            .finish_non_exhaustive()
    }
}

fn setup(what: &str, e: impl Into<crate::channel_layer::BoxError>) -> NatsError {
    NatsError::Nats(format!("{what} (is JetStream enabled?)"), e.into())
}

impl JetStreamStore {
    /// Creates (or updates to this configuration) the history stream when
    /// `history` has policies, and the presence bucket when `presence` is
    /// set. The stream keeps, per group, the largest `max_len` of the
    /// policies for the longest `ttl`; the mesh trims each group to its
    /// own `max_len` when it reads.
    pub(super) async fn open(
        client: Client,
        prefix: &str,
        timeout: Duration,
        history: &[HistoryPolicy],
        presence: Option<&PresenceConfig>,
    ) -> Result<Self, NatsError> {
        let mut js = jetstream::new(client.clone());
        js.set_timeout(timeout);
        let mut configs = Vec::new();
        let history = match history.iter().map(HistoryPolicy::len_limit).max() {
            None => None,
            Some(max_len) => {
                let ttl = history
                    .iter()
                    .map(HistoryPolicy::time_limit)
                    .max()
                    .unwrap_or_default();
                let hist = history_subject(prefix, ">");
                let config = stream::Config {
                    name: stream_name(prefix),
                    subjects: vec![hist.clone()],
                    max_messages_per_subject: i64::try_from(max_len).unwrap_or(i64::MAX),
                    max_age: ttl,
                    storage: StorageType::File,
                    discard: DiscardPolicy::Old,
                    republish: Some(Republish {
                        source: hist,
                        destination: live_subject(prefix, ">"),
                        headers_only: false,
                    }),
                    ..Default::default()
                };
                js.create_or_update_stream(config.clone())
                    .await
                    .map_err(|e| setup("creating the history stream", e))?;
                let stream = js
                    .get_stream(&config.name)
                    .await
                    .map_err(|e| setup("opening the history stream", e))?;
                configs.push(config);
                Some(stream)
            }
        };
        let presence = match presence {
            None => None,
            Some(config) => {
                // The bucket's stream as async-nats would make it (its own
                // helper asks for account details a 2.9 server lacks).
                let bucket = bucket_name(prefix);
                let config = stream::Config {
                    name: format!("KV_{bucket}"),
                    subjects: vec![format!("$KV.{bucket}.>")],
                    max_messages_per_subject: 1,
                    max_age: config.time_limit(),
                    storage: StorageType::File,
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    discard: DiscardPolicy::New,
                    ..Default::default()
                };
                js.create_or_update_stream(config.clone())
                    .await
                    .map_err(|e| setup("creating the presence bucket", e))?;
                configs.push(config);
                Some(
                    js.get_key_value(bucket)
                        .await
                        .map_err(|e| setup("opening the presence bucket", e))?,
                )
            }
        };
        Ok(Self {
            prefix: prefix.to_owned(),
            client,
            js,
            history,
            presence,
            configs,
            last: Mutex::default(),
        })
    }

    /// Makes the history stream and presence bucket again if NATS lost
    /// them (a restart without its store): the histories start new epochs
    /// and each process writes its presence again on its next refresh.
    async fn recreate(&self) {
        lock(&self.last).clear();
        for config in &self.configs {
            match self.js.create_or_update_stream(config.clone()).await {
                Ok(_) => tracing::warn!(
                    stream = config.name,
                    "JetStream stream was missing; created it again"
                ),
                Err(e) => tracing::debug!(
                    stream = config.name,
                    "creating a JetStream stream again failed: {e}"
                ),
            }
        }
    }

    /// Fails at once while the client is reconnecting, as the transport's
    /// own operations do (the client would buffer the request).
    fn check_connected(&self) -> Result<(), TransportError> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            _ => Err(TransportError::NotSent(NatsError::Reconnecting.into())),
        }
    }

    fn history(&self) -> Result<&stream::Stream, TransportError> {
        self.check_connected()?;
        self.history
            .as_ref()
            .ok_or_else(|| failed("history", "no history policy was configured"))
    }

    fn presence(&self) -> Result<&kv::Store, TransportError> {
        self.check_connected()?;
        self.presence
            .as_ref()
            .ok_or_else(|| failed("presence", "presence was not configured"))
    }

    /// The stream sequence and position of `group`'s newest event.
    async fn last(&self, group: &str) -> Result<Option<(u64, StreamPosition)>, TransportError> {
        let subject = history_subject(&self.prefix, group);
        let what = format!("reading the last event of {group:?}");
        match self
            .history()?
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(message) => match position_of(Some(&message.headers)) {
                Some(position) => Ok(Some((message.sequence, position))),
                None => Err(failed(&what, "a stored event without a position")),
            },
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
            Err(e)
                if matches!(e.kind(), LastRawMessageErrorKind::JetStream(ref js)
                    if js.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {
                // Lost with NATS's store: an empty history.
                self.recreate().await;
                Ok(None)
            }
            Err(e) => Err(failed(&what, e)),
        }
    }

    async fn append_once(
        &self,
        group: &str,
        event: &Bytes,
    ) -> Result<Option<StreamPosition>, TransportError> {
        self.check_connected()?;
        let cached = lock(&self.last).get(group).cloned();
        let last = match cached {
            Some(last) => Some(last),
            None => self.last(group).await?,
        };
        let (expected, position) = match last {
            Some((sequence, at)) => (sequence, StreamPosition::new(at.offset() + 1, at.epoch())),
            // Expecting sequence 0 fails if another process started the
            // epoch first: exactly one epoch wins.
            None => (0, StreamPosition::new(1, names::random_token(10))),
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected.to_string(),
        );
        headers.insert(EPOCH, position.epoch());
        headers.insert(OFFSET, position.offset().to_string());
        let what = format!("history append to {group:?}");
        let subject = history_subject(&self.prefix, group);
        let acked = match self
            .js
            .publish_with_headers(subject, headers, event.clone())
            .await
        {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match acked {
            Ok(ack) => {
                lock(&self.last).insert(group.to_owned(), (ack.sequence, position.clone()));
                Ok(Some(position))
            }
            Err(e) => {
                lock(&self.last).remove(group);
                match e.kind() {
                    PublishErrorKind::WrongLastSequence => Ok(None),
                    PublishErrorKind::StreamNotFound => {
                        self.recreate().await;
                        Ok(None)
                    }
                    _ => Err(failed(&what, e)),
                }
            }
        }
    }

    async fn read_range(
        &self,
        group: &str,
        since: &StreamPosition,
    ) -> Result<Option<HistoryRange>, TransportError> {
        let Some((_, latest)) = self.last(group).await? else {
            return Ok(None);
        };
        let mut range = HistoryRange {
            first: latest.offset(),
            latest,
            events: Vec::new(),
        };
        let top = range.latest.offset();
        if range.latest.epoch() != since.epoch() || since.offset() >= top {
            return Ok(Some(range));
        }
        let what = format!("reading the history of {group:?}");
        let consumer = self
            .history()?
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: history_subject(&self.prefix, group),
                deliver_policy: DeliverPolicy::All,
                replay_policy: ReplayPolicy::Instant,
                ..Default::default()
            })
            .await
            .map_err(|e| failed(&what, e))?;
        let mut messages = consumer.messages().await.map_err(|e| failed(&what, e))?;
        let mut first = None;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| failed(&what, e))?;
            let pending = message.info().map_err(|e| failed(&what, e))?.pending;
            let Some(at) = position_of(message.message.headers.as_ref()) else {
                return Err(failed(&what, "a stored event without a position"));
            };
            if at.epoch() == range.latest.epoch() {
                let first = *first.get_or_insert(at.offset());
                if first > since.offset() + 1 {
                    // Trimmed past the position: nothing more to read.
                    range.first = first;
                    return Ok(Some(range));
                }
                if at.offset() > since.offset() && at.offset() <= top {
                    range
                        .events
                        .push((at.offset(), message.message.payload.clone()));
                }
            }
            if at.offset() >= top || pending == 0 {
                break;
            }
        }
        range.first = first.unwrap_or(top);
        Ok(Some(range))
    }

    async fn list(&self, group: &str) -> Result<PresenceRecords, TransportError> {
        let what = format!("reading the presence of {group:?}");
        let bucket = self.presence()?;
        let key_prefix = format!("{}{}", bucket.prefix, presence_key(group, ""));
        let consumer = bucket
            .stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: format!("{key_prefix}>"),
                deliver_policy: DeliverPolicy::LastPerSubject,
                replay_policy: ReplayPolicy::Instant,
                headers_only: false,
                ..Default::default()
            })
            .await
            .map_err(|e| failed(&what, e))?;
        // One message per key (its last) as of the consumer's creation:
        // stop after that many, whatever arrives meanwhile.
        let expected = consumer.cached_info().num_pending;
        let mut records = Vec::new();
        if expected == 0 {
            return Ok(records);
        }
        let mut messages = consumer.messages().await.map_err(|e| failed(&what, e))?;
        let mut seen = 0;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| failed(&what, e))?;
            let pending = message.info().map_err(|e| failed(&what, e))?.pending;
            seen += 1;
            let deleted = message
                .message
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some();
            if let Some(process) = message.message.subject.strip_prefix(&key_prefix) {
                records.retain(|(p, _): &(String, Option<Bytes>)| p != process);
                let record = message.message.payload.clone();
                let record = (!deleted && !record.is_empty()).then_some(record);
                records.push((process.to_owned(), record));
            }
            if seen >= expected || pending == 0 {
                break;
            }
        }
        Ok(records)
    }
}

impl Store for JetStreamStore {
    fn append<'a>(
        &'a self,
        group: &'a str,
        event: Bytes,
    ) -> BoxFuture<'a, Result<StreamPosition, TransportError>> {
        Box::pin(async move {
            for attempt in 0..APPEND_ATTEMPTS {
                if let Some(position) = self.append_once(group, &event).await? {
                    return Ok(position);
                }
                let ceiling = APPEND_BACKOFF.min(Duration::from_micros(250) * (attempt + 1));
                let micros = u64::try_from(ceiling.as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1);
                tokio::time::sleep(Duration::from_micros(names::random_u64() % micros)).await;
            }
            Err(failed(
                &format!("history append to {group:?}"),
                "other processes kept taking the next offset",
            ))
        })
    }

    fn latest<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Option<StreamPosition>, TransportError>> {
        Box::pin(async move { Ok(self.last(group).await?.map(|(_, position)| position)) })
    }

    fn read<'a>(
        &'a self,
        group: &'a str,
        since: &'a StreamPosition,
    ) -> BoxFuture<'a, Result<Option<HistoryRange>, TransportError>> {
        Box::pin(self.read_range(group, since))
    }

    fn presence_put<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
        entries: Bytes,
        _ttl: Duration,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        // The bucket's max age is the TTL (set when it was opened).
        Box::pin(async move {
            let key = presence_key(group, process);
            let bucket = self.presence()?;
            if let Err(e) = bucket.put(&key, entries.clone()).await {
                // The bucket may be gone with NATS's store: make it again
                // and try once more.
                tracing::debug!(group, "writing presence failed: {e}");
                self.recreate().await;
                bucket
                    .put(&key, entries)
                    .await
                    .map_err(|e| failed(&format!("writing the presence of {group:?}"), e))?;
            }
            Ok(())
        })
    }

    fn presence_remove<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
        _ttl: Duration,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        // The delete marker lives the bucket's max age, the TTL.
        Box::pin(async move {
            self.presence()?
                .delete(presence_key(group, process))
                .await
                .map_err(|e| failed(&format!("removing the presence of {group:?}"), e))
        })
    }

    fn presence_list<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<PresenceRecords, TransportError>> {
        Box::pin(self.list(group))
    }

    fn presence_claim<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
        _ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, TransportError>> {
        // Creating a key succeeds once (expected last subject sequence 0);
        // it expires with the bucket's max age.
        Box::pin(async move {
            match self
                .presence()?
                .create(claim_key(group, process), Bytes::new())
                .await
            {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(failed(
                    &format!("claiming a presence leave in {group:?}"),
                    e,
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_do_not_collide() {
        assert_ne!(stream_name("a.b"), stream_name("a_b"));
        assert_ne!(stream_name("a_d"), stream_name("a.d"));
        assert_eq!(stream_name("myapp"), "tower-channels-history-myapp");
        assert_eq!(presence_key("room.1", "specific.x"), "room.1.=.specific.x");
        let mut h = HeaderMap::new();
        h.insert(EPOCH, "e1");
        h.insert(OFFSET, "7");
        assert_eq!(position_of(Some(&h)), Some(StreamPosition::new(7, "e1")));
        h.insert(OFFSET, "x");
        assert_eq!(position_of(Some(&h)), None);
        assert_eq!(position_of(None), None);
    }
}
