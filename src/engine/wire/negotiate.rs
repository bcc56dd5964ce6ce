//! permessage-deflate negotiation, server side (RFC 7692 sections 5 and 7.1).

use http::{header::GetAll, HeaderValue};

use crate::Compression;

/// permessage-deflate parameters agreed for one connection (server view).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct DeflateParams {
    /// The server starts a fresh deflate stream for every message.
    pub(crate) server_no_context_takeover: bool,
    /// The client starts a fresh deflate stream for every message (so the
    /// server inflates each message with a fresh decompressor).
    pub(crate) client_no_context_takeover: bool,
    /// The server's LZ77 window, 9..=15. An offer of 8 is declined: zlib
    /// (and zlib-rs) raise a raw-deflate window of 8 to 9, which would break
    /// the client's 256-byte limit, and RFC 7692 section 7.1.2.1 only allows
    /// answering "the same or a smaller value".
    pub(crate) server_max_window_bits: u8,
    /// The window the client may use, 8..=15 (15 when the client did not offer
    /// `client_max_window_bits`, since the server may then not limit it). The
    /// decompressor uses at least 9, which inflates anything an 8-bit window
    /// produces.
    pub(crate) client_max_window_bits: u8,
    /// zlib level for outgoing messages.
    pub(crate) level: u32,
    /// Payloads smaller than this go uncompressed.
    pub(crate) threshold: usize,
}

impl DeflateParams {
    /// Parameters for both directions without context takeover and full
    /// windows, with the given level and threshold (tests, benchmarks).
    #[cfg(test)]
    pub(crate) fn no_context_takeover(level: u32, threshold: usize) -> Self {
        Self {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
            level,
            threshold,
        }
    }
}

const EXTENSION: &str = "permessage-deflate";

/// One parsed `permessage-deflate` offer.
#[derive(Debug, Default)]
struct Offer {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// `Some(None)`: the parameter without a value (the client supports it).
    client_max_window_bits: Option<Option<u8>>,
}

/// The header is not valid `Sec-WebSocket-Extensions` syntax.
struct Malformed;

/// Reads the client's `Sec-WebSocket-Extensions` values (there may be several
/// headers, each with several comma-separated offers), picks the first
/// acceptable permessage-deflate offer under `config`, and returns the agreed
/// params plus the exact response header value. `None` = no compression (not
/// offered, disabled, or no acceptable offer). A malformed extension header is
/// not an error: compression is declined.
pub(crate) fn negotiate(
    offers: GetAll<'_, HeaderValue>,
    config: &Compression,
) -> Option<(DeflateParams, HeaderValue)> {
    if !config.enabled {
        return None;
    }
    let mut chosen = None;
    for value in offers {
        // Non-ASCII header bytes are malformed: decline compression.
        let text = value.to_str().ok()?;
        for element in text.split(',') {
            let element = element.trim();
            if element.is_empty() {
                // RFC 9110 list syntax allows empty elements.
                continue;
            }
            match parse_offer(element) {
                Err(Malformed) => return None,
                // Another extension, or a permessage-deflate offer we must decline.
                Ok(None) => {}
                Ok(Some(offer)) => {
                    if chosen.is_none() {
                        chosen = accept(&offer, config).map(|params| (params, offer));
                    }
                }
            }
        }
    }
    // Every header was checked for syntax before answering the first acceptable offer.
    let (params, offer) = chosen?;
    let answer = response(&params, &offer);
    Some((params, HeaderValue::from_str(&answer).ok()?))
}

/// Parses one extension element. `Ok(None)`: not permessage-deflate, or a
/// permessage-deflate offer with unknown, repeated or invalid parameters
/// (declined per RFC 7692 section 7.1).
fn parse_offer(element: &str) -> Result<Option<Offer>, Malformed> {
    let mut parts = element.split(';');
    let name = parts.next().unwrap_or("").trim();
    if !is_token(name) {
        return Err(Malformed);
    }
    let ours = name == EXTENSION;
    let mut offer = Offer::default();
    let mut acceptable = true;
    for param in parts {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k.trim(), Some(parse_value(v.trim())?)),
            None => (param.trim(), None),
        };
        if !is_token(key) {
            return Err(Malformed);
        }
        if !ours || !acceptable {
            continue;
        }
        acceptable = match (key, value) {
            ("server_no_context_takeover", None) if !offer.server_no_context_takeover => {
                offer.server_no_context_takeover = true;
                true
            }
            ("client_no_context_takeover", None) if !offer.client_no_context_takeover => {
                offer.client_no_context_takeover = true;
                true
            }
            ("server_max_window_bits", Some(v)) if offer.server_max_window_bits.is_none() => {
                match window_bits(v) {
                    Some(bits) => {
                        offer.server_max_window_bits = Some(bits);
                        true
                    }
                    None => false,
                }
            }
            ("client_max_window_bits", v) if offer.client_max_window_bits.is_none() => match v {
                None => {
                    offer.client_max_window_bits = Some(None);
                    true
                }
                Some(v) => match window_bits(v) {
                    Some(bits) => {
                        offer.client_max_window_bits = Some(Some(bits));
                        true
                    }
                    None => false,
                },
            },
            // Unknown parameter, a value where none belongs (or none where one
            // is required), or a repeated parameter: decline this offer.
            _ => false,
        };
    }
    Ok((ours && acceptable).then_some(offer))
}

