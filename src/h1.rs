//! canaryd's HTTP/1.1 client side: a keep-alive pool of upstream connections and the codec
//! that speaks on them.
//!
//! A connection is *driven by the request that holds it*: the downstream connection's task
//! writes the request head and body, reads the response head and streams the response body
//! on its own polls, then parks the connection for the next request. There is no connection
//! task, no channel between a request and its connection and no pool key to hash. Parsing is
//! httparse's (the parser under hyper); what is here is the framing a proxy needs: request
//! bodies sent as they arrive (with their `Content-Length`, or chunked), response bodies read
//! by `Content-Length`, chunked (with trailers) or to the end of the connection, `1xx` interim
//! responses skipped, and `101 Switching Protocols` handing the socket to a tunnel.
//!
//! A connection goes back to the pool only when both messages are complete, exactly (no byte
//! left over), and neither side asked to close; anything else closes it.

use std::collections::VecDeque;
use std::fmt;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tower_service::Service;

use crate::upstream::{Forwarded, UpstreamBody, UpstreamError};

/// Errors of a streamed body (request or response).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Idle connections are closed after about this long (see [`H1Pool::sweep`]); the HTTP/2
/// client's pool uses the same.
pub(crate) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream (both pools); enough for a saturated sidecar, bounded
/// for memory.
pub(crate) const POOL_MAX_IDLE: usize = 512;
/// The largest response head (status line and headers) accepted, as in hyper.
const MAX_HEAD: usize = 64 * 1024;
/// The most response header fields accepted, as in hyper.
const MAX_HEADERS: usize = 100;
/// How much room a read asks for: a response head, or a slice of a body.
const READ_HEAD: usize = 8 * 1024;
const READ_BODY: usize = 32 * 1024;

/// The socket under an upstream connection: plain TCP or TLS over TCP.
pub enum Stream {
    /// `http://`
    Plain(TcpStream),
    /// `https://`
    Tls(Box<TlsStream<TcpStream>>),
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Plain(_) => "Stream::Plain",
            Stream::Tls(_) => "Stream::Tls",
        })
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One upstream connection and its buffers, kept across requests.
struct Conn {
    io: Stream,
    /// Bytes read and not yet consumed.
    rbuf: BytesMut,
    /// Where request heads are encoded; its allocation is reused.
    head: BytesMut,
    /// Bytes to write, in order.
    out: VecDeque<Bytes>,
    /// The pool sweep at which it was last parked (see [`H1Pool::sweep`]).
    idle_epoch: u64,
}

impl Conn {
    fn new(io: Stream) -> Self {
        Conn {
            io,
            rbuf: BytesMut::new(),
            head: BytesMut::new(),
            out: VecDeque::new(),
            idle_epoch: 0,
        }
    }

    /// Reads what the socket has into `rbuf`, with room for at least `room` bytes. `Ok(0)`
    /// is the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>, room: usize) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < room / 4 {
            self.rbuf.reserve(room);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf)
    }

    /// Whether a parked connection can take a request: the upstream has neither closed it
    /// nor sent anything unasked. Costs no system call when the socket has no news (the
    /// reactor has not marked it readable).
    fn alive(&mut self) -> bool {
        self.rbuf.is_empty()
            && self
                .poll_fill(&mut Context::from_waker(Waker::noop()), 64)
                .is_pending()
    }

    /// Writes what is queued, then flushes. `Ready(Ok)` once everything is on its way.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); 8];
            let mut n = 0;
            for (slot, b) in slices.iter_mut().zip(self.out.iter()) {
                *slot = IoSlice::new(b);
                n += 1;
            }
            let mut written = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..n]))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            while written > 0 {
                let Some(front) = self.out.front_mut() else {
                    break;
                };
                if written >= front.len() {
                    written -= front.len();
                    self.out.pop_front();
                } else {
                    front.advance(written);
                    written = 0;
                }
            }
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }
}

/// How a request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReqFraming {
    /// By the request's own `Content-Length`.
    Length,
    /// `Transfer-Encoding: chunked` (a streamed body of unknown length).
    Chunked,
}

