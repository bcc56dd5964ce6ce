//! Drives a fuzzed HTTP request through the real layer.
//!
//! Input: one byte of settings, then an HTTP/1.x request head parsed with
//! httparse (method, path, version, headers). The settings byte picks:
//!
//! * bits 0-1: the version (as parsed, HTTP/2, HTTP/1.0, HTTP/1.1);
//! * bit 2: attach a (dead) `hyper::upgrade::OnUpgrade`, so a valid handshake
//!   reaches the consumer instead of 500 "upgrade unavailable";
//! * bit 3: attach the RFC 8441 `:protocol` extension, with the value of an
//!   `x-protocol` header or `websocket`;
//! * bit 4: `AllowedOrigins::same_host()` instead of any origin;
//! * bits 5-6: what the consumer's `connect` does: accept, accept with the
//!   first offered subprotocol and an extra header, reject (403), reject (400);
//! * bit 7: `max_connections(0)` and `max_subprotocols(2)`.
//!
//! Checks: no panic; the status is one the layer answers with (101, 200, 400,
//! 403, 405, 426, 500, 503) or the inner service's (418); 101/200 only when
//! the upgrade was available and the consumer accepted, 101 with a
//! `Sec-WebSocket-Accept`; every connection task ends by itself.

#![no_main]

use std::{convert::Infallible, time::Duration};

use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use libfuzzer_sys::fuzz_target;
use tower::{service_fn, Layer, ServiceExt};
use tower_channels::{
    consumer::{websocket_consumer, Accept, Context, Reject, WebSocketConsumer},
    origin::AllowedOrigins,
    WebSocketLayer, WebSocketConfig,
};

const INNER: StatusCode = StatusCode::IM_A_TEAPOT;

#[derive(Clone, Copy)]
enum Mode {
    Accept,
    AcceptProtocol,
    Forbidden,
    BadRequest,
}

struct Probe {
    mode: Mode,
}

impl WebSocketConsumer for Probe {
    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        let scope = ctx.scope();
        // Read everything a consumer may look at.
        let _ = (
            scope.route(),
            scope.path(),
            scope.query(),
            scope.method(),
            scope.version(),
        );
        let _ = (
            scope.param("x"),
            scope.param("rest"),
            scope.query_param("q"),
        );
        let _ = (
            scope.headers().len(),
            scope.peer_addr(),
            scope.params().iter().count(),
        );
        match self.mode {
            Mode::Accept => Ok(Accept::new()),
            Mode::AcceptProtocol => {
                let accept = Accept::new().header("x-probe", "1");
                Ok(match scope.subprotocols().first() {
                    Some(p) => accept.subprotocol(p.clone()),
                    None => accept,
                })
            }
            Mode::Forbidden => Err(Reject::forbidden()),
            Mode::BadRequest => Err(Reject::new(StatusCode::BAD_REQUEST).body("probe")),
        }
    }
}

struct Input {
    request: Request<()>,
    upgrade: bool,
    mode: Mode,
    same_host: bool,
    limits: bool,
}

fn parse(data: &[u8]) -> Option<Input> {
    let (&settings, head) = data.split_first()?;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    if !parsed.parse(head).ok()?.is_complete() {
        return None;
    }
    let mut builder = Request::builder()
        .method(Method::from_bytes(parsed.method?.as_bytes()).ok()?)
        .uri(parsed.path?)
        .version(match settings & 3 {
            0 if parsed.version? == 0 => Version::HTTP_10,
            0 => Version::HTTP_11,
            1 => Version::HTTP_2,
            2 => Version::HTTP_10,
            _ => Version::HTTP_11,
        });
    let mut protocol = None;
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        if name == "x-protocol" {
            protocol = value.to_str().ok().map(str::to_owned);
        }
        builder = builder.header(name, value);
    }
    let mut request = builder.body(()).ok()?;
    if settings & 4 != 0 {
        // What hyper attaches to an upgradable request; this one never
        // completes, so an accepted connection ends right after the handshake.
        let dead = hyper::upgrade::on(Request::new(()));
        request.extensions_mut().insert(dead);
    }
    if settings & 8 != 0 {
        let p = protocol.as_deref().unwrap_or("websocket");
        request
            .extensions_mut()
            .insert(hyper::ext::Protocol::from(p));
    }
    Some(Input {
        request,
        upgrade: settings & 4 != 0,
        mode: match (settings >> 5) & 3 {
            0 => Mode::Accept,
            1 => Mode::AcceptProtocol,
            2 => Mode::Forbidden,
            _ => Mode::BadRequest,
        },
        same_host: settings & 16 != 0,
        limits: settings & 128 != 0,
    })
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = parse(data) else { return };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mode = input.mode;
        let mut channels = WebSocketLayer::new()
            .route("/ws/{x}", websocket_consumer(move |_| Probe { mode }))
            .route("/ws/rest/{*rest}", websocket_consumer(move |_| Probe { mode }));
        if input.same_host {
            channels = channels.allowed_origins(AllowedOrigins::same_host());
        }
        if input.limits {
            channels = channels.with_config(
                WebSocketConfig::default()
                    .max_connections(Some(0))
                    .max_subprotocols(2),
            );
        }
        let shutdown = channels.shutdown_handle();
        let inner = service_fn(|_req: Request<()>| async {
            let mut res = Response::new(String::new());
            *res.status_mut() = INNER;
            Ok::<_, Infallible>(res)
        });
        let res = channels
            .layer(inner)
            .oneshot(input.request)
            .await
            .expect("infallible");

        let status = res.status().as_u16();
        assert!(
            matches!(status, 101 | 200 | 400 | 403 | 405 | 426 | 500 | 503 | 418),
            "unexpected status {status}"
        );
        if matches!(status, 101 | 200) {
            assert!(input.upgrade, "{status} without an upgrade to complete");
            assert!(matches!(mode, Mode::Accept | Mode::AcceptProtocol));
        }
        if status == 101 {
            assert!(res.headers().contains_key(header::SEC_WEBSOCKET_ACCEPT));
        }

        // The dead upgrade fails at once, so every connection task ends.
        let report = shutdown.shutdown(Duration::from_secs(5)).await;
        assert_eq!(
            report.aborted, 0,
            "a connection task outlived its handshake"
        );
        assert_eq!(shutdown.connections(), 0);
    });
});