/// A parameter value: a token or a quoted string holding a token (RFC 6455
/// section 9.1; escapes never occur in a valid permessage-deflate value and
/// are treated as malformed).
fn parse_value(raw: &str) -> Result<&str, Malformed> {
    let inner = match raw.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"').ok_or(Malformed)?,
        None => raw,
    };
    if is_token(inner) {
        Ok(inner)
    } else {
        Err(Malformed)
    }
}

/// A window size: a decimal 8..=15 without leading zeros (RFC 7692 section 7.1.2).
fn window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') {
        return None;
    }
    value.parse::<u8>().ok().filter(|b| (8..=15).contains(b))
}

/// An RFC 9110 token: one or more tchars.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Accepts `offer` under `config`, or declines it (`None`).
fn accept(offer: &Offer, config: &Compression) -> Option<DeflateParams> {
    let server_max_window_bits = match offer.server_max_window_bits {
        // zlib cannot compress with a 256-byte window: decline this offer.
        Some(bits) if bits < 9 => return None,
        Some(bits) => bits.min(config.server_max_window_bits),
        None => config.server_max_window_bits,
    };
    let client_max_window_bits = match offer.client_max_window_bits {
        // Not offered: the server must not send the parameter, the client may use 15.
        None => 15,
        Some(None) => config.client_max_window_bits,
        Some(Some(bits)) => bits.min(config.client_max_window_bits),
    };
    Some(DeflateParams {
        server_no_context_takeover: offer.server_no_context_takeover
            || !config.server_context_takeover,
        client_no_context_takeover: offer.client_no_context_takeover
            || !config.client_context_takeover,
        server_max_window_bits,
        client_max_window_bits,
        level: config.level,
        threshold: config.threshold,
    })
}