/// Encodes a request head (origin-form target, HTTP/1.1) into `buf`, with the `forwarded`
/// fields in place of any the client sent. `Transfer-Encoding` is canaryd's to choose: a
/// body without `Content-Length` goes chunked. Returns how the body goes, `None` when there
/// is none.
fn encode_head(
    buf: &mut BytesMut,
    parts: &http::request::Parts,
    forwarded: &Forwarded,
    has_body: bool,
) -> Option<ReqFraming> {
    buf.reserve(512);
    buf.put_slice(parts.method.as_str().as_bytes());
    buf.put_u8(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    buf.put_slice(target.as_bytes());
    buf.put_slice(b" HTTP/1.1\r\n");
    let mut length = false;
    for (name, value) in &parts.headers {
        if *name == header::CONTENT_LENGTH {
            length = true;
        } else if *name == header::TRANSFER_ENCODING || Forwarded::replaces(name) {
            continue;
        }
        put_field(buf, name, value);
    }
    for (name, value) in forwarded.fields() {
        put_field(buf, name, value);
    }
    let send = if length {
        Some(ReqFraming::Length)
    } else if has_body {
        buf.put_slice(b"transfer-encoding: chunked\r\n");
        Some(ReqFraming::Chunked)
    } else {
        // A request method that defines a body says it is empty.
        if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
            buf.put_slice(b"content-length: 0\r\n");
        }
        None
    };
    buf.put_slice(b"\r\n");
    send.filter(|_| has_body)
}

/// Writes `name: value` and CRLF.
fn put_field(buf: &mut BytesMut, name: &HeaderName, value: &HeaderValue) {
    put_raw_field(buf, name.as_str().as_bytes(), value.as_bytes());
}

/// Writes `name: value` and CRLF. The separators are single bytes: `put_slice` of a short
/// constant still ends in a `memcpy` call.
pub(crate) fn put_raw_field(buf: &mut BytesMut, name: &[u8], value: &[u8]) {
    buf.reserve(name.len() + value.len() + 4);
    buf.extend_from_slice(name);
    buf.put_u8(b':');
    buf.put_u8(b' ');
    buf.extend_from_slice(value);
    buf.put_u8(b'\r');
    buf.put_u8(b'\n');
}

/// The request body still to be sent.
struct Outgoing {
    body: UpstreamBody,
    send: ReqFraming,
}

/// How the rest of a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes remain.
    Length(u64),
    /// A chunked body, at this point.
    Chunked(Chunk),
    /// Everything until the upstream closes the connection.
    Close,
    /// `101 Switching Protocols`: the connection is the tunnel's.
    Upgrade,
    /// Complete.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// This many bytes of chunk data remain.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
}

/// What the response head says about the connection and the body.
struct Head {
    response: Response<()>,
    framing: Framing,
    /// Neither `Connection: close` nor HTTP/1.0 without keep-alive nor a doubtful framing.
    reuse: bool,
    /// Whether connection-scoped fields remain in the headers. `Transfer-Encoding`,
    /// `Keep-Alive` and a `Connection` naming only `close` or `keep-alive` are consumed here.
    hop_by_hop: bool,
}

