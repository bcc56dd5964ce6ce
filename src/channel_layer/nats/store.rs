//! The mesh's [`Store`] on JetStream: group histories in a stream,
//! presence in two KV buckets (see the module docs' "Presence and history").

use std::{
    collections::HashMap,
    fmt,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use async_nats::{
    jetstream::{
        self,
        consumer::{pull, push, AckPolicy, DeliverPolicy, ReplayPolicy},
        context::PublishErrorKind,
        kv,
        stream::{self, DiscardPolicy, LastRawMessageErrorKind, Republish, StorageType},
        ErrorCode,
    },
    Client, HeaderMap,
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use bytes::Bytes;
use futures_util::StreamExt;

use super::{failed, lock, names, NatsError};
use crate::channel_layer::{
    mesh::{
        history_subject, live_subject, HistoryRange, PresenceListing, Store, StoredEntry,
        TransportError,
    },
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
/// Keys a listing fetches per request.
const FETCH_BATCH: usize = 1024;
/// How long a listing's first fetch may deliver nothing (see
/// `JetStreamStore::keys`).
const FETCH_WAIT: Duration = Duration::from_millis(50);
/// How long the server keeps a listing's consumer if this process does
/// not delete it (it does, after the listing).
const CONSUMER_IDLE: Duration = Duration::from_secs(10);
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

/// The name of the presence bucket of `prefix` (liveness and claims,
/// whose max age is the TTL).
pub(super) fn bucket_name(prefix: &str) -> String {
    format!("tower-channels-presence-{}", escape(prefix))
}

/// The name of the bucket of presence entries of `prefix` (no max age:
/// entries count while their process is alive).
pub(super) fn entries_bucket_name(prefix: &str) -> String {
    format!("tower-channels-members-{}", escape(prefix))
}

/// The name of the bucket of named group members of `prefix` (max age =
/// the membership's expiry).
pub(super) fn groups_bucket_name(prefix: &str) -> String {
    format!("tower-channels-groups-{}", escape(prefix))
}

/// The key listing the named members of `group`: JSON `{channel: added}`
/// (seconds since the Unix epoch when it was added or renewed).
fn named_key(group: &str) -> String {
    format!("{group}.=n")
}

/// Named members of a group, as stored.
type NamedMembers = HashMap<String, u64>;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The stream of a KV bucket as async-nats would make it (its own helper
/// asks for account details a 2.9 server lacks).
fn bucket_config(name: &str, max_age: Duration) -> stream::Config {
    stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage: StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: DiscardPolicy::New,
        ..Default::default()
    }
}

/// `name` as one KV key token (URL-safe base64: no `.`, no `!`).
fn token(name: &str) -> String {
    URL_SAFE_NO_PAD.encode(name)
}

#[cfg(test)]
fn untoken(token: &str) -> Option<String> {
    String::from_utf8(URL_SAFE_NO_PAD.decode(token).ok()?).ok()
}

/// The key of user `user`'s entries in `group`: `{group}.=u.{user}` (the
/// user id as a [`token`]); its value is JSON `[[process, channel,
/// entry], ...]`, `[]` once every connection left. Group names cannot
/// contain `=`, so `{group}.=u.` never is a prefix of another group's keys.
fn user_key(group: &str, user: &str) -> String {
    format!("{group}.=u.{}", token(user))
}

/// The key listing the processes that wrote presence in `group`: JSON
/// `[process, ...]`.
fn processes_key(group: &str) -> String {
    format!("{group}.=procs")
}

/// The entries of one user in one group, as stored.
type UserEntries = Vec<(String, String, String)>;

/// Compare-and-set attempts on one key before giving up (contention
/// comes from one user's connections, or one group's processes).
const CAS_ATTEMPTS: u32 = 64;

/// The liveness of `process` in `group` (in the TTL bucket).
fn alive_key(group: &str, process: &str) -> String {
    format!("{group}.=alive.{process}")
}

/// The KV key of the claim `key` in `group` (in the TTL bucket).
fn claim_key(group: &str, key: &str) -> String {
    format!("{group}.=gone.{key}")
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
    /// The presence entries (present when `presence` is).
    entries: Option<kv::Store>,
    /// The named group members: one key per group, max age = the expiry.
    named: kv::Store,
    /// How long a named channel stays a member unless added again.
    named_expiry: Duration,
    /// The revision of each liveness key this process wrote last.
    alive: Mutex<HashMap<String, u64>>,
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
        named_expiry: Duration,
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
        let (presence, entries) = match presence {
            None => (None, None),
            Some(config) => {
                let mut opened = Vec::new();
                for (name, max_age) in [
                    (bucket_name(prefix), config.time_limit()),
                    (entries_bucket_name(prefix), Duration::ZERO),
                ] {
                    let config = bucket_config(&name, max_age);
                    js.create_or_update_stream(config.clone())
                        .await
                        .map_err(|e| setup("creating a presence bucket", e))?;
                    configs.push(config);
                    opened.push(
                        js.get_key_value(name)
                            .await
                            .map_err(|e| setup("opening a presence bucket", e))?,
                    );
                }
                let entries = opened.pop();
                (opened.pop(), entries)
            }
        };
        let name = groups_bucket_name(prefix);
        let config = bucket_config(&name, named_expiry);
        js.create_or_update_stream(config.clone())
            .await
            .map_err(|e| setup("creating the named group members bucket", e))?;
        configs.push(config);
        let named = js
            .get_key_value(name)
            .await
            .map_err(|e| setup("opening the named group members bucket", e))?;
        Ok(Self {
            prefix: prefix.to_owned(),
            client,
            js,
            history,
            presence,
            entries,
            named,
            named_expiry,
            alive: Mutex::default(),
            configs,
            last: Mutex::default(),
        })
    }

    /// Makes the history stream and presence bucket again if NATS lost
    /// them (a restart without its store): the histories start new epochs
    /// and each process writes its presence again on its next refresh.
    async fn recreate(&self) {
        lock(&self.last).clear();
        lock(&self.alive).clear();
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

    /// The TTL bucket (liveness, claims) and the entries bucket.
    fn presence(&self) -> Result<(&kv::Store, &kv::Store), TransportError> {
        self.check_connected()?;
        self.presence
            .as_ref()
            .zip(self.entries.as_ref())
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

    /// The keys under `filter` (a subject filter relative to `bucket`'s
    /// prefix) and their values: an ephemeral pull consumer, fetched
    /// without waiting. A NATS 2.9 consumer may stall when a key it has
    /// not delivered yet is purged meanwhile: a fetch that delivers
    /// nothing within `wait` while keys are pending starts the listing
    /// again with a longer wait (within the layer's timeout).
    async fn keys(
        &self,
        bucket: &kv::Store,
        filter: &str,
        what: &str,
    ) -> Result<Vec<(String, Bytes)>, TransportError> {
        let mut wait = FETCH_WAIT;
        loop {
            if let Some(keys) = self.keys_once(bucket, filter, what, wait).await? {
                return Ok(keys);
            }
            tracing::debug!(filter, "a presence listing stalled; listing again");
            wait *= 2;
        }
    }

    async fn keys_once(
        &self,
        bucket: &kv::Store,
        filter: &str,
        what: &str,
        wait: Duration,
    ) -> Result<Option<Vec<(String, Bytes)>>, TransportError> {
        let consumer = bucket
            .stream
            .create_consumer(pull::Config {
                filter_subject: format!("{}{filter}", bucket.prefix),
                // One message per key (the stream keeps one per subject).
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::None,
                replay_policy: ReplayPolicy::Instant,
                inactive_threshold: CONSUMER_IDLE,
                ..Default::default()
            })
            .await
            .map_err(|e| failed(what, e))?;
        let mut keys = Vec::new();
        let listed = async {
            let mut pending = consumer.cached_info().num_pending;
            while pending > 0 {
                let mut batch = consumer
                    .fetch()
                    .max_messages(FETCH_BATCH)
                    .expires(wait)
                    .messages()
                    .await
                    .map_err(|e| failed(what, e))?;
                let mut got = 0;
                while let Some(message) = batch.next().await {
                    let message = message.map_err(|e| failed(what, e))?;
                    got += 1;
                    pending = message.info().map_err(|e| failed(what, e))?.pending;
                    let deleted = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("KV-Operation"))
                        .is_some();
                    if let Some(key) = message.subject.strip_prefix(&bucket.prefix) {
                        if !deleted {
                            keys.push((key.to_owned(), message.payload.clone()));
                        }
                    }
                }
                if got == 0 {
                    return Ok(false); // Stalled.
                }
            }
            Ok::<_, TransportError>(true)
        }
        .await;
        // Not waited for: the server also drops it once idle.
        let (stream, name) = (bucket.stream.clone(), consumer.cached_info().name.clone());
        tokio::spawn(async move {
            let _ = stream.delete_consumer(&name).await;
        });
        Ok(listed?.then_some(keys))
    }

    /// Reads `key` of the entries bucket: its revision (`None`: never
    /// written) and its JSON value (empty when unreadable).
    async fn read_json<V: serde::de::DeserializeOwned + Default>(
        &self,
        key: &str,
        what: &str,
    ) -> Result<(Option<u64>, V), TransportError> {
        let (_, entries) = self.presence()?;
        Self::read_json_in(entries, key, what).await
    }

    /// Reads `key` of `bucket` (see [`read_json`](Self::read_json)).
    async fn read_json_in<V: serde::de::DeserializeOwned + Default>(
        bucket: &kv::Store,
        key: &str,
        what: &str,
    ) -> Result<(Option<u64>, V), TransportError> {
        match bucket.entry(key).await.map_err(|e| failed(what, e))? {
            None => Ok((None, V::default())),
            Some(entry) => {
                let value = match entry.operation {
                    kv::Operation::Put => {
                        serde_json::from_slice(&entry.value).unwrap_or_else(|e| {
                            tracing::warn!(key, "a malformed presence key: {e}");
                            V::default()
                        })
                    }
                    _ => V::default(),
                };
                Ok((Some(entry.revision), value))
            }
        }
    }

    /// Changes the JSON value of `key` in the entries bucket with
    /// `change` (which answers false when there is nothing to change),
    /// compare-and-set: written only over the revision it read.
    async fn change_json<V>(
        &self,
        key: &str,
        what: &str,
        change: impl FnMut(&mut V) -> bool,
    ) -> Result<(), TransportError>
    where
        V: serde::de::DeserializeOwned + serde::Serialize + Default,
    {
        let (_, entries) = self.presence()?;
        Self::change_json_in(entries, key, what, change).await
    }

    /// Changes `key` of `bucket` (see [`change_json`](Self::change_json)).
    async fn change_json_in<V>(
        entries: &kv::Store,
        key: &str,
        what: &str,
        mut change: impl FnMut(&mut V) -> bool,
    ) -> Result<(), TransportError>
    where
        V: serde::de::DeserializeOwned + serde::Serialize + Default,
    {
        for _ in 0..CAS_ATTEMPTS {
            let (revision, mut value) = Self::read_json_in::<V>(entries, key, what).await?;
            if !change(&mut value) {
                return Ok(());
            }
            let bytes: Bytes = serde_json::to_vec(&value)
                .map_err(|e| failed(what, e))?
                .into();
            let written = match revision {
                None => {
                    entries
                        .create(key, bytes)
                        .await
                        .map(|_| true)
                        .or_else(|e| match e.kind() {
                            kv::CreateErrorKind::AlreadyExists => Ok(false),
                            _ => Err(failed(what, e)),
                        })
                }
                Some(revision) => entries
                    .update(key, bytes, revision)
                    .await
                    .map(|_| true)
                    .or_else(|e| match e.kind() {
                        kv::UpdateErrorKind::WrongLastRevision => Ok(false),
                        _ => Err(failed(what, e)),
                    }),
            };
            if written? {
                return Ok(());
            }
        }
        Err(failed(what, "other writers kept changing the key"))
    }

    /// Decoded user entries as the mesh's, with which processes are alive.
    async fn listing(
        &self,
        group: &str,
        users: Vec<UserEntries>,
    ) -> Result<PresenceListing, TransportError> {
        let mut listing = PresenceListing::default();
        for (process, channel, entry) in users.into_iter().flatten() {
            listing.entries.push(StoredEntry {
                process,
                channel,
                entry: entry.into(),
            });
        }
        let processes: std::collections::HashSet<&str> =
            listing.entries.iter().map(|e| e.process.as_str()).collect();
        listing.alive = self.alive_of(group, processes.into_iter()).await?;
        Ok(listing)
    }

    /// Every user key of `group` (one consumer).
    async fn users(&self, group: &str) -> Result<Vec<(String, UserEntries)>, TransportError> {
        let what = format!("reading the presence of {group:?}");
        let (_, entries) = self.presence()?;
        let filter = format!("{group}.=u.>");
        Ok(self
            .keys(entries, &filter, &what)
            .await?
            .into_iter()
            .map(|(key, value)| {
                let users = serde_json::from_slice(&value).unwrap_or_else(|e| {
                    tracing::warn!(key, "a malformed presence key: {e}");
                    Vec::new()
                });
                (key, users)
            })
            .collect())
    }

    /// Which of `processes` are alive in `group` (one read each, at once).
    async fn alive_of<'p>(
        &self,
        group: &str,
        processes: impl Iterator<Item = &'p str>,
    ) -> Result<std::collections::HashSet<String>, TransportError> {
        let what = format!("reading the presence of {group:?}");
        let (bucket, _) = self.presence()?;
        let what = &what;
        let checks = processes.map(|process| async move {
            match bucket.get(alive_key(group, process)).await {
                Ok(found) => Ok(found.map(|_| process.to_owned())),
                Err(e) => Err(failed(what, e)),
            }
        });
        let mut alive = std::collections::HashSet::new();
        for found in futures_util::future::join_all(checks).await {
            alive.extend(found?);
        }
        Ok(alive)
    }

    async fn alive(&self, group: &str, process: &str) -> Result<bool, TransportError> {
        let what = format!("refreshing the presence of {group:?}");
        let (bucket, _) = self.presence()?;
        let key = alive_key(group, process);
        let revision = lock(&self.alive).get(&key).copied();
        if let Some(revision) = revision {
            match bucket.update(&key, Bytes::new(), revision).await {
                Ok(revision) => {
                    lock(&self.alive).insert(key, revision);
                    return Ok(true);
                }
                // Expired, or lost with NATS's store.
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                Err(e) => tracing::debug!(group, "refreshing presence failed: {e}"),
            }
        }
        let revision = match bucket.put(&key, Bytes::new()).await {
            Ok(revision) => revision,
            Err(e) => {
                // The bucket may be gone with NATS's store: make it again
                // and try once more.
                tracing::debug!(group, "writing presence failed: {e}");
                self.recreate().await;
                bucket
                    .put(&key, Bytes::new())
                    .await
                    .map_err(|e| failed(&what, e))?
            }
        };
        lock(&self.alive).insert(key, revision);
        self.change_json(
            &processes_key(group),
            &what,
            |processes: &mut Vec<String>| {
                let missing = !processes.iter().any(|p| p == process);
                if missing {
                    processes.push(process.to_owned());
                }
                missing
            },
        )
        .await?;
        Ok(false)
    }

    /// Removes `process`'s liveness and its name from `group`'s processes.
    async fn retire(&self, group: &str, process: &str) -> Result<(), TransportError> {
        let what = format!("removing the presence of {group:?}");
        let (bucket, _) = self.presence()?;
        let key = alive_key(group, process);
        lock(&self.alive).remove(&key);
        bucket
            .stream
            .purge()
            .filter(format!("{}{key}", bucket.prefix))
            .await
            .map_err(|e| failed(&what, e))?;
        self.forget_process(group, process, &what).await
    }

    async fn forget_process(
        &self,
        group: &str,
        process: &str,
        what: &str,
    ) -> Result<(), TransportError> {
        self.change_json(
            &processes_key(group),
            what,
            |processes: &mut Vec<String>| {
                let before = processes.len();
                processes.retain(|p| p != process);
                processes.len() != before
            },
        )
        .await
    }

    /// Removes `process`'s entries from every user key of `group`; with
    /// `unless_alive`, each key is changed only over the revision read
    /// before checking that the process is not alive (so entries it writes
    /// once alive again are kept).
    async fn remove_entries_of(
        &self,
        group: &str,
        process: &str,
        unless_alive: bool,
    ) -> Result<bool, TransportError> {
        let what = format!("removing the presence of {group:?}");
        for (key, users) in self.users(group).await? {
            if !users.iter().any(|(p, _, _)| p == process) {
                continue;
            }
            let mut alive = false;
            for _ in 0..CAS_ATTEMPTS {
                let (revision, mut users) = self.read_json::<UserEntries>(&key, &what).await?;
                let Some(revision) = revision else {
                    break;
                };
                if unless_alive
                    && !self
                        .alive_of(group, [process].into_iter())
                        .await?
                        .is_empty()
                {
                    alive = true;
                    break;
                }
                let before = users.len();
                users.retain(|(p, _, _)| p != process);
                if users.len() == before {
                    break;
                }
                let bytes: Bytes = serde_json::to_vec(&users)
                    .map_err(|e| failed(&what, e))?
                    .into();
                let (_, entries) = self.presence()?;
                match entries.update(&key, bytes, revision).await {
                    Ok(_) => break,
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                    Err(e) => return Err(failed(&what, e)),
                }
            }
            if alive {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Purges this prefix's history stream and buckets (each prefix has
    /// its own, see the module docs), then forgets the cached offsets and
    /// liveness revisions (an append in flight may have cached one).
    async fn clear_all(&self) -> Result<(), TransportError> {
        self.check_connected()?;
        let streams = self
            .history
            .iter()
            .chain(self.presence.iter().map(|bucket| &bucket.stream))
            .chain(self.entries.iter().map(|bucket| &bucket.stream))
            .chain(std::iter::once(&self.named.stream));
        let mut lost = false;
        for stream in streams {
            match stream.purge().await {
                Ok(_) => {}
                // Lost with NATS's store: empty already.
                Err(e)
                    if matches!(e.kind(), stream::PurgeErrorKind::JetStream(ref js)
                        if js.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
                {
                    lost = true;
                }
                Err(e) => return Err(failed("emptying the JetStream store", e)),
            }
        }
        if lost {
            self.recreate().await;
        }
        lock(&self.last).clear();
        lock(&self.alive).clear();
        Ok(())
    }

    async fn processes(&self, group: &str) -> Result<Vec<(String, bool)>, TransportError> {
        let what = format!("reading the presence of {group:?}");
        let (_, recorded) = self
            .read_json::<Vec<String>>(&processes_key(group), &what)
            .await?;
        let alive = self
            .alive_of(group, recorded.iter().map(String::as_str))
            .await?;
        Ok(recorded
            .into_iter()
            .map(|process| {
                let live = alive.contains(&process);
                (process, live)
            })
            .collect())
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

    fn presence_add<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
        user: &'a str,
        channel: &'a str,
        entry: Bytes,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let what = format!("writing the presence of {group:?}");
            let entry = String::from_utf8_lossy(&entry).into_owned();
            self.change_json(&user_key(group, user), &what, |users: &mut UserEntries| {
                users.retain(|(p, c, _)| !(p == process && c == channel));
                users.push((process.to_owned(), channel.to_owned(), entry.clone()));
                true
            })
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
        Box::pin(async move {
            let what = format!("removing the presence of {group:?}");
            self.change_json(&user_key(group, user), &what, |users: &mut UserEntries| {
                let before = users.len();
                users.retain(|(p, c, _)| !(p == process && c == channel));
                users.len() != before
            })
            .await
        })
    }

    fn presence_alive<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
        _ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, TransportError>> {
        // The TTL bucket's max age is the TTL (set when it was opened).
        Box::pin(self.alive(group, process))
    }

    fn presence_retire<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(self.retire(group, process))
    }

    fn presence_drop<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            self.remove_entries_of(group, process, false).await?;
            self.retire(group, process).await
        })
    }

    fn presence_collect<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            if self.remove_entries_of(group, process, true).await? {
                let what = format!("removing stopped presence in {group:?}");
                self.forget_process(group, process, &what).await?;
            }
            Ok(())
        })
    }

    fn presence_list<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<PresenceListing, TransportError>> {
        Box::pin(async move {
            let users = self.users(group).await?;
            self.listing(group, users.into_iter().map(|(_, u)| u).collect())
                .await
        })
    }

    fn presence_user<'a>(
        &'a self,
        group: &'a str,
        user: &'a str,
    ) -> BoxFuture<'a, Result<PresenceListing, TransportError>> {
        Box::pin(async move {
            let what = format!("reading the presence of {group:?}");
            let (_, entries) = self
                .read_json::<UserEntries>(&user_key(group, user), &what)
                .await?;
            self.listing(group, vec![entries]).await
        })
    }

    fn presence_processes<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, bool)>, TransportError>> {
        Box::pin(self.processes(group))
    }

    fn named_add<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
        _expiry: Duration,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        // The bucket's max age is the expiry (set when it was opened): the
        // key goes that long after its last change.
        Box::pin(async move {
            self.check_connected()?;
            let what = format!("adding {channel:?} to {group:?}");
            let now = unix_now();
            let expiry = self.named_expiry.as_secs();
            Self::change_json_in(
                &self.named,
                &named_key(group),
                &what,
                |members: &mut NamedMembers| {
                    members.retain(|_, added| added.saturating_add(expiry) > now);
                    members.insert(channel.to_owned(), now);
                    true
                },
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
            self.check_connected()?;
            let what = format!("removing {channel:?} from {group:?}");
            Self::change_json_in(
                &self.named,
                &named_key(group),
                &what,
                |members: &mut NamedMembers| members.remove(channel).is_some(),
            )
            .await
        })
    }

    fn named_members<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, TransportError>> {
        Box::pin(async move {
            self.check_connected()?;
            let what = format!("reading the named members of {group:?}");
            let (_, members) =
                Self::read_json_in::<NamedMembers>(&self.named, &named_key(group), &what).await?;
            let (now, expiry) = (unix_now(), self.named_expiry.as_secs());
            let mut members: Vec<String> = members
                .into_iter()
                .filter(|(_, added)| added.saturating_add(expiry) > now)
                .map(|(channel, _)| channel)
                .collect();
            members.sort();
            Ok(members)
        })
    }

    fn presence_claim<'a>(
        &'a self,
        group: &'a str,
        key: &'a str,
        _ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, TransportError>> {
        // Creating a key succeeds once (expected last subject sequence 0);
        // it expires with the TTL bucket's max age.
        Box::pin(async move {
            let (bucket, _) = self.presence()?;
            match bucket.create(claim_key(group, key), Bytes::new()).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(failed(
                    &format!("claiming a presence leave in {group:?}"),
                    e,
                )),
            }
        })
    }

    fn clear(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(self.clear_all())
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
        assert_eq!(
            alive_key("room.1", "specific.x"),
            "room.1.=alive.specific.x"
        );
        let key = user_key("room.1", "ada lovelace!");
        let tokens: Vec<&str> = key.split('.').collect();
        assert_eq!(tokens[..3], ["room", "1", "=u"]);
        assert_eq!(tokens.len(), 4);
        assert_eq!(untoken(tokens[3]).as_deref(), Some("ada lovelace!"));
        assert!(key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=.".contains(c)));
        assert_eq!(untoken("!"), None);
        assert_eq!(named_key("room.1"), "room.1.=n");
        let mut h = HeaderMap::new();
        h.insert(EPOCH, "e1");
        h.insert(OFFSET, "7");
        assert_eq!(position_of(Some(&h)), Some(StreamPosition::new(7, "e1")));
        h.insert(OFFSET, "x");
        assert_eq!(position_of(Some(&h)), None);
        assert_eq!(position_of(None), None);
    }
}
