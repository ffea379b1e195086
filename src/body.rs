//! Request bodies as the proxy forwards them, and the faults a client can make in one.
//!
//! A request body comes whole with its head ([`RequestBody::Full`]), streams from canaryd's
//! HTTP/1.1 server side through a bounded hand-over ([`RequestBody::Streamed`], fed by
//! [`BodyTx`]), or streams from hyper ([`RequestBody::Hyper`]: HTTP/2, HTTP/1.0, upgrades).
//! Whatever breaks on the client's side of a body is a [`ClientError`], so that no layer
//! above can mistake it for a failure of the upstream.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

/// Errors of a streamed body (request or response).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a client did wrong; the `kind` label of `canaryd_client_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFault {
    /// A request head canaryd refuses (framing, `Host`, target, method).
    BadRequest = 0,
    /// A malformed request body (its chunked coding, or HTTP/2 data beyond or short of its
    /// `content-length`).
    Body = 1,
    /// The client closed or reset the connection in the middle of its body.
    Aborted = 2,
    /// The body did not arrive within `request_timeout`.
    Timeout = 3,
}

impl ClientFault {
    /// Every fault, in label order.
    pub const ALL: [ClientFault; 4] = [
        ClientFault::BadRequest,
        ClientFault::Body,
        ClientFault::Aborted,
        ClientFault::Timeout,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientFault::BadRequest => "bad_request",
            ClientFault::Body => "body",
            ClientFault::Aborted => "aborted",
            ClientFault::Timeout => "timeout",
        }
    }

    /// The status the client gets, if it is still there to get one.
    pub fn status(self) -> StatusCode {
        match self {
            ClientFault::BadRequest | ClientFault::Body | ClientFault::Aborted => {
                StatusCode::BAD_REQUEST
            }
            ClientFault::Timeout => StatusCode::REQUEST_TIMEOUT,
        }
    }
}

/// A failure on the client's side of a request body.
#[derive(Debug, Clone)]
pub struct ClientError {
    /// What kind of fault.
    pub fault: ClientFault,
    /// What happened, for the response and the log.
    pub cause: String,
    /// Whether `canaryd_client_errors_total` already counts it (the side that found it could
    /// count it, the proxy counts the rest).
    pub counted: bool,
}

impl ClientError {
    /// A fault not counted yet.
    pub fn new(fault: ClientFault, cause: impl Into<String>) -> Self {
        ClientError {
            fault,
            cause: cause.into(),
            counted: false,
        }
    }

    /// The client error somewhere in `e`'s chain of sources, if any.
    pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a ClientError> {
        let mut cur = Some(e);
        while let Some(e) = cur {
            if let Some(c) = e.downcast_ref::<ClientError>() {
                return Some(c);
            }
            cur = e.source();
        }
        None
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.cause)
    }
}

impl std::error::Error for ClientError {}

/// A request body on its way to an upstream.
#[derive(Debug)]
pub enum RequestBody {
    /// Read whole with the head, or empty.
    Full(Full<Bytes>),
    /// Streamed by canaryd's HTTP/1.1 server side.
    Streamed(StreamedBody),
    /// Streamed by hyper.
    Hyper(Incoming),
    /// Another body, with a copy of its first bytes taken as it streams (a shadow copy).
    Tee(Box<Tee>),
}

/// Whether hyper's error is an HTTP/2 stream canaryd's side reset because the client broke
/// HTTP/2's rules for its body (such as more or fewer bytes than its `content-length`),
/// rather than the client going away.
fn h2_broken_body(e: &hyper::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .is_some_and(|h2| h2.is_reset() && !h2.is_remote())
}

/// A body and the tap copying it.
#[derive(Debug)]
pub struct Tee {
    /// The body.
    pub inner: RequestBody,
    /// The copy.
    pub tap: Tap,
}

impl RequestBody {
    /// No body.
    pub fn empty() -> Self {
        RequestBody::Full(Full::default())
    }

    /// A way to ask, while another task reads the body, whether it is waiting for the client.
    /// Only for bodies canaryd's server side streams.
    pub fn watch(&self) -> Option<BodyWatch> {
        match self {
            RequestBody::Streamed(b) => Some(BodyWatch {
                shared: b.shared.clone(),
            }),
            RequestBody::Tee(t) => t.inner.watch(),
            RequestBody::Full(_) | RequestBody::Hyper(_) => None,
        }
    }
}

/// See [`RequestBody::watch`].
pub struct BodyWatch {
    shared: Arc<Mutex<Shared>>,
}

