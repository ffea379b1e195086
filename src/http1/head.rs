//! Request and response heads: parsed from the front of a buffer (httparse, then canaryd's
//! framing rules) into `http` types whose values share the buffer, and encoded back.

use std::mem::MaybeUninit;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Uri, Version};

use super::fields::{connection_has, Framing, FramingError, HopByHop};
use super::{BodyLength, MAX_HEADERS};

/// Notes where each parsed field's name and value are in `buf` (`[name start, name end,
/// value start, value end]`), so that the values can later be shared out of the frozen head
/// rather than copied. The offsets must fit in `u32`.
fn record_spans(buf: &[u8], fields: &[httparse::Header<'_>], spans: &mut [[u32; 4]]) {
    let base = buf.as_ptr() as usize;
    for (span, h) in spans.iter_mut().zip(fields) {
        let name = h.name.as_ptr() as usize - base;
        let value = h.value.as_ptr() as usize - base;
        *span = [
            name as u32,
            (name + h.name.len()) as u32,
            value as u32,
            (value + h.value.len()) as u32,
        ];
    }
}

/// The name and value of a recorded field, the value shared with `head`.
// Inlined into the loops over a head's fields: a call per field returning both by value
// cost about 250 instructions per request (callgrind).
#[inline(always)]
fn field(head: &Bytes, span: &[u32; 4]) -> Option<(HeaderName, HeaderValue)> {
    let [n0, n1, v0, v1] = span.map(|x| x as usize);
    let name = HeaderName::from_bytes(&head[n0..n1]).ok()?;
    // A value httparse accepted is always a valid `HeaderValue` (`from_maybe_shared` checks it
    // again; skipping that would need `unsafe`, which the crate forbids).
    let value = HeaderValue::from_maybe_shared(head.slice(v0..v1)).ok()?;
    Some((name, value))
}

/// A request head canaryd serves itself. The framing fields (`Content-Length`,
/// `Transfer-Encoding`) and `Expect` are consumed: `body` and `expect_continue` say what they
/// said, and the encoder writes the framing again.
#[derive(Debug)]
pub struct RequestHead {
    /// The method.
    pub method: Method,
    /// The target as sent: origin-form, absolute-form or `*`.
    pub uri: Uri,
    /// Every other field, in order.
    pub headers: HeaderMap,
    /// How the body is framed.
    pub body: BodyLength,
    /// The client did not ask to close after this request.
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for a `100 Continue` before the body.
    pub expect_continue: bool,
    /// The `Trailer` values: which trailer fields a chunked body may carry on.
    pub trailer: Vec<HeaderValue>,
}

/// A request canaryd refuses from its head, with the status that says why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// 400, 417, 431 or 501.
    pub status: StatusCode,
    /// A short reason for the response body and the log.
    pub reason: &'static str,
}

impl From<FramingError> for Rejection {
    fn from(e: FramingError) -> Self {
        let status = match e {
            FramingError::UnsupportedCoding => StatusCode::NOT_IMPLEMENTED,
            FramingError::InvalidLength
            | FramingError::ConflictingLength
            | FramingError::BothFramings => StatusCode::BAD_REQUEST,
        };
        let reason = match e {
            FramingError::InvalidLength => "invalid content-length",
            FramingError::ConflictingLength => "conflicting content-length values",
            FramingError::UnsupportedCoding => {
                "transfer codings other than chunked are not implemented"
            }
            FramingError::BothFramings => "both transfer-encoding and content-length",
        };
        Rejection { status, reason }
    }
}

/// The result of looking at the bytes of a request head.
// Returned once per request and moved straight into the request: boxing the head would cost
// an allocation per request to save a copy.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ParsedRequest {
    /// The head is not complete yet (and not over the limit).
    Partial,
    /// A complete head, taken from the buffer.
    Complete(RequestHead),
    /// Not one canaryd's server side takes (another HTTP version, an upgrade, a head that
    /// httparse refuses, too many fields): the buffer is as it was.
    HandOff,
    /// A head canaryd refuses itself; the buffer is as it was.
    Reject(Rejection),
}

/// A request head over the limit, complete or not.
const TOO_LARGE: Rejection = Rejection {
    status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
    reason: "request head larger than listen.max_header_bytes",
};

