//! Why a handshake was refused: one type per cause, each with its HTTP status
//! and short plain-text body.

use http::{header, HeaderValue, StatusCode};

macro_rules! rejections {
    ($(
        $(#[$doc:meta])*
        $name:ident => $status:ident, $body:literal;
    )*) => {
        $(
            $(#[$doc])*
            #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
            #[non_exhaustive]
            pub(crate) struct $name;

            impl $name {
                /// The HTTP status this rejection answers with.
                pub(crate) fn status(&self) -> StatusCode {
                    StatusCode::$status
                }

                /// The plain-text body this rejection answers with.
                pub(crate) fn body_text(&self) -> &'static str {
                    $body
                }
            }

            impl std::fmt::Display for $name {
                fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str($body)
                }
            }

            impl std::error::Error for $name {}

            impl From<$name> for HandshakeRejection {
                fn from(r: $name) -> Self {
                    HandshakeRejection::$name(r)
                }
            }
        )*

        /// Any reason the layer refused a WebSocket handshake.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[non_exhaustive]
        pub(crate) enum HandshakeRejection {
            $(
                $(#[$doc])*
                $name($name),
            )*
        }

        impl HandshakeRejection {
            /// The HTTP status of the rejection.
            pub(crate) fn status(&self) -> StatusCode {
                match self {
                    $(HandshakeRejection::$name(r) => r.status(),)*
                }
            }

            /// The plain-text body of the rejection.
            pub(crate) fn body_text(&self) -> &'static str {
                match self {
                    $(HandshakeRejection::$name(r) => r.body_text(),)*
                }
            }
        }
    };
}

rejections! {
    /// The upgrade request did not use GET (HTTP/1.1). Answered with 405 and `Allow: GET`.
    MethodNotGet => METHOD_NOT_ALLOWED, "WebSocket upgrade requests must use the GET method";
    /// The upgrade request used HTTP/1.0.
    InvalidHttpVersion => BAD_REQUEST, "WebSocket upgrade requires HTTP/1.1 or HTTP/2";
    /// The `Connection` header did not contain `upgrade`.
    ConnectionNotUpgradable => BAD_REQUEST, "Connection header did not include 'upgrade'";
    /// `Sec-WebSocket-Version` was missing or not 13. Answered with 426 and
    /// `Sec-WebSocket-Version: 13` (RFC 6455 section 4.4).
    InvalidWebSocketVersion => UPGRADE_REQUIRED, "Sec-WebSocket-Version must be 13";
    /// `Sec-WebSocket-Key` was missing.
    MissingWebSocketKey => BAD_REQUEST, "missing Sec-WebSocket-Key header";
    /// `Sec-WebSocket-Key` was not the base64 encoding of 16 bytes.
    InvalidWebSocketKey => BAD_REQUEST, "Sec-WebSocket-Key must be 16 bytes, base64-encoded";
    /// `Sec-WebSocket-Protocol` offered too many protocols or was not valid text.
    InvalidSubprotocols => BAD_REQUEST, "Sec-WebSocket-Protocol offers too many or malformed protocols";
    /// The server did not make the connection upgradable (hyper's `OnUpgrade`
    /// extension is missing): serve with `serve_connection_with_upgrades`,
    /// `axum::serve` or warp.
    UpgradeUnavailable => INTERNAL_SERVER_ERROR, "WebSocket upgrade unavailable: the server does not support connection upgrades";
    /// The `Origin` header was not allowed by the layer's origin policy
    /// (defence against cross-site WebSocket hijacking).
    OriginNotAllowed => FORBIDDEN, "origin not allowed";
    /// The consumer refused the connection in `connect` (Django's `close()` before `accept()`).
    ConnectionRejected => FORBIDDEN, "connection rejected";
    /// The consumer failed before deciding.
    ConsumerFailed => INTERNAL_SERVER_ERROR, "consumer failed before accepting the connection";
    /// The layer is shutting down and accepts no new connections.
    ShuttingDown => SERVICE_UNAVAILABLE, "server is shutting down";
    /// The layer's connection limit was reached. Answered with 503 and `Retry-After`.
    TooManyConnections => SERVICE_UNAVAILABLE, "too many WebSocket connections; retry later";
}

impl HandshakeRejection {
    /// Builds the HTTP response for this rejection.
    pub(crate) fn into_response(self) -> http::Response<bytes::Bytes> {
        let mut res = http::Response::new(bytes::Bytes::from_static(self.body_text().as_bytes()));
        *res.status_mut() = self.status();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        match self {
            HandshakeRejection::MethodNotGet(_) => {
                h.insert(header::ALLOW, HeaderValue::from_static("GET"));
            }
            HandshakeRejection::InvalidWebSocketVersion(_) => {
                h.insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            HandshakeRejection::TooManyConnections(_) | HandshakeRejection::ShuttingDown(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            _ => {}
        }
        res
    }
}

impl std::fmt::Display for HandshakeRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.body_text())
    }
}

impl std::error::Error for HandshakeRejection {}
