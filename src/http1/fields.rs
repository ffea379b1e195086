//! The field rules of HTTP/1.1 that framing and forwarding depend on: `Content-Length`,
//! `Transfer-Encoding`, `Connection` tokens, the hop-by-hop list, `Host`, and which trailer
//! fields may pass.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The most digits a `Content-Length` may have: 19 always fit in a `u64`.
const MAX_LENGTH_DIGITS: usize = 19;

/// Parses a `Content-Length` value: 1 to 19 ASCII digits and nothing else (no sign, no
/// whitespace beyond what the head parser already trimmed, no list). Leading zeros are
/// allowed; the canonical value is what is forwarded.
pub fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > MAX_LENGTH_DIGITS {
        return None;
    }
    let mut n: u64 = 0;
    for &b in value {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u64::from(b - b'0');
    }
    Some(n)
}

/// Why a message's framing fields were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// A `Content-Length` value that is not 1 to 19 ASCII digits.
    #[error("invalid content-length")]
    InvalidLength,
    /// Several `Content-Length` fields with different values.
    #[error("conflicting content-length values")]
    ConflictingLength,
    /// A transfer coding other than `chunked` (alone, once).
    #[error("unsupported transfer-encoding (only chunked is implemented)")]
    UnsupportedCoding,
    /// A request with both `Transfer-Encoding` and `Content-Length`.
    #[error("both transfer-encoding and content-length")]
    BothFramings,
}

/// Collects a message's framing fields, one field at a time.
#[derive(Debug, Default, Clone, Copy)]
pub struct Framing {
    /// The `Content-Length`, once seen (all values equal).
    pub length: Option<u64>,
    /// Whether a `Transfer-Encoding` field was seen.
    pub coded: bool,
    /// Whether every transfer coding seen so far is the one `chunked`.
    chunked_only: bool,
    /// How many codings were listed, over all `Transfer-Encoding` fields.
    codings: usize,
}

impl Framing {
    /// Notes a `Content-Length` value.
    pub fn length(&mut self, value: &[u8]) -> Result<(), FramingError> {
        let n = content_length(value).ok_or(FramingError::InvalidLength)?;
        if self.length.is_some_and(|l| l != n) {
            return Err(FramingError::ConflictingLength);
        }
        self.length = Some(n);
        Ok(())
    }

    /// Notes a `Transfer-Encoding` value. The list over all fields must be exactly
    /// `chunked`: canaryd implements no other coding, and a coding it cannot undo must not be
    /// passed on as if the body were plain.
    pub fn coding(&mut self, value: &[u8]) {
        if !self.coded {
            self.chunked_only = true;
        }
        self.coded = true;
        // Every element counts, empty ones too (`chunked,` is refused as hyper refuses it).
        for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            self.codings += 1;
            self.chunked_only &= token.eq_ignore_ascii_case(b"chunked");
        }
        self.chunked_only &= self.codings == 1;
    }

    /// Whether the message is chunked; an error for any other coding.
    pub fn chunked(&self) -> Result<bool, FramingError> {
        match (self.coded, self.chunked_only) {
            (false, _) => Ok(false),
            (true, true) => Ok(true),
            (true, false) => Err(FramingError::UnsupportedCoding),
        }
    }
}

/// The non-empty, trimmed elements of a comma-separated field value.
pub fn list_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Whether a `Connection` value lists `token` (case-insensitive).
pub fn connection_has(value: &[u8], token: &[u8]) -> bool {
    list_tokens(value).any(|t| t.eq_ignore_ascii_case(token))
}

/// Whether `value` is a valid `Host`: `uri-host [ ":" port ]` with no user info, path, query
/// or whitespace. The host is a bracketed IP literal or a reg-name / IPv4 address (unreserved,
/// percent-encoded and sub-delimiter characters); the port, if present, is 1 to 5 digits.
pub fn valid_host(value: &[u8]) -> bool {
    let (host, port) = if value.first() == Some(&b'[') {
        let Some(end) = value.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &value[1..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        {
            return false;
        }
        match &value[end + 1..] {
            [] => return true,
            [b':', port @ ..] => (&[][..], Some(port)),
            _ => return false,
        }
    } else {
        let (host, port) = match value.iter().rposition(|&b| b == b':') {
            Some(i) => (&value[..i], Some(&value[i + 1..])),
            None => (value, None),
        };
        if host.is_empty() {
            return false;
        }
        (host, port)
    };
    host.iter().all(|&b| REG_NAME[usize::from(b)])
        && port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.iter().all(u8::is_ascii_digit))
}

