//! One downstream connection: served by hyper, closed when idle, drained on shutdown.
//!
//! hyper's `header_read_timeout` only bounds a request head that has started; a keep-alive
//! connection that sends nothing would otherwise hold a `max_connections` slot forever. The
//! socket is wrapped to record when bytes last moved in either direction, and the connection
//! is shut down gracefully after `idle_timeout` of silence — graceful, so a request waiting on a
//! slow upstream (no bytes moving) still completes before the connection closes.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::proxy::Proxy;

/// When bytes last moved on a connection, and how many requests on it are in progress.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Marks a request in progress until the guard is dropped (end of its response body).
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Resolves once no request is in progress and nothing has moved for `idle`; wakes at
    /// most once per `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = self.epoch + last + idle;
            let busy = self.busy.load(Ordering::Relaxed) > 0;
            if !busy && Instant::now() >= deadline {
                return;
            }
            let next = if busy {
                Instant::now() + idle
            } else {
                deadline
            };
            tokio::time::sleep_until(next).await;
        }
    }
}

/// A request in progress on a connection (see [`Activity::begin`]).
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        // The idle period starts when the last request ends.
        self.0.touch();
    }
}

/// A socket (plain or TLS) that records activity.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
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
            self.activity.touch();
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
            self.activity.touch();
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
/// last two end it gracefully (in-flight requests finish first).
pub async fn serve<S>(
    builder: &auto::Builder<TokioExecutor>,
    io: S,
    proxy: Proxy,
    idle: Duration,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = Tracked {
        inner: io,
        activity: activity.clone(),
    };
    let proxy = proxy.with_activity(activity.clone());
    let svc = service_fn(move |req| proxy.clone().serve(req));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => return result,
            _ = activity.idle_for(idle), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = stop.changed(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_for_waits_for_silence_since_the_last_activity() {
        let a = Arc::new(Activity::new());
        tokio::time::advance(Duration::from_millis(900)).await;
        a.touch();
        let start = Instant::now();
        a.idle_for(Duration::from_secs(1)).await;
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(990) && waited <= Duration::from_millis(1010),
            "waited {waited:?} after the last activity"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_progress_is_never_idle() {
        let a = Arc::new(Activity::new());
        let busy = a.begin();
        let idle = tokio::spawn({
            let a = a.clone();
            async move { a.idle_for(Duration::from_secs(1)).await }
        });
        tokio::time::advance(Duration::from_secs(30)).await;
        tokio::task::yield_now().await;
        assert!(!idle.is_finished(), "idle while a request was in progress");
        drop(busy);
        let ended = Instant::now();
        idle.await.expect("idle task");
        assert!(ended.elapsed() >= Duration::from_millis(990));
    }
}