/// Parses a request head at the front of `buf`. `max_head`: a head longer than this, complete
/// or not, is refused with 431 (whatever version it claims: hyper, which serves what is handed
/// over, would take heads up to about twice its buffer size).
pub fn parse_request(buf: &mut BytesMut, max_head: usize) -> ParsedRequest {
    let mut spans = [[0u32; 4]; MAX_HEADERS];
    let (len, method, target, count) = {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let len = match httparse::ParserConfig::default()
            .parse_request_with_uninit_headers(&mut req, buf, &mut slots)
        {
            Ok(httparse::Status::Complete(len)) if len <= max_head => len,
            Ok(httparse::Status::Complete(_)) => return ParsedRequest::Reject(TOO_LARGE),
            Ok(httparse::Status::Partial) if buf.len() >= max_head => {
                return ParsedRequest::Reject(TOO_LARGE)
            }
            Ok(httparse::Status::Partial) => return ParsedRequest::Partial,
            // A fault past the limit: had the bytes come in two reads, the first would have
            // been refused as too large. The answer must not depend on how the bytes arrived.
            Err(_) if buf.len() > max_head && incomplete(&buf[..max_head]) => {
                return ParsedRequest::Reject(TOO_LARGE)
            }
            // hyper answers it (or, for the HTTP/2 preface, serves it).
            Err(_) => return ParsedRequest::HandOff,
        };
        let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
            return ParsedRequest::HandOff;
        };
        let Ok(method) = Method::from_bytes(method.as_bytes()) else {
            return ParsedRequest::HandOff;
        };
        let base = buf.as_ptr() as usize;
        let target =
            target.as_ptr() as usize - base..target.as_ptr() as usize - base + target.len();
        // Offsets within a head of at most `max_head` bytes (the config caps that far below
        // 4 GiB).
        record_spans(buf, req.headers, &mut spans);
        (len, method, target, req.headers.len())
    };
    let head = buf.split_to(len).freeze();
    match build_request(&head, method, target, &spans[..count]) {
        Ok(parsed) => ParsedRequest::Complete(parsed),
        Err(refused) => {
            // Put the head back in front of what followed it.
            let mut whole = BytesMut::with_capacity(head.len() + buf.len());
            whole.extend_from_slice(&head);
            whole.extend_from_slice(buf);
            *buf = whole;
            match refused {
                None => ParsedRequest::HandOff,
                Some(r) => ParsedRequest::Reject(r),
            }
        }
    }
}

/// Whether `bytes` are the valid start of a request head that has not ended yet.
fn incomplete(bytes: &[u8]) -> bool {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    matches!(
        httparse::ParserConfig::default()
            .parse_request_with_uninit_headers(&mut req, bytes, &mut slots),
        Ok(httparse::Status::Partial)
    )
}

/// The request of a parsed head: `Err(None)` to hand it over, `Err(Some(_))` to refuse it.
fn build_request(
    head: &Bytes,
    method: Method,
    target: std::ops::Range<usize>,
    spans: &[[u32; 4]],
) -> Result<RequestHead, Option<Rejection>> {
    const BAD_TARGET: Rejection = Rejection {
        status: StatusCode::BAD_REQUEST,
        reason: "invalid request target",
    };
    let uri = Uri::from_maybe_shared(head.slice(target)).map_err(|_| Some(BAD_TARGET))?;
    // Room for the field the proxy adds upstream, so that adding it does not grow the map.
    let mut headers = HeaderMap::with_capacity(spans.len() + 1);
    let mut framing = Framing::default();
    let mut keep_alive = true;
    let mut expect_continue = false;
    let mut trailer = Vec::new();
    for span in spans {
        let (name, value) = field(head, span).ok_or(None)?;
        // Comparisons with standard names (an enum compare each), not string matches.
        if name == header::CONTENT_LENGTH {
            framing
                .length(value.as_bytes())
                .map_err(|e| Some(e.into()))?;
            continue;
        } else if name == header::TRANSFER_ENCODING {
            framing.coding(value.as_bytes());
            continue;
        } else if name == header::EXPECT {
            if !value.as_bytes().eq_ignore_ascii_case(b"100-continue") {
                return Err(Some(Rejection {
                    status: StatusCode::EXPECTATION_FAILED,
                    reason: "the only expectation supported is 100-continue",
                }));
            }
            expect_continue = true;
            continue;
        } else if name == header::UPGRADE {
            // Upgrades (WebSocket) are hyper's to serve.
            return Err(None);
        } else if name == header::CONNECTION {
            keep_alive &= !connection_has(value.as_bytes(), b"close");
        } else if name == header::TRAILER {
            trailer.push(value.clone());
        }
        headers.append(name, value);
    }
    let chunked = framing.chunked().map_err(|e| Some(e.into()))?;
    let body = match (chunked, framing.length) {
        (true, Some(_)) => return Err(Some(FramingError::BothFramings.into())),
        (true, None) => BodyLength::Chunked,
        (false, Some(0) | None) => BodyLength::Empty,
        (false, Some(n)) => BodyLength::Length(n),
    };
    Ok(RequestHead {
        method,
        uri,
        headers,
        body,
        keep_alive,
        expect_continue: expect_continue && body != BodyLength::Empty,
        trailer,
    })
}

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseBody {
    /// No body: `HEAD`, 1xx, 204, 304, or a length of 0.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked.
    Chunked,
    /// Everything until the upstream closes the connection.
    Close,
    /// `101 Switching Protocols`: the connection is a tunnel's from here.
    Upgrade,
}

