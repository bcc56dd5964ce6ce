//! Joining a group and resuming its history from the client's last
//! position: [`Context::join`].

use std::{
    collections::VecDeque,
    future::{Future, IntoFuture},
    pin::Pin,
};

use http::StatusCode;

use super::{Context, Reject};
use crate::{
    channel_layer::{
        ChannelLayerError, Event, PresenceChange, PresenceInfo, RecoveryFailure, StreamCursor,
        StreamPosition, PRESENCE_JOIN, PRESENCE_LEAVE,
    },
    Scope,
};

/// Joins a group, with presence and resuming from a position if asked: made
/// by [`Context::join`], run by `.await`.
///
/// Awaiting it
///
/// 1. adds the connection to the group ([`presence`](Self::presence): and
///    lists it in the group's presence);
/// 2. with [`resume_from`](Self::resume_from) a position, reads the events
///    the client missed after it from the group's history;
/// 3. hands those events to the consumer's `event` handler, in order, before
///    any live event, once the current handler returned;
/// 4. from then on drops live events that recovery already delivered (those
///    published between the join and the read arrive both ways).
///
/// It answers how the resumption went ([`Resumed`]). Each delivered event
/// carries its [`Event::position`]; put it on the frames the client keeps
/// (`StreamPosition` serializes as `{"offset": N, "epoch": "E"}`, so
/// `#[serde(flatten)] position: Option<&StreamPosition>` in a frame struct
/// adds both fields) and read it back on reconnect with
/// [`position_from_query`].
///
/// ```
/// use serde::Serialize;
/// use tower_channels::{
///     channel_layer::{Event, PresenceInfo, StreamPosition},
///     consumer::{position_from_query, Accept, Context, Reject, WebSocketConsumer},
///     BoxError,
/// };
///
/// struct Room { group: String, user: String }
///
/// #[derive(Serialize)]
/// struct Frame<'a> {
///     message: String,
///     #[serde(flatten)]
///     position: Option<&'a StreamPosition>,
/// }
///
/// impl WebSocketConsumer for Room {
///     async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
///         // `?offset=N&epoch=E` from the client's last frame, if any (400 if malformed).
///         let since = position_from_query(ctx.scope())?;
///         let info = PresenceInfo::new(self.user.as_str())?;
///         let resumed = ctx.join(&self.group).presence(info).resume_from(since).await?;
///         if resumed.has_gap() {
///             ctx.send_text(r#"{"type":"reload"}"#)?; // history lost: reload some other way
///         }
///         Ok(Accept::new())
///     }
///
///     async fn event(&mut self, ctx: &mut Context, event: Event) -> Result<(), BoxError> {
///         // Recovered events, then live ones, each once.
///         let message = event.body::<String>()?;
///         ctx.send_json(&Frame { message, position: event.position() })?;
///         Ok(())
///     }
/// }
/// ```
///
/// For the callback consumers ([`WebSocketConsumer`](super::WebSocketConsumer),
/// [`JsonWebSocketConsumer`](super::JsonWebSocketConsumer)); the raw
/// [`WebSocket`](super::WebSocket) has the building blocks
/// ([`recover`](super::WebSocket::recover),
/// [`Recovery::cursor`](crate::channel_layer::Recovery::cursor)).
#[derive(Debug)]
#[must_use = "a Join does nothing until awaited"]
pub struct Join<'a> {
    ctx: &'a mut Context,
    group: String,
    presence: Option<PresenceInfo>,
    skip_own_presence: bool,
    since: Option<StreamPosition>,
}

impl<'a> Join<'a> {
    pub(crate) fn new(ctx: &'a mut Context, group: &str) -> Self {
        Self {
            ctx,
            group: group.to_owned(),
            presence: None,
            skip_own_presence: false,
            since: None,
        }
    }

    /// Lists the connection in the group's presence with `info` (see
    /// [`Context::presence_join`]). Fails with
    /// [`ChannelLayerError::Unsupported`] on a layer without presence
    /// (check [`capabilities`](crate::channel_layer::ChannelLayer::capabilities)).
    pub fn presence(mut self, info: PresenceInfo) -> Self {
        self.presence = Some(info);
        self
    }

    /// With [`presence`](Self::presence): this connection's `event`
    /// handler gets no [`presence.join`](crate::channel_layer::PRESENCE_JOIN)
    /// or [`presence.leave`](crate::channel_layer::PRESENCE_LEAVE) about its
    /// own user (in a group with notifications, every member gets them, the
    /// joining connection included; notifications are collapsed per user,
    /// so another tab of the same user is the same user).
    pub fn skip_own_presence(mut self) -> Self {
        self.skip_own_presence = true;
        self
    }

    /// Resumes after `since`, the position of the last event the client
    /// saw; `None` joins without recovering (a first connection).
    pub fn resume_from(mut self, since: impl Into<Option<StreamPosition>>) -> Self {
        self.since = since.into();
        self
    }

