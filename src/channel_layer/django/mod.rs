//! Channel layers that share groups with a running Django Channels app
//! through channels_redis 4.x (feature `django`).
//!
//! A Rust service built on tower-channels and a Django app can serve the
//! same rooms: a Rust consumer and a Django consumer in one group see each
//! other's messages, a Django view or Celery task calling
//! `async_to_sync(get_channel_layer().group_send)(...)` reaches Rust sockets,
//! and a Rust `send` reaches a Django consumer's `channel_name`. Pick the
//! layer that matches the Django app's `CHANNEL_LAYERS["default"]["BACKEND"]`
//! and give it the same `CONFIG`:
//!
//! | Django `BACKEND` | tower-channels layer |
//! | --- | --- |
//! | `channels_redis.core.RedisChannelLayer` | [`DjangoChannelLayer`] |
//! | `channels_redis.pubsub.RedisPubSubChannelLayer` | [`DjangoPubSubChannelLayer`] |
//!
//! ```
//! use std::{sync::Arc, time::Duration};
//! use serde::{Deserialize, Serialize};
//! use tower_channels::channel_layer::django::{DjangoChannelLayer, DjangoConfig};
//! use tower_channels::channel_layer::{BoxError, ChannelLayer, Event};
//!
//! /// The Django tutorial's event: {"type": "chat.message", "message": "..."}
//! #[derive(Clone, Serialize, Deserialize)]
//! struct ChatMessage {
//!     message: String,
//! }
//!
//! async fn doc_main() -> Result<(), BoxError> {
//!     // CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
//!     //     "CONFIG": {"hosts": ["redis://127.0.0.1:6379"], "prefix": "asgi"}}}
//!     let config = DjangoConfig::new(["redis://127.0.0.1:6379"])
//!         .prefix("asgi")
//!         .capacity(100)
//!         .group_expiry(Duration::from_secs(86_400));
//!     let layer: Arc<dyn ChannelLayer> = Arc::new(DjangoChannelLayer::connect(&config).await?);
//!
//!     let mut inbox = layer.new_channel().await?;
//!     layer.group_add("chat_lobby", inbox.name()).await?;
//!     // Django consumers in "chat_lobby" get {"type": "chat.message", "message": "hi"}:
//!     let hi = ChatMessage { message: "hi".into() };
//!     layer.group_send("chat_lobby", Event::new("chat.message", hi)).await?;
//!     // ...and what Django sends arrives as an Event with a typed body:
//!     let event = inbox.recv().await?;
//!     let chat: ChatMessage = event.body()?;
//!     println!("{}: {}", event.kind(), chat.message);
//!     Ok(())
//! }
//! ```
//!
//! # Events and Django dicts
//!
//! A Django event is a dict with a `"type"` and fields. An incoming dict
//! becomes an [`Event`] whose [`kind`](Event::kind) is the `type` and whose
//! body is the other fields (without channels_redis' `__asgi_channel__`), so
//! [`Event::body`] decodes it into any serde type with those fields, or into
//! `serde_json::Value`. An outgoing `Event::new(kind, body)` becomes
//! `{"type": kind, **body}`: `body` must serialize to a map (a struct, a
//! `HashMap<String, _>`, a `serde_json::Value` object); strings are msgpack
//! `str`, `serde_bytes` fields `bin`, exactly what Python's
//! `msgpack.packb(use_bin_type=True)` writes. [`Event::bare`] becomes
//! `{"type": kind}`.
//!
//! Fast-lane events ([`Event::text`], [`Event::message`]) carry a ready
//! WebSocket frame that has no dict form: sending one anywhere Redis is
//! involved fails with [`ChannelLayerError::Codec`] (nothing is sent), and so
//! does a body that is not a map. Send `Event::new("chat.message",
//! ChatMessage { .. })` instead and let each consumer render the frame (as
//! Django consumers do). Sends to channels of the same layer instance
//! never touch Redis and keep any event as it is.
//!
//! # How the core layer moves events
//!
//! As channels_redis does: every channel of one layer instance is named
//! `specific.<client>!<n>` and its messages go to one sorted set per
//! process, `<prefix>specific.<client>!`, each message naming its
//! destination(s) in `__asgi_channel__`. A background task per host pops that
//! key (`ZPOPMIN` batches, `BZPOPMIN` when empty) and hands each event to its
//! local channels, so a Django `group_send` to 1,000 Rust sockets in one
//! process is one Redis message. Groups are sorted sets `<prefix>:group:<name>`
//! of channel names scored by join time, on the host that crc32 picks
//! (`_consistent_hash`). A Rust [`group_send`](super::ChannelLayer::group_send)
//! reads the members, delivers to its own in-process, and writes one message
//! per other process key or named channel (one Lua script per host, checking
//! each key's capacity); its [`GroupSendReport`](super::GroupSendReport)
//! counts local members, the keys written (`remote_receivers`) and, in
//! `dropped`, full local members plus the channels of keys at capacity.
//! Named channels (`receive("thumbnails")`) are the key `<prefix>thumbnails`,
//! read on every host.
//!
//! # Configuration
//!
//! [`DjangoConfig`] mirrors channels_redis' `CONFIG` names and defaults:
//! `hosts` (Redis URLs; `[]` means `redis://localhost:6379`), `prefix`
//! (`"asgi"`), `expiry` (60 s), `group_expiry` (1 day), `capacity` (100),
//! `channel_capacity` (glob patterns, first match wins),
//! `random_prefix_length` (12), `serializer_format` (msgpack or JSON) and
//! `symmetric_encryption_keys` (Fernet, derived from each key with SHA-256 as
//! channels_redis does). The pubsub layer, like channels_redis', uses only
//! `hosts`, `prefix`, `serializer_format` and the encryption keys for Redis;
//! `capacity` bounds its local queues.
//!
//! # Where tower-channels differs from channels_redis
//!
//! Deliberately, and only where it makes the shared system more reliable:
//!
//! * **Slow consumers are closed, not silently starved.** channels_redis
//!   drops the oldest buffered message when a consumer's buffer is full; here
//!   a full local queue drops the new event, counts it in
//!   [`ChannelLayerStats::dropped_full`] and marks the receiver as lagging,
//!   which closes the connection with
//!   [`SLOW_CONSUMER`](crate::message::close_code::SLOW_CONSUMER).
//! * **Local fast path.** Sends and group sends to channels of this layer
//!   instance are delivered in-process (Django writes them to Redis and reads
//!   them back); a group send writes to Redis only for the other processes'
//!   keys. The core layer still records every membership in Redis, so Django
//!   sees the Rust members.
//! * **Memberships are kept alive.** A background task re-adds this
//!   instance's memberships every [`DjangoConfig::group_refresh`] (default a
//!   quarter of `group_expiry`), so long-lived sockets do not fall out of
//!   groups after `group_expiry`; a dropped receiver leaves its groups at
//!   once (Django consumers call `group_discard` on disconnect).
//! * **Faults.** Every command has a timeout ([`DjangoConfig::timeout`], 2 s)
//!   instead of hanging, is retried once after a connection error (the first
//!   command after a Redis restart succeeds), and receive loops and
//!   subscriptions reconnect and re-subscribe by themselves.
//! * **Core, several hosts.** channels_redis' `send` to a process channel
//!   picks the host by hashing the *full* channel name while its receiver
//!   reads the host of the *non-local* name (django/channels#1492), so with
//!   several hosts some direct sends are never read. This layer sends to the
//!   host its receivers read, and its receive loop reads its process key on
//!   *every* host, so it also gets Django's misplaced sends. Group sends hash
//!   as channels_redis does.
//! * **Core, no in-flight backup queue.** channels_redis keeps popped
//!   messages in `<key>$inflight` so a cancelled `receive()` can put them
//!   back; the receive loop here is never cancelled mid-batch, so it pops with
//!   `ZPOPMIN` (up to 100 per round trip) after a blocking `BZPOPMIN`.
//! * **Core, `send` to a remote channel never fails with
//!   [`NoSuchChannel`](ChannelLayerError::NoSuchChannel)**: like Django, the
//!   layer cannot know whether another process still reads a key; such events
//!   expire after `expiry`.
//! * **Pubsub, channel names** are `<prefix>specific.<token>!<n>` (Django's
//!   have no `!`): one pattern subscription (`PSUBSCRIBE`) per process and host
//!   instead of one subscription per connection. Django publishes to them as
//!   to any channel name. A `send` that no subscriber receives fails with
//!   [`NoSuchChannel`](ChannelLayerError::NoSuchChannel) (channels_redis
//!   ignores `PUBLISH`'s count).
//! * **Pubsub, group sends** go through Redis for local members too, as in
//!   channels_redis (the format has no sender id to skip one's own message):
//!   [`GroupSendReport::local_members`](super::GroupSendReport) is 0 and
//!   `remote_receivers` counts the subscribed processes (this one included);
//!   full members are counted in the stats when the event arrives.
//! * **Pubsub, `group_add` of another process's channel** fails, as
//!   channels_redis' does (a pub/sub membership lives in the member's process).
//! * **`channel_capacity` patterns** are globs with `*` and `?` (fnmatch's
//!   `[...]` classes and compiled regexes are refused when the layer is built).
//! * **Hosts** are Redis URLs (`redis://`, `rediss://` with a redis-rs TLS
//!   feature, `redis://:password@host/db`); Sentinel dicts are not supported.

