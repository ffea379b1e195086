//! canaryd's HTTP/1.1 server side: requests parsed, proxied and answered by the connection's
//! task itself, without hyper's dispatcher, body channel or buffered I/O layers. The wire
//! rules are [`crate::http1`]'s.
//!
//! It serves every HTTP/1.1 request but upgrades: bodies framed by `Content-Length` or chunked,
//! whole or still arriving (`Expect: 100-continue` answered here, never forwarded). A body
//! still arriving is decoded by the connection's task while the proxy sends it on, through a
//! bounded hand-over ([`crate::body::streamed`]): many small chunks become one piece of data,
//! and the client is not read while the upstream is not taking. Requests with `Upgrade`
//! (WebSocket), HTTP/1.0, the HTTP/2 preface and heads httparse refuses are handed to hyper at
//! the request boundary, with every byte read so far; hyper serves the rest of the connection.
//! Heads over `max_header_bytes` (complete or not) and framing canaryd refuses (a bad
//! `Content-Length`, a coding other than chunked, both framings, an unknown expectation) are
//! answered here (431, 400, 501, 417), and the connection closes.
//!
//! Responses are framed by their `Content-Length` when the upstream gave one (or the body's
//! size is known), chunked otherwise (with the trailers allowed through). The head and a small
//! body go out in one write. Pipelined requests are served in order.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Request, Response, Version};
use http_body::Body;
use http_body_util::Full;
use tokio::io::{AsyncRead, AsyncWrite};

use super::guard::{Event, Guard};
use crate::body::{self, BodyTx, ClientError, ClientFault, RequestBody};
use crate::http1::chunked::{self, ChunkedDecoder, Step};
use crate::http1::head::{self as wire, ParsedRequest, Rejection};
use crate::http1::BodyLength;
use crate::metrics::Metrics;
use crate::proxy::{Proxy, ProxyBody};

/// The read buffer's size for a new connection, and its growth step for a request head: a
/// head grows the buffer by this much at a time (never doubling), so a slow head of `n` bytes
/// holds at most `n` + 4 KiB.
const READ: usize = 4 * 1024;
/// How much room a read of body data asks for.
const READ_BODY: usize = 16 * 1024;
/// Small pieces of a chunked body are gathered into one piece of data up to this size.
const GATHER: usize = 16 * 1024;
/// Response data up to this size is copied behind the head, so both leave in one write.
const COPY_MAX: usize = 16 * 1024;
/// Buffered response bytes are written once they reach this, even if more are ready.
const FLUSH_AT: usize = 64 * 1024;
/// After refusing a request, what the client still sends is read and dropped, up to this
/// much and this long, so that its close does not reset the connection before the client
/// has read the answer.
const LINGER_BYTES: usize = 256 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(2);
/// While a response body waits on its upstream, the client's socket is watched (for a close
/// or a reset) by reading what it sends next, the next pipelined request, up to this much.
const READ_AHEAD: usize = 64 * 1024;

/// How the server side left a connection.
pub(crate) enum Served<S> {
    /// Closed: the client is done, a timeout expired, or the response said so.
    Closed,
    /// A request the server side does not take: hyper serves the connection from here,
    /// starting with these bytes (already read, not yet answered).
    HandOff(S, Bytes),
}

