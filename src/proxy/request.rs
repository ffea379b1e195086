//! What the proxy reads from a request's header fields in one pass, and the rules a trusted
//! edge applies before a request may reach an upstream.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Version};

use crate::body::RequestBody;
use crate::http1::fields::{self, connection_has, HopByHop};
use crate::upstream::forwarded::X_FORWARDED_FOR;

/// What one pass over a request's headers finds: what routing, the upgrade check, the
/// forwarding headers and hop-by-hop removal need, instead of a hashed lookup for each.
pub(super) struct RequestScan<'a> {
    /// The first value of the router's sticky header.
    pub(super) sticky: Option<&'a HeaderValue>,
    /// The first value of the router's override header, if one is configured.
    pub(super) override_value: Option<&'a HeaderValue>,
    pub(super) host: Option<&'a HeaderValue>,
    /// How many `Host` fields.
    pub(super) hosts: usize,
    /// An `Expect` field.
    pub(super) expect: bool,
    /// A `Content-Length` field.
    pub(super) content_length: bool,
    pub(super) upgrade: Option<&'a HeaderValue>,
    /// A `Connection` header lists `upgrade`.
    pub(super) connection_upgrade: bool,
    /// The client sent `X-Forwarded-For`.
    pub(super) forwarded_for: bool,
    pub(super) hop: HopByHop,
}

impl<'a> RequestScan<'a> {
    pub(super) fn of(
        headers: &'a HeaderMap,
        (sticky, override_name): (&HeaderName, Option<&HeaderName>),
    ) -> Self {
        let mut scan = RequestScan {
            sticky: None,
            override_value: None,
            host: None,
            hosts: 0,
            expect: false,
            content_length: false,
            upgrade: None,
            connection_upgrade: false,
            forwarded_for: false,
            hop: HopByHop::default(),
        };
        for (name, value) in headers {
            if name == sticky {
                scan.sticky.get_or_insert(value);
            } else if Some(name) == override_name {
                scan.override_value.get_or_insert(value);
            }
            match name.as_str() {
                "host" => {
                    scan.host.get_or_insert(value);
                    scan.hosts += 1;
                }
                "expect" => scan.expect = true,
                "content-length" => scan.content_length = true,
                "x-forwarded-for" => scan.forwarded_for = true,
                "connection" => {
                    scan.connection_upgrade |= connection_has(value.as_bytes(), b"upgrade");
                    scan.hop.see(name, value);
                }
                "upgrade" => {
                    scan.upgrade.get_or_insert(value);
                    scan.hop.see(name, value);
                }
                _ => scan.hop.see(name, value),
            }
        }
        scan
    }
}

/// What [`RequestScan`] found that outlives the borrow of the headers.
pub(super) struct Found {
    pub(super) host: Option<HeaderValue>,
    pub(super) forwarded_for: bool,
    pub(super) hop: HopByHop,
    pub(super) expect: bool,
    pub(super) content_length: bool,
}

/// The rules of a trusted edge for what may reach an upstream, whichever side parsed the
/// request: `CONNECT` is refused (405: canaryd is no forward proxy), the asterisk-form target
/// is for `OPTIONS` only, an absolute-form target is `http` or `https` with no user info, an
/// HTTP/1.1 request has exactly one valid `Host` (HTTP/1.0: at most one), an HTTP/2 `host`
/// field agrees with `:authority`, and the only transfer coding is chunked (501 otherwise).
pub(super) fn check(
    req: &Request<RequestBody>,
    scan: &RequestScan<'_>,
) -> Result<(), (StatusCode, &'static str)> {
    const fn bad(reason: &'static str) -> Result<(), (StatusCode, &'static str)> {
        Err((StatusCode::BAD_REQUEST, reason))
    }
    if req.method() == Method::CONNECT {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not served (canaryd is a reverse proxy)",
        ));
    }
    let uri = req.uri();
    if uri.path() == "*" && req.method() != Method::OPTIONS {
        return bad("the asterisk-form target is only for OPTIONS");
    }
    if scan.hosts > 1 {
        return bad("more than one Host field");
    }
    if scan.hosts == 0 && req.version() == Version::HTTP_11 {
        return bad("an HTTP/1.1 request without Host");
    }
    if scan.host.is_some_and(|h| !fields::valid_host(h.as_bytes())) {
        return bad("invalid Host");
    }
    match uri.scheme_str() {
        None | Some("http" | "https") => {}
        Some(_) => return bad("a request target whose scheme is not http or https"),
    }
    if let Some(authority) = uri.authority() {
        if uri.scheme().is_none() {
            // `host:port` alone is CONNECT's form, refused above.
            return bad("the authority-form target is only for CONNECT");
        }
        if authority.as_str().contains('@') {
            return bad("user info in the request target");
        }
        if req.version() == Version::HTTP_2
            && scan.host.is_some_and(|h| {
                !h.as_bytes()
                    .eq_ignore_ascii_case(authority.as_str().as_bytes())
            })
        {
            return bad("Host differs from :authority");
        }
    }
    if scan.hop.transfer_encoding() {
        let mut framing = fields::Framing::default();
        for v in req.headers().get_all(header::TRANSFER_ENCODING) {
            framing.coding(v.as_bytes());
        }
        if framing.chunked().is_err() {
            return Err((
                StatusCode::NOT_IMPLEMENTED,
                "transfer codings other than chunked are not implemented",
            ));
        }
    }
    Ok(())
}

/// The `X-Forwarded-For` value to send: the client's list, if any, with the peer appended.
pub(super) fn forwarded_for(headers: &HeaderMap, peer_ip: &HeaderValue) -> HeaderValue {
    let mut sent = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
    if sent.peek().is_none() {
        return peer_ip.clone();
    }
    let mut joined = Vec::new();
    for v in sent {
        joined.extend_from_slice(v.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(peer_ip.as_bytes());
    HeaderValue::from_bytes(&joined).unwrap_or_else(|_| peer_ip.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.2"));
        let peer = HeaderValue::from_static("192.0.2.7");
        assert_eq!(forwarded_for(&h, &peer), "10.0.0.1, 10.0.0.2, 192.0.2.7");
        assert_eq!(forwarded_for(&HeaderMap::new(), &peer), "192.0.2.7");
    }
}
