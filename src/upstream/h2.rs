//! canaryd's HTTP/2 client side, on the `h2` crate.
//!
//! A pool holds a few connections to one upstream, each driven by a task of its own (HTTP/2
//! multiplexes streams of many requests on one socket, so some task must read it for all of
//! them). A request runs on the downstream connection's task: it picks a connection, opens
//! its stream there, sends its body and waits for the response itself. There is no task and
//! no channel per request; only a request body still streaming when the response head comes
//! back (a bidirectional gRPC call) gets a task to finish the upload.
//!
//! Connections fill before new ones open: a request goes to the first connection with fewer
//! streams in flight than the upstream allows (its `SETTINGS_MAX_CONCURRENT_STREAMS`; before
//! a connection's own SETTINGS come, what the last ones said, or 100), and a new connection
//! opens only when every open one is full, up to `max_connections`. Beyond that a request
//! waits, in arrival order, until a stream ends on any connection (the wait is part of
//! `request_timeout`). Requests that arrive while a connection is being opened wait for it
//! rather than open their own.
//!
//! Response bodies give their bytes back to the upstream's flow-control window as they are
//! read, so a client that reads slowly holds at most its stream's window (256 KiB) in
//! canaryd. The connection's window never binds first: clients that stop reading cannot
//! stall the other streams of their connection.

use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::{Notify, OnceCell};

use super::dial::Dialer;
use super::error::UpstreamError;
use super::h1::{idle_sweeps, into_client_error};
use crate::body::{BoxError, ClientError, ClientFault, RequestBody};

/// Streams a connection is taken to allow before the upstream's SETTINGS say otherwise
/// (the common default: nginx 128, Go and HAProxy 100 and more).
const INITIAL_STREAMS: usize = 100;
/// The flow-control window canaryd grants the upstream per stream: how much of a response
/// canaryd may hold for a client that reads slowly (256 KiB: 4× nginx's and HAProxy's, and
/// 256 KiB per round trip is gigabytes a second within a pod or a data centre).
const STREAM_WINDOW: u32 = 256 * 1024;
/// The connection's window: as large as HTTP/2 allows, so that it never binds before the
/// streams' own windows do. A smaller one would let a few clients that stop reading hold it
/// all and stall every other response on the connection; memory is bounded per stream.
const CONN_WINDOW: u32 = (1 << 31) - 1;
/// The largest response head (HPACK-decoded) canaryd accepts from an upstream.
const MAX_HEADER_LIST: u32 = 64 * 1024;
/// Request body bytes a stream queues beyond what the upstream's window admits.
const MAX_SEND_BUFFER: usize = 1024 * 1024;

/// The HTTP/2 connections of one upstream, and how to make more.
pub struct H2Pool {
    dialer: Dialer,
    /// `max_connections`: connections open at once.
    max: usize,
    conns: Mutex<Vec<Arc<Entry>>>,
    /// Woken when a stream ends on a full connection: room for a waiting request.
    room: Arc<Notify>,
    /// Streams the upstream allows per connection, as its last SETTINGS said: what a new
    /// connection is taken to allow until its own SETTINGS come.
    streams: AtomicUsize,
    /// Counts [`H2Pool::sweep`] calls; a connection remembers the last one it was used in.
    epoch: AtomicU64,
}

impl fmt::Debug for H2Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Pool")
            .field("target", self.dialer.uri())
            .finish()
    }
}

/// One connection of a pool: opened by the first request that needs it.
struct Entry {
    /// The handle to open streams with, once the connection is up (or why it is not).
    send: OnceCell<Result<SendRequest<Bytes>, String>>,
    /// Requests on this connection now: picked, and not yet done with the response body.
    load: AtomicUsize,
    /// Streams the upstream allows at once on it (its SETTINGS; the pool's last word before).
    limit: AtomicUsize,
    /// Set when the connection has ended or failed; the pool forgets it.
    closed: Arc<AtomicBool>,
    /// The sweep epoch of its last request.
    used: AtomicU64,
    /// The pool's [`H2Pool::room`].
    room: Arc<Notify>,
}

