//! One downstream connection: served by canaryd's HTTP/1.1 server side until a request needs
//! hyper, then by hyper; closed when idle or too slow to send a request head, drained on
//! shutdown.
//!
//! Two timeouts watch a connection, both checked by one timer a few times per period rather
//! than by a timer per request (hyper's own `header_read_timeout` arms, allocates and
//! deregisters a timer for every request, measured at ~1,900 instructions of the ~26,600 a
//! proxied request cost):
//!
//! - **Request head** (`header_read_timeout`, HTTP/1): from the moment the connection is ready
//!   for its next request (accepted, TLS handshake done, or the previous response finished)
//!   until a request head is complete. Bytes trickling in (slowloris) do not extend it; a
//!   response still being written to a slow reader does. When it expires the connection is
//!   closed at once. Once a connection has carried an HTTP/2 request, only the idle timeout
//!   applies to it.
//! - **Idle** (`idle_timeout`): no request in progress and no bytes moving in either
//!   direction. The connection is shut down gracefully, so a request waiting on a slow
//!   upstream (no bytes moving) still completes before the connection closes.
//!
//! Recording activity must cost next to nothing (it happens on every read and write), so it
//! only bumps counters; the timer looks at them four times per period and fires between 1 and
//! 1¼ × the timeout after the last relevant activity.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::body::RequestBody;
use crate::proxy::Proxy;

/// Whether bytes moved on a connection, whether requests made progress, and how many
/// requests on it are in progress.
#[derive(Debug)]
pub struct Activity {
    /// Changes whenever bytes move or a request ends.
    moves: AtomicU64,
    /// Changes whenever a request begins or ends or bytes are written to the client; not
    /// when bytes only arrive (a request head trickling in is not progress).
    progress: AtomicU64,
    busy: AtomicUsize,
    /// The connection carries HTTP/2: no request-head timeout.
    http2: AtomicBool,
    /// The proxy is stopping: HTTP/1 responses carry `Connection: close`.
    draining: AtomicBool,
}

/// Why a connection's watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    /// No request and no bytes for `idle_timeout`: shut down gracefully.
    Idle,
    /// No complete request head for `header_read_timeout`: closed at once.
    Head,
}

/// Only a change of these counters matters, so a plain store (no read-modify-write) is
/// enough, even when two threads race.
fn bump(counter: &AtomicU64) {
    let n = counter.load(Ordering::Relaxed);
    counter.store(n.wrapping_add(1), Ordering::Relaxed);
}

impl Activity {
    fn new() -> Self {
        Activity {
            moves: AtomicU64::new(0),
            progress: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            http2: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
    }

    /// The proxy is stopping: an HTTP/1 response must tell the client to close the
    /// connection, so the client does not send another request on it.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether the connection has carried an HTTP/2 request.
    pub fn is_http2(&self) -> bool {
        self.http2.load(Ordering::Relaxed)
    }

    fn touch(&self) {
        bump(&self.moves);
    }

    /// Bytes went to the client: activity, and progress (a response is being delivered).
    fn wrote(&self) {
        bump(&self.moves);
        bump(&self.progress);
    }

    /// Marks a request in progress until the guard is dropped (end of its response body).
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        bump(&self.progress);
        Busy(self.clone())
    }

    /// Notes that the connection speaks HTTP/2 (its requests have no head timeout).
    pub fn http2(&self) {
        if !self.http2.load(Ordering::Relaxed) {
            self.http2.store(true, Ordering::Relaxed);
        }
    }

