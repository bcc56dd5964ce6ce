//! Origin validation: the defence against cross-site WebSocket hijacking.
//!
//! Browsers let any page open a WebSocket to any server, with the user's
//! cookies attached; only the `Origin` header tells which site asked. A
//! server that authenticates WebSockets by cookie must therefore check it,
//! or a hostile page can act as the logged-in user (CSWSH). Django Channels
//! does this with `AllowedHostsOriginValidator`; here it is
//! [`AllowedOrigins`], checked before any consumer code runs. A refused
//! origin gets `403 origin not allowed`.
//!
//! Requests without an `Origin` header are allowed: browsers always send it
//! on WebSocket handshakes, so its absence means a non-browser client, which
//! cannot carry a victim's cookies.
//!
//! # Which one to use
//!
//! In a deployment, name your origins with [`AllowedOrigins::list`] (or
//! [`exact`](AllowedOrigins::exact)). [`AllowedOrigins::same_host`] is a
//! convenience for development and single-host setups: it compares `Origin`
//! with the request's own `Host`, and `Host` is chosen by whoever sends the
//! request, so it proves nothing by itself:
//!
//! * **DNS rebinding.** A hostile page at `http://evil.example:8000` makes
//!   `evil.example` resolve to your server (often `127.0.0.1` or a private
//!   address); the browser then sends `Origin: http://evil.example:8000` *and*
//!   `Host: evil.example:8000`, which match. Nothing but a fixed list of
//!   expected origins (or a check of `Host` itself against your domains)
//!   stops it. Cookies set for your real domain are not sent to the rebound
//!   name, but anything that trusts the network position (a local dev
//!   server, an internal service, IP-based access) is exposed.
//! * **Forged `Host`/`Origin` pairs.** A non-browser client can send any pair;
//!   that is harmless for cookie authentication (it holds no victim's
//!   cookies) but means `same_host` is no access control.
//! * **Proxies.** Behind a reverse proxy that rewrites `Host`, `same_host`
//!   compares against the proxy's upstream name and refuses real pages; list
//!   the public origins instead.
//!
//! ```
//! use tower_channels::{origin::AllowedOrigins, WebSocketLayer};
//!
//! // Only pages served by this same host may connect:
//! let layer = WebSocketLayer::new().allowed_origins(AllowedOrigins::same_host());
//!
//! // Or an explicit list:
//! let layer = WebSocketLayer::new().allowed_origins(AllowedOrigins::list([
//!     "https://example.com",
//!     "https://app.example.com",
//! ]));
//! ```

use std::{fmt, sync::Arc};

use http::{header, request::Parts, HeaderValue, Uri};

/// Which `Origin`s may open WebSockets. See the [module docs](self).
#[derive(Clone, Default)]
pub struct AllowedOrigins(Inner);

type Predicate = Arc<dyn Fn(&HeaderValue, &Parts) -> bool + Send + Sync>;

#[derive(Clone, Default)]
enum Inner {
    #[default]
    Any,
    List(Vec<HeaderValue>),
    Predicate(Predicate),
    SameHost,
}

impl AllowedOrigins {
    /// Every origin (the default).
    pub fn any() -> Self {
        Self(Inner::Any)
    }

    /// Exactly one origin, e.g. `"https://example.com"` (scheme, host and
    /// port as browsers send them; compared case-insensitively).
    ///
    /// # Panics
    ///
    /// If `origin` is not a valid header value.
    pub fn exact(origin: &str) -> Self {
        Self::list([origin])
    }