/// The `Sec-WebSocket-Extensions` response value for accepted `params`.
fn response(params: &DeflateParams, offer: &Offer) -> String {
    let mut answer = String::from(EXTENSION);
    // The server may include either no_context_takeover parameter even when
    // the offer did not (RFC 7692 sections 7.1.1.1 and 7.1.1.2).
    if params.server_no_context_takeover {
        answer.push_str("; server_no_context_takeover");
    }
    if params.client_no_context_takeover {
        answer.push_str("; client_no_context_takeover");
    }
    // Required when offered (section 7.1.2.1); allowed otherwise, and only
    // worth sending when it tells the client something.
    if offer.server_max_window_bits.is_some() || params.server_max_window_bits < 15 {
        answer.push_str(&format!(
            "; server_max_window_bits={}",
            params.server_max_window_bits
        ));
    }
    // Only allowed when offered (section 7.1.2.2).
    if let Some(offered) = offer.client_max_window_bits {
        if offered.is_some() || params.client_max_window_bits < 15 {
            answer.push_str(&format!(
                "; client_max_window_bits={}",
                params.client_max_window_bits
            ));
        }
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{header::SEC_WEBSOCKET_EXTENSIONS, HeaderMap};

    fn run(values: &[&str], config: &Compression) -> Option<(DeflateParams, String)> {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(SEC_WEBSOCKET_EXTENSIONS, HeaderValue::from_str(v).unwrap());
        }
        negotiate(headers.get_all(SEC_WEBSOCKET_EXTENSIONS), config)
            .map(|(p, h)| (p, h.to_str().unwrap().to_owned()))
    }

    fn answer(values: &[&str]) -> Option<String> {
        run(values, &Compression::default()).map(|(_, h)| h)
    }

    #[test]
    fn browser_offer_gets_no_context_takeover_both_ways() {
        // Chrome, Firefox, Python websockets and Node ws all offer this.
        let (p, h) = run(
            &["permessage-deflate; client_max_window_bits"],
            &Compression::default(),
        )
        .unwrap();
        assert_eq!(
            h,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        assert!(p.server_no_context_takeover && p.client_no_context_takeover);
        assert_eq!(
            (p.server_max_window_bits, p.client_max_window_bits),
            (15, 15)
        );
        assert_eq!((p.level, p.threshold), (1, 256));
    }

    #[test]
    fn not_offered_or_disabled_means_none() {
        assert_eq!(answer(&[]), None);
        assert_eq!(answer(&["x-webkit-deflate-frame"]), None);
        assert_eq!(run(&["permessage-deflate"], &Compression::disabled()), None);
    }

    #[test]
    fn first_acceptable_offer_wins_across_headers() {
        // RFC 7692 section 5: offers are in preference order; an unacceptable
        // one (window 8 for the server) falls through to the next.
        let (p, h) = run(
            &[
                "foo; bar=1, permessage-deflate; server_max_window_bits=8",
                "permessage-deflate; server_max_window_bits=10, permessage-deflate",
            ],
            &Compression::default(),
        )
        .unwrap();
        assert_eq!(p.server_max_window_bits, 10);
        assert_eq!(
            h,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             server_max_window_bits=10"
        );
    }

    #[test]
    fn quoted_values_are_unquoted() {
        let (p, _) = run(
            &[r#"permessage-deflate; server_max_window_bits="12"; client_max_window_bits="11""#],
            &Compression::default(),
        )
        .unwrap();
        assert_eq!(
            (p.server_max_window_bits, p.client_max_window_bits),
            (12, 11)
        );
    }

    #[test]
    fn invalid_parameters_decline_the_offer() {
        for bad in [
            "permessage-deflate; server_max_window_bits", // value required
            "permessage-deflate; server_max_window_bits=16", // out of range
            "permessage-deflate; server_max_window_bits=7", // out of range
            "permessage-deflate; client_max_window_bits=010", // leading zero
            "permessage-deflate; server_no_context_takeover=1", // no value allowed
            "permessage-deflate; unknown_param",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
        ] {
            assert_eq!(answer(&[bad]), None, "{bad}");
            // ... but a later acceptable offer is still taken.
            assert!(
                answer(&[&format!("{bad}, permessage-deflate")]).is_some(),
                "{bad}"
            );
        }
    }

    #[test]
    fn malformed_header_declines_compression() {
        for bad in [
            "permessage-deflate; server_max_window_bits=\"12",
            "permessage-deflate; =12",
            "permessage deflate",
            "permessage-deflate; client_max_window_bits=\"1\\2\"",
        ] {
            assert_eq!(answer(&[bad]), None, "{bad}");
            // Even with an acceptable offer next to it.
            assert_eq!(
                answer(&[&format!("permessage-deflate, {bad}")]),
                None,
                "{bad}"
            );
        }
        assert_eq!(answer(&["permessage-deflate;"]), None);
    }

    #[test]
    fn empty_list_elements_are_skipped() {
        assert!(answer(&[", ,permessage-deflate,"]).is_some());
    }

    #[test]
    fn client_window_without_value_takes_the_configured_limit() {
        let config = Compression::default().client_max_window_bits(10);
        let (p, h) = run(&["permessage-deflate; client_max_window_bits"], &config).unwrap();
        assert_eq!(p.client_max_window_bits, 10);
        assert!(h.ends_with("; client_max_window_bits=10"), "{h}");
        // Not offered: the server may not limit the client (and must not send it).
        let (p, h) = run(&["permessage-deflate"], &config).unwrap();
        assert_eq!(p.client_max_window_bits, 15);
        assert!(!h.contains("client_max_window_bits"), "{h}");
        // Offered with a value: the smaller one, echoed.
        let (p, h) = run(&["permessage-deflate; client_max_window_bits=8"], &config).unwrap();
        assert_eq!(p.client_max_window_bits, 8);
        assert!(h.ends_with("; client_max_window_bits=8"), "{h}");
    }

    #[test]
    fn server_window_lower_than_configured_is_honoured_and_higher_is_lowered() {
        let config = Compression::default().server_max_window_bits(11);
        let (p, h) = run(&["permessage-deflate; server_max_window_bits=9"], &config).unwrap();
        assert_eq!(p.server_max_window_bits, 9);
        assert!(h.contains("server_max_window_bits=9"), "{h}");
        let (p, h) = run(&["permessage-deflate; server_max_window_bits=15"], &config).unwrap();
        assert_eq!(p.server_max_window_bits, 11);
        assert!(h.contains("server_max_window_bits=11"), "{h}");
        // Not offered: announced anyway since it is below 15 (section 7.1.2.1 allows it).
        let (_, h) = run(&["permessage-deflate"], &config).unwrap();
        assert!(h.contains("server_max_window_bits=11"), "{h}");
        // Only window 8 offered: no compression.
        assert_eq!(
            run(&["permessage-deflate; server_max_window_bits=8"], &config),
            None
        );
    }

    #[test]
    fn context_takeover_is_opt_in_and_a_client_request_wins() {
        let config = Compression::default()
            .server_context_takeover(true)
            .client_context_takeover(true);
        let (p, h) = run(&["permessage-deflate"], &config).unwrap();
        assert!(!p.server_no_context_takeover && !p.client_no_context_takeover);
        assert_eq!(h, "permessage-deflate");
        let (p, h) = run(
            &["permessage-deflate; server_no_context_takeover; client_no_context_takeover"],
            &config,
        )
        .unwrap();
        assert!(p.server_no_context_takeover && p.client_no_context_takeover);
        assert_eq!(
            h,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
    }

    #[test]
    fn non_ascii_header_declines() {
        let mut headers = HeaderMap::new();
        headers.append(
            SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_bytes(b"permessage-deflate; \xff").unwrap(),
        );
        assert!(negotiate(
            headers.get_all(SEC_WEBSOCKET_EXTENSIONS),
            &Compression::default()
        )
        .is_none());
    }
}