/// Serves HTTP/1.1 requests on `io` until the connection ends or a request needs hyper.
/// `max_head`: a head longer than this, complete or not, is refused with 431.
pub(crate) async fn serve<S>(
    io: S,
    proxy: &Proxy,
    guard: &mut Guard<'_>,
    max_head: usize,
) -> io::Result<Served<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let metrics = proxy.metrics();
    let mut c = Conn {
        io,
        rbuf: BytesMut::with_capacity(READ),
        wbuf: BytesMut::new(),
        pump: None,
        metrics,
    };
    loop {
        let head = loop {
            if !c.rbuf.is_empty() {
                match wire::parse_request(&mut c.rbuf, max_head) {
                    ParsedRequest::Complete(head) => break head,
                    ParsedRequest::HandOff => return Ok(Served::HandOff(c.io, c.rbuf.freeze())),
                    ParsedRequest::Reject(r) => {
                        c.refuse(guard, r).await?;
                        return Ok(Served::Closed);
                    }
                    ParsedRequest::Partial => {}
                }
            }
            grow_for_head(&mut c.rbuf);
            let read = c
                .drive(guard, false, |io, _, rbuf, cx| {
                    tokio_util::io::poll_read_buf(Pin::new(io), cx, rbuf)
                })
                .await;
            match read {
                // The client closed (perhaps in the middle of a head), or a timeout expired.
                None | Some(Ok(0)) => return Ok(Served::Closed),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
            }
        };
        let body = match head.body {
            BodyLength::Empty => RequestBody::empty(),
            BodyLength::Length(n) if c.rbuf.len() as u64 >= n => {
                // `n` is at most the buffer's length here.
                RequestBody::Full(Full::new(c.rbuf.split_to(n as usize).freeze()))
            }
            BodyLength::Length(n) => {
                let (tx, body) = body::streamed(Some(n));
                c.pump = Some(Pump::new(tx, Decoder::Length(n)));
                RequestBody::Streamed(body)
            }
            BodyLength::Chunked => {
                let (tx, body) = body::streamed(None);
                c.pump = Some(Pump::new(
                    tx,
                    Decoder::Chunked(ChunkedDecoder::new(head.trailer)),
                ));
                RequestBody::Streamed(body)
            }
        };
        if head.expect_continue && c.pump.is_some() {
            // Asked for before the body: the client waits for it. The upstream never sees the
            // expectation, only the body (which it did not have to ask for).
            c.wbuf.put_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            if !c.write_out(guard).await? {
                return Ok(Served::Closed);
            }
        }
        let head_request = head.method == http::Method::HEAD;
        let mut req = Request::new(body);
        *req.method_mut() = head.method;
        *req.uri_mut() = head.uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = head.headers;
        let mut handling = pin!(proxy.handle(req));
        let Some(resp) = c
            .wait_upstream(guard, |cx| handling.as_mut().poll(cx))
            .await
        else {
            // A timeout expired, or the client left: dropping the exchange ends it upstream.
            return Ok(Served::Closed);
        };
        let close = !head.keep_alive || guard.draining();
        let keep = c.respond(guard, resp, head_request, close).await?;
        // A body the client had not finished: what follows it cannot be found.
        let unread = c.pump.take().is_some_and(|p| !p.complete);
        match keep {
            // A stop that came while the response was on its way ends the connection now.
            Some(true) if !guard.draining() && !unread => {}
            Some(_) => {
                if unread {
                    c.linger(guard).await;
                } else {
                    // A failed shutdown changes nothing: the socket is closed when dropped.
                    // Over TLS it writes close_notify, which a client that stopped reading
                    // would never take: the timeouts still apply.
                    let _ = c
                        .drive(guard, false, |io, _, _, cx| Pin::new(io).poll_shutdown(cx))
                        .await;
                }
                return Ok(Served::Closed);
            }
            None => return Ok(Served::Closed),
        }
        if c.rbuf.is_empty() && c.rbuf.capacity() > READ_BODY {
            // A large body passed: an idle connection holds no more than a new one.
            c.rbuf = BytesMut::with_capacity(READ);
        }
    }
}

/// Whether the client closed its side of the connection or reset it, found by reading what it
/// sent next into `rbuf` (kept for the next request) until it has nothing more, or until
/// `rbuf` holds [`READ_AHEAD`] (then the question waits until the response is done).
fn client_left<S: AsyncRead + Unpin>(
    io: &mut S,
    rbuf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> bool {
    while rbuf.len() < READ_AHEAD {
        match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, rbuf) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return true,
            Poll::Ready(Ok(_)) => {}
            Poll::Pending => return false,
        }
    }
    false
}