impl Entry {
    fn new(epoch: u64, limit: usize, room: Arc<Notify>) -> Self {
        Entry {
            send: OnceCell::new(),
            load: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
            closed: Arc::new(AtomicBool::new(false)),
            used: AtomicU64::new(epoch),
            room,
        }
    }

    fn closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn full(&self) -> bool {
        self.load.load(Ordering::Relaxed) >= self.limit.load(Ordering::Relaxed)
    }
}

/// A request's place on a connection, given back when the request is done (its response
/// body read or dropped).
struct Load(Arc<Entry>);

impl Drop for Load {
    fn drop(&mut self) {
        let before = self.0.load.fetch_sub(1, Ordering::Relaxed);
        if before >= self.0.limit.load(Ordering::Relaxed) {
            self.0.room.notify_one();
        }
    }
}

impl H2Pool {
    /// A pool for `uri` (`http://`, or `https://` with `tls`, whose ALPN is set to h2 here) of
    /// at most `max` connections, opened on demand with `connector`.
    pub fn new(
        connector: HttpConnector,
        uri: Uri,
        tls: Option<&rustls::ClientConfig>,
        max: usize,
    ) -> Self {
        H2Pool {
            dialer: Dialer::new(connector, uri, tls, b"h2"),
            max: max.max(1),
            conns: Mutex::new(Vec::new()),
            room: Arc::new(Notify::new()),
            streams: AtomicUsize::new(INITIAL_STREAMS),
            epoch: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Entry>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The connection for the next request (see the module's documentation), its load
    /// already counting the request; `None` when every connection is full and no more may
    /// open.
    fn pick(&self) -> Option<Load> {
        let epoch = self.epoch.load(Ordering::Relaxed);
        let limit = self.streams.load(Ordering::Relaxed);
        let mut conns = self.lock();
        conns.retain(|e| !e.closed());
        let entry = match conns.iter().find(|e| !e.full()) {
            Some(e) => e.clone(),
            None if conns.len() < self.max => {
                let e = Arc::new(Entry::new(epoch, limit, self.room.clone()));
                conns.push(e.clone());
                e
            }
            None => return None,
        };
        entry.load.fetch_add(1, Ordering::Relaxed);
        entry.used.store(epoch, Ordering::Relaxed);
        Some(Load(entry))
    }

    /// [`H2Pool::pick`], waiting for room until `deadline` (`None`: it came).
    async fn place(&self, mut deadline: Pin<&mut tokio::time::Sleep>) -> Option<Load> {
        loop {
            let room = self.room.notified();
            let mut room = pin!(room);
            // Registered before looking, so a stream ending in between is not missed.
            room.as_mut().enable();
            if let Some(load) = self.pick() {
                // Several streams may have ended for one wake-up: the next waiter looks too.
                self.room.notify_one();
                return Some(load);
            }
            within(deadline.as_mut(), room).await?;
        }
    }

    /// Opens the connection of `entry`: dial, TLS, the HTTP/2 preface and SETTINGS, and a
    /// task that drives it until it ends.
    async fn connect(&self, closed: Arc<AtomicBool>) -> Result<SendRequest<Bytes>, String> {
        let io = self.dialer.dial().await.map_err(|e| match e {
            UpstreamError::Connect(m) => m,
            other => other.to_string(),
        })?;
        let (send, conn) = h2::client::Builder::new()
            .initial_max_send_streams(INITIAL_STREAMS)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
            closed.store(true, Ordering::Relaxed);
        });
        Ok(send)
    }

    /// Closes connections that have ended and those without a request for longer than
    /// [`POOL_IDLE_TIMEOUT`](super::h1::POOL_IDLE_TIMEOUT), given that this runs every
    /// `every`. A connection closes (with GOAWAY) once the pool and its last request have let
    /// go of it.
    pub fn sweep(&self, every: Duration) {
        let epoch = self.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        let keep = idle_sweeps(every);
        let mut conns = self.lock();
        conns.retain(|e| {
            let idle = e.load.load(Ordering::Relaxed) == 0
                && epoch - e.used.load(Ordering::Relaxed) > keep;
            !e.closed() && !idle
        });
    }

    /// Sends a request (absolute URI, no `host` field) and waits for the response head, for
    /// at most `timeout`. The request body streams on until it ends, on a task of its own if
    /// the response head comes first.
    pub async fn send(
        &self,
        req: Request<RequestBody>,
        timeout: Duration,
    ) -> Result<Response<H2Body>, UpstreamError> {
        let deadline = tokio::time::sleep(timeout);
        let mut deadline = pin!(deadline);
        let (mut parts, body) = req.into_parts();
        strip_connection_fields(&mut parts.headers);
        if let Some(len) = body.size_hint().exact() {
            if (len != 0 || defines_payload(&parts.method))
                && !parts.headers.contains_key(header::CONTENT_LENGTH)
            {
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            }
        }
        let end = body.is_end_stream();
        let mut head = Request::from_parts(parts, ());
        let mut body = Some(body);

        // A request may go out a second time only when the upstream cannot have seen it: the
        // connection had ended before it was sent, or the upstream refused its stream
        // (REFUSED_STREAM, or a graceful GOAWAY below its stream id; RFC 9113, section 8.7).
        // Only a request without a body is replayed after its stream was opened.
        let mut tries = 0;
        loop {
            tries += 1;
            let load = match self.pick() {
                Some(load) => load,
                None => match self.place(deadline.as_mut()).await {
                    Some(load) => load,
                    None => return Err(UpstreamError::Timeout(timeout)),
                },
            };
            let opened = match load.0.send.get() {
                Some(opened) => opened,
                None => {
                    let entry = &load.0;
                    // Boxed: opening is rare, and its future would make every request's larger.
                    let opening = entry
                        .send
                        .get_or_init(|| Box::pin(self.connect(entry.closed.clone())));
                    match within(deadline.as_mut(), opening).await {
                        Some(opened) => opened,
                        None => return Err(UpstreamError::Timeout(timeout)),
                    }
                }
            };
            let mut sender = match opened {
                Ok(sender) => sender.clone(),
                Err(e) => {
                    load.0.closed.store(true, Ordering::Relaxed);
                    return Err(UpstreamError::Connect(e.clone()));
                }
            };
            if let Err(e) = poll_fn(|cx| sender.poll_ready(cx)).await {
                load.0.closed.store(true, Ordering::Relaxed);
                if tries < 2 {
                    continue;
                }
                return Err(UpstreamError::Protocol(format!(
                    "the HTTP/2 connection ended: {e}"
                )));
            }
            let mut replay = (end && tries < 2).then(|| copy_head(&head));
            let opened = sender.send_request(std::mem::replace(&mut head, Request::new(())), end);
            let (response, stream) = match opened {
                Ok(opened) => opened,
                Err(e) => {
                    // The connection ended since `poll_ready` (its task runs on another thread).
                    if e.is_go_away() || e.is_io() {
                        if let Some(again) = replay.take() {
                            load.0.closed.store(true, Ordering::Relaxed);
                            head = again;
                            continue;
                        }
                    }
                    return Err(UpstreamError::Protocol(format!(
                        "opening an HTTP/2 stream: {e}"
                    )));
                }
            };
            let mut pipe = body.take().filter(|_| !end).map(|body| Pipe {
                body,
                tx: stream,
                on_body: false,
                done: false,
            });
            let mut response = response;
            let got = poll_fn(|cx| {
                if let Some(p) = pipe.as_mut() {
                    if let Poll::Ready(Err(PipeError::Client(e))) = p.poll(cx) {
                        return Poll::Ready(Err(Err(UpstreamError::Client(e))));
                    }
                }
                if let Poll::Ready(r) = Pin::new(&mut response).poll(cx) {
                    return Poll::Ready(r.map_err(Ok));
                }
                ready!(deadline.as_mut().poll(cx));
                Poll::Ready(Err(Err(if pipe.as_ref().is_some_and(|p| p.on_body) {
                    UpstreamError::Client(ClientError::new(
                        ClientFault::Timeout,
                        format!("the request body did not arrive within {timeout:?}"),
                    ))
                } else {
                    UpstreamError::Timeout(timeout)
                })))
            })
            .await;
            let got = match got {
                Ok(got) => got,
                Err(Err(e)) => return Err(e),
                Err(Ok(e)) => match replay {
                    Some(again) if unseen(&e) => {
                        load.0.closed.store(true, Ordering::Relaxed);
                        head = again;
                        continue;
                    }
                    _ => return Err(response_error(e)),
                },
            };
            if let Some(mut p) = pipe.filter(|p| !p.done) {
                tokio::spawn(poll_fn(move |cx| p.poll(cx).map(|_| ())));
            }
            // By now the upstream's SETTINGS have come: the pool learns its stream limit.
            let limit = sender.current_max_send_streams().max(1);
            load.0.limit.store(limit, Ordering::Relaxed);
            self.streams.store(limit, Ordering::Relaxed);
            drop(sender);
            return Ok(into_response(got, load));
        }
    }
}

/// The response with its body, which holds the request's place on the connection.
fn into_response(got: Response<RecvStream>, load: Load) -> Response<H2Body> {
    let (parts, recv) = got.into_parts();
    let remaining = if recv.is_end_stream() {
        Some(0)
    } else {
        parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    };
    Response::from_parts(
        parts,
        H2Body {
            recv,
            remaining,
            data_done: false,
            done: false,
            _load: load,
        },
    )
}

/// A copy of a request head without a body, to send again.
fn copy_head(head: &Request<()>) -> Request<()> {
    let mut copy = Request::new(());
    *copy.method_mut() = head.method().clone();
    *copy.uri_mut() = head.uri().clone();
    *copy.version_mut() = head.version();
    *copy.headers_mut() = head.headers().clone();
    copy
}

/// Whether a stream's error says the upstream never processed its request.
fn unseen(e: &h2::Error) -> bool {
    e.reason() == Some(Reason::REFUSED_STREAM)
        || (e.is_go_away() && e.is_remote() && e.reason() == Some(Reason::NO_ERROR))
}

/// Polls `fut` until it is ready or `deadline` comes (`None`).
async fn within<F: Future>(
    mut deadline: Pin<&mut tokio::time::Sleep>,
    fut: F,
) -> Option<F::Output> {
    let mut fut = pin!(fut);
    poll_fn(|cx| match fut.as_mut().poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => deadline.as_mut().poll(cx).map(|()| None),
    })
    .await
}

