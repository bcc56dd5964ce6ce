use std::{
    any::Any,
    borrow::Cow,
    fmt,
    sync::{Arc, OnceLock},
};

use bytes::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::{error::EventCodecError, StreamPosition};
use crate::{
    message::{Message, Utf8Bytes},
    payload::SharedPayload,
};

type EncodeFn = fn(&(dyn Any + Send + Sync)) -> Result<Vec<u8>, EventCodecError>;

/// A message on a channel layer: a `type` used for dispatch (Django's
/// `"type": "chat.message"`) and a body.
///
/// Cloning is cheap (one reference count), so a group send hands every member
/// the same event.
///
/// The body is one of:
///
/// * **a typed value** ([`Event::new`]): on the in-memory layer it travels as
///   the value itself, never serialized; a receiver reads it back with
///   [`Event::body`] (a clone) or [`Event::downcast_ref`]. Backends that cross
///   processes serialize it once with MessagePack.
/// * **a WebSocket message** ([`Event::message`]), Phoenix's "fastlane": encode
///   the outgoing frame once and every member forwards the same bytes. The
///   default [`event`](crate::consumer::WebSocketConsumer::event) handler of
///   consumers forwards such events to the client unchanged.
/// * **nothing** ([`Event::bare`]).
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use tower_channels::channel_layer::Event;
///
/// #[derive(Clone, Serialize, Deserialize, PartialEq, Debug)]
/// struct Chat { message: String }
///
/// let event = Event::new("chat.message", Chat { message: "hi".into() });
/// assert_eq!(event.kind(), "chat.message");
/// assert_eq!(event.body::<Chat>().unwrap(), Chat { message: "hi".into() });
///
/// // Through the wire format, as a Redis backend would carry it:
/// let decoded = Event::decode(&event.encode().unwrap()).unwrap();
/// assert_eq!(decoded.body::<Chat>().unwrap().message, "hi");
/// ```
#[derive(Clone)]
pub struct Event {
    inner: Arc<Inner>,
    position: Option<StreamPosition>,
}

struct Inner {
    kind: Cow<'static, str>,
    payload: Payload,
    /// Delivered, not stored in a group's history ([`Event::ephemeral`]).
    ephemeral: bool,
    /// What [`Event::render_once`] made of this event, and the position it
    /// was made at. Boxed: most events are never rendered this way.
    rendered: OnceLock<Box<(Option<StreamPosition>, Event)>>,
}

#[derive(Clone)]
enum Payload {
    None,
    Typed {
        value: Arc<dyn Any + Send + Sync>,
        encode: EncodeFn,
        type_name: &'static str,
    },
    Encoded(Bytes),
    /// A fast-lane message. Text and binary carry a shared payload too: a
    /// group send hands every member the same one, so it is compressed once
    /// per negotiated parameter set and its bytes are written to each member
    /// without a copy.
    Message {
        message: Message,
        shared: Option<SharedPayload>,
    },
}

fn message_payload(message: Message) -> Payload {
    let shared = match &message {
        Message::Text(t) => Some(SharedPayload::text(t.clone())),
        Message::Binary(b) => Some(SharedPayload::binary(b.clone())),
        _ => None,
    };
    Payload::Message { message, shared }
}

fn encode_typed<T: Serialize + 'static>(
    v: &(dyn Any + Send + Sync),
) -> Result<Vec<u8>, EventCodecError> {
    let v = v
        .downcast_ref::<T>()
        .ok_or_else(|| EventCodecError::new("event body changed type"))?;
    rmp_serde::to_vec_named(v).map_err(EventCodecError::new)
}

/// [`EncodeFn`] of [`Event::tagged`]: the value's fields without its tag.
fn encode_untagged<T: Serialize + 'static>(
    v: &(dyn Any + Send + Sync),
) -> Result<Vec<u8>, EventCodecError> {
    let v = v
        .downcast_ref::<T>()
        .ok_or_else(|| EventCodecError::new("event body changed type"))?;
    let mut fields = match serde_json::to_value(v).map_err(EventCodecError::new)? {
        serde_json::Value::Object(fields) => fields,
        _ => return Err(EventCodecError::new("tagged event body is not a map")),
    };
    fields.remove("type");
    rmp_serde::to_vec_named(&fields).map_err(EventCodecError::new)
}