    /// Any of these origins.
    ///
    /// # Panics
    ///
    /// If an origin is not a valid header value.
    pub fn list<'a>(origins: impl IntoIterator<Item = &'a str>) -> Self {
        Self(Inner::List(
            origins
                .into_iter()
                .map(|o| HeaderValue::from_str(o).expect("invalid origin in AllowedOrigins::list"))
                .collect(),
        ))
    }

    /// Origins for which `f(origin, request)` returns true.
    pub fn predicate<F>(f: F) -> Self
    where
        F: Fn(&HeaderValue, &Parts) -> bool + Send + Sync + 'static,
    {
        Self(Inner::Predicate(Arc::new(f)))
    }

    /// Origins whose host and port equal the request's `Host` (or HTTP/2
    /// `:authority`): pages served by this same server. Django's
    /// `AllowedHostsOriginValidator` in spirit, but without `ALLOWED_HOSTS`:
    /// it trusts the `Host` header, so it does not stop DNS rebinding (see
    /// [which one to use](self#which-one-to-use)). Prefer
    /// [`list`](Self::list) for deployments.
    pub fn same_host() -> Self {
        Self(Inner::SameHost)
    }

    /// Whether the request's origin is allowed (a request without `Origin`
    /// is). The layer calls it on every handshake; call it yourself to hold
    /// other endpoints, such as a `POST` that sends to a group, to the same
    /// policy (CSRF).
    ///
    /// ```
    /// use tower_channels::origin::AllowedOrigins;
    ///
    /// let origins = AllowedOrigins::list(["https://example.com"]);
    /// let req = http::Request::post("/rooms/lobby/messages")
    ///     .header("origin", "https://evil.example")
    ///     .body(())
    ///     .unwrap();
    /// assert!(!origins.allows(&req.into_parts().0));
    /// ```
    pub fn allows(&self, parts: &Parts) -> bool {
        let Some(origin) = parts.headers.get(header::ORIGIN) else {
            return true;
        };
        match &self.0 {
            Inner::Any => true,
            Inner::List(list) => list
                .iter()
                .any(|o| o.as_bytes().eq_ignore_ascii_case(origin.as_bytes())),
            Inner::Predicate(f) => f(origin, parts),
            Inner::SameHost => same_host(origin, parts),
        }
    }
}

fn authority_of(uri: &Uri) -> Option<(String, u16)> {
    let host = uri.host()?.to_ascii_lowercase();
    let port = uri.port_u16().or(match uri.scheme_str() {
        Some("https") | Some("wss") => Some(443),
        Some("http") | Some("ws") => Some(80),
        _ => None,
    })?;
    Some((host, port))
}

fn same_host(origin: &HeaderValue, parts: &Parts) -> bool {
    let Some(origin) = origin.to_str().ok().and_then(|o| o.parse::<Uri>().ok()) else {
        return false;
    };
    let Some((o_host, o_port)) = authority_of(&origin) else {
        return false;
    };
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()));
    let Some(host) = host else { return false };
    // Give the Host the origin's scheme so a missing port defaults the same way.
    let scheme = origin.scheme_str().unwrap_or("http");
    let Some((h_host, h_port)) = format!("{scheme}://{host}")
        .parse::<Uri>()
        .ok()
        .and_then(|u| authority_of(&u))
    else {
        return false;
    };
    o_host == h_host && o_port == h_port
}

impl fmt::Debug for AllowedOrigins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Inner::Any => f.write_str("AllowedOrigins::Any"),
            Inner::List(l) => f.debug_tuple("AllowedOrigins::List").field(l).finish(),
            Inner::Predicate(_) => f.write_str("AllowedOrigins::Predicate(..)"),
            Inner::SameHost => f.write_str("AllowedOrigins::SameHost"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(origin: Option<&str>, host: &str) -> Parts {
        let mut b = http::Request::get("/ws").header("host", host);
        if let Some(o) = origin {
            b = b.header("origin", o);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn same_host_rules() {
        let v = AllowedOrigins::same_host();
        assert!(v.allows(&parts(Some("http://localhost:8000"), "localhost:8000")));
        assert!(v.allows(&parts(Some("https://Example.com"), "example.com")));
        assert!(v.allows(&parts(Some("http://example.com"), "example.com:80")));
        assert!(!v.allows(&parts(Some("http://evil.com"), "example.com")));
        assert!(!v.allows(&parts(Some("http://example.com:8001"), "example.com:8000")));
        assert!(!v.allows(&parts(Some("null"), "example.com")));
        assert!(v.allows(&parts(None, "example.com")));
    }

    #[test]
    fn list_and_predicate() {
        let v = AllowedOrigins::list(["https://a.com", "https://b.com"]);
        assert!(v.allows(&parts(Some("https://B.com"), "x")));
        assert!(!v.allows(&parts(Some("https://c.com"), "x")));
        let p = AllowedOrigins::predicate(|o, _| o.as_bytes().ends_with(b".example.com"));
        assert!(p.allows(&parts(Some("https://app.example.com"), "x")));
        assert!(!p.allows(&parts(Some("https://example.org"), "x")));
        assert!(AllowedOrigins::any().allows(&parts(Some("https://x"), "y")));
    }
}