/// Why no response head came on a stream: the stream or the connection broke.
fn response_error(e: h2::Error) -> UpstreamError {
    if e.reason() == Some(Reason::REFUSED_STREAM) {
        UpstreamError::Protocol(format!("the upstream refused the stream: {e}"))
    } else {
        UpstreamError::Protocol(format!("HTTP/2: {e}"))
    }
}

/// Removes the fields HTTP/2 forbids (RFC 9113, section 8.2.2): connection-specific ones, and
/// `te` unless it is `trailers` (which gRPC sends). One pass over the names finds them; the
/// proxy has usually removed them already.
fn strip_connection_fields(headers: &mut HeaderMap) {
    let forbidden = |name: &header::HeaderName, value: &HeaderValue| {
        *name == header::CONNECTION
            || *name == header::TRANSFER_ENCODING
            || *name == header::UPGRADE
            || name.as_str() == "keep-alive"
            || name.as_str() == "proxy-connection"
            || (*name == header::TE && value != "trailers")
    };
    if !headers.iter().any(|(name, value)| forbidden(name, value)) {
        return;
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::HeaderName::from_static("keep-alive"),
        header::HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    if headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
}

/// Whether a request with this method states its body's length even when it is empty.
fn defines_payload(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    )
}

/// A request body going up a stream.
struct Pipe {
    body: RequestBody,
    tx: SendStream<Bytes>,
    /// Waiting for the client's next bytes (not for the upstream's window): a timeout now is
    /// the client's lateness.
    on_body: bool,
    done: bool,
}

