//! canaryd's HTTP/1.1 client side: a keep-alive pool of upstream connections and the codec
//! that speaks on them.
//!
//! A connection is *driven by the request that holds it*: the downstream connection's task
//! writes the request head and body, reads the response head and streams the response body
//! on its own polls, then parks the connection for the next request. There is no connection
//! task, no channel between a request and its connection and no pool key to hash. The wire
//! rules are [`crate::http1`]'s; what is here is driving them on a socket: request bodies sent
//! as they arrive (with their `Content-Length`, or chunked; what the client's body has ready is
//! gathered into one write of up to 16 KiB), response bodies read by `Content-Length`, chunked
//! (trailers only as announced and allowed) or to the end of the connection, `1xx` interim
//! responses skipped, and `101 Switching Protocols` handing the socket to a tunnel.
//!
//! Only the upstream's behaviour is an [`UpstreamError`] of the arm: a request body that the
//! client breaks, abandons or sends too slowly (the request was waiting for the client, not
//! for the upstream, when `request_timeout` expired) is [`UpstreamError::Client`].
//!
//! A connection goes back to the pool only when both messages are complete, exactly (no byte
//! left over), and neither side asked to close; anything else closes it.
//!
//! A pool opens at most `max_connections` connections (idle and busy together). A request that
//! finds none idle and the pool full waits, in arrival order, for one: a connection finishing
//! its exchange is handed straight to the longest-waiting request, and a connection closing
//! lets that request open a new one. The wait is part of the request's `request_timeout`. So
//! however many requests arrive at once (an HTTP/2 client may send hundreds on each of its
//! connections), the upstream sees at most `max_connections` sockets and canaryd holds at most
//! that many connections' buffers.

use std::collections::VecDeque;
use std::fmt;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::io::AsyncWrite;
use tokio::sync::oneshot;

use super::dial::{Dialer, Stream};
use super::error::UpstreamError;
use super::forwarded::Forwarded;
use crate::body::RequestBody;
use crate::body::{ClientError, ClientFault};
use crate::http1::chunked::{self, ChunkedDecoder, Step};
use crate::http1::head::{encode_request, parse_response, ResponseBody, ResponseHead};
use crate::http1::BodyLength;

pub use crate::body::BoxError;

/// Idle connections are closed after about this long (see [`H1Pool::sweep`]); the HTTP/2
/// client's pool uses the same.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How many sweeps, one every `every`, a connection may go unused before it is closed as
/// idle ([`POOL_IDLE_TIMEOUT`]).
pub(crate) fn idle_sweeps(every: Duration) -> u64 {
    let keep = POOL_IDLE_TIMEOUT.as_millis() / every.as_millis().max(1);
    u64::try_from(keep).unwrap_or(u64::MAX).max(1)
}

/// Idle HTTP/1.1 connections kept per upstream; enough for a saturated sidecar, bounded for
/// memory.
const POOL_MAX_IDLE: usize = 512;
/// How much room a read asks for: a response head, or a slice of a body.
const READ_HEAD: usize = 8 * 1024;
const READ_BODY: usize = 32 * 1024;

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
    /// Its place among the pool's `max_connections`, given back when it closes.
    _slot: Slot,
}