/// The bytes of a reg-name or IPv4 address: unreserved, percent-encoded and sub-delimiters.
static REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        b += 1;
    }
    table
};

/// Whether a field may be forwarded in a trailer section: not one that frames, routes,
/// authenticates, controls caching or describes the content, whose meaning a recipient takes
/// from the head (RFC 9110 §6.5.1).
pub fn trailer_allowed(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "age"
            | "authorization"
            | "cache-control"
            | "connection"
            | "content-encoding"
            | "content-length"
            | "content-location"
            | "content-range"
            | "content-type"
            | "cookie"
            | "date"
            | "expect"
            | "expires"
            | "host"
            | "keep-alive"
            | "location"
            | "max-forwards"
            | "pragma"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "range"
            | "retry-after"
            | "set-cookie"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "vary"
            | "www-authenticate"
            | "x-forwarded-for"
            | "x-forwarded-host"
            | "x-forwarded-proto"
    )
}

/// Keeps only the trailer fields that the message's `Trailer` field announced (`announced`,
/// its values) and that [`trailer_allowed`] lets pass.
pub fn filter_trailers(trailers: &mut HeaderMap, announced: &[HeaderValue]) {
    let listed = |name: &HeaderName| {
        announced
            .iter()
            .flat_map(|v| list_tokens(v.as_bytes()))
            .any(|t| t.eq_ignore_ascii_case(name.as_str().as_bytes()))
    };
    let drop: Vec<HeaderName> = trailers
        .keys()
        .filter(|n| !(trailer_allowed(n) && listed(n)))
        .cloned()
        .collect();
    for name in drop {
        trailers.remove(name);
    }
}

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Connection-scoped fields, always removed by a proxy (`TE` has its own rule, see
/// [`HopByHop`]); in the bit order of [`HopByHop`].
pub static HOP_BY_HOP: [&HeaderName; 8] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::PROXY_AUTHENTICATE,
    &header::PROXY_AUTHORIZATION,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
];

/// The connection-scoped fields found in a message, found by cheap name comparisons in one
/// pass (most messages carry none, or only `Connection: keep-alive`); only those are then
/// removed by their hashed name. `TE: trailers` survives: gRPC needs it end to end.
#[derive(Debug, Default, Clone, Copy)]
pub struct HopByHop {
    /// Bit `i`: `HOP_BY_HOP[i]` is present; the bit after them: `TE`.
    present: u16,
    /// `Connection` names a field other than `keep-alive` (removed anyway) or `close` (not
    /// a field).
    names_more: bool,
}

impl HopByHop {
    /// The hop-by-hop fields of a whole header map.
    pub fn of(headers: &HeaderMap) -> Self {
        let mut hop = HopByHop::default();
        for (name, value) in headers {
            hop.see(name, value);
        }
        hop
    }

    /// Notes one header field.
    #[inline(always)]
    pub fn see(&mut self, name: &HeaderName, value: &HeaderValue) {
        // Names are lowercase; a match on the string is a length switch and a compare.
        let bit = match name.as_str() {
            "connection" => {
                self.names_more |= list_tokens(value.as_bytes()).any(|t| {
                    !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive")
                });
                0
            }
            "keep-alive" => 1,
            "proxy-connection" => 2,
            "proxy-authenticate" => 3,
            "proxy-authorization" => 4,
            "trailer" => 5,
            "transfer-encoding" => 6,
            "upgrade" => 7,
            "te" => 8,
            _ => return,
        };
        self.present |= 1 << bit;
    }

    /// Whether any connection-scoped field was seen.
    pub fn any(&self) -> bool {
        self.present != 0
    }

    /// Whether a `Transfer-Encoding` field was seen.
    pub fn transfer_encoding(&self) -> bool {
        self.present & (1 << 6) != 0
    }

