//! canaryd's HTTP/1.1 server side for the common request: parsed, proxied and answered by the
//! connection's task itself, without hyper's dispatcher, body channel or buffered I/O layers.
//!
//! The fast path takes an HTTP/1.1 request whose body, if any, has a `Content-Length` and has
//! arrived whole with its head (a plain `GET`, a JSON `POST` to a model). Everything else is
//! handed to hyper at the request boundary, together with every byte read so far, and hyper
//! serves the rest of the connection as before: HTTP/2 (prior knowledge), HTTP/1.0, chunked
//! or still-arriving request bodies, `Expect: 100-continue`, `Upgrade` (WebSocket),
//! `CONNECT`, and every malformed or oversized head (hyper answers those with its 400 or 431).
//! So the fast path never decides what a bad request gets, and no request changes hands in
//! the middle.
//!
//! Responses are framed by their `Content-Length` when the upstream gave one (or the body's
//! size is known), chunked otherwise (with the upstream's trailers, if any). The head and a
//! small body go out in one write. Pipelined requests are served in order.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::task::Poll;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::{Either, Full};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::conn::{Event, Guard};
use crate::h1::put_raw_field as put_field;
use crate::proxy::{Proxy, ProxyBody};
use crate::upstream::UpstreamBody;

/// As many header fields as hyper accepts by default; a request with more is handed to it
/// (and gets its 431).
const MAX_HEADERS: usize = 100;
/// Read size for request heads.
const READ: usize = 8 * 1024;
/// Response data up to this size is copied behind the head, so both leave in one write.
const COPY_MAX: usize = 16 * 1024;
/// Buffered response bytes are written once they reach this, even if more are ready.
const FLUSH_AT: usize = 64 * 1024;

/// How the fast path left a connection.
pub(crate) enum Served<S> {
    /// Closed: the client is done, a timeout expired, or the response said so.
    Closed,
    /// A request the fast path does not take: hyper serves the connection from here, starting
    /// with these bytes (already read, not yet answered).
    HandOff(S, Bytes),
}

/// What the connection needs to know about a parsed request beyond the request itself.
struct Meta {
    /// The client did not ask to close after this request.
    keep_alive: bool,
    /// `HEAD`: the response has no body whatever its headers say.
    head: bool,
}

/// The result of looking at the bytes read so far.
// Returned once per request and moved straight into the proxy: boxing the request would cost
// an allocation per request to save a copy.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    /// The head is not complete yet.
    Partial,
    /// A request for the fast path; its head and body were taken from the buffer.
    Request(Request<UpstreamBody>, Meta),
    /// Not for the fast path; the buffer is as it was.
    HandOff,
}

/// Serves HTTP/1.1 requests on `io` until the connection ends or a request needs hyper.
/// `max_head`: a head still incomplete after this many bytes is handed over (hyper answers
/// it with 431).
pub(crate) async fn serve<S>(
    mut io: S,
    proxy: &Proxy,
    guard: &mut Guard<'_>,
    max_head: usize,
) -> io::Result<Served<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut rbuf = BytesMut::with_capacity(READ);
    // Allocated by the first response, then reused.
    let mut wbuf = BytesMut::new();
    loop {
        let (req, meta) = loop {
            if !rbuf.is_empty() {
                match parse(&mut rbuf, max_head) {
                    Parsed::Request(req, meta) => break (req, meta),
                    Parsed::HandOff => return Ok(Served::HandOff(io, rbuf.freeze())),
                    // Too large to be served whatever follows: hyper answers it (431).
                    Parsed::Partial if rbuf.len() >= max_head => {
                        return Ok(Served::HandOff(io, rbuf.freeze()))
                    }
                    Parsed::Partial => {}
                }
            }
            if rbuf.capacity() - rbuf.len() < READ / 4 {
                rbuf.reserve(READ);
            }
            let read =
                poll_fn(|cx| tokio_util::io::poll_read_buf(Pin::new(&mut io), cx, &mut rbuf));
            match guarded(guard, false, pin!(read)).await {
                // The client closed (perhaps in the middle of a head), or a timeout expired.
                None | Some(Ok(0)) => return Ok(Served::Closed),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
            }
        };
        let Some(resp) = guarded(guard, true, pin!(proxy.handle(req))).await else {
            return Ok(Served::Closed);
        };
        let close = !meta.keep_alive || guard.draining();
        match respond(&mut io, &mut wbuf, guard, resp, meta.head, close).await? {
            // A stop that came while the response was on its way ends the connection now.
            Some(true) if !guard.draining() => {}
            Some(_) => {
                // A failed shutdown changes nothing: the socket is closed when dropped. Over
                // TLS it writes close_notify, which a client that stopped reading would never
                // take: the timeouts still apply.
                let _ = guarded(guard, false, pin!(io.shutdown())).await;
                return Ok(Served::Closed);
            }
            None => return Ok(Served::Closed),
        }
    }
}

