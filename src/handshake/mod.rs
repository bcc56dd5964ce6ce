//! The WebSocket handshake: RFC 6455 over HTTP/1.1 and RFC 8441 extended
//! CONNECT over HTTP/2.
//!
//! The layer only treats a request as a handshake when it asks for one
//! (`Upgrade: websocket`, or an HTTP/2 CONNECT with `:protocol = websocket`);
//! anything else on a WebSocket path, such as a plain GET serving a page,
//! passes to the inner service. A handshake that asks but is malformed is
//! refused with a rejection (`rejection`) and never reaches a consumer.

pub(crate) mod rejection;

use http::{header, request::Parts, HeaderMap, HeaderValue, Method, Response, StatusCode, Version};
use tungstenite::handshake::derive_accept_key;

pub(crate) use self::rejection::HandshakeRejection;
use self::rejection::*;

/// What kind of handshake a request is.
#[derive(Debug, Clone)]
pub(crate) enum Kind {
    /// HTTP/1.1 upgrade with the client's key.
    Http1 { key: HeaderValue },
    /// HTTP/2 extended CONNECT.
    Http2,
}

/// Whether the request asks for a WebSocket (cheap, header lookups only).
pub(crate) fn wants_websocket<B>(req: &http::Request<B>) -> bool {
    if req.method() == Method::CONNECT {
        return req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    }
    req.headers()
        .get_all(header::UPGRADE)
        .iter()
        .any(|v| has_token(v, "websocket"))
}

fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        .unwrap_or(false)
}

/// Validates a request that [`wants_websocket`].
pub(crate) fn validate(
    parts: &Parts,
    max_subprotocols: usize,
) -> Result<(Kind, Vec<String>), HandshakeRejection> {
    let headers = &parts.headers;
    let kind = if parts.version == Version::HTTP_2 || parts.method == Method::CONNECT {
        if parts.method != Method::CONNECT {
            return Err(MethodNotGet.into());
        }
        Kind::Http2
    } else {
        if parts.method != Method::GET {
            return Err(MethodNotGet.into());
        }
        if parts.version < Version::HTTP_11 {
            return Err(InvalidHttpVersion.into());
        }
        if !headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v, "upgrade"))
        {
            return Err(ConnectionNotUpgradable.into());
        }
        let key = headers
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or(MissingWebSocketKey)?;
        if !valid_key(key.as_bytes()) {
            return Err(InvalidWebSocketKey.into());
        }
        Kind::Http1 { key: key.clone() }
    };
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(InvalidWebSocketVersion.into());
    }
    let protocols = parse_subprotocols(headers, max_subprotocols).ok_or(InvalidSubprotocols)?;
    Ok((kind, protocols))
}

/// A key is valid when it is base64 of 16 bytes: 22 base64 characters then `==`.
/// (Only the shape is checked; the key is never decoded.)
fn valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// The subprotocols offered in `headers`; `None` past `max` or when malformed.
pub(crate) fn parse_subprotocols(headers: &HeaderMap, max: usize) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for value in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let s = value.to_str().ok()?;
        for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if out.len() >= max || p.len() > 128 {
                return None;
            }
            out.push(p.to_owned());
        }
    }
    Some(out)
}

/// Subprotocols offered in `headers`, without limits (for test scopes).
#[cfg(feature = "testing")]
pub(crate) fn offered_subprotocols(headers: &HeaderMap) -> Vec<String> {
    parse_subprotocols(headers, usize::MAX).unwrap_or_default()
}

/// The response that completes a handshake.
pub(crate) fn accept_response(
    kind: &Kind,
    subprotocol: Option<&str>,
    extra: HeaderMap,
) -> Response<bytes::Bytes> {
    let mut res = Response::new(bytes::Bytes::new());
    *res.status_mut() = match kind {
        Kind::Http1 { .. } => StatusCode::SWITCHING_PROTOCOLS,
        Kind::Http2 => StatusCode::OK,
    };
    let h = res.headers_mut();
    match kind {
        Kind::Http1 { key } => {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            let accept = derive_accept_key(key.as_bytes());
            if let Ok(v) = HeaderValue::from_str(&accept) {
                h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
            }
        }
        Kind::Http2 => {}
    }
    if let Some(p) = subprotocol.and_then(|p| HeaderValue::from_str(p).ok()) {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    for (name, value) in extra {
        if let Some(name) = name {
            h.append(name, value);
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(f: impl FnOnce(http::request::Builder) -> http::request::Builder) -> Parts {
        f(http::Request::builder()).body(()).unwrap().into_parts().0
    }

    fn good(b: http::request::Builder) -> http::request::Builder {
        b.uri("/ws")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    }

    #[test]
    fn accepts_rfc_example_and_computes_key() {
        let p = parts(|b| good(b).header("sec-websocket-protocol", "a, b"));
        let (kind, protos) = validate(&p, 16).unwrap();
        assert_eq!(protos, ["a", "b"]);
        let res = accept_response(&kind, Some("b"), HeaderMap::new());
        assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
        // The RFC 6455 section 1.3 example.
        assert_eq!(
            res.headers()["sec-websocket-accept"],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(res.headers()["sec-websocket-protocol"], "b");
    }

    #[test]
    fn rejections() {
        let status = |p: Parts| validate(&p, 2).unwrap_err().status().as_u16();
        assert_eq!(status(parts(|b| good(b).method("POST"))), 405);
        assert_eq!(status(parts(|b| good(b).version(Version::HTTP_10))), 400);
        let old_version = parts(|b| {
            b.header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "8")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        });
        assert_eq!(status(old_version), 426);
        let no_key = parts(|b| {
            b.uri("/ws")
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
        });
        assert_eq!(
            validate(&no_key, 2).unwrap_err(),
            MissingWebSocketKey.into()
        );
        let bad_key = parts(|b| {
            b.header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "short")
        });
        assert_eq!(
            validate(&bad_key, 2).unwrap_err(),
            InvalidWebSocketKey.into()
        );
        let no_conn = parts(|b| {
            b.header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        });
        assert_eq!(
            validate(&no_conn, 2).unwrap_err(),
            ConnectionNotUpgradable.into()
        );
        let many = parts(|b| good(b).header("sec-websocket-protocol", "a,b,c"));
        assert_eq!(validate(&many, 2).unwrap_err(), InvalidSubprotocols.into());
    }

    #[test]
    fn wants_websocket_only_when_asked() {
        let plain = http::Request::get("/ws").body(()).unwrap();
        assert!(!wants_websocket(&plain));
        let h2c = http::Request::get("/ws")
            .header("upgrade", "h2c")
            .body(())
            .unwrap();
        assert!(!wants_websocket(&h2c));
        let ws = http::Request::get("/ws")
            .header("upgrade", "WebSocket")
            .body(())
            .unwrap();
        assert!(wants_websocket(&ws));
        let mut connect = http::Request::connect("/ws").body(()).unwrap();
        connect
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        assert!(wants_websocket(&connect));
    }
}
