//! The scope: what a consumer knows about the request that opened its connection.

use std::{net::SocketAddr, sync::Arc};

use http::{Extensions, HeaderMap, HeaderValue, Method, Uri, Version};

use crate::route::Params;

/// The peer address of a connection, for servers that are not axum.
///
/// Insert it as a request extension (e.g. in the hyper accept loop) and
/// [`Scope::peer_addr`] returns it. Under axum, serving with
/// `into_make_service_with_connect_info::<SocketAddr>()` is enough: axum's
/// `ConnectInfo<SocketAddr>` is read as well (with the default `axum` feature).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Everything a consumer knows about the request that opened its connection:
/// Django's `scope`.
///
/// Cheap to clone. Request extensions inserted by outer tower middleware are
/// kept, so authentication is ordinary middleware and the consumer sees what
/// it inserted:
///
/// ```
/// # use tower_channels::Scope;
/// #[derive(Clone)]
/// struct User(String);
///
/// fn greet(scope: &Scope) -> String {
///     match scope.extensions().get::<User>() {
///         Some(User(name)) => format!("hello {name}"),
///         None => "hello stranger".into(),
///     }
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Scope(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    route: Arc<str>,
    method: Method,
    uri: Uri,
    version: Version,
    params: Params,
    headers: HeaderMap,
    subprotocols: Vec<String>,
    peer_addr: Option<SocketAddr>,
    extensions: Extensions,
}

impl Scope {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        route: Arc<str>,
        parts: http::request::Parts,
        params: Params,
        subprotocols: Vec<String>,
    ) -> Self {
        let peer_addr = parts
            .extensions
            .get::<PeerAddr>()
            .map(|p| p.0)
            .or_else(|| parts.extensions.get::<SocketAddr>().copied())
            .or_else(|| connect_info(&parts.extensions));
        Scope(Arc::new(Inner {
            route,
            method: parts.method,
            uri: detach_uri(parts.uri),
            version: parts.version,
            params,
            headers: detach_headers(&parts.headers),
            subprotocols,
            peer_addr,
            extensions: detach_extensions(parts.extensions),
        }))
    }

    /// A scope made from `request` (its URI, headers and extensions) with
    /// params captured by the route pattern `route`, as the layer would make
    /// it; for the test kit (`crate::testing`). A path that does not match
    /// `route` gives empty params.
    #[cfg(feature = "testing")]
    pub(crate) fn for_test(route: &str, request: http::Request<()>) -> Self {
        let (parts, ()) = request.into_parts();
        let params = crate::route::RoutePattern::new(route)
            .ok()
            .and_then(|p| p.matches(parts.uri.path()))
            .unwrap_or_default();
        let subprotocols = crate::handshake::offered_subprotocols(&parts.headers);
        Scope::new(route.into(), parts, params, subprotocols)
    }

    /// The route pattern that matched, e.g. `/ws/chat/{room}`.
    pub fn route(&self) -> &str {
        &self.0.route
    }

    /// The request path, e.g. `/ws/chat/lobby`.
    pub fn path(&self) -> &str {
        self.0.uri.path()
    }

    /// The full request URI.
    pub fn uri(&self) -> &Uri {
        &self.0.uri
    }

    /// The request method (GET for HTTP/1.1, CONNECT for HTTP/2).
    pub fn method(&self) -> &Method {
        &self.0.method
    }

    /// The HTTP version the handshake used (HTTP/1.1 or HTTP/2).
    pub fn version(&self) -> Version {
        self.0.version
    }

    /// The raw query string, without the `?`.
    pub fn query(&self) -> Option<&str> {
        self.0.uri.query()
    }

    /// The value of one query parameter, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        query_param(self.query()?, name)
    }

    /// Parameters captured by the route pattern.
    pub fn params(&self) -> &Params {
        &self.0.params
    }

    /// One captured parameter, e.g. `scope.param("room")`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.0.params.get(name)
    }

    /// The request headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.0.headers
    }

    /// Subprotocols the client offered in `Sec-WebSocket-Protocol`, in order.
    pub fn subprotocols(&self) -> &[String] {
        &self.0.subprotocols
    }

    /// The client's address, when the server provided it (see [`PeerAddr`]).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.0.peer_addr
    }

    /// Request extensions, including those inserted by outer middleware.
    pub fn extensions(&self) -> &Extensions {
        &self.0.extensions
    }
}

/// Copies header values into their own allocations.
///
/// hyper parses headers as slices of its connection read buffer (8-16 KiB);
/// a scope that kept those slices would keep the whole buffer alive for the
/// life of the WebSocket. Copying a few hundred bytes once saves that memory
/// on every idle connection.
fn detach_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        copy.set_sensitive(value.is_sensitive());
        out.append(name.clone(), copy);
    }
    out
}

/// Re-creates the URI from its text, for the same reason as [`detach_headers`].
fn detach_uri(uri: Uri) -> Uri {
    Uri::try_from(uri.to_string()).unwrap_or(uri)
}

/// axum inserts `OriginalUri`, a clone of the request URI that shares hyper's
/// read buffer; replace it by a detached copy (see [`detach_headers`]).
#[cfg(feature = "axum")]
fn detach_extensions(mut ext: Extensions) -> Extensions {
    if let Some(original) = ext.get_mut::<axum::extract::OriginalUri>() {
        original.0 = detach_uri(original.0.clone());
    }
    ext
}

#[cfg(not(feature = "axum"))]
fn detach_extensions(ext: Extensions) -> Extensions {
    ext
}

#[cfg(feature = "axum")]
fn connect_info(ext: &Extensions) -> Option<SocketAddr> {
    ext.get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

#[cfg(not(feature = "axum"))]
fn connect_info(_ext: &Extensions) -> Option<SocketAddr> {
    None
}

/// The value of parameter `name` in the query string `query`, percent-decoded
/// (`+` is a space).
pub(crate) fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_encoding::percent_decode_str(k).decode_utf8().ok()?;
        if k != name {
            return None;
        }
        let v = v.replace('+', " ");
        Some(
            percent_encoding::percent_decode_str(&v)
                .decode_utf8()
                .ok()?
                .into_owned(),
        )
    })
}