/// A parsed response head and what it says about the connection and the body.
#[derive(Debug)]
pub struct ResponseHead {
    /// Status, version and the fields to pass on (framing fields consumed).
    pub response: Response<()>,
    /// How the body is delimited.
    pub body: ResponseBody,
    /// Neither `Connection: close`, nor HTTP/1.0 without keep-alive, nor a doubtful framing.
    pub reuse: bool,
    /// Whether connection-scoped fields remain in the headers. `Transfer-Encoding`,
    /// `Content-Length`, `Keep-Alive` and a `Connection` naming only `close` or `keep-alive`
    /// are consumed here.
    pub hop_by_hop: bool,
    /// The `Trailer` values: which trailer fields a chunked body may carry on.
    pub trailer: Vec<HeaderValue>,
}

/// Why a response head is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Not an HTTP/1.x response head.
    #[error("invalid response head: {0}")]
    Syntax(String),
    /// A head (complete or not) over [`super::MAX_RESPONSE_HEAD`].
    #[error("response head larger than 64 KiB")]
    TooLarge,
    /// Invalid framing fields.
    #[error("{0}")]
    Framing(#[from] FramingError),
}

/// Parses a response head at the front of `buf`, consuming it once complete. `head_request`:
/// the response to a `HEAD` has no body whatever its fields say.
pub fn parse_response(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<ResponseHead>, ResponseError> {
    let mut spans = [[0u32; 4]; MAX_HEADERS];
    let (len, code, minor, count) = {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
            .map_err(|e| ResponseError::Syntax(e.to_string()))?;
        let httparse::Status::Complete(len) = parsed else {
            if buf.len() > super::MAX_RESPONSE_HEAD {
                return Err(ResponseError::TooLarge);
            }
            return Ok(None);
        };
        if len > super::MAX_RESPONSE_HEAD {
            return Err(ResponseError::TooLarge);
        }
        record_spans(buf, resp.headers, &mut spans);
        (
            len,
            resp.code.unwrap_or(0),
            resp.version.unwrap_or(1),
            resp.headers.len(),
        )
    };
    let head = buf.split_to(len).freeze();
    let status = StatusCode::from_u16(code)
        .map_err(|_| ResponseError::Syntax("invalid status code".into()))?;
    // Room for the field the proxy adds to name the arm, so that adding it does not grow
    // (rehash) the map.
    let mut headers = HeaderMap::with_capacity(count + 1);
    let mut hop = HopByHop::default();
    let mut framing = Framing::default();
    let mut length_value = None;
    let mut close = false;
    let mut keep_alive = false;
    let mut trailer = Vec::new();
    for span in &spans[..count] {
        let (name, value) =
            field(&head, span).ok_or_else(|| ResponseError::Syntax("invalid field".into()))?;
        if name == header::CONTENT_LENGTH {
            framing.length(value.as_bytes())?;
            // Written again, once, with the canonical value.
            length_value.get_or_insert(value);
            continue;
        } else if name == header::TRANSFER_ENCODING {
            // The framing of this hop: the proxy frames the response again.
            framing.coding(value.as_bytes());
            continue;
        }
        match name.as_str() {
            "connection" => {
                let mut names_more = false;
                for token in super::fields::list_tokens(value.as_bytes()) {
                    let c = token.eq_ignore_ascii_case(b"close");
                    let k = token.eq_ignore_ascii_case(b"keep-alive");
                    close |= c;
                    keep_alive |= k;
                    names_more |= !c && !k;
                }
                if !names_more {
                    // Only about this connection: nothing for the client.
                    continue;
                }
            }
            "keep-alive" => continue,
            "trailer" => trailer.push(value.clone()),
            _ => {}
        }
        hop.see(&name, &value);
        headers.append(name, value);
    }
    let mut reuse = !close && (minor == 1 || keep_alive);
    let no_body = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let body = if status == StatusCode::SWITCHING_PROTOCOLS {
        // The connection speaks another protocol now: never back to the pool, even when
        // nobody takes it for a tunnel.
        reuse = false;
        ResponseBody::Upgrade
    } else if framing.coded && !no_body {
        if !framing.chunked()? {
            return Err(FramingError::UnsupportedCoding.into());
        }
        // Both framings is a smuggling pattern: believe the coding, then close. The length
        // is not passed on: it does not describe the body the client will get.
        reuse &= framing.length.is_none();
        ResponseBody::Chunked
    } else {
        if let Some(n) = framing.length {
            let mut digits = itoa::Buffer::new();
            let canonical = digits.format(n);
            // The value as received is shared with the head; a new one only for a value that
            // is not already canonical (leading zeros).
            let value = match length_value {
                Some(v) if v.as_bytes() == canonical.as_bytes() => v,
                _ => HeaderValue::from_str(canonical).map_err(|_| FramingError::InvalidLength)?,
            };
            headers.append(header::CONTENT_LENGTH, value);
        }
        match framing.length {
            _ if no_body => ResponseBody::Empty,
            Some(0) => ResponseBody::Empty,
            Some(n) => ResponseBody::Length(n),
            None => {
                reuse = false;
                ResponseBody::Close
            }
        }
    };
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    *response.headers_mut() = headers;
    Ok(Some(ResponseHead {
        response,
        body,
        reuse,
        hop_by_hop: hop.any(),
        trailer,
    }))
}

/// Writes `name: value` and CRLF. The separators are single bytes: `put_slice` of a short
/// constant still ends in a `memcpy` call.
pub fn put_field(buf: &mut BytesMut, name: &[u8], value: &[u8]) {
    buf.reserve(name.len() + value.len() + 4);
    buf.extend_from_slice(name);
    buf.put_u8(b':');
    buf.put_u8(b' ');
    buf.extend_from_slice(value);
    buf.put_u8(b'\r');
    buf.put_u8(b'\n');
}

/// Writes a `content-length` field with `n`'s decimal digits.
pub fn put_length(buf: &mut BytesMut, n: u64) {
    let mut digits = itoa::Buffer::new();
    put_field(buf, b"content-length", digits.format(n).as_bytes());
}

/// Encodes a request head (HTTP/1.1, `target` as given) into `buf`: the request's fields in
/// order except the framing ones, `Expect`, and those `skip` names; then `extra`; then the
/// framing for `body` (a method that defines a body says `content-length: 0` when it has
/// none).
pub fn encode_request<'n, 'v>(
    buf: &mut BytesMut,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    skip: impl Fn(&HeaderName) -> bool,
    extra: impl Iterator<Item = (&'n HeaderName, &'v HeaderValue)>,
    body: BodyLength,
) {
    buf.reserve(512);
    buf.put_slice(method.as_str().as_bytes());
    buf.put_u8(b' ');
    buf.put_slice(target.as_bytes());
    buf.put_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if *name == header::CONTENT_LENGTH
            || *name == header::TRANSFER_ENCODING
            || *name == header::EXPECT
            || skip(name)
        {
            continue;
        }
        put_field(buf, name.as_str().as_bytes(), value.as_bytes());
    }
    for (name, value) in extra {
        put_field(buf, name.as_str().as_bytes(), value.as_bytes());
    }
    match body {
        BodyLength::Length(n) => put_length(buf, n),
        BodyLength::Chunked => put_field(buf, b"transfer-encoding", b"chunked"),
        BodyLength::Empty => {
            if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
                put_length(buf, 0);
            }
        }
    }
    buf.put_slice(b"\r\n");
}

