//! What the HTTP transports write: SSE events, ndjson lines and long-poll
//! frames, one function per transport.

use base64::{engine::general_purpose::STANDARD, Engine as _};
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::HttpKind;

/// One thing to tell the client.
#[derive(Debug)]
pub(super) enum Frame<'a> {
    Open {
        session: &'a str,
        token: &'a str,
        protocol: Option<&'a str>,
    },
    Text(&'a str),
    Binary(&'a [u8]),
    Ping,
    Close {
        code: u16,
        reason: &'a str,
    },
}

/// The JSON form of a frame (an ndjson line, a long-poll array element).
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Json<'a> {
    Open {
        session: &'a str,
        token: &'a str,
        transport: &'static str,
        protocol: Option<&'a str>,
    },
    Text {
        data: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    Binary {
        data: String,
    },
    Ping,
    Close {
        code: u16,
        reason: &'a str,
    },
}

/// `frame` as `kind` writes it; `None` for what `kind` does not write (a
/// long-poll session has no heartbeat: the poll itself is one).
pub(super) fn render(kind: HttpKind, frame: &Frame<'_>) -> Option<Bytes> {
    match kind {
        HttpKind::Sse => Some(sse(frame)),
        HttpKind::Stream => {
            let mut line = json(kind, frame);
            line.push(b'\n');
            Some(line.into())
        }
        HttpKind::Poll => (!matches!(frame, Frame::Ping)).then(|| json(kind, frame).into()),
    }
}

fn json(kind: HttpKind, frame: &Frame<'_>) -> Vec<u8> {
    let value = match *frame {
        Frame::Open {
            session,
            token,
            protocol,
        } => Json::Open {
            session,
            token,
            transport: kind.as_str(),
            protocol,
        },
        Frame::Text(data) => Json::Text {
            data,
            id: event_id(data),
        },
        Frame::Binary(data) => Json::Binary {
            data: STANDARD.encode(data),
        },
        Frame::Ping => Json::Ping,
        Frame::Close { code, reason } => Json::Close { code, reason },
    };
    // Strings, numbers and options only: serializing cannot fail.
    serde_json::to_vec(&value).unwrap_or_default()
}

fn sse(frame: &Frame<'_>) -> Bytes {
    let mut out = BytesMut::new();
    match *frame {
        Frame::Open {
            session,
            token,
            protocol,
        } => {
            let data = json(
                HttpKind::Sse,
                &Frame::Open {
                    session,
                    token,
                    protocol,
                },
            );
            // The SSE `data` of `open` is the object without its `type`
            // (the event name says it).
            let data: serde_json::Value = serde_json::from_slice(&data).unwrap_or_default();
            let mut data = data;
            if let Some(o) = data.as_object_mut() {
                o.remove("type");
            }
            out.put_slice(b"event: open\n");
            data_lines(&mut out, &data.to_string());
        }
        Frame::Text(text) => {
            if let Some(id) = event_id(text) {
                out.put_slice(b"id: ");
                out.put_slice(id.as_bytes());
                out.put_u8(b'\n');
            }
            data_lines(&mut out, text);
        }
        Frame::Binary(data) => {
            out.put_slice(b"event: binary\n");
            data_lines(&mut out, &STANDARD.encode(data));
        }
        Frame::Ping => out.put_slice(b": ping\n"),
        Frame::Close { code, reason } => {
            out.put_slice(b"event: close\n");
            let data = serde_json::json!({ "code": code, "reason": reason });
            data_lines(&mut out, &data.to_string());
        }
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// `text` as `data:` lines: one per line of `text` (SSE ends a line at CR,
/// LF or CRLF; the client joins the lines with LF, so a CR or CRLF in a
/// text message arrives as LF).
fn data_lines(out: &mut BytesMut, text: &str) {
    let mut rest = text;
    loop {
        let end = rest.find(['\r', '\n']).unwrap_or(rest.len());
        out.put_slice(b"data: ");
        out.put_slice(&rest.as_bytes()[..end]);
        out.put_u8(b'\n');
        if end == rest.len() {
            return;
        }
        let skip = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
    }
}

/// The stream position a text message carries: a JSON object with
/// top-level `offset` (a number) and `epoch` (a string), the form
/// [`StreamPosition`](crate::channel_layer::StreamPosition) flattens into
/// a message. Rendered `<epoch>:<offset>`.
fn event_id(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Position {
        offset: u64,
        epoch: String,
    }
    // Cheap checks first: most messages are not positioned.
    if !text.starts_with('{') || !text.contains("\"epoch\"") || !text.contains("\"offset\"") {
        return None;
    }
    let p: Position = serde_json::from_str(text).ok()?;
    (!p.epoch.is_empty()).then(|| format!("{}:{}", p.epoch, p.offset))
}

/// The `(offset, epoch)` of an SSE `Last-Event-ID` (`<epoch>:<offset>`).
pub(crate) fn position_from_event_id(id: &str) -> Option<(u64, &str)> {
    let (epoch, offset) = id.trim().rsplit_once(':')?;
    let offset = offset.parse().ok()?;
    (!epoch.is_empty()).then_some((offset, epoch))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(b: Option<Bytes>) -> String {
        String::from_utf8(b.unwrap().to_vec()).unwrap()
    }

    #[test]
    fn sse_events() {
        assert_eq!(
            s(render(HttpKind::Sse, &Frame::Text("a\nb\r\nc"))),
            "data: a\ndata: b\ndata: c\n\n"
        );
        assert_eq!(
            s(render(
                HttpKind::Sse,
                &Frame::Text(r#"{"offset":3,"epoch":"e1","m":"x"}"#)
            )),
            "id: e1:3\ndata: {\"offset\":3,\"epoch\":\"e1\",\"m\":\"x\"}\n\n"
        );
        assert_eq!(
            s(render(HttpKind::Sse, &Frame::Binary(b"\x00\x01"))),
            "event: binary\ndata: AAE=\n\n"
        );
        assert_eq!(s(render(HttpKind::Sse, &Frame::Ping)), ": ping\n\n");
        assert_eq!(
            s(render(
                HttpKind::Sse,
                &Frame::Close {
                    code: 1000,
                    reason: "bye"
                }
            )),
            "event: close\ndata: {\"code\":1000,\"reason\":\"bye\"}\n\n"
        );
        let open = s(render(
            HttpKind::Sse,
            &Frame::Open {
                session: "s1",
                token: "t",
                protocol: None,
            },
        ));
        assert_eq!(
            open,
            "event: open\ndata: {\"protocol\":null,\"session\":\"s1\",\"token\":\"t\",\"transport\":\"sse\"}\n\n"
        );
    }

    #[test]
    fn json_frames() {
        assert_eq!(
            s(render(HttpKind::Stream, &Frame::Text("hi"))),
            "{\"type\":\"text\",\"data\":\"hi\"}\n"
        );
        assert_eq!(
            s(render(HttpKind::Poll, &Frame::Binary(b"x"))),
            "{\"type\":\"binary\",\"data\":\"eA==\"}"
        );
        assert_eq!(
            s(render(HttpKind::Stream, &Frame::Ping)),
            "{\"type\":\"ping\"}\n"
        );
        assert!(render(HttpKind::Poll, &Frame::Ping).is_none());
        assert_eq!(
            s(render(
                HttpKind::Poll,
                &Frame::Open {
                    session: "s",
                    token: "t",
                    protocol: Some("p")
                }
            )),
            "{\"type\":\"open\",\"session\":\"s\",\"token\":\"t\",\"transport\":\"poll\",\"protocol\":\"p\"}"
        );
    }

    #[test]
    fn event_ids() {
        assert_eq!(position_from_event_id("e:1:42"), Some((42, "e:1")));
        assert_eq!(position_from_event_id("42"), None);
        assert_eq!(position_from_event_id(":42"), None);
        assert_eq!(event_id(r#"{"offset":"x","epoch":"e"}"#), None);
        assert_eq!(event_id("plain"), None);
    }
}