    /// Resolves when the connection has expired: no request in progress and nothing moved
    /// for `idle` ([`Expired::Idle`]), or, for HTTP/1, no request begun and nothing written
    /// for `head` while none was in progress ([`Expired::Head`]). Each fires between 1 and
    /// 1¼ × its timeout after the last activity; the timer wakes four times per the shorter.
    async fn watch(&self, idle: Duration, head: Option<Duration>) -> Expired {
        let step = head.map_or(idle, |h| h.min(idle)) / 4;
        let mut moves = self.moves.load(Ordering::Relaxed);
        let mut progress = self.progress.load(Ordering::Relaxed);
        let mut quiet_since = Instant::now();
        let mut waiting_since = quiet_since;
        loop {
            tokio::time::sleep(step).await;
            let now = Instant::now();
            let busy = self.busy.load(Ordering::Relaxed) > 0;
            let m = self.moves.load(Ordering::Relaxed);
            if m != moves || busy {
                moves = m;
                quiet_since = now;
            } else if now - quiet_since >= idle {
                return Expired::Idle;
            }
            let p = self.progress.load(Ordering::Relaxed);
            if p != progress || busy {
                progress = p;
                waiting_since = now;
            } else if head.is_some_and(|h| now - waiting_since >= h)
                && !self.http2.load(Ordering::Relaxed)
            {
                return Expired::Head;
            }
        }
    }
}

/// A request in progress on a connection (see [`Activity::begin`]).
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        // The idle period, and the wait for the next request head, start when the last
        // request ends.
        self.0.touch();
        bump(&self.0.progress);
    }
}