/// What [`encode_response`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseFraming {
    /// How the body goes on the wire.
    pub body: BodyLength,
    /// Whether `body` is to be sent at all (`false`: `HEAD`, 1xx, 204, 304).
    pub send_body: bool,
    /// The connection closes after this response.
    pub close: bool,
    /// The response already has a `Date` field.
    pub has_date: bool,
}

/// Encodes a response head into `buf`, all but the `Date` field and the final CRLF (see
/// [`ResponseFraming::has_date`]). `exact`: the body's size when known. `close`: the
/// connection closes after it (`Connection: close` is added unless a `Connection` field says
/// so already).
pub fn encode_response(
    buf: &mut BytesMut,
    status: StatusCode,
    headers: &HeaderMap,
    exact: Option<u64>,
    head_request: bool,
    mut close: bool,
) -> ResponseFraming {
    buf.reserve(1024);
    buf.put_slice(b"HTTP/1.1 ");
    buf.put_slice(status.as_str().as_bytes());
    buf.put_u8(b' ');
    buf.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    buf.put_slice(b"\r\n");
    let mut framing = Framing::default();
    let mut has_date = false;
    let mut says_close = false;
    for (name, value) in headers {
        if *name == header::CONTENT_LENGTH {
            // Only a valid length, the same in every field, is believed; otherwise the body
            // goes chunked and the connection closes.
            if framing.length(value.as_bytes()).is_err() {
                close = true;
                framing.length = None;
            }
            continue;
        } else if *name == header::TRANSFER_ENCODING {
            continue;
        } else if *name == header::CONNECTION {
            says_close |= connection_has(value.as_bytes(), b"close");
        } else if *name == header::DATE {
            has_date = true;
        }
        put_field(buf, name.as_str().as_bytes(), value.as_bytes());
    }
    close |= says_close;
    // Another protocol would follow a 101; canaryd's server side never asked for one.
    close |= status.is_informational();
    let send_body = !(head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED);
    let body = match framing.length.or(exact) {
        Some(n) => {
            if send_body || framing.length.is_some() {
                put_length(buf, n);
            }
            BodyLength::Length(n)
        }
        None if send_body => {
            put_field(buf, b"transfer-encoding", b"chunked");
            BodyLength::Chunked
        }
        None => BodyLength::Empty,
    };
    if close && !says_close {
        put_field(buf, b"connection", b"close");
    }
    ResponseFraming {
        body,
        send_body,
        close,
        has_date,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &[u8]) -> (ParsedRequest, BytesMut) {
        let mut buf = BytesMut::from(text);
        (parse_request(&mut buf, 64 * 1024), buf)
    }

    fn head(text: &str, head_request: bool) -> (Option<ResponseHead>, BytesMut) {
        let mut buf = BytesMut::from(text.as_bytes());
        let parsed = parse_response(&mut buf, head_request).expect("valid head");
        (parsed, buf)
    }

    #[test]
    fn a_request_head_is_taken_with_its_framing_consumed() {
        let (p, rest) = request(
            b"POST /v1/predict?x=1 HTTP/1.1\r\nHost: a\r\nX-User-Id: 42\r\nContent-Length: 5\r\n\
              content-length: 005\r\nExpect: 100-continue\r\n\r\nhello",
        );
        let ParsedRequest::Complete(req) = p else {
            panic!("not taken: {p:?}");
        };
        assert_eq!(req.method, Method::POST);
        assert_eq!(req.uri, "/v1/predict?x=1");
        assert_eq!(req.body, BodyLength::Length(5));
        assert!(req.keep_alive && req.expect_continue);
        let names: Vec<_> = req.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["host", "x-user-id"]);
        assert_eq!(&rest[..], b"hello");

        let (p, _) = request(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\
              Connection: keep-alive, Close\r\n\r\n",
        );
        let ParsedRequest::Complete(req) = p else {
            panic!("not taken: {p:?}");
        };
        assert_eq!(req.body, BodyLength::Chunked);
        assert!(!req.keep_alive);
        assert_eq!(req.trailer, [HeaderValue::from_static("x-sum")]);
    }

    #[test]
    fn request_framing_errors_are_refused_with_their_status() {
        for (text, status) in [
            (
                &b"POST / HTTP/1.1\r\nContent-Length: 5\xc2\xa0\r\n\r\n"[..],
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                400,
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n", 400),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                501,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
                501,
            ),
            (b"POST / HTTP/1.1\r\nExpect: 200-ok\r\n\r\n", 417),
        ] {
            let (p, rest) = request(text);
            match p {
                ParsedRequest::Reject(r) => assert_eq!(r.status.as_u16(), status, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
            assert_eq!(&rest[..], text, "the buffer is kept");
        }
    }

    #[test]
    fn unusual_requests_are_handed_over_untouched() {
        for text in [
            &b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"[..],
            b"GET / HTTP/1.0\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        ] {
            let (p, rest) = request(text);
            assert!(matches!(p, ParsedRequest::HandOff), "{text:?}: {p:?}");
            assert_eq!(&rest[..], text);
        }
        let text = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut buf = BytesMut::from(&text[..]);
        assert!(matches!(
            parse_request(&mut buf, text.len() - 1),
            ParsedRequest::Reject(TOO_LARGE)
        ));
        assert!(matches!(
            parse_request(&mut buf, text.len()),
            ParsedRequest::Complete(_)
        ));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        let text = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(request(text.as_bytes()).0, ParsedRequest::HandOff));
        let (p, _) = request(b"GET / HTTP/1.1\r\nHost: a\r\n");
        assert!(matches!(p, ParsedRequest::Partial));
        // A fault past the limit is the same 431 whether or not the bytes came in one read.
        let over = b"GET / HTTP/1.1\r\nx: aaaaaaaaaaaaaaaaaaaa\x01\r\n\r\n";
        let mut whole = BytesMut::from(&over[..]);
        assert!(matches!(
            parse_request(&mut whole, 24),
            ParsedRequest::Reject(TOO_LARGE)
        ));
        let mut within = BytesMut::from(&b"GET / HTTP/1.1\r\nx\x01: a\r\n\r\n"[..]);
        assert!(matches!(
            parse_request(&mut within, 24),
            ParsedRequest::HandOff
        ));
        let mut partial = BytesMut::from(&b"GET / HTTP/1.1\r\nx: aaaaaaaa"[..]);
        assert!(matches!(
            parse_request(&mut partial, 20),
            ParsedRequest::Reject(TOO_LARGE)
        ));
    }

    #[test]
    fn response_heads_decide_framing_and_reuse() {
        let (h, rest) = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false);
        let h = h.expect("complete");
        assert_eq!(h.body, ResponseBody::Length(5));
        assert!(h.reuse);
        assert_eq!(&rest[..], b"hello");
        assert_eq!(h.response.headers()["content-length"], "5");
        assert!(!h.hop_by_hop);

        let (h, _) = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 05\r\ncontent-length: 5\r\n\r\n",
            false,
        );
        let h = h.expect("complete");
        let lengths: Vec<_> = h
            .response
            .headers()
            .get_all("content-length")
            .iter()
            .collect();
        assert_eq!(lengths, ["5"], "one canonical length");

        let (h, _) = head(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 1\r\n\r\n",
            false,
        );
        let h = h.expect("complete");
        let names: Vec<_> = h.response.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["content-length"]);
        assert!(!h.hop_by_hop);
        let (h, _) = head(
            "HTTP/1.1 200 OK\r\nConnection: x-private\r\nx-private: 1\r\nContent-Length: 1\r\n\r\n",
            false,
        );
        let h = h.expect("complete");
        assert!(
            h.hop_by_hop,
            "Connection names a field: the proxy removes both"
        );
        assert_eq!(h.response.headers().len(), 3);
        let (h, _) = head(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            false,
        );
        let h = h.expect("complete");
        assert_eq!(h.body, ResponseBody::Upgrade);
        assert!(!h.reuse && h.hop_by_hop);
        assert_eq!(h.response.headers()["upgrade"], "websocket");

        let (h, _) = head(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            false,
        );
        assert!(!h.expect("complete").reuse);
        let (h, _) = head("HTTP/1.1 200 OK\r\n\r\n", false);
        let h = h.expect("complete");
        assert_eq!(h.body, ResponseBody::Close);
        assert!(!h.reuse);
        let (h, _) = head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false);
        assert!(!h.expect("complete").reuse);
        let (h, _) = head(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
            false,
        );
        assert!(h.expect("complete").reuse);

        let (h, _) = head("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true);
        let h = h.expect("complete");
        assert_eq!(h.body, ResponseBody::Empty);
        assert_eq!(h.response.headers()["content-length"], "9");
        let (h, _) = head(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            false,
        );
        assert_eq!(h.expect("complete").body, ResponseBody::Empty);

        let (h, _) = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n",
            false,
        );
        let h = h.expect("complete");
        assert_eq!(h.body, ResponseBody::Chunked);
        assert!(!h.reuse, "both framings: close after");
        assert!(!h.response.headers().contains_key("content-length"));
        assert_eq!(h.trailer, [HeaderValue::from_static("x-sum")]);

        let (h, rest) = head("HTTP/1.1 200 OK\r\nContent-Le", false);
        assert!(h.is_none());
        assert_eq!(rest.len(), 27, "a partial head stays buffered");
    }

    #[test]
    fn bad_response_heads_are_errors() {
        for text in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\xc2\xa0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 999999 OK\r\n\r\n",
            b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(text);
            assert!(parse_response(&mut buf, false).is_err(), "{text:?}");
        }
        let mut big = BytesMut::from(&b"HTTP/1.1 200 OK\r\nx-big: "[..]);
        big.extend_from_slice(&[b'a'; super::super::MAX_RESPONSE_HEAD]);
        assert_eq!(
            parse_response(&mut big, false).err(),
            Some(ResponseError::TooLarge)
        );
        let mut complete = BytesMut::from(&b"HTTP/1.1 200 OK\r\nx-big: "[..]);
        complete.extend_from_slice(&[b'a'; 70_000]);
        complete.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(
            parse_response(&mut complete, false).err(),
            Some(ResponseError::TooLarge),
            "a complete head over the limit too"
        );
    }

    #[test]
    fn request_heads_are_encoded_with_canonical_framing() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("h"));
        headers.append("content-length", HeaderValue::from_static("05"));
        headers.append("content-length", HeaderValue::from_static("5"));
        headers.insert("expect", HeaderValue::from_static("100-continue"));
        headers.insert("x-skip", HeaderValue::from_static("1"));
        let extra = HeaderName::from_static("x-extra");
        let v = HeaderValue::from_static("2");
        let mut buf = BytesMut::new();
        encode_request(
            &mut buf,
            &Method::POST,
            "/p?q=1",
            &headers,
            |n| n == "x-skip",
            [(&extra, &v)].into_iter(),
            BodyLength::Length(5),
        );
        assert_eq!(
            &buf[..],
            b"POST /p?q=1 HTTP/1.1\r\nhost: h\r\nx-extra: 2\r\ncontent-length: 5\r\n\r\n"
        );
        for (method, body, framing) in [
            (
                Method::POST,
                BodyLength::Chunked,
                "transfer-encoding: chunked\r\n",
            ),
            (Method::PUT, BodyLength::Empty, "content-length: 0\r\n"),
            (Method::GET, BodyLength::Empty, ""),
        ] {
            let mut buf = BytesMut::new();
            encode_request(
                &mut buf,
                &method,
                "/",
                &HeaderMap::new(),
                |_| false,
                std::iter::empty(),
                body,
            );
            assert_eq!(
                buf,
                format!("{method} / HTTP/1.1\r\n{framing}\r\n").as_bytes()
            );
        }
    }

    #[test]
    fn response_heads_are_encoded_with_one_valid_length() {
        let mut headers = HeaderMap::new();
        headers.append("content-length", HeaderValue::from_static("2"));
        headers.append("content-length", HeaderValue::from_static("2"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        let mut buf = BytesMut::new();
        let f = encode_response(&mut buf, StatusCode::OK, &headers, None, false, false);
        assert_eq!(&buf[..], b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n");
        assert_eq!(f.body, BodyLength::Length(2));
        assert!(f.send_body && !f.close && !f.has_date);

        let mut buf = BytesMut::new();
        let f = encode_response(
            &mut buf,
            StatusCode::OK,
            &HeaderMap::new(),
            None,
            false,
            true,
        );
        assert_eq!(
            &buf[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n"
        );
        assert_eq!(f.body, BodyLength::Chunked);

        let mut buf = BytesMut::new();
        let f = encode_response(
            &mut buf,
            StatusCode::NO_CONTENT,
            &HeaderMap::new(),
            Some(0),
            false,
            false,
        );
        assert_eq!(&buf[..], b"HTTP/1.1 204 No Content\r\n");
        assert!(!f.send_body);
    }
}