/// Notes where each parsed field's name and value are in `buf` (`[name start, name end,
/// value start, value end]`), so that the values can later be shared out of the frozen head
/// rather than copied. The offsets must fit in `u32`.
pub(crate) fn record_spans(buf: &[u8], fields: &[httparse::Header<'_>], spans: &mut [[u32; 4]]) {
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

/// An error of the upstream's HTTP.
fn protocol(msg: impl Into<String>) -> BoxError {
    Box::new(io::Error::new(io::ErrorKind::InvalidData, msg.into()))
}

/// Parses a response head at the start of `rbuf`, consuming it once complete. `head_request`:
/// the response to a `HEAD` has no body whatever its headers say. The fields that only
/// concern this connection's framing are not kept (see [`Head::hop_by_hop`]).
fn parse_head(rbuf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, BoxError> {
    // Where each field's name and value are in `rbuf`; the values are then shared, not copied.
    let mut spans = [[0u32; 4]; MAX_HEADERS];
    let (len, code, minor, count) = {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, rbuf, &mut slots)
            .map_err(|e| protocol(format!("invalid response head: {e}")))?;
        let httparse::Status::Complete(len) = parsed else {
            if rbuf.len() > MAX_HEAD {
                return Err(protocol("response head larger than 64 KiB"));
            }
            return Ok(None);
        };
        // Offsets within a head of at most 64 KiB (plus what was read after it).
        record_spans(rbuf, resp.headers, &mut spans);
        (
            len,
            resp.code.unwrap_or(0),
            resp.version.unwrap_or(1),
            resp.headers.len(),
        )
    };
    let head = rbuf.split_to(len).freeze();
    let status = StatusCode::from_u16(code).map_err(|_| protocol("invalid status code"))?;
    // Room for the header the proxy adds to name the arm, so that adding it does not grow
    // (rehash) the map.
    let mut headers = HeaderMap::with_capacity(count + 1);
    let mut hop_by_hop = false;
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut close = false;
    let mut keep_alive = false;
    for span in &spans[..count] {
        let [n0, n1, v0, v1] = span.map(|x| x as usize);
        let name =
            HeaderName::from_bytes(&head[n0..n1]).map_err(|_| protocol("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
            .map_err(|_| protocol(format!("invalid value of {name}")))?;
        if name == header::CONTENT_LENGTH {
            let n = std::str::from_utf8(value.as_bytes())
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| protocol("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(protocol("conflicting content-length values"));
            }
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            // Chunked only if it is the last coding applied.
            let last = value
                .as_bytes()
                .rsplit(|&b| b == b',')
                .next()
                .unwrap_or(b"");
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            // The framing of this hop: the proxy frames the response again.
            continue;
        } else if name == header::CONNECTION {
            let mut names_more = false;
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                let c = token.eq_ignore_ascii_case(b"close");
                let k = token.eq_ignore_ascii_case(b"keep-alive");
                close |= c;
                keep_alive |= k;
                names_more |= !c && !k && !token.is_empty();
            }
            if !names_more {
                // Only about this connection: nothing for the client.
                continue;
            }
            hop_by_hop = true;
        } else {
            match name.as_str() {
                "keep-alive" => continue,
                "proxy-connection"
                | "proxy-authenticate"
                | "proxy-authorization"
                | "trailer"
                | "upgrade"
                | "te" => hop_by_hop = true,
                _ => {}
            }
        }
        headers.append(name, value);
    }
    let mut reuse = !close && (minor == 1 || keep_alive);
    let framing = if status == StatusCode::SWITCHING_PROTOCOLS {
        // The connection speaks another protocol now: never back to the pool, even when
        // nobody takes it for a tunnel.
        reuse = false;
        Framing::Upgrade
    } else if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Done
    } else if let Some(chunked) = chunked {
        // Both framings present is a smuggling pattern: believe the coding, then close. The
        // length is not passed on: it does not describe the body the client will get.
        if length.is_some() {
            reuse = false;
            headers.remove(header::CONTENT_LENGTH);
        }
        if chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            reuse = false;
            Framing::Close
        }
    } else if let Some(n) = length {
        if n == 0 {
            Framing::Done
        } else {
            Framing::Length(n)
        }
    } else {
        reuse = false;
        Framing::Close
    };
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    *response.headers_mut() = headers;
    Ok(Some(Head {
        response,
        framing,
        reuse,
        hop_by_hop,
    }))
}

/// A request and its response in progress on one connection.
struct Exchange {
    /// Boxed for its whole life, so that handing it between the pool, the request and the
    /// response body moves a pointer rather than the buffers and the socket.
    conn: Box<Conn>,
    /// The request body still to come from the client, if any.
    outgoing: Option<Outgoing>,
    /// Whether the connection may serve another request once this exchange is complete.
    reuse: bool,
}

impl Exchange {
    /// Moves the request forward: writes what is queued, queues what the client's body has.
    /// A failure stops the request (the connection will not be reused). Only a failure of
    /// the client's body is returned: a write failure is left for the read side to report,
    /// since the upstream may have answered before it closed.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Result<(), BoxError> {
        loop {
            match self.conn.poll_write_out(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Pending => return Ok(()),
                Poll::Ready(Err(e)) => {
                    tracing::debug!(error = %e, "writing to the upstream failed");
                    self.stop_sending();
                    return Ok(());
                }
            }
            let Some(outgoing) = &mut self.outgoing else {
                return Ok(());
            };
            let frame = match Pin::new(&mut outgoing.body).poll_frame(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(None) => {
                    if outgoing.send == ReqFraming::Chunked {
                        self.conn.out.push_back(Bytes::from_static(b"0\r\n\r\n"));
                    }
                    self.outgoing = None;
                    continue;
                }
                Poll::Ready(Some(Err(e))) => {
                    self.stop_sending();
                    return Err(e);
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            let chunked = outgoing.send == ReqFraming::Chunked;
            match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) if chunked => {
                    let out = &mut self.conn.out;
                    out.push_back(Bytes::from(format!("{:x}\r\n", data.len())));
                    out.push_back(data);
                    out.push_back(Bytes::from_static(b"\r\n"));
                }
                Ok(data) => self.conn.out.push_back(data),
                Err(frame) => {
                    // Trailers end a chunked body; a body sent by length has nowhere for them.
                    if let (Ok(trailers), true) = (frame.into_trailers(), chunked) {
                        let mut last = BytesMut::from(&b"0\r\n"[..]);
                        for (name, value) in &trailers {
                            put_field(&mut last, name, value);
                        }
                        last.put_slice(b"\r\n");
                        self.conn.out.push_back(last.freeze());
                        self.outgoing = None;
                    }
                }
            }
        }
    }

    /// Gives up on sending the rest of the request: the connection cannot be reused.
    fn stop_sending(&mut self) {
        self.outgoing = None;
        self.conn.out.clear();
        self.reuse = false;
    }

    /// Whether the whole request has been written.
    fn sent(&self) -> bool {
        self.outgoing.is_none() && self.conn.out.is_empty()
    }

    /// Reads until a final response head is complete (`1xx` interim responses are skipped).
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
    ) -> Poll<Result<Head, BoxError>> {
        loop {
            if !self.conn.rbuf.is_empty() {
                if let Some(head) = parse_head(&mut self.conn.rbuf, head_request)? {
                    if head.response.status().is_informational() && head.framing != Framing::Upgrade
                    {
                        continue;
                    }
                    return Poll::Ready(Ok(head));
                }
            }
            let empty = self.conn.rbuf.is_empty();
            match ready!(self.conn.poll_fill(cx, READ_HEAD)) {
                Ok(0) if empty => {
                    return Poll::Ready(Err(protocol("connection closed before the response head")))
                }
                Ok(0) => {
                    return Poll::Ready(Err(protocol("connection closed in the response head")))
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(Box::new(e))),
            }
        }
    }
}