    async fn run(self) -> Result<Resumed, ChannelLayerError> {
        let Join {
            ctx,
            group,
            presence,
            skip_own_presence,
            since,
        } = self;
        match presence {
            Some(info) => {
                if skip_own_presence {
                    // Before joining: the connection handles no event
                    // before its handler returns, so none slips through.
                    ctx.resume_state().skip_presence_of(info.user_id());
                }
                ctx.presence_join(&group, info).await?
            }
            None => ctx.group_add(&group).await?,
        }
        let Some(since) = since else {
            return Ok(Resumed::Fresh);
        };
        let recovery = match ctx.recover(&group, &since).await {
            Ok(recovery) => recovery,
            Err(ChannelLayerError::Unsupported { .. } | ChannelLayerError::NoHistory { .. }) => {
                return Ok(Resumed::Unavailable)
            }
            Err(e) => return Err(e),
        };
        if let Some(failure) = recovery.failure() {
            return Ok(Resumed::Failed(failure));
        }
        let cursor = recovery.cursor();
        let events = recovery.into_events();
        let count = events.len();
        ctx.resume_state().add(group, cursor, events);
        Ok(Resumed::Recovered { events: count })
    }
}

impl<'a> IntoFuture for Join<'a> {
    type Output = Result<Resumed, ChannelLayerError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

/// How [`Context::join`] resumed the group's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Resumed {
    /// No position was given: live events only.
    Fresh,
    /// The events after the position were found; this many are handed to
    /// `event` before live ones (0 when the client missed nothing).
    Recovered {
        /// How many events were recovered.
        events: usize,
    },
    /// The history no longer covers the position: the client missed events
    /// it cannot get here and should reload its state some other way.
    Failed(RecoveryFailure),
    /// The layer, or this group, keeps no history
    /// ([`ChannelLayerError::Unsupported`] or
    /// [`NoHistory`](ChannelLayerError::NoHistory) from `recover`): as
    /// [`Failed`](Self::Failed) for the client.
    Unavailable,
}

impl Resumed {
    /// Whether the client may have missed events: a position was given and
    /// could not be resumed ([`Failed`](Self::Failed),
    /// [`Unavailable`](Self::Unavailable)).
    pub fn has_gap(&self) -> bool {
        matches!(self, Resumed::Failed(_) | Resumed::Unavailable)
    }
}

/// The position a reconnecting client sends as `?offset=N&epoch=E`: `None`
/// when it sends neither (a first connection), a `400 Bad Request` when it
/// sends one without the other, an empty epoch or an offset that is no
/// number.
// `Reject` is what `connect` returns, so the size is paid there anyway.
#[allow(clippy::result_large_err)]
pub fn position_from_query(scope: &Scope) -> Result<Option<StreamPosition>, Reject> {
    let bad = |body: &'static str| Reject::new(StatusCode::BAD_REQUEST).body(body);
    match (scope.query_param("offset"), scope.query_param("epoch")) {
        (None, None) => Ok(None),
        (Some(offset), Some(epoch)) if !epoch.is_empty() => {
            let offset = offset.parse().map_err(|_| bad("invalid offset"))?;
            Ok(Some(StreamPosition::new(offset, epoch)))
        }
        _ => Err(bad("offset and epoch go together")),
    }
}

/// What [`Join`] left for the driver: recovered events not handed to
/// `event` yet, one cursor per resumed group, and the users whose presence
/// events this connection skips. Boxed in the [`Context`] and only there
/// once a consumer used one of them.
#[derive(Debug, Default)]
pub(crate) struct ResumeState {
    pending: VecDeque<Event>,
    cursors: Vec<(String, StreamCursor)>,
    quiet_users: Vec<String>,
}

impl ResumeState {
    fn add(&mut self, group: String, cursor: StreamCursor, events: Vec<Event>) {
        self.forget(&group);
        self.cursors.push((group, cursor));
        self.pending.extend(events);
    }

    /// Stops filtering `group`'s events (it was left).
    pub(crate) fn forget(&mut self, group: &str) {
        self.cursors.retain(|(g, _)| g != group);
    }

    /// The next recovered event to hand to `event`.
    pub(crate) fn next_recovered(&mut self) -> Option<Event> {
        self.pending.pop_front()
    }

    fn skip_presence_of(&mut self, user: &str) {
        if !self.quiet_users.iter().any(|u| u == user) {
            self.quiet_users.push(user.to_owned());
        }
    }

    /// Whether the driver drops `event` instead of handing it to `event`:
    /// a repeat of a recovered event, or a presence change of this
    /// connection's own user when it asked to skip those.
    pub(crate) fn skips(&mut self, event: &Event) -> bool {
        self.is_repeat(event) || self.is_own_presence(event)
    }

    fn is_own_presence(&self, event: &Event) -> bool {
        if self.quiet_users.is_empty() || !matches!(event.kind(), PRESENCE_JOIN | PRESENCE_LEAVE) {
            return false;
        }
        event
            .body::<PresenceChange>()
            .is_ok_and(|change| self.quiet_users.contains(&change.user_id))
    }

    /// Whether `event` was delivered already. Events carry their position,
    /// not their group; each group's history has epochs of its own, so the
    /// cursor whose epoch matches is the group's. An event of an epoch no
    /// cursor knows (another group, or a history that started again) is new.
    fn is_repeat(&mut self, event: &Event) -> bool {
        let Some(position) = event.position() else {
            return false;
        };
        self.cursors
            .iter_mut()
            .find(|(_, c)| c.position().is_some_and(|p| p.epoch() == position.epoch()))
            .is_some_and(|(_, cursor)| !cursor.accept(event))
    }
}