    /// Removes what was found (and what `Connection` names); returns whether there was any.
    pub fn remove(&self, headers: &mut HeaderMap) -> bool {
        if self.present == 0 {
            return false;
        }
        if self.names_more {
            let named: Vec<HeaderName> = headers
                .get_all(header::CONNECTION)
                .iter()
                .flat_map(|v| list_tokens(v.as_bytes()))
                .filter_map(|n| HeaderName::from_bytes(n).ok())
                .collect();
            for name in named {
                headers.remove(name);
            }
        }
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            if self.present & (1 << i) != 0 {
                headers.remove(*name);
            }
        }
        if self.present & (1 << HOP_BY_HOP.len()) != 0 {
            let te_trailers = headers
                .get(header::TE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
            if !te_trailers {
                headers.remove(header::TE);
            }
        }
        true
    }
}

/// Removes connection-scoped fields (RFC 9110 §7.6.1), including those named in
/// `Connection`. Returns whether there was any to look at.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) -> bool {
    HopByHop::of(headers).remove(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_is_ascii_digits_only() {
        assert_eq!(content_length(b"0"), Some(0));
        assert_eq!(content_length(b"005"), Some(5));
        assert_eq!(
            content_length(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        for bad in [
            &b""[..],
            b"+5",
            b"-1",
            b" 5",
            b"5 ",
            b"5\xc2\xa0",
            b"5,5",
            b"0x5",
            b"1e3",
            b"18446744073709551616",
            b"00000000000000000001",
        ] {
            assert_eq!(content_length(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn framing_accepts_equal_lengths_and_chunked_alone() {
        let mut f = Framing::default();
        f.length(b"5").expect("valid");
        f.length(b"05").expect("equal");
        assert_eq!(f.length, Some(5));
        assert_eq!(f.length(b"6"), Err(FramingError::ConflictingLength));

        for (values, chunked) in [
            (&["chunked"][..], Ok(true)),
            (&["Chunked "], Ok(true)),
            (&["gzip, chunked"], Err(FramingError::UnsupportedCoding)),
            (
                &["chunked", "chunked"],
                Err(FramingError::UnsupportedCoding),
            ),
            (&["identity"], Err(FramingError::UnsupportedCoding)),
            (&["chunked, gzip"], Err(FramingError::UnsupportedCoding)),
            (&[""], Err(FramingError::UnsupportedCoding)),
            (&["chunked,"], Err(FramingError::UnsupportedCoding)),
            (&["chunked", ""], Err(FramingError::UnsupportedCoding)),
            (&[], Ok(false)),
        ] {
            let mut f = Framing::default();
            for v in values {
                f.coding(v.as_bytes());
            }
            assert_eq!(f.chunked(), chunked, "{values:?}");
        }
    }

    #[test]
    fn hosts_are_authorities_without_userinfo_or_path() {
        for good in [
            "a.test",
            "a.test:8080",
            "127.0.0.1",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:443",
            "xn--bcher-kva.example",
            "my_host",
        ] {
            assert!(valid_host(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            "a.test/evil?x",
            "a.test evil.test",
            "user@a.test",
            "a.test:",
            "a.test:123456",
            "a.test:x",
            ":80",
            "[::1",
            "[]",
            "[::1]x",
            "a.test\tb",
            "a.test#f",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn only_announced_and_allowed_trailers_pass() {
        let mut t = HeaderMap::new();
        for (n, v) in [
            ("x-checksum", "1"),
            ("content-length", "9"),
            ("host", "evil"),
            ("set-cookie", "a=b"),
            ("x-other", "2"),
        ] {
            t.insert(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        filter_trailers(
            &mut t,
            &[HeaderValue::from_static(
                "X-Checksum, content-length, set-cookie",
            )],
        );
        assert_eq!(t.len(), 1);
        assert_eq!(t["x-checksum"], "1");
    }

    #[test]
    fn hop_by_hop_fields_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        assert!(remove_hop_by_hop(&mut h));
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));

        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        remove_hop_by_hop(&mut h);
        assert!(h.contains_key(header::TE));
    }

    #[test]
    fn each_hop_by_hop_field_is_removed_on_its_own() {
        for name in HOP_BY_HOP.iter().copied().chain([&header::TE]) {
            let mut h = HeaderMap::new();
            h.insert(name.clone(), HeaderValue::from_static("x"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            assert!(remove_hop_by_hop(&mut h), "{name} not seen");
            assert!(!h.contains_key(name), "{name} kept");
            assert!(h.contains_key("x-kept"));
        }
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::HOST, HeaderValue::from_static("example"));
        assert!(remove_hop_by_hop(&mut h));
        assert_eq!(h.len(), 1);
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("example"));
        assert!(!remove_hop_by_hop(&mut h));
    }
}