/// What identifies where a pool's connections go.
struct Target {
    /// `scheme://authority/`, what the connector dials.
    uri: Uri,
    /// For `https://`: the TLS client and the name to verify (or why the host cannot be one).
    tls: Option<(TlsConnector, Result<ServerName<'static>, String>)>,
}

/// The idle HTTP/1.1 connections of one upstream, and how to make more.
pub struct H1Pool {
    /// Most recently used last: requests take the warmest connection.
    idle: Mutex<VecDeque<Box<Conn>>>,
    connector: HttpConnector,
    target: Target,
    /// Counts [`H1Pool::sweep`] calls; an idle connection remembers the one it was parked at.
    epoch: AtomicU64,
}

impl fmt::Debug for H1Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H1Pool")
            .field("target", &self.target.uri)
            .finish()
    }
}

impl H1Pool {
    /// A pool for `uri` (`http://` or `https://` with `tls`, whose ALPN is set to HTTP/1.1
    /// here). Connections are opened on demand with `connector`.
    pub fn new(mut connector: HttpConnector, uri: Uri, tls: Option<&rustls::ClientConfig>) -> Self {
        connector.enforce_http(false);
        let tls = match tls {
            None => None,
            Some(cfg) => {
                let mut cfg = cfg.clone();
                cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
                let host = uri.host().unwrap_or_default();
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name = ServerName::try_from(host.to_owned())
                    .map_err(|e| format!("{host:?} is not a name TLS can verify: {e}"));
                Some((TlsConnector::from(Arc::new(cfg)), name))
            }
        };
        H1Pool {
            idle: Mutex::new(VecDeque::new()),
            connector,
            target: Target { uri, tls },
            epoch: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Box<Conn>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The warmest idle connection that is still open.
    fn checkout(&self) -> Option<Box<Conn>> {
        loop {
            let mut conn = self.lock().pop_back()?;
            if conn.alive() {
                return Some(conn);
            }
        }
    }

    /// Parks a connection whose exchange is complete.
    fn checkin(&self, mut conn: Box<Conn>) {
        conn.idle_epoch = self.epoch.load(Ordering::Relaxed);
        let mut idle = self.lock();
        if idle.len() < POOL_MAX_IDLE {
            idle.push_back(conn);
        }
    }

    /// Opens a new connection (TCP, then TLS for `https://`).
    async fn connect(&self) -> Result<Box<Conn>, UpstreamError> {
        let tcp = self
            .connector
            .clone()
            .call(self.target.uri.clone())
            .await
            .map_err(|e| UpstreamError::Connect(crate::upstream::chain(&e)))?
            .into_inner();
        let io = match &self.target.tls {
            None => Stream::Plain(tcp),
            Some((tls, name)) => Stream::Tls(Box::new(
                tls.connect(name.clone().map_err(UpstreamError::Connect)?, tcp)
                    .await
                    .map_err(|e| UpstreamError::Connect(format!("TLS handshake: {e}")))?,
            )),
        };
        Ok(Box::new(Conn::new(io)))
    }

    /// Closes connections the upstream has closed and those idle for longer than
    /// [`POOL_IDLE_TIMEOUT`], given that this runs every `every`.
    pub fn sweep(&self, every: Duration) {
        let epoch = self.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        let keep = POOL_IDLE_TIMEOUT.as_millis() / every.as_millis().max(1);
        let keep = u64::try_from(keep).unwrap_or(u64::MAX).max(1);
        let mut closed = Vec::new();
        let mut idle = self.lock();
        let mut i = 0;
        while i < idle.len() {
            let c = &mut idle[i];
            if epoch - c.idle_epoch <= keep && c.alive() {
                i += 1;
            } else if let Some(c) = idle.remove(i) {
                // Dropped outside the lock.
                closed.push(c);
            }
        }
        drop(idle);
        drop(closed);
    }

    /// Sends a request on a pooled or new connection and reads the response head, for at
    /// most `timeout`. The response body holds the connection until it has been read.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<UpstreamBody>,
        forwarded: &Forwarded,
        timeout: Duration,
    ) -> Result<Response<H1Body>, UpstreamError> {
        // Polled in place rather than wrapping this future in `tokio::time::timeout`, which
        // would move it on every request.
        let mut deadline = pin!(tokio::time::sleep(timeout));
        let mut conn = match self.checkout() {
            Some(conn) => conn,
            // Boxed: connecting is rare, and its future would otherwise make every request's
            // future several times larger.
            None => {
                let mut connecting = Box::pin(self.connect());
                poll_fn(|cx| match connecting.as_mut().poll(cx) {
                    Poll::Ready(r) => Poll::Ready(Some(r)),
                    Poll::Pending => deadline.as_mut().poll(cx).map(|()| None),
                })
                .await
                .ok_or(UpstreamError::Timeout(timeout))??
            }
        };
        let (parts, body) = req.into_parts();
        let head_request = parts.method == Method::HEAD;
        let has_body = !body.is_end_stream();
        let send = encode_head(&mut conn.head, &parts, forwarded, has_body);
        let head = conn.head.split().freeze();
        conn.out.push_back(head);
        let mut ex = Exchange {
            conn,
            outgoing: send.map(|send| Outgoing { body, send }),
            reuse: true,
        };
        let head = poll_fn(|cx| {
            if let Err(e) = ex.poll_send(cx) {
                return Poll::Ready(Some(Err(format!("reading the request body: {e}"))));
            }
            match ex.poll_head(cx, head_request) {
                Poll::Ready(r) => Poll::Ready(Some(r.map_err(|e| e.to_string()))),
                Poll::Pending => deadline.as_mut().poll(cx).map(|()| None),
            }
        })
        .await
        .ok_or(UpstreamError::Timeout(timeout))?
        .map_err(UpstreamError::Protocol)?;
        ex.reuse &= head.reuse;
        let (parts, ()) = head.response.into_parts();
        let mut body = H1Body {
            exchange: Some(ex),
            framing: head.framing,
            hop_by_hop: head.hop_by_hop,
            pool: self.clone(),
        };
        if body.framing == Framing::Done {
            body.finish();
        }
        Ok(Response::from_parts(parts, body))
    }
}

/// The body of a response from an HTTP/1.1 upstream. It holds the connection, reads it (and
/// sends the rest of the request body, if the upstream answered early), and parks it in its
/// pool the moment the last byte has been read. Dropped before that, it closes the connection.
pub struct H1Body {
    /// `None` once the body is complete (the connection parked or closed).
    exchange: Option<Exchange>,
    framing: Framing,
    /// See [`H1Body::has_hop_by_hop`].
    hop_by_hop: bool,
    pool: Arc<H1Pool>,
}

impl fmt::Debug for H1Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H1Body")
            .field("framing", &self.framing)
            .field("upstream", &self.pool.target.uri)
            .finish()
    }
}

