//! Route patterns: which request paths a consumer answers (syntax in
//! [`WebSocketLayer::route`](crate::WebSocketLayer::route)).

use std::{fmt, sync::Arc};

/// Parameters captured from the path by the route pattern
/// ([`Scope::params`](crate::Scope::params)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params(Vec<(Arc<str>, String)>);

impl Params {
    /// The value captured for `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| &**k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Iterates over `(name, value)` pairs in pattern order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, v.as_str()))
    }

    /// Number of captured parameters.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing was captured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    Param(Arc<str>),
    Rest(Arc<str>),
}

/// A path pattern such as `/ws/chat/{room}`. See the [module docs](self).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct RoutePattern {
    source: Arc<str>,
    segments: Box<[Segment]>,
}

/// A route pattern that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid route pattern {pattern:?}: {reason}")]
pub(crate) struct InvalidPattern {
    pattern: String,
    reason: &'static str,
}

impl RoutePattern {
    /// Parses a pattern. It must start with `/`; captures are `{name}` for one
    /// segment or a final `{*name}` for the rest of the path.
    pub(crate) fn new(pattern: &str) -> Result<Self, InvalidPattern> {
        let fail = |reason| InvalidPattern {
            pattern: pattern.to_owned(),
            reason,
        };
        let rest = pattern
            .strip_prefix('/')
            .ok_or_else(|| fail("must start with '/'"))?;
        let mut segments = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        let parts: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        for (i, part) in parts.iter().enumerate() {
            if let Some(inner) = part.strip_prefix('{') {
                let inner = inner
                    .strip_suffix('}')
                    .ok_or_else(|| fail("a capture must be a whole segment like {name}"))?;
                let (is_rest, name) = match inner.strip_prefix('*') {
                    Some(n) => (true, n),
                    None => (false, inner),
                };
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err(fail("capture names use letters, digits and '_'"));
                }
                if names.contains(&name) {
                    return Err(fail("a capture name is used twice"));
                }
                names.push(name);
                if is_rest {
                    if i + 1 != parts.len() {
                        return Err(fail("{*rest} must be the last segment"));
                    }
                    segments.push(Segment::Rest(name.into()));
                } else {
                    segments.push(Segment::Param(name.into()));
                }
            } else if part.contains(['{', '}']) {
                return Err(fail("a capture must be a whole segment like {name}"));
            } else {
                segments.push(Segment::Literal((*part).into()));
            }
        }
        Ok(Self {
            source: pattern.into(),
            segments: segments.into(),
        })
    }

    /// The pattern as written.
    pub(crate) fn as_str(&self) -> &str {
        &self.source
    }

    /// Matches a request path, returning the captured parameters.
    pub(crate) fn matches(&self, path: &str) -> Option<Params> {
        let rest = path.strip_prefix('/')?;
        if self.segments.is_empty() {
            return rest.is_empty().then(Params::default);
        }
        let mut params = Vec::new();
        let mut parts = rest.split('/');
        let mut consumed = 0;
        for seg in self.segments.iter() {
            if let Segment::Rest(name) = seg {
                params.push((name.clone(), decode(&rest[consumed.min(rest.len())..])?));
                return Some(Params(params));
            }
            let part = parts.next()?;
            consumed += part.len() + 1;
            match seg {
                Segment::Literal(lit) if **lit == *part => {}
                Segment::Param(name) if !part.is_empty() => {
                    params.push((name.clone(), decode(part)?));
                }
                _ => return None,
            }
        }
        parts.next().is_none().then_some(Params(params))
    }
}

fn decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

impl fmt::Debug for RoutePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RoutePattern").field(&&*self.source).finish()
    }
}

impl fmt::Display for RoutePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        let root = RoutePattern::new("/").unwrap();
        assert!(root.matches("/").is_some());
        assert!(root.matches("/a").is_none());
        let echo = RoutePattern::new("/ws/echo").unwrap();
        assert!(echo.matches("/ws/echo").is_some());
        assert!(echo.matches("/ws/echo/").is_none());
        assert!(echo.matches("/ws/ech").is_none());
        assert!(echo.matches("ws/echo").is_none());
        let chat = RoutePattern::new("/ws/chat/{room}").unwrap();
        assert_eq!(
            chat.matches("/ws/chat/a%2Fb").unwrap().get("room"),
            Some("a/b")
        );
        assert!(chat.matches("/ws/chat/").is_none());
        assert!(chat.matches("/ws/chat/%FF").is_none());
        let two = RoutePattern::new("/r/{a}/x/{b}").unwrap();
        let p = two.matches("/r/1/x/2").unwrap();
        assert_eq!(p.iter().collect::<Vec<_>>(), [("a", "1"), ("b", "2")]);
        let rest = RoutePattern::new("/f/{*p}").unwrap();
        assert_eq!(rest.matches("/f/").unwrap().get("p"), Some(""));
        assert_eq!(rest.matches("/f").unwrap().get("p"), Some(""));
    }

    #[test]
    fn invalid_patterns() {
        for bad in ["ws", "/a{b}", "/{}", "/{*r}/x", "/{a}/{a}", "/{a-b}"] {
            assert!(RoutePattern::new(bad).is_err(), "{bad}");
        }
    }
}
