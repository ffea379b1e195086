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
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use super::guard::{Event, Guard};
use crate::body::RequestBody;
use crate::proxy::activity::Activity;
use crate::proxy::Proxy;

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
/// HTTP/1.1 requests are served by canaryd's own server side ([`super::h1`]) until one
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
    let io = match super::h1::serve(io, &proxy, &mut guard, limits.max_header_bytes).await? {
        super::h1::Served::Closed => return Ok(()),
        super::h1::Served::HandOff(mut io, read) => {
            io.rewound = read;
            io
        }
    };
    // The request's future is boxed: hyper's HTTP/2 server moves each stream's future into
    // its stream task and the task into the runtime, several copies of a future of a few
    // KiB; a box makes each a pointer (callgrind: memcpy was 17% of an h2c request's
    // instructions).
    let svc = service_fn(move |req: Request<Incoming>| {
        let proxy = proxy.clone();
        Box::pin(
            async move { Ok::<_, Infallible>(proxy.handle(req.map(RequestBody::Hyper)).await) },
        )
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
