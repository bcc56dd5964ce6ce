//! The handshake of [`Communicator::through`](super::Communicator::through):
//! a real HTTP/1.1 upgrade, served by hyper's server over an in-memory pipe,
//! sent by hyper's client, so every tower layer of the application (auth,
//! routing, nesting) runs exactly as under `axum::serve`.

use std::{future::poll_fn, pin::pin};

use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tower_service::Service;

use super::{client::Client, Rejected};
use crate::{channel_layer::BoxError, engine::Probe};

/// The most of a rejection's body kept (the layer's bodies are a line).
const MAX_REJECTION_BODY: usize = 64 << 10;

/// Sends `request` as a WebSocket upgrade through `service`; the client of
/// the upgraded connection and the subprotocol the server chose, or the
/// response that refused it.
pub(crate) async fn handshake<S, B>(
    service: S,
    request: Request<()>,
    probe: Probe,
) -> Result<(Client, Option<String>), Rejected>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (mut parts, ()) = request.into_parts();
    // Extensions do not cross a connection: put the test's back on the
    // request the service receives (a `ConnectInfo`, say), with the probe.
    let mut extensions = std::mem::take(&mut parts.extensions);
    extensions.insert(probe);
    let key = tungstenite::handshake::client::generate_key();
    parts.method = Method::GET;
    parts.version = Version::HTTP_11;
    let h = &mut parts.headers;
    if !h.contains_key(header::HOST) {
        h.insert(header::HOST, HeaderValue::from_static("localhost"));
    }
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    // The test client speaks no extension (no permessage-deflate).
    h.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    let key_value = HeaderValue::from_str(&key).map_err(|_| failed("bad key"))?;
    h.insert(header::SEC_WEBSOCKET_KEY, key_value);
    let request = Request::from_parts(parts, String::new());

    let (server_io, client_io) = tokio::io::duplex(64 << 10);
    let serve = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().extend(extensions.clone());
        let mut service = service.clone();
        async move {
            // A concrete error: hyper's `Into<Box<dyn Error>>` bound, checked
            // for `Send` under a higher-ranked lifetime, rejects a `BoxError`.
            poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(std::io::Error::other)?;
            service.call(req).await.map_err(std::io::Error::other)
        }
    });
    tokio::spawn(async move {
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server_io), serve)
            .with_upgrades();
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "test connection ended with an error");
        }
    });

    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client_io))
        .await
        .map_err(|e| failed(&e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| failed(&format!("the service failed: {e}")))?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status();
        let body = collect(response.into_body()).await;
        return Err(Rejected { status, body });
    }
    let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let accept = response.headers().get(header::SEC_WEBSOCKET_ACCEPT);
    if accept.map(HeaderValue::as_bytes) != Some(expected.as_bytes()) {
        return Err(failed("101 without the right Sec-WebSocket-Accept"));
    }
    let protocol = response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|e| failed(&format!("upgrade failed: {e}")))?;
    Ok((Client::new(TokioIo::new(upgraded)), protocol))
}

/// The start of a rejection's body.
async fn collect(body: Incoming) -> Bytes {
    let mut body = pin!(body);
    let mut out = BytesMut::new();
    while let Some(Ok(frame)) = poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        if let Ok(data) = frame.into_data() {
            out.extend_from_slice(&data);
            if out.len() >= MAX_REJECTION_BODY {
                out.truncate(MAX_REJECTION_BODY);
                break;
            }
        }
    }
    out.freeze()
}

/// A handshake that could not be completed at all, as the client sees it.
fn failed(why: &str) -> Rejected {
    Rejected {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        body: Bytes::from(why.to_owned()),
    }
}