/// Makes room for more of a request head: a step of [`READ`] once less than a quarter of it
/// is free, copying rather than letting the buffer double.
fn grow_for_head(rbuf: &mut BytesMut) {
    if rbuf.capacity() - rbuf.len() >= READ / 4 {
        return;
    }
    let mut grown = BytesMut::with_capacity(rbuf.len() + READ);
    grown.extend_from_slice(rbuf);
    *rbuf = grown;
}

/// One connection's socket and buffers, and the body being read from it, if any.
struct Conn<S> {
    io: S,
    /// Bytes read and not yet consumed.
    rbuf: BytesMut,
    /// Response bytes not yet written; its allocation is reused.
    wbuf: BytesMut,
    /// The request body still arriving.
    pump: Option<Pump>,
    metrics: std::sync::Arc<Metrics>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Runs `op` until it is done, reading the request body still arriving (if any) all the
    /// while, or until `guard` says the connection must end now: its request-head or idle
    /// timeout expired, or (`in_request` false) the linger after a stop is over. A stop only
    /// marks the connection as draining; the request in progress completes.
    async fn drive<T>(
        &mut self,
        guard: &mut Guard<'_>,
        in_request: bool,
        op: impl FnMut(&mut S, &mut BytesMut, &mut BytesMut, &mut Context<'_>) -> Poll<T>,
    ) -> Option<T> {
        self.drive_watching(guard, in_request, false, op).await
    }

    /// Runs `op`, something that waits on the upstream (the response head, or more of its
    /// body), as [`Conn::drive`] does, and once the request body is in, watches the client's
    /// socket meanwhile: `None` also when the client closed or reset its connection (see
    /// [`client_left`]). Watching costs no system call while the client sends nothing: the
    /// socket is only read once the reactor has seen it become readable again.
    async fn wait_upstream<T>(
        &mut self,
        guard: &mut Guard<'_>,
        mut op: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Option<T> {
        self.drive_watching(guard, true, true, |_, _, _, cx| op(cx))
            .await
    }

    /// [`Conn::drive`], watching the client's socket too if `watch_client`.
    async fn drive_watching<T>(
        &mut self,
        guard: &mut Guard<'_>,
        in_request: bool,
        watch_client: bool,
        mut op: impl FnMut(&mut S, &mut BytesMut, &mut BytesMut, &mut Context<'_>) -> Poll<T>,
    ) -> Option<T> {
        poll_fn(|cx| {
            loop {
                let fed = match &mut self.pump {
                    Some(pump) => pump.poll(&mut self.io, &mut self.rbuf, &self.metrics, cx),
                    None => false,
                };
                if let Poll::Ready(v) = op(&mut self.io, &mut self.wbuf, &mut self.rbuf, cx) {
                    return Poll::Ready(Some(v));
                }
                // The body was given more: whoever reads it (this task) gets to see it now.
                if !fed {
                    break;
                }
            }
            // Only once the request body is in: until then, the body's reader (the pump above)
            // notices a client that leaves.
            if watch_client
                && self.pump.as_ref().is_none_or(|p| p.complete)
                && client_left(&mut self.io, &mut self.rbuf, cx)
            {
                return Poll::Ready(None);
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

    /// Writes what `wbuf` holds and empties it. `Ok(false)`: a timeout expired and the
    /// connection must close at once (see [`Conn::drive`]).
    async fn write_out(&mut self, guard: &mut Guard<'_>) -> io::Result<bool> {
        if self.wbuf.is_empty() {
            return Ok(true);
        }
        let written = self
            .drive(guard, true, |io, wbuf, _, cx| {
                while !wbuf.is_empty() {
                    match ready!(Pin::new(&mut *io).poll_write(cx, wbuf))? {
                        0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                        n => wbuf.advance(n),
                    }
                }
                Poll::Ready(Ok::<_, io::Error>(()))
            })
            .await;
        match written {
            None => Ok(false),
            Some(r) => r.map(|()| true),
        }
    }

    /// Writes what is buffered and flushes. `Ok(false)`: the connection must close at once.
    async fn flush(&mut self, guard: &mut Guard<'_>) -> io::Result<bool> {
        if !self.write_out(guard).await? {
            return Ok(false);
        }
        match self
            .drive(guard, true, |io, _, _, cx| Pin::new(io).poll_flush(cx))
            .await
        {
            None => Ok(false),
            Some(r) => r.map(|()| true),
        }
    }

    /// Answers a request refused from its head, counts it, and closes.
    async fn refuse(&mut self, guard: &mut Guard<'_>, r: Rejection) -> io::Result<()> {
        tracing::debug!(
            status = r.status.as_u16(),
            reason = r.reason,
            "request refused"
        );
        self.metrics.client_error(ClientFault::BadRequest);
        let text = format!(
            "canaryd: {} {}: {}\n",
            r.status.as_u16(),
            r.status.canonical_reason().unwrap_or(""),
            r.reason
        );
        let mut headers = http::HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        wire::encode_response(
            &mut self.wbuf,
            r.status,
            &headers,
            Some(text.len() as u64),
            false,
            true,
        );
        date::put(&mut self.wbuf);
        self.wbuf.put_slice(b"\r\n");
        self.wbuf.put_slice(text.as_bytes());
        if self.flush(guard).await? {
            self.linger(guard).await;
        }
        Ok(())
    }

    /// Closes after an answer that left part of the request unread: the write side first,
    /// then what the client still sends is read and dropped (bounded), so that the close does
    /// not reset the connection before the client has read the answer.
    async fn linger(&mut self, guard: &mut Guard<'_>) {
        self.pump = None;
        if self
            .drive(guard, false, |io, _, _, cx| Pin::new(io).poll_shutdown(cx))
            .await
            .is_none_or(|r| r.is_err())
        {
            return;
        }
        let mut dropped = 0;
        let mut deadline = pin!(tokio::time::sleep(LINGER_TIME));
        let _ = self
            .drive(guard, false, |io, _, rbuf, cx| {
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
                while dropped < LINGER_BYTES {
                    rbuf.clear();
                    rbuf.reserve(READ_BODY);
                    match ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, rbuf)) {
                        Ok(0) | Err(_) => return Poll::Ready(()),
                        Ok(n) => dropped += n,
                    }
                }
                Poll::Ready(())
            })
            .await;
    }

    /// Writes `resp` to the client. `Ok(Some(true))`: the connection can take the next
    /// request; `Ok(Some(false))`: it must close; `Ok(None)`: it must close at once (a timeout
    /// expired).
    async fn respond(
        &mut self,
        guard: &mut Guard<'_>,
        resp: Response<ProxyBody>,
        head_request: bool,
        close: bool,
    ) -> io::Result<Option<bool>> {
        let (parts, mut body) = resp.into_parts();
        self.wbuf.clear();
        // A request body not read to its end by now may never be: nothing can follow it.
        let unread = self.pump.as_ref().is_some_and(|p| !p.complete);
        let framing = wire::encode_response(
            &mut self.wbuf,
            parts.status,
            &parts.headers,
            body.size_hint().exact(),
            head_request,
            close || unread,
        );
        let mut close = framing.close;
        if !framing.has_date {
            date::put(&mut self.wbuf);
        }
        self.wbuf.put_slice(b"\r\n");

        // Whether the bytes sent match the framing announced; if not, the connection must
        // close.
        let mut left = match framing.body {
            BodyLength::Length(n) if framing.send_body => n,
            _ => 0,
        };
        let chunked = framing.send_body && framing.body == BodyLength::Chunked;
        let mut trailers_sent = false;
        loop {
            let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    // Nothing more for now: what is buffered goes out while the body waits.
                    if !self.flush(guard).await? {
                        return Ok(None);
                    }
                    let waited = self
                        .wait_upstream(guard, |cx| Pin::new(&mut body).poll_frame(cx))
                        .await;
                    let Some(frame) = waited else {
                        // A timeout expired, or the client left: the upstream exchange ends
                        // now (dropping the body closes its connection), not whenever the
                        // upstream sends again.
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
                    let _ = self.write_out(guard).await;
                    return Ok(Some(false));
                }
            };
            let mut data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    if let (Ok(trailers), true) = (frame.into_trailers(), chunked) {
                        chunked::put_end(&mut self.wbuf, Some(&trailers));
                        trailers_sent = true;
                    }
                    continue;
                }
            };
            if !framing.send_body {
                continue;
            }
            if chunked {
                if data.is_empty() {
                    continue;
                }
                chunked::put_size(&mut self.wbuf, data.len());
            } else {
                if data.len() as u64 > left {
                    // More than announced: never sent, and the connection cannot be trusted.
                    data.truncate(left as usize);
                    close = true;
                }
                left -= data.len() as u64;
            }
            if data.len() <= COPY_MAX {
                self.wbuf.extend_from_slice(&data);
            } else {
                let buffered = std::mem::take(&mut self.wbuf);
                let mut both = (&buffered[..]).chain(data);
                let written = self
                    .drive(guard, true, |io, _, _, cx| {
                        while both.has_remaining() {
                            ready!(tokio_util::io::poll_write_buf(
                                Pin::new(&mut *io),
                                cx,
                                &mut both
                            ))?;
                        }
                        Poll::Ready(Ok::<_, io::Error>(()))
                    })
                    .await;
                self.wbuf = buffered;
                self.wbuf.clear();
                let Some(written) = written else {
                    return Ok(None);
                };
                written?;
            }
            if chunked {
                self.wbuf.put_slice(b"\r\n");
            }
            if self.wbuf.len() >= FLUSH_AT && !self.write_out(guard).await? {
                return Ok(None);
            }
        }
        if chunked && !trailers_sent {
            chunked::put_end(&mut self.wbuf, None);
        }
        // Fewer bytes than announced: the client sees a short body, then the close.
        close |= left > 0;
        if !self.flush(guard).await? {
            return Ok(None);
        }
        // The request ends here (in-flight gauge, the connection's idle timer).
        drop(body);
        Ok(Some(!close))
    }
}

/// How the rest of a streamed request body is delimited.
enum Decoder {
    /// This many bytes remain.
    Length(u64),
    /// Chunked.
    Chunked(ChunkedDecoder),
}

/// Reads a request body from the client and hands it to the proxy's side as it arrives, never
/// more than [`body::STREAM_QUEUE`] ahead of what the upstream has taken.
struct Pump {
    tx: BodyTx,
    decoder: Decoder,
    /// Nothing more to read: the body ended (or broke, or nobody wants it).
    done: bool,
    /// The body was read to its end: the next request starts right after it.
    complete: bool,
    /// Body bytes read so far, for the messages.
    read: u64,
}

impl Pump {
    fn new(tx: BodyTx, decoder: Decoder) -> Self {
        Pump {
            tx,
            decoder,
            done: false,
            complete: false,
            read: 0,
        }
    }

    /// Reads and decodes what the client has sent, as far as the hand-over has room. Returns
    /// whether anything was handed over (data, the end, or a fault).
    fn poll<S: AsyncRead + Unpin>(
        &mut self,
        io: &mut S,
        rbuf: &mut BytesMut,
        metrics: &Metrics,
        cx: &mut Context<'_>,
    ) -> bool {
        let mut fed = false;
        while !self.done {
            match self.tx.poll_room(cx) {
                Poll::Pending => return fed,
                Poll::Ready(true) => {}
                // Nobody takes the body any more: the connection closes after the response.
                Poll::Ready(false) => {
                    self.done = true;
                    return fed;
                }
            }
            if !rbuf.is_empty() {
                match self.decode(rbuf) {
                    Ok((data, end)) => {
                        let progressed = data.is_some() || end.is_some();
                        if let Some(data) = data {
                            self.read += data.len() as u64;
                            self.tx.send(data, cx.waker());
                        }
                        if let Some(trailers) = end {
                            self.tx.end(Ok(trailers), cx.waker());
                            self.done = true;
                            self.complete = true;
                        }
                        fed |= progressed;
                        if progressed {
                            continue;
                        }
                    }
                    Err(cause) => {
                        self.fail(ClientFault::Body, cause, metrics, cx);
                        return true;
                    }
                }
            }
            if rbuf.capacity() - rbuf.len() < READ {
                rbuf.reserve(READ_BODY);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, rbuf) {
                Poll::Pending => return fed,
                Poll::Ready(Ok(n)) if n > 0 => {}
                Poll::Ready(result) => {
                    let how = match result {
                        Err(e) => format!("failed: {e}"),
                        Ok(_) => "closed".to_owned(),
                    };
                    let cause = format!(
                        "the client's connection {how} after {} bytes of the request body",
                        self.read
                    );
                    self.fail(ClientFault::Aborted, cause, metrics, cx);
                    return true;
                }
            }
        }
        fed
    }

    /// Decodes what `rbuf` holds: data (if any) and whether the body ended, with its
    /// forwardable trailers.
    #[allow(clippy::type_complexity)]
    fn decode(
        &mut self,
        rbuf: &mut BytesMut,
    ) -> Result<(Option<Bytes>, Option<Option<http::HeaderMap>>), String> {
        match &mut self.decoder {
            Decoder::Length(left) => {
                let take = rbuf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= take as u64;
                let data = (take > 0).then(|| rbuf.split_to(take).freeze());
                Ok((data, (*left == 0).then_some(None)))
            }
            Decoder::Chunked(d) => {
                let first = match d.next(rbuf, usize::MAX).map_err(|e| e.to_string())? {
                    Step::Partial => return Ok((None, None)),
                    Step::End(trailers) => return Ok((None, Some(trailers))),
                    // Large pieces pass as they are, without a copy.
                    Step::Data(data) if data.len() >= GATHER / 4 => return Ok((Some(data), None)),
                    Step::Data(data) => data,
                };
                // Small chunks are gathered: one piece of data for many of them.
                let mut out = BytesMut::with_capacity(GATHER);
                out.extend_from_slice(&first);
                let end = d
                    .decode_into(rbuf, &mut out, GATHER)
                    .map_err(|e| e.to_string())?;
                Ok((Some(out.freeze()), end))
            }
        }
    }

    /// Ends the body in the client's fault, counted here.
    fn fail(&mut self, fault: ClientFault, cause: String, metrics: &Metrics, cx: &Context<'_>) {
        tracing::debug!(kind = fault.as_str(), %cause, "request body failed");
        metrics.client_error(fault);
        let mut err = ClientError::new(fault, cause);
        err.counted = true;
        self.tx.end(Err(err), cx.waker());
        self.done = true;
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
            crate::http1::head::put_field(buf, b"date", c.1.as_bytes());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_head_grows_the_buffer_in_steps_not_doublings() {
        let mut rbuf = BytesMut::with_capacity(READ);
        for _ in 0..64 {
            grow_for_head(&mut rbuf);
            let free = rbuf.capacity() - rbuf.len();
            rbuf.extend_from_slice(&vec![b'a'; free.min(1000)]);
            assert!(
                rbuf.capacity() <= rbuf.len() + READ + READ / 4,
                "{} bytes held for a head of {}",
                rbuf.capacity(),
                rbuf.len()
            );
        }
    }
}