/// Runs `fut` until it is done, or until `guard` says the connection must end now: its
/// request-head or idle timeout expired, or (`in_request` false) the linger after a stop is
/// over. A stop only marks the connection as draining; the request in progress completes.
///
/// `fut` is pinned by the caller: the proxy's future is large, and moving it into this one
/// would copy it for every request.
async fn guarded<F: Future>(
    guard: &mut Guard<'_>,
    in_request: bool,
    mut fut: Pin<&mut F>,
) -> Option<F::Output> {
    poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        while let Poll::Ready(event) = guard.poll_event(cx) {
            match event {
                Event::Head | Event::Idle => return Poll::Ready(None),
                Event::LingerOver if !in_request => return Poll::Ready(None),
                Event::Stop | Event::LingerOver => {}
            }
        }
        Poll::Pending
    })
    .await
}

/// Parses a request head at the start of `rbuf`. A request for the fast path is taken from
/// the buffer with its body; anything else (a head longer than `max_head` included) leaves
/// the buffer as it was.
fn parse(rbuf: &mut BytesMut, max_head: usize) -> Parsed {
    // Where the method, the target and each field's name and value are in `rbuf`; the
    // values are then shared, not copied.
    let mut spans = [[0u32; 4]; MAX_HEADERS];
    let (len, method, target, count) = {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let len = match httparse::ParserConfig::default()
            .parse_request_with_uninit_headers(&mut req, rbuf, &mut slots)
        {
            Ok(httparse::Status::Complete(len)) if len <= max_head => len,
            Ok(httparse::Status::Complete(_)) => return Parsed::HandOff,
            Ok(httparse::Status::Partial) => return Parsed::Partial,
            // hyper answers (or, for the HTTP/2 preface, serves) it.
            Err(_) => return Parsed::HandOff,
        };
        let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
            return Parsed::HandOff;
        };
        let Ok(method) = Method::from_bytes(method.as_bytes()) else {
            return Parsed::HandOff;
        };
        let base = rbuf.as_ptr() as usize;
        let target =
            target.as_ptr() as usize - base..target.as_ptr() as usize - base + target.len();
        // Offsets within a head of at most `max_head` bytes (the config caps that far below
        // 4 GiB).
        crate::h1::record_spans(rbuf, req.headers, &mut spans);
        (len, method, target, req.headers.len())
    };
    if method == Method::CONNECT {
        return Parsed::HandOff;
    }
    let head = rbuf.split_to(len).freeze();
    match build(&head, method, target, &spans[..count], rbuf) {
        Some((req, meta)) => Parsed::Request(req, meta),
        None => {
            // Put the head back in front of what followed it, for hyper to read.
            let mut whole = BytesMut::with_capacity(head.len() + rbuf.len());
            whole.extend_from_slice(&head);
            whole.extend_from_slice(rbuf);
            *rbuf = whole;
            Parsed::HandOff
        }
    }
}

/// Builds the request from its parsed head, taking the body from `rest`; `None` when the
/// request is not for the fast path.
fn build(
    head: &Bytes,
    method: Method,
    target: std::ops::Range<usize>,
    spans: &[[u32; 4]],
    rest: &mut BytesMut,
) -> Option<(Request<UpstreamBody>, Meta)> {
    let uri = Uri::from_maybe_shared(head.slice(target)).ok()?;
    // Room for the header the proxy adds upstream, so that adding it does not grow the map.
    let mut headers = HeaderMap::with_capacity(spans.len() + 1);
    let mut length: Option<usize> = None;
    let mut close = false;
    for span in spans {
        let [n0, n1, v0, v1] = span.map(|x| x as usize);
        let name = HeaderName::from_bytes(&head[n0..n1]).ok()?;
        // A value httparse accepted is always a valid `HeaderValue` (`from_maybe_shared`
        // checks it again; skipping that would need `unsafe`, which the crate forbids).
        let value = HeaderValue::from_maybe_shared(head.slice(v0..v1)).ok()?;
        if name == header::CONTENT_LENGTH {
            let n = std::str::from_utf8(value.as_bytes())
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok())?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING
            || name == header::EXPECT
            || name == header::UPGRADE
        {
            return None;
        } else if name == header::CONNECTION {
            close |= value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        headers.append(name, value);
    }
    let length = length.unwrap_or(0);
    if rest.len() < length {
        // The body is still on its way: hyper streams it.
        return None;
    }
    let body = Full::new(rest.split_to(length).freeze());
    let meta = Meta {
        keep_alive: !close,
        head: method == Method::HEAD,
    };
    let mut req = Request::new(Either::Right(body));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Some((req, meta))
}

/// How the response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (`HEAD`, 1xx, 204, 304).
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked.
    Chunked,
}