impl Event {
    /// An event with a typed body. On the in-memory layer the value is passed
    /// along as is; other backends serialize it once with MessagePack.
    pub fn new<T>(kind: impl Into<Cow<'static, str>>, body: T) -> Self
    where
        T: Serialize + Send + Sync + 'static,
    {
        Self::from_payload(
            kind,
            Payload::Typed {
                value: Arc::new(body),
                encode: encode_typed::<T>,
                type_name: std::any::type_name::<T>(),
            },
        )
    }

    /// An event made from a `#[serde(tag = "type")]` value: its kind is the
    /// tag (the variant's name, e.g. `#[serde(rename = "doc.edit")]`) and
    /// its body the other fields, so one enum both builds events and reads
    /// them back with [`decode_tagged`](Self::decode_tagged), and each kind
    /// string is written once. On the in-memory layer the value itself
    /// travels ([`downcast_ref`](Self::downcast_ref) borrows it); other
    /// backends send the fields without the tag, as for [`Event::new`].
    ///
    /// Fails when `value` does not serialize to a map with a string `type`
    /// (a struct, or an enum without `tag = "type"`).
    ///
    /// ```
    /// use serde::{Deserialize, Serialize};
    /// use tower_channels::channel_layer::Event;
    ///
    /// #[derive(Serialize, Deserialize, Debug, PartialEq)]
    /// #[serde(tag = "type")]
    /// enum DocEvent {
    ///     #[serde(rename = "doc.edit")]
    ///     Edit { text: String },
    ///     #[serde(rename = "doc.saved")]
    ///     Saved,
    /// }
    ///
    /// let event = Event::tagged(DocEvent::Edit { text: "hi".into() }).unwrap();
    /// assert_eq!(event.kind(), "doc.edit");
    /// assert_eq!(event.decode_tagged::<DocEvent>().unwrap(), DocEvent::Edit { text: "hi".into() });
    /// // Through the wire, as from another process:
    /// let wire = Event::decode(&event.encode().unwrap()).unwrap();
    /// assert_eq!(wire.decode_tagged::<DocEvent>().unwrap(), DocEvent::Edit { text: "hi".into() });
    /// assert_eq!(Event::tagged(DocEvent::Saved).unwrap().kind(), "doc.saved");
    /// // A struct has no tag:
    /// #[derive(Serialize)]
    /// struct Plain { text: String }
    /// assert!(Event::tagged(Plain { text: "hi".into() }).is_err());
    /// ```
    pub fn tagged<T>(value: T) -> Result<Self, EventCodecError>
    where
        T: Serialize + Send + Sync + 'static,
    {
        let kind = match serde_json::to_value(&value) {
            Ok(serde_json::Value::Object(mut fields)) => match fields.remove("type") {
                Some(serde_json::Value::String(kind)) => kind,
                _ => {
                    return Err(EventCodecError::new(format_args!(
                        "{} has no string `type` field: derive it with #[serde(tag = \"type\")]",
                        std::any::type_name::<T>()
                    )))
                }
            },
            Ok(_) => {
                return Err(EventCodecError::new(format_args!(
                    "{} is not a map: derive it with #[serde(tag = \"type\")]",
                    std::any::type_name::<T>()
                )))
            }
            Err(e) => return Err(EventCodecError::new(e)),
        };
        Ok(Self::from_payload(
            kind,
            Payload::Typed {
                value: Arc::new(value),
                encode: encode_untagged::<T>,
                type_name: std::any::type_name::<T>(),
            },
        ))
    }

    /// An event without a body.
    pub fn bare(kind: impl Into<Cow<'static, str>>) -> Self {
        Self::from_payload(kind, Payload::None)
    }

    /// An event whose body is a ready WebSocket message ("fastlane"): encoded
    /// once by the sender, forwarded unchanged by every receiving consumer.
    pub fn message(kind: impl Into<Cow<'static, str>>, message: impl Into<Message>) -> Self {
        Self::from_payload(kind, message_payload(message.into()))
    }

    /// An event with a text message body; see [`Event::message`].
    pub fn text(kind: impl Into<Cow<'static, str>>, text: impl Into<Utf8Bytes>) -> Self {
        Self::message(kind, Message::Text(text.into()))
    }

    /// An event whose body is already MessagePack-encoded (what a backend
    /// produces when it receives an event from the wire).
    pub fn from_msgpack(kind: impl Into<Cow<'static, str>>, body: Bytes) -> Self {
        Self::from_payload(kind, Payload::Encoded(body))
    }

    fn from_payload(kind: impl Into<Cow<'static, str>>, payload: Payload) -> Self {
        Event {
            inner: Arc::new(Inner {
                kind: kind.into(),
                payload,
                ephemeral: false,
                rendered: OnceLock::new(),
            }),
            position: None,
        }
    }

    /// Where the event sits in its group's history: set by the channel
    /// layer on events of groups with a
    /// [`HistoryPolicy`](super::HistoryPolicy), `None` otherwise.
    pub fn position(&self) -> Option<&StreamPosition> {
        self.position.as_ref()
    }

    /// The same event at `position`: what a backend delivers for a group
    /// with history. The body is shared, not copied.
    pub fn with_position(mut self, position: StreamPosition) -> Self {
        self.position = Some(position);
        self
    }

    /// The event's type, e.g. `"chat.message"`.
    pub fn kind(&self) -> &str {
        &self.inner.kind
    }

    /// The handler name Django would dispatch to: the type with `.` replaced by `_`
    /// (`"chat.message"` -> `"chat_message"`).
    pub fn handler_name(&self) -> String {
        self.inner.kind.replace('.', "_")
    }

    /// The WebSocket message carried by a [`Event::message`] event.
    pub fn as_message(&self) -> Option<&Message> {
        match &self.inner.payload {
            Payload::Message { message, .. } => Some(message),
            _ => None,
        }
    }

    /// The shared payload of a text or binary fast-lane event.
    pub(crate) fn shared_payload(&self) -> Option<&SharedPayload> {
        match &self.inner.payload {
            Payload::Message { shared, .. } => shared.as_ref(),
            _ => None,
        }
    }

    /// Renders the event into a WebSocket message once for every member of
    /// a group send, and returns it as a fast-lane event ([`Event::message`])
    /// to hand to [`forward_event`](crate::consumer::forward_event).
    ///
    /// A group send hands every member the same event, so the first member
    /// to call this runs `render` and every other member gets the same
    /// message: it is serialized once and, as a shared payload, compressed
    /// once per negotiated parameter set, instead of once per member. Use it
    /// where a consumer turns an event into a frame that only depends on the
    /// event, such as one carrying the event's history
    /// [`position`](Event::position), which the layer assigns at the send
    /// (so the sender cannot render it into an [`Event::text`] beforehand).
    ///
    /// `render` must depend on the event alone, not on the member: whichever
    /// member runs it, all of them get its output. An error is returned to
    /// the member that ran `render` and nothing is kept, so the next member
    /// tries again. If the same body was sent at two positions (one event
    /// sent to two groups with history), each position is rendered for
    /// itself.
    ///
    /// ```
    /// use tower_channels::{channel_layer::Event, message::Message};
    ///
    /// let event = Event::new("chat.message", "hi".to_owned());
    /// let mut renders = 0;
    /// for _member in 0..3 {
    ///     let frame = event
    ///         .render_once(|e| {
    ///             renders += 1;
    ///             let text: String = e.body()?;
    ///             Ok::<_, Box<dyn std::error::Error>>(Message::text(format!("<{text}>")))
    ///         })
    ///         .unwrap();
    ///     assert_eq!(frame.as_message(), Some(&Message::text("<hi>")));
    /// }
    /// assert_eq!(renders, 1);
    /// ```
    pub fn render_once<E>(
        &self,
        render: impl FnOnce(&Event) -> Result<Message, E>,
    ) -> Result<Event, E> {
        if let Some(done) = self.inner.rendered.get() {
            if done.0 == self.position {
                return Ok(done.1.clone());
            }
            // The same body at another position: rendered for this one.
            return render(self).map(|m| Event::message(self.inner.kind.clone(), m));
        }
        let fresh = Event::message(self.inner.kind.clone(), render(self)?);
        // Two members may render at once; the first one stored is what all
        // of them send, so it is still compressed once.
        let stored = self
            .inner
            .rendered
            .get_or_init(|| Box::new((self.position.clone(), fresh.clone())));
        Ok(if stored.0 == self.position {
            stored.1.clone()
        } else {
            fresh
        })
    }

    /// The same event, marked to be delivered but not stored: a group
    /// send of it to a group with a
    /// [`HistoryPolicy`](super::HistoryPolicy) reaches the members but is
    /// not appended to the history, gets no offset
    /// ([`GroupSendReport::position`](super::GroupSendReport) is `None`,
    /// and so is the delivered event's [`position`](Self::position)) and is
    /// never recovered. For what only matters live: typing indicators,
    /// cursors, ticks. It is not ordered with the group's stored events (a
    /// cursor may overtake a message sent just before it on another
    /// process). On layers without history the mark changes nothing. The
    /// mark is for the sending layer: it does not travel to other
    /// processes (their copy simply has no position).
    ///
    /// ```
    /// use tower_channels::channel_layer::{ChannelLayer, Event, GroupPattern, HistoryPolicy, InMemoryChannelLayer};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let layer = InMemoryChannelLayer::new().with_history(HistoryPolicy::new(GroupPattern::any()));
    /// let typing = layer.group_send("doc", Event::text("doc.typing", "ada").ephemeral()).await?;
    /// assert!(typing.position.is_none());
    /// let edit = layer.group_send("doc", Event::text("doc.edit", "hello")).await?;
    /// assert_eq!(edit.position.unwrap().offset(), 1); // the typing event took no offset
    /// # Ok::<_, tower_channels::channel_layer::ChannelLayerError>(())
    /// # }).unwrap();
    /// ```
    #[must_use]
    pub fn ephemeral(mut self) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.ephemeral = true;
            return self;
        }
        // Shared with other clones, which stay as they were.
        Event {
            inner: Arc::new(Inner {
                kind: self.inner.kind.clone(),
                payload: self.inner.payload.clone(),
                ephemeral: true,
                rendered: OnceLock::new(),
            }),
            position: self.position,
        }
    }

    /// Whether the event is delivered but not stored in a history
    /// ([`ephemeral`](Self::ephemeral)).
    pub fn is_ephemeral(&self) -> bool {
        self.inner.ephemeral
    }

    /// Whether the event has no body.
    pub fn is_bare(&self) -> bool {
        matches!(self.inner.payload, Payload::None)
    }

    /// Borrows a typed body without copying, when the event still holds a
    /// value of type `T` (always the case on the in-memory layer when sender
    /// and receiver agree on the type).
    pub fn downcast_ref<T: 'static>(&self) -> Option<&T> {
        match &self.inner.payload {
            Payload::Typed { value, .. } => value.downcast_ref(),
            _ => None,
        }
    }

    /// Reads the body as `T`: a clone when the event holds a `T`, otherwise a
    /// decode of its MessagePack form (so a receiver may use another type
    /// with the same shape, e.g. `serde_json::Value`).
    pub fn body<T>(&self) -> Result<T, EventCodecError>
    where
        T: DeserializeOwned + Clone + 'static,
    {
        if let Some(v) = self.downcast_ref::<T>() {
            return Ok(v.clone());
        }
        match &self.inner.payload {
            Payload::None => Err(EventCodecError::new(format_args!(
                "event {:?} has no body",
                self.kind()
            ))),
            Payload::Message { .. } => Err(EventCodecError::new(format_args!(
                "event {:?} carries a WebSocket message, not a typed body",
                self.kind()
            ))),
            Payload::Encoded(bytes) => rmp_serde::from_slice(bytes)
                .map_err(|e| EventCodecError::new(format_args!("event {:?}: {e}", self.kind()))),
            Payload::Typed { value, encode, .. } => {
                let bytes = encode(value.as_ref())?;
                rmp_serde::from_slice(&bytes)
                    .map_err(|e| EventCodecError::new(format_args!("event {:?}: {e}", self.kind())))
            }
        }
    }

    /// The body as MessagePack (maps with field names): `None` for a bare
    /// event, an error for a WebSocket-message event. Used by backends that
    /// speak another system's format (the `django` layer).
    #[cfg_attr(not(feature = "django"), allow(dead_code))]
    pub(crate) fn body_msgpack(&self) -> Result<Option<Cow<'_, [u8]>>, EventCodecError> {
        match &self.inner.payload {
            Payload::None => Ok(None),
            Payload::Typed { value, encode, .. } => Ok(Some(Cow::Owned(encode(value.as_ref())?))),
            Payload::Encoded(b) => Ok(Some(Cow::Borrowed(b))),
            Payload::Message { .. } => Err(EventCodecError::new(format_args!(
                "event {:?} carries a WebSocket message (Event::text/binary/message), which \
                 has no dict form: send Event::new with a struct or map body instead",
                self.kind()
            ))),
        }
    }

    /// Decodes the event into a serde enum tagged by the event type: `E`
    /// is `#[serde(tag = "type")]`, each variant renamed to an event type
    /// (`#[serde(rename = "chat.message")]`) and holding the body's fields.
    /// The body must be a map (a struct) or absent (a unit variant). This is
    /// typed dispatch: one `match` in `event`, with unknown types left to
    /// [`forward_event`](crate::consumer::forward_event) (ignored by default).
    /// [`Event::tagged`] builds events from the same enum.
    ///
    /// ```
    /// use serde::{Deserialize, Serialize};
    /// use tower_channels::channel_layer::Event;
    ///
    /// #[derive(Serialize, Deserialize, Clone)]
    /// struct Joined { user: String }
    ///
    /// #[derive(Deserialize, Debug, PartialEq)]
    /// #[serde(tag = "type")]
    /// enum RoomEvent {
    ///     #[serde(rename = "user.joined")]
    ///     Joined { user: String },
    ///     #[serde(rename = "room.closed")]
    ///     Closed,
    /// }
    ///
    /// let e = Event::new("user.joined", Joined { user: "ada".into() });
    /// assert_eq!(e.decode_tagged::<RoomEvent>().unwrap(), RoomEvent::Joined { user: "ada".into() });
    /// // Through the wire format, as from another process:
    /// let wire = Event::decode(&e.encode().unwrap()).unwrap();
    /// assert!(matches!(wire.decode_tagged::<RoomEvent>(), Ok(RoomEvent::Joined { .. })));
    /// assert_eq!(Event::bare("room.closed").decode_tagged::<RoomEvent>().unwrap(), RoomEvent::Closed);
    /// // A type the enum does not know is an error: leave it to `forward_event`.
    /// assert!(Event::bare("room.renamed").decode_tagged::<RoomEvent>().is_err());
    /// ```
    pub fn decode_tagged<E: DeserializeOwned>(&self) -> Result<E, EventCodecError> {
        use serde_json::{Map, Value};
        let mut fields = match &self.inner.payload {
            Payload::None => Map::new(),
            _ => match self.body::<Value>()? {
                Value::Object(map) => map,
                _ => {
                    return Err(EventCodecError::new(format_args!(
                        "event {:?}: the body is not a map",
                        self.kind()
                    )))
                }
            },
        };
        fields.insert("type".into(), Value::String(self.kind().to_owned()));
        serde_json::from_value(Value::Object(fields))
            .map_err(|e| EventCodecError::new(format_args!("event {:?}: {e}", self.kind())))
    }

    /// Encodes the event for the wire (see the [module docs](super#wire-format)).
    pub fn encode(&self) -> Result<Bytes, EventCodecError> {
        let (tag, data): (u8, Cow<'_, [u8]>) = match &self.inner.payload {
            Payload::None => (TAG_NONE, Cow::Borrowed(&[])),
            Payload::Typed { value, encode, .. } => (TAG_BODY, Cow::Owned(encode(value.as_ref())?)),
            Payload::Encoded(b) => (TAG_BODY, Cow::Borrowed(b)),
            Payload::Message {
                message: Message::Text(t),
                ..
            } => (TAG_TEXT, Cow::Borrowed(t.as_bytes())),
            Payload::Message {
                message: Message::Binary(b),
                ..
            } => (TAG_BINARY, Cow::Borrowed(b)),
            Payload::Message { message: other, .. } => {
                return Err(EventCodecError::new(format_args!(
                    "only text and binary messages can travel in events, not {other:?}"
                )))
            }
        };
        let wire = Wire {
            kind: &self.inner.kind,
            tag,
            data: serde_bytes::Bytes::new(&data),
        };
        rmp_serde::to_vec(&wire)
            .map(Bytes::from)
            .map_err(EventCodecError::new)
    }

    /// Decodes an event produced by [`Event::encode`]. Never panics on
    /// malformed input.
    pub fn decode(bytes: &[u8]) -> Result<Self, EventCodecError> {
        let wire: WireOwned = rmp_serde::from_slice(bytes)
            .map_err(|e| EventCodecError::new(format_args!("malformed event: {e}")))?;
        let data = Bytes::from(wire.data.into_vec());
        let payload = match wire.tag {
            TAG_NONE => Payload::None,
            TAG_BODY => Payload::Encoded(data),
            TAG_TEXT => message_payload(Message::Text(
                Utf8Bytes::try_from_bytes(data)
                    .map_err(|e| EventCodecError::new(format_args!("malformed event text: {e}")))?,
            )),
            TAG_BINARY => message_payload(Message::Binary(data)),
            other => {
                return Err(EventCodecError::new(format_args!(
                    "malformed event: unknown payload tag {other}"
                )))
            }
        };
        Ok(Self::from_payload(wire.kind, payload))
    }
}