/// Why a request body stopped going up.
enum PipeError {
    /// The client's body failed; the stream was reset.
    Client(ClientError),
    /// The stream was reset or closed by the upstream (which may still answer).
    Stream,
}

impl Pipe {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PipeError>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        let r = self.poll_send(cx);
        if r.is_ready() {
            self.done = true;
            self.on_body = false;
        }
        r
    }

    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PipeError>> {
        loop {
            self.on_body = false;
            // Room for a byte before reading more of the body: the upstream's window, not
            // canaryd's memory, holds back a client that sends faster than the upstream reads.
            self.tx.reserve_capacity(1);
            if self.tx.capacity() == 0 {
                loop {
                    match ready!(self.tx.poll_capacity(cx)) {
                        Some(Ok(0)) => {}
                        Some(Ok(_)) => break,
                        Some(Err(_)) | None => return Poll::Ready(Err(PipeError::Stream)),
                    }
                }
            } else if self.tx.poll_reset(cx).is_ready() {
                return Poll::Ready(Err(PipeError::Stream));
            }
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => {
                    self.on_body = true;
                    return Poll::Pending;
                }
                Poll::Ready(frame) => frame,
            };
            let sent = match frame {
                None => self.tx.send_data(Bytes::new(), true).map(|()| true),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let end = self.body.is_end_stream();
                        self.tx.send_data(data, end).map(|()| end)
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            self.tx.reserve_capacity(0);
                            self.tx.send_trailers(trailers).map(|()| true)
                        }
                        Err(_) => Ok(false),
                    },
                },
                Some(Err(e)) => {
                    self.tx.send_reset(Reason::CANCEL);
                    return Poll::Ready(Err(PipeError::Client(into_client_error(e))));
                }
            };
            match sent {
                Ok(true) => return Poll::Ready(Ok(())),
                Ok(false) => {}
                Err(_) => return Poll::Ready(Err(PipeError::Stream)),
            }
        }
    }
}

