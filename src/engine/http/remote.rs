//! Requests to a session held by another process, carried through the
//! channel layer: a crate-internal event sent to the session's control
//! channel (its id), answered on a reply channel of the asking process.
//! The event types start with `tower_channels.http.` and never reach a
//! consumer: the session's engine reads its control channel itself.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::session::{PollWaiter, PostOutcome, Session};
use crate::{
    channel_layer::{ChannelLayer, Event},
    message::{Message, Utf8Bytes},
};

const POST: &str = "tower_channels.http.post";
const POLL: &str = "tower_channels.http.poll";
const DELETE: &str = "tower_channels.http.delete";
const REPLY: &str = "tower_channels.http.reply";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Post {
    seq: u64,
    binary: bool,
    data: ByteBuf,
    reply: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PollRequest {
    ack: u64,
    reply: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Delete {
    reply: String,
}

/// `status` 202: a poll is attached and waits; 200: `frames` is the answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Reply {
    status: u16,
    frames: Option<ByteBuf>,
}

/// Serves one request from another process (the session's engine calls this
/// for each event on its control channel).
pub(super) fn serve(session: &Arc<Session>, event: &Event) {
    let layer = session.layer();
    match event.kind() {
        POST => {
            let Ok(p) = event.body::<Post>() else {
                tracing::debug!("undecodable HTTP session request ignored");
                return;
            };
            let message = if p.binary {
                Some(Message::Binary(p.data.into_vec().into()))
            } else {
                Utf8Bytes::try_from_bytes(p.data.into_vec().into())
                    .ok()
                    .map(Message::Text)
            };
            // The asking process checked UTF-8; a message that is not is
            // answered as a closed session rather than trusted.
            let outcome = message.map_or(PostOutcome::Closed, |m| session.post(p.seq, m));
            send_reply(layer, p.reply, outcome.status().as_u16(), None);
        }
        POLL => {
            let Ok(p) = event.body::<PollRequest>() else {
                return;
            };
            // Attached (202) first: the asking process then waits up to its
            // poll timeout for the frames, which may come in the same breath.
            let reply = p.reply.clone();
            if session.poll(p.ack, PollWaiter::Remote(p.reply)) {
                send_reply(layer, reply, 202, None);
            } else {
                send_reply(layer, reply, 404, None);
            }
        }
        DELETE => {
            let Ok(d) = event.body::<Delete>() else {
                return;
            };
            let status = if session.delete() { 204 } else { 404 };
            send_reply(layer, d.reply, status, None);
        }
        other => tracing::debug!(kind = other, "unknown HTTP session request ignored"),
    }
}

/// Answers a poll from another process with `frames`.
pub(super) fn reply_frames(layer: Arc<dyn ChannelLayer>, reply: String, frames: Bytes) {
    send_reply(layer, reply, 200, Some(frames));
}

fn send_reply(layer: Arc<dyn ChannelLayer>, reply: String, status: u16, frames: Option<Bytes>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let body = Reply {
        status,
        frames: frames.map(|f| ByteBuf::from(f.to_vec())),
    };
    rt.spawn(async move {
        if let Err(e) = layer.send(&reply, Event::new(REPLY, body)).await {
            tracing::debug!(
                error = &e as &dyn std::error::Error,
                "HTTP session reply not sent"
            );
        }
    });
}

/// Sends `event` to session `id` and waits for the first reply, at most
/// `wait`; `None` when nobody answers (no such session).
async fn ask(
    layer: &dyn ChannelLayer,
    id: &str,
    wait: Duration,
    event: impl FnOnce(String) -> Event,
) -> Option<(Reply, crate::channel_layer::ChannelReceiver)> {
    let mut rx = layer.new_channel().await.ok()?;
    layer.send(id, event(rx.name().to_owned())).await.ok()?;
    let reply = tokio::time::timeout(wait, next_reply(&mut rx))
        .await
        .ok()??;
    Some((reply, rx))
}

async fn next_reply(rx: &mut crate::channel_layer::ChannelReceiver) -> Option<Reply> {
    loop {
        let event = rx.recv().await.ok()?;
        if event.kind() == REPLY {
            if let Ok(r) = event.body::<Reply>() {
                return Some(r);
            }
        }
    }
}

/// A `POST` to session `id` in another process; `None`: no such session.
pub(crate) async fn remote_post(
    layer: &dyn ChannelLayer,
    id: &str,
    seq: u64,
    message: &Message,
    wait: Duration,
) -> Option<PostOutcome> {
    let (binary, data) = match message {
        Message::Text(t) => (false, t.as_bytes().to_vec()),
        Message::Binary(b) => (true, b.to_vec()),
        _ => return None,
    };
    let (reply, _) = ask(layer, id, wait, |reply| {
        Event::new(
            POST,
            Post {
                seq,
                binary,
                data: ByteBuf::from(data),
                reply,
            },
        )
    })
    .await?;
    Some(PostOutcome::from_status(reply.status))
}

/// A `DELETE` of session `id` in another process; false: no such session.
pub(crate) async fn remote_delete(layer: &dyn ChannelLayer, id: &str, wait: Duration) -> bool {
    ask(layer, id, wait, |reply| {
        Event::new(DELETE, Delete { reply })
    })
    .await
    .is_some_and(|(r, _)| r.status == 204)
}

/// A long-poll of session `id` in another process: the frames after `ack`
/// (a JSON array), `[]` after `poll_timeout`, `None`: no such session.
pub(crate) async fn remote_poll(
    layer: &dyn ChannelLayer,
    id: &str,
    ack: u64,
    wait: Duration,
    poll_timeout: Duration,
) -> Option<Bytes> {
    let (reply, mut rx) = ask(layer, id, wait, |reply| {
        Event::new(POLL, PollRequest { ack, reply })
    })
    .await?;
    if reply.status == 404 {
        return None;
    }
    let mut reply = reply;
    let deadline = tokio::time::Instant::now() + poll_timeout;
    loop {
        if let (200, Some(frames)) = (reply.status, reply.frames) {
            return Some(Bytes::from(frames.into_vec()));
        }
        match tokio::time::timeout_at(deadline, next_reply(&mut rx)).await {
            Ok(Some(r)) if r.status != 404 => reply = r,
            Ok(Some(_)) => return None,
            // Timed out, or the layer dropped the reply channel: the frames
            // stay unacknowledged and go with the next poll.
            _ => return Some(Bytes::from_static(b"[]")),
        }
    }
}