const TAG_NONE: u8 = 0;
const TAG_BODY: u8 = 1;
const TAG_TEXT: u8 = 2;
const TAG_BINARY: u8 = 3;

#[derive(Serialize)]
struct Wire<'a> {
    kind: &'a str,
    tag: u8,
    data: &'a serde_bytes::Bytes,
}

#[derive(Deserialize)]
struct WireOwned {
    kind: String,
    tag: u8,
    data: serde_bytes::ByteBuf,
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Event");
        d.field("type", &self.kind());
        if let Some(p) = &self.position {
            d.field("position", p);
        }
        match &self.inner.payload {
            Payload::None => d.field("body", &"none"),
            Payload::Typed { type_name, .. } => d.field("body", type_name),
            Payload::Encoded(b) => d.field("msgpack_len", &b.len()),
            Payload::Message { message, .. } => d.field("message", message),
        };
        d.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Chat {
        message: String,
    }

    /// What a member of a group send renders: the body and the offset.
    fn render(e: &Event) -> Result<Message, EventCodecError> {
        let chat: Chat = e.body()?;
        let offset = e.position().map(StreamPosition::offset);
        Ok(Message::text(format!("{} @ {offset:?}", chat.message)))
    }

    #[test]
    fn render_once_shares_one_frame_per_position() {
        let sent = Event::new(
            "chat.message",
            Chat {
                message: "hi".into(),
            },
        );
        let first = sent.clone().with_position(StreamPosition::new(1, "e"));
        let member = first.clone();
        let a = first.render_once(render).unwrap();
        let b = member
            .render_once(|_| -> Result<Message, EventCodecError> {
                panic!("rendered twice for one position")
            })
            .unwrap();
        assert_eq!(a.as_message(), Some(&Message::text("hi @ Some(1)")));
        assert_eq!(a.kind(), "chat.message");
        // One shared payload: compressed once for both members.
        assert!(Arc::ptr_eq(&a.inner, &b.inner));
        // The same body sent to a second group with history: its own frame.
        let second = sent.with_position(StreamPosition::new(7, "e"));
        let c = second.render_once(render).unwrap();
        assert_eq!(c.as_message(), Some(&Message::text("hi @ Some(7)")));
        assert_eq!(
            first.render_once(render).unwrap().as_message(),
            a.as_message()
        );
    }