/// A socket (plain or TLS) that records activity.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    /// Bytes canaryd's HTTP/1.1 server read and then handed to hyper with the connection:
    /// they come first.
    rewound: Bytes,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.rewound.is_empty() {
            let n = self.rewound.len().min(buf.remaining());
            buf.put_slice(&self.rewound[..n]);
            self.rewound.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves `io` until the client is done, it has been idle for `idle`, or `stop` fires; the
/// last two end it gracefully (in-flight requests finish first). On `stop`, an idle HTTP/1
/// connection first lingers for `limits.drain_linger` (see [`DRAIN_LINGER`]).
///
/// HTTP/1.1 requests are served by canaryd's own server side ([`crate::h1_server`]) until one
/// needs hyper (HTTP/2, an upgrade, HTTP/1.0, a head httparse refuses, ...); hyper then
/// serves the rest of the connection, starting with the bytes already read.
pub async fn serve<S>(
    builder: &auto::Builder<TokioExecutor>,
    io: S,
    proxy: Proxy,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = Tracked {
        inner: io,
        activity: activity.clone(),
        rewound: Bytes::new(),
    };
    let proxy = Arc::new(proxy.with_activity(activity.clone()));
    // Ends the connection: gracefully when idle too long or the proxy is stopping (`None`),
    // at once when a request head is too slow to come.
    let trigger = Box::pin(async {
        tokio::select! {
            expired = activity.watch(limits.idle, limits.head) => Some(expired),
            _ = stop.changed() => None,
        }
    });
    let mut guard = Guard::new(trigger, activity.clone(), limits.drain_linger);
    let io = match crate::h1_server::serve(io, &proxy, &mut guard, limits.max_header_bytes).await? {
        crate::h1_server::Served::Closed => return Ok(()),
        crate::h1_server::Served::HandOff(mut io, read) => {
            io.rewound = read;
            io
        }
    };
    let svc = service_fn(move |req: Request<Incoming>| {
        let proxy = proxy.clone();
        async move { Ok::<_, Infallible>(proxy.handle(req.map(RequestBody::Hyper)).await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    let mut conn = pin!(conn);
    let mut closing = false;
    poll_fn(|cx| {
        while !closing {
            let Poll::Ready(event) = guard.poll_event(cx) else {
                break;
            };
            match event {
                Event::Head => {
                    // Dropping the connection closes the socket.
                    tracing::debug!("no complete request head in time; closing");
                    return Poll::Ready(Ok(()));
                }
                // Lingering: a request already on its way is still served (its response says
                // `Connection: close`, after which hyper closes the connection).
                Event::Stop if guard.lingering() => {}
                Event::Idle | Event::Stop | Event::LingerOver => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
        conn.as_mut().poll(cx).map_err(Into::into)
    })
    .await
}

/// What ends, or begins to end, a connection (see [`Guard::poll_event`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// No complete request head in time: close at once.
    Head,
    /// Idle too long: close once no request is in progress.
    Idle,
    /// The proxy is stopping; the connection is now draining, and lingering if it was idle
    /// (an HTTP/1 connection with no request in progress).
    Stop,
    /// The linger after a stop is over: close once no request is in progress.
    LingerOver,
}

/// Watches a connection's timeouts and the proxy's stop signal, for whichever side (canaryd's
/// HTTP/1.1 server or hyper) serves it. The connection task wakes for every socket event; the
/// trigger is polled only when its own timer or signal woke it.
pub(crate) struct Guard<'a> {
    /// `None` once it fired.
    trigger: Option<Pin<Box<dyn Future<Output = Option<Expired>> + Send + 'a>>>,
    wake: Arc<TriggerWake>,
    trigger_waker: Waker,
    /// The task's waker as last handed to `wake`; the shared copy is locked only when it
    /// changes.
    task: Option<Waker>,
    activity: Arc<Activity>,
    drain_linger: Duration,
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<'a> Guard<'a> {
    fn new(
        trigger: Pin<Box<dyn Future<Output = Option<Expired>> + Send + 'a>>,
        activity: Arc<Activity>,
        drain_linger: Duration,
    ) -> Self {
        let wake = Arc::new(TriggerWake::default());
        Guard {
            trigger: Some(trigger),
            trigger_waker: Waker::from(wake.clone()),
            wake,
            task: None,
            activity,
            drain_linger,
            linger: None,
        }
    }

    /// The next event, if one is due. Each is reported once; after [`Event::Head`] or
    /// [`Event::Idle`] nothing more is.
    pub(crate) fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if let Some(trigger) = &mut self.trigger {
            if !self.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                self.task = Some(cx.waker().clone());
                self.wake.set_task(cx.waker());
            }
            if self.wake.woken.swap(false, Ordering::AcqRel) {
                if let Poll::Ready(why) = trigger
                    .as_mut()
                    .poll(&mut Context::from_waker(&self.trigger_waker))
                {
                    self.trigger = None;
                    return Poll::Ready(match why {
                        Some(Expired::Head) => Event::Head,
                        Some(Expired::Idle) => Event::Idle,
                        None => {
                            self.activity.draining.store(true, Ordering::Relaxed);
                            let idle = self.activity.busy.load(Ordering::Relaxed) == 0;
                            if idle && !self.activity.is_http2() {
                                self.linger = Some(Box::pin(tokio::time::sleep(self.drain_linger)));
                            }
                            Event::Stop
                        }
                    });
                }
            }
        }
        if let Some(linger) = &mut self.linger {
            if linger.as_mut().poll(cx).is_ready() {
                self.linger = None;
                return Poll::Ready(Event::LingerOver);
            }
        }
        Poll::Pending
    }

    /// The proxy is stopping: no further request on this connection.
    pub(crate) fn draining(&self) -> bool {
        self.activity.draining()
    }

    /// Stopping, and the linger for a request already on its way is not over.
    fn lingering(&self) -> bool {
        self.linger.is_some()
    }
}

/// How long a downstream connection may wait, and how large a request head may be.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `listen.idle_timeout`: no request and no bytes moving.
    pub idle: Duration,
    /// `listen.header_read_timeout`: for a complete HTTP/1 request head (`None`: no limit).
    pub head: Option<Duration>,
    /// On shutdown, how long an idle HTTP/1 connection stays open for a request the client
    /// may already have sent ([`DRAIN_LINGER`], at most `listen.drain_timeout`).
    pub drain_linger: Duration,
    /// `listen.max_header_bytes`: a larger request head gets 431.
    pub max_header_bytes: usize,
}

/// On shutdown, an idle HTTP/1 keep-alive connection is not closed at once: a request the
/// client wrote just before (or while) the signal came would otherwise meet a closed
/// connection, the keep-alive close race. For this long such a request is still served, with
/// `Connection: close`; then the connection closes.
pub const DRAIN_LINGER: Duration = Duration::from_secs(1);

/// The waker of a connection's shutdown trigger: notes that the trigger has something to
/// look at, and wakes the connection task.
struct TriggerWake {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Default for TriggerWake {
    fn default() -> Self {
        TriggerWake {
            // The trigger has never been polled: it must be, once.
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        }
    }
}

impl TriggerWake {
    fn set_task(&self, waker: &Waker) {
        *self.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(waker.clone());
    }
}

impl Wake for TriggerWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = task.as_ref() {
            t.wake_by_ref();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Runs `watch` in a task; paused time.
    fn watching(
        a: &Arc<Activity>,
        idle: Duration,
        head: Option<Duration>,
    ) -> tokio::task::JoinHandle<Expired> {
        let a = a.clone();
        tokio::spawn(async move { a.watch(idle, head).await })
    }

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_silence_since_the_last_activity() {
        let a = Arc::new(Activity::new());
        let start = Instant::now();
        let idle = watching(&a, Duration::from_secs(1), None);
        tokio::time::advance(600 * MS).await;
        a.touch();
        assert_eq!(idle.await.expect("watch task"), Expired::Idle);
        let waited = start.elapsed();
        // Silence since 600 ms: idle after 1 s of it, at most a quarter of that late.
        assert!(
            waited >= 1600 * MS && waited <= 1850 * MS,
            "idle {waited:?} after the start, activity at 600 ms"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_progress_is_never_idle() {
        let a = Arc::new(Activity::new());
        let busy = a.begin();
        let idle = watching(&a, Duration::from_secs(1), Some(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(30)).await;
        tokio::task::yield_now().await;
        assert!(
            !idle.is_finished(),
            "expired while a request was in progress"
        );
        drop(busy);
        let ended = Instant::now();
        idle.await.expect("watch task");
        assert!(ended.elapsed() >= 990 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_head_trickling_in_expires_at_the_head_timeout() {
        let a = Arc::new(Activity::new());
        let start = Instant::now();
        let watch = watching(&a, Duration::from_secs(60), Some(Duration::from_secs(1)));
        // Slowloris: a byte every 100 ms keeps the connection from being idle, not from
        // expiring.
        let trickle = tokio::spawn({
            let a = a.clone();
            async move {
                loop {
                    tokio::time::sleep(100 * MS).await;
                    a.touch();
                }
            }
        });
        assert_eq!(watch.await.expect("watch task"), Expired::Head);
        trickle.abort();
        let waited = start.elapsed();
        assert!(
            waited >= 1000 * MS && waited <= 1250 * MS,
            "head timeout after {waited:?}, expected 1 s to 1.25 s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_head_timeout_restarts_when_a_response_ends_and_spares_http2() {
        let a = Arc::new(Activity::new());
        let watch = watching(&a, Duration::from_secs(60), Some(Duration::from_secs(1)));
        tokio::time::advance(700 * MS).await;
        let busy = a.begin();
        // Writing a long response to a slow reader is progress, however long it takes.
        for _ in 0..20 {
            tokio::time::advance(300 * MS).await;
            a.wrote();
        }
        drop(busy);
        let ended = Instant::now();
        assert_eq!(watch.await.expect("watch task"), Expired::Head);
        let waited = ended.elapsed();
        assert!(
            waited >= 1000 * MS && waited <= 1250 * MS,
            "head timeout {waited:?} after the response ended"
        );

        let a = Arc::new(Activity::new());
        a.http2();
        let watch = watching(&a, Duration::from_secs(5), Some(Duration::from_secs(1)));
        assert_eq!(
            watch.await.expect("watch task"),
            Expired::Idle,
            "an HTTP/2 connection waits for its idle timeout only"
        );
    }
}