/// Writes `resp` to the client. `Ok(Some(true))`: the connection can take the next request;
/// `Ok(Some(false))`: it must close; `Ok(None)`: it must close at once (a timeout expired).
async fn respond<S>(
    io: &mut S,
    wbuf: &mut BytesMut,
    guard: &mut Guard<'_>,
    resp: Response<ProxyBody>,
    head_request: bool,
    mut close: bool,
) -> io::Result<Option<bool>>
where
    S: AsyncWrite + Unpin,
{
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    wbuf.clear();
    wbuf.reserve(1024);
    wbuf.put_slice(b"HTTP/1.1 ");
    wbuf.put_slice(status.as_str().as_bytes());
    wbuf.put_u8(b' ');
    wbuf.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    wbuf.put_slice(b"\r\n");
    let mut length = None;
    let mut has_date = false;
    // A `Connection` field the response already carries says `close`.
    let mut says_close = false;
    for (name, value) in &parts.headers {
        if *name == header::CONTENT_LENGTH {
            // canaryd's client and hyper's both refuse a response with conflicting lengths;
            // whatever else comes, only the first valid length is sent, and the body is cut
            // to it (a repeated or invalid one is dropped, and the connection closes).
            let n = std::str::from_utf8(value.as_bytes())
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
            match (length, n) {
                (None, Some(n)) => length = Some(n),
                (Some(l), Some(n)) if l == n => continue,
                _ => {
                    close = true;
                    continue;
                }
            }
        } else if *name == header::CONNECTION {
            says_close |= value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            close |= says_close;
        } else if *name == header::DATE {
            has_date = true;
        } else if *name == header::TRANSFER_ENCODING {
            continue;
        }
        put_field(wbuf, name.as_str().as_bytes(), value.as_bytes());
    }
    // Another protocol would follow a 101; the fast path never asked for one.
    close |= status.is_informational();
    let framing = if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::None
    } else if let Some(n) = length {
        Framing::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        let mut digits = itoa_buf();
        put_field(wbuf, b"content-length", format_u64(&mut digits, n));
        Framing::Length(n)
    } else {
        put_field(wbuf, b"transfer-encoding", b"chunked");
        Framing::Chunked
    };
    if close && !says_close {
        put_field(wbuf, b"connection", b"close");
    }
    if !has_date {
        date::put(wbuf);
    }
    wbuf.put_slice(b"\r\n");

    // Whether the bytes sent match the framing announced; if not, the connection must close.
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut trailers_sent = false;
    loop {
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                // Nothing more for now: what is buffered goes out while the body waits.
                if !write_out(io, wbuf, guard).await? {
                    return Ok(None);
                }
                let Some(written) = guarded(guard, true, pin!(io.flush())).await else {
                    return Ok(None);
                };
                written?;
                let next = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx));
                let Some(frame) = guarded(guard, true, pin!(next)).await else {
                    return Ok(None);
                };
                frame
            }
        };
        let frame = match frame {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                // The upstream's body broke: the client sees a truncated response and the
                // connection closes (a chunked body is not terminated).
                tracing::debug!(error = %e, "response body failed; closing the connection");
                let _ = write_out(io, wbuf, guard).await;
                return Ok(Some(false));
            }
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let (Ok(trailers), Framing::Chunked) = (frame.into_trailers(), framing) {
                    wbuf.put_slice(b"0\r\n");
                    for (name, value) in &trailers {
                        put_field(wbuf, name.as_str().as_bytes(), value.as_bytes());
                    }
                    wbuf.put_slice(b"\r\n");
                    trailers_sent = true;
                }
                continue;
            }
        };
        match framing {
            Framing::None => continue,
            Framing::Length(_) => {
                if data.len() as u64 > left {
                    // More than announced: never sent, and the connection cannot be trusted.
                    data.truncate(left as usize);
                    close = true;
                }
                left -= data.len() as u64;
            }
            Framing::Chunked => {
                if data.is_empty() {
                    continue;
                }
                put_chunk_size(wbuf, data.len());
            }
        }
        if data.len() <= COPY_MAX {
            wbuf.extend_from_slice(&data);
        } else {
            let mut both = (&wbuf[..]).chain(data);
            let Some(written) = guarded(guard, true, pin!(io.write_all_buf(&mut both))).await
            else {
                return Ok(None);
            };
            written?;
            wbuf.clear();
        }
        if framing == Framing::Chunked {
            wbuf.put_slice(b"\r\n");
        }
        if wbuf.len() >= FLUSH_AT && !write_out(io, wbuf, guard).await? {
            return Ok(None);
        }
    }
    if framing == Framing::Chunked && !trailers_sent {
        wbuf.put_slice(b"0\r\n\r\n");
    }
    // Fewer bytes than announced: the client sees a short body, then the close.
    close |= left > 0;
    if !write_out(io, wbuf, guard).await? {
        return Ok(None);
    }
    let Some(flushed) = guarded(guard, true, pin!(io.flush())).await else {
        return Ok(None);
    };
    flushed?;
    // The request ends here (in-flight gauge, the connection's idle timer).
    drop(body);
    Ok(Some(!close))
}