    #[test]
    fn render_once_keeps_nothing_on_error() {
        let e = Event::new(
            "chat.message",
            Chat {
                message: "hi".into(),
            },
        );
        let failed = e.render_once(|_| Err(EventCodecError::new("no")));
        assert!(failed.is_err());
        let frame = e.render_once(render).unwrap();
        assert_eq!(frame.as_message(), Some(&Message::text("hi @ None")));
    }

    #[test]
    fn typed_roundtrip_in_memory_and_wire() {
        let e = Event::new(
            "chat.message",
            Chat {
                message: "hi".into(),
            },
        );
        assert_eq!(e.handler_name(), "chat_message");
        assert!(e.downcast_ref::<Chat>().is_some());
        let v: serde_json::Value = e.body().unwrap();
        assert_eq!(v["message"], "hi");
        let d = Event::decode(&e.encode().unwrap()).unwrap();
        assert_eq!(d.kind(), "chat.message");
        assert_eq!(
            d.body::<Chat>().unwrap(),
            Chat {
                message: "hi".into()
            }
        );
        assert!(d.downcast_ref::<Chat>().is_none());
    }

    #[test]
    fn message_roundtrip() {
        let e = Event::text("chat.message", "{\"message\":\"x\"}");
        let d = Event::decode(&e.encode().unwrap()).unwrap();
        assert_eq!(d.as_message(), Some(&Message::text("{\"message\":\"x\"}")));
        assert!(d.body::<Chat>().is_err());
        let b = Event::message("blob", Bytes::from_static(b"\x00\xff"));
        let d = Event::decode(&b.encode().unwrap()).unwrap();
        assert_eq!(
            d.as_message(),
            Some(&Message::binary(Bytes::from_static(b"\x00\xff")))
        );
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(Event::decode(b"").is_err());
        assert!(Event::decode(b"\x93\xa1a\x09\xc4\x00").is_err());
        assert!(Event::decode(b"\x93\xa1a\x02\xc4\x01\xff").is_err());
        let e = Event::bare("x");
        assert!(e.body::<Chat>().is_err());
        assert!(Event::decode(&e.encode().unwrap()).unwrap().is_bare());
    }
}