/// A response body from an HTTP/2 upstream. Its bytes go back to the upstream's window as
/// they are read; it holds its request's place on the connection until read or dropped.
pub struct H2Body {
    recv: RecvStream,
    /// Bytes still to come, when the response stated its length.
    remaining: Option<u64>,
    data_done: bool,
    done: bool,
    _load: Load,
}

impl fmt::Debug for H2Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Body")
            .field("remaining", &self.remaining)
            .field("done", &self.done)
            .finish()
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let me = self.get_mut();
        if me.done {
            return Poll::Ready(None);
        }
        if !me.data_done {
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The connection ending makes this fail too; the stream's error says so.
                    let _ = me.recv.flow_control().release_capacity(data.len());
                    if let Some(r) = me.remaining.as_mut() {
                        *r = r.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    me.done = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
                None => me.data_done = true,
            }
        }
        let trailers = ready!(me.recv.poll_trailers(cx));
        me.done = true;
        match trailers {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn streams_that_end_together_let_every_waiter_in() {
        let uri = Uri::from_static("http://127.0.0.1:9/");
        let pool = Arc::new(H2Pool::new(HttpConnector::new(), uri, None, 1));
        pool.streams.store(2, Ordering::Relaxed);
        let (a, b) = (pool.pick().expect("room"), pool.pick().expect("room"));
        assert!(pool.pick().is_none(), "one connection of 2 streams is full");
        let waiter = |pool: Arc<H2Pool>| {
            tokio::spawn(async move {
                let deadline = pin!(tokio::time::sleep(Duration::from_secs(5)));
                pool.place(deadline).await.is_some()
            })
        };
        let (w1, w2) = (waiter(pool.clone()), waiter(pool.clone()));
        // Both wait (the spawned tasks run on this thread only when it yields).
        tokio::task::yield_now().await;
        // Two streams end before either waiter runs again.
        drop((a, b));
        for w in [w1, w2] {
            let got = tokio::time::timeout(Duration::from_secs(2), w)
                .await
                .expect("a waiter left behind")
                .expect("task");
            assert!(got, "a waiter timed out");
        }
    }

    fn fields(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    header::HeaderName::from_static(n),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn connection_specific_fields_go_and_te_trailers_stays() {
        let mut h = fields(&[
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
        ]);
        strip_connection_fields(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "te"]);

        let mut h = fields(&[("te", "gzip"), ("x-user-id", "u1")]);
        strip_connection_fields(&mut h);
        assert_eq!(
            h.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["x-user-id"]
        );

        let clean = fields(&[("te", "trailers"), ("x-user-id", "u1")]);
        let mut h = clean.clone();
        strip_connection_fields(&mut h);
        assert_eq!(h, clean);
    }
}
