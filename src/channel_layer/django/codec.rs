//! channels_redis' message format: a Django event dict, serialized with
//! msgpack (`use_bin_type=True`) or JSON, optionally Fernet-encrypted, after
//! `random_prefix_length` random bytes (core layer only).

use std::borrow::Cow;

use base64::Engine as _;
use bytes::Bytes;
use rmpv::Value;
use sha2::{Digest, Sha256};

use super::{BackendError, SerializerFormat};
use crate::channel_layer::{names, Event, EventCodecError};

/// The key channels_redis stores the destination channel(s) under.
pub(super) const ASGI_CHANNEL: &str = "__asgi_channel__";
const TYPE: &str = "type";
/// Nesting depth accepted from the wire (a peer cannot overflow our stack).
const MAX_DEPTH: usize = 64;

/// Where a message read from a process key goes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Target {
    /// No `__asgi_channel__` (a named channel's message).
    None,
    /// A direct send: one channel.
    One(String),
    /// A group send: every channel of this process in the group.
    Many(Vec<String>),
}

/// A decoded Django message.
#[derive(Debug)]
pub(super) struct Decoded {
    pub(super) event: Event,
    pub(super) target: Target,
}

/// An event as the fields of a Django dict, ready to serialize (once per
/// destination key, each with its own `__asgi_channel__`).
#[derive(Debug)]
pub(super) struct Dict {
    fields: Vec<(Value, Value)>,
}

impl Dict {
    /// `{"type": kind, **body}`. Fails for WebSocket-message events (no dict
    /// form) and bodies that are not maps with string keys.
    pub(super) fn from_event(event: &Event) -> Result<Self, EventCodecError> {
        let mut fields = vec![(Value::from(TYPE), Value::from(event.kind()))];
        if let Some(body) = event.body_msgpack()? {
            let value = read_msgpack(&body)?;
            let Value::Map(entries) = value else {
                return Err(EventCodecError::new(format_args!(
                    "event {:?}: the body must serialize to a map (a struct or map) to become a \
                     Django event dict, not {}",
                    event.kind(),
                    kind_of(&value)
                )));
            };
            for (k, v) in entries {
                match k.as_str() {
                    Some(TYPE | ASGI_CHANNEL) => {
                        return Err(EventCodecError::new(format_args!(
                            "event {:?}: the body may not have a field named {k}",
                            event.kind()
                        )))
                    }
                    Some(_) => fields.push((k, v)),
                    None => {
                        return Err(EventCodecError::new(format_args!(
                            "event {:?}: Django event dicts have string keys, not {k}",
                            event.kind()
                        )))
                    }
                }
            }
        }
        Ok(Dict { fields })
    }
}

/// Fernet keys as channels_redis derives them: `urlsafe_b64(sha256(key))`.
struct Crypter {
    /// The first key encrypts; every key is tried to decrypt (MultiFernet).
    keys: Vec<fernet::Fernet>,
}

impl std::fmt::Debug for Crypter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crypter")
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// Serializes and deserializes messages the way one channels_redis layer does.
#[derive(Debug)]
pub(super) struct Codec {
    format: SerializerFormat,
    random_prefix: usize,
    crypter: Option<Crypter>,
    /// Fernet TTL (expiry + 10 s, as channels_redis); `None`: no TTL check.
    ttl: Option<u64>,
}