/// The upstream side of a tunnel after `101 Switching Protocols`.
#[derive(Debug)]
pub struct Upgraded {
    /// The connection.
    pub io: Stream,
    /// Bytes the upstream sent after its `101` head, already read.
    pub read: Bytes,
}

impl H1Body {
    /// Whether the response headers may still hold connection-scoped fields. When not, the
    /// codec has already dropped them all (`Connection`, `Keep-Alive`, `Transfer-Encoding`)
    /// and there is nothing for the proxy to remove.
    pub fn has_hop_by_hop(&self) -> bool {
        self.hop_by_hop
    }

    /// Takes the connection of a `101 Switching Protocols` response for a tunnel.
    pub fn take_upgrade(&mut self) -> Option<Upgraded> {
        if self.framing != Framing::Upgrade {
            return None;
        }
        self.framing = Framing::Done;
        let conn = self.exchange.take()?.conn;
        let Conn { io, rbuf, .. } = *conn;
        Some(Upgraded {
            io,
            read: rbuf.freeze(),
        })
    }

    /// The body is complete: the connection goes back to the pool if the exchange ended
    /// cleanly, and is closed otherwise.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(ex) = self.exchange.take() {
            if ex.reuse && ex.sent() && ex.conn.rbuf.is_empty() {
                self.pool.checkin(ex.conn);
            }
        }
    }

    /// Closes the connection after a broken body.
    fn fail(&mut self, e: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.framing = Framing::Done;
        self.exchange = None;
        Poll::Ready(Some(Err(e.into())))
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(ex) = &mut this.exchange else {
                return Poll::Ready(None);
            };
            if !ex.sent() {
                // The upstream answered before the request was complete; failures end the
                // request but not (yet) the response.
                let _ = ex.poll_send(cx);
            }
            let conn = &mut ex.conn;
            match this.framing {
                Framing::Done | Framing::Upgrade => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(0) => this.finish(),
                Framing::Length(left) | Framing::Chunked(Chunk::Data(left)) => {
                    if conn.rbuf.is_empty() {
                        let room = usize::try_from(left).unwrap_or(usize::MAX).min(READ_BODY);
                        match ready!(conn.poll_fill(cx, room)) {
                            Ok(0) => {
                                return this.fail(protocol(format!(
                                    "connection closed {left} bytes before the end of the body"
                                )))
                            }
                            Ok(_) => continue,
                            Err(e) => return this.fail(e),
                        }
                    }
                    let take = conn
                        .rbuf
                        .len()
                        .min(usize::try_from(left).unwrap_or(usize::MAX));
                    let data = conn.rbuf.split_to(take).freeze();
                    let left = left - take as u64;
                    match &mut this.framing {
                        Framing::Length(_) if left == 0 => this.finish(),
                        Framing::Length(l) => *l = left,
                        Framing::Chunked(c) if left == 0 => *c = Chunk::DataEnd,
                        Framing::Chunked(c) => *c = Chunk::Data(left),
                        _ => {}
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Close => {
                    if conn.rbuf.is_empty() {
                        match ready!(conn.poll_fill(cx, READ_BODY)) {
                            Ok(0) => this.finish(),
                            Ok(_) => {}
                            Err(e) => return this.fail(e),
                        }
                        continue;
                    }
                    let data = conn.rbuf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(Chunk::Size) => match httparse::parse_chunk_size(&conn.rbuf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        conn.rbuf.advance(used);
                        this.framing = Framing::Chunked(if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        });
                    }
                    Ok(httparse::Status::Partial) if conn.rbuf.len() > 1024 => {
                        return this.fail(protocol("chunk size line too long"))
                    }
                    Ok(httparse::Status::Partial) => match ready!(conn.poll_fill(cx, READ_HEAD)) {
                        Ok(0) => {
                            return this.fail(protocol("connection closed in a chunk size line"))
                        }
                        Ok(_) => {}
                        Err(e) => return this.fail(e),
                    },
                    Err(_) => return this.fail(protocol("invalid chunk size line")),
                },
                Framing::Chunked(Chunk::DataEnd) => {
                    if conn.rbuf.len() < 2 {
                        match ready!(conn.poll_fill(cx, READ_HEAD)) {
                            Ok(0) => {
                                return this.fail(protocol("connection closed after chunk data"))
                            }
                            Ok(_) => continue,
                            Err(e) => return this.fail(e),
                        }
                    }
                    if &conn.rbuf[..2] != b"\r\n" {
                        return this.fail(protocol("chunk data not followed by CRLF"));
                    }
                    conn.rbuf.advance(2);
                    this.framing = Framing::Chunked(Chunk::Size);
                }
                Framing::Chunked(Chunk::Trailers) => {
                    if conn.rbuf.starts_with(b"\r\n") {
                        conn.rbuf.advance(2);
                        this.finish();
                        return Poll::Ready(None);
                    }
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match httparse::parse_headers(&conn.rbuf, &mut fields) {
                        Ok(httparse::Status::Complete((used, fields))) => {
                            let trailers: Option<HeaderMap> = fields
                                .iter()
                                .map(|f| {
                                    Some((
                                        HeaderName::from_bytes(f.name.as_bytes()).ok()?,
                                        HeaderValue::from_bytes(f.value).ok()?,
                                    ))
                                })
                                .collect();
                            let Some(trailers) = trailers else {
                                return this.fail(protocol("invalid trailer field"));
                            };
                            conn.rbuf.advance(used);
                            this.finish();
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                        Ok(httparse::Status::Partial) if conn.rbuf.len() > MAX_HEAD => {
                            return this.fail(protocol("trailers larger than 64 KiB"))
                        }
                        Ok(httparse::Status::Partial) => {
                            match ready!(conn.poll_fill(cx, READ_HEAD)) {
                                Ok(0) => {
                                    return this.fail(protocol("connection closed in the trailers"))
                                }
                                Ok(_) => {}
                                Err(e) => return this.fail(e),
                            }
                        }
                        Err(e) => return this.fail(protocol(format!("invalid trailers: {e}"))),
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done | Framing::Upgrade => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str, head_request: bool) -> (Option<Head>, BytesMut) {
        let mut buf = BytesMut::from(text.as_bytes());
        let parsed = parse_head(&mut buf, head_request).expect("valid head");
        (parsed, buf)
    }

    #[test]
    fn response_heads_decide_framing_and_reuse() {
        let (h, rest) = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false);
        let h = h.expect("complete");
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.reuse);
        assert_eq!(&rest[..], b"hello");
        assert_eq!(h.response.headers()["content-length"], "5");
        assert!(!h.hop_by_hop);

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
        assert_eq!(h.framing, Framing::Upgrade);
        assert!(!h.reuse);
        assert!(h.hop_by_hop);
        assert_eq!(h.response.headers()["upgrade"], "websocket");

        let (h, _) = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        );
        assert_eq!(h.expect("complete").framing, Framing::Chunked(Chunk::Size));

        let (h, _) = head(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            false,
        );
        assert!(!h.expect("complete").reuse);

        let (h, _) = head("HTTP/1.1 200 OK\r\n\r\n", false);
        let h = h.expect("complete");
        assert_eq!(h.framing, Framing::Close);
        assert!(!h.reuse);

        let (h, _) = head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false);
        assert!(!h.expect("complete").reuse);
        let (h, _) = head(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
            false,
        );
        assert!(h.expect("complete").reuse);

        let (h, _) = head("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true);
        assert_eq!(h.expect("complete").framing, Framing::Done);
        let (h, _) = head(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            false,
        );
        assert_eq!(h.expect("complete").framing, Framing::Done);

        let (h, _) = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        let h = h.expect("complete");
        assert_eq!(h.framing, Framing::Chunked(Chunk::Size));
        assert!(!h.reuse, "both framings: close after");
        assert!(!h.response.headers().contains_key("content-length"));

        let (h, rest) = head("HTTP/1.1 200 OK\r\nContent-Le", false);
        assert!(h.is_none());
        assert_eq!(rest.len(), 27, "a partial head stays buffered");
    }

    #[test]
    fn bad_response_heads_are_errors() {
        for text in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n",
            "HTTP/1.1 999999 OK\r\n\r\n",
            "SSH-2.0-OpenSSH_9.2\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(text.as_bytes());
            assert!(parse_head(&mut buf, false).is_err(), "{text:?}");
        }
        let mut big = BytesMut::from(&b"HTTP/1.1 200 OK\r\nx-big: "[..]);
        big.extend_from_slice(&[b'a'; MAX_HEAD]);
        assert!(parse_head(&mut big, false).is_err());
    }

    #[test]
    fn request_heads_carry_their_framing_and_forwarding() {
        let req = |method: Method, headers: &[(&str, &str)]| {
            let mut b = Request::builder().method(method).uri("/p?q=1");
            for (n, v) in headers {
                b = b.header(*n, *v);
            }
            b.body(()).expect("request").into_parts().0
        };
        let fwd = Forwarded {
            for_: HeaderValue::from_static("10.0.0.1, 192.0.2.7"),
            proto: HeaderValue::from_static("http"),
            host: Some(HeaderValue::from_static("h")),
        };
        let mut buf = BytesMut::new();
        let parts = req(
            Method::GET,
            &[
                ("host", "h"),
                ("transfer-encoding", "chunked"),
                ("x-forwarded-for", "10.0.0.1"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "spoofed"),
            ],
        );
        assert_eq!(encode_head(&mut buf, &parts, &fwd, false), None);
        assert_eq!(
            std::str::from_utf8(&buf).expect("ascii"),
            "GET /p?q=1 HTTP/1.1\r\nhost: h\r\nx-forwarded-for: 10.0.0.1, 192.0.2.7\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: h\r\n\r\n"
        );

        let fwd = Forwarded { host: None, ..fwd };
        let head = |method, headers: &[(&str, &str)], has_body| {
            let mut buf = BytesMut::new();
            let framing = encode_head(&mut buf, &req(method, headers), &fwd, has_body);
            let text = String::from_utf8(buf.to_vec()).expect("ascii");
            let fields = "x-forwarded-for: 10.0.0.1, 192.0.2.7\r\nx-forwarded-proto: http\r\n";
            (framing, text.replacen(fields, "", 1))
        };
        assert_eq!(
            head(Method::POST, &[("content-length", "3")], true),
            (
                Some(ReqFraming::Length),
                "POST /p?q=1 HTTP/1.1\r\ncontent-length: 3\r\n\r\n".into()
            )
        );
        assert_eq!(
            head(Method::POST, &[], true),
            (
                Some(ReqFraming::Chunked),
                "POST /p?q=1 HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n".into()
            )
        );
        assert_eq!(
            head(Method::PUT, &[], false),
            (
                None,
                "PUT /p?q=1 HTTP/1.1\r\ncontent-length: 0\r\n\r\n".into()
            )
        );
    }
}