/// Writes what `wbuf` holds and empties it. `Ok(false)`: a timeout expired and the
/// connection must close at once (see [`guarded`]).
async fn write_out<S>(io: &mut S, wbuf: &mut BytesMut, guard: &mut Guard<'_>) -> io::Result<bool>
where
    S: AsyncWrite + Unpin,
{
    if wbuf.is_empty() {
        return Ok(true);
    }
    let Some(written) = guarded(guard, true, pin!(io.write_all(wbuf))).await else {
        return Ok(false);
    };
    written?;
    wbuf.clear();
    Ok(true)
}

/// Writes a chunk-size line: `len` in hex and CRLF.
fn put_chunk_size(buf: &mut BytesMut, len: usize) {
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1);
    buf.reserve(digits as usize + 2);
    for i in (0..digits).rev() {
        buf.put_u8(b"0123456789abcdef"[(len >> (4 * i)) & 0xf]);
    }
    buf.put_slice(b"\r\n");
}

/// Room for the decimal digits of any `u64`.
fn itoa_buf() -> [u8; 20] {
    [0; 20]
}

/// The decimal digits of `n`, written at the end of `buf`.
fn format_u64(buf: &mut [u8; 20], mut n: u64) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// The `Date` field for responses that lack one, formatted once per second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    use bytes::BytesMut;

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }

    /// Appends `date: <IMF-fixdate>` and CRLF.
    pub(super) fn put(buf: &mut BytesMut) {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != second {
                *c = (second, httpdate::fmt_http_date(now));
            }
            super::put_field(buf, b"date", c.1.as_bytes());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> (Parsed, BytesMut) {
        let mut buf = BytesMut::from(text);
        (parse(&mut buf, 64 * 1024), buf)
    }

    #[test]
    fn a_whole_request_is_taken_with_its_body() {
        let text = "POST /v1/predict?x=1 HTTP/1.1\r\nHost: a\r\nX-User-Id: 42\r\n\
                    Content-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n";
        let (p, rest) = parsed(text);
        let Parsed::Request(req, meta) = p else {
            panic!("not taken");
        };
        assert!(meta.keep_alive && !meta.head);
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri(), "/v1/predict?x=1");
        assert_eq!(req.headers()["x-user-id"], "42");
        assert_eq!(req.headers().len(), 3);
        assert_eq!(req.body().size_hint().exact(), Some(5));
        // The pipelined next request stays in the buffer.
        assert_eq!(&rest[..], b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn unusual_requests_are_handed_over_untouched() {
        for text in [
            // Body still on its way.
            "POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nhello",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
            "GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        ] {
            let (p, rest) = parsed(text);
            assert!(matches!(p, Parsed::HandOff), "taken: {text:?}");
            assert_eq!(&rest[..], text.as_bytes(), "buffer changed: {text:?}");
        }
        let text = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut buf = BytesMut::from(text);
        assert!(matches!(parse(&mut buf, text.len() - 1), Parsed::HandOff));
        assert_eq!(&buf[..], text.as_bytes());
        assert!(matches!(parse(&mut buf, text.len()), Parsed::Request(..)));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        let text = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(parsed(&text).0, Parsed::HandOff));
    }

    #[test]
    fn partial_heads_wait_and_close_is_noted() {
        assert!(matches!(
            parsed("GET / HTTP/1.1\r\nHost: a\r\n").0,
            Parsed::Partial
        ));
        let (p, _) = parsed("HEAD / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n");
        let Parsed::Request(req, meta) = p else {
            panic!("not taken");
        };
        assert!(!meta.keep_alive && meta.head);
        assert!(req.body().is_end_stream());
    }

    #[test]
    fn chunk_sizes_are_hex() {
        for n in [0, 1, 15, 16, 255, 4096, 0x12345, usize::MAX] {
            let mut b = BytesMut::new();
            put_chunk_size(&mut b, n);
            assert_eq!(&b[..], format!("{n:x}\r\n").as_bytes());
        }
    }

    #[test]
    fn lengths_format_as_decimal() {
        let mut b = itoa_buf();
        assert_eq!(format_u64(&mut b, 0), b"0");
        assert_eq!(format_u64(&mut b, 1234567890), b"1234567890");
        assert_eq!(
            format_u64(&mut b, u64::MAX),
            u64::MAX.to_string().as_bytes()
        );
    }
}