impl BodyWatch {
    /// Whether the body's reader took everything and is waiting for more from the client
    /// (not for room upstream): a timeout now is the client's lateness.
    pub fn waiting_on_client(&self) -> bool {
        let s = lock(&self.shared);
        s.consumer.is_some() && s.queue.is_empty() && s.end.is_none()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Full(b) => Pin::new(b).poll_frame(cx).map_err(|e| match e {}),
            RequestBody::Streamed(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(|e| {
                // Reading the client's body is all hyper does here: a failure is the client's.
                let fault = if e.is_parse() || h2_broken_body(&e) {
                    ClientFault::Body
                } else if e.is_timeout() {
                    ClientFault::Timeout
                } else {
                    ClientFault::Aborted
                };
                Box::new(ClientError::new(
                    fault,
                    format!("reading the request body: {e}"),
                )) as BoxError
            }),
            RequestBody::Tee(t) => {
                let polled = Pin::new(&mut t.inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            t.tap.push(data);
                        }
                        // The last frame of a body of known length: no one asks further.
                        if t.inner.is_end_stream() {
                            t.tap.end();
                        }
                    }
                    Poll::Ready(None) => t.tap.end(),
                    Poll::Ready(Some(Err(_))) => t.tap.fail(),
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Full(b) => b.is_end_stream(),
            RequestBody::Streamed(b) => b.is_end_stream(),
            RequestBody::Hyper(b) => b.is_end_stream(),
            RequestBody::Tee(t) => t.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Full(b) => b.size_hint(),
            RequestBody::Streamed(b) => b.size_hint(),
            RequestBody::Hyper(b) => b.size_hint(),
            RequestBody::Tee(t) => t.inner.size_hint(),
        }
    }
}

type TapConsumer = Box<dyn FnOnce(Option<Bytes>) + Send>;

/// A copy of a body's first bytes: each consumer gets the whole body when it ended within
/// the consumer's limit, `None` when it was larger, failed, or was dropped unfinished.
pub struct Tap {
    buf: BytesMut,
    limit: usize,
    over: bool,
    consumers: Vec<(usize, TapConsumer)>,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap")
            .field("copied", &self.buf.len())
            .field("limit", &self.limit)
            .finish()
    }
}

impl Default for Tap {
    fn default() -> Self {
        Tap {
            buf: BytesMut::new(),
            limit: 0,
            over: false,
            consumers: Vec::new(),
        }
    }
}

impl Tap {
    /// Adds a consumer of bodies up to `limit` bytes.
    pub fn add(&mut self, limit: usize, f: impl FnOnce(Option<Bytes>) + Send + 'static) {
        self.limit = self.limit.max(limit);
        self.consumers.push((limit, Box::new(f)));
    }

    /// Whether anyone consumes the copy.
    pub fn is_empty(&self) -> bool {
        self.consumers.is_empty()
    }

    /// Copies a data frame (nothing past the largest limit is kept).
    pub fn push(&mut self, data: &[u8]) {
        if self.over || self.consumers.is_empty() {
            return;
        }
        if self.buf.len() + data.len() > self.limit {
            // Over every consumer's limit: they hear it now, not when a long body ends.
            self.over = true;
            self.buf = BytesMut::new();
            self.fail();
        } else {
            self.buf.extend_from_slice(data);
        }
    }

    /// The body ended: every consumer gets its copy.
    pub fn end(&mut self) {
        let body = (!self.over).then(|| std::mem::take(&mut self.buf).freeze());
        for (limit, f) in self.consumers.drain(..) {
            f(body.clone().filter(|b| b.len() <= limit));
        }
    }

    /// The body failed: every consumer gets `None`.
    pub fn fail(&mut self) {
        for (_, f) in self.consumers.drain(..) {
            f(None);
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.fail();
    }
}

/// How much decoded body data may wait between the two sides of a streamed body. The server
/// side stops reading the client once this much waits for the upstream.
pub const STREAM_QUEUE: usize = 64 * 1024;

/// What a streamed body's two sides share.
#[derive(Default)]
struct Shared {
    /// Data not yet taken by the body.
    queue: VecDeque<Bytes>,
    queued: usize,
    /// How the body ended: `Ok(trailers)`, or the client's fault.
    end: Option<Result<Option<HeaderMap>, ClientError>>,
    /// The body waits for data.
    consumer: Option<Waker>,
    /// The server side waits for room.
    producer: Option<Waker>,
    /// The body was dropped: nobody takes more data.
    dropped: bool,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A request body streamed by canaryd's HTTP/1.1 server side as it decodes the client's bytes.
pub struct StreamedBody {
    shared: Arc<Mutex<Shared>>,
    /// Bytes still to come by `Content-Length`, if framed by one.
    length: Option<u64>,
    done: bool,
}

impl fmt::Debug for StreamedBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamedBody")
            .field("length", &self.length)
            .finish_non_exhaustive()
    }
}

impl Drop for StreamedBody {
    fn drop(&mut self) {
        let mut s = lock(&self.shared);
        s.dropped = true;
        s.queue.clear();
        if let Some(w) = s.producer.take() {
            drop(s);
            w.wake();
        }
    }
}