impl Codec {
    pub(super) fn new(
        format: SerializerFormat,
        random_prefix: usize,
        keys: &[Vec<u8>],
        ttl: Option<u64>,
    ) -> Result<Self, BackendError> {
        let crypter = if keys.is_empty() {
            None
        } else {
            let keys = keys
                .iter()
                .map(|key| {
                    let digest = Sha256::digest(key);
                    let formatted = base64::engine::general_purpose::URL_SAFE.encode(digest);
                    fernet::Fernet::new(&formatted).ok_or(BackendError::FernetKey)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(Crypter { keys })
        };
        Ok(Codec {
            format,
            random_prefix,
            crypter,
            ttl,
        })
    }

    /// Serializes `dict` with `__asgi_channel__` set to `target`.
    pub(super) fn serialize(
        &self,
        dict: &Dict,
        target: &Target,
    ) -> Result<Vec<u8>, EventCodecError> {
        let mut fields: Vec<(Value, Value)> = Vec::with_capacity(dict.fields.len() + 1);
        fields.extend(dict.fields.iter().cloned());
        match target {
            Target::None => {}
            Target::One(c) => fields.push((Value::from(ASGI_CHANNEL), Value::from(c.as_str()))),
            Target::Many(cs) => fields.push((
                Value::from(ASGI_CHANNEL),
                Value::Array(cs.iter().map(|c| Value::from(c.as_str())).collect()),
            )),
        }
        let map = Value::Map(fields);
        let plain = match self.format {
            SerializerFormat::Msgpack => {
                let mut out = Vec::with_capacity(64);
                rmpv::encode::write_value(&mut out, &map).map_err(EventCodecError::new)?;
                out
            }
            SerializerFormat::Json => serde_json::to_vec(&map).map_err(EventCodecError::new)?,
        };
        let body = match &self.crypter {
            Some(c) => Cow::Owned(c.keys[0].encrypt(&plain).into_bytes()),
            None => Cow::Borrowed(&plain),
        };
        let mut out = Vec::with_capacity(self.random_prefix + body.len());
        random_bytes(self.random_prefix, &mut out);
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decodes a message from Redis into an [`Event`] (kind from `type`, body
    /// the other fields as a msgpack map) and its `__asgi_channel__`.
    pub(super) fn deserialize(&self, bytes: &[u8]) -> Result<Decoded, EventCodecError> {
        let bytes = bytes
            .get(self.random_prefix..)
            .ok_or_else(|| EventCodecError::new("message shorter than the random prefix"))?;
        let decrypted;
        let bytes = match &self.crypter {
            None => bytes,
            Some(c) => {
                let token = std::str::from_utf8(bytes)
                    .map_err(|_| EventCodecError::new("encrypted message is not a Fernet token"))?;
                decrypted = c
                    .keys
                    .iter()
                    .find_map(|k| match self.ttl {
                        Some(ttl) => k.decrypt_with_ttl(token, ttl).ok(),
                        None => k.decrypt(token).ok(),
                    })
                    .ok_or_else(|| {
                        EventCodecError::new(
                            "cannot decrypt message (wrong symmetric key, or expired)",
                        )
                    })?;
                &decrypted[..]
            }
        };
        let value = match self.format {
            SerializerFormat::Msgpack => read_msgpack(bytes)?,
            SerializerFormat::Json => serde_json::from_slice::<Value>(bytes)
                .map_err(|e| EventCodecError::new(format_args!("malformed JSON message: {e}")))?,
        };
        let Value::Map(entries) = value else {
            return Err(EventCodecError::new(format_args!(
                "a Django message is a dict, not {}",
                kind_of(&value)
            )));
        };
        let mut kind = None;
        let mut target = Target::None;
        let mut body = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            match k.as_str() {
                Some(TYPE) => match v {
                    Value::String(s) => match s.into_str() {
                        Some(s) => kind = Some(s),
                        None => return Err(EventCodecError::new("message type is not UTF-8")),
                    },
                    other => {
                        return Err(EventCodecError::new(format_args!(
                            "message type must be a string, not {}",
                            kind_of(&other)
                        )))
                    }
                },
                Some(ASGI_CHANNEL) => target = read_target(v)?,
                _ => body.push((k, v)),
            }
        }
        let kind = kind.ok_or_else(|| EventCodecError::new("message has no \"type\""))?;
        let mut encoded = Vec::with_capacity(bytes.len());
        rmpv::encode::write_value(&mut encoded, &Value::Map(body)).map_err(EventCodecError::new)?;
        Ok(Decoded {
            event: Event::from_msgpack(kind, Bytes::from(encoded)),
            target,
        })
    }
}

fn read_target(v: Value) -> Result<Target, EventCodecError> {
    let bad = || EventCodecError::new("__asgi_channel__ must be a string or a list of strings");
    match v {
        Value::String(s) => s.into_str().map(Target::One).ok_or_else(bad),
        Value::Array(items) => items
            .into_iter()
            .map(|i| match i {
                Value::String(s) => s.into_str().ok_or_else(bad),
                _ => Err(bad()),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Target::Many),
        _ => Err(bad()),
    }
}

fn read_msgpack(mut bytes: &[u8]) -> Result<Value, EventCodecError> {
    let value = rmpv::decode::read_value_with_max_depth(&mut bytes, MAX_DEPTH)
        .map_err(|e| EventCodecError::new(format_args!("malformed msgpack message: {e}")))?;
    if !bytes.is_empty() {
        return Err(EventCodecError::new(
            "trailing bytes after the msgpack message",
        ));
    }
    Ok(value)
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "a boolean",
        Value::Integer(_) => "an integer",
        Value::F32(_) | Value::F64(_) => "a float",
        Value::String(_) => "a string",
        Value::Binary(_) => "bytes",
        Value::Array(_) => "a list",
        Value::Map(_) => "a map",
        Value::Ext(..) => "an extension value",
    }
}

/// `n` random bytes (uniqueness inside a sorted set is what they are for,
/// as in channels_redis; not secrecy).
fn random_bytes(n: usize, out: &mut Vec<u8>) {
    let mut left = n;
    while left > 0 {
        let chunk = names::random_u64().to_le_bytes();
        let take = left.min(8);
        out.extend_from_slice(&chunk[..take]);
        left -= take;
    }
}

/// channels_redis' `_consistent_hash`: `crc32(value) & 0xFFF` scaled onto
/// `ring_size` hosts.
pub(super) fn consistent_hash(value: &str, ring_size: usize) -> usize {
    if ring_size <= 1 {
        return 0;
    }
    let big = (crc32fast::hash(value.as_bytes()) & 0xFFF) as f64;
    let divisor = 4096.0 / ring_size as f64;
    ((big / divisor) as usize).min(ring_size - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct ChatMessage {
        message: String,
    }

    fn codec(prefix: usize) -> Codec {
        Codec::new(SerializerFormat::Msgpack, prefix, &[], None).unwrap()
    }

    #[test]
    fn event_to_dict_and_back() {
        let c = codec(12);
        let e = Event::new(
            "chat.message",
            ChatMessage {
                message: "hi".into(),
            },
        );
        let bytes = c
            .serialize(
                &Dict::from_event(&e).unwrap(),
                &Target::Many(vec!["a!b".into()]),
            )
            .unwrap();
        // The dict after the 12 random bytes, as Python's msgpack.packb writes it.
        let mut expected = Vec::new();
        rmpv::encode::write_value(
            &mut expected,
            &Value::Map(vec![
                (Value::from("type"), Value::from("chat.message")),
                (Value::from("message"), Value::from("hi")),
                (
                    Value::from("__asgi_channel__"),
                    Value::Array(vec![Value::from("a!b")]),
                ),
            ]),
        )
        .unwrap();
        assert_eq!(&bytes[12..], &expected[..]);
        let d = c.deserialize(&bytes).unwrap();
        assert_eq!(d.target, Target::Many(vec!["a!b".into()]));
        assert_eq!(d.event.kind(), "chat.message");
        assert_eq!(d.event.body::<ChatMessage>().unwrap().message, "hi");
    }

    #[test]
    fn text_and_non_map_bodies_have_no_dict_form() {
        assert!(Dict::from_event(&Event::text("x", "hi")).is_err());
        assert!(Dict::from_event(&Event::new("x", 5u32)).is_err());
        assert!(Dict::from_event(&Event::bare("x")).is_ok());
    }

    #[test]
    fn bad_input_is_an_error() {
        let c = codec(0);
        for bad in [
            &b""[..],
            b"\x93\x01\x02\x03",
            b"\x81\xa4type\x05",
            b"\x80",
            b"\xc1",
        ] {
            assert!(c.deserialize(bad).is_err(), "{bad:?}");
        }
        assert!(codec(12).deserialize(b"short").is_err());
    }

    #[test]
    fn json_and_fernet_roundtrip() {
        let c = Codec::new(SerializerFormat::Json, 4, &[b"secret".to_vec()], Some(70)).unwrap();
        let e = Event::new(
            "a.b",
            ChatMessage {
                message: "é".into(),
            },
        );
        let bytes = c
            .serialize(&Dict::from_event(&e).unwrap(), &Target::One("x!y".into()))
            .unwrap();
        let d = c.deserialize(&bytes).unwrap();
        assert_eq!(d.target, Target::One("x!y".into()));
        assert_eq!(d.event.body::<ChatMessage>().unwrap().message, "é");
        let other = Codec::new(SerializerFormat::Json, 4, &[b"other".to_vec()], None).unwrap();
        assert!(other.deserialize(&bytes).is_err());
    }

    #[test]
    fn hash_matches_channels_redis() {
        // Values from channels_redis.utils._consistent_hash.
        assert_eq!(consistent_hash("test", 1), 0);
        assert_eq!(consistent_hash("test", 3), 2);
        assert_eq!(consistent_hash("test", 2), 1);
        assert_eq!(consistent_hash("chat_lobby", 2), 1);
        assert_eq!(consistent_hash("chat_lobby", 3), 1);
        assert_eq!(consistent_hash("chat_lobby", 5), 2);
        assert_eq!(consistent_hash("specific.abc!", 2), 1);
    }
}