impl Conn {
    fn new(io: Stream, slot: Slot) -> Self {
        Conn {
            io,
            rbuf: BytesMut::new(),
            head: BytesMut::new(),
            out: VecDeque::new(),
            idle_epoch: 0,
            _slot: slot,
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

/// The request body still to be sent.
struct Outgoing {
    body: RequestBody,
    chunked: bool,
}

/// Request body data is gathered into writes of up to this much (what the client's body has
/// ready now): many small frames cost one write, not one each.
const SEND_BATCH: usize = 16 * 1024;
/// Pieces smaller than this are copied together; larger ones are written where they are.
const COPY_PIECE: usize = 1024;

/// How the rest of a response body is delimited.
#[derive(Debug, Clone)]
enum Framing {
    /// This many bytes remain.
    Length(u64),
    /// A chunked body.
    Chunked(Box<ChunkedDecoder>),
    /// Everything until the upstream closes the connection.
    Close,
    /// `101 Switching Protocols`: the connection is the tunnel's.
    Upgrade,
    /// Complete.
    Done,
}

/// An error of the upstream's HTTP.
fn protocol(msg: impl Into<String>) -> BoxError {
    Box::new(io::Error::new(io::ErrorKind::InvalidData, msg.into()))
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
    /// The last look at the client's body found nothing ready, and the upstream had taken
    /// everything: the request waits for the client, not for the upstream.
    waiting_on_client: bool,
}

impl Exchange {
    /// Moves the request forward: writes what is queued, queues what the client's body has.
    /// A failure stops the request (the connection will not be reused). Only a failure of
    /// the client's body is returned: a write failure is left for the read side to report,
    /// since the upstream may have answered before it closed.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Result<(), ClientError> {
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
            // What the body has ready now, up to a batch.
            let mut batch = Batch::default();
            let mut ended = None;
            while batch.total < SEND_BATCH {
                let frame = match Pin::new(&mut outgoing.body).poll_frame(cx) {
                    Poll::Pending => break,
                    Poll::Ready(None) => {
                        ended = Some(None);
                        break;
                    }
                    Poll::Ready(Some(Err(e))) => {
                        self.stop_sending();
                        return Err(into_client_error(e));
                    }
                    Poll::Ready(Some(Ok(frame))) => frame,
                };
                match frame.into_data() {
                    Ok(data) => batch.push(data),
                    Err(frame) => {
                        // Trailers end the body; a body sent by length has nowhere for them.
                        ended = Some(frame.into_trailers().ok());
                        break;
                    }
                }
            }
            let total = batch.total;
            self.waiting_on_client = total == 0 && ended.is_none();
            if self.waiting_on_client {
                return Ok(());
            }
            let out = &mut self.conn.out;
            if total > 0 {
                if outgoing.chunked {
                    let mut size = BytesMut::with_capacity(18);
                    chunked::put_size(&mut size, total);
                    out.push_back(size.freeze());
                }
                batch.into_queue(out);
                if outgoing.chunked {
                    out.push_back(Bytes::from_static(b"\r\n"));
                }
            }
            if let Some(trailers) = ended {
                if outgoing.chunked {
                    let mut end = BytesMut::new();
                    chunked::put_end(&mut end, trailers.as_ref());
                    out.push_back(end.freeze());
                }
                self.outgoing = None;
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
    ) -> Poll<Result<ResponseHead, BoxError>> {
        loop {
            if !self.conn.rbuf.is_empty() {
                if let Some(head) = parse_response(&mut self.conn.rbuf, head_request)? {
                    if head.response.status().is_informational()
                        && head.body != ResponseBody::Upgrade
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

/// Request body data gathered for one write: one piece is passed on as it is, several small
/// ones are copied together, large ones stay where they are.
#[derive(Default)]
struct Batch {
    first: Option<Bytes>,
    pieces: Vec<Bytes>,
    small: BytesMut,
    total: usize,
}

impl Batch {
    fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        self.total += data.len();
        if self.total == data.len() {
            self.first = Some(data);
            return;
        }
        if let Some(first) = self.first.take() {
            self.add(first);
        }
        self.add(data);
    }

    fn add(&mut self, data: Bytes) {
        if data.len() < COPY_PIECE {
            self.small.extend_from_slice(&data);
        } else {
            if !self.small.is_empty() {
                self.pieces.push(self.small.split().freeze());
            }
            self.pieces.push(data);
        }
    }

    /// Appends the batch, in order, to a write queue.
    fn into_queue(self, out: &mut VecDeque<Bytes>) {
        out.extend(self.first);
        out.extend(self.pieces);
        if !self.small.is_empty() {
            out.push_back(self.small.freeze());
        }
    }
}

/// The client's fault behind a request body's error. Every request body canaryd forwards
/// fails only with a [`ClientError`]; anything else is taken as the client going away.
pub(crate) fn into_client_error(e: BoxError) -> ClientError {
    match e.downcast::<ClientError>() {
        Ok(c) => *c,
        Err(e) => ClientError::new(
            ClientFault::Aborted,
            format!("reading the request body: {e}"),
        ),
    }
}

/// A pool's connections and the requests waiting for one.
struct State {
    /// Idle connections, most recently used last: requests take the warmest connection.
    idle: VecDeque<Box<Conn>>,
    /// Connections open or being opened, idle or busy: at most `max`.
    open: usize,
    /// Requests waiting for a connection, oldest first. A sender whose request gave up is
    /// skipped when its turn comes (and pruned as the queue grows).
    waiters: VecDeque<oneshot::Sender<Grant>>,
    /// The queue length at which the senders of requests that gave up are pruned next.
    prune_at: usize,
}

/// The waiting queue is first pruned at this length.
const PRUNE_MIN: usize = 64;

/// What [`H1Pool::checkout`] found.
enum Checkout {
    /// An idle connection.
    Conn(Box<Conn>),
    /// A place to open a connection in.
    Slot(Slot),
    /// The pool is full: a place in the queue.
    Wait(oneshot::Receiver<Grant>),
}

/// What a waiting request is given.
enum Grant {
    /// A connection that finished its previous exchange.
    Conn(Box<Conn>),
    /// A place freed by a connection that closed: open a new one.
    Slot(Slot),
}

/// A place among a pool's `max_connections`, held by a connection (or by a request opening
/// one). Dropped, it goes to the longest-waiting request, or back to the pool.
struct Slot {
    pool: Weak<H1Pool>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        let next = Slot {
            pool: std::mem::take(&mut self.pool),
        };
        // Whatever a gone waiter hands back is dropped after the lock is released.
        let returned = pool.grant(Grant::Slot(next));
        drop(returned);
    }
}

/// The idle HTTP/1.1 connections of one upstream, and how to make more.
pub struct H1Pool {
    state: Mutex<State>,
    /// `max_connections`: connections open at once, idle and busy.
    max: usize,
    dialer: Dialer,
    /// Counts [`H1Pool::sweep`] calls; an idle connection remembers the one it was parked at.
    epoch: AtomicU64,
}

impl fmt::Debug for H1Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H1Pool")
            .field("target", self.dialer.uri())
            .finish()
    }
}

impl H1Pool {
    /// A pool for `uri` (`http://` or `https://` with `tls`, whose ALPN is set to HTTP/1.1
    /// here) of at most `max` connections. Connections are opened on demand with `connector`.
    pub fn new(
        connector: HttpConnector,
        uri: Uri,
        tls: Option<&rustls::ClientConfig>,
        max: usize,
    ) -> Self {
        H1Pool {
            state: Mutex::new(State {
                idle: VecDeque::new(),
                open: 0,
                waiters: VecDeque::new(),
                prune_at: PRUNE_MIN,
            }),
            max: max.max(1),
            dialer: Dialer::new(connector, uri, tls, b"http/1.1"),
            epoch: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The warmest idle connection that is still open, or else a place to open one, or else
    /// a place in the queue. A dead idle connection found on the way is closed outside the
    /// lock (its place then goes to the queue).
    fn checkout(self: &Arc<Self>) -> Checkout {
        loop {
            let mut state = self.lock();
            if let Some(mut conn) = state.idle.pop_back() {
                drop(state);
                if conn.alive() {
                    return Checkout::Conn(conn);
                }
                continue;
            }
            if state.open < self.max {
                state.open += 1;
                return Checkout::Slot(Slot {
                    pool: Arc::downgrade(self),
                });
            }
            let (tx, rx) = oneshot::channel();
            // Requests that gave up leave their sender behind until its turn: prune them
            // whenever the queue has doubled since the last pruning, at a cost of O(1) per
            // request. The queue stays within twice the most requests ever waiting at once
            // (at least 64), which the requests in flight bound.
            if state.waiters.len() >= state.prune_at {
                state.waiters.retain(|w| !w.is_closed());
                state.prune_at = (2 * state.waiters.len()).max(PRUNE_MIN);
            }
            state.waiters.push_back(tx);
            return Checkout::Wait(rx);
        }
    }

    /// Gives a connection or a freed place to the longest-waiting request; with none waiting,
    /// a connection is parked and a place is given back. Returns what must be dropped (a
    /// connection beyond [`POOL_MAX_IDLE`]), to be dropped by the caller once the lock is
    /// released.
    fn grant(&self, mut grant: Grant) -> Option<Grant> {
        let mut state = self.lock();
        while let Some(waiter) = state.waiters.pop_front() {
            match waiter.send(grant) {
                Ok(()) => return None,
                Err(back) => grant = back,
            }
        }
        match grant {
            Grant::Conn(conn) if state.idle.len() < POOL_MAX_IDLE => {
                state.idle.push_back(conn);
                None
            }
            Grant::Conn(conn) => Some(Grant::Conn(conn)),
            Grant::Slot(mut slot) => {
                state.open -= 1;
                // Given back: nothing more to hand on when it drops.
                slot.pool = Weak::new();
                None
            }
        }
    }

    /// Parks a connection whose exchange is complete, or hands it to a waiting request.
    fn checkin(&self, mut conn: Box<Conn>) {
        conn.idle_epoch = self.epoch.load(Ordering::Relaxed);
        let returned = self.grant(Grant::Conn(conn));
        drop(returned);
    }

    /// Connections open now (idle and busy).
    #[cfg(test)]
    fn open(&self) -> usize {
        self.lock().open
    }

    /// Opens a new connection (TCP, then TLS for `https://`) in `slot`.
    async fn connect(&self, slot: Slot) -> Result<Box<Conn>, UpstreamError> {
        Ok(Box::new(Conn::new(self.dialer.dial().await?, slot)))
    }

    /// A connection for one request, starting from what `first` found: an idle one, a new
    /// one, or (the pool being full) the first one given back, at most until `deadline`.
    /// `Ok(None)`: the deadline came.
    async fn acquire(
        self: &Arc<Self>,
        first: Checkout,
        mut deadline: Pin<&mut tokio::time::Sleep>,
    ) -> Result<Option<Box<Conn>>, UpstreamError> {
        let mut next = Some(first);
        loop {
            let checkout = match next.take() {
                Some(c) => c,
                None => self.checkout(),
            };
            let slot = match checkout {
                Checkout::Conn(conn) => return Ok(Some(conn)),
                Checkout::Slot(slot) => slot,
                Checkout::Wait(mut rx) => {
                    let got = poll_fn(|cx| match Pin::new(&mut rx).poll(cx) {
                        Poll::Ready(r) => Poll::Ready(Some(r)),
                        Poll::Pending => deadline.as_mut().poll(cx).map(|()| None),
                    })
                    .await;
                    match got {
                        Some(Ok(Grant::Conn(mut conn))) => {
                            if conn.alive() {
                                return Ok(Some(conn));
                            }
                            // Closed while parked: its place is ours to reopen.
                            let Conn { _slot, .. } = *conn;
                            _slot
                        }
                        Some(Ok(Grant::Slot(slot))) => slot,
                        // Dropped without a grant: only by a pool being dropped, which this
                        // request (holding it) prevents. Look again all the same.
                        Some(Err(_)) => continue,
                        None => {
                            // Anything granted in the meantime goes on to the next request.
                            rx.close();
                            if let Ok(grant) = rx.try_recv() {
                                match grant {
                                    Grant::Conn(conn) => self.checkin(conn),
                                    Grant::Slot(slot) => drop(slot),
                                }
                            }
                            return Ok(None);
                        }
                    }
                }
            };
            // Boxed: connecting is rare, and its future would otherwise make every request's
            // future several times larger.
            let mut connecting = Box::pin(self.connect(slot));
            return poll_fn(|cx| match connecting.as_mut().poll(cx) {
                Poll::Ready(r) => Poll::Ready(r.map(Some)),
                Poll::Pending => deadline.as_mut().poll(cx).map(|()| Ok(None)),
            })
            .await;
        }
    }

    /// Closes connections the upstream has closed and those idle for longer than
    /// [`POOL_IDLE_TIMEOUT`], given that this runs every `every`.
    pub fn sweep(&self, every: Duration) {
        let epoch = self.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        let keep = idle_sweeps(every);
        let mut closed = Vec::new();
        let mut state = self.lock();
        let idle = &mut state.idle;
        let mut i = 0;
        while i < idle.len() {
            let c = &mut idle[i];
            if epoch - c.idle_epoch <= keep && c.alive() {
                i += 1;
            } else if let Some(c) = idle.remove(i) {
                // Dropped outside the lock (a closing connection's place is given back).
                closed.push(c);
            }
        }
        drop(state);
        drop(closed);
    }

    /// Sends a request on a pooled or new connection and reads the response head, for at
    /// most `timeout`. The response body holds the connection until it has been read.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<RequestBody>,
        forwarded: &Forwarded,
        timeout: Duration,
    ) -> Result<Response<H1Body>, UpstreamError> {
        // Polled in place rather than wrapping this future in `tokio::time::timeout`, which
        // would move it on every request.
        let mut deadline = pin!(tokio::time::sleep(timeout));
        let mut conn = match self.checkout() {
            Checkout::Conn(conn) => conn,
            // Not the common case: boxed so that its future does not make every request's
            // future larger.
            other => Box::pin(self.acquire(other, deadline.as_mut()))
                .await?
                .ok_or(UpstreamError::Timeout(timeout))?,
        };
        let (parts, body) = req.into_parts();
        let head_request = parts.method == Method::HEAD;
        let length = if body.is_end_stream() {
            BodyLength::Empty
        } else {
            match body.size_hint().exact() {
                Some(n) => BodyLength::Length(n),
                // A body of unknown length goes chunked.
                None => BodyLength::Chunked,
            }
        };
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        encode_request(
            &mut conn.head,
            &parts.method,
            target,
            &parts.headers,
            Forwarded::replaces,
            forwarded.fields(),
            length,
        );
        let head = conn.head.split().freeze();
        conn.out.push_back(head);
        let mut ex = Exchange {
            conn,
            outgoing: (length != BodyLength::Empty).then(|| Outgoing {
                body,
                chunked: length == BodyLength::Chunked,
            }),
            reuse: true,
            waiting_on_client: false,
        };
        let head = poll_fn(|cx| {
            if let Err(e) = ex.poll_send(cx) {
                return Poll::Ready(Some(Err(UpstreamError::Client(e))));
            }
            match ex.poll_head(cx, head_request) {
                Poll::Ready(r) => {
                    Poll::Ready(Some(r.map_err(|e| UpstreamError::Protocol(e.to_string()))))
                }
                Poll::Pending => deadline.as_mut().poll(cx).map(|()| None),
            }
        })
        .await;
        let head = match head {
            Some(head) => head?,
            // Still waiting for the client's body: its lateness, not the upstream's.
            None if ex.outgoing.is_some() && ex.waiting_on_client => {
                return Err(UpstreamError::Client(ClientError::new(
                    ClientFault::Timeout,
                    format!("the request body did not arrive within {timeout:?}"),
                )))
            }
            None => return Err(UpstreamError::Timeout(timeout)),
        };
        ex.reuse &= head.reuse;
        let (parts, ()) = head.response.into_parts();
        let framing = match head.body {
            ResponseBody::Empty => Framing::Done,
            ResponseBody::Length(n) => Framing::Length(n),
            ResponseBody::Chunked => Framing::Chunked(Box::new(ChunkedDecoder::new(head.trailer))),
            ResponseBody::Close => Framing::Close,
            ResponseBody::Upgrade => Framing::Upgrade,
        };
        let mut body = H1Body {
            exchange: Some(ex),
            framing,
            hop_by_hop: head.hop_by_hop,
            pool: self.clone(),
        };
        if matches!(body.framing, Framing::Done) {
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
            .field("upstream", self.pool.dialer.uri())
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
        if !matches!(self.framing, Framing::Upgrade) {
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
            match &mut this.framing {
                Framing::Done | Framing::Upgrade => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(0) => this.finish(),
                Framing::Length(left) => {
                    if conn.rbuf.is_empty() {
                        let room = usize::try_from(*left).unwrap_or(usize::MAX).min(READ_BODY);
                        match ready!(conn.poll_fill(cx, room)) {
                            Ok(0) => {
                                let left = *left;
                                return this.fail(protocol(format!(
                                    "connection closed {left} bytes before the end of the body"
                                )));
                            }
                            Ok(_) => continue,
                            Err(e) => return this.fail(e),
                        }
                    }
                    let take = conn
                        .rbuf
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    let data = conn.rbuf.split_to(take).freeze();
                    *left -= take as u64;
                    if *left == 0 {
                        this.finish();
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
                Framing::Chunked(decoder) => match decoder.next(&mut conn.rbuf, usize::MAX) {
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Step::End(trailers)) => {
                        this.finish();
                        return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                    }
                    Ok(Step::Partial) => {
                        let room = usize::try_from(decoder.remaining_in_chunk())
                            .unwrap_or(usize::MAX)
                            .clamp(READ_HEAD, READ_BODY);
                        match ready!(conn.poll_fill(cx, room)) {
                            Ok(0) => {
                                return this.fail(protocol(
                                    "connection closed before the end of the chunked body",
                                ))
                            }
                            Ok(_) => {}
                            Err(e) => return this.fail(e),
                        }
                    }
                    Err(e) => return this.fail(protocol(format!("invalid chunked body: {e}"))),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done)
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

    /// A pool of at most one connection to a listener that accepts and never answers.
    async fn pool_of_one() -> (Arc<H1Pool>, tokio::net::TcpListener) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let uri: Uri = format!("http://{}/", listener.local_addr().expect("addr"))
            .parse()
            .expect("uri");
        (
            Arc::new(H1Pool::new(HttpConnector::new(), uri, None, 1)),
            listener,
        )
    }

    #[tokio::test]
    async fn places_go_to_live_waiters_in_order_and_come_back_when_connections_close() {
        let (pool, _listener) = pool_of_one().await;
        let Checkout::Slot(slot) = pool.checkout() else {
            panic!("an empty pool has room");
        };
        let conn = pool.connect(slot).await.expect("connect");
        assert_eq!(pool.open(), 1);
        let Checkout::Wait(gone) = pool.checkout() else {
            panic!("a full pool queues");
        };
        let Checkout::Wait(mut first) = pool.checkout() else {
            panic!("a full pool queues");
        };
        let Checkout::Wait(mut second) = pool.checkout() else {
            panic!("a full pool queues");
        };
        // The first waiter gave up: the connection goes to the next one, not to the idle list.
        drop(gone);
        pool.checkin(conn);
        let Ok(Grant::Conn(conn)) = first.try_recv() else {
            panic!("the oldest live waiter gets the connection");
        };
        assert!(
            second.try_recv().is_err(),
            "one connection, one waiter served"
        );
        assert!(pool.lock().idle.is_empty());
        // The connection closes: its place goes to the second waiter, still counted.
        drop(conn);
        let Ok(Grant::Slot(slot)) = second.try_recv() else {
            panic!("a closed connection's place goes to the next waiter");
        };
        assert_eq!(pool.open(), 1);
        // Nobody waits: the place is given back.
        drop(slot);
        assert_eq!(pool.open(), 0);
        assert!(matches!(pool.checkout(), Checkout::Slot(_)));
    }

    #[tokio::test]
    async fn the_waiting_queue_sheds_requests_that_gave_up() {
        let (pool, _listener) = pool_of_one().await;
        let Checkout::Slot(_held) = pool.checkout() else {
            panic!("an empty pool has room");
        };
        for _ in 0..10_000 {
            let Checkout::Wait(rx) = pool.checkout() else {
                panic!("a full pool queues");
            };
            drop(rx);
        }
        let queued = pool.lock().waiters.len();
        assert!(queued <= 128, "{queued} senders of gone requests kept");
    }
}