mod codec;
mod conn;
mod core;
mod pubsub;

pub(super) use super::local::lock;
use std::{
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub use self::{core::DjangoChannelLayer, pubsub::DjangoPubSubChannelLayer};
use super::{local::Counters, redis_keys::escape_glob, ChannelLayerError, DEFAULT_CAPACITY};
#[cfg(doc)]
use super::{ChannelLayerStats, Event};

/// channels_redis' default key prefix.
const DEFAULT_PREFIX: &str = "asgi";
/// channels_redis' default message expiry.
const DEFAULT_EXPIRY: Duration = Duration::from_secs(60);
/// channels_redis' default group expiry (one day).
const DEFAULT_GROUP_EXPIRY: Duration = Duration::from_secs(86_400);
/// channels_redis' default random prefix length of core messages.
const DEFAULT_RANDOM_PREFIX_LENGTH: usize = 12;
/// The default timeout of each Redis command.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// channels_redis' `serializer_format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SerializerFormat {
    /// `"msgpack"` (the default).
    #[default]
    Msgpack,
    /// `"json"`: bodies must be JSON-representable (no bytes).
    Json,
}

/// The configuration shared with the Django app's `CHANNEL_LAYERS` `CONFIG`;
/// see the [module docs](self#configuration).
#[derive(Clone)]
#[must_use = "pass it to DjangoChannelLayer::connect or DjangoPubSubChannelLayer::connect"]
pub struct DjangoConfig {
    hosts: Vec<String>,
    prefix: String,
    expiry: Duration,
    group_expiry: Duration,
    group_refresh: Option<Duration>,
    capacity: usize,
    channel_capacity: Vec<(String, usize)>,
    random_prefix_length: usize,
    serializer_format: SerializerFormat,
    symmetric_encryption_keys: Vec<Vec<u8>>,
    timeout: Duration,
}