impl Body for StreamedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut s = lock(&self.shared);
        if let Some(data) = s.queue.pop_front() {
            s.queued -= data.len();
            let producer = s.producer.take();
            drop(s);
            if let Some(w) = producer {
                w.wake();
            }
            if let Some(left) = &mut self.length {
                *left = left.saturating_sub(data.len() as u64);
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        match s.end.take() {
            None => {
                if !s.consumer.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    s.consumer = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Some(Ok(trailers)) => {
                drop(s);
                self.done = true;
                Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
            }
            Some(Err(e)) => {
                drop(s);
                self.done = true;
                Poll::Ready(Some(Err(Box::new(e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.length == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// The server side of a streamed body: hands decoded data over, and says how it ended.
pub struct BodyTx {
    shared: Arc<Mutex<Shared>>,
}

impl fmt::Debug for BodyTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BodyTx")
    }
}

/// A streamed body and its feeding side. `length`: the body's `Content-Length`, if it has one.
pub fn streamed(length: Option<u64>) -> (BodyTx, StreamedBody) {
    let shared = Arc::new(Mutex::new(Shared::default()));
    (
        BodyTx {
            shared: shared.clone(),
        },
        StreamedBody {
            shared,
            length,
            done: false,
        },
    )
}

impl BodyTx {
    /// `Ready(true)` when the body can take more data, `Ready(false)` when nobody will take
    /// it (the body was dropped); `Pending` (woken when room is made) when it is full.
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut s = lock(&self.shared);
        if s.dropped {
            return Poll::Ready(false);
        }
        if s.queued < STREAM_QUEUE {
            return Poll::Ready(true);
        }
        if !s.producer.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.producer = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Hands data over. `me`: the waker of the task calling, which need not be woken for it.
    pub fn send(&self, data: Bytes, me: &Waker) {
        if data.is_empty() {
            return;
        }
        let mut s = lock(&self.shared);
        if s.dropped {
            return;
        }
        s.queued += data.len();
        s.queue.push_back(data);
        Self::wake_consumer(s, me);
    }

    /// The body is complete (with the trailers to forward, if any) or broken.
    pub fn end(&self, end: Result<Option<HeaderMap>, ClientError>, me: &Waker) {
        let mut s = lock(&self.shared);
        s.end = Some(end);
        Self::wake_consumer(s, me);
    }

    fn wake_consumer(mut s: MutexGuard<'_, Shared>, me: &Waker) {
        if let Some(w) = s.consumer.take() {
            drop(s);
            // The connection's own task polls the body again before it sleeps.
            if !w.will_wake(me) {
                w.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_streamed_body_yields_what_was_sent_then_its_end() {
        let (tx, mut body) = streamed(Some(6));
        let me = Waker::noop();
        assert_eq!(body.size_hint().exact(), Some(6));
        tx.send(Bytes::from_static(b"abc"), me);
        tx.send(Bytes::from_static(b"def"), me);
        tx.end(Ok(None), me);
        async fn data(body: &mut StreamedBody) -> Bytes {
            let frame = body.frame().await.expect("frame").expect("ok");
            frame.into_data().expect("data")
        }
        assert_eq!(data(&mut body).await, "abc");
        assert_eq!(body.size_hint().exact(), Some(3));
        assert_eq!(data(&mut body).await, "def");
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn a_broken_body_ends_in_the_clients_error() {
        let (tx, mut body) = streamed(None);
        tx.end(
            Err(ClientError::new(
                ClientFault::Body,
                "invalid chunk size line",
            )),
            Waker::noop(),
        );
        let err = body.frame().await.expect("frame").expect_err("error");
        let client = ClientError::find(err.as_ref()).expect("a client error");
        assert_eq!(client.fault, ClientFault::Body);
    }

    #[test]
    fn a_watch_tells_whether_the_reader_waits_for_the_client() {
        let (tx, body) = streamed(None);
        let mut body = RequestBody::Streamed(body);
        let watch = body.watch().expect("a streamed body has a watch");
        let me = Waker::noop();
        let mut cx = Context::from_waker(me);
        assert!(!watch.waiting_on_client(), "not read yet");
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending());
        assert!(watch.waiting_on_client());
        tx.send(Bytes::from_static(b"x"), me);
        assert!(!watch.waiting_on_client(), "data waits for the reader");
        assert!(RequestBody::empty().watch().is_none());
    }

    #[test]
    fn the_queue_is_bounded_and_room_comes_back_when_taken() {
        let (tx, mut body) = streamed(None);
        let me = Waker::noop();
        let mut cx = Context::from_waker(me);
        while tx.poll_room(&mut cx) == Poll::Ready(true) {
            tx.send(Bytes::from(vec![0; 1024]), me);
        }
        assert_eq!(lock(&tx.shared).queued, STREAM_QUEUE);
        let frame = Pin::new(&mut body).poll_frame(&mut cx);
        assert!(matches!(frame, Poll::Ready(Some(Ok(_)))));
        assert_eq!(tx.poll_room(&mut cx), Poll::Ready(true));
        drop(body);
        assert_eq!(
            tx.poll_room(&mut cx),
            Poll::Ready(false),
            "nobody takes it now"
        );
    }
}