impl fmt::Debug for DjangoConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DjangoConfig")
            .field("hosts", &self.hosts)
            .field("prefix", &self.prefix)
            .field("expiry", &self.expiry)
            .field("group_expiry", &self.group_expiry)
            .field("capacity", &self.capacity)
            .field("channel_capacity", &self.channel_capacity)
            .field("random_prefix_length", &self.random_prefix_length)
            .field("serializer_format", &self.serializer_format)
            .field(
                "symmetric_encryption_keys",
                &self.symmetric_encryption_keys.len(),
            )
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl DjangoConfig {
    /// channels_redis' defaults with these `hosts` (Redis URLs, in the same
    /// order as Django's: the order decides the consistent-hash ring).
    pub fn new<I, S>(hosts: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        DjangoConfig {
            hosts: hosts.into_iter().map(Into::into).collect(),
            prefix: DEFAULT_PREFIX.to_owned(),
            expiry: DEFAULT_EXPIRY,
            group_expiry: DEFAULT_GROUP_EXPIRY,
            group_refresh: None,
            capacity: DEFAULT_CAPACITY,
            channel_capacity: Vec::new(),
            random_prefix_length: DEFAULT_RANDOM_PREFIX_LENGTH,
            serializer_format: SerializerFormat::Msgpack,
            symmetric_encryption_keys: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// `prefix`: the start of every key and channel (default `"asgi"`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// `expiry`: how long a message waits in Redis (default 60 s).
    pub fn expiry(mut self, expiry: Duration) -> Self {
        self.expiry = expiry.max(Duration::from_secs(1));
        self
    }

    /// `group_expiry`: how long a membership lasts unless renewed (default one day).
    pub fn group_expiry(mut self, expiry: Duration) -> Self {
        self.group_expiry = expiry.max(Duration::from_secs(1));
        self
    }

    /// How often this instance re-adds its live memberships (default a
    /// quarter of `group_expiry`). Not a channels_redis setting.
    pub fn group_refresh(mut self, every: Duration) -> Self {
        self.group_refresh = Some(every.max(Duration::from_millis(100)));
        self
    }

    /// `capacity`: messages a channel holds (default 100). Django raises
    /// `ChannelFull` beyond it; so does [`send`](super::ChannelLayer::send).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// One `channel_capacity` entry: channels matching the glob `pattern`
    /// (`*`, `?`) hold `capacity` messages. Entries are tried in the order added.
    pub fn channel_capacity(mut self, pattern: impl Into<String>, capacity: usize) -> Self {
        self.channel_capacity
            .push((pattern.into(), capacity.max(1)));
        self
    }

    /// `random_prefix_length` of core messages (default 12; must match Django's).
    pub fn random_prefix_length(mut self, len: usize) -> Self {
        self.random_prefix_length = len;
        self
    }

    /// `serializer_format` (default msgpack; must match Django's).
    pub fn serializer_format(mut self, format: SerializerFormat) -> Self {
        self.serializer_format = format;
        self
    }

    /// `symmetric_encryption_keys`: messages are Fernet-encrypted with the
    /// first key and decrypted with any (as channels_redis' MultiFernet).
    pub fn symmetric_encryption_keys<I, K>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: AsRef<[u8]>,
    {
        self.symmetric_encryption_keys = keys.into_iter().map(|k| k.as_ref().to_vec()).collect();
        self
    }

    /// The timeout of each Redis command (default 2 s). Not a channels_redis setting.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(10));
        self
    }

    fn hosts(&self) -> Vec<String> {
        if self.hosts.is_empty() {
            vec!["redis://localhost:6379".to_owned()]
        } else {
            self.hosts.clone()
        }
    }

    fn refresh_interval(&self) -> Duration {
        self.group_refresh.unwrap_or(self.group_expiry / 4)
    }

    fn validate(&self) -> Result<(), ChannelLayerError> {
        if self.prefix.is_empty() {
            return Err(BackendError::EmptyPrefix.into());
        }
        for (pattern, _) in &self.channel_capacity {
            if pattern.contains('[') {
                return Err(BackendError::CapacityPattern(pattern.clone()).into());
            }
        }
        Ok(())
    }

    /// channels_redis' `get_capacity`.
    fn capacity_of(&self, channel: &str) -> usize {
        self.channel_capacity
            .iter()
            .find(|(p, _)| glob_match(p.as_bytes(), channel.as_bytes()))
            .map_or(self.capacity, |(_, c)| *c)
    }
}

/// fnmatch-style full match of `*` (any run) and `?` (one byte).
fn glob_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// A backend failure, wrapped in [`ChannelLayerError::Backend`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum BackendError {
    #[error("{0}")]
    Redis(String, #[source] redis::RedisError),
    #[error("{0} timed out after {1:?} (is Redis reachable?)")]
    Timeout(String, Duration),
    /// The key prefix is empty.
    #[error("the key prefix must not be empty")]
    EmptyPrefix,
    /// A `channel_capacity` pattern uses a glob channels_redis has but we
    /// do not.
    #[error("channel_capacity pattern {0:?}: only '*' and '?' globs are supported")]
    CapacityPattern(String),
    /// A symmetric encryption key that Fernet cannot use.
    #[error("cannot derive a Fernet key from a symmetric key")]
    FernetKey,
    /// The pubsub layer's process channel names would break the naming rules.
    #[error(
        "the pubsub layer's channel names start with the prefix {0:?}, which makes them invalid"
    )]
    PrefixMakesInvalidNames(String, #[source] crate::channel_layer::InvalidName),
    /// The pubsub layer only adds this process's channels to groups.
    #[error("the pubsub layer can only add channels of this process to groups, not {0:?}")]
    ForeignChannel(String),
    /// The layer's Pub/Sub task ended (the runtime is shutting down).
    #[error("the Redis subscriber task has stopped")]
    SubscriberStopped,
    /// The Pub/Sub task could not do what was asked.
    #[error("{0}")]
    Subscriber(
        String,
        #[source] crate::channel_layer::redis_pubsub::SubscriberError,
    ),
}

impl From<BackendError> for ChannelLayerError {
    fn from(e: BackendError) -> Self {
        ChannelLayerError::backend(e)
    }
}

fn now_secs_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + 'static>() {}

    #[test]
    fn layers_are_send_sync() {
        assert_send_sync::<DjangoChannelLayer>();
        assert_send_sync::<DjangoPubSubChannelLayer>();
        assert_send_sync::<DjangoConfig>();
    }

    #[test]
    fn globs() {
        assert!(glob_match(b"http.response!*", b"http.response!abc"));
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"a?c", b"abc"));
        assert!(!glob_match(b"a?c", b"abbc"));
        assert!(glob_match(b"*.send*", b"websocket.send!x"));
        assert!(!glob_match(b"http", b"http.request"));
        let c = DjangoConfig::new(["redis://x"])
            .capacity(7)
            .channel_capacity("http.*", 3)
            .channel_capacity("*", 5);
        assert_eq!(c.capacity_of("http.request"), 3);
        assert_eq!(c.capacity_of("other"), 5);
        assert!(DjangoConfig::new(["redis://x"])
            .channel_capacity("[ab]", 1)
            .validate()
            .is_err());
    }
}
